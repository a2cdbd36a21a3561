//! What every listener task shares: the current table (one writer, lock-free readers), who this node is, the
//! balancing algorithm, metrics, and the count of open connections that drain waits for.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::balance::{Algorithm, Locality};
use crate::copy::CopyStats;
use crate::health::Freshness;
use crate::table::Table;

/// Labels of per-Service metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    /// `namespace/name`.
    pub service: String,
    /// `tcp` or `udp`.
    pub protocol: String,
}

/// The proxy's metrics (registered with the `mesh_` prefix).
#[derive(Debug, Clone, Default)]
pub struct ProxyMetrics {
    /// Connections (UDP: flows) accepted and sent to an endpoint.
    pub opened: Family<ServiceLabels, Counter>,
    /// Connections (flows) open now.
    pub active: Family<ServiceLabels, Gauge>,
    /// Connections refused or failed: no usable endpoint, or every connect attempt failed.
    pub failed: Family<ServiceLabels, Counter>,
    /// Connect attempts that failed (each retried on another endpoint when one is left).
    pub connect_failures: Family<ServiceLabels, Counter>,
    /// Bytes from clients to endpoints.
    pub bytes_sent: Family<ServiceLabels, Counter>,
    /// Bytes from endpoints to clients.
    pub bytes_received: Family<ServiceLabels, Counter>,
    /// Endpoints ejected after repeated connect failures.
    pub ejections: Family<ServiceLabels, Counter>,
    /// Accepted configuration updates.
    pub config_updates: Counter,
    /// Rejected configuration updates (NACKs).
    pub config_rejections: Counter,
    /// Addresses listened on.
    pub listeners: Gauge,
    /// What the byte-copy engine did (splice used, splice unavailable).
    pub copy: CopyStats,
}

impl ProxyMetrics {
    /// Registers every metric.
    pub fn register(&self, r: &mut Registry) {
        r.register("proxy_connections_opened", "Connections (UDP flows) sent to an endpoint", self.opened.clone());
        r.register("proxy_connections_active", "Connections (UDP flows) open now", self.active.clone());
        r.register(
            "proxy_connections_failed",
            "Connections refused: no usable endpoint, or every connect failed",
            self.failed.clone(),
        );
        r.register(
            "proxy_connect_failures",
            "Connect attempts to an endpoint that failed",
            self.connect_failures.clone(),
        );
        r.register("proxy_bytes_sent", "Bytes from clients to endpoints", self.bytes_sent.clone());
        r.register("proxy_bytes_received", "Bytes from endpoints to clients", self.bytes_received.clone());
        r.register(
            "proxy_endpoint_ejections",
            "Endpoints ejected after repeated connect failures",
            self.ejections.clone(),
        );
        r.register("proxy_config_updates", "Accepted configuration updates", self.config_updates.clone());
        r.register("proxy_config_rejections", "Rejected configuration updates (NACKs)", self.config_rejections.clone());
        r.register("proxy_listeners", "Addresses listened on", self.listeners.clone());
        r.register("proxy_splice_directions", "Connection directions moved with splice(2)", self.copy.spliced.clone());
        r.register(
            "proxy_splice_fallbacks",
            "Connection directions that fell back to a userspace copy because splice(2) was unavailable",
            self.copy.splice_fallbacks.clone(),
        );
    }

    /// The labels for a Service.
    pub fn labels(service: &str, udp: bool) -> ServiceLabels {
        ServiceLabels { service: service.to_owned(), protocol: if udp { "udp" } else { "tcp" }.to_owned() }
    }
}

/// One Service's metric handles. Looking a labelled metric up costs a lock, a hash of two strings and label
/// allocations; an accept loop does it once per Service ([`CounterCache`]), not per connection.
#[derive(Debug, Clone)]
pub struct ServiceCounters {
    /// The labels they were made for.
    pub labels: ServiceLabels,
    /// See [`ProxyMetrics::opened`].
    pub opened: Counter,
    /// See [`ProxyMetrics::active`].
    pub active: Gauge,
    /// See [`ProxyMetrics::failed`].
    pub failed: Counter,
    /// See [`ProxyMetrics::connect_failures`].
    pub connect_failures: Counter,
    /// See [`ProxyMetrics::bytes_sent`].
    pub bytes_sent: Counter,
    /// See [`ProxyMetrics::bytes_received`].
    pub bytes_received: Counter,
    /// See [`ProxyMetrics::ejections`].
    pub ejections: Counter,
}

impl ProxyMetrics {
    /// The handles of one Service's metrics.
    pub fn service(&self, service: &str, udp: bool) -> ServiceCounters {
        let labels = Self::labels(service, udp);
        ServiceCounters {
            opened: self.opened.get_or_create_owned(&labels),
            active: self.active.get_or_create_owned(&labels),
            failed: self.failed.get_or_create_owned(&labels),
            connect_failures: self.connect_failures.get_or_create_owned(&labels),
            bytes_sent: self.bytes_sent.get_or_create_owned(&labels),
            bytes_received: self.bytes_received.get_or_create_owned(&labels),
            ejections: self.ejections.get_or_create_owned(&labels),
            labels,
        }
    }
}

/// The counters of the Service an address served last: an address almost always serves the same Service, so
/// a connection finds its handles with one string comparison. Lock-free; shared by an accept loop's tasks.
#[derive(Debug, Default)]
pub struct CounterCache(arc_swap::ArcSwapOption<ServiceCounters>);

impl CounterCache {
    /// The handles for `service`.
    pub fn get(&self, metrics: &ProxyMetrics, service: &str, udp: bool) -> Arc<ServiceCounters> {
        if let Some(c) = &*self.0.load()
            && c.labels.service == service
        {
            return c.clone();
        }
        let c = Arc::new(metrics.service(service, udp));
        self.0.store(Some(c.clone()));
        c
    }
}

pub use mesh_runtime::{ConnTracker, Tracked};

/// Settings of the data path.
#[derive(Debug, Clone)]
pub struct DataConfig {
    /// How to pick among candidates.
    pub algorithm: Algorithm,
    /// How long one connect attempt may take before the next endpoint is tried.
    pub connect_timeout: Duration,
    /// How many endpoints a connection tries before it is refused.
    pub connect_attempts: usize,
    /// How long a UDP flow lives without traffic.
    pub udp_idle: Duration,
    /// How long after losing the control plane the proxy still reports itself healthy (see
    /// [`crate::health::Freshness`]).
    pub stale_after: Duration,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            algorithm: Algorithm::LeastConnections,
            connect_timeout: Duration::from_secs(2),
            connect_attempts: 3,
            udp_idle: Duration::from_secs(30),
            stale_after: crate::health::STALE_AFTER,
        }
    }
}

/// Everything the listener tasks share.
#[derive(Debug)]
pub struct Shared {
    /// The current table: written by the config handler only, read once per connection.
    pub table: ArcSwap<Table>,
    /// This node.
    pub here: Locality,
    /// Data path settings.
    pub cfg: DataConfig,
    /// Metrics.
    pub metrics: ProxyMetrics,
    /// Open connections, for drain.
    pub conns: Arc<ConnTracker>,
    /// Whether the configuration is current (the health check ports' `serviceProxyHealthy`).
    pub freshness: Freshness,
}

impl Shared {
    /// A new shared state with an empty table.
    pub fn new(here: Locality, cfg: DataConfig, metrics: ProxyMetrics) -> Arc<Self> {
        let freshness = Freshness::new(cfg.stale_after);
        Arc::new(Shared {
            table: ArcSwap::from_pointee(Table::default()),
            here,
            cfg,
            metrics,
            conns: Arc::default(),
            freshness,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_open_connections() {
        let t = Arc::new(ConnTracker::default());
        let a = t.track();
        let b = t.track();
        assert_eq!(t.open(), 2);
        assert_eq!(t.wait_idle(Duration::from_millis(20)).await, 2, "deadline passes with both open");
        let waiter = {
            let t = t.clone();
            tokio::spawn(async move { t.wait_idle(Duration::from_secs(10)).await })
        };
        drop(a);
        drop(b);
        assert_eq!(tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap(), 0);
    }
}

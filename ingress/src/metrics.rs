//! The ingress's metrics (registered in the shared `mesh_` registry, served on the admin `/metrics`).
//!
//! Label values come from configuration, never from requests (`host` is the virtual host that matched, `*` for
//! the catch-all, `-` when none did; `route` is the rule; `upstream` the Cluster), so a client cannot blow up
//! the number of series by sending made-up Host headers or paths.

use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Labels of a served request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `http` or `https`.
    pub listener: &'static str,
    /// The virtual host.
    pub host: Arc<str>,
    /// The route (`Prefix /api`), `-` when none matched.
    pub route: Arc<str>,
    /// The response status.
    pub status: u16,
    /// The Cluster, `-` for direct responses.
    pub upstream: Arc<str>,
}

/// `-`, shared: the label value of "none" (labels are `Arc<str>` so that counting a request clones pointers
/// from the table instead of allocating strings).
pub fn none() -> Arc<str> {
    static NONE: OnceLock<Arc<str>> = OnceLock::new();
    NONE.get_or_init(|| Arc::from("-")).clone()
}

/// Labels of a latency observation.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    /// `http` or `https`.
    pub listener: &'static str,
    /// The virtual host.
    pub host: Arc<str>,
}

/// Labels of a TLS handshake.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Labels of an upstream failure.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// The Cluster.
    pub upstream: String,
    /// `connect` (a connect attempt failed), `ejected` (an endpoint was ejected), `no_endpoint` (nothing to send
    /// to), `proxy` (the exchange failed after connecting).
    pub kind: &'static str,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~52 s, doubling.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 20))
}

/// Every metric of the ingress.
#[derive(Debug, Clone)]
pub struct IngressMetrics {
    /// Requests by listener, host, route, status and upstream.
    pub requests: Family<RequestLabels, Counter>,
    /// Request duration (first byte in to last byte out), by listener and host.
    pub latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    /// TLS handshakes by result.
    pub handshakes: Family<HandshakeLabels, Counter>,
    /// Upstream failures by Cluster and kind.
    pub upstream_failures: Family<UpstreamLabels, Counter>,
    /// Downstream connections open now.
    pub connections: Gauge,
    /// Accepted configuration updates.
    pub config_updates: Counter,
    /// Rejected configuration updates (NACKs).
    pub config_rejections: Counter,
}

impl Default for IngressMetrics {
    fn default() -> Self {
        IngressMetrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            handshakes: Family::default(),
            upstream_failures: Family::default(),
            connections: Gauge::default(),
            config_updates: Counter::default(),
            config_rejections: Counter::default(),
        }
    }
}

impl IngressMetrics {
    /// Registers every metric.
    pub fn register(&self, r: &mut Registry) {
        r.register("ingress_requests", "Requests served, by host, route, status and upstream", self.requests.clone());
        r.register_with_unit(
            "ingress_request_duration",
            "Request duration from the request's arrival to the response's end",
            Unit::Seconds,
            self.latency.clone(),
        );
        r.register("ingress_tls_handshakes", "TLS handshakes, by result", self.handshakes.clone());
        r.register(
            "ingress_upstream_failures",
            "Upstream failures, by cluster and kind",
            self.upstream_failures.clone(),
        );
        r.register("ingress_connections", "Downstream connections open now", self.connections.clone());
        r.register("ingress_config_updates", "Accepted configuration updates", self.config_updates.clone());
        r.register(
            "ingress_config_rejections",
            "Rejected configuration updates (NACKs)",
            self.config_rejections.clone(),
        );
    }

    /// Counts an upstream failure.
    pub fn upstream_failure(&self, upstream: &str, kind: &'static str) {
        self.upstream_failures.get_or_create(&UpstreamLabels { upstream: upstream.to_owned(), kind }).inc();
    }
}

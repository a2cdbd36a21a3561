//! `healthCheckNodePort`: how a cloud load balancer learns which nodes to send a `externalTrafficPolicy: Local`
//! Service's traffic to. Like kube-proxy, answer 200 with the count of this node's ready endpoints when there is
//! at least one and the proxy itself is healthy, 503 otherwise, so the load balancer skips nodes that would have
//! to drop the traffic.
//!
//! **The proxy's own health** ([`Freshness`], `serviceProxyHealthy` in the answer, also in `/config_dump`) says
//! whether this proxy's configuration is current, as kube-proxy's healthz says whether its last sync is recent:
//! healthy while it has a configuration and is connected to the control plane, and for `--stale-after-s` after
//! the stream was lost (a control-plane restart is not a node failure); then unhealthy, so a cloud load
//! balancer stops sending to a node whose proxy has lost the control plane and may route to Pods that are
//! gone. A configuration from a snapshot file is current for as long as the file is what the proxy serves.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::state::Shared;
use crate::table::Health;

/// How long a proxy that lost the control plane stays healthy by default (kube-proxy: twice its 30 s sync
/// period).
pub const STALE_AFTER: Duration = Duration::from_secs(60);

/// Whether the proxy's configuration is current, and since when it is not. Written by the xDS status task (or
/// once, for a file), read by the health check ports and `/config_dump`.
#[derive(Debug)]
pub struct Freshness {
    /// A configuration was loaded (from the control plane, a saved state or a file).
    loaded: AtomicBool,
    /// It is being kept current now (a stream to the control plane is open, or it came from a file).
    current: AtomicBool,
    /// Unix milliseconds when it was last known current (when the stream was lost, or when a saved state was
    /// written); 0: never.
    last_current_ms: AtomicU64,
    /// How long after `last_current_ms` the proxy still counts as healthy.
    stale_after: Duration,
}

impl Default for Freshness {
    fn default() -> Self {
        Freshness::new(STALE_AFTER)
    }
}

/// What [`Freshness`] says at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreshnessReport {
    /// Whether the proxy counts as healthy.
    pub healthy: bool,
    /// Whether the configuration is being kept current now.
    pub current: bool,
    /// How long ago it was last current (`Some(0)` when it is current now); `None` when there never was one.
    pub last_current_ago: Option<Duration>,
}

impl Freshness {
    /// Nothing loaded yet; stale `stale_after` after losing the control plane.
    pub fn new(stale_after: Duration) -> Self {
        Freshness {
            loaded: AtomicBool::new(false),
            current: AtomicBool::new(false),
            last_current_ms: AtomicU64::new(0),
            stale_after,
        }
    }

    /// The configuration is loaded and kept current (connected to the control plane with every needed type
    /// accepted, or loaded from a file).
    pub fn set_current(&self) {
        self.last_current_ms.store(unix_ms(SystemTime::now()), Ordering::Relaxed);
        self.loaded.store(true, Ordering::Relaxed);
        self.current.store(true, Ordering::Relaxed);
    }

    /// The stream to the control plane is gone: the configuration in force was current until now.
    pub fn set_disconnected(&self) {
        if self.current.swap(false, Ordering::Relaxed) {
            self.last_current_ms.store(unix_ms(SystemTime::now()), Ordering::Relaxed);
            warn!(stale_after = ?self.stale_after, "configuration no longer kept current by the control plane");
        }
    }

    /// A configuration saved at `written` was loaded (no control plane yet): current as of then.
    pub fn set_saved(&self, written: SystemTime) {
        self.last_current_ms.store(unix_ms(written), Ordering::Relaxed);
        self.loaded.store(true, Ordering::Relaxed);
    }

    /// The state now.
    pub fn report(&self) -> FreshnessReport {
        self.report_at(SystemTime::now())
    }

    /// The state at `now`.
    pub fn report_at(&self, now: SystemTime) -> FreshnessReport {
        let (loaded, current) = (self.loaded.load(Ordering::Relaxed), self.current.load(Ordering::Relaxed));
        if !loaded {
            return FreshnessReport { healthy: false, current: false, last_current_ago: None };
        }
        if current {
            return FreshnessReport { healthy: true, current, last_current_ago: Some(Duration::ZERO) };
        }
        let ago = Duration::from_millis(unix_ms(now).saturating_sub(self.last_current_ms.load(Ordering::Relaxed)));
        FreshnessReport { healthy: ago < self.stale_after, current, last_current_ago: Some(ago) }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// This node's ready endpoints of every Service that uses `port` as its health check port, by Service.
pub fn local_endpoints(shared: &Shared, port: u16) -> Vec<(String, usize)> {
    let table = shared.table.load();
    let mut out: Vec<(String, usize)> = Vec::new();
    for l in table.listeners.values().filter(|l| l.health_check_node_port == Some(port)) {
        if out.iter().any(|(s, _)| *s == l.service) {
            continue;
        }
        let n = table.clusters.get(&l.cluster).map_or(0, |c| {
            c.endpoints.iter().filter(|e| e.health == Health::Ready && *e.place.node == *shared.here.node).count()
        });
        out.push((l.service.clone(), n));
    }
    out
}

/// The answer of health check port `port`: status, reason phrase and JSON body (kube-proxy's fields, plus
/// `lastCurrentSecondsAgo`: how long ago the configuration was last current, 0 when it is now, null when never).
pub fn answer(shared: &Shared, port: u16) -> (u16, &'static str, String) {
    let services = local_endpoints(shared, port);
    let total: usize = services.iter().map(|(_, n)| n).sum();
    let proxy = shared.freshness.report();
    let (status, reason) = if total > 0 && proxy.healthy { (200, "OK") } else { (503, "Service Unavailable") };
    let (ns, name) = services.first().map(|(s, _)| s.split_once('/').unwrap_or(("", s))).unwrap_or(("", ""));
    let body = serde_json::json!({
        "service": {"namespace": ns, "name": name},
        "localEndpoints": total,
        "serviceProxyHealthy": proxy.healthy,
        "lastCurrentSecondsAgo": proxy.last_current_ago.map(|d| d.as_secs()),
    })
    .to_string();
    (status, reason, body)
}

/// Serves the health check port until `stop`.
pub async fn serve(listener: TcpListener, port: u16, shared: Arc<Shared>, stop: mesh_runtime::Shutdown) {
    loop {
        let (mut conn, _) = tokio::select! {
            _ = stop.wait() => return,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    debug!(port, "health check accept: {e}");
                    // Out of descriptors recurs at once: pause rather than spin (as every accept loop does).
                    tokio::select! {
                        _ = stop.wait() => return,
                        _ = mesh_runtime::accept::pause_after(&e) => {}
                    }
                    continue;
                }
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            // Read the request head (bounded); its content does not matter.
            let mut buf = [0u8; 4096];
            let mut read = 0;
            let head = async {
                while read < buf.len() {
                    match conn.read(&mut buf[read..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => read += n,
                    }
                    if buf[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            };
            if tokio::time::timeout(std::time::Duration::from_secs(5), head).await.is_err() {
                return;
            }
            let (status, reason, body) = answer(&shared, port);
            let resp = format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Locality;
    use crate::state::{DataConfig, ProxyMetrics};
    use crate::table::testing::web;
    use crate::table::{ListenKey, Protocol};

    #[test]
    fn freshness_is_healthy_while_kept_current_and_for_a_while_after() {
        let f = Freshness::new(Duration::from_secs(60));
        let t0 = SystemTime::now();
        assert_eq!(
            f.report_at(t0),
            FreshnessReport { healthy: false, current: false, last_current_ago: None },
            "nothing loaded: not healthy"
        );
        f.set_current();
        assert!(f.report_at(t0 + Duration::from_secs(3600)).healthy, "connected: healthy however long");
        f.set_disconnected();
        let now = SystemTime::now();
        let r = f.report_at(now + Duration::from_secs(59));
        assert!(r.healthy && !r.current, "{r:?}");
        assert!(r.last_current_ago.unwrap() >= Duration::from_secs(59));
        let r = f.report_at(now + Duration::from_secs(61));
        assert!(!r.healthy, "stale after a minute without the control plane: {r:?}");
        f.set_disconnected();
        assert!(!f.report_at(now + Duration::from_secs(61)).healthy, "a second disconnect does not refresh it");
        f.set_current();
        assert!(f.report().healthy, "reconnected");
    }

    #[test]
    fn a_saved_configuration_is_as_fresh_as_when_it_was_written() {
        let f = Freshness::new(Duration::from_secs(60));
        f.set_saved(SystemTime::now() - Duration::from_secs(10));
        let r = f.report();
        assert!(r.healthy && !r.current && r.last_current_ago.unwrap() >= Duration::from_secs(10), "{r:?}");
        let f = Freshness::new(Duration::from_secs(60));
        f.set_saved(SystemTime::now() - Duration::from_secs(3600));
        assert!(!f.report().healthy, "saved an hour ago and no control plane since");
    }

    /// A Shared whose table has one Local Service with health check port 30000 and one ready endpoint on this
    /// node, its freshness going stale 50 ms after the control plane is lost.
    fn shared_with_a_local_endpoint() -> Arc<Shared> {
        let data = DataConfig { stale_after: Duration::from_millis(50), ..DataConfig::default() };
        let shared = Shared::new(Locality { node: "n1".into(), zone: None }, data, ProxyMetrics::default());
        let key = ListenKey { protocol: Protocol::Tcp, addr: "10.0.0.1:80".parse().unwrap() };
        shared.table.store(Arc::new(web(key, &["10.1.0.1:8080".parse().unwrap()], Some(30000))));
        shared
    }

    #[test]
    fn the_health_check_port_tells_whether_the_proxy_is_current() {
        let shared = shared_with_a_local_endpoint();
        let body = |b: &str| serde_json::from_str::<serde_json::Value>(b).unwrap();
        let (status, _, b) = answer(&shared, 30000);
        assert_eq!(status, 503, "no configuration from the control plane yet: {b}");
        assert_eq!(body(&b)["serviceProxyHealthy"], false);
        assert_eq!(body(&b)["lastCurrentSecondsAgo"], serde_json::Value::Null);

        shared.freshness.set_current();
        let (status, _, b) = answer(&shared, 30000);
        assert_eq!(status, 200, "{b}");
        assert_eq!(body(&b)["localEndpoints"], 1);
        assert_eq!(body(&b)["serviceProxyHealthy"], true);
        assert_eq!(body(&b)["service"]["name"], "web");

        shared.freshness.set_disconnected();
        assert_eq!(answer(&shared, 30000).0, 200, "just lost the control plane: still healthy");
        std::thread::sleep(Duration::from_millis(80));
        let (status, _, b) = answer(&shared, 30000);
        assert_eq!(status, 503, "lost the control plane for longer than stale_after: {b}");
        assert_eq!(body(&b)["serviceProxyHealthy"], false);
        assert_eq!(body(&b)["localEndpoints"], 1);
        assert_eq!(body(&b)["lastCurrentSecondsAgo"], 0);
    }
}

//! `healthCheckNodePort`: how a cloud load balancer learns which nodes to send a `externalTrafficPolicy: Local`
//! Service's traffic to. Like kube-proxy, answer 200 with the count of this node's ready endpoints when there is
//! at least one, 503 when there is none, so the load balancer skips nodes that would have to drop the traffic.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::debug;

use crate::state::Shared;
use crate::table::Health;

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

/// Serves the health check port until `stop`.
pub async fn serve(listener: TcpListener, port: u16, shared: Arc<Shared>, stop: mesh_runtime::Shutdown) {
    loop {
        let (mut conn, _) = tokio::select! {
            _ = stop.wait() => return,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    debug!(port, "health check accept: {e}");
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
            let services = local_endpoints(&shared, port);
            let total: usize = services.iter().map(|(_, n)| n).sum();
            let (status, reason) = if total > 0 { (200, "OK") } else { (503, "Service Unavailable") };
            let (ns, name) = services.first().map(|(s, _)| s.split_once('/').unwrap_or(("", s))).unwrap_or(("", ""));
            let body = serde_json::json!({
                "service": {"namespace": ns, "name": name},
                "localEndpoints": total,
                "serviceProxyHealthy": true,
            })
            .to_string();
            let resp = format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

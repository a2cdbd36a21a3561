//! Keeps the proxy's sockets in step with the table: a listening socket per Service address, a health check
//! server per `healthCheckNodePort`, and (optionally) the addresses on the dummy interface.
//!
//! A new address is bound when it appears; a removed one stops accepting, while the connections it already
//! carries run to their end. An address that cannot be bound yet (not local yet, port taken) is reported and
//! tried again on the next change or every few seconds.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mesh_runtime::Shutdown;
use rustix::net::{AddressFamily, SocketType, sockopt};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::netif::Interface;
use crate::state::Shared;
use crate::table::{ListenKey, Protocol};

/// How often addresses that failed to bind are tried again.
pub const RETRY: Duration = Duration::from_secs(5);

fn family(addr: &SocketAddr) -> AddressFamily {
    if addr.is_ipv4() { AddressFamily::INET } else { AddressFamily::INET6 }
}

/// A socket bound to `addr`: address reuse on, and IPv6-only for IPv6 so `[::]:p` and `0.0.0.0:p` (a dual-stack
/// NodePort) can both be bound.
fn socket(addr: &SocketAddr, kind: SocketType) -> std::io::Result<rustix::fd::OwnedFd> {
    let fd = rustix::net::socket(family(addr), kind, None)?;
    sockopt::set_socket_reuseaddr(&fd, true)?;
    if addr.is_ipv6() {
        sockopt::set_ipv6_v6only(&fd, true)?;
    }
    rustix::net::bind(&fd, addr)?;
    Ok(fd)
}

/// Binds a TCP listening socket.
pub fn bind_tcp(addr: &SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let fd = socket(addr, SocketType::STREAM)?;
    // Accepted connections inherit TCP_NODELAY from the listening socket (Linux): one setsockopt here instead
    // of one per connection. Proxied bytes must not wait for Nagle: the peers chose their own write sizes.
    sockopt::set_tcp_nodelay(&fd, true)?;
    rustix::net::listen(&fd, 4096)?;
    let l = std::net::TcpListener::from(fd);
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}

/// Binds a UDP socket.
pub fn bind_udp(addr: &SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    let fd = socket(addr, SocketType::DGRAM)?;
    let s = std::net::UdpSocket::from(fd);
    s.set_nonblocking(true)?;
    tokio::net::UdpSocket::from_std(s)
}

/// How a running socket is stopped: a TCP accept loop by aborting its task (it holds nothing that needs a
/// goodbye, and carrying a stop signal in each of ten thousand idle loops costs memory); a UDP socket by its flag,
/// because its flows' reply tasks are stopped with it.
#[derive(Debug)]
enum Stop {
    Task(tokio::task::AbortHandle),
    Flag(Shutdown),
}

impl Stop {
    fn stop(self) {
        match self {
            Stop::Task(t) => t.abort(),
            Stop::Flag(f) => f.trigger(),
        }
    }
}

/// The running sockets.
#[derive(Debug)]
pub struct Manager {
    shared: Arc<Shared>,
    running: BTreeMap<ListenKey, Stop>,
    health: BTreeMap<u16, Shutdown>,
    failed: BTreeMap<ListenKey, String>,
    iface: Option<Interface>,
}

impl Manager {
    /// A manager; with `iface`, Service addresses are put on that dummy interface.
    pub fn new(shared: Arc<Shared>, iface: Option<&str>) -> Self {
        Manager {
            shared,
            running: BTreeMap::new(),
            health: BTreeMap::new(),
            failed: BTreeMap::new(),
            iface: iface.map(Interface::new),
        }
    }

    /// The addresses listened on now.
    pub fn listening(&self) -> Vec<ListenKey> {
        self.running.keys().copied().collect()
    }

    /// Brings the sockets in step with the current table.
    pub fn reconcile(&mut self) {
        let table = self.shared.table.load_full();
        let wanted: BTreeSet<ListenKey> = table.by_key.keys().copied().collect();
        if let Some(iface) = &mut self.iface {
            let ips: BTreeSet<IpAddr> = wanted.iter().map(|k| k.addr.ip()).collect();
            if let Err(e) = iface.sync(&ips) {
                warn!("{e}");
            }
        }
        let gone: Vec<ListenKey> = self.running.keys().filter(|k| !wanted.contains(k)).copied().collect();
        for key in gone {
            if let Some(stop) = self.running.remove(&key) {
                stop.stop();
                info!(addr = %key.addr, protocol = ?key.protocol, "stopped listening (established connections continue)");
            }
        }
        self.failed.retain(|k, _| wanted.contains(k));
        for key in wanted {
            if self.running.contains_key(&key) {
                continue;
            }
            let shared = self.shared.clone();
            let bound = match key.protocol {
                Protocol::Tcp => bind_tcp(&key.addr)
                    .map(|l| Stop::Task(tokio::spawn(crate::tcp::serve(l, key, shared)).abort_handle())),
                Protocol::Udp => bind_udp(&key.addr).map(|s| {
                    let stop = Shutdown::new();
                    tokio::spawn(crate::udp::serve(s, key, shared, stop.clone()));
                    Stop::Flag(stop)
                }),
            };
            match bound {
                Ok(stop) => {
                    self.failed.remove(&key);
                    self.running.insert(key, stop);
                    info!(addr = %key.addr, protocol = ?key.protocol, "listening");
                }
                Err(e) => {
                    let reason = e.to_string();
                    if self.failed.get(&key) != Some(&reason) {
                        let service = table.by_key.get(&key).map(|l| l.service.clone()).unwrap_or_default();
                        warn!(addr = %key.addr, protocol = ?key.protocol, %service,
                            "cannot listen: {reason} (is the address local, or the port taken?); retrying");
                    }
                    self.failed.insert(key, reason);
                }
            }
        }
        // Health check ports of `externalTrafficPolicy: Local` Services.
        let ports: BTreeSet<u16> = table.listeners.values().filter_map(|l| l.health_check_node_port).collect();
        let old: Vec<u16> = self.health.keys().filter(|p| !ports.contains(p)).copied().collect();
        for p in old {
            if let Some(stop) = self.health.remove(&p) {
                stop.trigger();
            }
        }
        for port in ports {
            if self.health.contains_key(&port) {
                continue;
            }
            match bind_tcp(&SocketAddr::from(([0, 0, 0, 0], port))) {
                Ok(l) => {
                    let stop = Shutdown::new();
                    tokio::spawn(crate::health::serve(l, port, self.shared.clone(), stop.clone()));
                    self.health.insert(port, stop);
                }
                Err(e) => warn!(port, "cannot serve healthCheckNodePort: {e}"),
            }
        }
        self.shared.metrics.listeners.set(self.running.len() as i64);
    }

    /// Stops accepting everywhere (drain); established connections continue, so the Service addresses stay on
    /// the interface until [`Manager::release_interface`].
    pub fn stop_accepting(&mut self) {
        for (_, stop) in std::mem::take(&mut self.running) {
            stop.stop();
        }
        for (_, stop) in std::mem::take(&mut self.health) {
            stop.trigger();
        }
        self.shared.metrics.listeners.set(0);
    }

    /// Takes the Service addresses off the interface (after drain: nothing uses them any more).
    pub fn release_interface(&mut self) {
        if let Some(iface) = &mut self.iface {
            iface.remove();
        }
    }
}

/// Runs the manager: reconciles on every table change (and every [`RETRY`] while some address failed) until
/// `stop`, then stops accepting everywhere and hands the manager back (its interface still holds the addresses
/// open connections use, until [`Manager::release_interface`]).
pub async fn run(
    mut manager: Manager,
    mut changes: watch::Receiver<u64>,
    stop: Shutdown,
    listening: watch::Sender<Vec<ListenKey>>,
) -> Manager {
    let mut open = true;
    loop {
        manager.reconcile();
        listening.send_replace(manager.listening());
        let retry = !manager.failed.is_empty();
        tokio::select! {
            _ = stop.wait() => break,
            // A source that will not change again (a snapshot file) closes the channel: keep serving.
            changed = changes.changed(), if open => open = changed.is_ok(),
            _ = tokio::time::sleep(RETRY), if retry => {}
        }
    }
    manager.stop_accepting();
    listening.send_replace(Vec::new());
    manager
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_inherit_nodelay() {
        let l = bind_tcp(&SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let addr = l.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = l.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap(), "TCP_NODELAY is not inherited: set it per connection");
    }
}

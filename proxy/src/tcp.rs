//! The TCP data path of one Service address: accept, pick an endpoint, connect (on another endpoint when a
//! connect fails), then move bytes both ways until both sides are done.
//!
//! Why the pieces are shaped this way:
//! - **One table read per connection.** A connection loads the table once and lets go of it as soon as it is
//!   connected, so a long-lived connection neither sees a half-applied change nor keeps old tables alive; the
//!   endpoint's live counters (`Active`) are separate `Arc`s it keeps.
//! - **Refuse with a reset.** With nothing to connect to, the client gets a TCP RST at once (`SO_LINGER` 0, then
//!   close) rather than a FIN, which would look like an empty but successful reply, or a hang. Unlike
//!   kube-proxy's iptables `REJECT`, the handshake has already completed in the kernel, so the client sees
//!   `ECONNRESET` on its first read or write instead of `ECONNREFUSED` from `connect`.
//! - **Retry only before the first byte.** A failed or timed-out connect is retried on another endpoint: nothing
//!   has been read from the client yet, so nothing can be lost or sent twice.
//! - **Bytes are moved by [`crate::copy`]** (splice(2) on Linux, half-close forwarded, a reset passed on).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mesh_runtime::accept;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::balance::{self, EJECT_AFTER_FAILURES, EJECT_FOR};
use crate::copy::{Mode, pump, reset};
use crate::state::{CounterCache, ProxyMetrics, ServiceCounters, Shared};
use crate::table::{Cluster, Endpoint, ListenKey};

/// Why a connection could not be served. Logged at debug level (one per connection would flood the logs at
/// info); the counts are in the metrics.
#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    /// The table has no Service on this address any more (it was removed; the listener is about to stop).
    #[error("{addr}: no Service listens here in the current table (removed; this listener is stopping)")]
    NoListener {
        /// The address.
        addr: SocketAddr,
    },
    /// The listener's Cluster is not in the table.
    #[error("{service}: cluster {cluster:?} is not in the table; check that its Cluster resource was sent")]
    NoCluster {
        /// `namespace/name`.
        service: String,
        /// The missing cluster.
        cluster: String,
    },
    /// No endpoint may take traffic.
    #[error(
        "{service}: no usable endpoint{}; check the Service's EndpointSlices and Pod readiness",
        if *local_only { " on this node (traffic policy Local)" } else { "" }
    )]
    NoEndpoint {
        /// `namespace/name`.
        service: String,
        /// Whether only this node's endpoints were eligible.
        local_only: bool,
    },
    /// A connect to an endpoint failed.
    #[error("connect to {addr} failed: {source}; is the Pod listening on that port?")]
    Connect {
        /// The endpoint.
        addr: SocketAddr,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// A connect to an endpoint did not complete in time.
    #[error("connect to {addr} timed out after {after:?}; is the Pod reachable from this node?")]
    ConnectTimeout {
        /// The endpoint.
        addr: SocketAddr,
        /// The connect timeout.
        after: Duration,
    },
    /// Every endpoint tried failed to connect.
    #[error("{service}: {attempts} connect attempt(s) failed, the last: {last}")]
    AllFailed {
        /// `namespace/name`.
        service: String,
        /// How many endpoints were tried.
        attempts: usize,
        /// The last failure.
        #[source]
        last: Box<TcpError>,
    },
    /// Copying between client and endpoint ended with an error (usually a reset from one side).
    #[error("{service}: connection to {addr} ended with an error: {source}")]
    Copy {
        /// `namespace/name`.
        service: String,
        /// The endpoint.
        addr: SocketAddr,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
}

/// Accepts connections to one Service address, forever: it is stopped by aborting its task (see
/// [`crate::listeners`]), which drops the listener, so new connects are refused. Connections already accepted run
/// on in their own tasks until both sides are done, each counted in `shared.conns` so a drain can wait for them.
///
/// Nothing but the listener and a few pointers lives across its one `await`: a node proxy runs one of these per
/// Service address (ten thousand on a big cluster), idle almost all the time, so its size is the proxy's memory.
pub async fn serve(listener: TcpListener, key: ListenKey, shared: Arc<Shared>) {
    let counters = Arc::new(CounterCache::default());
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                // Counted before the task is spawned, so a drain that starts now already sees it.
                let tracked = shared.conns.track();
                let shared = shared.clone();
                let counters = counters.clone();
                tokio::spawn(async move {
                    let _tracked = tracked;
                    if let Err(e) = connection(client, peer, key, &shared, &counters).await {
                        debug!(listen = %key.addr, client = %peer, error = %e, "TCP connection failed");
                    }
                });
            }
            // The client gave up between the handshake and accept: nothing to do.
            Err(e) if accept::client_went_away(&e) => {
                debug!(listen = %key.addr, error = %e, "accept: client went away");
            }
            Err(e) => {
                warn!(listen = %key.addr, error = %e, "accept failed; check the open-files limit (ulimit -n)");
                // Boxed: a timer kept inline would make every idle accept loop larger for the sake of a path
                // that hardly ever runs.
                Box::pin(accept::pause_after(&e)).await;
            }
        }
    }
}

/// Serves one accepted connection.
async fn connection(
    client: TcpStream,
    peer: SocketAddr,
    key: ListenKey,
    shared: &Shared,
    counters: &CounterCache,
) -> Result<(), TcpError> {
    let (upstream, addr, c, _active) = {
        // The table is held only until connected (see the module docs).
        let table = shared.table.load_full();
        let Some(listener) = table.by_key.get(&key) else {
            refuse(client, &shared.metrics.failed.get_or_create_owned(&ProxyMetrics::labels("", false)));
            return Err(TcpError::NoListener { addr: key.addr });
        };
        let c = counters.get(&shared.metrics, &listener.service, false);
        let Some(cluster) = table.clusters.get(&listener.cluster) else {
            refuse(client, &c.failed);
            return Err(TcpError::NoCluster { service: listener.service.clone(), cluster: listener.cluster.clone() });
        };
        let cands = balance::candidates(cluster, listener.local_only, shared.here.at(&table));
        if cands.is_empty() {
            refuse(client, &c.failed);
            return Err(TcpError::NoEndpoint { service: listener.service.clone(), local_only: listener.local_only });
        }
        match connect(cluster, &cands, peer.ip(), shared, &c).await {
            Ok((upstream, ep)) => (upstream, ep.addr, c, balance::InFlight::new(&ep.stats)),
            Err(e) => {
                refuse(client, &c.failed);
                return Err(e);
            }
        }
    };
    // Proxied bytes must not wait for Nagle: the peers chose their own write sizes. (The client side inherits
    // TCP_NODELAY from the listening socket, see `listeners::bind_tcp`.)
    if let Err(e) = upstream.set_nodelay(true) {
        debug!(error = %e, "TCP_NODELAY not set");
    }
    c.opened.inc();
    let _open = OpenGauge::new(c.active.clone());
    let (to_endpoint, to_client) = (|n| _ = c.bytes_sent.inc_by(n), |n| _ = c.bytes_received.inc_by(n));
    pump(client, upstream, Mode::Splice, &shared.metrics.copy, to_endpoint, to_client)
        .await
        .map_err(|source| TcpError::Copy { service: c.labels.service.clone(), addr, source })
}

/// Connects to one of `cands`, trying up to `connect_attempts` different endpoints. Records each outcome on
/// the endpoint (failures in a row eject it).
async fn connect<'a>(
    cluster: &Cluster,
    cands: &[&'a Endpoint],
    client: IpAddr,
    shared: &Shared,
    c: &ServiceCounters,
) -> Result<(TcpStream, &'a Endpoint), TcpError> {
    let service = c.labels.service.as_str();
    let cfg = &shared.cfg;
    let mut tried = Vec::new();
    let mut last = None;
    for _ in 0..cfg.connect_attempts.max(1) {
        let Some(ep) = balance::choose(cluster, cands, client, &tried, cfg.algorithm) else { break };
        let err = match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(ep.addr)).await {
            Ok(Ok(s)) => {
                ep.stats.connected();
                return Ok((s, ep));
            }
            Ok(Err(source)) => TcpError::Connect { addr: ep.addr, source },
            Err(_) => TcpError::ConnectTimeout { addr: ep.addr, after: cfg.connect_timeout },
        };
        debug!(service, endpoint = %ep.addr, error = %err, "connect failed; trying another endpoint if any");
        tried.push(ep.addr);
        c.connect_failures.inc();
        if ep.stats.connect_failed() {
            c.ejections.inc();
            warn!(
                service, endpoint = %ep.addr, error = %err,
                "endpoint ejected for {EJECT_FOR:?} after {EJECT_AFTER_FAILURES} connect failures in a row"
            );
        }
        last = Some(err);
    }
    let last = last.unwrap_or(TcpError::NoEndpoint { service: service.to_owned(), local_only: false });
    Err(TcpError::AllFailed { service: service.to_owned(), attempts: tried.len(), last: Box::new(last) })
}

/// Resets the client at once and counts the refusal.
fn refuse(client: TcpStream, failed: &prometheus_client::metrics::counter::Counter) {
    failed.inc();
    reset(&client);
}

/// The `active` gauge, held up while a connection is open (and brought down even if its task is cancelled).
#[derive(Debug)]
struct OpenGauge(Gauge);

impl OpenGauge {
    fn new(g: Gauge) -> Self {
        g.inc();
        OpenGauge(g)
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpSocket;
    use tokio::task::JoinHandle;
    use tokio::time::timeout;

    use mesh_tests::assert_eventually;

    use super::*;
    use crate::balance::{Algorithm, Locality};
    use crate::copy::tests::{SOON, random, send_and_read, within};
    use crate::state::DataConfig;
    use crate::state::ServiceLabels;
    use crate::table::testing::web;
    use crate::table::{EndpointStats, Protocol, Table, now_ms};

    fn labels() -> ServiceLabels {
        ProxyMetrics::labels("ns/web", false)
    }

    struct Proxy {
        addr: SocketAddr,
        key: ListenKey,
        shared: Arc<Shared>,
        task: JoinHandle<()>,
    }

    impl Proxy {
        async fn start(ip: &str, cfg: DataConfig, eps: &[SocketAddr]) -> Proxy {
            let listener = TcpListener::bind((ip, 0)).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let key = ListenKey { protocol: Protocol::Tcp, addr };
            let shared = Shared::new(Locality { node: "n1".into(), zone: None }, cfg, ProxyMetrics::default());
            shared.table.store(Arc::new(web(key, eps, None)));
            let task = tokio::spawn(serve(listener, key, shared.clone()));
            Proxy { addr, key, shared, task }
        }

        async fn connect(&self) -> TcpStream {
            within("connect to the proxy", TcpStream::connect(self.addr)).await.unwrap()
        }

        fn stats(&self, ep: SocketAddr) -> Arc<EndpointStats> {
            let t = self.shared.table.load();
            t.clusters["ns/web/80"].endpoints.iter().find(|e| e.addr == ep).unwrap().stats.clone()
        }

        fn count(&self, f: impl Fn(&ProxyMetrics, &ServiceLabels) -> u64) -> u64 {
            f(&self.shared.metrics, &labels())
        }
    }

    /// An echo server: every connection gets back what it sends, and a FIN after the client's. `name`, if
    /// given, is sent first, so a client can tell which endpoint it reached.
    async fn echo(ip: &str, name: Option<u8>) -> (SocketAddr, Arc<AtomicUsize>) {
        let l = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let n = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                n.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    if let Some(b) = name {
                        w.write_all(&[b]).await?;
                    }
                    tokio::io::copy(&mut r, &mut w).await?;
                    w.shutdown().await
                });
            }
        });
        (addr, accepted)
    }

    async fn roundtrip(s: &mut TcpStream, msg: &[u8]) {
        within("write", s.write_all(msg)).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        within("read the echo", s.read_exact(&mut back)).await.unwrap();
        assert_eq!(back, msg);
    }

    /// A closed port: bound, then released (on an address no other test binds).
    async fn closed_port(ip: &str) -> SocketAddr {
        let l = TcpListener::bind((ip, 0)).await.unwrap();
        l.local_addr().unwrap()
    }

    #[tokio::test]
    async fn traffic_reaches_the_endpoint_and_back() {
        let (ep, accepted) = echo("127.0.0.1", None).await;
        let p = Proxy::start("127.0.0.1", DataConfig::default(), &[ep]).await;
        let mut c = p.connect().await;
        roundtrip(&mut c, b"hello").await;
        roundtrip(&mut c, b"again").await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(p.shared.conns.open(), 1);
        assert_eq!(p.stats(ep).active.load(Ordering::Relaxed), 1);
        assert_eq!(p.count(|m, l| m.active.get_or_create(l).get() as u64), 1);
        drop(c);
        assert_eventually!(p.shared.conns.open() == 0, "the connection closes");
        assert_eq!(p.stats(ep).active.load(Ordering::Relaxed), 0);
        assert_eq!(p.count(|m, l| m.opened.get_or_create(l).get()), 1);
        assert_eq!(p.count(|m, l| m.active.get_or_create(l).get() as u64), 0);
        assert_eq!(p.count(|m, l| m.bytes_sent.get_or_create(l).get()), 10);
        assert_eq!(p.count(|m, l| m.bytes_received.get_or_create(l).get()), 10);
        assert_eq!(p.count(|m, l| m.failed.get_or_create(l).get()), 0);
    }

    #[tokio::test]
    async fn least_connections_gives_every_endpoint_connections() {
        let mut eps = Vec::new();
        for _ in 0..3 {
            eps.push(echo("127.0.0.1", None).await.0);
        }
        let p = Proxy::start("127.0.0.1", DataConfig::default(), &eps).await;
        let mut clients = Vec::new();
        for i in 0..30u8 {
            let mut c = p.connect().await;
            // Through to the endpoint before the next connection is balanced.
            roundtrip(&mut c, &[i]).await;
            clients.push(c);
        }
        let active: Vec<u32> = eps.iter().map(|e| p.stats(*e).active.load(Ordering::Relaxed)).collect();
        assert_eq!(active.iter().sum::<u32>(), 30);
        // Power of two choices over held connections keeps the spread within a few of even (10 each).
        assert!(active.iter().all(|&n| n >= 5), "uneven spread: {active:?}");
        assert_eq!(p.shared.conns.open(), 30);
        drop(clients);
        assert_eventually!(p.shared.conns.open() == 0, "every connection closes");
        assert!(eps.iter().all(|e| p.stats(*e).active.load(Ordering::Relaxed) == 0));
    }

    #[tokio::test]
    async fn no_endpoint_resets_the_client_at_once() {
        let p = Proxy::start("127.0.0.1", DataConfig::default(), &[]).await;
        for _ in 0..2 {
            let mut c = p.connect().await;
            let t0 = Instant::now();
            let mut buf = [0u8; 16];
            let r = within("read after refusal", c.read(&mut buf)).await;
            assert_eq!(r.map_err(|e| e.kind()).unwrap_err(), io::ErrorKind::ConnectionReset);
            assert!(t0.elapsed() < Duration::from_secs(2), "reset took {:?}", t0.elapsed());
        }
        assert_eq!(p.count(|m, l| m.failed.get_or_create(l).get()), 2);
        assert_eq!(p.count(|m, l| m.opened.get_or_create(l).get()), 0);
        // The address no longer in the table (removed): the same.
        p.shared.table.store(Arc::new(Table::default()));
        let mut c = p.connect().await;
        let r = within("read after refusal", c.read(&mut [0u8; 16])).await;
        assert_eq!(r.map_err(|e| e.kind()).unwrap_err(), io::ErrorKind::ConnectionReset);
        assert_eventually!(p.shared.conns.open() == 0, "refused connections are not left open");
    }

    #[tokio::test]
    async fn a_failed_connect_is_retried_elsewhere_and_ejects_after_three() {
        let dead = closed_port("127.0.0.33").await;
        let (live, _) = echo("127.0.0.1", None).await;
        let p = Proxy::start("127.0.0.1", DataConfig::default(), &[dead, live]).await;
        let dead_stats = p.stats(dead);
        let mut n = 0;
        while !dead_stats.ejected(now_ms()) {
            n += 1;
            assert!(n <= 200, "the dead endpoint was never ejected");
            let mut c = p.connect().await;
            roundtrip(&mut c, b"ping").await;
        }
        assert_eq!(p.count(|m, l| m.connect_failures.get_or_create(l).get()), 3);
        assert_eq!(p.count(|m, l| m.ejections.get_or_create(l).get()), 1);
        // Ejected: no more attempts on it.
        for _ in 0..10 {
            let mut c = p.connect().await;
            roundtrip(&mut c, b"ping").await;
        }
        assert_eq!(p.count(|m, l| m.connect_failures.get_or_create(l).get()), 3);
        assert_eq!(p.count(|m, l| m.failed.get_or_create(l).get()), 0);
        assert_eq!(p.count(|m, l| m.opened.get_or_create(l).get()), n + 10);
    }

    #[tokio::test]
    async fn every_connect_failing_resets_the_client() {
        let dead = [closed_port("127.0.0.34").await, closed_port("127.0.0.35").await];
        let p = Proxy::start("127.0.0.1", DataConfig::default(), &dead).await;
        let mut c = p.connect().await;
        let r = within("read after refusal", c.read(&mut [0u8; 16])).await;
        assert_eq!(r.map_err(|e| e.kind()).unwrap_err(), io::ErrorKind::ConnectionReset);
        assert_eventually!(p.count(|m, l| m.failed.get_or_create(l).get()) == 1, "the refusal is counted");
        // Two endpoints: two attempts, not `connect_attempts` (3).
        assert_eq!(p.count(|m, l| m.connect_failures.get_or_create(l).get()), 2);
    }

    #[tokio::test]
    async fn a_connect_timeout_moves_on_to_the_next_endpoint() {
        // A listener whose accept queue is full drops SYNs: connects to it hang.
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let full = sock.listen(1).unwrap();
        let full_addr = full.local_addr().unwrap();
        let mut fillers = Vec::new();
        loop {
            assert!(fillers.len() < 64, "the accept queue never filled");
            match timeout(Duration::from_millis(300), TcpStream::connect(full_addr)).await {
                Ok(Ok(s)) => fillers.push(s),
                Ok(Err(e)) => panic!("connect: {e}"),
                Err(_) => break,
            }
        }
        let (live, _) = echo("127.0.0.3", None).await;
        let cfg = DataConfig {
            algorithm: Algorithm::RoundRobin,
            connect_timeout: Duration::from_millis(200),
            ..DataConfig::default()
        };
        // Sorted by address, round-robin tries the hanging endpoint first.
        let p = Proxy::start("127.0.0.1", cfg, &[full_addr, live]).await;
        let t0 = Instant::now();
        let mut c = p.connect().await;
        roundtrip(&mut c, b"late but fine").await;
        assert!(t0.elapsed() >= Duration::from_millis(200), "no timeout was waited for");
        assert_eq!(p.count(|m, l| m.connect_failures.get_or_create(l).get()), 1);
        assert_eq!(p.count(|m, l| m.failed.get_or_create(l).get()), 0);
        drop(full);
    }

    #[tokio::test]
    async fn half_close_lets_the_reply_through() {
        // Reads the request to EOF, then answers with its length and closes.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ep = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = Vec::new();
            s.read_to_end(&mut req).await.unwrap();
            let reply = format!("got {} bytes", req.len()).repeat(1000);
            s.write_all(reply.as_bytes()).await.unwrap();
            s.shutdown().await.unwrap();
        });
        let p = Proxy::start("127.0.0.1", DataConfig::default(), &[ep]).await;
        let mut c = p.connect().await;
        within("write", c.write_all(&[7u8; 100_000])).await.unwrap();
        within("shutdown", c.shutdown()).await.unwrap();
        let mut reply = Vec::new();
        within("read the reply", c.read_to_end(&mut reply)).await.unwrap();
        assert_eq!(reply, "got 100000 bytes".repeat(1000).as_bytes());
        drop(c);
        assert_eventually!(p.shared.conns.open() == 0, "the connection closes");
        assert_eq!(p.count(|m, l| m.bytes_sent.get_or_create(l).get()), 100_000);
        assert_eq!(p.count(|m, l| m.bytes_received.get_or_create(l).get()), 16_000);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_transfer_is_byte_exact_both_ways() {
        const LEN: usize = 64 << 20;
        let (ep, _) = echo("127.0.0.1", None).await;
        let p = Proxy::start("127.0.0.1", DataConfig::default(), &[ep]).await;
        let data = Arc::new(random(LEN, 1));
        let c = p.connect().await;
        let t0 = Instant::now();
        let got = within("64 MiB echoed", send_and_read(c, data.clone())).await;
        let took = t0.elapsed();
        assert!(got == *data, "echo differs (got {} bytes)", got.len());
        assert_eventually!(p.shared.conns.open() == 0, "the connection closes");
        assert_eq!(p.count(|m, l| m.bytes_sent.get_or_create(l).get()), LEN as u64);
        assert_eq!(p.count(|m, l| m.bytes_received.get_or_create(l).get()), LEN as u64);
        #[cfg(target_os = "linux")]
        {
            let copy = &p.shared.metrics.copy;
            assert_eq!(copy.splice_fallbacks.get(), 0, "splice was not used");
            assert_eq!(copy.spliced.get(), 2, "both directions of a bulk transfer turn to splice");
        }
        println!("64 MiB each way through the proxy in {took:?}");
    }

    #[tokio::test]
    async fn an_open_connection_survives_reconfiguration() {
        let (a, _) = echo("127.0.0.1", Some(b'A')).await;
        let (b, _) = echo("127.0.0.1", Some(b'B')).await;
        let p = Proxy::start("127.0.0.1", DataConfig::default(), &[a]).await;
        let mut old = p.connect().await;
        let mut name = [0u8];
        within("greeting", old.read_exact(&mut name)).await.unwrap();
        assert_eq!(&name, b"A");
        roundtrip(&mut old, b"before").await;

        p.shared.table.store(Arc::new(web(p.key, &[b], None)));
        for _ in 0..5 {
            let mut new = p.connect().await;
            within("greeting", new.read_exact(&mut name)).await.unwrap();
            assert_eq!(&name, b"B", "a new connection went to the removed endpoint");
            roundtrip(&mut new, b"new").await;
        }
        roundtrip(&mut old, b"after").await;
        assert_eq!(p.shared.conns.open(), 1);
    }

    #[tokio::test]
    async fn stop_refuses_new_connections_and_drain_waits_for_open_ones() {
        let (ep, _) = echo("127.0.0.1", None).await;
        // Its own address: nothing else can take over the port once it is released.
        let p = Proxy::start("127.0.0.44", DataConfig::default(), &[ep]).await;
        let mut open = p.connect().await;
        roundtrip(&mut open, b"before").await;
        let mut second = p.connect().await;
        roundtrip(&mut second, b"before").await;
        assert_eq!(p.shared.conns.open(), 2);

        p.task.abort();
        assert!(within("the accept loop ends", p.task).await.unwrap_err().is_cancelled());
        let refused = within("connect after stop", TcpStream::connect(p.addr)).await;
        assert_eq!(refused.map_err(|e| e.kind()).unwrap_err(), io::ErrorKind::ConnectionRefused);

        roundtrip(&mut open, b"still works").await;
        roundtrip(&mut second, b"this one too").await;
        assert_eq!(p.shared.conns.open(), 2);
        assert_eq!(p.shared.conns.wait_idle(Duration::from_millis(20)).await, 2, "drain waits for both");
        drop(second);
        assert_eventually!(p.shared.conns.open() == 1, "one closes");
        roundtrip(&mut open, b"last").await;
        let idle = tokio::spawn({
            let conns = p.shared.conns.clone();
            async move { conns.wait_idle(SOON).await }
        });
        drop(open);
        assert_eq!(within("drain", idle).await.unwrap(), 0);
    }
}

//! UDP Service addresses: per-client flows, the way kube-proxy's conntrack entries give them.
//!
//! A UDP "connection" is a flow keyed by the client's address. Its first datagram picks an endpoint (with the
//! same rules as a TCP connection, session affinity included) and opens an upstream socket `connect`ed to it;
//! later datagrams of that client follow the flow, and every reply goes back to the client *from the Service
//! socket*, so the client sees the address it talked to (as conntrack's reverse NAT does).
//!
//! Differences from kube-proxy, and why:
//! - A Service without a usable endpoint drops the datagram (counted in `failed`). kube-proxy answers with an
//!   ICMP port-unreachable from a REJECT rule; forging one from the Service address needs a raw socket
//!   (`CAP_NET_RAW`), which a user-space proxy should not hold. Clients time out instead of failing at once.
//! - A flow expires after `udp_idle` without traffic either way, checked by a sweep every quarter of that:
//!   removal happens between `udp_idle` and `1.25 × udp_idle` after the last datagram. conntrack's timers are
//!   coarse too; exactness is not worth a clock read per datagram.
//! - When a flow's endpoint leaves the candidates (deleted, no longer ready, Local policy), the next datagram
//!   moves the flow to a newly chosen endpoint. kube-proxy gets this by flushing stale UDP conntrack entries;
//!   without it, DNS clients reusing a source port would talk to a dead Pod until they idle out.
//! - Stop ends every flow at once: UDP has no connection to finish, so there is nothing to drain.
//!
//! Cost per datagram on an existing flow: one `recv_from`, one `HashMap` lookup (the flows belong to this task,
//! no lock), one table `load()` (a few atomic operations, no `Arc` clone) with a pointer comparison, and one
//! non-blocking `send`. Endpoints are re-checked only when this Service's listener or cluster changed.
//! Each flow costs one socket (one file descriptor) and one task; no per-flow buffer is kept: replies are
//! read into a per-thread scratch buffer.

use std::cell::RefCell;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use mesh_runtime::Shutdown;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::UdpSocket;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::MissedTickBehavior;
use tracing::{debug, warn};

use crate::balance::{self, InFlight};
use crate::state::{ProxyMetrics, Shared};
use crate::table::{Cluster, EndpointStats, ListenKey, ServiceListener, Table};

/// Receive buffer size: larger than any UDP payload (65,507 bytes over IPv4, 65,527 over IPv6), so no datagram
/// is ever truncated (Linux truncates silently when the buffer is short).
pub const MAX_DATAGRAM: usize = 65_536;

/// The shortest sweep period, so a tiny `udp_idle` does not turn the sweep into a busy loop.
const MIN_SWEEP: Duration = Duration::from_millis(10);

/// How long to back off after the Service socket fails to receive, so a persistent error cannot spin.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Replies forwarded in a row before the reply task yields, so one flooding endpoint cannot hog a worker.
const REPLY_BATCH: usize = 64;

/// Why a datagram could not start a flow (logged, and counted in `failed`).
#[derive(Debug, thiserror::Error)]
pub enum UdpError {
    /// The table has no listener for this address.
    #[error("no Service listener for udp {addr} in the table; is its Listener loaded, or was the Service deleted?")]
    NoListener {
        /// The Service address.
        addr: SocketAddr,
    },
    /// The listener names a cluster the table does not have.
    #[error("{service}: cluster {cluster} is not in the table; has its Cluster resource arrived?")]
    NoCluster {
        /// `namespace/name`.
        service: String,
        /// The missing cluster.
        cluster: String,
    },
    /// Nothing to send to.
    #[error("{service}: no usable endpoint (none ready or serving, or none on this node for policy Local)")]
    NoEndpoint {
        /// `namespace/name`.
        service: String,
    },
    /// The upstream socket could not be opened.
    #[error("cannot open a UDP socket to {endpoint}: {source}; check the open-file limit (one socket per flow)")]
    Upstream {
        /// The endpoint.
        endpoint: SocketAddr,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
}

/// Serves one UDP Service address until `stop` triggers. `socket` is bound to the Service address by the
/// caller; `key` names it in the table. On return every flow has ended and every upstream socket is closed.
pub async fn serve(socket: UdpSocket, key: ListenKey, shared: Arc<Shared>, stop: Shutdown) {
    let socket = Arc::new(socket);
    let mut server = Server::new(socket.clone(), key, shared);
    let mut buf = vec![0u8; MAX_DATAGRAM].into_boxed_slice();
    let mut sweep = tokio::time::interval((server.ctx.shared.cfg.udp_idle / 4).max(MIN_SWEEP));
    sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let stopped = stop.wait();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            // Stop first, then the sweep (ready once a period, so it cannot starve reads, and reads cannot
            // starve it), then datagrams.
            biased;
            _ = &mut stopped => break,
            _ = sweep.tick(), if server.busy() => server.sweep(Instant::now()),
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, client)) => server.datagram(&buf[..n], client),
                Err(e) => {
                    warn!(addr = %key.addr, error = %e, "UDP receive failed");
                    tokio::select! {
                        _ = &mut stopped => break,
                        _ = tokio::time::sleep(ERROR_BACKOFF) => {}
                    }
                }
            },
        }
    }
    server.close().await;
}

/// What every flow of one Service address needs.
#[derive(Debug)]
struct Ctx {
    key: ListenKey,
    shared: Arc<Shared>,
    /// The Service socket: replies are sent from it.
    socket: Arc<UdpSocket>,
}

/// The serve task's state. Owned by that task alone: no locks on the datagram path.
#[derive(Debug)]
struct Server {
    ctx: Ctx,
    flows: HashMap<SocketAddr, Flow>,
    /// The reply tasks, so stop can wait for them to end.
    tasks: JoinSet<()>,
    view: View,
}

/// The metric handles of one Service, resolved once rather than per datagram.
#[derive(Debug, Clone)]
struct Counters {
    service: String,
    opened: Counter,
    active: Gauge,
    failed: Counter,
    sent: Counter,
    received: Counter,
}

impl Counters {
    fn new(m: &ProxyMetrics, service: &str) -> Self {
        let l = ProxyMetrics::labels(service, true);
        Counters {
            service: service.to_owned(),
            opened: m.opened.get_or_create(&l).clone(),
            active: m.active.get_or_create(&l).clone(),
            failed: m.failed.get_or_create(&l).clone(),
            sent: m.bytes_sent.get_or_create(&l).clone(),
            received: m.bytes_received.get_or_create(&l).clone(),
        }
    }
}

/// What the serve task knows of its Service, refreshed only when the table changes.
///
/// Identity is compared by pointer through `Weak`s: a `Weak` keeps the old allocation from being reused (so
/// a new table at the same address cannot pass for the old one) without keeping the old table's contents.
#[derive(Debug)]
struct View {
    table: Weak<Table>,
    listener: Option<Weak<ServiceListener>>,
    cluster: Option<Weak<Cluster>>,
    /// The zone the candidates were chosen for (it follows the Node's label).
    zone: Option<String>,
    /// Bumped whenever the listener, cluster or zone changed: flows checked at an older epoch are re-checked.
    epoch: u64,
    /// The endpoints a flow may stay on, sorted by address.
    candidates: Vec<(SocketAddr, Arc<EndpointStats>)>,
    counters: Counters,
}

fn same<T>(seen: &Option<Weak<T>>, now: Option<&Arc<T>>) -> bool {
    match (seen, now) {
        (Some(w), Some(a)) => ptr::eq(w.as_ptr(), Arc::as_ptr(a)),
        (None, None) => true,
        _ => false,
    }
}

impl View {
    fn new(shared: &Shared, key: &ListenKey) -> Self {
        // Labels come from the listener; before it is known (the caller normally binds only addresses the table
        // has), failures are counted under an empty service name.
        let service = shared.table.load().by_key.get(key).map(|l| l.service.clone()).unwrap_or_default();
        View {
            table: Weak::new(),
            listener: None,
            cluster: None,
            zone: None,
            epoch: 0,
            candidates: Vec::new(),
            counters: Counters::new(&shared.metrics, &service),
        }
    }

    /// Brings the view up to date with `table`: a pointer comparison when nothing changed.
    fn refresh(&mut self, table: &Arc<Table>, key: &ListenKey, shared: &Shared) {
        if ptr::eq(self.table.as_ptr(), Arc::as_ptr(table)) {
            return;
        }
        self.table = Arc::downgrade(table);
        let listener = table.by_key.get(key);
        let cluster = listener.and_then(|l| table.clusters.get(&l.cluster));
        let zone = shared.here.at(table).zone;
        if same(&self.listener, listener) && same(&self.cluster, cluster) && self.zone.as_deref() == zone {
            // Another Service changed: untouched Services keep their Arcs, so nothing to re-check here.
            return;
        }
        self.zone = zone.map(str::to_owned);
        self.listener = listener.map(Arc::downgrade);
        self.cluster = cluster.map(Arc::downgrade);
        self.epoch += 1;
        self.candidates = match (listener, cluster) {
            (Some(l), Some(c)) => {
                let mut v: Vec<_> = balance::candidates(c, l.local_only, shared.here.at(table))
                    .into_iter()
                    .map(|e| (e.addr, e.stats.clone()))
                    .collect();
                v.sort_by_key(|(a, _)| *a);
                v
            }
            _ => Vec::new(),
        };
        if let Some(l) = listener
            && l.service != self.counters.service
        {
            self.counters = Counters::new(&shared.metrics, &l.service);
        }
    }

    /// Whether `flow` may stay on its endpoint. Re-checks against the candidates only when they changed since
    /// the flow was last checked. An endpoint that left and came back has new stats: the flow is counted there.
    fn keeps(&self, flow: &mut Flow) -> bool {
        if flow.task.is_finished() {
            // Its reply task died (an unexpected socket error): replies would be lost, so open a new flow.
            return false;
        }
        if flow.epoch == self.epoch {
            return true;
        }
        let Ok(i) = self.candidates.binary_search_by_key(&flow.endpoint, |(a, _)| *a) else { return false };
        let stats = &self.candidates[i].1;
        if !Arc::ptr_eq(stats, &flow.stats) {
            flow._active = InFlight::new(stats);
            flow.stats = stats.clone();
        }
        flow.epoch = self.epoch;
        true
    }
}

/// One client's flow.
#[derive(Debug)]
struct Flow {
    endpoint: SocketAddr,
    /// Connected to `endpoint`; shared with the reply task.
    upstream: Arc<UdpSocket>,
    stats: Arc<EndpointStats>,
    /// Counts the flow on its endpoint, for least-connections.
    _active: InFlight,
    /// The view epoch it was last checked at.
    epoch: u64,
    /// Set by traffic either way, cleared by the sweep.
    touched: Arc<AtomicBool>,
    /// When the sweep last saw traffic (or the flow opened).
    quiet_since: Instant,
    task: AbortHandle,
    /// The Service's `active` gauge, decremented when the flow ends.
    gauge: Gauge,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.task.abort();
        self.gauge.dec();
    }
}

impl Flow {
    /// Forwards a client datagram. Never waits: when the socket buffer is full the datagram is dropped, as the
    /// network would, rather than stalling every other client of the Service.
    ///
    /// Sends with a plain non-blocking `send(2)` rather than Tokio's `try_send`: Tokio reports `WouldBlock` until
    /// its reactor has seen the new socket become writable, which would drop the first datagrams of every flow.
    /// Nothing ever awaits this socket's writability, so bypassing Tokio's readiness tracking is harmless.
    fn send(&self, data: &[u8], sent: &Counter) {
        self.touched.store(true, Ordering::Relaxed);
        let mut retried = false;
        loop {
            match rustix::net::send(&*self.upstream, data, rustix::net::SendFlags::empty()) {
                Ok(n) => {
                    sent.inc_by(n as u64);
                    return;
                }
                // An ICMP error from an earlier datagram, reported (and cleared) now; this one was not sent.
                Err(rustix::io::Errno::CONNREFUSED) if !retried => retried = true,
                Err(e) => {
                    debug!(endpoint = %self.endpoint, error = %e, "UDP datagram to endpoint dropped");
                    return;
                }
            }
        }
    }
}

/// An unbound-port socket of the endpoint's family, connected to it (so only its replies arrive on it).
fn upstream_socket(endpoint: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr =
        if endpoint.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let s = std::net::UdpSocket::bind(any)?;
    s.connect(endpoint)?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s)
}

impl Server {
    fn new(socket: Arc<UdpSocket>, key: ListenKey, shared: Arc<Shared>) -> Self {
        let view = View::new(&shared, &key);
        Server { ctx: Ctx { key, shared, socket }, flows: HashMap::new(), tasks: JoinSet::new(), view }
    }

    fn busy(&self) -> bool {
        !self.flows.is_empty() || !self.tasks.is_empty()
    }

    /// One datagram from `client`: follow its flow, or open one.
    fn datagram(&mut self, data: &[u8], client: SocketAddr) {
        let table = self.ctx.shared.table.load();
        self.view.refresh(&table, &self.ctx.key, &self.ctx.shared);
        let view = &self.view;
        let flow = match self.flows.entry(client) {
            Entry::Occupied(mut o) => {
                if view.keeps(o.get_mut()) {
                    o.into_mut()
                } else {
                    let from = o.get().endpoint;
                    match self.ctx.open(&table, &mut self.tasks, client, view) {
                        Ok(f) => {
                            debug!(service = %view.counters.service, %client, %from, to = %f.endpoint,
                                "endpoint gone: UDP flow moves");
                            // The old flow drops here: its task ends and its socket closes.
                            o.insert(f);
                            o.into_mut()
                        }
                        Err(e) => {
                            o.remove();
                            view.counters.failed.inc();
                            debug!(%client, error = %e, "UDP datagram dropped");
                            return;
                        }
                    }
                }
            }
            Entry::Vacant(v) => match self.ctx.open(&table, &mut self.tasks, client, view) {
                Ok(f) => v.insert(f),
                Err(e) => {
                    view.counters.failed.inc();
                    debug!(%client, error = %e, "UDP datagram dropped");
                    return;
                }
            },
        };
        flow.send(data, &view.counters.sent);
    }

    /// Ends flows idle for `udp_idle`, and reaps the tasks of ended flows.
    fn sweep(&mut self, now: Instant) {
        let idle = self.ctx.shared.cfg.udp_idle;
        self.flows.retain(|client, f| {
            if f.touched.swap(false, Ordering::Relaxed) {
                f.quiet_since = now;
                return true;
            }
            let keep = now.duration_since(f.quiet_since) < idle;
            if !keep {
                debug!(%client, endpoint = %f.endpoint, "UDP flow idle: closed");
            }
            keep
        });
        while self.tasks.try_join_next().is_some() {}
    }

    /// Ends every flow and waits for their tasks.
    async fn close(mut self) {
        self.flows.clear();
        self.tasks.shutdown().await;
    }
}

impl Ctx {
    /// Opens a flow for `client` on an endpoint chosen from `table`.
    fn open(&self, table: &Table, tasks: &mut JoinSet<()>, client: SocketAddr, view: &View) -> Result<Flow, UdpError> {
        let listener = table.by_key.get(&self.key).ok_or(UdpError::NoListener { addr: self.key.addr })?;
        let cluster = table.clusters.get(&listener.cluster).ok_or_else(|| UdpError::NoCluster {
            service: listener.service.clone(),
            cluster: listener.cluster.clone(),
        })?;
        let candidates = balance::candidates(cluster, listener.local_only, self.shared.here.at(table));
        let endpoint = balance::choose(cluster, &candidates, client.ip(), &[], self.shared.cfg.algorithm)
            .ok_or_else(|| UdpError::NoEndpoint { service: listener.service.clone() })?;
        let upstream = Arc::new(
            upstream_socket(endpoint.addr).map_err(|source| UdpError::Upstream { endpoint: endpoint.addr, source })?,
        );
        let touched = Arc::new(AtomicBool::new(false));
        let c = &view.counters;
        let task = tasks.spawn(relay_replies(
            upstream.clone(),
            self.socket.clone(),
            client,
            touched.clone(),
            c.received.clone(),
        ));
        c.opened.inc();
        c.active.inc();
        debug!(service = %listener.service, %client, endpoint = %endpoint.addr, "UDP flow opened");
        Ok(Flow {
            endpoint: endpoint.addr,
            upstream,
            stats: endpoint.stats.clone(),
            _active: InFlight::new(&endpoint.stats),
            epoch: view.epoch,
            touched,
            quiet_since: Instant::now(),
            task,
            gauge: c.active.clone(),
        })
    }
}

thread_local! {
    /// Where reply tasks read datagrams: one buffer per worker thread rather than 64 KiB per flow.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; MAX_DATAGRAM].into_boxed_slice());
}

/// What one read of the upstream socket led to.
enum Step {
    /// Forwarded (or dropped with a reason logged): read on.
    Next,
    /// Nothing more to read now.
    Drained,
    /// The Service socket is full: send this copy when it has room.
    Wait(Vec<u8>),
    /// The upstream socket failed for good.
    Fail(io::Error),
}

/// A flow's reply path: endpoint → client, sent from the Service socket. Runs until aborted.
async fn relay_replies(
    upstream: Arc<UdpSocket>,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    touched: Arc<AtomicBool>,
    received: Counter,
) {
    loop {
        if let Err(e) = upstream.readable().await {
            warn!(%client, error = %e, "UDP flow's upstream socket failed");
            return;
        }
        for _ in 0..REPLY_BATCH {
            let step = SCRATCH.with_borrow_mut(|buf| match upstream.try_recv(buf) {
                Ok(n) => {
                    touched.store(true, Ordering::Relaxed);
                    match socket.try_send_to(&buf[..n], client) {
                        Ok(sent) => {
                            received.inc_by(sent as u64);
                            Step::Next
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Wait(buf[..n].to_vec()),
                        Err(e) => {
                            debug!(%client, error = %e, "UDP reply not delivered");
                            Step::Next
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Drained,
                // ICMP port-unreachable for an earlier datagram: nothing listens at the endpoint (yet). Keep the
                // flow; the table decides when the endpoint is gone.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Step::Next,
                Err(e) => Step::Fail(e),
            });
            match step {
                Step::Next => {}
                Step::Drained => break,
                Step::Wait(d) => match socket.send_to(&d, client).await {
                    Ok(sent) => {
                        received.inc_by(sent as u64);
                    }
                    Err(e) => debug!(%client, error = %e, "UDP reply not delivered"),
                },
                Step::Fail(e) => {
                    warn!(%client, error = %e, "UDP flow's upstream socket failed");
                    return;
                }
            }
        }
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::sync::atomic::Ordering;

    use prometheus_client::metrics::family::Family;
    use tokio::task::JoinHandle;
    use tokio::time::timeout;

    use mesh_tests::assert_eventually;

    use super::*;
    use crate::balance::{Algorithm, Locality};
    use crate::state::{DataConfig, ServiceLabels};
    use crate::table::{AddressKind, Endpoint, Health, Protocol};

    /// Bound for things that must happen.
    const SOON: Duration = Duration::from_secs(5);
    /// How long we watch for something that must not happen.
    const A_WHILE: Duration = Duration::from_millis(200);
    const SERVICE: &str = "ns/dns";
    const CLUSTER: &str = "ns/dns/53";

    /// A UDP echo server on `ip` that prefixes each reply with `name:`.
    async fn echo(ip: &str, name: &'static str) -> SocketAddr {
        let s = UdpSocket::bind((ip.parse::<IpAddr>().unwrap(), 0)).await.unwrap();
        let addr = s.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let mut out = format!("{name}:").into_bytes();
                out.extend_from_slice(&buf[..n]);
                let _ = s.send_to(&out, from).await;
            }
        });
        addr
    }

    fn endpoint(addr: SocketAddr) -> Endpoint {
        Endpoint {
            addr,
            health: Health::Ready,
            place: crate::table::Placement::interned::<&str>("n1", "", &[]),
            stats: Arc::default(),
        }
    }

    fn table(key: ListenKey, endpoints: Vec<Endpoint>, affinity: Option<Duration>) -> Table {
        let listener = ServiceListener {
            name: format!("svc/ns/dns/53@{}", key.addr.ip()),
            keys: vec![key],
            service: SERVICE.into(),
            kind: AddressKind::ClusterIp,
            local_only: false,
            health_check_node_port: None,
            cluster: CLUSTER.into(),
        };
        crate::table::testing::one_service(listener, endpoints, affinity)
    }

    struct Proxy {
        addr: SocketAddr,
        key: ListenKey,
        shared: Arc<Shared>,
        stop: Shutdown,
        task: JoinHandle<()>,
    }

    impl Proxy {
        async fn start(endpoints: &[SocketAddr], cfg: DataConfig, affinity: Option<Duration>) -> Proxy {
            // The Service address is an IP no endpoint uses, so the reply's source proves where it came from.
            let socket = UdpSocket::bind("127.0.0.10:0").await.unwrap();
            let addr = socket.local_addr().unwrap();
            let key = ListenKey { protocol: Protocol::Udp, addr };
            let shared = Shared::new(Locality { node: "n1".into(), zone: None }, cfg, ProxyMetrics::default());
            shared.table.store(Arc::new(table(key, endpoints.iter().map(|a| endpoint(*a)).collect(), affinity)));
            let stop = Shutdown::new();
            let task = tokio::spawn(serve(socket, key, shared.clone(), stop.clone()));
            Proxy { addr, key, shared, stop, task }
        }

        fn labels() -> ServiceLabels {
            ProxyMetrics::labels(SERVICE, true)
        }

        fn active(&self) -> i64 {
            self.shared.metrics.active.get_or_create(&Self::labels()).get()
        }

        fn count(&self, f: impl Fn(&ProxyMetrics) -> &Family<ServiceLabels, Counter>) -> u64 {
            f(&self.shared.metrics).get_or_create(&Self::labels()).get()
        }

        /// Flows counted on an endpoint (its `InFlight` guards).
        fn on_endpoint(&self, addr: SocketAddr) -> u32 {
            let t = self.shared.table.load();
            let e = t.clusters[CLUSTER].endpoints.iter().find(|e| e.addr == addr).expect("endpoint in table");
            e.stats.active.load(Ordering::Relaxed)
        }

        /// Publishes a table without `gone`, carrying the other endpoints' state over (as `Table::apply` does).
        fn remove_endpoint(&self, gone: SocketAddr) {
            let old = self.shared.table.load_full();
            let kept: Vec<Endpoint> =
                old.clusters[CLUSTER].endpoints.iter().filter(|e| e.addr != gone).cloned().collect();
            self.shared.table.store(Arc::new(table(self.key, kept, None)));
        }
    }

    async fn client(ip: &str) -> UdpSocket {
        UdpSocket::bind((ip.parse::<IpAddr>().unwrap(), 0)).await.unwrap()
    }

    /// Sends `msg` to `to` and returns the reply and where it came from.
    async fn ask(c: &UdpSocket, to: SocketAddr, msg: &[u8]) -> (Vec<u8>, SocketAddr) {
        timeout(SOON, c.send_to(msg, to)).await.expect("send timed out").unwrap();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let (n, from) = timeout(SOON, c.recv_from(&mut buf)).await.expect("no reply").unwrap();
        buf.truncate(n);
        (buf, from)
    }

    /// Which echo server answered.
    fn who(reply: &[u8]) -> String {
        let i = reply.iter().position(|b| *b == b':').expect("a named reply");
        String::from_utf8_lossy(&reply[..i]).into_owned()
    }

    /// Asserts that no datagram arrives for a while.
    async fn silent(c: &UdpSocket) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        if let Ok(Ok((n, from))) = timeout(A_WHILE, c.recv_from(&mut buf)).await {
            panic!("unexpected {n}-byte datagram from {from}");
        }
    }

    fn cfg(algorithm: Algorithm) -> DataConfig {
        DataConfig { algorithm, ..DataConfig::default() }
    }

    #[tokio::test]
    async fn reply_comes_from_the_service_address() {
        let a = echo("127.0.0.1", "a").await;
        let p = Proxy::start(&[a], DataConfig::default(), None).await;
        let c = client("127.0.0.1").await;
        let (reply, from) = ask(&c, p.addr, b"hello").await;
        assert_eq!(reply, b"a:hello");
        assert_eq!(from, p.addr, "the reply must come from the Service address");
        assert_eq!(p.count(|m| &m.opened), 1);
        assert_eq!(p.active(), 1);
        assert_eq!(p.on_endpoint(a), 1);
        assert_eq!(p.count(|m| &m.bytes_sent), 5);
        assert_eventually!(p.count(|m| &m.bytes_received) == 7, "bytes_received counted");
    }

    #[tokio::test]
    async fn large_datagrams_pass_intact_both_ways() {
        let a = echo("127.0.0.1", "a").await;
        let p = Proxy::start(&[a], DataConfig::default(), None).await;
        let c = client("127.0.0.1").await;
        let msg: Vec<u8> = (0..60_000).map(|_| fastrand::u8(..)).collect();
        let (reply, from) = ask(&c, p.addr, &msg).await;
        assert_eq!(from, p.addr);
        assert_eq!(reply.len(), 60_002);
        assert_eq!(&reply[..2], b"a:");
        assert!(reply[2..] == msg[..], "payload changed in transit");
        assert_eq!(p.count(|m| &m.bytes_sent), 60_000);
        assert_eventually!(p.count(|m| &m.bytes_received) == 60_002, "bytes_received counted");
    }

    #[tokio::test]
    async fn two_clients_get_two_flows_spread_by_least_connections() {
        let a = echo("127.0.0.1", "a").await;
        let b = echo("127.0.0.2", "b").await;
        let p = Proxy::start(&[a, b], cfg(Algorithm::LeastConnections), None).await;
        let (c1, c2) = (client("127.0.0.1").await, client("127.0.0.1").await);
        let first = who(&ask(&c1, p.addr, b"1").await.0);
        // The first flow holds one endpoint; least-connections over both sends the second client to the other.
        let second = who(&ask(&c2, p.addr, b"2").await.0);
        let mut got = [first, second];
        got.sort();
        assert_eq!(got, ["a", "b"]);
        assert_eq!(p.count(|m| &m.opened), 2);
        assert_eq!(p.active(), 2);
        assert_eq!((p.on_endpoint(a), p.on_endpoint(b)), (1, 1));
    }

    #[tokio::test]
    async fn a_client_keeps_its_endpoint() {
        let a = echo("127.0.0.1", "a").await;
        let b = echo("127.0.0.2", "b").await;
        // Round-robin would alternate if each datagram were balanced on its own.
        let p = Proxy::start(&[a, b], cfg(Algorithm::RoundRobin), None).await;
        let c = client("127.0.0.1").await;
        let first = who(&ask(&c, p.addr, b"0").await.0);
        for i in 1..10 {
            let (reply, from) = ask(&c, p.addr, format!("{i}").as_bytes()).await;
            assert_eq!((who(&reply), from), (first.clone(), p.addr), "datagram {i} left its flow");
        }
        assert_eq!(p.count(|m| &m.opened), 1);
        assert_eq!(p.active(), 1);
    }

    #[tokio::test]
    async fn client_ip_affinity_holds_across_flows() {
        let a = echo("127.0.0.1", "a").await;
        let b = echo("127.0.0.2", "b").await;
        let p = Proxy::start(&[a, b], cfg(Algorithm::RoundRobin), Some(Duration::from_secs(60))).await;
        let mut seen = Vec::new();
        for _ in 0..4 {
            // A new source port each time: a new flow, but the same client IP.
            let c = client("127.0.0.1").await;
            seen.push(who(&ask(&c, p.addr, b"x").await.0));
        }
        assert_eq!(p.count(|m| &m.opened), 4);
        assert!(seen.iter().all(|w| *w == seen[0]), "affinity broken: {seen:?}");
    }

    #[tokio::test]
    async fn idle_flows_expire() {
        let a = echo("127.0.0.1", "a").await;
        let cfg = DataConfig { udp_idle: Duration::from_millis(100), ..DataConfig::default() };
        let p = Proxy::start(&[a], cfg, None).await;
        let c = client("127.0.0.1").await;
        assert_eq!(ask(&c, p.addr, b"ping").await.0, b"a:ping");
        assert_eq!(p.count(|m| &m.opened), 1);
        assert_eventually!(p.active() == 0, "the idle flow to close");
        assert_eq!(p.on_endpoint(a), 0, "the flow's InFlight guard was not dropped");
        // The client comes back: a new flow.
        assert_eq!(ask(&c, p.addr, b"again").await.0, b"a:again");
        assert_eq!(p.count(|m| &m.opened), 2);
    }

    #[tokio::test]
    async fn a_removed_endpoint_moves_the_flow() {
        let a = echo("127.0.0.1", "a").await;
        let b = echo("127.0.0.2", "b").await;
        let p = Proxy::start(&[a, b], DataConfig::default(), None).await;
        let c = client("127.0.0.1").await;
        let first = who(&ask(&c, p.addr, b"1").await.0);
        let (gone, other, stays) = if first == "a" { (a, b, "b") } else { (b, a, "a") };
        p.remove_endpoint(gone);
        let (reply, from) = ask(&c, p.addr, b"2").await;
        assert_eq!((who(&reply), from), (stays.to_owned(), p.addr), "the flow did not move");
        assert_eq!(p.count(|m| &m.opened), 2);
        assert_eq!(p.active(), 1);
        assert_eq!(p.on_endpoint(other), 1);
        // And it stays there.
        assert_eq!(who(&ask(&c, p.addr, b"3").await.0), stays);
        assert_eq!(p.count(|m| &m.opened), 2);
    }

    #[tokio::test]
    async fn an_unrelated_table_change_keeps_the_flow() {
        let a = echo("127.0.0.1", "a").await;
        let b = echo("127.0.0.2", "b").await;
        let p = Proxy::start(&[a, b], DataConfig::default(), None).await;
        let c = client("127.0.0.1").await;
        let first = who(&ask(&c, p.addr, b"1").await.0);
        // A new table with the same endpoints (another Service changed, or this one's Arcs were rebuilt).
        let mut t = (**p.shared.table.load()).clone();
        t.versions.insert(xds_proto::types::ResourceType::Listener, "2".into());
        p.shared.table.store(Arc::new(t));
        assert_eq!(who(&ask(&c, p.addr, b"2").await.0), first);
        p.remove_endpoint(if first == "a" { b } else { a });
        assert_eq!(who(&ask(&c, p.addr, b"3").await.0), first, "a flow whose endpoint stays must not move");
        assert_eq!(p.count(|m| &m.opened), 1);
    }

    #[tokio::test]
    async fn no_endpoints_means_no_reply_and_a_failure() {
        let p = Proxy::start(&[], DataConfig::default(), None).await;
        let c = client("127.0.0.1").await;
        timeout(SOON, c.send_to(b"anyone?", p.addr)).await.unwrap().unwrap();
        silent(&c).await;
        assert_eventually!(p.count(|m| &m.failed) == 1, "failed counted");
        assert_eq!((p.count(|m| &m.opened), p.active()), (0, 0));
    }

    #[tokio::test]
    async fn stop_ends_serving_and_every_flow() {
        let a = echo("127.0.0.1", "a").await;
        let mut p = Proxy::start(&[a], DataConfig::default(), None).await;
        let c = client("127.0.0.1").await;
        assert_eq!(ask(&c, p.addr, b"1").await.0, b"a:1");
        assert_eq!(p.active(), 1);
        p.stop.trigger();
        timeout(SOON, &mut p.task).await.expect("serve did not return after stop").unwrap();
        assert_eq!(p.active(), 0);
        assert_eq!(p.on_endpoint(a), 0);
        timeout(SOON, c.send_to(b"2", p.addr)).await.unwrap().unwrap();
        silent(&c).await;
    }
}

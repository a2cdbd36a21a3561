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
//! - **Half-close is forwarded.** When one side finishes sending (EOF), the other side's write half is shut down
//!   and the other direction keeps flowing (request, `shutdown(WR)`, response is a common protocol shape). An
//!   error (a reset) on either side ends both, and both peers get a reset, so neither mistakes a cut stream for
//!   a complete one.
//! - **splice(2) on Linux.** Bytes move socket → pipe → socket inside the kernel, never copied through our
//!   memory. Each direction fills its pipe only when the pipe is empty, so `EAGAIN` from the filling splice
//!   always means "the socket has no data" and from the draining splice "the socket's send buffer is full":
//!   exactly what Tokio's readiness needs to be told. If splice is unavailable (`EINVAL`/`ENOSYS`, or no pipe
//!   can be made, e.g. out of file descriptors), that direction continues with a plain userspace copy, after
//!   handing on whatever was already in its pipe. A direction starts in userspace and turns to splice only when
//!   one read fills its 16 KiB buffer: a short exchange (the common request/reply) never pays for a pipe.
//! - **SIGPIPE.** A splice into a socket whose peer has gone raises `SIGPIPE` (the kernel does not pass
//!   `MSG_NOSIGNAL` for splice). Rust's runtime ignores `SIGPIPE` before `main`, so this surfaces as `EPIPE`;
//!   a binary that changes that disposition must not use this module.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::balance::{self, EJECT_AFTER_FAILURES, EJECT_FOR};
use crate::state::{CounterCache, ProxyMetrics, ServiceCounters, Shared};
use crate::table::{Cluster, Endpoint, ListenKey};

/// How long the accept loop pauses after an accept error that would recur at once (out of file descriptors or
/// memory), so it does not spin while open connections close and free them.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Buffer of one direction of the userspace copy.
const COPY_BUF: usize = 64 * 1024;

/// Buffer of a direction's first, userspace phase. A read that fills it means the sender is streaming, and the
/// direction turns to splice; a short exchange (a request, a reply) never needs a pipe.
#[cfg(target_os = "linux")]
const PROBE_BUF: usize = 16 * 1024;

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
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted
                ) =>
            {
                debug!(listen = %key.addr, error = %e, "accept: client went away");
            }
            Err(e) => {
                warn!(listen = %key.addr, error = %e, "accept failed; check the open-files limit (ulimit -n)");
                // Boxed: a timer kept inline would make every idle accept loop larger for the sake of a path
                // that hardly ever runs.
                Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)).await;
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
            Ok((upstream, ep)) => (upstream, ep.addr, c, balance::Active::new(&ep.stats)),
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
    pump(client, upstream, Mode::Splice, to_endpoint, to_client).await.map_err(|source| TcpError::Copy {
        service: c.labels.service.clone(),
        addr,
        source,
    })
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
                balance::succeeded(&ep.stats);
                return Ok((s, ep));
            }
            Ok(Err(source)) => TcpError::Connect { addr: ep.addr, source },
            Err(_) => TcpError::ConnectTimeout { addr: ep.addr, after: cfg.connect_timeout },
        };
        debug!(service, endpoint = %ep.addr, error = %err, "connect failed; trying another endpoint if any");
        tried.push(ep.addr);
        c.connect_failures.inc();
        if balance::failed(&ep.stats) {
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

/// Makes the coming close send a RST instead of a FIN.
fn reset(s: &TcpStream) {
    if let Err(e) = rustix::net::sockopt::set_socket_linger(s, Some(Duration::ZERO)) {
        debug!(error = %e, "SO_LINGER not set; the peer sees a FIN instead of a reset");
    }
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

/// How bytes are moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// splice(2) where the OS has it, else userspace.
    Splice,
    /// Always through a userspace buffer.
    Userspace,
}

/// Copies both ways between `a` and `b` until both directions reached EOF (forwarding each half-close), with
/// splice(2) on Linux and a userspace copy elsewhere or when splice is unavailable. Returns the bytes moved
/// `(a → b, b → a)`. On an error (a reset on either side) both are reset and closed.
pub async fn proxy_streams(a: TcpStream, b: TcpStream) -> io::Result<(u64, u64)> {
    counted(a, b, Mode::Splice).await
}

/// [`proxy_streams`] without splice: the fallback path, always through a userspace buffer.
pub async fn proxy_streams_userspace(a: TcpStream, b: TcpStream) -> io::Result<(u64, u64)> {
    counted(a, b, Mode::Userspace).await
}

async fn counted(a: TcpStream, b: TcpStream, mode: Mode) -> io::Result<(u64, u64)> {
    let (ab, ba) = (AtomicU64::new(0), AtomicU64::new(0));
    let (to_b, to_a) = (|n| _ = ab.fetch_add(n, Ordering::Relaxed), |n| _ = ba.fetch_add(n, Ordering::Relaxed));
    pump(a, b, mode, to_b, to_a).await?;
    Ok((ab.into_inner(), ba.into_inner()))
}

/// Times splice was unavailable and a direction fell back to the userspace copy, since the process started.
/// Stays 0 on a Linux kernel with splice; anything else means bytes are being copied through userspace.
pub fn splice_fallbacks() -> u64 {
    SPLICE_FALLBACKS.load(Ordering::Relaxed)
}

static SPLICE_FALLBACKS: AtomicU64 = AtomicU64::new(0);

/// Both directions, each reporting bytes delivered as they go (so metrics of long connections stay current).
async fn pump(
    a: TcpStream,
    b: TcpStream,
    mode: Mode,
    a_to_b: impl Fn(u64) + Sync,
    b_to_a: impl Fn(u64) + Sync,
) -> io::Result<()> {
    let r = tokio::try_join!(forward(&a, &b, mode, &a_to_b), forward(&b, &a, mode, &b_to_a));
    if r.is_err() {
        reset(&a);
        reset(&b);
    }
    r.map(|_| ())
}

/// One direction: `src` to `dst` until EOF, then shut down `dst`'s write half.
async fn forward(src: &TcpStream, dst: &TcpStream, mode: Mode, count: &(impl Fn(u64) + Sync)) -> io::Result<()> {
    // Short exchanges are cheaper copied than spliced: a pipe costs two descriptors and four syscalls to make
    // and close, and a splice pair costs more than a read/write pair for a few hundred bytes. So a direction
    // starts with a small userspace buffer and turns to splice only once a read fills it.
    #[cfg(target_os = "linux")]
    let done = mode == Mode::Splice
        && match copy_until_bulk(src, dst, count).await? {
            true => true,
            false => {
                SPLICED.fetch_add(1, Ordering::Relaxed);
                splice::forward(src, dst, count).await?
            }
        };
    #[cfg(not(target_os = "linux"))]
    let done = {
        let _ = mode;
        false
    };
    if !done {
        copy(src, dst, count).await?;
    }
    match rustix::net::shutdown(dst, rustix::net::Shutdown::Write) {
        // Not connected: the peer already reset; the other direction reports that.
        Ok(()) | Err(rustix::io::Errno::NOTCONN) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Copies `src` to `dst` through userspace until EOF (`Ok(true)`) or until one read fills the buffer
/// (`Ok(false)`: bulk data is flowing; everything read so far has been written).
#[cfg(target_os = "linux")]
async fn copy_until_bulk(src: &TcpStream, dst: &TcpStream, count: &impl Fn(u64)) -> io::Result<bool> {
    // Read into spare capacity (`try_read_buf`): nothing to zero first. Taken on first data, not up front:
    // many directions carry nothing at all.
    let mut buf: Option<ProbeBuf> = None;
    loop {
        src.readable().await?;
        let b = &mut buf.get_or_insert_with(ProbeBuf::take).0;
        b.clear();
        let n = match src.try_read_buf(b) {
            Ok(0) => return Ok(true),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        write_all(dst, &b[..n]).await?;
        count(n as u64);
        if n == b.capacity() {
            return Ok(false);
        }
    }
}

/// A first-phase buffer from a per-thread pool, given back when dropped: a 16 KiB allocation and free per
/// direction per connection cost more than the copy itself at high connection rates (they fall outside the
/// allocator's small-size caches).
#[cfg(target_os = "linux")]
struct ProbeBuf(Vec<u8>);

#[cfg(target_os = "linux")]
thread_local! {
    static PROBE_BUFS: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Buffers a thread keeps for reuse (4 MiB at most).
#[cfg(target_os = "linux")]
const PROBE_POOL: usize = 256;

#[cfg(target_os = "linux")]
impl ProbeBuf {
    fn take() -> Self {
        ProbeBuf(PROBE_BUFS.with(|p| p.borrow_mut().pop()).unwrap_or_else(|| Vec::with_capacity(PROBE_BUF)))
    }
}

#[cfg(target_os = "linux")]
impl Drop for ProbeBuf {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        if v.capacity() == PROBE_BUF {
            // `try_with`: during thread teardown the pool may be gone; the buffer is then simply freed.
            let _ = PROBE_BUFS.try_with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < PROBE_POOL {
                    p.push(v);
                }
            });
        }
    }
}

/// Directions that turned to splice since the process started (the rest stayed in the userspace phase).
pub fn spliced() -> u64 {
    SPLICED.load(Ordering::Relaxed)
}

static SPLICED: AtomicU64 = AtomicU64::new(0);

/// The userspace copy of one direction, until EOF. Works on shared references (readiness-based `try_read` /
/// `try_write`) so both directions of a connection run in one task without splitting the streams, and a
/// direction can switch here from splice midway.
async fn copy(src: &TcpStream, dst: &TcpStream, count: &impl Fn(u64)) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        src.readable().await?;
        let n = match src.try_read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        write_all(dst, &buf[..n]).await?;
        count(n as u64);
    }
}

async fn write_all(dst: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        dst.writable().await?;
        match dst.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(target_os = "linux")]
mod splice {
    use std::io;
    use std::os::fd::OwnedFd;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rustix::io::Errno;
    use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_getpipe_size, fcntl_setpipe_size, pipe_with, splice};
    use tokio::io::Interest;
    use tokio::net::TcpStream;
    use tracing::debug;

    use super::{SPLICE_FALLBACKS, write_all};

    /// Asked of one splice into the pipe; the kernel moves at most what fits in the pipe (64 KiB by default).
    const CHUNK: usize = 1 << 20;

    /// The kernel's default pipe capacity.
    const DEFAULT_PIPE: usize = 64 * 1024;
    /// The capacity a spliced direction asks for: four times the default moves a bulk stream with a quarter of
    /// the splice calls and wake-ups (one iperf3 stream here: 32 → 36-37 Gbit/s, CPU per GB 0.117 → 0.09 s).
    const PIPE_SIZE: usize = 256 * 1024;
    /// At most this much pipe capacity beyond the default, over all connections at once. Pipe pages are charged
    /// to the user (fs.pipe-user-pages-soft, 64 MiB by default, shared with every process of the same uid), and
    /// a user over it gets tiny pipes everywhere: the proxy takes at most a quarter of it for its larger pipes,
    /// and the connections beyond that (≈ 85 bulk directions at once) keep the default size.
    const GROWN_BUDGET: usize = 16 << 20;
    /// Pipe capacity granted beyond the default, now.
    static GROWN: AtomicUsize = AtomicUsize::new(0);

    /// Extra capacity given to one pipe, returned to the budget when the pipe goes.
    struct Grown(usize);

    impl Grown {
        fn grow(pipe: &OwnedFd) -> Grown {
            let extra = PIPE_SIZE - DEFAULT_PIPE;
            if GROWN.fetch_add(extra, Ordering::Relaxed) + extra > GROWN_BUDGET
                || fcntl_setpipe_size(pipe, PIPE_SIZE).is_err()
            {
                GROWN.fetch_sub(extra, Ordering::Relaxed);
                return Grown(0);
            }
            Grown(extra)
        }
    }

    impl Drop for Grown {
        fn drop(&mut self) {
            GROWN.fetch_sub(self.0, Ordering::Relaxed);
        }
    }

    /// splice(2) returns these when it cannot work on these descriptors at all (not a connection problem).
    fn unsupported(e: &io::Error) -> bool {
        e.raw_os_error().is_some_and(|c| c == Errno::INVAL.raw_os_error() || c == Errno::NOSYS.raw_os_error())
    }

    fn fell_back(why: &dyn std::fmt::Display) {
        SPLICE_FALLBACKS.fetch_add(1, Ordering::Relaxed);
        debug!(%why, "splice unavailable; copying through userspace");
    }

    /// Moves `src` to `dst` through a pipe until EOF: `Ok(true)`. `Ok(false)`: splice is unavailable and the
    /// caller must copy the rest in userspace (any bytes already in the pipe have been delivered).
    pub(super) async fn forward(src: &TcpStream, dst: &TcpStream, count: &impl Fn(u64)) -> io::Result<bool> {
        let (pipe_r, pipe_w) = match pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC) {
            Ok(p) => p,
            Err(e) => {
                fell_back(&format_args!("no pipe: {e}"));
                return Ok(false);
            }
        };
        // A user whose pipe budget is spent (fs.pipe-user-pages-soft) gets pipes of two pages, through which
        // splice is far slower than a copy: copy instead.
        if fcntl_getpipe_size(&pipe_w).is_ok_and(|n| n < DEFAULT_PIPE) {
            fell_back(&"this user's pipe budget is spent (fs.pipe-user-pages-soft): pipes are too small");
            return Ok(false);
        }
        let _grown = Grown::grow(&pipe_w);
        let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
        loop {
            // The pipe is empty here, so EAGAIN can only mean the socket has nothing to read.
            let filled = src
                .async_io(Interest::READABLE, || {
                    splice(src, None, &pipe_w, None, CHUNK, flags).map_err(io::Error::from)
                })
                .await;
            let mut left = match filled {
                Ok(0) => return Ok(true),
                Ok(n) => n,
                Err(e) if unsupported(&e) => {
                    fell_back(&e);
                    return Ok(false);
                }
                Err(e) => return Err(e),
            };
            // The pipe holds `left` bytes, so EAGAIN can only mean the socket's send buffer is full.
            while left > 0 {
                let drained = dst
                    .async_io(Interest::WRITABLE, || {
                        splice(&pipe_r, None, dst, None, left, flags).map_err(io::Error::from)
                    })
                    .await;
                match drained {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        left -= n;
                        count(n as u64);
                    }
                    Err(e) if unsupported(&e) => {
                        fell_back(&e);
                        // Hand on what is already in the pipe before the caller copies the rest.
                        let mut buf = vec![0u8; left];
                        let mut got = 0;
                        while got < left {
                            match rustix::io::read(&pipe_r, &mut buf[got..]) {
                                Ok(0) | Err(Errno::AGAIN) => break,
                                Ok(n) => got += n,
                                Err(e) => return Err(e.into()),
                            }
                        }
                        write_all(dst, &buf[..got]).await?;
                        count(got as u64);
                        return Ok(false);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Larger pipes are granted until the budget is spent, then pipes keep the default size, and every
        /// grant returns to the budget when its pipe goes. (The budget is process-wide: nextest runs each test in
        /// its own process.)
        #[test]
        fn larger_pipes_stay_within_their_budget() {
            let fits = GROWN_BUDGET / (PIPE_SIZE - DEFAULT_PIPE);
            let pipes: Vec<_> = (0..fits + 3).map(|_| pipe_with(PipeFlags::CLOEXEC).expect("a pipe")).collect();
            let grown: Vec<Grown> = pipes.iter().map(|(_, w)| Grown::grow(w)).collect();
            assert_eq!(grown.iter().filter(|g| g.0 > 0).count(), fits);
            assert!(GROWN.load(Ordering::Relaxed) <= GROWN_BUDGET);
            for ((_, w), g) in pipes.iter().zip(&grown) {
                let want = if g.0 > 0 { PIPE_SIZE } else { DEFAULT_PIPE };
                assert_eq!(fcntl_getpipe_size(w).expect("pipe size"), want);
            }
            drop(grown);
            assert_eq!(GROWN.load(Ordering::Relaxed), 0);
            let again = Grown::grow(&pipes[0].1);
            assert!(again.0 > 0, "the budget came back");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpSocket;
    use tokio::task::JoinHandle;
    use tokio::time::timeout;

    use super::*;
    use crate::balance::{Algorithm, Locality};
    use crate::state::DataConfig;
    use crate::state::ServiceLabels;
    use crate::table::{AddressKind, EndpointStats, Health, Protocol, ServiceListener, Table, now_ms};

    /// Bound for what must happen; generous so a loaded machine does not flake.
    const SOON: Duration = Duration::from_secs(20);

    async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
        timeout(SOON, f).await.unwrap_or_else(|_| panic!("{what}: not done within {SOON:?}"))
    }

    /// Polls `cond` until it holds, failing after [`SOON`].
    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + SOON;
        while !cond() {
            assert!(Instant::now() < deadline, "{what}: still false after {SOON:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn labels() -> ServiceLabels {
        ProxyMetrics::labels("ns/web", false)
    }

    fn table(key: ListenKey, eps: &[SocketAddr]) -> Table {
        let l = Arc::new(ServiceListener {
            name: format!("svc/ns/web/80@{}", key.addr.ip()),
            keys: vec![key],
            service: "ns/web".into(),
            kind: AddressKind::ClusterIp,
            local_only: false,
            health_check_node_port: None,
            cluster: "ns/web/80".into(),
        });
        let endpoints: Vec<Endpoint> = eps
            .iter()
            .map(|&addr| Endpoint {
                addr,
                health: Health::Ready,
                place: crate::table::Placement::interned::<&str>("n1", "", &[]),
                stats: Arc::default(),
            })
            .collect();
        let c = Cluster {
            name: "ns/web/80".into(),
            affinity: None,
            distribution: Default::default(),
            endpoints: endpoints.into(),
            affinity_map: Arc::default(),
            rr: Arc::default(),
        };
        let mut t = Table::default();
        t.listeners.insert(l.name.clone(), l.clone());
        t.by_key.insert(key, l);
        t.clusters.insert(c.name.clone(), Arc::new(c));
        t
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
            shared.table.store(Arc::new(table(key, eps)));
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

    /// A connected pair on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, a) = within("pair", async { tokio::join!(TcpStream::connect(addr), l.accept()) }).await;
        (c.unwrap(), a.unwrap().0)
    }

    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; len];
        fastrand::Rng::with_seed(seed).fill(&mut v);
        v
    }

    /// Sends `data` on `s` then shuts its write half, while reading everything from it; returns what was read.
    async fn send_and_read(s: TcpStream, data: Arc<Vec<u8>>) -> Vec<u8> {
        let (mut r, mut w) = s.into_split();
        let writer = tokio::spawn(async move {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
            w
        });
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        drop(writer.await.unwrap());
        got
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
        eventually("the connection closes", || p.shared.conns.open() == 0).await;
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
        eventually("every connection closes", || p.shared.conns.open() == 0).await;
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
        eventually("refused connections are not left open", || p.shared.conns.open() == 0).await;
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
        eventually("the refusal is counted", || p.count(|m, l| m.failed.get_or_create(l).get()) == 1).await;
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
        eventually("the connection closes", || p.shared.conns.open() == 0).await;
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
        eventually("the connection closes", || p.shared.conns.open() == 0).await;
        assert_eq!(p.count(|m, l| m.bytes_sent.get_or_create(l).get()), LEN as u64);
        assert_eq!(p.count(|m, l| m.bytes_received.get_or_create(l).get()), LEN as u64);
        #[cfg(target_os = "linux")]
        {
            assert_eq!(splice_fallbacks(), 0, "splice was not used");
            assert_eq!(spliced(), 2, "both directions of a bulk transfer turn to splice");
        }
        println!("64 MiB each way through the proxy in {took:?}");
    }

    /// `run` proxies between two connected pairs while each outer end sends `len` different bytes and reads
    /// everything: both must arrive intact, and `run` must report the counts.
    async fn both_ways<F, Fut>(run: F, len: usize)
    where
        F: FnOnce(TcpStream, TcpStream) -> Fut,
        Fut: Future<Output = io::Result<(u64, u64)>> + Send + 'static,
    {
        let (c1, p1) = pair().await;
        let (p2, c2) = pair().await;
        let proxy = tokio::spawn(run(p1, p2));
        let (x, y) = (Arc::new(random(len, 2)), Arc::new(random(len + 3, 3)));
        let (at_c1, at_c2) =
            within("exchange", async { tokio::join!(send_and_read(c1, x.clone()), send_and_read(c2, y.clone())) })
                .await;
        assert!(at_c2 == *x, "a → b differs ({} bytes arrived)", at_c2.len());
        assert!(at_c1 == *y, "b → a differs ({} bytes arrived)", at_c1.len());
        let counts = within("proxy ends", proxy).await.unwrap().unwrap();
        assert_eq!(counts, (len as u64, len as u64 + 3));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn proxy_streams_splices_both_ways() {
        both_ways(proxy_streams, 64 << 20).await;
        #[cfg(target_os = "linux")]
        {
            assert_eq!(splice_fallbacks(), 0, "splice was not used");
            assert_eq!(spliced(), 2, "both directions turned to splice");
        }
    }

    #[tokio::test]
    async fn a_short_exchange_needs_no_pipe() {
        // Smaller than the first-phase buffer each way: copied in userspace, byte-exact, and no pipe made.
        both_ways(proxy_streams, 1000).await;
        assert_eq!(spliced(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_userspace_fallback_copies_both_ways() {
        both_ways(proxy_streams_userspace, 16 << 20).await;
    }

    #[tokio::test]
    async fn empty_streams_just_close() {
        both_ways(proxy_streams, 0).await;
        both_ways(proxy_streams_userspace, 0).await;
    }

    #[tokio::test]
    async fn a_reset_on_one_side_resets_the_other() {
        for userspace in [false, true] {
            let (c1, p1) = pair().await;
            let (p2, mut c2) = pair().await;
            let proxy = tokio::spawn(async move {
                if userspace { proxy_streams_userspace(p1, p2).await } else { proxy_streams(p1, p2).await }
            });
            let mut c1 = c1;
            roundtrip_via(&mut c1, &mut c2, b"x").await;
            reset(&c1);
            drop(c1);
            let r = within("the other side sees the reset", async {
                loop {
                    match c2.read(&mut [0u8; 16]).await {
                        Ok(0) => break Ok(()),
                        Ok(_) => {}
                        Err(e) => break Err(e.kind()),
                    }
                }
            })
            .await;
            assert_eq!(r, Err(io::ErrorKind::ConnectionReset), "userspace: {userspace}");
            assert!(within("proxy ends", proxy).await.unwrap().is_err());
        }
    }

    async fn roundtrip_via(a: &mut TcpStream, b: &mut TcpStream, msg: &[u8]) {
        within("write", a.write_all(msg)).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        within("read", b.read_exact(&mut got)).await.unwrap();
        assert_eq!(got, msg);
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

        p.shared.table.store(Arc::new(table(p.key, &[b])));
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
        eventually("one closes", || p.shared.conns.open() == 1).await;
        roundtrip(&mut open, b"last").await;
        let idle = tokio::spawn({
            let conns = p.shared.conns.clone();
            async move { conns.wait_idle(SOON).await }
        });
        drop(open);
        assert_eq!(within("drain", idle).await.unwrap(), 0);
    }
}

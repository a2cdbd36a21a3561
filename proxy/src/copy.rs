//! The byte-copy engine: moves bytes both ways between two connected TCP sockets until both directions are
//! done. It knows nothing of Services or endpoints ([`crate::tcp`] decides where a connection goes; this moves
//! its bytes).
//!
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
//! - **What it did is counted where the caller says** ([`CopyStats`]): the proxy's metrics, or a test's own
//!   instance, so nothing a test asserts is shared with other tests of the process.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;
use tracing::debug;

/// Buffer of one direction of the userspace copy.
const COPY_BUF: usize = 64 * 1024;

/// Buffer of a direction's first, userspace phase. A read that fills it means the sender is streaming, and the
/// direction turns to splice; a short exchange (a request, a reply) never needs a pipe.
#[cfg(target_os = "linux")]
const PROBE_BUF: usize = 16 * 1024;

/// Makes the coming close send a RST instead of a FIN.
pub(crate) fn reset(s: &TcpStream) {
    if let Err(e) = rustix::net::sockopt::set_socket_linger(s, Some(Duration::ZERO)) {
        debug!(error = %e, "SO_LINGER not set; the peer sees a FIN instead of a reset");
    }
}

/// What the engine did with the directions it moved, counted where its caller says: the proxy's metrics
/// (`mesh_proxy_splice_*`), or a test's own instance. Nothing here is process-global but the pipe budget.
#[derive(Debug, Clone, Default)]
pub struct CopyStats {
    /// Directions that turned to splice (the rest stayed in the userspace phase: short exchanges).
    pub spliced: Counter,
    /// Times splice was unavailable and a direction fell back to the userspace copy. Stays 0 on a Linux kernel
    /// with splice; anything else means bytes are being copied through userspace.
    pub splice_fallbacks: Counter,
}

/// How bytes are moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// splice(2) where the OS has it, else userspace.
    Splice,
    /// Always through a userspace buffer.
    Userspace,
}

/// Copies both ways between `a` and `b` until both directions reached EOF (forwarding each half-close), with
/// splice(2) on Linux and a userspace copy elsewhere or when splice is unavailable. Returns the bytes moved
/// `(a → b, b → a)`, and counts what it did in `stats`. On an error (a reset on either side) both are reset and
/// closed.
pub async fn proxy_streams(a: TcpStream, b: TcpStream, stats: &CopyStats) -> io::Result<(u64, u64)> {
    counted(a, b, Mode::Splice, stats).await
}

/// [`proxy_streams`] without splice: the fallback path, always through a userspace buffer.
pub async fn proxy_streams_userspace(a: TcpStream, b: TcpStream) -> io::Result<(u64, u64)> {
    counted(a, b, Mode::Userspace, &CopyStats::default()).await
}

async fn counted(a: TcpStream, b: TcpStream, mode: Mode, stats: &CopyStats) -> io::Result<(u64, u64)> {
    let (ab, ba) = (AtomicU64::new(0), AtomicU64::new(0));
    let (to_b, to_a) = (|n| _ = ab.fetch_add(n, Ordering::Relaxed), |n| _ = ba.fetch_add(n, Ordering::Relaxed));
    pump(a, b, mode, stats, to_b, to_a).await?;
    Ok((ab.into_inner(), ba.into_inner()))
}

/// Both directions, each reporting bytes delivered as they go (so metrics of long connections stay current).
pub(crate) async fn pump(
    a: TcpStream,
    b: TcpStream,
    mode: Mode,
    stats: &CopyStats,
    a_to_b: impl Fn(u64) + Sync,
    b_to_a: impl Fn(u64) + Sync,
) -> io::Result<()> {
    let r = tokio::try_join!(forward(&a, &b, mode, stats, &a_to_b), forward(&b, &a, mode, stats, &b_to_a));
    if r.is_err() {
        reset(&a);
        reset(&b);
    }
    r.map(|_| ())
}

/// One direction: `src` to `dst` until EOF, then shut down `dst`'s write half.
async fn forward(
    src: &TcpStream,
    dst: &TcpStream,
    mode: Mode,
    stats: &CopyStats,
    count: &(impl Fn(u64) + Sync),
) -> io::Result<()> {
    // Short exchanges are cheaper copied than spliced: a pipe costs two descriptors and four syscalls to make
    // and close, and a splice pair costs more than a read/write pair for a few hundred bytes. So a direction
    // starts with a small userspace buffer and turns to splice only once a read fills it.
    #[cfg(target_os = "linux")]
    let done = mode == Mode::Splice
        && match copy_until_bulk(src, dst, count).await? {
            true => true,
            false => {
                stats.spliced.inc();
                splice::forward(src, dst, &stats.splice_fallbacks, count).await?
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

    use prometheus_client::metrics::counter::Counter;

    use super::write_all;

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
    /// The process's budget: the one thing here that is process-wide, as the kernel's limit is per user.
    static BUDGET: PipeBudget = PipeBudget::new(GROWN_BUDGET);

    /// Pipe capacity that may be granted beyond the default, over all pipes drawing on it.
    struct PipeBudget {
        /// Granted now.
        grown: AtomicUsize,
        /// At most this much.
        limit: usize,
    }

    impl PipeBudget {
        const fn new(limit: usize) -> Self {
            PipeBudget { grown: AtomicUsize::new(0), limit }
        }
    }

    /// Extra capacity given to one pipe, returned to its budget when the pipe goes.
    struct Grown<'a>(&'a PipeBudget, usize);

    impl Grown<'_> {
        fn grow<'a>(budget: &'a PipeBudget, pipe: &OwnedFd) -> Grown<'a> {
            let extra = PIPE_SIZE - DEFAULT_PIPE;
            if budget.grown.fetch_add(extra, Ordering::Relaxed) + extra > budget.limit
                || fcntl_setpipe_size(pipe, PIPE_SIZE).is_err()
            {
                budget.grown.fetch_sub(extra, Ordering::Relaxed);
                return Grown(budget, 0);
            }
            Grown(budget, extra)
        }
    }

    impl Drop for Grown<'_> {
        fn drop(&mut self) {
            self.0.grown.fetch_sub(self.1, Ordering::Relaxed);
        }
    }

    /// splice(2) returns these when it cannot work on these descriptors at all (not a connection problem).
    fn unsupported(e: &io::Error) -> bool {
        e.raw_os_error().is_some_and(|c| c == Errno::INVAL.raw_os_error() || c == Errno::NOSYS.raw_os_error())
    }

    fn fell_back(fallbacks: &Counter, why: &dyn std::fmt::Display) {
        fallbacks.inc();
        debug!(%why, "splice unavailable; copying through userspace");
    }

    /// Moves `src` to `dst` through a pipe until EOF: `Ok(true)`. `Ok(false)`: splice is unavailable and the
    /// caller must copy the rest in userspace (any bytes already in the pipe have been delivered).
    pub(super) async fn forward(
        src: &TcpStream,
        dst: &TcpStream,
        fallbacks: &Counter,
        count: &impl Fn(u64),
    ) -> io::Result<bool> {
        let (pipe_r, pipe_w) = match pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC) {
            Ok(p) => p,
            Err(e) => {
                fell_back(fallbacks, &format_args!("no pipe: {e}"));
                return Ok(false);
            }
        };
        // A user whose pipe budget is spent (fs.pipe-user-pages-soft) gets pipes of two pages, through which
        // splice is far slower than a copy: copy instead.
        if fcntl_getpipe_size(&pipe_w).is_ok_and(|n| n < DEFAULT_PIPE) {
            fell_back(fallbacks, &"this user's pipe budget is spent (fs.pipe-user-pages-soft): pipes are too small");
            return Ok(false);
        }
        let _grown = Grown::grow(&BUDGET, &pipe_w);
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
                    fell_back(fallbacks, &e);
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
                        fell_back(fallbacks, &e);
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
        /// grant returns to the budget when its pipe goes. (On a budget of its own: the process's is shared by
        /// every test that splices.)
        #[test]
        fn larger_pipes_stay_within_their_budget() {
            let budget = PipeBudget::new(GROWN_BUDGET);
            let fits = GROWN_BUDGET / (PIPE_SIZE - DEFAULT_PIPE);
            let pipes: Vec<_> = (0..fits + 3).map(|_| pipe_with(PipeFlags::CLOEXEC).expect("a pipe")).collect();
            let grown: Vec<Grown> = pipes.iter().map(|(_, w)| Grown::grow(&budget, w)).collect();
            assert_eq!(grown.iter().filter(|g| g.1 > 0).count(), fits);
            assert!(budget.grown.load(Ordering::Relaxed) <= GROWN_BUDGET);
            for ((_, w), g) in pipes.iter().zip(&grown) {
                let want = if g.1 > 0 { PIPE_SIZE } else { DEFAULT_PIPE };
                assert_eq!(fcntl_getpipe_size(w).expect("pipe size"), want);
            }
            drop(grown);
            assert_eq!(budget.grown.load(Ordering::Relaxed), 0);
            let again = Grown::grow(&budget, &pipes[0].1);
            assert!(again.1 > 0, "the budget came back");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::future::Future;
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::time::timeout;

    use super::*;

    /// Bound for what must happen; generous so a loaded machine does not flake.
    pub(crate) const SOON: Duration = Duration::from_secs(20);

    pub(crate) async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
        timeout(SOON, f).await.unwrap_or_else(|_| panic!("{what}: not done within {SOON:?}"))
    }

    /// A connected pair on loopback.
    pub(crate) async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, a) = within("pair", async { tokio::join!(TcpStream::connect(addr), l.accept()) }).await;
        (c.unwrap(), a.unwrap().0)
    }

    pub(crate) fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; len];
        fastrand::Rng::with_seed(seed).fill(&mut v);
        v
    }

    /// Sends `data` on `s` then shuts its write half, while reading everything from it; returns what was read.
    pub(crate) async fn send_and_read(s: TcpStream, data: Arc<Vec<u8>>) -> Vec<u8> {
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

    /// [`proxy_streams`] counting into `stats`, in the shape [`both_ways`] takes.
    fn spliced_into(stats: &CopyStats) -> impl FnOnce(TcpStream, TcpStream) -> BoxedCopy {
        let stats = stats.clone();
        move |a, b| Box::pin(async move { proxy_streams(a, b, &stats).await })
    }

    type BoxedCopy = std::pin::Pin<Box<dyn Future<Output = io::Result<(u64, u64)>> + Send>>;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn proxy_streams_splices_both_ways() {
        let stats = CopyStats::default();
        both_ways(spliced_into(&stats), 64 << 20).await;
        #[cfg(target_os = "linux")]
        {
            assert_eq!(stats.splice_fallbacks.get(), 0, "splice was not used");
            assert_eq!(stats.spliced.get(), 2, "both directions turned to splice");
        }
    }

    #[tokio::test]
    async fn a_short_exchange_needs_no_pipe() {
        // Smaller than the first-phase buffer each way: copied in userspace, byte-exact, and no pipe made.
        let stats = CopyStats::default();
        both_ways(spliced_into(&stats), 1000).await;
        assert_eq!(stats.spliced.get(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_userspace_fallback_copies_both_ways() {
        both_ways(proxy_streams_userspace, 16 << 20).await;
    }

    #[tokio::test]
    async fn empty_streams_just_close() {
        both_ways(spliced_into(&CopyStats::default()), 0).await;
        both_ways(proxy_streams_userspace, 0).await;
    }

    #[tokio::test]
    async fn a_reset_on_one_side_resets_the_other() {
        for userspace in [false, true] {
            let (c1, p1) = pair().await;
            let (p2, mut c2) = pair().await;
            let proxy = tokio::spawn(async move {
                if userspace {
                    proxy_streams_userspace(p1, p2).await
                } else {
                    proxy_streams(p1, p2, &CopyStats::default()).await
                }
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
}

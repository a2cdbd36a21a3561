//! Workers, listeners and connections.
//!
//! - **Workers**: `--threads N` runs N OS threads, each a single-threaded Tokio runtime with its own listening
//!   sockets on every address (`SO_REUSEPORT`, so the kernel spreads new connections over the workers, as
//!   nginx's `reuseport` does). A connection lives and dies on the worker that accepted it, with its upstream
//!   connections (the pools are per worker), so nothing on the request path is shared across threads but the
//!   read-only table and a few counters.
//! - **Sockets are bound before anything runs** ([`bind`]): port 0 works in tests and the bound address is
//!   known to the caller.
//! - **Connections**: TLS is terminated with rustls (our SNI resolver); ALPN `h2` goes to the HTTP/2 path,
//!   anything else to the HTTP/1 path. On cleartext the first bytes decide: the HTTP/2 preface (prior knowledge,
//!   h2c) goes to HTTP/2, anything else to HTTP/1; those bytes are handed on, not peeked (no extra syscall).
//! - **Drain**: `stop_accepting` closes the listeners; `finish` tells connections to end after their request
//!   in flight (HTTP/1 `Connection: close`; idle keep-alive ones after [`crate::h1::IDLE_GRACE`]; HTTP/2
//!   GOAWAY); `stop` ends the workers (and whatever is still open) once the app's drain is over.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use mesh_runtime::Shutdown;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::h1::{self, ConnInfo};
use crate::metrics::HandshakeLabels;
use crate::proxy::Shared;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Binds `n` listening sockets on `addr` (the first decides the port when it is 0), all with `SO_REUSEPORT`
/// and `TCP_NODELAY` (inherited by accepted connections: without it a response head and a small body written
/// apart wait for the client's delayed ACK).
pub fn bind(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    let mut at = addr;
    for _ in 0..n.max(1) {
        let s = socket2::Socket::new(socket2::Domain::for_address(at), socket2::Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.set_tcp_nodelay(true)?;
        s.set_nonblocking(true)?;
        if at.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.bind(&at.into())?;
        s.listen(1024)?;
        let l: std::net::TcpListener = s.into();
        at = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

/// The signals of a drain, as the workers see them: the process's drain primitive ([`Shutdown`]) for the
/// listeners and the workers; `finish` is the `watch` the request paths ([`crate::h1`], [`crate::h2`]) take.
#[derive(Debug, Clone)]
pub struct Signals {
    /// Triggered: close the listeners.
    pub stop_accepting: Shutdown,
    /// True: connections end after their request in flight.
    pub finish: watch::Receiver<bool>,
    /// Triggered: the workers stop (open connections are dropped).
    pub stop: Shutdown,
}

/// One listening socket of a worker.
pub struct Listener {
    /// The socket.
    pub socket: std::net::TcpListener,
    /// TLS when set.
    pub tls: Option<TlsAcceptor>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener").field("socket", &self.socket).field("tls", &self.tls.is_some()).finish()
    }
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").finish_non_exhaustive()
    }
}

/// A running worker thread.
pub struct Worker {
    thread: std::thread::JoinHandle<()>,
}

impl Worker {
    /// Starts a worker serving `listeners`.
    pub fn spawn(i: usize, listeners: Vec<Listener>, shared: Arc<Shared>, signals: Signals) -> std::io::Result<Worker> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let thread = std::thread::Builder::new().name(format!("ingress-{i}")).spawn(move || {
            rt.block_on(async move {
                for l in listeners {
                    let port = l.socket.local_addr().map_or(0, |a| a.port());
                    match tokio::net::TcpListener::from_std(l.socket) {
                        Ok(sock) => {
                            tokio::spawn(accept_loop(sock, port, l.tls, shared.clone(), signals.clone()));
                        }
                        Err(e) => warn!("cannot use a listening socket: {e}"),
                    }
                }
                signals.stop.wait().await;
            });
            // Dropping the runtime ends whatever is still running on it.
            drop(rt);
        })?;
        Ok(Worker { thread })
    }

    /// Waits for the thread to end (after `stop`), up to `limit`.
    pub async fn join(self, limit: Duration) {
        let t = self.thread;
        let _ = tokio::time::timeout(limit, tokio::task::spawn_blocking(move || t.join())).await;
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    port: u16,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    signals: Signals,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let info = ConnInfo { peer, local_port: port, tls: tls.is_some() };
                    tokio::spawn(connection(stream, info, tls.clone(), shared.clone(), signals.finish.clone()));
                }
                Err(e) => {
                    warn!("accept failed: {e}");
                    // Out of file descriptors or similar: let open connections end before trying again.
                    mesh_runtime::accept::pause_after(&e).await;
                }
            },
            _ = signals.stop_accepting.wait() => break,
        }
    }
    // Connections the kernel has already completed wait in the backlog, and closing the socket would reset them:
    // take them first, so a client that connected just before the drain is served (its answer says
    // `Connection: close`) instead of reset. The socket is non-blocking: the sweep ends at the first WouldBlock.
    if let Ok(backlog) = listener.into_std() {
        while let Ok((s, peer)) = backlog.accept() {
            let Ok(stream) = s.set_nonblocking(true).and_then(|()| TcpStream::from_std(s)) else { continue };
            let info = ConnInfo { peer, local_port: port, tls: tls.is_some() };
            tokio::spawn(connection(stream, info, tls.clone(), shared.clone(), signals.finish.clone()));
        }
    }
    // Dropping the listener closes the socket: new connections are refused from here on.
}

/// Counts a connection in the gauge and the drain's tracker while it lives.
struct Open<'a> {
    shared: &'a Shared,
    _tracked: crate::proxy::Tracked,
}

impl<'a> Open<'a> {
    fn new(shared: &'a Arc<Shared>) -> Self {
        shared.metrics.connections.inc();
        Open { shared, _tracked: shared.conns.track() }
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.shared.metrics.connections.dec();
    }
}

async fn connection(
    mut stream: TcpStream,
    info: ConnInfo,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    finish: watch::Receiver<bool>,
) {
    let _open = Open::new(&shared);
    let m = &shared.metrics;
    let s = &shared.settings;
    if let Some(acceptor) = tls {
        let tls = match tokio::time::timeout(s.header_timeout, acceptor.accept(stream)).await {
            Ok(Ok(t)) => {
                m.handshakes.get_or_create(&HandshakeLabels { result: "ok" }).inc();
                t
            }
            Ok(Err(e)) => {
                m.handshakes.get_or_create(&HandshakeLabels { result: "error" }).inc();
                debug!("TLS handshake failed: {e}");
                return;
            }
            Err(_) => {
                m.handshakes.get_or_create(&HandshakeLabels { result: "error" }).inc();
                debug!("TLS handshake timed out");
                return;
            }
        };
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            crate::h2::serve(tls, info, shared.clone(), finish).await;
        } else {
            h1::serve(tls, BytesMut::new(), info, shared.clone(), finish).await;
        }
        return;
    }
    // Cleartext: the first bytes tell HTTP/2 prior knowledge from HTTP/1.
    let mut first = BytesMut::with_capacity(16 * 1024);
    let deadline = tokio::time::Instant::now() + s.header_timeout;
    loop {
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut first)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
        let n = first.len().min(H2_PREFACE.len());
        if first[..n] != H2_PREFACE[..n] || first.len() >= H2_PREFACE.len() {
            break;
        }
    }
    if first.starts_with(H2_PREFACE) {
        crate::h2::serve(Prefixed { head: first, io: stream }, info, shared.clone(), finish).await;
    } else {
        h1::serve(stream, first, info, shared.clone(), finish).await;
    }
}

/// A stream whose first bytes were already read: they are read again first.
#[derive(Debug)]
pub struct Prefixed<S> {
    head: BytesMut,
    io: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.head.is_empty() {
            let n = self.head.len().min(buf.remaining());
            buf.put_slice(&self.head[..n]);
            self.head.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

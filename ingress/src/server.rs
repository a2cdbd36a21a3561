//! Running pingora in a form an app (and a test) can start and stop: our own pingora `Service` that accepts on
//! sockets bound beforehand (so port 0 works and the bound address is known before anything runs), performs the
//! TLS handshake with our resolver, and hands each connection to pingora's HTTP proxy; and a
//! `ShutdownSignalWatch` that fires when the app drains, instead of on process signals.
//!
//! Why not pingora's own listeners: they bind inside `Server::run` (the address is not returned), and stop
//! accepting only after the shutdown signal, when pingora's grace period is a plain sleep. Here the drain is
//! ours: stop accepting, tell connections to finish (HTTP/1 closes after the response in flight, HTTP/2 sends
//! GOAWAY), wait until none is open or the deadline passes, and only then let pingora stop its runtimes (grace
//! period 0). The same per-connection task enforces the header read deadline (slowloris): a connection whose
//! request headers do not arrive in time is closed.

use std::future::pending;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::{HttpServerApp, ServerApp};
use pingora_core::listeners::tls::Acceptor;
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::l4::listener::Listener as L4Listener;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::{SslDigest, TlsRef};
use pingora_core::protocols::{
    ALPN, GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream, TimingDigest,
    UniqueID, UniqueIDType,
};
use pingora_core::server::{ListenFds, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora_proxy::HttpProxy;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter, ReadBuf};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::metrics::HandshakeLabels;
use crate::proxy::{HeadersRead, Ingress, Shared};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The pingora HTTP proxy running our logic.
pub type Proxy = HttpProxy<Ingress>;

/// Fires pingora's graceful shutdown when the app says so (after its own drain).
#[derive(Debug)]
pub struct AppSignal(pub watch::Receiver<bool>);

#[async_trait]
impl ShutdownSignalWatch for AppSignal {
    async fn recv(&self) -> ShutdownSignal {
        let mut rx = self.0.clone();
        // A dropped sender means the app is gone: shut down as well.
        let _ = rx.wait_for(|v| *v).await;
        ShutdownSignal::GracefulTerminate
    }
}

/// What the accept loops need.
pub struct Frontend {
    /// The plain-HTTP sockets (bound, listening).
    pub http: Vec<std::net::TcpListener>,
    /// The TLS socket (bound, listening).
    pub https: Option<std::net::TcpListener>,
    /// The TLS acceptor (our resolver inside).
    pub acceptor: Arc<Acceptor>,
    /// The HTTP proxy.
    pub proxy: Arc<Proxy>,
    /// Shared state (settings, metrics, connection count).
    pub shared: Arc<Shared>,
    /// Becomes true when the app stops accepting.
    pub stop_accepting: watch::Receiver<bool>,
    /// Becomes true when open connections should finish (pingora's per-connection shutdown flag).
    pub finish: ShutdownWatch,
    /// Worker threads.
    pub threads: usize,
}

impl std::fmt::Debug for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frontend").field("http", &self.http).field("https", &self.https).finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct ConnCtx {
    proxy: Arc<Proxy>,
    shared: Arc<Shared>,
    finish: ShutdownWatch,
}

#[async_trait]
impl pingora_core::services::Service for Frontend {
    async fn start_service(&mut self, _fds: Option<ListenFds>, shutdown: ShutdownWatch, _listeners_per_fd: usize) {
        let ctx = ConnCtx { proxy: self.proxy.clone(), shared: self.shared.clone(), finish: self.finish.clone() };
        let mut loops = Vec::new();
        let plain = std::mem::take(&mut self.http).into_iter().map(|l| (l, None));
        let tls = self.https.take().into_iter().map(|l| (l, Some(self.acceptor.clone())));
        for (listener, tls) in plain.chain(tls).collect::<Vec<_>>() {
            let listener =
                match listener.set_nonblocking(true).and_then(|()| tokio::net::TcpListener::from_std(listener)) {
                    Ok(l) => l,
                    Err(e) => {
                        warn!("cannot use a listening socket: {e}");
                        continue;
                    }
                };
            let (ctx, stop, shutdown) = (ctx.clone(), self.stop_accepting.clone(), shutdown.clone());
            loops.push(tokio::spawn(accept_loop(listener, tls, ctx, stop, shutdown)));
        }
        for l in loops {
            let _ = l.await;
        }
    }

    fn name(&self) -> &str {
        "mesh-ingress"
    }

    fn threads(&self) -> Option<usize> {
        Some(self.threads.max(1))
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<Acceptor>>,
    ctx: ConnCtx,
    mut stop: watch::Receiver<bool>,
    mut shutdown: ShutdownWatch,
) {
    let listener = L4Listener::from(listener);
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok(stream) => {
                    tokio::spawn(connection(stream, tls.clone(), ctx.clone()));
                }
                Err(e) => {
                    warn!("accept failed: {e}");
                    if e.raw_os_error() == Some(24) {
                        // Out of file descriptors: let open connections end before trying again.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            },
            _ = async { stop.wait_for(|v| *v).await.is_ok() } => break,
            _ = async { shutdown.wait_for(|v| *v).await.is_ok() } => break,
        }
    }
    // Dropping the listener closes the socket: new connections are refused from here on.
}

/// Resolves when `signal` has not fired within `limit`; never otherwise.
async fn deadline(signal: Arc<HeadersRead>, limit: Duration) {
    if tokio::time::timeout(limit, signal.0.notified()).await.is_ok() {
        pending::<()>().await;
    }
}

async fn connection(l4: pingora_core::protocols::l4::stream::Stream, tls: Option<Arc<Acceptor>>, ctx: ConnCtx) {
    let _tracked = ctx.shared.conns.track();
    let m = &ctx.shared.metrics;
    m.connections.inc();
    let s = &ctx.shared.settings;
    let mut stream: Stream = match tls {
        Some(acceptor) => match tokio::time::timeout(s.header_timeout, acceptor.tls_handshake(l4)).await {
            Ok(Ok(tls)) => {
                m.handshakes.get_or_create(&HandshakeLabels { result: "ok" }).inc();
                Box::new(tls)
            }
            Ok(Err(e)) => {
                m.handshakes.get_or_create(&HandshakeLabels { result: "error" }).inc();
                debug!("TLS handshake failed: {e}");
                m.connections.dec();
                return;
            }
            Err(_) => {
                m.handshakes.get_or_create(&HandshakeLabels { result: "error" }).inc();
                debug!("TLS handshake timed out");
                m.connections.dec();
                return;
            }
        },
        None => Box::new(l4),
    };
    let h2 = match stream.selected_alpn_proto() {
        Some(ALPN::H2) => true,
        _ if stream.get_ssl_digest().is_some() => false,
        _ => {
            let mut buf = [0u8; H2_PREFACE.len()];
            match tokio::time::timeout(s.header_timeout, stream.try_peek(&mut buf)).await {
                Ok(Ok(true)) => buf == H2_PREFACE,
                Ok(Ok(false)) => false,
                Ok(Err(_)) | Err(_) => {
                    m.connections.dec();
                    return;
                }
            }
        }
    };
    if h2 {
        // pingora's HTTP/2 server: SETTINGS, streams, GOAWAY when `finish` turns true.
        let _ = ServerApp::process_new(&ctx.proxy, stream, &ctx.finish).await;
        m.connections.dec();
        return;
    }
    let mut session = ServerSession::new_http1(Box::new(Buffered(BufWriter::with_capacity(WRITE_BUFFER, stream))));
    session.set_keepalive(if *ctx.finish.borrow() { None } else { Some(s.keepalive_s) });
    let mut limit = s.header_timeout;
    loop {
        let signal = Arc::new(HeadersRead::default());
        session.set_connection_user_context(Some(Box::new(signal.clone())));
        let served = tokio::select! {
            r = ctx.proxy.process_new_http(session, &ctx.finish) => r,
            () = deadline(signal, limit) => {
                debug!(?limit, "request headers not received in time; closing the connection");
                None
            }
        };
        let Some((stream, persist)) = served.map(|r| r.consume()) else { break };
        session = ServerSession::new_http1(stream);
        if let Some(p) = persist {
            p.apply_to_session(&mut session);
        }
        if *ctx.finish.borrow() {
            session.set_keepalive(None);
        }
        // An idle keep-alive connection may wait up to the keep-alive timeout, then must send its headers quickly.
        limit = Duration::from_secs(s.keepalive_s) + s.header_timeout;
    }
    m.connections.dec();
}

/// The write buffer of an HTTP/1 client connection.
const WRITE_BUFFER: usize = 4096;

/// An HTTP/1 client connection with a write buffer, as pingora's own listeners give theirs (their
/// `set_buffer` is not public, and our accept loop is our own). pingora writes a response head as soon as it has
/// it and relies on the buffer to send it with the body: unbuffered, every response costs one more `send(2)`
/// (measured: 3 per proxied request instead of 2). pingora flushes where a client must see bytes at once (1xx,
/// responses without `Content-Length`, streamed body chunks, the end of each response), so nothing waits here.
/// HTTP/2 connections are not wrapped: h2 buffers its frames itself.
#[derive(Debug)]
struct Buffered(BufWriter<Stream>);

impl AsyncRead for Buffered {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Buffered {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for Buffered {
    async fn shutdown(&mut self) {
        // What is buffered goes out first.
        let _ = AsyncWriteExt::flush(&mut self.0).await;
        Shutdown::shutdown(&mut **self.0.get_mut()).await;
    }
}

impl UniqueID for Buffered {
    fn id(&self) -> UniqueIDType {
        self.0.get_ref().id()
    }
}

impl Ssl for Buffered {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.0.get_ref().get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.0.get_ref().get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.0.get_ref().selected_alpn_proto()
    }
}

impl GetTimingDigest for Buffered {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.0.get_ref().get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.0.get_ref().get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.0.get_ref().get_write_pending_time()
    }
}

impl GetProxyDigest for Buffered {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.0.get_ref().get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.0.get_mut().set_proxy_digest(digest);
    }
}

impl GetSocketDigest for Buffered {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.0.get_ref().get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.0.get_mut().set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for Buffered {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.0.get_mut().try_peek(buf).await
    }
}

/// Makes pingora's keep-alive readers give up at once (the drain's "finish now" for idle connections).
pub async fn wake_idle(proxy: &Arc<Proxy>) {
    HttpServerApp::http_cleanup(&**proxy).await;
}

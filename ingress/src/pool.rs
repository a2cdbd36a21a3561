//! Upstream connections kept for reuse, one pool per worker thread: each worker is a single-threaded runtime,
//! so a pool is a thread-local map that no other thread touches (no lock, no atomic), and a connection is only
//! ever driven by the task that checked it out.
//!
//! - [`checkout`]/[`checkin`]: raw TCP connections for the HTTP/1 path. Last in, first out (the warmest
//!   connection, and the rest age out). At checkout a connection is dropped when it has idled past its limit,
//!   or when it has become readable (the upstream closed it, or sent bytes nobody asked for); that check reads
//!   the readiness tokio already tracks and makes a syscall only when the socket is marked readable.
//! - [`h2_sender`]: one shared hyper HTTP/2 client connection per endpoint for gRPC calls; its connection task
//!   runs on the same worker. (Web requests from HTTP/2 clients use the raw pool too: `h2::lean`.)

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// Idle connections kept per endpoint per worker (more are closed when they come back).
pub const MAX_IDLE_PER_ENDPOINT: usize = 256;

/// The request body type of the HTTP/2 path's upstream requests.
pub type UpBody = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

struct Idle {
    stream: TcpStream,
    since: Instant,
}

thread_local! {
    static IDLE: RefCell<HashMap<SocketAddr, Vec<Idle>>> = RefCell::new(HashMap::new());
    static H2: RefCell<HashMap<SocketAddr, http2::SendRequest<UpBody>>> = RefCell::new(HashMap::new());
}

/// Whether an idle connection is still usable: not readable (nothing arrived, no FIN).
fn usable(s: &TcpStream) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match s.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        // Marked readable: maybe stale readiness from the last response; ask the socket.
        Poll::Ready(Ok(())) => {
            let mut b = [0u8; 1];
            matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        }
    }
}

/// An idle connection to `addr` that is still usable, if this worker has one.
pub fn checkout(addr: SocketAddr, max_idle: Duration) -> Option<TcpStream> {
    IDLE.with(|p| {
        let mut p = p.borrow_mut();
        let list = p.get_mut(&addr)?;
        while let Some(c) = list.pop() {
            if c.since.elapsed() < max_idle && usable(&c.stream) {
                return Some(c.stream);
            }
        }
        None
    })
}

/// Keeps a connection whose last exchange ended cleanly for the next request to `addr`.
pub fn checkin(addr: SocketAddr, stream: TcpStream) {
    IDLE.with(|p| {
        let mut p = p.borrow_mut();
        let list = p.entry(addr).or_default();
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push(Idle { stream, since: Instant::now() });
        }
    });
}

/// Why an upstream connection for the HTTP/2 path could not be had.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Connecting failed or timed out.
    #[error("connect to {addr}: {reason}")]
    Connect {
        /// The endpoint.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The HTTP handshake failed.
    #[error("handshake with {addr}: {source}")]
    Handshake {
        /// The endpoint.
        addr: SocketAddr,
        /// Why.
        source: hyper::Error,
    },
}

/// Connects with a deadline, `TCP_NODELAY` set.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, PoolError> {
    let s = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(PoolError::Connect { addr, reason: e.to_string() }),
        Err(_) => return Err(PoolError::Connect { addr, reason: format!("timed out after {timeout:?}") }),
    };
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// The shared HTTP/2 (h2c) connection to `addr`, made on first use. The bool says whether it is new.
pub async fn h2_sender(addr: SocketAddr, timeout: Duration) -> Result<(http2::SendRequest<UpBody>, bool), PoolError> {
    let pooled = H2.with(|p| p.borrow().get(&addr).filter(|s| !s.is_closed()).cloned());
    if let Some(s) = pooled {
        return Ok((s, false));
    }
    let io = connect(addr, timeout).await?;
    let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(io))
        .await
        .map_err(|source| PoolError::Handshake { addr, source })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    H2.with(|p| p.borrow_mut().insert(addr, sender.clone()));
    Ok((sender, true))
}

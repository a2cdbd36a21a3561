//! A tiny HTTP/1.1 client: one request on a fresh connection, any `Host`, any address.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// How long one request may take, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What came back.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The response headers.
    pub headers: hyper::HeaderMap,
    /// The body, as text (lossy).
    pub body: String,
}

impl Reply {
    /// The echo backend that answered (`backend=NAME` in the body), if one did.
    pub fn backend(&self) -> Option<&str> {
        self.body.split_whitespace().find_map(|w| w.strip_prefix("backend="))
    }
}

/// Sends `GET path` with header `Host: host` to `addr` over a new HTTP/1.1 connection (closed afterwards, so
/// every request is routed afresh) and reads the whole answer.
pub async fn http_get(addr: SocketAddr, host: &str, path: &str) -> anyhow::Result<Reply> {
    tokio::time::timeout(REQUEST_TIMEOUT, get(addr, host, path))
        .await
        .map_err(|_| anyhow::anyhow!("GET http://{host}{path} via {addr}: no answer within {REQUEST_TIMEOUT:?}"))?
}

async fn get(addr: SocketAddr, host: &str, path: &str) -> anyhow::Result<Reply> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| anyhow::anyhow!("GET http://{host}{path} via {addr}: connect: {e}"))?;
    get_on(stream, host, path).await.map_err(|e| e.context(format!("via {addr}")))
}

/// Sends `GET path` with header `Host: host` over a connection already made (one made inside a network
/// namespace, or a TLS stream), closes it, and reads the whole answer. Bounded like [`http_get`].
pub async fn http_get_on<S>(io: S, host: &str, path: &str) -> anyhow::Result<Reply>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::time::timeout(REQUEST_TIMEOUT, get_on(io, host, path))
        .await
        .map_err(|_| anyhow::anyhow!("GET http://{host}{path}: no answer within {REQUEST_TIMEOUT:?}"))?
}

async fn get_on<S>(io: S, host: &str, path: &str) -> anyhow::Result<Reply>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ctx = || format!("GET http://{host}{path}");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| anyhow::anyhow!("{}: handshake: {e}", ctx()))?;
    let conn = tokio::spawn(conn);
    let req = Request::get(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await.map_err(|e| anyhow::anyhow!("{}: {e}", ctx()))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.map_err(|e| anyhow::anyhow!("{}: body: {e}", ctx()))?.to_bytes();
    conn.abort();
    Ok(Reply { status, headers, body: String::from_utf8_lossy(&body).into_owned() })
}

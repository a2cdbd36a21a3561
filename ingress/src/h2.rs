//! The HTTP/2 request path (TLS with ALPN `h2`, and cleartext with prior knowledge) on hyper's server, with
//! hyper client connections upstream from the worker's pool: gRPC (`content-type: application/grpc*`) over
//! HTTP/2 cleartext (streaming both ways, trailers), everything else over HTTP/1.1 (a Cluster does not say
//! whether a backend speaks h2c; HTTP/1.1 is what every web backend speaks).
//!
//! The same rules as the HTTP/1 path: routing on the normalised path (which is what goes upstream),
//! forwarding headers under the trust rule, hop-by-hop headers dropped, `Server` on every response, retries
//! on connect failures only, body size limits. On a drain the connection gets GOAWAY and its open streams
//! finish. A request is counted in the metrics when its response head is sent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::codec;
use crate::h1::ConnInfo;
use crate::pool::{self, UpBody};
use crate::proxy::{self, Done, Outcome, RequestId, Routed, SERVER, Shared};
use crate::upstream::InFlight;

mod lean;

/// The response body type.
pub type RespBody = UpBody;

/// Serves one HTTP/2 client connection until it closes; on a drain, sends GOAWAY and lets open streams finish.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: S,
    info: ConnInfo,
    shared: Arc<Shared>,
    mut finish: watch::Receiver<bool>,
) {
    let s = &shared.settings;
    let svc = {
        let shared = shared.clone();
        service_fn(move |req: Request<Incoming>| {
            let (info, shared) = (info.clone(), shared.clone());
            async move { Ok::<_, std::convert::Infallible>(handle(req, &info, &shared).await) }
        })
    };
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.max_header_list_size(u32::try_from(s.max_header_bytes).unwrap_or(u32::MAX));
    let conn = b.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    if *finish.borrow() {
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
        return;
    }
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = async { finish.wait_for(|f| *f).await.is_ok() } => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

fn full(status: u16, body: Bytes, id: Option<&RequestId>, location: Option<&str>) -> Response<RespBody> {
    let mut r = Response::new(Full::new(body).map_err(|e| match e {}).boxed_unsync());
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = r.headers_mut();
    h.insert(header::SERVER, HeaderValue::from_static(SERVER));
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    codec::date(|d| {
        if let Ok(v) = HeaderValue::from_bytes(d) {
            h.insert(header::DATE, v);
        }
    });
    if let Some(l) = location.and_then(|l| HeaderValue::from_str(l).ok()) {
        h.insert(header::LOCATION, l);
    }
    if let Some(id) = id.and_then(|i| HeaderValue::from_str(i.as_str()).ok()) {
        h.insert("x-request-id", id);
    }
    r
}

async fn handle(req: Request<Incoming>, info: &ConnInfo, shared: &Shared) -> Response<RespBody> {
    let start = Instant::now();
    let s = &shared.settings;
    let (mut parts, body) = req.into_parts();
    let method = parts.method.clone();
    let request_id = RequestId::from_client(parts.headers.get("x-request-id").map(HeaderValue::as_bytes));
    let authority = match parts.uri.authority() {
        Some(a) => a.as_str().to_owned(),
        None => parts.headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned(),
    };
    let raw_path = parts.uri.path().to_owned();
    let query = parts.uri.query().map(str::to_owned);
    let record = |routed: Option<&Routed>, status: u16, endpoint, attempts, error| {
        proxy::finish(
            shared,
            &Done {
                listener: if info.tls { "https" } else { "http" },
                client: info.peer,
                method: method.as_str(),
                authority: &authority,
                path: &raw_path,
                version: "HTTP/2",
                routed,
                status,
                endpoint,
                attempts,
                body_in: 0,
                body_out: 0,
                request_id: request_id.as_str(),
                start,
                error,
            },
        );
    };
    let refuse = |status: u16, why: &'static str| {
        record(None, status, None, 0, Some(why));
        full(status, Bytes::from(format!("{status} {why}\n")), Some(&request_id), None)
    };
    if method == http::Method::CONNECT {
        return refuse(405, "CONNECT is not served");
    }
    if !raw_path.starts_with('/') || !codec::valid_authority(&authority) {
        return refuse(400, "bad :path or :authority");
    }
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| codec::content_length(v.as_bytes()));
    if declared.is_some_and(|n| n > s.max_body_bytes) {
        return refuse(413, "request body too large");
    }
    let path = crate::path::normalize(&raw_path).into_owned();
    let routed = proxy::route(&shared.table.load(), info.tls, &authority, &path, query.as_deref());
    let cluster = match &routed.outcome {
        Outcome::Answer { status, body, location } => {
            let body = if method == http::Method::HEAD { Bytes::new() } else { body.clone() };
            record(Some(&routed), *status, None, 0, None);
            return full(*status, body, Some(&request_id), location.as_deref());
        }
        Outcome::Proxy(c) => c.clone(),
    };
    let grpc = parts.headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));

    // The upstream request: normalised path, forwarding headers, no hop-by-hop ones.
    let pq = match &query {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    let uri =
        if grpc { format!("http://{}{pq}", if authority.is_empty() { "upstream" } else { &authority }) } else { pq };
    let Ok(uri) = uri.parse::<Uri>() else {
        record(Some(&routed), 400, None, 0, Some("bad path"));
        return full(400, Bytes::from_static(b"400 bad path\n"), Some(&request_id), None);
    };
    parts.uri = uri;
    parts.version = if grpc { Version::HTTP_2 } else { Version::HTTP_11 };
    forward_headers(&mut parts.headers, info, shared, &authority, &request_id, grpc);
    let body: UpBody = if grpc {
        body.map_err(Into::into).boxed_unsync()
    } else {
        Limited::new(body, usize::try_from(s.max_body_bytes).unwrap_or(usize::MAX)).boxed_unsync()
    };
    let mut req = Some(Request::from_parts(parts, body));

    let mut tried: Vec<SocketAddr> = Vec::new();
    while let Some(ep) = cluster.pick(&tried) {
        let addr = ep.addr;
        tried.push(addr);
        let Some(r) = req.take() else { break };
        let outcome = if grpc {
            grpc_exchange(r, addr, &ep.stats, s).await
        } else {
            lean::exchange(r, addr, &authority, &ep.stats, s).await
        };
        match outcome {
            Ok(resp) => {
                let (mut rp, body) = resp.into_parts();
                response_headers(&mut rp.headers, &request_id);
                rp.version = Version::HTTP_2;
                record(Some(&routed), rp.status.as_u16(), Some(addr), tried.len(), None);
                return Response::from_parts(rp, body);
            }
            Err(Failed::Connect(e, back)) => {
                tracing::debug!(cluster = %cluster.name, "{e}");
                shared.metrics.upstream_failure(&cluster.name, "connect");
                if ep.stats.connect_failed() {
                    shared.metrics.upstream_failure(&cluster.name, "ejected");
                    tracing::warn!(cluster = %cluster.name, endpoint = %addr, "endpoint ejected after repeated connect failures");
                }
                if tried.len() >= s.connect_attempts {
                    break;
                }
                req = Some(*back);
            }
            Err(Failed::Other(status, why)) => {
                if status >= 500 {
                    shared.metrics.upstream_failure(&cluster.name, "proxy");
                }
                tracing::debug!(cluster = %cluster.name, endpoint = %addr, status, "upstream exchange failed: {why}");
                record(Some(&routed), status, Some(addr), tried.len(), Some(why));
                return full(status, Bytes::from(format!("{status} {why}\n")), Some(&request_id), None);
            }
        }
    }
    if tried.is_empty() {
        shared.metrics.upstream_failure(&cluster.name, "no_endpoint");
        record(Some(&routed), 503, None, 0, Some("no endpoint"));
        return full(
            503,
            Bytes::from_static(b"503 no endpoint is available for this backend\n"),
            Some(&request_id),
            None,
        );
    }
    record(Some(&routed), 502, tried.last().copied(), tried.len(), Some("connect failed"));
    full(502, Bytes::from_static(b"502 no endpoint accepted the connection\n"), Some(&request_id), None)
}

/// Why an upstream exchange failed.
pub(crate) enum Failed {
    /// Connecting failed: nothing was sent; the request comes back for another endpoint.
    Connect(String, Box<Request<UpBody>>),
    /// Failed after sending: answered with this status.
    Other(u16, &'static str),
}

/// A gRPC call over the worker's shared h2c connection to `addr`.
async fn grpc_exchange(
    req: Request<UpBody>,
    addr: SocketAddr,
    stats: &Arc<crate::upstream::EndpointStats>,
    s: &crate::proxy::Settings,
) -> Result<Response<RespBody>, Failed> {
    let mut tx = match pool::h2_sender(addr, s.connect_timeout).await {
        Ok((tx, new)) => {
            if new {
                stats.connected();
            }
            tx
        }
        Err(e) => return Err(Failed::Connect(e.to_string(), Box::new(req))),
    };
    let flight = InFlight::new(stats);
    match tokio::time::timeout(s.upstream_timeout, tx.send_request(req)).await {
        Ok(Ok(resp)) => {
            let (rp, rbody) = resp.into_parts();
            // The endpoint counts the call in flight until its body (and trailers) are done.
            let body = rbody
                .map_frame(move |f| {
                    let _ = &flight;
                    f
                })
                .map_err(Into::into)
                .boxed_unsync();
            Ok(Response::from_parts(rp, body))
        }
        Ok(Err(e)) if e.is_user() || source_is_limit(&e) => Err(Failed::Other(413, "request body too large")),
        Ok(Err(_)) => Err(Failed::Other(502, "the upstream failed before answering")),
        Err(_) => Err(Failed::Other(504, "the upstream did not answer in time")),
    }
}

fn source_is_limit(e: &hyper::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        src = s.source();
    }
    false
}

/// The names a `Connection` header lists (hop-by-hop by declaration).
fn connection_named(h: &HeaderMap) -> Vec<HeaderName> {
    h.get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| codec::tokens(v.as_bytes()))
        .filter_map(|t| HeaderName::from_bytes(t).ok())
        .collect()
}

fn forward_headers(h: &mut HeaderMap, info: &ConnInfo, shared: &Shared, authority: &str, id: &RequestId, grpc: bool) {
    for n in connection_named(h) {
        h.remove(n);
    }
    let te_trailers = h.get(header::TE).is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"trailers"));
    for n in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "http2-settings",
    ] {
        h.remove(n);
    }
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let trusted = shared.trusted(info.peer.ip());
    let peer = match info.peer.ip() {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        ip => ip,
    }
    .to_string();
    let prev: Vec<String> = h
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect();
    if !trusted {
        for n in
            ["forwarded", "x-real-ip", "true-client-ip", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port"]
        {
            h.remove(n);
        }
    }
    let xff = if prev.is_empty() { peer.clone() } else { format!("{}, {peer}", prev.join(", ")) };
    let set = |h: &mut HeaderMap, n: &'static str, v: &str| {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(n, v);
        }
    };
    set(h, "x-forwarded-for", &xff);
    if !h.contains_key("x-forwarded-proto") {
        set(h, "x-forwarded-proto", if info.tls { "https" } else { "http" });
    }
    if !h.contains_key("x-forwarded-host") && !authority.is_empty() {
        set(h, "x-forwarded-host", authority);
    }
    if !h.contains_key("x-forwarded-port") {
        set(h, "x-forwarded-port", &info.local_port.to_string());
    }
    if !h.contains_key("x-real-ip") {
        set(h, "x-real-ip", &peer);
    }
    set(h, "x-request-id", id.as_str());
    if !grpc && !authority.is_empty() {
        set(h, "host", authority);
    } else if grpc {
        h.remove(header::HOST);
    }
}

fn response_headers(h: &mut HeaderMap, id: &RequestId) {
    for n in connection_named(h) {
        h.remove(n);
    }
    for n in ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"] {
        h.remove(n);
    }
    if !h.contains_key(header::SERVER) {
        h.insert(header::SERVER, HeaderValue::from_static(SERVER));
    }
    if let Ok(v) = HeaderValue::from_str(id.as_str()) {
        h.insert("x-request-id", v);
    }
}

//! The request path: a pingora [`ProxyHttp`] that routes each request by Host and path through the current
//! table, answers what the table answers directly (404, 503 for a missing backend, the HTTPS redirect), and
//! proxies the rest to an endpoint of the Cluster.
//!
//! On the way it enforces what an edge proxy must:
//! - **Request smuggling**: an HTTP/1 request carrying both `Content-Length` and `Transfer-Encoding` is refused
//!   with 400 and the connection closed (pingora alone would drop `Content-Length` and go on); differing
//!   duplicate `Content-Length`s and a non-final `chunked` are refused by pingora's parser.
//! - **Limits**: request headers over [`Settings::max_header_bytes`] → 431; a body over
//!   [`Settings::max_body_bytes`] → 413 (at once from `Content-Length`, or as soon as the streamed body passes
//!   it); the header read deadline is enforced per connection by [`crate::server`].
//! - **Forwarding headers**: `X-Forwarded-For` gets the client address appended; `X-Forwarded-Proto` and
//!   `X-Forwarded-Host` are set (we are the edge: a client's own values are replaced); `X-Request-Id` is kept
//!   when the client (or the load balancer in front) sent a sane one, else generated, and echoed in the response.
//! - **Hop-by-hop headers** (`Connection` and what it names, `Keep-Alive`, `Proxy-Connection`, `TE` other than
//!   `trailers`, `Upgrade` outside an upgrade) are not forwarded either way.
//! - **Upstream protocol**: gRPC (`content-type: application/grpc*`) goes upstream over HTTP/2 cleartext (prior
//!   knowledge), everything else over HTTP/1.1 with keep-alive pools, whatever the client spoke (the Cluster
//!   does not say whether a backend speaks h2c, and HTTP/1.1 is what every web backend speaks). WebSocket and
//!   other `Upgrade` requests pass through on HTTP/1.1.
//! - **Retries**: only when a connection to the endpoint could not be made (nothing was sent), on another
//!   endpoint, up to [`Settings::connect_attempts`] endpoints in all.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::protocols::http::ServerSession;
use pingora_core::upstreams::peer::{H1UpgradePolicy, HttpPeer};
use pingora_error::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{ProxyHttp, Session};
use tokio::sync::Notify;

use crate::metrics::{IngressMetrics, LatencyLabels, RequestLabels};
use crate::path;
use crate::routes::{Action, Route};
use crate::table::Table;
use crate::tls::SniResolver;
use crate::upstream::{Cluster, EndpointStats, InFlight};

/// The body of the 404 a request gets when no rule matches (the same text `mesh-control` puts in its routes).
pub const NOT_FOUND_BODY: &str = "404 page not found: no Ingress rule matches this host and path\n";

/// Data-path settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long one connect attempt may take.
    pub connect_timeout: Duration,
    /// How many endpoints a request tries when connecting fails.
    pub connect_attempts: usize,
    /// The largest request header section (request line and headers), in bytes.
    pub max_header_bytes: usize,
    /// The largest request body, in bytes.
    pub max_body_bytes: u64,
    /// How long a client may take to send a request's headers (slowloris).
    pub header_timeout: Duration,
    /// How long a read of the request body may wait for data.
    pub body_timeout: Duration,
    /// How long an idle keep-alive client connection stays open, in seconds.
    pub keepalive_s: u64,
    /// How long an idle upstream connection stays in the pool.
    pub upstream_idle: Duration,
    /// One structured log line per request (target `access`).
    pub access_log: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            connect_timeout: Duration::from_secs(5),
            connect_attempts: 3,
            max_header_bytes: 64 * 1024,
            max_body_bytes: 8 * 1024 * 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            keepalive_s: 60,
            upstream_idle: Duration::from_secs(60),
            access_log: false,
        }
    }
}

pub use mesh_runtime::{ConnTracker, Tracked};

/// What the data path shares with the configuration handler and the admin server.
#[derive(Debug)]
pub struct Shared {
    /// The current table: one writer (the config handler), read once per request.
    pub table: ArcSwap<Table>,
    /// The TLS certificate resolver (its table is swapped with [`Shared::table`]).
    pub resolver: Arc<SniResolver>,
    /// Metrics.
    pub metrics: IngressMetrics,
    /// Settings.
    pub settings: Settings,
    /// Set when draining: responses close their connections.
    pub draining: AtomicBool,
    /// Open client connections.
    pub conns: Arc<ConnTracker>,
}

impl Shared {
    /// A shared state with an empty table.
    pub fn new(settings: Settings, metrics: IngressMetrics) -> Arc<Shared> {
        Arc::new(Shared {
            table: ArcSwap::from_pointee(Table::default()),
            resolver: Arc::new(SniResolver::default()),
            metrics,
            settings,
            draining: AtomicBool::new(false),
            conns: Arc::default(),
        })
    }

    /// Publishes a new table: certificates first, so a handshake never sees routes without their certificate.
    pub fn publish(&self, t: Table) {
        self.resolver.table.store(t.certs.clone());
        self.table.store(Arc::new(t));
    }
}

/// Signals a connection's header deadline watchdog that a request's headers have arrived; handed to pingora as
/// the connection's user context and given back to us in [`ProxyHttp::on_connection_reuse`].
#[derive(Debug, Default)]
pub struct HeadersRead(pub Notify);

/// The per-request state.
#[derive(Debug)]
pub struct Ctx {
    start: Instant,
    tls: bool,
    vhost: Arc<str>,
    route: Option<Arc<Route>>,
    cluster: Option<Arc<Cluster>>,
    tried: Vec<SocketAddr>,
    endpoint: Option<Arc<EndpointStats>>,
    in_flight: Option<InFlight>,
    request_id: String,
    body_bytes: u64,
    grpc: bool,
    upgrade: bool,
    status_override: Option<u16>,
}

/// The ingress proxy logic.
#[derive(Debug, Clone)]
pub struct Ingress {
    shared: Arc<Shared>,
}

impl Ingress {
    /// The logic over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Ingress { shared }
    }
}

/// Whether raw HTTP/1 request headers carry both `Content-Length` and `Transfer-Encoding`.
pub fn conflicting_framing(raw: &[u8]) -> bool {
    let mut cl = false;
    let mut te = false;
    for line in raw.split(|b| *b == b'\n').skip(1) {
        let Some(colon) = line.iter().position(|b| *b == b':') else { continue };
        let name = line[..colon].trim_ascii();
        cl |= name.eq_ignore_ascii_case(b"content-length");
        te |= name.eq_ignore_ascii_case(b"transfer-encoding");
    }
    cl && te
}

fn header_bytes(req: &RequestHeader) -> usize {
    let target = req.uri.path_and_query().map_or(1, |p| p.as_str().len())
        + req.uri.authority().map_or(0, |a| a.as_str().len())
        + req.uri.scheme_str().map_or(0, str::len);
    let line = req.method.as_str().len() + target + 12;
    line + req.headers.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum::<usize>()
}

/// A request id a client may hand us: short, visible ASCII.
fn sane_request_id(v: &[u8]) -> bool {
    !v.is_empty() && v.len() <= 128 && v.iter().all(|b| b.is_ascii_graphic())
}

fn new_request_id() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

/// The request's authority: `:authority`/absolute-form host, else the `Host` header.
fn authority(req: &RequestHeader) -> &str {
    if let Some(a) = req.uri.authority() {
        return a.as_str();
    }
    req.headers.get(http::header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("")
}

async fn respond(session: &mut Session, status: u16, body: Bytes, location: Option<String>, close: bool) -> Result<()> {
    let mut h = ResponseHeader::build(status, Some(4))?;
    h.insert_header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    h.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    if let Some(l) = location {
        h.insert_header(http::header::LOCATION, l)?;
    }
    if close {
        session.set_keepalive(None);
        if !session.is_http2() {
            h.insert_header(http::header::CONNECTION, "close")?;
        }
    }
    let empty = body.is_empty();
    session.write_response_header(Box::new(h), empty).await?;
    if !empty {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

const HOP_BY_HOP: [&str; 5] = ["keep-alive", "proxy-connection", "proxy-authenticate", "trailer", "upgrade"];

#[async_trait]
impl ProxyHttp for Ingress {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            tls: false,
            vhost: crate::metrics::none(),
            route: None,
            cluster: None,
            tried: Vec::new(),
            endpoint: None,
            in_flight: None,
            request_id: String::new(),
            body_bytes: 0,
            grpc: false,
            upgrade: false,
            status_override: None,
        }
    }

    fn on_connection_reuse(&self, _session: &mut Session, _ctx: &mut Ctx, prev: Box<dyn std::any::Any + Send + Sync>) {
        if let Some(h) = prev.downcast_ref::<Arc<HeadersRead>>() {
            h.0.notify_one();
        }
    }

    async fn early_request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        ctx.start = Instant::now();
        // The header deadline is over; from here a read waits at most the body timeout for data.
        session.set_read_timeout(Some(self.shared.settings.body_timeout));
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let s = &self.shared.settings;
        ctx.tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        let (raw_len, smuggling) = match session.as_downstream() {
            ServerSession::H1(h1) => {
                let raw = h1.get_headers_raw_bytes();
                (raw.len(), conflicting_framing(&raw))
            }
            _ => (header_bytes(session.req_header()), false),
        };
        if smuggling {
            ctx.status_override = Some(400);
            respond(
                session,
                400,
                Bytes::from_static(b"400 bad request: both Content-Length and Transfer-Encoding\n"),
                None,
                true,
            )
            .await?;
            return Ok(true);
        }
        if raw_len > s.max_header_bytes {
            ctx.status_override = Some(431);
            respond(session, 431, Bytes::from_static(b"431 request header fields too large\n"), None, true).await?;
            return Ok(true);
        }
        let req = session.req_header();
        let declared =
            req.headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > s.max_body_bytes) {
            ctx.status_override = Some(413);
            respond(session, 413, Bytes::from_static(b"413 request body too large\n"), None, true).await?;
            return Ok(true);
        }
        ctx.grpc =
            req.headers.get(http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        ctx.upgrade = session.is_upgrade_req();
        ctx.request_id = match req.headers.get("x-request-id") {
            Some(v) if sane_request_id(v.as_bytes()) => String::from_utf8_lossy(v.as_bytes()).into_owned(),
            _ => new_request_id(),
        };

        let table = self.shared.table.load_full();
        let routes = if ctx.tls { &table.https } else { &table.http };
        let host = authority(req).to_owned();
        let normalized = path::normalize(req.uri.path());
        let Some((vhost, route)) = routes.find(&host, &normalized) else {
            respond(session, 404, Bytes::from_static(NOT_FOUND_BODY.as_bytes()), None, false).await?;
            return Ok(true);
        };
        ctx.vhost = vhost.name.clone();
        ctx.route = Some(route.clone());
        match &route.action {
            Action::Direct { status, body } => {
                respond(session, *status, body.clone(), None, false).await?;
                Ok(true)
            }
            Action::RedirectHttps { status } => {
                let host = crate::routes::host_key(&host);
                let host = if host.contains(':') { format!("[{host}]") } else { host.into_owned() };
                let pq = session.req_header().uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
                respond(session, *status, Bytes::new(), Some(format!("https://{host}{pq}")), false).await?;
                Ok(true)
            }
            Action::Cluster(name) => match table.clusters.get(&**name) {
                Some(c) => {
                    ctx.cluster = Some(c.clone());
                    Ok(false)
                }
                None => {
                    let body = format!("503 service unavailable: cluster {name} is not known\n");
                    respond(session, 503, Bytes::from(body), None, false).await?;
                    Ok(true)
                }
            },
        }
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(b) = body {
            ctx.body_bytes += b.len() as u64;
            if ctx.body_bytes > self.shared.settings.max_body_bytes {
                ctx.status_override = Some(413);
                return Error::e_explain(ErrorType::HTTPStatus(413), "request body too large");
            }
        }
        Ok(())
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let Some(cluster) = ctx.cluster.clone() else {
            return Error::e_explain(ErrorType::HTTPStatus(503), "no cluster for this route");
        };
        let Some(ep) = cluster.pick(&ctx.tried) else {
            if ctx.tried.is_empty() {
                self.shared.metrics.upstream_failure(&cluster.name, "no_endpoint");
            }
            return Error::e_explain(
                ErrorType::HTTPStatus(if ctx.tried.is_empty() { 503 } else { 502 }),
                format!("no usable endpoint in cluster {}", cluster.name),
            );
        };
        ctx.tried.push(ep.addr);
        ctx.in_flight = Some(InFlight::new(&ep.stats));
        ctx.endpoint = Some(ep.stats.clone());
        let s = &self.shared.settings;
        let mut peer = HttpPeer::new(ep.addr, false, String::new());
        peer.options.connection_timeout = Some(s.connect_timeout);
        peer.options.idle_timeout = Some(s.upstream_idle);
        // Upgrades (WebSocket and others) pass through whole; hop-by-hop headers are cleaned below.
        peer.options.http_upstream_request_policy.h1_upgrade = H1UpgradePolicy::Preserve;
        if ctx.grpc {
            peer.options.set_http_version(2, 2);
            peer.options.max_h2_streams = 100;
        }
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let name = ctx.cluster.as_ref().map_or("-".into(), |c| c.name.clone());
        self.shared.metrics.upstream_failure(&name, "connect");
        if let Some(stats) = ctx.endpoint.take()
            && stats.connect_failed()
        {
            self.shared.metrics.upstream_failure(&name, "ejected");
            tracing::warn!(cluster = %name, endpoint = ?ctx.tried.last(), "endpoint ejected after repeated connect failures");
        }
        ctx.in_flight = None;
        let more = ctx.cluster.as_ref().is_some_and(|c| c.pick(&ctx.tried).is_some());
        if more && ctx.tried.len() < self.shared.settings.connect_attempts {
            e.set_retry(true);
        }
        e
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&pingora_core::protocols::Digest>,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(stats) = &ctx.endpoint {
            stats.connected();
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        up: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let client = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip().to_string());
        let host = authority(session.req_header()).to_owned();
        // Hop-by-hop headers, and whatever Connection names (kept for an upgrade, which needs them).
        if !ctx.upgrade {
            let named: Vec<String> = up
                .headers
                .get_all(http::header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(|t| t.trim().to_ascii_lowercase())
                .filter(|t| !t.is_empty() && t != "close" && t != "keep-alive")
                .collect();
            for n in named {
                up.remove_header(n.as_str());
            }
            up.remove_header(&http::header::CONNECTION);
            for h in HOP_BY_HOP {
                up.remove_header(h);
            }
        } else {
            for h in ["keep-alive", "proxy-connection"] {
                up.remove_header(h);
            }
        }
        if up.headers.get(http::header::TE).is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers")) {
            up.remove_header(&http::header::TE);
        }
        if let Some(ip) = client {
            let xff = match up.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
                Some(prev) if !prev.trim().is_empty() => format!("{prev}, {ip}"),
                _ => ip,
            };
            up.insert_header("x-forwarded-for", xff)?;
        }
        up.insert_header("x-forwarded-proto", if ctx.tls { "https" } else { "http" })?;
        if !host.is_empty() {
            up.insert_header("x-forwarded-host", host.as_str())?;
        }
        up.insert_header("x-request-id", ctx.request_id.as_str())?;
        if !ctx.grpc {
            // HTTP/1.1 upstream: origin-form target and a Host header, whatever the client spoke.
            if up.headers.get(http::header::HOST).is_none() && !host.is_empty() {
                up.insert_header(http::header::HOST, host.as_str())?;
            }
            if up.uri.authority().is_some() {
                let pq = up.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
                up.set_uri(pq.parse().map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "bad path"))?);
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        _ctx: &mut Ctx,
    ) -> Result<()> {
        if resp.status.as_u16() != 101 {
            // Hop-by-hop fields of the upstream connection, and whatever its Connection header names.
            let named: Vec<String> = resp
                .headers
                .get_all(http::header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(|t| t.trim().to_ascii_lowercase())
                .filter(|t| !t.is_empty() && t != "close" && t != "keep-alive")
                .collect();
            for n in named {
                resp.remove_header(n.as_str());
            }
            for h in ["keep-alive", "proxy-connection"] {
                resp.remove_header(h);
            }
        }
        Ok(())
    }

    async fn response_filter(&self, session: &mut Session, resp: &mut ResponseHeader, ctx: &mut Ctx) -> Result<()> {
        if ctx.route.is_some() && !ctx.request_id.is_empty() {
            resp.insert_header("x-request-id", ctx.request_id.as_str())?;
        }
        if self.shared.draining.load(Ordering::Relaxed) {
            session.set_keepalive(None);
        }
        Ok(())
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        ctx.in_flight = None;
        let status = session.response_written().map(|r| r.status.as_u16()).or(ctx.status_override).unwrap_or(0);
        let listener = if ctx.tls { "https" } else { "http" };
        let route = ctx.route.as_ref().map_or_else(crate::metrics::none, |r| r.label.clone());
        let upstream = ctx.cluster.as_ref().map_or_else(crate::metrics::none, |c| c.name.clone());
        if e.is_some() && ctx.cluster.is_some() && status >= 500 {
            self.shared.metrics.upstream_failure(&upstream, "proxy");
        }
        let m = &self.shared.metrics;
        m.requests
            .get_or_create(&RequestLabels {
                listener,
                host: ctx.vhost.clone(),
                route: route.clone(),
                status,
                upstream: upstream.clone(),
            })
            .inc();
        let elapsed = ctx.start.elapsed();
        m.latency.get_or_create(&LatencyLabels { listener, host: ctx.vhost.clone() }).observe(elapsed.as_secs_f64());
        if self.shared.settings.access_log {
            let req = session.req_header();
            tracing::info!(
                target: "access",
                client = ?session.client_addr().and_then(|a| a.as_inet()),
                method = %req.method,
                authority = authority(req),
                path = %req.uri.path(),
                version = ?req.version,
                status,
                listener,
                vhost = %ctx.vhost,
                route = &*route,
                upstream = &*upstream,
                endpoint = ?ctx.tried.last(),
                attempts = ctx.tried.len(),
                body_in = session.body_bytes_read(),
                body_out = session.body_bytes_sent(),
                duration_us = elapsed.as_micros() as u64,
                request_id = %ctx.request_id,
                error = e.map(|e| e.to_string()),
                "request"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_conflicts_are_found_case_insensitively() {
        assert!(conflicting_framing(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"));
        assert!(conflicting_framing(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\nCONTENT-LENGTH : 3\r\n\r\n"));
        assert!(!conflicting_framing(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\n"));
        assert!(!conflicting_framing(b"POST /content-length:x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"));
    }

    #[test]
    fn request_ids() {
        assert!(sane_request_id(b"abc-123"));
        assert!(!sane_request_id(b""));
        assert!(!sane_request_id(b"has space"));
        assert!(!sane_request_id(&[b'a'; 129]));
        assert_eq!(new_request_id().len(), 32);
    }
}

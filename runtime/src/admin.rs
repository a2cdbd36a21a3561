//! The admin server every mesh binary runs on localhost: `/ready`, `/metrics`, `/config_dump`, `/logging`,
//! plus routes an app adds (`/debug/clients` on the control plane).
//!
//! Why it looks like this:
//! - **Loopback only unless told otherwise.** The admin exposes configuration (config dumps will include TLS
//!   material) and can change logging, with no authentication. [`AdminServer::serve`] refuses any other
//!   address unless [`AdminBuilder::allow_non_loopback`] says the port is protected some other way.
//! - **Bind first, then spawn**, returning the bound address, so tests (and `app::build`) use port 0 and a
//!   port already in use is an error from `serve`, not a log line from a background task.
//! - **Callbacks, not types.** The runtime must not know the proxy's or the control plane's tables, so the
//!   config dump and extra routes are closures returning JSON, and logging is the [`LogFilter`] trait
//!   (implemented by [`ReloadHandle`]; tests pass a fake, since a process gets only one global subscriber).
//!   Callbacks run on the blocking pool, so a slow dump cannot stall the runtime and a panicking one
//!   answers 500 instead of dropping the connection.
//! - **Readiness is a flag the app flips**, not something the server infers: only the app knows when its
//!   first snapshot (or every watcher's first list) is in. It starts "not ready", so an app that forgets to
//!   flip it fails its probe loudly instead of taking traffic empty.
//! - **HTTP/1.1 only**: the clients are curl, Prometheus and the kubelet.
//! - **Not reachable from a browser.** Loopback alone does not stop a web page in a browser on the node: by DNS
//!   rebinding its own name can resolve to 127.0.0.1, and a cross-origin `POST` (a form) needs no preflight.
//!   So a request whose `Host` is not a loopback address or `localhost` (with or without a port) is refused
//!   with 421 (a rebound name is still the attacker's name in `Host`), and so is a request carrying `Origin`
//!   that is not `GET`/`HEAD`/`OPTIONS` (browsers send `Origin` on every cross-origin and every `POST`
//!   request; curl, Prometheus, the kubelet and meshctl never do) with 403. On a server allowed off loopback
//!   ([`AdminBuilder::allow_non_loopback`]) any IP address is accepted as `Host` too: an IP literal cannot be
//!   rebound.
//! - **Stops with the process's [`Shutdown`]**: stop accepting, let requests in flight finish (bounded by
//!   [`DRAIN_DEADLINE`]), close idle keep-alive connections.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::metrics::{self, Metrics};
use crate::telemetry::{ReloadHandle, TelemetryError};
use crate::{RuntimeError, Shutdown};

/// How long, after shutdown, requests in flight get to finish before their connections are dropped.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// How long a client may take to send its request headers; a connection that never does is closed rather
/// than held forever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest `/logging` request body accepted (a filter is a line of text).
const MAX_BODY: usize = 16 * 1024;

/// The paths the server answers itself; extra routes may not take them.
const BUILTIN_PATHS: [&str; 5] = ["/", "/ready", "/metrics", "/config_dump", "/logging"];

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

/// Errors building or starting the admin server.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The address is not loopback and [`AdminBuilder::allow_non_loopback`] was not set.
    #[error(
        "refusing to serve the admin endpoint on {addr}: it is not a loopback address, and the admin server \
         exposes configuration (including TLS material in config dumps) and log control without \
         authentication; use 127.0.0.1 or [::1], or set allow_non_loopback if the port is protected otherwise"
    )]
    NonLoopback {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// Binding the listening socket failed.
    #[error("cannot listen on {addr} for the admin server (is the port in use? use port 0 for any): {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// An extra route cannot be served as given.
    #[error("invalid admin route {path:?}: {reason}")]
    InvalidRoute {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Whether the process is ready for traffic: the flag behind `GET /ready`. Clones share it; the app flips it
/// when it has loaded what it serves (and may flip it back, e.g. while draining). Starts not ready.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    ready: Arc<AtomicBool>,
}

impl Readiness {
    /// A new flag, not ready.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the flag; `/ready` answers accordingly from the next request on.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Whether the process is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// A callback producing a JSON document, for `/config_dump` and extra routes. Called once per request, on
/// the blocking pool; it should take a snapshot (an `Arc` load) and serialize it, not wait for anything.
pub type JsonSource = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What `/logging` reads and changes. [`ReloadHandle`] implements it; the trait exists so the admin server can
/// be tested (and embedded) without installing the process's one global subscriber.
pub trait LogFilter: Send + Sync + 'static {
    /// The filter in force, in the syntax [`set_filter`](Self::set_filter) accepts.
    fn filter(&self) -> Result<String, RuntimeError>;
    /// Replaces the filter. An invalid filter must fail with [`TelemetryError::InvalidFilter`] (answered 400)
    /// and leave the old one in force; any other error is answered 500.
    fn set_filter(&self, filter: &str) -> Result<(), RuntimeError>;
}

impl LogFilter for ReloadHandle {
    fn filter(&self) -> Result<String, RuntimeError> {
        ReloadHandle::filter(self)
    }

    fn set_filter(&self, filter: &str) -> Result<(), RuntimeError> {
        ReloadHandle::set_filter(self, filter)
    }
}

/// What the admin server serves. Build with [`Admin::builder`]; cheap to clone.
#[derive(Clone)]
pub struct Admin {
    inner: Arc<Inner>,
}

struct Inner {
    readiness: Readiness,
    metrics: Metrics,
    logging: Option<Arc<dyn LogFilter>>,
    config_dump: Option<JsonSource>,
    routes: BTreeMap<String, JsonSource>,
    allow_non_loopback: bool,
}

impl Admin {
    /// Starts describing an admin server; every part is optional.
    pub fn builder() -> AdminBuilder {
        AdminBuilder::default()
    }

    /// The readiness flag behind `/ready` (the one given to the builder, or a fresh one).
    pub fn readiness(&self) -> &Readiness {
        &self.inner.readiness
    }

    /// The registry behind `/metrics` (the one given to the builder, or a fresh one).
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }
}

impl fmt::Debug for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admin")
            .field("ready", &self.inner.readiness.is_ready())
            .field("logging", &self.inner.logging.is_some())
            .field("config_dump", &self.inner.config_dump.is_some())
            .field("routes", &self.inner.routes.keys().collect::<Vec<_>>())
            .field("allow_non_loopback", &self.inner.allow_non_loopback)
            .finish()
    }
}

/// Builds an [`Admin`]. Defaults: a fresh [`Readiness`] (not ready), a fresh [`Metrics`], and no `/logging`,
/// `/config_dump` or extra routes (those paths answer 404 and are left out of the index).
#[derive(Default)]
pub struct AdminBuilder {
    readiness: Option<Readiness>,
    metrics: Option<Metrics>,
    logging: Option<Arc<dyn LogFilter>>,
    config_dump: Option<JsonSource>,
    routes: Vec<(String, JsonSource)>,
    allow_non_loopback: bool,
}

impl AdminBuilder {
    /// The flag `/ready` reports; keep a clone to flip it.
    pub fn readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = Some(readiness);
        self
    }

    /// The registry `/metrics` renders; keep a clone to register into it.
    pub fn metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Enables `/logging` on this filter (normally the [`ReloadHandle`] from `init_tracing`).
    pub fn logging(mut self, logging: impl LogFilter) -> Self {
        self.logging = Some(Arc::new(logging));
        self
    }

    /// Enables `/config_dump`, answering what `dump` returns (pretty-printed).
    pub fn config_dump(mut self, dump: JsonSource) -> Self {
        self.config_dump = Some(dump);
        self
    }

    /// Adds `GET {path}` answering what `source` returns (pretty-printed), e.g. `/debug/clients`.
    pub fn route(mut self, path: impl Into<String>, source: JsonSource) -> Self {
        self.routes.push((path.into(), source));
        self
    }

    /// Allows serving on a non-loopback address. Only for a port protected some other way (a network policy,
    /// a Pod-local sidecar): everything the admin serves is unauthenticated.
    pub fn allow_non_loopback(mut self, allow: bool) -> Self {
        self.allow_non_loopback = allow;
        self
    }

    /// Checks the routes (absolute, no query, not a built-in path, no duplicates) and builds the [`Admin`].
    pub fn build(self) -> Result<Admin, AdminError> {
        let mut routes = BTreeMap::new();
        for (path, source) in self.routes {
            let reason = if !path.starts_with('/') {
                Some("a route must start with '/'")
            } else if path.contains(['?', '#']) {
                Some("a route is a path only, without query or fragment")
            } else if BUILTIN_PATHS.contains(&path.as_str()) {
                Some("the admin server serves this path itself")
            } else if routes.contains_key(&path) {
                Some("the route is given twice")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(AdminError::InvalidRoute { path, reason });
            }
            routes.insert(path, source);
        }
        Ok(Admin {
            inner: Arc::new(Inner {
                readiness: self.readiness.unwrap_or_default(),
                metrics: self.metrics.unwrap_or_default(),
                logging: self.logging,
                config_dump: self.config_dump,
                routes,
                allow_non_loopback: self.allow_non_loopback,
            }),
        })
    }
}

impl fmt::Debug for AdminBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminBuilder")
            .field("logging", &self.logging.is_some())
            .field("config_dump", &self.config_dump.is_some())
            .field("routes", &self.routes.iter().map(|(p, _)| p).collect::<Vec<_>>())
            .field("allow_non_loopback", &self.allow_non_loopback)
            .finish_non_exhaustive()
    }
}

/// The admin HTTP server. See [`AdminServer::serve`].
#[derive(Debug)]
pub struct AdminServer(());

impl AdminServer {
    /// Binds `addr` (port 0 picks a free port), then serves `admin` in a spawned task until `shutdown` is
    /// triggered. Returns the bound address and the task, which ends once the listener is closed and the
    /// connections are drained (at most [`DRAIN_DEADLINE`] after the trigger).
    ///
    /// Fails without binding if `addr` is not loopback and the builder did not allow it, and if the bind
    /// fails.
    pub async fn serve(
        addr: SocketAddr,
        admin: Admin,
        shutdown: Shutdown,
    ) -> Result<(SocketAddr, JoinHandle<()>), AdminError> {
        if !is_loopback(addr.ip()) && !admin.inner.allow_non_loopback {
            return Err(AdminError::NonLoopback { addr });
        }
        let listener = TcpListener::bind(addr).await.map_err(|source| AdminError::Bind { addr, source })?;
        let bound = listener.local_addr().map_err(|source| AdminError::Bind { addr, source })?;
        tracing::info!(addr = %bound, "admin server listening");
        Ok((bound, tokio::spawn(accept_loop(listener, admin, shutdown))))
    }
}

/// Loopback, counting IPv4-mapped IPv6 (`::ffff:127.0.0.1`), which `Ipv6Addr::is_loopback` does not.
fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

async fn accept_loop(listener: TcpListener, admin: Admin, shutdown: Shutdown) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            // Reap finished connections so the set does not grow with every scrape.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    connections.spawn(serve_connection(stream, admin.clone(), shutdown.clone()));
                }
                Err(error) => {
                    // Typically out of file descriptors: back off instead of spinning, but stay stoppable.
                    tracing::warn!(%error, "admin server cannot accept a connection");
                    tokio::select! {
                        _ = shutdown.wait() => break,
                        _ = crate::accept::pause_after(&error) => {}
                    }
                }
            },
        }
    }
    drop(listener);
    let drained =
        tokio::time::timeout(DRAIN_DEADLINE, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            left = connections.len(),
            "admin connections still open after the drain deadline; dropping them"
        );
    }
    tracing::debug!("admin server stopped");
    // Dropping the `JoinSet` aborts whatever is left.
}

async fn serve_connection(stream: TcpStream, admin: Admin, shutdown: Shutdown) {
    let service = service_fn(move |req| {
        let admin = admin.clone();
        async move { Ok::<_, Infallible>(handle(&admin, req).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = shutdown.wait() => {
            // Finish the request in flight, if any, then close; an idle connection closes at once.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "admin connection ended with an error");
    }
}

type Resp = Response<Full<Bytes>>;

async fn handle(admin: &Admin, req: Request<Incoming>) -> Resp {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = route(admin, req).await;
    tracing::debug!(%method, %path, status = resp.status().as_u16(), "admin request");
    resp
}

/// Whether `Host` names this machine by loopback address or `localhost` (any port), or, when the server may
/// serve off loopback, by any IP address. A missing `Host` (HTTP/1.0) is accepted: a browser always sends one.
fn host_allowed(host: Option<&str>, allow_ip: bool) -> bool {
    let Some(host) = host else { return true };
    let host = host.trim();
    // Strip the port: `[v6]:port`, `[v6]`, `name:port`, `v4:port`, `name`.
    let bare = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, tail)) if tail.is_empty() || tail.strip_prefix(':').is_some_and(valid_port) => ip,
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if valid_port(port) && !name.contains(':') => name,
            Some(_) if host.parse::<IpAddr>().is_err() => return false,
            _ => host,
        }
    };
    let bare = bare.strip_suffix('.').unwrap_or(bare);
    if bare.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match bare.parse::<IpAddr>() {
        Ok(ip) => allow_ip || is_loopback(ip),
        Err(_) => false,
    }
}

fn valid_port(p: &str) -> bool {
    p.is_empty() || p.parse::<u16>().is_ok()
}

/// Refuses what a browser page could send (see the module docs): a foreign `Host`, or a mutating request with
/// an `Origin`.
fn refuse_browser(inner: &Inner, req: &Request<Incoming>) -> Option<Resp> {
    let headers = req.headers();
    let host = match headers.get(http::header::HOST) {
        Some(v) => match v.to_str() {
            Ok(h) => Some(h),
            Err(_) => return Some(respond(StatusCode::MISDIRECTED_REQUEST, TEXT, "Host is not valid text\n")),
        },
        None => req.uri().authority().map(|a| a.as_str()),
    };
    if !host_allowed(host, inner.allow_non_loopback) {
        return Some(respond(
            StatusCode::MISDIRECTED_REQUEST,
            TEXT,
            "the admin server answers only requests for localhost or a loopback address (Host header); \
             use http://127.0.0.1:PORT/ or http://localhost:PORT/\n",
        ));
    }
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe && headers.contains_key(http::header::ORIGIN) {
        return Some(respond(
            StatusCode::FORBIDDEN,
            TEXT,
            "the admin server refuses changes sent with an Origin header (from a web page); use curl or meshctl\n",
        ));
    }
    None
}

async fn route(admin: &Admin, req: Request<Incoming>) -> Resp {
    let inner = &admin.inner;
    if let Some(refused) = refuse_browser(inner, &req) {
        return refused;
    }
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    let path = req.uri().path().to_owned();
    match path.as_str() {
        "/" if get => respond(StatusCode::OK, TEXT, index(inner)),
        "/ready" if get => match inner.readiness.is_ready() {
            true => respond(StatusCode::OK, TEXT, "ready\n"),
            false => respond(StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready\n"),
        },
        "/metrics" if get => match inner.metrics.encode() {
            Ok(text) => respond(StatusCode::OK, metrics::CONTENT_TYPE, text),
            Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e}\n")),
        },
        "/config_dump" => match &inner.config_dump {
            Some(dump) if get => json(dump.clone(), "config_dump").await,
            Some(_) => method_not_allowed("GET, HEAD"),
            None => not_found("/config_dump is not available in this binary"),
        },
        "/logging" => match &inner.logging {
            Some(logging) if get => match logging.filter() {
                Ok(filter) => respond(StatusCode::OK, TEXT, format!("{filter}\n")),
                Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e}\n")),
            },
            Some(logging) if matches!(*req.method(), Method::POST | Method::PUT) => {
                set_logging(logging.as_ref(), req).await
            }
            Some(_) => method_not_allowed("GET, HEAD, POST, PUT"),
            None => not_found("/logging is not available in this binary"),
        },
        "/" | "/ready" | "/metrics" => method_not_allowed("GET, HEAD"),
        path => match inner.routes.get(path) {
            Some(source) if get => json(source.clone(), path).await,
            Some(_) => method_not_allowed("GET, HEAD"),
            None => not_found(&format!("no admin endpoint {path}; GET / lists them")),
        },
    }
}

fn index(inner: &Inner) -> String {
    let mut out = String::from("mesh admin endpoints:\n");
    let mut line = |path: &str, what: &str| out.push_str(&format!("  GET  {path:<16} {what}\n"));
    line("/ready", "200 when ready for traffic, 503 until then");
    line("/metrics", "metrics, OpenMetrics text");
    if inner.config_dump.is_some() {
        line("/config_dump", "the configuration in force, JSON");
    }
    if inner.logging.is_some() {
        line("/logging", "the log filter in force");
    }
    for path in inner.routes.keys() {
        line(path, "JSON");
    }
    if inner.logging.is_some() {
        out.push_str("  POST /logging?filter=FILTER  sets the log filter (also PUT; or the filter as the body)\n");
    }
    out
}

/// `POST|PUT /logging`: the filter from `?filter=`, else the body (`filter=...` form-encoded, or the bare
/// filter as `curl --data-raw 'info,mesh_proxy=debug'` sends it).
async fn set_logging(logging: &dyn LogFilter, req: Request<Incoming>) -> Resp {
    let from_query = req.uri().query().and_then(|q| form_value(q, "filter"));
    let filter = match from_query {
        Some(filter) => filter,
        None => match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(body) => {
                let body = String::from_utf8_lossy(&body.to_bytes()).trim().to_owned();
                match body.strip_prefix("filter=") {
                    Some(_) => form_value(&body, "filter").unwrap_or_default(),
                    None => body,
                }
            }
            Err(e) if e.is::<LengthLimitError>() => {
                return respond(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    TEXT,
                    format!("a log filter is at most {MAX_BODY} bytes\n"),
                );
            }
            Err(e) => return respond(StatusCode::BAD_REQUEST, TEXT, format!("cannot read the request body: {e}\n")),
        },
    };
    let filter = filter.trim();
    if filter.is_empty() {
        // An empty filter parses (as "errors only"): refuse it rather than silence a process by accident.
        return respond(
            StatusCode::BAD_REQUEST,
            TEXT,
            "missing log filter: POST /logging?filter=info,mesh_proxy=debug, or send the filter as the body\n",
        );
    }
    match logging.set_filter(filter).and_then(|()| logging.filter()) {
        Ok(now) => {
            tracing::info!(filter = %now, "log filter changed through the admin server");
            respond(StatusCode::OK, TEXT, format!("{now}\n"))
        }
        Err(e @ RuntimeError::Telemetry(TelemetryError::InvalidFilter { .. })) => {
            respond(StatusCode::BAD_REQUEST, TEXT, format!("{e}\n"))
        }
        Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e}\n")),
    }
}

/// Runs a JSON callback on the blocking pool and answers its result pretty-printed.
async fn json(source: JsonSource, what: &str) -> Resp {
    match tokio::task::spawn_blocking(move || serde_json::to_string_pretty(&source())).await {
        Ok(Ok(mut text)) => {
            text.push('\n');
            respond(StatusCode::OK, JSON, text)
        }
        Ok(Err(e)) => respond(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("cannot serialize {what}: {e}\n")),
        Err(e) => {
            tracing::error!(error = %e, what, "admin callback failed");
            respond(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{what} failed: {e}\n"))
        }
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn not_found(message: &str) -> Resp {
    respond(StatusCode::NOT_FOUND, TEXT, format!("{message}\n"))
}

fn method_not_allowed(allow: &'static str) -> Resp {
    let mut resp = respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, format!("method not allowed; use {allow}\n"));
    resp.headers_mut().insert(ALLOW, HeaderValue::from_static(allow));
    resp
}

/// The decoded value of `key` in a form-encoded string (`a=1&filter=info%2Cx%3Ddebug`). Splits each pair at
/// its first `=`, so an unencoded `filter=info,mesh_proxy=debug` works too.
fn form_value(form: &str, key: &str) -> Option<String> {
    form.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == key).then(|| percent_decode(v))
    })
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte; a malformed escape is kept as
/// is (the filter parser will then say what is wrong).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                // Checked digit by digit: `from_str_radix` alone would accept a sign (`%+1`).
                let escaped = bytes.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit));
                match escaped.and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    use http::HeaderMap;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use prometheus_client::metrics::counter::Counter;
    use serde_json::json;
    use tokio::time::timeout;

    use super::*;

    /// Bound for things that must happen; generous so a loaded CI machine does not flake.
    const SOON: Duration = Duration::from_secs(5);

    struct Reply {
        status: StatusCode,
        headers: HeaderMap,
        body: String,
    }

    impl Reply {
        fn header(&self, name: http::header::HeaderName) -> &str {
            self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
        }
    }

    /// One real HTTP/1.1 request through hyper's client, bounded.
    async fn call(method: Method, addr: SocketAddr, path: &str, body: &str) -> Reply {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let resp = timeout(SOON, client.request(req)).await.expect("no answer in time").expect("request failed");
        let (parts, body) = resp.into_parts();
        let body = timeout(SOON, body.collect()).await.expect("no body in time").expect("body failed").to_bytes();
        Reply { status: parts.status, headers: parts.headers, body: String::from_utf8(body.to_vec()).unwrap() }
    }

    async fn get(addr: SocketAddr, path: &str) -> Reply {
        call(Method::GET, addr, path, "").await
    }

    struct Running {
        addr: SocketAddr,
        shutdown: Shutdown,
        task: JoinHandle<()>,
    }

    impl Running {
        async fn start(admin: Admin) -> Running {
            let shutdown = Shutdown::new();
            let (addr, task) = AdminServer::serve(([127, 0, 0, 1], 0).into(), admin, shutdown.clone()).await.unwrap();
            assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
            Running { addr, shutdown, task }
        }

        async fn stop(self) {
            self.shutdown.trigger();
            timeout(SOON, self.task).await.expect("admin server did not stop").unwrap();
        }
    }

    /// Stands in for the [`ReloadHandle`] (the real one needs the process's one global subscriber); parses
    /// with the same `EnvFilter` so accepting and rejecting behave alike.
    #[derive(Clone)]
    struct FakeLog(Arc<Mutex<String>>);

    impl FakeLog {
        fn new(filter: &str) -> Self {
            FakeLog(Arc::new(Mutex::new(filter.to_owned())))
        }
    }

    impl LogFilter for FakeLog {
        fn filter(&self) -> Result<String, RuntimeError> {
            Ok(self.0.lock().unwrap().clone())
        }

        fn set_filter(&self, filter: &str) -> Result<(), RuntimeError> {
            let parsed = tracing_subscriber::EnvFilter::builder().parse(filter).map_err(|source| {
                TelemetryError::InvalidFilter { origin: "/logging", filter: filter.to_owned(), source }
            })?;
            *self.0.lock().unwrap() = parsed.to_string();
            Ok(())
        }
    }

    #[tokio::test]
    async fn ready_flips_with_the_flag() {
        let readiness = Readiness::new();
        let server = Running::start(Admin::builder().readiness(readiness.clone()).build().unwrap()).await;

        let r = get(server.addr, "/ready").await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "not ready\n"));
        readiness.set_ready(true);
        let r = get(server.addr, "/ready").await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "ready\n"));
        readiness.clone().set_ready(false);
        assert_eq!(get(server.addr, "/ready").await.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(call(Method::HEAD, server.addr, "/ready", "").await.status, StatusCode::SERVICE_UNAVAILABLE);
        server.stop().await;
    }

    #[tokio::test]
    async fn metrics_show_registered_and_process_metrics() {
        let metrics = Metrics::new();
        let requests: Counter = Counter::default();
        metrics.register("test_requests", "Requests seen by the test", requests.clone());
        requests.inc_by(7);
        let server = Running::start(Admin::builder().metrics(metrics).build().unwrap()).await;

        let r = get(server.addr, "/metrics").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header(CONTENT_TYPE), metrics::CONTENT_TYPE);
        assert!(r.body.contains("\nmesh_test_requests_total 7\n"), "{}", r.body);
        assert!(r.body.contains("\nmesh_process_start_time_seconds "), "{}", r.body);
        assert!(r.body.contains(&format!("\nmesh_build_info{{version=\"{}\"}} 1\n", metrics::VERSION)), "{}", r.body);
        if cfg!(target_os = "linux") {
            assert!(r.body.contains("\nmesh_process_resident_memory_bytes "), "{}", r.body);
        }
        assert!(r.body.ends_with("# EOF\n"), "{}", r.body);

        // Counted at scrape time, not at registration.
        requests.inc();
        assert!(get(server.addr, "/metrics").await.body.contains("\nmesh_test_requests_total 8\n"));
        server.stop().await;
    }

    #[tokio::test]
    async fn config_dump_and_extra_routes_answer_their_callbacks() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let admin = Admin::builder()
            .config_dump(Arc::new(move || {
                let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
                json!({ "version": n, "listeners": ["svc/default/web/http@10.0.0.1"] })
            }))
            .route("/debug/clients", Arc::new(|| json!([{ "node": "n1", "role": "proxy" }])))
            .build()
            .unwrap();
        let server = Running::start(admin).await;

        let r = get(server.addr, "/config_dump").await;
        assert_eq!((r.status, r.header(CONTENT_TYPE)), (StatusCode::OK, JSON));
        assert!(r.body.contains("\n  \"listeners\""), "pretty-printed: {}", r.body);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v, json!({ "version": 1, "listeners": ["svc/default/web/http@10.0.0.1"] }));
        // Called per request: a dump is always current.
        let v: serde_json::Value = serde_json::from_str(&get(server.addr, "/config_dump").await.body).unwrap();
        assert_eq!(v["version"], 2);

        let r = get(server.addr, "/debug/clients").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&r.body).unwrap(),
            json!([{ "node": "n1", "role": "proxy" }])
        );
        let r = call(Method::POST, server.addr, "/debug/clients", "").await;
        assert_eq!((r.status, r.header(ALLOW)), (StatusCode::METHOD_NOT_ALLOWED, "GET, HEAD"));
        assert_eq!(call(Method::DELETE, server.addr, "/config_dump", "").await.status, StatusCode::METHOD_NOT_ALLOWED);

        let index = get(server.addr, "/").await;
        for path in ["/ready", "/metrics", "/config_dump", "/debug/clients"] {
            assert!(index.body.contains(path), "{path} missing from the index: {}", index.body);
        }
        assert!(!index.body.contains("/logging"), "not configured, not listed: {}", index.body);
        server.stop().await;
    }

    #[tokio::test]
    async fn a_panicking_callback_answers_500_and_the_server_carries_on() {
        let admin = Admin::builder().config_dump(Arc::new(|| panic!("dump exploded"))).build().unwrap();
        let server = Running::start(admin).await;
        let r = get(server.addr, "/config_dump").await;
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", r.body);
        assert!(r.body.contains("config_dump failed"), "{}", r.body);
        assert_eq!(get(server.addr, "/metrics").await.status, StatusCode::OK);
        server.stop().await;
    }

    #[tokio::test]
    async fn logging_reads_and_sets_the_filter() {
        let log = FakeLog::new("info");
        let server = Running::start(Admin::builder().logging(log.clone()).build().unwrap()).await;
        let addr = server.addr;

        let r = get(addr, "/logging").await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "info\n"));

        // Query parameter, encoded or not (pairs split at their first '=').
        let r = call(Method::POST, addr, "/logging?filter=debug", "").await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "debug\n"));
        let r = call(Method::POST, addr, "/logging?filter=info%2Cmesh_proxy%3Dtrace", "").await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "mesh_proxy=trace,info\n"), "EnvFilter's order");
        let r = call(Method::POST, addr, "/logging?filter=warn,mesh_proxy=debug", "").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(log.filter().unwrap(), "mesh_proxy=debug,warn");

        // The filter as a raw body (PUT), or form-encoded (what `curl -d filter=...` sends).
        let r = call(Method::PUT, addr, "/logging", "error\n").await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "error\n"));
        let r = call(Method::POST, addr, "/logging", "filter=info%2Cmesh_control%3Ddebug").await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "mesh_control=debug,info\n"));
        assert_eq!(get(addr, "/logging").await.body, "mesh_control=debug,info\n");

        // A bad filter is a 400 naming it, and the old filter stays.
        let r = call(Method::POST, addr, "/logging?filter=mesh=loud", "").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.body.contains("mesh=loud") && r.body.contains("invalid log filter"), "{}", r.body);
        assert_eq!(get(addr, "/logging").await.body, "mesh_control=debug,info\n");

        // No filter at all is refused rather than read as "errors only".
        let r = call(Method::POST, addr, "/logging", "  ").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.body.contains("missing log filter"), "{}", r.body);
        let r = call(Method::POST, addr, "/logging", &"x".repeat(MAX_BODY + 1)).await;
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);

        let r = call(Method::DELETE, addr, "/logging", "").await;
        assert_eq!((r.status, r.header(ALLOW)), (StatusCode::METHOD_NOT_ALLOWED, "GET, HEAD, POST, PUT"));
        assert!(get(addr, "/").await.body.contains("POST /logging?filter="));
        server.stop().await;
    }

    #[tokio::test]
    async fn unknown_paths_are_404_and_wrong_methods_405() {
        let server = Running::start(Admin::builder().build().unwrap()).await;
        let r = get(server.addr, "/nope").await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert!(r.body.contains("/nope"), "{}", r.body);
        // Optional endpoints that were not configured are absent, not empty.
        assert_eq!(get(server.addr, "/logging").await.status, StatusCode::NOT_FOUND);
        assert_eq!(get(server.addr, "/config_dump").await.status, StatusCode::NOT_FOUND);
        for path in ["/", "/ready", "/metrics"] {
            let r = call(Method::POST, server.addr, path, "").await;
            assert_eq!((r.status, r.header(ALLOW)), (StatusCode::METHOD_NOT_ALLOWED, "GET, HEAD"), "{path}");
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn non_loopback_addresses_are_refused_unless_allowed() {
        let any: SocketAddr = ([0, 0, 0, 0], 0).into();
        let e = AdminServer::serve(any, Admin::builder().build().unwrap(), Shutdown::new()).await.unwrap_err();
        assert!(matches!(e, AdminError::NonLoopback { addr } if addr == any), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("0.0.0.0:0") && msg.contains("allow_non_loopback") && msg.contains("loopback"), "{msg}");

        let shutdown = Shutdown::new();
        let admin = Admin::builder().allow_non_loopback(true).build().unwrap();
        let (addr, task) = AdminServer::serve(any, admin, shutdown.clone()).await.expect("allowed explicitly");
        assert!(addr.ip().is_unspecified(), "{addr}");
        shutdown.trigger();
        timeout(SOON, task).await.expect("did not stop").unwrap();

        assert!(is_loopback("127.0.0.1".parse().unwrap()) && is_loopback("127.1.2.3".parse().unwrap()));
        assert!(is_loopback("::1".parse().unwrap()) && is_loopback("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_loopback("10.0.0.1".parse().unwrap()) && !is_loopback("::".parse().unwrap()));
    }

    /// A raw HTTP/1.1 request with the given extra header lines (so `Host` is whatever the test says).
    async fn raw(addr: SocketAddr, head: &str) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("{head}Connection: close\r\nContent-Length: 0\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = Vec::new();
        timeout(SOON, s.read_to_end(&mut out)).await.expect("no answer in time").unwrap();
        let text = String::from_utf8_lossy(&out);
        text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status: {text}"))
    }

    #[tokio::test]
    async fn requests_a_browser_page_could_send_are_refused() {
        let log = FakeLog::new("info");
        let server = Running::start(Admin::builder().logging(log.clone()).build().unwrap()).await;
        let addr = server.addr;
        let port = addr.port();
        // DNS rebinding: the attacker's name resolves to 127.0.0.1, but it is still the name in Host.
        for host in ["evil.example", "evil.example:19000", "localhost.evil.example", "10.0.0.1", "[::2]:80", "a:b:c"] {
            let get = raw(addr, &format!("GET /ready HTTP/1.1\r\nHost: {host}\r\n")).await;
            assert_eq!(get, 421, "GET with Host {host}");
            let post = raw(addr, &format!("POST /logging?filter=trace HTTP/1.1\r\nHost: {host}\r\n")).await;
            assert_eq!(post, 421, "POST with Host {host}");
        }
        assert_eq!(log.filter().unwrap(), "info", "a refused request changed the log filter");
        for host in [
            "localhost".to_owned(),
            format!("localhost:{port}"),
            "LOCALHOST.".to_owned(),
            format!("127.0.0.1:{port}"),
            "127.1.2.3".to_owned(),
            "[::1]".to_owned(),
            format!("[::1]:{port}"),
            "::1".to_owned(),
        ] {
            assert_eq!(raw(addr, &format!("GET /ready HTTP/1.1\r\nHost: {host}\r\n")).await, 503, "Host {host}");
        }
        // HTTP/1.0 without Host (a browser always sends one).
        assert_eq!(raw(addr, "GET /ready HTTP/1.0\r\n").await, 503);

        // CSRF: a form posted from a page carries Origin (even with a good Host).
        let host = format!("Host: 127.0.0.1:{port}\r\n");
        for origin in ["http://evil.example", "null", &format!("http://127.0.0.1:{port}")] {
            let r = raw(addr, &format!("POST /logging?filter=trace HTTP/1.1\r\n{host}Origin: {origin}\r\n")).await;
            assert_eq!(r, 403, "POST with Origin {origin}");
            let r = raw(addr, &format!("PUT /logging?filter=trace HTTP/1.1\r\n{host}Origin: {origin}\r\n")).await;
            assert_eq!(r, 403, "PUT with Origin {origin}");
        }
        assert_eq!(log.filter().unwrap(), "info", "a refused request changed the log filter");
        // Reading with an Origin is harmless (the page cannot read the answer cross-origin anyway).
        let r = raw(addr, &format!("GET /logging HTTP/1.1\r\n{host}Origin: http://evil.example\r\n")).await;
        assert_eq!(r, 200);
        // Without Origin, as curl and meshctl send it, the change goes through.
        assert_eq!(raw(addr, &format!("POST /logging?filter=debug HTTP/1.1\r\n{host}")).await, 200);
        assert_eq!(log.filter().unwrap(), "debug");
        server.stop().await;

        // Off loopback (explicitly allowed), an IP literal is accepted too; a name still is not.
        assert!(host_allowed(Some("10.0.0.1:19000"), true) && host_allowed(Some("[fd00::1]:1"), true));
        assert!(!host_allowed(Some("evil.example"), true) && !host_allowed(Some("10.0.0.1:19000"), false));
        assert!(!host_allowed(Some("127.0.0.1:99999"), false) && !host_allowed(Some("[::1"), false));
    }

    #[tokio::test]
    async fn a_port_in_use_is_a_bind_error() {
        let server = Running::start(Admin::builder().build().unwrap()).await;
        let e = AdminServer::serve(server.addr, Admin::builder().build().unwrap(), Shutdown::new()).await.unwrap_err();
        assert!(matches!(e, AdminError::Bind { .. }), "{e}");
        assert!(e.to_string().contains(&server.addr.to_string()), "{e}");
        server.stop().await;
    }

    #[tokio::test]
    async fn stops_on_shutdown_without_waiting_for_idle_connections() {
        let server = Running::start(Admin::builder().build().unwrap()).await;
        let addr = server.addr;
        // A keep-alive connection left idle after one request, and one that never sent anything.
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(
            TcpStream::connect(addr).await.unwrap(),
        ))
        .await
        .unwrap();
        let client_conn = tokio::spawn(conn);
        let req = Request::builder().uri("/ready").header("host", "localhost").body(Full::default()).unwrap();
        let resp = timeout(SOON, sender.send_request(req)).await.unwrap().unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        let _silent = TcpStream::connect(addr).await.unwrap();

        server.shutdown.trigger();
        // Well before the drain deadline: idle connections are closed, not waited for.
        timeout(DRAIN_DEADLINE / 2, server.task).await.expect("idle connections held the server up").unwrap();
        timeout(SOON, client_conn).await.expect("the server did not close the idle connection").unwrap().unwrap();
        let refused = timeout(SOON, TcpStream::connect(addr)).await.expect("connect hung");
        assert!(refused.is_err(), "still accepting after shutdown");
    }

    #[test]
    fn routes_are_checked_when_built() {
        let source: JsonSource = Arc::new(|| json!(null));
        let bad = |path: &str| Admin::builder().route(path, source.clone()).build().unwrap_err();
        for path in ["debug", "/ready", "/metrics", "/", "/x?y=1"] {
            assert!(matches!(bad(path), AdminError::InvalidRoute { .. }), "{path}");
        }
        let twice = Admin::builder().route("/a", source.clone()).route("/a", source.clone()).build().unwrap_err();
        assert!(twice.to_string().contains("twice"), "{twice}");
        let ok = Admin::builder().route("/a", source.clone()).route("/b", source).build().unwrap();
        assert!(format!("{ok:?}").contains(r#"routes: ["/a", "/b"]"#), "{ok:?}");
        assert!(!ok.readiness().is_ready(), "not ready until the app says so");
    }

    #[test]
    fn form_values_are_decoded() {
        assert_eq!(form_value("a=1&filter=info%2Cx%3Ddebug", "filter").as_deref(), Some("info,x=debug"));
        assert_eq!(form_value("filter=info,x=debug", "filter").as_deref(), Some("info,x=debug"));
        assert_eq!(form_value("filter", "filter").as_deref(), Some(""));
        assert_eq!(form_value("other=1", "filter"), None);
        assert_eq!(percent_decode("a+b%20c%2"), "a b c%2");
        assert_eq!(percent_decode("%+1%zz%41"), "% 1%zzA", "a sign is not a hex digit");
    }
}

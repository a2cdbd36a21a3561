//! The HTTP/1.x request path: our own, lean, one task per client connection that also drives the upstream
//! connection of each request, so a request crosses no channel and no task boundary.
//!
//! Per request: the head is parsed in place with `httparse` from the connection's read buffer, checked, routed,
//! and rewritten straight into a reused write buffer as the upstream request head (no header map, no
//! allocation); the upstream connection comes from the worker's pool ([`crate::pool`]); the response head is
//! parsed the same way and rewritten for the client; bodies are copied through the same two buffers. A proxied
//! request costs one read and one write on each side when the bodies are small.
//!
//! Refused (each answered and the connection closed, nothing sent upstream):
//! - framing that could smuggle: `Content-Length` with `Transfer-Encoding` (400), differing `Content-Length`s
//!   (400; `5, 5` is sent on as `5`), `Transfer-Encoding` other than `chunked` alone (501, as nginx), chunked in
//!   HTTP/1.0 (400), malformed chunking (400), obs-fold and other malformed header lines (400);
//! - HTTP/1.1 without `Host`, or with two (400); a request-target that is not `/path`, `http(s)://authority/path`
//!   or `OPTIONS *`, or that holds spaces, controls or non-ASCII (400); `CONNECT` (405);
//! - a request line over [`Settings::max_request_line`] (414), headers over [`Settings::max_header_bytes`] or
//!   more than [`Settings::max_headers`] of them (431), a body over [`Settings::max_body_bytes`] (413);
//! - slow clients: headers not complete within [`Settings::header_timeout`] (closed), a body idle for
//!   [`Settings::body_timeout`] or not complete within [`Settings::request_timeout`] (408).
//!
//! Forwarded: the request in origin form with the *normalised* path (the one routed, see [`crate::path`]); an
//! absolute-form target is routed by its authority, which replaces `Host`. Only WebSocket upgrades are passed
//! on (`Upgrade: h2c` and others are dropped, the request served as plain HTTP/1.1), so no upgrade can open a
//! tunnel past the routing rules. `Expect: 100-continue` is answered by us, as nginx does. Pipelined requests
//! are answered in order.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::codec::{self, Chunked, Target};
use crate::proxy::{self, Done, Outcome, RequestId, Routed, SERVER, Settings, Shared};
use crate::upstream::{Cluster, InFlight};

/// How long a draining ingress still waits for the next request on an idle keep-alive connection.
pub const IDLE_GRACE: Duration = Duration::from_secs(1);

/// The most header lines parsed in a request or response.
pub(crate) const HEADER_SLOTS: usize = 128;
/// The largest upstream response head.
pub(crate) const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Read size.
pub(crate) const READ_CHUNK: usize = 16 * 1024;

/// Who the client is and where it connected.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// The port it connected to (`X-Forwarded-Port`).
    pub local_port: u16,
    /// Whether the connection is TLS.
    pub tls: bool,
}

/// How a message body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (responses only).
    Close,
}

/// A request refused on its head.
#[derive(Debug)]
struct Refusal {
    status: u16,
    why: &'static str,
}

fn refuse(status: u16, why: &'static str) -> Refusal {
    Refusal { status, why }
}

/// What the data path keeps of a request head once it is parsed (the head's bytes are gone by then).
#[derive(Debug)]
struct Prepared {
    head_len: usize,
    http10: bool,
    keep_alive: bool,
    head: bool,
    framing: Framing,
    websocket: bool,
    expect_continue: bool,
    request_id: RequestId,
    routed: Routed,
    /// `method authority path` for the access log (only when it is on).
    text: Option<Box<(String, String, String)>>,
}

enum Parsed {
    Complete(Prepared),
    Partial,
    /// Refused, with the routing decision when the refusal came after it.
    Bad(Refusal, Option<RequestId>),
    /// `OPTIONS *`: answered by us.
    Asterisk(bool),
}

/// Serves one HTTP/1.x client connection until it closes, errs, idles out or the drain ends it.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    initial: BytesMut,
    info: ConnInfo,
    shared: Arc<Shared>,
    mut finish: watch::Receiver<bool>,
) {
    let s = &shared.settings;
    let mut c = Conn {
        rbuf: initial,
        ubuf: BytesMut::with_capacity(READ_CHUNK),
        wbuf: Vec::with_capacity(4096),
        who: Who {
            tls: info.tls,
            local_port: info.local_port,
            peer_ip: ip_text(info.peer.ip()),
            trusted: shared.trusted(info.peer.ip()),
        },
        info,
    };
    let mut first = true;
    loop {
        if c.rbuf.is_empty() {
            let idle = if first { s.header_timeout } else { Duration::from_secs(s.keepalive_s) };
            if !wait_request(&mut io, &mut c.rbuf, idle, &mut finish).await {
                break;
            }
        }
        first = false;
        let start = Instant::now();
        let deadline = tokio::time::Instant::from_std(start + s.header_timeout);
        let parsed = loop {
            let table = shared.table.load();
            match prepare(&c.rbuf, &c.who, s, &table, &mut c.wbuf) {
                Parsed::Partial => {}
                done => break done,
            }
            drop(table);
            if c.rbuf.len() > s.max_header_bytes {
                break Parsed::Bad(refuse(431, "request header fields too large"), None);
            }
            if c.rbuf.len() > s.max_request_line && !c.rbuf[..s.max_request_line].contains(&b'\n') {
                break Parsed::Bad(refuse(414, "URI too long"), None);
            }
            c.rbuf.reserve(READ_CHUNK);
            match tokio::time::timeout_at(deadline, io.read_buf(&mut c.rbuf)).await {
                Ok(Ok(n)) if n > 0 => {}
                // Closed, failed, or too slow (slowloris): nothing to answer.
                _ => return,
            }
        };
        let p = match parsed {
            Parsed::Complete(p) => p,
            // (The parse loop ends only on a complete or refused head.)
            Parsed::Partial => break,
            Parsed::Asterisk(http10) => {
                c.wbuf.clear();
                c.answer(
                    200,
                    b"",
                    None,
                    &[("allow", "OPTIONS, GET, HEAD, POST, PUT, PATCH, DELETE")],
                    true,
                    None,
                    http10,
                );
                let _ = write_out(&mut io, &c.wbuf).await;
                break;
            }
            Parsed::Bad(r, id) => {
                c.wbuf.clear();
                let body = format!("{} {}\n", r.status, r.why);
                c.answer(r.status, body.as_bytes(), None, &[], true, id.as_ref(), false);
                let _ = write_out(&mut io, &c.wbuf).await;
                proxy::finish(
                    &shared,
                    &Done {
                        listener: c.listener(),
                        client: c.info.peer,
                        method: "-",
                        authority: "-",
                        path: "-",
                        version: "HTTP/1.1",
                        routed: None,
                        status: r.status,
                        endpoint: None,
                        attempts: 0,
                        body_in: 0,
                        body_out: 0,
                        request_id: id.as_ref().map_or("-", RequestId::as_str),
                        start,
                        error: Some(r.why),
                    },
                );
                break;
            }
        };
        c.rbuf.advance(p.head_len);
        let keep = p.keep_alive && !shared.draining.load(Ordering::Relaxed);
        let outcome = match &p.routed.outcome {
            Outcome::Proxy(cluster) => {
                let cluster = cluster.clone();
                c.proxy(&mut io, &shared, &p, &cluster, keep).await
            }
            Outcome::Answer { status, body, location } => {
                // A body we will not read: the connection cannot carry another request.
                let keep = keep && matches!(p.framing, Framing::None | Framing::Length(0));
                c.wbuf.clear();
                let body: &[u8] = if p.head { b"" } else { body };
                c.answer(*status, body, location.as_deref(), &[], !keep, Some(&p.request_id), p.http10);
                let ok = write_out(&mut io, &c.wbuf).await.is_ok();
                Exchange {
                    status: *status,
                    keep: keep && ok,
                    endpoint: None,
                    attempts: 0,
                    body_in: 0,
                    body_out: body.len() as u64,
                    error: (!ok).then_some("client write failed"),
                }
            }
        };
        let (method, authority, path) = p.text.as_deref().map_or(("-", "-", "-"), |t| (&t.0, &t.1, &t.2));
        proxy::finish(
            &shared,
            &Done {
                listener: c.listener(),
                client: c.info.peer,
                method,
                authority,
                path,
                version: if p.http10 { "HTTP/1.0" } else { "HTTP/1.1" },
                routed: Some(&p.routed),
                status: outcome.status,
                endpoint: outcome.endpoint,
                attempts: outcome.attempts,
                body_in: outcome.body_in,
                body_out: outcome.body_out,
                request_id: p.request_id.as_str(),
                start,
                error: outcome.error,
            },
        );
        if !outcome.keep {
            break;
        }
    }
    let _ = io.shutdown().await;
}

fn ip_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or_else(|| v6.to_string(), |v4| v4.to_string()),
        IpAddr::V4(v4) => v4.to_string(),
    }
}

/// Waits for the first bytes of the next request, up to `idle`; during a drain, up to [`IDLE_GRACE`] more.
async fn wait_request<S: AsyncRead + Unpin>(
    io: &mut S,
    rbuf: &mut BytesMut,
    idle: Duration,
    finish: &mut watch::Receiver<bool>,
) -> bool {
    let now = tokio::time::Instant::now();
    let mut draining = *finish.borrow();
    let sleep = tokio::time::sleep_until(now + if draining { idle.min(IDLE_GRACE) } else { idle });
    tokio::pin!(sleep);
    rbuf.reserve(READ_CHUNK);
    loop {
        tokio::select! {
            biased;
            r = io.read_buf(rbuf) => return matches!(r, Ok(n) if n > 0),
            () = &mut sleep => return false,
            _ = finish.changed(), if !draining => {
                draining = true;
                let grace = tokio::time::Instant::now() + IDLE_GRACE;
                if grace < sleep.deadline() {
                    sleep.as_mut().reset(grace);
                }
            }
        }
    }
}

async fn write_out<S: AsyncWrite + Unpin>(io: &mut S, buf: &[u8]) -> std::io::Result<()> {
    io.write_all(buf).await?;
    io.flush().await
}

/// What became of a proxied request.
#[derive(Debug)]
struct Exchange {
    status: u16,
    keep: bool,
    endpoint: Option<SocketAddr>,
    attempts: usize,
    body_in: u64,
    body_out: u64,
    error: Option<&'static str>,
}

struct Conn {
    rbuf: BytesMut,
    ubuf: BytesMut,
    wbuf: Vec<u8>,
    info: ConnInfo,
    who: Who,
}

/// What the request head's rewriting needs to know of the client.
struct Who {
    tls: bool,
    local_port: u16,
    peer_ip: String,
    trusted: bool,
}

/// Parses and checks a request head in `buf`; when complete and routed to a cluster, writes the upstream
/// request head into `out`.
fn prepare(buf: &[u8], c: &Who, s: &Settings, table: &crate::table::Table, out: &mut Vec<u8>) -> Parsed {
    let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
    let slots = &mut slots[..s.max_headers.clamp(1, HEADER_SLOTS)];
    let mut req = httparse::Request::new(slots);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parsed::Bad(refuse(431, "too many request headers"), None),
        Err(httparse::Error::Version) => return Parsed::Bad(refuse(400, "bad request line or HTTP version"), None),
        Err(_) => return Parsed::Bad(refuse(400, "malformed request head"), None),
    };
    if head_len > s.max_header_bytes {
        return Parsed::Bad(refuse(431, "request header fields too large"), None);
    }
    if buf[..head_len].iter().position(|b| *b == b'\n').is_some_and(|n| n > s.max_request_line) {
        return Parsed::Bad(refuse(414, "URI too long"), None);
    }
    let method = req.method.unwrap_or("");
    let raw_target = req.path.unwrap_or("");
    let http10 = req.version == Some(0);
    if method == "CONNECT" {
        return Parsed::Bad(refuse(405, "CONNECT is not served"), None);
    }
    let target = match codec::target(raw_target, method == "OPTIONS") {
        Ok(t) => t,
        Err(codec::TargetError::Byte) => return Parsed::Bad(refuse(400, "bad byte in the request target"), None),
        Err(_) => return Parsed::Bad(refuse(400, "bad request target"), None),
    };

    // One pass over the headers for what decides framing, routing and forwarding.
    let mut host: Option<&[u8]> = None;
    let mut hosts = 0;
    let mut length: Option<u64> = None;
    let mut bad_length = false;
    let mut te_seen = false;
    let mut te_chunked_last = false;
    let mut te_other = false;
    let mut close = false;
    let mut keep_alive_token = false;
    let mut upgrade_token = false;
    let mut named: [&[u8]; 8] = [b""; 8];
    let mut n_named = 0;
    let mut websocket_value: Option<&[u8]> = None;
    let mut expect: Option<&[u8]> = None;
    let mut request_id: Option<&[u8]> = None;
    let mut xff = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let v = h.value;
        if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
            host = Some(v.trim_ascii());
        } else if name.eq_ignore_ascii_case(b"content-length") {
            match codec::content_length(v) {
                Some(n) if length.is_none_or(|l| l == n) => length = Some(n),
                _ => bad_length = true,
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            te_seen = true;
            for t in codec::tokens(v) {
                if te_chunked_last {
                    // Something after chunked: not the final coding.
                    te_chunked_last = false;
                    te_other = true;
                }
                if t.eq_ignore_ascii_case(b"chunked") {
                    te_chunked_last = true;
                } else {
                    te_other = true;
                }
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for t in codec::tokens(v) {
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive_token = true;
                } else if t.eq_ignore_ascii_case(b"upgrade") {
                    upgrade_token = true;
                } else if n_named < named.len() {
                    named[n_named] = t;
                    n_named += 1;
                }
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            if codec::tokens(v).any(|t| t.eq_ignore_ascii_case(b"websocket")) {
                websocket_value = Some(v);
            }
        } else if name.eq_ignore_ascii_case(b"expect") {
            expect = Some(v.trim_ascii());
        } else if name.eq_ignore_ascii_case(b"x-request-id") {
            request_id = Some(v.trim_ascii());
        } else if name.eq_ignore_ascii_case(b"x-forwarded-for") {
            xff = true;
        }
    }
    let request_id = RequestId::from_client(request_id);
    let bad = |status, why| Parsed::Bad(refuse(status, why), Some(request_id));
    if bad_length {
        return bad(400, "bad or conflicting Content-Length");
    }
    let framing = match (te_seen, length) {
        (true, Some(_)) => return bad(400, "both Content-Length and Transfer-Encoding"),
        (true, None) if http10 => return bad(400, "Transfer-Encoding in an HTTP/1.0 request"),
        (true, None) if te_other || !te_chunked_last => return bad(501, "transfer coding not implemented"),
        (true, None) => Framing::Chunked,
        (false, None) => Framing::None,
        (false, Some(n)) => Framing::Length(n),
    };
    if let Framing::Length(n) = framing
        && n > s.max_body_bytes
    {
        return bad(413, "request body too large");
    }
    let expect_continue = match expect {
        None => false,
        Some(e) if e.eq_ignore_ascii_case(b"100-continue") => true,
        Some(_) => return bad(417, "expectation not supported"),
    };
    if hosts > 1 {
        return bad(400, "more than one Host header");
    }
    let (authority, path, query) = match target {
        Target::Asterisk => return Parsed::Asterisk(http10),
        Target::Absolute { authority, path, query } => (authority, path, query),
        Target::Origin { path, query } => {
            let host = match host {
                Some(h) => h,
                None if http10 => b"",
                None => return bad(400, "HTTP/1.1 request without Host"),
            };
            let Ok(host) = std::str::from_utf8(host) else { return bad(400, "bad Host") };
            (host, path, query)
        }
    };
    if !codec::valid_authority(authority) {
        return bad(400, "bad Host");
    }
    let keep_alive = if http10 { keep_alive_token && !close } else { !close };
    let websocket = upgrade_token && websocket_value.is_some() && !http10;
    let path = crate::path::normalize(path);
    let routed = proxy::route(table, c.tls, authority, &path, query);
    let text = s.access_log.then(|| {
        Box::new((method.to_owned(), authority.to_owned(), raw_target.split('?').next().unwrap_or("").to_owned()))
    });

    if let Outcome::Proxy(_) = routed.outcome {
        out.clear();
        out.extend_from_slice(method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(path.as_bytes());
        if let Some(q) = query {
            out.push(b'?');
            out.extend_from_slice(q.as_bytes());
        }
        out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        out.extend_from_slice(authority.as_bytes());
        out.extend_from_slice(b"\r\n");
        let mut proto = None;
        let mut fhost = None;
        let mut fport = None;
        let mut real_ip = false;
        for h in req.headers.iter() {
            let name = h.name.as_bytes();
            if proxy::hop_by_hop(name) {
                if name.eq_ignore_ascii_case(b"te") && h.value.trim_ascii().eq_ignore_ascii_case(b"trailers") {
                    out.extend_from_slice(b"TE: trailers\r\n");
                }
                continue;
            }
            if name.eq_ignore_ascii_case(b"host")
                || name.eq_ignore_ascii_case(b"content-length")
                || name.eq_ignore_ascii_case(b"expect")
                || named[..n_named].iter().any(|n| n.eq_ignore_ascii_case(name))
            {
                continue;
            }
            if proxy::forwarding(name) {
                if !c.trusted {
                    continue;
                }
                // A trusted peer's values pass; X-Forwarded-For and X-Request-Id are written below.
                if name.eq_ignore_ascii_case(b"x-forwarded-proto") {
                    proto = Some(h.value);
                } else if name.eq_ignore_ascii_case(b"x-forwarded-host") {
                    fhost = Some(h.value);
                } else if name.eq_ignore_ascii_case(b"x-forwarded-port") {
                    fport = Some(h.value);
                } else if !name.eq_ignore_ascii_case(b"x-forwarded-for") && !name.eq_ignore_ascii_case(b"x-request-id")
                {
                    real_ip |= name.eq_ignore_ascii_case(b"x-real-ip");
                    header(out, name, h.value);
                }
                continue;
            }
            header(out, name, h.value);
        }
        match framing {
            Framing::Length(n) => {
                out.extend_from_slice(b"Content-Length: ");
                push_u64(out, n);
                out.extend_from_slice(b"\r\n");
            }
            Framing::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
            _ => {}
        }
        if websocket && let Some(v) = websocket_value {
            out.extend_from_slice(b"Connection: upgrade\r\n");
            header(out, b"Upgrade", v);
        }
        out.extend_from_slice(b"X-Forwarded-For: ");
        if xff {
            // The client's chain (several headers join with commas), then the peer we saw.
            for h in req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("x-forwarded-for")) {
                let v = h.value.trim_ascii();
                if !v.is_empty() {
                    out.extend_from_slice(v);
                    out.extend_from_slice(b", ");
                }
            }
        }
        out.extend_from_slice(c.peer_ip.as_bytes());
        out.extend_from_slice(b"\r\n");
        header(out, b"X-Forwarded-Proto", proto.unwrap_or(if c.tls { b"https" } else { b"http" }));
        if let Some(h) = fhost {
            header(out, b"X-Forwarded-Host", h);
        } else if !authority.is_empty() {
            header(out, b"X-Forwarded-Host", authority.as_bytes());
        }
        match fport {
            Some(p) => header(out, b"X-Forwarded-Port", p),
            None => {
                out.extend_from_slice(b"X-Forwarded-Port: ");
                push_u64(out, u64::from(c.local_port));
                out.extend_from_slice(b"\r\n");
            }
        }
        if !real_ip {
            header(out, b"X-Real-IP", c.peer_ip.as_bytes());
        }
        header(out, b"X-Request-Id", request_id.as_str().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    Parsed::Complete(Prepared {
        head_len,
        http10,
        keep_alive,
        head: method == "HEAD",
        framing,
        websocket,
        expect_continue,
        request_id,
        routed,
        text,
    })
}

pub(crate) fn header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// What an upstream response head says.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub(crate) head_len: usize,
    pub(crate) status: u16,
    pub(crate) framing: Framing,
    /// The upstream connection can carry another request after this response.
    pub(crate) reusable: bool,
}

/// Why a proxied exchange failed before the client got a response.
#[derive(Debug, Clone, Copy)]
enum Fail {
    /// No endpoint at all.
    NoEndpoint,
    /// Connecting failed on every endpoint tried.
    Connect,
    /// The upstream failed before its response head.
    Upstream,
    /// The upstream took too long to answer.
    Timeout,
    /// The upstream's response head is malformed.
    BadResponse,
    /// The client's body broke the rules or stalled.
    Client(u16, &'static str),
    /// The client went away.
    ClientGone,
}

impl Conn {
    fn listener(&self) -> &'static str {
        if self.info.tls { "https" } else { "http" }
    }

    /// Writes an answer of ours into `wbuf`.
    #[allow(clippy::too_many_arguments)]
    fn answer(
        &mut self,
        status: u16,
        body: &[u8],
        location: Option<&str>,
        extra: &[(&str, &str)],
        close: bool,
        id: Option<&RequestId>,
        http10: bool,
    ) {
        let w = &mut self.wbuf;
        let reason = http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
        let _ = write!(w, "HTTP/1.1 {status} {reason}\r\nServer: {SERVER}\r\nDate: ");
        codec::date(|d| w.extend_from_slice(d));
        let _ = write!(w, "\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n", body.len());
        if let Some(l) = location {
            header(w, b"Location", l.as_bytes());
        }
        for (k, v) in extra {
            header(w, k.as_bytes(), v.as_bytes());
        }
        if let Some(id) = id {
            header(w, b"X-Request-Id", id.as_str().as_bytes());
        }
        if close {
            w.extend_from_slice(b"Connection: close\r\n");
        } else if http10 {
            w.extend_from_slice(b"Connection: keep-alive\r\n");
        }
        w.extend_from_slice(b"\r\n");
        w.extend_from_slice(body);
    }

    /// Proxies one request whose upstream head is in `wbuf` and whose body (if any) starts `rbuf`.
    async fn proxy<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        shared: &Shared,
        p: &Prepared,
        cluster: &Arc<Cluster>,
        keep: bool,
    ) -> Exchange {
        let s = &shared.settings;
        let mut ex =
            Exchange { status: 0, keep: false, endpoint: None, attempts: 0, body_in: 0, body_out: 0, error: None };
        // The part of the body already here goes out with the head.
        let mut chunked = Chunked::default();
        let mut left = 0u64;
        let mut body_done = true;
        match p.framing {
            Framing::Length(n) => {
                let k = move_up_to(&mut self.rbuf, &mut self.wbuf, n);
                left = n - k;
                ex.body_in = k;
                body_done = left == 0;
            }
            Framing::Chunked => match chunked.feed(&self.rbuf, |_| {}) {
                Ok(k) => {
                    self.wbuf.extend_from_slice(&self.rbuf[..k]);
                    self.rbuf.advance(k);
                    body_done = chunked.done();
                    ex.body_in = chunked.data_len;
                }
                Err(_) => return self.fail(io, shared, p, ex, Fail::Client(400, "malformed chunked body")).await,
            },
            Framing::None | Framing::Close => {}
        }
        if chunked.data_len > s.max_body_bytes {
            return self.fail(io, shared, p, ex, Fail::Client(413, "request body too large")).await;
        }
        if p.expect_continue && !body_done && write_out(io, b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err() {
            ex.error = Some("client went away");
            return ex;
        }
        let replayable = body_done;
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut fresh_for: Option<SocketAddr> = None;
        let (mut up, endpoint, resp, _flight) = loop {
            // Which endpoint: the same one again after a stale pooled connection, else a new pick.
            let fresh = fresh_for.take();
            let ep = match fresh {
                Some(a) => cluster.endpoints.iter().find(|e| e.addr == a),
                None => cluster.pick(&tried),
            };
            let Some(ep) = ep else {
                let why = if tried.is_empty() { Fail::NoEndpoint } else { Fail::Connect };
                if tried.is_empty() {
                    shared.metrics.upstream_failure(&cluster.name, "no_endpoint");
                }
                ex.attempts = tried.len();
                return self.fail(io, shared, p, ex, why).await;
            };
            let addr = ep.addr;
            if !tried.contains(&addr) {
                tried.push(addr);
            }
            ex.endpoint = Some(addr);
            ex.attempts = tried.len();
            let flight = InFlight::new(&ep.stats);
            let pooled = if fresh.is_none() { crate::pool::checkout(addr, s.upstream_idle) } else { None };
            let reused = pooled.is_some();
            let mut up = match pooled {
                Some(u) => u,
                None => match crate::pool::connect(addr, s.connect_timeout).await {
                    Ok(u) => {
                        ep.stats.connected();
                        u
                    }
                    Err(e) => {
                        shared.metrics.upstream_failure(&cluster.name, "connect");
                        if ep.stats.connect_failed() {
                            shared.metrics.upstream_failure(&cluster.name, "ejected");
                            tracing::warn!(cluster = %cluster.name, endpoint = %addr, "endpoint ejected after repeated connect failures");
                        }
                        tracing::debug!(cluster = %cluster.name, "{e}");
                        if tried.len() < s.connect_attempts && cluster.pick(&tried).is_some() {
                            continue;
                        }
                        return self.fail(io, shared, p, ex, Fail::Connect).await;
                    }
                },
            };
            let sent = up.write_all(&self.wbuf).await;
            if sent.is_err() {
                if reused && replayable {
                    fresh_for = Some(addr);
                    continue;
                }
                return self.fail(io, shared, p, ex, Fail::Upstream).await;
            }
            if !body_done {
                let streamed = self.stream_body(io, &mut up, p.framing, left, &mut chunked, s, &mut ex).await;
                if let Err(f) = streamed {
                    return self.fail(io, shared, p, ex, f).await;
                }
            }
            match self.read_response_head(&mut up, s, p, keep).await {
                Ok(head) => break (up, addr, head, flight),
                Err(Fail::Upstream) if reused && replayable => {
                    // The pooled connection was closed under us before it answered: nothing was processed.
                    fresh_for = Some(addr);
                }
                Err(f) => return self.fail(io, shared, p, ex, f).await,
            }
        };
        ex.status = resp.status;
        // The client's response head is in `wbuf` now (written as the upstream's was parsed); then the body.
        let (client_keep, dechunk) = client_framing(&resp, p, keep);
        self.ubuf.advance(resp.head_len);

        if resp.status == 101 {
            // WebSocket: the rest of the connection is a tunnel between the two.
            self.wbuf.extend_from_slice(&self.ubuf);
            self.ubuf.clear();
            if write_out(io, &self.wbuf).await.is_err() {
                ex.error = Some("client went away");
                return ex;
            }
            if !self.rbuf.is_empty() && up.write_all(&self.rbuf).await.is_err() {
                ex.error = Some("upstream went away");
                return ex;
            }
            self.rbuf.clear();
            match tokio::io::copy_bidirectional(io, &mut up).await {
                Ok((a, b)) => {
                    ex.body_in += a;
                    ex.body_out = b;
                }
                Err(_) => ex.error = Some("tunnel ended with an error"),
            }
            return ex;
        }

        let mut rchunk = Chunked::default();
        let mut rleft = 0u64;
        let mut done = true;
        match resp.framing {
            Framing::None => {}
            Framing::Length(n) => {
                let k = move_up_to(&mut self.ubuf, &mut self.wbuf, n);
                rleft = n - k;
                ex.body_out = k;
                done = rleft == 0;
            }
            Framing::Chunked => match self.pass_chunks(&mut rchunk, dechunk) {
                Ok(()) => done = rchunk.done(),
                Err(()) => return self.fail(io, shared, p, ex, Fail::BadResponse).await,
            },
            Framing::Close => {
                self.wbuf.extend_from_slice(&self.ubuf);
                ex.body_out = self.ubuf.len() as u64;
                self.ubuf.clear();
                done = false;
            }
        }
        if write_out(io, &self.wbuf).await.is_err() {
            ex.error = Some("client went away");
            return ex;
        }
        while !done {
            self.ubuf.clear();
            self.ubuf.reserve(READ_CHUNK);
            let n = match tokio::time::timeout(s.upstream_timeout, up.read_buf(&mut self.ubuf)).await {
                Ok(Ok(n)) => n,
                Ok(Err(_)) | Err(_) => 0,
            };
            if n == 0 {
                if resp.framing == Framing::Close {
                    break;
                }
                // The upstream broke off mid-body: the client cannot get a whole response.
                shared.metrics.upstream_failure(&cluster.name, "proxy");
                ex.error = Some("upstream closed mid-body");
                return ex;
            }
            self.wbuf.clear();
            match resp.framing {
                Framing::Length(_) => {
                    let k = (n as u64).min(rleft) as usize;
                    rleft -= k as u64;
                    ex.body_out += k as u64;
                    done = rleft == 0;
                    if write_out(io, &self.ubuf[..k]).await.is_err() {
                        ex.error = Some("client went away");
                        return ex;
                    }
                    self.ubuf.advance(k);
                    continue;
                }
                Framing::Chunked => {
                    let before = rchunk.data_len;
                    if self.pass_chunks(&mut rchunk, dechunk).is_err() {
                        ex.error = Some("malformed chunked response");
                        return ex;
                    }
                    ex.body_out += rchunk.data_len - before;
                    done = rchunk.done();
                }
                _ => {
                    ex.body_out += n as u64;
                    self.wbuf.extend_from_slice(&self.ubuf);
                    self.ubuf.clear();
                }
            }
            if write_out(io, &self.wbuf).await.is_err() {
                ex.error = Some("client went away");
                return ex;
            }
        }
        let _ = endpoint;
        if resp.reusable && self.ubuf.is_empty() {
            crate::pool::checkin(endpoint, up);
        }
        ex.keep = client_keep;
        ex
    }

    /// Moves what `ubuf` holds of a chunked body into `wbuf` (as is, or only its data for HTTP/1.0).
    fn pass_chunks(&mut self, c: &mut Chunked, dechunk: bool) -> Result<(), ()> {
        let w = &mut self.wbuf;
        let k = if dechunk {
            c.feed(&self.ubuf, |d| w.extend_from_slice(d))
        } else {
            c.feed(&self.ubuf, |_| {}).inspect(|k| w.extend_from_slice(&self.ubuf[..*k]))
        }
        .map_err(|_| ())?;
        self.ubuf.advance(k);
        Ok(())
    }

    /// Sends the rest of a request body from the client to the upstream.
    #[allow(clippy::too_many_arguments)]
    async fn stream_body<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        up: &mut TcpStream,
        framing: Framing,
        mut left: u64,
        chunked: &mut Chunked,
        s: &Settings,
        ex: &mut Exchange,
    ) -> Result<(), Fail> {
        let deadline = tokio::time::Instant::now() + s.request_timeout;
        loop {
            self.rbuf.reserve(READ_CHUNK);
            let read =
                tokio::time::timeout_at(deadline, tokio::time::timeout(s.body_timeout, io.read_buf(&mut self.rbuf)));
            match read.await {
                Ok(Ok(Ok(n))) if n > 0 => {}
                Ok(Ok(_)) => return Err(Fail::ClientGone),
                Ok(Err(_)) => return Err(Fail::Client(408, "request body timed out (idle)")),
                Err(_) => return Err(Fail::Client(408, "request body took too long")),
            }
            let (k, done) = match framing {
                Framing::Length(_) => {
                    let k = (self.rbuf.len() as u64).min(left) as usize;
                    left -= k as u64;
                    ex.body_in += k as u64;
                    (k, left == 0)
                }
                _ => {
                    let k =
                        chunked.feed(&self.rbuf, |_| {}).map_err(|_| Fail::Client(400, "malformed chunked body"))?;
                    ex.body_in = chunked.data_len;
                    if chunked.data_len > s.max_body_bytes {
                        return Err(Fail::Client(413, "request body too large"));
                    }
                    (k, chunked.done())
                }
            };
            if up.write_all(&self.rbuf[..k]).await.is_err() {
                return Err(Fail::Upstream);
            }
            self.rbuf.advance(k);
            if done {
                return Ok(());
            }
        }
    }

    /// Reads the upstream's response head into `ubuf` (skipping interim 1xx other than 101) and, from the same
    /// parse, writes the client's response head into `wbuf`.
    async fn read_response_head(
        &mut self,
        up: &mut TcpStream,
        s: &Settings,
        p: &Prepared,
        keep: bool,
    ) -> Result<ResponseHead, Fail> {
        self.ubuf.clear();
        let deadline = tokio::time::Instant::now() + s.upstream_timeout;
        let mut got_any = false;
        loop {
            if !self.ubuf.is_empty() {
                let wbuf = &mut self.wbuf;
                let parsed = parse_response_with(&self.ubuf, p.head, |head, r| {
                    if head.status == 101 && !p.websocket {
                        return false;
                    }
                    let (keep, dechunk) = client_framing(head, p, keep);
                    wbuf.clear();
                    write_client_head(wbuf, r, head, p, keep, dechunk);
                    true
                });
                match parsed {
                    Ok(Some((h, None))) => {
                        // Interim 1xx: skipped.
                        self.ubuf.advance(h.head_len);
                        continue;
                    }
                    Ok(Some((_, Some(false)))) => return Err(Fail::BadResponse),
                    Ok(Some((h, Some(true)))) => return Ok(h),
                    Ok(None) if self.ubuf.len() > MAX_RESPONSE_HEAD => return Err(Fail::BadResponse),
                    Ok(None) => {}
                    Err(()) => return Err(Fail::BadResponse),
                }
            }
            self.ubuf.reserve(READ_CHUNK);
            match tokio::time::timeout_at(deadline, up.read_buf(&mut self.ubuf)).await {
                Ok(Ok(n)) if n > 0 => got_any = true,
                Ok(_) if got_any => return Err(Fail::BadResponse),
                Ok(_) => return Err(Fail::Upstream),
                Err(_) => return Err(Fail::Timeout),
            }
        }
    }

    /// Answers a request that could not be proxied, when nothing of a response has been sent yet, and ends the
    /// connection.
    async fn fail<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        shared: &Shared,
        p: &Prepared,
        mut ex: Exchange,
        f: Fail,
    ) -> Exchange {
        let (status, why): (u16, &'static str) = match f {
            Fail::NoEndpoint => (503, "no endpoint is available for this backend"),
            Fail::Connect => (502, "no endpoint accepted the connection"),
            Fail::Upstream => (502, "the upstream closed the connection before answering"),
            Fail::Timeout => (504, "the upstream did not answer in time"),
            Fail::BadResponse => (502, "the upstream's response is malformed"),
            Fail::Client(status, why) => (status, why),
            Fail::ClientGone => {
                ex.error = Some("client went away mid-body");
                ex.status = 0;
                return ex;
            }
        };
        if matches!(f, Fail::Upstream | Fail::Timeout | Fail::BadResponse)
            && let Outcome::Proxy(c) = &p.routed.outcome
        {
            shared.metrics.upstream_failure(&c.name, "proxy");
        }
        self.wbuf.clear();
        let body = format!("{status} {why}\n");
        self.answer(status, body.as_bytes(), None, &[], true, Some(&p.request_id), p.http10);
        let _ = write_out(io, &self.wbuf).await;
        ex.status = status;
        ex.error = Some(why);
        ex.keep = false;
        ex
    }
}

/// Whether the client connection stays open after this response, and whether a chunked body must be decoded
/// for it (an HTTP/1.0 client cannot receive chunked; then the connection closes at the body's end).
fn client_framing(resp: &ResponseHead, p: &Prepared, keep: bool) -> (bool, bool) {
    let dechunk = p.http10 && resp.framing == Framing::Chunked;
    (keep && resp.framing != Framing::Close && !dechunk, dechunk)
}

/// Writes the client's response head for the upstream's `r` into `w`.
fn write_client_head(
    w: &mut Vec<u8>,
    r: &httparse::Response<'_, '_>,
    resp: &ResponseHead,
    p: &Prepared,
    keep: bool,
    dechunk: bool,
) {
    w.extend_from_slice(b"HTTP/1.1 ");
    push_u64(w, u64::from(resp.status));
    w.push(b' ');
    w.extend_from_slice(r.reason.unwrap_or("").as_bytes());
    w.extend_from_slice(b"\r\n");
    let mut named: [&[u8]; 8] = [b""; 8];
    let mut n_named = 0;
    for h in r.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("connection")) {
        for t in codec::tokens(h.value) {
            if n_named < named.len() && !t.eq_ignore_ascii_case(b"close") && !t.eq_ignore_ascii_case(b"keep-alive") {
                named[n_named] = t;
                n_named += 1;
            }
        }
    }
    let mut server = false;
    for h in r.headers.iter() {
        let name = h.name.as_bytes();
        if resp.status == 101 && (name.eq_ignore_ascii_case(b"upgrade") || name.eq_ignore_ascii_case(b"connection")) {
            header(w, name, h.value);
            continue;
        }
        if proxy::hop_by_hop(name)
            || name.eq_ignore_ascii_case(b"content-length")
            || name.eq_ignore_ascii_case(b"x-request-id")
            || named[..n_named].iter().any(|n| n.eq_ignore_ascii_case(name))
        {
            continue;
        }
        server |= name.eq_ignore_ascii_case(b"server");
        header(w, name, h.value);
    }
    if !server {
        header(w, b"Server", SERVER.as_bytes());
    }
    header(w, b"X-Request-Id", p.request_id.as_str().as_bytes());
    match resp.framing {
        Framing::Length(n) => {
            w.extend_from_slice(b"Content-Length: ");
            push_u64(w, n);
            w.extend_from_slice(b"\r\n");
        }
        Framing::None if p.head => {
            // A HEAD response keeps the length the upstream announced.
            if let Some(h) = r.headers.iter().find(|h| h.name.eq_ignore_ascii_case("content-length")) {
                header(w, b"Content-Length", h.value);
            }
        }
        Framing::Chunked if !dechunk => w.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        _ => {}
    }
    if resp.status != 101 {
        if !keep {
            w.extend_from_slice(b"Connection: close\r\n");
        } else if p.http10 {
            w.extend_from_slice(b"Connection: keep-alive\r\n");
        }
    }
    w.extend_from_slice(b"\r\n");
}

/// Moves up to `n` bytes from the front of `from` to the end of `to` (the part of a body that arrived with its
/// head goes out with the next head); returns how many.
fn move_up_to(from: &mut BytesMut, to: &mut Vec<u8>, n: u64) -> u64 {
    let k = (from.len() as u64).min(n) as usize;
    to.extend_from_slice(&from[..k]);
    from.advance(k);
    k as u64
}

/// Appends a number in decimal, without the formatting machinery.
pub(crate) fn push_u64(w: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    w.extend_from_slice(&digits[i..]);
}

/// Parses a response head: `Ok(None)` while incomplete. `head`: the request was HEAD (no body follows).
pub(crate) fn parse_response(buf: &[u8], head: bool) -> Result<Option<ResponseHead>, ()> {
    Ok(parse_response_with(buf, head, |_, _| ())?.map(|(h, _)| h))
}

/// Parses a response head and, when it is a final one (or 101), hands it with its parsed headers to `f`: one
/// parse serves both the framing decision and the rewriting. Interim 1xx give `(head, None)`.
pub(crate) fn parse_response_with<T>(
    buf: &[u8],
    head: bool,
    f: impl FnOnce(&ResponseHead, &httparse::Response<'_, '_>) -> T,
) -> Result<Option<(ResponseHead, Option<T>)>, ()> {
    let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
    let mut r = httparse::Response::new(&mut slots);
    let head_len = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let status = r.code.ok_or(())?;
    let http11 = r.version == Some(1);
    let mut length: Option<u64> = None;
    let mut te_chunked = false;
    let mut te = false;
    let mut close = !http11;
    for h in r.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            match codec::content_length(h.value) {
                Some(n) if length.is_none_or(|l| l == n) => length = Some(n),
                _ => return Err(()),
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            te = true;
            te_chunked = codec::tokens(h.value).last().is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            for t in codec::tokens(h.value) {
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") && !http11 {
                    close = false;
                }
            }
        }
    }
    let framing = if head || (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::None
    } else if te {
        if te_chunked { Framing::Chunked } else { Framing::Close }
    } else {
        match length {
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    let reusable = !close && framing != Framing::Close && status != 101;
    let meta = ResponseHead { head_len, status, framing, reusable };
    let out = (status >= 200 || status == 101).then(|| f(&meta, &r));
    Ok(Some((meta, out)))
}

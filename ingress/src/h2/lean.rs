//! HTTP/1.1 upstream for the HTTP/2 path, on the same raw connection pool as the HTTP/1 path
//! ([`crate::pool::checkout`]): the request head is written from the request's header map, the response head
//! parsed in place with `httparse`, and the response body read straight from the upstream socket as the client's
//! HTTP/2 stream asks for it ([`UpstreamBody`]), so no extra task or channel sits between the two. The
//! connection goes back to the pool when its response body has been read to the end.

use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Failed, RespBody};
use crate::codec::{self, Chunked};
use crate::h1::{self, Framing, HEADER_SLOTS, MAX_RESPONSE_HEAD, READ_CHUNK};
use crate::pool::{self, UpBody};
use crate::proxy::{self, Settings};
use crate::upstream::{EndpointStats, InFlight};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Sends `req` to `addr` over HTTP/1.1 and returns the response with a body that streams from the upstream.
pub(crate) async fn exchange(
    req: Request<UpBody>,
    addr: SocketAddr,
    authority: &str,
    stats: &Arc<EndpointStats>,
    s: &Settings,
) -> Result<Response<RespBody>, Failed> {
    let head_method = req.method() == http::Method::HEAD;
    // The request head, from the (already rewritten) header map.
    let mut out = Vec::with_capacity(512);
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let _ = write!(out, "{} {pq} HTTP/1.1\r\n", req.method());
    if !req.headers().contains_key(http::header::HOST) {
        h1::header(&mut out, b"Host", authority.as_bytes());
    }
    let mut length = None;
    for (k, v) in req.headers() {
        if k == http::header::CONTENT_LENGTH {
            length = codec::content_length(v.as_bytes());
            continue;
        }
        h1::header(&mut out, k.as_str().as_bytes(), v.as_bytes());
    }
    let empty = req.body().is_end_stream();
    let chunked = match (empty, length) {
        (_, Some(n)) => {
            let _ = write!(out, "Content-Length: {n}\r\n");
            false
        }
        (true, None) => false,
        (false, None) => {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
            true
        }
    };
    out.extend_from_slice(b"\r\n");

    // A pooled connection, else a new one; a pooled one that turns out closed is replaced once, when nothing
    // but the head had to be sent.
    let (mut up, mut reused) = match pool::checkout(addr, s.upstream_idle) {
        Some(u) => (u, true),
        None => match pool::connect(addr, s.connect_timeout).await {
            Ok(u) => {
                stats.connected();
                (u, false)
            }
            Err(e) => return Err(Failed::Connect(e.to_string(), Box::new(req))),
        },
    };
    let flight = InFlight::new(stats);
    let mut body = req.into_body();
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let head = loop {
        if up.write_all(&out).await.is_err() {
            if reused && empty {
                up = fresh(addr, s, stats).await?;
                reused = false;
                continue;
            }
            return Err(Failed::Other(502, "the upstream closed the connection before answering"));
        }
        if !empty {
            send_body(&mut up, &mut body, chunked, s.max_body_bytes).await?;
        }
        match read_head(&mut up, &mut buf, head_method, s).await {
            Ok(h) => break h,
            Err(Failed::Other(502, _)) if reused && empty && buf.is_empty() => {
                up = fresh(addr, s, stats).await?;
                reused = false;
            }
            Err(e) => return Err(e),
        }
    };

    // The response head, as a header map.
    let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
    let mut r = httparse::Response::new(&mut slots);
    if !matches!(r.parse(&buf), Ok(httparse::Status::Complete(_))) {
        return Err(Failed::Other(502, "the upstream's response is malformed"));
    }
    let mut resp = Response::new(());
    *resp.status_mut() = StatusCode::from_u16(head.status).map_err(|_| Failed::Other(502, "bad upstream status"))?;
    let named: Vec<&[u8]> = r
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| codec::tokens(h.value))
        .collect();
    let map: &mut HeaderMap = resp.headers_mut();
    for h in r.headers.iter() {
        let name = h.name.as_bytes();
        if proxy::hop_by_hop(name)
            || name.eq_ignore_ascii_case(b"content-length")
            || named.iter().any(|n| n.eq_ignore_ascii_case(name))
        {
            continue;
        }
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(h.value)) {
            map.append(k, v);
        }
    }
    match head.framing {
        Framing::Length(n) => {
            map.insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        Framing::None if head_method => {
            if let Some(v) = r.headers.iter().find(|h| h.name.eq_ignore_ascii_case("content-length"))
                && let Ok(v) = HeaderValue::from_bytes(v.value)
            {
                map.insert(http::header::CONTENT_LENGTH, v);
            }
        }
        _ => {}
    }
    buf.advance(head.head_len);

    let body: RespBody = match head.framing {
        Framing::None | Framing::Length(0) => {
            if head.reusable && buf.is_empty() {
                pool::checkin(addr, up);
            }
            Empty::new().map_err(|e| match e {}).boxed_unsync()
        }
        Framing::Length(n) if buf.len() as u64 >= n => {
            // The whole body is here already (small responses): the connection is free at once.
            let data = buf.split_to(n as usize).freeze();
            if head.reusable && buf.is_empty() {
                pool::checkin(addr, up);
            }
            Full::new(data).map_err(|e| match e {}).boxed_unsync()
        }
        framing => {
            let left = if let Framing::Length(n) = framing { n } else { 0 };
            UpstreamBody {
                io: Some(up),
                buf,
                framing,
                left,
                chunked: Chunked::default(),
                addr,
                reusable: head.reusable,
                _flight: flight,
            }
            .boxed_unsync()
        }
    };
    let (parts, ()) = resp.into_parts();
    Ok(Response::from_parts(parts, body))
}

async fn fresh(addr: SocketAddr, s: &Settings, stats: &Arc<EndpointStats>) -> Result<TcpStream, Failed> {
    match pool::connect(addr, s.connect_timeout).await {
        Ok(u) => {
            stats.connected();
            Ok(u)
        }
        Err(_) => Err(Failed::Other(502, "no endpoint accepted the connection")),
    }
}

/// Streams the request body (its data frames; trailers have no HTTP/1.1 form here and are dropped).
async fn send_body(up: &mut TcpStream, body: &mut UpBody, chunked: bool, max: u64) -> Result<(), Failed> {
    let mut sent = 0u64;
    let mut line = Vec::with_capacity(16);
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(Failed::Other(413, "request body too large"));
            }
            Err(_) => return Err(Failed::Other(400, "the request body was aborted")),
        };
        let Ok(data) = frame.into_data() else { continue };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        if sent > max {
            return Err(Failed::Other(413, "request body too large"));
        }
        let w = if chunked {
            line.clear();
            let _ = write!(line, "{:x}\r\n", data.len());
            let r = up.write_all(&line).await;
            r.and(up.write_all(&data).await).and(up.write_all(b"\r\n").await)
        } else {
            up.write_all(&data).await
        };
        if w.is_err() {
            return Err(Failed::Other(502, "the upstream closed the connection during the request body"));
        }
    }
    if chunked && up.write_all(b"0\r\n\r\n").await.is_err() {
        return Err(Failed::Other(502, "the upstream closed the connection during the request body"));
    }
    Ok(())
}

/// Reads a response head into `buf` (interim 1xx skipped).
async fn read_head(
    up: &mut TcpStream,
    buf: &mut BytesMut,
    head: bool,
    s: &Settings,
) -> Result<h1::ResponseHead, Failed> {
    let deadline = tokio::time::Instant::now() + s.upstream_timeout;
    let malformed = Failed::Other(502, "the upstream's response is malformed");
    loop {
        if !buf.is_empty() {
            match h1::parse_response(buf, head) {
                Ok(Some(h)) if h.status == 101 => return Err(Failed::Other(502, "the upstream switched protocols")),
                Ok(Some(h)) if h.status < 200 => {
                    buf.advance(h.head_len);
                    continue;
                }
                Ok(Some(h)) => return Ok(h),
                Ok(None) if buf.len() > MAX_RESPONSE_HEAD => return Err(malformed),
                Ok(None) => {}
                Err(()) => return Err(malformed),
            }
        }
        buf.reserve(READ_CHUNK);
        match tokio::time::timeout_at(deadline, up.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) if !buf.is_empty() => return Err(malformed),
            Ok(_) => return Err(Failed::Other(502, "the upstream closed the connection before answering")),
            Err(_) => return Err(Failed::Other(504, "the upstream did not answer in time")),
        }
    }
}

/// A response body read from the upstream connection as the client asks for it; the connection goes back to
/// the worker's pool at the end when it can carry another request.
struct UpstreamBody {
    io: Option<TcpStream>,
    buf: BytesMut,
    framing: Framing,
    left: u64,
    chunked: Chunked,
    addr: SocketAddr,
    reusable: bool,
    _flight: InFlight,
}

impl UpstreamBody {
    fn finish(&mut self) {
        if let Some(io) = self.io.take()
            && self.reusable
            && self.buf.is_empty()
        {
            pool::checkin(self.addr, io);
        }
    }
}

fn broken(what: &'static str) -> BoxError {
    Box::new(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, what))
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            match this.framing {
                Framing::Length(_) => {
                    if this.left == 0 {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    if !this.buf.is_empty() {
                        let k = (this.buf.len() as u64).min(this.left) as usize;
                        this.left -= k as u64;
                        let data = this.buf.split_to(k).freeze();
                        if this.left == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::Chunked => {
                    if this.chunked.done() {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    if !this.buf.is_empty() {
                        let mut data = BytesMut::new();
                        let k = match this.chunked.feed(&this.buf, |d| data.extend_from_slice(d)) {
                            Ok(k) => k,
                            Err(_) => {
                                this.io = None;
                                return Poll::Ready(Some(Err(broken("malformed chunked response"))));
                            }
                        };
                        this.buf.advance(k);
                        if !data.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(data.freeze()))));
                        }
                        continue;
                    }
                }
                Framing::Close => {
                    if !this.buf.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(this.buf.split().freeze()))));
                    }
                }
                Framing::None => return Poll::Ready(None),
            }
            let Some(io) = this.io.as_mut() else { return Poll::Ready(None) };
            match io.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    this.io = None;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Poll::Ready(Ok(())) => {}
            }
            this.buf.reserve(READ_CHUNK);
            match io.try_read_buf(&mut this.buf) {
                Ok(0) => {
                    this.io = None;
                    if this.framing == Framing::Close {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(broken("the upstream closed mid-body"))));
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    this.io = None;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self.framing {
            Framing::Length(_) => self.left == 0,
            Framing::Chunked => self.chunked.done(),
            Framing::Close => self.io.is_none() && self.buf.is_empty(),
            Framing::None => true,
        }
    }
}

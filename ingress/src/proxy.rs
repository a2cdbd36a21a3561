//! What both request paths share: the settings, the state the data path reads ([`Shared`]), the routing
//! decision of a request ([`route`]), the forwarding-header trust rule, and the bookkeeping of a finished request
//! (metrics and the access log, [`finish`]).
//!
//! The request paths themselves: [`crate::h1`] (HTTP/1.x, our own lean path) and [`crate::h2`] (HTTP/2 on
//! hyper). Rules both enforce:
//! - **Forwarding headers**: `X-Forwarded-For` gets the client address appended (the rightmost entry is always
//!   ours); `X-Forwarded-Proto`, `-Host` and `-Port` are set by us, and a client's own `Forwarded`,
//!   `X-Real-IP` and `True-Client-IP` are dropped, unless the peer is in [`Settings::trusted_proxies`] (a load
//!   balancer in front that sets them itself): then its values pass. `X-Real-IP` is set to the client address.
//!   `X-Request-Id` is kept when the client sent a sane one, else generated, and echoed in the response.
//! - **Hop-by-hop headers** (`Connection` and what it names, `Keep-Alive`, `Proxy-Connection`, `TE` other than
//!   `trailers`, `Upgrade` outside a WebSocket upgrade, `HTTP2-Settings`) are not forwarded either way.
//! - **Every response has a `Server` header**: the upstream's when it sent one, else [`SERVER`].
//! - **Retries**: only when a connection to the endpoint could not be made (nothing was sent), on another
//!   endpoint, up to [`Settings::connect_attempts`] endpoints in all.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;

use crate::metrics::{IngressMetrics, LatencyLabels, RequestLabels};
use crate::routes::{Action, Route};
use crate::table::Table;
use crate::tls::SniResolver;
use crate::upstream::Cluster;

/// The body of the 404 a request gets when no rule matches (the same text `mesh-control` puts in its routes).
pub use xds_proto::names::NOT_FOUND_BODY;

/// The `Server` header of our own answers, and of proxied responses whose upstream sent none.
pub const SERVER: &str = "mesh";

/// Data-path settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long one connect attempt may take.
    pub connect_timeout: Duration,
    /// How many endpoints a request tries when connecting fails.
    pub connect_attempts: usize,
    /// The largest request header section (request line and headers), in bytes (larger: 431).
    pub max_header_bytes: usize,
    /// The longest request line, in bytes (longer: 414).
    pub max_request_line: usize,
    /// The most request headers (more: 431).
    pub max_headers: usize,
    /// The largest request body, in bytes.
    pub max_body_bytes: u64,
    /// How long a client may take to send a request's headers (slowloris).
    pub header_timeout: Duration,
    /// How long a read of the request body may wait for data (idle between reads).
    pub body_timeout: Duration,
    /// How long the whole request body may take to arrive (a body trickled a byte at a time).
    pub request_timeout: Duration,
    /// How long the upstream may take to start its response once the request is sent.
    pub upstream_timeout: Duration,
    /// How long an idle keep-alive client connection stays open, in seconds.
    pub keepalive_s: u64,
    /// How long an idle upstream connection stays in the pool.
    pub upstream_idle: Duration,
    /// One structured log line per request (target `access`).
    pub access_log: bool,
    /// Peers whose `X-Forwarded-*`, `Forwarded`, `X-Real-IP` and `True-Client-IP` are believed.
    pub trusted_proxies: Vec<Cidr>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            connect_timeout: Duration::from_secs(5),
            connect_attempts: 3,
            max_header_bytes: 64 * 1024,
            max_request_line: 8 * 1024,
            max_headers: 100,
            max_body_bytes: 8 * 1024 * 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            upstream_timeout: Duration::from_secs(60),
            keepalive_s: 60,
            upstream_idle: Duration::from_secs(60),
            access_log: false,
            trusted_proxies: Vec::new(),
        }
    }
}

/// An IP network (`10.0.0.0/8`, `2001:db8::/32`, or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

/// Why a CIDR does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP address or CIDR (like 10.0.0.0/8)")]
pub struct CidrError(String);

impl std::str::FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CidrError(s.to_owned());
        let (ip, bits) = match s.trim().split_once('/') {
            Some((ip, bits)) => (ip, Some(bits.parse::<u8>().map_err(|_| bad())?)),
            None => (s.trim(), None),
        };
        let net: IpAddr = ip.parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = bits.unwrap_or(max);
        if bits > max {
            return Err(bad());
        }
        Ok(Cidr { net, bits })
    }
}

impl Cidr {
    /// Whether `ip` is in the network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.bits)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
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

    /// Whether the peer's forwarding headers are believed.
    pub fn trusted(&self, peer: IpAddr) -> bool {
        self.settings.trusted_proxies.iter().any(|c| c.contains(peer))
    }
}

/// A request id: 32 hex digits, made without allocating.
#[derive(Clone, Copy)]
pub struct RequestId {
    buf: [u8; 128],
    len: u8,
}

impl std::fmt::Debug for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl RequestId {
    /// The client's id when it is sane (short, visible ASCII), else a new random one.
    pub fn from_client(v: Option<&[u8]>) -> RequestId {
        match v {
            Some(v) if sane_request_id(v) => {
                let mut buf = [0u8; 128];
                buf[..v.len()].copy_from_slice(v);
                RequestId { buf, len: v.len() as u8 }
            }
            _ => RequestId::random(),
        }
    }

    /// A new random id.
    pub fn random() -> RequestId {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut buf = [0u8; 128];
        let (a, b) = (fastrand::u64(..), fastrand::u64(..));
        for i in 0..16 {
            buf[i] = HEX[(a >> (60 - 4 * i) & 0xf) as usize];
            buf[16 + i] = HEX[(b >> (60 - 4 * i) & 0xf) as usize];
        }
        RequestId { buf, len: 32 }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        // Only visible ASCII is ever stored.
        std::str::from_utf8(&self.buf[..usize::from(self.len)]).unwrap_or("-")
    }
}

/// A request id a client may hand us: short, visible ASCII.
fn sane_request_id(v: &[u8]) -> bool {
    !v.is_empty() && v.len() <= 128 && v.iter().all(|b| b.is_ascii_graphic())
}

/// Where a request goes, decided once from the table.
#[derive(Debug)]
pub struct Routed {
    /// The virtual host that matched (`-` when none did): a metric label bounded by configuration.
    pub vhost: Arc<str>,
    /// The route that matched.
    pub route: Option<Arc<Route>>,
    /// What to do.
    pub outcome: Outcome,
}

/// What a routed request gets.
#[derive(Debug)]
pub enum Outcome {
    /// An answer of ours.
    Answer {
        /// The status.
        status: u16,
        /// The body.
        body: Bytes,
        /// A redirect's `Location`.
        location: Option<String>,
    },
    /// Proxy to an endpoint of this cluster.
    Proxy(Arc<Cluster>),
}

/// Routes a request by authority and (normalised) path through `table`.
pub fn route(table: &Table, tls: bool, authority: &str, path: &str, query: Option<&str>) -> Routed {
    let routes = if tls { &table.https } else { &table.http };
    let Some((vhost, route)) = routes.find(authority, path) else {
        return Routed {
            vhost: crate::metrics::none(),
            route: None,
            outcome: Outcome::Answer {
                status: 404,
                body: Bytes::from_static(NOT_FOUND_BODY.as_bytes()),
                location: None,
            },
        };
    };
    let outcome = match &route.action {
        Action::Direct { status, body } => Outcome::Answer { status: *status, body: body.clone(), location: None },
        Action::RedirectHttps { status } => {
            let host = crate::routes::host_key(authority);
            let host = if host.contains(':') { format!("[{host}]") } else { host.into_owned() };
            let location = match query {
                Some(q) => format!("https://{host}{path}?{q}"),
                None => format!("https://{host}{path}"),
            };
            Outcome::Answer { status: *status, body: Bytes::new(), location: Some(location) }
        }
        Action::Cluster(name) => match table.clusters.get(&**name) {
            Some(c) => Outcome::Proxy(c.clone()),
            None => Outcome::Answer {
                status: 503,
                body: Bytes::from(format!("503 service unavailable: cluster {name} is not known\n")),
                location: None,
            },
        },
    };
    Routed { vhost: vhost.name.clone(), route: Some(route.clone()), outcome }
}

/// One finished request, for metrics and the access log.
#[derive(Debug)]
pub struct Done<'a> {
    /// `http` or `https`.
    pub listener: &'static str,
    /// The client.
    pub client: SocketAddr,
    /// The method.
    pub method: &'a str,
    /// The authority.
    pub authority: &'a str,
    /// The path (as routed).
    pub path: &'a str,
    /// `HTTP/1.1`, `HTTP/2`, ...
    pub version: &'static str,
    /// The routing decision (absent when the request was refused before routing).
    pub routed: Option<&'a Routed>,
    /// The status sent (0: none).
    pub status: u16,
    /// The endpoint last tried.
    pub endpoint: Option<SocketAddr>,
    /// Endpoints tried.
    pub attempts: usize,
    /// Request body bytes read.
    pub body_in: u64,
    /// Response body bytes sent.
    pub body_out: u64,
    /// The request id.
    pub request_id: &'a str,
    /// When the request began.
    pub start: Instant,
    /// What went wrong, if anything.
    pub error: Option<&'a str>,
}

/// Counts a finished request and writes its access-log line.
pub fn finish(shared: &Shared, d: &Done<'_>) {
    let m = &shared.metrics;
    let (vhost, route, upstream) = match d.routed {
        Some(r) => (
            r.vhost.clone(),
            r.route.as_ref().map_or_else(crate::metrics::none, |r| r.label.clone()),
            match &r.outcome {
                Outcome::Proxy(c) => c.name.clone(),
                Outcome::Answer { .. } => crate::metrics::none(),
            },
        ),
        None => (crate::metrics::none(), crate::metrics::none(), crate::metrics::none()),
    };
    if d.error.is_some() && d.status >= 500 && &*upstream != "-" {
        m.upstream_failure(&upstream, "proxy");
    }
    let elapsed = d.start.elapsed();
    m.latency
        .get_or_create(&LatencyLabels { listener: d.listener, host: vhost.clone() })
        .observe(elapsed.as_secs_f64());
    if shared.settings.access_log {
        tracing::info!(
            target: "access",
            client = %d.client,
            method = d.method,
            authority = d.authority,
            path = d.path,
            version = d.version,
            status = d.status,
            listener = d.listener,
            vhost = %vhost,
            route = &*route,
            upstream = &*upstream,
            endpoint = ?d.endpoint,
            attempts = d.attempts,
            body_in = d.body_in,
            body_out = d.body_out,
            duration_us = elapsed.as_micros() as u64,
            request_id = d.request_id,
            error = d.error,
            "request"
        );
    }
    m.requests
        .get_or_create(&RequestLabels { listener: d.listener, host: vhost, route, status: d.status, upstream })
        .inc();
}

/// Header names a proxy never forwards as they are (RFC 9110 §7.6.1, plus the h2c upgrade's settings).
pub fn hop_by_hop(name: &[u8]) -> bool {
    const HOP: [&[u8]; 9] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"http2-settings",
        b"proxy-authenticate",
    ];
    HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// Headers we set ourselves on the way upstream (a client's values are replaced), and those we drop from
/// untrusted clients.
pub fn forwarding(name: &[u8]) -> bool {
    const OURS: [&[u8]; 8] = [
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-request-id",
        b"forwarded",
        b"x-real-ip",
        b"true-client-ip",
    ];
    OURS.iter().any(|h| h.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids() {
        assert_eq!(RequestId::from_client(Some(b"abc-123")).as_str(), "abc-123");
        assert_eq!(RequestId::from_client(Some(b"")).as_str().len(), 32);
        assert_eq!(RequestId::from_client(Some(b"has space")).as_str().len(), 32);
        assert_eq!(RequestId::from_client(Some(&[b'a'; 129])).as_str().len(), 32);
        let a = RequestId::random();
        assert!(a.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a.as_str(), RequestId::random().as_str());
    }

    #[test]
    fn cidrs() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.2.3".parse().unwrap()), "IPv4-mapped");
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        let one: Cidr = "192.0.2.7".parse().unwrap();
        assert!(one.contains("192.0.2.7".parse().unwrap()) && !one.contains("192.0.2.8".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.1".parse().unwrap()));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8::1".parse().unwrap()) && !v6.contains("2001:db9::1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "x", "10.0.0.0/a", "::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}

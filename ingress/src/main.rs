//! `mesh-ingress`: the ingress proxy (a Deployment): TLS by SNI and Host/path routing per the Kubernetes Ingress
//! API.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use mesh_ingress::app;
use mesh_ingress::proxy::Settings;
use mesh_runtime::dataplane::SourceArgs;
use mesh_runtime::shutdown;
use mesh_runtime::telemetry::LogArgs;

/// The mesh ingress proxy: HTTP and HTTPS from users to the Pods of Ingress backends.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    source: SourceArgs,
    /// The IngressClass to serve (its spec.controller must be mesh.dev/ingress-controller).
    #[arg(long, env = "MESH_INGRESS_CLASS", default_value = xds_proto::DEFAULT_INGRESS_CLASS)]
    ingress_class: String,
    /// This instance's name over xDS (node.id): the pod name. Unset: POD_NAME (the downward API, as in
    /// deploy/), else `mesh-ingress`.
    #[arg(long, env = "MESH_NODE")]
    node: Option<String>,
    /// Where to serve plain HTTP.
    #[arg(long, env = "MESH_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Where to serve HTTPS.
    #[arg(long, env = "MESH_HTTPS_ADDR", default_value = "0.0.0.0:8443")]
    https_addr: SocketAddr,
    /// More addresses serving plain HTTP with the same routes (repeat the flag, or comma-separate).
    #[arg(long, env = "MESH_EXTRA_HTTP_ADDR", value_delimiter = ',')]
    extra_http_addr: Vec<SocketAddr>,
    /// Where to serve the admin endpoints (/ready, /metrics, /config_dump, /logging); loopback only.
    #[arg(long, env = "MESH_ADMIN_ADDR", default_value = "127.0.0.1:19002")]
    admin_addr: SocketAddr,
    /// Worker threads: each a single-threaded runtime with its own listening sockets (SO_REUSEPORT).
    #[arg(long, env = "MESH_THREADS", default_value_t = std::thread::available_parallelism().map_or(1, |n| n.get()))]
    threads: usize,
    /// TLS sessions kept for resumption (server-side cache; 0: no resumption, every handshake is full).
    #[arg(long, env = "MESH_TLS_SESSION_CACHE", default_value_t = 4096)]
    tls_session_cache: usize,
    /// How long one upstream connect attempt may take, in milliseconds.
    #[arg(long, env = "MESH_CONNECT_TIMEOUT_MS", default_value_t = 5000)]
    connect_timeout_ms: u64,
    /// How many endpoints a request tries when connecting fails.
    #[arg(long, env = "MESH_CONNECT_ATTEMPTS", default_value_t = 3)]
    connect_attempts: usize,
    /// The largest request header section, in bytes (larger: 431).
    #[arg(long, env = "MESH_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    max_header_bytes: usize,
    /// The longest request line, in bytes (longer: 414).
    #[arg(long, env = "MESH_MAX_REQUEST_LINE", default_value_t = 8 * 1024)]
    max_request_line: usize,
    /// The most request headers (more: 431).
    #[arg(long, env = "MESH_MAX_HEADERS", default_value_t = 100)]
    max_headers: usize,
    /// The largest request body, in bytes (larger: 413).
    #[arg(long, env = "MESH_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024)]
    max_body_bytes: u64,
    /// How long a client may take to send its request headers, in milliseconds.
    #[arg(long, env = "MESH_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    header_timeout_ms: u64,
    /// How long a request body may stay idle between reads, in milliseconds (then 408).
    #[arg(long, env = "MESH_BODY_TIMEOUT_MS", default_value_t = 10_000)]
    body_timeout_ms: u64,
    /// How long a whole request body may take to arrive, in milliseconds (then 408).
    #[arg(long, env = "MESH_REQUEST_TIMEOUT_MS", default_value_t = 60_000)]
    request_timeout_ms: u64,
    /// How long an upstream may take to start its response (and between reads of its body), in milliseconds
    /// (then 504).
    #[arg(long, env = "MESH_UPSTREAM_TIMEOUT_MS", default_value_t = 60_000)]
    upstream_timeout_ms: u64,
    /// Peers (CIDRs or addresses, comma-separated) whose X-Forwarded-*, Forwarded, X-Real-IP and
    /// True-Client-IP headers are believed, e.g. the load balancer in front. Default: none.
    #[arg(long, env = "MESH_TRUSTED_PROXIES", value_delimiter = ',')]
    trusted_proxies: Vec<mesh_ingress::proxy::Cidr>,
    /// How long an idle client keep-alive connection stays open, in seconds.
    #[arg(long, env = "MESH_KEEPALIVE_S", default_value_t = 60)]
    keepalive_s: u64,
    /// Log one structured line per request (target "access").
    #[arg(long, env = "MESH_ACCESS_LOG")]
    access_log: bool,
    /// On SIGTERM, how long open connections may take to finish, in seconds.
    #[arg(long, env = "MESH_DRAIN_S", default_value_t = 30)]
    drain_s: u64,
    #[command(flatten)]
    log: LogArgs,
}

// The request path runs on its own worker threads (see `--threads`); this runtime has the admin server, the
// xDS client and the signals.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let logging = args.log.init()?;
    let source = args.source.source()?;
    let cfg = app::Config {
        source,
        node: args
            .node
            .or_else(|| std::env::var("POD_NAME").ok().filter(|n| !n.is_empty()))
            .unwrap_or_else(|| "mesh-ingress".to_owned()),
        ingress_class: args.ingress_class,
        http_addr: args.http_addr,
        https_addr: args.https_addr,
        extra_http_addrs: args.extra_http_addr,
        admin_addr: args.admin_addr,
        threads: args.threads.max(1),
        tls_session_cache: args.tls_session_cache,
        settings: Settings {
            connect_timeout: Duration::from_millis(args.connect_timeout_ms),
            connect_attempts: args.connect_attempts.max(1),
            max_header_bytes: args.max_header_bytes,
            max_request_line: args.max_request_line,
            max_headers: args.max_headers,
            body_timeout: Duration::from_millis(args.body_timeout_ms),
            request_timeout: Duration::from_millis(args.request_timeout_ms),
            upstream_timeout: Duration::from_millis(args.upstream_timeout_ms),
            trusted_proxies: args.trusted_proxies,
            max_body_bytes: args.max_body_bytes,
            header_timeout: Duration::from_millis(args.header_timeout_ms),
            keepalive_s: args.keepalive_s,
            access_log: args.access_log,
            ..Settings::default()
        },
        logging: Some(logging),
    };
    let drain = Duration::from_secs(args.drain_s);
    shutdown::run_until_signal(
        "mesh-ingress",
        app::build(cfg),
        |app| format!("mesh-ingress http={} https={} admin={}", app.http_addr, app.https_addr, app.admin_addr),
        async |app: app::App| shutdown::report_drain(app.drain(drain).await),
    )
    .await?;
    Ok(())
}

//! `mesh-ingress` as a running thing: configuration source → table → workers, with admin and drain.
//!
//! [`build`] binds every socket first and returns the bound addresses, so tests run the real ingress in-process
//! on port 0; the workers ([`crate::server`]) run on threads of their own, each a single-threaded runtime, and
//! stop when [`App::drain`] is done.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub use mesh_runtime::dataplane::Source;
use mesh_runtime::dataplane::{self, AdminShell, ShellError};
use mesh_runtime::{Admin, ReloadHandle, Shutdown};
use serde_json::json;
use tokio::sync::watch;
use tracing::info;
use xds_proto::client::{self, ClientConfig, ClientHandle};

use crate::config::{self, ConfigError, NEEDED, XdsHandler};
use crate::metrics::IngressMetrics;
use crate::proxy::{Settings, Shared};
use crate::routes::{Action, RouteTable};
use crate::server::{Listener, Signals, Worker};
use crate::table::Table;

/// Why the ingress could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The admin server or the xDS client could not start.
    #[error(transparent)]
    Shell(#[from] ShellError),
    /// The snapshot file could not be loaded.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listening address could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}; is another process using it?")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// `http` or `https`.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS configuration could not be built.
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
    /// A worker thread could not start.
    #[error("cannot start a worker thread: {0}")]
    Thread(std::io::Error),
}

/// How to run the ingress.
#[derive(Debug, Clone)]
pub struct Config {
    /// The configuration source.
    pub source: Source,
    /// `node.id` over xDS (the pod name).
    pub node: String,
    /// The IngressClass served (`mesh` by default).
    pub ingress_class: String,
    /// The plain-HTTP address.
    pub http_addr: SocketAddr,
    /// The TLS address.
    pub https_addr: SocketAddr,
    /// More plain-HTTP addresses with the same routes (e.g. a second port for benchmarks or migrations).
    pub extra_http_addrs: Vec<SocketAddr>,
    /// The admin address (loopback).
    pub admin_addr: SocketAddr,
    /// Worker threads (each a single-threaded runtime with its own listening sockets).
    pub threads: usize,
    /// TLS sessions kept for resumption (0: none, every handshake is full).
    pub tls_session_cache: usize,
    /// Data-path settings.
    pub settings: Settings,
    /// The log filter `/logging` changes.
    pub logging: Option<ReloadHandle>,
}

impl Config {
    /// A configuration on loopback port 0 everywhere, for tests.
    pub fn local(source: Source) -> Config {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Config {
            source,
            node: "mesh-ingress-test".into(),
            ingress_class: xds_proto::DEFAULT_INGRESS_CLASS.into(),
            http_addr: any,
            https_addr: any,
            extra_http_addrs: Vec::new(),
            admin_addr: any,
            threads: 1,
            tls_session_cache: 4096,
            settings: Settings::default(),
            logging: None,
        }
    }
}

/// A running ingress.
pub struct App {
    /// The plain-HTTP address.
    pub http_addr: SocketAddr,
    /// The TLS address.
    pub https_addr: SocketAddr,
    /// The extra plain-HTTP addresses.
    pub extra_http_addrs: Vec<SocketAddr>,
    /// The admin address.
    pub admin_addr: SocketAddr,
    /// Shared state (table, metrics, connections).
    pub shared: Arc<Shared>,
    /// Admin state (readiness).
    pub admin: Admin,
    client: Option<ClientHandle>,
    workers: Vec<Worker>,
    stop_accepting: Shutdown,
    finish: watch::Sender<bool>,
    stop: Shutdown,
    stop_admin: Shutdown,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("http_addr", &self.http_addr)
            .field("https_addr", &self.https_addr)
            .field("admin_addr", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

/// How long a draining ingress still answers the next request on an idle keep-alive connection (then closes it).
/// Long enough for any client in a steady exchange to send its next request, short enough not to hold a drain.
pub const IDLE_GRACE: Duration = crate::h1::IDLE_GRACE;

impl App {
    /// Drains: not ready, stops accepting, lets requests in flight finish (HTTP/1 connections close after their
    /// response, HTTP/2 ones get GOAWAY, keep-alive ones idle for [`IDLE_GRACE`] close), waits up to `deadline` for every
    /// connection to end, then stops the workers. Returns how many connections were still open at the deadline.
    pub async fn drain(self, deadline: Duration) -> usize {
        self.admin.readiness().set_ready(false);
        self.shared.draining.store(true, Ordering::SeqCst);
        self.stop_accepting.trigger();
        let _ = self.finish.send(true);
        info!(open = self.shared.conns.open(), "draining: no new connections; waiting for open ones");
        // A keep-alive connection between two requests is not closed at once: its client may be sending the
        // next request right now, and closing would reset it. For `IDLE_GRACE` every next request is still
        // answered (with `Connection: close`), as Envoy's drain does; only connections idle that long close
        // (each connection keeps that time itself). Under steady load this leaves no request lost to the drain.
        let left = self.shared.conns.wait_idle(deadline).await;
        self.stop.trigger();
        for w in self.workers {
            w.join(Duration::from_secs(10)).await;
        }
        if let Some(c) = self.client {
            c.stop().await;
        }
        self.stop_admin.trigger();
        left
    }
}

fn dump_routes(t: &RouteTable) -> serde_json::Value {
    let vhosts: Vec<_> = t
        .vhosts()
        .iter()
        .map(|v| {
            let routes: Vec<_> = v
                .routes()
                .iter()
                .map(|r| {
                    let action = match &r.action {
                        Action::Cluster(c) => json!({"cluster": &**c}),
                        Action::Direct { status, body } => {
                            json!({"direct": status, "body": String::from_utf8_lossy(body)})
                        }
                        Action::RedirectHttps { status } => json!({"redirectHttps": status}),
                    };
                    json!({"match": &*r.label, "ingress": &*r.ingress, "action": action})
                })
                .collect();
            json!({"host": &*v.name, "routes": routes})
        })
        .collect();
    json!({"name": t.name, "virtualHosts": vhosts})
}

fn config_dump(shared: &Shared) -> serde_json::Value {
    let t: Arc<Table> = shared.table.load_full();
    let now = crate::upstream::now_ms();
    let versions: serde_json::Map<String, serde_json::Value> =
        t.versions.iter().map(|(k, v)| (k.short().to_owned(), json!(v))).collect();
    let listeners: Vec<_> = t
        .listeners
        .values()
        .map(|l| {
            json!({"name": l.name, "routeConfig": l.route_config,
                "sni": l.tls.as_ref().map(|p| json!({"names": p.names, "default": p.default}))})
        })
        .collect();
    let mut clusters: Vec<_> = t
        .clusters
        .values()
        .map(|c| {
            json!({"name": &*c.name, "endpoints": c.endpoints.iter().map(|e| json!({
                "address": e.addr.to_string(), "health": format!("{:?}", e.health),
                "active": e.stats.active.load(Ordering::Relaxed), "ejected": e.stats.ejected(now)})).collect::<Vec<_>>()})
        })
        .collect();
    clusters.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    // Secret names only: key material never leaves the process.
    let secrets: Vec<&String> = t.secrets.keys().collect();
    json!({"versions": versions, "listeners": listeners, "routes": {"http": dump_routes(&t.http), "https": dump_routes(&t.https)},
        "clusters": clusters, "secrets": secrets, "openConnections": shared.conns.open()})
}

/// Binds one socket per worker on `addr`; returns them and the bound address.
fn bind(addr: SocketAddr, what: &'static str, n: usize) -> Result<(Vec<std::net::TcpListener>, SocketAddr), AppError> {
    let ls = crate::server::bind(addr, n).map_err(|source| AppError::Bind { addr, what, source })?;
    let at = ls[0].local_addr().map_err(|source| AppError::Bind { addr, what, source })?;
    Ok((ls, at))
}

/// Starts the ingress.
pub async fn build(cfg: Config) -> Result<App, AppError> {
    let threads = cfg.threads.max(1);
    let (http, http_addr) = bind(cfg.http_addr, "http", threads)?;
    let (https, https_addr) = bind(cfg.https_addr, "https", threads)?;
    let mut plain = vec![http];
    let mut extra_http_addrs = Vec::new();
    for addr in &cfg.extra_http_addrs {
        let (l, at) = bind(*addr, "http", threads)?;
        extra_http_addrs.push(at);
        plain.push(l);
    }

    let metrics = IngressMetrics::default();
    let shared = Shared::new(cfg.settings.clone(), metrics);
    let dump = {
        let shared = shared.clone();
        Arc::new(move || config_dump(&shared))
    };
    let shell = AdminShell::start(cfg.admin_addr, |r| shared.metrics.register(r), dump, cfg.logging.clone())
        .await
        .map_err(ShellError::from)?;
    let AdminShell { admin, addr: admin_addr, stop: stop_admin } = shell;

    let client = match &cfg.source {
        Source::File(path) => {
            if let Err(e) = config::load_file(path, &cfg.ingress_class, &shared) {
                stop_admin.trigger();
                return Err(e.into());
            }
            admin.readiness().set_ready(true);
            info!(file = %path.display(), "serving from a snapshot file");
            None
        }
        Source::Xds { endpoint, protocol } => {
            let mut c = ClientConfig::new(endpoint.clone(), cfg.node.clone(), client::ROLE_INGRESS);
            c.ingress_class = Some(cfg.ingress_class.clone());
            c.protocol = *protocol;
            let handler = XdsHandler::new(shared.clone());
            match dataplane::spawn_xds(c, handler, admin.readiness().clone(), &NEEDED, |_| {}) {
                Ok(handle) => Some(handle),
                Err(e) => {
                    stop_admin.trigger();
                    return Err(ShellError::from(e).into());
                }
            }
        }
    };

    let tls = crate::tls::server_config(shared.resolver.clone(), cfg.tls_session_cache)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let (stop_accepting, stop) = (Shutdown::new(), Shutdown::new());
    let (finish, finish_rx) = watch::channel(false);
    let signals = Signals { stop_accepting: stop_accepting.clone(), finish: finish_rx, stop: stop.clone() };
    // Worker i gets the i-th socket of every address.
    let mut per_worker: Vec<Vec<Listener>> = (0..threads).map(|_| Vec::new()).collect();
    for group in plain {
        for (i, socket) in group.into_iter().enumerate() {
            per_worker[i].push(Listener { socket, tls: None });
        }
    }
    for (i, socket) in https.into_iter().enumerate() {
        per_worker[i].push(Listener { socket, tls: Some(acceptor.clone()) });
    }
    let mut workers = Vec::with_capacity(threads);
    for (i, listeners) in per_worker.into_iter().enumerate() {
        match Worker::spawn(i, listeners, shared.clone(), signals.clone()) {
            Ok(w) => workers.push(w),
            Err(e) => {
                stop.trigger();
                stop_admin.trigger();
                return Err(AppError::Thread(e));
            }
        }
    }
    Ok(App {
        http_addr,
        https_addr,
        extra_http_addrs,
        admin_addr,
        shared,
        admin,
        client,
        workers,
        stop_accepting,
        finish,
        stop,
        stop_admin,
    })
}

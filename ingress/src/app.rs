//! `mesh-ingress` as a running thing: configuration source → table → pingora, with admin and drain.
//!
//! [`build`] binds every socket first and returns the bound addresses, so tests run the real ingress in-process
//! on port 0; pingora runs on its own thread and runtimes (it owns them) and stops when [`App::drain`] is done.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use mesh_runtime::{Admin, AdminError, AdminServer, Metrics, ReloadHandle, Shutdown};
use pingora_core::listeners::tls::Acceptor;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::{RunArgs, Server};
use serde_json::json;
use tokio::sync::{oneshot, watch};
use tracing::info;
use xds_proto::client::{self, ClientConfig, ClientError, ClientHandle, Protocol};

use crate::config::{self, ConfigError, NEEDED, XdsHandler};
use crate::metrics::IngressMetrics;
use crate::proxy::{Ingress, Settings, Shared};
use crate::routes::{Action, RouteTable};
use crate::server::{AppSignal, Frontend, Proxy};
use crate::table::Table;

/// Why the ingress could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The admin server could not start.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// The snapshot file could not be loaded.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The control plane address is unusable.
    #[error(transparent)]
    Client(#[from] ClientError),
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
    /// The pingora thread could not start.
    #[error("cannot start the proxy thread: {0}")]
    Thread(std::io::Error),
}

/// Where the configuration comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A control plane (`http://host:port`), over ADS.
    Xds {
        /// The endpoint.
        endpoint: String,
        /// Delta or SotW.
        protocol: Protocol,
    },
    /// A snapshot file written by `meshctl snapshot --role ingress`.
    File(PathBuf),
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
    /// pingora worker threads.
    pub threads: usize,
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
    proxy: Arc<Proxy>,
    stop_accepting: watch::Sender<bool>,
    finish: watch::Sender<bool>,
    stop_pingora: watch::Sender<bool>,
    pingora_done: oneshot::Receiver<()>,
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
pub const IDLE_GRACE: Duration = Duration::from_secs(1);

impl App {
    /// Drains: not ready, stops accepting, lets requests in flight finish (HTTP/1 connections close after their
    /// response, HTTP/2 ones get GOAWAY, keep-alive ones idle for [`IDLE_GRACE`] close), waits up to `deadline` for every
    /// connection to end, then stops pingora. Returns how many connections were still open at the deadline.
    pub async fn drain(self, deadline: Duration) -> usize {
        self.admin.readiness().set_ready(false);
        self.shared.draining.store(true, Ordering::SeqCst);
        let _ = self.stop_accepting.send(true);
        let _ = self.finish.send(true);
        info!(open = self.shared.conns.open(), "draining: no new connections; waiting for open ones");
        // A keep-alive connection between two requests is not closed at once: its client may be sending the
        // next request right now, and closing would reset it. For `IDLE_GRACE` every next request is still
        // answered (with `Connection: close`), as Envoy's drain does; only connections idle that long are
        // closed. Under steady load this leaves no request lost to the drain.
        let grace = IDLE_GRACE.min(deadline);
        let start = tokio::time::Instant::now();
        let mut left = self.shared.conns.wait_idle(grace).await;
        if left > 0 {
            crate::server::wake_idle(&self.proxy).await;
            left = self.shared.conns.wait_idle(deadline.saturating_sub(start.elapsed())).await;
        }
        let _ = self.stop_pingora.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.pingora_done).await;
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

fn bind(addr: SocketAddr, what: &'static str) -> Result<std::net::TcpListener, AppError> {
    let l = std::net::TcpListener::bind(addr).map_err(|source| AppError::Bind { addr, what, source })?;
    // Accepted connections inherit TCP_NODELAY from the listening socket (Linux). Without it a response written
    // as a header and then a small body waits for the client's delayed ACK (about 40 ms) under Nagle's rule.
    rustix::net::sockopt::set_tcp_nodelay(&l, true).map_err(|e| AppError::Bind { addr, what, source: e.into() })?;
    Ok(l)
}

/// Starts the ingress.
pub async fn build(cfg: Config) -> Result<App, AppError> {
    let http = bind(cfg.http_addr, "http")?;
    let https = bind(cfg.https_addr, "https")?;
    let local =
        |l: &std::net::TcpListener, addr, what| l.local_addr().map_err(|source| AppError::Bind { addr, what, source });
    let http_addr = local(&http, cfg.http_addr, "http")?;
    let https_addr = local(&https, cfg.https_addr, "https")?;
    let mut plain = vec![http];
    let mut extra_http_addrs = Vec::new();
    for addr in &cfg.extra_http_addrs {
        let l = bind(*addr, "http")?;
        extra_http_addrs.push(local(&l, *addr, "http")?);
        plain.push(l);
    }

    let metrics = IngressMetrics::default();
    let registry = Metrics::new();
    registry.with_registry(|r| metrics.register(r));
    let shared = Shared::new(cfg.settings.clone(), metrics);
    let dump = {
        let shared = shared.clone();
        Arc::new(move || config_dump(&shared))
    };
    let mut admin = Admin::builder().metrics(registry).config_dump(dump);
    if let Some(l) = cfg.logging.clone() {
        admin = admin.logging(l);
    }
    let admin = admin.build()?;
    let stop_admin = Shutdown::new();
    let (admin_addr, _) = AdminServer::serve(cfg.admin_addr, admin.clone(), stop_admin.clone()).await?;

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
            if let Err(e) = c.validate() {
                stop_admin.trigger();
                return Err(e.into());
            }
            let handle = client::spawn(c, XdsHandler::new(shared.clone()));
            let mut status = handle.status();
            let readiness = admin.readiness().clone();
            tokio::spawn(async move {
                if status.wait_for(|s| s.is_loaded(&NEEDED)).await.is_ok() {
                    readiness.set_ready(true);
                    info!("configuration loaded: ready");
                }
            });
            Some(handle)
        }
    };

    let tls = crate::tls::server_config(shared.resolver.clone())?;
    let acceptor = Arc::new(Acceptor::from_server_config(Arc::new(tls)));
    let conf = ServerConf {
        threads: cfg.threads.max(1),
        // The drain happens before pingora's shutdown (see `server`): nothing left to wait for by then.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    let mut proxy = pingora_proxy::http_proxy(&server.configuration, Ingress::new(shared.clone()));
    let mut options = pingora_core::apps::HttpServerOptions::default();
    // Cleartext HTTP/2 with prior knowledge (the accept loop has already told h2c from HTTP/1 by the preface).
    options.h2c = true;
    proxy.server_options = Some(options);
    let proxy = Arc::new(proxy);
    let (stop_accepting, stop_rx) = watch::channel(false);
    let (finish, finish_rx) = watch::channel(false);
    let (stop_pingora, pingora_rx) = watch::channel(false);
    server.add_service(Frontend {
        http: plain,
        https: Some(https),
        acceptor,
        proxy: proxy.clone(),
        shared: shared.clone(),
        stop_accepting: stop_rx,
        finish: finish_rx,
        threads: cfg.threads,
    });
    let (done_tx, pingora_done) = oneshot::channel();
    std::thread::Builder::new()
        .name("pingora".into())
        .spawn(move || {
            server.run(RunArgs { shutdown_signal: Box::new(AppSignal(pingora_rx)) });
            let _ = done_tx.send(());
        })
        .map_err(AppError::Thread)?;
    Ok(App {
        http_addr,
        https_addr,
        extra_http_addrs,
        admin_addr,
        shared,
        admin,
        client,
        proxy,
        stop_accepting,
        finish,
        stop_pingora,
        pingora_done,
        stop_admin,
    })
}

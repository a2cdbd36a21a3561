//! `mesh-proxy` as a running thing: configuration source → table → sockets, with admin and drain.
//!
//! [`build`] starts everything and returns the bound addresses at once, so tests run the real proxy in-process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use mesh_runtime::dataplane::Source;
use mesh_runtime::dataplane::{self, AdminShell, ShellError};
use mesh_runtime::{Admin, ReloadHandle, Shutdown};
use serde_json::json;
use tokio::sync::watch;
use tracing::{info, warn};
use xds_proto::client::{self, ClientConfig, ClientHandle};

use crate::balance::Locality;
use crate::config::{self, ConfigError, NEEDED, XdsHandler};
use crate::listeners::{self, Manager};
use crate::saved;
use crate::state::{DataConfig, ProxyMetrics, Shared};
use crate::table::{ListenKey, Table};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The admin server or the xDS client could not start.
    #[error(transparent)]
    Shell(#[from] ShellError),
    /// The snapshot file could not be loaded.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// How to run the proxy.
#[derive(Debug, Clone)]
pub struct Config {
    /// The configuration source.
    pub source: Source,
    /// This node's name (Local traffic policies; `node.id` over xDS).
    pub node: String,
    /// This node's zone (topology-aware routing), overriding the one mesh-control sends from the Node.
    pub zone: Option<String>,
    /// Where to serve the admin endpoints (loopback).
    pub admin_addr: SocketAddr,
    /// Data path settings.
    pub data: DataConfig,
    /// Put Service addresses on this dummy interface (Linux, CAP_NET_ADMIN).
    pub interface: Option<String>,
    /// The log filter `/logging` changes.
    pub logging: Option<ReloadHandle>,
    /// With xDS: keep the last accepted configuration here, and start from it when the control plane cannot
    /// be reached (see [`crate::saved`]).
    pub state_dir: Option<PathBuf>,
}

/// A running proxy.
#[derive(Debug)]
pub struct App {
    /// Where the admin endpoints are.
    pub admin_addr: SocketAddr,
    /// The shared state (table, metrics, open connections).
    pub shared: Arc<Shared>,
    /// The addresses being listened on.
    pub listening: watch::Receiver<Vec<ListenKey>>,
    /// Admin state (readiness).
    pub admin: Admin,
    client: Option<ClientHandle>,
    saver: Option<Arc<saved::Saver>>,
    stop_listeners: Shutdown,
    stop_admin: Shutdown,
    manager: tokio::task::JoinHandle<Manager>,
}

impl App {
    /// Drains: stops accepting new connections, waits up to `deadline` for open ones to finish, then stops.
    /// Returns how many connections were still open at the deadline.
    pub async fn drain(self, deadline: Duration) -> usize {
        self.admin.readiness().set_ready(false);
        self.stop_listeners.trigger();
        let manager = self.manager.await.ok();
        let open = self.shared.conns.open();
        info!(open, "draining: no new connections; waiting for open ones");
        let left = self.shared.conns.wait_idle(deadline).await;
        // Only now may the Service addresses leave the interface: open connections used them until here.
        if let Some(mut m) = manager {
            m.release_interface();
        }
        if let Some(c) = self.client {
            c.stop().await;
        }
        // No update comes after the client stopped: write the last one now, or the restart would not see it.
        if let Some(saver) = self.saver {
            match tokio::task::spawn_blocking(move || saver.write_pending()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => warn!("cannot save the configuration before exiting: {e}"),
                Err(e) => warn!("saving the configuration before exiting failed: {e}"),
            }
        }
        self.stop_admin.trigger();
        left
    }
}

fn config_dump(shared: &Shared) -> serde_json::Value {
    let t: Arc<Table> = shared.table.load_full();
    let now = crate::table::now_ms();
    let listeners: Vec<_> = t
        .listeners
        .values()
        .map(|l| {
            json!({"name": l.name, "addresses": l.keys.iter().map(|k| format!("{}/{:?}", k.addr, k.protocol)).collect::<Vec<_>>(),
                "service": l.service, "kind": format!("{:?}", l.kind), "localOnly": l.local_only,
                "healthCheckNodePort": l.health_check_node_port, "cluster": l.cluster})
        })
        .collect();
    let mut clusters: Vec<_> = t
        .clusters
        .values()
        .map(|c| {
            json!({"name": c.name, "affinitySeconds": c.affinity.map(|d| d.as_secs()), "distribution": format!("{:?}", c.distribution),
                "endpoints": c.endpoints.iter().map(|e| json!({"address": e.addr.to_string(), "health": format!("{:?}", e.health),
                    "node": &*e.place.node, "zone": &*e.place.zone, "active": e.stats.active.load(std::sync::atomic::Ordering::Relaxed),
                    "ejected": e.stats.ejected(now)})).collect::<Vec<_>>()})
        })
        .collect();
    clusters.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    let versions: serde_json::Map<String, serde_json::Value> =
        t.versions.iter().map(|(k, v)| (k.short().to_owned(), json!(v))).collect();
    let zone_source = if shared.here.zone.is_some() { "--zone" } else { "Node label via mesh-control" };
    let fresh = shared.freshness.report();
    let freshness = json!({"healthy": fresh.healthy, "current": fresh.current,
        "lastCurrentSecondsAgo": fresh.last_current_ago.map(|d| d.as_secs())});
    json!({"node": shared.here.node, "zone": shared.here.at(&t).zone, "zoneSource": zone_source, "versions": versions, "listeners": listeners,
        "clusters": clusters, "openConnections": shared.conns.open(), "configuration": freshness})
}

/// Starts the proxy.
pub async fn build(cfg: Config) -> Result<App, AppError> {
    let metrics = ProxyMetrics::default();
    let shared = Shared::new(Locality { node: cfg.node.clone(), zone: cfg.zone.clone() }, cfg.data.clone(), metrics);
    let dump = {
        let shared = shared.clone();
        Arc::new(move || config_dump(&shared))
    };
    let shell = AdminShell::start(cfg.admin_addr, |r| shared.metrics.register(r), dump, cfg.logging.clone())
        .await
        .map_err(ShellError::from)?;
    let AdminShell { admin, addr: admin_addr, stop: stop_admin } = shell;

    let (changes_tx, changes_rx) = watch::channel(0u64);
    let mut saver = None;
    let client = match &cfg.source {
        Source::File(path) => {
            if let Err(e) = config::load_file(path, &shared) {
                stop_admin.trigger();
                return Err(e.into());
            }
            changes_tx.send_modify(|g| *g += 1);
            admin.readiness().set_ready(true);
            shared.freshness.set_current();
            info!(file = %path.display(), "serving from a snapshot file");
            None
        }
        Source::Xds { endpoint, protocol } => {
            let mut c = ClientConfig::new(endpoint.clone(), cfg.node.clone(), client::ROLE_PROXY);
            c.protocol = *protocol;
            // The handler converts each resource once and keeps only its own tables (see XdsHandler).
            c.keep_bodies = false;
            if let Err(e) = c.validate() {
                stop_admin.trigger();
                return Err(ShellError::from(e).into());
            }
            let mut handler = XdsHandler::new(shared.clone(), changes_tx.clone());
            if let Some(dir) = &cfg.state_dir {
                let path = dir.join(saved::FILE);
                let loaded = match saved::read(dir).and_then(|r| match r {
                    Some((state, written)) => saved::apply(&state, &shared, &path).map(|()| Some((state, written))),
                    None => Ok(None),
                }) {
                    Ok(Some((state, written))) => {
                        let age = written.elapsed().unwrap_or_default();
                        warn!(
                            file = %path.display(), saved_secs_ago = age.as_secs(),
                            "serving the configuration saved before this restart until the control plane answers"
                        );
                        shared.metrics.config_updates.inc();
                        changes_tx.send_modify(|g| *g += 1);
                        admin.readiness().set_ready(true);
                        shared.freshness.set_saved(written);
                        state
                    }
                    Ok(None) => {
                        info!(file = %path.display(), "no saved configuration yet; waiting for the control plane");
                        saved::Resources::new()
                    }
                    Err(e) => {
                        warn!("ignoring the saved configuration, waiting for the control plane: {e}");
                        saved::Resources::new()
                    }
                };
                let types: Vec<_> = loaded.keys().copied().collect();
                let s = saved::Saver::new(dir, loaded);
                tokio::spawn(s.clone().run());
                handler = handler.saving(s.clone(), types);
                saver = Some(s);
            }
            // Ready once every type the proxy needs has been accepted once. Current (healthy) while connected
            // with every needed type accepted; stale some time after the stream is lost (see health::Freshness).
            let fresh = shared.clone();
            let on_status = move |s: &client::ClientStatus| {
                if s.connected && s.is_loaded(&NEEDED) {
                    fresh.freshness.set_current();
                } else if !s.connected {
                    fresh.freshness.set_disconnected();
                }
            };
            let handle = dataplane::spawn_xds(c, handler, admin.readiness().clone(), &NEEDED, on_status)
                .map_err(ShellError::from)?;
            Some(handle)
        }
    };
    let stop_listeners = Shutdown::new();
    let (listening_tx, listening) = watch::channel(Vec::new());
    let manager = Manager::new(shared.clone(), cfg.interface.as_deref());
    let manager = tokio::spawn(listeners::run(manager, changes_rx, stop_listeners.clone(), listening_tx));
    Ok(App { admin_addr, shared, listening, admin, client, saver, stop_listeners, stop_admin, manager })
}

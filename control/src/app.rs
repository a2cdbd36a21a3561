//! The control plane as a running thing: sources → store → translate → the published snapshot.
//!
//! [`build`] starts it and returns at once with a handle, so `main` stays thin and tests run the real app
//! in-process. The snapshot is published on a `watch` channel as an immutable `Arc`: one writer (the loop here),
//! any number of lock-free readers (the xDS streams), each taking the latest when it is ready for it.
//!
//! Either source (manifest folder or Kubernetes API) sends [`Update`]s; the loop takes every update waiting (a
//! burst of watch events becomes one translation) and hands the batch to [`Pipeline::step`], the pure step
//! (batch in → snapshot and problems out) that publishes nothing until the source says its state is complete
//! ([`Update::completes`]): the xDS server waits for that first snapshot, and `/ready` says so. The loop only
//! publishes what the step returns.
//! With the Kubernetes source and Ingress status configured, the loop also hands the status writer a
//! [`status::View`] whenever Ingresses or the published Service may have changed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh_runtime::{Admin, AdminError, AdminServer, Metrics, ReloadHandle, Shutdown};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};
use xds_proto::names;

use crate::pipeline::Pipeline;
use crate::source::kubernetes;
use crate::source::{self, SourceError, Update};
use crate::status::{self, Leadership, Publish};
use crate::translate::{Options, Snapshot};
use crate::xds::{XdsConfig, XdsError, XdsMetrics, XdsServer};

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The manifest folder could not be read or watched.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The xDS server could not start.
    #[error(transparent)]
    Xds(#[from] XdsError),
    /// The admin server could not start.
    #[error(transparent)]
    Admin(#[from] AdminError),
}

/// Where the cluster state comes from.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// A folder of manifests, watched.
    Manifests {
        /// The folder.
        dir: PathBuf,
        /// How long changes to the folder must be quiet before a reload (editors write in bursts).
        debounce: Duration,
    },
    /// The Kubernetes API.
    Kubernetes(Box<kubernetes::Settings>),
}

/// How to run the control plane.
#[derive(Debug, Clone)]
pub struct Config {
    /// The source of cluster state.
    pub source: SourceConfig,
    /// Translation settings.
    pub translate: Options,
    /// Where to serve xDS (port 0 picks one).
    pub xds_addr: std::net::SocketAddr,
    /// xDS settings.
    pub xds: XdsConfig,
    /// Where to serve the admin endpoints (loopback only).
    pub admin_addr: std::net::SocketAddr,
    /// The log filter `/logging` changes, when tracing was set up with one.
    pub logging: Option<ReloadHandle>,
}

/// A running control plane.
#[derive(Debug)]
pub struct App {
    /// The latest snapshot; `None` until the sources have loaded (never confuse empty with not-yet-loaded).
    pub snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    /// Where xDS is served.
    pub xds_addr: std::net::SocketAddr,
    /// The xDS server (its connected clients).
    pub xds: XdsServer,
    /// Where the admin endpoints are served.
    pub admin_addr: std::net::SocketAddr,
    /// The admin server's state (readiness, metrics).
    pub admin: Admin,
    /// Whether this replica writes Ingress status (Kubernetes source with status configured), as elected.
    pub leadership: Option<Leadership>,
    shutdown: Shutdown,
    task: JoinHandle<()>,
    /// The elector and status writer, awaited on stop so the Lease is released before the process exits.
    helpers: Vec<JoinHandle<()>>,
}

/// How long [`App::stop`] waits for the Lease release.
const STOP_GRACE: Duration = Duration::from_secs(5);

impl App {
    /// Stops the control plane and waits for its loop to end (and, when elected, for the Lease release).
    pub async fn stop(self) {
        self.shutdown.trigger();
        // The loop only ends by shutdown; a panic inside it has already been reported by the runtime.
        let _ = self.task.await;
        for h in self.helpers {
            let _ = tokio::time::timeout(STOP_GRACE, h).await;
        }
    }
}

/// Starts the source: its updates arrive on the returned channel; the guard stops it when dropped.
fn start_source(
    cfg: &SourceConfig,
    metrics: &kubernetes::KubeMetrics,
) -> Result<(mpsc::Receiver<Update>, Box<dyn std::any::Any + Send>), AppError> {
    let (tx, rx) = mpsc::channel(1024);
    match cfg {
        SourceConfig::Manifests { dir, debounce } => {
            let (mut loads, handle) = source::watch(dir.clone(), *debounce)?;
            let forward = tokio::spawn(async move {
                while let Some(l) = loads.recv().await {
                    if tx.send(Update::Full(l)).await.is_err() {
                        return;
                    }
                }
            });
            Ok((rx, Box::new((handle, AbortOnDrop(forward)))))
        }
        SourceConfig::Kubernetes(settings) => {
            Ok((rx, Box::new(kubernetes::watch::spawn(settings, tx, metrics.clone()))))
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The most updates applied before one translation: a long burst (a relist of a big cluster) is still
/// published in steps instead of waiting for its end.
const MAX_BATCH: usize = 4096;

/// Starts the control plane: loads the sources (failing if they cannot be read at all), then keeps the snapshot
/// current as they change.
pub async fn build(cfg: Config) -> Result<App, AppError> {
    let kube_metrics = kubernetes::KubeMetrics::default();
    let (mut updates, source_guard) = start_source(&cfg.source, &kube_metrics)?;
    let (tx, rx) = watch::channel(None);
    let shutdown = Shutdown::new();
    let metrics = XdsMetrics::default();
    let registry = Metrics::new();
    registry.with_registry(|r| metrics.register(r));
    if matches!(cfg.source, SourceConfig::Kubernetes(_)) {
        registry.with_registry(|r| kube_metrics.register(r));
    }
    let xds = XdsServer::new(rx.clone(), cfg.xds.clone(), metrics.clone());
    let mut admin = Admin::builder().metrics(registry).config_dump(config_dump(rx.clone())).route("/debug/clients", {
        let xds = xds.clone();
        Arc::new(move || serde_json::to_value(xds.clients()).unwrap_or_default())
    });
    if let Some(logging) = cfg.logging.clone() {
        admin = admin.logging(logging);
    }
    let admin = admin.build()?;
    let (admin_addr, _admin_task) = AdminServer::serve(cfg.admin_addr, admin.clone(), shutdown.clone()).await?;
    let (xds_addr, _xds_task) = xds.clone().serve(cfg.xds_addr, shutdown.clone()).await?;

    // Ingress status: an elector and a writer, fed views by the loop.
    let mut helpers = Vec::new();
    let mut leadership = None;
    let mut status_out: Option<(Publish, watch::Sender<Option<status::View>>)> = None;
    if let SourceConfig::Kubernetes(k) = &cfg.source
        && let Some(st) = &k.status
    {
        let (lead, elector) =
            status::lease::spawn(k.client.clone(), st.lease.clone(), shutdown.clone(), kube_metrics.clone());
        let (view_tx, view_rx) = watch::channel(None);
        let writer =
            status::spawn(k.client.clone(), view_rx, lead.clone(), st.retry, shutdown.clone(), kube_metrics.clone());
        helpers.extend([elector, writer]);
        leadership = Some(lead);
        status_out = Some((st.publish.clone(), view_tx));
    }

    let stop = shutdown.clone();
    let loop_metrics = metrics.clone();
    let readiness = admin.readiness().clone();
    let task = tokio::spawn(async move {
        let _source = source_guard;
        let mut pipeline = Pipeline::new(cfg.translate);
        loop {
            let first = tokio::select! {
                _ = stop.wait() => break,
                u = updates.recv() => match u { Some(u) => u, None => break },
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match updates.try_recv() {
                    Ok(u) => batch.push(u),
                    Err(_) => break,
                }
            }
            let Some(step) = pipeline.step(batch) else { continue };
            for p in &step.appeared {
                warn!(object = %p.object, "cannot translate: {}", p.reason);
            }
            for p in &step.resolved {
                info!(object = %p.object, "resolved: {}", p.reason);
            }
            let snap = &step.snapshot;
            info!(
                listeners = snap.proxy.get(xds_proto::types::ResourceType::Listener).len(),
                clusters = snap.proxy.get(xds_proto::types::ResourceType::Cluster).len(),
                ingress_classes = snap.ingress.len(),
                problems = snap.problems.len(),
                "snapshot updated"
            );
            loop_metrics.observe_snapshot(snap);
            tx.send_replace(Some(snap.clone()));
            if let Some((publish, views)) = &status_out {
                let changes = &step.changes;
                let publish_changed = match publish {
                    Publish::Service(key) => changes.services.contains(key) || changes.all_services,
                    Publish::Addresses(_) => false,
                };
                if step.first || changes.ingress || publish_changed {
                    let v = status::view(pipeline.store(), pipeline.served_ingresses(), publish);
                    views.send_if_modified(|old| {
                        let differs = old.as_ref() != Some(&v);
                        if differs {
                            *old = Some(v);
                        }
                        differs
                    });
                }
            }
            // Ready once the sources have loaded and the first snapshot is out.
            readiness.set_ready(true);
        }
    });
    Ok(App { snapshots: rx, xds_addr, xds, admin_addr, admin, leadership, shutdown, task, helpers })
}

/// `/config_dump`: every role's resources in Envoy's JSON mapping with their versions, and the problems.
/// Private keys are redacted, as Envoy's own config dump does.
fn config_dump(snapshots: watch::Receiver<Option<Arc<Snapshot>>>) -> mesh_runtime::JsonSource {
    use serde_json::{Value, json};
    use xds_proto::types::ResourceType;
    Arc::new(move || {
        let Some(snap) = snapshots.borrow().clone() else { return json!({"loaded": false}) };
        let role_json = |role: &crate::translate::RoleSnapshot| {
            let mut out = serde_json::Map::new();
            for t in ResourceType::ALL {
                let items: Vec<Value> = role
                    .get(t)
                    .values()
                    .map(|r| {
                        let mut body = xds_proto::codec::to_json(t.type_url(), &r.body)
                            .unwrap_or_else(|e| json!({"error": e.to_string()}));
                        if t == ResourceType::Secret
                            && let Some(tc) = body.get_mut("tls_certificate")
                        {
                            tc["private_key"] = json!({"inline_string": "[redacted]"});
                        }
                        json!({"name": r.name, "version": r.version, "resource": body})
                    })
                    .collect();
                out.insert(t.short().to_owned(), Value::Array(items));
            }
            Value::Object(out)
        };
        let mut roles = serde_json::Map::new();
        roles.insert(names::file_role(None), role_json(&snap.proxy));
        for (class, role) in &snap.ingress {
            roles.insert(names::file_role(Some(class)), role_json(role));
        }
        json!({"loaded": true, "roles": roles, "problems": snap.problems.iter().map(ToString::to_string).collect::<Vec<_>>()})
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn test_config(dir: &std::path::Path) -> Config {
        Config {
            source: SourceConfig::Manifests { dir: dir.to_owned(), debounce: Duration::from_millis(20) },
            translate: Options::default(),
            xds_addr: "127.0.0.1:0".parse().unwrap(),
            xds: XdsConfig::default(),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            logging: None,
        }
    }

    async fn next(rx: &mut watch::Receiver<Option<Arc<Snapshot>>>) -> Arc<Snapshot> {
        tokio::time::timeout(Duration::from_secs(10), rx.changed()).await.expect("a snapshot within 10 s").unwrap();
        rx.borrow_and_update().clone().expect("published snapshots are loaded")
    }

    #[tokio::test]
    async fn publishes_after_load_and_follows_the_folder() {
        let d = tempfile::tempdir().unwrap();
        let svc = |ip: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: ns}}\nspec:\n  clusterIP: {ip}\n  ports:\n  - port: 80\n"
            )
        };
        fs::write(d.path().join("web.yaml"), svc("10.96.0.1")).unwrap();
        let cfg = test_config(d.path());
        let mut app = build(cfg).await.unwrap();
        let s = next(&mut app.snapshots).await;
        assert!(s.proxy.get(xds_proto::types::ResourceType::Listener).contains_key("svc/ns/web/80@10.96.0.1"));
        fs::write(d.path().join("web.yaml"), svc("10.96.0.2")).unwrap();
        let s = next(&mut app.snapshots).await;
        assert!(s.proxy.get(xds_proto::types::ResourceType::Listener).contains_key("svc/ns/web/80@10.96.0.2"));
        app.stop().await;
    }

    #[tokio::test]
    async fn a_missing_folder_fails_to_start() {
        let cfg = test_config(std::path::Path::new("/nonexistent/mesh"));
        assert!(matches!(build(cfg).await, Err(AppError::Source(_))));
    }
}

//! The control plane as a running thing: sources → store → translate → the published snapshot.
//!
//! [`build`] starts it and returns at once with a handle, so `main` stays thin and tests run the real app
//! in-process. The snapshot is published on a `watch` channel as an immutable `Arc`: one writer (the loop here),
//! any number of lock-free readers (the xDS streams), each taking the latest when it is ready for it.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh_runtime::Shutdown;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::source::{self, SourceError};
use crate::store::Store;
use crate::translate::{Options, Problem, Snapshot, Translator};

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The manifest folder could not be read or watched.
    #[error(transparent)]
    Source(#[from] SourceError),
}

/// How to run the control plane.
#[derive(Debug, Clone)]
pub struct Config {
    /// The manifest folder, the source of cluster state.
    pub manifests: PathBuf,
    /// How long changes to the folder must be quiet before a reload (editors write in bursts).
    pub debounce: Duration,
    /// Translation settings.
    pub translate: Options,
}

/// A running control plane.
#[derive(Debug)]
pub struct App {
    /// The latest snapshot; `None` until the sources have loaded (never confuse empty with not-yet-loaded).
    pub snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    shutdown: Shutdown,
    task: JoinHandle<()>,
}

impl App {
    /// Stops the control plane and waits for its loop to end.
    pub async fn stop(self) {
        self.shutdown.trigger();
        // The loop only ends by shutdown; a panic inside it has already been reported by the runtime.
        let _ = self.task.await;
    }
}

/// Starts the control plane: loads the sources (failing if they cannot be read at all), then keeps the snapshot
/// current as they change.
pub async fn build(cfg: Config) -> Result<App, AppError> {
    let (mut loads, watch_handle) = source::watch(cfg.manifests.clone(), cfg.debounce)?;
    let (tx, rx) = watch::channel(None);
    let shutdown = Shutdown::new();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        let _watch = watch_handle;
        let mut store = Store::new();
        let mut translator = Translator::new(cfg.translate);
        let mut reported: BTreeSet<Problem> = BTreeSet::new();
        let mut first = true;
        loop {
            let loaded = tokio::select! {
                _ = stop.wait() => break,
                l = loads.recv() => match l { Some(l) => l, None => break },
            };
            let changes = source::sync(&mut store, &loaded);
            if changes.is_empty() && !first {
                continue;
            }
            let snap = if first { translator.full(&store) } else { translator.update(&store, &changes) };
            first = false;
            let now: BTreeSet<Problem> = snap.problems.iter().cloned().collect();
            for p in now.difference(&reported) {
                warn!(object = %p.object, "cannot translate: {}", p.reason);
            }
            for p in reported.difference(&now) {
                info!(object = %p.object, "resolved: {}", p.reason);
            }
            reported = now;
            info!(
                listeners = snap.proxy.get(xds_proto::types::ResourceType::Listener).len(),
                clusters = snap.proxy.get(xds_proto::types::ResourceType::Cluster).len(),
                ingress_classes = snap.ingress.len(),
                problems = snap.problems.len(),
                "snapshot updated"
            );
            tx.send_replace(Some(Arc::new(snap.clone())));
        }
    });
    Ok(App { snapshots: rx, shutdown, task })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

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
        let cfg = Config {
            manifests: d.path().to_owned(),
            debounce: Duration::from_millis(20),
            translate: Options::default(),
        };
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
        let cfg = Config {
            manifests: "/nonexistent/mesh".into(),
            debounce: Duration::from_millis(20),
            translate: Options::default(),
        };
        assert!(matches!(build(cfg).await, Err(AppError::Source(_))));
    }
}

//! The Kubernetes API source: the client, its settings and metrics, and the watchers.
//!
//! - [`watch`]: one `kube-runtime` watcher per kind we read (Service, EndpointSlice, Ingress, IngressClass, TLS
//!   Secret, Node), each object trimmed to what translation reads, turned into [`crate::source::Update`]s: the
//!   same store → translate → xDS path as the manifest folder. A (re)list becomes one [`Update::Relist`], so
//!   objects deleted while a watch was down (`410 Gone`, API server restart) disappear, and nothing is doubled;
//!   [`Update::Synced`] follows the first list of every kind, and only then does the app serve.
//! - What the control plane writes back (the Lease election and Ingress status) is in [`crate::status`]; the
//!   in-memory API server the tests run against is `crate::testing::fake` (tests, or the `fake-api` feature).
//!
//! [`Update::Relist`]: crate::source::Update::Relist
//! [`Update::Synced`]: crate::source::Update::Synced

pub mod watch;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub use crate::status::lease::{Leadership, LeaseSettings};
pub use crate::status::{Publish, StatusSettings};

/// Why the Kubernetes source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The kubeconfig file could not be read or used.
    #[error("cannot use kubeconfig {}: {error} (check the file, its current context and credentials)", path.display())]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// What kube said.
        error: String,
    },
    /// Not running in a Pod, or the ServiceAccount token is not mounted.
    #[error(
        "no in-cluster Kubernetes config: {0} (outside a cluster pass --kubeconfig FILE or --manifests DIR; in a Pod \
         check KUBERNETES_SERVICE_HOST and automountServiceAccountToken)"
    )]
    InCluster(String),
    /// The client could not be built from a valid config (TLS setup).
    #[error("cannot build the Kubernetes client: {0}")]
    Client(String),
    /// A `--publish-service` value is not `namespace/name`.
    #[error("--publish-service {0:?} is not namespace/name")]
    PublishService(String),
}

/// Builds a client: from a kubeconfig file, or the in-cluster config (ServiceAccount token) when none is given.
pub async fn connect(kubeconfig: Option<&Path>) -> Result<kube::Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let err = |e: &dyn fmt::Display| KubeError::Kubeconfig { path: path.to_owned(), error: e.to_string() };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| err(&e))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| err(&e))?
        }
        None => kube::Config::incluster().map_err(|e| KubeError::InCluster(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(|e| KubeError::Client(e.to_string()))
}

/// The namespace of the Pod we run in (from the mounted ServiceAccount), where the Lease lives by default.
pub fn pod_namespace() -> Option<String> {
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// How to read the cluster and what to write back.
#[derive(Clone)]
pub struct Settings {
    /// The API client.
    pub client: kube::Client,
    /// Read namespaced kinds of this namespace only (IngressClasses and Nodes are cluster-scoped and always
    /// read); `None` reads every namespace.
    pub namespace: Option<String>,
    /// Delays between retries after a failed list or watch (dropped connection, API server down).
    pub backoff: BackoffSettings,
    /// Ingress status writing, with leader election; `None` writes nothing.
    pub status: Option<StatusSettings>,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("namespace", &self.namespace)
            .field("backoff", &self.backoff)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// Exponential backoff with full jitter between `min` and `max`, reset after a success: a flapping API server is
/// not hammered, and a recovered one is followed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffSettings {
    /// The first delay.
    pub min: Duration,
    /// The largest delay.
    pub max: Duration,
}

impl Default for BackoffSettings {
    /// client-go's reflector backs off from 800 ms to 30 s; so do we.
    fn default() -> Self {
        BackoffSettings { min: Duration::from_millis(800), max: Duration::from_secs(30) }
    }
}

/// The running backoff for one watcher, as `kube-runtime`'s [`kube::runtime::utils::Backoff`].
#[derive(Debug, Clone)]
pub struct Backoff {
    settings: BackoffSettings,
    next: Duration,
}

impl Backoff {
    /// A fresh backoff.
    pub fn new(settings: BackoffSettings) -> Self {
        Backoff { settings, next: settings.min }
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let cur = self.next;
        self.next = (cur * 2).min(self.settings.max);
        // Jitter in [cur/2, cur]: replicas that lost the API server together do not come back together.
        let half = cur / 2;
        Some(half + half.mul_f64(fastrand::f64()))
    }
}

impl kube::runtime::utils::Backoff for Backoff {
    fn reset(&mut self) {
        self.next = self.settings.min;
    }
}

/// Labels of per-kind metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// The kind (`Service`, `EndpointSlice`, ...).
    pub kind: String,
}

/// Labels of status writes.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: String,
}

/// What the Kubernetes source and the status writer did, for `/metrics`: a watch that keeps failing, relists that
/// keep happening (a too-small watch cache), a replica that never leads, status writes refused by RBAC.
#[derive(Debug, Clone, Default)]
pub struct KubeMetrics {
    lists: Family<KindLabels, Counter>,
    events: Family<KindLabels, Counter>,
    errors: Family<KindLabels, Counter>,
    leader: Gauge,
    status_writes: Family<ResultLabels, Counter>,
}

impl KubeMetrics {
    /// Registers the metrics (`mesh_kube_*`, `mesh_leader`, `mesh_ingress_status_writes`).
    pub fn register(&self, r: &mut Registry) {
        r.register("kube_lists", "Full lists of a kind (the first, then relists after 410 Gone)", self.lists.clone());
        r.register("kube_events", "Watch events received, by kind", self.events.clone());
        r.register(
            "kube_watch_errors",
            "Failed lists and watches (retried with backoff), by kind",
            self.errors.clone(),
        );
        r.register("leader", "1 while this replica holds the Lease and writes Ingress status", self.leader.clone());
        r.register("ingress_status_writes", "Ingress status patches, by result", self.status_writes.clone());
    }

    fn kind(f: &Family<KindLabels, Counter>, kind: crate::model::Kind) {
        f.get_or_create(&KindLabels { kind: kind.to_string() }).inc();
    }

    pub(crate) fn listed(&self, kind: crate::model::Kind) {
        Self::kind(&self.lists, kind);
    }

    pub(crate) fn event(&self, kind: crate::model::Kind) {
        Self::kind(&self.events, kind);
    }

    pub(crate) fn error(&self, kind: crate::model::Kind) {
        Self::kind(&self.errors, kind);
    }

    pub(crate) fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    pub(crate) fn status_write(&self, ok: bool) {
        self.status_writes.get_or_create(&ResultLabels { result: if ok { "ok" } else { "error" }.into() }).inc();
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn backoff_grows_to_max_and_resets() {
        let s = BackoffSettings { min: Duration::from_millis(100), max: Duration::from_millis(400) };
        let mut b = Backoff::new(s);
        let d: Vec<Duration> = (&mut b).take(5).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100), "{d:?}");
        assert!(d[4] >= Duration::from_millis(200) && d[4] <= Duration::from_millis(400), "{d:?}");
        kube::runtime::utils::Backoff::reset(&mut b);
        assert!(b.next().unwrap() <= Duration::from_millis(100));
    }
}

//! One watcher per kind we read, feeding [`Update`]s into the app loop.
//!
//! `kube-runtime`'s [`watcher()`] does the protocol: list (paginated), then watch from the list's
//! `resourceVersion`, resume from the last seen `resourceVersion` when the server closes a watch (its timeout, an
//! API server restart), and relist when told `410 Gone` (as a watch `ERROR` event; we add the relist for a `410`
//! answered to the watch request itself, which `kube-runtime` would retry forever). Each (re)list arrives as `Init`, `InitApply`...,
//! `InitDone`; we buffer it and send it as one [`Update::Relist`], which replaces that kind in the store, so an
//! object deleted during the gap disappears and nothing is counted twice. Errors (dropped connections, a down
//! API server, 5xx) are logged and retried after a jittered exponential [`Backoff`].
//!
//! Our [`Store`](crate::store::Store) is the reflector: `kube-runtime`'s own reflector store would keep a second
//! copy of every object. Before an object is sent it is trimmed ([`trim`]) to what translation reads, which bounds
//! memory by what matters (`managedFields`, `last-applied-configuration`, Node status with its image lists are
//! often most of an object) and makes changes to anything else no-ops in the store. Nodes are watched as metadata
//! only (`PartialObjectMetadata`): their status, which changes often, never crosses the wire.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::{Node, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::{Backoff, KubeMetrics, Settings};
use crate::model::{Kind, Object, TLS_SECRET_TYPE};
use crate::source::Update;
use crate::translate::{READ_ANNOTATIONS, READ_LABELS, READ_SECRET_KEYS};

/// The field selector of the Secret watcher: only TLS Secrets are ever sent to us (least privilege on the wire,
/// least memory), never the cluster's other Secrets.
pub const SECRET_FIELD_SELECTOR: &str = "type=kubernetes.io/tls";

/// The kinds we watch, in the order their watchers start.
pub const KINDS: [Kind; 6] =
    [Kind::IngressClass, Kind::Node, Kind::Service, Kind::EndpointSlice, Kind::Secret, Kind::Ingress];

/// The running watchers; dropping it stops them.
#[derive(Debug)]
pub struct Watchers {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Watchers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts one watcher per kind. Each sends its first list as an [`Update::Relist`]; after the last kind's first
/// list, [`Update::Synced`] follows. The watchers run until the returned handle is dropped or `tx` is closed.
pub fn spawn(settings: &Settings, tx: mpsc::Sender<Update>, metrics: KubeMetrics) -> Watchers {
    let pending = Arc::new(AtomicUsize::new(KINDS.len()));
    let client = settings.client.clone();
    let ns = settings.namespace.as_deref();
    let run = Runner { tx, pending, backoff: settings.backoff, metrics };
    let tasks = vec![
        run.start::<IngressClass>(Api::all(client.clone()), watcher::Config::default(), Kind::IngressClass),
        // Nodes: metadata only (their labels are all we read; their status, with image lists and conditions, is
        // most of a Node and changes often).
        run.start::<PartialObjectMeta<Node>>(Api::all(client.clone()), watcher::Config::default(), Kind::Node),
        run.start::<Service>(scoped(&client, ns), watcher::Config::default(), Kind::Service),
        run.start::<EndpointSlice>(scoped(&client, ns), watcher::Config::default(), Kind::EndpointSlice),
        run.start::<Secret>(
            scoped(&client, ns),
            watcher::Config::default().fields(SECRET_FIELD_SELECTOR),
            Kind::Secret,
        ),
        run.start::<Ingress>(scoped(&client, ns), watcher::Config::default(), Kind::Ingress),
    ];
    Watchers { tasks }
}

fn scoped<K>(client: &kube::Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

#[derive(Clone)]
struct Runner {
    tx: mpsc::Sender<Update>,
    /// Kinds whose first list is not done yet.
    pending: Arc<AtomicUsize>,
    backoff: super::BackoffSettings,
    metrics: KubeMetrics,
}

impl Runner {
    fn start<K>(&self, api: Api<K>, config: watcher::Config, kind: Kind) -> JoinHandle<()>
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        K: Into<Trimmed>,
    {
        self.start_with(kind, move || watcher(api.clone(), config.clone()).boxed())
    }

    /// Runs the watcher `make` builds (again, when a fresh one is needed).
    fn start_with<K, F>(&self, kind: Kind, make: F) -> JoinHandle<()>
    where
        K: Into<Trimmed> + Send + 'static,
        F: Fn() -> BoxStream<'static, Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    {
        let me = self.clone();
        tokio::spawn(async move { me.run(kind, make).await })
    }

    async fn run<K, F>(self, kind: Kind, make: F)
    where
        K: Into<Trimmed> + Send + 'static,
        F: Fn() -> BoxStream<'static, Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    {
        let mut stream = make().backoff(Backoff::new(self.backoff)).boxed();
        let mut buffer: Option<Vec<Object>> = None;
        let mut first = true;
        let mut failing = false;
        while let Some(event) = stream.next().await {
            let update = match event {
                // `410 Gone` as the HTTP status of the watch request itself (an API server without watch cache,
                // or a proxy in front of it), rather than as an ERROR event in the stream: `kube-runtime` would
                // retry the same stale resourceVersion forever. Start a fresh watcher instead: it relists.
                Err(watcher::Error::WatchStartFailed(kube::Error::Api(s))) if s.code == 410 => {
                    warn!(%kind, "watch answered 410 Gone; relisting");
                    self.metrics.error(kind);
                    stream = make().backoff(Backoff::new(self.backoff)).boxed();
                    buffer = None;
                    continue;
                }
                Ok(watcher::Event::Init) => {
                    buffer = Some(Vec::new());
                    None
                }
                Ok(watcher::Event::InitApply(obj)) => {
                    if let Some(o) = into_object(obj, kind) {
                        buffer.get_or_insert_with(Vec::new).push(o);
                    }
                    None
                }
                Ok(watcher::Event::InitDone) => {
                    let objects = buffer.take().unwrap_or_default();
                    info!(%kind, objects = objects.len(), "listed");
                    self.metrics.listed(kind);
                    Some(Update::Relist { kind, objects })
                }
                Ok(watcher::Event::Apply(obj)) => {
                    self.metrics.event(kind);
                    into_object(obj, kind).map(Update::Apply)
                }
                Ok(watcher::Event::Delete(obj)) => {
                    self.metrics.event(kind);
                    into_object(obj, kind).map(|o| Update::Delete(o.object_ref()))
                }
                Err(e) => {
                    self.metrics.error(kind);
                    // One warning per outage, then debug until it recovers: a long outage must not flood the log.
                    if failing {
                        debug!(%kind, "watch still failing: {e}");
                    } else {
                        warn!(%kind, "watch failed, retrying with backoff: {e}");
                    }
                    failing = true;
                    continue;
                }
            };
            if failing {
                info!(%kind, "watch recovered");
                failing = false;
            }
            let Some(update) = update else { continue };
            let synced = matches!(update, Update::Relist { .. }) && std::mem::take(&mut first);
            if self.tx.send(update).await.is_err() {
                return;
            }
            if synced && self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
                info!("every kind listed");
                if self.tx.send(Update::Synced).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// An object trimmed to what translation reads, ready for the store.
#[derive(Debug)]
pub struct Trimmed(Option<Object>);

fn into_object<K: Into<Trimmed>>(obj: K, kind: Kind) -> Option<Object> {
    let out = obj.into().0;
    if out.is_none() {
        debug!(%kind, "object skipped");
    }
    out
}

fn keep_keys(map: Option<BTreeMap<String, String>>, keys: &[&str]) -> Option<BTreeMap<String, String>> {
    let kept: BTreeMap<String, String> = map?.into_iter().filter(|(k, _)| keys.contains(&k.as_str())).collect();
    (!kept.is_empty()).then_some(kept)
}

/// Keeps the identity, creation time (it orders conflicts) and the labels and annotations translation reads;
/// drops `managedFields`, `resourceVersion`, `uid`, owner references and the rest.
pub fn trim_meta(m: ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        creation_timestamp: m.creation_timestamp,
        labels: keep_keys(m.labels, READ_LABELS),
        annotations: keep_keys(m.annotations, READ_ANNOTATIONS),
        ..ObjectMeta::default()
    }
}

/// Trims any object we read to what translation needs (see the module docs).
pub fn trim(obj: Object) -> Object {
    let trimmed: Trimmed = match &obj {
        Object::Service(s) => Service::clone(s).into(),
        Object::EndpointSlice(s) => EndpointSlice::clone(s).into(),
        Object::Ingress(i) => Ingress::clone(i).into(),
        Object::IngressClass(c) => IngressClass::clone(c).into(),
        Object::Secret(s) => Secret::clone(s).into(),
        Object::Node(n) => Node::clone(n).into(),
    };
    trimmed.0.unwrap_or(obj)
}

impl From<Service> for Trimmed {
    fn from(mut s: Service) -> Self {
        s.metadata = trim_meta(s.metadata);
        // The selector is the EndpointSlice controller's business; we read the slices.
        if let Some(spec) = &mut s.spec {
            spec.selector = None;
        }
        Trimmed(Some(Object::Service(Arc::new(s))))
    }
}

impl From<EndpointSlice> for Trimmed {
    fn from(mut s: EndpointSlice) -> Self {
        s.metadata = trim_meta(s.metadata);
        Trimmed(Some(Object::EndpointSlice(Arc::new(s))))
    }
}

impl From<Ingress> for Trimmed {
    /// Keeps `status`: the status writer compares it with what it would write.
    fn from(mut i: Ingress) -> Self {
        i.metadata = trim_meta(i.metadata);
        Trimmed(Some(Object::Ingress(Arc::new(i))))
    }
}

impl From<IngressClass> for Trimmed {
    fn from(mut c: IngressClass) -> Self {
        c.metadata = trim_meta(c.metadata);
        Trimmed(Some(Object::IngressClass(Arc::new(c))))
    }
}

impl From<Secret> for Trimmed {
    /// Keeps `tls.crt` and `tls.key` only; a Secret of another type (the field selector should have excluded it)
    /// is skipped.
    fn from(mut s: Secret) -> Self {
        if s.type_.as_deref() != Some(TLS_SECRET_TYPE) {
            return Trimmed(None);
        }
        s.metadata = trim_meta(s.metadata);
        s.data = s.data.map(|d| d.into_iter().filter(|(k, _)| READ_SECRET_KEYS.contains(&k.as_str())).collect());
        s.string_data = None;
        Trimmed(Some(Object::Secret(Arc::new(s))))
    }
}

impl From<PartialObjectMeta<Node>> for Trimmed {
    /// A Node from its metadata alone (the Node watch asks for nothing more).
    fn from(m: PartialObjectMeta<Node>) -> Self {
        Trimmed(Some(Object::Node(Arc::new(Node { metadata: trim_meta(m.metadata), spec: None, status: None }))))
    }
}

impl From<Node> for Trimmed {
    /// Only the zone label is read: spec and status (images, conditions, addresses) are dropped.
    fn from(mut n: Node) -> Self {
        n.metadata = trim_meta(n.metadata);
        n.spec = None;
        n.status = None;
        Trimmed(Some(Object::Node(Arc::new(n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::translate::translate;

    /// Trimming never changes the snapshot: every field translation reads survives it.
    #[test]
    fn trimming_the_example_keeps_its_snapshot() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/shop");
        let loaded = crate::source::load_dir(&dir).unwrap();
        assert!(!loaded.objects.is_empty());
        let (mut full, mut trimmed) = (Store::new(), Store::new());
        for o in &loaded.objects {
            full.apply(o.clone());
            trimmed.apply(trim(o.clone()));
        }
        let opts = Default::default();
        assert_eq!(translate(&full, &opts), translate(&trimmed, &opts));
    }

    #[test]
    fn trimming_drops_what_is_not_read() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n", "resourceVersion": "7", "uid": "u",
                "labels": {"topology.kubernetes.io/zone": "z", "kubernetes.io/hostname": "n"},
                "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
                "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
            "status": {"images": [{"names": ["busybox"], "sizeBytes": 1}]}}))
        .unwrap();
        let Some(Object::Node(n)) = Trimmed::from(node).0 else { panic!() };
        assert_eq!(
            serde_json::to_value(&*n).unwrap(),
            serde_json::json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "n", "labels": {"topology.kubernetes.io/zone": "z"}}})
        );
        let opaque: Secret =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "s"}, "type": "Opaque"})).unwrap();
        assert!(Trimmed::from(opaque).0.is_none());
        let tls: Secret = serde_json::from_value(serde_json::json!({"metadata": {"name": "s"},
            "type": "kubernetes.io/tls", "data": {"tls.crt": "YQ==", "tls.key": "Yg==", "ca.crt": "Yw=="}}))
        .unwrap();
        let Some(Object::Secret(s)) = Trimmed::from(tls).0 else { panic!() };
        assert_eq!(s.data.as_ref().unwrap().keys().collect::<Vec<_>>(), ["tls.crt", "tls.key"]);
    }
}

//! The control loop as one pure step: a batch of source [`Update`]s in, the next [`Snapshot`] and what changed in
//! the problems out. No I/O, no clock, no tokio: [`crate::app`] feeds it from the source channel and publishes
//! what it returns (xDS, metrics, logs, Ingress status), and the tests here drive it directly.
//!
//! The rules it keeps: nothing is published before the state is complete (a manifest folder's full load, or
//! every watcher's first list: empty is never confused with not-yet-loaded); the first snapshot is a full
//! translation, every later one is incremental over what the batch touched; a batch that changed nothing
//! publishes nothing.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::model::NsName;
use crate::source::{self, Update};
use crate::store::{Changes, Store};
use crate::translate::{Options, Problem, Snapshot, Translator};

/// The loop's state between batches: the store, the translator and what has been published.
#[derive(Debug)]
pub struct Pipeline {
    store: Store,
    translator: Translator,
    /// Every source has delivered its first complete state.
    complete: bool,
    /// A snapshot has been published.
    published: bool,
    /// Changes applied but not translated yet (while incomplete).
    pending: Changes,
    /// The problems of the last published snapshot.
    reported: BTreeSet<Problem>,
}

/// What one batch produced: a snapshot to publish, and why.
#[derive(Debug)]
pub struct Step {
    /// The snapshot.
    pub snapshot: Arc<Snapshot>,
    /// What the batch (and any batch held back before the state was complete) touched.
    pub changes: Changes,
    /// Whether this is the first snapshot.
    pub first: bool,
    /// Problems that were not in the previous snapshot.
    pub appeared: Vec<Problem>,
    /// Problems of the previous snapshot that are gone.
    pub resolved: Vec<Problem>,
}

impl Pipeline {
    /// An empty state, translating with `opts`.
    pub fn new(opts: Options) -> Self {
        Pipeline {
            store: Store::new(),
            translator: Translator::new(opts),
            complete: false,
            published: false,
            pending: Changes::default(),
            reported: BTreeSet::new(),
        }
    }

    /// Applies `batch` in order; the snapshot to publish, or `None` when there is nothing to publish yet (the
    /// state is incomplete) or nothing changed.
    pub fn step(&mut self, batch: impl IntoIterator<Item = Update>) -> Option<Step> {
        for u in batch {
            self.complete |= u.completes();
            self.pending.merge(source::apply(&mut self.store, u));
        }
        if !self.complete || (self.published && self.pending.is_empty()) {
            return None;
        }
        let changes = std::mem::take(&mut self.pending);
        let first = !self.published;
        let snap =
            if first { self.translator.full(&self.store) } else { self.translator.update(&self.store, &changes) };
        let now: BTreeSet<Problem> = snap.problems.iter().cloned().collect();
        let appeared = now.difference(&self.reported).cloned().collect();
        let resolved = self.reported.difference(&now).cloned().collect();
        let snapshot = Arc::new(snap.clone());
        self.reported = now;
        self.published = true;
        Some(Step { snapshot, changes, first, appeared, resolved })
    }

    /// The cluster state as applied so far.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The Ingresses the last snapshot serves (their status is ours to write).
    pub fn served_ingresses(&self) -> &BTreeSet<NsName> {
        self.translator.served_ingresses()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};
    use xds_proto::types::ResourceType;

    use super::*;
    use crate::model::{Kind, Object, ObjectRef, Parsed};

    fn obj(v: Value) -> Object {
        match Object::parse(v).expect("valid object") {
            Parsed::Object(o) => o,
            other => panic!("not an object: {other:?}"),
        }
    }

    fn svc(name: &str, ip: &str) -> Object {
        obj(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "ns"},
            "spec": {"clusterIP": ip, "ports": [{"port": 80}]}}))
    }

    fn svc_without_ports(name: &str) -> Object {
        obj(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "ns"},
            "spec": {"clusterIP": "10.96.0.99", "ports": [{"port": 80, "protocol": "SCTP"}]}}))
    }

    fn listeners(s: &Step) -> Vec<String> {
        s.snapshot.proxy.get(ResourceType::Listener).keys().cloned().collect()
    }

    #[test]
    fn nothing_is_published_before_the_state_is_complete() {
        let mut p = Pipeline::new(Options::default());
        assert!(p.step([Update::Apply(svc("a", "10.96.0.1"))]).is_none(), "a watcher's event before Synced");
        assert!(p.step([Update::Relist { kind: Kind::Service, objects: vec![svc("b", "10.96.0.2")] }]).is_none());
        let s = p.step([Update::Synced]).expect("complete: the first snapshot");
        assert!(s.first);
        assert_eq!(listeners(&s), ["svc/ns/b/80@10.96.0.2"], "the relist removed what it did not list");
    }

    #[test]
    fn an_empty_complete_state_is_published() {
        let mut p = Pipeline::new(Options::default());
        let s = p.step([Update::Synced]).expect("empty is an answer");
        assert!(s.first && listeners(&s).is_empty());
    }

    #[test]
    fn later_batches_are_incremental_and_an_unchanged_batch_publishes_nothing() {
        let mut p = Pipeline::new(Options::default());
        p.step([Update::Apply(svc("a", "10.96.0.1")), Update::Synced]).unwrap();
        let s = p.step([Update::Apply(svc("b", "10.96.0.2"))]).expect("a change");
        assert!(!s.first);
        assert_eq!(listeners(&s), ["svc/ns/a/80@10.96.0.1", "svc/ns/b/80@10.96.0.2"]);
        assert!(s.changes.services.contains(&NsName::new("ns", "b")), "{:?}", s.changes);
        assert!(p.step([Update::Apply(svc("b", "10.96.0.2"))]).is_none(), "the same object again changes nothing");
        let s = p.step([Update::Delete(ObjectRef::new(Kind::Service, "ns", "a"))]).unwrap();
        assert_eq!(listeners(&s), ["svc/ns/b/80@10.96.0.2"]);
    }

    #[test]
    fn problems_are_reported_when_they_appear_and_when_they_are_resolved() {
        let mut p = Pipeline::new(Options::default());
        let s = p.step([Update::Apply(svc_without_ports("bad")), Update::Synced]).unwrap();
        assert_eq!(s.appeared.len(), 1, "{:?}", s.appeared);
        assert!(s.appeared[0].object.to_string().contains("bad"), "{}", s.appeared[0].object);
        assert!(s.resolved.is_empty());
        let s = p.step([Update::Apply(svc("other", "10.96.0.3"))]).unwrap();
        assert!(s.appeared.is_empty() && s.resolved.is_empty(), "a problem still there is not reported again");
        let s = p.step([Update::Delete(ObjectRef::new(Kind::Service, "ns", "bad"))]).unwrap();
        assert!(s.appeared.is_empty());
        assert_eq!(s.resolved.len(), 1);
        assert!(p.served_ingresses().is_empty());
        assert!(p.store().service(&NsName::new("ns", "other")).is_some());
    }
}

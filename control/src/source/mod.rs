//! Sources: where the cluster state comes from, written into the [`Store`].
//!
//! Two sources feed the same path: a folder of manifests ([`manifests`]), loaded whole, watched, and synced into
//! the store with [`sync`], which turns a full listing into the minimal [`Changes`] so translation recomputes only
//! what moved; and the Kubernetes API ([`kubernetes`]), whose watchers send one [`Update`] per event. Both
//! speak [`Update`], applied by [`apply`], so the app loop does not care which one runs.

pub mod kubernetes;
pub mod manifests;

pub use manifests::{Loaded, Rejected, SourceError, WatchHandle, load_dir, watch};

use std::collections::BTreeSet;

use crate::model::{Kind, Object, ObjectRef};
use crate::store::{Changes, Store};

/// One step of a source, in the order it happened.
#[derive(Debug, Clone)]
pub enum Update {
    /// A full listing of every kind (the manifest folder): the store becomes exactly this, see [`sync`]. Complete
    /// by itself, so the state may be served after it.
    Full(Loaded),
    /// A full listing of one kind (a watcher's first list, or its relist after `410 Gone`): objects of that kind
    /// that are not in it were deleted while nobody watched, and are removed.
    Relist {
        /// The kind listed.
        kind: Kind,
        /// Every object of that kind.
        objects: Vec<Object>,
    },
    /// An object was added or modified.
    Apply(Object),
    /// An object was deleted.
    Delete(ObjectRef),
    /// Every kind has been listed once: the state is complete and may be served. Never confuse an empty cluster
    /// with one not yet listed.
    Synced,
}

impl Update {
    /// Whether the state is complete once this update is applied.
    pub fn completes(&self) -> bool {
        matches!(self, Update::Full(_) | Update::Synced)
    }
}

/// Applies one update to the store, returning what it touched.
pub fn apply(store: &mut Store, update: Update) -> Changes {
    match update {
        Update::Full(loaded) => sync(store, &loaded),
        Update::Relist { kind, objects } => {
            let mut changes = Changes::default();
            let mut keep = BTreeSet::new();
            for obj in objects {
                keep.insert(obj.object_ref());
                changes.merge(store.apply(obj));
            }
            for r in store.refs() {
                if r.kind == kind && !keep.contains(&r) {
                    changes.merge(store.delete(&r));
                }
            }
            changes
        }
        Update::Apply(obj) => store.apply(obj),
        Update::Delete(r) => store.delete(&r),
        Update::Synced => Changes::default(),
    }
}

/// Makes the store hold exactly the loaded objects: applies each one and deletes every object the store holds
/// that the load does not, returning what that touched (empty when the folder did not change).
///
/// The folder is the truth, as with `kubectl apply --prune`, with one exception: an object whose document
/// became invalid keeps its last good version, as a cluster would after the API server refused the bad
/// update, so a typo saved into a live folder never takes a Service down. Its rejection, logged by
/// [`load_dir`], says what to fix.
pub fn sync(store: &mut Store, loaded: &Loaded) -> Changes {
    let mut changes = Changes::default();
    let mut keep = BTreeSet::new();
    keep.extend(loaded.rejected.iter().filter_map(|r| r.keep.clone()));
    for obj in &loaded.objects {
        keep.insert(obj.object_ref());
        changes.merge(store.apply(obj.clone()));
    }
    for r in store.refs() {
        if !keep.contains(&r) {
            changes.merge(store.delete(&r));
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NsName;
    use crate::store::SERVICE_NAME_LABEL;
    use std::fs;

    fn svc(name: &str, port: u16) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n  ports:\n  - port: {port}\n"
        )
    }

    fn slice(name: &str, svc: &str, ip: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
             metadata: {{name: {name}, namespace: ns, labels: {{{SERVICE_NAME_LABEL}: {svc}}}}}\n\
             endpoints:\n- addresses: [{ip}]\n"
        )
    }

    const INGRESS: &str = "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: web, namespace: ns}\n\
        spec:\n  defaultBackend:\n    service: {name: a, port: {number: 80}}\n";

    fn services(ch: &Changes) -> Vec<String> {
        ch.services.iter().map(NsName::to_string).collect()
    }

    #[test]
    fn a_relist_replaces_one_kind_and_removes_what_vanished() {
        let mut store = Store::new();
        let parse = |text: &str| match crate::model::Object::parse(serde_yaml::from_str(text).unwrap()).unwrap() {
            crate::model::Parsed::Object(o) => o,
            other => panic!("{other:?}"),
        };
        let a = parse(&svc("a", 80));
        let b = parse(&svc("b", 80));
        let s = parse(&slice("a-1", "a", "10.0.0.1"));
        apply(&mut store, Update::Relist { kind: Kind::Service, objects: vec![a.clone(), b] });
        apply(&mut store, Update::Apply(s));
        assert_eq!(store.refs().len(), 3);
        // b was deleted while the watch was down: the relist of Services drops it, and leaves the slice alone.
        let ch = apply(&mut store, Update::Relist { kind: Kind::Service, objects: vec![a] });
        assert_eq!(services(&ch), ["ns/b"]);
        assert_eq!(store.refs().len(), 2);
        let ch = apply(&mut store, Update::Delete(ObjectRef::new(Kind::EndpointSlice, "ns", "a-1")));
        assert_eq!(services(&ch), ["ns/a"]);
        assert!(!Update::Apply(parse(&svc("c", 1))).completes() && Update::Synced.completes());
    }

    #[test]
    fn sync_applies_the_folder_and_deletes_what_disappeared() {
        let d = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| fs::write(d.path().join(name), text).unwrap();
        write("a.yaml", &format!("{}---\n{}", svc("a", 80), slice("a-1", "a", "10.0.0.1")));
        write("b.yaml", &format!("{}---\n{}", svc("b", 80), slice("b-1", "b", "10.0.0.2")));
        write("ingress.yaml", INGRESS);
        let mut store = Store::new();

        let ch = sync(&mut store, &load_dir(d.path()).unwrap());
        assert_eq!(services(&ch), ["ns/a", "ns/b"]);
        assert!(ch.ingress && !ch.all_services);
        assert_eq!(store.refs().len(), 5);

        // The same folder again: nothing changed.
        assert!(sync(&mut store, &load_dir(d.path()).unwrap()).is_empty());

        // One endpoint moves: only its Service is touched.
        write("a.yaml", &format!("{}---\n{}", svc("a", 80), slice("a-1", "a", "10.0.0.9")));
        let ch = sync(&mut store, &load_dir(d.path()).unwrap());
        assert_eq!(services(&ch), ["ns/a"]);
        assert!(!ch.ingress);

        // A typo saved over a live Service: reported, and the last good version stays in force.
        write("a.yaml", &format!("{}  - port: eighty\n---\n{}", svc("a", 81), slice("a-1", "a", "10.0.0.9")));
        let loaded = load_dir(d.path()).unwrap();
        assert_eq!(loaded.rejected.len(), 1, "{:?}", loaded.rejected);
        assert!(loaded.rejected[0].to_string().contains("Service ns/a: invalid Service"), "{}", loaded.rejected[0]);
        assert!(sync(&mut store, &loaded).is_empty());
        let kept = store.service(&NsName::new("ns", "a")).unwrap();
        assert_eq!(kept.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port, 80);
        write("a.yaml", &format!("{}---\n{}", svc("a", 80), slice("a-1", "a", "10.0.0.9")));

        // A file disappears: its Service and slice are deleted; a Service deletion touches the ingress too.
        fs::remove_file(d.path().join("b.yaml")).unwrap();
        let ch = sync(&mut store, &load_dir(d.path()).unwrap());
        assert_eq!(services(&ch), ["ns/b"]);
        assert!(ch.ingress);
        assert!(store.service(&NsName::new("ns", "b")).is_none());
        assert!(store.slices_of(&NsName::new("ns", "b")).is_empty());

        // The Ingress disappears: only the ingress tables are touched.
        fs::remove_file(d.path().join("ingress.yaml")).unwrap();
        let ch = sync(&mut store, &load_dir(d.path()).unwrap());
        assert!(ch.services.is_empty() && ch.ingress);
        assert_eq!(store.refs().len(), 2);

        // An empty folder empties the store.
        fs::remove_file(d.path().join("a.yaml")).unwrap();
        let ch = sync(&mut store, &load_dir(d.path()).unwrap());
        assert_eq!(services(&ch), ["ns/a"]);
        assert!(store.refs().is_empty());
    }
}

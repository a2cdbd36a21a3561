//! The cluster state sources write and translation reads.
//!
//! Sources (a manifest folder, the Kubernetes API) apply and delete objects; every call says what it touched as
//! [`Changes`], so translation recomputes only those Services (one EndpointSlice edit costs one Service, not
//! the cluster). Applying an object equal to the one held is a no-op.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};

use crate::model::{Kind, NsName, Object, ObjectRef};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What a store update touched.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Services whose resources must be recomputed (their Service or one of their slices changed).
    pub services: BTreeSet<NsName>,
    /// Whether the ingress route tables must be recomputed.
    pub ingress: bool,
    /// Whether every Service must be recomputed (a Node changed, and with it the zones of endpoints).
    pub all_services: bool,
}

impl Changes {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && !self.ingress && !self.all_services
    }

    /// Adds another update's changes.
    pub fn merge(&mut self, other: Changes) {
        self.services.extend(other.services);
        self.ingress |= other.ingress;
        self.all_services |= other.all_services;
    }
}

/// Everything the translation reads, keyed for deterministic iteration.
#[derive(Debug, Default, Clone)]
pub struct Store {
    services: BTreeMap<NsName, Arc<Service>>,
    slices: BTreeMap<NsName, Arc<EndpointSlice>>,
    /// Service key → names of its slices (same namespace).
    slices_by_service: BTreeMap<NsName, BTreeSet<String>>,
    ingresses: BTreeMap<NsName, Arc<Ingress>>,
    classes: BTreeMap<String, Arc<IngressClass>>,
    secrets: BTreeMap<NsName, Arc<Secret>>,
    nodes: BTreeMap<String, Arc<Node>>,
}

fn ns_name(namespace: Option<&String>, name: Option<&String>) -> NsName {
    NsName::new(namespace.map_or("default", |s| s.as_str()), name.map_or("", |s| s.as_str()))
}

/// The Service a slice belongs to, from its label.
pub fn slice_service(slice: &EndpointSlice) -> Option<NsName> {
    let svc = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(NsName::new(slice.metadata.namespace.as_deref().unwrap_or("default"), svc))
}

fn service_shape(s: &Service) -> (Option<&Vec<k8s_openapi::api::core::v1::ServicePort>>, Option<&String>) {
    let spec = s.spec.as_ref();
    (spec.and_then(|s| s.ports.as_ref()), spec.and_then(|s| s.type_.as_ref()))
}

impl Store {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces an object.
    pub fn apply(&mut self, obj: Object) -> Changes {
        let mut ch = Changes::default();
        match obj {
            Object::Service(s) => {
                let key = ns_name(s.metadata.namespace.as_ref(), s.metadata.name.as_ref());
                match self.services.insert(key.clone(), s.clone()) {
                    Some(old) if old == s => {}
                    old => {
                        ch.ingress = old.is_none_or(|o| service_shape(&o) != service_shape(&s));
                        ch.services.insert(key);
                    }
                }
            }
            Object::EndpointSlice(s) => {
                let key = ns_name(s.metadata.namespace.as_ref(), s.metadata.name.as_ref());
                let old = self.slices.insert(key.clone(), s.clone());
                if old.as_ref() == Some(&s) {
                    return ch;
                }
                if let Some(old_svc) = old.as_deref().and_then(slice_service) {
                    self.unindex_slice(&old_svc, &key.name);
                    ch.services.insert(old_svc);
                }
                if let Some(svc) = slice_service(&s) {
                    self.slices_by_service.entry(svc.clone()).or_default().insert(key.name.clone());
                    ch.services.insert(svc);
                }
            }
            Object::Ingress(i) => {
                let key = ns_name(i.metadata.namespace.as_ref(), i.metadata.name.as_ref());
                ch.ingress = self.ingresses.insert(key, i.clone()).as_ref() != Some(&i);
            }
            Object::IngressClass(c) => {
                let key = c.metadata.name.clone().unwrap_or_default();
                ch.ingress = self.classes.insert(key, c.clone()).as_ref() != Some(&c);
            }
            Object::Secret(s) => {
                let key = ns_name(s.metadata.namespace.as_ref(), s.metadata.name.as_ref());
                ch.ingress = self.secrets.insert(key, s.clone()).as_ref() != Some(&s);
            }
            Object::Node(n) => {
                let key = n.metadata.name.clone().unwrap_or_default();
                ch.all_services = self.nodes.insert(key, n.clone()).as_ref() != Some(&n);
            }
        }
        ch
    }

    fn unindex_slice(&mut self, svc: &NsName, slice: &str) {
        if let Some(set) = self.slices_by_service.get_mut(svc) {
            set.remove(slice);
            if set.is_empty() {
                self.slices_by_service.remove(svc);
            }
        }
    }

    /// Removes an object; removing one that is not there changes nothing.
    pub fn delete(&mut self, r: &ObjectRef) -> Changes {
        let mut ch = Changes::default();
        let key = NsName::new(&r.namespace, &r.name);
        match r.kind {
            Kind::Service => {
                if self.services.remove(&key).is_some() {
                    ch.services.insert(key);
                    ch.ingress = true;
                }
            }
            Kind::EndpointSlice => {
                if let Some(svc) = self.slices.remove(&key).as_deref().and_then(slice_service) {
                    self.unindex_slice(&svc, &key.name);
                    ch.services.insert(svc);
                }
            }
            Kind::Ingress => ch.ingress = self.ingresses.remove(&key).is_some(),
            Kind::IngressClass => ch.ingress = self.classes.remove(&r.name).is_some(),
            Kind::Secret => ch.ingress = self.secrets.remove(&key).is_some(),
            Kind::Node => ch.all_services = self.nodes.remove(&r.name).is_some(),
        }
        ch
    }

    /// Every object held, as references (for diffing a new full listing against the store).
    pub fn refs(&self) -> BTreeSet<ObjectRef> {
        fn ns<'a, V: 'a>(kind: Kind, m: &'a BTreeMap<NsName, V>) -> impl Iterator<Item = ObjectRef> + 'a {
            m.keys().map(move |k| ObjectRef::new(kind, &k.namespace, &k.name))
        }
        let mut out = BTreeSet::new();
        out.extend(ns(Kind::Service, &self.services));
        out.extend(ns(Kind::EndpointSlice, &self.slices));
        out.extend(ns(Kind::Ingress, &self.ingresses));
        out.extend(ns(Kind::Secret, &self.secrets));
        out.extend(self.classes.keys().map(|n| ObjectRef::new(Kind::IngressClass, "", n)));
        out.extend(self.nodes.keys().map(|n| ObjectRef::new(Kind::Node, "", n)));
        out
    }

    /// A Service.
    pub fn service(&self, key: &NsName) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    /// Every Service.
    pub fn services(&self) -> impl Iterator<Item = (&NsName, &Arc<Service>)> {
        self.services.iter()
    }

    /// Every Service key that has a Service or slices (a slice may name a Service that does not exist).
    pub fn service_keys(&self) -> BTreeSet<NsName> {
        self.services.keys().chain(self.slices_by_service.keys()).cloned().collect()
    }

    /// The slices of a Service, ordered by name.
    pub fn slices_of(&self, svc: &NsName) -> Vec<&Arc<EndpointSlice>> {
        let Some(names) = self.slices_by_service.get(svc) else { return Vec::new() };
        names.iter().filter_map(|n| self.slices.get(&NsName::new(&svc.namespace, n))).collect()
    }

    /// Every EndpointSlice.
    pub fn slices(&self) -> impl Iterator<Item = (&NsName, &Arc<EndpointSlice>)> {
        self.slices.iter()
    }

    /// Every Ingress.
    pub fn ingresses(&self) -> impl Iterator<Item = (&NsName, &Arc<Ingress>)> {
        self.ingresses.iter()
    }

    /// An IngressClass.
    pub fn class(&self, name: &str) -> Option<&Arc<IngressClass>> {
        self.classes.get(name)
    }

    /// Every IngressClass.
    pub fn classes(&self) -> impl Iterator<Item = (&String, &Arc<IngressClass>)> {
        self.classes.iter()
    }

    /// A TLS Secret.
    pub fn secret(&self, key: &NsName) -> Option<&Arc<Secret>> {
        self.secrets.get(key)
    }

    /// A Node.
    pub fn node(&self, name: &str) -> Option<&Arc<Node>> {
        self.nodes.get(name)
    }

    /// Every Node, by name.
    pub fn nodes(&self) -> impl Iterator<Item = (&String, &Arc<Node>)> {
        self.nodes.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Object, Parsed};
    use serde_json::json;

    fn obj(v: serde_json::Value) -> Object {
        match Object::parse(v).unwrap() {
            Parsed::Object(o) => o,
            other => panic!("{other:?}"),
        }
    }

    fn slice(name: &str, svc: &str, ip: &str) -> Object {
        obj(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "ns", "labels": {SERVICE_NAME_LABEL: svc}},
            "addressType": "IPv4", "endpoints": [{"addresses": [ip]}]}))
    }

    #[test]
    fn slice_changes_touch_only_their_service() {
        let mut st = Store::new();
        let ch = st.apply(slice("a-1", "a", "10.0.0.1"));
        assert_eq!(ch.services.iter().map(|s| s.to_string()).collect::<Vec<_>>(), ["ns/a"]);
        assert!(!ch.ingress);
        // Same content again: nothing.
        assert!(st.apply(slice("a-1", "a", "10.0.0.1")).is_empty());
        // Relabelled to another Service: both are touched, and the index follows.
        let ch = st.apply(slice("a-1", "b", "10.0.0.1"));
        assert_eq!(ch.services.len(), 2);
        assert!(st.slices_of(&NsName::new("ns", "a")).is_empty());
        assert_eq!(st.slices_of(&NsName::new("ns", "b")).len(), 1);
        let ch = st.delete(&ObjectRef::new(Kind::EndpointSlice, "ns", "a-1"));
        assert_eq!(ch.services.len(), 1);
        assert!(st.service_keys().is_empty());
        assert!(st.delete(&ObjectRef::new(Kind::EndpointSlice, "ns", "a-1")).is_empty());
    }

    #[test]
    fn service_port_changes_touch_ingress_but_label_changes_do_not() {
        let mut st = Store::new();
        let svc = |label: &str, port: u16| {
            obj(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "ns",
                "labels": {"x": label}}, "spec": {"ports": [{"port": port}]}}))
        };
        assert!(st.apply(svc("1", 80)).ingress);
        let ch = st.apply(svc("2", 80));
        assert!(!ch.ingress && ch.services.len() == 1);
        assert!(st.apply(svc("2", 81)).ingress);
        let node = obj(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"}}));
        assert!(st.apply(node).all_services);
        assert_eq!(st.refs().len(), 2);
    }
}

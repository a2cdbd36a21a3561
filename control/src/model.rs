//! The cluster state we read, as `k8s-openapi` types, and how a manifest becomes one of them.
//!
//! Only the kinds translation needs are kept; anything else in a manifest folder (Deployments, ConfigMaps, ...)
//! is recognised and set aside, so a folder copied from a real application loads without noise.

use std::fmt;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use serde_json::Value;

/// The Secret type we read; other Secrets are never loaded (least privilege, least memory).
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";

/// Errors turning a manifest document into an object.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The document is not a Kubernetes object.
    #[error("not a Kubernetes object: {0}")]
    NotAnObject(String),
    /// The object does not fit its kind's schema.
    #[error("{kind} {name}: invalid {kind}: {reason}")]
    Invalid {
        /// The kind.
        kind: String,
        /// Its `namespace/name`, as far as known.
        name: String,
        /// What serde said, naming the field.
        reason: String,
        /// The object, when its kind is one we read and it has a name: a source keeps the last good version
        /// of it in force, as the API server would have refused the bad update.
        object: Option<Box<ObjectRef>>,
    },
}

/// The kinds we read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Kind {
    /// `v1` Service.
    Service,
    /// `discovery.k8s.io/v1` EndpointSlice.
    EndpointSlice,
    /// `networking.k8s.io/v1` Ingress.
    Ingress,
    /// `networking.k8s.io/v1` IngressClass (cluster-scoped).
    IngressClass,
    /// `v1` Secret of type `kubernetes.io/tls`.
    Secret,
    /// `v1` Node (cluster-scoped), for zones.
    Node,
}

impl Kind {
    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::IngressClass | Kind::Node)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Names an object: what every log line and problem report points at.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ObjectRef {
    /// The kind.
    pub kind: Kind,
    /// Namespace; empty for cluster-scoped kinds.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjectRef {
    /// A reference to a namespaced object.
    pub fn new(kind: Kind, namespace: &str, name: &str) -> Self {
        ObjectRef { kind, namespace: namespace.to_owned(), name: name.to_owned() }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// `namespace/name`, the key of a namespaced object in the store.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NsName {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl NsName {
    /// Builds a key.
    pub fn new(namespace: &str, name: &str) -> Self {
        NsName { namespace: namespace.to_owned(), name: name.to_owned() }
    }
}

impl fmt::Display for NsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One object we read. `Arc` so the store, the translator and sources share it without copies.
#[derive(Debug, Clone)]
pub enum Object {
    /// A Service.
    Service(Arc<Service>),
    /// An EndpointSlice.
    EndpointSlice(Arc<EndpointSlice>),
    /// An Ingress.
    Ingress(Arc<Ingress>),
    /// An IngressClass.
    IngressClass(Arc<IngressClass>),
    /// A TLS Secret.
    Secret(Arc<Secret>),
    /// A Node.
    Node(Arc<Node>),
}

/// What a manifest document turned out to be.
#[derive(Debug)]
pub enum Parsed {
    /// One of the kinds we read.
    Object(Object),
    /// A valid object of a kind (or Secret type) we do not read.
    Ignored {
        /// `apiVersion/kind`.
        kind: String,
        /// Its name, as far as known.
        name: String,
    },
}

fn meta_of(o: &Object) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
    match o {
        Object::Service(x) => &x.metadata,
        Object::EndpointSlice(x) => &x.metadata,
        Object::Ingress(x) => &x.metadata,
        Object::IngressClass(x) => &x.metadata,
        Object::Secret(x) => &x.metadata,
        Object::Node(x) => &x.metadata,
    }
}

impl Object {
    /// The object's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Ingress(_) => Kind::Ingress,
            Object::IngressClass(_) => Kind::IngressClass,
            Object::Secret(_) => Kind::Secret,
            Object::Node(_) => Kind::Node,
        }
    }

    /// The object's reference.
    pub fn object_ref(&self) -> ObjectRef {
        let m = meta_of(self);
        let namespace = if self.kind().namespaced() { m.namespace.clone().unwrap_or_default() } else { String::new() };
        ObjectRef { kind: self.kind(), namespace, name: m.name.clone().unwrap_or_default() }
    }

    /// Parses one manifest document (`List` documents hold several, see [`parse_document`]).
    ///
    /// A namespaced object without a namespace lands in `default`, as `kubectl apply` would put it.
    pub fn parse(doc: Value) -> Result<Parsed, ModelError> {
        let api = doc.get("apiVersion").and_then(Value::as_str).unwrap_or_default().to_owned();
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default().to_owned();
        if api.is_empty() || kind.is_empty() {
            return Err(ModelError::NotAnObject("missing apiVersion or kind".into()));
        }
        let name = doc.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_owned();
        let ns = doc.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("default").to_owned();
        let our_kind = match (api.as_str(), kind.as_str()) {
            ("v1", "Service") => Some(Kind::Service),
            ("discovery.k8s.io/v1", "EndpointSlice") => Some(Kind::EndpointSlice),
            ("networking.k8s.io/v1", "Ingress") => Some(Kind::Ingress),
            ("networking.k8s.io/v1", "IngressClass") => Some(Kind::IngressClass),
            ("v1", "Secret") => Some(Kind::Secret),
            ("v1", "Node") => Some(Kind::Node),
            _ => None,
        };
        let namespaced = our_kind.is_none_or(Kind::namespaced);
        let full_name = if namespaced { format!("{ns}/{name}") } else { name.clone() };
        let object = our_kind
            .filter(|_| !name.is_empty())
            .map(|k| Box::new(ObjectRef::new(k, if namespaced { &ns } else { "" }, &name)));
        let invalid = |reason: String| ModelError::Invalid {
            kind: kind.clone(),
            name: full_name.clone(),
            reason,
            object: object.clone(),
        };
        let obj = match (api.as_str(), kind.as_str()) {
            ("v1", "Service") => {
                Object::Service(Arc::new(serde_json::from_value(doc).map_err(|e| invalid(e.to_string()))?))
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                Object::EndpointSlice(Arc::new(serde_json::from_value(doc).map_err(|e| invalid(e.to_string()))?))
            }
            ("networking.k8s.io/v1", "Ingress") => {
                Object::Ingress(Arc::new(serde_json::from_value(doc).map_err(|e| invalid(e.to_string()))?))
            }
            ("networking.k8s.io/v1", "IngressClass") => {
                Object::IngressClass(Arc::new(serde_json::from_value(doc).map_err(|e| invalid(e.to_string()))?))
            }
            ("v1", "Secret") => {
                let secret: Secret = serde_json::from_value(doc).map_err(|e| invalid(e.to_string()))?;
                if secret.type_.as_deref() != Some(TLS_SECRET_TYPE) {
                    return Ok(Parsed::Ignored { kind: format!("{api}/{kind}"), name: full_name });
                }
                Object::Secret(Arc::new(secret))
            }
            ("v1", "Node") => Object::Node(Arc::new(serde_json::from_value(doc).map_err(|e| invalid(e.to_string()))?)),
            _ => return Ok(Parsed::Ignored { kind: format!("{api}/{kind}"), name: full_name }),
        };
        if name.is_empty() {
            return Err(invalid("metadata.name is required".into()));
        }
        Ok(Parsed::Object(obj.with_default_namespace()))
    }

    fn with_default_namespace(self) -> Self {
        fn fix<T: Clone>(mut a: Arc<T>, m: impl FnOnce(&mut T)) -> Arc<T> {
            m(Arc::make_mut(&mut a));
            a
        }
        let needs = self.kind().namespaced() && meta_of(&self).namespace.as_deref().unwrap_or_default().is_empty();
        if !needs {
            return self;
        }
        let set =
            |m: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| m.namespace = Some("default".into());
        match self {
            Object::Service(x) => Object::Service(fix(x, |o| set(&mut o.metadata))),
            Object::EndpointSlice(x) => Object::EndpointSlice(fix(x, |o| set(&mut o.metadata))),
            Object::Ingress(x) => Object::Ingress(fix(x, |o| set(&mut o.metadata))),
            Object::Secret(x) => Object::Secret(fix(x, |o| set(&mut o.metadata))),
            other => other,
        }
    }
}

/// Parses a document that may be a `List` (as `kubectl get -o yaml` writes) into its items.
pub fn parse_document(doc: Value) -> Vec<Result<Parsed, ModelError>> {
    let is_list = doc.get("kind").and_then(Value::as_str).is_some_and(|k| k == "List" || k.ends_with("List"))
        && doc.get("items").is_some_and(Value::is_array);
    if is_list {
        match doc {
            Value::Object(mut m) => match m.remove("items") {
                Some(Value::Array(items)) => items.into_iter().map(Object::parse).collect(),
                _ => Vec::new(),
            },
            _ => Vec::new(),
        }
    } else if doc.is_null() {
        Vec::new()
    } else {
        vec![Object::parse(doc)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Object {
        match Object::parse(v).unwrap() {
            Parsed::Object(o) => o,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_kinds_and_defaults_namespace() {
        let s = obj(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}}));
        assert_eq!(s.object_ref().to_string(), "Service default/web");
        let n = obj(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}));
        assert_eq!(n.object_ref().to_string(), "Node n1");
    }

    #[test]
    fn ignores_other_kinds_and_opaque_secrets() {
        let d = Object::parse(json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}}));
        assert!(matches!(d, Ok(Parsed::Ignored { .. })));
        let s =
            Object::parse(json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {"name": "x"}}));
        assert!(matches!(s, Ok(Parsed::Ignored { .. })));
        // Ingress under an old API group is not one we read.
        let old =
            Object::parse(json!({"apiVersion": "extensions/v1beta1", "kind": "Ingress", "metadata": {"name": "x"}}));
        assert!(matches!(old, Ok(Parsed::Ignored { .. })));
    }

    #[test]
    fn bad_documents_are_named_errors() {
        assert!(matches!(Object::parse(json!({"kind": "Service"})), Err(ModelError::NotAnObject(_))));
        let e = Object::parse(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"ports": "eighty"}}))
        .unwrap_err();
        assert!(e.to_string().starts_with("Service default/web: invalid Service"), "{e}");
        assert!(Object::parse(json!({"apiVersion": "v1", "kind": "Service", "metadata": {}})).is_err());
    }

    #[test]
    fn lists_expand() {
        let l = json!({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b"}}]});
        assert_eq!(parse_document(l).len(), 2);
    }
}

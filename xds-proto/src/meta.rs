//! Facts that are ours and not Envoy's, carried in `metadata.filter_metadata["mesh"]`.
//!
//! Envoy ignores filter metadata it has no filter for, so a real Envoy accepts these resources unchanged, while
//! our proxies read them to enforce Kubernetes semantics Envoy cannot express (traffic policies `Local`, the
//! ClientIP affinity timeout, topology hints, one-label wildcard hosts). This list is the whole set of keys.

use crate::core::Metadata;
use crate::protobuf::{ListValue, Struct, Value, value::Kind};

/// The `filter_metadata` key under which all our facts live.
pub const FILTER: &str = "mesh";

/// Listener, Cluster: the Service, as `{ns}/{name}`.
pub const SERVICE: &str = "service";
/// Listener: the Service port number.
pub const PORT: &str = "port";
/// Listener: which Service address this is: [`KIND_CLUSTER_IP`], [`KIND_NODE_PORT`], [`KIND_LOAD_BALANCER`]
/// or [`KIND_EXTERNAL_IP`].
pub const ADDRESS_KIND: &str = "addressKind";
/// Listener: the traffic policy that applies to this address (`Cluster` or `Local`): the Service's
/// `internalTrafficPolicy` for a ClusterIP, its `externalTrafficPolicy` for NodePort, LoadBalancer and
/// external IPs.
pub const TRAFFIC_POLICY: &str = "trafficPolicy";
/// Listener (NodePort and LoadBalancer with `externalTrafficPolicy: Local`): the `healthCheckNodePort`.
pub const HEALTH_CHECK_NODE_PORT: &str = "healthCheckNodePort";
/// Cluster: `sessionAffinity: ClientIP` timeout in seconds; absent when there is no affinity.
pub const AFFINITY_TIMEOUT_SECONDS: &str = "affinityTimeoutSeconds";
/// The affinity timeout when a Service sets none (Kubernetes' default `timeoutSeconds`, 3 hours); also what a
/// node proxy assumes for a RING_HASH Cluster without [`AFFINITY_TIMEOUT_SECONDS`] (e.g. from another control
/// plane).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;
/// Cluster: `internalTrafficPolicy`.
pub const INTERNAL_TRAFFIC_POLICY: &str = "internalTrafficPolicy";
/// Cluster: `externalTrafficPolicy`.
pub const EXTERNAL_TRAFFIC_POLICY: &str = "externalTrafficPolicy";
/// Cluster: `spec.trafficDistribution` (e.g. `PreferClose`), when set.
pub const TRAFFIC_DISTRIBUTION: &str = "trafficDistribution";
/// Cluster: the protocol, `TCP` or `UDP`.
pub const PROTOCOL: &str = "protocol";
/// LbEndpoint: the zones of the endpoint's topology hints (`hints.forZones`).
pub const FOR_ZONES: &str = "forZones";
/// LbEndpoint: the nodes of the endpoint's topology hints (`hints.forNodes`).
pub const FOR_NODES: &str = "forNodes";
/// LbEndpoint: the Pod (`targetRef`) as `{ns}/{name}`, for operators.
pub const POD: &str = "pod";
/// VirtualHost: `true` when the host is a wildcard, which Kubernetes matches against exactly one label
/// while Envoy matches any number of labels.
pub const WILDCARD_ONE_LABEL: &str = "wildcardOneLabel";
/// Route: the Ingress that defined it, as `{ns}/{name}`.
pub const INGRESS: &str = "ingress";
/// Route: the Gateway API route that defined it, as `{Kind}/{ns}/{name}` (`HTTPRoute/default/web`); set
/// instead of [`INGRESS`] on routes made from HTTPRoutes and GRPCRoutes.
pub const ROUTE: &str = "route";
/// Route: the Ingress `pathType` (`Exact`, `Prefix`, `ImplementationSpecific`).
pub const PATH_TYPE: &str = "pathType";

/// [`ADDRESS_KIND`] of a ClusterIP listener.
pub const KIND_CLUSTER_IP: &str = "ClusterIP";
/// [`ADDRESS_KIND`] of a NodePort listener.
pub const KIND_NODE_PORT: &str = "NodePort";
/// [`ADDRESS_KIND`] of a LoadBalancer ingress IP listener.
pub const KIND_LOAD_BALANCER: &str = "LoadBalancer";
/// [`ADDRESS_KIND`] of a `spec.externalIPs` listener.
pub const KIND_EXTERNAL_IP: &str = "ExternalIP";

/// A value to put in our metadata.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// A string.
    Str(String),
    /// A number (protobuf `Struct` numbers are doubles).
    Num(f64),
    /// A boolean.
    Bool(bool),
    /// A list of strings.
    List(Vec<String>),
}

impl From<&str> for MetaValue {
    fn from(s: &str) -> Self {
        MetaValue::Str(s.to_owned())
    }
}
impl From<String> for MetaValue {
    fn from(s: String) -> Self {
        MetaValue::Str(s)
    }
}
impl From<u32> for MetaValue {
    fn from(n: u32) -> Self {
        MetaValue::Num(f64::from(n))
    }
}
impl From<bool> for MetaValue {
    fn from(b: bool) -> Self {
        MetaValue::Bool(b)
    }
}
impl From<Vec<String>> for MetaValue {
    fn from(v: Vec<String>) -> Self {
        MetaValue::List(v)
    }
}

fn to_value(v: MetaValue) -> Value {
    let kind = match v {
        MetaValue::Str(s) => Kind::StringValue(s),
        MetaValue::Num(n) => Kind::NumberValue(n),
        MetaValue::Bool(b) => Kind::BoolValue(b),
        MetaValue::List(l) => Kind::ListValue(ListValue {
            values: l.into_iter().map(|s| Value { kind: Some(Kind::StringValue(s)) }).collect(),
        }),
    };
    Value { kind: Some(kind) }
}

/// Builds `Metadata` with our facts under [`FILTER`]; `None` when there are none, so resources without facts
/// carry no metadata at all.
pub fn build<I>(fields: I) -> Option<Metadata>
where
    I: IntoIterator<Item = (&'static str, MetaValue)>,
{
    let fields: std::collections::HashMap<String, Value> =
        fields.into_iter().map(|(k, v)| (k.to_owned(), to_value(v))).collect();
    if fields.is_empty() {
        return None;
    }
    let mut md = Metadata::default();
    md.filter_metadata.insert(FILTER.to_owned(), Struct { fields });
    Some(md)
}

fn field<'a>(md: Option<&'a Metadata>, key: &str) -> Option<&'a Kind> {
    md?.filter_metadata.get(FILTER)?.fields.get(key)?.kind.as_ref()
}

/// Reads a string fact.
pub fn get_str<'a>(md: Option<&'a Metadata>, key: &str) -> Option<&'a str> {
    match field(md, key)? {
        Kind::StringValue(s) => Some(s),
        _ => None,
    }
}

/// Reads a numeric fact.
pub fn get_num(md: Option<&Metadata>, key: &str) -> Option<f64> {
    match field(md, key)? {
        Kind::NumberValue(n) => Some(*n),
        _ => None,
    }
}

/// Reads a boolean fact.
pub fn get_bool(md: Option<&Metadata>, key: &str) -> Option<bool> {
    match field(md, key)? {
        Kind::BoolValue(b) => Some(*b),
        _ => None,
    }
}

/// Reads a list-of-strings fact (non-string members are skipped).
pub fn get_list(md: Option<&Metadata>, key: &str) -> Vec<String> {
    match field(md, key) {
        Some(Kind::ListValue(l)) => l
            .values
            .iter()
            .filter_map(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_round_trip() {
        let md = build([
            (SERVICE, "shop/web".into()),
            (PORT, 80u32.into()),
            (WILDCARD_ONE_LABEL, true.into()),
            (FOR_ZONES, vec!["a".to_owned(), "b".to_owned()].into()),
        ]);
        let md = md.as_ref();
        assert_eq!(get_str(md, SERVICE), Some("shop/web"));
        assert_eq!(get_num(md, PORT), Some(80.0));
        assert_eq!(get_bool(md, WILDCARD_ONE_LABEL), Some(true));
        assert_eq!(get_list(md, FOR_ZONES), vec!["a", "b"]);
        assert_eq!(get_str(md, PORT), None);
        assert!(build(std::iter::empty()).is_none());
    }
}

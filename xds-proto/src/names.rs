//! Resource names: how a Kubernetes object maps to the name of the xDS resource made from it.
//!
//! Names are part of the contract: a proxy, `meshctl routes` and a real Envoy all find resources by them, and an
//! operator reads them in `config_dump`. They are built only here.

use std::fmt;
use std::net::IpAddr;

/// Listener and RouteConfiguration of the ingress proxy's plain-HTTP port.
pub const INGRESS_HTTP: &str = "ingress/http";
/// Listener and RouteConfiguration of the ingress proxy's TLS port.
pub const INGRESS_HTTPS: &str = "ingress/https";

/// `node.metadata.role` of the per-node L4 proxy (also a snapshot file's role).
pub const ROLE_PROXY: &str = "proxy";
/// `node.metadata.role` of the HTTP(S) ingress proxy (a snapshot file says `ingress/{class}`: [`file_role`]).
pub const ROLE_INGRESS: &str = "ingress";

/// Whom a snapshot file (`meshctl snapshot`) or a `/config_dump` role entry is for: `proxy`, or
/// `ingress/{class}` for the ingress proxies of one IngressClass.
pub fn file_role(ingress_class: Option<&str>) -> String {
    match ingress_class {
        None => ROLE_PROXY.to_owned(),
        Some(class) => format!("{ROLE_INGRESS}/{class}"),
    }
}

/// Whether a snapshot file's role is for the ingress proxy of `class`: `ingress/{class}`, or a bare `ingress`
/// (older files, for any class).
pub fn is_ingress_file_role(role: &str, class: &str) -> bool {
    match role.split_once('/') {
        None => role == ROLE_INGRESS,
        Some((r, c)) => r == ROLE_INGRESS && c == class,
    }
}

/// The body of the 404 a route table answers when no Ingress rule matches (a `direct_response` of the
/// catch-all route mesh-control sends, and what mesh-ingress answers with no route at all).
pub const NOT_FOUND_BODY: &str = "404 page not found: no Ingress rule matches this host and path\n";

/// The Cluster a weighted-cluster entry names for a Gateway API `backendRef` that cannot be resolved (unknown
/// kind, missing Service, not permitted by a ReferenceGrant). No Cluster of this name is ever sent: mesh-ingress
/// answers 500 for the share of requests that pick it, as the Gateway API requires (a real Envoy answers 503).
/// When every backend of a rule is invalid, the route is a `direct_response` 500 instead.
pub const INVALID_BACKEND_CLUSTER: &str = "mesh/invalid-backend";

/// Prefix of every Service listener's name (see [`service_listener_name`]); a node proxy serves only these.
pub const SERVICE_LISTENER_PREFIX: &str = "svc/";

/// The `@…` of a NodePort listener's name.
const AT_NODE_PORT: &str = "nodeport";

/// Prefix of the per-node ClusterLoadAssignment (see [`node_locality`]).
pub const NODE_PREFIX: &str = "node/";

/// The ClusterLoadAssignment that tells a node proxy where its own node is: `node/{node}`, holding one
/// `LocalityLbEndpoints` without endpoints whose `locality` is the Node's zone (`topology.kubernetes.io/zone`)
/// and, as `sub_zone`, the node name. mesh-control sends each node proxy only its own (by `node.id`), and only
/// when the Node has a zone; a real Envoy never asks for it (its EDS subscriptions name their clusters).
pub fn node_locality(node: &str) -> String {
    format!("{NODE_PREFIX}{node}")
}

/// The node a [`node_locality`] resource name is about, if it is one.
pub fn node_of_locality(name: &str) -> Option<&str> {
    name.strip_prefix(NODE_PREFIX).filter(|n| !n.is_empty())
}

/// How a Service port is named inside resource names: its `name` when it has one, else its number
/// (Kubernetes requires names only when a Service has several ports).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortKey {
    /// The port's `name`.
    Name(String),
    /// The port's number, for an unnamed port.
    Number(u16),
}

impl PortKey {
    /// The key for a Service port: by name when the name is non-empty.
    pub fn new(name: Option<&str>, number: u16) -> Self {
        match name {
            Some(n) if !n.is_empty() => PortKey::Name(n.to_owned()),
            _ => PortKey::Number(number),
        }
    }
}

impl fmt::Display for PortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortKey::Name(n) => f.write_str(n),
            PortKey::Number(n) => write!(f, "{n}"),
        }
    }
}

/// Cluster and ClusterLoadAssignment of one Service port: `{ns}/{name}/{port}`.
pub fn cluster_name(namespace: &str, service: &str, port: &PortKey) -> String {
    format!("{namespace}/{service}/{port}")
}

/// Where a Service listener accepts traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ListenerAt {
    /// A ClusterIP, an external IP or a LoadBalancer ingress IP.
    Ip(IpAddr),
    /// The Service's NodePort, on every address of the node.
    NodePort,
}

impl fmt::Display for ListenerAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenerAt::Ip(ip) => write!(f, "{ip}"),
            ListenerAt::NodePort => f.write_str(AT_NODE_PORT),
        }
    }
}

/// Listener of one Service port at one address: `svc/{ns}/{name}/{port}@{ip|nodeport}`.
pub fn service_listener_name(namespace: &str, service: &str, port: &PortKey, at: ListenerAt) -> String {
    format!("{SERVICE_LISTENER_PREFIX}{namespace}/{service}/{port}@{at}")
}

/// The parts of a Service listener name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceListenerName {
    /// Namespace of the Service.
    pub namespace: String,
    /// Name of the Service.
    pub service: String,
    /// The port, as named in [`cluster_name`].
    pub port: String,
    /// Where it listens.
    pub at: ListenerAt,
}

/// Splits a name made by [`service_listener_name`]; `None` for any other name.
pub fn parse_service_listener_name(name: &str) -> Option<ServiceListenerName> {
    let rest = name.strip_prefix(SERVICE_LISTENER_PREFIX)?;
    let (path, at) = rest.rsplit_once('@')?;
    let mut parts = path.splitn(3, '/');
    let namespace = parts.next()?.to_owned();
    let service = parts.next()?.to_owned();
    let port = parts.next()?.to_owned();
    if namespace.is_empty() || service.is_empty() || port.is_empty() {
        return None;
    }
    let at = if at == AT_NODE_PORT { ListenerAt::NodePort } else { ListenerAt::Ip(at.parse().ok()?) };
    Some(ServiceListenerName { namespace, service, port, at })
}

/// SDS Secret made from a `kubernetes.io/tls` Secret: `{ns}/{name}`.
pub fn secret_name(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        let p = PortKey::new(Some("http"), 80);
        assert_eq!(cluster_name("shop", "web", &p), "shop/web/http");
        assert_eq!(cluster_name("shop", "web", &PortKey::new(None, 80)), "shop/web/80");
        assert_eq!(cluster_name("shop", "web", &PortKey::new(Some(""), 80)), "shop/web/80");
        let ip: IpAddr = "10.96.0.10".parse().unwrap();
        assert_eq!(service_listener_name("shop", "web", &p, ListenerAt::Ip(ip)), "svc/shop/web/http@10.96.0.10");
        assert_eq!(service_listener_name("shop", "web", &p, ListenerAt::NodePort), "svc/shop/web/http@nodeport");
        assert_eq!(secret_name("shop", "tls"), "shop/tls");
        assert_eq!(file_role(None), "proxy");
        assert_eq!(file_role(Some("mesh")), "ingress/mesh");
    }

    #[test]
    fn ingress_file_roles_name_their_class() {
        assert!(is_ingress_file_role(&file_role(Some("mesh")), "mesh"));
        assert!(is_ingress_file_role("ingress", "other"), "a bare role is for any class");
        assert!(!is_ingress_file_role("ingress/mesh", "other"));
        assert!(!is_ingress_file_role("proxy", "mesh"));
        assert!(!is_ingress_file_role("proxy/mesh", "mesh"));
    }

    #[test]
    fn listener_names_parse_back() {
        for at in [ListenerAt::NodePort, ListenerAt::Ip("fd00::10".parse().unwrap())] {
            let name = service_listener_name("a", "b", &PortKey::Number(53), at);
            let parsed = parse_service_listener_name(&name).unwrap();
            assert_eq!((parsed.namespace.as_str(), parsed.service.as_str(), parsed.port.as_str()), ("a", "b", "53"));
            assert_eq!(parsed.at, at);
        }
        for bad in ["ingress/http", "svc/a/b@nodeport", "svc//b/c@nodeport", "svc/a/b/c@not-an-ip"] {
            assert!(parse_service_listener_name(bad).is_none(), "{bad}");
        }
    }
}

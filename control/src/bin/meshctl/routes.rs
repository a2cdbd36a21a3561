//! The routing table an operator reads (`meshctl routes`): where each Service address, host and path leads.
//!
//! It is read back from the xDS resources themselves, not from the Kubernetes objects, so it shows exactly what
//! the proxies are sent, whether the resources come from an offline translation or (later) from a running
//! control plane over xDS.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use bytes::Bytes;
use prost::Message;
use serde::Serialize;
use xds_proto::cluster::Cluster;
use xds_proto::core::{HealthStatus, address, socket_address};
use xds_proto::endpoint::{ClusterLoadAssignment, lb_endpoint};
use xds_proto::listener::{Listener, filter, listener_filter};
use xds_proto::meta;
use xds_proto::route::{RouteConfiguration, route, route_action, route_match};
use xds_proto::types::ResourceType;

use mesh_control::translate::{RoleSnapshot, Snapshot};

/// Why the table could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    /// A resource does not decode as its type.
    #[error("{kind} resource {name:?} does not decode: {reason}")]
    Decode {
        /// Its type.
        kind: ResourceType,
        /// Its name.
        name: String,
        /// What prost said.
        reason: String,
    },
}

/// The encoded resources of one role by type and name: from a snapshot, or as received over xDS.
pub type Encoded = BTreeMap<ResourceType, BTreeMap<String, Bytes>>;

/// The encoded form of a role's snapshot.
pub fn encoded(role: &RoleSnapshot) -> Encoded {
    ResourceType::ALL
        .into_iter()
        .map(|t| (t, role.get(t).iter().map(|(n, r)| (n.clone(), r.body.clone())).collect()))
        .collect()
}

/// One endpoint as an operator reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointRow {
    /// `ip:port`.
    pub address: String,
    /// `ready`, `terminating` (still serving, used only when nothing is ready) or `not-ready`.
    pub state: String,
    /// The node it runs on, if known.
    pub node: String,
    /// Its zone, if known.
    pub zone: String,
    /// The Pod, if known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// One Service address on the node proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AddressRow {
    /// `ip:port`, `[ip]:port` or `*:nodePort`.
    pub address: String,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// `ClusterIP`, `NodePort`, `LoadBalancer` or `ExternalIP`.
    pub kind: String,
    /// `namespace/name`.
    pub service: String,
    /// The Service port (name or number).
    pub port: String,
    /// `Cluster` or `Local`.
    pub traffic_policy: String,
    /// `ClientIP` session affinity timeout in seconds, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity_timeout_seconds: Option<u32>,
    /// The Cluster it balances over.
    pub cluster: String,
    /// The endpoints (for a `Local` policy with a node given: only that node's).
    pub endpoints: Vec<EndpointRow>,
}

/// One route of an ingress proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IngressRow {
    /// The IngressClass.
    pub class: String,
    /// `http` or `https`.
    pub listener: String,
    /// The host (`*` for any).
    pub host: String,
    /// The path as matched.
    pub path: String,
    /// `Exact` or `Prefix`.
    #[serde(rename = "match")]
    pub match_type: String,
    /// The Cluster, or what happens instead (`redirect https`, `503 ...`, `404`).
    pub backend: String,
    /// The Ingress that defined it, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingress: Option<String>,
    /// The backend's endpoints.
    pub endpoints: Vec<EndpointRow>,
}

/// The whole table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RouteTable {
    /// Service addresses, by address.
    pub addresses: Vec<AddressRow>,
    /// Ingress routes, in match order per class, listener and host.
    pub ingress: Vec<IngressRow>,
    /// What could not be translated.
    pub problems: Vec<String>,
}

fn decode<M: Message + Default>(kind: ResourceType, name: &str, body: &[u8]) -> Result<M, RoutesError> {
    M::decode(body).map_err(|e| RoutesError::Decode { kind, name: name.to_owned(), reason: e.to_string() })
}

fn socket(a: Option<&xds_proto::core::Address>) -> Option<(String, u32)> {
    match a?.address.as_ref()? {
        address::Address::SocketAddress(sa) => match sa.port_specifier {
            Some(socket_address::PortSpecifier::PortValue(p)) => Some((sa.address.clone(), p)),
            _ => None,
        },
        _ => None,
    }
}

fn host_port(ip: &str, port: u32) -> String {
    if ip.contains(':') { format!("[{ip}]:{port}") } else { format!("{ip}:{port}") }
}

/// The Cluster a Service listener sends to (tcp_proxy or udp_proxy).
fn listener_cluster(l: &Listener) -> Option<String> {
    for f in l.filter_chains.iter().flat_map(|c| &c.filters) {
        if let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type
            && let Ok(t) = xds_proto::tcp_proxy::TcpProxy::decode(&any.value[..])
            && let Some(xds_proto::tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster(c)) = t.cluster_specifier
        {
            return Some(c);
        }
    }
    for f in &l.listener_filters {
        if let Some(listener_filter::ConfigType::TypedConfig(any)) = &f.config_type {
            let Ok(u) = xds_proto::udp_proxy::UdpProxyConfig::decode(&any.value[..]) else { continue };
            if let Some(xds_proto::udp_proxy::udp_proxy_config::RouteSpecifier::Matcher(m)) = u.route_specifier {
                let action = m.on_no_match.and_then(|o| o.on_match);
                if let Some(xds_proto::xds_matcher::matcher::on_match::OnMatch::Action(a)) = action {
                    let route = a.typed_config.and_then(|t| xds_proto::udp_proxy::Route::decode(&t.value[..]).ok());
                    return route.map(|r| r.cluster);
                }
            }
        }
    }
    None
}

fn endpoint_rows(cla: Option<&ClusterLoadAssignment>, only_node: Option<&str>) -> Vec<EndpointRow> {
    let Some(cla) = cla else { return Vec::new() };
    let mut rows = Vec::new();
    for loc in &cla.endpoints {
        let (zone, node) = loc.locality.as_ref().map(|l| (l.zone.clone(), l.sub_zone.clone())).unwrap_or_default();
        if only_node.is_some_and(|n| n != node) {
            continue;
        }
        for e in &loc.lb_endpoints {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else { continue };
            let Some((ip, port)) = socket(ep.address.as_ref()) else { continue };
            let state = match HealthStatus::try_from(e.health_status) {
                Ok(HealthStatus::Healthy | HealthStatus::Unknown) => "ready",
                Ok(HealthStatus::Draining) => "terminating",
                _ => "not-ready",
            };
            rows.push(EndpointRow {
                address: host_port(&ip, port),
                state: state.to_owned(),
                node: node.clone(),
                zone: zone.clone(),
                pod: meta::get_str(e.metadata.as_ref(), meta::POD).map(str::to_owned),
            });
        }
    }
    rows.sort_by(|a, b| a.address.cmp(&b.address));
    rows
}

fn clas(enc: &Encoded) -> Result<BTreeMap<String, ClusterLoadAssignment>, RoutesError> {
    let mut out = BTreeMap::new();
    for (name, body) in enc.get(&ResourceType::ClusterLoadAssignment).into_iter().flatten() {
        out.insert(name.clone(), decode(ResourceType::ClusterLoadAssignment, name, body)?);
    }
    Ok(out)
}

/// The Service-address rows of a node proxy's resources; with `node`, `Local` policies show only that node's
/// endpoints, as that node's proxy uses them.
pub fn address_rows(proxy: &Encoded, node: Option<&str>) -> Result<Vec<AddressRow>, RoutesError> {
    let clas = clas(proxy)?;
    let mut clusters = BTreeMap::new();
    for (name, body) in proxy.get(&ResourceType::Cluster).into_iter().flatten() {
        clusters.insert(name.clone(), decode::<Cluster>(ResourceType::Cluster, name, body)?);
    }
    let mut rows = Vec::new();
    for (name, body) in proxy.get(&ResourceType::Listener).into_iter().flatten() {
        let l: Listener = decode(ResourceType::Listener, name, body)?;
        let md = l.metadata.as_ref();
        let Some(service) = meta::get_str(md, meta::SERVICE) else { continue };
        let kind = meta::get_str(md, meta::ADDRESS_KIND).unwrap_or_default().to_owned();
        let policy = meta::get_str(md, meta::TRAFFIC_POLICY).unwrap_or("Cluster").to_owned();
        let (ip, port) = socket(l.address.as_ref()).unwrap_or_default();
        let address = if kind == meta::KIND_NODE_PORT { format!("*:{port}") } else { host_port(&ip, port) };
        let cluster = listener_cluster(&l).unwrap_or_default();
        let c = clusters.get(&cluster);
        let protocol = c.and_then(|c| meta::get_str(c.metadata.as_ref(), meta::PROTOCOL)).unwrap_or("TCP").to_owned();
        let affinity =
            c.and_then(|c| meta::get_num(c.metadata.as_ref(), meta::AFFINITY_TIMEOUT_SECONDS)).map(|t| t as u32);
        let only = if policy == "Local" { node } else { None };
        rows.push(AddressRow {
            address,
            protocol,
            kind,
            service: service.to_owned(),
            port: xds_proto::names::parse_service_listener_name(name).map(|n| n.port).unwrap_or_default(),
            traffic_policy: policy,
            affinity_timeout_seconds: affinity,
            endpoints: endpoint_rows(clas.get(&cluster), only),
            cluster,
        });
    }
    // ClusterIPs first, then external addresses, NodePorts last; addresses in numeric order.
    let key = |a: &AddressRow| {
        let rank =
            [meta::KIND_CLUSTER_IP, meta::KIND_EXTERNAL_IP, meta::KIND_LOAD_BALANCER].iter().position(|k| *k == a.kind);
        let (host, port) = a.address.rsplit_once(':').unwrap_or((&a.address, ""));
        let ip = host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().ok();
        (rank.unwrap_or(3), ip, port.parse::<u16>().unwrap_or(0), a.protocol.clone())
    };
    rows.sort_by_cached_key(key);
    Ok(rows)
}

/// The route rows of one ingress class's resources, in match order.
pub fn ingress_rows(class: &str, enc: &Encoded) -> Result<Vec<IngressRow>, RoutesError> {
    let clas = clas(enc)?;
    let mut rows = Vec::new();
    for (name, body) in enc.get(&ResourceType::RouteConfiguration).into_iter().flatten() {
        let rc: RouteConfiguration = decode(ResourceType::RouteConfiguration, name, body)?;
        let listener = name.rsplit('/').next().unwrap_or(name).to_owned();
        for vh in &rc.virtual_hosts {
            for r in &vh.routes {
                let (path, match_type) = match r.r#match.as_ref().and_then(|m| m.path_specifier.as_ref()) {
                    Some(route_match::PathSpecifier::Path(p)) => (p.clone(), "Exact"),
                    Some(route_match::PathSpecifier::PathSeparatedPrefix(p)) => (p.clone(), "Prefix"),
                    Some(route_match::PathSpecifier::Prefix(p)) => (p.clone(), "Prefix"),
                    _ => ("?".to_owned(), "?"),
                };
                let (backend, endpoints) = match &r.action {
                    Some(route::Action::Route(a)) => match &a.cluster_specifier {
                        Some(route_action::ClusterSpecifier::Cluster(c)) => {
                            (c.clone(), endpoint_rows(clas.get(c), None))
                        }
                        _ => ("?".to_owned(), Vec::new()),
                    },
                    Some(route::Action::Redirect(_)) => ("redirect to https".to_owned(), Vec::new()),
                    Some(route::Action::DirectResponse(d)) => {
                        let body = d.body.as_ref().and_then(|b| match &b.specifier {
                            Some(xds_proto::core::data_source::Specifier::InlineString(s)) => Some(s.trim().to_owned()),
                            _ => None,
                        });
                        let shown = match (d.status, body) {
                            (404, _) => "404 (no rule matches)".to_owned(),
                            (s, Some(b)) => format!("{s}: {}", b.split_once(": ").map_or(b.as_str(), |x| x.1)),
                            (s, None) => s.to_string(),
                        };
                        (shown, Vec::new())
                    }
                    _ => ("?".to_owned(), Vec::new()),
                };
                rows.push(IngressRow {
                    class: class.to_owned(),
                    listener: listener.clone(),
                    host: vh.domains.first().cloned().unwrap_or_default(),
                    path,
                    match_type: match_type.to_owned(),
                    backend,
                    ingress: meta::get_str(r.metadata.as_ref(), meta::INGRESS).map(str::to_owned),
                    endpoints,
                });
            }
        }
    }
    Ok(rows)
}

/// The table of a translated snapshot.
pub fn from_snapshot(s: &Snapshot, node: Option<&str>) -> Result<RouteTable, RoutesError> {
    let mut t = RouteTable { addresses: address_rows(&encoded(&s.proxy), node)?, ..RouteTable::default() };
    for (class, role) in &s.ingress {
        t.ingress.extend(ingress_rows(class, &encoded(role))?);
    }
    t.problems = s.problems.iter().map(ToString::to_string).collect();
    Ok(t)
}

fn endpoints_text(eps: &[EndpointRow]) -> Vec<String> {
    if eps.is_empty() {
        return vec!["(none)".to_owned()];
    }
    eps.iter()
        .map(|e| {
            let mut s = format!("{} {}", e.address, e.state);
            let place: Vec<&str> = [e.node.as_str(), e.zone.as_str()].into_iter().filter(|x| !x.is_empty()).collect();
            if !place.is_empty() {
                let _ = write!(s, " {}", place.join("/"));
            }
            if let Some(p) = &e.pod {
                let _ = write!(s, " {p}");
            }
            s
        })
        .collect()
}

/// Lays out rows as aligned columns; the last column may span several lines.
fn columns(out: &mut String, header: &[&str], rows: &[(Vec<String>, Vec<String>)]) {
    let n = header.len() - 1;
    let mut widths: Vec<usize> = header[..n].iter().map(|h| h.len()).collect();
    for (cells, _) in rows {
        for (w, c) in widths.iter_mut().zip(cells) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |out: &mut String, cells: &[String], last: &str| {
        for (c, w) in cells.iter().zip(&widths) {
            let _ = write!(out, "{c:<w$}  ");
        }
        let _ = writeln!(out, "{last}");
    };
    line(out, &header[..n].iter().map(|s| s.to_string()).collect::<Vec<_>>(), header[n]);
    let blank: Vec<String> = widths.iter().map(|_| String::new()).collect();
    for (cells, lasts) in rows {
        for (i, last) in lasts.iter().enumerate() {
            line(out, if i == 0 { cells } else { &blank }, last);
        }
    }
}

impl RouteTable {
    /// The human-readable table (`-o table`).
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "SERVICE ADDRESSES (node proxy)");
        let rows: Vec<(Vec<String>, Vec<String>)> = self
            .addresses
            .iter()
            .map(|a| {
                let mut policy = a.traffic_policy.clone();
                if let Some(t) = a.affinity_timeout_seconds {
                    let _ = write!(policy, ", affinity {t}s");
                }
                let cells = vec![
                    a.address.clone(),
                    a.protocol.clone(),
                    a.kind.clone(),
                    format!("{}:{}", a.service, a.port),
                    policy,
                ];
                (cells, endpoints_text(&a.endpoints))
            })
            .collect();
        columns(&mut out, &["ADDRESS", "PROTO", "KIND", "SERVICE:PORT", "POLICY", "ENDPOINTS"], &rows);
        if self.addresses.is_empty() {
            let _ = writeln!(out, "(none)");
        }
        let mut classes: Vec<&str> = self.ingress.iter().map(|r| r.class.as_str()).collect();
        classes.dedup();
        for class in classes {
            let _ = writeln!(out, "\nINGRESS ROUTES (class {class})");
            let rows: Vec<(Vec<String>, Vec<String>)> = self
                .ingress
                .iter()
                .filter(|r| r.class == class)
                .map(|r| {
                    let mut lasts = vec![r.backend.clone()];
                    if r.backend.contains('/') {
                        lasts =
                            endpoints_text(&r.endpoints).into_iter().map(|e| format!("{} → {e}", r.backend)).collect();
                    }
                    let cells = vec![
                        r.listener.clone(),
                        r.host.clone(),
                        r.path.clone(),
                        r.match_type.clone(),
                        r.ingress.clone().unwrap_or_else(|| "-".into()),
                    ];
                    (cells, lasts)
                })
                .collect();
            columns(&mut out, &["LISTENER", "HOST", "PATH", "MATCH", "INGRESS", "BACKEND → ENDPOINTS"], &rows);
        }
        let _ = writeln!(out, "\nPROBLEMS");
        if self.problems.is_empty() {
            let _ = writeln!(out, "(none)");
        }
        for p in &self.problems {
            let _ = writeln!(out, "- {p}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_control::model::{Object, Parsed};
    use mesh_control::store::Store;
    use mesh_control::translate::{Options, translate};
    use serde_json::json;

    fn store(objs: Vec<serde_json::Value>) -> Store {
        let mut s = Store::new();
        for o in objs {
            if let Ok(Parsed::Object(o)) = Object::parse(o) {
                s.apply(o);
            }
        }
        s
    }

    fn sample() -> Store {
        store(vec![
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "ns"},
                "spec": {"clusterIP": "10.96.0.10", "internalTrafficPolicy": "Local",
                    "ports": [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]}}),
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "web-1",
                "namespace": "ns", "labels": {"kubernetes.io/service-name": "web"}}, "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
                "endpoints": [
                    {"addresses": ["10.0.0.1"], "nodeName": "n1", "zone": "z1", "targetRef": {"kind": "Pod", "name": "web-a"}},
                    {"addresses": ["10.0.0.2"], "nodeName": "n2", "conditions": {"ready": false, "serving": true, "terminating": true}}]}),
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass", "metadata": {"name": "mesh"},
                "spec": {"controller": xds_proto::INGRESS_CONTROLLER}}),
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "i", "namespace": "ns"},
                "spec": {"ingressClassName": "mesh", "rules": [{"host": "x.example.com", "http": {"paths": [
                    {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"name": "http"}}}},
                    {"path": "/gone", "pathType": "Exact", "backend": {"service": {"name": "nope", "port": {"number": 80}}}}]}}]}}),
        ])
    }

    #[test]
    fn table_shows_addresses_routes_endpoints_and_problems() {
        let s = translate(&sample(), &Options::default());
        let t = from_snapshot(&s, None).unwrap();
        let web = t.addresses.iter().find(|a| a.address == "10.96.0.10:80").unwrap();
        assert_eq!(
            (web.protocol.as_str(), web.kind.as_str(), web.service.as_str(), web.port.as_str()),
            ("TCP", "ClusterIP", "ns/web", "http")
        );
        assert_eq!(web.traffic_policy, "Local");
        let states: Vec<(&str, &str)> = web.endpoints.iter().map(|e| (e.address.as_str(), e.state.as_str())).collect();
        assert_eq!(states, [("10.0.0.1:8080", "ready"), ("10.0.0.2:8080", "terminating")]);
        assert_eq!(web.endpoints[0].pod.as_deref(), Some("ns/web-a"));
        let dns = t.addresses.iter().find(|a| a.address == "10.96.0.10:53").unwrap();
        assert_eq!((dns.protocol.as_str(), dns.cluster.as_str()), ("UDP", "ns/web/dns"));
        let routes: Vec<(&str, &str, &str, &str)> = t
            .ingress
            .iter()
            .map(|r| (r.host.as_str(), r.path.as_str(), r.match_type.as_str(), r.backend.as_str()))
            .collect();
        assert_eq!(
            routes[..3],
            [
                ("x.example.com", "/gone", "Exact", "503: backend Service ns/nope does not exist"),
                ("x.example.com", "/", "Prefix", "ns/web/http"),
                ("*", "/", "Prefix", "404 (no rule matches)"),
            ]
        );
        assert_eq!(t.problems.len(), 1, "{:?}", t.problems);
        let text = t.to_text();
        assert!(text.contains("10.96.0.10:80"), "{text}");
        assert!(text.contains("10.0.0.2:8080 terminating n2"), "{text}");
        assert!(text.contains("ns/web/http → 10.0.0.1:8080 ready n1/z1 ns/web-a"), "{text}");
        assert!(text.contains("- Ingress ns/i: rules[0].paths[1]: backend Service ns/nope does not exist"), "{text}");
    }

    #[test]
    fn node_view_keeps_only_local_endpoints_for_local_policies() {
        let s = translate(&sample(), &Options::default());
        let t = from_snapshot(&s, Some("n2")).unwrap();
        let web = t.addresses.iter().find(|a| a.address == "10.96.0.10:80").unwrap();
        assert_eq!(web.endpoints.iter().map(|e| e.address.as_str()).collect::<Vec<_>>(), ["10.0.0.2:8080"]);
    }

    #[test]
    fn undecodable_resources_are_errors() {
        let mut enc = Encoded::new();
        enc.entry(ResourceType::Listener).or_default().insert("x".into(), Bytes::from_static(&[0x0a, 0xff]));
        assert!(matches!(address_rows(&enc, None), Err(RoutesError::Decode { .. })));
    }
}

//! One Service and its EndpointSlices → its Clusters, ClusterLoadAssignments and Listener candidates.
//!
//! Kubernetes semantics, and where they come from:
//! - Addresses: each of `clusterIPs` (IPv4 and IPv6), `externalIPs`, the NodePort (NodePort and LoadBalancer
//!   types) and each `status.loadBalancer.ingress[].ip` whose `ipMode` is not `Proxy` (KEP-1860: with `Proxy` the
//!   load balancer delivers to the node, so the proxy must not short-circuit the LB IP). ExternalName and headless
//!   Services get no listener; a headless Service still gets its Cluster, which an Ingress may route to.
//! - Ports: `targetPort` is resolved per EndpointSlice, from the slice port with the Service port's name and
//!   protocol (what the EndpointSlice controller writes), so a named `targetPort` may differ between Pods.
//! - Endpoints: all slices merged; the first address of each endpoint, as kube-proxy does; `ready` (nil = true)
//!   → HEALTHY, else `serving` (nil = true) and `terminating` → DRAINING, else UNHEALTHY; the same `ip:port` in
//!   several slices is kept once, in its best state.
//! - Services carrying `service.kubernetes.io/service-proxy-name` (another proxy owns them) or
//!   `service.kubernetes.io/headless` are not ours and produce nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use xds_proto::cluster::{Cluster, cluster};
use xds_proto::core::{HealthStatus, Locality, address::Address as AddressKind};
use xds_proto::endpoint::{ClusterLoadAssignment, LbEndpoint, LocalityLbEndpoints, lb_endpoint};
use xds_proto::listener::Listener;
use xds_proto::meta::{self, MetaValue};
use xds_proto::names::{self, ListenerAt, PortKey};

use super::envoy::{self, Protocol};
use super::{Problem, Resource};
use crate::model::{Kind, NsName, ObjectRef};
use crate::store::Store;

/// A Service label meaning another proxy implementation owns the Service.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// A label the EndpointSlice controller treats as "headless"; kube-proxy skips such Services.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The Node label that gives an endpoint's zone when the slice does not.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub use xds_proto::meta::DEFAULT_AFFINITY_TIMEOUT_SECONDS as DEFAULT_AFFINITY_TIMEOUT;

/// Where a listener accepts traffic; two Services claiming the same one conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ListenKey {
    /// TCP or UDP: the same ip:port may serve one Service's TCP and another's UDP.
    pub protocol: Protocol,
    /// The address, or NodePort (every node address).
    pub at: ListenerAt,
    /// The port.
    pub port: u16,
}

impl fmt::Display for ListenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            ListenerAt::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}/{}", self.port, self.protocol.as_str()),
            ListenerAt::Ip(ip) => write!(f, "{ip}:{}/{}", self.port, self.protocol.as_str()),
            ListenerAt::NodePort => write!(f, "NodePort {}/{}", self.port, self.protocol.as_str()),
        }
    }
}

/// Which Service wins an address both claim: the older (`creationTimestamp`), then by namespace/name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClaimOrder {
    created: Option<Time>,
    /// The Service.
    pub service: NsName,
}

impl ClaimOrder {
    /// The Service, as an object reference.
    pub fn object(&self) -> ObjectRef {
        ObjectRef::new(Kind::Service, &self.service.namespace, &self.service.name)
    }
}

/// Everything one Service produces.
#[derive(Debug)]
pub struct ServiceOut {
    /// Conflict order.
    pub order: ClaimOrder,
    /// Clusters by name.
    pub clusters: Vec<(String, Arc<Resource>)>,
    /// ClusterLoadAssignments by name (one per Cluster).
    pub clas: Vec<(String, Arc<Resource>)>,
    /// Listener candidates.
    pub listeners: Vec<(ListenKey, Arc<Resource>)>,
    /// Whether node proxies get this Service's Clusters (it has addresses to proxy).
    pub proxied: bool,
    /// What could not be translated.
    pub problems: Vec<Problem>,
}

impl ServiceOut {
    fn empty(key: &NsName) -> Self {
        ServiceOut {
            order: ClaimOrder { created: None, service: key.clone() },
            clusters: Vec::new(),
            clas: Vec::new(),
            listeners: Vec::new(),
            proxied: false,
            problems: Vec::new(),
        }
    }

    /// Whether the Service produced nothing at all (nothing to remember).
    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty() && self.listeners.is_empty() && self.problems.is_empty()
    }
}

/// The Service a cluster name (`{ns}/{name}/{port}`) belongs to.
pub fn service_of_cluster(cluster: &str) -> Option<NsName> {
    let mut it = cluster.splitn(3, '/');
    let (ns, name, _port) = (it.next()?, it.next()?, it.next()?);
    Some(NsName::new(ns, name))
}

/// Whether a Service is handled by us at all (see the module docs).
pub fn is_ours(svc: &Service) -> bool {
    svc.metadata
        .labels
        .as_ref()
        .is_none_or(|l| !l.contains_key(SERVICE_PROXY_NAME_LABEL) && !l.contains_key(HEADLESS_LABEL))
}

fn protocol_of(p: Option<&str>) -> Result<Protocol, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Err("protocol SCTP is not supported by mesh-proxy; port skipped".into()),
        other => Err(format!("unknown protocol {other:?}; port skipped")),
    }
}

fn port_u16(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

/// Translates the Service `key` from the store.
pub fn translate(store: &Store, key: &NsName) -> ServiceOut {
    let mut out = ServiceOut::empty(key);
    let Some(svc) = store.service(key) else { return out };
    out.order.created = svc.metadata.creation_timestamp.clone();
    if !is_ours(svc) {
        return out;
    }
    let me = ObjectRef::new(Kind::Service, &key.namespace, &key.name);
    let mut spec = svc.spec.clone().unwrap_or_default();
    let type_owned = spec.type_.clone().unwrap_or_else(|| "ClusterIP".to_owned());
    let type_ = type_owned.as_str();
    match type_ {
        "ExternalName" => return out,
        "ClusterIP" | "NodePort" | "LoadBalancer" => {}
        other => {
            out.problems.push(Problem::new(me, format!("unknown spec.type {other:?}; Service skipped")));
            return out;
        }
    }
    // The API server accepts only these; a manifest folder does not check. Anything else would make every proxy
    // reject the push, so it is reported and the default used.
    for (field, value) in [
        ("internalTrafficPolicy", &mut spec.internal_traffic_policy),
        ("externalTrafficPolicy", &mut spec.external_traffic_policy),
    ] {
        if let Some(v) = value.as_deref()
            && v != "Cluster"
            && v != "Local"
        {
            out.problems
                .push(Problem::new(me.clone(), format!("spec.{field} {v:?} is not Cluster or Local; Cluster is used")));
            *value = None;
        }
    }
    let addrs = Addresses::of(svc, &spec, type_, &me, &mut out.problems);
    out.proxied = !addrs.is_empty();

    let ports = spec.ports.as_deref().unwrap_or_default();
    let mut seen = BTreeSet::new();
    for sp in ports {
        let key_name = PortKey::new(sp.name.as_deref(), port_u16(sp.port).unwrap_or(0));
        let Some(port) = port_u16(sp.port) else {
            out.problems.push(Problem::new(me.clone(), format!("port {key_name}: port {} is out of range", sp.port)));
            continue;
        };
        let protocol = match protocol_of(sp.protocol.as_deref()) {
            Ok(p) => p,
            Err(e) => {
                out.problems.push(Problem::new(me.clone(), format!("port {key_name}: {e}")));
                continue;
            }
        };
        if !seen.insert(key_name.clone()) {
            out.problems.push(Problem::new(
                me.clone(),
                format!("port {key_name} is defined twice; the first definition is used"),
            ));
            continue;
        }
        let cluster = names::cluster_name(&key.namespace, &key.name, &key_name);
        out.clusters
            .push((cluster.clone(), Resource::new(cluster.clone(), &build_cluster(key, &cluster, &spec, protocol))));
        let cla = build_cla(store, key, &cluster, sp, protocol, &mut out.problems);
        out.clas.push((cluster.clone(), Resource::new(cluster.clone(), &cla)));

        let ctx = ListenerCtx { svc: key, key: &key_name, cluster: &cluster, protocol, port, spec: &spec };
        for ip in &addrs.cluster_ips {
            out.listeners.push(ctx.listener(ListenerAt::Ip(*ip), port, meta::KIND_CLUSTER_IP));
        }
        for ip in &addrs.external_ips {
            out.listeners.push(ctx.listener(ListenerAt::Ip(*ip), port, meta::KIND_EXTERNAL_IP));
        }
        if addrs.node_port {
            match sp.node_port.and_then(port_u16) {
                Some(np) => out.listeners.push(ctx.listener(ListenerAt::NodePort, np, meta::KIND_NODE_PORT)),
                None if spec.allocate_load_balancer_node_ports != Some(false) || type_ == "NodePort" => {
                    out.problems.push(Problem::new(
                        me.clone(),
                        format!("port {key_name}: type {type_} without a valid nodePort; no NodePort listener"),
                    ));
                }
                None => {}
            }
        }
        for ip in &addrs.lb_ips {
            out.listeners.push(ctx.listener(ListenerAt::Ip(*ip), port, meta::KIND_LOAD_BALANCER));
        }
    }
    if !out.proxied {
        // Only an ingress may use the Clusters; nothing listens.
        out.listeners.clear();
    }
    out
}

/// The addresses a Service is reachable at, validated.
#[derive(Debug, Default)]
struct Addresses {
    cluster_ips: Vec<IpAddr>,
    external_ips: Vec<IpAddr>,
    lb_ips: Vec<IpAddr>,
    node_port: bool,
}

impl Addresses {
    fn is_empty(&self) -> bool {
        self.cluster_ips.is_empty() && self.external_ips.is_empty() && self.lb_ips.is_empty() && !self.node_port
    }

    fn of(svc: &Service, spec: &ServiceSpec, type_: &str, me: &ObjectRef, problems: &mut Vec<Problem>) -> Self {
        let mut a = Addresses::default();
        let parse = |what: &str, s: &str, into: &mut Vec<IpAddr>, problems: &mut Vec<Problem>| match s.parse::<IpAddr>()
        {
            Ok(ip) if !into.contains(&ip) => into.push(ip),
            Ok(_) => {}
            Err(_) => problems.push(Problem::new(me.clone(), format!("{what} {s:?} is not an IP address; skipped"))),
        };
        let ips: Vec<String> = match (&spec.cluster_ips, &spec.cluster_ip) {
            (Some(ips), _) if !ips.is_empty() => ips.clone(),
            (_, Some(ip)) => vec![ip.clone()],
            _ => Vec::new(),
        };
        let headless = ips.iter().any(|ip| ip == "None");
        if headless {
            return a;
        }
        if ips.is_empty() {
            problems.push(Problem::new(
                me.clone(),
                "spec.clusterIP is not set (a cluster allocates it; in a manifest folder, set it); \
                 no ClusterIP listener",
            ));
        }
        for ip in &ips {
            parse("spec.clusterIPs entry", ip, &mut a.cluster_ips, problems);
        }
        for ip in spec.external_ips.iter().flatten() {
            parse("spec.externalIPs entry", ip, &mut a.external_ips, problems);
        }
        a.node_port = matches!(type_, "NodePort" | "LoadBalancer");
        if type_ == "LoadBalancer" {
            let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.as_ref());
            for lb in ingress.into_iter().flatten() {
                if lb.ip_mode.as_deref() == Some("Proxy") {
                    continue;
                }
                if let Some(ip) = &lb.ip {
                    parse("status.loadBalancer.ingress ip", ip, &mut a.lb_ips, problems);
                }
            }
        }
        a
    }
}

fn affinity_timeout(spec: &ServiceSpec) -> Option<u32> {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    let t = spec.session_affinity_config.as_ref().and_then(|c| c.client_ip.as_ref()).and_then(|c| c.timeout_seconds);
    Some(t.and_then(|t| u32::try_from(t).ok()).filter(|t| *t > 0).unwrap_or(DEFAULT_AFFINITY_TIMEOUT))
}

fn build_cluster(key: &NsName, name: &str, spec: &ServiceSpec, protocol: Protocol) -> Cluster {
    let affinity = affinity_timeout(spec);
    let mut facts: Vec<(&'static str, MetaValue)> =
        vec![(meta::SERVICE, key.to_string().into()), (meta::PROTOCOL, protocol.as_str().into())];
    if let Some(t) = affinity {
        facts.push((meta::AFFINITY_TIMEOUT_SECONDS, t.into()));
    }
    facts.push((meta::INTERNAL_TRAFFIC_POLICY, spec.internal_traffic_policy.as_deref().unwrap_or("Cluster").into()));
    facts.push((meta::EXTERNAL_TRAFFIC_POLICY, spec.external_traffic_policy.as_deref().unwrap_or("Cluster").into()));
    if let Some(td) = &spec.traffic_distribution {
        facts.push((meta::TRAFFIC_DISTRIBUTION, td.as_str().into()));
    }
    Cluster {
        name: name.to_owned(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(envoy::ads()),
            service_name: String::new(),
        }),
        connect_timeout: Some(envoy::millis(5_000)),
        lb_policy: if affinity.is_some() { cluster::LbPolicy::RingHash } else { cluster::LbPolicy::LeastRequest }
            as i32,
        metadata: meta::build(facts),
        ..Default::default()
    }
}

/// One endpoint, merged across slices.
#[derive(Debug, Clone)]
struct Ep {
    health: HealthStatus,
    zone: String,
    node: String,
    for_zones: Vec<String>,
    for_nodes: Vec<String>,
    pod: Option<String>,
}

fn rank(h: HealthStatus) -> u8 {
    match h {
        HealthStatus::Healthy => 0,
        HealthStatus::Draining => 1,
        _ => 2,
    }
}

/// The xDS health of an endpoint, per the EndpointSlice API's nil defaults.
pub fn health_of(ep: &Endpoint) -> HealthStatus {
    let c = ep.conditions.clone().unwrap_or_default();
    if c.ready.unwrap_or(true) {
        HealthStatus::Healthy
    } else if c.serving.unwrap_or(true) && c.terminating.unwrap_or(false) {
        HealthStatus::Draining
    } else {
        HealthStatus::Unhealthy
    }
}

fn slice_ref(slice: &EndpointSlice) -> ObjectRef {
    ObjectRef::new(
        Kind::EndpointSlice,
        slice.metadata.namespace.as_deref().unwrap_or("default"),
        slice.metadata.name.as_deref().unwrap_or_default(),
    )
}

fn build_cla(
    store: &Store,
    key: &NsName,
    cluster: &str,
    sp: &ServicePort,
    protocol: Protocol,
    problems: &mut Vec<Problem>,
) -> ClusterLoadAssignment {
    let want_name = sp.name.as_deref().unwrap_or_default();
    let mut eps: BTreeMap<(IpAddr, u16), Ep> = BTreeMap::new();
    for slice in store.slices_of(key) {
        let family_v6 = match slice.address_type.as_str() {
            "IPv4" => false,
            "IPv6" => true,
            // FQDN slices name hosts, not addresses; kube-proxy ignores them too.
            "FQDN" => continue,
            other => {
                problems.push(Problem::new(
                    slice_ref(slice),
                    format!("addressType {other:?} is not IPv4, IPv6 or FQDN; slice skipped"),
                ));
                continue;
            }
        };
        let slice_port = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or_default() == want_name
                && protocol_of(p.protocol.as_deref()).ok() == Some(protocol)
        });
        let Some(slice_port) = slice_port else { continue };
        let port = match slice_port.port {
            Some(p) => port_u16(p),
            // A nil port means "all ports": only a numeric targetPort can be meant.
            None => match &sp.target_port {
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => port_u16(*n),
                None => port_u16(sp.port),
                _ => None,
            },
        };
        let Some(port) = port else {
            problems.push(Problem::new(
                slice_ref(slice),
                format!("port {want_name:?} has no usable port number; its endpoints are skipped for that port"),
            ));
            continue;
        };
        for ep in &slice.endpoints {
            let Some(first) = ep.addresses.first() else { continue };
            let ip = match first.parse::<IpAddr>() {
                Ok(ip) if ip.is_ipv6() == family_v6 => ip,
                _ => {
                    problems.push(Problem::new(
                        slice_ref(slice),
                        format!("endpoint address {first:?} is not an {} address; skipped", slice.address_type),
                    ));
                    continue;
                }
            };
            let node = ep.node_name.clone().unwrap_or_default();
            let zone = ep.zone.clone().or_else(|| zone_of_node(store, &node)).unwrap_or_default();
            let hints = ep.hints.as_ref();
            let new = Ep {
                health: health_of(ep),
                zone,
                node,
                for_zones: hints
                    .and_then(|h| h.for_zones.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|z| z.name.clone())
                    .collect(),
                for_nodes: hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|n| n.name.clone())
                    .collect(),
                pod: ep.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod")).map(|r| {
                    format!(
                        "{}/{}",
                        r.namespace.as_deref().unwrap_or(&key.namespace),
                        r.name.as_deref().unwrap_or_default()
                    )
                }),
            };
            match eps.get(&(ip, port)) {
                Some(old) if rank(old.health) <= rank(new.health) => {}
                _ => {
                    eps.insert((ip, port), new);
                }
            }
        }
    }
    let mut localities: BTreeMap<(String, String), Vec<LbEndpoint>> = BTreeMap::new();
    for ((ip, port), ep) in eps {
        let mut facts: Vec<(&'static str, MetaValue)> = Vec::new();
        if !ep.for_zones.is_empty() {
            facts.push((meta::FOR_ZONES, ep.for_zones.into()));
        }
        if !ep.for_nodes.is_empty() {
            facts.push((meta::FOR_NODES, ep.for_nodes.into()));
        }
        if let Some(pod) = ep.pod {
            facts.push((meta::POD, pod.into()));
        }
        let lb = LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(xds_proto::endpoint::Endpoint {
                address: Some(envoy::socket(ip, port, protocol)),
                ..Default::default()
            })),
            health_status: ep.health as i32,
            metadata: meta::build(facts),
            ..Default::default()
        };
        localities.entry((ep.zone, ep.node)).or_default().push(lb);
    }
    ClusterLoadAssignment {
        cluster_name: cluster.to_owned(),
        endpoints: localities
            .into_iter()
            .map(|((zone, node), lb_endpoints)| LocalityLbEndpoints {
                locality: Some(Locality { zone, sub_zone: node, ..Default::default() }),
                lb_endpoints,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// The `node/{name}` ClusterLoadAssignment of every Node that has a zone: one locality (zone, and the node name
/// as `sub_zone`, as endpoints carry it) without endpoints. A node proxy learns its zone from its own.
pub fn node_localities(store: &Store) -> imbl::OrdMap<String, Arc<Resource>> {
    store
        .nodes()
        .filter_map(|(name, n)| {
            let zone = n.metadata.labels.as_ref()?.get(ZONE_LABEL).filter(|z| !z.is_empty())?;
            let rname = names::node_locality(name);
            let cla = ClusterLoadAssignment {
                cluster_name: rname.clone(),
                endpoints: vec![LocalityLbEndpoints {
                    locality: Some(Locality { zone: zone.clone(), sub_zone: name.clone(), ..Default::default() }),
                    ..Default::default()
                }],
                ..Default::default()
            };
            Some((name.clone(), Resource::new(rname, &cla)))
        })
        .collect()
}

fn zone_of_node(store: &Store, node: &str) -> Option<String> {
    if node.is_empty() {
        return None;
    }
    store.node(node)?.metadata.labels.as_ref()?.get(ZONE_LABEL).cloned()
}

/// What every listener of one Service port shares.
struct ListenerCtx<'a> {
    svc: &'a NsName,
    key: &'a PortKey,
    cluster: &'a str,
    protocol: Protocol,
    port: u16,
    spec: &'a ServiceSpec,
}

impl ListenerCtx<'_> {
    fn listener(&self, at: ListenerAt, listen_port: u16, kind: &'static str) -> (ListenKey, Arc<Resource>) {
        let name = names::service_listener_name(&self.svc.namespace, &self.svc.name, self.key, at);
        let external = kind != meta::KIND_CLUSTER_IP;
        let policy = if external { &self.spec.external_traffic_policy } else { &self.spec.internal_traffic_policy };
        let policy = policy.as_deref().unwrap_or("Cluster");
        let mut facts: Vec<(&'static str, MetaValue)> = vec![
            (meta::SERVICE, self.svc.to_string().into()),
            (meta::PORT, u32::from(self.port).into()),
            (meta::ADDRESS_KIND, kind.into()),
            (meta::TRAFFIC_POLICY, policy.into()),
        ];
        let hc = self.spec.health_check_node_port.and_then(port_u16);
        if let (Some(hc), true, "Local") =
            (hc, kind == meta::KIND_NODE_PORT || kind == meta::KIND_LOAD_BALANCER, policy)
        {
            facts.push((meta::HEALTH_CHECK_NODE_PORT, u32::from(hc).into()));
        }
        let affinity = affinity_timeout(self.spec).is_some();
        let ipv6 = self.spec.ip_families.iter().flatten().any(|f| f == "IPv6");
        let (ip, extra) = match at {
            ListenerAt::Ip(ip) => (ip, None),
            ListenerAt::NodePort => (IpAddr::from([0, 0, 0, 0]), ipv6.then(|| IpAddr::from([0u16; 8]))),
        };
        let mut l = Listener {
            name: name.clone(),
            address: Some(envoy::socket(ip, listen_port, self.protocol)),
            metadata: meta::build(facts),
            ..Default::default()
        };
        if let Some(extra) = extra {
            l.additional_addresses = vec![xds_proto::listener::AdditionalAddress {
                address: Some(envoy::socket(extra, listen_port, self.protocol)),
                ..Default::default()
            }];
        }
        match self.protocol {
            Protocol::Tcp => l.filter_chains = vec![envoy::chain(envoy::tcp_proxy(self.cluster, affinity), None)],
            Protocol::Udp => {
                l.udp_listener_config = Some(Default::default());
                l.listener_filters = vec![envoy::udp_proxy(self.cluster, affinity)];
            }
        }
        debug_assert!(matches!(
            l.address.as_ref().and_then(|a| a.address.as_ref()),
            Some(AddressKind::SocketAddress(_))
        ));
        (ListenKey { protocol: self.protocol, at, port: listen_port }, Resource::new(name, &l))
    }
}

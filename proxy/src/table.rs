//! The proxy's routing table: xDS resources converted, at the edge, into what the data path reads.
//!
//! Conversion happens when a resource arrives, never per connection. A resource that cannot be used is
//! rejected with an error naming it (the xDS client NACKs, and the previous table stays in force). A new table is
//! built from the previous one plus the change: untouched Services keep their `Arc`s, and endpoint state that
//! must outlive a config change (open connection counts, failures, ejections, session affinity) is carried over
//! by endpoint address.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use xds_proto::cluster::{Cluster as XdsCluster, cluster::LbPolicy};
use xds_proto::core::{HealthStatus, address, socket_address};
use xds_proto::endpoint::{ClusterLoadAssignment, lb_endpoint};
use xds_proto::listener::{Listener as XdsListener, filter, listener_filter};
use xds_proto::meta;
use xds_proto::names;
use xds_proto::types::ResourceType;

/// Why a resource was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// The bytes are not the resource type.
    #[error("{kind} {name}: does not decode: {reason}")]
    Decode {
        /// Its type.
        kind: ResourceType,
        /// Its name.
        name: String,
        /// What prost said.
        reason: String,
    },
    /// The resource decodes but cannot be served.
    #[error("{kind} {name}: {reason}")]
    Unusable {
        /// Its type.
        kind: ResourceType,
        /// Its name.
        name: String,
        /// What is wrong, and what to check.
        reason: String,
    },
}

/// TCP or UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// Which Service address a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AddressKind {
    /// A ClusterIP: in-cluster traffic, `internalTrafficPolicy` applies.
    ClusterIp,
    /// A NodePort on every node address: `externalTrafficPolicy` applies.
    NodePort,
    /// A LoadBalancer ingress IP: `externalTrafficPolicy` applies.
    LoadBalancer,
    /// A `spec.externalIPs` address: `externalTrafficPolicy` applies.
    ExternalIp,
}

/// Where a listener accepts: one socket per `(protocol, address)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ListenKey {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The socket address.
    pub addr: SocketAddr,
}

/// One Service address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceListener {
    /// The xDS Listener name (`svc/{ns}/{name}/{port}@{at}`).
    pub name: String,
    /// Every address it listens on (a dual-stack NodePort has two).
    pub keys: Vec<ListenKey>,
    /// `namespace/name` of the Service.
    pub service: String,
    /// What kind of address.
    pub kind: AddressKind,
    /// `Local`: only this node's endpoints.
    pub local_only: bool,
    /// For NodePort/LoadBalancer with `externalTrafficPolicy: Local`: where load balancers check this node.
    pub health_check_node_port: Option<u16>,
    /// The Cluster it balances over.
    pub cluster: String,
}

/// An endpoint's state, from its EndpointSlice conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Health {
    /// Ready: gets traffic.
    Ready,
    /// Terminating but still serving: gets traffic only when nothing is ready.
    Terminating,
    /// Neither: never gets traffic.
    NotReady,
}

pub use mesh_runtime::endpoint::{EndpointStats, now_ms};

/// One endpoint of a Cluster. Kept small: a big cluster has a hundred thousand of them.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Its state.
    pub health: Health,
    /// Where it runs (shared by every endpoint in the same place: see [`Placement::interned`]).
    pub place: Arc<Placement>,
    /// Live state, carried across table versions.
    pub stats: Arc<EndpointStats>,
}

/// Where an endpoint runs, as Local traffic policies and topology-aware routing need it. Endpoints share one
/// copy per distinct place (a few hundred nodes × their hints), so an endpoint pays one pointer for it.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Placement {
    /// The node it runs on.
    pub node: Arc<str>,
    /// Its zone.
    pub zone: Arc<str>,
    /// Topology hints: the zones that should use it.
    pub for_zones: Box<[Arc<str>]>,
    /// Topology hints: the nodes that should use it (`trafficDistribution: PreferSameNode`).
    pub for_nodes: Box<[Arc<str>]>,
}

/// Distinct placements, shared (see [`Placement::interned`]).
static PLACES: Mutex<Pool<Placement>> = Mutex::new(Pool { set: None, swept_at: 0 });

impl Placement {
    /// The shared placement for `node`, `zone` and the hinted zones `for_zones`. Placements no table uses any
    /// more are dropped by a sweep, as names are (see [`intern`]).
    pub fn interned<S: AsRef<str>>(node: &str, zone: &str, for_zones: &[S]) -> Arc<Placement> {
        Self::interned_with_nodes::<S, &str>(node, zone, for_zones, &[])
    }

    /// [`Placement::interned`] with node hints too.
    pub fn interned_with_nodes<S: AsRef<str>, N: AsRef<str>>(
        node: &str,
        zone: &str,
        for_zones: &[S],
        for_nodes: &[N],
    ) -> Arc<Placement> {
        let p = Placement {
            node: intern(node),
            zone: intern(zone),
            for_zones: for_zones.iter().map(|z| intern(z.as_ref())).collect(),
            for_nodes: for_nodes.iter().map(|n| intern(n.as_ref())).collect(),
        };
        PLACES.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&p, || Arc::new(p.clone_parts()))
    }

    fn clone_parts(&self) -> Placement {
        Placement {
            node: self.node.clone(),
            zone: self.zone.clone(),
            for_zones: self.for_zones.clone(),
            for_nodes: self.for_nodes.clone(),
        }
    }
}

/// Client IP → the endpoint it sticks to, and when it was last used.
pub type AffinityMap = Mutex<HashMap<IpAddr, (SocketAddr, Instant)>>;

/// A Service port's endpoints and how to balance over them.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// `{ns}/{name}/{port}`.
    pub name: String,
    /// `sessionAffinity: ClientIP` timeout.
    pub affinity: Option<Duration>,
    /// `trafficDistribution`: which endpoints to prefer when there are no topology hints.
    pub distribution: Distribution,
    /// The endpoints, sorted by address.
    pub endpoints: Arc<[Endpoint]>,
    /// Session affinity entries, carried across table versions.
    pub affinity_map: Arc<AffinityMap>,
    /// Round-robin position, carried across table versions.
    pub rr: Arc<AtomicU32>,
}

/// The whole table. Immutable once published; the next one is built from it. Its maps are persistent
/// (`imbl`): the next table shares everything the change did not touch, so a one-endpoint change costs
/// O(log n), not a copy of 10,000 Services.
#[derive(Debug, Clone, Default)]
pub struct Table {
    /// Service addresses by listener name.
    pub listeners: imbl::OrdMap<String, Arc<ServiceListener>>,
    /// The listener serving each address (the first by name when two claim one), for the data path.
    pub by_key: imbl::HashMap<ListenKey, Arc<ServiceListener>>,
    /// Clusters by name (Cluster and ClusterLoadAssignment merged): every Cluster received, with the endpoints
    /// of its assignment (none until that arrives). The settings and endpoints live only here, not in maps of
    /// their own as received: at 10,000 Services that would be two more maps and name copies (≈ 2.5 MB).
    pub clusters: imbl::HashMap<String, Arc<Cluster>>,
    /// Assignments whose Cluster has not arrived (or was removed while they stayed): merged when it comes.
    pending: imbl::OrdMap<String, Arc<[Endpoint]>>,
    /// Node name → its zone, from the `node/{node}` assignments (`xds_proto::names::node_locality`): mesh-control
    /// sends this proxy its own Node's, and follows the label.
    nodes: imbl::OrdMap<String, Arc<str>>,
    /// The accepted version of each resource type.
    pub versions: BTreeMap<ResourceType, String>,
}

/// A Service's `trafficDistribution`, as the proxy acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Distribution {
    /// Unset (or a value this proxy does not know): topology only from hints.
    #[default]
    Any,
    /// `PreferSameZone`, or its older name `PreferClose`: endpoints in this node's zone first.
    SameZone,
    /// `PreferSameNode`: endpoints on this node first, then in its zone.
    SameNode,
}

impl Distribution {
    /// From the Service's `trafficDistribution` value.
    pub fn parse(value: Option<&str>) -> Self {
        match value {
            Some("PreferClose" | "PreferSameZone") => Distribution::SameZone,
            Some("PreferSameNode") => Distribution::SameNode,
            _ => Distribution::Any,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ClusterSettings {
    affinity: Option<Duration>,
    distribution: Distribution,
}

fn unusable(kind: ResourceType, name: &str, reason: impl Into<String>) -> TableError {
    TableError::Unusable { kind, name: name.to_owned(), reason: reason.into() }
}

fn socket(kind: ResourceType, name: &str, a: Option<&xds_proto::core::Address>) -> Result<SocketAddr, TableError> {
    let sa = match a.and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(sa)) => sa,
        _ => return Err(unusable(kind, name, "no socket address")),
    };
    let ip: IpAddr =
        sa.address.parse().map_err(|_| unusable(kind, name, format!("{:?} is not an IP address", sa.address)))?;
    let port = match sa.port_specifier {
        Some(socket_address::PortSpecifier::PortValue(p)) => u16::try_from(p).ok().filter(|p| *p != 0),
        _ => None,
    }
    .ok_or_else(|| unusable(kind, name, "no valid port"))?;
    Ok(SocketAddr::new(ip, port))
}

/// Reads a Service Listener.
pub fn listener(name: &str, body: &[u8]) -> Result<ServiceListener, TableError> {
    let k = ResourceType::Listener;
    let l = XdsListener::decode(body).map_err(|e| TableError::Decode {
        kind: k,
        name: name.into(),
        reason: e.to_string(),
    })?;
    let md = l.metadata.as_ref();
    let service = meta::get_str(md, meta::SERVICE)
        .ok_or_else(|| unusable(k, name, "no filter_metadata.mesh.service: not a Service listener"))?;
    let kind = match meta::get_str(md, meta::ADDRESS_KIND) {
        Some(meta::KIND_CLUSTER_IP) => AddressKind::ClusterIp,
        Some(meta::KIND_NODE_PORT) => AddressKind::NodePort,
        Some(meta::KIND_LOAD_BALANCER) => AddressKind::LoadBalancer,
        Some(meta::KIND_EXTERNAL_IP) => AddressKind::ExternalIp,
        other => return Err(unusable(k, name, format!("unknown addressKind {other:?}"))),
    };
    let local_only = match meta::get_str(md, meta::TRAFFIC_POLICY).unwrap_or("Cluster") {
        "Cluster" => false,
        "Local" => true,
        other => return Err(unusable(k, name, format!("unknown trafficPolicy {other:?}"))),
    };
    let health_check_node_port =
        meta::get_num(md, meta::HEALTH_CHECK_NODE_PORT).and_then(|p| u16::try_from(p as i64).ok()).filter(|p| *p != 0);
    let (protocol, cluster) = if l.udp_listener_config.is_some() {
        (
            Protocol::Udp,
            udp_cluster(&l).ok_or_else(|| unusable(k, name, "UDP listener without a udp_proxy route to a cluster"))?,
        )
    } else {
        (
            Protocol::Tcp,
            tcp_cluster(&l).ok_or_else(|| unusable(k, name, "TCP listener without a tcp_proxy to a cluster"))?,
        )
    };
    let mut keys = vec![ListenKey { protocol, addr: socket(k, name, l.address.as_ref())? }];
    for extra in &l.additional_addresses {
        keys.push(ListenKey { protocol, addr: socket(k, name, extra.address.as_ref())? });
    }
    Ok(ServiceListener {
        name: name.to_owned(),
        keys,
        service: service.to_owned(),
        kind,
        local_only,
        health_check_node_port,
        cluster,
    })
}

fn tcp_cluster(l: &XdsListener) -> Option<String> {
    let f = l.filter_chains.first()?.filters.first()?;
    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else { return None };
    let t = xds_proto::tcp_proxy::TcpProxy::decode(&any.value[..]).ok()?;
    match t.cluster_specifier? {
        xds_proto::tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster(c) if !c.is_empty() => Some(c),
        _ => None,
    }
}

fn udp_cluster(l: &XdsListener) -> Option<String> {
    let f = l.listener_filters.first()?;
    let Some(listener_filter::ConfigType::TypedConfig(any)) = &f.config_type else { return None };
    let u = xds_proto::udp_proxy::UdpProxyConfig::decode(&any.value[..]).ok()?;
    match u.route_specifier? {
        xds_proto::udp_proxy::udp_proxy_config::RouteSpecifier::Matcher(m) => match m.on_no_match?.on_match? {
            xds_proto::xds_matcher::matcher::on_match::OnMatch::Action(a) => {
                let route = xds_proto::udp_proxy::Route::decode(&a.typed_config?.value[..]).ok()?;
                Some(route.cluster).filter(|c| !c.is_empty())
            }
            _ => None,
        },
        #[allow(deprecated)]
        xds_proto::udp_proxy::udp_proxy_config::RouteSpecifier::Cluster(c) => Some(c).filter(|c| !c.is_empty()),
    }
}

fn cluster_settings(name: &str, body: &[u8]) -> Result<ClusterSettings, TableError> {
    let k = ResourceType::Cluster;
    let c = XdsCluster::decode(body).map_err(|e| TableError::Decode {
        kind: k,
        name: name.into(),
        reason: e.to_string(),
    })?;
    let md = c.metadata.as_ref();
    let affinity = meta::get_num(md, meta::AFFINITY_TIMEOUT_SECONDS)
        .filter(|t| t.is_finite() && *t > 0.0)
        .map(|t| Duration::from_secs(t.min(86_400.0) as u64));
    let distribution = Distribution::parse(meta::get_str(md, meta::TRAFFIC_DISTRIBUTION));
    if affinity.is_none() && c.lb_policy == LbPolicy::RingHash as i32 {
        // Envoy's RING_HASH without our timeout: Kubernetes' default affinity timeout.
        let default = Duration::from_secs(meta::DEFAULT_AFFINITY_TIMEOUT_SECONDS.into());
        return Ok(ClusterSettings { affinity: Some(default), distribution });
    }
    Ok(ClusterSettings { affinity, distribution })
}

/// Node and zone names, stored once each: 100,000 endpoints run on a few hundred nodes in a handful of zones,
/// so a name per endpoint would cost an allocation per endpoint for nothing.
static NAMES: Mutex<Pool<str>> = Mutex::new(Pool { set: None, swept_at: 0 });

/// A set of shared values, swept of those nobody else holds once it has doubled since the last sweep
/// (amortised O(1)), so nodes that come and go (autoscaling) do not accumulate.
struct Pool<T: ?Sized> {
    set: Option<std::collections::HashSet<Arc<T>>>,
    /// The set's size after the last sweep.
    swept_at: usize,
}

impl<T: ?Sized + Eq + std::hash::Hash> Pool<T> {
    fn get(&mut self, key: &T, make: impl FnOnce() -> Arc<T>) -> Arc<T> {
        let Pool { set, swept_at } = self;
        let set = set.get_or_insert_with(Default::default);
        if let Some(found) = set.get(key) {
            return found.clone();
        }
        if set.len() >= (*swept_at * 2).max(1024) {
            set.retain(|n| Arc::strong_count(n) > 1);
            *swept_at = set.len();
        }
        let new = make();
        set.insert(new.clone());
        new
    }
}

/// The shared copy of `name` (see [`Pool`]).
pub fn intern(name: &str) -> Arc<str> {
    NAMES.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(name, || Arc::from(name))
}

fn assignment(name: &str, body: &[u8], old: Option<&[Endpoint]>) -> Result<Arc<[Endpoint]>, TableError> {
    let k = ResourceType::ClusterLoadAssignment;
    let cla = ClusterLoadAssignment::decode(body).map_err(|e| TableError::Decode {
        kind: k,
        name: name.into(),
        reason: e.to_string(),
    })?;
    let previous: HashMap<SocketAddr, &Arc<EndpointStats>> =
        old.map(|eps| eps.iter().map(|e| (e.addr, &e.stats)).collect()).unwrap_or_default();
    let mut out = Vec::new();
    for loc in &cla.endpoints {
        let (zone, node) = loc.locality.as_ref().map_or(("", ""), |l| (l.zone.as_str(), l.sub_zone.as_str()));
        for e in &loc.lb_endpoints {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                return Err(unusable(k, name, "an endpoint without an address"));
            };
            let addr = socket(k, name, ep.address.as_ref())?;
            let health = match HealthStatus::try_from(e.health_status) {
                Ok(HealthStatus::Healthy | HealthStatus::Unknown) => Health::Ready,
                Ok(HealthStatus::Draining) => Health::Terminating,
                _ => Health::NotReady,
            };
            out.push(Endpoint {
                addr,
                health,
                place: Placement::interned_with_nodes(
                    node,
                    zone,
                    &meta::get_list(e.metadata.as_ref(), meta::FOR_ZONES),
                    &meta::get_list(e.metadata.as_ref(), meta::FOR_NODES),
                ),
                stats: previous.get(&addr).map(|s| Arc::clone(s)).unwrap_or_default(),
            });
        }
    }
    out.sort_by_key(|e| e.addr);
    out.dedup_by_key(|e| e.addr);
    Ok(out.into())
}

/// Reads a node's zone from its `node/{node}` assignment.
fn node_zone(name: &str, body: &[u8]) -> Result<Arc<str>, TableError> {
    let k = ResourceType::ClusterLoadAssignment;
    let cla = ClusterLoadAssignment::decode(body).map_err(|e| TableError::Decode {
        kind: k,
        name: name.into(),
        reason: e.to_string(),
    })?;
    let zone = cla.endpoints.first().and_then(|l| l.locality.as_ref()).map_or("", |l| l.zone.as_str());
    Ok(intern(zone))
}

impl Table {
    /// The zone of `node` as mesh-control last sent it (its Node's `topology.kubernetes.io/zone`), if any.
    pub fn node_zone(&self, node: &str) -> Option<&str> {
        self.nodes.get(node).map(|z| &**z).filter(|z| !z.is_empty())
    }

    /// The table after one type's state changed. `resources` looks a resource of that type up by name (the
    /// type's full state); `changed` and `removed` say what moved, and only those are converted. Fails, naming
    /// the resource, if any changed resource is unusable: the caller keeps the previous table.
    pub fn apply<'a>(
        &self,
        kind: ResourceType,
        resources: impl Fn(&str) -> Option<&'a [u8]>,
        changed: &[String],
        removed: &[String],
        version: &str,
    ) -> Result<Table, TableError> {
        let mut next = self.clone();
        match kind {
            ResourceType::Listener => {
                let mut touched: Vec<Arc<ServiceListener>> = Vec::new();
                for name in removed {
                    if let Some(old) = next.listeners.remove(name) {
                        touched.push(old);
                    }
                }
                for name in changed {
                    let Some(body) = resources(name) else { continue };
                    if !name.starts_with(names::SERVICE_LISTENER_PREFIX) {
                        // Not a Service address (e.g. an ingress listener): not ours to serve.
                        continue;
                    }
                    let l = Arc::new(listener(name, body)?);
                    if let Some(old) = next.listeners.insert(name.clone(), l.clone()) {
                        touched.push(old);
                    }
                    touched.push(l);
                }
                next.rebind(&touched);
            }
            ResourceType::Cluster => {
                for name in removed {
                    if let Some(gone) = next.clusters.remove(name)
                        && !gone.endpoints.is_empty()
                    {
                        // Its assignment may outlive it (the control plane removes that separately).
                        next.pending.insert(name.clone(), gone.endpoints.clone());
                    }
                }
                for name in changed {
                    let Some(body) = resources(name) else { continue };
                    let s = cluster_settings(name, body)?;
                    let c = match next.clusters.get(name) {
                        Some(old) => {
                            Cluster { affinity: s.affinity, distribution: s.distribution, ..Cluster::clone(old) }
                        }
                        None => Cluster {
                            name: name.clone(),
                            affinity: s.affinity,
                            distribution: s.distribution,
                            endpoints: next.pending.remove(name).unwrap_or_else(|| Arc::from(Vec::new())),
                            affinity_map: Arc::default(),
                            rr: Arc::default(),
                        },
                    };
                    next.clusters.insert(name.clone(), Arc::new(c));
                }
            }
            ResourceType::ClusterLoadAssignment => {
                for name in removed {
                    if let Some(node) = names::node_of_locality(name) {
                        next.nodes.remove(node);
                        continue;
                    }
                    next.pending.remove(name);
                    next.set_endpoints(name, Arc::from(Vec::new()));
                }
                for name in changed {
                    let Some(body) = resources(name) else { continue };
                    if let Some(node) = names::node_of_locality(name) {
                        next.nodes.insert(node.to_owned(), node_zone(name, body)?);
                        continue;
                    }
                    let old =
                        self.clusters.get(name).map(|c| &*c.endpoints).or_else(|| self.pending.get(name).map(|e| &**e));
                    let eps = assignment(name, body, old)?;
                    if !next.set_endpoints(name, eps.clone()) {
                        next.pending.insert(name.clone(), eps);
                    }
                }
            }
            // Routes and Secrets are the ingress proxy's.
            ResourceType::RouteConfiguration | ResourceType::Secret => {}
        }
        next.versions.insert(kind, version.to_owned());
        Ok(next)
    }

    /// The names of one type's resources in the table.
    pub fn names(&self, kind: ResourceType) -> Vec<String> {
        match kind {
            ResourceType::Listener => self.listeners.keys().cloned().collect(),
            ResourceType::Cluster => self.clusters.keys().cloned().collect(),
            // An assignment without endpoints is not told from none: removing either changes nothing.
            ResourceType::ClusterLoadAssignment => self
                .clusters
                .iter()
                .filter(|(_, c)| !c.endpoints.is_empty())
                .map(|(n, _)| n)
                .chain(self.pending.keys())
                .cloned()
                .chain(self.nodes.keys().map(|n| names::node_locality(n)))
                .collect(),
            ResourceType::RouteConfiguration | ResourceType::Secret => Vec::new(),
        }
    }

    /// Brings `by_key` up to date for the addresses of the listeners that changed: each address is served by
    /// the first listener (by name) that claims it. Only a removed winner with a rival claimant costs a scan.
    fn rebind(&mut self, touched: &[Arc<ServiceListener>]) {
        let mut keys: Vec<ListenKey> = touched.iter().flat_map(|l| l.keys.iter().copied()).collect();
        keys.sort();
        keys.dedup();
        for key in keys {
            let candidates = touched.iter().filter(|l| l.keys.contains(&key)).map(|l| &l.name);
            let current = self.by_key.get(&key).map(|l| l.name.clone());
            // The winner is among the touched listeners that still exist, or the current one if it is untouched.
            let mut best: Option<Arc<ServiceListener>> = current
                .as_ref()
                .filter(|n| !touched.iter().any(|t| &t.name == *n))
                .and_then(|n| self.listeners.get(n).cloned());
            for name in candidates {
                if let Some(l) = self.listeners.get(name).filter(|l| l.keys.contains(&key))
                    && best.as_ref().is_none_or(|b| l.name < b.name)
                {
                    best = Some(l.clone());
                }
            }
            if best.is_none() && current.is_some() {
                // The winner went: another listener may claim the address too (rare; the control plane gives
                // each address one listener).
                best = self.listeners.values().find(|l| l.keys.contains(&key)).cloned();
            }
            match best {
                Some(l) => {
                    self.by_key.insert(key, l);
                }
                None => {
                    self.by_key.remove(&key);
                }
            }
        }
    }

    /// Gives the named cluster `endpoints`, keeping its live state; false if there is no such cluster.
    fn set_endpoints(&mut self, name: &str, endpoints: Arc<[Endpoint]>) -> bool {
        let Some(old) = self.clusters.get(name) else { return false };
        let c = Cluster { endpoints, ..Cluster::clone(old) };
        self.clusters.insert(name.to_owned(), Arc::new(c));
        true
    }

    /// Every address the proxy must listen on, with the listener serving it.
    pub fn bindings(&self) -> BTreeMap<ListenKey, Arc<ServiceListener>> {
        let mut out = BTreeMap::new();
        for l in self.listeners.values() {
            for k in &l.keys {
                out.entry(*k).or_insert_with(|| l.clone());
            }
        }
        out
    }
}

/// Tables for the tests of the data path.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// One Service `ns/web` listening on `key` (cluster `ns/web/80`), its ready endpoints `eps` all on node
    /// `n1`. With a `health_check_node_port` it is a NodePort with `externalTrafficPolicy: Local`, else a
    /// ClusterIP.
    pub(crate) fn web(key: ListenKey, eps: &[SocketAddr], health_check_node_port: Option<u16>) -> Table {
        let endpoints = eps
            .iter()
            .map(|&addr| Endpoint {
                addr,
                health: Health::Ready,
                place: Placement::interned::<&str>("n1", "", &[]),
                stats: Arc::default(),
            })
            .collect();
        let local = health_check_node_port.is_some();
        let kind = if local { AddressKind::NodePort } else { AddressKind::ClusterIp };
        let l = ServiceListener {
            name: format!("svc/ns/web/80@{}", key.addr.ip()),
            keys: vec![key],
            service: "ns/web".into(),
            kind,
            local_only: local,
            health_check_node_port,
            cluster: "ns/web/80".into(),
        };
        one_service(l, endpoints, None)
    }

    /// A table with one Service: `listener` (on its `keys[0]`) and its cluster of `endpoints` (sorted by
    /// address, as the converter keeps them).
    pub(crate) fn one_service(
        listener: ServiceListener,
        mut endpoints: Vec<Endpoint>,
        affinity: Option<Duration>,
    ) -> Table {
        endpoints.sort_by_key(|e| e.addr);
        let c = Cluster {
            name: listener.cluster.clone(),
            affinity,
            distribution: Default::default(),
            endpoints: endpoints.into(),
            affinity_map: Arc::default(),
            rr: Arc::default(),
        };
        let l = Arc::new(listener);
        let mut t = Table::default();
        t.listeners.insert(l.name.clone(), l.clone());
        t.by_key.insert(l.keys[0], l);
        t.clusters.insert(c.name.clone(), Arc::new(c));
        t
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    #[test]
    fn names_are_stored_once_and_unused_ones_swept() {
        let a = intern("node-interned");
        assert!(Arc::ptr_eq(&a, &intern("node-interned")));
        // Enough short-lived names to force sweeps: the set stays bounded, a name still in use survives them.
        for i in 0..10_000 {
            drop(intern(&format!("gone-{i}")));
        }
        let len = NAMES.lock().unwrap().set.as_ref().map_or(0, |s| s.len());
        assert!(len < 2_100, "unused names accumulate: {len}");
        assert!(Arc::ptr_eq(&a, &intern("node-interned")));
    }
    use xds_proto::cluster::cluster::LbPolicy;
    use xds_proto::codec::encode;
    use xds_proto::core::{Address, Locality, SocketAddress};
    use xds_proto::endpoint::{LbEndpoint, LocalityLbEndpoints};
    use xds_proto::listener::{Filter, FilterChain};
    use xds_proto::meta::MetaValue;

    fn addr(ip: &str, port: u32) -> Address {
        Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: ip.into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }
    }

    fn tcp_listener(name: &str, ip: &str, port: u32, cluster: &str, policy: &str) -> Vec<u8> {
        let tcp = xds_proto::tcp_proxy::TcpProxy {
            stat_prefix: cluster.into(),
            cluster_specifier: Some(xds_proto::tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        };
        encode(&XdsListener {
            name: name.into(),
            address: Some(addr(ip, port)),
            filter_chains: vec![FilterChain {
                filters: vec![Filter {
                    name: "envoy.filters.network.tcp_proxy".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(xds_proto::codec::pack_any(&tcp))),
                }],
                ..Default::default()
            }],
            metadata: meta::build([
                (meta::SERVICE, MetaValue::from("ns/web")),
                (meta::ADDRESS_KIND, meta::KIND_CLUSTER_IP.into()),
                (meta::TRAFFIC_POLICY, policy.into()),
            ]),
            ..Default::default()
        })
    }

    fn cla(cluster: &str, eps: &[(&str, HealthStatus, &str)]) -> Vec<u8> {
        encode(&ClusterLoadAssignment {
            cluster_name: cluster.into(),
            endpoints: eps
                .iter()
                .map(|(ip, h, node)| LocalityLbEndpoints {
                    locality: Some(Locality { zone: "z".into(), sub_zone: node.to_string(), ..Default::default() }),
                    lb_endpoints: vec![LbEndpoint {
                        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(xds_proto::endpoint::Endpoint {
                            address: Some(addr(ip, 8080)),
                            ..Default::default()
                        })),
                        health_status: *h as i32,
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn apply(t: &Table, kind: ResourceType, items: &[(&str, Vec<u8>)]) -> Result<Table, TableError> {
        let map: BTreeMap<String, Vec<u8>> = items.iter().map(|(n, b)| (n.to_string(), b.clone())).collect();
        let names: Vec<String> = map.keys().cloned().collect();
        t.apply(kind, |n| map.get(n).map(|b| &b[..]), &names, &[], "v1")
    }

    #[test]
    fn converts_listeners_clusters_and_endpoints() {
        let t = Table::default();
        let c = encode(&XdsCluster {
            name: "ns/web/80".into(),
            lb_policy: LbPolicy::RingHash as i32,
            metadata: meta::build([(meta::AFFINITY_TIMEOUT_SECONDS, MetaValue::from(60u32))]),
            ..Default::default()
        });
        let t = apply(&t, ResourceType::Cluster, &[("ns/web/80", c)]).unwrap();
        let t = apply(
            &t,
            ResourceType::ClusterLoadAssignment,
            &[(
                "ns/web/80",
                cla(
                    "ns/web/80",
                    &[("10.0.0.1", HealthStatus::Healthy, "n1"), ("10.0.0.2", HealthStatus::Draining, "n2")],
                ),
            )],
        )
        .unwrap();
        let t = apply(
            &t,
            ResourceType::Listener,
            &[(
                "svc/ns/web/80@10.96.0.1",
                tcp_listener("svc/ns/web/80@10.96.0.1", "10.96.0.1", 80, "ns/web/80", "Local"),
            )],
        )
        .unwrap();
        let l = &t.listeners["svc/ns/web/80@10.96.0.1"];
        assert_eq!((l.kind, l.local_only, l.cluster.as_str()), (AddressKind::ClusterIp, true, "ns/web/80"));
        let key = ListenKey { protocol: Protocol::Tcp, addr: "10.96.0.1:80".parse().unwrap() };
        assert_eq!(t.by_key[&key].name, l.name);
        let c = &t.clusters["ns/web/80"];
        assert_eq!(c.affinity, Some(Duration::from_secs(60)));
        let eps: Vec<(String, Health, &str)> =
            c.endpoints.iter().map(|e| (e.addr.to_string(), e.health, &*e.place.node)).collect();
        assert_eq!(
            eps,
            [
                ("10.0.0.1:8080".to_owned(), Health::Ready, "n1"),
                ("10.0.0.2:8080".to_owned(), Health::Terminating, "n2")
            ]
        );
        assert_eq!(t.versions[&ResourceType::Listener], "v1");
    }

    #[test]
    fn addresses_follow_listener_changes_incrementally() {
        let key = ListenKey { protocol: Protocol::Tcp, addr: "10.96.0.1:80".parse().unwrap() };
        let a = ("svc/a", tcp_listener("svc/a", "10.96.0.1", 80, "c", "Cluster"));
        let b = ("svc/b", tcp_listener("svc/b", "10.96.0.1", 80, "c", "Cluster"));
        let t = apply(&Table::default(), ResourceType::Listener, std::slice::from_ref(&b)).unwrap();
        assert_eq!(t.by_key[&key].name, "svc/b");
        let t = apply(&t, ResourceType::Listener, std::slice::from_ref(&a)).unwrap();
        assert_eq!(t.by_key[&key].name, "svc/a", "the first by name serves a shared address");
        let t = t.apply(ResourceType::Listener, |_| None, &[], &["svc/a".to_owned()], "v").unwrap();
        assert_eq!(t.by_key[&key].name, "svc/b", "the other claimant takes over");
        let moved = ("svc/b", tcp_listener("svc/b", "10.96.0.2", 80, "c", "Cluster"));
        let t = apply(&t, ResourceType::Listener, &[moved]).unwrap();
        assert!(!t.by_key.contains_key(&key));
        assert_eq!(t.by_key.len(), 1);
        let t = t.apply(ResourceType::Listener, |_| None, &[], &["svc/b".to_owned()], "v").unwrap();
        assert!(t.by_key.is_empty() && t.listeners.is_empty());
    }

    #[test]
    fn clusters_and_assignments_merge_in_any_order() {
        let cluster = |name: &str| encode(&XdsCluster { name: name.into(), ..Default::default() });
        let one = || cla("c", &[("10.0.0.1", HealthStatus::Healthy, "n")]);
        let remove = |t: &Table, kind, name: &str| t.apply(kind, |_| None, &[], &[name.to_owned()], "v2").unwrap();

        // Endpoints first: not served until the Cluster comes, then merged.
        let t = apply(&Table::default(), ResourceType::ClusterLoadAssignment, &[("c", one())]).unwrap();
        assert!(t.clusters.get("c").is_none(), "no Cluster yet: nothing to serve");
        assert_eq!(t.names(ResourceType::ClusterLoadAssignment), ["c"]);
        let t = apply(&t, ResourceType::Cluster, &[("c", cluster("c"))]).unwrap();
        assert_eq!(t.clusters["c"].endpoints.len(), 1);
        assert!(t.pending.is_empty());

        // A Cluster change keeps the endpoints and their live state.
        t.clusters["c"].endpoints[0].stats.active.store(3, Ordering::Relaxed);
        let t = apply(&t, ResourceType::Cluster, &[("c", cluster("c"))]).unwrap();
        assert_eq!(t.clusters["c"].endpoints[0].stats.active.load(Ordering::Relaxed), 3);

        // The Cluster removed while its assignment stays: back with it when the Cluster returns.
        let gone = remove(&t, ResourceType::Cluster, "c");
        assert!(gone.clusters.get("c").is_none());
        assert_eq!(gone.names(ResourceType::Cluster), Vec::<String>::new());
        assert_eq!(gone.names(ResourceType::ClusterLoadAssignment), ["c"]);
        let back = apply(&gone, ResourceType::Cluster, &[("c", cluster("c"))]).unwrap();
        assert_eq!(back.clusters["c"].endpoints.len(), 1);

        // The assignment removed: the Cluster stays, with no endpoint; removing it twice changes nothing.
        let empty = remove(&back, ResourceType::ClusterLoadAssignment, "c");
        assert!(empty.clusters["c"].endpoints.is_empty());
        assert!(empty.names(ResourceType::ClusterLoadAssignment).is_empty());
        let again = remove(&empty, ResourceType::ClusterLoadAssignment, "c");
        assert!(again.clusters["c"].endpoints.is_empty());
        // Both removed: nothing left anywhere.
        let none = remove(&remove(&back, ResourceType::ClusterLoadAssignment, "c"), ResourceType::Cluster, "c");
        assert!(none.clusters.is_empty());
        assert!(none.pending.is_empty(), "an empty assignment is not kept for a Cluster that may never return");
    }

    #[test]
    fn endpoint_state_survives_an_update_and_bad_resources_are_rejected() {
        let t = apply(
            &Table::default(),
            ResourceType::Cluster,
            &[("c", encode(&XdsCluster { name: "c".into(), ..Default::default() }))],
        )
        .unwrap();
        let t = apply(
            &t,
            ResourceType::ClusterLoadAssignment,
            &[("c", cla("c", &[("10.0.0.1", HealthStatus::Healthy, "n")]))],
        )
        .unwrap();
        t.clusters["c"].endpoints[0].stats.active.store(7, Ordering::Relaxed);
        let t2 = apply(
            &t,
            ResourceType::ClusterLoadAssignment,
            &[("c", cla("c", &[("10.0.0.1", HealthStatus::Healthy, "n"), ("10.0.0.2", HealthStatus::Healthy, "n")]))],
        )
        .unwrap();
        assert_eq!(
            t2.clusters["c"].endpoints[0].stats.active.load(Ordering::Relaxed),
            7,
            "same endpoint, same live state"
        );
        assert!(Arc::ptr_eq(&t.clusters["c"].affinity_map, &t2.clusters["c"].affinity_map));

        let garbage = apply(&t2, ResourceType::ClusterLoadAssignment, &[("c", vec![0x0a, 0xff])]);
        assert!(matches!(garbage, Err(TableError::Decode { .. })), "{garbage:?}");
        let bad_ip = apply(
            &t2,
            ResourceType::ClusterLoadAssignment,
            &[("c", cla("c", &[("not-an-ip", HealthStatus::Healthy, "n")]))],
        );
        assert!(bad_ip.unwrap_err().to_string().contains("\"not-an-ip\" is not an IP address"));
        let no_filter = encode(&XdsListener {
            name: "svc/x".into(),
            address: Some(addr("10.96.0.9", 80)),
            metadata: meta::build([
                (meta::SERVICE, MetaValue::from("ns/x")),
                (meta::ADDRESS_KIND, meta::KIND_CLUSTER_IP.into()),
            ]),
            ..Default::default()
        });
        let err = apply(&t2, ResourceType::Listener, &[("svc/x", no_filter)]).unwrap_err();
        assert!(err.to_string().contains("svc/x: TCP listener without a tcp_proxy"), "{err}");
        // Removal.
        let t3 = t2.apply(ResourceType::ClusterLoadAssignment, |_| None, &[], &["c".to_owned()], "v2").unwrap();
        assert!(t3.clusters["c"].endpoints.is_empty());
    }
}

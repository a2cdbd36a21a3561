//! Kubernetes state → xDS snapshot, per role, incrementally.
//!
//! [`translate`] is the pure function: the same [`Store`] always gives a byte-identical [`Snapshot`]. A long-lived
//! control plane uses [`Translator`] instead, which keeps each Service's output and recomputes only what a
//! [`Changes`] names, so one EndpointSlice edit costs one Service, not the cluster. The two agree by
//! construction (the full run is the incremental run with everything changed), and a property test checks it.
//!
//! Roles: the node proxy gets every Service address (Listeners) with its Cluster and endpoints; an ingress proxy
//! gets, for its IngressClass, the `ingress/http` and `ingress/https` Listeners and RouteConfigurations, the SDS
//! Secrets they name, and the Clusters and endpoints of the Services its routes lead to.
//!
//! Input that cannot be translated never stops the rest: it becomes a [`Problem`] naming the object and why, and
//! the snapshot holds everything else.

mod envoy;
mod ingress;
mod service;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use imbl::OrdMap;
use xds_proto::types::ResourceType;

use crate::model::{NsName, ObjectRef};
use crate::store::{Changes, Store};

pub use envoy::Protocol;
pub use ingress::{
    CLASS_ANNOTATION, DEFAULT_CLASS_ANNOTATION, NGINX_FORCE_SSL_REDIRECT_ANNOTATION, NGINX_SSL_REDIRECT_ANNOTATION,
    SSL_REDIRECT_ANNOTATION,
};
pub use service::{HEADLESS_LABEL, ListenKey, SERVICE_PROXY_NAME_LABEL, ZONE_LABEL};

/// Every annotation translation reads (on Ingresses and IngressClasses). A source may drop all others before
/// storing an object: they cannot change the snapshot, and in a cluster they are often large
/// (`kubectl.kubernetes.io/last-applied-configuration` holds a copy of the whole object).
pub const READ_ANNOTATIONS: &[&str] = &[
    CLASS_ANNOTATION,
    DEFAULT_CLASS_ANNOTATION,
    SSL_REDIRECT_ANNOTATION,
    NGINX_SSL_REDIRECT_ANNOTATION,
    NGINX_FORCE_SSL_REDIRECT_ANNOTATION,
];

/// Every label translation reads (on Services, EndpointSlices and Nodes); a source may drop all others.
pub const READ_LABELS: &[&str] =
    &[SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL, ZONE_LABEL, crate::store::SERVICE_NAME_LABEL];

/// The keys of a `kubernetes.io/tls` Secret's `data` translation reads; a source may drop the others.
pub const READ_SECRET_KEYS: &[&str] = &["tls.crt", "tls.key"];

/// One xDS resource, encoded once and shared by every client and every snapshot that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// The resource name (see `xds_proto::names`).
    pub name: String,
    /// Content-derived version: an unchanged resource keeps its version across snapshots and restarts.
    pub version: String,
    /// The canonical protobuf encoding (`xds_proto::codec::encode`).
    pub body: Bytes,
}

impl Resource {
    /// Encodes a message canonically and derives its version from the bytes.
    pub fn new<M: prost::Message + prost::Name>(name: impl Into<String>, msg: &M) -> Arc<Self> {
        let body = Bytes::from(xds_proto::codec::encode(msg));
        let version = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&body));
        Arc::new(Resource { name: name.into(), version, body })
    }
}

/// Resources of one type, by name. Persistent (`imbl`): cloning a snapshot is O(1) and an update shares
/// everything it did not touch.
pub type Resources = OrdMap<String, Arc<Resource>>;

/// What one role (node proxy, or ingress proxy of one class) is sent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoleSnapshot {
    by_type: [Resources; 5],
}

fn slot(t: ResourceType) -> usize {
    match t {
        ResourceType::Secret => 0,
        ResourceType::Cluster => 1,
        ResourceType::ClusterLoadAssignment => 2,
        ResourceType::Listener => 3,
        ResourceType::RouteConfiguration => 4,
    }
}

impl RoleSnapshot {
    /// The resources of one type.
    pub fn get(&self, t: ResourceType) -> &Resources {
        &self.by_type[slot(t)]
    }

    fn get_mut(&mut self, t: ResourceType) -> &mut Resources {
        &mut self.by_type[slot(t)]
    }

    fn set(&mut self, t: ResourceType, r: Arc<Resource>) {
        self.get_mut(t).insert(r.name.clone(), r);
    }

    /// A version for the whole set of one type (SotW responses carry one): a hash of every name and version,
    /// so it changes exactly when the set does.
    pub fn type_version(&self, t: ResourceType) -> String {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for (name, r) in self.get(t) {
            h.update(name.as_bytes());
            h.update(&[0]);
            h.update(r.version.as_bytes());
            h.update(&[0]);
        }
        format!("{:016x}", h.digest())
    }

    /// How many resources of every type.
    pub fn len(&self) -> usize {
        self.by_type.iter().map(OrdMap::len).sum()
    }

    /// Whether there are none at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Who a client is, as it says in `node.metadata`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role {
    /// A node proxy (`mesh-proxy`): Service addresses.
    Proxy,
    /// An ingress proxy (`mesh-ingress`) serving one IngressClass.
    Ingress {
        /// The IngressClass name.
        class: String,
    },
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Proxy => f.write_str("proxy"),
            Role::Ingress { class } => write!(f, "ingress ({class})"),
        }
    }
}

/// An object, or part of one, that could not be translated, and why. Everything else is still translated.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Problem {
    /// The object at fault.
    pub object: ObjectRef,
    /// What is wrong and what was done about it, in words that say what to check.
    pub reason: String,
}

impl Problem {
    pub(crate) fn new(object: ObjectRef, reason: impl Into<String>) -> Self {
        Problem { object, reason: reason.into() }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

/// Settings of the translation that are not in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The port of the `ingress/http` Listener (a real Envoy binds it; `mesh-ingress` binds its own flag).
    pub ingress_http_port: u16,
    /// The port of the `ingress/https` Listener.
    pub ingress_https_port: u16,
    /// Whether plain HTTP to a host with TLS is redirected to HTTPS when neither the Ingress nor its
    /// IngressClass says (`mesh.dev/ssl-redirect`). Off by default: served, as the Ingress conformance suite
    /// expects.
    pub ssl_redirect: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { ingress_http_port: 80, ingress_https_port: 443, ssl_redirect: false }
    }
}

/// Everything the control plane serves, at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// What every node proxy gets.
    pub proxy: RoleSnapshot,
    /// What an ingress proxy gets, per IngressClass of ours (`spec.controller` = `xds_proto::INGRESS_CONTROLLER`).
    pub ingress: OrdMap<String, RoleSnapshot>,
    /// Per node proxy, by node name: the `node/{name}` ClusterLoadAssignment telling it its Node's zone
    /// (`xds_proto::names::node_locality`), for Nodes that have one. Each proxy gets only its own.
    pub nodes: OrdMap<String, Arc<Resource>>,
    /// Everything that could not be translated, sorted.
    pub problems: Arc<Vec<Problem>>,
}

impl Snapshot {
    /// What a client of this role gets; an ingress class that is not ours gets nothing (and is told so by the
    /// caller, not by an error: the class may be created later).
    pub fn role(&self, role: &Role) -> RoleSnapshot {
        match role {
            Role::Proxy => self.proxy.clone(),
            Role::Ingress { class } => self.ingress.get(class).cloned().unwrap_or_default(),
        }
    }

    /// What one client gets: its role's resources, and for a node proxy (`node.id` = node name) its own
    /// Node's locality. O(log n): the role's resources are shared, not copied.
    pub fn for_client(&self, role: &Role, node_id: &str) -> RoleSnapshot {
        let mut out = self.role(role);
        if *role == Role::Proxy
            && let Some(r) = self.nodes.get(node_id)
        {
            out.set(ResourceType::ClusterLoadAssignment, r.clone());
        }
        out
    }
}

/// The pure translation: a store in, a snapshot out.
pub fn translate(store: &Store, opts: &Options) -> Snapshot {
    let mut t = Translator::new(opts.clone());
    t.full(store);
    t.snapshot().clone()
}

/// The incremental translator a control plane keeps: the previous snapshot plus each Service's output.
#[derive(Debug)]
pub struct Translator {
    opts: Options,
    services: BTreeMap<NsName, service::ServiceOut>,
    /// Listener candidates per address, oldest Service first: the first one is served, the others reported.
    claims: BTreeMap<ListenKey, BTreeMap<service::ClaimOrder, Arc<Resource>>>,
    /// The listener name served at each claimed address.
    winners: BTreeMap<ListenKey, String>,
    /// Conflict reports per address.
    conflicts: BTreeMap<ListenKey, Vec<Problem>>,
    ingress: ingress::IngressOut,
    snapshot: Snapshot,
}

impl Translator {
    /// An empty translator (an empty snapshot until the first update).
    pub fn new(opts: Options) -> Self {
        Translator {
            opts,
            services: BTreeMap::new(),
            claims: BTreeMap::new(),
            winners: BTreeMap::new(),
            conflicts: BTreeMap::new(),
            ingress: ingress::IngressOut::default(),
            snapshot: Snapshot::default(),
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The Ingresses of our IngressClasses as of the last update: the ones whose `status` we own.
    pub fn served_ingresses(&self) -> &BTreeSet<NsName> {
        &self.ingress.served
    }

    /// Translates everything in the store.
    pub fn full(&mut self, store: &Store) -> &Snapshot {
        self.update(store, &Changes { all_services: true, ingress: true, ..Changes::default() })
    }

    /// Recomputes what `changes` names. Cost: O(changed Services), plus the ingress route tables when
    /// Ingresses, IngressClasses, TLS Secrets or a Service's ports changed.
    pub fn update(&mut self, store: &Store, changes: &Changes) -> &Snapshot {
        let keys: BTreeSet<NsName> = if changes.all_services {
            store.service_keys().into_iter().chain(self.services.keys().cloned()).collect()
        } else {
            changes.services.clone()
        };
        let mut touched_addrs = BTreeSet::new();
        let mut touched_clusters = BTreeSet::new();
        // The problem list is rebuilt only when some part of it may have changed.
        let mut problems_dirty = changes.ingress || changes.all_services;
        for key in &keys {
            let new = service::translate(store, key);
            let old = self.services.remove(key);
            if old.as_ref().map_or(&[][..], |o| &o.problems[..]) != &new.problems[..] {
                problems_dirty = true;
            }
            if let Some(old) = &old {
                for (name, _) in old.clusters.iter().chain(&old.clas) {
                    touched_clusters.insert(name.clone());
                }
                if old.proxied {
                    let p = &mut self.snapshot.proxy;
                    for (name, _) in &old.clusters {
                        p.get_mut(ResourceType::Cluster).remove(name);
                    }
                    for (name, _) in &old.clas {
                        p.get_mut(ResourceType::ClusterLoadAssignment).remove(name);
                    }
                }
                for (addr, _) in &old.listeners {
                    if let Some(c) = self.claims.get_mut(addr) {
                        c.remove(&old.order);
                        if c.is_empty() {
                            self.claims.remove(addr);
                        }
                    }
                    touched_addrs.insert(*addr);
                }
            }
            if new.proxied {
                let p = &mut self.snapshot.proxy;
                for (_, r) in &new.clusters {
                    p.set(ResourceType::Cluster, r.clone());
                }
                for (_, r) in &new.clas {
                    p.set(ResourceType::ClusterLoadAssignment, r.clone());
                }
            }
            for (name, _) in new.clusters.iter().chain(&new.clas) {
                touched_clusters.insert(name.clone());
            }
            for (addr, r) in &new.listeners {
                self.claims.entry(*addr).or_default().insert(new.order.clone(), r.clone());
                touched_addrs.insert(*addr);
            }
            if !new.is_empty() {
                self.services.insert(key.clone(), new);
            }
        }
        problems_dirty |= self.resolve_claims(&touched_addrs);
        if changes.all_services {
            // A Node changed (or everything did): the per-node localities. O(Nodes), and only then.
            let nodes = service::node_localities(store);
            if nodes != self.snapshot.nodes {
                self.snapshot.nodes = nodes;
            }
        }

        if changes.ingress {
            self.ingress = ingress::translate(store, &self.opts);
            let mut roles = OrdMap::new();
            for (class, out) in &self.ingress.classes {
                let mut role = RoleSnapshot::default();
                for r in &out.resources {
                    role.set(r.0, r.1.clone());
                }
                for cluster in &out.clusters {
                    self.copy_cluster(&mut role, cluster);
                }
                roles.insert(class.clone(), role);
            }
            self.snapshot.ingress = roles;
        } else if !touched_clusters.is_empty() {
            let classes: Vec<String> = self.snapshot.ingress.keys().cloned().collect();
            for class in classes {
                let Some(out) = self.ingress.classes.get(&class) else { continue };
                let wanted: Vec<&String> = touched_clusters.iter().filter(|c| out.clusters.contains(*c)).collect();
                if wanted.is_empty() {
                    continue;
                }
                let mut role = self.snapshot.ingress.get(&class).cloned().unwrap_or_default();
                for cluster in wanted {
                    role.get_mut(ResourceType::Cluster).remove(cluster);
                    role.get_mut(ResourceType::ClusterLoadAssignment).remove(cluster);
                    self.copy_cluster(&mut role, cluster);
                }
                self.snapshot.ingress.insert(class, role);
            }
        }

        if !problems_dirty {
            return &self.snapshot;
        }
        let mut problems: Vec<Problem> = self
            .services
            .values()
            .flat_map(|s| s.problems.iter().cloned())
            .chain(self.conflicts.values().flatten().cloned())
            .chain(self.ingress.problems.iter().cloned())
            .collect();
        problems.sort();
        problems.dedup();
        if *self.snapshot.problems != problems {
            self.snapshot.problems = Arc::new(problems);
        }
        &self.snapshot
    }

    /// Copies a Service's Cluster and endpoints (by cluster name) into an ingress role.
    fn copy_cluster(&self, role: &mut RoleSnapshot, cluster: &str) {
        let Some(svc) = service::service_of_cluster(cluster) else { return };
        let Some(out) = self.services.get(&svc) else { return };
        for (name, r) in &out.clusters {
            if name == cluster {
                role.set(ResourceType::Cluster, r.clone());
            }
        }
        for (name, r) in &out.clas {
            if name == cluster {
                role.set(ResourceType::ClusterLoadAssignment, r.clone());
            }
        }
    }

    /// Serves, at each touched address, the listener of the oldest Service claiming it; reports the others.
    /// Returns whether any conflict report changed.
    fn resolve_claims(&mut self, addrs: &BTreeSet<ListenKey>) -> bool {
        let mut changed = false;
        let listeners = self.snapshot.proxy.get_mut(ResourceType::Listener);
        // Every old winner goes first, then every new one is put in: one listener name can move between
        // addresses (a port whose protocol or nodePort changed keeps its name), and removing the old address's
        // listener after the new one was inserted would remove the new one.
        for addr in addrs {
            if let Some(old) = self.winners.remove(addr) {
                listeners.remove(&old);
            }
            changed |= self.conflicts.remove(addr).is_some();
        }
        for addr in addrs {
            let Some(claims) = self.claims.get(addr) else { continue };
            let mut it = claims.iter();
            let Some((winner_order, winner)) = it.next() else { continue };
            listeners.insert(winner.name.clone(), winner.clone());
            self.winners.insert(*addr, winner.name.clone());
            let losers: Vec<Problem> = it
                .map(|(order, _)| {
                    Problem::new(
                        order.object(),
                        format!(
                            "{addr} is already served for Service {} (older); this Service gets no listener there",
                            winner_order.service
                        ),
                    )
                })
                .collect();
            if !losers.is_empty() {
                changed = true;
                self.conflicts.insert(*addr, losers);
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;

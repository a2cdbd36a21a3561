//! One Incremental (Delta) ADS stream, as a state machine: requests and snapshots in, responses out.
//!
//! Kept free of I/O so every protocol rule is unit-tested directly. Per type the stream remembers what the
//! client holds (what it said in `initial_resource_versions`, then what we sent), so it sends only what changed,
//! removes what is gone, and never resends a resource the client already has — in particular not one it NACKed,
//! until that resource changes again.
//!
//! What a wildcard client holds is kept as a persistent map that shares its structure with the snapshot it was
//! brought up to date with, so a thousand clients cost a thousand pointers, not a thousand copies of the
//! cluster, and finding what changed visits only the parts of the two maps that differ.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use imbl::ordmap::DiffItem;

use xds_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource as WireResource};
use xds_proto::protobuf::Any;
use xds_proto::types::ResourceType;

use super::{Ack, Pass, passes};
use crate::translate::{Resource, Resources, RoleSnapshot};

/// About how many bytes of resources one response carries.
pub const CHUNK: usize = 1 << 20;

#[derive(Debug, Default)]
struct TypeState {
    /// Whether the client asked for every resource of the type (`*`, or the legacy empty first request for
    /// LDS/CDS).
    wildcard: bool,
    subscribed: BTreeSet<String>,
    /// What the client holds. Versions named by `initial_resource_versions` become placeholder resources with
    /// that version and no body: only the version is ever compared.
    has: Resources,
    /// Explicitly subscribed names we told the client do not exist (so we say it once).
    told_absent: BTreeSet<String>,
    /// Whether the client has sent its first request for the type.
    started: bool,
    /// Whether it got a response for the type yet: the first one is always sent, even empty, so a client
    /// knows it is up to date (an empty type is not a type still loading).
    answered: bool,
}

/// The state of one Delta stream.
#[derive(Debug, Default)]
pub struct DeltaStream {
    types: BTreeMap<ResourceType, TypeState>,
    nonce: u64,
    /// The nonce of each response sent, with its type, until it is ACKed or NACKed.
    in_flight: BTreeMap<String, ResourceType>,
}

impl DeltaStream {
    /// A new stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Handles one request: an ACK/NACK of an earlier response and/or a change of subscriptions. Returns what
    /// the request says about an earlier response, and the responses to send now (for new subscriptions).
    pub fn on_request(
        &mut self,
        req: &DeltaDiscoveryRequest,
        snap: Option<&RoleSnapshot>,
    ) -> (Option<Ack>, Vec<DeltaDiscoveryResponse>) {
        let Some(kind) = ResourceType::from_type_url(&req.type_url) else {
            return (Some(Ack::UnknownType(req.type_url.clone())), Vec::new());
        };
        let mut ack = None;
        if !req.response_nonce.is_empty()
            && let Some(t) = self.in_flight.remove(&req.response_nonce)
        {
            ack = Some(match &req.error_detail {
                Some(e) => Ack::Nack { kind: t, nonce: req.response_nonce.clone(), detail: e.message.clone() },
                None => Ack::Ack { kind: t, nonce: req.response_nonce.clone() },
            });
        }
        let st = self.types.entry(kind).or_default();
        let first = !st.started;
        st.started = true;
        if first {
            for (name, version) in &req.initial_resource_versions {
                let placeholder = Resource { name: name.clone(), version: version.clone(), body: Default::default() };
                st.has.insert(name.clone(), Arc::new(placeholder));
            }
            // Legacy wildcard: the first LDS/CDS request naming nothing.
            if req.resource_names_subscribe.is_empty() && matches!(kind, ResourceType::Listener | ResourceType::Cluster)
            {
                st.wildcard = true;
            }
        }
        let mut changed_subscriptions = first;
        for name in &req.resource_names_subscribe {
            changed_subscriptions = true;
            if name == "*" {
                st.wildcard = true;
            } else {
                st.subscribed.insert(name.clone());
                st.told_absent.remove(name);
            }
        }
        for name in &req.resource_names_unsubscribe {
            changed_subscriptions = true;
            if name == "*" {
                st.wildcard = false;
            } else {
                st.subscribed.remove(name);
                st.told_absent.remove(name);
            }
            // The client drops what it unsubscribed from; forget it so a re-subscribe sends it again.
            if !st.wildcard {
                st.has.remove(name);
            }
        }
        let mut out = Vec::new();
        if changed_subscriptions && let Some(snap) = snap {
            out.extend(self.respond(kind, snap, Pass::Everything));
        }
        (ack, out)
    }

    /// Brings the client up to date with a snapshot: additions in dependency order, removals of what is
    /// referenced (Clusters, endpoints, Secrets) only after the Listeners and Routes that used them.
    pub fn on_snapshot(&mut self, snap: &RoleSnapshot) -> Vec<DeltaDiscoveryResponse> {
        let mut out = Vec::new();
        for (kind, pass) in passes() {
            if self.types.get(&kind).is_some_and(|s| s.started) {
                out.extend(self.respond(kind, snap, pass));
            }
        }
        out
    }

    fn respond(&mut self, kind: ResourceType, snap: &RoleSnapshot, pass: Pass) -> Vec<DeltaDiscoveryResponse> {
        let Some(st) = self.types.get_mut(&kind) else { return Vec::new() };
        let current = snap.get(kind);
        let mut send: Vec<Arc<Resource>> = Vec::new();
        let mut removed: Vec<String> = Vec::new();
        if st.wildcard {
            // Only the parts of the two maps that differ are visited.
            for item in st.has.diff(current) {
                match item {
                    DiffItem::Add(_, r) => send.push(r.clone()),
                    DiffItem::Update { old: (_, o), new: (_, r) } if o.version != r.version => send.push(r.clone()),
                    DiffItem::Update { .. } => {}
                    DiffItem::Remove(name, _) => removed.push(name.clone()),
                }
            }
        } else {
            for name in &st.subscribed {
                match (current.get(name), st.has.get(name)) {
                    (Some(r), Some(h)) if h.version == r.version => {}
                    (Some(r), _) => send.push(r.clone()),
                    (None, Some(_)) => removed.push(name.clone()),
                    (None, None) => {}
                }
            }
            // Held but no longer subscribed (an earlier wildcard): gone too, if gone from the snapshot.
            for (name, _) in st.has.iter() {
                if !st.subscribed.contains(name) && !current.contains_key(name) && !removed.contains(name) {
                    removed.push(name.clone());
                }
            }
        }
        // Whether, after this response, the client holds exactly the snapshot's map.
        let complete = (pass.updates() || send.is_empty()) && (pass.removals() || removed.is_empty());
        let pending_removal = if pass.removals() { Vec::new() } else { removed.clone() };
        if !pass.updates() {
            send.clear();
        }
        if !pass.removals() {
            removed.clear();
        }
        // Subscribed names that do not exist: say so once, so the client does not wait for them.
        let mut absent = Vec::new();
        if pass.removals() {
            for name in &st.subscribed {
                if !current.contains_key(name) && !st.told_absent.contains(name) && !removed.contains(name) {
                    absent.push(name.clone());
                }
            }
        }
        if send.is_empty() && removed.is_empty() && absent.is_empty() && st.answered {
            return Vec::new();
        }
        st.answered = true;
        // Record what the client now holds; for a wildcard client brought fully up to date that is the
        // snapshot's own map, shared.
        if st.wildcard && complete {
            st.has = current.clone();
        } else if st.wildcard && pass == Pass::Updates {
            // Up to date but for removals still to come: the snapshot's map plus what is pending removal.
            let pending: Vec<(String, Arc<Resource>)> =
                pending_removal.into_iter().filter_map(|n| st.has.get(&n).map(|r| (n, r.clone()))).collect();
            st.has = current.clone();
            for (n, r) in pending {
                st.has.insert(n, r);
            }
        } else {
            for r in &send {
                st.has.insert(r.name.clone(), r.clone());
            }
            for name in &removed {
                st.has.remove(name);
            }
        }
        for name in removed.iter().chain(&absent) {
            if st.subscribed.contains(name) {
                st.told_absent.insert(name.clone());
            }
        }
        removed.extend(absent);
        // Large sets (an initial snapshot) go out in pieces of about CHUNK bytes: Delta allows any number of
        // responses per type, and it keeps every encode buffer (tonic keeps one per stream, as large as the
        // largest message) and every client's decode buffer small.
        let version = snap.type_version(kind);
        let mut out = Vec::new();
        let mut removed = Some(removed);
        let mut chunk: Vec<WireResource> = Vec::new();
        let mut size = 0;
        let mut rest = send.into_iter().peekable();
        loop {
            if let Some(r) = rest.next() {
                size += r.body.len() + r.name.len();
                chunk.push(WireResource {
                    name: r.name.clone(),
                    version: r.version.clone(),
                    resource: Some(Any { type_url: kind.type_url().to_owned(), value: r.body.to_vec() }),
                    ..Default::default()
                });
                if size < CHUNK && rest.peek().is_some() {
                    continue;
                }
            }
            self.nonce += 1;
            let nonce = self.nonce.to_string();
            self.in_flight.insert(nonce.clone(), kind);
            out.push(DeltaDiscoveryResponse {
                system_version_info: version.clone(),
                resources: std::mem::take(&mut chunk),
                type_url: kind.type_url().to_owned(),
                removed_resources: removed.take().unwrap_or_default(),
                nonce,
                ..Default::default()
            });
            size = 0;
            if rest.peek().is_none() {
                break;
            }
        }
        out
    }

    /// What the client holds of a type (for `/debug/clients`).
    pub fn holds(&self, kind: ResourceType) -> usize {
        self.types.get(&kind).map_or(0, |s| s.has.len())
    }
}

//! One State-of-the-World ADS stream, as a state machine: requests and snapshots in, responses out.
//!
//! Each response carries the whole set of a type the client asked for (everything for a wildcard, the named
//! ones otherwise), with a version derived from exactly that set, so an unchanged set is never resent. A NACK
//! keeps the stream from resending the version that was refused; the next change sends a new one. A request with
//! a nonce that is not the latest for its type is stale and ignored, as the protocol says.

use std::collections::{BTreeMap, BTreeSet};

use imbl::ordmap::DiffItem;

use xds_proto::discovery::{DiscoveryRequest, DiscoveryResponse};
use xds_proto::protobuf::Any;
use xds_proto::types::ResourceType;

use super::{Ack, Pass, passes};
use crate::translate::{Resources, RoleSnapshot};

#[derive(Debug, Default)]
struct TypeState {
    /// Whether the client asked for the type (it may have asked before the first snapshot existed).
    requested: bool,
    /// `None`: every resource of the type.
    names: Option<BTreeSet<String>>,
    /// The resources last sent, by name (kept so removals can be delayed until nothing refers to them); for a
    /// wildcard it shares its structure with the snapshot.
    sent: Resources,
    /// The version last sent, if any.
    sent_version: Option<String>,
    /// The nonce of the last response; only a request carrying it is an ACK/NACK.
    nonce: Option<String>,
}

/// The state of one SotW stream.
#[derive(Debug, Default)]
pub struct SotwStream {
    types: BTreeMap<ResourceType, TypeState>,
    nonce: u64,
}

/// A version for a set of resources: a hash of names and versions.
fn set_version(set: &Resources) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for (name, r) in set {
        h.update(name.as_bytes());
        h.update(&[0]);
        h.update(r.version.as_bytes());
        h.update(&[0]);
    }
    format!("{:016x}", h.digest())
}

impl SotwStream {
    /// A new stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Handles one request; returns what it says about an earlier response and what to send now.
    pub fn on_request(
        &mut self,
        req: &DiscoveryRequest,
        snap: Option<&RoleSnapshot>,
    ) -> (Option<Ack>, Vec<DiscoveryResponse>) {
        let Some(kind) = ResourceType::from_type_url(&req.type_url) else {
            return (Some(Ack::UnknownType(req.type_url.clone())), Vec::new());
        };
        let st = self.types.entry(kind).or_default();
        let mut ack = None;
        if !req.response_nonce.is_empty() {
            if st.nonce.as_deref() != Some(req.response_nonce.as_str()) {
                return (Some(Ack::Stale { kind, nonce: req.response_nonce.clone() }), Vec::new());
            }
            ack = Some(match &req.error_detail {
                Some(e) => Ack::Nack { kind, nonce: req.response_nonce.clone(), detail: e.message.clone() },
                None => Ack::Ack { kind, nonce: req.response_nonce.clone() },
            });
        }
        let names = if req.resource_names.is_empty() || req.resource_names.iter().any(|n| n == "*") {
            None
        } else {
            Some(req.resource_names.iter().cloned().collect())
        };
        let first = st.nonce.is_none();
        st.requested = true;
        let changed = names != st.names;
        st.names = names;
        let mut out = Vec::new();
        if (first || changed)
            && let Some(snap) = snap
        {
            // A new subscription is always answered, even with the version the client already has (it may be
            // a reconnect that needs confirming) — Envoy waits for that answer before warming.
            out.extend(self.respond(kind, snap, Pass::Everything, true));
        }
        (ack, out)
    }

    /// Brings the client up to date with a snapshot (see [`super::passes`] for the order).
    pub fn on_snapshot(&mut self, snap: &RoleSnapshot) -> Vec<DiscoveryResponse> {
        let mut out = Vec::new();
        for (kind, pass) in passes() {
            let Some(st) = self.types.get(&kind) else { continue };
            if st.requested {
                // A type asked for before any snapshot existed has not been answered yet: answer it now.
                let force = st.nonce.is_none();
                out.extend(self.respond(kind, snap, pass, force));
            }
        }
        out
    }

    fn respond(
        &mut self,
        kind: ResourceType,
        snap: &RoleSnapshot,
        pass: Pass,
        force: bool,
    ) -> Option<DiscoveryResponse> {
        let st = self.types.get_mut(&kind)?;
        let current = snap.get(kind);
        let mut set: Resources = match &st.names {
            None => current.clone(),
            Some(names) => names.iter().filter_map(|n| current.get(n).map(|r| (n.clone(), r.clone()))).collect(),
        };
        // What changed since the last response (visiting only what differs).
        let (mut added, mut gone, mut updated) = (Vec::new(), Vec::new(), Vec::new());
        for item in st.sent.diff(&set) {
            match item {
                DiffItem::Add(n, _) => added.push(n.clone()),
                DiffItem::Remove(n, r) => gone.push((n.clone(), r.clone())),
                DiffItem::Update { old: (n, o), .. } => updated.push((n.clone(), o.clone())),
            }
        }
        if !pass.removals() {
            // Keep what is gone for now: a Listener may still name it until the Listener update lands.
            for (n, r) in gone {
                set.insert(n, r);
            }
        } else if !pass.updates() {
            // Removals only: what is kept stays at the version the client has, and nothing is added.
            for (n, r) in updated {
                set.insert(n, r);
            }
            for n in added {
                set.remove(&n);
            }
        }
        let version = set_version(&set);
        if !force && st.sent_version.as_deref() == Some(version.as_str()) {
            return None;
        }
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let resources =
            set.values().map(|r| Any { type_url: kind.type_url().to_owned(), value: r.body.to_vec() }).collect();
        st.sent = set;
        st.sent_version = Some(version.clone());
        st.nonce = Some(nonce.clone());
        Some(DiscoveryResponse {
            version_info: version,
            resources,
            type_url: kind.type_url().to_owned(),
            nonce,
            ..Default::default()
        })
    }

    /// How many resources of a type the client was last sent (for `/debug/clients`).
    pub fn holds(&self, kind: ResourceType) -> usize {
        self.types.get(&kind).map_or(0, |s| s.sent.len())
    }
}

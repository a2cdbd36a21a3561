//! Which endpoint a new connection (or UDP flow) goes to, following Kubernetes semantics:
//!
//! 1. Traffic policy `Local` keeps only this node's endpoints.
//! 2. Ready endpoints; only if none is ready, terminating-but-serving ones (KEP-1669); never not-ready ones.
//! 3. Topology (not for `Local` policies, which take precedence): when every candidate carries node hints
//!    (`hints.forNodes`), prefer those meant for this node; else, when every candidate carries zone hints, those
//!    meant for this node's zone. Without hints, `trafficDistribution: PreferSameNode` prefers this node's
//!    endpoints, then its zone's; `PreferSameZone` (or `PreferClose`) this zone's. If no endpoint is preferred,
//!    all stay. The zone is the Node's `topology.kubernetes.io/zone` as mesh-control sends it, or `--zone`.
//! 4. Endpoints ejected after repeated connect failures are skipped, unless that would leave nothing.
//! 5. `sessionAffinity: ClientIP` returns a client to its endpoint while it stays a candidate and the timeout has
//!    not passed since its last use.
//! 6. Otherwise least-connections by the power of two random choices (or round-robin, if configured).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Instant;

use mesh_runtime::endpoint::two_choices;

use crate::table::{Cluster, Distribution, Endpoint, Health, Table, now_ms};

/// How to pick among equal candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// Least open connections of two random candidates: near-optimal spread, O(1), no shared counter to fight
    /// over.
    #[default]
    LeastConnections,
    /// In turn.
    RoundRobin,
}

pub use mesh_runtime::endpoint::{EJECT_AFTER_FAILURES, EJECT_FOR, InFlight};

/// Who the proxy is, for Local policies and topology.
#[derive(Debug, Clone, Default)]
pub struct Locality {
    /// This node's name.
    pub node: String,
    /// This node's zone when given on the command line (`--zone`): it overrides the zone mesh-control sends
    /// from the Node's `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
}

impl Locality {
    /// Where this proxy is under `table`: the `--zone` override, else the zone its Node has in the table.
    pub fn at<'a>(&'a self, table: &'a Table) -> Here<'a> {
        let zone = self.zone.as_deref().or_else(|| table.node_zone(&self.node)).filter(|z| !z.is_empty());
        Here { node: &self.node, zone }
    }
}

/// This proxy's node and zone at one moment (the zone follows the Node's label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Here<'a> {
    /// This node's name.
    pub node: &'a str,
    /// This node's zone, if known.
    pub zone: Option<&'a str>,
}

/// The endpoints a connection may go to, best tier only (see the module docs, steps 1–4).
pub fn candidates<'a>(cluster: &'a Cluster, local_only: bool, here: Here<'_>) -> Vec<&'a Endpoint> {
    let eligible = |e: &&Endpoint| !local_only || *e.place.node == *here.node;
    let mut tier: Vec<&Endpoint> =
        cluster.endpoints.iter().filter(eligible).filter(|e| e.health == Health::Ready).collect();
    if tier.is_empty() {
        tier = cluster.endpoints.iter().filter(eligible).filter(|e| e.health == Health::Terminating).collect();
    }
    // A Local traffic policy takes precedence over topology: its endpoints are all this node's already, and
    // hints (meant for the cluster-wide set) must not drop any of them.
    if !local_only {
        tier = topology(tier, cluster.distribution, here);
    }
    let now = now_ms();
    if tier.iter().any(|e| !e.stats.ejected(now)) {
        tier.retain(|e| !e.stats.ejected(now));
    }
    tier
}

/// Narrows `tier` to the endpoints topology prefers for this node, as kube-proxy does (KEP-2433, KEP-3015):
/// node hints when every endpoint has them and some are for this node; else zone hints when every endpoint has
/// them and some are for this zone. Without hints, `trafficDistribution` decides: `PreferSameNode` prefers this
/// node's endpoints, then (like `PreferSameZone`/`PreferClose`) those in this zone. A preference that no
/// endpoint meets leaves the tier as it was.
fn topology<'a>(tier: Vec<&'a Endpoint>, distribution: Distribution, here: Here<'_>) -> Vec<&'a Endpoint> {
    if tier.is_empty() {
        return tier;
    }
    let narrowed = |keep: &dyn Fn(&Endpoint) -> bool| -> Option<Vec<&'a Endpoint>> {
        let v: Vec<&'a Endpoint> = tier.iter().copied().filter(|e| keep(e)).collect();
        (!v.is_empty()).then_some(v)
    };
    let node_hinted = tier.iter().all(|e| !e.place.for_nodes.is_empty());
    if node_hinted {
        if let Some(v) = narrowed(&|e| e.place.for_nodes.iter().any(|n| **n == *here.node)) {
            return v;
        }
    } else if distribution == Distribution::SameNode
        && let Some(v) = narrowed(&|e| *e.place.node == *here.node)
    {
        return v;
    }
    let Some(zone) = here.zone else { return tier };
    let zone_hinted = tier.iter().all(|e| !e.place.for_zones.is_empty());
    let close = if zone_hinted {
        narrowed(&|e| e.place.for_zones.iter().any(|z| **z == *zone))
    } else if distribution != Distribution::Any {
        narrowed(&|e| *e.place.zone == *zone)
    } else {
        None
    };
    close.unwrap_or(tier)
}

/// Picks an endpoint for a client among `candidates`, skipping those in `tried` (a retry after a failed
/// connect). Records session affinity.
pub fn choose<'a>(
    cluster: &Cluster,
    candidates: &[&'a Endpoint],
    client: IpAddr,
    tried: &[SocketAddr],
    algorithm: Algorithm,
) -> Option<&'a Endpoint> {
    let open: Vec<&'a Endpoint> = candidates.iter().copied().filter(|e| !tried.contains(&e.addr)).collect();
    if open.is_empty() {
        return None;
    }
    if let Some(timeout) = cluster.affinity {
        let now = Instant::now();
        let mut map = cluster.affinity_map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((addr, last)) = map.get(&client).copied()
            && now.duration_since(last) < timeout
            && let Some(e) = open.iter().find(|e| e.addr == addr)
        {
            map.insert(client, (addr, now));
            return Some(e);
        }
        let e = pick(cluster, &open, algorithm);
        map.insert(client, (e.addr, now));
        if map.len() > 4096 && map.len().is_power_of_two() {
            // Forget clients idle past the timeout, now and then, so the map does not grow without bound.
            map.retain(|_, (_, last)| now.duration_since(*last) < timeout);
        }
        return Some(e);
    }
    Some(pick(cluster, &open, algorithm))
}

fn pick<'a>(cluster: &Cluster, open: &[&'a Endpoint], algorithm: Algorithm) -> &'a Endpoint {
    if open.len() == 1 {
        return open[0];
    }
    match algorithm {
        Algorithm::RoundRobin => {
            let i = cluster.rr.fetch_add(1, Ordering::Relaxed) as usize;
            open[i % open.len()]
        }
        Algorithm::LeastConnections => {
            let (a, b) = two_choices(open.len());
            let (ea, eb) = (open[a], open[b]);
            if eb.stats.in_flight() < ea.stats.in_flight() { eb } else { ea }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::table::Endpoint;
    use xds_proto::types::ResourceType;

    fn ep(addr: &str, health: Health, node: &str, zone: &str, hints: &[&str]) -> Endpoint {
        Endpoint {
            addr: addr.parse().unwrap(),
            health,
            place: crate::table::Placement::interned(node, zone, hints),
            stats: Arc::default(),
        }
    }

    fn cluster(eps: Vec<Endpoint>) -> Cluster {
        Cluster {
            name: "ns/s/80".into(),
            affinity: None,
            distribution: Distribution::Any,
            endpoints: eps.into(),
            affinity_map: Arc::default(),
            rr: Arc::default(),
        }
    }

    fn addrs(v: &[&Endpoint]) -> Vec<String> {
        v.iter().map(|e| e.addr.to_string()).collect()
    }

    fn here<'a>(node: &'a str, zone: Option<&'a str>) -> Here<'a> {
        Here { node, zone }
    }

    fn node_ep(addr: &str, node: &str, zone: &str, for_zones: &[&str], for_nodes: &[&str]) -> Endpoint {
        Endpoint {
            addr: addr.parse().unwrap(),
            health: Health::Ready,
            place: crate::table::Placement::interned_with_nodes(node, zone, for_zones, for_nodes),
            stats: Arc::default(),
        }
    }

    #[test]
    fn ready_first_then_terminating_never_not_ready() {
        let c = cluster(vec![
            ep("10.0.0.1:80", Health::Ready, "n1", "", &[]),
            ep("10.0.0.2:80", Health::Terminating, "n1", "", &[]),
            ep("10.0.0.3:80", Health::NotReady, "n1", "", &[]),
        ]);
        assert_eq!(addrs(&candidates(&c, false, here("n1", None))), ["10.0.0.1:80"]);
        let c = cluster(vec![
            ep("10.0.0.2:80", Health::Terminating, "n1", "", &[]),
            ep("10.0.0.3:80", Health::NotReady, "n1", "", &[]),
        ]);
        assert_eq!(addrs(&candidates(&c, false, here("n1", None))), ["10.0.0.2:80"]);
        let c = cluster(vec![ep("10.0.0.3:80", Health::NotReady, "n1", "", &[])]);
        assert!(candidates(&c, false, here("n1", None)).is_empty());
    }

    #[test]
    fn local_policy_keeps_this_nodes_endpoints_only() {
        let c = cluster(vec![
            ep("10.0.0.1:80", Health::Ready, "n1", "", &[]),
            ep("10.0.0.2:80", Health::Ready, "n2", "", &[]),
        ]);
        assert_eq!(addrs(&candidates(&c, true, here("n2", None))), ["10.0.0.2:80"]);
        assert!(candidates(&c, true, here("n3", None)).is_empty(), "Local with no local endpoint: nothing");
        assert_eq!(candidates(&c, false, here("n3", None)).len(), 2);
    }

    #[test]
    fn topology_hints_and_prefer_close() {
        let hinted = cluster(vec![
            ep("10.0.0.1:80", Health::Ready, "n1", "a", &["a"]),
            ep("10.0.0.2:80", Health::Ready, "n2", "b", &["b"]),
        ]);
        assert_eq!(addrs(&candidates(&hinted, false, here("n9", Some("b")))), ["10.0.0.2:80"]);
        // A zone no endpoint is meant for falls back to all.
        assert_eq!(candidates(&hinted, false, here("n9", Some("c"))).len(), 2);
        // Hints only count when every endpoint has them.
        let partial = cluster(vec![
            ep("10.0.0.1:80", Health::Ready, "n1", "a", &["a"]),
            ep("10.0.0.2:80", Health::Ready, "n2", "b", &[]),
        ]);
        assert_eq!(candidates(&partial, false, here("n9", Some("a"))).len(), 2);
        let mut close = cluster(vec![
            ep("10.0.0.1:80", Health::Ready, "n1", "a", &[]),
            ep("10.0.0.2:80", Health::Ready, "n2", "b", &[]),
        ]);
        close.distribution = Distribution::SameZone;
        assert_eq!(addrs(&candidates(&close, false, here("n9", Some("a")))), ["10.0.0.1:80"]);
    }

    #[test]
    fn the_zone_is_the_nodes_unless_overridden() {
        use xds_proto::endpoint::{ClusterLoadAssignment, LocalityLbEndpoints};
        let cla = |node: &str, zone: &str| ClusterLoadAssignment {
            cluster_name: xds_proto::names::node_locality(node),
            endpoints: vec![LocalityLbEndpoints {
                locality: Some(xds_proto::core::Locality {
                    zone: zone.into(),
                    sub_zone: node.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let apply = |t: &Table, node: &str, zone: &str| {
            let body = prost::Message::encode_to_vec(&cla(node, zone));
            let name = xds_proto::names::node_locality(node);
            t.apply(ResourceType::ClusterLoadAssignment, |_| Some(&body[..]), std::slice::from_ref(&name), &[], "v")
                .unwrap()
        };
        let learned = Locality { node: "n1".into(), zone: None };
        let pinned = Locality { node: "n1".into(), zone: Some("z9".into()) };
        let t = Table::default();
        assert_eq!(learned.at(&t).zone, None);
        let t = apply(&t, "n1", "z1");
        assert_eq!(learned.at(&t), Here { node: "n1", zone: Some("z1") });
        assert_eq!(pinned.at(&t).zone, Some("z9"), "--zone overrides the Node's label");
        let t = apply(&t, "n2", "z2");
        assert_eq!(learned.at(&t).zone, Some("z1"), "another node's locality is not ours");
        let t = apply(&t, "n1", "z3");
        assert_eq!(learned.at(&t).zone, Some("z3"), "a changed label is followed");
        assert!(t.clusters.is_empty(), "a node locality is not a Service's endpoints");
        assert!(t.names(ResourceType::ClusterLoadAssignment).contains(&xds_proto::names::node_locality("n1")));
        let name = xds_proto::names::node_locality("n1");
        let t = t.apply(ResourceType::ClusterLoadAssignment, |_| None, &[], &[name], "v2").unwrap();
        assert_eq!(learned.at(&t).zone, None, "a removed label: no zone");
    }

    #[test]
    fn prefer_same_zone_is_prefer_close() {
        assert_eq!(Distribution::parse(Some("PreferSameZone")), Distribution::SameZone);
        assert_eq!(Distribution::parse(Some("PreferClose")), Distribution::SameZone);
        assert_eq!(Distribution::parse(Some("PreferSameNode")), Distribution::SameNode);
        assert_eq!(Distribution::parse(Some("Nearby")), Distribution::Any);
        assert_eq!(Distribution::parse(None), Distribution::Any);
    }

    #[test]
    fn node_hints_and_prefer_same_node() {
        // Every endpoint hinted for nodes (and zones, as the EndpointSlice controller does for PreferSameNode).
        let hinted = cluster(vec![
            node_ep("10.0.0.1:80", "n1", "a", &["a"], &["n1"]),
            node_ep("10.0.0.2:80", "n2", "a", &["a"], &["n2"]),
            node_ep("10.0.0.3:80", "n3", "b", &["b"], &["n3"]),
        ]);
        assert_eq!(addrs(&candidates(&hinted, false, here("n2", Some("a")))), ["10.0.0.2:80"]);
        // No endpoint for this node: zone hints, as for zones.
        assert_eq!(addrs(&candidates(&hinted, false, here("n4", Some("b")))), ["10.0.0.3:80"]);
        // Neither: all.
        assert_eq!(candidates(&hinted, false, here("n4", Some("c"))).len(), 3);
        assert_eq!(candidates(&hinted, false, here("n4", None)).len(), 3);
        // Node hints count only when every endpoint has them: then zone hints decide.
        let partial = cluster(vec![
            node_ep("10.0.0.1:80", "n1", "a", &["a"], &["n1"]),
            node_ep("10.0.0.2:80", "n2", "a", &["a"], &[]),
            node_ep("10.0.0.3:80", "n3", "b", &["b"], &["n3"]),
        ]);
        assert_eq!(addrs(&candidates(&partial, false, here("n1", Some("a")))), ["10.0.0.1:80", "10.0.0.2:80"]);

        // PreferSameNode without hints: this node's endpoints, else this zone's, else all.
        let mut same_node = cluster(vec![
            node_ep("10.0.0.1:80", "n1", "a", &[], &[]),
            node_ep("10.0.0.2:80", "n2", "a", &[], &[]),
            node_ep("10.0.0.3:80", "n3", "b", &[], &[]),
        ]);
        assert_eq!(candidates(&same_node, false, here("n1", Some("a"))).len(), 3, "no distribution: all");
        same_node.distribution = Distribution::SameNode;
        assert_eq!(addrs(&candidates(&same_node, false, here("n1", Some("a")))), ["10.0.0.1:80"]);
        assert_eq!(addrs(&candidates(&same_node, false, here("n4", Some("b")))), ["10.0.0.3:80"]);
        assert_eq!(candidates(&same_node, false, here("n4", Some("c"))).len(), 3);
    }

    #[test]
    fn local_policy_takes_precedence_over_hints() {
        // Both endpoints on n1, but the hints send them elsewhere: Local keeps both.
        let c = cluster(vec![
            node_ep("10.0.0.1:80", "n1", "a", &["b"], &["n2"]),
            node_ep("10.0.0.2:80", "n1", "a", &["a"], &["n1"]),
            node_ep("10.0.0.3:80", "n2", "b", &["b"], &["n2"]),
        ]);
        assert_eq!(addrs(&candidates(&c, true, here("n1", Some("a")))), ["10.0.0.1:80", "10.0.0.2:80"]);
        let zoned = cluster(vec![
            node_ep("10.0.0.1:80", "n1", "a", &["b"], &[]),
            node_ep("10.0.0.2:80", "n1", "a", &["a"], &[]),
        ]);
        assert_eq!(candidates(&zoned, true, here("n1", Some("a"))).len(), 2, "zone hints do not narrow Local");
        assert_eq!(addrs(&candidates(&zoned, false, here("n1", Some("a")))), ["10.0.0.2:80"]);
    }

    #[test]
    fn ejection_skips_failing_endpoints_unless_all_fail() {
        let c = cluster(vec![
            ep("10.0.0.1:80", Health::Ready, "n1", "", &[]),
            ep("10.0.0.2:80", Health::Ready, "n1", "", &[]),
        ]);
        let e1 = &c.endpoints[0];
        assert!(!e1.stats.connect_failed() && !e1.stats.connect_failed());
        assert!(e1.stats.connect_failed(), "the third failure in a row ejects");
        assert_eq!(addrs(&candidates(&c, false, here("n1", None))), ["10.0.0.2:80"]);
        for _ in 0..EJECT_AFTER_FAILURES {
            c.endpoints[1].stats.connect_failed();
        }
        assert_eq!(candidates(&c, false, here("n1", None)).len(), 2, "all ejected: try them all rather than none");
    }

    #[test]
    fn least_connections_prefers_the_idle_endpoint() {
        let c = cluster(vec![
            ep("10.0.0.1:80", Health::Ready, "n1", "", &[]),
            ep("10.0.0.2:80", Health::Ready, "n1", "", &[]),
        ]);
        let _busy: Vec<InFlight> = (0..5).map(|_| InFlight::new(&c.endpoints[0].stats)).collect();
        let cands = candidates(&c, false, here("n1", None));
        for _ in 0..50 {
            let e = choose(&c, &cands, "10.1.0.1".parse().unwrap(), &[], Algorithm::LeastConnections).unwrap();
            assert_eq!(e.addr.to_string(), "10.0.0.2:80");
        }
    }

    #[test]
    fn round_robin_and_retry_exclusion() {
        let c = cluster(vec![
            ep("10.0.0.1:80", Health::Ready, "n1", "", &[]),
            ep("10.0.0.2:80", Health::Ready, "n1", "", &[]),
        ]);
        let cands = candidates(&c, false, here("n1", None));
        let ip: IpAddr = "10.1.0.1".parse().unwrap();
        let picks: Vec<String> =
            (0..4).map(|_| choose(&c, &cands, ip, &[], Algorithm::RoundRobin).unwrap().addr.to_string()).collect();
        assert_eq!(picks, ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.1:80", "10.0.0.2:80"]);
        let tried = [c.endpoints[0].addr];
        for _ in 0..10 {
            assert_eq!(choose(&c, &cands, ip, &tried, Algorithm::LeastConnections).unwrap().addr, c.endpoints[1].addr);
        }
        assert!(choose(&c, &cands, ip, &[c.endpoints[0].addr, c.endpoints[1].addr], Algorithm::RoundRobin).is_none());
    }

    #[test]
    fn session_affinity_sticks_until_timeout_or_endpoint_gone() {
        let mut c = cluster((1..=8).map(|i| ep(&format!("10.0.0.{i}:80"), Health::Ready, "n1", "", &[])).collect());
        c.affinity = Some(Duration::from_millis(50));
        let cands = candidates(&c, false, here("n1", None));
        let ip: IpAddr = "10.1.0.7".parse().unwrap();
        let first = choose(&c, &cands, ip, &[], Algorithm::RoundRobin).unwrap().addr;
        for _ in 0..20 {
            assert_eq!(choose(&c, &cands, ip, &[], Algorithm::RoundRobin).unwrap().addr, first);
        }
        // The endpoint goes away: the client moves, and then sticks to the new one.
        let without: Vec<&Endpoint> = cands.iter().copied().filter(|e| e.addr != first).collect();
        let second = choose(&c, &without, ip, &[], Algorithm::RoundRobin).unwrap().addr;
        assert_ne!(second, first);
        assert_eq!(choose(&c, &cands, ip, &[], Algorithm::RoundRobin).unwrap().addr, second);
        // Idle past the timeout: balanced again, so round-robin decides (here: moves it on).
        c.affinity_map.lock().unwrap().get_mut(&ip).unwrap().1 -= Duration::from_millis(60);
        c.rr.store(0, Ordering::Relaxed);
        assert_eq!(choose(&c, &cands, ip, &[], Algorithm::RoundRobin).unwrap().addr, cands[0].addr);
        assert_ne!(cands[0].addr, second);
    }
}

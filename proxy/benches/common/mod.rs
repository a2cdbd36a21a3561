//! Shared by the proxy benchmarks: a generated cluster as hand-made xDS resources, in the shape `mesh-control`
//! sends to the proxy role (see `control/src/translate/service.rs`), and the table built from them with
//! `Table::apply`, as the xDS handler and the snapshot-file loader do.
//!
//! The cluster: `services` Services (`ns-XX/svc-NNNNN`, 50 namespaces) with a unique ClusterIP `10.96.x.y` and 2
//! TCP ports (`http` 80 → 8080, `grpc` 9090 → 9090), so 2 × `services` Listeners, Clusters and
//! ClusterLoadAssignments. Each CLA has `eps` endpoints with a unique Pod IP (`10.128.0.0/9`), spread over 3
//! zones and 1,000 nodes (one `LocalityLbEndpoints` per zone and node), each with the `mesh.pod` metadata the
//! translator writes. 1 in 10 endpoints is terminating (DRAINING).

#![allow(dead_code)]

use std::net::Ipv4Addr;

use mesh_proxy::table::Table;
use xds_proto::cluster::Cluster as XdsCluster;
use xds_proto::cluster::cluster::{self, LbPolicy};
use xds_proto::codec::{encode, pack_any};
use xds_proto::core::{Address, HealthStatus, Locality, SocketAddress, address, socket_address};
use xds_proto::endpoint::{ClusterLoadAssignment, LbEndpoint, LocalityLbEndpoints, lb_endpoint};
use xds_proto::listener::{Filter, FilterChain, Listener as XdsListener, filter};
use xds_proto::meta::{self, MetaValue};
use xds_proto::types::ResourceType;

/// The two ports of every Service: (name, port, targetPort).
pub const PORTS: [(&str, u16, u16); 2] = [("http", 80, 8080), ("grpc", 9090, 9090)];

pub fn namespace(svc: usize) -> String {
    format!("ns-{:02}", svc % 50)
}

pub fn service_name(svc: usize) -> String {
    format!("svc-{svc:05}")
}

/// `{ns}/{name}/{port}`: the Cluster and CLA name.
pub fn cluster_name(svc: usize, port: &str) -> String {
    format!("{}/{}/{port}", namespace(svc), service_name(svc))
}

pub fn cluster_ip(svc: usize) -> Ipv4Addr {
    let n = 10 + svc as u32; // 10.96.0.10 upwards
    Ipv4Addr::new(10, 96, (n >> 8) as u8, n as u8)
}

/// The `i`-th endpoint of a Service (same Pod IP for both ports, as in Kubernetes).
pub fn pod_ip(svc: usize, eps: usize, i: usize) -> Ipv4Addr {
    let n = (svc * eps + i) as u32 + 1;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + n)
}

fn sock(ip: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.into(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

pub fn listener(svc: usize, port: usize) -> (String, Vec<u8>) {
    let (pname, p, _) = PORTS[port];
    let ip = cluster_ip(svc).to_string();
    let name = format!("svc/{}/{}/{pname}@{ip}", namespace(svc), service_name(svc));
    let cluster = cluster_name(svc, pname);
    let tcp = xds_proto::tcp_proxy::TcpProxy {
        stat_prefix: cluster.clone(),
        cluster_specifier: Some(xds_proto::tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster(cluster)),
        ..Default::default()
    };
    let body = encode(&XdsListener {
        name: name.clone(),
        address: Some(sock(&ip, p)),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.tcp_proxy".into(),
                config_type: Some(filter::ConfigType::TypedConfig(pack_any(&tcp))),
            }],
            ..Default::default()
        }],
        metadata: meta::build([
            (meta::SERVICE, MetaValue::from(format!("{}/{}", namespace(svc), service_name(svc)))),
            (meta::ADDRESS_KIND, meta::KIND_CLUSTER_IP.into()),
            (meta::TRAFFIC_POLICY, "Cluster".into()),
            (meta::PROTOCOL, "TCP".into()),
        ]),
        ..Default::default()
    });
    (name, body)
}

pub fn cluster(svc: usize, port: usize) -> (String, Vec<u8>) {
    let name = cluster_name(svc, PORTS[port].0);
    let body = encode(&XdsCluster {
        name: name.clone(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32)),
        lb_policy: LbPolicy::LeastRequest as i32,
        metadata: meta::build([
            (meta::SERVICE, MetaValue::from(format!("{}/{}", namespace(svc), service_name(svc)))),
            (meta::PROTOCOL, "TCP".into()),
            (meta::INTERNAL_TRAFFIC_POLICY, "Cluster".into()),
            (meta::EXTERNAL_TRAFFIC_POLICY, "Cluster".into()),
        ]),
        ..Default::default()
    });
    (name, body)
}

/// The CLA of one Service port. `flip`: endpoint 0 is terminating instead of ready (the one-endpoint change).
pub fn cla(svc: usize, port: usize, eps: usize, flip: bool) -> (String, Vec<u8>) {
    let (pname, _, target) = PORTS[port];
    let name = cluster_name(svc, pname);
    let mut localities: std::collections::BTreeMap<(String, String), Vec<LbEndpoint>> = Default::default();
    for i in 0..eps {
        let zone = format!("zone-{}", (svc + i) % 3);
        let node = format!("node-{:04}", (svc * 7 + i) % 1000);
        let terminating = (i % 10 == 9) ^ (flip && i == 0);
        let lb = LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(xds_proto::endpoint::Endpoint {
                address: Some(sock(&pod_ip(svc, eps, i).to_string(), target)),
                ..Default::default()
            })),
            health_status: if terminating { HealthStatus::Draining } else { HealthStatus::Healthy } as i32,
            metadata: meta::build([(
                meta::POD,
                MetaValue::from(format!("{}/{}-{i:03}", namespace(svc), service_name(svc))),
            )]),
            ..Default::default()
        };
        localities.entry((zone, node)).or_default().push(lb);
    }
    let body = encode(&ClusterLoadAssignment {
        cluster_name: name.clone(),
        endpoints: localities
            .into_iter()
            .map(|((zone, node), lb_endpoints)| LocalityLbEndpoints {
                locality: Some(Locality { zone, sub_zone: node, ..Default::default() }),
                lb_endpoints,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    });
    (name, body)
}

/// Applies one type's resources to `t` (all of them changed), as one xDS update would.
pub fn apply_all(t: &Table, kind: ResourceType, items: Vec<(String, Vec<u8>)>) -> Table {
    let map: std::collections::HashMap<String, Vec<u8>> = items.into_iter().collect();
    let names: Vec<String> = map.keys().cloned().collect();
    t.apply(kind, |n| map.get(n).map(|b| &b[..]), &names, &[], "v1").expect("generated resources are valid")
}

/// The table of `services` Services × 2 ports × `eps` endpoints, built in batches of `batch` Services (each
/// batch one `Table::apply` per type, Cluster then CLA then Listener), so the encoded inputs of only one batch
/// are alive at a time.
pub fn build_table(services: usize, eps: usize, batch: usize) -> Table {
    let mut t = Table::default();
    let mut start = 0;
    while start < services {
        let end = (start + batch).min(services);
        let range = || (start..end).flat_map(|s| (0..PORTS.len()).map(move |p| (s, p)));
        t = apply_all(&t, ResourceType::Cluster, range().map(|(s, p)| cluster(s, p)).collect());
        t = apply_all(&t, ResourceType::ClusterLoadAssignment, range().map(|(s, p)| cla(s, p, eps, false)).collect());
        t = apply_all(&t, ResourceType::Listener, range().map(|(s, p)| listener(s, p)).collect());
        start = end;
    }
    t
}

//! Tests of the translation: each Kubernetes rule, each bad-input case, determinism and incremental = full.

use std::collections::BTreeMap;

use prost::Message;
use serde_json::{Value, json};
use xds_proto::cluster::{Cluster, cluster::LbPolicy};
use xds_proto::core::HealthStatus;
use xds_proto::endpoint::{ClusterLoadAssignment, lb_endpoint};
use xds_proto::listener::{Listener, filter};
use xds_proto::meta;
use xds_proto::route::{RouteConfiguration, route, route_match};
use xds_proto::tcp_proxy::TcpProxy;
use xds_proto::types::ResourceType;

use super::*;
use crate::model::{Kind, Object, ObjectRef, Parsed};
use crate::store::Store;

fn obj(v: Value) -> Object {
    match Object::parse(v).expect("valid object") {
        Parsed::Object(o) => o,
        other => panic!("not an object: {other:?}"),
    }
}

fn store(objs: Vec<Value>) -> Store {
    let mut s = Store::new();
    for o in objs {
        s.apply(obj(o));
    }
    s
}

fn snap(objs: Vec<Value>) -> Snapshot {
    translate(&store(objs), &Options::default())
}

fn svc(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "ns"}, "spec": spec})
}

fn slice(name: &str, service: &str, ports: Value, endpoints: Value) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "ns", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "ports": ports, "endpoints": endpoints})
}

fn ep(ip: &str) -> Value {
    json!({"addresses": [ip], "conditions": {"ready": true}})
}

fn decode<M: Message + Default>(s: &RoleSnapshot, t: ResourceType, name: &str) -> M {
    let r =
        s.get(t).get(name).unwrap_or_else(|| panic!("no {t} {name}; have {:?}", s.get(t).keys().collect::<Vec<_>>()));
    M::decode(&r.body[..]).unwrap()
}

fn names(s: &RoleSnapshot, t: ResourceType) -> Vec<String> {
    s.get(t).keys().cloned().collect()
}

fn problems(s: &Snapshot) -> Vec<String> {
    s.problems.iter().map(ToString::to_string).collect()
}

fn has_problem(s: &Snapshot, needle: &str) -> bool {
    s.problems.iter().any(|p| p.to_string().contains(needle))
}

fn tcp_cluster(l: &Listener) -> String {
    let f = &l.filter_chains[0].filters[0];
    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else { panic!("no typed config") };
    let t = TcpProxy::decode(&any.value[..]).unwrap();
    match t.cluster_specifier {
        Some(xds_proto::tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster(c)) => c,
        other => panic!("{other:?}"),
    }
}

/// (ip:port, health) of every endpoint of a CLA, sorted.
fn endpoints(cla: &ClusterLoadAssignment) -> Vec<(String, HealthStatus)> {
    let mut v: Vec<_> = cla
        .endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .map(|e| {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else { panic!() };
            let Some(xds_proto::core::address::Address::SocketAddress(sa)) =
                ep.address.as_ref().unwrap().address.as_ref()
            else {
                panic!()
            };
            let Some(xds_proto::core::socket_address::PortSpecifier::PortValue(p)) = sa.port_specifier else {
                panic!()
            };
            (format!("{}:{p}", sa.address), HealthStatus::try_from(e.health_status).unwrap())
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn web() -> Vec<Value> {
    vec![
        svc(
            "web",
            json!({"clusterIPs": ["10.96.0.10", "fd00::10"], "ipFamilies": ["IPv4", "IPv6"],
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}, {"name": "metrics", "port": 9090, "targetPort": 9090}]}),
        ),
        slice(
            "web-1",
            "web",
            json!([{"name": "http", "port": 8080}, {"name": "metrics", "port": 9090}]),
            json!([ep("10.0.0.1"), ep("10.0.0.2")]),
        ),
        // The second slice's Pods serve "http" on another port: targetPort by name is resolved per slice.
        slice("web-2", "web", json!([{"name": "http", "port": 8081}]), json!([ep("10.0.0.3")])),
    ]
}

// ---------------------------------------------------------------- Services

#[test]
fn cluster_ip_listeners_for_each_family_and_port() {
    let s = snap(web());
    assert_eq!(
        names(&s.proxy, ResourceType::Listener),
        [
            "svc/ns/web/http@10.96.0.10",
            "svc/ns/web/http@fd00::10",
            "svc/ns/web/metrics@10.96.0.10",
            "svc/ns/web/metrics@fd00::10"
        ]
    );
    let l: Listener = decode(&s.proxy, ResourceType::Listener, "svc/ns/web/http@fd00::10");
    assert_eq!(tcp_cluster(&l), "ns/web/http");
    assert_eq!(meta::get_str(l.metadata.as_ref(), meta::ADDRESS_KIND), Some(meta::KIND_CLUSTER_IP));
    assert_eq!(meta::get_num(l.metadata.as_ref(), meta::PORT), Some(80.0));
    assert_eq!(meta::get_str(l.metadata.as_ref(), meta::TRAFFIC_POLICY), Some("Cluster"));
    assert_eq!(names(&s.proxy, ResourceType::Cluster), ["ns/web/http", "ns/web/metrics"]);
    let c: Cluster = decode(&s.proxy, ResourceType::Cluster, "ns/web/http");
    assert_eq!(c.lb_policy, LbPolicy::LeastRequest as i32);
    assert!(problems(&s).is_empty(), "{:?}", problems(&s));
}

#[test]
fn target_port_by_name_is_resolved_per_slice() {
    let s = snap(web());
    let http: ClusterLoadAssignment = decode(&s.proxy, ResourceType::ClusterLoadAssignment, "ns/web/http");
    let eps: Vec<String> = endpoints(&http).into_iter().map(|e| e.0).collect();
    assert_eq!(eps, ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8081"]);
    // The second slice has no "metrics" port: its Pod is not an endpoint of that port.
    let metrics: ClusterLoadAssignment = decode(&s.proxy, ResourceType::ClusterLoadAssignment, "ns/web/metrics");
    assert_eq!(endpoints(&metrics).len(), 2);
}

#[test]
fn unnamed_port_is_keyed_by_number() {
    let s = snap(vec![
        svc("one", json!({"clusterIP": "10.96.0.1", "ports": [{"port": 80, "targetPort": 8080}]})),
        slice("one-1", "one", json!([{"port": 8080}]), json!([ep("10.0.0.1")])),
    ]);
    assert_eq!(names(&s.proxy, ResourceType::Listener), ["svc/ns/one/80@10.96.0.1"]);
    let cla: ClusterLoadAssignment = decode(&s.proxy, ResourceType::ClusterLoadAssignment, "ns/one/80");
    assert_eq!(endpoints(&cla)[0].0, "10.0.0.1:8080");
}

#[test]
fn node_port_and_load_balancer_listeners() {
    let s = snap(vec![json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "lb", "namespace": "ns"},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.5", "externalTrafficPolicy": "Local",
            "healthCheckNodePort": 32000, "externalIPs": ["192.0.2.7"],
            "ports": [{"name": "http", "port": 80, "nodePort": 30080}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}, {"ip": "198.51.100.2", "ipMode": "Proxy"},
            {"hostname": "lb.example.com"}]}}})]);
    assert_eq!(
        names(&s.proxy, ResourceType::Listener),
        [
            "svc/ns/lb/http@10.96.0.5",
            "svc/ns/lb/http@192.0.2.7",
            "svc/ns/lb/http@198.51.100.1",
            "svc/ns/lb/http@nodeport"
        ]
    );
    let np: Listener = decode(&s.proxy, ResourceType::Listener, "svc/ns/lb/http@nodeport");
    let Some(xds_proto::core::address::Address::SocketAddress(sa)) = np.address.unwrap().address else { panic!() };
    assert_eq!(
        (sa.address.as_str(), sa.port_specifier),
        ("0.0.0.0", Some(xds_proto::core::socket_address::PortSpecifier::PortValue(30080)))
    );
    assert!(np.additional_addresses.is_empty(), "IPv4-only Service: no [::] listener");
    let md = np.metadata.as_ref();
    assert_eq!(meta::get_str(md, meta::ADDRESS_KIND), Some(meta::KIND_NODE_PORT));
    assert_eq!(meta::get_str(md, meta::TRAFFIC_POLICY), Some("Local"));
    assert_eq!(meta::get_num(md, meta::HEALTH_CHECK_NODE_PORT), Some(32000.0));
    let lb: Listener = decode(&s.proxy, ResourceType::Listener, "svc/ns/lb/http@198.51.100.1");
    assert_eq!(meta::get_str(lb.metadata.as_ref(), meta::ADDRESS_KIND), Some(meta::KIND_LOAD_BALANCER));
    let ext: Listener = decode(&s.proxy, ResourceType::Listener, "svc/ns/lb/http@192.0.2.7");
    assert_eq!(meta::get_str(ext.metadata.as_ref(), meta::ADDRESS_KIND), Some(meta::KIND_EXTERNAL_IP));
    // The ClusterIP follows internalTrafficPolicy (default Cluster), not the external one.
    let cip: Listener = decode(&s.proxy, ResourceType::Listener, "svc/ns/lb/http@10.96.0.5");
    assert_eq!(meta::get_str(cip.metadata.as_ref(), meta::TRAFFIC_POLICY), Some("Cluster"));
    assert_eq!(meta::get_num(cip.metadata.as_ref(), meta::HEALTH_CHECK_NODE_PORT), None);
}

#[test]
fn dual_stack_node_port_listens_on_both_families() {
    let s = snap(vec![svc(
        "np",
        json!({"type": "NodePort", "clusterIPs": ["10.96.0.6", "fd00::6"],
        "ipFamilies": ["IPv4", "IPv6"], "ports": [{"port": 53, "protocol": "UDP", "nodePort": 30053}]}),
    )]);
    let np: Listener = decode(&s.proxy, ResourceType::Listener, "svc/ns/np/53@nodeport");
    assert_eq!(np.additional_addresses.len(), 1);
    assert!(np.udp_listener_config.is_some());
}

#[test]
fn external_name_headless_and_foreign_services_get_no_listeners() {
    let s = snap(vec![
        svc("ext", json!({"type": "ExternalName", "externalName": "example.com", "ports": [{"port": 80}]})),
        svc("headless", json!({"clusterIP": "None", "ports": [{"port": 80}]})),
        slice("headless-1", "headless", json!([{"port": 80}]), json!([ep("10.0.0.9")])),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "foreign", "namespace": "ns",
            "labels": {"service.kubernetes.io/service-proxy-name": "other"}},
            "spec": {"clusterIP": "10.96.0.7", "ports": [{"port": 80}]}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "hl", "namespace": "ns",
            "labels": {"service.kubernetes.io/headless": ""}},
            "spec": {"clusterIP": "10.96.0.8", "ports": [{"port": 80}]}}),
    ]);
    assert!(s.proxy.is_empty(), "{:?}", s.proxy);
    assert!(problems(&s).is_empty(), "{:?}", problems(&s));
}

#[test]
fn protocols_udp_served_sctp_reported() {
    let s = snap(vec![svc(
        "dns",
        json!({"clusterIP": "10.96.0.53", "ports": [
        {"name": "dns", "port": 53, "protocol": "UDP"},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
        {"name": "sig", "port": 2905, "protocol": "SCTP"}]}),
    )]);
    assert_eq!(names(&s.proxy, ResourceType::Listener), ["svc/ns/dns/dns-tcp@10.96.0.53", "svc/ns/dns/dns@10.96.0.53"]);
    let udp: Listener = decode(&s.proxy, ResourceType::Listener, "svc/ns/dns/dns@10.96.0.53");
    assert!(udp.udp_listener_config.is_some());
    assert_eq!(udp.listener_filters[0].name, "envoy.filters.udp_listener.udp_proxy");
    assert!(udp.filter_chains.is_empty());
    let c: Cluster = decode(&s.proxy, ResourceType::Cluster, "ns/dns/dns");
    assert_eq!(meta::get_str(c.metadata.as_ref(), meta::PROTOCOL), Some("UDP"));
    assert!(has_problem(&s, "Service ns/dns: port sig: protocol SCTP is not supported"), "{:?}", problems(&s));
}

#[test]
fn session_affinity_client_ip() {
    for (cfg, want) in [(json!(null), 10_800.0), (json!({"clientIP": {"timeoutSeconds": 60}}), 60.0)] {
        let s = snap(vec![svc(
            "a",
            json!({"clusterIP": "10.96.0.2", "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": cfg, "ports": [{"port": 80}]}),
        )]);
        let c: Cluster = decode(&s.proxy, ResourceType::Cluster, "ns/a/80");
        assert_eq!(c.lb_policy, LbPolicy::RingHash as i32);
        assert_eq!(meta::get_num(c.metadata.as_ref(), meta::AFFINITY_TIMEOUT_SECONDS), Some(want));
        let l: Listener = decode(&s.proxy, ResourceType::Listener, "svc/ns/a/80@10.96.0.2");
        let Some(filter::ConfigType::TypedConfig(any)) = &l.filter_chains[0].filters[0].config_type else { panic!() };
        assert_eq!(TcpProxy::decode(&any.value[..]).unwrap().hash_policy.len(), 1);
    }
    let s = snap(vec![svc("b", json!({"clusterIP": "10.96.0.3", "sessionAffinity": "None", "ports": [{"port": 80}]}))]);
    let c: Cluster = decode(&s.proxy, ResourceType::Cluster, "ns/b/80");
    assert_eq!(meta::get_num(c.metadata.as_ref(), meta::AFFINITY_TIMEOUT_SECONDS), None);
}

#[test]
fn traffic_policies_distribution_and_hints() {
    let s = snap(vec![
        svc(
            "t",
            json!({"clusterIP": "10.96.0.4", "internalTrafficPolicy": "Local", "trafficDistribution": "PreferClose",
            "ports": [{"port": 80}]}),
        ),
        slice(
            "t-1",
            "t",
            json!([{"port": 80}]),
            json!([{"addresses": ["10.0.0.1"], "nodeName": "n1", "zone": "z1",
            "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "n1"}]},
            "targetRef": {"kind": "Pod", "name": "t-abc", "namespace": "ns"}}]),
        ),
    ]);
    let c: Cluster = decode(&s.proxy, ResourceType::Cluster, "ns/t/80");
    assert_eq!(meta::get_str(c.metadata.as_ref(), meta::INTERNAL_TRAFFIC_POLICY), Some("Local"));
    assert_eq!(meta::get_str(c.metadata.as_ref(), meta::EXTERNAL_TRAFFIC_POLICY), Some("Cluster"));
    assert_eq!(meta::get_str(c.metadata.as_ref(), meta::TRAFFIC_DISTRIBUTION), Some("PreferClose"));
    let l: Listener = decode(&s.proxy, ResourceType::Listener, "svc/ns/t/80@10.96.0.4");
    assert_eq!(meta::get_str(l.metadata.as_ref(), meta::TRAFFIC_POLICY), Some("Local"));
    let cla: ClusterLoadAssignment = decode(&s.proxy, ResourceType::ClusterLoadAssignment, "ns/t/80");
    let loc = &cla.endpoints[0];
    let locality = loc.locality.as_ref().unwrap();
    assert_eq!((locality.zone.as_str(), locality.sub_zone.as_str()), ("z1", "n1"));
    let md = loc.lb_endpoints[0].metadata.as_ref();
    assert_eq!(meta::get_list(md, meta::FOR_ZONES), ["z1"]);
    assert_eq!(meta::get_list(md, meta::FOR_NODES), ["n1"]);
    assert_eq!(meta::get_str(md, meta::POD), Some("ns/t-abc"));
}

#[test]
fn endpoint_conditions_map_to_health() {
    // (ready, serving, terminating) → health, with the API's nil defaults (ready/serving nil = true).
    let table = [
        (json!({}), HealthStatus::Healthy),
        (json!({"ready": true}), HealthStatus::Healthy),
        (json!({"ready": false}), HealthStatus::Unhealthy),
        (json!({"ready": false, "serving": true, "terminating": true}), HealthStatus::Draining),
        (json!({"ready": false, "terminating": true}), HealthStatus::Draining),
        (json!({"ready": false, "serving": false, "terminating": true}), HealthStatus::Unhealthy),
        (json!({"ready": false, "serving": true, "terminating": false}), HealthStatus::Unhealthy),
    ];
    for (cond, want) in table {
        let s = snap(vec![
            svc("h", json!({"clusterIP": "10.96.0.4", "ports": [{"port": 80}]})),
            slice("h-1", "h", json!([{"port": 80}]), json!([{"addresses": ["10.0.0.1"], "conditions": cond}])),
        ]);
        let cla: ClusterLoadAssignment = decode(&s.proxy, ResourceType::ClusterLoadAssignment, "ns/h/80");
        assert_eq!(endpoints(&cla), [("10.0.0.1:80".to_owned(), want)], "conditions {cond}");
    }
}

#[test]
fn slices_merge_duplicates_collapse_fqdn_and_bad_addresses_skipped() {
    let mut fqdn = slice("d-3", "d", json!([{"port": 80}]), json!([ep("db.example.com")]));
    fqdn["addressType"] = json!("FQDN");
    let mut weird = slice("d-5", "d", json!([{"port": 80}]), json!([ep("10.0.0.5")]));
    weird["addressType"] = json!("IPv5");
    let s = snap(vec![
        svc("d", json!({"clusterIP": "10.96.0.4", "ports": [{"port": 80}]})),
        slice(
            "d-1",
            "d",
            json!([{"port": 80}]),
            json!([{"addresses": ["10.0.0.1"], "conditions": {"ready": false}}, ep("bogus")]),
        ),
        slice("d-2", "d", json!([{"port": 80}]), json!([ep("10.0.0.1"), ep("10.0.0.2"), ep("fd00::1")])),
        fqdn,
        weird,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n9", "labels": {"topology.kubernetes.io/zone": "z9"}}}),
        slice("d-4", "d", json!([{"port": 80}]), json!([{"addresses": ["10.0.0.4"], "nodeName": "n9"}])),
    ]);
    let cla: ClusterLoadAssignment = decode(&s.proxy, ResourceType::ClusterLoadAssignment, "ns/d/80");
    assert_eq!(
        endpoints(&cla),
        [
            ("10.0.0.1:80".to_owned(), HealthStatus::Healthy),
            ("10.0.0.2:80".to_owned(), HealthStatus::Healthy),
            ("10.0.0.4:80".to_owned(), HealthStatus::Healthy),
        ]
    );
    // The zone of an endpoint without one comes from its Node's label.
    let z9 = cla.endpoints.iter().find(|l| l.locality.as_ref().unwrap().sub_zone == "n9").unwrap();
    assert_eq!(z9.locality.as_ref().unwrap().zone, "z9");
    assert!(has_problem(&s, "EndpointSlice ns/d-1: endpoint address \"bogus\" is not an IPv4 address"));
    assert!(has_problem(&s, "EndpointSlice ns/d-2: endpoint address \"fd00::1\" is not an IPv4 address"));
    assert!(has_problem(&s, "EndpointSlice ns/d-5: addressType \"IPv5\" is not IPv4, IPv6 or FQDN"));
    assert!(!has_problem(&s, "ns/d-3"), "FQDN slices are skipped quietly: {:?}", problems(&s));
}

#[test]
fn bad_services_are_reported_and_the_rest_translates() {
    let s = snap(vec![
        svc("noip", json!({"ports": [{"port": 80}]})),
        svc("badip", json!({"clusterIP": "10.96.0.300", "ports": [{"port": 80}]})),
        svc("badport", json!({"clusterIP": "10.96.0.9", "ports": [{"port": 70000}, {"name": "ok", "port": 81}]})),
        svc("dup", json!({"clusterIP": "10.96.0.10", "ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]})),
        svc("weird", json!({"type": "Magic", "clusterIP": "10.96.0.11", "ports": [{"port": 80}]})),
        svc("nonp", json!({"type": "NodePort", "clusterIP": "10.96.0.12", "ports": [{"port": 80}]})),
        svc("good", json!({"clusterIP": "10.96.0.13", "ports": [{"port": 80}]})),
        svc(
            "policy",
            json!({"clusterIP": "10.96.0.14", "internalTrafficPolicy": "Sometimes", "ports": [{"port": 80}]}),
        ),
    ]);
    let l: Listener = decode(&s.proxy, ResourceType::Listener, "svc/ns/policy/80@10.96.0.14");
    assert_eq!(meta::get_str(l.metadata.as_ref(), meta::TRAFFIC_POLICY), Some("Cluster"));
    for want in [
        "Service ns/noip: spec.clusterIP is not set",
        "Service ns/badip: spec.clusterIPs entry \"10.96.0.300\" is not an IP address",
        "Service ns/badport: port 0: port 70000 is out of range",
        "Service ns/dup: port a is defined twice",
        "Service ns/weird: unknown spec.type \"Magic\"",
        "Service ns/nonp: port 80: type NodePort without a valid nodePort",
        "Service ns/policy: spec.internalTrafficPolicy \"Sometimes\" is not Cluster or Local; Cluster is used",
    ] {
        assert!(has_problem(&s, want), "missing {want:?} in {:?}", problems(&s));
    }
    let ls = names(&s.proxy, ResourceType::Listener);
    for want in [
        "svc/ns/good/80@10.96.0.13",
        "svc/ns/badport/ok@10.96.0.9",
        "svc/ns/dup/a@10.96.0.10",
        "svc/ns/nonp/80@10.96.0.12",
    ] {
        assert!(ls.contains(&want.to_owned()), "{want} missing from {ls:?}");
    }
}

#[test]
fn conflicting_listeners_oldest_service_wins_and_loser_takes_over_when_it_goes() {
    let old = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "old", "namespace": "ns",
        "creationTimestamp": "2024-01-01T00:00:00Z"}, "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}});
    let new = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "aaa-new", "namespace": "ns",
        "creationTimestamp": "2025-01-01T00:00:00Z"}, "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}});
    let mut st = store(vec![old, new]);
    let mut t = Translator::new(Options::default());
    let s = t.full(&st).clone();
    assert_eq!(names(&s.proxy, ResourceType::Listener), ["svc/ns/old/80@10.96.0.1"]);
    assert!(
        has_problem(&s, "Service ns/aaa-new: 10.96.0.1:80/TCP is already served for Service ns/old"),
        "{:?}",
        problems(&s)
    );
    let ch = st.delete(&ObjectRef::new(Kind::Service, "ns", "old"));
    let s = t.update(&st, &ch).clone();
    assert_eq!(names(&s.proxy, ResourceType::Listener), ["svc/ns/aaa-new/80@10.96.0.1"]);
    assert!(problems(&s).is_empty(), "{:?}", problems(&s));
    assert_eq!(s, translate(&st, &Options::default()));
}

// ---------------------------------------------------------------- Ingress

fn class(name: &str, controller: &str, default: bool) -> Value {
    let mut v = json!({"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass", "metadata": {"name": name},
        "spec": {"controller": controller}});
    if default {
        v["metadata"]["annotations"] = json!({"ingressclass.kubernetes.io/is-default-class": "true"});
    }
    v
}

fn mesh_class() -> Value {
    class("mesh", xds_proto::INGRESS_CONTROLLER, false)
}

fn ingress(name: &str, created: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": name, "namespace": "ns", "creationTimestamp": created}, "spec": spec})
}

fn backend(service: &str, port: Value) -> Value {
    let port = if port.is_string() { json!({"name": port}) } else { json!({"number": port}) };
    json!({"service": {"name": service, "port": port}})
}

fn path(p: &str, ty: &str, service: &str, port: Value) -> Value {
    json!({"path": p, "pathType": ty, "backend": backend(service, port)})
}

fn rule(host: Option<&str>, paths: Vec<Value>) -> Value {
    match host {
        Some(h) => json!({"host": h, "http": {"paths": paths}}),
        None => json!({"http": {"paths": paths}}),
    }
}

/// Services a, b, c (ports http=80 and admin=8080) for ingress tests.
fn backends() -> Vec<Value> {
    ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, n)| {
            svc(
                n,
                json!({"clusterIP": format!("10.96.1.{}", i + 1),
                "ports": [{"name": "http", "port": 80}, {"name": "admin", "port": 8080}]}),
            )
        })
        .collect()
}

fn with(mut base: Vec<Value>, more: Vec<Value>) -> Vec<Value> {
    base.extend(more);
    base
}

/// A route table flattened: host → [(match, target)], target a cluster name, "503", "404" or "redirect".
fn table(rc: &RouteConfiguration) -> BTreeMap<String, Vec<(String, String)>> {
    rc.virtual_hosts
        .iter()
        .map(|vh| {
            let routes = vh
                .routes
                .iter()
                .map(|r| {
                    let m = match r.r#match.as_ref().unwrap().path_specifier.as_ref().unwrap() {
                        route_match::PathSpecifier::Path(p) => format!("={p}"),
                        route_match::PathSpecifier::PathSeparatedPrefix(p) => format!("{p}/*"),
                        route_match::PathSpecifier::Prefix(p) => format!("{p}*"),
                        other => format!("{other:?}"),
                    };
                    let t = match r.action.as_ref().unwrap() {
                        route::Action::Route(a) => match a.cluster_specifier.as_ref().unwrap() {
                            xds_proto::route::route_action::ClusterSpecifier::Cluster(c) => c.clone(),
                            other => format!("{other:?}"),
                        },
                        route::Action::DirectResponse(d) => d.status.to_string(),
                        route::Action::Redirect(_) => "redirect".into(),
                        other => format!("{other:?}"),
                    };
                    (m, t)
                })
                .collect();
            (vh.domains.join(","), routes)
        })
        .collect()
}

fn routes_of(s: &Snapshot, class: &str, name: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let role = s.ingress.get(class).unwrap_or_else(|| panic!("no class {class}"));
    table(&decode(role, ResourceType::RouteConfiguration, name))
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

#[test]
fn class_selection_name_annotation_default_and_foreign() {
    let spec = |host: &str| json!({"rules": [rule(Some(host), vec![path("/", "Prefix", "a", json!("http"))])]});
    let mut by_name = ingress("by-name", "2024-01-01T00:00:00Z", spec("one.example.com"));
    by_name["spec"]["ingressClassName"] = json!("mesh");
    let mut by_annotation = ingress("by-annotation", "2024-01-01T00:00:00Z", spec("two.example.com"));
    by_annotation["metadata"]["annotations"] = json!({"kubernetes.io/ingress.class": "mesh"});
    let by_default = ingress("by-default", "2024-01-01T00:00:00Z", spec("three.example.com"));
    let mut foreign = ingress("foreign", "2024-01-01T00:00:00Z", spec("four.example.com"));
    foreign["spec"]["ingressClassName"] = json!("nginx");
    let objs = with(
        backends(),
        vec![
            class("mesh", xds_proto::INGRESS_CONTROLLER, true),
            class("nginx", "k8s.io/ingress-nginx", false),
            by_name,
            by_annotation,
            by_default,
            foreign,
        ],
    );
    let s = snap(objs.clone());
    assert_eq!(s.ingress.keys().collect::<Vec<_>>(), ["mesh"], "only our classes get a route table");
    let hosts: Vec<String> = routes_of(&s, "mesh", "ingress/http").into_keys().collect();
    assert_eq!(hosts, ["*", "one.example.com", "three.example.com", "two.example.com"]);

    // Without a default class the class-less Ingress is nobody's.
    let objs: Vec<Value> = objs
        .into_iter()
        .map(|mut o| {
            if o["metadata"]["name"] == "mesh" {
                o["metadata"]["annotations"] = json!({});
            }
            o
        })
        .collect();
    let hosts: Vec<String> = routes_of(&snap(objs), "mesh", "ingress/http").into_keys().collect();
    assert_eq!(hosts, ["*", "one.example.com", "two.example.com"]);

    // Naming our default class name when it does not exist is reported.
    let mut lost = ingress("lost", "2024-01-01T00:00:00Z", spec("x.example.com"));
    lost["spec"]["ingressClassName"] = json!("mesh");
    let s = snap(vec![lost]);
    assert!(s.ingress.is_empty());
    assert!(has_problem(&s, "Ingress ns/lost: IngressClass \"mesh\" does not exist"), "{:?}", problems(&s));
}

#[test]
fn hosts_paths_precedence_default_backend_and_404() {
    let objs = with(
        backends(),
        vec![
            mesh_class(),
            ingress(
                "shop",
                "2024-01-01T00:00:00Z",
                json!({
                "ingressClassName": "mesh",
                "defaultBackend": backend("c", json!(80)),
                "rules": [
                    rule(Some("Foo.Example.com"), vec![
                        path("/", "Prefix", "a", json!("http")),
                        path("/api/", "Prefix", "b", json!("http")),
                        path("/api/v2", "Prefix", "b", json!(8080)),
                        path("/healthz", "Exact", "a", json!(8080)),
                        path("/docs", "ImplementationSpecific", "c", json!("admin")),
                    ]),
                    rule(Some("*.example.com"), vec![path("/", "Prefix", "b", json!("http"))]),
                    rule(None, vec![path("/status", "Exact", "c", json!("http"))]),
                ]}),
            ),
        ],
    );
    let s = snap(objs);
    assert!(problems(&s).is_empty(), "{:?}", problems(&s));
    let t = routes_of(&s, "mesh", "ingress/http");
    assert_eq!(
        t["foo.example.com"],
        pairs(&[
            ("=/healthz", "ns/a/admin"),
            ("/api/v2/*", "ns/b/admin"),
            // "/api/" and "/docs" are as long as written: the path decides.
            ("/api/*", "ns/b/http"),
            ("/docs/*", "ns/c/admin"),
            ("/*", "ns/a/http"),
        ])
    );
    // A wildcard host, then the default backend as the catch-all.
    assert_eq!(t["*.example.com"], pairs(&[("/*", "ns/b/http")]));
    assert_eq!(t["*"], pairs(&[("=/status", "ns/c/http"), ("/*", "ns/c/http")]));
    let rc: RouteConfiguration = decode(&s.ingress["mesh"], ResourceType::RouteConfiguration, "ingress/http");
    let wild = rc.virtual_hosts.iter().find(|v| v.name == "*.example.com").unwrap();
    assert_eq!(meta::get_bool(wild.metadata.as_ref(), meta::WILDCARD_ONE_LABEL), Some(true));
    // The ingress role gets exactly the Clusters its routes use, with their endpoints.
    assert_eq!(
        names(&s.ingress["mesh"], ResourceType::Cluster),
        ["ns/a/admin", "ns/a/http", "ns/b/admin", "ns/b/http", "ns/c/admin", "ns/c/http"]
    );
    assert_eq!(names(&s.ingress["mesh"], ResourceType::ClusterLoadAssignment).len(), 6);
    assert!(s.ingress["mesh"].get(ResourceType::Listener).contains_key("ingress/http"));
    assert!(!s.ingress["mesh"].get(ResourceType::Listener).contains_key("ingress/https"), "no TLS, no https listener");

    // No default backend: 404.
    let s = snap(with(
        backends(),
        vec![
            mesh_class(),
            ingress(
                "x",
                "2024-01-01T00:00:00Z",
                json!({
        "ingressClassName": "mesh", "rules": [rule(Some("foo.example.com"), vec![path("/a", "Prefix", "a", json!("http"))])]}),
            ),
        ],
    ));
    let t = routes_of(&s, "mesh", "ingress/http");
    assert_eq!(t["foo.example.com"], pairs(&[("/a/*", "ns/a/http"), ("/*", "404")]));
    assert_eq!(t["*"], pairs(&[("/*", "404")]));
}

#[test]
fn conflicts_between_ingresses_oldest_wins() {
    let objs = with(
        backends(),
        vec![
            mesh_class(),
            ingress(
                "newer",
                "2025-01-01T00:00:00Z",
                json!({"ingressClassName": "mesh", "defaultBackend": backend("b", json!(80)),
            "rules": [rule(Some("x.example.com"), vec![path("/p/", "Prefix", "b", json!("http")), path("/q", "Exact", "b", json!("http"))])]}),
            ),
            ingress(
                "older",
                "2024-01-01T00:00:00Z",
                json!({"ingressClassName": "mesh", "defaultBackend": backend("a", json!(80)),
            "rules": [rule(Some("x.example.com"), vec![path("/p/", "Prefix", "a", json!("http"))])]}),
            ),
        ],
    );
    let s = snap(objs);
    let t = routes_of(&s, "mesh", "ingress/http");
    assert_eq!(t["x.example.com"], pairs(&[("=/q", "ns/b/http"), ("/p/*", "ns/a/http"), ("/*", "ns/a/http")]));
    assert!(
        has_problem(
            &s,
            "Ingress ns/newer: rules[0].paths[0]: host x.example.com path /p/ is already routed by Ingress ns/older"
        ),
        "{:?}",
        problems(&s)
    );
    assert!(
        has_problem(&s, "Ingress ns/newer: defaultBackend ignored: Ingress ns/older (older)"),
        "{:?}",
        problems(&s)
    );
}

#[test]
fn missing_backends_answer_503_and_are_reported() {
    let objs = with(
        backends(),
        vec![
            mesh_class(),
            svc("ext", json!({"type": "ExternalName", "externalName": "example.com"})),
            ingress(
                "i",
                "2024-01-01T00:00:00Z",
                json!({"ingressClassName": "mesh", "rules": [rule(Some("x.example.com"), vec![
                    path("/nosvc", "Prefix", "nope", json!(80)),
                    path("/noport", "Prefix", "a", json!(81)),
                    path("/noname", "Prefix", "a", json!("grpc")),
                    path("/ext", "Prefix", "ext", json!(80)),
                    json!({"path": "/res", "pathType": "Prefix", "backend": {"resource": {"kind": "Bucket", "name": "b"}}}),
                    path("/ok", "Prefix", "a", json!(80)),
                ])]}),
            ),
        ],
    );
    let s = snap(objs);
    let t = routes_of(&s, "mesh", "ingress/http");
    assert_eq!(
        t["x.example.com"],
        pairs(&[
            ("/noname/*", "503"),
            ("/noport/*", "503"),
            ("/nosvc/*", "503"),
            ("/ext/*", "503"),
            ("/res/*", "503"),
            ("/ok/*", "ns/a/http"),
            ("/*", "404"),
        ])
    );
    for want in [
        "paths[0]: backend Service ns/nope does not exist",
        "paths[1]: backend Service ns/a has no port 81",
        "paths[2]: backend Service ns/a has no port grpc",
        "paths[3]: backend Service ns/ext is ExternalName",
        "paths[4]: resource backends are not supported",
    ] {
        assert!(has_problem(&s, want), "missing {want:?} in {:?}", problems(&s));
    }
}

#[test]
fn invalid_hosts_paths_and_types_are_skipped_with_reasons() {
    let objs = with(
        backends(),
        vec![
            mesh_class(),
            ingress(
                "i",
                "2024-01-01T00:00:00Z",
                json!({"ingressClassName": "mesh", "rules": [
                    rule(Some("10.0.0.1"), vec![path("/", "Prefix", "a", json!(80))]),
                    rule(Some("bad_host.example.com"), vec![path("/", "Prefix", "a", json!(80))]),
                    rule(Some("a.*.example.com"), vec![path("/", "Prefix", "a", json!(80))]),
                    rule(Some("ok.example.com"), vec![
                        path("relative", "Prefix", "a", json!(80)),
                        path("/q?x=1", "Exact", "a", json!(80)),
                        path("/r", "Regex", "a", json!(80)),
                        path("/fine", "Exact", "a", json!(80)),
                    ]),
                ]}),
            ),
        ],
    );
    let s = snap(objs);
    for want in [
        "rules[0]: host \"10.0.0.1\" is an IP address",
        "rules[1]: host \"bad_host.example.com\" is not a valid DNS name",
        "rules[2]: host \"a.*.example.com\" is not a valid DNS name",
        "rules[3].paths[0]: path \"relative\" must start with '/'",
        "rules[3].paths[1]: path \"/q?x=1\" holds",
        "rules[3].paths[2]: pathType \"Regex\" is not",
    ] {
        assert!(has_problem(&s, want), "missing {want:?} in {:?}", problems(&s));
    }
    let t = routes_of(&s, "mesh", "ingress/http");
    assert_eq!(t.keys().collect::<Vec<_>>(), ["*", "ok.example.com"]);
    assert_eq!(t["ok.example.com"], pairs(&[("=/fine", "ns/a/http"), ("/*", "404")]));
}

const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIBdzCCAR2gAwIBAgIUQ3Vm\n-----END CERTIFICATE-----\n";
const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEG\n-----END PRIVATE KEY-----\n";

fn tls_secret(name: &str, crt: &str, key: &str) -> Value {
    use std::io::Write;
    let b64 = |s: &str| {
        // serde's ByteString expects base64; encode by hand to avoid a dependency for tests.
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = Vec::new();
        for c in s.as_bytes().chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..4 {
                if i <= c.len() {
                    out.write_all(&[T[((n >> (18 - 6 * i)) & 63) as usize]]).unwrap();
                } else {
                    out.write_all(b"=").unwrap();
                }
            }
        }
        String::from_utf8(out).unwrap()
    };
    json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls", "metadata": {"name": name, "namespace": "ns"},
        "data": {"tls.crt": b64(crt), "tls.key": b64(key)}})
}

#[test]
fn tls_secrets_sni_chains_and_redirects() {
    let objs = with(
        backends(),
        vec![
            mesh_class(),
            tls_secret("shop-tls", CERT, KEY),
            tls_secret("other-tls", CERT, KEY),
            tls_secret("broken", "not pem", KEY),
            {
                let mut i = ingress(
                    "shop",
                    "2024-01-01T00:00:00Z",
                    json!({"ingressClassName": "mesh",
                "tls": [{"hosts": ["shop.example.com", "*.shop.example.com"], "secretName": "shop-tls"},
                        {"hosts": ["gone.example.com"], "secretName": "missing"},
                        {"hosts": ["broken.example.com"], "secretName": "broken"}],
                "rules": [rule(Some("shop.example.com"), vec![path("/", "Prefix", "a", json!(80))]),
                          rule(Some("www.shop.example.com"), vec![path("/", "Prefix", "a", json!(80))]),
                          rule(Some("gone.example.com"), vec![path("/", "Prefix", "a", json!(80))])]}),
                );
                i["metadata"]["annotations"] = json!({"mesh.dev/ssl-redirect": "true"});
                i
            },
            {
                let mut i = ingress(
                    "plain",
                    "2024-02-01T00:00:00Z",
                    json!({"ingressClassName": "mesh",
                "tls": [{"hosts": ["noredirect.example.com"], "secretName": "other-tls"},
                        {"hosts": ["shop.example.com"], "secretName": "other-tls"}],
                "rules": [rule(Some("noredirect.example.com"), vec![path("/", "Prefix", "b", json!(80))])]}),
                );
                i["metadata"]["annotations"] = json!({"mesh.dev/ssl-redirect": "false"});
                i
            },
        ],
    );
    let s = snap(objs);
    let role = &s.ingress["mesh"];
    assert_eq!(names(role, ResourceType::Secret), ["ns/other-tls", "ns/shop-tls"]);
    let l: Listener = decode(role, ResourceType::Listener, "ingress/https");
    let chains: Vec<(String, Vec<String>)> = l
        .filter_chains
        .iter()
        .map(|c| (c.name.clone(), c.filter_chain_match.as_ref().unwrap().server_names.clone()))
        .collect();
    assert_eq!(
        chains,
        [
            ("ns/other-tls".to_owned(), vec!["noredirect.example.com".to_owned()]),
            ("ns/shop-tls".to_owned(), vec!["*.shop.example.com".to_owned(), "shop.example.com".to_owned()]),
        ]
    );
    assert_eq!(l.listener_filters[0].name, "envoy.filters.listener.tls_inspector");
    let http = routes_of(&s, "mesh", "ingress/http");
    assert_eq!(http["shop.example.com"], pairs(&[("/*", "redirect")]));
    assert_eq!(http["www.shop.example.com"], pairs(&[("/*", "redirect")]), "covered by the one-label wildcard");
    assert_eq!(http["noredirect.example.com"], pairs(&[("/*", "ns/b/http")]));
    assert_eq!(http["gone.example.com"], pairs(&[("/*", "ns/a/http")]), "no Secret: plain HTTP");
    let https = routes_of(&s, "mesh", "ingress/https");
    assert_eq!(https["shop.example.com"], pairs(&[("/*", "ns/a/http")]));
    for want in [
        "Ingress ns/shop: tls[1]: TLS Secret ns/missing does not exist",
        "Ingress ns/shop: tls[2]: TLS Secret ns/broken: tls.crt holds no PEM certificate",
        "Ingress ns/plain: TLS host shop.example.com already uses Secret ns/shop-tls",
    ] {
        assert!(has_problem(&s, want), "missing {want:?} in {:?}", problems(&s));
    }
}

// ---------------------------------------------------------------- versions, incremental, determinism

#[test]
fn versions_are_content_derived_and_stable() {
    let mut st = store(web());
    let mut t = Translator::new(Options::default());
    let before = t.full(&st).clone();
    // Touch one slice of another Service: web's resources keep their versions (the same Arcs, even).
    let ch = st.apply(obj(slice("other-1", "other", json!([{"port": 80}]), json!([ep("10.0.0.9")]))));
    let after = t.update(&st, &ch).clone();
    assert_eq!(before.proxy, after.proxy);
    // Change one endpoint of web: only web/http's CLA changes version.
    let ch = st.apply(obj(slice("web-2", "web", json!([{"name": "http", "port": 8081}]), json!([ep("10.0.0.4")]))));
    let after = t.update(&st, &ch).clone();
    for ty in xds_proto::types::ResourceType::ALL {
        for (name, r) in before.proxy.get(ty) {
            let changed = after.proxy.get(ty)[name].version != r.version;
            assert_eq!(changed, ty == ResourceType::ClusterLoadAssignment && name == "ns/web/http", "{ty} {name}");
        }
    }
    assert_ne!(
        before.proxy.type_version(ResourceType::ClusterLoadAssignment),
        after.proxy.type_version(ResourceType::ClusterLoadAssignment)
    );
    assert_eq!(before.proxy.type_version(ResourceType::Listener), after.proxy.type_version(ResourceType::Listener));
}

#[test]
fn endpoint_changes_reach_the_ingress_role_incrementally() {
    let mut objs = with(
        backends(),
        vec![
            mesh_class(),
            ingress(
                "i",
                "2024-01-01T00:00:00Z",
                json!({"ingressClassName": "mesh",
        "rules": [rule(Some("x.example.com"), vec![path("/", "Prefix", "a", json!("http"))])]}),
            ),
        ],
    );
    objs.push(slice("a-1", "a", json!([{"name": "http", "port": 80}]), json!([ep("10.0.0.1")])));
    let mut st = store(objs);
    let mut t = Translator::new(Options::default());
    t.full(&st);
    let ch = st.apply(obj(slice("a-1", "a", json!([{"name": "http", "port": 80}]), json!([ep("10.0.0.2")]))));
    assert!(!ch.ingress, "an endpoint change must not rebuild the route tables");
    let s = t.update(&st, &ch).clone();
    let cla: ClusterLoadAssignment = decode(&s.ingress["mesh"], ResourceType::ClusterLoadAssignment, "ns/a/http");
    assert_eq!(endpoints(&cla)[0].0, "10.0.0.2:80");
    assert_eq!(s, translate(&st, &Options::default()));
}

#[test]
fn plain_http_to_a_tls_host_is_served_unless_a_redirect_is_asked_for() {
    let tls_ingress = |name: &str, host: &str, annotations: Value| {
        let mut i = ingress(
            name,
            "2024-01-01T00:00:00Z",
            json!({"ingressClassName": "mesh", "tls": [{"hosts": [host], "secretName": "tls"}],
                "rules": [rule(Some(host), vec![path("/", "Prefix", "a", json!(80))])]}),
        );
        i["metadata"]["annotations"] = annotations;
        i
    };
    let objs = |class_annotations: Value| {
        let mut class = mesh_class();
        class["metadata"]["annotations"] = class_annotations;
        with(
            backends(),
            vec![
                class,
                tls_secret("tls", CERT, KEY),
                tls_ingress("plain", "plain.example.com", json!({})),
                tls_ingress("mesh-on", "mesh-on.example.com", json!({"mesh.dev/ssl-redirect": "true"})),
                tls_ingress("mesh-off", "mesh-off.example.com", json!({"mesh.dev/ssl-redirect": "false"})),
                tls_ingress(
                    "nginx-on",
                    "nginx-on.example.com",
                    json!({"nginx.ingress.kubernetes.io/ssl-redirect": "True"}),
                ),
                tls_ingress(
                    "nginx-force",
                    "nginx-force.example.com",
                    json!({"nginx.ingress.kubernetes.io/force-ssl-redirect": "true"}),
                ),
                tls_ingress(
                    "nginx-off",
                    "nginx-off.example.com",
                    json!({"nginx.ingress.kubernetes.io/ssl-redirect": "false"}),
                ),
            ],
        )
    };
    let served = |s: &Snapshot, host: &str| {
        let http = routes_of(s, "mesh", "ingress/http");
        let https = routes_of(s, "mesh", "ingress/https");
        assert_eq!(https[host], pairs(&[("/*", "ns/a/http")]), "{host} over TLS");
        match http[host].as_slice() {
            [(m, t)] if m == "/*" && t == "redirect" => false,
            [(m, t)] if m == "/*" && t == "ns/a/http" => true,
            other => panic!("{host}: {other:?}"),
        }
    };
    let all = ["plain", "mesh-on", "mesh-off", "nginx-on", "nginx-force", "nginx-off"];
    let check = |s: &Snapshot, redirected: &[&str]| {
        for name in all {
            let host = format!("{name}.example.com");
            assert_eq!(!served(s, &host), redirected.contains(&name), "{host}");
        }
    };
    // By default plain HTTP is served (the conformance suite's GET http://foo.bar.com/ expects the backend).
    let s = snap(objs(json!({})));
    assert!(problems(&s).is_empty(), "{:?}", problems(&s));
    check(&s, &["mesh-on", "nginx-on", "nginx-force"]);
    // The IngressClass turns it on for its Ingresses that do not say.
    let s = snap(objs(json!({"mesh.dev/ssl-redirect": "true"})));
    check(&s, &["plain", "mesh-on", "nginx-on", "nginx-force"]);
    // mesh-control's --ssl-redirect, unless the class says otherwise.
    let on = Options { ssl_redirect: true, ..Options::default() };
    let s = translate(&store(objs(json!({}))), &on);
    check(&s, &["plain", "mesh-on", "nginx-on", "nginx-force"]);
    let s = translate(&store(objs(json!({"mesh.dev/ssl-redirect": "false"}))), &on);
    check(&s, &["mesh-on", "nginx-on", "nginx-force"]);
}

#[test]
fn prefix_paths_differing_by_a_trailing_slash_longest_as_written_wins() {
    // Conformance: /foo and /foo/ (both Prefix) in one host; both match /foo and /foo/; /foo/ is longer.
    for order in [["/foo", "/foo/"], ["/foo/", "/foo"]] {
        let target = |p: &str| if p == "/foo/" { "b" } else { "a" };
        let objs = with(
            backends(),
            vec![
                mesh_class(),
                ingress(
                    "i",
                    "2024-01-01T00:00:00Z",
                    json!({"ingressClassName": "mesh", "rules": [rule(Some("x.example.com"), vec![
                        path(order[0], "Prefix", target(order[0]), json!("http")),
                        path(order[1], "Prefix", target(order[1]), json!("http")),
                    ])]}),
                ),
            ],
        );
        let s = snap(objs);
        assert!(problems(&s).is_empty(), "{:?}", problems(&s));
        let t = routes_of(&s, "mesh", "ingress/http");
        assert_eq!(t["x.example.com"], pairs(&[("/foo/*", "ns/b/http"), ("/foo/*", "ns/a/http"), ("/*", "404")]));
    }
    // Across Ingresses too, whichever is older.
    for (foo, foo_slash) in
        [("2024-01-01T00:00:00Z", "2025-01-01T00:00:00Z"), ("2025-01-01T00:00:00Z", "2024-01-01T00:00:00Z")]
    {
        let one = |name: &str, created: &str, p: &str, svc: &str| {
            ingress(
                name,
                created,
                json!({"ingressClassName": "mesh", "rules": [rule(Some("x.example.com"), vec![path(p, "Prefix", svc, json!("http"))])]}),
            )
        };
        let s = snap(with(
            backends(),
            vec![mesh_class(), one("foo", foo, "/foo", "a"), one("slash", foo_slash, "/foo/", "b")],
        ));
        assert!(problems(&s).is_empty(), "{:?}", problems(&s));
        let t = routes_of(&s, "mesh", "ingress/http");
        assert_eq!(t["x.example.com"][0], ("/foo/*".to_owned(), "ns/b/http".to_owned()));
    }
}

#[test]
fn each_node_proxy_is_sent_its_own_nodes_zone_and_follows_the_label() {
    let node = |name: &str, zone: Option<&str>| {
        let labels = zone.map_or(json!({}), |z| json!({"topology.kubernetes.io/zone": z}));
        obj(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}))
    };
    let zone_of = |r: &RoleSnapshot, node: &str| -> Option<String> {
        let name = xds_proto::names::node_locality(node);
        let res = r.get(ResourceType::ClusterLoadAssignment).get(&name)?;
        let cla = ClusterLoadAssignment::decode(&res.body[..]).unwrap();
        assert!(cla.endpoints.iter().all(|l| l.lb_endpoints.is_empty()), "no endpoints in a node locality");
        let l = cla.endpoints[0].locality.clone().unwrap();
        assert_eq!(l.sub_zone, node);
        Some(l.zone)
    };
    let mut st = store(web());
    let mut t = Translator::new(Options::default());
    t.full(&st);
    let ch = st.apply(node("n1", Some("z1")));
    t.update(&st, &ch);
    let ch = st.apply(node("n2", Some("z2")));
    t.update(&st, &ch);
    let ch = st.apply(node("n3", None));
    t.update(&st, &ch);
    let s = t.snapshot().clone();
    let n1 = s.for_client(&Role::Proxy, "n1");
    assert_eq!(zone_of(&n1, "n1").as_deref(), Some("z1"));
    assert_eq!(zone_of(&n1, "n2"), None, "only its own node");
    assert_eq!(zone_of(&s.for_client(&Role::Proxy, "n2"), "n2").as_deref(), Some("z2"));
    assert_eq!(zone_of(&s.for_client(&Role::Proxy, "n3"), "n3"), None, "no label, nothing sent");
    assert_eq!(
        n1.get(ResourceType::ClusterLoadAssignment).len(),
        s.proxy.get(ResourceType::ClusterLoadAssignment).len() + 1,
        "the role's resources plus one"
    );
    assert!(s.proxy.get(ResourceType::ClusterLoadAssignment).keys().all(|n| !n.starts_with("node/")));
    let ingress = s.for_client(&Role::Ingress { class: "mesh".into() }, "n1");
    assert!(ingress.get(ResourceType::ClusterLoadAssignment).is_empty(), "an ingress gets no node locality");

    // The label changes, then goes.
    let ch = st.apply(node("n1", Some("z9")));
    t.update(&st, &ch);
    assert_eq!(zone_of(&t.snapshot().for_client(&Role::Proxy, "n1"), "n1").as_deref(), Some("z9"));
    let ch = st.apply(node("n1", None));
    t.update(&st, &ch);
    assert_eq!(zone_of(&t.snapshot().for_client(&Role::Proxy, "n1"), "n1"), None);
    assert_eq!(t.snapshot().nodes, translate(&st, &Options::default()).nodes, "incremental = full");
}

//! Protocol tests: the state machines directly, then the gRPC service in-process.

use std::collections::HashMap;

use serde_json::{Value, json};
use xds_proto::discovery::{DeltaDiscoveryRequest, DiscoveryRequest};
use xds_proto::types::ResourceType::{self, *};

use super::delta::DeltaStream;
use super::sotw::SotwStream;
use super::*;
use crate::model::{Object, Parsed};
use crate::store::Store;
use crate::translate::{Options, translate};

fn store(objs: &[Value]) -> Store {
    let mut s = Store::new();
    for o in objs {
        if let Ok(Parsed::Object(o)) = Object::parse(o.clone()) {
            s.apply(o);
        }
    }
    s
}

fn svc(name: &str, ip: &str, endpoint: &str) -> Vec<Value> {
    vec![
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "ns"},
            "spec": {"clusterIP": ip, "ports": [{"port": 80}]}}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-1"), "namespace": "ns", "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"port": 8080}], "endpoints": [{"addresses": [endpoint]}]}),
    ]
}

fn proxy_snap(objs: &[Value]) -> RoleSnapshot {
    translate(&store(objs), &Options::default()).proxy
}

fn delta_req(kind: ResourceType, subscribe: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: kind.type_url().into(),
        resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

// ---------------------------------------------------------------- Delta

#[test]
fn delta_initial_fetch_ack_and_only_changes_after() {
    let a = svc("a", "10.96.0.1", "10.0.0.1");
    let snap = proxy_snap(&a);
    let mut s = DeltaStream::new();
    let (ack, out) = s.on_request(&delta_req(Cluster, &["*"], ""), Some(&snap));
    assert_eq!(ack, None);
    assert_eq!(names(&out[0]), ["ns/a/80"]);
    let (ack, out) = s.on_request(&delta_req(Cluster, &[], &out[0].nonce), Some(&snap));
    assert!(matches!(ack, Some(Ack::Ack { kind: Cluster, .. })));
    assert!(out.is_empty(), "an ACK asks for nothing new");
    for t in [ClusterLoadAssignment, Listener] {
        s.on_request(&delta_req(t, &["*"], ""), Some(&snap));
    }
    // One endpoint changes: one ClusterLoadAssignment is sent, nothing else.
    let mut b = a.clone();
    b[1]["endpoints"][0]["addresses"][0] = json!("10.0.0.2");
    let out = s.on_snapshot(&proxy_snap(&b));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].type_url, ClusterLoadAssignment.type_url());
    assert_eq!(names(&out[0]), ["ns/a/80"]);
    assert!(s.on_snapshot(&proxy_snap(&b)).is_empty(), "nothing new, nothing sent");
}

#[test]
fn delta_legacy_wildcard_named_subscriptions_and_unsubscribe() {
    let objs: Vec<Value> = [svc("a", "10.96.0.1", "10.0.0.1"), svc("b", "10.96.0.2", "10.0.0.2")].concat();
    let snap = proxy_snap(&objs);
    let mut s = DeltaStream::new();
    // An empty first LDS request is the legacy wildcard.
    let (_, out) = s.on_request(&delta_req(Listener, &[], ""), Some(&snap));
    assert_eq!(names(&out[0]), ["svc/ns/a/80@10.96.0.1", "svc/ns/b/80@10.96.0.2"]);
    // EDS by name, as Envoy does.
    let (_, out) = s.on_request(&delta_req(ClusterLoadAssignment, &["ns/b/80"], ""), Some(&snap));
    assert_eq!(names(&out[0]), ["ns/b/80"]);
    // A name that does not exist is reported absent, once.
    let (_, out) = s.on_request(&delta_req(ClusterLoadAssignment, &["ns/zzz/80"], ""), Some(&snap));
    assert_eq!(out[0].removed_resources, ["ns/zzz/80"]);
    assert!(out[0].resources.is_empty());
    assert!(s.on_snapshot(&snap).is_empty());
    // Unsubscribe, then subscribe again: sent again.
    let mut unsub = delta_req(ClusterLoadAssignment, &[], "");
    unsub.resource_names_unsubscribe = vec!["ns/b/80".into()];
    let (_, out) = s.on_request(&unsub, Some(&snap));
    assert!(out.is_empty());
    let (_, out) = s.on_request(&delta_req(ClusterLoadAssignment, &["ns/b/80"], ""), Some(&snap));
    assert_eq!(names(&out[0]), ["ns/b/80"]);
}

#[test]
fn delta_reconnect_with_initial_versions_is_not_resent() {
    let a = svc("a", "10.96.0.1", "10.0.0.1");
    let snap = proxy_snap(&a);
    let mut req = delta_req(Cluster, &["*"], "");
    let version = snap.get(Cluster)["ns/a/80"].version.clone();
    req.initial_resource_versions =
        HashMap::from([("ns/a/80".to_owned(), version), ("ns/gone/80".to_owned(), "0123".to_owned())]);
    let mut s = DeltaStream::new();
    let (_, out) = s.on_request(&req, Some(&snap));
    assert_eq!(out.len(), 1);
    assert!(out[0].resources.is_empty(), "the client has the current version");
    assert_eq!(out[0].removed_resources, ["ns/gone/80"], "what it has that is gone is removed");
}

#[test]
fn delta_nack_is_not_resent_until_the_resource_changes() {
    let a = svc("a", "10.96.0.1", "10.0.0.1");
    let mut s = DeltaStream::new();
    let (_, out) = s.on_request(&delta_req(Cluster, &["*"], ""), Some(&proxy_snap(&a)));
    let mut nack = delta_req(Cluster, &[], &out[0].nonce);
    nack.error_detail = Some(Default::default());
    nack.error_detail.as_mut().unwrap().message = "bad cluster".into();
    let (ack, out) = s.on_request(&nack, Some(&proxy_snap(&a)));
    assert!(matches!(ack, Some(Ack::Nack { ref detail, .. }) if detail == "bad cluster"));
    assert!(out.is_empty());
    assert!(s.on_snapshot(&proxy_snap(&a)).is_empty(), "the refused version is not pushed again");
    let mut b = a.clone();
    b[0]["spec"]["sessionAffinity"] = json!("ClientIP");
    assert_eq!(s.on_snapshot(&proxy_snap(&b)).len(), 1, "a new version is");
}

#[test]
fn delta_ordering_adds_before_and_removes_after_listeners() {
    let a = svc("a", "10.96.0.1", "10.0.0.1");
    let b = svc("b", "10.96.0.2", "10.0.0.2");
    let mut s = DeltaStream::new();
    let empty = proxy_snap(&[]);
    for t in [Listener, Cluster, ClusterLoadAssignment] {
        s.on_request(&delta_req(t, &["*"], ""), Some(&empty));
    }
    let order = |out: &[DeltaDiscoveryResponse]| -> Vec<(ResourceType, bool)> {
        out.iter()
            .map(|r| (ResourceType::from_type_url(&r.type_url).unwrap(), !r.removed_resources.is_empty()))
            .collect()
    };
    let out = s.on_snapshot(&proxy_snap(&a));
    assert_eq!(order(&out), [(Cluster, false), (ClusterLoadAssignment, false), (Listener, false)]);
    // a goes, b comes: b's Cluster and endpoints first, then the Listener change, then a's removal.
    let out = s.on_snapshot(&proxy_snap(&b));
    assert_eq!(
        order(&out),
        [
            (Cluster, false),
            (ClusterLoadAssignment, false),
            (Listener, true),
            (ClusterLoadAssignment, true),
            (Cluster, true)
        ]
    );
    assert_eq!(out[2].removed_resources, ["svc/ns/a/80@10.96.0.1"]);
    assert_eq!(names(&out[2]), ["svc/ns/b/80@10.96.0.2"]);
    assert_eq!(out[4].removed_resources, ["ns/a/80"]);
}

// ---------------------------------------------------------------- SotW

fn sotw_req(kind: ResourceType, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: kind.type_url().into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

#[test]
fn sotw_full_sets_versions_acks_nacks_and_stale_nonces() {
    let objs: Vec<Value> = [svc("a", "10.96.0.1", "10.0.0.1"), svc("b", "10.96.0.2", "10.0.0.2")].concat();
    let snap = proxy_snap(&objs);
    let mut s = SotwStream::new();
    let (_, out) = s.on_request(&sotw_req(Cluster, &[], "", ""), Some(&snap));
    assert_eq!(out[0].resources.len(), 2, "wildcard CDS: the whole set");
    let (v1, n1) = (out[0].version_info.clone(), out[0].nonce.clone());
    let (ack, out) = s.on_request(&sotw_req(Cluster, &[], &v1, &n1), Some(&snap));
    assert!(matches!(ack, Some(Ack::Ack { .. })) && out.is_empty());
    // Named EDS: only those.
    let (_, out) = s.on_request(&sotw_req(ClusterLoadAssignment, &["ns/b/80"], "", ""), Some(&snap));
    assert_eq!(out[0].resources.len(), 1);
    // Same snapshot again: nothing.
    assert!(s.on_snapshot(&snap).is_empty());
    // Change: a new CDS version, then NACK it; it is not resent until something changes again.
    let mut changed = objs.clone();
    changed[0]["spec"]["sessionAffinity"] = json!("ClientIP");
    let out = s.on_snapshot(&proxy_snap(&changed));
    let cds = out.iter().find(|r| r.type_url == Cluster.type_url()).unwrap();
    assert_ne!(cds.version_info, v1);
    // A request answering the previous nonce is stale.
    let (ack, _) = s.on_request(&sotw_req(Cluster, &[], &v1, &n1), Some(&snap));
    assert!(matches!(ack, Some(Ack::Stale { .. })));
    let mut nack = sotw_req(Cluster, &[], &v1, &cds.nonce);
    nack.error_detail = Some(Default::default());
    let (ack, out) = s.on_request(&nack, Some(&proxy_snap(&changed)));
    assert!(matches!(ack, Some(Ack::Nack { .. })) && out.is_empty());
    assert!(s.on_snapshot(&proxy_snap(&changed)).is_empty());
}

#[test]
fn sotw_removal_of_a_cluster_waits_for_the_listener_update() {
    let a = svc("a", "10.96.0.1", "10.0.0.1");
    let mut s = SotwStream::new();
    let snap = proxy_snap(&a);
    for t in [Cluster, Listener] {
        s.on_request(&sotw_req(t, &[], "", ""), Some(&snap));
    }
    let out = s.on_snapshot(&proxy_snap(&[]));
    let seq: Vec<(ResourceType, usize)> =
        out.iter().map(|r| (ResourceType::from_type_url(&r.type_url).unwrap(), r.resources.len())).collect();
    assert_eq!(seq, [(Listener, 0), (Cluster, 0)]);
}

#[test]
fn sotw_request_before_the_first_snapshot_is_answered_when_it_comes() {
    let mut s = SotwStream::new();
    let (_, out) = s.on_request(&sotw_req(Cluster, &[], "", ""), None);
    assert!(out.is_empty());
    let out = s.on_snapshot(&proxy_snap(&svc("a", "10.96.0.1", "10.0.0.1")));
    assert_eq!(out.len(), 1);
    // Even an empty snapshot is an answer: empty is not "not loaded".
    let mut s = SotwStream::new();
    s.on_request(&sotw_req(Listener, &[], "", ""), None);
    let out = s.on_snapshot(&proxy_snap(&[]));
    assert_eq!(out.len(), 1);
    assert!(out[0].resources.is_empty());
}

// ---------------------------------------------------------------- over gRPC

use xds_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;

fn node(role: Option<&str>) -> Node {
    use xds_proto::protobuf::{Struct, Value as PValue, value::Kind};
    let mut fields = std::collections::HashMap::new();
    if let Some(r) = role {
        fields.insert("role".to_owned(), PValue { kind: Some(Kind::StringValue(r.into())) });
    }
    Node { id: "test-node".into(), metadata: Some(Struct { fields }), ..Default::default() }
}

async fn start(snap: Option<Snapshot>) -> (SocketAddr, watch::Sender<Option<Arc<Snapshot>>>, XdsServer, Shutdown) {
    let (tx, rx) = watch::channel(snap.map(Arc::new));
    let server = XdsServer::new(
        rx,
        XdsConfig { debounce: Duration::from_millis(1), ..XdsConfig::default() },
        XdsMetrics::default(),
    );
    let shutdown = Shutdown::new();
    let (addr, _) = server.clone().serve("127.0.0.1:0".parse().unwrap(), shutdown.clone()).await.unwrap();
    (addr, tx, server, shutdown)
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f).await.expect("within 10 s")
}

#[tokio::test]
async fn grpc_delta_waits_for_load_serves_the_role_and_counts_nacks() {
    let (addr, tx, server, shutdown) = start(None).await;
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}")).await.unwrap();
    let (req_tx, req_rx) = mpsc::channel(8);
    let mut first = delta_req(Cluster, &["*"], "");
    first.node = Some(node(Some("proxy")));
    req_tx.send(first).await.unwrap();
    let mut resp = client
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(req_rx))
        .await
        .unwrap()
        .into_inner();
    // Not loaded yet: nothing comes. Then the first snapshot arrives and is served.
    assert!(tokio::time::timeout(Duration::from_millis(200), resp.message()).await.is_err());
    tx.send_replace(Some(Arc::new(translate(&store(&svc("a", "10.96.0.1", "10.0.0.1")), &Options::default()))));
    let r = within(resp.message()).await.unwrap().unwrap();
    assert_eq!(names(&r), ["ns/a/80"]);
    assert_eq!(server.clients().len(), 1);
    let mut nack = delta_req(Cluster, &[], &r.nonce);
    nack.error_detail = Some(Default::default());
    req_tx.send(nack).await.unwrap();
    // The NACK lands in the registry.
    within(async {
        while server.clients().first().is_none_or(|c| c.nacks == 0) {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    drop(req_tx);
    within(async {
        while !server.clients().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    shutdown.trigger();
}

#[tokio::test]
async fn grpc_refuses_a_node_without_role() {
    let (addr, _tx, _server, shutdown) = start(Some(Snapshot::default())).await;
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}")).await.unwrap();
    let mut first = sotw_req(Cluster, &[], "", "");
    first.node = Some(node(None));
    let stream = tokio_stream::iter(vec![first]);
    let mut resp = client.stream_aggregated_resources(stream).await.unwrap().into_inner();
    let err = within(resp.message()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("node.metadata.role"), "{}", err.message());
    shutdown.trigger();
}

#[tokio::test]
async fn grpc_sotw_ingress_role_gets_its_class_only() {
    let objs = vec![
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass", "metadata": {"name": "mesh"},
            "spec": {"controller": xds_proto::INGRESS_CONTROLLER}}),
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "i", "namespace": "ns"},
            "spec": {"ingressClassName": "mesh", "defaultBackend": {"service": {"name": "a", "port": {"number": 80}}}}}),
    ];
    let objs: Vec<Value> = [objs, svc("a", "10.96.0.1", "10.0.0.1")].concat();
    let (addr, _tx, _server, shutdown) = start(Some(translate(&store(&objs), &Options::default()))).await;
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}")).await.unwrap();
    let mut first = sotw_req(Listener, &[], "", "");
    first.node = Some(node(Some("ingress")));
    let mut resp = client.stream_aggregated_resources(tokio_stream::iter(vec![first])).await.unwrap().into_inner();
    let r = within(resp.message()).await.unwrap().unwrap();
    let listeners: Vec<String> =
        r.resources.iter().map(|a| xds_proto::snapshot_file::resource_name(Listener, &a.value).unwrap()).collect();
    assert_eq!(listeners, ["ingress/http"], "the ingress role gets the ingress listeners, not Service addresses");
    shutdown.trigger();
}

#[test]
fn delta_large_sets_go_out_in_chunks() {
    // 120 Services × 1,000 endpoints: several chunks of ClusterLoadAssignments.
    let mut objs = Vec::new();
    for i in 0..120 {
        let mut v = svc(&format!("s{i}"), &format!("10.96.1.{i}"), "10.0.0.1");
        let eps: Vec<Value> = (0..1000)
            .map(|e| json!({"addresses": [format!("10.1.{}.{}", e / 250, e % 250)], "nodeName": "some-node-name"}))
            .collect();
        v[1]["endpoints"] = json!(eps);
        objs.extend(v);
    }
    let snap = proxy_snap(&objs);
    let mut s = DeltaStream::new();
    let (_, out) = s.on_request(&delta_req(ClusterLoadAssignment, &["*"], ""), Some(&snap));
    assert!(out.len() >= 2, "{} responses", out.len());
    let total: usize = out.iter().map(|r| r.resources.len()).sum();
    assert_eq!(total, 120);
    let nonces: std::collections::BTreeSet<&str> = out.iter().map(|r| r.nonce.as_str()).collect();
    assert_eq!(nonces.len(), out.len(), "each piece has its own nonce");
    for r in &out {
        assert!(prost::Message::encoded_len(r) < 2 * super::delta::CHUNK);
    }
    // Every piece's ACK is recognised.
    for r in &out {
        let (ack, _) = s.on_request(&delta_req(ClusterLoadAssignment, &[], &r.nonce), Some(&snap));
        assert!(matches!(ack, Some(Ack::Ack { .. })));
    }
}

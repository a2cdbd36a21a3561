//! The Kubernetes source, Ingress status and leader election, run for real (the whole app, `kube`'s watchers and
//! client) against the in-memory [`FakeApi`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use mesh_tests::assert_eventually;
use serde_json::{Value, json};
use xds_proto::types::ResourceType;

use super::*;
use crate::app::{self, App, SourceConfig};
use crate::testing::fake::{ApiCall, FakeApi};
use crate::translate::{Options, Snapshot};
use crate::xds::XdsConfig;

const WAIT: Duration = Duration::from_secs(20);
const LEASE_NS: &str = "mesh-system";

fn fast_backoff() -> BackoffSettings {
    BackoffSettings { min: Duration::from_millis(10), max: Duration::from_millis(200) }
}

fn settings(client: kube::Client, status: Option<StatusSettings>) -> Settings {
    Settings { client, namespace: None, backoff: fast_backoff(), status }
}

async fn start(settings: Settings) -> App {
    app::build(app::Config {
        source: SourceConfig::Kubernetes(Box::new(settings)),
        translate: Options::default(),
        xds_addr: "127.0.0.1:0".parse().unwrap(),
        xds: XdsConfig::default(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        logging: None,
    })
    .await
    .unwrap()
}

fn latest(app: &App) -> Option<Arc<Snapshot>> {
    app.snapshots.borrow().clone()
}

/// Every resource of a type in the node proxy's (`None`) or an ingress class's snapshot, as Envoy JSON text.
fn dump(app: &App, class: Option<&str>, t: ResourceType) -> String {
    let Some(s) = latest(app) else { return String::new() };
    let role = match class {
        None => s.proxy.clone(),
        Some(c) => s.ingress.get(c).cloned().unwrap_or_default(),
    };
    role.get(t)
        .values()
        .map(|r| format!("{} {}\n", r.name, xds_proto::codec::to_json(t.type_url(), &r.body).unwrap()))
        .collect()
}

fn names(app: &App, t: ResourceType) -> Vec<String> {
    latest(app).map(|s| s.proxy.get(t).keys().cloned().collect()).unwrap_or_default()
}

fn service(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop", "annotations": {"big": "x".repeat(1000)},
            "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "selector": {"app": name},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}})
}

fn slice(svc: &str, ip: &str, node: &str) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": format!("{svc}-1"), "namespace": "shop", "labels": {"kubernetes.io/service-name": svc}},
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}, "nodeName": node}]})
}

fn node(name: &str, zone: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "status": {"images": [{"names": ["registry/busybox:1"], "sizeBytes": 1}]}})
}

fn class(name: &str, controller: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass", "metadata": {"name": name},
        "spec": {"controller": controller}})
}

fn ingress(name: &str, class: &str, path: &str, tls: Option<&str>) -> Value {
    let mut v = json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"ingressClassName": class, "rules": [{"host": "shop.example.com", "http": {"paths": [
            {"path": path, "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"name": "http"}}}}]}}]}});
    if let Some(secret) = tls {
        v["spec"]["tls"] = json!([{"hosts": ["shop.example.com"], "secretName": secret}]);
    }
    v
}

fn tls_secret(name: &str) -> Value {
    let cert = rcgen::generate_simple_self_signed(vec!["shop.example.com".into()]).unwrap();
    let secret = Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.into()),
            namespace: Some("shop".into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            ("tls.crt".into(), ByteString(cert.cert.pem().into_bytes())),
            ("tls.key".into(), ByteString(cert.signing_key.serialize_pem().into_bytes())),
        ])),
        ..Default::default()
    };
    serde_json::to_value(secret).unwrap()
}

fn opaque_secret() -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {"name": "db-password", "namespace": "shop"},
        "data": {"password": "aHVudGVyMg=="}})
}

fn cluster(fake: &FakeApi) {
    fake.apply(node("node-a", "zone-a"));
    fake.apply(class("mesh", xds_proto::INGRESS_CONTROLLER));
    fake.apply(service("web", "10.96.0.10"));
    fake.apply(slice("web", "10.0.0.1", "node-a"));
    fake.apply(tls_secret("shop-tls"));
    fake.apply(opaque_secret());
    fake.apply(ingress("shop", "mesh", "/", Some("shop-tls")));
}

#[tokio::test]
async fn initial_list_then_every_kind_flows_to_the_snapshot() {
    let fake = FakeApi::new();
    cluster(&fake);
    let app = start(settings(fake.client(), None)).await;
    assert_eventually!(latest(&app).is_some(), "the first snapshot");
    assert!(app.admin.readiness().is_ready());

    // The initial list of every kind is in the first snapshot.
    assert_eq!(names(&app, ResourceType::Listener), ["svc/shop/web/http@10.96.0.10"]);
    let cla = dump(&app, None, ResourceType::ClusterLoadAssignment);
    assert!(cla.contains("10.0.0.1") && cla.contains("zone-a"), "{cla}");
    assert!(dump(&app, Some("mesh"), ResourceType::Secret).contains("shop/shop-tls"));
    assert!(dump(&app, Some("mesh"), ResourceType::RouteConfiguration).contains("shop.example.com"));
    // Nodes are read as metadata only, everything else whole.
    assert_eq!(fake.metadata_only("nodes"), Some(true));
    assert_eq!(fake.metadata_only("services"), Some(false));
    // Only TLS Secrets were ever asked for.
    assert!(fake.calls().iter().any(|c| c.resource == "secrets" && c.verb == "list"));

    // EndpointSlice: modified, an endpoint moves.
    fake.apply(slice("web", "10.0.0.2", "node-a"));
    assert_eventually!(
        dump(&app, None, ResourceType::ClusterLoadAssignment).contains("10.0.0.2"),
        "the moved endpoint"
    );
    // Node: its zone changes, and with it the endpoint's locality.
    fake.apply(node("node-a", "zone-b"));
    assert_eventually!(dump(&app, None, ResourceType::ClusterLoadAssignment).contains("zone-b"), "the new zone");
    // Service: added, modified, deleted.
    fake.apply(service("api", "10.96.0.20"));
    assert_eventually!(
        { names(&app, ResourceType::Listener).contains(&"svc/shop/api/http@10.96.0.20".into()) },
        "the added Service"
    );
    fake.apply(service("api", "10.96.0.21"));
    assert_eventually!(
        { names(&app, ResourceType::Listener) == ["svc/shop/api/http@10.96.0.21", "svc/shop/web/http@10.96.0.10"] },
        "the modified Service"
    );
    assert!(fake.delete("v1", "Service", "shop", "api"));
    assert_eventually!(names(&app, ResourceType::Listener) == ["svc/shop/web/http@10.96.0.10"], "the deleted Service");
    // EndpointSlice: deleted.
    assert!(fake.delete("discovery.k8s.io/v1", "EndpointSlice", "shop", "web-1"));
    assert_eventually!(!dump(&app, None, ResourceType::ClusterLoadAssignment).contains("10.0.0.2"), "no endpoints");
    // Ingress: modified, then deleted.
    fake.apply(ingress("shop", "mesh", "/api", Some("shop-tls")));
    assert_eventually!(dump(&app, Some("mesh"), ResourceType::RouteConfiguration).contains("/api"), "the new path");
    // Secret: deleted (its hosts fall back to plain HTTP), then added again.
    assert!(fake.delete("v1", "Secret", "shop", "shop-tls"));
    assert_eventually!(!dump(&app, Some("mesh"), ResourceType::Secret).contains("shop/shop-tls"), "no SDS Secret");
    fake.apply(tls_secret("shop-tls"));
    assert_eventually!(dump(&app, Some("mesh"), ResourceType::Secret).contains("shop/shop-tls"), "the SDS Secret back");
    assert!(fake.delete("networking.k8s.io/v1", "Ingress", "shop", "shop"));
    assert_eventually!(!dump(&app, Some("mesh"), ResourceType::RouteConfiguration).contains("/api"), "no routes");
    // IngressClass: deleted, the class's snapshot goes; added back, it returns.
    assert!(fake.delete("networking.k8s.io/v1", "IngressClass", "", "mesh"));
    assert_eventually!(latest(&app).is_some_and(|s| s.ingress.is_empty()), "no ingress class");
    fake.apply(class("mesh", xds_proto::INGRESS_CONTROLLER));
    assert_eventually!(latest(&app).is_some_and(|s| s.ingress.contains_key("mesh")), "the ingress class");
    // Node: deleted; the locality loses its zone.
    assert!(fake.delete("v1", "Node", "", "node-a"));
    fake.apply(slice("web", "10.0.0.3", "node-a"));
    assert_eventually!(
        {
            let cla = dump(&app, None, ResourceType::ClusterLoadAssignment);
            cla.contains("10.0.0.3") && !cla.contains("zone-b")
        },
        "an endpoint without zone"
    );
    app.stop().await;
}

#[tokio::test]
async fn objects_are_trimmed_before_they_are_stored() {
    let fake = FakeApi::new();
    cluster(&fake);
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let _w = watch::spawn(&settings(fake.client(), None), tx, KubeMetrics::default());
    let mut seen = BTreeSet::new();
    while let Some(u) = tokio::time::timeout(WAIT, rx.recv()).await.expect("updates") {
        match u {
            crate::source::Update::Relist { kind, objects } => {
                seen.insert(kind);
                for o in objects {
                    let text = match &o {
                        crate::model::Object::Service(s) => serde_json::to_string(&**s).unwrap(),
                        crate::model::Object::Node(n) => serde_json::to_string(&**n).unwrap(),
                        crate::model::Object::Secret(s) => serde_json::to_string(&**s).unwrap(),
                        _ => continue,
                    };
                    for gone in ["managedFields", "resourceVersion", "uid", "\"big\"", "images", "selector", "Opaque"] {
                        assert!(!text.contains(gone), "{gone} kept in {text}");
                    }
                }
            }
            crate::source::Update::Synced => break,
            other => panic!("unexpected before Synced: {other:?}"),
        }
    }
    assert_eq!(seen.len(), watch::KINDS.len(), "one relist per kind before Synced: {seen:?}");
}

#[tokio::test]
async fn a_list_in_pages_is_one_relist() {
    let fake = FakeApi::new();
    cluster(&fake);
    // More Services than one page (kube-runtime asks for 500 at a time, then follows `continue`).
    for i in 0..1100u32 {
        fake.apply(service(&format!("s{i}"), &format!("10.97.{}.{}", i / 250, i % 250 + 1)));
    }
    let app = start(settings(fake.client(), None)).await;
    assert_eventually!(latest(&app).is_some(), "the first snapshot");
    assert_eq!(names(&app, ResourceType::Listener).len(), 1101);
    assert_eq!(fake.lists("services"), 3, "three pages");
    app.stop().await;
}

#[tokio::test]
async fn nothing_is_served_until_every_kind_is_listed() {
    let fake = FakeApi::new();
    cluster(&fake);
    fake.fail("ingresses", true);
    let app = start(settings(fake.client(), None)).await;
    // Every other kind is listed and watched; Ingresses keep failing (and are retried).
    assert_eventually!(
        {
            ["services", "endpointslices", "secrets", "nodes", "ingressclasses"].iter().all(|k| fake.watches(k) == 1)
                && fake.calls().iter().filter(|c| c.resource == "ingresses").count() >= 3
        },
        "the other kinds watched and Ingresses retried"
    );
    assert!(latest(&app).is_none(), "published before Ingresses were listed");
    assert!(!app.admin.readiness().is_ready());
    fake.fail("ingresses", false);
    assert_eventually!(latest(&app).is_some(), "the first snapshot");
    assert!(app.admin.readiness().is_ready());
    assert!(dump(&app, Some("mesh"), ResourceType::RouteConfiguration).contains("shop.example.com"));
    app.stop().await;
}

#[tokio::test]
async fn a_closed_watch_resumes_from_the_last_resource_version() {
    let fake = FakeApi::new();
    cluster(&fake);
    let app = start(settings(fake.client(), None)).await;
    assert_eventually!(latest(&app).is_some(), "the first snapshot");
    fake.apply(slice("web", "10.0.0.2", "node-a"));
    let seen_rv = fake.resource_version();
    assert_eventually!(dump(&app, None, ResourceType::ClusterLoadAssignment).contains("10.0.0.2"), "the change");
    let lists = fake.lists("endpointslices");

    // The server ends the watch (its timeout, a restart); a change lands before the client watches again.
    fake.close_watches();
    fake.apply(slice("web", "10.0.0.3", "node-a"));
    assert_eventually!(
        { dump(&app, None, ResourceType::ClusterLoadAssignment).contains("10.0.0.3") },
        "the change made while no watch was open"
    );
    let versions = fake.watch_versions("endpointslices");
    assert_eq!(versions.last().map(String::as_str), Some(seen_rv.to_string().as_str()), "{versions:?}");
    assert_eq!(fake.lists("endpointslices"), lists, "resumed, not relisted");
    app.stop().await;
}

#[tokio::test]
async fn gone_forces_a_relist_that_drops_what_was_deleted_in_the_gap() {
    gone_forces_a_relist(false).await;
}

#[tokio::test]
async fn gone_as_the_http_status_of_a_watch_also_forces_a_relist() {
    gone_forces_a_relist(true).await;
}

async fn gone_forces_a_relist(gone_as_http: bool) {
    let fake = FakeApi::new();
    fake.gone_as_http(gone_as_http);
    cluster(&fake);
    fake.apply(service("api", "10.96.0.20"));
    fake.apply(slice("api", "10.0.1.1", "node-a"));
    let app = start(settings(fake.client(), None)).await;
    assert_eventually!(names(&app, ResourceType::Listener).len() == 2, "both Services");
    let lists = fake.lists("services");

    // The API server goes away; meanwhile one Service is deleted and another added, and history is compacted,
    // so the watch cannot resume: 410 Gone.
    fake.set_down(true);
    let refused = fake.refused();
    assert_eventually!(fake.refused() > refused, "requests refused");
    assert!(fake.delete("v1", "Service", "shop", "api"));
    assert!(fake.delete("discovery.k8s.io/v1", "EndpointSlice", "shop", "api-1"));
    fake.apply(service("cart", "10.96.0.30"));
    fake.compact();
    fake.set_down(false);
    assert_eventually!(
        { names(&app, ResourceType::Listener) == ["svc/shop/cart/http@10.96.0.30", "svc/shop/web/http@10.96.0.10"] },
        "the relisted state"
    );
    assert!(fake.lists("services") > lists, "410 must force a relist");
    // Nothing doubled or left behind: exactly the cluster's Services have Clusters.
    assert_eq!(names(&app, ResourceType::Cluster), ["shop/cart/http", "shop/web/http"]);
    assert!(!dump(&app, None, ResourceType::ClusterLoadAssignment).contains("10.0.1.1"));
    app.stop().await;
}

#[tokio::test]
async fn dropped_connections_are_retried_with_backoff_and_resume() {
    let fake = FakeApi::new();
    cluster(&fake);
    let app = start(settings(fake.client(), None)).await;
    assert_eventually!(latest(&app).is_some(), "the first snapshot");
    let lists = fake.lists("services");
    fake.set_down(true);
    let refused = fake.refused();
    // Several attempts fail (backoff between them), the control plane keeps serving its last state.
    assert_eventually!(fake.refused() >= refused + 6, "retries while down");
    assert_eq!(names(&app, ResourceType::Listener), ["svc/shop/web/http@10.96.0.10"]);
    fake.apply(service("web", "10.96.0.11"));
    fake.set_down(false);
    assert_eventually!(
        { names(&app, ResourceType::Listener) == ["svc/shop/web/http@10.96.0.11"] },
        "the change made while down"
    );
    assert_eq!(fake.lists("services"), lists, "history was still there: resumed, not relisted");
    app.stop().await;
}

#[tokio::test]
async fn a_namespace_restriction_reads_only_that_namespace() {
    let fake = FakeApi::new();
    cluster(&fake);
    let mut elsewhere = service("web", "10.96.9.9");
    elsewhere["metadata"]["namespace"] = json!("other");
    fake.apply(elsewhere);
    let mut s = settings(fake.client(), None);
    s.namespace = Some("shop".into());
    let app = start(s).await;
    assert_eventually!(latest(&app).is_some(), "the first snapshot");
    assert_eq!(names(&app, ResourceType::Listener), ["svc/shop/web/http@10.96.0.10"]);
    for c in fake.calls() {
        let cluster_scoped = c.resource == "nodes" || c.resource == "ingressclasses";
        let want = if cluster_scoped { None } else { Some("shop") };
        assert_eq!(c.namespace.as_deref(), want, "{c:?}");
    }
    app.stop().await;
}

/// Two replicas, one Lease: fast timing (the Lease holds whole seconds) so a handover takes about two seconds.
fn status_settings(identity: &str) -> StatusSettings {
    let mut lease = LeaseSettings::new("mesh-control", LEASE_NS, identity);
    lease.lease_duration = Duration::from_secs(2);
    lease.renew_deadline = Duration::from_millis(1000);
    lease.retry_period = Duration::from_millis(100);
    StatusSettings {
        publish: Publish::Service(crate::model::NsName::new(LEASE_NS, "mesh-ingress")),
        lease,
        retry: Duration::from_millis(100),
    }
}

fn ingress_service(ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "mesh-ingress", "namespace": LEASE_NS},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.1.1", "ports": [{"name": "http", "port": 80}]},
        "status": {"loadBalancer": {"ingress": [{"ip": ip}]}}})
}

fn lb_status(fake: &FakeApi, name: &str) -> Value {
    fake.get("networking.k8s.io/v1", "Ingress", "shop", name)
        .and_then(|i| i.pointer("/status/loadBalancer/ingress").cloned())
        .unwrap_or(Value::Null)
}

fn holder(fake: &FakeApi) -> Option<String> {
    fake.get("coordination.k8s.io/v1", "Lease", LEASE_NS, "mesh-control")
        .and_then(|l| l.pointer("/spec/holderIdentity").and_then(Value::as_str).map(str::to_owned))
}

fn status_writers(fake: &FakeApi) -> BTreeSet<String> {
    fake.calls().into_iter().filter(|c| c.resource == "ingresses/status").map(|c| c.client).collect()
}

#[tokio::test]
async fn only_the_leader_writes_status_and_a_lease_not_renewed_hands_over() {
    let fake = FakeApi::new();
    cluster(&fake);
    fake.apply(ingress_service("203.0.113.7"));
    // Another controller's Ingress, with its status: never touched.
    fake.apply(class("nginx", "k8s.io/ingress-nginx"));
    let mut other = ingress("other", "nginx", "/", None);
    other["status"] = json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}});
    fake.apply(other);

    let (client_a, cut_a) = fake.partitioned_client("a");
    let (client_b, _cut_b) = fake.partitioned_client("b");
    let a = start(settings(client_a, Some(status_settings("a")))).await;
    assert_eventually!(a.leadership.as_ref().unwrap().is_leader(), "a leads");
    let b = start(settings(client_b, Some(status_settings("b")))).await;
    assert_eventually!(latest(&b).is_some(), "b serves too");
    assert!(!b.leadership.as_ref().unwrap().is_leader());
    assert_eq!(holder(&fake).as_deref(), Some("a"));

    // The leader writes the ingress Service's address on the Ingress we serve; the other one is left alone.
    assert_eventually!(lb_status(&fake, "shop") == json!([{"ip": "203.0.113.7"}]), "status written");
    assert_eq!(lb_status(&fake, "other"), json!([{"ip": "198.51.100.1"}]));
    // The load balancer's address changes: followed.
    fake.apply(ingress_service("203.0.113.8"));
    assert_eventually!(lb_status(&fake, "shop") == json!([{"ip": "203.0.113.8"}]), "status updated");
    // An Ingress moved to another class is cleared (it holds our address).
    fake.apply(ingress("moved", "mesh", "/m", None));
    assert_eventually!(lb_status(&fake, "moved") == json!([{"ip": "203.0.113.8"}]), "status of the new Ingress");
    let mut moved = fake.get("networking.k8s.io/v1", "Ingress", "shop", "moved").unwrap();
    moved["spec"]["ingressClassName"] = json!("nginx");
    fake.apply(moved);
    assert_eventually!(lb_status(&fake, "moved").is_null(), "status cleared");
    assert_eq!(status_writers(&fake), BTreeSet::from(["a".to_owned()]), "only the leader writes");

    // The leader is cut off: it cannot renew, steps down; after the lease duration b takes over and writes.
    cut_a.set(true);
    let cut_at = tokio::time::Instant::now();
    let both = || a.leadership.as_ref().unwrap().is_leader() && b.leadership.as_ref().unwrap().is_leader();
    assert_eventually!(
        {
            assert!(!both(), "two leaders");
            !a.leadership.as_ref().unwrap().is_leader()
        },
        "a steps down"
    );
    let stepped_down = cut_at.elapsed();
    assert_eventually!(
        {
            assert!(!both(), "two leaders");
            b.leadership.as_ref().unwrap().is_leader()
        },
        "b leads"
    );
    // a steps down after its renew deadline (1 s after its last renewal, which was at most one retry period,
    // stretched by a loaded machine, before the cut); b waits out the 2 s lease it last saw renewed.
    assert!(stepped_down >= Duration::from_millis(500), "a stepped down after {stepped_down:?}");
    assert!(cut_at.elapsed() >= Duration::from_secs(1), "b took over after {:?}", cut_at.elapsed());
    assert_eq!(holder(&fake).as_deref(), Some("b"));
    let lease = fake.get("coordination.k8s.io/v1", "Lease", LEASE_NS, "mesh-control").unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], 1, "{lease}");
    fake.apply(ingress("late", "mesh", "/late", None));
    assert_eventually!(lb_status(&fake, "late") == json!([{"ip": "203.0.113.8"}]), "b writes status");
    assert!(status_writers(&fake).contains("b"));
    // a comes back: b keeps renewing, a stays a follower and writes nothing more.
    cut_a.set(false);
    let writes_by_a = fake.calls().iter().filter(|c| c.client == "a" && c.resource == "ingresses/status").count();
    fake.apply(ingress("later", "mesh", "/later", None));
    assert_eventually!(lb_status(&fake, "later") == json!([{"ip": "203.0.113.8"}]), "b writes again");
    assert_eventually!(
        { fake.calls().iter().filter(|c| c.client == "a" && c.resource == "leases").count() > 0 },
        "a reads the Lease again"
    );
    assert!(!a.leadership.as_ref().unwrap().is_leader());
    assert_eq!(
        fake.calls().iter().filter(|c| c.client == "a" && c.resource == "ingresses/status").count(),
        writes_by_a
    );

    // b shuts down and releases the Lease: a takes it without waiting out the lease duration.
    b.stop().await;
    assert_eq!(holder(&fake), None, "released on shutdown");
    assert_eventually!(a.leadership.as_ref().unwrap().is_leader(), "a leads again");
    a.stop().await;

    check_rbac(&fake.calls());
}

/// The RBAC in `deploy/10-rbac.yaml` allows every call the control plane made, and grants nothing it did not use.
fn check_rbac(calls: &[ApiCall]) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/10-rbac.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let rbac = crate::testing::rbac::Rules::parse(&text, "mesh-control").unwrap();
    let unused = rbac.check(calls).unwrap_or_else(|e| panic!("{e}"));
    assert!(unused.is_empty(), "deploy/10-rbac.yaml grants what the control plane never calls: {unused:?}");
}

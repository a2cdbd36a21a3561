//! The real `mesh-control` binary against a real Kubernetes API server (etcd + kube-apiserver built from Go
//! modules by `tests/kube/build.sh`; see `mesh_tests::apiserver`): its watchers follow creates, updates and
//! deletes of every kind it reads; an API server restart and a broken connection resume with nothing lost or
//! doubled; a watch from a `resourceVersion` etcd has compacted away gets `410 Gone` and a relist.
//!
//! Skipped (saying why) when the binaries are not built, unless `MESH_REQUIRE_KUBE_APISERVER=1` (CI).

use std::time::Duration;

use anyhow::Context;
use mesh_tests::apiserver::{Gate, KubeApiServer, MeshControl, Options};
use mesh_tests::eventually;
use serde_json::{Value, json};

const CONVERGE: Duration = Duration::from_secs(30);

/// Waits until `check` accepts mesh-control's summary (see [`mesh_tests::apiserver::summarize`]); returns it.
async fn until(
    control: &MeshControl,
    what: &str,
    check: impl Fn(&[String]) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<String>> {
    eventually(CONVERGE, what, || async {
        let s = control.summary().await?;
        check(&s).map_err(|e| e.context(format!("mesh-control's summary:\n  {}", s.join("\n  "))))?;
        Ok(s)
    })
    .await
}

fn has(s: &[String], line: &str) -> anyhow::Result<()> {
    anyhow::ensure!(s.iter().any(|l| l == line), "no line {line:?}");
    Ok(())
}

fn lacks(s: &[String], needle: &str) -> anyhow::Result<()> {
    let found: Vec<&String> = s.iter().filter(|l| l.contains(needle)).collect();
    anyhow::ensure!(found.is_empty(), "lines with {needle:?} remain: {found:?}");
    Ok(())
}

/// The lines starting with `prefix`.
fn with<'a>(s: &'a [String], prefix: &str) -> Vec<&'a str> {
    s.iter().filter(|l| l.starts_with(prefix)).map(String::as_str).collect()
}

fn ingress_class() -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass", "metadata": {"name": "mesh"},
        "spec": {"controller": xds_proto::INGRESS_CONTROLLER}})
}

fn node(name: &str, zone: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}}})
}

fn service(ns: &str, name: &str, ports: &[(&str, u16, u16)]) -> Value {
    let ports: Vec<Value> =
        ports.iter().map(|(n, p, t)| json!({"name": n, "port": p, "targetPort": t, "protocol": "TCP"})).collect();
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
        "spec": {"type": "ClusterIP", "ports": ports}})
}

/// A slice of `service` with endpoints `(address, ready, node)` on `ports` `(name, port)`.
fn slice(ns: &str, name: &str, service: &str, ports: &[(&str, u16)], endpoints: &[(&str, bool, &str)]) -> Value {
    let ports: Vec<Value> = ports.iter().map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"})).collect();
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(a, ready, node)| json!({"addresses": [a], "conditions": {"ready": ready}, "nodeName": node}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "ports": ports, "endpoints": endpoints})
}

fn tls_secret(ns: &str, name: &str, host: &str) -> anyhow::Result<Value> {
    use base64::Engine as _;
    let b64 = |s: String| base64::engine::general_purpose::STANDARD.encode(s);
    let cert = rcgen::generate_simple_self_signed(vec![host.to_owned()])?;
    Ok(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns},
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": b64(cert.cert.pem()), "tls.key": b64(cert.signing_key.serialize_pem())}}))
}

/// An Ingress of class `class` (none: the default class decides) routing `host` `paths` `(path, service, port)`,
/// with TLS from `secret` when given.
fn ingress(
    ns: &str,
    name: &str,
    class: Option<&str>,
    host: &str,
    paths: &[(&str, &str, &str)],
    secret: Option<&str>,
) -> Value {
    let paths: Vec<Value> = paths
        .iter()
        .map(|(p, svc, port)| {
            json!({"path": p, "pathType": "Prefix", "backend": {"service": {"name": svc, "port": {"name": port}}}})
        })
        .collect();
    let mut spec = json!({"rules": [{"host": host, "http": {"paths": paths}}]});
    if let Some(c) = class {
        spec["ingressClassName"] = json!(c);
    }
    if let Some(s) = secret {
        spec["tls"] = json!([{"hosts": [host], "secretName": s}]);
    }
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": name, "namespace": ns},
        "spec": spec})
}

fn cluster_ip(obj: &kube::api::DynamicObject) -> anyhow::Result<String> {
    obj.data.pointer("/spec/clusterIP").and_then(Value::as_str).map(str::to_owned).context("no clusterIP allocated")
}

/// The value of a metric series of mesh-control (0 when absent).
async fn metric(control: &MeshControl, series: &str) -> anyhow::Result<f64> {
    Ok(control.metric(series).await?.unwrap_or(0.0))
}

async fn start_control(server: &KubeApiServer, name: &str) -> anyhow::Result<MeshControl> {
    let control = MeshControl::start(name, &server.admin_kubeconfig(), &[]).await?;
    eventually(CONVERGE, "mesh-control ready (every kind listed)", || async {
        anyhow::ensure!(control.ready().await, "not ready");
        Ok(())
    })
    .await?;
    Ok(control)
}

#[tokio::test]
async fn watchers_follow_creates_updates_and_deletes_of_every_kind() -> anyhow::Result<()> {
    let Some(server) =
        KubeApiServer::start_or_skip("watchers_follow_creates_updates_and_deletes_of_every_kind").await?
    else {
        return Ok(());
    };
    let ns = server.namespace("watch").await?;
    // Watching before anything exists: every object arrives as a watch event, not in the first list.
    let control = start_control(&server, "mesh-control").await?;
    let host = "shop.example.com";

    // --- creates ---
    server.apply(&ingress_class()).await?;
    server.apply(&node("node-a", "zone-1")).await?;
    let web = server.apply(&service(&ns, "web", &[("http", 80, 8080)])).await?;
    let ip = cluster_ip(&web)?;
    server.apply(&slice(&ns, "web-1", "web", &[("http", 8080)], &[("10.1.0.1", true, "node-a")])).await?;
    server.apply(&tls_secret(&ns, "shop-tls", host)?).await?;
    server.apply(&ingress(&ns, "shop", Some("mesh"), host, &[("/", "web", "http")], Some("shop-tls"))).await?;
    let created = until(&control, "every created kind in the snapshot", |s| {
        has(s, &format!("cds {ns}/web/http"))?;
        has(s, &format!("lds svc/{ns}/web/http@{ip}"))?;
        has(s, &format!("eds {ns}/web/http 10.1.0.1:8080 zone=zone-1 node=node-a HEALTHY"))?;
        anyhow::ensure!(
            s.iter().any(|l| l.starts_with("rds ingress/mesh ingress/https shop.example.com ")
                && l.ends_with(&format!("-> {ns}/web/http"))),
            "no https route for {host}"
        );
        anyhow::ensure!(with(s, &format!("sds ingress/mesh {ns}/shop-tls ")).len() == 1, "no SDS secret");
        Ok(())
    })
    .await?;
    let secret_line = with(&created, &format!("sds ingress/mesh {ns}/shop-tls "))[0].to_owned();

    // --- updates ---
    server.apply(&node("node-a", "zone-2")).await?;
    server.apply(&service(&ns, "web", &[("http", 80, 8080), ("metrics", 9090, 9090)])).await?;
    server
        .apply(&slice(
            &ns,
            "web-1",
            "web",
            &[("http", 8080), ("metrics", 9090)],
            &[("10.1.0.1", true, "node-a"), ("10.1.0.2", false, "node-a")],
        ))
        .await?;
    server.apply(&tls_secret(&ns, "shop-tls", host)?).await?; // a rotated certificate
    server
        .apply(&ingress(
            &ns,
            "shop",
            Some("mesh"),
            host,
            &[("/", "web", "http"), ("/metrics", "web", "metrics")],
            Some("shop-tls"),
        ))
        .await?;
    // IngressClass: becoming the default class brings in an Ingress that names no class.
    server.apply(&ingress(&ns, "plain", None, "plain.example.com", &[("/", "web", "http")], None)).await?;
    let mut class = ingress_class();
    class["metadata"]["annotations"] = json!({"ingressclass.kubernetes.io/is-default-class": "true"});
    server.apply(&class).await?;
    until(&control, "every update in the snapshot", |s| {
        has(s, &format!("cds {ns}/web/metrics"))?;
        has(s, &format!("eds {ns}/web/http 10.1.0.1:8080 zone=zone-2 node=node-a HEALTHY"))?;
        has(s, &format!("eds {ns}/web/http 10.1.0.2:8080 zone=zone-2 node=node-a UNHEALTHY"))?;
        has(s, &format!("eds {ns}/web/metrics 10.1.0.1:9090 zone=zone-2 node=node-a HEALTHY"))?;
        anyhow::ensure!(
            s.iter().any(|l| l.starts_with(&format!("rds ingress/mesh ingress/https {host} "))
                && l.contains("/metrics")
                && l.ends_with(&format!("-> {ns}/web/metrics"))),
            "no /metrics route"
        );
        anyhow::ensure!(
            s.iter().any(|l| l.starts_with("rds ingress/mesh ingress/http plain.example.com ")),
            "the class-less Ingress is not served by the default class"
        );
        let secret = with(s, &format!("sds ingress/mesh {ns}/shop-tls "));
        anyhow::ensure!(secret.len() == 1 && secret[0] != secret_line, "the Secret did not rotate: {secret:?}");
        Ok(())
    })
    .await?;

    // --- deletes ---
    server.delete("v1", "Secret", Some(&ns), "shop-tls").await?;
    until(&control, "the Secret gone", |s| lacks(s, &format!("sds ingress/mesh {ns}/shop-tls"))).await?;
    server.delete("networking.k8s.io/v1", "Ingress", Some(&ns), "shop").await?;
    server.delete("v1", "Node", None, "node-a").await?;
    server.delete("discovery.k8s.io/v1", "EndpointSlice", Some(&ns), "web-1").await?;
    until(&control, "the Ingress, Node and slice gone", |s| {
        lacks(s, host)?;
        lacks(s, "zone-2")?;
        lacks(s, &format!("eds {ns}/web/"))?;
        has(s, &format!("cds {ns}/web/http"))
    })
    .await?;
    server.delete("networking.k8s.io/v1", "IngressClass", None, "mesh").await?;
    server.delete("v1", "Service", Some(&ns), "web").await?;
    until(&control, "the IngressClass and Service gone", |s| {
        lacks(s, "plain.example.com")?;
        lacks(s, &format!("{ns}/web"))
    })
    .await?;

    // All of it by watch events after the one first list per kind: no relist, no failed watch.
    for kind in ["Service", "EndpointSlice", "Ingress", "IngressClass", "Secret", "Node"] {
        let lists = metric(&control, &format!("mesh_kube_lists_total{{kind=\"{kind}\"}}")).await?;
        anyhow::ensure!(lists == 1.0, "{kind} listed {lists} times");
        let errors = metric(&control, &format!("mesh_kube_watch_errors_total{{kind=\"{kind}\"}}")).await?;
        anyhow::ensure!(errors == 0.0, "{kind}: {errors} watch errors");
    }
    Ok(())
}

/// Objects of namespace `ns` a test keeps: the Service web with slices, and what the summary must show.
async fn seed(server: &KubeApiServer, ns: &str) -> anyhow::Result<String> {
    server.apply(&node("node-a", "zone-1")).await?;
    let web = server.apply(&service(ns, "web", &[("http", 80, 8080)])).await?;
    server.apply(&slice(ns, "web-1", "web", &[("http", 8080)], &[("10.1.0.1", true, "node-a")])).await?;
    server.apply(&slice(ns, "web-2", "web", &[("http", 8080)], &[("10.1.0.2", true, "node-a")])).await?;
    cluster_ip(&web)
}

/// What changes while mesh-control cannot see: a slice deleted, one changed, a Service and its slice created.
async fn change_behind_its_back(server: &KubeApiServer, ns: &str) -> anyhow::Result<()> {
    server.delete("discovery.k8s.io/v1", "EndpointSlice", Some(ns), "web-1").await?;
    server.apply(&slice(ns, "web-2", "web", &[("http", 8080)], &[("10.1.0.3", true, "node-a")])).await?;
    server.apply(&service(ns, "api", &[("grpc", 8080, 50051)])).await?;
    server.apply(&slice(ns, "api-1", "api", &[("grpc", 50051)], &[("10.2.0.1", true, "node-a")])).await?;
    Ok(())
}

/// After [`change_behind_its_back`]: exactly these endpoints of namespace `ns`, each once.
fn check_changed(s: &[String], ns: &str) -> anyhow::Result<()> {
    let eds = with(s, &format!("eds {ns}/"));
    let want = [
        format!("eds {ns}/api/grpc 10.2.0.1:50051 zone=zone-1 node=node-a HEALTHY"),
        format!("eds {ns}/web/http 10.1.0.3:8080 zone=zone-1 node=node-a HEALTHY"),
    ];
    anyhow::ensure!(eds == want, "endpoints {eds:?}, want exactly {want:?}");
    let cds = with(s, &format!("cds {ns}/"));
    let want = [format!("cds {ns}/api/grpc"), format!("cds {ns}/web/http")];
    anyhow::ensure!(cds == want, "clusters {cds:?}, want exactly {want:?}");
    Ok(())
}

#[tokio::test]
async fn an_api_server_restart_resumes_with_nothing_lost_or_doubled() -> anyhow::Result<()> {
    let Some(mut server) = KubeApiServer::start_or_skip("an_api_server_restart_resumes").await? else {
        return Ok(());
    };
    let ns = server.namespace("restart").await?;
    seed(&server, &ns).await?;
    let control = start_control(&server, "mesh-control").await?;
    until(&control, "both slices", |s| {
        anyhow::ensure!(with(s, "eds ").len() == 2, "not 2 endpoints");
        Ok(())
    })
    .await?;

    // A crash of the API server: mesh-control keeps serving what it had, and stays ready.
    server.kill_apiserver();
    let before = control.summary().await?;
    server.restart_apiserver().await?;
    anyhow::ensure!(control.ready().await, "mesh-control stopped being ready while the API server was down");
    anyhow::ensure!(control.summary().await? == before, "the snapshot changed while the API server was down");
    change_behind_its_back(&server, &ns).await?;
    until(&control, "the changes after the restart", |s| check_changed(s, &ns)).await?;
    Ok(())
}

#[tokio::test]
async fn a_compacted_resource_version_gives_410_and_a_relist_with_nothing_lost_or_doubled() -> anyhow::Result<()> {
    // Without the watch cache, a watch is served by etcd itself: resuming from a revision etcd compacted away is
    // answered 410 Gone, as it is on any server once its watch cache has moved past the revision.
    let options = Options { no_watch_cache: true };
    let Some(server) = KubeApiServer::start_or_skip_with("a_compacted_resource_version_gives_410", options).await?
    else {
        return Ok(());
    };
    let ns = server.namespace("compact").await?;
    seed(&server, &ns).await?;
    // mesh-control reaches the API server through a relay the test can cut.
    let gate = Gate::start(([127, 0, 0, 1], server.port()).into()).await?;
    let kubeconfig = server.write_file("relay.kubeconfig", &relay_kubeconfig(&server, &gate)?)?;
    // Debug logs of the watchers: a 410 that comes while a watch is already failing (here: the cut) is logged at
    // debug only, as "still failing".
    let control = MeshControl::start(
        "mesh-control",
        &kubeconfig,
        &["--log=info,mesh_control::source::kubernetes=debug,mesh_control::status=debug"],
    )
    .await?;
    until(&control, "both slices", |s| {
        anyhow::ensure!(with(s, "eds ").len() == 2, "not 2 endpoints");
        Ok(())
    })
    .await?;
    let lists_before = metric(&control, "mesh_kube_lists_total{kind=\"EndpointSlice\"}").await?;
    anyhow::ensure!(lists_before == 1.0, "listed {lists_before} times before the cut");

    // Cut: every watch breaks. Change things, then compact etcd past every revision mesh-control has seen.
    gate.close();
    change_behind_its_back(&server, &ns).await?;
    let revision = server.compact_etcd().await?;
    gate.open();

    // Its resumed watches get 410 and it relists (kube-runtime keeps the resourceVersion across connection
    // errors, and relists only on 410): the changes arrive, each endpoint once.
    until(&control, "the changes after the relist", |s| check_changed(s, &ns)).await?;
    let lists = metric(&control, "mesh_kube_lists_total{kind=\"EndpointSlice\"}").await?;
    anyhow::ensure!(
        lists == 2.0,
        "EndpointSlices listed {lists} times; a relist after the compaction (rev {revision}) expected"
    );
    let said_410 = control.process.lines().iter().any(|l| l.contains("code: 410") || l.contains("Expired"));
    anyhow::ensure!(said_410, "mesh-control logged no 410:\n{}", control.process.tail(40));
    Ok(())
}

/// The admin kubeconfig, pointed at the relay.
fn relay_kubeconfig(server: &KubeApiServer, gate: &Gate) -> anyhow::Result<String> {
    let admin = std::fs::read_to_string(server.admin_kubeconfig())?;
    Ok(admin.replace(&server.url(), &gate.url()))
}

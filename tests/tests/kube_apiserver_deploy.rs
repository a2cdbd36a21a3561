//! `deploy/` and `examples/` against a real Kubernetes API server (`mesh_tests::apiserver`):
//! - every manifest of `deploy/` is accepted as is (server-side apply, strict field validation);
//! - `deploy/`'s RBAC applied as is, and the real `mesh-control` run with its ServiceAccount's token (a
//!   TokenRequest): it lists and watches, takes the Lease, writes Ingress status and releases the Lease, and the
//!   server's audit log shows every one of its calls allowed, and every grant of the role used; calls outside
//!   its role are refused (403). So the RBAC is sufficient and not wider, as the server enforces it.
//! - `examples/shop` is accepted except for its loopback addresses (the local demo runs on 127.0.0.0/8, which a
//!   real cluster refuses in Service cluster IPs and EndpointSlices); with those moved into the cluster's ranges
//!   it is accepted, and `mesh-control` builds the same snapshot from the server as from the folder.
//!
//! Skipped (saying why) when the binaries are not built, unless `MESH_REQUIRE_KUBE_APISERVER=1` (CI).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use mesh_control::testing::fake::ApiCall;
use mesh_control::testing::rbac::Rules;
use mesh_tests::apiserver::{KubeApiServer, MeshControl, client_from_kubeconfig, summarize};
use mesh_tests::{Process, eventually, wait_for_line, workspace_bin};
use serde_json::{Value, json};

const CONVERGE: Duration = Duration::from_secs(30);
const ACCOUNT: &str = "system:serviceaccount:mesh-system:mesh-control";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// The YAML files of a folder, sorted.
fn yaml_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .map(|e| Ok(e?.path()))
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    Ok(files)
}

async fn apply_deploy(server: &KubeApiServer) -> anyhow::Result<usize> {
    let mut n = 0;
    for f in yaml_files(&repo("deploy"))? {
        let text = std::fs::read_to_string(&f)?;
        n += server.apply_yaml(&text, None).await.with_context(|| format!("{} refused", f.display()))?.len();
    }
    Ok(n)
}

#[tokio::test]
async fn deploy_manifests_are_accepted_as_they_are() -> anyhow::Result<()> {
    let Some(server) = KubeApiServer::start_or_skip("deploy_manifests_are_accepted_as_they_are").await? else {
        return Ok(());
    };
    let n = apply_deploy(&server).await?;
    anyhow::ensure!(n >= 15, "only {n} objects in deploy/");
    // Applying again (what a redeploy does) is accepted too.
    anyhow::ensure!(apply_deploy(&server).await? == n);
    Ok(())
}

/// One audit event as an RBAC call (`None` for non-resource requests such as discovery).
fn call(event: &Value) -> Option<ApiCall> {
    let o = event.get("objectRef")?;
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let resource = match s(o, "subresource") {
        Some(sub) => format!("{}/{sub}", s(o, "resource")?),
        None => s(o, "resource")?,
    };
    Some(ApiCall {
        verb: s(event, "verb")?,
        group: s(o, "apiGroup").unwrap_or_default(),
        resource,
        namespace: s(o, "namespace"),
        client: "default".into(),
    })
}

fn code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

#[tokio::test]
async fn deploy_rbac_allows_every_call_of_mesh_control_and_nothing_more() -> anyhow::Result<()> {
    let Some(server) = KubeApiServer::start_or_skip("deploy_rbac_allows_every_call_of_mesh_control").await? else {
        return Ok(());
    };
    apply_deploy(&server).await?;
    let admin = server.client();
    // No load-balancer controller here: the test gives the ingress Service its address.
    let lb = json!({"status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}});
    Api::<Service>::namespaced(admin.clone(), "mesh-system")
        .patch_status("mesh-ingress", &PatchParams::default(), &Patch::Merge(&lb))
        .await?;
    let ns = server.namespace("rbac").await?;
    let cert = rcgen::generate_simple_self_signed(vec!["shop.example.com".to_owned()])?;
    let (crt, key) = (cert.cert.pem(), cert.signing_key.serialize_pem());
    server
        .apply_yaml(
            &mesh_tests::manifests::join(&[
                mesh_tests::manifests::service_with_pods(
                    &ns,
                    "web",
                    "10.96.1.10".parse::<std::net::IpAddr>()?,
                    "http",
                    80,
                    8080,
                    &[mesh_tests::manifests::ReadyPod::new("web-a", [10, 1, 0, 1], "node-a")],
                ),
                mesh_tests::manifests::tls_secret(&ns, "shop-tls", &crt, &key),
                mesh_tests::manifests::shop_ingress(&ns, "shop.example.com", "plain.example.com", "shop-tls"),
            ]),
            Some(&ns),
        )
        .await?;

    // mesh-control with the ServiceAccount's token, as in its Pod.
    let token = server.service_account_token("mesh-system", "mesh-control").await?;
    let kubeconfig = server.write_file("mesh-control.kubeconfig", &server.token_kubeconfig(&token, None))?;
    let mut control = MeshControl::start(
        "mesh-control",
        &kubeconfig,
        &[
            "--publish-service=mesh-system/mesh-ingress",
            "--lease-namespace=mesh-system",
            "--identity=rbac-test",
            "--lease-duration-s=3",
        ],
    )
    .await?;
    eventually(CONVERGE, "mesh-control ready", || async {
        anyhow::ensure!(control.ready().await, "not ready");
        Ok(())
    })
    .await?;
    let ingresses: Api<Ingress> = Api::namespaced(admin.clone(), &ns);
    eventually(CONVERGE, "the Ingress status written", || async {
        let ing = ingresses.get("shop").await?;
        let lb = serde_json::to_value(ing.status.and_then(|s| s.load_balancer))?;
        anyhow::ensure!(lb == json!({"ingress": [{"ip": "203.0.113.7"}]}), "status {lb}");
        Ok(())
    })
    .await?;
    let leases: Api<Lease> = Api::namespaced(admin.clone(), "mesh-system");
    let holder = leases.get("mesh-control").await?.spec.and_then(|s| s.holder_identity);
    anyhow::ensure!(holder.as_deref() == Some("rbac-test"), "Lease holder {holder:?}");
    // The Ingress leaves our class: its status is cleared.
    let other = json!({"spec": {"ingressClassName": "someone-else"}});
    ingresses.patch("shop", &PatchParams::default(), &Patch::Merge(&other)).await?;
    eventually(CONVERGE, "the Ingress status cleared", || async {
        let ing = ingresses.get("shop").await?;
        let lb = ing.status.and_then(|s| s.load_balancer).and_then(|l| l.ingress).unwrap_or_default();
        anyhow::ensure!(lb.is_empty(), "status still {lb:?}");
        Ok(())
    })
    .await?;

    // SIGTERM: it releases the Lease (an update) and exits cleanly.
    control.process.terminate()?;
    let status = control.process.wait_exit(CONVERGE).await?;
    anyhow::ensure!(status.success(), "mesh-control exited with {status}");
    let holder = leases.get("mesh-control").await?.spec.and_then(|s| s.holder_identity);
    anyhow::ensure!(holder.is_none(), "the Lease was not released: {holder:?}");
    let log = control.process.lines();
    let refused: Vec<&String> =
        log.iter().filter(|l| l.contains("code: 403") || l.to_lowercase().contains("forbidden")).collect();
    anyhow::ensure!(refused.is_empty(), "mesh-control was refused something: {refused:?}");

    // The server's own record: every request of the account was allowed, and together they use every grant.
    let events: Vec<Value> = server
        .audit_events()?
        .into_iter()
        .filter(|e| e.pointer("/user/username").and_then(Value::as_str) == Some(ACCOUNT))
        .collect();
    anyhow::ensure!(!events.is_empty(), "no audit events of {ACCOUNT}");
    let denied: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e.pointer("/annotations/authorization.k8s.io~1decision").and_then(Value::as_str) != Some("allow")
                || e.pointer("/responseStatus/code").and_then(Value::as_u64) == Some(403)
        })
        .collect();
    anyhow::ensure!(denied.is_empty(), "requests of {ACCOUNT} denied: {denied:#?}");
    let mut calls: Vec<ApiCall> = events.iter().filter_map(call).collect();
    calls.sort();
    calls.dedup();
    let rbac = std::fs::read_to_string(repo("deploy/10-rbac.yaml"))?;
    let rules = Rules::parse(&rbac, "mesh-control")?;
    let unused = rules.check(&calls)?;
    anyhow::ensure!(
        unused.is_empty(),
        "deploy/10-rbac.yaml grants what mesh-control never used: {unused:?}\ncalls: {calls:#?}"
    );

    // With the same token, what the role does not grant is refused by the server.
    let sa = client_from_kubeconfig(&server.token_kubeconfig(&token, None)).await?;
    let forbidden = |what: &str, r: Result<(), kube::Error>| -> anyhow::Result<()> {
        match r {
            Err(e) if code(&e) == Some(403) => Ok(()),
            Err(e) => anyhow::bail!("{what}: refused, but not with 403: {e}"),
            Ok(()) => anyhow::bail!("{what}: allowed, but deploy/10-rbac.yaml does not grant it"),
        }
    };
    let lp = ListParams::default();
    forbidden("list pods", Api::<Pod>::all(sa.clone()).list(&lp).await.map(drop))?;
    forbidden("get a Secret", Api::<Secret>::namespaced(sa.clone(), &ns).get("shop-tls").await.map(drop))?;
    let spec = json!({"spec": {"ingressClassName": "mesh"}});
    forbidden(
        "patch an Ingress's spec",
        Api::<Ingress>::namespaced(sa.clone(), &ns)
            .patch("shop", &PatchParams::default(), &Patch::Merge(&spec))
            .await
            .map(drop),
    )?;
    forbidden(
        "delete a Service",
        Api::<Service>::namespaced(sa.clone(), &ns).delete("web", &Default::default()).await.map(drop),
    )?;
    let lease: Lease = serde_json::from_value(json!({"metadata": {"name": "elsewhere"}}))?;
    forbidden(
        "create a Lease outside mesh-system",
        Api::<Lease>::namespaced(sa.clone(), "default").create(&PostParams::default(), &lease).await.map(drop),
    )?;
    // ...and what it grants is allowed (the token works; the refusals above are RBAC's).
    Api::<Service>::all(sa.clone()).list(&lp).await.context("list Services with the token")?;
    Ok(())
}

/// examples/shop with its loopback addresses moved into the cluster's ranges: Service IPs into
/// 10.96.0.0/16 (the server's --service-cluster-ip-range), endpoints and load-balancer addresses into 10.x.
fn relocate(text: &str) -> String {
    text.replace("127.10.", "10.96.")
        .replace("127.20.", "10.20.")
        .replace("127.30.", "10.30.")
        .replace("127.40.", "10.40.")
}

#[tokio::test]
async fn examples_are_accepted_and_give_the_same_snapshot_as_the_folder() -> anyhow::Result<()> {
    let Some(server) = KubeApiServer::start_or_skip("examples_are_accepted").await? else {
        return Ok(());
    };
    let files = yaml_files(&repo("examples/shop"))?;
    let mut namespaces = std::collections::BTreeSet::new();
    for f in &files {
        for doc in mesh_tests::apiserver::documents(&std::fs::read_to_string(f)?)? {
            if let Some(ns) = doc.pointer("/metadata/namespace").and_then(Value::as_str) {
                namespaces.insert(ns.to_owned());
            }
        }
    }
    for ns in &namespaces {
        server.apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})).await?;
    }

    // As they are: the server refuses only the loopback addresses.
    let mut refusals = Vec::new();
    for f in &files {
        for doc in mesh_tests::apiserver::documents(&std::fs::read_to_string(f)?)? {
            if let Err(e) = server.apply(&doc).await {
                refusals.push(format!("{}: {e:#}", f.file_name().unwrap_or_default().to_string_lossy()));
            }
        }
    }
    for r in &refusals {
        anyhow::ensure!(
            r.contains("loopback") || r.contains("not in the valid range") || r.contains("127."),
            "examples/shop refused for something else than its loopback addresses: {r}"
        );
    }
    eprintln!("examples/shop as is: {} objects refused for loopback addresses", refusals.len());

    // Relocated: every object accepted, and the status of the LoadBalancer Service written as the example has it.
    let dir = tempfile::tempdir()?;
    for f in &files {
        let text = relocate(&std::fs::read_to_string(f)?);
        std::fs::write(dir.path().join(f.file_name().context("a file name")?), &text)?;
        for doc in mesh_tests::apiserver::documents(&text)? {
            server.apply(&doc).await.with_context(|| format!("{} (relocated) refused", f.display()))?;
            if doc["kind"] == "Service" && doc.get("status").is_some() {
                let ns = doc.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("default");
                let name = doc.pointer("/metadata/name").and_then(Value::as_str).context("a name")?;
                let status = json!({"status": doc["status"]});
                Api::<Service>::namespaced(server.client(), ns)
                    .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
                    .await?;
            }
        }
    }

    // The same objects, read from the server and from the folder, give the same snapshot.
    let from_server = MeshControl::start("mesh-control-kube", &server.admin_kubeconfig(), &[]).await?;
    let mut cmd = Command::new(workspace_bin("mesh-control")?);
    cmd.arg("--manifests").arg(dir.path()).args(["--xds-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"]);
    let mut folder = Process::spawn("mesh-control-folder", cmd)?;
    let line = wait_for_line(&mut folder, "mesh-control xds=", CONVERGE).await?;
    let folder_admin: std::net::SocketAddr = line.rsplit("admin=").next().context("admin")?.trim().parse()?;
    let want = eventually(CONVERGE, "the folder loaded", || async {
        let r = mesh_tests::http_get(folder_admin, "localhost", "/config_dump").await?;
        let dump: Value = serde_json::from_str(&r.body)?;
        anyhow::ensure!(dump["loaded"] == true, "not loaded");
        Ok(summarize(&dump))
    })
    .await?;
    anyhow::ensure!(want.iter().any(|l| l.starts_with("eds ")), "the folder gave no endpoints: {want:?}");
    eventually(CONVERGE, "the server's snapshot equals the folder's", || async {
        // The API server's own `kubernetes` Service is not in the folder.
        let got: Vec<String> =
            from_server.summary().await?.into_iter().filter(|l| !l.contains("default/kubernetes/")).collect();
        if got != want {
            let missing: Vec<&String> = want.iter().filter(|l| !got.contains(l)).collect();
            let extra: Vec<&String> = got.iter().filter(|l| !want.contains(l)).collect();
            anyhow::bail!("differs: missing {missing:#?}, extra {extra:#?}");
        }
        Ok(())
    })
    .await?;
    Ok(())
}

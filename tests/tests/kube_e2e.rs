//! The real `mesh-control` binary against the fake Kubernetes API served over HTTP on loopback, through a
//! kubeconfig: `--kubeconfig` loading, the initial list before readiness (probed with `meshctl probe`, as the
//! Deployment's exec probes do), a change flowing to the snapshot, Ingress status written by the elected
//! leader, the Lease released on SIGTERM, and every API call allowed by `deploy/10-rbac.yaml`.

use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use mesh_control::testing::fake::FakeApi;
use mesh_tests::{Process, eventually, wait_for_line, workspace_bin};
use serde_json::{Value, json};

const STARTUP: Duration = Duration::from_secs(30);
const CONVERGE: Duration = Duration::from_secs(20);

fn cluster(fake: &FakeApi) {
    fake.apply(json!({"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass", "metadata": {"name": "mesh"},
        "spec": {"controller": xds_proto::INGRESS_CONTROLLER}}));
    fake.apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}}));
    fake.apply(json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": "shop", "namespace": "shop"},
        "spec": {"ingressClassName": "mesh", "defaultBackend": {"service": {"name": "web", "port": {"number": 80}}}}}));
}

fn probe(meshctl: &std::path::Path, admin: &str) -> bool {
    Command::new(meshctl).args(["probe", &format!("http://{admin}/ready")]).output().is_ok_and(|o| o.status.success())
}

#[tokio::test]
async fn mesh_control_watches_a_cluster_through_a_kubeconfig() -> anyhow::Result<()> {
    let fake = FakeApi::new();
    cluster(&fake);
    // The Ingress Service stays failing until the test lets it list: the binary must not be ready before.
    fake.fail("ingresses", true);
    let (addr, _server) = fake.serve("127.0.0.1:0".parse()?).await?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, FakeApi::kubeconfig(addr))?;

    let mut cmd = Command::new(workspace_bin("mesh-control")?);
    cmd.arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--xds-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .args(["--publish-address", "203.0.113.9", "--lease-namespace", "mesh-system", "--identity", "e2e"])
        .args(["--lease-duration-s", "3"]);
    let mut control = Process::spawn("mesh-control", cmd)?;
    let line = wait_for_line(&mut control, "mesh-control xds=", STARTUP).await?;
    let admin = line.rsplit("admin=").next().context("admin address")?.trim().to_owned();
    let meshctl = workspace_bin("meshctl")?;

    eventually(CONVERGE, "the other kinds watched", || async {
        let watched =
            ["services", "endpointslices", "secrets", "nodes", "ingressclasses"].iter().all(|k| fake.watches(k) > 0);
        anyhow::ensure!(watched, "not yet");
        Ok(())
    })
    .await?;
    anyhow::ensure!(!probe(&meshctl, &admin), "ready before Ingresses were listed");
    fake.fail("ingresses", false);
    eventually(CONVERGE, "ready", || async {
        anyhow::ensure!(probe(&meshctl, &admin), "not ready");
        Ok(())
    })
    .await?;

    // The leader (the only replica) writes the Ingress status.
    eventually(CONVERGE, "Ingress status", || async {
        let ing = fake.get("networking.k8s.io/v1", "Ingress", "shop", "shop").context("the Ingress")?;
        let lb = ing.pointer("/status/loadBalancer/ingress").cloned().unwrap_or(Value::Null);
        anyhow::ensure!(lb == json!([{"ip": "203.0.113.9"}]), "status {lb}");
        Ok(())
    })
    .await?;
    let holder = |fake: &FakeApi| {
        fake.get("coordination.k8s.io/v1", "Lease", "mesh-system", "mesh-control")
            .and_then(|l| l.pointer("/spec/holderIdentity").and_then(Value::as_str).map(str::to_owned))
    };
    anyhow::ensure!(holder(&fake).as_deref() == Some("e2e"), "lease {:?}", holder(&fake));
    // What it did shows in /metrics.
    let metrics = mesh_tests::http_get(admin.parse()?, "localhost", "/metrics").await?.body;
    for want in [
        "mesh_leader 1",
        "mesh_kube_lists_total{kind=\"Ingress\"} 1",
        "mesh_ingress_status_writes_total{result=\"ok\"} 1",
    ] {
        anyhow::ensure!(metrics.contains(want), "/metrics lacks {want:?}:\n{metrics}");
    }
    let errors = metrics.lines().find(|l| l.starts_with("mesh_kube_watch_errors_total{kind=\"Ingress\"}"));
    anyhow::ensure!(errors.is_some_and(|l| !l.ends_with(" 0")), "the failed Ingress lists are counted: {errors:?}");

    // SIGTERM: the binary releases the Lease and exits cleanly.
    let pid = rustix::process::Pid::from_raw(i32::try_from(control.pid())?).context("a PID")?;
    rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
    eventually(CONVERGE, "exit", || {
        let status = control.exited();
        async move {
            let status = status.context("still running")?;
            anyhow::ensure!(status.success(), "exited with {status}");
            Ok(())
        }
    })
    .await?;
    anyhow::ensure!(holder(&fake).is_none(), "the Lease was not released: {:?}", holder(&fake));

    // Every call the binary made is allowed by deploy/'s RBAC, and every grant there was used.
    let rbac =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/10-rbac.yaml"))?;
    let rules = mesh_control::testing::rbac::Rules::parse(&rbac, "mesh-control")?;
    let unused = rules.check(&fake.calls())?;
    anyhow::ensure!(unused.is_empty(), "deploy/10-rbac.yaml grants what mesh-control never calls: {unused:?}");
    Ok(())
}

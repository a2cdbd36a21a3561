//! The manifests in `deploy/`: valid against the Kubernetes OpenAPI schemas (offline, with the
//! `kubernetes-validate` PyPI package), and consistent with the code (the IngressClass controller, the control
//! plane's Service, every binary in the image). The RBAC rules are checked against the API calls the control plane
//! really makes in control's own tests (`control/src/source/kubernetes/tests.rs`, `check_rbac`).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The Kubernetes version the manifests target (k8s-openapi's feature in control).
const KUBERNETES_VERSION: &str = "1.33.0";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/ exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    files
}

fn documents() -> Vec<Value> {
    let mut docs = Vec::new();
    for f in manifests() {
        let text = std::fs::read_to_string(&f).expect("readable manifest");
        for de in serde_yaml::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(de).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if !v.is_null() {
                docs.push(v);
            }
        }
    }
    docs
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("deploy/ has no {kind} {name}"))
}

/// The validator: `$MESH_KUBE_VALIDATE_BIN`, else `kubernetes-validate` on PATH, else `python3 -m
/// kubernetes_validate`.
fn validator() -> Option<Vec<String>> {
    if let Ok(bin) = std::env::var("MESH_KUBE_VALIDATE_BIN") {
        return Some(vec![bin]);
    }
    let works =
        |cmd: &[&str]| Command::new(cmd[0]).args(&cmd[1..]).arg("--version").output().is_ok_and(|o| o.status.success());
    if works(&["kubernetes-validate"]) {
        return Some(vec!["kubernetes-validate".into()]);
    }
    if works(&["python3", "-m", "kubernetes_validate"]) {
        return Some(vec!["python3".into(), "-m".into(), "kubernetes_validate".into()]);
    }
    None
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let Some(cmd) = validator() else {
        let reason = "kubernetes-validate not found (python3 -m pip install kubernetes-validate)";
        let required = std::env::var("MESH_REQUIRE_KUBE_VALIDATE").is_ok_and(|v| v == "1");
        assert!(!required, "{reason}, and MESH_REQUIRE_KUBE_VALIDATE=1 requires it");
        eprintln!("SKIPPED: {reason}");
        return;
    };
    let files = manifests();
    assert!(files.len() >= 5, "expected the deploy manifests, found {files:?}");
    let out = Command::new(&cmd[0])
        .args(&cmd[1..])
        .args(["--strict", "-k", KUBERNETES_VERSION])
        .args(&files)
        .output()
        .expect("the validator runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kubernetes-validate failed:\n{text}");
    // Every document was checked (an unknown kind would be a warning, not a pass).
    let passed = text.lines().filter(|l| l.contains(" passed for resource ")).count();
    assert_eq!(passed, documents().len(), "not every document passed:\n{text}");
}

#[test]
fn manifests_agree_with_the_code() {
    let docs = documents();
    // The IngressClass names our controller.
    let class = find(&docs, "IngressClass", xds_proto::DEFAULT_INGRESS_CLASS);
    assert_eq!(class["spec"]["controller"], xds_proto::INGRESS_CONTROLLER);

    // Two control replicas; the proxies and ingresses reach them through the control Service's xDS port.
    let control = find(&docs, "Deployment", "mesh-control");
    assert_eq!(control["spec"]["replicas"], 2);
    let svc = find(&docs, "Service", "mesh-control");
    let port = svc["spec"]["ports"][0]["port"].as_u64().expect("a port");
    let xds = format!("--xds=http://mesh-control.mesh-system.svc.cluster.local:{port}");
    for (kind, name) in [("DaemonSet", "mesh-proxy"), ("Deployment", "mesh-ingress")] {
        let args = &find(&docs, kind, name)["spec"]["template"]["spec"]["containers"][0]["args"];
        assert!(args.as_array().unwrap().iter().any(|a| a == xds.as_str()), "{name} args {args}");
    }

    // The node proxy: hostNetwork, the node name from the downward API, the capabilities it needs.
    let proxy = &find(&docs, "DaemonSet", "mesh-proxy")["spec"]["template"]["spec"];
    assert_eq!(proxy["hostNetwork"], true);
    let c = &proxy["containers"][0];
    assert!(
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "NODE_NAME" && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName")
    );
    assert_eq!(c["securityContext"]["capabilities"]["add"], serde_json::json!(["NET_ADMIN", "NET_BIND_SERVICE"]));

    // The ingress Service is the one control publishes into Ingress status.
    let ingress_svc = find(&docs, "Service", "mesh-ingress");
    assert_eq!(ingress_svc["spec"]["type"], "LoadBalancer");
    let args = &control["spec"]["template"]["spec"]["containers"][0]["args"];
    assert!(args.as_array().unwrap().iter().any(|a| a == "--publish-service=mesh-system/mesh-ingress"), "{args}");

    // Every workload has probes on its admin /ready and resource requests.
    for d in docs.iter().filter(|d| d["kind"] == "Deployment" || d["kind"] == "DaemonSet") {
        for c in d["spec"]["template"]["spec"]["containers"].as_array().unwrap() {
            for probe in ["readinessProbe", "livenessProbe"] {
                let p = c[probe].to_string();
                assert!(p.contains("/ready"), "{} {probe}: {p}", d["metadata"]["name"]);
            }
            assert!(c["resources"]["requests"]["cpu"].is_string(), "{} has no requests", d["metadata"]["name"]);
        }
    }
}

#[test]
fn the_image_builds_every_binary() {
    let dockerfile = std::fs::read_to_string(deploy_dir().join("Dockerfile")).expect("deploy/Dockerfile");
    assert!(dockerfile.contains("--workspace --bins"), "builds every binary");
    for bin in ["mesh-control", "meshctl", "mesh-proxy", "mesh-ingress"] {
        assert!(dockerfile.contains(&format!("target/release/{bin}")), "the image lacks {bin}");
    }
    // And the manifests only run binaries the image has.
    for d in documents() {
        for c in d["spec"]["template"]["spec"]["containers"].as_array().into_iter().flatten() {
            let cmd = c["command"][0].as_str().unwrap_or_default();
            let bin = cmd.rsplit('/').next().unwrap_or_default();
            assert!(dockerfile.contains(&format!("target/release/{bin}")), "{} runs {cmd}", d["metadata"]["name"]);
        }
    }
}

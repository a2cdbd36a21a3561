//! `meshctl` as a user runs it, on the example folder.

use std::path::PathBuf;
use std::process::Command;

use mesh_control::source::{load_dir, sync};
use mesh_control::store::Store;
use mesh_control::translate::{Options, Role, translate};
use xds_proto::types::ResourceType;

fn shop() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/shop")
}

fn meshctl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl")).args(args).output().expect("meshctl runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn routes_table_json_and_yaml() {
    let dir = shop();
    let dir = dir.to_str().unwrap();
    let (ok, text, err) = meshctl(&["routes", "--manifests", dir]);
    assert!(ok, "{err}");
    for want in [
        "SERVICE ADDRESSES (node proxy)",
        "127.10.0.10:80",
        "127.30.0.1:443",
        "*:30080",
        "INGRESS ROUTES (class mesh)",
        "shop.example.com",
        "redirect to https",
        "shop/web/http → 127.20.0.13:8080 terminating",
        "PROBLEMS\n(none)",
    ] {
        assert!(text.contains(want), "{want:?} missing from\n{text}");
    }
    let (ok, json, err) = meshctl(&["routes", "--manifests", dir, "-o", "json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(
        v["addresses"].as_array().unwrap().iter().any(|a| a["address"] == "127.10.0.53:53" && a["protocol"] == "UDP")
    );
    let (ok, yaml, err) = meshctl(&["routes", "--manifests", dir, "-o", "yaml"]);
    assert!(ok, "{err}");
    let y: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
    assert_eq!(y, v, "yaml and json say the same");
}

#[test]
fn snapshot_files_hold_exactly_what_the_role_is_sent() {
    let mut store = Store::new();
    sync(&mut store, &load_dir(&shop()).unwrap());
    let snap = translate(&store, &Options::default());
    for (flag, role) in [("proxy", Role::Proxy), ("ingress", Role::Ingress { class: "mesh".into() })] {
        let (ok, json, err) = meshctl(&["snapshot", "--manifests", shop().to_str().unwrap(), "--role", flag]);
        assert!(ok, "{err}");
        let (_, resources) = xds_proto::snapshot_file::from_json(&serde_json::from_str(&json).unwrap()).unwrap();
        let want = snap.role(&role);
        assert_eq!(resources.len(), want.len());
        for r in resources {
            assert_eq!(&r.body[..], &want.get(r.kind)[&r.name].body[..], "{} {}", r.kind, r.name);
        }
    }
    assert!(!snap.role(&Role::Proxy).get(ResourceType::Listener).is_empty());
}

#[test]
fn errors_are_clear() {
    let (ok, _, err) = meshctl(&["routes", "--manifests", "/nonexistent/folder"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/folder"), "{err}");
}

#[test]
fn routes_from_a_running_control_plane_match_the_offline_table() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = rt
        .block_on(mesh_control::app::build(mesh_control::app::Config {
            source: mesh_control::app::SourceConfig::Manifests {
                dir: shop(),
                debounce: std::time::Duration::from_millis(20),
            },
            translate: Options::default(),
            xds_addr: "127.0.0.1:0".parse().unwrap(),
            xds: Default::default(),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            logging: None,
        }))
        .unwrap();
    let control = format!("http://{}", app.xds_addr);
    let (ok, offline, err) = meshctl(&["routes", "--manifests", shop().to_str().unwrap(), "-o", "json"]);
    assert!(ok, "{err}");
    for protocol in ["delta", "sotw"] {
        let (ok, live, err) = meshctl(&["routes", "--control", &control, "--protocol", protocol, "-o", "json"]);
        assert!(ok, "{err}");
        let (offline, live): (serde_json::Value, serde_json::Value) =
            (serde_json::from_str(&offline).unwrap(), serde_json::from_str(&live).unwrap());
        assert_eq!(live["addresses"], offline["addresses"], "{protocol}");
        assert_eq!(live["ingress"], offline["ingress"], "{protocol}");
    }
    let (ok, _, err) = meshctl(&["routes", "--control", "http://127.0.0.1:1", "--timeout", "2"]);
    assert!(!ok);
    assert!(err.contains("127.0.0.1:1"), "{err}");
    rt.block_on(app.stop());
}

#[test]
fn problems_from_a_running_control_plane_match_the_offline_ones() {
    // The example plus objects that cannot be translated (a missing backend, a bad path, a Service port clash).
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(shop()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    std::fs::write(
        dir.path().join("broken.yaml"),
        r#"apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: broken, namespace: shop, creationTimestamp: "2030-01-01T00:00:00Z"}
spec:
  ingressClassName: mesh
  rules:
  - host: broken.example.com
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: nowhere, port: {number: 80}}}}
      - {path: relative, pathType: Prefix, backend: {service: {name: web, port: {name: http}}}}
"#,
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = rt
        .block_on(mesh_control::app::build(mesh_control::app::Config {
            source: mesh_control::app::SourceConfig::Manifests {
                dir: dir.path().to_owned(),
                debounce: std::time::Duration::from_millis(20),
            },
            translate: Options::default(),
            xds_addr: "127.0.0.1:0".parse().unwrap(),
            xds: Default::default(),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            logging: None,
        }))
        .unwrap();
    let control = format!("http://{}", app.xds_addr);
    let (ok, offline, err) = meshctl(&["routes", "--manifests", dir.path().to_str().unwrap(), "-o", "json"]);
    assert!(ok, "{err}");
    let offline: serde_json::Value = serde_json::from_str(&offline).unwrap();
    let problems = offline["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems.iter().any(|p| p.as_str().unwrap().contains("nowhere")), "{problems:?}");
    let (ok, live, err) = meshctl(&["routes", "--control", &control, "-o", "json"]);
    assert!(ok, "{err}");
    let live: serde_json::Value = serde_json::from_str(&live).unwrap();
    assert_eq!(live["problems"], offline["problems"]);
    // The table shows them the same way too.
    let (ok, text, err) = meshctl(&["routes", "--control", &control]);
    assert!(ok, "{err}");
    let (_, offline_text, _) = meshctl(&["routes", "--manifests", dir.path().to_str().unwrap()]);
    let tail = |t: &str| t[t.find("PROBLEMS").unwrap()..].to_owned();
    assert_eq!(tail(&text), tail(&offline_text));
    assert!(tail(&text).contains("Ingress shop/broken"), "{text}");
    rt.block_on(app.stop());
}

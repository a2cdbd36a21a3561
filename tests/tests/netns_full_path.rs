//! The whole path across network namespaces, with the real binaries and real xDS: two "nodes" each running
//! `mesh-proxy` (`--interface mesh0`, so Service addresses are local there and nowhere else), `mesh-ingress` in a
//! Pod on node-a, `mesh-control` in its own namespace serving everyone over ADS, Pods on both nodes, and a user
//! outside the nodes. Everything lives in 10.201.0.0/16, which exists only in these namespaces:
//!
//! ```text
//!                      lan: bridge br0, 10.201.0.0/24
//!   user    10.201.0.100 ─┤                      ├─ node-a 10.201.0.11  mesh-proxy, mesh0 ─┬─ ing    10.201.1.2  mesh-ingress
//!   control 10.201.0.2  ──┤  (mesh-control,      │                                         ├─ web-a1 10.201.1.6
//!                         │   xDS :18000)        │                                         └─ web-a2 10.201.1.10
//!                                                └─ node-b 10.201.0.12  mesh-proxy, mesh0 ─┬─ web-b1 10.201.2.2
//!                                                                                          ├─ api-b1 10.201.2.6
//!                                                                                          └─ api-b2 10.201.2.10
//! ```
//!
//! Each Pod hangs off its node on a /30 with its default route via the node; nodes forward, and route the other
//! node's Pod range (10.201.1.0/24 on node-a, 10.201.2.0/24 on node-b) across the LAN, as a cluster network
//! does. The user routes the LoadBalancer range 10.201.100.0/24 to node-a (what a cloud load balancer or
//! MetalLB does); ClusterIPs are in 10.201.96.0/24 and reachable only from Pods (via their node). Services:
//! `web` (web-a1, web-a2, web-b1), `api` (api-b1, api-b2: both on node-b), and the ingress's LoadBalancer
//! Service (80 → 8080, NodePort 30080; 443 → 8443) whose one endpoint is the ingress Pod.
//!
//! Shown: user → LB IP on node-a's proxy → ingress (plain HTTP) → `web`, every web Pod on both nodes reached;
//! user → NodePort on node-a and on node-b (the ingress Pod is on node-a: node-b's proxy crosses the LAN) →
//! ingress → `web`; user → LB IP:443 (TLS, SNI) → ingress → `/api` to both api Pods on node-b, the rest to
//! `web`; Pod web-a1 → `api` ClusterIP (on node-a's mesh0) → api Pods on node-b, seen coming from node-a;
//! Pod api-b1 → `web` ClusterIP (node-b's proxy) → web Pods on both nodes. Not shown: traffic policies
//! (`Local`), UDP across nodes, a Pod moving between nodes.
//!
//! The stand-in Pods are `meshctl up`'s demo Pods (`pod NS/NAME (local) answered … from PEER`), their sockets
//! made inside their namespaces by this process (see `mesh_tests::netns`); the binaries run inside theirs
//! (`ip netns exec`). Needs root; skips, saying why, otherwise (fails instead under `MESH_REQUIRE_NETNS=1`).
//! Needs `cargo build --workspace --bins` first.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use mesh_tests::manifests::{self, ReadyPod};
use mesh_tests::netns::{self, Netns};
use mesh_tests::{Process, Reply, eventually, http_get_on, wait_for_line, workspace_bin};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Every namespace is named `{PREFIX}{pid}-fp-{role}`; netns.rs uses the same prefix, so either cleans up
/// namespaces a killed run of the other left.
const PREFIX: &str = "meshe2e-";
const STARTUP: Duration = Duration::from_secs(60);
const CONVERGE: Duration = Duration::from_secs(60);
const CONNECT: Duration = Duration::from_secs(5);

const NS: &str = "fp";
const PLAIN_HOST: &str = "plain.fp.test";
const TLS_HOST: &str = "shop.fp.test";

const CONTROL: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
const XDS_PORT: u16 = 18000;
const NODE_A: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 11);
const NODE_B: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 12);
const USER: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 100);
const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 100, 1);
const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 96, 10);
const API_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 96, 20);
const INGRESS_SVC_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 96, 80);
const NODE_PORT: u16 = 30080;
/// Where every Pod (and the ingress, for HTTP) listens.
const POD_PORT: u16 = 8080;
const INGRESS_HTTPS: u16 = 8443;

/// A Pod: its name, its node (`a` or `b`), the /30 link's node side and Pod side.
struct PodSpec {
    name: &'static str,
    node: char,
    gateway: Ipv4Addr,
    ip: Ipv4Addr,
}

const fn pod(name: &'static str, node: char, third: u8, n: u8) -> PodSpec {
    PodSpec {
        name,
        node,
        gateway: Ipv4Addr::new(10, 201, third, 4 * n + 1),
        ip: Ipv4Addr::new(10, 201, third, 4 * n + 2),
    }
}

const INGRESS_POD: PodSpec = pod("ing", 'a', 1, 0);
const PODS: [PodSpec; 6] = [
    pod("web-a1", 'a', 1, 1),
    pod("web-a2", 'a', 1, 2),
    pod("web-b1", 'b', 2, 0),
    pod("api-b1", 'b', 2, 1),
    pod("api-b2", 'b', 2, 2),
    // Linked to node-a like the others, but it runs mesh-ingress instead of a demo Pod.
    INGRESS_POD,
];

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// The namespaces; each deletes itself on drop (also on panic).
struct Topology {
    lan: Netns,
    control: Netns,
    user: Netns,
    node_a: Netns,
    node_b: Netns,
    /// By name, in the order of [`PODS`].
    pods: Vec<Netns>,
}

impl Topology {
    fn new(tag: &str) -> anyhow::Result<Topology> {
        let ns = |role: &str| Netns::create(&format!("{tag}-{role}"));
        let t = Topology {
            lan: ns("lan")?,
            control: ns("control")?,
            user: ns("user")?,
            node_a: ns("node-a")?,
            node_b: ns("node-b")?,
            pods: PODS.iter().map(|p| ns(p.name)).collect::<anyhow::Result<_>>()?,
        };
        // The LAN: a bridge, and one port per member, whose side of the pair is `eth0` with a /24 address.
        t.lan.ip(&["link", "add", "br0", "type", "bridge"])?;
        t.lan.ip(&["link", "set", "br0", "up"])?;
        for (port, member, ip) in [
            ("control", &t.control, CONTROL),
            ("user", &t.user, USER),
            ("node-a", &t.node_a, NODE_A),
            ("node-b", &t.node_b, NODE_B),
        ] {
            t.lan.veth(port, member, "eth0")?;
            t.lan.ip(&["link", "set", port, "master", "br0"])?;
            member.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        }
        // Pods on their nodes; nodes forward and reach the other node's Pods across the LAN.
        for (spec, ns) in PODS.iter().zip(&t.pods) {
            let node = if spec.node == 'a' { &t.node_a } else { &t.node_b };
            node.link(&format!("to-{}", spec.name), spec.gateway, ns, spec.ip, "default")?;
        }
        t.node_a.forward_ipv4()?;
        t.node_b.forward_ipv4()?;
        t.node_a.ip(&["route", "add", "10.201.2.0/24", "via", &NODE_B.to_string()])?;
        t.node_b.ip(&["route", "add", "10.201.1.0/24", "via", &NODE_A.to_string()])?;
        // The control plane answers the ingress Pod; the user sends LoadBalancer traffic to node-a.
        t.control.ip(&["route", "add", "10.201.1.0/24", "via", &NODE_A.to_string()])?;
        t.control.ip(&["route", "add", "10.201.2.0/24", "via", &NODE_B.to_string()])?;
        t.user.ip(&["route", "add", "10.201.100.0/24", "via", &NODE_A.to_string()])?;
        Ok(t)
    }

    fn pod(&self, name: &str) -> &Netns {
        let i = PODS.iter().position(|p| p.name == name).expect("a Pod of PODS");
        &self.pods[i]
    }

    fn names(&self) -> Vec<String> {
        [&self.lan, &self.control, &self.user, &self.node_a, &self.node_b]
            .into_iter()
            .chain(&self.pods)
            .map(|n| n.name().to_owned())
            .collect()
    }
}

/// A Service with a ClusterIP and one slice of ready Pods (with their nodes).
fn service(name: &str, ip: Ipv4Addr, pods: &[&PodSpec]) -> String {
    let pods: Vec<ReadyPod> = pods.iter().map(|p| ReadyPod::new(p.name, p.ip, format!("node-{}", p.node))).collect();
    manifests::service_with_pods(NS, name, ip, "http", 80, POD_PORT, &pods)
}

/// The ingress's LoadBalancer Service and its Pod, our IngressClass, the TLS Secret and the Ingress.
fn ingress_side(cert_pem: &str, key_pem: &str) -> String {
    let ingress = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: mesh-ingress, namespace: mesh-system}}
spec:
  type: LoadBalancer
  clusterIP: {INGRESS_SVC_IP}
  clusterIPs: [{INGRESS_SVC_IP}]
  ports:
    - {{name: http, port: 80, protocol: TCP, targetPort: {POD_PORT}, nodePort: {NODE_PORT}}}
    - {{name: https, port: 443, protocol: TCP, targetPort: {INGRESS_HTTPS}, nodePort: 30443}}
status:
  loadBalancer:
    ingress: [{{ip: {LB_IP}, ipMode: VIP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: mesh-ingress-1
  namespace: mesh-system
  labels: {{kubernetes.io/service-name: mesh-ingress}}
addressType: IPv4
ports:
  - {{name: http, port: {POD_PORT}, protocol: TCP}}
  - {{name: https, port: {INGRESS_HTTPS}, protocol: TCP}}
endpoints:
  - addresses: [{ing}]
    conditions: {{ready: true, serving: true, terminating: false}}
    nodeName: node-a
    targetRef: {{kind: Pod, namespace: mesh-system, name: mesh-ingress-0}}
",
        ing = INGRESS_POD.ip,
    );
    manifests::join(&[
        ingress,
        manifests::ingress_class(),
        manifests::tls_secret(NS, "shop-tls", cert_pem, key_pem),
        manifests::shop_ingress(NS, TLS_HOST, PLAIN_HOST, "shop-tls"),
    ])
}

/// The demo Pods' serving tasks; aborted (their sockets closed) on drop.
struct Pods(Vec<JoinHandle<()>>);

impl Drop for Pods {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// The running cluster. Fields drop in order: the processes are killed first, then the Pods stop, then the
/// namespaces go (also when a test panics).
struct Cluster {
    procs: Vec<Process>,
    _pods: Pods,
    cert_pem: String,
    _dir: tempfile::TempDir,
    topo: Topology,
}

impl Cluster {
    async fn start(test: &str) -> anyhow::Result<Option<Cluster>> {
        if netns::skip() {
            return Ok(None);
        }
        let (control_bin, proxy_bin, ingress_bin) =
            (workspace_bin("mesh-control")?, workspace_bin("mesh-proxy")?, workspace_bin("mesh-ingress")?);
        Netns::remove_stale(PREFIX);
        let topo = Topology::new(&format!("{PREFIX}{}-fp-{test}", std::process::id()))?;

        let mut tasks = Vec::new();
        for (spec, ns) in PODS.iter().zip(&topo.pods).filter(|(p, _)| p.name != INGRESS_POD.name) {
            let l = ns.tcp_listener(sa(spec.ip, POD_PORT))?;
            l.set_nonblocking(true)?;
            let l = tokio::net::TcpListener::from_std(l)?;
            tasks.push(tokio::spawn(mesh_control::demo_pod::http_pod(l, format!("{NS}/{}", spec.name))));
        }
        let pods = Pods(tasks);

        let cert = rcgen::generate_simple_self_signed(vec![TLS_HOST.to_owned()])?;
        let (cert_pem, key_pem) = (cert.cert.pem(), cert.signing_key.serialize_pem());
        let dir = tempfile::Builder::new().prefix("mesh-netns-fp-").tempdir()?;
        let manifests = dir.path().join("manifests");
        std::fs::create_dir(&manifests)?;
        let by_name = |n: &str| PODS.iter().find(|p| p.name == n).expect("a Pod of PODS");
        let web: Vec<_> = ["web-a1", "web-a2", "web-b1"].into_iter().map(by_name).collect();
        let api: Vec<_> = ["api-b1", "api-b2"].into_iter().map(by_name).collect();
        std::fs::write(manifests.join("web.yaml"), service("web", WEB_IP, &web))?;
        std::fs::write(manifests.join("api.yaml"), service("api", API_IP, &api))?;
        std::fs::write(manifests.join("ingress.yaml"), ingress_side(&cert_pem, &key_pem))?;

        let xds = format!("http://{}", sa(CONTROL, XDS_PORT));
        let mut procs = Vec::new();
        let mut cmd = topo.control.command(&control_bin);
        cmd.arg("--manifests").arg(&manifests);
        cmd.args(["--xds-addr", &sa(CONTROL, XDS_PORT).to_string(), "--admin-addr", "127.0.0.1:0"]);
        cmd.env_remove("RUST_LOG");
        procs.push(Process::spawn("mesh-control", cmd)?);
        wait_for_line(procs.last_mut().expect("just pushed"), "mesh-control xds=", STARTUP).await?;
        for (name, ns) in [("node-a", &topo.node_a), ("node-b", &topo.node_b)] {
            ns.prepare_dummy("mesh0")?;
            let mut cmd = ns.command(&proxy_bin);
            cmd.args(["--xds", &xds, "--node", name, "--interface", "mesh0", "--admin-addr", "127.0.0.1:0"]);
            cmd.env_remove("RUST_LOG");
            procs.push(Process::spawn(&format!("mesh-proxy {name}"), cmd)?);
            wait_for_line(procs.last_mut().expect("just pushed"), "mesh-proxy admin=", STARTUP).await?;
        }
        let mut cmd = topo.pod(INGRESS_POD.name).command(&ingress_bin);
        cmd.args(["--xds", &xds, "--node", "mesh-ingress-0", "--admin-addr", "127.0.0.1:0", "--threads", "1"])
            .args(["--http-addr", &sa(INGRESS_POD.ip, POD_PORT).to_string()])
            .args(["--https-addr", &sa(INGRESS_POD.ip, INGRESS_HTTPS).to_string()]);
        cmd.env_remove("RUST_LOG");
        procs.push(Process::spawn("mesh-ingress", cmd)?);
        wait_for_line(procs.last_mut().expect("just pushed"), "mesh-ingress http=", STARTUP).await?;
        Ok(Some(Cluster { procs, _pods: pods, cert_pem, _dir: dir, topo }))
    }

    fn check_running(&mut self) -> anyhow::Result<()> {
        self.procs.iter_mut().try_for_each(Process::check_running)
    }

    /// Kills the processes, stops the Pods, deletes the namespaces, and checks none is left.
    fn stop(self) {
        let names = self.topo.names();
        drop(self);
        for n in names {
            assert!(!Path::new("/run/netns").join(&n).exists(), "namespace {n} survived its guard");
        }
    }
}

/// `GET path` with `host`, from inside `ns`, over plain HTTP.
async fn get(ns: &Netns, to: SocketAddr, host: &str, path: &str) -> anyhow::Result<Reply> {
    let s = ns.connect(to, CONNECT).await?;
    http_get_on(s, host, path).await.with_context(|| format!("via {to} from {}", ns.name()))
}

/// `GET path` over TLS (SNI `host`, trusting only `root_pem`), from inside `ns`.
async fn get_tls(ns: &Netns, to: SocketAddr, host: &str, path: &str, root_pem: &str) -> anyhow::Result<Reply> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp: TcpStream = ns.connect(to, CONNECT).await?;
    let name = rustls_pki_types::ServerName::try_from(host.to_owned())?;
    let tls = tokio::time::timeout(CONNECT, tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp))
        .await
        .context("TLS handshake timed out")?
        .context("TLS handshake")?;
    http_get_on(tls, host, path).await.with_context(|| format!("via {to} (TLS) from {}", ns.name()))
}

/// Which Pod answered (`pod fp/NAME (…) answered … from PEER`), and the address it saw the connection from.
fn answered_by(r: &Reply) -> anyhow::Result<(String, IpAddr)> {
    anyhow::ensure!(r.status == 200, "status {}: {}", r.status, r.body);
    let name = r
        .body
        .strip_prefix(&format!("pod {NS}/"))
        .and_then(|b| b.split_whitespace().next())
        .with_context(|| format!("not a demo Pod's answer: {:?}", r.body))?;
    let peer: SocketAddr = r
        .body
        .trim_end()
        .rsplit_once(" from ")
        .and_then(|(_, p)| p.parse().ok())
        .with_context(|| format!("no peer in {:?}", r.body))?;
    Ok((name.to_owned(), peer.ip()))
}

/// Asks `ask` until the answers have come from every one of `want` (and only from them); returns, per Pod, the
/// peer address it saw.
async fn reaches_all<F, Fut>(what: &str, want: &[&str], ask: F) -> anyhow::Result<BTreeSet<(String, IpAddr)>>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Reply>>,
{
    let want: BTreeSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
    let seen = Mutex::new(BTreeSet::new());
    eventually(CONVERGE, what, || async {
        let (pod, peer) = answered_by(&ask().await?)?;
        anyhow::ensure!(want.contains(&pod), "answered by {pod}, not one of {want:?}");
        let mut seen = seen.lock().expect("not poisoned");
        seen.insert((pod, peer));
        let names: BTreeSet<String> = seen.iter().map(|(n, _)| n.clone()).collect();
        anyhow::ensure!(names == want, "only {names:?} so far");
        Ok(())
    })
    .await?;
    Ok(seen.into_inner().expect("not poisoned"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_to_pods_on_two_nodes_through_lb_nodeport_ingress_tls_and_pod_to_cluster_ip() -> anyhow::Result<()> {
    let Some(mut cluster) = Cluster::start("path").await? else { return Ok(()) };
    if let Err(e) = full_path(&mut cluster).await {
        // Panic while everything runs: each process's guard prints its output as it drops.
        panic!("{e:?}");
    }
    cluster.stop();
    Ok(())
}

async fn full_path(c: &mut Cluster) -> anyhow::Result<()> {
    let t = &c.topo;
    let web = ["web-a1", "web-a2", "web-b1"];
    let api = ["api-b1", "api-b2"];

    // Each node's proxy holds the Service addresses on its own mesh0 (and the user holds none of them).
    for node in [&t.node_a, &t.node_b] {
        eventually(CONVERGE, &format!("{} has the Service addresses on mesh0", node.name()), || async {
            let shown = node.ip(&["-o", "addr", "show", "dev", "mesh0"])?;
            for ip in [WEB_IP, API_IP, INGRESS_SVC_IP, LB_IP] {
                anyhow::ensure!(shown.contains(&format!("inet {ip}/32")), "no {ip} on mesh0: {shown}");
            }
            Ok(())
        })
        .await?;
    }

    // User → LB IP (node-a's proxy) → ingress Pod → web, on both nodes. The web Pods see the ingress Pod's
    // address: routed, not proxied again or translated on the way.
    let lb_http = sa(LB_IP, 80);
    let seen = reaches_all("plain HTTP through the LB IP reaches every web Pod", &web, || {
        get(&t.user, lb_http, PLAIN_HOST, "/")
    })
    .await?;
    for (pod, peer) in &seen {
        anyhow::ensure!(*peer == IpAddr::V4(INGRESS_POD.ip), "{pod} saw the request come from {peer}");
    }

    // User → NodePort on either node → ingress (on node-a) → web.
    for node in [NODE_A, NODE_B] {
        let r = get(&t.user, sa(node, NODE_PORT), PLAIN_HOST, "/np").await?;
        let (pod, _) = answered_by(&r).with_context(|| format!("NodePort on {node}"))?;
        anyhow::ensure!(web.contains(&pod.as_str()), "NodePort on {node} answered by {pod}");
    }

    // User → LB IP:443 (TLS, SNI) → ingress → /api to both api Pods (node-b); the path reaches them unchanged.
    let lb_https = sa(LB_IP, 443);
    let cert = c.cert_pem.clone();
    reaches_all("TLS through the LB IP reaches both api Pods", &api, || async {
        let r = get_tls(&t.user, lb_https, TLS_HOST, "/api/orders?id=7", &cert).await?;
        anyhow::ensure!(r.body.contains("GET /api/orders?id=7"), "{}", r.body);
        Ok(r)
    })
    .await?;
    let (pod, _) = answered_by(&get_tls(&t.user, lb_https, TLS_HOST, "/", &cert).await?)?;
    anyhow::ensure!(web.contains(&pod.as_str()), "TLS / answered by {pod}");
    // Plain HTTP to the TLS host is redirected to HTTPS (the Ingress asks for it: mesh.dev/ssl-redirect).
    let r = get(&t.user, lb_http, TLS_HOST, "/cart").await?;
    anyhow::ensure!(matches!(r.status, 301 | 302 | 307 | 308), "status {}: {}", r.status, r.body);

    // Pod → ClusterIP → Pod on the other node: web-a1's node-a proxy sends to the api Pods on node-b, which
    // see node-a's LAN address.
    let from_a = t.pod("web-a1");
    let seen = reaches_all("web-a1 reaches both api Pods through the api ClusterIP", &api, || {
        get(from_a, sa(API_IP, 80), "api", "/internal")
    })
    .await?;
    for (pod, peer) in &seen {
        anyhow::ensure!(*peer == IpAddr::V4(NODE_A), "{pod} saw the connection come from {peer}, not node-a");
    }
    // And the other way: api-b1 through node-b's proxy to the web Pods on both nodes.
    let from_b = t.pod("api-b1");
    reaches_all("api-b1 reaches every web Pod through the web ClusterIP", &web, || {
        get(from_b, sa(WEB_IP, 80), "web", "/internal")
    })
    .await?;
    // The user, outside the cluster, has no route to a ClusterIP.
    anyhow::ensure!(
        t.user.connect(sa(WEB_IP, 80), Duration::from_secs(1)).await.is_err(),
        "the user reached a ClusterIP"
    );
    c.check_running()
}

//! `mesh-proxy` end to end, in process: `mesh-control` reads a manifest folder (Services, EndpointSlices) and
//! serves it over real xDS (Delta ADS on 127.0.0.1) to `mesh-proxy` (node `node-a`, zone `zone-a`), which
//! carries TCP and UDP from Service addresses to stand-in Pods: echo servers on their own 127.61.x.y addresses
//! that name themselves in every answer. Each test owns a /24 in each range (its number `t`):
//!
//! | range | what |
//! |---|---|
//! | `127.61.t.0/24` | Pod endpoints (echo servers) |
//! | `127.62.t.0/24` | ClusterIPs |
//! | `127.63.t.0/24` | LoadBalancer ingress IPs |
//! | `127.64.t.0/24` | client source addresses |
//!
//! NodePorts and health check ports listen on `0.0.0.0` and are reached on 127.0.0.1; the ports the manifests
//! name come from [`free_port`] (UDP Pods bind port 0). Balancing is least-connections (power of two choices), which is random when
//! endpoints are equally loaded; to stay deterministic, tests that look at where connections go *hold*
//! connections open: with one endpoint busy, the next connection always goes to the idle one (of two).
//!
//! Waiting is on conditions only: the proxy's admin `/config_dump` (the table in force) and its `listening`
//! channel (the sockets bound), polled with a bound.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use mesh_proxy::app::{self as proxy, Source};
use mesh_proxy::state::DataConfig;
use mesh_proxy::table::{ListenKey, Protocol};
use mesh_tests::l4::{ask_once, udp_ask};
use mesh_tests::{Conn, TcpEcho, UdpEcho, eventually, free_port, http_get};
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UdpSocket};

/// The namespace of every object.
const NS: &str = "e2e";
/// The proxy's node and zone.
const NODE: &str = "node-a";
const ZONE: &str = "zone-a";
/// How long a change may take to reach the proxy (the folder is re-read after a 20 ms quiet period and pushed
/// at once; the rest is slack for a loaded 2-core machine; polls return as soon as the condition holds).
const CONVERGE: Duration = Duration::from_secs(30);
/// How soon a refused connection must be reset: the proxy resets right after accepting.
const PROMPT: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------------------------
// Addresses, manifests, the folder.

fn pod_ip(t: u8, i: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 61, t, i)
}
fn cluster_ip(t: u8, i: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 62, t, i)
}
fn lb_ip(t: u8, i: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 63, t, i)
}
fn client_ip(t: u8, i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 64, t, i))
}

/// A port free for TCP on every one of `ips` (each test owns its addresses, so only wildcard listeners of
/// other processes could take it).
fn port_on(ips: &[IpAddr]) -> anyhow::Result<u16> {
    for _ in 0..100 {
        let p = free_port(ips[0])?;
        if ips[1..].iter().all(|ip| std::net::TcpListener::bind(SocketAddr::new(*ip, p)).is_ok()) {
            return Ok(p);
        }
    }
    anyhow::bail!("no port free on all of {ips:?}")
}

/// TCP echo Pods named `names`, at `127.61.t.1`, `.2`, … all on one port (an EndpointSlice has one port for
/// all its endpoints).
async fn tcp_pods(t: u8, names: &[&str]) -> anyhow::Result<Vec<TcpEcho>> {
    'again: for _ in 0..100 {
        let port = free_port(IpAddr::V4(pod_ip(t, 1)))?;
        let mut pods = Vec::new();
        for (i, name) in (1u8..).zip(names) {
            match TcpEcho::start(name, SocketAddr::new(IpAddr::V4(pod_ip(t, i)), port)).await {
                Ok(p) => pods.push(p),
                Err(_) => continue 'again,
            }
        }
        return Ok(pods);
    }
    anyhow::bail!("no common free port for the Pods of test {t}")
}

/// An endpoint's conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// `ready: true`.
    Ready,
    /// `ready: false, serving: true, terminating: true`.
    Terminating,
    /// `ready: false, serving: false`.
    NotReady,
}

impl State {
    /// How the proxy's `/config_dump` shows it.
    fn dumped(self) -> &'static str {
        match self {
            State::Ready => "Ready",
            State::Terminating => "Terminating",
            State::NotReady => "NotReady",
        }
    }
}

/// One endpoint of a slice.
#[derive(Debug, Clone, Copy)]
struct Ep {
    addr: SocketAddr,
    node: &'static str,
    state: State,
}

fn ep(addr: SocketAddr, node: &'static str, state: State) -> Ep {
    Ep { addr, node, state }
}

/// A Service with one port named `echo` whose `targetPort` is resolved by name from its EndpointSlices.
#[derive(Debug, Clone)]
struct Svc {
    name: &'static str,
    /// `ClusterIP`, `NodePort` or `LoadBalancer`.
    kind: &'static str,
    cluster_ip: Ipv4Addr,
    port: u16,
    /// `TCP` or `UDP`.
    protocol: &'static str,
    node_port: Option<u16>,
    lb_ip: Option<Ipv4Addr>,
    /// More `spec` fields, each line indented two spaces.
    extra: String,
}

impl Svc {
    fn cluster_ip(name: &'static str, ip: Ipv4Addr, port: u16) -> Svc {
        Svc {
            name,
            kind: "ClusterIP",
            cluster_ip: ip,
            port,
            protocol: "TCP",
            node_port: None,
            lb_ip: None,
            extra: String::new(),
        }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.cluster_ip), self.port)
    }

    /// The xDS cluster (and `/config_dump` cluster) name.
    fn cluster(&self) -> String {
        format!("{NS}/{}/echo", self.name)
    }

    /// `namespace/name`, as metrics label it.
    fn service(&self) -> String {
        format!("{NS}/{}", self.name)
    }

    fn yaml(&self) -> String {
        let node_port = self.node_port.map(|p| format!("      nodePort: {p}\n")).unwrap_or_default();
        let status = self
            .lb_ip
            .map(|ip| format!("status:\n  loadBalancer:\n    ingress:\n      - ip: {ip}\n"))
            .unwrap_or_default();
        format!(
            r#"apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {NS}
  creationTimestamp: "2024-01-01T00:00:00Z"
spec:
  type: {kind}
  clusterIP: {ip}
  clusterIPs: [{ip}]
  selector:
    app: {name}
{extra}  ports:
    - name: echo
      port: {port}
      protocol: {protocol}
      targetPort: echo
{node_port}{status}"#,
            name = self.name,
            kind = self.kind,
            ip = self.cluster_ip,
            extra = self.extra,
            port = self.port,
            protocol = self.protocol,
        )
    }

    /// The Service's one EndpointSlice, with `eps` (all on the same port).
    fn slice(&self, eps: &[Ep]) -> String {
        let port = eps.first().map_or(1, |e| e.addr.port());
        let mut endpoints = String::new();
        for e in eps {
            let (ready, serving, terminating) = match e.state {
                State::Ready => (true, true, false),
                State::Terminating => (false, true, true),
                State::NotReady => (false, false, false),
            };
            let zone = if e.node == NODE { ZONE } else { "zone-b" };
            endpoints.push_str(&format!(
                "  - addresses: [{ip}]\n    conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}\n    nodeName: {node}\n    zone: {zone}\n",
                ip = e.addr.ip(),
                node = e.node,
            ));
        }
        if eps.is_empty() {
            endpoints.push_str("  []\n");
        }
        format!(
            r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: {NS}
  labels:
    kubernetes.io/service-name: {name}
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
addressType: IPv4
ports:
  - name: echo
    port: {port}
    protocol: {protocol}
endpoints:
{endpoints}"#,
            name = self.name,
            protocol = self.protocol,
        )
    }
}

/// The manifest folder, and a place to stage edits so each lands as one atomic rename.
struct Folder {
    root: tempfile::TempDir,
}

impl Folder {
    fn new() -> anyhow::Result<Folder> {
        let root = tempfile::Builder::new().prefix("mesh-proxy-e2e-").tempdir()?;
        std::fs::create_dir(root.path().join("manifests"))?;
        std::fs::create_dir(root.path().join("staging"))?;
        Ok(Folder { root })
    }

    fn manifests(&self) -> PathBuf {
        self.root.path().join("manifests")
    }

    /// Writes (or replaces) `name` atomically: the watcher never sees half a file.
    fn write(&self, name: &str, text: &str) -> anyhow::Result<()> {
        let staged = self.root.path().join("staging").join(name);
        std::fs::write(&staged, text)?;
        std::fs::rename(&staged, self.manifests().join(name))?;
        Ok(())
    }

    /// Writes a Service and its slice (`{name}.yaml`, `{name}-slice.yaml`).
    fn service(&self, svc: &Svc, eps: &[Ep]) -> anyhow::Result<()> {
        self.write(&format!("{}.yaml", svc.name), &svc.yaml())?;
        self.slice(svc, eps)
    }

    /// Replaces a Service's slice.
    fn slice(&self, svc: &Svc, eps: &[Ep]) -> anyhow::Result<()> {
        self.write(&format!("{}-slice.yaml", svc.name), &svc.slice(eps))
    }
}

// ---------------------------------------------------------------------------------------------------------
// The control plane and the proxy.

fn control_config(manifests: &Path, xds_addr: SocketAddr) -> mesh_control::app::Config {
    mesh_control::app::Config {
        source: mesh_control::app::SourceConfig::Manifests {
            dir: manifests.to_owned(),
            debounce: Duration::from_millis(20),
        },
        translate: mesh_control::translate::Options::default(),
        xds_addr,
        xds: mesh_control::xds::XdsConfig::default(),
        admin_addr: "127.0.0.1:0".parse().expect("an address"),
        logging: None,
    }
}

fn proxy_config(source: Source) -> proxy::Config {
    proxy::Config {
        source,
        node: NODE.into(),
        zone: Some(ZONE.into()),
        admin_addr: "127.0.0.1:0".parse().expect("an address"),
        data: DataConfig::default(),
        interface: None,
        logging: None,
        state_dir: None,
    }
}

fn xds(addr: SocketAddr) -> Source {
    Source::Xds { endpoint: format!("http://{addr}"), protocol: xds_proto::client::Protocol::Delta }
}

/// mesh-control on a manifest folder feeding a mesh-proxy over xDS.
struct Mesh {
    proxy: proxy::App,
    control: mesh_control::app::App,
    folder: Folder,
}

impl Mesh {
    /// Starts both on `folder` and waits until the proxy is ready (its first snapshot accepted).
    async fn start(folder: Folder) -> anyhow::Result<Mesh> {
        let control = mesh_control::app::build(control_config(&folder.manifests(), "127.0.0.1:0".parse()?))
            .await
            .context("starting mesh-control")?;
        let proxy = proxy::build(proxy_config(xds(control.xds_addr))).await.context("starting mesh-proxy")?;
        wait_ready(proxy.admin_addr).await?;
        Ok(Mesh { proxy, control, folder })
    }
}

async fn wait_ready(admin: SocketAddr) -> anyhow::Result<()> {
    eventually(CONVERGE, "mesh-proxy /ready is 200", || async {
        let r = http_get(admin, "localhost", "/ready").await?;
        anyhow::ensure!(r.status == 200, "status {}", r.status);
        Ok(())
    })
    .await
}

/// The proxy's `/config_dump`.
async fn dump(admin: SocketAddr) -> anyhow::Result<Value> {
    let r = http_get(admin, "localhost", "/config_dump").await?;
    anyhow::ensure!(r.status == 200, "/config_dump: status {}", r.status);
    Ok(serde_json::from_str(&r.body)?)
}

/// A cluster's endpoints in the proxy's table, as `(address, health)`.
fn endpoints_in(dump: &Value, cluster: &str) -> Option<BTreeSet<(String, String)>> {
    let c = dump["clusters"].as_array()?.iter().find(|c| c["name"] == cluster)?;
    Some(
        c["endpoints"]
            .as_array()?
            .iter()
            .map(|e| (e["address"].as_str().unwrap_or("").to_owned(), e["health"].as_str().unwrap_or("").to_owned()))
            .collect(),
    )
}

/// Waits until the proxy's table has exactly `want` as `cluster`'s endpoints.
async fn wait_endpoints(app: &proxy::App, cluster: &str, want: &[Ep]) -> anyhow::Result<()> {
    let want: BTreeSet<(String, String)> =
        want.iter().map(|e| (e.addr.to_string(), e.state.dumped().to_owned())).collect();
    eventually(CONVERGE, &format!("the proxy's table has {cluster} → {want:?}"), || async {
        let d = dump(app.admin_addr).await?;
        let got = endpoints_in(&d, cluster);
        anyhow::ensure!(got.as_ref() == Some(&want), "it has {got:?}");
        Ok(())
    })
    .await
}

/// Waits until the proxy listens on `addr`.
async fn wait_listening(app: &proxy::App, protocol: Protocol, addr: SocketAddr) -> anyhow::Result<()> {
    let key = ListenKey { protocol, addr };
    let mut rx = app.listening.clone();
    tokio::time::timeout(CONVERGE, rx.wait_for(|l| l.contains(&key)))
        .await
        .map_err(|_| anyhow::anyhow!("the proxy does not listen on {addr} ({protocol:?}) after {CONVERGE:?}"))?
        .map_err(|_| anyhow::anyhow!("the proxy's listener manager ended"))?;
    Ok(())
}

/// Waits until `svc` is fully in force: its endpoints in the table, its ClusterIP bound.
async fn wait_service(app: &proxy::App, svc: &Svc, eps: &[Ep]) -> anyhow::Result<()> {
    wait_endpoints(app, &svc.cluster(), eps).await?;
    let protocol = if svc.protocol == "UDP" { Protocol::Udp } else { Protocol::Tcp };
    wait_listening(app, protocol, svc.addr()).await
}

/// Opens `n` connections to `to`, one after another, each asked once (so each is counted on its endpoint
/// before the next is balanced), and keeps them open. Returns them with the endpoint of each.
async fn hold(to: SocketAddr, n: usize) -> anyhow::Result<(Vec<Conn>, Vec<String>)> {
    let (mut conns, mut names) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let mut c = Conn::open(to).await?;
        names.push(c.ask().await?.name);
        conns.push(c);
    }
    Ok((conns, names))
}

async fn close_all(conns: Vec<Conn>) -> anyhow::Result<()> {
    for c in conns {
        c.close().await?;
    }
    Ok(())
}

/// Connects to `to` and expects a reset (not a FIN, not a hang) within [`PROMPT`]; returns how long it took.
async fn expect_reset(to: SocketAddr) -> anyhow::Result<Duration> {
    let start = Instant::now();
    // The kernel completes the handshake before the proxy accepts: the refusal comes as a reset after it, which
    // on loopback may already be there when the connect completes.
    let mut s = match TcpStream::connect(to).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(start.elapsed()),
        Err(e) => return Err(e).with_context(|| format!("connect to {to}")),
    };
    let mut buf = [0u8; 256];
    match tokio::time::timeout(PROMPT, s.read(&mut buf)).await {
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(start.elapsed()),
        Ok(Err(e)) => anyhow::bail!("{to}: error {e} ({:?}), not a reset", e.kind()),
        Ok(Ok(0)) => anyhow::bail!("{to}: closed with a FIN, not a reset (looks like an empty answer)"),
        Ok(Ok(n)) => anyhow::bail!("{to}: got {:?}, not a reset", String::from_utf8_lossy(&buf[..n])),
        Err(_) => anyhow::bail!("{to}: no reset within {PROMPT:?}"),
    }
}

/// The value of a metric line `name{labels} value` in Prometheus text.
fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn metrics(admin: SocketAddr) -> anyhow::Result<String> {
    let r = http_get(admin, "localhost", "/metrics").await?;
    anyhow::ensure!(r.status == 200, "/metrics: status {}", r.status);
    Ok(r.body)
}

fn names(v: &[String]) -> BTreeSet<&str> {
    v.iter().map(String::as_str).collect()
}

// ---------------------------------------------------------------------------------------------------------
// The tests.

/// (a) A ClusterIP reaches the Service's endpoints, and both of them get connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_ip_reaches_every_endpoint() -> anyhow::Result<()> {
    let t = 1;
    let pods = tcp_pods(t, &["a", "b"]).await?;
    let svc = Svc::cluster_ip("web", cluster_ip(t, 1), port_on(&[IpAddr::V4(cluster_ip(t, 1))])?);
    let eps = [ep(pods[0].addr(), NODE, State::Ready), ep(pods[1].addr(), "node-b", State::Ready)];
    let folder = Folder::new()?;
    folder.service(&svc, &eps)?;
    let m = Mesh::start(folder).await?;
    wait_service(&m.proxy, &svc, &eps).await?;

    // With the first connection held open on one endpoint, least-connections sends the second to the other.
    let (mut conns, got) = hold(svc.addr(), 2).await?;
    assert_eq!(names(&got), BTreeSet::from(["a", "b"]), "two held connections: one on each endpoint");
    // Both keep carrying data, and the Pods see the proxy's own connections, not the client's.
    for c in &mut conns {
        let a = c.ask().await?;
        assert_ne!(a.peer, c.local_addr(), "{a:?}");
    }
    close_all(conns).await?;
    // Connections one after another all land on one of the two.
    for _ in 0..10 {
        let a = ask_once(svc.addr()).await?;
        assert!(["a", "b"].contains(&a.name.as_str()), "{a:?}");
    }
    Ok(())
}

/// (b) A NodePort (`0.0.0.0:nodePort`, reached on 127.0.0.1) and a LoadBalancer ingress IP reach the endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_port_and_load_balancer_ip() -> anyhow::Result<()> {
    let t = 2;
    let pods = tcp_pods(t, &["np-pod", "lb-pod"]).await?;
    let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let np = Svc {
        kind: "NodePort",
        node_port: Some(free_port(any)?),
        ..Svc::cluster_ip("np", cluster_ip(t, 1), port_on(&[IpAddr::V4(cluster_ip(t, 1))])?)
    };
    let lb_port = port_on(&[IpAddr::V4(cluster_ip(t, 2)), IpAddr::V4(lb_ip(t, 1))])?;
    let lb = Svc {
        kind: "LoadBalancer",
        node_port: Some(free_port(any)?),
        lb_ip: Some(lb_ip(t, 1)),
        ..Svc::cluster_ip("lb", cluster_ip(t, 2), lb_port)
    };
    let (np_eps, lb_eps) = ([ep(pods[0].addr(), NODE, State::Ready)], [ep(pods[1].addr(), NODE, State::Ready)]);
    let folder = Folder::new()?;
    folder.service(&np, &np_eps)?;
    folder.service(&lb, &lb_eps)?;
    let m = Mesh::start(folder).await?;
    wait_service(&m.proxy, &np, &np_eps).await?;
    wait_service(&m.proxy, &lb, &lb_eps).await?;

    let node_port = |s: &Svc| s.node_port.expect("a NodePort");
    let lb_addr = SocketAddr::new(IpAddr::V4(lb_ip(t, 1)), lb.port);
    for (svc, want) in [(&np, "np-pod"), (&lb, "lb-pod")] {
        wait_listening(&m.proxy, Protocol::Tcp, SocketAddr::new(any, node_port(svc))).await?;
        let via_node = SocketAddr::from(([127, 0, 0, 1], node_port(svc)));
        for to in [svc.addr(), via_node] {
            let a = ask_once(to).await.with_context(|| format!("{} via {to}", svc.name))?;
            assert_eq!(a.name, want, "{} via {to}", svc.name);
        }
    }
    wait_listening(&m.proxy, Protocol::Tcp, lb_addr).await?;
    assert_eq!(ask_once(lb_addr).await?.name, "lb-pod", "the LoadBalancer ingress IP {lb_addr}");

    // The table names each address by its kind.
    let d = dump(m.proxy.admin_addr).await?;
    let kinds: BTreeMap<String, String> = d["listeners"]
        .as_array()
        .context("listeners")?
        .iter()
        .map(|l| (l["name"].as_str().unwrap_or("").to_owned(), l["kind"].as_str().unwrap_or("").to_owned()))
        .collect();
    let want: BTreeMap<String, String> = [
        (format!("svc/{NS}/np/echo@{}", np.cluster_ip), "ClusterIp"),
        (format!("svc/{NS}/np/echo@nodeport"), "NodePort"),
        (format!("svc/{NS}/lb/echo@{}", lb.cluster_ip), "ClusterIp"),
        (format!("svc/{NS}/lb/echo@nodeport"), "NodePort"),
        (format!("svc/{NS}/lb/echo@{}", lb_ip(t, 1)), "LoadBalancer"),
    ]
    .into_iter()
    .map(|(n, k)| (n, k.to_owned()))
    .collect();
    assert_eq!(kinds, want);
    Ok(())
}

/// (c) UDP through a ClusterIP: the request reaches the endpoint, and the reply comes back from the Service
/// address the client sent to (as conntrack's reverse NAT does), for every datagram of the flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_cluster_ip_replies_from_the_service_address() -> anyhow::Result<()> {
    let t = 3;
    let pod = UdpEcho::start("dns-pod", SocketAddr::new(IpAddr::V4(pod_ip(t, 1)), 0)).await?;
    let svc =
        Svc { protocol: "UDP", ..Svc::cluster_ip("dns", cluster_ip(t, 1), port_on(&[IpAddr::V4(cluster_ip(t, 1))])?) };
    let eps = [ep(pod.addr(), NODE, State::Ready)];
    let folder = Folder::new()?;
    folder.service(&svc, &eps)?;
    let m = Mesh::start(folder).await?;
    wait_service(&m.proxy, &svc, &eps).await?;

    let client = UdpSocket::bind(SocketAddr::new(client_ip(t, 1), 0)).await?;
    for i in 0..5 {
        let msg = format!("query-{i}");
        let (a, from) = udp_ask(&client, svc.addr(), &msg, PROMPT).await?;
        assert_eq!(a.name, "dns-pod");
        assert_eq!(from, svc.addr(), "the reply must come from the Service address the client sent to");
        assert_ne!(a.peer, client.local_addr()?, "the Pod sees the proxy's socket, not the client");
    }
    let m_text = metrics(m.proxy.admin_addr).await?;
    let opened = format!("mesh_proxy_connections_opened_total{{service=\"{}\",protocol=\"udp\"}}", svc.service());
    assert_eq!(metric(&m_text, &opened), Some(1.0), "one flow for one client:\n{m_text}");
    Ok(())
}

/// (d) `internalTrafficPolicy: Local`: a ClusterIP uses only this node's endpoints, and with none left refuses
/// even though another node has a ready one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_traffic_policy_local_uses_only_this_nodes_endpoints() -> anyhow::Result<()> {
    let t = 4;
    let pods = tcp_pods(t, &["here", "there"]).await?;
    let svc = Svc {
        extra: "  internalTrafficPolicy: Local\n".into(),
        ..Svc::cluster_ip("local", cluster_ip(t, 1), port_on(&[IpAddr::V4(cluster_ip(t, 1))])?)
    };
    let eps = [ep(pods[0].addr(), NODE, State::Ready), ep(pods[1].addr(), "node-b", State::Ready)];
    let folder = Folder::new()?;
    folder.service(&svc, &eps)?;
    let m = Mesh::start(folder).await?;
    wait_service(&m.proxy, &svc, &eps).await?;

    // Held open, so least-connections would spread them if node-b's endpoint were a candidate.
    let (conns, got) = hold(svc.addr(), 3).await?;
    assert_eq!(got, ["here", "here", "here"], "only node-a's endpoint");
    close_all(conns).await?;

    let only_remote = [ep(pods[1].addr(), "node-b", State::Ready)];
    m.folder.slice(&svc, &only_remote)?;
    wait_endpoints(&m.proxy, &svc.cluster(), &only_remote).await?;
    let took = expect_reset(svc.addr()).await.context("Local with no endpoint on this node")?;
    eprintln!("reset after {took:?}");
    Ok(())
}

/// The zone comes from the Node: a proxy without `--zone` learns its Node's `topology.kubernetes.io/zone` from
/// mesh-control and follows the label when it changes; `trafficDistribution: PreferSameZone` (the newer name of
/// PreferClose) then keeps connections in that zone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_zone_comes_from_the_node_label_and_follows_it() -> anyhow::Result<()> {
    let t = 16;
    let pods = tcp_pods(t, &["in-a", "in-b"]).await?;
    let svc = Svc {
        extra: "  trafficDistribution: PreferSameZone\n".into(),
        ..Svc::cluster_ip("zoned", cluster_ip(t, 1), port_on(&[IpAddr::V4(cluster_ip(t, 1))])?)
    };
    // in-a runs on this node (zone-a in its slice), in-b on node-b (zone-b).
    let eps = [ep(pods[0].addr(), NODE, State::Ready), ep(pods[1].addr(), "node-b", State::Ready)];
    let node = |zone: &str| {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE}\n  labels:\n    topology.kubernetes.io/zone: {zone}\n"
        )
    };
    let folder = Folder::new()?;
    folder.service(&svc, &eps)?;
    folder.write("node.yaml", &node("zone-b"))?;
    let control = mesh_control::app::build(control_config(&folder.manifests(), "127.0.0.1:0".parse()?)).await?;
    let proxy = proxy::build(proxy::Config { zone: None, ..proxy_config(xds(control.xds_addr)) }).await?;
    wait_ready(proxy.admin_addr).await?;
    wait_service(&proxy, &svc, &eps).await?;

    let in_zone = |zone: &'static str, pod: &'static str| {
        let admin = proxy.admin_addr;
        let to = svc.addr();
        async move {
            eventually(CONVERGE, &format!("the proxy is in {zone}"), || async {
                let d = dump(admin).await?;
                anyhow::ensure!(d["zone"] == zone, "zone {}", d["zone"]);
                Ok(())
            })
            .await?;
            // Held open, so least-connections would spread them if the other zone's endpoint were a candidate.
            let (conns, got) = hold(to, 3).await?;
            anyhow::ensure!(got == [pod, pod, pod], "in {zone}: {got:?}");
            close_all(conns).await
        }
    };
    in_zone("zone-b", "in-b").await?;
    // The label changes: the proxy follows without a restart.
    folder.write("node.yaml", &node("zone-a"))?;
    in_zone("zone-a", "in-a").await?;
    // The label goes: no zone, no preference.
    folder.write("node.yaml", &format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE}\n"))?;
    eventually(CONVERGE, "the proxy has no zone", || async {
        let d = dump(proxy.admin_addr).await?;
        anyhow::ensure!(d["zone"].is_null(), "zone {}", d["zone"]);
        Ok(())
    })
    .await?;
    let (conns, got) = hold(svc.addr(), 2).await?;
    assert_eq!(names(&got), BTreeSet::from(["in-a", "in-b"]), "no zone: both");
    close_all(conns).await?;
    Ok(())
}

/// (d) `externalTrafficPolicy: Local` with a `healthCheckNodePort`: external addresses use only this node's
/// endpoints (the ClusterIP, under internalTrafficPolicy Cluster, uses all); the health check port answers 200
/// with the count of local endpoints, and 503 once the local endpoint leaves the slice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_traffic_policy_local_and_health_check_node_port() -> anyhow::Result<()> {
    let t = 5;
    let pods = tcp_pods(t, &["here", "there"]).await?;
    let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let hc_port = free_port(any)?;
    let svc = Svc {
        kind: "LoadBalancer",
        node_port: Some(free_port(any)?),
        lb_ip: Some(lb_ip(t, 1)),
        extra: format!("  externalTrafficPolicy: Local\n  healthCheckNodePort: {hc_port}\n"),
        ..Svc::cluster_ip("ext", cluster_ip(t, 1), port_on(&[IpAddr::V4(cluster_ip(t, 1)), IpAddr::V4(lb_ip(t, 1))])?)
    };
    let eps = [ep(pods[0].addr(), NODE, State::Ready), ep(pods[1].addr(), "node-b", State::Ready)];
    let folder = Folder::new()?;
    folder.service(&svc, &eps)?;
    let m = Mesh::start(folder).await?;
    wait_service(&m.proxy, &svc, &eps).await?;
    let node_port = SocketAddr::new(any, svc.node_port.expect("a NodePort"));
    let lb_addr = SocketAddr::new(IpAddr::V4(lb_ip(t, 1)), svc.port);
    wait_listening(&m.proxy, Protocol::Tcp, node_port).await?;
    wait_listening(&m.proxy, Protocol::Tcp, lb_addr).await?;
    let via_node = SocketAddr::from(([127, 0, 0, 1], node_port.port()));
    let hc = SocketAddr::from(([127, 0, 0, 1], hc_port));

    let health = |want_status: u16, want_local: u64| async move {
        eventually(CONVERGE, &format!("healthCheckNodePort {hc} answers {want_status}"), || async {
            let r = http_get(hc, "localhost", "/healthz").await?;
            let body: Value = serde_json::from_str(&r.body).with_context(|| format!("body {:?}", r.body))?;
            anyhow::ensure!(
                r.status == want_status && body["localEndpoints"] == want_local,
                "got {} {}",
                r.status,
                r.body
            );
            anyhow::ensure!(body["service"]["name"] == "ext" && body["service"]["namespace"] == NS, "{}", r.body);
            Ok(())
        })
        .await
    };
    health(200, 1).await?;

    for external in [via_node, lb_addr] {
        let (conns, got) = hold(external, 3).await?;
        assert_eq!(got, ["here", "here", "here"], "{external}: only node-a's endpoint (externalTrafficPolicy)");
        close_all(conns).await?;
    }
    let (conns, got) = hold(svc.addr(), 2).await?;
    assert_eq!(names(&got), BTreeSet::from(["here", "there"]), "the ClusterIP follows internalTrafficPolicy");
    close_all(conns).await?;

    // The local endpoint goes: the load balancer is told to skip this node, and external traffic is refused.
    let only_remote = [ep(pods[1].addr(), "node-b", State::Ready)];
    m.folder.slice(&svc, &only_remote)?;
    wait_endpoints(&m.proxy, &svc.cluster(), &only_remote).await?;
    health(503, 0).await?;
    expect_reset(via_node).await.context("NodePort, Local, no local endpoint")?;
    expect_reset(lb_addr).await.context("LoadBalancer IP, Local, no local endpoint")?;
    assert_eq!(ask_once(svc.addr()).await?.name, "there", "the ClusterIP still uses node-b's endpoint");
    Ok(())
}

/// (e) Terminating but serving endpoints take traffic only when no endpoint is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_endpoints_serve_only_when_none_is_ready() -> anyhow::Result<()> {
    let t = 6;
    let pods = tcp_pods(t, &["ready", "leaving"]).await?;
    let svc = Svc::cluster_ip("web", cluster_ip(t, 1), port_on(&[IpAddr::V4(cluster_ip(t, 1))])?);
    let eps = [ep(pods[0].addr(), NODE, State::Ready), ep(pods[1].addr(), NODE, State::Terminating)];
    let folder = Folder::new()?;
    folder.service(&svc, &eps)?;
    let m = Mesh::start(folder).await?;
    wait_service(&m.proxy, &svc, &eps).await?;

    let (conns, got) = hold(svc.addr(), 3).await?;
    assert_eq!(got, ["ready", "ready", "ready"], "a terminating endpoint gets nothing while one is ready");
    close_all(conns).await?;

    let eps = [ep(pods[0].addr(), NODE, State::NotReady), ep(pods[1].addr(), NODE, State::Terminating)];
    m.folder.slice(&svc, &eps)?;
    wait_endpoints(&m.proxy, &svc.cluster(), &eps).await?;
    let (conns, got) = hold(svc.addr(), 3).await?;
    assert_eq!(got, ["leaving", "leaving", "leaving"], "none ready: the serving terminating one, never not-ready");
    close_all(conns).await?;
    Ok(())
}

/// (f) A Service without usable endpoints resets the client at once (no FIN that looks like an empty answer, no
/// hang): no slice at all, an empty slice, and only not-ready endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_endpoints_resets_the_client_promptly() -> anyhow::Result<()> {
    let t = 7;
    let pods = tcp_pods(t, &["down"]).await?;
    let port = port_on(&[1, 2, 3].map(|i| IpAddr::V4(cluster_ip(t, i))))?;
    let none = Svc::cluster_ip("none", cluster_ip(t, 1), port);
    let empty = Svc::cluster_ip("empty", cluster_ip(t, 2), port);
    let down = Svc::cluster_ip("down", cluster_ip(t, 3), port);
    let folder = Folder::new()?;
    folder.write("none.yaml", &none.yaml())?;
    folder.service(&empty, &[])?;
    let down_eps = [ep(pods[0].addr(), NODE, State::NotReady)];
    folder.service(&down, &down_eps)?;
    let m = Mesh::start(folder).await?;
    wait_service(&m.proxy, &none, &[]).await?;
    wait_service(&m.proxy, &empty, &[]).await?;
    wait_service(&m.proxy, &down, &down_eps).await?;

    for svc in [&none, &empty, &down] {
        let took = expect_reset(svc.addr()).await.with_context(|| format!("Service {}", svc.name))?;
        eprintln!("{}: reset after {took:?}", svc.name);
    }
    let text = metrics(m.proxy.admin_addr).await?;
    for svc in [&none, &empty, &down] {
        let failed = format!("mesh_proxy_connections_failed_total{{service=\"{}\",protocol=\"tcp\"}}", svc.service());
        assert_eq!(metric(&text, &failed), Some(1.0), "{failed}:\n{text}");
    }
    Ok(())
}

/// (g) `sessionAffinity: ClientIP`: a client stays on its endpoint across connections, even when
/// least-connections would move it; another client is balanced on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_affinity_keeps_a_client_on_one_endpoint() -> anyhow::Result<()> {
    let t = 8;
    let pods = tcp_pods(t, &["a", "b"]).await?;
    let svc = Svc {
        extra: "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 600\n"
            .into(),
        ..Svc::cluster_ip("sticky", cluster_ip(t, 1), port_on(&[IpAddr::V4(cluster_ip(t, 1))])?)
    };
    let eps = [ep(pods[0].addr(), NODE, State::Ready), ep(pods[1].addr(), NODE, State::Ready)];
    let folder = Folder::new()?;
    folder.service(&svc, &eps)?;
    let m = Mesh::start(folder).await?;
    wait_service(&m.proxy, &svc, &eps).await?;
    let d = dump(m.proxy.admin_addr).await?;
    let c = d["clusters"].as_array().context("clusters")?.iter().find(|c| c["name"] == svc.cluster());
    assert_eq!(c.map(|c| &c["affinitySeconds"]), Some(&Value::from(600)), "{d}");

    let (c1, c2) = (client_ip(t, 1), client_ip(t, 2));
    // Client 1 holds three connections: all on its endpoint, although the other endpoint is idle.
    let mut held = Vec::new();
    let mut first = None;
    for _ in 0..3 {
        let mut c = Conn::open_from(c1, svc.addr()).await?;
        let a = c.ask().await?;
        assert_eq!(a.name, *first.get_or_insert_with(|| a.name.clone()), "client {c1} moved");
        held.push(c);
    }
    let first = first.context("an endpoint")?;
    // Client 2 is new: least-connections sends it to the idle endpoint, where it then stays.
    let mut c = Conn::open_from(c2, svc.addr()).await?;
    let second = c.ask().await?.name;
    assert_ne!(second, first, "a new client is balanced (to the idle endpoint)");
    held.push(c);
    close_all(held).await?;
    // New connections, one at a time: each client returns to its endpoint.
    for _ in 0..5 {
        for (ip, want) in [(c1, &first), (c2, &second)] {
            let mut c = Conn::open_from(ip, svc.addr()).await?;
            assert_eq!(&c.ask().await?.name, want, "client {ip}");
            c.close().await?;
        }
    }
    Ok(())
}

/// (h) Live reconfiguration: an established connection keeps working after its endpoint leaves the
/// EndpointSlice; new connections go to the endpoints that remain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn established_connections_survive_endpoint_removal() -> anyhow::Result<()> {
    let t = 9;
    let pods = tcp_pods(t, &["a", "b"]).await?;
    let svc = Svc::cluster_ip("web", cluster_ip(t, 1), port_on(&[IpAddr::V4(cluster_ip(t, 1))])?);
    let eps = [ep(pods[0].addr(), NODE, State::Ready), ep(pods[1].addr(), NODE, State::Ready)];
    let folder = Folder::new()?;
    folder.service(&svc, &eps)?;
    let m = Mesh::start(folder).await?;
    wait_service(&m.proxy, &svc, &eps).await?;

    let mut old = Conn::open(svc.addr()).await?;
    let gone = old.ask().await?.name;
    let (gone_ep, stays_ep) = if gone == "a" { (eps[0], eps[1]) } else { (eps[1], eps[0]) };
    let stays = if gone == "a" { "b" } else { "a" };
    m.folder.slice(&svc, &[stays_ep])?;
    wait_endpoints(&m.proxy, &svc.cluster(), &[stays_ep]).await?;
    let d = dump(m.proxy.admin_addr).await?;
    assert!(!d.to_string().contains(&gone_ep.addr.to_string()), "{gone_ep:?} still in the table: {d}");

    for _ in 0..3 {
        assert_eq!(old.ask().await?.name, gone, "the established connection stays on its endpoint");
    }
    let (conns, got) = hold(svc.addr(), 3).await?;
    assert_eq!(got, [stays, stays, stays], "new connections: only the remaining endpoint");
    close_all(conns).await?;
    assert_eq!(old.ask().await?.name, gone);
    old.close().await?;
    Ok(())
}

/// (i) Drain: new connections are refused at once, the open one keeps working until its client closes it, and
/// then drain returns 0 (none left open).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_refuses_new_connections_and_waits_for_open_ones() -> anyhow::Result<()> {
    let t = 10;
    let pods = tcp_pods(t, &["a"]).await?;
    let svc = Svc::cluster_ip("web", cluster_ip(t, 1), port_on(&[IpAddr::V4(cluster_ip(t, 1))])?);
    let eps = [ep(pods[0].addr(), NODE, State::Ready)];
    let folder = Folder::new()?;
    folder.service(&svc, &eps)?;
    let Mesh { proxy, control: _control, folder: _folder } = Mesh::start(folder).await?;
    wait_service(&proxy, &svc, &eps).await?;

    let mut open = Conn::open(svc.addr()).await?;
    assert_eq!(open.ask().await?.name, "a");
    let (admin, shared) = (proxy.admin_addr, proxy.shared.clone());
    let deadline = Duration::from_secs(120);
    let drain = tokio::spawn(proxy.drain(deadline));

    eventually(CONVERGE, &format!("connecting to {} is refused", svc.addr()), || async {
        match TcpStream::connect(svc.addr()).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
            other => anyhow::bail!("connect: {other:?}"),
        }
    })
    .await?;
    let r = http_get(admin, "localhost", "/ready").await?;
    assert_eq!(r.status, 503, "draining is not ready");
    for _ in 0..3 {
        assert_eq!(open.ask().await?.name, "a", "the open connection keeps working while draining");
    }
    assert!(!drain.is_finished(), "drain must wait for the open connection (deadline {deadline:?})");
    assert_eq!(shared.conns.open(), 1);
    open.close().await?;
    let left = tokio::time::timeout(CONVERGE, drain).await.context("drain did not return once idle")??;
    assert_eq!(left, 0, "no connection left at the deadline");
    assert_eq!(shared.conns.open(), 0);
    Ok(())
}

/// (i) Drain with `--state-dir`: an update accepted just before the drain is on disk when the drain returns, so
/// a restart during a control-plane outage serves it. (The saver writes one second after a burst of updates; a
/// drain with nothing open takes milliseconds, so before the fix the process exited with the update unsaved.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_saves_the_last_accepted_update_at_once() -> anyhow::Result<()> {
    let t = 15;
    let pods = tcp_pods(t, &["a"]).await?;
    let svc = Svc::cluster_ip("web", cluster_ip(t, 1), port_on(&[IpAddr::V4(cluster_ip(t, 1))])?);
    let eps = [ep(pods[0].addr(), NODE, State::Ready)];
    let folder = Folder::new()?;
    folder.service(&svc, &eps)?;
    let control = mesh_control::app::build(control_config(&folder.manifests(), "127.0.0.1:0".parse()?)).await?;
    let state = tempfile::tempdir()?;
    let mut cfg = proxy_config(xds(control.xds_addr));
    cfg.state_dir = Some(state.path().to_owned());
    let proxy = proxy::build(cfg).await?;
    wait_service(&proxy, &svc, &eps).await?;

    assert_eq!(proxy.drain(Duration::from_secs(5)).await, 0);
    let (saved, _) = mesh_proxy::saved::read(state.path())?
        .context("the drain returned and the accepted configuration is not on disk")?;
    let listeners = saved.get(&xds_proto::types::ResourceType::Listener).map(|(_, m)| m.len()).unwrap_or(0);
    assert!(listeners > 0, "the saved configuration has no listener: {saved:?}");
    control.stop().await;
    Ok(())
}

/// The parts of `/config_dump` that describe routing (not live counters or versions), for comparing proxies.
fn routing(d: &Value) -> Value {
    let mut listeners: Vec<Value> = d["listeners"].as_array().cloned().unwrap_or_default();
    listeners.sort_by_key(|l| l["name"].as_str().unwrap_or("").to_owned());
    let mut clusters: Vec<Value> = d["clusters"].as_array().cloned().unwrap_or_default();
    for c in &mut clusters {
        if let Some(eps) = c["endpoints"].as_array_mut() {
            for e in eps {
                if let Some(o) = e.as_object_mut() {
                    o.remove("active");
                    o.remove("ejected");
                }
            }
        }
    }
    clusters.sort_by_key(|c| c["name"].as_str().unwrap_or("").to_owned());
    serde_json::json!({"listeners": listeners, "clusters": clusters})
}

/// The snapshot file `meshctl snapshot --manifests DIR` writes (`--role proxy`), made with the same library
/// calls.
fn snapshot_file(manifests: &Path) -> anyhow::Result<Value> {
    let loaded = mesh_control::source::load_dir(manifests)?;
    anyhow::ensure!(loaded.rejected.is_empty(), "rejected manifests: {:?}", loaded.rejected);
    let mut store = mesh_control::store::Store::new();
    mesh_control::source::sync(&mut store, &loaded);
    let snap = mesh_control::translate::translate(&store, &mesh_control::translate::Options::default());
    let items: Vec<(xds_proto::types::ResourceType, bytes::Bytes)> = xds_proto::types::ResourceType::ALL
        .into_iter()
        .flat_map(|t| snap.proxy.get(t).values().map(move |r| (t, r.body.clone())).collect::<Vec<_>>())
        .collect();
    Ok(xds_proto::snapshot_file::to_json("proxy", items.iter().map(|(t, b)| (*t, &b[..])))?)
}

/// (j) Snapshot-file mode: the file `meshctl snapshot` writes, loaded with `Source::File`, gives the same table
/// as xDS from the same folder, and serves traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_file_serves_the_same_as_xds() -> anyhow::Result<()> {
    let t = 11;
    let pods = tcp_pods(t, &["a", "b"]).await?;
    let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let web = Svc::cluster_ip("web", cluster_ip(t, 1), port_on(&[IpAddr::V4(cluster_ip(t, 1))])?);
    let sticky = Svc {
        kind: "NodePort",
        node_port: Some(free_port(any)?),
        extra: "  sessionAffinity: ClientIP\n  externalTrafficPolicy: Local\n".into(),
        ..Svc::cluster_ip("sticky", cluster_ip(t, 2), port_on(&[IpAddr::V4(cluster_ip(t, 2))])?)
    };
    let eps = [ep(pods[0].addr(), NODE, State::Ready), ep(pods[1].addr(), "node-b", State::Terminating)];
    let web_eps = [ep(pods[0].addr(), NODE, State::Ready), ep(pods[1].addr(), NODE, State::Ready)];
    let folder = Folder::new()?;
    folder.service(&web, &web_eps)?;
    folder.service(&sticky, &eps)?;

    // Over xDS first: the reference table.
    let Mesh { proxy: by_xds, control: _control, folder } = Mesh::start(folder).await?;
    wait_service(&by_xds, &web, &web_eps).await?;
    wait_service(&by_xds, &sticky, &eps).await?;
    let node_port = SocketAddr::new(any, sticky.node_port.context("a NodePort")?);
    wait_listening(&by_xds, Protocol::Tcp, node_port).await?;
    let reference = routing(&dump(by_xds.admin_addr).await?);
    assert_eq!(by_xds.drain(Duration::from_secs(10)).await, 0);
    // Its sockets close just after drain returns (each listener task drops its own).
    eventually(CONVERGE, "the xDS-fed proxy's sockets are closed", || async {
        for to in [web.addr(), sticky.addr(), SocketAddr::from(([127, 0, 0, 1], node_port.port()))] {
            anyhow::ensure!(TcpStream::connect(to).await.is_err(), "{to} still accepts");
        }
        Ok(())
    })
    .await?;

    let file = folder.root.path().join("proxy-snapshot.json");
    std::fs::write(&file, serde_json::to_string_pretty(&snapshot_file(&folder.manifests())?)?)?;
    let by_file = proxy::build(proxy_config(Source::File(file.clone()))).await.context("starting from the file")?;
    // Ready at once: the file is the whole configuration.
    let r = http_get(by_file.admin_addr, "localhost", "/ready").await?;
    assert_eq!(r.status, 200, "a proxy started from a snapshot file is ready when build returns");
    for to in [web.addr(), sticky.addr(), node_port] {
        wait_listening(&by_file, Protocol::Tcp, to).await?;
    }
    let from_file = routing(&dump(by_file.admin_addr).await?);
    assert_eq!(from_file, reference, "the snapshot file must give the table xDS gives");

    let (conns, got) = hold(web.addr(), 2).await?;
    assert_eq!(names(&got), BTreeSet::from(["a", "b"]));
    close_all(conns).await?;
    // sticky: Cluster internally → the ready one; Local externally → node-a's ready one.
    assert_eq!(ask_once(sticky.addr()).await?.name, "a");
    assert_eq!(ask_once(SocketAddr::from(([127, 0, 0, 1], node_port.port()))).await?.name, "a");
    Ok(())
}

/// (j) A snapshot file that is not one fails `app::build` with an error naming the file and what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_snapshot_file_fails_to_start() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("mesh-proxy-e2e-").tempdir()?;
    let listener_url = xds_proto::types::ResourceType::Listener.type_url();
    let cases: &[(&str, String, &str)] = &[
        ("truncated.json", r#"{"role": "proxy", "resources": [ "#.into(), "is not JSON"),
        ("shape.json", r#"{"role": "proxy"}"#.into(), "not a snapshot file: no \"resources\""),
        ("role.json", r#"{"role": "ingress/mesh", "resources": []}"#.into(), "needs one written with --role proxy"),
        (
            "type.json",
            r#"{"role": "proxy", "resources": [{"@type": "type.googleapis.com/google.protobuf.Empty"}]}"#.into(),
            "unsupported @type",
        ),
        (
            // Decodes as a Listener, but is not a Service listener the proxy can serve.
            "unusable.json",
            format!(
                r#"{{"role": "proxy", "resources": [{{"@type": "{listener_url}", "name": "svc/e2e/x/echo@127.0.0.9",
                "address": {{"socket_address": {{"address": "127.0.0.9", "port_value": 80}}}}}}]}}"#
            ),
            "svc/e2e/x/echo@127.0.0.9: no filter_metadata.mesh.service",
        ),
    ];
    for (name, text, reason) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text)?;
        let err = match proxy::build(proxy_config(Source::File(path.clone()))).await {
            Ok(_) => panic!("{name}: app::build accepted {text}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(&path.display().to_string()), "{name}: the error must name the file: {err}");
        assert!(err.contains(reason), "{name}: the error must say {reason:?}: {err}");
        eprintln!("{name}: {err}");
    }
    Ok(())
}

/// (k) An update the proxy must reject (NACK) leaves the table in force untouched, and traffic keeps flowing:
/// fed through the same `XdsHandler` the xDS client drives, with a Listener that does not decode, one that
/// decodes but is unusable, and a good change bundled with a bad one (all or nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_update_keeps_the_last_good_table() -> anyhow::Result<()> {
    use xds_proto::client::{Handler, ResourceEntry, Update};
    use xds_proto::types::ResourceType;

    let t = 12;
    let pods = tcp_pods(t, &["a", "b"]).await?;
    let svc = Svc::cluster_ip("web", cluster_ip(t, 1), port_on(&[IpAddr::V4(cluster_ip(t, 1))])?);
    let eps = [ep(pods[0].addr(), NODE, State::Ready), ep(pods[1].addr(), NODE, State::Ready)];
    let folder = Folder::new()?;
    folder.service(&svc, &eps)?;
    let m = Mesh::start(folder).await?;
    wait_service(&m.proxy, &svc, &eps).await?;

    // A second Service, translated by mesh-control, gives a valid Listener to bundle with bad ones; the same
    // Listener with a traffic policy that does not exist decodes, but cannot be served.
    let other = Svc::cluster_ip("other", cluster_ip(t, 2), svc.port);
    let other_name = format!("svc/{NS}/other/echo@{}", other.cluster_ip);
    let bogus_name = format!("svc/{NS}/bogus/echo@{}", cluster_ip(t, 3));
    let (other_body, bogus_body) = {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("other.yaml"), other.yaml())?;
        let mut doc = snapshot_file(dir.path())?;
        let resources = doc["resources"].as_array_mut().context("resources")?;
        let mut bogus =
            resources.iter().find(|r| r["name"] == other_name.as_str()).context("other's Listener")?.clone();
        bogus["name"] = Value::from(bogus_name.as_str());
        bogus["metadata"]["filter_metadata"]["mesh"]["trafficPolicy"] = Value::from("Sometimes");
        resources.push(bogus);
        let (_, resources) = xds_proto::snapshot_file::from_json(&doc)?;
        let body = |name: &str| resources.iter().find(|r| r.name == name).map(|r| r.body.clone());
        (body(&other_name).context("other's Listener")?, body(&bogus_name).context("the bogus Listener")?)
    };
    let bogus_policy = (bogus_name.clone(), bogus_body);

    let before = m.proxy.shared.table.load_full();
    let (changes, _rx) = tokio::sync::watch::channel(0u64);
    let mut handler = mesh_proxy::config::XdsHandler::new(m.proxy.shared.clone(), changes);
    let update = |items: Vec<(String, Vec<u8>)>| {
        let changed = items.iter().map(|(n, _)| n.clone()).collect();
        let resources: BTreeMap<String, ResourceEntry> = items
            .into_iter()
            .map(|(n, b)| (n, ResourceEntry { version: "bad".into(), body: bytes::Bytes::from(b) }))
            .collect();
        Update {
            kind: ResourceType::Listener,
            resources: Arc::new(resources),
            changed,
            removed: Vec::new(),
            version: "bad-1".into(),
        }
    };
    let garbage = format!("svc/{NS}/garbage/echo@{}", cluster_ip(t, 4));
    let cases = [
        (update(vec![(garbage.clone(), vec![0x0a, 0xff])]), format!("{garbage}: does not decode")),
        (update(vec![bogus_policy.clone()]), format!("{}: unknown trafficPolicy \"Sometimes\"", bogus_policy.0)),
        (
            update(vec![(other_name.clone(), other_body.clone()), bogus_policy.clone()]),
            "unknown trafficPolicy".to_owned(),
        ),
    ];
    for (u, reason) in &cases {
        let err = handler.apply(u).expect_err("the update must be rejected");
        assert!(err.contains(reason), "the NACK must say {reason:?}: {err}");
        let now = m.proxy.shared.table.load_full();
        assert!(Arc::ptr_eq(&before, &now), "a rejected update must leave the table in force as it was");
    }
    let d = dump(m.proxy.admin_addr).await?;
    assert!(!d.to_string().contains("other/echo"), "the good half of a rejected update must not apply: {d}");
    let text = metrics(m.proxy.admin_addr).await?;
    assert_eq!(metric(&text, "mesh_proxy_config_rejections_total"), Some(cases.len() as f64), "{text}");

    // Traffic flows on the table in force, and the control plane's next update still applies.
    let (conns, got) = hold(svc.addr(), 2).await?;
    assert_eq!(names(&got), BTreeSet::from(["a", "b"]));
    close_all(conns).await?;
    m.folder.slice(&svc, &eps[..1])?;
    wait_endpoints(&m.proxy, &svc.cluster(), &eps[..1]).await?;
    assert_eq!(ask_once(svc.addr()).await?.name, "a");
    Ok(())
}

/// Readiness and metrics: `/ready` is 503 until the first snapshot is accepted and 200 after; `/metrics` counts
/// connections per Service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_after_the_first_snapshot_and_metrics_per_service() -> anyhow::Result<()> {
    let t = 13;
    let pods = tcp_pods(t, &["a", "b"]).await?;
    let svc = Svc::cluster_ip("web", cluster_ip(t, 1), port_on(&[IpAddr::V4(cluster_ip(t, 1))])?);
    let eps = [ep(pods[0].addr(), NODE, State::Ready), ep(pods[1].addr(), NODE, State::Ready)];
    let folder = Folder::new()?;
    folder.service(&svc, &eps)?;

    // The proxy starts first, with its control plane not up yet: it cannot have a snapshot.
    let xds_addr = SocketAddr::from(([127, 0, 0, 1], free_port(IpAddr::V4(Ipv4Addr::LOCALHOST))?));
    let p = proxy::build(proxy_config(xds(xds_addr))).await?;
    for _ in 0..3 {
        let r = http_get(p.admin_addr, "localhost", "/ready").await?;
        assert_eq!(r.status, 503, "ready before any snapshot: {}", r.body);
    }
    let d = dump(p.admin_addr).await?;
    assert_eq!(d["listeners"], serde_json::json!([]), "{d}");

    let _control = mesh_control::app::build(control_config(&folder.manifests(), xds_addr)).await?;
    wait_ready(p.admin_addr).await.context("ready after the first snapshot")?;
    wait_service(&p, &svc, &eps).await?;

    let (conns, _) = hold(svc.addr(), 2).await?;
    close_all(conns).await?;
    ask_once(svc.addr()).await?;
    let text = metrics(p.admin_addr).await?;
    let opened = format!("mesh_proxy_connections_opened_total{{service=\"{}\",protocol=\"tcp\"}}", svc.service());
    assert_eq!(metric(&text, &opened), Some(3.0), "{opened}:\n{text}");
    let sent = format!("mesh_proxy_bytes_sent_total{{service=\"{}\",protocol=\"tcp\"}}", svc.service());
    assert!(metric(&text, &sent).is_some_and(|v| v > 0.0), "{sent}:\n{text}");
    Ok(())
}

/// Bad input never stops the rest: a Service whose `internalTrafficPolicy` is not `Cluster` or `Local` (the API
/// server would refuse it; a manifest folder does not) arrives in the same push as a good new Service. The good
/// one must be served, and the Services already in force keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_service_does_not_block_a_good_one_in_the_same_push() -> anyhow::Result<()> {
    let t = 14;
    let pods = tcp_pods(t, &["a", "b"]).await?;
    let port = port_on(&[1, 2, 3].map(|i| IpAddr::V4(cluster_ip(t, i))))?;
    let web = Svc::cluster_ip("web", cluster_ip(t, 1), port);
    let eps = [ep(pods[0].addr(), NODE, State::Ready), ep(pods[1].addr(), NODE, State::Ready)];
    let folder = Folder::new()?;
    folder.service(&web, &eps)?;
    let m = Mesh::start(folder).await?;
    wait_service(&m.proxy, &web, &eps).await?;

    let bad =
        Svc { extra: "  internalTrafficPolicy: Sometimes\n".into(), ..Svc::cluster_ip("bad", cluster_ip(t, 2), port) };
    let good = Svc::cluster_ip("good", cluster_ip(t, 3), port);
    // One file, one atomic write: both Services land in the same snapshot, so in the same push.
    let both = [bad.yaml(), bad.slice(&eps), good.yaml(), good.slice(&eps[..1])].join("---\n");
    m.folder.write("both.yaml", &both)?;
    let served = wait_service(&m.proxy, &good, &eps[..1]).await;
    let text = metrics(m.proxy.admin_addr).await?;
    let problems = m.control.snapshots.borrow().as_ref().map(|s| s.problems.clone());
    eprintln!(
        "proxy rejections: {:?}; mesh-control problems: {problems:?}",
        metric(&text, "mesh_proxy_config_rejections_total")
    );
    served.context("the good Service pushed with the bad one")?;
    assert_eq!(ask_once(good.addr()).await?.name, "a");
    assert!(["a", "b"].contains(&ask_once(web.addr()).await?.name.as_str()));
    Ok(())
}

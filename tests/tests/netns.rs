//! The real `mesh-proxy` binary on a "node" with real routing: network namespaces for the node, two Pods and a
//! client, joined by point-to-point veth links inside 10.200.0.0/24 (which exists only in these namespaces):
//!
//! ```text
//!   client 10.200.0.10 ──── 10.200.0.9  ┐
//!                                       node (mesh-proxy, dummy mesh0: 10.96.0.10)
//!   pod-a  10.200.0.2  ──── 10.200.0.1  ┤
//!   pod-b  10.200.0.6  ──── 10.200.0.5  ┘
//! ```
//!
//! The client routes the Service range 10.96.0.0/16 via the node; the Pods' default route is the node. The proxy
//! runs inside the node namespace (`ip netns exec`) from a snapshot file written by the built `meshctl snapshot`,
//! with `--interface mesh0`, so it must itself put the ClusterIP on its interface to be able to listen there.
//! Stand-in Pods (echo servers naming themselves and the address they were reached from) and the client's
//! sockets are made inside their namespaces by this process (see `mesh_tests::netns`).
//!
//! Needs root; skips, saying why, otherwise (CI runs as root with `MESH_REQUIRE_NETNS=1`, which turns a skip into
//! a failure). Needs `cargo build --workspace --bins` first.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use mesh_tests::l4::udp_ask;
use mesh_tests::netns::{self, Netns};
use mesh_tests::{Conn, Process, TcpEcho, UdpEcho, eventually, wait_for_line, workspace_bin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every namespace of these tests is named `{PREFIX}{pid}-{role}`.
const PREFIX: &str = "meshe2e-";
const STARTUP: Duration = Duration::from_secs(60);
const CONVERGE: Duration = Duration::from_secs(30);
const CONNECT: Duration = Duration::from_secs(5);

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE_PORT: u16 = 30080;
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 6);
const NODE_TO_A: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const NODE_TO_B: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 5);
const NODE_TO_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 9);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// The namespaces; each deletes itself when dropped (also on panic).
struct Topology {
    node: Netns,
    pod_a: Netns,
    pod_b: Netns,
    client: Netns,
}

impl Topology {
    fn new(tag: &str) -> anyhow::Result<Topology> {
        let t = Topology {
            node: Netns::create(&format!("{tag}-node"))?,
            pod_a: Netns::create(&format!("{tag}-pod-a"))?,
            pod_b: Netns::create(&format!("{tag}-pod-b"))?,
            client: Netns::create(&format!("{tag}-client"))?,
        };
        // One /30 per link, node side first; the far side routes through the node.
        t.node.link("to-a", NODE_TO_A, &t.pod_a, POD_A, "default")?;
        t.node.link("to-b", NODE_TO_B, &t.pod_b, POD_B, "default")?;
        t.node.link("to-client", NODE_TO_CLIENT, &t.client, CLIENT, "10.96.0.0/16")?;
        Ok(t)
    }

    fn names(&self) -> Vec<String> {
        [&self.node, &self.pod_a, &self.pod_b, &self.client].iter().map(|n| n.name().to_owned()).collect()
    }
}

/// The Service: ClusterIP 10.96.0.10 with TCP port 80 (also NodePort 30080) and UDP port 53, to both Pods.
const MANIFESTS: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: netns
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  selector:
    app: web
  ports:
    - name: http
      port: 80
      protocol: TCP
      targetPort: 8080
      nodePort: 30080
    - name: dns
      port: 53
      protocol: UDP
      targetPort: 5353
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: netns
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
  - name: http
    port: 8080
    protocol: TCP
  - name: dns
    port: 5353
    protocol: UDP
endpoints:
  - addresses: [10.200.0.2]
    conditions: {ready: true}
    nodeName: node-a
  - addresses: [10.200.0.6]
    conditions: {ready: true}
    nodeName: node-a
"#;

/// `meshctl snapshot --manifests DIR` (role proxy), written to `file`.
fn write_snapshot(meshctl: &Path, manifests: &Path, file: &Path) -> anyhow::Result<()> {
    let out =
        Command::new(meshctl).arg("snapshot").arg("--manifests").arg(manifests).env_remove("RUST_LOG").output()?;
    anyhow::ensure!(
        out.status.success(),
        "meshctl snapshot failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(file, &out.stdout)?;
    Ok(())
}

/// `GET path` over HTTP/1.0 from inside `ns`: the status and body.
async fn ns_http_get(ns: &Netns, to: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = ns.connect(to, CONNECT).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await?;
    let mut resp = Vec::new();
    tokio::time::timeout(CONNECT, s.read_to_end(&mut resp)).await.context("reading the answer")??;
    let text = String::from_utf8_lossy(&resp);
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("no status line")?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// A connection from the client namespace, asked once.
async fn client_conn(client: &Netns, to: SocketAddr) -> anyhow::Result<(Conn, mesh_tests::Answer)> {
    let mut c = Conn::from_stream(to, client.connect(to, CONNECT).await?);
    let a = c.ask().await?;
    Ok((c, a))
}

/// The running node: the proxy, the Pods, the namespaces. Fields drop in order: the proxy is killed first, then
/// the Pods' sockets close, then the namespaces are deleted (also when a test panics).
struct Node {
    proxy: Process,
    /// The proxy's admin address, on the node's own loopback.
    admin: SocketAddr,
    _pods: (Vec<TcpEcho>, Vec<UdpEcho>),
    _dir: tempfile::TempDir,
    topo: Topology,
}

impl Node {
    /// Builds the topology for the test `test`, starts the Pods and the proxy (from `meshctl snapshot`), and
    /// waits until the client reaches the ClusterIP. `None` (after saying why) when namespaces are unavailable.
    async fn start(test: &str) -> anyhow::Result<Option<Node>> {
        if netns::skip() {
            return Ok(None);
        }
        let proxy_bin = workspace_bin("mesh-proxy")?;
        let meshctl = workspace_bin("meshctl")?;
        Netns::remove_stale(PREFIX);
        let topo = Topology::new(&format!("{PREFIX}{}-{test}", std::process::id()))?;

        let mut tcp_pods = Vec::new();
        let mut udp_pods = Vec::new();
        for (ns, ip, name) in [(&topo.pod_a, POD_A, "pod-a"), (&topo.pod_b, POD_B, "pod-b")] {
            tcp_pods.push(TcpEcho::from_std(name, ns.tcp_listener(sa(ip, 8080))?)?);
            udp_pods.push(UdpEcho::from_std(name, ns.udp_socket(sa(ip, 5353))?)?);
        }

        let dir = tempfile::Builder::new().prefix("mesh-netns-").tempdir()?;
        let manifests = dir.path().join("manifests");
        std::fs::create_dir(&manifests)?;
        std::fs::write(manifests.join("web.yaml"), MANIFESTS)?;
        let snapshot = dir.path().join("proxy.json");
        write_snapshot(&meshctl, &manifests, &snapshot)?;

        topo.node.prepare_dummy("mesh0")?;

        let mut cmd = topo.node.command(&proxy_bin);
        cmd.arg("--snapshot")
            .arg(&snapshot)
            .args(["--node", "node-a", "--zone", "zone-a", "--interface", "mesh0"])
            .args(["--admin-addr", "127.0.0.1:0", "--drain-s", "60"])
            .env_remove("RUST_LOG");
        let mut proxy = Process::spawn("mesh-proxy", cmd)?;
        let line = wait_for_line(&mut proxy, "mesh-proxy admin=", STARTUP).await?;
        let admin = line.trim_start_matches("mesh-proxy admin=").parse().with_context(|| line.clone())?;
        let node = Node { proxy, admin, _pods: (tcp_pods, udp_pods), _dir: dir, topo };
        let cluster_ip = sa(CLUSTER_IP, 80);
        eventually(CONVERGE, &format!("the client reaches {cluster_ip}"), || async {
            client_conn(&node.topo.client, cluster_ip).await?.0.close().await
        })
        .await
        .map_err(|e| e.context(format!("mesh-proxy's last output:\n{}", node.proxy.tail(40))))?;
        Ok(Some(node))
    }

    /// Kills the proxy, closes the Pods, deletes the namespaces, and checks none is left.
    fn stop(self) {
        let names = self.topo.names();
        drop(self);
        for n in names {
            assert!(!Path::new("/run/netns").join(&n).exists(), "namespace {n} survived its guard");
        }
    }
}

/// From the client namespace: the ClusterIP reaches both Pods (the proxy's own connections leave the node on
/// each Pod's link), the NodePort on the node's address works, UDP to the ClusterIP is answered from the
/// ClusterIP; the proxy holds the ClusterIP on its interface.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_binary_serves_cluster_ip_node_port_and_udp_across_namespaces() -> anyhow::Result<()> {
    let Some(mut node) = Node::start("serve").await? else { return Ok(()) };
    if let Err(e) = serve(&mut node).await {
        // Panic while the node is up: the proxy's guard prints its output as it drops.
        panic!("{e:?}");
    }
    node.stop();
    Ok(())
}

async fn serve(node: &mut Node) -> anyhow::Result<()> {
    let topo = &node.topo;
    let cluster_ip = sa(CLUSTER_IP, 80);
    let node_port = sa(NODE_TO_CLIENT, NODE_PORT);

    let (status, body) = ns_http_get(&topo.node, node.admin, "/ready").await?;
    anyhow::ensure!(status == 200, "/ready from a snapshot file: {status} {body}");

    // The proxy put the ClusterIP on its interface, and nothing else in the node has it.
    let shown = topo.node.ip(&["addr", "show", "dev", "mesh0"])?;
    anyhow::ensure!(shown.contains(&format!("inet {CLUSTER_IP}/32")), "mesh0: {shown}");
    let all = topo.node.ip(&["-o", "addr", "show"])?;
    let holders: Vec<&str> = all.lines().filter(|l| l.contains(&format!("inet {CLUSTER_IP}/"))).collect();
    anyhow::ensure!(holders.len() == 1 && holders[0].contains("mesh0"), "the ClusterIP is on: {holders:?}");

    // With the first connection held open, least-connections sends the second to the other Pod. Each Pod sees
    // the node's address on its own link: the proxy's connections route out of the right interface.
    let (first, a) = client_conn(&topo.client, cluster_ip).await?;
    let (second, b) = client_conn(&topo.client, cluster_ip).await?;
    let mut seen = [(a.name.clone(), a.peer.ip()), (b.name.clone(), b.peer.ip())];
    seen.sort();
    anyhow::ensure!(
        seen == [("pod-a".to_owned(), IpAddr::V4(NODE_TO_A)), ("pod-b".to_owned(), IpAddr::V4(NODE_TO_B))],
        "two held connections to {cluster_ip} should reach pod-a from {NODE_TO_A} and pod-b from {NODE_TO_B}: {seen:?}"
    );
    first.close().await?;
    second.close().await?;

    // The NodePort, on the node's address facing the client.
    let (c, n) = client_conn(&topo.client, node_port).await.context("NodePort from the client")?;
    anyhow::ensure!(["pod-a", "pod-b"].contains(&n.name.as_str()), "{n:?}");
    c.close().await?;

    // UDP to the ClusterIP: answered by a Pod, the reply from the ClusterIP (a client that connected its socket
    // to the Service address, as resolvers do, would drop a reply from anywhere else).
    let udp = topo.client.tokio_udp(sa(CLIENT, 0))?;
    let dns = sa(CLUSTER_IP, 53);
    let (answer, from) = eventually(CONVERGE, &format!("a UDP answer from {dns}"), || async {
        udp_ask(&udp, dns, "query", Duration::from_secs(1)).await
    })
    .await?;
    anyhow::ensure!(from == dns, "the UDP reply came from {from}, not the Service address {dns}");
    anyhow::ensure!(["pod-a", "pod-b"].contains(&answer.name.as_str()), "{answer:?}");
    node.proxy.check_running()
}

/// SIGTERM drains the real binary: new connections are refused, open ones (to the ClusterIP and to the
/// NodePort) keep working until their clients close them, then the proxy exits 0 and removes its interface.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drain_keeps_open_connections_until_closed() -> anyhow::Result<()> {
    let Some(mut node) = Node::start("drain").await? else { return Ok(()) };
    if let Err(e) = drain(&mut node).await {
        panic!("{e:?}");
    }
    node.stop();
    Ok(())
}

async fn drain(node: &mut Node) -> anyhow::Result<()> {
    let topo = &node.topo;
    let cluster_ip = sa(CLUSTER_IP, 80);
    let node_port = sa(NODE_TO_CLIENT, NODE_PORT);
    let (via_cluster_ip, _) = client_conn(&topo.client, cluster_ip).await?;
    let (via_node_port, _) = client_conn(&topo.client, node_port).await?;

    node.proxy.terminate()?;
    for to in [cluster_ip, node_port] {
        eventually(CONVERGE, &format!("new connections to {to} are refused while draining"), || async {
            match topo.client.connect(to, CONNECT).await {
                Ok(_) => anyhow::bail!("{to} still accepts"),
                Err(e) => {
                    anyhow::ensure!(mesh_tests::net::is_refused(&e), "not refused: {e:#}");
                    Ok(())
                }
            }
        })
        .await?;
    }
    for (what, mut c) in [("ClusterIP", via_cluster_ip), ("NodePort", via_node_port)] {
        let again = c.ask().await.with_context(|| format!("the open {what} connection while draining"))?;
        anyhow::ensure!(["pod-a", "pod-b"].contains(&again.name.as_str()), "{again:?}");
        anyhow::ensure!(node.proxy.exited().is_none(), "the proxy exited with a {what} connection open");
        c.close().await?;
    }
    let status = node.proxy.wait_exit(CONVERGE).await?;
    anyhow::ensure!(status.success(), "mesh-proxy exited with {status}: {}", node.proxy.tail(40));
    let links = topo.node.ip(&["link", "show"])?;
    anyhow::ensure!(!links.contains("mesh0"), "mesh0 must go with the proxy: {links}");
    Ok(())
}

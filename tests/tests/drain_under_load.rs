//! SIGTERM under load, with the real binaries: `mesh-proxy` and `mesh-ingress` (fed over xDS by `mesh-control`
//! from a folder this test writes) carry steady keep-alive HTTP/1.1 traffic and long-running requests when they
//! are told to stop, and must let every request already in flight finish, refuse new connections, exit 0 before
//! the drain deadline, and then a new instance on the same addresses (the proxy: same `--state-dir`) serves.
//!
//! ```text
//!   4 steady clients  (keep-alive, /fast/ID one after another) ──┐
//!   4 slow clients    (keep-alive: 3 × /fast/ID, then /slow/ID) ─┤
//!                                                                ├─► mesh-proxy   ClusterIP 127.83.0.10:P ──┐
//!                                                                └─► mesh-ingress 127.83.2.1:H  (drain.test) ┤
//!                                                                                                           ▼
//!   mesh-control (manifest folder) ── xDS ──► both               pod-1..3 127.83.1.{1,2,3}:T (GatedPod)
//! ```
//!
//! The slow requests are what makes "in flight" deterministic: each Pod sends the head and half the body of a
//! slow answer, then waits at a gate the test opens only after SIGTERM has been sent and new connections are
//! refused. Every request is numbered, and the Pods record each number they receive, so a failure can be told
//! apart: a request a Pod received must be answered in full (zero such failures); a request that never reached
//! a Pod may not fail either (neither binary closes an established connection under a client that is sending:
//! the ingress answers the next request on an idle keep-alive connection for a second after SIGTERM, with
//! `Connection: close`), and a connect may fail only after SIGTERM, refused.
//!
//! Not covered here: HTTP/2 (GOAWAY) and TLS clients during the drain, and the drain deadline passing with
//! connections still open (the process then exits anyway; a unit test of the tracker covers the bound).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use mesh_tests::load::{self, Control, Gate, GatedPod, Report};
use mesh_tests::manifests::{self, ReadyPod};
use mesh_tests::{Process, eventually, free_port, http_get, wait_for_line, workspace_bin};

const WAIT: Duration = Duration::from_secs(60);
/// `--drain-s`: far longer than the test holds requests, so a clean exit is never the deadline's doing.
const DRAIN_S: u64 = 60;
const NS: &str = "drain";
const HOST: &str = "drain.test";
const STEADY: usize = 4;
const SLOW: usize = 4;
/// Answers the steady load must reach before SIGTERM, and again after it (proxy), to count as running.
const PROGRESS: u64 = 200;

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(127, 83, 0, 10);
const INGRESS_IP: Ipv4Addr = Ipv4Addr::new(127, 83, 2, 1);

fn pod_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 83, 1, i)
}

/// The Service (ClusterIP, three ready Pods) and the Ingress routing `drain.test` to it.
fn manifests(svc_port: u16, target: u16) -> String {
    let pods: Vec<ReadyPod> = (1..=3).map(|i| ReadyPod::new(format!("pod-{i}"), pod_ip(i), "node-a")).collect();
    let ingress = format!(
        "apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: slow, namespace: {NS}}}
spec:
  ingressClassName: mesh
  rules:
    - host: {HOST}
      http:
        paths:
          - {{path: /, pathType: Prefix, backend: {{service: {{name: slow, port: {{name: http}}}}}}}}
"
    );
    manifests::join(&[
        manifests::service_with_pods(NS, "slow", CLUSTER_IP, "http", svc_port, target, &pods),
        manifests::ingress_class(),
        ingress,
    ])
}

/// The Pods, the control plane and the folder it reads: what both tests share.
struct Cluster {
    gate: Arc<Gate>,
    svc_port: u16,
    xds: String,
    _control: Process,
    _pods: Vec<GatedPod>,
    dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> anyhow::Result<Cluster> {
        let svc_port = free_port(IpAddr::V4(CLUSTER_IP))?;
        let target = free_port(IpAddr::V4(pod_ip(1)))?;
        let gate = Gate::new();
        let mut pods = Vec::new();
        for i in 1..=3 {
            pods.push(GatedPod::start(&format!("pod-{i}"), SocketAddr::from((pod_ip(i), target)), gate.clone()).await?);
        }
        let dir = tempfile::Builder::new().prefix("mesh-drain-").tempdir()?;
        let folder = dir.path().join("manifests");
        std::fs::create_dir(&folder)?;
        std::fs::write(folder.join("slow.yaml"), manifests(svc_port, target))?;
        let mut cmd = Command::new(workspace_bin("mesh-control")?);
        cmd.arg("--manifests").arg(&folder).args(["--xds-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"]);
        let mut control = Process::spawn("mesh-control", cmd)?;
        let line = wait_for_line(&mut control, "mesh-control xds=", WAIT).await?;
        let xds = line.split_whitespace().find_map(|w| w.strip_prefix("xds=")).context("no xds=")?;
        Ok(Cluster { gate, svc_port, xds: format!("http://{xds}"), _control: control, _pods: pods, dir })
    }
}

/// Starts `cmd` and waits for its startup line, then until `to` answers a request with `host`.
async fn start(name: &str, cmd: Command, line: &str, to: SocketAddr, host: &str) -> anyhow::Result<Process> {
    let mut p = Process::spawn(name, cmd)?;
    wait_for_line(&mut p, line, WAIT).await?;
    // Ids from 1e9 up: far from the load's, so a probe never counts as one of its requests.
    let probe = std::sync::atomic::AtomicU64::new(1_000_000_000);
    eventually(WAIT, &format!("{name} answers on {to}"), || async {
        let id = probe.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let r = http_get(to, host, &format!("/fast/{id}")).await?;
        anyhow::ensure!(r.status == 200 && r.body.starts_with("pod "), "{}: {}", r.status, r.body);
        Ok(())
    })
    .await
    .map_err(|e| e.context(format!("{name}'s last output:\n{}", p.tail(40))))?;
    Ok(p)
}

/// How a drain went.
struct Drained {
    report: Report,
    status: ExitStatus,
    /// From SIGTERM to the exit (printed, never asserted).
    took: Duration,
}

/// Runs the load against `to`, sends `process` SIGTERM with slow requests in flight, checks new connections
/// are refused and the process keeps running while they are held, opens the gate, and collects everything.
/// `keeps_connections`: whether established connections keep serving new requests during the drain (L4: yes;
/// the ingress closes each after its answer in flight), in which case the steady load must make progress
/// after SIGTERM too.
async fn drain_under_load(
    process: &mut Process,
    gate: &Gate,
    to: SocketAddr,
    keeps_connections: bool,
) -> anyhow::Result<Drained> {
    let control = Control::new();
    let connect = load::connect_to(to);
    let mut clients = Vec::new();
    for _ in 0..STEADY {
        clients.push(load::steady(connect.clone(), HOST, control.clone()));
    }
    for _ in 0..SLOW {
        clients.push(load::slow(connect.clone(), HOST, control.clone(), 3));
    }
    eventually(WAIT, "the load is flowing and every slow request is held at a Pod", || async {
        let (answered, held) = (control.answered(), gate.held());
        anyhow::ensure!(answered >= PROGRESS && held == SLOW, "{answered} answered, {held} held");
        Ok(())
    })
    .await?;

    control.terminating();
    process.terminate()?;
    let sigterm = Instant::now();
    eventually(WAIT, &format!("new connections to {to} are refused"), || async {
        match tokio::net::TcpStream::connect(to).await {
            Ok(_) => anyhow::bail!("{to} still accepts"),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
            Err(e) => anyhow::bail!("not refused: {e}"),
        }
    })
    .await?;
    if keeps_connections {
        let before = control.answered();
        eventually(WAIT, "the steady load goes on over its established connections", || async {
            let now = control.answered();
            anyhow::ensure!(now >= before + PROGRESS, "{} more answered", now - before);
            Ok(())
        })
        .await?;
    }
    // The slow requests are still held: the process must still be there, waiting for them.
    anyhow::ensure!(gate.held() == SLOW, "{} slow requests held, not {SLOW}", gate.held());
    process.check_running().context("it exited with requests in flight")?;

    gate.open();
    control.stop();
    let mut report = Report::default();
    for c in clients {
        report.merge(c.await?);
    }
    let status = process.wait_exit(Duration::from_secs(DRAIN_S + 30)).await?;
    Ok(Drained { report, status, took: sigterm.elapsed() })
}

/// The checks both binaries must pass.
fn check(name: &str, process: &Process, gate: &Gate, d: &Drained) -> anyhow::Result<()> {
    let r = &d.report;
    let seen = gate.seen();
    eprintln!(
        "{name}: {} answered ({} slow) on {} connections, {} failed, exit {} {:?} after SIGTERM",
        r.ok,
        r.slow_ok,
        r.connections,
        r.failures.len(),
        d.status,
        d.took
    );
    for f in &r.failures {
        eprintln!("  failure: {f:?}");
    }
    anyhow::ensure!(r.slow_ok == SLOW as u64, "{} of {SLOW} slow requests answered in full", r.slow_ok);
    let broken: Vec<_> = r.failures.iter().filter(|f| f.id.is_some_and(|id| seen.contains(&id))).collect();
    anyhow::ensure!(broken.is_empty(), "requests that reached a Pod were not answered in full: {broken:?}");
    for f in &r.failures {
        anyhow::ensure!(f.after_term, "a failure before SIGTERM: {f:?}");
        match f.id {
            None => anyhow::ensure!(f.refused, "a connect after SIGTERM failed otherwise than refused: {f:?}"),
            Some(_) => anyhow::bail!("a request failed on an established connection: {f:?}"),
        }
    }
    anyhow::ensure!(d.status.success(), "{name} exited with {}: {}", d.status, process.tail(40));
    let lines = process.lines();
    anyhow::ensure!(
        !lines.iter().any(|l| l.contains("drain deadline passed")),
        "{name} hit its drain deadline: {}",
        process.tail(40)
    );
    Ok(())
}

fn proxy_command(xds: &str, state_dir: &Path) -> anyhow::Result<Command> {
    let mut cmd = Command::new(workspace_bin("mesh-proxy")?);
    cmd.args(["--xds", xds, "--node", "node-a", "--admin-addr", "127.0.0.1:0"])
        .args(["--drain-s", &DRAIN_S.to_string()])
        .arg("--state-dir")
        .arg(state_dir);
    Ok(cmd)
}

/// mesh-proxy: established connections (through the ClusterIP) keep serving through the drain, the slow
/// answers held at the Pods finish, new connections are refused, it exits 0; a new proxy with the same state
/// folder binds the same ClusterIP:port and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_drains_under_load_then_a_new_instance_serves() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let to = SocketAddr::from((CLUSTER_IP, cluster.svc_port));
    let state = cluster.dir.path().join("proxy-state");
    std::fs::create_dir(&state)?;
    let mut proxy = start("mesh-proxy", proxy_command(&cluster.xds, &state)?, "mesh-proxy admin=", to, HOST).await?;
    let drained = drain_under_load(&mut proxy, &cluster.gate, to, true).await?;
    check("mesh-proxy", &proxy, &cluster.gate, &drained)?;

    let again =
        start("mesh-proxy (restarted)", proxy_command(&cluster.xds, &state)?, "mesh-proxy admin=", to, HOST).await?;
    let lines = again.lines();
    anyhow::ensure!(
        lines.iter().any(|l| l.contains("serving the configuration saved before this restart")),
        "the new instance did not start from the state folder the old one kept: {}",
        again.tail(40)
    );
    Ok(())
}

fn ingress_command(xds: &str, http: SocketAddr, https: SocketAddr) -> anyhow::Result<Command> {
    let mut cmd = Command::new(workspace_bin("mesh-ingress")?);
    cmd.args(["--xds", xds, "--http-addr", &http.to_string(), "--https-addr", &https.to_string()]).args([
        "--admin-addr",
        "127.0.0.1:0",
        "--threads",
        "2",
        "--drain-s",
        &DRAIN_S.to_string(),
    ]);
    Ok(cmd)
}

/// mesh-ingress: requests in flight (the slow answers) finish, each keep-alive connection closes after its
/// answer, new connections are refused, it exits 0; a new ingress on the same addresses serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_drains_under_load_then_a_new_instance_serves() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let http = SocketAddr::from((INGRESS_IP, free_port(IpAddr::V4(INGRESS_IP))?));
    let https = SocketAddr::from((INGRESS_IP, free_port(IpAddr::V4(INGRESS_IP))?));
    let mut ingress =
        start("mesh-ingress", ingress_command(&cluster.xds, http, https)?, "mesh-ingress http=", http, HOST).await?;
    let drained = drain_under_load(&mut ingress, &cluster.gate, http, false).await?;
    check("mesh-ingress", &ingress, &cluster.gate, &drained)?;

    let _again = start(
        "mesh-ingress (restarted)",
        ingress_command(&cluster.xds, http, https)?,
        "mesh-ingress http=",
        http,
        HOST,
    )
    .await?;
    Ok(())
}

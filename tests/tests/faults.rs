//! Faults the node proxy must ride out, with the real binaries: the control plane killed (the proxy keeps
//! serving, reconnects and catches up), and the proxy restarted while the control plane is down (it comes up
//! from the configuration it saved with `--state-dir`, and says so).
//!
//! Addresses: Pods in 127.68.1.0/24, ClusterIPs in 127.69.1.0/24 (no other test uses them); ports from
//! [`free_port`]; the control plane listens on one fixed (free) port so that it can come back at the same
//! address.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use mesh_tests::l4::ask_once;
use mesh_tests::manifests::{self, ReadyPod};
use mesh_tests::{Process, TcpEcho, eventually, free_port, http_get, wait_for_line, workspace_bin};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(60);

/// A ClusterIP Service (port `tcp`) and its slice of ready Pods (name, ip) on node-a.
fn manifests(name: &str, cluster_ip: Ipv4Addr, port: u16, target: u16, pods: &[(&str, Ipv4Addr)]) -> String {
    let pods: Vec<ReadyPod> = pods.iter().map(|(pod, ip)| ReadyPod::new(*pod, *ip, "node-a")).collect();
    manifests::service_with_pods("faults", name, cluster_ip, "tcp", port, target, &pods)
}

fn write(dir: &Path, file: &str, text: &str) -> anyhow::Result<()> {
    let staged = dir.with_extension("staged");
    std::fs::write(&staged, text)?;
    std::fs::rename(&staged, dir.join(file))?;
    Ok(())
}

async fn control(dir: &Path, xds: SocketAddr) -> anyhow::Result<Process> {
    let mut cmd = Command::new(workspace_bin("mesh-control")?);
    cmd.arg("--manifests").arg(dir).args(["--xds-addr", &xds.to_string(), "--admin-addr", "127.0.0.1:0"]);
    let mut p = Process::spawn("mesh-control", cmd)?;
    wait_for_line(&mut p, "mesh-control xds=", WAIT).await?;
    Ok(p)
}

async fn proxy(xds: SocketAddr, state: &Path) -> anyhow::Result<Process> {
    let mut cmd = Command::new(workspace_bin("mesh-proxy")?);
    cmd.args(["--xds", &format!("http://{xds}"), "--node", "node-a", "--admin-addr", "127.0.0.1:0", "--state-dir"])
        .arg(state);
    let mut p = Process::spawn("mesh-proxy", cmd)?;
    wait_for_line(&mut p, "mesh-proxy admin=", WAIT).await?;
    Ok(p)
}

/// Waits until a connection to `addr` is answered by `pod`.
async fn answered_by(addr: SocketAddr, pod: &str) -> anyhow::Result<()> {
    eventually(WAIT, &format!("{addr} answered by {pod}"), || async {
        let a = ask_once(addr).await?;
        anyhow::ensure!(a.name == pod, "answered by {}", a.name);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_outlives_the_control_plane_restarts_from_its_saved_state_and_catches_up() -> anyhow::Result<()> {
    let (cluster_ip, old_ip, ip1, ip2) = (
        Ipv4Addr::new(127, 69, 1, 10),
        Ipv4Addr::new(127, 69, 1, 20),
        Ipv4Addr::new(127, 68, 1, 11),
        Ipv4Addr::new(127, 68, 1, 12),
    );
    let port = free_port(IpAddr::V4(cluster_ip))?;
    anyhow::ensure!(free_port(IpAddr::V4(old_ip)).is_ok());
    let target = free_port(IpAddr::V4(ip1))?;
    let _one = TcpEcho::start("pod-one", SocketAddr::from((ip1, target))).await?;
    let _two = TcpEcho::start("pod-two", SocketAddr::from((ip2, target))).await?;
    let xds = SocketAddr::from(([127, 0, 0, 1], free_port(IpAddr::V4(Ipv4Addr::LOCALHOST))?));
    let root = tempfile::tempdir()?;
    let (dir, state) = (root.path().join("manifests"), root.path().join("state"));
    std::fs::create_dir(&dir)?;
    std::fs::create_dir(&state)?;
    write(&dir, "web.yaml", &manifests("web", cluster_ip, port, target, &[("pod-one", ip1)]))?;
    write(&dir, "old.yaml", &manifests("old", old_ip, port, target, &[("pod-one", ip1)]))?;
    let (service, old) = (SocketAddr::from((cluster_ip, port)), SocketAddr::from((old_ip, port)));

    let c = control(&dir, xds).await?;
    let p = proxy(xds, &state).await?;
    answered_by(service, "pod-one").await?;
    answered_by(old, "pod-one").await?;
    eventually(WAIT, "the configuration is saved", || async {
        anyhow::ensure!(state.join("proxy-state.pb").is_file(), "not yet");
        Ok(())
    })
    .await?;

    // The control plane dies: the proxy keeps serving what it had.
    drop(c);
    eventually(WAIT, "the proxy notices", || {
        let seen = p.lines().iter().any(|l| l.contains("disconnected from the control plane"));
        async move { if seen { Ok(()) } else { anyhow::bail!("not yet") } }
    })
    .await?;
    answered_by(service, "pod-one").await?;

    // The proxy restarts while the control plane is still down: it serves the saved configuration, and says so.
    drop(p);
    let p = proxy(xds, &state).await?;
    answered_by(service, "pod-one").await?;
    answered_by(old, "pod-one").await?;
    assert!(
        p.lines().iter().any(|l| l.contains("serving the configuration saved before this restart")),
        "the proxy does not say it serves a saved configuration:\n{}",
        p.tail(30)
    );

    // The control plane comes back with changes made while it was down (an endpoint moved, a Service deleted):
    // the proxy reconnects and catches up, dropping what the saved configuration had and the control plane no
    // longer has.
    write(&dir, "web.yaml", &manifests("web", cluster_ip, port, target, &[("pod-two", ip2)]))?;
    std::fs::remove_file(dir.join("old.yaml"))?;
    let _c = control(&dir, xds).await?;
    answered_by(service, "pod-two").await?;
    eventually(WAIT, "pod-one gets no new connections", || async {
        for _ in 0..5 {
            let a = ask_once(service).await?;
            anyhow::ensure!(a.name == "pod-two", "still answered by {}", a.name);
        }
        Ok(())
    })
    .await?;
    eventually(WAIT, "the deleted Service stops listening", || async {
        anyhow::ensure!(ask_once(old).await.is_err(), "the deleted Service still answers");
        Ok(())
    })
    .await?;
    Ok(())
}

/// One endpoint of [`slice`]: pod name, address, ready, terminating.
type Ep<'a> = (&'a str, Ipv4Addr, bool, bool);

fn slice(name: &str, target: u16, eps: &[Ep<'_>]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: faults
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports:
  - {{name: tcp, port: {target}, protocol: TCP}}
endpoints:
"
    );
    for (pod, ip, ready, terminating) in eps {
        let serving = *ready || *terminating;
        s += &format!(
            "  - addresses: [{ip}]
    conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}
    nodeName: node-a
    targetRef: {{kind: Pod, namespace: faults, name: {pod}}}
"
        );
    }
    s
}

/// One exchange: the epoch its connection started in, and who answered or why it failed.
type Outcome = (u64, Result<String, String>);

/// Steady load: `n` loops, each opening a new connection per exchange, until told to stop. Each answer is
/// recorded with the epoch current when its connection started, so a test can tell answers to connections
/// opened after a change from those opened before it.
struct Load {
    stop: Arc<AtomicBool>,
    epoch: Arc<AtomicU64>,
    loops: Vec<tokio::task::JoinHandle<Vec<Outcome>>>,
}

impl Load {
    fn start(to: SocketAddr, n: usize) -> Load {
        let (stop, epoch) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let loops = (0..n)
            .map(|_| {
                let (stop, epoch) = (stop.clone(), epoch.clone());
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let e = epoch.load(Ordering::SeqCst);
                        out.push((e, ask_once(to).await.map(|a| a.name).map_err(|err| format!("{err:#}"))));
                    }
                    out
                })
            })
            .collect();
        Load { stop, epoch, loops }
    }

    /// Starts a new epoch: connections opened from now on carry it.
    fn next_epoch(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Stops the loops and returns every exchange's outcome.
    async fn finish(self) -> anyhow::Result<Vec<Outcome>> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        for l in self.loops {
            all.extend(tokio::time::timeout(WAIT, l).await??);
        }
        Ok(all)
    }
}

/// The endpoints of cluster `faults/web/tcp` in the proxy's `/config_dump`: address → health.
async fn endpoints(admin: SocketAddr) -> anyhow::Result<Vec<(String, String)>> {
    let r = http_get(admin, "localhost", "/config_dump").await?;
    let dump: serde_json::Value = serde_json::from_str(&r.body)?;
    let clusters = dump["clusters"].as_array().cloned().unwrap_or_default();
    let web =
        clusters.iter().find(|c| c["name"] == "faults/web/tcp").ok_or_else(|| anyhow::anyhow!("no cluster yet"))?;
    Ok(web["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| (e["address"].as_str().unwrap_or("").to_owned(), e["health"].as_str().unwrap_or("").to_owned()))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_pod_and_a_rolling_update_under_load_lose_no_connection() -> anyhow::Result<()> {
    let cluster_ip = Ipv4Addr::new(127, 69, 2, 10);
    let ips: Vec<Ipv4Addr> = (1..=4).map(|i| Ipv4Addr::new(127, 68, 2, i)).collect();
    let port = free_port(IpAddr::V4(cluster_ip))?;
    let target = free_port(IpAddr::V4(ips[0]))?;
    let mut pods: Vec<Option<TcpEcho>> = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        pods.push(Some(TcpEcho::start(&format!("pod-{}", i + 1), SocketAddr::from((*ip, target))).await?));
    }
    let xds = SocketAddr::from(([127, 0, 0, 1], free_port(IpAddr::V4(Ipv4Addr::LOCALHOST))?));
    let root = tempfile::tempdir()?;
    let (dir, state) = (root.path().join("manifests"), root.path().join("state"));
    std::fs::create_dir(&dir)?;
    std::fs::create_dir(&state)?;
    let svc = manifests("web", cluster_ip, port, target, &[]);
    let svc = &svc[..svc.find("---").unwrap_or(svc.len())];
    write(&dir, "web.yaml", svc)?;
    let ep = |i: usize, ready: bool, terminating: bool| {
        (["pod-1", "pod-2", "pod-3", "pod-4"][i], ips[i], ready, terminating)
    };
    write(
        &dir,
        "web-slice.yaml",
        &slice("web", target, &[ep(0, true, false), ep(1, true, false), ep(2, true, false)]),
    )?;
    let service = SocketAddr::from((cluster_ip, port));

    let _control = control(&dir, xds).await?;
    let mut p = proxy(xds, &state).await?;
    let line = p.lines().into_iter().find(|l| l.contains("mesh-proxy admin=")).unwrap_or_default();
    let admin: SocketAddr = line.rsplit('=').next().unwrap_or_default().parse()?;
    eventually(WAIT, "the Service answers", || async { ask_once(service).await.map(|_| ()) }).await?;
    p.check_running()?;

    let load = Load::start(service, 4);
    // pod-2 dies while its endpoint is still listed as ready: connects to it are refused, and retried elsewhere.
    // (A connection that was already open to it when it died is cut, as with any Pod that dies: only
    // connections opened after the kill must all succeed.)
    pods[1] = None;
    // Dropping the echo aborts its task; the socket closes when the runtime gets to it. Until then the kernel
    // still completes handshakes for it (and resets them at close): the kill is done once connects are refused.
    let pod2 = SocketAddr::from((ips[1], target));
    eventually(WAIT, "pod-2 is gone", || async {
        anyhow::ensure!(TcpStream::connect(pod2).await.is_err(), "pod-2 still accepts");
        Ok(())
    })
    .await?;
    let after_kill = load.next_epoch();
    // pod-2 is reported not ready, pod-1 starts terminating (still serving), pod-4 (new) is ready.
    write(
        &dir,
        "web-slice.yaml",
        &slice("web", target, &[ep(0, false, true), ep(1, false, false), ep(2, true, false), ep(3, true, false)]),
    )?;
    let pod1 = SocketAddr::from((ips[0], target)).to_string();
    eventually(WAIT, "pod-1 terminating in the proxy", || async {
        let eps = endpoints(admin).await?;
        anyhow::ensure!(eps.iter().any(|(a, h)| *a == pod1 && h == "Terminating"), "{eps:?}");
        Ok(())
    })
    .await?;
    let after_terminating = load.next_epoch();
    // The rolling update ends: pod-1 and pod-2 are removed.
    write(&dir, "web-slice.yaml", &slice("web", target, &[ep(2, true, false), ep(3, true, false)]))?;
    eventually(WAIT, "pod-1 removed in the proxy", || async {
        let eps = endpoints(admin).await?;
        anyhow::ensure!(eps.len() == 2 && !eps.iter().any(|(a, _)| *a == pod1), "{eps:?}");
        Ok(())
    })
    .await?;
    // The load keeps running on the new endpoints while these are checked.
    for _ in 0..50 {
        let a = ask_once(service).await?;
        anyhow::ensure!(a.name == "pod-3" || a.name == "pod-4", "answered by {} after the update", a.name);
    }
    let results = load.finish().await?;
    // pod-1 ends only now, after its endpoint is gone and the load that could have reached it is done.
    pods[0] = None;

    let failed: Vec<&String> =
        results.iter().filter(|(epoch, _)| *epoch >= after_kill).filter_map(|(_, r)| r.as_ref().err()).collect();
    let cut = results.iter().filter(|(epoch, r)| *epoch < after_kill && r.is_err()).count();
    println!(
        "{} exchanges through the update, {} failed ({cut} open when pod-2 was killed were cut)",
        results.len(),
        failed.len()
    );
    anyhow::ensure!(
        failed.is_empty(),
        "{} of {} exchanges failed, e.g. {:?}",
        failed.len(),
        results.len(),
        failed.first()
    );
    anyhow::ensure!(results.len() >= 50, "too little load to show anything: {} exchanges", results.len());
    let late: Vec<&String> = results
        .iter()
        .filter(|(epoch, _)| *epoch >= after_terminating)
        .filter_map(|(_, r)| r.as_ref().ok())
        .filter(|name| *name == "pod-1" || *name == "pod-2")
        .collect();
    anyhow::ensure!(late.is_empty(), "connections opened after pod-1 turned terminating reached {late:?}");
    Ok(())
}

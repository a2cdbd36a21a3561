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
use std::time::Duration;

use mesh_tests::l4::ask_once;
use mesh_tests::{Process, TcpEcho, eventually, free_port, wait_for_line, workspace_bin};

const WAIT: Duration = Duration::from_secs(60);

fn manifests(name: &str, cluster_ip: Ipv4Addr, port: u16, target: u16, pods: &[(&str, Ipv4Addr)]) -> String {
    let mut s = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: faults}}
spec:
  type: ClusterIP
  clusterIP: {cluster_ip}
  clusterIPs: [{cluster_ip}]
  ports:
    - {{name: tcp, port: {port}, protocol: TCP, targetPort: {target}}}
---
apiVersion: discovery.k8s.io/v1
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
    for (pod, ip) in pods {
        s += &format!(
            "  - addresses: [{ip}]
    conditions: {{ready: true, serving: true, terminating: false}}
    nodeName: node-a
    targetRef: {{kind: Pod, namespace: faults, name: {pod}}}
"
        );
    }
    s
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

//! `meshctl up`: the local mesh in one command, as a newcomer runs it. The real `meshctl` starts the real
//! `mesh-control` and `mesh-proxy` on a manifest folder and plays its Pods; a request to a ClusterIP reaches a
//! Pod that names itself; an edit of the folder changes where requests go; SIGINT (Ctrl-C) stops every process.
//!
//! Addresses: Pods in 127.66.1.0/24, ClusterIPs in 127.67.1.0/24 (no other test uses them); ports from
//! [`free_port`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use mesh_tests::{Process, eventually, free_port, http_get, wait_for_line, workspace_bin};

const WAIT: Duration = Duration::from_secs(60);

fn service(ip: Ipv4Addr, port: u16, target: u16) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: up}}
spec:
  type: ClusterIP
  clusterIP: {ip}
  clusterIPs: [{ip}]
  ports:
    - {{name: http, port: {port}, protocol: TCP, targetPort: {target}}}
"
    )
}

/// An EndpointSlice with one endpoint per `(pod name, ip, ready)`.
fn slice(target: u16, eps: &[(&str, Ipv4Addr, bool)]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: up
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports:
  - {{name: http, port: {target}, protocol: TCP}}
endpoints:
"
    );
    for (pod, ip, ready) in eps {
        s += &format!(
            "  - addresses: [{ip}]
    conditions: {{ready: {ready}, serving: {ready}, terminating: false}}
    nodeName: node-a
    targetRef: {{kind: Pod, namespace: up, name: {pod}}}
"
        );
    }
    s
}

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    // Written beside the folder, then renamed in: the watcher never sees half a file.
    let staged = dir.parent().context("no parent")?.join(name);
    std::fs::write(&staged, text)?;
    std::fs::rename(&staged, dir.join(name))?;
    Ok(())
}

/// The PIDs `meshctl up` reports for its processes (`  mesh-control  pid 123  …`).
fn child_pids(p: &Process) -> Vec<u32> {
    p.lines()
        .iter()
        .filter_map(|l| {
            let l = l.strip_prefix("stdout| ")?;
            let rest = l.trim_start().split_once(" pid ")?.1;
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_mesh_starts_serves_follows_edits_and_stops() -> anyhow::Result<()> {
    let (cluster_ip, pod1, pod2) =
        (Ipv4Addr::new(127, 67, 1, 10), Ipv4Addr::new(127, 66, 1, 11), Ipv4Addr::new(127, 66, 1, 12));
    let port = free_port(IpAddr::V4(cluster_ip))?;
    let target = free_port(IpAddr::V4(pod1))?;
    let root = tempfile::tempdir()?;
    let dir = root.path().join("manifests");
    std::fs::create_dir(&dir)?;
    write(&dir, "web.yaml", &service(cluster_ip, port, target))?;
    write(&dir, "web-slice.yaml", &slice(target, &[("web-one", pod1, true)]))?;

    let control = workspace_bin("mesh-control")?;
    let mut cmd = Command::new(workspace_bin("meshctl")?);
    cmd.args(["up", "-f"]).arg(&dir).arg("--bin-dir").arg(control.parent().context("no bin dir")?);
    let mut up = Process::spawn("meshctl-up", cmd)?;
    wait_for_line(&mut up, "mesh up", WAIT).await?;
    let pids = child_pids(&up);
    assert_eq!(pids.len(), 2, "mesh-control and mesh-proxy are reported with their PIDs: {:?}", up.lines());
    assert!(up.lines().iter().any(|l| l.contains("curl http://127.67.1.10:")), "no ClusterIP to try: {}", up.tail(40));

    // A Pod answers through the ClusterIP, which lives nowhere but in mesh-proxy.
    let addr = SocketAddr::from((cluster_ip, port));
    let reply = http_get(addr, "web", "/hello").await?;
    assert_eq!(reply.status, 200);
    assert!(reply.body.contains("pod up/web-one"), "{}", reply.body);
    assert!(reply.body.contains("GET /hello"), "{}", reply.body);

    // Edit the folder: web-one is no longer ready, web-two (a new Pod) is. Requests move, and the new Pod
    // answers because meshctl started it.
    write(&dir, "web-slice.yaml", &slice(target, &[("web-one", pod1, false), ("web-two", pod2, true)]))?;
    eventually(WAIT, "requests reach the new Pod", || async {
        let r = http_get(addr, "web", "/").await?;
        anyhow::ensure!(r.body.contains("pod up/web-two"), "answered by: {}", r.body);
        Ok(())
    })
    .await?;

    // Ctrl-C stops everything it started.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(up.pid() as i32).context("pid")?,
        rustix::process::Signal::INT,
    )?;
    wait_for_line(&mut up, "stopped", WAIT).await?;
    eventually(WAIT, "meshctl exits", || {
        let done = up.exited().is_some();
        async move { if done { Ok(()) } else { anyhow::bail!("still running") } }
    })
    .await?;
    for pid in pids {
        let gone = !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "));
        assert!(gone, "process {pid} outlived meshctl up");
    }
    Ok(())
}

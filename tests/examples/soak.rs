//! Soak: a bounded load run through the whole path with endpoint churn every second, on loopback only.
//!
//! ```text
//! cargo build --release --workspace --bins
//! MESH_BIN_DIR=target/release cargo run --release -p mesh-tests --example soak   # SOAK_SECS=180 by default
//! ```
//!
//! It starts the real `mesh-control` (on a manifest folder it writes), `mesh-proxy` and, when the binary exists,
//! `mesh-ingress`; plays the Pods itself (HTTP servers that name themselves); then for `SOAK_SECS` seconds
//! `SOAK_CONNS` client loops send requests, each on a new connection, through User → LoadBalancer IP (node proxy)
//! → ingress → Service → Pod (or, without an ingress, straight to the ClusterIP), while every second the
//! Deployment "rolls": a new Pod starts and is added ready, the oldest turns terminating, the one before is
//! removed, and a Pod's server is stopped two seconds after its endpoint was removed (as the kubelet stops a
//! Pod after endpoint removal has propagated). It prints a Markdown report: requests sent and failed, latency
//! percentiles, and each process's resident memory at start and at end. It stops by itself.
//!
//! Addresses: Pods 127.73.x.y, ClusterIP 127.74.0.10, LoadBalancer IP 127.74.0.20, mesh-ingress 127.75.0.1.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use mesh_tests::{Process, eventually, free_port, http_get, wait_for_line, workspace_bin};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(60);
const HOST: &str = "soak.example.com";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// What one client loop saw: requests sent, failures, latencies of the successes.
type LoopResult = (u64, Vec<String>, Vec<Duration>);

struct Pod {
    name: String,
    ip: Ipv4Addr,
    task: JoinHandle<()>,
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_pod(n: u32, port: u16) -> anyhow::Result<Pod> {
    let ip = Ipv4Addr::new(127, 73, (n / 250) as u8, (n % 250 + 1) as u8);
    let name = format!("web-{n}");
    let l = TcpListener::bind((ip, port)).await.with_context(|| format!("pod {name} on {ip}:{port}"))?;
    let task = tokio::spawn(mesh_control::demo_pod::http_pod(l, format!("soak/{name}")));
    Ok(Pod { name, ip, task })
}

/// The folder: the web Service and its slice, and (with an ingress) the ingress Service, its slice, the
/// IngressClass and an Ingress routing `HOST` to web.
fn write_static(
    dir: &Path,
    web: SocketAddr,
    target: u16,
    lb: SocketAddr,
    ingress: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let mut s = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: soak}}
spec:
  type: ClusterIP
  clusterIP: {ip}
  clusterIPs: [{ip}]
  ports:
    - {{name: http, port: {port}, protocol: TCP, targetPort: {target}}}
",
        ip = web.ip(),
        port = web.port()
    );
    if let Some(ing) = ingress {
        s += &format!(
            "---
apiVersion: v1
kind: Service
metadata: {{name: mesh-ingress, namespace: mesh-system}}
spec:
  type: LoadBalancer
  clusterIP: 127.74.0.11
  clusterIPs: [127.74.0.11]
  ports:
    - {{name: http, port: {lbport}, protocol: TCP, targetPort: {ingport}}}
status:
  loadBalancer:
    ingress: [{{ip: {lbip}, ipMode: VIP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: mesh-ingress-1
  namespace: mesh-system
  labels: {{kubernetes.io/service-name: mesh-ingress}}
addressType: IPv4
ports:
  - {{name: http, port: {ingport}, protocol: TCP}}
endpoints:
  - addresses: [{ingip}]
    conditions: {{ready: true, serving: true, terminating: false}}
    nodeName: node-a
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: web, namespace: soak}}
spec:
  ingressClassName: mesh
  rules:
    - host: {HOST}
      http:
        paths:
          - {{path: /, pathType: Prefix, backend: {{service: {{name: web, port: {{name: http}}}}}}}}
",
            lbip = lb.ip(),
            lbport = lb.port(),
            ingip = ing.ip(),
            ingport = ing.port(),
        );
        s += "---\n";
        s += &mesh_tests::manifests::ingress_class();
    }
    write(dir, "static.yaml", &s)
}

fn write(dir: &Path, file: &str, text: &str) -> anyhow::Result<()> {
    let staged = dir.with_extension("staged");
    std::fs::write(&staged, text)?;
    std::fs::rename(&staged, dir.join(file))?;
    Ok(())
}

/// The web slice: `(pod, ip, ready, terminating)`.
fn write_slice(dir: &Path, target: u16, eps: &[(String, Ipv4Addr, bool, bool)]) -> anyhow::Result<()> {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: soak
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports:
  - {{name: http, port: {target}, protocol: TCP}}
endpoints:
"
    );
    for (pod, ip, ready, terminating) in eps {
        s += &format!(
            "  - addresses: [{ip}]
    conditions: {{ready: {ready}, serving: true, terminating: {terminating}}}
    nodeName: node-a
    targetRef: {{kind: Pod, namespace: soak, name: {pod}}}
"
        );
    }
    write(dir, "web-slice.yaml", &s)
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let secs = env_or("SOAK_SECS", 180);
    let conns = env_or("SOAK_CONNS", 8) as usize;
    let web = SocketAddr::from(([127, 74, 0, 10], free_port(IpAddr::V4(Ipv4Addr::new(127, 74, 0, 10)))?));
    let lb = SocketAddr::from(([127, 74, 0, 20], free_port(IpAddr::V4(Ipv4Addr::new(127, 74, 0, 20)))?));
    let target = free_port(IpAddr::V4(Ipv4Addr::new(127, 73, 0, 1)))?;
    let ingress_bin = workspace_bin("mesh-ingress").ok();
    let ingress_at = SocketAddr::from(([127, 75, 0, 1], free_port(IpAddr::V4(Ipv4Addr::new(127, 75, 0, 1)))?));
    let root = tempfile::tempdir()?;
    let dir = root.path().join("manifests");
    std::fs::create_dir(&dir)?;
    write_static(&dir, web, target, lb, ingress_bin.as_ref().map(|_| ingress_at))?;

    // Three Pods to start with.
    let mut next = 0u32;
    let mut pods: VecDeque<(Pod, bool)> = VecDeque::new(); // (pod, terminating)
    for _ in 0..3 {
        pods.push_back((start_pod(next, target).await?, false));
        next += 1;
    }
    let slice_of = |pods: &VecDeque<(Pod, bool)>| -> Vec<(String, Ipv4Addr, bool, bool)> {
        pods.iter().map(|(p, term)| (p.name.clone(), p.ip, !term, *term)).collect()
    };
    write_slice(&dir, target, &slice_of(&pods))?;

    let xds = SocketAddr::from(([127, 0, 0, 1], free_port(IpAddr::V4(Ipv4Addr::LOCALHOST))?));
    let mut cmd = Command::new(workspace_bin("mesh-control")?);
    cmd.arg("--manifests").arg(&dir).args([
        "--xds-addr",
        &xds.to_string(),
        "--admin-addr",
        "127.0.0.1:0",
        "--log",
        "warn",
    ]);
    let mut control = Process::spawn("mesh-control", cmd)?;
    wait_for_line(&mut control, "mesh-control xds=", WAIT).await?;
    let mut cmd = Command::new(workspace_bin("mesh-proxy")?);
    cmd.args(["--xds", &format!("http://{xds}"), "--node", "node-a", "--admin-addr", "127.0.0.1:0", "--log", "warn"]);
    let mut proxy = Process::spawn("mesh-proxy", cmd)?;
    wait_for_line(&mut proxy, "mesh-proxy admin=", WAIT).await?;
    let mut procs = vec![control, proxy];
    let (to, host) = match &ingress_bin {
        Some(bin) => {
            let mut cmd = Command::new(bin);
            cmd.args([
                "--xds",
                &format!("http://{xds}"),
                "--http-addr",
                &ingress_at.to_string(),
                "--https-addr",
                "127.75.0.1:0",
                "--admin-addr",
                "127.0.0.1:0",
                "--log",
                "warn",
            ]);
            let mut ingress = Process::spawn("mesh-ingress", cmd)?;
            wait_for_line(&mut ingress, "mesh-ingress ", WAIT).await?;
            procs.push(ingress);
            (lb, HOST)
        }
        None => (web, "web"),
    };
    eventually(WAIT, "the path answers", || async {
        let r = http_get(to, host, "/").await?;
        anyhow::ensure!(r.status == 200, "status {}: {}", r.status, r.body);
        Ok(())
    })
    .await?;
    let rss_start: Vec<(String, u64)> = procs.iter().map(|p| (p.name().to_owned(), rss_kb(p.pid()))).collect();

    // The load.
    let stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<JoinHandle<LoopResult>> = (0..conns)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut sent, mut failed, mut lat) = (0u64, Vec::new(), Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
                    sent += 1;
                    match http_get(to, host, "/soak").await {
                        Ok(r) if r.status == 200 => lat.push(t0.elapsed()),
                        Ok(r) => failed.push(format!("status {}: {}", r.status, r.body.trim())),
                        Err(e) => failed.push(format!("{e:#}")),
                    }
                }
                (sent, failed, lat)
            })
        })
        .collect();

    // The churn: every second a new Pod, the oldest serving one terminating, the terminating one removed (and
    // stopped two seconds later).
    let began = Instant::now();
    let mut stopping: VecDeque<(Pod, Instant)> = VecDeque::new();
    let mut rolls = 0u64;
    let mut samples: Vec<(u64, Vec<u64>)> = Vec::new();
    while began.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(i) = pods.iter().position(|(_, term)| *term) {
            let (p, _) = pods.remove(i).context("the terminating pod")?;
            stopping.push_back((p, Instant::now() + Duration::from_secs(2)));
        }
        if let Some((_, term)) = pods.iter_mut().find(|(_, term)| !*term) {
            *term = true;
        }
        pods.push_back((start_pod(next, target).await?, false));
        next += 1;
        write_slice(&dir, target, &slice_of(&pods))?;
        while stopping.front().is_some_and(|(_, at)| *at <= Instant::now()) {
            stopping.pop_front();
        }
        rolls += 1;
        if rolls.is_multiple_of(30) {
            samples.push((rolls, procs.iter().map(|p| rss_kb(p.pid())).collect()));
        }
        for p in &mut procs {
            p.check_running()?;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (mut sent, mut failed, mut lat) = (0u64, Vec::new(), Vec::new());
    for l in loops {
        let (s, f, l) = l.await?;
        sent += s;
        failed.extend(f);
        lat.extend(l);
    }
    let rss_end: Vec<u64> = procs.iter().map(|p| rss_kb(p.pid())).collect();
    lat.sort();
    let pct = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or_default()
    };

    let path = if ingress_bin.is_some() {
        "User → LB IP (mesh-proxy) → mesh-ingress → Service → Pod"
    } else {
        "Client → ClusterIP (mesh-proxy) → Pod (no mesh-ingress binary)"
    };
    println!("| soak | value |\n|---|---|");
    println!("| path | {path} |");
    println!("| duration | {secs} s, {conns} client loops, a new connection per request |");
    println!(
        "| endpoint churn | {rolls} rolls (one per second: a Pod added, one terminating, one removed), {} Pods in all |",
        next
    );
    println!("| requests sent | {sent} |");
    println!("| requests failed | {} |", failed.len());
    println!(
        "| latency p50 / p99 / max | {:.2} / {:.2} / {:.2} ms |",
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    for ((name, start), end) in rss_start.iter().zip(&rss_end) {
        println!("| {name} RSS start → end | {:.1} → {:.1} MB |", *start as f64 / 1024.0, *end as f64 / 1024.0);
    }
    println!(
        "\nRSS every 30 s (MB):\n\n| after | {} |\n|---|{}",
        rss_start.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(" | "),
        "---|".repeat(rss_start.len())
    );
    println!(
        "| start | {} |",
        rss_start.iter().map(|(_, k)| format!("{:.1}", *k as f64 / 1024.0)).collect::<Vec<_>>().join(" | ")
    );
    for (at, kb) in &samples {
        println!(
            "| {at} s | {} |",
            kb.iter().map(|k| format!("{:.1}", *k as f64 / 1024.0)).collect::<Vec<_>>().join(" | ")
        );
    }
    if let Some(f) = failed.first() {
        println!("\nfirst failure: {f}");
    }
    Ok(())
}

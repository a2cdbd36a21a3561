//! `meshctl up`: the whole mesh on one machine, from a manifest folder, with no cluster.
//!
//! It starts the real processes, talking xDS to each other exactly as in a cluster: `mesh-control` watching
//! the folder, one `mesh-proxy` (the node proxy), and `mesh-ingress` when the binary is there. It also plays
//! the Pods: every endpoint address in the folder's EndpointSlices gets a small server that answers with the
//! Pod's name, so a `curl` shows where a request landed. Addresses must be in 127.0.0.0/8 (as in
//! `examples/shop`), which Linux routes to `lo` with nothing to configure.
//!
//! Why the demo Pods follow the folder: editing an EndpointSlice in the folder changes the routes live (the
//! control plane watches it), and a new endpoint must answer, or the edit would look broken. The folder is read
//! again every second and Pods are started and stopped to match.
//!
//! Which Service is the ingress's: `--ingress-service` (default `mesh-system/mesh-ingress`). Its endpoints are
//! not played by a demo Pod: `mesh-ingress` itself listens there (`--http-addr`/`--https-addr` from the ports
//! named `http` and `https`), so User → LoadBalancer/NodePort → node proxy → ingress → Service → Pod is the
//! real path.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use mesh_control::demo_pod::http_pod;
use mesh_control::source::{load_dir, sync};
use mesh_control::store::Store;
use mesh_control::translate::{Options, translate};

use crate::routes::{self, RouteTable};

/// What `meshctl up` starts.
#[derive(Debug, Clone)]
pub struct UpConfig {
    /// The manifest folder.
    pub dir: PathBuf,
    /// Where `mesh-control`, `mesh-proxy` and `mesh-ingress` are (by default, next to `meshctl`).
    pub bin_dir: PathBuf,
    /// The node the proxy plays (Local traffic policies keep this node's endpoints).
    pub node: String,
    /// The IngressClass the ingress serves.
    pub ingress_class: String,
    /// `namespace/name` of the Service in front of the ingress.
    pub ingress_service: String,
}

/// A transport protocol of a demo Pod port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    /// TCP: an HTTP/1.1 responder.
    Tcp,
    /// UDP: an echo.
    Udp,
}

/// What the folder asks for: the Pods to play and where the ingress listens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Every endpoint to play, with the Pod's name.
    pub pods: BTreeMap<(Proto, SocketAddr), String>,
    /// The ingress Service's `http` endpoint.
    pub ingress_http: Option<SocketAddr>,
    /// The ingress Service's `https` endpoint.
    pub ingress_https: Option<SocketAddr>,
}

/// The routes of a folder, as `meshctl routes --manifests` shows them, and the problems found.
pub fn table(dir: &Path, node: Option<&str>) -> anyhow::Result<RouteTable> {
    let loaded = load_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mut store = Store::new();
    sync(&mut store, &loaded);
    let mut t = routes::from_snapshot(&translate(&store, &Options::default()), node)?;
    t.problems.extend(loaded.rejected.iter().map(|r| format!("rejected {r}")));
    Ok(t)
}

/// The Pods and ingress addresses a route table implies.
pub fn plan(t: &RouteTable, ingress_service: &str) -> Plan {
    let mut p = Plan::default();
    for row in &t.addresses {
        let proto = if row.protocol.eq_ignore_ascii_case("udp") { Proto::Udp } else { Proto::Tcp };
        for e in &row.endpoints {
            let Ok(addr) = e.address.parse::<SocketAddr>() else { continue };
            if row.service == ingress_service {
                match row.port.as_str() {
                    "http" => p.ingress_http = Some(addr),
                    "https" => p.ingress_https = Some(addr),
                    _ => {}
                }
                continue;
            }
            let name = e.pod.clone().unwrap_or_else(|| format!("{} endpoint {addr}", row.service));
            p.pods.entry((proto, addr)).or_insert(name);
        }
    }
    p
}

/// What to try once the mesh is up: one request per path through the mesh, with what it shows.
pub fn try_lines(t: &RouteTable, ingress_service: &str, ingress_running: bool) -> Vec<String> {
    let mut out = Vec::new();
    let lb = t.addresses.iter().find(|r| r.service == ingress_service && r.kind == "LoadBalancer" && r.port == "http");
    let node_port =
        t.addresses.iter().find(|r| r.service == ingress_service && r.kind == "NodePort" && r.port == "http");
    if ingress_running {
        let plain = t.ingress.iter().find(|r| {
            r.listener == "http" && r.host != "*" && !r.host.starts_with("*.") && !r.backend.starts_with("redirect")
        });
        // A host with its own certificate: plain HTTP to it is redirected to HTTPS.
        let tls_host = |h: &str| {
            t.ingress.iter().any(|r| r.listener == "http" && r.host == h && r.backend.starts_with("redirect"))
        };
        let tls = t.ingress.iter().find(|r| r.listener == "https" && !r.host.starts_with('*') && tls_host(&r.host));
        if let (Some(lb), Some(r)) = (lb, plain) {
            out.push(format!(
                "curl -H 'Host: {}' http://{}{}    # User → LoadBalancer → ingress → {}",
                r.host,
                lb.address.trim_end_matches(":80"),
                r.path,
                r.backend
            ));
        }
        if let (Some(lb), Some(r)) = (lb, tls) {
            let ip = lb.address.rsplit_once(':').map_or(lb.address.as_str(), |(ip, _)| ip);
            out.push(format!(
                "curl -k --resolve {h}:443:{ip} https://{h}{p}    # TLS by SNI → {b}",
                h = r.host,
                p = r.path,
                b = r.backend
            ));
        }
        if let (Some(np), Some(r)) = (node_port, plain) {
            let port = np.address.rsplit_once(':').map_or("", |(_, p)| p);
            out.push(format!("curl -H 'Host: {}' http://127.0.0.1:{port}{}    # NodePort → ingress", r.host, r.path));
        }
    }
    if let Some(c) = t.addresses.iter().find(|r| {
        r.kind == "ClusterIP" && r.protocol == "TCP" && r.service != ingress_service && !r.endpoints.is_empty()
    }) {
        out.push(format!("curl http://{}/    # ClusterIP → {}", c.address, c.service));
    }
    out
}

/// The lowest port an unprivileged process may bind (`net.ipv4.ip_unprivileged_port_start`; 1024 if unknown).
fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

/// What to tell a user whose Service addresses use ports this process may not bind: without the warning the
/// mesh comes up and those addresses silently refuse connections (the proxy logs and retries the bind).
pub fn low_port_warning(t: &RouteTable, root: bool, unprivileged_start: u16) -> Option<String> {
    if root {
        return None;
    }
    let low: BTreeSet<u16> = t
        .addresses
        .iter()
        .filter_map(|r| r.address.rsplit_once(':')?.1.parse::<u16>().ok())
        .filter(|p| *p < unprivileged_start)
        .collect();
    let first = low.iter().next()?;
    let low = low.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
    Some(format!(
        "warning: the folder's Services listen on ports {low}, below {unprivileged_start}, which only root may bind: \
         those addresses will refuse connections. Run as root, or allow low ports once with \
         `sudo sysctl net.ipv4.ip_unprivileged_port_start={first}`."
    ))
}

/// A running demo Pod.
#[derive(Debug)]
struct Pod {
    task: JoinHandle<()>,
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The demo Pods, kept in step with the plan.
#[derive(Debug, Default)]
pub struct Pods {
    running: BTreeMap<(Proto, SocketAddr), (String, Pod)>,
    failed: BTreeSet<(Proto, SocketAddr)>,
}

impl Pods {
    /// Starts the Pods the plan has and this does not; stops those it no longer has. A Pod that cannot bind
    /// (the address is taken, or not local) is reported once and tried again on the next call.
    pub async fn reconcile(&mut self, plan: &Plan) {
        self.running.retain(|k, (name, _)| plan.pods.get(k) == Some(name));
        for (key, name) in &plan.pods {
            if self.running.contains_key(key) {
                continue;
            }
            let (proto, addr) = *key;
            let started = match proto {
                Proto::Tcp => TcpListener::bind(addr).await.map(|l| tokio::spawn(http_pod(l, name.clone()))),
                Proto::Udp => UdpSocket::bind(addr).await.map(|s| tokio::spawn(udp_pod(s, name.clone()))),
            };
            match started {
                Ok(task) => {
                    self.failed.remove(key);
                    self.running.insert(*key, (name.clone(), Pod { task }));
                }
                Err(e) => {
                    if self.failed.insert(*key) {
                        warn!(%addr, pod = %name, "demo Pod cannot listen: {e}");
                    }
                }
            }
        }
    }

    /// How many are running.
    pub fn len(&self) -> usize {
        self.running.len()
    }
}

/// A UDP echo that says who it is.
async fn udp_pod(s: UdpSocket, name: String) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, from)) = s.recv_from(&mut buf).await else { continue };
        let mut reply = format!("pod {name}: ").into_bytes();
        reply.extend_from_slice(&buf[..n]);
        let _ = s.send_to(&reply, from).await;
    }
}

/// A child process and the addresses it printed.
#[derive(Debug)]
pub struct Started {
    /// Its name.
    pub name: &'static str,
    /// The process.
    pub child: Child,
    /// Its first stdout line (`mesh-control xds=… admin=…`).
    pub line: String,
}

impl Started {
    /// The value of `key=` in its line.
    pub fn addr(&self, key: &str) -> Option<String> {
        self.line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=').map(str::to_owned))
    }
}

/// Starts `bin` and waits (bounded) for the line it prints once its listeners are bound.
async fn start(name: &'static str, bin: &Path, args: &[String]) -> anyhow::Result<Started> {
    let mut cmd = Command::new(bin);
    die_with_parent(&mut cmd);
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let out = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(out).lines();
    let line = match tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await {
        Ok(Ok(Some(l))) => l,
        Ok(_) => bail!("{name} exited before it was up (see its log above)"),
        Err(_) => bail!("{name} printed no addresses within 60 s"),
    };
    // Keep draining its stdout so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Started { name, child, line })
}

/// Makes the child get SIGTERM when `meshctl` dies, however it dies (even SIGKILL), so a local mesh never
/// outlives the command that started it.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe calls are allowed:
    // it makes one prctl(2) system call and touches no memory of the parent (no allocation, no locks).
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))
                .map_err(std::io::Error::from)
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_: &mut Command) {}

/// Waits (bounded) until `http://admin/ready` answers 200.
async fn ready(name: &str, admin: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut s) = TcpStream::connect(admin).await {
            let req = format!("GET /ready HTTP/1.1\r\nhost: {admin}\r\nconnection: close\r\n\r\n");
            let mut got = String::new();
            if s.write_all(req.as_bytes()).await.is_ok()
                && s.read_to_string(&mut got).await.is_ok()
                && got.starts_with("HTTP/1.1 200")
            {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{name} not ready within 60 s (http://{admin}/ready)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asks a child to stop (SIGTERM, so it drains), then kills it if it has not exited within `grace`.
async fn stop(s: &mut Started, grace: Duration) {
    if let Some(pid) = s.child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    if tokio::time::timeout(grace, s.child.wait()).await.is_err() {
        warn!(process = s.name, "did not stop within {grace:?}; killing it");
        let _ = s.child.kill().await;
    }
}

/// Runs the local mesh until `until` resolves (Ctrl-C), then stops everything it started.
pub async fn run(cfg: UpConfig, until: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let first = table(&cfg.dir, None)?;
    if let Some(w) = low_port_warning(&first, rustix::process::geteuid().is_root(), unprivileged_port_start()) {
        println!("{w}");
    }
    let mut pods = Pods::default();
    let plan_now = plan(&first, &cfg.ingress_service);
    pods.reconcile(&plan_now).await;

    let bin = |name: &str| cfg.bin_dir.join(name);
    let dir = cfg.dir.display().to_string();
    let mut children: Vec<Started> = Vec::new();
    let started = async {
        let control = start(
            "mesh-control",
            &bin("mesh-control"),
            &[
                "--manifests".into(),
                dir.clone(),
                "--xds-addr".into(),
                "127.0.0.1:0".into(),
                "--admin-addr".into(),
                "127.0.0.1:0".into(),
            ],
        )
        .await?;
        let xds = control.addr("xds").context("mesh-control printed no xds= address")?;
        children.push(control);
        let proxy = start(
            "mesh-proxy",
            &bin("mesh-proxy"),
            &[
                "--xds".into(),
                format!("http://{xds}"),
                "--node".into(),
                cfg.node.clone(),
                "--admin-addr".into(),
                "127.0.0.1:0".into(),
            ],
        )
        .await?;
        ready("mesh-proxy", &proxy.addr("admin").context("mesh-proxy printed no admin= address")?).await?;
        children.push(proxy);
        let ingress_bin = bin("mesh-ingress");
        match (&plan_now.ingress_http, ingress_bin.exists()) {
            (Some(http), true) => {
                let mut args = vec![
                    "--xds".into(),
                    format!("http://{xds}"),
                    "--node".into(),
                    cfg.node.clone(),
                    "--ingress-class".into(),
                    cfg.ingress_class.clone(),
                    "--http-addr".into(),
                    http.to_string(),
                    "--admin-addr".into(),
                    "127.0.0.1:0".into(),
                ];
                if let Some(https) = plan_now.ingress_https {
                    args.extend(["--https-addr".into(), https.to_string()]);
                }
                // The L4 half of the mesh is worth running on its own: an ingress that cannot start is reported,
                // not fatal.
                match start("mesh-ingress", &ingress_bin, &args).await {
                    Ok(mut ingress) => match ingress.addr("admin") {
                        Some(admin) => match ready("mesh-ingress", &admin).await {
                            Ok(()) => children.push(ingress),
                            Err(e) => {
                                stop(&mut ingress, Duration::from_secs(5)).await;
                                println!("(mesh-ingress did not become ready: {e:#}; running without it)");
                            }
                        },
                        None => {
                            stop(&mut ingress, Duration::from_secs(5)).await;
                            println!("(mesh-ingress printed no admin= address; running without it)");
                        }
                    },
                    Err(e) => println!("(mesh-ingress did not start: {e:#}; running without it)"),
                }
            }
            (None, _) => println!(
                "(no Service {} with an `http` port in the folder: mesh-ingress not started)",
                cfg.ingress_service
            ),
            (_, false) => println!(
                "({} not found: mesh-ingress not started; build it with `cargo build --bins`)",
                ingress_bin.display()
            ),
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = started {
        for c in children.iter_mut().rev() {
            stop(c, Duration::from_secs(5)).await;
        }
        return Err(e);
    }

    let ingress_running = children.iter().any(|c| c.name == "mesh-ingress");
    println!("\nmesh is up: manifests {dir}, node {}", cfg.node);
    for c in &children {
        println!("  {:<13} pid {:<7} {}", c.name, c.child.id().unwrap_or(0), c.line);
    }
    println!("  demo Pods     {} (each answers with its name)\n", pods.len());
    print!("{}", first.to_text());
    println!("\nTry:");
    for l in try_lines(&first, &cfg.ingress_service, ingress_running) {
        println!("  {l}");
    }
    println!(
        "\nEdit the files in {dir} and the routes change live; `meshctl routes --control http://{}` shows them. Ctrl-C stops everything.",
        children[0].addr("xds").unwrap_or_default()
    );
    println!("mesh up");

    tokio::pin!(until);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = &mut until => break,
            _ = tick.tick() => {
                match table(&cfg.dir, None) {
                    Ok(t) => pods.reconcile(&plan(&t, &cfg.ingress_service)).await,
                    Err(e) => debug!("re-reading the folder: {e}"),
                }
                let exited = children.iter_mut().find_map(|c| match c.child.try_wait() {
                    Ok(Some(status)) => Some((c.name, status)),
                    _ => None,
                });
                if let Some((name, status)) = exited {
                    warn!(process = name, %status, "exited; stopping the mesh");
                    for c in children.iter_mut().rev() {
                        stop(c, Duration::from_secs(5)).await;
                    }
                    bail!("{name} exited ({status})");
                }
            }
        }
    }
    println!("stopping");
    for c in children.iter_mut().rev() {
        stop(c, Duration::from_secs(10)).await;
    }
    println!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shop() -> RouteTable {
        table(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/shop"), None).unwrap()
    }

    #[test]
    fn the_example_plans_its_pods_and_the_ingress_addresses() {
        let p = plan(&shop(), "mesh-system/mesh-ingress");
        assert_eq!(p.ingress_http, Some("127.40.0.1:8080".parse().unwrap()));
        assert_eq!(p.ingress_https, Some("127.40.0.1:8443".parse().unwrap()));
        // web: 4 Pods × 2 ports, api: 2, dns: TCP and UDP, notfound: 1. Never the ingress's own endpoint.
        assert_eq!(p.pods.len(), 13, "{:?}", p.pods);
        assert!(p.pods.keys().all(|(_, a)| a.ip().to_string() != "127.40.0.1"));
        assert_eq!(
            p.pods.get(&(Proto::Udp, "127.20.0.53:5353".parse().unwrap())).map(String::as_str),
            Some("shop/dns-6b7c8d9f0-g5h6j")
        );
    }

    #[test]
    fn low_ports_are_warned_about_only_when_they_cannot_be_bound() {
        let t = shop();
        let w = low_port_warning(&t, false, 1024).expect("the example uses ports 53, 80 and 443");
        assert!(w.contains("ports 53, 80, 443,") && w.contains("ip_unprivileged_port_start=53"), "{w}");
        assert_eq!(low_port_warning(&t, true, 1024), None, "root binds anything");
        assert_eq!(low_port_warning(&t, false, 0), None, "low ports allowed");
    }

    #[test]
    fn what_to_try_goes_through_each_path() {
        let t = shop();
        let with = try_lines(&t, "mesh-system/mesh-ingress", true);
        assert!(with.iter().any(|l| l.starts_with("curl -H 'Host: admin.example.com' http://127.30.0.1/")), "{with:?}");
        assert!(with.iter().any(|l| l.contains("--resolve shop.example.com:443:127.30.0.1")), "{with:?}");
        assert!(with.iter().any(|l| l.contains("http://127.0.0.1:30080")), "{with:?}");
        assert!(with.iter().any(|l| l.starts_with("curl http://127.10.0.10:80/")), "{with:?}");
        let without = try_lines(&t, "mesh-system/mesh-ingress", false);
        assert_eq!(without.len(), 1, "only the ClusterIP without an ingress: {without:?}");
    }
}

//! `mesh-proxy`: the per-node L4 proxy (a DaemonSet).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use mesh_proxy::app;
use mesh_proxy::balance::Algorithm;
use mesh_proxy::state::DataConfig;
use mesh_runtime::dataplane::SourceArgs;
use mesh_runtime::shutdown;
use mesh_runtime::telemetry::LogArgs;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Lb {
    LeastConnections,
    RoundRobin,
}

/// The mesh node proxy: ClusterIP, NodePort and LoadBalancer addresses to ready Pods.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    source: SourceArgs,
    /// This node's name (Local traffic policies); NODE_NAME from the downward API in a DaemonSet.
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// This node's zone, for topology-aware routing. Normally learned from the Node's `topology.kubernetes.io/zone`
    /// label through mesh-control (and followed as it changes); this overrides it.
    #[arg(long, env = "MESH_ZONE")]
    zone: Option<String>,
    /// Where to serve the admin endpoints (/ready, /metrics, /config_dump, /logging).
    #[arg(long, env = "MESH_ADMIN_ADDR", default_value = "127.0.0.1:19001")]
    admin_addr: SocketAddr,
    /// How to choose among endpoints.
    #[arg(long, env = "MESH_LB", value_enum, default_value_t = Lb::LeastConnections)]
    lb: Lb,
    /// How long one connect attempt may take before another endpoint is tried, in milliseconds.
    #[arg(long, env = "MESH_CONNECT_TIMEOUT_MS", default_value_t = 2000)]
    connect_timeout_ms: u64,
    /// How many endpoints a connection tries before it is refused.
    #[arg(long, env = "MESH_CONNECT_ATTEMPTS", default_value_t = 3)]
    connect_attempts: usize,
    /// How long a UDP flow lives without traffic, in seconds.
    #[arg(long, env = "MESH_UDP_IDLE_S", default_value_t = 30)]
    udp_idle_s: u64,
    /// How long after losing the control plane the proxy still reports itself healthy on its health check
    /// ports (`serviceProxyHealthy`, as kube-proxy's healthz), in seconds; then 503, so load balancers stop
    /// sending to this node.
    #[arg(long, env = "MESH_STALE_AFTER_S", default_value_t = 60)]
    stale_after_s: u64,
    /// Put Service addresses on this dummy interface (needs CAP_NET_ADMIN), as kube-proxy's IPVS mode does.
    #[arg(long, env = "MESH_INTERFACE")]
    interface: Option<String>,
    /// On SIGTERM, how long open connections may take to finish, in seconds.
    #[arg(long, env = "MESH_DRAIN_S", default_value_t = 30)]
    drain_s: u64,
    /// Keep the last configuration accepted from the control plane in this folder, and start from it when the
    /// control plane cannot be reached (a node restart during a control-plane outage keeps serving).
    #[arg(long, env = "MESH_STATE_DIR", requires = "xds")]
    state_dir: Option<PathBuf>,
    /// Threads that serve connections (0: one per core). With 1, a single-threaded runtime: no work-stealing
    /// queues or cross-thread wake-ups, which is what one core is fastest with.
    #[arg(long, env = "MESH_WORKERS", default_value_t = 0)]
    workers: usize,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = match args.workers {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        0 => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
    }
    .context("starting the async runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let logging = args.log.init()?;
    let source = args.source.source()?;
    let cfg = app::Config {
        source,
        node: args.node,
        zone: args.zone,
        admin_addr: args.admin_addr,
        data: DataConfig {
            algorithm: match args.lb {
                Lb::LeastConnections => Algorithm::LeastConnections,
                Lb::RoundRobin => Algorithm::RoundRobin,
            },
            connect_timeout: Duration::from_millis(args.connect_timeout_ms),
            connect_attempts: args.connect_attempts.max(1),
            udp_idle: Duration::from_secs(args.udp_idle_s),
            stale_after: Duration::from_secs(args.stale_after_s),
        },
        interface: args.interface,
        logging: Some(logging),
        state_dir: args.state_dir,
    };
    let drain = Duration::from_secs(args.drain_s);
    shutdown::run_until_signal(
        "mesh-proxy",
        app::build(cfg),
        |app| format!("mesh-proxy admin={}", app.admin_addr),
        async |app: app::App| shutdown::report_drain(app.drain(drain).await),
    )
    .await?;
    Ok(())
}

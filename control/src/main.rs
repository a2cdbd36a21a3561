//! `mesh-control`: watches the cluster state (a manifest folder, for now) and keeps the routing snapshot current.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use mesh_control::app;
use mesh_control::translate::Options;

/// The mesh control plane.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Folder of Kubernetes manifests (YAML/JSON) to serve, re-read on change: the mesh without a cluster.
    #[arg(long, env = "MESH_MANIFESTS")]
    manifests: Option<PathBuf>,
    /// Kubeconfig of the cluster to watch (in-cluster config when neither this nor --manifests is given).
    #[arg(long, env = "MESH_KUBECONFIG", conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,
    /// Quiet time after a change to the manifest folder before it is re-read, in milliseconds.
    #[arg(long, env = "MESH_DEBOUNCE_MS", default_value_t = 50)]
    debounce_ms: u64,
    /// Port of the ingress/http Listener sent to ingress proxies (a real Envoy binds it).
    #[arg(long, env = "MESH_INGRESS_HTTP_PORT", default_value_t = 80)]
    ingress_http_port: u16,
    /// Port of the ingress/https Listener.
    #[arg(long, env = "MESH_INGRESS_HTTPS_PORT", default_value_t = 443)]
    ingress_https_port: u16,
    /// Where to serve xDS (ADS over gRPC).
    #[arg(long, env = "MESH_XDS_ADDR", default_value = "0.0.0.0:18000")]
    xds_addr: std::net::SocketAddr,
    /// How long an xDS stream waits after a change before pushing (a burst becomes one push), in milliseconds.
    #[arg(long, env = "MESH_PUSH_DEBOUNCE_MS", default_value_t = 20)]
    push_debounce_ms: u64,
    /// How many large xDS pushes (initial snapshots) may be in flight at once; bounds memory when many proxies
    /// connect together.
    #[arg(long, env = "MESH_LARGE_PUSHES", default_value_t = 4)]
    large_pushes: usize,
    /// Serve xDS over TLS with this PEM certificate chain (with --xds-tls-key).
    #[arg(long, env = "MESH_XDS_TLS_CERT", requires = "xds_tls_key")]
    xds_tls_cert: Option<PathBuf>,
    /// The PEM private key of --xds-tls-cert.
    #[arg(long, env = "MESH_XDS_TLS_KEY", requires = "xds_tls_cert")]
    xds_tls_key: Option<PathBuf>,
    /// Require xDS clients to present a certificate signed by this PEM CA.
    #[arg(long, env = "MESH_XDS_CLIENT_CA", requires = "xds_tls_cert")]
    xds_client_ca: Option<PathBuf>,
    /// Where to serve the admin endpoints (/ready, /metrics, /config_dump, /debug/clients, /logging).
    #[arg(long, env = "MESH_ADMIN_ADDR", default_value = "127.0.0.1:19000")]
    admin_addr: std::net::SocketAddr,
    /// Log filter (tracing EnvFilter syntax; RUST_LOG overrides).
    #[arg(long, env = "MESH_LOG", default_value = "info")]
    log: String,
    /// Log as JSON lines.
    #[arg(long, env = "MESH_LOG_JSON")]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let logging = mesh_runtime::telemetry::init_tracing(&args.log, args.log_json)?;
    let Some(manifests) = args.manifests else {
        anyhow::bail!(
            "watching the Kubernetes API is not built yet (it comes with the Kubernetes source); use --manifests DIR"
        );
    };
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let tls = match (&args.xds_tls_cert, &args.xds_tls_key) {
        (Some(cert), Some(key)) => Some(mesh_control::xds::ServerTls {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            client_ca_pem: args.xds_client_ca.as_ref().map(read).transpose()?,
        }),
        _ => None,
    };
    let cfg = app::Config {
        manifests,
        debounce: Duration::from_millis(args.debounce_ms),
        translate: Options { ingress_http_port: args.ingress_http_port, ingress_https_port: args.ingress_https_port },
        xds_addr: args.xds_addr,
        xds: mesh_control::xds::XdsConfig {
            debounce: Duration::from_millis(args.push_debounce_ms),
            tls,
            large_pushes: args.large_pushes,
        },
        admin_addr: args.admin_addr,
        logging: Some(logging),
    };
    let app = app::build(cfg).await.context("starting mesh-control")?;
    // One machine-readable line a supervisor or test can wait for.
    println!("mesh-control xds={} admin={}", app.xds_addr, app.admin_addr);
    let signal = mesh_runtime::shutdown::signal().await?;
    tracing::info!(?signal, "shutting down");
    app.stop().await;
    Ok(())
}

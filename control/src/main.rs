//! `mesh-control`: watches the cluster state (the Kubernetes API, or a manifest folder) and keeps the routing
//! snapshot current; with `--publish-service`/`--publish-address`, the elected leader writes Ingress status.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use mesh_control::app;
use mesh_control::source::kubernetes;
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
    /// Watch the namespaced kinds (Services, EndpointSlices, Ingresses, Secrets) of this namespace only.
    #[arg(long, env = "MESH_NAMESPACE", conflicts_with = "manifests")]
    namespace: Option<String>,
    /// Write the LoadBalancer addresses of this Service (namespace/name: the ingress proxies' Service) into the
    /// status of the Ingresses we serve.
    #[arg(long, env = "MESH_PUBLISH_SERVICE", conflicts_with_all = ["manifests", "publish_address"])]
    publish_service: Option<String>,
    /// Write these IPs or hostnames (comma-separated) into the status of the Ingresses we serve.
    #[arg(long, env = "MESH_PUBLISH_ADDRESS", value_delimiter = ',', conflicts_with = "manifests")]
    publish_address: Vec<String>,
    /// Name of the Lease electing the replica that writes Ingress status.
    #[arg(long, env = "MESH_LEASE_NAME", default_value = "mesh-control")]
    lease_name: String,
    /// Namespace of the Lease (default: the Pod's namespace, else `default`).
    #[arg(long, env = "MESH_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Our identity in the Lease (default: $POD_NAME, else $HOSTNAME, else the host name).
    #[arg(long, env = "MESH_IDENTITY")]
    identity: Option<String>,
    /// How long a Lease not renewed stays held, in seconds (renewal is attempted every 2 s; a leader that
    /// cannot renew for two thirds of this steps down).
    #[arg(long, env = "MESH_LEASE_DURATION_S", default_value_t = 15)]
    lease_duration_s: u64,
    /// Quiet time after a change to the manifest folder before it is re-read, in milliseconds.
    #[arg(long, env = "MESH_DEBOUNCE_MS", default_value_t = 50)]
    debounce_ms: u64,
    /// Port of the ingress/http Listener sent to ingress proxies (a real Envoy binds it).
    #[arg(long, env = "MESH_INGRESS_HTTP_PORT", default_value_t = 80)]
    ingress_http_port: u16,
    /// Port of the ingress/https Listener.
    #[arg(long, env = "MESH_INGRESS_HTTPS_PORT", default_value_t = 443)]
    ingress_https_port: u16,
    /// Redirect plain HTTP to HTTPS (308) for hosts that have TLS, unless an Ingress or its IngressClass says
    /// otherwise (annotation `mesh.dev/ssl-redirect`). Off by default: plain HTTP is served, as the Ingress API
    /// conformance tests expect.
    #[arg(long, env = "MESH_SSL_REDIRECT")]
    ssl_redirect: bool,
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
    #[command(flatten)]
    log: mesh_runtime::telemetry::LogArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let logging = args.log.init()?;
    let source = match (&args.manifests, &args.kubeconfig) {
        (Some(dir), _) => {
            app::SourceConfig::Manifests { dir: dir.clone(), debounce: Duration::from_millis(args.debounce_ms) }
        }
        (None, kubeconfig) => {
            app::SourceConfig::Kubernetes(Box::new(kube_settings(&args, kubeconfig.as_deref()).await?))
        }
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
        source,
        translate: Options {
            ingress_http_port: args.ingress_http_port,
            ingress_https_port: args.ingress_https_port,
            ssl_redirect: args.ssl_redirect,
        },
        xds_addr: args.xds_addr,
        xds: mesh_control::xds::XdsConfig {
            debounce: Duration::from_millis(args.push_debounce_ms),
            tls,
            large_pushes: args.large_pushes,
        },
        admin_addr: args.admin_addr,
        logging: Some(logging),
    };
    mesh_runtime::shutdown::run_until_signal(
        "mesh-control",
        app::build(cfg),
        |app| format!("mesh-control xds={} admin={}", app.xds_addr, app.admin_addr),
        async |app: app::App| app.stop().await,
    )
    .await?;
    Ok(())
}

/// The Kubernetes source's settings from the flags.
async fn kube_settings(args: &Args, kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kubernetes::Settings> {
    let client = kubernetes::connect(kubeconfig).await?;
    let publish = match (&args.publish_service, args.publish_address.is_empty()) {
        (Some(svc), _) => Some(kubernetes::Publish::service(svc)?),
        (None, false) => Some(kubernetes::Publish::Addresses(args.publish_address.clone())),
        (None, true) => None,
    };
    if let (Some(kubernetes::Publish::Service(svc)), Some(ns)) = (&publish, &args.namespace)
        && svc.namespace != *ns
    {
        anyhow::bail!("--publish-service {svc} is outside --namespace {ns}: it would never be seen");
    }
    let status = publish.map(|publish| {
        let identity = args
            .identity
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()))
            .filter(|i| !i.is_empty())
            .unwrap_or_else(|| format!("mesh-control-{}", std::process::id()));
        let namespace =
            args.lease_namespace.clone().or_else(kubernetes::pod_namespace).unwrap_or_else(|| "default".into());
        let mut lease = kubernetes::LeaseSettings::new(&args.lease_name, namespace, identity);
        lease.lease_duration = Duration::from_secs(args.lease_duration_s.max(3));
        lease.renew_deadline = lease.lease_duration * 2 / 3;
        kubernetes::StatusSettings { publish, lease, retry: Duration::from_secs(5) }
    });
    Ok(kubernetes::Settings {
        client,
        namespace: args.namespace.clone(),
        backoff: kubernetes::BackoffSettings::default(),
        status,
    })
}

//! `meshctl`: see where traffic goes, and write what a proxy would be sent. Its features live here, not in
//! the library: [`routes`] (the routing table an operator reads) and [`up`] (the local mesh).

mod routes;
mod up;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use mesh_control::source::{load_dir, sync};
use mesh_control::store::Store;
use mesh_control::translate::{Options, Role, Snapshot, translate};
use xds_proto::names::{ROLE_INGRESS, ROLE_PROXY, file_role};
use xds_proto::types::ResourceType;

/// Operate the mesh.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (tracing EnvFilter syntax; RUST_LOG overrides).
    #[arg(long, env = "MESH_LOG", default_value = "warn", global = true)]
    log: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RolesArg {
    Proxy,
    Ingress,
    Both,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RoleArg {
    Proxy,
    Ingress,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Where every Service address, ingress host and path leads, with endpoints and problems.
    Routes {
        /// Translate this manifest folder offline.
        #[arg(long, env = "MESH_MANIFESTS", required_unless_present = "control")]
        manifests: Option<PathBuf>,
        /// Ask a running control plane (http://ADDR) instead.
        #[arg(long, env = "MESH_CONTROL", conflicts_with = "manifests")]
        control: Option<String>,
        /// Show what this node's proxy uses (Local traffic policies keep only its endpoints); with --control,
        /// also the node name meshctl gives the control plane.
        #[arg(long, env = "MESH_NODE")]
        node: Option<String>,
        /// With --control: which roles to ask for (the node proxy's Service addresses, the ingress routes, or
        /// both).
        #[arg(long, value_enum, default_value_t = RolesArg::Both)]
        role: RolesArg,
        /// With --control: the IngressClass to ask for.
        #[arg(long, env = "MESH_INGRESS_CLASS", default_value = xds_proto::DEFAULT_INGRESS_CLASS)]
        ingress_class: String,
        /// With --control: the xDS protocol variant.
        #[arg(long, default_value = "delta")]
        protocol: xds_proto::client::Protocol,
        /// With --control: how long to wait for the control plane, in seconds.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// The xDS resources a role is sent, as JSON (Envoy's mapping): the file `--snapshot` loads.
    Snapshot {
        /// The manifest folder to translate.
        #[arg(long, env = "MESH_MANIFESTS")]
        manifests: PathBuf,
        /// Which role's resources.
        #[arg(long, value_enum, default_value_t = RoleArg::Proxy)]
        role: RoleArg,
        /// For the ingress role: the IngressClass.
        #[arg(long, env = "MESH_INGRESS_CLASS", default_value = xds_proto::DEFAULT_INGRESS_CLASS)]
        ingress_class: String,
        /// For the proxy role: include this node's locality (its Node's zone), as mesh-control sends it.
        #[arg(long, env = "MESH_NODE")]
        node: Option<String>,
    },
    /// Exit 0 when an admin endpoint answers 2xx (a liveness/readiness probe for containers whose admin port
    /// is loopback-only: an exec probe runs inside the Pod's network namespace, an HTTP probe from the kubelet
    /// does not).
    Probe {
        /// The endpoint: http://127.0.0.1:PORT/PATH.
        #[arg(default_value = "http://127.0.0.1:19000/ready")]
        url: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 2)]
        timeout: u64,
    },
    /// Start the whole local mesh from a manifest folder: mesh-control, mesh-proxy, mesh-ingress and demo Pods
    /// on loopback. Ctrl-C stops it.
    Up {
        /// The manifest folder (addresses in 127.0.0.0/8). Default: ./examples/shop if it exists, else a copy of
        /// it built into meshctl, written to a temporary folder.
        #[arg(short = 'f', long)]
        file: Option<PathBuf>,
        /// The node the proxy plays (Local traffic policies keep this node's endpoints).
        #[arg(long, env = "MESH_NODE", default_value = "node-a")]
        node: String,
        /// Where mesh-control, mesh-proxy and mesh-ingress are. Default: next to meshctl.
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// The IngressClass mesh-ingress serves.
        #[arg(long, env = "MESH_INGRESS_CLASS", default_value = xds_proto::DEFAULT_INGRESS_CLASS)]
        ingress_class: String,
        /// `namespace/name` of the Service in front of mesh-ingress: its endpoints are where mesh-ingress listens.
        #[arg(long, default_value = "mesh-system/mesh-ingress")]
        ingress_service: String,
    },
}

/// `examples/shop`, built in: `meshctl up` with no folder runs it.
const EXAMPLE: [(&str, &str); 9] = [
    ("api.yaml", include_str!("../../../../examples/shop/api.yaml")),
    ("dns.yaml", include_str!("../../../../examples/shop/dns.yaml")),
    ("ingress-service.yaml", include_str!("../../../../examples/shop/ingress-service.yaml")),
    ("ingress.yaml", include_str!("../../../../examples/shop/ingress.yaml")),
    ("ingressclass.yaml", include_str!("../../../../examples/shop/ingressclass.yaml")),
    ("legacy.yaml", include_str!("../../../../examples/shop/legacy.yaml")),
    ("notfound.yaml", include_str!("../../../../examples/shop/notfound.yaml")),
    ("tls.yaml", include_str!("../../../../examples/shop/tls.yaml")),
    ("web.yaml", include_str!("../../../../examples/shop/web.yaml")),
];

fn offline(dir: &Path) -> anyhow::Result<Snapshot> {
    let loaded = load_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for r in &loaded.rejected {
        eprintln!("warning: rejected {r}");
    }
    let mut store = Store::new();
    sync(&mut store, &loaded);
    Ok(translate(&store, &Options::default()))
}

/// Asking a running control plane, as a client of the roles asked for.
struct Ask {
    endpoint: String,
    node: Option<String>,
    ingress_class: String,
    protocol: xds_proto::client::Protocol,
    timeout: Duration,
}

impl Ask {
    async fn fetch(&self, role: &str) -> anyhow::Result<routes::Encoded> {
        let node = self.node.clone().unwrap_or_else(|| "meshctl".into());
        let mut cfg = xds_proto::client::ClientConfig::new(self.endpoint.clone(), node, role);
        cfg.protocol = self.protocol;
        if role == ROLE_INGRESS {
            cfg.ingress_class = Some(self.ingress_class.clone());
        }
        let got = xds_proto::client::fetch_once(cfg, self.timeout)
            .await
            .with_context(|| format!("asking {} for the {role} role", self.endpoint))?;
        Ok(got.into_iter().map(|(t, m)| (t, m.into_iter().map(|(n, e)| (n, e.body)).collect())).collect())
    }

    async fn table(&self, roles: RolesArg) -> anyhow::Result<routes::RouteTable> {
        let mut t = routes::RouteTable::default();
        if roles != RolesArg::Ingress {
            t.addresses = routes::address_rows(&self.fetch(ROLE_PROXY).await?, self.node.as_deref())?;
        }
        if roles != RolesArg::Proxy {
            t.ingress = routes::ingress_rows(&self.ingress_class, &self.fetch(ROLE_INGRESS).await?)?;
        }
        // Over the same connection settings, from mesh.v1.Inspect next to ADS: the same lines as offline.
        let cfg = xds_proto::client::ClientConfig::new(self.endpoint.clone(), "meshctl", ROLE_PROXY);
        t.problems = xds_proto::inspect::fetch_problems(&cfg, self.timeout)
            .await
            .with_context(|| format!("asking {} for its problems", self.endpoint))?;
        Ok(t)
    }
}

/// One HTTP/1.0 GET over a plain socket: no client library for a probe run every few seconds.
fn probe(url: &str, timeout: Duration) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").with_context(|| format!("{url}: only http:// URLs are probed"))?;
    let (authority, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
    let addr: std::net::SocketAddr = authority.parse().with_context(|| format!("{authority}: not IP:PORT"))?;
    let mut conn =
        std::net::TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connecting to {addr}"))?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n")?;
    let mut head = Vec::new();
    conn.take(4096).read_to_end(&mut head)?;
    let text = String::from_utf8_lossy(&head);
    let status = text.split_whitespace().nth(1).unwrap_or_default();
    if !status.starts_with('2') {
        bail!("{url} answered {:?}", text.lines().next().unwrap_or_default());
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    mesh_runtime::telemetry::init_tracing(&cli.log, false)?;
    match cli.command {
        Command::Routes { manifests, control, node, role, ingress_class, protocol, timeout, output } => {
            let table = match (control, manifests) {
                (Some(endpoint), _) => {
                    let ask = Ask { endpoint, node, ingress_class, protocol, timeout: Duration::from_secs(timeout) };
                    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(ask.table(role))?
                }
                (None, Some(dir)) => routes::from_snapshot(&offline(&dir)?, node.as_deref())?,
                (None, None) => bail!("say where the routes come from: --manifests DIR or --control http://ADDR"),
            };
            match output {
                Output::Table => print!("{}", table.to_text()),
                Output::Json => println!("{}", serde_json::to_string_pretty(&table)?),
                Output::Yaml => print!("{}", serde_yaml::to_string(&table)?),
            }
        }
        Command::Snapshot { manifests, role, ingress_class, node } => {
            let snap = offline(&manifests)?;
            let role = match role {
                RoleArg::Proxy => Role::Proxy,
                RoleArg::Ingress => Role::Ingress { class: ingress_class },
            };
            if let Role::Ingress { class } = &role
                && !snap.ingress.contains_key(class)
            {
                eprintln!(
                    "warning: IngressClass {class:?} is not one of ours in this folder; the ingress gets nothing"
                );
            }
            let rs = snap.for_client(&role, node.as_deref().unwrap_or_default());
            let items =
                ResourceType::ALL.into_iter().flat_map(|t| rs.get(t).values().map(move |r| (t, r.body.clone())));
            let items: Vec<(ResourceType, bytes::Bytes)> = items.collect();
            let role_name = match &role {
                Role::Proxy => file_role(None),
                Role::Ingress { class } => file_role(Some(class)),
            };
            let doc = xds_proto::snapshot_file::to_json(&role_name, items.iter().map(|(t, b)| (*t, &b[..])))?;
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
        Command::Probe { url, timeout } => probe(&url, Duration::from_secs(timeout))?,
        Command::Up { file, node, bin_dir, ingress_class, ingress_service } => {
            let _embedded;
            let dir = match file {
                Some(dir) => dir,
                None if Path::new("examples/shop").is_dir() => PathBuf::from("examples/shop"),
                None => {
                    let tmp = tempfile::tempdir().context("making a folder for the built-in example")?;
                    for (name, text) in EXAMPLE {
                        std::fs::write(tmp.path().join(name), text)?;
                    }
                    println!("using the built-in example, written to {}", tmp.path().display());
                    let dir = tmp.path().to_owned();
                    _embedded = tmp;
                    dir
                }
            };
            let bin_dir = match bin_dir {
                Some(d) => d,
                None => std::env::current_exe()?.parent().context("meshctl has no folder")?.to_owned(),
            };
            let cfg = up::UpConfig { dir, bin_dir, node, ingress_class, ingress_service };
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(async {
                let until = async {
                    if let Err(e) = mesh_runtime::shutdown::signal().await {
                        eprintln!("cannot wait for Ctrl-C: {e}");
                        std::future::pending::<()>().await;
                    }
                };
                up::run(cfg, until).await
            })?;
        }
    }
    Ok(())
}

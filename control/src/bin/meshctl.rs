//! `meshctl`: see where traffic goes, and write what a proxy would be sent.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use mesh_control::routes;
use mesh_control::source::{load_dir, sync};
use mesh_control::store::Store;
use mesh_control::translate::{Options, Role, Snapshot, translate};
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
        /// Show what this node's proxy uses (Local traffic policies keep only its endpoints).
        #[arg(long, env = "MESH_NODE")]
        node: Option<String>,
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
    },
    /// Start the whole local mesh from a manifest folder.
    Up {
        /// The manifest folder.
        #[arg(short = 'f', long)]
        file: PathBuf,
    },
}

fn offline(dir: &Path) -> anyhow::Result<Snapshot> {
    let loaded = load_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for r in &loaded.rejected {
        eprintln!("warning: rejected {r}");
    }
    let mut store = Store::new();
    sync(&mut store, &loaded);
    Ok(translate(&store, &Options::default()))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    mesh_runtime::telemetry::init_tracing(&cli.log, false)?;
    match cli.command {
        Command::Routes { manifests, control, node, output } => {
            if control.is_some() {
                bail!("meshctl routes --control is not built yet (it comes with the xDS server); use --manifests DIR");
            }
            let dir = manifests.context("--manifests DIR is required")?;
            let snap = offline(&dir)?;
            let table = routes::from_snapshot(&snap, node.as_deref())?;
            match output {
                Output::Table => print!("{}", table.to_text()),
                Output::Json => println!("{}", serde_json::to_string_pretty(&table)?),
                Output::Yaml => print!("{}", serde_yaml::to_string(&table)?),
            }
        }
        Command::Snapshot { manifests, role, ingress_class } => {
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
            let rs = snap.role(&role);
            let items =
                ResourceType::ALL.into_iter().flat_map(|t| rs.get(t).values().map(move |r| (t, r.body.clone())));
            let items: Vec<(ResourceType, bytes::Bytes)> = items.collect();
            let role_name = match &role {
                Role::Proxy => "proxy".to_owned(),
                Role::Ingress { class } => format!("ingress/{class}"),
            };
            let doc = xds_proto::snapshot_file::to_json(&role_name, items.iter().map(|(t, b)| (*t, &b[..])))?;
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
        Command::Up { .. } => {
            bail!("meshctl up is not built yet: it needs mesh-proxy and mesh-ingress, which are not built yet");
        }
    }
    Ok(())
}

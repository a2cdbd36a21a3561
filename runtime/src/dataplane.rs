//! The shell of a data-plane binary (`mesh-proxy`, `mesh-ingress`), written once: where the configuration
//! comes from ([`Source`]), the admin server with its metrics ([`AdminShell`]), the xDS client task that makes
//! the binary ready once every type it needs has arrived ([`spawn_xds`]); `main`'s signals → build → drain is
//! [`crate::shutdown::run_until_signal`], shared with `mesh-control`. Each binary keeps only what is its own:
//! its table and xDS handler, its listeners, its drain.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use prometheus_client::registry::Registry;
use tracing::{info, warn};
use xds_proto::client::{self, ClientConfig, ClientError, ClientHandle, ClientStatus, Handler, Protocol, Update};
use xds_proto::snapshot_file::{self, SnapshotFileError};
use xds_proto::types::ResourceType;

use crate::{Admin, AdminError, AdminServer, JsonSource, Metrics, Readiness, ReloadHandle, Shutdown};

/// Where a data plane's configuration comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A control plane (`http://host:port`), over ADS.
    Xds {
        /// The endpoint.
        endpoint: String,
        /// Delta or SotW.
        protocol: Protocol,
    },
    /// A snapshot file written by `meshctl snapshot --role …`.
    File(PathBuf),
}

impl Source {
    /// From the `--xds` and `--snapshot` flags (a snapshot file wins; clap makes them exclusive anyway).
    pub fn from_flags(
        xds: Option<String>,
        snapshot: Option<PathBuf>,
        protocol: Protocol,
    ) -> Result<Source, ShellError> {
        match (xds, snapshot) {
            (_, Some(path)) => Ok(Source::File(path)),
            (Some(endpoint), None) => Ok(Source::Xds { endpoint, protocol }),
            (None, None) => Err(ShellError::NoSource),
        }
    }
}

/// The flags that say where a data plane's configuration comes from (`#[command(flatten)]` them).
#[derive(Debug, Clone, clap::Args)]
pub struct SourceArgs {
    /// The control plane, http://ADDR (or https:// with TLS).
    #[arg(long, env = "MESH_XDS", required_unless_present = "snapshot")]
    pub xds: Option<String>,
    /// Serve from a snapshot file (meshctl snapshot --role proxy|ingress) instead of a control plane.
    #[arg(long, env = "MESH_SNAPSHOT", conflicts_with = "xds")]
    pub snapshot: Option<PathBuf>,
    /// xDS protocol variant: delta or sotw.
    #[arg(long, env = "MESH_XDS_PROTOCOL", default_value = "delta")]
    pub xds_protocol: Protocol,
}

impl SourceArgs {
    /// The source the flags name.
    pub fn source(self) -> Result<Source, ShellError> {
        Source::from_flags(self.xds, self.snapshot, self.xds_protocol)
    }
}

/// Why the shell of a data-plane binary could not start.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    /// The admin server could not start.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// The control plane address is unusable.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Neither `--xds` nor `--snapshot` was given.
    #[error("give --xds http://ADDR or --snapshot FILE")]
    NoSource,
}

/// A running admin server (loopback): `/ready`, `/metrics`, `/config_dump`, `/logging`.
#[derive(Debug)]
pub struct AdminShell {
    /// Its state (readiness, metrics).
    pub admin: Admin,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Stops it.
    pub stop: Shutdown,
}

impl AdminShell {
    /// Registers the binary's metrics (`register`) next to the process metrics every binary gets, and serves
    /// them with `dump` as `/config_dump` on `addr` (port 0 picks one).
    pub async fn start(
        addr: SocketAddr,
        register: impl FnOnce(&mut Registry),
        dump: JsonSource,
        logging: Option<ReloadHandle>,
    ) -> Result<AdminShell, AdminError> {
        let registry = Metrics::new();
        registry.with_registry(register);
        let mut builder = Admin::builder().metrics(registry).config_dump(dump);
        if let Some(l) = logging {
            builder = builder.logging(l);
        }
        let admin = builder.build()?;
        let stop = Shutdown::new();
        let (addr, _) = AdminServer::serve(addr, admin.clone(), stop.clone()).await?;
        Ok(AdminShell { admin, addr, stop })
    }

    /// The readiness flag `/ready` reports.
    pub fn readiness(&self) -> &Readiness {
        self.admin.readiness()
    }
}

/// Starts the xDS client with `handler`, and a task that makes `readiness` true once every type in `needed` has
/// been accepted once (an empty answer is an answer: empty is never confused with not-yet-loaded). Every
/// status change, and a last one with `connected: false` when the client stops, is shown to `on_status` (e.g.
/// to tell whether the configuration is being kept current).
pub fn spawn_xds(
    cfg: ClientConfig,
    handler: impl Handler,
    readiness: Readiness,
    needed: &'static [ResourceType],
    mut on_status: impl FnMut(&ClientStatus) + Send + 'static,
) -> Result<ClientHandle, ClientError> {
    cfg.validate()?;
    let handle = client::spawn(cfg, handler);
    let mut status = handle.status();
    tokio::spawn(async move {
        let mut ready = false;
        loop {
            {
                let s = status.borrow_and_update();
                if !ready && s.is_loaded(needed) {
                    ready = true;
                    readiness.set_ready(true);
                    info!("configuration loaded: ready");
                }
                on_status(&s);
            }
            if status.changed().await.is_err() {
                let last = ClientStatus { connected: false, ..status.borrow().clone() };
                on_status(&last);
                return;
            }
        }
    });
    Ok(handle)
}

/// A data plane's table as the shell sees it: converted at the edge, one resource type at a time.
pub trait ConfigTable: Clone {
    /// Why a resource cannot be served (names the resource).
    type Error: std::error::Error + Send + Sync + 'static;

    /// The next table after one type's update: `resources` gives the body of each `changed` name; `removed`
    /// names are gone. `self` is untouched, so an error leaves it in force.
    fn apply<'a>(
        &self,
        kind: ResourceType,
        resources: impl Fn(&str) -> Option<&'a [u8]>,
        changed: &[String],
        removed: &[String],
        version: &str,
    ) -> Result<Self, Self::Error>;

    /// The names of `kind` in the table.
    fn names(&self, kind: ResourceType) -> Vec<String>;
}

/// Implements [`ConfigTable`] for a table type whose inherent `apply` and `names` have the trait's signatures
/// (`config_table!(Table, TableError)`), so each data plane writes them once.
#[macro_export]
macro_rules! config_table {
    ($table:ty, $error:ty) => {
        impl $crate::dataplane::ConfigTable for $table {
            type Error = $error;

            fn apply<'a>(
                &self,
                kind: ::xds_proto::types::ResourceType,
                resources: impl Fn(&str) -> Option<&'a [u8]>,
                changed: &[String],
                removed: &[String],
                version: &str,
            ) -> Result<Self, Self::Error> {
                <$table>::apply(self, kind, resources, changed, removed, version)
            }

            fn names(&self, kind: ::xds_proto::types::ResourceType) -> Vec<String> {
                <$table>::names(self, kind)
            }
        }
    };
}

/// The next table after an xDS update (with `removed` as the names gone), or the reason to NACK it, logged:
/// the table in force stays.
pub fn next_table<T: ConfigTable>(current: &T, u: &Update, removed: &[String]) -> Result<T, String> {
    let get = |name: &str| u.resources.get(name).map(|e| &e.body[..]);
    current.apply(u.kind, get, &u.changed, removed, &u.version).map_err(|e| {
        warn!(r#type = %u.kind, version = %u.version, "rejecting the update, keeping the table in force: {e}");
        e.to_string()
    })
}

/// Logs a stream to the control plane opening or ending (an xDS handler's `connected`).
pub fn log_connected(connected: bool) {
    if connected {
        info!("connected to the control plane");
    } else {
        warn!("disconnected from the control plane; serving the last accepted configuration");
    }
}

/// Why a snapshot file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError<E: std::error::Error + 'static> {
    /// The file is not a snapshot, or a resource in it is malformed.
    #[error("snapshot file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        source: SnapshotFileError,
    },
    /// The file was written for another role (or IngressClass).
    #[error("snapshot file {path} is for role {role:?}; {wanted}")]
    Role {
        /// The file.
        path: String,
        /// Its role.
        role: String,
        /// Which file this binary needs.
        wanted: String,
    },
    /// A resource cannot be served.
    #[error("snapshot file {path}: {source}")]
    Resource {
        /// The file.
        path: String,
        /// The resource and why.
        source: Box<E>,
    },
}

/// Reads a snapshot file (`meshctl snapshot`) whose role `is_ours` accepts (else the error says `wanted`), and
/// returns `table` with every type replaced by the file's: what the file does not hold is removed.
pub fn load_snapshot<T: ConfigTable>(
    path: &Path,
    table: &T,
    is_ours: impl Fn(&str) -> bool,
    wanted: &str,
) -> Result<T, SnapshotError<T::Error>> {
    let loaded = read_snapshot(path, table, is_ours, wanted);
    // Reading JSON needed the Envoy descriptor pool (~8 MiB); a data plane never needs it again.
    crate::memory::release_after_load();
    loaded
}

fn read_snapshot<T: ConfigTable>(
    path: &Path,
    table: &T,
    is_ours: impl Fn(&str) -> bool,
    wanted: &str,
) -> Result<T, SnapshotError<T::Error>> {
    let shown = path.display().to_string();
    let (role, mut by_type) =
        snapshot_file::read(path).map_err(|source| SnapshotError::File { path: shown.clone(), source })?;
    if !is_ours(&role) {
        return Err(SnapshotError::Role { path: shown, role, wanted: wanted.to_owned() });
    }
    let mut table = table.clone();
    for kind in ResourceType::ALL {
        let map = by_type.remove(&kind).unwrap_or_default();
        let names: Vec<String> = map.keys().cloned().collect();
        let removed: Vec<String> = table.names(kind).into_iter().filter(|n| !map.contains_key(n)).collect();
        table = table
            .apply(kind, |n| map.get(n).map(|r| &r.body[..]), &names, &removed, "file")
            .map_err(|source| SnapshotError::Resource { path: shown.clone(), source: Box::new(source) })?;
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_comes_from_either_flag() {
        let p = Protocol::Delta;
        assert!(matches!(Source::from_flags(None, Some("f".into()), p), Ok(Source::File(_))));
        assert!(matches!(Source::from_flags(Some("http://x:1".into()), None, p), Ok(Source::Xds { .. })));
        assert!(matches!(Source::from_flags(None, None, p), Err(ShellError::NoSource)));
    }

    #[tokio::test]
    async fn the_admin_shell_serves_readiness_and_metrics() {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let shell = AdminShell::start(any, |_| {}, std::sync::Arc::new(|| serde_json::json!({})), None).await.unwrap();
        assert_ne!(shell.addr.port(), 0);
        assert!(!shell.admin.readiness().is_ready());
        shell.readiness().set_ready(true);
        assert!(shell.admin.readiness().is_ready());
        shell.stop.trigger();
    }

    #[tokio::test]
    async fn an_unusable_control_plane_address_is_refused_before_anything_starts() {
        let cfg = ClientConfig::new("not a url", "n", client::ROLE_PROXY);
        let err = spawn_xds(cfg, NoOp, Readiness::default(), &[], |_| {}).unwrap_err();
        assert!(!err.to_string().is_empty());
    }

    #[derive(Debug)]
    struct NoOp;

    impl Handler for NoOp {
        fn apply(&mut self, _: &client::Update) -> Result<(), String> {
            Ok(())
        }
    }
}

//! Where the table comes from: an xDS stream (the control plane) or a snapshot file, through one converter.
//!
//! Either way each resource type's update is converted against the current table; an unusable resource rejects
//! the whole update (a NACK over xDS, an error for a file) and the table in force stays as it was.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{info, warn};
use xds_proto::client::{Handler, Update};
use xds_proto::snapshot_file::{self, FileResource, SnapshotFileError};
use xds_proto::types::ResourceType;

use crate::state::Shared;
use crate::table::TableError;

/// Why a snapshot file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read snapshot file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("snapshot file {path} is not JSON: {source}")]
    Json {
        /// The file.
        path: String,
        /// What serde said.
        source: serde_json::Error,
    },
    /// The file is not a snapshot, or a resource in it is malformed.
    #[error("snapshot file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        source: SnapshotFileError,
    },
    /// The file was written for another role.
    #[error("snapshot file {path} is for role {role:?}; mesh-proxy needs one written with --role proxy")]
    Role {
        /// The file.
        path: String,
        /// Its role.
        role: String,
    },
    /// A resource cannot be served.
    #[error("snapshot file {path}: {source}")]
    Resource {
        /// The file.
        path: String,
        /// The resource and why.
        source: TableError,
    },
}

/// The types a node proxy needs before it is ready.
pub const NEEDED: [ResourceType; 3] =
    [ResourceType::Cluster, ResourceType::ClusterLoadAssignment, ResourceType::Listener];

/// Applies xDS updates to the shared table; tells the listener manager (`changes`) when it moved.
#[derive(Debug)]
pub struct XdsHandler {
    shared: Arc<Shared>,
    changes: watch::Sender<u64>,
}

impl XdsHandler {
    /// A handler writing `shared.table` and bumping `changes` after each accepted update.
    pub fn new(shared: Arc<Shared>, changes: watch::Sender<u64>) -> Self {
        XdsHandler { shared, changes }
    }
}

impl Handler for XdsHandler {
    fn apply(&mut self, u: &Update) -> Result<(), String> {
        let current = self.shared.table.load();
        let get = |name: &str| u.resources.get(name).map(|e| &e.body[..]);
        match current.apply(u.kind, get, &u.changed, &u.removed, &u.version) {
            Ok(next) => {
                self.shared.table.store(Arc::new(next));
                self.shared.metrics.config_updates.inc();
                self.changes.send_modify(|g| *g += 1);
                Ok(())
            }
            Err(e) => {
                self.shared.metrics.config_rejections.inc();
                warn!(r#type = %u.kind, version = %u.version, "rejecting the update, keeping the table in force: {e}");
                Err(e.to_string())
            }
        }
    }

    fn connected(&mut self, connected: bool) {
        if connected {
            info!("connected to the control plane");
        } else {
            warn!("disconnected from the control plane; serving the last accepted table");
        }
    }
}

/// Loads a snapshot file (`meshctl snapshot --role proxy`) into the shared table.
pub fn load_file(path: &Path, shared: &Shared) -> Result<(), ConfigError> {
    let loaded = read_file(path, shared);
    // Reading JSON needed the Envoy descriptor pool (~8 MiB); the proxy never needs it again.
    xds_proto::codec::release_pool();
    trim_heap();
    loaded
}

fn read_file(path: &Path, shared: &Shared) -> Result<(), ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read(path).map_err(|source| ConfigError::Read { path: shown.clone(), source })?;
    let doc: serde_json::Value =
        serde_json::from_slice(&text).map_err(|source| ConfigError::Json { path: shown.clone(), source })?;
    let (role, resources) =
        snapshot_file::from_json(&doc).map_err(|source| ConfigError::File { path: shown.clone(), source })?;
    if role != "proxy" {
        return Err(ConfigError::Role { path: shown, role });
    }
    let mut by_type: BTreeMap<ResourceType, BTreeMap<String, FileResource>> = BTreeMap::new();
    for r in resources {
        by_type.entry(r.kind).or_default().insert(r.name.clone(), r);
    }
    let mut table = (**shared.table.load()).clone();
    for kind in ResourceType::ALL {
        let map = by_type.remove(&kind).unwrap_or_default();
        let names: Vec<String> = map.keys().cloned().collect();
        let removed: Vec<String> = Vec::new();
        table = table
            .apply(kind, |n| map.get(n).map(|r| &r.body[..]), &names, &removed, "file")
            .map_err(|source| ConfigError::Resource { path: shown.clone(), source })?;
    }
    shared.table.store(Arc::new(table));
    shared.metrics.config_updates.inc();
    Ok(())
}

/// Hands freed heap pages back to the OS. glibc keeps what `free` returns in its arenas (only the top of the
/// heap shrinks by itself), so the ~8 MiB of small blocks the descriptor pool held would otherwise stay in the
/// proxy's resident set for its whole life.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim_heap() {
    // SAFETY: malloc_trim takes no pointers and only walks glibc's own arenas, under their locks; it may be
    // called at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}

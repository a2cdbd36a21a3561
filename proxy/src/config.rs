//! Where the table comes from: an xDS stream (the control plane) or a snapshot file, through one converter.
//!
//! Either way each resource type's update is converted against the current table; an unusable resource rejects
//! the whole update (a NACK over xDS, an error for a file) and the table in force stays as it was.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{info, warn};
use xds_proto::client::{Handler, Update};
use xds_proto::snapshot_file::{self, SnapshotFileError};
use xds_proto::types::ResourceType;

use crate::saved::Saver;
use crate::state::Shared;
use crate::table::TableError;

/// Why a snapshot file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
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
    saver: Option<Arc<Saver>>,
    /// Types loaded from a saved file and not yet answered by the control plane: its first answer for each
    /// replaces the type entirely (removing what the saved file had and the control plane no longer has).
    replace: BTreeSet<ResourceType>,
}

impl XdsHandler {
    /// A handler writing `shared.table` and bumping `changes` after each accepted update.
    pub fn new(shared: Arc<Shared>, changes: watch::Sender<u64>) -> Self {
        XdsHandler { shared, changes, saver: None, replace: BTreeSet::new() }
    }

    /// Also records every accepted update with `saver`; `loaded` are the types the table was loaded with
    /// from the saved file.
    pub fn saving(mut self, saver: Arc<Saver>, loaded: impl IntoIterator<Item = ResourceType>) -> Self {
        self.saver = Some(saver);
        self.replace = loaded.into_iter().collect();
        self
    }
}

impl Handler for XdsHandler {
    fn apply(&mut self, u: &Update) -> Result<(), String> {
        let current = self.shared.table.load();
        let get = |name: &str| u.resources.get(name).map(|e| &e.body[..]);
        let replacing = self.replace.contains(&u.kind);
        let removed: Vec<String> = if replacing {
            // The first answer after a saved start is the type's whole state: whatever the table has that the
            // answer lacks was removed while this proxy was away.
            let mut gone: Vec<String> =
                current.names(u.kind).into_iter().filter(|n| !u.resources.contains_key(n)).collect();
            gone.extend(u.removed.iter().cloned());
            gone
        } else {
            u.removed.clone()
        };
        match current.apply(u.kind, get, &u.changed, &removed, &u.version) {
            Ok(next) => {
                self.shared.table.store(Arc::new(next));
                self.shared.metrics.config_updates.inc();
                self.changes.send_modify(|g| *g += 1);
                if replacing {
                    self.replace.remove(&u.kind);
                    info!(
                        r#type = %u.kind, version = %u.version, removed = removed.len(),
                        "the control plane's configuration replaced the saved one"
                    );
                }
                if let Some(saver) = &self.saver {
                    let body = |n: &String| u.resources.get(n).map(|e| e.body.clone());
                    if replacing {
                        let all = u.changed.iter().filter_map(|n| Some((n.clone(), body(n)?))).collect();
                        saver.replace(u.kind, &u.version, all);
                    } else {
                        let changed = u.changed.iter().filter_map(|n| Some((n, body(n)?)));
                        saver.record(u.kind, &u.version, changed, &u.removed);
                    }
                }
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
    mesh_runtime::memory::release_after_load();
    loaded
}

fn read_file(path: &Path, shared: &Shared) -> Result<(), ConfigError> {
    let shown = path.display().to_string();
    let (role, mut by_type) =
        snapshot_file::read(path).map_err(|source| ConfigError::File { path: shown.clone(), source })?;
    if role != "proxy" {
        return Err(ConfigError::Role { path: shown, role });
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

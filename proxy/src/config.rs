//! Where the table comes from: an xDS stream (the control plane) or a snapshot file, through one converter.
//!
//! Either way each resource type's update is converted against the current table; an unusable resource rejects
//! the whole update (a NACK over xDS, an error for a file) and the table in force stays as it was.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use mesh_runtime::dataplane::{self, SnapshotError};
use tokio::sync::watch;
use tracing::info;
use xds_proto::client::{Handler, Update};
use xds_proto::names;
use xds_proto::types::ResourceType;

use crate::saved::Saver;
use crate::state::Shared;
use crate::table::{Table, TableError};

/// Why a snapshot file could not be loaded.
pub type ConfigError = SnapshotError<TableError>;

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
        match dataplane::next_table(&**current, u, &removed) {
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
            Err(reason) => {
                self.shared.metrics.config_rejections.inc();
                Err(reason)
            }
        }
    }

    fn connected(&mut self, connected: bool) {
        dataplane::log_connected(connected);
    }
}

/// Loads a snapshot file (`meshctl snapshot --role proxy`) into the shared table.
pub fn load_file(path: &Path, shared: &Shared) -> Result<(), ConfigError> {
    let wanted = "mesh-proxy needs one written with --role proxy";
    let table = dataplane::load_snapshot(path, &**shared.table.load(), |role| role == names::ROLE_PROXY, wanted)?;
    shared.table.store(Arc::new(table));
    shared.metrics.config_updates.inc();
    Ok(())
}

mesh_runtime::config_table!(Table, TableError);

//! Where the table comes from: an xDS stream (role `ingress`, our IngressClass) or a snapshot file, through one
//! converter ([`Table::apply`]). Either way an unusable resource rejects its type's update (a NACK over xDS, an
//! error for a file) and the table in force stays as it was.

use std::path::Path;
use std::sync::Arc;

use tracing::{info, warn};
use xds_proto::client::{Handler, Update};
use xds_proto::snapshot_file::{self, SnapshotFileError};
use xds_proto::types::ResourceType;

use crate::proxy::Shared;
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
    /// The file was written for another role or IngressClass.
    #[error(
        "snapshot file {path} is for role {role:?}; this mesh-ingress needs one written with --role ingress (class {class:?})"
    )]
    Role {
        /// The file.
        path: String,
        /// Its role.
        role: String,
        /// The IngressClass served.
        class: String,
    },
    /// A resource cannot be served.
    #[error("snapshot file {path}: {source}")]
    Resource {
        /// The file.
        path: String,
        /// The resource and why.
        source: Box<TableError>,
    },
}

/// The types the ingress needs before it is ready (the server answers each first subscription, empty too).
pub const NEEDED: [ResourceType; 5] = ResourceType::ALL;

/// Applies xDS updates to the shared table.
#[derive(Debug)]
pub struct XdsHandler {
    shared: Arc<Shared>,
}

impl XdsHandler {
    /// A handler publishing into `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        XdsHandler { shared }
    }
}

impl Handler for XdsHandler {
    fn apply(&mut self, u: &Update) -> Result<(), String> {
        let current = self.shared.table.load();
        let get = |name: &str| u.resources.get(name).map(|e| &e.body[..]);
        match current.apply(u.kind, get, &u.changed, &u.removed, &u.version) {
            Ok(next) => {
                self.shared.publish(next);
                self.shared.metrics.config_updates.inc();
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
            warn!("disconnected from the control plane; serving the last accepted configuration");
        }
    }
}

/// Loads a snapshot file (`meshctl snapshot --role ingress`, role `ingress/{class}` or plain `ingress`) into the
/// shared table; a file written for another IngressClass is refused.
pub fn load_file(path: &Path, class: &str, shared: &Shared) -> Result<(), ConfigError> {
    let loaded = read_file(path, class, shared);
    // Reading JSON needed the Envoy descriptor pool (~8 MiB); the ingress never needs it again.
    mesh_runtime::memory::release_after_load();
    loaded
}

fn read_file(path: &Path, class: &str, shared: &Shared) -> Result<(), ConfigError> {
    let shown = path.display().to_string();
    let (role, mut by_type) =
        snapshot_file::read(path).map_err(|source| ConfigError::File { path: shown.clone(), source })?;
    let ours = match role.split_once('/') {
        None => role == xds_proto::client::ROLE_INGRESS,
        Some((r, c)) => r == xds_proto::client::ROLE_INGRESS && c == class,
    };
    if !ours {
        return Err(ConfigError::Role { path: shown, role, class: class.to_owned() });
    }
    let mut table = (**shared.table.load()).clone();
    for kind in ResourceType::ALL {
        let map = by_type.remove(&kind).unwrap_or_default();
        let names: Vec<String> = map.keys().cloned().collect();
        // A reloaded file replaces the previous one: what it no longer holds is removed.
        let removed: Vec<String> = table.names(kind).into_iter().filter(|n| !map.contains_key(n)).collect();
        table = table
            .apply(kind, |n| map.get(n).map(|r| &r.body[..]), &names, &removed, "file")
            .map_err(|source| ConfigError::Resource { path: shown.clone(), source: Box::new(source) })?;
    }
    shared.publish(table);
    shared.metrics.config_updates.inc();
    Ok(())
}

//! Where the table comes from: an xDS stream (role `ingress`, our IngressClass) or a snapshot file, through one
//! converter ([`Table::apply`]). Either way an unusable resource rejects its type's update (a NACK over xDS, an
//! error for a file) and the table in force stays as it was.

use std::path::Path;
use std::sync::Arc;

use mesh_runtime::dataplane::{self, SnapshotError};
use xds_proto::client::{Handler, Update};
use xds_proto::names;
use xds_proto::types::ResourceType;

use crate::proxy::Shared;
use crate::table::{Table, TableError};

/// Why a snapshot file could not be loaded.
pub type ConfigError = SnapshotError<TableError>;

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
        match dataplane::next_table(&**self.shared.table.load(), u, &u.removed) {
            Ok(next) => {
                self.shared.publish(next);
                self.shared.metrics.config_updates.inc();
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

/// Loads a snapshot file (`meshctl snapshot --role ingress`, role `ingress/{class}` or plain `ingress`) into the
/// shared table; a file written for another IngressClass is refused.
pub fn load_file(path: &Path, class: &str, shared: &Shared) -> Result<(), ConfigError> {
    let wanted = format!("this mesh-ingress needs one written with --role ingress (class {class:?})");
    let is_ours = |role: &str| names::is_ingress_file_role(role, class);
    let table = dataplane::load_snapshot(path, &**shared.table.load(), is_ours, &wanted)?;
    shared.publish(table);
    shared.metrics.config_updates.inc();
    Ok(())
}

mesh_runtime::config_table!(Table, TableError);

//! The last accepted configuration on disk (`--state-dir`), so a proxy restarted while the control plane is
//! down comes up serving what it served before, instead of refusing every Service until the control plane
//! returns.
//!
//! Format: `proxy-state.pb`, one length-delimited `DiscoveryResponse` per resource type (type URL, version,
//! resources), the xDS wire types themselves, so no descriptor pool or JSON is needed to read it. Written
//! atomically (a temporary file renamed over the old one) at most once a second, after accepted updates; read
//! once at start. A file that cannot be read is reported and ignored (the proxy then waits for the control
//! plane, as without `--state-dir`).
//!
//! Once the control plane answers, its first answer for each type replaces that type entirely (see
//! [`crate::config::XdsHandler`]): a Delta stream that starts without `initial_resource_versions` sends what
//! exists now and never names what was removed while the proxy was away.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use prost::Message;
use tokio::sync::Notify;
use tracing::{debug, warn};
use xds_proto::discovery::DiscoveryResponse;
use xds_proto::protobuf::Any;
use xds_proto::types::ResourceType;

use crate::state::Shared;
use crate::table::TableError;

/// The file in the state directory.
pub const FILE: &str = "proxy-state.pb";

/// How long after an accepted update the file is written (updates in between are written together).
const WRITE_AFTER: Duration = Duration::from_secs(1);

/// Why the saved configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SavedError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a sequence of DiscoveryResponses (truncated, or not ours).
    #[error("{path}: not a saved configuration: {reason}")]
    Format {
        /// The file.
        path: String,
        /// What was wrong.
        reason: String,
    },
    /// A saved resource cannot be served (written by another version?).
    #[error("{path}: {source}")]
    Resource {
        /// The file.
        path: String,
        /// The resource and why.
        source: TableError,
    },
}

/// The resources of every type, as accepted: what the file holds.
pub type Resources = BTreeMap<ResourceType, (String, BTreeMap<String, Bytes>)>;

/// Keeps the accepted configuration and writes it to the state directory.
#[derive(Debug)]
pub struct Saver {
    path: PathBuf,
    state: Mutex<Resources>,
    dirty: Notify,
    /// An accepted update not written yet. The drain writes it at once ([`Saver::write_pending`]): waiting
    /// [`WRITE_AFTER`] there would lose an update accepted in the last second before SIGTERM, and a restart
    /// during a control-plane outage would then serve the configuration before it.
    pending: AtomicBool,
    /// Held while the file is written, so the periodic write and the drain's never interleave.
    writing: Mutex<()>,
}

impl Saver {
    /// A saver for `dir`, starting from `initial` (what was loaded from it, if anything).
    pub fn new(dir: &Path, initial: Resources) -> Arc<Self> {
        Arc::new(Saver {
            path: dir.join(FILE),
            state: Mutex::new(initial),
            dirty: Notify::new(),
            pending: AtomicBool::new(false),
            writing: Mutex::new(()),
        })
    }

    /// Records an accepted update of one type: `changed` with their bodies, `removed` gone.
    pub fn record<'a>(
        &self,
        kind: ResourceType,
        version: &str,
        changed: impl Iterator<Item = (&'a String, Bytes)>,
        removed: &[String],
    ) {
        {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let (v, map) = state.entry(kind).or_default();
            v.clear();
            v.push_str(version);
            for (name, body) in changed {
                map.insert(name.clone(), body);
            }
            for name in removed {
                map.remove(name);
            }
        }
        self.pending.store(true, Ordering::SeqCst);
        self.dirty.notify_one();
    }

    /// Replaces one type's resources entirely (the control plane's first answer after a saved start).
    pub fn replace(&self, kind: ResourceType, version: &str, all: BTreeMap<String, Bytes>) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).insert(kind, (version.to_owned(), all));
        self.pending.store(true, Ordering::SeqCst);
        self.dirty.notify_one();
    }

    /// Writes the file after each burst of updates, until the process ends. Runs as its own task.
    pub async fn run(self: Arc<Self>) {
        loop {
            self.dirty.notified().await;
            tokio::time::sleep(WRITE_AFTER).await;
            let me = self.clone();
            match tokio::task::spawn_blocking(move || me.write_pending()).await {
                Ok(Ok(Some(bytes))) => debug!(path = %self.path.display(), bytes, "configuration saved"),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    warn!("cannot save the configuration (a restart without the control plane will start empty): {e}")
                }
                Err(e) => warn!("saving the configuration failed: {e}"),
            }
        }
    }

    /// Writes the accepted configuration now if an update has not been written yet; returns the bytes written
    /// (`None`: nothing was pending). Blocking file I/O: call it from `spawn_blocking` on a runtime.
    pub fn write_pending(&self) -> Result<Option<usize>, SavedError> {
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        if !self.pending.swap(false, Ordering::SeqCst) {
            return Ok(None);
        }
        let snapshot = self.state.lock().unwrap_or_else(PoisonError::into_inner).clone();
        write(&self.path, &snapshot).map(Some).inspect_err(|_| {
            // Still unwritten: the next write tries again.
            self.pending.store(true, Ordering::SeqCst);
        })
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SavedError + '_ {
    move |source| SavedError::Io { path: path.display().to_string(), source }
}

/// Writes `state` to `path` atomically; returns its size.
pub fn write(path: &Path, state: &Resources) -> Result<usize, SavedError> {
    let mut out = Vec::new();
    for (kind, (version, map)) in state {
        let response = DiscoveryResponse {
            version_info: version.clone(),
            type_url: kind.type_url().to_owned(),
            resources: map.values().map(|b| Any { type_url: kind.type_url().to_owned(), value: b.to_vec() }).collect(),
            ..Default::default()
        };
        response
            .encode_length_delimited(&mut out)
            .map_err(|e| SavedError::Format { path: path.display().to_string(), reason: e.to_string() })?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &out).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    Ok(out.len())
}

/// Reads the file in `dir`: `Ok(None)` if there is none.
pub fn read(dir: &Path) -> Result<Option<(Resources, SystemTime)>, SavedError> {
    let path = dir.join(FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => Bytes::from(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&path)(e)),
    };
    let written = std::fs::metadata(&path).and_then(|m| m.modified()).map_err(io(&path))?;
    let format = |reason: String| SavedError::Format { path: path.display().to_string(), reason };
    let mut state = Resources::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let r = DiscoveryResponse::decode_length_delimited(&mut rest).map_err(|e| format(e.to_string()))?;
        let kind = ResourceType::from_type_url(&r.type_url)
            .ok_or_else(|| format(format!("unknown resource type {:?}", r.type_url)))?;
        let mut map = BTreeMap::new();
        for any in r.resources {
            let body = Bytes::from(any.value);
            let name = xds_proto::snapshot_file::resource_name(kind, &body).map_err(|e| format(e.to_string()))?;
            map.insert(name, body);
        }
        state.insert(kind, (r.version_info, map));
    }
    Ok(Some((state, written)))
}

/// Loads saved resources into the shared table (every type at once, in push order). The table in force is
/// untouched if any resource is unusable.
pub fn apply(state: &Resources, shared: &Shared, path: &Path) -> Result<(), SavedError> {
    let mut table = (**shared.table.load()).clone();
    for kind in ResourceType::ALL {
        let Some((version, map)) = state.get(&kind) else { continue };
        let names: Vec<String> = map.keys().cloned().collect();
        table = table
            .apply(kind, |n| map.get(n).map(|b| &b[..]), &names, &[], version)
            .map_err(|source| SavedError::Resource { path: path.display().to_string(), source })?;
    }
    shared.table.store(Arc::new(table));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources() -> Resources {
        let cluster = xds_proto::cluster::Cluster { name: "ns/web/http".into(), ..Default::default() };
        let mut m = BTreeMap::new();
        m.insert("ns/web/http".to_owned(), Bytes::from(cluster.encode_to_vec()));
        [(ResourceType::Cluster, ("v7".to_owned(), m))].into()
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path()).unwrap().is_none(), "no file: nothing saved, not an error");
        let state = resources();
        write(&dir.path().join(FILE), &state).unwrap();
        let (back, _) = read(dir.path()).unwrap().unwrap();
        assert_eq!(back, state);
    }

    /// What the drain relies on: an update recorded a moment ago is on disk after `write_pending`, without the
    /// periodic writer's delay; a second call has nothing to write.
    #[test]
    fn a_pending_update_is_written_at_once_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let saver = Saver::new(dir.path(), Resources::new());
        assert_eq!(saver.write_pending().unwrap(), None, "nothing accepted yet, nothing written");
        assert!(read(dir.path()).unwrap().is_none());
        let (kind, (version, map)) = resources().into_iter().next().unwrap();
        saver.record(kind, &version, map.iter().map(|(k, v)| (k, v.clone())), &[]);
        assert!(saver.write_pending().unwrap().is_some());
        let (back, _) = read(dir.path()).unwrap().unwrap();
        assert_eq!(back, resources());
        assert_eq!(saver.write_pending().unwrap(), None, "already written");
    }

    #[test]
    fn a_damaged_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = resources();
        write(&dir.path().join(FILE), &state).unwrap();
        let path = dir.path().join(FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&path, bytes).unwrap();
        let err = read(dir.path()).unwrap_err().to_string();
        assert!(err.contains(FILE) && err.contains("not a saved configuration"), "{err}");
    }
}

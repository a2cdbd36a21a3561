//! The snapshot file: the xDS resources one role receives, as JSON, for running a proxy without a control plane
//! (`meshctl snapshot > FILE`, then `mesh-proxy --snapshot FILE`).
//!
//! Each resource is written in Envoy's canonical JSON mapping with its `@type`, exactly as an `Any` in Envoy's
//! config dump, so an operator can read it and a real Envoy's tools understand it:
//! `{"role": "proxy", "resources": [{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", ...}, ...]}`.

use std::collections::BTreeMap;

use prost::Message;
use serde_json::{Map, Value};

use crate::codec::{self, CodecError};
use crate::types::ResourceType;

/// Why a snapshot file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    /// The file could not be read.
    #[error("cannot be read: {0}")]
    Read(#[source] std::io::Error),
    /// The file is not JSON.
    #[error("is not JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// The file is not shaped like a snapshot file.
    #[error(
        "not a snapshot file: {0} (expected {{\"role\": ..., \"resources\": [...]}} as written by meshctl snapshot)"
    )]
    Shape(String),
    /// A resource's `@type` is not one of the five we carry.
    #[error("resource {index}: unsupported @type {type_url:?}")]
    UnsupportedType {
        /// Position in `resources`.
        index: usize,
        /// The `@type` found.
        type_url: String,
    },
    /// A resource does not fit its type.
    #[error("resource {index}: {source}")]
    Resource {
        /// Position in `resources`.
        index: usize,
        /// What was wrong.
        source: CodecError,
    },
    /// A resource has no name.
    #[error("resource {index} ({kind}) has no name")]
    Unnamed {
        /// Position in `resources`.
        index: usize,
        /// Its type.
        kind: ResourceType,
    },
}

/// One resource read from a snapshot file, canonically encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileResource {
    /// Its type.
    pub kind: ResourceType,
    /// Its name (`cluster_name` for a ClusterLoadAssignment).
    pub name: String,
    /// Its canonical protobuf encoding.
    pub body: Vec<u8>,
}

/// The name of an encoded resource.
pub fn resource_name(kind: ResourceType, body: &[u8]) -> Result<String, prost::DecodeError> {
    Ok(match kind {
        ResourceType::Listener => crate::listener::Listener::decode(body)?.name,
        ResourceType::Cluster => crate::cluster::Cluster::decode(body)?.name,
        ResourceType::ClusterLoadAssignment => crate::endpoint::ClusterLoadAssignment::decode(body)?.cluster_name,
        ResourceType::RouteConfiguration => crate::route::RouteConfiguration::decode(body)?.name,
        ResourceType::Secret => crate::tls::Secret::decode(body)?.name,
    })
}

/// Writes the resources of one role as a snapshot file document.
pub fn to_json<'a>(
    role: &str,
    resources: impl IntoIterator<Item = (ResourceType, &'a [u8])>,
) -> Result<Value, CodecError> {
    let mut out = Vec::new();
    for (kind, body) in resources {
        let mut v = codec::to_json(kind.type_url(), body)?;
        let mut obj = Map::new();
        obj.insert("@type".into(), Value::String(kind.type_url().to_owned()));
        if let Value::Object(fields) = &mut v {
            obj.append(fields);
        }
        out.push(Value::Object(obj));
    }
    let mut doc = Map::new();
    doc.insert("role".into(), Value::String(role.to_owned()));
    doc.insert("resources".into(), Value::Array(out));
    Ok(Value::Object(doc))
}

/// A snapshot's resources by type and name.
pub type ByType = BTreeMap<ResourceType, BTreeMap<String, FileResource>>;

/// Reads a snapshot file from disk: its role and its resources by type and name. The one reader of the node
/// proxy and the ingress (each then checks the role is its own).
pub fn read(path: &std::path::Path) -> Result<(String, ByType), SnapshotFileError> {
    let text = std::fs::read(path).map_err(SnapshotFileError::Read)?;
    let doc: Value = serde_json::from_slice(&text).map_err(SnapshotFileError::Json)?;
    let (role, resources) = from_json(&doc)?;
    let mut by_type = ByType::new();
    for r in resources {
        by_type.entry(r.kind).or_default().insert(r.name.clone(), r);
    }
    Ok((role, by_type))
}

/// Reads a snapshot file document: its role and its resources.
pub fn from_json(doc: &Value) -> Result<(String, Vec<FileResource>), SnapshotFileError> {
    let role = doc.get("role").and_then(Value::as_str).ok_or_else(|| SnapshotFileError::Shape("no \"role\"".into()))?;
    let list = doc
        .get("resources")
        .and_then(Value::as_array)
        .ok_or_else(|| SnapshotFileError::Shape("no \"resources\"".into()))?;
    let mut out = Vec::with_capacity(list.len());
    for (index, r) in list.iter().enumerate() {
        let Value::Object(fields) = r else {
            return Err(SnapshotFileError::Shape(format!("resource {index} is not an object")));
        };
        let type_url = fields.get("@type").and_then(Value::as_str).unwrap_or_default();
        let kind = ResourceType::from_type_url(type_url)
            .ok_or_else(|| SnapshotFileError::UnsupportedType { index, type_url: type_url.to_owned() })?;
        let mut rest = fields.clone();
        rest.remove("@type");
        let body = codec::from_json(type_url, &Value::Object(rest))
            .map_err(|source| SnapshotFileError::Resource { index, source })?;
        let name = resource_name(kind, &body).map_err(|e| SnapshotFileError::Resource {
            index,
            source: CodecError::Malformed { type_name: type_url.to_owned(), reason: e.to_string() },
        })?;
        if name.is_empty() {
            return Err(SnapshotFileError::Unnamed { index, kind });
        }
        out.push(FileResource { kind, name, body });
    }
    Ok((role.to_owned(), out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Cluster;
    use crate::endpoint::ClusterLoadAssignment;

    #[test]
    fn round_trip() {
        let c = codec::encode(&Cluster { name: "a/b/80".into(), ..Default::default() });
        let e = codec::encode(&ClusterLoadAssignment { cluster_name: "a/b/80".into(), ..Default::default() });
        let doc =
            to_json("proxy", [(ResourceType::Cluster, &c[..]), (ResourceType::ClusterLoadAssignment, &e[..])]).unwrap();
        assert_eq!(doc["resources"][0]["@type"], crate::types::CLUSTER);
        assert_eq!(doc["resources"][1]["cluster_name"], "a/b/80");
        let (role, back) = from_json(&doc).unwrap();
        assert_eq!(role, "proxy");
        assert_eq!(back[0], FileResource { kind: ResourceType::Cluster, name: "a/b/80".into(), body: c });
        assert_eq!(back[1].body, e);
    }

    #[test]
    fn bad_files_are_errors() {
        let dir = std::env::temp_dir().join(format!("mesh-snapshot-file-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(matches!(read(&dir.join("absent.json")), Err(SnapshotFileError::Read(_))));
        std::fs::write(dir.join("text.json"), "not json").unwrap();
        assert!(matches!(read(&dir.join("text.json")), Err(SnapshotFileError::Json(_))));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(from_json(&serde_json::json!([])), Err(SnapshotFileError::Shape(_))));
        let unknown = serde_json::json!({"role": "proxy", "resources": [{"@type": "type.googleapis.com/x.Y"}]});
        assert!(matches!(from_json(&unknown), Err(SnapshotFileError::UnsupportedType { index: 0, .. })));
        let bad = serde_json::json!({"role": "proxy", "resources": [{"@type": crate::types::CLUSTER, "name": 5}]});
        assert!(matches!(from_json(&bad), Err(SnapshotFileError::Resource { index: 0, .. })));
        let unnamed = serde_json::json!({"role": "proxy", "resources": [{"@type": crate::types::CLUSTER}]});
        assert!(matches!(from_json(&unnamed), Err(SnapshotFileError::Unnamed { index: 0, .. })));
    }
}

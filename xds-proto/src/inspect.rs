//! `mesh.v1.Inspect`: a gRPC service of our own that `mesh-control` serves on its xDS port, for what operators
//! need and xDS has no resource for.
//!
//! `Problems` answers the control plane's current problem list (the objects, or parts of them, that could not be
//! translated, and why), each as the line `meshctl routes --manifests` prints: `Kind ns/name: reason`. It takes
//! `google.protobuf.Empty` and answers a `google.protobuf.ListValue` of strings, so no code generation is needed
//! on either side; the call goes over the same connection settings (and TLS) as the ADS client.

use std::time::Duration;

use tonic::codegen::http::uri::PathAndQuery;

use crate::client::{ClientConfig, ClientError, error_chain};
use crate::protobuf::{Empty, ListValue, value::Kind};

/// The gRPC service name.
pub const SERVICE: &str = "mesh.v1.Inspect";
/// The path of the `Problems` call.
pub const PROBLEMS_PATH: &str = "/mesh.v1.Inspect/Problems";

/// The problem lines of a `Problems` answer (non-string members are skipped).
pub fn problem_lines(list: &ListValue) -> Vec<String> {
    list.values
        .iter()
        .filter_map(|v| match &v.kind {
            Some(Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

/// A `Problems` answer from problem lines.
pub fn problem_list<I: IntoIterator<Item = String>>(lines: I) -> ListValue {
    ListValue {
        values: lines.into_iter().map(|s| crate::protobuf::Value { kind: Some(Kind::StringValue(s)) }).collect(),
    }
}

/// Asks the control plane at `cfg.endpoint` (with `cfg.tls`) for its problem list.
pub async fn fetch_problems(cfg: &ClientConfig, timeout: Duration) -> Result<Vec<String>, ClientError> {
    let endpoint = cfg.endpoint()?;
    let failed = |reason: String| ClientError::Connect { endpoint: cfg.endpoint.clone(), reason };
    let call = async {
        let channel = endpoint.connect().await.map_err(|e| failed(error_chain(&e)))?;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.map_err(|e| failed(error_chain(&e)))?;
        let codec = tonic_prost::ProstCodec::<Empty, ListValue>::default();
        let answer = grpc
            .unary(tonic::Request::new(Empty {}), PathAndQuery::from_static(PROBLEMS_PATH), codec)
            .await
            .map_err(|s| failed(format!("{PROBLEMS_PATH}: {} ({:?})", s.message(), s.code())))?;
        Ok(problem_lines(answer.get_ref()))
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| failed(format!("no answer to {PROBLEMS_PATH} within {timeout:?}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let lines = vec!["Ingress ns/a: bad".to_owned(), "Service ns/b: worse".to_owned()];
        assert_eq!(problem_lines(&problem_list(lines.clone())), lines);
    }
}

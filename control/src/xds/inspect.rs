//! `mesh.v1.Inspect` (see `xds_proto::inspect`), served next to ADS on the xDS port: the problem list, so that
//! `meshctl routes --control` shows what was rejected and why, exactly as `--manifests` does offline.
//!
//! Written as tonic's generated servers are (one unary method, `Empty` in, `ListValue` out), without code
//! generation.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::watch;
use tonic::codegen::{Body, BoxFuture, StdError, http};
use xds_proto::inspect::{PROBLEMS_PATH, SERVICE, problem_list};
use xds_proto::protobuf::{Empty, ListValue};

use crate::translate::Snapshot;

/// The `mesh.v1.Inspect` service.
#[derive(Debug, Clone)]
pub struct InspectServer {
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
}

impl InspectServer {
    /// Serves what the snapshots published on `snapshots` say.
    pub fn new(snapshots: watch::Receiver<Option<Arc<Snapshot>>>) -> Self {
        InspectServer { snapshots }
    }
}

impl tonic::server::NamedService for InspectServer {
    const NAME: &'static str = SERVICE;
}

struct Problems(Option<Arc<Snapshot>>);

impl tonic::server::UnaryService<Empty> for Problems {
    type Response = ListValue;
    type Future = BoxFuture<tonic::Response<ListValue>, tonic::Status>;

    fn call(&mut self, _request: tonic::Request<Empty>) -> Self::Future {
        let snap = self.0.take();
        Box::pin(async move {
            match snap {
                Some(s) => Ok(tonic::Response::new(problem_list(s.problems.iter().map(ToString::to_string)))),
                None => Err(tonic::Status::unavailable(
                    "mesh-control has not loaded its sources yet (its /ready says 503 until it has); ask again",
                )),
            }
        })
    }
}

impl<B> tonic::codegen::Service<http::Request<B>> for InspectServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() == PROBLEMS_PATH {
            let snap = self.snapshots.borrow().clone();
            return Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<ListValue, Empty>::default());
                Ok(grpc.unary(Problems(snap), req).await)
            });
        }
        Box::pin(async move { Ok(tonic::Status::unimplemented("no such method in mesh.v1.Inspect").into_http()) })
    }
}

//! The mesh control plane: Kubernetes objects in, xDS snapshot out.
//!
//! Sources (a folder of manifests, or the Kubernetes API) write the [`store::Store`]; [`translate`] turns the
//! store into a [`translate::Snapshot`] of Envoy v3 resources per role, incrementally, so one EndpointSlice edit
//! costs one Service.

pub mod app;
pub mod demo_pod;
pub mod model;
pub mod pipeline;
pub mod source;
pub mod status;
pub mod store;
#[cfg(any(test, feature = "fake-api"))]
pub mod testing;
pub mod translate;
pub mod xds;

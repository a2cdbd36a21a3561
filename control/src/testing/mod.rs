//! What the tests of this crate and of others run against: `fake`, an in-memory Kubernetes API server speaking
//! real list/watch JSON, and `rbac`, the check that the calls it recorded are exactly what `deploy/`'s RBAC
//! grants. Compiled for this crate's tests, or for other crates with the `fake-api` feature (whose HTTP server
//! dependencies are optional).

pub mod fake;
pub mod rbac;

//! `mesh-ingress`: the ingress controller's data plane, on pingora.
//!
//! Configuration arrives as Envoy v3 resources (xDS from `mesh-control`, or a snapshot file) and is converted at
//! the edge into our own immutable tables ([`table`]): routes ([`routes`]), upstream clusters ([`upstream`]) and
//! certificates ([`tls`]). Requests are served by a pingora `ProxyHttp` ([`proxy`]) that reads the current table
//! once per request; [`app`] wires it all together and can run in-process (tests) or from `main`.

pub mod app;
pub mod config;
pub mod metrics;
pub mod path;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod table;
pub mod tls;
pub mod upstream;

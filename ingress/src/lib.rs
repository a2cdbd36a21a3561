//! `mesh-ingress`: the ingress controller's data plane, on a request path of our own over tokio, rustls and
//! hyper.
//!
//! Configuration arrives as Envoy v3 resources (xDS from `mesh-control`, or a snapshot file) and is converted at
//! the edge into our own immutable tables ([`table`]): routes ([`routes`]), upstream clusters ([`upstream`]) and
//! certificates ([`tls`]). Requests are served by worker threads ([`server`]): HTTP/1.x on our own lean path
//! ([`h1`], parsing with `httparse` in place, one task per connection driving its upstream connections too),
//! HTTP/2 on hyper ([`h2`]); both read the current table once per request and share the routing decision and
//! header rules ([`proxy`]). [`app`] wires it all together and can run in-process (tests) or from `main`.

pub mod app;
pub mod codec;
pub mod config;
pub mod h1;
pub mod h2;
pub mod metrics;
pub mod path;
pub mod pool;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod table;
pub mod tls;
pub mod upstream;

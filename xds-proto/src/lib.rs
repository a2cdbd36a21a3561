//! The wire contract between `mesh-control` and the data planes.
//!
//! The snapshot travels as standard Envoy v3 resources so that a real Envoy can consume what `mesh-control`
//! serves. This crate holds the pieces every party must agree on, and nothing that routes:
//! - re-exports of the `envoy-types` modules we use, so callers do not chase deep module paths;
//! - type URLs ([`types`]);
//! - resource names ([`names`]) and the `filter_metadata["mesh"]` keys ([`meta`]) for facts Envoy cannot express;
//! - deterministic encoding and Envoy's JSON mapping ([`codec`]), and snapshot files ([`snapshot_file`]);
//! - the ADS client the data planes and `meshctl` share ([`client`]);
//! - the inspection call of our own next to ADS, for what xDS cannot carry (the problem list: [`inspect`]).

pub mod client;
pub mod codec;
pub mod inspect;
pub mod meta;
pub mod names;
pub mod snapshot_file;
pub mod types;

pub use envoy_types::pb::envoy::config::cluster::v3 as cluster;
pub use envoy_types::pb::envoy::config::core::v3 as core;
pub use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
pub use envoy_types::pb::envoy::config::listener::v3 as listener;
pub use envoy_types::pb::envoy::config::route::v3 as route;
pub use envoy_types::pb::envoy::extensions::filters::http::router::v3 as router;
pub use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3 as tls_inspector;
pub use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
pub use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_proxy;
pub use envoy_types::pb::envoy::extensions::filters::udp::udp_proxy::v3 as udp_proxy;
pub use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
pub use envoy_types::pb::envoy::service::discovery::v3 as discovery;
pub use envoy_types::pb::envoy::r#type::matcher::v3 as envoy_matcher;
pub use envoy_types::pb::envoy::r#type::v3 as envoy_type;
pub use envoy_types::pb::google::protobuf;
pub use envoy_types::pb::google::rpc;
pub use envoy_types::pb::xds::core::v3 as xds_core;
pub use envoy_types::pb::xds::r#type::matcher::v3 as xds_matcher;

/// The `spec.controller` value of an IngressClass served by `mesh-ingress`.
pub const INGRESS_CONTROLLER: &str = "mesh.dev/ingress-controller";

/// The `spec.controllerName` of a GatewayClass served by `mesh-ingress`. A Gateway of such a class named `X` is
/// served by the ingress proxies of IngressClass `X` (one fleet per class, whichever API configures it).
pub const GATEWAY_CONTROLLER: &str = "mesh.dev/gateway-controller";

/// The IngressClass name an ingress proxy asks for when none is configured.
pub const DEFAULT_INGRESS_CLASS: &str = "mesh";

//! End-to-end test harness: runs the real binaries (and, where installed, a real Envoy) on loopback.
//!
//! - [`process`]: a kill-on-drop guard for a spawned binary, with its output captured, and the lookup of the
//!   workspace's built binaries (`target/<profile>/mesh-control`).
//! - [`wait`]: [`eventually`], the bounded poll every test waits with (never a bare sleep).
//! - [`echo`]: an HTTP echo backend that names itself in every answer (a stand-in Pod).
//! - [`http`]: a tiny HTTP/1.1 client that sends any `Host` to any address.
//! - [`envoy`]: finding the Envoy binary and running it from a generated ADS bootstrap.
//! - [`net`]: free ports on loopback addresses.
//! - [`l4`]: TCP and UDP echo servers that name themselves (stand-in Pods for the L4 proxy) and their clients.
//! - [`manifests`]: manifest text several tests write the same way (Service with ready Pods, IngressClass, TLS
//!   Secret, the full-path Ingress).
//! - [`load`]: steady HTTP/1.1 load with requests held in flight at a gate, for drain tests.
//! - [`netns`]: network namespaces (node, Pods, client) with a guard that deletes them, for tests run as root.
//! - [`apiserver`]: a real Kubernetes API server (etcd + kube-apiserver built from Go modules by
//!   `tests/kube/build.sh`) with generated certificates, RBAC and an audit log; `mesh-control` started against it.
//!
//! Every address used is in 127.0.0.0/8, or inside network namespaces a test created; every process started is
//! killed by its PID when its guard drops.

pub mod apiserver;
pub mod echo;
pub mod envoy;
pub mod http;
pub mod l4;
pub mod load;
pub mod manifests;
pub mod net;
pub mod netns;
pub mod process;
pub mod wait;

pub use echo::EchoBackend;
pub use envoy::{Ads, Envoy, EnvoyConfig, Role, find_envoy};
pub use http::{Reply, http_get, http_get_on};
pub use l4::{Answer, Conn, TcpEcho, UdpEcho};
pub use net::free_port;
pub use process::{Process, wait_for_line, workspace_bin};
pub use wait::eventually;

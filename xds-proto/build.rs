//! Compiles a descriptor set for the Envoy resources we emit, from the `.proto` files that ship inside the
//! `envoy-types` package, so that `meshctl snapshot` and `--snapshot` speak Envoy's canonical JSON mapping
//! (via `prost-reflect`) and so that encodings can be made deterministic (protobuf maps are `HashMap`s in
//! prost). No `protoc` is needed: `protox` is a pure-Rust compiler.

use std::path::{Path, PathBuf};

/// Keep in step with the `envoy-types` version pinned in the workspace `Cargo.toml`.
const ENVOY_TYPES_DIR: &str = "envoy-types-0.7.7";

/// The top-level files; their imports are followed.
const ROOTS: &[&str] = &[
    "envoy/config/listener/v3/listener.proto",
    "envoy/config/cluster/v3/cluster.proto",
    "envoy/config/endpoint/v3/endpoint.proto",
    "envoy/config/route/v3/route.proto",
    "envoy/extensions/transport_sockets/tls/v3/secret.proto",
    "envoy/extensions/transport_sockets/tls/v3/tls.proto",
    "envoy/extensions/filters/network/tcp_proxy/v3/tcp_proxy.proto",
    "envoy/extensions/filters/udp/udp_proxy/v3/udp_proxy.proto",
    "envoy/extensions/filters/udp/udp_proxy/v3/route.proto",
    "envoy/extensions/filters/network/http_connection_manager/v3/http_connection_manager.proto",
    "envoy/extensions/filters/http/router/v3/router.proto",
    "envoy/extensions/filters/listener/tls_inspector/v3/tls_inspector.proto",
    "envoy/service/discovery/v3/ads.proto",
    "envoy/service/discovery/v3/discovery.proto",
];

fn main() {
    println!("cargo:rerun-if-env-changed=MESH_ENVOY_PROTO_DIR");
    println!("cargo:rerun-if-changed=build.rs");
    let root = match proto_root() {
        Some(root) => root,
        None => panic!(
            "cannot find the .proto files of {ENVOY_TYPES_DIR} in the cargo registry; \
             set MESH_ENVOY_PROTO_DIR to its `proto` folder"
        ),
    };
    let includes: Vec<PathBuf> = [
        "data-plane-api",
        "xds",
        "protoc-gen-validate",
        "googleapis",
        "cel-spec/proto",
        "opentelemetry-proto",
        "client_model",
    ]
    .iter()
    .map(|d| root.join(d))
    .collect();
    let fds = protox::compile(ROOTS, &includes).unwrap_or_else(|e| panic!("compiling Envoy protos: {e}"));
    let bytes = prost::Message::encode_to_vec(&fds);
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    std::fs::write(out.join("envoy_descriptors.bin"), bytes).expect("write descriptor set");
}

fn proto_root() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("MESH_ENVOY_PROTO_DIR") {
        return Some(PathBuf::from(dir));
    }
    let mut homes = Vec::new();
    if let Ok(h) = std::env::var("CARGO_HOME") {
        homes.push(PathBuf::from(h));
    }
    if let Ok(h) = std::env::var("HOME") {
        homes.push(Path::new(&h).join(".cargo"));
    }
    for home in homes {
        let Ok(entries) = std::fs::read_dir(home.join("registry/src")) else {
            continue;
        };
        for e in entries.flatten() {
            let candidate = e.path().join(ENVOY_TYPES_DIR).join("proto");
            if candidate.join("data-plane-api").is_dir() {
                return Some(candidate);
            }
        }
    }
    // A vendored build (`cargo vendor`) keeps sources next to the workspace.
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").ok()?);
    let vendored = manifest.parent()?.join("vendor/envoy-types/proto");
    vendored.join("data-plane-api").is_dir().then_some(vendored)
}

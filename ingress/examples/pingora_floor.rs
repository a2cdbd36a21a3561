//! The floor of pingora's HTTP proxy on this machine: pingora's own `Server`, its own listener and a `ProxyHttp`
//! that does nothing but name the one upstream (no routing, no headers, no metrics, no timeouts of ours).
//! Whatever this costs per request, mesh-ingress (built on the same engine) cannot go below; comparing the two
//! under `../shared/bench/http.sh` separates pingora's own cost from ours (see docs/BENCHMARKS.md).
//!
//! ```sh
//! cargo build --release -p mesh-ingress --example pingora_floor
//! ../shared/bench/http.sh floor 'target/release/examples/pingora_floor'
//! ```
//!
//! It reads the harness's environment: `LISTEN_HOST`, `LISTEN_PORT`, `LISTEN_PORT_H2` (h2c prior knowledge; the
//! HTTP/1.1 port takes it too), `UPSTREAM_HOST`, `UPSTREAM_PORT`, `WORKERS`.

use async_trait::async_trait;
use pingora_core::server::Server;
use pingora_core::server::configuration::ServerConf;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::Result;
use pingora_proxy::{ProxyHttp, Session};

struct Floor {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream.as_str(), false, String::new())))
    }
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn main() {
    let listen = format!("{}:{}", env("LISTEN_HOST", "127.0.0.1"), env("LISTEN_PORT", "14000"));
    let upstream = format!("{}:{}", env("UPSTREAM_HOST", "127.0.0.1"), env("UPSTREAM_PORT", "18080"));
    let threads = env("WORKERS", "1").parse().unwrap_or(1);
    let conf = ServerConf { threads, ..ServerConf::default() };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = pingora_proxy::http_proxy_service(&server.configuration, Floor { upstream });
    proxy.add_tcp(&listen);
    if let Ok(port) = std::env::var("LISTEN_PORT_H2") {
        // Cleartext HTTP/2 with prior knowledge, as mesh-ingress serves it to the harness.
        proxy.add_tcp(&format!("{}:{port}", env("LISTEN_HOST", "127.0.0.1")));
        let mut options = pingora_core::apps::HttpServerOptions::default();
        options.h2c = true;
        if let Some(app) = proxy.app_logic_mut() {
            app.server_options = Some(options);
        }
    }
    server.add_service(proxy);
    server.run_forever();
}

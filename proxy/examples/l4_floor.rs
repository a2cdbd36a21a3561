//! The floor of a Tokio TCP proxy on this machine: accept, connect to the one upstream, copy both ways with
//! `copy_bidirectional`, close. No table, no balancing, no metrics, no splice, no drain. mesh-proxy does more
//! per connection than this and cannot be much cheaper; running both under `../shared/bench/l4_connrate.sh`
//! shows what of a goal is reachable at all with this design (see docs/BENCHMARKS.md).
//!
//! ```sh
//! cargo build --release -p mesh-proxy --example l4_floor
//! ../shared/bench/l4_connrate.sh floor 'target/release/examples/l4_floor'
//! ```
//!
//! It reads the harness's environment: `LISTEN_HOST`, `LISTEN_PORT`, `UPSTREAM_HOST`, `UPSTREAM_PORT`.

use std::net::SocketAddr;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn main() -> std::io::Result<()> {
    let listen: SocketAddr = format!("{}:{}", env("LISTEN_HOST", "127.0.0.1"), env("LISTEN_PORT", "14000"))
        .parse()
        .map_err(std::io::Error::other)?;
    let upstream: SocketAddr = format!("{}:{}", env("UPSTREAM_HOST", "127.0.0.1"), env("UPSTREAM_PORT", "18080"))
        .parse()
        .map_err(std::io::Error::other)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        loop {
            let (mut client, _) = listener.accept().await?;
            tokio::spawn(async move {
                let _ = client.set_nodelay(true);
                if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = server.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    })
}

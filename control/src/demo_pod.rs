//! The demo Pod: an HTTP/1.1 server that says who it is. `meshctl up` plays every endpoint of a manifest folder
//! with one, and the end-to-end tests use it as the Pods behind the whole path (`pod NS/NAME (local) answered
//! … from PEER`).

use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

/// An HTTP/1.1 server that answers every request with who it is and what it got (status 200, the Pod's name
/// also in an `x-pod` header), with keep-alive, until the task is aborted. Also the soak test's Pods.
pub async fn http_pod(l: TcpListener, name: String) {
    let name: std::sync::Arc<str> = name.into();
    loop {
        let (s, peer) = match l.accept().await {
            Ok(c) => c,
            Err(e) => {
                debug!(pod = %name, "demo Pod accept: {e}");
                // Out of descriptors recurs at once: pause rather than spin.
                mesh_runtime::accept::pause_after(&e).await;
                continue;
            }
        };
        let name = name.clone();
        let local = s.local_addr().ok();
        tokio::spawn(async move {
            if let Err(e) = answer(s, &name, local, peer).await {
                debug!(pod = %name, "demo Pod connection: {e}");
            }
        });
    }
}

async fn answer(s: TcpStream, name: &str, local: Option<SocketAddr>, peer: SocketAddr) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let request = line.trim_end().to_owned();
        let (mut host, mut length, mut close) = (String::new(), 0usize, false);
        loop {
            line.clear();
            if r.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let h = line.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let v = v.trim();
                match k.to_ascii_lowercase().as_str() {
                    "host" => host = v.to_owned(),
                    "content-length" => length = v.parse().unwrap_or(0),
                    "connection" => close = v.eq_ignore_ascii_case("close"),
                    _ => {}
                }
            }
        }
        let mut body = vec![0u8; length.min(1 << 20)];
        r.read_exact(&mut body).await?;
        let local = local.map_or_else(String::new, |a| a.to_string());
        let text = format!("pod {name} ({local}) answered {request:?} for host {host:?} from {peer}\n");
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-pod: {name}\r\n{}\r\n",
            text.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        // One write: a head and a body in two small writes would wait out the peer's delayed ACK (Nagle) on a
        // kept-alive connection, about 40 ms a request.
        let s = r.get_mut();
        s.write_all(format!("{head}{text}").as_bytes()).await?;
        if close {
            return s.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pod_answers_with_its_name_and_keeps_the_connection() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(http_pod(l, "ns/pod-1".into()));
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut r = BufReader::new(&mut s);
        for path in ["/a", "/b"] {
            r.get_mut().write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
            let mut status = String::new();
            r.read_line(&mut status).await.unwrap();
            assert_eq!(status, "HTTP/1.1 200 OK\r\n");
            let mut len = 0;
            loop {
                let mut h = String::new();
                r.read_line(&mut h).await.unwrap();
                if h == "\r\n" {
                    break;
                }
                if let Some(v) = h.strip_prefix("content-length: ") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).await.unwrap();
            let body = String::from_utf8(body).unwrap();
            assert!(body.contains("pod ns/pod-1") && body.contains(&format!("GET {path}")), "{body}");
        }
        task.abort();
    }
}

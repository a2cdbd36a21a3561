//! The access log: one structured line per request with `--access-log`, none without. Its own test binary,
//! because it installs the process's global tracing subscriber (pingora's threads log outside any test scope).

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::*;

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Buf {
    fn access_lines(&self) -> Vec<serde_json::Value> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "access")
            .collect()
    }
}

#[tokio::test]
async fn one_structured_line_per_request_only_when_asked() {
    let buf = Buf::default();
    let writer = buf.clone();
    tracing_subscriber::fmt()
        .json()
        .with_target(true)
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::INFO)
        .init();
    let a = Backend::start("a").await;
    let mut snap = Snap::default().cluster("ns/a/80", &[a.addr]);
    snap.vhosts = vec![vhost("foo.com", vec![prefix("/api", to("ns/a/80"))])];

    let (quiet, _d1) = ingress(&snap).await;
    assert_eq!(get(quiet.http_addr, "foo.com", "/api/x").await.unwrap().status, 200);
    quiet.drain(WAIT).await;
    assert!(buf.access_lines().is_empty(), "no access log by default");

    let (loud, _d2) = ingress_with(&snap, |c| c.settings.access_log = true).await;
    assert_eq!(get(loud.http_addr, "foo.com", "/api/x?y=1").await.unwrap().status, 200);
    assert_eq!(get(loud.http_addr, "bar.com", "/").await.unwrap().status, 404);
    loud.drain(WAIT).await;
    let lines = buf.access_lines();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let f = &lines[0]["fields"];
    assert_eq!(f["status"], 200);
    assert_eq!(f["method"], "GET");
    assert_eq!(f["path"], "/api/x");
    assert_eq!(f["vhost"], "foo.com");
    assert_eq!(f["route"], "Prefix /api");
    assert_eq!(f["upstream"], "ns/a/80");
    assert_eq!(f["request_id"].as_str().map(str::len), Some(32));
    assert_eq!(lines[1]["fields"]["status"], 404);
    let _ = std::io::stdout().flush();
}

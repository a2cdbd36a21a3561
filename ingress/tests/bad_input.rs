//! Bad and adversarial HTTP/1 input on raw sockets: what an edge proxy must refuse, and what it must get right
//! when it forwards (the cases an adversarial probe of the previous engine found).

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn one_backend() -> (Backend, mesh_ingress::app::App, tempfile::TempDir) {
    let a = Backend::start("a").await;
    let mut snap = Snap::default().cluster("ns/a/80", &[a.addr]);
    snap.vhosts = vec![vhost("h", vec![prefix("/", to("ns/a/80"))])];
    let (app, dir) = ingress(&snap).await;
    (a, app, dir)
}

/// The JSON the echo backend answered, from a raw HTTP/1.1 response.
fn echoed(raw: &str) -> serde_json::Value {
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not an echo: {e}: {raw}"))
}

#[tokio::test]
async fn an_h2c_upgrade_is_not_forwarded_and_only_websocket_upgrades_pass() {
    let (a, app, _dir) = one_backend().await;
    let out = raw(
        app.http_addr,
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "served as plain HTTP/1.1, not switched: {out}");
    let seen = echoed(&out);
    for h in ["upgrade", "http2-settings", "connection"] {
        assert!(seen["headers"][h].is_null(), "{h} reached the backend: {seen}");
    }
    assert_eq!(a.hits.load(Ordering::SeqCst), 1);
    app.drain(WAIT).await;
}

#[tokio::test]
async fn host_is_required_and_an_absolute_target_is_routed_by_its_authority() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let mut snap = Snap::default().cluster("ns/a/80", &[a.addr]).cluster("ns/b/80", &[b.addr]);
    snap.vhosts = vec![vhost("a.com", vec![prefix("/", to("ns/a/80"))]), vhost("*", vec![prefix("/", to("ns/b/80"))])];
    let (app, _dir) = ingress(&snap).await;
    let at = app.http_addr;
    let out = raw(at, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400"), "HTTP/1.1 without Host: {out}");
    let out = raw(at, b"GET / HTTP/1.1\r\nHost: a.com\r\nHost: b.com\r\nConnection: close\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400"), "two Hosts: {out}");
    // HTTP/1.0 may leave Host out: the catch-all serves it.
    let out = raw(at, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(echoed(&out)["backend"], "b");
    // The absolute-form authority replaces Host, and the request goes upstream in origin form.
    let out = raw(at, b"GET http://a.com/x/../p?q=1 HTTP/1.1\r\nHost: other.org\r\nConnection: close\r\n\r\n").await;
    let seen = echoed(&out);
    assert_eq!(seen["backend"], "a", "{out}");
    assert_eq!(seen["uri"], "/p?q=1");
    assert_eq!(seen["headers"]["host"][0], "a.com");
    app.drain(WAIT).await;
}

#[tokio::test]
async fn fifty_pipelined_requests_get_fifty_answers_in_order() {
    let (a, app, _dir) = one_backend().await;
    let mut all = Vec::new();
    for i in 0..50 {
        let close = if i == 49 { "Connection: close\r\n" } else { "" };
        all.extend_from_slice(format!("GET /n/{i} HTTP/1.1\r\nHost: h\r\n{close}\r\n").as_bytes());
    }
    let out = raw(app.http_addr, &all).await;
    assert_eq!(out.matches("HTTP/1.1 200").count(), 50, "{out}");
    let mut at = 0;
    for i in 0..50 {
        let needle = format!("\"uri\":\"/n/{i}\"");
        let pos = out[at..].find(&needle).unwrap_or_else(|| panic!("answer {i} missing or out of order"));
        at += pos + needle.len();
    }
    assert_eq!(a.hits.load(Ordering::SeqCst), 50);
    app.drain(WAIT).await;
}

#[tokio::test]
async fn malformed_targets_framing_and_oversized_heads_get_the_right_status() {
    let a = Backend::start("a").await;
    let mut snap = Snap::default().cluster("ns/a/80", &[a.addr]);
    snap.vhosts = vec![vhost("h", vec![prefix("/", to("ns/a/80"))])];
    let (app, _dir) = ingress_with(&snap, |c| {
        c.settings.max_request_line = 1024;
        c.settings.max_headers = 20;
    })
    .await;
    let at = app.http_addr;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n".to_vec(), "400"),
        (b"GET /a\0b HTTP/1.1\r\nHost: h\r\n\r\n".to_vec(), "400"),
        (b"GET a/b HTTP/1.1\r\nHost: h\r\n\r\n".to_vec(), "400"),
        (b"GET * HTTP/1.1\r\nHost: h\r\n\r\n".to_vec(), "400"),
        (b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n".to_vec(), "400"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX-Folded: a\r\n b\r\n\r\n".to_vec(), "400"),
        (b"GET / HTTP/1.1\r\nHost: bad host\r\n\r\n".to_vec(), "400"),
        (b"GET / HTTP/1.1\r\nHost: user@h\r\n\r\n".to_vec(), "400"),
        (b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n".to_vec(), "405"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n".to_vec(), "501"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n".to_vec(), "501"),
        (b"POST / HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), "400"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".to_vec(), "400"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 4\r\n\r\nabcd".to_vec(), "400"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n".to_vec(), "400"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n".to_vec(), "400"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n".to_vec(), "400"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nExpect: something\r\nContent-Length: 1\r\n\r\nx".to_vec(), "417"),
        (format!("GET /{} HTTP/1.1\r\nHost: h\r\n\r\n", "a".repeat(2000)).into_bytes(), "414"),
        (
            format!(
                "GET / HTTP/1.1\r\nHost: h\r\n{}\r\n",
                (0..30).map(|i| format!("X-{i}: v\r\n")).collect::<String>()
            )
            .into_bytes(),
            "431",
        ),
    ];
    for (req, want) in &cases {
        let out = raw(at, req).await;
        assert!(
            out.starts_with(&format!("HTTP/1.1 {want}")),
            "{:?} → {out:?}, want {want}",
            String::from_utf8_lossy(req)
        );
        assert!(
            out.contains("\r\nServer: mesh\r\n") && out.contains("\r\nDate: "),
            "our answers say who and when: {out}"
        );
    }
    assert_eq!(a.hits.load(Ordering::SeqCst), 0, "no refused request reached the backend");
    // `Content-Length: 5, 5` is one length: forwarded as one value.
    let out = raw(at, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\nConnection: close\r\n\r\nhello").await;
    let seen = echoed(&out);
    assert_eq!(seen["headers"]["content-length"], serde_json::json!(["5"]), "{out}");
    assert_eq!(seen["body"], "hello");
    // A chunked body goes through whole; OPTIONS * is answered by us.
    let out = raw(
        at,
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(echoed(&out)["body"], "hello world", "{out}");
    let out = raw(at, b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 200") && out.contains("allow: "), "{out}");
    app.drain(WAIT).await;
}

#[tokio::test]
async fn a_trickled_body_is_cut_off() {
    let a = Backend::start("a").await;
    let mut snap = Snap::default().cluster("ns/a/80", &[a.addr]);
    snap.vhosts = vec![vhost("h", vec![prefix("/", to("ns/a/80"))])];
    let (app, _dir) = ingress_with(&snap, |c| {
        c.settings.body_timeout = Duration::from_millis(300);
        c.settings.request_timeout = Duration::from_millis(1500);
    })
    .await;
    // Idle: a body that stops coming.
    let mut s = TcpStream::connect(app.http_addr).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nab").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await.expect("cut off").unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    // Trickled: a byte every 100 ms is never idle for 300 ms, but the whole body may take 1.5 s only.
    let mut s = TcpStream::connect(app.http_addr).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n").await.unwrap();
    let started = std::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if s.write_all(b"x").await.is_err() {
                    break;
                }
            }
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            },
        }
        assert!(started.elapsed() < WAIT, "the trickle was never cut off");
    }
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    app.drain(WAIT).await;
}

#[tokio::test]
async fn client_forwarding_headers_follow_the_trust_rule() {
    let send_spoofed = |at| async move {
        raw(
            at,
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\nForwarded: for=1.2.3.4\r\nX-Real-IP: 1.2.3.4\r\nTrue-Client-IP: 1.2.3.4\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Port: 443\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
        )
        .await
    };
    // Untrusted (the default): the client's claims are dropped or replaced; X-Forwarded-For gets the peer.
    let (_a, app, _dir) = one_backend().await;
    let out = send_spoofed(app.http_addr).await;
    let h = &echoed(&out)["headers"];
    assert!(h["forwarded"].is_null() && h["true-client-ip"].is_null(), "{h}");
    assert_eq!(h["x-real-ip"], serde_json::json!(["127.0.0.1"]));
    assert_eq!(h["x-forwarded-proto"], serde_json::json!(["http"]));
    assert_eq!(h["x-forwarded-port"], serde_json::json!([app.http_addr.port().to_string()]));
    assert_eq!(h["x-forwarded-for"], serde_json::json!(["1.2.3.4, 127.0.0.1"]));
    assert!(out.contains("\r\nServer: mesh\r\n"), "a proxied response without Server gets ours: {out}");
    app.drain(WAIT).await;

    // A trusted load balancer in front: its values pass.
    let a = Backend::start("a").await;
    let mut snap = Snap::default().cluster("ns/a/80", &[a.addr]);
    snap.vhosts = vec![vhost("h", vec![prefix("/", to("ns/a/80"))])];
    let (app, _dir) = ingress_with(&snap, |c| c.settings.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()]).await;
    let out = send_spoofed(app.http_addr).await;
    let h = &echoed(&out)["headers"];
    assert_eq!(h["forwarded"], serde_json::json!(["for=1.2.3.4"]), "{h}");
    assert_eq!(h["true-client-ip"], serde_json::json!(["1.2.3.4"]));
    assert_eq!(h["x-real-ip"], serde_json::json!(["1.2.3.4"]));
    assert_eq!(h["x-forwarded-proto"], serde_json::json!(["https"]));
    assert_eq!(h["x-forwarded-port"], serde_json::json!(["443"]));
    assert_eq!(h["x-forwarded-for"], serde_json::json!(["1.2.3.4, 127.0.0.1"]));
    app.drain(WAIT).await;
}

#[tokio::test]
async fn expect_100_continue_head_and_http10_are_served() {
    let (_a, app, _dir) = one_backend().await;
    let at = app.http_addr;
    // Expect: 100-continue: we say continue ourselves, then the body goes through.
    let mut s = TcpStream::connect(at).await.unwrap();
    s.write_all(
        b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 4\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 25];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"body").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await.unwrap().unwrap();
    let out = String::from_utf8_lossy(&out);
    assert_eq!(echoed(&out)["body"], "body");
    assert!(echoed(&out)["headers"]["expect"].is_null());
    // HEAD: the head only, with the length the backend gave.
    let out = raw(at, b"HEAD / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 200") && out.ends_with("\r\n\r\n"), "{out}");
    // HTTP/1.0 keep-alive on request.
    let out =
        raw(at, b"GET / HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\nGET /2 HTTP/1.0\r\nHost: h\r\n\r\n").await;
    assert_eq!(out.matches("HTTP/1.1 200").count(), 2, "{out}");
    assert!(out.contains("Connection: keep-alive"), "{out}");
    app.drain(WAIT).await;
}

//! In-process tests of `mesh-ingress`: the real app on port 0, fed by snapshot files, against real backends.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use mesh_ingress::proxy::NOT_FOUND_BODY;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn metrics(app: &mesh_ingress::app::App) -> String {
    String::from_utf8_lossy(&get(app.admin_addr, "localhost", "/metrics").await.unwrap().body).into_owned()
}

#[tokio::test]
async fn routes_hosts_paths_precedence_default_backend_and_404() {
    let (root, api_exact, api, v1, wild, def, only) = (
        Backend::start("root").await,
        Backend::start("api-exact").await,
        Backend::start("api").await,
        Backend::start("v1").await,
        Backend::start("wild").await,
        Backend::start("default").await,
        Backend::start("only").await,
    );
    let mut snap = Snap::default();
    for b in [&root, &api_exact, &api, &v1, &wild, &def, &only] {
        snap = snap.cluster(&format!("ns/{}/80", b.name), &[b.addr]);
    }
    snap.vhosts = vec![
        vhost(
            "foo.com",
            vec![
                exact("/api", to("ns/api-exact/80")),
                prefix("/api/v1", to("ns/v1/80")),
                prefix("/api", to("ns/api/80")),
                prefix("/", to("ns/root/80")),
            ],
        ),
        vhost("only.com", vec![exact("/x", to("ns/only/80")), prefix("/", direct(404, NOT_FOUND_BODY))]),
        vhost("*.foo.com", vec![prefix("/", to("ns/wild/80"))]),
        vhost("*", vec![prefix("/", to("ns/default/80"))]),
    ];
    let (app, _dir) = ingress(&snap).await;
    let at = app.http_addr;
    let cases = [
        ("foo.com", "/anything", "root"),
        ("FOO.com:8080", "/anything", "root"),
        ("foo.com", "/api", "api-exact"),
        ("foo.com", "/api/", "api"),
        ("foo.com", "/api/x", "api"),
        ("foo.com", "/api/v1", "v1"),
        ("foo.com", "/api/v1/", "v1"),
        ("foo.com", "/api/v1/users?q=1", "v1"),
        ("foo.com", "/api/v10", "api"),
        ("foo.com", "/apix", "root"),
        ("foo.com", "/api/%76%31/x", "v1"),
        ("foo.com", "/x/../api/v1", "v1"),
        ("a.foo.com", "/", "wild"),
        ("B.Foo.Com:443", "/z", "wild"),
        ("a.b.foo.com", "/", "default"),
        ("other.org", "/whatever", "default"),
        ("only.com", "/x", "only"),
    ];
    for (host, path, want) in cases {
        let r = get(at, host, path).await.unwrap();
        assert_eq!((r.status, r.backend()), (200, want.to_owned()), "{host} {path}");
    }
    // The backend gets the path that was routed (normalised), so the route chosen and the resource served can
    // never differ; the query string is untouched.
    let r = get(at, "foo.com", "/api/%76%31/x").await.unwrap();
    assert_eq!(r.json()["uri"], "/api/v1/x");
    let r = get(at, "foo.com", "/x/../api/v1?a=%2e%2e").await.unwrap();
    assert_eq!(r.json()["uri"], "/api/v1?a=%2e%2e");
    let r = get(at, "foo.com", "//api//v1").await.unwrap();
    assert_eq!((r.backend(), r.json()["uri"].as_str()), ("v1".to_owned(), Some("/api/v1")));
    // A route answering 404 (no rule for this path, no default backend for this host).
    let r = get(at, "only.com", "/y").await.unwrap();
    assert_eq!((r.status, &r.body[..]), (404, NOT_FOUND_BODY.as_bytes()));

    // Without any catch-all virtual host, an unknown host gets the small 404 too.
    let mut bare = Snap::default().cluster("ns/root/80", &[root.addr]);
    bare.vhosts = vec![vhost("foo.com", vec![prefix("/", to("ns/root/80"))])];
    let (app2, _dir2) = ingress(&bare).await;
    let r = get(app2.http_addr, "nope.com", "/").await.unwrap();
    assert_eq!((r.status, &r.body[..]), (404, NOT_FOUND_BODY.as_bytes()));

    let m = metrics(&app).await;
    assert!(
        m.contains(r#"mesh_ingress_requests_total{listener="http",host="foo.com",route="Prefix /api/v1",status="200",upstream="ns/v1/80"}"#),
        "{m}"
    );
    assert!(m.contains("mesh_ingress_request_duration_seconds_bucket"), "{m}");
    app.drain(WAIT).await;
    app2.drain(WAIT).await;
}

#[tokio::test]
async fn missing_cluster_and_direct_503_and_no_endpoints() {
    let b = Backend::start("b").await;
    let mut snap = Snap::default().cluster("ns/empty/80", &[]);
    snap.vhosts = vec![vhost(
        "h",
        vec![
            exact("/gone", direct(503, "503 service unavailable: backend Service ns/gone does not exist\n")),
            exact("/unknown", to("ns/unknown/80")),
            exact("/empty", to("ns/empty/80")),
            prefix("/", to("ns/b/80")),
        ],
    )];
    let (app, _dir) = ingress(&snap.cluster("ns/b/80", &[b.addr])).await;
    let r = get(app.http_addr, "h", "/gone").await.unwrap();
    assert_eq!(r.status, 503);
    assert!(String::from_utf8_lossy(&r.body).contains("ns/gone does not exist"));
    assert_eq!(get(app.http_addr, "h", "/unknown").await.unwrap().status, 503);
    assert_eq!(get(app.http_addr, "h", "/empty").await.unwrap().status, 503);
    assert_eq!(get(app.http_addr, "h", "/ok").await.unwrap().status, 200);
    app.drain(WAIT).await;
}

#[tokio::test]
async fn tls_by_sni_with_two_secrets_live_rotation_host_routing_and_redirect() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let (ca, ka) = cert(&["a.example.com"]);
    let (cb, kb) = cert(&["b.example.com", "*.b.example.com"]);
    let mut snap = Snap::default().cluster("ns/a/80", &[a.addr]).cluster("ns/b/80", &[b.addr]);
    snap.vhosts = vec![
        vhost("a.example.com", vec![prefix("/", to("ns/a/80"))]),
        vhost("b.example.com", vec![prefix("/", to("ns/b/80"))]),
        vhost("*.b.example.com", vec![prefix("/", to("ns/b/80"))]),
    ];
    snap.http_vhosts = Some(vec![
        vhost("a.example.com", vec![prefix("/", redirect())]),
        vhost("b.example.com", vec![prefix("/", to("ns/b/80"))]),
    ]);
    snap.secrets.insert("ns/a-tls".into(), (ca.clone(), ka, vec!["a.example.com".into()]));
    snap.secrets.insert("ns/b-tls".into(), (cb.clone(), kb, vec!["b.example.com".into(), "*.b.example.com".into()]));
    let (app, dir) = ingress(&snap).await;
    let at = app.https_addr;
    let req = |host: &str| Request::get("/p").header("host", host).body(Full::new(Bytes::new())).unwrap();

    let s = tls_connect(at, "a.example.com", &[&ca], &[b"http/1.1"]).await.unwrap();
    assert_eq!(peer_cert(&s), der(&ca));
    let r = h1_over(s, req("a.example.com")).await.unwrap();
    assert_eq!((r.status, r.backend()), (200, "a".into()));
    assert_eq!(r.header("x-forwarded-proto"), vec!["https"]);

    let s = tls_connect(at, "b.example.com", &[&cb], &[b"http/1.1"]).await.unwrap();
    assert_eq!(peer_cert(&s), der(&cb));
    assert_eq!(h1_over(s, req("b.example.com")).await.unwrap().backend(), "b");
    let s = tls_connect(at, "x.b.example.com", &[&cb], &[b"http/1.1"]).await.unwrap();
    assert_eq!(peer_cert(&s), der(&cb), "one-label wildcard SNI");

    // Routing follows Host, not SNI.
    let s = tls_connect(at, "a.example.com", &[&ca], &[b"http/1.1"]).await.unwrap();
    assert_eq!(h1_over(s, req("b.example.com")).await.unwrap().backend(), "b");

    // TLS 1.2 is served too (1.3 above).
    let s = tls_connect_v12(at, "a.example.com", &ca).await.unwrap();
    assert_eq!(s.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
    assert_eq!(h1_over(s, req("a.example.com")).await.unwrap().backend(), "a");

    // No certificate for this name and no default: the handshake is refused.
    assert!(tls_connect(at, "c.example.com", &[&ca, &cb], &[]).await.is_err());

    // Plain HTTP to a TLS host is redirected, path and query kept.
    let r = get(app.http_addr, "a.example.com:8080", "/p/q?x=1").await.unwrap();
    assert_eq!(r.status, 308);
    assert_eq!(r.headers["location"], "https://a.example.com/p/q?x=1");
    assert_eq!(get(app.http_addr, "b.example.com", "/").await.unwrap().backend(), "b");

    // Rotation: a new Secret for a.example.com is served to new handshakes without a restart.
    let (ca2, ka2) = cert(&["a.example.com"]);
    let mut next = snap.clone();
    next.secrets.insert("ns/a-tls".into(), (ca2.clone(), ka2, vec!["a.example.com".into()]));
    reload(&app, &dir, &next);
    let s = tls_connect(at, "a.example.com", &[&ca, &ca2], &[b"http/1.1"]).await.unwrap();
    assert_eq!(peer_cert(&s), der(&ca2));
    assert_eq!(h1_over(s, req("a.example.com")).await.unwrap().status, 200);

    let m = metrics(&app).await;
    assert!(m.contains(r#"mesh_ingress_tls_handshakes_total{result="ok"}"#), "{m}");
    assert!(m.contains(r#"mesh_ingress_tls_handshakes_total{result="error"}"#), "{m}");
    let dump =
        String::from_utf8_lossy(&get(app.admin_addr, "localhost", "/config_dump").await.unwrap().body).into_owned();
    assert!(dump.contains("ns/a-tls") && !dump.contains("PRIVATE KEY"), "{dump}");
    app.drain(WAIT).await;
}

#[tokio::test]
async fn http2_over_tls_and_h2c_prior_knowledge() {
    let a = Backend::start("a").await;
    let (ca, ka) = cert(&["a.example.com"]);
    let mut snap = Snap::default().cluster("ns/a/80", &[a.addr]);
    snap.vhosts = vec![vhost("a.example.com", vec![prefix("/", to("ns/a/80"))])];
    snap.secrets.insert("ns/a-tls".into(), (ca.clone(), ka, vec!["a.example.com".into()]));
    let (app, _dir) = ingress(&snap).await;

    let s = tls_connect(app.https_addr, "a.example.com", &[&ca], &[b"h2", b"http/1.1"]).await.unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut tx = h2_over(s).await.unwrap();
    for _ in 0..3 {
        let req = Request::get("https://a.example.com/h2?x=1").body(Full::new(Bytes::new())).unwrap();
        let resp = tx.send_request(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        let body: serde_json::Value =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(body["uri"], "/h2?x=1");
        assert_eq!(body["headers"]["host"][0], "a.example.com");
    }

    let s = TcpStream::connect(app.http_addr).await.unwrap();
    let mut tx = h2_over(s).await.unwrap();
    let req = Request::get("http://a.example.com/h2c").body(Full::new(Bytes::new())).unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!((resp.version(), resp.status().as_u16()), (http::Version::HTTP_2, 200));

    // Request bodies over HTTP/2 reach the HTTP/1.1 upstream: with a length, and streamed without one (sent on
    // chunked); a response larger than one read streams back whole; the upstream connection is reused after.
    let big = "x".repeat(200_000);
    let req = Request::post("http://a.example.com/up").body(Full::new(Bytes::from(big.clone()))).unwrap();
    let resp = tx.send_request(req).await.unwrap();
    let body: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["body"].as_str().map(str::len), Some(200_000));
    assert_eq!(body["headers"]["content-length"][0], "200000");
    let chunks = futures::stream::iter(
        ["ab", "cd", "ef"]
            .map(|c| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from_static(c.as_bytes())))),
    );
    let req = Request::post("http://a.example.com/up")
        .body(http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(chunks)))
        .unwrap();
    let s = TcpStream::connect(app.http_addr).await.unwrap();
    let (mut tx2, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = tx2.send_request(req).await.unwrap();
    let body: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["body"], "abcdef");
    assert_eq!(body["headers"]["transfer-encoding"][0], "chunked");
    let before = a.conns.load(Ordering::SeqCst);
    for _ in 0..5 {
        let req = Request::get("http://a.example.com/again").body(Full::new(Bytes::new())).unwrap();
        assert_eq!(tx.send_request(req).await.unwrap().status(), 200);
    }
    assert_eq!(
        a.conns.load(Ordering::SeqCst),
        before,
        "sequential HTTP/2 requests reuse the pooled upstream connection"
    );
    app.drain(WAIT).await;
}

#[tokio::test]
async fn grpc_call_with_trailers_over_h2c_and_tls() {
    let a = Backend::start("grpc").await;
    let (ca, ka) = cert(&["g.example.com"]);
    let mut snap = Snap::default().cluster("ns/grpc/50051", &[a.addr]);
    snap.vhosts = vec![vhost("g.example.com", vec![prefix("/", to("ns/grpc/50051"))])];
    snap.secrets.insert("ns/g".into(), (ca.clone(), ka, vec!["g.example.com".into()]));
    let (app, _dir) = ingress(&snap).await;
    let call = |scheme: &str| {
        Request::post(format!("{scheme}://g.example.com/pkg.Svc/Method"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\x03abc")))
            .unwrap()
    };
    let s = TcpStream::connect(app.http_addr).await.unwrap();
    let mut plain = h2_over(s).await.unwrap();
    let s = tls_connect(app.https_addr, "g.example.com", &[&ca], &[b"h2"]).await.unwrap();
    let mut tls = h2_over(s).await.unwrap();
    for (tx, scheme) in [(&mut plain, "http"), (&mut tls, "https")] {
        let resp = tx.send_request(call(scheme)).await.unwrap();
        assert_eq!(resp.status(), 200, "{scheme}");
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers");
        assert_eq!(trailers["grpc-status"], "0", "{scheme}");
        let body: serde_json::Value = serde_json::from_slice(&collected.to_bytes()).unwrap();
        assert_eq!(body["version"], "HTTP/2.0", "gRPC goes upstream over HTTP/2");
        assert_eq!(body["headers"]["te"][0], "trailers");
        let uri: http::Uri = body["uri"].as_str().unwrap().parse().unwrap();
        assert_eq!(uri.path(), "/pkg.Svc/Method");
        assert_eq!(uri.host(), Some("g.example.com"), ":authority is kept");
    }
    app.drain(WAIT).await;
}

#[tokio::test]
async fn websocket_upgrade_echo() {
    let (ws, _task) = upgrade_backend().await;
    let mut snap = Snap::default().cluster("ns/ws/80", &[ws]);
    snap.vhosts = vec![vhost("ws.example.com", vec![prefix("/", to("ns/ws/80"))])];
    let (app, _dir) = ingress(&snap).await;
    let mut s = TcpStream::connect(app.http_addr).await.unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: ws.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut byte)).await.unwrap().unwrap();
        assert!(n > 0, "closed before the 101: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for msg in [&b"hello"[..], b"second frame"] {
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(WAIT, s.read_exact(&mut back)).await.unwrap().unwrap();
        assert_eq!(back, msg);
    }
    drop(s);
    app.drain(WAIT).await;
}

#[tokio::test]
async fn forwarded_headers_request_id_and_hop_by_hop() {
    let a = Backend::start("a").await;
    let mut snap = Snap::default().cluster("ns/a/80", &[a.addr]);
    snap.vhosts = vec![vhost("foo.com", vec![prefix("/", to("ns/a/80"))])];
    let (app, _dir) = ingress(&snap).await;
    let req = Request::get("/h")
        .header("host", "foo.com:8080")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.example")
        .header("connection", "x-private, keep-alive")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "gzip")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = send(app.http_addr, req).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-forwarded-for"), vec!["203.0.113.9, 127.0.0.1"]);
    assert_eq!(r.header("x-forwarded-proto"), vec!["http"]);
    assert_eq!(r.header("x-forwarded-host"), vec!["foo.com:8080"]);
    for hop in ["x-private", "keep-alive", "proxy-connection", "te"] {
        assert!(r.header(hop).is_empty(), "{hop} forwarded: {}", r.json());
    }
    let id = r.header("x-request-id");
    assert_eq!(id.len(), 1);
    assert_eq!(id[0].len(), 32);
    assert_eq!(r.headers["x-request-id"], id[0].as_str(), "the id is echoed to the client");
    assert!(r.headers.get("keep-alive").is_none(), "the backend's keep-alive header is not forwarded");
    assert!(r.headers.get("x-backend-private").is_none(), "a header the backend's Connection names is not forwarded");

    let req = Request::get("/h")
        .header("host", "foo.com")
        .header("x-request-id", "lb-abc-123")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(app.http_addr, req).await.unwrap().header("x-request-id"), vec!["lb-abc-123"]);
    app.drain(WAIT).await;
}

/// A loopback address where nothing listens, and nothing else can listen while the returned socket lives: it
/// is bound but not listening (a port bound and released could be taken by another test's backend meanwhile).
fn dead_addr() -> (socket2::Socket, SocketAddr) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    (s, addr)
}

fn counter(metrics: &str, prefix: &str) -> u64 {
    metrics.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).sum()
}

#[tokio::test]
async fn retry_on_connect_failure_then_ejection() {
    let live = Backend::start("live").await;
    let (_hold, dead) = dead_addr();
    let mut snap = Snap::default().cluster("ns/mixed/80", &[dead, live.addr]).cluster("ns/dead/80", &[dead]);
    snap.vhosts = vec![vhost("h", vec![prefix("/dead", to("ns/dead/80")), prefix("/", to("ns/mixed/80"))])];
    let (app, _dir) = ingress(&snap).await;
    let connect_failures =
        |m: &str| counter(m, r#"mesh_ingress_upstream_failures_total{upstream="ns/mixed/80",kind="connect"}"#);
    // Every request succeeds: a failed connect is retried on the other endpoint. Keep going until the dead one
    // has failed often enough to be ejected (p2c picks it about half the time).
    let mut n = 0;
    loop {
        let r = get(app.http_addr, "h", "/x").await.unwrap();
        assert_eq!((r.status, r.backend()), (200, "live".to_owned()));
        n += 1;
        let m = metrics(&app).await;
        if counter(&m, r#"mesh_ingress_upstream_failures_total{upstream="ns/mixed/80",kind="ejected"}"#) > 0 {
            break;
        }
        assert!(n < 500, "the dead endpoint was never ejected: {m}");
    }
    let before = connect_failures(&metrics(&app).await);
    assert!(before >= 3);
    for _ in 0..30 {
        assert_eq!(get(app.http_addr, "h", "/x").await.unwrap().backend(), "live");
    }
    assert_eq!(connect_failures(&metrics(&app).await), before, "an ejected endpoint gets no connects");
    let dump: serde_json::Value = get(app.admin_addr, "localhost", "/config_dump").await.unwrap().json();
    let mixed = dump["clusters"].as_array().unwrap().iter().find(|c| c["name"] == "ns/mixed/80").unwrap().clone();
    let ejected: Vec<bool> =
        mixed["endpoints"].as_array().unwrap().iter().map(|e| e["ejected"].as_bool().unwrap()).collect();
    assert_eq!(ejected.iter().filter(|e| **e).count(), 1, "{mixed}");
    // With no endpoint that accepts, the client gets a 502 after the attempts.
    assert_eq!(get(app.http_addr, "h", "/dead").await.unwrap().status, 502);
    app.drain(WAIT).await;
}

#[tokio::test]
async fn live_route_change_keeps_in_flight_requests() {
    let (old, new) = (Backend::start("old").await, Backend::start("new").await);
    let mut snap = Snap::default().cluster("ns/old/80", &[old.addr]).cluster("ns/new/80", &[new.addr]);
    snap.vhosts = vec![vhost("h", vec![prefix("/", to("ns/old/80"))])];
    let (app, dir) = ingress(&snap).await;
    let at = app.http_addr;
    let in_flight = tokio::spawn(async move { get(at, "h", "/hold").await });
    let held = old.held.clone();
    eventually(WAIT, "the request reaches the old backend", || {
        let held = held.clone();
        async move { if held.load(Ordering::SeqCst) == 1 { Ok(()) } else { anyhow::bail!("not yet") } }
    })
    .await
    .unwrap();
    let mut next = snap.clone();
    next.vhosts = vec![vhost("h", vec![prefix("/", to("ns/new/80"))])];
    reload(&app, &dir, &next);
    assert_eq!(get(at, "h", "/after").await.unwrap().backend(), "new");
    old.gate.add_permits(1);
    let r = tokio::time::timeout(WAIT, in_flight).await.unwrap().unwrap().unwrap();
    assert_eq!((r.status, r.backend()), (200, "old".to_owned()), "the in-flight request finishes where it started");
    app.drain(WAIT).await;
}

#[tokio::test]
async fn smuggling_size_limits_and_header_timeout_are_refused() {
    let a = Backend::start("a").await;
    let mut snap = Snap::default().cluster("ns/a/80", &[a.addr]);
    snap.vhosts = vec![vhost("h", vec![prefix("/", to("ns/a/80"))])];
    let (app, _dir) = ingress_with(&snap, |c| {
        c.settings.max_header_bytes = 2048;
        c.settings.max_body_bytes = 16;
        c.settings.header_timeout = Duration::from_millis(300);
    })
    .await;
    let at = app.http_addr;
    let out = raw(at, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert_eq!(out.matches("HTTP/1.1").count(), 1, "nothing after the refusal is served: {out}");
    let out = raw(at, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcd").await;
    assert!(out.starts_with("HTTP/1.1 400"), "differing Content-Lengths: {out}");
    let big = format!("GET / HTTP/1.1\r\nHost: h\r\nX-Big: {}\r\n\r\n", "a".repeat(4000));
    let out = raw(at, big.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    let out = raw(at, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 17\r\n\r\n01234567890123456").await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert_eq!(a.hits.load(Ordering::SeqCst), 0, "no request refused on its headers reached the backend");
    // A streamed body is refused when it passes the limit (the backend, already sent the headers, sees the
    // request aborted).
    let out = raw(at, b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 413"), "a streamed body over the limit: {out}");
    // A client that never finishes its headers is disconnected (the read ends instead of hanging).
    let mut s = TcpStream::connect(at).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n").await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(_)) | Ok(Err(_))), "the slow client was never disconnected");
    // And a well-formed request still works.
    assert_eq!(get(at, "h", "/").await.unwrap().status, 200);
    app.drain(WAIT).await;
}

#[tokio::test]
async fn drain_finishes_in_flight_and_refuses_new_connections() {
    let a = Backend::start("a").await;
    let mut snap = Snap::default().cluster("ns/a/80", &[a.addr]);
    snap.vhosts = vec![vhost("h", vec![prefix("/", to("ns/a/80"))])];
    let (app, _dir) = ingress(&snap).await;
    let (at, admin) = (app.http_addr, app.admin_addr);
    assert_eq!(get(admin, "localhost", "/ready").await.unwrap().status, 200);
    // An idle keep-alive connection, and a request in flight.
    let idle = TcpStream::connect(at).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(idle)).await.unwrap();
    let idle_conn = tokio::spawn(conn);
    let r =
        tx.send_request(Request::get("/").header("host", "h").body(Full::new(Bytes::new())).unwrap()).await.unwrap();
    assert_eq!(r.status(), 200);
    let in_flight = tokio::spawn(async move { get(at, "h", "/hold").await });
    let held = a.held.clone();
    eventually(WAIT, "the request reaches the backend", || {
        let held = held.clone();
        async move { if held.load(Ordering::SeqCst) == 1 { Ok(()) } else { anyhow::bail!("not yet") } }
    })
    .await
    .unwrap();
    let shared = app.shared.clone();
    let drain = tokio::spawn(app.drain(WAIT));
    eventually(WAIT, "new connections are refused", || async move {
        match TcpStream::connect(at).await {
            Err(_) => Ok(()),
            Ok(_) => anyhow::bail!("still accepting"),
        }
    })
    .await
    .unwrap();
    // The idle keep-alive connection is closed by the drain.
    tokio::time::timeout(WAIT, idle_conn).await.expect("idle connection closed").unwrap().ok();
    assert!(!drain.is_finished(), "the drain waits for the request in flight");
    // Only the connection with the request in flight is left (probe connections accepted before the listener
    // closed end on their own).
    let conns = shared.clone();
    eventually(WAIT, "only the in-flight connection is open", || {
        let conns = conns.clone();
        async move {
            let open = conns.conns.open();
            anyhow::ensure!(open == 1, "{open} open");
            Ok(())
        }
    })
    .await
    .unwrap();
    a.gate.add_permits(1);
    let r = tokio::time::timeout(WAIT, in_flight).await.unwrap().unwrap().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(tokio::time::timeout(WAIT, drain).await.unwrap().unwrap(), 0, "nothing left open");
}

/// HTTP/2 (h2c) during a drain: the stream in flight finishes, the connection gets GOAWAY (a new stream on it
/// is refused, never half-served), and then it closes.
#[tokio::test]
async fn drain_lets_an_h2_stream_finish_and_sends_goaway() {
    let a = Backend::start("a").await;
    let mut snap = Snap::default().cluster("ns/a/80", &[a.addr]);
    snap.vhosts = vec![vhost("h", vec![prefix("/", to("ns/a/80"))])];
    let (app, _dir) = ingress(&snap).await;
    let at = app.http_addr;
    let mut tx = h2_over(TcpStream::connect(at).await.unwrap()).await.unwrap();
    let req = |path: &str| Request::get(format!("http://h{path}")).body(Full::new(Bytes::new())).unwrap();
    assert_eq!(tx.send_request(req("/")).await.unwrap().status(), 200);
    let held = tx.send_request(req("/hold"));
    let in_flight = tokio::spawn(async move {
        let r = held.await?;
        let status = r.status().as_u16();
        let body = r.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    });
    let waiting = a.held.clone();
    eventually(WAIT, "the request reaches the backend", || {
        let waiting = waiting.clone();
        async move { if waiting.load(Ordering::SeqCst) == 1 { Ok(()) } else { anyhow::bail!("not yet") } }
    })
    .await
    .unwrap();
    let drain = tokio::spawn(app.drain(WAIT));
    // GOAWAY: the client stops opening streams on this connection (hyper reports it closed or refuses).
    eventually(WAIT, "the connection got GOAWAY", || {
        let mut tx = tx.clone();
        async move {
            match tx.send_request(req("/")).await {
                Err(_) => Ok(()),
                Ok(r) => anyhow::bail!("a new stream was still served: {}", r.status()),
            }
        }
    })
    .await
    .unwrap();
    assert!(!drain.is_finished(), "the drain waits for the stream in flight");
    a.gate.add_permits(1);
    let (status, body) = tokio::time::timeout(WAIT, in_flight).await.unwrap().unwrap().unwrap();
    assert_eq!(status, 200, "the stream in flight finished");
    assert!(!body.is_empty());
    assert_eq!(tokio::time::timeout(WAIT, drain).await.unwrap().unwrap(), 0, "nothing left open");
}

#[tokio::test]
async fn a_bad_update_is_nacked_naming_the_resource_and_the_last_good_table_serves() {
    use mesh_ingress::config::XdsHandler;
    use prost::Message;
    use std::collections::BTreeMap;
    use xds_proto::client::{Handler, ResourceEntry, Update};
    use xds_proto::route::{RouteConfiguration, route_match};
    use xds_proto::types::ResourceType;

    let a = Backend::start("a").await;
    let mut snap = Snap::default().cluster("ns/a/80", &[a.addr]);
    snap.vhosts = vec![vhost("h", vec![prefix("/", to("ns/a/80"))])];
    let (app, _dir) = ingress(&snap).await;
    let mut bad_route = prefix("/", to("ns/a/80"));
    bad_route.r#match.as_mut().unwrap().path_specifier =
        Some(route_match::PathSpecifier::SafeRegex(Default::default()));
    let rc = RouteConfiguration {
        name: "ingress/http".into(),
        virtual_hosts: vec![vhost("h", vec![bad_route])],
        ..Default::default()
    };
    let mut resources = BTreeMap::new();
    resources.insert("ingress/http".to_owned(), ResourceEntry { version: "2".into(), body: rc.encode_to_vec().into() });
    let update = Update {
        kind: ResourceType::RouteConfiguration,
        resources: Arc::new(resources),
        changed: vec!["ingress/http".into()],
        removed: vec![],
        version: "2".into(),
    };
    let mut h = XdsHandler::new(app.shared.clone());
    let e = h.apply(&update).unwrap_err();
    assert!(e.contains("ingress/http") && e.contains("route 0") && e.contains("not supported"), "{e}");
    assert_eq!(get(app.http_addr, "h", "/").await.unwrap().backend(), "a", "the last good table still serves");
    let m = metrics(&app).await;
    assert!(m.contains("mesh_ingress_config_rejections_total 1"), "{m}");
    app.drain(WAIT).await;
}

#[tokio::test]
async fn live_endpoint_changes_and_terminating_fallback() {
    use xds_proto::core::HealthStatus;
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let mut snap = Snap::default().cluster("ns/svc/80", &[a.addr]);
    snap.vhosts = vec![vhost("h", vec![prefix("/", to("ns/svc/80"))])];
    let (app, dir) = ingress(&snap).await;
    assert_eq!(get(app.http_addr, "h", "/").await.unwrap().backend(), "a");
    // The Pod moves: a is terminating (still serving), b is ready: b takes every new request.
    let mut next = snap.clone();
    next.clusters.insert("ns/svc/80".into(), vec![(a.addr, HealthStatus::Draining), (b.addr, HealthStatus::Healthy)]);
    reload(&app, &dir, &next);
    for _ in 0..10 {
        assert_eq!(get(app.http_addr, "h", "/").await.unwrap().backend(), "b");
    }
    // b goes away (not ready): the terminating-but-serving a is used rather than failing.
    next.clusters.insert("ns/svc/80".into(), vec![(a.addr, HealthStatus::Draining), (b.addr, HealthStatus::Unhealthy)]);
    reload(&app, &dir, &next);
    assert_eq!(get(app.http_addr, "h", "/").await.unwrap().backend(), "a");
    // Nothing left: 503.
    next.clusters.insert("ns/svc/80".into(), vec![]);
    reload(&app, &dir, &next);
    assert_eq!(get(app.http_addr, "h", "/").await.unwrap().status, 503);
    app.drain(WAIT).await;
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let a = Backend::start("a").await;
    let mut snap = Snap::default().cluster("ns/a/80", &[a.addr]);
    snap.vhosts = vec![vhost("h", vec![prefix("/", to("ns/a/80"))])];
    let (app, _dir) = ingress(&snap).await;
    // Sequential requests, each on a new client connection: one pooled upstream connection serves them all.
    for _ in 0..20 {
        assert_eq!(get(app.http_addr, "h", "/").await.unwrap().status, 200);
    }
    assert_eq!(a.hits.load(Ordering::SeqCst), 20);
    assert_eq!(a.conns.load(Ordering::SeqCst), 1, "the upstream connection is reused");
    app.drain(WAIT).await;
}

/// TLS sessions resume from the server-side cache (a second connection from the same client is an abbreviated
/// handshake), and `tls_session_cache: 0` turns that off (every handshake is full).
#[tokio::test]
async fn tls_sessions_resume_unless_the_cache_is_off() {
    let a = Backend::start("a").await;
    let (ca, ka) = cert(&["r.example.com"]);
    let mut snap = Snap::default().cluster("ns/a/80", &[a.addr]);
    snap.vhosts = vec![vhost("r.example.com", vec![prefix("/", to("ns/a/80"))])];
    snap.secrets.insert("ns/r-tls".into(), (ca.clone(), ka, vec!["r.example.com".into()]));
    for (cache, want) in [(4096, rustls::HandshakeKind::Resumed), (0, rustls::HandshakeKind::Full)] {
        let (app, _dir) = ingress_with(&snap, |c| c.tls_session_cache = cache).await;
        let mut store = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
            store.add(c.unwrap()).unwrap();
        }
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let s = TcpStream::connect(app.https_addr).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("r.example.com").unwrap();
            let mut s = connector.connect(name, s).await.unwrap();
            kinds.push(s.get_ref().1.handshake_kind());
            // One exchange, so the client reads the session tickets sent after the handshake.
            s.write_all(b"GET / HTTP/1.1\r\nHost: r.example.com\r\nConnection: close\r\n\r\n").await.unwrap();
            let mut out = Vec::new();
            tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await.unwrap().ok();
            assert!(out.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&out));
        }
        assert_eq!(kinds, vec![Some(rustls::HandshakeKind::Full), Some(want)], "session cache {cache}");
        app.drain(WAIT).await;
    }
}

/// Every response carries `Server` (the Ingress conformance suite checks it with `Date`, `Content-Type` and
/// `Content-Length`): the upstream's own when it sent one, else ours; on HTTP/1.1 and HTTP/2, for proxied
/// responses and our own answers (404, 503, redirects).
#[tokio::test]
async fn every_response_has_a_server_header() {
    // A backend that names itself, and the echo backend that does not.
    let named = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let named_addr = named.local_addr().unwrap();
    let named_task = tokio::spawn(async move {
        while let Ok((mut s, _)) = named.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    let r = b"HTTP/1.1 200 OK\r\nServer: backend/1.0\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok";
                    if s.write_all(r).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let echo = Backend::start("echo").await;
    let mut snap = Snap::default().cluster("ns/named/80", &[named_addr]).cluster("ns/echo/80", &[echo.addr]);
    snap.vhosts = vec![vhost(
        "h",
        vec![
            exact("/named", to("ns/named/80")),
            exact("/gone", direct(503, "503 gone\n")),
            exact("/moved", redirect()),
            prefix("/echo", to("ns/echo/80")),
        ],
    )];
    let (app, _dir) = ingress(&snap).await;
    let at = app.http_addr;
    let server = |r: &Reply| r.headers.get("server").map(|v| v.to_str().unwrap().to_owned());
    let r = get(at, "h", "/named").await.unwrap();
    assert_eq!(server(&r).as_deref(), Some("backend/1.0"), "the upstream's own Server is kept");
    let r = get(at, "h", "/echo").await.unwrap();
    assert_eq!(server(&r).as_deref(), Some("mesh"));
    for h in ["date", "content-type", "content-length"] {
        assert!(r.headers.contains_key(h), "{h} missing on a proxied response");
    }
    for (path, status) in [("/nothing", 404), ("/gone", 503), ("/moved", 308)] {
        let host = if path == "/nothing" { "other" } else { "h" };
        let r = get(at, host, path).await.unwrap();
        assert_eq!(r.status, status, "{path}");
        assert_eq!(server(&r).as_deref(), Some("mesh"), "{path}");
        for h in ["date", "content-type", "content-length"] {
            assert!(r.headers.contains_key(h), "{h} missing on our {status}");
        }
    }
    // HTTP/2 (h2c): the same.
    let mut tx = h2_over(TcpStream::connect(at).await.unwrap()).await.unwrap();
    for (path, want) in [("/named", "backend/1.0"), ("/echo", "mesh"), ("/gone", "mesh"), ("/moved", "mesh")] {
        let req = Request::get(format!("http://h{path}")).body(Full::new(Bytes::new())).unwrap();
        let r = tx.send_request(req).await.unwrap();
        assert_eq!(r.headers().get("server").and_then(|v| v.to_str().ok()), Some(want), "h2 {path}");
    }
    app.drain(WAIT).await;
    named_task.abort();
}

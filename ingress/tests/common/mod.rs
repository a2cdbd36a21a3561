//! Helpers of the in-process tests: backends (HTTP/1+h2c echo, gRPC, WebSocket), resource builders written as
//! snapshot files, HTTP(S) clients, and a running ingress.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_ingress::app::{self, App, Source};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use xds_proto::codec::pack_any;
use xds_proto::core::{self, DataSource, HealthStatus, data_source};
use xds_proto::endpoint::{ClusterLoadAssignment, LbEndpoint, LocalityLbEndpoints, lb_endpoint};
use xds_proto::hcm::{HttpConnectionManager, Rds, http_connection_manager};
use xds_proto::listener::{Filter, FilterChain, FilterChainMatch, Listener, filter};
use xds_proto::route::{
    DirectResponseAction, RedirectAction, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
    redirect_action, route, route_action, route_match,
};
use xds_proto::tls::{CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret, TlsCertificate, secret};
use xds_proto::types::ResourceType;

pub const WAIT: Duration = Duration::from_secs(10);

/// An HTTP/1.1 + h2c echo backend. `/hold` waits until the test releases it.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    /// TCP connections accepted.
    pub conns: Arc<AtomicUsize>,
    pub held: Arc<AtomicUsize>,
    pub gate: Arc<Semaphore>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(0));
        let conns = Arc::new(AtomicUsize::new(0));
        let (n, h, hd, g, c) = (name.to_owned(), hits.clone(), held.clone(), gate.clone(), conns.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                let (n, h, hd, g) = (n.clone(), h.clone(), hd.clone(), g.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (n, h, hd, g) = (n.clone(), h.clone(), hd.clone(), g.clone());
                        async move { Ok::<_, Infallible>(echo(n, h, hd, g, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Backend { name: name.into(), addr, hits, conns, held, gate, task }
    }
}

type EchoBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn echo(
    name: String,
    hits: Arc<AtomicUsize>,
    held: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
    req: Request<Incoming>,
) -> Response<EchoBody> {
    hits.fetch_add(1, Ordering::SeqCst);
    let grpc = req.headers().get("content-type").is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let mut headers = BTreeMap::new();
    for (k, v) in req.headers() {
        headers
            .entry(k.as_str().to_owned())
            .or_insert_with(Vec::new)
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let version = format!("{:?}", req.version());
    if req.uri().path() == "/hold" {
        held.fetch_add(1, Ordering::SeqCst);
        let _ = gate.acquire().await.map(|p| p.forget());
    }
    let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let doc = serde_json::json!({"backend": name, "method": method, "uri": uri, "version": version,
        "headers": headers, "body": String::from_utf8_lossy(&body)});
    if grpc {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.insert("grpc-message", "served-by-".to_owned().parse().unwrap());
        let body = Full::new(Bytes::from(doc.to_string())).with_trailers(async move { Some(Ok(trailers)) });
        return Response::builder().header("content-type", "application/grpc").body(BodyExt::boxed(body)).unwrap();
    }
    Response::builder()
        .header("content-type", "application/json")
        .header("connection", "x-backend-private")
        .header("x-backend-private", "1")
        .header("keep-alive", "timeout=5")
        .body(BodyExt::boxed(Full::new(Bytes::from(doc.to_string()))))
        .unwrap()
}

/// A WebSocket-ish upgrade backend: answers 101 to an `Upgrade` request, then echoes raw bytes.
pub async fn upgrade_backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { continue };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let Ok(n) = s.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
                if !head.contains("upgrade: websocket") {
                    let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").await;
                    return;
                }
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: x\r\n\r\n")
                    .await;
                loop {
                    let Ok(n) = s.read(&mut chunk).await else { return };
                    if n == 0 || s.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

// ---- resources ------------------------------------------------------------------------------------------------

pub fn exact(path: &str, action: route::Action) -> Route {
    Route {
        name: "ns/ing".into(),
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Path(path.into())),
            ..Default::default()
        }),
        action: Some(action),
        metadata: xds_proto::meta::build([
            (xds_proto::meta::INGRESS, "ns/ing".into()),
            (xds_proto::meta::PATH_TYPE, "Exact".into()),
        ]),
        ..Default::default()
    }
}

pub fn prefix(path: &str, action: route::Action) -> Route {
    let spec = if path == "/" {
        route_match::PathSpecifier::Prefix("/".into())
    } else {
        route_match::PathSpecifier::PathSeparatedPrefix(path.into())
    };
    Route {
        name: "ns/ing".into(),
        r#match: Some(RouteMatch { path_specifier: Some(spec), ..Default::default() }),
        action: Some(action),
        metadata: xds_proto::meta::build([
            (xds_proto::meta::INGRESS, "ns/ing".into()),
            (xds_proto::meta::PATH_TYPE, "Prefix".into()),
        ]),
        ..Default::default()
    }
}

pub fn to(cluster: &str) -> route::Action {
    route::Action::Route(RouteAction {
        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.into())),
        ..Default::default()
    })
}

pub fn direct(status: u32, body: &str) -> route::Action {
    route::Action::DirectResponse(DirectResponseAction {
        status,
        body: Some(DataSource {
            specifier: Some(data_source::Specifier::InlineString(body.into())),
            ..Default::default()
        }),
        ..Default::default()
    })
}

pub fn redirect() -> route::Action {
    route::Action::Redirect(RedirectAction {
        scheme_rewrite_specifier: Some(redirect_action::SchemeRewriteSpecifier::HttpsRedirect(true)),
        response_code: redirect_action::RedirectResponseCode::PermanentRedirect as i32,
        ..Default::default()
    })
}

pub fn vhost(domain: &str, routes: Vec<Route>) -> VirtualHost {
    VirtualHost {
        name: domain.into(),
        domains: vec![domain.into()],
        routes,
        metadata: if domain.starts_with("*.") {
            xds_proto::meta::build([(xds_proto::meta::WILDCARD_ONE_LABEL, true.into())])
        } else {
            None
        },
        ..Default::default()
    }
}

fn hcm(route_config: &str) -> Filter {
    let cfg = HttpConnectionManager {
        stat_prefix: "x".into(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            route_config_name: route_config.into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(&cfg))),
    }
}

fn tls_socket(secret: &str) -> core::TransportSocket {
    let ctx = DownstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![SdsSecretConfig { name: secret.into(), ..Default::default() }],
            alpn_protocols: vec!["h2".into(), "http/1.1".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    core::TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(pack_any(&ctx))),
    }
}

/// A self-signed certificate for `names`: (cert PEM, key PEM).
pub fn cert(names: &[&str]) -> (String, String) {
    let ck = rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    (ck.cert.pem(), ck.signing_key.serialize_pem())
}

/// Everything an ingress gets, built up by a test and written as a snapshot file.
#[derive(Default, Clone)]
pub struct Snap {
    pub vhosts: Vec<VirtualHost>,
    /// Virtual hosts of the plain-HTTP port, when they differ from the TLS port's (redirects).
    pub http_vhosts: Option<Vec<VirtualHost>>,
    pub clusters: BTreeMap<String, Vec<(SocketAddr, HealthStatus)>>,
    /// Secret name → (cert, key, SNI names).
    pub secrets: BTreeMap<String, (String, String, Vec<String>)>,
}

impl Snap {
    pub fn cluster(mut self, name: &str, eps: &[SocketAddr]) -> Self {
        self.clusters.insert(name.into(), eps.iter().map(|a| (*a, HealthStatus::Healthy)).collect());
        self
    }

    pub fn resources(&self) -> Vec<(ResourceType, Vec<u8>)> {
        let mut out = Vec::new();
        for (name, (c, k, _)) in &self.secrets {
            let inline = |s: &str| {
                Some(DataSource {
                    specifier: Some(data_source::Specifier::InlineBytes(s.as_bytes().to_vec())),
                    ..Default::default()
                })
            };
            let s = Secret {
                name: name.clone(),
                r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                    certificate_chain: inline(c),
                    private_key: inline(k),
                    ..Default::default()
                })),
            };
            out.push((ResourceType::Secret, s.encode_to_vec()));
        }
        for (name, eps) in &self.clusters {
            let c = xds_proto::cluster::Cluster { name: name.clone(), ..Default::default() };
            out.push((ResourceType::Cluster, c.encode_to_vec()));
            let cla = ClusterLoadAssignment {
                cluster_name: name.clone(),
                endpoints: vec![LocalityLbEndpoints {
                    lb_endpoints: eps
                        .iter()
                        .map(|(a, h)| LbEndpoint {
                            health_status: *h as i32,
                            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(
                                xds_proto::endpoint::Endpoint {
                                    address: Some(core::Address {
                                        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                                            address: a.ip().to_string(),
                                            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(
                                                u32::from(a.port()),
                                            )),
                                            ..Default::default()
                                        })),
                                    }),
                                    ..Default::default()
                                },
                            )),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            };
            out.push((ResourceType::ClusterLoadAssignment, cla.encode_to_vec()));
        }
        let http = Listener {
            name: "ingress/http".into(),
            filter_chains: vec![FilterChain { filters: vec![hcm("ingress/http")], ..Default::default() }],
            ..Default::default()
        };
        out.push((ResourceType::Listener, http.encode_to_vec()));
        if !self.secrets.is_empty() {
            let chains = self
                .secrets
                .iter()
                .map(|(name, (_, _, sni))| FilterChain {
                    name: name.clone(),
                    filters: vec![hcm("ingress/https")],
                    transport_socket: Some(tls_socket(name)),
                    filter_chain_match: Some(FilterChainMatch { server_names: sni.clone(), ..Default::default() }),
                    ..Default::default()
                })
                .collect();
            let https = Listener { name: "ingress/https".into(), filter_chains: chains, ..Default::default() };
            out.push((ResourceType::Listener, https.encode_to_vec()));
            let rc = RouteConfiguration {
                name: "ingress/https".into(),
                virtual_hosts: self.vhosts.clone(),
                ..Default::default()
            };
            out.push((ResourceType::RouteConfiguration, rc.encode_to_vec()));
        }
        let rc = RouteConfiguration {
            name: "ingress/http".into(),
            virtual_hosts: self.http_vhosts.clone().unwrap_or_else(|| self.vhosts.clone()),
            ..Default::default()
        };
        out.push((ResourceType::RouteConfiguration, rc.encode_to_vec()));
        out
    }

    /// Writes the snapshot file into `dir`.
    pub fn write(&self, dir: &tempfile::TempDir, name: &str) -> PathBuf {
        let res = self.resources();
        let doc = xds_proto::snapshot_file::to_json("ingress", res.iter().map(|(k, b)| (*k, &b[..]))).unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
        path
    }
}

/// Starts an ingress serving `snap`.
pub async fn ingress(snap: &Snap) -> (App, tempfile::TempDir) {
    ingress_with(snap, |_| {}).await
}

pub async fn ingress_with(snap: &Snap, tweak: impl FnOnce(&mut app::Config)) -> (App, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = snap.write(&dir, "snap.json");
    let mut cfg = app::Config::local(Source::File(path));
    tweak(&mut cfg);
    (app::build(cfg).await.unwrap(), dir)
}

/// Replaces the running configuration with `snap` (as a reloaded snapshot file).
pub fn reload(app: &App, dir: &tempfile::TempDir, snap: &Snap) {
    let path = snap.write(dir, "next.json");
    mesh_ingress::config::load_file(&path, "mesh", &app.shared).unwrap();
}

// ---- clients --------------------------------------------------------------------------------------------------

pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
    pub fn backend(&self) -> String {
        self.json()["backend"].as_str().unwrap_or("-").to_owned()
    }
    pub fn header(&self, name: &str) -> Vec<String> {
        self.json()["headers"][name]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_str().unwrap_or("").to_owned()).collect())
            .unwrap_or_default()
    }
}

/// One HTTP/1.1 request on a new connection.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> anyhow::Result<Reply> {
    let s = TcpStream::connect(addr).await?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(conn);
    let resp = tx.send_request(req).await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Reply { status, headers, body })
}

pub async fn get(addr: SocketAddr, host: &str, path: &str) -> anyhow::Result<Reply> {
    send(addr, Request::get(path).header("host", host).body(Full::new(Bytes::new()))?).await
}

/// Writes raw bytes, reads until the server closes (bounded), returns what came back.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A TLS connection trusting `roots`, with SNI and ALPN.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    roots: &[&str],
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut store = rustls::RootCertStore::empty();
    for pem in roots {
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
            store.add(c.unwrap()).unwrap();
        }
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let s = TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    connector.connect(name, s).await
}

use rustls_pki_types::pem::PemObject;

/// A TLS 1.2-only connection (HTTP/1.1).
pub async fn tls_connect_v12(
    addr: SocketAddr,
    sni: &str,
    root: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut store = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(root.as_bytes()) {
        store.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let s = TcpStream::connect(addr).await?;
    connector.connect(rustls_pki_types::ServerName::try_from(sni.to_owned()).unwrap(), s).await
}

/// The certificate the server presented on a TLS connection, as DER.
pub fn peer_cert(s: &tokio_rustls::client::TlsStream<TcpStream>) -> Vec<u8> {
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

pub fn der(pem: &str) -> Vec<u8> {
    rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).next().unwrap().unwrap().to_vec()
}

/// An HTTP/1.1 request over an established stream.
pub async fn h1_over<S>(s: S, req: Request<Full<Bytes>>) -> anyhow::Result<Reply>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(conn);
    let resp = tx.send_request(req).await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Reply { status, headers, body })
}

/// HTTP/2 requests over an established stream (TLS with ALPN h2, or cleartext prior knowledge).
pub async fn h2_over<S>(s: S) -> anyhow::Result<hyper::client::conn::http2::SendRequest<Full<Bytes>>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s)).await?;
    tokio::spawn(conn);
    Ok(tx)
}

/// Bounded polling.
#[allow(unused_imports)]
pub use mesh_tests::wait::eventually;

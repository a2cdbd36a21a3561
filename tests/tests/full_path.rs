//! The whole path, with the real binaries on loopback: User → the ingress Service's LoadBalancer IP or NodePort
//! (on mesh-proxy) → mesh-ingress (plain HTTP and TLS by SNI) → Service → Pod, with several Pods per Service;
//! and Pod → ClusterIP → Pod. mesh-control serves both proxies over xDS from a folder this test writes.
//!
//! Addresses: Pods 127.76.1.0/24, ClusterIPs 127.77.1.0/24, the LoadBalancer IP 127.77.2.1, mesh-ingress
//! 127.78.1.1; ports from [`free_port`]. The certificate is made here (rcgen) and handed over as a
//! `kubernetes.io/tls` Secret.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use mesh_tests::manifests::{self, ReadyPod};
use mesh_tests::{Process, eventually, free_port, http_get, wait_for_line, workspace_bin};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(60);
const NS: &str = "full";
const TLS_HOST: &str = "shop.full.test";
const PLAIN_HOST: &str = "plain.full.test";
/// A host listed under an Ingress's `tls` without a redirect asked for (the conformance suite's case).
const TLS_ONLY_HOST: &str = "tls-only.full.test";

fn pod_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 76, 1, i)
}

/// A Service with a ClusterIP and its slice of ready Pods (name, ip) on node-a.
fn service(name: &str, ip: Ipv4Addr, port: u16, target: u16, pods: &[(String, Ipv4Addr)]) -> String {
    let pods: Vec<ReadyPod> = pods.iter().map(|(pod, ip)| ReadyPod::new(pod.as_str(), *ip, "node-a")).collect();
    manifests::service_with_pods(NS, name, ip, "http", port, target, &pods)
}

struct Ports {
    lb_http: u16,
    lb_https: u16,
    node_http: u16,
    ing_http: u16,
    ing_https: u16,
}

fn ingress_side(p: &Ports, cert_pem: &str, key_pem: &str) -> String {
    let ingress = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: mesh-ingress, namespace: mesh-system}}
spec:
  type: LoadBalancer
  clusterIP: 127.77.1.80
  clusterIPs: [127.77.1.80]
  ports:
    - {{name: http, port: {lb_http}, protocol: TCP, targetPort: {ing_http}, nodePort: {node_http}}}
    - {{name: https, port: {lb_https}, protocol: TCP, targetPort: {ing_https}}}
status:
  loadBalancer:
    ingress: [{{ip: 127.77.2.1, ipMode: VIP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: mesh-ingress-1
  namespace: mesh-system
  labels: {{kubernetes.io/service-name: mesh-ingress}}
addressType: IPv4
ports:
  - {{name: http, port: {ing_http}, protocol: TCP}}
  - {{name: https, port: {ing_https}, protocol: TCP}}
endpoints:
  - addresses: [127.78.1.1]
    conditions: {{ready: true, serving: true, terminating: false}}
    nodeName: node-a
",
        lb_http = p.lb_http,
        lb_https = p.lb_https,
        node_http = p.node_http,
        ing_http = p.ing_http,
        ing_https = p.ing_https,
    );
    manifests::join(&[
        ingress,
        manifests::ingress_class(),
        manifests::tls_secret(NS, "shop-tls", cert_pem, key_pem),
        manifests::shop_ingress(NS, TLS_HOST, PLAIN_HOST, "shop-tls"),
        manifests::tls_host_ingress(NS, TLS_ONLY_HOST, "shop-tls"),
    ])
}

/// GET over TLS (SNI `host`, trusting `root_pem`) to `addr`; returns status and body.
async fn https_get(addr: SocketAddr, host: &str, path: &str, root_pem: &str) -> anyhow::Result<(u16, String)> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
    let name = rustls_pki_types::ServerName::try_from(host.to_owned())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.context("TLS handshake")?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    conn.abort();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The Pod that answered (`pod full/NAME (…)`), from a demo Pod's body.
fn pod_of(body: &str) -> Option<&str> {
    body.strip_prefix(&format!("pod {NS}/"))?.split_whitespace().next()
}

async fn start(dir: &Path, ports: &Ports) -> anyhow::Result<Vec<Process>> {
    let mut cmd = Command::new(workspace_bin("mesh-control")?);
    cmd.arg("--manifests").arg(dir).args(["--xds-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"]);
    let mut control = Process::spawn("mesh-control", cmd)?;
    let line = wait_for_line(&mut control, "mesh-control xds=", WAIT).await?;
    let xds = line.split_whitespace().find_map(|w| w.strip_prefix("xds=")).context("no xds=")?.to_owned();
    let mut cmd = Command::new(workspace_bin("mesh-proxy")?);
    cmd.args(["--xds", &format!("http://{xds}"), "--node", "node-a", "--admin-addr", "127.0.0.1:0"]);
    let mut proxy = Process::spawn("mesh-proxy", cmd)?;
    wait_for_line(&mut proxy, "mesh-proxy admin=", WAIT).await?;
    let mut cmd = Command::new(workspace_bin("mesh-ingress")?);
    cmd.args([
        "--xds",
        &format!("http://{xds}"),
        "--http-addr",
        &format!("127.78.1.1:{}", ports.ing_http),
        "--https-addr",
        &format!("127.78.1.1:{}", ports.ing_https),
        "--admin-addr",
        "127.0.0.1:0",
    ]);
    let mut ingress = Process::spawn("mesh-ingress", cmd)?;
    wait_for_line(&mut ingress, "mesh-ingress http=", WAIT).await?;
    Ok(vec![control, proxy, ingress])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_to_pod_through_lb_nodeport_ingress_and_tls_and_pod_to_clusterip() -> anyhow::Result<()> {
    let (web_ip, api_ip) = (Ipv4Addr::new(127, 77, 1, 10), Ipv4Addr::new(127, 77, 1, 20));
    let lb_ip = IpAddr::V4(Ipv4Addr::new(127, 77, 2, 1));
    let ing_ip = IpAddr::V4(Ipv4Addr::new(127, 78, 1, 1));
    let ports = Ports {
        lb_http: free_port(lb_ip)?,
        lb_https: free_port(lb_ip)?,
        node_http: free_port(IpAddr::V4(Ipv4Addr::UNSPECIFIED))?,
        ing_http: free_port(ing_ip)?,
        ing_https: free_port(ing_ip)?,
    };
    let (svc_port, target) = (free_port(IpAddr::V4(web_ip))?, free_port(IpAddr::V4(pod_ip(1)))?);

    // Pods: three for web, two for api.
    let mut tasks = Vec::new();
    let mut pods = |names: &[(&str, u8)]| -> anyhow::Result<Vec<(String, Ipv4Addr)>> {
        let mut out = Vec::new();
        for (name, i) in names {
            let l = std::net::TcpListener::bind((pod_ip(*i), target))?;
            l.set_nonblocking(true)?;
            tasks.push(tokio::spawn(mesh_control::demo_pod::http_pod(
                TcpListener::from_std(l)?,
                format!("{NS}/{name}"),
            )));
            out.push(((*name).to_owned(), pod_ip(*i)));
        }
        Ok(out)
    };
    let web = pods(&[("web-a", 1), ("web-b", 2), ("web-c", 3)])?;
    let api = pods(&[("api-a", 11), ("api-b", 12)])?;

    let cert = rcgen::generate_simple_self_signed(vec![TLS_HOST.to_owned()])?;
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.signing_key.serialize_pem());
    let root = tempfile::tempdir()?;
    let dir = root.path().join("manifests");
    std::fs::create_dir(&dir)?;
    std::fs::write(dir.join("web.yaml"), service("web", web_ip, svc_port, target, &web))?;
    std::fs::write(dir.join("api.yaml"), service("api", api_ip, svc_port, target, &api))?;
    std::fs::write(dir.join("ingress.yaml"), ingress_side(&ports, &cert_pem, &key_pem))?;
    let _procs = start(&dir, &ports).await?;

    let lb_http = SocketAddr::new(lb_ip, ports.lb_http);
    let lb_https = SocketAddr::new(lb_ip, ports.lb_https);
    let node_http = SocketAddr::from(([127, 0, 0, 1], ports.node_http));

    // User → LB IP → ingress → web, spread over the web Pods.
    let seen = Mutex::new(BTreeSet::new());
    eventually(WAIT, "plain HTTP through the LB reaches every web Pod", || {
        let seen = &seen;
        async move {
            let r = http_get(lb_http, PLAIN_HOST, "/").await?;
            anyhow::ensure!(r.status == 200, "status {}: {}", r.status, r.body);
            let pod = pod_of(&r.body).context("not a demo Pod's answer")?.to_owned();
            anyhow::ensure!(pod.starts_with("web-"), "answered by {pod}");
            let mut seen = seen.lock().expect("not poisoned");
            seen.insert(pod);
            anyhow::ensure!(seen.len() == 3, "only {seen:?} so far");
            Ok(())
        }
    })
    .await?;

    // User → NodePort → ingress → web.
    let r = http_get(node_http, PLAIN_HOST, "/x").await?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(pod_of(&r.body).is_some_and(|p| p.starts_with("web-")), "{}", r.body);

    // User → LB IP (TLS, SNI) → ingress → api for /api, web for the rest; the path reaches the Pod unchanged.
    let api_seen = Mutex::new(BTreeSet::new());
    eventually(WAIT, "TLS through the LB reaches both api Pods", || {
        let (api_seen, cert_pem) = (&api_seen, &cert_pem);
        async move {
            let (status, body) = https_get(lb_https, TLS_HOST, "/api/orders?id=1", cert_pem).await?;
            anyhow::ensure!(status == 200, "status {status}: {body}");
            anyhow::ensure!(body.contains("GET /api/orders?id=1"), "{body}");
            let pod = pod_of(&body).context("not a demo Pod's answer")?.to_owned();
            anyhow::ensure!(pod.starts_with("api-"), "answered by {pod}");
            let mut api_seen = api_seen.lock().expect("not poisoned");
            api_seen.insert(pod);
            anyhow::ensure!(api_seen.len() == 2, "only {api_seen:?} so far");
            Ok(())
        }
    })
    .await?;
    let (status, body) = https_get(lb_https, TLS_HOST, "/", &cert_pem).await?;
    assert_eq!(status, 200, "{body}");
    assert!(pod_of(&body).is_some_and(|p| p.starts_with("web-")), "{body}");

    // Plain HTTP to a TLS host is served by default (Ingress conformance: GET http://foo.bar.com/ gets the
    // backend's 200)...
    let r = http_get(lb_http, TLS_ONLY_HOST, "/cart").await?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(pod_of(&r.body).is_some_and(|p| p.starts_with("web-")), "{}", r.body);
    // ...and redirected to HTTPS where the Ingress asks for it (mesh.dev/ssl-redirect).
    let r = http_get(lb_http, TLS_HOST, "/cart").await?;
    assert!(matches!(r.status, 301 | 302 | 307 | 308), "status {}: {}", r.status, r.body);
    let location = r.headers.get("location").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(location.starts_with(&format!("https://{TLS_HOST}")) && location.ends_with("/cart"), "{location}");

    // Pod → ClusterIP → Pod (the L4 path inside the cluster).
    let r = http_get(SocketAddr::from((api_ip, svc_port)), "api", "/internal").await?;
    assert_eq!(r.status, 200);
    assert!(pod_of(&r.body).is_some_and(|p| p.starts_with("api-")), "{}", r.body);
    for t in tasks {
        t.abort();
    }
    Ok(())
}

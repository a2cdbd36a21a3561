//! Leader election on a real Kubernetes API server (`mesh_tests::apiserver`): three `mesh-control` replicas
//! with `deploy/`'s RBAC and ServiceAccount token; one holds the Lease and only it writes Ingress status (each
//! replica publishes its own address here, so the status says who wrote it); killing the holder (SIGKILL: no
//! release) moves the Lease within the lease duration plus two retry periods, and the status follows.
//!
//!
//! A renewal refused with `409 Conflict` (the Lease changed between the holder's read and its write: here a
//! proxy in front of the server changes it at that moment) is retried on the next period, and the holder keeps
//! the Lease without stepping down, as client-go's elector does until its renew deadline.
//!
//! Skipped (saying why) when the binaries are not built, unless `MESH_REQUIRE_KUBE_APISERVER=1` (CI).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Api, Patch, PatchParams};
use mesh_tests::apiserver::{KubeApiServer, MeshControl};
use mesh_tests::eventually;
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(30);
/// `--lease-duration-s` given to the replicas (the smallest mesh-control accepts); it renews every 2 s.
const LEASE_S: u64 = 3;
const RETRY_S: u64 = 2;

fn address(identity: &str) -> String {
    let n = match identity {
        "a" => 1,
        "b" => 2,
        _ => 3,
    };
    format!("203.0.113.{n}")
}

async fn holder(leases: &Api<Lease>) -> anyhow::Result<(Option<String>, Option<String>)> {
    let lease = leases.get_opt("mesh-control").await?;
    let spec = lease.and_then(|l| l.spec);
    let holder = spec.as_ref().and_then(|s| s.holder_identity.clone()).filter(|h| !h.is_empty());
    let renewed = spec.and_then(|s| s.renew_time).map(|t| serde_json::to_string(&t).unwrap_or_default());
    Ok((holder, renewed))
}

async fn status_ips(ingresses: &Api<Ingress>) -> anyhow::Result<Vec<String>> {
    let ing = ingresses.get("shop").await?;
    Ok(ing
        .status
        .and_then(|s| s.load_balancer)
        .and_then(|l| l.ingress)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|i| i.ip)
        .collect())
}

async fn writes(control: &MeshControl) -> anyhow::Result<f64> {
    let ok = control.metric("mesh_ingress_status_writes_total{result=\"ok\"}").await?.unwrap_or(0.0);
    let err = control.metric("mesh_ingress_status_writes_total{result=\"error\"}").await?.unwrap_or(0.0);
    Ok(ok + err)
}

#[tokio::test]
async fn one_replica_holds_the_lease_writes_status_and_hands_over_when_killed() -> anyhow::Result<()> {
    let Some(server) = KubeApiServer::start_or_skip("one_replica_holds_the_lease").await? else {
        return Ok(());
    };
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    for f in ["00-namespace.yaml", "10-rbac.yaml", "20-ingressclass.yaml"] {
        server.apply_yaml(&std::fs::read_to_string(deploy.join(f))?, None).await?;
    }
    let ns = server.namespace("lease").await?;
    server
        .apply_yaml(
            &mesh_tests::manifests::join(&[
                mesh_tests::manifests::service_with_pods(
                    &ns,
                    "web",
                    "10.96.2.10".parse::<std::net::IpAddr>()?,
                    "http",
                    80,
                    8080,
                    &[mesh_tests::manifests::ReadyPod::new("web-a", [10, 1, 0, 1], "node-a")],
                ),
                mesh_tests::manifests::shop_ingress(&ns, "shop.example.com", "plain.example.com", "none"),
            ]),
            Some(&ns),
        )
        .await?;
    let token = server.service_account_token("mesh-system", "mesh-control").await?;
    let kubeconfig = server.write_file("mesh-control.kubeconfig", &server.token_kubeconfig(&token, None))?;

    let mut replicas = BTreeMap::new();
    for id in ["a", "b", "c"] {
        let args = [
            format!("--publish-address={}", address(id)),
            "--lease-namespace=mesh-system".to_owned(),
            format!("--identity={id}"),
            format!("--lease-duration-s={LEASE_S}"),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        replicas.insert(id, MeshControl::start(&format!("mesh-control-{id}"), &kubeconfig, &args).await?);
    }
    let leases: Api<Lease> = Api::namespaced(server.client(), "mesh-system");
    let ingresses: Api<Ingress> = Api::namespaced(server.client(), &ns);

    // One leader, and the status carries its address.
    let first = eventually(CONVERGE, "a leader writes the status", || async {
        let (h, _) = holder(&leases).await?;
        let h = h.context("no holder yet")?;
        let ips = status_ips(&ingresses).await?;
        anyhow::ensure!(ips == [address(&h)], "holder {h}, status {ips:?}");
        Ok(h)
    })
    .await?;

    // Through three renewals: the same holder, exactly one replica says it leads, followers never write.
    let (_, mut renewed) = holder(&leases).await?;
    for round in 0..3 {
        renewed = eventually(CONVERGE, "the holder renews", || {
            let before = renewed.clone();
            let leases = leases.clone();
            async move {
                let (h, r) = holder(&leases).await?;
                anyhow::ensure!(r != before, "not renewed yet");
                Ok((h, r))
            }
        })
        .await
        .and_then(|(h, r)| {
            anyhow::ensure!(h.as_deref() == Some(first.as_str()), "round {round}: the Lease moved to {h:?}");
            Ok(r)
        })?;
        let mut leading = Vec::new();
        for (id, c) in &replicas {
            if c.metric("mesh_leader").await? == Some(1.0) {
                leading.push(*id);
            }
            if *id != first.as_str() {
                anyhow::ensure!(writes(c).await? == 0.0, "follower {id} wrote Ingress status");
            }
        }
        anyhow::ensure!(leading == [first.as_str()], "round {round}: leaders {leading:?}, Lease holder {first}");
        anyhow::ensure!(status_ips(&ingresses).await? == [address(&first)], "the status changed");
    }

    // SIGKILL the holder: no release, so the others wait out the Lease, then one takes it.
    let killed = Instant::now();
    drop(replicas.remove(first.as_str()));
    let second = eventually(CONVERGE, "another replica takes the Lease", || async {
        let (h, _) = holder(&leases).await?;
        let h = h.context("no holder")?;
        anyhow::ensure!(h != first, "still held by the killed {h}");
        Ok(h)
    })
    .await?;
    let took = killed.elapsed();
    let bound = Duration::from_secs(LEASE_S + 2 * RETRY_S + 2);
    anyhow::ensure!(took <= bound, "the Lease moved after {took:?}, more than {bound:?}");
    eventually(CONVERGE, "the new leader writes the status", || async {
        let ips = status_ips(&ingresses).await?;
        anyhow::ensure!(ips == [address(&second)], "status {ips:?}, new holder {second}");
        Ok(())
    })
    .await?;
    for (id, c) in &replicas {
        let leader = c.metric("mesh_leader").await? == Some(1.0);
        anyhow::ensure!(leader == (*id == second.as_str()), "{id}: mesh_leader {leader}, holder {second}");
        if *id != second.as_str() {
            anyhow::ensure!(writes(c).await? == 0.0, "follower {id} wrote Ingress status");
        }
    }
    let transitions = leases.get("mesh-control").await?.spec.and_then(|s| s.lease_transitions);
    anyhow::ensure!(transitions == Some(1), "leaseTransitions {transitions:?}, one handover expected");

    // What the server saw of the race for the Lease: writes refused as stale (409) never made a second leader.
    let conflicts = server
        .audit_events()?
        .iter()
        .filter(|e| e.pointer("/objectRef/resource").and_then(Value::as_str) == Some("leases"))
        .filter(|e| e.pointer("/responseStatus/code").and_then(Value::as_u64) == Some(409))
        .count();
    eprintln!("Lease writes refused with 409 Conflict during the test: {conflicts}; leader moved after {took:?}");
    Ok(())
}

/// Called with each request's method and path before it is forwarded.
type Hook = Arc<dyn Fn(&http::Method, &str) -> futures_like::BoxFuture + Send + Sync>;

mod futures_like {
    /// A boxed future of nothing.
    pub type BoxFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
}

/// An HTTPS proxy in front of the API server that sees each request (it terminates TLS with the server's own
/// certificate and opens a fresh upstream connection per request, trusting the test CA) and runs `hook` before
/// forwarding it: what a test needs to act between two calls of a client.
struct Interceptor {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Interceptor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn intercept(server: &KubeApiServer, hook: Hook) -> anyhow::Result<Interceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_file_iter(server.path("serving.crt"))?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(server.path("serving.key"))?;
    let mut sc = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    sc.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(sc));
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(server.path("ca.crt"))? {
        roots.add(c?)?;
    }
    let mut cc = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cc.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cc));
    let upstream = SocketAddr::from(([127, 0, 0, 1], server.port()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let (acceptor, connector, hook) = (acceptor.clone(), connector.clone(), hook.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (connector, hook) = (connector.clone(), hook.clone());
                    async move {
                        hook(req.method(), req.uri().path()).await;
                        let tcp = tokio::net::TcpStream::connect(upstream).await?;
                        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
                        let tls = connector.connect(name, tcp).await?;
                        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
                        tokio::spawn(conn);
                        Ok::<_, anyhow::Error>(sender.send_request(req).await?)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await;
            });
        }
    });
    Ok(Interceptor { addr, task })
}

#[tokio::test]
async fn a_renewal_refused_as_stale_is_retried_and_the_holder_keeps_the_lease() -> anyhow::Result<()> {
    let Some(server) = KubeApiServer::start_or_skip("a_renewal_refused_as_stale_is_retried").await? else {
        return Ok(());
    };
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    for f in ["00-namespace.yaml", "10-rbac.yaml", "20-ingressclass.yaml"] {
        server.apply_yaml(&std::fs::read_to_string(deploy.join(f))?, None).await?;
    }
    let leases: Api<Lease> = Api::namespaced(server.client(), "mesh-system");

    // Armed, the proxy changes the Lease (as `kubectl annotate` would) just before forwarding the holder's next
    // renewal, so that renewal carries a stale resourceVersion and the server answers 409 Conflict.
    let armed = Arc::new(AtomicBool::new(false));
    let injected = Arc::new(AtomicU32::new(0));
    let hook: Hook = {
        let (armed, injected, leases) = (armed.clone(), injected.clone(), leases.clone());
        Arc::new(move |method: &http::Method, path: &str| {
            let hit = method == http::Method::PUT
                && path.ends_with("/namespaces/mesh-system/leases/mesh-control")
                && armed.swap(false, Ordering::SeqCst);
            let (injected, leases) = (injected.clone(), leases.clone());
            Box::pin(async move {
                if hit {
                    let poke = serde_json::json!({"metadata": {"annotations": {"mesh-tests/poked": "yes"}}});
                    if leases.patch("mesh-control", &PatchParams::default(), &Patch::Merge(&poke)).await.is_ok() {
                        injected.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
    };
    let proxy = intercept(&server, hook).await?;
    let token = server.service_account_token("mesh-system", "mesh-control").await?;
    let url = format!("https://{}", proxy.addr);
    let kubeconfig = server.write_file("mesh-control.kubeconfig", &server.token_kubeconfig(&token, Some(&url)))?;
    let control = MeshControl::start(
        "mesh-control",
        &kubeconfig,
        &["--publish-address=203.0.113.1", "--lease-namespace=mesh-system", "--identity=a", "--lease-duration-s=6"],
    )
    .await?;
    eventually(CONVERGE, "it holds the Lease", || async {
        let (h, _) = holder(&leases).await?;
        anyhow::ensure!(h.as_deref() == Some("a") && control.metric("mesh_leader").await? == Some(1.0), "holder {h:?}");
        Ok(())
    })
    .await?;

    armed.store(true, Ordering::SeqCst);
    eventually(CONVERGE, "a renewal refused as stale", || async {
        anyhow::ensure!(injected.load(Ordering::SeqCst) == 1, "not yet");
        Ok(())
    })
    .await?;
    let (_, poked) = holder(&leases).await?;
    // The next renewal (a fresh read, then a write) succeeds: the holder never changed, nor did it step down.
    eventually(CONVERGE, "a renewal after the conflict", || {
        let (leases, poked) = (leases.clone(), poked.clone());
        async move {
            let (h, r) = holder(&leases).await?;
            anyhow::ensure!(r != poked, "not renewed since");
            anyhow::ensure!(h.as_deref() == Some("a"), "holder {h:?}");
            Ok(())
        }
    })
    .await?;
    let conflicts = server
        .audit_events()?
        .into_iter()
        .filter(|e| e.pointer("/objectRef/resource").and_then(Value::as_str) == Some("leases"))
        .filter(|e| e.pointer("/verb").and_then(Value::as_str) == Some("update"))
        .filter(|e| e.pointer("/responseStatus/code").and_then(Value::as_u64) == Some(409))
        .count();
    anyhow::ensure!(conflicts == 1, "{conflicts} Lease updates refused with 409, one expected");
    let spec = leases.get("mesh-control").await?.spec.context("a spec")?;
    anyhow::ensure!(spec.lease_transitions == Some(0), "leaseTransitions {:?}", spec.lease_transitions);
    anyhow::ensure!(control.metric("mesh_leader").await? == Some(1.0), "not leader after the conflict");
    let stepped_down: Vec<String> = control
        .process
        .lines()
        .into_iter()
        .filter(|l| l.contains("lost leadership") || l.contains("stepping down"))
        .collect();
    anyhow::ensure!(stepped_down.is_empty(), "one stale renewal made the holder step down: {stepped_down:?}");
    Ok(())
}

//! xDS over TLS: a client that trusts the CA and shows a certificate gets the snapshot; one without a
//! certificate, or speaking plain HTTP, does not.

use std::sync::Arc;
use std::time::Duration;

use mesh_control::translate::Snapshot;
use mesh_control::xds::{ServerTls, XdsConfig, XdsMetrics, XdsServer};
use mesh_runtime::Shutdown;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use xds_proto::client::{self, ClientConfig, ClientTls};

struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "mesh test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names).unwrap().signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki { ca, server: leaf(vec!["localhost".into()]), client: leaf(vec!["node-a".into()]) }
}

#[tokio::test]
async fn tls_with_client_certificates() {
    let pki = pki();
    let (_tx, rx) = tokio::sync::watch::channel(Some(Arc::new(Snapshot::default())));
    let tls = ServerTls {
        cert_pem: pki.server.0.clone().into_bytes(),
        key_pem: pki.server.1.clone().into_bytes(),
        client_ca_pem: Some(pki.ca.clone().into_bytes()),
    };
    let server = XdsServer::new(rx, XdsConfig { tls: Some(tls), ..XdsConfig::default() }, XdsMetrics::default());
    let shutdown = Shutdown::new();
    let (addr, _) = server.serve("127.0.0.1:0".parse().unwrap(), shutdown.clone()).await.unwrap();

    let config = |scheme: &str, identity: bool| {
        let mut c = ClientConfig::new(format!("{scheme}://localhost:{}", addr.port()), "node-a", "proxy");
        c.tls = (scheme == "https").then(|| ClientTls {
            ca_pem: pki.ca.clone().into_bytes(),
            identity: identity.then(|| (pki.client.0.clone().into_bytes(), pki.client.1.clone().into_bytes())),
            domain: None,
        });
        c
    };
    let t = Duration::from_secs(5);
    client::fetch_once(config("https", true), t).await.expect("a trusted client with a certificate is served");
    assert!(client::fetch_once(config("https", false), t).await.is_err(), "no client certificate: refused");
    assert!(client::fetch_once(config("http", false), t).await.is_err(), "plain HTTP/2: refused");
    shutdown.trigger();
}

//! Certificates from SDS Secrets, chosen by SNI during the handshake through a rustls cert resolver that reads
//! the current table, so a rotated Secret serves new handshakes at once without a restart or a new listener.
//!
//! - Which certificate: the `ingress/https` Listener has a filter chain per Secret listing its hosts
//!   (`server_names`, exact or `*.foo.com`) and possibly a default chain (an Ingress `tls` entry without hosts).
//!   SNI picks the exact host, else the one-label wildcard, else the default certificate; without a match
//!   and without a default the handshake is refused (there is no certificate we could honestly present).
//! - **Routing is by Host, not SNI.** After the handshake the request is routed by its `Host` (`:authority`)
//!   like any other: a client may send SNI `a.foo.com` and `Host: b.foo.com` (connection reuse in HTTP/2 does
//!   this legitimately when one certificate covers both). We do not answer 421 for a mismatch: the routing
//!   rules, not the certificate, decide where a request goes, as with ingress-nginx.
//! - TLS 1.2 and 1.3 only; ALPN `h2` then `http/1.1`; rustls with the `ring` provider.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use prost::Message;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use xds_proto::core::data_source;
use xds_proto::listener::Listener;
use xds_proto::tls::{DownstreamTlsContext, Secret, secret};

/// Why a Secret or the TLS part of a Listener cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    /// The Secret does not hold a usable certificate and key.
    #[error("secret {name}: {reason}")]
    Secret {
        /// The Secret.
        name: String,
        /// Why.
        reason: String,
    },
    /// A filter chain's TLS settings cannot be served.
    #[error("listener {listener}: filter chain {chain:?}: {reason}")]
    Chain {
        /// The Listener.
        listener: String,
        /// The chain's name.
        chain: String,
        /// Why.
        reason: String,
    },
}

/// A certificate ready to present, with what an operator needs to know about it.
#[derive(Debug, Clone)]
pub struct Cert {
    /// The SDS Secret name (`{ns}/{name}`).
    pub name: String,
    /// The chain and signing key.
    pub key: Arc<CertifiedKey>,
}

impl Cert {
    /// Converts an SDS Secret (inline PEM chain and key), checking that the key signs for the certificate.
    pub fn from_secret(s: &Secret) -> Result<Cert, TlsError> {
        let bad = |reason: String| TlsError::Secret { name: s.name.clone(), reason };
        let Some(secret::Type::TlsCertificate(tc)) = &s.r#type else {
            return Err(bad("not a TLS certificate secret".into()));
        };
        let inline = |what: &str, ds: Option<&xds_proto::core::DataSource>| -> Result<Vec<u8>, TlsError> {
            match ds.and_then(|d| d.specifier.as_ref()) {
                Some(data_source::Specifier::InlineBytes(b)) => Ok(b.clone()),
                Some(data_source::Specifier::InlineString(s)) => Ok(s.clone().into_bytes()),
                Some(_) => Err(bad(format!("{what} must be inline (files and env are not read)"))),
                None => Err(bad(format!("no {what}"))),
            }
        };
        let chain = inline("certificate_chain", tc.certificate_chain.as_ref())?;
        let key = inline("private_key", tc.private_key.as_ref())?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&chain)
            .collect::<Result<_, _>>()
            .map_err(|e| bad(format!("certificate_chain is not PEM: {e}")))?;
        if certs.is_empty() {
            return Err(bad("certificate_chain holds no certificate".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| bad(format!("private_key is not a PEM key: {e}")))?;
        let provider = rustls::crypto::ring::default_provider();
        let ck = CertifiedKey::from_der(certs, key, &provider)
            .map_err(|e| bad(format!("certificate and key do not go together: {e}")))?;
        Ok(Cert { name: s.name.clone(), key: Arc::new(ck) })
    }
}

/// Which Secret each SNI name gets, from the `ingress/https` Listener.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SniPlan {
    /// Exact names and `*.parent` wildcards → Secret name.
    pub names: BTreeMap<String, String>,
    /// The default chain's Secret.
    pub default: Option<String>,
}

fn chain_secret(listener: &str, chain: &xds_proto::listener::FilterChain) -> Result<Option<String>, TlsError> {
    let bad = |reason: String| TlsError::Chain { listener: listener.to_owned(), chain: chain.name.clone(), reason };
    let Some(ts) = &chain.transport_socket else { return Ok(None) };
    let Some(xds_proto::core::transport_socket::ConfigType::TypedConfig(any)) = &ts.config_type else {
        return Err(bad("transport socket without typed config".into()));
    };
    if any.type_url != "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext" {
        return Err(bad(format!("transport socket {:?} is not TLS", any.type_url)));
    }
    let ctx =
        DownstreamTlsContext::decode(&any.value[..]).map_err(|e| bad(format!("bad DownstreamTlsContext: {e}")))?;
    if ctx.require_client_certificate.is_some_and(|b| b.value) {
        return Err(bad("client certificates are not supported".into()));
    }
    let common = ctx.common_tls_context.unwrap_or_default();
    if !common.tls_certificates.is_empty() {
        return Err(bad("inline certificates are not supported; use SDS secrets".into()));
    }
    match common.tls_certificate_sds_secret_configs.as_slice() {
        [one] => Ok(Some(one.name.clone())),
        [] => Err(bad("no SDS certificate".into())),
        _ => Err(bad("several certificates per chain are not supported".into())),
    }
}

impl SniPlan {
    /// Reads the SNI → Secret plan of a TLS Listener.
    pub fn from_listener(l: &Listener) -> Result<SniPlan, TlsError> {
        let mut plan = SniPlan::default();
        for chain in &l.filter_chains {
            let Some(secret) = chain_secret(&l.name, chain)? else { continue };
            for n in chain.filter_chain_match.iter().flat_map(|m| m.server_names.iter()) {
                plan.names.entry(n.to_ascii_lowercase()).or_insert_with(|| secret.clone());
            }
            if chain.filter_chain_match.as_ref().is_none_or(|m| m.server_names.is_empty()) && plan.default.is_none() {
                plan.default = Some(secret);
            }
        }
        if let Some(chain) = &l.default_filter_chain
            && let Some(secret) = chain_secret(&l.name, chain)?
        {
            plan.default = Some(secret);
        }
        Ok(plan)
    }
}

/// SNI → certificate, resolved: what the handshake reads.
#[derive(Debug, Default)]
pub struct CertTable {
    names: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl CertTable {
    /// Joins the plan with the Secrets on hand; names whose Secret is absent get no certificate (as Envoy keeps
    /// such a chain warming), so their handshakes fall to the default or fail.
    pub fn build(plan: &SniPlan, secret: impl Fn(&str) -> Option<Arc<Cert>>) -> CertTable {
        let names = plan.names.iter().filter_map(|(n, s)| secret(s).map(|c| (n.clone(), c.key.clone()))).collect();
        let default = plan.default.as_deref().and_then(&secret).map(|c| c.key.clone());
        CertTable { names, default }
    }

    /// The certificate for an SNI name (`None`: no SNI).
    pub fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = sni {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some(c) = self.names.get(&name) {
                return Some(c.clone());
            }
            if let Some((label, parent)) = name.split_once('.')
                && !label.is_empty()
                && let Some(c) = self.names.get(&format!("*.{parent}"))
            {
                return Some(c.clone());
            }
        }
        self.default.clone()
    }

    /// Whether any certificate is on hand.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && self.default.is_none()
    }
}

/// The rustls resolver: reads the current [`CertTable`] on every handshake.
#[derive(Debug, Default)]
pub struct SniResolver {
    /// Swapped by the configuration handler.
    pub table: ArcSwap<CertTable>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let found = self.table.load().lookup(hello.server_name());
        if found.is_none() {
            tracing::debug!(sni = ?hello.server_name(), "no certificate for this server name; refusing the handshake");
        }
        found
    }
}

/// The rustls server configuration of the TLS port: TLS 1.2 + 1.3, ring, ALPN h2 then http/1.1, certificates
/// from `resolver`. Sessions: a server-side cache of `session_cache` entries per process (stateful resumption,
/// as nginx's `ssl_session_cache`; TLS 1.3 tickets then only name a cache entry, so no ticket key has to be
/// shared or rotated); 0 turns resumption off (every handshake is a full one).
pub fn server_config(resolver: Arc<SniResolver>, session_cache: usize) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if session_cache == 0 {
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
    } else {
        cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(session_cache);
    }
    Ok(cfg)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use xds_proto::core::DataSource;
    use xds_proto::tls::TlsCertificate;

    /// A self-signed certificate for `names`, as (cert PEM, key PEM).
    pub(crate) fn self_signed(names: &[&str]) -> (String, String) {
        let ck = rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        (ck.cert.pem(), ck.signing_key.serialize_pem())
    }

    pub(crate) fn secret(name: &str, cert: &str, key: &str) -> Secret {
        let inline = |s: &str| {
            Some(DataSource {
                specifier: Some(data_source::Specifier::InlineBytes(s.as_bytes().to_vec())),
                ..Default::default()
            })
        };
        Secret {
            name: name.into(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: inline(cert),
                private_key: inline(key),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn secrets_are_checked() {
        let (c, k) = self_signed(&["a.com"]);
        assert!(Cert::from_secret(&secret("ns/a", &c, &k)).is_ok());
        let (_, other_key) = self_signed(&["b.com"]);
        let e = Cert::from_secret(&secret("ns/a", &c, &other_key)).unwrap_err().to_string();
        assert!(e.contains("ns/a") && e.contains("do not go together"), "{e}");
        let e = Cert::from_secret(&secret("ns/b", "garbage", &k)).unwrap_err().to_string();
        assert!(e.contains("ns/b") && e.contains("no certificate"), "{e}");
    }

    #[test]
    fn sni_exact_then_one_label_wildcard_then_default() {
        let mk = |n: &str| {
            let (c, k) = self_signed(&[n]);
            Arc::new(Cert::from_secret(&secret(n, &c, &k)).unwrap())
        };
        let secrets: BTreeMap<String, Arc<Cert>> =
            ["exact", "wild", "default"].into_iter().map(|n| (n.to_owned(), mk(n))).collect();
        let plan = SniPlan {
            names: [("a.foo.com", "exact"), ("*.foo.com", "wild")]
                .into_iter()
                .map(|(a, b)| (a.into(), b.into()))
                .collect(),
            default: Some("default".into()),
        };
        let t = CertTable::build(&plan, |n| secrets.get(n).cloned());
        let is = |sni: Option<&str>, want: &str| {
            assert!(Arc::ptr_eq(&t.lookup(sni).unwrap(), &secrets[want].key), "{sni:?} → {want}");
        };
        is(Some("a.foo.com"), "exact");
        is(Some("A.FOO.com"), "exact");
        is(Some("b.foo.com"), "wild");
        is(Some("x.b.foo.com"), "default");
        is(None, "default");
        let no_default = CertTable::build(&SniPlan { default: None, ..plan }, |n| secrets.get(n).cloned());
        assert!(no_default.lookup(Some("other.com")).is_none());
    }
}

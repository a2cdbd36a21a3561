//! Ingresses of our IngressClasses → the ingress proxy's Listeners, RouteConfigurations and SDS Secrets.
//!
//! Semantics (Kubernetes Ingress API, `networking.k8s.io/v1`):
//! - Class: `spec.ingressClassName`, else the legacy `kubernetes.io/ingress.class` annotation, else the one
//!   IngressClass annotated `ingressclass.kubernetes.io/is-default-class: "true"`. Ours are the IngressClasses
//!   whose `spec.controller` is [`xds_proto::INGRESS_CONTROLLER`]; each gets its own route table.
//! - Hosts: exact (`foo.com`) and wildcard (`*.foo.com`, exactly one extra label; Envoy's `*.` matches any
//!   number, so the virtual host carries `wildcardOneLabel` and our ingress enforces it). A rule without a host
//!   applies to every host that has no rule of its own. Hosts are matched without the port.
//! - Paths: `Exact` is a case-sensitive match of the whole path. `Prefix` is element-wise (`/foo` matches `/foo`
//!   and `/foo/bar`, not `/foobar`) with the trailing slash ignored, so it maps to Envoy's
//!   `path_separated_prefix` (`prefix: "/"` for the root). `ImplementationSpecific` is treated as `Prefix`: the
//!   predictable choice, and what a user moving from ingress-nginx without regex annotations gets.
//! - Precedence within a host: `Exact` before `Prefix`, then the longest path first, measured on the rule's path
//!   as written (so of `/foo/` and `/foo`, which match the same requests, `/foo/` wins, as the API says), then
//!   the oldest Ingress (`creationTimestamp`, then namespace/name), then the path. Then the `defaultBackend`
//!   (the oldest Ingress's), else a 404 with a small body. Nothing depends on the order of Ingresses or rules:
//!   a path given twice in one Ingress keeps the backend that sorts first (and is reported).
//! - Conflicts between Ingresses (the same host and path, the same TLS host with another Secret, a second
//!   default backend): the oldest Ingress (`creationTimestamp`, then namespace/name) wins; the other is reported.
//! - A backend that does not exist (Service or port missing, ExternalName, UDP port) keeps its route but answers
//!   503, as ingress-nginx does: dropping the route would let a shorter prefix take traffic meant for it.
//! - TLS: each `tls` entry's Secret becomes an SDS Secret and a filter chain matching its hosts by SNI; an entry
//!   without hosts gives the default certificate. A missing or malformed Secret is reported and its hosts are
//!   served over plain HTTP only. Plain-HTTP requests to a TLS host are served (the conformance suite expects
//!   the backend's answer over plain HTTP too), unless redirecting to HTTPS (308) is asked for: by the Ingress
//!   (`mesh.dev/ssl-redirect`, or ingress-nginx's `nginx.ingress.kubernetes.io/ssl-redirect` or
//!   `force-ssl-redirect`, `"true"` or `"false"`), else by its IngressClass (`mesh.dev/ssl-redirect` on it),
//!   else by mesh-control's `--ssl-redirect`. Only hosts the Ingress lists under `tls` (with a usable Secret)
//!   are redirected, `force-ssl-redirect` included.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::networking::v1::{Ingress, IngressBackend, IngressClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use xds_proto::core::{DataSource, TransportSocket, data_source, transport_socket};
use xds_proto::hcm::{HttpConnectionManager, HttpFilter, http_connection_manager as hcm, http_filter};
use xds_proto::listener::{FilterChain, FilterChainMatch, Listener};
use xds_proto::meta::{self, MetaValue};
use xds_proto::names::{self, PortKey};
use xds_proto::route::{
    DirectResponseAction, RedirectAction, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
    redirect_action, route, route_action, route_match,
};
use xds_proto::tls::{self as tlsv3, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, TlsCertificate};
use xds_proto::types::ResourceType;

use super::envoy::{self, Protocol};
use super::{Options, Problem, Resource};
use crate::model::{Kind, NsName, ObjectRef};
use crate::store::Store;

/// Legacy annotation naming an Ingress's class (before `spec.ingressClassName`).
pub const CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";
/// IngressClass annotation marking the cluster's default class.
pub const DEFAULT_CLASS_ANNOTATION: &str = "ingressclass.kubernetes.io/is-default-class";
/// Ingress (or IngressClass, for its Ingresses) annotation: `"true"` redirects plain HTTP to a TLS host to
/// HTTPS (308), `"false"` serves it. Unset: the IngressClass's, else `Options::ssl_redirect` (off).
pub const SSL_REDIRECT_ANNOTATION: &str = "mesh.dev/ssl-redirect";
/// ingress-nginx's spelling of the same, honoured on Ingresses for users moving over.
pub const NGINX_SSL_REDIRECT_ANNOTATION: &str = "nginx.ingress.kubernetes.io/ssl-redirect";
/// ingress-nginx's forced redirect, honoured on Ingresses with the same meaning (for the Ingress's TLS hosts).
pub const NGINX_FORCE_SSL_REDIRECT_ANNOTATION: &str = "nginx.ingress.kubernetes.io/force-ssl-redirect";
/// The body of the 404 an unmatched request gets.
pub use xds_proto::names::NOT_FOUND_BODY;

/// Everything the Ingresses produce.
#[derive(Debug, Default)]
pub struct IngressOut {
    /// Per IngressClass of ours.
    pub classes: BTreeMap<String, ClassOut>,
    /// The Ingresses of our classes (whose status we own), even those with nothing routable.
    pub served: BTreeSet<NsName>,
    /// What could not be translated.
    pub problems: Vec<Problem>,
}

/// What one IngressClass's proxies get, besides the Clusters.
#[derive(Debug, Default)]
pub struct ClassOut {
    /// Listeners, RouteConfigurations and Secrets.
    pub resources: Vec<(ResourceType, Arc<Resource>)>,
    /// The Clusters the routes lead to (copied from the Services' output).
    pub clusters: BTreeSet<String>,
}

/// Where a path leads.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Cluster(String),
    /// The backend cannot be reached; the route answers 503 with this reason.
    Unavailable(String),
}

/// A path of a host as written in the rule (one route per key; a second Ingress giving it is a conflict).
/// Orders Exact before Prefix, then the longest path as written first.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct PathKey {
    prefix: bool,
    len: Reverse<usize>,
    /// As written (a Prefix path's trailing slash is kept: it makes the path longer, not different in matching).
    path: String,
}

impl PathKey {
    /// What the route matches: for Prefix, the path without trailing slashes (`/` for the root), as Envoy's
    /// `path_separated_prefix` wants it.
    fn matched(&self) -> &str {
        if !self.prefix {
            return &self.path;
        }
        let trimmed = self.path.trim_end_matches('/');
        if trimmed.is_empty() { "/" } else { trimmed }
    }
}

#[derive(Debug, Clone)]
struct RouteEntry {
    ingress: ObjectRef,
    /// The Ingress's position among its class's, oldest first: breaks ties between paths of equal length.
    age: usize,
    path_type: String,
    target: Target,
}

#[derive(Debug, Default)]
struct Class {
    /// Host ("" for rules without host) → routes.
    vhosts: BTreeMap<String, BTreeMap<PathKey, RouteEntry>>,
    default_backend: Option<(ObjectRef, Target)>,
    /// Host → (SDS Secret name, redirect plain HTTP).
    tls_hosts: BTreeMap<String, (String, bool)>,
    default_cert: Option<String>,
    secrets: BTreeMap<String, Arc<Resource>>,
}

/// An Ingress of a class, with what orders it (oldest first).
type Member<'a> = (Option<&'a Time>, ObjectRef, &'a Ingress);

fn annotation<'a>(meta: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

fn ingress_ref(ing: &Ingress) -> ObjectRef {
    ObjectRef::new(
        Kind::Ingress,
        ing.metadata.namespace.as_deref().unwrap_or("default"),
        ing.metadata.name.as_deref().unwrap_or_default(),
    )
}

fn is_ours(class: &IngressClass) -> bool {
    class.spec.as_ref().and_then(|s| s.controller.as_deref()) == Some(xds_proto::INGRESS_CONTROLLER)
}

/// Translates every Ingress of every IngressClass of ours.
pub fn translate(store: &Store, opts: &Options) -> IngressOut {
    let mut out = IngressOut::default();
    let ours: BTreeSet<&str> = store.classes().filter(|(_, c)| is_ours(c)).map(|(n, _)| n.as_str()).collect();
    let defaults: Vec<&String> = store
        .classes()
        .filter(|(_, c)| annotation(&c.metadata, DEFAULT_CLASS_ANNOTATION) == Some("true"))
        .map(|(n, _)| n)
        .collect();
    let default_class = match defaults.as_slice() {
        [one] => Some(one.as_str()),
        [] => None,
        many => {
            if many.iter().any(|n| ours.contains(n.as_str())) {
                for n in many {
                    out.problems.push(Problem::new(
                        ObjectRef::new(Kind::IngressClass, "", n),
                        "several IngressClasses are marked default; Ingresses without a class are not served",
                    ));
                }
            }
            None
        }
    };

    // Each class's Ingresses, oldest first.
    let mut by_class: BTreeMap<&str, Vec<Member<'_>>> = ours.iter().map(|c| (*c, Vec::new())).collect();
    for (_, ing) in store.ingresses() {
        let named = ing.spec.as_ref().and_then(|s| s.ingress_class_name.as_deref());
        let class = named.or_else(|| annotation(&ing.metadata, CLASS_ANNOTATION)).or(default_class);
        let Some(class) = class else { continue };
        match by_class.get_mut(class) {
            Some(list) => {
                let me = ingress_ref(ing);
                out.served.insert(NsName::new(&me.namespace, &me.name));
                list.push((ing.metadata.creation_timestamp.as_ref(), me, ing));
            }
            None if class == xds_proto::DEFAULT_INGRESS_CLASS && store.class(class).is_none() => {
                out.problems.push(Problem::new(
                    ingress_ref(ing),
                    format!(
                        "IngressClass {class:?} does not exist; create it with spec.controller {:?} to serve this Ingress",
                        xds_proto::INGRESS_CONTROLLER
                    ),
                ));
            }
            None => {}
        }
    }

    for (class_name, mut list) in by_class {
        list.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let mut class = Class::default();
        let class_redirect = store
            .class(class_name)
            .and_then(|c| flag(&c.metadata, &[SSL_REDIRECT_ANNOTATION]))
            .unwrap_or(opts.ssl_redirect);
        for (i, (_, me, ing)) in list.iter().enumerate() {
            let redirect = flag(
                &ing.metadata,
                &[SSL_REDIRECT_ANNOTATION, NGINX_FORCE_SSL_REDIRECT_ANNOTATION, NGINX_SSL_REDIRECT_ANNOTATION],
            )
            .unwrap_or(class_redirect);
            add_ingress(store, &mut class, (i, me), ing, redirect, &mut out.problems);
        }
        out.classes.insert(class_name.to_owned(), build_class(class, opts));
    }
    out
}

/// The first of `keys` set to `"true"` or `"false"` (case-insensitive), as a bool.
fn flag(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, keys: &[&str]) -> Option<bool> {
    keys.iter().find_map(|k| match annotation(meta, k)?.trim() {
        v if v.eq_ignore_ascii_case("true") => Some(true),
        v if v.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    })
}

fn add_ingress(
    store: &Store,
    class: &mut Class,
    (age, me): (usize, &ObjectRef),
    ing: &Ingress,
    redirect: bool,
    problems: &mut Vec<Problem>,
) {
    let Some(spec) = &ing.spec else {
        problems.push(Problem::new(me.clone(), "no spec; nothing to route"));
        return;
    };

    for (i, tls) in spec.tls.iter().flatten().enumerate() {
        let Some(secret) = tls.secret_name.as_deref().filter(|s| !s.is_empty()) else {
            problems.push(Problem::new(me.clone(), format!("tls[{i}] has no secretName; its hosts get no TLS")));
            continue;
        };
        let sds = match secret_resource(store, &me.namespace, secret) {
            Ok(r) => {
                let name = r.name.clone();
                class.secrets.entry(name.clone()).or_insert(r);
                name
            }
            Err(reason) => {
                problems.push(Problem::new(
                    me.clone(),
                    format!("tls[{i}]: {reason}; its hosts are served over plain HTTP only"),
                ));
                continue;
            }
        };
        let hosts = tls.hosts.as_deref().unwrap_or_default();
        if hosts.is_empty() {
            match &class.default_cert {
                None => class.default_cert = Some(sds.clone()),
                Some(other) if *other != sds => problems.push(Problem::new(
                    me.clone(),
                    format!(
                        "tls[{i}] without hosts would set the default certificate, already {other} (older Ingress)"
                    ),
                )),
                Some(_) => {}
            }
        }
        for host in hosts {
            let host = match valid_host(host) {
                Ok(h) => h,
                Err(e) => {
                    problems.push(Problem::new(me.clone(), format!("tls[{i}]: {e}; skipped")));
                    continue;
                }
            };
            match class.tls_hosts.get(&host) {
                None => {
                    class.tls_hosts.insert(host, (sds.clone(), redirect));
                }
                Some((other, _)) if *other != sds => problems.push(Problem::new(
                    me.clone(),
                    format!(
                        "TLS host {host} already uses Secret {other} (older Ingress); Secret {secret} not used for it"
                    ),
                )),
                Some(_) => {}
            }
        }
    }

    if let Some(backend) = &spec.default_backend {
        let target = resolve(store, &me.namespace, backend, me, "defaultBackend", problems);
        match &class.default_backend {
            None => class.default_backend = Some((me.clone(), target)),
            Some((owner, _)) => problems.push(Problem::new(
                me.clone(),
                format!("defaultBackend ignored: {owner} (older) already sets the default backend"),
            )),
        }
    }

    for (ri, rule) in spec.rules.iter().flatten().enumerate() {
        let host = match rule.host.as_deref().filter(|h| !h.is_empty()) {
            None => String::new(),
            Some(h) => match valid_host(h) {
                Ok(h) => h,
                Err(e) => {
                    problems.push(Problem::new(me.clone(), format!("rules[{ri}]: {e}; rule skipped")));
                    continue;
                }
            },
        };
        let routes = class.vhosts.entry(host.clone()).or_default();
        for (pi, p) in rule.http.iter().flat_map(|h| &h.paths).enumerate() {
            let at = format!("rules[{ri}].paths[{pi}]");
            let key = match path_key(&p.path_type, p.path.as_deref()) {
                Ok(k) => k,
                Err(e) => {
                    problems.push(Problem::new(me.clone(), format!("{at}: {e}; path skipped")));
                    continue;
                }
            };
            let target = resolve(store, &me.namespace, &p.backend, me, &at, problems);
            let shown_host = if host.is_empty() { "*" } else { host.as_str() };
            let entry = RouteEntry { ingress: me.clone(), age, path_type: p.path_type.clone(), target };
            match routes.get_mut(&key) {
                Some(owner) if owner.ingress != *me => {
                    problems.push(Problem::new(
                        me.clone(),
                        format!(
                            "{at}: host {shown_host} path {} is already routed by {} (older); path skipped",
                            key.path, owner.ingress
                        ),
                    ));
                }
                Some(owner) => {
                    // Twice in one Ingress: the backend that sorts first, whatever the order of the rules.
                    if (&entry.target, &entry.path_type) < (&owner.target, &owner.path_type) {
                        *owner = entry;
                    }
                    problems.push(Problem::new(
                        me.clone(),
                        format!(
                            "{at}: host {shown_host} path {} is defined twice in this Ingress; the backend {} is used",
                            key.path,
                            shown_target(&owner.target)
                        ),
                    ));
                }
                None => {
                    routes.insert(key, entry);
                }
            }
        }
    }
}

/// Validates and lowercases a host: a DNS name, optionally `*.` + a DNS name; never an IP.
fn valid_host(host: &str) -> Result<String, String> {
    let h = host.to_ascii_lowercase();
    let bare = h.strip_prefix("*.").unwrap_or(&h);
    if bare.parse::<IpAddr>().is_ok() {
        return Err(format!("host {host:?} is an IP address; Ingress hosts must be DNS names"));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if bare.is_empty() || bare.len() > 253 || !bare.split('.').all(label_ok) {
        return Err(format!("host {host:?} is not a valid DNS name (or *. followed by one)"));
    }
    Ok(h)
}

fn path_key(path_type: &str, path: Option<&str>) -> Result<PathKey, String> {
    let path = path.filter(|p| !p.is_empty()).unwrap_or("/");
    if !path.starts_with('/') {
        return Err(format!("path {path:?} must start with '/'"));
    }
    if path.chars().any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#') {
        return Err(format!("path {path:?} holds a space, control character, '?' or '#'"));
    }
    let prefix = match path_type {
        "Exact" => false,
        "Prefix" | "ImplementationSpecific" => true,
        other => return Err(format!("pathType {other:?} is not Exact, Prefix or ImplementationSpecific")),
    };
    Ok(PathKey { prefix, len: Reverse(path.len()), path: path.to_owned() })
}

fn shown_target(t: &Target) -> String {
    match t {
        Target::Cluster(c) => c.clone(),
        Target::Unavailable(_) => "(unavailable, 503)".to_owned(),
    }
}

/// Resolves an Ingress backend to the Cluster of a Service port.
fn resolve(
    store: &Store,
    ns: &str,
    b: &IngressBackend,
    me: &ObjectRef,
    at: &str,
    problems: &mut Vec<Problem>,
) -> Target {
    let result = (|| {
        if b.resource.is_some() {
            return Err("resource backends are not supported, only Service backends".to_owned());
        }
        let svc_b = b.service.as_ref().ok_or("the backend names no Service")?;
        let key = NsName::new(ns, &svc_b.name);
        let svc = store.service(&key).ok_or_else(|| format!("backend Service {key} does not exist"))?;
        let spec = svc.spec.as_ref().ok_or_else(|| format!("backend Service {key} has no spec"))?;
        if spec.type_.as_deref() == Some("ExternalName") {
            return Err(format!("backend Service {key} is ExternalName, which mesh-ingress does not proxy"));
        }
        if !super::service::is_ours(svc) {
            return Err(format!("backend Service {key} is labelled for another proxy"));
        }
        let port = svc_b.port.as_ref().ok_or("the backend names no port")?;
        let ports = spec.ports.as_deref().unwrap_or_default();
        let sp = match (&port.name, port.number) {
            (Some(n), _) if !n.is_empty() => ports.iter().find(|p| p.name.as_deref() == Some(n.as_str())),
            (_, Some(num)) => ports.iter().find(|p| p.port == num),
            _ => return Err("the backend port has neither name nor number".to_owned()),
        };
        let shown = port.name.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| port.number.unwrap_or(0).to_string());
        let sp = sp.ok_or_else(|| format!("backend Service {key} has no port {shown}"))?;
        if sp.protocol.as_deref().unwrap_or("TCP") != "TCP" {
            return Err(format!("backend Service {key} port {shown} is not TCP"));
        }
        let pk = PortKey::new(sp.name.as_deref(), u16::try_from(sp.port).unwrap_or(0));
        Ok(names::cluster_name(ns, &svc_b.name, &pk))
    })();
    match result {
        Ok(c) => Target::Cluster(c),
        Err(reason) => {
            problems.push(Problem::new(me.clone(), format!("{at}: {reason}; requests there get 503")));
            Target::Unavailable(reason)
        }
    }
}

/// Reads and checks a `kubernetes.io/tls` Secret; the SDS resource on success.
fn secret_resource(store: &Store, ns: &str, name: &str) -> Result<Arc<Resource>, String> {
    let key = NsName::new(ns, name);
    let secret = store
        .secret(&key)
        .ok_or_else(|| format!("TLS Secret {key} does not exist (or is not of type kubernetes.io/tls)"))?;
    let data = secret.data.as_ref();
    let get = |k: &str| data.and_then(|d| d.get(k)).map(|b| b.0.clone()).filter(|b| !b.is_empty());
    let crt = get("tls.crt").ok_or_else(|| format!("TLS Secret {key} has no tls.crt"))?;
    let keyb = get("tls.key").ok_or_else(|| format!("TLS Secret {key} has no tls.key"))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&crt)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("TLS Secret {key}: tls.crt is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("TLS Secret {key}: tls.crt holds no PEM certificate"));
    }
    PrivateKeyDer::from_pem_slice(&keyb)
        .map_err(|e| format!("TLS Secret {key}: tls.key holds no PEM private key: {e}"))?;
    let sds_name = names::secret_name(ns, name);
    let inline =
        |b: Vec<u8>| Some(DataSource { specifier: Some(data_source::Specifier::InlineBytes(b)), ..Default::default() });
    let msg = tlsv3::Secret {
        name: sds_name.clone(),
        r#type: Some(tlsv3::secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(crt),
            private_key: inline(keyb),
            ..Default::default()
        })),
    };
    Ok(Resource::new(sds_name, &msg))
}

/// Whether a host is covered by a TLS host: itself, or a one-label wildcard over it.
fn tls_for<'a>(tls: &'a BTreeMap<String, (String, bool)>, host: &str) -> Option<&'a (String, bool)> {
    tls.get(host).or_else(|| {
        let (_, parent) = host.split_once('.')?;
        if host.starts_with("*.") {
            return None;
        }
        tls.get(&format!("*.{parent}"))
    })
}

fn build_class(class: Class, opts: &Options) -> ClassOut {
    let mut out = ClassOut::default();
    let mut vhosts = class.vhosts;
    vhosts.entry(String::new()).or_default();
    for routes in vhosts.values() {
        for e in routes.values() {
            if let Target::Cluster(c) = &e.target {
                out.clusters.insert(c.clone());
            }
        }
    }
    if let Some((_, Target::Cluster(c))) = &class.default_backend {
        out.clusters.insert(c.clone());
    }
    let https = !class.secrets.is_empty();
    let http_rc = route_config(names::INGRESS_HTTP, &vhosts, class.default_backend.as_ref(), Some(&class.tls_hosts));
    out.resources.push((ResourceType::RouteConfiguration, Resource::new(names::INGRESS_HTTP, &http_rc)));
    out.resources.push((
        ResourceType::Listener,
        Resource::new(names::INGRESS_HTTP, &http_listener(names::INGRESS_HTTP, opts.ingress_http_port)),
    ));
    if https {
        let https_rc = route_config(names::INGRESS_HTTPS, &vhosts, class.default_backend.as_ref(), None);
        out.resources.push((ResourceType::RouteConfiguration, Resource::new(names::INGRESS_HTTPS, &https_rc)));
        let l = https_listener(opts.ingress_https_port, &class.tls_hosts, class.default_cert.as_deref());
        out.resources.push((ResourceType::Listener, Resource::new(names::INGRESS_HTTPS, &l)));
        for r in class.secrets.into_values() {
            out.resources.push((ResourceType::Secret, r));
        }
    }
    out
}

fn action_for(target: &Target) -> route::Action {
    match target {
        Target::Cluster(c) => route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(c.clone())),
            // No overall timeout: streams (gRPC, WebSocket, downloads) may run long, as behind ingress-nginx.
            timeout: Some(envoy::millis(0)),
            ..Default::default()
        }),
        Target::Unavailable(reason) => direct(503, &format!("503 service unavailable: {reason}\n")),
    }
}

fn direct(status: u32, body: &str) -> route::Action {
    route::Action::DirectResponse(DirectResponseAction {
        status,
        body: Some(DataSource {
            specifier: Some(data_source::Specifier::InlineString(body.to_owned())),
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn route_config(
    name: &str,
    vhosts: &BTreeMap<String, BTreeMap<PathKey, RouteEntry>>,
    default_backend: Option<&(ObjectRef, Target)>,
    redirect_tls: Option<&BTreeMap<String, (String, bool)>>,
) -> RouteConfiguration {
    // Exact hosts, then wildcards, then the catch-all: the order Envoy matches in, and the order people read.
    let mut ordered: Vec<(&String, &BTreeMap<PathKey, RouteEntry>)> = vhosts.iter().collect();
    ordered.sort_by_key(|(h, _)| (h.is_empty(), h.starts_with("*."), h.as_str()));
    let virtual_hosts = ordered
        .into_iter()
        .map(|(host, routes)| {
            let redirect = redirect_tls.and_then(|t| tls_for(t, host)).is_some_and(|(_, r)| *r) && !host.is_empty();
            let mut rs: Vec<Route> = Vec::new();
            if redirect {
                rs.push(Route {
                    r#match: Some(RouteMatch {
                        path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                        ..Default::default()
                    }),
                    action: Some(route::Action::Redirect(RedirectAction {
                        scheme_rewrite_specifier: Some(redirect_action::SchemeRewriteSpecifier::HttpsRedirect(true)),
                        response_code: redirect_action::RedirectResponseCode::PermanentRedirect as i32,
                        ..Default::default()
                    })),
                    ..Default::default()
                });
            } else {
                // Exact first, then the longest path as written, then the oldest Ingress, then the path.
                let mut ordered: Vec<(&PathKey, &RouteEntry)> = routes.iter().collect();
                ordered.sort_by(|(ka, ea), (kb, eb)| {
                    (ka.prefix, ka.len, ea.age, &ka.path).cmp(&(kb.prefix, kb.len, eb.age, &kb.path))
                });
                for (k, e) in ordered {
                    let spec = match (k.prefix, k.matched()) {
                        (false, p) => route_match::PathSpecifier::Path(p.to_owned()),
                        (true, "/") => route_match::PathSpecifier::Prefix("/".into()),
                        (true, p) => route_match::PathSpecifier::PathSeparatedPrefix(p.to_owned()),
                    };
                    rs.push(Route {
                        name: format!("{}/{}", e.ingress.namespace, e.ingress.name),
                        r#match: Some(RouteMatch { path_specifier: Some(spec), ..Default::default() }),
                        action: Some(action_for(&e.target)),
                        metadata: meta::build([
                            (meta::INGRESS, MetaValue::from(format!("{}/{}", e.ingress.namespace, e.ingress.name))),
                            (meta::PATH_TYPE, e.path_type.as_str().into()),
                        ]),
                        ..Default::default()
                    });
                }
                let has_root = routes.keys().any(|k| k.prefix && k.matched() == "/");
                if !has_root {
                    let (action, md) = match default_backend {
                        Some((owner, t)) => (
                            action_for(t),
                            meta::build([(
                                meta::INGRESS,
                                MetaValue::from(format!("{}/{}", owner.namespace, owner.name)),
                            )]),
                        ),
                        None => (direct(404, NOT_FOUND_BODY), None),
                    };
                    rs.push(Route {
                        name: if default_backend.is_some() { "default-backend".into() } else { "not-found".into() },
                        r#match: Some(RouteMatch {
                            path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                            ..Default::default()
                        }),
                        action: Some(action),
                        metadata: md,
                        ..Default::default()
                    });
                }
            }
            let wildcard = host.starts_with("*.");
            VirtualHost {
                name: if host.is_empty() { "*".into() } else { host.clone() },
                domains: vec![if host.is_empty() { "*".into() } else { host.clone() }],
                routes: rs,
                metadata: if wildcard { meta::build([(meta::WILDCARD_ONE_LABEL, true.into())]) } else { None },
                ..Default::default()
            }
        })
        .collect();
    RouteConfiguration { name: name.to_owned(), virtual_hosts, ..Default::default() }
}

fn hcm_filter(route_name: &str) -> xds_proto::listener::Filter {
    let yes = |value| xds_proto::protobuf::BoolValue { value };
    let router = HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(xds_proto::codec::pack_any(
            &xds_proto::router::Router::default(),
        ))),
        ..Default::default()
    };
    let cfg = HttpConnectionManager {
        codec_type: hcm::CodecType::Auto as i32,
        stat_prefix: route_name.replace('/', "_"),
        route_specifier: Some(hcm::RouteSpecifier::Rds(xds_proto::hcm::Rds {
            config_source: Some(envoy::ads()),
            route_config_name: route_name.to_owned(),
        })),
        http_filters: vec![router],
        strip_port_mode: Some(hcm::StripPortMode::StripAnyHostPort(true)),
        normalize_path: Some(yes(true)),
        use_remote_address: Some(yes(true)),
        upgrade_configs: vec![hcm::UpgradeConfig { upgrade_type: "websocket".into(), ..Default::default() }],
        ..Default::default()
    };
    envoy::network_filter("envoy.filters.network.http_connection_manager", &cfg)
}

fn http_listener(name: &str, port: u16) -> Listener {
    Listener {
        name: name.to_owned(),
        address: Some(envoy::socket(IpAddr::from([0, 0, 0, 0]), port, Protocol::Tcp)),
        filter_chains: vec![envoy::chain(hcm_filter(name), None)],
        ..Default::default()
    }
}

fn tls_socket(sds: &str) -> TransportSocket {
    let ctx = DownstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_params: Some(tlsv3::TlsParameters {
                tls_minimum_protocol_version: tlsv3::tls_parameters::TlsProtocol::TlSv12 as i32,
                tls_maximum_protocol_version: tlsv3::tls_parameters::TlsProtocol::TlSv13 as i32,
                ..Default::default()
            }),
            tls_certificate_sds_secret_configs: vec![SdsSecretConfig {
                name: sds.to_owned(),
                sds_config: Some(envoy::ads()),
            }],
            alpn_protocols: vec!["h2".into(), "http/1.1".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(xds_proto::codec::pack_any(&ctx))),
    }
}

fn https_listener(port: u16, tls_hosts: &BTreeMap<String, (String, bool)>, default_cert: Option<&str>) -> Listener {
    let mut by_secret: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (host, (sds, _)) in tls_hosts {
        by_secret.entry(sds.as_str()).or_default().push(host.clone());
    }
    let chains: Vec<FilterChain> = by_secret
        .into_iter()
        .map(|(sds, server_names)| FilterChain {
            name: sds.to_owned(),
            filter_chain_match: Some(FilterChainMatch { server_names, ..Default::default() }),
            ..envoy::chain(hcm_filter(names::INGRESS_HTTPS), Some(tls_socket(sds)))
        })
        .collect();
    let default_filter_chain = default_cert.map(|sds| FilterChain {
        name: format!("default/{sds}"),
        ..envoy::chain(hcm_filter(names::INGRESS_HTTPS), Some(tls_socket(sds)))
    });
    Listener {
        name: names::INGRESS_HTTPS.to_owned(),
        address: Some(envoy::socket(IpAddr::from([0, 0, 0, 0]), port, Protocol::Tcp)),
        listener_filters: vec![envoy::listener_filter(
            "envoy.filters.listener.tls_inspector",
            &xds_proto::tls_inspector::TlsInspector::default(),
        )],
        filter_chains: chains,
        default_filter_chain,
        ..Default::default()
    }
}

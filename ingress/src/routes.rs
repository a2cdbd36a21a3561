//! The route table: host → virtual host → path router, built from RouteConfigurations off the request path and
//! read lock-free by every request.
//!
//! Semantics (Kubernetes Ingress API; the translation in `mesh-control` emits exactly these shapes):
//! - **Hosts** are matched case-insensitively, without the port (`Host: Foo.com:8080` is `foo.com`) and without
//!   a trailing dot. An exact host wins over a wildcard; `*.foo.com` matches exactly one extra label
//!   (`a.foo.com`, never `a.b.foo.com` nor `foo.com`) when the virtual host carries `wildcardOneLabel` (always,
//!   from `mesh-control`); without it, Envoy's any-number-of-labels meaning is kept, so another control plane's
//!   resources behave as in Envoy. `*` is the catch-all for hosts without rules of their own.
//! - **Paths**: an `Exact` route (`path`) matches the whole normalised path, case-sensitively. A `Prefix` route
//!   (`path_separated_prefix`, or `prefix: "/"`) matches element-wise: `/foo` matches `/foo`, `/foo/` and
//!   `/foo/bar`, never `/foobar`; a trailing slash on either side is ignored. `ImplementationSpecific` arrives as
//!   Prefix. Exact routes are tried first, then the longest matching prefix: two matchit routers per virtual host,
//!   whose static-over-catch-all priority is exactly "longest prefix first".
//! - Anything else Envoy can express (regex, plain string prefixes other than `/`, header matchers) is refused
//!   with a reason, so a NACK names the route instead of the proxy silently routing differently.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use xds_proto::meta;
use xds_proto::route::{self as xroute, RouteConfiguration, redirect_action, route, route_match};

/// Why a RouteConfiguration cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// A virtual host names a domain we cannot match.
    #[error("route configuration {config}: virtual host {vhost}: domain {domain:?}: {reason}")]
    Domain {
        /// The RouteConfiguration.
        config: String,
        /// The virtual host.
        vhost: String,
        /// The domain.
        domain: String,
        /// Why.
        reason: String,
    },
    /// Two virtual hosts claim the same domain (Envoy rejects this too).
    #[error("route configuration {config}: domain {domain:?} is in virtual hosts {first} and {second}")]
    DuplicateDomain {
        /// The RouteConfiguration.
        config: String,
        /// The domain.
        domain: String,
        /// The first virtual host.
        first: String,
        /// The second.
        second: String,
    },
    /// A route cannot be served.
    #[error("route configuration {config}: virtual host {vhost}: route {index} ({name:?}): {reason}")]
    Route {
        /// The RouteConfiguration.
        config: String,
        /// The virtual host.
        vhost: String,
        /// Position in the virtual host.
        index: usize,
        /// The route's name.
        name: String,
        /// Why.
        reason: String,
    },
}

/// What a matched route does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Proxy to the endpoints of this Cluster (`{ns}/{service}/{port}`).
    Cluster(Arc<str>),
    /// Answer directly (a backend that does not exist: 503 with the reason; no rule: 404).
    Direct {
        /// The status code.
        status: u16,
        /// The body.
        body: Bytes,
    },
    /// Redirect plain HTTP to HTTPS with this status (308 from `mesh-control`).
    RedirectHttps {
        /// The status code.
        status: u16,
    },
}

/// How a route matches the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    /// The whole path.
    Exact(String),
    /// Element-wise prefix; `/` matches everything.
    Prefix(String),
}

/// One matched route, with what metrics and logs name it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The Ingress that defined it (`{ns}/{name}`), `-` for the built-in 404.
    pub ingress: Arc<str>,
    /// The route as shown in metrics: `Exact /foo`, `Prefix /api`.
    pub label: Arc<str>,
    /// The match.
    pub path: PathMatch,
    /// The action.
    pub action: Action,
}

/// A virtual host: its routes behind two routers.
#[derive(Debug)]
pub struct VHost {
    /// Its name (the host it serves, `*` for the catch-all): the `host` label of metrics, bounded by config.
    pub name: Arc<str>,
    exact: matchit::Router<usize>,
    prefix: matchit::Router<usize>,
    routes: Vec<Arc<Route>>,
}

/// Escapes matchit's parameter syntax in a literal path.
fn literal(path: &str) -> String {
    path.replace('{', "{{").replace('}', "}}")
}

/// The path a Prefix route is matched on: trailing slashes dropped, `/` for the root.
fn prefix_key(path: &str) -> &str {
    let t = path.trim_end_matches('/');
    if t.is_empty() { "/" } else { t }
}

impl VHost {
    fn build(config: &str, vh: &xroute::VirtualHost) -> Result<VHost, RouteError> {
        let mut exact = matchit::Router::new();
        let mut prefix = matchit::Router::new();
        let mut routes = Vec::new();
        for (index, r) in vh.routes.iter().enumerate() {
            let err = |reason: String| RouteError::Route {
                config: config.to_owned(),
                vhost: vh.name.clone(),
                index,
                name: r.name.clone(),
                reason,
            };
            let route = convert_route(r).map_err(err)?;
            let id = routes.len();
            // The first route for a path wins, as in Envoy's first-match order; later duplicates never match.
            let inserted = match &route.path {
                PathMatch::Exact(p) => insert(&mut exact, &literal(p), id),
                PathMatch::Prefix(p) => {
                    let p = prefix_key(p);
                    let rest = if p == "/" { "/{*rest}".to_owned() } else { format!("{}/{{*rest}}", literal(p)) };
                    insert(&mut prefix, &literal(p), id).and_then(|a| insert(&mut prefix, &rest, id).map(|b| a || b))
                }
            }
            .map_err(err)?;
            if inserted {
                routes.push(Arc::new(route));
            }
        }
        Ok(VHost { name: vh.name.as_str().into(), exact, prefix, routes })
    }

    /// The route for a normalised path.
    pub fn find(&self, path: &str) -> Option<&Arc<Route>> {
        if let Ok(m) = self.exact.at(path) {
            return self.routes.get(*m.value);
        }
        self.prefix.at(prefix_key(path)).ok().and_then(|m| self.routes.get(*m.value))
    }

    /// Every route, in match order (for config dumps).
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }
}

/// Inserts; `Ok(false)` for a duplicate of an earlier route, an error for anything else matchit refuses.
fn insert(router: &mut matchit::Router<usize>, path: &str, id: usize) -> Result<bool, String> {
    match router.insert(path, id) {
        Ok(()) => Ok(true),
        Err(matchit::InsertError::Conflict { with }) if with == path => Ok(false),
        Err(e) => Err(format!("path {path:?} cannot be routed: {e}")),
    }
}

fn convert_route(r: &xroute::Route) -> Result<Route, String> {
    let m = r.r#match.as_ref().ok_or("no match")?;
    if !m.headers.is_empty() || !m.query_parameters.is_empty() || m.grpc.is_some() || m.runtime_fraction.is_some() {
        return Err("header, query, gRPC and runtime matchers are not supported".into());
    }
    if m.case_sensitive.is_some_and(|b| !b.value) {
        return Err("case-insensitive path matching is not supported (Ingress paths are case-sensitive)".into());
    }
    let path = match m.path_specifier.as_ref().ok_or("no path specifier")? {
        route_match::PathSpecifier::Path(p) => PathMatch::Exact(p.clone()),
        route_match::PathSpecifier::Prefix(p) if p == "/" || p.is_empty() => PathMatch::Prefix("/".into()),
        route_match::PathSpecifier::PathSeparatedPrefix(p) => PathMatch::Prefix(p.clone()),
        route_match::PathSpecifier::Prefix(p) => {
            return Err(format!("plain string prefix {p:?} is not supported (use path_separated_prefix)"));
        }
        other => return Err(format!("path specifier {other:?} is not supported")),
    };
    match &path {
        PathMatch::Exact(p) | PathMatch::Prefix(p) if !p.starts_with('/') => {
            return Err(format!("path {p:?} does not start with '/'"));
        }
        _ => {}
    }
    let action = match r.action.as_ref().ok_or("no action")? {
        route::Action::Route(ra) => match &ra.cluster_specifier {
            Some(xroute::route_action::ClusterSpecifier::Cluster(c)) if !c.is_empty() => {
                Action::Cluster(c.as_str().into())
            }
            _ => return Err("only a single named cluster is supported as a route target".into()),
        },
        route::Action::DirectResponse(d) => {
            let status = u16::try_from(d.status)
                .ok()
                .filter(|s| (200..=599).contains(s))
                .ok_or_else(|| format!("direct response status {} is not an HTTP status", d.status))?;
            let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                None => Bytes::new(),
                Some(xds_proto::core::data_source::Specifier::InlineString(s)) => Bytes::from(s.clone()),
                Some(xds_proto::core::data_source::Specifier::InlineBytes(b)) => Bytes::from(b.clone()),
                Some(_) => return Err("direct response body must be inline".into()),
            };
            Action::Direct { status, body }
        }
        route::Action::Redirect(rd) => {
            let https = matches!(
                rd.scheme_rewrite_specifier,
                Some(redirect_action::SchemeRewriteSpecifier::HttpsRedirect(true))
            ) || matches!(&rd.scheme_rewrite_specifier, Some(redirect_action::SchemeRewriteSpecifier::SchemeRedirect(s)) if s == "https");
            if !https || rd.host_redirect.len() + rd.port_redirect as usize > 0 || rd.path_rewrite_specifier.is_some() {
                return Err("only a scheme redirect to https is supported".into());
            }
            let status = match redirect_action::RedirectResponseCode::try_from(rd.response_code) {
                Ok(redirect_action::RedirectResponseCode::MovedPermanently) => 301,
                Ok(redirect_action::RedirectResponseCode::Found) => 302,
                Ok(redirect_action::RedirectResponseCode::SeeOther) => 303,
                Ok(redirect_action::RedirectResponseCode::TemporaryRedirect) => 307,
                Ok(redirect_action::RedirectResponseCode::PermanentRedirect) => 308,
                Err(_) => return Err(format!("redirect response code {} unknown", rd.response_code)),
            };
            Action::RedirectHttps { status }
        }
        other => return Err(format!("action {other:?} is not supported")),
    };
    let ingress = meta::get_str(r.metadata.as_ref(), meta::INGRESS).unwrap_or("-");
    let label = match &path {
        PathMatch::Exact(p) => format!("Exact {p}"),
        PathMatch::Prefix(p) => format!("Prefix {p}"),
    };
    Ok(Route { ingress: ingress.into(), label: label.into(), path, action })
}

/// One listener's routes: hosts → virtual hosts.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// The RouteConfiguration it was built from.
    pub name: String,
    exact: HashMap<Box<str>, Arc<VHost>>,
    /// `*.foo.com` stored under `foo.com`, with whether it matches one label only.
    wildcard: HashMap<Box<str>, (Arc<VHost>, bool)>,
    any: Option<Arc<VHost>>,
    vhosts: Vec<Arc<VHost>>,
}

/// The host part of a `Host` header or `:authority`, lower-cased only when it has to be, without port or
/// trailing dot.
pub fn host_key(authority: &str) -> std::borrow::Cow<'_, str> {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        // IPv6 literal: keep the brackets' content.
        rest.split_once(']').map_or(rest, |(h, _)| h)
    } else {
        authority.rsplit_once(':').filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit())).map_or(authority, |(h, _)| h)
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

impl RouteTable {
    /// Builds the table of one RouteConfiguration, or says which domain or route is unusable.
    pub fn build(rc: &RouteConfiguration) -> Result<RouteTable, RouteError> {
        let mut t = RouteTable { name: rc.name.clone(), ..Default::default() };
        let mut owners: HashMap<String, String> = HashMap::new();
        for vh in &rc.virtual_hosts {
            let built = Arc::new(VHost::build(&rc.name, vh)?);
            let one_label = meta::get_bool(vh.metadata.as_ref(), meta::WILDCARD_ONE_LABEL).unwrap_or(false);
            for d in &vh.domains {
                let domain = d.to_ascii_lowercase();
                let bad = |reason: &str| RouteError::Domain {
                    config: rc.name.clone(),
                    vhost: vh.name.clone(),
                    domain: d.clone(),
                    reason: reason.to_owned(),
                };
                if let Some(first) = owners.insert(domain.clone(), vh.name.clone()) {
                    return Err(RouteError::DuplicateDomain {
                        config: rc.name.clone(),
                        domain: d.clone(),
                        first,
                        second: vh.name.clone(),
                    });
                }
                if domain == "*" {
                    t.any = Some(built.clone());
                } else if let Some(parent) = domain.strip_prefix("*.") {
                    if parent.is_empty() || parent.contains('*') {
                        return Err(bad("only *.domain wildcards are supported"));
                    }
                    t.wildcard.insert(parent.into(), (built.clone(), one_label));
                } else if domain.contains('*') {
                    return Err(bad("only *.domain wildcards are supported"));
                } else if domain.contains(':') && !domain.starts_with('[') {
                    return Err(bad("domains with a port are not supported (hosts are matched without the port)"));
                } else {
                    t.exact.insert(domain.into(), built.clone());
                }
            }
            t.vhosts.push(built);
        }
        Ok(t)
    }

    /// The virtual host for a request's authority (`Host` header or `:authority`).
    pub fn vhost(&self, authority: &str) -> Option<&Arc<VHost>> {
        let host = host_key(authority);
        let host: &str = &host;
        if let Some(v) = self.exact.get(host) {
            return Some(v);
        }
        if !self.wildcard.is_empty() {
            // One label off: `a.foo.com` → `foo.com`; further up only for Envoy-style (any-label) wildcards.
            let mut rest = host;
            let mut first = true;
            while let Some((label, parent)) = rest.split_once('.') {
                if label.is_empty() {
                    break;
                }
                if let Some((v, one_label)) = self.wildcard.get(parent)
                    && (first || !*one_label)
                {
                    return Some(v);
                }
                first = false;
                rest = parent;
            }
        }
        self.any.as_ref()
    }

    /// The route for an authority and a normalised path, with its virtual host.
    pub fn find(&self, authority: &str, path: &str) -> Option<(&Arc<VHost>, &Arc<Route>)> {
        let v = self.vhost(authority)?;
        v.find(path).map(|r| (v, r))
    }

    /// Every virtual host, in configuration order.
    pub fn vhosts(&self) -> &[Arc<VHost>] {
        &self.vhosts
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use xds_proto::core::{DataSource, data_source};
    use xds_proto::route::{DirectResponseAction, RouteAction, RouteMatch, route_action};

    pub(crate) fn route(spec: route_match::PathSpecifier, cluster: &str) -> xroute::Route {
        xroute::Route {
            name: "ns/ing".into(),
            r#match: Some(RouteMatch { path_specifier: Some(spec), ..Default::default() }),
            action: Some(route::Action::Route(RouteAction {
                cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.into())),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    pub(crate) fn exact(p: &str, c: &str) -> xroute::Route {
        route(route_match::PathSpecifier::Path(p.into()), c)
    }

    pub(crate) fn prefix(p: &str, c: &str) -> xroute::Route {
        if p == "/" {
            route(route_match::PathSpecifier::Prefix("/".into()), c)
        } else {
            route(route_match::PathSpecifier::PathSeparatedPrefix(p.into()), c)
        }
    }

    pub(crate) fn not_found() -> xroute::Route {
        xroute::Route {
            r#match: Some(RouteMatch {
                path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            action: Some(route::Action::DirectResponse(DirectResponseAction {
                status: 404,
                body: Some(DataSource {
                    specifier: Some(data_source::Specifier::InlineString("nope\n".into())),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    pub(crate) fn vhost(domain: &str, routes: Vec<xroute::Route>) -> xroute::VirtualHost {
        xroute::VirtualHost {
            name: domain.into(),
            domains: vec![domain.into()],
            routes,
            metadata: if domain.starts_with("*.") {
                meta::build([(meta::WILDCARD_ONE_LABEL, true.into())])
            } else {
                None
            },
            ..Default::default()
        }
    }

    fn target(t: &RouteTable, host: &str, path: &str) -> Option<String> {
        t.find(host, path).map(|(_, r)| match &r.action {
            Action::Cluster(c) => c.to_string(),
            Action::Direct { status, .. } => status.to_string(),
            Action::RedirectHttps { status } => format!("redirect {status}"),
        })
    }

    fn table() -> RouteTable {
        RouteTable::build(&RouteConfiguration {
            name: "ingress/http".into(),
            virtual_hosts: vec![
                vhost(
                    "foo.com",
                    vec![
                        exact("/exact", "exact"),
                        exact("/api", "api-exact"),
                        prefix("/api/v1", "v1"),
                        prefix("/api", "api"),
                        prefix("/", "root"),
                    ],
                ),
                vhost("*.foo.com", vec![prefix("/", "wild")]),
                vhost("*", vec![prefix("/static", "static"), not_found()]),
            ],
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn hosts_exact_wildcard_port_case() {
        let t = table();
        assert_eq!(target(&t, "foo.com", "/x").as_deref(), Some("root"));
        assert_eq!(target(&t, "FOO.com:8080", "/x").as_deref(), Some("root"), "port and case ignored");
        assert_eq!(target(&t, "foo.com.", "/x").as_deref(), Some("root"), "trailing dot ignored");
        assert_eq!(target(&t, "a.foo.com", "/x").as_deref(), Some("wild"));
        assert_eq!(target(&t, "A.Foo.Com:443", "/x").as_deref(), Some("wild"));
        assert_eq!(target(&t, "a.b.foo.com", "/x").as_deref(), Some("404"), "one label only");
        assert_eq!(target(&t, ".foo.com", "/x").as_deref(), Some("404"), "empty label is not a label");
        assert_eq!(target(&t, "bar.com", "/static/x").as_deref(), Some("static"));
        assert_eq!(target(&t, "bar.com", "/staticx").as_deref(), Some("404"));
        assert_eq!(target(&t, "[::1]:80", "/static").as_deref(), Some("static"));
    }

    #[test]
    fn exact_host_wins_over_wildcard() {
        let t = RouteTable::build(&RouteConfiguration {
            name: "x".into(),
            virtual_hosts: vec![
                vhost("*.foo.com", vec![prefix("/", "wild")]),
                vhost("a.foo.com", vec![prefix("/", "a")]),
            ],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(target(&t, "a.foo.com", "/").as_deref(), Some("a"));
        assert_eq!(target(&t, "b.foo.com", "/").as_deref(), Some("wild"));
        assert_eq!(target(&t, "other", "/"), None, "no catch-all: nothing");
    }

    #[test]
    fn envoy_wildcards_without_the_flag_match_any_depth() {
        let mut vh = vhost("*.foo.com", vec![prefix("/", "wild")]);
        vh.metadata = None;
        let t =
            RouteTable::build(&RouteConfiguration { name: "x".into(), virtual_hosts: vec![vh], ..Default::default() })
                .unwrap();
        assert_eq!(target(&t, "a.b.foo.com", "/").as_deref(), Some("wild"));
    }

    #[test]
    fn paths_exact_prefix_precedence() {
        let t = table();
        assert_eq!(target(&t, "foo.com", "/exact").as_deref(), Some("exact"));
        assert_eq!(target(&t, "foo.com", "/exact/").as_deref(), Some("root"), "Exact does not ignore a trailing slash");
        assert_eq!(target(&t, "foo.com", "/api").as_deref(), Some("api-exact"), "Exact before Prefix");
        assert_eq!(target(&t, "foo.com", "/api/").as_deref(), Some("api"), "trailing slash ignored by Prefix");
        assert_eq!(target(&t, "foo.com", "/api/x").as_deref(), Some("api"));
        assert_eq!(target(&t, "foo.com", "/api/v1").as_deref(), Some("v1"), "longest prefix first");
        assert_eq!(target(&t, "foo.com", "/api/v1/").as_deref(), Some("v1"));
        assert_eq!(target(&t, "foo.com", "/api/v1/users").as_deref(), Some("v1"));
        assert_eq!(target(&t, "foo.com", "/api/v12").as_deref(), Some("api"), "element-wise, not string prefix");
        assert_eq!(target(&t, "foo.com", "/apix").as_deref(), Some("root"));
        assert_eq!(target(&t, "foo.com", "/").as_deref(), Some("root"));
    }

    #[test]
    fn prefix_with_trailing_slash_in_rule_and_braces() {
        let t = RouteTable::build(&RouteConfiguration {
            name: "x".into(),
            virtual_hosts: vec![vhost("h", vec![prefix("/foo/", "foo"), exact("/{x}", "braces")])],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(target(&t, "h", "/foo").as_deref(), Some("foo"));
        assert_eq!(target(&t, "h", "/foo/bar").as_deref(), Some("foo"));
        assert_eq!(target(&t, "h", "/{x}").as_deref(), Some("braces"), "matchit syntax is escaped");
        assert_eq!(target(&t, "h", "/y"), None);
    }

    #[test]
    fn duplicates_keep_the_first_route() {
        let t = RouteTable::build(&RouteConfiguration {
            name: "x".into(),
            virtual_hosts: vec![vhost("h", vec![prefix("/a", "first"), prefix("/a", "second")])],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(target(&t, "h", "/a/b").as_deref(), Some("first"));
    }

    #[test]
    fn unsupported_shapes_are_refused_with_the_route_named() {
        let bad = RouteConfiguration {
            name: "ingress/http".into(),
            virtual_hosts: vec![vhost("h", vec![route(route_match::PathSpecifier::Prefix("/abc".into()), "c")])],
            ..Default::default()
        };
        let e = RouteTable::build(&bad).unwrap_err().to_string();
        assert!(e.contains("ingress/http") && e.contains("route 0") && e.contains("plain string prefix"), "{e}");
        let dup = RouteConfiguration {
            name: "x".into(),
            virtual_hosts: vec![vhost("h", vec![]), vhost("h", vec![])],
            ..Default::default()
        };
        assert!(matches!(RouteTable::build(&dup), Err(RouteError::DuplicateDomain { .. })));
        let port =
            RouteConfiguration { name: "x".into(), virtual_hosts: vec![vhost("h:80", vec![])], ..Default::default() };
        assert!(matches!(RouteTable::build(&port), Err(RouteError::Domain { .. })));
    }
}

//! An in-memory Kubernetes API server for tests, speaking the real wire protocol: JSON lists with
//! `metadata.resourceVersion` (and `limit`/`continue` pages), `?watch=true` streams of
//! `{"type":"ADDED"|"MODIFIED"|"DELETED"|"ERROR","object":...}` lines resumable from a `resourceVersion`,
//! `410 Gone` as an `ERROR` event carrying a `Status` (as a real API server answers a watch from a compacted
//! version), `409` on a stale `resourceVersion` or an existing name, JSON merge patches of objects and their
//! `status` subresource, field selectors on `type` and `metadata.name`/`metadata.namespace`, and metadata-only
//! (`PartialObjectMetadata`) lists and watches. Simplification: list pages are cut from the current state, not
//! from a snapshot at the first page's resourceVersion.
//!
//! It lives in the library (behind `cfg(test)` or the `fake-api` feature) so that control's own tests and the
//! end-to-end tests in `tests/` share one fake. It plugs in two ways: as the `tower` service of a
//! [`kube::Client`] ([`FakeApi::client`], no sockets), or over HTTP on loopback ([`FakeApi::serve`]), so a real
//! `mesh-control` binary can be pointed at it with a kubeconfig ([`FakeApi::kubeconfig`]).
//!
//! Faults a test can inject: [`FakeApi::close_watches`] (the server ends every watch, as on its timeout or a
//! restart), [`FakeApi::compact`] (history before now is gone: resuming watches get `410`), [`FakeApi::set_down`]
//! (every request fails as a refused connection), [`FakeApi::fail`] (one resource answers `500`), and
//! [`Partition`] (one client cut off, as a network partition). Every request is recorded as an [`ApiCall`], so a
//! test can check the RBAC rules in `deploy/` against what the code really calls.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// How many events the fake keeps for resuming watches; older ones are compacted away (`410 Gone`).
const HISTORY: usize = 10_000;

/// Response body of the fake: a whole JSON document, or a watch stream.
pub type FakeBody = BoxBody<Bytes, Infallible>;

/// One resource the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Res {
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    /// Whether `status` is a subresource (writes to the object then leave it alone).
    status: bool,
}

const RESOURCES: &[Res] = &[
    Res { group: "", version: "v1", plural: "services", kind: "Service", namespaced: true, status: true },
    Res { group: "", version: "v1", plural: "secrets", kind: "Secret", namespaced: true, status: false },
    Res { group: "", version: "v1", plural: "nodes", kind: "Node", namespaced: false, status: true },
    Res {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        kind: "EndpointSlice",
        namespaced: true,
        status: false,
    },
    Res {
        group: "networking.k8s.io",
        version: "v1",
        plural: "ingresses",
        kind: "Ingress",
        namespaced: true,
        status: true,
    },
    Res {
        group: "networking.k8s.io",
        version: "v1",
        plural: "ingressclasses",
        kind: "IngressClass",
        namespaced: false,
        status: false,
    },
    Res {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        kind: "Lease",
        namespaced: true,
        status: false,
    },
];

impl Res {
    fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.to_owned() } else { format!("{}/{}", self.group, self.version) }
    }

    fn by_kind(api_version: &str, kind: &str) -> Option<&'static Res> {
        RESOURCES.iter().find(|r| r.kind == kind && r.api_version() == api_version)
    }
}

/// One request the fake answered, in RBAC terms.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ApiCall {
    /// `get`, `list`, `watch`, `create`, `update`, `patch` or `delete`.
    pub verb: String,
    /// The API group (`""` for the core group).
    pub group: String,
    /// The resource, with its subresource (`ingresses/status`).
    pub resource: String,
    /// The namespace of the request; `None` for cluster-wide requests.
    pub namespace: Option<String>,
    /// Which client made it (see [`FakeApi::partitioned_client`]; `default` otherwise).
    pub client: String,
}

#[derive(Debug)]
struct Event {
    rv: u64,
    typ: &'static str,
    res: &'static Res,
    namespace: String,
    line: Bytes,
    object: Value,
}

#[derive(Debug)]
struct Watcher {
    res: &'static Res,
    namespace: Option<String>,
    selector: Selector,
    tx: mpsc::UnboundedSender<Bytes>,
    client: String,
    /// Asked for `PartialObjectMetadata` (metadata-only watch).
    meta_only: bool,
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    /// (resource, namespace, name) → object.
    objects: BTreeMap<(&'static str, String, String), Value>,
    history: VecDeque<Event>,
    /// Watches from a resourceVersion older than this get `410 Gone`.
    compacted: u64,
    watchers: Vec<Watcher>,
    calls: Vec<ApiCall>,
    down: bool,
    failing: BTreeSet<&'static str>,
    /// Answer a watch from a compacted version with HTTP 410 instead of an ERROR event.
    gone_as_http: bool,
    lists: BTreeMap<&'static str, usize>,
    /// resource → the `resourceVersion` of each watch request, in order.
    watch_from: BTreeMap<&'static str, Vec<String>>,
    refused: usize,
    /// (resource, metadata-only) of every list and watch.
    reads: BTreeSet<(&'static str, bool)>,
    uid: u64,
}

/// The fake API server. Clones share the server; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    /// This handle's name and partition switch (see [`FakeApi::partitioned_client`]).
    link: Arc<Link>,
}

#[derive(Debug)]
struct Link {
    name: String,
    cut: Arc<AtomicBool>,
}

impl Default for Link {
    fn default() -> Self {
        Link { name: "default".into(), cut: Arc::default() }
    }
}

/// Cuts one client off the fake (requests fail as refused connections, open watches end), as a network partition
/// between one replica and the API server.
#[derive(Debug, Clone)]
pub struct Partition {
    state: Arc<Mutex<State>>,
    link: Arc<Link>,
}

impl Partition {
    /// Cuts (`true`: requests are refused and the client's open watches end) or heals (`false`) the link.
    pub fn set(&self, cut: bool) {
        self.link.cut.store(cut, Ordering::SeqCst);
        if cut {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.watchers.retain(|w| w.client != self.link.name);
        }
    }
}

/// A field selector: conjunction of `field=value` / `field!=value`.
#[derive(Debug, Clone, Default)]
struct Selector(Vec<(String, bool, String)>);

impl Selector {
    fn parse(s: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for term in s.split(',').filter(|t| !t.is_empty()) {
            let (field, eq, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!("invalid selector term {term:?}"));
            };
            if !["type", "metadata.name", "metadata.namespace"].contains(&field) {
                return Err(format!("field label not supported: {field}"));
            }
            out.push((field.to_owned(), eq, value.to_owned()));
        }
        Ok(Selector(out))
    }

    fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(field, eq, value)| {
            let pointer = format!("/{}", field.replace('.', "/"));
            let got = obj.pointer(&pointer).and_then(Value::as_str).unwrap_or_default();
            (got == value) == *eq
        })
    }
}

fn status(code: u16, reason: &str, message: impl Into<String>) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message.into(), "reason": reason, "code": code})
}

fn respond(code: u16, body: &Value) -> Response<FakeBody> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

fn error(code: u16, reason: &str, message: impl Into<String>) -> Response<FakeBody> {
    respond(code, &status(code, reason, message))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(uri: &http::Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().expect("made an object above");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// An object as a metadata-only request sees it.
fn meta_of(obj: &Value) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": obj["metadata"]})
}

/// One watch event line.
fn line(typ: &str, obj: &Value, meta_only: bool) -> Bytes {
    let object = if meta_only { meta_of(obj) } else { obj.clone() };
    Bytes::from(format!("{}\n", json!({"type": typ, "object": object})))
}

fn rv_of(obj: &Value) -> Option<&str> {
    obj.pointer("/metadata/resourceVersion").and_then(Value::as_str).filter(|s| !s.is_empty())
}

impl State {
    fn event(&mut self, res: &'static Res, namespace: &str, typ: &'static str, object: Value) {
        let full = line(typ, &object, false);
        self.watchers.retain(|w| {
            if w.res != res || w.namespace.as_deref().is_some_and(|ns| ns != namespace) || !w.selector.matches(&object)
            {
                return !w.tx.is_closed();
            }
            w.tx.send(if w.meta_only { line(typ, &object, true) } else { full.clone() }).is_ok()
        });
        self.history.push_back(Event { rv: self.rv, typ, res, namespace: namespace.to_owned(), line: full, object });
        while self.history.len() > HISTORY {
            if let Some(e) = self.history.pop_front() {
                self.compacted = e.rv;
            }
        }
    }

    /// Stores an object (create or replace), stamping resourceVersion, uid and creationTimestamp.
    fn put(&mut self, res: &'static Res, namespace: &str, name: &str, mut obj: Value) -> Value {
        self.rv += 1;
        let key = (res.plural, namespace.to_owned(), name.to_owned());
        let old = self.objects.get(&key);
        let (uid, created) = match old {
            Some(o) => (o.pointer("/metadata/uid").cloned(), o.pointer("/metadata/creationTimestamp").cloned()),
            None => {
                self.uid += 1;
                let created =
                    obj.pointer("/metadata/creationTimestamp").cloned().filter(|v| !v.is_null()).unwrap_or_else(|| {
                        json!(k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
                    });
                (Some(json!(format!("fake-uid-{}", self.uid))), Some(created))
            }
        };
        let typ = if old.is_some() { "MODIFIED" } else { "ADDED" };
        obj["apiVersion"] = json!(res.api_version());
        obj["kind"] = json!(res.kind);
        let meta = &mut obj["metadata"];
        meta["name"] = json!(name);
        if res.namespaced {
            meta["namespace"] = json!(namespace);
        }
        meta["resourceVersion"] = json!(self.rv.to_string());
        meta["uid"] = uid.unwrap_or(Value::Null);
        meta["creationTimestamp"] = created.unwrap_or(Value::Null);
        self.objects.insert(key, obj.clone());
        self.event(res, namespace, typ, obj.clone());
        obj
    }

    fn remove(&mut self, res: &'static Res, namespace: &str, name: &str) -> Option<Value> {
        let mut obj = self.objects.remove(&(res.plural, namespace.to_owned(), name.to_owned()))?;
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.event(res, namespace, "DELETED", obj.clone());
        Some(obj)
    }

    fn close_watches(&mut self) {
        self.watchers.clear();
    }
}

/// The parsed path of a request.
struct Target {
    res: &'static Res,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        rest => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some((*n).to_owned()), None),
        [p, n, s] => (*p, Some((*n).to_owned()), Some((*s).to_owned())),
        _ => return None,
    };
    let res = RESOURCES.iter().find(|r| r.group == group && r.version == version && r.plural == plural)?;
    if namespace.is_some() && !res.namespaced {
        return None;
    }
    Some(Target { res, namespace, name, sub })
}

impl FakeApi {
    /// An empty API server.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already; keep serving the others.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A client of this server, as its `tower` service (no sockets).
    pub fn client(&self) -> kube::Client {
        kube::Client::new(self.clone(), "default")
    }

    /// A client whose requests are recorded under `name`, and that can be cut off from the server on its own.
    pub fn partitioned_client(&self, name: &str) -> (kube::Client, Partition) {
        let link = Arc::new(Link { name: name.to_owned(), cut: Arc::new(AtomicBool::new(false)) });
        let p = Partition { state: self.state.clone(), link: link.clone() };
        (kube::Client::new(FakeApi { state: self.state.clone(), link }, "default"), p)
    }

    /// Creates or replaces an object (`apiVersion`, `kind`, `metadata.name` required; `metadata.namespace`
    /// defaults to `default`), as another client of the API server would; returns it as stored.
    ///
    /// # Panics
    /// On an object of a kind the fake does not serve: a mistake in the test.
    pub fn apply(&self, obj: Value) -> Value {
        let api = obj["apiVersion"].as_str().unwrap_or_default();
        let kind = obj["kind"].as_str().unwrap_or_default();
        let res = Res::by_kind(api, kind).unwrap_or_else(|| panic!("the fake API does not serve {api} {kind}"));
        let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_owned();
        let ns = if res.namespaced {
            obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("default").to_owned()
        } else {
            String::new()
        };
        self.lock().put(res, &ns, &name, obj)
    }

    /// Deletes an object by `apiVersion` and kind; whether it existed.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> bool {
        let res = Res::by_kind(api_version, kind).unwrap_or_else(|| panic!("the fake API does not serve {kind}"));
        let ns = if res.namespaced { namespace } else { "" };
        self.lock().remove(res, ns, name).is_some()
    }

    /// An object as stored.
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let res = Res::by_kind(api_version, kind)?;
        let ns = if res.namespaced { namespace } else { "" };
        self.lock().objects.get(&(res.plural, ns.to_owned(), name.to_owned())).cloned()
    }

    /// Ends every open watch, as the API server does on its watch timeout or a restart.
    pub fn close_watches(&self) {
        self.lock().close_watches();
    }

    /// Forgets the event history up to now and ends every watch: a watch resumed from an older
    /// resourceVersion gets `410 Gone`, as after etcd compaction or an API server restart.
    pub fn compact(&self) {
        let mut s = self.lock();
        s.history.clear();
        s.compacted = s.rv;
        s.close_watches();
    }

    /// Makes every request fail as a refused connection (`true`), as an API server that is down, and ends the
    /// open watches; or brings it back.
    pub fn set_down(&self, down: bool) {
        let mut s = self.lock();
        s.down = down;
        if down {
            s.close_watches();
        }
    }

    /// Answers a watch from a compacted resourceVersion with HTTP `410` (`true`) instead of a `200` stream holding
    /// one `ERROR` event (the default, what a kube-apiserver does); some API servers and proxies do the former.
    pub fn gone_as_http(&self, http: bool) {
        self.lock().gone_as_http = http;
    }

    /// Makes lists and watches of one resource (`services`, `ingresses`, ...) answer `500` (`true`), or not.
    pub fn fail(&self, plural: &str, failing: bool) {
        let Some(res) = RESOURCES.iter().find(|r| r.plural == plural) else { return };
        let mut s = self.lock();
        if failing {
            s.failing.insert(res.plural);
        } else {
            s.failing.remove(res.plural);
        }
    }

    /// Every request answered so far.
    pub fn calls(&self) -> Vec<ApiCall> {
        self.lock().calls.clone()
    }

    /// How many lists of a resource were answered (a relist shows here; a resumed watch does not).
    pub fn lists(&self, plural: &str) -> usize {
        self.lock().lists.get(plural).copied().unwrap_or(0)
    }

    /// The `resourceVersion` each watch of a resource asked to start from, in order.
    pub fn watch_versions(&self, plural: &str) -> Vec<String> {
        self.lock().watch_from.get(plural).cloned().unwrap_or_default()
    }

    /// Whether lists and watches of a resource asked for metadata only (`Some(true)`), full objects
    /// (`Some(false)`), or both or none (`None`).
    pub fn metadata_only(&self, plural: &str) -> Option<bool> {
        let s = self.lock();
        let modes: Vec<bool> = s.reads.iter().filter(|(p, _)| *p == plural).map(|(_, m)| *m).collect();
        match modes.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }

    /// How many requests were refused while the server was down or a client cut off.
    pub fn refused(&self) -> usize {
        self.lock().refused
    }

    /// The current resourceVersion of the server.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// How many watches of a resource are open.
    pub fn watches(&self, plural: &str) -> usize {
        self.lock().watchers.iter().filter(|w| w.res.plural == plural && !w.tx.is_closed()).count()
    }

    /// Serves the fake over HTTP on `addr` (port 0 picks one) until the returned task is dropped... or aborted.
    pub async fn serve(&self, addr: SocketAddr) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let me = self.clone();
        let task = tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        mesh_runtime::accept::pause_after(&e).await;
                        continue;
                    }
                };
                let me = me.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let me = me.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            Ok::<_, Infallible>(me.handle(parts, body))
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
                });
            }
        });
        Ok((local, task))
    }

    /// A kubeconfig pointing at [`FakeApi::serve`]'s address, for a real binary.
    pub fn kubeconfig(addr: SocketAddr) -> String {
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             users:\n- name: fake\n  user: {{}}\n"
        )
    }

    /// Answers one request.
    fn handle(&self, parts: http::request::Parts, body: Bytes) -> Response<FakeBody> {
        let Some(t) = parse_path(parts.uri.path()) else {
            return error(404, "NotFound", format!("the server could not find the requested resource {}", parts.uri));
        };
        let q = query(&parts.uri);
        let verb = match (&parts.method, &t.name) {
            (&Method::GET, None) if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) => "watch",
            (&Method::GET, None) => "list",
            (&Method::GET, Some(_)) => "get",
            (&Method::POST, None) => "create",
            (&Method::PUT, Some(_)) => "update",
            (&Method::PATCH, Some(_)) => "patch",
            (&Method::DELETE, Some(_)) => "delete",
            _ => return error(405, "MethodNotAllowed", format!("{} {}", parts.method, parts.uri.path())),
        };
        let mut s = self.lock();
        s.calls.push(ApiCall {
            verb: verb.to_owned(),
            group: t.res.group.to_owned(),
            resource: match &t.sub {
                Some(sub) => format!("{}/{sub}", t.res.plural),
                None => t.res.plural.to_owned(),
            },
            namespace: t.namespace.clone(),
            client: self.link.name.clone(),
        });
        if t.res.namespaced && t.namespace.is_none() && !matches!(verb, "list" | "watch") {
            return error(404, "NotFound", "namespaced resource requested without a namespace");
        }
        if matches!(verb, "list" | "watch") && s.failing.contains(t.res.plural) {
            return error(500, "InternalError", format!("{} unavailable (injected)", t.res.plural));
        }
        let meta_only = parts
            .headers
            .get(http::header::ACCEPT)
            .and_then(|a| a.to_str().ok())
            .is_some_and(|a| a.contains("as=PartialObjectMetadata"));
        if matches!(verb, "list" | "watch") {
            s.reads.insert((t.res.plural, meta_only));
        }
        let selector = match Selector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or_default()) {
            Ok(sel) => sel,
            Err(e) => return error(400, "BadRequest", e),
        };
        let ns = t.namespace.clone().unwrap_or_default();
        match verb {
            "list" => {
                *s.lists.entry(t.res.plural).or_default() += 1;
                let mut items: Vec<Value> = s
                    .objects
                    .iter()
                    .filter(|((p, o_ns, _), obj)| {
                        *p == t.res.plural && (t.namespace.is_none() || *o_ns == ns) && selector.matches(obj)
                    })
                    .map(|(_, obj)| {
                        if meta_only {
                            return meta_of(obj);
                        }
                        // A real list omits each item's apiVersion and kind.
                        let mut o = obj.clone();
                        if let Some(m) = o.as_object_mut() {
                            m.remove("apiVersion");
                            m.remove("kind");
                        }
                        o
                    })
                    .collect();
                let offset: usize = q.get("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
                let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
                let total = items.len();
                items = items.into_iter().skip(offset).take(limit).collect();
                let mut meta = json!({"resourceVersion": s.rv.to_string()});
                if offset.saturating_add(limit) < total {
                    meta["continue"] = json!((offset + limit).to_string());
                }
                let (kind, api_version) = if meta_only {
                    ("PartialObjectMetadataList".to_owned(), "meta.k8s.io/v1".to_owned())
                } else {
                    (format!("{}List", t.res.kind), t.res.api_version())
                };
                respond(200, &json!({"kind": kind, "apiVersion": api_version, "metadata": meta, "items": items}))
            }
            "watch" => {
                let (tx, rx) = mpsc::unbounded_channel();
                let client = self.link.name.clone();
                let asked = q.get("resourceVersion").cloned().unwrap_or_default();
                s.watch_from.entry(t.res.plural).or_default().push(asked);
                let from = q.get("resourceVersion").and_then(|v| v.parse::<u64>().ok()).filter(|v| *v > 0);
                match from {
                    Some(from) if from < s.compacted && s.gone_as_http => {
                        return error(410, "Expired", format!("too old resource version: {from} ({})", s.compacted));
                    }
                    Some(from) if from < s.compacted => {
                        let gone =
                            status(410, "Expired", format!("too old resource version: {from} ({})", s.compacted));
                        let _ = tx.send(Bytes::from(format!("{}\n", json!({"type": "ERROR", "object": gone}))));
                        drop(tx);
                    }
                    Some(from) => {
                        for e in s.history.iter().filter(|e| e.rv > from && e.res == t.res) {
                            if (t.namespace.is_none() || e.namespace == ns) && selector.matches(&e.object) {
                                let _ = tx.send(if meta_only { line(e.typ, &e.object, true) } else { e.line.clone() });
                            }
                        }
                        s.watchers.push(Watcher {
                            res: t.res,
                            namespace: t.namespace.clone(),
                            selector,
                            tx,
                            client,
                            meta_only,
                        });
                    }
                    None => {
                        // "Any version": the current state as ADDED events, then changes.
                        for ((p, o_ns, _), obj) in &s.objects {
                            if *p == t.res.plural && (t.namespace.is_none() || *o_ns == ns) && selector.matches(obj) {
                                let _ = tx.send(line("ADDED", obj, meta_only));
                            }
                        }
                        s.watchers.push(Watcher {
                            res: t.res,
                            namespace: t.namespace.clone(),
                            selector,
                            tx,
                            client,
                            meta_only,
                        });
                    }
                }
                let stream = UnboundedReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
                let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
                r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                r
            }
            _ => Self::write(&mut s, &t, verb, &ns, &parts, &body),
        }
    }

    fn write(
        s: &mut State,
        t: &Target,
        verb: &str,
        ns: &str,
        parts: &http::request::Parts,
        body: &[u8],
    ) -> Response<FakeBody> {
        let key_of = |name: &str| (t.res.plural, ns.to_owned(), name.to_owned());
        let parsed: Result<Value, _> = if body.is_empty() { Ok(Value::Null) } else { serde_json::from_slice(body) };
        let Ok(input) = parsed else { return error(400, "BadRequest", "request body is not JSON") };
        let not_found = |name: &str| error(404, "NotFound", format!("{} \"{name}\" not found", t.res.plural));
        match (verb, &t.name, t.sub.as_deref()) {
            ("get", Some(name), None) => match s.objects.get(&key_of(name)) {
                Some(obj) => respond(200, obj),
                None => not_found(name),
            },
            ("create", None, None) => {
                let Some(name) = input.pointer("/metadata/name").and_then(Value::as_str).map(str::to_owned) else {
                    return error(422, "Invalid", "metadata.name: Required value");
                };
                if s.objects.contains_key(&key_of(&name)) {
                    return error(409, "AlreadyExists", format!("{} \"{name}\" already exists", t.res.plural));
                }
                let obj = s.put(t.res, ns, &name, input);
                respond(201, &obj)
            }
            ("update", Some(name), sub) => {
                let Some(old) = s.objects.get(&key_of(name)).cloned() else { return not_found(name) };
                if rv_of(&input).is_some_and(|rv| Some(rv) != rv_of(&old)) {
                    return error(
                        409,
                        "Conflict",
                        format!(
                            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                            t.res.plural
                        ),
                    );
                }
                let obj = match sub {
                    Some("status") => {
                        let mut o = old.clone();
                        o["status"] = input["status"].clone();
                        o
                    }
                    Some(other) => return error(404, "NotFound", format!("no subresource {other}")),
                    None => {
                        let mut o = input;
                        if t.res.status {
                            o["status"] = old["status"].clone();
                        }
                        o
                    }
                };
                let obj = s.put(t.res, ns, name, obj);
                respond(200, &obj)
            }
            ("patch", Some(name), sub) => {
                let ct = parts.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
                if !(ct.starts_with("application/merge-patch+json")
                    || ct.starts_with("application/strategic-merge-patch+json"))
                {
                    return error(
                        415,
                        "UnsupportedMediaType",
                        format!("the fake API applies merge patches only, not {ct}"),
                    );
                }
                let Some(old) = s.objects.get(&key_of(name)).cloned() else { return not_found(name) };
                if rv_of(&input).is_some_and(|rv| Some(rv) != rv_of(&old)) {
                    return error(409, "Conflict", "the object has been modified");
                }
                let mut patched = old.clone();
                merge(&mut patched, &input);
                let obj = match sub {
                    Some("status") => {
                        let mut o = old.clone();
                        o["status"] = patched["status"].clone();
                        o
                    }
                    Some(other) => return error(404, "NotFound", format!("no subresource {other}")),
                    None => {
                        if t.res.status {
                            patched["status"] = old["status"].clone();
                        }
                        patched
                    }
                };
                let obj = s.put(t.res, ns, name, obj);
                respond(200, &obj)
            }
            ("delete", Some(name), None) => match s.remove(t.res, ns, name) {
                Some(obj) => respond(200, &obj),
                None => not_found(name),
            },
            _ => error(405, "MethodNotAllowed", format!("{verb} {}", parts.uri.path())),
        }
    }
}

impl tower_service::Service<Request<kube::client::Body>> for FakeApi {
    type Response = Response<FakeBody>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<kube::client::Body>) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let refused = || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "fake API server is down");
            if me.link.cut.load(Ordering::SeqCst) || me.lock().down {
                me.lock().refused += 1;
                return Err(refused());
            }
            let (parts, body) = req.into_parts();
            let body = body.collect().await.map(|b| b.to_bytes()).map_err(|e| std::io::Error::other(e.to_string()))?;
            Ok(me.handle(parts, body))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_selectors_parse() {
        let t = parse_path("/apis/networking.k8s.io/v1/namespaces/ns/ingresses/web/status").unwrap();
        assert_eq!(
            (t.res.kind, t.namespace.as_deref(), t.name.as_deref(), t.sub.as_deref()),
            ("Ingress", Some("ns"), Some("web"), Some("status"))
        );
        assert_eq!(parse_path("/api/v1/nodes").unwrap().res.kind, "Node");
        assert!(parse_path("/api/v1/namespaces/ns/nodes").is_none());
        assert!(parse_path("/api/v1/pods").is_none());
        let sel = Selector::parse("type=kubernetes.io/tls").unwrap();
        assert!(sel.matches(&json!({"type": "kubernetes.io/tls"})));
        assert!(!sel.matches(&json!({"type": "Opaque"})));
        assert!(Selector::parse("spec.foo=bar").is_err());
        assert_eq!(percent_decode("type%3Dkubernetes.io%2Ftls"), "type=kubernetes.io/tls");
        let mut v = json!({"a": {"b": 1, "c": 2}});
        merge(&mut v, &json!({"a": {"b": null, "d": 3}}));
        assert_eq!(v, json!({"a": {"c": 2, "d": 3}}));
    }
}

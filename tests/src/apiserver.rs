//! A real Kubernetes API server on loopback: etcd and kube-apiserver, built from Go modules by
//! `tests/kube/build.sh` at the versions in `tests/kube/versions.env`, and started with generated certificates,
//! a service-account signing key, an admin identity (`system:masters`), RBAC and an audit log.
//!
//! [`KubeApiServer::start_or_skip`] starts one, or says SKIPPED (why, and how to build it) when the binaries are
//! not built, unless `MESH_REQUIRE_KUBE_APISERVER=1` (CI) makes that a failure. Every process is killed by its
//! PID when the [`KubeApiServer`] drops (and its data folder deleted).
//!
//! One server per test: nextest (the project's runner) runs every test in a process of its own, so a server
//! shared by a test binary would have to outlive the test that started it, which no process here may. A start
//! takes a few seconds (see docs/KUBE_APISERVER_TESTS.md). Tests still create their objects in a fresh
//! namespace ([`KubeApiServer::namespace`]), so they read as they would against a shared cluster.
//!
//! What a bare API server does not do (there is no controller-manager, scheduler or kubelet): nothing makes
//! EndpointSlices from selectors (tests write the slices), deleted namespaces never finish deleting, no Pods
//! run. Its validation is real: EndpointSlice addresses may not be loopback (tests use 10.0.0.0/8 addresses and
//! send no traffic to them), Service cluster IPs come from `--service-cluster-ip-range` ([`SERVICE_CIDR`]).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use serde_json::{Value, json};

use crate::process::{Process, wait_for_line, workspace_bin};
use crate::wait::eventually;

/// The pinned versions (`KEY=value` lines), shared with `tests/kube/build.sh`.
const VERSIONS: &str = include_str!("../kube/versions.env");

/// Services get cluster IPs from this range.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

/// The field manager of the objects tests apply.
pub const FIELD_MANAGER: &str = "mesh-tests";

/// How long etcd, then kube-apiserver, may take to become ready (a loaded 2-core CI machine included).
const START: Duration = Duration::from_secs(90);

/// The service-account token issuer (and audience).
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

fn version(key: &str) -> String {
    VERSIONS
        .lines()
        .filter_map(|l| l.trim().split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| panic!("tests/kube/versions.env sets no {key}"))
}

/// The pinned kube-apiserver version (`v1.37.2`).
pub fn kube_version() -> String {
    version("KUBE_VERSION")
}

/// The pinned etcd version (`v3.6.17`).
pub fn etcd_version() -> String {
    version("ETCD_VERSION")
}

/// Where `tests/kube/build.sh` puts the binaries: `$MESH_K8S_BIN_DIR`, else
/// `${MESH_K8S_CACHE:-~/.cache/mesh-k8s}/kube-<v>_etcd-<v>/bin`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MESH_K8S_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let root = std::env::var_os("MESH_K8S_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/mesh-k8s")
    });
    root.join(format!("kube-{}_etcd-{}", kube_version(), etcd_version())).join("bin")
}

/// The kube-apiserver and etcd binaries, if built.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// kube-apiserver.
    pub apiserver: PathBuf,
    /// etcd.
    pub etcd: PathBuf,
}

/// The built binaries, or why there are none.
pub fn binaries() -> Result<Binaries, String> {
    let dir = bin_dir();
    let b = Binaries { apiserver: dir.join("kube-apiserver"), etcd: dir.join("etcd") };
    for p in [&b.apiserver, &b.etcd] {
        if !p.is_file() {
            return Err(format!(
                "{} is not built (run tests/kube/build.sh: it builds kube-apiserver {} and etcd {} from Go modules \
                 into {}, or point MESH_K8S_BIN_DIR at a folder holding both)",
                p.display(),
                kube_version(),
                etcd_version(),
                dir.display()
            ));
        }
    }
    Ok(b)
}

/// Whether a missing server fails the test (`MESH_REQUIRE_KUBE_APISERVER=1`, as in CI) instead of skipping it.
pub fn required() -> bool {
    std::env::var("MESH_REQUIRE_KUBE_APISERVER").is_ok_and(|v| v == "1")
}

/// Generated credentials, written into the server's folder.
#[derive(Debug)]
struct Pki {
    ca_pem: String,
}

fn write_pki(dir: &Path) -> anyhow::Result<Pki> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "mesh-tests kube CA");
    let ca_pem = ca_params.self_signed(&ca_key)?.pem();
    let issuer = Issuer::new(ca_params, ca_key);

    // Serving: loopback, and the names and first Service IP a Pod would use.
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![
        "localhost".to_owned(),
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
        "kubernetes.default.svc.cluster.local".to_owned(),
    ])?;
    params.subject_alt_names.push(rcgen::SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    params.subject_alt_names.push(rcgen::SanType::IpAddress(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1))));
    params.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    std::fs::write(dir.join("serving.crt"), params.signed_by(&key, &issuer)?.pem())?;
    std::fs::write(dir.join("serving.key"), key.serialize_pem())?;

    // The admin: a client certificate in system:masters (what kubeadm's admin.conf is).
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, "mesh-tests-admin");
    params.distinguished_name.push(DnType::OrganizationName, "system:masters");
    std::fs::write(dir.join("admin.crt"), params.signed_by(&key, &issuer)?.pem())?;
    std::fs::write(dir.join("admin.key"), key.serialize_pem())?;

    // Service-account tokens are signed with this key (ES256) and verified with its public half.
    let sa = KeyPair::generate()?;
    std::fs::write(dir.join("sa.key"), sa.serialize_pem())?;
    std::fs::write(dir.join("sa.pub"), sa.public_key_pem())?;
    std::fs::write(dir.join("ca.crt"), &ca_pem)?;
    Ok(Pki { ca_pem })
}

/// Requests by ServiceAccounts are logged (metadata only: who, verb, resource, decision, status); tests read
/// them with [`KubeApiServer::audit_events`].
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    userGroups: [\"system:serviceaccounts\"]
  - level: None
";

/// Options of a server.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `--watch-cache=false`: watches go to etcd itself, so a watch from a compacted `resourceVersion` gets
    /// etcd's "required revision has been compacted" as a `410 Gone` (with the cache, the cache's own window
    /// decides).
    pub no_watch_cache: bool,
}

/// etcd and kube-apiserver, running until dropped.
pub struct KubeApiServer {
    // Dropped in this order: the API server, then etcd, then their folder.
    apiserver: Option<Process>,
    etcd: Process,
    dir: tempfile::TempDir,
    bins: Binaries,
    options: Options,
    port: u16,
    etcd_client: SocketAddr,
    pki: Pki,
    client: kube::Client,
    starts: u32,
}

impl std::fmt::Debug for KubeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApiServer")
            .field("url", &self.url())
            .field("etcd", &self.etcd_client)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl KubeApiServer {
    /// Starts a server, or returns `None` after printing why the test is skipped (the binaries are not built);
    /// with `MESH_REQUIRE_KUBE_APISERVER=1` a missing binary fails instead.
    pub async fn start_or_skip(test: &str) -> anyhow::Result<Option<KubeApiServer>> {
        Self::start_or_skip_with(test, Options::default()).await
    }

    /// [`start_or_skip`](Self::start_or_skip) with options.
    pub async fn start_or_skip_with(test: &str, options: Options) -> anyhow::Result<Option<KubeApiServer>> {
        match binaries() {
            Ok(bins) => Ok(Some(Self::start(bins, options).await?)),
            Err(why) if required() => anyhow::bail!("MESH_REQUIRE_KUBE_APISERVER=1, but {why}"),
            Err(why) => {
                eprintln!("SKIPPED {test}: {why}");
                Ok(None)
            }
        }
    }

    /// Starts etcd and kube-apiserver from `bins` and waits until `/readyz` answers ok.
    pub async fn start(bins: Binaries, options: Options) -> anyhow::Result<KubeApiServer> {
        let dir = tempfile::Builder::new().prefix("mesh-kube-").tempdir()?;
        let pki = write_pki(dir.path())?;
        std::fs::write(dir.path().join("audit-policy.yaml"), AUDIT_POLICY)?;
        let etcd_client = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), crate::free_port(Ipv4Addr::LOCALHOST.into())?);
        let etcd = start_etcd(&bins.etcd, dir.path(), etcd_client).await?;
        let port = crate::free_port(Ipv4Addr::LOCALHOST.into())?;
        let admin = admin_kubeconfig(dir.path(), port)?;
        std::fs::write(dir.path().join("admin.kubeconfig"), &admin)?;
        let client = client_from_kubeconfig(&admin).await?;
        let mut server =
            KubeApiServer { apiserver: None, etcd, dir, bins, options, port, etcd_client, pki, client, starts: 0 };
        server.start_apiserver().await?;
        Ok(server)
    }

    async fn start_apiserver(&mut self) -> anyhow::Result<()> {
        let d = self.dir.path();
        let f = |name: &str| d.join(name).display().to_string();
        self.starts += 1;
        let mut cmd = Command::new(&self.bins.apiserver);
        cmd.arg(format!("--etcd-servers=http://{}", self.etcd_client))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--secure-port={}", self.port))
            // The `kubernetes` Service's endpoints would be 127.0.0.1, which validation refuses.
            .arg("--endpoint-reconciler-type=none")
            .arg(format!("--cert-dir={}", f("apiserver-certs")))
            .arg(format!("--tls-cert-file={}", f("serving.crt")))
            .arg(format!("--tls-private-key-file={}", f("serving.key")))
            .arg(format!("--client-ca-file={}", f("ca.crt")))
            .arg(format!("--service-account-issuer={ISSUER}"))
            .arg(format!("--service-account-key-file={}", f("sa.pub")))
            .arg(format!("--service-account-signing-key-file={}", f("sa.key")))
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .arg("--authorization-mode=RBAC")
            .arg(format!("--audit-policy-file={}", f("audit-policy.yaml")))
            .arg(format!("--audit-log-path={}", f("audit.log")))
            .args(["--audit-log-format=json", "--audit-log-mode=blocking", "--profiling=false"]);
        if self.options.no_watch_cache {
            cmd.arg("--watch-cache=false");
        }
        let process = Process::spawn(&format!("kube-apiserver#{}", self.starts), cmd)?;
        self.apiserver = Some(process);
        let client = self.client.clone();
        let started = std::time::Instant::now();
        let apiserver = self.apiserver.as_mut().context("just started")?;
        eventually(START, "kube-apiserver /readyz", || {
            let alive = apiserver.check_running();
            let client = client.clone();
            async move {
                // Fail at once (with its output) when it exits: a bad flag must not cost the whole deadline.
                alive?;
                let req = http::Request::get("/readyz").body(Vec::new())?;
                let body = client.request_text(req).await.context("GET /readyz")?;
                anyhow::ensure!(body.trim() == "ok", "/readyz: {body}");
                Ok(())
            }
        })
        .await
        .map_err(|e| {
            let tail = self.apiserver.as_ref().map(|p| p.tail(40)).unwrap_or_default();
            e.context(format!("kube-apiserver did not become ready; its last output:\n{tail}"))
        })?;
        eprintln!("kube-apiserver {} ready on {} in {:?}", kube_version(), self.url(), started.elapsed());
        Ok(())
    }

    /// Kills kube-apiserver (SIGKILL, as a crash), leaving etcd and its data.
    pub fn kill_apiserver(&mut self) {
        self.apiserver = None;
    }

    /// Starts kube-apiserver again on the same port and etcd (after [`kill_apiserver`](Self::kill_apiserver), or
    /// killing it first), and waits until it is ready.
    pub async fn restart_apiserver(&mut self) -> anyhow::Result<()> {
        self.apiserver = None;
        self.start_apiserver().await
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The API server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A client with the admin identity (`system:masters`: everything allowed).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The admin kubeconfig file.
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }

    /// A kubeconfig for a bearer `token` (a ServiceAccount's), against `server` (default: this server's URL).
    pub fn token_kubeconfig(&self, token: &str, server: Option<&str>) -> String {
        kubeconfig(server.unwrap_or(&self.url()), &self.pki.ca_pem, &format!("token: {token}"))
    }

    /// A file of the server's folder: `ca.crt`, `serving.crt`/`serving.key` (the API server's certificate, for
    /// 127.0.0.1), `admin.kubeconfig`, `audit.log`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `text` into a file of the server's folder and returns its path.
    pub fn write_file(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Creates a namespace named `{prefix}-{random}` and returns its name.
    pub async fn namespace(&self, prefix: &str) -> anyhow::Result<String> {
        let name = format!("{prefix}-{:08x}", random_u32());
        self.apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})).await?;
        Ok(name)
    }

    /// The API of `gvk`'s resource in `namespace` (ignored for cluster-scoped kinds), found by discovery.
    pub async fn dynamic_api(
        &self,
        gvk: &GroupVersionKind,
        namespace: Option<&str>,
    ) -> anyhow::Result<Api<DynamicObject>> {
        let (ar, caps) = kube::discovery::pinned_kind(&self.client, gvk)
            .await
            .with_context(|| format!("the server does not serve {gvk:?}"))?;
        Ok(match (caps.scope, namespace) {
            (kube::discovery::Scope::Namespaced, Some(ns)) => Api::namespaced_with(self.client.clone(), ns, &ar),
            (kube::discovery::Scope::Namespaced, None) => Api::default_namespaced_with(self.client.clone(), &ar),
            (kube::discovery::Scope::Cluster, _) => Api::all_with(self.client.clone(), &ar),
        })
    }

    /// Server-side applies one object (its `metadata.namespace`, if any, says where) with strict field
    /// validation: an unknown or duplicate field is an error, as with `kubectl apply`.
    pub async fn apply(&self, object: &Value) -> anyhow::Result<DynamicObject> {
        let (gvk, name, ns) = identity(object)?;
        let api = self.dynamic_api(&gvk, ns.as_deref()).await?;
        let mut params = PatchParams::apply(FIELD_MANAGER).force();
        params.field_validation = Some(kube::api::ValidationDirective::Strict);
        api.patch(&name, &params, &Patch::Apply(object))
            .await
            .with_context(|| format!("applying {} {}{name}", gvk.kind, ns.map(|n| format!("{n}/")).unwrap_or_default()))
    }

    /// Applies every document of a YAML stream, in order, putting namespaced objects without a namespace into
    /// `namespace`.
    pub async fn apply_yaml(&self, text: &str, namespace: Option<&str>) -> anyhow::Result<Vec<DynamicObject>> {
        let mut out = Vec::new();
        for doc in documents(text)? {
            let mut doc = doc;
            if let Some(ns) = namespace
                && doc.pointer("/metadata/namespace").is_none()
                && doc["kind"] != "Namespace"
            {
                let (gvk, _, _) = identity(&doc)?;
                let (_, caps) = kube::discovery::pinned_kind(&self.client, &gvk).await?;
                if caps.scope == kube::discovery::Scope::Namespaced {
                    doc["metadata"]["namespace"] = json!(ns);
                }
            }
            out.push(self.apply(&doc).await?);
        }
        Ok(out)
    }

    /// Deletes one object.
    pub async fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> anyhow::Result<()> {
        let gvk = gvk(api_version, kind)?;
        let api = self.dynamic_api(&gvk, namespace).await?;
        api.delete(name, &Default::default()).await.with_context(|| format!("deleting {kind} {name}"))?;
        Ok(())
    }

    /// A token of ServiceAccount `namespace/name` (TokenRequest, one hour).
    pub async fn service_account_token(&self, namespace: &str, name: &str) -> anyhow::Result<String> {
        use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
        use k8s_openapi::api::core::v1::ServiceAccount;
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let req = TokenRequest {
            spec: TokenRequestSpec { expiration_seconds: Some(3600), ..Default::default() },
            ..Default::default()
        };
        let tr = api
            .create_token_request(name, &PostParams::default(), &req)
            .await
            .with_context(|| format!("a token for ServiceAccount {namespace}/{name}"))?;
        tr.status.map(|s| s.token).context("TokenRequest without a token")
    }

    /// etcd's current revision (what a `resourceVersion` is).
    pub async fn etcd_revision(&self) -> anyhow::Result<i64> {
        // A range over one key answers with the store's header; the key need not exist.
        let key = base64::engine::general_purpose::STANDARD.encode("/registry/mesh-tests");
        let reply = post_json(self.etcd_client, "/v3/kv/range", &json!({"key": key})).await?;
        reply
            .pointer("/header/revision")
            .and_then(|r| r.as_str().and_then(|s| s.parse().ok()).or_else(|| r.as_i64()))
            .with_context(|| format!("no revision in {reply}"))
    }

    /// Compacts etcd up to its current revision (physically): every older revision is gone, so a watch from an
    /// older `resourceVersion` can only be answered `410 Gone`. Returns the revision.
    pub async fn compact_etcd(&self) -> anyhow::Result<i64> {
        let revision = self.etcd_revision().await?;
        post_json(self.etcd_client, "/v3/kv/compaction", &json!({"revision": revision.to_string(), "physical": true}))
            .await?;
        Ok(revision)
    }

    /// The audit events logged so far (requests by ServiceAccounts; see the policy above), oldest first.
    pub fn audit_events(&self) -> anyhow::Result<Vec<Value>> {
        let text = std::fs::read_to_string(self.dir.path().join("audit.log")).unwrap_or_default();
        text.lines().filter(|l| !l.trim().is_empty()).map(|l| Ok(serde_json::from_str(l)?)).collect()
    }

    /// The running kube-apiserver process (its output, for diagnostics).
    pub fn apiserver(&mut self) -> Option<&mut Process> {
        self.apiserver.as_mut()
    }

    /// The etcd process.
    pub fn etcd(&mut self) -> &mut Process {
        &mut self.etcd
    }
}

fn random_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish() as u32
}

async fn start_etcd(bin: &Path, dir: &Path, client: SocketAddr) -> anyhow::Result<Process> {
    let peer = SocketAddr::new(client.ip(), crate::free_port(client.ip())?);
    let mut cmd = Command::new(bin);
    cmd.args(["--name", "mesh-tests"])
        .arg(format!("--data-dir={}", dir.join("etcd").display()))
        .arg(format!("--listen-client-urls=http://{client}"))
        .arg(format!("--advertise-client-urls=http://{client}"))
        .arg(format!("--listen-peer-urls=http://{peer}"))
        .arg(format!("--initial-advertise-peer-urls=http://{peer}"))
        .arg(format!("--initial-cluster=mesh-tests=http://{peer}"))
        // A throwaway store: no fsync (much faster on a loaded disk), and quiet.
        .args(["--unsafe-no-fsync", "--log-level=warn"]);
    let mut etcd = Process::spawn("etcd", cmd)?;
    eventually(START, "etcd /health", || {
        let alive = etcd.check_running();
        async move {
            alive?;
            let reply = crate::http_get(client, "127.0.0.1", "/health").await?;
            anyhow::ensure!(reply.status == 200 && reply.body.contains("\"true\""), "/health: {}", reply.body);
            Ok(())
        }
    })
    .await?;
    Ok(etcd)
}

fn kubeconfig(server: &str, ca_pem: &str, user: &str) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: test\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    \
         namespace: default\nusers:\n- name: test\n  user:\n    {user}\n",
        b64(ca_pem)
    )
}

fn admin_kubeconfig(dir: &Path, port: u16) -> anyhow::Result<String> {
    let b64 = |p: &str| -> anyhow::Result<String> {
        Ok(base64::engine::general_purpose::STANDARD.encode(std::fs::read(dir.join(p))?))
    };
    let ca = std::fs::read_to_string(dir.join("ca.crt"))?;
    let user = format!("client-certificate-data: {}\n    client-key-data: {}", b64("admin.crt")?, b64("admin.key")?);
    Ok(kubeconfig(&format!("https://127.0.0.1:{port}"), &ca, &user))
}

/// A client from kubeconfig text.
pub async fn client_from_kubeconfig(text: &str) -> anyhow::Result<kube::Client> {
    let kc = kube::config::Kubeconfig::from_yaml(text)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// `apiVersion` + `kind` as a [`GroupVersionKind`].
pub fn gvk(api_version: &str, kind: &str) -> anyhow::Result<GroupVersionKind> {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    Ok(GroupVersionKind::gvk(group, version, kind))
}

fn identity(object: &Value) -> anyhow::Result<(GroupVersionKind, String, Option<String>)> {
    let s = |p: &str| object.pointer(p).and_then(Value::as_str);
    let api_version = s("/apiVersion").with_context(|| format!("no apiVersion: {object}"))?;
    let kind = s("/kind").with_context(|| format!("no kind: {object}"))?;
    let name = s("/metadata/name").with_context(|| format!("no metadata.name: {object}"))?;
    Ok((gvk(api_version, kind)?, name.to_owned(), s("/metadata/namespace").map(str::to_owned)))
}

/// The non-empty documents of a YAML stream.
pub fn documents(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for de in serde_yaml::Deserializer::from_str(text) {
        let v: Value = serde::Deserialize::deserialize(de)?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// POSTs JSON to etcd's gRPC gateway and returns the JSON answer.
async fn post_json(addr: SocketAddr, path: &str, body: &Value) -> anyhow::Result<Value> {
    let go = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let conn = tokio::spawn(conn);
        let req = hyper::Request::post(path)
            .header(hyper::header::HOST, addr.to_string())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        conn.abort();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        anyhow::ensure!(status.is_success(), "POST {path} to etcd: {status}: {text}");
        Ok::<_, anyhow::Error>(serde_json::from_str(&text)?)
    };
    tokio::time::timeout(Duration::from_secs(10), go).await.context("etcd did not answer within 10 s")?
}

/// A started `mesh-control` and its admin address.
#[derive(Debug)]
pub struct MeshControl {
    /// The process (killed on drop).
    pub process: Process,
    /// Its admin server.
    pub admin: SocketAddr,
}

impl MeshControl {
    /// Starts the built `mesh-control` against `kubeconfig` with `args` added, and waits for its start-up line.
    pub async fn start(name: &str, kubeconfig: &Path, args: &[&str]) -> anyhow::Result<MeshControl> {
        let mut cmd = Command::new(workspace_bin("mesh-control")?);
        cmd.arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--xds-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
            .args(args);
        let mut process = Process::spawn(name, cmd)?;
        let line = wait_for_line(&mut process, "mesh-control xds=", Duration::from_secs(30)).await?;
        let admin = line.rsplit("admin=").next().context("admin address")?.trim().parse()?;
        Ok(MeshControl { process, admin })
    }

    /// `/config_dump`, as JSON.
    pub async fn config_dump(&self) -> anyhow::Result<Value> {
        let reply = crate::http_get(self.admin, "localhost", "/config_dump").await?;
        anyhow::ensure!(reply.status == 200, "/config_dump: {} {}", reply.status, reply.body);
        Ok(serde_json::from_str(&reply.body)?)
    }

    /// `/metrics`, as text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(crate::http_get(self.admin, "localhost", "/metrics").await?.body)
    }

    /// Whether `/ready` answers 200.
    pub async fn ready(&self) -> bool {
        crate::http_get(self.admin, "localhost", "/ready").await.is_ok_and(|r| r.status == 200)
    }

    /// The value of metric line `series` (`name{labels}`), if present.
    pub async fn metric(&self, series: &str) -> anyhow::Result<Option<f64>> {
        let text = self.metrics().await?;
        Ok(text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()))
    }
}

/// A TCP relay on loopback in front of the API server that a test can close: closing drops every connection
/// through it (a watch breaks as when a network partition or a load balancer ends it) and refuses new ones
/// until it is opened again. TLS passes through untouched (the serving certificate names 127.0.0.1).
#[derive(Debug)]
pub struct Gate {
    addr: SocketAddr,
    open: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    /// Starts a relay to `target`, open.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Gate> {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let (open, rx) = tokio::sync::watch::channel(true);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else { continue };
                let mut rx = rx.clone();
                if !*rx.borrow_and_update() {
                    drop(down); // closed: refused at once
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut up) = tokio::net::TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = rx.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Ok(Gate { addr, open, task })
    }

    /// `https://127.0.0.1:PORT` of the relay.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Drops every connection and refuses new ones.
    pub fn close(&self) {
        self.open.send_replace(false);
    }

    /// Lets connections through again.
    pub fn open(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.close();
        self.task.abort();
    }
}

/// `mesh-control`'s `/config_dump` as sorted lines a test can look for (duplicates kept, so a doubled object
/// shows):
/// - `lds NAME`, `cds NAME` (node proxies);
/// - `eds CLUSTER ADDRESS:PORT zone=ZONE node=NODE HEALTH` (one per endpoint);
/// - `rds ROLE ROUTECONFIG DOMAIN MATCH -> CLUSTER` (ingress roles; MATCH is the route's match as JSON);
/// - `sds ROLE NAME VERSION`;
/// - `problem TEXT`.
pub fn summarize(dump: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let empty = Vec::new();
    let items = |role: &Value, t: &str| -> Vec<Value> { role[t].as_array().unwrap_or(&empty).clone() };
    let Some(roles) = dump["roles"].as_object() else { return out };
    for (role_name, role) in roles {
        for t in ["lds", "cds"] {
            for r in items(role, t) {
                if role_name == "proxy" {
                    out.push(format!("{t} {}", r["name"].as_str().unwrap_or("?")));
                }
            }
        }
        for r in items(role, "eds") {
            if role_name != "proxy" {
                continue;
            }
            let cluster = r["name"].as_str().unwrap_or("?");
            for loc in r["resource"]["endpoints"].as_array().unwrap_or(&empty) {
                let zone = loc["locality"]["zone"].as_str().unwrap_or("");
                let node = loc["locality"]["sub_zone"].as_str().unwrap_or("");
                for e in loc["lb_endpoints"].as_array().unwrap_or(&empty) {
                    let sa = &e["endpoint"]["address"]["socket_address"];
                    out.push(format!(
                        "eds {cluster} {}:{} zone={zone} node={node} {}",
                        sa["address"].as_str().unwrap_or("?"),
                        sa["port_value"],
                        e["health_status"].as_str().unwrap_or("UNKNOWN")
                    ));
                }
            }
        }
        for r in items(role, "rds") {
            let rc = r["name"].as_str().unwrap_or("?");
            for vh in r["resource"]["virtual_hosts"].as_array().unwrap_or(&empty) {
                for d in vh["domains"].as_array().unwrap_or(&empty) {
                    for route in vh["routes"].as_array().unwrap_or(&empty) {
                        let cluster = route["route"]["cluster"].as_str().map_or_else(
                            || if route.get("redirect").is_some() { "redirect" } else { "direct" }.to_owned(),
                            str::to_owned,
                        );
                        out.push(format!(
                            "rds {role_name} {rc} {} {} -> {cluster}",
                            d.as_str().unwrap_or("?"),
                            route["match"]
                        ));
                    }
                }
            }
        }
        for r in items(role, "sds") {
            out.push(format!(
                "sds {role_name} {} {}",
                r["name"].as_str().unwrap_or("?"),
                r["version"].as_str().unwrap_or("?")
            ));
        }
    }
    for p in dump["problems"].as_array().unwrap_or(&empty) {
        out.push(format!("problem {}", p.as_str().unwrap_or("?")));
    }
    out.sort();
    out
}

impl MeshControl {
    /// [`summarize`] of the current `/config_dump`.
    pub async fn summary(&self) -> anyhow::Result<Vec<String>> {
        Ok(summarize(&self.config_dump().await?))
    }
}

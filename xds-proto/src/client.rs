//! The ADS client shared by `mesh-proxy`, `mesh-ingress` and `meshctl`: one gRPC stream to the control plane
//! carrying every resource type, in Delta (default) or State-of-the-World form.
//!
//! The client owns the protocol and nothing else: it keeps the last accepted state of each type, turns every
//! response into the *full* candidate state of that type ([`Update`]), and lets the caller's [`Handler`] decide.
//! Accepted → the state is committed and ACKed; rejected → NACKed with the reason, and the previous state stays
//! in force (the "last good state" rule of the architecture). Protocol details the caller should never see:
//! - **Delta:** responses carry changes and `removed_resources`, merged here into the previous state; every
//!   ACK/NACK names the response nonce; a reconnecting stream subscribes with `initial_resource_versions` so the
//!   server does not resend what we already have.
//! - **SotW:** every response is the full set of its type (Envoy's rule for LDS/CDS; our server sends full sets
//!   for EDS/RDS/SDS too under wildcard), so the candidate is exactly the response; an ACK carries the new
//!   `version_info`, a NACK the last accepted one; a reconnect announces the last accepted version.
//! - Every type is subscribed with a wildcard: the server picks what a client gets from its node metadata
//!   (`role`, `ingressClass`), not from names.
//! - A resource that does not decode, or whose type does not match the response, is NACKed before the handler
//!   sees anything, naming the resource and why.
//! - Any stream error or end reconnects after a jittered exponential backoff; state survives reconnects.
//!
//! Not supported, because our server does not use them: resource TTLs and heartbeats (a Delta resource without
//! a body is NACKed), `Resource`-wrapped SotW resources, xDS-TP names, and named (non-wildcard) subscriptions.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::error::Error as _;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, error, info, warn};

use crate::core::{Node, node::UserAgentVersionType};
use crate::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse};
use crate::protobuf::{Any, Struct, Value, value::Kind};
use crate::rpc;
use crate::snapshot_file::resource_name;
use crate::types::ResourceType;

/// `node.cluster` of every mesh client: the server tells our clients from other xDS clients by it.
pub const NODE_CLUSTER: &str = "mesh";
/// `node.user_agent_name` of every mesh client, for the server's logs.
pub const USER_AGENT: &str = "mesh";
/// `node.metadata` key naming the client's role ([`ROLE_PROXY`] or [`ROLE_INGRESS`]); the server serves each
/// role only its resources.
pub const NODE_META_ROLE: &str = "role";
/// `node.metadata` key naming the IngressClass an ingress proxy serves.
pub const NODE_META_INGRESS_CLASS: &str = "ingressClass";
/// [`NODE_META_ROLE`] values (defined with the other names of the contract).
pub use crate::names::{ROLE_INGRESS, ROLE_PROXY};

/// The subscription that asks for every resource of a type (Delta); SotW says the same with no names.
const WILDCARD: &str = "*";
/// `google.rpc.Code.INVALID_ARGUMENT`: the code of every NACK, since a NACK always means "this config is bad".
const INVALID_ARGUMENT: i32 = 3;
/// Requests queued towards the server. One per type is queued before the stream opens, then one per response.
const REQUEST_QUEUE: usize = 16;
/// A SotW response holds a whole type, which for CDS/EDS of a large cluster passes tonic's 4 MiB default.
const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;
/// How long one TCP connect may take before it counts as a failed attempt (and backs off).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings on an idle stream, so a vanished server (no FIN, e.g. node loss) is noticed and we reconnect
/// instead of waiting forever on a silent stream.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a keepalive ping may go unanswered before the connection counts as dead.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the client could not get configuration.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint is not an `http://host:port` URL.
    #[error("invalid xDS endpoint {endpoint:?}: {reason} (expected http://host:port, e.g. http://mesh-control:18000)")]
    InvalidEndpoint {
        /// The endpoint as configured.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TCP/HTTP2 connection could not be made.
    #[error(
        "cannot connect to the xDS server at {endpoint}: {reason} (check the address and that mesh-control is \
         running and reachable from here)"
    )]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// The transport error, with its causes.
        reason: String,
    },
    /// The ADS stream failed (refused, reset, or a gRPC error from the server).
    #[error(
        "xDS {protocol} stream to {endpoint} failed: {reason} (check the mesh-control logs, and that it serves \
         {protocol} ADS)"
    )]
    Stream {
        /// The endpoint.
        endpoint: String,
        /// Delta or SotW.
        protocol: Protocol,
        /// The gRPC status or transport error.
        reason: String,
    },
    /// The server ended the stream (restart, rollout, or it closes idle streams).
    #[error("the xDS server at {endpoint} ended the stream")]
    Closed {
        /// The endpoint.
        endpoint: String,
    },
    /// Not every subscribed type was accepted in time (only from [`fetch_once`]).
    #[error(
        "no complete configuration from {endpoint} within {after:?}: nothing accepted yet for {}{} (check that \
         mesh-control has loaded its sources and serves this role)",
        type_list(.missing),
        rejection_suffix(.last_rejection)
    )]
    Timeout {
        /// The endpoint.
        endpoint: String,
        /// The time allowed.
        after: Duration,
        /// The types still without an accepted response.
        missing: Vec<ResourceType>,
        /// Why the last response was NACKed, if one was: often the real cause.
        last_rejection: Option<String>,
    },
    /// A protocol name other than `delta` or `sotw`.
    #[error("unknown xDS protocol {0:?} (expected delta or sotw)")]
    UnknownProtocol(String),
}

fn type_list(types: &[ResourceType]) -> String {
    types.iter().map(|t| t.short()).collect::<Vec<_>>().join(", ")
}

fn rejection_suffix(last: &Option<String>) -> String {
    last.as_ref().map(|r| format!("; last rejected response: {r}")).unwrap_or_default()
}

/// Which ADS variant to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// Incremental xDS: only changes travel, so one endpoint change costs one resource on the wire.
    #[default]
    Delta,
    /// State of the World: every response is the full set of its type. For control planes without Delta.
    Sotw,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Delta => "delta",
            Protocol::Sotw => "sotw",
        })
    }
}

impl FromStr for Protocol {
    type Err = ClientError;

    /// Parses `delta` or `sotw` (any case), as given on a command line.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "delta" => Ok(Protocol::Delta),
            "sotw" => Ok(Protocol::Sotw),
            _ => Err(ClientError::UnknownProtocol(s.to_owned())),
        }
    }
}

/// Who the client is, where the server is, and what to ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// The control plane, `http://host:port` (or `https://` with [`ClientConfig::tls`]).
    pub endpoint: String,
    /// `node.id`: the node name (proxy) or pod name (ingress); the server uses it for per-node resources.
    pub node_id: String,
    /// `node.metadata.role`: [`ROLE_PROXY`] or [`ROLE_INGRESS`].
    pub role: String,
    /// `node.metadata.ingressClass`, for an ingress proxy.
    pub ingress_class: Option<String>,
    /// Delta (default) or SotW.
    pub protocol: Protocol,
    /// The types to subscribe to; duplicates are ignored and requests go out in [`ResourceType::ALL`] order
    /// (dependencies first).
    pub types: Vec<ResourceType>,
    /// The shortest wait before a reconnect.
    pub backoff_min: Duration,
    /// The longest wait before a reconnect.
    pub backoff_max: Duration,
    /// TLS to the control plane (`https://` endpoints).
    pub tls: Option<ClientTls>,
    /// Keep every resource's body after the handler accepted it (default). With `false` (Delta only), an
    /// accepted body is dropped and only its name and version stay, which a Delta client needs to resume:
    /// a node proxy that converts each resource once saves the encoded copy of its whole configuration (about
    /// 18 MB at 10,000 Services). The handler then finds real bodies only under `changed`; SotW keeps bodies
    /// regardless, since it finds what changed by comparing them.
    pub keep_bodies: bool,
}

/// TLS settings of the connection to the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM of the CA that signed the control plane's certificate.
    pub ca_pem: Vec<u8>,
    /// PEM certificate chain and key this client proves itself with, when the control plane asks for one.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name to check the server's certificate against, when not the endpoint's host.
    pub domain: Option<String>,
}

impl ClientConfig {
    /// A Delta client for every type, backing off between 100 ms and 10 s.
    pub fn new(endpoint: impl Into<String>, node_id: impl Into<String>, role: impl Into<String>) -> Self {
        ClientConfig {
            endpoint: endpoint.into(),
            node_id: node_id.into(),
            role: role.into(),
            ingress_class: None,
            protocol: Protocol::Delta,
            types: ResourceType::ALL.to_vec(),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            tls: None,
            keep_bodies: true,
        }
    }

    /// Checks the endpoint, so a binary can refuse a bad flag at startup instead of retrying forever.
    pub fn validate(&self) -> Result<(), ClientError> {
        self.endpoint().map(|_| ())
    }

    pub(crate) fn endpoint(&self) -> Result<Endpoint, ClientError> {
        let invalid = |reason: String| ClientError::InvalidEndpoint { endpoint: self.endpoint.clone(), reason };
        let endpoint = Endpoint::from_shared(self.endpoint.clone()).map_err(|e| invalid(error_chain(&e)))?;
        match endpoint.uri().scheme_str() {
            Some("http") => {}
            Some("https") if self.tls.is_none() => {
                return Err(invalid(
                    "https:// needs TLS settings (the CA that signed the control plane's certificate)".into(),
                ));
            }
            Some("https") => {}
            Some(other) => return Err(invalid(format!("unsupported scheme {other:?}"))),
            None => return Err(invalid("no scheme".into())),
        }
        if endpoint.uri().host().is_none_or(str::is_empty) {
            return Err(invalid("no host".into()));
        }
        let endpoint = match &self.tls {
            Some(tls) => {
                let mut cfg = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca_pem));
                if let Some((cert, key)) = &tls.identity {
                    cfg = cfg.identity(tonic::transport::Identity::from_pem(cert, key));
                }
                if let Some(domain) = &tls.domain {
                    cfg = cfg.domain_name(domain.clone());
                }
                endpoint.tls_config(cfg).map_err(|e| invalid(format!("TLS settings: {}", error_chain(&e))))?
            }
            None => endpoint,
        };
        Ok(endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true))
    }

    /// The node sent in the first request of every stream.
    pub fn node(&self) -> Node {
        let string = |s: &str| Value { kind: Some(Kind::StringValue(s.to_owned())) };
        let mut fields = HashMap::new();
        fields.insert(NODE_META_ROLE.to_owned(), string(&self.role));
        if let Some(class) = &self.ingress_class {
            fields.insert(NODE_META_INGRESS_CLASS.to_owned(), string(class));
        }
        Node {
            id: self.node_id.clone(),
            cluster: NODE_CLUSTER.to_owned(),
            metadata: Some(Struct { fields }),
            user_agent_name: USER_AGENT.to_owned(),
            user_agent_version_type: Some(UserAgentVersionType::UserAgentVersion(env!("CARGO_PKG_VERSION").to_owned())),
            ..Default::default()
        }
    }

    /// The subscribed types, deduplicated, in dependency order.
    fn subscribed(&self) -> Vec<ResourceType> {
        ResourceType::ALL.into_iter().filter(|t| self.types.contains(t)).collect()
    }
}

/// One resource as last received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceEntry {
    /// Its version: the resource's own (Delta) or the response's `version_info` (SotW).
    pub version: String,
    /// Its protobuf encoding (the `Any` value), already checked to decode as its type.
    pub body: Bytes,
}

/// A candidate new state of one type, for the [`Handler`] to accept or reject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// The type.
    pub kind: ResourceType,
    /// The full state of the type if this update is accepted, so a handler never keeps its own copy of the
    /// protocol state. Use `changed` and `removed` to touch only what moved. Keeping this `Arc` past `apply`
    /// is allowed but makes the client copy the map on the next Delta response instead of editing it in place.
    pub resources: Arc<BTreeMap<String, ResourceEntry>>,
    /// Names added or modified by this response (for SotW: those new or with a different body).
    pub changed: Vec<String>,
    /// Names present before and absent now.
    pub removed: Vec<String>,
    /// The response's version (`system_version_info` for Delta, `version_info` for SotW).
    pub version: String,
}

/// What the caller does with configuration. Runs on the client's task: keep `apply` quick (build the next
/// table and publish it), since the stream waits on it.
pub trait Handler: Send + 'static {
    /// Validates and installs `update`. `Err(reason)` NACKs the response with `reason` (name the resource and
    /// what is wrong) and leaves the previous state of the type in force.
    fn apply(&mut self, update: &Update) -> Result<(), String>;

    /// Called when a stream opens (`true`) or ends (`false`), for readiness and metrics. State is kept while
    /// disconnected: the last accepted configuration keeps serving traffic.
    fn connected(&mut self, connected: bool) {
        let _ = connected;
    }
}

/// What the client has done so far, for tests, metrics and readiness.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientStatus {
    /// Whether a stream is open.
    pub connected: bool,
    /// The last accepted version of each type that has accepted at least one response.
    pub accepted: BTreeMap<ResourceType, String>,
    /// How many responses were NACKed since the client started.
    pub nacks: u64,
}

impl ClientStatus {
    /// Whether every one of `types` has accepted at least one response: "loaded", as opposed to "empty".
    pub fn is_loaded(&self, types: &[ResourceType]) -> bool {
        types.iter().all(|t| self.accepted.contains_key(t))
    }
}

/// A running client. Dropping it stops the client too, without waiting for it.
#[derive(Debug)]
pub struct ClientHandle {
    status: watch::Receiver<ClientStatus>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl ClientHandle {
    /// A receiver of the client's status, updated on every connect, disconnect, ACK and NACK.
    pub fn status(&self) -> watch::Receiver<ClientStatus> {
        self.status.clone()
    }

    /// Stops the client and waits until it has closed its stream (and told the handler it is disconnected).
    pub async fn stop(self) {
        let ClientHandle { stop, task, .. } = self;
        drop(stop);
        if let Err(e) = task.await
            && e.is_panic()
        {
            warn!(error = %e, "the xDS client task panicked (in the handler?)");
        }
    }
}

/// Starts a client on the current tokio runtime: it connects, subscribes, feeds `handler`, and reconnects on
/// any failure until the handle is stopped or dropped. An invalid endpoint is logged and stops the client; call
/// [`ClientConfig::validate`] first to fail at startup instead. Like `tokio::spawn`, it must be called from
/// within a tokio runtime.
pub fn spawn(cfg: ClientConfig, handler: impl Handler) -> ClientHandle {
    let (status_tx, status) = watch::channel(ClientStatus::default());
    let (stop, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut core = Core::new(cfg, handler, status_tx);
        tokio::select! {
            () = core.run() => {}
            _ = stop_rx => debug!(endpoint = %core.cfg.endpoint, "xDS client stopped"),
        }
        core.set_connected(false);
    });
    ClientHandle { status, stop, task }
}

/// Connects once, accepts whatever arrives, and returns the state of every subscribed type as soon as each has
/// had one accepted response (for `meshctl routes --control`). Does not retry: a CLI should say what is wrong.
pub async fn fetch_once(
    cfg: ClientConfig,
    timeout: Duration,
) -> Result<BTreeMap<ResourceType, BTreeMap<String, ResourceEntry>>, ClientError> {
    cfg.validate()?;
    let (status_tx, _status) = watch::channel(ClientStatus::default());
    let mut core = Core::new(cfg, AcceptAll, status_tx);
    core.stop_when_loaded = true;
    let outcome = tokio::time::timeout(timeout, core.stream_once()).await;
    core.set_connected(false);
    match outcome {
        Ok(Ok(())) => {
            Ok(core.state.into_iter().map(|(kind, state)| (kind, Arc::unwrap_or_clone(state.resources))).collect())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ClientError::Timeout {
            endpoint: core.cfg.endpoint.clone(),
            after: timeout,
            missing: core.missing(),
            last_rejection: core.last_rejection.take(),
        }),
    }
}

/// The handler of [`fetch_once`].
struct AcceptAll;

impl Handler for AcceptAll {
    fn apply(&mut self, _update: &Update) -> Result<(), String> {
        Ok(())
    }
}

/// The accepted state of one type.
#[derive(Debug, Default)]
struct TypeState {
    resources: Arc<BTreeMap<String, ResourceEntry>>,
    /// The last accepted response version; `None` until the first accepted response.
    version: Option<String>,
}

/// Jittered exponential backoff: each wait is uniform between `min` and a cap that doubles up to `max`, so a
/// fleet of proxies reconnecting after a control-plane restart spreads out instead of arriving together.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    cap: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        let max = max.max(min);
        Backoff { min, max, cap: min }
    }

    fn next_delay(&mut self) -> Duration {
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let delay = Duration::from_nanos(fastrand::u64(nanos(self.min)..=nanos(self.cap)));
        self.cap = self.cap.saturating_mul(2).min(self.max);
        delay
    }

    fn reset(&mut self) {
        self.cap = self.min;
    }
}

/// The protocol state machine: everything but the socket loop is synchronous, so each rule is one function.
struct Core<H> {
    cfg: ClientConfig,
    types: Vec<ResourceType>,
    handler: H,
    state: BTreeMap<ResourceType, TypeState>,
    status: watch::Sender<ClientStatus>,
    connected: bool,
    /// Whether the current stream delivered an accepted response: a stream that worked resets the backoff.
    accepted_on_stream: bool,
    /// [`fetch_once`]: end the stream once every type is loaded.
    stop_when_loaded: bool,
    last_rejection: Option<String>,
}

impl<H: Handler> Core<H> {
    fn new(cfg: ClientConfig, handler: H, status: watch::Sender<ClientStatus>) -> Self {
        let types = cfg.subscribed();
        let state = types.iter().map(|t| (*t, TypeState::default())).collect();
        Core {
            cfg,
            types,
            handler,
            state,
            status,
            connected: false,
            accepted_on_stream: false,
            stop_when_loaded: false,
            last_rejection: None,
        }
    }

    /// Streams, and reconnects with backoff, forever (until the caller drops this future).
    async fn run(&mut self) {
        if let Err(e) = self.cfg.validate() {
            error!(endpoint = %self.cfg.endpoint, error = %e, "xDS client not started");
            return;
        }
        let mut backoff = Backoff::new(self.cfg.backoff_min, self.cfg.backoff_max);
        loop {
            self.accepted_on_stream = false;
            let err = match self.stream_once().await {
                Ok(()) => ClientError::Closed { endpoint: self.cfg.endpoint.clone() },
                Err(e) => e,
            };
            self.set_connected(false);
            if self.accepted_on_stream {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            warn!(endpoint = %self.cfg.endpoint, error = %err, retry_in = ?delay, "xDS stream ended, reconnecting");
            tokio::time::sleep(delay).await;
        }
    }

    /// One connection and one stream, until it fails (or, for [`fetch_once`], everything is loaded).
    async fn stream_once(&mut self) -> Result<(), ClientError> {
        let endpoint = self.cfg.endpoint()?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| ClientError::Connect { endpoint: self.cfg.endpoint.clone(), reason: error_chain(&e) })?;
        let client = AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
        match self.cfg.protocol {
            Protocol::Delta => self.stream_delta(client).await,
            Protocol::Sotw => self.stream_sotw(client).await,
        }
    }

    async fn stream_delta(&mut self, mut client: AggregatedDiscoveryServiceClient<Channel>) -> Result<(), ClientError> {
        let opening = |core: &Self, first: bool, kind: ResourceType| DeltaDiscoveryRequest {
            node: first.then(|| core.cfg.node()),
            type_url: kind.type_url().to_owned(),
            resource_names_subscribe: vec![WILDCARD.to_owned()],
            initial_resource_versions: core.state.get(&kind).map_or_else(HashMap::new, |s| {
                s.resources.iter().map(|(name, e)| (name.clone(), e.version.clone())).collect()
            }),
            ..Default::default()
        };
        let open = |requests| async move { client.delta_aggregated_resources(requests).await };
        self.stream(opening, open, Self::on_delta).await
    }

    async fn stream_sotw(&mut self, mut client: AggregatedDiscoveryServiceClient<Channel>) -> Result<(), ClientError> {
        let opening = |core: &Self, first: bool, kind: ResourceType| DiscoveryRequest {
            node: first.then(|| core.cfg.node()),
            type_url: kind.type_url().to_owned(),
            version_info: core.accepted_version(kind),
            ..Default::default()
        };
        let open = |requests| async move { client.stream_aggregated_resources(requests).await };
        self.stream(opening, open, Self::on_sotw).await
    }

    /// One stream of either variant: an opening request per subscribed type (the node on the first), then the
    /// ACK or NACK of each response, until the stream fails (or, for [`fetch_once`], everything is loaded).
    async fn stream<Req, Resp, Opened>(
        &mut self,
        opening: impl Fn(&Self, bool, ResourceType) -> Req,
        open: impl FnOnce(ReceiverStream<Req>) -> Opened,
        answer: impl Fn(&mut Self, Resp) -> Req,
    ) -> Result<(), ClientError>
    where
        Opened: Future<Output = Result<tonic::Response<tonic::Streaming<Resp>>, tonic::Status>>,
    {
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        for (i, kind) in self.types.iter().enumerate() {
            tx.send(opening(self, i == 0, *kind)).await.map_err(|_| self.closed())?;
        }
        let mut inbound = open(ReceiverStream::new(rx)).await.map_err(|s| self.failed(&s))?.into_inner();
        self.on_connected();
        loop {
            if self.stop_when_loaded && self.missing().is_empty() {
                return Ok(());
            }
            let response = match inbound.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return Err(self.closed()),
                Err(status) => return Err(self.failed(&status)),
            };
            let reply = answer(self, response);
            tx.send(reply).await.map_err(|_| self.closed())?;
        }
    }

    /// Handles a Delta response and returns its ACK or NACK.
    fn on_delta(&mut self, response: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let type_url = response.type_url.clone();
        let nonce = response.nonce.clone();
        let verdict = self.kind_of(&type_url).and_then(|kind| self.apply_delta(kind, response));
        let error_detail = verdict.err().map(|reason| self.reject(&type_url, &nonce, reason));
        DeltaDiscoveryRequest { type_url, response_nonce: nonce, error_detail, ..Default::default() }
    }

    /// Handles a SotW response and returns its ACK (new version) or NACK (last accepted version).
    fn on_sotw(&mut self, response: DiscoveryResponse) -> DiscoveryRequest {
        let type_url = response.type_url.clone();
        let nonce = response.nonce.clone();
        let version = response.version_info.clone();
        let kind = self.kind_of(&type_url);
        let previous = kind.as_ref().map_or_else(|_| String::new(), |k| self.accepted_version(*k));
        let verdict = kind.and_then(|kind| {
            let update = self.sotw_update(kind, response)?;
            self.handler.apply(&update)?;
            self.commit(update);
            Ok(())
        });
        let (version_info, error_detail) = match verdict {
            Ok(()) => (version, None),
            Err(reason) => (previous, Some(self.reject(&type_url, &nonce, reason))),
        };
        DiscoveryRequest { type_url, version_info, response_nonce: nonce, error_detail, ..Default::default() }
    }

    /// The subscribed type a response is for.
    fn kind_of(&self, type_url: &str) -> Result<ResourceType, String> {
        match ResourceType::from_type_url(type_url) {
            Some(kind) if self.types.contains(&kind) => Ok(kind),
            Some(kind) => Err(format!("received {kind} resources, which this client did not subscribe to")),
            None => Err(format!("received unknown resource type {type_url:?}")),
        }
    }

    /// Merges a Delta response into the state of `kind`, offers the result to the handler, and commits it or
    /// puts the previous state back.
    ///
    /// The map is changed in place, with an undo log for a rejection, so a response costs O(its resources),
    /// not O(all resources of the type): one endpoint change in a large cluster stays cheap. It is copied once
    /// only if someone (a handler that kept `update.resources`) still holds the previous map.
    fn apply_delta(&mut self, kind: ResourceType, response: DeltaDiscoveryResponse) -> Result<(), String> {
        // Everything is checked before the state is touched, so a bad response changes nothing.
        let mut changes = Vec::with_capacity(response.resources.len());
        let mut seen = BTreeSet::new();
        for r in response.resources {
            let (name, body) = decode(kind, r.name, r.resource)?;
            if !seen.insert(name.clone()) {
                return Err(format!("{kind} resource {name:?} appears twice in one response"));
            }
            changes.push((name, ResourceEntry { version: r.version, body }));
        }
        let removals: Vec<String> = response
            .removed_resources
            .into_iter()
            .chain(response.removed_resource_names.into_iter().map(|r| r.name))
            .collect();
        if let Some(name) = removals.iter().find(|name| seen.contains(*name)) {
            return Err(format!("{kind} resource {name:?} is both updated and removed in one response"));
        }

        let mut resources = std::mem::take(&mut self.state.entry(kind).or_default().resources);
        let map = Arc::make_mut(&mut resources);
        let mut undo = Vec::with_capacity(changes.len() + removals.len());
        let mut changed = Vec::with_capacity(changes.len());
        for (name, entry) in changes {
            undo.push((name.clone(), map.insert(name.clone(), entry)));
            changed.push(name);
        }
        let mut removed = Vec::new();
        for name in removals {
            if let Some(old) = map.remove(&name) {
                undo.push((name.clone(), Some(old)));
                removed.push(name);
            }
        }
        let update = Update { kind, resources, changed, removed, version: response.system_version_info };
        match self.handler.apply(&update) {
            Ok(()) => {
                self.commit(update);
                Ok(())
            }
            Err(reason) => {
                let mut resources = update.resources;
                let map = Arc::make_mut(&mut resources);
                for (name, old) in undo.into_iter().rev() {
                    match old {
                        Some(entry) => map.insert(name, entry),
                        None => map.remove(&name),
                    };
                }
                self.state.entry(kind).or_default().resources = resources;
                Err(reason)
            }
        }
    }

    /// Exactly the response's resources, with what changed relative to the previous state.
    fn sotw_update(&self, kind: ResourceType, response: DiscoveryResponse) -> Result<Update, String> {
        let empty = BTreeMap::new();
        let previous = self.state.get(&kind).map_or(&empty, |s| &*s.resources);
        let mut resources = BTreeMap::new();
        let mut changed = Vec::new();
        for any in response.resources {
            let (name, body) = decode(kind, String::new(), Some(any))?;
            if resources.contains_key(&name) {
                return Err(format!("{kind} resource {name:?} appears twice in one response"));
            }
            if previous.get(&name).is_none_or(|e| e.body != body) {
                changed.push(name.clone());
            }
            resources.insert(name, ResourceEntry { version: response.version_info.clone(), body });
        }
        let removed = previous.keys().filter(|name| !resources.contains_key(*name)).cloned().collect();
        Ok(Update { kind, resources: Arc::new(resources), changed, removed, version: response.version_info })
    }

    /// Makes an accepted update the state of its type.
    fn commit(&mut self, update: Update) {
        let Update { kind, resources, changed, removed, version } = update;
        debug!(
            endpoint = %self.cfg.endpoint, %kind, %version, resources = resources.len(), changed = changed.len(),
            removed = removed.len(), "xDS update accepted"
        );
        let mut resources = resources;
        if !self.cfg.keep_bodies && self.cfg.protocol == Protocol::Delta {
            let map = Arc::make_mut(&mut resources);
            for name in &changed {
                if let Some(e) = map.get_mut(name) {
                    e.body = Bytes::new();
                }
            }
        }
        let state = self.state.entry(kind).or_default();
        state.resources = resources;
        state.version = Some(version.clone());
        self.accepted_on_stream = true;
        self.status.send_modify(|s| {
            s.accepted.insert(kind, version);
        });
    }

    /// Records a NACK and builds its `error_detail`.
    fn reject(&mut self, type_url: &str, nonce: &str, reason: String) -> rpc::Status {
        warn!(endpoint = %self.cfg.endpoint, type_url, nonce, %reason, "xDS response rejected (NACK)");
        let kind = ResourceType::from_type_url(type_url).map_or_else(|| type_url.to_owned(), |k| k.short().to_owned());
        self.last_rejection = Some(format!("{kind}: {reason}"));
        self.status.send_modify(|s| s.nacks += 1);
        rpc::Status { code: INVALID_ARGUMENT, message: reason, details: Vec::new() }
    }

    fn accepted_version(&self, kind: ResourceType) -> String {
        self.state.get(&kind).and_then(|s| s.version.clone()).unwrap_or_default()
    }

    /// The subscribed types without an accepted response yet.
    fn missing(&self) -> Vec<ResourceType> {
        self.types.iter().copied().filter(|t| self.state.get(t).is_none_or(|s| s.version.is_none())).collect()
    }

    fn on_connected(&mut self) {
        info!(endpoint = %self.cfg.endpoint, protocol = %self.cfg.protocol, node = %self.cfg.node_id, "connected to the xDS server");
        self.set_connected(true);
    }

    fn set_connected(&mut self, connected: bool) {
        if self.connected == connected {
            return;
        }
        self.connected = connected;
        self.handler.connected(connected);
        self.status.send_modify(|s| s.connected = connected);
    }

    fn failed(&self, status: &tonic::Status) -> ClientError {
        let mut reason = format!("{:?}: {}", status.code(), status.message());
        if let Some(source) = status.source() {
            reason.push_str(&format!(" ({})", error_chain(source)));
        }
        ClientError::Stream { endpoint: self.cfg.endpoint.clone(), protocol: self.cfg.protocol, reason }
    }

    fn closed(&self) -> ClientError {
        ClientError::Closed { endpoint: self.cfg.endpoint.clone() }
    }
}

/// Checks one resource body against its type and finds its name (the declared one, else the body's own).
fn decode(kind: ResourceType, declared: String, any: Option<Any>) -> Result<(String, Bytes), String> {
    let Some(any) = any else {
        return Err(format!("{kind} resource {declared:?} has no body"));
    };
    if any.type_url != kind.type_url() {
        return Err(format!(
            "{kind} resource {declared:?} has type {:?}, expected {:?}",
            any.type_url,
            kind.type_url()
        ));
    }
    let own = resource_name(kind, &any.value)
        .map_err(|e| format!("{kind} resource {declared:?} does not decode as its type: {e}"))?;
    let name = if declared.is_empty() { own } else { declared };
    if name.is_empty() {
        return Err(format!("a {kind} resource has no name"));
    }
    Ok((name, Bytes::from(any.value)))
}

/// An error and its causes, `a: b: c`: tonic's transport errors say little at the top level.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Cluster;
    use crate::codec;
    use crate::discovery::Resource;
    use crate::discovery::aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    };
    use crate::endpoint::ClusterLoadAssignment;
    use crate::listener::Listener;
    use crate::route::RouteConfiguration;
    use crate::tls::Secret;
    use crate::types::{CLUSTER, LISTENER};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
    use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
    use tonic::{Request, Response, Status, Streaming};

    /// The bound on every wait in these tests: generous, since the machine is shared.
    const WAIT: Duration = Duration::from_secs(10);

    /// One stream opened by the client, as the test sees it: what the client sent, and a way to answer.
    /// Dropping it ends the stream (the server closes it cleanly).
    struct Conn<Req, Resp> {
        requests: UnboundedReceiver<Req>,
        responses: UnboundedSender<Result<Resp, Status>>,
    }

    impl<Req, Resp> Conn<Req, Resp> {
        async fn request(&mut self) -> Req {
            recv(&mut self.requests, "a request from the client").await
        }

        fn respond(&self, response: Resp) {
            self.responses.send(Ok(response)).unwrap_or_else(|_| panic!("the stream is gone"));
        }
    }

    type DeltaConn = Conn<DeltaDiscoveryRequest, DeltaDiscoveryResponse>;
    type SotwConn = Conn<DiscoveryRequest, DiscoveryResponse>;

    /// A scripted ADS server: each stream is handed to the test as a [`Conn`].
    struct FakeAds {
        delta: UnboundedSender<DeltaConn>,
        sotw: UnboundedSender<SotwConn>,
    }

    fn accept<Req: Send + 'static, Resp>(
        mut inbound: Streaming<Req>,
        conns: &UnboundedSender<Conn<Req, Resp>>,
    ) -> UnboundedReceiverStream<Result<Resp, Status>> {
        let (req_tx, requests) = unbounded_channel();
        let (responses, resp_rx) = unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(request)) = inbound.message().await {
                if req_tx.send(request).is_err() {
                    break;
                }
            }
        });
        let _ = conns.send(Conn { requests, responses });
        UnboundedReceiverStream::new(resp_rx)
    }

    #[tonic::async_trait]
    impl AggregatedDiscoveryService for FakeAds {
        type StreamAggregatedResourcesStream = UnboundedReceiverStream<Result<DiscoveryResponse, Status>>;
        type DeltaAggregatedResourcesStream = UnboundedReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

        async fn stream_aggregated_resources(
            &self,
            request: Request<Streaming<DiscoveryRequest>>,
        ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
            Ok(Response::new(accept(request.into_inner(), &self.sotw)))
        }

        async fn delta_aggregated_resources(
            &self,
            request: Request<Streaming<DeltaDiscoveryRequest>>,
        ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
            Ok(Response::new(accept(request.into_inner(), &self.delta)))
        }
    }

    struct Fake {
        endpoint: String,
        delta: UnboundedReceiver<DeltaConn>,
        sotw: UnboundedReceiver<SotwConn>,
        server: JoinHandle<()>,
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            self.server.abort();
        }
    }

    impl Fake {
        async fn start() -> Fake {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
            let endpoint = format!("http://{}", listener.local_addr().expect("local addr"));
            let (delta_tx, delta) = unbounded_channel();
            let (sotw_tx, sotw) = unbounded_channel();
            let service = AggregatedDiscoveryServiceServer::new(FakeAds { delta: delta_tx, sotw: sotw_tx });
            let server = tokio::spawn(async move {
                let _ = tonic::transport::Server::builder()
                    .serve_with_incoming(service, TcpListenerStream::new(listener))
                    .await;
            });
            Fake { endpoint, delta, sotw, server }
        }

        async fn delta_conn(&mut self) -> DeltaConn {
            recv(&mut self.delta, "a Delta stream").await
        }

        async fn sotw_conn(&mut self) -> SotwConn {
            recv(&mut self.sotw, "a SotW stream").await
        }

        fn config(&self, protocol: Protocol, types: &[ResourceType]) -> ClientConfig {
            ClientConfig {
                protocol,
                types: types.to_vec(),
                backoff_min: Duration::from_millis(10),
                backoff_max: Duration::from_millis(50),
                ..ClientConfig::new(&self.endpoint, "node-1", ROLE_PROXY)
            }
        }
    }

    async fn recv<T>(rx: &mut UnboundedReceiver<T>, what: &str) -> T {
        match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(v)) => v,
            Ok(None) => panic!("channel closed while waiting for {what}"),
            Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
        }
    }

    async fn wait_status(status: &mut watch::Receiver<ClientStatus>, what: &str, f: impl FnMut(&ClientStatus) -> bool) {
        let outcome = tokio::time::timeout(WAIT, status.wait_for(f)).await.map(|r| r.is_ok());
        match outcome {
            Ok(true) => {}
            Ok(false) => panic!("client stopped while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}; status: {:?}", *status.borrow()),
        }
    }

    /// Records every update and connection change; rejects any state containing `reject`.
    struct Recorder {
        updates: UnboundedSender<Update>,
        links: UnboundedSender<bool>,
        reject: Option<&'static str>,
    }

    fn recorder(reject: Option<&'static str>) -> (Recorder, UnboundedReceiver<Update>, UnboundedReceiver<bool>) {
        let (updates, updates_rx) = unbounded_channel();
        let (links, links_rx) = unbounded_channel();
        (Recorder { updates, links, reject }, updates_rx, links_rx)
    }

    impl Handler for Recorder {
        fn apply(&mut self, update: &Update) -> Result<(), String> {
            let _ = self.updates.send(update.clone());
            match self.reject {
                Some(bad) if update.resources.contains_key(bad) => Err(format!("{bad} is not acceptable")),
                _ => Ok(()),
            }
        }

        fn connected(&mut self, connected: bool) {
            let _ = self.links.send(connected);
        }
    }

    fn any_of(kind: ResourceType, name: &str) -> Any {
        let name = name.to_owned();
        match kind {
            ResourceType::Secret => codec::pack_any(&Secret { name, ..Default::default() }),
            ResourceType::Cluster => codec::pack_any(&Cluster { name, ..Default::default() }),
            ResourceType::ClusterLoadAssignment => {
                codec::pack_any(&ClusterLoadAssignment { cluster_name: name, ..Default::default() })
            }
            ResourceType::Listener => codec::pack_any(&Listener { name, ..Default::default() }),
            ResourceType::RouteConfiguration => codec::pack_any(&RouteConfiguration { name, ..Default::default() }),
        }
    }

    fn cluster_body(name: &str) -> Bytes {
        Bytes::from(any_of(ResourceType::Cluster, name).value)
    }

    fn delta_resource(name: &str, version: &str) -> Resource {
        Resource {
            name: name.into(),
            version: version.into(),
            resource: Some(any_of(ResourceType::Cluster, name)),
            ..Default::default()
        }
    }

    fn delta_response(
        nonce: &str,
        version: &str,
        resources: Vec<Resource>,
        removed: &[&str],
    ) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            system_version_info: version.into(),
            type_url: CLUSTER.into(),
            resources,
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn sotw_response(nonce: &str, version: &str, names: &[&str]) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: version.into(),
            type_url: CLUSTER.into(),
            resources: names.iter().map(|n| any_of(ResourceType::Cluster, n)).collect(),
            nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn names(update: &Update) -> Vec<&str> {
        update.resources.keys().map(String::as_str).collect()
    }

    fn meta<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
        match node.metadata.as_ref()?.fields.get(key)?.kind.as_ref()? {
            Kind::StringValue(s) => Some(s),
            _ => None,
        }
    }

    fn assert_nack(detail: Option<&rpc::Status>, contains: &str) {
        let detail = detail.expect("a NACK carries error_detail");
        assert_eq!(detail.code, INVALID_ARGUMENT);
        assert!(detail.message.contains(contains), "NACK message {:?} should mention {contains:?}", detail.message);
    }

    #[tokio::test]
    async fn delta_subscribes_to_every_type_with_a_wildcard_and_says_who_it_is() {
        let mut fake = Fake::start().await;
        let mut cfg = fake.config(Protocol::Delta, &ResourceType::ALL);
        cfg.role = ROLE_INGRESS.into();
        cfg.ingress_class = Some("mesh".into());
        let (handler, _updates, mut links) = recorder(None);
        let client = spawn(cfg, handler);
        let mut conn = fake.delta_conn().await;
        for (i, kind) in ResourceType::ALL.into_iter().enumerate() {
            let req = conn.request().await;
            assert_eq!(req.type_url, kind.type_url());
            assert_eq!(req.resource_names_subscribe, vec!["*".to_owned()]);
            assert!(req.initial_resource_versions.is_empty());
            assert!(req.response_nonce.is_empty());
            if i == 0 {
                let node = req.node.expect("the first request carries the node");
                assert_eq!(node.id, "node-1");
                assert_eq!(node.cluster, NODE_CLUSTER);
                assert_eq!(node.user_agent_name, USER_AGENT);
                assert_eq!(meta(&node, NODE_META_ROLE), Some(ROLE_INGRESS));
                assert_eq!(meta(&node, NODE_META_INGRESS_CLASS), Some("mesh"));
            } else {
                assert_eq!(req.node, None, "only the first request of a stream carries the node");
            }
        }
        assert!(recv(&mut links, "connected(true)").await);
        let mut status = client.status();
        wait_status(&mut status, "connected", |s| s.connected).await;
        client.stop().await;
        assert!(!recv(&mut links, "connected(false) on stop").await);
        assert!(!status.borrow().connected);
    }

    #[tokio::test]
    async fn delta_applies_a_response_and_acks_its_nonce() {
        let mut fake = Fake::start().await;
        let (handler, mut updates, _links) = recorder(None);
        let client = spawn(fake.config(Protocol::Delta, &[ResourceType::Cluster]), handler);
        let mut conn = fake.delta_conn().await;
        conn.request().await;
        conn.respond(delta_response("n1", "v1", vec![delta_resource("a", "1"), delta_resource("b", "2")], &[]));

        let update = recv(&mut updates, "the first update").await;
        assert_eq!(update.kind, ResourceType::Cluster);
        assert_eq!(update.version, "v1");
        assert_eq!(update.changed, ["a", "b"]);
        assert!(update.removed.is_empty());
        assert_eq!(update.resources["a"], ResourceEntry { version: "1".into(), body: cluster_body("a") });
        assert_eq!(update.resources["b"].version, "2");

        let ack = conn.request().await;
        assert_eq!(ack.type_url, CLUSTER);
        assert_eq!(ack.response_nonce, "n1");
        assert_eq!(ack.error_detail, None);
        assert!(ack.resource_names_subscribe.is_empty());
        assert_eq!(ack.node, None);
        let mut status = client.status();
        wait_status(&mut status, "v1 accepted", |s| s.accepted.get(&ResourceType::Cluster).is_some_and(|v| v == "v1"))
            .await;
        assert_eq!(status.borrow().nacks, 0);
        assert!(status.borrow().is_loaded(&[ResourceType::Cluster]));
        client.stop().await;
    }

    #[tokio::test]
    async fn delta_nack_keeps_the_previous_state() {
        let mut fake = Fake::start().await;
        let (handler, mut updates, _links) = recorder(Some("bad"));
        let client = spawn(fake.config(Protocol::Delta, &[ResourceType::Cluster]), handler);
        let mut conn = fake.delta_conn().await;
        conn.request().await;
        conn.respond(delta_response("n1", "v1", vec![delta_resource("a", "1")], &[]));
        recv(&mut updates, "v1").await;
        assert_eq!(conn.request().await.error_detail, None);

        conn.respond(delta_response("n2", "v2", vec![delta_resource("bad", "1")], &[]));
        let rejected = recv(&mut updates, "v2").await;
        assert_eq!(names(&rejected), ["a", "bad"]);
        let nack = conn.request().await;
        assert_eq!(nack.response_nonce, "n2");
        assert_nack(nack.error_detail.as_ref(), "bad is not acceptable");
        assert_eq!(nack.error_detail.map(|d| d.message), Some("bad is not acceptable".to_owned()));
        let mut status = client.status();
        wait_status(&mut status, "one NACK", |s| s.nacks == 1).await;
        assert_eq!(status.borrow().accepted[&ResourceType::Cluster], "v1");

        conn.respond(delta_response("n3", "v3", vec![delta_resource("c", "1")], &[]));
        let next = recv(&mut updates, "v3").await;
        assert_eq!(names(&next), ["a", "c"], "built on the last accepted state, without the rejected resource");
        assert_eq!(next.changed, ["c"]);
        let ack = conn.request().await;
        assert_eq!((ack.response_nonce.as_str(), ack.error_detail), ("n3", None));
        wait_status(&mut status, "v3 accepted", |s| s.accepted[&ResourceType::Cluster] == "v3").await;
        client.stop().await;
    }

    #[tokio::test]
    async fn without_kept_bodies_only_names_and_versions_stay() {
        let mut fake = Fake::start().await;
        let (handler, mut updates, _links) = recorder(None);
        let mut cfg = fake.config(Protocol::Delta, &[ResourceType::Cluster]);
        cfg.keep_bodies = false;
        let client = spawn(cfg, handler);
        let mut conn = fake.delta_conn().await;
        conn.request().await;
        conn.respond(delta_response("n1", "v1", vec![delta_resource("a", "va")], &[]));
        let first = recv(&mut updates, "v1").await;
        assert!(!first.resources["a"].body.is_empty(), "the handler sees what it must convert");
        conn.request().await;

        conn.respond(delta_response("n2", "v2", vec![delta_resource("c", "vc")], &[]));
        let next = recv(&mut updates, "v2").await;
        assert_eq!(next.changed, ["c"]);
        assert!(!next.resources["c"].body.is_empty());
        assert!(next.resources["a"].body.is_empty(), "an accepted body is not kept");
        assert_eq!(next.resources["a"].version, "va");
        conn.request().await;

        // What a Delta client needs to resume is still there.
        drop(conn);
        let mut conn = fake.delta_conn().await;
        let first = conn.request().await;
        let expected: HashMap<String, String> = [("a".into(), "va".into()), ("c".into(), "vc".into())].into();
        assert_eq!(first.initial_resource_versions, expected);
        client.stop().await;
    }

    #[tokio::test]
    async fn delta_removes_resources() {
        let mut fake = Fake::start().await;
        let (handler, mut updates, _links) = recorder(None);
        let client = spawn(fake.config(Protocol::Delta, &[ResourceType::Cluster]), handler);
        let mut conn = fake.delta_conn().await;
        conn.request().await;
        conn.respond(delta_response("n1", "v1", vec![delta_resource("a", "1"), delta_resource("b", "1")], &[]));
        recv(&mut updates, "v1").await;
        conn.request().await;

        conn.respond(delta_response("n2", "v2", vec![], &["a", "never-seen"]));
        let update = recv(&mut updates, "v2").await;
        assert_eq!(update.removed, ["a"], "only resources we had count as removed");
        assert!(update.changed.is_empty());
        assert_eq!(names(&update), ["b"]);
        let ack = conn.request().await;
        assert_eq!((ack.response_nonce.as_str(), ack.error_detail), ("n2", None));
        client.stop().await;
    }

    #[tokio::test]
    async fn delta_reconnect_announces_the_accepted_versions() {
        let mut fake = Fake::start().await;
        let (handler, mut updates, mut links) = recorder(None);
        let client = spawn(fake.config(Protocol::Delta, &[ResourceType::Cluster, ResourceType::Listener]), handler);
        let mut conn = fake.delta_conn().await;
        conn.request().await;
        conn.request().await;
        assert!(recv(&mut links, "connected(true)").await);
        conn.respond(delta_response("n1", "v1", vec![delta_resource("a", "va"), delta_resource("b", "vb")], &[]));
        recv(&mut updates, "v1").await;
        conn.request().await;

        drop(conn);
        assert!(!recv(&mut links, "connected(false) after the server ended the stream").await);
        let mut conn = fake.delta_conn().await;
        let first = conn.request().await;
        assert_eq!(first.type_url, CLUSTER);
        assert!(first.node.is_some(), "a new stream names the node again");
        assert_eq!(first.resource_names_subscribe, vec!["*".to_owned()]);
        let expected: HashMap<String, String> = [("a".into(), "va".into()), ("b".into(), "vb".into())].into();
        assert_eq!(first.initial_resource_versions, expected);
        let second = conn.request().await;
        assert_eq!(second.type_url, LISTENER);
        assert!(second.initial_resource_versions.is_empty());
        assert!(recv(&mut links, "connected(true) again").await);
        let status = client.status();
        assert_eq!(status.borrow().accepted[&ResourceType::Cluster], "v1", "state survives a reconnect");
        client.stop().await;
    }

    #[tokio::test]
    async fn sotw_ack_and_nack_carry_the_right_version() {
        let mut fake = Fake::start().await;
        let (handler, mut updates, _links) = recorder(Some("bad"));
        let client = spawn(fake.config(Protocol::Sotw, &[ResourceType::Cluster]), handler);
        let mut conn = fake.sotw_conn().await;
        let first = conn.request().await;
        assert_eq!(first.type_url, CLUSTER);
        assert!(first.resource_names.is_empty(), "wildcard");
        assert_eq!(first.version_info, "");
        assert!(first.node.as_ref().is_some_and(|n| meta(n, NODE_META_ROLE) == Some(ROLE_PROXY)));

        conn.respond(sotw_response("n1", "v1", &["a", "b"]));
        let update = recv(&mut updates, "v1").await;
        assert_eq!(update.changed, ["a", "b"]);
        assert_eq!(update.resources["a"], ResourceEntry { version: "v1".into(), body: cluster_body("a") });
        let ack = conn.request().await;
        assert_eq!((ack.version_info.as_str(), ack.response_nonce.as_str()), ("v1", "n1"));
        assert_eq!(ack.error_detail, None);
        assert_eq!(ack.node, None);

        conn.respond(sotw_response("n2", "v2", &["a", "bad"]));
        recv(&mut updates, "v2").await;
        let nack = conn.request().await;
        assert_eq!((nack.version_info.as_str(), nack.response_nonce.as_str()), ("v1", "n2"));
        assert_nack(nack.error_detail.as_ref(), "bad is not acceptable");

        conn.respond(sotw_response("n3", "v3", &["a"]));
        let update = recv(&mut updates, "v3").await;
        assert_eq!(names(&update), ["a"], "a SotW response is the whole set");
        assert!(update.changed.is_empty(), "a is unchanged since v1");
        assert_eq!(update.removed, ["b"]);
        let ack = conn.request().await;
        assert_eq!((ack.version_info.as_str(), ack.response_nonce.as_str()), ("v3", "n3"));

        drop(conn);
        let mut conn = fake.sotw_conn().await;
        let first = conn.request().await;
        assert_eq!(first.version_info, "v3", "a reconnect announces the last accepted version");
        assert!(first.node.is_some());
        let status = client.status();
        assert_eq!(status.borrow().nacks, 1);
        client.stop().await;
    }

    #[tokio::test]
    async fn malformed_responses_are_nacked_without_calling_the_handler() {
        let mut fake = Fake::start().await;
        let (handler, mut updates, _links) = recorder(None);
        let client = spawn(fake.config(Protocol::Delta, &[ResourceType::Cluster]), handler);
        let mut conn = fake.delta_conn().await;
        conn.request().await;

        // Field 1 (name), length 5, but no bytes follow.
        let garbage = Any { type_url: CLUSTER.into(), value: vec![0x0a, 0x05] };
        let undecodable =
            Resource { name: "x".into(), version: "1".into(), resource: Some(garbage), ..Default::default() };
        conn.respond(delta_response("n1", "v1", vec![undecodable], &[]));
        let nack = conn.request().await;
        assert_eq!(nack.response_nonce, "n1");
        assert_nack(nack.error_detail.as_ref(), "\"x\" does not decode");

        let mistyped =
            Resource { name: "y".into(), resource: Some(any_of(ResourceType::Listener, "y")), ..Default::default() };
        conn.respond(delta_response("n2", "v2", vec![mistyped], &[]));
        let nack = conn.request().await;
        assert_eq!(nack.response_nonce, "n2");
        assert_nack(nack.error_detail.as_ref(), LISTENER);

        conn.respond(DeltaDiscoveryResponse {
            type_url: "type.googleapis.com/x.Y".into(),
            ..delta_response("n3", "v3", vec![], &[])
        });
        let nack = conn.request().await;
        assert_eq!((nack.type_url.as_str(), nack.response_nonce.as_str()), ("type.googleapis.com/x.Y", "n3"));
        assert_nack(nack.error_detail.as_ref(), "unknown resource type");

        conn.respond(delta_response("n4", "v4", vec![delta_resource("a", "1")], &[]));
        let update = recv(&mut updates, "the first good update").await;
        assert_eq!(update.version, "v4", "the handler saw none of the malformed responses");
        assert_eq!(names(&update), ["a"]);
        let mut status = client.status();
        wait_status(&mut status, "v4 accepted after three NACKs", |s| {
            s.nacks == 3 && s.accepted.get(&ResourceType::Cluster).is_some_and(|v| v == "v4")
        })
        .await;
        client.stop().await;
    }

    #[tokio::test]
    async fn fetch_once_returns_every_type() {
        let mut fake = Fake::start().await;
        let cfg = fake.config(Protocol::Delta, &ResourceType::ALL);
        let fetch = tokio::spawn(fetch_once(cfg, WAIT));
        let mut conn = fake.delta_conn().await;
        for (i, kind) in ResourceType::ALL.into_iter().enumerate() {
            let req = conn.request().await;
            assert_eq!(req.type_url, kind.type_url());
            // The name travels only in the body: the client finds it there.
            let resource =
                Resource { version: "1".into(), resource: Some(any_of(kind, kind.short())), ..Default::default() };
            conn.respond(DeltaDiscoveryResponse {
                type_url: kind.type_url().into(),
                resources: vec![resource],
                nonce: format!("n{i}"),
                ..Default::default()
            });
        }
        let all = tokio::time::timeout(WAIT, fetch).await.expect("fetch_once in time").expect("task").expect("fetch");
        assert_eq!(all.len(), 5);
        for kind in ResourceType::ALL {
            let names: Vec<&str> = all[&kind].keys().map(String::as_str).collect();
            assert_eq!(names, [kind.short()]);
        }
    }

    #[tokio::test]
    async fn fetch_once_says_what_failed() {
        let fake = Fake::start().await;
        let cfg = fake.config(Protocol::Delta, &[ResourceType::Cluster, ResourceType::Listener]);
        // The server accepts the stream and never answers (the test keeps the stream open in `fake`).
        let err = fetch_once(cfg, Duration::from_millis(300)).await.expect_err("nothing was sent");
        assert!(
            matches!(&err, ClientError::Timeout { missing, .. } if missing == &[ResourceType::Cluster, ResourceType::Listener])
        );
        assert!(err.to_string().contains("cds, lds"), "{err}");

        let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let endpoint = format!("http://{}", closed.local_addr().expect("addr"));
        drop(closed);
        let err = fetch_once(ClientConfig::new(endpoint, "n", ROLE_PROXY), WAIT).await.expect_err("nothing listens");
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");

        for bad in ["127.0.0.1:1", "https://x:1", "http://"] {
            let err = ClientConfig::new(bad, "n", ROLE_PROXY).validate().expect_err(bad);
            assert!(matches!(err, ClientError::InvalidEndpoint { .. }), "{bad}: {err}");
        }
    }

    /// Keeps every offered state (so the client must copy before editing) and rejects any containing `bad`.
    struct Keeper {
        kept: Vec<Arc<BTreeMap<String, ResourceEntry>>>,
    }

    impl Handler for Keeper {
        fn apply(&mut self, update: &Update) -> Result<(), String> {
            self.kept.push(update.resources.clone());
            if update.resources.contains_key("bad") { Err("bad".into()) } else { Ok(()) }
        }
    }

    #[test]
    fn a_rejected_delta_restores_the_state_exactly_and_never_edits_a_shared_map() {
        let (status, _rx) = watch::channel(ClientStatus::default());
        let cfg =
            ClientConfig { types: vec![ResourceType::Cluster], ..ClientConfig::new("http://x:1", "n", ROLE_PROXY) };
        let mut core = Core::new(cfg, Keeper { kept: Vec::new() }, status);
        let ack =
            core.on_delta(delta_response("n1", "v1", vec![delta_resource("a", "1"), delta_resource("b", "1")], &[]));
        assert_eq!(ack.error_detail, None);
        let v1 = core.state[&ResourceType::Cluster].resources.clone();

        // Changes a, adds bad, removes b: all three must be undone.
        let nack = core.on_delta(delta_response(
            "n2",
            "v2",
            vec![delta_resource("a", "2"), delta_resource("bad", "1")],
            &["b"],
        ));
        assert!(nack.error_detail.is_some());
        assert_eq!(core.state[&ResourceType::Cluster].resources, v1);
        assert_eq!(core.accepted_version(ResourceType::Cluster), "v1");

        let ack = core.on_delta(delta_response("n3", "v3", vec![delta_resource("c", "1")], &["a"]));
        assert_eq!(ack.error_detail, None);
        let names: Vec<&str> = core.state[&ResourceType::Cluster].resources.keys().map(String::as_str).collect();
        assert_eq!(names, ["b", "c"]);
        let kept: Vec<Vec<&str>> = core.handler.kept.iter().map(|m| m.keys().map(String::as_str).collect()).collect();
        assert_eq!(kept, [vec!["a", "b"], vec!["a", "bad"], vec!["b", "c"]], "maps a handler kept never change");
        assert_eq!(core.handler.kept[0]["a"].version, "1");
    }

    #[test]
    fn backoff_is_jittered_doubles_and_resets() {
        let (min, max) = (Duration::from_millis(100), Duration::from_millis(1000));
        let mut b = Backoff::new(min, max);
        assert_eq!(b.next_delay(), min, "the first wait is the minimum");
        for cap in [200, 400, 800, 1000, 1000] {
            let d = b.next_delay();
            assert!(d >= min && d <= Duration::from_millis(cap), "{d:?} within [{min:?}, {cap} ms]");
        }
        b.reset();
        assert_eq!(b.next_delay(), min);
        let mut inverted = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(inverted.next_delay(), Duration::from_secs(2), "max below min is raised to min");
    }

    #[test]
    fn protocol_parses() {
        assert_eq!("Delta".parse::<Protocol>().ok(), Some(Protocol::Delta));
        assert_eq!("sotw".parse::<Protocol>().ok(), Some(Protocol::Sotw));
        assert!(matches!("rest".parse::<Protocol>(), Err(ClientError::UnknownProtocol(_))));
        assert_eq!(Protocol::default(), Protocol::Delta);
    }
}

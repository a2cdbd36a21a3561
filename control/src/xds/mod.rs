//! The Aggregated Discovery Service: the snapshot, pushed to every proxy over gRPC (Envoy's xDS v3), both
//! State of the World and Delta.
//!
//! Each stream runs one task holding a protocol state machine ([`sotw::SotwStream`], [`delta::DeltaStream`]);
//! the snapshot comes from one `watch` channel written by the control loop. A change wakes every stream, which
//! waits a short debounce (so a burst of changes becomes one push), takes the latest snapshot and sends only what
//! its client lacks. Resources are encoded once, by translation; a stream copies their bytes into its response
//! (prost's `Any` owns a `Vec`), never re-encodes them.
//!
//! A client says who it is in its first request's `node`: `metadata.role` is `proxy` or `ingress` (with
//! `metadata.ingressClass`, default `mesh`); it gets only its role's resources. Nothing is sent before the
//! sources have loaded: a stream waits for the first snapshot.
//!
//! A node proxy (`node.id` = its node name) also gets its own Node's locality (`node/{name}`, see
//! `xds_proto::names::node_locality`), so it learns its zone without being told. The same port serves
//! `mesh.v1.Inspect` ([`inspect`]): the problem list, for `meshctl routes --control`.

pub mod delta;
pub mod inspect;
pub mod sotw;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mesh_runtime::Shutdown;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};
use xds_proto::client::{NODE_META_INGRESS_CLASS, NODE_META_ROLE};
use xds_proto::core::Node;
use xds_proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use xds_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse};
use xds_proto::names::{ROLE_INGRESS, ROLE_PROXY};
use xds_proto::types::ResourceType;

use crate::translate::{Role, RoleSnapshot, Snapshot};

/// Why the xDS server could not start.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    /// The address could not be bound.
    #[error("cannot listen for xDS on {addr}: {source} (is the port in use?)")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS settings are unusable.
    #[error("xDS TLS settings: {0} (check the certificate, key and client CA files are PEM)")]
    Tls(String),
}

/// What a request says about an earlier response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ack {
    /// The client applied it.
    Ack {
        /// Its type.
        kind: ResourceType,
        /// Its nonce.
        nonce: String,
    },
    /// The client rejected it and keeps what it had.
    Nack {
        /// Its type.
        kind: ResourceType,
        /// Its nonce.
        nonce: String,
        /// The client's reason (`error_detail.message`).
        detail: String,
    },
    /// It answers a response that was superseded (SotW): ignored.
    Stale {
        /// Its type.
        kind: ResourceType,
        /// Its nonce.
        nonce: String,
    },
    /// The type is not one we serve.
    UnknownType(String),
}

/// Which part of a type's change a push carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Additions and updates only; what is gone stays for now.
    Updates,
    /// Removals only.
    Removals,
    /// Both.
    Everything,
}

impl Pass {
    fn updates(self) -> bool {
        self != Pass::Removals
    }
    fn removals(self) -> bool {
        self != Pass::Updates
    }
}

/// The order of a push that never black-holes traffic: Secrets, Clusters and endpoints are added before the
/// Listeners and Routes that use them; Listeners and Routes are updated (and removed); only then are Clusters,
/// endpoints and Secrets removed.
pub fn passes() -> [(ResourceType, Pass); 8] {
    use ResourceType::*;
    [
        (Secret, Pass::Updates),
        (Cluster, Pass::Updates),
        (ClusterLoadAssignment, Pass::Updates),
        (Listener, Pass::Everything),
        (RouteConfiguration, Pass::Everything),
        (ClusterLoadAssignment, Pass::Removals),
        (Cluster, Pass::Removals),
        (Secret, Pass::Removals),
    ]
}

/// Labels of per-role metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    /// `proxy` or `ingress`.
    pub role: String,
}

/// Labels of per-type metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    /// `lds`, `cds`, `eds`, `rds`, `sds`.
    pub r#type: String,
}

/// The control plane's xDS metrics.
#[derive(Debug, Clone)]
pub struct XdsMetrics {
    clients: Family<RoleLabels, Gauge>,
    pushes: Family<TypeLabels, Counter>,
    nacks: Family<TypeLabels, Counter>,
    push_latency: Histogram,
    snapshot_resources: Family<RoleLabels, Gauge>,
    snapshot_bytes: Gauge,
}

impl Default for XdsMetrics {
    fn default() -> Self {
        XdsMetrics {
            clients: Family::default(),
            pushes: Family::default(),
            nacks: Family::default(),
            push_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            snapshot_resources: Family::default(),
            snapshot_bytes: Gauge::default(),
        }
    }
}

impl XdsMetrics {
    /// Registers every metric (names get the registry's prefix, `mesh_` by convention).
    pub fn register(&self, r: &mut Registry) {
        r.register("xds_clients", "Connected xDS clients, by role", self.clients.clone());
        r.register("xds_pushes", "xDS responses sent, by type", self.pushes.clone());
        r.register("xds_nacks", "xDS responses rejected by a client, by type", self.nacks.clone());
        r.register(
            "xds_push_latency_seconds",
            "Time from a snapshot change reaching a stream to its responses being queued",
            self.push_latency.clone(),
        );
        r.register("snapshot_resources", "Resources in the current snapshot, by role", self.snapshot_resources.clone());
        r.register("snapshot_bytes", "Encoded size of the current snapshot (all roles)", self.snapshot_bytes.clone());
    }

    /// Records the size of a new snapshot.
    pub fn observe_snapshot(&self, s: &Snapshot) {
        self.snapshot_resources.get_or_create(&RoleLabels { role: ROLE_PROXY.into() }).set(s.proxy.len() as i64);
        let ingress: usize = s.ingress.values().map(RoleSnapshot::len).sum();
        self.snapshot_resources.get_or_create(&RoleLabels { role: ROLE_INGRESS.into() }).set(ingress as i64);
        let bytes: usize = std::iter::once(&s.proxy)
            .chain(s.ingress.values())
            .flat_map(|r| ResourceType::ALL.into_iter().flat_map(move |t| r.get(t).values().map(|x| x.body.len())))
            .sum();
        self.snapshot_bytes.set(bytes as i64);
    }
}

/// A connected client, as `/debug/clients` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ClientInfo {
    /// `node.id`.
    pub node: String,
    /// The role it asked for.
    pub role: String,
    /// `sotw` or `delta`.
    pub protocol: &'static str,
    /// Its address.
    pub peer: String,
    /// When it connected (seconds since the epoch).
    pub connected_at: u64,
    /// Last ACKed nonce per type.
    pub acked: BTreeMap<String, String>,
    /// How many responses it rejected.
    pub nacks: u64,
    /// The last rejection, with its reason.
    pub last_nack: Option<String>,
}

/// Settings of the xDS server.
#[derive(Debug, Clone)]
pub struct XdsConfig {
    /// How long a stream waits after a change before pushing, so a burst becomes one push.
    pub debounce: Duration,
    /// Serve over TLS (rustls) instead of plain HTTP/2.
    pub tls: Option<ServerTls>,
    /// How many large pushes (over [`LARGE_PUSH`] bytes: initial snapshots) may be in flight at once. A
    /// thousand proxies reconnecting after a control-plane restart would otherwise each hold a full copy of the
    /// snapshot in flight, at once.
    pub large_pushes: usize,
}

/// A push larger than this waits for one of [`XdsConfig::large_pushes`] permits.
pub const LARGE_PUSH: usize = 1 << 20;

impl Default for XdsConfig {
    fn default() -> Self {
        XdsConfig { debounce: Duration::from_millis(20), tls: None, large_pushes: 4 }
    }
}

/// TLS for the xDS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// PEM certificate chain of the server.
    pub cert_pem: Vec<u8>,
    /// PEM private key of the server.
    pub key_pem: Vec<u8>,
    /// PEM of the CA client certificates must chain to; when set, a client without a valid certificate is
    /// refused during the handshake (the snapshot holds TLS keys, so who may read it matters).
    pub client_ca_pem: Option<Vec<u8>>,
}

/// The ADS service.
#[derive(Debug, Clone)]
pub struct XdsServer {
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    cfg: XdsConfig,
    metrics: XdsMetrics,
    clients: Arc<Mutex<BTreeMap<u64, ClientInfo>>>,
    next_id: Arc<AtomicU64>,
    large: Arc<Semaphore>,
}

impl XdsServer {
    /// A server of the snapshots published on `snapshots`.
    pub fn new(snapshots: watch::Receiver<Option<Arc<Snapshot>>>, cfg: XdsConfig, metrics: XdsMetrics) -> Self {
        let large = Arc::new(Semaphore::new(cfg.large_pushes.max(1)));
        XdsServer { snapshots, cfg, metrics, clients: Arc::default(), next_id: Arc::default(), large }
    }

    /// The connected clients, for `/debug/clients`.
    pub fn clients(&self) -> Vec<ClientInfo> {
        self.clients.lock().map(|c| c.values().cloned().collect()).unwrap_or_default()
    }

    /// Binds `addr` and serves until `shutdown`; returns the bound address.
    pub async fn serve(
        self,
        addr: SocketAddr,
        shutdown: Shutdown,
    ) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), XdsError> {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| XdsError::Bind { addr, source })?;
        let bound = listener.local_addr().map_err(|source| XdsError::Bind { addr, source })?;
        let tls_cfg = self.cfg.tls.clone();
        let inspect = inspect::InspectServer::new(self.snapshots.clone());
        let svc = AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(256 << 20);
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &tls_cfg {
            let mut cfg = tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem));
            if let Some(ca) = &tls.client_ca_pem {
                cfg = cfg.client_ca_root(tonic::transport::Certificate::from_pem(ca));
            }
            builder = builder.tls_config(cfg).map_err(|e| XdsError::Tls(e.to_string()))?;
        }
        let tls = tls_cfg.is_some();
        let task = tokio::spawn(async move {
            let result = builder
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .http2_keepalive_timeout(Some(Duration::from_secs(20)))
                .add_service(svc)
                .add_service(inspect)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move { shutdown.wait().await })
                .await;
            if let Err(e) = result {
                warn!("xDS server stopped: {e}");
            }
        });
        info!(%bound, tls, "xDS (ADS) serving");
        Ok((bound, task))
    }

    fn register(&self, node: &Node, role: &Role, protocol: &'static str, peer: Option<SocketAddr>) -> ClientGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let role_name = match role {
            Role::Proxy => ROLE_PROXY.to_owned(),
            Role::Ingress { .. } => ROLE_INGRESS.to_owned(),
        };
        let info = ClientInfo {
            node: node.id.clone(),
            role: role.to_string(),
            protocol,
            peer: peer.map(|p| p.to_string()).unwrap_or_default(),
            connected_at: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            acked: BTreeMap::new(),
            nacks: 0,
            last_nack: None,
        };
        info!(node = %node.id, %role, protocol, peer = %info.peer, "xDS client connected");
        if let Ok(mut c) = self.clients.lock() {
            c.insert(id, info);
        }
        let gauge = self.metrics.clients.get_or_create(&RoleLabels { role: role_name }).clone();
        gauge.inc();
        ClientGuard { id, clients: self.clients.clone(), gauge }
    }

    fn record(&self, id: u64, ack: &Ack) {
        match ack {
            Ack::Ack { kind, nonce } => {
                if let Ok(mut c) = self.clients.lock()
                    && let Some(info) = c.get_mut(&id)
                {
                    info.acked.insert(kind.short().to_owned(), nonce.clone());
                }
            }
            Ack::Nack { kind, nonce, detail } => {
                self.metrics.nacks.get_or_create(&TypeLabels { r#type: kind.short().into() }).inc();
                let node = if let Ok(mut c) = self.clients.lock()
                    && let Some(info) = c.get_mut(&id)
                {
                    info.nacks += 1;
                    info.last_nack = Some(format!("{kind} nonce {nonce}: {detail}"));
                    info.node.clone()
                } else {
                    String::new()
                };
                warn!(%node, r#type = %kind, %nonce, "client rejected the resources (NACK): {detail}");
            }
            Ack::Stale { kind, nonce } => debug!(r#type = %kind, %nonce, "stale nonce ignored"),
            Ack::UnknownType(url) => warn!(type_url = %url, "request for a type we do not serve; ignored"),
        }
    }
}

/// Removes a client from the registry when its stream ends.
struct ClientGuard {
    id: u64,
    clients: Arc<Mutex<BTreeMap<u64, ClientInfo>>>,
    gauge: Gauge,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        if let Ok(mut c) = self.clients.lock()
            && let Some(info) = c.remove(&self.id)
        {
            info!(node = %info.node, "xDS client disconnected");
        }
        self.gauge.dec();
    }
}

/// The role a node asks for, from `node.metadata`.
pub fn role_of(node: &Node) -> Result<Role, Status> {
    use xds_proto::protobuf::value::Kind;
    let field = |k: &str| {
        node.metadata.as_ref().and_then(|m| m.fields.get(k)).and_then(|v| match &v.kind {
            Some(Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
    };
    match field(NODE_META_ROLE).as_deref() {
        Some(ROLE_PROXY) => Ok(Role::Proxy),
        Some(ROLE_INGRESS) => Ok(Role::Ingress {
            class: field(NODE_META_INGRESS_CLASS).unwrap_or_else(|| xds_proto::DEFAULT_INGRESS_CLASS.into()),
        }),
        Some(other) => Err(Status::invalid_argument(format!(
            "node.metadata.role {other:?} is not one of {ROLE_PROXY:?}, {ROLE_INGRESS:?}"
        ))),
        None => Err(Status::invalid_argument(
            "node.metadata.role is missing: set it to \"proxy\" (node proxy) or \"ingress\" (with ingressClass)",
        )),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The state machine a stream runs, SotW or Delta, behind one driver.
trait Machine: Send + 'static {
    type Req: Send + 'static;
    type Resp: Send + 'static;
    const NAME: &'static str;
    fn node(req: &Self::Req) -> Option<&Node>;
    fn on_request(&mut self, req: &Self::Req, snap: Option<&RoleSnapshot>) -> (Option<Ack>, Vec<Self::Resp>);
    fn on_snapshot(&mut self, snap: &RoleSnapshot) -> Vec<Self::Resp>;
    fn kind_of(resp: &Self::Resp) -> Option<ResourceType>;
    fn size(resp: &Self::Resp) -> usize;
}

impl Machine for sotw::SotwStream {
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponse;
    const NAME: &'static str = "sotw";
    fn node(req: &Self::Req) -> Option<&Node> {
        req.node.as_ref()
    }
    fn on_request(&mut self, req: &Self::Req, snap: Option<&RoleSnapshot>) -> (Option<Ack>, Vec<Self::Resp>) {
        sotw::SotwStream::on_request(self, req, snap)
    }
    fn on_snapshot(&mut self, snap: &RoleSnapshot) -> Vec<Self::Resp> {
        sotw::SotwStream::on_snapshot(self, snap)
    }
    fn kind_of(resp: &Self::Resp) -> Option<ResourceType> {
        ResourceType::from_type_url(&resp.type_url)
    }
    fn size(resp: &Self::Resp) -> usize {
        prost::Message::encoded_len(resp)
    }
}

impl Machine for delta::DeltaStream {
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;
    const NAME: &'static str = "delta";
    fn node(req: &Self::Req) -> Option<&Node> {
        req.node.as_ref()
    }
    fn on_request(&mut self, req: &Self::Req, snap: Option<&RoleSnapshot>) -> (Option<Ack>, Vec<Self::Resp>) {
        delta::DeltaStream::on_request(self, req, snap)
    }
    fn on_snapshot(&mut self, snap: &RoleSnapshot) -> Vec<Self::Resp> {
        delta::DeltaStream::on_snapshot(self, snap)
    }
    fn kind_of(resp: &Self::Resp) -> Option<ResourceType> {
        ResourceType::from_type_url(&resp.type_url)
    }
    fn size(resp: &Self::Resp) -> usize {
        prost::Message::encoded_len(resp)
    }
}

impl XdsServer {
    /// Runs one stream: the first request names the client; then requests and snapshot changes drive the
    /// machine until either side goes away.
    fn drive<M: Machine>(&self, mut machine: M, request: Request<Streaming<M::Req>>) -> BoxStream<M::Resp>
    where
        M::Req: prost::Message + Default,
    {
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Outgoing<M::Resp>>(2);
        let server = self.clone();
        let mut snapshots = self.snapshots.clone();
        tokio::spawn(async move {
            let first = match inbound.message().await {
                Ok(Some(r)) => r,
                _ => return,
            };
            let Some(node) = M::node(&first).cloned() else {
                let _ = tx.send((Err(Status::invalid_argument("the first request must carry node")), None)).await;
                return;
            };
            let role = match role_of(&node) {
                Ok(r) => r,
                Err(e) => {
                    warn!(node = %node.id, "xDS client refused: {}", e.message());
                    let _ = tx.send((Err(e), None)).await;
                    return;
                }
            };
            let guard = server.register(&node, &role, M::NAME, peer);
            let current =
                |w: &watch::Receiver<Option<Arc<Snapshot>>>| w.borrow().as_ref().map(|s| s.for_client(&role, &node.id));
            let mut snap = current(&snapshots);
            snapshots.borrow_and_update();
            let mut req = Some(first);
            loop {
                if let Some(r) = req.take() {
                    let permit = server.permit().await;
                    let (ack, out) = machine.on_request(&r, snap.as_ref());
                    if let Some(ack) = ack {
                        server.record(guard.id, &ack);
                    }
                    if !server.send_all::<M>(&tx, out, permit).await {
                        return;
                    }
                }
                tokio::select! {
                    msg = inbound.message() => match msg {
                        Ok(Some(r)) => req = Some(r),
                        Ok(None) => return,
                        Err(e) => {
                            debug!(node = %node.id, "xDS stream ended: {e}");
                            return;
                        }
                    },
                    changed = snapshots.changed() => {
                        if changed.is_err() {
                            return; // the control loop is gone: shutting down
                        }
                        tokio::time::sleep(server.cfg.debounce).await;
                        let started = Instant::now();
                        let Some(latest) = current(&snapshots) else { continue };
                        snapshots.borrow_and_update();
                        let permit = server.permit().await;
                        let out = machine.on_snapshot(&latest);
                        let pushed = !out.is_empty();
                        if !server.send_all::<M>(&tx, out, permit).await {
                            return;
                        }
                        if pushed {
                            server.metrics.push_latency.observe(started.elapsed().as_secs_f64());
                        }
                        // A client that subscribed before the first snapshot gets its answers now.
                        snap = Some(latest);
                    }
                }
            }
        });
        Box::pin(PermitStream { rx, held: None })
    }

    /// A permit to build a push; kept through the push only if it turns out large (see [`LARGE_PUSH`]).
    async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        self.large.clone().acquire_owned().await.ok()
    }

    async fn send_all<M: Machine>(
        &self,
        tx: &mpsc::Sender<Outgoing<M::Resp>>,
        out: Vec<M::Resp>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> bool {
        // A small push lets the permit go at once; a large one keeps it until its last response has been taken
        // for encoding, which bounds how many full snapshots are in flight.
        let large = out.iter().map(M::size).sum::<usize>() > LARGE_PUSH;
        let mut permit = if large { permit } else { None };
        let last = out.len().saturating_sub(1);
        for (i, resp) in out.into_iter().enumerate() {
            if let Some(kind) = M::kind_of(&resp) {
                self.metrics.pushes.get_or_create(&TypeLabels { r#type: kind.short().into() }).inc();
            }
            let p = if i == last { permit.take() } else { None };
            if tx.send((Ok(resp), p)).await.is_err() {
                return false;
            }
        }
        true
    }
}

/// A response on its way to tonic, with the large-push permit its push holds (on the last response only).
type Outgoing<T> = (Result<T, Status>, Option<OwnedSemaphorePermit>);

/// The response stream tonic encodes from. It drops a push's permit when tonic asks for the next response,
/// that is, once the last response of the push has been encoded and handed to the connection.
struct PermitStream<T> {
    rx: mpsc::Receiver<Outgoing<T>>,
    held: Option<OwnedSemaphorePermit>,
}

impl<T> Stream for PermitStream<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        self.held = None;
        match self.rx.poll_recv(cx) {
            std::task::Poll::Ready(Some((item, permit))) => {
                self.held = permit;
                std::task::Poll::Ready(Some(item))
            }
            std::task::Poll::Ready(None) => std::task::Poll::Ready(None),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServer {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Ok(Response::new(self.drive(sotw::SotwStream::new(), request)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Ok(Response::new(self.drive(delta::DeltaStream::new(), request)))
    }
}

#[cfg(test)]
mod tests;

//! xDS at cluster scale: one control plane, 10,000 Services (20,000 ports) with 100,000 endpoints, and 1,000
//! simulated Delta clients of role `proxy` on loopback.
//!
//! Measures: the control plane's memory, the time for every client to receive the initial snapshot, the time from
//! one EndpointSlice change until every client has it (p50/p99/max), and the bytes each client is sent for it.
//!
//! Run: `cargo bench -p mesh-control --bench xds_scale` (`MESH_SCALE_CLIENTS`, `MESH_SCALE_SERVICES` shrink it).
//!
//! A simulated client is a raw ADS stream that subscribes to everything, ACKs every response and keeps nothing
//! but counts, so the figures are the server's: a real proxy's own work is measured in its own benchmarks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mesh_control::model::{Object, Parsed};
use mesh_control::store::Store;
use mesh_control::translate::{Options, Snapshot, Translator};
use mesh_control::xds::{XdsConfig, XdsMetrics, XdsServer};
use mesh_runtime::Shutdown;
use prost::Message;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use xds_proto::discovery::DeltaDiscoveryRequest;
use xds_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use xds_proto::types::ResourceType;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn obj(v: Value) -> Object {
    match Object::parse(v) {
        Ok(Parsed::Object(o)) => o,
        other => panic!("generated object does not parse: {other:?}"),
    }
}

fn service(i: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": format!("svc-{i}"), "namespace": format!("ns-{}", i % 50)},
        "spec": {"clusterIP": format!("10.{}.{}.{}", 96 + i / 65536, (i / 256) % 256, i % 256),
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}, {"name": "grpc", "port": 9090, "targetPort": 9090}]}})
}

fn slice(i: usize, half: usize, bump: usize) -> Value {
    let endpoints: Vec<Value> = (0..5)
        .map(|e| {
            let n = i * 10 + half * 5 + e + bump;
            json!({"addresses": [format!("10.{}.{}.{}", 128 + n / 65536, (n / 256) % 256, n % 256)],
                "nodeName": format!("node-{}", n % 1000), "zone": format!("zone-{}", n % 3),
                "conditions": {"ready": true}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-{half}"), "namespace": format!("ns-{}", i % 50),
            "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}, {"name": "grpc", "port": 9090}],
        "endpoints": endpoints})
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

fn node(id: usize) -> xds_proto::core::Node {
    use xds_proto::protobuf::{Struct, Value as PValue, value::Kind};
    let fields = [("role".to_owned(), PValue { kind: Some(Kind::StringValue("proxy".into())) })].into_iter().collect();
    xds_proto::core::Node { id: format!("node-{id}"), metadata: Some(Struct { fields }), ..Default::default() }
}

/// What the simulated clients saw.
#[derive(Default)]
struct Seen {
    /// Clients that have received the whole initial snapshot.
    loaded: AtomicUsize,
    /// Bytes received by all clients since the counter was reset.
    bytes: AtomicU64,
    /// Streams that failed and were opened again.
    reconnects: AtomicUsize,
}

const TYPES: [ResourceType; 3] = [ResourceType::Cluster, ResourceType::ClusterLoadAssignment, ResourceType::Listener];

/// One simulated proxy: subscribes to everything, ACKs everything, and reports when it first sees `marker`'s
/// new version.
async fn client(
    id: usize,
    endpoint: String,
    seen: Arc<Seen>,
    mut marker: watch::Receiver<Option<(String, String)>>,
    done: mpsc::UnboundedSender<Instant>,
) {
    // Loaded once every resource has arrived (an initial snapshot comes in several pieces).
    let expect: usize = env("MESH_SCALE_EXPECT", usize::MAX);
    let mut loaded = false;
    let mut reported = false;
    // Like a real proxy, a client whose stream fails reconnects (after a pause) and starts over.
    loop {
        let attempt = async {
            let mut c = AggregatedDiscoveryServiceClient::connect(endpoint.clone())
                .await
                .map_err(|e| e.to_string())?
                .max_decoding_message_size(usize::MAX);
            let (tx, rx) = mpsc::unbounded_channel();
            for (i, t) in TYPES.iter().enumerate() {
                let _ = tx.send(DeltaDiscoveryRequest {
                    node: (i == 0).then(|| node(id)),
                    type_url: t.type_url().into(),
                    resource_names_subscribe: vec!["*".into()],
                    ..Default::default()
                });
            }
            let mut stream = c
                .delta_aggregated_resources(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            let mut received = 0usize;
            loop {
                let r = match stream.message().await {
                    Ok(Some(r)) => r,
                    Ok(None) => return Err("stream ended".to_owned()),
                    Err(e) => return Err(e.to_string()),
                };
                seen.bytes.fetch_add(r.encoded_len() as u64, Ordering::Relaxed);
                let _ = tx.send(DeltaDiscoveryRequest {
                    type_url: r.type_url.clone(),
                    response_nonce: r.nonce.clone(),
                    ..Default::default()
                });
                received += r.resources.len();
                if !loaded && received >= expect {
                    loaded = true;
                    seen.loaded.fetch_add(1, Ordering::Relaxed);
                }
                let want = marker.borrow_and_update().clone();
                if let Some((name, version)) = want
                    && !reported
                    && r.resources.iter().any(|x| x.name == name && x.version == version)
                {
                    reported = true;
                    let _ = done.send(Instant::now());
                }
            }
        };
        let result: Result<(), String> = attempt.await;
        if let Err(e) = result {
            seen.reconnects.fetch_add(1, Ordering::Relaxed);
            if seen.reconnects.load(Ordering::Relaxed) <= 3 {
                eprintln!("client {id}: {e}; reconnecting");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn unix_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

/// The simulated proxies run in a child process (this same program), so the control plane's memory is measured
/// alone. Protocol on stdio: the child prints `loaded` once every client has the initial snapshot; the parent
/// writes `mark NAME VERSION`; the child prints `got UNIX_NANOS` for each client that sees it, then `bytes N` for
/// all the bytes received since `mark`.
async fn clients_process(endpoint: String, clients: usize) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let seen = Arc::new(Seen::default());
    let (marker_tx, marker_rx) = watch::channel(None);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    for id in 0..clients {
        tokio::spawn(client(id, endpoint.clone(), seen.clone(), marker_rx.clone(), done_tx.clone()));
    }
    while seen.loaded.load(Ordering::Relaxed) < clients {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("loaded {} {}", seen.bytes.swap(0, Ordering::Relaxed), seen.reconnects.load(Ordering::Relaxed));
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let line = lines.next_line().await.unwrap().unwrap_or_default();
    let mut parts = line.split_whitespace().skip(1);
    let (name, version) = (parts.next().unwrap_or_default().to_owned(), parts.next().unwrap_or_default().to_owned());
    marker_tx.send_replace(Some((name, version)));
    for _ in 0..clients {
        let _t: Instant = done_rx.recv().await.unwrap();
        println!("got {}", unix_nanos());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    println!("bytes {}", seen.bytes.load(Ordering::Relaxed));
}

#[tokio::main]
async fn main() {
    let clients = env("MESH_SCALE_CLIENTS", 1_000);
    if let Ok(endpoint) = std::env::var("MESH_SCALE_CLIENT_ENDPOINT") {
        return clients_process(endpoint, clients).await;
    }
    let services = env("MESH_SCALE_SERVICES", 10_000);
    let rss_start = rss_mib();

    let mut store = Store::new();
    for i in 0..services {
        store.apply(obj(service(i)));
        store.apply(obj(slice(i, 0, 0)));
        store.apply(obj(slice(i, 1, 0)));
    }
    let mut translator = Translator::new(Options::default());
    let snap = translator.full(&store).clone();
    let snapshot_bytes: usize =
        ResourceType::ALL.iter().flat_map(|t| snap.proxy.get(*t).values().map(|r| r.body.len())).sum();
    let rss_loaded = rss_mib();

    let (tx, rx) = watch::channel::<Option<Arc<Snapshot>>>(Some(Arc::new(snap)));
    let server = XdsServer::new(rx, XdsConfig::default(), XdsMetrics::default());
    let shutdown = Shutdown::new();
    let (addr, _) = server.clone().serve("127.0.0.1:0".parse().unwrap(), shutdown.clone()).await.unwrap();

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .env("MESH_SCALE_CLIENT_ENDPOINT", format!("http://{addr}"))
        .env("MESH_SCALE_CLIENTS", clients.to_string())
        .env("MESH_SCALE_EXPECT", (services * 6).to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the clients process");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let started = Instant::now();
    let mut peak_rss = rss_mib();
    let (initial_bytes, reconnects): (u64, u64) = loop {
        tokio::select! {
            line = lines.next_line() => {
                let line = line.unwrap().expect("clients process ended early");
                if let Some(rest) = line.strip_prefix("loaded ") {
                    let v: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap()).collect();
                    break (v[0], v[1]);
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => peak_rss = peak_rss.max(rss_mib()),
        }
    };
    let initial = started.elapsed();
    let rss_connected = rss_mib();

    // One EndpointSlice changes (one endpoint moves); every client must get the new ClusterLoadAssignment.
    let t0 = unix_nanos();
    let t0_instant = Instant::now();
    let changes = store.apply(obj(slice(0, 0, 1)));
    let next = translator.update(&store, &changes).clone();
    let cla = "ns-0/svc-0/http".to_owned();
    let version = next.proxy.get(ResourceType::ClusterLoadAssignment)[&cla].version.clone();
    let translate_time = t0_instant.elapsed();
    stdin.write_all(format!("mark {cla} {version}\n").as_bytes()).await.unwrap();
    stdin.flush().await.unwrap();
    tx.send_replace(Some(Arc::new(next)));
    let mut times = Vec::with_capacity(clients);
    let change_bytes: u64 = loop {
        let line = lines.next_line().await.unwrap().expect("clients process ended early");
        if let Some(t) = line.strip_prefix("got ") {
            times.push(Duration::from_nanos((t.parse::<u128>().unwrap().saturating_sub(t0)) as u64));
        } else if let Some(b) = line.strip_prefix("bytes ") {
            break b.parse().unwrap();
        }
    };
    times.sort();
    assert_eq!(times.len(), clients);

    println!(
        "xDS scale: {services} Services ({} ports), {} endpoints, {clients} Delta clients (role proxy)",
        services * 2,
        services * 10
    );
    println!(
        "  snapshot (proxy role): {} resources, {:.1} MiB encoded",
        services * 6,
        snapshot_bytes as f64 / 1048576.0
    );
    println!(
        "  control plane RSS: start {rss_start:.0} MiB, cluster loaded + translated {rss_loaded:.0} MiB, \
         peak while {clients} clients load {peak_rss:.0} MiB, all connected {rss_connected:.0} MiB"
    );
    println!(
        "  initial snapshot to all clients: {:.2} s ({:.1} MiB per client, {:.2} GiB total)",
        initial.as_secs_f64(),
        initial_bytes as f64 / clients as f64 / 1048576.0,
        initial_bytes as f64 / 1073741824.0
    );
    println!("  streams that failed under the load and reconnected: {reconnects}");
    println!("  one EndpointSlice change: translate {:.3} ms", translate_time.as_secs_f64() * 1e3);
    println!(
        "  change → all clients: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
        times.last().unwrap().as_secs_f64() * 1e3
    );
    println!("  bytes per client for the change: {:.0} B", change_bytes as f64 / clients as f64);
    drop(stdin);
    shutdown.trigger();
}

//! Our ADS client against our ADS server, in-process: what a role fetches is exactly its snapshot, a one-endpoint
//! change reaches a connected client as one ClusterLoadAssignment, and a client that reconnects is not resent what
//! it has.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_control::app::{self, App, Config};
use mesh_control::translate::{Options, Role};
use mesh_control::xds::XdsConfig;
use mesh_tests::assert_eventually;
use xds_proto::client::{self, ClientConfig, Handler, Protocol, Update};
use xds_proto::types::ResourceType;

const SLICE: &str = "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [ENDPOINT]
";

fn write_cluster(dir: &Path, endpoint: &str) {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/shop");
    for f in std::fs::read_dir(example).unwrap() {
        let f = f.unwrap().path();
        if f.extension().is_some_and(|e| e == "yaml") && !dir.join(f.file_name().unwrap()).exists() {
            std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
        }
    }
    // Replace web's slices with one we control.
    let web = std::fs::read_to_string(dir.join("web.yaml")).unwrap();
    let kept: Vec<&str> = web.split("\n---").filter(|d| !d.contains("kind: EndpointSlice")).collect();
    std::fs::write(dir.join("web.yaml"), kept.join("\n---")).unwrap();
    std::fs::write(dir.join("web-slice.yaml"), SLICE.replace("ENDPOINT", endpoint)).unwrap();
}

async fn start(dir: &Path, xds_addr: &str) -> App {
    let cfg = Config {
        source: app::SourceConfig::Manifests { dir: dir.to_owned(), debounce: Duration::from_millis(10) },
        translate: Options::default(),
        xds_addr: xds_addr.parse().unwrap(),
        xds: XdsConfig { debounce: Duration::from_millis(5), ..XdsConfig::default() },
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        logging: None,
    };
    let mut app = app::build(cfg).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), app.snapshots.wait_for(Option::is_some)).await.unwrap().unwrap();
    app
}

fn config(app: &App, role: &str, protocol: Protocol) -> ClientConfig {
    let mut c = ClientConfig::new(format!("http://{}", app.xds_addr), "node-a", role);
    if role == "ingress" {
        c.ingress_class = Some("mesh".into());
    }
    c.protocol = protocol;
    c.backoff_min = Duration::from_millis(20);
    c.backoff_max = Duration::from_millis(200);
    c
}

#[tokio::test]
async fn each_role_fetches_exactly_its_snapshot_over_both_protocols() {
    let d = tempfile::tempdir().unwrap();
    write_cluster(d.path(), "127.20.0.11");
    let app = start(d.path(), "127.0.0.1:0").await;
    let snap = app.snapshots.borrow().clone().unwrap();
    for (role_name, role) in [("proxy", Role::Proxy), ("ingress", Role::Ingress { class: "mesh".into() })] {
        let want = snap.role(&role);
        for protocol in [Protocol::Delta, Protocol::Sotw] {
            let got = client::fetch_once(config(&app, role_name, protocol), Duration::from_secs(10)).await.unwrap();
            for t in ResourceType::ALL {
                let got: BTreeMap<&String, &[u8]> =
                    got.get(&t).into_iter().flatten().map(|(n, e)| (n, &e.body[..])).collect();
                let want: BTreeMap<&String, &[u8]> = want.get(t).iter().map(|(n, r)| (n, &r.body[..])).collect();
                assert_eq!(got, want, "{role_name} {protocol} {t}");
            }
        }
    }
    app.stop().await;
}

/// Records every update a client applies, and the bodies of the resources each changed (to recognise a marker).
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Seen>>>, Arc<Mutex<Vec<u8>>>);

/// An update as seen: its type, the names changed and the names removed.
type Seen = (ResourceType, Vec<String>, Vec<String>);

impl Handler for Recorder {
    fn apply(&mut self, u: &Update) -> Result<(), String> {
        self.0.lock().unwrap().push((u.kind, u.changed.clone(), u.removed.clone()));
        let mut bodies = self.1.lock().unwrap();
        for name in &u.changed {
            bodies.extend_from_slice(&u.resources[name].body);
        }
        Ok(())
    }
}

impl Recorder {
    /// Whether a changed resource carried `needle` (e.g. an endpoint address).
    fn carried(&self, needle: &[u8]) -> bool {
        self.1.lock().unwrap().windows(needle.len()).any(|w| w == needle)
    }

    fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

#[tokio::test]
async fn one_endpoint_change_is_one_cla_and_reconnects_are_not_resent() {
    let d = tempfile::tempdir().unwrap();
    write_cluster(d.path(), "127.20.0.11");
    let app = start(d.path(), "127.0.0.1:0").await;
    let xds_addr = app.xds_addr.to_string();
    let rec = Recorder::default();
    let handle = client::spawn(config(&app, "proxy", Protocol::Delta), rec.clone());
    let mut status = handle.status();
    let all = ResourceType::ALL;
    tokio::time::timeout(Duration::from_secs(10), status.wait_for(|s| s.is_loaded(&all))).await.unwrap().unwrap();
    rec.take();

    let before = app.snapshots.borrow().clone().unwrap();
    std::fs::write(d.path().join("web-slice.yaml"), SLICE.replace("ENDPOINT", "127.20.0.99")).unwrap();
    assert_eventually!(!Arc::ptr_eq(app.snapshots.borrow().as_ref().unwrap(), &before), "a new snapshot");
    assert_eventually!(!rec.0.lock().unwrap().is_empty(), "an update");
    // A second change as a marker: the stream is ordered, so anything else the first change caused arrives
    // before the marker's update. No waiting for stragglers by the clock.
    std::fs::write(d.path().join("web-slice.yaml"), SLICE.replace("ENDPOINT", "127.20.0.98")).unwrap();
    assert_eventually!(rec.carried(b"127.20.0.98"), "the marker's update");
    let updates = rec.take();
    let cla = (ResourceType::ClusterLoadAssignment, vec!["shop/web/http".to_owned()], vec![]);
    assert_eq!(updates, [cla.clone(), cla.clone()], "one endpoint change: one ClusterLoadAssignment, nothing else");

    // The control plane restarts on the same address: the client reconnects with what it has and is sent nothing.
    app.stop().await;
    assert_eventually!(!status.borrow().connected, "disconnected");
    let app = start(d.path(), &xds_addr).await;
    assert_eventually!(status.borrow().connected, "reconnected");
    // Again a marker change: whatever the reconnect caused arrives before its update.
    std::fs::write(d.path().join("web-slice.yaml"), SLICE.replace("ENDPOINT", "127.20.0.97")).unwrap();
    assert_eventually!(rec.carried(b"127.20.0.97"), "the marker's update");
    let moved = |u: &Seen| !u.1.is_empty() || !u.2.is_empty();
    let resent: Vec<_> = rec.take().into_iter().filter(moved).collect();
    assert_eq!(resent, [cla], "nothing is resent after a reconnect, only the marker's change arrives");
    handle.stop().await;
    app.stop().await;
}

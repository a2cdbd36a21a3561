//! The example folder the README points newcomers at loads cleanly and routes as its own README says.

use std::path::PathBuf;

use mesh_control::source::{load_dir, sync};
use mesh_control::store::Store;
use mesh_control::translate::{Options, translate};
use xds_proto::types::ResourceType;

fn shop() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/shop")
}

#[test]
fn shop_example_translates_without_problems() {
    let loaded = load_dir(&shop()).expect("examples/shop loads");
    assert!(loaded.rejected.is_empty(), "{:?}", loaded.rejected);
    assert_eq!(loaded.ignored, 1, "the Deployment is the one object of a kind we do not read");
    let mut store = Store::new();
    sync(&mut store, &loaded);
    let s = translate(&store, &Options::default());
    assert!(s.problems.is_empty(), "{:?}", s.problems);

    let listeners: Vec<&String> = s.proxy.get(ResourceType::Listener).keys().collect();
    for want in [
        "svc/shop/web/http@127.10.0.10",
        "svc/shop/web/metrics@127.10.0.10",
        "svc/shop/api/grpc@127.10.0.20",
        "svc/shop/dns/dns@127.10.0.53",
        "svc/shop/dns/dns-tcp@127.10.0.53",
        "svc/shop/notfound/80@127.10.0.90",
        "svc/mesh-system/mesh-ingress/http@127.30.0.1",
        "svc/mesh-system/mesh-ingress/https@nodeport",
    ] {
        assert!(listeners.iter().any(|l| *l == want), "{want} not in {listeners:?}");
    }
    assert!(!listeners.iter().any(|l| l.contains("legacy")), "ExternalName gets no listener");

    let ingress = &s.ingress["mesh"];
    assert_eq!(ingress.get(ResourceType::Secret).keys().collect::<Vec<_>>(), ["shop/shop-tls"]);
    assert_eq!(ingress.get(ResourceType::Listener).keys().collect::<Vec<_>>(), ["ingress/http", "ingress/https"]);
    assert_eq!(s.ingress.keys().collect::<Vec<_>>(), ["mesh"], "the nginx class is not ours");
}

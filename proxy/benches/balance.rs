//! The proxy's per-connection and per-update hot paths.
//!
//! - `balance/choose/{10,1000}`: what every new connection does to pick an endpoint: `balance::candidates`
//!   (Local filter, ready-then-terminating tier, topology, ejection) then `balance::choose` (least connections
//!   by the power of two choices), on one cluster of 10 and of 1,000 ready endpoints, no affinity.
//! - `balance/choose_affinity/10`: the same with `sessionAffinity: ClientIP` (the affinity map lookup), for
//!   information.
//! - `table/one_endpoint_change`: `Table::apply` of a ClusterLoadAssignment update naming one changed cluster,
//!   on a table of 10,000 Services × 2 ports × 10 endpoints (20,000 listeners, clusters and CLAs; 200,000
//!   endpoints) built with `Table::apply` from hand-made xDS protos (`common/mod.rs`). Each iteration replaces
//!   the current table with the result, so the previous one is dropped inside the timing, as it is when the xDS
//!   handler publishes the next table. It alternates two versions of the CLA (endpoint 0 ready / terminating),
//!   so every iteration is a real change. Target < 1 ms.
//! - `table/clone`: `Table::clone` of that table alone (and its drop), the O(cluster) part of `apply`.
//! - `table/decode_one_cla`: the same one-CLA `apply` on a table of one Service: the O(change) part.
//!
//! Run: `cargo bench -p mesh-proxy --bench balance` (results: `docs/BENCHMARKS.md`).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion};
use mesh_proxy::balance::{self, Algorithm, Here};
use mesh_proxy::table::{Cluster, Endpoint, Health, Placement};
use xds_proto::types::ResourceType;

mod common;

fn cluster(n: usize, affinity: Option<Duration>) -> Cluster {
    let endpoints: Vec<Endpoint> = (0..n)
        .map(|i| Endpoint {
            addr: SocketAddr::new(IpAddr::V4(common::pod_ip(0, n, i)), 8080),
            health: Health::Ready,
            place: Placement::interned::<&str>(&format!("node-{:04}", i % 1000), &format!("zone-{}", i % 3), &[]),
            stats: Arc::default(),
        })
        .collect();
    Cluster {
        name: "ns-00/svc-00000/http".into(),
        affinity,
        distribution: Default::default(),
        endpoints: endpoints.into(),
        affinity_map: Arc::default(),
        rr: Arc::default(),
    }
}

fn bench_choose(c: &mut Criterion) {
    let here = Here { node: "node-0001", zone: Some("zone-1") };
    let mut g = c.benchmark_group("balance");
    for n in [10usize, 1000] {
        let cl = cluster(n, None);
        g.bench_function(format!("choose/{n}"), |b| {
            let mut client = 0u32;
            b.iter(|| {
                client = client.wrapping_add(1);
                let ip = IpAddr::V4(Ipv4Addr::from(0x0a80_0000 | (client & 0xffff)));
                let cands = balance::candidates(black_box(&cl), false, here);
                let e = balance::choose(&cl, &cands, ip, &[], Algorithm::LeastConnections).unwrap();
                black_box(e.addr)
            })
        });
    }
    let cl = cluster(10, Some(Duration::from_secs(10_800)));
    g.bench_function("choose_affinity/10", |b| {
        let mut client = 0u32;
        b.iter(|| {
            client = client.wrapping_add(1);
            // 1,024 distinct clients: mostly returning ones, as behind a busy Service.
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a80_0000 | (client & 0x3ff)));
            let cands = balance::candidates(black_box(&cl), false, here);
            let e = balance::choose(&cl, &cands, ip, &[], Algorithm::LeastConnections).unwrap();
            black_box(e.addr)
        })
    });
    g.finish();
}

const SERVICES: usize = 10_000;
const EPS: usize = 10;

fn bench_table(c: &mut Criterion) {
    let t0 = std::time::Instant::now();
    let table = common::build_table(SERVICES, EPS, 1_000);
    eprintln!(
        "table built in {:?}: {} listeners, {} clusters, {} endpoints",
        t0.elapsed(),
        table.listeners.len(),
        table.clusters.len(),
        table.clusters.values().map(|c| c.endpoints.len()).sum::<usize>()
    );
    assert_eq!(table.clusters.len(), SERVICES * 2);
    assert_eq!(table.by_key.len(), SERVICES * 2);

    // Two versions of one CLA, alternated so each apply is a real change.
    let svc = SERVICES / 2;
    let versions = [common::cla(svc, 0, EPS, true), common::cla(svc, 0, EPS, false)];
    let name = versions[0].0.clone();
    let changed = vec![name.clone()];

    let mut g = c.benchmark_group("table");
    g.sample_size(50);
    {
        let mut current = table.clone();
        let mut i = 0usize;
        g.bench_function("one_endpoint_change", |b| {
            b.iter(|| {
                let body = &versions[i % 2].1[..];
                i += 1;
                // The previous table is dropped here, as when the handler stores the next one.
                current = current
                    .apply(ResourceType::ClusterLoadAssignment, |_| Some(body), &changed, &[], "v")
                    .expect("valid");
            })
        });
        let health = current.clusters[&name].endpoints[0].health;
        assert!(matches!(health, Health::Ready | Health::Terminating));
    }
    g.bench_function("clone", |b| b.iter_batched_ref(|| (), |_| drop(black_box(table.clone())), BatchSize::SmallInput));
    {
        let mut small = common::build_table(1, EPS, 1);
        let changed = vec![common::cluster_name(0, "http")];
        let versions = [common::cla(0, 0, EPS, true), common::cla(0, 0, EPS, false)];
        let mut i = 0usize;
        g.bench_function("decode_one_cla", |b| {
            b.iter(|| {
                let body = &versions[i % 2].1[..];
                i += 1;
                small = small
                    .apply(ResourceType::ClusterLoadAssignment, |_| Some(body), &changed, &[], "v")
                    .expect("valid");
            })
        });
    }
    g.finish();
    drop(black_box(table));
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_choose(&mut c);
    bench_table(&mut c);
    c.final_summary();
}

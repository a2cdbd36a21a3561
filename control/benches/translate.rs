//! Translation at scale: a generated cluster of 10,000 Services × 2 ports, 100,000 endpoints in 20,000
//! EndpointSlices and 2,000 Ingress host rules (200 Ingresses × 10 hosts × 2 paths), all of IngressClass `mesh`.
//!
//! - `translate/full`: `Translator::new(..).full(&store)` on the whole store (target < 500 ms).
//! - `translate/one_slice_change`: `store.apply(slice)` + `translator.update(..)` after a `full`, alternating
//!   two versions of one EndpointSlice so every iteration is a real change (target < 5 ms).
//! - `translate/one_ingress_change`: the same for one Ingress (the route tables are rebuilt), for information.
//!
//! Before criterion runs, a counting global allocator measures the bytes the store holds, the peak extra bytes
//! during one `full` translation and the bytes the translator keeps afterwards; they are printed to stderr.
//! Counting is switched off while criterion times, so the timings do not pay for it.
//!
//! Run: `cargo bench -p mesh-control --bench translate` (results and the machine: `docs/BENCHMARKS.md`).

// The counting allocator must implement `GlobalAlloc`, which is an unsafe trait: its methods only forward to
// `System` with the caller's arguments, so they uphold exactly the contract `System` does.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};
use mesh_control::model::{NsName, Object, Parsed};
use mesh_control::store::Store;
use mesh_control::translate::{Options, Translator};
use serde_json::{Value, json};
use xds_proto::types::ResourceType;

// ---------------------------------------------------------------------------------------------------------------
// Counting allocator

/// `System`, counting live bytes and their peak while [`TRACKING`] is on.
struct Counting;

static TRACKING: AtomicBool = AtomicBool::new(false);
/// Live bytes allocated minus freed while tracking (may go below zero when memory from before is freed).
static CURRENT: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);
/// Allocations (and reallocations) made while tracking.
static ALLOCS: AtomicIsize = AtomicIsize::new(0);

fn grow(n: usize) {
    if TRACKING.load(Relaxed) {
        let now = CURRENT.fetch_add(n as isize, Relaxed) + n as isize;
        PEAK.fetch_max(now, Relaxed);
        ALLOCS.fetch_add(1, Relaxed);
    }
}

fn shrink(n: usize) {
    if TRACKING.load(Relaxed) {
        CURRENT.fetch_sub(n as isize, Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::alloc`'s contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`, with this layout.
        unsafe { System.dealloc(ptr, layout) };
        shrink(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from `System` with `layout`; the caller upholds the rest of the contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            grow(new_size);
            shrink(layout.size());
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn current() -> isize {
    CURRENT.load(Relaxed)
}

/// Makes the current live bytes the new peak, and returns them.
fn reset_peak() -> isize {
    let now = current();
    PEAK.store(now, Relaxed);
    now
}

fn mib(bytes: isize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// A line of `/proc/self/status` (`VmRSS`, `VmHWM`), for the resident set as the kernel sees it.
fn proc_status(field: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).map(|l| l[field.len() + 1..].trim().to_owned()))
        .unwrap_or_else(|| "n/a".into())
}

// ---------------------------------------------------------------------------------------------------------------
// The generated cluster

const SERVICES: usize = 10_000;
const NAMESPACES: usize = 50;
const PER_NS: usize = SERVICES / NAMESPACES;
const SLICES_PER_SERVICE: usize = 2;
const ENDPOINTS_PER_SLICE: usize = 5;
const NODES: usize = 1_000;
const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];
const INGRESSES: usize = 200;
const HOSTS_PER_INGRESS: usize = 10;
const CLASS: &str = "mesh";

fn ns_of(svc: usize) -> String {
    format!("ns-{:02}", svc / PER_NS)
}

fn svc_name(svc: usize) -> String {
    format!("svc-{svc:05}")
}

/// Dotted IPv4 from a base (`a.b`) and a 16-bit-plus index, spilling into the second octet.
fn ip(a: usize, b: usize, i: usize) -> String {
    format!("{a}.{}.{}.{}", b + i / 65_536, (i / 256) % 256, i % 256)
}

fn parse(v: Value) -> Object {
    match Object::parse(v).expect("generated objects are valid") {
        Parsed::Object(o) => o,
        other => panic!("generated object not read: {other:?}"),
    }
}

fn service(i: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": svc_name(i), "namespace": ns_of(i), "uid": format!("uid-svc-{i}"),
            "creationTimestamp": "2024-01-01T00:00:00Z", "labels": {"app": svc_name(i)}},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip(10, 96, i), "clusterIPs": [ip(10, 96, i)],
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "selector": {"app": svc_name(i)},
            "ports": [
                {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080},
                {"name": "grpc", "protocol": "TCP", "port": 9090, "targetPort": "grpc"},
            ],
        },
    })
}

/// Slice `half` (0 or 1) of Service `i`. `variant` 1 turns its first endpoint terminating (or back to ready if
/// it already was), so the two variants always differ.
fn slice(i: usize, half: usize, variant: usize) -> Value {
    let endpoints: Vec<Value> = (0..ENDPOINTS_PER_SLICE)
        .map(|k| {
            let e = (i * SLICES_PER_SERVICE + half) * ENDPOINTS_PER_SLICE + k;
            let node = e % NODES;
            // One endpoint in ten is terminating (rolling update in progress).
            let terminating = (e % 10 == 9) != (variant == 1 && k == 0);
            let conditions = if terminating {
                json!({"ready": false, "serving": true, "terminating": true})
            } else {
                json!({"ready": true, "serving": true, "terminating": false})
            };
            json!({
                "addresses": [ip(10, 128, e)],
                "conditions": conditions,
                "nodeName": format!("node-{node:04}"),
                "zone": ZONES[node % ZONES.len()],
                "targetRef": {"kind": "Pod", "namespace": ns_of(i), "name": format!("{}-{half}{k}", svc_name(i))},
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{}-{}", svc_name(i), ["a", "b"][half]), "namespace": ns_of(i),
            "labels": {"kubernetes.io/service-name": svc_name(i), "endpointslice.kubernetes.io/managed-by":
                "endpointslice-controller.k8s.io"},
            "resourceVersion": format!("{}", 1000 + variant)},
        "addressType": "IPv4",
        "ports": [
            {"name": "http", "protocol": "TCP", "port": 8080},
            {"name": "grpc", "protocol": "TCP", "port": 9090},
        ],
        "endpoints": endpoints,
    })
}

/// Ingress `k`: 10 host rules, each `/` (Prefix, port by name `http`) and `/grpc` (Prefix, port by number 9090),
/// to 10 distinct Services of its namespace. `variant` 1 sends its first rule's `/` to the `grpc` port instead.
fn ingress(k: usize, variant: usize) -> Value {
    let per_ns = INGRESSES / NAMESPACES;
    let ns_idx = k / per_ns;
    let rules: Vec<Value> = (0..HOSTS_PER_INGRESS)
        .map(|r| {
            let svc = ns_idx * PER_NS + (k % per_ns) * HOSTS_PER_INGRESS + r;
            let root_port = if variant == 1 && r == 0 { json!({"name": "grpc"}) } else { json!({"name": "http"}) };
            json!({
                "host": format!("h{:04}.{}.example.com", k * HOSTS_PER_INGRESS + r, ns_of(svc)),
                "http": {"paths": [
                    {"path": "/", "pathType": "Prefix",
                        "backend": {"service": {"name": svc_name(svc), "port": root_port}}},
                    {"path": "/grpc", "pathType": "Prefix",
                        "backend": {"service": {"name": svc_name(svc), "port": {"number": 9090}}}},
                ]},
            })
        })
        .collect();
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": format!("ing-{k:03}"), "namespace": format!("ns-{ns_idx:02}"),
            "creationTimestamp": "2024-01-01T00:00:00Z", "resourceVersion": format!("{}", 2000 + variant)},
        "spec": {"ingressClassName": CLASS, "rules": rules},
    })
}

fn ingress_class() -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
        "metadata": {"name": CLASS},
        "spec": {"controller": xds_proto::INGRESS_CONTROLLER},
    })
}

/// The whole cluster, each object generated, parsed and applied in turn (no JSON kept around).
fn build_store() -> Store {
    let mut store = Store::new();
    store.apply(parse(ingress_class()));
    for i in 0..SERVICES {
        store.apply(parse(service(i)));
        for half in 0..SLICES_PER_SERVICE {
            store.apply(parse(slice(i, half, 0)));
        }
    }
    for k in 0..INGRESSES {
        store.apply(parse(ingress(k, 0)));
    }
    store
}

/// Two versions of one object, applied in turn so each apply is a real change.
struct Flip {
    versions: [Object; 2],
    next: usize,
}

impl Flip {
    /// `current` is the version the store holds now.
    fn new(current: Value, other: Value) -> Self {
        Flip { versions: [parse(current), parse(other)], next: 1 }
    }

    fn take(&mut self) -> Object {
        let o = self.versions[self.next].clone();
        self.next ^= 1;
        o
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Memory, outside criterion

fn memory_report() -> Store {
    TRACKING.store(true, Relaxed);
    let base = current();
    let t = Instant::now();
    let store = build_store();
    let store_bytes = current() - base;
    eprintln!(
        "translate: generated {SERVICES} Services, {} EndpointSlices, {} endpoints, {INGRESSES} Ingresses \
         ({} host rules, {} paths) in {:.2?}",
        SERVICES * SLICES_PER_SERVICE,
        SERVICES * SLICES_PER_SERVICE * ENDPOINTS_PER_SLICE,
        INGRESSES * HOSTS_PER_INGRESS,
        INGRESSES * HOSTS_PER_INGRESS * 2,
        t.elapsed()
    );

    let before = reset_peak();
    let allocs_before = ALLOCS.load(Relaxed);
    let t = Instant::now();
    let mut translator = Translator::new(Options::default());
    let snap = translator.full(&store);
    let elapsed = t.elapsed();
    let peak_extra = PEAK.load(Relaxed) - before;
    let retained = current() - before;
    let allocs = ALLOCS.load(Relaxed) - allocs_before;

    assert!(
        snap.problems.is_empty(),
        "the generated cluster translates cleanly: {:?}",
        snap.problems.iter().take(3).collect::<Vec<_>>()
    );
    let proxy = &snap.proxy;
    let ing = snap.ingress.get(CLASS).expect("class mesh is served");
    let bodies: usize = [&snap.proxy, ing]
        .iter()
        .flat_map(|r| {
            [
                ResourceType::Listener,
                ResourceType::Cluster,
                ResourceType::ClusterLoadAssignment,
                ResourceType::RouteConfiguration,
                ResourceType::Secret,
            ]
            .map(|t| r.get(t).values().map(|r| r.body.len()).sum::<usize>())
        })
        .sum();
    assert_eq!(proxy.get(ResourceType::Listener).len(), SERVICES * 2);
    assert_eq!(proxy.get(ResourceType::ClusterLoadAssignment).len(), SERVICES * 2);
    eprintln!(
        "translate: proxy role {} Listeners, {} Clusters, {} ClusterLoadAssignments; ingress role {} Clusters, \
         {} RouteConfigurations ({} bytes); encoded resource bodies {}",
        proxy.get(ResourceType::Listener).len(),
        proxy.get(ResourceType::Cluster).len(),
        proxy.get(ResourceType::ClusterLoadAssignment).len(),
        ing.get(ResourceType::Cluster).len(),
        ing.get(ResourceType::RouteConfiguration).len(),
        ing.get(ResourceType::RouteConfiguration).values().map(|r| r.body.len()).sum::<usize>(),
        mib(bodies as isize),
    );
    eprintln!("translate: memory: store {}", mib(store_bytes));
    eprintln!(
        "translate: memory: full translation peak extra {}, {allocs} allocations (one run, counting on: {elapsed:.2?})",
        mib(peak_extra)
    );
    eprintln!("translate: memory: retained by the translator after full {}", mib(retained));
    eprintln!("translate: memory: process VmRSS {}, VmHWM {}", proc_status("VmRSS:"), proc_status("VmHWM:"));
    drop(translator);
    TRACKING.store(false, Relaxed);
    store
}

// ---------------------------------------------------------------------------------------------------------------
// Timings

fn bench_full(c: &mut Criterion, store: &Store) {
    let mut g = c.benchmark_group("translate");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_secs(2));
    g.measurement_time(Duration::from_secs(20));
    g.bench_function("full", |b| {
        b.iter_with_large_drop(|| {
            let mut t = Translator::new(Options::default());
            black_box(t.full(black_box(store)));
            t
        })
    });
    g.finish();
}

fn bench_changes(c: &mut Criterion, store: &mut Store) {
    let mut translator = Translator::new(Options::default());
    translator.full(store);
    let mut g = c.benchmark_group("translate");
    g.sample_size(30).warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(10));

    // Service 0 (ns-00/svc-00000) is also the backend of Ingress 0's first host: its change reaches the ingress
    // role too.
    let svc0 = NsName::new(&ns_of(0), &svc_name(0));
    let mut slices = Flip::new(slice(0, 0, 0), slice(0, 0, 1));
    g.bench_function("one_slice_change", |b| {
        b.iter(|| {
            let changes = store.apply(slices.take());
            debug_assert!(changes.services.contains(&svc0));
            black_box(translator.update(store, &changes));
        })
    });

    // Tens of milliseconds each: fewer samples, so the run stays short.
    g.sample_size(20);
    let mut ingresses = Flip::new(ingress(0, 0), ingress(0, 1));
    g.bench_function("one_ingress_change", |b| {
        b.iter(|| {
            let changes = store.apply(ingresses.take());
            debug_assert!(changes.ingress);
            black_box(translator.update(store, &changes));
        })
    });
    g.finish();
}

fn main() {
    let mut store = memory_report();
    let mut c = Criterion::default().configure_from_args();
    bench_full(&mut c, &store);
    bench_changes(&mut c, &mut store);
    c.final_summary();
}

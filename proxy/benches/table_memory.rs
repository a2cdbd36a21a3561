//! Memory of the proxy's table at scale: 10,000 Services × 2 ports × 10 endpoints (20,000 listeners, clusters
//! and ClusterLoadAssignments, 200,000 endpoints; `common/mod.rs`), built with `Table::apply` from hand-made xDS
//! protos. No sockets: this is the library table only, not a running proxy.
//!
//! Printed (stdout): the heap held by the Envoy descriptor pool (built on first use; mesh-proxy builds it when it
//! loads a snapshot file), then the process's VmRSS before and after building the table, VmHWM (peak), and the heap bytes
//! the table holds, measured exactly by a counting global allocator (live bytes allocated while building,
//! minus those freed, after the inputs are dropped). The table is built in batches of 1,000 Services so the
//! encoded inputs of one batch only are alive at a time (RSS then reflects the table, not the inputs).
//!
//! `MESH_BENCH_SERVICES` / `MESH_BENCH_EPS` change the size. Target: < 50 MB RSS.
//! Run: `cargo bench -p mesh-proxy --bench table_memory`.

// The counting allocator must implement `GlobalAlloc`, an unsafe trait: its methods only forward to `System`
// with the caller's arguments, so they uphold exactly the contract `System` does.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering::Relaxed};

mod common;

struct Counting;

static TRACKING: AtomicBool = AtomicBool::new(false);
static CURRENT: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn grow(n: usize) {
    if TRACKING.load(Relaxed) {
        let now = CURRENT.fetch_add(n as isize, Relaxed) + n as isize;
        PEAK.fetch_max(now, Relaxed);
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
        // SAFETY: `ptr`/`layout` came from this allocator; the caller upholds `realloc`'s contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            shrink(layout.size());
            grow(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// A field of /proc/self/status, in kB.
fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    // Criterion-style flags (`--bench`) are ignored: this is a measurement program, not a timed benchmark.
    let services = env("MESH_BENCH_SERVICES", 10_000);
    let eps = env("MESH_BENCH_EPS", 10);
    let rss_start = status_kb("VmRSS");
    // The Envoy descriptor pool (prost-reflect) is built on first use: by `encode` below (the hand-made protos are
    // canonicalized) and, in mesh-proxy, by the snapshot-file loader (JSON → protobuf). Measured on its own first
    // so the table's figure excludes it.
    TRACKING.store(true, Relaxed);
    black_box(xds_proto::codec::pool());
    let pool = CURRENT.swap(0, Relaxed);
    PEAK.store(0, Relaxed);
    TRACKING.store(false, Relaxed);
    let rss0 = status_kb("VmRSS");
    TRACKING.store(true, Relaxed);
    let t0 = std::time::Instant::now();
    let table = common::build_table(services, eps, 1_000);
    let took = t0.elapsed();
    let held = CURRENT.load(Relaxed);
    let peak = PEAK.load(Relaxed);
    TRACKING.store(false, Relaxed);
    let rss1 = status_kb("VmRSS");
    let hwm = status_kb("VmHWM");
    let endpoints: usize = table.clusters.values().map(|c| c.endpoints.len()).sum();
    println!(
        "table: {services} Services x 2 ports x {eps} endpoints = {} listeners, {} clusters, {endpoints} endpoints \
         (built in {took:.2?}, no sockets)",
        table.listeners.len(),
        table.clusters.len()
    );
    println!(
        "process at start: VmRSS {rss_start} kB; the xDS descriptor pool (xds_proto::codec::pool) holds {} of heap, VmRSS after it {rss0} kB",
        mib(pool as f64)
    );
    println!(
        "heap held by the table (counting allocator): {} ({:.0} B per endpoint)",
        mib(held as f64),
        held as f64 / endpoints as f64
    );
    println!("heap peak while building (batches of 1,000 Services): {}", mib(peak as f64));
    println!(
        "VmRSS before: {} kB, after: {} kB (+{}), VmHWM: {} kB",
        rss0,
        rss1,
        mib(((rss1 - rss0) * 1024) as f64),
        hwm
    );
    black_box(&table);
}

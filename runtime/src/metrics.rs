//! The process-wide metrics registry, rendered by the admin server at `/metrics`.
//!
//! Why it looks like this:
//! - **One registry per process, shared by cloning** ([`Metrics`] is an `Arc`): each app registers its own
//!   counters into it at build time and keeps the metric handles (which are themselves cheap atomics); the
//!   admin server only renders. No global static, so tests can build as many independent apps as they like.
//! - **The `mesh_` prefix is applied here**, not by each app, so every series a mesh binary exports is
//!   namespaced the same way and dashboards can select `{__name__=~"mesh_.*"}`.
//! - **Process metrics for free**: every binary gets `mesh_process_resident_memory_bytes` (read at scrape
//!   time), `mesh_process_start_time_seconds` (restart detection) and `mesh_build_info{version}` (which
//!   version is running where) without writing a line.
//! - **OpenMetrics text**: that is what `prometheus-client` encodes (`# EOF`, `_total` suffixes, `info` and
//!   `# UNIT` lines), so it is served with the OpenMetrics content type, which Prometheus asks for first by
//!   default. Calling it `text/plain; version=0.0.4` would make the classic parser reject the `info` type.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Metric, Registry, Unit};

/// The prefix of every metric a mesh binary exports (`mesh_` once rendered).
pub const PREFIX: &str = "mesh";

/// The HTTP content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The version reported by `mesh_build_info`: the workspace version every mesh crate shares.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Errors rendering metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A registered metric or collector failed to encode itself (a bug in that metric, typically an invalid
    /// label value or name).
    #[error("cannot encode the metrics registry; a registered metric or collector is invalid: {0}")]
    Encode(#[source] std::fmt::Error),
}

/// The process's metrics registry. Clones share it: build one in `app::build`, hand clones to the parts that
/// register metrics and to the admin server that renders them.
#[derive(Debug, Clone)]
pub struct Metrics {
    // A `Mutex` because `Registry::register` needs `&mut`; it is taken only at registration (startup) and
    // for the duration of one scrape's encoding, never on a data path (the metrics themselves are atomics).
    registry: Arc<Mutex<Registry>>,
}

impl Metrics {
    /// A registry with the `mesh_` prefix and the process metrics already registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register_with_unit(
            "process_start_time",
            "Start time of the process since the Unix epoch",
            Unit::Seconds,
            ConstGauge::new(process_start_time()),
        );
        registry.register("build", "Build information of the running binary", Info::new([("version", VERSION)]));
        registry.register_collector(Box::new(ProcessCollector));
        Metrics { registry: Arc::new(Mutex::new(registry)) }
    }

    /// Registers a metric under `mesh_{name}`. Give the name without the prefix (a leading `mesh_` is dropped
    /// rather than doubled) and without the type suffix (`_total` is added to counters by the encoder). Keep
    /// the returned-by-clone metric handle to update it.
    pub fn register(&self, name: impl Into<String>, help: impl Into<String>, metric: impl Metric) {
        self.lock().register(unprefixed(name.into()), help, metric);
    }

    /// As [`register`](Self::register), with a unit: the name gets the unit suffix (`_seconds`, `_bytes`)
    /// and the exposition a `# UNIT` line.
    pub fn register_with_unit(
        &self,
        name: impl Into<String>,
        help: impl Into<String>,
        unit: Unit,
        metric: impl Metric,
    ) {
        self.lock().register_with_unit(unprefixed(name.into()), help, unit, metric);
    }

    /// Registers a collector, asked for its metrics at every scrape (for values read on demand, such as the
    /// size of a table that is cheaper to measure than to track).
    pub fn register_collector(&self, collector: Box<dyn Collector>) {
        self.lock().register_collector(collector);
    }

    /// Runs `f` on the underlying registry, for what the methods above do not cover (sub-registries with
    /// constant labels, for instance). Do not block inside `f`: scrapes wait for it.
    pub fn with_registry<R>(&self, f: impl FnOnce(&mut Registry) -> R) -> R {
        f(&mut self.lock())
    }

    /// Renders every metric as OpenMetrics text (serve it with [`CONTENT_TYPE`]).
    pub fn encode(&self) -> Result<String, MetricsError> {
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut out, &self.lock()).map_err(MetricsError::Encode)?;
        Ok(out)
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic while registering leaves the registry usable (registration is a `Vec::push`), so a poisoned
        // lock must not take `/metrics` down with it.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn unprefixed(name: String) -> String {
    match name.strip_prefix("mesh_") {
        Some(rest) => rest.to_owned(),
        None => name,
    }
}

/// Reads the process metrics that change at every scrape.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Where /proc is missing (not Linux) the series is absent rather than a misleading 0.
        if let Some(rss) = resident_memory_bytes() {
            let gauge = ConstGauge::new(rss);
            let metric = encoder.encode_descriptor(
                "process_resident_memory",
                "Resident memory size of the process.",
                Some(&Unit::Bytes),
                gauge.metric_type(),
            )?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

/// Resident set size in bytes. Read from `VmRSS` in `/proc/self/status` (kB) rather than `/proc/self/statm`
/// (pages): both come from the same kernel counter, but `statm` needs the page size, which only `sysconf`
/// knows (16 or 64 KiB on some arm64 kernels) and this crate has no libc binding.
fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kb = line.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
    Some(kb * 1024)
}

/// Seconds since the Unix epoch when the process started: from `/proc` on Linux (so it is right even if the
/// registry is created late), else when the first [`Metrics`] was created.
fn process_start_time() -> f64 {
    static FIRST_SEEN: OnceLock<f64> = OnceLock::new();
    let first_seen =
        *FIRST_SEEN.get_or_init(|| SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64());
    let proc = std::fs::read_to_string("/proc/self/stat").ok().zip(std::fs::read_to_string("/proc/stat").ok());
    proc.and_then(|(stat, system)| parse_start_time(&stat, &system)).unwrap_or(first_seen)
}

/// `btime` (boot time, epoch seconds, from `/proc/stat`) plus `starttime` (field 22 of `/proc/self/stat`, in
/// clock ticks since boot). A tick is `USER_HZ`, which the kernel fixes at 100 in its userspace ABI on the
/// architectures we ship (x86_64, arm64); `sysconf` would say so but needs libc.
fn parse_start_time(self_stat: &str, proc_stat: &str) -> Option<f64> {
    const USER_HZ: f64 = 100.0;
    let btime: f64 = proc_stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()?;
    // The command name (field 2) is in parentheses and may contain spaces or ')', so count from the last ')':
    // the field after it is field 3 (state), making starttime the 20th (index 19).
    let after_comm = &self_stat[self_stat.rfind(')')? + 1..];
    let ticks: f64 = after_comm.split_whitespace().nth(19)?.parse().ok()?;
    Some(btime + ticks / USER_HZ)
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    fn sample(text: &str, name: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn registered_metrics_get_the_prefix_once() {
        let metrics = Metrics::new();
        let plain: Counter = Counter::default();
        let prefixed: Counter = Counter::default();
        metrics.register("requests", "Requests served", plain.clone());
        metrics.register("mesh_errors", "Errors", prefixed.clone());
        plain.inc_by(3);
        prefixed.inc();
        let text = metrics.clone().encode().unwrap();
        assert_eq!(sample(&text, "mesh_requests_total"), Some(3.0), "{text}");
        assert_eq!(sample(&text, "mesh_errors_total"), Some(1.0), "{text}");
        assert!(!text.contains("mesh_mesh_"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn clones_share_the_registry() {
        let metrics = Metrics::new();
        let gauge: prometheus_client::metrics::gauge::Gauge = Default::default();
        metrics.clone().with_registry(|r| r.sub_registry_with_prefix("xds").register("streams", "Open", gauge.clone()));
        gauge.set(2);
        let text = metrics.encode().unwrap();
        assert_eq!(sample(&text, "mesh_xds_streams"), Some(2.0), "{text}");
    }

    #[test]
    fn process_metrics_are_there_and_plausible() {
        let text = Metrics::new().encode().unwrap();
        assert!(text.contains(&format!("mesh_build_info{{version=\"{VERSION}\"}} 1")), "{text}");
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
        let start = sample(&text, "mesh_process_start_time_seconds").expect("start time");
        // Started before now (a second of slack for btime's rounding), and not before 2020.
        assert!(start <= now + 1.0 && start > 1_577_836_800.0, "start {start}, now {now}");
        if cfg!(target_os = "linux") {
            let rss = sample(&text, "mesh_process_resident_memory_bytes").expect("rss");
            assert!(rss > 1024.0 * 1024.0, "a running test binary uses more than 1 MiB: {rss}");
        }
    }

    #[test]
    fn proc_parsing() {
        assert_eq!(parse_vm_rss("Name:\tx\nVmRSS:\t   2048 kB\nVmSwap: 0 kB\n"), Some(2048 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        // A command name with spaces and a ')' must not shift the fields.
        let stat = format!("42 (we ird) x) S {} 500 rest", "1 ".repeat(18));
        assert_eq!(parse_start_time(&stat, "cpu 1 2\nbtime 1700000000\n"), Some(1_700_000_005.0));
        assert_eq!(parse_start_time("42 (x) S 1", "btime 1"), None);
    }
}

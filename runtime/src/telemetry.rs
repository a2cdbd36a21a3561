//! Tracing setup: one subscriber per process, its filter changeable at run time.
//!
//! Why it looks like this:
//! - **Filter behind a `reload` layer**, so the admin `/logging` endpoint can turn on `debug` for one module
//!   of a running proxy without a restart (restarting would drop the very connections being debugged).
//! - **`RUST_LOG` wins over the flag default**, as every Rust developer expects; an invalid `RUST_LOG` is an
//!   error rather than silently ignored, so a typo does not look like "no logs".
//! - **Logs go to stderr**, never stdout: `meshctl snapshot > FILE` writes its result to stdout.
//! - **`log` records are bridged** with `tracing-log`, because pingora (and other dependencies) log through
//!   the `log` crate; without the bridge their output would vanish.
//! - **JSON or text**: JSON for clusters (one object per line for log shippers), text for people.

use std::io::IsTerminal;

use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::registry::Registry;
use tracing_subscriber::{EnvFilter, fmt, reload};

use crate::RuntimeError;

/// The environment variable that overrides the default filter.
pub const ENV_FILTER_VAR: &str = "RUST_LOG";

/// Errors setting up or changing logging.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A filter string is not valid `EnvFilter` syntax.
    #[error(
        "invalid log filter {filter:?} (from {origin}): {source}; \
         expected comma-separated directives such as `info` or `info,mesh_proxy=debug`"
    )]
    InvalidFilter {
        /// Where the filter came from (`RUST_LOG`, the command line, `/logging`), so the user knows what to fix.
        origin: &'static str,
        /// The filter as given.
        filter: String,
        /// What the parser said.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber was installed before; tracing allows one per process.
    #[error("a global tracing subscriber is already installed; call init_tracing once, from main: {0}")]
    AlreadyInitialized(#[source] tracing::subscriber::SetGlobalDefaultError),
    /// Another `log` logger was installed before, so `log` records cannot be bridged into tracing.
    #[error("another `log` logger is already installed (env_logger?); remove it, mesh bridges `log` itself: {0}")]
    LogBridge(#[source] tracing_log::log::SetLoggerError),
    /// The subscriber this handle controlled no longer exists.
    #[error("cannot change the log filter, the subscriber behind this handle is gone: {0}")]
    Reload(#[source] reload::Error),
}

/// The subscriber stack under the output layer: the registry with the reloadable filter on top.
type Filtered = tracing_subscriber::layer::Layered<reload::Layer<EnvFilter, Registry>, Registry>;

/// Changes the log filter of the subscriber that [`init_tracing`] installed. Cheap to clone: hand one to
/// the admin server.
#[derive(Debug, Clone)]
pub struct ReloadHandle {
    inner: reload::Handle<EnvFilter, Registry>,
}

impl ReloadHandle {
    /// Replaces the filter, e.g. `info,mesh_proxy::splice=trace`. On error the old filter stays in force.
    pub fn set_filter(&self, filter: &str) -> Result<(), RuntimeError> {
        let parsed = parse_filter(filter, "set_filter")?;
        self.inner.reload(parsed).map_err(TelemetryError::Reload)?;
        Ok(())
    }

    /// The filter now in force, in the syntax [`set_filter`](Self::set_filter) accepts (for `GET /logging`).
    pub fn filter(&self) -> Result<String, RuntimeError> {
        Ok(self.inner.with_current(|f| f.to_string()).map_err(TelemetryError::Reload)?)
    }
}

/// Installs the process-wide subscriber, writing to stderr, and returns the handle that changes its filter.
///
/// `filter` is used unless `RUST_LOG` is set (and non-empty). `json` selects one JSON object per line
/// instead of human-readable text. Call once, from `main`; a second call fails with
/// [`TelemetryError::AlreadyInitialized`].
pub fn init_tracing(filter: &str, json: bool) -> Result<ReloadHandle, RuntimeError> {
    let env = std::env::var(ENV_FILTER_VAR).ok();
    let filter = choose_filter(env.as_deref(), filter)?;
    let ansi = std::io::stderr().is_terminal();
    let (subscriber, handle) = build(filter, json, ansi, std::io::stderr);
    tracing::subscriber::set_global_default(subscriber).map_err(TelemetryError::AlreadyInitialized)?;
    // `log` checks its own max level before calling the bridge, so start it at tracing's: records nobody
    // wants are dropped in the macro. `reload::Handle` (tracing-subscriber's default `tracing-log` feature)
    // moves `log`'s max level along with every filter change, so `/logging` raising the level works for
    // `log` records too (tested below).
    tracing_log::LogTracer::builder()
        .with_max_level(tracing_log::AsLog::as_log(&tracing::level_filters::LevelFilter::current()))
        .init()
        .map_err(TelemetryError::LogBridge)?;
    Ok(handle)
}

/// Picks `RUST_LOG` when set and non-empty, else the default; both must parse.
fn choose_filter(env: Option<&str>, default: &str) -> Result<EnvFilter, TelemetryError> {
    match env.map(str::trim).filter(|s| !s.is_empty()) {
        Some(env) => parse_filter(env, ENV_FILTER_VAR),
        None => parse_filter(default, "the default filter"),
    }
}

fn parse_filter(filter: &str, origin: &'static str) -> Result<EnvFilter, TelemetryError> {
    EnvFilter::builder().parse(filter).map_err(|source| TelemetryError::InvalidFilter {
        origin,
        filter: filter.to_owned(),
        source,
    })
}

/// Builds the subscriber without installing it, so tests can run it scoped with their own writer.
fn build<W>(filter: EnvFilter, json: bool, ansi: bool, writer: W) -> (impl Subscriber + Send + Sync, ReloadHandle)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let (filter, handle) = reload::Layer::new(filter);
    let output: Box<dyn Layer<Filtered> + Send + Sync> = if json {
        fmt::layer().json().flatten_event(true).with_current_span(true).with_writer(writer).boxed()
    } else {
        fmt::layer().with_ansi(ansi).with_writer(writer).boxed()
    };
    let subscriber = Registry::default().with(filter).with(output);
    (subscriber, ReloadHandle { inner: handle })
}

/// The logging flags every binary takes (`#[command(flatten)]` them).
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log filter (tracing EnvFilter syntax; RUST_LOG overrides).
    #[arg(long, env = "MESH_LOG", default_value = "info")]
    pub log: String,
    /// Log as JSON lines.
    #[arg(long, env = "MESH_LOG_JSON")]
    pub log_json: bool,
}

impl LogArgs {
    /// Installs the process's subscriber as the flags say ([`init_tracing`]).
    pub fn init(&self) -> Result<ReloadHandle, RuntimeError> {
        init_tracing(&self.log, self.log_json)
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer that keeps what was logged, for assertions.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Capture {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    impl io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn capture(filter: &str, json: bool) -> (impl Subscriber + Send + Sync, ReloadHandle, Capture) {
        let out = Capture::default();
        let writer = out.clone();
        let (sub, handle) = build(parse_filter(filter, "test").unwrap(), json, false, move || writer.clone());
        (sub, handle, out)
    }

    #[test]
    fn rust_log_wins_over_default_and_blank_is_unset() {
        assert_eq!(choose_filter(Some("debug"), "info").unwrap().to_string(), "debug");
        assert_eq!(choose_filter(None, "info").unwrap().to_string(), "info");
        assert_eq!(choose_filter(Some("  "), "warn").unwrap().to_string(), "warn");
    }

    #[test]
    fn invalid_filters_name_their_origin() {
        let e = choose_filter(Some("mesh=loud"), "info").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("RUST_LOG") && msg.contains("mesh=loud"), "{msg}");
        let e = choose_filter(None, "mesh=loud").unwrap_err();
        assert!(e.to_string().contains("the default filter"), "{e}");
    }

    #[test]
    fn filter_applies_and_reload_changes_it() {
        let (sub, handle, out) = capture("info", false);
        tracing::subscriber::with_default(sub, || {
            tracing::debug!("hidden before reload");
            tracing::info!("shown always");
            handle.set_filter("debug").unwrap();
            assert_eq!(handle.filter().unwrap(), "debug");
            tracing::debug!("shown after reload");
        });
        let text = out.text();
        assert!(!text.contains("hidden before reload"), "{text}");
        assert!(text.contains("shown always"), "{text}");
        assert!(text.contains("shown after reload"), "{text}");
    }

    #[test]
    fn a_bad_reload_keeps_the_old_filter() {
        let (sub, handle, out) = capture("warn", false);
        tracing::subscriber::with_default(sub, || {
            let e = handle.set_filter("x=nope").unwrap_err();
            assert!(matches!(e, RuntimeError::Telemetry(TelemetryError::InvalidFilter { .. })), "{e}");
            assert_eq!(handle.filter().unwrap(), "warn");
            tracing::info!("still hidden");
            tracing::warn!("still shown");
        });
        let text = out.text();
        assert!(!text.contains("still hidden") && text.contains("still shown"), "{text}");
    }

    #[test]
    fn json_is_one_object_per_line_with_fields_flattened() {
        let (sub, _handle, out) = capture("info", true);
        tracing::subscriber::with_default(sub, || tracing::info!(answer = 42, "hello"));
        let text = out.text();
        let line = text.lines().next().unwrap_or_default();
        assert!(line.starts_with('{') && line.ends_with('}'), "{text}");
        assert!(line.contains(r#""message":"hello""#) && line.contains(r#""answer":42"#), "{text}");
        assert!(line.contains(r#""level":"INFO""#), "{text}");
    }

    #[test]
    fn reload_fails_cleanly_once_the_subscriber_is_gone() {
        let (sub, handle, _out) = capture("info", false);
        drop(sub);
        let e = handle.set_filter("debug").unwrap_err();
        assert!(matches!(e, RuntimeError::Telemetry(TelemetryError::Reload(_))), "{e}");
    }

    /// The only test that installs globally (a process gets one subscriber and one `log` logger).
    #[test]
    fn init_installs_once_and_bridges_log() {
        // RUST_LOG from the developer's shell must not make this fail, so only check the install if it parses.
        let handle = match init_tracing("info", false) {
            Ok(h) => h,
            Err(RuntimeError::Telemetry(TelemetryError::InvalidFilter { origin: ENV_FILTER_VAR, .. })) => return,
            Err(e) => panic!("{e}"),
        };
        handle.set_filter("warn").unwrap();
        assert_eq!(handle.filter().unwrap(), "warn");
        // Raising the level must raise `log`'s own max level too, or `log`'s debug records never reach us.
        handle.set_filter("debug").unwrap();
        assert!(tracing_log::log::max_level() >= tracing_log::log::LevelFilter::Debug);
        let again = init_tracing("info", false).unwrap_err();
        assert!(matches!(again, RuntimeError::Telemetry(TelemetryError::AlreadyInitialized(_))), "{again}");

        // `log` records reach whichever tracing subscriber is current, here a scoped one we can read.
        let (sub, _h, out) = capture("info", false);
        tracing::subscriber::with_default(sub, || tracing_log::log::info!(target: "pingora", "from the log crate"));
        let text = out.text();
        assert!(text.contains("from the log crate") && text.contains("pingora"), "{text}");
    }
}

//! Process plumbing shared by the mesh binaries (`mesh-control`, `mesh-proxy`, `mesh-ingress`, `meshctl`).
//!
//! Every binary starts and stops the same way: [`telemetry::init_tracing`] once in `main`, a
//! [`shutdown::Shutdown`] handed to every task, and [`shutdown::signal`] turning SIGTERM / Ctrl-C into a
//! trigger. Keeping this here, and nothing about routing, means the three binaries cannot drift apart in how
//! they log or drain.
//!
//! Each binary also runs the same localhost admin server ([`admin::AdminServer`]): `/ready` from a
//! [`admin::Readiness`] flag the app flips once loaded, `/metrics` from the shared [`metrics::Metrics`]
//! registry (with process metrics every binary gets for free), `/config_dump` and extra JSON routes from app
//! callbacks, and `/logging` on the [`telemetry::ReloadHandle`].

pub mod accept;
pub mod admin;
pub mod dataplane;
pub mod endpoint;
pub mod memory;
pub mod metrics;
pub mod shutdown;
pub mod telemetry;

pub use admin::{Admin, AdminBuilder, AdminError, AdminServer, JsonSource, LogFilter, Readiness};
pub use metrics::{Metrics, MetricsError};
pub use shutdown::{ConnTracker, Shutdown, ShutdownError, Signal, Tracked};
pub use telemetry::{ReloadHandle, TelemetryError};

/// Any error from this crate: one type for `main` to bubble up, the module's own enum inside for callers
/// that need to tell cases apart.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Setting up or changing logging failed.
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    /// Listening for shutdown signals failed.
    #[error(transparent)]
    Shutdown(#[from] ShutdownError),
    /// Building or starting the admin server failed.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// Rendering metrics failed.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

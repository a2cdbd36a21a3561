//! Process plumbing shared by the mesh binaries (`mesh-control`, `mesh-proxy`, `mesh-ingress`, `meshctl`).
//!
//! Every binary starts and stops the same way: [`telemetry::init_tracing`] once in `main`, a
//! [`shutdown::Shutdown`] handed to every task, and [`shutdown::signal`] turning SIGTERM / Ctrl-C into a
//! trigger. Keeping this here, and nothing about routing, means the three binaries cannot drift apart in how
//! they log or drain.

pub mod shutdown;
pub mod telemetry;

pub use shutdown::{Shutdown, ShutdownError, Signal};
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
}

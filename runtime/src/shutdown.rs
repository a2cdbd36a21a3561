//! Shutdown: the one primitive every task of a binary watches, and the signals that trigger it.
//!
//! Why a sticky flag next to a `Notify` rather than a bare `Notify` or a broadcast: the state is sticky. A task
//! that starts waiting *after* the trigger (an accept loop spawned late, a connection accepted during the
//! drain) must still see it, and a notification sent before it subscribed would be lost. A waiter registers
//! with the `Notify` before it reads the flag, so a trigger in between cannot be missed. Not a `watch`
//! channel: a node proxy holds one flag per Service address (10,000 and more), and a `watch` costs about ten
//! times the memory (its sender carries eight notifiers and a lock).
//!
//! The drain sequence (SIGTERM → stop accepting → finish open connections up to a deadline → exit) is built
//! from this: `main` awaits [`signal`], calls [`Shutdown::trigger`], listeners stop on [`Shutdown::wait`],
//! and `main` bounds the rest with `tokio::time::timeout`.

use std::error::Error;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;
use tracing::{info, warn};

use crate::RuntimeError;

/// Errors listening for shutdown signals.
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    /// The OS refused a signal handler (needs a Tokio runtime with the `signal` driver, i.e. inside
    /// `#[tokio::main]`).
    #[error("cannot listen for {signal}; is this running inside a Tokio runtime? {source}")]
    Listen {
        /// The signal, e.g. `SIGTERM`.
        signal: &'static str,
        /// What the OS or Tokio said.
        #[source]
        source: std::io::Error,
    },
}

/// A shutdown flag shared by every task of a process. Clones share the same flag: trigger any clone and
/// every clone sees it. Triggering is permanent and idempotent.
#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<Flag>,
}

#[derive(Default)]
struct Flag {
    triggered: AtomicBool,
    notify: Notify,
}

impl Shutdown {
    /// A new, untriggered flag.
    pub fn new() -> Self {
        Shutdown { inner: Arc::default() }
    }

    /// Starts the shutdown: every current and future [`wait`](Self::wait) resolves. Calling it again is a
    /// no-op (no second wake-up).
    pub fn trigger(&self) {
        if !self.inner.triggered.swap(true, Ordering::SeqCst) {
            self.inner.notify.notify_waiters();
        }
    }

    /// Whether [`trigger`](Self::trigger) has been called, for loops that poll rather than await.
    pub fn is_triggered(&self) -> bool {
        self.inner.triggered.load(Ordering::SeqCst)
    }

    /// Resolves once the shutdown is triggered; at once if it already was. Cancel-safe, so it can sit in a
    /// `tokio::select!` next to `accept()`.
    pub async fn wait(&self) {
        let notified = self.inner.notify.notified();
        tokio::pin!(notified);
        // Registered before the flag is read: a trigger after the read wakes this waiter.
        notified.as_mut().enable();
        if self.is_triggered() {
            return;
        }
        notified.await;
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shutdown").field("triggered", &self.is_triggered()).finish()
    }
}

/// Which signal asked the process to stop, for the log line that says why it is draining.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: what the kubelet sends when a Pod is deleted.
    Terminate,
    /// SIGINT / Ctrl-C: a developer stopping a local run.
    Interrupt,
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Signal::Terminate => "SIGTERM",
            Signal::Interrupt => "SIGINT",
        })
    }
}

/// Handlers for the stop signals, registered when built. Separate from [`signal`] so a caller (or a test)
/// can register first and only then do what may cause a signal: a signal arriving before registration
/// would take the OS default action and kill the process without a drain.
#[derive(Debug)]
pub struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Registers the SIGTERM and SIGINT handlers. Must be called inside a Tokio runtime.
    pub fn new() -> Result<Self, RuntimeError> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let listen = |kind, name| signal(kind).map_err(|source| ShutdownError::Listen { signal: name, source });
            Ok(Signals {
                term: listen(SignalKind::terminate(), "SIGTERM")?,
                int: listen(SignalKind::interrupt(), "SIGINT")?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Signals {})
        }
    }

    /// Resolves on the next SIGTERM or SIGINT.
    pub async fn recv(&mut self) -> Result<Signal, RuntimeError> {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => Ok(Signal::Terminate),
                _ = self.int.recv() => Ok(Signal::Interrupt),
            }
        }
        #[cfg(not(unix))]
        {
            tokio::signal::ctrl_c().await.map_err(|source| ShutdownError::Listen { signal: "Ctrl-C", source })?;
            Ok(Signal::Interrupt)
        }
    }
}

/// Resolves when the process is asked to stop (SIGTERM or Ctrl-C), saying which. Typical `main`:
///
/// ```no_run
/// # async fn demo() -> Result<(), mesh_runtime::RuntimeError> {
/// let shutdown = mesh_runtime::Shutdown::new();
/// // ... spawn listeners with shutdown.clone() ...
/// let why = mesh_runtime::shutdown::signal().await?;
/// tracing::info!(%why, "draining");
/// shutdown.trigger();
/// # Ok(()) }
/// ```
pub async fn signal() -> Result<Signal, RuntimeError> {
    Signals::new()?.recv().await
}

/// Counts open connections so a drain can wait for them: the second half of the drain primitive (stop accepting
/// with [`Shutdown`], then wait here, bounded). Shared by the node proxy and the ingress.
#[derive(Debug, Default)]
pub struct ConnTracker {
    open: AtomicUsize,
    idle: Notify,
}

/// Holds one count in a [`ConnTracker`] while it lives (also when its task is cancelled).
#[derive(Debug)]
pub struct Tracked(Arc<ConnTracker>);

impl ConnTracker {
    /// Counts a connection until the returned guard drops.
    pub fn track(self: &Arc<Self>) -> Tracked {
        self.open.fetch_add(1, Ordering::SeqCst);
        Tracked(self.clone())
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Waits until no connection is open, or `deadline` passes; returns how many are still open.
    pub async fn wait_idle(&self, deadline: std::time::Duration) -> usize {
        let wait = async {
            loop {
                let notified = self.idle.notified();
                if self.open() == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(deadline, wait).await;
        self.open()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Why `main` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The signal handlers could not be installed.
    #[error(transparent)]
    Signals(#[from] RuntimeError),
    /// The binary could not start.
    #[error("starting {what}")]
    Start {
        /// The binary.
        what: &'static str,
        /// Why.
        #[source]
        source: Box<dyn Error + Send + Sync>,
    },
}

/// `main`'s tail in every binary. SIGTERM and Ctrl-C are caught from before `build` runs (a stop during
/// start-up is still a clean stop); once built, the line `banner` makes is printed to stdout (what supervisors
/// and tests wait for); on the first signal, `stop` (the binary's drain) runs to completion.
pub async fn run_until_signal<A, E>(
    what: &'static str,
    build: impl Future<Output = Result<A, E>>,
    banner: impl FnOnce(&A) -> String,
    stop: impl AsyncFnOnce(A),
) -> Result<(), RunError>
where
    E: Error + Send + Sync + 'static,
{
    let mut signals = Signals::new()?;
    let app = build.await.map_err(|e| RunError::Start { what, source: Box::new(e) })?;
    println!("{}", banner(&app));
    let signal = signals.recv().await?;
    info!(?signal, "stopping");
    stop(app).await;
    Ok(())
}

/// Logs what a drain left behind: connections still open at its deadline (closed now).
pub fn report_drain(left: usize) {
    if left > 0 {
        warn!(left, "drain deadline passed with connections still open; closing them");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::timeout;

    use super::*;

    #[tokio::test]
    async fn a_tracker_waits_for_its_connections_up_to_a_deadline() {
        let t = Arc::new(ConnTracker::default());
        let a = t.track();
        let b = t.track();
        assert_eq!(t.open(), 2);
        assert_eq!(t.wait_idle(Duration::from_millis(1)).await, 2, "the deadline bounds the wait");
        drop(a);
        let waiter = tokio::spawn({
            let t = t.clone();
            async move { t.wait_idle(Duration::from_secs(60)).await }
        });
        drop(b);
        assert_eq!(waiter.await.unwrap(), 0, "the last close wakes the waiter");
    }

    /// Bound for things that must happen; generous so a loaded CI machine does not flake.
    const SOON: Duration = Duration::from_secs(5);
    /// How long we watch something that must *not* happen.
    const A_WHILE: Duration = Duration::from_millis(50);

    #[test]
    fn a_clone_sees_a_trigger() {
        let a = Shutdown::new();
        let b = a.clone();
        assert!(!a.is_triggered() && !b.is_triggered());
        b.trigger();
        assert!(a.is_triggered() && b.is_triggered());
        a.trigger(); // idempotent
        assert!(a.is_triggered());
        assert_eq!(format!("{a:?}"), "Shutdown { triggered: true }");
    }

    #[tokio::test]
    async fn wait_blocks_until_trigger() {
        let s = Shutdown::new();
        assert!(timeout(A_WHILE, s.wait()).await.is_err(), "wait resolved without a trigger");
        s.trigger();
        timeout(SOON, s.wait()).await.expect("wait did not resolve after trigger");
    }

    #[tokio::test]
    async fn wait_resolves_for_waiters_started_before_and_after() {
        let s = Shutdown::new();
        let early: Vec<_> = (0..3)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move { s.wait().await })
            })
            .collect();
        let trigger = s.clone();
        tokio::spawn(async move { trigger.trigger() });
        for w in early {
            timeout(SOON, w).await.expect("an early waiter was not woken").unwrap();
        }
        // A waiter that starts after the trigger must not miss it (why this is a `watch`, not a `Notify`).
        let late = s.clone();
        timeout(SOON, late.wait()).await.expect("a late waiter missed the trigger");
    }

    #[tokio::test]
    async fn wait_is_cancel_safe_in_select() {
        let s = Shutdown::new();
        for _ in 0..3 {
            tokio::select! {
                _ = s.wait() => panic!("not triggered yet"),
                _ = tokio::task::yield_now() => {}
            }
        }
        s.trigger();
        timeout(SOON, s.wait()).await.unwrap();
    }

    #[test]
    fn signal_names() {
        assert_eq!(Signal::Terminate.to_string(), "SIGTERM");
        assert_eq!(Signal::Interrupt.to_string(), "SIGINT");
    }

    /// Sends a real SIGTERM to this test process, after the handler is registered (so it cannot kill us).
    #[cfg(unix)]
    #[tokio::test]
    async fn sigterm_is_seen() {
        let mut signals = Signals::new().unwrap();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .expect("run kill(1)");
        assert!(status.success());
        let got = timeout(SOON, signals.recv()).await.expect("SIGTERM not seen").unwrap();
        assert_eq!(got, Signal::Terminate);
    }
}

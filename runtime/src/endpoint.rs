//! What both data planes know about an upstream endpoint while they send it traffic: the live counters that
//! survive configuration updates ([`EndpointStats`]), the in-flight guard ([`InFlight`]), and the ejection rule
//! ([`EJECT_AFTER_FAILURES`] failed connects in a row take an endpoint out for [`EJECT_FOR`]). `mesh-proxy`
//! counts connections with it, `mesh-ingress` requests; which endpoint to pick stays theirs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Connect failures in a row that eject an endpoint.
pub const EJECT_AFTER_FAILURES: u32 = 3;
/// How long an ejection lasts.
pub const EJECT_FOR: Duration = Duration::from_secs(10);

/// Milliseconds since the process's first call: a cheap monotonic clock for ejection deadlines.
pub fn now_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Two different random indices below `n` (at least 2): the power of two choices, whose less loaded one takes
/// the next connection or request. Near-optimal spread with O(1) work and no shared state to contend on.
pub fn two_choices(n: usize) -> (usize, usize) {
    debug_assert!(n >= 2);
    let a = fastrand::usize(..n);
    let mut b = fastrand::usize(..n - 1);
    if b >= a {
        b += 1;
    }
    (a, b)
}

/// Live counters of one endpoint, shared across table versions (matched by address), so a configuration push
/// resets neither in-flight counts nor ejections. Small on purpose: a big cluster has a hundred thousand.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Connections, UDP flows or requests in flight to it now.
    pub active: AtomicU32,
    /// Connect failures in a row.
    pub failures: AtomicU32,
    /// Ejected until this [`now_ms`] (0: not ejected).
    pub ejected_until_ms: AtomicU64,
}

impl EndpointStats {
    /// Whether it is ejected at `now_ms`.
    pub fn ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// Records a failed connect; true when this failure ejected the endpoint.
    pub fn connect_failed(&self) -> bool {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= EJECT_AFTER_FAILURES {
            self.failures.store(0, Ordering::Relaxed);
            self.ejected_until_ms.store(now_ms() + EJECT_FOR.as_millis() as u64, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Records a successful connect (a write only when there were failures: the common case stays read-only).
    pub fn connected(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Open connections, flows or requests now.
    pub fn in_flight(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }
}

/// Counts one connection, flow or request on an endpoint while it lives (also when its task is cancelled).
#[derive(Debug)]
pub struct InFlight(Arc<EndpointStats>);

impl InFlight {
    /// Starts counting.
    pub fn new(stats: &Arc<EndpointStats>) -> Self {
        stats.active.fetch_add(1, Ordering::Relaxed);
        InFlight(stats.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_failures_in_a_row_eject_and_a_success_forgives() {
        let s = EndpointStats::default();
        assert!(!s.connect_failed());
        assert!(!s.connect_failed());
        s.connected();
        assert!(!s.connect_failed(), "a success in between starts the count again");
        assert!(!s.connect_failed());
        assert!(!s.ejected(now_ms()));
        assert!(s.connect_failed(), "the third failure in a row ejects");
        assert!(s.ejected(now_ms()));
        assert!(!s.ejected(now_ms() + EJECT_FOR.as_millis() as u64 + 1), "for EJECT_FOR");
    }

    #[test]
    fn two_choices_are_two_different_indices() {
        for n in [2, 3, 10] {
            for _ in 0..200 {
                let (a, b) = two_choices(n);
                assert!(a != b && a < n && b < n, "{n}: {a} {b}");
            }
        }
    }

    #[test]
    fn in_flight_counts_while_held() {
        let s = Arc::new(EndpointStats::default());
        let a = InFlight::new(&s);
        let b = InFlight::new(&s);
        assert_eq!(s.in_flight(), 2);
        drop(a);
        assert_eq!(s.in_flight(), 1);
        drop(b);
        assert_eq!(s.in_flight(), 0);
    }
}

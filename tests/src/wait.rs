//! Bounded polling: wait for a condition, never for a fixed time. [`eventually`] for a check that can fail
//! with a reason (end-to-end), [`assert_eventually!`](crate::assert_eventually) for a condition in a test of
//! any crate (unit tests included).

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How long [`assert_eventually!`](crate::assert_eventually) waits by default: generous, so a loaded machine
/// does not flake, and only ever spent by a test that is failing anyway.
pub const SOON: Duration = Duration::from_secs(20);

/// Polls the condition (a `bool` expression, evaluated again each time; it may `.await`) until it holds, and
/// panics with the message (`format!` arguments) if it still does not after [`SOON`], or after the duration
/// given as `within D,`. Must be used in an async context.
///
/// ```ignore
/// assert_eventually!(proxy.open() == 0, "the connection closes");
/// assert_eventually!(within Duration::from_secs(2), ready(&addr).await, "{addr} is ready");
/// ```
#[macro_export]
macro_rules! assert_eventually {
    (within $timeout:expr, $cond:expr, $($msg:tt)+) => {{
        let mut poll = $crate::wait::Poll::new($timeout);
        while !($cond) {
            if poll.expired() {
                panic!("{}: still false after {:?}", format!($($msg)+), poll.timeout());
            }
            poll.pause().await;
        }
    }};
    ($cond:expr, $($msg:tt)+) => {
        $crate::assert_eventually!(within $crate::wait::SOON, $cond, $($msg)+)
    };
}

/// The state of one [`assert_eventually!`](crate::assert_eventually): its deadline and the next pause (5 ms,
/// doubling up to 100 ms).
#[derive(Debug)]
pub struct Poll {
    deadline: Instant,
    timeout: Duration,
    pause: Duration,
}

impl Poll {
    /// Starts polling for at most `timeout`.
    pub fn new(timeout: Duration) -> Poll {
        Poll { deadline: Instant::now() + timeout, timeout, pause: Duration::from_millis(5) }
    }

    /// Whether the deadline has passed.
    pub fn expired(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// The whole time allowed.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Waits before the next attempt.
    pub async fn pause(&mut self) {
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(Duration::from_millis(100));
    }
}

/// Polls `check` until it returns `Ok`, for at most `timeout`; returns its value, or an error naming `what`
/// with the last failure. Each attempt is itself bounded by the time left, so a hung attempt cannot outlive
/// the deadline. The pause between attempts starts at 10 ms and doubles up to 200 ms.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(10);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        let last = match tokio::time::timeout(left, check()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e,
            Err(_) => anyhow::anyhow!("the attempt did not finish before the deadline"),
        };
        if Instant::now() + pause >= deadline {
            anyhow::bail!("{what}: still failing after {timeout:?} ({attempts} attempts); last failure: {last:#}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn returns_the_first_success() {
        let n = AtomicU32::new(0);
        let v = eventually(Duration::from_secs(5), "counter reaches 3", || async {
            let v = n.fetch_add(1, Ordering::SeqCst) + 1;
            if v >= 3 { Ok(v) } else { anyhow::bail!("only {v}") }
        })
        .await
        .unwrap();
        assert_eq!(v, 3);
    }

    #[tokio::test]
    async fn assert_eventually_waits_for_the_condition() {
        let n = AtomicU32::new(0);
        crate::assert_eventually!(n.fetch_add(1, Ordering::SeqCst) >= 3, "counter reaches {}", 3);
        assert_eq!(n.load(Ordering::SeqCst), 4);
        let ready = || async { true };
        crate::assert_eventually!(within Duration::from_millis(50), ready().await, "an awaited condition");
    }

    #[tokio::test]
    #[should_panic(expected = "never true: still false after")]
    async fn assert_eventually_fails_at_the_deadline() {
        crate::assert_eventually!(within Duration::from_millis(30), false, "never {}", "true");
    }

    #[tokio::test]
    async fn fails_with_the_last_error_at_the_deadline() {
        let err = eventually(Duration::from_millis(100), "never", || async { Err::<(), _>(anyhow::anyhow!("nope")) })
            .await
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("never") && msg.contains("nope"), "{msg}");
    }
}

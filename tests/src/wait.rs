//! Bounded polling: wait for a condition, never for a fixed time.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

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
    async fn fails_with_the_last_error_at_the_deadline() {
        let err = eventually(Duration::from_millis(100), "never", || async { Err::<(), _>(anyhow::anyhow!("nope")) })
            .await
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("never") && msg.contains("nope"), "{msg}");
    }
}

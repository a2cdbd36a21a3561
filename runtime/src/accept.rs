//! What an accept loop does after `accept` fails: one rule for every listener of every binary.
//!
//! An error the client caused (it gave up between the handshake and `accept`) is nothing to wait for. Any other
//! (typically out of file descriptors or memory) would recur at once: the loop pauses for [`BACKOFF`] so open
//! connections can close and free what it needs, rather than spinning a core.

use std::io;
use std::time::Duration;

/// How long an accept loop pauses after an accept error that would recur at once.
pub const BACKOFF: Duration = Duration::from_millis(100);

/// Whether an accept error is the client's (it went away before `accept`): retry at once.
pub fn client_went_away(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted)
}

/// After an accept error: returns at once when the client caused it, else after [`BACKOFF`].
pub async fn pause_after(e: &io::Error) {
    if !client_went_away(e) {
        tokio::time::sleep(BACKOFF).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pauses_only_for_errors_that_recur() {
        let t0 = std::time::Instant::now();
        pause_after(&io::Error::from(io::ErrorKind::ConnectionAborted)).await;
        assert!(t0.elapsed() < BACKOFF, "a client that went away is no reason to wait");
        let t1 = std::time::Instant::now();
        pause_after(&io::Error::from_raw_os_error(24)).await; // EMFILE: out of file descriptors
        assert!(t1.elapsed() >= BACKOFF);
    }
}

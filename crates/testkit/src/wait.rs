//! Bounded polling, for tests that wait on state they cannot await.

use std::time::Duration;

/// Checks `condition` every `every` until it holds or `limit` has passed;
/// returns whether it held, so the caller's assertion can say what failed.
pub async fn poll_until(
    limit: Duration,
    every: Duration,
    mut condition: impl FnMut() -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

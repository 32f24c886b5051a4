//! The queue's look at its store once a second: the census, due mail
//! from elsewhere, orphaned passthrough messages, the store's health and
//! a shared database's clock.

use std::sync::Weak;
use std::time::{Duration, SystemTime};

use relay_outcome::Reason;
use relay_store::{MessageState, Store};

use crate::view::stored_reply;
use crate::QueueError;

use super::{lock, orphan_reply, Inner};

/// How often the queue asks the store what is due (mail from other relays,
/// leases that expired, administrators' retries) and counts the messages.
pub(super) const POLL: Duration = Duration::from_secs(1);

/// How often (in looks at the store) the relay's clock is compared with a
/// shared database's.
const CLOCK_CHECK_EVERY: u64 = 60;

/// Clock drift between a relay and its shared database that is reported:
/// well under any lease (at least 3 s) and the pace's windows.
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(1);

/// Messages per state, as [`Queue::census`](super::Queue::census) counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Not tried yet (or being tried for the first time).
    pub queued: Tally,
    /// Tried, waiting for the next attempt (or being tried again).
    pub deferred: Tally,
    /// Given up; kept for the administrator.
    pub failed: Tally,
}

/// The messages of one state in a [`Census`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// How many.
    pub count: usize,
    /// When the oldest of them was accepted.
    pub oldest: Option<SystemTime>,
}

/// What the queue's last look at the store found ([`Queue::health`](super::Queue::health)).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// The messages per state at the last successful look.
    pub census: Census,
    /// Why the last look failed (the store is unreachable, say); `None`
    /// when it succeeded.
    pub error: Option<String>,
}

pub(super) async fn census_of(store: &Store) -> Result<Census, QueueError> {
    let mut census = Census::default();
    for (state, count, oldest) in store.census().await? {
        let tally = match state {
            MessageState::Queued => &mut census.queued,
            MessageState::Deferred => &mut census.deferred,
            MessageState::Failed => &mut census.failed,
        };
        *tally = Tally {
            count: usize::try_from(count).unwrap_or(usize::MAX),
            oldest: Some(oldest),
        };
    }
    Ok(census)
}

/// Looks at the store every [`POLL`] until the queue is dropped.
pub(super) async fn watch_store(inner: Weak<Inner>) {
    let mut skewed = false;
    for looks in 0u64.. {
        tokio::time::sleep(POLL).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.look().await;
        if looks % CLOCK_CHECK_EVERY == 0 {
            skewed = check_clock(&inner.store, skewed).await;
        }
    }
}

/// Compares this relay's clock with a shared database's and says so in
/// the log when they drift apart by more than [`MAX_CLOCK_SKEW`] (and when
/// they agree again). Returns whether they are apart now.
async fn check_clock(store: &Store, skewed: bool) -> bool {
    let skew_ms = match store.clock_skew().await {
        Ok(Some(skew_ms)) => skew_ms,
        Ok(None) | Err(_) => return skewed,
    };
    let apart = skew_ms.unsigned_abs() > MAX_CLOCK_SKEW.as_millis() as u64;
    if apart && !skewed {
        let (how, by) = if skew_ms > 0 {
            ("behind", skew_ms)
        } else {
            ("ahead of", -skew_ms)
        };
        tracing::warn!(
            skew_ms,
            "this relay's clock is {}.{:03} s {how} the database server's: relays sharing a database time leases and the pace by their own clocks, so a relay ahead takes over leases early and the pace is off; keep every relay's clock and the database server's in step (NTP, e.g. systemd-timesyncd or chrony)",
            by / 1000,
            by % 1000
        );
    } else if !apart && skewed {
        tracing::info!(
            skew_ms,
            "this relay's clock agrees with the database server's again"
        );
    }
    apart
}

impl Inner {
    /// Looks at the store once: counts the messages, fails orphaned
    /// passthrough messages, and wakes the workers of accounts with due
    /// mail. Remembers what went wrong, for [`Queue::health`](super::Queue::health).
    pub(super) async fn look(&self) {
        let now = SystemTime::now();
        let looked = async {
            let census = census_of(&self.store).await?;
            let due = self.store.due().await?;
            Ok::<_, QueueError>((census, due))
        }
        .await;
        // a write: it may fail (a full disk) where the reads above did not
        let orphans = self
            .store
            .fail_orphans(now, &stored_reply(&orphan_reply()), Reason::Local.as_str())
            .await;
        match orphans {
            Ok(0) => {}
            Ok(count) => tracing::warn!(count, "{}", orphan_reply().text),
            Err(e) => tracing::debug!(error = %e, "cannot fail orphaned passthrough messages now"),
        }
        let mut local = lock(&self.local);
        match looked {
            Ok((census, due)) => {
                if local.health.error.take().is_some() {
                    tracing::info!("the queue's store is reachable again");
                }
                local.health.census = census;
                for (account, at) in due {
                    if at <= now {
                        local.waker(&account).notify_waiters();
                    }
                }
            }
            Err(e) => {
                if local.health.error.is_none() {
                    tracing::error!(error = %e, "the queue's store cannot be reached; mail is refused with 451 until it can");
                }
                local.health.error = Some(e.to_string());
            }
        }
    }
}

//! Limits shared with the other relays on one database: a mailbox's pace
//! and its connection slots live in the [`Store`], which decides for every
//! relay at once under a database lock; so do the pauses and the lower
//! connection count Microsoft's throttling asks for, whichever relay it
//! told.
//!
//! A store that does not answer never lets mail out unpaced or past the
//! cap: admissions and slots wait, retrying with a bounded back-off, until
//! it answers again. A slot is renewed in the background while held; a
//! relay that dies leaves its slots to expire after the queue's
//! `lease_timeout`, as its messages' leases do.

use crate::pace::Limits;
use rand::Rng;
use relay_store::{Admitted, PaceLimits, SlotId, Store, StoreError};
use std::time::{Duration, SystemTime};
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};

/// The first pause after a store error; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// A worker without a slot looks again after this (less up to a half, so
/// the relays' workers do not ask in step).
const SLOT_POLL: Duration = Duration::from_secs(1);

/// The store an account's limits are shared through, and the account's
/// name there (the queue's name for it, as the shared queue keys it).
#[derive(Clone, Debug)]
pub(crate) struct Shared {
    store: Store,
    account: String,
    /// How long a slot lasts unless renewed (renewed every third of it).
    slot_ttl: Duration,
}

impl Shared {
    /// Slots last `slot_ttl` unless renewed, so a dead relay's return.
    pub(crate) fn new(store: Store, account: &str, slot_ttl: Duration) -> Shared {
        Shared {
            store,
            account: account.to_owned(),
            slot_ttl,
        }
    }

    /// How many of a line of messages (their recipients, in order) may go
    /// at `now` by the pace of every relay together, in one question to
    /// the store; those that go are counted.
    pub(crate) async fn pace(
        &self,
        now: SystemTime,
        limits: &Limits,
        line: &[u32],
    ) -> Result<Admitted, StoreError> {
        let limits = PaceLimits {
            messages_per_minute: Some(limits.messages_per_minute),
            recipients_per_day: Some(limits.recipients_per_day),
        };
        self.store.pace_line(&self.account, now, limits, line).await
    }

    /// Pauses the mailbox for every relay until `until`. If the store does
    /// not take it, only this relay pauses.
    pub(crate) async fn pause(&self, until: SystemTime) {
        if let Err(e) = self.store.pause_mailbox(&self.account, until).await {
            tracing::warn!(error = %e, "cannot record the mailbox's pause in the shared database: the other relays go on sending");
        }
    }

    /// Takes one of the mailbox's slots away from every relay from `now`
    /// until `until`. If the store does not take it, only this relay uses
    /// fewer connections.
    pub(crate) async fn fewer_slots(&self, now: SystemTime, until: SystemTime) {
        if let Err(e) = self.store.fewer_slots(&self.account, now, until).await {
            tracing::warn!(error = %e, "cannot record the lower connection count in the shared database: the other relays keep theirs");
        }
    }

    /// One ask for one of the mailbox's `cap` slots across all relays:
    /// `None` when every one is taken, or when the store does not answer
    /// ([`Shared::acquire`] then waits, retrying).
    pub(crate) async fn try_acquire(&self, cap: usize) -> Option<Slot> {
        self.ask(cap).await.unwrap_or_else(|e| {
            tracing::debug!(error = %e, "cannot ask the shared database for a connection slot");
            None
        })
    }

    /// Waits for one of the mailbox's `cap` slots across all relays (fewer
    /// while a `432 4.3.2` reduction lasts); `None` if `shutdown` came
    /// first.
    pub(crate) async fn acquire(&self, cap: usize, shutdown: &CancellationToken) -> Option<Slot> {
        let mut retry = Retry::default();
        let mut told = false;
        loop {
            let asked = tokio::select! {
                _ = shutdown.cancelled() => return None,
                asked = self.ask(cap) => asked,
            };
            let pause = match asked {
                Ok(Some(slot)) => return Some(slot),
                Ok(None) => {
                    if !told {
                        tracing::debug!(cap, "every connection slot of the mailbox is taken (by this or another relay): waiting");
                        told = true;
                    }
                    retry = Retry::default();
                    SLOT_POLL.mul_f64(1.0 - rand::rng().random::<f64>() / 2.0)
                }
                Err(e) => retry.failed("taking a connection slot", &e),
            };
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    async fn ask(&self, cap: usize) -> Result<Option<Slot>, StoreError> {
        let cap = u32::try_from(cap).unwrap_or(u32::MAX);
        let id = self
            .store
            .acquire_slot(&self.account, cap, SystemTime::now(), self.slot_ttl)
            .await?;
        Ok(id.map(|id| Slot::hold(self.store.clone(), id, self.slot_ttl)))
    }
}

/// Pauses between retries after store errors: doubling from
/// [`RETRY_FIRST`] to [`RETRY_MAX`], less up to a quarter.
#[derive(Debug, Default)]
pub(crate) struct Retry {
    failures: u32,
}

impl Retry {
    /// Logs the error (warning once, then quietly) and says how long to
    /// wait before the next try.
    pub(crate) fn failed(&mut self, doing: &str, e: &StoreError) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let doublings = (self.failures - 1).min(16);
        let pause = RETRY_FIRST
            .saturating_mul(1 << doublings)
            .min(RETRY_MAX)
            .mul_f64(1.0 - rand::rng().random::<f64>() / 4.0);
        if self.failures == 1 {
            tracing::warn!(error = %e, retry_in = ?pause, "the shared database does not answer ({doing}); nothing goes out until it does");
        } else {
            tracing::debug!(error = %e, retry_in = ?pause, failures = self.failures, "the shared database still does not answer ({doing})");
        }
        pause
    }
}

/// A connection slot held by a worker, renewed in the background until
/// released. Dropped without [`Slot::release`] (a worker aborted), it
/// stops being renewed and expires.
pub(crate) struct Slot {
    id: SlotId,
    store: Store,
    lost: CancellationToken,
    renewer: AbortOnDropHandle<()>,
}

impl Slot {
    fn hold(store: Store, id: SlotId, ttl: Duration) -> Slot {
        let lost = CancellationToken::new();
        let renewer = tokio::spawn(renew(store.clone(), id.clone(), lost.clone(), ttl));
        Slot {
            id,
            store,
            lost,
            renewer: AbortOnDropHandle::new(renewer),
        }
    }

    /// Resolves when the slot is no longer ours (it expired, and another
    /// relay may have it): the session must close.
    pub(crate) async fn lost(&self) {
        self.lost.cancelled().await
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Gives the slot back to the relays. If the store does not answer, it
    /// comes back by itself when it expires.
    pub(crate) async fn release(self) {
        let Slot {
            id, store, renewer, ..
        } = self;
        drop(renewer);
        if let Err(e) = store.release_slot(id).await {
            tracing::debug!(error = %e, "cannot release the connection slot; it expires by itself");
        }
    }
}

/// Renews `id` every third of `ttl` (two more chances before it would
/// expire) until aborted; cancels `lost` once it is not ours any more:
/// refused, or not renewed before its expiry.
async fn renew(store: Store, id: SlotId, lost: CancellationToken, ttl: Duration) {
    let every = ttl / 3;
    let mut expires = SystemTime::now() + ttl;
    loop {
        tokio::time::sleep(every).await;
        let now = SystemTime::now();
        match store.renew_slot(&id, now, ttl).await {
            Ok(true) => expires = now + ttl,
            Ok(false) => {
                tracing::warn!("the connection slot expired and may be another relay's now: closing the session after this message");
                lost.cancel();
                return;
            }
            Err(e) if SystemTime::now() + every >= expires => {
                tracing::warn!(error = %e, "cannot renew the connection slot before it expires: closing the session after this message");
                lost.cancel();
                return;
            }
            Err(e) => tracing::debug!(error = %e, "cannot renew the connection slot; trying again"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_testkit::SharedDatabase;
    /// How long the tests' slots last unless renewed.
    const MINUTE: Duration = Duration::from_secs(60);

    const LIMIT: Duration = Duration::from_secs(10);

    // The cap holds across relays: b waits while a holds the only slot,
    // gets it once a gives it back, and shutdown ends a wait.
    #[tokio::test]
    async fn without_a_free_slot_a_worker_waits() {
        for database in SharedDatabase::all() {
            let a = Shared::new(database.relay("a").await, "main", MINUTE);
            let b = Shared::new(database.relay("b").await, "main", MINUTE);
            let shutdown = CancellationToken::new();
            let held = a.acquire(1, &shutdown).await.expect("a free slot");
            let waiting = tokio::spawn({
                let (b, shutdown) = (b.clone(), shutdown.clone());
                async move { b.acquire(1, &shutdown).await }
            });
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(!waiting.is_finished(), "{}: past the cap", database.name());
            held.release().await;
            let taken = tokio::time::timeout(LIMIT, waiting)
                .await
                .expect("b gets the slot")
                .expect("no panic")
                .expect("a slot, not shutdown");
            let stopped = tokio::spawn({
                let shutdown = shutdown.clone();
                async move { a.acquire(1, &shutdown).await.is_none() }
            });
            shutdown.cancel();
            let stopped = tokio::time::timeout(LIMIT, stopped).await;
            assert!(stopped.expect("shutdown ends the wait").expect("no panic"));
            taken.release().await;
        }
    }

    // A held slot is renewed; once it is gone (expired and taken over
    // while this relay stalled) the holder is told.
    #[tokio::test]
    async fn a_slot_taken_away_is_lost() {
        for database in SharedDatabase::all() {
            let store = database.relay("a").await;
            let id = store
                .acquire_slot("main", 1, SystemTime::now(), MINUTE)
                .await
                .expect("the store answers")
                .expect("a free slot");
            let lost = CancellationToken::new();
            // Renewed every third of it: only a stall of two thirds (over a
            // second, on a machine busy with other tests) would lose it.
            let ttl = Duration::from_secs(2);
            let _renewer = AbortOnDropHandle::new(tokio::spawn(renew(
                store.clone(),
                id.clone(),
                lost.clone(),
                ttl,
            )));
            tokio::time::sleep(ttl * 2).await;
            assert!(
                !lost.is_cancelled(),
                "{}: renewed while ours",
                database.name()
            );
            store.release_slot(id).await.expect("the store answers");
            tokio::time::timeout(LIMIT, lost.cancelled())
                .await
                .expect("the loss is noticed");
        }
    }
}

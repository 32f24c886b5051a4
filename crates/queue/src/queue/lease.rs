//! Handing due messages to workers: leases taken in batches, renewed
//! while a message is delivered, given back when a worker cannot send.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use relay_store::{Message, Progress, Store};
use tokio::task::JoinHandle;

use crate::{QueueError, QueueId};

use super::watch::POLL;
use super::{lock, Inner, Queue};

/// Due messages leased from the embedded store at once: one transaction
/// serves the worker that asked and the next ones to ask, instead of one
/// each. When fewer than half are left, the next batch is leased in the
/// background, so that a worker finds one waiting rather than waiting for
/// a commit. On a shared database a relay leases one at a time: messages
/// leased ahead would wait for this relay's workers (and its connection
/// slots) while another relay could send them, for minutes under
/// Microsoft 365's pace; the gain, measured, comes only at rates that pace
/// never allows (BENCHMARKS.md).
const LEASE_BATCH: usize = 16;

/// What [`Queue::begin`] found.
#[derive(Debug)]
pub enum Begin {
    /// Send the message: its body.
    Go(Vec<u8>),
    /// Do not send it now; drop the lease.
    Stop,
    /// Its body is not what was enqueued: it is held now. Record the
    /// attempt as a temporary failure.
    Unreadable(QueueError),
}

/// A message leased to a delivery worker by [`Queue::next_due`]: while it
/// exists no other worker, here or on another relay, gets the message. The
/// lease is renewed in the store every third of `lease_timeout` until it is
/// consumed or dropped.
///
/// Consume it with [`Queue::record`]. Dropping it without recording (an
/// error path, a panic, a cancelled task) releases the message: it becomes
/// due again after `retry_initial`, with its state unchanged.
pub struct Lease {
    /// The message's id.
    pub id: QueueId,
    /// The envelope sender; `""` for the null sender.
    pub sender: String,
    /// The upstream account that delivers it.
    pub account: String,
    /// Number of earlier delivery attempts (0 for a fresh message).
    pub attempts: u32,
    /// The recipients to try now: those still pending or deferred.
    pub recipients: Vec<String>,
    /// When the message was accepted.
    pub received_at: SystemTime,
    /// Size of the body in bytes.
    pub size: u64,
    /// The SMTP client that submitted it, if known.
    pub client: Option<IpAddr>,
    /// Its client waits for this attempt's outcome (passthrough mode).
    pub passthrough: bool,
    /// The message's state when leased, which the attempt's results update.
    pub(super) progress: Progress,
    /// Set by the renewal when the store says the lease is no longer ours.
    lost: Arc<AtomicBool>,
    /// The renewal task; stopped when the lease ends.
    renewal: Option<JoinHandle<()>>,
    /// The queue it came from; `None` once consumed by `record`.
    queue: Option<Weak<Inner>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("id", &self.id)
            .field("sender", &self.sender)
            .field("account", &self.account)
            .field("attempts", &self.attempts)
            .field("recipients", &self.recipients)
            .field("received_at", &self.received_at)
            .field("size", &self.size)
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Consumes the lease without releasing it: the caller writes the
    /// outcome. Returns the renewal, to stop once that is written.
    pub(super) fn disarm(&mut self) -> Option<JoinHandle<()>> {
        self.queue = None;
        self.renewal.take()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(renewal) = self.renewal.take() {
            renewal.abort();
        }
        let Some(inner) = self.queue.take().and_then(|w| w.upgrade()) else {
            return;
        };
        tracing::debug!(queue_id = %self.id, "lease dropped without a result; message released");
        // a passthrough client waiting for this attempt learns it will not come
        lock(&inner.local).watchers.remove(&self.id);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let id = self.id.clone();
        let account = self.account.clone();
        runtime.spawn(async move {
            let due = SystemTime::now() + inner.settings.retry_initial;
            match inner.store.release(id.as_str(), due).await {
                Ok(_) => inner.wake_at(&account, inner.settings.retry_initial),
                // the lease expires by itself; the message is taken then
                Err(e) => {
                    tracing::warn!(queue_id = %id, error = %e, "cannot release a lease; the message is due again when it expires")
                }
            }
        });
    }
}

/// Leases up to `batch` of the account's due messages from the store; none
/// if the store cannot be asked (said in the log).
async fn take_due(
    store: &Store,
    account: &str,
    lease_timeout: Duration,
    batch: usize,
) -> Vec<Message> {
    let leased = store
        .lease_due(account, SystemTime::now(), lease_timeout, batch)
        .await;
    leased.unwrap_or_else(|e| {
        tracing::warn!(account, error = %e, "cannot take due mail from the store");
        Vec::new()
    })
}

/// Renews a lease every third of `lease_timeout` until aborted; marks it
/// lost when the store says it is no longer this relay's.
async fn renew(inner: Weak<Inner>, id: QueueId, lost: Arc<AtomicBool>) {
    loop {
        let Some(every) = inner.upgrade().map(|i| i.settings.lease_timeout / 3) else {
            return;
        };
        tokio::time::sleep(every).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let timeout = inner.settings.lease_timeout;
        match inner
            .store
            .renew(id.as_str(), SystemTime::now(), timeout)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(queue_id = %id, "the lease on this message is gone (deleted, or taken over after it expired)");
                lost.store(true, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                tracing::warn!(queue_id = %id, error = %e, "cannot renew a lease; trying again")
            }
        }
    }
}

impl Queue {
    /// Waits until a message of `account` is due and leases it: a
    /// passthrough message accepted by this relay first, then the due
    /// message longest waiting in the store (of any relay) that no relay
    /// holds.
    ///
    /// With `idle = Some(d)`, returns `None` once `d` has passed with nothing
    /// due; with `None` it waits indefinitely. A local enqueue or release
    /// wakes the wait at once; mail from elsewhere (another relay, an
    /// administrator's retry, an expired lease) within a second.
    ///
    /// Cancel-safe: the store's lease is taken in a task of its own whose
    /// [`Lease`], if the caller is gone, is dropped and so released.
    pub async fn next_due(&self, account: &str, idle: Option<Duration>) -> Option<Lease> {
        let deadline = idle.map(|d| tokio::time::Instant::now() + d);
        let waker = lock(&self.inner.local).waker(account);
        loop {
            let notified = waker.notified();
            tokio::pin!(notified);
            // Register before looking, so a wake-up between the look and the
            // wait is not lost.
            notified.as_mut().enable();
            if let Some(lease) = self.handed_off(account) {
                self.lease_ahead(account);
                return Some(lease);
            }
            let inner = self.inner.clone();
            let task_account = account.to_owned();
            let taken = tokio::spawn(async move { inner.lease_next(&task_account).await });
            if let Ok(Some(lease)) = taken.await {
                return Some(lease);
            }
            let wake = deadline.unwrap_or_else(|| tokio::time::Instant::now() + POLL * 60);
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                return self.handed_off(account);
            }
        }
    }

    /// Hands a leased message back unsent, due at once, for whichever
    /// relay sharing the store can send it first (this one included): for
    /// a worker that cannot send it now, so that its lease does not keep
    /// the message from the others. Best effort: a lease not ended here
    /// expires.
    pub async fn give_back(&self, mut lease: Lease) {
        if let Some(renewal) = lease.disarm() {
            renewal.abort();
        }
        let released = self
            .inner
            .store
            .release(lease.id.as_str(), SystemTime::now())
            .await;
        match released {
            Ok(_) => lock(&self.inner.local)
                .waker(&lease.account)
                .notify_waiters(),
            Err(e) => {
                tracing::warn!(queue_id = %lease.id, error = %e, "cannot give a lease back; the message is due again when it expires")
            }
        }
    }

    /// Gives up every lease this relay holds, for a relay that stops after
    /// its workers did: messages leased ahead and not begun, and any lease
    /// a worker left, are due to the other relays sharing the store at once
    /// instead of when their leases expire. An outcome still being written
    /// keeps its lease. Best effort: a lease not ended here expires.
    pub async fn release_all(&self) {
        let (prefetched, keep) = {
            let mut local = lock(&self.inner.local);
            let prefetched: Vec<Lease> = local.prefetched.drain().flat_map(|(_, l)| l).collect();
            let keep: Vec<QueueId> = local.unrecorded.iter().cloned().collect();
            (prefetched, keep)
        };
        for mut lease in prefetched {
            if let Some(renewal) = lease.disarm() {
                renewal.abort();
            }
        }
        let keep: Vec<&str> = keep.iter().map(QueueId::as_str).collect();
        match self.inner.store.release_all(&keep).await {
            Ok(0) => {}
            Ok(count) => tracing::info!(count, "leases given up for the other relays"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot give up this relay's leases; they expire by themselves")
            }
        }
    }

    /// On the embedded store, leases the account's next batch in the
    /// background when fewer than half a batch is left leased ahead (see
    /// [`LEASE_BATCH`]).
    fn lease_ahead(&self, account: &str) {
        if self.inner.settings.database.is_some() {
            return;
        }
        {
            let mut local = lock(&self.inner.local);
            let left = local.prefetched.get(account).map_or(0, VecDeque::len);
            if left >= LEASE_BATCH / 2 || !local.leasing_ahead.insert(account.to_owned()) {
                return;
            }
        }
        // Only the store is held meanwhile: a queue dropped (closed) goes at
        // once, and what this leased is due again when it is next opened.
        let store = self.inner.store.clone();
        let lease_timeout = self.inner.settings.lease_timeout;
        let queue = Arc::downgrade(&self.inner);
        let account = account.to_owned();
        tokio::spawn(async move {
            let messages = take_due(&store, &account, lease_timeout, LEASE_BATCH).await;
            if let Some(inner) = queue.upgrade() {
                let leases = inner.leases_of(messages);
                inner.lease_later(&account, leases.into_iter());
                lock(&inner.local).leasing_ahead.remove(&account);
            }
        });
    }

    fn handed_off(&self, account: &str) -> Option<Lease> {
        let mut local = lock(&self.inner.local);
        if let Some(lease) = local.handoff.get_mut(account).and_then(VecDeque::pop_front) {
            return Some(lease);
        }
        local.prefetched.get_mut(account)?.pop_front()
    }

    /// Says whether the leased message may be handed to the upstream now,
    /// asking the store, and if so reads its body, byte for byte as it was
    /// enqueued (checked against its SHA-256), in the same query. Not to be
    /// sent ([`Begin::Stop`]): an administrator deleted or held it while the
    /// lease waited (for its pacing slot, say), the lease was lost, or the
    /// store cannot be asked; drop the lease. A body that does not match is
    /// never sent: the message is held, for an administrator to look at
    /// ([`Begin::Unreadable`]). After [`Begin::Go`], a deletion or hold no
    /// longer stops this attempt.
    pub async fn begin(&self, lease: &Lease) -> Begin {
        if !self.owns(lease) || lease.lost.load(Ordering::Relaxed) {
            return Begin::Stop;
        }
        let now = SystemTime::now();
        let begun = self
            .inner
            .store
            .begin(lease.id.as_str(), now, self.inner.settings.lease_timeout)
            .await;
        match begun {
            Ok(Some(body)) => Begin::Go(body),
            Ok(None) => Begin::Stop,
            Err(e @ relay_store::StoreError::Checksum { .. }) => {
                tracing::error!(queue_id = %lease.id, error = %e, "message body changed in the store; holding the message, it will not be delivered");
                if let Err(e) = self.inner.store.set_held(&[lease.id.as_str()], true).await {
                    tracing::error!(queue_id = %lease.id, error = %e, "cannot hold the message");
                }
                Begin::Unreadable(e.into())
            }
            Err(e) => {
                tracing::warn!(queue_id = %lease.id, error = %e, "cannot confirm the lease; not sending now");
                Begin::Stop
            }
        }
    }

    pub(super) fn owns(&self, lease: &Lease) -> bool {
        lease
            .queue
            .as_ref()
            .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(&self.inner)))
    }
}

impl Inner {
    /// A lease on a message the store just leased to this relay, renewed
    /// every third of `lease_timeout` until it ends.
    pub(super) fn lease(self: &Arc<Self>, m: Message) -> Result<Lease, QueueError> {
        let id: QueueId = m.envelope.id.parse().map_err(|_| {
            QueueError::corrupt(
                &self.settings.dir,
                format!("stored message id {:?} is not a queue id", m.envelope.id),
            )
        })?;
        let lost = Arc::new(AtomicBool::new(false));
        let renewal = tokio::spawn(renew(Arc::downgrade(self), id.clone(), lost.clone()));
        Ok(Lease {
            recipients: m
                .progress
                .recipients
                .iter()
                .filter(|r| r.state.is_open())
                .map(|r| r.address.clone())
                .collect(),
            sender: m.envelope.sender,
            account: m.envelope.account,
            attempts: m.progress.attempts,
            received_at: m.envelope.received_at,
            size: m.size,
            client: m.envelope.client.and_then(|c| c.parse().ok()),
            passthrough: m.envelope.passthrough,
            progress: m.progress,
            lost,
            renewal: Some(renewal),
            queue: Some(Arc::downgrade(self)),
            id,
        })
    }

    /// Leases the account's next due message from the store, if any, and
    /// on the embedded store up to [`LEASE_BATCH`] - 1 more for the next
    /// workers to ask.
    async fn lease_next(self: Arc<Self>, account: &str) -> Option<Lease> {
        let batch = match self.settings.database {
            None => LEASE_BATCH,
            Some(_) => 1,
        };
        let messages = take_due(&self.store, account, self.settings.lease_timeout, batch).await;
        let mut leases = self.leases_of(messages).into_iter();
        let first = leases.next();
        self.lease_later(account, leases);
        first
    }

    /// Queues leases for the account's next workers to ask, and wakes them.
    fn lease_later(&self, account: &str, leases: impl ExactSizeIterator<Item = Lease>) {
        if leases.len() == 0 {
            return;
        }
        let mut local = lock(&self.local);
        local
            .prefetched
            .entry(account.to_owned())
            .or_default()
            .extend(leases);
        local.waker(account).notify_waiters();
    }

    /// Leases for messages just leased from the store, less those whose
    /// outcome this relay is still writing.
    fn leases_of(self: &Arc<Self>, messages: Vec<Message>) -> Vec<Lease> {
        let mut leases = Vec::with_capacity(messages.len());
        for m in messages {
            let unrecorded = m
                .envelope
                .id
                .parse::<QueueId>()
                .is_ok_and(|id| lock(&self.local).unrecorded.contains(&id));
            if unrecorded {
                // its outcome is still being written by this relay, under
                // this very lease: leave it to that
                continue;
            }
            match self.lease(m) {
                Ok(lease) => leases.push(lease),
                Err(e) => tracing::error!(error = %e, "skipping a stored message"),
            }
        }
        leases
    }
}

//! The in-memory half of the queue: the schedule, leases, and the glue that
//! drives the store.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::id::IdGen;
use crate::meta::{add_time, hex, Meta, Recipient, RecipientState, State, META_VERSION};
use crate::store::{self, Layout, Op};
use crate::{QueueError, QueueId};
use relay_outcome::{Enhanced, Outcome, Reason, Reply, Verdict};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

/// The first wait before an outcome that could not be written is written
/// again; it doubles up to [`UNRECORDED_RETRY_MAX`].
const UNRECORDED_RETRY: Duration = Duration::from_secs(1);
const UNRECORDED_RETRY_MAX: Duration = Duration::from_secs(60);

/// Settings of a [`Queue`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueSettings {
    /// The queue directory. Created (mode 0700) if missing. Must be on a
    /// local file system with working `fsync` and atomic `rename`.
    pub dir: PathBuf,
    /// Delay before the first retry; each further retry doubles it.
    pub retry_initial: Duration,
    /// Upper bound of the retry delay (before ±20% jitter).
    pub retry_max: Duration,
    /// How long after acceptance a message may still be retried; after that
    /// a temporary failure becomes permanent.
    pub max_age: Duration,
}

/// A message accepted by the listener, to be queued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMessage {
    /// The envelope sender (MAIL FROM); `""` for the null sender `<>`.
    pub sender: String,
    /// The envelope recipients (RCPT TO); at least one. Exact duplicates are
    /// dropped.
    pub recipients: Vec<String>,
    /// The upstream account (mailbox) that delivers this message.
    pub account: String,
    /// The address of the SMTP client that submitted it, if known.
    pub client: Option<IpAddr>,
}

/// The result of trying one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecipientResult {
    /// The recipient address, exactly as in [`Lease::recipients`].
    pub recipient: String,
    /// What happened.
    pub outcome: Outcome,
}

/// Messages per state, as [`Queue::census`] counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Not tried yet (or being tried for the first time).
    pub queued: Tally,
    /// Tried, waiting for the next attempt (or being tried again).
    pub deferred: Tally,
    /// Given up; kept on disk for the administrator.
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

impl Tally {
    fn add(&mut self, received_at: SystemTime) {
        self.count += 1;
        self.oldest = Some(self.oldest.map_or(received_at, |t| t.min(received_at)));
    }
}

/// What [`Queue::record`] did with the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Every recipient is delivered; the message is deleted.
    Removed,
    /// Some recipients remain; the message is retried at `next_attempt`.
    Deferred {
        /// When the next attempt is due.
        next_attempt: SystemTime,
    },
    /// Nothing left to try and at least one recipient failed; the message
    /// stays on disk as failed (visible in `queue list`) and is not retried.
    Failed,
}

/// What [`Queue::record`] committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    /// What became of the message.
    pub disposition: Disposition,
    /// The attempt's outcome per recipient as recorded: the results given,
    /// and for each recipient the queue gave up on because the message
    /// reached `max_age`, an outcome with [`Reason::Expired`].
    pub results: Vec<RecipientResult>,
    /// When the message failed: every failed recipient (of this attempt
    /// and of earlier ones) with its last outcome, for a failure notice.
    pub failed: Vec<RecipientResult>,
}

/// A message handed to a delivery worker by [`Queue::next_due`]. While a
/// lease exists no other worker gets the message.
///
/// Consume it with [`Queue::record`]. Dropping it without recording (an
/// error path, a panic, a cancelled task) releases the message: it becomes
/// due again after `retry_initial`, with its state on disk unchanged.
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
    /// Marks the lease as consumed, so dropping it releases nothing.
    fn disarm(&mut self) {
        self.queue = None;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(inner) = self.queue.take().and_then(|w| w.upgrade()) {
            tracing::debug!(queue_id = %self.id, "lease dropped without a result; message released");
            inner.release(&self.id, inner.settings.retry_initial);
        }
    }
}

/// The durable mail queue. Cheap to clone; all clones share one queue.
#[derive(Clone, Debug)]
pub struct Queue {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: QueueSettings,
    layout: Layout,
    ids: IdGen,
    sched: Mutex<Schedule>,
    /// Holds the directory lock for the queue's lifetime.
    _lock: File,
}

/// Every message that is still to be tried, and per account the order in
/// which they are due.
#[derive(Debug, Default)]
struct Schedule {
    messages: HashMap<QueueId, Slot>,
    accounts: HashMap<String, AccountSchedule>,
    /// Those waiting for a message's next recorded attempt ([`Queue::watch`]).
    watchers: HashMap<QueueId, Vec<oneshot::Sender<Vec<RecipientResult>>>>,
    /// Failed messages (on disk only, never tried again) and when each was
    /// accepted, so [`Queue::census`] needs no disk access.
    failed: HashMap<QueueId, SystemTime>,
}

#[derive(Debug)]
struct Slot {
    meta: Meta,
    /// `Some(due)` when waiting (and then in the account's `due` set),
    /// `None` while leased.
    due: Option<Instant>,
    /// An administrator deleted it while it was leased: the attempt's end
    /// removes it instead of recording a result.
    deleted: bool,
    /// Its last attempt's outcome is applied to `meta` but could not be
    /// written yet; it stays out of the schedule until it is.
    unrecorded: bool,
    /// Leased and handed to the upstream ([`Queue::begin`]): an
    /// administrator can no longer stop this attempt.
    in_flight: bool,
}

#[derive(Debug, Default)]
struct AccountSchedule {
    due: BTreeSet<(Instant, QueueId)>,
    notify: Arc<Notify>,
}

impl Schedule {
    fn account(&mut self, account: &str) -> &mut AccountSchedule {
        self.accounts.entry(account.to_string()).or_default()
    }

    /// Puts a message (new, or back from a lease) into its account's
    /// schedule and wakes that account's waiting workers. A held message
    /// is indexed but not scheduled.
    fn insert(&mut self, meta: Meta, due: Instant) {
        let id = meta.id.clone();
        if !meta.held {
            let account = self.account(&meta.account);
            account.due.insert((due, id.clone()));
            account.notify.notify_waiters();
        }
        self.messages.insert(
            id,
            Slot {
                meta,
                due: Some(due),
                deleted: false,
                unrecorded: false,
                in_flight: false,
            },
        );
    }
}

impl Schedule {
    /// Puts a slot back (after a lease) due at `due`; scheduled unless held.
    fn insert_slot(&mut self, mut slot: Slot, due: Instant) {
        let id = slot.meta.id.clone();
        slot.due = Some(due);
        if !slot.meta.held {
            let account = self.account(&slot.meta.account);
            account.due.insert((due, id.clone()));
            account.notify.notify_waiters();
        }
        self.messages.insert(id, slot);
    }
}

/// The body of a message to store.
enum Body {
    /// Received whole, in memory.
    Whole(Vec<u8>),
    /// Spooled to `tmp/` while it was received.
    Spooled(BodyWriter),
}

/// The body of a message being received, spooled to a file under `tmp/`
/// ([`Queue::begin_body`]). The SHA-256 stored in the metadata is computed
/// as the bytes go by. Dropping the writer deletes the file unless the
/// message was committed.
#[derive(Debug)]
pub struct BodyWriter {
    id: QueueId,
    path: PathBuf,
    /// `None` once an append failed or was cancelled: the file is then
    /// incomplete and every later append fails.
    file: Option<File>,
    hasher: Sha256,
    size: u64,
}

impl BodyWriter {
    /// Appends `data`, on a blocking thread. After an error (or a
    /// cancelled append) the writer is unusable; drop it.
    pub async fn append(&mut self, data: &[u8]) -> Result<(), QueueError> {
        use std::io::Write;
        let Some(mut file) = self.file.take() else {
            return Err(QueueError::io(
                "appending to a spooled message",
                &self.path,
                std::io::Error::other("an earlier write failed"),
            ));
        };
        let data = data.to_vec();
        let len = data.len() as u64;
        let path = self.path.clone();
        let dir = self.path.clone();
        let mut hasher = self.hasher.clone();
        let (file, hasher) = blocking(&dir, "spooling a message", move || {
            file.write_all(&data)
                .map_err(|e| QueueError::io("writing", &path, e))?;
            hasher.update(&data);
            Ok((file, hasher))
        })
        .await?;
        self.size += len;
        self.file = Some(file);
        self.hasher = hasher;
        Ok(())
    }

    /// Fsyncs the file; returns its size and hex SHA-256. Blocking.
    fn finish(&mut self) -> Result<(u64, String), QueueError> {
        let file = self.file.take().ok_or_else(|| {
            QueueError::io(
                "finishing a spooled message",
                &self.path,
                std::io::Error::other("an earlier write failed"),
            )
        })?;
        file.sync_all()
            .map_err(|e| QueueError::io("fsyncing", &self.path, e))?;
        Ok((self.size, hex(&self.hasher.clone().finalize())))
    }
}

impl Drop for BodyWriter {
    fn drop(&mut self) {
        // after a commit the file has been renamed away: nothing to delete
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Converts a wall-clock due time into a monotonic instant.
fn instant_for(at: SystemTime) -> Instant {
    let now = Instant::now();
    match at.duration_since(SystemTime::now()) {
        Ok(delay) => instant_after(now, delay),
        Err(_) => now,
    }
}

/// `from + delay`, capped at about a century so it cannot overflow.
fn instant_after(from: Instant, delay: Duration) -> Instant {
    const CAP: Duration = Duration::from_secs(100 * 365 * 86_400);
    from.checked_add(delay.min(CAP)).unwrap_or(from)
}

fn lock(m: &Mutex<Schedule>) -> MutexGuard<'_, Schedule> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Queue {
    /// Opens (creating if needed) the queue in `settings.dir`.
    ///
    /// Takes the directory's lock file (fails with [`QueueError::Locked`] if
    /// another relay holds it), deletes unfinished writes and orphan bodies,
    /// sets corrupt entries aside in `corrupt/`, and schedules every message
    /// that is not failed at its recorded next-attempt time.
    pub async fn open(settings: QueueSettings) -> Result<Queue, QueueError> {
        let layout = Layout::new(&settings.dir);
        let dir = settings.dir.clone();
        let (lock_file, recovered, layout) = blocking(&dir, "opening queue", move || {
            let lock_file = store::prepare(&layout)?;
            let recovered = store::recover(&layout)?;
            Ok((lock_file, recovered, layout))
        })
        .await?;

        let mut sched = Schedule::default();
        let active = recovered.active.len();
        let failed = recovered.failed.len();
        sched.failed.extend(recovered.failed);
        for meta in recovered.active {
            let due = instant_for(meta.next_attempt.unwrap_or(meta.received_at));
            sched.insert(meta, due);
        }
        tracing::info!(
            dir = %settings.dir.display(),
            active,
            failed,
            "queue opened"
        );
        Ok(Queue {
            inner: Arc::new(Inner {
                ids: IdGen::new(recovered.max_micros),
                settings,
                layout,
                sched: Mutex::new(sched),
                _lock: lock_file,
            }),
        })
    }

    /// Stores a message durably and schedules it for immediate delivery.
    ///
    /// When this returns `Ok` the body and metadata are fsynced and
    /// committed: the listener may answer 250. On `Err` nothing was
    /// committed (the listener answers 4xx). The write runs to completion
    /// even if the returned future is dropped, so a committed message is
    /// always scheduled.
    pub async fn enqueue(&self, msg: NewMessage, body: &[u8]) -> Result<QueueId, QueueError> {
        self.insert(msg, Body::Whole(body.to_vec()), None).await
    }

    /// [`Queue::enqueue`] taking the body by value: the listener hands over
    /// the message it received instead of holding it twice.
    pub async fn enqueue_owned(
        &self,
        msg: NewMessage,
        body: Vec<u8>,
    ) -> Result<QueueId, QueueError> {
        self.insert(msg, Body::Whole(body), None).await
    }

    /// Starts the body of a message too large to hold in memory while it
    /// is received: a file under `tmp/` that [`BodyWriter::append`] fills
    /// and [`Queue::enqueue_spooled`] commits. Dropping the writer instead
    /// deletes the file, so a cancelled session leaves nothing behind.
    pub async fn begin_body(&self) -> Result<BodyWriter, QueueError> {
        let id = self.inner.ids.next();
        let path = self.inner.layout.tmp_body_path(&id);
        let task_path = path.clone();
        let file = blocking(&self.inner.settings.dir, "spooling a message", move || {
            store::create_private(&task_path)
        })
        .await?;
        Ok(BodyWriter {
            id,
            path,
            file: Some(file),
            hasher: Sha256::new(),
            size: 0,
        })
    }

    /// Stores a message like [`Queue::enqueue`] whose body so far is in
    /// `writer` and ends with `tail`: appends the tail, fsyncs, and commits
    /// the metadata (the body is renamed into place, not copied).
    pub async fn enqueue_spooled(
        &self,
        msg: NewMessage,
        mut writer: BodyWriter,
        tail: &[u8],
    ) -> Result<QueueId, QueueError> {
        writer.append(tail).await?;
        self.insert(msg, Body::Spooled(writer), None).await
    }

    /// [`Queue::enqueue_passthrough`] for a spooled body (see
    /// [`Queue::enqueue_spooled`]).
    pub async fn enqueue_passthrough_spooled(
        &self,
        msg: NewMessage,
        mut writer: BodyWriter,
        tail: &[u8],
    ) -> Result<(QueueId, oneshot::Receiver<Vec<RecipientResult>>), QueueError> {
        writer.append(tail).await?;
        let (tx, rx) = oneshot::channel();
        let id = self.insert(msg, Body::Spooled(writer), Some(tx)).await?;
        Ok((id, rx))
    }

    /// Stores a message like [`Queue::enqueue`] for a client that waits for
    /// the upstream's answer (passthrough mode): the receiver is
    /// [`Queue::watch`]ing it from the start, so it cannot miss the first
    /// attempt. The lease says it is passthrough; delivery decides what
    /// that means for retries.
    pub async fn enqueue_passthrough(
        &self,
        msg: NewMessage,
        body: Vec<u8>,
    ) -> Result<(QueueId, oneshot::Receiver<Vec<RecipientResult>>), QueueError> {
        let (tx, rx) = oneshot::channel();
        let id = self.insert(msg, Body::Whole(body), Some(tx)).await?;
        Ok((id, rx))
    }

    /// The results of message `id`'s next recorded attempt. The sender is
    /// dropped (the receiver yields an error) if the message is not in the
    /// queue or leaves it without an attempt (deleted).
    pub fn watch(&self, id: &QueueId) -> oneshot::Receiver<Vec<RecipientResult>> {
        let (tx, rx) = oneshot::channel();
        let mut sched = lock(&self.inner.sched);
        if sched.messages.contains_key(id) {
            sched.watchers.entry(id.clone()).or_default().push(tx);
        }
        rx
    }

    async fn insert(
        &self,
        msg: NewMessage,
        body: Body,
        watcher: Option<oneshot::Sender<Vec<RecipientResult>>>,
    ) -> Result<QueueId, QueueError> {
        let mut recipients: Vec<String> = Vec::with_capacity(msg.recipients.len());
        for r in msg.recipients {
            if !recipients.contains(&r) {
                recipients.push(r);
            }
        }
        if recipients.is_empty() {
            return Err(QueueError::Invalid {
                path: self.inner.settings.dir.clone(),
                reason: "the message has no recipients".into(),
            });
        }
        let now = SystemTime::now();
        let mut meta = Meta {
            version: META_VERSION,
            id: match &body {
                Body::Whole(_) => self.inner.ids.next(),
                Body::Spooled(writer) => writer.id.clone(),
            },
            state: State::Queued,
            sender: msg.sender,
            account: msg.account,
            client: msg.client,
            received_at: now,
            attempts: 0,
            next_attempt: Some(now),
            last_error: None,
            size: 0,
            passthrough: watcher.is_some(),
            sha256: None,
            held: false,
            recipients: recipients
                .into_iter()
                .map(|address| Recipient {
                    address,
                    status: RecipientState::Pending,
                    reply: None,
                    reason: None,
                })
                .collect(),
        };
        let inner = self.inner.clone();
        blocking(&self.inner.settings.dir, "queueing message", move || {
            let id = meta.id.clone();
            // a spooled body's file must outlive the commit that renames it
            let mut spooled = None;
            let op = match body {
                Body::Whole(body) => {
                    meta.size = body.len() as u64;
                    meta.sha256 = Some(hex(&Sha256::digest(&body)));
                    Op::Insert {
                        id: id.clone(),
                        meta: inner.encode(&meta)?,
                        body,
                    }
                }
                Body::Spooled(mut writer) => {
                    let (size, sha256) = writer.finish()?;
                    meta.size = size;
                    meta.sha256 = Some(sha256);
                    spooled = Some(writer);
                    Op::InsertSpooled {
                        id: id.clone(),
                        meta: inner.encode(&meta)?,
                    }
                }
            };
            store::apply(&inner.layout, &[op])?;
            drop(spooled);
            tracing::debug!(queue_id = %id, account = %meta.account, size = meta.size, "message queued");
            let mut sched = lock(&inner.sched);
            if let Some(watcher) = watcher {
                sched.watchers.insert(id.clone(), vec![watcher]);
            }
            sched.insert(meta, Instant::now());
            Ok(id)
        })
        .await
    }

    /// Waits until a message of `account` is due and not leased, leases it
    /// and returns it. Messages are handed out in due-time order (ties by
    /// id, i.e. by age).
    ///
    /// With `idle = Some(d)`, returns `None` once `d` has passed with nothing
    /// due; with `None` it waits indefinitely. An enqueue, a released lease
    /// or a deferral for the account wakes the wait immediately; otherwise it
    /// wakes at the earliest due time.
    ///
    /// Cancel-safe: a message is leased only in the same poll that returns
    /// it, so dropping the future (e.g. in `tokio::select!` against a
    /// shutdown signal) never loses or strands a message.
    pub async fn next_due(&self, account: &str, idle: Option<Duration>) -> Option<Lease> {
        let deadline = idle.map(|d| instant_after(Instant::now(), d));
        let notify = lock(&self.inner.sched).account(account).notify.clone();
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            // Register before looking, so a wake-up between the look and the
            // wait is not lost.
            notified.as_mut().enable();
            let next = match self.try_lease(account) {
                Ok(lease) => return Some(lease),
                Err(next) => next,
            };
            let wake = match (next, deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            match wake {
                Some(at) => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return self.try_lease(account).ok();
            }
        }
    }

    /// Leases the account's first message if it is due; otherwise returns
    /// when the first one will be due (if any).
    fn try_lease(&self, account: &str) -> Result<Lease, Option<Instant>> {
        let mut sched = lock(&self.inner.sched);
        let sched = &mut *sched;
        let queue = sched.account(account);
        let (due, id) = match queue.due.first() {
            Some(first) => first.clone(),
            None => return Err(None),
        };
        if due > Instant::now() {
            return Err(Some(due));
        }
        queue.due.pop_first();
        let Some(slot) = sched.messages.get_mut(&id) else {
            // Cannot happen: the two maps change together.
            tracing::error!(queue_id = %id, "scheduled message missing from the queue's index");
            return Err(None);
        };
        slot.due = None;
        slot.in_flight = false;
        let meta = &slot.meta;
        Ok(Lease {
            id,
            sender: meta.sender.clone(),
            account: meta.account.clone(),
            attempts: meta.attempts,
            recipients: meta.open_recipients(),
            received_at: meta.received_at,
            size: meta.size,
            client: meta.client,
            passthrough: meta.passthrough,
            queue: Some(Arc::downgrade(&self.inner)),
        })
    }

    /// Marks the leased message as being handed to the upstream now. False
    /// when an administrator deleted or held it while the lease waited (for
    /// its pacing slot, say): it must not be sent now; drop the lease (a
    /// held message then waits for its release). After `true`, a deletion
    /// waits for this attempt to end, and a hold applies after it.
    pub fn begin(&self, lease: &Lease) -> bool {
        if !self.owns(lease) {
            return false;
        }
        let mut sched = lock(&self.inner.sched);
        match sched.messages.get_mut(&lease.id) {
            Some(slot) if slot.due.is_none() && !slot.deleted && !slot.meta.held => {
                slot.in_flight = true;
                true
            }
            _ => false,
        }
    }

    /// Reads the leased message's body, byte for byte as it was enqueued.
    pub async fn read_body(&self, lease: &Lease) -> Result<Vec<u8>, QueueError> {
        if !self.owns(lease) {
            return Err(QueueError::NotLeased {
                path: self.inner.settings.dir.clone(),
                id: lease.id.clone(),
            });
        }
        let path = self.inner.layout.body_path(&lease.id);
        let body = tokio::fs::read(&path)
            .await
            .map_err(|e| QueueError::io("reading message body", &path, e))?;
        let expected = lock(&self.inner.sched)
            .messages
            .get(&lease.id)
            .and_then(|slot| slot.meta.sha256.clone());
        let problem = if body.len() as u64 != lease.size {
            Some(format!(
                "has {} bytes, metadata says {}",
                body.len(),
                lease.size
            ))
        } else {
            let actual = hex(&Sha256::digest(&body));
            expected
                .filter(|expected| *expected != actual)
                .map(|expected| format!("its SHA-256 is {actual}, metadata says {expected}"))
        };
        match problem {
            None => Ok(body),
            Some(problem) => {
                let error = QueueError::corrupt(&path, problem);
                self.set_aside(&lease.id, &error).await;
                Err(error)
            }
        }
    }

    /// Takes a message whose body is corrupt out of the queue (to
    /// `corrupt/`, where `queue list` shows it): it is never delivered.
    async fn set_aside(&self, id: &QueueId, error: &QueueError) {
        tracing::error!(queue_id = %id, %error, "message body changed on disk; setting the message aside, it will not be delivered");
        let inner = self.inner.clone();
        let id = id.clone();
        let reason = error.to_string();
        let _ = blocking(
            &self.inner.settings.dir,
            "setting a message aside",
            move || {
                let mut sched = lock(&inner.sched);
                sched.messages.remove(&id);
                sched.watchers.remove(&id);
                drop(sched);
                store::set_aside(&inner.layout, &id, &reason);
                Ok(())
            },
        )
        .await;
    }

    fn owns(&self, lease: &Lease) -> bool {
        lease
            .queue
            .as_ref()
            .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(&self.inner)))
    }

    /// Records the outcome of a delivery attempt and consumes the lease.
    ///
    /// Each result updates its recipient (results for addresses not in
    /// [`Lease::recipients`] are ignored with a warning; recipients without
    /// a result stay as they were). Then:
    /// - recipients left to try → [`Disposition::Deferred`]: attempts + 1,
    ///   next attempt after the backoff (`retry_initial` doubling per
    ///   attempt, capped at `retry_max`, ±20% jitter) — unless the message
    ///   is older than `max_age`, in which case they fail with
    ///   `gave up after {max_age}: {last reply}` ([`Reason::Expired`]);
    /// - none left, all delivered → the message is deleted
    ///   ([`Disposition::Removed`]);
    /// - none left, some failed → it stays on disk as failed
    ///   ([`Disposition::Failed`]) and is never handed out again.
    ///
    /// `last_error` becomes the last non-success reply of this attempt.
    /// Those [`Queue::watch`]ing the message get the results at once.
    ///
    /// The change is durable when this returns `Ok`. On `Err` (the disk is
    /// full, say) the outcome is kept in memory and written again in the
    /// background, waiting 1 s doubling up to a minute between tries; until
    /// it is written the message is not handed out again, so recipients
    /// the upstream accepted are not sent it twice while the relay runs.
    /// Like `enqueue`, the update completes even if the future is dropped.
    pub async fn record(
        &self,
        lease: Lease,
        results: Vec<RecipientResult>,
    ) -> Result<Recorded, QueueError> {
        self.record_attempt(lease, results, None).await
    }

    /// Records like [`Queue::record`], but nothing is tried again: the
    /// recipients left open fail, with `note` added to their reply (for a
    /// message whose client waited for this attempt's answer).
    pub async fn record_final(
        &self,
        lease: Lease,
        results: Vec<RecipientResult>,
        note: &'static str,
    ) -> Result<Recorded, QueueError> {
        self.record_attempt(lease, results, Some(note)).await
    }

    async fn record_attempt(
        &self,
        lease: Lease,
        results: Vec<RecipientResult>,
        last: Option<&'static str>,
    ) -> Result<Recorded, QueueError> {
        let dir = &self.inner.settings.dir;
        if !self.owns(&lease) {
            return Err(QueueError::NotLeased {
                path: dir.clone(),
                id: lease.id.clone(),
            });
        }
        let meta = {
            let sched = lock(&self.inner.sched);
            match sched.messages.get(&lease.id) {
                Some(slot) if slot.due.is_none() && !slot.unrecorded => slot.meta.clone(),
                _ => {
                    return Err(QueueError::NotLeased {
                        path: dir.clone(),
                        id: lease.id.clone(),
                    });
                }
            }
        };
        let inner = self.inner.clone();
        let runtime = tokio::runtime::Handle::current();
        blocking(dir, "recording delivery attempt", move || {
            // Own the whole lease here, so that it is consumed whatever
            // happens to the calling future.
            let mut lease = lease;
            lease.disarm();
            let mut meta = meta;
            let jitter = rand::random_range(0.8..=1.2);
            let (mut plan, results) =
                apply_attempt(&mut meta, results, SystemTime::now(), &inner.settings, jitter);
            if let (Some(note), Plan::Defer { .. }) = (last, plan) {
                plan = fail_open(&mut meta, note);
            }
            let id = meta.id.clone();
            let failed = failed_of(&meta);
            {
                let mut sched = lock(&inner.sched);
                for watcher in sched.watchers.remove(&id).unwrap_or_default() {
                    let _ = watcher.send(results.clone()); // the watcher may have gone
                }
                if let Some(slot) = sched.messages.get_mut(&id) {
                    // held meanwhile by an administrator: stays held
                    meta.held = slot.meta.held;
                    slot.meta = meta;
                }
            }
            match inner.commit(&id, plan) {
                Ok(Some(disposition)) => Ok(Recorded {
                    failed: match disposition {
                        Disposition::Failed => failed,
                        _ => Vec::new(),
                    },
                    disposition,
                    results,
                }),
                Ok(None) => Ok(Recorded {
                    disposition: Disposition::Removed,
                    results,
                    failed: Vec::new(),
                }),
                Err(e) => {
                    tracing::error!(queue_id = %id, error = %e, "cannot record a delivery outcome; keeping it in memory and trying again");
                    if let Some(slot) = lock(&inner.sched).messages.get_mut(&id) {
                        slot.unrecorded = true;
                    }
                    runtime.spawn(inner.clone().record_later(id, plan));
                    Err(e)
                }
            }
        })
        .await
    }

    /// The accounts that have messages still to be tried (waiting or
    /// leased), sorted. Failed messages do not count.
    pub fn accounts_with_mail(&self) -> Vec<String> {
        let sched = lock(&self.inner.sched);
        let mut accounts: Vec<String> = sched
            .messages
            .values()
            .map(|s| s.meta.account.clone())
            .collect();
        accounts.sort();
        accounts.dedup();
        accounts
    }

    /// The number of messages still to be tried (waiting or leased). Failed
    /// messages kept on disk are not counted.
    pub fn depth(&self) -> usize {
        lock(&self.inner.sched).messages.len()
    }

    /// How many messages are in each state and when the oldest of each was
    /// accepted, from memory (cheap enough for every metrics scrape).
    pub fn census(&self) -> Census {
        let sched = lock(&self.inner.sched);
        let mut census = Census::default();
        for slot in sched.messages.values() {
            let tally = match slot.meta.state {
                State::Queued => &mut census.queued,
                State::Deferred => &mut census.deferred,
                State::Failed => &mut census.failed,
            };
            tally.add(slot.meta.received_at);
        }
        for &received_at in sched.failed.values() {
            census.failed.add(received_at);
        }
        census
    }

    /// The queue's settings.
    pub fn settings(&self) -> &QueueSettings {
        &self.inner.settings
    }
}

impl Inner {
    /// Writes the outcome already applied to message `id`'s metadata in
    /// memory (or removes the message), then moves it on in the schedule
    /// as `plan` says. `Ok(None)` when the message is no longer in memory.
    fn commit(&self, id: &QueueId, plan: Plan) -> Result<Option<Disposition>, QueueError> {
        let (meta, deleted) = {
            let sched = lock(&self.sched);
            match sched.messages.get(id) {
                Some(slot) => (slot.meta.clone(), slot.deleted),
                None => return Ok(None),
            }
        };
        let plan = if deleted { Plan::Deleted } else { plan };
        let op = match plan {
            Plan::Remove | Plan::Deleted => Op::Remove { id: id.clone() },
            Plan::Fail | Plan::Defer { .. } => Op::Update {
                id: id.clone(),
                meta: self.encode(&meta)?,
            },
        };
        store::apply(&self.layout, &[op])?;
        let mut sched = lock(&self.sched);
        let deleted_meanwhile = sched.messages.get(id).is_some_and(|s| s.deleted);
        let Some(mut slot) = sched.messages.remove(id) else {
            return Ok(None);
        };
        // a deletion waiting for this attempt learns that it ended
        sched.watchers.remove(id);
        match plan {
            Plan::Remove => {
                tracing::info!(queue_id = %id, attempts = meta.attempts, "message delivered to every recipient; removed");
                Ok(Some(Disposition::Removed))
            }
            Plan::Deleted => {
                tracing::info!(queue_id = %id, "message deleted by an administrator during its delivery attempt");
                Ok(Some(Disposition::Removed))
            }
            Plan::Fail => {
                if deleted_meanwhile {
                    self.remove_in_background(id.clone());
                    return Ok(Some(Disposition::Removed));
                }
                sched.failed.insert(id.clone(), meta.received_at);
                tracing::warn!(
                    queue_id = %id,
                    attempts = meta.attempts,
                    last_error = meta.last_error.as_deref().unwrap_or(""),
                    "message failed; kept in the queue as failed"
                );
                Ok(Some(Disposition::Failed))
            }
            Plan::Defer { delay } => {
                if deleted_meanwhile {
                    self.remove_in_background(id.clone());
                    return Ok(Some(Disposition::Removed));
                }
                let next_attempt = meta.next_attempt.unwrap_or_else(SystemTime::now);
                tracing::info!(
                    queue_id = %id,
                    attempts = meta.attempts,
                    retry_in = %humantime::format_duration(Duration::from_millis(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))),
                    last_error = meta.last_error.as_deref().unwrap_or(""),
                    "message deferred"
                );
                slot.unrecorded = false;
                slot.in_flight = false;
                sched.insert_slot(slot, instant_after(Instant::now(), delay));
                Ok(Some(Disposition::Deferred { next_attempt }))
            }
        }
    }

    /// Writes an outcome that [`Queue::record`] could not write, trying
    /// again with capped back-off until it is written (or the message is
    /// gone); the message stays out of the schedule meanwhile.
    async fn record_later(self: Arc<Self>, id: QueueId, plan: Plan) {
        let mut wait = UNRECORDED_RETRY;
        loop {
            tokio::time::sleep(wait).await;
            let inner = self.clone();
            let task_id = id.clone();
            match tokio::task::spawn_blocking(move || inner.commit(&task_id, plan)).await {
                Ok(Ok(_)) => {
                    tracing::info!(queue_id = %id, "delivery outcome recorded after all");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(queue_id = %id, error = %e, retry_in = ?wait, "still cannot record a delivery outcome")
                }
                Err(e) => tracing::error!(queue_id = %id, error = %e, "recording task failed"),
            }
            wait = (wait * 2).min(UNRECORDED_RETRY_MAX);
        }
    }

    fn encode(&self, meta: &Meta) -> Result<Vec<u8>, QueueError> {
        serde_json::to_vec_pretty(meta).map_err(|source| QueueError::Encode {
            path: self.layout.meta_path(&meta.id),
            source,
        })
    }

    /// Makes a leased message schedulable again after `delay`.
    fn release(&self, id: &QueueId, delay: Duration) {
        let mut sched = lock(&self.sched);
        let Some(slot) = sched.messages.get_mut(id) else {
            return;
        };
        if slot.due.is_some() {
            return;
        }
        if slot.deleted {
            sched.messages.remove(id);
            self.remove_in_background(id.clone());
            return;
        }
        let Some(slot) = sched.messages.remove(id) else {
            return;
        };
        sched.insert_slot(slot, instant_after(Instant::now(), delay));
    }
}

impl Inner {
    /// Deletes a message's files from a context that cannot wait (a
    /// dropped lease); an error only leaves it to reappear at the next start.
    fn remove_in_background(&self, id: QueueId) {
        let layout = self.layout.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn_blocking(move || {
                if let Err(e) = store::apply(&layout, &[Op::Remove { id: id.clone() }]) {
                    tracing::error!(queue_id = %id, error = %e, "cannot delete a message");
                }
            });
        }
    }
}

/// Runs blocking file I/O off the async runtime.
async fn blocking<T, F>(dir: &std::path::Path, action: &'static str, f: F) -> Result<T, QueueError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, QueueError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|source| QueueError::Task {
            action,
            path: dir.to_path_buf(),
            source,
        })?
}

/// What to do with a message after applying an attempt's results.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Plan {
    /// All delivered: delete it.
    Remove,
    /// Deleted by an administrator while being tried: delete it.
    Deleted,
    /// Nothing left to try, some failed: keep as failed.
    Fail,
    /// Retry after `delay`.
    Defer { delay: Duration },
}

/// The retry delay after `attempts` attempts, before jitter:
/// `retry_initial × 2^(attempts−1)`, capped at `retry_max`.
fn backoff(settings: &QueueSettings, attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(31);
    settings
        .retry_initial
        .saturating_mul(1u32 << doublings)
        .min(settings.retry_max)
}

/// Fails the recipients of `meta` still open, adding `note` to their reply.
fn fail_open(meta: &mut Meta, note: &str) -> Plan {
    for r in meta.recipients.iter_mut().filter(|r| r.status.is_open()) {
        r.status = RecipientState::Failed;
        r.reply = Some(match r.reply.take() {
            Some(reply) => reply.with_text(format!("{} ({note})", reply.text)),
            None => Reply {
                code: 554,
                enhanced: Some(Enhanced::new(5, 0, 0)),
                text: format!("not attempted ({note})"),
            },
        });
    }
    meta.state = State::Failed;
    meta.next_attempt = None;
    Plan::Fail
}

/// Scales `d` by `factor` without any chance of panicking.
fn scale(d: Duration, factor: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(d)
}

/// The failed recipients of `meta` with their last outcomes.
fn failed_of(meta: &Meta) -> Vec<RecipientResult> {
    meta.recipients
        .iter()
        .filter(|r| r.status == RecipientState::Failed)
        .filter_map(|r| {
            Some(RecipientResult {
                recipient: r.address.clone(),
                outcome: r.outcome()?,
            })
        })
        .collect()
}

/// Applies one attempt's results to `meta` (pure; `now` and `jitter` are
/// parameters so it can be tested exactly). Returns the plan and the
/// attempt's outcomes as recorded, expiries included.
fn apply_attempt(
    meta: &mut Meta,
    results: Vec<RecipientResult>,
    now: SystemTime,
    settings: &QueueSettings,
    jitter: f64,
) -> (Plan, Vec<RecipientResult>) {
    let mut last_error: Option<String> = None;
    let mut recorded = Vec::with_capacity(results.len());
    for result in results {
        let Some(r) = meta
            .recipients
            .iter_mut()
            .find(|r| r.address == result.recipient && r.status.is_open())
        else {
            tracing::warn!(queue_id = %meta.id, recipient = %result.recipient, "ignoring result for a recipient that was not being tried");
            continue;
        };
        r.status = match result.outcome.verdict() {
            Verdict::Delivered => RecipientState::Delivered,
            Verdict::Temporary => RecipientState::Deferred,
            Verdict::Permanent => RecipientState::Failed,
        };
        if r.status != RecipientState::Delivered {
            last_error = Some(result.outcome.reply.text.clone());
        }
        r.reply = Some(result.outcome.reply.clone());
        r.reason = Some(result.outcome.reason);
        recorded.push(result);
    }
    meta.attempts = meta.attempts.saturating_add(1);
    if last_error.is_some() {
        meta.last_error = last_error;
    }

    if meta.recipients.iter().any(|r| r.status.is_open()) {
        let age = now.duration_since(meta.received_at).unwrap_or_default();
        if age <= settings.max_age {
            let delay = scale(backoff(settings, meta.attempts), jitter);
            meta.state = State::Deferred;
            meta.next_attempt = Some(add_time(now, delay));
            return (Plan::Defer { delay }, recorded);
        }
        let limit = humantime::format_duration(settings.max_age);
        for r in meta.recipients.iter_mut().filter(|r| r.status.is_open()) {
            let reply = match &r.reply {
                Some(reply) => reply.with_text(format!("gave up after {limit}: {}", reply.text)),
                None => Reply {
                    code: 554,
                    enhanced: Some(Enhanced::new(5, 4, 7)),
                    text: format!("gave up after {limit}: never attempted"),
                },
            };
            r.status = RecipientState::Failed;
            r.reason = Some(Reason::Expired);
            meta.last_error = Some(reply.text.clone());
            r.reply = Some(reply.clone());
            let outcome = Outcome::new(Reason::Expired, reply);
            match recorded.iter_mut().find(|done| done.recipient == r.address) {
                Some(done) => done.outcome = outcome,
                None => recorded.push(RecipientResult {
                    recipient: r.address.clone(),
                    outcome,
                }),
            }
        }
    }

    if meta
        .recipients
        .iter()
        .all(|r| r.status == RecipientState::Delivered)
    {
        (Plan::Remove, recorded)
    } else {
        meta.state = State::Failed;
        meta.next_attempt = None;
        // a failed message shows why it failed, not an earlier deferral
        if let Some(reply) = meta
            .recipients
            .iter()
            .rev()
            .filter(|r| r.status == RecipientState::Failed)
            .find_map(|r| r.reply.as_ref())
        {
            meta.last_error = Some(reply.text.clone());
        }
        (Plan::Fail, recorded)
    }
}

mod admin;
pub use admin::{Deletion, Selection};

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> QueueSettings {
        QueueSettings {
            dir: PathBuf::from("/nonexistent"),
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            max_age: Duration::from_secs(86_400),
        }
    }

    fn meta(recipients: &[&str]) -> Meta {
        Meta {
            version: META_VERSION,
            id: QueueId::from_parts(1, 1),
            state: State::Queued,
            sender: "a@example.com".into(),
            account: "acct".into(),
            client: None,
            received_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000),
            attempts: 0,
            next_attempt: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000)),
            last_error: None,
            size: 0,
            passthrough: false,
            sha256: None,
            held: false,
            recipients: recipients
                .iter()
                .map(|a| Recipient {
                    address: a.to_string(),
                    status: RecipientState::Pending,
                    reply: None,
                    reason: None,
                })
                .collect(),
        }
    }

    fn res(rcpt: &str, outcome: Outcome) -> RecipientResult {
        RecipientResult {
            recipient: rcpt.into(),
            outcome,
        }
    }

    fn reply(text: &str) -> Reply {
        Reply::parse(text).expect("reply")
    }

    fn temp(text: &str) -> Outcome {
        Outcome::new(Reason::Deferred, reply(text))
    }

    fn delivered(text: &str) -> Outcome {
        Outcome::delivered(reply(text))
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let s = settings();
        let secs: Vec<u64> = (1..=9).map(|a| backoff(&s, a).as_secs()).collect();
        assert_eq!(secs, [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]);
        assert_eq!(backoff(&s, u32::MAX), Duration::from_secs(3600));
        assert_eq!(backoff(&s, 0), Duration::from_secs(60));
        let huge = QueueSettings {
            retry_initial: Duration::MAX,
            retry_max: Duration::MAX,
            ..settings()
        };
        assert_eq!(backoff(&huge, 40), Duration::MAX);
        assert_eq!(scale(Duration::MAX, 1.2), Duration::MAX);
        assert_eq!(
            scale(Duration::from_secs(100), 0.8),
            Duration::from_secs(80)
        );
    }

    #[test]
    fn deferral_uses_backoff_and_jitter() {
        let s = settings();
        let mut m = meta(&["x@y"]);
        let now = m.received_at + Duration::from_secs(10);
        m.attempts = 2;
        let (plan, _) = apply_attempt(&mut m, vec![res("x@y", temp("451 busy"))], now, &s, 1.2);
        // Third attempt: 4 × 60 s × 1.2.
        assert_eq!(
            plan,
            Plan::Defer {
                delay: Duration::from_secs(288)
            }
        );
        assert_eq!(m.attempts, 3);
        assert_eq!(m.state, State::Deferred);
        assert_eq!(m.next_attempt, Some(now + Duration::from_secs(288)));
        assert_eq!(m.last_error.as_deref(), Some("451 busy"));
        assert_eq!(m.recipients[0].status, RecipientState::Deferred);
    }

    #[test]
    fn expiry_fails_open_recipients() {
        let s = settings();
        let mut m = meta(&["a@x", "b@x", "c@x"]);
        let now = m.received_at + s.max_age + Duration::from_secs(1);
        let (plan, _) = apply_attempt(
            &mut m,
            vec![
                res("a@x", delivered("250 ok")),
                res("b@x", temp("421 later")),
            ],
            now,
            &s,
            1.0,
        );
        assert_eq!(plan, Plan::Fail);
        assert_eq!(m.state, State::Failed);
        assert_eq!(m.next_attempt, None);
        assert_eq!(m.recipients[0].status, RecipientState::Delivered);
        assert_eq!(m.recipients[1].status, RecipientState::Failed);
        assert_eq!(
            m.recipients[1].reply.as_ref().map(|r| r.text.as_str()),
            Some("gave up after 1day: 421 later")
        );
        assert_eq!(
            m.recipients[2].reply.as_ref().map(|r| r.text.as_str()),
            Some("gave up after 1day: never attempted")
        );
        assert_eq!(
            m.last_error.as_deref(),
            Some("gave up after 1day: never attempted")
        );
    }

    #[test]
    fn all_delivered_removes_and_unknown_results_are_ignored() {
        let s = settings();
        let mut m = meta(&["a@x"]);
        let now = m.received_at;
        let (plan, _) = apply_attempt(
            &mut m,
            vec![
                res("zz@x", Outcome::new(Reason::Refused, reply("550 who"))),
                res("a@x", delivered("250 ok")),
            ],
            now,
            &s,
            1.0,
        );
        assert_eq!(plan, Plan::Remove);
        assert_eq!(m.last_error, None);
    }

    #[test]
    fn recipients_without_result_keep_the_message_deferred() {
        let s = settings();
        let mut m = meta(&["a@x", "b@x"]);
        let now = m.received_at;
        let (plan, _) = apply_attempt(&mut m, vec![res("a@x", delivered("250"))], now, &s, 1.0);
        assert_eq!(
            plan,
            Plan::Defer {
                delay: Duration::from_secs(60)
            }
        );
        assert_eq!(m.recipients[1].status, RecipientState::Pending);
        assert_eq!(m.open_recipients(), vec!["b@x".to_string()]);
    }
}

//! The queue over the store: enqueue, leases and their renewal, recording,
//! and the in-memory wake-ups that spare the store from being polled hard.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use relay_outcome::{Enhanced, Outcome, Reason, Reply, Verdict};
use relay_store::{
    Body, DatabaseUrl, Envelope, LeaseHolder, Location, Message, MessageState, Progress,
    RecipientState, Secret, Spool, Store, StoreSettings,
};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

use crate::id::IdGen;
use crate::view::{add_time, outcome_of, reply_of, stored_recipient, stored_reply};
use crate::{QueueError, QueueId};

/// How often the queue asks the store what is due (mail from other relays,
/// leases that expired, administrators' retries) and counts the messages.
const POLL: Duration = Duration::from_secs(1);
/// The first wait before an outcome that could not be written is written
/// again; it doubles up to [`UNRECORDED_RETRY_MAX`].
const UNRECORDED_RETRY: Duration = Duration::from_secs(1);
const UNRECORDED_RETRY_MAX: Duration = Duration::from_secs(60);
/// Connections to the store that its operations share (on the embedded
/// store, the readers: its writes take turns at one more).
const STORE_CONNECTIONS: u32 = 8;
/// Where large bodies are spooled while they are received.
const SPOOL_DIR: &str = "tmp";
/// Locked by the relay running on an embedded store.
const LOCK_FILE: &str = "lock";
/// How often (in looks at the store) the relay's clock is compared with a
/// shared database's.
const CLOCK_CHECK_EVERY: u64 = 60;
/// Clock drift between a relay and its shared database that is reported:
/// well under any lease (at least 3 s) and the pace's windows.
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(1);
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

/// A PostgreSQL database shared with other relays (`[queue] database_url`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Database {
    /// `postgres://user@host:port/db?sslmode=…`
    pub url: DatabaseUrl,
    /// The password, from `database_password_file`.
    pub password: Option<Secret>,
}

/// Settings of a [`Queue`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueSettings {
    /// The queue directory: the embedded store (`queue.sqlite`) unless
    /// `database` is set, and the spool of bodies being received. Created
    /// (mode 0700) if missing.
    pub dir: PathBuf,
    /// Share the queue with other relays through PostgreSQL.
    pub database: Option<Database>,
    /// How long a lease lasts without renewal; a dead relay's messages are
    /// taken over after this. Renewed every third of it while delivering.
    pub lease_timeout: Duration,
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

/// What the queue's last look at the store found ([`Queue::health`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// The messages per state at the last successful look.
    pub census: Census,
    /// Why the last look failed (the store is unreachable, say); `None`
    /// when it succeeded.
    pub error: Option<String>,
}

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
    /// stays as failed (visible in `queue list`) and is not retried.
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
    progress: Progress,
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
    fn disarm(&mut self) -> Option<JoinHandle<()>> {
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

/// The durable mail queue. Cheap to clone; all clones share one queue.
#[derive(Clone, Debug)]
pub struct Queue {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: QueueSettings,
    store: Store,
    ids: IdGen,
    local: Mutex<Local>,
    /// The directory's lock, held for the queue's lifetime by the relay on
    /// an embedded store.
    lock: Option<std::fs::File>,
}

/// What this relay keeps in memory: wake-ups, passthrough messages waiting
/// for a worker, and those waiting for an outcome.
#[derive(Debug, Default)]
struct Local {
    /// Per account, what wakes its waiting workers.
    wakers: HashMap<String, Arc<Notify>>,
    /// Per account, passthrough messages leased at insert, for a worker of
    /// this relay (which holds the client's connection).
    handoff: HashMap<String, VecDeque<Lease>>,
    /// Per account, messages leased in a batch beyond the one a worker
    /// asked for, for the next workers to ask (after any passthrough).
    prefetched: HashMap<String, VecDeque<Lease>>,
    /// The accounts whose next batch is being leased ahead.
    leasing_ahead: HashSet<String>,
    /// Passthrough clients waiting for their message's attempt.
    watchers: HashMap<QueueId, oneshot::Sender<Vec<RecipientResult>>>,
    /// Messages whose outcome could not be written yet: not handed out
    /// again by this relay until it is.
    unrecorded: HashSet<QueueId>,
    /// The last look at the store.
    health: Health,
}

impl Local {
    fn waker(&mut self, account: &str) -> Arc<Notify> {
        self.wakers.entry(account.to_string()).or_default().clone()
    }
}

fn lock(m: &Mutex<Local>) -> MutexGuard<'_, Local> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The body of a message being received, spooled to an anonymous file in
/// the queue directory's `tmp/` ([`Queue::begin_body`]) so that a large
/// message is not held in memory while it arrives. The file has no name: a
/// crash or a dropped writer leaves nothing behind. On the embedded store
/// the file itself becomes the stored body (see [`relay_store::Spool`]).
#[derive(Debug)]
pub struct BodyWriter {
    path: PathBuf,
    /// `None` once an append failed or was cancelled: the file is then
    /// incomplete and every later append fails.
    spool: Option<Spool>,
}

impl BodyWriter {
    /// Appends `data`, on a blocking thread. After an error (or a
    /// cancelled append) the writer is unusable; drop it.
    pub async fn append(&mut self, data: &[u8]) -> Result<(), QueueError> {
        let mut spool = self.spool.take().ok_or_else(|| self.broken())?;
        let data = data.to_vec();
        let path = self.path.clone();
        let spool = blocking(&self.path, "spooling a message", move || {
            spool
                .append(&data)
                .map_err(|e| QueueError::io("writing a spooled message in", &path, e))?;
            Ok(spool)
        })
        .await?;
        self.spool = Some(spool);
        Ok(())
    }

    fn broken(&self) -> QueueError {
        QueueError::io(
            "spooling a message in",
            &self.path,
            std::io::Error::other("an earlier write failed"),
        )
    }

    /// The whole body, ending with `tail`.
    async fn finish(mut self, tail: &[u8]) -> Result<Body, QueueError> {
        self.append(tail).await?;
        let spool = self.spool.take().ok_or_else(|| self.broken())?;
        Ok(Body::Spooled(spool.finish()))
    }
}

/// The text a passthrough message fails with when its relay no longer holds
/// it: the client waited on a connection that is gone and resends it.
pub(crate) fn orphan_reply() -> Reply {
    Reply {
        code: 554,
        enhanced: Some(Enhanced::new(5, 3, 0)),
        text: "not delivered: the relay stopped while the client waited (passthrough); the client resends it".into(),
    }
}

impl QueueSettings {
    /// Which store the queue is in, for people: `SQLite PATH`, or
    /// `PostgreSQL host:port/database` (no user, password or options).
    pub fn store_name(&self) -> String {
        location(self).to_string()
    }
}

/// Where the queue's store is.
fn location(settings: &QueueSettings) -> Location {
    match &settings.database {
        None => Location::Sqlite(settings.dir.clone()),
        Some(db) => Location::Postgres {
            url: db.url.clone(),
            password: db.password.clone(),
        },
    }
}

/// This relay's id in the store: the host name, the process id and a
/// random part, so that a restarted relay never mistakes its predecessor's
/// leases for its own.
fn relay_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!(
        "{host}:{}:{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// Creates a directory (and its parents) with mode 0700.
pub(crate) fn create_private_dir(path: &Path) -> Result<(), QueueError> {
    relay_config::create_private_dir(path)
        .map_err(|e| QueueError::io("creating queue directory", path, e))
}

/// Makes a queue directory writable by its owner only if others could
/// write into it: anyone who can would be able to plant or remove mail.
/// Fails if the mode cannot be fixed (not the owner).
fn private_mode(dir: &Path) -> Result<(), QueueError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir)
            .map_err(|e| QueueError::io("checking queue directory", dir, e))?
            .permissions()
            .mode();
        if mode & 0o022 != 0 {
            tracing::warn!(
                path = %dir.display(),
                mode = format!("{:o}", mode & 0o7777),
                "queue directory is writable by others; setting its mode to 0700"
            );
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| {
                QueueError::io("making the queue directory private (mode 0700)", dir, e)
            })?;
        }
    }
    Ok(())
}

/// Creates the directory and its spool (mode 0700), making them private
/// if others could write into them (blocking).
fn prepare_dir(dir: &Path) -> Result<(), QueueError> {
    create_private_dir(dir)?;
    private_mode(dir)?;
    create_private_dir(&dir.join(SPOOL_DIR))?;
    private_mode(&dir.join(SPOOL_DIR))
}

/// Takes `DIR/lock` (creating the directory first), held until the file is
/// dropped.
async fn lock_dir(dir: &Path) -> Result<std::fs::File, QueueError> {
    let dir = dir.to_path_buf();
    blocking(&dir.clone(), "locking the queue", move || {
        prepare_dir(&dir)?;
        let path = dir.join(LOCK_FILE);
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let file = options
            .open(&path)
            .map_err(|e| QueueError::io("opening lock file", &path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => Err(QueueError::Locked { path }),
            Err(std::fs::TryLockError::Error(e)) => Err(QueueError::io("locking", &path, e)),
        }
    })
    .await
}

/// Whether the queue in `dir` can take large messages: creates and removes
/// a file where bodies are spooled. For a health probe, from any process.
pub fn check_writable(dir: &Path) -> Result<(), QueueError> {
    let probe = dir.join(SPOOL_DIR).join(".writable-probe");
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| QueueError::io("writing into the queue", &probe, e))
}

/// Runs blocking file I/O off the async runtime.
pub(crate) async fn blocking<T, F>(path: &Path, action: &'static str, f: F) -> Result<T, QueueError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, QueueError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|source| QueueError::Task {
            action,
            path: path.to_path_buf(),
            source,
        })?
}

impl Queue {
    /// Opens the queue for a relay: creates the directory (mode 0700) if
    /// needed, opens the store (SQLite in the directory, or the PostgreSQL
    /// database of `settings.database`) and migrates its schema, imports a
    /// queue left by an older release in the directory, and starts looking
    /// at the store every second for due mail.
    ///
    /// With the embedded store the relay takes the directory's lock file
    /// (one relay per directory; [`QueueError::Locked`] if another holds
    /// it) and, being the store's only relay, ends the leases an earlier
    /// run left behind (it died, or stopped in the middle of attempts), so
    /// that mail is tried again at once rather than after `lease_timeout`.
    /// Relays sharing PostgreSQL wait for the leases to expire.
    pub async fn open(settings: QueueSettings) -> Result<Queue, QueueError> {
        let lock = match settings.database {
            None => Some(lock_dir(&settings.dir).await?),
            Some(_) => None,
        };
        let queue = Queue::open_store(settings, lock).await?;
        if queue.inner.lock.is_some() {
            queue.inner.store.sweep_bodies().await?;
            let ended = queue.inner.store.end_others_leases().await?;
            if ended > 0 {
                tracing::info!(
                    count = ended,
                    "leases left by an earlier run ended; their messages are due again"
                );
            }
        }
        queue.inner.look().await;
        tokio::spawn(watch_store(Arc::downgrade(&queue.inner)));
        Ok(queue)
    }

    /// Opens the queue for an administrator's command beside the running
    /// relays (or none): like [`Queue::open`], but without the lock and
    /// without looking at the store in the background.
    pub async fn open_admin(settings: QueueSettings) -> Result<Queue, QueueError> {
        Queue::open_store(settings, None).await
    }

    async fn open_store(
        settings: QueueSettings,
        lock: Option<std::fs::File>,
    ) -> Result<Queue, QueueError> {
        let dir = settings.dir.clone();
        blocking(&settings.dir, "opening queue", move || prepare_dir(&dir)).await?;
        let store = Store::open(StoreSettings {
            location: location(&settings),
            relay: relay_id(),
            max_connections: STORE_CONNECTIONS,
        })
        .await?;
        crate::legacy::import(&settings.dir, &store).await?;
        tracing::info!(
            dir = %settings.dir.display(),
            relay = store.relay(),
            shared = settings.database.is_some(),
            "queue opened"
        );
        Ok(Queue {
            inner: Arc::new(Inner {
                settings,
                store,
                ids: IdGen::new(0),
                local: Mutex::new(Local::default()),
                lock,
            }),
        })
    }

    /// This relay's id, as leases show it (`queue list`).
    pub fn relay(&self) -> &str {
        self.inner.store.relay()
    }

    /// Stores a message durably and wakes a worker for it.
    ///
    /// When this returns `Ok` the message is committed: the listener may
    /// answer 250. Concurrent calls share one commit. On `Err` nothing was
    /// committed (the listener answers 4xx). The commit runs to completion
    /// even if the returned future is dropped.
    pub async fn enqueue(&self, msg: NewMessage, body: &[u8]) -> Result<QueueId, QueueError> {
        self.insert(msg, Body::Bytes(body.to_vec()), None).await
    }

    /// [`Queue::enqueue`] taking the body by value: the listener hands over
    /// the message it received instead of holding it twice.
    pub async fn enqueue_owned(
        &self,
        msg: NewMessage,
        body: Vec<u8>,
    ) -> Result<QueueId, QueueError> {
        self.insert(msg, Body::Bytes(body), None).await
    }

    /// Starts the body of a message too large to hold in memory while it
    /// is received: an anonymous file that [`BodyWriter::append`] fills and
    /// [`Queue::enqueue_spooled`] commits.
    pub async fn begin_body(&self) -> Result<BodyWriter, QueueError> {
        let path = self.inner.settings.dir.join(SPOOL_DIR);
        let dir = path.clone();
        let file = blocking(&path, "spooling a message", move || {
            tempfile::tempfile_in(&dir)
                .map_err(|e| QueueError::io("spooling a message in", &dir, e))
        })
        .await?;
        Ok(BodyWriter {
            path,
            spool: Some(Spool::new(file)),
        })
    }

    /// Stores a message like [`Queue::enqueue`] whose body so far is in
    /// `writer` and ends with `tail`.
    pub async fn enqueue_spooled(
        &self,
        msg: NewMessage,
        writer: BodyWriter,
        tail: &[u8],
    ) -> Result<QueueId, QueueError> {
        let body = writer.finish(tail).await?;
        self.insert(msg, body, None).await
    }

    /// [`Queue::enqueue_passthrough`] for a spooled body (see
    /// [`Queue::enqueue_spooled`]).
    pub async fn enqueue_passthrough_spooled(
        &self,
        msg: NewMessage,
        writer: BodyWriter,
        tail: &[u8],
    ) -> Result<(QueueId, oneshot::Receiver<Vec<RecipientResult>>), QueueError> {
        let body = writer.finish(tail).await?;
        self.passthrough(msg, body).await
    }

    /// Stores a message like [`Queue::enqueue`] for a client that waits for
    /// the upstream's answer (passthrough mode). The message is leased to
    /// this relay from the start and handed to one of its workers (the
    /// client's connection is here); the receiver gets the results of its
    /// first attempt. If this relay loses it (it
    /// dies), the message fails rather than go out behind the client's
    /// back: the client resends it.
    pub async fn enqueue_passthrough(
        &self,
        msg: NewMessage,
        body: Vec<u8>,
    ) -> Result<(QueueId, oneshot::Receiver<Vec<RecipientResult>>), QueueError> {
        self.passthrough(msg, Body::Bytes(body)).await
    }

    async fn passthrough(
        &self,
        msg: NewMessage,
        body: Body,
    ) -> Result<(QueueId, oneshot::Receiver<Vec<RecipientResult>>), QueueError> {
        let (tx, rx) = oneshot::channel();
        let id = self.insert(msg, body, Some(tx)).await?;
        Ok((id, rx))
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
        let id = self.inner.ids.next();
        let now = SystemTime::now();
        let lease = watcher.is_some().then(|| LeaseHolder {
            relay: self.inner.store.relay().to_owned(),
            expires: add_time(now, self.inner.settings.lease_timeout),
        });
        let message = relay_store::NewMessage {
            envelope: Envelope {
                id: id.to_string(),
                account: msg.account,
                sender: msg.sender,
                client: msg.client.map(|c| c.to_string()),
                received_at: now,
                passthrough: watcher.is_some(),
            },
            progress: Progress::new(&recipients, now),
            held: false,
            lease,
            body,
        };
        let inner = self.inner.clone();
        // A task of its own, so that the wake-up (or the hand-off) follows
        // the commit even if the caller stops waiting.
        tokio::spawn(async move {
            let stored = Message {
                envelope: message.envelope.clone(),
                progress: message.progress.clone(),
                held: false,
                size: message.body.len(),
                lease: message.lease.clone(),
            };
            inner.store.insert(message).await?;
            tracing::debug!(queue_id = %id, account = %stored.envelope.account, size = stored.size, "message queued");
            let account = stored.envelope.account.clone();
            let waker = match watcher {
                Some(watcher) => {
                    let lease = inner.lease(stored)?;
                    let mut local = lock(&inner.local);
                    local.watchers.insert(id.clone(), watcher);
                    local
                        .handoff
                        .entry(account.clone())
                        .or_default()
                        .push_back(lease);
                    local.waker(&account)
                }
                None => lock(&inner.local).waker(&account),
            };
            waker.notify_waiters();
            Ok(id)
        })
        .await
        .map_err(|source| QueueError::Task {
            action: "queueing message",
            path: self.inner.settings.dir.clone(),
            source,
        })?
    }

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
    /// - none left, some failed → it stays as failed
    ///   ([`Disposition::Failed`]) and is never handed out again.
    ///
    /// `last_error` becomes the last non-success reply of this attempt.
    /// A passthrough client waiting for the message gets the results at once.
    ///
    /// The change is durable when this returns `Ok`. If the lease was lost
    /// meanwhile, nothing is written ([`QueueError::LeaseLost`]). On another
    /// `Err` (the store unreachable, say) the outcome is written again in
    /// the background, waiting 1 s doubling up to a minute between tries,
    /// with the lease still renewed; until it is written this relay does
    /// not hand the message out again. Like `enqueue`, the update completes
    /// even if the future is dropped.
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
        mut lease: Lease,
        results: Vec<RecipientResult>,
        last: Option<&'static str>,
    ) -> Result<Recorded, QueueError> {
        if !self.owns(&lease) {
            return Err(QueueError::NotLeased {
                path: self.inner.settings.dir.clone(),
                id: lease.id.clone(),
            });
        }
        let renewal = lease.disarm();
        let id = lease.id.clone();
        let mut progress =
            std::mem::replace(&mut lease.progress, Progress::new(&[], lease.received_at));
        let jitter = rand::random_range(0.8..=1.2);
        let (mut plan, results) = apply_attempt(
            &id,
            &mut progress,
            lease.received_at,
            results,
            SystemTime::now(),
            &self.inner.settings,
            jitter,
        );
        if let (Some(note), Plan::Defer { .. }) = (last, plan) {
            plan = fail_open(&mut progress, note);
        }
        let failed = failed_of(&progress);
        if let Some(watcher) = lock(&self.inner.local).watchers.remove(&id) {
            let _ = watcher.send(results.clone()); // the client may have gone
        }
        let inner = self.inner.clone();
        let attempts = progress.attempts;
        let next_attempt = progress.next_attempt;
        let last_error = progress.last_error.clone();
        let account = lease.account.clone();
        let written = tokio::spawn(async move {
            let written = inner.write(&id, plan, &progress).await;
            match &written {
                Ok(applied) => {
                    if let Some(renewal) = renewal {
                        renewal.abort();
                    }
                    if !applied {
                        tracing::warn!(queue_id = %id, "the lease on this message is gone (taken over or deleted); its outcome is not recorded");
                    }
                }
                Err(e) => {
                    tracing::error!(queue_id = %id, error = %e, "cannot record a delivery outcome; trying again with the lease kept");
                    lock(&inner.local).unrecorded.insert(id.clone());
                    tokio::spawn(inner.clone().record_later(id.clone(), plan, progress, renewal));
                }
            }
            written
        })
        .await
        .map_err(|source| QueueError::Task {
            action: "recording delivery attempt",
            path: self.inner.settings.dir.clone(),
            source,
        })?;
        if !written? {
            return Err(QueueError::LeaseLost {
                id: lease.id.clone(),
            });
        }
        let disposition = match plan {
            Plan::Remove => {
                tracing::info!(queue_id = %lease.id, attempts, "message delivered to every recipient; removed");
                Disposition::Removed
            }
            Plan::Fail => {
                tracing::warn!(queue_id = %lease.id, attempts, last_error = last_error.as_deref().unwrap_or(""), "message failed; kept in the queue as failed");
                Disposition::Failed
            }
            Plan::Defer { delay } => {
                tracing::info!(
                    queue_id = %lease.id,
                    attempts,
                    retry_in = %humantime::format_duration(Duration::from_millis(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))),
                    last_error = last_error.as_deref().unwrap_or(""),
                    "message deferred"
                );
                self.inner.wake_at(&account, delay);
                Disposition::Deferred {
                    next_attempt: next_attempt.unwrap_or_else(SystemTime::now),
                }
            }
        };
        Ok(Recorded {
            failed: match disposition {
                Disposition::Failed => failed,
                _ => Vec::new(),
            },
            disposition,
            results,
        })
    }

    /// The accounts that have messages still to be tried (waiting or
    /// leased, not held), sorted. Failed messages do not count.
    pub async fn accounts_with_mail(&self) -> Result<Vec<String>, QueueError> {
        Ok(self
            .inner
            .store
            .due()
            .await?
            .into_iter()
            .map(|(account, _)| account)
            .collect())
    }

    /// The number of messages still to be tried (waiting or leased). Failed
    /// messages are not counted.
    pub async fn depth(&self) -> Result<usize, QueueError> {
        let census = self.census().await?;
        Ok(census.queued.count + census.deferred.count)
    }

    /// How many messages are in each state and when the oldest of each was
    /// accepted, asked of the store now. [`Queue::health`] has the answer
    /// of the last look, without waiting.
    pub async fn census(&self) -> Result<Census, QueueError> {
        census_of(&self.inner.store).await
    }

    /// What the last look at the store (at most about a second ago, or as
    /// long as the store takes to fail) found: cheap enough for every
    /// metrics scrape and readiness probe.
    pub fn health(&self) -> Health {
        lock(&self.inner.local).health.clone()
    }

    /// Which store the queue is in, for people: [`QueueSettings::store_name`].
    pub fn store_name(&self) -> String {
        self.inner.settings.store_name()
    }

    /// The queue's settings.
    pub fn settings(&self) -> &QueueSettings {
        &self.inner.settings
    }

    pub(crate) fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The store other relays share, when the queue is on PostgreSQL:
    /// delivery and the token managers take the mailbox's pace, connection
    /// slots and refresh token from it. `None` on the embedded store, which
    /// one relay has to itself.
    pub fn shared_store(&self) -> Option<&Store> {
        self.inner
            .settings
            .database
            .as_ref()
            .map(|_| &self.inner.store)
    }

    /// Wakes the account's waiting workers (after an administrator's retry).
    pub(crate) fn wake(&self, account: &str) {
        lock(&self.inner.local).waker(account).notify_waiters();
    }
}

impl Inner {
    /// A lease on a message the store just leased to this relay, renewed
    /// every third of `lease_timeout` until it ends.
    fn lease(self: &Arc<Self>, m: Message) -> Result<Lease, QueueError> {
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

    /// Writes an attempt's outcome under this relay's lease. `Ok(false)`:
    /// the lease is gone and nothing was written.
    async fn write(
        &self,
        id: &QueueId,
        plan: Plan,
        progress: &Progress,
    ) -> Result<bool, QueueError> {
        Ok(match plan {
            Plan::Remove => self.store.remove(id.as_str()).await?,
            Plan::Fail | Plan::Defer { .. } => self.store.record(id.as_str(), progress).await?,
        })
    }

    /// Writes an outcome that [`Queue::record`] could not write, trying
    /// again with capped back-off until it is written or the lease is gone;
    /// the lease is renewed meanwhile.
    async fn record_later(
        self: Arc<Self>,
        id: QueueId,
        plan: Plan,
        progress: Progress,
        renewal: Option<JoinHandle<()>>,
    ) {
        let mut wait = UNRECORDED_RETRY;
        loop {
            tokio::time::sleep(wait).await;
            match self.write(&id, plan, &progress).await {
                Ok(written) => {
                    if written {
                        tracing::info!(queue_id = %id, "delivery outcome recorded after all");
                    } else {
                        tracing::warn!(queue_id = %id, "the lease on this message is gone; its outcome is not recorded");
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(queue_id = %id, error = %e, retry_in = ?wait, "still cannot record a delivery outcome")
                }
            }
            wait = (wait * 2).min(UNRECORDED_RETRY_MAX);
        }
        lock(&self.local).unrecorded.remove(&id);
        if let Some(renewal) = renewal {
            renewal.abort();
        }
    }

    /// Wakes the account's workers after `delay` (a deferral, a release),
    /// sooner than the next look at the store would.
    fn wake_at(&self, account: &str, delay: Duration) {
        let waker = lock(&self.local).waker(account);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            waker.notify_waiters();
        });
    }

    /// Looks at the store once: counts the messages, fails orphaned
    /// passthrough messages, and wakes the workers of accounts with due
    /// mail. Remembers what went wrong, for [`Queue::health`].
    async fn look(&self) {
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

async fn census_of(store: &Store) -> Result<Census, QueueError> {
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
async fn watch_store(inner: Weak<Inner>) {
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

/// What to do with a message after applying an attempt's results.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Plan {
    /// All delivered: delete it.
    Remove,
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

/// Fails the recipients still open, adding `note` to their reply.
fn fail_open(progress: &mut Progress, note: &str) -> Plan {
    for r in progress.recipients.iter_mut().filter(|r| r.state.is_open()) {
        let reply = match reply_of(r) {
            Some(reply) => reply.with_text(format!("{} ({note})", reply.text)),
            None => Reply {
                code: 554,
                enhanced: Some(Enhanced::new(5, 0, 0)),
                text: format!("not attempted ({note})"),
            },
        };
        let reason = outcome_of(r).map(|o| o.reason);
        *r = stored_recipient(
            std::mem::take(&mut r.address),
            RecipientState::Failed,
            Some(&reply),
            reason,
        );
    }
    progress.state = MessageState::Failed;
    progress.next_attempt = None;
    Plan::Fail
}

/// Scales `d` by `factor` without any chance of panicking.
fn scale(d: Duration, factor: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(d)
}

/// The failed recipients with their last outcomes.
fn failed_of(progress: &Progress) -> Vec<RecipientResult> {
    progress
        .recipients
        .iter()
        .filter(|r| r.state == RecipientState::Failed)
        .filter_map(|r| {
            Some(RecipientResult {
                recipient: r.address.clone(),
                outcome: outcome_of(r)?,
            })
        })
        .collect()
}

/// Applies one attempt's results to a message's progress (pure; `now` and
/// `jitter` are parameters so it can be tested exactly). Returns the plan
/// and the attempt's outcomes as recorded, expiries included.
fn apply_attempt(
    id: &QueueId,
    progress: &mut Progress,
    received_at: SystemTime,
    results: Vec<RecipientResult>,
    now: SystemTime,
    settings: &QueueSettings,
    jitter: f64,
) -> (Plan, Vec<RecipientResult>) {
    let mut last_error: Option<String> = None;
    let mut recorded = Vec::with_capacity(results.len());
    for result in results {
        let Some(r) = progress
            .recipients
            .iter_mut()
            .find(|r| r.address == result.recipient && r.state.is_open())
        else {
            tracing::warn!(queue_id = %id, recipient = %result.recipient, "ignoring result for a recipient that was not being tried");
            continue;
        };
        let state = match result.outcome.verdict() {
            Verdict::Delivered => RecipientState::Delivered,
            Verdict::Temporary => RecipientState::Deferred,
            Verdict::Permanent => RecipientState::Failed,
        };
        if state != RecipientState::Delivered {
            last_error = Some(result.outcome.reply.text.clone());
        }
        *r = stored_recipient(
            std::mem::take(&mut r.address),
            state,
            Some(&result.outcome.reply),
            Some(result.outcome.reason),
        );
        recorded.push(result);
    }
    progress.attempts = progress.attempts.saturating_add(1);
    if last_error.is_some() {
        progress.last_error = last_error;
    }

    if progress.recipients.iter().any(|r| r.state.is_open()) {
        let age = now.duration_since(received_at).unwrap_or_default();
        if age <= settings.max_age {
            let delay = scale(backoff(settings, progress.attempts), jitter);
            progress.state = MessageState::Deferred;
            progress.next_attempt = Some(add_time(now, delay));
            return (Plan::Defer { delay }, recorded);
        }
        let limit = humantime::format_duration(settings.max_age);
        for r in progress.recipients.iter_mut().filter(|r| r.state.is_open()) {
            let reply = match reply_of(r) {
                Some(reply) => reply.with_text(format!("gave up after {limit}: {}", reply.text)),
                None => Reply {
                    code: 554,
                    enhanced: Some(Enhanced::new(5, 4, 7)),
                    text: format!("gave up after {limit}: never attempted"),
                },
            };
            *r = stored_recipient(
                std::mem::take(&mut r.address),
                RecipientState::Failed,
                Some(&reply),
                Some(Reason::Expired),
            );
            progress.last_error = Some(reply.text.clone());
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

    if progress
        .recipients
        .iter()
        .all(|r| r.state == RecipientState::Delivered)
    {
        (Plan::Remove, recorded)
    } else {
        progress.state = MessageState::Failed;
        progress.next_attempt = None;
        // a failed message shows why it failed, not an earlier deferral
        if let Some(reply) = progress
            .recipients
            .iter()
            .rev()
            .filter(|r| r.state == RecipientState::Failed)
            .find_map(|r| r.reply.as_ref())
        {
            progress.last_error = Some(reply.text.clone());
        }
        (Plan::Fail, recorded)
    }
}

mod admin;
pub use admin::{Applied, Deletion, Listing, Request, Selection};

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> QueueSettings {
        QueueSettings {
            dir: PathBuf::from("/nonexistent"),
            database: None,
            lease_timeout: Duration::from_secs(60),
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            max_age: Duration::from_secs(86_400),
        }
    }

    const RECEIVED: Duration = Duration::from_secs(1_000_000);

    fn received() -> SystemTime {
        SystemTime::UNIX_EPOCH + RECEIVED
    }

    fn progress(recipients: &[&str]) -> Progress {
        let recipients: Vec<String> = recipients.iter().map(|a| a.to_string()).collect();
        Progress::new(&recipients, received())
    }

    fn apply(
        p: &mut Progress,
        results: Vec<RecipientResult>,
        now: SystemTime,
        s: &QueueSettings,
        jitter: f64,
    ) -> (Plan, Vec<RecipientResult>) {
        apply_attempt(
            &QueueId::from_parts(1, 1),
            p,
            received(),
            results,
            now,
            s,
            jitter,
        )
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

    fn reply_text(r: &relay_store::Recipient) -> Option<&str> {
        r.reply.as_ref().map(|r| r.text.as_str())
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
        let mut p = progress(&["x@y"]);
        let now = received() + Duration::from_secs(10);
        p.attempts = 2;
        let (plan, _) = apply(&mut p, vec![res("x@y", temp("451 busy"))], now, &s, 1.2);
        // Third attempt: 4 × 60 s × 1.2.
        assert_eq!(
            plan,
            Plan::Defer {
                delay: Duration::from_secs(288)
            }
        );
        assert_eq!(p.attempts, 3);
        assert_eq!(p.state, MessageState::Deferred);
        assert_eq!(p.next_attempt, Some(now + Duration::from_secs(288)));
        assert_eq!(p.last_error.as_deref(), Some("451 busy"));
        assert_eq!(p.recipients[0].state, RecipientState::Deferred);
        assert_eq!(p.recipients[0].reason.as_deref(), Some("deferred"));
    }

    #[test]
    fn expiry_fails_open_recipients() {
        let s = settings();
        let mut p = progress(&["a@x", "b@x", "c@x"]);
        let now = received() + s.max_age + Duration::from_secs(1);
        let (plan, _) = apply(
            &mut p,
            vec![
                res("a@x", delivered("250 ok")),
                res("b@x", temp("421 later")),
            ],
            now,
            &s,
            1.0,
        );
        assert_eq!(plan, Plan::Fail);
        assert_eq!(p.state, MessageState::Failed);
        assert_eq!(p.next_attempt, None);
        assert_eq!(p.recipients[0].state, RecipientState::Delivered);
        assert_eq!(p.recipients[1].state, RecipientState::Failed);
        assert_eq!(
            reply_text(&p.recipients[1]),
            Some("gave up after 1day: 421 later")
        );
        assert_eq!(
            reply_text(&p.recipients[2]),
            Some("gave up after 1day: never attempted")
        );
        assert_eq!(
            p.last_error.as_deref(),
            Some("gave up after 1day: never attempted")
        );
    }

    #[test]
    fn all_delivered_removes_and_unknown_results_are_ignored() {
        let s = settings();
        let mut p = progress(&["a@x"]);
        let (plan, _) = apply(
            &mut p,
            vec![
                res("zz@x", Outcome::new(Reason::Refused, reply("550 who"))),
                res("a@x", delivered("250 ok")),
            ],
            received(),
            &s,
            1.0,
        );
        assert_eq!(plan, Plan::Remove);
        assert_eq!(p.last_error, None);
    }

    #[test]
    fn recipients_without_result_keep_the_message_deferred() {
        let s = settings();
        let mut p = progress(&["a@x", "b@x"]);
        let (plan, _) = apply(
            &mut p,
            vec![res("a@x", delivered("250"))],
            received(),
            &s,
            1.0,
        );
        assert_eq!(
            plan,
            Plan::Defer {
                delay: Duration::from_secs(60)
            }
        );
        assert_eq!(p.recipients[1].state, RecipientState::Pending);
    }
}

//! The queue over the store: how it opens (its directory, its lock, the
//! store), and the in-memory wake-ups that spare the store from being
//! polled hard. A message's way through it is in the modules below:
//! [`enqueue`] takes it in, [`lease`] hands it to a worker, [`record`]
//! writes what the attempt did; [`watch`] looks at the store once a
//! second, and [`admin`] serves the `queue` commands.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use relay_store::{DatabaseUrl, Location, Secret, Store, StoreSettings};
use tokio::sync::{oneshot, Notify};

use crate::id::IdGen;
use crate::{QueueError, QueueId};

/// Connections to the store that its operations share (on the embedded
/// store, the readers: its writes take turns at one more).
const STORE_CONNECTIONS: u32 = 8;
/// Where large bodies are spooled while they are received.
const SPOOL_DIR: &str = "tmp";
/// Locked by the relay running on an embedded store.
const LOCK_FILE: &str = "lock";

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

impl QueueSettings {
    /// Which store the queue is in, for people: `SQLite PATH`, or
    /// `PostgreSQL host:port/database` (no user, password or options).
    pub fn store_name(&self) -> String {
        location(self).to_string()
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

mod admin;
mod enqueue;
mod lease;
mod record;
mod watch;

pub use admin::{Applied, Deletion, Listing, Request, Selection};
pub use enqueue::{BodyWriter, NewMessage};
pub use lease::{Begin, Lease};
pub use record::{Disposition, RecipientResult, Recorded};
pub use watch::{Census, Health, Tally};

pub(crate) use enqueue::orphan_reply;
use watch::{census_of, watch_store};

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
    /// Wakes the account's workers after `delay` (a deferral, a release),
    /// sooner than the next look at the store would.
    fn wake_at(&self, account: &str, delay: Duration) {
        let waker = lock(&self.local).waker(account);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            waker.notify_waiters();
        });
    }
}

//! The store: connection, group commit, and every operation in SQL that
//! both engines run unchanged (parameters are `$N`, which SQLite reads too).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection as _, PgConnection, PgPool, Row};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::body::{Body, Spooled};
use crate::holds::Holds;
use crate::lanes::Lanes;
use crate::pace::{self, Admitted, Pace, PaceLimits, Sent};
use crate::schema::{self, Dialect, SCHEMA_VERSION};
use crate::types::{
    Envelope, LeaseHolder, Message, MessageState, NewMessage, Progress, Recipient, RecipientState,
    Reply,
};
use crate::{DatabaseUrl, Secret, StoreError};

/// What [`Store::change`] does to each message.
#[derive(Clone, Copy, Debug)]
enum Change {
    /// Held (`true`) or released.
    Held(bool),
    /// Due at this time; a failed message comes back as deferred.
    Due(SystemTime),
}

/// Which messages [`Store::select`] reads.
#[derive(Clone, Copy, Debug)]
enum Rows<'a> {
    /// One message.
    Id(&'a str),
    /// Up to this many in id order, after this id (from the first).
    After(Option<&'a str>, u32),
}

/// Where the store lives.
#[derive(Clone, Debug)]
pub enum Location {
    /// The embedded store in this directory (created if missing): the
    /// SQLite file `queue.sqlite` (with its `-wal` and `-shm`) and the
    /// large bodies' files in `bodies/`.
    Sqlite(PathBuf),
    /// A PostgreSQL database shared with other relays; the password, if
    /// any, read from `database_password_file` rather than put in the URL.
    Postgres {
        /// `postgres://user@host:port/db?sslmode=…`
        url: DatabaseUrl,
        /// The password.
        password: Option<Secret>,
    },
}

impl std::fmt::Display for Location {
    /// Which store, for people: `SQLite PATH`, or `PostgreSQL
    /// host:port/database` (no user, password or options).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sqlite(dir) => write!(f, "SQLite {}", dir.join(SQLITE_FILE).display()),
            Location::Postgres { url, .. } => write!(f, "PostgreSQL {}", url.place()),
        }
    }
}

/// How the store is opened.
#[derive(Clone, Debug)]
pub struct StoreSettings {
    /// Where.
    pub location: Location,
    /// This relay's id: written into leases, slots and token locks, shown
    /// by `queue list`. Unique among the relays sharing a database.
    pub relay: String,
    /// Connections in the pool (on SQLite: the readers', besides the one
    /// writer).
    pub max_connections: u32,
}

/// Batches committed at once on PostgreSQL, which overlaps their commits
/// (SQLite writes one transaction at a time: one task).
const POSTGRES_COMMITTERS: usize = 4;
/// Inserts taken into one transaction at most.
const MAX_BATCH: usize = 512;
/// How long an operation waits for a connection (an unreachable PostgreSQL
/// server, every connection busy) before it fails: an SMTP client waiting
/// for its answer gets `451` within this time rather than hanging.
pub(crate) const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// The embedded store's database file, in its directory.
const SQLITE_FILE: &str = "queue.sqlite";
/// Beside it: held by a process while it opens the embedded store.
const SQLITE_OPEN_LOCK: &str = "queue.sqlite-open";
/// The embedded store's body files, in its directory.
const BODIES_DIR: &str = "bodies";
/// Bytes of spooled bodies read into memory for their commit at once on
/// PostgreSQL, across all sessions (each is held, and copied into the
/// statement, until it is committed): past it, large messages commit one
/// after another, so that many clients sending large messages at once
/// cannot exhaust memory.
const SPOOLED_IN_MEMORY: usize = 32 << 20;
/// The unit of [`SPOOLED_IN_MEMORY`] a permit stands for.
const SPOOLED_UNIT: usize = 64 << 10;
/// How long an SQLite writer waits for another (another handle, `queue`
/// commands) before failing.
const SQLITE_BUSY: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub(crate) enum Pool {
    /// One connection writes: writers take turns at it, woken in order
    /// ([`Lanes`]). Reads run beside it on their own connections (WAL),
    /// never behind a commit's disk sync.
    Sqlite {
        write: Arc<Lanes>,
        read: Arc<Lanes>,
    },
    Postgres(PgPool),
}

#[cfg(test)]
impl Pool {
    pub(crate) async fn close(&self) {
        match self {
            Pool::Sqlite { write, read } => {
                read.close().await;
                write.close().await;
            }
            Pool::Postgres(pool) => pool.close().await,
        }
    }
}

/// Runs `$body` with `$p` bound to the engine's pool (on SQLite, a
/// connection taken for it: failing to take one returns the error from the
/// enclosing function), `$Db` (optional) to its database type and `$begin`
/// to the
/// statement opening a write transaction: SQLite's `BEGIN IMMEDIATE` takes
/// the write lock up front, so a transaction never has to upgrade a read
/// lock (which SQLite refuses with `SQLITE_BUSY` rather than waiting).
/// With `read,` first, `$body` only reads: on SQLite it runs on a reader,
/// not waiting for the writer's turn.
macro_rules! on_pool {
    (read, $pool:expr, |$p:ident, $begin:ident| $body:expr) => {
        on_pool!(read, $pool, |$p, $begin, _Db| $body)
    };
    (read, $pool:expr, |$p:ident, $begin:ident, $Db:ident| $body:expr) => {
        on_pool!(@ $pool, read, "BEGIN", |$p, $begin, $Db| $body)
    };
    ($pool:expr, |$p:ident, $begin:ident| $body:expr) => {
        on_pool!($pool, |$p, $begin, _Db| $body)
    };
    ($pool:expr, |$p:ident, $begin:ident, $Db:ident| $body:expr) => {
        on_pool!(@ $pool, write, "BEGIN IMMEDIATE", |$p, $begin, $Db| $body)
    };
    (@ $pool:expr, $side:ident, $sqlite_begin:literal, |$p:ident, $begin:ident, $Db:ident| $body:expr) => {
        match $pool {
            Pool::Sqlite { $side: lanes, .. } => {
                #[allow(dead_code)]
                type $Db = sqlx::Sqlite;
                let $begin = $sqlite_begin;
                let mut taken = lanes.take().await?;
                let $p = &mut *taken;
                $body
            }
            Pool::Postgres($p) => {
                #[allow(dead_code)]
                type $Db = sqlx::Postgres;
                let $begin = "BEGIN";
                $body
            }
        }
    };
}

/// Takes the named lock until the transaction `$tx` ends: the upsert
/// row-locks on PostgreSQL (a second taker waits) and is a write on SQLite
/// (which the write transaction already serialises).
macro_rules! take_lock {
    ($tx:expr, $name:expr) => {
        sqlx::query(
            "INSERT INTO locks (name, n) VALUES ($1, 0)
             ON CONFLICT (name) DO UPDATE SET n = locks.n + 1",
        )
        .bind($name)
        .execute(&mut *$tx)
        .await?
    };
}

/// The mailbox `$mailbox`'s [`Holds`], read inside the transaction `$tx`.
macro_rules! read_holds {
    ($tx:expr, $mailbox:expr) => {{
        let row: Option<(Option<i64>, i64, Option<i64>)> = sqlx::query_as(
            "SELECT paused_until, fewer, fewer_until FROM mailbox_holds WHERE mailbox = $1",
        )
        .bind($mailbox)
        .fetch_optional(&mut *$tx)
        .await?;
        row.map_or_else(Holds::default, |(paused_until, fewer, fewer_until)| Holds {
            paused_until: paused_until.map(time),
            fewer: u32::try_from(fewer).unwrap_or(0),
            fewer_until: fewer_until.map(time),
        })
    }};
}

/// Appends ` IN ($1, $2, …)` to the query builder `$q`, binding each of
/// `$ids` (an iterator of `&str`).
macro_rules! push_in {
    ($q:expr, $ids:expr) => {{
        $q.push(" IN (");
        let mut list = $q.separated(", ");
        for id in $ids {
            list.push_bind(id);
        }
        $q.push(")");
    }};
}

/// The columns of `messages` that [`message_of`] reads, for `SELECT` and
/// `RETURNING`.
macro_rules! message_columns {
    () => {
        "id, account, sender, client, received_at, state, attempts, next_attempt, last_error,
         passthrough, held, size, lease_relay, lease_expires"
    };
}

/// The [`Message`] (without recipients) in a row of `message_columns!`,
/// on either engine.
fn message_of<'r, R>(row: &'r R) -> Result<Message, StoreError>
where
    R: Row,
    &'r str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let id: String = row.try_get("id")?;
    let lease = match (
        row.try_get::<Option<String>, _>("lease_relay")?,
        row.try_get::<Option<i64>, _>("lease_expires")?,
    ) {
        (Some(relay), Some(expires)) => Some(LeaseHolder {
            relay,
            expires: time(expires),
        }),
        _ => None,
    };
    let state = MessageState::parse(&id, &row.try_get::<String, _>("state")?)?;
    Ok(Message {
        progress: Progress {
            state,
            attempts: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or(u32::MAX),
            next_attempt: row.try_get::<Option<i64>, _>("next_attempt")?.map(time),
            last_error: row.try_get("last_error")?,
            recipients: Vec::new(),
        },
        envelope: Envelope {
            account: row.try_get("account")?,
            sender: row.try_get("sender")?,
            client: row.try_get("client")?,
            received_at: time(row.try_get("received_at")?),
            passthrough: row.try_get("passthrough")?,
            id,
        },
        held: row.try_get("held")?,
        size: u64::try_from(row.try_get::<i64, _>("size")?).unwrap_or(0),
        lease,
    })
}

/// The recipients, in order, of the messages `$ids` (`Option<&[String]>`:
/// all with `None`), each with its message's id, ordered by that id.
macro_rules! recipients_of {
    ($conn:expr, $Db:ty, $ids:expr) => {{
        let ids: &[String] = $ids;
        let mut q = sqlx::QueryBuilder::<$Db>::new(
            "SELECT message_id, address, state, reply_code, reply_enhanced, reply_text, reason
             FROM recipients WHERE message_id",
        );
        push_in!(q, ids.iter().map(String::as_str));
        q.push(" ORDER BY message_id, position");
        q.build()
            .fetch_all($conn)
            .await?
            .iter()
            .map(|row| -> Result<(String, Recipient), StoreError> {
                let id: String = row.try_get("message_id")?;
                let state = RecipientState::parse(&id, &row.try_get::<String, _>("state")?)?;
                let reply = match row.try_get::<Option<String>, _>("reply_text")? {
                    Some(text) => Some(Reply {
                        code: u16::try_from(
                            row.try_get::<Option<i64>, _>("reply_code")?.unwrap_or(0),
                        )
                        .unwrap_or(0),
                        enhanced: row.try_get("reply_enhanced")?,
                        text,
                    }),
                    None => None,
                };
                let recipient = Recipient {
                    address: row.try_get("address")?,
                    state,
                    reply,
                    reason: row.try_get("reason")?,
                };
                Ok((id, recipient))
            })
            .collect::<Result<Vec<_>, StoreError>>()?
    }};
}

/// Gives each message (ordered by id) its recipients (ordered by message
/// id, then position).
fn attach(messages: &mut [Message], recipients: Vec<(String, Recipient)>) {
    let mut recipients = recipients.into_iter().peekable();
    for m in messages {
        while let Some((id, _)) = recipients.peek() {
            match id.as_str().cmp(m.envelope.id.as_str()) {
                std::cmp::Ordering::Less => {
                    recipients.next();
                }
                std::cmp::Ordering::Equal => {
                    if let Some((_, r)) = recipients.next() {
                        m.progress.recipients.push(r);
                    }
                }
                std::cmp::Ordering::Greater => break,
            }
        }
    }
}

/// A message ready for its transaction: its body placed and summed.
struct Placed {
    envelope: Envelope,
    progress: Progress,
    held: bool,
    lease: Option<LeaseHolder>,
    size: u64,
    checksum: [u8; 32],
    /// The body to store in the database; `None`: it is a body file.
    inline: Option<Vec<u8>>,
}

/// Where the commit task answers a write.
type Answer<T> = oneshot::Sender<Result<T, StoreError>>;

fn reply<T>(answer: Answer<T>, result: Result<T, StoreError>) {
    // The caller may have gone; nothing is owed to it then.
    let _ = answer.send(result);
}

/// A write the commit task batches with others into one transaction, and
/// where its answer goes.
enum Write {
    /// A new message (boxed: the channel's slots stay small).
    Insert(Box<Placed>, Answer<()>),
    /// Delete a message this relay holds the lease on (delivered): whether
    /// it was still this relay's to delete.
    Remove(String, Answer<bool>),
    /// Lease an account's due messages to this relay: those leased.
    Lease(Due, Answer<Vec<Message>>),
}

impl Write {
    fn fail(self, e: StoreError) {
        match self {
            Write::Insert(_, answer) => reply(answer, Err(e)),
            Write::Remove(_, answer) => reply(answer, Err(e)),
            Write::Lease(_, answer) => reply(answer, Err(e)),
        }
    }
}

/// Which messages [`Write::Lease`] takes: up to `limit` of `account`'s
/// due at `now` (ms), leased until `expires` (ms).
struct Due {
    account: String,
    now: i64,
    expires: i64,
    limit: i64,
}

/// What a committed batch did, for the answers.
struct Committed {
    /// The removals that applied.
    removed: std::collections::HashSet<String>,
    /// Each lease's messages, in the batch's order.
    leased: std::collections::VecDeque<Vec<Message>>,
}

impl Committed {
    fn answer(mut self, batch: impl IntoIterator<Item = Write>) {
        for write in batch {
            match write {
                Write::Insert(_, answer) => reply(answer, Ok(())),
                Write::Remove(id, answer) => reply(answer, Ok(self.removed.contains(&id))),
                Write::Lease(_, answer) => {
                    reply(answer, Ok(self.leased.pop_front().unwrap_or_default()))
                }
            }
        }
    }
}

/// The queue's durable store. Cheap to clone; every clone is the same
/// relay. See the crate documentation for the guarantees.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    dialect: Dialect,
    relay: Arc<str>,
    commits: Arc<AtomicU64>,
    slot_serial: Arc<AtomicU64>,
    writes: mpsc::Sender<Write>,
    /// The embedded store's body files; `None` on PostgreSQL.
    bodies: Option<Arc<Path>>,
    /// [`SPOOLED_IN_MEMORY`], in [`SPOOLED_UNIT`]s.
    spooled_in_memory: Arc<Semaphore>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dialect", &self.dialect)
            .field("relay", &self.relay)
            .finish_non_exhaustive()
    }
}

/// A connection/request slot of a mailbox, held until released or expired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotId(String);

/// The shared refresh token of an account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedToken {
    /// The token, if one was ever stored.
    pub token: Option<Secret>,
    /// Bumped at every rotation; a relay that saw version N waits for N+1.
    pub version: i64,
}

/// The answer to "may this relay redeem the refresh token?".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Redeem {
    /// Yes, until [`Store::finish_redeem`] or the lock's expiry; here is the
    /// token to redeem.
    Granted(SharedToken),
    /// Another relay is redeeming it until this time at the latest; read the
    /// result with [`Store::token`] when its version changes.
    Busy {
        /// The relay redeeming it.
        relay: String,
        /// When its lock expires.
        until: SystemTime,
    },
}

/// A message's body as stored: in the row, its checksum, whether it is a
/// body file instead.
type BodyRow = (Option<Vec<u8>>, Vec<u8>, bool);

/// Runs `work` on `path` on a blocking thread; an error names `action` and
/// the path.
async fn blocking<T: Send + 'static>(
    path: &Path,
    action: &'static str,
    work: impl FnOnce(&Path) -> std::io::Result<T> + Send + 'static,
) -> Result<T, StoreError> {
    let owned = path.to_path_buf();
    let result = tokio::task::spawn_blocking(move || work(&owned))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    result.map_err(|source| StoreError::BodyFile {
        action,
        path: path.to_path_buf(),
        source,
    })
}

/// A spooled body read into memory.
async fn read_spooled(spooled: Spooled) -> Result<Vec<u8>, StoreError> {
    let path = PathBuf::from("a spooled body");
    blocking(&path, "read back", move |_| spooled.read_all()).await
}

/// Takes the embedded store's open lock in `dir`, waiting for it as long
/// as SQLite waits for its own ([`SQLITE_BUSY`]); released when the file
/// is dropped. SQLite has no lock for migrations (PostgreSQL's advisory
/// lock serves there), and making a new database WAL needs the file to
/// itself: processes opening one store at once (a relay and an admin verb
/// beside it) take turns, and the later ones find it made and migrated.
async fn opening_lock(dir: &Path) -> Result<std::fs::File, StoreError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join(SQLITE_OPEN_LOCK);
    let taking = path.clone();
    let taken = tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&taking)?;
        let until = std::time::Instant::now() + SQLITE_BUSY;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(file),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "another process has been opening the store for {} s",
                            SQLITE_BUSY.as_secs()
                        ),
                    ))
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(e),
            }
        }
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    taken.map_err(|source| StoreError::OpenLock { path, source })
}

/// Creates a directory (and its parents) with mode 0700.
fn create_private_dir(path: &Path) -> Result<(), StoreError> {
    relay_config::create_private_dir(path).map_err(|source| StoreError::BodyFile {
        action: "create",
        path: path.to_path_buf(),
        source,
    })
}

/// Removes the body files of deleted messages (`(id, body_file)`, as
/// [`delete_many`] returns them), after their commit. No directory sync:
/// a removal undone by a crash leaves a file that the next sweep removes.
async fn remove_bodies_of(dir: Option<&Arc<Path>>, deleted: Vec<(String, bool)>) {
    let Some(dir) = dir else { return };
    let files: Vec<String> = deleted
        .into_iter()
        .filter_map(|(id, in_file)| in_file.then_some(id))
        .collect();
    if !files.is_empty() {
        remove_body_files(dir.clone(), files).await;
    }
}

async fn remove_body_files(dir: Arc<Path>, names: Vec<String>) {
    let removed = tokio::task::spawn_blocking(move || {
        for name in names {
            let path = dir.join(&name);
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a body file");
                }
            }
        }
    })
    .await;
    if let Err(e) = removed {
        tracing::warn!(error = %e, "removing body files stopped");
    }
}

/// `body` if its SHA-256 is `checksum`.
fn checked(id: &str, body: Vec<u8>, checksum: &[u8]) -> Result<Vec<u8>, StoreError> {
    if Sha256::digest(&body).as_slice() == checksum {
        Ok(body)
    } else {
        Err(StoreError::Checksum { id: id.to_string() })
    }
}

pub(crate) fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn ms_of(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Store {
    /// Opens (creating if needed) the store and brings its schema up to
    /// date. Refuses a schema newer than this build's.
    pub async fn open(settings: StoreSettings) -> Result<Store, StoreError> {
        let (bodies, _opening): (Option<Arc<Path>>, _) = match &settings.location {
            Location::Sqlite(dir) => {
                let bodies = dir.join(BODIES_DIR);
                create_private_dir(&bodies)?;
                (Some(bodies.into()), Some(opening_lock(dir).await?))
            }
            Location::Postgres { .. } => (None, None),
        };
        let (pool, dialect) = connect(&settings).await?;
        let migrator = schema::migrator(dialect);
        let migrated = match &pool {
            // `run` over a connection makes this future not `Send` (sqlx's
            // `Acquire` is not general enough); `run_direct` is sqlx's way
            // around that.
            Pool::Sqlite { write, .. } => {
                let mut conn = write.take().await.map_err(StoreError::Connect)?;
                migrator.run_direct(None, &mut *conn, false).await
            }
            Pool::Postgres(p) => migrator.run(p).await,
        };
        migrated.map_err(|e| match e {
            sqlx::migrate::MigrateError::VersionMissing(found) => StoreError::SchemaTooNew {
                found,
                known: SCHEMA_VERSION,
            },
            e => StoreError::Migrate(e),
        })?;
        let commits = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel(MAX_BATCH);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let committers = match dialect {
            Dialect::Sqlite => 1,
            Dialect::Postgres => POSTGRES_COMMITTERS,
        };
        let relay: Arc<str> = settings.relay.into();
        for _ in 0..committers {
            tokio::spawn(commit_task(
                pool.clone(),
                dialect,
                relay.clone(),
                bodies.clone(),
                rx.clone(),
                commits.clone(),
            ));
        }
        Ok(Store {
            pool,
            dialect,
            relay,
            commits,
            slot_serial: Arc::new(AtomicU64::new(0)),
            writes: tx,
            bodies,
            spooled_in_memory: Arc::new(Semaphore::new(SPOOLED_IN_MEMORY / SPOOLED_UNIT)),
        })
    }

    /// This relay's id.
    pub fn relay(&self) -> &str {
        &self.relay
    }

    /// Transactions committed by the commit task so far (group commit
    /// shares one among the inserts and removals waiting at the time).
    pub fn group_commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Stores a message durably: when this returns `Ok`, it survives a crash
    /// of the relay, the machine or (with PostgreSQL) the database server.
    /// Concurrent calls share one transaction and one commit. A spooled
    /// body is made durable as a body file first on the embedded store
    /// (see [`crate::Spool`]).
    ///
    /// Cancel safety: dropping the future before the message reached the
    /// commit task stores nothing (a body file already kept is removed at
    /// the next [`Store::sweep_bodies`]); dropping it later does not stop
    /// the commit, so the message may be stored although the caller never
    /// saw `Ok` (as when a client's connection breaks before it reads
    /// `250`).
    pub async fn insert(&self, message: NewMessage) -> Result<(), StoreError> {
        let (placed, _budget) = self.place(message, false).await?;
        let id = placed.envelope.id.clone();
        let in_file = placed.inline.is_none();
        let result = self
            .write(|answer| Write::Insert(Box::new(placed), answer))
            .await;
        if result.is_err() && in_file {
            self.drop_unstored_body(&id).await;
        }
        result
    }

    /// Sums the message's body and puts it where it is stored: a spooled
    /// body becomes a durable body file on the embedded store (`replace`:
    /// even if one of its name exists), or is read into memory on
    /// PostgreSQL (holding a share of [`SPOOLED_IN_MEMORY`], returned, until
    /// its commit).
    async fn place(
        &self,
        message: NewMessage,
        replace: bool,
    ) -> Result<(Placed, Option<OwnedSemaphorePermit>), StoreError> {
        let NewMessage {
            envelope,
            progress,
            held,
            lease,
            body,
        } = message;
        let size = body.len();
        let (checksum, inline, budget) = match body {
            Body::Bytes(bytes) => (Sha256::digest(&bytes).into(), Some(bytes), None),
            Body::Spooled(spooled) => {
                let checksum = spooled.checksum();
                match &self.bodies {
                    Some(dir) => {
                        let to = dir.join(&envelope.id);
                        let temp = dir.join(format!(".{}.import", envelope.id));
                        blocking(&to, "keep the body as", move |to| {
                            if replace {
                                spooled.keep_replacing(to, &temp)
                            } else {
                                spooled.keep_as(to)
                            }
                        })
                        .await?;
                        (checksum, None, None)
                    }
                    None => {
                        let budget = self.spooled_budget(&spooled).await?;
                        let bytes = read_spooled(spooled).await?;
                        (checksum, Some(bytes), Some(budget))
                    }
                }
            }
        };
        let placed = Placed {
            envelope,
            progress,
            held,
            lease,
            size,
            checksum,
            inline,
        };
        Ok((placed, budget))
    }

    /// Waits until `spooled` may be held in memory for its commit (see
    /// [`SPOOLED_IN_MEMORY`]); a body larger than the whole budget takes
    /// all of it.
    async fn spooled_budget(&self, spooled: &Spooled) -> Result<OwnedSemaphorePermit, StoreError> {
        let units = usize::try_from(spooled.len())
            .unwrap_or(usize::MAX)
            .div_ceil(SPOOLED_UNIT)
            .clamp(1, SPOOLED_IN_MEMORY / SPOOLED_UNIT);
        self.spooled_in_memory
            .clone()
            .acquire_many_owned(u32::try_from(units).unwrap_or(u32::MAX))
            .await
            // never closed
            .map_err(|_| StoreError::Closed)
    }

    /// Removes the body file of a message whose insert failed, unless the
    /// message was stored after all (a commit whose answer was lost): only
    /// what is surely not stored goes. Left in doubt, the next
    /// [`Store::sweep_bodies`] decides.
    async fn drop_unstored_body(&self, id: &str) {
        let Some(dir) = &self.bodies else { return };
        if let Ok(false) = self.stored(id).await {
            remove_body_files(dir.clone(), vec![id.to_owned()]).await;
        }
    }

    /// Whether a message `id` is stored.
    async fn stored(&self, id: &str) -> Result<bool, StoreError> {
        let sql = "SELECT COUNT(*) FROM messages WHERE id = $1";
        let count: i64 = on_pool!(&self.pool, |p, _begin| {
            sqlx::query_scalar(sql).bind(id).fetch_one(p).await?
        });
        Ok(count > 0)
    }

    /// Removes body files that no stored message names: those of inserts a
    /// crash interrupted. Only for the one relay that owns the embedded
    /// store (the queue directory's lock), before it accepts mail: another
    /// process's insert in flight would lose its body. Returns how many
    /// were removed.
    pub async fn sweep_bodies(&self) -> Result<u64, StoreError> {
        let Some(dir) = &self.bodies else {
            return Ok(0);
        };
        let sql = "SELECT id FROM messages WHERE body_file";
        let kept: std::collections::HashSet<String> = on_pool!(&self.pool, |p, _begin| {
            sqlx::query_scalar(sql).fetch_all(p).await?
        })
        .into_iter()
        .collect();
        let orphans = blocking(dir, "list the bodies in", move |dir| {
            let mut orphans = Vec::new();
            for entry in std::fs::read_dir(dir)? {
                let name = entry?.file_name().to_string_lossy().into_owned();
                if !kept.contains(&name) {
                    orphans.push(name);
                }
            }
            Ok(orphans)
        })
        .await?;
        let removed = orphans.len() as u64;
        if removed > 0 {
            tracing::info!(
                count = removed,
                dir = %dir.display(),
                "removed body files of messages never stored (an interrupted insert)"
            );
            remove_body_files(dir.clone(), orphans).await;
        }
        Ok(removed)
    }

    /// Hands a write to the commit task and waits for its commit.
    async fn write<T>(&self, write: impl FnOnce(Answer<T>) -> Write) -> Result<T, StoreError> {
        let (answer, result) = oneshot::channel();
        self.writes
            .send(write(answer))
            .await
            .map_err(|_| StoreError::Closed)?;
        result.await.map_err(|_| StoreError::Closed)?
    }

    /// Stores messages from an older queue in one transaction: all or none.
    /// A message already stored (an import repeated after a crash that came
    /// before the old files were removed) is kept as it is. Returns how many
    /// were new. Remove the old files only after this returned `Ok`.
    ///
    /// Bodies given as files ([`crate::Spooled::from_file`]) are linked into
    /// the embedded store, not read; on PostgreSQL they are read, and the
    /// whole import is in memory at once (it takes no share of the budget,
    /// which it could exhaust waiting for itself).
    pub async fn import(&self, messages: Vec<NewMessage>) -> Result<u64, StoreError> {
        let mut placed = Vec::with_capacity(messages.len());
        for message in messages {
            let (message, _budget) = self.place(message, true).await?;
            placed.push(message);
        }
        let messages: Vec<&Placed> = placed.iter().collect();
        on_pool!(&self.pool, |p, begin, Db| {
            let mut tx = p.begin_with(begin).await?;
            let new = insert_many!(tx, Db, &messages, true);
            tx.commit().await?;
            Ok(new)
        })
    }

    /// Leases the account's next due message (not failed, not held, due at
    /// `now`, not leased or its lease expired) to this relay until
    /// `now + lease_timeout`.
    pub async fn lease_next(
        &self,
        account: &str,
        now: SystemTime,
        lease_timeout: Duration,
    ) -> Result<Option<Message>, StoreError> {
        Ok(self.lease_due(account, now, lease_timeout, 1).await?.pop())
    }

    /// [`Store::lease_next`] for up to `limit` messages at once, longest
    /// due first. Leases share the commit task's transactions with inserts
    /// and removals (group commit), after them: a message stored in the
    /// same transaction may be leased, one removed may not.
    ///
    /// Cancel safety: dropping the future after the lease reached the
    /// commit task leaves what it leased to be taken again when the lease
    /// expires.
    pub async fn lease_due(
        &self,
        account: &str,
        now: SystemTime,
        lease_timeout: Duration,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let now = ms(now);
        let due = Due {
            account: account.to_owned(),
            now,
            expires: now.saturating_add(ms_of(lease_timeout)),
            limit: i64::try_from(limit).unwrap_or(i64::MAX),
        };
        self.write(|answer| Write::Lease(due, answer)).await
    }

    /// Extends this relay's lease on `id` to `now + lease_timeout`. `false`:
    /// the lease is no longer ours (expired and taken, or the message was
    /// deleted); stop and do not record.
    pub async fn renew(
        &self,
        id: &str,
        now: SystemTime,
        lease_timeout: Duration,
    ) -> Result<bool, StoreError> {
        let sql = "UPDATE messages SET lease_expires = $1 WHERE id = $2 AND lease_relay = $3";
        let expires = ms(now).saturating_add(ms_of(lease_timeout));
        let done = on_pool!(&self.pool, |p, _begin| sqlx::query(sql)
            .bind(expires)
            .bind(id)
            .bind(&*self.relay)
            .execute(p)
            .await?
            .rows_affected());
        Ok(done == 1)
    }

    /// Records an attempt's outcome and ends this relay's lease. `false`:
    /// the lease was not ours any more and nothing was written (another
    /// relay may be delivering it).
    pub async fn record(&self, id: &str, progress: &Progress) -> Result<bool, StoreError> {
        on_pool!(&self.pool, |p, begin| {
            let mut tx = p.begin_with(begin).await?;
            let updated = sqlx::query(
                "UPDATE messages SET state = $1, attempts = $2, next_attempt = $3,
                     last_error = $4, lease_relay = NULL, lease_expires = NULL
                 WHERE id = $5 AND lease_relay = $6",
            )
            .bind(progress.state.as_str())
            .bind(i64::from(progress.attempts))
            .bind(progress.next_attempt.map(ms))
            .bind(progress.last_error.as_deref())
            .bind(id)
            .bind(&*self.relay)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated != 1 {
                return Ok(false);
            }
            for (position, r) in progress.recipients.iter().enumerate() {
                sqlx::query(
                    "UPDATE recipients SET state = $1, reply_code = $2, reply_enhanced = $3,
                         reply_text = $4, reason = $5
                     WHERE message_id = $6 AND position = $7",
                )
                .bind(r.state.as_str())
                .bind(r.reply.as_ref().map(|r| i64::from(r.code)))
                .bind(r.reply.as_ref().and_then(|r| r.enhanced.as_deref()))
                .bind(r.reply.as_ref().map(|r| r.text.as_str()))
                .bind(r.reason.as_deref())
                .bind(id)
                .bind(position as i64)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(true)
        })
    }

    /// Gives up this relay's lease without an outcome, due again at
    /// `next_attempt`. `false`: it was not ours.
    pub async fn release(&self, id: &str, next_attempt: SystemTime) -> Result<bool, StoreError> {
        let sql = "UPDATE messages SET lease_relay = NULL, lease_expires = NULL, next_attempt = $1
                   WHERE id = $2 AND lease_relay = $3";
        let done = on_pool!(&self.pool, |p, _begin| sqlx::query(sql)
            .bind(ms(next_attempt))
            .bind(id)
            .bind(&*self.relay)
            .execute(p)
            .await?
            .rows_affected());
        Ok(done == 1)
    }

    /// How far the database's clock is ahead of this relay's (negative:
    /// behind), measured against `now` taken around the query; `None` on
    /// the embedded store, which only this relay's clock ever writes.
    /// Relays sharing a database time leases and the pace by their own
    /// clocks, so theirs must agree with each other.
    pub async fn clock_skew(&self) -> Result<Option<i64>, StoreError> {
        let Pool::Postgres(p) = &self.pool else {
            return Ok(None);
        };
        let before = SystemTime::now();
        let database: i64 =
            sqlx::query_scalar("SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT")
                .fetch_one(p)
                .await?;
        let after = SystemTime::now();
        let local = ms(before) / 2 + ms(after) / 2;
        Ok(Some(database.saturating_sub(local)))
    }

    /// Ends every lease this relay holds but those on `keep` (outcomes still
    /// being written), for a relay that stops: its messages are due to the
    /// other relays at once rather than when the leases expire. Returns
    /// how many leases ended.
    pub async fn release_all(&self, keep: &[&str]) -> Result<u64, StoreError> {
        on_pool!(&self.pool, |p, _begin, Db| {
            let mut q = sqlx::QueryBuilder::<Db>::new(
                "UPDATE messages SET lease_relay = NULL, lease_expires = NULL WHERE lease_relay = ",
            );
            q.push_bind(&*self.relay);
            if !keep.is_empty() {
                q.push(" AND id NOT");
                push_in!(q, keep.iter().copied());
            }
            Ok(q.build().execute(p).await?.rows_affected())
        })
    }

    /// Ends every lease held by another relay, for a relay that knows it is
    /// the only one on this store (the embedded store, whose directory it
    /// has locked): those relays are gone, so their messages need not wait
    /// for the leases to expire. Returns how many leases ended.
    pub async fn end_others_leases(&self) -> Result<u64, StoreError> {
        let sql = "UPDATE messages SET lease_relay = NULL, lease_expires = NULL
                   WHERE lease_relay IS NOT NULL AND lease_relay <> $1";
        Ok(on_pool!(&self.pool, |p, _begin| sqlx::query(sql)
            .bind(&*self.relay)
            .execute(p)
            .await?
            .rows_affected()))
    }

    /// Holds or releases messages (an administrator; a message whose body
    /// no longer matches its checksum), in one transaction. Returns the
    /// ids that are there.
    pub async fn set_held(&self, ids: &[&str], held: bool) -> Result<Vec<String>, StoreError> {
        self.change(ids, Change::Held(held)).await
    }

    /// Makes messages due at `now` (an administrator's retry), in one
    /// transaction. A failed message comes back as deferred, its failed
    /// recipients to be tried again (those of a message not failed stay
    /// failed). A leased message keeps its lease (its attempt goes on).
    /// Returns the ids that are there.
    pub async fn retry(&self, ids: &[&str], now: SystemTime) -> Result<Vec<String>, StoreError> {
        self.change(ids, Change::Due(now)).await
    }

    /// Makes `change` to the messages `ids` in one transaction; returns the
    /// ids that are there.
    async fn change(&self, ids: &[&str], change: Change) -> Result<Vec<String>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        on_pool!(&self.pool, |p, begin, Db| {
            let mut tx = p.begin_with(begin).await?;
            let mut found = Vec::with_capacity(ids.len());
            for chunk in ids.chunks(ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::<Db>::new("UPDATE messages SET ");
                match change {
                    Change::Held(held) => {
                        q.push("held = ").push_bind(held);
                    }
                    Change::Due(now) => {
                        let mut revive = sqlx::QueryBuilder::<Db>::new(
                            "UPDATE recipients SET state = 'deferred' WHERE state = 'failed'
                             AND message_id IN
                                 (SELECT id FROM messages WHERE state = 'failed' AND id",
                        );
                        push_in!(revive, chunk.iter().copied());
                        revive.push(")");
                        revive.build().execute(&mut *tx).await?;
                        q.push("next_attempt = ").push_bind(ms(now)).push(
                            ", state = (CASE WHEN state = 'failed' THEN 'deferred' ELSE state END)",
                        );
                    }
                }
                q.push(" WHERE id");
                push_in!(q, chunk.iter().copied());
                q.push(" RETURNING id");
                let changed: Vec<String> = q.build_query_scalar().fetch_all(&mut *tx).await?;
                found.extend(changed);
            }
            tx.commit().await?;
            Ok(found)
        })
    }

    /// Deletes messages, leased or not (an administrator's deletion; a
    /// relay delivering one finds its lease gone), in one transaction.
    /// Returns the ids that were there and are gone.
    pub async fn delete(&self, ids: &[&str]) -> Result<Vec<String>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        on_pool!(&self.pool, |p, begin, Db| {
            let mut tx = p.begin_with(begin).await?;
            let deleted = delete_many!(tx, Db, ids, None);
            tx.commit().await?;
            let found = deleted.iter().map(|(id, _)| id.clone()).collect();
            remove_bodies_of(self.bodies.as_ref(), deleted).await;
            Ok(found)
        })
    }

    /// Deletes a message this relay holds the lease on (delivered to every
    /// recipient). `false`: the lease was not ours any more and nothing was
    /// deleted. Removals share the commit task's transactions with inserts
    /// (group commit); like [`Store::insert`], a removal handed over
    /// completes even if the future is dropped.
    pub async fn remove(&self, id: &str) -> Result<bool, StoreError> {
        self.write(|answer| Write::Remove(id.to_owned(), answer))
            .await
    }

    /// The body of this relay's leased message if it may be handed to the
    /// upstream now: still there, still ours, not held, and the lease good
    /// for at least a third of `lease_timeout` more (the renewal every third
    /// keeps it so; a lease whose renewals failed is not used). `None`: do
    /// not send it. The body is checked against the checksum taken at
    /// insert ([`StoreError::Checksum`]). One read: no commit, no disk sync.
    pub async fn begin(
        &self,
        id: &str,
        now: SystemTime,
        lease_timeout: Duration,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let sql = "SELECT b.body, m.checksum, m.body_file
                   FROM messages m LEFT JOIN bodies b ON b.message_id = m.id
                   WHERE m.id = $1 AND m.lease_relay = $2 AND NOT m.held AND m.lease_expires >= $3";
        let good_until = ms(now).saturating_add(ms_of(lease_timeout / 3));
        let row: Option<BodyRow> = on_pool!(read, &self.pool, |p, _begin| {
            sqlx::query_as(sql)
                .bind(id)
                .bind(&*self.relay)
                .bind(good_until)
                .fetch_optional(p)
                .await?
        });
        self.body_of(id, row).await
    }

    /// Fails every passthrough message whose relay no longer holds it (it
    /// died, or gave the lease up): its client waited for the answer on a
    /// connection that is gone and resends the message, so delivering this
    /// copy would duplicate it. Passthrough messages are leased at insert
    /// and never by [`Store::lease_next`]. Each open recipient gets `reply`
    /// and `reason`. Returns how many messages failed.
    pub async fn fail_orphans(
        &self,
        now: SystemTime,
        reply: &Reply,
        reason: &str,
    ) -> Result<u64, StoreError> {
        macro_rules! orphans {
            () => {
                "SELECT id FROM messages WHERE passthrough AND state <> 'failed'
                     AND (lease_relay IS NULL OR lease_expires <= $1)"
            };
        }
        on_pool!(&self.pool, |p, begin| {
            let mut tx = p.begin_with(begin).await?;
            sqlx::query(concat!(
                "UPDATE recipients SET state = 'failed', reply_code = $2, reply_enhanced = $3,
                     reply_text = $4, reason = $5
                 WHERE state IN ('pending', 'deferred') AND message_id IN (",
                orphans!(),
                ")"
            ))
            .bind(ms(now))
            .bind(i64::from(reply.code))
            .bind(reply.enhanced.as_deref())
            .bind(reply.text.as_str())
            .bind(reason)
            .execute(&mut *tx)
            .await?;
            let failed = sqlx::query(concat!(
                "UPDATE messages SET state = 'failed', next_attempt = NULL, last_error = $2,
                     lease_relay = NULL, lease_expires = NULL
                 WHERE id IN (",
                orphans!(),
                ")"
            ))
            .bind(ms(now))
            .bind(reply.text.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            Ok(failed)
        })
    }

    /// How many messages are in each state, and when the oldest of each was
    /// accepted. States without messages are left out.
    pub async fn census(&self) -> Result<Vec<(MessageState, u64, SystemTime)>, StoreError> {
        let sql = "SELECT state, COUNT(*), MIN(received_at) FROM messages GROUP BY state";
        let rows: Vec<(String, i64, i64)> = on_pool!(read, &self.pool, |p, _begin| {
            sqlx::query_as(sql).fetch_all(p).await?
        });
        rows.into_iter()
            .map(|(state, count, oldest)| {
                Ok((
                    MessageState::parse("(census)", &state)?,
                    u64::try_from(count).unwrap_or(0),
                    time(oldest),
                ))
            })
            .collect()
    }

    /// The body, checked against the checksum taken at insert.
    pub async fn body(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let sql = "SELECT b.body, m.checksum, m.body_file
                   FROM messages m LEFT JOIN bodies b ON b.message_id = m.id WHERE m.id = $1";
        let row: Option<BodyRow> = on_pool!(read, &self.pool, |p, _begin| {
            sqlx::query_as(sql).bind(id).fetch_optional(p).await?
        });
        self.body_of(id, row).await
    }

    /// The body a [`BodyRow`] stands for, checked against its checksum: in
    /// the row, or read from its body file. A file gone with its message
    /// (deleted meanwhile) is `None`.
    async fn body_of(&self, id: &str, row: Option<BodyRow>) -> Result<Option<Vec<u8>>, StoreError> {
        let Some((inline, checksum, in_file)) = row else {
            return Ok(None);
        };
        let body = match (inline, in_file, &self.bodies) {
            (Some(body), false, _) => body,
            (_, true, Some(dir)) => {
                let path = dir.join(id);
                let read = blocking(&path, "read the body", |path| std::fs::read(path)).await;
                match read {
                    Ok(body) => body,
                    Err(StoreError::BodyFile { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound
                            && self.get(id).await?.is_none() =>
                    {
                        return Ok(None);
                    }
                    Err(e) => return Err(e),
                }
            }
            _ => {
                return Err(StoreError::Invalid {
                    id: id.to_owned(),
                    column: "body_file",
                    value: in_file.to_string(),
                })
            }
        };
        checked(id, body, &checksum).map(Some)
    }

    /// One message, without its body.
    pub async fn get(&self, id: &str) -> Result<Option<Message>, StoreError> {
        Ok(self.select(Rows::Id(id)).await?.pop())
    }

    /// Up to `limit` messages whose ids sort after `after` (from the first
    /// with `None`), in id order, without bodies: a page of a pass over the
    /// whole queue (`queue list`, an action on every message), which then
    /// holds one page at a time however large the queue.
    pub async fn list_after(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        self.select(Rows::After(after, limit)).await
    }

    /// The accounts that have messages not failed, and the earliest time one
    /// is due (whether leased or not), for a delivery loop to sleep on.
    pub async fn due(&self) -> Result<Vec<(String, SystemTime)>, StoreError> {
        let sql = "SELECT account, MIN(COALESCE(lease_expires, next_attempt)) FROM messages
                   WHERE state <> 'failed' AND NOT held GROUP BY account ORDER BY account";
        let rows: Vec<(String, i64)> = on_pool!(read, &self.pool, |p, _begin| {
            sqlx::query_as(sql).fetch_all(p).await?
        });
        Ok(rows.into_iter().map(|(a, t)| (a, time(t))).collect())
    }

    /// The messages `rows` names, ordered by id, without bodies.
    async fn select(&self, rows: Rows<'_>) -> Result<Vec<Message>, StoreError> {
        let (mut messages, recipients) = on_pool!(read, &self.pool, |p, _begin, Db| {
            let mut messages_query = sqlx::QueryBuilder::<Db>::new(concat!(
                "SELECT ",
                message_columns!(),
                " FROM messages"
            ));
            match rows {
                Rows::Id(id) => {
                    messages_query.push(" WHERE id = ").push_bind(id);
                }
                Rows::After(after, limit) => {
                    if let Some(after) = after {
                        messages_query.push(" WHERE id > ").push_bind(after);
                    }
                    messages_query
                        .push(" ORDER BY id LIMIT ")
                        .push_bind(i64::from(limit));
                }
            }
            // One snapshot for both queries.
            let mut tx = p.begin().await?;
            let messages = messages_query
                .build()
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(message_of)
                .collect::<Result<Vec<_>, StoreError>>()?;
            let ids: Vec<String> = messages.iter().map(|m| m.envelope.id.clone()).collect();
            let recipients = if ids.is_empty() {
                Vec::new()
            } else {
                recipients_of!(&mut *tx, Db, &ids)
            };
            tx.commit().await?;
            (messages, recipients)
        });
        attach(&mut messages, recipients);
        Ok(messages)
    }

    /// Asks, for every relay sharing the store at once, whether `mailbox` may
    /// send a message to `recipients` recipients at `now`; a `Go` is counted
    /// before this returns. While the mailbox is paused
    /// ([`Store::pause_mailbox`]) the answer is to wait until the pause
    /// ends. Relays' clocks are assumed in step (NTP).
    pub async fn pace(
        &self,
        mailbox: &str,
        now: SystemTime,
        limits: PaceLimits,
        recipients: u32,
    ) -> Result<Pace, StoreError> {
        let admitted = self.pace_line(mailbox, now, limits, &[recipients]).await?;
        Ok(admitted.next.map_or(Pace::Go, Pace::WaitUntil))
    }

    /// [`Store::pace`] for a line of messages waiting in order (their
    /// recipients), decided in one transaction: the first
    /// [`Admitted::go`] of them go and are counted at `now`; the line stops
    /// at the first that must wait, so none goes ahead of an earlier one.
    pub async fn pace_line(
        &self,
        mailbox: &str,
        now: SystemTime,
        limits: PaceLimits,
        line: &[u32],
    ) -> Result<Admitted, StoreError> {
        let now_ms = ms(now);
        let day_ago = now_ms.saturating_sub(ms_of(pace::DAY));
        let minute_ago = now_ms.saturating_sub(ms_of(pace::MINUTE));
        // Every round trip below the lock is one every relay's admissions
        // wait for, so they are few: the holds, the day's recipients and
        // the minute's count in one read; the sends themselves only when a
        // limit is in reach; then the count of those let out. The day's and
        // the minute's totals come from the per-second counts (at most a
        // row a second, whatever the rate), each second the window touches
        // counted whole: an overestimate by at most that second's sends,
        // which only makes the exact sends be read a little sooner.
        let read = "SELECT
             (SELECT paused_until FROM mailbox_holds WHERE mailbox = $1),
             (SELECT CAST(COALESCE(SUM(recipients), 0) AS BIGINT) FROM pace_counts
              WHERE mailbox = $1 AND second >= $2),
             (SELECT CAST(COALESCE(SUM(messages), 0) AS BIGINT) FROM pace_counts
              WHERE mailbox = $1 AND second >= $3),
             (SELECT MIN(at) FROM pace_events WHERE mailbox = $1)";
        on_pool!(&self.pool, |p, begin, Db| {
            // On PostgreSQL, in the same round trip as BEGIN: a crash of the
            // server may forget the last fraction of a second of counted
            // sends (a few more may go out that minute), not worth a disk
            // flush per admission.
            let begin = match self.dialect {
                Dialect::Postgres => "BEGIN; SET LOCAL synchronous_commit = off",
                Dialect::Sqlite => begin,
            };
            let mut tx = p.begin_with(begin).await?;
            take_lock!(tx, format!("pace {mailbox}"));
            // A statement of its own after the lock: its snapshot sees every
            // send counted before the lock was ours.
            let (paused_until, day_total, minute_count, oldest): (
                Option<i64>,
                i64,
                i64,
                Option<i64>,
            ) = sqlx::query_as(read)
                .bind(mailbox)
                .bind(day_ago / 1000)
                .bind(minute_ago / 1000)
                .fetch_one(&mut *tx)
                .await?;
            let holds = Holds {
                paused_until: paused_until.map(time),
                ..Holds::default()
            };
            if let Some(until) = holds.paused(now) {
                return Ok(Admitted {
                    go: 0,
                    next: Some(until),
                });
            }
            // Sends older than a day are ignored by the reads; deleted an
            // hour's worth at a time, not one statement per admission.
            if oldest
                .is_some_and(|oldest| oldest <= day_ago.saturating_sub(ms_of(pace::PURGE_EVERY)))
            {
                sqlx::query("DELETE FROM pace_events WHERE mailbox = $1 AND at <= $2")
                    .bind(mailbox)
                    .bind(day_ago)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM pace_counts WHERE mailbox = $1 AND second < $2")
                    .bind(mailbox)
                    .bind(day_ago / 1000)
                    .execute(&mut *tx)
                    .await?;
            }
            // What `decide` needs of the sends: all the day's if the line
            // could reach its limit; else the minute's newest `max` if the
            // line could reach that (the oldest of them is when the minute
            // frees); else none.
            let day_in_reach = limits.recipients_per_day.is_some_and(|max| {
                let wanted: i64 = line.iter().map(|&n| i64::from(n.min(max))).sum();
                day_total.saturating_add(wanted) > i64::from(max)
            });
            let minute_in_reach = limits.messages_per_minute.is_some_and(|max| {
                let line = i64::try_from(line.len()).unwrap_or(i64::MAX);
                minute_count.saturating_add(line) > i64::from(max.max(1))
            });
            let (since, newest) = if day_in_reach {
                (Some(day_ago), i64::MAX)
            } else if minute_in_reach {
                let max = limits.messages_per_minute.unwrap_or(1).max(1);
                (Some(minute_ago), i64::from(max))
            } else {
                (None, 0)
            };
            let mut sent: Vec<Sent> = Vec::new();
            if let Some(since) = since {
                let rows: Vec<(i64, i64)> = sqlx::query_as(
                    "SELECT at, recipients FROM pace_events
                     WHERE mailbox = $1 AND at > $2 AND at <= $3 ORDER BY at DESC LIMIT $4",
                )
                .bind(mailbox)
                .bind(since)
                .bind(now_ms)
                .bind(newest)
                .fetch_all(&mut *tx)
                .await?;
                sent = rows
                    .into_iter()
                    .rev()
                    .map(|(at, n)| Sent {
                        at: time(at),
                        recipients: u32::try_from(n).unwrap_or(u32::MAX),
                    })
                    .collect();
            }
            let admitted = pace::decide_line(&mut sent, now, limits, line);
            if admitted.go > 0 {
                let mut insert = sqlx::QueryBuilder::<Db>::new(
                    "INSERT INTO pace_events (mailbox, at, recipients) ",
                );
                insert.push_values(&line[..admitted.go], |mut row, &n| {
                    row.push_bind(mailbox)
                        .push_bind(now_ms)
                        .push_bind(i64::from(n));
                });
                insert.build().execute(&mut *tx).await?;
                let recipients: i64 = line[..admitted.go].iter().map(|&n| i64::from(n)).sum();
                sqlx::query(
                    "INSERT INTO pace_counts (mailbox, second, messages, recipients)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (mailbox, second) DO UPDATE SET
                         messages = pace_counts.messages + excluded.messages,
                         recipients = pace_counts.recipients + excluded.recipients",
                )
                .bind(mailbox)
                .bind(now_ms / 1000)
                .bind(i64::try_from(admitted.go).unwrap_or(i64::MAX))
                .bind(recipients)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(admitted)
        })
    }

    /// Takes one of `mailbox`'s `cap` slots (connections, Graph requests)
    /// across every relay, until `now + ttl` unless renewed; slots of a relay
    /// that died come back when they expire. While a reduction lasts
    /// ([`Store::fewer_slots`]) the mailbox has that many fewer (at least
    /// one). `None`: all taken.
    pub async fn acquire_slot(
        &self,
        mailbox: &str,
        cap: u32,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<Option<SlotId>, StoreError> {
        let serial = self.slot_serial.fetch_add(1, Ordering::Relaxed);
        let holder = format!("{} {serial}", self.relay);
        let now_ms = ms(now);
        on_pool!(&self.pool, |p, begin| {
            let mut tx = p.begin_with(begin).await?;
            take_lock!(tx, format!("slots {mailbox}"));
            let cap = read_holds!(tx, mailbox).cap(cap, now);
            sqlx::query("DELETE FROM slots WHERE mailbox = $1 AND expires <= $2")
                .bind(mailbox)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
            let held: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM slots WHERE mailbox = $1")
                .bind(mailbox)
                .fetch_one(&mut *tx)
                .await?;
            if held >= i64::from(cap) {
                return Ok(None);
            }
            sqlx::query("INSERT INTO slots (holder, mailbox, expires) VALUES ($1, $2, $3)")
                .bind(&holder)
                .bind(mailbox)
                .bind(now_ms.saturating_add(ms_of(ttl)))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(Some(SlotId(holder)))
        })
    }

    /// Pauses `mailbox` for every relay until `until` (or later, if it
    /// already was): [`Store::pace`] lets nothing out before then.
    pub async fn pause_mailbox(&self, mailbox: &str, until: SystemTime) -> Result<(), StoreError> {
        self.change_holds(mailbox, |holds| holds.pause(until)).await
    }

    /// Takes one of `mailbox`'s slots away from every relay until `until`
    /// (a reduction still lasting at `now` grows by one and lasts at least
    /// as long; an expired one starts again): [`Store::acquire_slot`]
    /// grants that many fewer, never fewer than one.
    pub async fn fewer_slots(
        &self,
        mailbox: &str,
        now: SystemTime,
        until: SystemTime,
    ) -> Result<(), StoreError> {
        self.change_holds(mailbox, |holds| holds.fewer(now, until))
            .await
    }

    /// Stores `change` of the mailbox's holds, under its own lock so that
    /// two relays' changes both count.
    async fn change_holds(
        &self,
        mailbox: &str,
        change: impl FnOnce(Holds) -> Holds,
    ) -> Result<(), StoreError> {
        on_pool!(&self.pool, |p, begin| {
            let mut tx = p.begin_with(begin).await?;
            take_lock!(tx, format!("holds {mailbox}"));
            let holds = change(read_holds!(tx, mailbox));
            sqlx::query(
                "INSERT INTO mailbox_holds (mailbox, paused_until, fewer, fewer_until)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (mailbox) DO UPDATE SET paused_until = excluded.paused_until,
                     fewer = excluded.fewer, fewer_until = excluded.fewer_until",
            )
            .bind(mailbox)
            .bind(holds.paused_until.map(ms))
            .bind(i64::from(holds.fewer))
            .bind(holds.fewer_until.map(ms))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Extends a slot to `now + ttl`. `false`: it expired and may have been
    /// given to another; stop using it.
    pub async fn renew_slot(
        &self,
        slot: &SlotId,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let sql = "UPDATE slots SET expires = $1 WHERE holder = $2 AND expires > $3";
        let done = on_pool!(&self.pool, |p, _begin| sqlx::query(sql)
            .bind(ms(now).saturating_add(ms_of(ttl)))
            .bind(&slot.0)
            .bind(ms(now))
            .execute(p)
            .await?
            .rows_affected());
        Ok(done == 1)
    }

    /// Gives a slot back.
    pub async fn release_slot(&self, slot: SlotId) -> Result<(), StoreError> {
        let sql = "DELETE FROM slots WHERE holder = $1";
        on_pool!(&self.pool, |p, _begin| sqlx::query(sql)
            .bind(&slot.0)
            .execute(p)
            .await?
            .rows_affected());
        Ok(())
    }

    /// The account's shared refresh token.
    pub async fn token(&self, account: &str) -> Result<Option<SharedToken>, StoreError> {
        let sql = "SELECT token, version FROM refresh_tokens WHERE account = $1";
        let row: Option<(Option<String>, i64)> = on_pool!(read, &self.pool, |p, _begin| {
            sqlx::query_as(sql).bind(account).fetch_optional(p).await?
        });
        Ok(row.map(|(token, version)| SharedToken {
            token: token.map(Secret::new),
            version,
        }))
    }

    /// Asks to be the one relay redeeming the account's refresh token,
    /// until `now + ttl` at the latest.
    pub async fn begin_redeem(
        &self,
        account: &str,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<Redeem, StoreError> {
        let now_ms = ms(now);
        on_pool!(&self.pool, |p, begin| {
            let mut tx = p.begin_with(begin).await?;
            take_lock!(tx, format!("token {account}"));
            sqlx::query(
                "INSERT INTO refresh_tokens (account, token, version, updated_at)
                 VALUES ($1, NULL, 0, $2) ON CONFLICT (account) DO NOTHING",
            )
            .bind(account)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            let (token, version, redeemer, expires): (
                Option<String>,
                i64,
                Option<String>,
                Option<i64>,
            ) = sqlx::query_as(
                "SELECT token, version, redeemer, redeem_expires FROM refresh_tokens
                     WHERE account = $1",
            )
            .bind(account)
            .fetch_one(&mut *tx)
            .await?;
            if let (Some(relay), Some(expires)) = (redeemer, expires) {
                if expires > now_ms && relay != *self.relay {
                    return Ok(Redeem::Busy {
                        relay,
                        until: time(expires),
                    });
                }
            }
            sqlx::query(
                "UPDATE refresh_tokens SET redeemer = $1, redeem_expires = $2 WHERE account = $3",
            )
            .bind(&*self.relay)
            .bind(now_ms.saturating_add(ms_of(ttl)))
            .bind(account)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(Redeem::Granted(SharedToken {
                token: token.map(Secret::new),
                version,
            }))
        })
    }

    /// Ends this relay's redemption: stores the rotated token (a new
    /// version) if there is one, and frees the lock. `false`: the lock had
    /// expired and was taken, and nothing was written.
    pub async fn finish_redeem(
        &self,
        account: &str,
        rotated: Option<&Secret>,
        now: SystemTime,
    ) -> Result<bool, StoreError> {
        let sql = "UPDATE refresh_tokens SET
                token = COALESCE($1, token),
                version = version + (CASE WHEN $1 IS NULL THEN 0 ELSE 1 END),
                updated_at = $2, redeemer = NULL, redeem_expires = NULL
            WHERE account = $3 AND redeemer = $4";
        let done = on_pool!(&self.pool, |p, _begin| sqlx::query(sql)
            .bind(rotated.map(Secret::expose))
            .bind(ms(now))
            .bind(account)
            .bind(&*self.relay)
            .execute(p)
            .await?
            .rows_affected());
        Ok(done == 1)
    }
}

/// Connects to the store's database, as it is (no migration).
pub(crate) async fn connect(settings: &StoreSettings) -> Result<(Pool, Dialect), StoreError> {
    let max = settings.max_connections.max(2);
    Ok(match &settings.location {
        Location::Sqlite(dir) => {
            let options = SqliteConnectOptions::new()
                .filename(dir.join(SQLITE_FILE))
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .foreign_keys(true)
                .busy_timeout(SQLITE_BUSY);
            // The writer's turn is waited for as long as SQLite would wait
            // for the file's lock.
            let write = Arc::new(Lanes::new(options.clone(), 1, SQLITE_BUSY));
            let read = Arc::new(Lanes::new(options, max as usize, ACQUIRE_TIMEOUT));
            (Pool::Sqlite { write, read }, Dialect::Sqlite)
        }
        Location::Postgres { url, password } => {
            let options = postgres_options(url, password.as_ref(), &settings.relay)?;
            // One connection of its own first: its error says why (refused,
            // no answer, the login), where the pool's says only that no
            // connection came in time.
            let (first, _) = connect_postgres(&options).await?;
            let _ = first.close().await;
            let pool = PgPoolOptions::new()
                .max_connections(max)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_lazy_with(options);
            (Pool::Postgres(pool), Dialect::Postgres)
        }
    })
}

/// One connection to a supported PostgreSQL server, and the server's
/// version ([`supported_server`]), within [`ACQUIRE_TIMEOUT`]: a server
/// that does not answer in that time is [`StoreError::Connect`] with a
/// timed-out I/O error.
pub(crate) async fn connect_postgres(
    options: &PgConnectOptions,
) -> Result<(PgConnection, String), StoreError> {
    let connected = async {
        let mut conn = PgConnection::connect_with(options)
            .await
            .map_err(StoreError::Connect)?;
        let version = supported_server(&mut conn).await?;
        Ok((conn, version))
    };
    tokio::time::timeout(ACQUIRE_TIMEOUT, connected)
        .await
        .map_err(|_| no_answer())?
}

/// A server that did not answer within [`ACQUIRE_TIMEOUT`]: a timed-out
/// I/O error, which [`StoreError::is_unreachable`] counts.
pub(crate) fn no_answer() -> StoreError {
    StoreError::Connect(sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer within {} s", ACQUIRE_TIMEOUT.as_secs()),
    )))
}

/// The server's version as it names it, if it is PostgreSQL 13 or newer
/// (`server_version_num` at least 130000; older ones are past their end of
/// life and not tested); otherwise [`StoreError::ServerTooOld`].
pub(crate) async fn supported_server<'e, E>(conn: E) -> Result<String, StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Postgres>,
{
    let (number, version): (i32, String) = sqlx::query_as(
        "SELECT current_setting('server_version_num')::int, current_setting('server_version')",
    )
    .fetch_one(conn)
    .await
    .map_err(StoreError::Connect)?;
    if !supported(number) {
        return Err(StoreError::ServerTooOld { version });
    }
    Ok(version)
}

/// Whether a server of `server_version_num` is supported.
pub(crate) fn supported(number: i32) -> bool {
    number >= 130_000
}

/// A session as the relay opens it: named for `pg_stat_activity`, every
/// commit flushed to disk.
pub(crate) fn postgres_options(
    url: &DatabaseUrl,
    password: Option<&Secret>,
    relay: &str,
) -> Result<PgConnectOptions, StoreError> {
    let mut options = PgConnectOptions::from_str(url.expose())
        .map_err(StoreError::Connect)?
        .application_name(&format!("smtp-oauth-relay {relay}"))
        .options([("synchronous_commit", "on")]);
    if let Some(password) = password {
        options = options.password(password.expose());
    }
    Ok(options)
}

const LEASE_DUE_SQLITE: &str = concat!(
    "UPDATE messages SET lease_relay = $1, lease_expires = $2
    WHERE id IN (SELECT id FROM messages
        WHERE account = $3 AND state <> 'failed' AND NOT held AND NOT passthrough
          AND next_attempt <= $4
          AND (lease_relay IS NULL OR lease_expires <= $4)
        ORDER BY next_attempt, id LIMIT $5)
    RETURNING ",
    message_columns!()
);

const LEASE_DUE_POSTGRES: &str = concat!(
    "UPDATE messages SET lease_relay = $1, lease_expires = $2
    WHERE id IN (SELECT id FROM messages
        WHERE account = $3 AND state <> 'failed' AND NOT held AND NOT passthrough
          AND next_attempt <= $4
          AND (lease_relay IS NULL OR lease_expires <= $4)
        ORDER BY next_attempt, id LIMIT $5 FOR UPDATE SKIP LOCKED)
    RETURNING ",
    message_columns!()
);

/// Rows per multi-row `INSERT` (at most 15 parameters each, well under
/// both engines' limits on parameters per statement).
const ROWS_PER_STATEMENT: usize = 1000;

/// Inserts messages inside a transaction, three multi-row statements per
/// [`ROWS_PER_STATEMENT`] (a round trip per row would cost more than the
/// commit). With `$skip_existing` a message whose id is already stored is
/// left as it is (an import repeated); without, it fails the transaction.
/// Evaluates to the number of messages added. A macro so that one text
/// serves both engines (`$Db`).
macro_rules! insert_many {
    ($conn:expr, $Db:ty, $messages:expr, $skip_existing:expr) => {{
        let messages: &[&Placed] = $messages;
        let mut added = 0u64;
        for chunk in messages.chunks(ROWS_PER_STATEMENT) {
            let mut q = sqlx::QueryBuilder::<$Db>::new(
                "INSERT INTO messages (id, account, sender, client, received_at, state, attempts,
                     next_attempt, last_error, passthrough, held, size, checksum, lease_relay,
                     lease_expires, body_file) ",
            );
            q.push_values(chunk, |mut row, m| {
                let e = &m.envelope;
                row.push_bind(e.id.as_str())
                    .push_bind(e.account.as_str())
                    .push_bind(e.sender.as_str())
                    .push_bind(e.client.as_deref())
                    .push_bind(ms(e.received_at))
                    .push_bind(m.progress.state.as_str())
                    .push_bind(i64::from(m.progress.attempts))
                    .push_bind(m.progress.next_attempt.map(ms))
                    .push_bind(m.progress.last_error.as_deref())
                    .push_bind(e.passthrough)
                    .push_bind(m.held)
                    .push_bind(i64::try_from(m.size).unwrap_or(i64::MAX))
                    .push_bind(m.checksum.to_vec())
                    .push_bind(m.lease.as_ref().map(|l| l.relay.as_str()))
                    .push_bind(m.lease.as_ref().map(|l| ms(l.expires)))
                    .push_bind(m.inline.is_none());
            });
            if $skip_existing {
                q.push(" ON CONFLICT (id) DO NOTHING");
            }
            q.push(" RETURNING id");
            let ids: std::collections::HashSet<String> = q
                .build_query_scalar()
                .fetch_all(&mut *$conn)
                .await?
                .into_iter()
                .collect();
            let new: Vec<&Placed> = chunk
                .iter()
                .copied()
                .filter(|m| ids.contains(&m.envelope.id))
                .collect();
            if new.is_empty() {
                continue;
            }
            added += new.len() as u64;
            let inline: Vec<(&str, &[u8])> = new
                .iter()
                .filter_map(|m| Some((m.envelope.id.as_str(), m.inline.as_deref()?)))
                .collect();
            if !inline.is_empty() {
                let mut q =
                    sqlx::QueryBuilder::<$Db>::new("INSERT INTO bodies (message_id, body) ");
                q.push_values(&inline, |mut row, (id, body)| {
                    row.push_bind(*id).push_bind(*body);
                });
                q.build().execute(&mut *$conn).await?;
            }
            let recipients: Vec<(&str, i64, &Recipient)> = new
                .iter()
                .flat_map(|m| {
                    m.progress
                        .recipients
                        .iter()
                        .enumerate()
                        .map(|(position, r)| (m.envelope.id.as_str(), position as i64, r))
                })
                .collect();
            for rows in recipients.chunks(ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::<$Db>::new(
                    "INSERT INTO recipients (message_id, position, address, state, reply_code,
                         reply_enhanced, reply_text, reason) ",
                );
                q.push_values(rows, |mut row, (id, position, r)| {
                    row.push_bind(*id)
                        .push_bind(*position)
                        .push_bind(r.address.as_str())
                        .push_bind(r.state.as_str())
                        .push_bind(r.reply.as_ref().map(|r| i64::from(r.code)))
                        .push_bind(r.reply.as_ref().and_then(|r| r.enhanced.as_deref()))
                        .push_bind(r.reply.as_ref().map(|r| r.text.as_str()))
                        .push_bind(r.reason.as_deref());
                });
                q.build().execute(&mut *$conn).await?;
            }
        }
        added
    }};
}
use insert_many;

/// Deletes the messages `$ids` (`&[&str]`) inside a transaction, with
/// `$holder` (`Option<&str>`) only those whose lease that relay holds;
/// their bodies and recipients go with them (`ON DELETE CASCADE`, one
/// statement).
/// Evaluates to the ids deleted, each with whether its body is a body file
/// (to be removed after the commit). A macro so that one text serves both
/// engines (`$Db`).
macro_rules! delete_many {
    ($conn:expr, $Db:ty, $ids:expr, $holder:expr) => {{
        let ids: &[&str] = $ids;
        let holder: Option<&str> = $holder;
        let mut deleted: Vec<(String, bool)> = Vec::new();
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let mut q = sqlx::QueryBuilder::<$Db>::new("DELETE FROM messages WHERE id");
            push_in!(q, chunk.iter().copied());
            if let Some(holder) = holder {
                q.push(" AND lease_relay = ").push_bind(holder);
            }
            q.push(" RETURNING id, body_file");
            let gone: Vec<(String, bool)> = q.build_query_as().fetch_all(&mut *$conn).await?;
            deleted.extend(gone);
        }
        deleted
    }};
}
use delete_many;

/// A group-commit task (one on SQLite, [`POSTGRES_COMMITTERS`] taking
/// turns at the channel on PostgreSQL): takes whatever writes are waiting
/// (up to [`MAX_BATCH`]: inserts, removals of delivered messages, leases)
/// into one transaction, commits once, answers each. While a commit is in
/// flight new writes queue up in the channel and form the next batch, so
/// the batch size follows the load with no timer. A batch that fails
/// because of what one write holds (a duplicate id, a stored value this
/// build cannot read) is retried one write per transaction, so that the
/// write fails alone; any other error (the database unreachable) fails the
/// whole batch. The tasks end when every [`Store`] clone is dropped.
async fn commit_task(
    pool: Pool,
    dialect: Dialect,
    relay: Arc<str>,
    bodies: Option<Arc<Path>>,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Write>>>,
    commits: Arc<AtomicU64>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // Answers the writes it commits and hands the vector back emptied, to
    // be filled again; writes that fail come back with the error.
    let commit = |mut writes: Vec<Write>| async {
        match write_batch(&pool, dialect, &relay, bodies.as_ref(), &writes).await {
            Ok(committed) => {
                commits.fetch_add(1, Ordering::Relaxed);
                committed.answer(writes.drain(..));
                Ok(writes)
            }
            Err(e) => Err((writes, e)),
        }
    };
    while rx.lock().await.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (failed, e) = match commit(batch).await {
            Ok(emptied) => {
                batch = emptied;
                continue;
            }
            Err(failed) => failed,
        };
        batch = Vec::with_capacity(MAX_BATCH);
        if failed.len() > 1 && one_write_failed(&e) {
            for write in failed {
                if let Err((mut one, e)) = commit(vec![write]).await {
                    if let Some(write) = one.pop() {
                        write.fail(StoreError::Batch(Arc::new(e)));
                    }
                }
            }
        } else {
            let e = Arc::new(e);
            for write in failed {
                write.fail(StoreError::Batch(e.clone()));
            }
        }
    }
}

/// Whether a batch may have failed because of what one of its writes holds
/// (a constraint, a stored value this build cannot read) rather than
/// because of the database (unreachable, full).
fn one_write_failed(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Database(
            sqlx::Error::Database(_) | sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_)
        ) | StoreError::Invalid { .. }
    )
}

/// Applies `writes` in one transaction: inserts, then removals, then
/// leases.
async fn write_batch(
    pool: &Pool,
    dialect: Dialect,
    relay: &str,
    bodies: Option<&Arc<Path>>,
    writes: &[Write],
) -> Result<Committed, StoreError> {
    let mut inserts: Vec<&Placed> = Vec::new();
    let mut removals: Vec<&str> = Vec::new();
    let mut dues: Vec<&Due> = Vec::new();
    for write in writes {
        match write {
            Write::Insert(message, _) => inserts.push(message),
            Write::Remove(id, _) => removals.push(id),
            Write::Lease(due, _) => dues.push(due),
        }
    }
    // PostgreSQL: skip rows another relay is leasing right now rather than
    // wait for it; a row it leased meanwhile fails the re-checked
    // condition. SQLite's write transaction excludes both.
    let lease_sql = match dialect {
        Dialect::Sqlite => LEASE_DUE_SQLITE,
        Dialect::Postgres => LEASE_DUE_POSTGRES,
    };
    let (removed, leased) = on_pool!(pool, |p, begin, Db| {
        let mut tx = p.begin_with(begin).await?;
        insert_many!(tx, Db, &inserts, false);
        let removed = delete_many!(tx, Db, &removals, Some(relay));
        let mut leased = std::collections::VecDeque::with_capacity(dues.len());
        for due in dues {
            let mut messages = sqlx::query(lease_sql)
                .bind(relay)
                .bind(due.expires)
                .bind(&due.account)
                .bind(due.now)
                .bind(due.limit)
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(message_of)
                .collect::<Result<Vec<_>, StoreError>>()?;
            if !messages.is_empty() {
                messages.sort_by(|a, b| a.envelope.id.cmp(&b.envelope.id));
                let ids: Vec<String> = messages.iter().map(|m| m.envelope.id.clone()).collect();
                let recipients = recipients_of!(&mut *tx, Db, &ids);
                attach(&mut messages, recipients);
                messages.sort_by(|a, b| {
                    (a.progress.next_attempt, &a.envelope.id)
                        .cmp(&(b.progress.next_attempt, &b.envelope.id))
                });
            }
            leased.push_back(messages);
        }
        tx.commit().await?;
        (removed, leased)
    });
    let ids = removed.iter().map(|(id, _)| id.clone()).collect();
    remove_bodies_of(bodies, removed).await;
    Ok(Committed {
        removed: ids,
        leased,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Envelope;

    #[test]
    fn a_location_is_named_without_user_password_or_options() {
        let named = |url: &str| {
            Location::Postgres {
                url: url.into(),
                password: None,
            }
            .to_string()
        };
        assert_eq!(
            named("postgres://relay:pw@db.example.com:5432/relay?sslmode=verify-full"),
            "PostgreSQL db.example.com:5432/relay"
        );
        assert_eq!(
            named("postgres:///relay?user=relay&host=/run/postgresql"),
            "PostgreSQL /run/postgresql (socket)/relay"
        );
        assert_eq!(
            Location::Sqlite("/var/lib/q".into()).to_string(),
            "SQLite /var/lib/q/queue.sqlite"
        );
    }

    // A database a relay knowing only schema version 1 wrote (its queue,
    // built here by applying version 1 alone) opens, migrates to the
    // newest version and keeps its messages.
    #[tokio::test]
    async fn a_version_1_database_migrates_with_its_messages() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let pg = relay_testkit::Postgres::start();
        let mut locations = vec![Location::Sqlite(dir.path().to_path_buf())];
        locations.extend(pg.iter().map(|pg| Location::Postgres {
            url: pg.url().into(),
            password: Some(Secret::new(relay_testkit::POSTGRES_PASSWORD)),
        }));
        let at = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let recipients = ["a@example.com".to_string()];
        let body = b"Subject: kept\r\n\r\nbody\r\n".to_vec();
        let message = NewMessage {
            envelope: Envelope {
                id: "0000000000000001".to_string(),
                account: "box".to_string(),
                sender: "app@contoso.com".to_string(),
                client: None,
                received_at: at,
                passthrough: false,
            },
            progress: Progress::new(&recipients, at),
            held: false,
            lease: None,
            body: Body::Bytes(body.clone()),
        };
        for location in locations {
            let settings = StoreSettings {
                location,
                relay: "relay-a".to_string(),
                max_connections: 2,
            };
            let (pool, dialect) = connect(&settings).await.expect("connect");
            let migrated = on_pool!(&pool, |p, _begin| schema::migrator(dialect)
                .run_to(1, p)
                .await);
            migrated.expect("version 1");
            // as a relay of version 1 wrote it
            let inserted: Result<(), sqlx::Error> = on_pool!(&pool, |p, _begin| async {
                let mut tx = p.begin().await?;
                sqlx::query(
                    "INSERT INTO messages (id, account, sender, client, received_at, state,
                         attempts, next_attempt, last_error, passthrough, held, size, checksum,
                         lease_relay, lease_expires)
                     VALUES ($1, 'box', 'app@contoso.com', NULL, $2, 'queued', 0, $2, NULL,
                         FALSE, FALSE, $3, $4, NULL, NULL)",
                )
                .bind(&message.envelope.id)
                .bind(ms(at))
                .bind(body.len() as i64)
                .bind(Sha256::digest(&body).to_vec())
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO recipients (message_id, position, address, state)
                     VALUES ($1, 0, 'a@example.com', 'pending')",
                )
                .bind(&message.envelope.id)
                .execute(&mut *tx)
                .await?;
                sqlx::query("INSERT INTO bodies (message_id, body) VALUES ($1, $2)")
                    .bind(&message.envelope.id)
                    .bind(&body)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO pace_events (mailbox, at, recipients) VALUES ('box', $1, 3)",
                )
                .bind(ms(at))
                .execute(&mut *tx)
                .await?;
                tx.commit().await
            }
            .await);
            inserted.expect("insert");
            pool.close().await;

            let store = Store::open(settings).await.expect("migrates");
            let version: i64 = on_pool!(&store.pool, |p, _begin| sqlx::query_scalar(
                "SELECT MAX(version) FROM _sqlx_migrations"
            )
            .fetch_one(p)
            .await
            .expect("version"));
            assert_eq!(version, SCHEMA_VERSION, "{dialect:?}");
            let listed = store.list_after(None, u32::MAX).await.expect("list");
            assert_eq!(listed.len(), 1, "{dialect:?}");
            assert_eq!(listed[0].envelope, message.envelope, "{dialect:?}");
            assert_eq!(listed[0].progress, message.progress, "{dialect:?}");
            assert_eq!(
                store.body("0000000000000001").await.expect("body"),
                Some(body.clone()),
                "{dialect:?}"
            );
            // the send counted before the upgrade still counts
            let limits = PaceLimits {
                messages_per_minute: None,
                recipients_per_day: Some(4),
            };
            let later = at + Duration::from_secs(1);
            assert_eq!(
                store.pace("box", later, limits, 2).await.expect("pace"),
                Pace::WaitUntil(at + pace::DAY),
                "{dialect:?}"
            );
            store
                .pause_mailbox("box", at)
                .await
                .expect("the new table is there");
            if let Pool::Postgres(p) = &store.pool {
                let storage: String = sqlx::query_scalar(
                    "SELECT attstorage::text FROM pg_attribute
                     WHERE attrelid = 'bodies'::regclass AND attname = 'body'",
                )
                .fetch_one(p)
                .await
                .expect("storage");
                assert_eq!(storage, "e", "bodies are stored uncompressed");
            }
        }
        Ok(())
    }
}

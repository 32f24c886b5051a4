//! The store: what it is, how it opens, and the connections both engines
//! run every operation on, in SQL that both read unchanged (parameters are
//! `$N`, which SQLite reads too). The operations are in the modules below:
//! [`commit`] (group commit: inserts, leases, removals), [`messages`] (the
//! rest of a message's life: renewals, outcomes, admin actions, reads),
//! [`mailbox`] (what relays on one database share per mailbox), with
//! [`connect`](mod@connect) and [`rows`] beneath them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::PgPool;
use tokio::sync::{mpsc, Semaphore};

use crate::lanes::Lanes;
use crate::schema::{self, Dialect, SCHEMA_VERSION};
use crate::{DatabaseUrl, Secret, StoreError};

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

/// The columns of `messages` that [`rows::message_of`] reads, for `SELECT` and
/// `RETURNING`.
macro_rules! message_columns {
    () => {
        "id, account, sender, client, received_at, state, attempts, next_attempt, last_error,
         passthrough, held, size, lease_relay, lease_expires"
    };
}

// After the macros above, which the modules use.
mod commit;
pub(crate) mod connect;
mod mailbox;
mod messages;
mod rows;

pub use mailbox::{Redeem, SharedToken, SlotId};

use commit::{commit_task, Write, MAX_BATCH, POSTGRES_COMMITTERS};
use connect::{connect, opening_lock};

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

/// Creates a directory (and its parents) with mode 0700.
fn create_private_dir(path: &Path) -> Result<(), StoreError> {
    relay_config::create_private_dir(path).map_err(|source| StoreError::BodyFile {
        action: "create",
        path: path.to_path_buf(),
        source,
    })
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
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};
    use sqlx::Connection as _;

    use super::*;
    use crate::pace::{self, Pace, PaceLimits};
    use crate::types::{Envelope, NewMessage, Progress};
    use crate::Body;

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
            let listed = store.list_after(None, None, u32::MAX).await.expect("list");
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

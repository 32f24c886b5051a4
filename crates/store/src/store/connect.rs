//! Opening the store's database: the embedded file's open lock, the
//! connections, a PostgreSQL server's version and session settings.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::Connection as _;
use sqlx::PgConnection;

use super::{
    ms, Location, Pool, Store, StoreSettings, ACQUIRE_TIMEOUT, SQLITE_BUSY, SQLITE_FILE,
    SQLITE_OPEN_LOCK,
};
use crate::lanes::Lanes;
use crate::schema::Dialect;
use crate::{DatabaseUrl, Secret, StoreError};

/// Takes the embedded store's open lock in `dir`, waiting for it as long
/// as SQLite waits for its own ([`SQLITE_BUSY`]); released when the file
/// is dropped. SQLite has no lock for migrations (PostgreSQL's advisory
/// lock serves there), and making a new database WAL needs the file to
/// itself: processes opening one store at once (a relay and an admin verb
/// beside it) take turns, and the later ones find it made and migrated.
pub(super) async fn opening_lock(dir: &Path) -> Result<std::fs::File, StoreError> {
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

/// Connects to the store's database, as it is (no migration).
pub(super) async fn connect(settings: &StoreSettings) -> Result<(Pool, Dialect), StoreError> {
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

impl Store {
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
}

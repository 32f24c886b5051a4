//! The versioned schema. Migrations are applied at open by sqlx's migrator
//! (which records each in `_sqlx_migrations` with a checksum, and takes an
//! advisory lock on PostgreSQL so two relays starting together do not race).
//! A migration, once released, is never edited: a change is a new version.

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AssertSqlSafe, SqlSafeStr};

/// The two engines' dialects differ only in the name of the byte type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

/// Version 1. Times are milliseconds since the Unix epoch (UTC).
const V1: &str = "
CREATE TABLE messages (
    id            TEXT PRIMARY KEY,
    account       TEXT NOT NULL,
    sender        TEXT NOT NULL,
    client        TEXT,
    received_at   BIGINT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('queued', 'deferred', 'failed')),
    attempts      BIGINT NOT NULL,
    next_attempt  BIGINT,
    last_error    TEXT,
    passthrough   BOOLEAN NOT NULL,
    held          BOOLEAN NOT NULL,
    size          BIGINT NOT NULL,
    checksum      BYTES NOT NULL,
    lease_relay   TEXT,
    lease_expires BIGINT,
    CHECK (state = 'failed' OR next_attempt IS NOT NULL)
);
CREATE INDEX messages_due ON messages (account, next_attempt);
CREATE TABLE recipients (
    message_id     TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    position       BIGINT NOT NULL,
    address        TEXT NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'deferred', 'failed')),
    reply_code     BIGINT,
    reply_enhanced TEXT,
    reply_text     TEXT,
    reason         TEXT,
    PRIMARY KEY (message_id, position)
);
CREATE TABLE bodies (
    message_id TEXT PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
    body       BYTES NOT NULL
);
CREATE TABLE locks (
    name TEXT PRIMARY KEY,
    n    BIGINT NOT NULL
);
CREATE TABLE pace_events (
    mailbox    TEXT NOT NULL,
    at         BIGINT NOT NULL,
    recipients BIGINT NOT NULL
);
CREATE INDEX pace_events_by_mailbox ON pace_events (mailbox, at);
CREATE TABLE slots (
    holder  TEXT PRIMARY KEY,
    mailbox TEXT NOT NULL,
    expires BIGINT NOT NULL
);
CREATE INDEX slots_by_mailbox ON slots (mailbox);
CREATE TABLE refresh_tokens (
    account        TEXT PRIMARY KEY,
    token          TEXT,
    version        BIGINT NOT NULL,
    redeemer       TEXT,
    redeem_expires BIGINT,
    updated_at     BIGINT NOT NULL
);
";

/// Version 2: what throttling by Microsoft leaves on a mailbox, for every
/// relay ([`crate::holds::Holds`]).
const V2: &str = "
CREATE TABLE mailbox_holds (
    mailbox      TEXT PRIMARY KEY,
    paused_until BIGINT,
    fewer        BIGINT NOT NULL DEFAULT 0,
    fewer_until  BIGINT
);
";

/// Version 3: on the embedded store a large body is kept as a file beside
/// the database (written once, as received) rather than in `bodies`.
const V3: &str = "
ALTER TABLE messages ADD COLUMN body_file BOOLEAN NOT NULL DEFAULT FALSE;
";

/// Version 4: the pace's sends counted per second, so that the pace reads
/// at most a minute's worth of rows for the minute's count (and one row a
/// second for the day's recipients) however many messages a second go out.
const V4: &str = "
CREATE TABLE pace_counts (
    mailbox    TEXT NOT NULL,
    second     BIGINT NOT NULL,
    messages   BIGINT NOT NULL,
    recipients BIGINT NOT NULL,
    PRIMARY KEY (mailbox, second)
);
INSERT INTO pace_counts (mailbox, second, messages, recipients)
    SELECT mailbox, at / 1000, COUNT(*), SUM(recipients) FROM pace_events
    GROUP BY mailbox, at / 1000;
";

/// Version 5: the due index in the order leases take messages (due time,
/// then id), so that a lease reads the first free due message and stops,
/// instead of sorting a group of them by id.
const V5: &str = "
CREATE INDEX messages_due_order ON messages (account, next_attempt, id);
DROP INDEX messages_due;
";

/// Version 6, PostgreSQL only: a body is stored as it is, inline up to
/// about a page and out of line beyond, never compressed. TOAST compressed
/// every body over 2 KB (pglz, on the server's CPU under each commit),
/// though mail is mostly base64 or already compressed. SQLite never
/// compresses.
const V6: &str = "
ALTER TABLE bodies ALTER COLUMN body SET STORAGE EXTERNAL;
ALTER TABLE bodies SET (toast_tuple_target = 8160);
";

/// Which engines a migration changes.
enum Engines {
    Both,
    /// The embedded store records the version and changes nothing, so
    /// both count the same versions.
    Postgres,
}

/// Every migration, oldest first.
const MIGRATIONS: &[(i64, &str, Engines, &str)] = &[
    (1, "queue, pacing, slots, tokens", Engines::Both, V1),
    (2, "mailbox holds", Engines::Both, V2),
    (3, "bodies kept as files", Engines::Both, V3),
    (4, "pace counts per second", Engines::Both, V4),
    (5, "due index in lease order", Engines::Both, V5),
    (6, "bodies stored uncompressed", Engines::Postgres, V6),
];

/// The tables the migrations create, and sqlx's record of them: a relay's
/// role needs to read and write every one.
pub(crate) const TABLES: &[&str] = &[
    "_sqlx_migrations",
    "bodies",
    "locks",
    "mailbox_holds",
    "messages",
    "pace_counts",
    "pace_events",
    "recipients",
    "refresh_tokens",
    "slots",
];

/// The newest schema version this build knows.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

pub(crate) fn migrator(dialect: Dialect) -> Migrator {
    let bytes = match dialect {
        Dialect::Sqlite => "BLOB",
        Dialect::Postgres => "BYTEA",
    };
    Migrator::with_migrations(
        MIGRATIONS
            .iter()
            .map(|(version, description, engines, sql)| {
                let sql = match (engines, dialect) {
                    (Engines::Postgres, Dialect::Sqlite) => "SELECT 1;",
                    _ => sql,
                };
                Migration::new(
                    *version,
                    (*description).into(),
                    MigrationType::Simple,
                    AssertSqlSafe(sql.replace("BYTES", bytes)).into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection as _;

    #[tokio::test]
    async fn tables_names_every_table_the_migrations_create() {
        let mut conn = sqlx::SqliteConnection::connect("sqlite::memory:")
            .await
            .expect("in-memory SQLite");
        migrator(Dialect::Sqlite)
            .run(&mut conn)
            .await
            .expect("migrate");
        let created: Vec<String> =
            sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
                .fetch_all(&mut conn)
                .await
                .expect("tables");
        assert_eq!(created, TABLES);
    }
}

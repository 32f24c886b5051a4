//! The store's errors.

use std::sync::Arc;

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or opened.
    #[error("cannot open the database: {0}")]
    Connect(#[source] sqlx::Error),
    /// The database was migrated by a newer relay; this one would misread it.
    #[error(
        "the database schema is at version {found}, newer than this relay knows (up to {known}); \
         upgrade the relay or point it at another database"
    )]
    SchemaTooNew {
        /// The newest version recorded in the database.
        found: i64,
        /// The newest version this build knows.
        known: i64,
    },
    /// The PostgreSQL server is older than the relay supports.
    #[error("the PostgreSQL server is version {version}; the relay needs PostgreSQL 13 or newer")]
    ServerTooOld {
        /// The server's version as it names it.
        version: String,
    },
    /// Applying the schema migrations failed.
    #[error("cannot migrate the database schema: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// No connection came free in time for an operation: the server does
    /// not answer (hung, or its host unreachable without a reset), or every
    /// connection is busy.
    #[error("no connection to the database came free in time: the server does not answer, or every connection is busy")]
    NoConnection,
    /// A query failed.
    #[error("database: {0}")]
    Database(#[source] sqlx::Error),
    /// The shared commit of a batch of writes failed (every write of the
    /// batch gets the same error).
    #[error("{0}")]
    Batch(#[source] Arc<StoreError>),
    /// The embedded store's open lock could not be taken.
    #[error("cannot take {path}, which processes opening the store take in turn: {source}")]
    OpenLock {
        /// The lock file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A body file could not be written, read or removed.
    #[error("cannot {action} {path}: {source}")]
    BodyFile {
        /// What could not be done, e.g. "keep the body as".
        action: &'static str,
        /// The file or directory.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A stored body no longer matches the checksum taken at insert.
    #[error("message {id}: the stored body does not match its checksum")]
    Checksum {
        /// The message.
        id: String,
    },
    /// A stored value is not one this build writes.
    #[error("message {id}: stored {column} {value:?} is not valid")]
    Invalid {
        /// The message.
        id: String,
        /// The column.
        column: &'static str,
        /// What it held.
        value: String,
    },
    /// The store's commit task has stopped (the runtime is shutting down).
    #[error("the store is closed")]
    Closed,
}

impl StoreError {
    /// Whether the database could not be reached, or was lost on the way
    /// (refused, no answer, the connection broken, the server starting up
    /// or shutting down, or full of connections), rather than answering
    /// with a refusal: the same request may succeed later without a change
    /// of configuration. A login refused, a missing database, a TLS
    /// failure or a schema too new are not.
    pub fn is_unreachable(&self) -> bool {
        match self {
            StoreError::NoConnection => true,
            StoreError::Connect(e) | StoreError::Database(e) => unreachable(e),
            StoreError::Migrate(
                sqlx::migrate::MigrateError::Execute(e)
                | sqlx::migrate::MigrateError::ExecuteMigration(e, _),
            ) => unreachable(e),
            StoreError::Batch(e) => e.is_unreachable(),
            _ => false,
        }
    }
}

fn unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        // SQLSTATE classes 08 (connection exception) and 57P (the server
        // shutting down, crashed, or not yet accepting), and 53300 (too
        // many connections).
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || code.starts_with("57P") || code == "53300"
        }),
        _ => false,
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut => StoreError::NoConnection,
            e => StoreError::Database(e),
        }
    }
}

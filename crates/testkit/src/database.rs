//! The databases relays share limits, tokens and queues through, for tests
//! that open several relays' handles on one: an SQLite file in a temporary
//! directory, and a throwaway PostgreSQL server when it is installed.

use crate::{Postgres, POSTGRES_PASSWORD};
use relay_store::{Location, Secret, Store, StoreSettings};

/// One database; any number of relays open handles on it.
pub enum SharedDatabase {
    /// An SQLite file in this directory.
    Sqlite(tempfile::TempDir),
    /// A PostgreSQL server the test started.
    Postgres(Postgres),
}

impl SharedDatabase {
    /// SQLite, and PostgreSQL when installed (see [`Postgres::start`]).
    pub fn all() -> Vec<SharedDatabase> {
        let mut all = vec![SharedDatabase::Sqlite(
            tempfile::tempdir().expect("temporary directory"),
        )];
        all.extend(Postgres::start().map(SharedDatabase::Postgres));
        all
    }

    /// `sqlite` or `postgres`, for assertion messages.
    pub fn name(&self) -> &'static str {
        match self {
            SharedDatabase::Sqlite(_) => "sqlite",
            SharedDatabase::Postgres(_) => "postgres",
        }
    }

    /// A handle on the database for the relay with id `relay`.
    pub async fn relay(&self, relay: &str) -> Store {
        let location = match self {
            SharedDatabase::Sqlite(dir) => Location::Sqlite(dir.path().to_path_buf()),
            SharedDatabase::Postgres(pg) => Location::Postgres {
                url: pg.url().into(),
                password: Some(Secret::new(POSTGRES_PASSWORD)),
            },
        };
        Store::open(StoreSettings {
            location,
            relay: relay.to_owned(),
            max_connections: 4,
        })
        .await
        .expect("open the store")
    }
}

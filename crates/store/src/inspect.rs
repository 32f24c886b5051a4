//! A look at a shared database without changing it, for `doctor`: whether
//! it can be reached with the relay's settings, the server's version, the
//! schema version the relays left there and whether this role could
//! migrate it. Nothing is created or migrated (that is [`crate::Store::open`]'s).

use sqlx::{Connection as _, PgConnection};

use crate::schema::TABLES;
use crate::store::connect::{connect_postgres, no_answer, postgres_options};
use crate::store::ACQUIRE_TIMEOUT;
use crate::{DatabaseUrl, Secret, StoreError};

/// sqlx's record of the migrations applied.
const MIGRATIONS_TABLE: &str = "_sqlx_migrations";

/// What [`inspect`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inspection {
    /// The server's version as it names it, e.g. `15.8 (Debian 15.8-0+deb12u1)`.
    pub server_version: String,
    /// The newest schema version applied: 0 before any relay started on
    /// it (or when its record is out of reach).
    pub schema_version: i64,
    /// The role the relay connects as.
    pub role: String,
    /// The schema its tables go in (the first of `search_path` that
    /// exists), if any.
    pub schema: Option<String>,
    /// Whether the role may create tables there, which a relay needs
    /// while a migration is pending.
    pub may_create: bool,
    /// The relay's tables there that the role may not read and write
    /// (select, insert, update and delete), by name.
    pub out_of_reach: Vec<String>,
}

/// Connects to the PostgreSQL database at `url` as a relay named `relay`
/// would, and reads what [`Inspection`] holds, each within the time a relay
/// waits for a connection. Fails as opening the store would:
/// [`StoreError::Connect`] when it cannot be reached or refuses the login,
/// [`StoreError::ServerTooOld`].
pub async fn inspect(
    url: &DatabaseUrl,
    password: Option<&Secret>,
    relay: &str,
) -> Result<Inspection, StoreError> {
    let options = postgres_options(url, password, relay)?;
    let (mut conn, server_version) = connect_postgres(&options).await?;
    let looked = tokio::time::timeout(ACQUIRE_TIMEOUT, look(&mut conn, server_version))
        .await
        .map_err(|_| no_answer())?;
    // The session only read: nothing to keep, whatever closing says.
    let _ = conn.close().await;
    looked
}

/// What [`inspect`] reads on its connection to a server of
/// `server_version`.
async fn look(conn: &mut PgConnection, server_version: String) -> Result<Inspection, StoreError> {
    let (role, schema, may_create): (String, Option<String>, bool) = sqlx::query_as(
        "SELECT current_user::text, current_schema()::text,
             COALESCE(has_schema_privilege(current_schema(), 'CREATE'), false)",
    )
    .fetch_one(&mut *conn)
    .await?;
    // Each right asked on its own: with several, `has_table_privilege`
    // is true when any one is held.
    let tables: Vec<(String, bool)> = sqlx::query_as(
        "SELECT c.relname::text,
             has_table_privilege(c.oid, 'SELECT') AND has_table_privilege(c.oid, 'INSERT')
             AND has_table_privilege(c.oid, 'UPDATE') AND has_table_privilege(c.oid, 'DELETE')
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')
           AND c.relname = ANY($1)
         ORDER BY c.relname",
    )
    .bind(TABLES)
    .fetch_all(&mut *conn)
    .await?;
    let schema_version = if tables.contains(&(MIGRATIONS_TABLE.to_owned(), true)) {
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations WHERE success")
            .fetch_one(&mut *conn)
            .await?
    } else {
        0
    };
    let out_of_reach = tables
        .into_iter()
        .filter_map(|(table, usable)| (!usable).then_some(table))
        .collect();
    Ok(Inspection {
        server_version,
        schema_version,
        role,
        schema,
        may_create,
        out_of_reach,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::SCHEMA_VERSION;
    use crate::store::connect::supported;
    use crate::{Location, Store, StoreSettings};
    use relay_testkit::{LocalhostCertificate, Postgres, POSTGRES_PASSWORD};

    #[test]
    fn servers_before_13_are_refused_by_name() {
        assert!(!supported(120_022), "12 is too old");
        let refused = StoreError::ServerTooOld {
            version: "12.22".into(),
        };
        assert_eq!(
            refused.to_string(),
            "the PostgreSQL server is version 12.22; the relay needs PostgreSQL 13 or newer"
        );
        assert!(supported(130_000), "13 is supported");
        assert!(supported(170_002), "17 is supported");
    }

    /// A relay's store on the database at `url`, migrated.
    async fn open(url: &DatabaseUrl, password: Option<&Secret>) -> Store {
        Store::open(StoreSettings {
            location: Location::Postgres {
                url: url.clone(),
                password: password.cloned(),
            },
            relay: "relay-1".into(),
            max_connections: 2,
        })
        .await
        .expect("open")
    }

    // An empty database, the same after a relay migrated it, and a role
    // that may log in but not create tables (PostgreSQL 15 no longer lets
    // every role create in `public`), all as they are: nothing changed.
    #[tokio::test]
    async fn inspect_reads_the_version_and_the_role_rights_and_changes_nothing() {
        let Some(pg) = Postgres::start() else {
            return;
        };
        let password = Secret::new(POSTGRES_PASSWORD);
        let empty = inspect(&pg.url().into(), Some(&password), "doctor")
            .await
            .expect("inspect");
        assert_eq!(empty.schema_version, 0);
        assert_eq!(empty.role, "relay");
        assert_eq!(empty.schema.as_deref(), Some("public"));
        assert!(empty.may_create, "the superuser may create");
        assert!(empty.out_of_reach.is_empty());
        assert_eq!(
            inspect(&pg.url().into(), Some(&password), "doctor")
                .await
                .expect("inspect again")
                .schema_version,
            0,
            "inspecting created nothing"
        );

        let store = open(&pg.url().into(), Some(&password)).await;
        let migrated = inspect(&pg.url().into(), Some(&password), "doctor")
            .await
            .expect("inspect");
        assert_eq!(migrated.schema_version, SCHEMA_VERSION);
        assert!(migrated.out_of_reach.is_empty(), "{migrated:?}");
        drop(store);

        pg.sql("CREATE ROLE sender LOGIN PASSWORD 'sender-password'");
        let url = DatabaseUrl::from(pg.url().replace("relay@", "sender@"));
        let sender = inspect(&url, Some(&Secret::new("sender-password")), "doctor")
            .await
            .expect("inspect as sender");
        assert_eq!(sender.role, "sender");
        assert!(!sender.may_create, "{sender:?}");
        assert_eq!(sender.out_of_reach.len(), TABLES.len(), "{sender:?}");
        assert_eq!(sender.schema_version, 0, "its record is out of reach");

        let refused = inspect(&url, Some(&Secret::new("wrong")), "doctor")
            .await
            .expect_err("a wrong password");
        assert!(
            matches!(refused, StoreError::Connect(_)) && refused.to_string().contains("password"),
            "{refused}"
        );
    }

    // `sslmode=verify-full`, as the README's example: with the CA that
    // signed the server's certificate the session is encrypted and the
    // store opens; with only the system's roots the certificate is refused,
    // and the error says so.
    #[tokio::test]
    async fn verify_full_checks_the_servers_certificate() {
        let certificate = LocalhostCertificate::generate().expect("certificate");
        let Some(pg) = Postgres::start_with_tls(&certificate) else {
            return;
        };
        let password = Secret::new(POSTGRES_PASSWORD);
        let url = DatabaseUrl::from(format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            pg.url(),
            pg.ca_file().display()
        ));
        let options = postgres_options(&url, Some(&password), "test").expect("options");
        let mut conn = PgConnection::connect_with(&options)
            .await
            .expect("connect over TLS");
        let encrypted: bool =
            sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(&mut conn)
                .await
                .expect("pg_stat_ssl");
        assert!(encrypted);
        open(&url, Some(&password)).await;
        assert_eq!(
            inspect(&url, Some(&password), "doctor")
                .await
                .expect("inspect over TLS")
                .schema_version,
            SCHEMA_VERSION
        );

        let unknown_ca = DatabaseUrl::from(format!("{}?sslmode=verify-full", pg.url()));
        let refused = inspect(&unknown_ca, Some(&password), "doctor")
            .await
            .expect_err("a CA the system does not trust");
        assert!(
            matches!(refused, StoreError::Connect(_))
                && refused.to_string().contains("certificate"),
            "{refused}"
        );
    }

    // A server on the same host through its Unix socket, with no
    // password (`host=` a directory, as libpq takes it).
    #[tokio::test]
    async fn a_local_socket_needs_no_password() {
        let Some(pg) = Postgres::start() else {
            return;
        };
        let url = DatabaseUrl::from(format!(
            "postgres:///postgres?user=relay&host={}&port={}",
            pg.socket_dir().display(),
            pg.port()
        ));
        let store = open(&url, None).await;
        assert_eq!(store.relay(), "relay-1");
        let found = inspect(&url, None, "doctor").await.expect("inspect");
        assert_eq!(found.schema_version, SCHEMA_VERSION);
    }
}

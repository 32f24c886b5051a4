//! Two relays sharing a delegated account's rotating refresh token through
//! one database (PostgreSQL when installed, and an SQLite file), against
//! the stand-in identity platform, whose refresh tokens are single-use: a
//! token presented twice would be refused.

mod common;

use common::{bounded, init};
use relay_config::AccountConfig;
use relay_store::{Location, Secret, Store, StoreSettings};
use relay_testkit::{IdentityPlatform, Postgres};
use relay_tokens::{CacheEntry, TokenManager, TokenSource};
use std::{path::Path, time::Duration};

/// One database, and how to open a relay's handle on it.
struct Database {
    location: Location,
    _server: Option<Postgres>,
    _dir: tempfile::TempDir,
}

impl Database {
    fn all() -> Vec<Database> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut all = vec![Database {
            location: Location::Sqlite(dir.path().join("queue.sqlite")),
            _server: None,
            _dir: dir,
        }];
        if let Some(pg) = Postgres::start() {
            let password = std::fs::read_to_string(pg.password_file()).expect("password");
            all.push(Database {
                location: Location::Postgres {
                    url: pg.url(),
                    password: Some(Secret::new(password)),
                },
                _server: Some(pg),
                _dir: tempfile::tempdir().expect("tempdir"),
            });
        }
        all
    }

    async fn relay(&self, id: &str) -> Store {
        Store::open(StoreSettings {
            location: self.location.clone(),
            relay: id.to_owned(),
            max_connections: 4,
        })
        .await
        .expect("open the store")
    }
}

fn delegated(idp: &IdentityPlatform) -> AccountConfig {
    let toml = format!(
        "[[accounts]]\nname = \"main\"\nmailbox = \"relay@contoso.com\"\n\n\
         [accounts.oauth]\nflow = \"refresh_token\"\nauthority = \"{}\"\n\
         tenant_id = \"{}\"\nclient_id = \"{}\"\n",
        idp.authority(),
        idp.tenant(),
        idp.client_id()
    );
    let mut config = relay_config::load_str(&toml).expect("valid configuration");
    config.accounts.remove(0)
}

/// A relay's token manager: its own queue directory (and token cache
/// file) under `dir`, the shared refresh token in `store`.
fn relay(idp: &IdentityPlatform, dir: &Path, store: Store) -> (TokenManager, TokenSource) {
    let source = TokenSource::for_account(&delegated(idp), &dir.join("queue")).expect("source");
    let manager = TokenManager::shared("main", source.clone(), Some(store)).expect("manager");
    (manager, source)
}

/// A sign-in on relay `source`'s host, as `authorize` writes it.
fn sign_in(source: &TokenSource, idp: &IdentityPlatform) {
    let entry = CacheEntry {
        version: 1,
        account: "main".into(),
        provider: "microsoft".into(),
        client_id: idp.client_id().into(),
        scope: source.scope().into(),
        refresh_token: idp.mint_refresh_token(),
        access_token: None,
        access_token_expires_at: None,
        updated_at: 0,
    };
    source
        .cache()
        .expect("a cache")
        .save(&entry)
        .expect("sign in");
}

/// Every refresh grant so far succeeded (a token presented twice would have
/// been refused), and the store holds the newest rotation.
async fn each_token_redeemed_once(idp: &IdentityPlatform, store: &Store, grants: usize) {
    assert_eq!(idp.grants("refresh_token"), grants);
    let issued = idp.issued_refresh_tokens();
    assert_eq!(
        issued.len(),
        grants + 1,
        "one sign-in, one rotation a grant"
    );
    let shared = store.token("main").await.expect("store").expect("a token");
    let newest = issued.last().expect("issued");
    assert_eq!(
        shared.token.as_ref().map(Secret::expose),
        Some(newest.as_str())
    );
    assert!(idp.refresh_token_is_live(newest));
}

// One sign-in on relay a's host serves both relays: each redemption rotates
// the token and the next relay redeems the rotated one, never a spent one.
#[tokio::test]
async fn relays_take_turns_with_one_rotating_refresh_token() {
    init();
    for database in Database::all() {
        let idp = IdentityPlatform::start().await.expect("identity platform");
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let store = database.relay("a").await;
        let (a, source_a) = relay(&idp, dirs[0].path(), store.clone());
        let (b, _) = relay(&idp, dirs[1].path(), database.relay("b").await);
        sign_in(&source_a, &idp);

        let token_a = bounded(a.token()).await.expect("relay a's token");
        let token_b = bounded(b.token())
            .await
            .expect("relay b's token (no sign-in there)");
        for token in [&token_a, &token_b] {
            idp.check_access_token(token.secret().expose())
                .expect("a working access token");
        }
        each_token_redeemed_once(&idp, &store, 2).await;
        // relay a's file holds a rotation b has redeemed since: it takes the shared one
        let renewed = bounded(a.refresh_rejected(&token_a))
            .await
            .expect("renewed");
        idp.check_access_token(renewed.secret().expose())
            .expect("a working access token");
        each_token_redeemed_once(&idp, &store, 3).await;
        let debug = format!("{renewed:?} {source_a:?}");
        assert!(
            idp.issued_refresh_tokens()
                .iter()
                .all(|t| !debug.contains(t.as_str())),
            "a refresh token in Debug output"
        );
    }
}

// Both relays need a token at once while the platform is slow: one redeems,
// the other waits for the rotated token and redeems that.
#[tokio::test]
async fn concurrent_relays_redeem_one_at_a_time() {
    init();
    for database in Database::all() {
        let idp = IdentityPlatform::start().await.expect("identity platform");
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let store = database.relay("a").await;
        let (a, source_a) = relay(&idp, dirs[0].path(), store.clone());
        let (b, source_b) = relay(&idp, dirs[1].path(), database.relay("b").await);
        sign_in(&source_a, &idp);
        // seed the store, then let both relays' tokens be due together
        let token_a = bounded(a.token()).await.expect("a");
        let token_b = bounded(b.token()).await.expect("b");
        idp.set_reply_delay(Some(Duration::from_millis(300)));
        let (renewed_a, renewed_b) = bounded(async {
            tokio::join!(a.refresh_rejected(&token_a), b.refresh_rejected(&token_b))
        })
        .await;
        for token in [renewed_a.expect("a"), renewed_b.expect("b")] {
            idp.check_access_token(token.secret().expose())
                .expect("a working access token");
        }
        each_token_redeemed_once(&idp, &store, 4).await;
        // both files end with a token the platform issued
        for source in [&source_a, &source_b] {
            let entry = source.cache().unwrap().load().unwrap().unwrap();
            assert!(idp.issued_refresh_tokens().contains(&entry.refresh_token));
        }
    }
}

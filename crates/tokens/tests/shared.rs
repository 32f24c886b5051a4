//! Two relays sharing a delegated account's rotating refresh token through
//! one database (PostgreSQL when installed, and an SQLite file), against
//! the stand-in identity platform, whose refresh tokens are single-use: a
//! token presented twice would be refused.

mod common;

use common::{bounded, init, seed_cache};
use relay_config::AccountConfig;
use relay_store::{Secret, Store};
use relay_testkit::{IdentityPlatform, SharedDatabase};
use relay_tokens::{TokenManager, TokenSource};
use std::path::Path;
use std::time::Duration;

fn delegated(idp: &IdentityPlatform, key_file: Option<&Path>) -> AccountConfig {
    let mut toml = format!(
        "[[accounts]]\nname = \"main\"\nmailbox = \"relay@contoso.com\"\n\n\
         [accounts.oauth]\nflow = \"refresh_token\"\nauthority = \"{}\"\n\
         tenant_id = \"{}\"\nclient_id = \"{}\"\n",
        idp.authority(),
        idp.tenant(),
        idp.client_id()
    );
    if let Some(key_file) = key_file {
        toml.push_str(&format!(
            "token_cache_key_file = {:?}\n",
            key_file.display().to_string()
        ));
    }
    let mut config = relay_config::load_str(&toml).expect("valid configuration");
    config.accounts.remove(0)
}

/// A relay: its token manager, and the source whose token cache file
/// sits in the relay's own queue directory.
struct Relay {
    tokens: TokenManager,
    source: TokenSource,
    _dir: tempfile::TempDir,
}

/// Relays `a` and `b` sharing the refresh token of one sign-in on a's host,
/// and a's handle on the store; both with the token cache key in `key_file`
/// if given.
async fn two_relays(
    idp: &IdentityPlatform,
    database: &SharedDatabase,
    key_file: Option<&Path>,
) -> (Relay, Relay, Store) {
    let store = database.relay("a").await;
    let relay = |store: Store| {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = TokenSource::for_account(&delegated(idp, key_file), &dir.path().join("queue"))
            .expect("source");
        let tokens = TokenManager::shared("main", source.clone(), Some(store)).expect("manager");
        Relay {
            tokens,
            source,
            _dir: dir,
        }
    };
    let a = relay(store.clone());
    let b = relay(database.relay("b").await);
    seed_cache(&a.source, idp);
    (a, b, store)
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
    for database in SharedDatabase::all() {
        let idp = IdentityPlatform::start().await.expect("identity platform");
        let (a, b, store) = two_relays(&idp, &database, None).await;

        let token_a = bounded(a.tokens.token()).await.expect("relay a's token");
        let token_b = bounded(b.tokens.token())
            .await
            .expect("relay b's token (no sign-in there)");
        for token in [&token_a, &token_b] {
            idp.check_access_token(token.secret().expose())
                .unwrap_or_else(|e| {
                    panic!("not a working access token on {}: {e:?}", database.name())
                });
        }
        each_token_redeemed_once(&idp, &store, 2).await;
        // relay a's file holds a rotation b has redeemed since: it takes the shared one
        let renewed = bounded(a.tokens.refresh_rejected(&token_a))
            .await
            .expect("renewed");
        idp.check_access_token(renewed.secret().expose())
            .expect("a working access token");
        each_token_redeemed_once(&idp, &store, 3).await;
        let debug = format!("{renewed:?} {:?}", a.source);
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
    for database in SharedDatabase::all() {
        let idp = IdentityPlatform::start().await.expect("identity platform");
        let (a, b, store) = two_relays(&idp, &database, None).await;
        // seed the store, then let both relays' tokens be due together
        let token_a = bounded(a.tokens.token()).await.expect("a");
        let token_b = bounded(b.tokens.token()).await.expect("b");
        idp.set_reply_delay(Some(Duration::from_millis(300)));
        let (renewed_a, renewed_b) = bounded(async {
            tokio::join!(
                a.tokens.refresh_rejected(&token_a),
                b.tokens.refresh_rejected(&token_b)
            )
        })
        .await;
        for token in [renewed_a.expect("a"), renewed_b.expect("b")] {
            idp.check_access_token(token.secret().expose())
                .unwrap_or_else(|e| {
                    panic!("not a working access token on {}: {e:?}", database.name())
                });
        }
        each_token_redeemed_once(&idp, &store, 4).await;
        // both files end with a token the platform issued
        for source in [&a.source, &b.source] {
            let entry = source.cache().unwrap().load().unwrap().unwrap();
            assert!(idp.issued_refresh_tokens().contains(&entry.refresh_token));
        }
    }
}

// With a token cache key, the database holds the shared token sealed under
// it (the database alone does not give it away), and both relays use it.
#[tokio::test]
async fn with_a_cache_key_the_shared_token_is_stored_sealed() {
    init();
    let keys = tempfile::tempdir().expect("tempdir");
    let key_file = keys.path().join("cache-key");
    std::fs::write(&key_file, "07".repeat(32)).expect("key");
    for database in SharedDatabase::all() {
        let idp = IdentityPlatform::start().await.expect("identity platform");
        let (a, b, store) = two_relays(&idp, &database, Some(&key_file)).await;
        for relay in [&a, &b] {
            let token = bounded(relay.tokens.token()).await.expect("a token");
            idp.check_access_token(token.secret().expose())
                .expect("a working access token");
        }
        assert_eq!(idp.grants("refresh_token"), 2, "{}", database.name());
        let stored = store.token("main").await.expect("store").expect("a token");
        let stored = stored.token.expect("a token");
        assert!(
            stored.expose().starts_with("sealed:chacha20-poly1305:"),
            "{}",
            database.name()
        );
        assert!(
            idp.issued_refresh_tokens()
                .iter()
                .all(|t| !stored.expose().contains(t.as_str())),
            "a refresh token in the clear in the database"
        );
    }
}

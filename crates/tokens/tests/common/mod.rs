//! Shared setup for the token manager's tests: the crypto provider, account
//! configurations pointing at the test kit's identity platform, and bounded
//! waiting.

#![allow(dead_code)] // each test binary uses a different subset

use relay_config::OAuthConfig;
use relay_testkit::IdentityPlatform;
use relay_tokens::{CacheEntry, TokenManager, TokenSource};
use std::{path::Path, time::Duration};

/// Upper bound for anything a test waits for.
pub const LIMIT: Duration = Duration::from_secs(10);

/// Must run first in every test: reqwest's rustls needs a process-wide provider.
pub fn init() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// How the account authenticates to the identity platform.
pub enum Credential<'a> {
    /// `client_secret = "…"` inline.
    Inline(&'a str),
    /// `client_secret_file = '…'`.
    File(&'a Path),
}

/// `[accounts.oauth]` of a one-account configuration, parsed and validated
/// by `relay_config::load_str` like a real configuration file.
pub fn oauth_config(
    authority: &str,
    tenant: &str,
    client_id: &str,
    credential: Credential,
) -> OAuthConfig {
    let credential = match credential {
        Credential::Inline(secret) => format!("client_secret = \"{secret}\""),
        Credential::File(path) => format!("client_secret_file = '{}'", path.display()),
    };
    let toml = format!(
        r#"
[[accounts]]
name = "main"
mailbox = "relay@contoso.com"

[accounts.oauth]
flow = "client_credentials"
authority = "{authority}"
tenant_id = "{tenant}"
client_id = "{client_id}"
{credential}
"#
    );
    let mut config = relay_config::load_str(&toml).expect("valid configuration");
    config.accounts.remove(0).oauth
}

/// The kit's own tenant, client id and secret.
pub fn kit_config(idp: &IdentityPlatform) -> OAuthConfig {
    oauth_config(
        &idp.authority(),
        idp.tenant(),
        idp.client_id(),
        Credential::Inline(idp.client_secret()),
    )
}

/// A manager for `oauth`.
pub fn manager(oauth: &OAuthConfig) -> TokenManager {
    let source = TokenSource::from_config(oauth).expect("token source");
    TokenManager::new("main", source).expect("token manager")
}

/// Seeds `source`'s token cache as if someone had signed in (as
/// `authorize` writes it); returns the refresh token.
pub fn seed_cache(source: &TokenSource, idp: &IdentityPlatform) -> String {
    let refresh_token = idp.mint_refresh_token();
    let cache = source.cache().expect("a cache");
    let entry = CacheEntry {
        version: 1,
        account: "main".into(),
        provider: "microsoft".into(),
        client_id: idp.client_id().into(),
        scope: source.scope().into(),
        refresh_token: refresh_token.clone(),
        access_token: None,
        access_token_expires_at: None,
        updated_at: 0,
    };
    cache.save(&entry).expect("seed the cache");
    refresh_token
}

/// Polls `condition` every 20 ms until it holds or `limit` passes; returns
/// whether it held.
pub async fn eventually(limit: Duration, condition: impl FnMut() -> bool) -> bool {
    relay_testkit::poll_until(limit, Duration::from_millis(20), condition).await
}

/// Awaits `future`, failing the test if it takes longer than [`LIMIT`].
pub async fn bounded<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(LIMIT, future)
        .await
        .expect("timed out waiting")
}

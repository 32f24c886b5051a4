//! Every credential and flow against the test kit's identity platforms, over
//! loopback HTTP: certificate assertions, refresh tokens with a persisted
//! cache, device code, browser (PKCE), encryption, and Google.

mod common;

use common::{bounded, eventually, init, seed_cache, LIMIT};
use relay_config::{AccountConfig, Flow};
use relay_testkit::{open_in_browser, ClientCertificate, Consent, IdentityPlatform};
use relay_tokens::{
    BrowserAuthorization, CacheEntry, TokenCache, TokenError, TokenManager, TokenSource,
};
use std::{os::unix::fs::PermissionsExt, path::Path, time::Duration};
use tempfile::TempDir;
use tokio::task::JoinHandle;

const MAILBOX: &str = "relay@contoso.com";

fn account(oauth: &str) -> AccountConfig {
    let toml = format!(
        "[[accounts]]\nname = \"main\"\nmailbox = \"{MAILBOX}\"\n\n[accounts.oauth]\n{oauth}\n"
    );
    let mut config = relay_config::load_str(&toml).expect("valid configuration");
    config.accounts.remove(0)
}

fn microsoft(idp: &IdentityPlatform, flow: &str, extra: &str) -> String {
    format!(
        "flow = \"{flow}\"\nauthority = \"{}\"\ntenant_id = \"{}\"\nclient_id = \"{}\"\n{extra}",
        idp.authority(),
        idp.tenant(),
        idp.client_id()
    )
}

fn source(account: &AccountConfig, dir: &Path) -> TokenSource {
    TokenSource::for_account(account, &dir.join("queue")).expect("token source")
}

fn manager(source: &TokenSource) -> TokenManager {
    TokenManager::new("main", source.clone()).expect("manager")
}

/// What every test starts from: the crypto provider, an identity platform
/// and a directory for the queue, cache and key files.
async fn start() -> (IdentityPlatform, TempDir) {
    init();
    let idp = IdentityPlatform::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    (idp, dir)
}

/// The source of a delegated (`refresh_token`) account with no other options.
fn delegated_source(idp: &IdentityPlatform, dir: &Path) -> TokenSource {
    source(&account(&microsoft(idp, "refresh_token", "")), dir)
}

/// Writes `cert` to `app.pem`/`app.key` in `dir`; returns the two
/// `[accounts.oauth]` lines naming them.
fn certificate_files(dir: &Path, cert: &ClientCertificate) -> String {
    std::fs::write(dir.join("app.pem"), &cert.cert_pem).unwrap();
    std::fs::write(dir.join("app.key"), &cert.key_pem).unwrap();
    format!(
        "client_certificate = '{}'\nclient_private_key = '{}'",
        dir.join("app.pem").display(),
        dir.join("app.key").display()
    )
}

/// Waits for the browser's redirect in the background, as `authorize` does
/// while the user signs in.
fn finish_in_background(
    source: &TokenSource,
    sign_in: BrowserAuthorization,
) -> JoinHandle<Result<CacheEntry, TokenError>> {
    let source = source.clone();
    tokio::spawn(async move { source.finish_browser_authorization(sign_in, LIMIT).await })
}

async fn certificate_account(idp: &IdentityPlatform, dir: &Path, algorithm: &str) -> AccountConfig {
    let files = certificate_files(dir, &idp.create_client_certificate());
    account(&microsoft(
        idp,
        "client_credentials",
        &format!("{files}\n{algorithm}"),
    ))
}

// The kit verifies signature, aud, iss/sub, time range, jti and x5t#S256:
// a token comes back only if all hold. Each request signs a fresh jti.
#[tokio::test]
async fn certificate_assertion_ps256_with_x5t_s256() {
    let (idp, dir) = start().await;
    let account = certificate_account(&idp, dir.path(), "").await;
    let tokens = manager(&source(&account, dir.path()));
    let first = bounded(tokens.token())
        .await
        .expect("token with a certificate");
    let claims = idp
        .check_access_token(first.secret().expose())
        .expect("valid token");
    assert!(claims.roles.contains(&"SMTP.SendAsApp".to_string()));
    bounded(tokens.refresh_rejected(&first))
        .await
        .expect("second token");
    let assertions = idp.assertions();
    assert_eq!(assertions.len(), 2);
    assert!(assertions
        .iter()
        .all(|a| a.alg == "PS256" && a.x5t_s256.is_some() && a.x5t.is_none()));
    assert_ne!(assertions[0].jti, assertions[1].jti, "jti must be fresh");
    // never the key in Debug
    let debug = format!("{:?}", source(&account, dir.path()));
    assert!(!debug.contains("PRIVATE KEY"), "{debug}");
}

#[tokio::test]
async fn certificate_assertion_rs256_with_x5t() {
    let (idp, dir) = start().await;
    let account = certificate_account(&idp, dir.path(), "assertion_algorithm = \"RS256\"").await;
    bounded(manager(&source(&account, dir.path())).token())
        .await
        .expect("token");
    let a = &idp.assertions()[0];
    assert_eq!(
        (a.alg.as_str(), a.x5t.is_some(), a.x5t_s256.is_some()),
        ("RS256", true, false)
    );
}

// A certificate the app registration does not know is refused with the
// AADSTS code and its explanation.
#[tokio::test]
async fn unregistered_certificate_is_refused_and_explained() {
    let (idp, dir) = start().await;
    let other = IdentityPlatform::start().await.unwrap();
    // uploaded elsewhere
    let files = certificate_files(dir.path(), &other.create_client_certificate());
    let account = account(&microsoft(&idp, "client_credentials", &files));
    let err = bounded(manager(&source(&account, dir.path())).token())
        .await
        .expect_err("refused");
    assert_eq!(err.aadsts(), Some(700027), "{err}");
    assert!(err.to_string().contains("certificate"), "{err}");
}

// Rotation: each refresh persists the newest refresh token before the access
// token is handed out; the cache is 0600; the old token is spent.
#[tokio::test]
async fn refresh_token_rotation_is_persisted_before_use() {
    let (idp, dir) = start().await;
    let account = account(&microsoft(&idp, "refresh_token", ""));
    let source = source(&account, dir.path());
    let cache_path = dir.path().join("tokens/main.json");
    assert_eq!(
        source.cache().unwrap().path(),
        cache_path,
        "default beside the queue"
    );
    let seeded = seed_cache(&source, &idp);
    let tokens = manager(&source);
    let first = bounded(tokens.token()).await.expect("token");
    let claims = idp
        .check_access_token(first.secret().expose())
        .expect("valid");
    assert_eq!(claims.upn.as_deref(), Some(MAILBOX));
    assert!(claims
        .scp
        .as_deref()
        .unwrap_or_default()
        .contains("SMTP.Send"));
    let newest = idp.issued_refresh_tokens().last().cloned().unwrap();
    assert!(!idp.refresh_token_is_live(&seeded), "single-use in the kit");
    let entry = source.cache().unwrap().load().unwrap().unwrap();
    assert_eq!(entry.refresh_token, newest, "rotated token persisted");
    let mode = std::fs::metadata(&cache_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // forced refresh rotates again, and a second manager (a restarted relay)
    // carries on from the file
    bounded(tokens.refresh_rejected(&first))
        .await
        .expect("token");
    let again = TokenSource::for_account(&account, &dir.path().join("queue")).unwrap();
    let restarted = manager(&again);
    // the cached access token is used at start, without a request
    let before = idp.grants("refresh_token");
    let cached = bounded(restarted.token()).await.expect("cached token");
    assert_eq!(idp.grants("refresh_token"), before);
    bounded(restarted.refresh_rejected(&cached))
        .await
        .expect("refresh from the file");
    let entry = again.cache().unwrap().load().unwrap().unwrap();
    assert_eq!(
        Some(&entry.refresh_token),
        idp.issued_refresh_tokens().last()
    );
    assert!(idp.refresh_token_is_live(&entry.refresh_token));
}

// A revoked refresh token: the error names the command, no request is made
// again until the cache changes, and a new cache is picked up.
#[tokio::test]
async fn revoked_refresh_token_stops_retrying_until_a_new_cache_appears() {
    let (idp, dir) = start().await;
    let source = delegated_source(&idp, dir.path());
    seed_cache(&source, &idp);
    idp.revoke_refresh_tokens();
    let tokens = manager(&source);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let refresher = tokens.spawn_refresher(shutdown.clone());
    let err = bounded(tokens.token()).await.expect_err("revoked");
    assert!(
        matches!(err, TokenError::NeedsAuthorization { .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("run `smtp-oauth-relay authorize --account main`"),
        "{text}"
    );
    assert!(text.contains("50173"), "{text}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        idp.grants("refresh_token"),
        1,
        "a dead refresh token is not retried"
    );
    // someone runs `authorize`: the refresher picks the new cache up
    seed_cache(&source, &idp);
    assert!(eventually(LIMIT, || idp.grants("refresh_token") == 2).await);
    bounded(tokens.token())
        .await
        .expect("token from the new cache");
    shutdown.cancel();
    let _ = refresher.await;
}

// No cache yet: the same clear error, without any request.
#[tokio::test]
async fn missing_cache_names_the_command() {
    let (idp, dir) = start().await;
    let err = bounded(manager(&delegated_source(&idp, dir.path())).token())
        .await
        .expect_err("no cache");
    assert!(err.needs_authorization(), "{err}");
    assert!(
        err.to_string().contains("authorize --account main"),
        "{err}"
    );
    assert!(idp.requests().is_empty());
}

// Device code: authorization_pending while the user has not signed in, a
// slow_down adds 5 s to the interval, then the cache is written.
#[tokio::test]
async fn device_code_flow_with_pending_and_slow_down() {
    let (idp, dir) = start().await;
    let source = delegated_source(&idp, dir.path());
    let device = bounded(source.start_device_authorization())
        .await
        .expect("device code");
    assert!(
        device.message.contains(&device.user_code),
        "{}",
        device.message
    );
    assert_eq!(device.interval, Duration::from_secs(1));
    idp.slow_down_next(1);
    let poller = {
        let source = source.clone();
        tokio::spawn(async move { source.finish_device_authorization(&device).await })
    };
    // a few pending polls, then the user signs in
    assert!(
        eventually(Duration::from_secs(20), || idp
            .grants("urn:ietf:params:oauth:grant-type:device_code")
            >= 3)
        .await
    );
    let code = idp.pending_user_codes().pop().expect("pending code");
    assert!(idp.approve_device(&code));
    let entry = tokio::time::timeout(Duration::from_secs(20), poller)
        .await
        .expect("in time")
        .unwrap()
        .expect("signed in");
    assert_eq!(
        Some(&entry.refresh_token),
        idp.issued_refresh_tokens().last()
    );
    // polls honoured the interval, and 6 s (1 + 5) after the slow_down
    let polls: Vec<_> = idp
        .requests()
        .into_iter()
        .filter(|r| r.grant_type == "urn:ietf:params:oauth:grant-type:device_code")
        .map(|r| r.at)
        .collect();
    let gaps: Vec<Duration> = polls.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(900)),
        "{gaps:?}"
    );
    assert!(
        gaps[0] >= Duration::from_millis(5900),
        "slow_down honoured: {gaps:?}"
    );
    // and the relay's source uses it
    bounded(manager(&source).token()).await.expect("token");
}

#[tokio::test]
async fn device_code_declined_or_expired_is_a_clear_error() {
    let (idp, dir) = start().await;
    let source = delegated_source(&idp, dir.path());
    let device = bounded(source.start_device_authorization()).await.unwrap();
    assert!(idp.decline_device(&device.user_code));
    let err = bounded(source.finish_device_authorization(&device))
        .await
        .expect_err("declined");
    assert!(err.to_string().contains("declined"), "{err}");
    idp.set_device_lifetime(2);
    let device = bounded(source.start_device_authorization()).await.unwrap();
    let err = bounded(source.finish_device_authorization(&device))
        .await
        .expect_err("expired");
    assert!(err.to_string().contains("expired"), "{err}");
    assert!(source.cache().unwrap().load().unwrap().is_none());
}

// Browser flow: PKCE S256 verified by the kit, state checked, loopback
// redirect, cache written.
#[tokio::test]
async fn browser_flow_with_pkce_and_state() {
    let (idp, dir) = start().await;
    let source = delegated_source(&idp, dir.path());
    let sign_in = bounded(source.start_browser_authorization(0))
        .await
        .expect("start");
    assert!(
        sign_in.url.contains("code_challenge_method=S256"),
        "{}",
        sign_in.url
    );
    assert!(sign_in.redirect_uri.starts_with("http://localhost:"));
    let url = sign_in.url.clone();
    let finish = finish_in_background(&source, sign_in);
    let (status, landed, body) = open_in_browser(&url).await.expect("browse");
    assert_eq!(status, 200, "{landed}: {body}");
    assert!(body.contains("Signed in"), "{body}");
    let entry = bounded(finish).await.unwrap().expect("signed in");
    assert_eq!(
        Some(&entry.refresh_token),
        idp.issued_refresh_tokens().last()
    );
    assert_eq!(idp.grants("authorization_code"), 1);
}

#[tokio::test]
async fn browser_flow_refuses_a_wrong_state_and_reports_a_decline() {
    let (idp, dir) = start().await;
    let source = delegated_source(&idp, dir.path());
    // a forged redirect (another state) is refused, no code is exchanged
    let sign_in = bounded(source.start_browser_authorization(0))
        .await
        .unwrap();
    let forged = format!("{}/?code=stolen&state=forged", sign_in.redirect_uri);
    let finish = finish_in_background(&source, sign_in);
    let _ = open_in_browser(&forged).await;
    let err = bounded(finish).await.unwrap().expect_err("wrong state");
    assert!(err.to_string().contains("state"), "{err}");
    assert_eq!(idp.grants("authorization_code"), 0);
    // the user declines
    idp.set_consent(Consent::Decline);
    let sign_in = bounded(source.start_browser_authorization(0))
        .await
        .unwrap();
    let url = sign_in.url.clone();
    let finish = finish_in_background(&source, sign_in);
    let _ = open_in_browser(&url).await;
    let err = bounded(finish).await.unwrap().expect_err("declined");
    assert!(err.to_string().contains("access_denied"), "{err}");
}

// Encrypted cache: the refresh token is not readable on disk, the flow works.
#[tokio::test]
async fn encrypted_cache() {
    let (idp, dir) = start().await;
    let key = dir.path().join("cache.key");
    std::fs::write(&key, "qUeh2Kx8m0bX3sQk1c6x9cQwq7U0b9yq2mJ8m4kq3vA=\n").unwrap();
    let account = account(&microsoft(
        &idp,
        "refresh_token",
        &format!("token_cache_key_file = '{}'", key.display()),
    ));
    let source = source(&account, dir.path());
    seed_cache(&source, &idp);
    bounded(manager(&source).token()).await.expect("token");
    let raw = std::fs::read_to_string(source.cache().unwrap().path()).unwrap();
    let newest = idp.issued_refresh_tokens().last().cloned().unwrap();
    assert!(
        !raw.contains(&newest) && raw.contains("chacha20-poly1305"),
        "{raw}"
    );
    let plain = TokenCache::new(source.cache().unwrap().path().to_owned(), None).unwrap();
    assert!(plain.load().is_err(), "unreadable without the key");
}

// Google: a service account with domain-wide delegation acts as the mailbox.
#[tokio::test]
async fn google_service_account_grant() {
    let (idp, dir) = start().await;
    let key = dir.path().join("sa.json");
    std::fs::write(
        &key,
        idp.create_service_account("relay@relay-test.iam.gserviceaccount.com"),
    )
    .unwrap();
    let account = account(&format!(
        "provider = \"google\"\nflow = \"service_account\"\nauthority = \"{}\"\nservice_account_key_file = '{}'",
        idp.google_authority(),
        key.display()
    ));
    let source = source(&account, dir.path());
    assert_eq!(source.flow(), Flow::ServiceAccount);
    assert_eq!(source.scope(), "https://mail.google.com/");
    let token = bounded(manager(&source).token()).await.expect("token");
    let claims = idp
        .check_access_token(token.secret().expose())
        .expect("valid");
    assert_eq!(claims.upn.as_deref(), Some(MAILBOX), "sub = the mailbox");
    // without domain-wide delegation: refused and explained
    idp.set_domain_wide_delegation("relay@relay-test.iam.gserviceaccount.com", false);
    let err = bounded(manager(&source).token())
        .await
        .expect_err("no delegation");
    assert!(err.to_string().contains("unauthorized_client"), "{err}");
    assert!(err.to_string().contains("domain-wide delegation"), "{err}");
}

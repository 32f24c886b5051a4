//! Delegated (`refresh_token`) accounts end to end: `authorize` with a
//! device code, the relay delivering with the cached refresh token, rotation
//! across SIGKILL, a revoked refresh token, and the `token` verb.

mod common;

use common::*;
use std::{
    io::{BufRead, BufReader},
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

/// The world's configuration with the account switched to `refresh_token`.
fn delegated_config(world: &World, port: u16) -> String {
    world
        .config(port)
        .replace(
            "flow = \"client_credentials\"",
            "flow = \"refresh_token\"\ntoken_cache = \"CACHE\"",
        )
        .replace("CACHE", &cache_path(world).display().to_string())
        .replace(
            &format!(
                "client_secret_file = \"{}/secret\"\n",
                world.dir.path().display()
            ),
            "",
        )
}

fn cache_path(world: &World) -> std::path::PathBuf {
    world.dir.path().join("state/tokens/main.json")
}

/// Writes the cache as `authorize` would after a sign-in.
fn seed_cache(world: &World) -> String {
    let refresh_token = world.idp.mint_refresh_token();
    let entry = serde_json::json!({
        "version": 1, "account": "main", "provider": "microsoft",
        "client_id": world.idp.client_id(),
        "scope": "https://outlook.office.com/SMTP.Send offline_access",
        "refresh_token": refresh_token, "updated_at": 0
    });
    std::fs::create_dir_all(cache_path(world).parent().unwrap()).unwrap();
    std::fs::write(cache_path(world), entry.to_string()).unwrap();
    refresh_token
}

fn cached_refresh_token(world: &World) -> String {
    let text = std::fs::read_to_string(cache_path(world)).expect("cache file");
    let value: serde_json::Value = serde_json::from_str(&text).expect("cache is whole JSON");
    value["refresh_token"].as_str().unwrap().to_owned()
}

/// Seeds the cache and starts a relay on the delegated account; returns its
/// configuration file (for a restart) and the relay.
async fn start_delegated(world: &World) -> (PathBuf, Relay) {
    seed_cache(world);
    let port = free_port();
    let config = world.write_config(&delegated_config(world, port));
    let relay = Relay::start(&config, port).await;
    (config, relay)
}

/// Waits (15 s at most) until the relay has fetched a token.
async fn first_token(world: &World) {
    eventually(15, "a first token", || {
        world.idp.grants("refresh_token") >= 1
    })
    .await;
}

/// SIGKILLs the relay while a refresh is in flight: the kit has rotated the
/// token, but its reply is held back and never reaches the relay. The
/// refresh is caused by the upstream refusing the token of a delivery (the
/// message "trigger", which stays queued).
async fn kill_during_refresh(world: &World, relay: &mut Relay) {
    world.idp.set_reply_delay(Some(Duration::from_secs(30)));
    world
        .upstream
        .push_auth_fault("535 5.7.3 Authentication unsuccessful");
    let before = world.idp.grants("refresh_token");
    send_accepted(relay, "trigger").await;
    eventually(15, "a refresh in flight", || {
        world.idp.grants("refresh_token") > before
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.kill9();
    world.idp.set_reply_delay(None);
}

/// Waits (`secs` at most) until the log tells the operator to run
/// `authorize`.
async fn names_authorize(relay: &Relay, secs: u64) {
    eventually(secs, "the log to name the command", || {
        relay
            .log()
            .contains("run `smtp-oauth-relay authorize --account main`")
    })
    .await;
}

/// Asserts no token request is made for 3 s (a dead refresh token is not
/// retried).
async fn assert_no_token_requests(world: &World, what: &str) {
    let attempts = world.idp.grants("refresh_token");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(world.idp.grants("refresh_token"), attempts, "{what}");
}

// The binary is driven with blocking calls: the kit needs its own threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_with_device_code_then_relay_delivers_as_the_user() {
    let world = World::start().await;
    let port = free_port();
    let config = world.write_config(&delegated_config(&world, port));
    let mut child = Command::new(BIN)
        .args(["authorize", "--account", "main", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("authorize");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(15))
        .expect("the sign-in message");
    assert!(
        first.contains("https://microsoft.com/devicelogin"),
        "{first}"
    );
    let code = world
        .idp
        .pending_user_codes()
        .pop()
        .expect("a pending code");
    assert!(
        first.contains(&code),
        "Microsoft's message is printed as is: {first}"
    );
    // a pending poll or two, then the user signs in
    eventually(10, "a poll", || {
        world
            .idp
            .grants("urn:ietf:params:oauth:grant-type:device_code")
            >= 1
    })
    .await;
    assert!(world.idp.approve_device(&code));
    let mut status = None;
    for _ in 0..150 {
        if let Ok(Some(s)) = child.try_wait() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = status.expect("authorize exits in time");
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(status.success(), "authorize failed: {rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("Token cache written")),
        "{rest:?}"
    );
    let mode = std::fs::metadata(cache_path(&world))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "token cache permissions");
    assert_eq!(
        Some(&cached_refresh_token(&world)),
        world.idp.issued_refresh_tokens().last()
    );

    let relay = Relay::start(&config, port).await;
    send_accepted(&relay, "delegated").await;
    let got = relay.delivered(&world, 1).await;
    assert_eq!(got[0].token_claims.scp.as_deref(), Some("SMTP.Send"));
    assert_eq!(got[0].token_claims.upn.as_deref(), Some(MAILBOX));
}

// Persist before use: with single-use refresh tokens (stricter than Entra
// ID), the relay is SIGKILLed right after it used freshly rotated tokens; the
// restarted relay must hold the live refresh token.
#[tokio::test]
async fn rotated_refresh_token_survives_sigkill_after_use() {
    let world = World::start().await;
    let (config, mut relay) = start_delegated(&world).await;
    first_token(&world).await;
    // the upstream refuses the token once: a rotation right before use
    world
        .upstream
        .push_auth_fault("535 5.7.3 Authentication unsuccessful");
    send_accepted(&relay, "one").await;
    world
        .upstream
        .wait_for_messages(1, Duration::from_secs(20))
        .await;
    assert_eq!(world.idp.grants("refresh_token"), 2, "two rotations");
    relay.kill9();
    let cached = cached_refresh_token(&world);
    assert!(
        world.idp.refresh_token_is_live(&cached),
        "the cache holds the live refresh token"
    );
    let relay = Relay::start(&config, relay.port).await;
    send_accepted(&relay, "two").await;
    relay.delivered(&world, 2).await;
}

// SIGKILL in the middle of a refresh: the kit has rotated the token but its
// reply is delayed and never reaches the relay. Entra ID keeps a used
// refresh token valid (the kit's `reuse_refresh_tokens(true)`), so the
// restarted relay, which still holds the previous one (the cache is never
// torn), carries on.
#[tokio::test]
async fn sigkill_in_the_middle_of_a_refresh() {
    let world = World::start().await;
    world.idp.reuse_refresh_tokens(true);
    let (config, mut relay) = start_delegated(&world).await;
    first_token(&world).await;
    kill_during_refresh(&world, &mut relay).await;
    let cached = cached_refresh_token(&world);
    assert!(world.idp.refresh_token_is_live(&cached));
    let relay = Relay::start(&config, relay.port).await;
    send_accepted(&relay, "after kill").await;
    relay.delivered(&world, 2).await;
}

// The known limit: against a server whose refresh tokens are strictly
// single-use, a reply lost to a crash loses the rotated token. The relay then
// says exactly what to do instead of retrying forever.
#[tokio::test]
async fn lost_rotation_with_single_use_tokens_asks_for_authorize() {
    let world = World::start().await;
    // too short for the restarted relay to reuse the cached access token
    world.idp.set_lifetime(60);
    let (config, mut relay) = start_delegated(&world).await;
    first_token(&world).await;
    kill_during_refresh(&world, &mut relay).await;
    std::fs::write(config.with_file_name("relay.log"), "").unwrap();
    let relay = Relay::start(&config, relay.port).await;
    names_authorize(&relay, 15).await;
    assert_no_token_requests(&world, "a dead refresh token is not retried").await;
}

// A revoked refresh token: deliveries wait, the log names the command, no
// retry storm; `authorize` (here: a new cache) brings it back without
// restart. One-minute tokens are renewed after 40 s: that renewal finds the
// revocation.
#[tokio::test]
async fn revoked_refresh_token_is_explained_and_recovered_without_restart() {
    let world = World::start().await;
    world.idp.set_lifetime(60);
    let (_, relay) = start_delegated(&world).await;
    first_token(&world).await;
    world.idp.revoke_refresh_tokens();
    names_authorize(&relay, 60).await;
    assert!(relay.log().contains("50173"), "log:\n{}", relay.log());
    assert_no_token_requests(&world, "no retries").await;
    send_accepted(&relay, "waits").await;
    seed_cache(&world);
    relay.delivered(&world, 1).await;
}

// The binary is driven with blocking calls: the kit needs its own threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_verb_shows_claims_and_prints_the_token_only_when_asked() {
    let world = World::start().await;
    let port = free_port();
    let config = world.write_config(&world.config(port));
    let out = cli(&["token"], &config);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "flow:      client_credentials",
        "aud",
        "https://outlook.office365.com",
        "roles",
        "SMTP.SendAsApp",
        "appid",
        "tid",
        "expires:   in",
        "ok:",
    ] {
        assert!(text.contains(needle), "{needle:?} missing in:\n{text}");
    }
    assert!(
        !text.contains("eyJ"),
        "the token itself must not be shown:\n{text}"
    );
    let out = cli(&["token", "--print"], &config);
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        world.idp.check_access_token(&token).is_ok(),
        "--print prints the token"
    );

    // a delegated token without SMTP.Send gets a warning
    seed_cache(&world);
    let delegated = delegated_config(&world, port).replace(
        "flow = \"refresh_token\"",
        "flow = \"refresh_token\"\nscope = \"https://outlook.office.com/Mail.Read offline_access\"",
    );
    let config = world.write_config(&delegated);
    let out = cli(&["token", "--account", "main"], &config);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("warning:") && text.contains("SMTP.Send"),
        "{text}"
    );

    // a bad secret is explained
    std::fs::write(world.dir.path().join("secret"), "wrong").unwrap();
    let config = world.write_config(&world.config(port));
    let out = cli(&["token"], &config);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("7000215") && err.contains("Secret ID"),
        "{err}"
    );
}

//! The token manager against a hostile or failing identity platform (the
//! test kit's [`TokenFault`]s), over real loopback HTTP: absurd lifetimes
//! neither panic nor spin, huge and endless bodies are not held or
//! repeated, and failures back off with single-flight requests.

mod common;

use common::{bounded, init, kit_config, manager};
use relay_testkit::{IdentityPlatform, TokenFault};
use relay_tokens::TokenError;
use serde_json::json;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const CC: &str = "client_credentials";
const DAY: Duration = Duration::from_secs(24 * 3600);

async fn idp() -> IdentityPlatform {
    IdentityPlatform::start().await.expect("identity platform")
}

fn lifetime_fault(expires_in: serde_json::Value, ext: serde_json::Value) -> Option<TokenFault> {
    Some(TokenFault::Lifetime {
        expires_in,
        ext_expires_in: ext,
    })
}

// Protects against the overflow panic: absurd lifetimes give a token
// planned for at most a day, and the refresher keeps running.
#[tokio::test]
async fn huge_lifetimes_are_bounded_to_a_day() {
    init();
    let idp = idp().await;
    for (expires_in, ext) in [
        (
            json!(9223372036854775807_i64),
            json!(9223372036854775807_i64),
        ),
        (json!(u64::MAX), json!(-1)),
        (json!("18446744073709551615"), json!("forever")),
        (json!(1e308), json!(1e308)),
    ] {
        idp.set_fault(lifetime_fault(expires_in.clone(), ext));
        let tokens = manager(&kit_config(&idp));
        let shutdown = CancellationToken::new();
        let refresher = tokens.spawn_refresher(shutdown.clone());
        let token = bounded(tokens.token()).await.expect("token");
        assert!(
            token.expires_in() <= DAY,
            "{expires_in}: {:?}",
            token.expires_in()
        );
        assert!(token.expires_in() > DAY - Duration::from_secs(60));
        assert!(tokens.valid_for().is_some());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!refresher.is_finished(), "{expires_in}: the refresher died");
        shutdown.cancel();
        bounded(refresher).await.expect("refresher ends cleanly");
    }
    assert_eq!(idp.grants(CC), 4, "one token each, no renewal storm");
}

// Protects the identity platform from a request storm: a lifetime of
// zero or less is planned as the floor (5 s) and counts toward the
// back-off, so the refresher does not ask again at once, and ever more
// slowly after that.
#[tokio::test]
async fn zero_and_negative_lifetimes_do_not_spin() {
    init();
    let idp = idp().await;
    for expires_in in [json!(0), json!(-5), json!("-9223372036854775808")] {
        idp.set_fault(lifetime_fault(expires_in.clone(), json!(0)));
        let before = idp.grants(CC);
        let tokens = manager(&kit_config(&idp));
        let shutdown = CancellationToken::new();
        let refresher = tokens.spawn_refresher(shutdown.clone());
        let token = bounded(tokens.token()).await.expect("token");
        assert!(token.expires_in() > Duration::from_secs(4), "{expires_in}");
        assert!(token.expires_in() <= Duration::from_secs(5), "{expires_in}");
        tokio::time::sleep(Duration::from_secs(2)).await;
        shutdown.cancel();
        bounded(refresher).await.expect("refresher ends cleanly");
        assert_eq!(idp.grants(CC) - before, 1, "{expires_in}: one request");
    }
}

/// Asserts an error from a hostile body is short, says how big the body
/// was, and that the client hung up long before the body's end.
fn assert_bounded(err: &TokenError, idp: &IdentityPlatform, size: &str) {
    let text = err.to_string();
    assert!(text.len() < 1024, "{} bytes of error", text.len());
    assert!(text.contains(size), "{text}");
    assert!(matches!(err, TokenError::Transport { .. }), "{err:?}");
    let streamed = idp.streamed_bytes();
    assert!(
        streamed < 32 << 20,
        "{streamed} bytes streamed: the client read on"
    );
}

// Protects memory and the queue's metadata: a 50 MB error body is read
// only up to the limit, and the error stays small.
#[tokio::test]
async fn large_error_body_is_cut() {
    init();
    let idp = idp().await;
    idp.set_fault(Some(TokenFault::LargeError { size: 50 << 20 }));
    let tokens = manager(&kit_config(&idp));
    let err = bounded(tokens.token()).await.expect_err("refused");
    assert_bounded(&err, &idp, "52428800 bytes");
}

// Protects memory and liveness: an endless body ends the request after
// the limit, not after the client's timeout or never.
#[tokio::test]
async fn endless_body_is_cut() {
    init();
    let idp = idp().await;
    idp.set_fault(Some(TokenFault::EndlessBody));
    let tokens = manager(&kit_config(&idp));
    let err = bounded(tokens.token()).await.expect_err("refused");
    assert_bounded(&err, &idp, "more than 65536 bytes");
}

// Protects logs and metadata: a long OAuth error description (under the
// read limit) is clipped and marked as cut.
#[tokio::test]
async fn long_error_description_is_clipped() {
    init();
    let idp = idp().await;
    idp.fail_next(500, 50000, "server_error", &"y".repeat(60_000));
    let tokens = manager(&kit_config(&idp));
    let err = bounded(tokens.token()).await.expect_err("refused");
    let text = err.to_string();
    assert!(text.len() < 1024, "{} bytes of error", text.len());
    assert!(text.contains("[cut, 60013 bytes]"), "{text}");
    assert_eq!(err.aadsts(), Some(50000));
}

// Protects the identity platform during its outage: concurrent callers
// share one request; after it fails, callers get "token unavailable" at
// once without a request until the back-off ends, then one request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failures_are_single_flight_and_back_off() {
    init();
    let idp = idp().await;
    idp.set_fault(Some(TokenFault::Status(500)));
    idp.set_reply_delay(Some(Duration::from_millis(200)));
    let tokens = manager(&kit_config(&idp));

    let mut callers = JoinSet::new();
    for _ in 0..50 {
        let tokens = tokens.clone();
        callers.spawn(async move { tokens.token().await });
    }
    let mut errors = Vec::new();
    while let Some(result) = bounded(callers.join_next()).await {
        errors.push(result.expect("task").expect_err("platform down"));
    }
    assert_eq!(idp.grants(CC), 1, "50 callers, one request");
    assert_eq!(errors.len(), 50);

    let started = Instant::now();
    let err = bounded(tokens.token()).await.expect_err("backing off");
    assert!(matches!(err, TokenError::Unavailable { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.starts_with("token unavailable, next attempt in 1s"),
        "{text}"
    );
    assert!(text.contains("temporarily_unavailable"), "{text}");
    assert_eq!(idp.grants(CC), 1, "no request while backing off");

    // The second failure doubles the pause: within 2.5 s of the first
    // failure at most two more requests are made however often callers ask.
    let shutdown = CancellationToken::new();
    let refresher = tokens.spawn_refresher(shutdown.clone());
    while started.elapsed() < Duration::from_millis(2500) {
        let _ = bounded(tokens.token()).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let requests = idp.grants(CC);
    assert!((2..=3).contains(&requests), "{requests} requests");

    // Recovery: the next attempt after the back-off gets a token.
    idp.set_fault(None);
    idp.set_reply_delay(None);
    let recovered =
        common::eventually(Duration::from_secs(10), || tokens.valid_for().is_some()).await;
    assert!(recovered, "the refresher obtained a token after the outage");
    bounded(tokens.token()).await.expect("token after recovery");
    shutdown.cancel();
    bounded(refresher).await.expect("refresher ends cleanly");
}

//! The relay against a hostile or failing identity platform (the test
//! kit's `TokenFault`s), end to end: absurd token lifetimes at start and at
//! renewal neither kill nor freeze it, huge and endless error bodies are
//! neither held in memory nor copied into logs and queue metadata, and an
//! outage of the token endpoint costs a handful of requests, not one per
//! delivery attempt.

mod common;

use common::*;
use relay_testkit::TokenFault;
use std::time::{Duration, Instant};

const CC: &str = "client_credentials";

fn huge_lifetime() -> Option<TokenFault> {
    Some(TokenFault::Lifetime {
        expires_in: serde_json::json!(9223372036854775807_i64),
        ext_expires_in: serde_json::json!(9223372036854775807_i64),
    })
}

/// Starts a relay with its admin endpoint on a known port; returns it and
/// its `/readyz` URL. Upstream sessions close as soon as they are idle, so
/// each message logs in afresh: an AUTH fault meets the next message,
/// whichever worker takes it.
async fn start(world: &World) -> (Relay, String) {
    let (port, admin) = (free_port(), free_port());
    let text = world
        .config_with_admin(port, admin)
        .replace("[upstream]\n", "[upstream]\nidle_timeout = \"1ms\"\n");
    let config = world.write_config(&text);
    let relay = Relay::start(&config, port).await;
    (relay, format!("http://127.0.0.1:{admin}/readyz"))
}

/// Waits (15 s at most) for `/readyz` to answer 200.
async fn ready(relay: &Relay, readyz: &str) {
    for _ in 0..150 {
        if http_status(readyz).await == Some(200) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/readyz never answered 200; log:\n{}", relay.log());
}

// A token lifetime of i64::MAX seconds at start: the relay stays up,
// delivers, and answers /readyz.
#[tokio::test]
async fn huge_expires_in_at_start() {
    let world = World::start().await;
    world.idp.set_fault(huge_lifetime());
    let (mut relay, readyz) = start(&world).await;
    send_accepted(&relay, "one").await;
    relay.delivered(&world, 1).await;
    ready(&relay, &readyz).await;
    world.idp.set_fault(None);
    send_accepted(&relay, "two").await;
    relay.delivered(&world, 2).await;
    assert!(relay.alive(), "log:\n{}", relay.log());
    assert!(
        relay.log().contains("out of bounds"),
        "the lifetime is reported; log:\n{}",
        relay.log()
    );
}

// The same at a renewal (here: after the upstream refused the token): the
// relay keeps delivering and answering /readyz afterwards.
#[tokio::test]
async fn huge_expires_in_at_renewal() {
    let world = World::start().await;
    let (mut relay, readyz) = start(&world).await;
    send_accepted(&relay, "before").await;
    relay.delivered(&world, 1).await;

    world.idp.set_fault(huge_lifetime());
    world
        .upstream
        .push_auth_fault("535 5.7.3 Authentication unsuccessful");
    let grants = world.idp.grants(CC);
    send_accepted(&relay, "renewal").await;
    relay.delivered(&world, 2).await;
    assert_eq!(world.idp.grants(CC), grants + 1, "renewed once");

    world.idp.set_fault(None);
    send_accepted(&relay, "after").await;
    relay.delivered(&world, 3).await;
    ready(&relay, &readyz).await;
    assert!(relay.alive(), "log:\n{}", relay.log());
}

/// Sends `n` messages in one session; each is accepted.
async fn queue_messages(relay: &Relay, n: usize) {
    let (mut client, _) = Client::connect(relay.port).await;
    assert!(client.send(b"EHLO app.test\r\n").await.starts_with("250"));
    for i in 0..n {
        let reply = client
            .mail(MAILBOX, &["alice@example.com"], &message(&format!("m{i}")))
            .await;
        assert!(reply.starts_with("250"), "{reply}");
    }
    client.send(b"QUIT\r\n").await;
}

/// With `fault` from the start and three messages queued, the relay tries
/// for a while, then the platform recovers: asserts memory, log lines and
/// queue metadata stayed small, and the mail goes out.
async fn survives_error_body(fault: TokenFault) {
    let world = World::start().await;
    world.idp.set_fault(Some(fault));
    let (mut relay, _) = start(&world).await;
    queue_messages(&relay, 3).await;
    eventually(15, "three token requests", || world.idp.grants(CC) >= 3).await;

    let peak_mib = relay.peak_rss_kib() / 1024;
    assert!(peak_mib < 150, "peak RSS {peak_mib} MiB");
    let log = relay.log();
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 4096, "a log line of {longest} bytes");
    assert!(log.len() < 4 << 20, "{} bytes of log", log.len());
    assert!(
        !log.contains(world.idp.client_secret()),
        "the client secret reached the log"
    );
    let queue = cli(&["queue", "list", "--json"], &relay.config);
    assert!(queue.status.success());
    assert!(
        queue.stdout.len() < 16 * 1024,
        "queue list --json: {} bytes",
        queue.stdout.len()
    );
    assert!(
        world.idp.streamed_bytes() < (world.idp.grants(CC) as u64) * (32 << 20),
        "{} bytes streamed: the relay read on",
        world.idp.streamed_bytes()
    );

    world.idp.set_fault(None);
    relay.delivered(&world, 3).await;
    assert!(relay.alive(), "log:\n{}", relay.log());
}

// A 50 MB error body from the token endpoint.
#[tokio::test]
async fn large_error_body() {
    survives_error_body(TokenFault::LargeError { size: 50 << 20 }).await;
}

// An error body that never ends.
#[tokio::test]
async fn endless_error_body() {
    survives_error_body(TokenFault::EndlessBody).await;
}

// The token endpoint answers 500 with 50 messages queued: in 20 s the
// relay makes a handful of token requests (single-flight, backing off),
// not one per delivery attempt; after the outage mail flows again.
#[tokio::test]
async fn outage_costs_a_handful_of_token_requests() {
    let world = World::start().await;
    world.idp.set_fault(Some(TokenFault::Status(500)));
    let (relay, _) = start(&world).await;
    queue_messages(&relay, 50).await;
    eventually(15, "a first token request", || world.idp.grants(CC) >= 1).await;
    let first = world.idp.requests()[0].at;
    let window = Duration::from_secs(20);
    let end = first + window;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let in_window = world.idp.requests().iter().filter(|r| r.at < end).count();
    assert!(
        in_window <= 8,
        "{in_window} token requests in {window:?}; log:\n{}",
        relay.log()
    );
    let deferred = relay.queue_json();
    assert_eq!(deferred.len(), 50);
    let text = serde_json::to_string(&deferred).expect("json");
    assert!(text.contains("token unavailable"), "{text}");

    // After the outage the next attempt (at most one back-off step away)
    // gets a token and mail flows again, at the delivery's own pace.
    world.idp.set_fault(None);
    let got = world
        .upstream
        .wait_for_messages(1, Duration::from_secs(40))
        .await;
    assert!(!got.is_empty(), "log:\n{}", relay.log());
}

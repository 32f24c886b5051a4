//! End-to-end delivery: queue → workers → fake Microsoft 365 over STARTTLS
//! and XOAUTH2, on real loopback sockets.

mod common;

use common::{Relay, Setup, CC, LIMIT, MAILBOX};
use relay_queue::{Entry, QueueId, RecipientState, State};
use relay_testkit::SubmissionOptions;
use std::time::Duration;

/// Queues `Subject: {subject}` with a one-line body from the mailbox to
/// a@example.com: the message most tests need, whatever it says.
async fn enqueue_one(relay: &Relay, subject: &str) -> QueueId {
    let body = format!("Subject: {subject}\r\n\r\nx\r\n");
    relay
        .enqueue(MAILBOX, &["a@example.com"], body.as_bytes())
        .await
}

/// Asserts the entry's last error mentions `expected`.
fn assert_last_error(entry: &Entry, expected: &str) {
    let error = entry.last_error.clone().unwrap_or_default();
    assert!(error.contains(expected), "{error}");
}

/// Queues [`enqueue_one`]`(subject)` and waits until its first attempt was
/// deferred with `error`.
async fn deferred_once(relay: &Relay, subject: &str, error: &str) {
    let id = enqueue_one(relay, subject).await;
    let entry = relay.deferred(&id, 1..=1).await;
    assert_last_error(&entry, error);
}

/// Waits `settle`, then asserts the server still has exactly `n` messages
/// (nothing went out again).
async fn assert_still_delivered(relay: &Relay, n: usize, settle: Duration, what: &str) {
    tokio::time::sleep(settle).await;
    assert_eq!(relay.server.messages().len(), n, "{what}");
}

// Protects byte-exact transparency: dot-stuffing, 8-bit data, long lines
// and the envelope survive the trip unchanged.
#[tokio::test]
async fn message_arrives_byte_for_byte_with_exact_envelope() {
    let relay = Relay::start(Setup::default()).await;
    let mut body = Vec::new();
    body.extend_from_slice(
        b"From: Relay <relay@contoso.com>\r\nTo: a@example.com\r\nSubject: exact\r\n\
          Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
    );
    body.extend_from_slice(b".a\r\n..b\r\n.\r\n");
    body.extend_from_slice("Grüße aus Köln — ✓ 8-bit\r\n".as_bytes());
    body.extend_from_slice(&[b'x'; 998]);
    body.extend_from_slice(b"\r\n. trailing dot line\r\nlast line\r\n");
    let recipients = ["a@example.com", "b@example.net", "hidden-bcc@example.org"];

    relay.enqueue(MAILBOX, &recipients, &body).await;
    let got = relay.delivered(1).await;
    let message = &got[0];
    assert!(message.data == body, "body differs:\n{}", message.text());
    assert_eq!(message.mail_from, MAILBOX);
    assert_eq!(message.rcpt_to, recipients);
    assert_eq!(message.auth_user, MAILBOX);
    assert!(message
        .token_claims
        .roles
        .iter()
        .any(|r| r == "SMTP.SendAsApp"));
    relay.wait_until_empty().await;
    assert_eq!(relay.idp.grants(CC), 1);
    relay.shutdown().await;
}

// Protects connection reuse: consecutive messages share authenticated
// connections instead of opening one each.
#[tokio::test]
async fn consecutive_messages_reuse_connections() {
    let relay = Relay::start(Setup::default()).await;
    for n in 0..5 {
        let body = format!("Subject: reuse {n}\r\n\r\nbody {n}\r\n");
        relay
            .enqueue(MAILBOX, &["a@example.com"], body.as_bytes())
            .await;
    }

    relay.delivered(5).await;
    relay.wait_until_empty().await;
    assert!(
        relay.server.sessions() < 5,
        "{} sessions for 5 messages",
        relay.server.sessions()
    );
    assert!(
        relay.server.sessions() <= 3,
        "at most one session per worker"
    );
    assert_eq!(relay.idp.grants(CC), 1, "one token serves every session");
    relay.shutdown().await;
}

// Protects Microsoft's per-mailbox connection limit: never more than
// `max_connections` at once, and every message exactly once.
#[tokio::test]
async fn concurrency_never_exceeds_max_connections() {
    let relay = Relay::start(Setup {
        max_connections: 2,
        ..Setup::default()
    })
    .await;
    let mut bodies = Vec::new();
    for n in 0..10 {
        let body = format!("Subject: burst {n}\r\n\r\nbody {n}\r\n").into_bytes();
        relay.enqueue(MAILBOX, &["a@example.com"], &body).await;
        bodies.push(body);
    }

    relay.delivered(10).await;
    relay.wait_until_empty().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut received: Vec<Vec<u8>> = relay
        .server
        .messages()
        .into_iter()
        .map(|m| m.data)
        .collect();
    received.sort();
    bodies.sort();
    assert_eq!(received, bodies, "each message exactly once");
    assert!(
        relay.server.max_concurrent() <= 2,
        "max_concurrent = {}",
        relay.server.max_concurrent()
    );
    assert!(
        relay.server.sessions() <= 2,
        "sessions = {}",
        relay.server.sessions()
    );
    relay.shutdown().await;
}

// Protects against downgrade: without STARTTLS nothing (no token, no mail)
// is sent, and the message waits with a clear reason.
#[tokio::test]
async fn missing_starttls_defers_without_sending_anything() {
    let relay = Relay::start(Setup {
        options: SubmissionOptions {
            offer_starttls: false,
            ..SubmissionOptions::default()
        },
        ..Setup::default()
    })
    .await;
    let id = enqueue_one(&relay, "tls").await;

    let entry = relay.deferred(&id, 1..).await;
    assert_last_error(&entry, "STARTTLS");
    assert!(relay.server.messages().is_empty());
    assert!(
        relay.server.auth_failures().is_empty(),
        "no AUTH in clear text"
    );
    assert_eq!(relay.idp.grants(CC), 0, "no token needed, none requested");
    relay.shutdown().await;
}

// Protects the stale-token recovery: one 535 5.7.3 gets a fresh token and
// the message goes out in the same attempt, on the same connection.
#[tokio::test]
async fn refused_token_is_replaced_and_delivery_proceeds() {
    let relay = Relay::start(Setup::default()).await;
    tokio::time::timeout(LIMIT, relay.tokens.token())
        .await
        .expect("token timed out")
        .expect("token");
    assert_eq!(relay.idp.grants(CC), 1);
    relay
        .server
        .push_auth_fault("535 5.7.3 Authentication unsuccessful");

    enqueue_one(&relay, "retry").await;
    relay.delivered(1).await;
    assert_eq!(relay.idp.grants(CC), 2, "exactly one new token");
    assert_eq!(relay.server.sessions(), 1, "delivered in the same attempt");
    assert_eq!(relay.server.auth_failures().len(), 1);
    relay.wait_until_empty().await;
    relay.shutdown().await;
}

// Protects against token churn and bounces: a second 535 5.7.3 with a fresh
// token defers the message (a setup problem), and it goes out once fixed.
#[tokio::test]
async fn repeated_token_refusal_defers_the_message() {
    let relay = Relay::start(Setup::fast_retry()).await;
    relay
        .server
        .push_auth_fault("535 5.7.3 Authentication unsuccessful");
    relay
        .server
        .push_auth_fault("535 5.7.3 Authentication unsuccessful");

    deferred_once(&relay, "twice", "535 5.7.3").await;
    assert_eq!(relay.idp.grants(CC), 2, "one token, one replacement");
    assert!(relay.server.messages().is_empty());
    // Not failed: the next attempt (faults used up) delivers it.
    relay.delivered(1).await;
    relay.wait_until_empty().await;
    assert_eq!(relay.idp.grants(CC), 2, "the replacement token is reused");
    relay.shutdown().await;
}

// Protects the SMTP-AUTH-disabled case: 535 5.7.139 defers the message and
// does not waste a token request (a new token cannot help).
#[tokio::test]
async fn smtp_auth_disabled_defers_without_new_token() {
    let relay = Relay::start(Setup::fast_retry()).await;
    relay.server.push_auth_fault(
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox.",
    );

    deferred_once(&relay, "disabled", "535 5.7.139").await;
    assert_eq!(relay.idp.grants(CC), 1, "no extra token request");
    relay.delivered(1).await;
    relay.wait_until_empty().await;
    assert_eq!(relay.idp.grants(CC), 1);
    relay.shutdown().await;
}

// Protects the exact match on 5.7.3: other 535 5.7.3x replies (here basic
// auth refused, 5.7.30) are not stale-token refusals and fetch no token.
#[tokio::test]
async fn other_auth_refusals_do_not_fetch_a_new_token() {
    let relay = Relay::start(Setup::fast_retry()).await;
    relay
        .server
        .push_auth_fault("535 5.7.30 Basic authentication is not supported for Client Submission.");

    deferred_once(&relay, "5.7.30", "535 5.7.30").await;
    assert_eq!(relay.idp.grants(CC), 1, "no extra token request");
    relay.delivered(1).await;
    relay.shutdown().await;
}

// Protects against retrying permanent refusals: a SendAs denial fails the
// message at once and it is never sent again; a granted alias goes out.
#[tokio::test]
async fn send_as_refusal_fails_immediately_and_is_not_retried() {
    let relay = Relay::start(Setup::default()).await;
    let id = relay
        .enqueue(
            "someone@elsewhere.example",
            &["a@example.com"],
            b"Subject: sendas\r\n\r\nx\r\n",
        )
        .await;

    let entry = relay
        .entry_when(&id, "failed", |e| e.state == State::Failed)
        .await;
    let error = entry.last_error.clone().unwrap_or_default();
    assert!(error.contains("5.2.252"), "{error}");
    assert_eq!(entry.attempts, 1);
    assert_eq!(entry.recipient_status[0].status, RecipientState::Failed);
    // Several retry intervals later: still exactly one refused DATA.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        relay.server.rejected().len(),
        1,
        "{:?}",
        relay.server.rejected()
    );
    assert!(relay.server.messages().is_empty());
    assert_eq!(
        relay.entries().await.len(),
        1,
        "the failed message stays listed"
    );

    relay.server.allow_send_as("alias@contoso.com");
    relay
        .enqueue(
            "alias@contoso.com",
            &["a@example.com"],
            b"Subject: alias\r\n\r\nx\r\n",
        )
        .await;
    let got = relay.delivered(1).await;
    assert_eq!(got[0].mail_from, "alias@contoso.com");
    relay.shutdown().await;
}

// Protects per-recipient bookkeeping: a permanent RCPT refusal fails only
// that recipient, a temporary one is retried alone, and the accepted
// recipient never gets the message twice.
#[tokio::test]
async fn partial_rcpt_failure_retries_only_the_deferred_recipient() {
    let relay = Relay::start(Setup::default()).await;
    let (a, b, c) = ("a@example.com", "b@example.com", "c@example.com");
    relay.server.push_rcpt_fault(b, "550 5.1.1 User unknown");
    relay.server.push_rcpt_fault(c, "451 4.7.500 Server busy");

    let id = relay
        .enqueue(MAILBOX, &[a, b, c], b"Subject: partial\r\n\r\nx\r\n")
        .await;
    let entry = relay
        .entry_when(&id, "failed after the retry", |e| e.state == State::Failed)
        .await;

    let got = relay.server.messages();
    assert_eq!(got.len(), 2, "{got:#?}");
    assert_eq!(got[0].rcpt_to, [a]);
    assert_eq!(got[1].rcpt_to, [c]);
    assert_eq!(entry.attempts, 2);
    let status: Vec<_> = entry
        .recipient_status
        .iter()
        .map(|r| (r.address.as_str(), r.status))
        .collect();
    assert_eq!(
        status,
        [
            (a, RecipientState::Delivered),
            (b, RecipientState::Failed),
            (c, RecipientState::Delivered)
        ]
    );
    let b_reply = entry.recipient_status[1].reply.clone().unwrap_or_default();
    assert!(b_reply.contains("550 5.1.1"), "{b_reply}");
    // Nothing more goes out.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(relay.server.messages().len(), 2);
    relay.shutdown().await;
}

// DATA is pipelined with MAIL and RCPT; when every recipient is refused the
// server refuses that DATA too, and the connection carries the next message.
#[tokio::test]
async fn every_recipient_refused_fails_and_the_connection_carries_on() {
    let relay = Relay::start(Setup {
        max_connections: 1,
        ..Setup::default()
    })
    .await;
    let unknown = "nobody@example.com";
    relay
        .server
        .push_rcpt_fault(unknown, "550 5.1.1 User unknown");
    let refused = relay
        .enqueue(MAILBOX, &[unknown], b"Subject: refused\r\n\r\nx\r\n")
        .await;
    let entry = relay
        .entry_when(&refused, "failed", |e| e.state == State::Failed)
        .await;
    assert_last_error(&entry, "550 5.1.1 User unknown");
    relay
        .enqueue(MAILBOX, &["a@example.com"], b"Subject: next\r\n\r\ny\r\n")
        .await;
    relay.delivered(1).await;
    let got = relay.server.messages();
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].rcpt_to, ["a@example.com"]);
    assert_eq!(relay.server.sessions(), 1, "one connection for both");
    relay.shutdown().await;
}

// Protects outage handling: mail waits while the upstream is down and goes
// out exactly once when it is back.
#[tokio::test]
async fn upstream_outage_defers_then_delivers_once() {
    let relay = Relay::start(Setup::default()).await;
    relay.server.stop().await;

    let id = enqueue_one(&relay, "outage").await;
    let entry = relay.deferred(&id, 1..).await;
    assert_last_error(&entry, "cannot connect");

    relay.server.restart().await.expect("restart");
    relay.delivered(1).await;
    relay.wait_until_empty().await;
    assert_still_delivered(
        &relay,
        1,
        Duration::from_millis(500),
        "delivered exactly once",
    )
    .await;
    relay.shutdown().await;
}

// Protects the pooled-connection reconnect: a connection the server closed
// while idle is replaced within the same attempt, without a deferral (the
// retry delay here is far longer than the test waits) and without duplicates.
#[tokio::test]
async fn dead_pooled_connection_is_replaced_within_the_attempt() {
    let relay = Relay::start(Setup {
        max_connections: 1,
        retry_initial: "30s",
        retry_max: "30s",
        ..Setup::default()
    })
    .await;
    relay
        .enqueue(MAILBOX, &["a@example.com"], b"Subject: first\r\n\r\n1\r\n")
        .await;
    relay.delivered(1).await;
    relay.wait_until_empty().await;

    // The server drops every connection, including the relay's idle one.
    relay.server.stop().await;
    relay.server.restart().await.expect("restart");
    let id = relay
        .enqueue(MAILBOX, &["a@example.com"], b"Subject: second\r\n\r\n2\r\n")
        .await;

    let got = relay.delivered(2).await;
    assert_eq!(got[1].text(), "Subject: second\r\n\r\n2\r\n");
    assert_eq!(relay.server.sessions(), 2, "one reconnect");
    relay.wait_until_empty().await;
    assert!(relay.entries().await.iter().all(|e| e.id != id.to_string()));
    assert_still_delivered(&relay, 2, Duration::from_millis(300), "nothing duplicated").await;
    relay.shutdown().await;
}

// Protects temporary DATA refusals: deferred, then delivered once.
#[tokio::test]
async fn temporary_data_refusal_is_retried_once() {
    let relay = Relay::start(Setup::fast_retry()).await;
    relay
        .server
        .push_data_fault("451 4.3.0 Temporary server error. Please try again later");

    deferred_once(&relay, "busy", "451 4.3.0").await;

    relay.delivered(1).await;
    relay.wait_until_empty().await;
    assert_eq!(relay.server.rejected().len(), 1);
    assert_still_delivered(
        &relay,
        1,
        Duration::from_millis(500),
        "delivered exactly once",
    )
    .await;
    relay.shutdown().await;
}

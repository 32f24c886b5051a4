//! The delivery engine end to end: pacing, pooling, routing, per-recipient
//! status, rewrite_from, bounces, passthrough and the queue verbs.

mod common;

use common::*;
use std::time::{Duration, Instant};

/// `extra` lines go into `[upstream]`, `account` lines into `[[accounts]]`.
fn config(world: &World, port: u16, upstream: &str, account: &str) -> std::path::PathBuf {
    let text = world
        .config(port)
        .replace("[upstream]\n", &format!("[upstream]\n{upstream}\n"))
        .replace(
            &format!("mailbox = \"{MAILBOX}\"\n"),
            &format!("mailbox = \"{MAILBOX}\"\n{account}\n"),
        );
    world.write_config(&text)
}

fn stuffed(message: &str) -> Vec<u8> {
    message.replace("\r\n.", "\r\n..").into_bytes()
}

// A burst is paced: evenly spaced, never more connections than allowed,
// and the connections are reused.
#[tokio::test]
async fn a_burst_is_paced_over_few_reused_connections() {
    let world = World::start().await;
    let port = free_port();
    let path = config(
        &world,
        port,
        "max_connections = 2\nmessages_per_minute = 600",
        "",
    );
    let relay = Relay::start(&path, port).await;
    let started = Instant::now();
    let (mut c, _) = Client::connect(port).await;
    c.send(b"EHLO app.test\r\n").await;
    for i in 0..30 {
        let reply = c
            .mail(
                MAILBOX,
                &["alice@example.com"],
                &message(&format!("burst {i}")),
            )
            .await;
        assert!(reply.starts_with("250"), "{reply}");
    }
    let accepted_in = started.elapsed();
    let got = world
        .upstream
        .wait_for_messages(30, Duration::from_secs(30))
        .await;
    let took = started.elapsed();
    assert_eq!(got.len(), 30, "log:\n{}", relay.log());
    // 600 a minute is one every 100 ms: 29 gaps
    assert!(
        took >= Duration::from_millis(2700),
        "30 messages in {took:?}: not paced"
    );
    assert!(accepted_in < took, "the client waited for the pace");
    assert!(
        world.upstream.max_concurrent() <= 2,
        "{} connections",
        world.upstream.max_concurrent()
    );
    assert!(
        world.upstream.sessions() <= 4,
        "{} sessions for 30 messages",
        world.upstream.sessions()
    );
}

// One recipient refused temporarily: the others are delivered once, and the
// retry sends only to that one.
#[tokio::test]
async fn partial_refusal_retries_only_the_refused_recipient() {
    let world = World::start().await;
    world
        .upstream
        .push_rcpt_fault("bob@example.net", "451 4.2.1 Mailbox busy, try later");
    world
        .upstream
        .push_rcpt_fault("carol@example.org", "550 5.1.1 User unknown");
    let port = free_port();
    let relay = Relay::start(&world.write_config(&world.config(port)), port).await;
    let reply = send_one(
        port,
        MAILBOX,
        &["alice@example.com", "bob@example.net", "carol@example.org"],
        &message("partial"),
    )
    .await;
    assert!(reply.starts_with("250"), "{reply}");
    let got = relay.delivered(&world, 2).await;
    assert_eq!(got[0].rcpt_to, ["alice@example.com"]);
    assert_eq!(got[1].rcpt_to, ["bob@example.net"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(world.upstream.messages().len(), 2, "someone got it twice");
    let queue = relay.queue_json();
    assert_eq!(queue.len(), 1, "carol's failure stays visible");
    assert_eq!(queue[0]["state"], "failed");
    let status = &queue[0]["recipient_status"];
    assert_eq!(status[0]["status"], "delivered");
    assert_eq!(status[1]["status"], "delivered");
    assert_eq!(status[2]["status"], "failed");
    assert_eq!(status[2]["reply"], "550 5.1.1 User unknown");
    assert_eq!(queue[0]["last_error"], "550 5.1.1 User unknown");
}

// rewrite_from turns a SendAs refusal into a delivery.
#[tokio::test]
async fn rewrite_from_fixes_hard_coded_senders() {
    let world = World::start().await;
    let port = free_port();
    let relay = Relay::start(&config(&world, port, "", "rewrite_from = true"), port).await;
    let original = "From: \"Web Shop\" <noreply@shop.example>\r\nTo: alice@example.com\r\nSubject: order\r\n\r\nThanks.\r\n";
    let reply = send_one(
        port,
        "noreply@shop.example",
        &["alice@example.com"],
        &stuffed(original),
    )
    .await;
    assert!(reply.starts_with("250"), "{reply}");
    let got = relay.delivered(&world, 1).await;
    assert_eq!(got[0].mail_from, MAILBOX);
    assert_eq!(
        got[0].text(),
        "From: \"Web Shop\" <relay@contoso.com>\r\nReply-To: \"Web Shop\" <noreply@shop.example>\r\nTo: alice@example.com\r\nSubject: order\r\n\r\nThanks.\r\n"
    );
    assert!(world.upstream.rejected().is_empty());
}

// Senders pick their account; a sender no account takes is refused at MAIL.
#[tokio::test]
async fn routing_by_sender() {
    let world = World::start().await;
    let port = free_port();
    let text = world.config(port).replace(
        &format!("mailbox = \"{MAILBOX}\"\n"),
        &format!("mailbox = \"{MAILBOX}\"\nsenders = [\"*@contoso.com\"]\n"),
    );
    let text = format!(
        "{text}\n[[accounts]]\nname = \"sales\"\nmailbox = \"sales@fabrikam.com\"\nsenders = [\"ceo@contoso.com\"]\n[accounts.oauth]\nflow = \"client_credentials\"\nauthority = \"{}\"\ntenant_id = \"{}\"\nclient_id = \"{}\"\nclient_secret_file = \"{}/secret\"\n",
        world.idp.authority(),
        world.idp.tenant(),
        world.idp.client_id(),
        world.dir.path().display()
    );
    let relay = Relay::start(&world.write_config(&text), port).await;
    let (mut c, _) = Client::connect(port).await;
    c.send(b"EHLO app.test\r\n").await;
    let refused = c.send(b"MAIL FROM:<someone@example.com>\r\n").await;
    assert!(
        refused.starts_with("550 5.7.1 <someone@example.com>: Sender address rejected"),
        "{refused}"
    );
    assert!(c
        .mail(MAILBOX, &["a@example.com"], &message("main"))
        .await
        .starts_with("250"));
    // the fake only knows relay@contoso.com, so the sales mailbox cannot log in: it waits
    assert!(c
        .mail("ceo@contoso.com", &["a@example.com"], &message("sales"))
        .await
        .starts_with("250"));
    let got = world
        .upstream
        .wait_for_messages(1, Duration::from_secs(20))
        .await;
    assert_eq!(got[0].mail_from, MAILBOX);
    eventually(10, "the sales message to wait", || {
        let q = relay.queue_json();
        q.len() == 1 && q[0]["account"] == "sales" && q[0]["state"] == "deferred"
    })
    .await;
}

// A failed message is reported to its sender with an RFC 3464 notification.
#[tokio::test]
async fn bounces_report_failures_to_the_sender() {
    let world = World::start().await;
    world
        .upstream
        .push_rcpt_fault("nobody@example.com", "550 5.1.1 User unknown");
    let port = free_port();
    let relay = Relay::start(&config(&world, port, "", "bounce = true"), port).await;
    let reply = send_one(
        port,
        "app@contoso.com",
        &["nobody@example.com"],
        &message("lost"),
    )
    .await;
    assert!(reply.starts_with("250"), "{reply}");
    let got = relay.delivered(&world, 1).await;
    let dsn = got[0].text();
    assert_eq!(got[0].mail_from, MAILBOX);
    assert_eq!(got[0].rcpt_to, ["app@contoso.com"]);
    assert!(
        dsn.contains("Content-Type: multipart/report; report-type=delivery-status;"),
        "{dsn}"
    );
    assert!(
        dsn.contains(
            "Final-Recipient: rfc822; nobody@example.com\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        ),
        "{dsn}"
    );
    assert!(
        dsn.contains("Subject: lost"),
        "the original headers are returned"
    );
    assert!(dsn.contains("Auto-Submitted: auto-replied"));
}

// Passthrough: the client sees Microsoft's own replies, success or failure.
#[tokio::test]
async fn passthrough_returns_the_upstream_reply() {
    let world = World::start().await;
    let port = free_port();
    let text = world.config(port).replace(
        "hostname = \"relay.test\"",
        "hostname = \"relay.test\"\nmode = \"passthrough\"",
    );
    let relay = Relay::start(&world.write_config(&text), port).await;
    let ok = send_one(port, MAILBOX, &["a@example.com"], &message("fine")).await;
    assert!(
        ok.starts_with("250 2.0.0 OK <") && ok.contains("[Hostname=FAKE.prod.outlook.com]"),
        "{ok}"
    );
    let denied = send_one(
        port,
        "stranger@contoso.com",
        &["a@example.com"],
        &message("denied"),
    )
    .await;
    assert!(denied.starts_with("554 5.2.252 SendAsDenied;"), "{denied}");
    world
        .upstream
        .push_data_fault("451 4.7.500 Server busy. Please try again later.");
    let busy = send_one(port, MAILBOX, &["a@example.com"], &message("busy")).await;
    assert_eq!(busy, "451 4.7.500 Server busy. Please try again later.");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        world.upstream.messages().len(),
        1,
        "a refused passthrough message was retried"
    );
    let queue = relay.queue_json();
    assert_eq!(queue.len(), 2, "refused messages stay visible: {queue:?}");
    assert!(queue.iter().all(|e| e["state"] == "failed"));
}

// The queue verbs work while the relay runs.
#[tokio::test]
async fn queue_show_retry_delete_while_running() {
    let world = World::start().await;
    let port = free_port();
    let relay = Relay::start(&world.write_config(&world.config(port)), port).await;
    send_one(
        port,
        "stranger@contoso.com",
        &["a@example.com"],
        &message("first"),
    )
    .await;
    send_one(
        port,
        "other@contoso.com",
        &["b@example.com"],
        &message("second"),
    )
    .await;
    eventually(20, "both to fail", || {
        let q = relay.queue_json();
        q.len() == 2 && q.iter().all(|e| e["state"] == "failed")
    })
    .await;
    let queue = relay.queue_json();
    let first = queue[0]["id"].as_str().unwrap_or_default().to_owned();
    let second = queue[1]["id"].as_str().unwrap_or_default().to_owned();

    let show = cli(&["queue", "show", &first], &relay.config);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.status.success(),
        "{}",
        String::from_utf8_lossy(&show.stderr)
    );
    assert!(
        text.contains("stranger@contoso.com")
            && text.contains("5.2.252")
            && text.contains("Subject: first"),
        "{text}"
    );

    // the admin grants Send As, then retries the failed message
    world.upstream.allow_send_as("stranger@contoso.com");
    let retry = cli(&["queue", "retry", &first], &relay.config);
    assert!(
        String::from_utf8_lossy(&retry.stdout).contains("1 message(s) due now"),
        "{retry:?}"
    );
    let got = world
        .upstream
        .wait_for_messages(1, Duration::from_secs(20))
        .await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].mail_from, "stranger@contoso.com");

    let delete = cli(&["queue", "delete", "--failed"], &relay.config);
    assert!(
        String::from_utf8_lossy(&delete.stdout)
            .contains(&format!("1 message(s) deleted: {second}")),
        "{delete:?}"
    );
    eventually(10, "an empty queue", || relay.queue_json().is_empty()).await;
    let missing = cli(&["queue", "show", &second], &relay.config);
    assert!(!missing.status.success());
}

// 432 4.3.2 (too many connections) makes the mailbox use fewer, and the
// message is delivered later.
#[tokio::test]
async fn too_many_connections_backs_off() {
    let world = World::start().await;
    world
        .upstream
        .push_auth_fault("432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded");
    let port = free_port();
    let relay = Relay::start(&world.write_config(&world.config(port)), port).await;
    send_one(port, MAILBOX, &["a@example.com"], &message("later")).await;
    relay.delivered(&world, 1).await;
    let log = relay.log();
    assert!(log.contains("432 4.3.2"), "the refusal is logged");
    assert!(
        log.contains("using fewer for 10 minutes"),
        "no back-off in the log"
    );
}

// Messages waiting for their pacing slot (30 a minute is one every 2 s) are
// deleted by `queue delete --all` and never sent afterwards.
#[tokio::test]
async fn deleted_messages_waiting_for_their_turn_are_not_sent() {
    let world = World::start().await;
    let port = free_port();
    let path = config(&world, port, "messages_per_minute = 30", "");
    let relay = Relay::start(&path, port).await;
    let (mut c, _) = Client::connect(port).await;
    c.send(b"EHLO app.test\r\n").await;
    for i in 0..5 {
        let reply = c
            .mail(
                MAILBOX,
                &["alice@example.com"],
                &message(&format!("paced {i}")),
            )
            .await;
        assert!(reply.starts_with("250"), "{reply}");
    }
    let first = world
        .upstream
        .wait_for_messages(1, Duration::from_secs(20))
        .await;
    assert_eq!(first.len(), 1, "log:\n{}", relay.log());
    let delete = cli(&["queue", "delete", "--all"], &relay.config);
    assert!(delete.status.success(), "{delete:?}");
    let sent_by_then = world.upstream.messages().len();
    // three more would have gone within 6 s
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        world.upstream.messages().len(),
        sent_by_then,
        "a deleted message was sent; delete said {:?}\nlog:\n{}",
        String::from_utf8_lossy(&delete.stdout),
        relay.log()
    );
    assert!(relay.queue_json().is_empty());
}

// The delivery log has one line per recipient, Postfix-style, so "did bob
// get it?" is answered after the message left the queue.
#[tokio::test]
async fn the_log_has_a_line_per_recipient() {
    let world = World::start().await;
    world
        .upstream
        .push_rcpt_fault("carol@example.com", "550 5.1.1 User unknown");
    let port = free_port();
    let relay = Relay::start(&world.write_config(&world.config(port)), port).await;
    let body = b"Message-ID: <m1@app.test>\r\nSubject: three\r\n\r\nhi\r\n";
    let reply = send_one(
        port,
        MAILBOX,
        &["alice@example.com", "bob@example.com", "carol@example.com"],
        body,
    )
    .await;
    assert!(reply.starts_with("250"), "{reply}");
    relay.delivered(&world, 1).await;
    let mut log = plain(&relay.log());
    for _ in 0..100 {
        if log.matches(" to=").count() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        log = plain(&relay.log());
    }
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("message_id=<m1@app.test>") && l.contains(" to="))
        .collect();
    assert_eq!(lines.len(), 3, "{log}");
    for (to, status) in [
        ("alice@example.com", "status=sent"),
        ("bob@example.com", "status=sent"),
        ("carol@example.com", "status=bounced"),
    ] {
        let line = lines
            .iter()
            .find(|l| l.contains(&format!("to={to} ")))
            .unwrap_or_else(|| panic!("no line for {to}:\n{log}"));
        assert!(line.contains(status), "{line}");
        for key in [
            "queue_id=",
            "from=",
            "relay=localhost:",
            "delay=",
            "attempt=1",
            "reply=",
        ] {
            assert!(line.contains(key), "{key} missing: {line}");
        }
        assert!(!line.contains("hint=\"\""), "{line}");
    }
    assert!(lines
        .iter()
        .any(|l| l.contains("reply=550 5.1.1 User unknown")));
}

// A recipient still refused for now when the message reaches max_age is
// given up: logged as status=expired (not as an ordinary bounce).
#[tokio::test]
async fn expiry_is_logged_as_expired() {
    let world = World::start().await;
    for _ in 0..20 {
        world
            .upstream
            .push_rcpt_fault("late@example.com", "451 4.2.1 Mailbox busy, try later");
    }
    let port = free_port();
    let text = world
        .config(port)
        .replace("[queue]\n", "[queue]\nmax_age = \"1s\"\n");
    let relay = Relay::start(&world.write_config(&text), port).await;
    let reply = send_one(port, MAILBOX, &["late@example.com"], &message("late")).await;
    assert!(reply.starts_with("250"), "{reply}");
    let mut log = plain(&relay.log());
    for _ in 0..100 {
        if log.contains("status=expired") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        log = plain(&relay.log());
    }
    let line = log
        .lines()
        .find(|l| l.contains("status=expired"))
        .unwrap_or_else(|| panic!("no expiry logged:\n{log}"));
    assert!(line.contains("to=late@example.com"), "{line}");
    assert!(line.contains("reason=expired"), "{line}");
    assert!(line.contains("reply=gave up after 1s: 451 4.2.1"), "{line}");
    let entry = &relay.queue_json()[0];
    assert_eq!(entry["state"], "failed");
}

//! The relay binary end to end: app → listener → queue → delivery → the
//! stand-in Microsoft 365, over real loopback sockets.

mod common;

use common::*;
use std::time::Duration;

/// Waits (10 s at most) until the relay's queue is empty.
async fn queue_empties(relay: &Relay) {
    eventually(10, "the queue to empty", || relay.queue_json().is_empty()).await;
}

/// Waits (10 s at most) until the first queued message is deferred and
/// asserts its last error mentions `expected`; returns its entry.
async fn first_deferred(relay: &Relay, expected: &str) -> serde_json::Value {
    eventually(10, "a deferral", || {
        relay
            .queue_json()
            .first()
            .is_some_and(|e| e["state"] == "deferred")
    })
    .await;
    let entry = relay.queue_json()[0].clone();
    assert!(
        entry["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains(expected),
        "{entry}"
    );
    entry
}

#[tokio::test]
async fn relays_exact_bytes_with_envelope_over_xoauth2() {
    let world = World::start().await;
    let port = free_port();
    let relay = Relay::start(&world.write_config(&world.config(port)), port).await;
    // As sent on the wire (dot-stuffed) and as meant (what must arrive).
    let original = "From: relay@contoso.com\r\nSubject: transparency\r\n\r\n.starts with a dot\r\n..two dots\r\n.\r\nGrüße, 你好, ☃\r\n"
        .to_owned()
        + &"x".repeat(998)
        + "\r\n\r\n\r\nend\r\n";
    let stuffed = original.replace("\r\n.", "\r\n..");
    let reply = send_one(
        port,
        MAILBOX,
        &[
            "alice@example.com",
            "bob@example.net",
            "hidden-bcc@example.org",
        ],
        stuffed.as_bytes(),
    )
    .await;
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    let got = relay.delivered(&world, 1).await;
    assert_eq!(
        got[0].data,
        original.as_bytes(),
        "message bytes changed in transit"
    );
    assert_eq!(got[0].mail_from, MAILBOX);
    assert_eq!(
        got[0].rcpt_to,
        [
            "alice@example.com",
            "bob@example.net",
            "hidden-bcc@example.org"
        ]
    );
    assert_eq!(got[0].auth_user, MAILBOX);
    assert!(got[0]
        .token_claims
        .roles
        .contains(&"SMTP.SendAsApp".to_owned()));
    queue_empties(&relay).await;
}

#[tokio::test]
async fn sigkill_and_restart_lose_nothing_and_duplicate_nothing() {
    let world = World::start().await;
    let port = free_port();
    let config = world.write_config(&world.config(port));
    let mut relay = Relay::start(&config, port).await;
    world.upstream.stop().await;
    let bodies: Vec<Vec<u8>> = (0..3).map(|i| message(&format!("crash {i}"))).collect();
    for body in &bodies {
        let reply = send_one(port, MAILBOX, &["alice@example.com"], body).await;
        assert!(reply.starts_with("250"), "{reply}");
    }
    relay.kill9();
    world.upstream.restart().await.expect("upstream back");
    let relay = Relay::start(&config, port).await;
    let got = world
        .upstream
        .wait_for_messages(3, Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await; // room for a wrong duplicate
    let got_after = world.upstream.messages();
    assert_eq!(got.len(), 3, "log:\n{}", relay.log());
    assert_eq!(got_after.len(), 3, "a message was delivered twice");
    for body in &bodies {
        assert_eq!(got_after.iter().filter(|m| &m.data == body).count(), 1);
    }
    queue_empties(&relay).await;
}

#[tokio::test]
async fn permanent_refusal_fails_once_and_stays_visible() {
    let world = World::start().await;
    let port = free_port();
    let relay = Relay::start(&world.write_config(&world.config(port)), port).await;
    let reply = send_one(
        port,
        "stranger@contoso.com",
        &["alice@example.com"],
        &message("not allowed"),
    )
    .await;
    assert!(reply.starts_with("250"), "{reply}");
    eventually(20, "the upstream to refuse it", || {
        world.upstream.rejected().len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await; // several retry intervals
    assert_eq!(
        world.upstream.rejected().len(),
        1,
        "a permanent failure was retried"
    );
    let queue = relay.queue_json();
    assert_eq!(queue.len(), 1);
    assert_eq!(queue[0]["state"], "failed");
    assert_eq!(queue[0]["sender"], "stranger@contoso.com");
    assert_eq!(queue[0]["attempts"], 1);
    let last_error = queue[0]["last_error"].as_str().unwrap_or_default();
    assert!(
        last_error.starts_with("554 5.2.252 SendAsDenied;"),
        "{last_error}"
    );
    assert!(
        relay.log().contains("Send As"),
        "no remediation hint in the log"
    );
    // the readable table says the same
    let table = cli(&["queue", "list"], &relay.config);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("failed") && table.contains("5.2.252"),
        "{table}"
    );
}

#[tokio::test]
async fn outage_defers_and_retries_until_delivered() {
    let world = World::start().await;
    let port = free_port();
    let relay = Relay::start(&world.write_config(&world.config(port)), port).await;
    world.upstream.stop().await;
    let started = std::time::Instant::now();
    send_accepted(&relay, "queued").await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "accepting waited on the upstream"
    );
    let entry = first_deferred(&relay, "cannot connect").await;
    assert!(entry["next_attempt"].is_string());
    world.upstream.restart().await.expect("upstream back");
    relay.delivered(&world, 1).await;
    queue_empties(&relay).await;
}

#[tokio::test]
async fn tokens_renew_in_the_background_and_never_reach_the_log() {
    let world = World::start().await;
    // the shortest lifetime the relay plans with: renewed after 40 s
    world.idp.set_lifetime(60);
    let port = free_port();
    let relay = Relay::start(&world.write_config(&world.config(port)), port).await;
    send_one(port, MAILBOX, &["a@example.com"], &message("first")).await;
    world
        .upstream
        .wait_for_messages(1, Duration::from_secs(20))
        .await;
    let before = world.idp.grants("client_credentials");
    eventually(50, "a renewal while idle", || {
        world.idp.grants("client_credentials") > before
    })
    .await;
    send_one(port, MAILBOX, &["a@example.com"], &message("later")).await;
    relay.delivered(&world, 2).await;
    assert!(
        world.upstream.auth_failures().is_empty(),
        "{:?}",
        world.upstream.auth_failures()
    );
    // debug-level log: neither the secret nor any token appears
    let log = relay.log();
    assert!(log.contains("obtained access token"));
    assert!(
        !log.contains(world.idp.client_secret()),
        "the client secret was logged"
    );
    assert!(!log.contains("eyJ"), "a JWT was logged");
}

#[tokio::test]
async fn identity_errors_defer_mail_and_are_explained() {
    let world = World::start().await;
    let port = free_port();
    let config = world.config(port).replace(
        &format!("{}/secret", world.dir.path().display()),
        &format!("{}/wrong", world.dir.path().display()),
    );
    std::fs::write(
        world.dir.path().join("wrong"),
        "the-secret-id-not-its-value",
    )
    .expect("secret");
    let relay = Relay::start(&world.write_config(&config), port).await;
    send_accepted(&relay, "waits").await;
    first_deferred(&relay, "AADSTS7000215").await;
    let log = relay.log();
    assert!(
        log.contains("not its Secret ID"),
        "the log does not explain AADSTS7000215"
    );
    assert!(
        !log.contains("the-secret-id-not-its-value"),
        "the secret was logged"
    );
    // fixing the secret file needs no restart
    std::fs::write(world.dir.path().join("wrong"), world.idp.client_secret()).expect("secret");
    relay.delivered(&world, 1).await;
}

#[tokio::test]
async fn sigterm_exits_zero_and_keeps_the_queue() {
    let world = World::start().await;
    let port = free_port();
    let config = world.write_config(&world.config(port));
    let mut relay = Relay::start(&config, port).await;
    world.upstream.stop().await;
    send_one(port, MAILBOX, &["alice@example.com"], &message("kept")).await;
    // an idle session in flight gets a 421 and the process still exits cleanly
    let (mut idle, _) = Client::connect(port).await;
    assert_eq!(relay.terminate().await, Some(0));
    assert!(idle.reply().await.starts_with("421 4.3.2"));
    let out = cli(&["queue", "list", "--json"], &config);
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(entries.len(), 1);
}

#[tokio::test]
async fn clients_outside_allowed_networks_are_refused() {
    let world = World::start().await;
    let port = free_port();
    let config = world.config(port).replace(
        "hostname = \"relay.test\"",
        "hostname = \"relay.test\"\nallowed_networks = [\"10.0.0.0/8\"]",
    );
    let relay = Relay::start(&world.write_config(&config), port).await;
    let (mut c, greeting) = Client::connect(port).await;
    assert_eq!(
        greeting,
        "554 5.7.1 127.0.0.1 is not allowed to use this relay"
    );
    assert_eq!(c.reply().await, "<closed>");
    assert!(relay.queue_json().is_empty());
}

/// A tmpfs of `size` mounted (mode 0700) on `dir` for the test's lifetime;
/// `None` when mounting is not allowed (not root).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).expect("mount point");
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .ok()?;
        status.success().then(|| Tmpfs(dir.to_owned()))
    }

    /// Fills the file system up with one file; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut file = std::fs::File::create(&path).expect("filler");
        let chunk = vec![0u8; 64 * 1024];
        // bounded by the file system's size
        while file.write_all(&chunk).is_ok() {}
        let _ = file.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

// With the queue's disk full, an attempt's outcome may not be recordable
// (and a lease may not be takeable: both are writes to the store). A
// recipient already served must never get the message again; nothing is
// lost; once the disk has room, only the recipient left is tried again.
#[tokio::test]
async fn a_full_disk_does_not_resend_to_served_recipients() {
    let world = World::start().await;
    let port = free_port();
    let Some(disk) = Tmpfs::mount(&world.dir.path().join("queue"), "4m") else {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let text = world.config(port).replace(
        "retry_initial = \"300ms\"\nretry_max = \"1s\"\n",
        "retry_initial = \"2s\"\nretry_max = \"2s\"\n",
    );
    world
        .upstream
        .push_rcpt_fault("bob@example.com", "451 4.2.1 Mailbox busy, try later");
    world
        .upstream
        .push_rcpt_fault("bob@example.com", "451 4.2.1 Mailbox busy, try later");
    let relay = Relay::start(&world.write_config(&text), port).await;
    let reply = send_one(
        port,
        MAILBOX,
        &["alice@example.com", "bob@example.com"],
        &message("disk full"),
    )
    .await;
    assert!(reply.starts_with("250"), "{reply}");
    let got = world
        .upstream
        .wait_for_messages(1, Duration::from_secs(10))
        .await;
    assert_eq!(got.len(), 1, "log:\n{}", relay.log());
    assert_eq!(got[0].rcpt_to, ["alice@example.com"]);
    let filler = disk.fill();

    // retries are due every 2 s: three chances to resend to alice
    tokio::time::sleep(Duration::from_secs(7)).await;
    let to_alice = |world: &World| {
        world
            .upstream
            .messages()
            .iter()
            .filter(|m| m.rcpt_to.iter().any(|r| r == "alice@example.com"))
            .count()
    };
    assert_eq!(
        to_alice(&world),
        1,
        "alice was sent the message again:\n{}",
        relay.log()
    );
    std::fs::remove_file(&filler).expect("free the disk");
    eventually(30, "bob served", || {
        world
            .upstream
            .messages()
            .iter()
            .any(|m| m.rcpt_to == ["bob@example.com"])
    })
    .await;
    queue_empties(&relay).await;
    assert_eq!(to_alice(&world), 1, "log:\n{}", relay.log());
}

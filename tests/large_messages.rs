//! Messages larger than the listener's spool threshold (256 KiB) are
//! written to the queue's disk while they arrive: delivered byte for byte,
//! nothing left behind by a session that breaks off, and a spool that
//! cannot be written answers 451 after the end of data.

mod common;

use common::*;

/// A 3 MB message with lines that need dot-stuffing, as meant and as sent.
fn large() -> (Vec<u8>, Vec<u8>) {
    let mut original =
        format!("From: {MAILBOX}\r\nTo: alice@example.com\r\nSubject: large\r\n\r\n");
    let mut i = 0;
    while original.len() < 3_000_000 {
        original.push_str(&format!(
            ".line {i} starts with a dot, Grüße\r\n{}\r\n",
            "x".repeat(i % 990)
        ));
        i += 1;
    }
    let stuffed = original.replace("\r\n.", "\r\n..");
    (original.into_bytes(), stuffed.into_bytes())
}

/// Spool files the relay holds open: they have no name (nothing is left
/// behind by a crash), so they are found through the process's open files.
fn tmp_files(world: &World, relay: &Relay) -> usize {
    let named = std::fs::read_dir(world.dir.path().join("queue/tmp"))
        .map(|d| d.count())
        .unwrap_or(0);
    let spool = world.dir.path().join("queue/tmp");
    let open = std::fs::read_dir(format!("/proc/{}/fd", relay.child.id()))
        .map(|fds| {
            fds.flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter(|target| target.starts_with(&spool))
                .count()
        })
        .unwrap_or(0);
    named + open
}

#[tokio::test]
async fn a_spooled_message_arrives_byte_for_byte() {
    let world = World::start().await;
    let port = free_port();
    let relay = Relay::start(&world.write_config(&world.config(port)), port).await;
    let (original, stuffed) = large();
    let reply = send_one(port, MAILBOX, &["alice@example.com"], &stuffed).await;
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    let got = relay.delivered(&world, 1).await;
    assert!(got[0].data == original, "message bytes changed in transit");
    assert_eq!(tmp_files(&world, &relay), 0);
}

#[tokio::test]
async fn a_broken_off_session_leaves_no_spool_file() {
    let world = World::start().await;
    let port = free_port();
    let relay = Relay::start(&world.write_config(&world.config(port)), port).await;
    let (_, stuffed) = large();
    let (mut c, _) = Client::connect(port).await;
    assert!(c.send(b"EHLO app.test\r\n").await.starts_with("250"));
    assert!(c
        .send(format!("MAIL FROM:<{MAILBOX}>\r\n").as_bytes())
        .await
        .starts_with("250"));
    assert!(c
        .send(b"RCPT TO:<alice@example.com>\r\n")
        .await
        .starts_with("250"));
    assert!(c.send(b"DATA\r\n").await.starts_with("354"));
    c.write_part(&stuffed[..1_500_000]).await;
    eventually(10, "the message in progress spooled", || {
        tmp_files(&world, &relay) == 1
    })
    .await;
    drop(c);
    eventually(10, "the spool file deleted", || {
        tmp_files(&world, &relay) == 0
    })
    .await;
    assert!(relay.queue_json().is_empty());
    assert!(world.upstream.messages().is_empty());
}

#[tokio::test]
async fn a_spool_that_cannot_be_written_answers_451() {
    let world = World::start().await;
    let port = free_port();
    let relay = Relay::start(&world.write_config(&world.config(port)), port).await;
    eventually(10, "the queue opened", || {
        plain(&relay.log()).contains("queue opened")
    })
    .await;
    // the queue's tmp directory replaced by a file: nothing can be spooled
    let tmp = world.dir.path().join("queue/tmp");
    std::fs::rename(&tmp, world.dir.path().join("tmp.away")).expect("move tmp away");
    std::fs::write(&tmp, b"").expect("a file in its place");
    let (_, stuffed) = large();
    let (mut c, _) = Client::connect(port).await;
    assert!(c.send(b"EHLO app.test\r\n").await.starts_with("250"));
    let reply = c.mail(MAILBOX, &["alice@example.com"], &stuffed).await;
    assert!(reply.starts_with("451 4.3.0"), "{reply}\n{}", relay.log());
    assert!(plain(&relay.log()).contains("cannot spool a large message"));
    // the session stays in step: the next command gets its own answer
    assert!(c.send(b"NOOP\r\n").await.starts_with("250"));
    assert!(c.send(b"QUIT\r\n").await.starts_with("221"));
}

//! A body changed in the store is never delivered (the message is held);
//! a world-writable queue directory is made private. Against the real
//! binary. (Corrupt entries of an old queue directory are set aside at its
//! import: crates/queue/tests/queue.rs.)

mod common;

use common::*;
use std::path::Path;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[tokio::test]
async fn a_body_changed_in_the_store_is_held_and_the_relay_goes_on() {
    let world = World::start().await;
    let port = free_port();
    let config = world.write_config(&world.config(port));
    let queue = world.dir.path().join("queue");

    // two messages queued while the upstream is down
    let mut relay = Relay::start(&config, port).await;
    world.upstream.stop().await;
    send_accepted(&relay, "tampered").await;
    send_accepted(&relay, "intact").await;
    eventually(20, "both queued", || relay.queue_json().len() == 2).await;
    assert_eq!(relay.terminate().await, Some(0));
    let entries = relay.queue_json();
    let tampered = entries[0]["id"].as_str().unwrap_or_default().to_owned();

    // same size, other bytes: only the checksum tells
    let db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        queue.join("queue.sqlite").display()
    ))
    .await
    .expect("open the store");
    let original: Vec<u8> = sqlx::query_scalar("SELECT body FROM bodies WHERE message_id = $1")
        .bind(&tampered)
        .fetch_one(&db)
        .await
        .expect("body");
    let garbage: Vec<u8> = original.iter().map(|b| b ^ 0x20).collect();
    sqlx::query("UPDATE bodies SET body = $1 WHERE message_id = $2")
        .bind(&garbage)
        .bind(&tampered)
        .execute(&db)
        .await
        .expect("overwrite");
    db.close().await;

    // the relay delivers the intact one and never the tampered one, which
    // it holds for the administrator
    world.upstream.restart().await.expect("upstream back");
    let relay = Relay::start(&config, port).await;
    let got = relay.delivered(&world, 1).await;
    assert!(String::from_utf8_lossy(&got[0].data).contains("Subject: intact"));
    eventually(10, "the tampered message held", || {
        plain(&relay.log()).contains("message body changed in the store")
    })
    .await;
    eventually(10, "only the held one left", || {
        let q = relay.queue_json();
        q.len() == 1 && q[0]["held"] == true && q[0]["id"] == tampered.as_str()
    })
    .await;
    let out = cli(&["queue", "show", "--body", &tampered], &config);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("checksum"), "{}", stderr(&out));

    // and it goes on working
    send_accepted(&relay, "after").await;
    relay.delivered(&world, 2).await;
    assert_eq!(
        world.upstream.messages().len(),
        2,
        "the tampered body went out"
    );
}

#[cfg(unix)]
#[tokio::test]
async fn a_world_writable_queue_directory_is_made_private() {
    use std::os::unix::fs::PermissionsExt;
    let world = World::start().await;
    let port = free_port();
    let config = world.write_config(&world.config(port));
    let queue = world.dir.path().join("queue");
    std::fs::create_dir(&queue).expect("mkdir");
    std::fs::set_permissions(&queue, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let relay = Relay::start(&config, port).await;
    assert_eq!(mode(&queue), 0o700);
    let log = plain(&relay.log());
    assert!(
        log.contains("queue directory is writable by others; setting its mode to 0700"),
        "{log}"
    );
    send_accepted(&relay, "private").await;
    relay.delivered(&world, 1).await;
}

//! Corrupt or unreadable queue entries are set aside, never fatal; a body
//! changed on disk is never delivered; a world-writable queue directory is
//! made private. Against the real binary.

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
async fn bad_entries_are_set_aside_and_the_relay_goes_on() {
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
    let body = queue.join("body").join(&tampered);
    let original = std::fs::read(&body).expect("body");
    let garbage: Vec<u8> = original.iter().map(|b| b ^ 0x20).collect();
    std::fs::write(&body, &garbage).expect("overwrite");
    // a metadata entry that is a directory, and one that is garbage
    std::fs::create_dir(queue.join("meta/0000000000000EEE.json")).expect("mkdir");
    std::fs::write(queue.join("meta/0000000000000CCC.json"), b"\0garbage").expect("write");

    // `queue list` lists what it can and names the rest
    let out = cli(&["queue", "list"], &config);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("2 message(s)"), "{table}");
    for bad in ["0000000000000EEE", "0000000000000CCC"] {
        assert!(
            stderr(&out).contains(&format!("queue entry {bad} is corrupt")),
            "{}",
            stderr(&out)
        );
        assert!(table.contains(&format!("{bad}  corrupt")), "{table}");
    }
    let out = cli(&["queue", "list", "--json"], &config);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // the relay starts regardless, sets them aside, delivers the intact one
    // and never the tampered one
    world.upstream.restart().await.expect("upstream back");
    let relay = Relay::start(&config, port).await;
    let got = relay.delivered(&world, 1).await;
    assert!(String::from_utf8_lossy(&got[0].data).contains("Subject: intact"));
    eventually(10, "the tampered message set aside", || {
        plain(&relay.log()).contains("message body changed on disk")
    })
    .await;
    let log = plain(&relay.log());
    assert!(
        log.contains("0000000000000EEE.json") && log.contains("corrupt queue entry set aside"),
        "{log}"
    );
    assert!(relay.queue_json().is_empty());
    let out = cli(&["queue", "list"], &config);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains(&format!("{tampered}  corrupt")) && table.contains("SHA-256"),
        "{table}"
    );
    assert!(queue
        .join("corrupt")
        .join(format!("{tampered}.body"))
        .exists());

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

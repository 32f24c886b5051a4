//! The queue verbs an admin knows from Postfix: hold and release, show
//! --body, plain errors for unknown ids, list before the first run.

mod common;

use common::*;
use std::time::Duration;

fn text(out: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// Before the first `run` there is no queue directory: an empty queue.
#[tokio::test]
async fn list_before_the_first_run_is_empty() {
    let world = World::start().await;
    let config = world.write_config(&world.config(free_port()));
    assert!(!world.dir.path().join("queue").exists());
    let out = cli(&["queue", "list"], &config);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(stdout, "The queue is empty.\n");
    let out = cli(&["queue", "list", "--json"], &config);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out).0.trim(), "[]");
    assert!(!world.dir.path().join("queue").exists(), "list created it");
}

// Each verb given an id that is not queued says so and exits 1, whether or
// not the relay runs.
#[tokio::test]
async fn unknown_ids_are_named() {
    let world = World::start().await;
    let port = free_port();
    let config = world.write_config(&world.config(port));
    let unknown = "0000000000000001";
    let verbs: [&[&str]; 6] = [
        &["queue", "show", unknown],
        &["queue", "show", "--body", unknown],
        &["queue", "delete", unknown],
        &["queue", "retry", unknown],
        &["queue", "hold", unknown],
        &["queue", "release", unknown],
    ];
    let check = |when: &str| {
        for args in verbs {
            let out = cli(args, &config);
            let (stdout, stderr) = text(&out);
            assert_eq!(
                out.status.code(),
                Some(1),
                "{when} {args:?}: {stdout}{stderr}"
            );
            assert_eq!(
                stderr,
                format!("error: no such message: {unknown}\n"),
                "{when} {args:?}"
            );
        }
    };
    check("without a relay");
    let _relay = Relay::start(&config, port).await;
    check("with the relay running");
}

// A held message is not delivered until released, across a restart; hold
// and release work with and without the relay; `queue list` shows it as
// held, with size and age; `show --body` prints the message.
#[tokio::test]
async fn hold_and_release() {
    let world = World::start().await;
    let port = free_port();
    let config = world.write_config(&world.config(port));
    let mut relay = Relay::start(&config, port).await;
    world.upstream.stop().await;
    send_accepted(&relay, "kept").await;
    send_accepted(&relay, "sent").await;
    eventually(20, "both deferred", || {
        let q = relay.queue_json();
        q.len() == 2 && q.iter().all(|e| e["state"] == "deferred")
    })
    .await;
    let queue = relay.queue_json();
    let kept = queue[0]["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(queue[0]["held"], false);

    let out = cli(&["queue", "hold", &kept], &config);
    assert_eq!(
        text(&out).0,
        format!("1 message(s) held: {kept}\n"),
        "{out:?}"
    );
    let out = cli(&["queue", "show", "--body", &kept], &config);
    assert_eq!(out.stdout, message("kept"), "{out:?}");

    // an attempt begun before the hold (against the stopped upstream) ends
    // at once; one leased but not begun is not sent
    tokio::time::sleep(Duration::from_millis(1500)).await;
    world.upstream.restart().await.expect("upstream back");
    let got = relay.delivered(&world, 1).await;
    assert!(String::from_utf8_lossy(&got[0].data).contains("Subject: sent"));
    // the upstream has it a moment before the relay records it
    eventually(10, "the sent message recorded", || {
        relay.queue_json().len() == 1
    })
    .await;
    let queue = relay.queue_json();
    assert_eq!(queue[0]["held"], true);
    assert_eq!(queue[0]["state"], "deferred", "existing fields unchanged");
    let (table, _) = text(&cli(&["queue", "list"], &config));
    assert!(
        table.contains("SIZE") && table.contains("AGE") && table.contains(" held "),
        "{table}"
    );
    let size = message("kept").len().to_string();
    assert!(table.contains(&size), "{table}");

    // without the relay: release and hold again, then a restart
    assert_eq!(relay.terminate().await, Some(0));
    let out = cli(&["queue", "release", "--all"], &config);
    assert_eq!(
        text(&out).0,
        format!("1 message(s) released: {kept}\n"),
        "{out:?}"
    );
    let out = cli(&["queue", "hold", "--all"], &config);
    assert_eq!(
        text(&out).0,
        format!("1 message(s) held: {kept}\n"),
        "{out:?}"
    );
    let relay = Relay::start(&config, port).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(world.upstream.messages().len(), 1, "held message sent");

    let out = cli(&["queue", "release", &kept], &config);
    assert_eq!(
        text(&out).0,
        format!("1 message(s) released: {kept}\n"),
        "{out:?}"
    );
    let got = relay.delivered(&world, 2).await;
    assert!(String::from_utf8_lossy(&got[1].data).contains("Subject: kept"));
    eventually(10, "an empty queue", || relay.queue_json().is_empty()).await;
}

//! Two relays sharing one database deliver through one stand-in Microsoft
//! 365 submission server: together they never hold more than the mailbox's
//! `max_connections` sessions, on PostgreSQL (when installed) and on an
//! SQLite file.

mod common;

use common::{Relay, Setup, LIMIT, MAILBOX};
use relay_store::Store;
use relay_testkit::SharedDatabase;
use std::time::{Duration, SystemTime};

fn setup(shared: Store) -> Setup {
    Setup {
        max_connections: 3,
        // idle sessions (and their slots) go soon, so the other relay's
        // workers get their turn within the test's wait
        idle_timeout: "300ms",
        shared: Some(shared),
        ..Setup::default()
    }
}

// Protects Microsoft's per-mailbox connection limit across relays: two
// relays with 3 workers each, both loaded, never more than 3 sessions at
// once together; every message exactly once; every slot given back.
#[tokio::test]
async fn two_relays_never_exceed_max_connections_together() {
    for database in SharedDatabase::all() {
        let a = Relay::start(setup(database.relay("a").await)).await;
        let b = Relay::start(Setup {
            kit: Some((a.idp.clone(), a.server.clone())),
            ..setup(database.relay("b").await)
        })
        .await;
        let mut bodies = Vec::new();
        for n in 0..15 {
            for (name, relay) in [("a", &a), ("b", &b)] {
                let body = format!("Subject: {name} {n}\r\n\r\nbody {n}\r\n").into_bytes();
                relay.enqueue(MAILBOX, &["a@example.com"], &body).await;
                bodies.push(body);
            }
        }
        let mut received: Vec<Vec<u8>> = a
            .server
            .wait_for_messages(bodies.len(), 3 * LIMIT)
            .await
            .into_iter()
            .map(|m| m.data)
            .collect();
        a.wait_until_empty().await;
        b.wait_until_empty().await;
        received.sort();
        bodies.sort();
        assert_eq!(received, bodies, "each message exactly once");
        assert!(
            a.server.max_concurrent() <= 3,
            "max_concurrent = {} on {}",
            a.server.max_concurrent(),
            database.name()
        );
        a.shutdown().await;
        b.shutdown().await;
        // the workers gave their slots back: all three are free
        let check = database.relay("check").await;
        for n in 0..3 {
            let slot = check
                .acquire_slot("main", 3, SystemTime::now(), Duration::from_secs(60))
                .await
                .expect("the store answers");
            assert!(slot.is_some(), "slot {n} still held after shutdown");
        }
    }
}

//! Two relays sharing one database deliver through one stand-in Microsoft
//! 365 submission server: together they never hold more than the mailbox's
//! `max_connections` sessions, and a throttle one is given holds back the
//! other, on PostgreSQL (when installed) and on an SQLite file.

mod common;

use common::{eventually, Relay, Setup, LIMIT, MAILBOX};
use relay_store::{Pace, PaceLimits, SlotId, Store};
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

// Protects the mail of relays that can send from one that cannot: while
// another relay holds every slot, this relay's workers give the message
// they leased back (unleased, due) instead of keeping it; once a slot is
// free, it goes out.
#[tokio::test]
async fn a_relay_without_a_slot_gives_its_mail_back() {
    for database in SharedDatabase::all() {
        let relay = Relay::start(setup(database.relay("b").await)).await;
        let other = database.relay("other").await;
        let held = take_free_slots(&other).await;
        let id = relay
            .enqueue(MAILBOX, &["a@example.com"], b"Subject: waits\r\n\r\nx\r\n")
            .await
            .to_string();
        let lease = |entries: Vec<relay_queue::Entry>| {
            entries
                .into_iter()
                .find(|e| e.id == id)
                .map(|e| e.lease)
                .expect("still queued")
        };
        // Each worker leases it once, finds no slot and gives it back;
        // then every worker waits for a slot and no one holds the message.
        // Between one worker's giving back and the next one's lease it is
        // free for a moment: it has settled once it stays free for 300 ms.
        let deadline = tokio::time::Instant::now() + LIMIT;
        let mut free_for = 0;
        while free_for < 6 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "still leased on {}",
                database.name()
            );
            free_for = match lease(relay.entries().await) {
                Some(_) => 0,
                None => free_for + 1,
            };
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(lease(relay.entries().await), None, "{}", database.name());
        }
        assert!(relay.server.messages().is_empty());
        for slot in held {
            other.release_slot(slot).await.expect("the store answers");
        }
        relay.delivered(1).await;
        relay.wait_until_empty().await;
        relay.shutdown().await;
    }
}

/// Takes every slot of the mailbox's 3 the store grants now.
async fn take_free_slots(store: &Store) -> Vec<SlotId> {
    let mut taken = Vec::new();
    while let Some(slot) = store
        .acquire_slot("main", 3, SystemTime::now(), Duration::from_secs(60))
        .await
        .expect("the store answers")
    {
        taken.push(slot);
        assert!(taken.len() <= 3, "past the cap");
    }
    taken
}

/// Free slots of the mailbox's 3 as the store grants them now (taken and
/// given back at once).
async fn free_slots(store: &Store) -> usize {
    let taken = take_free_slots(store).await;
    let free = taken.len();
    for slot in taken {
        store.release_slot(slot).await.expect("the store answers");
    }
    free
}

// Protects a throttled mailbox from the relays that were not told: after
// relay a gets `432 4.3.2`, every relay has one slot fewer; after a gets
// `554 5.2.2` (submission quota), relay b sends nothing either.
#[tokio::test]
async fn a_throttle_told_to_one_relay_holds_back_the_other() {
    for database in SharedDatabase::all() {
        let name = database.name();
        let check = database.relay("check").await;
        let a = Relay::start(setup(database.relay("a").await)).await;
        a.server
            .push_data_fault("432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded");
        a.enqueue(MAILBOX, &["a@example.com"], b"Subject: 1\r\n\r\none\r\n")
            .await;
        assert!(eventually(LIMIT, || a.server.rejected().len() == 1).await);
        // a's sessions close once idle and give their slots back: then two
        // are free, never three.
        let mut free = 0;
        for _ in 0..100 {
            free = free_slots(&check).await;
            assert!(free <= 2, "{name}: {free} slots free after a 432");
            if free == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(free, 2, "{name}: a's slots never came back");
        let sent = |subject: &str| {
            let subject = format!("Subject: {subject}\r\n");
            a.server
                .messages()
                .iter()
                .any(|m| m.data.starts_with(subject.as_bytes()))
        };
        assert!(eventually(LIMIT, || sent("1")).await, "{name}: retried");

        a.server
            .push_data_fault("554 5.2.2 Submission quota exceeded");
        a.enqueue(MAILBOX, &["a@example.com"], b"Subject: 2\r\n\r\ntwo\r\n")
            .await;
        assert!(eventually(LIMIT, || a.server.rejected().len() == 2).await);
        let b = Relay::start(Setup {
            kit: Some((a.idp.clone(), a.server.clone())),
            ..setup(database.relay("b").await)
        })
        .await;
        b.enqueue(MAILBOX, &["a@example.com"], b"Subject: 3\r\n\r\nthree\r\n")
            .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!sent("3"), "{name}: b sent while paused");
        let limits = PaceLimits {
            messages_per_minute: None,
            recipients_per_day: None,
        };
        let now = SystemTime::now();
        match check.pace("main", now, limits, 1).await.expect("pace") {
            Pace::WaitUntil(until) => assert!(
                until > now + Duration::from_secs(50 * 60),
                "{name}: paused only until {until:?}"
            ),
            Pace::Go => panic!("{name}: the mailbox is not paused"),
        }
        a.shutdown().await;
        b.shutdown().await;
    }
}

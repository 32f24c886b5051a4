//! The store against both engines: each test runs on SQLite in a temporary
//! directory and on a PostgreSQL server the test starts itself.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use relay_store::{
    Admitted, Body, Envelope, LeaseHolder, Location, Message, MessageState, NewMessage, Pace,
    PaceLimits, Progress, Recipient, RecipientState, Redeem, Reply, Secret, Store, StoreError,
    StoreSettings, SCHEMA_VERSION,
};
use relay_testkit::Postgres;

/// One engine's database; opens any number of handles ("relays") on it.
enum Engine {
    Sqlite(tempfile::TempDir),
    Postgres(Postgres),
}

impl Engine {
    /// SQLite, and PostgreSQL when installed.
    fn all() -> Vec<Engine> {
        let mut engines = vec![Engine::Sqlite(tempfile::tempdir().expect("tempdir"))];
        engines.extend(Postgres::start().map(Engine::Postgres));
        engines
    }

    fn name(&self) -> &'static str {
        match self {
            Engine::Sqlite(_) => "sqlite",
            Engine::Postgres(_) => "postgres",
        }
    }

    fn location(&self) -> Location {
        match self {
            Engine::Sqlite(dir) => Location::Sqlite(dir.path().to_path_buf()),
            Engine::Postgres(pg) => Location::Postgres {
                url: pg.url().into(),
                password: Some(Secret::new(
                    std::fs::read_to_string(pg.password_file()).expect("password"),
                )),
            },
        }
    }

    async fn try_open(&self, relay: &str) -> Result<Store, StoreError> {
        Store::open(StoreSettings {
            location: self.location(),
            relay: relay.to_string(),
            max_connections: 8,
        })
        .await
    }

    async fn open(&self, relay: &str) -> Store {
        self.try_open(relay).await.expect("open the store")
    }
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
}

const LEASE: Duration = Duration::from_secs(60);

/// Every stored message, in id order.
async fn all(store: &Store) -> Vec<Message> {
    store.list_after(None, None, u32::MAX).await.expect("list")
}

/// A pass over the stored messages (of `state` only, if given), `limit`
/// a page: the pages, in order.
async fn pass(store: &Store, state: Option<MessageState>, limit: u32) -> Vec<Vec<Message>> {
    let (mut pages, mut after) = (Vec::new(), None::<String>);
    loop {
        let page = store
            .list_after(after.as_deref(), state, limit)
            .await
            .expect("page");
        let Some(last) = page.last() else {
            return pages;
        };
        after = Some(last.envelope.id.clone());
        pages.push(page);
    }
}

fn message(id: &str, account: &str, body: &[u8]) -> NewMessage {
    let recipients = vec!["a@example.com".to_string(), "b@example.com".to_string()];
    NewMessage {
        envelope: Envelope {
            id: id.to_string(),
            account: account.to_string(),
            sender: "app@contoso.com".to_string(),
            client: Some("127.0.0.1".to_string()),
            received_at: at(0),
            passthrough: false,
        },
        progress: Progress::new(&recipients, at(0)),
        held: false,
        lease: None,
        body: Body::Bytes(body.to_vec()),
    }
}

/// The same message again (a body in memory).
fn again(m: &NewMessage) -> NewMessage {
    let Body::Bytes(body) = &m.body else {
        panic!("a spooled body cannot be copied")
    };
    NewMessage {
        envelope: m.envelope.clone(),
        progress: m.progress.clone(),
        held: m.held,
        lease: m.lease.clone(),
        body: Body::Bytes(body.clone()),
    }
}

#[tokio::test]
async fn insert_lease_record_delete() {
    for engine in Engine::all() {
        let name = engine.name();
        let store = engine.open("relay-a").await;
        let new = message(
            "0000000000000001",
            "box@contoso.com",
            b"Subject: hi\r\n\r\nbody\r\n",
        );
        store.insert(again(&new)).await.expect("insert");
        assert_eq!(
            store.due().await.expect("due"),
            vec![("box@contoso.com".to_string(), at(0))],
            "{name}"
        );
        // Held: not handed out until released.
        let id = new.envelope.id.as_str();
        assert_eq!(store.set_held(&[id], true).await.expect("hold"), [id]);
        assert!(store
            .lease_next("box@contoso.com", at(1), LEASE)
            .await
            .expect("lease")
            .is_none());
        assert_eq!(store.set_held(&[id], false).await.expect("release"), [id]);
        assert!(store
            .set_held(&["0000000000000BAD"], true)
            .await
            .expect("hold")
            .is_empty());

        let leased = store
            .lease_next("box@contoso.com", at(1), LEASE)
            .await
            .expect("lease")
            .expect("a due message");
        assert_eq!(leased.envelope, new.envelope, "{name}");
        assert_eq!(leased.progress, new.progress, "{name}");
        assert_eq!(leased.size, new.body.len(), "{name}");
        assert_eq!(
            leased.lease.as_ref().map(|l| l.relay.as_str()),
            Some("relay-a")
        );
        assert_eq!(
            store.body(&new.envelope.id).await.expect("body"),
            Some(b"Subject: hi\r\n\r\nbody\r\n".to_vec())
        );
        assert!(store
            .lease_next("box@contoso.com", at(1), LEASE)
            .await
            .expect("lease")
            .is_none());

        let progress = Progress {
            state: MessageState::Deferred,
            attempts: 1,
            next_attempt: Some(at(300)),
            last_error: Some("451 4.3.2 slow down".to_string()),
            recipients: vec![
                Recipient {
                    address: "a@example.com".to_string(),
                    state: RecipientState::Delivered,
                    reply: Some(Reply {
                        code: 250,
                        enhanced: Some("2.0.0".to_string()),
                        text: "250 2.0.0 OK".to_string(),
                    }),
                    reason: Some("delivered".to_string()),
                },
                Recipient {
                    address: "b@example.com".to_string(),
                    state: RecipientState::Deferred,
                    reply: Some(Reply {
                        code: 451,
                        enhanced: Some("4.3.2".to_string()),
                        text: "451 4.3.2 slow down".to_string(),
                    }),
                    reason: Some("throttled".to_string()),
                },
            ],
        };
        assert!(store
            .record("0000000000000001", &progress)
            .await
            .expect("record"));
        let stored = store
            .get("0000000000000001")
            .await
            .expect("get")
            .expect("kept");
        assert_eq!(stored.progress, progress, "{name}");
        assert_eq!(stored.lease, None, "{name}");
        assert!(store
            .lease_next("box@contoso.com", at(299), LEASE)
            .await
            .expect("lease")
            .is_none());
        assert!(store
            .lease_next("box@contoso.com", at(300), LEASE)
            .await
            .expect("lease")
            .is_some());

        assert_eq!(
            store.delete(&["0000000000000001"]).await.expect("delete"),
            ["0000000000000001"]
        );
        assert!(all(&store).await.is_empty(), "{name}");
        assert_eq!(store.body("0000000000000001").await.expect("body"), None);
        assert!(store
            .delete(&["0000000000000001"])
            .await
            .expect("delete")
            .is_empty());
    }
}

// An administrator's retry makes a message due at once, on both engines;
// an id that is not there is not reported.
#[tokio::test]
async fn retry_makes_messages_due_and_names_those_found() {
    for engine in Engine::all() {
        let name = engine.name();
        let store = engine.open("relay-a").await;
        let mut later = message("0000000000000001", "box", b"x");
        later.progress.next_attempt = Some(at(3600));
        store.insert(later).await.expect("insert");
        assert!(store
            .lease_next("box", at(10), LEASE)
            .await
            .expect("lease")
            .is_none());
        let found = store
            .retry(&["0000000000000001", "0000000000000BAD"], at(10))
            .await
            .expect("retry");
        assert_eq!(found, ["0000000000000001"], "{name}");
        let leased = store.lease_next("box", at(10), LEASE).await.expect("lease");
        assert!(leased.is_some(), "{name}: due after the retry");
    }
}

// A pass over the failed messages alone reads their pages only, in id
// order: the others are left in the database, not filtered afterwards.
#[tokio::test]
async fn pages_of_one_state_hold_that_state_only() {
    for engine in Engine::all() {
        let name = engine.name();
        let store = engine.open("relay-a").await;
        for i in 1..=5 {
            let mut m = message(&format!("{i:016X}"), "box", b"x");
            if i % 2 == 0 {
                m.progress.state = MessageState::Failed;
            }
            store.insert(m).await.expect("insert");
        }
        let pages: Vec<Vec<String>> = pass(&store, Some(MessageState::Failed), 1)
            .await
            .into_iter()
            .map(|page| page.into_iter().map(|m| m.envelope.id).collect())
            .collect();
        assert_eq!(
            pages,
            [["0000000000000002"], ["0000000000000004"]],
            "{name}"
        );
    }
}

// A pass over the queue a page at a time sees every message once, in id
// order, each with all its recipients.
#[tokio::test]
async fn pages_cover_the_queue_in_id_order() {
    for engine in Engine::all() {
        let name = engine.name();
        let store = engine.open("relay-a").await;
        for i in [5, 1, 4, 2, 3] {
            store
                .insert(message(&format!("{i:016X}"), "box", b"x"))
                .await
                .expect("insert");
        }
        let (mut seen, mut pages) = (Vec::new(), 0);
        for page in pass(&store, None, 2).await {
            pages += 1;
            for m in page {
                assert_eq!(m.progress.recipients.len(), 2, "{name}");
                seen.push(m.envelope.id);
            }
        }
        let all: Vec<String> = (1..=5).map(|i| format!("{i:016X}")).collect();
        assert_eq!(seen, all, "{name}");
        assert_eq!(pages, 3, "{name}");
    }
}

#[tokio::test]
async fn concurrent_inserts_share_commits() {
    for engine in Engine::all() {
        let store = engine.open("relay-a").await;
        let inserts: Vec<_> = (0..64)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .insert(message(&format!("{i:016X}"), "box", b"x"))
                        .await
                })
            })
            .collect();
        for insert in inserts {
            insert.await.expect("task").expect("insert");
        }
        assert_eq!(all(&store).await.len(), 64, "{}", engine.name());
        let commits = store.group_commits();
        assert!(
            commits < 64,
            "{}: 64 concurrent inserts took {commits} commits",
            engine.name()
        );
        // A duplicate fails alone, not its batch.
        let again = store.insert(message("0000000000000000", "box", b"x"));
        let fresh = store.insert(message("00000000000000FF", "box", b"x"));
        let (again, fresh) = tokio::join!(again, fresh);
        assert!(again.is_err(), "{}", engine.name());
        fresh.expect("a fresh id in the same batch is stored");
    }
}

#[tokio::test]
async fn two_relays_never_hold_one_lease_and_expired_leases_are_taken_over() {
    for engine in Engine::all() {
        let name = engine.name();
        let a = engine.open("relay-a").await;
        let b = engine.open("relay-b").await;
        for i in 0..20 {
            a.insert(message(&format!("{i:016X}"), "box", b"x"))
                .await
                .expect("insert");
        }
        let lease_all = |store: Store| async move {
            let mut ids = Vec::new();
            while let Some(m) = store.lease_next("box", at(1), LEASE).await.expect("lease") {
                ids.push(m.envelope.id);
            }
            ids
        };
        let (from_a, from_b) = tokio::join!(lease_all(a.clone()), lease_all(b.clone()));
        let mut all: Vec<String> = from_a.iter().chain(&from_b).cloned().collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 20, "{name}: every message leased once");
        assert_eq!(from_a.len() + from_b.len(), 20, "{name}: none twice");

        // b holds nothing of a's: it cannot renew or record a's leases.
        if let Some(id) = from_a.first() {
            assert!(!b.renew(id, at(2), LEASE).await.expect("renew"));
            assert!(a.renew(id, at(2), LEASE).await.expect("renew"));
        }
        // After the timeout without renewal, b takes over a's messages.
        let late = at(2) + LEASE + Duration::from_secs(1);
        let mut taken = 0;
        while let Some(m) = b.lease_next("box", late, LEASE).await.expect("lease") {
            assert_eq!(m.lease.map(|l| l.relay), Some("relay-b".to_string()));
            taken += 1;
        }
        assert_eq!(taken, 20, "{name}");
        if let Some(id) = from_a.first() {
            let progress = Progress::new(&["a@example.com".to_string()], at(9));
            assert!(
                !a.record(id, &progress).await.expect("record"),
                "{name}: lease lost"
            );
        }
    }
}

// The client of a passthrough message waits on one relay's connection for
// the upstream's answer: only that relay sends it. Another relay never
// leases it, even after that relay's lease lapsed; it fails it then (the
// client, cut off, resends), and not before.
#[tokio::test]
async fn a_passthrough_message_is_sent_only_by_the_relay_holding_its_client() {
    for engine in Engine::all() {
        let name = engine.name();
        let a = engine.open("relay-a").await;
        let b = engine.open("relay-b").await;
        let mut m = message("00000000000000AA", "box", b"x");
        m.envelope.passthrough = true;
        m.lease = Some(LeaseHolder {
            relay: "relay-a".into(),
            expires: at(1) + LEASE,
        });
        a.insert(m).await.expect("insert");
        let reply = Reply {
            code: 451,
            enhanced: Some("4.3.0".into()),
            text: "451 4.3.0 the relay stopped".into(),
        };
        let late = at(2) + LEASE;
        for now in [at(1), late] {
            assert!(
                b.lease_next("box", now, LEASE)
                    .await
                    .expect("lease")
                    .is_none(),
                "{name}: another relay leased it"
            );
        }
        assert_eq!(
            b.fail_orphans(at(1), &reply, "local")
                .await
                .expect("orphans"),
            0,
            "{name}: failed while its relay holds it"
        );
        assert_eq!(
            b.fail_orphans(late, &reply, "local")
                .await
                .expect("orphans"),
            1,
            "{name}"
        );
        let failed = a.get("00000000000000AA").await.expect("get").expect("kept");
        assert_eq!(failed.progress.state, MessageState::Failed, "{name}");
    }
}

#[tokio::test]
async fn pacing_holds_across_relays() {
    let limits = PaceLimits {
        messages_per_minute: Some(5),
        recipients_per_day: None,
    };
    for engine in Engine::all() {
        let a = engine.open("relay-a").await;
        let b = engine.open("relay-b").await;
        let mut sent: Vec<SystemTime> = Vec::new();
        // Both relays ask every 3 seconds for 5 minutes, concurrently.
        for step in 0..100 {
            let now = at(step * 3);
            let (pa, pb) =
                tokio::join!(a.pace("box", now, limits, 1), b.pace("box", now, limits, 1));
            for pace in [pa.expect("pace"), pb.expect("pace")] {
                match pace {
                    Pace::Go => sent.push(now),
                    Pace::WaitUntil(t) => assert!(t > now),
                }
            }
        }
        for (i, t) in sent.iter().enumerate() {
            let in_minute = sent[i..]
                .iter()
                .filter(|s| s.duration_since(*t).expect("ordered") < Duration::from_secs(60))
                .count();
            assert!(in_minute <= 5, "{}: {in_minute} in a minute", engine.name());
        }
        assert!(
            sent.len() >= 25,
            "{}: only {} sent",
            engine.name(),
            sent.len()
        );
    }
}

/// Takes every slot of `box` (cap 3) the store grants at `now`; how many.
async fn take_all(store: &Store, now: SystemTime, ttl: Duration) -> usize {
    let mut taken = 0;
    while store
        .acquire_slot("box", 3, now, ttl)
        .await
        .expect("slot")
        .is_some()
    {
        taken += 1;
        assert!(taken <= 3, "cap exceeded");
    }
    taken
}

#[tokio::test]
async fn slot_cap_holds_across_relays_and_expired_slots_return() {
    let ttl = Duration::from_secs(30);
    for engine in Engine::all() {
        let name = engine.name();
        let a = engine.open("relay-a").await;
        let b = engine.open("relay-b").await;
        let mut held = Vec::new();
        for _ in 0..4 {
            let (sa, sb) = tokio::join!(
                a.acquire_slot("box", 3, at(0), ttl),
                b.acquire_slot("box", 3, at(0), ttl)
            );
            held.extend(sa.expect("slot").into_iter().map(|s| (a.clone(), s)));
            held.extend(sb.expect("slot").into_iter().map(|s| (b.clone(), s)));
        }
        assert_eq!(held.len(), 3, "{name}");
        let (store, slot) = held.pop().expect("a slot");
        store.release_slot(slot).await.expect("release");
        assert!(b
            .acquire_slot("box", 3, at(1), ttl)
            .await
            .expect("slot")
            .is_some());
        assert!(a
            .acquire_slot("box", 3, at(1), ttl)
            .await
            .expect("slot")
            .is_none());
        // Renewed slots stay; the others expire and come back.
        let (store, slot) = &held[0];
        assert!(store.renew_slot(slot, at(20), ttl).await.expect("renew"));
        let later = at(35);
        assert_eq!(take_all(&a, later, ttl).await, 2, "{name}");
        assert!(!held[1]
            .0
            .renew_slot(&held[1].1, later, ttl)
            .await
            .expect("renew"));
    }
}

// Microsoft throttling a mailbox through one relay holds back the others:
// a 432 seen by a takes a slot from b for the window, a pause set by a
// stops b's pace until it ends.
#[tokio::test]
async fn throttling_seen_by_one_relay_holds_back_the_others() {
    let ttl = Duration::from_secs(30);
    let limits = PaceLimits {
        messages_per_minute: Some(60),
        recipients_per_day: None,
    };
    for engine in Engine::all() {
        let name = engine.name();
        let a = engine.open("relay-a").await;
        let b = engine.open("relay-b").await;
        a.fewer_slots("box", at(0), at(600)).await.expect("fewer");
        let mut held = Vec::new();
        while let Some(slot) = b.acquire_slot("box", 3, at(1), ttl).await.expect("slot") {
            held.push(slot);
            assert!(held.len() <= 3, "{name}: cap exceeded");
        }
        assert_eq!(held.len(), 2, "{name}: one fewer");
        for slot in held.drain(..) {
            b.release_slot(slot).await.expect("release");
        }
        // Every 432 takes one more, down to one slot.
        for _ in 0..3 {
            a.fewer_slots("box", at(2), at(602)).await.expect("fewer");
        }
        assert!(b
            .acquire_slot("box", 3, at(3), Duration::from_secs(3600))
            .await
            .expect("slot")
            .is_some());
        assert!(
            b.acquire_slot("box", 3, at(3), ttl)
                .await
                .expect("slot")
                .is_none(),
            "{name}"
        );
        // After the window, all three again (one of them still held).
        assert_eq!(
            take_all(&b, at(603), ttl).await,
            2,
            "{name}: the window ended"
        );

        assert_eq!(
            b.pace("box", at(10), limits, 1).await.expect("pace"),
            Pace::Go
        );
        a.pause_mailbox("box", at(3600)).await.expect("pause");
        a.pause_mailbox("box", at(1800)).await.expect("pause");
        assert_eq!(
            b.pace("box", at(11), limits, 1).await.expect("pace"),
            Pace::WaitUntil(at(3600)),
            "{name}: the later pause holds"
        );
        assert_eq!(
            b.pace("box", at(3600), limits, 1).await.expect("pace"),
            Pace::Go,
            "{name}"
        );
        assert_eq!(
            b.pace("other", at(11), limits, 1).await.expect("pace"),
            Pace::Go,
            "{name}: other mailboxes go on"
        );
    }
}

#[tokio::test]
async fn one_relay_redeems_the_refresh_token_and_the_others_read_it() {
    let ttl = Duration::from_secs(30);
    for engine in Engine::all() {
        let name = engine.name();
        let a = engine.open("relay-a").await;
        let b = engine.open("relay-b").await;
        assert_eq!(a.token("box").await.expect("token"), None);
        let (ra, rb) = tokio::join!(
            a.begin_redeem("box", at(0), ttl),
            b.begin_redeem("box", at(0), ttl)
        );
        let (ra, rb) = (ra.expect("redeem"), rb.expect("redeem"));
        let granted = [&ra, &rb]
            .iter()
            .filter(|r| matches!(r, Redeem::Granted(_)))
            .count();
        assert_eq!(granted, 1, "{name}: {ra:?} {rb:?}");
        let (winner, loser) = if matches!(ra, Redeem::Granted(_)) {
            (&a, &b)
        } else {
            (&b, &a)
        };
        assert!(winner
            .finish_redeem("box", Some(&Secret::new("rotated-1")), at(1))
            .await
            .expect("finish"));
        let token = loser.token("box").await.expect("token").expect("stored");
        assert_eq!(token.version, 1);
        assert_eq!(token.token.as_ref().map(Secret::expose), Some("rotated-1"));

        // A redeemer that dies: its lock expires and another takes over.
        assert!(matches!(
            a.begin_redeem("box", at(10), ttl).await.expect("redeem"),
            Redeem::Granted(_)
        ));
        assert!(matches!(
            b.begin_redeem("box", at(11), ttl).await.expect("redeem"),
            Redeem::Busy { .. }
        ));
        assert!(matches!(
            b.begin_redeem("box", at(41), ttl).await.expect("redeem"),
            Redeem::Granted(_)
        ));
        assert!(!a
            .finish_redeem("box", Some(&Secret::new("stale")), at(42))
            .await
            .expect("finish"));
        assert!(b.finish_redeem("box", None, at(42)).await.expect("finish"));
        let token = a.token("box").await.expect("token").expect("stored");
        assert_eq!(
            (token.version, token.token.as_ref().map(Secret::expose)),
            (1, Some("rotated-1"))
        );
    }
}

// Relays, or a relay and an admin verb, opening a new database at the same
// moment: one of them migrates it, the others wait and find it migrated.
#[tokio::test]
async fn stores_opened_at_once_migrate_a_new_database_once() {
    for engine in Engine::all() {
        let name = engine.name();
        let opened = tokio::join!(
            engine.try_open("relay-a"),
            engine.try_open("relay-b"),
            engine.try_open("relay-c"),
            engine.try_open("relay-d"),
        );
        for store in [opened.0, opened.1, opened.2, opened.3] {
            if let Err(e) = store {
                panic!("{name}: {e}");
            }
        }
    }
}

#[tokio::test]
async fn reopening_is_idempotent_and_a_newer_schema_is_refused() {
    for engine in Engine::all() {
        let name = engine.name();
        let store = engine.open("relay-a").await;
        store
            .insert(message("0000000000000001", "box", b"x"))
            .await
            .expect("insert");
        drop(store);
        let store = engine.open("relay-a").await;
        assert_eq!(all(&store).await.len(), 1, "{name}");
        drop(store);

        // A newer relay migrated the database.
        let newer = SCHEMA_VERSION + 1;
        let sql = format!(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES ({newer}, 'from the future', TRUE, X'00', 0)"
        );
        let sql = match engine {
            Engine::Sqlite(_) => sql,
            Engine::Postgres(_) => sql.replace("X'00'", "'\\x00'::bytea"),
        };
        raw(&engine, sql).await;
        match engine.try_open("relay-a").await {
            Err(StoreError::SchemaTooNew { found, known }) => {
                assert_eq!((found, known), (newer, SCHEMA_VERSION), "{name}");
            }
            other => panic!("{name}: opened a newer schema: {other:?}"),
        }
    }
}

/// Runs one statement outside the store.
async fn raw(engine: &Engine, sql: String) {
    use sqlx::Connection;
    match engine.location() {
        Location::Sqlite(dir) => {
            let url = format!("sqlite://{}", dir.join("queue.sqlite").display());
            let mut c = sqlx::SqliteConnection::connect(&url)
                .await
                .expect("connect");
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut c)
                .await
                .expect("statement");
        }
        Location::Postgres { url, password } => {
            let options: sqlx::postgres::PgConnectOptions = url.expose().parse().expect("url");
            let options = options.password(password.as_ref().map_or("", Secret::expose));
            let mut c = sqlx::PgConnection::connect_with(&options)
                .await
                .expect("connect");
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut c)
                .await
                .expect("statement");
        }
    }
}

#[tokio::test]
async fn import_is_all_or_nothing_and_repeatable() {
    for engine in Engine::all() {
        let name = engine.name();
        let store = engine.open("relay-a").await;
        let mut old: Vec<NewMessage> = (0..10)
            .map(|i| {
                let mut m = message(&format!("{i:016X}"), "box", format!("body {i}").as_bytes());
                m.progress.state = MessageState::Deferred;
                m.progress.attempts = 3;
                m.held = i == 4;
                m
            })
            .collect();
        // One record the schema refuses (due never, yet not failed) fails
        // them all.
        let mut broken: Vec<NewMessage> = old.iter().map(again).collect();
        broken[7].progress.next_attempt = None;
        assert!(store.import(broken).await.is_err(), "{name}");
        assert!(all(&store).await.is_empty(), "{name}: nothing kept");

        let first: Vec<NewMessage> = old.iter().map(again).collect();
        assert_eq!(store.import(first).await.expect("import"), 10, "{name}");
        // Repeated after a crash before the old files were removed.
        old.push(message("00000000000000AA", "box", b"new"));
        assert_eq!(store.import(old).await.expect("import"), 1, "{name}");
        let listed = all(&store).await;
        assert_eq!(listed.len(), 11, "{name}");
        assert!(listed
            .iter()
            .any(|m| m.held && m.envelope.id == "0000000000000004"));
        assert_eq!(
            store.body("0000000000000009").await.expect("body"),
            Some(b"body 9".to_vec())
        );
    }
}

#[test]
fn the_password_is_never_printed() {
    let location = Location::Postgres {
        url: "postgres://relay@127.0.0.1:1/relay".into(),
        password: Some(Secret::new("hunter2")),
    };
    assert!(!format!("{location:?}").contains("hunter2"));
}

#[tokio::test]
async fn a_body_changed_on_disk_is_refused() {
    for engine in Engine::all() {
        let store = engine.open("relay-a").await;
        store
            .insert(message("0000000000000001", "box", b"original"))
            .await
            .expect("insert");
        let sql = "UPDATE bodies SET body = body || body".to_string();
        raw(&engine, sql).await;
        match store.body("0000000000000001").await {
            Err(StoreError::Checksum { id }) => assert_eq!(id, "0000000000000001"),
            other => panic!("{}: {other:?}", engine.name()),
        }
    }
}

// Leasing in batches: up to the limit, longest due first, none twice, each
// with its recipients; removals committed together apply only to the
// leases this relay holds.
#[tokio::test]
async fn batches_lease_and_remove_only_what_they_may() {
    for engine in Engine::all() {
        let name = engine.name();
        let (a, b) = (engine.open("relay-a").await, engine.open("relay-b").await);
        for i in 1..=5u64 {
            let mut m = message(&format!("{i:016X}"), "box", b"Subject: x\r\n\r\nx\r\n");
            // due in reverse order of id
            m.progress.next_attempt = Some(at(10 - i));
            a.insert(m).await.expect("insert");
        }
        let first = a.lease_due("box", at(20), LEASE, 3).await.expect("lease");
        let ids: Vec<&str> = first.iter().map(|m| m.envelope.id.as_str()).collect();
        assert_eq!(
            ids,
            ["0000000000000005", "0000000000000004", "0000000000000003"],
            "{name}"
        );
        assert!(
            first.iter().all(|m| m.progress.recipients.len() == 2),
            "{name}"
        );
        let rest = b.lease_due("box", at(20), LEASE, 3).await.expect("lease");
        let ids: Vec<&str> = rest.iter().map(|m| m.envelope.id.as_str()).collect();
        assert_eq!(ids, ["0000000000000002", "0000000000000001"], "{name}");

        // Removed at once (one group commit): a's own go, b's stays.
        let (x, y, z) = tokio::join!(
            a.remove("0000000000000005"),
            a.remove("0000000000000004"),
            a.remove("0000000000000001"),
        );
        let removed = [x, y, z].map(|r| r.expect("remove"));
        assert_eq!(removed, [true, true, false], "{name}");
        let left: Vec<String> = all(&a).await.into_iter().map(|m| m.envelope.id).collect();
        assert_eq!(
            left,
            ["0000000000000001", "0000000000000002", "0000000000000003"],
            "{name}"
        );
        assert_eq!(
            a.body("0000000000000005").await.expect("body"),
            None,
            "{name}"
        );
    }
}

// The skew between the relay's clock and a shared database's: measured on
// PostgreSQL (here the same machine's clock, so within a second), not on
// the embedded store.
#[tokio::test]
async fn clock_skew_is_measured_on_a_shared_database() {
    for engine in Engine::all() {
        let store = engine.open("relay-a").await;
        let skew = store.clock_skew().await.expect("skew");
        match engine {
            Engine::Sqlite(_) => assert_eq!(skew, None),
            Engine::Postgres(_) => {
                let skew = skew.expect("measured");
                assert!(skew.abs() < 1000, "{skew} ms on one machine");
            }
        }
    }
}

// A line of messages is decided in one go: in order, up to the first that
// must wait (a later one that would fit waits its turn), those let out
// counted for every relay; lines asked by two relays at once never let out
// more than the minute allows.
#[tokio::test]
async fn a_line_goes_in_order_and_counts_for_every_relay() {
    let limits = PaceLimits {
        messages_per_minute: Some(3),
        recipients_per_day: Some(10),
    };
    let day = Duration::from_secs(24 * 3600);
    for engine in Engine::all() {
        let name = engine.name();
        let (a, b) = (engine.open("relay-a").await, engine.open("relay-b").await);
        assert_eq!(
            a.pace_line("box", at(0), limits, &[1, 1, 1, 1])
                .await
                .expect("pace"),
            Admitted {
                go: 3,
                next: Some(at(60))
            },
            "{name}"
        );
        assert_eq!(
            b.pace("box", at(1), limits, 1).await.expect("pace"),
            Pace::WaitUntil(at(60)),
            "{name}"
        );
        assert_eq!(
            b.pace_line("box", at(60), limits, &[4, 4, 1])
                .await
                .expect("pace"),
            Admitted {
                go: 1,
                next: Some(at(0) + day)
            },
            "{name}: 7 of the day's 10 counted"
        );

        let limits = PaceLimits {
            messages_per_minute: Some(5),
            recipients_per_day: None,
        };
        let mut sent: Vec<SystemTime> = Vec::new();
        for step in 0..60 {
            let now = at(step * 3);
            let (la, lb) = tokio::join!(
                a.pace_line("busy", now, limits, &[1, 1, 1]),
                b.pace_line("busy", now, limits, &[1, 1])
            );
            for admitted in [la.expect("pace"), lb.expect("pace")] {
                sent.extend(std::iter::repeat_n(now, admitted.go));
            }
        }
        for (i, t) in sent.iter().enumerate() {
            let in_minute = sent[i..]
                .iter()
                .filter(|s| s.duration_since(*t).expect("ordered") < Duration::from_secs(60))
                .count();
            assert!(in_minute <= 5, "{name}: {in_minute} in a minute");
        }
        assert!(sent.len() >= 15, "{name}: only {} sent", sent.len());
    }
}

// The day's recipients across relays: what one relay sent counts for the
// other, a message that does not fit waits until the oldest sends leave
// the day, and one that fits after them goes out.
#[tokio::test]
async fn recipients_per_day_hold_across_relays() {
    let limits = PaceLimits {
        messages_per_minute: None,
        recipients_per_day: Some(10),
    };
    let day = Duration::from_secs(24 * 3600);
    for engine in Engine::all() {
        let name = engine.name();
        let (a, b) = (engine.open("relay-a").await, engine.open("relay-b").await);
        assert_eq!(
            a.pace("box", at(0), limits, 4).await.expect("pace"),
            Pace::Go
        );
        assert_eq!(
            b.pace("box", at(100), limits, 4).await.expect("pace"),
            Pace::Go
        );
        assert_eq!(
            a.pace("box", at(200), limits, 2).await.expect("pace"),
            Pace::Go,
            "{name}"
        );
        // 10 counted: 1 more waits for the first send to leave the day
        assert_eq!(
            b.pace("box", at(300), limits, 1).await.expect("pace"),
            Pace::WaitUntil(at(0) + day),
            "{name}"
        );
        assert_eq!(
            b.pace("box", at(0) + day, limits, 4).await.expect("pace"),
            Pace::Go,
            "{name}"
        );
    }
}

/// A message whose body was spooled while received.
fn spooled_message(id: &str, spool_dir: &std::path::Path, body: &[u8]) -> NewMessage {
    let mut spool = relay_store::Spool::new(tempfile::tempfile_in(spool_dir).expect("spool"));
    spool.append(body).expect("append");
    let mut m = message(id, "box", b"");
    m.body = Body::Spooled(spool.finish());
    m
}

/// The embedded store keeps a spooled body as a file (written once, never
/// read whole for the commit); PostgreSQL keeps it in the database. Either
/// way it reads back checked, and goes with its message.
#[tokio::test]
async fn a_spooled_body_is_stored_and_goes_with_its_message() {
    let body: Vec<u8> = (0..600_000u32)
        .map(|i| b"abcdefghij\r\n"[i as usize % 12])
        .collect();
    for engine in Engine::all() {
        let name = engine.name();
        let spool_dir = tempfile::tempdir().expect("spool dir");
        let spool_dir = match &engine {
            Engine::Sqlite(dir) => dir.path().to_path_buf(),
            Engine::Postgres(_) => spool_dir.path().to_path_buf(),
        };
        let file = |id: &str| match &engine {
            Engine::Sqlite(dir) => Some(dir.path().join("bodies").join(id)),
            Engine::Postgres(_) => None,
        };
        let store = engine.open("relay-a").await;
        for id in ["0000000000000001", "0000000000000002"] {
            let m = spooled_message(id, &spool_dir, &body);
            assert_eq!(m.body.len(), body.len() as u64);
            store.insert(m).await.expect("insert");
            assert_eq!(
                store.body(id).await.expect("body"),
                Some(body.clone()),
                "{name}"
            );
            if let Some(file) = file(id) {
                assert_eq!(std::fs::read(file).expect("a body file"), body, "{name}");
            }
        }

        // Delivered: removed with its file.
        let leased = store
            .lease_next("box", at(1), LEASE)
            .await
            .expect("lease")
            .expect("due");
        let id = leased.envelope.id.clone();
        assert_eq!(leased.size, body.len() as u64, "{name}");
        assert_eq!(
            store.begin(&id, at(1), LEASE).await.expect("begin"),
            Some(body.clone()),
            "{name}"
        );
        assert!(store.remove(&id).await.expect("remove"), "{name}");
        assert_eq!(store.body(&id).await.expect("body"), None, "{name}");
        if let Some(file) = file(&id) {
            assert!(
                !file.exists(),
                "{name}: the body file goes with its message"
            );
        }
        // Deleted by an administrator: the same.
        let other = if id == "0000000000000001" {
            "0000000000000002"
        } else {
            "0000000000000001"
        };
        assert_eq!(
            store.delete(&[other]).await.expect("delete"),
            [other],
            "{name}"
        );
        if let Some(file) = file(other) {
            assert!(
                !file.exists(),
                "{name}: the body file goes with its message"
            );
        }

        // A body file no message names (an insert a crash interrupted) is
        // swept; a stored one stays.
        store
            .insert(spooled_message("0000000000000003", &spool_dir, &body))
            .await
            .expect("insert");
        if let (Some(stray), Some(kept)) = (file("00000000000000FF"), file("0000000000000003")) {
            std::fs::write(&stray, b"half").expect("stray");
            assert_eq!(store.sweep_bodies().await.expect("sweep"), 1, "{name}");
            assert!(!stray.exists() && kept.exists(), "{name}");
        } else {
            assert_eq!(store.sweep_bodies().await.expect("sweep"), 0, "{name}");
        }
        assert_eq!(
            store.body("0000000000000003").await.expect("body"),
            Some(body.clone()),
            "{name}"
        );

        // A body file changed on disk fails its checksum.
        if let Some(kept) = file("0000000000000003") {
            std::fs::write(&kept, b"tampered").expect("write");
            assert!(
                matches!(
                    store.body("0000000000000003").await,
                    Err(StoreError::Checksum { .. })
                ),
                "{name}"
            );
        }
    }
}

/// An older queue's body files are taken as they are (linked into the
/// embedded store, read into PostgreSQL), and an import repeated after a
/// crash (the first one committed, the old files not yet removed) keeps
/// what is stored.
#[tokio::test]
async fn an_import_takes_body_files_and_can_be_repeated() {
    for engine in Engine::all() {
        let name = engine.name();
        let old = tempfile::tempdir().expect("old queue");
        let old_dir = match &engine {
            Engine::Sqlite(dir) => dir.path().join("body"),
            Engine::Postgres(_) => old.path().to_path_buf(),
        };
        std::fs::create_dir_all(&old_dir).expect("body dir");
        let store = engine.open("relay-a").await;
        let import = || {
            (1..=3u8)
                .map(|i| {
                    let path = old_dir.join(format!("{i:016X}"));
                    std::fs::write(&path, format!("old body {i}")).expect("write");
                    let file = std::fs::File::open(&path).expect("open");
                    let mut m = message(&format!("{i:016X}"), "box", b"");
                    m.body = Body::Spooled(relay_store::Spooled::from_file(file).expect("sum"));
                    m
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(store.import(import()).await.expect("import"), 3, "{name}");
        assert_eq!(store.import(import()).await.expect("again"), 0, "{name}");
        for i in 1..=3u8 {
            assert_eq!(
                store.body(&format!("{i:016X}")).await.expect("body"),
                Some(format!("old body {i}").into_bytes()),
                "{name}"
            );
        }
        std::fs::remove_dir_all(&old_dir).expect("old files removed");
        assert_eq!(
            store.body("0000000000000002").await.expect("body"),
            Some(b"old body 2".to_vec()),
            "{name}: the store's own link"
        );
        if let Engine::Sqlite(dir) = &engine {
            let mut kept: Vec<String> = std::fs::read_dir(dir.path().join("bodies"))
                .expect("bodies")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            kept.sort();
            assert_eq!(
                kept,
                ["0000000000000001", "0000000000000002", "0000000000000003"]
            );
        }
    }
}

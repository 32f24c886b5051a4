//! Administrator actions: retry and delete, on a live queue and from another
//! handle on its store, as the `queue` commands in another process do.

use std::path::Path;
use std::time::Duration;

use relay_outcome::{Enhanced, Reason, Reply};
use relay_queue::{
    Begin, NewMessage, Outcome, Queue, QueueError, QueueSettings, RecipientResult, Request,
    Selection, State,
};
use tempfile::TempDir;

const LIMIT: Duration = Duration::from_secs(10);

fn settings(dir: &Path) -> QueueSettings {
    QueueSettings {
        dir: dir.to_path_buf(),
        database: None,
        lease_timeout: Duration::from_secs(60),
        retry_initial: Duration::from_secs(3600), // nothing becomes due by itself
        retry_max: Duration::from_secs(3600),
        max_age: Duration::from_secs(86400),
    }
}

fn msg() -> NewMessage {
    NewMessage {
        sender: "app@example.com".into(),
        recipients: vec!["a@example.com".into(), "b@example.com".into()],
        account: "main".into(),
        client: None,
    }
}

async fn attempt(q: &Queue, outcome: fn(String) -> Outcome) {
    let lease = tokio::time::timeout(LIMIT, q.next_due("main", None))
        .await
        .expect("in time")
        .expect("due");
    let results = lease
        .recipients
        .iter()
        .map(|r| RecipientResult {
            recipient: r.clone(),
            outcome: outcome(format!("reply for {r}")),
        })
        .collect();
    q.record(lease, results).await.expect("record");
}

fn permanent(text: String) -> Outcome {
    Outcome::new(
        Reason::Refused,
        Reply::local(550, Enhanced::new(5, 1, 1), &text),
    )
}
fn temporary(text: String) -> Outcome {
    Outcome::new(
        Reason::Deferred,
        Reply::local(451, Enhanced::new(4, 4, 1), &text),
    )
}

// A deferred message retried by the admin is due at once.
#[tokio::test]
async fn retry_makes_a_deferred_message_due_now() {
    let dir = TempDir::new().expect("tempdir");
    let q = Queue::open(settings(dir.path())).await.expect("open");
    let id = q.enqueue(msg(), b"x\r\n").await.expect("enqueue");
    attempt(&q, temporary).await;
    assert!(q
        .next_due("main", Some(Duration::from_millis(200)))
        .await
        .is_none());
    assert_eq!(
        q.retry(Selection::Id(id.clone())).await.expect("retry"),
        vec![id]
    );
    assert!(q
        .next_due("main", Some(Duration::from_millis(200)))
        .await
        .is_some());
}

// A failed message can be revived: only its failed recipients are tried again.
#[tokio::test]
async fn retry_revives_failed_messages() {
    let dir = TempDir::new().expect("tempdir");
    let q = Queue::open(settings(dir.path())).await.expect("open");
    let id = q.enqueue(msg(), b"x\r\n").await.expect("enqueue");
    attempt(&q, permanent).await;
    assert_eq!(q.list().await.expect("list")[0].state, State::Failed);
    assert_eq!(
        q.retry(Selection::Failed).await.expect("retry"),
        vec![id.clone()]
    );
    let lease = tokio::time::timeout(LIMIT, q.next_due("main", None))
        .await
        .expect("in time")
        .expect("due again");
    assert_eq!(lease.recipients, ["a@example.com", "b@example.com"]);
    assert_eq!(q.show(&id).await.expect("show").0.state, State::Deferred);
}

// Retrying every message at once revives the failed messages' recipients,
// and leaves failed the recipient of a deferred message that was refused.
#[tokio::test]
async fn retry_all_revives_failed_messages_only() {
    let dir = TempDir::new().expect("tempdir");
    let q = Queue::open(settings(dir.path())).await.expect("open");
    let failed = q.enqueue(msg(), b"failed\r\n").await.expect("enqueue");
    attempt(&q, permanent).await;
    let mixed = q.enqueue(msg(), b"mixed\r\n").await.expect("enqueue");
    let lease = q.next_due("main", None).await.expect("due");
    let results = vec![
        RecipientResult {
            recipient: "a@example.com".into(),
            outcome: permanent("no such user".into()),
        },
        RecipientResult {
            recipient: "b@example.com".into(),
            outcome: temporary("busy".into()),
        },
    ];
    q.record(lease, results).await.expect("record");

    let mut retried = q.retry(Selection::All).await.expect("retry");
    retried.sort();
    let mut both = vec![failed.clone(), mixed.clone()];
    both.sort();
    assert_eq!(retried, both);
    let mut due = Vec::new();
    for _ in 0..2 {
        let lease = tokio::time::timeout(LIMIT, q.next_due("main", None))
            .await
            .expect("in time")
            .expect("due");
        due.push((lease.id.clone(), lease.recipients.clone()));
    }
    due.sort();
    let mut expected = vec![
        (
            failed,
            vec!["a@example.com".to_string(), "b@example.com".to_string()],
        ),
        (mixed, vec!["b@example.com".to_string()]),
    ];
    expected.sort();
    assert_eq!(due, expected);
}

// Deleting removes waiting and failed messages from disk, and a leased one
// not yet handed to the upstream (waiting for its pacing slot): its worker
// is told not to send it.
#[tokio::test]
async fn delete_waiting_failed_and_leased() {
    let dir = TempDir::new().expect("tempdir");
    let q = Queue::open(settings(dir.path())).await.expect("open");
    q.enqueue(msg(), b"failed\r\n").await.expect("enqueue");
    attempt(&q, permanent).await;
    let leased_id = q.enqueue(msg(), b"leased\r\n").await.expect("enqueue");
    let lease = q.next_due("main", None).await.expect("due");
    q.enqueue(msg(), b"waiting\r\n").await.expect("enqueue");
    let deletion = q.delete(Selection::All).await.expect("delete");
    assert_eq!(deletion.deleted.len(), 3);
    assert_eq!(deletion.in_flight.len(), 1);
    assert_eq!(deletion.in_flight[0].0, leased_id);
    assert!(
        deletion.in_flight[0].1.contains(q.relay()),
        "{:?}",
        deletion.in_flight
    );
    assert!(q.list().await.expect("list").is_empty());
    assert!(
        matches!(q.begin(&lease).await, Begin::Stop),
        "a deleted message may not be sent"
    );
    drop(lease);
    assert!(matches!(
        q.show(&leased_id).await,
        Err(QueueError::NoSuchMessage { .. })
    ));
    assert!(q
        .next_due("main", Some(Duration::from_millis(200)))
        .await
        .is_none());
}

// A message already handed to the upstream cannot be stopped: the deletion
// removes it at once and says a relay held it; the attempt's outcome finds
// the lease gone and is not recorded (nothing comes back).
#[tokio::test]
async fn delete_during_an_attempt_in_flight_reports_it() {
    let dir = TempDir::new().expect("tempdir");
    let q = Queue::open(settings(dir.path())).await.expect("open");
    let id = q.enqueue(msg(), b"in flight\r\n").await.expect("enqueue");
    let lease = q.next_due("main", None).await.expect("due");
    assert!(matches!(q.begin(&lease).await, Begin::Go(_)));
    let deletion = q.delete(Selection::All).await.expect("delete");
    assert_eq!(deletion.deleted, vec![id.clone()]);
    assert_eq!(deletion.in_flight.len(), 1);
    assert_eq!(deletion.in_flight[0].0, id);
    let results = vec![
        RecipientResult {
            recipient: "a@example.com".into(),
            outcome: Outcome::delivered(Reply::local(250, Enhanced::new(2, 0, 0), "OK")),
        },
        RecipientResult {
            recipient: "b@example.com".into(),
            outcome: temporary("b".into()),
        },
    ];
    let err = q.record(lease, results).await.expect_err("lease gone");
    assert!(matches!(err, QueueError::LeaseLost { .. }), "{err}");
    assert!(q.list().await.expect("list").is_empty());
}

// Another process (the CLI) opens the same store while the relay runs; the
// relay sees the result: a held message is not handed out, a released one
// is, a deleted one is gone.
#[tokio::test]
async fn another_handle_acts_on_the_running_queue() {
    let dir = TempDir::new().expect("tempdir");
    let q = Queue::open(settings(dir.path())).await.expect("open");
    let id = q.enqueue(msg(), b"x\r\n").await.expect("enqueue");
    let cli = Queue::open_admin(settings(dir.path()))
        .await
        .expect("open beside the relay");
    // a second relay on the same embedded store is refused
    let err = Queue::open(settings(dir.path())).await.expect_err("locked");
    assert!(matches!(err, QueueError::Locked { .. }), "{err}");
    let applied = tokio::time::timeout(LIMIT, cli.apply(Request::Hold(Selection::Id(id.clone()))))
        .await
        .expect("in time")
        .expect("held");
    assert_eq!(applied.ids, vec![id.clone()]);
    assert!(q
        .next_due("main", Some(Duration::from_millis(300)))
        .await
        .is_none());
    cli.apply(Request::Release(Selection::All))
        .await
        .expect("released");
    // found by the running queue's look at the store, within about a second
    let lease = tokio::time::timeout(LIMIT, q.next_due("main", None))
        .await
        .expect("in time")
        .expect("due");
    assert_eq!(lease.id, id);
    drop(lease);
    let applied = cli
        .apply(Request::Delete(Selection::Id(id.clone())))
        .await
        .expect("deleted");
    assert_eq!(applied.ids, vec![id]);
    assert!(q.list().await.expect("list").is_empty());
}

/// The census (what `/metrics` and systemd's STATUS show) follows every
/// change and agrees with the list, across a reopen too.
#[tokio::test]
async fn census_follows_every_change_and_agrees_with_the_list() {
    let dir = TempDir::new().expect("tempdir");
    async fn counts(q: &Queue) -> (usize, usize, usize) {
        let c = q.census().await.expect("census");
        (c.queued.count, c.deferred.count, c.failed.count)
    }
    async fn on_disk(q: &Queue, state: State) -> usize {
        q.list()
            .await
            .expect("list")
            .iter()
            .filter(|e| e.state == state)
            .count()
    }
    let q = Queue::open(settings(dir.path())).await.expect("open");
    assert_eq!(counts(&q).await, (0, 0, 0));
    assert_eq!(q.census().await.expect("census").queued.oldest, None);
    let first = q.enqueue(msg(), b"x\r\n").await.expect("enqueue");
    q.enqueue(msg(), b"y\r\n").await.expect("enqueue");
    assert_eq!(counts(&q).await, (2, 0, 0));
    let oldest = q
        .census()
        .await
        .expect("census")
        .queued
        .oldest
        .expect("oldest");
    let first_entry = q.list().await.expect("list").remove(0);
    assert_eq!(first_entry.id, first.as_str());
    assert_eq!(
        humantime::format_rfc3339_seconds(oldest).to_string(),
        first_entry.received_at
    );

    attempt(&q, temporary).await; // the first: deferred
    assert_eq!(counts(&q).await, (1, 1, 0));
    attempt(&q, permanent).await; // the second: failed
    assert_eq!(counts(&q).await, (0, 1, 1));
    assert_eq!(on_disk(&q, State::Deferred).await, 1);
    assert_eq!(on_disk(&q, State::Failed).await, 1);
    drop(q);

    let q = Queue::open(settings(dir.path())).await.expect("reopen");
    assert_eq!(counts(&q).await, (0, 1, 1));
    assert!(q.census().await.expect("census").failed.oldest.is_some());
    q.retry(Selection::All).await.expect("retry");
    assert_eq!(counts(&q).await, (0, 2, 0));
    attempt(&q, permanent).await;
    attempt(&q, permanent).await;
    assert_eq!(counts(&q).await, (0, 0, 2));
    q.delete(Selection::Id(first)).await.expect("delete");
    assert_eq!(counts(&q).await, (0, 0, 1));
    assert_eq!(on_disk(&q, State::Failed).await, 1);
    q.delete(Selection::All).await.expect("delete");
    assert_eq!(counts(&q).await, (0, 0, 0));
    assert!(q.list().await.expect("list").is_empty());
}

// A queue larger than a page is listed page by page, every message once
// and in id order, and an action on every message reaches all of them.
#[tokio::test]
async fn a_queue_larger_than_a_page_is_listed_and_acted_on_whole() {
    let dir = TempDir::new().expect("tempdir");
    let q = Queue::open(settings(dir.path())).await.expect("open");
    let enqueued: Vec<_> = (0..1001)
        .map(|_| {
            let q = q.clone();
            tokio::spawn(async move { q.enqueue(msg(), b"x\r\n").await })
        })
        .collect();
    let mut ids = Vec::new();
    for enqueue in enqueued {
        ids.push(enqueue.await.expect("task").expect("enqueue").to_string());
    }
    ids.sort();

    let (mut listed, mut pages) = (Vec::new(), Vec::new());
    let mut listing = q.listing();
    while let Some(page) = listing.next().await.expect("page") {
        pages.push(page.len());
        listed.extend(page.into_iter().map(|e| e.id));
    }
    assert_eq!(pages, [1000, 1]);
    assert_eq!(listed, ids);

    let held = q.apply(Request::Hold(Selection::All)).await.expect("hold");
    assert_eq!(held.ids.len(), 1001);
    let deleted = q
        .apply(Request::Delete(Selection::All))
        .await
        .expect("delete");
    assert_eq!(deleted.ids.len(), 1001);
    assert!(q.list().await.expect("list").is_empty());
}

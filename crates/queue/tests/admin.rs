//! Administrator actions: retry and delete, on a live queue and through the
//! control directory as another process would.

use std::path::Path;
use std::time::Duration;

use relay_outcome::{Enhanced, Reason, Reply};
use relay_queue::{
    list, show, submit, NewMessage, Outcome, Queue, QueueSettings, RecipientResult, Request,
    Selection, State,
};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(10);

fn settings(dir: &Path) -> QueueSettings {
    QueueSettings {
        dir: dir.to_path_buf(),
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
    assert_eq!(list(dir.path()).expect("list")[0].state, State::Failed);
    assert_eq!(
        q.retry(Selection::Failed).await.expect("retry"),
        vec![id.clone()]
    );
    let lease = tokio::time::timeout(LIMIT, q.next_due("main", None))
        .await
        .expect("in time")
        .expect("due again");
    assert_eq!(lease.recipients, ["a@example.com", "b@example.com"]);
    assert_eq!(
        show(dir.path(), &id).expect("show").0.state,
        State::Deferred
    );
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
    assert!(deletion.in_flight.is_empty());
    assert!(list(dir.path()).expect("list").is_empty());
    assert!(!q.begin(&lease), "a deleted message may not be sent");
    drop(lease);
    assert!(show(dir.path(), &leased_id).is_err());
    assert!(q
        .next_due("main", Some(Duration::from_millis(200)))
        .await
        .is_none());
}

// A message already handed to the upstream cannot be stopped: the deletion
// waits for the attempt, says how it ended, and removes what is left.
#[tokio::test]
async fn delete_during_an_attempt_in_flight_reports_it() {
    let dir = TempDir::new().expect("tempdir");
    let q = Queue::open(settings(dir.path())).await.expect("open");
    let id = q.enqueue(msg(), b"in flight\r\n").await.expect("enqueue");
    let lease = q.next_due("main", None).await.expect("due");
    assert!(q.begin(&lease));
    let deleting = tokio::spawn({
        let q = q.clone();
        async move { q.delete(Selection::All).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
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
    q.record(lease, results).await.expect("record");
    let deletion = tokio::time::timeout(LIMIT, deleting)
        .await
        .expect("in time")
        .expect("task")
        .expect("delete");
    assert!(deletion.deleted.is_empty());
    assert_eq!(
        deletion.in_flight,
        vec![(
            id,
            "delivered to 1 of 2 recipient(s) by the attempt in flight; the rest removed".into()
        )]
    );
    assert!(list(dir.path()).expect("list").is_empty());
}

// Another process (the CLI) reaches the running queue through control/.
#[tokio::test]
async fn requests_reach_a_running_queue() {
    let dir = TempDir::new().expect("tempdir");
    let q = Queue::open(settings(dir.path())).await.expect("open");
    let shutdown = CancellationToken::new();
    tokio::spawn(q.clone().serve_control(shutdown.clone()));
    let id = q.enqueue(msg(), b"x\r\n").await.expect("enqueue");
    attempt(&q, permanent).await;
    let ids = tokio::time::timeout(
        LIMIT,
        submit(settings(dir.path()), Request::Delete(Selection::Failed)),
    )
    .await
    .expect("answer in time")
    .expect("deleted")
    .ids;
    assert_eq!(ids, vec![id]);
    assert!(list(dir.path()).expect("list").is_empty());
    shutdown.cancel();
}

// Without a running relay, the command opens the queue itself.
#[tokio::test]
async fn requests_apply_directly_when_no_relay_runs() {
    let dir = TempDir::new().expect("tempdir");
    let id = {
        let q = Queue::open(settings(dir.path())).await.expect("open");
        q.enqueue(msg(), b"x\r\n").await.expect("enqueue")
    };
    let ids = submit(
        settings(dir.path()),
        Request::Delete(Selection::Id(id.clone())),
    )
    .await
    .expect("deleted")
    .ids;
    assert_eq!(ids, vec![id]);
    assert!(list(dir.path()).expect("list").is_empty());
}

/// The census (what `/metrics` and systemd's STATUS show) comes from memory;
/// it must agree with the disk through every change, across a reopen too.
#[tokio::test]
async fn census_follows_every_change_and_agrees_with_the_disk() {
    let dir = TempDir::new().expect("tempdir");
    let counts = |q: &Queue| {
        let c = q.census();
        (c.queued.count, c.deferred.count, c.failed.count)
    };
    let on_disk = |state: State| {
        list(dir.path())
            .expect("list")
            .iter()
            .filter(|e| e.state == state)
            .count()
    };
    let q = Queue::open(settings(dir.path())).await.expect("open");
    assert_eq!(counts(&q), (0, 0, 0));
    assert_eq!(q.census().queued.oldest, None);
    let first = q.enqueue(msg(), b"x\r\n").await.expect("enqueue");
    q.enqueue(msg(), b"y\r\n").await.expect("enqueue");
    assert_eq!(counts(&q), (2, 0, 0));
    let oldest = q.census().queued.oldest.expect("oldest");
    let first_entry = list(dir.path()).expect("list").remove(0);
    assert_eq!(first_entry.id, first.as_str());
    assert_eq!(
        humantime::format_rfc3339_seconds(oldest).to_string(),
        first_entry.received_at
    );

    attempt(&q, temporary).await; // the first: deferred
    assert_eq!(counts(&q), (1, 1, 0));
    attempt(&q, permanent).await; // the second: failed
    assert_eq!(counts(&q), (0, 1, 1));
    assert_eq!(on_disk(State::Deferred), 1);
    assert_eq!(on_disk(State::Failed), 1);
    drop(q);

    let q = Queue::open(settings(dir.path())).await.expect("reopen");
    assert_eq!(counts(&q), (0, 1, 1));
    assert!(q.census().failed.oldest.is_some());
    q.retry(Selection::All).await.expect("retry");
    assert_eq!(counts(&q), (0, 2, 0));
    attempt(&q, permanent).await;
    attempt(&q, permanent).await;
    assert_eq!(counts(&q), (0, 0, 2));
    q.delete(Selection::Id(first)).await.expect("delete");
    assert_eq!(counts(&q), (0, 0, 1));
    assert_eq!(on_disk(State::Failed), 1);
    q.delete(Selection::All).await.expect("delete");
    assert_eq!(counts(&q), (0, 0, 0));
    assert!(list(dir.path()).expect("list").is_empty());
}

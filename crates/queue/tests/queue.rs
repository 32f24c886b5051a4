//! Behaviour of the queue against real files in a temporary directory.

use std::collections::HashSet;
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use relay_outcome::{Reason, Reply};
use relay_queue::{
    Begin, Disposition, Lease, NewMessage, Outcome, Queue, QueueError, QueueId, QueueSettings,
    RecipientResult, RecipientState, State,
};
use tempfile::TempDir;

const LIMIT: Duration = Duration::from_secs(10);

/// Awaits `f`, failing the test if it takes longer than [`LIMIT`].
async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f).await.expect("timed out")
}

fn settings(dir: &Path) -> QueueSettings {
    QueueSettings {
        dir: dir.to_path_buf(),
        database: None,
        lease_timeout: Duration::from_secs(60),
        retry_initial: Duration::from_millis(100),
        retry_max: Duration::from_secs(1),
        max_age: Duration::from_secs(3600),
    }
}

async fn open(dir: &Path) -> Queue {
    within(Queue::open(settings(dir)))
        .await
        .expect("open queue")
}

fn msg(account: &str, recipients: &[&str]) -> NewMessage {
    NewMessage {
        sender: "app@example.com".into(),
        recipients: recipients.iter().map(|r| r.to_string()).collect(),
        account: account.into(),
        client: Some("192.0.2.7".parse().expect("ip")),
    }
}

/// A new queue in its own temporary directory (kept alive by the `TempDir`).
async fn fresh() -> (TempDir, Queue) {
    let tmp = TempDir::new().expect("tempdir");
    let q = open(tmp.path()).await;
    (tmp, q)
}

/// Queues `body` from the usual sender for `account` (bounded).
async fn enqueue(q: &Queue, account: &str, recipients: &[&str], body: &[u8]) -> QueueId {
    within(q.enqueue(msg(account, recipients), body))
        .await
        .expect("enqueue")
}

/// Records the outcome of a delivery attempt (bounded).
async fn record(q: &Queue, lease: Lease, results: Vec<RecipientResult>) -> Disposition {
    within(q.record(lease, results))
        .await
        .expect("record")
        .disposition
}

/// How long after `since` a deferral's next attempt is; panics on any other
/// disposition.
fn deferred_for(d: Disposition, since: SystemTime) -> Duration {
    let Disposition::Deferred { next_attempt } = d else {
        panic!("expected deferral, got {d:?}");
    };
    next_attempt.duration_since(since).expect("in the future")
}

async fn lease(q: &Queue, account: &str) -> Lease {
    within(q.next_due(account, None))
        .await
        .expect("a due message")
}

async fn nothing_due(q: &Queue, account: &str, wait: Duration) {
    let got = within(q.next_due(account, Some(wait))).await;
    assert!(got.is_none(), "unexpectedly due: {got:?}");
}

fn result(rcpt: &str, outcome: Outcome) -> RecipientResult {
    RecipientResult {
        recipient: rcpt.into(),
        outcome,
    }
}

fn reply(text: &str) -> Reply {
    Reply::parse(text).expect("a reply with a code")
}

fn delivered(rcpt: &str) -> RecipientResult {
    result(rcpt, Outcome::delivered(reply("250 2.0.0 OK")))
}

fn temporary(rcpt: &str, text: &str) -> RecipientResult {
    result(rcpt, Outcome::new(Reason::Deferred, reply(text)))
}

fn permanent(rcpt: &str, text: &str) -> RecipientResult {
    result(rcpt, Outcome::new(Reason::Refused, reply(text)))
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn parse_time(s: &str) -> SystemTime {
    humantime::parse_rfc3339(s).expect("RFC 3339 time")
}

#[tokio::test]
async fn enqueue_is_listed_with_exact_fields() {
    let tmp = TempDir::new().expect("tempdir");
    let dir = tmp.path().join("spool");
    let q = open(&dir).await;
    let before = SystemTime::now() - Duration::from_secs(1);
    let body = b"Subject: hi\r\n\r\nhello\r\n";
    let id = within(q.enqueue(
        msg(
            "acct-a",
            &["x@example.org", "y@example.org", "x@example.org"],
        ),
        body,
    ))
    .await
    .expect("enqueue");
    let after = SystemTime::now() + Duration::from_secs(1);

    // The id is 16 uppercase hex digits and round-trips.
    assert_eq!(id.to_string().len(), 16);
    assert!(id
        .to_string()
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b)));
    assert_eq!(id.to_string().parse::<QueueId>().expect("parse"), id);

    // Files: the relay's lock and the store, nothing left in tmp (a
    // small body is in the database).
    assert_eq!(
        names(&dir),
        [
            "bodies",
            "lock",
            "queue.sqlite",
            "queue.sqlite-open",
            "queue.sqlite-shm",
            "queue.sqlite-wal",
            "tmp"
        ]
    );
    assert!(names(&dir.join("tmp")).is_empty());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for d in [dir.clone(), dir.join("tmp")] {
            let mode = std::fs::metadata(&d).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
    }

    let entries = q.list().await.expect("list");
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    assert_eq!(e.id, id.to_string());
    assert_eq!(e.state, State::Queued);
    assert_eq!(e.sender, "app@example.com");
    assert_eq!(e.recipients, vec!["x@example.org", "y@example.org"]);
    assert_eq!(e.account, "acct-a");
    assert_eq!(e.attempts, 0);
    assert_eq!(e.size, body.len() as u64);
    assert_eq!(e.last_error, None);
    assert_eq!(e.received_at.len(), "2024-01-01T00:00:00Z".len());
    assert!(e.received_at.ends_with('Z'));
    let received = parse_time(&e.received_at);
    assert!(received >= before && received <= after, "{}", e.received_at);
    assert_eq!(e.next_attempt.as_deref(), Some(e.received_at.as_str()));
    assert_eq!(e.recipient_status.len(), 2);
    for (s, addr) in e
        .recipient_status
        .iter()
        .zip(["x@example.org", "y@example.org"])
    {
        assert_eq!(s.address, addr);
        assert_eq!(s.status, RecipientState::Pending);
        assert_eq!(s.reply, None);
    }

    let json = serde_json::to_value(e).expect("json");
    assert_eq!(json["state"], "queued");
    assert_eq!(json["recipient_status"][0]["status"], "pending");
    assert_eq!(json["last_error"], serde_json::Value::Null);

    assert_eq!(q.depth().await.expect("depth"), 1);
    assert_eq!(
        q.accounts_with_mail().await.expect("accounts"),
        vec!["acct-a".to_string()]
    );
}

#[tokio::test]
async fn enqueue_without_recipients_is_refused() {
    let (_tmp, q) = fresh().await;
    let err = q.enqueue(msg("a", &[]), b"x").await.expect_err("refused");
    assert!(matches!(err, QueueError::Invalid { .. }), "{err}");
    assert!(q.list().await.expect("list").is_empty());
}

#[tokio::test]
async fn lease_and_body_are_exact() {
    let (_tmp, q) = fresh().await;
    let mut body =
        b"From: a\r\nTo: b\r\n\r\nline\r\n\x00nul\xff\xfe\x80 8bit\nbare LF\r\r\n.\r\n..dot\r\n"
            .to_vec();
    body.extend((0..=255u8).cycle().take(70_000));
    let mut m = msg("acct", &["r@example.org"]);
    m.sender = String::new();
    let id = within(q.enqueue(m, &body)).await.expect("enqueue");

    let l = lease(&q, "acct").await;
    assert_eq!(l.id, id);
    assert_eq!(l.sender, "");
    assert_eq!(l.account, "acct");
    assert_eq!(l.attempts, 0);
    assert_eq!(l.recipients, vec!["r@example.org"]);
    assert_eq!(l.size, body.len() as u64);
    assert_eq!(l.client, Some("192.0.2.7".parse().expect("ip")));
    assert!(
        SystemTime::now()
            .duration_since(l.received_at)
            .expect("past")
            < Duration::from_secs(5)
    );

    let read = go(within(q.begin(&l)).await);
    assert!(read == body, "body differs");

    // Leased: not handed out twice.
    nothing_due(&q, "acct", Duration::from_millis(50)).await;
    drop(l);
}

#[tokio::test]
async fn delivered_removes_the_message() {
    let (tmp, q) = fresh().await;
    enqueue(&q, "acct", &["a@x", "b@x"], b"body").await;
    let l = lease(&q, "acct").await;
    let d = record(&q, l, vec![delivered("a@x"), delivered("b@x")]).await;
    assert_eq!(d, Disposition::Removed);
    assert!(names(&tmp.path().join("tmp")).is_empty());
    assert!(q.list().await.expect("list").is_empty());
    assert_eq!(q.depth().await.expect("depth"), 0);
    assert!(q.accounts_with_mail().await.expect("accounts").is_empty());
    nothing_due(&q, "acct", Duration::from_millis(200)).await;
}

#[tokio::test]
async fn temporary_defers_with_backoff() {
    let (_tmp, q) = fresh().await;
    let id = enqueue(&q, "acct", &["a@x"], b"body").await;

    // Attempt 1 → retry after 100 ms ± 20%.
    let l = lease(&q, "acct").await;
    let now = SystemTime::now();
    let recorded = Instant::now();
    let d = record(&q, l, vec![temporary("a@x", "451 4.7.0 try later")]).await;
    let delay = deferred_for(d, now);
    assert!(
        delay >= Duration::from_millis(79) && delay <= Duration::from_millis(700),
        "{delay:?}"
    );

    let e = &q.list().await.expect("list")[0];
    assert_eq!(e.id, id.to_string());
    assert_eq!(e.state, State::Deferred);
    assert_eq!(e.attempts, 1);
    assert_eq!(e.last_error.as_deref(), Some("451 4.7.0 try later"));
    assert!(e.next_attempt.is_some());
    assert_eq!(e.recipient_status[0].status, RecipientState::Deferred);
    assert_eq!(
        e.recipient_status[0].reply.as_deref(),
        Some("451 4.7.0 try later")
    );
    assert_eq!(q.depth().await.expect("depth"), 1);

    // Not due before the backoff, due after it; a waiting worker wakes on time.
    let l = lease(&q, "acct").await;
    let waited = recorded.elapsed();
    assert!(
        waited >= Duration::from_millis(75),
        "handed out after {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(2),
        "handed out after {waited:?}"
    );
    assert_eq!(l.id, id);
    assert_eq!(l.attempts, 1);
    assert_eq!(l.recipients, vec!["a@x"]);

    // Attempt 2 → 200 ms ± 20%.
    let now = SystemTime::now();
    let d = record(&q, l, vec![temporary("a@x", "452 full")]).await;
    let delay = deferred_for(d, now);
    assert!(
        delay >= Duration::from_millis(159) && delay <= Duration::from_millis(800),
        "{delay:?}"
    );
    let e = &q.list().await.expect("list")[0];
    assert_eq!(e.attempts, 2);
    assert_eq!(e.last_error.as_deref(), Some("452 full"));

    let l = lease(&q, "acct").await;
    assert_eq!(l.attempts, 2);
    let d = record(&q, l, vec![delivered("a@x")]).await;
    assert_eq!(d, Disposition::Removed);
}

#[tokio::test]
async fn permanent_fails_and_is_never_due_again() {
    let (tmp, q) = fresh().await;
    let id = enqueue(&q, "acct", &["a@x", "b@x"], b"body").await;
    let l = lease(&q, "acct").await;
    let d = record(
        &q,
        l,
        vec![
            permanent("a@x", "550 5.1.1 no such user"),
            permanent("b@x", "550 5.7.1 denied"),
        ],
    )
    .await;
    assert_eq!(d, Disposition::Failed);
    assert_eq!(q.depth().await.expect("depth"), 0);
    assert!(q.accounts_with_mail().await.expect("accounts").is_empty());

    async fn check(q: &Queue, id: &QueueId) {
        let entries = q.list().await.expect("list");
        assert_eq!(entries.len(), 1);
        let e = &entries[0];
        assert_eq!(e.id, id.to_string());
        assert_eq!(e.state, State::Failed);
        assert_eq!(e.attempts, 1);
        assert_eq!(e.next_attempt, None);
        assert_eq!(e.last_error.as_deref(), Some("550 5.7.1 denied"));
        assert_eq!(e.recipient_status[0].status, RecipientState::Failed);
        assert_eq!(
            e.recipient_status[0].reply.as_deref(),
            Some("550 5.1.1 no such user")
        );
        let json = serde_json::to_value(e).expect("json");
        assert_eq!(json["state"], "failed");
        assert_eq!(json["next_attempt"], serde_json::Value::Null);
        assert_eq!(json["recipient_status"][1]["status"], "failed");
    }
    check(&q, &id).await;
    nothing_due(&q, "acct", Duration::from_millis(300)).await;

    // Still failed, still stored with its body, still not due after a restart.
    drop(q);
    let q = open(tmp.path()).await;
    assert_eq!(q.depth().await.expect("depth"), 0);
    check(&q, &id).await;
    assert_eq!(within(q.body(&id)).await.expect("body"), b"body");
    nothing_due(&q, "acct", Duration::from_millis(300)).await;
}

#[tokio::test]
async fn mixed_results_retry_only_the_deferred_recipient() {
    let (_tmp, q) = fresh().await;
    enqueue(&q, "acct", &["a@x", "b@x", "c@x"], b"body").await;
    let l = lease(&q, "acct").await;
    assert_eq!(l.recipients, vec!["a@x", "b@x", "c@x"]);
    let d = record(
        &q,
        l,
        vec![
            delivered("a@x"),
            temporary("b@x", "421 busy"),
            permanent("c@x", "550 nope"),
        ],
    )
    .await;
    assert!(matches!(d, Disposition::Deferred { .. }), "{d:?}");
    let e = &q.list().await.expect("list")[0];
    let statuses: Vec<RecipientState> = e.recipient_status.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [
            RecipientState::Delivered,
            RecipientState::Deferred,
            RecipientState::Failed
        ]
    );
    // The last non-success reply of the attempt.
    assert_eq!(e.last_error.as_deref(), Some("550 nope"));

    let l = lease(&q, "acct").await;
    assert_eq!(l.recipients, vec!["b@x"]);
    let d = record(&q, l, vec![delivered("b@x")]).await;
    // c@x failed, so the message is failed, not removed.
    assert_eq!(d, Disposition::Failed);
    let e = &q.list().await.expect("list")[0];
    assert_eq!(e.state, State::Failed);
    assert_eq!(e.recipient_status[1].status, RecipientState::Delivered);
    assert_eq!(e.last_error.as_deref(), Some("550 nope"));
}

#[tokio::test]
async fn mixed_delivered_and_deferred_ends_removed() {
    let (_tmp, q) = fresh().await;
    enqueue(&q, "acct", &["a@x", "b@x"], b"body").await;
    let l = lease(&q, "acct").await;
    let d = record(&q, l, vec![delivered("a@x"), temporary("b@x", "421 busy")]).await;
    assert!(matches!(d, Disposition::Deferred { .. }), "{d:?}");
    let l = lease(&q, "acct").await;
    assert_eq!(l.recipients, vec!["b@x"]);
    let d = record(&q, l, vec![delivered("b@x")]).await;
    assert_eq!(d, Disposition::Removed);
    assert!(q.list().await.expect("list").is_empty());
}

#[tokio::test]
async fn expired_message_fails() {
    let tmp = TempDir::new().expect("tempdir");
    let mut s = settings(tmp.path());
    s.max_age = Duration::from_millis(50);
    let q = within(Queue::open(s)).await.expect("open");
    enqueue(&q, "acct", &["a@x", "b@x"], b"body").await;
    let l = lease(&q, "acct").await;
    tokio::time::sleep(Duration::from_millis(80)).await;
    let d = record(&q, l, vec![delivered("a@x"), temporary("b@x", "451 later")]).await;
    assert_eq!(d, Disposition::Failed);
    let e = &q.list().await.expect("list")[0];
    assert_eq!(e.state, State::Failed);
    assert_eq!(e.next_attempt, None);
    assert_eq!(e.recipient_status[0].status, RecipientState::Delivered);
    assert_eq!(e.recipient_status[1].status, RecipientState::Failed);
    assert_eq!(
        e.recipient_status[1].reply.as_deref(),
        Some("gave up after 50ms: 451 later")
    );
    assert_eq!(
        e.last_error.as_deref(),
        Some("gave up after 50ms: 451 later")
    );
    nothing_due(&q, "acct", Duration::from_millis(200)).await;
}

#[tokio::test]
async fn restart_finds_queued_messages_and_not_delivered_ones() {
    let tmp = TempDir::new().expect("tempdir");
    let q = open(tmp.path()).await;
    let first = enqueue(&q, "acct", &["a@x"], b"one").await;
    let second = enqueue(&q, "acct", &["a@x"], b"two").await;
    let third = enqueue(&q, "acct", &["a@x", "b@x"], b"three").await;
    assert!(first < second && second < third);

    // Oldest first.
    let l = lease(&q, "acct").await;
    assert_eq!(l.id, first);
    assert_eq!(
        record(&q, l, vec![delivered("a@x")]).await,
        Disposition::Removed
    );
    let l = lease(&q, "acct").await;
    assert_eq!(l.id, second);
    let l3 = lease(&q, "acct").await;
    assert_eq!(l3.id, third);
    record(&q, l3, vec![delivered("a@x"), temporary("b@x", "421 busy")]).await;

    // Simulated crash: the lease on `second` is never recorded (nor
    // released: the process is gone); the next relay on this embedded store
    // ends it at once.
    std::mem::forget(l);
    drop(q);
    let q = open(tmp.path()).await;
    assert_eq!(q.depth().await.expect("depth"), 2);
    assert_eq!(
        q.accounts_with_mail().await.expect("accounts"),
        vec!["acct".to_string()]
    );

    let mut seen = Vec::new();
    for _ in 0..2 {
        let l = lease(&q, "acct").await;
        if l.id == third {
            assert_eq!(l.recipients, vec!["b@x"]);
            assert_eq!(l.attempts, 1);
            assert_eq!(go(within(q.begin(&l)).await), b"three");
        } else {
            assert_eq!(l.attempts, 0);
            assert_eq!(go(within(q.begin(&l)).await), b"two");
        }
        seen.push(l.id.clone());
        let all: Vec<RecipientResult> = l.recipients.iter().map(|r| delivered(r)).collect();
        assert_eq!(record(&q, l, all).await, Disposition::Removed);
    }
    seen.sort();
    assert_eq!(seen, vec![second, third]);
    assert!(!seen.contains(&first));
    nothing_due(&q, "acct", Duration::from_millis(200)).await;

    // New ids still sort after the old ones.
    let fourth = enqueue(&q, "acct", &["a@x"], b"four").await;
    assert!(fourth > first);
}

/// Copies a directory tree (the fixture) into `to`.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for item in std::fs::read_dir(from).expect("read fixture") {
        let item = item.expect("entry");
        let target = to.join(item.file_name());
        if item.file_type().expect("type").is_dir() {
            copy_tree(&item.path(), &target);
        } else {
            std::fs::copy(item.path(), &target).expect("copy");
        }
    }
}

/// `tests/fixtures/old-queue` was written by the file queue of the release
/// before the store (main at 6948b14, through its public API): a queued
/// message, a deferred one (one recipient delivered, one throttled), a
/// failed one (account `other`), a held one with a 300 KB spooled body,
/// and a passthrough one whose client never got its answer. The test adds
/// what a crash and a bad disk leave.
#[tokio::test]
async fn an_old_queue_directory_is_imported_whole_and_removed() {
    let tmp = TempDir::new().expect("tempdir");
    let dir = tmp.path().join("queue");
    copy_tree(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/old-queue"),
        &dir,
    );
    // Crash leftovers: unfinished writes, a body whose metadata was never
    // committed, an admin request nobody answered.
    for d in ["tmp", "control", "corrupt"] {
        std::fs::create_dir_all(dir.join(d)).expect("mkdir");
    }
    std::fs::write(dir.join("tmp/0000000000000AAA.body"), b"partial").expect("write");
    std::fs::write(dir.join("control/1-2.req"), b"{}").expect("write");
    std::fs::write(dir.join("body/0000000000000BBB"), b"orphan").expect("write");
    // Corrupt entries: garbage with a body, valid metadata without its body,
    // one whose body was changed, and a directory where a file should be.
    std::fs::write(dir.join("meta/0000000000000CCC.json"), b"\x00 not json").expect("write");
    std::fs::write(dir.join("body/0000000000000CCC"), b"body of corrupt").expect("write");
    let queued = std::fs::read_to_string(dir.join("meta/661A16C7CE0A1BBE.json")).expect("read");
    std::fs::write(
        dir.join("meta/0000000000000DDD.json"),
        queued.replace("661A16C7CE0A1BBE", "0000000000000DDD"),
    )
    .expect("write");
    std::fs::write(
        dir.join("meta/0000000000000FFF.json"),
        queued.replace("661A16C7CE0A1BBE", "0000000000000FFF"),
    )
    .expect("write");
    std::fs::write(
        dir.join("body/0000000000000FFF"),
        b"Subject: one\r\n\r\nQUEUED\r\n",
    )
    .expect("write");
    std::fs::create_dir(dir.join("meta/0000000000000EEE.json")).expect("mkdir");

    let q = open(&dir).await;
    assert_eq!(
        names(&dir),
        [
            "bodies",
            "corrupt",
            "lock",
            "queue.sqlite",
            "queue.sqlite-open",
            "queue.sqlite-shm",
            "queue.sqlite-wal",
            "tmp"
        ]
    );
    assert!(names(&dir.join("tmp")).is_empty());
    assert_eq!(
        names(&dir.join("corrupt")),
        vec![
            "0000000000000CCC.body",
            "0000000000000CCC.json",
            "0000000000000CCC.reason",
            "0000000000000DDD.json",
            "0000000000000DDD.reason",
            "0000000000000EEE.json",
            "0000000000000EEE.reason",
            "0000000000000FFF.body",
            "0000000000000FFF.json",
            "0000000000000FFF.reason",
        ]
    );
    let unusable = q.unusable();
    let bad: Vec<&str> = unusable.iter().map(|u| u.id.as_str()).collect();
    assert_eq!(
        bad,
        [
            "0000000000000CCC",
            "0000000000000DDD",
            "0000000000000EEE",
            "0000000000000FFF"
        ]
    );
    assert!(
        unusable[1].reason.contains("is missing"),
        "{:?}",
        unusable[1]
    );
    assert!(unusable[3].reason.contains("SHA-256"), "{:?}", unusable[3]);

    let e = &within(q.list()).await.expect("list");
    let ids: Vec<&str> = e.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "661A16C7CE0A1BBE",
            "661A16C7D2433CD2",
            "661A16C7D588089E",
            "661A16C7D91A8480",
            "661A16C7E8B92CAF"
        ]
    );
    // The old bodies were linked into the store, not read into it.
    assert_eq!(names(&dir.join("bodies")), ids);
    // The queued one, exactly as the old queue listed it.
    assert_eq!(
        serde_json::to_value(&e[0]).expect("json"),
        serde_json::json!({
            "id": "661A16C7CE0A1BBE",
            "state": "queued",
            "sender": "app@contoso.com",
            "recipients": ["a@example.com"],
            "account": "main",
            "attempts": 0,
            "received_at": "2026-12-02T07:16:38Z",
            "next_attempt": "2026-12-02T07:16:38Z",
            "last_error": null,
            "size": 24,
            "recipient_status": [
                {"address": "a@example.com", "status": "pending", "reply": null}
            ],
            "held": false,
            "lease": null
        })
    );
    // Deferred: the delivered recipient stays delivered.
    assert_eq!(e[1].state, State::Deferred);
    assert_eq!(e[1].attempts, 1);
    assert_eq!(
        e[1].recipient_status
            .iter()
            .map(|r| r.status)
            .collect::<Vec<_>>(),
        [RecipientState::Delivered, RecipientState::Deferred]
    );
    assert_eq!(e[1].next_attempt.as_deref(), Some("2026-12-02T08:20:21Z"));
    // Failed, held (with its whole body), and the passthrough one failed
    // because its client, left without an answer, resends it.
    assert_eq!(e[2].state, State::Failed);
    assert_eq!(
        e[2].last_error.as_deref(),
        Some("550 5.1.10 550 5.1.10 RESOLVER.ADR.RecipientNotFound")
    );
    assert!(e[3].held);
    assert_eq!(e[3].size, 300_019);
    let held: QueueId = e[3].id.parse().expect("id");
    let body = within(q.body(&held)).await.expect("body");
    assert!(body.starts_with(b"Subject: four\r\n\r\nabc"));
    assert_eq!(body.len(), 300_019);
    assert_eq!(e[4].state, State::Failed);
    assert!(
        e[4].last_error
            .as_deref()
            .is_some_and(|t| t.contains("passthrough")),
        "{:?}",
        e[4].last_error
    );

    // The queued one is delivered as usual, body intact.
    let l = lease(&q, "main").await;
    assert_eq!(l.id.as_str(), "661A16C7CE0A1BBE");
    assert_eq!(
        go(within(q.begin(&l)).await),
        b"Subject: one\r\n\r\nqueued\r\n"
    );
    assert_eq!(
        record(&q, l, vec![delivered("a@example.com")]).await,
        Disposition::Removed
    );
    // Next: the deferred one once its recorded next attempt has come (the
    // fixture's clock), never the held, failed or passthrough ones.
    let deferred_due = SystemTime::now() >= parse_time("2026-12-02T08:20:21Z");
    match within(q.next_due("main", Some(Duration::from_millis(100)))).await {
        Some(l) => {
            assert!(deferred_due, "{l:?}");
            assert_eq!(l.id.as_str(), "661A16C7D2433CD2");
            assert_eq!(l.recipients, ["b@example.com"]);
            let d = record(&q, l, vec![delivered("b@example.com")]).await;
            assert_eq!(d, Disposition::Removed);
        }
        None => assert!(!deferred_due),
    }
    nothing_due(&q, "main", Duration::from_millis(100)).await;

    // Opening again imports nothing twice.
    drop(q);
    let q = open(&dir).await;
    let left = if deferred_due { 3 } else { 4 };
    assert_eq!(q.list().await.expect("list").len(), left);
}

#[tokio::test]
async fn dropping_a_lease_releases_the_message() {
    let (_tmp, q) = fresh().await;
    let id = enqueue(&q, "acct", &["a@x"], b"body").await;
    let l = lease(&q, "acct").await;
    let dropped = Instant::now();
    drop(l);
    let l = lease(&q, "acct").await;
    assert!(
        dropped.elapsed() >= Duration::from_millis(95),
        "{:?}",
        dropped.elapsed()
    );
    assert_eq!(l.id, id);
    assert_eq!(l.attempts, 0);

    // A worker that panics while holding the lease does not strand the mail.
    let q2 = q.clone();
    let worker = tokio::spawn(async move {
        let _held = l;
        let _q = q2;
        panic!("worker crashed");
    });
    assert!(within(worker).await.is_err());
    let l = lease(&q, "acct").await;
    assert_eq!(l.id, id);
    assert_eq!(q.list().await.expect("list")[0].state, State::Queued);
}

#[tokio::test]
async fn accounts_are_scheduled_independently() {
    let (_tmp, q) = fresh().await;

    // A worker already waiting on an account is woken by an enqueue for it.
    let waiter = {
        let q = q.clone();
        tokio::spawn(async move { q.next_due("b", None).await.map(|l| (l.id.clone(), l)) })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let a = enqueue(&q, "a", &["x@a"], b"a").await;
    assert_eq!(
        q.accounts_with_mail().await.expect("accounts"),
        vec!["a".to_string()]
    );
    let b = enqueue(&q, "b", &["x@b"], b"b").await;
    let (got_b, lease_b) = within(waiter).await.expect("join").expect("lease");
    assert_eq!(got_b, b);
    assert_eq!(
        q.accounts_with_mail().await.expect("accounts"),
        vec!["a".to_string(), "b".to_string()]
    );

    let lease_a = lease(&q, "a").await;
    assert_eq!(lease_a.id, a);
    // Each account sees only its own mail, and nothing is handed out twice.
    nothing_due(&q, "a", Duration::from_millis(50)).await;
    nothing_due(&q, "b", Duration::from_millis(50)).await;
    nothing_due(&q, "c", Duration::from_millis(50)).await;

    // Deferring a's message does not hold up b's next one.
    record(&q, lease_a, vec![temporary("x@a", "421")]).await;
    let b2 = enqueue(&q, "b", &["y@b"], b"b2").await;
    let l = within(q.next_due("b", Some(Duration::from_millis(50))))
        .await
        .expect("due");
    assert_eq!(l.id, b2);
    drop(l);
    drop(lease_b);
    assert_eq!(q.depth().await.expect("depth"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_enqueues_get_unique_ids() {
    let (_tmp, q) = fresh().await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            let body = format!("message {i}");
            q.enqueue(msg(&format!("acct{}", i % 3), &["a@x"]), body.as_bytes())
                .await
        }));
    }
    let mut ids = HashSet::new();
    for t in tasks {
        let id = within(t).await.expect("join").expect("enqueue");
        assert!(ids.insert(id.clone()), "duplicate id {id}");
    }
    assert_eq!(ids.len(), 200);
    assert_eq!(q.depth().await.expect("depth"), 200);
    let entries = q.list().await.expect("list");
    assert_eq!(entries.len(), 200);
    assert!(entries.windows(2).all(|w| w[0].id < w[1].id));

    // Several workers per account drain everything exactly once.
    let mut workers = Vec::new();
    for w in 0..6 {
        let q = q.clone();
        workers.push(tokio::spawn(async move {
            let account = format!("acct{}", w % 3);
            let mut got = Vec::new();
            while let Some(l) = q.next_due(&account, Some(Duration::from_millis(200))).await {
                got.push(l.id.clone());
                let r = l.recipients.iter().map(|r| delivered(r)).collect();
                q.record(l, r).await.expect("record");
            }
            got
        }));
    }
    let mut delivered_ids = HashSet::new();
    for w in workers {
        for id in within(w).await.expect("join") {
            assert!(delivered_ids.insert(id), "handed out twice");
        }
    }
    assert_eq!(delivered_ids, ids);
    assert_eq!(q.depth().await.expect("depth"), 0);
    assert!(q.list().await.expect("list").is_empty());
}

#[tokio::test]
async fn next_due_is_cancel_safe() {
    let (_tmp, q) = fresh().await;
    let mut expected = HashSet::new();
    for i in 0..20 {
        expected.insert(
            within(q.enqueue(msg("acct", &["a@x"]), format!("{i}").as_bytes()))
                .await
                .expect("enqueue"),
        );
    }
    let mut got = HashSet::new();
    let deadline = Instant::now() + LIMIT;
    for round in 0.. {
        if got.len() == expected.len() {
            break;
        }
        assert!(Instant::now() < deadline, "messages lost");
        // every other wait is cut short: a lease is taken in a task of its
        // own, so the caller is often gone before it is
        let patience = match round % 2 {
            0 => Duration::from_millis(1),
            _ => LIMIT,
        };
        tokio::select! {
            l = q.next_due("acct", None) => {
                let l = l.expect("lease");
                got.insert(l.id.clone());
                record(&q, l, vec![delivered("a@x")]).await;
            }
            _ = tokio::time::sleep(patience) => {}
        }
    }
    assert_eq!(got, expected);
    assert_eq!(q.depth().await.expect("depth"), 0);
}

#[tokio::test]
async fn record_with_a_foreign_lease_is_refused() {
    let one = TempDir::new().expect("tempdir");
    let two = TempDir::new().expect("tempdir");
    let q1 = open(one.path()).await;
    let q2 = open(two.path()).await;
    within(q1.enqueue(msg("acct", &["a@x"]), b"x"))
        .await
        .expect("enqueue");
    let l = lease(&q1, "acct").await;
    assert!(matches!(q2.begin(&l).await, Begin::Stop), "a foreign lease");
    let err = q2
        .record(l, vec![delivered("a@x")])
        .await
        .expect_err("foreign");
    assert!(matches!(err, QueueError::NotLeased { .. }), "{err}");
    // The lease went back to its own queue.
    let l = lease(&q1, "acct").await;
    assert_eq!(
        within(q1.record(l, vec![delivered("a@x")]))
            .await
            .expect("record")
            .disposition,
        Disposition::Removed
    );
}

/// The body [`Queue::begin`] handed out; panics if it said not to send.
fn go(begun: Begin) -> Vec<u8> {
    match begun {
        Begin::Go(body) => body,
        other => panic!("not to be sent: {other:?}"),
    }
}

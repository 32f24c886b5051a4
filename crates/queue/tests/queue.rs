//! Behaviour of the queue against real files in a temporary directory.

use std::collections::HashSet;
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use relay_outcome::{Reason, Reply};
use relay_queue::{
    list, Disposition, Lease, NewMessage, Outcome, Queue, QueueError, QueueId, QueueSettings,
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

    // Files: committed meta and body, nothing left in tmp.
    assert_eq!(names(&dir.join("meta")), vec![format!("{id}.json")]);
    assert_eq!(names(&dir.join("body")), vec![id.to_string()]);
    assert!(names(&dir.join("tmp")).is_empty());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for d in [
            dir.clone(),
            dir.join("meta"),
            dir.join("body"),
            dir.join("tmp"),
        ] {
            let mode = std::fs::metadata(&d).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
    }

    let entries = list(&dir).expect("list");
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

    assert_eq!(q.depth(), 1);
    assert_eq!(q.accounts_with_mail(), vec!["acct-a".to_string()]);
}

#[tokio::test]
async fn enqueue_without_recipients_is_refused() {
    let (tmp, q) = fresh().await;
    let err = q.enqueue(msg("a", &[]), b"x").await.expect_err("refused");
    assert!(matches!(err, QueueError::Invalid { .. }), "{err}");
    assert!(list(tmp.path()).expect("list").is_empty());
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

    let read = within(q.read_body(&l)).await.expect("read body");
    assert!(read == body, "body differs");

    // Leased: not handed out twice.
    nothing_due(&q, "acct", Duration::from_millis(50)).await;
    drop(l);
}

#[tokio::test]
async fn delivered_removes_meta_and_body() {
    let (tmp, q) = fresh().await;
    enqueue(&q, "acct", &["a@x", "b@x"], b"body").await;
    let l = lease(&q, "acct").await;
    let d = record(&q, l, vec![delivered("a@x"), delivered("b@x")]).await;
    assert_eq!(d, Disposition::Removed);
    assert!(names(&tmp.path().join("meta")).is_empty());
    assert!(names(&tmp.path().join("body")).is_empty());
    assert!(names(&tmp.path().join("tmp")).is_empty());
    assert!(list(tmp.path()).expect("list").is_empty());
    assert_eq!(q.depth(), 0);
    assert!(q.accounts_with_mail().is_empty());
    nothing_due(&q, "acct", Duration::from_millis(200)).await;
}

#[tokio::test]
async fn temporary_defers_with_backoff() {
    let (tmp, q) = fresh().await;
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

    let e = &list(tmp.path()).expect("list")[0];
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
    assert_eq!(q.depth(), 1);

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
    let e = &list(tmp.path()).expect("list")[0];
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
    assert_eq!(q.depth(), 0);
    assert!(q.accounts_with_mail().is_empty());

    let check = |dir: &Path| {
        let entries = list(dir).expect("list");
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
    };
    check(tmp.path());
    nothing_due(&q, "acct", Duration::from_millis(300)).await;

    // Still failed, still on disk, still not due after a restart.
    drop(q);
    let q = open(tmp.path()).await;
    assert_eq!(q.depth(), 0);
    check(tmp.path());
    assert_eq!(names(&tmp.path().join("body")), vec![id.to_string()]);
    nothing_due(&q, "acct", Duration::from_millis(300)).await;
}

#[tokio::test]
async fn mixed_results_retry_only_the_deferred_recipient() {
    let (tmp, q) = fresh().await;
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
    let e = &list(tmp.path()).expect("list")[0];
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
    let e = &list(tmp.path()).expect("list")[0];
    assert_eq!(e.state, State::Failed);
    assert_eq!(e.recipient_status[1].status, RecipientState::Delivered);
    assert_eq!(e.last_error.as_deref(), Some("550 nope"));
}

#[tokio::test]
async fn mixed_delivered_and_deferred_ends_removed() {
    let (tmp, q) = fresh().await;
    enqueue(&q, "acct", &["a@x", "b@x"], b"body").await;
    let l = lease(&q, "acct").await;
    let d = record(&q, l, vec![delivered("a@x"), temporary("b@x", "421 busy")]).await;
    assert!(matches!(d, Disposition::Deferred { .. }), "{d:?}");
    let l = lease(&q, "acct").await;
    assert_eq!(l.recipients, vec!["b@x"]);
    let d = record(&q, l, vec![delivered("b@x")]).await;
    assert_eq!(d, Disposition::Removed);
    assert!(list(tmp.path()).expect("list").is_empty());
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
    let e = &list(tmp.path()).expect("list")[0];
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
    let (tmp, q) = fresh().await;
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

    // A second relay cannot open the same directory.
    let err = Queue::open(settings(tmp.path())).await.expect_err("locked");
    assert!(matches!(err, QueueError::Locked { .. }), "{err}");

    // Simulated crash: the lease on `second` is never recorded.
    drop(q);
    drop(l);
    let q = open(tmp.path()).await;
    assert_eq!(q.depth(), 2);
    assert_eq!(q.accounts_with_mail(), vec!["acct".to_string()]);

    let mut seen = Vec::new();
    for _ in 0..2 {
        let l = lease(&q, "acct").await;
        if l.id == third {
            assert_eq!(l.recipients, vec!["b@x"]);
            assert_eq!(l.attempts, 1);
            assert_eq!(within(q.read_body(&l)).await.expect("body"), b"three");
        } else {
            assert_eq!(l.attempts, 0);
            assert_eq!(within(q.read_body(&l)).await.expect("body"), b"two");
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

#[tokio::test]
async fn open_cleans_leftovers_and_sets_corrupt_entries_aside() {
    let tmp = TempDir::new().expect("tempdir");
    let dir = tmp.path();
    let q = open(dir).await;
    let good = enqueue(&q, "acct", &["a@x"], b"good").await;
    drop(q);

    // Crash leftovers: unfinished writes, a body whose meta was never committed.
    std::fs::write(dir.join("tmp/0000000000000AAA.body"), b"partial").expect("write");
    std::fs::write(dir.join("tmp/0000000000000AAA.json"), b"{\"ver").expect("write");
    std::fs::create_dir(dir.join("tmp/stray-dir")).expect("mkdir");
    std::fs::write(dir.join("body/0000000000000BBB"), b"orphan").expect("write");
    // Corrupt entries: garbage metadata with a body, valid-looking metadata without body.
    std::fs::write(dir.join("meta/0000000000000CCC.json"), b"\x00 not json").expect("write");
    std::fs::write(dir.join("body/0000000000000CCC"), b"body of corrupt").expect("write");
    let mut good_meta =
        std::fs::read_to_string(dir.join(format!("meta/{good}.json"))).expect("read");
    good_meta = good_meta.replace(good.as_str(), "0000000000000DDD");
    std::fs::write(dir.join("meta/0000000000000DDD.json"), good_meta).expect("write");

    // A metadata entry that is a directory, and one in a directory.
    std::fs::create_dir(dir.join("meta/0000000000000EEE.json")).expect("mkdir");

    // survey (read-only, another process) reports the bad entries by name
    // and lists the rest.
    let survey = relay_queue::survey(dir).expect("one bad entry fails nothing");
    assert_eq!(survey.entries.len(), 2);
    let bad: Vec<&str> = survey.unusable.iter().map(|u| u.id.as_str()).collect();
    assert_eq!(bad, ["0000000000000CCC", "0000000000000EEE"]);
    assert!(survey.unusable[0].reason.contains("0000000000000CCC.json"));
    assert!(!survey.unusable[0].set_aside);

    let q = open(dir).await;
    assert!(names(&dir.join("tmp")).is_empty());
    assert_eq!(names(&dir.join("body")), vec![good.to_string()]);
    assert_eq!(names(&dir.join("meta")), vec![format!("{good}.json")]);
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
        ]
    );
    assert_eq!(q.depth(), 1);
    let survey = relay_queue::survey(dir).expect("survey");
    assert!(survey.unusable.iter().all(|u| u.set_aside));
    assert_eq!(survey.unusable.len(), 3);
    assert!(
        survey.unusable[1].reason.contains("is missing"),
        "{:?}",
        survey.unusable[1]
    );
    let entries = list(dir).expect("list");
    assert_eq!(entries.len(), 1);
    let l = lease(&q, "acct").await;
    assert_eq!(l.id, good);
    assert_eq!(within(q.read_body(&l)).await.expect("body"), b"good");
}

#[tokio::test]
async fn dropping_a_lease_releases_the_message() {
    let (tmp, q) = fresh().await;
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
    assert_eq!(list(tmp.path()).expect("list")[0].state, State::Queued);
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
    assert_eq!(q.accounts_with_mail(), vec!["a".to_string()]);
    let b = enqueue(&q, "b", &["x@b"], b"b").await;
    let (got_b, lease_b) = within(waiter).await.expect("join").expect("lease");
    assert_eq!(got_b, b);
    assert_eq!(
        q.accounts_with_mail(),
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
    assert_eq!(q.depth(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_enqueues_get_unique_ids() {
    let (tmp, q) = fresh().await;
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
    assert_eq!(q.depth(), 200);
    let entries = list(tmp.path()).expect("list");
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
    assert_eq!(q.depth(), 0);
    assert!(list(tmp.path()).expect("list").is_empty());
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
    while got.len() < expected.len() {
        assert!(Instant::now() < deadline, "messages lost");
        tokio::select! {
            l = q.next_due("acct", None) => {
                let l = l.expect("lease");
                got.insert(l.id.clone());
                record(&q, l, vec![delivered("a@x")]).await;
            }
            _ = tokio::task::yield_now() => {}
        }
    }
    assert_eq!(got, expected);
    assert_eq!(q.depth(), 0);
}

#[tokio::test]
async fn list_of_missing_or_empty_directory() {
    let tmp = TempDir::new().expect("tempdir");
    assert!(list(tmp.path()).expect("empty dir").is_empty());
    // before the first run there is no queue yet: an empty one
    assert!(list(&tmp.path().join("nope")).expect("missing").is_empty());
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
    let err = q2.read_body(&l).await.expect_err("foreign");
    assert!(matches!(err, QueueError::NotLeased { .. }), "{err}");
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

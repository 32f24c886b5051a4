//! Corrupt bodies, hold/release, spooled bodies, a world-writable queue
//! directory, an old entry without a checksum.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use relay_queue::{Begin, NewMessage, Outcome, Queue, QueueSettings, RecipientResult, Selection};
use tempfile::TempDir;

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("timed out")
}

fn settings(dir: &Path) -> QueueSettings {
    QueueSettings {
        dir: dir.to_path_buf(),
        database: None,
        lease_timeout: Duration::from_secs(60),
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_secs(1),
        max_age: Duration::from_secs(3600),
    }
}

fn msg() -> NewMessage {
    NewMessage {
        sender: "app@example.com".into(),
        recipients: vec!["a@x".into()],
        account: "acct".into(),
        client: None,
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_body_changed_in_the_store_is_held_not_delivered() {
    let tmp = TempDir::new().expect("tempdir");
    let q = within(Queue::open(settings(tmp.path())))
        .await
        .expect("open");
    let id = within(q.enqueue(msg(), b"Subject: x\r\n\r\nhello\r\n"))
        .await
        .expect("enqueue");
    // same size, different bytes: only the checksum can tell
    let db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        tmp.path().join("queue.sqlite").display()
    ))
    .await
    .expect("open the store");
    sqlx::query("UPDATE bodies SET body = $1")
        .bind(&b"Subject: x\r\n\r\nHELLO\r\n"[..])
        .execute(&db)
        .await
        .expect("overwrite");
    db.close().await;
    let lease = within(q.next_due("acct", None)).await.expect("lease");
    let Begin::Unreadable(err) = within(q.begin(&lease)).await else {
        panic!("a corrupt body was not refused");
    };
    assert!(err.to_string().contains("checksum"), "{err}");
    drop(lease);
    let got = within(q.next_due("acct", Some(Duration::from_millis(300)))).await;
    assert!(got.is_none(), "handed out again: {got:?}");
    let entries = within(q.list()).await.expect("list");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].id, id.as_str());
    assert!(entries[0].held);
}

/// The first releases wrote no checksum; such an entry is imported and
/// delivered.
#[tokio::test]
async fn an_old_entry_without_a_checksum_is_imported_and_delivered() {
    let tmp = TempDir::new().expect("tempdir");
    let id = "661A16C7CE0A1BBE";
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/old-queue");
    for d in ["meta", "body"] {
        std::fs::create_dir_all(tmp.path().join(d)).expect("mkdir");
    }
    let mut meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixture.join(format!("meta/{id}.json"))).expect("read"),
    )
    .expect("json");
    assert!(meta["sha256"].is_string());
    meta.as_object_mut().expect("object").remove("sha256");
    std::fs::write(
        tmp.path().join(format!("meta/{id}.json")),
        serde_json::to_vec(&meta).expect("encode"),
    )
    .expect("write");
    std::fs::copy(
        fixture.join(format!("body/{id}")),
        tmp.path().join(format!("body/{id}")),
    )
    .expect("copy");
    let q = within(Queue::open(settings(tmp.path())))
        .await
        .expect("open");
    let lease = within(q.next_due("main", None)).await.expect("lease");
    assert_eq!(lease.id.as_str(), id);
    assert_eq!(
        go(within(q.begin(&lease)).await),
        b"Subject: one\r\n\r\nqueued\r\n"
    );
}

#[tokio::test]
async fn held_messages_wait_for_release_across_restarts() {
    let tmp = TempDir::new().expect("tempdir");
    let q = within(Queue::open(settings(tmp.path())))
        .await
        .expect("open");
    let id = within(q.enqueue(msg(), b"x\r\n")).await.expect("enqueue");
    assert_eq!(
        within(q.hold(Selection::All)).await.expect("hold"),
        std::slice::from_ref(&id)
    );
    let got = within(q.next_due("acct", Some(Duration::from_millis(200)))).await;
    assert!(got.is_none());
    assert!(within(q.retry(Selection::All)).await.is_ok());
    let got = within(q.next_due("acct", Some(Duration::from_millis(200)))).await;
    assert!(got.is_none(), "retry released a held message");
    assert!(within(q.list()).await.expect("list")[0].held);
    drop(q);

    let q = within(Queue::open(settings(tmp.path())))
        .await
        .expect("reopen");
    let got = within(q.next_due("acct", Some(Duration::from_millis(200)))).await;
    assert!(got.is_none(), "held message delivered after a restart");
    let released = within(q.release_held(Selection::Id(id.clone())))
        .await
        .expect("release");
    assert_eq!(released, std::slice::from_ref(&id));
    let lease = within(q.next_due("acct", Some(Duration::from_secs(2))))
        .await
        .expect("due after release");
    assert_eq!(lease.id, id);
    // held while leased: after a deferral it stays out of the schedule
    within(q.hold(Selection::All)).await.expect("hold leased");
    let deferred = Outcome::new(
        relay_outcome::Reason::Deferred,
        relay_outcome::Reply::parse("451 later").expect("reply"),
    );
    within(q.record(
        lease,
        vec![RecipientResult {
            recipient: "a@x".into(),
            outcome: deferred,
        }],
    ))
    .await
    .expect("record");
    let got = within(q.next_due("acct", Some(Duration::from_millis(400)))).await;
    assert!(got.is_none(), "held while leased, yet handed out again");
    assert!(within(q.list()).await.expect("list")[0].held);

    // held while leased but not yet handed to the upstream: not sent
    within(q.release_held(Selection::All))
        .await
        .expect("release");
    let lease = within(q.next_due("acct", Some(Duration::from_secs(3))))
        .await
        .expect("due after release");
    within(q.hold(Selection::All)).await.expect("hold");
    assert!(
        matches!(q.begin(&lease).await, Begin::Stop),
        "a held message may not be sent"
    );
    drop(lease);
    let got = within(q.next_due("acct", Some(Duration::from_millis(400)))).await;
    assert!(got.is_none(), "held, yet handed out again");
}

#[tokio::test]
async fn spooled_bodies_are_committed_whole_or_leave_nothing() {
    let tmp = TempDir::new().expect("tempdir");
    let q = within(Queue::open(settings(tmp.path())))
        .await
        .expect("open");
    let body: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let mut writer = within(q.begin_body()).await.expect("begin");
    for chunk in body[..250_000].chunks(65_536) {
        within(writer.append(chunk)).await.expect("append");
    }
    // the spool file has no name: nothing to find, nothing left by a crash
    assert!(names(&tmp.path().join("tmp")).is_empty());
    let id = within(q.enqueue_spooled(msg(), writer, &body[250_000..]))
        .await
        .expect("enqueue");
    assert!(names(&tmp.path().join("tmp")).is_empty());
    // stored as the file it was spooled to, under its id
    assert_eq!(names(&tmp.path().join("bodies")), [id.to_string()]);
    let lease = within(q.next_due("acct", None)).await.expect("lease");
    assert_eq!(lease.id, id);
    assert_eq!(lease.size, body.len() as u64);
    assert_eq!(go(within(q.begin(&lease)).await), body);

    // a cancelled session drops its writer: nothing is stored
    let mut writer = within(q.begin_body()).await.expect("begin");
    within(writer.append(b"partial")).await.expect("append");
    drop(writer);
    assert!(names(&tmp.path().join("tmp")).is_empty());
    assert_eq!(within(q.list()).await.expect("list").len(), 1);
}

#[tokio::test]
async fn a_body_file_no_message_names_is_removed_at_open() {
    let tmp = TempDir::new().expect("tempdir");
    let q = within(Queue::open(settings(tmp.path())))
        .await
        .expect("open");
    let body = vec![b'x'; 300_000];
    let mut writer = within(q.begin_body()).await.expect("begin");
    within(writer.append(&body)).await.expect("append");
    let id = within(q.enqueue_spooled(msg(), writer, b"\r\n"))
        .await
        .expect("enqueue");
    drop(q);
    // as a crash between the body file and the commit leaves it
    std::fs::write(tmp.path().join("bodies/00000000000000FF"), b"half").expect("write");
    let q = within(Queue::open(settings(tmp.path())))
        .await
        .expect("reopen");
    assert_eq!(names(&tmp.path().join("bodies")), [id.to_string()]);
    let lease = within(q.next_due("acct", None)).await.expect("lease");
    assert_eq!(go(within(q.begin(&lease)).await).len(), 300_002);
}

#[cfg(unix)]
#[tokio::test]
async fn a_world_writable_queue_directory_is_made_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = TempDir::new().expect("tempdir");
    let dir = tmp.path().join("q");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let q = within(Queue::open(settings(&dir))).await.expect("open");
    let mode = std::fs::metadata(&dir).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    drop(q);
}

/// The body [`Queue::begin`] handed out; panics if it said not to send.
fn go(begun: Begin) -> Vec<u8> {
    match begun {
        Begin::Go(body) => body,
        other => panic!("not to be sent: {other:?}"),
    }
}

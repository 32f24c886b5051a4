//! Group commit: the writes that share one transaction (inserts,
//! removals of delivered messages, leases), the tasks that commit them,
//! and the store's operations that go through them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use sqlx::{Connection as _, Row};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use super::rows::{attach, message_of, recipients_of};
use super::{blocking, ms, ms_of, Pool, Store, SPOOLED_IN_MEMORY, SPOOLED_UNIT};
use crate::body::{Body, Spooled};
use crate::schema::Dialect;
use crate::types::{
    Envelope, LeaseHolder, Message, NewMessage, Progress, Recipient, RecipientState, Reply,
};
use crate::StoreError;

/// Batches committed at once on PostgreSQL, which overlaps their commits
/// (SQLite writes one transaction at a time: one task).
pub(super) const POSTGRES_COMMITTERS: usize = 4;
/// Inserts taken into one transaction at most.
pub(super) const MAX_BATCH: usize = 512;

/// A message ready for its transaction: its body placed and summed.
pub(super) struct Placed {
    envelope: Envelope,
    progress: Progress,
    held: bool,
    lease: Option<LeaseHolder>,
    size: u64,
    checksum: [u8; 32],
    /// The body to store in the database; `None`: it is a body file.
    inline: Option<Vec<u8>>,
}

/// Where the commit task answers a write.
pub(super) type Answer<T> = oneshot::Sender<Result<T, StoreError>>;

fn reply<T>(answer: Answer<T>, result: Result<T, StoreError>) {
    // The caller may have gone; nothing is owed to it then.
    let _ = answer.send(result);
}

/// A write the commit task batches with others into one transaction, and
/// where its answer goes.
pub(super) enum Write {
    /// A new message (boxed: the channel's slots stay small).
    Insert(Box<Placed>, Answer<()>),
    /// Delete a message this relay holds the lease on (delivered): whether
    /// it was still this relay's to delete.
    Remove(String, Answer<bool>),
    /// Lease an account's due messages to this relay: those leased.
    Lease(Due, Answer<Vec<Message>>),
}

impl Write {
    fn fail(self, e: StoreError) {
        match self {
            Write::Insert(_, answer) => reply(answer, Err(e)),
            Write::Remove(_, answer) => reply(answer, Err(e)),
            Write::Lease(_, answer) => reply(answer, Err(e)),
        }
    }
}

/// Which messages [`Write::Lease`] takes: up to `limit` of `account`'s
/// due at `now` (ms), leased until `expires` (ms).
pub(super) struct Due {
    account: String,
    now: i64,
    expires: i64,
    limit: i64,
}

/// What a committed batch did, for the answers.
struct Committed {
    /// The removals that applied.
    removed: std::collections::HashSet<String>,
    /// Each lease's messages, in the batch's order.
    leased: std::collections::VecDeque<Vec<Message>>,
}

impl Committed {
    fn answer(mut self, batch: impl IntoIterator<Item = Write>) {
        for write in batch {
            match write {
                Write::Insert(_, answer) => reply(answer, Ok(())),
                Write::Remove(id, answer) => reply(answer, Ok(self.removed.contains(&id))),
                Write::Lease(_, answer) => {
                    reply(answer, Ok(self.leased.pop_front().unwrap_or_default()))
                }
            }
        }
    }
}

/// A spooled body read into memory.
async fn read_spooled(spooled: Spooled) -> Result<Vec<u8>, StoreError> {
    let path = PathBuf::from("a spooled body");
    blocking(&path, "read back", move |_| spooled.read_all()).await
}

/// The lease of an account's due messages: `$lock` after the choice of
/// rows, where the engine takes row locks.
macro_rules! lease_due_sql {
    ($lock:literal) => {
        concat!(
            "UPDATE messages SET lease_relay = $1, lease_expires = $2
            WHERE id IN (SELECT id FROM messages
                WHERE account = $3 AND state <> 'failed' AND NOT held AND NOT passthrough
                  AND next_attempt <= $4
                  AND (lease_relay IS NULL OR lease_expires <= $4)
                ORDER BY next_attempt, id LIMIT $5",
            $lock,
            ")
            RETURNING ",
            message_columns!()
        )
    };
}

/// Rows per multi-row `INSERT` (at most 15 parameters each, well under
/// both engines' limits on parameters per statement).
pub(super) const ROWS_PER_STATEMENT: usize = 1000;

/// Inserts messages inside a transaction, three multi-row statements per
/// [`ROWS_PER_STATEMENT`] (a round trip per row would cost more than the
/// commit). With `$skip_existing` a message whose id is already stored is
/// left as it is (an import repeated); without, it fails the transaction.
/// Evaluates to the number of messages added. A macro so that one text
/// serves both engines (`$Db`).
macro_rules! insert_many {
    ($conn:expr, $Db:ty, $messages:expr, $skip_existing:expr) => {{
        let messages: &[&Placed] = $messages;
        let mut added = 0u64;
        for chunk in messages.chunks(ROWS_PER_STATEMENT) {
            let mut q = sqlx::QueryBuilder::<$Db>::new(
                "INSERT INTO messages (id, account, sender, client, received_at, state, attempts,
                     next_attempt, last_error, passthrough, held, size, checksum, lease_relay,
                     lease_expires, body_file) ",
            );
            q.push_values(chunk, |mut row, m| {
                let e = &m.envelope;
                row.push_bind(e.id.as_str())
                    .push_bind(e.account.as_str())
                    .push_bind(e.sender.as_str())
                    .push_bind(e.client.as_deref())
                    .push_bind(ms(e.received_at))
                    .push_bind(m.progress.state.as_str())
                    .push_bind(i64::from(m.progress.attempts))
                    .push_bind(m.progress.next_attempt.map(ms))
                    .push_bind(m.progress.last_error.as_deref())
                    .push_bind(e.passthrough)
                    .push_bind(m.held)
                    .push_bind(i64::try_from(m.size).unwrap_or(i64::MAX))
                    .push_bind(m.checksum.to_vec())
                    .push_bind(m.lease.as_ref().map(|l| l.relay.as_str()))
                    .push_bind(m.lease.as_ref().map(|l| ms(l.expires)))
                    .push_bind(m.inline.is_none());
            });
            if $skip_existing {
                q.push(" ON CONFLICT (id) DO NOTHING");
            }
            q.push(" RETURNING id");
            let ids: std::collections::HashSet<String> = q
                .build_query_scalar()
                .fetch_all(&mut *$conn)
                .await?
                .into_iter()
                .collect();
            let new: Vec<&Placed> = chunk
                .iter()
                .copied()
                .filter(|m| ids.contains(&m.envelope.id))
                .collect();
            if new.is_empty() {
                continue;
            }
            added += new.len() as u64;
            let inline: Vec<(&str, &[u8])> = new
                .iter()
                .filter_map(|m| Some((m.envelope.id.as_str(), m.inline.as_deref()?)))
                .collect();
            if !inline.is_empty() {
                let mut q =
                    sqlx::QueryBuilder::<$Db>::new("INSERT INTO bodies (message_id, body) ");
                q.push_values(&inline, |mut row, (id, body)| {
                    row.push_bind(*id).push_bind(*body);
                });
                q.build().execute(&mut *$conn).await?;
            }
            let recipients: Vec<(&str, i64, &Recipient)> = new
                .iter()
                .flat_map(|m| {
                    m.progress
                        .recipients
                        .iter()
                        .enumerate()
                        .map(|(position, r)| (m.envelope.id.as_str(), position as i64, r))
                })
                .collect();
            for rows in recipients.chunks(ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::<$Db>::new(
                    "INSERT INTO recipients (message_id, position, address, state, reply_code,
                         reply_enhanced, reply_text, reason) ",
                );
                q.push_values(rows, |mut row, (id, position, r)| {
                    row.push_bind(*id)
                        .push_bind(*position)
                        .push_bind(r.address.as_str())
                        .push_bind(r.state.as_str())
                        .push_bind(r.reply.as_ref().map(|r| i64::from(r.code)))
                        .push_bind(r.reply.as_ref().and_then(|r| r.enhanced.as_deref()))
                        .push_bind(r.reply.as_ref().map(|r| r.text.as_str()))
                        .push_bind(r.reason.as_deref());
                });
                q.build().execute(&mut *$conn).await?;
            }
        }
        added
    }};
}

/// Deletes the messages `$ids` (`&[&str]`) inside a transaction, with
/// `$holder` (`Option<&str>`) only those whose lease that relay holds;
/// their bodies and recipients go with them (`ON DELETE CASCADE`, one
/// statement).
/// Evaluates to the ids deleted, each with whether its body is a body file
/// (to be removed after the commit). A macro so that one text serves both
/// engines (`$Db`).
macro_rules! delete_many {
    ($conn:expr, $Db:ty, $ids:expr, $holder:expr) => {{
        let ids: &[&str] = $ids;
        let holder: Option<&str> = $holder;
        let mut deleted: Vec<(String, bool)> = Vec::new();
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let mut q = sqlx::QueryBuilder::<$Db>::new("DELETE FROM messages WHERE id");
            push_in!(q, chunk.iter().copied());
            if let Some(holder) = holder {
                q.push(" AND lease_relay = ").push_bind(holder);
            }
            q.push(" RETURNING id, body_file");
            let gone: Vec<(String, bool)> = q.build_query_as().fetch_all(&mut *$conn).await?;
            deleted.extend(gone);
        }
        deleted
    }};
}
pub(super) use delete_many;

/// A group-commit task (one on SQLite, [`POSTGRES_COMMITTERS`] taking
/// turns at the channel on PostgreSQL): takes whatever writes are waiting
/// (up to [`MAX_BATCH`]: inserts, removals of delivered messages, leases)
/// into one transaction, commits once, answers each. While a commit is in
/// flight new writes queue up in the channel and form the next batch, so
/// the batch size follows the load with no timer. A batch that fails
/// because of what one write holds (a duplicate id, a stored value this
/// build cannot read) is retried one write per transaction, so that the
/// write fails alone; any other error (the database unreachable) fails the
/// whole batch. The tasks end when every [`Store`] clone is dropped.
pub(super) async fn commit_task(
    pool: Pool,
    dialect: Dialect,
    relay: Arc<str>,
    bodies: Option<Arc<Path>>,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Write>>>,
    commits: Arc<AtomicU64>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // Answers the writes it commits and hands the vector back emptied, to
    // be filled again; writes that fail come back with the error.
    let commit = |mut writes: Vec<Write>| async {
        match write_batch(&pool, dialect, &relay, bodies.as_ref(), &writes).await {
            Ok(committed) => {
                commits.fetch_add(1, Ordering::Relaxed);
                committed.answer(writes.drain(..));
                Ok(writes)
            }
            Err(e) => Err((writes, e)),
        }
    };
    while rx.lock().await.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (failed, e) = match commit(batch).await {
            Ok(emptied) => {
                batch = emptied;
                continue;
            }
            Err(failed) => failed,
        };
        batch = Vec::with_capacity(MAX_BATCH);
        if failed.len() > 1 && one_write_failed(&e) {
            for write in failed {
                if let Err((mut one, e)) = commit(vec![write]).await {
                    if let Some(write) = one.pop() {
                        write.fail(StoreError::Batch(Arc::new(e)));
                    }
                }
            }
        } else {
            let e = Arc::new(e);
            for write in failed {
                write.fail(StoreError::Batch(e.clone()));
            }
        }
    }
}

/// Whether a batch may have failed because of what one of its writes holds
/// (a constraint, a stored value this build cannot read) rather than
/// because of the database (unreachable, full).
fn one_write_failed(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Database(
            sqlx::Error::Database(_) | sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_)
        ) | StoreError::Invalid { .. }
    )
}

/// Applies `writes` in one transaction: inserts, then removals, then
/// leases.
async fn write_batch(
    pool: &Pool,
    dialect: Dialect,
    relay: &str,
    bodies: Option<&Arc<Path>>,
    writes: &[Write],
) -> Result<Committed, StoreError> {
    let mut inserts: Vec<&Placed> = Vec::new();
    let mut removals: Vec<&str> = Vec::new();
    let mut dues: Vec<&Due> = Vec::new();
    for write in writes {
        match write {
            Write::Insert(message, _) => inserts.push(message),
            Write::Remove(id, _) => removals.push(id),
            Write::Lease(due, _) => dues.push(due),
        }
    }
    // PostgreSQL: skip rows another relay is leasing right now rather than
    // wait for it; a row it leased meanwhile fails the re-checked
    // condition. SQLite's write transaction excludes both.
    let lease_sql = match dialect {
        Dialect::Sqlite => lease_due_sql!(""),
        Dialect::Postgres => lease_due_sql!(" FOR UPDATE SKIP LOCKED"),
    };
    let (removed, leased) = on_pool!(pool, |p, begin, Db| {
        let mut tx = p.begin_with(begin).await?;
        insert_many!(tx, Db, &inserts, false);
        let removed = delete_many!(tx, Db, &removals, Some(relay));
        let mut leased = std::collections::VecDeque::with_capacity(dues.len());
        for due in dues {
            let mut messages = sqlx::query(lease_sql)
                .bind(relay)
                .bind(due.expires)
                .bind(&due.account)
                .bind(due.now)
                .bind(due.limit)
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(message_of)
                .collect::<Result<Vec<_>, StoreError>>()?;
            if !messages.is_empty() {
                messages.sort_by(|a, b| a.envelope.id.cmp(&b.envelope.id));
                let ids: Vec<String> = messages.iter().map(|m| m.envelope.id.clone()).collect();
                let recipients = recipients_of!(&mut *tx, Db, &ids);
                attach(&mut messages, recipients);
                messages.sort_by(|a, b| {
                    (a.progress.next_attempt, &a.envelope.id)
                        .cmp(&(b.progress.next_attempt, &b.envelope.id))
                });
            }
            leased.push_back(messages);
        }
        tx.commit().await?;
        (removed, leased)
    });
    let ids = removed.iter().map(|(id, _)| id.clone()).collect();
    remove_bodies_of(bodies, removed).await;
    Ok(Committed {
        removed: ids,
        leased,
    })
}

/// Removes the body files of deleted messages (`(id, body_file)`, as
/// [`delete_many`] returns them), after their commit. No directory sync:
/// a removal undone by a crash leaves a file that the next sweep removes.
pub(super) async fn remove_bodies_of(dir: Option<&Arc<Path>>, deleted: Vec<(String, bool)>) {
    let Some(dir) = dir else { return };
    let files: Vec<String> = deleted
        .into_iter()
        .filter_map(|(id, in_file)| in_file.then_some(id))
        .collect();
    if !files.is_empty() {
        remove_body_files(dir.clone(), files).await;
    }
}

pub(super) async fn remove_body_files(dir: Arc<Path>, names: Vec<String>) {
    let removed = tokio::task::spawn_blocking(move || {
        for name in names {
            let path = dir.join(&name);
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a body file");
                }
            }
        }
    })
    .await;
    if let Err(e) = removed {
        tracing::warn!(error = %e, "removing body files stopped");
    }
}

impl Store {
    /// Stores a message durably: when this returns `Ok`, it survives a crash
    /// of the relay, the machine or (with PostgreSQL) the database server.
    /// Concurrent calls share one transaction and one commit. A spooled
    /// body is made durable as a body file first on the embedded store
    /// (see [`crate::Spool`]).
    ///
    /// Cancel safety: dropping the future before the message reached the
    /// commit task stores nothing (a body file already kept is removed at
    /// the next [`Store::sweep_bodies`]); dropping it later does not stop
    /// the commit, so the message may be stored although the caller never
    /// saw `Ok` (as when a client's connection breaks before it reads
    /// `250`).
    pub async fn insert(&self, message: NewMessage) -> Result<(), StoreError> {
        let (placed, _budget) = self.place(message, false).await?;
        let id = placed.envelope.id.clone();
        let in_file = placed.inline.is_none();
        let result = self
            .write(|answer| Write::Insert(Box::new(placed), answer))
            .await;
        if result.is_err() && in_file {
            self.drop_unstored_body(&id).await;
        }
        result
    }

    /// Sums the message's body and puts it where it is stored: a spooled
    /// body becomes a durable body file on the embedded store (`replace`:
    /// even if one of its name exists), or is read into memory on
    /// PostgreSQL (holding a share of [`SPOOLED_IN_MEMORY`], returned, until
    /// its commit).
    async fn place(
        &self,
        message: NewMessage,
        replace: bool,
    ) -> Result<(Placed, Option<OwnedSemaphorePermit>), StoreError> {
        let NewMessage {
            envelope,
            progress,
            held,
            lease,
            body,
        } = message;
        let size = body.len();
        let (checksum, inline, budget) = match body {
            Body::Bytes(bytes) => (Sha256::digest(&bytes).into(), Some(bytes), None),
            Body::Spooled(spooled) => {
                let checksum = spooled.checksum();
                match &self.bodies {
                    Some(dir) => {
                        let to = dir.join(&envelope.id);
                        let temp = dir.join(format!(".{}.import", envelope.id));
                        blocking(&to, "keep the body as", move |to| {
                            if replace {
                                spooled.keep_replacing(to, &temp)
                            } else {
                                spooled.keep_as(to)
                            }
                        })
                        .await?;
                        (checksum, None, None)
                    }
                    None => {
                        let budget = self.spooled_budget(&spooled).await?;
                        let bytes = read_spooled(spooled).await?;
                        (checksum, Some(bytes), Some(budget))
                    }
                }
            }
        };
        let placed = Placed {
            envelope,
            progress,
            held,
            lease,
            size,
            checksum,
            inline,
        };
        Ok((placed, budget))
    }

    /// Waits until `spooled` may be held in memory for its commit (see
    /// [`SPOOLED_IN_MEMORY`]); a body larger than the whole budget takes
    /// all of it.
    async fn spooled_budget(&self, spooled: &Spooled) -> Result<OwnedSemaphorePermit, StoreError> {
        let units = usize::try_from(spooled.len())
            .unwrap_or(usize::MAX)
            .div_ceil(SPOOLED_UNIT)
            .clamp(1, SPOOLED_IN_MEMORY / SPOOLED_UNIT);
        self.spooled_in_memory
            .clone()
            .acquire_many_owned(u32::try_from(units).unwrap_or(u32::MAX))
            .await
            // never closed
            .map_err(|_| StoreError::Closed)
    }

    /// Removes the body file of a message whose insert failed, unless the
    /// message was stored after all (a commit whose answer was lost): only
    /// what is surely not stored goes. Left in doubt, the next
    /// [`Store::sweep_bodies`] decides.
    async fn drop_unstored_body(&self, id: &str) {
        let Some(dir) = &self.bodies else { return };
        if let Ok(false) = self.stored(id).await {
            remove_body_files(dir.clone(), vec![id.to_owned()]).await;
        }
    }

    /// Whether a message `id` is stored.
    async fn stored(&self, id: &str) -> Result<bool, StoreError> {
        let sql = "SELECT COUNT(*) FROM messages WHERE id = $1";
        let count: i64 = on_pool!(&self.pool, |p, _begin| {
            sqlx::query_scalar(sql).bind(id).fetch_one(p).await?
        });
        Ok(count > 0)
    }

    /// Hands a write to the commit task and waits for its commit.
    async fn write<T>(&self, write: impl FnOnce(Answer<T>) -> Write) -> Result<T, StoreError> {
        let (answer, result) = oneshot::channel();
        self.writes
            .send(write(answer))
            .await
            .map_err(|_| StoreError::Closed)?;
        result.await.map_err(|_| StoreError::Closed)?
    }

    /// Stores messages from an older queue in one transaction: all or none.
    /// A message already stored (an import repeated after a crash that came
    /// before the old files were removed) is kept as it is. Returns how many
    /// were new. Remove the old files only after this returned `Ok`.
    ///
    /// Bodies given as files ([`crate::Spooled::from_file`]) are linked into
    /// the embedded store, not read; on PostgreSQL they are read, and the
    /// whole import is in memory at once (it takes no share of the budget,
    /// which it could exhaust waiting for itself).
    pub async fn import(&self, messages: Vec<NewMessage>) -> Result<u64, StoreError> {
        let mut placed = Vec::with_capacity(messages.len());
        for message in messages {
            let (message, _budget) = self.place(message, true).await?;
            placed.push(message);
        }
        let messages: Vec<&Placed> = placed.iter().collect();
        on_pool!(&self.pool, |p, begin, Db| {
            let mut tx = p.begin_with(begin).await?;
            let new = insert_many!(tx, Db, &messages, true);
            tx.commit().await?;
            Ok(new)
        })
    }

    /// Leases the account's next due message (not failed, not held, due at
    /// `now`, not leased or its lease expired) to this relay until
    /// `now + lease_timeout`.
    pub async fn lease_next(
        &self,
        account: &str,
        now: SystemTime,
        lease_timeout: Duration,
    ) -> Result<Option<Message>, StoreError> {
        Ok(self.lease_due(account, now, lease_timeout, 1).await?.pop())
    }

    /// [`Store::lease_next`] for up to `limit` messages at once, longest
    /// due first. Leases share the commit task's transactions with inserts
    /// and removals (group commit), after them: a message stored in the
    /// same transaction may be leased, one removed may not.
    ///
    /// Cancel safety: dropping the future after the lease reached the
    /// commit task leaves what it leased to be taken again when the lease
    /// expires.
    pub async fn lease_due(
        &self,
        account: &str,
        now: SystemTime,
        lease_timeout: Duration,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let now = ms(now);
        let due = Due {
            account: account.to_owned(),
            now,
            expires: now.saturating_add(ms_of(lease_timeout)),
            limit: i64::try_from(limit).unwrap_or(i64::MAX),
        };
        self.write(|answer| Write::Lease(due, answer)).await
    }

    /// Deletes a message this relay holds the lease on (delivered to every
    /// recipient). `false`: the lease was not ours any more and nothing was
    /// deleted. Removals share the commit task's transactions with inserts
    /// (group commit); like [`Store::insert`], a removal handed over
    /// completes even if the future is dropped.
    pub async fn remove(&self, id: &str) -> Result<bool, StoreError> {
        self.write(|answer| Write::Remove(id.to_owned(), answer))
            .await
    }
}

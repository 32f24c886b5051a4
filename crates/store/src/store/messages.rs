//! A message's reads and changes outside the group commit: lease
//! renewals, outcomes, admin actions, bodies for delivery, listings.

use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use sqlx::{Connection as _, Row};

use super::commit::{delete_many, remove_bodies_of, remove_body_files, ROWS_PER_STATEMENT};
use super::rows::{attach, message_of, recipients_of};
use super::{blocking, ms, ms_of, time, Pool, Store};
use crate::types::{Message, MessageState, Progress, Recipient, RecipientState, Reply};
use crate::StoreError;

/// What [`Store::change`] does to each message.
#[derive(Clone, Copy, Debug)]
enum Change {
    /// Held (`true`) or released.
    Held(bool),
    /// Due at this time; a failed message comes back as deferred.
    Due(SystemTime),
}

/// Which messages [`Store::select`] reads.
#[derive(Clone, Copy, Debug)]
enum Rows<'a> {
    /// One message.
    Id(&'a str),
    /// Up to this many in id order, after this id (from the first), of
    /// this state only if one is given.
    After(Option<&'a str>, Option<MessageState>, u32),
}

/// A message's body as stored: in the row, its checksum, whether it is a
/// body file instead.
type BodyRow = (Option<Vec<u8>>, Vec<u8>, bool);

/// `body` if its SHA-256 is `checksum`.
fn checked(id: &str, body: Vec<u8>, checksum: &[u8]) -> Result<Vec<u8>, StoreError> {
    if Sha256::digest(&body).as_slice() == checksum {
        Ok(body)
    } else {
        Err(StoreError::Checksum { id: id.to_string() })
    }
}

impl Store {
    /// Removes body files that no stored message names: those of inserts a
    /// crash interrupted. Only for the one relay that owns the embedded
    /// store (the queue directory's lock), before it accepts mail: another
    /// process's insert in flight would lose its body. Returns how many
    /// were removed.
    pub async fn sweep_bodies(&self) -> Result<u64, StoreError> {
        let Some(dir) = &self.bodies else {
            return Ok(0);
        };
        let sql = "SELECT id FROM messages WHERE body_file";
        let kept: std::collections::HashSet<String> = on_pool!(&self.pool, |p, _begin| {
            sqlx::query_scalar(sql).fetch_all(p).await?
        })
        .into_iter()
        .collect();
        let orphans = blocking(dir, "list the bodies in", move |dir| {
            let mut orphans = Vec::new();
            for entry in std::fs::read_dir(dir)? {
                let name = entry?.file_name().to_string_lossy().into_owned();
                if !kept.contains(&name) {
                    orphans.push(name);
                }
            }
            Ok(orphans)
        })
        .await?;
        let removed = orphans.len() as u64;
        if removed > 0 {
            tracing::info!(
                count = removed,
                dir = %dir.display(),
                "removed body files of messages never stored (an interrupted insert)"
            );
            remove_body_files(dir.clone(), orphans).await;
        }
        Ok(removed)
    }

    /// Extends this relay's lease on `id` to `now + lease_timeout`. `false`:
    /// the lease is no longer ours (expired and taken, or the message was
    /// deleted); stop and do not record.
    pub async fn renew(
        &self,
        id: &str,
        now: SystemTime,
        lease_timeout: Duration,
    ) -> Result<bool, StoreError> {
        let expires = ms(now).saturating_add(ms_of(lease_timeout));
        self.change_leased(
            "UPDATE messages SET lease_expires = $1 WHERE id = $2 AND lease_relay = $3",
            expires,
            id,
        )
        .await
    }

    /// Records an attempt's outcome and ends this relay's lease. `false`:
    /// the lease was not ours any more and nothing was written (another
    /// relay may be delivering it).
    pub async fn record(&self, id: &str, progress: &Progress) -> Result<bool, StoreError> {
        on_pool!(&self.pool, |p, begin| {
            let mut tx = p.begin_with(begin).await?;
            let updated = sqlx::query(
                "UPDATE messages SET state = $1, attempts = $2, next_attempt = $3,
                     last_error = $4, lease_relay = NULL, lease_expires = NULL
                 WHERE id = $5 AND lease_relay = $6",
            )
            .bind(progress.state.as_str())
            .bind(i64::from(progress.attempts))
            .bind(progress.next_attempt.map(ms))
            .bind(progress.last_error.as_deref())
            .bind(id)
            .bind(&*self.relay)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated != 1 {
                return Ok(false);
            }
            for (position, r) in progress.recipients.iter().enumerate() {
                sqlx::query(
                    "UPDATE recipients SET state = $1, reply_code = $2, reply_enhanced = $3,
                         reply_text = $4, reason = $5
                     WHERE message_id = $6 AND position = $7",
                )
                .bind(r.state.as_str())
                .bind(r.reply.as_ref().map(|r| i64::from(r.code)))
                .bind(r.reply.as_ref().and_then(|r| r.enhanced.as_deref()))
                .bind(r.reply.as_ref().map(|r| r.text.as_str()))
                .bind(r.reason.as_deref())
                .bind(id)
                .bind(position as i64)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(true)
        })
    }

    /// Gives up this relay's lease without an outcome, due again at
    /// `next_attempt`. `false`: it was not ours.
    pub async fn release(&self, id: &str, next_attempt: SystemTime) -> Result<bool, StoreError> {
        self.change_leased(
            "UPDATE messages SET lease_relay = NULL, lease_expires = NULL, next_attempt = $1
             WHERE id = $2 AND lease_relay = $3",
            ms(next_attempt),
            id,
        )
        .await
    }

    /// Runs `sql`, an update of the message `id` while this relay leases
    /// it (`$1` the time it sets, `$2` the id, `$3` this relay): whether it
    /// applied.
    async fn change_leased(
        &self,
        sql: &'static str,
        at: i64,
        id: &str,
    ) -> Result<bool, StoreError> {
        let done = on_pool!(&self.pool, |p, _begin| sqlx::query(sql)
            .bind(at)
            .bind(id)
            .bind(&*self.relay)
            .execute(p)
            .await?
            .rows_affected());
        Ok(done == 1)
    }

    /// Ends every lease this relay holds but those on `keep` (outcomes still
    /// being written), for a relay that stops: its messages are due to the
    /// other relays at once rather than when the leases expire. Returns
    /// how many leases ended.
    pub async fn release_all(&self, keep: &[&str]) -> Result<u64, StoreError> {
        on_pool!(&self.pool, |p, _begin, Db| {
            let mut q = sqlx::QueryBuilder::<Db>::new(
                "UPDATE messages SET lease_relay = NULL, lease_expires = NULL WHERE lease_relay = ",
            );
            q.push_bind(&*self.relay);
            if !keep.is_empty() {
                q.push(" AND id NOT");
                push_in!(q, keep.iter().copied());
            }
            Ok(q.build().execute(p).await?.rows_affected())
        })
    }

    /// Ends every lease held by another relay, for a relay that knows it is
    /// the only one on this store (the embedded store, whose directory it
    /// has locked): those relays are gone, so their messages need not wait
    /// for the leases to expire. Returns how many leases ended.
    pub async fn end_others_leases(&self) -> Result<u64, StoreError> {
        let sql = "UPDATE messages SET lease_relay = NULL, lease_expires = NULL
                   WHERE lease_relay IS NOT NULL AND lease_relay <> $1";
        Ok(on_pool!(&self.pool, |p, _begin| sqlx::query(sql)
            .bind(&*self.relay)
            .execute(p)
            .await?
            .rows_affected()))
    }

    /// Holds or releases messages (an administrator; a message whose body
    /// no longer matches its checksum), in one transaction. Returns the
    /// ids that are there.
    pub async fn set_held(&self, ids: &[&str], held: bool) -> Result<Vec<String>, StoreError> {
        self.change(ids, Change::Held(held)).await
    }

    /// Makes messages due at `now` (an administrator's retry), in one
    /// transaction. A failed message comes back as deferred, its failed
    /// recipients to be tried again (those of a message not failed stay
    /// failed). A leased message keeps its lease (its attempt goes on).
    /// Returns the ids that are there.
    pub async fn retry(&self, ids: &[&str], now: SystemTime) -> Result<Vec<String>, StoreError> {
        self.change(ids, Change::Due(now)).await
    }

    /// Makes `change` to the messages `ids` in one transaction; returns the
    /// ids that are there.
    async fn change(&self, ids: &[&str], change: Change) -> Result<Vec<String>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        on_pool!(&self.pool, |p, begin, Db| {
            let mut tx = p.begin_with(begin).await?;
            let mut found = Vec::with_capacity(ids.len());
            for chunk in ids.chunks(ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::<Db>::new("UPDATE messages SET ");
                match change {
                    Change::Held(held) => {
                        q.push("held = ").push_bind(held);
                    }
                    Change::Due(now) => {
                        let mut revive = sqlx::QueryBuilder::<Db>::new(
                            "UPDATE recipients SET state = 'deferred' WHERE state = 'failed'
                             AND message_id IN
                                 (SELECT id FROM messages WHERE state = 'failed' AND id",
                        );
                        push_in!(revive, chunk.iter().copied());
                        revive.push(")");
                        revive.build().execute(&mut *tx).await?;
                        q.push("next_attempt = ").push_bind(ms(now)).push(
                            ", state = (CASE WHEN state = 'failed' THEN 'deferred' ELSE state END)",
                        );
                    }
                }
                q.push(" WHERE id");
                push_in!(q, chunk.iter().copied());
                q.push(" RETURNING id");
                let changed: Vec<String> = q.build_query_scalar().fetch_all(&mut *tx).await?;
                found.extend(changed);
            }
            tx.commit().await?;
            Ok(found)
        })
    }

    /// Deletes messages, leased or not (an administrator's deletion; a
    /// relay delivering one finds its lease gone), in one transaction.
    /// Returns the ids that were there and are gone.
    pub async fn delete(&self, ids: &[&str]) -> Result<Vec<String>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        on_pool!(&self.pool, |p, begin, Db| {
            let mut tx = p.begin_with(begin).await?;
            let deleted = delete_many!(tx, Db, ids, None);
            tx.commit().await?;
            let found = deleted.iter().map(|(id, _)| id.clone()).collect();
            remove_bodies_of(self.bodies.as_ref(), deleted).await;
            Ok(found)
        })
    }

    /// The body of this relay's leased message if it may be handed to the
    /// upstream now: still there, still ours, not held, and the lease good
    /// for at least a third of `lease_timeout` more (the renewal every third
    /// keeps it so; a lease whose renewals failed is not used). `None`: do
    /// not send it. The body is checked against the checksum taken at
    /// insert ([`StoreError::Checksum`]). One read: no commit, no disk sync.
    pub async fn begin(
        &self,
        id: &str,
        now: SystemTime,
        lease_timeout: Duration,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let sql = "SELECT b.body, m.checksum, m.body_file
                   FROM messages m LEFT JOIN bodies b ON b.message_id = m.id
                   WHERE m.id = $1 AND m.lease_relay = $2 AND NOT m.held AND m.lease_expires >= $3";
        let good_until = ms(now).saturating_add(ms_of(lease_timeout / 3));
        let row: Option<BodyRow> = on_pool!(read, &self.pool, |p, _begin| {
            sqlx::query_as(sql)
                .bind(id)
                .bind(&*self.relay)
                .bind(good_until)
                .fetch_optional(p)
                .await?
        });
        self.body_of(id, row).await
    }

    /// Fails every passthrough message whose relay no longer holds it (it
    /// died, or gave the lease up): its client waited for the answer on a
    /// connection that is gone and resends the message, so delivering this
    /// copy would duplicate it. Passthrough messages are leased at insert
    /// and never by [`Store::lease_next`]. Each open recipient gets `reply`
    /// and `reason`. Returns how many messages failed.
    pub async fn fail_orphans(
        &self,
        now: SystemTime,
        reply: &Reply,
        reason: &str,
    ) -> Result<u64, StoreError> {
        macro_rules! orphans {
            () => {
                "SELECT id FROM messages WHERE passthrough AND state <> 'failed'
                     AND (lease_relay IS NULL OR lease_expires <= $1)"
            };
        }
        on_pool!(&self.pool, |p, begin| {
            let mut tx = p.begin_with(begin).await?;
            sqlx::query(concat!(
                "UPDATE recipients SET state = 'failed', reply_code = $2, reply_enhanced = $3,
                     reply_text = $4, reason = $5
                 WHERE state IN ('pending', 'deferred') AND message_id IN (",
                orphans!(),
                ")"
            ))
            .bind(ms(now))
            .bind(i64::from(reply.code))
            .bind(reply.enhanced.as_deref())
            .bind(reply.text.as_str())
            .bind(reason)
            .execute(&mut *tx)
            .await?;
            let failed = sqlx::query(concat!(
                "UPDATE messages SET state = 'failed', next_attempt = NULL, last_error = $2,
                     lease_relay = NULL, lease_expires = NULL
                 WHERE id IN (",
                orphans!(),
                ")"
            ))
            .bind(ms(now))
            .bind(reply.text.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            Ok(failed)
        })
    }

    /// How many messages are in each state, and when the oldest of each was
    /// accepted. States without messages are left out.
    pub async fn census(&self) -> Result<Vec<(MessageState, u64, SystemTime)>, StoreError> {
        let sql = "SELECT state, COUNT(*), MIN(received_at) FROM messages GROUP BY state";
        let rows: Vec<(String, i64, i64)> = on_pool!(read, &self.pool, |p, _begin| {
            sqlx::query_as(sql).fetch_all(p).await?
        });
        rows.into_iter()
            .map(|(state, count, oldest)| {
                Ok((
                    MessageState::parse("(census)", &state)?,
                    u64::try_from(count).unwrap_or(0),
                    time(oldest),
                ))
            })
            .collect()
    }

    /// The body, checked against the checksum taken at insert.
    pub async fn body(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let sql = "SELECT b.body, m.checksum, m.body_file
                   FROM messages m LEFT JOIN bodies b ON b.message_id = m.id WHERE m.id = $1";
        let row: Option<BodyRow> = on_pool!(read, &self.pool, |p, _begin| {
            sqlx::query_as(sql).bind(id).fetch_optional(p).await?
        });
        self.body_of(id, row).await
    }

    /// The body a [`BodyRow`] stands for, checked against its checksum: in
    /// the row, or read from its body file. A file gone with its message
    /// (deleted meanwhile) is `None`.
    async fn body_of(&self, id: &str, row: Option<BodyRow>) -> Result<Option<Vec<u8>>, StoreError> {
        let Some((inline, checksum, in_file)) = row else {
            return Ok(None);
        };
        let body = match (inline, in_file, &self.bodies) {
            (Some(body), false, _) => body,
            (_, true, Some(dir)) => {
                let path = dir.join(id);
                let read = blocking(&path, "read the body", |path| std::fs::read(path)).await;
                match read {
                    Ok(body) => body,
                    Err(StoreError::BodyFile { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound
                            && self.get(id).await?.is_none() =>
                    {
                        return Ok(None);
                    }
                    Err(e) => return Err(e),
                }
            }
            _ => {
                return Err(StoreError::Invalid {
                    id: id.to_owned(),
                    column: "body_file",
                    value: in_file.to_string(),
                })
            }
        };
        checked(id, body, &checksum).map(Some)
    }

    /// One message, without its body.
    pub async fn get(&self, id: &str) -> Result<Option<Message>, StoreError> {
        Ok(self.select(Rows::Id(id)).await?.pop())
    }

    /// Up to `limit` messages whose ids sort after `after` (from the first
    /// with `None`), in id order, without bodies, of `state` only if one is
    /// given: a page of a pass over the whole queue (`queue list`, an
    /// action on every message or every failed one), which then holds one
    /// page at a time however large the queue.
    pub async fn list_after(
        &self,
        after: Option<&str>,
        state: Option<MessageState>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        self.select(Rows::After(after, state, limit)).await
    }

    /// The accounts that have messages not failed, and the earliest time one
    /// is due (whether leased or not), for a delivery loop to sleep on.
    pub async fn due(&self) -> Result<Vec<(String, SystemTime)>, StoreError> {
        let sql = "SELECT account, MIN(COALESCE(lease_expires, next_attempt)) FROM messages
                   WHERE state <> 'failed' AND NOT held GROUP BY account ORDER BY account";
        let rows: Vec<(String, i64)> = on_pool!(read, &self.pool, |p, _begin| {
            sqlx::query_as(sql).fetch_all(p).await?
        });
        Ok(rows.into_iter().map(|(a, t)| (a, time(t))).collect())
    }

    /// The messages `rows` names, ordered by id, without bodies.
    async fn select(&self, rows: Rows<'_>) -> Result<Vec<Message>, StoreError> {
        let (mut messages, recipients) = on_pool!(read, &self.pool, |p, _begin, Db| {
            let mut messages_query = sqlx::QueryBuilder::<Db>::new(concat!(
                "SELECT ",
                message_columns!(),
                " FROM messages"
            ));
            match rows {
                Rows::Id(id) => {
                    messages_query.push(" WHERE id = ").push_bind(id);
                }
                Rows::After(after, state, limit) => {
                    messages_query.push(" WHERE TRUE");
                    if let Some(after) = after {
                        messages_query.push(" AND id > ").push_bind(after);
                    }
                    if let Some(state) = state {
                        messages_query
                            .push(" AND state = ")
                            .push_bind(state.as_str());
                    }
                    messages_query
                        .push(" ORDER BY id LIMIT ")
                        .push_bind(i64::from(limit));
                }
            }
            // One snapshot for both queries.
            let mut tx = p.begin().await?;
            let messages = messages_query
                .build()
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(message_of)
                .collect::<Result<Vec<_>, StoreError>>()?;
            let ids: Vec<String> = messages.iter().map(|m| m.envelope.id.clone()).collect();
            let recipients = if ids.is_empty() {
                Vec::new()
            } else {
                recipients_of!(&mut *tx, Db, &ids)
            };
            tx.commit().await?;
            (messages, recipients)
        });
        attach(&mut messages, recipients);
        Ok(messages)
    }
}

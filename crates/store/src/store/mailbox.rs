//! What the relays on one database share per mailbox: the pace, the
//! connection slots, Microsoft's holds, the rotating refresh token.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use sqlx::Connection as _;

use super::{ms, ms_of, time, Pool, Store};
use crate::holds::Holds;
use crate::pace::{self, Admitted, Pace, PaceLimits, Sent};
use crate::schema::Dialect;
use crate::{Secret, StoreError};

/// Takes the named lock until the transaction `$tx` ends: the upsert
/// row-locks on PostgreSQL (a second taker waits) and is a write on SQLite
/// (which the write transaction already serialises).
macro_rules! take_lock {
    ($tx:expr, $name:expr) => {
        sqlx::query(
            "INSERT INTO locks (name, n) VALUES ($1, 0)
             ON CONFLICT (name) DO UPDATE SET n = locks.n + 1",
        )
        .bind($name)
        .execute(&mut *$tx)
        .await?
    };
}

/// The mailbox `$mailbox`'s [`Holds`], read inside the transaction `$tx`.
macro_rules! read_holds {
    ($tx:expr, $mailbox:expr) => {{
        let row: Option<(Option<i64>, i64, Option<i64>)> = sqlx::query_as(
            "SELECT paused_until, fewer, fewer_until FROM mailbox_holds WHERE mailbox = $1",
        )
        .bind($mailbox)
        .fetch_optional(&mut *$tx)
        .await?;
        row.map_or_else(Holds::default, |(paused_until, fewer, fewer_until)| Holds {
            paused_until: paused_until.map(time),
            fewer: u32::try_from(fewer).unwrap_or(0),
            fewer_until: fewer_until.map(time),
        })
    }};
}

/// A connection/request slot of a mailbox, held until released or expired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotId(String);

/// The shared refresh token of an account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedToken {
    /// The token, if one was ever stored.
    pub token: Option<Secret>,
    /// Bumped at every rotation; a relay that saw version N waits for N+1.
    pub version: i64,
}

/// The answer to "may this relay redeem the refresh token?".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Redeem {
    /// Yes, until [`Store::finish_redeem`] or the lock's expiry; here is the
    /// token to redeem.
    Granted(SharedToken),
    /// Another relay is redeeming it until this time at the latest; read the
    /// result with [`Store::token`] when its version changes.
    Busy {
        /// The relay redeeming it.
        relay: String,
        /// When its lock expires.
        until: SystemTime,
    },
}

impl Store {
    /// Asks, for every relay sharing the store at once, whether `mailbox` may
    /// send a message to `recipients` recipients at `now`; a `Go` is counted
    /// before this returns. While the mailbox is paused
    /// ([`Store::pause_mailbox`]) the answer is to wait until the pause
    /// ends. Relays' clocks are assumed in step (NTP).
    pub async fn pace(
        &self,
        mailbox: &str,
        now: SystemTime,
        limits: PaceLimits,
        recipients: u32,
    ) -> Result<Pace, StoreError> {
        let admitted = self.pace_line(mailbox, now, limits, &[recipients]).await?;
        Ok(admitted.next.map_or(Pace::Go, Pace::WaitUntil))
    }

    /// [`Store::pace`] for a line of messages waiting in order (their
    /// recipients), decided in one transaction: the first
    /// [`Admitted::go`] of them go and are counted at `now`; the line stops
    /// at the first that must wait, so none goes ahead of an earlier one.
    pub async fn pace_line(
        &self,
        mailbox: &str,
        now: SystemTime,
        limits: PaceLimits,
        line: &[u32],
    ) -> Result<Admitted, StoreError> {
        let now_ms = ms(now);
        let day_ago = now_ms.saturating_sub(ms_of(pace::DAY));
        let minute_ago = now_ms.saturating_sub(ms_of(pace::MINUTE));
        // Every round trip below the lock is one every relay's admissions
        // wait for, so they are few: the holds, the day's recipients and
        // the minute's count in one read; the sends themselves only when a
        // limit is in reach; then the count of those let out. The day's and
        // the minute's totals come from the per-second counts (at most a
        // row a second, whatever the rate), each second the window touches
        // counted whole: an overestimate by at most that second's sends,
        // which only makes the exact sends be read a little sooner.
        let read = "SELECT
             (SELECT paused_until FROM mailbox_holds WHERE mailbox = $1),
             (SELECT CAST(COALESCE(SUM(recipients), 0) AS BIGINT) FROM pace_counts
              WHERE mailbox = $1 AND second >= $2),
             (SELECT CAST(COALESCE(SUM(messages), 0) AS BIGINT) FROM pace_counts
              WHERE mailbox = $1 AND second >= $3),
             (SELECT MIN(at) FROM pace_events WHERE mailbox = $1)";
        on_pool!(&self.pool, |p, begin, Db| {
            // On PostgreSQL, in the same round trip as BEGIN: a crash of the
            // server may forget the last fraction of a second of counted
            // sends (a few more may go out that minute), not worth a disk
            // flush per admission.
            let begin = match self.dialect {
                Dialect::Postgres => "BEGIN; SET LOCAL synchronous_commit = off",
                Dialect::Sqlite => begin,
            };
            let mut tx = p.begin_with(begin).await?;
            take_lock!(tx, format!("pace {mailbox}"));
            // A statement of its own after the lock: its snapshot sees every
            // send counted before the lock was ours.
            let (paused_until, day_total, minute_count, oldest): (
                Option<i64>,
                i64,
                i64,
                Option<i64>,
            ) = sqlx::query_as(read)
                .bind(mailbox)
                .bind(day_ago / 1000)
                .bind(minute_ago / 1000)
                .fetch_one(&mut *tx)
                .await?;
            let holds = Holds {
                paused_until: paused_until.map(time),
                ..Holds::default()
            };
            if let Some(until) = holds.paused(now) {
                return Ok(Admitted {
                    go: 0,
                    next: Some(until),
                });
            }
            // Sends older than a day are ignored by the reads; deleted an
            // hour's worth at a time, not one statement per admission.
            if oldest
                .is_some_and(|oldest| oldest <= day_ago.saturating_sub(ms_of(pace::PURGE_EVERY)))
            {
                sqlx::query("DELETE FROM pace_events WHERE mailbox = $1 AND at <= $2")
                    .bind(mailbox)
                    .bind(day_ago)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM pace_counts WHERE mailbox = $1 AND second < $2")
                    .bind(mailbox)
                    .bind(day_ago / 1000)
                    .execute(&mut *tx)
                    .await?;
            }
            // What `decide` needs of the sends: all the day's if the line
            // could reach its limit; else the minute's newest `max` if the
            // line could reach that (the oldest of them is when the minute
            // frees); else none.
            let day_in_reach = limits.recipients_per_day.is_some_and(|max| {
                let wanted: i64 = line.iter().map(|&n| i64::from(n.min(max))).sum();
                day_total.saturating_add(wanted) > i64::from(max)
            });
            let minute_in_reach = limits.messages_per_minute.is_some_and(|max| {
                let line = i64::try_from(line.len()).unwrap_or(i64::MAX);
                minute_count.saturating_add(line) > i64::from(max.max(1))
            });
            let (since, newest) = if day_in_reach {
                (Some(day_ago), i64::MAX)
            } else if minute_in_reach {
                let max = limits.messages_per_minute.unwrap_or(1).max(1);
                (Some(minute_ago), i64::from(max))
            } else {
                (None, 0)
            };
            let mut sent: Vec<Sent> = Vec::new();
            if let Some(since) = since {
                let rows: Vec<(i64, i64)> = sqlx::query_as(
                    "SELECT at, recipients FROM pace_events
                     WHERE mailbox = $1 AND at > $2 AND at <= $3 ORDER BY at DESC LIMIT $4",
                )
                .bind(mailbox)
                .bind(since)
                .bind(now_ms)
                .bind(newest)
                .fetch_all(&mut *tx)
                .await?;
                sent = rows
                    .into_iter()
                    .rev()
                    .map(|(at, n)| Sent {
                        at: time(at),
                        recipients: u32::try_from(n).unwrap_or(u32::MAX),
                    })
                    .collect();
            }
            let admitted = pace::decide_line(&mut sent, now, limits, line);
            if admitted.go > 0 {
                let mut insert = sqlx::QueryBuilder::<Db>::new(
                    "INSERT INTO pace_events (mailbox, at, recipients) ",
                );
                insert.push_values(&line[..admitted.go], |mut row, &n| {
                    row.push_bind(mailbox)
                        .push_bind(now_ms)
                        .push_bind(i64::from(n));
                });
                insert.build().execute(&mut *tx).await?;
                let recipients: i64 = line[..admitted.go].iter().map(|&n| i64::from(n)).sum();
                sqlx::query(
                    "INSERT INTO pace_counts (mailbox, second, messages, recipients)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (mailbox, second) DO UPDATE SET
                         messages = pace_counts.messages + excluded.messages,
                         recipients = pace_counts.recipients + excluded.recipients",
                )
                .bind(mailbox)
                .bind(now_ms / 1000)
                .bind(i64::try_from(admitted.go).unwrap_or(i64::MAX))
                .bind(recipients)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(admitted)
        })
    }

    /// Takes one of `mailbox`'s `cap` slots (connections, Graph requests)
    /// across every relay, until `now + ttl` unless renewed; slots of a relay
    /// that died come back when they expire. While a reduction lasts
    /// ([`Store::fewer_slots`]) the mailbox has that many fewer (at least
    /// one). `None`: all taken.
    pub async fn acquire_slot(
        &self,
        mailbox: &str,
        cap: u32,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<Option<SlotId>, StoreError> {
        let serial = self.slot_serial.fetch_add(1, Ordering::Relaxed);
        let holder = format!("{} {serial}", self.relay);
        let now_ms = ms(now);
        on_pool!(&self.pool, |p, begin| {
            let mut tx = p.begin_with(begin).await?;
            take_lock!(tx, format!("slots {mailbox}"));
            let cap = read_holds!(tx, mailbox).cap(cap, now);
            sqlx::query("DELETE FROM slots WHERE mailbox = $1 AND expires <= $2")
                .bind(mailbox)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
            let held: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM slots WHERE mailbox = $1")
                .bind(mailbox)
                .fetch_one(&mut *tx)
                .await?;
            if held >= i64::from(cap) {
                return Ok(None);
            }
            sqlx::query("INSERT INTO slots (holder, mailbox, expires) VALUES ($1, $2, $3)")
                .bind(&holder)
                .bind(mailbox)
                .bind(now_ms.saturating_add(ms_of(ttl)))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(Some(SlotId(holder)))
        })
    }

    /// Pauses `mailbox` for every relay until `until` (or later, if it
    /// already was): [`Store::pace`] lets nothing out before then.
    pub async fn pause_mailbox(&self, mailbox: &str, until: SystemTime) -> Result<(), StoreError> {
        self.change_holds(mailbox, |holds| holds.pause(until)).await
    }

    /// Takes one of `mailbox`'s slots away from every relay until `until`
    /// (a reduction still lasting at `now` grows by one and lasts at least
    /// as long; an expired one starts again): [`Store::acquire_slot`]
    /// grants that many fewer, never fewer than one.
    pub async fn fewer_slots(
        &self,
        mailbox: &str,
        now: SystemTime,
        until: SystemTime,
    ) -> Result<(), StoreError> {
        self.change_holds(mailbox, |holds| holds.fewer(now, until))
            .await
    }

    /// Stores `change` of the mailbox's holds, under its own lock so that
    /// two relays' changes both count.
    async fn change_holds(
        &self,
        mailbox: &str,
        change: impl FnOnce(Holds) -> Holds,
    ) -> Result<(), StoreError> {
        on_pool!(&self.pool, |p, begin| {
            let mut tx = p.begin_with(begin).await?;
            take_lock!(tx, format!("holds {mailbox}"));
            let holds = change(read_holds!(tx, mailbox));
            sqlx::query(
                "INSERT INTO mailbox_holds (mailbox, paused_until, fewer, fewer_until)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (mailbox) DO UPDATE SET paused_until = excluded.paused_until,
                     fewer = excluded.fewer, fewer_until = excluded.fewer_until",
            )
            .bind(mailbox)
            .bind(holds.paused_until.map(ms))
            .bind(i64::from(holds.fewer))
            .bind(holds.fewer_until.map(ms))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Extends a slot to `now + ttl`. `false`: it expired and may have been
    /// given to another; stop using it.
    pub async fn renew_slot(
        &self,
        slot: &SlotId,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let sql = "UPDATE slots SET expires = $1 WHERE holder = $2 AND expires > $3";
        let done = on_pool!(&self.pool, |p, _begin| sqlx::query(sql)
            .bind(ms(now).saturating_add(ms_of(ttl)))
            .bind(&slot.0)
            .bind(ms(now))
            .execute(p)
            .await?
            .rows_affected());
        Ok(done == 1)
    }

    /// Gives a slot back.
    pub async fn release_slot(&self, slot: SlotId) -> Result<(), StoreError> {
        let sql = "DELETE FROM slots WHERE holder = $1";
        on_pool!(&self.pool, |p, _begin| sqlx::query(sql)
            .bind(&slot.0)
            .execute(p)
            .await?
            .rows_affected());
        Ok(())
    }

    /// The account's shared refresh token.
    pub async fn token(&self, account: &str) -> Result<Option<SharedToken>, StoreError> {
        let sql = "SELECT token, version FROM refresh_tokens WHERE account = $1";
        let row: Option<(Option<String>, i64)> = on_pool!(read, &self.pool, |p, _begin| {
            sqlx::query_as(sql).bind(account).fetch_optional(p).await?
        });
        Ok(row.map(|(token, version)| SharedToken {
            token: token.map(Secret::new),
            version,
        }))
    }

    /// Asks to be the one relay redeeming the account's refresh token,
    /// until `now + ttl` at the latest.
    pub async fn begin_redeem(
        &self,
        account: &str,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<Redeem, StoreError> {
        let now_ms = ms(now);
        on_pool!(&self.pool, |p, begin| {
            let mut tx = p.begin_with(begin).await?;
            take_lock!(tx, format!("token {account}"));
            sqlx::query(
                "INSERT INTO refresh_tokens (account, token, version, updated_at)
                 VALUES ($1, NULL, 0, $2) ON CONFLICT (account) DO NOTHING",
            )
            .bind(account)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            let (token, version, redeemer, expires): (
                Option<String>,
                i64,
                Option<String>,
                Option<i64>,
            ) = sqlx::query_as(
                "SELECT token, version, redeemer, redeem_expires FROM refresh_tokens
                     WHERE account = $1",
            )
            .bind(account)
            .fetch_one(&mut *tx)
            .await?;
            if let (Some(relay), Some(expires)) = (redeemer, expires) {
                if expires > now_ms && relay != *self.relay {
                    return Ok(Redeem::Busy {
                        relay,
                        until: time(expires),
                    });
                }
            }
            sqlx::query(
                "UPDATE refresh_tokens SET redeemer = $1, redeem_expires = $2 WHERE account = $3",
            )
            .bind(&*self.relay)
            .bind(now_ms.saturating_add(ms_of(ttl)))
            .bind(account)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(Redeem::Granted(SharedToken {
                token: token.map(Secret::new),
                version,
            }))
        })
    }

    /// Ends this relay's redemption: stores the rotated token (a new
    /// version) if there is one, and frees the lock. `false`: the lock had
    /// expired and was taken, and nothing was written.
    pub async fn finish_redeem(
        &self,
        account: &str,
        rotated: Option<&Secret>,
        now: SystemTime,
    ) -> Result<bool, StoreError> {
        let sql = "UPDATE refresh_tokens SET
                token = COALESCE($1, token),
                version = version + (CASE WHEN $1 IS NULL THEN 0 ELSE 1 END),
                updated_at = $2, redeemer = NULL, redeem_expires = NULL
            WHERE account = $3 AND redeemer = $4";
        let done = on_pool!(&self.pool, |p, _begin| sqlx::query(sql)
            .bind(rotated.map(Secret::expose))
            .bind(ms(now))
            .bind(account)
            .bind(&*self.relay)
            .execute(p)
            .await?
            .rows_affected());
        Ok(done == 1)
    }
}

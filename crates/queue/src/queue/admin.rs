//! What an administrator does to queued messages: retry now, delete, hold
//! and release.
//!
//! Both act on the running queue's memory and disk together under its
//! schedule lock, so a delivery in progress and an admin action cannot lose
//! or double a message. A leased message not yet handed to the upstream is
//! deleted at once and its worker does not send it ([`Queue::begin`]); one
//! in flight is deleted when its attempt ends, and the deletion reports how
//! that ended. Retrying a leased message is a no-op (it is being tried).
//! A held message stays indexed but out of the schedule (retry leaves it
//! held); holding a leased one takes effect when its attempt ends.

use super::{blocking, lock, Inner, Queue};
use crate::meta::{Meta, RecipientState, State};
use crate::store::{self, Op};
use crate::{QueueError, QueueId};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// How long a deletion waits for attempts in flight to end.
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(10);

/// What [`Queue::delete`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Deletion {
    /// Removed before any of it was sent in an attempt still running.
    pub deleted: Vec<QueueId>,
    /// Being handed to the upstream when the deletion came, and how that
    /// attempt ended (what was not delivered is removed).
    pub in_flight: Vec<(QueueId, String)>,
}

/// Which messages an administrator's action applies to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// One message.
    Id(QueueId),
    /// Every failed message.
    Failed,
    /// Every message.
    All,
}

impl Selection {
    /// The selected messages among those still to be tried.
    fn in_memory(&self, sched: &super::Schedule) -> Vec<QueueId> {
        sched
            .messages
            .keys()
            .filter(|id| self.matches(id, false))
            .cloned()
            .collect()
    }

    fn matches(&self, id: &QueueId, failed: bool) -> bool {
        match self {
            Selection::Id(wanted) => wanted == id,
            Selection::Failed => failed,
            Selection::All => true,
        }
    }
}

impl Queue {
    /// Makes the selected messages due now. A failed message comes back to
    /// life: its failed recipients are tried again (e.g. after the
    /// administrator fixed a Send As permission). Returns the ids affected.
    pub async fn retry(&self, which: Selection) -> Result<Vec<QueueId>, QueueError> {
        let mut affected = Vec::new();
        {
            let mut sched = lock(&self.inner.sched);
            let now = Instant::now();
            let ids = which.in_memory(&sched);
            for id in ids {
                let Some(slot) = sched.messages.get_mut(&id) else {
                    continue;
                };
                // a leased message is being tried right now: leave it be;
                // a held one waits for its release
                if let (Some(due), false) = (slot.due, slot.meta.held) {
                    slot.due = Some(now);
                    let account = slot.meta.account.clone();
                    let queue = sched.account(&account);
                    queue.due.remove(&(due, id.clone()));
                    queue.due.insert((now, id.clone()));
                    queue.notify.notify_waiters();
                }
                affected.push(id);
            }
        }
        let inner = self.inner.clone();
        let revived = blocking(&self.inner.settings.dir, "retrying failed messages", move || {
            let mut revived = Vec::new();
            for mut meta in inner.failed_on_disk(&which)? {
                for r in meta
                    .recipients
                    .iter_mut()
                    .filter(|r| r.status == RecipientState::Failed)
                {
                    r.status = RecipientState::Deferred;
                }
                meta.state = State::Deferred;
                meta.next_attempt = Some(SystemTime::now());
                inner.write_meta(&meta)?;
                tracing::info!(queue_id = %meta.id, "failed message queued again by an administrator");
                revived.push(meta.id.clone());
                let mut sched = lock(&inner.sched);
                sched.failed.remove(&meta.id);
                sched.insert(meta, Instant::now());
            }
            Ok(revived)
        })
        .await?;
        affected.extend(revived);
        Ok(affected)
    }

    /// Removes the selected messages, body and metadata. A message leased
    /// by a worker that has not handed it to the upstream yet (it waits for
    /// its pacing slot) is removed at once, and the worker will not send it
    /// ([`Queue::begin`]). A message being handed over right now cannot be
    /// stopped: the deletion waits (up to 10 s) for that attempt to end,
    /// reports how it ended, and removes what is left of it.
    pub async fn delete(&self, which: Selection) -> Result<Deletion, QueueError> {
        let mut affected = Vec::new();
        let mut remove_now = Vec::new();
        let mut in_flight = Vec::new();
        {
            let mut sched = lock(&self.inner.sched);
            let ids = which.in_memory(&sched);
            for id in ids {
                let Some(slot) = sched.messages.get_mut(&id) else {
                    continue;
                };
                match slot.due {
                    None if slot.in_flight || slot.unrecorded => {
                        slot.deleted = true;
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        sched.watchers.entry(id.clone()).or_default().push(tx);
                        in_flight.push((id, rx));
                        continue;
                    }
                    None => {
                        sched.messages.remove(&id);
                        remove_now.push(id.clone());
                    }
                    Some(due) => {
                        let account = slot.meta.account.clone();
                        sched.messages.remove(&id);
                        sched.account(&account).due.remove(&(due, id.clone()));
                        remove_now.push(id.clone());
                    }
                }
                affected.push(id);
            }
        }
        let inner = self.inner.clone();
        let removed = blocking(&self.inner.settings.dir, "deleting messages", move || {
            let mut ids = remove_now;
            ids.extend(inner.failed_on_disk(&which)?.into_iter().map(|m| m.id));
            let ops: Vec<Op> = ids.iter().map(|id| Op::Remove { id: id.clone() }).collect();
            store::apply(&inner.layout, &ops)?;
            let mut sched = lock(&inner.sched);
            for id in &ids {
                sched.failed.remove(id);
                tracing::info!(queue_id = %id, "message deleted by an administrator");
            }
            Ok(ids)
        })
        .await?;
        for id in removed {
            if !affected.contains(&id) {
                affected.push(id);
            }
        }
        let mut deletion = Deletion {
            deleted: affected,
            in_flight: Vec::new(),
        };
        for (id, ended) in in_flight {
            let how = match tokio::time::timeout(IN_FLIGHT_WAIT, ended).await {
                Ok(Ok(results)) => {
                    let sent = results.iter().filter(|r| r.outcome.is_delivered()).count();
                    format!("delivered to {sent} of {} recipient(s) by the attempt in flight; the rest removed", results.len())
                }
                Ok(Err(_)) => "its attempt ended; removed".to_owned(),
                Err(_) => format!(
                    "still being delivered after {} s; removed when the attempt ends",
                    IN_FLIGHT_WAIT.as_secs()
                ),
            };
            deletion.in_flight.push((id, how));
        }
        Ok(deletion)
    }
}

impl Queue {
    /// Holds the selected messages (not failed ones): they are not
    /// delivered until released, across restarts too. Returns the ids.
    pub async fn hold(&self, which: Selection) -> Result<Vec<QueueId>, QueueError> {
        self.set_held(which, true).await
    }

    /// Releases the selected held messages: they are due at their recorded
    /// next attempt (now, if that has passed). Returns the ids.
    pub async fn release_held(&self, which: Selection) -> Result<Vec<QueueId>, QueueError> {
        self.set_held(which, false).await
    }

    async fn set_held(&self, which: Selection, held: bool) -> Result<Vec<QueueId>, QueueError> {
        let mut changed = Vec::new();
        {
            let mut sched = lock(&self.inner.sched);
            for id in which.in_memory(&sched) {
                let Some(slot) = sched.messages.get_mut(&id) else {
                    continue;
                };
                if slot.meta.held == held {
                    continue;
                }
                slot.meta.held = held;
                changed.push(slot.meta.clone());
                let (due, account) = (slot.due, slot.meta.account.clone());
                // a leased message is scheduled (or not) when its lease ends
                if let Some(due) = due {
                    let queue = sched.account(&account);
                    if held {
                        queue.due.remove(&(due, id.clone()));
                    } else {
                        queue.due.insert((due, id.clone()));
                        queue.notify.notify_waiters();
                    }
                }
            }
        }
        let inner = self.inner.clone();
        blocking(
            &self.inner.settings.dir,
            "holding or releasing messages",
            move || {
                let mut ids = Vec::with_capacity(changed.len());
                for meta in changed {
                    inner.write_meta(&meta)?;
                    let what = if held { "held" } else { "released" };
                    tracing::info!(queue_id = %meta.id, "message {what} by an administrator");
                    ids.push(meta.id);
                }
                Ok(ids)
            },
        )
        .await
    }
}

impl Inner {
    /// Writes a message's changed metadata (blocking).
    fn write_meta(&self, meta: &Meta) -> Result<(), QueueError> {
        let op = Op::Update {
            id: meta.id.clone(),
            meta: self.encode(meta)?,
        };
        store::apply(&self.layout, &[op])
    }

    /// Failed messages (kept on disk only) that `which` selects. An entry
    /// that cannot be read is set aside, not an error.
    fn failed_on_disk(&self, which: &super::Selection) -> Result<Vec<Meta>, QueueError> {
        let ids: Vec<QueueId> = match which {
            Selection::Id(id) => vec![id.clone()],
            Selection::Failed | Selection::All => {
                let dir = &self.layout.meta;
                let read = std::fs::read_dir(dir)
                    .map_err(|e| QueueError::io("listing queue metadata", dir, e))?;
                read.filter_map(|item| item.ok())
                    .filter_map(|item| store::meta_entry_id(&item))
                    .collect()
            }
        };
        let mut failed = Vec::new();
        for id in ids {
            let path = self.layout.meta_path(&id);
            match store::read_meta(&path, &id) {
                Ok(meta) if meta.state == State::Failed => failed.push(meta),
                Ok(_) => {}
                Err(QueueError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    // a message the schedule knows is fine in memory
                    let known = lock(&self.sched).messages.contains_key(&id);
                    if !known {
                        store::set_aside(&self.layout, &id, &e.to_string());
                    }
                }
            }
        }
        Ok(failed)
    }
}

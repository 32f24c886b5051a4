//! What an administrator sees and does: list and show, retry now, delete,
//! hold and release, from any process that opens the queue (the `queue`
//! commands, on any host sharing a PostgreSQL database).
//!
//! An action is made in the store a page of messages at a time, one
//! transaction each (not one per message, nor one for a whole large
//! queue); relays observe it there. A held
//! or deleted message whose lease waits (for its pacing slot, say) is not
//! sent: [`Queue::begin`] asks the store. One already handed to the upstream
//! cannot be stopped: a deletion removes it at once, the attempt's outcome
//! finds its lease gone and is not recorded, and the deletion notes that the
//! message was being delivered. A retried message is due at once and is
//! picked up within a second (at once by this process's own workers).

use std::collections::HashSet;
use std::time::SystemTime;

use relay_store::{Message, MessageState};

use super::Queue;
use crate::view::{Entry, Unusable};
use crate::{QueueError, QueueId};

/// Messages read from the store at a time by a pass over the queue: a
/// listing or an action on every message holds one page, however large the
/// queue grew while Microsoft 365 was unreachable.
const PAGE: u32 = 1000;

/// What [`Queue::delete`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Deletion {
    /// The messages removed.
    pub deleted: Vec<QueueId>,
    /// Those among them a relay held a lease on, and what that means.
    pub in_flight: Vec<(QueueId, String)>,
}

/// Which messages an administrator's action applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    /// One message.
    Id(QueueId),
    /// Every failed message.
    Failed,
    /// Every message.
    All,
}

/// An administrator's request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Make messages due now (failed ones are revived).
    Retry(Selection),
    /// Remove messages.
    Delete(Selection),
    /// Keep messages from being delivered until released.
    Hold(Selection),
    /// Release held messages.
    Release(Selection),
}

/// What a request did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The messages it applied to.
    pub ids: Vec<QueueId>,
    /// What else the administrator should know, one line each (a message
    /// that was being delivered when deleted).
    pub notes: Vec<String>,
}

/// The stored messages a [`Selection`] names, a page at a time, in id
/// order. Messages added or removed during the pass may or may not be
/// seen; none is seen twice.
struct Selected<'q> {
    queue: &'q Queue,
    which: Selection,
    /// The last id read; the next page starts after it.
    after: Option<String>,
    done: bool,
}

impl Selected<'_> {
    async fn next(&mut self) -> Result<Option<Vec<Message>>, QueueError> {
        if self.done {
            return Ok(None);
        }
        let store = self.queue.store();
        let page = match &self.which {
            Selection::Id(id) => {
                self.done = true;
                store.get(id.as_str()).await?.into_iter().collect()
            }
            Selection::Failed | Selection::All => {
                let state = (self.which == Selection::Failed).then_some(MessageState::Failed);
                let page = store.list_after(self.after.as_deref(), state, PAGE).await?;
                if page.is_empty() {
                    self.done = true;
                    return Ok(None);
                }
                self.done = page.len() < PAGE as usize;
                self.after = page.last().map(|m| m.envelope.id.clone());
                page
            }
        };
        Ok(Some(page))
    }
}

/// Every message's [`Entry`], a page at a time, in id order
/// ([`Queue::listing`]).
pub struct Listing<'q> {
    selected: Selected<'q>,
    now: SystemTime,
}

impl Listing<'_> {
    /// The next page; `None` after the last.
    pub async fn next(&mut self) -> Result<Option<Vec<Entry>>, QueueError> {
        let now = self.now;
        Ok(self
            .selected
            .next()
            .await?
            .map(|page| page.iter().map(|m| Entry::of(m, now)).collect()))
    }
}

/// The id of a stored message; `None` (logged) for one this build did not
/// write.
fn id_of(m: &Message) -> Option<QueueId> {
    let id = m.envelope.id.parse().ok();
    if id.is_none() {
        tracing::warn!(id = %m.envelope.id, "stored message with an id this relay does not write; skipped");
    }
    id
}

/// A page's messages with their ids, but for those this build did not
/// write (logged by [`id_of`]).
fn identified(page: Vec<Message>) -> Vec<(QueueId, Message)> {
    page.into_iter()
        .filter_map(|m| Some((id_of(&m)?, m)))
        .collect()
}

/// The ids of the messages in `page` that `pick` picks, as the store takes
/// them.
fn ids(page: &[(QueueId, Message)], pick: impl Fn(&Message) -> bool) -> Vec<&str> {
    page.iter()
        .filter(|(_, m)| pick(m))
        .map(|(id, _)| id.as_str())
        .collect()
}

/// The ids a store's change returned, to look up.
fn set(ids: Vec<String>) -> HashSet<String> {
    ids.into_iter().collect()
}

impl Queue {
    /// Applies an administrator's request.
    pub async fn apply(&self, request: Request) -> Result<Applied, QueueError> {
        let ids = match request {
            Request::Retry(which) => self.retry(which).await?,
            Request::Hold(which) => self.hold(which).await?,
            Request::Release(which) => self.release_held(which).await?,
            Request::Delete(which) => {
                let deletion = self.delete(which).await?;
                return Ok(Applied {
                    ids: deletion.deleted,
                    notes: deletion
                        .in_flight
                        .into_iter()
                        .map(|(id, how)| format!("{id} was being delivered: {how}"))
                        .collect(),
                });
            }
        };
        Ok(Applied {
            ids,
            notes: Vec::new(),
        })
    }

    /// The stored messages `which` selects, a page at a time.
    fn selected(&self, which: Selection) -> Selected<'_> {
        Selected {
            queue: self,
            which,
            after: None,
            done: false,
        }
    }

    /// Makes the selected messages due now. A failed message comes back to
    /// life: its failed recipients are tried again (e.g. after the
    /// administrator fixed a Send As permission). A held one stays held; a
    /// leased one goes on with its attempt. Returns the ids affected.
    pub async fn retry(&self, which: Selection) -> Result<Vec<QueueId>, QueueError> {
        let mut affected = Vec::new();
        let now = SystemTime::now();
        let mut selected = self.selected(which);
        while let Some(page) = selected.next().await? {
            let page = identified(page);
            let due = set(self.store().retry(&ids(&page, |_| true), now).await?);
            for (id, m) in page {
                if due.contains(id.as_str()) {
                    tracing::info!(queue_id = %id, "message made due now by an administrator");
                    self.wake(&m.envelope.account);
                    affected.push(id);
                }
            }
        }
        Ok(affected)
    }

    /// Removes the selected messages. A relay holding one's lease does not
    /// send it if it had not handed it over yet; if it had, that attempt
    /// may still deliver it (noted in [`Deletion::in_flight`]) and its
    /// outcome is not recorded.
    pub async fn delete(&self, which: Selection) -> Result<Deletion, QueueError> {
        let mut deletion = Deletion::default();
        let now = SystemTime::now();
        let mut selected = self.selected(which);
        while let Some(page) = selected.next().await? {
            let page = identified(page);
            let gone = set(self.store().delete(&ids(&page, |_| true)).await?);
            for (id, m) in page {
                if !gone.contains(id.as_str()) {
                    continue;
                }
                tracing::info!(queue_id = %id, "message deleted by an administrator");
                if let Some(lease) = m.lease.filter(|l| l.expires > now) {
                    deletion.in_flight.push((
                        id.clone(),
                        format!(
                            "relay {} held it; not sent unless its attempt had begun, and then the rest removed",
                            lease.relay
                        ),
                    ));
                }
                deletion.deleted.push(id);
            }
        }
        Ok(deletion)
    }

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
        let mut selected = self.selected(which);
        while let Some(mut page) = selected.next().await? {
            page.retain(|m| m.progress.state != MessageState::Failed);
            let page = identified(page);
            let to_change = ids(&page, |m| m.held != held);
            let changed_now = set(self.store().set_held(&to_change, held).await?);
            for (id, m) in page {
                if changed_now.contains(id.as_str()) {
                    let what = if held { "held" } else { "released" };
                    tracing::info!(queue_id = %id, "message {what} by an administrator");
                    if !held {
                        self.wake(&m.envelope.account);
                    }
                }
                changed.push(id);
            }
        }
        Ok(changed)
    }

    /// Every message's entry, a page at a time, sorted by id.
    pub fn listing(&self) -> Listing<'_> {
        Listing {
            selected: self.selected(Selection::All),
            now: SystemTime::now(),
        }
    }

    /// Every message's entry, sorted by id, in one vector (a small queue's).
    pub async fn list(&self) -> Result<Vec<Entry>, QueueError> {
        let mut entries = Vec::new();
        let mut listing = self.listing();
        while let Some(page) = listing.next().await? {
            entries.extend(page);
        }
        Ok(entries)
    }

    /// The entries an import of an old file queue set aside in `corrupt/`,
    /// sorted by id.
    pub fn unusable(&self) -> Vec<Unusable> {
        let mut unusable = Vec::new();
        let dir = &self.settings().dir;
        if let Ok(read) = std::fs::read_dir(dir.join(crate::legacy::CORRUPT_DIR)) {
            for item in read.flatten() {
                let name = item.file_name();
                let Some(id) = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(".json"))
                    .and_then(|n| n.parse::<QueueId>().ok())
                else {
                    continue;
                };
                let reason = std::fs::read_to_string(crate::legacy::reason_path(dir, &id))
                    .map(|r| r.trim_end().to_owned())
                    .unwrap_or_else(|_| "set aside as corrupt".to_owned());
                unusable.push(Unusable {
                    id: id.to_string(),
                    path: item.path(),
                    reason,
                });
            }
        }
        unusable.sort_by(|a, b| a.id.cmp(&b.id));
        unusable
    }

    /// One message's entry; [`QueueError::NoSuchMessage`] if there is none.
    pub async fn entry(&self, id: &QueueId) -> Result<Entry, QueueError> {
        match self.store().get(id.as_str()).await? {
            Some(m) => Ok(Entry::of(&m, SystemTime::now())),
            None => Err(QueueError::NoSuchMessage { id: id.clone() }),
        }
    }

    /// One message's entry and its header section (up to the first empty
    /// line, at most 64 KiB).
    pub async fn show(&self, id: &QueueId) -> Result<(Entry, Vec<u8>), QueueError> {
        const MAX_HEADERS: usize = 64 * 1024;
        let entry = self.entry(id).await?;
        let mut head = self.body(id).await?;
        head.truncate(MAX_HEADERS);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            head.truncate(end + 2);
        }
        Ok((entry, head))
    }

    /// The body of message `id` (the message as received, checked against
    /// its SHA-256), like Postfix's `postcat -q`.
    pub async fn body(&self, id: &QueueId) -> Result<Vec<u8>, QueueError> {
        self.store()
            .body(id.as_str())
            .await?
            .ok_or_else(|| QueueError::NoSuchMessage { id: id.clone() })
    }
}

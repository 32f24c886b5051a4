//! Taking a message in: its body written as it arrives, its id, its
//! commit, passthrough messages held for their client.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::SystemTime;

use relay_outcome::{Enhanced, Reply};
use relay_store::{Body, Envelope, LeaseHolder, Message, Progress, Spool};
use tokio::sync::oneshot;

use crate::view::add_time;
use crate::{QueueError, QueueId};

use super::record::RecipientResult;
use super::{blocking, lock, Queue, SPOOL_DIR};

/// A message accepted by the listener, to be queued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMessage {
    /// The envelope sender (MAIL FROM); `""` for the null sender `<>`.
    pub sender: String,
    /// The envelope recipients (RCPT TO); at least one. Exact duplicates are
    /// dropped.
    pub recipients: Vec<String>,
    /// The upstream account (mailbox) that delivers this message.
    pub account: String,
    /// The address of the SMTP client that submitted it, if known.
    pub client: Option<IpAddr>,
}

/// The body of a message being received, spooled to an anonymous file in
/// the queue directory's `tmp/` ([`Queue::begin_body`]) so that a large
/// message is not held in memory while it arrives. The file has no name: a
/// crash or a dropped writer leaves nothing behind. On the embedded store
/// the file itself becomes the stored body (see [`relay_store::Spool`]).
#[derive(Debug)]
pub struct BodyWriter {
    path: PathBuf,
    /// `None` once an append failed or was cancelled: the file is then
    /// incomplete and every later append fails.
    spool: Option<Spool>,
}

impl BodyWriter {
    /// Appends `data`, on a blocking thread. After an error (or a
    /// cancelled append) the writer is unusable; drop it.
    pub async fn append(&mut self, data: &[u8]) -> Result<(), QueueError> {
        let mut spool = self.spool.take().ok_or_else(|| self.broken())?;
        let data = data.to_vec();
        let path = self.path.clone();
        let spool = blocking(&self.path, "spooling a message", move || {
            spool
                .append(&data)
                .map_err(|e| QueueError::io("writing a spooled message in", &path, e))?;
            Ok(spool)
        })
        .await?;
        self.spool = Some(spool);
        Ok(())
    }

    fn broken(&self) -> QueueError {
        QueueError::io(
            "spooling a message in",
            &self.path,
            std::io::Error::other("an earlier write failed"),
        )
    }

    /// The whole body, ending with `tail`.
    async fn finish(mut self, tail: &[u8]) -> Result<Body, QueueError> {
        self.append(tail).await?;
        let spool = self.spool.take().ok_or_else(|| self.broken())?;
        Ok(Body::Spooled(spool.finish()))
    }
}

/// The text a passthrough message fails with when its relay no longer holds
/// it: the client waited on a connection that is gone and resends it.
pub(crate) fn orphan_reply() -> Reply {
    Reply {
        code: 554,
        enhanced: Some(Enhanced::new(5, 3, 0)),
        text: "not delivered: the relay stopped while the client waited (passthrough); the client resends it".into(),
    }
}

impl Queue {
    /// Stores a message durably and wakes a worker for it.
    ///
    /// When this returns `Ok` the message is committed: the listener may
    /// answer 250. Concurrent calls share one commit. On `Err` nothing was
    /// committed (the listener answers 4xx). The commit runs to completion
    /// even if the returned future is dropped.
    pub async fn enqueue(&self, msg: NewMessage, body: &[u8]) -> Result<QueueId, QueueError> {
        self.insert(msg, Body::Bytes(body.to_vec()), None).await
    }

    /// [`Queue::enqueue`] taking the body by value: the listener hands over
    /// the message it received instead of holding it twice.
    pub async fn enqueue_owned(
        &self,
        msg: NewMessage,
        body: Vec<u8>,
    ) -> Result<QueueId, QueueError> {
        self.insert(msg, Body::Bytes(body), None).await
    }

    /// Starts the body of a message too large to hold in memory while it
    /// is received: an anonymous file that [`BodyWriter::append`] fills and
    /// [`Queue::enqueue_spooled`] commits.
    pub async fn begin_body(&self) -> Result<BodyWriter, QueueError> {
        let path = self.inner.settings.dir.join(SPOOL_DIR);
        let dir = path.clone();
        let file = blocking(&path, "spooling a message", move || {
            tempfile::tempfile_in(&dir)
                .map_err(|e| QueueError::io("spooling a message in", &dir, e))
        })
        .await?;
        Ok(BodyWriter {
            path,
            spool: Some(Spool::new(file)),
        })
    }

    /// Stores a message like [`Queue::enqueue`] whose body so far is in
    /// `writer` and ends with `tail`.
    pub async fn enqueue_spooled(
        &self,
        msg: NewMessage,
        writer: BodyWriter,
        tail: &[u8],
    ) -> Result<QueueId, QueueError> {
        let body = writer.finish(tail).await?;
        self.insert(msg, body, None).await
    }

    /// [`Queue::enqueue_passthrough`] for a spooled body (see
    /// [`Queue::enqueue_spooled`]).
    pub async fn enqueue_passthrough_spooled(
        &self,
        msg: NewMessage,
        writer: BodyWriter,
        tail: &[u8],
    ) -> Result<(QueueId, oneshot::Receiver<Vec<RecipientResult>>), QueueError> {
        let body = writer.finish(tail).await?;
        self.passthrough(msg, body).await
    }

    /// Stores a message like [`Queue::enqueue`] for a client that waits for
    /// the upstream's answer (passthrough mode). The message is leased to
    /// this relay from the start and handed to one of its workers (the
    /// client's connection is here); the receiver gets the results of its
    /// first attempt. If this relay loses it (it
    /// dies), the message fails rather than go out behind the client's
    /// back: the client resends it.
    pub async fn enqueue_passthrough(
        &self,
        msg: NewMessage,
        body: Vec<u8>,
    ) -> Result<(QueueId, oneshot::Receiver<Vec<RecipientResult>>), QueueError> {
        self.passthrough(msg, Body::Bytes(body)).await
    }

    async fn passthrough(
        &self,
        msg: NewMessage,
        body: Body,
    ) -> Result<(QueueId, oneshot::Receiver<Vec<RecipientResult>>), QueueError> {
        let (tx, rx) = oneshot::channel();
        let id = self.insert(msg, body, Some(tx)).await?;
        Ok((id, rx))
    }

    async fn insert(
        &self,
        msg: NewMessage,
        body: Body,
        watcher: Option<oneshot::Sender<Vec<RecipientResult>>>,
    ) -> Result<QueueId, QueueError> {
        let mut recipients: Vec<String> = Vec::with_capacity(msg.recipients.len());
        for r in msg.recipients {
            if !recipients.contains(&r) {
                recipients.push(r);
            }
        }
        if recipients.is_empty() {
            return Err(QueueError::Invalid {
                path: self.inner.settings.dir.clone(),
                reason: "the message has no recipients".into(),
            });
        }
        let id = self.inner.ids.next();
        let now = SystemTime::now();
        let lease = watcher.is_some().then(|| LeaseHolder {
            relay: self.inner.store.relay().to_owned(),
            expires: add_time(now, self.inner.settings.lease_timeout),
        });
        let message = relay_store::NewMessage {
            envelope: Envelope {
                id: id.to_string(),
                account: msg.account,
                sender: msg.sender,
                client: msg.client.map(|c| c.to_string()),
                received_at: now,
                passthrough: watcher.is_some(),
            },
            progress: Progress::new(&recipients, now),
            held: false,
            lease,
            body,
        };
        let inner = self.inner.clone();
        // A task of its own, so that the wake-up (or the hand-off) follows
        // the commit even if the caller stops waiting.
        tokio::spawn(async move {
            let stored = Message {
                envelope: message.envelope.clone(),
                progress: message.progress.clone(),
                held: false,
                size: message.body.len(),
                lease: message.lease.clone(),
            };
            inner.store.insert(message).await?;
            tracing::debug!(queue_id = %id, account = %stored.envelope.account, size = stored.size, "message queued");
            let account = stored.envelope.account.clone();
            let waker = match watcher {
                Some(watcher) => {
                    let lease = inner.lease(stored)?;
                    let mut local = lock(&inner.local);
                    local.watchers.insert(id.clone(), watcher);
                    local
                        .handoff
                        .entry(account.clone())
                        .or_default()
                        .push_back(lease);
                    local.waker(&account)
                }
                None => lock(&inner.local).waker(&account),
            };
            waker.notify_waiters();
            Ok(id)
        })
        .await
        .map_err(|source| QueueError::Task {
            action: "queueing message",
            path: self.inner.settings.dir.clone(),
            source,
        })?
    }
}

//! The queue's error type.

use std::io;
use std::path::PathBuf;

use crate::QueueId;

/// Everything that can go wrong in the queue. Every variant names the file or
/// directory involved and what the queue was doing with it, so the message is
/// actionable on its own (e.g. `fsyncing directory /var/spool/relay/meta:
/// Input/output error`).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// A file-system operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What the queue was doing, e.g. `"renaming message body to"`.
        action: &'static str,
        /// The file or directory the operation was about.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A metadata file of an older queue being imported (or the body it
    /// refers to) cannot be used: it does not parse, is missing fields,
    /// disagrees with its file name, or its body is missing or does not
    /// match. [`crate::Queue::open`] moves such entries to `corrupt/`
    /// instead of failing.
    #[error("corrupt queue entry {}: {reason}", path.display())]
    Corrupt {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// Another relay holds the queue directory's lock: two relays must not
    /// share one embedded store (share a PostgreSQL database instead).
    #[error("queue directory {} is locked by another process (is another relay running on it?)", path.display())]
    Locked {
        /// The lock file.
        path: PathBuf,
    },

    /// [`crate::Queue::enqueue`] was given a message it cannot accept (for
    /// instance one without recipients). Nothing was written.
    #[error("refusing to queue a message in {}: {reason}", path.display())]
    Invalid {
        /// The queue directory.
        path: PathBuf,
        /// Why the message was refused.
        reason: String,
    },

    /// [`crate::Queue::record`] was given a lease that does not belong to
    /// this queue.
    #[error("message {id} in {} is not leased from this queue", path.display())]
    NotLeased {
        /// The queue directory.
        path: PathBuf,
        /// The message the lease was for.
        id: QueueId,
    },

    /// No message with this id is in the queue.
    #[error("no such message: {id}")]
    NoSuchMessage {
        /// The id asked for.
        id: QueueId,
    },

    /// The store (the database) failed: unreachable, full, or refusing.
    /// Nothing was changed by the operation that got it.
    #[error("queue store: {0}")]
    Store(#[from] relay_store::StoreError),

    /// This relay's lease on the message ended before its outcome was
    /// recorded (it expired while the database was unreachable and another
    /// relay took the message over, or an administrator deleted it): the
    /// outcome is not recorded; whoever holds the message now decides.
    #[error("message {id}: this relay's lease on it is gone; its outcome is not recorded")]
    LeaseLost {
        /// The message.
        id: QueueId,
    },

    /// A task doing file I/O or a store write panicked or was cancelled at
    /// runtime shutdown.
    #[error("{action} {}: background I/O task failed: {source}", path.display())]
    Task {
        /// What the task was doing.
        action: &'static str,
        /// The queue directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: tokio::task::JoinError,
    },
}

impl QueueError {
    /// Whether the queue's database could not be reached (see
    /// [`relay_store::StoreError::is_unreachable`]): trying again later,
    /// unchanged, may succeed.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, QueueError::Store(e) if e.is_unreachable())
    }

    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        QueueError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        QueueError::Corrupt {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

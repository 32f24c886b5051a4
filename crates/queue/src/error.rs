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

    /// A metadata file (or a body it refers to) cannot be used: it does not
    /// parse, is missing fields, disagrees with its file name, or its body is
    /// missing or has the wrong size. [`crate::Queue::open`] moves such
    /// entries to `corrupt/` instead of failing; [`crate::list`] reports them
    /// with this error.
    #[error("corrupt queue entry {}: {reason}", path.display())]
    Corrupt {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// Another process (most likely another relay) holds the queue's lock
    /// file. Two relays must never share a queue directory: `open` cleans up
    /// files that belong to the other one's in-flight writes.
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

    /// [`crate::Queue::record`] or [`crate::Queue::read_body`] was given a
    /// lease that does not belong to this queue (or the message is gone).
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

    /// Encoding a metadata file failed (should not happen; kept so that no
    /// code path panics).
    #[error("encoding metadata for {}: {source}", path.display())]
    Encode {
        /// The metadata file that was to be written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },

    /// The blocking task doing the file I/O panicked or was cancelled at
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

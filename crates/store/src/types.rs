//! What the store keeps about a message.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::{Body, StoreError};

/// The state of a queued message (as `queue list --json` spells it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageState {
    /// Accepted, never tried yet.
    Queued,
    /// Tried at least once; some recipients wait for a retry.
    Deferred,
    /// Final: nothing left to try and at least one recipient failed. Kept
    /// (and listed) until an administrator deletes or retries it.
    Failed,
}

/// The delivery state of one recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecipientState {
    /// Not tried yet.
    Pending,
    /// Accepted by the upstream; never tried again.
    Delivered,
    /// Temporarily refused; tried again.
    Deferred,
    /// Refused for good, or given up on after `max_age`.
    Failed,
}

impl RecipientState {
    /// Whether a recipient in this state is still to be tried.
    pub fn is_open(self) -> bool {
        matches!(self, RecipientState::Pending | RecipientState::Deferred)
    }
}

macro_rules! spelled {
    ($ty:ident, $column:literal, $($variant:ident = $text:literal),+) => {
        impl $ty {
            pub(crate) fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $text),+ }
            }

            pub(crate) fn parse(id: &str, text: &str) -> Result<$ty, StoreError> {
                match text {
                    $($text => Ok($ty::$variant),)+
                    _ => Err(StoreError::Invalid {
                        id: id.to_string(),
                        column: $column,
                        value: text.to_string(),
                    }),
                }
            }
        }
    };
}

spelled!(
    MessageState,
    "state",
    Queued = "queued",
    Deferred = "deferred",
    Failed = "failed"
);
spelled!(
    RecipientState,
    "recipient state",
    Pending = "pending",
    Delivered = "delivered",
    Deferred = "deferred",
    Failed = "failed"
);

/// An upstream reply as the transport parsed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code; `0` for a bare text from an old queue.
    pub code: u16,
    /// The enhanced status as written, e.g. `5.7.705`.
    pub enhanced: Option<String>,
    /// The whole reply.
    pub text: String,
}

/// One recipient and how far its delivery got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recipient {
    /// The envelope address.
    pub address: String,
    /// Its state.
    pub state: RecipientState,
    /// The last reply for it.
    pub reply: Option<Reply>,
    /// The reason the transport gave that reply, in the queue's own
    /// spelling (the store does not interpret it).
    pub reason: Option<String>,
}

/// What never changes about a message once accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// The queue id (unique; sorts by acceptance time).
    pub id: String,
    /// The upstream mailbox it is delivered through.
    pub account: String,
    /// The envelope sender; empty for `<>`.
    pub sender: String,
    /// The client's address, as text.
    pub client: Option<String>,
    /// When it was accepted.
    pub received_at: SystemTime,
    /// Its client waits for the upstream's answer.
    pub passthrough: bool,
}

/// What each attempt changes. [`crate::Store::record`] replaces it whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Queued, deferred or failed.
    pub state: MessageState,
    /// Attempts made.
    pub attempts: u32,
    /// When it is due; `None` only for failed messages.
    pub next_attempt: Option<SystemTime>,
    /// The last error, for `queue list`.
    pub last_error: Option<String>,
    /// Every recipient, in the order given.
    pub recipients: Vec<Recipient>,
}

impl Progress {
    /// A message never tried: every recipient pending, due `at`.
    pub fn new(recipients: &[String], at: SystemTime) -> Progress {
        Progress {
            state: MessageState::Queued,
            attempts: 0,
            next_attempt: Some(at),
            last_error: None,
            recipients: recipients
                .iter()
                .map(|address| Recipient {
                    address: address.clone(),
                    state: RecipientState::Pending,
                    reply: None,
                    reason: None,
                })
                .collect(),
        }
    }
}

/// A message to store: envelope, state and body. New messages come with
/// [`Progress::new`]; imported ones with what the old queue recorded.
#[derive(Debug)]
pub struct NewMessage {
    /// What never changes.
    pub envelope: Envelope,
    /// Its state so far.
    pub progress: Progress,
    /// Set aside by an administrator: not delivered until released.
    pub held: bool,
    /// Leased from the start (a passthrough message, delivered by the relay
    /// holding its client's connection); `None` for any relay to take.
    pub lease: Option<LeaseHolder>,
    /// The message as received.
    pub body: Body,
}

/// Who holds a message's lease, and until when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseHolder {
    /// The relay's id.
    pub relay: String,
    /// When another relay may take it over.
    pub expires: SystemTime,
}

/// A stored message, without its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// What never changes.
    pub envelope: Envelope,
    /// Its state so far.
    pub progress: Progress,
    /// Set aside by an administrator.
    pub held: bool,
    /// The body's size in bytes.
    pub size: u64,
    /// The lease on it, if any (possibly expired).
    pub lease: Option<LeaseHolder>,
}

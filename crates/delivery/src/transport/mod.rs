//! The seam between the delivery worker and a way out to the upstream.
//!
//! The worker owns what is the same for every way out: taking due messages,
//! the per-mailbox pace and cap on concurrent sessions, retries (through
//! the queue) and recording. A [`Transport`] only opens a session for a
//! mailbox (an authenticated SMTP connection, or a reusable HTTP client)
//! and delivers one message over it, saying per recipient what happened
//! ([`relay_outcome::Outcome`], decided where the reply is received) and
//! whether the upstream asked the mailbox to slow down.

pub mod graph;
pub mod smtp;

use crate::Account;
use relay_outcome::{Outcome, Reason, Throttle};
use relay_queue::QueueId;
use std::future::Future;
use std::time::Duration;

/// One message to deliver.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    /// Its queue id, for logs and to tag what an attempt leaves upstream.
    pub queue_id: &'a QueueId,
    /// The envelope sender; `""` for the null sender.
    pub sender: &'a str,
    /// The recipients to try now.
    pub recipients: &'a [String],
    /// The message, byte for byte as it is to be delivered.
    pub body: &'a [u8],
}

/// The upstream asks the mailbox to send less.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowDown {
    /// Too many concurrent sessions: use one fewer for a while. The
    /// session that was told so is not used again.
    FewerSessions,
    /// Send nothing for the whole mailbox for this long (`Retry-After`),
    /// or for the transport's usual pause when the upstream named none.
    Pause(Option<Duration>),
}

impl SlowDown {
    /// The slow-down the outcomes of one attempt ask for, if any.
    pub fn from_outcomes(outcomes: &[Outcome]) -> Option<SlowDown> {
        outcomes.iter().find_map(|o| match o.reason {
            Reason::Throttled(Throttle::Connections) => Some(SlowDown::FewerSessions),
            Reason::Throttled(Throttle::Quota | Throttle::Requests) => Some(SlowDown::Pause(None)),
            _ => None,
        })
    }
}

/// What one delivery over an open session gave.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// One outcome per recipient, in the order given.
    pub outcomes: Vec<Outcome>,
    /// Whether the upstream asked the mailbox to slow down.
    pub slow_down: Option<SlowDown>,
}

/// No session could be opened.
#[derive(Debug, Clone)]
pub struct Unopened {
    /// What every recipient of the message in hand gets.
    pub outcome: Outcome,
    /// Whether the upstream asked the mailbox to slow down.
    pub slow_down: Option<SlowDown>,
}

impl From<Outcome> for Unopened {
    fn from(outcome: Outcome) -> Unopened {
        Unopened {
            slow_down: SlowDown::from_outcomes(std::slice::from_ref(&outcome)),
            outcome,
        }
    }
}

/// The session failed during a delivery and is not to be used again.
#[derive(Debug, Clone)]
pub struct Broken {
    /// What every recipient of the attempt gets.
    pub outcome: Outcome,
    /// Nothing can have been delivered (the message was not handed over):
    /// trying again at once on a fresh session cannot duplicate it.
    pub retry_fresh: bool,
}

/// A way out to the upstream (SMTP submission, Microsoft Graph).
///
/// The futures are `Send` so that workers run on any thread.
pub trait Transport: Send + Sync + 'static {
    /// An open, authenticated session for one mailbox: a connection, or a
    /// reusable HTTP client with its token. The worker keeps it between
    /// messages until it has been idle for [`Transport::idle_timeout`], and
    /// never holds more than the mailbox's cap of them at once.
    type Session: Send + 'static;

    /// Where messages go, for logs (`relay=`): `host:port`, or the API's host.
    fn relay(&self) -> &str;

    /// How long an unused session is kept open.
    fn idle_timeout(&self) -> Duration;

    /// Opens a session for `account`'s mailbox.
    fn open(
        &self,
        account: &Account,
    ) -> impl Future<Output = Result<Self::Session, Unopened>> + Send;

    /// Delivers `message` over `session`.
    fn deliver(
        &self,
        session: &mut Self::Session,
        message: Message<'_>,
    ) -> impl Future<Output = Result<Delivered, Broken>> + Send;

    /// Whether `session` has carried a message already (and so may have
    /// been closed by the upstream while idle).
    fn reused(session: &Self::Session) -> bool;

    /// Ends a session politely; errors do not matter any more.
    fn close(&self, session: Self::Session) -> impl Future<Output = ()> + Send;
}

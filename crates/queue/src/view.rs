//! What the queue shows of a message (`queue list`, `queue show`), and the
//! conversions between the transport's outcomes and what the store keeps.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use relay_outcome::{Enhanced, Outcome, Reason, Reply};
use relay_store::{Message, MessageState, Recipient, RecipientState};
use serde::{Deserialize, Serialize};

/// One recipient of a queued message and how far its delivery got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientStatus {
    /// The envelope recipient address, as given to the queue.
    pub address: String,
    /// Its delivery state.
    pub status: RecipientState,
    /// The last reply the upstream gave for it (its full text), if any.
    pub reply: Option<String>,
}

/// A read-only snapshot of one queued message, as shown by `queue list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The message's [`crate::QueueId`].
    pub id: String,
    /// Queued, deferred or failed.
    pub state: MessageState,
    /// The envelope sender; empty for the null sender `<>`.
    pub sender: String,
    /// Every envelope recipient, in the order given (duplicates removed).
    pub recipients: Vec<String>,
    /// The upstream account (mailbox) the message is delivered through.
    pub account: String,
    /// Number of delivery attempts made so far.
    pub attempts: u32,
    /// When the message was accepted, RFC 3339 UTC with seconds precision.
    pub received_at: String,
    /// When the next attempt is due, RFC 3339 UTC; `null` for failed
    /// messages. May be in the past (due now, or being tried).
    pub next_attempt: Option<String>,
    /// The last non-success reply (full text), if there was one.
    pub last_error: Option<String>,
    /// Size of the message body in bytes.
    pub size: u64,
    /// Per-recipient delivery state and last reply.
    pub recipient_status: Vec<RecipientStatus>,
    /// Held by an administrator: not delivered until released.
    #[serde(default)]
    pub held: bool,
    /// The relay delivering it right now (its lease has not expired), if
    /// any: its id as that relay logs it at start.
    #[serde(default)]
    pub lease: Option<String>,
}

impl Entry {
    /// The public view of a stored message, at `now` (for the lease).
    pub(crate) fn of(m: &Message, now: SystemTime) -> Entry {
        Entry {
            id: m.envelope.id.clone(),
            state: m.progress.state,
            sender: m.envelope.sender.clone(),
            recipients: m
                .progress
                .recipients
                .iter()
                .map(|r| r.address.clone())
                .collect(),
            account: m.envelope.account.clone(),
            attempts: m.progress.attempts,
            received_at: format_rfc3339_seconds(m.envelope.received_at),
            next_attempt: match m.progress.state {
                MessageState::Failed => None,
                _ => m.progress.next_attempt.map(format_rfc3339_seconds),
            },
            last_error: m.progress.last_error.clone(),
            size: m.size,
            recipient_status: m
                .progress
                .recipients
                .iter()
                .map(|r| RecipientStatus {
                    address: r.address.clone(),
                    status: r.state,
                    reply: r.reply.as_ref().map(|r| r.text.clone()),
                })
                .collect(),
            held: m.held,
            lease: m
                .lease
                .as_ref()
                .filter(|l| l.expires > now)
                .map(|l| l.relay.clone()),
        }
    }
}

/// An entry set aside in `corrupt/` (when an older queue was imported), as
/// [`crate::Queue::unusable`] reports it: never delivered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unusable {
    /// The message's [`crate::QueueId`].
    pub id: String,
    /// The metadata file.
    pub path: std::path::PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

/// A recipient as the store keeps it: the reply's parts and the reason in
/// its serde spelling (`deferred`, `{"throttled":"quota"}`).
pub(crate) fn stored_recipient(
    address: String,
    state: RecipientState,
    reply: Option<&Reply>,
    reason: Option<Reason>,
) -> Recipient {
    Recipient {
        address,
        state,
        reply: reply.map(stored_reply),
        reason: reason.and_then(|reason| match serde_json::to_value(reason) {
            Ok(serde_json::Value::String(s)) => Some(s),
            Ok(other) => Some(other.to_string()),
            Err(_) => None,
        }),
    }
}

/// A reply as the store keeps it.
pub(crate) fn stored_reply(reply: &Reply) -> relay_store::Reply {
    relay_store::Reply {
        code: reply.code,
        enhanced: reply.enhanced.map(|e| e.to_string()),
        text: reply.text.clone(),
    }
}

/// The reply the store kept for a recipient.
pub(crate) fn reply_of(r: &Recipient) -> Option<Reply> {
    let stored = r.reply.as_ref()?;
    Some(Reply {
        code: stored.code,
        enhanced: stored.enhanced.as_deref().and_then(Enhanced::parse),
        text: stored.text.clone(),
    })
}

/// The last outcome recorded for a recipient, if any. A reply stored
/// without a reason (by the first releases) gets the one its state implies.
pub(crate) fn outcome_of(r: &Recipient) -> Option<Outcome> {
    let reply = reply_of(r)?;
    let stored = r.reason.as_deref().and_then(|s| {
        serde_json::from_str::<Reason>(s)
            .or_else(|_| serde_json::from_value(serde_json::Value::String(s.to_owned())))
            .ok()
    });
    let reason = stored.unwrap_or(match r.state {
        RecipientState::Delivered => Reason::Delivered,
        RecipientState::Failed => Reason::Refused,
        RecipientState::Pending | RecipientState::Deferred => Reason::Deferred,
    });
    Some(Outcome::new(reason, reply))
}

/// The last instant humantime can format (9999-12-31T23:59:59Z).
const MAX_SECS: u64 = 253_402_300_799;

/// Clamps a time into the range RFC 3339 formatting supports (1970–9999),
/// so that formatting can never panic, whatever the clock or settings say.
fn clamp(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Err(_) => UNIX_EPOCH,
        Ok(d) if d.as_secs() > MAX_SECS => UNIX_EPOCH + Duration::from_secs(MAX_SECS),
        Ok(_) => t,
    }
}

/// Formats a time as RFC 3339 UTC with seconds precision.
pub(crate) fn format_rfc3339_seconds(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(clamp(t)).to_string()
}

/// Adds a duration to a time, saturating at the latest formattable time.
pub(crate) fn add_time(t: SystemTime, d: Duration) -> SystemTime {
    clamp(
        t.checked_add(d)
            .unwrap_or(UNIX_EPOCH + Duration::from_secs(MAX_SECS)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_never_panics() {
        assert_eq!(format_rfc3339_seconds(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let far = add_time(SystemTime::now(), Duration::MAX);
        assert_eq!(format_rfc3339_seconds(far), "9999-12-31T23:59:59Z");
        let before = UNIX_EPOCH
            .checked_sub(Duration::from_secs(10))
            .unwrap_or(UNIX_EPOCH);
        assert_eq!(format_rfc3339_seconds(before), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn outcomes_round_trip_through_the_store() {
        use relay_outcome::Throttle;
        for reason in [
            Reason::Delivered,
            Reason::Throttled(Throttle::Quota),
            Reason::Expired,
        ] {
            let reply = Reply::parse("452 4.3.2 slow down").expect("reply");
            let r = stored_recipient(
                "a@b".into(),
                RecipientState::Deferred,
                Some(&reply),
                Some(reason),
            );
            assert_eq!(outcome_of(&r), Some(Outcome::new(reason, reply)));
        }
        assert_eq!(
            stored_recipient(
                "a@b".into(),
                RecipientState::Deferred,
                None,
                Some(Reason::Local)
            )
            .reason
            .as_deref(),
            Some("local")
        );
    }
}

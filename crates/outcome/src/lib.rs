//! What became of one recipient at the upstream, shared by the queue and
//! every transport (SMTP, Microsoft Graph).
//!
//! A transport decides once, where it receives the upstream's answer, what
//! it means: an [`Outcome`] is the [`Reply`] (code, enhanced status, text)
//! and the [`Reason`] read from it. Nothing downstream (the queue's
//! bookkeeping, metrics, logs, failure notices, a passthrough client's
//! reply) looks at the reply's text again.

#![warn(missing_docs)]

mod reply;

pub use reply::{Enhanced, Reply, MAX_REPLY_LINE};

use serde::{Deserialize, Serialize};

/// What the upstream's answer (or the failure to get one) means for the
/// recipient. Each reason has one [`Verdict`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Accepted by the upstream.
    Delivered,
    /// Refused for good (unknown recipient, policy, size, …).
    Refused,
    /// Refused for now, for no more specific reason.
    Deferred,
    /// The upstream asks the mailbox to slow down.
    Throttled(Throttle),
    /// The upstream refused the access token (`535 5.7.3`, `535 5.7.8`).
    TokenRejected,
    /// Authentication failed for another reason (`5.7.57`, `5.7.30`, a
    /// `535` without more detail).
    AuthFailed,
    /// SMTP AUTH is disabled for the mailbox or tenant (`535 5.7.139`).
    SmtpAuthDisabled,
    /// The mailbox may not send as this sender (`5.2.252`, `5.7.60`).
    SendAsDenied,
    /// No access token could be had from the identity platform.
    NoToken,
    /// The upstream could not be reached or the connection failed.
    Network(Network),
    /// The relay could not attempt the delivery (e.g. the queued message
    /// could not be read).
    Local,
    /// Still not delivered when the message reached its maximum age.
    Expired,
}

/// The ways an upstream asks the mailbox to send less.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Throttle {
    /// Too many concurrent connections or sessions (`432 4.3.2`).
    Connections,
    /// The mailbox's submission quota is used up (`5.2.2`).
    Quota,
    /// Too many requests (HTTP 429, possibly with `Retry-After`).
    Requests,
}

/// Which step of reaching the upstream failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// The host name did not resolve.
    Dns,
    /// No TCP connection could be made.
    Connect,
    /// The TLS handshake failed (trust, version, STARTTLS missing).
    Tls,
    /// An established connection broke or stopped answering.
    Lost,
}

/// What is to be done with the recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Done: the upstream has it.
    Delivered,
    /// Try again later (until the message's maximum age).
    Temporary,
    /// Give up: the recipient fails.
    Permanent,
}

impl Reason {
    /// What the reason means for the recipient. Authentication and setup
    /// problems are temporary: an administrator fixes them and the mail
    /// waits rather than bounce.
    pub fn verdict(self) -> Verdict {
        match self {
            Reason::Delivered => Verdict::Delivered,
            Reason::Refused | Reason::SendAsDenied | Reason::Expired => Verdict::Permanent,
            Reason::Deferred
            | Reason::Throttled(_)
            | Reason::TokenRejected
            | Reason::AuthFailed
            | Reason::SmtpAuthDisabled
            | Reason::NoToken
            | Reason::Network(_)
            | Reason::Local => Verdict::Temporary,
        }
    }

    /// A short name, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Delivered => "delivered",
            Reason::Refused => "refused",
            Reason::Deferred => "deferred",
            Reason::Throttled(Throttle::Connections) => "too_many_connections",
            Reason::Throttled(Throttle::Quota) => "quota",
            Reason::Throttled(Throttle::Requests) => "too_many_requests",
            Reason::TokenRejected => "token_rejected",
            Reason::AuthFailed => "auth_failed",
            Reason::SmtpAuthDisabled => "smtp_auth_disabled",
            Reason::SendAsDenied => "send_as_denied",
            Reason::NoToken => "no_token",
            Reason::Network(Network::Dns) => "dns",
            Reason::Network(Network::Connect) => "connect",
            Reason::Network(Network::Tls) => "tls",
            Reason::Network(Network::Lost) => "connection_lost",
            Reason::Local => "local",
            Reason::Expired => "expired",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened to one recipient: the reply and what it means.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// Why, decided where the reply was received.
    pub reason: Reason,
    /// The upstream's reply, or one worded like it for a local failure.
    pub reply: Reply,
}

impl Outcome {
    /// An outcome for `reason` with `reply`.
    pub fn new(reason: Reason, reply: Reply) -> Outcome {
        Outcome { reason, reply }
    }

    /// The upstream accepted the recipient with `reply`.
    pub fn delivered(reply: Reply) -> Outcome {
        Outcome::new(Reason::Delivered, reply)
    }

    /// What is to be done with the recipient.
    pub fn verdict(&self) -> Verdict {
        self.reason.verdict()
    }

    /// Whether the upstream accepted the recipient.
    pub fn is_delivered(&self) -> bool {
        self.reason == Reason::Delivered
    }

    /// A short, stable name for why the recipient was not delivered, for
    /// metrics labels: `none` (delivered), `auth`, `send_as`, `recipient`,
    /// `quota`, `connections`, `throttled`, `policy`, `size`, `expired`,
    /// `transport` or `other`.
    pub fn label(&self) -> &'static str {
        match self.reason {
            Reason::Delivered => "none",
            Reason::TokenRejected | Reason::AuthFailed | Reason::SmtpAuthDisabled => "auth",
            Reason::SendAsDenied => "send_as",
            Reason::Throttled(Throttle::Quota) => "quota",
            Reason::Throttled(Throttle::Connections) => "connections",
            Reason::Throttled(Throttle::Requests) => "throttled",
            Reason::Expired => "expired",
            Reason::NoToken | Reason::Network(_) | Reason::Local => "transport",
            Reason::Refused | Reason::Deferred => match self.reply.enhanced {
                Some(Enhanced { subject: 1, .. }) => "recipient",
                Some(Enhanced {
                    subject: 3,
                    detail: 4,
                    ..
                }) => "size",
                Some(Enhanced { subject: 7, .. }) => "policy",
                _ => "other",
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_the_reason() {
        let reply = |line: &str| Reply::parse(line).expect("reply");
        let expired = Outcome::new(Reason::Expired, reply("451 4.7.500 Server busy"));
        assert_eq!(expired.label(), "expired");
        assert_eq!(expired.verdict(), Verdict::Permanent);
        let unknown = Outcome::new(Reason::Refused, reply("550 5.1.1 User unknown"));
        assert_eq!(unknown.label(), "recipient");
        let policy = Outcome::new(Reason::Refused, reply("550 5.7.708 Access denied"));
        assert_eq!(policy.label(), "policy");
        let ok = Outcome::delivered(reply("250 2.0.0 OK"));
        assert_eq!(ok.label(), "none");
        assert!(ok.is_delivered());
    }

    #[test]
    fn outcome_round_trips_through_json() {
        let outcome = Outcome::new(
            Reason::Network(Network::Tls),
            Reply::local(451, Enhanced::new(4, 7, 5), "TLS handshake failed"),
        );
        let json = serde_json::to_string(&outcome).expect("encode");
        assert_eq!(
            json,
            r#"{"reason":{"network":"tls"},"reply":{"code":451,"enhanced":"4.7.5","text":"451 4.7.5 TLS handshake failed"}}"#
        );
        let back: Outcome = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, outcome);
    }
}

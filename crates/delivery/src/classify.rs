//! Temporary or permanent: what a reply means for the message, with a
//! one-line hint for the replies Microsoft 365 setups commonly produce.

use crate::reply::{Enhanced, Reply};

/// What to do with the recipients a reply concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Try again later.
    Temporary,
    /// Give up: the message fails for these recipients.
    Permanent,
}

/// Classifies a negative reply. The enhanced status decides where Microsoft's
/// meaning differs from the basic code (a `535 5.7.139` is a setup problem
/// that an admin fixes, so mail waits for it rather than bounce).
pub fn classify(reply: &Reply) -> (Verdict, Option<&'static str>) {
    let by_code = if reply.code >= 500 {
        Verdict::Permanent
    } else {
        Verdict::Temporary
    };
    let Some(Enhanced {
        class,
        subject,
        detail,
    }) = reply.enhanced
    else {
        return (by_code, None);
    };
    match (class, subject, detail) {
        (5, 7, 139) => (Verdict::Temporary, Some("SMTP AUTH is disabled for the mailbox or tenant: run `Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false` (security defaults also turn it off)")),
        (5, 7, 3) => (Verdict::Temporary, Some("the token was refused: check New-ServicePrincipal used the Enterprise Application's object id, then Add-MailboxPermission for the mailbox, and that the mailbox is the account's")),
        (5, 7, 57) => (Verdict::Temporary, Some("the upstream says the client is not authenticated: AUTH did not succeed or TLS was not negotiated")),
        (5, 7, 30) => (Verdict::Temporary, Some("basic authentication was refused; the relay only uses XOAUTH2: check upstream.host")),
        (5, 2, 252) | (5, 7, 60) => (Verdict::Permanent, Some("the mailbox may not send as this sender: send from the mailbox's address, or grant it Send As (Add-RecipientPermission -AccessRights SendAs)")),
        (4, 3, 2) => (Verdict::Temporary, Some("too many concurrent connections for the mailbox (Microsoft allows 3): lower upstream.max_connections")),
        (4, 7, 66) | (5, 7, 66) => (Verdict::Permanent, Some("the upstream requires TLS 1.2 or later")),
        (_, 2, 2) => (Verdict::Temporary, Some("the mailbox's submission quota is exceeded (30 messages a minute, 10,000 recipients a day): mail waits")),
        (5, 7, 705) => (Verdict::Permanent, Some("the tenant is blocked for sending spam: see the Microsoft 365 Defender portal")),
        (5, 7, 708) => (Verdict::Permanent, Some("the sending IP has a low reputation: Microsoft refuses its traffic")),
        (5, 7, 750) => (Verdict::Permanent, Some("the sender's domain is not registered as accepted in the tenant")),
        (4, 7, 500..=699) => (Verdict::Temporary, Some("a temporary access restriction of the tenant: mail waits")),
        _ => (by_code, None),
    }
}

/// A reply that says the mailbox is sending too much.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    /// `432 4.3.2`: too many concurrent connections.
    Connections,
    /// `5.2.2` (Exchange Online): the submission quota is used up.
    Quota,
}

/// Whether `reply` (a reply's full text) asks the mailbox to slow down.
pub fn throttle(reply: &str) -> Option<Throttle> {
    let reply = Reply::from_lines(&[reply.to_owned()])?;
    match reply.enhanced? {
        Enhanced {
            class: 4,
            subject: 3,
            detail: 2,
        } => Some(Throttle::Connections),
        Enhanced {
            subject: 2,
            detail: 2,
            ..
        } => Some(Throttle::Quota),
        _ => None,
    }
}

/// A short, stable name for why a reply (or local failure) did not deliver,
/// for metrics labels: `auth`, `send_as`, `recipient`, `quota`,
/// `connections`, `policy`, `size`, `expired`, `transport` or `other`.
pub fn reason_class(reply: &str) -> &'static str {
    if reply.starts_with("gave up after") {
        return "expired";
    }
    let Some(parsed) = Reply::from_lines(&[reply.to_owned()]) else {
        return "transport"; // no SMTP reply: connection, TLS or token trouble
    };
    match parsed.enhanced {
        Some(Enhanced {
            subject: 7,
            detail: 3 | 57 | 139 | 30,
            ..
        }) => "auth",
        Some(Enhanced {
            subject: 2,
            detail: 252,
            ..
        })
        | Some(Enhanced {
            subject: 7,
            detail: 60,
            ..
        }) => "send_as",
        Some(Enhanced { subject: 1, .. }) => "recipient",
        Some(Enhanced {
            subject: 2,
            detail: 2,
            ..
        }) => "quota",
        Some(Enhanced {
            class: 4,
            subject: 3,
            detail: 2,
        }) => "connections",
        Some(Enhanced {
            subject: 3,
            detail: 4,
            ..
        }) => "size",
        Some(Enhanced { subject: 7, .. }) => "policy",
        _ if parsed.code == 535 => "auth",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(line: &str) -> Verdict {
        classify(&Reply::from_lines(&[line.to_owned()]).expect("reply")).0
    }

    #[test]
    fn microsoft_specific_codes() {
        assert_eq!(
            verdict(
                "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled"
            ),
            Verdict::Temporary
        );
        assert_eq!(
            verdict("535 5.7.3 Authentication unsuccessful"),
            Verdict::Temporary
        );
        assert_eq!(
            verdict("554 5.2.252 SendAsDenied; relay@contoso.com not allowed"),
            Verdict::Permanent
        );
        assert_eq!(
            verdict("554 5.2.2 Submission quota exceeded"),
            Verdict::Temporary
        );
        assert_eq!(
            verdict("432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"),
            Verdict::Temporary
        );
        assert_eq!(verdict("550 5.7.708 Access denied"), Verdict::Permanent);
        assert_eq!(verdict("451 4.7.500 Server busy"), Verdict::Temporary);
        assert_eq!(verdict("550 5.1.1 User unknown"), Verdict::Permanent);
        assert_eq!(verdict("421 Service not available"), Verdict::Temporary);
    }

    #[test]
    fn reason_classes() {
        assert_eq!(reason_class("554 5.2.252 SendAsDenied; x"), "send_as");
        assert_eq!(
            reason_class("535 5.7.139 Authentication unsuccessful"),
            "auth"
        );
        assert_eq!(reason_class("550 5.1.1 User unknown"), "recipient");
        assert_eq!(
            reason_class("cannot connect to x:587: refused"),
            "transport"
        );
        assert_eq!(reason_class("gave up after 5days: 451 4.7.500"), "expired");
        assert_eq!(reason_class("550 5.7.708 Access denied"), "policy");
    }

    #[test]
    fn throttling_replies() {
        assert_eq!(
            throttle("432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"),
            Some(Throttle::Connections)
        );
        assert_eq!(
            throttle("554 5.2.2 Submission quota exceeded"),
            Some(Throttle::Quota)
        );
        assert_eq!(throttle("451 4.7.500 Server busy"), None);
        assert_eq!(throttle("no reply"), None);
    }
}

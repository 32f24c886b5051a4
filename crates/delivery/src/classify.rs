//! What an SMTP reply means, decided once where it is received: the
//! [`Reason`] it gives, and a one-line hint for the replies Microsoft 365
//! setups commonly produce.

use relay_outcome::{Enhanced, Network, Outcome, Reason, Reply, Throttle};

/// The reason a reply to a mail transaction (MAIL, RCPT, DATA) gives. The
/// enhanced status decides where Microsoft's meaning differs from the
/// basic code (a `535 5.7.139` is a setup problem that an admin fixes, so
/// mail waits for it rather than bounce).
pub fn classify(reply: &Reply) -> Reason {
    if reply.is_positive() {
        return Reason::Delivered;
    }
    let by_code = if reply.code >= 500 {
        Reason::Refused
    } else {
        Reason::Deferred
    };
    let Some(Enhanced {
        class,
        subject,
        detail,
    }) = reply.enhanced
    else {
        return by_code;
    };
    match (class, subject, detail) {
        (5, 7, 139) => Reason::SmtpAuthDisabled,
        (5, 7, 3 | 57 | 30) => Reason::AuthFailed,
        (5, 2, 252) | (5, 7, 60) => Reason::SendAsDenied,
        (4, 3, 2) => Reason::Throttled(Throttle::Connections),
        (_, 2, 2) => Reason::Throttled(Throttle::Quota),
        (4 | 5, 7, 66) => Reason::Refused,
        (4, 7, 500..=699) => Reason::Deferred,
        _ => by_code,
    }
}

/// The reason a refused AUTH gives: never one that bounces mail, since an
/// administrator fixes it and the mail waits. The token itself was refused
/// only for exactly `535 5.7.3` (Microsoft) or `535 5.7.8` (Gmail); not
/// 5.7.30-5.7.39 (e.g. basic auth refused) or 5.7.139 (SMTP AUTH
/// disabled), which a new token cannot help.
pub fn classify_auth(reply: &Reply) -> Reason {
    if let throttled @ Reason::Throttled(_) = classify(reply) {
        return throttled;
    }
    match (reply.code, reply.enhanced) {
        (
            _,
            Some(Enhanced {
                class: 5,
                subject: 7,
                detail: 139,
            }),
        ) => Reason::SmtpAuthDisabled,
        (
            535,
            Some(Enhanced {
                class: 5,
                subject: 7,
                detail: 3 | 8,
            }),
        ) => Reason::TokenRejected,
        _ => Reason::AuthFailed,
    }
}

/// The outcome of an SMTP reply to a mail transaction.
pub fn outcome(reply: Reply) -> Outcome {
    Outcome::new(classify(&reply), reply)
}

/// Both ways out of `535 5.7.139`.
pub const SMTP_AUTH_OFF_FIX: &str = "SMTP AUTH is off for the tenant or the mailbox (security defaults and the CIS benchmark turn it off): turn it on for the mailbox with `Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false`, or set transport = \"graph\" on the account to send through Microsoft Graph";

/// What an administrator can do about an outcome, when it is a known case.
pub fn hint(outcome: &Outcome) -> Option<&'static str> {
    let enhanced = outcome
        .reply
        .enhanced
        .map(|e| (e.class, e.subject, e.detail));
    Some(match outcome.reason {
        Reason::Delivered | Reason::Refused | Reason::Deferred | Reason::AuthFailed => {
            match enhanced? {
                (5, 7, 3) => "the token was refused: check New-ServicePrincipal used the Enterprise Application's object id, then Add-MailboxPermission for the mailbox, and that the mailbox is the account's",
                (5, 7, 57) => "the upstream says the client is not authenticated: AUTH did not succeed or TLS was not negotiated",
                (5, 7, 30) => "basic authentication was refused; the relay only uses XOAUTH2: check upstream.host",
                (4 | 5, 7, 66) => "the upstream requires TLS 1.2 or later",
                (5, 7, 705) => "the tenant is blocked for sending spam: see the Microsoft 365 Defender portal",
                (5, 7, 708) => "the sending IP has a low reputation: Microsoft refuses its traffic",
                (5, 7, 750) => "the sender's domain is not registered as accepted in the tenant",
                (4, 7, 500..=699) => "a temporary access restriction of the tenant: mail waits",
                _ => return None,
            }
        }
        Reason::SmtpAuthDisabled => SMTP_AUTH_OFF_FIX,
        Reason::TokenRejected => "the token was refused: check New-ServicePrincipal used the Enterprise Application's object id, then Add-MailboxPermission for the mailbox, and that the mailbox is the account's",
        Reason::SendAsDenied => "the mailbox may not send as this sender: send from the mailbox's address, or grant it Send As (Add-RecipientPermission -AccessRights SendAs)",
        Reason::Throttled(Throttle::Connections) => "too many concurrent connections for the mailbox (Microsoft allows 3): lower upstream.max_connections",
        Reason::Throttled(Throttle::Quota) => "the mailbox's submission quota is exceeded (30 messages a minute, 10,000 recipients a day): mail waits",
        Reason::Throttled(Throttle::Requests) => "the upstream asks the mailbox to send fewer requests: mail waits",
        Reason::NoToken => "no access token: `smtp-oauth-relay token` shows what the identity platform answers",
        Reason::Network(Network::Dns) => "the upstream host name does not resolve: check upstream.host and the resolver",
        Reason::Network(Network::Connect) => "no TCP connection: check upstream.host and upstream.port, and that a firewall or proxy allows the way out",
        Reason::Network(Network::Tls) => "TLS failed: if a TLS-inspecting proxy sits in the way, add its CA to upstream.ca_file; inside a container, install the CA bundle (ca-certificates)",
        Reason::Network(Network::Lost) => "the upstream broke the connection or stopped answering: mail waits",
        Reason::Local | Reason::Expired => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(line: &str) -> Reason {
        classify(&Reply::parse(line).expect("reply"))
    }

    #[test]
    fn microsoft_specific_codes() {
        assert_eq!(
            reason("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled"),
            Reason::SmtpAuthDisabled
        );
        assert_eq!(
            reason("535 5.7.3 Authentication unsuccessful"),
            Reason::AuthFailed
        );
        assert_eq!(
            reason("554 5.2.252 SendAsDenied; relay@contoso.com not allowed"),
            Reason::SendAsDenied
        );
        assert_eq!(
            reason("554 5.2.2 Submission quota exceeded"),
            Reason::Throttled(Throttle::Quota)
        );
        assert_eq!(
            reason("432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"),
            Reason::Throttled(Throttle::Connections)
        );
        assert_eq!(reason("550 5.7.708 Access denied"), Reason::Refused);
        assert_eq!(reason("451 4.7.500 Server busy"), Reason::Deferred);
        assert_eq!(reason("550 5.1.1 User unknown"), Reason::Refused);
        assert_eq!(reason("421 Service not available"), Reason::Deferred);
        assert_eq!(reason("250 2.0.0 OK"), Reason::Delivered);
    }

    #[test]
    fn auth_refusals_never_bounce() {
        let auth = |line: &str| classify_auth(&Reply::parse(line).expect("reply"));
        assert_eq!(
            auth("535 5.7.3 Authentication unsuccessful"),
            Reason::TokenRejected
        );
        assert_eq!(
            auth("535 5.7.8 Username and Password not accepted"),
            Reason::TokenRejected
        );
        assert_eq!(
            auth("535 5.7.139 Authentication unsuccessful"),
            Reason::SmtpAuthDisabled
        );
        assert_eq!(
            auth("535 5.7.30 Basic authentication is not supported"),
            Reason::AuthFailed
        );
        assert_eq!(auth("554 5.7.0 no"), Reason::AuthFailed);
    }

    #[test]
    fn hints_for_known_setups() {
        let out = outcome(Reply::parse("535 5.7.139 Authentication unsuccessful").expect("reply"));
        assert!(hint(&out).is_some_and(|h| h.contains("Set-CASMailbox")
            && h.contains("-SmtpClientAuthenticationDisabled $false")
            && h.contains("transport = \"graph\"")));
        let out = outcome(Reply::parse("550 5.1.1 User unknown").expect("reply"));
        assert_eq!(hint(&out), None);
    }
}

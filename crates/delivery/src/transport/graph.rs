//! Microsoft Graph's `sendMail`, for mailboxes whose tenant has SMTP AUTH
//! switched off.
//!
//! [`relay_graph::GraphClient`] does the HTTP (exact recipients, any size,
//! the per-mailbox request cap and `Retry-After` gate) and classifies each
//! failure once; this adapter fetches the bearer token and turns the result
//! into the [`Outcome`]s the queue records. The replies are worded as SMTP
//! replies, so a passthrough client gets `250`, `550 5.7.1` or `451 4.7.0`
//! carrying Graph's error code, message and request-id.

use super::{Broken, Delivered, Message, SlowDown, Transport, Unopened};
use crate::Account;
use relay_graph::{Accepted, Failure, GraphClient, GraphError};
use relay_outcome::{Enhanced, Network, Outcome, Reason, Reply, Throttle};
use relay_tokens::{AccessToken, TokenManager};
use std::sync::Arc;
use std::time::Duration;

/// A Graph session holds no connection of its own (the client's pool is
/// shared), so keeping one only bounds how long a worker waits with it.
const SESSION_IDLE: Duration = Duration::from_secs(30);

/// Delivery through Microsoft Graph: one client for every graph account.
pub struct Graph {
    client: Arc<GraphClient>,
    relay: String,
}

/// A mailbox's way to Graph: its address and its tokens.
pub struct GraphSession {
    mailbox: String,
    tokens: TokenManager,
    sent: u64,
}

impl Graph {
    /// Delivers through `client`.
    pub fn new(client: Arc<GraphClient>) -> Graph {
        let relay = client.settings().endpoint.to_string();
        Graph { client, relay }
    }

    /// The client it delivers through.
    pub fn client(&self) -> &Arc<GraphClient> {
        &self.client
    }

    /// Sends with the mailbox's token; a token Graph refuses (401) is
    /// replaced once and the send tried again. A failure comes with the
    /// pause Graph asked for, if any.
    async fn send(
        &self,
        session: &GraphSession,
        message: Message<'_>,
    ) -> Result<Accepted, (Outcome, Option<Duration>)> {
        let send = |token: AccessToken| async move {
            self.client
                .send(
                    token.secret().expose(),
                    &session.mailbox,
                    message.queue_id.as_str(),
                    message.recipients,
                    message.body,
                )
                .await
        };
        let failed = |retried: bool| move |e: GraphError| (outcome(&e, retried), e.retry_after());
        let token = session
            .tokens
            .token()
            .await
            .map_err(|e| (no_token(e), None))?;
        match send(token.clone()).await {
            Err(e) if e.failure == Failure::TokenRejected => {
                tracing::info!(error = %e, "graph refused the access token; fetching a new one");
                let fresh = session
                    .tokens
                    .refresh_rejected(&token)
                    .await
                    .map_err(|e| (no_token(e), None))?;
                send(fresh).await.map_err(failed(true))
            }
            result => result.map_err(failed(false)),
        }
    }
}

fn no_token(e: relay_tokens::TokenError) -> Outcome {
    Outcome::new(
        Reason::NoToken,
        Reply::local(
            451,
            Enhanced::new(4, 7, 0),
            &format!("no access token: {e}"),
        ),
    )
}

/// What a failed send means for every recipient of the message. `retried`:
/// a 401 came back with a newly issued token too.
fn outcome(e: &GraphError, retried: bool) -> Outcome {
    let reason = match &e.failure {
        Failure::Temporary { retry_after } => match (e.status, retry_after) {
            (Some(429), _) | (None, Some(_)) => Reason::Throttled(Throttle::Requests),
            (Some(_), _) => Reason::Deferred,
            (None, None) => Reason::Network(Network::Lost),
        },
        Failure::TokenRejected => Reason::TokenRejected,
        Failure::SendAsDenied => Reason::SendAsDenied,
        Failure::AccessDenied
        | Failure::DraftForbidden
        | Failure::MailboxNotFound { .. }
        | Failure::Permanent => Reason::Refused,
    };
    let mut text = e.to_string();
    if retried {
        text.push_str(" (also with a newly issued token)");
    }
    let reply = if reason.verdict() == relay_outcome::Verdict::Permanent {
        Reply::local(550, Enhanced::new(5, 7, 1), &text)
    } else {
        Reply::local(451, Enhanced::new(4, 7, 0), &text)
    };
    Outcome::new(reason, reply)
}

/// Graph accepted the message: every recipient is delivered.
fn accepted(accepted: &Accepted) -> Outcome {
    let via = if accepted.via_draft {
        "as a draft"
    } else {
        "sendMail"
    };
    let text = match &accepted.request_id {
        Some(id) => format!("accepted by Microsoft Graph ({via}, request-id {id})"),
        None => format!("accepted by Microsoft Graph ({via})"),
    };
    Outcome::delivered(Reply::local(250, Enhanced::new(2, 0, 0), &text))
}

impl Transport for Graph {
    type Session = GraphSession;

    fn relay(&self) -> &str {
        &self.relay
    }

    fn idle_timeout(&self) -> Duration {
        SESSION_IDLE
    }

    async fn open(&self, account: &Account) -> Result<GraphSession, Unopened> {
        Ok(GraphSession {
            mailbox: account.mailbox.clone(),
            tokens: account.tokens.clone(),
            sent: 0,
        })
    }

    async fn deliver(
        &self,
        session: &mut GraphSession,
        message: Message<'_>,
    ) -> Result<Delivered, Broken> {
        session.sent += 1;
        let (outcome, slow_down) = match self.send(session, message).await {
            Ok(ok) => (accepted(&ok), None),
            // The client already refuses requests for the mailbox until
            // Retry-After has passed; the pacer also keeps the account's
            // workers from taking messages meanwhile. Without Retry-After,
            // the queue's back-off alone.
            Err((failed, pause)) => (failed, pause.map(|p| SlowDown::Pause(Some(p)))),
        };
        Ok(Delivered {
            outcomes: vec![outcome; message.recipients.len()],
            slow_down,
        })
    }

    fn reused(session: &GraphSession) -> bool {
        session.sent > 0
    }

    async fn close(&self, _session: GraphSession) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_graph::Step;
    use relay_outcome::Verdict;

    fn error(failure: Failure, status: Option<u16>, code: Option<&str>) -> GraphError {
        GraphError {
            failure,
            step: Step::SendMail,
            status,
            code: code.map(str::to_owned),
            message: "the message".into(),
            request_id: Some("rid-1".into()),
        }
    }

    #[test]
    fn failures_become_smtp_worded_outcomes() {
        let denied = outcome(
            &error(Failure::AccessDenied, Some(403), Some("ErrorAccessDenied")),
            false,
        );
        assert_eq!(denied.verdict(), Verdict::Permanent);
        assert_eq!(denied.reply.code, 550);
        assert_eq!(denied.reply.enhanced, Some(Enhanced::new(5, 7, 1)));
        for part in [
            "ErrorAccessDenied",
            "request-id rid-1",
            "Mail.Send",
            "admin consent",
        ] {
            assert!(denied.reply.text.contains(part), "{}", denied.reply.text);
        }

        let wait = Some(Duration::from_secs(7));
        let throttled = outcome(
            &error(Failure::Temporary { retry_after: wait }, Some(429), None),
            false,
        );
        assert_eq!(throttled.reason, Reason::Throttled(Throttle::Requests));
        assert_eq!(throttled.reply.to_string(), throttled.reply.text);
        assert!(throttled.reply.text.starts_with("451 4.7.0 "));

        let busy = outcome(
            &error(Failure::Temporary { retry_after: None }, Some(503), None),
            false,
        );
        assert_eq!(busy.reason, Reason::Deferred);
        let network = outcome(
            &error(Failure::Temporary { retry_after: None }, None, None),
            false,
        );
        assert_eq!(network.reason, Reason::Network(Network::Lost));

        let token = outcome(
            &error(
                Failure::TokenRejected,
                Some(401),
                Some("InvalidAuthenticationToken"),
            ),
            true,
        );
        assert_eq!(token.verdict(), Verdict::Temporary);
        assert!(token
            .reply
            .text
            .ends_with("(also with a newly issued token)"));

        let send_as = outcome(
            &error(Failure::SendAsDenied, Some(403), Some("ErrorSendAsDenied")),
            false,
        );
        assert_eq!(send_as.reason, Reason::SendAsDenied);
        assert!(send_as.reply.text.contains("rewrite_from"));

        let gone = outcome(
            &error(
                Failure::MailboxNotFound {
                    mailbox: "relay@contoso.com".into(),
                },
                Some(404),
                Some("ErrorInvalidUser"),
            ),
            false,
        );
        assert_eq!(gone.verdict(), Verdict::Permanent);
        assert!(gone.reply.text.contains("relay@contoso.com"));
    }

    #[test]
    fn acceptance_names_the_request() {
        let ok = accepted(&Accepted {
            request_id: Some("rid-2".into()),
            via_draft: true,
        });
        assert!(ok.is_delivered());
        assert_eq!(
            ok.reply.text,
            "250 2.0.0 accepted by Microsoft Graph (as a draft, request-id rid-2)"
        );
    }
}

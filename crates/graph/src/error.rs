//! What can go wrong sending through Graph, classified once so the caller
//! (delivery's transport adapter) only maps classes to queue decisions.

use std::fmt;
use std::time::Duration;

/// The request (or local step) of a send that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Reading the message before any request.
    Prepare,
    /// `POST /users/{mailbox}/sendMail`.
    SendMail,
    /// `GET …/mailFolders/drafts/messages` for drafts an interrupted attempt
    /// left behind.
    FindLeftovers,
    /// `POST /users/{mailbox}/messages` (draft from MIME).
    CreateDraft,
    /// `POST …/messages/{id}/attachments` (small attachment).
    AddAttachment,
    /// `POST …/attachments/createUploadSession`.
    CreateUploadSession,
    /// `PUT` of a byte range to the upload URL.
    Upload,
    /// `PATCH …/messages/{id}` with the envelope's recipients.
    SetRecipients,
    /// `POST …/messages/{id}/send`.
    SendDraft,
    /// `DELETE …/messages/{id}` of a draft that could not be sent.
    DeleteDraft,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Prepare => "preparing the message",
            Step::SendMail => "sendMail",
            Step::FindLeftovers => "looking for drafts of an interrupted attempt",
            Step::CreateDraft => "creating the draft",
            Step::AddAttachment => "adding an attachment",
            Step::CreateUploadSession => "creating an upload session",
            Step::Upload => "uploading an attachment",
            Step::SetRecipients => "setting the draft's recipients",
            Step::SendDraft => "sending the draft",
            Step::DeleteDraft => "deleting the unsent draft",
        })
    }
}

/// What the caller should do about a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Try again later: 429, 5xx, network errors, timeouts. With
    /// `retry_after`, Graph asked for a pause that covers the whole mailbox;
    /// the client refuses further requests for it until then.
    Temporary {
        /// Graph's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
    },
    /// 401: fetch a new token once and send again; if that fails too, treat
    /// it as temporary.
    TokenRejected,
    /// 403 `ErrorAccessDenied`: the app may not send as this mailbox.
    AccessDenied,
    /// 403 on looking for or creating a draft: draft-based sending also
    /// needs `Mail.ReadWrite`.
    /// Messages that fit `sendMail` still go through.
    DraftForbidden,
    /// 404 `ErrorInvalidUser` / `MailboxNotEnabledForRESTAPI`.
    MailboxNotFound {
        /// The mailbox the account sends as.
        mailbox: String,
    },
    /// `ErrorSendAsDenied`: the `From:` is not the mailbox or one it may send as.
    SendAsDenied,
    /// Any other refusal: resending the same message will not help.
    Permanent,
}

impl Failure {
    /// Whether the message should stay queued.
    pub fn is_temporary(&self) -> bool {
        matches!(self, Failure::Temporary { .. } | Failure::TokenRejected)
    }

    /// The fix an admin needs, for the failures that have one.
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            Failure::AccessDenied => ACCESS_DENIED_FIX.to_string(),
            Failure::DraftForbidden => DRAFT_FORBIDDEN_FIX.to_string(),
            Failure::MailboxNotFound { mailbox } => format!(
                "the mailbox {mailbox} does not exist in this tenant or has no Exchange Online \
                 licence (MailboxNotEnabledForRESTAPI): check the account's mailbox address"
            ),
            Failure::SendAsDenied => SEND_AS_FIX.to_string(),
            _ => return None,
        })
    }
}

/// The Entra steps behind a 403 `ErrorAccessDenied`.
pub const ACCESS_DENIED_FIX: &str = "the app needs the Microsoft Graph application permission \
    Mail.Send with admin consent (Entra admin center > App registrations > API permissions), and \
    where mailboxes are scoped (RBAC for Applications, or an ApplicationAccessPolicy) this \
    mailbox must be in the app's scope (check with Test-ServicePrincipalAuthorization)";

/// Why drafts are refused while `sendMail` works.
pub const DRAFT_FORBIDDEN_FIX: &str = "creating a draft needs the Microsoft Graph permission \
    Mail.ReadWrite besides Mail.Send (with admin consent, and in the app's mailbox scope); \
    without it only messages under 4 MB whose header recipients are exactly the envelope's \
    can be sent";

/// The same hint as SMTP's `5.2.252`.
pub const SEND_AS_FIX: &str = "the mailbox may not send as this sender: send from the \
    mailbox's address, set rewrite_from = true on the account, or grant it Send As \
    (Add-RecipientPermission -AccessRights SendAs)";

/// A send that did not go through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct GraphError {
    /// What to do about it.
    pub failure: Failure,
    /// Where it happened.
    pub step: Step,
    /// The HTTP status, if Graph answered.
    pub status: Option<u16>,
    /// Graph's `error.code`, e.g. `ErrorAccessDenied`.
    pub code: Option<String>,
    /// Graph's `error.message` (cut to a few hundred bytes, then marked
    /// `[…]`), or what failed locally or on the network.
    pub message: String,
    /// Graph's `request-id` header: what Microsoft support asks for.
    pub request_id: Option<String>,
}

impl GraphError {
    /// One line for the log: step, status, Graph's code and message,
    /// request-id, and the fix where there is one.
    fn describe(&self) -> String {
        let mut text = format!("graph {}: ", self.step);
        if let Some(status) = self.status {
            text.push_str(&format!("{status} "));
        }
        if let Some(code) = &self.code {
            text.push_str(&format!("{code}: "));
        }
        text.push_str(&self.message);
        if let Some(id) = &self.request_id {
            text.push_str(&format!(" (request-id {id})"));
        }
        if let Some(hint) = self.failure.hint() {
            text.push_str(&format!("; {hint}"));
        }
        text
    }

    /// A failure before any request: the message itself is unusable.
    pub(crate) fn local(step: Step, message: impl Into<String>) -> Self {
        GraphError {
            failure: Failure::Permanent,
            step,
            status: None,
            code: None,
            message: message.into(),
            request_id: None,
        }
    }

    /// Refused without a request: Graph's `Retry-After` for this mailbox
    /// has not elapsed.
    pub(crate) fn paused(step: Step, wait: Duration) -> Self {
        GraphError {
            failure: Failure::Temporary {
                retry_after: Some(wait),
            },
            step,
            status: None,
            code: None,
            message: format!("the mailbox is throttled for another {}s", wait.as_secs()),
            request_id: None,
        }
    }

    /// No answer from Graph: connection refused, reset, timed out.
    pub(crate) fn network(step: Step, error: reqwest::Error) -> Self {
        // The upload URL carries its own credentials: keep it out of the text.
        let error = error.without_url();
        GraphError {
            failure: Failure::Temporary { retry_after: None },
            step,
            status: None,
            code: None,
            message: relay_http::error_chain(&error),
            request_id: None,
        }
    }

    /// An answer from Graph that is not what the step expects.
    pub(crate) fn reply(
        step: Step,
        mailbox: &str,
        status: u16,
        retry_after: Option<Duration>,
        request_id: Option<String>,
        body: &[u8],
    ) -> Self {
        let (code, message) = error_body(body);
        let failure = classify(step, mailbox, status, code.as_deref(), retry_after);
        GraphError {
            failure,
            step,
            status: Some(status),
            code,
            message: message.unwrap_or_else(|| "(no error message)".to_string()),
            request_id,
        }
    }

    /// The pause Graph asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self.failure {
            Failure::Temporary { retry_after } => retry_after,
            _ => None,
        }
    }
}

/// The class of a Graph reply, from its status and `error.code`.
pub(crate) fn classify(
    step: Step,
    mailbox: &str,
    status: u16,
    code: Option<&str>,
    retry_after: Option<Duration>,
) -> Failure {
    match (status, code) {
        (_, Some("ErrorSendAsDenied")) => Failure::SendAsDenied,
        (_, Some("ErrorInvalidUser" | "MailboxNotEnabledForRESTAPI")) => Failure::MailboxNotFound {
            mailbox: mailbox.to_string(),
        },
        (401, _) => Failure::TokenRejected,
        (403, _) if matches!(step, Step::FindLeftovers | Step::CreateDraft) => {
            Failure::DraftForbidden
        }
        (403, Some("ErrorAccessDenied")) => Failure::AccessDenied,
        (429 | 500..=599, _) => Failure::Temporary { retry_after },
        _ => Failure::Permanent,
    }
}

#[derive(serde::Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(serde::Deserialize)]
struct ErrorDetail {
    code: Option<String>,
    message: Option<String>,
}

/// Graph's `{"error": {"code", "message"}}`, the message cut to size; a body
/// that is not that JSON becomes the message itself.
fn error_body(body: &[u8]) -> (Option<String>, Option<String>) {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { error }) => (error.code, error.message.map(|m| truncate(&m))),
        Err(_) if body.is_empty() => (None, None),
        Err(_) => (None, Some(truncate(&String::from_utf8_lossy(body)))),
    }
}

/// Graph's text cut to [`relay_http::TEXT_LIMIT`] bytes, marked briefly
/// when cut: it goes into SMTP replies.
pub(crate) fn truncate(text: &str) -> String {
    relay_http::clip_ellipsis(text.trim(), relay_http::TEXT_LIMIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        let c = |step, status, code| classify(step, "m@x", status, code, None);
        assert_eq!(
            c(Step::SendMail, 401, Some("InvalidAuthenticationToken")),
            Failure::TokenRejected
        );
        assert_eq!(
            c(Step::SendMail, 403, Some("ErrorAccessDenied")),
            Failure::AccessDenied
        );
        assert_eq!(
            c(Step::CreateDraft, 403, Some("ErrorAccessDenied")),
            Failure::DraftForbidden
        );
        assert_eq!(
            c(Step::SendMail, 404, Some("MailboxNotEnabledForRESTAPI")),
            Failure::MailboxNotFound {
                mailbox: "m@x".into()
            }
        );
        assert_eq!(
            c(Step::SendDraft, 403, Some("ErrorSendAsDenied")),
            Failure::SendAsDenied
        );
        assert_eq!(
            c(Step::SendMail, 504, None),
            Failure::Temporary { retry_after: None }
        );
        assert_eq!(
            c(Step::SendMail, 500, None),
            Failure::Temporary { retry_after: None }
        );
        assert_eq!(
            c(Step::SendMail, 400, Some("ErrorInvalidRecipients")),
            Failure::Permanent
        );
        assert_eq!(c(Step::SendMail, 413, None), Failure::Permanent);
        let wait = Some(Duration::from_secs(7));
        assert_eq!(
            classify(Step::Upload, "m", 429, Some("ApplicationThrottled"), wait),
            Failure::Temporary { retry_after: wait }
        );
    }

    #[test]
    fn long_messages_are_cut_and_marked() {
        let body = format!(
            r#"{{"error":{{"code":"X","message":"{}"}}}}"#,
            "é".repeat(400)
        );
        let (code, message) = error_body(body.as_bytes());
        assert_eq!(code.as_deref(), Some("X"));
        let message = message.expect("a message");
        assert!(message.ends_with("[…]"));
        assert!(message.len() <= relay_http::TEXT_LIMIT + "[…]".len());
        assert_eq!(
            error_body(b"<html>oops</html>").1.as_deref(),
            Some("<html>oops</html>")
        );
    }
}

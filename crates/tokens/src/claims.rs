//! What an access token says about itself, for `smtp-oauth-relay token`:
//! the decoded JWT claims that decide whether SMTP submission can work, and
//! warnings when they cannot. The signature is not checked (only the
//! issuer's resource server can); this is a diagnosis, not a validation.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use relay_config::Flow;
use serde_json::Value;

/// Exchange Online's application id, which some tokens carry as `aud`.
const EXCHANGE_APP_ID: &str = "00000002-0000-0ff1-ce00-000000000000";

/// The claims of a token that matter for SMTP, as (name, value) lines, and
/// the warnings they raise.
#[derive(Debug, Default)]
pub struct TokenReport {
    /// `aud`, `roles`/`scp`, `appid`, `upn`/`oid`, `tid`, … in display order.
    pub claims: Vec<(String, String)>,
    /// Problems that will make SMTP AUTH fail.
    pub warnings: Vec<String>,
    /// Whether the token was a readable JWT.
    pub decoded: bool,
}

fn decode_payload(token: &str) -> Option<Value> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn show(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(show).collect::<Vec<_>>().join(" "),
        other => other.to_string(),
    }
}

/// Decodes `token` and judges it for an account with `flow` sending as `mailbox`.
pub fn describe_token(token: &str, flow: Flow, mailbox: &str) -> TokenReport {
    let mut report = TokenReport::default();
    let Some(claims) = decode_payload(token) else {
        report.warnings.push(match flow {
            Flow::ServiceAccount => return report, // Google tokens are opaque
            _ => "the access token is not a JWT, so its claims cannot be shown (Google tokens are opaque; a Microsoft token should be a JWT)".into(),
        });
        return report;
    };
    report.decoded = true;
    for key in [
        "aud",
        "roles",
        "scp",
        "appid",
        "azp",
        "upn",
        "unique_name",
        "preferred_username",
        "oid",
        "tid",
        "iss",
    ] {
        if let Some(value) = claims.get(key) {
            report.claims.push((key.to_owned(), show(value)));
        }
    }
    let aud = claims.get("aud").map(show).unwrap_or_default();
    let aud_ok = aud == EXCHANGE_APP_ID
        || aud.strip_prefix("https://").is_some_and(|host| {
            let host = host.trim_end_matches('/');
            host.starts_with("outlook.office") || host == "mail.google.com"
        });
    if !aud_ok {
        report.warnings.push(format!(
            "aud is {aud:?}, not Exchange Online (https://outlook.office365.com): the scope names the wrong resource (use https://outlook.office365.com/.default or https://outlook.office.com/SMTP.Send)"
        ));
    }
    let roles: Vec<String> = match claims.get("roles") {
        Some(Value::Array(items)) => items.iter().map(show).collect(),
        _ => Vec::new(),
    };
    let scp = claims.get("scp").map(show).unwrap_or_default();
    match flow {
        Flow::ClientCredentials => {
            if !roles.iter().any(|r| r == "SMTP.SendAsApp") {
                report.warnings.push(
                    "no SMTP.SendAsApp role: add the application permission Office 365 Exchange Online → SMTP.SendAsApp and grant admin consent".into(),
                );
            }
        }
        Flow::RefreshToken => {
            if !scp.split(' ').any(|s| s == "SMTP.Send") {
                report.warnings.push(
                    "no SMTP.Send scope: add the delegated permission SMTP.Send (Office 365 Exchange Online), include it in `scope`, and run `smtp-oauth-relay authorize` again".into(),
                );
            }
            let user = ["upn", "preferred_username", "unique_name"]
                .iter()
                .find_map(|k| claims.get(*k).map(show));
            if let Some(user) = user {
                if !user.eq_ignore_ascii_case(mailbox) {
                    report.warnings.push(format!(
                        "signed in as {user}, but the account's mailbox is {mailbox}: the user needs FullAccess/SendAs on it, or sign in as the mailbox"
                    ));
                }
            }
        }
        Flow::ServiceAccount => {}
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: Value) -> String {
        format!("e30.{}.c2ln", URL_SAFE_NO_PAD.encode(claims.to_string()))
    }

    #[test]
    fn app_only_needs_the_role_and_the_audience() {
        let good = describe_token(
            &jwt(
                serde_json::json!({"aud": "https://outlook.office365.com", "roles": ["SMTP.SendAsApp"], "appid": "a", "tid": "t", "oid": "o"}),
            ),
            Flow::ClientCredentials,
            "relay@contoso.com",
        );
        assert!(good.warnings.is_empty(), "{:?}", good.warnings);
        assert!(good
            .claims
            .iter()
            .any(|(k, v)| k == "roles" && v == "SMTP.SendAsApp"));
        let bad = describe_token(
            &jwt(serde_json::json!({"aud": "https://graph.microsoft.com", "roles": ["Mail.Send"]})),
            Flow::ClientCredentials,
            "relay@contoso.com",
        );
        assert_eq!(bad.warnings.len(), 2, "{:?}", bad.warnings);
    }

    #[test]
    fn delegated_needs_smtp_send() {
        let report = describe_token(
            &jwt(
                serde_json::json!({"aud": "https://outlook.office.com", "scp": "Mail.Read", "upn": "relay@contoso.com"}),
            ),
            Flow::RefreshToken,
            "relay@contoso.com",
        );
        assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
        assert!(report.warnings[0].contains("SMTP.Send"));
        assert!(!describe_token("opaque", Flow::RefreshToken, "x").decoded);
    }
}

//! The HTTP side of token requests: one reqwest client, form POSTs, and
//! reading token responses and OAuth errors. Replies are read up to
//! [`REPLY_LIMIT`]; text from them is clipped to [`TEXT_LIMIT`] before it
//! goes into an error.

use crate::lifetime::Lifetime;
use relay_http::{clip, error_chain, read_bounded, REPLY_LIMIT, TEXT_LIMIT};

/// The HTTP client for identity-platform requests: no redirects (a token
/// request must not be forwarded elsewhere), bounded time.
pub(crate) fn client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(30))
        .user_agent(concat!("smtp-oauth-relay/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// A successful token response (RFC 6749 §5.1), secrets wrapped.
pub(crate) struct TokenReply {
    pub access_token: relay_config::Secret,
    pub refresh_token: Option<relay_config::Secret>,
    pub lifetime: Lifetime,
}

/// The raw JSON of a token response or error; never logged.
#[derive(serde::Deserialize)]
struct RawReply {
    access_token: Option<String>,
    refresh_token: Option<String>,
    expires_in: Option<serde_json::Value>,
    error: Option<String>,
    error_description: Option<String>,
    #[serde(default)]
    error_codes: Vec<u32>,
}

/// An OAuth error reply, its texts clipped.
pub(crate) fn refused(error: &str, description: &str, codes: &[u32]) -> crate::TokenError {
    let code = crate::error::parse_aadsts(description).or_else(|| codes.first().copied());
    crate::TokenError::Refused {
        error: clip(error, 64),
        description: clip(description, TEXT_LIMIT),
        code,
    }
}

/// POSTs a form to a token (or device code) endpoint and returns the JSON
/// body of a 2xx reply, or the OAuth error it carries.
pub(crate) async fn post_form(
    client: &reqwest::Client,
    url: &str,
    form: &[(&str, &str)],
) -> Result<serde_json::Value, crate::TokenError> {
    let transport = |reason: String| crate::TokenError::Transport {
        url: url.to_owned(),
        reason,
    };
    let response = client
        .post(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .form(form)
        .send()
        .await
        .map_err(|e| transport(error_chain(&e)))?;
    let status = response.status();
    let body = read_bounded(response, REPLY_LIMIT)
        .await
        .map_err(|e| transport(error_chain(&e)))?;
    if body.cut {
        return Err(transport(format!(
            "HTTP {status} with a body of {}, more than the {REPLY_LIMIT} bytes read",
            body.size()
        )));
    }
    let value: serde_json::Value = match serde_json::from_slice(&body.bytes) {
        Ok(value) => value,
        // A failure page (a proxy's, say) helps the admin; a success is
        // never shown, it may carry a token.
        Err(_) if !status.is_success() => {
            return Err(transport(format!(
                "HTTP {status} with a body that is not JSON ({}): {}",
                body.size(),
                clip(&String::from_utf8_lossy(&body.bytes), TEXT_LIMIT)
            )))
        }
        Err(_) => {
            return Err(transport(format!(
                "HTTP {status} with a body that is not JSON ({})",
                body.size()
            )))
        }
    };
    if let Some(error) = value.get("error").and_then(|e| e.as_str()) {
        let raw: RawReply = serde_json::from_value(value.clone()).unwrap_or(RawReply {
            access_token: None,
            refresh_token: None,
            expires_in: None,
            error: None,
            error_description: None,
            error_codes: Vec::new(),
        });
        return Err(refused(
            error,
            raw.error_description.as_deref().unwrap_or_default(),
            &raw.error_codes,
        ));
    }
    if !status.is_success() {
        return Err(transport(format!("HTTP {status} without an OAuth error")));
    }
    Ok(value)
}

/// POSTs a token request and reads the token response.
pub(crate) async fn token_request(
    client: &reqwest::Client,
    url: &str,
    form: &[(&str, &str)],
) -> Result<TokenReply, crate::TokenError> {
    let value = post_form(client, url, form).await?;
    parse_token_reply(url, value)
}

pub(crate) fn parse_token_reply(
    url: &str,
    value: serde_json::Value,
) -> Result<TokenReply, crate::TokenError> {
    let raw: RawReply =
        serde_json::from_value(value).map_err(|e| crate::TokenError::Transport {
            url: url.to_owned(),
            reason: clip(&format!("unreadable token response: {e}"), TEXT_LIMIT),
        })?;
    if let Some(error) = raw.error {
        return Err(refused(
            &error,
            raw.error_description.as_deref().unwrap_or_default(),
            &raw.error_codes,
        ));
    }
    let access_token = raw
        .access_token
        .ok_or_else(|| crate::TokenError::Transport {
            url: url.to_owned(),
            reason: "token response without access_token".into(),
        })?;
    Ok(TokenReply {
        access_token: relay_config::Secret::new(access_token),
        refresh_token: raw.refresh_token.map(relay_config::Secret::new),
        lifetime: Lifetime::from_reply(raw.expires_in.as_ref()),
    })
}

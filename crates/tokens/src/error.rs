use crate::explain::{explain_aadsts, explain_error};
use std::{path::PathBuf, time::Duration};

/// Why no token could be obtained. Every variant is worth retrying later:
/// mail waits in the queue meanwhile.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The identity platform answered with an OAuth error.
    #[error("identity platform refused the token request: {error}: {description}{}", hint(*.code, error))]
    Refused {
        /// OAuth error code, e.g. `invalid_client`.
        error: String,
        /// Microsoft's `error_description`, starting with `AADSTSnnnn:`.
        description: String,
        /// The AADSTS number, where the description carries one.
        code: Option<u32>,
    },
    /// The identity platform could not be reached or answered garbage.
    #[error("token request to {url} failed: {reason}")]
    Transport { url: String, reason: String },
    /// The client secret file could not be read.
    #[error("cannot read client secret file {path}: {reason}")]
    SecretFile { path: PathBuf, reason: String },
    /// A credential file (certificate, private key, service account key)
    /// could not be read or used.
    #[error("{what} {path}: {reason}")]
    Credential {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// The refresh token shared through the database cannot be used.
    #[error("account {account:?}: the refresh token in the shared database {reason}")]
    SharedToken { account: String, reason: String },
    /// The token cache could not be read or written.
    #[error("token cache {path}: {reason}")]
    Cache { path: PathBuf, reason: String },
    /// The account has no usable refresh token: someone must sign in again.
    /// The relay does not retry until the token cache changes.
    #[error("account {account:?}: {reason}; run `smtp-oauth-relay authorize --account {account}` to sign in again")]
    NeedsAuthorization { account: String, reason: String },
    /// An earlier token request failed and the next one is not due yet, so
    /// none was made: the caller defers its work.
    #[error("token unavailable, next attempt in {}s (last attempt: {last})", whole_secs(*.retry_in))]
    Unavailable {
        /// How long until the next request may be made.
        retry_in: Duration,
        /// Why the last attempt failed.
        last: String,
    },
    /// An interactive sign-in (`authorize`) did not complete.
    #[error("{0}")]
    Authorization(String),
    /// The account's configuration cannot make a token request.
    #[error("{0}")]
    Config(String),
    /// The database shared with other relays, which holds the refresh
    /// token, did not answer.
    #[error("shared refresh token: {0}")]
    Store(#[from] relay_store::StoreError),
    /// Another relay held the shared refresh token for longer than this one
    /// waits; it tries again later.
    #[error("relay {relay:?} has been redeeming the shared refresh token for too long")]
    Redeeming {
        /// The relay holding it.
        relay: String,
    },
}

impl TokenError {
    /// The AADSTS error number, when the identity platform gave one.
    pub fn aadsts(&self) -> Option<u32> {
        match self {
            TokenError::Refused { code, .. } => *code,
            _ => None,
        }
    }

    /// Whether only a new sign-in (`authorize`) can fix this.
    pub fn needs_authorization(&self) -> bool {
        matches!(self, TokenError::NeedsAuthorization { .. })
    }
}

/// Rounded up: "next attempt in 0s" would be wrong.
fn whole_secs(d: Duration) -> u128 {
    d.as_millis().div_ceil(1000)
}

fn hint(code: Option<u32>, error: &str) -> String {
    code.and_then(explain_aadsts)
        .or_else(|| explain_error(error))
        .map(|why| format!(" — {why}"))
        .unwrap_or_default()
}

/// The number in `AADSTS7000215: Invalid client secret…`.
pub(crate) fn parse_aadsts(description: &str) -> Option<u32> {
    let rest = &description[description.find("AADSTS")? + 6..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aadsts_code_is_found_and_explained() {
        assert_eq!(
            parse_aadsts("AADSTS7000215: Invalid client secret"),
            Some(7000215)
        );
        assert_eq!(parse_aadsts("no code"), None);
        let e = TokenError::Refused {
            error: "invalid_client".into(),
            description: "AADSTS7000215: Invalid client secret provided.".into(),
            code: Some(7000215),
        };
        assert!(e.to_string().contains("Secret ID"), "{e}");
        let e = TokenError::Refused {
            error: "invalid_scope".into(),
            description: "bad scope".into(),
            code: None,
        };
        assert!(e.to_string().contains("scope"), "{e}");
        let e = TokenError::NeedsAuthorization {
            account: "main".into(),
            reason: "the refresh token was revoked".into(),
        };
        assert!(e
            .to_string()
            .contains("run `smtp-oauth-relay authorize --account main`"));
    }
}

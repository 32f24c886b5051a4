use crate::explain::explain_aadsts;
use std::path::PathBuf;

/// Why no token could be obtained. Every variant is worth retrying later:
/// mail waits in the queue meanwhile.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The identity platform answered with an OAuth error.
    #[error("identity platform refused the token request: {error}: {description}{}", hint(*.code))]
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
    /// The account's configuration cannot make a token request.
    #[error("{0}")]
    Config(String),
}

impl TokenError {
    /// The AADSTS error number, when the identity platform gave one.
    pub fn aadsts(&self) -> Option<u32> {
        match self {
            TokenError::Refused { code, .. } => *code,
            _ => None,
        }
    }
}

fn hint(code: Option<u32>) -> String {
    code.and_then(explain_aadsts)
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
    }
}

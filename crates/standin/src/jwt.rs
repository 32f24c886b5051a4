//! Access tokens: minting HS256 JWTs and judging them the way Exchange
//! Online would.
//!
//! Real Entra ID tokens are RS256-signed; HS256 with a random per-platform
//! key is enough here because only the kit itself ever verifies them.

use std::collections::HashSet;
use std::fmt;
use std::sync::Mutex;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::util::{lock, random_guid, unix_now};

/// The resource Exchange Online tokens must be issued for (`aud`).
pub(crate) const EXCHANGE_AUDIENCE: &str = "https://outlook.office365.com";

/// The audience of the Google-style tokens (Gmail's scope).
pub(crate) const GOOGLE_AUDIENCE: &str = "https://mail.google.com/";

/// The application permission that allows SMTP submission as any mailbox
/// the service principal was granted.
pub(crate) const SEND_AS_ROLE: &str = "SMTP.SendAsApp";

/// The claims of an access token that the fakes care about.
///
/// Mirrors the claims of an app-only Entra ID token; `scp` and `upn` are
/// only present in delegated (user) tokens, which this kit does not issue yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    /// Audience: the resource the token is for.
    pub aud: String,
    /// Expiry, in seconds since the Unix epoch.
    pub exp: u64,
    /// Application permissions (app-only tokens), e.g. `SMTP.SendAsApp`.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Delegated scopes, space separated (user tokens only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scp: Option<String>,
    /// The client id of the application the token was issued to.
    pub appid: String,
    /// The tenant that issued the token.
    pub tid: String,
    /// Object id of the principal (service principal for app-only tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oid: Option<String>,
    /// User principal name (user tokens only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upn: Option<String>,
}

/// Why an access token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    /// Not a token this identity platform issued (or not a JWT at all).
    #[error("token was not issued by this identity platform")]
    Unknown,
    /// The signature does not verify with the platform's key.
    #[error("token signature is invalid")]
    BadSignature,
    /// The token's `exp` has passed.
    #[error("token has expired")]
    Expired,
    /// The token is for another resource than the one judging it (the
    /// message names Exchange Online's, the resource it usually is).
    #[error("token audience is not {EXCHANGE_AUDIENCE}")]
    WrongAudience,
}

/// Everything that goes into the JWT payload: the public claims plus the
/// bookkeeping ones.
#[derive(Serialize, Deserialize)]
struct JwtPayload {
    #[serde(flatten)]
    claims: TokenClaims,
    iss: String,
    iat: u64,
    nbf: u64,
    jti: String,
}

/// Signs tokens and remembers which ones it signed.
pub(crate) struct TokenMint {
    encoding: EncodingKey,
    decoding: DecodingKey,
    issued: Mutex<HashSet<String>>,
}

impl fmt::Debug for TokenMint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenMint").finish_non_exhaustive()
    }
}

impl TokenMint {
    /// A mint with a fresh random signing key.
    pub(crate) fn new() -> Self {
        let key: [u8; 32] = rand::random();
        TokenMint {
            encoding: EncodingKey::from_secret(&key),
            decoding: DecodingKey::from_secret(&key),
            issued: Mutex::new(HashSet::new()),
        }
    }

    /// Signs a token with these claims (plus iss/iat/nbf/jti) and records
    /// it as issued.
    pub(crate) fn mint(&self, claims: TokenClaims) -> String {
        let now = unix_now();
        let payload = JwtPayload {
            iss: format!("https://sts.windows.net/{}/", claims.tid),
            claims,
            iat: now,
            nbf: now,
            jti: random_guid(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &payload, &self.encoding)
            .expect("HS256 signing of a serialisable payload cannot fail");
        lock(&self.issued).insert(payload.jti);
        token
    }

    /// Judges a token the way Exchange Online does at AUTH time.
    pub(crate) fn check(&self, token: &str) -> Result<TokenClaims, TokenRejection> {
        self.check_for(token, &[EXCHANGE_AUDIENCE, GOOGLE_AUDIENCE])
    }

    /// [`TokenMint::check`] for a resource that takes these audiences.
    pub(crate) fn check_for(
        &self,
        token: &str,
        audiences: &[&str],
    ) -> Result<TokenClaims, TokenRejection> {
        // Only the signature is checked by the library; the other checks are
        // done below so each failure maps to its own rejection.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        let payload = match jsonwebtoken::decode::<JwtPayload>(token, &self.decoding, &validation) {
            Ok(data) => data.claims,
            Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => {
                return Err(TokenRejection::BadSignature)
            }
            Err(_) => return Err(TokenRejection::Unknown),
        };
        if !lock(&self.issued).contains(&payload.jti) {
            return Err(TokenRejection::Unknown);
        }
        if unix_now() >= payload.claims.exp {
            return Err(TokenRejection::Expired);
        }
        if !audiences.contains(&payload.claims.aud.as_str()) {
            return Err(TokenRejection::WrongAudience);
        }
        Ok(payload.claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(aud: &str, exp: u64) -> TokenClaims {
        TokenClaims {
            aud: aud.into(),
            exp,
            roles: vec![SEND_AS_ROLE.into()],
            scp: None,
            appid: "app".into(),
            tid: "tenant".into(),
            oid: Some("oid".into()),
            upn: None,
        }
    }

    #[test]
    fn judges_tokens() {
        let mint = TokenMint::new();
        let good = mint.mint(claims(EXCHANGE_AUDIENCE, unix_now() + 60));
        assert_eq!(mint.check(&good).map(|c| c.appid), Ok("app".to_string()));

        let expired = mint.mint(claims(EXCHANGE_AUDIENCE, unix_now()));
        assert_eq!(mint.check(&expired), Err(TokenRejection::Expired));

        let graph = mint.mint(claims("https://graph.microsoft.com", unix_now() + 60));
        assert_eq!(mint.check(&graph), Err(TokenRejection::WrongAudience));
        assert!(mint
            .check_for(&graph, &["https://graph.microsoft.com"])
            .is_ok());
        assert_eq!(
            mint.check_for(&good, &["https://graph.microsoft.com"]),
            Err(TokenRejection::WrongAudience)
        );

        let other = TokenMint::new().mint(claims(EXCHANGE_AUDIENCE, unix_now() + 60));
        assert_eq!(mint.check(&other), Err(TokenRejection::BadSignature));

        assert_eq!(mint.check("not a jwt"), Err(TokenRejection::Unknown));
    }
}

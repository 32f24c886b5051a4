//! Signed JWTs the relay presents instead of a secret: the client assertion
//! of a certificate credential (Microsoft, RFC 7523 §2.2) and the JWT bearer
//! grant of a Google service account (RFC 7523 §2.1).
//!
//! The signature is aws-lc-rs's RSA (PSS or PKCS#1 v1.5, SHA-256); this
//! module only assembles the JWS compact form around it.

use crate::TokenError;
use aws_lc_rs::{digest, rand::SystemRandom, signature};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use relay_config::AssertionAlgorithm;
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use serde_json::json;
use std::{
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

/// `client_assertion_type` for a JWT client assertion.
pub(crate) const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// `grant_type` of the JWT bearer grant (Google service accounts).
pub(crate) const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Lifetime of a client assertion: Microsoft accepts 5–10 minutes.
const ASSERTION_LIFETIME: u64 = 300;

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An RSA key read from PEM (PKCS#8 or PKCS#1).
pub(crate) fn rsa_key(
    pem: &[u8],
    what: &'static str,
    path: &Path,
) -> Result<signature::RsaKeyPair, TokenError> {
    let bad = |reason: String| TokenError::Credential {
        what,
        path: path.to_owned(),
        reason,
    };
    let key = PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| bad(format!("no private key in PEM: {e}")))?;
    match &key {
        PrivateKeyDer::Pkcs8(der) => signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()),
        PrivateKeyDer::Pkcs1(der) => signature::RsaKeyPair::from_der(der.secret_pkcs1_der()),
        _ => return Err(bad("not an RSA key (PKCS#8 or PKCS#1 expected)".into())),
    }
    .map_err(|e| bad(format!("not a usable RSA key: {e}")))
}

/// aws-lc-rs could not sign (it says no more than that).
#[derive(Debug, thiserror::Error)]
#[error("signing failed")]
struct SigningFailed;

fn sign(
    key: &signature::RsaKeyPair,
    algorithm: AssertionAlgorithm,
    header: serde_json::Value,
    claims: serde_json::Value,
) -> Result<String, SigningFailed> {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let padding: &'static dyn signature::RsaEncoding = match algorithm {
        AssertionAlgorithm::PS256 => &signature::RSA_PSS_SHA256,
        AssertionAlgorithm::RS256 => &signature::RSA_PKCS1_SHA256,
    };
    let mut sig = vec![0u8; key.public_modulus_len()];
    key.sign(
        padding,
        &SystemRandom::new(),
        signing_input.as_bytes(),
        &mut sig,
    )
    .map_err(|_| SigningFailed)?;
    Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig)))
}

/// A certificate credential: the certificate uploaded to the app
/// registration and its private key, both read at each request so a renewed
/// certificate needs no restart.
#[derive(Debug, Clone)]
pub(crate) struct Certificate {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub algorithm: AssertionAlgorithm,
}

impl Certificate {
    /// A fresh client assertion for `client_id` at `token_url`.
    pub fn assertion(&self, client_id: &str, token_url: &str) -> Result<String, TokenError> {
        let read = |path: &Path, what: &'static str| {
            std::fs::read(path).map_err(|e| TokenError::Credential {
                what,
                path: path.to_owned(),
                reason: e.to_string(),
            })
        };
        let cert_pem = read(&self.cert, "client_certificate")?;
        let cert =
            CertificateDer::from_pem_slice(&cert_pem).map_err(|e| TokenError::Credential {
                what: "client_certificate",
                path: self.cert.clone(),
                reason: format!("no certificate in PEM: {e}"),
            })?;
        let key = rsa_key(
            &read(&self.key, "client_private_key")?,
            "client_private_key",
            &self.key,
        )?;
        let mut header = json!({ "typ": "JWT" });
        match self.algorithm {
            AssertionAlgorithm::PS256 => {
                header["alg"] = "PS256".into();
                header["x5t#S256"] = URL_SAFE_NO_PAD
                    .encode(digest::digest(&digest::SHA256, &cert))
                    .into();
            }
            AssertionAlgorithm::RS256 => {
                header["alg"] = "RS256".into();
                header["x5t"] = URL_SAFE_NO_PAD
                    .encode(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, &cert))
                    .into();
            }
        }
        let now = unix_now();
        let claims = json!({
            "aud": token_url,
            "iss": client_id,
            "sub": client_id,
            "jti": random_id(),
            "nbf": now,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
        });
        sign(&key, self.algorithm, header, claims).map_err(|e| TokenError::Credential {
            what: "client_private_key",
            path: self.key.clone(),
            reason: e.to_string(),
        })
    }
}

/// A Google service account key file (the JSON from the Cloud console).
#[derive(serde::Deserialize)]
struct ServiceAccountKey {
    client_email: String,
    private_key: String,
    #[serde(default)]
    private_key_id: Option<String>,
}

/// The JWT of the JWT bearer grant: the service account `iss`, acting as
/// `subject` (domain-wide delegation), for `scope`, at `token_url`.
pub(crate) fn service_account_assertion(
    key_file: &Path,
    subject: &str,
    scope: &str,
    token_url: &str,
) -> Result<String, TokenError> {
    let bad = |reason: String| TokenError::Credential {
        what: "service_account_key_file",
        path: key_file.to_owned(),
        reason,
    };
    let text = std::fs::read(key_file).map_err(|e| bad(e.to_string()))?;
    let account: ServiceAccountKey = serde_json::from_slice(&text).map_err(|e| {
        bad(format!(
            "not a service account key (JSON with client_email and private_key): {e}"
        ))
    })?;
    let key = rsa_key(
        account.private_key.as_bytes(),
        "service_account_key_file",
        key_file,
    )?;
    let mut header = json!({ "alg": "RS256", "typ": "JWT" });
    if let Some(kid) = account.private_key_id {
        header["kid"] = kid.into();
    }
    let now = unix_now();
    let claims = json!({
        "iss": account.client_email,
        "sub": subject,
        "scope": scope,
        "aud": token_url,
        "iat": now,
        "exp": now + 3600,
    });
    sign(&key, AssertionAlgorithm::RS256, header, claims).map_err(|e| bad(e.to_string()))
}

/// 128 random bits, URL-safe, for `jti`, `state` and the like.
pub(crate) fn random_id() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>())
}

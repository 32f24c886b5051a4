//! Signed-JWT client credentials the fake identity platforms verify: the
//! certificate client assertion of Entra ID and the service-account JWT of
//! Google's JWT bearer grant. Keys are RSA 2048 from aws-lc-rs; certificates
//! are self-signed with rcgen, as a developer would make one to upload.

use aws_lc_rs::{
    digest,
    encoding::AsDer,
    rsa::{KeyPair, KeySize},
    signature::{self, KeyPair as _, UnparsedPublicKey},
};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use rustls::pki_types::PrivatePkcs8KeyDer;
use serde_json::Value;

/// A certificate credential as uploaded to an app registration: what the
/// relay's `client_certificate` / `client_private_key` files hold.
#[derive(Debug, Clone)]
pub struct ClientCertificate {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its RSA private key, PEM (PKCS#8).
    pub key_pem: String,
    /// `x5t#S256`: base64url SHA-256 of the certificate DER.
    pub x5t_s256: String,
    /// `x5t`: base64url SHA-1 of the certificate DER.
    pub x5t: String,
}

/// The public half the platform keeps.
#[derive(Debug, Clone)]
pub(crate) struct RegisteredKey {
    pub public_key: Vec<u8>,
    pub x5t_s256: String,
    pub x5t: String,
}

/// A new RSA 2048 key: (PKCS#8 DER, PKCS#1 public key DER).
fn rsa_key() -> (Vec<u8>, Vec<u8>) {
    let key = KeyPair::generate(KeySize::Rsa2048).expect("RSA key generation");
    let pkcs8 = key.as_der().expect("PKCS#8 encoding").as_ref().to_vec();
    let public = key.public_key().as_ref().to_vec();
    (pkcs8, public)
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::engine::general_purpose::STANDARD;
    let body = STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// A new self-signed certificate and key, and what the platform registers.
pub(crate) fn new_certificate() -> (ClientCertificate, RegisteredKey) {
    let (pkcs8, public_key) = rsa_key();
    let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(pkcs8.clone()),
        &rcgen::PKCS_RSA_SHA256,
    )
    .expect("rcgen accepts the RSA key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "relay app credential");
    let cert = params
        .self_signed(&key_pair)
        .expect("self-signed certificate");
    let der = cert.der().as_ref();
    let x5t_s256 = URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, der));
    let x5t = URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, der));
    (
        ClientCertificate {
            cert_pem: cert.pem(),
            key_pem: pem("PRIVATE KEY", &pkcs8),
            x5t_s256: x5t_s256.clone(),
            x5t: x5t.clone(),
        },
        RegisteredKey {
            public_key,
            x5t_s256,
            x5t,
        },
    )
}

/// A new Google-style service account: (key file JSON, public key).
pub(crate) fn new_service_account(email: &str, token_uri: &str) -> (String, String, Vec<u8>) {
    let (pkcs8, public_key) = rsa_key();
    let key_id = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 20]>());
    let json = serde_json::json!({
        "type": "service_account",
        "project_id": "relay-test",
        "private_key_id": key_id,
        "private_key": pem("PRIVATE KEY", &pkcs8),
        "client_email": email,
        "client_id": "100000000000000000001",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    });
    (json.to_string(), key_id, public_key)
}

/// A JWS in compact form, split and decoded; the signature not yet checked.
pub(crate) struct Jws {
    pub header: Value,
    pub claims: Value,
    signing_input: String,
    signature: Vec<u8>,
}

impl Jws {
    pub fn parse(token: &str) -> Option<Jws> {
        let mut parts = token.split('.');
        let (h, p, s) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let header = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).ok()?).ok()?;
        let claims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).ok()?).ok()?;
        Some(Jws {
            header,
            claims,
            signing_input: format!("{h}.{p}"),
            signature: URL_SAFE_NO_PAD.decode(s).ok()?,
        })
    }

    pub fn alg(&self) -> &str {
        self.header.get("alg").and_then(Value::as_str).unwrap_or("")
    }

    pub fn header_str(&self, key: &str) -> Option<&str> {
        self.header.get(key).and_then(Value::as_str)
    }

    pub fn claim_str(&self, key: &str) -> Option<&str> {
        self.claims.get(key).and_then(Value::as_str)
    }

    pub fn claim_u64(&self, key: &str) -> Option<u64> {
        self.claims.get(key).and_then(Value::as_u64)
    }

    /// Verifies the RS256 or PS256 signature with an RSA public key (PKCS#1 DER).
    pub fn verify(&self, public_key: &[u8]) -> Result<(), BadSignature> {
        let algorithm: &'static signature::RsaParameters = match self.alg() {
            "RS256" => &signature::RSA_PKCS1_2048_8192_SHA256,
            "PS256" => &signature::RSA_PSS_2048_8192_SHA256,
            other => return Err(BadSignature::Algorithm(other.to_owned())),
        };
        UnparsedPublicKey::new(algorithm, public_key)
            .verify(self.signing_input.as_bytes(), &self.signature)
            .map_err(|_| BadSignature::Mismatch)
    }
}

/// Why a signed JWT's signature is refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BadSignature {
    #[error("unsupported alg {0:?}")]
    Algorithm(String),
    #[error("signature does not verify")]
    Mismatch,
}

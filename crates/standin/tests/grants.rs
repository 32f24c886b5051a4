//! The kit's own checks on the newer grants, over real HTTP: a certificate
//! assertion is verified (signature, aud, iss/sub, jti replay, x5t#S256),
//! refresh tokens rotate and can be revoked.

mod common;

use aws_lc_rs::{rand::SystemRandom, signature};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use common::{form, post, HttpResponse};
use relay_standin::{ClientCertificate, IdentityPlatform};
use rustls::pki_types::{pem::PemObject, PrivateKeyDer};
use serde_json::json;

const FORM: &str = "application/x-www-form-urlencoded";

fn token_url(idp: &IdentityPlatform) -> String {
    format!("{}/{}/oauth2/v2.0/token", idp.authority(), idp.tenant())
}

fn sign(cert: &ClientCertificate, header: serde_json::Value, claims: serde_json::Value) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let PrivateKeyDer::Pkcs8(der) = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap()
    else {
        panic!("PKCS#8 expected")
    };
    let key = signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).unwrap();
    let mut sig = vec![0u8; key.public_modulus_len()];
    key.sign(
        &signature::RSA_PSS_SHA256,
        &SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .unwrap();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

fn claims(idp: &IdentityPlatform, aud: &str, jti: &str) -> serde_json::Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    json!({"aud": aud, "iss": idp.client_id(), "sub": idp.client_id(), "jti": jti, "nbf": now, "exp": now + 300})
}

async fn with_assertion(idp: &IdentityPlatform, assertion: &str) -> HttpResponse {
    let body = form(&[
        ("grant_type", "client_credentials"),
        ("client_id", idp.client_id()),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
        ("client_assertion", assertion),
        ("scope", "https://outlook.office365.com/.default"),
    ]);
    post(
        &idp.authority(),
        &format!("/{}/oauth2/v2.0/token", idp.tenant()),
        FORM,
        &[],
        &body,
    )
    .await
}

#[tokio::test]
async fn certificate_assertions_are_verified() {
    let idp = IdentityPlatform::start().await.unwrap();
    let cert = idp.create_client_certificate();
    let header = json!({"alg": "PS256", "typ": "JWT", "x5t#S256": cert.x5t_s256});
    let good = sign(
        &cert,
        header.clone(),
        claims(&idp, &token_url(&idp), "jti-1"),
    );
    assert_eq!(with_assertion(&idp, &good).await.status, 200);
    // the same jti again: replay
    let replay = with_assertion(&idp, &good).await;
    assert_eq!(replay.status, 401, "{}", replay.json);
    assert!(replay.json["error_description"]
        .as_str()
        .unwrap()
        .contains("replay"));
    // another audience
    let wrong_aud = sign(
        &cert,
        header.clone(),
        claims(&idp, "https://login.example/token", "jti-2"),
    );
    let r = with_assertion(&idp, &wrong_aud).await;
    assert!(
        r.json["error_description"]
            .as_str()
            .unwrap()
            .contains("aud"),
        "{}",
        r.json
    );
    // unknown thumbprint
    let unknown = sign(
        &cert,
        json!({"alg": "PS256", "x5t#S256": "AAAA"}),
        claims(&idp, &token_url(&idp), "jti-3"),
    );
    let r = with_assertion(&idp, &unknown).await;
    assert!(
        r.json["error_description"]
            .as_str()
            .unwrap()
            .contains("key was not found"),
        "{}",
        r.json
    );
    // a tampered signature
    let mut tampered = sign(&cert, header, claims(&idp, &token_url(&idp), "jti-4"));
    tampered.replace_range(tampered.len() - 6.., "AAAAAA");
    let r = with_assertion(&idp, &tampered).await;
    assert_eq!(r.json["error_codes"][0], 700027, "{}", r.json);
    assert_eq!(idp.assertions().len(), 1);
}

#[tokio::test]
async fn refresh_tokens_rotate_and_can_be_revoked() {
    let idp = IdentityPlatform::start().await.unwrap();
    let first = idp.mint_refresh_token();
    let refresh = |rt: String| {
        let idp = idp.clone();
        async move {
            let body = form(&[
                ("grant_type", "refresh_token"),
                ("client_id", idp.client_id()),
                ("refresh_token", &rt),
                (
                    "scope",
                    "https://outlook.office.com/SMTP.Send offline_access",
                ),
            ]);
            post(
                &idp.authority(),
                &format!("/{}/oauth2/v2.0/token", idp.tenant()),
                FORM,
                &[],
                &body,
            )
            .await
        }
    };
    let r = refresh(first.clone()).await;
    assert_eq!(r.status, 200, "{}", r.json);
    let second = r.json["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(second, first);
    assert_eq!(
        refresh(first).await.json["error_codes"][0],
        70008,
        "single use"
    );
    idp.revoke_refresh_tokens();
    let r = refresh(second).await;
    assert_eq!(
        (r.json["error"].as_str(), r.json["error_codes"][0].as_u64()),
        (Some("invalid_grant"), Some(50173))
    );
}

//! The fake identity platform over real HTTP on loopback.

mod common;

use base64::Engine as _;
use common::{form, post, HttpResponse};
use relay_standin::{IdentityPlatform, TokenRejection};

const FORM: &str = "application/x-www-form-urlencoded";
const SCOPE: &str = "https://outlook.office365.com/.default";

fn token_path(idp: &IdentityPlatform) -> String {
    format!("/{}/oauth2/v2.0/token", idp.tenant())
}

async fn client_credentials(idp: &IdentityPlatform, secret: &str, scope: &str) -> HttpResponse {
    let body = form(&[
        ("grant_type", "client_credentials"),
        ("client_id", idp.client_id()),
        ("client_secret", secret),
        ("scope", scope),
    ]);
    post(&idp.authority(), &token_path(idp), FORM, &[], &body).await
}

/// Asserts an identity-platform error reply.
fn assert_aad_error(response: &HttpResponse, status: u16, error: &str, code: u64) {
    let json = &response.json;
    assert_eq!(response.status, status, "{json}");
    assert_eq!(json["error"], error, "{json}");
    assert_eq!(json["error_codes"][0], code, "{json}");
    let description = json["error_description"].as_str().expect("description");
    assert!(
        description.starts_with(&format!("AADSTS{code}: ")),
        "{description}"
    );
    for field in ["timestamp", "trace_id", "correlation_id"] {
        assert!(json[field].is_string(), "{field} missing in {json}");
    }
}

#[tokio::test]
async fn issues_exchange_tokens_for_client_credentials() {
    let idp = IdentityPlatform::start().await.unwrap();
    assert!(idp.authority().starts_with("http://127.0.0.1:"));
    assert_eq!(idp.tenant(), "11111111-2222-3333-4444-555555555555");
    assert_eq!(idp.client_id(), "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee");
    assert_eq!(idp.client_secret(), "s3cr3t~ValueFromTheAzurePortal");

    let response = client_credentials(&idp, idp.client_secret(), SCOPE).await;
    assert_eq!(response.status, 200, "{}", response.json);
    assert_eq!(response.json["token_type"], "Bearer");
    assert_eq!(response.json["expires_in"], 3599);
    assert_eq!(response.json["ext_expires_in"], 3599);
    let token = response.json["access_token"].as_str().unwrap();

    let claims = idp.check_access_token(token).unwrap();
    assert_eq!(claims.aud, "https://outlook.office365.com");
    assert_eq!(claims.appid, idp.client_id());
    assert_eq!(claims.tid, idp.tenant());
    assert_eq!(claims.roles, vec!["SMTP.SendAsApp".to_string()]);
    assert!(claims.oid.is_some());

    // The payload carries the issuer and bookkeeping claims too.
    let payload = token.split('.').nth(1).unwrap();
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    let payload: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(
        payload["iss"],
        format!("https://sts.windows.net/{}/", idp.tenant())
    );
    for claim in ["iat", "nbf", "exp", "jti"] {
        assert!(!payload[claim].is_null(), "{claim} missing");
    }

    assert_eq!(idp.grants("client_credentials"), 1);
    let requests = idp.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].grant_type, "client_credentials");
    assert_eq!(requests[0].path, token_path(&idp));
}

#[tokio::test]
async fn accepts_the_secret_as_http_basic_auth() {
    let idp = IdentityPlatform::start().await.unwrap();
    let basic = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        idp.client_id(),
        // Form-encoded before base64, as RFC 6749 says; `~` is unreserved.
        idp.client_secret()
    ));
    let body = form(&[("grant_type", "client_credentials"), ("scope", SCOPE)]);
    let header = format!("Authorization: Basic {basic}");
    let response = post(&idp.authority(), &token_path(&idp), FORM, &[&header], &body).await;
    assert_eq!(response.status, 200, "{}", response.json);
}

#[tokio::test]
async fn judges_tokens_like_exchange_online() {
    let idp = IdentityPlatform::start().await.unwrap();
    idp.set_lifetime(0);
    let response = client_credentials(&idp, idp.client_secret(), SCOPE).await;
    assert_eq!(response.json["expires_in"], 0);
    let token = response.json["access_token"].as_str().unwrap();
    assert_eq!(idp.check_access_token(token), Err(TokenRejection::Expired));

    let graph = idp.mint_token("https://graph.microsoft.com", 600);
    assert_eq!(
        idp.check_access_token(&graph),
        Err(TokenRejection::WrongAudience)
    );

    // A payload edited after signing no longer verifies.
    let graph_payload = graph.split('.').nth(1).unwrap();
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let edited = String::from_utf8(engine.decode(graph_payload).unwrap())
        .unwrap()
        .replace(
            "https://graph.microsoft.com",
            "https://outlook.office365.com",
        );
    let forged = graph.replace(graph_payload, &engine.encode(edited));
    assert_eq!(
        idp.check_access_token(&forged),
        Err(TokenRejection::BadSignature)
    );

    let other = IdentityPlatform::start().await.unwrap();
    let foreign = other.mint_token("https://outlook.office365.com", 600);
    assert_eq!(
        idp.check_access_token(&foreign),
        Err(TokenRejection::BadSignature)
    );
    assert_eq!(
        idp.check_access_token("eyJhbGciOiJub25lIn0.e30."),
        Err(TokenRejection::Unknown)
    );
    assert_eq!(
        TokenRejection::Expired.to_string(),
        "token has expired".to_string()
    );
}

#[tokio::test]
async fn refuses_bad_requests_with_aadsts_errors() {
    let idp = IdentityPlatform::start().await.unwrap();
    let authority = idp.authority();
    let path = token_path(&idp);

    let json = post(&authority, &path, "application/json", &[], "{}").await;
    assert_aad_error(&json, 400, "invalid_request", 900144);

    let good = form(&[
        ("grant_type", "client_credentials"),
        ("client_id", idp.client_id()),
        ("client_secret", idp.client_secret()),
        ("scope", SCOPE),
    ]);
    let tenant = post(
        &authority,
        "/contoso.example/oauth2/v2.0/token",
        FORM,
        &[],
        &good,
    )
    .await;
    assert_aad_error(&tenant, 400, "invalid_request", 90002);
    assert!(tenant.json["error_description"]
        .as_str()
        .unwrap()
        .contains("Tenant 'contoso.example' not found."));

    let body = form(&[
        ("grant_type", "client_credentials"),
        ("client_id", "00000000-0000-0000-0000-000000000000"),
        ("client_secret", idp.client_secret()),
        ("scope", SCOPE),
    ]);
    let unknown_app = post(&authority, &path, FORM, &[], &body).await;
    assert_aad_error(&unknown_app, 400, "unauthorized_client", 700016);
    assert!(unknown_app.json["error_description"]
        .as_str()
        .unwrap()
        .contains("Application with identifier '00000000-0000-0000-0000-000000000000' was not found in the directory"));

    let wrong_secret = client_credentials(&idp, "the-secret-id-instead", SCOPE).await;
    assert_aad_error(&wrong_secret, 401, "invalid_client", 7000215);
    assert!(wrong_secret.json["error_description"]
        .as_str()
        .unwrap()
        .contains("Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID"));

    let body = form(&[
        ("grant_type", "client_credentials"),
        ("client_id", idp.client_id()),
        ("scope", SCOPE),
    ]);
    let no_secret = post(&authority, &path, FORM, &[], &body).await;
    assert_aad_error(&no_secret, 401, "invalid_client", 7000218);

    for scope in [
        "https://outlook.office365.com/SMTP.Send",
        "https://graph.microsoft.com/Mail.Send",
    ] {
        let bad_scope = client_credentials(&idp, idp.client_secret(), scope).await;
        assert_aad_error(&bad_scope, 400, "invalid_scope", 1002012);
    }

    let body = form(&[
        ("grant_type", "password"),
        ("username", "u"),
        ("password", "p"),
    ]);
    let grant = post(&authority, &path, FORM, &[], &body).await;
    assert_aad_error(&grant, 400, "unsupported_grant_type", 70003);

    let no_grant = post(&authority, &path, FORM, &[], "scope=x").await;
    assert_aad_error(&no_grant, 400, "invalid_request", 900144);

    assert_eq!(idp.requests().len(), 9);
    assert_eq!(idp.grants("client_credentials"), 6);
    assert_eq!(idp.grants("password"), 1);
    assert_eq!(idp.grants(""), 2);
}

#[tokio::test]
async fn scripted_failures_come_first_and_in_order() {
    let idp = IdentityPlatform::start().await.unwrap();
    idp.fail_next(
        503,
        90033,
        "temporarily_unavailable",
        "A transient error has occurred. Please try again.",
    );
    idp.fail_next(
        400,
        7000222,
        "invalid_client",
        "AADSTS7000222: The provided client secret keys for app are expired.",
    );

    let first = client_credentials(&idp, idp.client_secret(), SCOPE).await;
    assert_aad_error(&first, 503, "temporarily_unavailable", 90033);
    assert_eq!(
        first.json["error_description"],
        "AADSTS90033: A transient error has occurred. Please try again."
    );
    let second = client_credentials(&idp, idp.client_secret(), SCOPE).await;
    assert_aad_error(&second, 400, "invalid_client", 7000222);
    assert_eq!(
        second.json["error_description"],
        "AADSTS7000222: The provided client secret keys for app are expired."
    );
    let third = client_credentials(&idp, idp.client_secret(), SCOPE).await;
    assert_eq!(third.status, 200);
    assert_eq!(idp.grants("client_credentials"), 3);
    let requests = idp.requests();
    assert!(requests.windows(2).all(|w| w[0].at <= w[1].at));
}

#[tokio::test]
async fn stop_refuses_new_connections() {
    let idp = IdentityPlatform::start().await.unwrap();
    let addr = idp.authority().trim_start_matches("http://").to_string();
    let ok = client_credentials(&idp, idp.client_secret(), SCOPE).await;
    assert_eq!(ok.status, 200);
    // An idle connection must not hold up the stop.
    let _idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tokio::time::timeout(common::STEP, idp.stop())
        .await
        .expect("stop timed out");
    let connect = tokio::time::timeout(common::STEP, tokio::net::TcpStream::connect(&addr))
        .await
        .expect("connect timed out");
    assert!(connect.is_err(), "port still accepts connections");
    // Stopping twice is harmless.
    tokio::time::timeout(common::STEP, idp.stop())
        .await
        .expect("stop timed out");
}

#[tokio::test]
async fn issues_graph_tokens() {
    let idp = IdentityPlatform::start().await.unwrap();
    let graph = "https://graph.microsoft.com";
    let app = client_credentials(&idp, idp.client_secret(), &format!("{graph}/.default")).await;
    assert_eq!(app.status, 200, "{}", app.json);
    let token = app.json["access_token"].as_str().unwrap();
    let claims = idp.check_graph_token(token).unwrap();
    assert_eq!(claims.aud, graph);
    assert_eq!(claims.roles, vec!["Mail.Send", "Mail.ReadWrite"]);
    assert_eq!(
        idp.check_access_token(token),
        Err(TokenRejection::WrongAudience),
        "Exchange does not take a Graph token"
    );

    idp.set_graph_roles(&["Mail.Send"]);
    let app = client_credentials(&idp, idp.client_secret(), &format!("{graph}/.default")).await;
    let token = app.json["access_token"].as_str().unwrap();
    assert_eq!(
        idp.check_graph_token(token).unwrap().roles,
        vec!["Mail.Send"]
    );

    let body = form(&[
        ("grant_type", "refresh_token"),
        ("client_id", idp.client_id()),
        ("refresh_token", &idp.mint_refresh_token()),
        ("scope", &format!("{graph}/Mail.Send offline_access")),
    ]);
    let user = post(&idp.authority(), &token_path(&idp), FORM, &[], &body).await;
    assert_eq!(user.status, 200, "{}", user.json);
    let claims = idp
        .check_graph_token(user.json["access_token"].as_str().unwrap())
        .unwrap();
    assert_eq!(claims.aud, graph);
    assert_eq!(claims.scp.as_deref(), Some("Mail.Send"));
}

//! The token manager against the test kit's identity platform, over real
//! loopback HTTP.

mod common;

use common::{bounded, eventually, init, kit_config, manager, oauth_config, Credential};
use relay_testkit::IdentityPlatform;
use relay_tokens::{explain_aadsts, TokenError, TokenSource};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const CC: &str = "client_credentials";

async fn idp() -> IdentityPlatform {
    IdentityPlatform::start().await.expect("identity platform")
}

// Protects the basic grant: a client-credentials token the upstream would accept.
#[tokio::test]
async fn client_credentials_token_is_accepted_by_exchange() {
    init();
    let idp = idp().await;
    let tokens = manager(&kit_config(&idp));
    assert_eq!(tokens.account(), "main");

    let token = bounded(tokens.token()).await.expect("token");

    let claims = idp
        .check_access_token(token.secret().expose())
        .expect("the kit accepts the token");
    assert!(
        claims.roles.iter().any(|r| r == "SMTP.SendAsApp"),
        "{claims:?}"
    );
    assert_eq!(claims.aud, "https://outlook.office365.com");
    assert_eq!(claims.appid, idp.client_id());
    assert!(
        token.expires_in() > Duration::from_secs(3500),
        "{:?}",
        token.expires_in()
    );
    let requests = idp.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].grant_type, CC);
    assert_eq!(
        requests[0].path,
        format!("/{}/oauth2/v2.0/token", idp.tenant())
    );
    // A valid token is reused, not fetched again.
    let again = bounded(tokens.token()).await.expect("token");
    assert_eq!(again.secret(), token.secret());
    assert_eq!(idp.grants(CC), 1);
}

// Protects against a thundering herd: concurrent callers share one request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_callers_share_one_token_request() {
    init();
    let idp = idp().await;
    let tokens = manager(&kit_config(&idp));

    let mut callers = JoinSet::new();
    for _ in 0..20 {
        let tokens = tokens.clone();
        callers.spawn(async move { tokens.token().await });
    }
    let mut secrets = Vec::new();
    while let Some(result) = bounded(callers.join_next()).await {
        let token = result.expect("task").expect("token");
        secrets.push(token.secret().expose().to_owned());
    }

    assert_eq!(secrets.len(), 20);
    assert!(
        secrets.iter().all(|s| *s == secrets[0]),
        "all callers got the same token"
    );
    assert_eq!(idp.grants(CC), 1);
}

// Protects background renewal: tokens are renewed ahead of expiry without
// traffic, and cancelling stops the refresher. A one-minute token is
// renewed when a third of it remains.
#[tokio::test]
async fn refresher_renews_ahead_of_expiry_until_cancelled() {
    init();
    let idp = idp().await;
    idp.set_lifetime(60);
    let tokens = manager(&kit_config(&idp));
    let shutdown = CancellationToken::new();
    let refresher = tokens.spawn_refresher(shutdown.clone());

    // The refresher obtains the first token by itself…
    assert!(eventually(Duration::from_secs(5), || idp.grants(CC) >= 1).await);
    let first = bounded(tokens.token()).await.expect("token");
    assert_eq!(idp.grants(CC), 1);
    // …and renews it 40 s later, with no token() calls.
    assert!(
        eventually(Duration::from_secs(50), || idp.grants(CC) >= 2).await,
        "only {} grants",
        idp.grants(CC)
    );
    // The renewed token is current and valid.
    let token = bounded(tokens.token()).await.expect("token");
    assert_ne!(token.secret(), first.secret());
    assert!(idp.check_access_token(token.secret().expose()).is_ok());

    shutdown.cancel();
    bounded(refresher).await.expect("refresher ends cleanly");
    let after_cancel = idp.grants(CC);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(idp.grants(CC), after_cancel, "no renewals after cancel");
}

// Protects the 535-retry path: a rejected token is replaced once, however
// many sessions report the same rejection.
#[tokio::test]
async fn refresh_rejected_fetches_once_per_rejected_token() {
    init();
    let idp = idp().await;
    let tokens = manager(&kit_config(&idp));
    let old = bounded(tokens.token()).await.expect("token");
    assert_eq!(idp.grants(CC), 1);

    let new = bounded(tokens.refresh_rejected(&old))
        .await
        .expect("new token");
    assert_ne!(new.secret(), old.secret());
    assert_eq!(idp.grants(CC), 2);

    let again = bounded(tokens.refresh_rejected(&old)).await.expect("token");
    assert_eq!(
        again.secret(),
        new.secret(),
        "the already-new token is returned"
    );
    assert_eq!(idp.grants(CC), 2);
    let current = bounded(tokens.token()).await.expect("token");
    assert_eq!(current.secret(), new.secret());
    assert_eq!(idp.grants(CC), 2);

    // Rejecting the new token does fetch again.
    let newest = bounded(tokens.refresh_rejected(&new)).await.expect("token");
    assert_ne!(newest.secret(), new.secret());
    assert_eq!(idp.grants(CC), 3);
}

// Protects diagnostics: an AADSTS refusal keeps its code and carries the
// explanation an admin needs.
#[tokio::test]
async fn refused_request_carries_aadsts_code_and_explanation() {
    init();
    let idp = idp().await;
    idp.fail_next(
        401,
        7000215,
        "invalid_client",
        "Invalid client secret provided.",
    );
    let tokens = manager(&kit_config(&idp));

    let err = bounded(tokens.token()).await.expect_err("refused");
    assert!(matches!(err, TokenError::Refused { .. }), "{err:?}");
    assert_eq!(err.aadsts(), Some(7000215));
    let text = err.to_string();
    assert!(text.contains("invalid_client"), "{text}");
    assert!(text.contains("AADSTS7000215"), "{text}");
    assert!(
        text.contains(explain_aadsts(7000215).expect("explained")),
        "{text}"
    );

    // Until the back-off ends callers are told so, without a request…
    let err = bounded(tokens.token()).await.expect_err("backing off");
    assert!(matches!(err, TokenError::Unavailable { .. }), "{err:?}");
    assert!(err.to_string().contains("AADSTS7000215"), "{err}");
    assert_eq!(idp.grants(CC), 1);
    // …then the next request is made, and the one-off failure is over.
    tokio::time::sleep(Duration::from_secs(1)).await;
    bounded(tokens.token())
        .await
        .expect("token after the failure");
    assert_eq!(idp.grants(CC), 2);
}

// Protects diagnostics of a wrong tenant id (AADSTS90002).
#[tokio::test]
async fn wrong_tenant_is_reported_as_aadsts90002() {
    init();
    let idp = idp().await;
    let tokens = manager(&oauth_config(
        &idp.authority(),
        "00000000-0000-0000-0000-000000000000",
        idp.client_id(),
        Credential::Inline(idp.client_secret()),
    ));

    let err = bounded(tokens.token()).await.expect_err("refused");
    assert_eq!(err.aadsts(), Some(90002), "{err}");
    assert!(
        err.to_string()
            .contains(explain_aadsts(90002).expect("explained")),
        "{err}"
    );
}

// Protects the transport error path: an unreachable authority is a
// Transport error naming the URL, not a hang or a panic.
#[tokio::test]
async fn unreachable_authority_is_a_transport_error() {
    init();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let tokens = manager(&oauth_config(
        &format!("http://127.0.0.1:{port}"),
        "contoso.onmicrosoft.com",
        "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
        Credential::Inline("irrelevant"),
    ));

    let err = bounded(tokens.token()).await.expect_err("unreachable");
    match &err {
        TokenError::Transport { url, reason } => {
            assert!(url.contains(&format!("127.0.0.1:{port}")), "{url}");
            assert!(!reason.is_empty());
        }
        other => panic!("expected a transport error, got {other:?}"),
    }
    assert_eq!(err.aadsts(), None);
}

// Protects secret rotation and secrecy: the secret file is read at each
// request, and neither secrets nor tokens show up in Debug/Display output.
#[tokio::test]
async fn secret_file_is_read_at_each_request_and_never_printed() {
    init();
    let idp = idp().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("client-secret");
    let good = idp.client_secret().to_owned();
    let wrong = "wrong~SecretValue0123456789";
    std::fs::write(&path, format!("  {good}\n")).expect("write secret");
    let oauth = oauth_config(
        &idp.authority(),
        idp.tenant(),
        idp.client_id(),
        Credential::File(&path),
    );
    let tokens = manager(&oauth);

    let first = bounded(tokens.token())
        .await
        .expect("token with the file's secret");

    // A rotated (here: wrong) secret takes effect at the next request.
    std::fs::write(&path, wrong).expect("rewrite secret");
    let err = bounded(tokens.refresh_rejected(&first))
        .await
        .expect_err("wrong secret refused");
    assert_eq!(err.aadsts(), Some(7000215), "{err}");
    for text in [err.to_string(), format!("{err:?}")] {
        for secret in [wrong, good.as_str(), first.secret().expose()] {
            assert!(!text.contains(secret), "{text} leaks a secret");
        }
    }

    // Restored: works again without a restart (after the back-off).
    std::fs::write(&path, &good).expect("restore secret");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = bounded(tokens.refresh_rejected(&first))
        .await
        .expect("token after restoring the secret");
    assert_ne!(second.secret(), first.secret());
    assert_eq!(idp.grants(CC), 3);

    // A missing file is a SecretFile error that names the path only.
    std::fs::remove_file(&path).expect("remove secret");
    let err = bounded(tokens.refresh_rejected(&second))
        .await
        .expect_err("missing file");
    assert!(matches!(err, TokenError::SecretFile { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert_eq!(idp.grants(CC), 3, "no request without a secret");
    // The current token is still handed out.
    let current = bounded(tokens.token()).await.expect("current token");
    assert_eq!(current.secret(), second.secret());

    // Debug output of tokens and sources is redacted.
    for token in [&first, &second] {
        let debug = format!("{token:?}");
        assert!(!debug.contains(token.secret().expose()), "{debug}");
        assert!(debug.contains("[redacted]"), "{debug}");
    }
    let inline = TokenSource::from_config(&kit_config(&idp)).expect("source");
    let file = TokenSource::from_config(&oauth).expect("source");
    for source in [format!("{inline:?}"), format!("{file:?}")] {
        assert!(!source.contains(&good), "{source} leaks the secret");
    }
    assert!(format!("{inline:?}").contains("[redacted]"));
}

// Protects the identity platform from a request storm: a token issued
// already expired (`expires_in: 0`) must not make the refresher spin.
#[tokio::test]
async fn refresher_does_not_spin_on_tokens_issued_expired() {
    init();
    let idp = idp().await;
    idp.set_lifetime(0);
    let tokens = manager(&kit_config(&idp));
    let shutdown = CancellationToken::new();
    let refresher = tokens.spawn_refresher(shutdown.clone());

    tokio::time::sleep(Duration::from_secs(2)).await;
    shutdown.cancel();
    bounded(refresher).await.expect("refresher ends cleanly");
    assert_eq!(idp.grants(CC), 1, "token requests in 2 s");
}

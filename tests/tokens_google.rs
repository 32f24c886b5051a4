//! Google end to end: a service account with domain-wide delegation, and
//! Gmail's way of refusing a token (`334 <base64 JSON>`, empty line, `535`).

mod common;

use common::*;
use relay_testkit::{SubmissionOptions, SubmissionServer};
use std::time::Duration;

#[tokio::test]
async fn service_account_delivers_and_gmail_refusals_are_answered() {
    let world = World::start().await;
    let gmail = SubmissionServer::start_with(
        world.idp.clone(),
        SubmissionOptions {
            google_auth_errors: true,
            ..SubmissionOptions::default()
        },
    )
    .await
    .expect("gmail stand-in");
    std::fs::write(world.dir.path().join("ca.pem"), gmail.ca_pem()).unwrap();
    let key = world.dir.path().join("service-account.json");
    std::fs::write(
        &key,
        world
            .idp
            .create_service_account("relay@relay-test.iam.gserviceaccount.com"),
    )
    .unwrap();
    let port = free_port();
    let config = world
        .config(port)
        .replace(&format!("port = {}", world.upstream.port()), &format!("port = {}", gmail.port()))
        .replace(
            "flow = \"client_credentials\"",
            &format!(
                "provider = \"google\"\nflow = \"service_account\"\nservice_account_key_file = \"{}\"",
                key.display()
            ),
        )
        .replace(
            &format!("authority = \"{}\"", world.idp.authority()),
            &format!("authority = \"{}\"", world.idp.google_authority()),
        )
        .replace(&format!("tenant_id = \"{}\"\n", world.idp.tenant()), "")
        .replace(&format!("client_id = \"{}\"\n", world.idp.client_id()), "")
        .replace(&format!("client_secret_file = \"{}/secret\"\n", world.dir.path().display()), "");
    let config = world.write_config(&config);
    // the first AUTH is refused the Gmail way; the retry succeeds
    gmail.push_auth_fault("535 5.7.8 scripted");
    let relay = Relay::start(&config, port).await;
    let reply = send_one(port, MAILBOX, &["alice@example.com"], &message("gmail")).await;
    assert!(reply.starts_with("250"), "{reply}");
    let got = gmail.wait_for_messages(1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1, "log:\n{}", relay.log());
    assert_eq!(got[0].token_claims.aud, "https://mail.google.com/");
    assert_eq!(
        got[0].token_claims.upn.as_deref(),
        Some(MAILBOX),
        "sub = the mailbox"
    );
    let failures = gmail.auth_failures();
    assert!(!failures.is_empty(), "the scripted refusal happened");
    assert!(
        !failures.iter().any(|f| f.contains("empty line")),
        "the relay must answer the 334 challenge with an empty line: {failures:?}"
    );
    assert!(
        world
            .idp
            .grants("urn:ietf:params:oauth:grant-type:jwt-bearer")
            >= 1
    );
}

//! The fake submission server over real loopback sockets, driven by a raw
//! SMTP client.

mod common;

use std::time::Duration;

use common::{xoauth2, Smtp, STEP};
use relay_standin::{IdentityPlatform, SubmissionOptions, SubmissionServer};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

type TlsSmtp = Smtp<TlsStream<TcpStream>>;

async fn kit() -> (IdentityPlatform, SubmissionServer) {
    let idp = IdentityPlatform::start().await.unwrap();
    let server = SubmissionServer::start(idp.clone()).await.unwrap();
    (idp, server)
}

fn good_token(idp: &IdentityPlatform) -> String {
    idp.mint_token("https://outlook.office365.com", 3599)
}

/// Connects, upgrades with STARTTLS and sends the second EHLO.
async fn tls_session(server: &SubmissionServer) -> TlsSmtp {
    let (mut smtp, _) = Smtp::connect(server.port()).await;
    assert_eq!(smtp.cmd("EHLO relay.test").await.code, 250);
    let mut smtp = smtp.starttls(&server.ca_pem(), "localhost").await;
    assert_eq!(smtp.cmd("EHLO relay.test").await.code, 250);
    smtp
}

/// A TLS session logged in as the server's mailbox.
async fn logged_in(idp: &IdentityPlatform, server: &SubmissionServer) -> TlsSmtp {
    let mut smtp = tls_session(server).await;
    let auth = smtp
        .cmd(&format!(
            "AUTH XOAUTH2 {}",
            xoauth2(&server.mailbox(), &good_token(idp))
        ))
        .await;
    assert_eq!(auth.text(), "235 2.7.0 Authentication successful");
    smtp
}

#[tokio::test]
async fn full_session_delivers_exact_bytes() {
    let (idp, server) = kit().await;
    let (mut smtp, greeting) = Smtp::connect(server.port()).await;
    assert_eq!(
        greeting.text(),
        "220 FAKE.prod.outlook.com Microsoft ESMTP MAIL Service ready"
    );
    let ehlo = smtp.cmd("EHLO relay.test").await;
    assert_eq!(
        ehlo.lines[1..],
        [
            "250-SIZE 37748736",
            "250-PIPELINING",
            "250-ENHANCEDSTATUSCODES",
            "250-8BITMIME",
            "250-SMTPUTF8",
            "250 STARTTLS"
        ]
    );
    assert_eq!(
        smtp.cmd("MAIL FROM:<relay@contoso.com>").await.text(),
        "530 5.7.57 Client not authenticated to send mail. [MAIL FROM]"
    );
    assert_eq!(smtp.cmd("AUTH XOAUTH2").await.code, 504);

    // The certificate is valid for the IP address as well as "localhost".
    let mut smtp = smtp.starttls(&server.ca_pem(), "127.0.0.1").await;
    // Hello again is required after TLS.
    assert_eq!(smtp.cmd("AUTH XOAUTH2 x").await.code, 503);
    let ehlo = smtp.cmd("EHLO relay.test").await;
    assert!(
        ehlo.lines.contains(&"250-AUTH LOGIN XOAUTH2".to_string()),
        "{ehlo:?}"
    );
    assert!(!ehlo.text().contains("STARTTLS"), "{ehlo:?}");
    assert_eq!(smtp.cmd("STARTTLS").await.code, 503);

    let token = good_token(&idp);
    let auth = smtp
        .cmd(&format!(
            "AUTH XOAUTH2 {}",
            xoauth2("Relay@Contoso.com", &token)
        ))
        .await;
    assert_eq!(auth.text(), "235 2.7.0 Authentication successful");

    // Everything up to DATA in one write (PIPELINING).
    smtp.send_raw(
        b"MAIL FROM:<relay@contoso.com> BODY=8BITMIME\r\n\
          RCPT TO:<alice@fabrikam.com>\r\n\
          RCPT TO:<bob@fabrikam.com>\r\n\
          DATA\r\n",
    )
    .await;
    for expected in [
        "250 2.1.0 Sender OK",
        "250 2.1.5 Recipient OK",
        "250 2.1.5 Recipient OK",
        "354 Start mail input; end with <CRLF>.<CRLF>",
    ] {
        assert_eq!(smtp.reply().await.unwrap().text(), expected);
    }
    // Dot-stuffed lines, a lone "." after a bare LF (not an end marker),
    // and the terminator split across writes.
    smtp.send_raw(b"Subject: dots\r\n\r\n..leading dot\r\n...\r\n.x\r\nbare\n.\r\nstill body\r\n.")
        .await;
    smtp.send_raw(b"\r\nQUIT\r\n").await;
    let accepted = smtp.reply().await.unwrap().text();
    assert!(accepted.starts_with("250 2.0.0 OK <"), "{accepted}");
    assert!(
        accepted.ends_with("@FAKE.prod.outlook.com> [Hostname=FAKE.prod.outlook.com]"),
        "{accepted}"
    );
    assert_eq!(
        smtp.reply().await.unwrap().text(),
        "221 2.0.0 Service closing transmission channel"
    );

    let messages = server.wait_for_messages(1, STEP).await;
    assert_eq!(messages.len(), 1);
    let message = &messages[0];
    assert_eq!(
        message.data,
        b"Subject: dots\r\n\r\n.leading dot\r\n..\r\nx\r\nbare\n.\r\nstill body\r\n"
    );
    assert_eq!(message.session, 1);
    assert_eq!(message.auth_user, "Relay@Contoso.com");
    assert_eq!(message.mail_from, "relay@contoso.com");
    assert_eq!(message.rcpt_to, ["alice@fabrikam.com", "bob@fabrikam.com"]);
    assert_eq!(
        message.token_claims,
        idp.check_access_token(&token).unwrap()
    );
    assert_eq!(server.sessions(), 1);
    assert!(server.auth_failures().is_empty());
}

#[tokio::test]
async fn auth_outcomes_are_recorded() {
    let (idp, server) = kit().await;
    let mut smtp = tls_session(&server).await;
    let mailbox = server.mailbox();
    assert_eq!(mailbox, "relay@contoso.com");

    let cases = [
        (
            "AUTH LOGIN".to_string(),
            "535 5.7.139 Authentication unsuccessful, basic authentication is disabled.",
        ),
        (
            "AUTH XOAUTH2 bm90IHhvYXV0aDI=".to_string(),
            "535 5.7.3 Authentication unsuccessful",
        ),
        (
            format!("AUTH XOAUTH2 {}", xoauth2(&mailbox, "garbage")),
            "535 5.7.3 Authentication unsuccessful",
        ),
        (
            format!(
                "AUTH XOAUTH2 {}",
                xoauth2(
                    &mailbox,
                    &idp.mint_token("https://outlook.office365.com", -10)
                )
            ),
            "535 5.7.3 Authentication unsuccessful",
        ),
        (
            format!(
                "AUTH XOAUTH2 {}",
                xoauth2(
                    &mailbox,
                    &idp.mint_token("https://graph.microsoft.com", 600)
                )
            ),
            "535 5.7.3 Authentication unsuccessful",
        ),
        (
            format!(
                "AUTH XOAUTH2 {}",
                xoauth2("other@contoso.com", &good_token(&idp))
            ),
            "535 5.7.3 Authentication unsuccessful",
        ),
        (
            "AUTH PLAIN AGEAYg==".to_string(),
            "504 5.7.4 Unrecognized authentication type",
        ),
    ];
    for (command, expected) in cases {
        assert_eq!(smtp.cmd(&command).await.text(), expected, "{command}");
    }
    assert_eq!(
        server.auth_failures(),
        [
            "basic auth attempted",
            "malformed XOAUTH2",
            "token rejected: token was not issued by this identity platform",
            "token rejected: token has expired",
            "token rejected: token audience is not https://outlook.office365.com",
            "user 'other@contoso.com' is not the mailbox 'relay@contoso.com'",
        ]
    );
    assert_eq!(smtp.cmd("MAIL FROM:<relay@contoso.com>").await.code, 530);

    // The two-step form: AUTH XOAUTH2, "334 ", then the response.
    let challenge = smtp.cmd("AUTH XOAUTH2").await;
    assert_eq!(challenge.lines, ["334 "]);
    let ok = smtp.cmd(&xoauth2(&mailbox, &good_token(&idp))).await;
    assert_eq!(ok.code, 235);
    assert_eq!(smtp.cmd("AUTH XOAUTH2").await.code, 503);
    assert_eq!(smtp.cmd("NOOP").await.text(), "250 2.0.0 OK");
}

#[tokio::test]
async fn send_as_is_refused_unless_allowed() {
    let (idp, server) = kit().await;
    let mut smtp = logged_in(&idp, &server).await;
    let send = async |smtp: &mut TlsSmtp, from: &str| {
        assert_eq!(smtp.cmd(&format!("MAIL FROM:<{from}>")).await.code, 250);
        assert_eq!(smtp.cmd("RCPT TO:<alice@fabrikam.com>").await.code, 250);
        assert_eq!(smtp.cmd("DATA").await.code, 354);
        smtp.cmd("Subject: hi\r\n\r\nhello\r\n.").await
    };
    let refused = send(&mut smtp, "ceo@contoso.com").await;
    let expected =
        "554 5.2.252 SendAsDenied; relay@contoso.com not allowed to send as ceo@contoso.com; \
                    STOREDRV.Submit; Exception:SendAsDeniedException.MapiExceptionSendAsDenied; \
                    Failed to process message due to a permanent exception with message \
                    [BeginDiagnosticData]Cannot submit message.";
    assert_eq!(refused.text(), expected);
    assert_eq!(server.rejected(), [expected]);
    assert!(server.messages().is_empty());

    server.allow_send_as("CEO@contoso.com");
    assert_eq!(send(&mut smtp, "ceo@contoso.com").await.code, 250);
    let messages = server.wait_for_messages(1, STEP).await;
    assert_eq!(messages[0].mail_from, "ceo@contoso.com");
    assert_eq!(messages[0].text(), "Subject: hi\r\n\r\nhello\r\n");
}

#[tokio::test]
async fn without_starttls_nothing_can_be_sent() {
    let idp = IdentityPlatform::start().await.unwrap();
    let options = SubmissionOptions {
        offer_starttls: false,
        ..SubmissionOptions::default()
    };
    let server = SubmissionServer::start_with(idp.clone(), options)
        .await
        .unwrap();
    let (mut smtp, _) = Smtp::connect(server.port()).await;
    let ehlo = smtp.cmd("EHLO relay.test").await;
    assert_eq!(ehlo.lines.last().unwrap(), "250 SMTPUTF8");
    assert!(!ehlo.text().contains("STARTTLS") && !ehlo.text().contains("AUTH"));
    assert!(smtp.cmd("STARTTLS").await.text().starts_with("502 5.5.1"));
    let auth = format!(
        "AUTH XOAUTH2 {}",
        xoauth2(&server.mailbox(), &good_token(&idp))
    );
    assert_eq!(smtp.cmd(&auth).await.code, 504);
    assert_eq!(smtp.cmd("MAIL FROM:<relay@contoso.com>").await.code, 530);
    assert_eq!(smtp.cmd("QUIT").await.code, 221);
    assert!(smtp.closed().await);
}

#[tokio::test]
async fn stop_and_restart_on_the_same_port() {
    let (idp, server) = kit().await;
    let port = server.port();
    let mut live = logged_in(&idp, &server).await;
    assert_eq!(server.sessions(), 1);

    tokio::time::timeout(STEP, server.stop())
        .await
        .expect("stop timed out");
    assert!(live.closed().await, "live session survived stop");
    let refused = tokio::time::timeout(STEP, TcpStream::connect(("127.0.0.1", port)))
        .await
        .expect("connect timed out");
    assert!(refused.is_err(), "port still accepts connections");

    tokio::time::timeout(STEP, server.restart())
        .await
        .expect("restart timed out")
        .unwrap();
    assert_eq!(server.port(), port);
    let mut smtp = logged_in(&idp, &server).await;
    assert_eq!(smtp.cmd("QUIT").await.code, 221);
    assert_eq!(server.sessions(), 2);
    // Restarting a running server is a no-op.
    server.restart().await.unwrap();
}

#[tokio::test]
async fn scripted_faults() {
    let (idp, server) = kit().await;
    let mut smtp = tls_session(&server).await;
    let auth = format!(
        "AUTH XOAUTH2 {}",
        xoauth2(&server.mailbox(), &good_token(&idp))
    );

    let throttled = "535 5.7.139 Authentication unsuccessful, the request did not meet the criteria to be authenticated successfully.";
    server.push_auth_fault(throttled);
    assert_eq!(smtp.cmd(&auth).await.text(), throttled);
    assert_eq!(
        server.auth_failures(),
        [format!("scripted fault: {throttled}")]
    );
    assert_eq!(smtp.cmd(&auth).await.code, 235);

    server.push_rcpt_fault(
        "Bob@fabrikam.com",
        "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
    );
    server.push_data_fault("451 4.7.500 Server busy. Please try again later.");
    assert_eq!(smtp.cmd("MAIL FROM:<relay@contoso.com>").await.code, 250);
    assert_eq!(smtp.cmd("RCPT TO:<alice@fabrikam.com>").await.code, 250);
    assert!(smtp
        .cmd("RCPT TO:<bob@fabrikam.com>")
        .await
        .text()
        .starts_with("550 5.1.10"));
    assert_eq!(smtp.cmd("DATA").await.code, 354);
    assert_eq!(smtp.cmd("x\r\n.").await.code, 451);

    // Faults are consumed: the same transaction now succeeds.
    assert_eq!(smtp.cmd("MAIL FROM:<relay@contoso.com>").await.code, 250);
    assert_eq!(smtp.cmd("RCPT TO:<bob@fabrikam.com>").await.code, 250);
    assert_eq!(smtp.cmd("DATA").await.code, 354);
    assert_eq!(smtp.cmd("x\r\n.").await.code, 250);
    let messages = server.wait_for_messages(1, STEP).await;
    assert_eq!(messages[0].rcpt_to, ["bob@fabrikam.com"]);

    server.push_data_fault("disconnect");
    assert_eq!(smtp.cmd("MAIL FROM:<relay@contoso.com>").await.code, 250);
    assert_eq!(smtp.cmd("RCPT TO:<bob@fabrikam.com>").await.code, 250);
    assert_eq!(smtp.cmd("DATA").await.code, 354);
    smtp.send_raw(b"x\r\n.\r\n").await;
    assert!(
        smtp.reply().await.is_none(),
        "expected a dropped connection"
    );
    assert_eq!(
        server.rejected(),
        [
            "451 4.7.500 Server busy. Please try again later.",
            "disconnect"
        ]
    );
    assert_eq!(server.messages().len(), 1);
}

#[tokio::test]
async fn command_edge_cases() {
    let (idp, server) = kit().await;
    let mut smtp = logged_in(&idp, &server).await;
    assert_eq!(
        smtp.cmd("DATA").await.text(),
        "554 5.5.1 Error: no valid recipients"
    );
    assert_eq!(smtp.cmd("RCPT TO:<a@b.c>").await.code, 503);
    assert_eq!(
        smtp.cmd("VRFY someone").await.text(),
        "500 5.3.3 Unrecognized command"
    );
    assert_eq!(
        smtp.cmd(&"X".repeat(20_000)).await.text(),
        "500 5.5.2 Line too long"
    );
    assert_eq!(
        smtp.cmd("MAIL FROM:<relay@contoso.com> SIZE=99999999")
            .await
            .code,
        552
    );
    assert_eq!(smtp.cmd("MAIL FROM relay@contoso.com").await.code, 501);

    assert_eq!(smtp.cmd("MAIL FROM:<relay@contoso.com>").await.code, 250);
    let mut batch = String::new();
    for i in 0..501 {
        batch.push_str(&format!("RCPT TO:<user{i}@fabrikam.com>\r\n"));
    }
    smtp.send_raw(batch.as_bytes()).await;
    for i in 0..501 {
        let reply = smtp.reply().await.unwrap();
        if i < 500 {
            assert_eq!(reply.code, 250);
        } else {
            assert_eq!(reply.text(), "452 4.5.3 Too many recipients");
        }
    }
    assert_eq!(smtp.cmd("RSET").await.code, 250);
    assert_eq!(smtp.cmd("DATA").await.code, 554);
}

#[tokio::test]
async fn counts_sessions_and_concurrency() {
    let (_idp, server) = kit().await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(Smtp::connect(server.port()).await.0);
    }
    assert_eq!(server.sessions(), 3);
    assert_eq!(server.max_concurrent(), 3);
    for mut smtp in clients {
        assert_eq!(smtp.cmd("QUIT").await.code, 221);
        assert!(smtp.closed().await);
    }
    let (mut smtp, _) = Smtp::connect(server.port()).await;
    assert_eq!(smtp.cmd("QUIT").await.code, 221);
    assert_eq!(server.sessions(), 4);
    assert_eq!(server.max_concurrent(), 3);
}

#[tokio::test]
async fn wait_for_messages_is_bounded() {
    let (_idp, server) = kit().await;
    let started = std::time::Instant::now();
    let messages = server
        .wait_for_messages(1, Duration::from_millis(100))
        .await;
    assert!(messages.is_empty());
    assert!(started.elapsed() < STEP);
}

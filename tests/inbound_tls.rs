//! The listener's TLS through the relay binary: a renewed certificate is
//! served after SIGHUP, with no restart; local logins end to end.

mod common;
mod inbound_support;

use common::*;
use inbound_support::*;
use std::{process::Command, time::Duration};

/// STARTTLS with Python's ssl module trusting only `cafile`: whether the
/// handshake (certificate check included) succeeds.
fn starttls_trusting(port: u16, cafile: &std::path::Path) -> bool {
    let script = r#"
import smtplib, ssl, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=20)
s.starttls(context=ssl.create_default_context(cafile=sys.argv[2]))
s.quit()
"#;
    Command::new("python3")
        .args(["-c", script, &port.to_string()])
        .arg(cafile)
        .output()
        .expect("python3")
        .status
        .success()
}

#[tokio::test]
async fn a_renewed_certificate_is_served_after_sighup() {
    let inbound = Inbound::start().await;
    let old = inbound.world.dir.path().join("old.pem");
    std::fs::copy(&inbound.cert, &old).expect("keep the old certificate");
    let port = inbound.port;
    let check =
        |ca: std::path::PathBuf| tokio::task::spawn_blocking(move || starttls_trusting(port, &ca));
    assert!(
        check(old.clone()).await.expect("thread"),
        "old certificate served at start"
    );
    // renewed in place, then SIGHUP
    write_cert(&inbound.cert, &inbound.key);
    inbound.relay.signal("HUP");
    eventually(15, "the reload", || {
        inbound.relay.log().contains("configuration reloaded")
    })
    .await;
    assert!(
        check(inbound.cert.clone()).await.expect("thread"),
        "new certificate served after SIGHUP; log:\n{}",
        inbound.relay.log()
    );
    assert!(
        !check(old).await.expect("thread"),
        "old certificate still served"
    );
    // a broken certificate on reload keeps the running one
    std::fs::write(&inbound.cert, "not a certificate").expect("break it");
    inbound.relay.signal("HUP");
    eventually(15, "the refused reload", || {
        inbound.relay.log().contains("reload refused")
    })
    .await;
    let (mut c, greeting) = Client::connect(inbound.port).await;
    assert!(greeting.starts_with("220"), "{greeting}");
    assert!(c.send(b"EHLO x\r\n").await.contains("250-STARTTLS"));
}

/// The local login is checked by the relay and goes no further: upstream
/// sees the relay's own XOAUTH2 login only.
#[tokio::test]
async fn local_logins_never_go_upstream() {
    let inbound = Inbound::start_with("", "messages_per_minute = 6000").await;
    let (mut c, _) = Client::connect(inbound.port).await;
    assert!(c
        .send(b"EHLO app\r\n")
        .await
        .contains("250-AUTH PLAIN LOGIN"));
    use base64::Engine as _;
    let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0{USER}\0{PASSWORD}"));
    assert_eq!(
        c.send(format!("AUTH PLAIN {plain}\r\n").as_bytes()).await,
        "235 2.7.0 Authentication successful"
    );
    let reply = c
        .mail(MAILBOX, &[RCPT], client_message("local login").as_bytes())
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    inbound.expect_delivered(&["local login".to_owned()]).await;
    let auths = inbound.world.upstream.messages();
    assert!(auths
        .iter()
        .all(|m| m.auth_user == MAILBOX && !m.auth_user.contains(USER)));
    assert!(!inbound.relay.log().contains(PASSWORD));
    tokio::time::sleep(Duration::from_millis(10)).await;
}

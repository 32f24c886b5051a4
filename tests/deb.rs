//! The installed Debian package end to end: `/usr/bin/smtp-oauth-relay run`
//! with the installed `/etc/smtp-oauth-relay/config.toml`, pointed at the
//! stand-in Microsoft 365 by environment overrides only, and a message
//! submitted with `sendmail -t` through the installed binary.
//!
//! Ignored by `cargo test`: `deploy/debian/roundtrip.sh` runs it between
//! `dpkg -i` and `dpkg --purge` (`cargo test --test deb -- --ignored`).

mod common;

use common::{free_port, World, MAILBOX};
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

const INSTALLED: &str = "/usr/bin/smtp-oauth-relay";
const CONFIG: &str = "/etc/smtp-oauth-relay/config.toml";

/// A `sendmail` that runs the installed binary: /usr/sbin/sendmail when the
/// package's alternative holds it, else the alternative's own link (another
/// MTA keeps /usr/sbin/sendmail), else a symlink made here.
fn installed_sendmail(dir: &Path) -> PathBuf {
    let installed = Path::new(INSTALLED);
    for candidate in ["/usr/sbin/sendmail", "/etc/alternatives/sendmail"] {
        if std::fs::canonicalize(candidate).is_ok_and(|target| target == installed) {
            return PathBuf::from(candidate);
        }
    }
    let link = dir.join("sendmail");
    std::os::unix::fs::symlink(installed, &link).expect("symlink");
    link
}

#[tokio::test]
#[ignore = "needs the package installed: deploy/debian/roundtrip.sh runs it"]
async fn installed_package_relays_sendmail_to_the_stand_in() {
    let world = World::start().await;
    let port = free_port();
    let dir = world.dir.path();
    let bind = format!("127.0.0.1:{port}");
    let overrides = [
        ("SMTP_OAUTH_RELAY__LISTENER__BIND", bind.clone()),
        ("SMTP_OAUTH_RELAY__ADMIN__BIND", "127.0.0.1:0".to_owned()),
        (
            "SMTP_OAUTH_RELAY__QUEUE__DIR",
            dir.join("queue").display().to_string(),
        ),
        ("SMTP_OAUTH_RELAY__UPSTREAM__HOST", "localhost".to_owned()),
        (
            "SMTP_OAUTH_RELAY__UPSTREAM__PORT",
            world.upstream.port().to_string(),
        ),
        (
            "SMTP_OAUTH_RELAY__UPSTREAM__CA_FILE",
            dir.join("ca.pem").display().to_string(),
        ),
        ("SMTP_OAUTH_RELAY__ACCOUNTS__0__MAILBOX", MAILBOX.to_owned()),
        (
            "SMTP_OAUTH_RELAY__ACCOUNTS__0__OAUTH__AUTHORITY",
            world.idp.authority(),
        ),
        (
            "SMTP_OAUTH_RELAY__ACCOUNTS__0__OAUTH__TENANT_ID",
            world.idp.tenant().to_owned(),
        ),
        (
            "SMTP_OAUTH_RELAY__ACCOUNTS__0__OAUTH__CLIENT_ID",
            world.idp.client_id().to_owned(),
        ),
        (
            "SMTP_OAUTH_RELAY__ACCOUNTS__0__OAUTH__CLIENT_SECRET_FILE",
            dir.join("secret").display().to_string(),
        ),
    ];
    let log = std::fs::File::create(dir.join("relay.log")).expect("log");
    let mut relay = Command::new(INSTALLED)
        .args(["run", "--config", CONFIG])
        .envs(overrides.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start the installed relay");
    let log = || std::fs::read_to_string(dir.join("relay.log")).unwrap_or_default();
    let mut listening = false;
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(&bind).await.is_ok() {
            listening = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !listening {
        let _ = relay.kill();
        panic!("the installed relay did not listen\n{}", log());
    }

    let sendmail = installed_sendmail(dir);
    eprintln!("sendmail: {}", sendmail.display());
    let message = dir.join("message.txt");
    std::fs::write(
        &message,
        "To: admin@example.com\nSubject: from the package\n\nInstalled and relayed.\n",
    )
    .expect("message");
    let out = Command::new(&sendmail)
        .arg("-t")
        // only where the relay listens; the sender is the config's mailbox
        .env("SMTP_OAUTH_RELAY__LISTENER__BIND", &bind)
        .stdin(std::fs::File::open(&message).expect("message"))
        .output()
        .expect("run sendmail");
    let got = world
        .upstream
        .wait_for_messages(1, Duration::from_secs(20))
        .await;
    let _ = relay.kill();
    let _ = relay.wait();
    assert!(
        out.status.success(),
        "sendmail: {:?} {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        log()
    );
    assert_eq!(got.len(), 1, "{}", log());
    assert_eq!(got[0].mail_from, MAILBOX);
    assert_eq!(got[0].rcpt_to, ["admin@example.com"]);
    assert!(got[0].text().contains("Subject: from the package\r\n"));
}

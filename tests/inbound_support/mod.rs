//! Shared by the inbound end-to-end tests (`interop`, `inbound_*`): the real
//! binary with a listener certificate, local users, and an implicit-TLS port,
//! in front of the test kit's stand-in Microsoft 365.

#![allow(dead_code)] // each test binary uses a different part

use crate::common::*;
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

pub const USER: &str = "scanner";
pub const PASSWORD: &str = "Sc4nner-pa55";
pub const RCPT: &str = "alice@example.com";

/// A relay with STARTTLS, implicit TLS and `auth = "optional"`.
pub struct Inbound {
    pub world: World,
    pub relay: Relay,
    pub port: u16,
    pub tls_port: u16,
    /// The listener's certificate (self-signed), for clients to trust.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Writes a fresh self-signed certificate for `localhost`/`127.0.0.1`.
pub fn write_cert(cert: &Path, key: &Path) -> String {
    let generated =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("certificate");
    std::fs::write(cert, generated.cert.pem()).expect("write certificate");
    std::fs::write(key, generated.signing_key.serialize_pem()).expect("write key");
    generated.cert.pem()
}

/// `smtp-oauth-relay hash-password`, fed `password` on stdin.
pub fn hash_password(password: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run hash-password");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("write the password");
    let out = child.wait_with_output().expect("hash-password output");
    assert!(
        out.status.success(),
        "hash-password: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let phc = String::from_utf8(out.stdout)
        .expect("UTF-8")
        .trim()
        .to_owned();
    assert!(phc.starts_with("$argon2id$"), "{phc}");
    phc
}

impl Inbound {
    /// `extra` is added to `[listener]`; `upstream` to `[upstream]`.
    pub async fn start_with(extra: &str, upstream: &str) -> Inbound {
        let world = World::start().await;
        let (port, tls_port) = (free_port(), free_port());
        let cert = world.dir.path().join("listener.pem");
        let key = world.dir.path().join("listener.key");
        write_cert(&cert, &key);
        let listener = format!(
            "hostname = \"relay.test\"\n\
             implicit_tls_bind = [\"127.0.0.1:{tls_port}\"]\n\
             tls_certificate = \"{}\"\n\
             tls_private_key = \"{}\"\n\
             auth = \"optional\"\n\
             {extra}\n\
             [[listener.users]]\n\
             username = \"{USER}\"\n\
             password_hash = \"{}\"\n",
            cert.display(),
            key.display(),
            hash_password(PASSWORD),
        );
        let config = world
            .config(port)
            .replacen("hostname = \"relay.test\"\n", &listener, 1)
            .replacen("[upstream]\n", &format!("[upstream]\n{upstream}\n"), 1);
        let path = world.write_config(&config);
        let check = cli(&["check"], &path);
        assert!(
            check.status.success(),
            "check: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let relay = Relay::start(&path, port).await;
        Inbound {
            world,
            relay,
            port,
            tls_port,
            cert,
            key,
        }
    }

    pub async fn start() -> Inbound {
        Inbound::start_with("", "messages_per_minute = 6000").await
    }

    /// Waits (bounded) until a message with each subject arrived, then
    /// checks each arrived exactly once, from `MAILBOX` to `RCPT`, sent
    /// with the relay's own XOAUTH2 login (never the local user's).
    pub async fn expect_delivered(&self, subjects: &[String]) {
        let mut missing = subjects.to_vec();
        for _ in 0..300 {
            let got = self.world.upstream.messages();
            missing.retain(|s| {
                !got.iter()
                    .any(|m| m.text().contains(&format!("Subject: {s}\r\n")))
            });
            if missing.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            missing.is_empty(),
            "not delivered: {missing:?}\nlog:\n{}",
            self.relay.log()
        );
        // room for a wrong duplicate
        tokio::time::sleep(Duration::from_millis(300)).await;
        let got = self.world.upstream.messages();
        for subject in subjects {
            let copies: Vec<_> = got
                .iter()
                .filter(|m| m.text().contains(&format!("Subject: {subject}\r\n")))
                .collect();
            assert_eq!(copies.len(), 1, "{subject}: {} copies", copies.len());
            let m = copies[0];
            assert_eq!(m.mail_from, MAILBOX, "{subject}");
            assert_eq!(m.rcpt_to, [RCPT], "{subject}");
            assert_eq!(m.auth_user, MAILBOX, "{subject}");
            assert!(!m.text().contains(PASSWORD), "{subject}");
            assert!(
                !m.data
                    .windows(2)
                    .enumerate()
                    .any(|(i, w)| w[1] == b'\n' && w[0] != b'\r' && i > 0)
                    && !m.data.starts_with(b"\n"),
                "{subject}: bare LF delivered"
            );
        }
    }
}

/// The message a client sends: CRLF line ends, a unique subject.
pub fn client_message(subject: &str) -> String {
    format!(
        "From: {MAILBOX}\r\nTo: {RCPT}\r\nSubject: {subject}\r\nMessage-ID: <{}@relay.test>\r\n\r\nHello from {subject}.\r\n",
        subject.replace(' ', "-")
    )
}

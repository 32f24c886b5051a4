//! Real SMTP clients against the relay binary, end to end to the stand-in
//! Microsoft 365: Python's smtplib, curl, swaks (with --pipeline), msmtp and
//! Node's nodemailer, each in a plain, STARTTLS, implicit-TLS and AUTH
//! session (where the client can), and a HELO-only client like an old
//! printer. A client that is not installed is skipped, unless
//! `INTEROP_REQUIRED=1` (as `.ci/run` sets after installing them all).
//!
//! Each test writes its row of the interop matrix to
//! `target/tmp/interop/CLIENT.md`; the README's table is the last run's.

mod common;
mod inbound_support;

use common::*;
use inbound_support::*;
use std::{
    io::Write,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Plain,
    StartTls,
    ImplicitTls,
    /// AUTH PLAIN or LOGIN inside STARTTLS.
    Auth,
}

const KINDS: [Kind; 4] = [Kind::Plain, Kind::StartTls, Kind::ImplicitTls, Kind::Auth];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Plain => "plain",
            Kind::StartTls => "STARTTLS",
            Kind::ImplicitTls => "implicit TLS",
            Kind::Auth => "AUTH",
        }
    }
}

/// Whether `program args` runs; if not, the test is skipped (or fails when
/// INTEROP_REQUIRED is set).
fn available(program: &str, args: &[&str]) -> bool {
    let ok = Command::new(program)
        .args(args)
        .env("NODE_PATH", node_path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("INTEROP_REQUIRED").is_none(),
            "{program} is required (INTEROP_REQUIRED) but does not run"
        );
        eprintln!("{program} is not installed: skipped");
    }
    ok
}

fn node_path() -> String {
    Command::new("npm")
        .args(["root", "-g"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Runs a client to completion (at most 60 s), feeding `stdin`.
fn run(mut cmd: Command, stdin: &[u8]) -> Result<(), String> {
    let mut child = cmd
        .env("NODE_PATH", node_path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start: {e}"))?;
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin).map_err(|e| e.to_string())?;
    drop(input);
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            let out = child.wait_with_output().map_err(|e| e.to_string())?;
            return if status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{status}\nstdout: {}\nstderr: {}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ))
            };
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            return Err("did not finish within 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends one message per session kind with `client`, checks every one
/// arrived exactly once, and records the matrix row.
async fn matrix_row(
    client: &str,
    kinds: &[Kind],
    send: impl Fn(&Inbound, Kind, &str) -> Option<Command>,
    stdin: impl Fn(&str) -> Vec<u8>,
) {
    let inbound = Inbound::start().await;
    let mut subjects = Vec::new();
    let mut row = Vec::new();
    for &kind in &KINDS {
        if !kinds.contains(&kind) {
            row.push("n/a".to_owned());
            continue;
        }
        let subject = format!("interop {client} {}", kind.name());
        let cmd = send(&inbound, kind, &subject).expect("a command for a supported kind");
        let input = stdin(&subject);
        let result = tokio::task::spawn_blocking(move || run(cmd, &input))
            .await
            .expect("client thread");
        if let Err(e) = result {
            panic!(
                "{client} {}: {e}\nrelay log:\n{}",
                kind.name(),
                inbound.relay.log()
            );
        }
        subjects.push(subject);
        row.push("pass".to_owned());
    }
    inbound.expect_delivered(&subjects).await;
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("interop");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(
        dir.join(format!("{client}.md")),
        format!("| {client} | {} |\n", row.join(" | ")),
    );
}

fn python(inbound: &Inbound, kind: Kind, _subject: &str) -> Option<Command> {
    let script = r#"
import smtplib, ssl, sys
port, tls_port, kind, cafile, user, password, sender, rcpt = sys.argv[1:9]
msg = sys.stdin.buffer.read()
ctx = ssl.create_default_context(cafile=cafile)
if kind == "implicit TLS":
    s = smtplib.SMTP_SSL("127.0.0.1", int(tls_port), context=ctx, timeout=30)
else:
    s = smtplib.SMTP("127.0.0.1", int(port), timeout=30)
s.ehlo("python.test")
if kind in ("STARTTLS", "AUTH"):
    s.starttls(context=ctx)
    s.ehlo("python.test")
if kind == "AUTH":
    s.login(user, password)
refused = s.sendmail(sender, [rcpt], msg)
assert not refused, refused
s.quit()
"#;
    let mut cmd = Command::new("python3");
    cmd.args(["-c", script])
        .arg(inbound.port.to_string())
        .arg(inbound.tls_port.to_string())
        .arg(kind.name())
        .arg(&inbound.cert)
        .args([USER, PASSWORD, MAILBOX, RCPT]);
    Some(cmd)
}

#[tokio::test]
async fn python_smtplib() {
    if !available("python3", &["-c", "import smtplib, ssl"]) {
        return;
    }
    matrix_row("Python smtplib", &KINDS, python, |s| {
        client_message(s).into_bytes()
    })
    .await;
}

fn curl(inbound: &Inbound, kind: Kind, _subject: &str) -> Option<Command> {
    let mut cmd = Command::new("curl");
    cmd.args(["--silent", "--show-error", "--max-time", "30"]);
    match kind {
        Kind::ImplicitTls => cmd.arg(format!("smtps://127.0.0.1:{}", inbound.tls_port)),
        _ => cmd.arg(format!("smtp://127.0.0.1:{}", inbound.port)),
    };
    if kind != Kind::Plain {
        cmd.arg("--cacert").arg(&inbound.cert);
    }
    if matches!(kind, Kind::StartTls | Kind::Auth) {
        cmd.arg("--ssl-reqd");
    }
    if kind == Kind::Auth {
        cmd.args(["--user", &format!("{USER}:{PASSWORD}")]);
    }
    cmd.args([
        "--mail-from",
        MAILBOX,
        "--mail-rcpt",
        RCPT,
        "--upload-file",
        "-",
    ]);
    Some(cmd)
}

#[tokio::test]
async fn curl_smtp() {
    if !available("curl", &["--version"]) {
        return;
    }
    matrix_row("curl", &KINDS, curl, |s| client_message(s).into_bytes()).await;
}

fn swaks(inbound: &Inbound, kind: Kind, subject: &str) -> Option<Command> {
    let mut cmd = Command::new("swaks");
    let port = if kind == Kind::ImplicitTls {
        inbound.tls_port
    } else {
        inbound.port
    };
    cmd.args(["--server", "127.0.0.1", "--port", &port.to_string()])
        .args(["--from", MAILBOX, "--to", RCPT, "--helo", "swaks.test"])
        .args(["--header", &format!("Subject: {subject}")])
        .args(["--body", &format!("Hello from {subject}.")])
        .args(["--timeout", "30"])
        // pipelined MAIL/RCPT/DATA, as the relay advertises PIPELINING
        .arg("--pipeline");
    match kind {
        Kind::Plain => {}
        Kind::StartTls => {
            cmd.arg("--tls");
        }
        Kind::ImplicitTls => {
            cmd.arg("--tlsc");
        }
        Kind::Auth => {
            cmd.args(["--tls", "--auth", "LOGIN"]).args([
                "--auth-user",
                USER,
                "--auth-password",
                PASSWORD,
            ]);
        }
    }
    Some(cmd)
}

#[tokio::test]
async fn swaks_with_pipelining() {
    if !available("swaks", &["--version"]) {
        return;
    }
    matrix_row("swaks --pipeline", &KINDS, swaks, |_| Vec::new()).await;
}

fn msmtp(inbound: &Inbound, kind: Kind, _subject: &str) -> Option<Command> {
    let mut cmd = Command::new("msmtp");
    let port = if kind == Kind::ImplicitTls {
        inbound.tls_port
    } else {
        inbound.port
    };
    cmd.args(["--file=/dev/null", "--host=127.0.0.1"])
        .arg(format!("--port={port}"))
        .arg(format!("--from={MAILBOX}"))
        .arg("--domain=msmtp.test")
        .arg("--timeout=30");
    match kind {
        Kind::Plain => {
            cmd.args(["--tls=off", "--auth=off"]);
        }
        Kind::StartTls | Kind::Auth => {
            cmd.args(["--tls=on", "--tls-starttls=on"])
                .arg(format!("--tls-trust-file={}", inbound.cert.display()));
        }
        Kind::ImplicitTls => {
            cmd.args(["--tls=on", "--tls-starttls=off", "--auth=off"])
                .arg(format!("--tls-trust-file={}", inbound.cert.display()));
        }
    }
    match kind {
        Kind::Auth => {
            cmd.args(["--auth=plain", &format!("--user={USER}")])
                .arg(format!("--passwordeval=echo {PASSWORD}"));
        }
        Kind::StartTls => {
            cmd.arg("--auth=off");
        }
        _ => {}
    }
    cmd.arg(RCPT);
    Some(cmd)
}

#[tokio::test]
async fn msmtp_client() {
    if !available("msmtp", &["--version"]) {
        return;
    }
    matrix_row("msmtp", &KINDS, msmtp, |s| client_message(s).into_bytes()).await;
}

fn nodemailer(inbound: &Inbound, kind: Kind, subject: &str) -> Option<Command> {
    let script = r#"
const nodemailer = require('nodemailer');
const fs = require('fs');
const [port, tlsPort, kind, cafile, user, pass, from, to, subject] = process.argv.slice(1);
const ca = [fs.readFileSync(cafile)];
const options = { host: '127.0.0.1', name: 'nodemailer.test', connectionTimeout: 30000, socketTimeout: 30000 };
if (kind === 'plain') Object.assign(options, { port: +port, secure: false, ignoreTLS: true });
if (kind === 'STARTTLS' || kind === 'AUTH') Object.assign(options, { port: +port, secure: false, requireTLS: true, tls: { ca } });
if (kind === 'implicit TLS') Object.assign(options, { port: +tlsPort, secure: true, tls: { ca } });
if (kind === 'AUTH') Object.assign(options, { auth: { user, pass }, authMethod: 'LOGIN' });
nodemailer.createTransport(options)
  .sendMail({ from, to, subject, text: `Hello from ${subject}.`, envelope: { from, to: [to] } })
  .then(info => { if (info.rejected.length) { console.error(info); process.exit(1); } })
  .catch(err => { console.error(err); process.exit(1); });
"#;
    let mut cmd = Command::new("node");
    cmd.args(["-e", script])
        .arg(inbound.port.to_string())
        .arg(inbound.tls_port.to_string())
        .arg(kind.name())
        .arg(&inbound.cert)
        .args([USER, PASSWORD, MAILBOX, RCPT, subject]);
    Some(cmd)
}

#[tokio::test]
async fn node_nodemailer() {
    if !available("node", &["-e", "require('nodemailer')"]) {
        return;
    }
    matrix_row("Node nodemailer", &KINDS, nodemailer, |_| Vec::new()).await;
}

/// An old printer or scanner: HELO only (no EHLO), no pipelining, bare LF
/// line ends in its message (normalised to CRLF; the end of data must still
/// be CRLF.CRLF), one command per packet.
#[tokio::test]
async fn helo_only_client_like_an_old_printer() {
    let inbound = Inbound::start().await;
    let (mut c, greeting) = Client::connect(inbound.port).await;
    assert!(greeting.starts_with("220 relay.test"), "{greeting}");
    assert_eq!(c.send(b"HELO PRINTER-3F\r\n").await, "250 relay.test");
    assert!(c
        .send(format!("MAIL FROM:<{MAILBOX}>\r\n").as_bytes())
        .await
        .starts_with("250"));
    assert!(c
        .send(format!("RCPT TO:<{RCPT}>\r\n").as_bytes())
        .await
        .starts_with("250"));
    assert!(c.send(b"DATA\r\n").await.starts_with("354"));
    let subject = "interop HELO-only printer plain";
    let body =
        format!("From: {MAILBOX}\nTo: {RCPT}\nSubject: {subject}\n\nScan attached.\r\n.\r\n");
    let reply = c.send(body.as_bytes()).await;
    assert!(reply.starts_with("250 2.0.0 Ok: queued as"), "{reply}");
    assert!(c.send(b"QUIT\r\n").await.starts_with("221"));
    inbound.expect_delivered(&[subject.to_owned()]).await;
    let got = inbound.world.upstream.messages();
    assert!(
        got[0].text().ends_with("\r\n\r\nScan attached.\r\n"),
        "{:?}",
        got[0].text()
    );
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("interop");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(
        dir.join("HELO-only.md"),
        "| HELO-only printer (raw socket) | pass | n/a | n/a | n/a |\n",
    );
}

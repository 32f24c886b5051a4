//! The `sendmail` entry point with the callers that use it: a cron-style
//! here-document through a `sendmail` symlink, PHP's `mail()` and
//! bsd-mailx, each against the real binary, a running relay and the
//! stand-in Microsoft 365; plus the exit codes a caller acts on.
//!
//! A missing caller (php, bsd-mailx) skips its test, or fails it when `CI`
//! or `INTEROP_REQUIRED` is set (`.ci/run` installs them).

mod common;

use common::{free_port, Relay, World, BIN, MAILBOX};
use std::{
    io::{Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// A running relay and a directory holding a `sendmail` symlink to the
/// binary, as a Debian host has `/usr/sbin/sendmail`.
struct Host {
    world: World,
    relay: Relay,
    bin_dir: PathBuf,
}

impl Host {
    async fn start() -> Host {
        let world = World::start().await;
        let port = free_port();
        let config = world.write_config(&world.config(port));
        let relay = Relay::start(&config, port).await;
        let bin_dir = world.dir.path().join("bin");
        std::fs::create_dir(&bin_dir).expect("bin dir");
        std::os::unix::fs::symlink(BIN, bin_dir.join("sendmail")).expect("sendmail symlink");
        Host {
            world,
            relay,
            bin_dir,
        }
    }

    fn sendmail(&self) -> PathBuf {
        self.bin_dir.join("sendmail")
    }

    /// `program` with the symlink first on PATH and the relay's config named
    /// the way an installed relay's callers get it.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let path = format!(
            "{}:{}",
            self.bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new(program);
        cmd.env("PATH", path)
            .env("SMTP_OAUTH_RELAY_CONFIG", &self.relay.config)
            .env("HOME", self.world.dir.path());
        cmd
    }

    /// The one message the stand-in received, asserting there is exactly one.
    async fn only_message(&self) -> relay_testkit::ReceivedMessage {
        let mut got = self.relay.delivered(&self.world, 1).await;
        got.remove(0)
    }
}

/// Runs `cmd` with `stdin` as its standard input (a file, so a caller that
/// exits without reading it, as on a bad flag, is no broken pipe).
fn run(mut cmd: Command, stdin: &[u8]) -> Output {
    let mut file = tempfile::tempfile().expect("stdin file");
    file.write_all(stdin).expect("write stdin");
    file.seek(SeekFrom::Start(0)).expect("rewind stdin");
    cmd.stdin(file).output().expect("run")
}

fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether `program` is installed; if not, the test is skipped, or fails
/// when CI or INTEROP_REQUIRED is set.
fn caller(program: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()));
    if !found {
        assert!(
            std::env::var_os("CI").is_none() && std::env::var_os("INTEROP_REQUIRED").is_none(),
            "{program} is required (CI) but not installed: apt-get install php-cli bsd-mailx"
        );
        eprintln!("{program} is not installed: skipped");
    }
    found
}

fn header<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    head.split("\r\n").find_map(|line| {
        let (field, value) = line.split_once(':')?;
        field.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

#[tokio::test]
async fn cron_style_here_document_through_a_sendmail_symlink() {
    let host = Host::start().await;
    // what cron runs for MAILTO, as a shell script would write it
    let script = "sendmail -t -i <<'EOF'\n\
        To: ops@example.com\n\
        Cc: Backup Team <backup@example.com>\n\
        Bcc: audit@example.com\n\
        Subject: Cron <root@host> nightly-backup\n\
        \n\
        Grüße from cron: 8-bit text.\n\
        .\n\
        ..a line that starts with two dots\n\
        last line\n\
        EOF\n";
    let mut cmd = host.command("sh");
    cmd.args(["-c", script]);
    let out = run(cmd, b"");
    assert_success(&out, "sendmail -t -i");
    let got = host.only_message().await;
    assert_eq!(got.mail_from, MAILBOX);
    assert_eq!(
        got.rcpt_to,
        ["ops@example.com", "backup@example.com", "audit@example.com"]
    );
    let text = got.text();
    assert!(!text.contains("audit@"), "Bcc left in the message:\n{text}");
    assert_eq!(header(&text, "From"), Some(MAILBOX));
    assert!(header(&text, "Date").is_some() && header(&text, "Message-ID").is_some());
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    assert_eq!(
        body,
        "Grüße from cron: 8-bit text.\r\n.\r\n..a line that starts with two dots\r\nlast line\r\n"
    );
}

#[tokio::test]
async fn without_i_a_lone_dot_ends_the_message() {
    let host = Host::start().await;
    let mut cmd = host.command(host.sendmail());
    cmd.arg("ops@example.com");
    let out = run(cmd, b"Subject: dot\n\nkept\n.\nnot sent\n");
    assert_success(&out, "sendmail RECIPIENT");
    let got = host.only_message().await;
    assert_eq!(got.rcpt_to, ["ops@example.com"]);
    assert!(got.text().ends_with("\r\n\r\nkept\r\n"), "{}", got.text());
}

#[tokio::test]
async fn php_mail_through_sendmail_path() {
    if !caller("php") {
        return;
    }
    let host = Host::start().await;
    let mut cmd = host.command("php");
    cmd.arg("-d")
        .arg(format!("sendmail_path={} -t -i", host.sendmail().display()))
        .arg("-r")
        .arg(format!(
            "var_export(mail('web@example.com', 'Order 42', \"Thank you.\\n.\\nBye\", 'From: Shop <{MAILBOX}>'));"
        ));
    let out = run(cmd, b"");
    assert_success(&out, "php");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "true");
    let got = host.only_message().await;
    assert_eq!(got.mail_from, MAILBOX);
    assert_eq!(got.rcpt_to, ["web@example.com"]);
    let text = got.text();
    assert_eq!(header(&text, "Subject"), Some("Order 42"));
    assert_eq!(
        header(&text, "From"),
        Some(format!("Shop <{MAILBOX}>").as_str())
    );
    assert!(
        text.ends_with("\r\n\r\nThank you.\r\n.\r\nBye\r\n"),
        "{text}"
    );
}

#[tokio::test]
async fn bsd_mailx_with_its_sendmail_variable() {
    if !caller("bsd-mailx") {
        return;
    }
    let host = Host::start().await;
    let mailrc = host.world.dir.path().join("mailrc");
    std::fs::write(
        &mailrc,
        format!("set sendmail={}\n", host.sendmail().display()),
    )
    .expect("mailrc");
    let mut cmd = host.command("bsd-mailx");
    cmd.env("MAILRC", &mailrc)
        .args(["-s", "Disk almost full", "-c", "cc@example.com"])
        .arg("admin@example.com");
    let out = run(cmd, b"/var is at 93%.\n");
    assert_success(&out, "bsd-mailx");
    let got = host.only_message().await;
    assert_eq!(got.mail_from, MAILBOX);
    let mut rcpt = got.rcpt_to.clone();
    rcpt.sort();
    assert_eq!(rcpt, ["admin@example.com", "cc@example.com"]);
    let text = got.text();
    assert_eq!(header(&text, "Subject"), Some("Disk almost full"));
    assert!(text.ends_with("\r\n\r\n/var is at 93%.\r\n"), "{text}");
}

fn exit_code(out: &Output) -> Option<i32> {
    out.status.code()
}

/// A relay configuration naming a port nobody listens on.
fn config_without_relay(dir: &Path) -> PathBuf {
    let path = dir.join("down.toml");
    std::fs::write(
        &path,
        format!(
            "[listener]\nbind = [\"127.0.0.1:{}\"]\n[[accounts]]\nname = \"a\"\nmailbox = \"{MAILBOX}\"\n\
             [accounts.oauth]\nflow = \"client_credentials\"\ntenant_id = \"contoso.onmicrosoft.com\"\n\
             client_id = \"11111111-2222-3333-4444-555555555555\"\n\
             client_secret_file = \"${{CREDENTIALS_DIRECTORY}}/client-secret\"\n",
            free_port()
        ),
    )
    .expect("config");
    path
}

#[test]
fn relay_down_is_a_temporary_failure() {
    let dir = tempfile::tempdir().expect("dir");
    let mut cmd = Command::new(BIN);
    cmd.args(["sendmail", "-C"])
        .arg(config_without_relay(dir.path()))
        .args(["-t", "-i"]);
    let out = run(cmd, b"To: a@example.com\nSubject: s\n\nbody\n");
    assert_eq!(exit_code(&out), Some(75), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is smtp-oauth-relay running?"), "{stderr}");
}

#[test]
fn bad_flags_and_missing_recipients_are_usage_errors() {
    let dir = tempfile::tempdir().expect("dir");
    let config = config_without_relay(dir.path());
    for args in [&["-q"][..], &["-bs"], &["-t"]] {
        let mut cmd = Command::new(BIN);
        cmd.arg("--config").arg(&config).arg("sendmail").args(args);
        let out = run(cmd, b"Subject: no recipients\n\nbody\n");
        assert_eq!(exit_code(&out), Some(64), "{args:?}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("sendmail: "));
    }
}

#[tokio::test]
async fn a_refused_recipient_sends_nothing() {
    let host = Host::start().await;
    let mut cmd = host.command(host.sendmail());
    cmd.args(["ops@example.com", "root"]);
    let out = run(cmd, b"Subject: local name\n\nbody\n");
    assert_eq!(exit_code(&out), Some(67), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("<root>") && stderr.contains("MAILTO="),
        "{stderr}"
    );
    let mut cmd = host.command(host.sendmail());
    cmd.arg("ops@example.com");
    let out = run(cmd, b"Subject: after\n\nbody\n");
    assert_success(&out, "sendmail");
    let got = host.only_message().await;
    assert_eq!(header(&got.text(), "Subject"), Some("after"));
}

#[tokio::test]
async fn the_relays_environment_overrides_name_the_listener() {
    let host = Host::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let mut cmd = host.command(host.sendmail());
    cmd.env("SMTP_OAUTH_RELAY_CONFIG", config_without_relay(dir.path()))
        .env(
            "SMTP_OAUTH_RELAY__LISTENER__BIND",
            format!("127.0.0.1:{}", host.relay.port),
        )
        .arg("ops@example.com");
    let out = run(cmd, b"Subject: overridden\n\nbody\n");
    assert_success(&out, "sendmail with SMTP_OAUTH_RELAY__LISTENER__BIND");
    let got = host.only_message().await;
    assert_eq!(header(&got.text(), "Subject"), Some("overridden"));
}

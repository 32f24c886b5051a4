//! End-to-end harness: the real `smtp-oauth-relay` binary, the test kit's
//! stand-in Microsoft 365 in this process, and a raw SMTP client.

#![allow(dead_code)] // each test binary uses a different part

use relay_testkit::{IdentityPlatform, ReceivedMessage, RelayConfig, Section, SubmissionServer};
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

pub const BIN: &str = env!("CARGO_BIN_EXE_smtp-oauth-relay");
pub const MAILBOX: &str = "relay@contoso.com";

pub fn install_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The stand-in identity platform and submission server.
pub struct World {
    pub idp: IdentityPlatform,
    pub upstream: SubmissionServer,
    pub dir: tempfile::TempDir,
}

impl World {
    pub async fn start() -> World {
        install_crypto();
        let idp = IdentityPlatform::start().await.expect("identity platform");
        let upstream = SubmissionServer::start(idp.clone())
            .await
            .expect("submission server");
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("ca.pem"), upstream.ca_pem()).expect("ca file");
        std::fs::write(
            dir.path().join("secret"),
            format!("{}\n", idp.client_secret()),
        )
        .expect("secret");
        World { idp, upstream, dir }
    }

    /// A relay configuration for this world, listening on `port`.
    pub fn config(&self, port: u16) -> String {
        RelayConfig::new(&self.idp, &self.upstream, self.dir.path())
            .listener(format!("127.0.0.1:{port}"), "relay.test")
            .client_secret_file(self.dir.path().join("secret"))
            .admin("127.0.0.1:0")
            .extra(
                Section::Queue,
                "retry_initial = \"300ms\"\nretry_max = \"1s\"\n",
            )
            .to_toml()
    }

    pub fn write_config(&self, text: &str) -> PathBuf {
        let path = self.dir.path().join("relay.toml");
        std::fs::write(&path, text).expect("config file");
        path
    }
}

/// Whether the server on `stream` greets (any first byte) before `until`.
async fn greeted(mut stream: TcpStream, until: tokio::time::Instant) -> bool {
    let mut first = [0u8; 1];
    matches!(
        tokio::time::timeout_at(until, stream.read(&mut first)).await,
        Ok(Ok(1))
    )
}

/// A port for a relay, which stays free until it binds it, and across its
/// restarts.
pub fn free_port() -> u16 {
    relay_testkit::reserved_port().expect("free port")
}

/// A running `smtp-oauth-relay run`; killed when dropped.
pub struct Relay {
    pub child: Child,
    pub port: u16,
    pub config: PathBuf,
}

impl Relay {
    /// Starts `run`; its log is appended to `relay.log` beside the config.
    pub async fn start(config: &Path, port: u16) -> Relay {
        Relay::start_with_env(config, port, &[]).await
    }

    /// [`Relay::start`] with extra environment variables.
    pub async fn start_with_env(config: &Path, port: u16, env: &[(&str, &str)]) -> Relay {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(config.with_file_name("relay.log"))
            .expect("log file");
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the relay");
        let mut relay = Relay {
            child,
            port,
            config: config.to_owned(),
        };
        // Its sockets are bound before the queue is open; a greeting comes
        // once it serves (its queue open, or its database found unreachable).
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::time::Instant::now() < until {
            if let Ok(stream) = TcpStream::connect(("127.0.0.1", port)).await {
                if greeted(stream, until).await {
                    return relay;
                }
            }
            if let Ok(Some(status)) = relay.child.try_wait() {
                panic!("relay exited at start: {status}\n{}", relay.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        relay.kill9();
        panic!("relay did not greet within 30 s\n{}", relay.log());
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    /// Sends `signal` (e.g. "HUP") to the relay.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status();
    }

    /// SIGTERM, then the exit status (bounded wait).
    pub async fn terminate(&mut self) -> Option<i32> {
        self.signal("TERM");
        for _ in 0..300 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Waits (20 s at most) until the stand-in has `n` messages and asserts
    /// it has exactly that many, showing the relay's log if not.
    pub async fn delivered(&self, world: &World, n: usize) -> Vec<ReceivedMessage> {
        let got = world
            .upstream
            .wait_for_messages(n, Duration::from_secs(20))
            .await;
        assert_eq!(got.len(), n, "log:\n{}", self.log());
        got
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.config.with_file_name("relay.log")).unwrap_or_default()
    }

    pub fn queue_json(&self) -> Vec<serde_json::Value> {
        let out = cli(&["queue", "list", "--json"], &self.config);
        assert!(
            out.status.success(),
            "queue list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("queue list --json prints JSON")
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn cli(args: &[&str], config: &Path) -> Output {
    output_within(
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null()),
        CLI_LIMIT,
    )
}

/// [`cli`] with environment variables `env` set, and `CREDENTIALS_DIRECTORY`
/// unset unless `env` sets it (an admin's shell, not the service's).
pub fn cli_env<K: AsRef<std::ffi::OsStr>, V: AsRef<std::ffi::OsStr>>(
    args: &[&str],
    config: &Path,
    env: &[(K, V)],
) -> Output {
    output_within(
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(config)
            .env_remove("CREDENTIALS_DIRECTORY")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null()),
        CLI_LIMIT,
    )
}

/// How long one of the binary's verbs may run in a test (`doctor` and
/// `send-test` wait for stand-ins; none should come near this).
pub const CLI_LIMIT: Duration = Duration::from_secs(120);

/// Runs `command` to the end and collects its output, as
/// [`Command::output`] does, but kills it and panics after `limit`, so
/// that a verb that hangs fails its test instead of stalling the run.
pub fn output_within(command: &mut Command, limit: Duration) -> Output {
    use std::io::Read;
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the binary");
    // Read both pipes beside the wait: a child blocked on a full pipe
    // would never end.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the binary") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// A minimal SMTP client that asserts nothing: it returns each reply.
pub struct Client {
    stream: TcpStream,
    pending: Vec<u8>,
}

impl Client {
    pub async fn connect(port: u16) -> (Client, String) {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let mut client = Client {
            stream,
            pending: Vec::new(),
        };
        let greeting = client.reply().await;
        (client, greeting)
    }

    pub async fn send(&mut self, bytes: &[u8]) -> String {
        self.stream.write_all(bytes).await.expect("write");
        self.reply().await
    }

    /// Writes `bytes` without waiting for a reply (part of a message).
    pub async fn write_part(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// One complete reply (all its lines), without the final CRLF.
    pub async fn reply(&mut self) -> String {
        let read = async {
            let mut lines = Vec::new();
            loop {
                while let Some(end) = self.pending.windows(2).position(|w| w == b"\r\n") {
                    let line: Vec<u8> = self.pending.drain(..end + 2).collect();
                    let line = String::from_utf8_lossy(&line[..end]).into_owned();
                    let last = line.as_bytes().get(3) != Some(&b'-');
                    lines.push(line);
                    if last {
                        return lines.join("\r\n");
                    }
                }
                let mut buf = [0u8; 4096];
                let n = self.stream.read(&mut buf).await.expect("read");
                if n == 0 {
                    return format!("{}<closed>", lines.join("\r\n"));
                }
                self.pending.extend_from_slice(&buf[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(20), read)
            .await
            .expect("reply in time")
    }

    /// A whole transaction; returns the reply to the end of data.
    pub async fn mail(&mut self, from: &str, to: &[&str], stuffed_body: &[u8]) -> String {
        assert!(self
            .send(format!("MAIL FROM:<{from}>\r\n").as_bytes())
            .await
            .starts_with("250"));
        for rcpt in to {
            assert!(self
                .send(format!("RCPT TO:<{rcpt}>\r\n").as_bytes())
                .await
                .starts_with("250"));
        }
        assert!(self.send(b"DATA\r\n").await.starts_with("354"));
        let mut data = stuffed_body.to_vec();
        data.extend_from_slice(b".\r\n");
        self.send(&data).await
    }
}

/// Sends one message in its own session.
pub async fn send_one(port: u16, from: &str, to: &[&str], body: &[u8]) -> String {
    let (mut c, _) = Client::connect(port).await;
    assert!(c.send(b"EHLO app.test\r\n").await.starts_with("250"));
    let reply = c.mail(from, to, body).await;
    c.send(b"QUIT\r\n").await;
    reply
}

/// Sends [`message`]`(subject)` to alice@example.com in its own session
/// and asserts the relay accepted it.
pub async fn send_accepted(relay: &Relay, subject: &str) {
    let reply = send_one(
        relay.port,
        MAILBOX,
        &["alice@example.com"],
        &message(subject),
    )
    .await;
    assert!(reply.starts_with("250"), "{reply}\nlog:\n{}", relay.log());
}

pub fn message(subject: &str) -> Vec<u8> {
    format!("From: {MAILBOX}\r\nTo: alice@example.com\r\nSubject: {subject}\r\n\r\nHello.\r\n")
        .into_bytes()
}

/// Polls `check` every 100 ms for at most `secs` seconds.
pub async fn eventually(secs: u64, what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..secs * 10 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after {secs} s waiting for {what}");
}

/// `log` without ANSI colour sequences, so fields read `key=value`.
pub fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, ended by a letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl World {
    /// [`World::config`] with the admin endpoint on `admin`.
    pub fn config_with_admin(&self, port: u16, admin: u16) -> String {
        self.config(port).replace(
            "bind = \"127.0.0.1:0\"",
            &format!("bind = \"127.0.0.1:{admin}\""),
        )
    }
}

impl Relay {
    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process's peak resident memory (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }
}

/// GET `url` (5 s at most): the status, or `None` when nothing answered.
pub async fn http_status(url: &str) -> Option<u16> {
    reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

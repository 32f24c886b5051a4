//! The load generator: a small SMTP client (plain, or STARTTLS + XOAUTH2, or
//! AUTH PLAIN for a proxy) and the driver that runs N of them at once.

use base64::Engine as _;
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

/// Longest a single reply may take before the client gives up (bounds every
/// wait, so a stuck peer cannot hang the run).
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// How a client opens its session before sending mail.
#[derive(Clone)]
pub enum Login {
    /// EHLO only (the relay, Postfix).
    Plain,
    /// EHLO, STARTTLS, EHLO, AUTH XOAUTH2 (directly to the submission server).
    Xoauth2 {
        tls: TlsConnector,
        user: String,
        token: String,
    },
    /// EHLO, AUTH PLAIN with local credentials (email-oauth2-proxy).
    AuthPlain { user: String, password: String },
}

/// A TLS connector trusting only `ca_pem`.
pub fn connector(ca_pem: &str) -> anyhow::Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// One SMTP client connection.
pub struct Client {
    io: BufReader<Box<dyn Io>>,
    line: String,
}

impl Client {
    /// Connects and reads the greeting.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Client> {
        let stream = tokio::time::timeout(REPLY_TIMEOUT, TcpStream::connect(addr)).await??;
        stream.set_nodelay(true)?;
        let mut client = Client {
            io: BufReader::new(Box::new(stream)),
            line: String::new(),
        };
        client.expect("greeting", '2').await?;
        Ok(client)
    }

    /// Connects and logs in as `login` says.
    /// `gate`, if any, is held while connecting (until the greeting).
    pub async fn open(
        addr: SocketAddr,
        login: &Login,
        gate: Option<&tokio::sync::Semaphore>,
    ) -> anyhow::Result<Client> {
        let permit = match gate {
            Some(g) => Some(g.acquire().await?),
            None => None,
        };
        let mut client = Client::connect(addr).await?;
        drop(permit);
        client.command("EHLO bench.local\r\n", '2').await?;
        match login {
            Login::Plain => {}
            Login::Xoauth2 { tls, user, token } => {
                client.command("STARTTLS\r\n", '2').await?;
                let Client { io, .. } = client;
                let plain = io.into_inner();
                let name = ServerName::try_from("localhost")?;
                let stream = tls.connect(name, plain).await?;
                client = Client {
                    io: BufReader::new(Box::new(stream)),
                    line: String::new(),
                };
                client.command("EHLO bench.local\r\n", '2').await?;
                let sasl = base64::engine::general_purpose::STANDARD
                    .encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"));
                client
                    .command(&format!("AUTH XOAUTH2 {sasl}\r\n"), '2')
                    .await?;
            }
            Login::AuthPlain { user, password } => {
                let sasl = base64::engine::general_purpose::STANDARD
                    .encode(format!("\0{user}\0{password}"));
                client
                    .command(&format!("AUTH PLAIN {sasl}\r\n"), '2')
                    .await?;
            }
        }
        Ok(client)
    }

    /// Sends one message; returns the time from the end of data (the `.`
    /// line written) to the `250`.
    pub async fn send(&mut self, from: &str, to: &str, wire: &[u8]) -> anyhow::Result<Duration> {
        self.start_message(from, to, wire).await?;
        self.end_message(&[]).await
    }

    /// Starts a message and writes `part` of it, leaving it in progress.
    pub async fn start_message(&mut self, from: &str, to: &str, part: &[u8]) -> anyhow::Result<()> {
        self.command(&format!("MAIL FROM:<{from}>\r\n"), '2')
            .await?;
        self.command(&format!("RCPT TO:<{to}>\r\n"), '2').await?;
        self.command("DATA\r\n", '3').await?;
        let writer = self.io.get_mut();
        writer.write_all(part).await?;
        writer.flush().await?;
        Ok(())
    }

    /// Writes the `rest` of a message in progress and its end; returns the
    /// time from the end of data (the `.` line written) to the `250`.
    pub async fn end_message(&mut self, rest: &[u8]) -> anyhow::Result<Duration> {
        let writer = self.io.get_mut();
        writer.write_all(rest).await?;
        writer.write_all(b".\r\n").await?;
        writer.flush().await?;
        let end = Instant::now();
        self.expect("end of data", '2').await?;
        Ok(end.elapsed())
    }

    pub async fn quit(mut self) {
        let _ = self.command("QUIT\r\n", '2').await;
    }

    async fn command(&mut self, text: &str, class: char) -> anyhow::Result<()> {
        let writer = self.io.get_mut();
        writer.write_all(text.as_bytes()).await?;
        writer.flush().await?;
        let what = text.split_whitespace().next().unwrap_or("").to_owned();
        self.expect(&what, class).await
    }

    /// Reads one (possibly multi-line) reply and checks its first digit.
    async fn expect(&mut self, what: &str, class: char) -> anyhow::Result<()> {
        loop {
            self.line.clear();
            let n = tokio::time::timeout(REPLY_TIMEOUT, self.io.read_line(&mut self.line))
                .await
                .map_err(|_| anyhow::anyhow!("no reply to {what} within {REPLY_TIMEOUT:?}"))??;
            if n == 0 {
                anyhow::bail!("connection closed waiting for the reply to {what}");
            }
            if self.line.as_bytes().get(3) == Some(&b'-') {
                continue;
            }
            if !self.line.starts_with(class) {
                anyhow::bail!("{what}: {}", self.line.trim_end());
            }
            return Ok(());
        }
    }
}

/// A message of about `size` bytes as it goes on the wire after DATA
/// (lines of 78 characters, none starting with a dot; ends in CRLF, without
/// the terminating `.` line).
pub fn message(size: usize, from: &str, to: &str) -> Vec<u8> {
    let mut out = format!(
        "From: Bench <{from}>\r\nTo: <{to}>\r\nSubject: benchmark message of {size} bytes\r\nMessage-ID: <bench-{size}@bench.local>\r\n\r\n"
    )
    .into_bytes();
    let line: Vec<u8> = (0..76u8)
        .map(|i| {
            b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"[(i % 62) as usize]
        })
        .chain(*b"\r\n")
        .collect();
    while out.len() + line.len() <= size {
        out.extend_from_slice(&line);
    }
    let rest = size.saturating_sub(out.len());
    if rest >= 3 {
        out.extend(std::iter::repeat_n(b'z', rest - 2));
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// What one load run measured.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    pub messages: usize,
    pub failed: usize,
    pub elapsed: Duration,
    /// End of data → 250, every message.
    pub latencies: Vec<Duration>,
    pub first_error: Option<String>,
}

impl LoadResult {
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    }
}

/// How a load run is bounded.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub clients: usize,
    /// Each client stops after this many messages…
    pub per_client: usize,
    /// …or when this much time has passed since the start (whichever first;
    /// a message in flight is finished).
    pub duration: Duration,
    /// At most this many clients connect at once (for a peer with a short
    /// listen backlog); `None`: all at once.
    pub connect_at_once: Option<usize>,
}

/// Runs `load.clients` clients against `addr`, each on its own connection,
/// all starting together once connected. The clock runs from the start
/// signal (connections and logins already made) to the last client's last
/// reply, unless `include_login` is set (first byte → last reply).
pub async fn run(
    addr: SocketAddr,
    login: &Login,
    load: Load,
    wire: Arc<Vec<u8>>,
    from: &str,
    to: &str,
    include_login: bool,
) -> LoadResult {
    let barrier = Arc::new(tokio::sync::Barrier::new(load.clients + 1));
    let gate = load
        .connect_at_once
        .map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
    let mut tasks = tokio::task::JoinSet::new();
    let outer_start = Instant::now();
    for _ in 0..load.clients {
        let (barrier, wire, login) = (barrier.clone(), wire.clone(), login.clone());
        let gate = gate.clone();
        let (from, to) = (from.to_owned(), to.to_owned());
        tasks.spawn(async move {
            let mut result = LoadResult::default();
            let client = if include_login {
                barrier.wait().await;
                Client::open(addr, &login, gate.as_deref()).await
            } else {
                let c = Client::open(addr, &login, gate.as_deref()).await;
                barrier.wait().await;
                c
            };
            let mut client = match client {
                Ok(c) => c,
                Err(e) => {
                    // a session that could not even log in counts as one failure
                    result.failed = 1;
                    result.first_error = Some(format!("{e:#}"));
                    return result;
                }
            };
            let start = Instant::now();
            for _ in 0..load.per_client {
                if start.elapsed() >= load.duration {
                    break;
                }
                match client.send(&from, &to, &wire).await {
                    Ok(latency) => {
                        result.messages += 1;
                        result.latencies.push(latency);
                    }
                    Err(e) => {
                        result.failed += 1;
                        result.first_error.get_or_insert(format!("{e:#}"));
                        break;
                    }
                }
            }
            client.quit().await;
            result
        });
    }
    barrier.wait().await;
    let start = if include_login {
        outer_start
    } else {
        Instant::now()
    };
    let mut total = LoadResult::default();
    while let Some(joined) = tasks.join_next().await {
        let r = joined.unwrap_or_else(|e| LoadResult {
            first_error: Some(e.to_string()),
            ..LoadResult::default()
        });
        total.messages += r.messages;
        total.failed += r.failed;
        total.latencies.extend(r.latencies);
        if total.first_error.is_none() {
            total.first_error = r.first_error;
        }
    }
    total.elapsed = start.elapsed();
    total
}

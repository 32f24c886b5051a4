//! One SMTP conversation with a client.
//!
//! The session frames command lines itself (at most
//! [`MAX_COMMAND_LINE`](crate::syntax::MAX_COMMAND_LINE) octets, no CR or
//! NUL inside) and hands each complete line to smtp-proto's parser; pipelined
//! input is worked through line by line from one read buffer. After `354` the
//! bytes go to [`DataReceiver`]; after `334` to the SASL exchange.

use crate::{
    auth::{decode_line, decode_plain, Users},
    data::DataReceiver,
    intake::Intake,
    server::Shared,
    syntax::{self, DeclaredSize, MAX_COMMAND_LINE},
    tls::Conn,
    ListenerError, Router,
};
use relay_config::{ListenerAuth, ListenerConfig, Mode};
use relay_outcome::{Enhanced, Reply};
use relay_queue::{BodyWriter, NewMessage, Queue, QueueId, RecipientResult};
use smtp_proto::{Error as ParseError, Request, AUTH_LOGIN, AUTH_PLAIN, MAIL_SMTPUTF8};
use std::{borrow::Cow, net::SocketAddr, sync::Arc, time::Duration};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::Instant,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// How long a passthrough client waits for the upstream's answer.
const PASSTHROUGH_WAIT: Duration = Duration::from_secs(300);
/// A client that keeps getting errors is closed after this many.
const MAX_ERRORS: u32 = 20;
/// `RCPT`s past `max_recipients` in one transaction that are refused with
/// `452` without counting as errors (Postfix's
/// `smtpd_recipient_overshoot_limit`): a client sending too many recipients
/// keeps its session, delivers the first `max_recipients` and sends the rest
/// in a next transaction (RFC 5321 4.5.3.1.10).
const RECIPIENT_OVERSHOOT: u32 = 1000;
/// The read buffer of a session.
const READ_CHUNK: usize = 16 * 1024;
/// A message in progress larger than this is spooled to the queue's disk
/// as it arrives, so concurrent large messages cannot exhaust memory; the
/// many small ones never touch the disk before their commit.
const SPOOL_AFTER: u64 = 256 * 1024;

/// A transaction while the queue has not been opened yet.
const QUEUE_NOT_OPEN: &str =
    "451 4.3.0 Error: the queue is not open yet (its database cannot be reached), try again later";

/// A non-ASCII address in a transaction that did not ask for SMTPUTF8
/// (RFC 6531 3.5; Postfix's wording).
const UNICODE_WITHOUT_SMTPUTF8: &str = "553 5.6.7 Must declare SMTPUTF8 to send unicode address";

/// What every session needs; shared by all, replaced as a whole on reload.
pub struct Context {
    pub(crate) config: ListenerConfig,
    router: Router,
    intake: Intake,
    /// Built from `tls_certificate` / `tls_private_key`; `None` without them.
    pub(crate) tls: Option<TlsAcceptor>,
    /// `[[listener.users]]`.
    users: Users,
}

impl Context {
    /// Reads the TLS certificate and key (when configured) and the users'
    /// password hashes.
    pub fn new(
        config: ListenerConfig,
        router: Router,
        intake: impl Into<Intake>,
    ) -> Result<Context, ListenerError> {
        let tls = match (&config.tls_certificate, &config.tls_private_key) {
            (Some(cert), Some(key)) => Some(crate::tls::acceptor(cert, key)?),
            (None, None) => None,
            _ => return Err(ListenerError::HalfTls),
        };
        let users = Users::new(&config.users)?;
        Ok(Context {
            config,
            router,
            intake: intake.into(),
            tls,
            users,
        })
    }
}

struct Envelope {
    /// The queue the message goes to, open when `MAIL` was answered.
    queue: Queue,
    sender: String,
    account: String,
    recipients: Vec<String>,
    /// `MAIL FROM:<…> SMTPUTF8`: addresses may be non-ASCII (RFC 6531).
    smtputf8: bool,
    /// `RCPT`s refused as over `max_recipients` so far.
    overshoot: u32,
}

enum Phase {
    Command,
    /// After `354`: the transaction's envelope and its message, with when
    /// it started and the bytes read, and its spooled part once past
    /// [`SPOOL_AFTER`].
    Data {
        envelope: Envelope,
        receiver: DataReceiver,
        started: Instant,
        received: u64,
        spool: Spool,
    },
    /// The rest of an over-long command line, already answered with one
    /// `500 line too long`: one line gets one reply, whatever its length,
    /// so a pipelining client stays in step.
    SkipLine,
    /// After `334`: the client's SASL response line.
    Sasl(Sasl),
}

/// Where the spilled part of a message in progress goes.
enum Spool {
    /// Nothing spilled yet.
    None,
    /// Boxed: a hasher's state, and most sessions never spool.
    Writing(Box<BodyWriter>),
    /// Spooling failed (disk full, say): the rest is read and dropped, and
    /// the message is answered `451`.
    Failed,
}

enum Sasl {
    Plain,
    LoginUser,
    LoginPassword(String),
}

/// What to do after a command.
enum Next {
    Continue,
    Close,
    /// `220` to `STARTTLS` was queued: flush it, drop what else was read,
    /// and do the handshake.
    StartTls,
}

/// The state of one conversation.
pub struct Session<S> {
    conn: Conn<S>,
    peer: SocketAddr,
    ctx: Arc<Context>,
    shared: Arc<Shared>,
    out: Vec<u8>,
    envelope: Option<Envelope>,
    errors: u32,
    /// The local user who logged in, if any.
    user: Option<String>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// A plaintext session with state of its own (no other session's
    /// failed logins count).
    #[cfg(feature = "fuzzing")]
    pub fn new(stream: S, peer: SocketAddr, ctx: Arc<Context>) -> Self {
        Session::with_conn(Conn::Plain(stream), peer, ctx, Arc::default())
    }

    /// A session over `conn` (plain, or TLS already), sharing `shared` with
    /// the other sessions of its server.
    pub fn with_conn(
        conn: Conn<S>,
        peer: SocketAddr,
        ctx: Arc<Context>,
        shared: Arc<Shared>,
    ) -> Self {
        Session {
            conn,
            peer,
            ctx,
            shared,
            out: Vec::new(),
            envelope: None,
            errors: 0,
            user: None,
        }
    }

    /// Greets the client and serves it until it quits, times out, or `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) -> std::io::Result<()> {
        if !self.pregreet().await? {
            return Ok(());
        }
        let greeting = format!(
            "220 {} ESMTP smtp-oauth-relay ready",
            self.ctx.config.hostname
        );
        self.line(&greeting);
        let mut phase = Phase::Command;
        let mut input: Vec<u8> = Vec::with_capacity(1024);
        let mut chunk = vec![0u8; READ_CHUNK];
        // When the first byte of the command line still incomplete arrived:
        // the line must be complete within `command_timeout` of it, however
        // the client drips it. `rest_since`: when the input not yet worked
        // through became the session's to work through (the last read, or the
        // end of the line or message before it, whose answer may have taken a
        // while).
        let mut rest_since = Instant::now();
        let mut line_started: Option<Instant> = None;
        loop {
            // Work through everything already received: pipelined commands
            // are answered in order, and flushed together before the next read.
            let mut used = 0;
            while used < input.len() {
                let in_data = matches!(phase, Phase::Data { .. });
                let (n, next) = self.step(&mut phase, &input[used..]).await;
                let line_ended = if in_data {
                    !matches!(phase, Phase::Data { .. })
                } else {
                    n > 0 && input[used + n - 1] == b'\n'
                };
                if line_ended {
                    line_started = None;
                    rest_since = Instant::now();
                }
                used += n;
                match next {
                    Next::Continue => {}
                    Next::Close => {
                        self.flush().await?;
                        return Ok(());
                    }
                    Next::StartTls => {
                        self.flush().await?;
                        // Whatever the client sent after STARTTLS in
                        // plaintext is dropped unread: a command injected
                        // there must not run inside the TLS session.
                        input.clear();
                        used = 0;
                        if !self.start_tls().await {
                            return Ok(());
                        }
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
            input.drain(..used);
            let line_pending = match phase {
                Phase::Data { .. } => false,
                Phase::SkipLine => true,
                Phase::Command | Phase::Sasl(_) => !input.is_empty(),
            };
            line_started = if line_pending {
                Some(line_started.unwrap_or(rest_since))
            } else {
                None
            };
            self.flush().await?;
            let wait = match self.read_limit(&phase, line_started) {
                Some(wait) => wait,
                None if line_started.is_some() => {
                    return self.timed_out("a command line took too long").await
                }
                None => return self.timed_out("DATA took too long").await,
            };
            // On shutdown an idle client is told at once; one in the middle
            // of a transaction may finish it (the server's grace period
            // bounds how long).
            let idle = self.envelope.is_none() && matches!(phase, Phase::Command);
            let read = tokio::select! {
                read = tokio::time::timeout(wait, self.conn.read(&mut chunk)) => read,
                _ = shutdown.cancelled(), if idle => {
                    self.line("421 4.3.2 Service shutting down, try again later");
                    return self.flush().await;
                }
            };
            match read {
                Err(_) => return self.timed_out("the client went silent").await,
                Ok(Ok(0)) => return Ok(()),
                Ok(Ok(n)) => {
                    rest_since = Instant::now();
                    if let Phase::Data { received, .. } = &mut phase {
                        *received += n as u64;
                    }
                    input.extend_from_slice(&chunk[..n]);
                }
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    /// Waits `greet_delay` before the greeting; a client that talks in the
    /// meantime is told `554` and dropped. `false` when the session is over.
    async fn pregreet(&mut self) -> std::io::Result<bool> {
        let delay = self.ctx.config.greet_delay;
        if delay.is_zero() {
            return Ok(true);
        }
        let mut probe = [0u8; 512];
        match tokio::time::timeout(delay, self.conn.read(&mut probe)).await {
            Err(_) => Ok(true),
            Ok(Ok(0)) => Ok(false),
            Ok(Ok(_)) => {
                tracing::warn!(client = %self.peer.ip(), "client talked before the greeting; disconnected");
                metrics::counter!("smtp_relay_pregreet_total").increment(1);
                self.line("554 5.5.1 Error: you talked before the greeting");
                self.flush().await?;
                Ok(false)
            }
            Ok(Err(e)) => Err(e),
        }
    }

    /// How long the next read may wait; `None` when the message, or the
    /// command line begun at `line_started`, is out of time.
    fn read_limit(&self, phase: &Phase, line_started: Option<Instant>) -> Option<Duration> {
        let c = &self.ctx.config;
        match phase {
            Phase::Data {
                started, received, ..
            } => {
                let mut allowed = c.data_timeout;
                if c.min_data_rate > 0 {
                    let earned = Duration::from_secs_f64(*received as f64 / c.min_data_rate as f64);
                    allowed = allowed.min(c.data_block_timeout.saturating_add(earned));
                }
                let left = allowed.checked_sub(started.elapsed())?;
                (!left.is_zero()).then(|| left.min(c.data_block_timeout))
            }
            _ => match line_started {
                None => Some(c.command_timeout),
                Some(started) => {
                    let left = c.command_timeout.checked_sub(started.elapsed())?;
                    (!left.is_zero()).then_some(left)
                }
            },
        }
    }

    async fn timed_out(&mut self, why: &str) -> std::io::Result<()> {
        tracing::info!(client = %self.peer.ip(), "closing: {why}");
        let text = format!(
            "421 4.4.2 {} Error: timeout exceeded",
            self.ctx.config.hostname
        );
        self.line(&text);
        self.flush().await
    }

    /// Takes what it can from `input`: a command line, a SASL response, or
    /// message bytes. Returns how many bytes it used (0: it needs more).
    async fn step(&mut self, phase: &mut Phase, input: &[u8]) -> (usize, Next) {
        match phase {
            Phase::Data {
                envelope,
                receiver,
                spool,
                ..
            } => {
                let mut used = 0;
                loop {
                    let (n, done) = receiver.ingest(&input[used..]);
                    used += n;
                    if let Some(chunk) = receiver.take_spill() {
                        self.spill(&envelope.queue, spool, &chunk, receiver.too_big())
                            .await;
                    }
                    if done {
                        if let Phase::Data {
                            envelope,
                            receiver,
                            spool,
                            ..
                        } = std::mem::replace(phase, Phase::Command)
                        {
                            self.end_of_data(envelope, receiver, spool).await;
                        }
                        break;
                    }
                    if used == input.len() {
                        break;
                    }
                }
                (used, Next::Continue)
            }
            Phase::SkipLine => match memchr::memchr(b'\n', input) {
                Some(lf) => {
                    *phase = Phase::Command;
                    (lf + 1, Next::Continue)
                }
                None => (input.len(), Next::Continue),
            },
            Phase::Command | Phase::Sasl(_) => {
                let Some(lf) = memchr::memchr(b'\n', input) else {
                    if input.len() >= MAX_COMMAND_LINE {
                        *phase = Phase::SkipLine;
                        return (input.len(), self.error("500 5.5.2 Error: line too long"));
                    }
                    return (0, Next::Continue);
                };
                let line = &input[..=lf];
                let was = std::mem::replace(phase, Phase::Command);
                if line.len() > MAX_COMMAND_LINE {
                    return (lf + 1, self.error("500 5.5.2 Error: line too long"));
                }
                let content = syntax::strip_line_end(line);
                if syntax::has_control(content) {
                    return (
                        lf + 1,
                        self.error("500 5.5.2 Error: bare CR or NUL in a command line"),
                    );
                }
                let next = match was {
                    Phase::Sasl(state) => self.sasl_response(state, content, phase).await,
                    _ => self.command_line(content, phase).await,
                };
                (lf + 1, next)
            }
        }
    }

    /// One command line (without its end).
    async fn command_line(&mut self, content: &[u8], phase: &mut Phase) -> Next {
        // Before the parser, which refuses (or, past 20 digits, wraps) a
        // number too large to count.
        if content.len() > 5 && content[..5].eq_ignore_ascii_case(b"MAIL ") {
            let too_big = match syntax::declared_size(content) {
                DeclaredSize::None => false,
                DeclaredSize::Bytes(n) => n > self.ctx.config.max_message_size,
                DeclaredSize::Huge => true,
            };
            if too_big {
                return self
                    .error("552 5.3.4 Error: message size exceeds fixed maximum message size");
            }
        }
        let mut wire = Vec::with_capacity(content.len() + 2);
        wire.extend_from_slice(content);
        wire.extend_from_slice(b"\r\n");
        let parsed = Request::parse(&mut wire.iter()).map(Request::into_owned);
        match parsed {
            Ok(Request::Data) => match self.data_allowed() {
                Ok(envelope) => {
                    *phase = Phase::Data {
                        envelope,
                        receiver: DataReceiver::spilling(
                            self.ctx.config.max_message_size,
                            SPOOL_AFTER,
                        ),
                        started: Instant::now(),
                        received: 0,
                        spool: Spool::None,
                    };
                    Next::Continue
                }
                // the refusal may be the error that closes the session
                Err(next) => next,
            },
            Ok(Request::Mail { from }) => {
                let smtputf8 = from.flags & MAIL_SMTPUTF8 != 0;
                self.mail(from.address, smtputf8, content)
            }
            Ok(Request::Rcpt { to }) => self.rcpt(to.address, content),
            Ok(Request::Auth {
                mechanism,
                initial_response,
            }) => self.auth(mechanism, initial_response, phase).await,
            other => self.command(other),
        }
    }

    fn command(&mut self, request: Result<Request<String>, ParseError>) -> Next {
        let request = match request {
            Ok(request) => request,
            Err(e) => return self.error(&parse_error_reply(&e)),
        };
        match request {
            Request::Ehlo { host } => {
                self.envelope = None;
                let c = &self.ctx.config;
                let mut text = format!(
                    "250-{} Hello {host}\r\n250-PIPELINING\r\n250-SIZE {}\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n",
                    c.hostname, c.max_message_size
                );
                if self.ctx.tls.is_some() && !self.conn.is_tls() {
                    text.push_str("250-STARTTLS\r\n");
                }
                if self.auth_offered() && self.user.is_none() {
                    text.push_str("250-AUTH PLAIN LOGIN\r\n");
                }
                text.push_str("250 ENHANCEDSTATUSCODES");
                self.line(&text);
            }
            Request::Helo { .. } => {
                self.envelope = None;
                let text = format!("250 {}", self.ctx.config.hostname);
                self.line(&text);
            }
            Request::Rset => {
                self.envelope = None;
                self.line("250 2.0.0 Ok");
            }
            Request::Noop { .. } => self.line("250 2.0.0 Ok"),
            Request::Vrfy { .. } => self
                .line("252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"),
            Request::Help { .. } => {
                self.line("214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT")
            }
            Request::Quit => {
                self.line("221 2.0.0 Bye");
                return Next::Close;
            }
            Request::StartTls => return self.starttls(),
            Request::Lhlo { .. } => {
                return self.error("500 5.5.1 Error: this is not an LMTP server")
            }
            // handled by the caller
            Request::Data | Request::Mail { .. } | Request::Rcpt { .. } | Request::Auth { .. } => {}
            Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. }
            | Request::Bdat { .. } => {
                return self.error("502 5.5.1 Error: command not implemented")
            }
        }
        Next::Continue
    }

    fn starttls(&mut self) -> Next {
        if self.ctx.tls.is_none() {
            return self.error("502 5.5.1 Error: STARTTLS not available");
        }
        if self.conn.is_tls() {
            return self.error("503 5.5.1 Error: TLS already active");
        }
        self.line("220 2.0.0 Ready to start TLS");
        Next::StartTls
    }

    /// The handshake after `220`; the session starts over inside TLS
    /// (RFC 3207 4.2). `false` when it failed and the session is over.
    async fn start_tls(&mut self) -> bool {
        let Some(acceptor) = self.ctx.tls.clone() else {
            return false;
        };
        let Conn::Plain(stream) = std::mem::replace(&mut self.conn, Conn::Gone) else {
            return false;
        };
        match tokio::time::timeout(self.ctx.config.command_timeout, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => {
                self.conn = Conn::Tls(Box::new(tls));
                self.envelope = None;
                self.user = None;
                true
            }
            Ok(Err(e)) => {
                tracing::debug!(client = %self.peer.ip(), error = %e, "STARTTLS handshake failed");
                false
            }
            Err(_) => {
                tracing::debug!(client = %self.peer.ip(), "STARTTLS handshake timed out");
                false
            }
        }
    }

    /// AUTH is offered over TLS, and to loopback clients.
    fn auth_offered(&self) -> bool {
        self.ctx.config.auth != ListenerAuth::Off
            && (self.conn.is_tls() || self.peer.ip().is_loopback())
    }

    async fn auth(&mut self, mechanism: u64, initial: String, phase: &mut Phase) -> Next {
        if self.ctx.config.auth == ListenerAuth::Off {
            return self.error(
                "503 5.5.1 Error: authentication not enabled: this relay takes mail without AUTH",
            );
        }
        if !self.auth_offered() {
            return self
                .error("538 5.7.11 Encryption required for requested authentication mechanism");
        }
        if self.user.is_some() {
            return self.error("503 5.5.1 Error: already authenticated");
        }
        if self.envelope.is_some() {
            return self.error("503 5.5.1 Error: MAIL transaction in progress");
        }
        if self.shared.auth_failures.blocked(self.peer.ip()) {
            tracing::warn!(client = %self.peer.ip(), "login refused: too many failed logins");
            return self.error("454 4.7.0 Error: too many failed logins, try again later");
        }
        let initial = (!initial.is_empty()).then_some(initial);
        match (mechanism, initial) {
            (AUTH_PLAIN, None) => {
                self.line("334 ");
                *phase = Phase::Sasl(Sasl::Plain);
                Next::Continue
            }
            (AUTH_PLAIN, Some(response)) => {
                self.sasl_response(Sasl::Plain, response.as_bytes(), phase)
                    .await
            }
            (AUTH_LOGIN, None) => {
                self.line("334 VXNlcm5hbWU6");
                *phase = Phase::Sasl(Sasl::LoginUser);
                Next::Continue
            }
            (AUTH_LOGIN, Some(response)) => {
                self.sasl_response(Sasl::LoginUser, response.as_bytes(), phase)
                    .await
            }
            _ => self.error("504 5.5.4 Error: unsupported authentication mechanism"),
        }
    }

    /// A response line of the SASL exchange.
    async fn sasl_response(&mut self, state: Sasl, content: &[u8], phase: &mut Phase) -> Next {
        if content == b"*" {
            return self.error("501 5.7.0 Error: authentication cancelled");
        }
        let text = String::from_utf8_lossy(content);
        let undecodable = "501 5.5.2 Error: cannot decode the AUTH response";
        match state {
            Sasl::Plain => match decode_plain(&text) {
                Some((user, password)) => self.verify(user, password).await,
                None => self.error(undecodable),
            },
            Sasl::LoginUser => match decode_line(&text).and_then(|u| String::from_utf8(u).ok()) {
                Some(user) if !user.is_empty() => {
                    self.line("334 UGFzc3dvcmQ6");
                    *phase = Phase::Sasl(Sasl::LoginPassword(user));
                    Next::Continue
                }
                _ => self.error(undecodable),
            },
            Sasl::LoginPassword(user) => match decode_line(&text) {
                Some(password) => self.verify(user, password).await,
                None => self.error(undecodable),
            },
        }
    }

    /// Checks the password (argon2, on a blocking thread) and counts a
    /// failure against the client's address.
    async fn verify(&mut self, user: String, password: Vec<u8>) -> Next {
        let ctx = self.ctx.clone();
        let name = user.clone();
        let ok = tokio::task::spawn_blocking(move || ctx.users.verify(&name, &password))
            .await
            .unwrap_or(false);
        let ip = self.peer.ip();
        if ok {
            self.shared.auth_failures.succeeded(ip);
            tracing::info!(client = %ip, %user, "logged in");
            self.user = Some(user);
            self.line("235 2.7.0 Authentication successful");
            Next::Continue
        } else {
            self.shared.auth_failures.failed(ip);
            tracing::warn!(client = %ip, %user, "failed login");
            metrics::counter!("smtp_relay_auth_failures_total").increment(1);
            self.error("535 5.7.8 Error: authentication failed")
        }
    }

    fn mail(&mut self, sender: String, smtputf8: bool, content: &[u8]) -> Next {
        if self.envelope.is_some() {
            return self.error("503 5.5.1 Error: nested MAIL command");
        }
        if self.ctx.config.auth == ListenerAuth::Required && self.user.is_none() {
            return if self.auth_offered() {
                self.error("530 5.7.0 Error: authentication required")
            } else {
                self.error("530 5.7.0 Must issue a STARTTLS command first")
            };
        }
        if let Err(why) = syntax::raw_path(content)
            .map_or(Ok(()), syntax::check_raw_path)
            .and_then(|()| {
                if sender.is_empty() {
                    Ok(())
                } else {
                    syntax::check_address(&sender)
                }
            })
        {
            let text = format!("501 5.1.7 <{sender}>: Sender address rejected: {why}");
            return self.error(&text);
        }
        if !smtputf8 && !sender.is_ascii() {
            return self.error(UNICODE_WITHOUT_SMTPUTF8);
        }
        let Some(account) = self.ctx.router.route(&sender).map(str::to_owned) else {
            let text = format!(
                "550 5.7.1 <{sender}>: Sender address rejected: no account of this relay sends for it (see senders in [[accounts]])"
            );
            return self.error(&text);
        };
        let Some(queue) = self.ctx.intake.queue().cloned() else {
            return self.error(QUEUE_NOT_OPEN);
        };
        self.envelope = Some(Envelope {
            queue,
            sender,
            account,
            recipients: Vec::new(),
            smtputf8,
            overshoot: 0,
        });
        self.line("250 2.1.0 Ok");
        Next::Continue
    }

    fn rcpt(&mut self, recipient: String, content: &[u8]) -> Next {
        let max = self.ctx.config.max_recipients;
        if self.envelope.is_none() {
            return self.error("503 5.5.1 Error: need MAIL command");
        }
        // Recipients are forwarded to Microsoft 365: they need a domain.
        if let Err(why) = syntax::raw_path(content)
            .map_or(Ok(()), syntax::check_raw_path)
            .and_then(|()| syntax::check_address(&recipient))
        {
            let text = format!("501 5.1.3 <{recipient}>: Bad recipient address syntax: {why}");
            return self.error(&text);
        }
        let Some(envelope) = self.envelope.as_mut() else {
            return self.error("503 5.5.1 Error: need MAIL command");
        };
        if !envelope.smtputf8 && !recipient.is_ascii() {
            return self.error(UNICODE_WITHOUT_SMTPUTF8);
        }
        if envelope.recipients.len() >= max {
            envelope.overshoot += 1;
            let too_many = "452 4.5.3 Error: too many recipients";
            if envelope.overshoot <= RECIPIENT_OVERSHOOT {
                self.line(too_many);
                return Next::Continue;
            }
            return self.error(too_many);
        }
        envelope.recipients.push(recipient);
        self.line("250 2.1.5 Ok");
        Next::Continue
    }

    /// Answers `DATA`: the transaction's envelope when the message may
    /// follow, else what to do after the refusal (which counts as an error
    /// and may close).
    fn data_allowed(&mut self) -> Result<Envelope, Next> {
        match self.envelope.take() {
            None => Err(self.error("503 5.5.1 Error: need MAIL command")),
            Some(e) if e.recipients.is_empty() => {
                self.envelope = Some(e);
                Err(self.error("554 5.5.1 Error: no valid recipients"))
            }
            Some(e) => {
                self.line("354 End data with <CR><LF>.<CR><LF>");
                Ok(e)
            }
        }
    }

    /// Appends a spilled chunk to the message's spool file (started on the
    /// first). A message already too big is not stored; after a failure the
    /// rest is dropped and the end of data answers `451`.
    async fn spill(&mut self, queue: &Queue, spool: &mut Spool, chunk: &[u8], too_big: bool) {
        if too_big {
            *spool = Spool::None;
            return;
        }
        if let Spool::None = spool {
            match queue.begin_body().await {
                Ok(writer) => *spool = Spool::Writing(Box::new(writer)),
                Err(e) => {
                    tracing::error!(client = %self.peer.ip(), error = %e, "cannot spool a large message");
                    *spool = Spool::Failed;
                }
            }
        }
        if let Spool::Writing(writer) = spool {
            if let Err(e) = writer.append(chunk).await {
                tracing::error!(client = %self.peer.ip(), error = %e, "cannot spool a large message");
                *spool = Spool::Failed;
            }
        }
    }

    async fn end_of_data(&mut self, envelope: Envelope, receiver: DataReceiver, spool: Spool) {
        if receiver.too_big() {
            let text = format!(
                "552 5.3.4 Error: message too big: {} bytes, the limit is {}",
                receiver.size(),
                self.ctx.config.max_message_size
            );
            self.line(&text);
            return;
        }
        let size = receiver.size();
        let body = receiver.into_body();
        let spooled = match spool {
            Spool::None => None,
            Spool::Writing(writer) => Some(*writer),
            Spool::Failed => {
                self.line(
                    "451 4.3.0 Error: cannot store the message in the queue, try again later",
                );
                return;
            }
        };
        let message = NewMessage {
            sender: envelope.sender,
            recipients: envelope.recipients,
            account: envelope.account,
            client: Some(self.peer.ip()),
        };
        let (sender, recipients) = (message.sender.clone(), message.recipients.len());
        let queue = &envelope.queue;
        let stored = match (self.ctx.config.mode, spooled) {
            (Mode::Queue, None) => queue
                .enqueue_owned(message, body)
                .await
                .map(|id| (id, None)),
            (Mode::Queue, Some(writer)) => queue
                .enqueue_spooled(message, writer, &body)
                .await
                .map(|id| (id, None)),
            (Mode::Passthrough, None) => queue
                .enqueue_passthrough(message, body)
                .await
                .map(|(id, answer)| (id, Some(answer))),
            (Mode::Passthrough, Some(writer)) => queue
                .enqueue_passthrough_spooled(message, writer, &body)
                .await
                .map(|(id, answer)| (id, Some(answer))),
        };
        match stored {
            Ok((id, answer)) => {
                tracing::info!(queue_id = %id, client = %self.peer.ip(), %sender, recipients, size, "accepted");
                metrics::counter!("smtp_relay_messages_accepted_total").increment(1);
                let reply = match answer {
                    None => Reply::local(250, Enhanced::new(2, 0, 0), &format!("Ok: queued as {id}")),
                    Some(answer) => match tokio::time::timeout(PASSTHROUGH_WAIT, answer).await {
                        Ok(Ok(results)) => passthrough_reply(&id, &results),
                        Ok(Err(_)) | Err(_) => Reply::local(
                            451,
                            Enhanced::new(4, 4, 7),
                            &format!("No answer from the upstream in time; the message stays queued as {id}"),
                        ),
                    },
                };
                for line in reply.wire_lines() {
                    self.line(&line);
                }
            }
            Err(e) => {
                tracing::error!(client = %self.peer.ip(), error = %e, "cannot queue a message");
                self.line(
                    "451 4.3.0 Error: cannot store the message in the queue, try again later",
                );
            }
        }
    }

    /// A negative reply; too many of them end the session.
    fn error(&mut self, reply: &str) -> Next {
        self.line(reply);
        self.errors += 1;
        if self.errors >= MAX_ERRORS {
            self.line("421 4.7.0 Error: too many errors, closing connection");
            return Next::Close;
        }
        Next::Continue
    }

    fn line(&mut self, text: &str) {
        self.out.extend_from_slice(text.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    /// Sends the queued replies; a client that does not read them within
    /// `command_timeout` is given up.
    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            let write = async {
                self.conn.write_all(&self.out).await?;
                self.conn.flush().await
            };
            tokio::time::timeout(self.ctx.config.command_timeout, write)
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            self.out.clear();
        }
        Ok(())
    }
}

/// The reply a passthrough client gets: the upstream's own (a failure the
/// relay found itself is worded like one).
fn passthrough_reply(id: &QueueId, results: &[RecipientResult]) -> Reply {
    let delivered = results.iter().filter(|r| r.outcome.is_delivered()).count();
    match results.iter().find(|r| !r.outcome.is_delivered()) {
        None => match results.first() {
            Some(r) => r.outcome.reply.clone(),
            None => Reply::local(250, Enhanced::new(2, 0, 0), &format!("Ok: delivered as {id}")),
        },
        Some(_) if delivered > 0 => Reply::local(
            250,
            Enhanced::new(2, 0, 0),
            &format!(
                "Ok: delivered to {delivered} of {} recipients; the others failed, see queue entry {id}",
                results.len()
            ),
        ),
        Some(failed) => failed.outcome.reply.clone(),
    }
}

fn parse_error_reply(e: &ParseError) -> Cow<'static, str> {
    match e {
        ParseError::UnknownCommand => "500 5.5.2 Error: command not recognized".into(),
        ParseError::InvalidSenderAddress => "501 5.1.7 Error: bad sender address syntax".into(),
        ParseError::InvalidRecipientAddress => {
            "501 5.1.3 Error: bad recipient address syntax".into()
        }
        ParseError::SyntaxError { syntax } => format!("501 5.5.4 Syntax: {syntax}").into(),
        ParseError::InvalidParameter { param } => {
            format!("501 5.5.4 Error: invalid parameter {param}").into()
        }
        ParseError::UnsupportedParameter { param } => {
            format!("555 5.5.4 Error: unsupported parameter {param}").into()
        }
        ParseError::ResponseTooLong => "500 5.5.2 Error: line too long".into(),
        ParseError::NeedsMoreData { .. } | ParseError::InvalidResponse { .. } => {
            "500 5.5.2 Error: syntax error".into()
        }
    }
}

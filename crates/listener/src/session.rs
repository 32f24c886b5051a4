//! One SMTP conversation with a client.

use crate::{data::DataReceiver, Router};
use relay_config::{ListenerConfig, Mode};
use relay_queue::{NewMessage, Outcome, Queue, QueueId, RecipientResult};
use smtp_proto::{request::receiver::RequestReceiver, Error as ParseError, Request};
use std::{borrow::Cow, net::SocketAddr, sync::Arc, time::Duration};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// How long a client may stay silent (RFC 5321 4.5.3.2 suggests 5 minutes).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a passthrough client waits for the upstream's answer.
pub const PASSTHROUGH_WAIT: Duration = Duration::from_secs(300);
/// A client that keeps getting errors is closed after this many.
pub const MAX_ERRORS: u32 = 20;

/// What every session needs; shared by all.
pub struct Context {
    pub config: ListenerConfig,
    pub router: Router,
    pub queue: Queue,
}

struct Envelope {
    sender: String,
    account: String,
    recipients: Vec<String>,
}

enum Phase {
    Command,
    Data(DataReceiver),
    /// Fix: the rest of an over-long command line, already answered with
    /// one `500 line too long`. smtp-proto's receiver gives up on a line
    /// after 4096 bytes without skipping the rest of it, which used to be
    /// parsed as further commands: one line got several replies, putting a
    /// pipelining client out of step.
    SkipLine,
}

/// What to do after a command.
enum Next {
    Continue,
    Close,
}

/// The state of one conversation.
pub struct Session<S> {
    stream: S,
    peer: SocketAddr,
    ctx: Arc<Context>,
    out: Vec<u8>,
    envelope: Option<Envelope>,
    errors: u32,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub fn new(stream: S, peer: SocketAddr, ctx: Arc<Context>) -> Self {
        Session {
            stream,
            peer,
            ctx,
            out: Vec::new(),
            envelope: None,
            errors: 0,
        }
    }

    /// Greets the client and serves it until it quits, times out, or `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) -> std::io::Result<()> {
        let greeting = format!(
            "220 {} ESMTP smtp-oauth-relay ready",
            self.ctx.config.hostname
        );
        self.line(&greeting);
        let mut parser = RequestReceiver::default();
        let mut phase = Phase::Command;
        let mut input: Vec<u8> = Vec::with_capacity(8192);
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            // Work through everything already received: pipelined commands
            // are answered in order, and flushed together before the next read.
            let mut used = 0;
            while used < input.len() {
                let (n, next) = match &mut phase {
                    Phase::Data(receiver) => {
                        let (n, done) = receiver.ingest(&input[used..]);
                        if done {
                            if let Phase::Data(receiver) =
                                std::mem::replace(&mut phase, Phase::Command)
                            {
                                self.end_of_data(receiver).await;
                            }
                        }
                        (n, Next::Continue)
                    }
                    Phase::SkipLine => match input[used..].iter().position(|&b| b == b'\n') {
                        Some(lf) => {
                            phase = Phase::Command;
                            (lf + 1, Next::Continue)
                        }
                        None => (input.len() - used, Next::Continue),
                    },
                    Phase::Command => {
                        let mut bytes = input[used..].iter();
                        let parsed = parser.ingest(&mut bytes).map(Request::into_owned);
                        let n = input.len() - used - bytes.as_slice().len();
                        match parsed {
                            Err(ParseError::NeedsMoreData { .. }) => (n, Next::Continue),
                            Err(ParseError::ResponseTooLong) => {
                                phase = Phase::SkipLine;
                                (n, self.command(Err(ParseError::ResponseTooLong)))
                            }
                            Ok(Request::Data) => match self.data_allowed() {
                                None => {
                                    phase = Phase::Data(DataReceiver::new(
                                        self.ctx.config.max_message_size,
                                    ));
                                    (n, Next::Continue)
                                }
                                // Fix: a refused DATA may be the error that
                                // reaches MAX_ERRORS; its Close used to be
                                // dropped, so the 421 was sent but the
                                // session went on.
                                Some(next) => (n, next),
                            },
                            other => (n, self.command(other)),
                        }
                    }
                };
                used += n;
                if matches!(next, Next::Close) {
                    self.flush().await?;
                    return Ok(());
                }
                if n == 0 {
                    break;
                }
            }
            input.drain(..used);
            self.flush().await?;
            // On shutdown an idle client is told at once; one in the middle
            // of a transaction may finish it (the server's grace period
            // bounds how long).
            let idle = self.envelope.is_none() && matches!(phase, Phase::Command);
            let read = tokio::select! {
                read = tokio::time::timeout(IDLE_TIMEOUT, self.stream.read(&mut chunk)) => read,
                _ = shutdown.cancelled(), if idle => {
                    self.line("421 4.3.2 Service shutting down, try again later");
                    return self.flush().await;
                }
            };
            match read {
                Err(_) => {
                    let text = format!(
                        "421 4.4.2 {} Error: timeout exceeded",
                        self.ctx.config.hostname
                    );
                    self.line(&text);
                    return self.flush().await;
                }
                Ok(Ok(0)) => return Ok(()),
                Ok(Ok(n)) => input.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Err(e),
            }
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
                let text = format!(
                    "250-{} Hello {host}\r\n250-PIPELINING\r\n250-SIZE {}\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES",
                    c.hostname, c.max_message_size
                );
                self.line(&text);
            }
            Request::Helo { .. } => {
                self.envelope = None;
                let text = format!("250 {}", self.ctx.config.hostname);
                self.line(&text);
            }
            Request::Mail { from } => return self.mail(from.address, from.size as u64),
            Request::Rcpt { to } => return self.rcpt(to.address),
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
            Request::Auth { .. } => return self.error(
                "503 5.5.1 Error: authentication not enabled: this relay takes mail without AUTH",
            ),
            Request::StartTls => return self.error("502 5.5.1 Error: STARTTLS not available"),
            Request::Lhlo { .. } => {
                return self.error("500 5.5.1 Error: this is not an LMTP server")
            }
            Request::Data => {} // handled by the caller, which owns the phase
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

    fn mail(&mut self, sender: String, declared_size: u64) -> Next {
        if self.envelope.is_some() {
            return self.error("503 5.5.1 Error: nested MAIL command");
        }
        if declared_size > self.ctx.config.max_message_size {
            return self.error("552 5.3.4 Error: message size exceeds fixed maximum message size");
        }
        let Some(account) = self.ctx.router.route(&sender).map(str::to_owned) else {
            let text = format!(
                "550 5.7.1 <{sender}>: Sender address rejected: no account of this relay sends for it (see senders in [[accounts]])"
            );
            return self.error(&text);
        };
        self.envelope = Some(Envelope {
            sender,
            account,
            recipients: Vec::new(),
        });
        self.line("250 2.1.0 Ok");
        Next::Continue
    }

    fn rcpt(&mut self, recipient: String) -> Next {
        let max = self.ctx.config.max_recipients;
        let Some(envelope) = self.envelope.as_mut() else {
            return self.error("503 5.5.1 Error: need MAIL command");
        };
        if !valid_recipient(&recipient) {
            let text = format!("501 5.1.3 <{recipient}>: Bad recipient address syntax");
            return self.error(&text);
        }
        if envelope.recipients.len() >= max {
            return self.error("452 4.5.3 Error: too many recipients");
        }
        envelope.recipients.push(recipient);
        self.line("250 2.1.5 Ok");
        Next::Continue
    }

    /// Answers `DATA`; `None` when the message may follow, else what to do
    /// after the refusal (which counts as an error and may close).
    fn data_allowed(&mut self) -> Option<Next> {
        match &self.envelope {
            None => Some(self.error("503 5.5.1 Error: need MAIL command")),
            Some(e) if e.recipients.is_empty() => {
                Some(self.error("554 5.5.1 Error: no valid recipients"))
            }
            Some(_) => {
                self.line("354 End data with <CR><LF>.<CR><LF>");
                None
            }
        }
    }

    async fn end_of_data(&mut self, receiver: DataReceiver) {
        let Some(envelope) = self.envelope.take() else {
            return;
        };
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
        let message = NewMessage {
            sender: envelope.sender,
            recipients: envelope.recipients,
            account: envelope.account,
            client: Some(self.peer.ip()),
        };
        let (sender, recipients) = (message.sender.clone(), message.recipients.len());
        let stored = match self.ctx.config.mode {
            Mode::Queue => self
                .ctx
                .queue
                .enqueue(message, &body)
                .await
                .map(|id| (id, None)),
            Mode::Passthrough => self
                .ctx
                .queue
                .enqueue_passthrough(message, &body)
                .await
                .map(|(id, answer)| (id, Some(answer))),
        };
        match stored {
            Ok((id, answer)) => {
                tracing::info!(queue_id = %id, client = %self.peer.ip(), %sender, recipients, size, "accepted");
                metrics::counter!("smtp_relay_messages_accepted_total").increment(1);
                let text = match answer {
                    None => format!("250 2.0.0 Ok: queued as {id}"),
                    Some(answer) => match tokio::time::timeout(PASSTHROUGH_WAIT, answer).await {
                        Ok(Ok(results)) => passthrough_reply(&id, &results),
                        Ok(Err(_)) | Err(_) => format!(
                            "451 4.4.7 No answer from the upstream in time; the message stays queued as {id}"
                        ),
                    },
                };
                self.line(&text);
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

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.stream.flush().await?;
            self.out.clear();
        }
        Ok(())
    }
}

/// The reply a passthrough client gets: the upstream's own when it has a
/// code, worded like one when the failure was local (no connection, no token).
fn passthrough_reply(id: &QueueId, results: &[RecipientResult]) -> String {
    let delivered = results
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Delivered { .. }))
        .count();
    let with_code = |reply: &str, fallback: &str| {
        let code_ok = reply.len() > 4
            && reply.as_bytes()[..3].iter().all(u8::is_ascii_digit)
            && reply.as_bytes()[3] == b' ';
        if code_ok {
            reply.to_owned()
        } else {
            format!("{fallback} {reply}")
        }
    };
    match results.iter().find(|r| !matches!(r.outcome, Outcome::Delivered { .. })) {
        None => match results.first() {
            Some(r) if r.outcome.reply().starts_with('2') => with_code(r.outcome.reply(), "250 2.0.0"),
            _ => format!("250 2.0.0 Ok: delivered as {id}"),
        },
        Some(_) if delivered > 0 => format!(
            "250 2.0.0 Ok: delivered to {delivered} of {} recipients; the others failed, see queue entry {id}",
            results.len()
        ),
        Some(failed) => match &failed.outcome {
            Outcome::Permanent { reply } => with_code(reply, "554 5.0.0"),
            other => with_code(other.reply(), "451 4.4.1"),
        },
    }
}

/// Recipients are forwarded to Microsoft 365: they need a domain.
fn valid_recipient(address: &str) -> bool {
    match address.rsplit_once('@') {
        Some((local, domain)) => !local.is_empty() && !domain.is_empty(),
        None => false,
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

//! One authenticated connection to the upstream, and the mail transaction.

use crate::{
    classify::{classify_auth, outcome},
    reply::read_reply,
    tls, DeliveryError,
};
use mail_send::{Credentials, SmtpClient, SmtpClientBuilder};
use relay_config::{Security, UpstreamConfig};
use relay_outcome::{Enhanced, Network, Outcome, Reason, Reply};
use relay_tokens::{AccessToken, TokenManager};
use smtp_proto::{EhloResponse, EXT_8BIT_MIME, EXT_PIPELINING, EXT_SIZE, EXT_SMTP_UTF8};
use std::time::Duration;
use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::{client::TlsStream, TlsConnector};

/// Connecting, TLS, EHLO, AUTH and each command's reply.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// The reply to the final dot: RFC 5321 asks clients to wait 10 minutes.
const DATA_TIMEOUT: Duration = Duration::from_secs(600);

/// Where and how to reach the upstream.
pub struct Upstream {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) security: Security,
    pub(crate) tls: TlsConnector,
    pub(crate) helo: String,
    pub(crate) idle_timeout: Duration,
    /// `host:port`, for logs.
    pub(crate) address: String,
}

impl Upstream {
    /// From `[upstream]`; `helo` is the name the relay gives in EHLO.
    pub fn new(config: &UpstreamConfig, helo: &str) -> Result<Self, DeliveryError> {
        Ok(Upstream {
            host: config.host.clone(),
            port: config.port,
            security: config.security,
            tls: tls::connector(config.ca_file.as_deref())?,
            helo: helo.to_owned(),
            idle_timeout: config.idle_timeout,
            address: format!("{}:{}", config.host, config.port),
        })
    }

    /// The name the relay gives in EHLO (also its name in notifications).
    pub fn helo(&self) -> &str {
        &self.helo
    }

    /// `host:port`, for logs.
    pub fn address(&self) -> &str {
        &self.address
    }
}

/// A failure found by the relay itself, worded like a server's reply.
pub(crate) fn local(reason: Reason, code: u16, enhanced: Enhanced, text: &str) -> Outcome {
    Outcome::new(reason, Reply::local(code, enhanced, text))
}

/// The connection broke or stopped answering.
fn lost(text: &str) -> Outcome {
    local(
        Reason::Network(Network::Lost),
        451,
        Enhanced::new(4, 4, 2),
        text,
    )
}

/// Why an exchange of commands and replies broke off; the text becomes
/// the outcome of the recipients it leaves undelivered.
#[derive(Debug, thiserror::Error)]
enum WireError {
    #[error("timed out writing to the upstream")]
    WriteTimeout,
    #[error("no reply from the upstream within {}s", .0.as_secs())]
    ReplyTimeout(Duration),
    /// The connection failed, or the server's reply was not SMTP.
    #[error("connection lost: {0}")]
    Io(std::io::Error),
    /// Fewer replies than commands.
    #[error("no reply")]
    NoReply,
    #[error("no reply to DATA")]
    NoReplyToData,
}

/// The connection broke mid-transaction. `before_data` tells whether the
/// message could have been delivered (if not, a retry cannot duplicate it).
#[derive(Debug)]
pub(crate) struct Broken {
    pub outcome: Outcome,
    pub before_data: bool,
}

/// An authenticated SMTP connection to the upstream (the SMTP transport's
/// session).
pub struct Session {
    pub(crate) client: SmtpClient<TlsStream<TcpStream>>,
    pub(crate) capabilities: EhloResponse<String>,
    pub(crate) pending: Vec<u8>,
    /// Transactions completed on this connection; a reused connection may have
    /// been closed by the server while idle.
    pub(crate) transactions: u32,
}

impl Session {
    /// Connects, secures, and authenticates as `mailbox`. A `535` on a token
    /// the relay thought valid gets one retry with a freshly issued token.
    pub(crate) async fn open(
        upstream: &Upstream,
        mailbox: &str,
        tokens: &TokenManager,
    ) -> Result<Session, Outcome> {
        let client = SmtpClientBuilder::new_with_tls_connector(
            upstream.host.clone(),
            upstream.port,
            upstream.tls.clone(),
        )
        .implicit_tls(upstream.security == Security::Tls)
        .helo_host(upstream.helo.clone())
        .say_ehlo(false)
        .timeout(COMMAND_TIMEOUT)
        .connect()
        .await;
        let mut client = match client {
            Ok(client) => client,
            Err(e) => return Err(upstream.unreachable(&e).await),
        };
        // Commands and the end of data are small writes that wait for a
        // reply; with Nagle's algorithm each would sit out the server's
        // delayed ACK (40 ms on Linux).
        if let Err(e) = client.stream.get_ref().0.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on the upstream connection");
        }
        let capabilities = client
            .capabilities(&upstream.helo, false)
            .await
            .map_err(|e| {
                lost(&format!(
                    "EHLO to {} failed: {}",
                    upstream.address(),
                    describe(&e)
                ))
            })?;
        let token = tokens.token().await.map_err(|e| {
            local(
                Reason::NoToken,
                451,
                Enhanced::new(4, 7, 0),
                &format!("no access token: {e}"),
            )
        })?;
        if let Err(failure) = authenticate(&mut client, &capabilities, mailbox, &token).await {
            if failure.reason != Reason::TokenRejected {
                return Err(failure);
            }
            tracing::info!(reply = %failure.reply, "upstream refused the access token; fetching a new one");
            let fresh = tokens.refresh_rejected(&token).await.map_err(|e| {
                Outcome::new(
                    Reason::NoToken,
                    failure
                        .reply
                        .with_text(format!("{} (and no new token: {e})", failure.reply)),
                )
            })?;
            authenticate(&mut client, &capabilities, mailbox, &fresh)
                .await
                .map_err(|f| Outcome {
                    reply: f
                        .reply
                        .with_text(format!("{} (also with a newly issued token)", f.reply)),
                    ..f
                })?;
        }
        Ok(Session {
            client,
            capabilities,
            pending: Vec::new(),
            transactions: 0,
        })
    }

    /// Runs one mail transaction: MAIL, RCPT for each recipient, DATA.
    /// Returns each recipient's outcome, in the order given.
    ///
    /// With PIPELINING, DATA goes in the same group as MAIL and RCPT
    /// (RFC 2920 allows it last), as Postfix's client sends it: one round
    /// trip fewer per message. The body still waits for the `354`.
    pub(crate) async fn transaction(
        &mut self,
        sender: &str,
        recipients: &[String],
        body: &[u8],
    ) -> Result<Vec<Outcome>, Broken> {
        let broken = |before_data: bool| {
            move |reason: WireError| Broken {
                outcome: lost(&reason.to_string()),
                before_data,
            }
        };
        let pipelining = self.pipelining();
        let mut commands = vec![format!(
            "MAIL FROM:<{sender}>{}",
            self.mail_parameters(sender, recipients, body)
        )];
        commands.extend(recipients.iter().map(|r| format!("RCPT TO:<{r}>")));
        if pipelining {
            commands.push("DATA".to_owned());
        }
        let mut replies = self.exchange(&commands).await.map_err(broken(true))?;
        let pipelined_data = if pipelining { replies.pop() } else { None };
        let (mail, rcpts) = replies
            .split_first()
            .ok_or_else(|| broken(true)(WireError::NoReply))?;
        let mut outcomes: Vec<Option<Outcome>> = if mail.is_positive() {
            rcpts
                .iter()
                .map(|r| (!r.is_positive()).then(|| outcome(r.clone())))
                .collect()
        } else {
            let failure = outcome(mail.clone());
            recipients.iter().map(|_| Some(failure.clone())).collect()
        };
        if outcomes.iter().all(Option::is_some) {
            if pipelined_data.is_some_and(|r| r.code == 354) {
                // The server opened DATA with no recipient to deliver to:
                // an empty message closes it, and no one receives it.
                self.end_empty_data().await.map_err(broken(true))?;
            }
            self.reset().await;
            return Ok(outcomes.into_iter().flatten().collect());
        }
        let go_ahead = match pipelined_data {
            Some(reply) => Some(reply),
            None => self
                .exchange(&["DATA".to_owned()])
                .await
                .map_err(broken(true))?
                .pop(),
        };
        let final_reply = match go_ahead {
            Some(reply) if reply.code == 354 => {
                self.send_body(body).await.map_err(broken(false))?
            }
            Some(reply) => {
                self.reset().await;
                reply
            }
            None => return Err(broken(true)(WireError::NoReplyToData)),
        };
        let accepted = outcome(final_reply);
        self.transactions += 1;
        for slot in outcomes.iter_mut().filter(|o| o.is_none()) {
            *slot = Some(accepted.clone());
        }
        Ok(outcomes.into_iter().flatten().collect())
    }

    /// Ends the session politely; errors do not matter any more.
    pub(crate) async fn quit(mut self) {
        let _ =
            tokio::time::timeout(Duration::from_secs(5), self.exchange(&["QUIT".to_owned()])).await;
    }

    fn mail_parameters(&self, sender: &str, recipients: &[String], body: &[u8]) -> String {
        let caps = self.capabilities.capabilities;
        let mut params = String::new();
        if caps & EXT_SIZE != 0 {
            params.push_str(&format!(" SIZE={}", body.len()));
        }
        if caps & EXT_8BIT_MIME != 0 && !body.is_ascii() {
            params.push_str(" BODY=8BITMIME");
        }
        let utf8_address = !sender.is_ascii() || recipients.iter().any(|r| !r.is_ascii());
        if caps & EXT_SMTP_UTF8 != 0 && utf8_address {
            params.push_str(" SMTPUTF8");
        }
        params
    }

    fn pipelining(&self) -> bool {
        self.capabilities.capabilities & EXT_PIPELINING != 0
    }

    /// Sends commands (pipelined when the server allows) and reads one reply each.
    async fn exchange(&mut self, commands: &[String]) -> Result<Vec<Reply>, WireError> {
        let pipelining = self.pipelining();
        let mut replies = Vec::with_capacity(commands.len());
        let batches: Vec<&[String]> = if pipelining {
            vec![commands]
        } else {
            commands.chunks(1).collect()
        };
        for batch in batches {
            let mut wire = Vec::new();
            for command in batch {
                wire.extend_from_slice(command.as_bytes());
                wire.extend_from_slice(b"\r\n");
            }
            self.write(&wire).await?;
            for _ in batch {
                replies.push(self.read(COMMAND_TIMEOUT).await?);
            }
        }
        Ok(replies)
    }

    /// Sends the message a piece at a time, so a large message is never
    /// copied whole for dot-stuffing. The end-of-data line goes out with the
    /// last piece: one write for a small message.
    async fn send_body(&mut self, body: &[u8]) -> Result<Reply, WireError> {
        let mut line_start = true;
        let piece = body.len().min(STUFF_PIECE);
        let mut wire = Vec::with_capacity(piece + piece / 64 + 8);
        let mut pieces = body.chunks(STUFF_PIECE).peekable();
        loop {
            wire.clear();
            if let Some(piece) = pieces.next() {
                stuff_into(&mut wire, piece, &mut line_start);
            }
            if pieces.peek().is_none() {
                end_of_data(&mut wire, body);
                self.write(&wire).await?;
                return self.read(DATA_TIMEOUT).await;
            }
            self.write(&wire).await?;
        }
    }

    /// Ends a DATA the server opened although every recipient was refused.
    async fn end_empty_data(&mut self) -> Result<(), WireError> {
        self.write(b".\r\n").await?;
        self.read(DATA_TIMEOUT).await.map(drop)
    }

    /// After a refused transaction, so the connection can carry the next one.
    async fn reset(&mut self) {
        if let Err(e) = self.exchange(&["RSET".to_owned()]).await {
            tracing::debug!(error = %e, "RSET failed");
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        let stream = &mut self.client.stream;
        tokio::time::timeout(COMMAND_TIMEOUT, write_all(stream, bytes))
            .await
            .map_err(|_| WireError::WriteTimeout)?
            .map_err(WireError::Io)
    }

    async fn read(&mut self, limit: Duration) -> Result<Reply, WireError> {
        tokio::time::timeout(
            limit,
            read_reply(&mut self.client.stream, &mut self.pending),
        )
        .await
        .map_err(|_| WireError::ReplyTimeout(limit))?
        .map_err(WireError::Io)
    }
}

async fn write_all<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

pub(crate) async fn authenticate(
    client: &mut SmtpClient<TlsStream<TcpStream>>,
    capabilities: &EhloResponse<String>,
    mailbox: &str,
    token: &AccessToken,
) -> Result<(), Outcome> {
    // XOAUTH2 by hand rather than with mail-send's `authenticate`: on a bad
    // token Gmail answers `334 <base64 JSON error>` and expects an empty
    // line before its `535`, where mail-send would send the credentials
    // again. Exchange Online answers `535` at once.
    if capabilities.auth_mechanisms & smtp_proto::AUTH_XOAUTH2 == 0 {
        return Err(local(
            Reason::AuthFailed,
            454,
            Enhanced::new(4, 7, 0),
            "the upstream does not offer AUTH XOAUTH2 after TLS",
        ));
    }
    let failed = |e: mail_send::Error| lost(&format!("authentication failed: {}", describe(&e)));
    let credentials = Credentials::new_xoauth2(mailbox, token.secret().expose());
    let initial = credentials
        .encode(smtp_proto::AUTH_XOAUTH2, "")
        .map_err(failed)?;
    let mut r = client
        .cmd(format!("AUTH XOAUTH2 {initial}\r\n").as_bytes())
        .await
        .map_err(failed)?;
    if r.code == 334 {
        // The challenge carries the error as JSON; an empty line ends the exchange.
        r = client.cmd(b"\r\n").await.map_err(failed)?;
    }
    if r.code == 235 {
        return Ok(());
    }
    // mail-send has already split the reply; carry its parts over as they are.
    let [class, subject, detail] = r.esc;
    let enhanced =
        matches!(class, 2 | 4 | 5).then(|| Enhanced::new(class, subject.into(), detail.into()));
    let message = r.message.replace(['\r', '\n'], " ");
    let text = match enhanced {
        Some(e) => format!("{} {e} {message}", r.code),
        None => format!("{} {message}", r.code),
    };
    let reply = Reply {
        code: r.code,
        enhanced,
        text,
    };
    Err(Outcome::new(classify_auth(&reply), reply))
}

impl Upstream {
    /// Why a connection could not be made: which step failed (name
    /// resolution, TCP, TLS) and mail-send's account of it.
    async fn unreachable(&self, e: &mail_send::Error) -> Outcome {
        let address = self.address();
        let (network, enhanced) = match e {
            mail_send::Error::Tls(_)
            | mail_send::Error::MissingStartTls
            | mail_send::Error::InvalidTLSName => (Network::Tls, Enhanced::new(4, 7, 5)),
            mail_send::Error::Io(_)
                if tokio::net::lookup_host((self.host.as_str(), self.port))
                    .await
                    .is_err() =>
            {
                (Network::Dns, Enhanced::new(4, 4, 3))
            }
            _ => (Network::Connect, Enhanced::new(4, 4, 1)),
        };
        local(
            Reason::Network(network),
            451,
            enhanced,
            &format!("cannot connect to {address}: {}", describe(e)),
        )
    }
}

/// mail-send's messages, with the one that matters for security spelled out.
pub(crate) fn describe(e: &mail_send::Error) -> String {
    match e {
        mail_send::Error::MissingStartTls => {
            "the server does not offer STARTTLS; refusing to send without TLS".into()
        }
        other => other.to_string(),
    }
}

/// The message as it goes on the wire after `DATA`: every line starting with
/// `.` gets another (RFC 5321 4.5.2), then the end-of-data line. The body is
/// sent byte for byte otherwise; its final CRLF is the one before the dot.
#[cfg(test)]
pub(crate) fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 64 + 5);
    let mut line_start = true;
    stuff_into(&mut out, body, &mut line_start);
    end_of_data(&mut out, body);
    out
}

/// How much of a message is stuffed and written at a time.
const STUFF_PIECE: usize = 64 * 1024;

/// Appends `piece` to `out` with a `.` doubled at each line start;
/// `line_start` carries over from the previous piece.
fn stuff_into(out: &mut Vec<u8>, piece: &[u8], line_start: &mut bool) {
    let mut rest = piece;
    while let Some(&first) = rest.first() {
        if *line_start && first == b'.' {
            out.push(b'.');
        }
        let line = memchr::memchr(b'\n', rest).map_or(rest.len(), |lf| lf + 1);
        out.extend_from_slice(&rest[..line]);
        *line_start = rest[line - 1] == b'\n';
        rest = &rest[line..];
    }
}

/// The end-of-data line, after a CRLF if the message lacks a final one.
fn end_of_data(out: &mut Vec<u8>, body: &[u8]) {
    if !(body.is_empty() || body.ends_with(b"\r\n")) {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

#[cfg(test)]
mod tests {
    use super::dot_stuff;

    #[test]
    fn stuffing_carries_across_pieces() {
        let body = b"a\r\n.b\r\n..c\r\n.\r\n";
        for split in 0..body.len() {
            let mut out = Vec::new();
            let mut line_start = true;
            super::stuff_into(&mut out, &body[..split], &mut line_start);
            super::stuff_into(&mut out, &body[split..], &mut line_start);
            super::end_of_data(&mut out, body);
            assert_eq!(out, dot_stuff(body), "split at {split}");
        }
        assert_eq!(dot_stuff(body), b"a\r\n..b\r\n...c\r\n..\r\n.\r\n");
    }

    #[test]
    fn stuffing_and_terminator() {
        assert_eq!(
            dot_stuff(b".a\r\n..b\r\n.\r\nc\r\n"),
            b"..a\r\n...b\r\n..\r\nc\r\n.\r\n"
        );
        assert_eq!(dot_stuff(b"no final crlf"), b"no final crlf\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b".\r\n");
    }
}

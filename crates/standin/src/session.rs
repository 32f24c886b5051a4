//! One SMTP conversation with the fake submission server, modelled on
//! Exchange Online's replies.
//!
//! Commands are read line by line from a buffered reader, so pipelined input
//! works naturally; replies are written as each command is handled.

use std::io;
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::jwt::{TokenClaims, SEND_AS_ROLE};
use crate::submission::{ReceivedMessage, Shared};
use crate::util::lock;

const HOSTNAME: &str = "FAKE.prod.outlook.com";
/// Longest command line accepted, CRLF included.
const MAX_LINE: usize = 16_384;
/// The SIZE Exchange Online advertises; larger messages are refused.
const MAX_MESSAGE: usize = 37_748_736;
const MAX_RECIPIENTS: usize = 500;
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

const AUTH_FAILED: &str = "535 5.7.3 Authentication unsuccessful";
const BASIC_AUTH_DISABLED: &str =
    "535 5.7.139 Authentication unsuccessful, basic authentication is disabled.";
const NOT_AUTHENTICATED: &str = "530 5.7.57 Client not authenticated to send mail.";

/// Serves one accepted connection until it closes; errors just end it.
pub(crate) async fn run(shared: &Shared, stream: TcpStream, id: u64) {
    if let Err(e) = serve(shared, stream, id).await {
        tracing::debug!(session = id, error = %e, "submission session ended with an error");
    }
}

async fn serve(shared: &Shared, stream: TcpStream, id: u64) -> io::Result<()> {
    let mut session = Session::new(shared, id);
    let mut plain = BufReader::new(stream);
    send(
        &mut plain,
        &format!("220 {HOSTNAME} Microsoft ESMTP MAIL Service ready"),
    )
    .await?;
    if let Outcome::Closed = session.converse(&mut plain).await? {
        return Ok(());
    }
    // STARTTLS: anything the client pipelined after it arrived in clear text
    // and is discarded with the buffer (RFC 3207 §5).
    let stream = plain.into_inner();
    let tls = tokio::time::timeout(IDLE_TIMEOUT, shared.tls.accept(stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    session.start_tls();
    let mut tls = BufReader::new(tls);
    session.converse(&mut tls).await?;
    let _ = tls.shutdown().await;
    Ok(())
}

/// How a conversation on one transport ended.
enum Outcome {
    Closed,
    StartTls,
}

/// What to do after handling a command.
enum Reply {
    Send(String),
    StartTls,
    Quit,
    /// Drop the connection without replying (scripted fault).
    Disconnect,
}

impl Reply {
    fn text(s: impl Into<String>) -> Reply {
        Reply::Send(s.into())
    }

    /// A scripted fault: a reply line, or `disconnect`.
    fn fault(reply: &str) -> Reply {
        if reply.eq_ignore_ascii_case("disconnect") {
            Reply::Disconnect
        } else {
            Reply::text(reply)
        }
    }
}

/// A line read from the client.
enum Line {
    Complete,
    TooLong,
    Closed,
}

/// The authenticated identity of a session.
struct Login {
    user: String,
    token: String,
    claims: TokenClaims,
}

struct Session<'a> {
    shared: &'a Shared,
    id: u64,
    tls: bool,
    greeted: bool,
    login: Option<Login>,
    mail_from: Option<String>,
    rcpt_to: Vec<String>,
}

impl<'a> Session<'a> {
    fn new(shared: &'a Shared, id: u64) -> Self {
        Session {
            shared,
            id,
            tls: false,
            greeted: false,
            login: None,
            mail_from: None,
            rcpt_to: Vec::new(),
        }
    }

    /// After the TLS handshake the client starts over with EHLO.
    fn start_tls(&mut self) {
        self.tls = true;
        self.greeted = false;
        self.reset();
    }

    fn reset(&mut self) {
        self.mail_from = None;
        self.rcpt_to.clear();
    }

    /// Handles commands until the client quits, the connection drops, or
    /// STARTTLS is accepted.
    async fn converse<S>(&mut self, io: &mut BufReader<S>) -> io::Result<Outcome>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut line = Vec::new();
        loop {
            match read_command(io, &mut line).await? {
                Line::Closed => return Ok(Outcome::Closed),
                Line::TooLong => {
                    send(io, "500 5.5.2 Line too long").await?;
                    continue;
                }
                Line::Complete => {}
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\r', '\n']);
            let (verb, arg) = text.split_once(' ').unwrap_or((text, ""));
            let arg = arg.trim();
            tracing::debug!(session = self.id, command = %verb, "smtp command");
            let reply = match verb.to_ascii_uppercase().as_str() {
                "EHLO" => self.ehlo(arg),
                "HELO" => self.helo(arg),
                "STARTTLS" => self.starttls(arg),
                "AUTH" => self.auth(io, arg).await?,
                "MAIL" => self.mail(arg),
                "RCPT" => self.rcpt(arg),
                "DATA" => self.data(io).await?,
                "RSET" => {
                    self.reset();
                    Reply::text("250 2.0.0 Resetting")
                }
                "NOOP" => Reply::text("250 2.0.0 OK"),
                "QUIT" => Reply::Quit,
                _ => Reply::text("500 5.3.3 Unrecognized command"),
            };
            match reply {
                Reply::Send(text) => send(io, &text).await?,
                Reply::StartTls => {
                    send(io, "220 2.0.0 SMTP server ready").await?;
                    return Ok(Outcome::StartTls);
                }
                Reply::Quit => {
                    send(io, "221 2.0.0 Service closing transmission channel").await?;
                    return Ok(Outcome::Closed);
                }
                Reply::Disconnect => return Ok(Outcome::Closed),
            }
        }
    }

    fn ehlo(&mut self, domain: &str) -> Reply {
        if domain.is_empty() {
            return Reply::text("501 5.5.4 Invalid domain name");
        }
        self.greeted = true;
        self.reset();
        // Same order as Exchange Online's EHLO reply.
        let mut lines = vec![
            format!("{HOSTNAME} Hello [127.0.0.1]"),
            format!("SIZE {MAX_MESSAGE}"),
            "PIPELINING".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
        ];
        if self.tls {
            lines.push("AUTH LOGIN XOAUTH2".to_string());
        }
        lines.push("8BITMIME".to_string());
        lines.push("SMTPUTF8".to_string());
        if !self.tls && self.shared.offer_starttls {
            lines.push("STARTTLS".to_string());
        }
        let last = lines.len() - 1;
        let text = lines
            .iter()
            .enumerate()
            .map(|(i, l)| format!("250{}{l}", if i == last { ' ' } else { '-' }))
            .collect::<Vec<_>>()
            .join("\r\n");
        Reply::Send(text)
    }

    fn helo(&mut self, domain: &str) -> Reply {
        if domain.is_empty() {
            return Reply::text("501 5.5.4 Invalid domain name");
        }
        self.greeted = true;
        self.reset();
        Reply::text(format!("250 {HOSTNAME} Hello [127.0.0.1]"))
    }

    fn starttls(&mut self, arg: &str) -> Reply {
        if !self.shared.offer_starttls {
            Reply::text("502 5.5.1 Command not implemented")
        } else if self.tls {
            Reply::text("503 5.5.1 TLS already active")
        } else if !arg.is_empty() {
            Reply::text("501 5.5.4 Syntax error")
        } else {
            Reply::StartTls
        }
    }

    async fn auth<S>(&mut self, io: &mut BufReader<S>, arg: &str) -> io::Result<Reply>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // Exchange Online offers no mechanism before TLS.
        if !self.tls {
            return Ok(Reply::text("504 5.7.4 Unrecognized authentication type"));
        }
        if !self.greeted {
            return Ok(Reply::text("503 5.5.2 Send hello first"));
        }
        if self.login.is_some() {
            return Ok(Reply::text("503 5.5.1 Already authenticated"));
        }
        let (mechanism, initial) = match arg.split_once(' ') {
            Some((m, r)) => (m, Some(r.trim())),
            None => (arg, None),
        };
        match mechanism.to_ascii_uppercase().as_str() {
            "XOAUTH2" => {}
            "LOGIN" => {
                self.auth_failed("basic auth attempted");
                return Ok(Reply::text(BASIC_AUTH_DISABLED));
            }
            "" => return Ok(Reply::text("501 5.5.4 Syntax error")),
            _ => return Ok(Reply::text("504 5.7.4 Unrecognized authentication type")),
        }
        let response = match initial {
            Some(r) => r.to_string(),
            None => {
                send(io, "334 ").await?;
                let mut line = Vec::new();
                match read_command(io, &mut line).await? {
                    Line::Closed => return Ok(Reply::Disconnect),
                    Line::TooLong => return Ok(Reply::text("500 5.5.2 Line too long")),
                    Line::Complete => {}
                }
                String::from_utf8_lossy(&line)
                    .trim_end_matches(['\r', '\n'])
                    .to_string()
            }
        };
        if response == "*" {
            return Ok(Reply::text("501 5.7.0 Authentication cancelled"));
        }
        let reply = self.judge_xoauth2(response.trim());
        if self.shared.google_auth_errors && self.login.is_none() {
            // Gmail: the error as a SASL challenge; the client answers with
            // an empty line, then gets the 535.
            use base64::Engine as _;
            let status = base64::engine::general_purpose::STANDARD
                .encode(r#"{"status":"400","schema":"Bearer","scope":"https://mail.google.com/"}"#);
            send(io, &format!("334 {status}")).await?;
            let mut line = Vec::new();
            if let Line::Closed = read_command(io, &mut line).await? {
                return Ok(Reply::Disconnect);
            }
            if line.as_slice() != b"\r\n" {
                self.auth_failed(
                    "client did not answer the 334 error challenge with an empty line",
                );
            }
            return Ok(Reply::text(
                "535-5.7.8 Username and Password not accepted. For more information, go to\r\n535 5.7.8  https://support.google.com/mail/?p=BadCredentials",
            ));
        }
        Ok(reply)
    }

    fn judge_xoauth2(&mut self, response: &str) -> Reply {
        let fault = lock(&self.shared.record).auth_faults.pop_front();
        if let Some(fault) = fault {
            self.auth_failed(&format!("scripted fault: {fault}"));
            return Reply::fault(&fault);
        }
        let Some((user, token)) = parse_xoauth2(response) else {
            self.auth_failed("malformed XOAUTH2");
            return Reply::text(AUTH_FAILED);
        };
        let claims = match self.shared.idp.check_access_token(&token) {
            Ok(claims) => claims,
            Err(rejection) => {
                self.auth_failed(&format!("token rejected: {rejection}"));
                return Reply::text(AUTH_FAILED);
            }
        };
        if !user.eq_ignore_ascii_case(&self.shared.mailbox) {
            self.auth_failed(&format!(
                "user '{user}' is not the mailbox '{}'",
                self.shared.mailbox
            ));
            return Reply::text(AUTH_FAILED);
        }
        let delegated = claims.scp.as_deref().is_some_and(|scp| {
            scp.split(' ')
                .any(|s| s == "SMTP.Send" || s == "https://mail.google.com/")
        });
        if !delegated && !claims.roles.iter().any(|r| r == SEND_AS_ROLE) {
            self.auth_failed("token grants neither SMTP.SendAsApp nor SMTP.Send");
            return Reply::text(AUTH_FAILED);
        }
        self.login = Some(Login {
            user,
            token,
            claims,
        });
        Reply::text("235 2.7.0 Authentication successful")
    }

    fn auth_failed(&self, reason: &str) {
        tracing::debug!(session = self.id, reason, "AUTH failed");
        lock(&self.shared.record)
            .auth_failures
            .push(reason.to_string());
    }

    fn mail(&mut self, arg: &str) -> Reply {
        if self.login.is_none() {
            return Reply::text(format!("{NOT_AUTHENTICATED} [MAIL FROM]"));
        }
        if self.mail_from.is_some() {
            return Reply::text("503 5.5.1 Sender already specified");
        }
        let Some((from, params)) = parse_path(arg, "FROM:") else {
            return Reply::text("501 5.5.4 Invalid arguments");
        };
        let too_big = params.split_whitespace().any(|p| {
            p.get(..5).is_some_and(|k| k.eq_ignore_ascii_case("SIZE="))
                && p[5..].parse::<u64>().is_ok_and(|n| n > MAX_MESSAGE as u64)
        });
        if too_big {
            return Reply::text("552 5.3.4 Message size exceeds fixed maximum message size");
        }
        self.mail_from = Some(from);
        Reply::text("250 2.1.0 Sender OK")
    }

    fn rcpt(&mut self, arg: &str) -> Reply {
        if self.login.is_none() {
            return Reply::text(format!("{NOT_AUTHENTICATED} [RCPT TO]"));
        }
        if self.mail_from.is_none() {
            return Reply::text("503 5.5.1 Need mail command");
        }
        let Some((to, _)) = parse_path(arg, "TO:").filter(|(to, _)| !to.is_empty()) else {
            return Reply::text("501 5.5.4 Invalid arguments");
        };
        let fault = {
            let mut record = lock(&self.shared.record);
            let position = record
                .rcpt_faults
                .iter()
                .position(|(address, _)| address.eq_ignore_ascii_case(&to));
            position.map(|i| record.rcpt_faults.remove(i).1)
        };
        if let Some(fault) = fault {
            if fault.starts_with('2') {
                self.rcpt_to.push(to);
            }
            return Reply::fault(&fault);
        }
        if self.rcpt_to.len() >= MAX_RECIPIENTS {
            return Reply::text("452 4.5.3 Too many recipients");
        }
        self.rcpt_to.push(to);
        Reply::text("250 2.1.5 Recipient OK")
    }

    async fn data<S>(&mut self, io: &mut BufReader<S>) -> io::Result<Reply>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if self.login.is_none() {
            return Ok(Reply::text(format!("{NOT_AUTHENTICATED} [DATA]")));
        }
        if self.rcpt_to.is_empty() {
            return Ok(Reply::text("554 5.5.1 Error: no valid recipients"));
        }
        send(io, "354 Start mail input; end with <CRLF>.<CRLF>").await?;
        let Some(data) = read_data(io).await? else {
            return Ok(Reply::Disconnect);
        };
        let from = self.mail_from.take().unwrap_or_default();
        let rcpt_to = std::mem::take(&mut self.rcpt_to);
        Ok(self.finish_message(from, rcpt_to, data))
    }

    /// Decides the fate of a complete message and records it.
    fn finish_message(&mut self, from: String, rcpt_to: Vec<String>, data: Data) -> Reply {
        let mailbox = &self.shared.mailbox;
        let mut record = lock(&self.shared.record);
        let refusal = if data.oversize {
            Some("552 5.3.4 Message size exceeds fixed maximum message size".to_string())
        } else if let Some(fault) = record.data_faults.pop_front() {
            Some(fault)
        } else if !from.eq_ignore_ascii_case(mailbox)
            && !record.send_as.iter().any(|a| a.eq_ignore_ascii_case(&from))
        {
            Some(format!(
                "554 5.2.252 SendAsDenied; {mailbox} not allowed to send as {from}; \
                 STOREDRV.Submit; Exception:SendAsDeniedException.MapiExceptionSendAsDenied; \
                 Failed to process message due to a permanent exception with message \
                 [BeginDiagnosticData]Cannot submit message."
            ))
        } else {
            None
        };
        if let Some(reply) = refusal {
            record.rejected.push(reply.clone());
            return Reply::fault(&reply);
        }
        drop(record);

        let login = self
            .login
            .as_ref()
            .expect("DATA is only accepted after a successful AUTH");
        // Exchange Online judges the token only at AUTH; a session outliving
        // its token keeps sending. Noted for debugging only.
        if let Err(rejection) = self.shared.idp.check_access_token(&login.token) {
            tracing::debug!(session = self.id, %rejection, "token no longer valid; accepting anyway");
        }
        let id: u64 = rand::random();
        self.shared.deliver(ReceivedMessage {
            session: self.id,
            auth_user: login.user.clone(),
            token_claims: login.claims.clone(),
            mail_from: from,
            rcpt_to,
            data: data.bytes,
        });
        Reply::text(format!(
            "250 2.0.0 OK <{id:016X}@{HOSTNAME}> [Hostname={HOSTNAME}]"
        ))
    }
}

/// Parses `FROM:<addr> params` / `TO:<addr> params` (keyword matched
/// case-insensitively, brackets optional). Returns the address and the rest.
fn parse_path<'a>(arg: &'a str, keyword: &str) -> Option<(String, &'a str)> {
    let head = arg.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = arg[keyword.len()..].trim_start();
    match rest.strip_prefix('<') {
        Some(inner) => {
            let end = inner.find('>')?;
            Some((inner[..end].to_string(), inner[end + 1..].trim()))
        }
        None => {
            let (address, params) = rest.split_once(' ').unwrap_or((rest, ""));
            (!address.is_empty()).then(|| (address.to_string(), params.trim()))
        }
    }
}

/// Decodes an XOAUTH2 initial response,
/// `base64("user=" user "\x01auth=Bearer " token "\x01\x01")`, into
/// (user, token).
fn parse_xoauth2(response: &str) -> Option<(String, String)> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(response)
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let fields = text.strip_suffix("\x01\x01")?;
    let mut user = None;
    let mut token = None;
    for field in fields.split('\x01') {
        if let Some(u) = field.strip_prefix("user=") {
            user = Some(u);
        } else if let Some(auth) = field.strip_prefix("auth=") {
            let (scheme, value) = auth.split_once(' ')?;
            if scheme.eq_ignore_ascii_case("Bearer") && !value.is_empty() {
                token = Some(value);
            }
        }
    }
    Some((user?.to_string(), token?.to_string()))
}

/// A message body read after DATA.
struct Data {
    bytes: Vec<u8>,
    oversize: bool,
}

/// Reads message data up to the `.` line, removing dot-stuffing. Returns
/// `None` if the connection closed or went idle first.
async fn read_data<S>(io: &mut BufReader<S>) -> io::Result<Option<Data>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut data = Data {
        bytes: Vec::new(),
        oversize: false,
    };
    let mut segment = Vec::new();
    // Only a CRLF ends a line: a "." after a bare LF is data, not the end
    // (the SMTP smuggling trick), and is not un-stuffed either.
    let mut line_start = true;
    let mut last_byte = b'\n';
    loop {
        segment.clear();
        let read = tokio::time::timeout(IDLE_TIMEOUT, read_segment(io, &mut segment, MAX_LINE));
        match read.await {
            Ok(Ok(0)) | Err(_) => return Ok(None),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
        if line_start && segment == b".\r\n" {
            return Ok(Some(data));
        }
        let content = match segment.strip_prefix(b".") {
            Some(rest) if line_start => rest,
            _ => &segment[..],
        };
        if data.bytes.len() + content.len() > MAX_MESSAGE {
            data.oversize = true;
        } else {
            data.bytes.extend_from_slice(content);
        }
        let previous = if segment.len() >= 2 {
            segment[segment.len() - 2]
        } else {
            last_byte
        };
        line_start = segment.ends_with(b"\n") && previous == b'\r';
        last_byte = segment[segment.len() - 1];
    }
}

/// Reads one command line into `line` (CRLF included), refusing lines longer
/// than [`MAX_LINE`] and giving up after [`IDLE_TIMEOUT`] of silence.
async fn read_command<S>(io: &mut BufReader<S>, line: &mut Vec<u8>) -> io::Result<Line>
where
    S: AsyncRead + Unpin,
{
    line.clear();
    let read = tokio::time::timeout(IDLE_TIMEOUT, read_segment(io, line, MAX_LINE));
    match read.await {
        Err(_) => return Ok(Line::Closed),
        Ok(result) => {
            if result? == 0 {
                return Ok(Line::Closed);
            }
        }
    }
    if line.ends_with(b"\n") {
        return Ok(Line::Complete);
    }
    if line.len() < MAX_LINE {
        // The peer closed mid-line.
        return Ok(Line::Closed);
    }
    // Skip the rest of the overlong line so the next command parses.
    let mut rest = Vec::new();
    loop {
        rest.clear();
        let read = tokio::time::timeout(IDLE_TIMEOUT, read_segment(io, &mut rest, MAX_LINE));
        match read.await {
            Err(_) | Ok(Ok(0)) => return Ok(Line::Closed),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(_)) if rest.ends_with(b"\n") => return Ok(Line::TooLong),
            Ok(Ok(_)) => {}
        }
    }
}

/// Appends bytes to `buf` up to and including the next `\n`, stopping early
/// at EOF or once `buf` holds `cap` bytes. Returns how many bytes were added
/// (0 only at EOF).
async fn read_segment<R>(io: &mut BufReader<R>, buf: &mut Vec<u8>, cap: usize) -> io::Result<usize>
where
    R: AsyncRead + Unpin,
{
    let start = buf.len();
    while buf.len() < cap {
        let available = io.fill_buf().await?;
        if available.is_empty() {
            break;
        }
        let room = cap - buf.len();
        let window = &available[..available.len().min(room)];
        let (take, done) = match window.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (window.len(), false),
        };
        buf.extend_from_slice(&window[..take]);
        io.consume(take);
        if done {
            break;
        }
    }
    Ok(buf.len() - start)
}

/// Writes one reply (which may span lines) in a single write, so Nagle's
/// algorithm cannot hold half of it back, and flushes it, since a TLS stream
/// would otherwise buffer it.
async fn send<S>(io: &mut BufReader<S>, reply: &str) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let writer = io.get_mut();
    writer.write_all(format!("{reply}\r\n").as_bytes()).await?;
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(
            parse_path("FROM:<a@b.c> SIZE=10", "FROM:"),
            Some(("a@b.c".to_string(), "SIZE=10"))
        );
        assert_eq!(
            parse_path("to: <x@y>", "TO:"),
            Some(("x@y".to_string(), ""))
        );
        assert_eq!(parse_path("FROM:<>", "FROM:"), Some((String::new(), "")));
        assert_eq!(parse_path("FROM a@b", "FROM:"), None);
        assert_eq!(parse_path("FROM:<unclosed", "FROM:"), None);
        assert_eq!(parse_path("é", "FROM:"), None);
    }

    #[test]
    fn xoauth2() {
        let encode = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(
            parse_xoauth2(&encode("user=a@b\x01auth=Bearer tok\x01\x01")),
            Some(("a@b".to_string(), "tok".to_string()))
        );
        assert_eq!(
            parse_xoauth2(&encode("user=a@b\x01auth=Bearer tok\x01")),
            None
        );
        assert_eq!(
            parse_xoauth2(&encode("user=a@b\x01auth=Basic tok\x01\x01")),
            None
        );
        assert_eq!(parse_xoauth2(&encode("auth=Bearer tok\x01\x01")), None);
        assert_eq!(parse_xoauth2("!!!"), None);
    }
}

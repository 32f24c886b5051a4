//! `sendmail`: the entry point that cron, PHP's `mail()`, `mailx` and
//! scripts run as `/usr/sbin/sendmail`. It reads a message from standard
//! input, completes its header as a sendmail does, and submits it to the
//! running relay's listener over SMTP, returning only after the relay's
//! `250`. Exit codes follow sysexits(3), so callers can tell a retryable
//! failure (75) from a refusal.
//!
//! sendmail's flags are getopt-style with glued values (`-oi`, `-odi`,
//! `-fSENDER`, `-ti`), which clap does not model: they are parsed here by
//! hand into [`Options`]. The relay's configuration is loaded without its
//! credentials, for the listener's address and the first account's mailbox.

use std::{
    ffi::OsString,
    fmt,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// `smtp-oauth-relay sendmail [OPTIONS] [RECIPIENT…]`, or the binary run as
/// `sendmail` through a symlink.
#[derive(clap::Args)]
#[command(
    disable_help_flag = true,
    after_help = "Options (as sendmail takes them; values may be glued, e.g. -fSENDER):
  -t            recipients from the To:, Cc: and Bcc: headers, added to those given; Bcc: is removed
  -i, -oi       a line with a lone dot does not end the message (without it, it does)
  -f, -r ADDR   the envelope sender (default: the first account's mailbox)
  -F NAME       the sender's full name, for a From: header added when missing
  -C FILE       the relay's configuration file (default: --config)
  -v            show the SMTP dialogue on standard error
  --            the rest are recipients
  -odi -odb -oem -oee -bm -m -B8BITMIME are accepted and ignored.
Exit status: 0 sent (the relay answered 250), 64 bad usage, 65 message or sender refused,
67 recipient refused, 69 relay refuses this client, 74 input unreadable, 75 relay not running or
answered 4xx (try again later), 78 configuration unreadable."
)]
pub struct SendmailArgs {
    /// sendmail's options, then the recipients.
    #[arg(
        allow_hyphen_values = true,
        trailing_var_arg = true,
        num_args = 0..,
        value_name = "ARGS"
    )]
    pub args: Vec<OsString>,
}

/// The command line to parse: when the binary runs as `sendmail`, the same
/// arguments as a `sendmail` verb (after `--`, so clap reads none of them).
pub fn argv(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut args: Vec<OsString> = args.collect();
    let invoked_as_sendmail = args
        .first()
        .and_then(|arg0| Path::new(arg0).file_name())
        .is_some_and(|name| name == "sendmail");
    if invoked_as_sendmail {
        args.splice(1..1, ["sendmail".into(), "--".into()]);
    }
    args
}

/// Runs the verb; what went wrong is one line on standard error.
pub fn sendmail(config: &Path, args: &[OsString]) -> ExitCode {
    match run(config, args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("sendmail: {}", failure.message);
            ExitCode::from(failure.exit as u8)
        }
    }
}

fn run(config: &Path, args: &[OsString]) -> Result<(), Failure> {
    let options = Options::parse(args)?;
    let relay = RelayView::load(options.config.as_deref().unwrap_or(config))?;
    let lines = read_lines(
        std::io::stdin().lock(),
        !options.ignore_dots,
        relay.max_message_size,
    )?;
    let envelope = compose(lines, &options, &relay, SystemTime::now())?;
    submit(relay.address, &envelope, options.verbose)
}

/// sysexits(3) codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Usage = 64,
    DataErr = 65,
    NoUser = 67,
    Unavailable = 69,
    IoErr = 74,
    TempFail = 75,
    Config = 78,
}

/// Why nothing was sent, and the exit code that says so.
#[derive(Debug, PartialEq, Eq)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
}

impl Failure {
    fn new(exit: Exit, message: impl Into<String>) -> Failure {
        Failure {
            exit,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (exit {})", self.message, self.exit as u8)
    }
}

/// The command line, parsed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// `-t`
    pub extract_recipients: bool,
    /// `-i`, `-oi`
    pub ignore_dots: bool,
    /// `-f`, `-r`; `Some("")` is the null sender.
    pub sender: Option<String>,
    /// `-F`
    pub full_name: Option<String>,
    /// `-C`
    pub config: Option<PathBuf>,
    /// `-v`
    pub verbose: bool,
    pub recipients: Vec<String>,
}

impl Options {
    /// getopt-style, stopping at the first non-option (as Postfix does):
    /// flags may be bundled (`-ti`), values glued (`-fSENDER`) or separate.
    pub fn parse(args: &[OsString]) -> Result<Options, Failure> {
        let mut options = Options::default();
        let mut args = args.iter().map(|arg| {
            arg.to_str()
                .ok_or_else(|| usage(format!("{arg:?} is not valid UTF-8")))
        });
        while let Some(arg) = args.next() {
            let arg = arg?;
            if arg == "--" {
                break;
            }
            let Some(flags) = arg.strip_prefix('-').filter(|flags| !flags.is_empty()) else {
                options.recipients.push(arg.to_owned());
                break;
            };
            for (at, flag) in flags.char_indices() {
                match flag {
                    't' => options.extract_recipients = true,
                    'i' => options.ignore_dots = true,
                    'v' => options.verbose = true,
                    // "me too": the sender is never left out here anyway
                    'm' => {}
                    'f' | 'r' | 'F' | 'C' | 'o' | 'b' | 'B' => {
                        let glued = &flags[at + flag.len_utf8()..];
                        let value = if glued.is_empty() {
                            args.next()
                                .ok_or_else(|| usage(format!("-{flag} needs a value")))??
                        } else {
                            glued
                        };
                        options.apply(flag, value)?;
                        break;
                    }
                    _ => {
                        return Err(usage(format!(
                            "unknown option -{flag} (in {arg}); `smtp-oauth-relay help sendmail` lists those accepted"
                        )))
                    }
                }
            }
        }
        for arg in args {
            options.recipients.push(arg?.to_owned());
        }
        Ok(options)
    }

    fn apply(&mut self, flag: char, value: &str) -> Result<(), Failure> {
        match flag {
            'f' | 'r' => {
                let value = value.trim();
                let bare = value
                    .strip_prefix('<')
                    .and_then(|v| v.strip_suffix('>'))
                    .unwrap_or(value);
                self.sender = Some(bare.to_owned());
            }
            'F' => self.full_name = Some(value.to_owned()),
            'C' => self.config = Some(PathBuf::from(value)),
            'o' => match value {
                "i" => self.ignore_dots = true,
                // delivery mode, error mode, "me too": the relay decides
                "di" | "db" | "dq" | "dbackground" | "dinteractive" | "em" | "ee" | "ep" | "eq"
                | "ew" | "m" => {}
                _ => return Err(usage(format!("unsupported option -o{value}"))),
            },
            'b' => match value {
                "m" => {}
                "p" => {
                    return Err(usage(
                        "-bp (list the queue) is `smtp-oauth-relay queue list` here",
                    ))
                }
                _ => {
                    return Err(usage(format!(
                        "-b{value} is not supported: this sendmail only submits mail (-bm)"
                    )))
                }
            },
            'B' if value.eq_ignore_ascii_case("7BIT") || value.eq_ignore_ascii_case("8BITMIME") => {
            }
            _ => return Err(usage(format!("unsupported option -{flag}{value}"))),
        }
        Ok(())
    }
}

fn usage(message: impl Into<String>) -> Failure {
    Failure::new(Exit::Usage, message)
}

/// What this verb needs of the relay's configuration: where it listens, how
/// large a message may be, and whom to send as by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayView {
    pub address: SocketAddr,
    pub hostname: String,
    pub max_message_size: u64,
    pub default_sender: Option<String>,
}

impl RelayView {
    /// Loads the relay's configuration as the admin verbs do (validated,
    /// environment overrides applied, no credential read), so callers run
    /// as any user, without the secret or `CREDENTIALS_DIRECTORY`.
    pub fn load(path: &Path) -> Result<RelayView, Failure> {
        let config =
            crate::check::load(path).map_err(|e| Failure::new(Exit::Config, format!("{e:#}")))?;
        let first = *config.listener.bind.first().ok_or_else(|| {
            Failure::new(
                Exit::Config,
                format!("{}: listener.bind is empty", path.display()),
            )
        })?;
        Ok(RelayView {
            address: crate::submit::reachable(first),
            max_message_size: config.listener.max_message_size,
            default_sender: config.accounts.into_iter().next().map(|a| a.mailbox),
            hostname: config.listener.hostname,
        })
    }
}

/// The input's lines, without their line ends (LF, or CRLF), up to the end
/// of input or, when `dot_ends_input`, a line holding a lone dot.
pub fn read_lines(
    mut input: impl BufRead,
    dot_ends_input: bool,
    max_size: u64,
) -> Result<Vec<Vec<u8>>, Failure> {
    let mut lines = Vec::new();
    let mut size = 0u64;
    loop {
        let mut line = Vec::new();
        let n = input.read_until(b'\n', &mut line).map_err(|e| {
            Failure::new(Exit::IoErr, format!("reading the message from stdin: {e}"))
        })?;
        if n == 0 {
            break;
        }
        size += n as u64;
        if size > max_size {
            return Err(Failure::new(
                Exit::DataErr,
                format!("the message is larger than the relay takes ({max_size} bytes, listener.max_message_size)"),
            ));
        }
        if line.last() == Some(&b'\n') {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
        }
        if dot_ends_input && line == b"." {
            break;
        }
        lines.push(line);
    }
    Ok(lines)
}

/// What goes on the wire: the envelope and the message with CRLF line
/// ends, not yet dot-stuffed.
#[derive(Debug, PartialEq, Eq)]
pub struct Envelope {
    pub sender: String,
    pub recipients: Vec<String>,
    pub data: Vec<u8>,
}

/// One header field, its continuation lines included.
struct Field {
    name: String,
    lines: Vec<Vec<u8>>,
}

impl Field {
    fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }

    /// The unfolded value.
    fn value(&self) -> String {
        let mut value = Vec::new();
        for (i, line) in self.lines.iter().enumerate() {
            value.extend_from_slice(if i == 0 {
                &line[self.name.len() + 1..]
            } else {
                line
            });
        }
        String::from_utf8_lossy(&value).trim().to_owned()
    }
}

/// The field name of a header line, if it is one (RFC 5322 2.2: printable
/// US-ASCII but the colon, then a colon).
fn field_name(line: &[u8]) -> Option<&str> {
    let colon = line.iter().position(|&b| b == b':')?;
    let name = &line[..colon];
    if name.is_empty() || !name.iter().all(|b| (33..=126).contains(b)) {
        return None;
    }
    std::str::from_utf8(name).ok()
}

/// Builds the envelope and completes the header as a sendmail does: `From:`,
/// `Date:` and `Message-ID:` when missing, `Bcc:` removed.
pub fn compose(
    lines: Vec<Vec<u8>>,
    options: &Options,
    relay: &RelayView,
    now: SystemTime,
) -> Result<Envelope, Failure> {
    let mut lines = lines.into_iter().peekable();
    // an mbox separator some scripts leave at the top
    if lines.peek().is_some_and(|line| line.starts_with(b"From ")) {
        lines.next();
    }
    let mut fields: Vec<Field> = Vec::new();
    // the header ends at an empty line (dropped: one is written back) or
    // at the first line that is no header field (then the body starts there)
    while let Some(line) = lines.peek() {
        if line.is_empty() {
            lines.next();
            break;
        }
        if let Some(name) = field_name(line) {
            let name = name.to_owned();
            let line = lines.next().unwrap_or_default();
            fields.push(Field {
                name,
                lines: vec![line],
            });
        } else if line.starts_with(b" ") || line.starts_with(b"\t") {
            match fields.last_mut() {
                Some(field) => field.lines.push(lines.next().unwrap_or_default()),
                None => break,
            }
        } else {
            break;
        }
    }

    let mut recipients: Vec<String> = Vec::new();
    let mut add = |address: String| {
        if !recipients.iter().any(|r| r.eq_ignore_ascii_case(&address)) {
            recipients.push(address);
        }
    };
    for recipient in &options.recipients {
        for address in address_list(recipient) {
            add(address);
        }
    }
    if options.extract_recipients {
        for field in fields
            .iter()
            .filter(|f| f.is("To") || f.is("Cc") || f.is("Bcc"))
        {
            for address in address_list(&field.value()) {
                add(address);
            }
        }
    }
    if recipients.is_empty() {
        return Err(usage(if options.extract_recipients {
            "no recipients: the message has no To:, Cc: or Bcc: address, and none was given"
        } else {
            "no recipients: give them as arguments, or use -t to read To:, Cc: and Bcc:"
        }));
    }
    fields.retain(|f| !f.is("Bcc"));

    let sender = match (&options.sender, &relay.default_sender) {
        (Some(sender), _) => sender.clone(),
        (None, Some(mailbox)) => mailbox.clone(),
        (None, None) => {
            return Err(Failure::new(
                Exit::Config,
                "no sender: pass -f ADDRESS, or configure an [[accounts]] mailbox",
            ))
        }
    };
    let from = if sender.is_empty() {
        relay.default_sender.clone().unwrap_or_default()
    } else {
        sender.clone()
    };
    let mut added: Vec<String> = Vec::new();
    if !fields.iter().any(|f| f.is("From")) && !from.is_empty() {
        added.push(match &options.full_name {
            Some(name) => format!("From: {} <{from}>", display_name(name)),
            None => format!("From: {from}"),
        });
    }
    if !fields.iter().any(|f| f.is("Date")) {
        added.push(format!("Date: {}", rfc5322_date(now)));
    }
    if !fields.iter().any(|f| f.is("Message-ID")) {
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        added.push(format!(
            "Message-ID: <{}.{:09}.{}@{}>",
            since.as_secs(),
            since.subsec_nanos(),
            std::process::id(),
            relay.hostname
        ));
    }

    let mut data = Vec::new();
    for line in fields.iter().flat_map(|f| &f.lines) {
        data.extend_from_slice(line);
        data.extend_from_slice(b"\r\n");
    }
    for line in &added {
        data.extend_from_slice(line.as_bytes());
        data.extend_from_slice(b"\r\n");
    }
    data.extend_from_slice(b"\r\n");
    for line in lines {
        data.extend_from_slice(&line);
        data.extend_from_slice(b"\r\n");
    }
    Ok(Envelope {
        sender,
        recipients,
        data,
    })
}

/// The addresses of an RFC 5322 address list: display names, comments and
/// group names dropped, `<…>` preferred.
pub fn address_list(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut bare = String::new();
    let mut angle: Option<String> = None;
    let mut in_angle = false;
    let mut in_quote = false;
    let mut comment_depth = 0usize;
    let mut chars = value.chars();
    let mut flush = |bare: &mut String, angle: &mut Option<String>| {
        let address = angle.take().unwrap_or_else(|| bare.clone());
        let address = address.trim();
        if !address.is_empty() {
            out.push(address.to_owned());
        }
        bare.clear();
    };
    while let Some(c) = chars.next() {
        let target = match (in_angle, angle.as_mut()) {
            (true, Some(angle)) => angle,
            _ => &mut bare,
        };
        if in_quote {
            target.push(c);
            match c {
                '\\' => target.extend(chars.next()),
                '"' => in_quote = false,
                _ => {}
            }
            continue;
        }
        if comment_depth > 0 {
            match c {
                '(' => comment_depth += 1,
                ')' => comment_depth -= 1,
                '\\' => {
                    chars.next();
                }
                _ => {}
            }
            continue;
        }
        match c {
            '(' => comment_depth = 1,
            '"' => {
                in_quote = true;
                target.push(c);
            }
            '<' => {
                in_angle = true;
                angle = Some(String::new());
            }
            '>' => in_angle = false,
            ',' | ';' if !in_angle => flush(&mut bare, &mut angle),
            // a group's name ends at the colon
            ':' if !in_angle => bare.clear(),
            c if c.is_whitespace() => {}
            c => target.push(c),
        }
    }
    flush(&mut bare, &mut angle);
    out
}

/// A display name as a header may carry it: bare when it is plain words,
/// quoted when it holds specials, RFC 2047-encoded when not ASCII.
fn display_name(name: &str) -> String {
    use base64::Engine as _;
    if !name.is_ascii() {
        let encoded = base64::engine::general_purpose::STANDARD.encode(name);
        return format!("=?UTF-8?B?{encoded}?=");
    }
    let plain = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == ' ' || "!#$%&'*+-/=?^_`{|}~".contains(c));
    if plain {
        name.to_owned()
    } else {
        let escaped = name.replace('\\', "\\\\").replace('"', "\\\"");
        format!("\"{escaped}\"")
    }
}

/// `Wed, 02 Dec 2026 04:24:21 +0000`.
fn rfc5322_date(now: SystemTime) -> String {
    // IMF-fixdate with RFC 5322's numeric zone instead of the obsolete "GMT"
    let http = httpdate::fmt_http_date(now);
    match http.strip_suffix("GMT") {
        Some(stem) => format!("{stem}+0000"),
        None => http,
    }
}

/// The SMTP step a reply answers, which decides the exit code of a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Greeting,
    Ehlo,
    Mail,
    Rcpt,
    Data,
    EndOfData,
}

/// The refusal `reply` to `step` as a failure; `None` when it is a success.
fn refusal(step: Step, reply: &str) -> Option<Failure> {
    let exit = match (reply.as_bytes().first(), step) {
        (Some(b'2' | b'3'), _) => return None,
        (Some(b'4'), _) => Exit::TempFail,
        (_, Step::Greeting | Step::Ehlo) => Exit::Unavailable,
        (_, Step::Rcpt) => Exit::NoUser,
        (_, Step::Mail | Step::Data | Step::EndOfData) => Exit::DataErr,
    };
    let what = match step {
        Step::Greeting => "refused the connection",
        Step::Ehlo => "refused EHLO",
        Step::Mail => "refused the sender",
        Step::Rcpt => "refused the recipient",
        Step::Data => "refused DATA",
        Step::EndOfData => "refused the message",
    };
    Some(Failure::new(
        exit,
        format!("the relay {what}: {}", reply.replace("\r\n", " / ")),
    ))
}

/// RFC 5321 4.5.3.2's client timeouts, one per step.
fn timeout(step: Step) -> Duration {
    Duration::from_secs(match step {
        Step::Data => 120,
        Step::EndOfData => 600,
        _ => 300,
    })
}

struct Session {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    verbose: bool,
}

impl Session {
    /// One whole reply (its lines joined by CRLF).
    fn reply(&mut self, step: Step) -> Result<String, Failure> {
        let lost = |e: std::io::Error| {
            Failure::new(
                Exit::TempFail,
                format!("the relay did not answer ({e}); the message was not sent"),
            )
        };
        self.writer
            .set_read_timeout(Some(timeout(step)))
            .map_err(lost)?;
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).map_err(lost)? == 0 {
                return Err(lost(std::io::ErrorKind::UnexpectedEof.into()));
            }
            let line = line.trim_end().to_owned();
            if self.verbose {
                eprintln!("<<< {line}");
            }
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line);
            if last {
                return Ok(lines.join("\r\n"));
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        self.writer.write_all(bytes).map_err(|e| {
            Failure::new(
                Exit::TempFail,
                format!("writing to the relay: {e}; the message was not sent"),
            )
        })
    }

    /// Sends `line` and returns the reply, or the failure a refusal means.
    fn command(&mut self, step: Step, line: &str) -> Result<String, Failure> {
        if self.verbose {
            eprintln!(">>> {line}");
        }
        self.send(format!("{line}\r\n").as_bytes())?;
        let reply = self.reply(step)?;
        match refusal(step, &reply) {
            Some(failure) => Err(failure),
            None => Ok(reply),
        }
    }
}

/// Submits `envelope` to the relay at `address`; `Ok` once it answered 250.
pub fn submit(address: SocketAddr, envelope: &Envelope, verbose: bool) -> Result<(), Failure> {
    let stream = TcpStream::connect_timeout(&address, Duration::from_secs(10)).map_err(|e| {
        Failure::new(
            Exit::TempFail,
            format!("cannot reach the relay at {address} ({e}): is smtp-oauth-relay running? The message was not sent"),
        )
    })?;
    let writer = stream
        .try_clone()
        .map_err(|e| Failure::new(Exit::TempFail, format!("connection to {address}: {e}")))?;
    let _ = writer.set_write_timeout(Some(timeout(Step::EndOfData)));
    let mut session = Session {
        reader: BufReader::new(stream),
        writer,
        verbose,
    };
    let greeting = session.reply(Step::Greeting)?;
    if let Some(failure) = refusal(Step::Greeting, &greeting) {
        return Err(failure);
    }
    let ehlo = session.command(Step::Ehlo, "EHLO localhost")?;
    let offers = |keyword: &str| {
        ehlo.lines().skip(1).any(|line| {
            line.get(4..)
                .and_then(|ext| ext.split_whitespace().next())
                .is_some_and(|ext| ext.eq_ignore_ascii_case(keyword))
        })
    };
    let mut mail = format!("MAIL FROM:<{}>", envelope.sender);
    if offers("SIZE") {
        mail.push_str(&format!(" SIZE={}", envelope.data.len()));
    }
    if envelope.data.iter().any(|&b| b >= 0x80) && offers("8BITMIME") {
        mail.push_str(" BODY=8BITMIME");
    }
    let header_end = envelope
        .data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(envelope.data.len());
    let needs_utf8 = !envelope.sender.is_ascii()
        || envelope.recipients.iter().any(|r| !r.is_ascii())
        || !envelope.data[..header_end].is_ascii();
    if needs_utf8 && offers("SMTPUTF8") {
        mail.push_str(" SMTPUTF8");
    }
    session.command(Step::Mail, &mail)?;
    let mut refused = Vec::new();
    for recipient in &envelope.recipients {
        match session.command(Step::Rcpt, &format!("RCPT TO:<{recipient}>")) {
            Ok(_) => {}
            Err(failure) if failure.exit == Exit::TempFail => return Err(failure),
            Err(failure) => {
                let hint = if recipient.contains('@') {
                    ""
                } else {
                    " (mail leaves through Microsoft 365: use a full address, e.g. MAILTO=you@example.com)"
                };
                refused.push(format!("<{recipient}>: {}{hint}", failure.message));
            }
        }
    }
    if !refused.is_empty() {
        // nothing is sent unless every recipient is taken, so a retry by
        // the caller cannot duplicate the message
        let _ = session.send(b"QUIT\r\n");
        return Err(Failure::new(
            Exit::NoUser,
            format!("{}; the message was not sent", refused.join("; ")),
        ));
    }
    session.command(Step::Data, "DATA")?;
    let mut wire = Vec::with_capacity(envelope.data.len() + envelope.data.len() / 64 + 8);
    for line in envelope.data.split_inclusive(|&b| b == b'\n') {
        if line.first() == Some(&b'.') {
            wire.push(b'.');
        }
        wire.extend_from_slice(line);
    }
    wire.extend_from_slice(b".\r\n");
    if verbose {
        eprintln!(">>> ({} bytes of message)", envelope.data.len());
    }
    session.send(&wire)?;
    let reply = session.reply(Step::EndOfData)?;
    if let Some(failure) = refusal(Step::EndOfData, &reply) {
        return Err(failure);
    }
    let _ = session.send(b"QUIT\r\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, Failure> {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        Options::parse(&args)
    }

    fn relay() -> RelayView {
        RelayView {
            address: "127.0.0.1:2525".parse().expect("address"),
            hostname: "relay.test".into(),
            max_message_size: 1000,
            default_sender: Some("relay@contoso.com".into()),
        }
    }

    fn lines(text: &str) -> Vec<Vec<u8>> {
        read_lines(text.as_bytes(), false, 1 << 20).expect("lines")
    }

    fn compose_text(text: &str, options: &Options) -> (Envelope, String) {
        let now = UNIX_EPOCH + Duration::from_secs(1_796_185_461);
        let envelope = compose(lines(text), options, &relay(), now).expect("composed");
        let data = String::from_utf8(envelope.data.clone()).expect("utf-8");
        (envelope, data)
    }

    #[test]
    fn parses_what_cron_php_and_mailx_pass() {
        let o = parse(&["-t", "-i"]).expect("ok");
        assert!(o.extract_recipients && o.ignore_dots);
        assert_eq!(parse(&["-ti"]).expect("ok"), o);
        let o = parse(&["-oi", "-f", "app@example.com", "--", "a@example.com"]).expect("ok");
        assert!(o.ignore_dots);
        assert_eq!(o.sender.as_deref(), Some("app@example.com"));
        assert_eq!(o.recipients, ["a@example.com"]);
        let o = parse(&["-FCron Daemon", "-r<x@example.com>", "b@example.com"]).expect("ok");
        assert_eq!(o.full_name.as_deref(), Some("Cron Daemon"));
        assert_eq!(o.sender.as_deref(), Some("x@example.com"));
        assert_eq!(o.recipients, ["b@example.com"]);
        let o = parse(&[
            "-odi",
            "-oem",
            "-bm",
            "-v",
            "-B8BITMIME",
            "-m",
            "c@example.com",
        ])
        .expect("ok");
        assert!(o.verbose && !o.ignore_dots && !o.extract_recipients);
        assert_eq!(o.recipients, ["c@example.com"]);
        // Debian's cron
        let o = parse(&[
            "-FCronDaemon",
            "-i",
            "-B8BITMIME",
            "-oem",
            "root@example.com",
        ])
        .expect("ok");
        assert_eq!(o.full_name.as_deref(), Some("CronDaemon"));
        assert!(o.ignore_dots);
        assert_eq!(o.recipients, ["root@example.com"]);
        let o = parse(&["-f", "", "-C", "/tmp/relay.toml", "d@example.com"]).expect("ok");
        assert_eq!(o.sender.as_deref(), Some(""));
        assert_eq!(o.config, Some(PathBuf::from("/tmp/relay.toml")));
    }

    #[test]
    fn options_stop_at_the_first_recipient_or_double_dash() {
        let o = parse(&["a@example.com", "-t"]).expect("ok");
        assert_eq!(o.recipients, ["a@example.com", "-t"]);
        assert!(!o.extract_recipients);
        let o = parse(&["-i", "--", "-odd@example.com"]).expect("ok");
        assert_eq!(o.recipients, ["-odd@example.com"]);
    }

    #[test]
    fn refuses_unknown_and_incomplete_flags() {
        for args in [
            &["-x"][..],
            &["-tx"],
            &["-f"],
            &["-oQ/var/spool"],
            &["-bs"],
            &["-bp"],
            &["-Bbinary"],
            &["--help"],
        ] {
            let failure = parse(args).expect_err("refused");
            assert_eq!(failure.exit, Exit::Usage, "{args:?}: {failure}");
        }
        assert!(parse(&["-x"])
            .expect_err("refused")
            .message
            .contains("unknown option -x"));
    }

    #[test]
    fn a_lone_dot_ends_input_unless_ignored() {
        let input = "Subject: a\n\nline\n.\nafter\n";
        let read = |dot| read_lines(input.as_bytes(), dot, 1 << 20).expect("lines");
        assert_eq!(read(true), [&b"Subject: a"[..], b"", b"line"]);
        assert_eq!(read(false).len(), 5);
        let crlf = read_lines(&b"a\r\n.\r\nb\r\n"[..], true, 100).expect("lines");
        assert_eq!(crlf, [b"a"]);
        let failure = read_lines(&b"0123456789\n"[..], false, 5).expect_err("too large");
        assert_eq!(failure.exit, Exit::DataErr);
    }

    #[test]
    fn completes_the_header_and_converts_line_ends() {
        let options = parse(&["a@example.com"]).expect("ok");
        let (envelope, data) = compose_text("Subject: hi\n\nbody \u{e9}\n.dot\n", &options);
        assert_eq!(envelope.sender, "relay@contoso.com");
        assert_eq!(envelope.recipients, ["a@example.com"]);
        assert_eq!(
            data,
            "Subject: hi\r\nFrom: relay@contoso.com\r\nDate: Wed, 02 Dec 2026 04:24:21 +0000\r\n\
             Message-ID: <1796185461.000000000."
                .to_owned()
                + &std::process::id().to_string()
                + "@relay.test>\r\n\r\nbody \u{e9}\r\n.dot\r\n"
        );
    }

    #[test]
    fn keeps_what_the_message_has_and_names_the_sender() {
        let options = parse(&[
            "-F",
            "Cron Daemon",
            "-f",
            "cron@example.com",
            "a@example.com",
        ])
        .expect("ok");
        let (_, data) = compose_text(
            "From: App <app@example.com>\nDate: x\nMessage-ID: <m@x>\n\nHi\n",
            &options,
        );
        assert_eq!(
            data,
            "From: App <app@example.com>\r\nDate: x\r\nMessage-ID: <m@x>\r\n\r\nHi\r\n"
        );
        let (envelope, data) = compose_text("Date: x\nMessage-ID: <m@x>\n\nHi\n", &options);
        assert_eq!(envelope.sender, "cron@example.com");
        assert!(data.starts_with(
            "Date: x\r\nMessage-ID: <m@x>\r\nFrom: Cron Daemon <cron@example.com>\r\n\r\n"
        ));
        let options = parse(&["-F", "Zoë, \"Ops\"", "a@example.com"]).expect("ok");
        let (_, data) = compose_text("Date: x\nMessage-ID: <m@x>\n\nHi\n", &options);
        assert!(data.contains("From: =?UTF-8?B?Wm/DqywgIk9wcyI=?= <relay@contoso.com>\r\n"));
        assert_eq!(display_name("Ops, \"Night\""), "\"Ops, \\\"Night\\\"\"");
    }

    #[test]
    fn extracts_recipients_and_removes_bcc() {
        let options = parse(&["-t", "-i", "extra@example.com"]).expect("ok");
        let (envelope, data) = compose_text(
            "From: me@example.com\nTo: \"Doe, John\" <john@example.com>, jane@example.com (Jane)\nCc: team: a@example.com, B@Example.com;,\n JOHN@example.com\nBcc: hidden@example.com\nSubject: s\nDate: x\nMessage-ID: <m@x>\n\nbody\n",
            &options,
        );
        assert_eq!(
            envelope.recipients,
            [
                "extra@example.com",
                "john@example.com",
                "jane@example.com",
                "a@example.com",
                "B@Example.com",
                "hidden@example.com"
            ]
        );
        assert!(!data.contains("Bcc"), "{data}");
        assert!(data.contains("Cc: team: a@example.com, B@Example.com;,\r\n JOHN@example.com\r\n"));
        let failure = compose(
            lines("Subject: none\n\n"),
            &parse(&["-t"]).expect("ok"),
            &relay(),
            UNIX_EPOCH,
        )
        .expect_err("no recipients");
        assert_eq!(failure.exit, Exit::Usage);
    }

    #[test]
    fn a_body_without_header_gets_one() {
        let options = parse(&["a@example.com"]).expect("ok");
        let (_, data) = compose_text(
            "From nobody Mon Jan 1 00:00:00 2026\nno header here\n",
            &options,
        );
        assert!(data.starts_with("From: relay@contoso.com\r\n"), "{data}");
        assert!(data.ends_with("\r\n\r\nno header here\r\n"), "{data}");
    }

    #[test]
    fn address_lists() {
        assert_eq!(address_list("a@x, b@y"), ["a@x", "b@y"]);
        assert_eq!(
            address_list("undisclosed-recipients:;"),
            Vec::<String>::new()
        );
        assert_eq!(
            address_list("\"q, r\" <q@x> (c, d), <\"odd local\"@y>"),
            ["q@x", "\"odd local\"@y"]
        );
        assert_eq!(address_list("root"), ["root"]);
    }

    #[test]
    fn refusals_map_to_sysexits() {
        assert_eq!(refusal(Step::Rcpt, "250 ok"), None);
        assert_eq!(refusal(Step::Data, "354 go"), None);
        let exit = |step, reply| refusal(step, reply).map(|f| f.exit);
        assert_eq!(exit(Step::Rcpt, "451 later"), Some(Exit::TempFail));
        assert_eq!(exit(Step::Rcpt, "550 no"), Some(Exit::NoUser));
        assert_eq!(exit(Step::EndOfData, "554 no"), Some(Exit::DataErr));
        assert_eq!(exit(Step::Mail, "550 no"), Some(Exit::DataErr));
        assert_eq!(exit(Step::Greeting, "554 no"), Some(Exit::Unavailable));
    }

    #[test]
    fn wildcard_bind_is_reached_on_loopback_without_the_secret() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[listener]\nbind = [\"0.0.0.0:2600\"]\nhostname = \"h.test\"\n\
             [[accounts]]\nname = \"a\"\nmailbox = \"m@x.test\"\n\
             [accounts.oauth]\nflow = \"client_credentials\"\ntenant_id = \"x.test\"\n\
             client_id = \"11111111-2222-3333-4444-555555555555\"\n\
             client_secret_file = \"${UNSET_VARIABLE}/s\"\n",
        )
        .expect("write");
        let view = RelayView::load(&path).expect("loaded");
        assert_eq!(view.address, "127.0.0.1:2600".parse().expect("addr"));
        assert_eq!(view.default_sender.as_deref(), Some("m@x.test"));
        assert_eq!(view.hostname, "h.test");
        let missing = RelayView::load(&dir.path().join("none.toml")).expect_err("missing");
        assert_eq!(missing.exit, Exit::Config);
    }
}

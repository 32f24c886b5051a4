//! The listener end to end, over real TCP: the server is started with
//! `bind` + `serve` exactly as the relay does, a raw `TcpStream` writes exact
//! bytes, and every reply is compared byte for byte. What was accepted is
//! checked in the queue directory itself.

use relay_listener::{session::Context, Router};
use relay_queue::{list, Entry, Queue, QueueSettings};
use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};
use tempfile::TempDir;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

/// Upper bound of every wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

const HOST: &str = "relay.test";

/// Awaits `f`, failing the test if it takes longer than [`WAIT`].
async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

// ---------------------------------------------------------------- the server

/// One `[[accounts]]` table.
fn account(name: &str, senders: &[&str]) -> String {
    let senders: Vec<String> = senders.iter().map(|s| format!("{s:?}")).collect();
    format!(
        r#"
[[accounts]]
name = "{name}"
mailbox = "{name}@contoso.com"
senders = [{}]

[accounts.oauth]
flow = "client_credentials"
tenant_id = "t"
client_id = "c"
client_secret = "s"
"#,
        senders.join(", ")
    )
}

/// What a test may change in the configuration.
struct Setup {
    /// Where the listener binds.
    bind: SocketAddr,
    /// Extra keys of `[listener]`.
    listener: String,
    /// The `[[accounts]]` tables.
    accounts: String,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            listener: String::new(),
            accounts: account("main", &["*"]),
        }
    }
}

impl Setup {
    fn listener(mut self, keys: &str) -> Self {
        self.listener.push_str(keys);
        self.listener.push('\n');
        self
    }

    fn accounts(mut self, tables: &[String]) -> Self {
        self.accounts = tables.concat();
        self
    }

    fn bind(mut self, addr: &str) -> Self {
        self.bind = addr.parse().expect("bind address");
        self
    }

    async fn start(self) -> Relay {
        let toml = format!(
            "[listener]\nhostname = \"{HOST}\"\n{}\n{}",
            self.listener, self.accounts
        );
        let config = relay_config::load_str(&toml).expect("valid test configuration");
        let dir = TempDir::new().expect("temp dir");
        let queue = within(
            "opening the queue",
            Queue::open(QueueSettings {
                dir: dir.path().to_path_buf(),
                retry_initial: Duration::from_secs(60),
                retry_max: Duration::from_secs(3600),
                max_age: Duration::from_secs(86400),
            }),
        )
        .await
        .expect("open queue");
        let listener = relay_listener::bind(&[self.bind]).await.expect("bind");
        let addr = listener.local_addrs()[0];
        let ctx = Arc::new(Context {
            router: Router::new(&config.accounts),
            config: config.listener,
            queue: queue.clone(),
        });
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(relay_listener::serve(listener, ctx, shutdown.clone()));
        Relay {
            addr,
            dir,
            queue,
            shutdown,
            server,
        }
    }
}

/// A running listener over a queue in a temporary directory.
struct Relay {
    addr: SocketAddr,
    dir: TempDir,
    queue: Queue,
    shutdown: CancellationToken,
    server: JoinHandle<()>,
}

impl Relay {
    async fn start() -> Relay {
        Setup::default().start().await
    }

    /// A new client, greeting already checked.
    async fn client(&self) -> Client {
        let mut c = self.connect().await;
        c.expect(&format!("220 {HOST} ESMTP smtp-oauth-relay ready\r\n"))
            .await;
        c
    }

    /// A new client, greeting not read yet.
    async fn connect(&self) -> Client {
        Client::connect(self.addr).await
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Every queued message, in id order.
    fn entries(&self) -> Vec<Entry> {
        list(self.path()).expect("list the queue")
    }

    /// The only queued message and its stored body.
    fn single(&self) -> (Entry, Vec<u8>) {
        let mut entries = self.entries();
        assert_eq!(entries.len(), 1, "queued: {entries:?}");
        let entry = entries.remove(0);
        let body = self.body(&entry.id);
        (entry, body)
    }

    /// The stored body of message `id`, straight from the queue directory.
    fn body(&self, id: &str) -> Vec<u8> {
        std::fs::read(self.path().join("body").join(id)).expect("read body")
    }

    /// Cancels the shutdown token and waits (bounded) for `serve` to return.
    async fn stop(self) {
        self.shutdown.cancel();
        within("serve() returning after shutdown", self.server)
            .await
            .expect("serve task");
    }
}

// ---------------------------------------------------------------- the client

/// A raw SMTP client: writes bytes, reads complete replies.
struct Client {
    stream: TcpStream,
    /// Received but not yet returned.
    buf: Vec<u8>,
    /// How long to wait for the server to send something.
    wait: Duration,
}

/// The length of the first complete reply in `buf` (every line up to and
/// including the one without `-` after the code), if it is all there.
fn complete_reply(buf: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(pos) = buf[start..].windows(2).position(|w| w == b"\r\n") {
        let line = &buf[start..start + pos];
        start += pos + 2;
        if line.get(3) != Some(&b'-') {
            return Some(start);
        }
    }
    None
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let stream = within("connecting", TcpStream::connect(addr))
            .await
            .expect("connect");
        Client {
            stream,
            buf: Vec::new(),
            wait: WAIT,
        }
    }

    async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        within("writing", self.stream.write_all(bytes.as_ref()))
            .await
            .expect("write");
    }

    /// Reads more from the server; 0 at the end of the stream.
    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 8192];
        let read = tokio::time::timeout(self.wait, self.stream.read(&mut chunk));
        match read.await.expect("timed out waiting for the server") {
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                n
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
            Err(e) => panic!("read: {e}"),
        }
    }

    /// The next complete reply, exactly as sent (CRLFs included).
    async fn reply(&mut self) -> String {
        loop {
            if let Some(end) = complete_reply(&self.buf) {
                let reply: Vec<u8> = self.buf.drain(..end).collect();
                return String::from_utf8(reply).expect("replies are UTF-8");
            }
            if self.fill().await == 0 {
                panic!(
                    "connection closed while waiting for a reply; had {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
            }
        }
    }

    /// The next reply must be exactly `expected`.
    async fn expect(&mut self, expected: &str) {
        assert_eq!(self.reply().await, expected);
    }

    /// Sends `line` (CRLF added) and expects exactly `reply` (CRLF added).
    async fn cmd(&mut self, line: &str, reply: &str) {
        self.send(format!("{line}\r\n")).await;
        assert_eq!(
            self.reply().await,
            format!("{reply}\r\n"),
            "reply to {line:?}"
        );
    }

    /// The server must close the connection, with nothing more sent.
    async fn closed(&mut self) {
        while self.fill().await > 0 {}
        assert!(
            self.buf.is_empty(),
            "unexpected bytes before the close: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
    }

    /// Sends the whole message (already dot-stuffed, ending in CRLF) and
    /// the end of data; returns the queue id from `250 2.0.0 Ok: queued as`.
    async fn data(&mut self, wire: &[u8]) -> String {
        self.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>")
            .await;
        self.send([wire, b".\r\n"].concat()).await;
        queued_id(&self.reply().await)
    }

    /// A whole transaction for one recipient; returns the queue id.
    async fn mail(&mut self, from: &str, to: &str, wire: &[u8]) -> String {
        self.cmd(&format!("MAIL FROM:<{from}>"), "250 2.1.0 Ok")
            .await;
        self.cmd(&format!("RCPT TO:<{to}>"), "250 2.1.5 Ok").await;
        self.data(wire).await
    }
}

/// The id in a `250 2.0.0 Ok: queued as ID` reply (which must be exactly that).
fn queued_id(reply: &str) -> String {
    let id = reply
        .strip_prefix("250 2.0.0 Ok: queued as ")
        .and_then(|rest| rest.strip_suffix("\r\n"))
        .unwrap_or_else(|| panic!("not a queued-as reply: {reply:?}"));
    assert!(
        id.len() == 16
            && id
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase()),
        "not a queue id: {id:?}"
    );
    id.to_owned()
}

/// Every CR is followed by LF and every LF preceded by CR.
fn only_crlf(body: &[u8]) -> bool {
    body.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => body.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && body[i - 1] == b'\r',
        _ => true,
    })
}

// ------------------------------------------------------------------ commands

#[tokio::test]
async fn greeting_and_simple_commands() {
    let relay = Setup::default()
        .listener("max_message_size = 12345")
        .start()
        .await;
    let mut c = relay.connect().await;
    c.expect("220 relay.test ESMTP smtp-oauth-relay ready\r\n")
        .await;
    c.send("EHLO client.example\r\n").await;
    c.expect(
        "250-relay.test Hello client.example\r\n\
         250-PIPELINING\r\n\
         250-SIZE 12345\r\n\
         250-8BITMIME\r\n\
         250-SMTPUTF8\r\n\
         250 ENHANCEDSTATUSCODES\r\n",
    )
    .await;
    c.cmd("HELO client.example", "250 relay.test").await;
    c.cmd("NOOP", "250 2.0.0 Ok").await;
    c.cmd("RSET", "250 2.0.0 Ok").await;
    c.cmd(
        "HELP",
        "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT",
    )
    .await;
    c.cmd(
        "VRFY someone",
        "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery",
    )
    .await;
    // lower case commands are commands too
    c.cmd("noop", "250 2.0.0 Ok").await;
    c.cmd("QUIT", "221 2.0.0 Bye").await;
    c.closed().await;
    assert!(relay.entries().is_empty());
    relay.stop().await;
}

#[tokio::test]
async fn full_transaction_is_queued_exactly() {
    let relay = Relay::start().await;
    let mut c = relay.client().await;
    c.send("EHLO app.example\r\n").await;
    assert!(c.reply().await.ends_with("250 ENHANCEDSTATUSCODES\r\n"));
    c.cmd("MAIL FROM:<app@contoso.com>", "250 2.1.0 Ok").await;
    c.cmd("RCPT TO:<alice@example.com>", "250 2.1.5 Ok").await;
    c.cmd("RCPT TO:<bob@example.org>", "250 2.1.5 Ok").await;
    let wire = b"From: app@contoso.com\r\nTo: alice@example.com\r\nSubject: hi\r\n\r\nHello.\r\n";
    let id = c.data(wire).await;
    c.cmd("QUIT", "221 2.0.0 Bye").await;
    c.closed().await;

    let (entry, body) = relay.single();
    assert_eq!(entry.id, id);
    assert_eq!(entry.sender, "app@contoso.com");
    assert_eq!(entry.recipients, ["alice@example.com", "bob@example.org"]);
    assert_eq!(entry.account, "main");
    assert_eq!(entry.state, relay_queue::State::Queued);
    assert_eq!(entry.size, wire.len() as u64);
    assert_eq!(body, wire);

    // the queue itself hands the same message out, byte for byte
    let lease = within("next_due", relay.queue.next_due("main", None))
        .await
        .expect("a due message");
    assert_eq!(lease.id.as_str(), id);
    assert_eq!(lease.sender, "app@contoso.com");
    assert_eq!(lease.recipients, ["alice@example.com", "bob@example.org"]);
    assert_eq!(lease.client, Some("127.0.0.1".parse().expect("ip")));
    let stored = within("read_body", relay.queue.read_body(&lease))
        .await
        .expect("body");
    assert_eq!(stored, wire);
    drop(lease);
    relay.stop().await;
}

#[tokio::test]
async fn null_sender_and_utf8_addresses() {
    let relay = Relay::start().await;
    let mut c = relay.client().await;
    c.cmd("EHLO app.example", "250-relay.test Hello app.example\r\n250-PIPELINING\r\n250-SIZE 36700160\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES")
        .await;
    c.cmd("MAIL FROM:<> BODY=8BITMIME", "250 2.1.0 Ok").await;
    c.cmd("RCPT TO:<postmaster@example.com>", "250 2.1.5 Ok")
        .await;
    let bounce = c.data(b"Subject: bounce\r\n\r\nx\r\n").await;
    c.cmd("MAIL FROM:<grüße@contoso.com> SMTPUTF8", "250 2.1.0 Ok")
        .await;
    c.cmd("RCPT TO:<jürgen@exämple.com>", "250 2.1.5 Ok").await;
    let utf8 = c.data("Subject: Grüße\r\n\r\n☃\r\n".as_bytes()).await;
    c.cmd("QUIT", "221 2.0.0 Bye").await;

    let entries = relay.entries();
    assert_eq!(entries.len(), 2);
    assert_eq!(
        (entries[0].id.as_str(), entries[0].sender.as_str()),
        (bounce.as_str(), "")
    );
    assert_eq!(entries[1].id, utf8);
    assert_eq!(entries[1].sender, "grüße@contoso.com");
    assert_eq!(entries[1].recipients, ["jürgen@exämple.com"]);
    relay.stop().await;
}

#[tokio::test]
async fn rset_and_ehlo_forget_the_envelope() {
    let relay = Relay::start().await;
    let mut c = relay.client().await;
    c.cmd("MAIL FROM:<a@contoso.com>", "250 2.1.0 Ok").await;
    c.cmd("RCPT TO:<b@example.com>", "250 2.1.5 Ok").await;
    c.cmd("RSET", "250 2.0.0 Ok").await;
    c.cmd("DATA", "503 5.5.1 Error: need MAIL command").await;
    c.cmd("MAIL FROM:<a@contoso.com>", "250 2.1.0 Ok").await;
    c.cmd("HELO again", "250 relay.test").await;
    c.cmd(
        "RCPT TO:<b@example.com>",
        "503 5.5.1 Error: need MAIL command",
    )
    .await;
    // a new transaction after the reset works
    let id = c.mail("a@contoso.com", "c@example.com", b"x\r\n").await;
    let (entry, _) = relay.single();
    assert_eq!(entry.id, id);
    assert_eq!(entry.recipients, ["c@example.com"]);
    relay.stop().await;
}

// ---------------------------------------------------------------- pipelining

#[tokio::test]
async fn pipelined_commands_are_answered_in_order() {
    let relay = Relay::start().await;
    let mut c = relay.client().await;
    c.send(
        "EHLO app.example\r\nMAIL FROM:<app@contoso.com>\r\nRCPT TO:<a@example.com>\r\n\
         RCPT TO:<b@example.com>\r\nDATA\r\n",
    )
    .await;
    c.expect(
        "250-relay.test Hello app.example\r\n250-PIPELINING\r\n250-SIZE 36700160\r\n\
         250-8BITMIME\r\n250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES\r\n",
    )
    .await;
    c.expect("250 2.1.0 Ok\r\n").await;
    c.expect("250 2.1.5 Ok\r\n").await;
    c.expect("250 2.1.5 Ok\r\n").await;
    c.expect("354 End data with <CR><LF>.<CR><LF>\r\n").await;
    // the message, its end and QUIT in one write
    c.send("Subject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n").await;
    let id = queued_id(&c.reply().await);
    c.expect("221 2.0.0 Bye\r\n").await;
    c.closed().await;

    let (entry, body) = relay.single();
    assert_eq!(entry.id, id);
    assert_eq!(entry.recipients, ["a@example.com", "b@example.com"]);
    assert_eq!(body, b"Subject: p\r\n\r\nbody\r\n");
    relay.stop().await;
}

#[tokio::test]
async fn whole_session_in_one_write() {
    let relay = Relay::start().await;
    let mut c = relay.client().await;
    c.send(
        "EHLO x\r\nMAIL FROM:<a@contoso.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n\
         one\r\n.\r\nMAIL FROM:<c@contoso.com>\r\nRCPT TO:<d@example.com>\r\nDATA\r\n\
         two\r\n.\r\nQUIT\r\n",
    )
    .await;
    assert!(c.reply().await.starts_with("250-relay.test Hello x\r\n"));
    let mut ids = Vec::new();
    for _ in 0..2 {
        c.expect("250 2.1.0 Ok\r\n").await;
        c.expect("250 2.1.5 Ok\r\n").await;
        c.expect("354 End data with <CR><LF>.<CR><LF>\r\n").await;
        ids.push(queued_id(&c.reply().await));
    }
    c.expect("221 2.0.0 Bye\r\n").await;
    c.closed().await;

    let entries = relay.entries();
    assert_eq!(
        entries.iter().map(|e| &e.id).collect::<Vec<_>>(),
        [&ids[0], &ids[1]]
    );
    assert_eq!(entries[0].sender, "a@contoso.com");
    assert_eq!(entries[1].sender, "c@contoso.com");
    assert_eq!(relay.body(&ids[0]), b"one\r\n");
    assert_eq!(relay.body(&ids[1]), b"two\r\n");
    relay.stop().await;
}

#[tokio::test]
async fn commands_and_data_split_across_writes() {
    let relay = Relay::start().await;
    let mut c = relay.client().await;
    // a command in pieces
    c.send("MAIL FR").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    c.send("OM:<a@contoso.com>\r").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    c.send("\nRCPT TO:<b@example.com>\r\nDATA\r\n").await;
    c.expect("250 2.1.0 Ok\r\n").await;
    c.expect("250 2.1.5 Ok\r\n").await;
    c.expect("354 End data with <CR><LF>.<CR><LF>\r\n").await;
    // the end of data in pieces, one byte at a time
    c.send("..a\r\nb").await;
    for piece in ["\r", "\n", ".", "\r", "\n"] {
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.send(piece).await;
    }
    let id = queued_id(&c.reply().await);
    let (entry, body) = relay.single();
    assert_eq!(entry.id, id);
    assert_eq!(body, b".a\r\nb\r\n");
    relay.stop().await;
}

// ----------------------------------------------------- the message, exactly

#[tokio::test]
async fn dot_stuffing_and_8bit_data_are_stored_exactly() {
    let relay = Relay::start().await;
    let mut c = relay.client().await;
    let long = "x".repeat(998);
    let original = format!(
        "Subject: Grüße ☃\r\n\r\n.starts with a dot\r\n.\r\n..two dots\r\nGrüße ☃\r\n{long}\r\n\
         \x01\x7f\u{80}\u{ff} end\r\n"
    );
    // dot-stuffed as a client must send it
    let wire = format!(
        "Subject: Grüße ☃\r\n\r\n..starts with a dot\r\n..\r\n...two dots\r\nGrüße ☃\r\n{long}\r\n\
         \x01\x7f\u{80}\u{ff} end\r\n"
    );
    let id = c
        .mail("app@contoso.com", "a@example.com", wire.as_bytes())
        .await;
    let (entry, body) = relay.single();
    assert_eq!(entry.id, id);
    assert_eq!(body, original.as_bytes());
    assert_eq!(entry.size, original.len() as u64);

    // raw non-UTF-8 octets too
    let raw: Vec<u8> = (0u8..=255)
        .filter(|b| *b != b'\r' && *b != b'\n')
        .chain(*b"\r\n")
        .collect();
    let id = c.mail("app@contoso.com", "a@example.com", &raw).await;
    assert_eq!(relay.body(&id), raw);
    relay.stop().await;
}

#[tokio::test]
async fn first_line_and_whole_body_dots() {
    let relay = Relay::start().await;
    let mut c = relay.client().await;
    // `..x` right after 354 is a stuffed `.x`
    let a = c.mail("a@contoso.com", "b@example.com", b"..x\r\n").await;
    // a body that is just the line `.`
    let b = c.mail("a@contoso.com", "b@example.com", b"..\r\n").await;
    // a body that is just `..`
    let d = c.mail("a@contoso.com", "b@example.com", b"...\r\n").await;
    // an empty message: 354 then the end at once
    let e = c.mail("a@contoso.com", "b@example.com", b"").await;
    assert_eq!(relay.body(&a), b".x\r\n");
    assert_eq!(relay.body(&b), b".\r\n");
    assert_eq!(relay.body(&d), b"..\r\n");
    assert_eq!(relay.body(&e), b"");
    assert_eq!(relay.entries().len(), 4);
    relay.stop().await;
}

#[tokio::test]
async fn smuggling_variants_are_content() {
    let relay = Relay::start().await;
    let variants: [&[u8]; 6] = [
        b"\n.\n",
        b"\n.\r\n",
        b"\r.\r\n",
        b"\r\n.\r",
        b"\r\n.\n",
        b"\r\n\0.\r\n",
    ];
    let smuggled = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nsmuggled\r\n";
    for (n, variant) in variants.iter().enumerate() {
        let mut c = relay.client().await;
        c.cmd("MAIL FROM:<app@contoso.com>", "250 2.1.0 Ok").await;
        c.cmd("RCPT TO:<real@example.com>", "250 2.1.5 Ok").await;
        c.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
        let wire = [b"Subject: s\r\n\r\nhello", *variant, smuggled, b".\r\n"].concat();
        // also followed by NOOP in the same write: the next reply must be
        // its answer, not one to a smuggled command
        c.send([&wire[..], b"NOOP\r\n"].concat()).await;
        let id = queued_id(&c.reply().await);
        c.expect("250 2.0.0 Ok\r\n").await;
        c.cmd("QUIT", "221 2.0.0 Bye").await;
        c.closed().await;

        let entries = relay.entries();
        assert_eq!(entries.len(), n + 1, "variant {variant:?}: {entries:?}");
        let entry = entries.iter().find(|e| e.id == id).expect("queued entry");
        assert_eq!(entry.sender, "app@contoso.com");
        assert_eq!(entry.recipients, ["real@example.com"]);
        let body = relay.body(&id);
        assert!(
            only_crlf(&body),
            "variant {variant:?} stored a bare CR or LF: {:?}",
            String::from_utf8_lossy(&body)
        );
        let text = String::from_utf8_lossy(&body);
        assert!(text.starts_with("Subject: s\r\n\r\nhello"), "{text:?}");
        assert!(
            text.ends_with("MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nsmuggled\r\n"),
            "{text:?}"
        );
    }
    assert!(relay
        .entries()
        .iter()
        .all(|e| e.sender == "app@contoso.com"));
    relay.stop().await;
}

#[tokio::test]
async fn smuggled_bodies_are_normalised_exactly() {
    let relay = Relay::start().await;
    let mut c = relay.client().await;
    for (wire, stored) in [
        (&b"a\n.\nb\r\n"[..], &b"a\r\n.\r\nb\r\n"[..]),
        (b"a\n.\r\nb\r\n", b"a\r\n.\r\nb\r\n"),
        (b"a\r.\r\nb\r\n", b"a\r\n.\r\nb\r\n"),
        (b"a\r\n.\rb\r\n", b"a\r\n.\r\nb\r\n"),
        (b"a\r\n.\nb\r\n", b"a\r\n.\r\nb\r\n"),
        (b"a\r\n\0.\r\nb\r\n", b"a\r\n\0.\r\nb\r\n"),
    ] {
        let id = c.mail("a@contoso.com", "b@example.com", wire).await;
        assert_eq!(
            String::from_utf8_lossy(&relay.body(&id)),
            String::from_utf8_lossy(stored),
            "wire {wire:?}"
        );
    }
    relay.stop().await;
}

#[tokio::test]
async fn bare_line_endings_are_normalised() {
    let relay = Relay::start().await;
    let mut c = relay.client().await;
    let id = c
        .mail(
            "a@contoso.com",
            "b@example.com",
            b"Subject: sloppy\n\nline one\nline two\rline three\r\r\nlast\r\n",
        )
        .await;
    assert_eq!(
        relay.body(&id),
        b"Subject: sloppy\r\n\r\nline one\r\nline two\r\nline three\r\n\r\nlast\r\n"
    );
    relay.stop().await;
}

// ------------------------------------------------------------------- policy

#[tokio::test]
async fn clients_outside_allowed_networks_are_refused() {
    let relay = Setup::default()
        .listener(r#"allowed_networks = ["10.0.0.0/8"]"#)
        .start()
        .await;
    let mut c = relay.connect().await;
    c.expect("554 5.7.1 127.0.0.1 is not allowed to use this relay\r\n")
        .await;
    c.closed().await;
    // even a client that does not wait for the greeting gets nothing in
    let mut c = relay.connect().await;
    c.send("MAIL FROM:<a@contoso.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nx\r\n.\r\n")
        .await;
    c.expect("554 5.7.1 127.0.0.1 is not allowed to use this relay\r\n")
        .await;
    c.closed().await;
    assert!(relay.entries().is_empty());
    relay.stop().await;
}

#[tokio::test]
async fn senders_are_routed_to_the_most_specific_account() {
    let relay = Setup::default()
        .accounts(&[
            account("contoso", &["*@contoso.com"]),
            account("ceo", &["ceo@contoso.com"]),
            account("sales", &["*@sales.contoso.com"]),
        ])
        .start()
        .await;
    let mut c = relay.client().await;
    c.cmd(
        "MAIL FROM:<app@fabrikam.com>",
        "550 5.7.1 <app@fabrikam.com>: Sender address rejected: no account of this relay sends for it (see senders in [[accounts]])",
    )
    .await;
    c.cmd(
        "MAIL FROM:<>",
        "550 5.7.1 <>: Sender address rejected: no account of this relay sends for it (see senders in [[accounts]])",
    )
    .await;
    // a refused MAIL leaves no transaction behind
    c.cmd(
        "RCPT TO:<b@example.com>",
        "503 5.5.1 Error: need MAIL command",
    )
    .await;
    let mut expected = Vec::new();
    for (sender, account) in [
        ("app@contoso.com", "contoso"),
        ("CEO@Contoso.com", "ceo"),
        ("bob@sales.contoso.com", "sales"),
        ("ceo@sales.contoso.com", "sales"),
    ] {
        let id = c.mail(sender, "x@example.com", b"hi\r\n").await;
        expected.push((id, sender.to_owned(), account.to_owned()));
    }
    let got: Vec<_> = relay
        .entries()
        .into_iter()
        .map(|e| (e.id, e.sender, e.account))
        .collect();
    assert_eq!(got, expected);
    relay.stop().await;
}

#[tokio::test]
async fn size_limits() {
    let relay = Setup::default()
        .listener("max_message_size = 100")
        .start()
        .await;
    let mut c = relay.client().await;
    c.cmd(
        "MAIL FROM:<a@contoso.com> SIZE=101",
        "552 5.3.4 Error: message size exceeds fixed maximum message size",
    )
    .await;
    c.cmd(
        "RCPT TO:<b@example.com>",
        "503 5.5.1 Error: need MAIL command",
    )
    .await;
    // declared at the limit: fine, and so is a body of exactly the limit
    c.cmd("MAIL FROM:<a@contoso.com> SIZE=100", "250 2.1.0 Ok")
        .await;
    c.cmd("RCPT TO:<b@example.com>", "250 2.1.5 Ok").await;
    let exact = [&[b'y'; 98][..], b"\r\n"].concat();
    let fits = c.data(&exact).await;

    // one byte over, found only after the data
    c.cmd("MAIL FROM:<a@contoso.com>", "250 2.1.0 Ok").await;
    c.cmd("RCPT TO:<b@example.com>", "250 2.1.5 Ok").await;
    c.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
    c.send([&[b'z'; 99][..], b"\r\n.\r\n"].concat()).await;
    c.expect("552 5.3.4 Error: message too big: 101 bytes, the limit is 100\r\n")
        .await;
    // far over, in many writes (the whole message is still read to its end)
    c.cmd("MAIL FROM:<a@contoso.com>", "250 2.1.0 Ok").await;
    c.cmd("RCPT TO:<b@example.com>", "250 2.1.5 Ok").await;
    c.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
    for _ in 0..50 {
        c.send("0123456789012345678901234567890123456789\r\n").await;
    }
    c.send(".\r\nNOOP\r\n").await;
    c.expect("552 5.3.4 Error: message too big: 2100 bytes, the limit is 100\r\n")
        .await;
    c.expect("250 2.0.0 Ok\r\n").await;
    // the transaction is over; the session goes on
    c.cmd(
        "RCPT TO:<b@example.com>",
        "503 5.5.1 Error: need MAIL command",
    )
    .await;
    let after = c.mail("a@contoso.com", "b@example.com", b"small\r\n").await;

    let ids: Vec<_> = relay.entries().into_iter().map(|e| e.id).collect();
    assert_eq!(ids, [fits.clone(), after]);
    assert_eq!(relay.body(&fits), exact);
    relay.stop().await;
}

#[tokio::test]
async fn too_many_recipients() {
    let relay = Setup::default()
        .listener("max_recipients = 2")
        .start()
        .await;
    let mut c = relay.client().await;
    c.cmd("MAIL FROM:<a@contoso.com>", "250 2.1.0 Ok").await;
    c.cmd("RCPT TO:<one@example.com>", "250 2.1.5 Ok").await;
    c.cmd("RCPT TO:<two@example.com>", "250 2.1.5 Ok").await;
    c.cmd(
        "RCPT TO:<three@example.com>",
        "452 4.5.3 Error: too many recipients",
    )
    .await;
    let id = c.data(b"x\r\n").await;
    let (entry, _) = relay.single();
    assert_eq!(entry.id, id);
    assert_eq!(entry.recipients, ["one@example.com", "two@example.com"]);
    relay.stop().await;
}

// ------------------------------------------------------------------- errors

#[tokio::test]
async fn sequence_and_syntax_errors() {
    let relay = Relay::start().await;
    let mut c = relay.client().await;
    c.cmd(
        "RCPT TO:<b@example.com>",
        "503 5.5.1 Error: need MAIL command",
    )
    .await;
    c.cmd("DATA", "503 5.5.1 Error: need MAIL command").await;
    c.cmd("MAIL FROM:<a@contoso.com>", "250 2.1.0 Ok").await;
    c.cmd("DATA", "554 5.5.1 Error: no valid recipients").await;
    c.cmd(
        "MAIL FROM:<a@contoso.com>",
        "503 5.5.1 Error: nested MAIL command",
    )
    .await;
    c.cmd("FOO bar", "500 5.5.2 Error: command not recognized")
        .await;
    c.cmd(
        "RCPT TO:<victim>",
        "501 5.1.3 Error: bad recipient address syntax",
    )
    .await;
    c.cmd(
        "RCPT TO:<victim@>",
        "501 5.1.3 <victim@>: Bad recipient address syntax",
    )
    .await;
    c.cmd(
        "RCPT TO:<@example.com>",
        "501 5.1.3 Error: bad recipient address syntax",
    )
    .await;
    c.cmd("RCPT TO:<>", "501 5.1.3 <>: Bad recipient address syntax")
        .await;
    c.cmd(
        "AUTH PLAIN AGFAYg==",
        "503 5.5.1 Error: authentication not enabled: this relay takes mail without AUTH",
    )
    .await;
    c.cmd("STARTTLS", "502 5.5.1 Error: STARTTLS not available")
        .await;
    c.cmd("EXPN list", "502 5.5.1 Error: command not implemented")
        .await;
    c.cmd("LHLO x", "500 5.5.1 Error: this is not an LMTP server")
        .await;
    c.cmd("HELO", "501 5.5.4 Syntax: HELO domain").await;
    c.cmd(
        "MAIL FROM:a@contoso.com",
        "501 5.5.4 Syntax: MAIL FROM:<reverse-path> [parameters]",
    )
    .await;
    c.cmd(
        "RCPT TO:b@example.com",
        "501 5.5.4 Syntax: RCPT TO:<forward-path> [parameters]",
    )
    .await;
    c.cmd(
        "RCPT TO:<b@example.com> FOO=bar",
        "555 5.5.4 Error: unsupported parameter FOO=BAR",
    )
    .await;
    // the transaction survived all that
    c.cmd("RCPT TO:<b@example.com>", "250 2.1.5 Ok").await;
    let id = c.data(b"x\r\n").await;
    let (entry, _) = relay.single();
    assert_eq!(entry.id, id);
    assert_eq!(entry.recipients, ["b@example.com"]);
    relay.stop().await;
}

const TOO_MANY: &str = "421 4.7.0 Error: too many errors, closing connection\r\n";

#[tokio::test]
async fn too_many_errors_close_the_session() {
    let relay = Relay::start().await;
    let mut c = relay.client().await;
    for _ in 1..relay_listener::session::MAX_ERRORS {
        c.cmd("BOGUS", "500 5.5.2 Error: command not recognized")
            .await;
    }
    // successful commands do not reset the count
    c.cmd("NOOP", "250 2.0.0 Ok").await;
    c.send("BOGUS\r\n").await;
    c.expect("500 5.5.2 Error: command not recognized\r\n")
        .await;
    c.expect(TOO_MANY).await;
    c.closed().await;
    relay.stop().await;
}

#[tokio::test]
async fn too_many_pipelined_errors_stop_at_the_limit() {
    let relay = Relay::start().await;
    let mut c = relay.client().await;
    c.send("BOGUS\r\n".repeat(25) + "NOOP\r\n").await;
    for _ in 0..relay_listener::session::MAX_ERRORS {
        c.expect("500 5.5.2 Error: command not recognized\r\n")
            .await;
    }
    c.expect(TOO_MANY).await;
    c.closed().await;
    relay.stop().await;
}

/// Every kind of error reply counts, and the one that reaches the limit
/// closes the session whatever command it answers.
#[tokio::test]
async fn the_error_that_reaches_the_limit_closes_whatever_it_is() {
    let relay = Relay::start().await;
    for (last, reply) in [
        ("DATA", "503 5.5.1 Error: need MAIL command"),
        (
            "RCPT TO:<b@example.com>",
            "503 5.5.1 Error: need MAIL command",
        ),
        ("STARTTLS", "502 5.5.1 Error: STARTTLS not available"),
    ] {
        let mut c = relay.client().await;
        for _ in 1..relay_listener::session::MAX_ERRORS {
            c.cmd("DATA", "503 5.5.1 Error: need MAIL command").await;
        }
        c.send(format!("{last}\r\n")).await;
        c.expect(&format!("{reply}\r\n")).await;
        c.expect(TOO_MANY).await;
        c.closed().await;
    }
    relay.stop().await;
}

// ------------------------------------------------------- shutdown, failures

#[tokio::test]
async fn shutdown_tells_idle_sessions_and_lets_transactions_finish() {
    let relay = Relay::start().await;
    let mut idle = relay.client().await;
    let mut busy = relay.client().await;
    busy.cmd("MAIL FROM:<a@contoso.com>", "250 2.1.0 Ok").await;
    busy.cmd("RCPT TO:<b@example.com>", "250 2.1.5 Ok").await;
    busy.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>")
        .await;
    busy.send("half a message\r\n").await;
    // let the server take in the half message before the cancel
    tokio::time::sleep(Duration::from_millis(50)).await;
    let addr = relay.addr;
    let dir = relay.path().to_path_buf();
    relay.shutdown.cancel();
    idle.expect("421 4.3.2 Service shutting down, try again later\r\n")
        .await;
    idle.closed().await;
    // a client in the middle of a transaction may finish it; then it is told
    busy.send("rest of it\r\n.\r\n").await;
    let queued = busy.reply().await;
    assert!(queued.starts_with("250 2.0.0 Ok: queued as "), "{queued}");
    busy.expect("421 4.3.2 Service shutting down, try again later\r\n")
        .await;
    busy.closed().await;
    within("serve() returning after shutdown", relay.server)
        .await
        .expect("serve task");
    // the finished message was queued, and nobody is listening any more
    assert_eq!(list(&dir).expect("list").len(), 1);
    let again = tokio::time::timeout(WAIT, TcpStream::connect(addr)).await;
    assert!(matches!(again, Ok(Err(_))), "still accepting: {again:?}");
}

#[tokio::test]
async fn serve_returns_at_shutdown_without_sessions() {
    let relay = Relay::start().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_client_that_vanishes_mid_message_queues_nothing() {
    let relay = Relay::start().await;
    let mut c = relay.client().await;
    c.cmd("MAIL FROM:<a@contoso.com>", "250 2.1.0 Ok").await;
    c.cmd("RCPT TO:<b@example.com>", "250 2.1.5 Ok").await;
    c.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
    c.send("Subject: cut\r\n\r\nno end\r\n").await;
    drop(c);
    // the server notices and is ready for others
    let mut c = relay.client().await;
    c.cmd("NOOP", "250 2.0.0 Ok").await;
    assert!(relay.entries().is_empty());
    relay.stop().await;
}

#[tokio::test]
async fn queue_failure_is_a_temporary_error_and_the_session_goes_on() {
    let relay = Relay::start().await;
    let body_dir = relay.path().join("body");
    // a regular file where the body directory was: the rename into it fails
    // for every user, root included
    std::fs::remove_dir(&body_dir).expect("remove body dir");
    std::fs::write(&body_dir, b"").expect("body file");

    let mut c = relay.client().await;
    c.cmd("MAIL FROM:<a@contoso.com>", "250 2.1.0 Ok").await;
    c.cmd("RCPT TO:<b@example.com>", "250 2.1.5 Ok").await;
    c.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
    c.send("Subject: lost?\r\n\r\nx\r\n.\r\n").await;
    c.expect("451 4.3.0 Error: cannot store the message in the queue, try again later\r\n")
        .await;
    assert!(relay.entries().is_empty());
    // the transaction is over, the session is not
    c.cmd("NOOP", "250 2.0.0 Ok").await;
    c.cmd(
        "RCPT TO:<b@example.com>",
        "503 5.5.1 Error: need MAIL command",
    )
    .await;

    // once the disk is fixed, the client's retry in the same session works
    std::fs::remove_file(&body_dir).expect("remove body file");
    std::fs::create_dir(&body_dir).expect("body dir");
    let id = c
        .mail(
            "a@contoso.com",
            "b@example.com",
            b"Subject: lost?\r\n\r\nx\r\n",
        )
        .await;
    let (entry, body) = relay.single();
    assert_eq!(entry.id, id);
    assert_eq!(body, b"Subject: lost?\r\n\r\nx\r\n");
    relay.stop().await;
}

#[tokio::test]
async fn many_clients_at_once() {
    let relay = Relay::start().await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let addr = relay.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            c.expect("220 relay.test ESMTP smtp-oauth-relay ready\r\n")
                .await;
            let id = c
                .mail(
                    &format!("app{i}@contoso.com"),
                    "b@example.com",
                    format!("message {i}\r\n").as_bytes(),
                )
                .await;
            c.cmd("QUIT", "221 2.0.0 Bye").await;
            (i, id)
        }));
    }
    let mut sent = Vec::new();
    for task in tasks {
        sent.push(within("a client", task).await.expect("client task"));
    }
    let entries = relay.entries();
    assert_eq!(entries.len(), 20);
    for (i, id) in sent {
        let entry = entries.iter().find(|e| e.id == id).expect("queued");
        assert_eq!(entry.sender, format!("app{i}@contoso.com"));
        assert_eq!(relay.body(&id), format!("message {i}\r\n").as_bytes());
    }
    relay.stop().await;
}

/// One over-long command line gets one reply, and the commands after it are
/// answered in step.
#[tokio::test]
async fn an_over_long_command_line_gets_one_reply() {
    let relay = Relay::start().await;
    let mut c = relay.client().await;
    // longer than the server's read buffer, so it arrives in many reads
    let line = [vec![b'x'; 100_000], b"\r\nNOOP\r\n".to_vec()].concat();
    c.send(&line).await;
    c.expect("500 5.5.2 Error: line too long\r\n").await;
    c.expect("250 2.0.0 Ok\r\n").await;
    // in small pieces, with the server reading each
    for piece in line.chunks(3000) {
        c.send(piece).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    c.expect("500 5.5.2 Error: line too long\r\n").await;
    c.expect("250 2.0.0 Ok\r\n").await;
    // inside a transaction, which survives it
    c.cmd("MAIL FROM:<a@contoso.com>", "250 2.1.0 Ok").await;
    let rcpt = format!("RCPT TO:<{}@example.com>\r\n", "r".repeat(70_000));
    c.send(format!("{rcpt}RCPT TO:<b@example.com>\r\nDATA\r\n"))
        .await;
    c.expect("500 5.5.2 Error: line too long\r\n").await;
    c.expect("250 2.1.5 Ok\r\n").await;
    c.expect("354 End data with <CR><LF>.<CR><LF>\r\n").await;
    c.send("x\r\n.\r\nQUIT\r\n").await;
    let id = queued_id(&c.reply().await);
    c.expect("221 2.0.0 Bye\r\n").await;
    c.closed().await;
    let (entry, _) = relay.single();
    assert_eq!(entry.id, id);
    assert_eq!(entry.recipients, ["b@example.com"]);
    relay.stop().await;
}

/// On a dual-stack socket an IPv4 client is `::ffff:a.b.c.d`; the allow-list
/// and the queue both see the plain IPv4 address.
#[tokio::test]
async fn ipv4_clients_of_a_dual_stack_socket() {
    if std::net::TcpListener::bind("[::]:0").is_err() {
        eprintln!("no IPv6 here: skipped");
        return;
    }
    let relay = Setup::default().bind("[::]:0").start().await;
    let port = relay.addr.port();
    let mut c = Client::connect(SocketAddr::from(([127, 0, 0, 1], port))).await;
    c.expect("220 relay.test ESMTP smtp-oauth-relay ready\r\n")
        .await;
    let id = c.mail("a@contoso.com", "b@example.com", b"x\r\n").await;
    let lease = within("next_due", relay.queue.next_due("main", None))
        .await
        .expect("a due message");
    assert_eq!(lease.id.as_str(), id);
    assert_eq!(lease.client, Some("127.0.0.1".parse().expect("ip")));
    drop(lease);
    relay.stop().await;

    let refused = Setup::default()
        .bind("[::]:0")
        .listener(r#"allowed_networks = ["10.0.0.0/8", "::1/128"]"#)
        .start()
        .await;
    let port = refused.addr.port();
    let mut c = Client::connect(SocketAddr::from(([127, 0, 0, 1], port))).await;
    c.expect("554 5.7.1 127.0.0.1 is not allowed to use this relay\r\n")
        .await;
    c.closed().await;
    refused.stop().await;
}

/// A silent client is told `421 4.4.2` after IDLE_TIMEOUT (on a paused
/// clock, so the test takes no time).
#[tokio::test(start_paused = true)]
async fn idle_clients_are_timed_out() {
    let relay = Relay::start().await;
    let mut c = relay.client().await;
    c.cmd("MAIL FROM:<a@contoso.com>", "250 2.1.0 Ok").await;
    let silent_since = tokio::time::Instant::now();
    c.wait = relay_listener::session::IDLE_TIMEOUT + Duration::from_secs(60);
    c.expect("421 4.4.2 relay.test Error: timeout exceeded\r\n")
        .await;
    assert!(silent_since.elapsed() >= relay_listener::session::IDLE_TIMEOUT);
    c.closed().await;
    // also in the middle of a message; nothing is queued
    let mut c = relay.client().await;
    c.cmd("MAIL FROM:<a@contoso.com>", "250 2.1.0 Ok").await;
    c.cmd("RCPT TO:<b@example.com>", "250 2.1.5 Ok").await;
    c.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
    c.send("half\r\n").await;
    c.wait = relay_listener::session::IDLE_TIMEOUT + Duration::from_secs(60);
    c.expect("421 4.4.2 relay.test Error: timeout exceeded\r\n")
        .await;
    c.closed().await;
    assert!(relay.entries().is_empty());
    relay.stop().await;
}

//! The listener end to end, over real TCP: the server is started with
//! `bind` + `serve` exactly as the relay does, a raw `TcpStream` writes exact
//! bytes, and every reply is compared byte for byte. What was accepted is
//! checked in the queue directory itself.

use arc_swap::ArcSwap;
use relay_listener::{Context, Intake, Router};
use relay_queue::{Entry, Queue, QueueSettings};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};
use tempfile::TempDir;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

/// Upper bound of every wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

const HOST: &str = "relay.test";

/// Error replies after which a session is closed.
const MAX_ERRORS: u32 = 20;
/// `listener.command_timeout` by default.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// Failed logins from one address before it is locked out.
const MAX_AUTH_FAILURES: u32 = 5;

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
    /// Give the listener a certificate (STARTTLS).
    tls: bool,
    /// Also listen for implicit TLS (needs `tls`).
    implicit_tls: bool,
    /// Serve before the queue is handed to the sessions ([`Relay::open`]).
    waiting: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            listener: String::new(),
            accounts: account("main", &["*"]),
            tls: false,
            implicit_tls: false,
            waiting: false,
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

    /// A certificate for `localhost`/`127.0.0.1`: STARTTLS is offered.
    fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// STARTTLS, and an implicit-TLS socket too.
    fn implicit_tls(mut self) -> Self {
        self.tls = true;
        self.implicit_tls = true;
        self
    }

    /// The queue is not open when the listener starts serving.
    fn waiting(mut self) -> Self {
        self.waiting = true;
        self
    }

    /// The context [`Setup::start`] would serve, for sessions driven
    /// directly (over an in-memory stream, from any address).
    async fn context(self) -> (Arc<Context>, TempDir, Option<TestCert>) {
        let (config, dir, queue, cert) = self.load().await;
        let ctx = Context::new(config.listener, Router::new(&config.accounts), queue)
            .expect("listener context");
        (Arc::new(ctx), dir, cert)
    }

    async fn load(&self) -> (relay_config::Config, TempDir, Queue, Option<TestCert>) {
        let dir = TempDir::new().expect("temp dir");
        let cert = self.tls.then(|| TestCert::write(dir.path(), "cert"));
        let tls_keys = match &cert {
            Some(cert) => format!(
                "tls_certificate = {:?}\ntls_private_key = {:?}\n",
                cert.cert_path, cert.key_path
            ),
            None => String::new(),
        };
        let toml = format!(
            "[listener]\nhostname = \"{HOST}\"\n{}{}\n{}",
            tls_keys, self.listener, self.accounts
        );
        let config = relay_config::load_str(&toml).expect("valid test configuration");
        std::fs::create_dir(dir.path().join("queue")).expect("queue dir");
        let queue = on_real_time(
            "opening the queue",
            Queue::open(QueueSettings {
                dir: dir.path().join("queue"),
                database: None,
                lease_timeout: Duration::from_secs(60),
                retry_initial: Duration::from_secs(60),
                retry_max: Duration::from_secs(3600),
                max_age: Duration::from_secs(86400),
            }),
        )
        .await
        .expect("open queue");
        (config, dir, queue, cert)
    }

    async fn start(self) -> Relay {
        let (config, dir, queue, cert) = self.load().await;
        let implicit: Vec<SocketAddr> = if self.implicit_tls {
            vec![SocketAddr::from(([127, 0, 0, 1], 0))]
        } else {
            Vec::new()
        };
        let listener = relay_listener::bind(&[self.bind], &implicit)
            .await
            .expect("bind");
        let addr = listener.local_addrs()[0];
        let tls_addr = listener.tls_addrs().first().copied();
        let intake = Intake::waiting();
        if !self.waiting {
            intake.open(queue.clone());
        }
        let ctx = Context::new(
            config.listener,
            Router::new(&config.accounts),
            intake.clone(),
        )
        .expect("listener context");
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(relay_listener::serve(
            listener,
            Arc::new(ArcSwap::from_pointee(ctx)),
            shutdown.clone(),
        ));
        Relay {
            addr,
            tls_addr,
            cert,
            dir,
            queue,
            intake,
            shutdown,
            server,
        }
    }
}

/// Runs `f` (bounded) on a runtime of its own on real time, where the
/// queue's store lives: on a test's paused clock its waits for a database
/// connection would time out at once.
async fn on_real_time<T: Send + 'static>(
    what: &str,
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    static STORE_RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    let runtime = STORE_RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("the store's runtime")
    });
    let what = what.to_owned();
    // bounded there, on real time: the caller's clock may be paused
    runtime
        .spawn(async move { within(&what, f).await })
        .await
        .expect("store task")
}

/// A running listener over a queue in a temporary directory.
struct Relay {
    addr: SocketAddr,
    /// The implicit-TLS address, if any.
    tls_addr: Option<SocketAddr>,
    cert: Option<TestCert>,
    dir: TempDir,
    queue: Queue,
    /// The queue as the sessions see it.
    intake: Intake,
    shutdown: CancellationToken,
    server: JoinHandle<()>,
}

impl Relay {
    async fn start() -> Relay {
        Setup::default().start().await
    }

    /// Hands the queue to the sessions of a [`Setup::waiting`] relay.
    fn open(&self) {
        self.intake.open(self.queue.clone());
    }

    /// A new client, greeting already checked.
    async fn client(&self) -> Client {
        let mut c = self.connect().await;
        c.expect(&format!("220 {HOST} ESMTP smtp-oauth-relay ready\r\n"))
            .await;
        c
    }

    /// A new client inside a message (a@contoso.com to b@example.com):
    /// for tests of what happens after `354`; each step's reply is still
    /// checked exactly.
    async fn client_in_data(&self) -> Client {
        let mut c = self.client().await;
        c.cmd("MAIL FROM:<a@contoso.com>", "250 2.1.0 Ok").await;
        c.cmd("RCPT TO:<b@example.com>", "250 2.1.5 Ok").await;
        c.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
        c
    }

    /// A new client, greeting not read yet.
    async fn connect(&self) -> Client {
        Client::connect(self.addr).await
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("queue")
    }

    /// Every queued message, in id order.
    async fn entries(&self) -> Vec<Entry> {
        let queue = self.queue.clone();
        on_real_time("listing the queue", async move { queue.list().await })
            .await
            .expect("list the queue")
    }

    /// The only queued message and its stored body.
    async fn single(&self) -> (Entry, Vec<u8>) {
        let mut entries = self.entries().await;
        assert_eq!(entries.len(), 1, "queued: {entries:?}");
        let entry = entries.remove(0);
        let body = self.body(&entry.id).await;
        (entry, body)
    }

    /// The stored body of message `id`, straight from the store.
    async fn body(&self, id: &str) -> Vec<u8> {
        let id = id.parse().expect("queue id");
        let queue = self.queue.clone();
        on_real_time("reading a body", async move { queue.body(&id).await })
            .await
            .expect("read body")
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

/// What a client talks over: TCP, TLS, or an in-memory pipe.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A raw SMTP client: writes bytes, reads complete replies.
struct Client {
    stream: Box<dyn Stream>,
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
        // each write goes out at once, also to a server on a paused clock
        stream.set_nodelay(true).expect("TCP_NODELAY");
        Client::over(stream)
    }

    fn over(stream: impl Stream + 'static) -> Client {
        Client {
            stream: Box::new(stream),
            buf: Vec::new(),
            wait: WAIT,
        }
    }

    /// The TLS handshake over the current stream (after `220` to
    /// `STARTTLS`, or at once for implicit TLS), trusting `cert` only.
    async fn tls(
        &mut self,
        cert: &TestCert,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) {
        assert!(
            self.buf.is_empty(),
            "unread bytes before TLS: {:?}",
            self.buf
        );
        let plain = std::mem::replace(&mut self.stream, Box::new(tokio::io::duplex(1).0));
        let connector = cert.connector(versions);
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let tls = within("TLS handshake", connector.connect(name, plain))
            .await
            .expect("TLS handshake");
        self.stream = Box::new(tls);
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

/// A self-signed certificate for `localhost` and `127.0.0.1`, on disk.
struct TestCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    der: rustls::pki_types::CertificateDer<'static>,
}

impl TestCert {
    /// A fresh certificate written as `NAME.pem` / `NAME.key` in `dir`
    /// (over any that were there).
    fn write(dir: &Path, name: &str) -> TestCert {
        let cert = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .expect("certificate");
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key"));
        std::fs::write(&cert_path, cert.cert.pem()).expect("write certificate");
        std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write key");
        TestCert {
            cert_path,
            key_path,
            der: cert.cert.der().clone(),
        }
    }

    fn connector(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.der.clone())
            .expect("trust the test certificate");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

const ANY_TLS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

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
    assert!(relay.entries().await.is_empty());
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

    let (entry, body) = relay.single().await;
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
    let relay_queue::Begin::Go(stored) = within("begin", relay.queue.begin(&lease)).await else {
        panic!("the message may not be sent");
    };
    assert_eq!(stored, wire);
    drop(lease);
    relay.stop().await;
}

// Until the queue is open (its database unreachable when the relay
// started) a transaction is told 451 at MAIL; once it opens, a session
// already connected queues its message.
#[tokio::test]
async fn transactions_wait_for_the_queue_to_open() {
    let relay = Setup::default().waiting().start().await;
    let mut c = relay.client().await;
    c.send("EHLO app.example\r\n").await;
    assert!(c.reply().await.ends_with("250 ENHANCEDSTATUSCODES\r\n"));
    c.cmd(
        "MAIL FROM:<app@contoso.com>",
        "451 4.3.0 Error: the queue is not open yet (its database cannot be reached), try again later",
    )
    .await;
    c.cmd(
        "RCPT TO:<alice@example.com>",
        "503 5.5.1 Error: need MAIL command",
    )
    .await;
    relay.open();
    c.cmd("MAIL FROM:<app@contoso.com>", "250 2.1.0 Ok").await;
    c.cmd("RCPT TO:<alice@example.com>", "250 2.1.5 Ok").await;
    let wire = b"Subject: hi\r\n\r\nHello.\r\n";
    let id = c.data(wire).await;
    c.cmd("QUIT", "221 2.0.0 Bye").await;
    c.closed().await;
    let (entry, body) = relay.single().await;
    assert_eq!(
        (entry.id.as_str(), body.as_slice()),
        (id.as_str(), &wire[..])
    );
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

    let entries = relay.entries().await;
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
    let (entry, _) = relay.single().await;
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

    let (entry, body) = relay.single().await;
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

    let entries = relay.entries().await;
    assert_eq!(
        entries.iter().map(|e| &e.id).collect::<Vec<_>>(),
        [&ids[0], &ids[1]]
    );
    assert_eq!(entries[0].sender, "a@contoso.com");
    assert_eq!(entries[1].sender, "c@contoso.com");
    assert_eq!(relay.body(&ids[0]).await, b"one\r\n");
    assert_eq!(relay.body(&ids[1]).await, b"two\r\n");
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
    let (entry, body) = relay.single().await;
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
    let (entry, body) = relay.single().await;
    assert_eq!(entry.id, id);
    assert_eq!(body, original.as_bytes());
    assert_eq!(entry.size, original.len() as u64);

    // raw non-UTF-8 octets too
    let raw: Vec<u8> = (0u8..=255)
        .filter(|b| *b != b'\r' && *b != b'\n')
        .chain(*b"\r\n")
        .collect();
    let id = c.mail("app@contoso.com", "a@example.com", &raw).await;
    assert_eq!(relay.body(&id).await, raw);
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
    assert_eq!(relay.body(&a).await, b".x\r\n");
    assert_eq!(relay.body(&b).await, b".\r\n");
    assert_eq!(relay.body(&d).await, b"..\r\n");
    assert_eq!(relay.body(&e).await, b"");
    assert_eq!(relay.entries().await.len(), 4);
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

        let entries = relay.entries().await;
        assert_eq!(entries.len(), n + 1, "variant {variant:?}: {entries:?}");
        let entry = entries.iter().find(|e| e.id == id).expect("queued entry");
        assert_eq!(entry.sender, "app@contoso.com");
        assert_eq!(entry.recipients, ["real@example.com"]);
        let body = relay.body(&id).await;
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
        .await
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
            String::from_utf8_lossy(&relay.body(&id).await),
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
        relay.body(&id).await,
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
    assert!(relay.entries().await.is_empty());
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
        .await
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

    let ids: Vec<_> = relay.entries().await.into_iter().map(|e| e.id).collect();
    assert_eq!(ids, [fits.clone(), after]);
    assert_eq!(relay.body(&fits).await, exact);
    relay.stop().await;
}

/// Recipients past `max_recipients` get `452 4.5.3` without counting as
/// errors (up to an overshoot of 1000, as Postfix), so the client keeps its
/// session and sends the rest in a next transaction.
#[tokio::test]
async fn too_many_recipients() {
    let relay = Setup::default()
        .listener("max_recipients = 2")
        .start()
        .await;
    let mut c = relay.client().await;
    let too_many = "452 4.5.3 Error: too many recipients\r\n";
    c.cmd("MAIL FROM:<a@contoso.com>", "250 2.1.0 Ok").await;
    c.cmd("RCPT TO:<r0@example.com>", "250 2.1.5 Ok").await;
    c.cmd("RCPT TO:<r1@example.com>", "250 2.1.5 Ok").await;
    // more than MAX_ERRORS of them, pipelined
    let rest: String = (2..30)
        .map(|i| format!("RCPT TO:<r{i}@example.com>\r\n"))
        .collect();
    c.send(rest).await;
    for _ in 2..30 {
        c.expect(too_many).await;
    }
    let first = c.data(b"x\r\n").await;
    c.cmd("MAIL FROM:<a@contoso.com>", "250 2.1.0 Ok").await;
    c.cmd("RCPT TO:<r2@example.com>", "250 2.1.5 Ok").await;
    c.cmd("RCPT TO:<r3@example.com>", "250 2.1.5 Ok").await;
    let second = c.data(b"x\r\n").await;
    let entries = relay.entries().await;
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0].id, first);
    assert_eq!(entries[0].recipients, ["r0@example.com", "r1@example.com"]);
    assert_eq!(entries[1].id, second);
    assert_eq!(entries[1].recipients, ["r2@example.com", "r3@example.com"]);

    // past the overshoot, each one counts: MAX_ERRORS more close the session
    c.cmd("MAIL FROM:<a@contoso.com>", "250 2.1.0 Ok").await;
    let rcpts: String = (0..2 + 1000 + MAX_ERRORS)
        .map(|i| format!("RCPT TO:<r{i}@example.com>\r\n"))
        .collect();
    c.send(rcpts).await;
    c.expect("250 2.1.5 Ok\r\n").await;
    c.expect("250 2.1.5 Ok\r\n").await;
    for _ in 0..1000 + MAX_ERRORS {
        c.expect(too_many).await;
    }
    c.expect(TOO_MANY).await;
    c.closed().await;
    relay.stop().await;
}

/// Without `SMTPUTF8` on `MAIL FROM`, a non-ASCII address is refused with
/// `553 5.6.7` (RFC 6531 3.5), never forwarded raw; with it, accepted.
#[tokio::test]
async fn non_ascii_addresses_need_smtputf8() {
    let relay = Relay::start().await;
    let mut c = relay.client().await;
    let refused = "553 5.6.7 Must declare SMTPUTF8 to send unicode address";
    c.cmd("MAIL FROM:<grüße@contoso.com>", refused).await;
    c.cmd("MAIL FROM:<grüße@contoso.com> BODY=8BITMIME", refused)
        .await;
    c.cmd("MAIL FROM:<a@contoso.com>", "250 2.1.0 Ok").await;
    c.cmd("RCPT TO:<jürgen@exämple.com>", refused).await;
    c.cmd("RCPT TO:<juergen@exämple.com>", refused).await;
    c.cmd("RCPT TO:<b@example.com>", "250 2.1.5 Ok").await;
    let ascii = c.data(b"x\r\n").await;
    c.cmd("MAIL FROM:<a@contoso.com> SMTPUTF8", "250 2.1.0 Ok")
        .await;
    c.cmd("RCPT TO:<jürgen@exämple.com>", "250 2.1.5 Ok").await;
    let utf8 = c.data(b"x\r\n").await;
    c.cmd("QUIT", "221 2.0.0 Bye").await;
    let entries = relay.entries().await;
    assert_eq!(entries.len(), 2);
    assert_eq!(
        (entries[0].id.as_str(), entries[0].recipients.as_slice()),
        (ascii.as_str(), &["b@example.com".to_owned()][..])
    );
    assert_eq!(
        (entries[1].id.as_str(), entries[1].recipients.as_slice()),
        (utf8.as_str(), &["jürgen@exämple.com".to_owned()][..])
    );
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
        "501 5.1.3 <victim@>: Bad recipient address syntax: the domain is empty",
    )
    .await;
    c.cmd(
        "RCPT TO:<@example.com>",
        "501 5.1.3 Error: bad recipient address syntax",
    )
    .await;
    c.cmd(
        "RCPT TO:<>",
        "501 5.1.3 <>: Bad recipient address syntax: the address is empty",
    )
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
    let (entry, _) = relay.single().await;
    assert_eq!(entry.id, id);
    assert_eq!(entry.recipients, ["b@example.com"]);
    relay.stop().await;
}

const TOO_MANY: &str = "421 4.7.0 Error: too many errors, closing connection\r\n";

#[tokio::test]
async fn too_many_errors_close_the_session() {
    let relay = Relay::start().await;
    let mut c = relay.client().await;
    for _ in 1..MAX_ERRORS {
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
    for _ in 0..MAX_ERRORS {
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
        for _ in 1..MAX_ERRORS {
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
    assert_eq!(relay.queue.list().await.expect("list").len(), 1);
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
    let mut c = relay.client_in_data().await;
    c.send("Subject: cut\r\n\r\nno end\r\n").await;
    drop(c);
    // the server notices and is ready for others
    let mut c = relay.client().await;
    c.cmd("NOOP", "250 2.0.0 Ok").await;
    assert!(relay.entries().await.is_empty());
    relay.stop().await;
}

#[tokio::test]
async fn queue_failure_is_a_temporary_error_and_the_session_goes_on() {
    let relay = Relay::start().await;
    // the store refuses every new message, as a full disk would
    let db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        relay.path().join("queue.sqlite").display()
    ))
    .await
    .expect("open the store");
    sqlx::query(
        "CREATE TRIGGER full BEFORE INSERT ON messages BEGIN SELECT RAISE(ABORT, 'disk full'); END",
    )
    .execute(&db)
    .await
    .expect("break the store");

    let mut c = relay.client_in_data().await;
    c.send("Subject: lost?\r\n\r\nx\r\n.\r\n").await;
    c.expect("451 4.3.0 Error: cannot store the message in the queue, try again later\r\n")
        .await;
    assert!(relay.entries().await.is_empty());
    // the transaction is over, the session is not
    c.cmd("NOOP", "250 2.0.0 Ok").await;
    c.cmd(
        "RCPT TO:<b@example.com>",
        "503 5.5.1 Error: need MAIL command",
    )
    .await;

    // once the store is fixed, the client's retry in the same session works
    sqlx::query("DROP TRIGGER full")
        .execute(&db)
        .await
        .expect("fix the store");
    let id = c
        .mail(
            "a@contoso.com",
            "b@example.com",
            b"Subject: lost?\r\n\r\nx\r\n",
        )
        .await;
    let (entry, body) = relay.single().await;
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
    let entries = relay.entries().await;
    assert_eq!(entries.len(), 20);
    for (i, id) in sent {
        let entry = entries.iter().find(|e| e.id == id).expect("queued");
        assert_eq!(entry.sender, format!("app{i}@contoso.com"));
        assert_eq!(relay.body(&id).await, format!("message {i}\r\n").as_bytes());
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
    let (entry, _) = relay.single().await;
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

/// A silent client is told `421 4.4.2` after `command_timeout` (on a
/// paused clock, so the test takes no time).
#[tokio::test(start_paused = true)]
async fn idle_clients_are_timed_out() {
    let relay = Relay::start().await;
    let mut c = relay.client().await;
    c.cmd("MAIL FROM:<a@contoso.com>", "250 2.1.0 Ok").await;
    let silent_since = tokio::time::Instant::now();
    c.wait = COMMAND_TIMEOUT + Duration::from_secs(60);
    c.expect("421 4.4.2 relay.test Error: timeout exceeded\r\n")
        .await;
    assert!(silent_since.elapsed() >= COMMAND_TIMEOUT);
    c.closed().await;
    // also in the middle of a message; nothing is queued
    let mut c = relay.client_in_data().await;
    c.send("half\r\n").await;
    c.wait = COMMAND_TIMEOUT + Duration::from_secs(60);
    c.expect("421 4.4.2 relay.test Error: timeout exceeded\r\n")
        .await;
    c.closed().await;
    assert!(relay.entries().await.is_empty());
    relay.stop().await;
}

/// Writes `bytes` one at a time, `every` apart, until the server says
/// something; returns what it said and how long after the first byte.
async fn drip_bytes(c: &mut Client, every: Duration, bytes: &[u8]) -> (String, Duration) {
    let first = tokio::time::Instant::now();
    for &byte in bytes {
        c.send([byte]).await;
        let mut chunk = [0u8; 512];
        match tokio::time::timeout(every, c.stream.read(&mut chunk)).await {
            Err(_) => continue,
            Ok(read) => {
                let n = read.expect("read");
                assert!(n > 0, "closed without a reply");
                let elapsed = first.elapsed();
                c.buf.extend_from_slice(&chunk[..n]);
                return (c.reply().await, elapsed);
            }
        }
    }
    panic!("the server never answered the drip");
}

/// A command line must be complete within `command_timeout` of its first
/// byte: dripping it a byte at a time does not hold the connection (on a
/// paused clock, over a real socket).
#[tokio::test(start_paused = true)]
async fn a_dripped_command_line_is_cut_off_at_command_timeout() {
    let relay = Setup::default()
        .listener("command_timeout = \"10s\"")
        .start()
        .await;
    let timeout = "421 4.4.2 relay.test Error: timeout exceeded\r\n";
    let second = Duration::from_secs(1);
    // one byte every 3 s, never a line end
    let mut c = relay.client().await;
    let (reply, after) = drip_bytes(&mut c, 3 * second, &[b'X'; 100]).await;
    assert_eq!(reply, timeout);
    assert!(after >= 10 * second && after < 11 * second, "{after:?}");
    c.closed().await;
    // lines completed in time are answered; each line has its own limit
    let mut c = relay.client().await;
    let (reply, after) = drip_bytes(&mut c, second, b"NOOP\r\n").await;
    assert_eq!(reply, "250 2.0.0 Ok\r\n");
    assert!(after >= 5 * second && after < 6 * second, "{after:?}");
    let (reply, _) = drip_bytes(&mut c, 1500 * Duration::from_millis(1), b"NOOP\r\n").await;
    assert_eq!(reply, "250 2.0.0 Ok\r\n");
    // the clock starts at the first byte of a line pipelined after another
    c.send("NOOP\r\nNO").await;
    c.expect("250 2.0.0 Ok\r\n").await;
    tokio::time::sleep(4 * second).await;
    let (reply, after) = drip_bytes(&mut c, 3 * second, &[b'X'; 100]).await;
    assert_eq!(reply, timeout);
    assert!(after >= 6 * second && after < 7 * second, "{after:?}");
    c.closed().await;
    // the rest of an over-long line too
    let mut c = relay.client().await;
    c.send("X".repeat(600)).await;
    c.expect("500 5.5.2 Error: line too long\r\n").await;
    tokio::time::sleep(4 * second).await;
    let (reply, after) = drip_bytes(&mut c, 3 * second, &[b'X'; 100]).await;
    assert_eq!(reply, timeout);
    assert!(after >= 6 * second && after < 7 * second, "{after:?}");
    c.closed().await;
    relay.stop().await;
}

/// After `354` a drip is cut off by `min_data_rate` (after
/// `data_block_timeout` of grace) and, with the rate check off, by
/// `data_timeout`: never later.
#[tokio::test(start_paused = true)]
async fn a_dripped_message_is_cut_off() {
    let second = Duration::from_secs(1);
    let timeout = "421 4.4.2 relay.test Error: timeout exceeded\r\n";
    let relay = Setup::default()
        .listener("data_block_timeout = \"10s\"\ndata_timeout = \"60s\"\nmin_data_rate = 100")
        .start()
        .await;
    // 1 byte a second: allowed 10 s + 1/100 s per byte received
    let mut c = relay.client_in_data().await;
    let (reply, after) = drip_bytes(&mut c, second, &[b'x'; 1000]).await;
    assert_eq!(reply, timeout);
    assert!(after >= 10 * second && after < 11 * second, "{after:?}");
    c.closed().await;
    relay.stop().await;
    let relay = Setup::default()
        .listener("data_block_timeout = \"10s\"\ndata_timeout = \"60s\"\nmin_data_rate = 0")
        .start()
        .await;
    let mut c = relay.client_in_data().await;
    let (reply, after) = drip_bytes(&mut c, second, &[b'x'; 1000]).await;
    assert_eq!(reply, timeout);
    assert!(after >= 60 * second && after < 61 * second, "{after:?}");
    c.closed().await;
    assert!(relay.entries().await.is_empty());
    relay.stop().await;
}

// ------------------------------------------------------ limits

/// A command line may be 512 octets with its CRLF (RFC 5321 4.5.3.1.4);
/// one more is `500 5.5.2`, and the session goes on in step.
#[tokio::test]
async fn command_lines_are_limited_to_512_octets() {
    let relay = Relay::start().await;
    let mut c = relay.client().await;
    let fits = format!("NOOP {}", "x".repeat(512 - 2 - 5));
    assert_eq!(fits.len() + 2, 512);
    c.cmd(&fits, "250 2.0.0 Ok").await;
    let over = format!("NOOP {}", "x".repeat(512 - 2 - 4));
    assert_eq!(over.len() + 2, 513);
    c.send(format!("{over}\r\nNOOP\r\n")).await;
    c.expect("500 5.5.2 Error: line too long\r\n").await;
    c.expect("250 2.0.0 Ok\r\n").await;
    // an address that makes the line too long, in a transaction that survives
    c.cmd("MAIL FROM:<a@contoso.com>", "250 2.1.0 Ok").await;
    let long_rcpt = format!("RCPT TO:<{}@example.com>", "r".repeat(600));
    c.cmd(&long_rcpt, "500 5.5.2 Error: line too long").await;
    c.cmd("RCPT TO:<b@example.com>", "250 2.1.5 Ok").await;
    c.data(b"x\r\n").await;
    relay.stop().await;
}

/// The text line policy: lines longer than RFC 5321's 1000 octets are
/// accepted and stored unchanged (applications write whole HTML documents
/// on one line); only `max_message_size` bounds them.
#[tokio::test]
async fn long_text_lines_are_accepted_unchanged() {
    let relay = Relay::start().await;
    let mut c = relay.client().await;
    let body = format!("Subject: long\r\n\r\n{}\r\nend\r\n", "h".repeat(20_000));
    let id = c
        .mail("a@contoso.com", "b@example.com", body.as_bytes())
        .await;
    assert_eq!(relay.body(&id).await, body.as_bytes());
    relay.stop().await;
}

/// Address syntax: local part ≤ 64, domain ≤ 255, no CR/LF/NUL, no source
/// routes, no `%` hack, no quoted local parts (smtp-proto would strip the
/// quotes and hand on something else).
#[tokio::test]
async fn addresses_are_checked() {
    let relay = Relay::start().await;
    let mut c = relay.client().await;
    let local64 = "l".repeat(64);
    let local65 = "l".repeat(65);
    // the longest path that fits in 256 octets (RFC 5321 4.5.3.1.3)
    let domain = format!("{}.com", vec!["d".repeat(60); 3].join("."));
    assert!(local64.len() + 1 + domain.len() <= 256);
    let domain256 = format!("{}.com", vec!["d".repeat(63); 4].join("."));
    assert!(domain256.len() > 255);
    for (from, why) in [
        (
            format!("{local65}@contoso.com"),
            "the local part is longer than 64 octets",
        ),
        (
            "user%other@contoso.com".into(),
            "%-hack routing is not accepted",
        ),
        (
            "@hop1,@hop2:a@contoso.com".into(),
            "source routes are not accepted",
        ),
        (
            "\"a b\"@contoso.com".into(),
            "quoted local parts are not accepted",
        ),
    ] {
        let shown = match why {
            "source routes are not accepted" => "a@contoso.com".to_owned(),
            "quoted local parts are not accepted" => "a b@contoso.com".to_owned(),
            _ => from.clone(),
        };
        c.cmd(
            &format!("MAIL FROM:<{from}>"),
            &format!("501 5.1.7 <{shown}>: Sender address rejected: {why}"),
        )
        .await;
    }
    // CR and NUL inside a command line are refused before parsing
    c.send("MAIL FROM:<a\rb@contoso.com>\r\n").await;
    c.expect("500 5.5.2 Error: bare CR or NUL in a command line\r\n")
        .await;
    c.send("MAIL FROM:<a\0b@contoso.com>\r\n").await;
    c.expect("500 5.5.2 Error: bare CR or NUL in a command line\r\n")
        .await;

    c.cmd(
        &format!("MAIL FROM:<{local64}@contoso.com>"),
        "250 2.1.0 Ok",
    )
    .await;
    for (to, shown, why) in [
        (
            format!("{local65}@example.com"),
            format!("{local65}@example.com"),
            "the local part is longer than 64 octets",
        ),
        // (smtp-proto refuses paths over 256 octets first)
        (format!("a@{domain256}"), String::new(), ""),
        (
            "victim%evil.example@example.com".into(),
            "victim%evil.example@example.com".into(),
            "%-hack routing is not accepted",
        ),
        (
            "@relay.example:victim@example.com".into(),
            "victim@example.com".into(),
            "source routes are not accepted",
        ),
        (
            "\"a> NOTIFY=NEVER\"@example.com".into(),
            "a> NOTIFY=NEVER@example.com".into(),
            "quoted local parts are not accepted",
        ),
        ("a@exa mple.com".into(), String::new(), ""),
    ] {
        c.send(format!("RCPT TO:<{to}>\r\n")).await;
        let reply = c.reply().await;
        if why.is_empty() {
            assert!(reply.starts_with("501 5."), "{to}: {reply}");
        } else {
            assert_eq!(
                reply,
                format!("501 5.1.3 <{shown}>: Bad recipient address syntax: {why}\r\n"),
                "{to}"
            );
        }
    }
    c.send("RCPT TO:<a\rb@example.com>\r\n").await;
    c.expect("500 5.5.2 Error: bare CR or NUL in a command line\r\n")
        .await;
    c.cmd(&format!("RCPT TO:<{local64}@{domain}>"), "250 2.1.5 Ok")
        .await;
    c.data(b"x\r\n").await;
    let (entry, _) = relay.single().await;
    assert_eq!(entry.sender, format!("{local64}@contoso.com"));
    assert_eq!(entry.recipients, [format!("{local64}@{domain}")]);
    relay.stop().await;
}

/// smtp-proto 0.2.5 wraps a `SIZE=` too long for 64 bits into a small
/// number; the relay reads it itself.
#[tokio::test]
async fn a_declared_size_too_large_to_count_is_refused() {
    let relay = Relay::start().await;
    let mut c = relay.client().await;
    for size in [
        "99999999999999999999999",
        "18446744073709551616",
        "18446744073709551615",
        "36700161",
    ] {
        c.cmd(
            &format!("MAIL FROM:<a@contoso.com> SIZE={size}"),
            "552 5.3.4 Error: message size exceeds fixed maximum message size",
        )
        .await;
    }
    c.cmd("MAIL FROM:<a@contoso.com> SIZE=36700160", "250 2.1.0 Ok")
        .await;
    c.cmd("RSET", "250 2.0.0 Ok").await;
    relay.stop().await;
}

/// A client that talks before the greeting (after `greet_delay`) gets `554`
/// and is disconnected; nothing it sent is run.
#[tokio::test]
async fn talking_before_the_greeting_is_refused() {
    let relay = Setup::default()
        .listener(r#"greet_delay = "300ms""#)
        .start()
        .await;
    let mut c = relay.connect().await;
    c.send("EHLO eager\r\nMAIL FROM:<a@contoso.com>\r\n").await;
    c.expect("554 5.5.1 Error: you talked before the greeting\r\n")
        .await;
    c.closed().await;
    // a patient client is greeted after the pause
    let started = std::time::Instant::now();
    let mut c = relay.client().await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    c.cmd("NOOP", "250 2.0.0 Ok").await;
    relay.stop().await;

    // and with the pause off, the greeting comes at once
    let relay = Setup::default()
        .listener(r#"greet_delay = "0s""#)
        .start()
        .await;
    let started = std::time::Instant::now();
    let mut c = relay.client().await;
    assert!(started.elapsed() < Duration::from_millis(150));
    c.cmd("NOOP", "250 2.0.0 Ok").await;
    relay.stop().await;
}

/// Connects until a client is greeted (slots are freed when the server
/// notices a close, which takes a moment).
async fn client_when_free(relay: &Relay) -> Client {
    for _ in 0..100 {
        let mut c = relay.connect().await;
        let reply = c.reply().await;
        if reply.starts_with("220 ") {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no free connection slot within 5 s");
}

#[tokio::test]
async fn connections_per_address_and_in_total_are_limited() {
    let relay = Setup::default()
        .listener("max_connections_per_ip = 2\ngreet_delay = \"0s\"")
        .start()
        .await;
    let mut a = relay.client().await;
    let _b = relay.client().await;
    let mut c = relay.connect().await;
    c.expect("421 4.7.0 Error: too many connections from your address\r\n")
        .await;
    c.closed().await;
    a.cmd("QUIT", "221 2.0.0 Bye").await;
    a.closed().await;
    let mut again = client_when_free(&relay).await;
    again.cmd("NOOP", "250 2.0.0 Ok").await;
    relay.stop().await;

    let relay = Setup::default()
        .listener("max_connections = 3\ngreet_delay = \"0s\"")
        .start()
        .await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(relay.client().await);
    }
    let mut c = relay.connect().await;
    c.expect("421 4.3.2 Error: too many connections, try again later\r\n")
        .await;
    c.closed().await;
    drop(open.pop());
    let mut again = client_when_free(&relay).await;
    again.cmd("NOOP", "250 2.0.0 Ok").await;
    relay.stop().await;
}

/// `command_timeout`, `data_block_timeout` and `data_timeout`, set short.
#[tokio::test]
async fn timeouts_are_configurable() {
    let relay = Setup::default()
        .listener(
            "command_timeout = \"1s\"\ndata_block_timeout = \"700ms\"\ndata_timeout = \"2500ms\"\nmin_data_rate = 0\ngreet_delay = \"0s\"",
        )
        .start()
        .await;
    let timeout = "421 4.4.2 relay.test Error: timeout exceeded\r\n";
    let about = |waited: Duration, expected: u64| {
        assert!(
            waited >= Duration::from_millis(expected)
                && waited < Duration::from_millis(expected + 900),
            "waited {waited:?}, expected about {expected} ms"
        )
    };
    // silent while a command is due
    let mut c = relay.client().await;
    let since = std::time::Instant::now();
    c.expect(timeout).await;
    about(since.elapsed(), 1000);
    c.closed().await;
    // silent inside a message
    let mut c = relay.client_in_data().await;
    let since = std::time::Instant::now();
    c.expect(timeout).await;
    about(since.elapsed(), 700);
    c.closed().await;
    // a message that keeps coming, but takes longer than data_timeout
    let mut c = relay.client_in_data().await;
    let since = std::time::Instant::now();
    let reply = drip(
        &mut c,
        Duration::from_millis(200),
        b"a line of the message\r\n",
    )
    .await;
    assert_eq!(reply, timeout);
    about(since.elapsed(), 2500);
    assert!(relay.entries().await.is_empty());
    relay.stop().await;
}

/// Sends `piece` every `every` until the server answers; returns the answer.
async fn drip(c: &mut Client, every: Duration, piece: &[u8]) -> String {
    loop {
        tokio::time::sleep(every).await;
        if c.stream.write_all(piece).await.is_err() {
            return c.reply().await;
        }
        let mut chunk = [0u8; 512];
        if let Ok(read) =
            tokio::time::timeout(Duration::from_millis(1), c.stream.read(&mut chunk)).await
        {
            let n = read.unwrap_or(0);
            c.buf.extend_from_slice(&chunk[..n]);
            return c.reply().await;
        }
    }
}

/// A slow-drip client is cut off once it falls below `min_data_rate`
/// (after `data_block_timeout` of grace); a fast one is not.
#[tokio::test]
async fn slow_drip_clients_are_cut_off() {
    let relay = Setup::default()
        .listener("data_block_timeout = \"1s\"\nmin_data_rate = 100\ngreet_delay = \"0s\"")
        .start()
        .await;
    let mut c = relay.client_in_data().await;
    let since = std::time::Instant::now();
    // 10 bytes every 250 ms: 40 bytes/s, never silent for a data block
    let reply = drip(&mut c, Duration::from_millis(250), b"drip drip\n").await;
    assert_eq!(reply, "421 4.4.2 relay.test Error: timeout exceeded\r\n");
    // allowed: 1 s + received/100 s, so about 1.7 s
    let waited = since.elapsed();
    assert!(
        waited >= Duration::from_millis(1400) && waited <= Duration::from_millis(3000),
        "{waited:?}"
    );
    assert!(relay.entries().await.is_empty());
    // 10 kB/s for two seconds is fine
    let mut c = relay.client_in_data().await;
    let line = [&[b'x'; 998][..], b"\r\n"].concat();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.send(&line).await;
    }
    c.send(".\r\n").await;
    queued_id(&c.reply().await);
    relay.stop().await;
}

/// Every non-standard end of data the SMTP smuggling research lists, with
/// NUL tricks, is content: never an end, and stored with CRLF only.
#[tokio::test]
async fn more_smuggling_variants_are_content() {
    let relay = Relay::start().await;
    let variants: [&[u8]; 9] = [
        b"\r\n.\0\r\n",
        b"\r\n.\r\0\n",
        b"\r\n\0.\0\r\n",
        b"\r\n.\r\r\n",
        b"\n.\r\r\n",
        b"\r\r\n.\r\r\n",
        b"\n..\n",
        b"\r\n.\x0b\r\n",
        b"\r\n .\r\n",
    ];
    let smuggled = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nsmuggled\r\n";
    let mut c = relay.client().await;
    for variant in variants {
        c.cmd("MAIL FROM:<app@contoso.com>", "250 2.1.0 Ok").await;
        c.cmd("RCPT TO:<real@example.com>", "250 2.1.5 Ok").await;
        c.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
        c.send([b"hello", variant, smuggled, b".\r\nNOOP\r\n"].concat())
            .await;
        let id = queued_id(&c.reply().await);
        c.expect("250 2.0.0 Ok\r\n").await;
        let body = relay.body(&id).await;
        assert!(
            only_crlf(&body),
            "{variant:?}: {:?}",
            String::from_utf8_lossy(&body)
        );
        assert!(
            String::from_utf8_lossy(&body).ends_with("DATA\r\nsmuggled\r\n"),
            "{variant:?}"
        );
    }
    assert_eq!(relay.entries().await.len(), variants.len());
    assert!(relay
        .entries()
        .await
        .iter()
        .all(|e| e.sender == "app@contoso.com" && e.recipients == ["real@example.com"]));
    relay.stop().await;
}

// ------------------------------------------------------------- TLS

const EHLO_PLAIN: &str = "250-relay.test Hello c\r\n250-PIPELINING\r\n250-SIZE 36700160\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n";

#[tokio::test]
async fn starttls_is_offered_with_a_certificate_and_works() {
    for versions in [
        ANY_TLS,
        &[&rustls::version::TLS12][..],
        &[&rustls::version::TLS13][..],
    ] {
        let relay = Setup::default().tls().start().await;
        let cert = relay.cert.as_ref().expect("certificate");
        let mut c = relay.client().await;
        c.cmd(
            "EHLO c",
            &format!("{EHLO_PLAIN}250-STARTTLS\r\n250 ENHANCEDSTATUSCODES"),
        )
        .await;
        c.cmd("STARTTLS", "220 2.0.0 Ready to start TLS").await;
        c.tls(cert, versions).await;
        // inside TLS: no second STARTTLS
        c.cmd("EHLO c", &format!("{EHLO_PLAIN}250 ENHANCEDSTATUSCODES"))
            .await;
        c.cmd("STARTTLS", "503 5.5.1 Error: TLS already active")
            .await;
        let id = c
            .mail("a@contoso.com", "b@example.com", b"over TLS\r\n")
            .await;
        assert_eq!(relay.body(&id).await, b"over TLS\r\n");
        c.cmd("QUIT", "221 2.0.0 Bye").await;
        relay.stop().await;
    }
}

/// Commands pipelined after STARTTLS in plaintext (the STARTTLS command
/// injection bug class, CVE-2011-0411) are dropped, not run inside TLS.
#[tokio::test]
async fn plaintext_after_starttls_is_discarded() {
    let relay = Setup::default().tls().start().await;
    let cert = relay.cert.as_ref().expect("certificate");
    let mut c = relay.client().await;
    c.cmd(
        "EHLO c",
        &format!("{EHLO_PLAIN}250-STARTTLS\r\n250 ENHANCEDSTATUSCODES"),
    )
    .await;
    c.send("STARTTLS\r\nMAIL FROM:<evil@contoso.com>\r\nRCPT TO:<victim@example.com>\r\n")
        .await;
    c.expect("220 2.0.0 Ready to start TLS\r\n").await;
    c.tls(cert, ANY_TLS).await;
    // had the injected MAIL run, this would be accepted
    c.cmd(
        "RCPT TO:<b@example.com>",
        "503 5.5.1 Error: need MAIL command",
    )
    .await;
    c.cmd("DATA", "503 5.5.1 Error: need MAIL command").await;
    assert!(relay.entries().await.is_empty());
    relay.stop().await;
}

#[tokio::test]
async fn implicit_tls_sockets_start_with_the_handshake() {
    let relay = Setup::default().implicit_tls().start().await;
    let cert = relay.cert.as_ref().expect("certificate");
    let mut c = Client::connect(relay.tls_addr.expect("implicit TLS address")).await;
    c.tls(cert, ANY_TLS).await;
    c.expect("220 relay.test ESMTP smtp-oauth-relay ready\r\n")
        .await;
    c.cmd("EHLO c", &format!("{EHLO_PLAIN}250 ENHANCEDSTATUSCODES"))
        .await;
    let id = c
        .mail("a@contoso.com", "b@example.com", b"implicit\r\n")
        .await;
    assert_eq!(relay.body(&id).await, b"implicit\r\n");
    // plaintext on the TLS port goes nowhere
    let mut plain = Client::connect(relay.tls_addr.expect("address")).await;
    plain.send("EHLO plain\r\n").await;
    while plain.fill().await > 0 {}
    // a TLS alert at most, never an SMTP reply
    assert!(!String::from_utf8_lossy(&plain.buf).contains("250"));
    assert!(!plain.buf.starts_with(b"220"));
    relay.stop().await;
}

/// A new certificate on disk is used once the context is rebuilt (what
/// the relay does on SIGHUP); sessions already open keep theirs.
#[tokio::test]
async fn a_rebuilt_context_serves_the_new_certificate() {
    let (config, dir, queue, cert) = Setup::default().tls().load().await;
    let old = cert.expect("certificate");
    let context = || {
        Context::new(
            config.listener.clone(),
            Router::new(&config.accounts),
            queue.clone(),
        )
        .expect("listener context")
    };
    let listener = relay_listener::bind(&[SocketAddr::from(([127, 0, 0, 1], 0))], &[])
        .await
        .expect("bind");
    let addr = listener.local_addrs()[0];
    let live = Arc::new(ArcSwap::from_pointee(context()));
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(relay_listener::serve(
        listener,
        live.clone(),
        shutdown.clone(),
    ));
    let starttls = |cert: &TestCert| {
        let connector = cert.connector(ANY_TLS);
        async move {
            let mut c = Client::connect(addr).await;
            c.reply().await;
            c.cmd("STARTTLS", "220 2.0.0 Ready to start TLS").await;
            let plain = std::mem::replace(&mut c.stream, Box::new(tokio::io::duplex(1).0));
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            within("handshake", connector.connect(name, plain)).await
        }
    };
    assert!(starttls(&old).await.is_ok());
    // renewed on disk, same file names
    let new = TestCert::write(dir.path(), "cert");
    live.store(Arc::new(context()));
    assert!(starttls(&new).await.is_ok(), "new certificate served");
    assert!(
        starttls(&old).await.is_err(),
        "old certificate still served"
    );
    shutdown.cancel();
    within("serve", server).await.expect("serve task");
}

// ------------------------------------------------------------ AUTH

fn phc(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::encode_b64(b"fixed test salt!").expect("salt");
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("hash")
        .to_string()
}

fn users(auth: &str) -> String {
    format!(
        "auth = \"{auth}\"\ngreet_delay = \"0s\"\n[[listener.users]]\nusername = \"scanner\"\npassword_hash = \"{}\"\n[[listener.users]]\nusername = \"erp\"\npassword_hash = \"{}\"\n",
        phc("s3cret"),
        phc("other")
    )
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test]
async fn auth_plain_and_login_over_loopback() {
    let relay = Setup::default().listener(&users("optional")).start().await;
    let mut c = relay.client().await;
    c.cmd(
        "EHLO c",
        &format!("{EHLO_PLAIN}250-AUTH PLAIN LOGIN\r\n250 ENHANCEDSTATUSCODES"),
    )
    .await;
    c.cmd(
        &format!("AUTH PLAIN {}", b64(b"\0scanner\0s3cret")),
        "235 2.7.0 Authentication successful",
    )
    .await;
    c.cmd("AUTH PLAIN x", "503 5.5.1 Error: already authenticated")
        .await;
    let id = c
        .mail("a@contoso.com", "b@example.com", b"logged in\r\n")
        .await;
    // the login is nowhere in what is queued (and so never goes upstream)
    let (entry, body) = relay.single().await;
    assert_eq!(entry.id, id);
    assert_eq!(body, b"logged in\r\n");
    let stored = std::fs::read_dir(relay.path())
        .expect("queue dir")
        .flat_map(|d| {
            let p = d.expect("entry").path();
            if p.is_dir() {
                std::fs::read_dir(&p)
                    .expect("sub dir")
                    .map(|e| std::fs::read(e.expect("file").path()).unwrap_or_default())
                    .collect()
            } else {
                vec![std::fs::read(&p).unwrap_or_default()]
            }
        })
        .collect::<Vec<_>>()
        .concat();
    let stored = String::from_utf8_lossy(&stored);
    assert!(!stored.contains("scanner") && !stored.contains("s3cret"));

    // LOGIN, two steps; PLAIN without an initial response
    let mut c = relay.client().await;
    c.cmd("AUTH LOGIN", "334 VXNlcm5hbWU6").await;
    c.cmd(&b64(b"erp"), "334 UGFzc3dvcmQ6").await;
    c.cmd(&b64(b"other"), "235 2.7.0 Authentication successful")
        .await;
    let mut c = relay.client().await;
    c.cmd("AUTH PLAIN", "334 ").await;
    c.cmd(
        &b64(b"erp\0erp\0other"),
        "235 2.7.0 Authentication successful",
    )
    .await;
    // LOGIN with the user name given at once; cancelling; garbage
    let mut c = relay.client().await;
    c.cmd(&format!("AUTH LOGIN {}", b64(b"erp")), "334 UGFzc3dvcmQ6")
        .await;
    c.cmd("*", "501 5.7.0 Error: authentication cancelled")
        .await;
    c.cmd("AUTH PLAIN", "334 ").await;
    c.cmd("%%%", "501 5.5.2 Error: cannot decode the AUTH response")
        .await;
    c.cmd(
        "AUTH CRAM-MD5",
        "504 5.5.4 Error: unsupported authentication mechanism",
    )
    .await;
    // optional: mail without logging in is fine
    c.mail("a@contoso.com", "b@example.com", b"anonymous\r\n")
        .await;
    relay.stop().await;
}

#[tokio::test]
async fn auth_required_refuses_mail_before_login() {
    let relay = Setup::default().listener(&users("required")).start().await;
    let mut c = relay.client().await;
    c.cmd(
        "MAIL FROM:<a@contoso.com>",
        "530 5.7.0 Error: authentication required",
    )
    .await;
    c.cmd(
        &format!("AUTH PLAIN {}", b64(b"\0scanner\0wrong")),
        "535 5.7.8 Error: authentication failed",
    )
    .await;
    c.cmd(
        "MAIL FROM:<a@contoso.com>",
        "530 5.7.0 Error: authentication required",
    )
    .await;
    c.cmd(
        &format!("AUTH PLAIN {}", b64(b"\0scanner\0s3cret")),
        "235 2.7.0 Authentication successful",
    )
    .await;
    c.mail("a@contoso.com", "b@example.com", b"x\r\n").await;
    relay.stop().await;
}

/// After MAX_AUTH_FAILURES failed logins from one address, further logins
/// from it are refused for a while, in any session, even with the right
/// password; other settings of the server are untouched.
#[tokio::test]
async fn failed_logins_are_rate_limited_per_client() {
    let relay = Setup::default().listener(&users("optional")).start().await;
    for _ in 0..MAX_AUTH_FAILURES {
        let mut c = relay.client().await;
        c.cmd(
            &format!("AUTH PLAIN {}", b64(b"\0scanner\0guess")),
            "535 5.7.8 Error: authentication failed",
        )
        .await;
    }
    let mut c = relay.client().await;
    c.cmd(
        &format!("AUTH PLAIN {}", b64(b"\0scanner\0s3cret")),
        "454 4.7.0 Error: too many failed logins, try again later",
    )
    .await;
    c.cmd(
        "AUTH LOGIN",
        "454 4.7.0 Error: too many failed logins, try again later",
    )
    .await;
    relay.stop().await;
}

/// A session driven directly over an in-memory pipe, as if from `ip`.
async fn session_from(ctx: Arc<Context>, ip: [u8; 4]) -> Client {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let peer = SocketAddr::from((ip, 40000));
    tokio::spawn(
        relay_listener::fuzzing::Session::new(server, peer, ctx).run(CancellationToken::new()),
    );
    let mut c = Client::over(client);
    c.expect("220 relay.test ESMTP smtp-oauth-relay ready\r\n")
        .await;
    c
}

/// A LAN client (not loopback) is offered AUTH only inside TLS.
#[tokio::test]
async fn auth_is_offered_to_lan_clients_only_over_tls() {
    let (ctx, _dir, cert) = Setup::default()
        .listener(&users("required"))
        .tls()
        .context()
        .await;
    let cert = cert.expect("certificate");
    let mut c = session_from(ctx.clone(), [192, 168, 1, 20]).await;
    c.cmd(
        "EHLO c",
        &format!("{EHLO_PLAIN}250-STARTTLS\r\n250 ENHANCEDSTATUSCODES"),
    )
    .await;
    c.cmd(
        &format!("AUTH PLAIN {}", b64(b"\0scanner\0s3cret")),
        "538 5.7.11 Encryption required for requested authentication mechanism",
    )
    .await;
    c.cmd(
        "MAIL FROM:<a@contoso.com>",
        "530 5.7.0 Must issue a STARTTLS command first",
    )
    .await;
    c.cmd("STARTTLS", "220 2.0.0 Ready to start TLS").await;
    c.tls(&cert, ANY_TLS).await;
    c.cmd(
        "EHLO c",
        &format!("{EHLO_PLAIN}250-AUTH PLAIN LOGIN\r\n250 ENHANCEDSTATUSCODES"),
    )
    .await;
    c.cmd(
        &format!("AUTH PLAIN {}", b64(b"\0scanner\0s3cret")),
        "235 2.7.0 Authentication successful",
    )
    .await;
    c.cmd("MAIL FROM:<a@contoso.com>", "250 2.1.0 Ok").await;
    c.cmd("RCPT TO:<b@example.com>", "250 2.1.5 Ok").await;
    c.cmd("QUIT", "221 2.0.0 Bye").await;

    // without a certificate a LAN client can never log in
    let (ctx, _dir, _) = Setup::default()
        .listener(&users("optional"))
        .context()
        .await;
    let mut c = session_from(ctx, [10, 0, 0, 9]).await;
    c.cmd("EHLO c", &format!("{EHLO_PLAIN}250 ENHANCEDSTATUSCODES"))
        .await;
    c.cmd("STARTTLS", "502 5.5.1 Error: STARTTLS not available")
        .await;
    c.cmd(
        "AUTH LOGIN",
        "538 5.7.11 Encryption required for requested authentication mechanism",
    )
    .await;
}

//! The fake Exchange Online submission server (`smtp.office365.com:587`):
//! the handle, its records and scripted faults, and the accept loop. The
//! SMTP conversation itself is in [`crate::session`].

use std::collections::VecDeque;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use crate::identity::IdentityPlatform;
use crate::jwt::TokenClaims;
use crate::util::lock;

/// How the submission server is set up.
#[derive(Debug, Clone)]
pub struct SubmissionOptions {
    /// Whether EHLO advertises (and the server accepts) STARTTLS. Turning it
    /// off simulates a path where TLS is unavailable. Default `true`.
    pub offer_starttls: bool,
    /// The only mailbox AUTH accepts. Default `relay@contoso.com`.
    pub mailbox: String,
    /// Port to listen on; `None` (the default) picks a [`reserved_port`](crate::reserved_port).
    pub port: Option<u16>,
    /// Refuse a bad token the way Gmail does: `334 <base64 JSON>`, wait for
    /// the client's empty line, then `535 5.7.8`. Default `false`
    /// (Exchange Online: `535 5.7.3` at once).
    pub google_auth_errors: bool,
}

impl Default for SubmissionOptions {
    fn default() -> Self {
        SubmissionOptions {
            offer_starttls: true,
            mailbox: "relay@contoso.com".to_string(),
            port: None,
            google_auth_errors: false,
        }
    }
}

/// A message the server accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// Id of the connection it arrived on (1 for the first connection).
    pub session: u64,
    /// The `user=` of the XOAUTH2 login, as the client sent it.
    pub auth_user: String,
    /// Claims of the access token the session authenticated with.
    pub token_claims: TokenClaims,
    /// The MAIL FROM address (without angle brackets).
    pub mail_from: String,
    /// The accepted RCPT TO addresses, in order.
    pub rcpt_to: Vec<String>,
    /// The message exactly as the client meant it: dot-stuffing removed and
    /// without the terminating `.` line, so it ends in CRLF.
    pub data: Vec<u8>,
}

impl ReceivedMessage {
    /// The message data as text (invalid UTF-8 replaced), for assertions.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// A fake Microsoft 365 SMTP submission server on `127.0.0.1`.
///
/// This is a cheap handle: clones share the same server and records.
#[derive(Debug, Clone)]
pub struct SubmissionServer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    port: u16,
    ca_pem: String,
    running: Mutex<Option<Running>>,
}

/// A listening server: the accept loop and the sessions it spawned.
#[derive(Debug)]
struct Running {
    accept: JoinHandle<()>,
    sessions: Arc<Mutex<JoinSet<()>>>,
}

/// What sessions need: configuration plus the mutable record.
pub(crate) struct Shared {
    pub(crate) idp: IdentityPlatform,
    pub(crate) mailbox: String,
    pub(crate) offer_starttls: bool,
    pub(crate) google_auth_errors: bool,
    pub(crate) tls: TlsAcceptor,
    pub(crate) record: Mutex<Record>,
    /// Number of accepted messages, so waiters can be woken.
    delivered: watch::Sender<usize>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("mailbox", &self.mailbox)
            .field("offer_starttls", &self.offer_starttls)
            .finish_non_exhaustive()
    }
}

/// Scripted faults and everything observed so far.
#[derive(Debug, Default)]
pub(crate) struct Record {
    pub(crate) send_as: Vec<String>,
    pub(crate) auth_faults: VecDeque<String>,
    pub(crate) rcpt_faults: Vec<(String, String)>,
    pub(crate) data_faults: VecDeque<String>,
    pub(crate) messages: Vec<ReceivedMessage>,
    pub(crate) rejected: Vec<String>,
    pub(crate) auth_failures: Vec<String>,
    sessions: u64,
    live: usize,
    max_concurrent: usize,
}

impl Shared {
    /// Records an accepted message and wakes anyone waiting for it.
    pub(crate) fn deliver(&self, message: ReceivedMessage) {
        let count = {
            let mut record = lock(&self.record);
            record.messages.push(message);
            record.messages.len()
        };
        self.delivered.send_replace(count);
    }
}

/// Keeps the live-connection count right however a session ends (including
/// being aborted by `stop`).
struct LiveSession(Arc<Shared>);

impl LiveSession {
    fn open(shared: &Arc<Shared>) -> (LiveSession, u64) {
        let mut record = lock(&shared.record);
        record.sessions += 1;
        record.live += 1;
        record.max_concurrent = record.max_concurrent.max(record.live);
        (LiveSession(shared.clone()), record.sessions)
    }
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        lock(&self.0.record).live -= 1;
    }
}

impl SubmissionServer {
    /// Starts a server with default options that trusts tokens from `idp`.
    pub async fn start(idp: IdentityPlatform) -> io::Result<SubmissionServer> {
        Self::start_with(idp, SubmissionOptions::default()).await
    }

    /// Starts a server with the given options that trusts tokens from `idp`.
    /// Generates a new CA and server certificate each time.
    pub async fn start_with(
        idp: IdentityPlatform,
        options: SubmissionOptions,
    ) -> io::Result<SubmissionServer> {
        let tls = crate::tls::generate()?;
        // A reserved port, so that a restart finds it still free.
        let (port, listener) = match options.port {
            Some(port) => (port, bind(port)?),
            None => bind_reserved()?,
        };
        let shared = Arc::new(Shared {
            idp,
            mailbox: options.mailbox,
            offer_starttls: options.offer_starttls,
            google_auth_errors: options.google_auth_errors,
            tls: tls.acceptor,
            record: Mutex::new(Record::default()),
            delivered: watch::Sender::new(0),
        });
        let server = SubmissionServer {
            inner: Arc::new(Inner {
                shared,
                port,
                ca_pem: tls.ca_pem,
                running: Mutex::new(None),
            }),
        };
        server.listen(listener);
        tracing::debug!(port, "fake submission server listening");
        Ok(server)
    }

    /// The port the server listens on (on `127.0.0.1`).
    pub fn port(&self) -> u16 {
        self.inner.port
    }

    /// PEM of the CA that signed the server certificate; the relay's
    /// `ca_file` should contain it.
    pub fn ca_pem(&self) -> String {
        self.inner.ca_pem.clone()
    }

    /// The only mailbox XOAUTH2 logins are accepted for.
    pub fn mailbox(&self) -> String {
        self.inner.shared.mailbox.clone()
    }

    /// Lets the mailbox send as another envelope sender (like a SendAs
    /// permission in Exchange). Compared case-insensitively.
    pub fn allow_send_as(&self, address: &str) {
        lock(&self.inner.shared.record)
            .send_as
            .push(address.to_string());
    }

    /// Queues a reply given instead of judging the next AUTH XOAUTH2, e.g.
    /// `"535 5.7.139 Authentication unsuccessful, the request did not meet
    /// the criteria to be authenticated successfully."`. The session stays
    /// unauthenticated. `"disconnect"` drops the connection instead.
    pub fn push_auth_fault(&self, reply: &str) {
        lock(&self.inner.shared.record)
            .auth_faults
            .push_back(reply.to_string());
    }

    /// Queues a reply for the next RCPT TO of `address` (case-insensitive).
    /// A `2xx` reply still accepts the recipient; `"disconnect"` drops the
    /// connection.
    pub fn push_rcpt_fault(&self, address: &str, reply: &str) {
        lock(&self.inner.shared.record)
            .rcpt_faults
            .push((address.to_string(), reply.to_string()));
    }

    /// Queues a reply given at the end of the next DATA instead of accepting
    /// the message; `"disconnect"` drops the connection without a reply. The
    /// message is not recorded either way; the reply is added to
    /// [`rejected`](Self::rejected).
    pub fn push_data_fault(&self, reply: &str) {
        lock(&self.inner.shared.record)
            .data_faults
            .push_back(reply.to_string());
    }

    /// Messages accepted so far, in order.
    pub fn messages(&self) -> Vec<ReceivedMessage> {
        lock(&self.inner.shared.record).messages.clone()
    }

    /// Replies given to refused DATA (SendAs denials, size, scripted faults;
    /// a scripted disconnect is recorded as `"disconnect"`), in order.
    pub fn rejected(&self) -> Vec<String> {
        lock(&self.inner.shared.record).rejected.clone()
    }

    /// Why each failed AUTH failed, in order.
    pub fn auth_failures(&self) -> Vec<String> {
        lock(&self.inner.shared.record).auth_failures.clone()
    }

    /// Connections accepted so far.
    pub fn sessions(&self) -> usize {
        lock(&self.inner.shared.record).sessions as usize
    }

    /// The largest number of connections that were open at the same time.
    pub fn max_concurrent(&self) -> usize {
        lock(&self.inner.shared.record).max_concurrent
    }

    /// Waits until at least `n` messages were accepted or `timeout` passes,
    /// then returns the messages accepted so far (possibly fewer than `n`).
    pub async fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<ReceivedMessage> {
        let mut delivered = self.inner.shared.delivered.subscribe();
        let _ = tokio::time::timeout(timeout, delivered.wait_for(|count| *count >= n)).await;
        self.messages()
    }

    /// Stops listening and closes every open session, so the port refuses
    /// connections once this returns. Records are kept. Idempotent.
    pub async fn stop(&self) {
        let running = lock(&self.inner.running).take();
        let Some(Running { accept, sessions }) = running else {
            return;
        };
        // Awaiting the aborted task guarantees the listener has been dropped.
        accept.abort();
        let _ = accept.await;
        let mut sessions = std::mem::take(&mut *lock(&sessions));
        sessions.abort_all();
        while sessions.join_next().await.is_some() {}
        tracing::debug!(port = self.inner.port, "fake submission server stopped");
    }

    /// Listens again on the same port after [`stop`](Self::stop), with the
    /// same certificate and records (simulating an outage that ended). Does
    /// nothing if the server is running.
    pub async fn restart(&self) -> io::Result<()> {
        if lock(&self.inner.running).is_some() {
            return Ok(());
        }
        let listener = bind(self.inner.port)?;
        self.listen(listener);
        tracing::debug!(port = self.inner.port, "fake submission server restarted");
        Ok(())
    }

    /// Spawns the accept loop on `listener`.
    fn listen(&self, listener: TcpListener) {
        let sessions = Arc::new(Mutex::new(JoinSet::new()));
        let accept = tokio::spawn(accept_loop(
            listener,
            self.inner.shared.clone(),
            sessions.clone(),
        ));
        let mut running = lock(&self.inner.running);
        // A concurrent restart may have won; keep exactly one listener.
        if running.is_some() {
            accept.abort();
        } else {
            *running = Some(Running { accept, sessions });
        }
    }
}

/// A listener on a reserved port. Another process (a test's relay or
/// database, started by another test binary) can take the port between
/// its check and this bind: then the next one is tried.
fn bind_reserved() -> io::Result<(u16, TcpListener)> {
    let mut tries = 0;
    loop {
        let port = crate::reserved_port()?;
        match bind(port) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && tries < 10 => tries += 1,
            bound => return bound.map(|listener| (port, listener)),
        }
    }
}

/// Binds `127.0.0.1:port` with SO_REUSEADDR so a restart can take the same
/// port back while old connections linger in TIME_WAIT.
fn bind(port: u16) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
    socket.listen(1024)
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    sessions: Arc<Mutex<JoinSet<()>>>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Typically EMFILE; back off instead of spinning.
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Replies are small and latency matters more than packet count.
        let _ = stream.set_nodelay(true);
        let (live, id) = LiveSession::open(&shared);
        tracing::debug!(session = id, %peer, "submission session opened");
        let shared = shared.clone();
        let mut set = lock(&sessions);
        // Reap finished sessions so the set does not grow without bound.
        while set.try_join_next().is_some() {}
        set.spawn(async move {
            let _live = live;
            crate::session::run(&shared, stream, id).await;
        });
    }
}

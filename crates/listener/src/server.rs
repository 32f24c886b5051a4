//! Binding, accepting, and the client allow-list.

use crate::{
    auth::AuthLimiter,
    session::{Context, Session},
    tls::Conn,
    ListenerError,
};
use arc_swap::ArcSwap;
use relay_config::ListenerConfig;
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Bound sockets, ready to serve.
pub struct Listener {
    /// Each socket, and whether it speaks TLS from the first byte.
    sockets: Vec<(TcpListener, bool)>,
}

impl Listener {
    /// The addresses actually bound (port 0 resolved), plain ones first.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.sockets
            .iter()
            .filter_map(|(s, _)| s.local_addr().ok())
            .collect()
    }

    /// The implicit-TLS addresses among [`Listener::local_addrs`].
    pub fn tls_addrs(&self) -> Vec<SocketAddr> {
        self.sockets
            .iter()
            .filter(|(_, tls)| *tls)
            .filter_map(|(s, _)| s.local_addr().ok())
            .collect()
    }
}

/// Binds every address in `listener.bind` and `listener.implicit_tls_bind`
/// (whose clients start with a TLS handshake), before anything else
/// starts, so a port in use is reported at once.
pub async fn bind(
    addrs: &[SocketAddr],
    implicit_tls: &[SocketAddr],
) -> Result<Listener, ListenerError> {
    let mut sockets = Vec::with_capacity(addrs.len() + implicit_tls.len());
    for (&addr, tls) in addrs
        .iter()
        .map(|a| (a, false))
        .chain(implicit_tls.iter().map(|a| (a, true)))
    {
        let socket = TcpListener::bind(addr)
            .await
            .map_err(|source| ListenerError::Bind { addr, source })?;
        sockets.push((socket, tls));
    }
    Ok(Listener { sockets })
}

/// What every session of one server shares, and keeps across reloads: the
/// count of open connections and the failed logins per client.
#[derive(Debug, Default)]
pub struct Shared {
    pub auth_failures: AuthLimiter,
    connections: Mutex<Connections>,
}

#[derive(Debug, Default)]
struct Connections {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// One counted connection; uncounted when dropped.
pub struct Slot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Shared {
    /// Counts a new connection from `ip`, or says why it is one too many.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        config: &ListenerConfig,
    ) -> Result<Slot, &'static str> {
        let mut c = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        if c.total >= config.max_connections {
            return Err("421 4.3.2 Error: too many connections, try again later");
        }
        let from_ip = c.per_ip.entry(ip).or_insert(0);
        if *from_ip >= config.max_connections_per_ip {
            return Err("421 4.7.0 Error: too many connections from your address");
        }
        *from_ip += 1;
        c.total += 1;
        Ok(Slot {
            shared: self.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self
            .shared
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

/// Accepts clients until `shutdown`, then stops accepting; open sessions are
/// told `421` at their next command. Returns once every session has ended.
/// Each new client gets the context in `contexts` when it connects (a
/// reload stores a new one); a session keeps the one it started with.
pub async fn serve(
    listener: Listener,
    contexts: Arc<ArcSwap<Context>>,
    shutdown: CancellationToken,
) {
    let sessions = TaskTracker::new();
    let shared = Arc::new(Shared::default());
    let mut accept_loops = Vec::new();
    for (socket, implicit_tls) in listener.sockets {
        let (contexts, shutdown, sessions, shared) = (
            contexts.clone(),
            shutdown.clone(),
            sessions.clone(),
            shared.clone(),
        );
        accept_loops.push(tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = socket.accept() => accepted,
                    _ = shutdown.cancelled() => return,
                };
                match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let (ctx, shutdown) = (contexts.load_full(), shutdown.clone());
                        sessions.spawn(handle(
                            stream,
                            peer,
                            implicit_tls,
                            ctx,
                            shared.clone(),
                            shutdown,
                        ));
                    }
                    Err(e) => {
                        // e.g. out of file descriptors: pause rather than spin
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        }));
    }
    for accept_loop in accept_loops {
        let _ = accept_loop.await;
    }
    sessions.close();
    sessions.wait().await;
}

/// Writes a last reply and closes, without waiting long for a client that
/// does not read.
async fn refuse(stream: &mut tokio::net::TcpStream, reply: &str) {
    let write = tokio::io::AsyncWriteExt::write_all(stream, reply.as_bytes());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), write).await;
}

async fn handle(
    mut stream: tokio::net::TcpStream,
    peer: SocketAddr,
    implicit_tls: bool,
    ctx: Arc<Context>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let ip = peer.ip().to_canonical();
    if !ctx
        .config
        .allowed_networks
        .iter()
        .any(|net| net.contains(&ip))
    {
        tracing::warn!(client = %ip, "refused a client outside listener.allowed_networks");
        metrics::counter!("smtp_relay_connections_refused_total").increment(1);
        refuse(
            &mut stream,
            &format!("554 5.7.1 {ip} is not allowed to use this relay\r\n"),
        )
        .await;
        return;
    }
    let _slot = match shared.admit(ip, &ctx.config) {
        Ok(slot) => slot,
        Err(reply) => {
            tracing::warn!(client = %ip, "refused a connection over listener.max_connections or max_connections_per_ip");
            metrics::counter!("smtp_relay_connections_refused_total").increment(1);
            refuse(&mut stream, &format!("{reply}\r\n")).await;
            return;
        }
    };
    tracing::debug!(client = %ip, tls = implicit_tls, "connected");
    // The session (its logs, and the client address stored with each queued
    // message) sees the address as the allow-list did: `127.0.0.1` rather
    // than `::ffff:127.0.0.1` on a dual-stack socket.
    let peer = SocketAddr::new(ip, peer.port());
    let conn = if implicit_tls {
        let Some(acceptor) = ctx.tls.clone() else {
            tracing::warn!(client = %ip, "implicit TLS connection but no certificate loaded");
            return;
        };
        match tokio::time::timeout(ctx.config.command_timeout, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => Conn::Tls(Box::new(tls)),
            Ok(Err(e)) => {
                tracing::debug!(client = %ip, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(client = %ip, "TLS handshake timed out");
                return;
            }
        }
    } else {
        Conn::Plain(stream)
    };
    let open = metrics::gauge!("smtp_relay_connections_open");
    open.increment(1.0);
    if let Err(e) = Session::with_conn(conn, peer, ctx, shared)
        .run(shutdown)
        .await
    {
        tracing::debug!(client = %ip, error = %e, "session ended with an error");
    }
    open.decrement(1.0);
}

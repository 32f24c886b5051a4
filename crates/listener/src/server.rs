//! Binding, accepting, and the client allow-list.

use crate::session::{Context, Session};
use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Why the listener cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Bound sockets, ready to serve.
pub struct Listener {
    sockets: Vec<TcpListener>,
}

impl Listener {
    /// The addresses actually bound (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.sockets
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }
}

/// Binds every address in `listener.bind`, before anything else starts, so a
/// port in use is reported at once.
pub async fn bind(addrs: &[SocketAddr]) -> Result<Listener, ListenerError> {
    let mut sockets = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        let socket = TcpListener::bind(addr)
            .await
            .map_err(|source| ListenerError::Bind { addr, source })?;
        sockets.push(socket);
    }
    Ok(Listener { sockets })
}

/// A value replaced as a whole at run time (on reload). Readers take the
/// current one and keep it for as long as they need it: a session keeps the
/// configuration it started with.
pub struct Live<T>(Arc<RwLock<Arc<T>>>);

impl<T> Clone for Live<T> {
    fn clone(&self) -> Self {
        Live(self.0.clone())
    }
}

impl<T> Live<T> {
    pub fn new(value: Arc<T>) -> Self {
        Live(Arc::new(RwLock::new(value)))
    }

    /// The current value.
    pub fn get(&self) -> Arc<T> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the value for everyone who asks from now on.
    pub fn set(&self, value: Arc<T>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = value;
    }
}

/// [`serve_live`] with a context that never changes.
pub async fn serve(listener: Listener, ctx: Arc<Context>, shutdown: CancellationToken) {
    serve_live(listener, Live::new(ctx), shutdown).await
}

/// Accepts clients until `shutdown`, then stops accepting; open sessions are
/// told `421` at their next command. Returns once every session has ended.
/// Each new client gets the context current when it connects (see [`Live`]).
pub async fn serve_live(listener: Listener, ctx: Live<Context>, shutdown: CancellationToken) {
    let sessions = TaskTracker::new();
    let mut accept_loops = Vec::new();
    for socket in listener.sockets {
        let (ctx, shutdown, sessions) = (ctx.clone(), shutdown.clone(), sessions.clone());
        accept_loops.push(tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = socket.accept() => accepted,
                    _ = shutdown.cancelled() => return,
                };
                match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let (ctx, shutdown) = (ctx.get(), shutdown.clone());
                        sessions.spawn(handle(stream, peer, ctx, shutdown));
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

async fn handle(
    mut stream: tokio::net::TcpStream,
    peer: SocketAddr,
    ctx: Arc<Context>,
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
        let reply = format!("554 5.7.1 {ip} is not allowed to use this relay\r\n");
        let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, reply.as_bytes()).await;
        return;
    }
    tracing::debug!(client = %ip, "connected");
    // Fix: the session (its logs, and the client address stored with each
    // queued message) gets the canonical address too, `127.0.0.1` rather
    // than `::ffff:127.0.0.1` on a dual-stack socket, as the allow-list saw it.
    let peer = SocketAddr::new(ip, peer.port());
    let open = metrics::gauge!("smtp_relay_connections_open");
    open.increment(1.0);
    if let Err(e) = Session::new(stream, peer, ctx).run(shutdown).await {
        tracing::debug!(client = %ip, error = %e, "session ended with an error");
    }
    open.decrement(1.0);
}

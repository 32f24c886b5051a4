//! An axum app served on loopback until stopped: what the identity platform
//! and the Graph stand-in share.

use crate::util::lock;
use axum::Router;
use std::{sync::Mutex, time::Duration};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

/// How long `stop` lets requests in progress finish before aborting.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A running server; `stop` ends it.
#[derive(Debug, Default)]
pub(crate) struct Server {
    running: Mutex<Option<(oneshot::Sender<()>, JoinHandle<()>)>>,
}

impl Server {
    /// Serves `app` on `listener` in a task of its own; `name` is for logs.
    pub(crate) fn start(&self, listener: TcpListener, app: Router, name: &'static str) {
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = stopped.await;
            });
            if let Err(e) = serve.await {
                tracing::debug!(error = %e, "{name} stopped with an error");
            }
        });
        *lock(&self.running) = Some((shutdown, task));
    }

    /// Stops accepting and ends the server, waiting at most [`STOP_GRACE`]
    /// for requests in progress. Idempotent.
    pub(crate) async fn stop(&self) {
        let Some((shutdown, mut task)) = lock(&self.running).take() else {
            return;
        };
        let _ = shutdown.send(());
        if tokio::time::timeout(STOP_GRACE, &mut task).await.is_err() {
            task.abort();
            let _ = task.await;
        }
    }
}

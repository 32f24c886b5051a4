//! `run`: the relay itself. Wires listener → queue → delivery, with a token
//! manager per account on the side, and stops them in that order.

use anyhow::Context as _;
use relay_config::Config;
use relay_delivery::{Account, Upstream};
use relay_listener::{session::Context, Router};
use relay_queue::{Queue, QueueSettings};
use relay_tokens::{TokenManager, TokenSource};
use std::{path::Path, sync::Arc, time::Duration};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

/// How long open SMTP sessions and deliveries in hand get to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

pub async fn run(path: &Path) -> anyhow::Result<()> {
    let config = crate::check::load(path)?;
    let relay = Running::start(config).await?;
    wait_for_signal().await?;
    tracing::info!("shutting down");
    relay.stop().await;
    Ok(())
}

/// A started relay.
pub struct Running {
    shutdown: CancellationToken,
    listener: JoinHandle<()>,
    delivery: JoinSet<()>,
    refreshers: Vec<JoinHandle<()>>,
}

impl Running {
    /// Binds the listener first (a port in use fails at once), then opens the
    /// queue and starts token managers, delivery and the listener.
    pub async fn start(config: Config) -> anyhow::Result<Running> {
        let listener = relay_listener::bind(&config.listener.bind).await?;
        let queue = Queue::open(queue_settings(&config.queue))
            .await
            .with_context(|| format!("queue directory {}", config.queue.dir.display()))?;
        let upstream = Arc::new(Upstream::new(&config.upstream, &config.listener.hostname)?);
        let shutdown = CancellationToken::new();
        let mut accounts = Vec::new();
        let mut refreshers = Vec::new();
        for (i, account) in config.accounts.iter().enumerate() {
            // Delegated accounts keep their refresh token in a token cache
            // beside the queue unless `token_cache` says otherwise.
            let source = TokenSource::for_account(account, &config.queue.dir)
                .with_context(|| format!("accounts[{i}]"))?;
            let tokens = TokenManager::new(&account.name, source)?;
            refreshers.push(tokens.spawn_refresher(shutdown.clone()));
            accounts.push(Account::from_config(account, &config.upstream, tokens));
        }
        for orphan in queue
            .accounts_with_mail()
            .into_iter()
            .filter(|name| !config.accounts.iter().any(|a| &a.name == name))
        {
            tracing::warn!(
                account = %orphan,
                "queued mail belongs to an account that is no longer configured; it waits until the account is back"
            );
        }
        tracing::info!(
            upstream = %upstream.address(),
            queued = queue.depth(),
            "delivering to the upstream"
        );
        let mut delivery =
            relay_delivery::spawn(queue.clone(), upstream, accounts, shutdown.clone());
        delivery.spawn(queue.clone().serve_control(shutdown.clone()));
        let ctx = Arc::new(Context {
            router: Router::new(&config.accounts),
            config: config.listener,
            queue,
        });
        tracing::info!(addrs = ?listener.local_addrs(), "listening for SMTP");
        let listener = tokio::spawn(relay_listener::serve(listener, ctx, shutdown.clone()));
        Ok(Running {
            shutdown,
            listener,
            delivery,
            refreshers,
        })
    }

    /// Stops accepting, lets sessions and deliveries in hand finish (bounded),
    /// and returns. What is queued stays on disk for the next start.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut self.listener)
            .await
            .is_err()
        {
            tracing::warn!("SMTP sessions still open after the grace period; closing them");
            self.listener.abort();
        }
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while self.delivery.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("deliveries still running after the grace period; they will be retried");
            self.delivery.abort_all();
        }
        for refresher in self.refreshers {
            refresher.abort();
        }
    }
}

/// The queue's settings from `[queue]`.
pub fn queue_settings(queue: &relay_config::QueueConfig) -> QueueSettings {
    QueueSettings {
        dir: queue.dir.clone(),
        retry_initial: queue.retry_initial,
        retry_max: queue.retry_max,
        max_age: queue.max_age,
    }
}

/// Waits for SIGTERM or Ctrl-C.
pub async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        result = tokio::signal::ctrl_c() => result.context("waiting for Ctrl-C")?,
    }
    Ok(())
}

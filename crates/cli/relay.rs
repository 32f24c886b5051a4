//! `run`: the relay itself. Wires listener → queue → delivery, with a token
//! manager per account on the side and the admin endpoint beside them;
//! reloads on SIGHUP and stops, in that order, on SIGTERM.
//!
//! A reload swaps what can change while mail flows: the listener's policy
//! (allowed networks, limits, accounts' senders) for new connections, the
//! upstream and the accounts (delivery workers are restarted, after finishing
//! the message in hand, only when one of those changed; unchanged accounts
//! keep their tokens), and the listener's TLS certificate and key, read
//! again. Addresses to listen on, the queue and the admin endpoint need a
//! restart.
//!
//! Every task the relay spawns (listener, delivery workers, token renewal,
//! admin endpoint, queue control) is supervised: one that ends while the
//! relay runs, by a panic or otherwise, stops the relay with an error, so
//! the process exits non-zero and systemd restarts it rather than leaving
//! it half alive.

use crate::{
    status::{AdminStatus, RelayStatus},
    supervise::Tasks,
};
use anyhow::Context as _;
use arc_swap::ArcSwap;
use relay_config::Transport;
use relay_config::{AccountConfig, Config, StateDir};
use relay_delivery::{transport::graph::Graph, Account, Upstream};
use relay_graph::GraphClient;
use relay_listener::{Context, Intake, Router};
use relay_queue::{Queue, QueueSettings};
use relay_store::Store;
use relay_tokens::{TokenManager, TokenSource};
use std::{path::Path, sync::Arc, time::Duration};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long `run` waits for every account's first token before telling
/// systemd it is ready anyway.
const FIRST_TOKEN_WAIT: Duration = Duration::from_secs(30);
/// How often systemd's STATUS= line is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(30);

pub async fn run(config: Config, path: &Path) -> anyhow::Result<()> {
    // Signals first: SIGTERM stops the relay in order and SIGHUP waits for
    // its turn, even while it starts or waits for its first tokens.
    let terminate = termination()?;
    tokio::pin!(terminate);
    let mut hangup = signal(tokio::signal::unix::SignalKind::hangup())?;
    let Some(mut relay) = Running::start(config, terminate.as_mut()).await? else {
        tracing::info!("shutting down before the queue opened");
        crate::notify::stopping();
        return Ok(());
    };
    let outcome = tokio::select! {
        () = &mut terminate => Ok(()),
        () = relay.wait_for_first_tokens() => relay.serve(path, &mut hangup, terminate).await,
    };
    match &outcome {
        Ok(()) => tracing::info!("shutting down"),
        Err(e) => tracing::error!(error = %one_line(e), "shutting down"),
    }
    crate::notify::stopping();
    relay.stop().await;
    outcome
}

/// A started relay.
pub struct Running {
    shutdown: CancellationToken,
    /// The configuration in force (sections that need a restart keep the
    /// values the relay started with).
    config: Config,
    queue: Queue,
    /// The queue as the listener's sessions see it.
    intake: Intake,
    context: Arc<ArcSwap<Context>>,
    delivery: Delivery,
    tokens: Vec<AccountTokens>,
    /// The last Graph client built: a rebuilt one takes over its pauses.
    graph: Option<Arc<GraphClient>>,
    status: Arc<RelayStatus>,
    /// Everything spawned but the delivery workers, supervised.
    tasks: Tasks,
}

/// An account's token manager and what stops its refresher.
struct AccountTokens {
    account: AccountConfig,
    manager: TokenManager,
    stop: CancellationToken,
}

/// What a reload applies, all of it built before anything changes.
struct Prepared {
    config: Config,
    tokens: Vec<AccountTokens>,
    context: Context,
    /// Set when `[upstream]`, `[graph]`, the accounts or the host name
    /// changed: the delivery workers restart with it.
    ways_out: Option<WaysOut>,
}

/// The transports the accounts deliver through.
struct WaysOut {
    smtp: Arc<Upstream>,
    /// Only when an account has `transport = "graph"`.
    graph: Option<Arc<Graph>>,
}

/// The delivery workers of the accounts in force.
struct Delivery {
    stop: CancellationToken,
    workers: JoinSet<()>,
}

impl Delivery {
    /// Lets workers finish the message in hand, for at most `grace`.
    /// Cancel safe: workers not yet joined stay in `self.workers`.
    async fn stop(&mut self, grace: Duration) {
        self.stop.cancel();
        if !crate::supervise::drain(&mut self.workers, grace).await {
            tracing::warn!("deliveries still running after the grace period; they will be retried");
        }
    }
}

impl Running {
    /// Binds the listener and the admin endpoint first (an address in use
    /// fails at once), then opens the queue and starts token managers,
    /// delivery, the listener and the admin endpoint.
    ///
    /// A shared database that cannot be reached is waited for: the listener
    /// and the admin endpoint start at once, every transaction is answered
    /// `451 4.3.0`, `/readyz` names the database and why, and the queue is
    /// opened as soon as the database answers. `None`: `stop` resolved
    /// before that.
    pub async fn start(
        config: Config,
        stop: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> anyhow::Result<Option<Running>> {
        let listener =
            relay_listener::bind(&config.listener.bind, &config.listener.implicit_tls_bind).await?;
        let admin = relay_admin::Endpoint::bind(config.admin.bind).await?;
        let metrics = relay_admin::install_recorder()?;
        let shutdown = CancellationToken::new();
        crate::notify::spawn_watchdog(shutdown.clone());
        let mut tasks = Tasks::default();
        let settings = queue_settings(&config.queue)?;
        let admin_status = Arc::new(AdminStatus::opening(settings.store_name()));
        let intake = Intake::waiting();
        let context = Arc::new(ArcSwap::from_pointee(listener_context(&config, &intake)?));
        let listening = listener.local_addrs();
        // Both serve once the queue is open, or as soon as it is found
        // unreachable; until then connections wait in the sockets' backlog.
        let mut unserved = Some((listener, admin));
        let mut serve = |tasks: &mut Tasks, note: &str| {
            if let Some((listener, admin)) = unserved.take() {
                if let Some(addr) = admin.local_addr() {
                    tracing::info!(%addr, "admin endpoint: /healthz /readyz /metrics");
                }
                tasks.spawn_background(admin.serve(
                    admin_status.clone(),
                    metrics.clone(),
                    shutdown.clone(),
                ));
                tracing::info!(addrs = ?listening, "listening for SMTP{note}");
                tasks.spawn_listener(relay_listener::serve(
                    listener,
                    context.clone(),
                    shutdown.clone(),
                ));
            }
        };
        let waiting = |why: String| {
            admin_status.waiting(why.clone());
            serve(
                &mut tasks,
                "; transactions are answered 451 until the queue opens",
            );
            crate::notify::ready(&format!("waiting for the queue: {why}"));
        };
        let Some(queue) = open_queue(&config.queue, settings, stop, waiting).await? else {
            shutdown.cancel();
            tasks.stop_listener(config.listener.shutdown_timeout).await;
            tasks.stop().await;
            return Ok(None);
        };
        intake.open(queue.clone());
        let tokens = account_tokens(&config, &[], queue.shared_store())?;
        for entry in &tokens {
            entry.start_refresher(&mut tasks);
        }
        warn_about_orphans(&queue, &config).await;
        let ways_out = ways_out(&config, None)?;
        let graph = ways_out.graph.as_ref().map(|g| g.client().clone());
        let delivery = start_delivery(&config, &queue, &tokens, ways_out, &shutdown);
        let status = Arc::new(RelayStatus {
            listening: listening.clone(),
            queue_dir: config.queue.dir.clone(),
            queue: queue.clone(),
            tokens: ArcSwap::from_pointee(managers(&tokens)),
        });
        admin_status.running(status.clone());
        serve(&mut tasks, "");
        Ok(Some(Running {
            shutdown,
            config,
            queue,
            intake,
            context,
            delivery,
            tokens,
            graph,
            status,
            tasks,
        }))
    }

    /// Tells systemd it is ready, then reloads on SIGHUP until `terminate`
    /// resolves or a task fails.
    async fn serve(
        &mut self,
        path: &Path,
        hangup: &mut tokio::signal::unix::Signal,
        mut terminate: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> anyhow::Result<()> {
        crate::notify::ready(&self.status.summary());
        self.spawn_status_updates();
        loop {
            tokio::select! {
                () = &mut terminate => return Ok(()),
                failure = self.failure() => return Err(failure),
                _ = hangup.recv() => {}
            }
            crate::notify::reloading();
            // A reload waits for deliveries in hand; SIGTERM must not wait for it.
            tokio::select! {
                () = &mut terminate => return Ok(()),
                () = self.reload_from(path) => {}
            }
            crate::notify::ready(&self.status.summary());
        }
    }

    /// Reads the configuration at `path` again and applies it; if it is
    /// invalid, or part of it cannot be built, nothing changes.
    async fn reload_from(&mut self, path: &Path) {
        match crate::check::load_with_secrets(path).and_then(|new| self.prepare(new)) {
            Ok(prepared) => self.apply(prepared).await,
            Err(e) => tracing::error!(
                error = %one_line(&e),
                "reload refused, the running configuration stays"
            ),
        }
    }

    /// Builds everything `new` needs (token managers, the upstream, the
    /// listener's context with its TLS certificate read again) without
    /// changing anything. Sections that need a restart keep their running
    /// values, with a warning.
    fn prepare(&self, mut new: Config) -> anyhow::Result<Prepared> {
        let old = &self.config;
        for (changed, what) in [
            (new.listener.bind != old.listener.bind, "listener.bind"),
            (
                new.listener.implicit_tls_bind != old.listener.implicit_tls_bind,
                "listener.implicit_tls_bind",
            ),
            (new.queue != old.queue, "[queue]"),
            (new.admin != old.admin, "[admin]"),
            (new.log != old.log, "[log]"),
        ] {
            if changed {
                tracing::warn!("{what} changed: it takes effect at the next restart");
            }
        }
        new.listener.bind = old.listener.bind.clone();
        new.listener.implicit_tls_bind = old.listener.implicit_tls_bind.clone();
        new.queue = old.queue.clone();
        new.admin = old.admin.clone();
        new.log = old.log.clone();
        let tokens = account_tokens(&new, &self.tokens, self.queue.shared_store())?;
        let delivery_changed = new.upstream != old.upstream
            || new.graph != old.graph
            || new.accounts != old.accounts
            || new.listener.hostname != old.listener.hostname;
        let ways_out = if delivery_changed {
            Some(ways_out(&new, self.graph.as_deref())?)
        } else {
            None
        };
        let context = listener_context(&new, &self.intake)?;
        Ok(Prepared {
            config: new,
            tokens,
            context,
            ways_out,
        })
    }

    /// Applies what [`Running::prepare`] built, without dropping connections
    /// or queued mail.
    async fn apply(&mut self, prepared: Prepared) {
        let Prepared {
            config: new,
            tokens,
            context,
            ways_out,
        } = prepared;
        if let Some(ways_out) = ways_out {
            if let Some(graph) = &ways_out.graph {
                self.graph = Some(graph.client().clone());
            }
            // The old workers finish first, so the mailbox never sees more
            // connections than allowed.
            self.delivery
                .stop(self.config.listener.shutdown_timeout)
                .await;
            self.delivery = start_delivery(&new, &self.queue, &tokens, ways_out, &self.shutdown);
        }
        for entry in &tokens {
            if !self
                .tokens
                .iter()
                .any(|old| old.manager.same_as(&entry.manager))
            {
                entry.start_refresher(&mut self.tasks);
            }
        }
        for old in &self.tokens {
            if !tokens.iter().any(|t| t.manager.same_as(&old.manager)) {
                old.stop.cancel();
            }
        }
        self.status.tokens.store(Arc::new(managers(&tokens)));
        self.context.store(Arc::new(context));
        self.tokens = tokens;
        self.config = new;
        tracing::info!("configuration reloaded");
    }

    /// Waits until a supervised task ends without being told to, and says
    /// which. Cancel safe.
    async fn failure(&mut self) -> anyhow::Error {
        let stopping = self.delivery.stop.is_cancelled();
        self.tasks
            .failure(&mut self.delivery.workers, stopping)
            .await
    }

    /// Waits (bounded) until every account has a token, so READY=1 means
    /// mail can flow; warns about the ones that have none.
    async fn wait_for_first_tokens(&self) {
        // all accounts at once, so the wait stays within one FIRST_TOKEN_WAIT
        // (systemd's start timeout is 90 s) however many accounts fail
        let mut waits = JoinSet::new();
        for entry in &self.tokens {
            let (name, manager) = (entry.account.name.clone(), entry.manager.clone());
            waits.spawn(async move {
                match tokio::time::timeout(FIRST_TOKEN_WAIT, manager.token()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(account = %name, error = %e, "no access token yet; mail waits in the queue")
                    }
                    Err(_) => {
                        tracing::warn!(account = %name, "no access token within {}s; mail waits in the queue", FIRST_TOKEN_WAIT.as_secs())
                    }
                }
            });
        }
        while waits.join_next().await.is_some() {}
    }

    fn spawn_status_updates(&mut self) {
        let (status, shutdown) = (self.status.clone(), self.shutdown.clone());
        self.tasks.spawn_background(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(STATUS_EVERY) => crate::notify::status(&status.summary()),
                }
            }
        });
    }

    /// Stops accepting; clients in the middle of a transaction and
    /// deliveries in hand get `listener.shutdown_timeout` to finish. What is
    /// queued stays on disk for the next start.
    pub async fn stop(mut self) {
        let grace = self.config.listener.shutdown_timeout;
        self.shutdown.cancel();
        for entry in &self.tokens {
            entry.stop.cancel();
        }
        self.tasks.stop_listener(grace).await;
        self.delivery.stop(grace).await;
        self.queue.release_all().await;
        self.tasks.stop().await;
    }
}

/// An error on one line (a log event is one line): a list of problems is
/// joined with "; ".
fn one_line(e: &anyhow::Error) -> String {
    crate::describe(e)
        .replace(":\n  ", ": ")
        .replace("\n  ", "; ")
        .replace('\n', " ")
}

impl AccountTokens {
    /// Starts the account's token renewal under supervision.
    fn start_refresher(&self, tasks: &mut Tasks) {
        tasks.watch(
            format!("token renewal of account {:?}", self.account.name),
            self.stop.clone(),
            self.manager.spawn_refresher(self.stop.clone()),
        );
    }
}

/// Token managers for `config`'s accounts, sharing refresh tokens through
/// `shared` (if any); an account whose settings did not change keeps its
/// manager (and its token) from `current`.
fn account_tokens(
    config: &Config,
    current: &[AccountTokens],
    shared: Option<&Store>,
) -> anyhow::Result<Vec<AccountTokens>> {
    let mut out = Vec::with_capacity(config.accounts.len());
    for (i, account) in config.accounts.iter().enumerate() {
        if let Some(same) = current
            .iter()
            .find(|t| t.account.name == account.name && t.account.oauth == account.oauth)
        {
            out.push(AccountTokens {
                account: account.clone(),
                manager: same.manager.clone(),
                stop: same.stop.clone(),
            });
            continue;
        }
        // Delegated accounts keep their refresh token in the state
        // directory's token cache unless `token_cache` says otherwise.
        let source = TokenSource::for_account(account, StateDir::new(&config.queue).queue())
            .with_context(|| format!("accounts[{i}]"))?;
        out.push(AccountTokens {
            account: account.clone(),
            manager: TokenManager::shared(&account.name, source, shared.cloned())?,
            stop: CancellationToken::new(),
        });
    }
    Ok(out)
}

fn managers(tokens: &[AccountTokens]) -> Vec<TokenManager> {
    tokens.iter().map(|t| t.manager.clone()).collect()
}

/// The upstream `config` describes (reading its CA file), and one Graph
/// client shared by the graph accounts, in place of `previous` if any.
fn ways_out(config: &Config, previous: Option<&GraphClient>) -> anyhow::Result<WaysOut> {
    let smtp = Arc::new(Upstream::new(&config.upstream, &config.listener.hostname)?);
    let graph = match config
        .accounts
        .iter()
        .any(|a| a.transport == Transport::Graph)
    {
        true => {
            let settings = graph_settings(&config.graph)?;
            let client = match previous {
                Some(previous) => GraphClient::replacing(previous, settings),
                None => GraphClient::new(settings),
            }
            .context("building the Graph HTTP client")?;
            Some(Arc::new(Graph::new(Arc::new(client))))
        }
        false => None,
    };
    Ok(WaysOut { smtp, graph })
}

/// A token manager for `account` outside the running relay (`doctor`,
/// `token`): with a shared queue it redeems the refresh token under the
/// other relays' lock, so it never spends a token they rely on.
pub async fn token_manager(
    config: &Config,
    account: &AccountConfig,
    source: TokenSource,
) -> anyhow::Result<TokenManager> {
    let queue = match config.queue.database_url {
        Some(_) => Some(open_admin(&config.queue).await?),
        None => None,
    };
    let shared = queue.as_ref().and_then(|q| q.shared_store()).cloned();
    Ok(TokenManager::shared(&account.name, source, shared)?)
}

/// The Graph client `[graph]` describes.
pub fn graph_client(graph: &relay_config::GraphConfig) -> anyhow::Result<GraphClient> {
    GraphClient::new(graph_settings(graph)?).context("building the Graph HTTP client")
}

fn graph_settings(graph: &relay_config::GraphConfig) -> anyhow::Result<relay_graph::Settings> {
    Ok(relay_graph::Settings {
        endpoint: graph.endpoint.clone(),
        max_requests: std::num::NonZeroUsize::new(graph.max_requests)
            .context("graph.max_requests must be more than 0")?,
        timeout: graph.timeout,
    })
}

fn start_delivery(
    config: &Config,
    queue: &Queue,
    tokens: &[AccountTokens],
    ways_out: WaysOut,
    stop: &CancellationToken,
) -> Delivery {
    let (mut smtp, mut graph) = (Vec::new(), Vec::new());
    for t in tokens {
        let account = Account {
            shared: queue.shared_store().cloned(),
            ..Account::from_config(&t.account, config, t.manager.clone())
        };
        match t.account.transport {
            Transport::Smtp => smtp.push(account),
            Transport::Graph => graph.push(account),
        }
    }
    let stop = stop.child_token();
    let settings = relay_delivery::Settings {
        state: Some(StateDir::new(&config.queue)),
        hostname: config.listener.hostname.clone(),
    };
    let mut workers = JoinSet::new();
    if !smtp.is_empty() {
        tracing::info!(upstream = %ways_out.smtp.address(), queued = waiting(queue), "delivering to the upstream");
        relay_delivery::spawn_into(
            &mut workers,
            queue.clone(),
            ways_out.smtp,
            smtp,
            settings.clone(),
            stop.clone(),
        );
    }
    if let (Some(transport), false) = (ways_out.graph, graph.is_empty()) {
        tracing::info!(graph = %config.graph.endpoint, queued = waiting(queue), "delivering through Microsoft Graph");
        relay_delivery::spawn_into(
            &mut workers,
            queue.clone(),
            transport,
            graph,
            settings,
            stop.clone(),
        );
    }
    Delivery { workers, stop }
}

/// The listener's policy, TLS certificate and local users.
fn listener_context(config: &Config, intake: &Intake) -> anyhow::Result<Context> {
    Ok(Context::new(
        config.listener.clone(),
        Router::new(&config.accounts),
        intake.clone(),
    )?)
}

/// The first wait for a shared database that cannot be reached, doubled
/// after each attempt up to [`QUEUE_RETRY_MAX`].
const QUEUE_RETRY_FIRST: Duration = Duration::from_secs(1);
const QUEUE_RETRY_MAX: Duration = Duration::from_secs(10);

/// Opens the relay's queue (`[queue]` as `config`, read into `settings`).
/// A shared database that cannot be reached is tried again, with
/// `unreachable` told why each time, until it opens or `stop` resolves
/// (`None`); any other error (a login refused, a schema too new, the queue
/// directory) is returned at once.
async fn open_queue(
    config: &relay_config::QueueConfig,
    settings: QueueSettings,
    mut stop: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    mut unreachable: impl FnMut(String),
) -> anyhow::Result<Option<Queue>> {
    let name = settings.store_name();
    let mut delay = QUEUE_RETRY_FIRST;
    loop {
        let opened = tokio::select! {
            () = stop.as_mut() => return Ok(None),
            opened = Queue::open(settings.clone()) => opened,
        };
        match opened {
            Ok(queue) => return Ok(Some(queue)),
            Err(e) if config.database_url.is_some() && e.is_unreachable() => {
                tracing::warn!(
                    error = %format!("{}: {e}", queue_named(config)),
                    retry_in = ?delay,
                    "cannot reach the queue's database; new mail is answered 451 until it is reached"
                );
                unreachable(format!("{name}: {e}"));
            }
            Err(e) => return Err(anyhow::Error::from(e).context(queue_named(config))),
        }
        tokio::select! {
            () = stop.as_mut() => return Ok(None),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(QUEUE_RETRY_MAX);
    }
}

/// Messages waiting for delivery, as of the queue's last look at its store.
fn waiting(queue: &Queue) -> usize {
    let census = queue.health().census;
    census.queued.count + census.deferred.count
}

async fn warn_about_orphans(queue: &Queue, config: &Config) {
    let accounts = match queue.accounts_with_mail().await {
        Ok(accounts) => accounts,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the accounts with queued mail");
            return;
        }
    };
    for orphan in accounts
        .into_iter()
        .filter(|name| !config.accounts.iter().any(|a| &a.name == name))
    {
        tracing::warn!(
            account = %orphan,
            "queued mail belongs to an account that is no longer configured; it waits until the account is back"
        );
    }
}

/// The queue as its owner's other verbs (`queue`, `token`, `doctor`,
/// `send-test`) open it beside a running relay.
pub async fn open_admin(queue: &relay_config::QueueConfig) -> anyhow::Result<Queue> {
    Queue::open_admin(queue_settings(queue)?)
        .await
        .with_context(|| queue_named(queue))
}

/// Where the queue is, for an error opening it: the database (with the
/// verb that checks it) or the directory.
fn queue_named(queue: &relay_config::QueueConfig) -> String {
    match &queue.database_url {
        Some(url) => format!(
            "queue database PostgreSQL {} (`smtp-oauth-relay doctor` checks it)",
            url.place()
        ),
        None => format!("queue directory {}", queue.dir.display()),
    }
}

/// The password in `queue.database_password_file`, if one is named.
pub fn database_password(
    queue: &relay_config::QueueConfig,
) -> anyhow::Result<Option<relay_config::Secret>> {
    queue.database_password().with_context(|| {
        format!(
            "queue.database_password_file {}",
            queue
                .database_password_file
                .as_deref()
                .unwrap_or(std::path::Path::new(""))
                .display()
        )
    })
}

/// The queue's settings from `[queue]`, with the database password read.
pub fn queue_settings(queue: &relay_config::QueueConfig) -> anyhow::Result<QueueSettings> {
    let database = match &queue.database_url {
        None => None,
        Some(url) => Some(relay_queue::Database {
            url: url.clone(),
            password: database_password(queue)?,
        }),
    };
    Ok(QueueSettings {
        dir: queue.dir.clone(),
        database,
        lease_timeout: queue.lease_timeout,
        retry_initial: queue.retry_initial,
        retry_max: queue.retry_max,
        max_age: queue.max_age,
    })
}

fn signal(kind: tokio::signal::unix::SignalKind) -> anyhow::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(kind).context("installing a signal handler")
}

/// Installs the handlers for SIGTERM and Ctrl-C (SIGINT) now, so a signal
/// that comes early is not lost (nor fatal), and returns what waits for one.
pub fn termination() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::SignalKind;
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}

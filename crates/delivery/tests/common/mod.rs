//! A relay's delivery half, wired like the real one: a durable queue in a
//! temporary directory, a token manager against the kit's identity platform,
//! and `relay_delivery::spawn` workers delivering to the kit's submission
//! server over STARTTLS on loopback.

#![allow(dead_code)] // each test binary uses a different subset

use relay_delivery::{Account, Upstream};
use relay_queue::{Entry, NewMessage, Queue, QueueId, QueueSettings, State};
use relay_testkit::{
    IdentityPlatform, ReceivedMessage, RelayConfig, Section, SubmissionOptions, SubmissionServer,
};
use relay_tokens::{TokenManager, TokenSource};
use std::{ops::RangeBounds, path::PathBuf, sync::Arc, time::Duration};
use tempfile::TempDir;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Upper bound for anything a test waits for.
pub const LIMIT: Duration = Duration::from_secs(10);
/// The kit's mailbox, which the relay authenticates as.
pub const MAILBOX: &str = "relay@contoso.com";
pub const CC: &str = "client_credentials";

/// Must run first in every test: installs the crypto provider and, for
/// failing tests, captured logs (`RUST_LOG` overrides the filter).
pub fn init() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "relay_delivery=debug,relay_queue=info,relay_tokens=info",
        )
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .with_ansi(false)
        .try_init();
}

/// How a test's relay and kit are set up.
pub struct Setup {
    pub options: SubmissionOptions,
    pub max_connections: usize,
    /// `queue.retry_initial`, humantime syntax.
    pub retry_initial: &'static str,
    /// `queue.retry_max`, humantime syntax.
    pub retry_max: &'static str,
    /// `upstream.idle_timeout`, humantime syntax.
    pub idle_timeout: &'static str,
    /// Deliver to this relay's kit (another relay's) instead of starting one.
    pub kit: Option<(IdentityPlatform, SubmissionServer)>,
    /// The database shared with other relays.
    pub shared: Option<relay_store::Store>,
}

impl Setup {
    /// Retries after 1 s, then 2 s: a deferred message goes out again
    /// within a test's wait.
    pub fn fast_retry() -> Setup {
        Setup {
            retry_initial: "1s",
            retry_max: "2s",
            ..Setup::default()
        }
    }
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            options: SubmissionOptions::default(),
            max_connections: 3,
            retry_initial: "200ms",
            retry_max: "1s",
            idle_timeout: "30s",
            kit: None,
            shared: None,
        }
    }
}

/// A running relay (queue + delivery workers) and the kit it delivers to.
pub struct Relay {
    pub idp: IdentityPlatform,
    pub server: SubmissionServer,
    pub queue: Queue,
    pub queue_dir: PathBuf,
    /// The account's token manager (shared with the workers).
    pub tokens: TokenManager,
    shutdown: CancellationToken,
    workers: JoinSet<()>,
    _dir: TempDir,
}

impl Relay {
    pub async fn start(setup: Setup) -> Relay {
        init();
        let (idp, server) = match setup.kit {
            Some(kit) => kit,
            None => {
                let idp = IdentityPlatform::start().await.expect("identity platform");
                let server = SubmissionServer::start_with(idp.clone(), setup.options)
                    .await
                    .expect("submission server");
                (idp, server)
            }
        };
        assert_eq!(server.mailbox(), MAILBOX);
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("ca.pem"), server.ca_pem()).expect("write CA");
        std::fs::write(dir.path().join("client-secret"), idp.client_secret())
            .expect("write secret");
        let queue_dir = dir.path().join("queue");
        let toml = RelayConfig::new(&idp, &server, dir.path())
            .extra(
                Section::Upstream,
                &format!(
                    "security = \"starttls\"\nmax_connections = {}\nidle_timeout = \"{}\"\n\
                 # far above Microsoft's 30 a minute, so pacing does not slow the tests\n\
                 messages_per_minute = 6000\n",
                    setup.max_connections, setup.idle_timeout
                ),
            )
            .extra(
                Section::Queue,
                &format!(
                    "retry_initial = \"{}\"\nretry_max = \"{}\"\n",
                    setup.retry_initial, setup.retry_max
                ),
            )
            .to_toml();
        let config = relay_config::load_str(&toml).expect("valid configuration");

        let queue = Queue::open(QueueSettings {
            dir: config.queue.dir.clone(),
            database: None,
            lease_timeout: config.queue.lease_timeout,
            retry_initial: config.queue.retry_initial,
            retry_max: config.queue.retry_max,
            max_age: config.queue.max_age,
        })
        .await
        .expect("queue");
        let upstream = Upstream::new(&config.upstream, "relay.test").expect("upstream");
        // Wired as `smtp-oauth-relay run` wires it (without the refresher, so
        // token requests happen only when a delivery needs one).
        let account = &config.accounts[0];
        let source = TokenSource::for_account(account, &config.queue.dir).expect("token source");
        let tokens = TokenManager::new(&account.name, source).expect("token manager");
        let shutdown = CancellationToken::new();
        let workers = relay_delivery::spawn(
            queue.clone(),
            Arc::new(upstream),
            vec![Account {
                shared: setup.shared,
                ..Account::from_config(account, &config, tokens.clone())
            }],
            relay_delivery::Settings {
                state: Some(relay_config::StateDir::around(&queue_dir)),
                hostname: "relay.test".into(),
            },
            shutdown.clone(),
        );
        Relay {
            idp,
            server,
            queue,
            queue_dir,
            tokens,
            shutdown,
            workers,
            _dir: dir,
        }
    }

    /// Queues a message for the account, as the listener would.
    pub async fn enqueue(&self, sender: &str, recipients: &[&str], body: &[u8]) -> QueueId {
        let message = NewMessage {
            sender: sender.to_owned(),
            recipients: recipients.iter().map(|r| r.to_string()).collect(),
            account: "main".to_owned(),
            client: Some([127, 0, 0, 1].into()),
        };
        tokio::time::timeout(LIMIT, self.queue.enqueue(message, body))
            .await
            .expect("enqueue timed out")
            .expect("enqueue")
    }

    /// What `smtp-oauth-relay queue list` would show.
    pub async fn entries(&self) -> Vec<Entry> {
        tokio::time::timeout(LIMIT, self.queue.list())
            .await
            .expect("queue list timed out")
            .expect("queue list")
    }

    /// The entry of `id`, once `condition` holds for it (bounded).
    pub async fn entry_when(
        &self,
        id: &QueueId,
        what: &str,
        condition: impl Fn(&Entry) -> bool,
    ) -> Entry {
        let id = id.to_string();
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            let last = self.entries().await.into_iter().find(|e| e.id == id);
            match last {
                Some(entry) if condition(&entry) => return entry,
                last if tokio::time::Instant::now() >= deadline => {
                    panic!("queue entry {id} never became {what}: {last:#?}")
                }
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// The entry of `id` once it is deferred after a number of attempts in
    /// `attempts` (bounded).
    pub async fn deferred(&self, id: &QueueId, attempts: impl RangeBounds<u32>) -> Entry {
        self.entry_when(id, "deferred", |e| {
            e.state == State::Deferred && attempts.contains(&e.attempts)
        })
        .await
    }

    /// Waits (bounded) until the server has `n` messages and asserts it has
    /// exactly that many.
    pub async fn delivered(&self, n: usize) -> Vec<ReceivedMessage> {
        let got = self.server.wait_for_messages(n, LIMIT).await;
        assert_eq!(got.len(), n, "queue: {:#?}", self.entries().await);
        got
    }

    /// Waits until every message is delivered and removed from the queue.
    pub async fn wait_until_empty(&self) {
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            let last = self.entries().await;
            if last.is_empty() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "queue not empty: {last:#?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the workers; they must end promptly.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        let joined = tokio::time::timeout(LIMIT, async {
            while let Some(result) = self.workers.join_next().await {
                result.expect("worker panicked");
            }
        })
        .await;
        assert!(joined.is_ok(), "workers did not stop after shutdown");
    }
}

/// Polls `condition` every 10 ms until it holds or `limit` passes; returns
/// whether it held.
pub async fn eventually(limit: Duration, condition: impl FnMut() -> bool) -> bool {
    relay_testkit::poll_until(limit, Duration::from_millis(10), condition).await
}

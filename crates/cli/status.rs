//! What `/readyz`, `/metrics` and systemd's STATUS= say about the running
//! relay.

use arc_swap::ArcSwap;
use relay_admin::{Check, Readiness};
use relay_queue::Queue;
use relay_tokens::TokenManager;
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::{Duration, SystemTime},
};

/// The readiness check of the queue's store.
const QUEUE_CHECK: &str = "queue database";

/// What the admin endpoint reports, from before the queue is open: until
/// then, that it is not and why (one failing check, [`QUEUE_CHECK`]);
/// after, the running relay's checks.
pub struct AdminStatus {
    relay: OnceLock<Arc<RelayStatus>>,
    not_open: Mutex<String>,
}

impl AdminStatus {
    /// The queue in `store` (as [`relay_queue::QueueSettings::store_name`]
    /// names it) is being opened.
    pub fn opening(store: String) -> AdminStatus {
        AdminStatus {
            relay: OnceLock::new(),
            not_open: Mutex::new(format!("{store}: opening")),
        }
    }

    /// The queue could not be opened yet, for `why`.
    pub fn waiting(&self, why: String) {
        *self.not_open.lock().unwrap_or_else(PoisonError::into_inner) = why;
    }

    /// The queue is open and the relay runs.
    pub fn running(&self, relay: Arc<RelayStatus>) {
        let _ = self.relay.set(relay);
    }
}

impl relay_admin::Status for AdminStatus {
    fn readiness(&self) -> Vec<Check> {
        match self.relay.get() {
            Some(relay) => relay.readiness(),
            None => vec![Check {
                name: QUEUE_CHECK.into(),
                readiness: Readiness::NotReady(
                    self.not_open
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone(),
                ),
            }],
        }
    }

    fn refresh(&self) {
        match self.relay.get() {
            Some(relay) => relay.refresh(),
            None => store_up(false),
        }
    }
}

pub struct RelayStatus {
    pub listening: Vec<SocketAddr>,
    pub queue_dir: PathBuf,
    pub queue: Queue,
    /// The token managers of the accounts in force (replaced on reload).
    pub tokens: ArcSwap<Vec<TokenManager>>,
}

impl RelayStatus {
    /// One line for systemd: queue depth and token state.
    pub fn summary(&self) -> String {
        let census = self.queue.health().census;
        let waiting = census.queued.count + census.deferred.count;
        let failed = census.failed.count;
        let tokens: Vec<String> = self
            .tokens
            .load()
            .iter()
            .map(|t| match t.valid_for() {
                Some(left) => format!("{} ok ({}m left)", t.account(), left.as_secs() / 60),
                None => format!("{} NO TOKEN", t.account()),
            })
            .collect();
        format!(
            "queue: {waiting} to deliver, {failed} failed; tokens: {}",
            tokens.join(", ")
        )
    }
}

impl RelayStatus {
    fn readiness(&self) -> Vec<Check> {
        let addrs: Vec<String> = self.listening.iter().map(ToString::to_string).collect();
        let mut checks = vec![
            Check {
                name: "listening".into(),
                readiness: Readiness::Ready(addrs.join(", ")),
            },
            Check {
                name: "queue directory writable".into(),
                readiness: probe_writable(&self.queue_dir),
            },
            Check {
                name: QUEUE_CHECK.into(),
                readiness: match self.queue.health().error {
                    None => Readiness::Ready(self.queue.store_name()),
                    Some(error) => {
                        Readiness::NotReady(format!("{}: {error}", self.queue.store_name()))
                    }
                },
            },
        ];
        for tokens in self.tokens.load().iter() {
            checks.push(Check {
                name: format!("token for account {}", tokens.account()),
                readiness: match tokens.valid_for() {
                    Some(left) => Readiness::Ready(format!("valid for {} s", left.as_secs())),
                    None => Readiness::NotReady("no valid access token (the log says why)".into()),
                },
            });
        }
        checks
    }

    fn refresh(&self) {
        for tokens in self.tokens.load().iter() {
            let left = tokens.valid_for().unwrap_or(Duration::ZERO);
            metrics::gauge!("smtp_relay_token_expiry_seconds", "account" => tokens.account().to_owned())
                .set(left.as_secs_f64());
        }
        let health = self.queue.health();
        store_up(health.error.is_none());
        let census = health.census;
        let now = SystemTime::now();
        for (tally, name) in [
            (census.queued, "queued"),
            (census.deferred, "deferred"),
            (census.failed, "failed"),
        ] {
            let oldest = tally
                .oldest
                .and_then(|t| now.duration_since(t).ok())
                .unwrap_or_default();
            metrics::gauge!("smtp_relay_queue_depth", "state" => name).set(tally.count as f64);
            metrics::gauge!("smtp_relay_queue_oldest_age_seconds", "state" => name)
                .set(oldest.as_secs_f64());
        }
    }
}

/// Whether the queue's store answered its last look (once a second): an
/// alert on 0 catches a database that is down, or not yet reached.
fn store_up(up: bool) {
    metrics::gauge!("smtp_relay_queue_store_up").set(if up { 1.0 } else { 0.0 });
}

/// Creates and removes a file where the queue writes its temporary files.
fn probe_writable(queue_dir: &std::path::Path) -> Readiness {
    match relay_queue::check_writable(queue_dir) {
        Ok(()) => Readiness::Ready(queue_dir.display().to_string()),
        Err(e) => Readiness::NotReady(e.to_string()),
    }
}

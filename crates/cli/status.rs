//! What `/readyz`, `/metrics` and systemd's STATUS= say about the running
//! relay.

use relay_admin::Check;
use relay_listener::Live;
use relay_queue::State;
use relay_tokens::TokenManager;
use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, SystemTime},
};

pub struct RelayStatus {
    pub listening: Vec<SocketAddr>,
    pub queue_dir: PathBuf,
    /// The token managers of the accounts in force (replaced on reload).
    pub tokens: Live<Vec<TokenManager>>,
}

impl RelayStatus {
    /// One line for systemd: queue depth and token state.
    pub fn summary(&self) -> String {
        let (waiting, failed) = match relay_queue::list(&self.queue_dir) {
            Ok(entries) => {
                let failed = entries.iter().filter(|e| e.state == State::Failed).count();
                (entries.len() - failed, failed)
            }
            Err(_) => (0, 0),
        };
        let tokens: Vec<String> = self
            .tokens
            .get()
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

impl relay_admin::Status for RelayStatus {
    fn readiness(&self) -> Vec<Check> {
        let addrs: Vec<String> = self.listening.iter().map(ToString::to_string).collect();
        let mut checks = vec![
            Check {
                name: "listening".into(),
                result: Ok(addrs.join(", ")),
            },
            Check {
                name: "queue directory writable".into(),
                result: probe_writable(&self.queue_dir),
            },
        ];
        for tokens in self.tokens.get().iter() {
            checks.push(Check {
                name: format!("token for account {}", tokens.account()),
                result: match tokens.valid_for() {
                    Some(left) => Ok(format!("valid for {} s", left.as_secs())),
                    None => Err("no valid access token (the log says why)".into()),
                },
            });
        }
        checks
    }

    fn refresh(&self) {
        for tokens in self.tokens.get().iter() {
            let left = tokens.valid_for().unwrap_or(Duration::ZERO);
            metrics::gauge!("smtp_relay_token_expiry_seconds", "account" => tokens.account().to_owned())
                .set(left.as_secs_f64());
        }
        let Ok(entries) = relay_queue::list(&self.queue_dir) else {
            return;
        };
        let now = SystemTime::now();
        for (state, name) in [
            (State::Queued, "queued"),
            (State::Deferred, "deferred"),
            (State::Failed, "failed"),
        ] {
            let of_state: Vec<_> = entries.iter().filter(|e| e.state == state).collect();
            let oldest = of_state
                .iter()
                .filter_map(|e| humantime::parse_rfc3339(&e.received_at).ok())
                .min()
                .and_then(|t| now.duration_since(t).ok())
                .unwrap_or_default();
            metrics::gauge!("smtp_relay_queue_depth", "state" => name).set(of_state.len() as f64);
            metrics::gauge!("smtp_relay_queue_oldest_age_seconds", "state" => name)
                .set(oldest.as_secs_f64());
        }
    }
}

/// Creates and removes a file where the queue writes its temporary files.
fn probe_writable(queue_dir: &std::path::Path) -> Result<String, String> {
    let probe = queue_dir.join("tmp").join(".readyz-probe");
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map(|()| queue_dir.display().to_string())
        .map_err(|e| format!("{}: {e}", queue_dir.display()))
}

use crate::{http, source::Issued, TokenError, TokenSource};
use rand::Rng;
use relay_config::Secret;
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{sync::Notify, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

/// Renew when `refresh_before` (default ten minutes) of a token's lifetime
/// remains, or a third of its lifetime for short-lived tokens.
const REFRESH_FRACTION: u32 = 3;
/// Stop handing out a token this close to expiry (at most; a tenth of its
/// lifetime for short-lived ones): it might expire on the way.
const EXPIRY_MARGIN: Duration = Duration::from_secs(60);
const BACKOFF_FIRST: Duration = Duration::from_secs(2);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// How often an account that needs a new sign-in looks for a new token cache.
const CACHE_POLL: Duration = Duration::from_secs(1);
/// Fix (found by the tokens integration tests): the soonest the refresher
/// renews again after a successful renewal. Without it, a token issued with
/// `expires_in: 0` (already due for renewal) made the refresher request
/// tokens in a tight loop, about a thousand a second.
const MIN_RENEWAL_INTERVAL: Duration = Duration::from_secs(1);

/// An access token and when it stops being usable.
#[derive(Debug, Clone)]
pub struct AccessToken {
    secret: Secret,
    issued_at: Instant,
    lifetime: Duration,
    refresh_before: Duration,
    generation: u64,
}

impl AccessToken {
    /// The bearer token, for the one place it goes on the wire.
    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    /// Time left before it expires.
    pub fn expires_in(&self) -> Duration {
        (self.issued_at + self.lifetime).saturating_duration_since(Instant::now())
    }

    fn usable(&self) -> bool {
        let margin = EXPIRY_MARGIN.min(self.lifetime / 10);
        Instant::now() + margin < self.issued_at + self.lifetime
    }

    fn refresh_at(&self) -> Instant {
        let ahead = self.refresh_before.min(self.lifetime / REFRESH_FRACTION);
        self.issued_at + self.lifetime - ahead
    }
}

/// Tokens for one account; cheap to clone.
#[derive(Clone)]
pub struct TokenManager {
    inner: Arc<Inner>,
}

struct Inner {
    account: String,
    source: TokenSource,
    client: reqwest::Client,
    current: Mutex<Option<AccessToken>>,
    /// Held while a request is in flight, so concurrent callers share it.
    in_flight: tokio::sync::Mutex<u64>,
    /// Wakes the refresher when a token was replaced outside its schedule.
    replaced: Notify,
}

impl TokenManager {
    /// A manager for `account` that obtains tokens from `source`.
    pub fn new(account: &str, source: TokenSource) -> Result<Self, TokenError> {
        let client = http::client().map_err(|e| TokenError::Transport {
            url: source.token_url().to_owned(),
            reason: format!("cannot build HTTP client: {e}"),
        })?;
        Ok(TokenManager {
            inner: Arc::new(Inner {
                account: account.to_owned(),
                source,
                client,
                current: Mutex::new(None),
                in_flight: tokio::sync::Mutex::new(0),
                replaced: Notify::new(),
            }),
        })
    }

    /// How long the current token stays usable, without asking for one:
    /// `None` when there is no token or it has expired.
    pub fn valid_for(&self) -> Option<Duration> {
        self.current()
            .filter(AccessToken::usable)
            .map(|t| t.expires_in())
    }

    /// Whether both are the same manager (clones of one another).
    pub fn same_as(&self, other: &TokenManager) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The account this manager serves.
    pub fn account(&self) -> &str {
        &self.inner.account
    }

    /// A token that is valid now, fetching one if there is none.
    pub async fn token(&self) -> Result<AccessToken, TokenError> {
        if let Some(token) = self.current().filter(AccessToken::usable) {
            return Ok(token);
        }
        let mut generation = self.inner.in_flight.lock().await;
        if let Some(token) = self.current().filter(AccessToken::usable) {
            return Ok(token);
        }
        self.fetch(&mut generation).await
    }

    /// The upstream refused `rejected`: fetch a new token, unless another
    /// caller already replaced it.
    pub async fn refresh_rejected(
        &self,
        rejected: &AccessToken,
    ) -> Result<AccessToken, TokenError> {
        let mut generation = self.inner.in_flight.lock().await;
        if let Some(token) = self
            .current()
            .filter(|t| t.generation != rejected.generation && t.usable())
        {
            return Ok(token);
        }
        self.fetch(&mut generation).await
    }

    /// Renews the token ahead of expiry until `shutdown`, with or without traffic.
    pub fn spawn_refresher(&self, shutdown: CancellationToken) -> JoinHandle<()> {
        let manager = self.clone();
        tokio::spawn(async move { manager.refresh_loop(shutdown).await })
    }

    async fn refresh_loop(&self, shutdown: CancellationToken) {
        let mut failures: u32 = 0;
        // Whether the "sign in again" error was logged for the current outage.
        let mut told = false;
        let mut not_before = Instant::now();
        loop {
            let due = self
                .current()
                .map(|t| t.refresh_at())
                .unwrap_or_else(Instant::now)
                .max(not_before);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.inner.replaced.notified() => continue,
                _ = tokio::time::sleep_until(due) => {}
            }
            let result = {
                let mut generation = self.inner.in_flight.lock().await;
                match self.current() {
                    // renewed by a caller while we waited for the lock
                    Some(token) if token.refresh_at() > Instant::now() => continue,
                    _ => self.fetch(&mut generation).await,
                }
            };
            let pause = match result {
                Ok(_) => {
                    failures = 0;
                    not_before = Instant::now() + MIN_RENEWAL_INTERVAL;
                    told = false;
                    continue;
                }
                // Retrying cannot help: wait (quietly) for a new token cache.
                Err(e) if e.needs_authorization() => {
                    if !told {
                        tracing::error!(
                            account = %self.inner.account,
                            error = %e,
                            "no usable refresh token; mail for this account waits in the queue"
                        );
                        told = true;
                    }
                    CACHE_POLL
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let pause = backoff(failures);
                    let still_valid = self.current().filter(AccessToken::usable);
                    tracing::warn!(
                        account = %self.inner.account,
                        error = %e,
                        retry_in = ?pause,
                        current_token_valid_for = ?still_valid.map(|t| t.expires_in()),
                        "token renewal failed"
                    );
                    pause
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    fn current(&self) -> Option<AccessToken> {
        self.inner
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Requests a token; the caller holds the in-flight lock (`generation`).
    async fn fetch(&self, generation: &mut u64) -> Result<AccessToken, TokenError> {
        let started = Instant::now();
        // Only the first token of the process may come from a token cache:
        // later ones replace a token that is due or was refused.
        let allow_cached = *generation == 0;
        let issued = self
            .inner
            .source
            .fetch(&self.inner.client, allow_cached)
            .await;
        let result = if issued.is_ok() { "ok" } else { "error" };
        metrics::counter!("smtp_relay_token_requests_total", "account" => self.inner.account.clone(), "result" => result)
            .increment(1);
        let Issued {
            access_token,
            lifetime,
        } = issued?;
        *generation += 1;
        let token = AccessToken {
            secret: access_token,
            issued_at: started,
            lifetime,
            refresh_before: self.inner.source.refresh_before(),
            generation: *generation,
        };
        *self
            .inner
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(token.clone());
        self.inner.replaced.notify_one();
        tracing::info!(
            account = %self.inner.account,
            expires_in = ?lifetime,
            took = ?started.elapsed(),
            "obtained access token"
        );
        Ok(token)
    }
}

/// The HTTP client for identity-platform requests of `source`.
pub(crate) fn http_client(source: &TokenSource) -> Result<reqwest::Client, TokenError> {
    http::client().map_err(|e| TokenError::Transport {
        url: source.token_url().to_owned(),
        reason: format!("cannot build HTTP client: {e}"),
    })
}

/// 2 s, 4 s, 8 s … up to 5 minutes, each ±20 % so accounts do not move in step.
fn backoff(failures: u32) -> Duration {
    let base = BACKOFF_FIRST
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(BACKOFF_MAX);
    base.mul_f64(rand::rng().random_range(0.8..1.2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        assert!(backoff(1) < Duration::from_secs(3));
        assert!(backoff(3) > Duration::from_secs(6));
        assert!(backoff(40) <= BACKOFF_MAX.mul_f64(1.2));
    }

    #[test]
    fn refresh_schedule() {
        let t = AccessToken {
            secret: Secret::new("x"),
            issued_at: Instant::now(),
            lifetime: Duration::from_secs(3600),
            refresh_before: Duration::from_secs(600),
            generation: 1,
        };
        assert_eq!(t.refresh_at() - t.issued_at, Duration::from_secs(3000));
        let short = AccessToken {
            lifetime: Duration::from_secs(6),
            ..t
        };
        assert_eq!(short.refresh_at() - short.issued_at, Duration::from_secs(4));
        assert!(short.usable());
    }
}

use crate::{http, shared::SharedRefresh, source::Issued, TokenError, TokenSource};
use rand::Rng;
use relay_config::{Flow, Secret};
use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};
use tokio::{sync::Notify, task::JoinHandle, time::Instant};
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};

/// Renew when `refresh_before` (default ten minutes) of a token's lifetime
/// remains, or a third of its lifetime for short-lived tokens.
const REFRESH_FRACTION: u32 = 3;
/// Stop handing out a token this close to expiry (at most; a tenth of its
/// lifetime for short-lived ones): it might expire on the way.
const EXPIRY_MARGIN: Duration = Duration::from_secs(60);
/// After a failed request: 1 s, 2 s, 4 s … up to 5 minutes.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// How often an account that needs a new sign-in looks for a new token cache.
const CACHE_POLL: Duration = Duration::from_secs(1);
/// A renewal task that panics is restarted after this pause…
const RESTART_PAUSE: Duration = Duration::from_secs(1);
/// …at most this many times in a row; then the panic is passed on.
const MAX_RESTARTS: u32 = 3;
/// A renewal task that ran this long before panicking starts a new count.
const RESTART_WINDOW: Duration = Duration::from_secs(600);

/// An access token and when it stops being usable.
#[derive(Debug, Clone)]
pub struct AccessToken {
    secret: Secret,
    issued_at: Instant,
    /// At most a day (see `Lifetime`), so no instant below overflows.
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
        self.expires_at().saturating_duration_since(Instant::now())
    }

    fn expires_at(&self) -> Instant {
        self.issued_at + self.lifetime
    }

    fn usable_at(&self, now: Instant) -> bool {
        let margin = EXPIRY_MARGIN.min(self.lifetime / 10);
        now + margin < self.expires_at()
    }

    fn refresh_at(&self) -> Instant {
        let ahead = self.refresh_before.min(self.lifetime / REFRESH_FRACTION);
        self.expires_at() - ahead
    }
}

/// The failures since the last token, and when the next request may go out.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
    until: Option<Instant>,
    /// Why the last request failed (already bounded in length).
    last: String,
}

impl Backoff {
    /// Records a failure at `now`; `jitter` in [0, 1) spreads accounts.
    /// Returns the pause before the next request.
    fn failed(&mut self, now: Instant, jitter: f64, why: String) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let pause = retry_delay(self.failures, jitter);
        self.until = Some(now + pause);
        self.last = why;
        pause
    }

    /// How long until the next request may go out; `None` when it may now.
    fn wait(&self, now: Instant) -> Option<Duration> {
        self.until
            .map(|until| until.saturating_duration_since(now))
            .filter(|d| !d.is_zero())
    }

    fn unavailable(&self, now: Instant) -> Result<(), TokenError> {
        match self.wait(now) {
            None => Ok(()),
            Some(retry_in) => Err(TokenError::Unavailable {
                retry_in,
                last: self.last.clone(),
            }),
        }
    }
}

/// The pause after the `failures`th failure in a row: 1 s doubling up to 5
/// minutes, less up to a quarter (`jitter` in [0, 1)) so accounts and relays
/// do not move in step, and never above the cap.
fn retry_delay(failures: u32, jitter: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    let base = BACKOFF_FIRST
        .saturating_mul(1 << doublings)
        .min(BACKOFF_MAX);
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    base.mul_f64(1.0 - jitter / 4.0)
}

/// When the renewal task should next act: when the token is due for
/// renewal (now if there is none), but not before the back-off ends.
fn renewal_due(current: Option<&AccessToken>, backoff: &Backoff, now: Instant) -> Instant {
    let due = current.map_or(now, AccessToken::refresh_at);
    backoff.until.map_or(due, |until| due.max(until))
}

/// Tokens for one account; cheap to clone.
///
/// Requests are single-flight: one at a time, and callers that arrive
/// while one is in flight wait for it and use its token. After a failed
/// request the next goes out only when the back-off ends; callers in
/// between get [`TokenError::Unavailable`] at once. Cancel safety: a caller
/// dropped while its request is in flight abandons that request (the next
/// caller makes a new one); the token state is only changed once a reply
/// arrived, under a lock never held across an await.
#[derive(Clone)]
pub struct TokenManager {
    inner: Arc<Inner>,
}

struct Inner {
    account: String,
    source: TokenSource,
    /// A delegated account's refresh token, when shared with other relays.
    shared: Option<SharedRefresh>,
    client: reqwest::Client,
    state: Mutex<State>,
    /// Held while a request is in flight, so concurrent callers share it;
    /// holds the generation of the last token obtained.
    in_flight: tokio::sync::Mutex<u64>,
    /// Wakes the refresher when a token was replaced outside its schedule.
    replaced: Notify,
    /// Whether the operator was told that the platform's token lifetimes
    /// are out of bounds (once per manager: it says so on every token).
    lifetime_warned: AtomicBool,
}

#[derive(Default)]
struct State {
    current: Option<AccessToken>,
    backoff: Backoff,
}

impl TokenManager {
    /// A manager for `account` that obtains tokens from `source`.
    pub fn new(account: &str, source: TokenSource) -> Result<Self, TokenError> {
        Self::shared(account, source, None)
    }

    /// [`TokenManager::new`], sharing a delegated (`refresh_token`)
    /// account's refresh token with the other relays on `store`'s database
    /// (other flows have nothing to share). `None`: this relay alone, with
    /// the token cache file.
    pub fn shared(
        account: &str,
        source: TokenSource,
        store: Option<relay_store::Store>,
    ) -> Result<Self, TokenError> {
        let client = http_client(&source)?;
        let shared = store
            .filter(|_| source.flow() == Flow::RefreshToken)
            .map(SharedRefresh::new);
        Ok(TokenManager {
            inner: Arc::new(Inner {
                account: account.to_owned(),
                source,
                shared,
                client,
                state: Mutex::new(State::default()),
                in_flight: tokio::sync::Mutex::new(0),
                replaced: Notify::new(),
                lifetime_warned: AtomicBool::new(false),
            }),
        })
    }

    /// How long the current token stays usable, without asking for one:
    /// `None` when there is no token or it has expired.
    pub fn valid_for(&self) -> Option<Duration> {
        self.usable().map(|t| t.expires_in())
    }

    /// Whether both are the same manager (clones of one another).
    pub fn same_as(&self, other: &TokenManager) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The account this manager serves.
    pub fn account(&self) -> &str {
        &self.inner.account
    }

    /// A token that is valid now, fetching one if there is none, or
    /// [`TokenError::Unavailable`] at once while backing off after a
    /// failed request.
    pub async fn token(&self) -> Result<AccessToken, TokenError> {
        if let Some(token) = self.usable() {
            return Ok(token);
        }
        self.state().backoff.unavailable(Instant::now())?;
        let mut generation = self.inner.in_flight.lock().await;
        if let Some(token) = self.usable() {
            return Ok(token);
        }
        // The request we waited for may have failed.
        self.state().backoff.unavailable(Instant::now())?;
        self.fetch(&mut generation).await
    }

    /// The upstream refused `rejected`: fetch a new token, unless another
    /// caller already replaced it (or the back-off forbids a request now).
    pub async fn refresh_rejected(
        &self,
        rejected: &AccessToken,
    ) -> Result<AccessToken, TokenError> {
        let mut generation = self.inner.in_flight.lock().await;
        if let Some(token) = self
            .usable()
            .filter(|t| t.generation != rejected.generation)
        {
            return Ok(token);
        }
        self.state().backoff.unavailable(Instant::now())?;
        self.fetch(&mut generation).await
    }

    /// Renews the token ahead of expiry until `shutdown`, with or without
    /// traffic.
    ///
    /// The handle ends with `Ok(())` after `shutdown`. Should the renewal
    /// task panic, it is restarted (and the panic logged); only when it
    /// keeps panicking (three restarts in a row) does the handle end early,
    /// with the panic (`JoinError::is_panic`): the caller should then exit
    /// non-zero rather than run on without renewals. Aborting the handle
    /// stops the task.
    pub fn spawn_refresher(&self, shutdown: CancellationToken) -> JoinHandle<()> {
        let manager = self.clone();
        let account = self.inner.account.clone();
        tokio::spawn(supervise(account, shutdown, move |stop| {
            let manager = manager.clone();
            async move { manager.refresh_loop(stop).await }
        }))
    }

    async fn refresh_loop(&self, shutdown: CancellationToken) {
        // Whether the "sign in again" error was logged for the current outage.
        let mut told = false;
        loop {
            let due = {
                let state = self.state();
                renewal_due(state.current.as_ref(), &state.backoff, Instant::now())
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.inner.replaced.notified() => continue,
                _ = tokio::time::sleep_until(due) => {}
            }
            let result = {
                let mut generation = self.inner.in_flight.lock().await;
                // Renewed by a caller, or a caller's request failed, while
                // we waited for the lock: schedule again.
                if self.renewal_settled() {
                    continue;
                }
                self.fetch(&mut generation).await
            };
            match result {
                Ok(_) => told = false,
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
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(CACHE_POLL) => {}
                    }
                }
                // Logged by `fetch`; the back-off decides when to try again.
                Err(_) => {}
            }
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether the token is not due for renewal, or a request must not go
    /// out yet.
    fn renewal_settled(&self) -> bool {
        let now = Instant::now();
        let state = self.state();
        state.current.as_ref().is_some_and(|t| t.refresh_at() > now)
            || state.backoff.wait(now).is_some()
    }

    fn usable(&self) -> Option<AccessToken> {
        let now = Instant::now();
        self.state().current.clone().filter(|t| t.usable_at(now))
    }

    /// Requests a token; the caller holds the in-flight lock (`generation`).
    /// A failure starts or extends the back-off, except one that needs a new
    /// sign-in: the source makes no request for those until the token cache
    /// changes.
    async fn fetch(&self, generation: &mut u64) -> Result<AccessToken, TokenError> {
        let started = Instant::now();
        // Only the first token of the process may come from a token cache:
        // later ones replace a token that is due or was refused.
        let allow_cached = *generation == 0;
        let (source, client) = (&self.inner.source, &self.inner.client);
        let issued = match &self.inner.shared {
            Some(shared) => shared.fetch(source, client, allow_cached).await,
            None => source.fetch(client, allow_cached).await,
        };
        let result = if issued.is_ok() { "ok" } else { "error" };
        metrics::counter!("smtp_relay_token_requests_total", "account" => self.inner.account.clone(), "result" => result)
            .increment(1);
        let Issued {
            access_token,
            lifetime,
        } = match issued {
            Ok(issued) => issued,
            Err(e) => {
                if !e.needs_authorization() {
                    let mut state = self.state();
                    let now = Instant::now();
                    let retry_in = state
                        .backoff
                        .failed(now, rand::rng().random(), e.to_string());
                    let still_valid = state
                        .current
                        .as_ref()
                        .filter(|t| t.usable_at(now))
                        .map(AccessToken::expires_in);
                    drop(state);
                    tracing::warn!(
                        account = %self.inner.account,
                        error = %e,
                        ?retry_in,
                        current_token_valid_for = ?still_valid,
                        "token request failed"
                    );
                }
                return Err(e);
            }
        };
        if let Some(stated) = lifetime.replaced() {
            if !self.inner.lifetime_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    account = %self.inner.account,
                    expires_in = stated,
                    planned = ?lifetime.get(),
                    "the identity platform stated a token lifetime out of bounds or unreadable; planning with a bounded one (told once)"
                );
            }
        }
        *generation += 1;
        let token = AccessToken {
            secret: access_token,
            issued_at: started,
            lifetime: lifetime.get(),
            refresh_before: self.inner.source.refresh_before(),
            generation: *generation,
        };
        {
            let mut state = self.state();
            state.current = Some(token.clone());
            if lifetime.below_floor() {
                // Used, but renewed on the back-off schedule: `expires_in: 0`
                // must not mean a request every few seconds for ever.
                let why = format!(
                    "the identity platform stated a token lifetime of {}",
                    lifetime.replaced().unwrap_or("0")
                );
                state
                    .backoff
                    .failed(Instant::now(), rand::rng().random(), why);
            } else {
                state.backoff = Backoff::default();
            }
        }
        self.inner.replaced.notify_one();
        tracing::info!(
            account = %self.inner.account,
            expires_in = ?lifetime.get(),
            took = ?started.elapsed(),
            "obtained access token"
        );
        Ok(token)
    }
}

/// Runs the task `start` makes until it ends, restarting it after a panic;
/// after [`MAX_RESTARTS`] panics in a row the last one is passed on to
/// whoever awaits this. Dropping this future (aborting its task) aborts
/// the task it runs.
async fn supervise<F, Fut>(account: String, shutdown: CancellationToken, start: F)
where
    F: Fn(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut panics: u32 = 0;
    loop {
        let started = Instant::now();
        let run = AbortOnDropHandle::new(tokio::spawn(start(shutdown.clone())));
        let payload = match run.await {
            Ok(()) => return,
            Err(e) if e.is_panic() => e.into_panic(),
            // Cancelled: the runtime is shutting down.
            Err(_) => return,
        };
        if started.elapsed() >= RESTART_WINDOW {
            panics = 0;
        }
        panics += 1;
        let what = panic_text(payload.as_ref());
        if panics > MAX_RESTARTS {
            tracing::error!(%account, panic = %what, "token renewal task keeps panicking; giving up");
            std::panic::resume_unwind(payload);
        }
        tracing::error!(%account, panic = %what, "token renewal task panicked; restarting it");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RESTART_PAUSE) => {}
        }
    }
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into());
    relay_http::clip(&text, relay_http::TEXT_LIMIT)
}

/// The HTTP client for identity-platform requests of `source`.
pub(crate) fn http_client(source: &TokenSource) -> Result<reqwest::Client, TokenError> {
    http::client().map_err(|e| TokenError::Transport {
        url: source.token_url().to_owned(),
        reason: format!("cannot build HTTP client: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn token(issued_at: Instant, lifetime: Duration) -> AccessToken {
        AccessToken {
            secret: Secret::new("x"),
            issued_at,
            lifetime,
            refresh_before: Duration::from_secs(600),
            generation: 1,
        }
    }

    #[test]
    fn retry_delay_doubles_from_one_second_to_five_minutes() {
        let secs = |failures| retry_delay(failures, 0.0).as_secs();
        let schedule: Vec<u64> = (1..=11).map(secs).collect();
        assert_eq!(schedule, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(secs(u32::MAX), 300);
        // jitter takes off up to a quarter, never adds
        assert_eq!(retry_delay(1, 1.0), Duration::from_millis(750));
        assert!(retry_delay(1, 0.5) < Duration::from_secs(1));
        assert_eq!(retry_delay(30, 1.0), Duration::from_secs(225));
        assert_eq!(retry_delay(30, f64::NAN), Duration::from_secs(300));
        assert_eq!(retry_delay(0, 0.0), Duration::from_secs(1));
    }

    #[test]
    fn backoff_blocks_until_its_end_and_says_when() {
        let now = Instant::now();
        let mut backoff = Backoff::default();
        assert!(backoff.unavailable(now).is_ok());
        assert_eq!(
            backoff.failed(now, 0.0, "HTTP 500".into()),
            Duration::from_secs(1)
        );
        let err = backoff
            .unavailable(now + Duration::from_millis(200))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "token unavailable, next attempt in 1s (last attempt: HTTP 500)"
        );
        assert!(backoff.unavailable(now + Duration::from_secs(1)).is_ok());
        assert_eq!(
            backoff.failed(now, 0.0, "again".into()),
            Duration::from_secs(2)
        );
        assert_eq!(
            backoff.wait(now + Duration::from_millis(500)),
            Some(Duration::from_millis(1500))
        );
    }

    #[test]
    fn renewal_waits_for_schedule_and_backoff() {
        let now = Instant::now();
        let mut backoff = Backoff::default();
        assert_eq!(renewal_due(None, &backoff, now), now);
        let hour = token(now, Duration::from_secs(3600));
        assert_eq!(
            renewal_due(Some(&hour), &backoff, now),
            now + Duration::from_secs(3000)
        );
        backoff.failed(now, 0.0, "down".into());
        assert_eq!(
            renewal_due(None, &backoff, now),
            now + Duration::from_secs(1)
        );
        let due_soon = token(now - Duration::from_secs(3500), Duration::from_secs(3600));
        assert_eq!(
            renewal_due(Some(&due_soon), &backoff, now),
            now + Duration::from_secs(1)
        );
    }

    #[test]
    fn schedule_of_bounded_lifetimes() {
        let now = Instant::now();
        let hour = token(now, Duration::from_secs(3600));
        assert_eq!(hour.refresh_at() - now, Duration::from_secs(3000));
        assert!(hour.usable_at(now + Duration::from_secs(3539)));
        assert!(!hour.usable_at(now + Duration::from_secs(3540)));
        // the floor: renewed after two thirds of it
        let floor = token(now, crate::lifetime::MIN_LIFETIME);
        assert_eq!(floor.refresh_at().duration_since(now).as_millis(), 3333);
        assert!(floor.usable_at(now + Duration::from_millis(4400)));
        // the ceiling: every instant is representable
        let day = token(now, crate::lifetime::MAX_LIFETIME);
        assert_eq!(day.refresh_at() - now, Duration::from_secs(86400 - 600));
        assert!(day.expires_in() > Duration::from_secs(86000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_restarted_then_the_panic_passed_on() {
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let handle = tokio::spawn(supervise(
            "main".into(),
            CancellationToken::new(),
            move |_| {
                let runs = counted.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    panic!("boom");
                }
            },
        ));
        let err = tokio::time::timeout(Duration::from_secs(60), handle)
            .await
            .expect("bounded")
            .expect_err("the panic is passed on");
        assert!(err.is_panic());
        assert_eq!(runs.load(Ordering::SeqCst), MAX_RESTARTS + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_restarted_task_runs_until_shutdown() {
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(supervise("main".into(), shutdown.clone(), move |stop| {
            let runs = counted.clone();
            async move {
                if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("once");
                }
                stop.cancelled().await;
            }
        }));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2, "restarted once");
        assert!(!handle.is_finished());
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), handle)
            .await
            .expect("bounded")
            .expect("ends cleanly after shutdown");
    }
}

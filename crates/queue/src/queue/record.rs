//! Recording an attempt: each recipient's outcome applied to the
//! message, the retry schedule, and outcomes written again later when the
//! store could not take them at once.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use relay_outcome::{Enhanced, Outcome, Reason, Reply, Verdict};
use relay_store::{MessageState, Progress, RecipientState};
use tokio::task::JoinHandle;

use crate::view::{add_time, outcome_of, reply_of, stored_recipient};
use crate::{QueueError, QueueId};

use super::lease::Lease;
use super::{lock, Inner, Queue, QueueSettings};

/// The first wait before an outcome that could not be written is written
/// again; it doubles up to [`UNRECORDED_RETRY_MAX`].
const UNRECORDED_RETRY: Duration = Duration::from_secs(1);

const UNRECORDED_RETRY_MAX: Duration = Duration::from_secs(60);

/// The result of trying one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecipientResult {
    /// The recipient address, exactly as in [`Lease::recipients`].
    pub recipient: String,
    /// What happened.
    pub outcome: Outcome,
}

/// What [`Queue::record`] did with the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Every recipient is delivered; the message is deleted.
    Removed,
    /// Some recipients remain; the message is retried at `next_attempt`.
    Deferred {
        /// When the next attempt is due.
        next_attempt: SystemTime,
    },
    /// Nothing left to try and at least one recipient failed; the message
    /// stays as failed (visible in `queue list`) and is not retried.
    Failed,
}

/// What [`Queue::record`] committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    /// What became of the message.
    pub disposition: Disposition,
    /// The attempt's outcome per recipient as recorded: the results given,
    /// and for each recipient the queue gave up on because the message
    /// reached `max_age`, an outcome with [`Reason::Expired`].
    pub results: Vec<RecipientResult>,
    /// When the message failed: every failed recipient (of this attempt
    /// and of earlier ones) with its last outcome, for a failure notice.
    pub failed: Vec<RecipientResult>,
}

/// What to do with a message after applying an attempt's results.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Plan {
    /// All delivered: delete it.
    Remove,
    /// Nothing left to try, some failed: keep as failed.
    Fail,
    /// Retry after `delay`.
    Defer { delay: Duration },
}

/// The retry delay after `attempts` attempts, before jitter:
/// `retry_initial × 2^(attempts−1)`, capped at `retry_max`.
fn backoff(settings: &QueueSettings, attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(31);
    settings
        .retry_initial
        .saturating_mul(1u32 << doublings)
        .min(settings.retry_max)
}

/// Fails the recipients still open, adding `note` to their reply.
fn fail_open(progress: &mut Progress, note: &str) -> Plan {
    for r in progress.recipients.iter_mut().filter(|r| r.state.is_open()) {
        let reply = match reply_of(r) {
            Some(reply) => reply.with_text(format!("{} ({note})", reply.text)),
            None => Reply {
                code: 554,
                enhanced: Some(Enhanced::new(5, 0, 0)),
                text: format!("not attempted ({note})"),
            },
        };
        let reason = outcome_of(r).map(|o| o.reason);
        *r = stored_recipient(
            std::mem::take(&mut r.address),
            RecipientState::Failed,
            Some(&reply),
            reason,
        );
    }
    progress.state = MessageState::Failed;
    progress.next_attempt = None;
    Plan::Fail
}

/// Scales `d` by `factor` without any chance of panicking.
fn scale(d: Duration, factor: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(d)
}

/// The failed recipients with their last outcomes.
fn failed_of(progress: &Progress) -> Vec<RecipientResult> {
    progress
        .recipients
        .iter()
        .filter(|r| r.state == RecipientState::Failed)
        .filter_map(|r| {
            Some(RecipientResult {
                recipient: r.address.clone(),
                outcome: outcome_of(r)?,
            })
        })
        .collect()
}

/// Applies one attempt's results to a message's progress (pure; `now` and
/// `jitter` are parameters so it can be tested exactly). Returns the plan
/// and the attempt's outcomes as recorded, expiries included.
fn apply_attempt(
    id: &QueueId,
    progress: &mut Progress,
    received_at: SystemTime,
    results: Vec<RecipientResult>,
    now: SystemTime,
    settings: &QueueSettings,
    jitter: f64,
) -> (Plan, Vec<RecipientResult>) {
    let mut last_error: Option<String> = None;
    let mut recorded = Vec::with_capacity(results.len());
    for result in results {
        let Some(r) = progress
            .recipients
            .iter_mut()
            .find(|r| r.address == result.recipient && r.state.is_open())
        else {
            tracing::warn!(queue_id = %id, recipient = %result.recipient, "ignoring result for a recipient that was not being tried");
            continue;
        };
        let state = match result.outcome.verdict() {
            Verdict::Delivered => RecipientState::Delivered,
            Verdict::Temporary => RecipientState::Deferred,
            Verdict::Permanent => RecipientState::Failed,
        };
        if state != RecipientState::Delivered {
            last_error = Some(result.outcome.reply.text.clone());
        }
        *r = stored_recipient(
            std::mem::take(&mut r.address),
            state,
            Some(&result.outcome.reply),
            Some(result.outcome.reason),
        );
        recorded.push(result);
    }
    progress.attempts = progress.attempts.saturating_add(1);
    if last_error.is_some() {
        progress.last_error = last_error;
    }

    if progress.recipients.iter().any(|r| r.state.is_open()) {
        let age = now.duration_since(received_at).unwrap_or_default();
        if age <= settings.max_age {
            let delay = scale(backoff(settings, progress.attempts), jitter);
            progress.state = MessageState::Deferred;
            progress.next_attempt = Some(add_time(now, delay));
            return (Plan::Defer { delay }, recorded);
        }
        let limit = humantime::format_duration(settings.max_age);
        for r in progress.recipients.iter_mut().filter(|r| r.state.is_open()) {
            let reply = match reply_of(r) {
                Some(reply) => reply.with_text(format!("gave up after {limit}: {}", reply.text)),
                None => Reply {
                    code: 554,
                    enhanced: Some(Enhanced::new(5, 4, 7)),
                    text: format!("gave up after {limit}: never attempted"),
                },
            };
            *r = stored_recipient(
                std::mem::take(&mut r.address),
                RecipientState::Failed,
                Some(&reply),
                Some(Reason::Expired),
            );
            progress.last_error = Some(reply.text.clone());
            let outcome = Outcome::new(Reason::Expired, reply);
            match recorded.iter_mut().find(|done| done.recipient == r.address) {
                Some(done) => done.outcome = outcome,
                None => recorded.push(RecipientResult {
                    recipient: r.address.clone(),
                    outcome,
                }),
            }
        }
    }

    if progress
        .recipients
        .iter()
        .all(|r| r.state == RecipientState::Delivered)
    {
        (Plan::Remove, recorded)
    } else {
        progress.state = MessageState::Failed;
        progress.next_attempt = None;
        // a failed message shows why it failed, not an earlier deferral
        if let Some(reply) = progress
            .recipients
            .iter()
            .rev()
            .filter(|r| r.state == RecipientState::Failed)
            .find_map(|r| r.reply.as_ref())
        {
            progress.last_error = Some(reply.text.clone());
        }
        (Plan::Fail, recorded)
    }
}

impl Queue {
    /// Records the outcome of a delivery attempt and consumes the lease.
    ///
    /// Each result updates its recipient (results for addresses not in
    /// [`Lease::recipients`] are ignored with a warning; recipients without
    /// a result stay as they were). Then:
    /// - recipients left to try → [`Disposition::Deferred`]: attempts + 1,
    ///   next attempt after the backoff (`retry_initial` doubling per
    ///   attempt, capped at `retry_max`, ±20% jitter) — unless the message
    ///   is older than `max_age`, in which case they fail with
    ///   `gave up after {max_age}: {last reply}` ([`Reason::Expired`]);
    /// - none left, all delivered → the message is deleted
    ///   ([`Disposition::Removed`]);
    /// - none left, some failed → it stays as failed
    ///   ([`Disposition::Failed`]) and is never handed out again.
    ///
    /// `last_error` becomes the last non-success reply of this attempt.
    /// A passthrough client waiting for the message gets the results at once.
    ///
    /// The change is durable when this returns `Ok`. If the lease was lost
    /// meanwhile, nothing is written ([`QueueError::LeaseLost`]). On another
    /// `Err` (the store unreachable, say) the outcome is written again in
    /// the background, waiting 1 s doubling up to a minute between tries,
    /// with the lease still renewed; until it is written this relay does
    /// not hand the message out again. Like `enqueue`, the update completes
    /// even if the future is dropped.
    pub async fn record(
        &self,
        lease: Lease,
        results: Vec<RecipientResult>,
    ) -> Result<Recorded, QueueError> {
        self.record_attempt(lease, results, None).await
    }

    /// Records like [`Queue::record`], but nothing is tried again: the
    /// recipients left open fail, with `note` added to their reply (for a
    /// message whose client waited for this attempt's answer).
    pub async fn record_final(
        &self,
        lease: Lease,
        results: Vec<RecipientResult>,
        note: &'static str,
    ) -> Result<Recorded, QueueError> {
        self.record_attempt(lease, results, Some(note)).await
    }

    async fn record_attempt(
        &self,
        mut lease: Lease,
        results: Vec<RecipientResult>,
        last: Option<&'static str>,
    ) -> Result<Recorded, QueueError> {
        if !self.owns(&lease) {
            return Err(QueueError::NotLeased {
                path: self.inner.settings.dir.clone(),
                id: lease.id.clone(),
            });
        }
        let renewal = lease.disarm();
        let id = lease.id.clone();
        let mut progress =
            std::mem::replace(&mut lease.progress, Progress::new(&[], lease.received_at));
        let jitter = rand::random_range(0.8..=1.2);
        let (mut plan, results) = apply_attempt(
            &id,
            &mut progress,
            lease.received_at,
            results,
            SystemTime::now(),
            &self.inner.settings,
            jitter,
        );
        if let (Some(note), Plan::Defer { .. }) = (last, plan) {
            plan = fail_open(&mut progress, note);
        }
        let failed = failed_of(&progress);
        if let Some(watcher) = lock(&self.inner.local).watchers.remove(&id) {
            let _ = watcher.send(results.clone()); // the client may have gone
        }
        let inner = self.inner.clone();
        let attempts = progress.attempts;
        let next_attempt = progress.next_attempt;
        let last_error = progress.last_error.clone();
        let account = lease.account.clone();
        let written = tokio::spawn(async move {
            let written = inner.write(&id, plan, &progress).await;
            match &written {
                Ok(applied) => {
                    if let Some(renewal) = renewal {
                        renewal.abort();
                    }
                    if !applied {
                        tracing::warn!(queue_id = %id, "the lease on this message is gone (taken over or deleted); its outcome is not recorded");
                    }
                }
                Err(e) => {
                    tracing::error!(queue_id = %id, error = %e, "cannot record a delivery outcome; trying again with the lease kept");
                    lock(&inner.local).unrecorded.insert(id.clone());
                    tokio::spawn(inner.clone().record_later(id.clone(), plan, progress, renewal));
                }
            }
            written
        })
        .await
        .map_err(|source| QueueError::Task {
            action: "recording delivery attempt",
            path: self.inner.settings.dir.clone(),
            source,
        })?;
        if !written? {
            return Err(QueueError::LeaseLost {
                id: lease.id.clone(),
            });
        }
        let disposition = match plan {
            Plan::Remove => {
                tracing::info!(queue_id = %lease.id, attempts, "message delivered to every recipient; removed");
                Disposition::Removed
            }
            Plan::Fail => {
                tracing::warn!(queue_id = %lease.id, attempts, last_error = last_error.as_deref().unwrap_or(""), "message failed; kept in the queue as failed");
                Disposition::Failed
            }
            Plan::Defer { delay } => {
                tracing::info!(
                    queue_id = %lease.id,
                    attempts,
                    retry_in = %humantime::format_duration(Duration::from_millis(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))),
                    last_error = last_error.as_deref().unwrap_or(""),
                    "message deferred"
                );
                self.inner.wake_at(&account, delay);
                Disposition::Deferred {
                    next_attempt: next_attempt.unwrap_or_else(SystemTime::now),
                }
            }
        };
        Ok(Recorded {
            failed: match disposition {
                Disposition::Failed => failed,
                _ => Vec::new(),
            },
            disposition,
            results,
        })
    }
}

impl Inner {
    /// Writes an attempt's outcome under this relay's lease. `Ok(false)`:
    /// the lease is gone and nothing was written.
    async fn write(
        &self,
        id: &QueueId,
        plan: Plan,
        progress: &Progress,
    ) -> Result<bool, QueueError> {
        Ok(match plan {
            Plan::Remove => self.store.remove(id.as_str()).await?,
            Plan::Fail | Plan::Defer { .. } => self.store.record(id.as_str(), progress).await?,
        })
    }

    /// Writes an outcome that [`Queue::record`] could not write, trying
    /// again with capped back-off until it is written or the lease is gone;
    /// the lease is renewed meanwhile.
    async fn record_later(
        self: Arc<Self>,
        id: QueueId,
        plan: Plan,
        progress: Progress,
        renewal: Option<JoinHandle<()>>,
    ) {
        let mut wait = UNRECORDED_RETRY;
        loop {
            tokio::time::sleep(wait).await;
            match self.write(&id, plan, &progress).await {
                Ok(written) => {
                    if written {
                        tracing::info!(queue_id = %id, "delivery outcome recorded after all");
                    } else {
                        tracing::warn!(queue_id = %id, "the lease on this message is gone; its outcome is not recorded");
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(queue_id = %id, error = %e, retry_in = ?wait, "still cannot record a delivery outcome")
                }
            }
            wait = (wait * 2).min(UNRECORDED_RETRY_MAX);
        }
        lock(&self.local).unrecorded.remove(&id);
        if let Some(renewal) = renewal {
            renewal.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn settings() -> QueueSettings {
        QueueSettings {
            dir: PathBuf::from("/nonexistent"),
            database: None,
            lease_timeout: Duration::from_secs(60),
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            max_age: Duration::from_secs(86_400),
        }
    }

    const RECEIVED: Duration = Duration::from_secs(1_000_000);

    fn received() -> SystemTime {
        SystemTime::UNIX_EPOCH + RECEIVED
    }

    fn progress(recipients: &[&str]) -> Progress {
        let recipients: Vec<String> = recipients.iter().map(|a| a.to_string()).collect();
        Progress::new(&recipients, received())
    }

    fn apply(
        p: &mut Progress,
        results: Vec<RecipientResult>,
        now: SystemTime,
        s: &QueueSettings,
        jitter: f64,
    ) -> (Plan, Vec<RecipientResult>) {
        apply_attempt(
            &QueueId::from_parts(1, 1),
            p,
            received(),
            results,
            now,
            s,
            jitter,
        )
    }

    fn res(rcpt: &str, outcome: Outcome) -> RecipientResult {
        RecipientResult {
            recipient: rcpt.into(),
            outcome,
        }
    }

    fn reply(text: &str) -> Reply {
        Reply::parse(text).expect("reply")
    }

    fn temp(text: &str) -> Outcome {
        Outcome::new(Reason::Deferred, reply(text))
    }

    fn delivered(text: &str) -> Outcome {
        Outcome::delivered(reply(text))
    }

    fn reply_text(r: &relay_store::Recipient) -> Option<&str> {
        r.reply.as_ref().map(|r| r.text.as_str())
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let s = settings();
        let secs: Vec<u64> = (1..=9).map(|a| backoff(&s, a).as_secs()).collect();
        assert_eq!(secs, [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]);
        assert_eq!(backoff(&s, u32::MAX), Duration::from_secs(3600));
        assert_eq!(backoff(&s, 0), Duration::from_secs(60));
        let huge = QueueSettings {
            retry_initial: Duration::MAX,
            retry_max: Duration::MAX,
            ..settings()
        };
        assert_eq!(backoff(&huge, 40), Duration::MAX);
        assert_eq!(scale(Duration::MAX, 1.2), Duration::MAX);
        assert_eq!(
            scale(Duration::from_secs(100), 0.8),
            Duration::from_secs(80)
        );
    }

    #[test]
    fn deferral_uses_backoff_and_jitter() {
        let s = settings();
        let mut p = progress(&["x@y"]);
        let now = received() + Duration::from_secs(10);
        p.attempts = 2;
        let (plan, _) = apply(&mut p, vec![res("x@y", temp("451 busy"))], now, &s, 1.2);
        // Third attempt: 4 × 60 s × 1.2.
        assert_eq!(
            plan,
            Plan::Defer {
                delay: Duration::from_secs(288)
            }
        );
        assert_eq!(p.attempts, 3);
        assert_eq!(p.state, MessageState::Deferred);
        assert_eq!(p.next_attempt, Some(now + Duration::from_secs(288)));
        assert_eq!(p.last_error.as_deref(), Some("451 busy"));
        assert_eq!(p.recipients[0].state, RecipientState::Deferred);
        assert_eq!(p.recipients[0].reason.as_deref(), Some("deferred"));
    }

    #[test]
    fn expiry_fails_open_recipients() {
        let s = settings();
        let mut p = progress(&["a@x", "b@x", "c@x"]);
        let now = received() + s.max_age + Duration::from_secs(1);
        let (plan, _) = apply(
            &mut p,
            vec![
                res("a@x", delivered("250 ok")),
                res("b@x", temp("421 later")),
            ],
            now,
            &s,
            1.0,
        );
        assert_eq!(plan, Plan::Fail);
        assert_eq!(p.state, MessageState::Failed);
        assert_eq!(p.next_attempt, None);
        assert_eq!(p.recipients[0].state, RecipientState::Delivered);
        assert_eq!(p.recipients[1].state, RecipientState::Failed);
        assert_eq!(
            reply_text(&p.recipients[1]),
            Some("gave up after 1day: 421 later")
        );
        assert_eq!(
            reply_text(&p.recipients[2]),
            Some("gave up after 1day: never attempted")
        );
        assert_eq!(
            p.last_error.as_deref(),
            Some("gave up after 1day: never attempted")
        );
    }

    #[test]
    fn all_delivered_removes_and_unknown_results_are_ignored() {
        let s = settings();
        let mut p = progress(&["a@x"]);
        let (plan, _) = apply(
            &mut p,
            vec![
                res("zz@x", Outcome::new(Reason::Refused, reply("550 who"))),
                res("a@x", delivered("250 ok")),
            ],
            received(),
            &s,
            1.0,
        );
        assert_eq!(plan, Plan::Remove);
        assert_eq!(p.last_error, None);
    }

    #[test]
    fn recipients_without_result_keep_the_message_deferred() {
        let s = settings();
        let mut p = progress(&["a@x", "b@x"]);
        let (plan, _) = apply(
            &mut p,
            vec![res("a@x", delivered("250"))],
            received(),
            &s,
            1.0,
        );
        assert_eq!(
            plan,
            Plan::Defer {
                delay: Duration::from_secs(60)
            }
        );
        assert_eq!(p.recipients[1].state, RecipientState::Pending);
    }
}

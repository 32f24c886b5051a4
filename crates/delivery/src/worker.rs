//! Delivery workers: pull due messages of one account, deliver them over a
//! reused connection, and record each recipient's outcome in the queue.

use crate::{
    classify::{reason_class, throttle, Throttle},
    pace::{Limits, Pacer},
    session::{Broken, Failure, RcptOutcome, Session},
    Upstream, Verdict,
};
use crate::{dsn, rewrite::rewrite_from};
use relay_queue::{
    Disposition, Lease, NewMessage, Outcome, Queue, QueueId, RecipientResult, RecipientState,
};
use relay_tokens::TokenManager;
use std::{sync::Arc, time::Duration};
use tokio::{task::JoinSet, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Outcomes a worker may have waiting to be committed while it delivers
/// the next message; past this it waits for the oldest.
const MAX_RECORDING: usize = 64;

/// A worker kept from connecting (after a `432 4.3.2`) looks again this often.
const PARKED_RECHECK: Duration = Duration::from_secs(5);

/// A mailbox the relay delivers as.
pub struct Account {
    /// The `[[accounts]]` name messages are queued under.
    pub name: String,
    /// The XOAUTH2 user.
    pub mailbox: String,
    pub tokens: TokenManager,
    /// Its sending limits.
    pub limits: Limits,
    /// Rewrite the envelope sender and `From:` to the mailbox.
    pub rewrite_from: bool,
    /// Notify the envelope sender of failed messages.
    pub bounce: bool,
}

impl Account {
    /// The account `[[accounts]]` describes, with `[upstream]`'s limits
    /// where it sets none of its own.
    pub fn from_config(
        account: &relay_config::AccountConfig,
        upstream: &relay_config::UpstreamConfig,
        tokens: TokenManager,
    ) -> Account {
        Account {
            name: account.name.clone(),
            mailbox: account.mailbox.clone(),
            tokens,
            limits: Limits {
                messages_per_minute: account
                    .messages_per_minute
                    .unwrap_or(upstream.messages_per_minute),
                recipients_per_day: account
                    .recipients_per_day
                    .unwrap_or(upstream.recipients_per_day),
                max_connections: upstream.max_connections,
            },
            rewrite_from: account.rewrite_from,
            bounce: account.bounce,
        }
    }
}

/// Starts `limits.max_connections` workers for each account, sharing the
/// account's pace. They stop, after finishing the message in hand, when
/// `shutdown` is cancelled.
pub fn spawn(
    queue: Queue,
    upstream: Arc<Upstream>,
    accounts: Vec<Account>,
    shutdown: CancellationToken,
) -> JoinSet<()> {
    let mut set = JoinSet::new();
    let pacing_dir = queue.settings().dir.join("pacing");
    if let Err(e) = std::fs::create_dir_all(&pacing_dir) {
        tracing::warn!(dir = %pacing_dir.display(), error = %e, "cannot keep the pacing record; a restart may send in a burst");
    }
    for account in accounts.into_iter().map(Arc::new) {
        let file = pacing_dir.join(format!("{}.json", account.name));
        let pacer = Arc::new(Pacer::new(account.limits, Some(file)));
        for n in 0..account.limits.max_connections {
            let worker = Worker {
                queue: queue.clone(),
                upstream: upstream.clone(),
                account: account.clone(),
                pacer: pacer.clone(),
                n,
            };
            let span = tracing::info_span!("worker", account = %account.name, n);
            set.spawn(Arc::new(worker).run(shutdown.clone()).instrument(span));
        }
    }
    set
}

struct Worker {
    queue: Queue,
    upstream: Arc<Upstream>,
    account: Arc<Account>,
    pacer: Arc<Pacer>,
    /// This worker's place among the account's; those past the allowed
    /// connection count stay idle.
    n: usize,
}

impl Worker {
    async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut session: Option<Session> = None;
        let mut recording = JoinSet::new();
        loop {
            if self.n >= self.pacer.connections() {
                if let Some(open) = session.take() {
                    open.quit().await;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(PARKED_RECHECK) => continue,
                }
            }
            let idle = session.as_ref().map(|_| self.upstream.idle_timeout());
            let lease = tokio::select! {
                _ = shutdown.cancelled() => break,
                lease = self.queue.next_due(&self.account.name, idle) => lease,
            };
            let Some(lease) = lease else {
                if let Some(idle_session) = session.take() {
                    idle_session.quit().await;
                }
                continue;
            };
            if !self.pacer.admit(lease.recipients.len(), &shutdown).await {
                break; // shutting down: the dropped lease leaves the message queued
            }
            let span = tracing::info_span!("delivery", queue_id = %lease.id);
            let results = self.deliver(&mut session, &lease).instrument(span).await;
            self.slow_down_if_asked(&results, &mut session);
            // Committing the outcome costs a disk sync; the connection
            // carries the next message meanwhile. The message stays leased
            // until its outcome is committed, so it cannot go out twice.
            while recording.try_join_next().is_some() {}
            if recording.len() >= MAX_RECORDING {
                recording.join_next().await;
            }
            recording.spawn(self.clone().record(lease, results).in_current_span());
        }
        while recording.join_next().await.is_some() {}
        if let Some(open) = session {
            open.quit().await;
        }
    }

    /// Records an attempt's outcome in the queue, counts it, and tells the
    /// sender if the message failed.
    async fn record(self: Arc<Self>, lease: Lease, results: Vec<RecipientResult>) {
        let (id, sender) = (lease.id.clone(), lease.sender.clone());
        let notify = self.account.bounce && !lease.passthrough;
        let reason = results.iter().rev().find_map(|r| match &r.outcome {
            Outcome::Delivered { .. } => None,
            Outcome::Temporary { reply } | Outcome::Permanent { reply } => {
                Some(reason_class(reply))
            }
        });
        let recorded = self.queue.record(lease, results).await;
        if let Ok(disposition) = &recorded {
            let outcome = match disposition {
                Disposition::Removed => "delivered",
                Disposition::Deferred { .. } => "deferred",
                Disposition::Failed => "failed",
            };
            metrics::counter!(
                "smtp_relay_messages_total",
                "outcome" => outcome,
                "reason" => reason.unwrap_or("none")
            )
            .increment(1);
        }
        match recorded {
            Ok(Disposition::Failed) if notify => self.bounce(&id, &sender).await,
            Ok(_) => {}
            Err(e) => {
                tracing::error!(queue_id = %id, error = %e, "cannot record the delivery outcome")
            }
        }
    }

    /// Lets the pacer know when the upstream says the mailbox sends too much.
    fn slow_down_if_asked(&self, results: &[RecipientResult], session: &mut Option<Session>) {
        let asked = results.iter().find_map(|r| match &r.outcome {
            Outcome::Temporary { reply } | Outcome::Permanent { reply } => throttle(reply),
            Outcome::Delivered { .. } => None,
        });
        match asked {
            Some(Throttle::Connections) => {
                self.pacer.too_many_connections();
                *session = None; // the server will not serve this connection
            }
            Some(Throttle::Quota) => self.pacer.quota_exceeded(),
            None => {}
        }
    }

    /// Tells the sender of failed message `id` which recipients failed and
    /// why, by queueing a delivery status notification.
    async fn bounce(&self, id: &QueueId, sender: &str) {
        let dir = self.queue.settings().dir.clone();
        let Ok((entry, _)) = relay_queue::show(&dir, id) else {
            return;
        };
        let Ok(original) = tokio::fs::read(dir.join("body").join(id.as_str())).await else {
            return;
        };
        if !dsn::may_bounce(sender, &original) {
            return;
        }
        let failed: Vec<dsn::Failed<'_>> = entry
            .recipient_status
            .iter()
            .filter(|r| r.status == RecipientState::Failed)
            .map(|r| dsn::Failed {
                recipient: &r.address,
                reply: r.reply.as_deref().unwrap_or("failed"),
            })
            .collect();
        let report = dsn::notification(
            &self.account.mailbox,
            self.upstream.helo(),
            sender,
            &original,
            &failed,
            std::time::SystemTime::now(),
        );
        let notice = NewMessage {
            sender: self.account.mailbox.clone(),
            recipients: vec![sender.to_owned()],
            account: self.account.name.clone(),
            client: None,
        };
        match self.queue.enqueue(notice, &report).await {
            Ok(dsn_id) => {
                tracing::info!(queue_id = %id, notification = %dsn_id, to = %sender, "queued a delivery status notification")
            }
            Err(e) => {
                tracing::error!(queue_id = %id, error = %e, "cannot queue a delivery status notification")
            }
        }
    }

    async fn deliver(&self, slot: &mut Option<Session>, lease: &Lease) -> Vec<RecipientResult> {
        let started = Instant::now();
        let body = match self.queue.read_body(lease).await {
            Ok(body) => body,
            Err(e) => {
                return self.all(
                    lease,
                    &Failure::temporary(format!("cannot read the queued message: {e}")),
                    started,
                )
            }
        };
        let (sender, body) = if self.account.rewrite_from {
            let sender = match lease.sender.as_str() {
                "" => String::new(), // a null sender stays null
                _ => self.account.mailbox.clone(),
            };
            (sender, rewrite_from(&body, &self.account.mailbox))
        } else {
            (lease.sender.clone(), body)
        };
        // A pooled connection may have been closed while idle; if it breaks
        // before the message went out, one fresh connection tries again.
        for fresh_try in [false, true] {
            if slot.is_none() {
                match Session::open(&self.upstream, &self.account.mailbox, &self.account.tokens)
                    .await
                {
                    Ok(session) => *slot = Some(session),
                    Err(failure) => return self.all(lease, &failure, started),
                }
            }
            let Some(session) = slot.as_mut() else { break };
            let reused = session.transactions > 0;
            match session.transaction(&sender, &lease.recipients, &body).await {
                Ok(outcomes) => {
                    metrics::histogram!("smtp_relay_upstream_duration_seconds")
                        .record(started.elapsed().as_secs_f64());
                    return self.results(lease, outcomes, started);
                }
                Err(Broken {
                    reason,
                    before_data,
                }) => {
                    *slot = None;
                    if !(reused && before_data) || fresh_try {
                        return self.all(lease, &Failure::temporary(reason), started);
                    }
                    tracing::debug!(%reason, "pooled connection was dead; reconnecting");
                }
            }
        }
        self.all(lease, &Failure::temporary("no connection".into()), started)
    }

    fn all(&self, lease: &Lease, failure: &Failure, started: Instant) -> Vec<RecipientResult> {
        let outcomes = lease
            .recipients
            .iter()
            .map(|_| RcptOutcome::Failed(failure.clone()))
            .collect();
        self.results(lease, outcomes, started)
    }

    /// Logs the attempt (one line per distinct reply) and turns it into queue results.
    fn results(
        &self,
        lease: &Lease,
        outcomes: Vec<RcptOutcome>,
        started: Instant,
    ) -> Vec<RecipientResult> {
        let took = started.elapsed();
        let mut logged: Vec<String> = Vec::new();
        let mut results = Vec::with_capacity(outcomes.len());
        for (recipient, outcome) in lease.recipients.iter().zip(outcomes) {
            let (reply, outcome) = match outcome {
                RcptOutcome::Delivered(reply) => (reply.clone(), Outcome::Delivered { reply }),
                RcptOutcome::Failed(Failure {
                    verdict: Verdict::Temporary,
                    reply,
                    ..
                }) => (reply.clone(), Outcome::Temporary { reply }),
                RcptOutcome::Failed(Failure { reply, .. }) => {
                    (reply.clone(), Outcome::Permanent { reply })
                }
            };
            if !logged.contains(&reply) {
                self.log(lease, &outcome, took);
                logged.push(reply);
            }
            results.push(RecipientResult {
                recipient: recipient.clone(),
                outcome,
            });
        }
        results
    }

    /// One structured line per attempt and reply: queue id, mailbox, reply
    /// code and enhanced status, duration, and a hint for known problems.
    fn log(&self, lease: &Lease, outcome: &Outcome, took: Duration) {
        let mailbox = &self.account.mailbox;
        let reply = outcome.reply();
        let parsed = crate::Reply::from_lines(&[reply.to_owned()]);
        let code = parsed.as_ref().map(|r| r.code).unwrap_or_default();
        let enhanced = parsed
            .as_ref()
            .and_then(|r| r.enhanced)
            .map(|e| format!("{}.{}.{}", e.class, e.subject, e.detail))
            .unwrap_or_default();
        let hint = parsed
            .as_ref()
            .and_then(|r| crate::classify(r).1)
            .unwrap_or("");
        let attempt = lease.attempts + 1;
        match outcome {
            Outcome::Delivered { .. } => tracing::info!(
                queue_id = %lease.id, %mailbox, sender = %lease.sender, recipients = lease.recipients.len(),
                code, enhanced, reply, attempt, ?took, "delivered"
            ),
            Outcome::Temporary { .. } => tracing::warn!(
                queue_id = %lease.id, %mailbox, code, enhanced, reply, attempt, hint, ?took,
                "delivery deferred"
            ),
            Outcome::Permanent { .. } => tracing::error!(
                queue_id = %lease.id, %mailbox, code, enhanced, reply, attempt, hint, ?took,
                "delivery failed permanently"
            ),
        }
    }
}

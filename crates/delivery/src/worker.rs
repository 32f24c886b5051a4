//! Delivery workers: pull due messages of one account, deliver them over a
//! reused connection, and record each recipient's outcome in the queue.

use crate::{
    session::{Broken, Failure, RcptOutcome, Session},
    Upstream, Verdict,
};
use relay_queue::{Lease, Outcome, Queue, RecipientResult};
use relay_tokens::TokenManager;
use std::{sync::Arc, time::Duration};
use tokio::{task::JoinSet, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// An upstream connection unused this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A mailbox the relay delivers as.
pub struct Account {
    /// The `[[accounts]]` name messages are queued under.
    pub name: String,
    /// The XOAUTH2 user.
    pub mailbox: String,
    pub tokens: TokenManager,
}

/// Starts `upstream.max_connections` workers for each account. They stop,
/// after finishing the message in hand, when `shutdown` is cancelled.
pub fn spawn(
    queue: Queue,
    upstream: Arc<Upstream>,
    accounts: Vec<Account>,
    shutdown: CancellationToken,
) -> JoinSet<()> {
    let mut set = JoinSet::new();
    for account in accounts.into_iter().map(Arc::new) {
        for n in 0..upstream.max_connections() {
            let worker = Worker {
                queue: queue.clone(),
                upstream: upstream.clone(),
                account: account.clone(),
            };
            let span = tracing::info_span!("worker", account = %account.name, n);
            set.spawn(worker.run(shutdown.clone()).instrument(span));
        }
    }
    set
}

struct Worker {
    queue: Queue,
    upstream: Arc<Upstream>,
    account: Arc<Account>,
}

impl Worker {
    async fn run(self, shutdown: CancellationToken) {
        let mut session: Option<Session> = None;
        loop {
            let idle = session.as_ref().map(|_| IDLE_TIMEOUT);
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
            let span = tracing::info_span!("delivery", queue_id = %lease.id);
            let results = self.deliver(&mut session, &lease).instrument(span).await;
            let id = lease.id.clone();
            if let Err(e) = self.queue.record(lease, results).await {
                tracing::error!(queue_id = %id, error = %e, "cannot record the delivery outcome");
            }
        }
        if let Some(open) = session {
            open.quit().await;
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
            match session
                .transaction(&lease.sender, &lease.recipients, &body)
                .await
            {
                Ok(outcomes) => return self.results(lease, outcomes, started),
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

    fn log(&self, lease: &Lease, outcome: &Outcome, took: Duration) {
        let mailbox = &self.account.mailbox;
        match outcome {
            Outcome::Delivered { reply } => tracing::info!(
                queue_id = %lease.id, %mailbox, sender = %lease.sender, recipients = lease.recipients.len(),
                reply = %reply, ?took, "delivered"
            ),
            Outcome::Temporary { reply } => tracing::warn!(
                queue_id = %lease.id, %mailbox, attempt = lease.attempts + 1, reply = %reply,
                hint = hint_for(reply), ?took, "delivery deferred"
            ),
            Outcome::Permanent { reply } => tracing::error!(
                queue_id = %lease.id, %mailbox, reply = %reply, hint = hint_for(reply), ?took,
                "delivery failed permanently"
            ),
        }
    }
}

fn hint_for(reply: &str) -> &'static str {
    crate::Reply::from_lines(&[reply.to_owned()])
        .and_then(|r| crate::classify(&r).1)
        .unwrap_or("")
}

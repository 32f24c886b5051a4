//! Delivery workers: pull due messages of one account, deliver them over a
//! reused session of a [`Transport`], and record each recipient's outcome
//! in the queue. Pacing, the cap on sessions per mailbox, the passthrough
//! rule and recording are the same whatever the transport.
//!
//! With a database shared by several relays ([`Account::shared`]) a worker
//! opens a session only while it holds one of the mailbox's slots there,
//! taken before the message's pacing (so a send is counted only once it
//! can go) and given back when the session closes; an idle session keeps
//! its slot until the transport's idle timeout, as it keeps the upstream's.
//! A worker that finds every slot taken gives its message back to the
//! shared queue, due at once, and waits for a slot before it takes another:
//! a relay without a slot holds no mail from the relays that have one
//! (but a passthrough message, which only this relay can send, waits with
//! its worker). It asks for a slot under the configured cap: after a `432 4.3.2` the
//! store grants every relay one fewer for the window, besides this relay
//! parking a worker of its own.

use crate::shared::{Shared, Slot};
use crate::transport::{Broken, Message, SlowDown, Transport, Unopened};
use crate::{classify::hint, dsn, pace::Limits, pace::Pacer, rewrite::rewrite_from};
use relay_config::StateDir;
use relay_outcome::{Enhanced, Outcome, Reason, Reply, Verdict};
use relay_queue::{
    Begin, Disposition, Lease, NewMessage, Queue, QueueError, RecipientResult, Recorded,
};
use relay_tokens::TokenManager;
use std::{sync::Arc, time::Duration};
use tokio::{task::JoinSet, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Outcomes a worker may have waiting to be committed while it delivers
/// the next message; past this it waits for the oldest.
const MAX_RECORDING: usize = 64;

/// A worker kept from opening a session (after a `432 4.3.2`) looks again
/// this often.
const PARKED_RECHECK: Duration = Duration::from_secs(5);
/// On a shared database, how long an idle session keeps its connection
/// slot at most (the transport's idle timeout if shorter): the slot is the
/// mailbox's, and another relay may have mail waiting for it.
const SHARED_IDLE: Duration = Duration::from_secs(1);

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
    /// The database shared with other relays, if any: the account's pace
    /// and its `limits.max_connections` then hold for all of them together
    /// (a worker opens a session only holding one of the mailbox's slots),
    /// and a throttle one relay is told of holds back all of them.
    /// `None`: this relay alone.
    pub shared: Option<relay_store::Store>,
}

impl Account {
    /// The account `[[accounts]]` describes, with `[upstream]`'s limits
    /// where it sets none of its own.
    ///
    /// A graph account gets `graph.max_requests` workers: each has at most
    /// one request in flight, so that many use the mailbox's whole request
    /// cap, and more would only hold messages waiting for it.
    pub fn from_config(
        account: &relay_config::AccountConfig,
        config: &relay_config::Config,
        tokens: TokenManager,
    ) -> Account {
        let upstream = &config.upstream;
        let max_connections = match account.transport {
            relay_config::Transport::Smtp => upstream.max_connections,
            relay_config::Transport::Graph => config.graph.max_requests,
        };
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
                max_connections,
            },
            rewrite_from: account.rewrite_from,
            bounce: account.bounce,
            shared: None,
        }
    }
}

/// What delivery needs from the rest of the relay besides the queue.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where each account's record of recent sends is kept, so a restart
    /// does not send in a burst; `None` keeps it in memory only.
    pub state: Option<StateDir>,
    /// The relay's name in failure notices.
    pub hostname: String,
}

/// Starts `limits.max_connections` workers for each account, sharing the
/// account's pace. They stop, after finishing the message in hand, when
/// `shutdown` is cancelled.
pub fn spawn<T: Transport>(
    queue: Queue,
    transport: Arc<T>,
    accounts: Vec<Account>,
    settings: Settings,
    shutdown: CancellationToken,
) -> JoinSet<()> {
    let mut set = JoinSet::new();
    spawn_into(&mut set, queue, transport, accounts, settings, shutdown);
    set
}

/// [`spawn`], into `set`: accounts with different transports share one
/// set of workers to supervise.
pub fn spawn_into<T: Transport>(
    set: &mut JoinSet<()>,
    queue: Queue,
    transport: Arc<T>,
    accounts: Vec<Account>,
    settings: Settings,
    shutdown: CancellationToken,
) {
    if let Some(dir) = settings.state.as_ref().map(StateDir::pacing) {
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot keep the pacing record; a restart may send in a burst");
        }
    }
    let hostname: Arc<str> = settings.hostname.into();
    for account in accounts.into_iter().map(Arc::new) {
        let file = settings
            .state
            .as_ref()
            .map(|state| state.pacing_file(&account.name));
        let shared = account
            .shared
            .clone()
            .map(|store| Shared::new(store, &account.name, queue.settings().lease_timeout));
        let pacer = Arc::new(Pacer::new(account.limits, file).sharing(shared.clone()));
        for n in 0..account.limits.max_connections {
            let worker = Worker {
                queue: queue.clone(),
                transport: transport.clone(),
                account: account.clone(),
                pacer: pacer.clone(),
                shared: shared.clone(),
                hostname: hostname.clone(),
                n,
            };
            let span = tracing::info_span!("worker", account = %account.name, n);
            set.spawn(Arc::new(worker).run(shutdown.clone()).instrument(span));
        }
    }
}

struct Worker<T: Transport> {
    queue: Queue,
    transport: Arc<T>,
    account: Arc<Account>,
    pacer: Arc<Pacer>,
    /// Where the mailbox's slots are, when shared with other relays.
    shared: Option<Shared>,
    hostname: Arc<str>,
    /// This worker's place among the account's; those past the allowed
    /// session count stay idle.
    n: usize,
}

/// One attempt, as handed to recording.
struct Attempt {
    lease: Lease,
    results: Vec<RecipientResult>,
    /// The message as delivered (for a failure notice).
    body: Arc<Vec<u8>>,
    started: Instant,
}

impl<T: Transport> Worker<T> {
    async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut session: Option<T::Session> = None;
        // With a shared database: the slot the open session holds.
        let mut slot: Option<Slot> = None;
        // A slot taken before its message (see below), kept for the next lease.
        let mut slot_first = false;
        let mut recording = JoinSet::new();
        loop {
            let parked = self.n >= self.pacer.connections();
            if parked {
                if let Some(open) = session.take() {
                    self.transport.close(open).await;
                }
            }
            if session.is_none() && !std::mem::take(&mut slot_first) {
                if let Some(free) = slot.take() {
                    free.release().await;
                }
            }
            if parked {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(PARKED_RECHECK) => continue,
                }
            }
            let idle = (session.is_some() || slot.is_some()).then(|| match self.shared {
                Some(_) => self.transport.idle_timeout().min(SHARED_IDLE),
                None => self.transport.idle_timeout(),
            });
            let lease = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = lost(&slot) => None,
                lease = self.queue.next_due(&self.account.name, idle) => lease,
            };
            let Some(lease) = lease else {
                if let Some(idle_session) = session.take() {
                    self.transport.close(idle_session).await;
                }
                continue;
            };
            if let (None, Some(shared)) = (&slot, &self.shared) {
                // No session without a slot. The store lowers the cap after
                // a 432 for every relay.
                let cap = self.account.limits.max_connections;
                if let Some(held) = shared.try_acquire(cap).await {
                    slot = Some(held);
                } else if lease.passthrough {
                    // Its client waits on this relay: no other can send it.
                    let Some(held) = shared.acquire(cap, &shutdown).await else {
                        break; // shutting down: the dropped lease leaves the message queued
                    };
                    slot = Some(held);
                } else {
                    // Every slot is taken, by this relay's sessions or
                    // another's: the message goes back to whichever relay
                    // has one first, and this worker takes a slot before it
                    // takes another message. Held, the message would wait
                    // as long as the others keep their sessions busy.
                    self.queue.give_back(lease).await;
                    let Some(held) = shared.acquire(cap, &shutdown).await else {
                        break; // shutting down
                    };
                    slot = Some(held);
                    slot_first = true;
                    continue;
                }
            }
            if !self.pacer.admit(lease.recipients.len(), &shutdown).await {
                break; // shutting down: the dropped lease leaves the message queued
            }
            // The wait for the pacing slot may have been long enough for an
            // administrator to delete the message.
            let body = match self.queue.begin(&lease).await {
                Begin::Go(body) => Ok(body),
                Begin::Unreadable(e) => Err(e),
                Begin::Stop => {
                    tracing::info!(queue_id = %lease.id, "deleted or held while waiting for its turn; not sent");
                    continue;
                }
            };
            let span = tracing::info_span!("delivery", queue_id = %lease.id);
            let started = Instant::now();
            let attempt = self
                .attempt(&mut session, lease, body, started)
                .instrument(span)
                .await;
            // Committing the outcome costs a disk sync; the session carries
            // the next message meanwhile. The message stays leased until its
            // outcome is committed, so it cannot go out twice.
            while recording.try_join_next().is_some() {}
            if recording.len() >= MAX_RECORDING {
                recording.join_next().await;
            }
            recording.spawn(self.clone().record(attempt).in_current_span());
            if slot.as_ref().is_some_and(Slot::is_lost) {
                if let Some(open) = session.take() {
                    self.transport.close(open).await;
                }
            }
        }
        while recording.join_next().await.is_some() {}
        if let Some(open) = session {
            self.transport.close(open).await;
        }
        if let Some(held) = slot {
            held.release().await;
        }
    }

    /// Delivers the message (its body as [`Queue::begin`] read it) and says
    /// per recipient what happened.
    async fn attempt(
        &self,
        slot: &mut Option<T::Session>,
        lease: Lease,
        body: Result<Vec<u8>, QueueError>,
        started: Instant,
    ) -> Attempt {
        let body = match body {
            Ok(body) => body,
            Err(e) => {
                let failure = Outcome::new(
                    Reason::Local,
                    Reply::local(
                        451,
                        Enhanced::new(4, 3, 0),
                        &format!("cannot read the queued message: {e}"),
                    ),
                );
                let outcomes = vec![failure; lease.recipients.len()];
                return self.finish(lease, outcomes, Arc::new(Vec::new()), started);
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
        let message = Message {
            queue_id: &lease.id,
            sender: &sender,
            recipients: &lease.recipients,
            body: &body,
        };
        let outcomes = self.deliver(slot, message, started).await;
        self.finish(lease, outcomes, Arc::new(body), started)
    }

    /// Delivers over the open session, opening one if needed. A pooled
    /// session may have been closed while idle; if it breaks before the
    /// message was handed over, one fresh session tries again.
    async fn deliver(
        &self,
        slot: &mut Option<T::Session>,
        message: Message<'_>,
        started: Instant,
    ) -> Vec<Outcome> {
        let every = |outcome: Outcome| vec![outcome; message.recipients.len()];
        for fresh_try in [false, true] {
            let session = match slot {
                Some(session) => session,
                None => match self.transport.open(&self.account).await {
                    Ok(session) => slot.insert(session),
                    Err(Unopened { outcome, slow_down }) => {
                        self.slow_down(slow_down, slot).await;
                        return every(outcome);
                    }
                },
            };
            let reused = T::reused(session);
            match self.transport.deliver(session, message).await {
                Ok(delivered) => {
                    metrics::histogram!("smtp_relay_upstream_duration_seconds")
                        .record(started.elapsed().as_secs_f64());
                    self.slow_down(delivered.slow_down, slot).await;
                    return delivered.outcomes;
                }
                Err(Broken {
                    outcome,
                    retry_fresh,
                }) => {
                    *slot = None;
                    if !(reused && retry_fresh) || fresh_try {
                        return every(outcome);
                    }
                    tracing::debug!(reply = %outcome.reply, "pooled session was dead; opening a new one");
                }
            }
        }
        // the fresh try returns above; this only satisfies the loop's type
        every(Outcome::new(
            Reason::Network(relay_outcome::Network::Lost),
            Reply::local(451, Enhanced::new(4, 4, 2), "no session to the upstream"),
        ))
    }

    /// Lets the pacer know when the upstream says the mailbox sends too much.
    async fn slow_down(&self, asked: Option<SlowDown>, slot: &mut Option<T::Session>) {
        match asked {
            Some(SlowDown::FewerSessions) => {
                self.pacer.too_many_connections().await;
                // the upstream will not serve this session
                if let Some(refused) = slot.take() {
                    self.transport.close(refused).await;
                }
            }
            Some(SlowDown::Pause(pause)) => self.pacer.pause(pause).await,
            None => {}
        }
    }

    /// Pairs the outcomes with their recipients.
    fn finish(
        &self,
        lease: Lease,
        outcomes: Vec<Outcome>,
        body: Arc<Vec<u8>>,
        started: Instant,
    ) -> Attempt {
        let results = lease
            .recipients
            .iter()
            .cloned()
            .zip(outcomes)
            .map(|(recipient, outcome)| RecipientResult { recipient, outcome })
            .collect();
        Attempt {
            lease,
            results,
            body,
            started,
        }
    }

    /// Records an attempt's outcome in the queue, logs and counts it, and
    /// tells the sender if the message failed.
    async fn record(self: Arc<Self>, attempt: Attempt) {
        let Attempt {
            lease,
            results,
            body,
            started,
        } = attempt;
        let log = LogContext {
            queue_id: lease.id.to_string(),
            message_id: message_id(&body),
            from: lease.sender.clone(),
            attempt: lease.attempts + 1,
            received_at: lease.received_at,
            took: started.elapsed(),
        };
        let notify = self.account.bounce && !lease.passthrough;
        let sender = lease.sender.clone();
        // A passthrough client has its answer now; the message is not
        // tried again behind its back.
        let recorded = if lease.passthrough {
            self.queue
                .record_final(lease, results.clone(), PASSTHROUGH_NOTE)
                .await
        } else {
            self.queue.record(lease, results.clone()).await
        };
        let recorded = match recorded {
            Ok(recorded) => recorded,
            Err(e) => {
                tracing::error!(queue_id = %log.queue_id, error = %e, "cannot record the delivery outcome");
                for r in &results {
                    self.log(&log, r, status_of(&r.outcome, None));
                }
                return;
            }
        };
        for r in &recorded.results {
            self.log(&log, r, status_of(&r.outcome, Some(&recorded)));
        }
        let outcome = match recorded.disposition {
            Disposition::Removed => "delivered",
            Disposition::Deferred { .. } => "deferred",
            Disposition::Failed => "failed",
        };
        let reason = recorded
            .results
            .iter()
            .rev()
            .find(|r| !r.outcome.is_delivered())
            .map_or("none", |r| r.outcome.label());
        metrics::counter!(
            "smtp_relay_messages_total",
            "outcome" => outcome,
            "reason" => reason
        )
        .increment(1);
        if recorded.disposition == Disposition::Failed && notify {
            self.bounce(&log.queue_id, &sender, &body, &recorded.failed)
                .await;
        }
    }

    /// One line per recipient, Postfix-style, so "did bob@ get it?" is
    /// answered by the log after the message left the queue.
    fn log(&self, ctx: &LogContext, result: &RecipientResult, status: &'static str) {
        let outcome = &result.outcome;
        let delay = std::time::SystemTime::now()
            .duration_since(ctx.received_at)
            .unwrap_or_default();
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    queue_id = %ctx.queue_id,
                    message_id = ctx.message_id.as_deref().map(display),
                    from = %ctx.from,
                    to = %result.recipient,
                    status = %status,
                    reason = %outcome.reason,
                    mailbox = %self.account.mailbox,
                    relay = %self.transport.relay(),
                    delay = format_args!("{:.1}s", delay.as_secs_f64()),
                    took = format_args!("{:.2}s", ctx.took.as_secs_f64()),
                    attempt = ctx.attempt,
                    code = outcome.reply.code,
                    enhanced = outcome.reply.enhanced.map(display),
                    reply = %outcome.reply,
                    hint = hint(outcome).map(display),
                    "{}",
                    if status == "sent" { "delivered" } else { status }
                )
            };
        }
        match status {
            "sent" => line!(info),
            "deferred" => line!(warn),
            _ => line!(error),
        }
    }

    /// Tells the sender of failed message `queue_id` which recipients
    /// failed and why, by queueing a delivery status notification.
    async fn bounce(
        &self,
        queue_id: &str,
        sender: &str,
        original: &[u8],
        failed: &[RecipientResult],
    ) {
        if !dsn::may_bounce(sender, original) {
            return;
        }
        let failed: Vec<dsn::Failed<'_>> = failed
            .iter()
            .map(|r| dsn::Failed {
                recipient: &r.recipient,
                reply: &r.outcome.reply,
            })
            .collect();
        let report = dsn::notification(
            &self.account.mailbox,
            &self.hostname,
            sender,
            original,
            &failed,
            std::time::SystemTime::now(),
        );
        let notice = NewMessage {
            sender: self.account.mailbox.clone(),
            recipients: vec![sender.to_owned()],
            account: self.account.name.clone(),
            client: None,
        };
        match self.queue.enqueue_owned(notice, report).await {
            Ok(dsn_id) => {
                tracing::info!(queue_id = %queue_id, notification = %dsn_id, to = %sender, "queued a delivery status notification")
            }
            Err(e) => {
                tracing::error!(queue_id = %queue_id, error = %e, "cannot queue a delivery status notification")
            }
        }
    }
}

/// What every log line of one attempt shares.
struct LogContext {
    queue_id: String,
    message_id: Option<String>,
    from: String,
    attempt: u32,
    received_at: std::time::SystemTime,
    took: Duration,
}

/// Resolves when the held slot is lost; never without one.
async fn lost(slot: &Option<Slot>) {
    match slot {
        Some(slot) => slot.lost().await,
        None => std::future::pending().await,
    }
}

/// Added to the reply of a passthrough recipient that was not delivered.
const PASSTHROUGH_NOTE: &str = "passthrough: returned to the client, not retried";

/// Postfix's word for what became of a recipient.
fn status_of(outcome: &Outcome, recorded: Option<&Recorded>) -> &'static str {
    if outcome.reason == Reason::Expired {
        return "expired";
    }
    match outcome.verdict() {
        Verdict::Delivered => "sent",
        Verdict::Temporary => match recorded.map(|r| r.disposition) {
            Some(Disposition::Failed) => "bounced",
            _ => "deferred",
        },
        Verdict::Permanent => "bounced",
    }
}

/// The message's `Message-ID` header, if it has one.
fn message_id(body: &[u8]) -> Option<String> {
    let end = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(body.len());
    let head = String::from_utf8_lossy(&body[..end]);
    let mut lines = head.split("\r\n").peekable();
    while let Some(line) = lines.next() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if !name.eq_ignore_ascii_case("message-id") {
            continue;
        }
        let mut value = value.trim().to_owned();
        while let Some(folded) = lines.next_if(|l| l.starts_with([' ', '\t'])) {
            value.push_str(folded.trim());
        }
        return (!value.is_empty()).then_some(value);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::message_id;

    #[test]
    fn finds_the_message_id() {
        assert_eq!(
            message_id(b"Subject: x\r\nMessage-ID:\r\n <a@b>\r\n\r\nMessage-ID: <no>\r\n")
                .as_deref(),
            Some("<a@b>")
        );
        assert_eq!(message_id(b"Subject: x\r\n\r\n"), None);
    }
}

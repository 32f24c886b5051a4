//! Per-mailbox pacing within Microsoft 365's sending limits.
//!
//! Microsoft 365 allows a mailbox 30 messages a minute, 10,000 recipients a
//! rolling day and 3 concurrent connections; going past them gets the
//! mailbox throttled (`432 4.3.2`, `5.2.2` quota) or blocked. A [`Pacer`]
//! admits each message before it is sent, spacing messages evenly (30 a
//! minute is one every two seconds, so a burst never looks like one to the
//! upstream) and counting recipients over the last day. Past the pace the
//! worker waits,
//! holding the message, and the queue keeps the rest — the application never
//! sees an error. A `432 4.3.2` lowers the mailbox's connection count for a
//! while; a `5.2.2` quota refusal pauses the mailbox for an hour.
//!
//! The record of recent sends is saved beside the queue (at most every two
//! seconds), so a restart does not start with a full allowance and burst.
//!
//! Relays sharing a database share the pace too: each admission is also
//! asked of the store, which counts every relay's sends of the mailbox in
//! one sliding window (messages a minute, recipients a day). Each relay
//! still spaces its own messages evenly. The worker whose turn it is asks
//! for every worker waiting behind it too, so the store's lock is taken
//! once for all of them (in order; the line stops at the first that must
//! wait), unless the spacing keeps them apart. The reactions to throttling are
//! shared through the store as well: a pause stops every relay's
//! admissions, and a `432 4.3.2` takes one of the mailbox's connection
//! slots away from all of them for the ten minutes. If the store does not
//! take them, the relay that was throttled still reacts alone.

use crate::shared::{Retry, Shared};
use relay_store::StoreError;
use serde::{Deserialize, Serialize};
use std::{
    collections::VecDeque,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use tokio_util::sync::CancellationToken;

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);
/// How long a `432 4.3.2` lowers the connection count.
const FEWER_CONNECTIONS_FOR: Duration = Duration::from_secs(600);
/// How long a `5.2.2` submission-quota refusal (or a request to slow down
/// naming no time) pauses the mailbox.
const QUOTA_PAUSE: Duration = Duration::from_secs(3600);
const SAVE_EVERY: Duration = Duration::from_secs(2);
/// Messages spaced closer than this are admitted together: no wait is that
/// short (see [`until`]), so they were never spaced apart anyway.
const TOGETHER: Duration = Duration::from_millis(1);

/// A mailbox's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub messages_per_minute: u32,
    pub recipients_per_day: u32,
    pub max_connections: usize,
}

/// The pace of one mailbox, shared by its workers.
#[derive(Debug)]
pub struct Pacer {
    limits: Limits,
    file: Option<PathBuf>,
    state: Mutex<State>,
    /// The pace of every relay on the database, when shared.
    shared: Option<Shared>,
    /// The turn to admit: one worker at a time, in the order they asked
    /// (tokio's mutex is FIFO), so a message retried often cannot starve
    /// one that waits, and this relay's own spacing holds across the
    /// store's answer. On the shared pace the worker with the turn admits
    /// from the front of [`Pacer::line`], itself included.
    admitting: tokio::sync::Mutex<()>,
    /// The same line, visible to the worker whose turn it is, so it can ask
    /// the shared pace for those behind it at once.
    line: Mutex<VecDeque<Arc<Ticket>>>,
}

/// A worker's place in the line.
#[derive(Debug)]
struct Ticket {
    recipients: u32,
    /// Admitted (and counted) by the worker whose turn it was.
    admitted: AtomicBool,
    /// Told when admitted, so that it need not wait for its turn.
    went: tokio::sync::Notify,
}

/// A [`Ticket`] in the line, left when dropped (admitted, or the worker
/// gave up).
struct Place<'a> {
    line: &'a Mutex<VecDeque<Arc<Ticket>>>,
    ticket: Arc<Ticket>,
}

impl<'a> Place<'a> {
    fn join(line: &'a Mutex<VecDeque<Arc<Ticket>>>, recipients: u32) -> Self {
        let ticket = Arc::new(Ticket {
            recipients,
            admitted: AtomicBool::new(false),
            went: tokio::sync::Notify::new(),
        });
        lock(line).push_back(ticket.clone());
        Place { line, ticket }
    }

    fn admitted(&self) -> bool {
        self.ticket.admitted.load(Ordering::Acquire)
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        lock(self.line).retain(|t| !Arc::ptr_eq(t, &self.ticket));
    }
}

#[derive(Debug, Default)]
struct State {
    sends: Sends,
    paused_until: Option<SystemTime>,
    /// A lowered connection count and when it is lifted.
    fewer_connections: Option<(usize, SystemTime)>,
    saved_at: Option<SystemTime>,
}

/// (when, recipients) of each admitted message in the last day, oldest
/// first, and their recipients summed: an admission reads the day's total
/// without walking the day.
#[derive(Debug, Default)]
struct Sends {
    list: VecDeque<(SystemTime, u32)>,
    recipients: u64,
}

impl Sends {
    fn push(&mut self, at: SystemTime, recipients: u32) {
        self.list.push_back((at, recipients));
        self.recipients += u64::from(recipients);
    }

    /// Forgets the sends a day or more before `now`.
    fn expire(&mut self, now: SystemTime) {
        while let Some(&(at, recipients)) = self.list.front() {
            if now.duration_since(at).unwrap_or_default() < DAY {
                break;
            }
            self.list.pop_front();
            self.recipients -= u64::from(recipients);
        }
    }

    fn last(&self) -> Option<SystemTime> {
        self.list.back().map(|(at, _)| *at)
    }
}

/// What is saved: per-minute totals are precise enough to not burst.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    /// (unix minute start, messages, recipients)
    minutes: Vec<(u64, u32, u32)>,
    paused_until: Option<u64>,
    /// The last admission, in milliseconds since the epoch.
    #[serde(default)]
    last_ms: Option<u64>,
}

impl Pacer {
    /// A pacer with `limits`, remembering its sends in `file` (if any).
    pub fn new(limits: Limits, file: Option<PathBuf>) -> Self {
        let mut state = State::default();
        if let Some(saved) = file.as_ref().and_then(|f| load(f)) {
            let now = SystemTime::now();
            for (minute, messages, recipients) in saved.minutes {
                let at = UNIX_EPOCH + Duration::from_secs(minute);
                if now.duration_since(at).unwrap_or_default() < DAY {
                    // spread the minute's recipients over its messages
                    for i in 0..messages {
                        let share = recipients / messages.max(1)
                            + u32::from(i < recipients % messages.max(1));
                        state.sends.push(at, share);
                    }
                }
            }
            if let Some(ms) = saved.last_ms {
                state.sends.push(UNIX_EPOCH + Duration::from_millis(ms), 0);
            }
            state.paused_until = saved
                .paused_until
                .map(|s| UNIX_EPOCH + Duration::from_secs(s))
                .filter(|until| *until > now);
        }
        Pacer {
            limits,
            file,
            state: Mutex::new(state),
            shared: None,
            admitting: tokio::sync::Mutex::new(()),
            line: Mutex::new(VecDeque::new()),
        }
    }

    /// This pacer, also admitting by the pace `shared` keeps for all relays.
    pub(crate) fn sharing(self, shared: Option<Shared>) -> Self {
        Pacer { shared, ..self }
    }

    /// Waits until a message to `recipients` recipients may go, and counts it
    /// as sent; first come, first admitted. Returns false if `shutdown` came
    /// first.
    pub async fn admit(&self, recipients: usize, shutdown: &CancellationToken) -> bool {
        let recipients = u32::try_from(recipients).unwrap_or(u32::MAX);
        // In the line before waiting for the turn, so that whoever has it
        // can admit this one too.
        let place = Place::join(&self.line, recipients);
        let _turn = tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = place.ticket.went.notified() => return true,
            turn = self.admitting.lock() => turn,
        };
        let mut retry = Retry::default();
        loop {
            if place.admitted() {
                return true;
            }
            let wait = match &self.shared {
                None => match self.try_admit(recipients, SystemTime::now()) {
                    None => return true,
                    Some(wait) => wait,
                },
                Some(shared) => {
                    let asked = tokio::select! {
                        _ = shutdown.cancelled() => return false,
                        asked = self.try_admit_shared(shared, SystemTime::now()) => asked,
                    };
                    match asked {
                        Ok(None) => {
                            retry = Retry::default();
                            continue;
                        }
                        Ok(Some(wait)) => {
                            retry = Retry::default();
                            wait
                        }
                        // Never unpaced: wait for the store to answer.
                        Err(e) => retry.failed("pacing", &e),
                    }
                }
            };
            tracing::debug!(?wait, "pacing: waiting before the next message");
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// How many connections the mailbox may use now.
    pub fn connections(&self) -> usize {
        let mut state = self.lock();
        match state.fewer_connections {
            Some((n, until)) if until > SystemTime::now() => n,
            Some(_) => {
                state.fewer_connections = None;
                self.limits.max_connections
            }
            None => self.limits.max_connections,
        }
    }

    /// The upstream said `432 4.3.2`: use one connection fewer for a while,
    /// and have the other relays sharing the mailbox take one fewer too.
    pub async fn too_many_connections(&self) {
        let current = self.connections();
        let fewer = current.saturating_sub(1).max(1);
        tracing::warn!(connections = fewer, "too many concurrent connections for the mailbox (432 4.3.2): using fewer for 10 minutes");
        let now = SystemTime::now();
        let until = now + FEWER_CONNECTIONS_FOR;
        self.lock().fewer_connections = Some((fewer, until));
        if let Some(shared) = &self.shared {
            shared.fewer_slots(now, until).await;
        }
    }

    /// The upstream asked the mailbox to send nothing for `pause` (an hour
    /// when it named no time, as after a `5.2.2` quota refusal): nor does
    /// any relay sharing it.
    pub async fn pause(&self, pause: Option<Duration>) {
        let pause = pause.unwrap_or(QUOTA_PAUSE).min(DAY);
        let until = SystemTime::now() + pause;
        tracing::warn!(pause = %format_args!("{}s", pause.as_secs()), "the upstream asks the mailbox to slow down: pausing it");
        self.lock().paused_until = Some(until);
        self.save(true);
        if let Some(shared) = &self.shared {
            shared.pause(until).await;
        }
    }

    /// None when admitted (and counted); otherwise how long to wait.
    fn try_admit(&self, recipients: u32, now: SystemTime) -> Option<Duration> {
        let mut state = self.lock();
        if let Some(wait) = self.wait(&mut state, recipients, now, true) {
            return Some(wait);
        }
        state.sends.push(now, recipients);
        drop(state);
        self.save(false);
        None
    }

    /// [`Self::try_admit`] for the line's head, and those behind it that
    /// may go with it, by this relay's pauses and spacing and by the pace
    /// all relays share (which alone counts recipients a day, since it sees
    /// every relay's). `None`: some went (their tickets say which);
    /// otherwise how long the head waits. Cancel safety: dropped after the
    /// store counted sends, they are counted once too often, never too few.
    async fn try_admit_shared(
        &self,
        shared: &Shared,
        now: SystemTime,
    ) -> Result<Option<Duration>, StoreError> {
        let local = self.wait(&mut self.lock(), 0, now, false);
        if local.is_some() {
            return Ok(local);
        }
        let together = if self.spacing() < TOGETHER {
            usize::MAX
        } else {
            1
        };
        let line: Vec<Arc<Ticket>> = lock(&self.line).iter().take(together).cloned().collect();
        let recipients: Vec<u32> = line.iter().map(|t| t.recipients).collect();
        let admitted = shared.pace(now, &self.limits, &recipients).await?;
        if admitted.go == 0 {
            let at = admitted.next.unwrap_or(now);
            return Ok(Some(until(at, now)));
        }
        let went = &line[..admitted.go];
        {
            let mut state = self.lock();
            for ticket in went {
                state.sends.push(now, ticket.recipients);
            }
        }
        lock(&self.line).retain(|t| !went.iter().any(|w| Arc::ptr_eq(t, w)));
        for ticket in went {
            ticket.admitted.store(true, Ordering::Release);
            ticket.went.notify_one();
        }
        self.save(false);
        Ok(None)
    }

    /// The even spacing of this relay's messages.
    fn spacing(&self) -> Duration {
        MINUTE / self.limits.messages_per_minute.max(1)
    }

    /// How long before a message to `recipients` may go at `now` by this
    /// relay's record: pauses, even spacing and (with `per_day`) the
    /// recipients of the last day. `None`: now.
    fn wait(
        &self,
        state: &mut State,
        recipients: u32,
        now: SystemTime,
        per_day: bool,
    ) -> Option<Duration> {
        state.sends.expire(now);
        if let Some(until) = state.paused_until {
            match until.duration_since(now) {
                Ok(wait) if !wait.is_zero() => return Some(wait),
                _ => state.paused_until = None,
            }
        }
        let spacing = self.spacing();
        if let Some(last) = state.sends.last() {
            if last + spacing > now {
                return Some(until(last + spacing, now));
            }
        }
        if !per_day {
            return None;
        }
        let per_day = u64::from(self.limits.recipients_per_day);
        let recipients = u64::from(recipients);
        let mut used = state.sends.recipients;
        // a message bigger than the whole allowance goes once the day is clear
        if used > 0 && used + recipients > per_day {
            for &(at, n) in &state.sends.list {
                used -= u64::from(n);
                if used + recipients <= per_day || used == 0 {
                    return Some(until(at + DAY, now));
                }
            }
        }
        None
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Saves the record of sends (at most every two seconds unless `now`).
    fn save(&self, force: bool) {
        let Some(file) = &self.file else { return };
        let now = SystemTime::now();
        let saved = {
            let mut state = self.lock();
            let recent = state
                .saved_at
                .is_some_and(|at| now.duration_since(at).unwrap_or_default() < SAVE_EVERY);
            if recent && !force {
                return;
            }
            state.saved_at = Some(now);
            let mut minutes: Vec<(u64, u32, u32)> = Vec::new();
            for (at, n) in &state.sends.list {
                let minute = unix(*at) / 60 * 60;
                match minutes.last_mut() {
                    Some(last) if last.0 == minute => {
                        last.1 += 1;
                        last.2 = last.2.saturating_add(*n);
                    }
                    _ => minutes.push((minute, 1, *n)),
                }
            }
            Saved {
                minutes,
                paused_until: state.paused_until.map(unix),
                last_ms: state.sends.last().and_then(|at| {
                    at.duration_since(UNIX_EPOCH)
                        .ok()
                        .map(|d| d.as_millis() as u64)
                }),
            }
        };
        let tmp = file.with_extension("tmp");
        let written = serde_json::to_vec(&saved)
            .map_err(std::io::Error::other)
            .and_then(|data| std::fs::write(&tmp, data))
            .and_then(|()| std::fs::rename(&tmp, file));
        if let Err(e) = written {
            tracing::debug!(file = %file.display(), error = %e, "cannot save the pacing record");
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn until(at: SystemTime, now: SystemTime) -> Duration {
    at.duration_since(now)
        .unwrap_or_default()
        .max(Duration::from_millis(10))
}

fn unix(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn load(file: &std::path::Path) -> Option<Saved> {
    let data = std::fs::read(file).ok()?;
    serde_json::from_slice(&data).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_testkit::SharedDatabase;
    use std::sync::Arc;

    fn pacer(per_minute: u32, per_day: u32) -> Pacer {
        Pacer::new(
            Limits {
                messages_per_minute: per_minute,
                recipients_per_day: per_day,
                max_connections: 3,
            },
            None,
        )
    }

    #[test]
    fn messages_are_spaced_evenly() {
        let p = pacer(3, 10_000);
        let t0 = SystemTime::now();
        assert_eq!(p.try_admit(1, t0), None);
        let wait = p.try_admit(1, t0 + Duration::from_secs(5)).expect("paced");
        assert_eq!(wait, Duration::from_secs(15));
        assert_eq!(p.try_admit(1, t0 + Duration::from_secs(20)), None);
    }

    #[test]
    fn recipients_per_day() {
        let p = pacer(60_000, 10);
        let t0 = SystemTime::now();
        assert_eq!(p.try_admit(6, t0), None);
        assert_eq!(p.try_admit(4, t0 + Duration::from_secs(1)), None);
        let wait = p
            .try_admit(1, t0 + Duration::from_secs(3600))
            .expect("paced");
        assert_eq!(wait, DAY - Duration::from_secs(3600));
    }

    /// Workers waiting for the pace are admitted in the order they came:
    /// one that keeps coming back (a message retried often) cannot pass
    /// one that waits.
    #[tokio::test]
    async fn first_come_first_admitted() {
        let p = Arc::new(pacer(600, 10_000)); // one every 100 ms
        let shutdown = CancellationToken::new();
        assert!(p.admit(1, &shutdown).await);
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiting = Vec::new();
        for n in 0..4 {
            let (p, shutdown, order) = (p.clone(), shutdown.clone(), order.clone());
            waiting.push(tokio::spawn(async move {
                assert!(p.admit(1, &shutdown).await);
                order.lock().expect("lock").push(n);
            }));
            // each asks while the ones before still wait
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for w in waiting {
            tokio::time::timeout(Duration::from_secs(10), w)
                .await
                .expect("admitted")
                .expect("no panic");
        }
        assert_eq!(*order.lock().expect("lock"), [0, 1, 2, 3]);
    }

    #[tokio::test]
    async fn fewer_connections_after_432() {
        let p = pacer(30, 10_000);
        assert_eq!(p.connections(), 3);
        p.too_many_connections().await;
        assert_eq!(p.connections(), 2);
        p.too_many_connections().await;
        p.too_many_connections().await;
        assert_eq!(p.connections(), 1);
    }

    const SHARED_60: Limits = Limits {
        messages_per_minute: 60,
        recipients_per_day: 10_000,
        max_connections: 3,
    };

    /// One message asks the shared pace at `now`: `None` if admitted,
    /// otherwise how long it waits.
    async fn try_one(
        pacer: &Pacer,
        shared: &Shared,
        recipients: u32,
        now: SystemTime,
    ) -> Option<Duration> {
        let place = Place::join(&pacer.line, recipients);
        let wait = pacer
            .try_admit_shared(shared, now)
            .await
            .expect("the store answers");
        assert_eq!(wait.is_none(), place.admitted());
        wait
    }

    /// The worker whose turn it is admits those waiting behind it in one
    /// question to the store, in order, up to the first that must wait
    /// (here for the day's recipients); at 30 a minute, spaced two seconds
    /// apart, only itself.
    #[tokio::test]
    async fn the_line_is_admitted_at_once_in_order() {
        for database in SharedDatabase::all() {
            let name = database.name();
            let limits = Limits {
                messages_per_minute: 600_000,
                recipients_per_day: 5,
                max_connections: 3,
            };
            let shared = Shared::new(database.relay("a").await, "main", MINUTE);
            let pacer = Pacer::new(limits, None).sharing(Some(shared.clone()));
            let line = [2, 2, 2, 1].map(|n| Place::join(&pacer.line, n));
            let now = SystemTime::now();
            let wait = pacer.try_admit_shared(&shared, now).await;
            assert_eq!(wait.expect("the store answers"), None, "{name}");
            let admitted = line.each_ref().map(Place::admitted);
            assert_eq!(admitted, [true, true, false, false], "{name}");
            assert_eq!(
                pacer.lock().sends.list.len(),
                2,
                "{name}: both counted here"
            );
            drop(line);
            assert!(lock(&pacer.line).is_empty(), "{name}: every place left");

            let other = Shared::new(database.relay("b").await, "other", MINUTE);
            let slow = Pacer::new(SHARED_60, None).sharing(Some(other.clone()));
            let line = [1, 1].map(|n| Place::join(&slow.line, n));
            let wait = slow.try_admit_shared(&other, now).await;
            assert_eq!(wait.expect("the store answers"), None, "{name}");
            let admitted = line.each_ref().map(Place::admitted);
            assert_eq!(admitted, [true, false], "{name}: spaced apart");
        }
    }

    /// Two relays (two handles with their own ids on one database), each
    /// trying every 250 ms of a clock passed in for three minutes at 60 a
    /// minute: never more than 60 go out in any minute window, both send,
    /// and the pace is used.
    #[tokio::test]
    async fn two_relays_share_one_pace() {
        for database in SharedDatabase::all() {
            let relays = [database.relay("a").await, database.relay("b").await].map(|store| {
                let shared = Shared::new(store, "main", MINUTE);
                (
                    Pacer::new(SHARED_60, None).sharing(Some(shared.clone())),
                    shared,
                )
            });
            let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
            let mut sent: Vec<(Duration, usize)> = Vec::new();
            for step in 0..(3 * 60 * 4) {
                let t = Duration::from_millis(250 * step);
                for (n, (pacer, shared)) in relays.iter().enumerate() {
                    let wait = try_one(pacer, shared, 1, t0 + t).await;
                    if wait.is_none() {
                        sent.push((t, n));
                    }
                }
            }
            for (i, (start, _)) in sent.iter().enumerate() {
                let in_minute = sent[i..]
                    .iter()
                    .take_while(|(t, _)| *t < *start + MINUTE)
                    .count();
                assert!(in_minute <= 60, "{in_minute} in the minute from {start:?}");
            }
            for relay in 0..2 {
                let own = sent.iter().filter(|(_, n)| *n == relay).count();
                assert!(own >= 30, "relay {relay} sent {own} of {}", sent.len());
            }
            assert!(sent.len() >= 170, "only {} in three minutes", sent.len());
        }
    }

    /// Throttling one relay is told of holds back the other: after a's
    /// `432 4.3.2`, b gets one slot fewer of three; after a's pause, b's
    /// admissions wait until it ends.
    #[tokio::test]
    async fn throttling_holds_back_the_other_relay() {
        for database in SharedDatabase::all() {
            let name = database.name();
            let shared_a = Shared::new(database.relay("a").await, "main", MINUTE);
            let shared_b = Shared::new(database.relay("b").await, "main", MINUTE);
            let a = Pacer::new(SHARED_60, None).sharing(Some(shared_a));
            let b = Pacer::new(SHARED_60, None).sharing(Some(shared_b.clone()));
            a.too_many_connections().await;
            assert_eq!(b.connections(), 3, "{name}: b parks none of its own");
            let shutdown = CancellationToken::new();
            let mut held = Vec::new();
            for _ in 0..2 {
                let slot =
                    tokio::time::timeout(Duration::from_secs(10), shared_b.acquire(3, &shutdown));
                held.push(slot.await.expect("a free slot").expect("not shut down"));
            }
            let third =
                tokio::time::timeout(Duration::from_secs(2), shared_b.acquire(3, &shutdown));
            assert!(
                third.await.is_err(),
                "{name}: a third slot during the window"
            );
            for slot in held {
                slot.release().await;
            }

            let now = SystemTime::now();
            assert_eq!(try_one(&b, &shared_b, 1, now).await, None, "{name}");
            a.pause(Some(Duration::from_secs(600))).await;
            let wait = try_one(&b, &shared_b, 1, now + Duration::from_secs(5))
                .await
                .expect("paused");
            assert!(
                wait > Duration::from_secs(500) && wait <= Duration::from_secs(600),
                "{name}: waits {wait:?}"
            );
        }
    }

    /// The database gone: nothing is admitted (it waits and retries), and
    /// shutdown still ends the wait; a throttle still applies to this relay.
    #[tokio::test]
    async fn no_admission_without_the_store() {
        let Some(pg) = relay_testkit::Postgres::start() else {
            return;
        };
        let database = SharedDatabase::Postgres(pg);
        let store = database.relay("a").await;
        let pacer =
            Arc::new(Pacer::new(SHARED_60, None).sharing(Some(Shared::new(store, "main", MINUTE))));
        drop(database); // stops the server
        let shutdown = CancellationToken::new();
        let admitting = tokio::spawn({
            let (pacer, shutdown) = (pacer.clone(), shutdown.clone());
            async move { pacer.admit(1, &shutdown).await }
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!admitting.is_finished(), "admitted without the store");
        shutdown.cancel();
        let admitted = tokio::time::timeout(Duration::from_secs(10), admitting)
            .await
            .expect("shutdown ends the wait")
            .expect("no panic");
        assert!(!admitted);
        assert!(pacer.lock().sends.list.is_empty(), "nothing counted");
        // Throttled meanwhile: this relay still reacts alone.
        pacer.too_many_connections().await;
        assert_eq!(pacer.connections(), 2);
        pacer.pause(None).await;
        assert!(pacer.lock().paused_until.is_some(), "paused here");
    }

    #[test]
    fn record_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("main.json");
        let limits = Limits {
            messages_per_minute: 2,
            recipients_per_day: 100,
            max_connections: 3,
        };
        let first = Pacer::new(limits, Some(file.clone()));
        assert_eq!(first.try_admit(1, SystemTime::now()), None);
        first.save(true);
        let second = Pacer::new(limits, Some(file));
        assert!(
            second.try_admit(1, SystemTime::now()).is_some(),
            "a restart reset the pace"
        );
    }
}

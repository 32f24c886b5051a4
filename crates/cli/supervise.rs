//! Supervision of the relay's long-running tasks. Each is expected to run
//! until it is told to stop; one that ends on its own (a panic, or an early
//! return) is a failure of the whole relay: `run` stops and exits non-zero,
//! so systemd restarts it instead of leaving it half alive (answering `250`
//! while nothing delivers or renews tokens).

use std::{future::Future, time::Duration};
use tokio::task::{JoinError, JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

/// How long the background tasks get to finish at shutdown.
const BACKGROUND_GRACE: Duration = Duration::from_secs(2);

/// The relay's tasks, except the delivery workers (restarted on reload,
/// so their set lives with the delivery and is passed in).
#[derive(Default)]
pub struct Tasks {
    listener: JoinSet<()>,
    background: JoinSet<()>,
    /// Tasks spawned by another crate, each wrapped to say how it ended.
    watched: JoinSet<Ended>,
}

/// How a watched task ended.
#[derive(Debug)]
enum Ended {
    /// It was told to stop.
    Stopped,
    /// On its own.
    Unexpectedly(String),
}

impl Tasks {
    /// The SMTP listener (it gets the full grace period at shutdown).
    pub fn spawn_listener(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.listener.spawn(task);
    }

    /// A background task (admin endpoint, queue control, status updates).
    pub fn spawn_background(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.background.spawn(task);
    }

    /// Supervises `task`, spawned elsewhere, which should end only once
    /// `stop` is cancelled.
    pub fn watch(&mut self, what: String, stop: CancellationToken, task: JoinHandle<()>) {
        self.watched.spawn(async move {
            match task.await {
                Ok(()) if stop.is_cancelled() => Ended::Stopped,
                result => Ended::Unexpectedly(ended(&what, result.err()).to_string()),
            }
        });
    }

    /// Waits until a task ends without being told to, and says which. The
    /// delivery `workers` count only while `workers_stopping` is false.
    /// Cancel safe: a task not yet joined stays in its set.
    pub async fn failure(
        &mut self,
        workers: &mut JoinSet<()>,
        workers_stopping: bool,
    ) -> anyhow::Error {
        loop {
            tokio::select! {
                Some(result) = self.listener.join_next() => {
                    return ended("the SMTP listener", result.err());
                }
                Some(result) = self.background.join_next() => {
                    return ended("a background task (admin endpoint, queue control, status)", result.err());
                }
                Some(result) = workers.join_next(), if !workers_stopping => {
                    return ended("a delivery worker", result.err());
                }
                Some(result) = self.watched.join_next() => match result {
                    Ok(Ended::Stopped) => continue,
                    Ok(Ended::Unexpectedly(why)) => return anyhow::anyhow!(why),
                    Err(e) => return ended("a supervised task", Some(e)),
                },
                else => return anyhow::anyhow!("no task left running"),
            }
        }
    }

    /// Gives the listener `grace` to finish its sessions, then aborts
    /// them. Call after cancelling its token.
    pub async fn stop_listener(&mut self, grace: Duration) {
        if !drain(&mut self.listener, grace).await {
            tracing::warn!("SMTP sessions still open after the grace period; closing them");
        }
    }

    /// Gives the other tasks a moment to finish, then aborts them. Call
    /// after cancelling their tokens.
    pub async fn stop(&mut self) {
        drain(&mut self.background, BACKGROUND_GRACE).await;
        drain(&mut self.watched, BACKGROUND_GRACE).await;
    }
}

/// Joins every task of `set` within `grace`, aborting what is left after
/// it; whether all ended in time. Cancel safe: what is not joined stays in
/// the set.
pub async fn drain<T: 'static>(set: &mut JoinSet<T>, grace: Duration) -> bool {
    let joined =
        tokio::time::timeout(grace, async { while set.join_next().await.is_some() {} }).await;
    if joined.is_err() {
        set.abort_all();
    }
    joined.is_ok()
}

/// The error of a task that ended on its own.
fn ended(what: &str, error: Option<JoinError>) -> anyhow::Error {
    match error {
        Some(e) if e.is_panic() => anyhow::anyhow!("{what} panicked: {}", panic_message(e)),
        Some(e) => anyhow::anyhow!("{what} ended: {e}"),
        None => anyhow::anyhow!("{what} ended unexpectedly"),
    }
}

fn panic_message(e: JoinError) -> String {
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn failure_within(tasks: &mut Tasks, workers: &mut JoinSet<()>) -> Option<String> {
        tokio::time::timeout(Duration::from_secs(5), tasks.failure(workers, false))
            .await
            .ok()
            .map(|e| e.to_string())
    }

    #[tokio::test]
    async fn a_panicking_task_is_a_failure() {
        let mut tasks = Tasks::default();
        tasks.spawn_listener(std::future::pending());
        let stop = CancellationToken::new();
        tasks.watch(
            "token renewal of account \"main\"".into(),
            stop,
            tokio::spawn(async { panic!("overflow when adding duration to instant") }),
        );
        let failure = failure_within(&mut tasks, &mut JoinSet::new()).await;
        assert_eq!(
            failure.as_deref(),
            Some("token renewal of account \"main\" panicked: overflow when adding duration to instant")
        );
    }

    #[tokio::test]
    async fn a_task_told_to_stop_is_not_a_failure() {
        let mut tasks = Tasks::default();
        tasks.spawn_listener(std::future::pending());
        let stop = CancellationToken::new();
        stop.cancel();
        tasks.watch("renewal".into(), stop, tokio::spawn(async {}));
        let mut workers = JoinSet::new();
        workers.spawn(async {});
        // the worker ending while delivery is being stopped is expected too
        let quiet = tokio::time::timeout(
            Duration::from_millis(300),
            tasks.failure(&mut workers, true),
        )
        .await;
        assert!(
            quiet.is_err(),
            "reported {:?}",
            quiet.map(|e| e.to_string())
        );
        // but a worker ending on its own is not
        workers.spawn(async {});
        assert_eq!(
            failure_within(&mut tasks, &mut workers).await.as_deref(),
            Some("a delivery worker ended unexpectedly")
        );
    }

    #[tokio::test]
    async fn the_listener_ending_is_a_failure() {
        let mut tasks = Tasks::default();
        tasks.spawn_listener(async {});
        assert_eq!(
            failure_within(&mut tasks, &mut JoinSet::new())
                .await
                .as_deref(),
            Some("the SMTP listener ended unexpectedly")
        );
    }
}

//! The embedded store's connections, held by the store rather than in
//! sqlx's pool. The pool pings every connection given back to it before it
//! hands it out again: on SQLite one more round trip to the connection's
//! thread per use, with the one writer not free meanwhile, and a file on
//! the local disk has no far end to lose.
//!
//! [`Lanes`] of at most `max` connections: the writer's has one, which
//! writers take in turn (the semaphore is fair: woken in order, rather
//! than in SQLite's busy handler, which sleeps 1, 2, 5, 10 … ms between
//! tries at the file's lock); the readers' several. A connection is opened
//! when first needed, and one whose transaction state was lost is replaced:
//! a COMMIT that failed (disk full) can end SQLite's transaction by
//! itself, the ROLLBACK sqlx then sends fails too, and the connection
//! counts a transaction that is gone, so every later BEGIN on it would
//! fail. One unused for a minute is closed, with its thread and page
//! cache, so a burst's extra readers do not stay.
//!
//! Cancel safety: a future dropped while it holds a connection gives it
//! back as it is. sqlx has queued the rollback of a transaction left open
//! ahead of anything the next holder sends; a connection still counting
//! one when it is next taken is replaced, not used.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::Connection as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a connection may stay unused before it is closed (with it its
/// thread and its page cache, kept after a burst otherwise).
const IDLE: Duration = Duration::from_secs(60);

/// Connections to one SQLite file, at most `max` in use at once.
pub(crate) struct Lanes {
    options: SqliteConnectOptions,
    /// Given back, with when: the last given back is taken first, so the
    /// ones a quieter load no longer needs age and are closed.
    free: Mutex<Vec<(SqliteConnection, Instant)>>,
    turns: Arc<Semaphore>,
    /// How long a taker waits for a turn before it fails.
    wait: Duration,
}

impl std::fmt::Debug for Lanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lanes")
            .field("turns_free", &self.turns.available_permits())
            .field("wait", &self.wait)
            .finish_non_exhaustive()
    }
}

impl Lanes {
    pub(crate) fn new(options: SqliteConnectOptions, max: usize, wait: Duration) -> Lanes {
        Lanes {
            options,
            free: Mutex::new(Vec::new()),
            turns: Arc::new(Semaphore::new(max)),
            wait,
        }
    }

    /// A connection of its own until the [`Taken`] is dropped, after
    /// waiting at most `wait` for a turn ([`sqlx::Error::PoolTimedOut`]).
    /// The `Taken` owns what it holds (no borrow of the lanes), so that
    /// futures holding it stay `Send` wherever they are spawned.
    pub(crate) async fn take(self: &Arc<Self>) -> Result<Taken, sqlx::Error> {
        let turn = tokio::time::timeout(self.wait, self.turns.clone().acquire_owned())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let kept = {
            let mut free = self.lock();
            close_idle(&mut free, Instant::now());
            free.pop()
        };
        let conn = match kept {
            Some((conn, _)) if !conn.is_in_transaction() => conn,
            _ => SqliteConnection::connect_with(&self.options).await?,
        };
        Ok(Taken {
            lanes: self.clone(),
            conn: Some(conn),
            _turn: turn,
        })
    }

    /// Refuses new takers and closes the connections not taken.
    #[cfg(test)]
    pub(crate) async fn close(&self) {
        self.turns.close();
        let free = std::mem::take(&mut *self.lock());
        for (conn, _) in free {
            let _ = conn.close().await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(SqliteConnection, Instant)>> {
        self.free
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes back a connection at `now`.
    fn give_back(&self, conn: SqliteConnection, now: Instant) {
        let mut free = self.lock();
        free.push((conn, now));
        close_idle(&mut free, now);
    }
}

/// Drops (closes) the connections unused for [`IDLE`] at `now`: the
/// oldest given back, at the bottom.
fn close_idle(free: &mut Vec<(SqliteConnection, Instant)>, now: Instant) {
    let stale = free
        .iter()
        .take_while(|(_, at)| now.saturating_duration_since(*at) >= IDLE)
        .count();
    free.drain(..stale);
}

/// A connection taken from [`Lanes`]; given back when dropped.
pub(crate) struct Taken {
    lanes: Arc<Lanes>,
    conn: Option<SqliteConnection>,
    _turn: OwnedSemaphorePermit,
}

impl Deref for Taken {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        self.conn.as_ref().expect("held until dropped")
    }
}

impl DerefMut for Taken {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.conn.as_mut().expect("held until dropped")
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.lanes.give_back(conn, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lanes(dir: &std::path::Path, max: usize, wait: Duration) -> Arc<Lanes> {
        let options = SqliteConnectOptions::new()
            .filename(dir.join("lanes.sqlite"))
            .create_if_missing(true);
        Arc::new(Lanes::new(options, max, wait))
    }

    // A connection left counting a transaction that is gone (as after a
    // COMMIT that failed on a full disk) is not handed out again.
    #[tokio::test]
    async fn a_connection_whose_transaction_was_lost_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lanes = lanes(dir.path(), 1, Duration::from_secs(5));
        {
            let mut taken = lanes.take().await.expect("a connection");
            // never rolled back: sqlx keeps counting it
            std::mem::forget(taken.begin().await.expect("begin"));
            assert!(taken.is_in_transaction());
        }
        let mut taken = lanes.take().await.expect("another connection");
        assert!(!taken.is_in_transaction());
        let tx = taken.begin().await.expect("a transaction begins");
        tx.commit().await.expect("commit");
    }

    // After a burst, the connections a quieter load does not use are closed
    // once idle; the one in use stays.
    #[tokio::test]
    async fn idle_connections_are_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lanes = lanes(dir.path(), 3, Duration::from_secs(5));
        let burst = [
            lanes.take().await.expect("one"),
            lanes.take().await.expect("two"),
            lanes.take().await.expect("three"),
        ];
        drop(burst);
        assert_eq!(lanes.lock().len(), 3);
        let taken = lanes.take().await.expect("the last given back");
        lanes.give_back(
            SqliteConnection::connect_with(&lanes.options)
                .await
                .expect("a connection"),
            Instant::now() + IDLE,
        );
        assert_eq!(lanes.lock().len(), 1, "the two left unused are closed");
        drop(taken);
        assert_eq!(lanes.lock().len(), 2);
    }

    // One at a time on a lane of one; a taker that waits too long is told.
    #[tokio::test]
    async fn takers_wait_their_turn_within_the_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lanes = lanes(dir.path(), 1, Duration::from_millis(50));
        let first = lanes.take().await.expect("a connection");
        assert!(matches!(
            lanes.take().await.err(),
            Some(sqlx::Error::PoolTimedOut)
        ));
        drop(first);
        drop(lanes.take().await.expect("its turn once the first is back"));
        lanes.close().await;
        assert!(matches!(
            lanes.take().await.err(),
            Some(sqlx::Error::PoolClosed)
        ));
    }
}

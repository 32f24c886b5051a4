//! Admin commands from another process while the relay runs.
//!
//! The running relay holds the queue's lock, so `queue retry`, `delete`,
//! `hold` and `release` cannot open the queue themselves. They write a request file into
//! `DIR/control/` (write to a temporary name, then rename) and wait for the
//! answer file; the relay polls that directory and applies each request to
//! its live queue. Who may ask is decided by the queue directory's
//! permissions, like Postfix's `maildrop`. When no relay runs, the command
//! opens the queue and applies the request itself ([`submit`] does both).

use crate::{Queue, QueueError, QueueId, QueueSettings, Selection};
use serde::{Deserialize, Serialize};
use std::{path::Path, time::Duration};
use tokio_util::sync::CancellationToken;

const POLL: Duration = Duration::from_millis(200);
/// How long a command waits for the running relay to answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(15);

/// An administrator's request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Make messages due now (failed ones are revived).
    Retry(Selection),
    /// Remove messages.
    Delete(Selection),
    /// Keep messages from being delivered until released.
    Hold(Selection),
    /// Release held messages.
    Release(Selection),
}

/// What a request did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The messages it applied to (for a deletion: those removed before
    /// anything of them was sent).
    pub ids: Vec<QueueId>,
    /// What else the administrator should know, one line each (a message
    /// that was being delivered when deleted, and how that ended).
    #[serde(default)]
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    #[serde(flatten)]
    applied: Applied,
    error: Option<String>,
}

impl Queue {
    /// Applies `request` to this queue.
    pub async fn apply(&self, request: Request) -> Result<Applied, QueueError> {
        match request {
            Request::Retry(which) => Ok(Applied {
                ids: self.retry(which).await?,
                notes: Vec::new(),
            }),
            Request::Hold(which) => Ok(Applied {
                ids: self.hold(which).await?,
                notes: Vec::new(),
            }),
            Request::Release(which) => Ok(Applied {
                ids: self.release_held(which).await?,
                notes: Vec::new(),
            }),
            Request::Delete(which) => {
                let deletion = self.delete(which).await?;
                Ok(Applied {
                    ids: deletion.deleted,
                    notes: deletion
                        .in_flight
                        .into_iter()
                        .map(|(id, how)| format!("{id} was being delivered: {how}"))
                        .collect(),
                })
            }
        }
    }

    /// Answers requests dropped into `DIR/control/` until `shutdown`.
    pub async fn serve_control(self, shutdown: CancellationToken) {
        let dir = self.settings().dir.join(crate::store::CONTROL_DIR);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
            let Ok(mut entries) = tokio::fs::read_dir(&dir).await else {
                continue;
            };
            while let Ok(Some(entry)) = entries.next_entry().await {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "req") {
                    self.answer(&path).await;
                }
            }
        }
    }

    async fn answer(&self, path: &Path) {
        let answer = match tokio::fs::read(path)
            .await
            .map(|d| serde_json::from_slice::<Request>(&d))
        {
            Ok(Ok(request)) => {
                tracing::info!(?request, "admin request");
                match self.apply(request).await {
                    Ok(applied) => Answer {
                        applied,
                        error: None,
                    },
                    Err(e) => Answer {
                        applied: Applied::default(),
                        error: Some(e.to_string()),
                    },
                }
            }
            Ok(Err(e)) => Answer {
                applied: Applied::default(),
                error: Some(format!("unreadable request: {e}")),
            },
            Err(_) => return, // taken back by its sender
        };
        let _ = tokio::fs::remove_file(path).await;
        let Ok(data) = serde_json::to_vec(&answer) else {
            return;
        };
        let done = path.with_extension("res");
        let tmp = path.with_extension("res.tmp");
        if tokio::fs::write(&tmp, data).await.is_ok() {
            let _ = tokio::fs::rename(&tmp, &done).await;
        }
    }
}

/// Applies `request` to the queue in `settings.dir`: directly when no relay
/// runs, otherwise through the running relay.
pub async fn submit(settings: QueueSettings, request: Request) -> Result<Applied, QueueError> {
    let dir = settings.dir.clone();
    match Queue::open(settings).await {
        Ok(queue) => queue.apply(request).await,
        Err(QueueError::Locked { .. }) => ask_running_relay(&dir, &request).await,
        Err(e) => Err(e),
    }
}

async fn ask_running_relay(dir: &Path, request: &Request) -> Result<Applied, QueueError> {
    let control = dir.join(crate::store::CONTROL_DIR);
    let name = format!("{}-{:016x}", std::process::id(), rand::random::<u64>());
    let tmp = control.join(format!("{name}.tmp"));
    let req = control.join(format!("{name}.req"));
    let res = control.join(format!("{name}.res"));
    let data = serde_json::to_vec(request).map_err(|source| QueueError::Encode {
        path: req.clone(),
        source,
    })?;
    tokio::fs::write(&tmp, data)
        .await
        .map_err(|e| QueueError::io("writing an admin request", &tmp, e))?;
    tokio::fs::rename(&tmp, &req)
        .await
        .map_err(|e| QueueError::io("submitting an admin request", &req, e))?;
    let deadline = tokio::time::Instant::now() + ANSWER_WITHIN;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(POLL / 2).await;
        let Ok(data) = tokio::fs::read(&res).await else {
            continue;
        };
        let _ = tokio::fs::remove_file(&res).await;
        let answer: Answer = serde_json::from_slice(&data)
            .map_err(|e| QueueError::corrupt(&res, format!("unreadable answer: {e}")))?;
        return match answer.error {
            None => Ok(answer.applied),
            Some(error) => Err(QueueError::Invalid {
                path: dir.to_owned(),
                reason: format!("the running relay refused: {error}"),
            }),
        };
    }
    let _ = tokio::fs::remove_file(&req).await;
    Err(QueueError::Invalid {
        path: dir.to_owned(),
        reason: format!(
            "the running relay did not answer within {} s",
            ANSWER_WITHIN.as_secs()
        ),
    })
}

//! `send-test`: sends a short test message through the running relay's
//! whole path (listener → queue → delivery) and waits for the outcome.

use anyhow::{bail, Context};
use relay_queue::{QueueError, QueueId, State};
use std::{path::Path, time::Duration};

/// How long to wait for the delivery.
const WAIT: Duration = Duration::from_secs(120);

#[derive(clap::Args)]
pub struct SendTestArgs {
    /// The recipient.
    #[arg(long, value_name = "ADDR")]
    to: String,
    /// The envelope sender and From: (default: the account's mailbox).
    #[arg(long, value_name = "ADDR")]
    from: Option<String>,
    /// The account whose mailbox is the default sender.
    #[arg(long)]
    account: Option<String>,
}

pub async fn send_test(path: &Path, args: SendTestArgs) -> anyhow::Result<()> {
    let config = crate::check::load(path)?;
    let account = crate::authorize::pick_account(&config, args.account.as_deref(), None)?;
    let from = args.from.unwrap_or_else(|| account.mailbox.clone());
    let bind = *config
        .listener
        .bind
        .first()
        .context("listener.bind is empty")?;
    let message = format!(
        "From: {from}\r\nTo: {}\r\nSubject: smtp-oauth-relay test\r\n\r\nThis test message was sent by `smtp-oauth-relay send-test` through the relay.\r\n",
        args.to
    );
    let reply =
        crate::submit::submit(crate::submit::reachable(bind), &from, &args.to, &message).await?;
    println!("relay: {reply}");
    let id: QueueId = reply
        .rsplit(' ')
        .next()
        .and_then(|id| id.parse().ok())
        .with_context(|| format!("no queue id in {reply:?}"))?;
    let queue = crate::relay::open_admin(&config.queue).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut reported = None;
    while tokio::time::Instant::now() < deadline {
        match queue.entry(&id).await {
            // gone from the queue: every recipient delivered
            Err(QueueError::NoSuchMessage { .. }) => {
                println!("delivered: Microsoft 365 accepted the message");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
            Ok(entry) => {
                if entry.state == State::Failed {
                    bail!(
                        "failed: {}",
                        entry.last_error.unwrap_or_else(|| "(no reply)".into())
                    );
                }
                if entry.last_error != reported {
                    if let Some(error) = &entry.last_error {
                        println!("deferred (will be retried): {error}");
                    }
                    reported = entry.last_error;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!(
        "not delivered within {} s; `smtp-oauth-relay queue show {id}` shows where it is",
        WAIT.as_secs()
    )
}

//! `queue …`: look at and act on the queue, whether or not the relay runs.
//! Reads go straight to the queue directory; retry and delete go through
//! the running relay when there is one (see relay_queue::submit).

use anyhow::Context;
use clap::{Args, Subcommand};
use relay_queue::{Entry, QueueId, Request, Selection};
use std::path::Path;

#[derive(Subcommand)]
pub enum QueueCommand {
    /// List the messages in the queue: queued, deferred and failed.
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one message: envelope, each recipient's state and last reply, headers.
    Show {
        /// The queue id (from `queue list` or the 250 reply).
        id: QueueId,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Make messages due now; a failed message is tried again for its failed recipients.
    Retry(Which),
    /// Remove messages from the queue.
    Delete(Which),
}

/// One message, or a group of them.
#[derive(Args)]
#[group(required = true, multiple = false)]
pub struct Which {
    /// The queue id.
    id: Option<QueueId>,
    /// Every failed message.
    #[arg(long)]
    failed: bool,
    /// Every message.
    #[arg(long)]
    all: bool,
}

impl Which {
    fn selection(self) -> Selection {
        match (self.id, self.failed) {
            (Some(id), _) => Selection::Id(id),
            (None, true) => Selection::Failed,
            (None, false) => Selection::All,
        }
    }
}

pub async fn queue(config: &Path, command: QueueCommand) -> anyhow::Result<()> {
    let config = crate::check::load(config)?;
    let dir = &config.queue.dir;
    let settings = crate::relay::queue_settings(&config.queue);
    match command {
        QueueCommand::List { json } => {
            let entries = relay_queue::list(dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                print!("{}", table(&entries));
            }
        }
        QueueCommand::Show { id, json } => {
            let (entry, headers) =
                relay_queue::show(dir, &id).with_context(|| format!("message {id}"))?;
            if json {
                let mut value = serde_json::to_value(&entry)?;
                value["headers"] = String::from_utf8_lossy(&headers).into();
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", details(&entry, &headers));
            }
        }
        QueueCommand::Retry(which) => {
            let ids = relay_queue::submit(settings, Request::Retry(which.selection()))
                .await?
                .ids;
            println!("{} message(s) due now{}", ids.len(), id_list(&ids));
        }
        QueueCommand::Delete(which) => {
            let applied = relay_queue::submit(settings, Request::Delete(which.selection())).await?;
            println!(
                "{} message(s) deleted{}",
                applied.ids.len(),
                id_list(&applied.ids)
            );
            for note in applied.notes {
                println!("{note}");
            }
        }
    }
    Ok(())
}

fn id_list(ids: &[QueueId]) -> String {
    if ids.is_empty() {
        String::new()
    } else {
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        format!(": {}", ids.join(" "))
    }
}

fn state_name<T: serde::Serialize>(state: T) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn sender(e: &Entry) -> &str {
    if e.sender.is_empty() {
        "<>"
    } else {
        &e.sender
    }
}

fn table(entries: &[Entry]) -> String {
    if entries.is_empty() {
        return "The queue is empty.\n".into();
    }
    let mut out = format!(
        "{:<16}  {:<8}  {:>8}  {:<20}  {:<30}  {}\n",
        "ID", "STATE", "ATTEMPTS", "NEXT ATTEMPT", "SENDER", "RECIPIENTS / LAST ERROR"
    );
    for e in entries {
        out.push_str(&format!(
            "{:<16}  {:<8}  {:>8}  {:<20}  {:<30}  {}\n",
            e.id,
            state_name(e.state),
            e.attempts,
            e.next_attempt.as_deref().unwrap_or("-"),
            sender(e),
            e.recipients.join(", ")
        ));
        if let Some(error) = &e.last_error {
            out.push_str(&format!("{:<16}  {error}\n", ""));
        }
    }
    out.push_str(&format!("{} message(s)\n", entries.len()));
    out
}

fn details(e: &Entry, headers: &[u8]) -> String {
    let mut out = format!(
        "Queue ID:    {}\nState:       {} after {} attempt(s){}\nAccount:     {}\nSender:      {}\nReceived:    {}\nSize:        {} bytes\nRecipients:\n",
        e.id,
        state_name(e.state),
        e.attempts,
        e.next_attempt
            .as_deref()
            .map(|t| format!(", next at {t}"))
            .unwrap_or_default(),
        e.account,
        sender(e),
        e.received_at,
        e.size
    );
    for r in &e.recipient_status {
        out.push_str(&format!(
            "  {:<32} {:<9} {}\n",
            r.address,
            state_name(r.status),
            r.reply.as_deref().unwrap_or("")
        ));
    }
    if let Some(error) = &e.last_error {
        out.push_str(&format!("Last error:  {error}\n"));
    }
    out.push_str("Headers:\n");
    for line in String::from_utf8_lossy(headers).lines() {
        out.push_str(&format!("  {line}\n"));
    }
    out
}

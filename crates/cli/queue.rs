//! `queue …`: look at the queue directory, from outside the running relay.

use clap::Subcommand;
use relay_queue::Entry;
use std::path::Path;

#[derive(Subcommand)]
pub enum QueueCommand {
    /// List the messages in the queue: queued, deferred and failed.
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub fn queue(config: &Path, command: QueueCommand) -> anyhow::Result<()> {
    let config = crate::check::load(config)?;
    match command {
        QueueCommand::List { json } => {
            let entries = relay_queue::list(&config.queue.dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                print!("{}", table(&entries));
            }
        }
    }
    Ok(())
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
        let state = serde_json::to_value(e.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        out.push_str(&format!(
            "{:<16}  {:<8}  {:>8}  {:<20}  {:<30}  {}\n",
            e.id,
            state,
            e.attempts,
            e.next_attempt.as_deref().unwrap_or("-"),
            if e.sender.is_empty() { "<>" } else { &e.sender },
            e.recipients.join(", ")
        ));
        if let Some(error) = &e.last_error {
            out.push_str(&format!("{:<16}  {error}\n", ""));
        }
    }
    out.push_str(&format!("{} message(s)\n", entries.len()));
    out
}

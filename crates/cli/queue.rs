//! `queue …`: look at and act on the queue, whether or not the relay runs:
//! straight on its store (the SQLite file in the queue directory, which
//! the running relay shares, or the PostgreSQL database of every relay).
//! The running relays see the result: a held or deleted message is not
//! sent, a retried one is picked up within a second.

use anyhow::Context;
use clap::{Args, Subcommand};
use relay_queue::{Entry, Queue, QueueError, QueueId, Request, Selection, Unusable};
use serde::ser::{SerializeSeq, Serializer as _};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

#[derive(Subcommand)]
pub enum QueueCommand {
    /// List the messages in the queue: queued, deferred, failed, held, and
    /// entries set aside as corrupt.
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
        #[arg(long, conflicts_with = "body")]
        json: bool,
        /// Print the message itself, as received (like `postcat -q`).
        #[arg(long)]
        body: bool,
    },
    /// Make messages due now; a failed message is tried again for its failed recipients.
    Retry(Which),
    /// Remove messages from the queue.
    Delete(Which),
    /// Keep messages from being delivered until released (like `postsuper -h`).
    Hold(Held),
    /// Release held messages (like `postsuper -H`).
    Release(Held),
}

/// One message, or all of them.
#[derive(Args)]
#[group(required = true, multiple = false)]
pub struct Held {
    /// The queue id.
    id: Option<QueueId>,
    /// Every message.
    #[arg(long)]
    all: bool,
}

impl Held {
    fn selection(self) -> Selection {
        match self.id {
            Some(id) => Selection::Id(id),
            None => Selection::All,
        }
    }
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
    let q = &config.queue;
    if q.database_url.is_none() && !q.dir.exists() {
        // before the first run there is no queue: an empty one, left uncreated
        return never_created(command);
    }
    let queue = crate::relay::open_admin(q).await?;
    match command {
        QueueCommand::List { json } => match list(&queue, json).await {
            // piped into `head`, say: the reader has seen enough
            Err(e) if closed_pipe(&e) => {}
            listed => listed?,
        },
        QueueCommand::Show { id, body: true, .. } => {
            let body = queue.body(&id).await?;
            std::io::stdout()
                .lock()
                .write_all(&body)
                .context("printing the message")?;
        }
        QueueCommand::Show { id, json, .. } => {
            let (entry, headers) = queue.show(&id).await?;
            if json {
                let mut value = serde_json::to_value(&entry)?;
                value["headers"] = String::from_utf8_lossy(&headers).into();
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", details(&entry, &headers));
            }
        }
        QueueCommand::Retry(which) => {
            act(&queue, which.selection(), Request::Retry, "due now").await?
        }
        QueueCommand::Hold(which) => act(&queue, which.selection(), Request::Hold, "held").await?,
        QueueCommand::Release(which) => {
            act(&queue, which.selection(), Request::Release, "released").await?
        }
        QueueCommand::Delete(which) => {
            let which = which.selection();
            let applied = queue.apply(Request::Delete(which.clone())).await?;
            known(&which, &applied.ids, &applied.notes)?;
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

/// `queue list`: the table (or JSON array) written as the store's pages
/// come, so that listing a large queue holds one page, not the queue.
async fn list(queue: &Queue, json: bool) -> anyhow::Result<()> {
    let unusable = queue.unusable();
    for bad in &unusable {
        eprintln!("warning: {}", unusable_note(bad));
    }
    let out = std::io::BufWriter::new(std::io::stdout());
    let mut listing = queue.listing();
    if json {
        let mut json = serde_json::Serializer::pretty(out);
        let mut array = json.serialize_seq(None)?;
        while let Some(page) = listing.next().await? {
            for entry in &page {
                array.serialize_element(entry)?;
            }
        }
        array.end()?;
        let mut out = json.into_inner();
        writeln!(out)?;
        out.flush()?;
    } else {
        let mut table = Table::new(out, SystemTime::now());
        while let Some(page) = listing.next().await? {
            table.rows(&page)?;
        }
        table.finish(&unusable)?;
    }
    Ok(())
}

/// Whether `e` is a write to standard output whose reader has gone.
fn closed_pipe(e: &anyhow::Error) -> bool {
    let kind = match (
        e.downcast_ref::<std::io::Error>(),
        e.downcast_ref::<serde_json::Error>(),
    ) {
        (Some(io), _) => Some(io.kind()),
        (None, Some(json)) => json.io_error_kind(),
        (None, None) => None,
    };
    kind == Some(std::io::ErrorKind::BrokenPipe)
}

/// What each verb says of a queue that does not exist yet.
fn never_created(command: QueueCommand) -> anyhow::Result<()> {
    let which = match command {
        QueueCommand::List { json: true } => {
            println!("[]");
            return Ok(());
        }
        QueueCommand::List { json: false } => {
            Table::new(std::io::stdout(), SystemTime::now()).finish(&[])?;
            return Ok(());
        }
        QueueCommand::Show { id, .. } => Selection::Id(id),
        QueueCommand::Retry(which) | QueueCommand::Delete(which) => which.selection(),
        QueueCommand::Hold(which) | QueueCommand::Release(which) => which.selection(),
    };
    known(&which, &[], &[])?;
    println!("0 message(s)");
    Ok(())
}

/// Applies `request` to `which` and says to how many messages it was done.
async fn act(
    queue: &Queue,
    which: Selection,
    request: fn(Selection) -> Request,
    done: &str,
) -> anyhow::Result<()> {
    let ids = queue.apply(request(which.clone())).await?.ids;
    known(&which, &ids, &[])?;
    println!("{} message(s) {done}{}", ids.len(), id_list(&ids));
    Ok(())
}

/// "no such message: ID" when one message was asked for and nothing
/// happened to it. (Holding a held message, or releasing one that is not
/// held, reports it as affected, so this means the id is not queued.)
fn known(which: &Selection, ids: &[QueueId], notes: &[String]) -> anyhow::Result<()> {
    match which {
        Selection::Id(id) if ids.is_empty() && notes.is_empty() => {
            Err(QueueError::NoSuchMessage { id: id.clone() }.into())
        }
        _ => Ok(()),
    }
}

fn unusable_note(bad: &Unusable) -> String {
    format!(
        "queue entry {} is corrupt (set aside, not delivered): {}",
        bad.id, bad.reason
    )
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

/// `queue list`'s table, written as the pages come: a header before the
/// first row, a row (and its notes) per message, then the entries set
/// aside and the counts.
struct Table<W> {
    out: W,
    now: SystemTime,
    rows: usize,
}

impl<W: Write> Table<W> {
    fn new(out: W, now: SystemTime) -> Self {
        Table { out, now, rows: 0 }
    }

    fn header(&mut self) -> std::io::Result<()> {
        writeln!(
            self.out,
            "{:<16}  {:<8}  {:>9}  {:>6}  {:>8}  {:<20}  {:<30}  RECIPIENTS / LAST ERROR",
            "ID", "STATE", "SIZE", "AGE", "ATTEMPTS", "NEXT ATTEMPT", "SENDER"
        )
    }

    fn rows(&mut self, entries: &[Entry]) -> std::io::Result<()> {
        for e in entries {
            if self.rows == 0 {
                self.header()?;
            }
            self.rows += 1;
            let state = if e.held {
                "held".to_owned()
            } else {
                state_name(e.state)
            };
            writeln!(
                self.out,
                "{:<16}  {:<8}  {:>9}  {:>6}  {:>8}  {:<20}  {:<30}  {}",
                e.id,
                state,
                e.size,
                age(&e.received_at, self.now),
                e.attempts,
                e.next_attempt.as_deref().unwrap_or("-"),
                sender(e),
                e.recipients.join(", ")
            )?;
            if let Some(error) = &e.last_error {
                writeln!(self.out, "{:<16}  {error}", "")?;
            }
            if let Some(relay) = &e.lease {
                writeln!(self.out, "{:<16}  being delivered by relay {relay}", "")?;
            }
        }
        Ok(())
    }

    fn finish(mut self, unusable: &[Unusable]) -> std::io::Result<()> {
        if self.rows == 0 && unusable.is_empty() {
            writeln!(self.out, "The queue is empty.")?;
            return self.out.flush();
        }
        if self.rows == 0 {
            self.header()?;
        }
        for bad in unusable {
            writeln!(self.out, "{:<16}  {:<8}  {}", bad.id, "corrupt", bad.reason)?;
        }
        writeln!(self.out, "{} message(s)", self.rows)?;
        if !unusable.is_empty() {
            writeln!(self.out, "{} corrupt entry(ies)", unusable.len())?;
        }
        self.out.flush()
    }
}

/// How long ago `received_at` (RFC 3339) was, in its largest unit: `42s`,
/// `5m`, `3h`, `2d`.
fn age(received_at: &str, now: SystemTime) -> String {
    let Ok(at) = humantime::parse_rfc3339(received_at) else {
        return "-".into();
    };
    let secs = now.duration_since(at).unwrap_or(Duration::ZERO).as_secs();
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

fn details(e: &Entry, headers: &[u8]) -> String {
    let mut out = format!(
        "Queue ID:    {}\nState:       {}{} after {} attempt(s){}\nAccount:     {}\nSender:      {}\nReceived:    {}\nSize:        {} bytes\nRecipients:\n",
        e.id,
        state_name(e.state),
        if e.held { ", held" } else { "" },
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
    if let Some(relay) = &e.lease {
        out.push_str(&format!("Leased by:   relay {relay} (being delivered)\n"));
    }
    out.push_str("Headers:\n");
    for line in String::from_utf8_lossy(headers).lines() {
        out.push_str(&format!("  {line}\n"));
    }
    out
}

//! The metadata file format (`meta/ID.json`) and the read-only listing.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use relay_outcome::{Outcome, Reason, Reply};
use serde::{Deserialize, Serialize};

use crate::{QueueError, QueueId};

/// Version written into every metadata file; files with another version are
/// treated as corrupt (set aside, never deleted).
pub(crate) const META_VERSION: u32 = 1;

/// The state of a queued message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Accepted, never tried yet.
    Queued,
    /// Tried at least once; some recipients are waiting for a retry.
    Deferred,
    /// Final: no recipient left to try and at least one failed. Kept on disk
    /// (and listed) until an administrator deletes it; never retried.
    Failed,
}

/// The delivery state of one recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecipientState {
    /// Not tried yet.
    Pending,
    /// Accepted by the upstream server; never tried again.
    Delivered,
    /// Temporarily refused; will be tried again.
    Deferred,
    /// Permanently refused, or given up on after `max_age`.
    Failed,
}

impl RecipientState {
    /// Whether a recipient in this state is still to be tried.
    pub fn is_open(self) -> bool {
        matches!(self, RecipientState::Pending | RecipientState::Deferred)
    }
}

/// One recipient of a queued message and how far its delivery got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientStatus {
    /// The envelope recipient address, as given to the queue.
    pub address: String,
    /// Its delivery state.
    pub status: RecipientState,
    /// The last reply the upstream gave for it (its full text), if any.
    pub reply: Option<String>,
}

/// A recipient as stored in `meta/ID.json`: the reply kept structured, with
/// the reason it was given. Files written before the reason was stored
/// hold the reply as bare text and no reason; they still load.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Recipient {
    pub address: String,
    pub status: RecipientState,
    pub reply: Option<Reply>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
}

impl Recipient {
    /// The last outcome recorded for it, if any.
    pub(crate) fn outcome(&self) -> Option<Outcome> {
        let reply = self.reply.clone()?;
        let reason = self.reason.unwrap_or(match self.status {
            RecipientState::Delivered => Reason::Delivered,
            RecipientState::Failed => Reason::Refused,
            RecipientState::Pending | RecipientState::Deferred => Reason::Deferred,
        });
        Some(Outcome::new(reason, reply))
    }

    fn to_status(&self) -> RecipientStatus {
        RecipientStatus {
            address: self.address.clone(),
            status: self.status,
            reply: self.reply.as_ref().map(|r| r.text.clone()),
        }
    }
}

/// The contents of `meta/ID.json`. Private: the on-disk format is an
/// implementation detail; [`Entry`] is the public view of it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub version: u32,
    pub id: QueueId,
    pub state: State,
    pub sender: String,
    pub account: String,
    pub client: Option<IpAddr>,
    #[serde(with = "rfc3339")]
    pub received_at: SystemTime,
    pub attempts: u32,
    /// When the message is due; `None` only for failed messages.
    #[serde(with = "rfc3339_opt")]
    pub next_attempt: Option<SystemTime>,
    pub last_error: Option<String>,
    pub size: u64,
    pub recipients: Vec<Recipient>,
    /// Its client waits for the upstream's answer (passthrough mode);
    /// delivery does not retry it behind the client's back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub passthrough: bool,
}

impl Meta {
    /// Parses and sanity-checks a metadata file's contents. `expected` is
    /// the id from the file name.
    pub(crate) fn parse(path: &Path, expected: &QueueId, data: &[u8]) -> Result<Meta, QueueError> {
        let meta: Meta = serde_json::from_slice(data)
            .map_err(|e| QueueError::corrupt(path, format!("cannot parse: {e}")))?;
        if meta.version != META_VERSION {
            return Err(QueueError::corrupt(
                path,
                format!(
                    "unsupported format version {} (expected {META_VERSION})",
                    meta.version
                ),
            ));
        }
        if &meta.id != expected {
            return Err(QueueError::corrupt(
                path,
                format!("contains id {} but is named after {expected}", meta.id),
            ));
        }
        if meta.recipients.is_empty() {
            return Err(QueueError::corrupt(path, "has no recipients"));
        }
        if meta.state != State::Failed && meta.next_attempt.is_none() {
            return Err(QueueError::corrupt(
                path,
                "is not failed but has no next_attempt",
            ));
        }
        Ok(meta)
    }

    /// The recipients still to be tried.
    pub(crate) fn open_recipients(&self) -> Vec<String> {
        self.recipients
            .iter()
            .filter(|r| r.status.is_open())
            .map(|r| r.address.clone())
            .collect()
    }

    /// The public view of this entry.
    pub(crate) fn to_entry(&self) -> Entry {
        Entry {
            id: self.id.to_string(),
            state: self.state,
            sender: self.sender.clone(),
            recipients: self.recipients.iter().map(|r| r.address.clone()).collect(),
            account: self.account.clone(),
            attempts: self.attempts,
            received_at: format_rfc3339_seconds(self.received_at),
            next_attempt: match self.state {
                State::Failed => None,
                _ => self.next_attempt.map(format_rfc3339_seconds),
            },
            last_error: self.last_error.clone(),
            size: self.size,
            recipient_status: self.recipients.iter().map(Recipient::to_status).collect(),
        }
    }
}

/// A read-only snapshot of one queued message, as shown by `queue list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The message's [`QueueId`].
    pub id: String,
    /// Queued, deferred or failed.
    pub state: State,
    /// The envelope sender; empty for the null sender `<>`.
    pub sender: String,
    /// Every envelope recipient, in the order given (duplicates removed).
    pub recipients: Vec<String>,
    /// The upstream account (mailbox) the message is delivered through.
    pub account: String,
    /// Number of delivery attempts made so far.
    pub attempts: u32,
    /// When the message was accepted, RFC 3339 UTC with seconds precision.
    pub received_at: String,
    /// When the next attempt is due, RFC 3339 UTC; `null` for failed
    /// messages. May be in the past (due now, or being tried).
    pub next_attempt: Option<String>,
    /// The last non-success reply (full text), if there was one.
    pub last_error: Option<String>,
    /// Size of the message body in bytes.
    pub size: u64,
    /// Per-recipient delivery state and last reply.
    pub recipient_status: Vec<RecipientStatus>,
}

/// Reads a snapshot of the queue in `dir` straight from disk, sorted by id.
///
/// Meant for another process (the `queue list` command) while the relay is
/// running: it takes no lock and changes nothing. Entries whose files vanish
/// while being read (delivered in the meantime) are skipped. A metadata file
/// that does not parse is an error naming it. A missing `meta/` directory in
/// an existing queue directory means an empty queue.
pub fn list(dir: &Path) -> Result<Vec<Entry>, QueueError> {
    let meta_dir = dir.join(crate::store::META_DIR);
    let read = match std::fs::read_dir(&meta_dir) {
        Ok(read) => read,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir.is_dir() => return Ok(Vec::new()),
        Err(e) => return Err(QueueError::io("listing queue directory", &meta_dir, e)),
    };
    let mut entries = Vec::new();
    for item in read {
        let item = item.map_err(|e| QueueError::io("listing queue directory", &meta_dir, e))?;
        let name = item.file_name();
        let Some(id) = name.to_str().and_then(crate::store::meta_file_id) else {
            continue;
        };
        let path = item.path();
        let data = match std::fs::read(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(QueueError::io("reading queue metadata", &path, e)),
        };
        entries.push(Meta::parse(&path, &id, &data)?.to_entry());
    }
    entries.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(entries)
}

/// One message's entry and its header section (up to the first empty
/// line, at most 64 KiB), read straight from disk like [`list`].
pub fn show(dir: &Path, id: &QueueId) -> Result<(Entry, Vec<u8>), QueueError> {
    use std::io::Read;
    const MAX_HEADERS: u64 = 64 * 1024;
    let path = dir.join(crate::store::META_DIR).join(format!("{id}.json"));
    let data =
        std::fs::read(&path).map_err(|e| QueueError::io("reading queue metadata", &path, e))?;
    let entry = Meta::parse(&path, id, &data)?.to_entry();
    let body_path = dir.join(crate::store::BODY_DIR).join(id.as_str());
    let mut head = Vec::new();
    std::fs::File::open(&body_path)
        .and_then(|f| f.take(MAX_HEADERS).read_to_end(&mut head))
        .map_err(|e| QueueError::io("reading message body", &body_path, e))?;
    if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
        head.truncate(end + 2);
    }
    Ok((entry, head))
}

/// Whether the queue in `dir` can take new messages: creates and removes a
/// file where the queue writes its temporary files. For a health probe,
/// from any process.
pub fn check_writable(dir: &Path) -> Result<(), QueueError> {
    let probe = dir.join(crate::store::TMP_DIR).join(".writable-probe");
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| QueueError::io("writing into the queue", &probe, e))
}

/// The last instant humantime can format (9999-12-31T23:59:59Z).
const MAX_SECS: u64 = 253_402_300_799;

/// Clamps a time into the range RFC 3339 formatting supports (1970–9999),
/// so that formatting can never panic, whatever the clock or settings say.
fn clamp(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Err(_) => UNIX_EPOCH,
        Ok(d) if d.as_secs() > MAX_SECS => UNIX_EPOCH + Duration::from_secs(MAX_SECS),
        Ok(_) => t,
    }
}

/// Formats a time as RFC 3339 UTC with seconds precision.
pub(crate) fn format_rfc3339_seconds(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(clamp(t)).to_string()
}

/// Adds a duration to a time, saturating at the latest formattable time.
pub(crate) fn add_time(t: SystemTime, d: Duration) -> SystemTime {
    clamp(
        t.checked_add(d)
            .unwrap_or(UNIX_EPOCH + Duration::from_secs(MAX_SECS)),
    )
}

/// Serde helper: a `SystemTime` as RFC 3339 with microseconds.
mod rfc3339 {
    use super::clamp;
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::SystemTime;

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_micros(clamp(*t)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_rfc3339(&s)
            .map_err(|e| serde::de::Error::custom(format!("bad time {s:?}: {e}")))
    }
}

/// Serde helper: an optional `SystemTime` as RFC 3339 with microseconds.
mod rfc3339_opt {
    use super::clamp;
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::SystemTime;

    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.collect_str(&humantime::format_rfc3339_micros(clamp(*t))),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => humantime::parse_rfc3339(&s)
                .map(Some)
                .map_err(|e| serde::de::Error::custom(format!("bad time {s:?}: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_never_panics() {
        assert_eq!(format_rfc3339_seconds(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let far = add_time(SystemTime::now(), Duration::MAX);
        assert_eq!(format_rfc3339_seconds(far), "9999-12-31T23:59:59Z");
        let before = UNIX_EPOCH
            .checked_sub(Duration::from_secs(10))
            .unwrap_or(UNIX_EPOCH);
        assert_eq!(format_rfc3339_seconds(before), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn parse_rejects_garbage_without_panicking() {
        let id: QueueId = "0000000000000001".parse().expect("valid id");
        let p = Path::new("meta/0000000000000001.json");
        for bad in [
            &b""[..],
            b"{",
            b"null",
            b"[]",
            b"{\"version\":1}",
            b"\xff\xfe",
            br#"{"version":2,"id":"0000000000000001","state":"queued","sender":"","account":"a","client":null,"received_at":"2024-01-01T00:00:00Z","attempts":0,"next_attempt":"2024-01-01T00:00:00Z","last_error":null,"size":1,"recipients":[{"address":"a@b","status":"pending","reply":null}]}"#,
            br#"{"version":1,"id":"0000000000000002","state":"queued","sender":"","account":"a","client":null,"received_at":"2024-01-01T00:00:00Z","attempts":0,"next_attempt":"2024-01-01T00:00:00Z","last_error":null,"size":1,"recipients":[{"address":"a@b","status":"pending","reply":null}]}"#,
            br#"{"version":1,"id":"0000000000000001","state":"queued","sender":"","account":"a","client":null,"received_at":"yesterday","attempts":0,"next_attempt":"2024-01-01T00:00:00Z","last_error":null,"size":1,"recipients":[{"address":"a@b","status":"pending","reply":null}]}"#,
            br#"{"version":1,"id":"0000000000000001","state":"queued","sender":"","account":"a","client":null,"received_at":"2024-01-01T00:00:00Z","attempts":0,"next_attempt":"2024-01-01T00:00:00Z","last_error":null,"size":1,"recipients":[]}"#,
            br#"{"version":1,"id":"0000000000000001","state":"queued","sender":"","account":"a","client":null,"received_at":"2024-01-01T00:00:00Z","attempts":0,"next_attempt":null,"last_error":null,"size":1,"recipients":[{"address":"a@b","status":"pending","reply":null}]}"#,
        ] {
            assert!(
                matches!(Meta::parse(p, &id, bad), Err(QueueError::Corrupt { .. })),
                "accepted {:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let good = br#"{"version":1,"id":"0000000000000001","state":"queued","sender":"","account":"a","client":"127.0.0.1","received_at":"2024-01-01T00:00:00.000001Z","attempts":0,"next_attempt":"2024-01-01T00:00:00Z","last_error":null,"size":1,"recipients":[{"address":"a@b","status":"pending","reply":null}]}"#;
        let meta = Meta::parse(p, &id, good).expect("valid meta");
        assert_eq!(
            meta.received_at,
            UNIX_EPOCH + Duration::from_micros(1_704_067_200_000_001)
        );
    }
}

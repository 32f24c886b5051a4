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
    /// SHA-256 of the body (lowercase hex), checked before each delivery so
    /// a body changed on disk is set aside, never sent. A cryptographic
    /// hash rather than a fast 64-bit one: it also catches deliberate
    /// tampering, and it costs less than the fsync of the same bytes.
    /// Absent in files written before it was stored; those are not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Held by an administrator (`queue hold`): not delivered until
    /// released.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
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
            held: self.held,
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
    /// Held by an administrator: not delivered until released.
    #[serde(default)]
    pub held: bool,
}

/// An entry that cannot be used (unreadable, not a file, does not parse,
/// or set aside in `corrupt/`), as [`survey`] reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unusable {
    /// The message's [`QueueId`].
    pub id: String,
    /// The metadata file.
    pub path: std::path::PathBuf,
    /// What is wrong with it.
    pub reason: String,
    /// Already moved to `corrupt/` (never delivered); otherwise still in
    /// `meta/`, set aside at the relay's next start.
    pub set_aside: bool,
}

/// What [`survey`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Survey {
    /// The usable messages, sorted by id.
    pub entries: Vec<Entry>,
    /// The unusable ones, sorted by id.
    pub unusable: Vec<Unusable>,
}

/// Lowercase hex of a digest, as stored in the metadata.
pub(crate) fn hex(digest: &[u8]) -> String {
    use std::fmt::Write;
    digest.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Reads a snapshot of the queue in `dir` straight from disk, sorted by id.
/// Unusable entries are logged (naming each) and left out; [`survey`]
/// returns them too.
pub fn list(dir: &Path) -> Result<Vec<Entry>, QueueError> {
    let survey = survey(dir)?;
    for bad in &survey.unusable {
        tracing::warn!(queue_id = %bad.id, path = %bad.path.display(), reason = %bad.reason, "unusable queue entry left out");
    }
    Ok(survey.entries)
}

/// Reads a snapshot of the queue in `dir` straight from disk: the usable
/// entries and the unusable ones (in `meta/`, or already in `corrupt/`).
///
/// Meant for another process (the `queue list` command) while the relay is
/// running: it takes no lock and changes nothing. Entries whose files vanish
/// while being read (delivered in the meantime) are skipped. One bad entry
/// never fails the whole listing. A queue directory that does not exist yet
/// (no relay ever ran) is an empty queue.
pub fn survey(dir: &Path) -> Result<Survey, QueueError> {
    let layout = crate::store::Layout::new(dir);
    let mut survey = Survey::default();
    let read = match std::fs::read_dir(&layout.meta) {
        Ok(read) => read,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(survey),
        Err(e) => return Err(QueueError::io("listing queue directory", &layout.meta, e)),
    };
    for item in read {
        let item = item.map_err(|e| QueueError::io("listing queue directory", &layout.meta, e))?;
        let Some(id) = crate::store::meta_entry_id(&item) else {
            continue;
        };
        let path = item.path();
        match crate::store::read_meta(&path, &id) {
            Ok(meta) => survey.entries.push(meta.to_entry()),
            Err(QueueError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            }
            Err(e) => survey.unusable.push(Unusable {
                id: id.to_string(),
                path,
                reason: e.to_string(),
                set_aside: false,
            }),
        }
    }
    if let Ok(read) = std::fs::read_dir(&layout.corrupt) {
        for item in read.flatten() {
            let Some(id) = crate::store::meta_entry_id(&item) else {
                continue;
            };
            let reason = std::fs::read_to_string(crate::store::reason_path(&layout, &id))
                .map(|r| r.trim_end().to_owned())
                .unwrap_or_else(|_| "set aside as corrupt".to_owned());
            survey.unusable.push(Unusable {
                id: id.to_string(),
                path: item.path(),
                reason,
                set_aside: true,
            });
        }
    }
    survey.entries.sort_by(|a, b| a.id.cmp(&b.id));
    survey.unusable.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(survey)
}

/// One message's entry and its header section (up to the first empty
/// line, at most 64 KiB), read straight from disk like [`list`].
pub fn show(dir: &Path, id: &QueueId) -> Result<(Entry, Vec<u8>), QueueError> {
    use std::io::Read;
    const MAX_HEADERS: u64 = 64 * 1024;
    let entry = read_entry(dir, id)?;
    let mut head = Vec::new();
    let body_path = crate::store::Layout::new(dir).body_path(id);
    open_body(dir, id)?
        .take(MAX_HEADERS)
        .read_to_end(&mut head)
        .map_err(|e| QueueError::io("reading message body", &body_path, e))?;
    if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
        head.truncate(end + 2);
    }
    Ok((entry, head))
}

/// One message's entry, read straight from disk like [`list`];
/// [`QueueError::NoSuchMessage`] if there is none.
fn read_entry(dir: &Path, id: &QueueId) -> Result<Entry, QueueError> {
    let path = crate::store::Layout::new(dir).meta_path(id);
    match crate::store::read_meta(&path, id) {
        Ok(meta) => Ok(meta.to_entry()),
        Err(QueueError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Err(QueueError::NoSuchMessage { id: id.clone() })
        }
        Err(e) => Err(e),
    }
}

/// The body of message `id` (the message as received), opened for
/// reading, like Postfix's `postcat -q`.
pub fn open_body(dir: &Path, id: &QueueId) -> Result<std::fs::File, QueueError> {
    let path = crate::store::Layout::new(dir).body_path(id);
    std::fs::File::open(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => QueueError::NoSuchMessage { id: id.clone() },
        _ => QueueError::io("reading message body", &path, e),
    })
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

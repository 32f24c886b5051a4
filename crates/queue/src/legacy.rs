//! The queue directory of older releases (a file per message: `meta/ID.json`
//! and `body/ID`), read once to import it into the store.
//!
//! [`import`] reads every entry, checks it as the old relay did at start,
//! and stores all of them in one transaction ([`Store::import`], which keeps
//! a message already stored as it is, so an import repeated after a crash
//! is harmless). Only after that commit are the old files removed. An entry
//! that cannot be used (does not parse, body missing or not matching its
//! size or SHA-256) is moved to `corrupt/` with a note of why, as before;
//! one bad entry never stops the others.

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use relay_outcome::{Reason, Reply};
use relay_store::{Envelope, MessageState, Progress, RecipientState, Spooled, Store};
use serde::Deserialize;

use crate::view::stored_recipient;
use crate::{QueueError, QueueId};

/// The only format version older releases wrote.
const META_VERSION: u32 = 1;

/// Where entries that cannot be used are set aside (kept by the new queue).
pub(crate) const CORRUPT_DIR: &str = "corrupt";

/// What an older release left in the queue directory besides `meta/` and
/// `body/`, removed after the import (its `tmp/` is emptied: the new queue
/// spools there in files without names; its `lock` is the new queue's too).
const LEFTOVERS: [&str; 1] = ["control"];

/// A recipient as `meta/ID.json` holds it. Files of the first releases hold
/// the reply as bare text and no reason; they still load.
#[derive(Debug, Deserialize)]
struct Recipient {
    address: String,
    status: RecipientState,
    reply: Option<Reply>,
    #[serde(default)]
    reason: Option<Reason>,
}

/// The contents of `meta/ID.json`.
#[derive(Debug, Deserialize)]
struct Meta {
    version: u32,
    id: QueueId,
    state: MessageState,
    sender: String,
    account: String,
    client: Option<IpAddr>,
    #[serde(deserialize_with = "rfc3339")]
    received_at: SystemTime,
    attempts: u32,
    #[serde(deserialize_with = "rfc3339_opt")]
    next_attempt: Option<SystemTime>,
    last_error: Option<String>,
    size: u64,
    recipients: Vec<Recipient>,
    #[serde(default)]
    passthrough: bool,
    /// Lowercase hex; absent in files of the first releases.
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    held: bool,
}

fn rfc3339<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_rfc3339(&s)
        .map_err(|e| serde::de::Error::custom(format!("bad time {s:?}: {e}")))
}

fn rfc3339_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) => humantime::parse_rfc3339(&s)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("bad time {s:?}: {e}"))),
    }
}

impl Meta {
    /// Parses and sanity-checks a metadata file's contents. `expected` is
    /// the id from the file name.
    fn parse(path: &Path, expected: &QueueId, data: &[u8]) -> Result<Meta, QueueError> {
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
        if meta.state != MessageState::Failed && meta.next_attempt.is_none() {
            return Err(QueueError::corrupt(
                path,
                "is not failed but has no next_attempt",
            ));
        }
        Ok(meta)
    }

    /// The message as the store keeps it, finished the way the old relay
    /// finished it at start: a passthrough message still open fails (its
    /// client waited on a connection that is gone and resends it); one
    /// with no recipient left to try is failed, or `None` when every
    /// recipient was delivered (a removal the crash interrupted).
    fn into_message(mut self, body: Spooled) -> Option<relay_store::NewMessage> {
        if self.passthrough && self.state != MessageState::Failed {
            let reply = crate::queue::orphan_reply();
            for r in self.recipients.iter_mut().filter(|r| r.status.is_open()) {
                r.status = RecipientState::Failed;
                r.reason = Some(Reason::Local);
                r.reply = Some(reply.clone());
            }
            self.last_error = Some(reply.text);
        }
        let open = self.recipients.iter().any(|r| r.status.is_open());
        if self.state != MessageState::Failed && !open {
            if self
                .recipients
                .iter()
                .all(|r| r.status == RecipientState::Delivered)
            {
                return None;
            }
            self.state = MessageState::Failed;
            self.next_attempt = None;
        }
        Some(relay_store::NewMessage {
            envelope: Envelope {
                id: self.id.to_string(),
                account: self.account,
                sender: self.sender,
                client: self.client.map(|c| c.to_string()),
                received_at: self.received_at,
                passthrough: self.passthrough,
            },
            progress: Progress {
                state: self.state,
                attempts: self.attempts,
                next_attempt: self.next_attempt,
                last_error: self.last_error,
                recipients: self
                    .recipients
                    .into_iter()
                    .map(|r| stored_recipient(r.address, r.status, r.reply.as_ref(), r.reason))
                    .collect(),
            },
            held: self.held,
            lease: None,
            body: relay_store::Body::Spooled(body),
        })
    }
}

/// The id of a file named exactly `ID` + `suffix`.
fn file_id(name: &std::ffi::OsStr, suffix: &str) -> Option<QueueId> {
    let stem = name.to_str()?.strip_suffix(suffix)?;
    let id: QueueId = stem.parse().ok()?;
    (id.as_str() == stem).then_some(id)
}

/// Reads one entry: its metadata, and its body summed (not held in memory:
/// the file itself is handed to the store), checked.
fn read_entry(
    meta_path: &Path,
    body_path: &Path,
    id: &QueueId,
) -> Result<(Meta, Spooled), QueueError> {
    let data =
        fs::read(meta_path).map_err(|e| QueueError::io("reading queue metadata", meta_path, e))?;
    let meta = Meta::parse(meta_path, id, &data)?;
    let body = match fs::File::open(body_path).and_then(Spooled::from_file) {
        Ok(body) => body,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(QueueError::corrupt(
                meta_path,
                format!("body {} is missing", body_path.display()),
            ))
        }
        Err(e) => return Err(QueueError::io("reading message body", body_path, e)),
    };
    if body.len() != meta.size {
        return Err(QueueError::corrupt(
            meta_path,
            format!(
                "body {} has {} bytes, metadata says {}",
                body_path.display(),
                body.len(),
                meta.size
            ),
        ));
    }
    if let Some(expected) = &meta.sha256 {
        let actual = hex(&body.checksum());
        if *expected != actual {
            return Err(QueueError::corrupt(
                meta_path,
                format!("body's SHA-256 is {actual}, metadata says {expected}"),
            ));
        }
    }
    Ok((meta, body))
}

fn hex(digest: &[u8]) -> String {
    use std::fmt::Write;
    digest.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Moves an unusable entry to `corrupt/` with a note of why. Returns false
/// if it could not be moved (its files then stay, and the old directories
/// with them).
fn set_aside(dir: &Path, meta_path: &Path, body_path: &Path, id: &QueueId, reason: &str) -> bool {
    let corrupt = dir.join(CORRUPT_DIR);
    tracing::warn!(queue_id = %id, path = %meta_path.display(), %reason, "corrupt queue entry set aside in {}; it will not be delivered", corrupt.display());
    if let Err(e) = crate::queue::create_private_dir(&corrupt) {
        tracing::warn!(error = %e, "cannot create the directory for corrupt entries");
        return false;
    }
    if body_path.exists() {
        if let Err(e) = fs::rename(body_path, corrupt.join(format!("{id}.body"))) {
            tracing::warn!(path = %body_path.display(), error = %e, "cannot move a corrupt entry's body aside; leaving it in place");
            return false;
        }
    }
    if let Err(e) = fs::rename(meta_path, corrupt.join(format!("{id}.json"))) {
        tracing::warn!(path = %meta_path.display(), error = %e, "cannot move corrupt metadata aside; leaving it in place");
        return false;
    }
    // only for the administrator's eyes (`queue list`): losing it loses nothing
    let _ = fs::write(reason_path(dir, id), format!("{reason}\n"));
    true
}

/// The file beside a set-aside entry saying why it was set aside.
pub(crate) fn reason_path(dir: &Path, id: &QueueId) -> PathBuf {
    dir.join(CORRUPT_DIR).join(format!("{id}.reason"))
}

/// What [`scan`] found.
struct Found {
    messages: Vec<relay_store::NewMessage>,
    /// Every file to remove once the import committed.
    files: Vec<PathBuf>,
    /// Some entry could not be set aside: keep the old directories.
    stuck: bool,
}

/// Reads the old layout in `dir` (blocking). `None` when there is none.
fn scan(dir: &Path) -> Result<Option<Found>, QueueError> {
    let meta_dir = dir.join("meta");
    let body_dir = dir.join("body");
    let read = match fs::read_dir(&meta_dir) {
        Ok(read) => read,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(QueueError::io("listing the old queue", &meta_dir, e)),
    };
    let mut found = Found {
        messages: Vec::new(),
        files: Vec::new(),
        stuck: false,
    };
    for item in read {
        let item = item.map_err(|e| QueueError::io("listing the old queue", &meta_dir, e))?;
        let meta_path = item.path();
        let Some(id) = file_id(&item.file_name(), ".json") else {
            tracing::warn!(path = %meta_path.display(), "unexpected file in the old queue's metadata directory; left in place");
            found.stuck = true;
            continue;
        };
        let body_path = body_dir.join(id.as_str());
        match read_entry(&meta_path, &body_path, &id) {
            Ok((meta, body)) => {
                if let Some(message) = meta.into_message(body) {
                    found.messages.push(message);
                } else {
                    tracing::info!(queue_id = %id, "not importing a message already delivered to every recipient");
                }
                found.files.push(meta_path);
                found.files.push(body_path);
            }
            Err(e) => {
                if !set_aside(dir, &meta_path, &body_path, &id, &e.to_string()) {
                    found.stuck = true;
                }
            }
        }
    }
    Ok(Some(found))
}

/// Removes the old layout's files and directories after the import
/// committed (blocking). Bodies without metadata (a crash before the old
/// commit point, or during a removal) go with `body/`.
fn remove(dir: &Path, found: &Found) {
    for path in &found.files {
        if let Err(e) = fs::remove_file(path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove an imported file of the old queue");
            }
        }
    }
    if found.stuck {
        return;
    }
    let unfinished = fs::read_dir(dir.join("tmp"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|item| item.path());
    let old = ["meta", "body"]
        .iter()
        .chain(LEFTOVERS.iter())
        .map(|name| dir.join(name));
    for path in old.chain(unfinished) {
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        if let Err(e) = removed {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove what is left of the old queue");
            }
        }
    }
}

/// Imports the old layout in `dir`, if there is one, into `store`: all of it
/// in one transaction, then the old files are removed. Returns how many
/// messages were imported. Holds every old body in memory for the one
/// transaction (the old queue's size, once).
pub(crate) async fn import(dir: &Path, store: &Store) -> Result<u64, QueueError> {
    let scan_dir = dir.to_path_buf();
    let found =
        crate::queue::blocking(dir, "reading the old queue", move || scan(&scan_dir)).await?;
    let Some(mut found) = found else {
        return Ok(0);
    };
    let imported = store.import(std::mem::take(&mut found.messages)).await?;
    tracing::info!(
        dir = %dir.display(),
        imported,
        "imported the queue of an older release into the store; its files are removed"
    );
    let remove_dir = dir.to_path_buf();
    crate::queue::blocking(dir, "removing the old queue", move || {
        remove(&remove_dir, &found);
        Ok(())
    })
    .await?;
    Ok(imported)
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_outcome::Enhanced;

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
        let good = br#"{"version":1,"id":"0000000000000001","state":"queued","sender":"","account":"a","client":"127.0.0.1","received_at":"2024-01-01T00:00:00.000001Z","attempts":0,"next_attempt":"2024-01-01T00:00:00Z","last_error":null,"size":1,"recipients":[{"address":"a@b","status":"pending","reply":"451 4.3.0 try later"}]}"#;
        let meta = Meta::parse(p, &id, good).expect("valid meta");
        assert_eq!(
            meta.received_at,
            std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_704_067_200_000_001)
        );
        let reply = meta.recipients[0].reply.as_ref().expect("reply");
        assert_eq!(reply.enhanced, Some(Enhanced::new(4, 3, 0)));
    }
}

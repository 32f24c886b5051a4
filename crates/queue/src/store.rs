//! The on-disk half of the queue: directory layout, the commit protocol, and
//! recovery at open. Everything here is blocking std I/O; callers run it in
//! `spawn_blocking`.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::meta::{Meta, RecipientState, State};
use crate::{QueueError, QueueId};

/// Subdirectory for files being written (never read back).
pub(crate) const TMP_DIR: &str = "tmp";
/// Subdirectory holding message bodies, one file per id.
pub(crate) const BODY_DIR: &str = "body";
/// Subdirectory holding metadata files `ID.json`; the commit point.
pub(crate) const META_DIR: &str = "meta";
/// Subdirectory where unusable entries are set aside.
pub(crate) const CORRUPT_DIR: &str = "corrupt";
/// Requests from admin commands to the running relay (see `control`).
pub(crate) const CONTROL_DIR: &str = "control";
/// Lock file preventing two processes from running one queue.
pub(crate) const LOCK_FILE: &str = "lock";

/// The id of a metadata file name `ID.json`, if it is one (exact spelling).
pub(crate) fn meta_file_id(name: &str) -> Option<QueueId> {
    let stem = name.strip_suffix(".json")?;
    exact_id(stem)
}

/// The id of a directory entry named `ID.json`, if it is one.
pub(crate) fn meta_entry_id(item: &fs::DirEntry) -> Option<QueueId> {
    item.file_name().to_str().and_then(meta_file_id)
}

/// The id spelled exactly as `name` (uppercase), if it is one.
fn exact_id(name: &str) -> Option<QueueId> {
    let id: QueueId = name.parse().ok()?;
    (id.as_str() == name).then_some(id)
}

/// Paths of the queue directory.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub root: PathBuf,
    pub tmp: PathBuf,
    pub body: PathBuf,
    pub meta: PathBuf,
    pub corrupt: PathBuf,
    pub control: PathBuf,
}

impl Layout {
    pub(crate) fn new(root: &Path) -> Layout {
        Layout {
            root: root.to_path_buf(),
            tmp: root.join(TMP_DIR),
            body: root.join(BODY_DIR),
            meta: root.join(META_DIR),
            corrupt: root.join(CORRUPT_DIR),
            control: root.join(CONTROL_DIR),
        }
    }

    pub(crate) fn body_path(&self, id: &QueueId) -> PathBuf {
        self.body.join(id.as_str())
    }

    pub(crate) fn meta_path(&self, id: &QueueId) -> PathBuf {
        self.meta.join(format!("{id}.json"))
    }

    pub(crate) fn tmp_body_path(&self, id: &QueueId) -> PathBuf {
        self.tmp.join(format!("{id}.body"))
    }

    fn tmp_meta_path(&self, id: &QueueId) -> PathBuf {
        self.tmp.join(format!("{id}.json"))
    }
}

/// One change to the queue on disk. [`apply`] takes a slice of them so that
/// group commit (many enqueues sharing the fsyncs) is a matter of batching
/// callers, not of changing the protocol.
#[derive(Debug)]
pub(crate) enum Op {
    /// A new message: body and metadata.
    Insert {
        id: QueueId,
        meta: Vec<u8>,
        body: Vec<u8>,
    },
    /// A new message whose body is already written and fsynced at
    /// `tmp/ID.body` (spooled while it was received): metadata only.
    InsertSpooled { id: QueueId, meta: Vec<u8> },
    /// New metadata for an existing message.
    Update { id: QueueId, meta: Vec<u8> },
    /// Delete a message.
    Remove { id: QueueId },
}

/// Applies `ops` durably: when this returns `Ok`, every insert and update
/// survives a crash and every removal is committed.
///
/// Phases (each ordered after the previous by an fsync):
/// 1. write every new file under `tmp/` and fsync it;
/// 2. rename bodies into `body/`, fsync `body/`;
/// 3. rename metadata into `meta/` and unlink removed metadata, fsync
///    `meta/` — the commit point;
/// 4. unlink the bodies of removed messages (a crash before this leaves an
///    orphan body, which `open` deletes).
///
/// On error, inserts are rolled back as far as possible (so a message that
/// the caller reports as not accepted does not reappear after a restart);
/// leftovers are cleaned by the next `open`.
pub(crate) fn apply(layout: &Layout, ops: &[Op]) -> Result<(), QueueError> {
    let result = apply_inner(layout, ops);
    if result.is_err() {
        for op in ops {
            match op {
                Op::Insert { id, .. } | Op::InsertSpooled { id, .. } => {
                    let _ = fs::remove_file(layout.tmp_body_path(id));
                    let _ = fs::remove_file(layout.tmp_meta_path(id));
                    let _ = fs::remove_file(layout.meta_path(id));
                    let _ = fs::remove_file(layout.body_path(id));
                }
                Op::Update { id, .. } => {
                    let _ = fs::remove_file(layout.tmp_meta_path(id));
                }
                Op::Remove { .. } => {}
            }
        }
    }
    result
}

fn apply_inner(layout: &Layout, ops: &[Op]) -> Result<(), QueueError> {
    // 1. Write and fsync the new files.
    for op in ops {
        match op {
            Op::Insert { id, meta, body } => {
                write_durable(&layout.tmp_body_path(id), body)?;
                write_durable(&layout.tmp_meta_path(id), meta)?;
            }
            Op::InsertSpooled { id, meta } | Op::Update { id, meta } => {
                write_durable(&layout.tmp_meta_path(id), meta)?
            }
            Op::Remove { .. } => {}
        }
    }

    // 2. Bodies into place, durably, before any metadata refers to them.
    let mut bodies = false;
    for op in ops {
        if let Op::Insert { id, .. } | Op::InsertSpooled { id, .. } = op {
            rename(
                &layout.tmp_body_path(id),
                &layout.body_path(id),
                "moving message body into",
            )?;
            bodies = true;
        }
    }
    if bodies {
        sync_dir(&layout.body)?;
    }

    // 3. The commit point: metadata appears, changes or disappears.
    let mut metas = false;
    for op in ops {
        match op {
            Op::Insert { id, .. } | Op::InsertSpooled { id, .. } | Op::Update { id, .. } => {
                rename(
                    &layout.tmp_meta_path(id),
                    &layout.meta_path(id),
                    "committing metadata to",
                )?;
            }
            Op::Remove { id } => remove_if_exists(&layout.meta_path(id), "deleting metadata")?,
        }
        metas = true;
    }
    if metas {
        sync_dir(&layout.meta)?;
    }

    // 4. Bodies of removed messages. Committed already, so failures only
    // leave an orphan for the next open to clean.
    for op in ops {
        if let Op::Remove { id } = op {
            if let Err(e) = remove_if_exists(&layout.body_path(id), "deleting message body") {
                tracing::warn!(error = %e, "orphan body left behind; it is deleted at the next start");
            }
        }
    }
    Ok(())
}

/// Creates (or truncates) a private file (mode 0600) for writing.
pub(crate) fn create_private(path: &Path) -> Result<File, QueueError> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
        .open(path)
        .map_err(|e| QueueError::io("creating", path, e))
}

/// Writes `data` to a fresh file at `path` (mode 0600) and fsyncs it.
fn write_durable(path: &Path, data: &[u8]) -> Result<(), QueueError> {
    let mut file = create_private(path)?;
    file.write_all(data)
        .map_err(|e| QueueError::io("writing", path, e))?;
    file.sync_all()
        .map_err(|e| QueueError::io("fsyncing", path, e))
}

fn rename(from: &Path, to: &Path, action: &'static str) -> Result<(), QueueError> {
    fs::rename(from, to).map_err(|e| QueueError::io(action, to, e))
}

fn remove_if_exists(path: &Path, action: &'static str) -> Result<(), QueueError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(QueueError::io(action, path, e)),
    }
}

/// Fsyncs a directory, making renames and unlinks in it durable.
fn sync_dir(path: &Path) -> Result<(), QueueError> {
    File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| QueueError::io("fsyncing directory", path, e))
}

fn create_dir(path: &Path) -> Result<(), QueueError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(path)
        .map_err(|e| QueueError::io("creating queue directory", path, e))
}

/// Creates the directory tree (mode 0700) and takes the lock file. The
/// returned file holds the lock until dropped.
pub(crate) fn prepare(layout: &Layout) -> Result<File, QueueError> {
    create_dir(&layout.root)?;
    private_mode(&layout.root)?;
    let mut created = false;
    for dir in [
        &layout.tmp,
        &layout.body,
        &layout.meta,
        &layout.corrupt,
        &layout.control,
    ] {
        if !dir.is_dir() {
            create_dir(dir)?;
            created = true;
        }
        private_mode(dir)?;
    }
    if created {
        sync_dir(&layout.root)?;
    }
    let lock_path = layout.root.join(LOCK_FILE);
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let lock = options
        .open(&lock_path)
        .map_err(|e| QueueError::io("opening lock file", &lock_path, e))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(fs::TryLockError::WouldBlock) => Err(QueueError::Locked { path: lock_path }),
        Err(fs::TryLockError::Error(e)) => Err(QueueError::io("locking", &lock_path, e)),
    }
}

/// Makes a queue directory writable by its owner only if others could
/// write into it: anyone who can would be able to plant messages (an open
/// relay) or delete them. Fails if the mode cannot be fixed (not the
/// owner), so the relay does not run on such a directory.
fn private_mode(dir: &Path) -> Result<(), QueueError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir)
            .map_err(|e| QueueError::io("checking queue directory", dir, e))?
            .permissions()
            .mode();
        if mode & 0o022 != 0 {
            tracing::warn!(
                path = %dir.display(),
                mode = format!("{:o}", mode & 0o7777),
                "queue directory is writable by others; setting its mode to 0700"
            );
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| {
                QueueError::io("making the queue directory private (mode 0700)", dir, e)
            })?;
        }
    }
    Ok(())
}

/// What recovery found on disk.
#[derive(Debug, Default)]
pub(crate) struct Recovered {
    /// Every valid message still to be tried (not failed).
    pub active: Vec<Meta>,
    /// Failed messages kept on disk: id and acceptance time.
    pub failed: Vec<(QueueId, std::time::SystemTime)>,
    /// The largest id timestamp seen in `meta/` or `body/`, so new ids sort
    /// after every existing one even if the clock went backwards.
    pub max_micros: u64,
}

/// Brings the directory back to a consistent state after a stop or crash and
/// loads the valid entries:
/// - everything in `tmp/` is deleted (writes that never committed);
/// - metadata that does not parse, or whose body is missing or has the
///   wrong size, is moved to `corrupt/` (with its body, if any);
/// - bodies without metadata are deleted (crash before the commit point, or
///   after it during a removal);
/// - non-failed entries with no recipient left to try (cannot be written by
///   this code, but could come from a hand edit) are finished: removed if
///   all delivered, otherwise marked failed.
pub(crate) fn recover(layout: &Layout) -> Result<Recovered, QueueError> {
    clean_tmp(layout)?;

    let mut found = Recovered::default();
    let mut keep: HashSet<QueueId> = HashSet::new();

    let read = fs::read_dir(&layout.meta)
        .map_err(|e| QueueError::io("listing queue directory", &layout.meta, e))?;
    for item in read {
        let item = item.map_err(|e| QueueError::io("listing queue directory", &layout.meta, e))?;
        let path = item.path();
        let Some(id) = meta_entry_id(&item) else {
            tracing::warn!(path = %path.display(), "ignoring unexpected file in queue metadata directory");
            continue;
        };
        found.max_micros = found.max_micros.max(id.micros());
        let meta = read_meta(&path, &id).and_then(|meta| {
            let body = layout.body_path(&id);
            match fs::metadata(&body) {
                Ok(m) if m.len() == meta.size => Ok(meta),
                Ok(m) => Err(QueueError::corrupt(
                    &path,
                    format!(
                        "body {} has {} bytes, metadata says {}",
                        body.display(),
                        m.len(),
                        meta.size
                    ),
                )),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Err(QueueError::corrupt(
                    &path,
                    format!("body {} is missing", body.display()),
                )),
                Err(e) => Err(QueueError::io("checking message body", &body, e)),
            }
        });
        let mut meta = match meta {
            Ok(meta) => meta,
            Err(e) => {
                if !set_aside(layout, &id, &e.to_string()) {
                    keep.insert(id);
                }
                continue;
            }
        };
        keep.insert(id.clone());
        if meta.passthrough && meta.state != State::Failed {
            // Its client waited for the upstream's answer and, with the relay
            // gone, got none: it still has the message and will resend it.
            // Delivering this copy as well would duplicate it.
            let reply = "not delivered: the relay stopped while the client waited (passthrough); the client resends it";
            for r in meta.recipients.iter_mut().filter(|r| r.status.is_open()) {
                r.status = RecipientState::Failed;
                r.reason = Some(relay_outcome::Reason::Local);
                r.reply = Some(relay_outcome::Reply {
                    code: 554,
                    enhanced: Some(relay_outcome::Enhanced::new(5, 3, 0)),
                    text: reply.into(),
                });
            }
            meta.last_error = Some(reply.into());
            tracing::warn!(queue_id = %id, "{reply}");
        }
        if meta.state != State::Failed && meta.open_recipients().is_empty() {
            if meta
                .recipients
                .iter()
                .all(|r| r.status == RecipientState::Delivered)
            {
                tracing::info!(queue_id = %id, "removing fully delivered message left in the queue");
                apply(layout, &[Op::Remove { id: id.clone() }])?;
                keep.remove(&id);
                continue;
            }
            tracing::warn!(queue_id = %id, "marking message with no recipient left to try as failed");
            meta.state = State::Failed;
            meta.next_attempt = None;
            let bytes = serde_json::to_vec_pretty(&meta).map_err(|source| QueueError::Encode {
                path: layout.meta_path(&id),
                source,
            })?;
            apply(
                layout,
                &[Op::Update {
                    id: id.clone(),
                    meta: bytes,
                }],
            )?;
        }
        if meta.state == State::Failed {
            found.failed.push((meta.id, meta.received_at));
        } else {
            found.active.push(meta);
        }
    }

    let read = fs::read_dir(&layout.body)
        .map_err(|e| QueueError::io("listing queue directory", &layout.body, e))?;
    for item in read {
        let item = item.map_err(|e| QueueError::io("listing queue directory", &layout.body, e))?;
        let path = item.path();
        let Some(id) = item.file_name().to_str().and_then(exact_id) else {
            tracing::warn!(path = %path.display(), "ignoring unexpected file in queue body directory");
            continue;
        };
        found.max_micros = found.max_micros.max(id.micros());
        if !keep.contains(&id) {
            tracing::info!(path = %path.display(), "deleting message body without metadata (never committed, or removal interrupted)");
            if let Err(e) = remove_if_exists(&path, "deleting orphan message body") {
                tracing::warn!(error = %e, "cannot delete an orphan body; leaving it in place");
            }
        }
    }
    found.active.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(found)
}

fn clean_tmp(layout: &Layout) -> Result<(), QueueError> {
    let read = fs::read_dir(&layout.tmp)
        .map_err(|e| QueueError::io("listing queue directory", &layout.tmp, e))?;
    for item in read {
        let item = item.map_err(|e| QueueError::io("listing queue directory", &layout.tmp, e))?;
        let path = item.path();
        tracing::info!(path = %path.display(), "deleting unfinished write from the queue's tmp directory");
        let is_dir = item.file_type().map(|t| t.is_dir()).unwrap_or(false);
        let result = if is_dir {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                let e = QueueError::io("deleting temporary file", &path, e);
                tracing::warn!(error = %e, "cannot clean the queue's tmp directory; going on");
            }
        }
    }
    Ok(())
}

/// Reads and parses `meta/ID.json`. Any failure (unreadable, a directory,
/// garbage) is an error naming the file: the caller sets the entry aside or
/// reports it, and goes on with the others.
pub(crate) fn read_meta(path: &Path, id: &QueueId) -> Result<Meta, QueueError> {
    let data = fs::read(path).map_err(|e| QueueError::io("reading queue metadata", path, e))?;
    Meta::parse(path, id, &data)
}

/// The file beside a set-aside entry saying why it was set aside.
pub(crate) fn reason_path(layout: &Layout, id: &QueueId) -> PathBuf {
    layout.corrupt.join(format!("{id}.reason"))
}

/// Moves an unusable entry to `corrupt/`, with a note of why. Returns false
/// if it could not be moved (then it stays where it is, is not scheduled,
/// and its body is kept).
pub(crate) fn set_aside(layout: &Layout, id: &QueueId, reason: &str) -> bool {
    let meta_from = layout.meta_path(id);
    let meta_to = layout.corrupt.join(format!("{id}.json"));
    tracing::warn!(
        queue_id = %id,
        path = %meta_from.display(),
        %reason,
        moved_to = %meta_to.display(),
        "corrupt queue entry set aside; it will not be delivered"
    );
    let body_from = layout.body_path(id);
    if body_from.exists() {
        let body_to = layout.corrupt.join(format!("{id}.body"));
        if let Err(e) = fs::rename(&body_from, &body_to) {
            tracing::warn!(path = %body_from.display(), error = %e, "cannot move corrupt entry's body aside; leaving it in place");
            return false;
        }
    }
    if let Err(e) = fs::rename(&meta_from, &meta_to) {
        tracing::warn!(path = %meta_from.display(), error = %e, "cannot move corrupt metadata aside; leaving it in place");
        return false;
    }
    // only for the administrator's eyes (`queue list`): losing it loses nothing
    let _ = fs::write(reason_path(layout, id), format!("{reason}\n"));
    let _ = sync_dir(&layout.meta);
    true
}

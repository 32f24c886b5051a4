//! Message bodies: how they reach the store, and the embedded store's
//! body files.
//!
//! A body received in memory is stored in the database with its message.
//! A large one is spooled to an anonymous file while it arrives
//! ([`Spool`]), hashed as it is written. On the embedded store that file is
//! then given a name in `bodies/` and made durable before the message's row
//! is committed: the bytes are written to disk once, as received, instead
//! of again into SQLite's log and then its database file; and the body is
//! never held whole in memory. On PostgreSQL (shared by relays on other
//! machines) it is read back into the database.
//!
//! A body file without a row (a crash between the file and the commit) is
//! removed when the relay opens the store ([`crate::Store::sweep_bodies`]);
//! a row never points at a file that is not durable.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

/// A body being written to an anonymous file, hashed as it goes. Its
/// methods block: call them from a blocking thread.
#[derive(Debug)]
pub struct Spool {
    file: File,
    len: u64,
    hasher: Sha256,
}

impl Spool {
    /// Starts a spool in `file`: an empty anonymous file (`O_TMPFILE`) on
    /// the file system of the store's directory, so that it can be linked
    /// into it.
    pub fn new(file: File) -> Spool {
        Spool {
            file,
            len: 0,
            hasher: Sha256::new(),
        }
    }

    /// Appends `data`.
    pub fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all(data)?;
        self.hasher.update(data);
        self.len += data.len() as u64;
        Ok(())
    }

    /// Bytes appended so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was appended.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The body, complete.
    pub fn finish(self) -> Spooled {
        Spooled {
            file: self.file,
            len: self.len,
            checksum: self.hasher.finalize().into(),
        }
    }
}

/// A complete spooled body ([`Spool::finish`]).
#[derive(Debug)]
pub struct Spooled {
    file: File,
    len: u64,
    checksum: [u8; 32],
}

impl Spooled {
    /// A body already complete in `file` (an older queue's body file),
    /// summed here a piece at a time (blocking). On the embedded store the
    /// file is linked, not copied, so it must be on the store's file
    /// system.
    pub fn from_file(file: File) -> io::Result<Spooled> {
        let mut spool = Spool::new(file);
        spool.file.rewind()?;
        let mut piece = vec![0; 64 << 10];
        loop {
            let n = spool.file.read(&mut piece)?;
            if n == 0 {
                break;
            }
            spool.hasher.update(&piece[..n]);
            spool.len += n as u64;
        }
        Ok(spool.finish())
    }

    /// Its size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its SHA-256.
    pub fn checksum(&self) -> [u8; 32] {
        self.checksum
    }

    /// The whole body in memory (blocking).
    pub(crate) fn read_all(mut self) -> io::Result<Vec<u8>> {
        // its exact size: growing by doubling would hold up to twice that
        let mut body = Vec::with_capacity(usize::try_from(self.len).unwrap_or(0));
        self.file.rewind()?;
        self.file.read_to_end(&mut body)?;
        Ok(body)
    }

    /// Names the body `to` and makes it durable, name included (blocking):
    /// a hard link of the file where the system allows it (no copy), else a
    /// copy. Fails if `to` exists.
    pub(crate) fn keep_as(self, to: &Path) -> io::Result<()> {
        self.keep(to, to)
    }

    /// [`Spooled::keep_as`], replacing `to` if it exists (an import
    /// repeated after a crash): kept as `temp` first, then renamed.
    pub(crate) fn keep_replacing(self, to: &Path, temp: &Path) -> io::Result<()> {
        match std::fs::remove_file(temp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        self.keep(temp, to)
    }

    /// Names the body `at` and gives it the name `to` (a rename unless the
    /// same), durably.
    fn keep(mut self, at: &Path, to: &Path) -> io::Result<()> {
        let linked = link_anonymous(&self.file, at).is_ok();
        if linked {
            self.file.sync_all()?;
        } else {
            let mut copy = create_private(at)?;
            self.file.rewind()?;
            let copied = io::copy(&mut self.file, &mut copy).and_then(|_| copy.sync_all());
            if let Err(e) = copied {
                let _ = std::fs::remove_file(at);
                return Err(e);
            }
        }
        if at != to {
            std::fs::rename(at, to)?;
            // A rename between two links of one file does nothing: `to`
            // already is this body (an import repeated); `at` goes.
            match std::fs::remove_file(at) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        match to.parent() {
            Some(dir) => File::open(dir)?.sync_all(),
            None => Ok(()),
        }
    }
}

/// A message's body as handed to [`crate::Store::insert`].
#[derive(Debug)]
pub enum Body {
    /// In memory.
    Bytes(Vec<u8>),
    /// Spooled while it was received.
    Spooled(Spooled),
}

impl Body {
    /// Its size in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Body::Bytes(bytes) => bytes.len() as u64,
            Body::Spooled(spooled) => spooled.len(),
        }
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<Vec<u8>> for Body {
    fn from(bytes: Vec<u8>) -> Body {
        Body::Bytes(bytes)
    }
}

fn create_private(path: &Path) -> io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)
}

/// Gives `file` (anonymous, or named elsewhere on the same file system)
/// the name `to` (Linux: `linkat` through `/proc/self/fd`, which needs
/// `/proc`, and for an anonymous file one opened with `O_TMPFILE` without
/// `O_EXCL`).
#[cfg(target_os = "linux")]
fn link_anonymous(file: &File, to: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let from = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let to = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both arguments are NUL-terminated strings that outlive the
    // call; linkat reads them and keeps no pointer.
    let done = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn link_anonymous(_file: &File, _to: &Path) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spooled(dir: &Path, data: &[u8]) -> Spooled {
        let mut spool = Spool::new(tempfile::tempfile_in(dir).expect("spool"));
        spool.append(data).expect("append");
        spool.finish()
    }

    #[test]
    fn a_spooled_body_is_kept_under_its_name_and_reads_back() {
        let dir = tempfile::tempdir().expect("dir");
        let body = spooled(dir.path(), b"Subject: x\r\n\r\nbody\r\n");
        assert_eq!(body.len(), 20);
        assert_eq!(
            body.checksum(),
            <[u8; 32]>::from(Sha256::digest(b"Subject: x\r\n\r\nbody\r\n"))
        );
        let to = dir.path().join("kept");
        body.keep_as(&to).expect("keep");
        assert_eq!(
            std::fs::read(&to).expect("read"),
            b"Subject: x\r\n\r\nbody\r\n"
        );
        assert_eq!(
            spooled(dir.path(), b"again").read_all().expect("read"),
            b"again"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn an_anonymous_file_is_linked_not_copied() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("dir");
        let file = tempfile::tempfile_in(dir.path()).expect("anonymous file");
        let to = dir.path().join("named");
        link_anonymous(&file, &to).expect("link");
        assert_eq!(
            std::fs::metadata(&to).expect("named").ino(),
            file.metadata().expect("anonymous").ino()
        );
    }

    #[test]
    fn a_complete_file_is_summed_and_can_replace_a_name() {
        let dir = tempfile::tempdir().expect("dir");
        let old = dir.path().join("old");
        std::fs::write(&old, b"an old queue's body").expect("write");
        let body = Spooled::from_file(File::open(&old).expect("open")).expect("sum");
        assert_eq!(body.len(), 19);
        assert_eq!(
            body.checksum(),
            <[u8; 32]>::from(Sha256::digest(b"an old queue's body"))
        );
        let to = dir.path().join("kept");
        std::fs::write(&to, b"left by a crash").expect("write");
        body.keep_replacing(&to, &dir.path().join(".kept.import"))
            .expect("keep");
        assert_eq!(std::fs::read(&to).expect("read"), b"an old queue's body");
        assert!(!dir.path().join(".kept.import").exists());
        assert_eq!(
            std::fs::read(&old).expect("still there"),
            b"an old queue's body"
        );
    }

    #[test]
    fn a_name_taken_is_an_error_and_leaves_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let to = dir.path().join("kept");
        std::fs::write(&to, b"first").expect("write");
        assert!(spooled(dir.path(), b"second").keep_as(&to).is_err());
        assert_eq!(std::fs::read(&to).expect("read"), b"first");
    }
}

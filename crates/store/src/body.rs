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
    /// Its size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn checksum(&self) -> [u8; 32] {
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
    /// a hard link of the anonymous file where the system allows it (no
    /// copy), else a copy.
    pub(crate) fn keep_as(mut self, to: &Path) -> io::Result<()> {
        let linked = link_anonymous(&self.file, to).is_ok();
        if linked {
            self.file.sync_all()?;
        } else {
            let mut copy = create_private(to)?;
            self.file.rewind()?;
            let copied = io::copy(&mut self.file, &mut copy).and_then(|_| copy.sync_all());
            if let Err(e) = copied {
                let _ = std::fs::remove_file(to);
                return Err(e);
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

/// Gives the anonymous file `file` the name `to` (Linux: `linkat` through
/// `/proc/self/fd`, which needs `/proc` and an `O_TMPFILE` file opened
/// without `O_EXCL`).
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
    fn a_name_taken_is_an_error_and_leaves_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let to = dir.path().join("kept");
        std::fs::write(&to, b"first").expect("write");
        assert!(spooled(dir.path(), b"second").keep_as(&to).is_err());
        assert_eq!(std::fs::read(&to).expect("read"), b"first");
    }
}

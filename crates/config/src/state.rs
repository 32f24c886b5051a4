//! Where the relay keeps its state. One type hands out every path, so no
//! crate computes paths inside another's directory:
//!
//! ```text
//! {parent of queue.dir}/          the state directory (/var/lib/smtp-oauth-relay)
//!   queue/                        queue.dir: the queue's own (its layout is the queue crate's)
//!   queue/pacing/{account}.json   each mailbox's pace, kept across restarts
//!   tokens/{account}.json         a delegated account's token cache (unless oauth.token_cache says)
//! ```
//!
//! The pacing directory sits inside `queue.dir` and the token caches beside
//! it because that is where existing deployments keep them: moving them would
//! lose paces and refresh tokens at an upgrade.

use crate::{AccountConfig, QueueConfig};
use std::path::{Path, PathBuf};

/// Creates `path` and its parents, readable by the owner only (mode 0700):
/// the state directory holds mail and credentials.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(path)
}

/// The state directory of a configuration, from `queue.dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir {
    queue: PathBuf,
}

impl StateDir {
    /// The state directory around `queue.dir`.
    pub fn new(queue: &QueueConfig) -> StateDir {
        StateDir::around(&queue.dir)
    }

    /// The state directory around a queue directory.
    pub fn around(queue_dir: &Path) -> StateDir {
        StateDir {
            queue: queue_dir.to_owned(),
        }
    }

    /// The queue's own directory (`queue.dir`).
    pub fn queue(&self) -> &Path {
        &self.queue
    }

    /// The directory holding every mailbox's pacing record.
    pub fn pacing(&self) -> PathBuf {
        self.queue.join("pacing")
    }

    /// The pacing record of `account`.
    pub fn pacing_file(&self, account: &str) -> PathBuf {
        self.pacing().join(format!("{}.json", file_name(account)))
    }

    /// The directory that holds `queue.dir` (`.` for a bare relative name).
    pub fn root(&self) -> PathBuf {
        match self.queue.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
            _ => PathBuf::from("."),
        }
    }

    /// The token cache of `account`: its `oauth.token_cache`, or
    /// `tokens/{account}.json` in [`StateDir::root`].
    pub fn token_cache(&self, account: &AccountConfig) -> PathBuf {
        self.token_cache_of(&account.name, account.oauth.token_cache.as_deref())
    }

    pub(crate) fn token_cache_of(&self, account: &str, configured: Option<&Path>) -> PathBuf {
        match configured {
            Some(path) => path.to_owned(),
            None => self
                .root()
                .join("tokens")
                .join(format!("{}.json", file_name(account))),
        }
    }
}

/// An account name made safe as a file name: anything but ASCII letters,
/// digits, `.`, `_` and `-` becomes `_`, and a name of dots alone is
/// prefixed with `_` (never `.` or `..`).
pub fn file_name(account: &str) -> String {
    let name: String = account
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '_' | '-' => c,
            _ => '_',
        })
        .collect();
    if name.is_empty() || name.chars().all(|c| c == '.') {
        format!("_{name}")
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::{file_name, StateDir};
    use std::path::{Path, PathBuf};

    #[test]
    fn paths_keep_todays_layout() {
        let state = StateDir::around(Path::new("/var/lib/smtp-oauth-relay/queue"));
        assert_eq!(state.queue(), Path::new("/var/lib/smtp-oauth-relay/queue"));
        assert_eq!(
            state.pacing_file("main"),
            PathBuf::from("/var/lib/smtp-oauth-relay/queue/pacing/main.json")
        );
        assert_eq!(
            state.token_cache_of("main", None),
            PathBuf::from("/var/lib/smtp-oauth-relay/tokens/main.json")
        );
        assert_eq!(
            state.token_cache_of("main", Some(Path::new("/elsewhere.json"))),
            PathBuf::from("/elsewhere.json")
        );
        assert_eq!(
            StateDir::around(Path::new("queue")).token_cache_of("a", None),
            PathBuf::from("./tokens/a.json")
        );
    }

    #[test]
    fn account_names_cannot_leave_the_directory() {
        assert_eq!(file_name("sales@contoso.com"), "sales_contoso.com");
        assert_eq!(file_name("../etc/passwd"), ".._etc_passwd");
        assert_eq!(file_name(".."), "_..");
        assert_eq!(file_name(""), "_");
        assert_eq!(file_name("a/b c"), "a_b_c");
    }
}

//! Secrets kept out of logs.

use std::fmt;
use std::path::Path;

use crate::StoreError;

/// A secret (the database password, a refresh token): printed as
/// `[redacted]` by `Debug` and `Display`; [`Secret::expose`] is the only way
/// to its value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// Reads a secret from a file (a systemd credential, a Kubernetes
    /// secret); one trailing line break is not part of it.
    pub fn from_file(path: &Path) -> Result<Secret, StoreError> {
        let text = std::fs::read_to_string(path).map_err(|source| StoreError::PasswordFile {
            path: path.to_path_buf(),
            source,
        })?;
        let text = text.strip_suffix('\n').unwrap_or(&text);
        let text = text.strip_suffix('\r').unwrap_or(text);
        Ok(Secret(text.to_string()))
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_printed() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "[redacted] [redacted]");
        assert_eq!(s.expose(), "hunter2");
    }
}

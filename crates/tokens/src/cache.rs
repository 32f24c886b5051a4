//! The token cache of a delegated (`refresh_token`) account: the refresh
//! token, and the last access token with its expiry.
//!
//! Written atomically — temp file in the same directory (mode 0600), fsync,
//! rename over the old file, fsync the directory — so a crash at any moment
//! leaves either the old or the new cache, never a torn one. Optionally
//! sealed with ChaCha20-Poly1305 (aws-lc-rs) under a 32-byte key from
//! `token_cache_key_file`. Relays sharing a database keep the rotating
//! refresh token there too; with a key it is sealed the same way
//! ([`TokenCache::seal_shared`]), so the database alone does not give the
//! token away.

use crate::{assertion::unix_now, TokenError};
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use base64::{engine::general_purpose::STANDARD, Engine as _};
use relay_config::Secret;
use serde::{Deserialize, Serialize};
use std::{
    io::Write,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

/// Bound into every sealed cache, so a ciphertext of something else does not open.
const AAD: &[u8] = b"smtp-oauth-relay token cache v1";
const ENCRYPTION: &str = "chacha20-poly1305";
/// Bound, with the account's name, into a refresh token sealed for the
/// shared database: it opens for that account only.
const SHARED_AAD: &str = "smtp-oauth-relay shared refresh token v1 ";
/// How a sealed shared token starts: then base64 of nonce and ciphertext.
const SHARED_SEALED: &str = "sealed:chacha20-poly1305:";

/// What the cache holds.
#[derive(Clone, Serialize, Deserialize)]
pub struct CacheEntry {
    /// Format version: 1.
    pub version: u32,
    /// The account it belongs to (for humans; the path is what counts).
    pub account: String,
    /// `microsoft` or `google`.
    pub provider: String,
    /// The client the refresh token was issued to.
    pub client_id: String,
    /// The scope that was granted.
    pub scope: String,
    /// The refresh token.
    pub refresh_token: String,
    /// The access token that came with it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// When that access token expires (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token_expires_at: Option<u64>,
    /// When this entry was written (Unix seconds).
    pub updated_at: u64,
}

impl std::fmt::Debug for CacheEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheEntry")
            .field("account", &self.account)
            .field("client_id", &self.client_id)
            .field("scope", &self.scope)
            .field("refresh_token", &"[redacted]")
            .field("access_token_expires_at", &self.access_token_expires_at)
            .field("updated_at", &self.updated_at)
            .finish()
    }
}

impl CacheEntry {
    pub(crate) fn refresh_token(&self) -> Secret {
        Secret::new(self.refresh_token.clone())
    }
}

#[derive(Serialize, Deserialize)]
struct Sealed {
    version: u32,
    encryption: String,
    nonce: String,
    ciphertext: String,
}

/// The cache file of one account.
#[derive(Clone)]
pub struct TokenCache {
    path: PathBuf,
    key: Option<[u8; 32]>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("path", &self.path)
            .field("encrypted", &self.key.is_some())
            .finish()
    }
}

impl TokenCache {
    /// The cache at `path`, sealed with the key in `key_file` if given.
    pub fn new(path: PathBuf, key_file: Option<&Path>) -> Result<Self, TokenError> {
        let key = match key_file {
            None => None,
            Some(file) => {
                let text = std::fs::read_to_string(file).map_err(|e| TokenError::Credential {
                    what: "token_cache_key_file",
                    path: file.to_owned(),
                    reason: e.to_string(),
                })?;
                Some(relay_config::decode_cache_key(&text).ok_or_else(|| {
                    TokenError::Credential {
                        what: "token_cache_key_file",
                        path: file.to_owned(),
                        reason: "must hold a 32-byte key, base64 or hex".into(),
                    }
                })?)
            }
        };
        Ok(TokenCache { path, key })
    }

    /// Where the cache lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, reason: impl Into<String>) -> TokenError {
        TokenError::Cache {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// The file's bytes, or `None` when there is no cache yet.
    pub(crate) fn read_raw(&self) -> Result<Option<Vec<u8>>, TokenError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.error(e.to_string())),
        }
    }

    /// Parses (and opens, when sealed) the file's bytes.
    pub(crate) fn parse(&self, bytes: &[u8]) -> Result<CacheEntry, TokenError> {
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| self.error(format!("not a token cache: {e}")))?;
        let plain = if value.get("encryption").is_some() {
            let sealed: Sealed = serde_json::from_value(value)
                .map_err(|e| self.error(format!("not a sealed token cache: {e}")))?;
            let Some(key) = &self.key else {
                return Err(
                    self.error("the cache is encrypted: set token_cache_key_file to its key")
                );
            };
            if sealed.encryption != ENCRYPTION {
                return Err(self.error(format!("unknown encryption {:?}", sealed.encryption)));
            }
            let nonce: [u8; NONCE_LEN] = STANDARD
                .decode(&sealed.nonce)
                .ok()
                .and_then(|n| n.try_into().ok())
                .ok_or_else(|| self.error("bad nonce"))?;
            let data = STANDARD
                .decode(&sealed.ciphertext)
                .map_err(|_| self.error("bad ciphertext"))?;
            open(key, nonce, AAD, data).ok_or_else(|| {
                self.error("cannot decrypt: token_cache_key_file is not the key it was written with, or the file was altered")
            })?
        } else {
            if self.key.is_some() {
                tracing::warn!(path = %self.path.display(), "token cache is not encrypted; it will be from the next write");
            }
            bytes.to_vec()
        };
        serde_json::from_slice(&plain).map_err(|e| self.error(format!("not a token cache: {e}")))
    }

    /// Reads the cache; `None` when there is none yet.
    pub fn load(&self) -> Result<Option<CacheEntry>, TokenError> {
        match self.read_raw()? {
            None => Ok(None),
            Some(bytes) => self.parse(&bytes).map(Some),
        }
    }

    /// Writes `entry` atomically and durably, mode 0600; returns the bytes
    /// written (what `read_raw` will return until someone else writes).
    pub fn save(&self, entry: &CacheEntry) -> Result<Vec<u8>, TokenError> {
        let plain = serde_json::to_vec_pretty(entry).map_err(|e| self.error(e.to_string()))?;
        let bytes = match &self.key {
            None => plain,
            Some(key) => {
                let (nonce, data) =
                    seal(key, AAD, plain).ok_or_else(|| self.error("encryption failed"))?;
                serde_json::to_vec_pretty(&Sealed {
                    version: 1,
                    encryption: ENCRYPTION.into(),
                    nonce: STANDARD.encode(nonce),
                    ciphertext: STANDARD.encode(&data),
                })
                .map_err(|e| self.error(e.to_string()))?
            }
        };
        write_atomically(&self.path, &bytes).map_err(|e| self.error(e.to_string()))?;
        Ok(bytes)
    }

    /// A new entry for this cache.
    pub(crate) fn entry(
        account: &str,
        provider: &str,
        client_id: &str,
        scope: &str,
        refresh_token: &Secret,
        access_token: Option<(&Secret, u64)>,
    ) -> CacheEntry {
        CacheEntry {
            version: 1,
            account: account.to_owned(),
            provider: provider.to_owned(),
            client_id: client_id.to_owned(),
            scope: scope.to_owned(),
            refresh_token: refresh_token.expose().to_owned(),
            access_token: access_token.map(|(t, _)| t.expose().to_owned()),
            access_token_expires_at: access_token
                .map(|(_, lifetime)| unix_now().saturating_add(lifetime)),
            updated_at: unix_now(),
        }
    }
}

impl TokenCache {
    /// The refresh token as the shared database keeps it: sealed under this
    /// cache's key and bound to `account` when there is a key, else as it
    /// is.
    pub(crate) fn seal_shared(&self, account: &str, token: &Secret) -> Result<Secret, TokenError> {
        let Some(key) = &self.key else {
            return Ok(token.clone());
        };
        let aad = format!("{SHARED_AAD}{account}");
        let (nonce, data) = seal(key, aad.as_bytes(), token.expose().as_bytes().to_vec())
            .ok_or_else(|| shared_error(account, "cannot be encrypted"))?;
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&data);
        Ok(Secret::new(format!(
            "{SHARED_SEALED}{}",
            STANDARD.encode(sealed)
        )))
    }

    /// The refresh token in `stored` (as [`TokenCache::seal_shared`] wrote
    /// it, or a plain one stored before a key was set).
    pub(crate) fn open_shared(&self, account: &str, stored: &Secret) -> Result<Secret, TokenError> {
        let Some(text) = stored.expose().strip_prefix(SHARED_SEALED) else {
            return Ok(stored.clone());
        };
        let Some(key) = &self.key else {
            return Err(shared_error(
                account,
                "is encrypted: set oauth.token_cache_key_file to the key the other relays use",
            ));
        };
        let aad = format!("{SHARED_AAD}{account}");
        let plain = STANDARD
            .decode(text)
            .ok()
            .filter(|sealed| sealed.len() > NONCE_LEN)
            .and_then(|mut sealed| {
                let data = sealed.split_off(NONCE_LEN);
                let nonce: [u8; NONCE_LEN] = sealed.try_into().ok()?;
                open(key, nonce, aad.as_bytes(), data)
            })
            .and_then(|plain| String::from_utf8(plain).ok())
            .ok_or_else(|| {
                shared_error(
                    account,
                    "cannot be decrypted: oauth.token_cache_key_file differs from the other relays' key, or the stored token was altered",
                )
            })?;
        Ok(Secret::new(plain))
    }
}

fn shared_error(account: &str, reason: &str) -> TokenError {
    TokenError::SharedToken {
        account: account.to_owned(),
        reason: reason.to_owned(),
    }
}

fn aead_key(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).expect("a 32-byte ChaCha20 key"))
}

/// `plain` sealed under `key` with a fresh random nonce, bound to `aad`.
fn seal(key: &[u8; 32], aad: &[u8], mut plain: Vec<u8>) -> Option<([u8; NONCE_LEN], Vec<u8>)> {
    let nonce: [u8; NONCE_LEN] = rand::random();
    aead_key(key)
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut plain,
        )
        .ok()?;
    Some((nonce, plain))
}

/// What [`seal`] sealed, if `key`, `nonce` and `aad` are the ones it used
/// and nothing was altered.
fn open(key: &[u8; 32], nonce: [u8; NONCE_LEN], aad: &[u8], mut data: Vec<u8>) -> Option<Vec<u8>> {
    let opened = aead_key(key)
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut data,
        )
        .ok()?;
    Some(opened.to_vec())
}

/// temp file (0600, same directory) → fsync → rename → fsync directory.
/// A cache replacing another keeps the old one's owner when the process may
/// change it (e.g. `authorize` run as root for the service user).
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    relay_config::create_private_dir(&dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "token-cache".into());
    let temp = dir.join(format!(
        ".{name}.{}.{:016x}.tmp",
        std::process::id(),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        let owner = std::fs::metadata(path)
            .or_else(|_| std::fs::metadata(&dir))
            .map(|m| (m.uid(), m.gid()));
        if let (Ok((uid, gid)), Ok(mine)) = (owner, file.metadata()) {
            if (uid, gid) != (mine.uid(), mine.gid()) {
                // Only root may; anyone else keeps their own.
                let _ = std::os::unix::fs::fchown(&file, Some(uid), Some(gid));
            }
        }
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&temp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn entry() -> CacheEntry {
        TokenCache::entry(
            "main",
            "microsoft",
            "client",
            "scope",
            &Secret::new("rt-1"),
            Some((&Secret::new("at-1"), 3600)),
        )
    }

    #[test]
    fn round_trip_plain_and_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let plain = TokenCache::new(dir.path().join("a/b/main.json"), None).unwrap();
        assert!(plain.load().unwrap().is_none());
        plain.save(&entry()).unwrap();
        assert_eq!(plain.load().unwrap().unwrap().refresh_token, "rt-1");
        let mode = std::fs::metadata(plain.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(dir.path().join("a/b"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);

        let key_file = dir.path().join("key");
        std::fs::write(&key_file, STANDARD.encode([7u8; 32])).unwrap();
        let sealed = TokenCache::new(dir.path().join("sealed.json"), Some(&key_file)).unwrap();
        sealed.save(&entry()).unwrap();
        let raw = std::fs::read_to_string(sealed.path()).unwrap();
        assert!(!raw.contains("rt-1") && !raw.contains("at-1"), "{raw}");
        assert_eq!(sealed.load().unwrap().unwrap().refresh_token, "rt-1");

        // another key, or no key, cannot open it
        std::fs::write(&key_file, "00".repeat(32)).unwrap();
        let wrong = TokenCache::new(sealed.path().to_owned(), Some(&key_file)).unwrap();
        assert!(wrong
            .load()
            .unwrap_err()
            .to_string()
            .contains("cannot decrypt"));
        let none = TokenCache::new(sealed.path().to_owned(), None).unwrap();
        assert!(none
            .load()
            .unwrap_err()
            .to_string()
            .contains("token_cache_key_file"));
        // no temp files left behind
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
    }

    #[test]
    fn a_shared_token_is_sealed_for_its_account_under_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("key");
        std::fs::write(&key_file, STANDARD.encode([7u8; 32])).unwrap();
        let keyed = TokenCache::new(dir.path().join("c.json"), Some(&key_file)).unwrap();
        let token = Secret::new("rt-secret");
        let stored = keyed.seal_shared("main", &token).unwrap();
        assert!(stored.expose().starts_with("sealed:chacha20-poly1305:"));
        assert!(!stored.expose().contains("rt-secret"));
        assert_ne!(
            keyed.seal_shared("main", &token).unwrap(),
            stored,
            "a fresh nonce each time"
        );
        assert_eq!(keyed.open_shared("main", &stored).unwrap(), token);
        // a plain token stored before the key was set still opens
        assert_eq!(keyed.open_shared("main", &token).unwrap(), token);
        // not for another account, not without the key, not with another
        let error = |r: Result<Secret, TokenError>| r.unwrap_err().to_string();
        assert!(error(keyed.open_shared("other", &stored)).contains("cannot be decrypted"));
        let keyless = TokenCache::new(dir.path().join("c.json"), None).unwrap();
        assert_eq!(keyless.seal_shared("main", &token).unwrap(), token);
        assert!(error(keyless.open_shared("main", &stored)).contains("token_cache_key_file"));
        std::fs::write(&key_file, "00".repeat(32)).unwrap();
        let wrong = TokenCache::new(dir.path().join("c.json"), Some(&key_file)).unwrap();
        assert!(error(wrong.open_shared("main", &stored)).contains("cannot be decrypted"));
    }

    #[test]
    fn debug_is_redacted() {
        let text = format!("{:?}", entry());
        assert!(!text.contains("rt-1") && !text.contains("at-1"), "{text}");
    }
}

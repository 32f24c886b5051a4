//! Local `AUTH` (PLAIN and LOGIN) against `[[listener.users]]`, whose
//! passwords are stored as argon2 PHC strings, and the per-client limit on
//! failed logins. These credentials are checked here and go nowhere else.

use crate::ListenerError;
use argon2::{password_hash::PasswordHash, Argon2, PasswordVerifier};
use base64::{engine::general_purpose::STANDARD, Engine as _};
use relay_config::ListenerUser;
use std::{collections::HashMap, net::IpAddr, sync::Mutex, time::Duration};
use tokio::time::Instant;

/// Failed logins from one IP address before it is refused for a while.
pub const MAX_AUTH_FAILURES: u32 = 5;
/// How long an address that reached [`MAX_AUTH_FAILURES`] is refused
/// (counted from its last failure).
pub const AUTH_LOCKOUT: Duration = Duration::from_secs(300);

/// Verified against when the user name is unknown, so that an unknown name
/// takes as long to refuse as a wrong password.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$HCnBTBwmqWBH6+MABtUsJw$nzDTlEgexGNcU1hcoCpvs1wYGpqIb788qqirz5gTDgQ";

/// The users who may log in.
#[derive(Debug, Default, Clone)]
pub struct Users {
    hashes: HashMap<String, String>,
}

impl Users {
    /// Checks every hash parses as a PHC string.
    pub fn new(users: &[ListenerUser]) -> Result<Users, ListenerError> {
        let mut hashes = HashMap::new();
        for (index, user) in users.iter().enumerate() {
            PasswordHash::new(&user.password_hash)
                .map_err(|source| ListenerError::PasswordHash { index, source })?;
            hashes.insert(user.username.clone(), user.password_hash.clone());
        }
        Ok(Users { hashes })
    }

    /// Whether `password` is `username`'s. Slow on purpose (argon2): call
    /// it off the async threads.
    pub fn verify(&self, username: &str, password: &[u8]) -> bool {
        let (phc, known) = match self.hashes.get(username) {
            Some(phc) => (phc.as_str(), true),
            None => (DUMMY_HASH, false),
        };
        let Ok(hash) = PasswordHash::new(phc) else {
            return false;
        };
        let matches = Argon2::default().verify_password(password, &hash).is_ok();
        known && matches
    }
}

/// An argon2id PHC string for `password` (default parameters, a random
/// salt): what `[[listener.users]] password_hash` holds.
pub fn hash_password(password: &[u8]) -> Result<String, ListenerError> {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password, &salt)
        .map(|hash| hash.to_string())
        .map_err(ListenerError::Hashing)
}

/// The `authzid NUL authcid NUL password` of `AUTH PLAIN`, decoded; the
/// authorization identity, if given, must be the user's own.
pub fn decode_plain(response: &str) -> Option<(String, Vec<u8>)> {
    let bytes = STANDARD.decode(response.trim()).ok()?;
    let mut parts = bytes.split(|&b| b == 0);
    let (authzid, authcid, password) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || authcid.is_empty() {
        return None;
    }
    let user = String::from_utf8(authcid.to_vec()).ok()?;
    if !authzid.is_empty() && authzid != authcid {
        return None;
    }
    Some((user, password.to_vec()))
}

/// One base64 line of `AUTH LOGIN`.
pub fn decode_line(response: &str) -> Option<Vec<u8>> {
    STANDARD.decode(response.trim()).ok()
}

/// Failed logins per client address; shared by every session of a server
/// and kept across reloads.
#[derive(Debug, Default)]
pub struct AuthLimiter {
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl AuthLimiter {
    /// Whether `ip` failed too often lately.
    pub fn blocked(&self, ip: IpAddr) -> bool {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match failures.get(&ip) {
            Some((_, last)) if last.elapsed() >= AUTH_LOCKOUT => {
                failures.remove(&ip);
                false
            }
            Some((count, _)) => *count >= MAX_AUTH_FAILURES,
            None => false,
        }
    }

    /// Counts a failed login from `ip`.
    pub fn failed(&self, ip: IpAddr) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() > 10_000 {
            failures.retain(|_, (_, last)| last.elapsed() < AUTH_LOCKOUT);
        }
        let entry = failures.entry(ip).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= AUTH_LOCKOUT {
            entry.0 = 0;
        }
        entry.0 += 1;
        entry.1 = Instant::now();
    }

    /// A successful login forgets earlier failures.
    pub fn succeeded(&self, ip: IpAddr) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_responses() {
        let enc = |s: &[u8]| STANDARD.encode(s);
        assert_eq!(
            decode_plain(&enc(b"\0app\0secret")),
            Some(("app".into(), b"secret".to_vec()))
        );
        assert_eq!(
            decode_plain(&enc(b"app\0app\0secret")),
            Some(("app".into(), b"secret".to_vec()))
        );
        assert_eq!(decode_plain(&enc(b"other\0app\0secret")), None);
        assert_eq!(decode_plain(&enc(b"\0\0secret")), None);
        assert_eq!(decode_plain(&enc(b"app secret")), None);
        assert_eq!(decode_plain("not base64!"), None);
    }

    #[test]
    fn hashes_verify() {
        let phc = hash_password(b"pa55").expect("hash");
        assert!(phc.starts_with("$argon2id$v=19$"), "{phc}");
        let users = Users::new(&[ListenerUser {
            username: "u".into(),
            password_hash: phc,
        }])
        .expect("valid");
        assert!(users.verify("u", b"pa55"));
        assert!(!users.verify("u", b"pa56"));
    }

    #[test]
    fn failed_logins_are_counted_per_address() {
        let limiter = AuthLimiter::default();
        let ip = "192.0.2.1".parse().expect("ip");
        for _ in 0..MAX_AUTH_FAILURES {
            assert!(!limiter.blocked(ip));
            limiter.failed(ip);
        }
        assert!(limiter.blocked(ip));
        assert!(!limiter.blocked("192.0.2.2".parse().expect("ip")));
        limiter.succeeded(ip);
        assert!(!limiter.blocked(ip));
    }

    #[test]
    fn verify_known_unknown_and_wrong() {
        let users = Users::new(&[ListenerUser {
            username: "timing".into(),
            password_hash: DUMMY_HASH.into(),
        }])
        .expect("valid hash");
        assert!(users.verify("timing", b"not a password of anyone: timing only"));
        assert!(!users.verify("timing", b"wrong"));
        assert!(!users.verify("nobody", b"not a password of anyone: timing only"));
        assert!(Users::new(&[ListenerUser {
            username: "x".into(),
            password_hash: "plaintext".into(),
        }])
        .is_err());
    }
}

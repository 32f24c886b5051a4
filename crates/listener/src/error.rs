//! Why the listener cannot start, or cannot take a new configuration.

use std::{net::SocketAddr, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("listener.tls_certificate and tls_private_key go together")]
    HalfTls,
    /// `key` is the configuration key naming the file.
    #[error("listener.{key} {}: {source}", path.display())]
    Pem {
        key: &'static str,
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("listener.{key} {}: no {what} in it", path.display())]
    NothingInPem {
        key: &'static str,
        path: PathBuf,
        what: &'static str,
    },
    #[error("listener.tls_certificate {} and tls_private_key {}: {source}", certificate.display(), private_key.display())]
    Tls {
        certificate: PathBuf,
        private_key: PathBuf,
        source: rustls::Error,
    },
    #[error("listener.users[{index}].password_hash is not a PHC string: {source}")]
    PasswordHash {
        index: usize,
        source: argon2::password_hash::Error,
    },
    #[error("cannot hash the password: {0}")]
    Hashing(argon2::password_hash::Error),
}

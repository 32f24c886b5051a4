use std::path::PathBuf;

/// Why delivery cannot be set up (problems with single messages are
/// recorded in the queue, not raised).
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// `upstream.ca_file` cannot be used.
    #[error("upstream.ca_file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    /// Neither the system nor `ca_file` provides a trust root.
    #[error("no trusted root certificates: install the system's CA bundle (ca-certificates) or set upstream.ca_file")]
    NoTrustRoots,
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(String),
}

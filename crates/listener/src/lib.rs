//! The inbound SMTP server legacy applications talk to.
//!
//! It speaks ESMTP (unauthenticated unless `listener.auth` says otherwise) to the networks in
//! `listener.allowed_networks` only (everyone else gets `554` and is
//! disconnected), routes each envelope sender to an account, and answers
//! `250` to `DATA` only after the queue has the message on disk.
//!
//! The binary needs [`bind`], [`serve`], a [`Context`] (built again on
//! reload and swapped in for new connections), the [`Router`] and
//! [`Intake`] inside it,
//! and [`hash_password`] for `hash-password`. Inside:
//!
//! - `server`: binding, accepting, the allow-list, shutdown.
//! - `session`: one SMTP conversation, a state machine over smtp-proto's
//!   command parser; pipelined input is handled by working through each read
//!   buffer command by command.
//! - `data`: the message receiver; end-of-data is only `CRLF.CRLF`, bare CR
//!   and LF are normalised to CRLF, so no smuggled command gets through.
//! - `route`: which account sends for which sender.
//! - `intake`: the queue the sessions store into, or none yet (the
//!   relay's queue database unreachable at start: `451 4.3.0`).
//! - `syntax`: command-line and address checks smtp-proto does not make.
//! - `tls`: STARTTLS and implicit TLS (certificates read at each reload).
//! - `auth`: local AUTH PLAIN/LOGIN against argon2 hashes, and the limit
//!   on failed logins per client.
//!
//! The `fuzzing` feature also exports the session and the data receiver,
//! for the fuzz targets, the benchmarks and tests that drive a session over
//! an in-memory stream.

mod auth;
mod data;
mod error;
mod intake;
mod route;
mod server;
mod session;
mod syntax;
mod tls;

pub use auth::hash_password;
pub use error::ListenerError;
pub use intake::Intake;
pub use route::Router;
pub use server::{bind, serve, Listener};
pub use session::Context;

/// The parts fuzz targets and benchmarks drive directly.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    pub use crate::data::DataReceiver;
    pub use crate::session::Session;
}

//! The inbound SMTP server legacy applications talk to.
//!
//! It speaks ESMTP (unauthenticated unless `listener.auth` says otherwise) to the networks in
//! `listener.allowed_networks` only (everyone else gets `554` and is
//! disconnected), routes each envelope sender to an account, and answers
//! `250` to `DATA` only after the queue has the message on disk.
//!
//! - [`server`]: binding, accepting, the allow-list, shutdown.
//! - [`session`]: one SMTP conversation, a state machine over smtp-proto's
//!   command parser; pipelined input is handled by working through each read
//!   buffer command by command.
//! - [`data`]: the message receiver; end-of-data is only `CRLF.CRLF`, bare CR
//!   and LF are normalised to CRLF, so no smuggled command gets through.
//! - [`route`]: which account sends for which sender.
//! - [`syntax`]: command-line and address checks smtp-proto does not make.
//! - [`tls`]: STARTTLS and implicit TLS (certificates read at each reload).
//! - [`auth`]: local AUTH PLAIN/LOGIN against argon2 hashes, and the limit
//!   on failed logins per client.

pub mod auth;
pub mod data;
pub mod route;
pub mod server;
pub mod session;
pub mod syntax;
pub mod tls;

pub use route::Router;
pub use server::{bind, bind_with_tls, serve, serve_live, Listener, ListenerError, Live, Shared};

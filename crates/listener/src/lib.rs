//! The inbound SMTP server legacy applications talk to.
//!
//! It speaks unauthenticated ESMTP to the networks in
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

pub mod data;
pub mod route;
pub mod server;
pub mod session;

pub use route::Router;
pub use server::{bind, serve, serve_live, Listener, ListenerError, Live};

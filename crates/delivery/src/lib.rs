//! Delivery: takes due messages from the queue and hands them to a
//! [`Transport`] (SMTP submission to Microsoft 365 over TLS with AUTH
//! XOAUTH2, [`Upstream`], or Microsoft Graph's `sendMail`,
//! [`transport::graph::Graph`]), recording each recipient's outcome back in the
//! queue.
//!
//! Each account gets `max_connections` workers; a worker holds at most one
//! authenticated session and reuses it for consecutive messages until it
//! has been idle for the transport's idle timeout, so the mailbox never
//! sees more sessions than Microsoft allows. A [`Pacer`] per account keeps
//! the mailbox within its message and recipient rates. Relays sharing a
//! database ([`Account::shared`]) share each mailbox's pace and its cap on
//! sessions through it, and obey together what Microsoft's throttling told
//! any one of them (a pause, fewer sessions after a `432 4.3.2`). Each
//! reply becomes
//! an [`Outcome`] where it is received ([`classify`]); the queue retries
//! the temporary ones.

mod classify;
mod dsn;
mod error;
mod pace;
mod probe;
mod reply;
mod rewrite;
mod session;
mod shared;
mod tls;
pub mod transport;
mod worker;

pub use classify::{classify, classify_auth, hint, SMTP_AUTH_OFF_FIX};
pub use error::DeliveryError;
pub use pace::{Limits, Pacer};
pub use probe::{Finding, Secured, Step};
pub use relay_outcome::{Enhanced, Outcome, Reason, Reply, Verdict};
pub use rewrite::rewrite_from;
pub use session::Upstream;
pub use tls::connector;
pub use transport::Transport;
pub use worker::{spawn, spawn_into, Account, Settings};

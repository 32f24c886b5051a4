//! Delivery: takes due messages from the queue and submits them to the
//! upstream (Microsoft 365) over TLS with AUTH XOAUTH2, recording each
//! recipient's outcome back in the queue.
//!
//! Each account gets `max_connections` workers; a worker holds at most one
//! authenticated connection and reuses it for consecutive messages until it
//! has been idle for `upstream.idle_timeout`, so the mailbox never sees more
//! connections than Microsoft allows. A [`Pacer`] per account keeps the
//! mailbox within its message and recipient rates. Replies are classified temporary or
//! permanent ([`classify`]); the queue retries the former.

mod classify;
mod dsn;
mod error;
mod pace;
mod probe;
mod reply;
mod rewrite;
mod session;
mod tls;
mod worker;

pub use classify::{classify, Verdict};
pub use error::DeliveryError;
pub use pace::{Limits, Pacer};
pub use probe::{Secured, Step};
pub use reply::{Enhanced, Reply};
pub use rewrite::rewrite_from;
pub use session::Upstream;
pub use tls::connector;
pub use worker::{spawn, Account};

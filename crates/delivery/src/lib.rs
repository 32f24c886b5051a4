//! Delivery: takes due messages from the queue and submits them to the
//! upstream (Microsoft 365) over TLS with AUTH XOAUTH2, recording each
//! recipient's outcome back in the queue.
//!
//! Each account gets `upstream.max_connections` workers; a worker holds at
//! most one authenticated connection and reuses it for consecutive messages
//! until it has been idle for [`IDLE_TIMEOUT`], so the mailbox never sees more
//! connections than Microsoft allows. Replies are classified temporary or
//! permanent ([`classify`]); the queue retries the former.

mod classify;
mod error;
mod reply;
mod session;
mod tls;
mod worker;

pub use classify::{classify, Verdict};
pub use error::DeliveryError;
pub use reply::{Enhanced, Reply};
pub use session::Upstream;
pub use tls::connector;
pub use worker::{spawn, Account, IDLE_TIMEOUT};

//! Sending mail through Microsoft Graph, for mailboxes whose tenant has SMTP
//! AUTH switched off.
//!
//! [`GraphClient::send`] delivers a queued message to exactly its envelope
//! recipients (Graph itself only reads the MIME header), at any size (no
//! request over 4 MiB: large attachments go through upload sessions), with
//! at most [`Settings::max_requests`] requests in flight per mailbox and no
//! request for a mailbox while Graph's `Retry-After` runs. Failures come back
//! as a [`GraphError`] whose [`Failure`] says what the queue should do.
//!
//! The crate knows nothing of the queue, tokens or configuration: the caller
//! passes the bearer token, the mailbox, the envelope and the MIME bytes.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod client;
mod error;
mod mime;
mod settings;

pub use client::{
    Accepted, GraphClient, DRAFT_TAG_HEADER, MAX_REQUEST, UPLOAD_CHUNK, UPLOAD_SESSION_ABOVE,
};
pub use error::{Failure, GraphError, Step, ACCESS_DENIED_FIX, DRAFT_FORBIDDEN_FIX, SEND_AS_FIX};
pub use settings::{
    Endpoint, EndpointError, Settings, DEFAULT_ENDPOINT, DEFAULT_MAX_REQUESTS, DEFAULT_TIMEOUT,
};

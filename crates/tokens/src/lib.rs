//! The token manager: obtains OAuth 2.0 access tokens for each account and
//! keeps them fresh in the background, so a delivery never waits for (or
//! presents) an expiring token.
//!
//! One [`TokenManager`] per account. Deliveries call [`TokenManager::token`];
//! a background task started by [`TokenManager::spawn_refresher`] renews the
//! token ahead of expiry — when ten minutes or a third of its lifetime remain,
//! whichever is sooner — with or without traffic. Concurrent callers share one
//! in-flight request. A failed request starts an exponential back-off (1 s
//! doubling to 5 minutes, with jitter): the current token is used until it
//! expires, and without one callers get [`TokenError::Unavailable`] at once
//! instead of making requests. When the upstream refuses a token the relay
//! thought valid, [`TokenManager::refresh_rejected`] fetches a new one, once
//! per token.
//!
//! Nothing the identity platform says is trusted to be sane: lifetimes are
//! planned within 5 s and a day (a stated lifetime under 5 s also counts
//! toward the back-off), replies are read up to 64 KiB and
//! their texts clipped before they reach an error ([`relay_http`]).
//!
//! A delegated account's rotating refresh token can be shared by relays on
//! one database ([`TokenManager::shared`]): one relay redeems it at a time
//! and the others redeem the token it stored.
//!
//! Tokens and secrets are [`relay_config::Secret`]s: they never reach a log.

mod assertion;
mod authorize;
mod cache;
mod claims;
mod error;
mod explain;
mod http;
mod lifetime;
mod manager;
mod shared;
mod source;

pub use authorize::{now_unix, BrowserAuthorization, DeviceAuthorization};
pub use cache::{CacheEntry, TokenCache};
pub use claims::{describe_token, TokenReport};
pub use error::TokenError;
pub use explain::{explain_aadsts, explain_error};
pub use manager::{AccessToken, TokenManager};
pub use source::TokenSource;

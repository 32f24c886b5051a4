//! A loopback stand-in for Microsoft 365, for tests and demos.
//!
//! The relay delivers mail to `smtp.office365.com:587` after obtaining an
//! OAuth 2.0 access token from the Microsoft identity platform. Neither is
//! reachable (or desirable) in tests, so this crate serves fakes of both on
//! `127.0.0.1`, each on its own port (the submission server, which can be
//! stopped and restarted, on a [`reserved_port`]):
//!
//! * [`IdentityPlatform`] — an HTTP token endpoint shaped like
//!   `https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token`. It
//!   issues signed JWT access tokens for the client-credentials grant and
//!   answers errors with the same JSON (`AADSTSnnnn` codes) as the real one.
//! * [`SubmissionServer`] — an SMTP submission server shaped like
//!   Exchange Online: STARTTLS with a generated CA, `AUTH XOAUTH2` judged
//!   against the tokens the [`IdentityPlatform`] issued, SendAs checks, and
//!   Microsoft's reply texts.
//! * [`GraphServer`] — the Microsoft Graph mail API (`sendMail`, drafts,
//!   attachments, upload sessions) judging tokens from the [`IdentityPlatform`].
//!
//! All three record what they see (token requests, accepted messages, refused
//! messages, failed logins) and can be scripted to fail in specific ways, so
//! end-to-end tests can assert on the relay's behaviour over real sockets.
//! The relay's `demo` command also uses them to let a user watch messages
//! arrive without a Microsoft 365 tenant.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use relay_standin::{IdentityPlatform, SubmissionServer};
//!
//! let idp = IdentityPlatform::start().await?;
//! let smtp = SubmissionServer::start(idp.clone()).await?;
//! // Point the relay at idp.authority(), 127.0.0.1:smtp.port() and
//! // smtp.ca_pem(), send it a message, then:
//! let got = smtp
//!     .wait_for_messages(1, std::time::Duration::from_secs(5))
//!     .await;
//! # let _ = got;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod browser;
mod credentials;
mod graph;
mod http;
mod identity;
mod jwt;
mod port;
mod relay_config;
mod session;
mod submission;
mod tls;
mod util;

pub use browser::open_in_browser;
pub use credentials::ClientCertificate;
pub use graph::{
    GraphAttachment, GraphCall, GraphFault, GraphMessage, GraphRequest, GraphServer, GRAPH_AUDIENCE,
};
pub use identity::{AssertionRecord, Consent, IdentityPlatform, TokenFault, TokenRequest};
pub use jwt::{TokenClaims, TokenRejection};
pub use port::reserved_port;
pub use relay_config::{RelayConfig, Section};
pub use submission::{ReceivedMessage, SubmissionOptions, SubmissionServer};
pub use tls::LocalhostCertificate;

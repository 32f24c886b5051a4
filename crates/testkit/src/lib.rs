//! What the relay's tests share: the stand-in Microsoft 365 (re-exported
//! from `relay-standin`, which `demo` also ships) and helpers that only tests
//! need. The production binary never links this crate.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod database;
mod postgres;
mod wait;

pub use database::SharedDatabase;
pub use postgres::{Postgres, POSTGRES_PASSWORD, POSTGRES_USER};
pub use relay_standin::*;
pub use wait::poll_until;

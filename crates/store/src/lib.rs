//! The queue's durable store in SQL: an embedded SQLite file by default, or
//! a PostgreSQL database shared by several relays. One implementation
//! serves both (runtime-checked `sqlx` queries whose text both engines
//! accept); the schema is versioned and migrated at [`Store::open`].
//!
//! # Guarantees
//!
//! * **Durable before `Ok`.** SQLite runs in WAL mode with
//!   `synchronous = FULL` (every commit is fsynced); PostgreSQL sessions set
//!   `synchronous_commit = on`. [`Store::insert`] returns only after its
//!   transaction committed. On the embedded store a spooled body is a file
//!   of its own ([`Spool`]), fsynced with its directory before the row
//!   naming it is committed; a file left without a row by a crash is
//!   removed at the next start ([`Store::sweep_bodies`]), a row without
//!   its file never exists.
//! * **Group commit.** Inserts, removals of delivered messages and leases
//!   go through one task that takes every write waiting into one
//!   transaction ([`Store::group_commits`] counts them); none is answered
//!   before the commit that holds it. On SQLite one connection writes
//!   (writers wait their turn for it in order, not in SQLite's sleeping
//!   busy handler) and reads run on others beside it.
//! * **One lease at a time.** [`Store::lease_due`] marks due messages
//!   with this relay's id and an expiry in one atomic statement; only the
//!   holder can [`Store::renew`], [`Store::record`] or [`Store::release`]
//!   it. After the expiry any relay may take it over, so a dead relay's
//!   mail is delivered by another; a relay that finds its lease gone stops
//!   (a duplicate is possible only if it had already handed the message
//!   over).
//! * **Shared limits.** Pacing ([`Store::pace`]), connection slots
//!   ([`Store::acquire_slot`]) and the refresh token
//!   ([`Store::begin_redeem`]) each decide under a lock held in the
//!   database for one transaction (a row lock on PostgreSQL, the write lock
//!   on SQLite), so relays sharing a database see one pace, one set of
//!   slots and one redeemer. So are Microsoft's throttles: a pause one
//!   relay records ([`Store::pause_mailbox`]) stops every relay's pace until
//!   it ends, and a slot one takes away ([`Store::fewer_slots`], after a
//!   `432 4.3.2`) is missing from every relay's cap for the window. Times
//!   are passed in by the caller; relays sharing a database must keep
//!   their clocks in step.
//! * **PostgreSQL 13 or newer.** An older server is refused when the
//!   store opens ([`StoreError::ServerTooOld`]); [`inspect`](fn@inspect)
//!   reports the same without changing anything.
//! * **Import all or nothing.** [`Store::import`] stores an older queue's
//!   messages in one transaction; the caller removes the old files only
//!   after it returned.
//!
//! # Cancel safety
//!
//! Every operation but [`Store::insert`], [`Store::remove`] and
//! [`Store::lease_due`] is one transaction: dropping its future before the
//! commit rolls it back, after the commit it stands. Those three hand their
//! write to the commit task, which completes it even if the future is
//! dropped; see [`Store::insert`] and [`Store::lease_due`].
//!
//! Refresh tokens are stored as given: the token manager seals them first
//! when the account has a cache key. In memory they, and the database
//! password, are `relay_config`'s [`Secret`]s (the configuration reads
//! `database_password_file` like its other credential files).

#![warn(missing_docs)]

mod body;
mod error;
mod holds;
mod inspect;
mod lanes;
mod pace;
mod schema;
mod store;
mod types;

pub use body::{Body, Spool, Spooled};
pub use error::StoreError;
pub use inspect::{inspect, Inspection};
pub use pace::{decide as decide_pace, Admitted, Pace, PaceLimits, Sent};
pub use relay_config::{DatabaseUrl, Secret};
pub use schema::SCHEMA_VERSION;
pub use store::{Location, Redeem, SharedToken, SlotId, Store, StoreSettings};
pub use types::{
    Envelope, LeaseHolder, Message, MessageState, NewMessage, Progress, Recipient, RecipientState,
    Reply,
};

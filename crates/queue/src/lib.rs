//! The relay's durable mail queue.
//!
//! Data flows listener → queue → delivery. The listener calls
//! [`Queue::enqueue`] and answers the SMTP client `250` only after it
//! returns; delivery workers (one set per upstream account) lease due
//! messages with [`Queue::next_due`], ask [`Queue::begin`] before they hand
//! one to the upstream (after waiting for their pacing slot; a message held
//! or deleted meanwhile is not to be sent), and report per-recipient
//! outcomes with [`Queue::record`]. Administrators ([`Queue::listing`],
//! [`Queue::apply`]) work on the same store from any process. The queue
//! knows nothing about SMTP: a recipient's [`Outcome`] (reply and reason,
//! decided by the transport) is kept as given; only its verdict (delivered,
//! temporary, permanent) moves the message on.
//!
//! # Where the state lives
//!
//! Every message — envelope, per-recipient state, held flag, lease, body and
//! its SHA-256 — is in the store ([`relay_store`]): by default embedded in
//! the queue directory (an SQLite file, WAL, `synchronous = FULL`, and large
//! bodies as files beside it); with `[queue] database_url`, a PostgreSQL
//! database that several relays share. Every change to stored state is one
//! `relay_store` call, one transaction.
//!
//! ```text
//! DIR/                mode 0700
//!   queue.sqlite      the embedded store (and its -wal, -shm files)
//!   bodies/ID         the embedded store's large bodies
//!   tmp/              large bodies spooled while received (anonymous
//!                     files: nothing is left behind by a crash)
//!   corrupt/          entries of an older queue that could not be imported
//!   lock              held by the relay running on the embedded store
//! ```
//!
//! `ID` is a [`QueueId`]: 16 uppercase hex digits, 13 of microseconds since
//! the epoch and 3 random; ids sort by enqueue time.
//!
//! # Commit and leases
//!
//! * *Enqueue*: the message is inserted in one transaction, shared with
//!   every insert waiting at the time (group commit); `enqueue` returns
//!   only after that commit. A body larger than the listener keeps in
//!   memory (256 KiB) is spooled to an anonymous file while it arrives
//!   ([`BodyWriter`]), hashed as it is written: memory per client stays
//!   bounded. On the embedded store that file, made durable under a name
//!   in `bodies/`, is the stored body (written once, never read whole for
//!   its commit); on PostgreSQL it is read back into the database (see
//!   [`relay_store::Spool`]).
//! * *Lease*: [`Queue::next_due`] marks due messages with this relay's id
//!   and an expiry (`lease_timeout`) in one statement: on the embedded
//!   store up to 8, the one asked for going to the worker and the others
//!   waiting in memory for the account's next workers; on a shared
//!   database one, so that no relay holds mail another could send. Every lease is renewed every third of
//!   `lease_timeout` until it ends. After the expiry any relay may take it
//!   (a relay that died); a relay that stops ([`Queue::release_all`]) gives
//!   its leases up at once. A relay that finds its lease gone does not send
//!   (if it had not begun) and does not record. [`Queue::begin`] checks the
//!   lease and reads the body in one query.
//! * *Record*: the outcome replaces the message's state, or removes it when
//!   every recipient is delivered, in one transaction — only under this
//!   relay's lease. Removals share the group commit of inserts.
//! * *Passthrough* messages are leased at insert by the relay holding the
//!   client's connection, and never leased by another: if that relay loses
//!   them (dies), they fail, since the client, left without an answer,
//!   resends.
//!
//! # Upgrade ([`Queue::open`])
//!
//! A queue directory in the layout of older releases (`meta/ID.json`,
//! `body/ID`) is imported into the store at open, all of it in one
//! transaction; the old files are removed only after that commit. Bodies
//! are summed a piece at a time and, on the embedded store, linked into
//! `bodies/` rather than read into memory. Entries
//! that cannot be used are moved to `corrupt/` with a note of why, as the
//! old queue did. A store written by this release cannot be read by an
//! older one.
//!
//! # What can duplicate, what can never be lost
//!
//! * Never lost: once `enqueue` returned, the message is committed and is
//!   retried until every recipient is delivered, fails permanently, or
//!   `max_age` passes — across crashes and restarts of this relay, and
//!   (with PostgreSQL) of the database server. A failed message stays
//!   (state `failed`) until an administrator deletes it.
//! * May duplicate: a recipient is marked delivered only when `record`'s
//!   transaction commits. A crash (or a dropped [`Lease`], i.e. an attempt
//!   that never reached `record`) between the upstream accepting the
//!   message and that commit means the attempt is repeated and those
//!   recipients receive the message twice. An outcome that cannot be
//!   written (the database unreachable) is written again with capped
//!   back-off while the lease is renewed, and this relay does not hand the
//!   message out meanwhile; only if the lease expires first (another relay
//!   takes it over) is the attempt repeated. Likewise a client whose
//!   connection breaks after the commit but before it reads the `250` will
//!   resend. This is the usual at-least-once trade-off of SMTP.
//!
//! # In memory
//!
//! Only wake-ups and hand-offs: per account a [`tokio::sync::Notify`] that
//! wakes the account's waiting workers on a local enqueue, release or
//! retry (and, after a deferral, when it is due); passthrough messages and
//! messages leased ahead waiting for a local worker, and passthrough
//! clients waiting for the outcome. A message leased ahead by a relay that
//! dies waits for its lease to expire, like one it was delivering.
//! Mail that becomes due otherwise (from another relay, an expired lease)
//! is found by a look at the store every second, which also keeps
//! [`Queue::health`] (counts per state, and the store's last error) for
//! metrics and readiness.
//!
//! # Cancel safety
//!
//! The store's writes each run in a task of their own (the commit of an
//! insert, the lease taken for `next_due`, the outcome of `record`), so
//! dropping the calling future never leaves the store and memory out of
//! step: a committed message is always woken for, a lease whose caller is
//! gone is released, an outcome is written or retried.

#![warn(missing_docs)]

mod error;
mod id;
mod legacy;
mod queue;
mod view;

pub use error::QueueError;
pub use id::{ParseQueueIdError, QueueId};
pub use queue::{
    check_writable, Applied, Begin, BodyWriter, Census, Database, Deletion, Disposition, Health,
    Lease, Listing, NewMessage, Queue, QueueSettings, RecipientResult, Recorded, Request,
    Selection, Tally,
};
pub use relay_outcome::Outcome;
pub use relay_store::{DatabaseUrl, MessageState as State, RecipientState, Secret};
pub use view::{Entry, RecipientStatus, Unusable};

//! The relay's durable mail queue.
//!
//! Data flows listener → queue → delivery. The listener calls
//! [`Queue::enqueue`] and answers the SMTP client `250` only after it
//! returns; delivery workers (one set per upstream account) take due
//! messages with [`Queue::next_due`], say when they hand one to the
//! upstream with [`Queue::begin`] (after waiting for their pacing slot; a
//! message deleted meanwhile is not to be sent), and report per-recipient
//! outcomes with [`Queue::record`]. The `queue list` command reads the
//! directory from another process with [`list`] and [`survey`]. The queue knows nothing
//! about SMTP: a recipient's [`Outcome`] (reply and reason, decided by the
//! transport) is kept as given; only its verdict (delivered, temporary,
//! permanent) moves the message on.
//!
//! # On-disk layout
//!
//! ```text
//! DIR/                mode 0700
//!   lock              flock'ed by the running relay (one process per DIR)
//!   tmp/ID.body       files being written (a large message is spooled here
//!   tmp/ID.json       while it is received); never read, deleted at open
//!   body/ID           the message as received (raw bytes, never changed)
//!   meta/ID.json      envelope, state, per-recipient status, held flag,
//!                     the body's SHA-256 (JSON)
//!   corrupt/          entries set aside (ID.json, ID.body, ID.reason)
//!   control/          admin requests to the running relay (see `control`)
//! ```
//!
//! `ID` is a [`QueueId`]: 16 uppercase hex digits, 13 of microseconds since
//! the epoch and 3 random; ids sort by enqueue time.
//!
//! # Commit protocol
//!
//! **A message exists if and only if `meta/ID.json` exists.** Renaming the
//! metadata into `meta/` is the commit point; everything else is ordered
//! around it with fsyncs:
//!
//! * *Enqueue*: write `tmp/ID.body` and `tmp/ID.json`, fsync both (a body
//!   spooled while it was received is already written: [`BodyWriter`]
//!   appends to `tmp/ID.body`, and only the metadata is written now); rename
//!   the body to `body/ID`, fsync `body/`; rename the metadata to
//!   `meta/ID.json`, fsync `meta/`. Only then does `enqueue` return. (The
//!   `body/` fsync comes *before* the metadata rename so that no file system
//!   can persist the metadata without its body.)
//! * *Update* (after an attempt): write `tmp/ID.json`, fsync, rename over
//!   `meta/ID.json`, fsync `meta/`. Readers see the old or the new file,
//!   never a mix.
//! * *Removal* (all delivered): unlink `meta/ID.json`, fsync `meta/`, then
//!   unlink `body/ID`.
//!
//! All of these go through one function (`store::apply`) taking a batch of
//! operations, so that group commit can share the fsyncs between concurrent
//! callers without changing the protocol. Measured on a disk where creating
//! a file is the cost (`BENCHMARKS.md`), batching these syncs gains nothing;
//! what would is a write-ahead log that creates no file per message.
//!
//! # Recovery ([`Queue::open`])
//!
//! Everything in `tmp/` is an unfinished write (or a spooled message whose
//! session ended without a commit) and is deleted. A body without metadata
//! is a crash before the commit point (the client got no 250 and will
//! resend) or in the middle of a removal (already delivered), and is
//! deleted. Metadata that cannot be read (permissions, a directory), does
//! not parse, or whose body is missing or has the wrong size, cannot come
//! from this protocol on a working disk; it is logged and moved to
//! `corrupt/` (with a note of why) rather than deleted or stopping the
//! relay. One bad entry never stops the others: not at open, not in
//! [`list`]/[`survey`], not in an admin action. Every other entry that is
//! not failed is scheduled at its recorded next-attempt time (held ones
//! are not scheduled). A queue directory others can write to is made
//! private (0700) with a warning.
//!
//! The body's SHA-256 is checked each time it is read for delivery
//! ([`Queue::read_body`]); a body changed on disk is set aside in
//! `corrupt/`, never sent. Metadata written before checksums were stored
//! has none and is not checked.
//!
//! # What can duplicate, what can never be lost
//!
//! * Never lost: once `enqueue` returned, the message is on disk and is
//!   retried until every recipient is delivered, fails permanently, or
//!   `max_age` passes — across crashes and restarts. A failed message stays
//!   on disk (state `failed`) until an administrator deletes it.
//! * May duplicate: a recipient is marked delivered only when `record`'s
//!   update is committed. A crash (or a dropped [`Lease`], i.e. an attempt
//!   that never reached `record`) between the upstream accepting the
//!   message and that commit means the attempt is repeated and those
//!   recipients receive the message twice. An update that cannot be
//!   written (disk full) does not: the outcome is kept in memory and
//!   written again with capped back-off, and the message is not handed out
//!   until it is, so only a crash in that window repeats the attempt.
//!   Likewise a client whose connection breaks after the commit but before
//!   it reads the `250` will resend. This is the usual at-least-once
//!   trade-off of SMTP.
//!
//! # In memory
//!
//! Messages still to be tried are indexed in memory: per account an ordered
//! set of (due instant, id) and a [`tokio::sync::Notify`] that wakes the
//! account's waiting workers on enqueue, release and deferral. A held
//! message is indexed but in no set; releasing it puts it back. A leased
//! message is out of the set, so it is never handed out twice; dropping a
//! [`Lease`] without recording puts it back (due after `retry_initial`), so a
//! panicking worker cannot strand mail. A message whose outcome is waiting
//! to be written stays out of the set too. Failed messages are not kept in
//! memory. All file I/O runs in `spawn_blocking`, and enqueue/record finish
//! their disk and memory updates together in that task, so cancelling the
//! calling future cannot leave the two out of step.

#![warn(missing_docs)]

mod control;
mod error;
mod id;
mod meta;
mod queue;
mod store;

pub use control::{submit, Applied, Request};
pub use error::QueueError;
pub use id::{ParseQueueIdError, QueueId};
pub use meta::{
    check_writable, list, open_body, show, survey, Entry, RecipientState, RecipientStatus, State,
    Survey, Unusable,
};
pub use queue::{
    BodyWriter, Census, Deletion, Disposition, Lease, NewMessage, Queue, QueueSettings,
    RecipientResult, Recorded, Selection, Tally,
};
pub use relay_outcome::Outcome;

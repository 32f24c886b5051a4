//! Where the listener puts accepted mail.

use relay_queue::Queue;
use std::sync::{Arc, OnceLock};

/// The queue, once it is open. The relay listens before its queue opens
/// when the queue's database cannot be reached at start: until then every
/// transaction is answered `451 4.3.0` (the client keeps its mail and
/// tries again), and once [`Intake::open`] is called every session, the
/// ones already connected included, stores into the queue. Clones share
/// the one queue.
#[derive(Clone, Debug, Default)]
pub struct Intake(Arc<OnceLock<Queue>>);

impl Intake {
    /// An intake whose queue is not open yet.
    pub fn waiting() -> Intake {
        Intake::default()
    }

    /// Hands the opened queue to every session. A second call changes
    /// nothing: a relay opens its queue once.
    pub fn open(&self, queue: Queue) {
        let _ = self.0.set(queue);
    }

    /// The queue, if it is open.
    pub(crate) fn queue(&self) -> Option<&Queue> {
        self.0.get()
    }
}

impl From<Queue> for Intake {
    fn from(queue: Queue) -> Intake {
        let intake = Intake::waiting();
        intake.open(queue);
        intake
    }
}

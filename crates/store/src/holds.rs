//! What Microsoft's throttling of a mailbox leaves behind for every relay
//! sharing it: a pause (after a `5.2.2` quota refusal, a Graph `429`, a
//! request to slow down) and fewer connection slots for a while (after a
//! `432 4.3.2`). Pure decisions with the clock passed in;
//! [`crate::Store::pause_mailbox`] and [`crate::Store::fewer_slots`] record
//! them, [`crate::Store::pace`] and [`crate::Store::acquire_slot`] obey.

use std::time::SystemTime;

/// A mailbox's holds as stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Holds {
    /// Nothing goes out before this time.
    pub(crate) paused_until: Option<SystemTime>,
    /// Slots fewer than the configured cap, until `fewer_until`.
    pub(crate) fewer: u32,
    pub(crate) fewer_until: Option<SystemTime>,
}

impl Holds {
    /// The pause in force at `now`, if any.
    pub(crate) fn paused(&self, now: SystemTime) -> Option<SystemTime> {
        self.paused_until.filter(|until| *until > now)
    }

    /// The slots a mailbox configured for `cap` has at `now`: while a
    /// reduction lasts, `fewer` less, but never below one.
    pub(crate) fn cap(&self, cap: u32, now: SystemTime) -> u32 {
        if self.fewer_until.is_some_and(|until| until > now) {
            cap.saturating_sub(self.fewer).max(1).min(cap)
        } else {
            cap
        }
    }

    /// Paused until `until`, or longer if it already was.
    pub(crate) fn pause(self, until: SystemTime) -> Holds {
        Holds {
            paused_until: self.paused_until.max(Some(until)),
            ..self
        }
    }

    /// One slot fewer than now, until `until` (or longer if a reduction
    /// already lasts longer); a reduction that expired by `now` starts
    /// again from zero.
    pub(crate) fn fewer(self, now: SystemTime, until: SystemTime) -> Holds {
        let lasting = self.fewer_until.filter(|t| *t > now);
        let fewer = if lasting.is_some() { self.fewer } else { 0 };
        Holds {
            fewer: fewer.saturating_add(1),
            fewer_until: lasting.max(Some(until)),
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    #[test]
    fn a_pause_keeps_the_later_time_and_ends() {
        let holds = Holds::default().pause(at(100)).pause(at(50));
        assert_eq!(holds.paused_until, Some(at(100)));
        assert_eq!(holds.paused(at(99)), Some(at(100)));
        assert_eq!(holds.paused(at(100)), None);
    }

    #[test]
    fn each_reduction_takes_one_slot_until_it_expires() {
        let holds = Holds::default().fewer(at(0), at(600));
        assert_eq!(holds.cap(3, at(1)), 2);
        let holds = holds.fewer(at(10), at(610));
        assert_eq!(
            (holds.cap(3, at(11)), holds.fewer_until),
            (1, Some(at(610)))
        );
        let holds = holds.fewer(at(20), at(620));
        assert_eq!(holds.cap(3, at(21)), 1, "never below one slot");
        assert_eq!(holds.cap(3, at(620)), 3, "expired");
        let holds = holds.fewer(at(700), at(1300));
        assert_eq!(
            (holds.fewer, holds.cap(3, at(701))),
            (1, 2),
            "from zero again"
        );
        assert_eq!(Holds::default().cap(0, at(0)), 0);
    }
}

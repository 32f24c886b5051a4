//! Sliding-window pacing of one mailbox, as a pure function of what was
//! sent and the time now; [`crate::Store::pace`] applies it atomically
//! across relays.

use std::time::{Duration, SystemTime};

/// The limits of one mailbox; `None` is unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PaceLimits {
    /// Messages in any 60 seconds.
    pub messages_per_minute: Option<u32>,
    /// Recipients in any 24 hours.
    pub recipients_per_day: Option<u32>,
}

/// The answer to "may this mailbox send a message now?".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pace {
    /// Yes; the send has been counted.
    Go,
    /// Not before this time (nothing was counted).
    WaitUntil(SystemTime),
}

/// A send already counted: when, and to how many recipients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sent {
    /// When it was let out.
    pub at: SystemTime,
    /// Its recipients.
    pub recipients: u32,
}

pub(crate) const MINUTE: Duration = Duration::from_secs(60);
pub(crate) const DAY: Duration = Duration::from_secs(24 * 3600);
/// How long past the day the store keeps sends before deleting them
/// (ignored meanwhile): one delete an hour rather than one per admission.
pub(crate) const PURGE_EVERY: Duration = Duration::from_secs(3600);

/// Whether a message to `recipients` recipients may go out at `now`, given
/// the sends of the last day (`sent`, oldest first; older ones are ignored).
/// A message with more recipients than a day allows goes out alone, when
/// the day's window is empty, rather than never.
pub fn decide(sent: &[Sent], now: SystemTime, limits: PaceLimits, recipients: u32) -> Pace {
    let in_window = |window: Duration| {
        let since = now.checked_sub(window);
        sent.iter()
            .filter(move |s| since.is_none_or(|since| s.at > since) && s.at <= now)
    };
    let mut until: Option<SystemTime> = None;
    if let Some(max) = limits.messages_per_minute {
        let minute: Vec<&Sent> = in_window(MINUTE).collect();
        let max = max.max(1) as usize;
        if minute.len() >= max {
            // Free once enough of the oldest have left the window.
            let oldest_to_leave = minute[minute.len() - max];
            until = until.max(Some(oldest_to_leave.at + MINUTE));
        }
    }
    if let Some(max) = limits.recipients_per_day {
        let day: Vec<&Sent> = in_window(DAY).collect();
        let max = u64::from(max);
        let mut total: u64 = day.iter().map(|s| u64::from(s.recipients)).sum();
        let wanted = u64::from(recipients).min(max);
        for s in &day {
            if total + wanted <= max {
                break;
            }
            total -= u64::from(s.recipients);
            until = until.max(Some(s.at + DAY));
        }
    }
    match until {
        Some(t) if t > now => Pace::WaitUntil(t),
        _ => Pace::Go,
    }
}

/// What a line of messages waiting in order may do: the first `go` of them
/// go out now (each counted as sent when the next is decided); `next`, if
/// not all went, is when the first of the rest may.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admitted {
    /// How many of the line, from its head, go now.
    pub go: usize,
    /// Not before this time for the rest (`None`: all went).
    pub next: Option<SystemTime>,
}

/// [`decide`] for each of `line` (messages' recipients, in order) at `now`,
/// each one let out counted in `sent` (appended) before the next is
/// decided; the line stops at the first that must wait, so a later message
/// never goes ahead of an earlier one.
pub fn decide_line(
    sent: &mut Vec<Sent>,
    now: SystemTime,
    limits: PaceLimits,
    line: &[u32],
) -> Admitted {
    for (go, &recipients) in line.iter().enumerate() {
        if let Pace::WaitUntil(until) = decide(sent, now, limits, recipients) {
            return Admitted {
                go,
                next: Some(until),
            };
        }
        sent.push(Sent {
            at: now,
            recipients,
        });
    }
    Admitted {
        go: line.len(),
        next: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    fn sent(secs: &[u64], recipients: u32) -> Vec<Sent> {
        secs.iter()
            .map(|&s| Sent {
                at: at(s),
                recipients,
            })
            .collect()
    }

    const PER_MINUTE_2: PaceLimits = PaceLimits {
        messages_per_minute: Some(2),
        recipients_per_day: None,
    };

    #[test]
    fn per_minute_waits_for_the_oldest_to_leave() {
        assert_eq!(decide(&[], at(0), PER_MINUTE_2, 1), Pace::Go);
        assert_eq!(decide(&sent(&[0], 1), at(1), PER_MINUTE_2, 1), Pace::Go);
        assert_eq!(
            decide(&sent(&[0, 10], 1), at(11), PER_MINUTE_2, 1),
            Pace::WaitUntil(at(60))
        );
        assert_eq!(
            decide(&sent(&[0, 10], 1), at(60), PER_MINUTE_2, 1),
            Pace::Go
        );
    }

    #[test]
    fn a_line_goes_in_order_until_one_must_wait() {
        let mut sends = sent(&[0], 1);
        let admitted = decide_line(&mut sends, at(1), PER_MINUTE_2, &[1, 1, 1]);
        assert_eq!(
            admitted,
            Admitted {
                go: 1,
                next: Some(at(60))
            }
        );
        assert_eq!(sends.len(), 2, "the one let out is counted");
        let limits = PaceLimits {
            messages_per_minute: None,
            recipients_per_day: Some(10),
        };
        // The second does not fit; the third would, but waits its turn.
        let admitted = decide_line(&mut Vec::new(), at(0), limits, &[6, 5, 1]);
        assert_eq!(
            admitted,
            Admitted {
                go: 1,
                next: Some(at(0) + DAY)
            }
        );
        let admitted = decide_line(&mut Vec::new(), at(0), limits, &[2, 3]);
        assert_eq!(admitted, Admitted { go: 2, next: None });
    }

    #[test]
    fn per_day_counts_recipients() {
        let limits = PaceLimits {
            messages_per_minute: None,
            recipients_per_day: Some(10),
        };
        assert_eq!(decide(&sent(&[0, 5], 4), at(6), limits, 2), Pace::Go);
        assert_eq!(
            decide(&sent(&[0, 5], 4), at(6), limits, 3),
            Pace::WaitUntil(at(0) + DAY)
        );
        // Too many for any day: alone, once the window is empty.
        assert_eq!(
            decide(&sent(&[0, 5], 4), at(6), limits, 50),
            Pace::WaitUntil(at(5) + DAY)
        );
        assert_eq!(decide(&[], at(6), limits, 50), Pace::Go);
    }
}

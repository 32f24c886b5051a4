//! Message identifiers.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Number of hex digits holding the timestamp (52 bits of microseconds since
/// the Unix epoch: enough until the year 2112).
const TIME_DIGITS: usize = 13;
/// Number of hex digits of randomness after the timestamp.
const RAND_DIGITS: usize = 3;
/// Total length of an id.
pub(crate) const ID_LEN: usize = TIME_DIGITS + RAND_DIGITS;
const TIME_MASK: u64 = (1 << (4 * TIME_DIGITS)) - 1;

/// The identifier of a queued message: 16 uppercase hexadecimal digits, the
/// first 13 the enqueue time in microseconds since the Unix epoch, the last 3
/// random.
///
/// Ids are short, safe as file names, and sort by enqueue time both as
/// strings and as values. Within one queue they are unique: the time part is
/// forced to increase strictly (past every id already on disk), so the random
/// part only matters if two processes were ever to write into one directory,
/// which the queue's lock file prevents.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct QueueId(String);

impl QueueId {
    /// Builds the id for the given microsecond timestamp and random bits.
    pub(crate) fn from_parts(micros: u64, random: u16) -> QueueId {
        QueueId(format!(
            "{:0tw$X}{:0rw$X}",
            micros & TIME_MASK,
            random & 0xFFF,
            tw = TIME_DIGITS,
            rw = RAND_DIGITS
        ))
    }

    /// The id as a string (also the message's file name).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The enqueue time encoded in the id, in microseconds since the epoch.
    pub(crate) fn micros(&self) -> u64 {
        // Valid by construction: 13 hex digits.
        u64::from_str_radix(&self.0[..TIME_DIGITS], 16).unwrap_or(0)
    }

    /// The enqueue time encoded in the id.
    pub fn time(&self) -> SystemTime {
        UNIX_EPOCH + std::time::Duration::from_micros(self.micros())
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The error returned when a string is not a valid [`QueueId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid queue id {0:?}: expected {ID_LEN} hexadecimal digits")]
pub struct ParseQueueIdError(pub String);

impl FromStr for QueueId {
    type Err = ParseQueueIdError;

    /// Parses an id; lowercase hex digits are accepted and normalized to
    /// uppercase (so an admin can type them either way).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == ID_LEN && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(QueueId(s.to_ascii_uppercase()))
        } else {
            Err(ParseQueueIdError(s.to_string()))
        }
    }
}

impl TryFrom<String> for QueueId {
    type Error = ParseQueueIdError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<QueueId> for String {
    fn from(id: QueueId) -> String {
        id.0
    }
}

/// Hands out strictly increasing ids.
#[derive(Debug)]
pub(crate) struct IdGen {
    last_micros: std::sync::Mutex<u64>,
}

impl IdGen {
    /// A generator whose ids all sort after `floor` (the newest id on disk).
    pub(crate) fn new(floor: u64) -> IdGen {
        IdGen {
            last_micros: std::sync::Mutex::new(floor),
        }
    }

    pub(crate) fn next(&self) -> QueueId {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let mut last = self
            .last_micros
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let micros = now.max(last.saturating_add(1)).min(TIME_MASK);
        *last = micros;
        drop(last);
        QueueId::from_parts(micros, rand::random::<u16>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_and_parse() {
        let id = QueueId::from_parts(0x1_2345_6789_ABCD, 0xFEF);
        assert_eq!(id.as_str(), "123456789ABCDFEF");
        assert_eq!(id.micros(), 0x1_2345_6789_ABCD);
        assert_eq!("123456789abcdfef".parse::<QueueId>(), Ok(id.clone()));
        assert!("123456789ABCDFE".parse::<QueueId>().is_err());
        assert!("123456789ABCDFEG".parse::<QueueId>().is_err());
        assert!("../../etc/passwd".parse::<QueueId>().is_err());
        assert_eq!(
            serde_json::to_string(&id).ok().as_deref(),
            Some("\"123456789ABCDFEF\"")
        );
    }

    #[test]
    fn ids_increase_and_are_unique() {
        let gen = IdGen::new(0);
        let mut prev = gen.next();
        for _ in 0..10_000 {
            let id = gen.next();
            assert!(id > prev, "{id} after {prev}");
            assert!(id.micros() > prev.micros());
            prev = id;
        }
    }

    #[test]
    fn floor_is_respected() {
        let future = QueueId::from_parts(0x0F_FFFF_FFFF_FFF0, 0).micros();
        let gen = IdGen::new(future);
        assert!(gen.next().micros() > future);
    }
}

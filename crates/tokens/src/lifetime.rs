//! How long the relay plans to use a token, decided once from what the
//! identity platform (or the token cache) says and kept within bounds, so no
//! schedule computed from it can overflow or spin.

use std::time::Duration;

/// Short-lived tokens down to this are honoured as stated (renewed at two
/// thirds of their life); below it (`expires_in: 0`) the relay would renew
/// continuously, so such a lifetime is planned as this floor and the answer
/// counts toward the back-off (see `below_floor`). A token that really dies
/// sooner is replaced when the upstream refuses it.
pub(crate) const MIN_LIFETIME: Duration = Duration::from_secs(5);
/// Entra ID tokens live about an hour, Google's an hour; a day is generous
/// and keeps every instant computed from it representable.
pub(crate) const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Used when a token response carries no `expires_in`: short, so the relay
/// asks again soon rather than present a dead token.
pub(crate) const ASSUMED_LIFETIME: Duration = Duration::from_secs(600);

/// A token lifetime within [`MIN_LIFETIME`, `MAX_LIFETIME`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lifetime {
    planned: Duration,
    /// What was stated instead, when it was out of bounds or unreadable.
    replaced: Option<String>,
    /// The stated lifetime was under [`MIN_LIFETIME`].
    below_floor: bool,
}

impl Lifetime {
    /// From a token response's `expires_in` (a number or, from some
    /// servers, a string of one); absent means [`ASSUMED_LIFETIME`].
    pub(crate) fn from_reply(expires_in: Option<&serde_json::Value>) -> Lifetime {
        let Some(value) = expires_in else {
            return Lifetime {
                planned: ASSUMED_LIFETIME,
                replaced: None,
                below_floor: false,
            };
        };
        let secs = match value {
            serde_json::Value::Number(n) => n.as_f64(),
            serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        let stated = || relay_http::clip(&value.to_string(), 40);
        match secs {
            Some(secs) if secs.is_nan() => Lifetime {
                planned: ASSUMED_LIFETIME,
                replaced: Some(stated()),
                below_floor: false,
            },
            None => Lifetime {
                planned: ASSUMED_LIFETIME,
                replaced: Some(stated()),
                below_floor: false,
            },
            Some(secs) => {
                // Whole seconds; clamp before converting, so nothing overflows.
                let bounded = secs.clamp(MIN_LIFETIME.as_secs_f64(), MAX_LIFETIME.as_secs_f64());
                let planned = Duration::from_secs(bounded as u64);
                Lifetime {
                    planned,
                    replaced: (bounded != secs).then(stated),
                    below_floor: secs < MIN_LIFETIME.as_secs_f64(),
                }
            }
        }
    }

    /// From seconds known locally (the token cache's expiry).
    pub(crate) fn from_secs(secs: u64) -> Lifetime {
        Lifetime::from_reply(Some(&serde_json::Value::from(secs)))
    }

    /// The lifetime to plan with.
    pub(crate) fn get(&self) -> Duration {
        self.planned
    }

    /// Whole seconds, for the token cache.
    pub(crate) fn secs(&self) -> u64 {
        self.planned.as_secs()
    }

    /// The stated lifetime, when it was replaced by a bound or the default.
    pub(crate) fn replaced(&self) -> Option<&str> {
        self.replaced.as_deref()
    }

    /// Whether the stated lifetime was under the floor: renewing on it alone
    /// would be a request every few seconds for ever.
    pub(crate) fn below_floor(&self) -> bool {
        self.below_floor
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn planned(value: serde_json::Value) -> (u64, bool) {
        let l = Lifetime::from_reply(Some(&value));
        (l.secs(), l.replaced().is_some())
    }

    #[test]
    fn sane_lifetimes_are_kept() {
        assert_eq!(planned(json!(3599)), (3599, false));
        assert_eq!(planned(json!("3599")), (3599, false));
        assert_eq!(planned(json!(60)), (60, false));
        assert_eq!(planned(json!(6)), (6, false));
        assert!(!Lifetime::from_reply(Some(&json!(5))).below_floor());
        assert_eq!(planned(json!(86400)), (86400, false));
        assert_eq!(planned(json!(3599.7)), (3599, false));
        let absent = Lifetime::from_reply(None);
        assert_eq!((absent.get(), absent.replaced()), (ASSUMED_LIFETIME, None));
    }

    #[test]
    fn hostile_lifetimes_are_bounded() {
        assert_eq!(planned(json!(9223372036854775807_i64)), (86400, true));
        assert_eq!(planned(json!(u64::MAX)), (86400, true));
        assert_eq!(planned(json!("18446744073709551616000")), (86400, true));
        assert_eq!(planned(json!(1e300)), (86400, true));
        assert_eq!(planned(json!("inf")), (86400, true));
        assert_eq!(planned(json!(0)), (5, true));
        assert_eq!(planned(json!(-1)), (5, true));
        assert_eq!(planned(json!(i64::MIN)), (5, true));
        assert_eq!(planned(json!("-inf")), (5, true));
        assert!(Lifetime::from_reply(Some(&json!(0))).below_floor());
        assert!(!Lifetime::from_reply(Some(&json!(1e300))).below_floor());
        assert_eq!(planned(json!("NaN")), (600, true));
        assert_eq!(planned(json!("soon")), (600, true));
        assert_eq!(planned(json!(null)), (600, true));
        assert_eq!(planned(json!([1])), (600, true));
        assert_eq!(Lifetime::from_secs(u64::MAX).secs(), 86400);
        assert!(
            Lifetime::from_reply(Some(&json!("x".repeat(10_000))))
                .replaced()
                .is_some_and(|s| s.len() < 100),
            "the stated value is clipped for the warning"
        );
    }
}

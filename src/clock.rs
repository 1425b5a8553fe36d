//! Time: the [`Clock`] abstraction and the [`Timestamp`] every record carries.
//!
//! This module is the only place that reads the wall clock. Everything the
//! ledger stores is stamped by the ledger's clock, so tests (yours and ours)
//! can move time with a [`ManualClock`] instead of sleeping.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A point in time: milliseconds since the Unix epoch, UTC.
///
/// Stored as an integer in the database. Displays and serializes as an
/// RFC 3339 string with milliseconds, such as `2026-11-22T08:15:02.118Z`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The Unix epoch, 1970-01-01T00:00:00Z.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// The timestamp `ms` milliseconds after the Unix epoch.
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::Timestamp;
    /// let t = Timestamp::from_millis(1_700_000_000_000);
    /// assert_eq!(t.to_string(), "2023-11-14T22:13:20.000Z");
    /// ```
    pub const fn from_millis(ms: i64) -> Timestamp {
        Timestamp(ms)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> i64 {
        self.0
    }

    /// This timestamp moved `d` later, saturating at the end of time.
    pub fn saturating_add(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(millis(d)))
    }

    /// This timestamp moved `d` earlier, saturating at the start of time.
    pub fn saturating_sub(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_sub(millis(d)))
    }

    /// The time from `earlier` to `self`, or zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0).max(0) as u64)
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Timestamp {
        match t.duration_since(UNIX_EPOCH) {
            Ok(after) => Timestamp(millis(after)),
            Err(before) => Timestamp(-millis(before.duration())),
        }
    }
}

impl From<Timestamp> for SystemTime {
    /// The same instant; saturates at the platform's earliest or latest
    /// representable time.
    fn from(t: Timestamp) -> SystemTime {
        let magnitude = Duration::from_millis(t.0.unsigned_abs());
        let moved = if t.0 >= 0 {
            UNIX_EPOCH.checked_add(magnitude)
        } else {
            UNIX_EPOCH.checked_sub(magnitude)
        };
        moved.unwrap_or_else(|| {
            // Halve the distance until it fits: the nearest representable end.
            let mut step = magnitude;
            let mut at = UNIX_EPOCH;
            while !step.is_zero() {
                let next = if t.0 >= 0 {
                    at.checked_add(step)
                } else {
                    at.checked_sub(step)
                };
                match next {
                    Some(next) => at = next,
                    None => step /= 2,
                }
            }
            at
        })
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        let formatted =
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000_000)
                .ok()
                .and_then(|t| t.format(FORMAT).ok());
        match formatted {
            Some(s) => f.write_str(&s),
            // Outside the years the calendar formatter handles: show the raw count.
            None => write!(f, "{}ms", self.0),
        }
    }
}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The source of "now" for a ledger.
///
/// The default is [`SystemClock`]. Inject another one with
/// [`Builder::clock`](crate::Builder::clock), typically a [`ManualClock`] in
/// tests of time-dependent behaviour (staleness, retention).
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The operating system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::from(SystemTime::now())
    }
}

/// A clock that only moves when told to: for tests.
///
/// Clones share one time, so a test can keep a clone and move the time that a
/// ledger sees.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use runledger::{ManualClock, Timestamp, Clock};
///
/// let clock = ManualClock::new(Timestamp::from_millis(1_000));
/// let seen_by_ledger = clock.clone();
/// clock.advance(Duration::from_secs(90));
/// assert_eq!(seen_by_ledger.now(), Timestamp::from_millis(91_000));
/// ```
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// A clock showing `start`.
    pub fn new(start: Timestamp) -> ManualClock {
        ManualClock(Arc::new(AtomicI64::new(start.0)))
    }

    /// Moves the time forward by `d`.
    /// Saturates at the end of time.
    pub fn advance(&self, d: Duration) {
        let ms = millis(d);
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(ms))
            });
    }

    /// Sets the time to `t` (which may be earlier than now).
    pub fn set(&self, t: Timestamp) {
        self.0.store(t.0, Ordering::SeqCst);
    }
}

impl Default for ManualClock {
    /// A clock showing the current wall-clock time.
    fn default() -> ManualClock {
        ManualClock::new(SystemClock.now())
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_rfc3339_with_millis() {
        assert_eq!(Timestamp::EPOCH.to_string(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            Timestamp::from_millis(1_763_799_302_118).to_string(),
            "2025-11-22T08:15:02.118Z"
        );
        assert_eq!(
            Timestamp::from_millis(i64::MAX).to_string(),
            format!("{}ms", i64::MAX)
        );
    }

    #[test]
    fn system_time_round_trips() {
        for ms in [0, 1, -1, 1_763_799_302_118, -86_400_000] {
            let t = Timestamp::from_millis(ms);
            assert_eq!(Timestamp::from(SystemTime::from(t)), t);
        }
    }

    #[test]
    fn extreme_timestamps_convert_without_panicking() {
        for ms in [i64::MAX, i64::MIN] {
            let _ = SystemTime::from(Timestamp::from_millis(ms));
        }
        let clock = ManualClock::new(Timestamp::from_millis(i64::MAX - 1));
        clock.advance(Duration::from_secs(10));
        assert_eq!(clock.now().as_millis(), i64::MAX);
    }

    #[test]
    fn arithmetic_saturates() {
        let t = Timestamp::from_millis(10);
        assert_eq!(t.saturating_sub(Duration::from_millis(15)).as_millis(), -5);
        assert_eq!(
            Timestamp::from_millis(i64::MAX)
                .saturating_add(Duration::MAX)
                .as_millis(),
            i64::MAX
        );
        assert_eq!(
            t.saturating_duration_since(Timestamp::from_millis(20)),
            Duration::ZERO
        );
        assert_eq!(
            t.saturating_duration_since(Timestamp::EPOCH),
            Duration::from_millis(10)
        );
    }
}

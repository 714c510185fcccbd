//! Saturating time arithmetic: where a caller's [`Duration`] meets a clock.
//!
//! Any `Duration` a user passes (a gate's `recheck_after`, a retry backoff, a
//! lease ttl, a lock wait) may be as large as `Duration::MAX`. `Instant +
//! Duration` and `DateTime + TimeDelta` panic on overflow; these helpers
//! never do. Durations past [`MAX_HORIZON`] (about 100 years) are treated as
//! "that long from now is the far future", which no run lives to see.
//!
//! ```
//! use std::time::Duration;
//! use cd_core::clock;
//! let far = clock::instant_after(Duration::MAX); // no panic
//! assert!(far > std::time::Instant::now());
//! let t = clock::utc_after(Duration::MAX);
//! assert!(t > chrono::Utc::now());
//! ```

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

/// The longest span the library adds to a clock: 100 years (of 365 days).
/// Longer durations are clamped to it.
pub const MAX_HORIZON: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `d`, clamped to [`MAX_HORIZON`].
pub fn clamp(d: Duration) -> Duration {
    d.min(MAX_HORIZON)
}

/// `Instant::now() + d`, saturating at the far future.
pub fn instant_after(d: Duration) -> Instant {
    instant_add(Instant::now(), d)
}

/// `t + d`, saturating at `t` + [`MAX_HORIZON`] (or later, if the platform's
/// clock cannot represent that either).
pub fn instant_add(t: Instant, d: Duration) -> Instant {
    t.checked_add(clamp(d))
        .or_else(|| t.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(t)
}

/// `tokio::time::Instant::now() + d`, saturating: for timers, which follow
/// tokio's clock (paused and advanced in tests).
pub fn tokio_after(d: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    tokio::time::Instant::from_std(instant_add(now.into_std(), d))
}

/// `d` as a chrono duration, clamped to [`MAX_HORIZON`].
pub fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(clamp(d)).unwrap_or(chrono::Duration::MAX)
}

/// `Utc::now() + d`, saturating.
pub fn utc_after(d: Duration) -> DateTime<Utc> {
    utc_add(Utc::now(), d)
}

/// `t + d`, saturating at the latest representable time.
pub fn utc_add(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    t.checked_add_signed(chrono_duration(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// `d` in whole milliseconds, saturating at `u64::MAX`.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `secs` seconds as a `Duration`: negative, NaN → zero; too large or
/// infinite → `Duration::MAX`. Never panics (unlike `Duration::from_secs_f64`).
pub fn secs_f64(secs: f64) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_durations_saturate() {
        let now = Instant::now();
        assert!(instant_add(now, Duration::MAX) > now);
        let million_years = Duration::from_secs(1_000_000 * 365 * 24 * 3600);
        assert!(utc_after(million_years) > Utc::now());
        assert_eq!(chrono_duration(Duration::MAX), chrono_duration(MAX_HORIZON));
        assert_eq!(millis(Duration::MAX), u64::MAX);
        assert_eq!(secs_f64(f64::INFINITY), Duration::MAX);
        assert_eq!(secs_f64(f64::NAN), Duration::ZERO);
        assert_eq!(secs_f64(-1.0), Duration::ZERO);
        assert_eq!(secs_f64(1.5), Duration::from_millis(1500));
        assert_eq!(
            utc_add(DateTime::<Utc>::MAX_UTC, Duration::from_secs(1)),
            DateTime::<Utc>::MAX_UTC
        );
    }
}

/// Where "now" comes from, so gates that depend on the calendar
/// (deployment windows) can be tested at any instant without sleeping.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// The current instant, UTC.
    fn now(&self) -> DateTime<Utc>;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that shows what it is told: for tests.
///
/// ```
/// use cd_core::clock::{Clock, ManualClock};
/// let t0 = "2026-03-29T00:59:00Z".parse().unwrap();
/// let clock = ManualClock::new(t0);
/// clock.advance(std::time::Duration::from_secs(60));
/// assert_eq!(clock.now().to_rfc3339(), "2026-03-29T01:00:00+00:00");
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock(std::sync::Arc<std::sync::Mutex<DateTime<Utc>>>);

impl ManualClock {
    /// A clock showing `at`.
    pub fn new(at: DateTime<Utc>) -> Self {
        ManualClock(std::sync::Arc::new(std::sync::Mutex::new(at)))
    }

    /// Shows `at` from now on (clones share the time).
    pub fn set(&self, at: DateTime<Utc>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = at;
    }

    /// Moves the time forward by `d`.
    pub fn advance(&self, d: Duration) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *t = utc_add(*t, d);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

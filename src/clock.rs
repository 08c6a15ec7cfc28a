//! Wall-clock time as the rest of crew reads it: milliseconds since the Unix epoch, and UTC
//! dates for people (links, task notes, usage tables), formatted by `chrono`.
//!
//! [`Clock`] is the injectable form, for services whose rules span minutes or days (the
//! gateway's rate buckets, daily budgets and rotation grace periods): it reads the system clock
//! plus an offset that a test moves forward with [`Clock::advance`], so a test over real sockets
//! checks "tomorrow" without waiting for it and without pausing tokio's timers.
//!
//! Not for: timeouts and backoff sleeps, which stay on tokio's timers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::DateTime;

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

/// The system clock plus an offset that only ever grows. Clones share the offset, so a test
/// keeps one clone and the service it built reads the moved time. Production never moves it.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicU64>,
}

impl Clock {
    /// The system clock, not moved.
    pub fn system() -> Self {
        Self::default()
    }

    /// Milliseconds since the Unix epoch, as this clock reads them.
    pub fn now_ms(&self) -> u64 {
        now_ms().saturating_add(self.offset_ms.load(Ordering::Acquire))
    }

    /// Moves this clock (and every clone of it) forward by `by`. Time keeps flowing from there.
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.offset_ms.fetch_add(by, Ordering::AcqRel);
    }
}

/// `YYYY-MM-DD` for a day number since the Unix epoch.
pub fn format_day(days: i64) -> String {
    days.checked_mul(86_400)
        .and_then(|seconds| DateTime::from_timestamp(seconds, 0))
        .map_or_else(
            || format!("day {days}"),
            |day| day.format("%Y-%m-%d").to_string(),
        )
}

/// `YYYY-MM-DD HH:MM UTC` for seconds since the Unix epoch.
pub fn format_utc(unix_seconds: u64) -> String {
    i64::try_from(unix_seconds)
        .ok()
        .and_then(|seconds| DateTime::from_timestamp(seconds, 0))
        .map_or_else(
            || format!("{unix_seconds} s after 1970"),
            |at| at.format("%Y-%m-%d %H:%M UTC").to_string(),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_advanced_clock_reads_later_in_every_clone() {
        let clock = Clock::system();
        let service_view = clock.clone();
        let before = service_view.now_ms();
        clock.advance(Duration::from_secs(86_400));
        assert!(service_view.now_ms() >= before + 86_400_000);
        assert!(Clock::system().now_ms() < before + 86_400_000);
    }

    #[test]
    fn dates_are_civil_utc_dates() {
        assert_eq!(format_day(0), "1970-01-01");
        assert_eq!(format_day(19_723), "2024-01-01");
        assert_eq!(format_day(20_416), "2025-11-24");
        assert_eq!(format_utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(format_utc(1_709_214_300), "2024-02-29 13:45 UTC");
        assert_eq!(format_utc(u64::MAX), format!("{} s after 1970", u64::MAX));
    }
}

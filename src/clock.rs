//! Wall-clock time as the rest of crew reads it: milliseconds since the Unix epoch, and UTC
//! dates for people (links, task notes, usage tables), formatted by `chrono`.

use std::time::{SystemTime, UNIX_EPOCH};

use chrono::DateTime;

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
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
    fn dates_are_civil_utc_dates() {
        assert_eq!(format_day(0), "1970-01-01");
        assert_eq!(format_day(19_723), "2024-01-01");
        assert_eq!(format_day(20_416), "2025-11-24");
        assert_eq!(format_utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(format_utc(1_709_214_300), "2024-02-29 13:45 UTC");
        assert_eq!(format_utc(u64::MAX), format!("{} s after 1970", u64::MAX));
    }
}

//! Recurring-task schedules (a five-field cron expression and an IANA time zone), when they are
//! due, and the UTC time format used in progress notes.
//!
//! `croner` is the one source of truth for the syntax and for evaluating the expression (which
//! minutes match, read on the wall clock of the schedule's zone, across daylight-saving changes,
//! with the zone database of `chrono-tz`): calendar arithmetic is easy to get subtly wrong. A
//! refused expression is refused when the schedule is set, rather than silently never firing,
//! with croner's reason and the field at fault (found by giving croner that field alone). Cron reads like Vixie cron: when both day of month and day of week are
//! restricted, a day matching either runs. A wall-clock time skipped by a spring-forward change
//! runs at the first instant after the gap; one repeated by a fall-back change runs once.
//!
//! Not for: deciding when a recurring task starts a run (that is [`super::heartbeat`], from
//! [`Schedule::due_run`]) or creating the run (see [`super::Tasks::start_recurrence`]).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use serde::{Deserialize, Serialize};

use super::TaskError;

/// A recurring schedule: `minute hour day-of-month month day-of-week`, read in `timezone`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// The cron expression as the human wrote it (whitespace normalised).
    pub cron: String,
    /// An IANA zone name such as `Europe/Berlin`, or `UTC`.
    pub timezone: String,
}

/// The names of the five cron fields, in order, for messages.
const FIELDS: [&str; 5] = ["minute", "hour", "day of month", "month", "day of week"];

impl Schedule {
    /// Checks `cron` with croner (five fields of `*`, numbers, names, ranges, steps and lists,
    /// and croner's extensions) and that `timezone` is in the zone database; the zone is stored
    /// under its canonical name.
    pub fn parse(cron: &str, timezone: &str) -> Result<Self, TaskError> {
        let fields: Vec<&str> = cron.split_whitespace().collect();
        let cron = fields.join(" ");
        if let Err(error) = cron_parser().parse(&cron) {
            return Err(invalid_cron(&cron, why_refused(&fields, &error)));
        }
        let zone = zone(timezone).ok_or_else(|| TaskError::InvalidTimezone {
            timezone: timezone.trim().to_owned(),
        })?;
        let schedule = Self {
            cron,
            timezone: zone.name().to_owned(),
        };
        if schedule.next_after(0).is_none() {
            return Err(invalid_cron(
                &schedule.cron,
                "it matches no date that exists (such as the 30th of February)".to_owned(),
            ));
        }
        Ok(schedule)
    }

    /// The first whole minute strictly after `after_ms` (milliseconds since the Unix epoch) that
    /// the expression matches on the wall clock of the schedule's zone. `None` when the stored
    /// schedule no longer reads (a zone dropped from the database) or never matches again.
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        let (cron, zone) = self.evaluator()?;
        let start = instant(whole_seconds(after_ms), zone)?;
        let next = cron.find_next_occurrence(&start, false).ok()?;
        u64::try_from(next.timestamp_millis()).ok()
    }

    /// The last matching minute at or before `at_ms`: the newest run a late beat catches up on.
    pub fn latest_at_or_before(&self, at_ms: u64) -> Option<u64> {
        let (cron, zone) = self.evaluator()?;
        let start = instant(whole_seconds(at_ms), zone)?;
        let latest = cron.find_previous_occurrence(&start, true).ok()?;
        u64::try_from(latest.timestamp_millis()).ok()
    }

    /// The run to start now, if any: the newest matching minute after `since_ms` and at or
    /// before `now_ms`. Runs missed while crew was down collapse into this one, so a week's
    /// outage starts one run, not one per missed day.
    pub fn due_run(&self, since_ms: u64, now_ms: u64) -> Option<u64> {
        let next = self.next_after(since_ms)?;
        if next > now_ms {
            return None;
        }
        let latest = self
            .latest_at_or_before(now_ms)
            .filter(|latest| *latest >= next);
        Some(latest.unwrap_or(next))
    }

    fn evaluator(&self) -> Option<(Cron, Tz)> {
        Some((cron_parser().parse(&self.cron).ok()?, zone(&self.timezone)?))
    }
}

/// Five fields only (no seconds, which the checks above refuse anyway), and `5/15` read as
/// `5-59/15` like many crons do, so nothing the checks accept is refused here.
fn cron_parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .sloppy_ranges(true)
        .build()
}

/// The zone named `name` in the IANA database; `utc` in any case is UTC.
fn zone(name: &str) -> Option<Tz> {
    let name = name.trim();
    if name.eq_ignore_ascii_case("utc") {
        return Some(Tz::UTC);
    }
    Tz::from_str(name).ok()
}

/// Cron runs on whole minutes, so the milliseconds of the start never matter; dropping them
/// keeps the search on whole seconds.
fn whole_seconds(ms: u64) -> i64 {
    i64::try_from(ms / 1000).unwrap_or(i64::MAX)
}

fn instant(unix_seconds: i64, zone: Tz) -> Option<DateTime<Tz>> {
    Some(
        Utc.timestamp_opt(unix_seconds, 0)
            .single()?
            .with_timezone(&zone),
    )
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` ({})", self.cron, self.timezone)
    }
}

fn invalid_cron(cron: &str, reason: String) -> TaskError {
    TaskError::InvalidCron {
        cron: cron.to_owned(),
        reason,
    }
}

/// Croner's reason for refusing `fields`, with the field at fault when croner refuses that
/// field alone (the others `*`), or how many fields there are when that is the trouble.
fn why_refused(fields: &[&str], error: &croner::errors::CronError) -> String {
    if fields.len() != FIELDS.len() {
        return format!(
            "it has {} fields; write five: minute hour day-of-month month day-of-week, e.g. `0 9 * * mon-fri` ({error})",
            fields.len()
        );
    }
    let at_fault = (0..FIELDS.len()).find_map(|index| {
        let mut alone = ["*"; 5];
        alone[index] = fields[index];
        cron_parser()
            .parse(&alone.join(" "))
            .err()
            .map(|error| (index, error))
    });
    match at_fault {
        Some((index, error)) => format!(
            "the {} field `{}` is refused: {error}",
            FIELDS[index], fields[index]
        ),
        None => error.to_string(),
    }
}

/// Formats milliseconds since the Unix epoch as `YYYY-MM-DD HH:MM UTC` for notes humans read.
pub fn format_utc(ms: u64) -> String {
    crate::clock::format_utc(ms / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_cron_expressions_are_accepted_and_normalised() {
        for cron in [
            "0 9 * * mon-fri",
            "*/15 * * * *",
            "0,30 8-18/2 1 jan,JUL 0",
            "5 4 * * 7",
        ] {
            Schedule::parse(cron, "Europe/Berlin").expect(cron);
        }
        let schedule = Schedule::parse("  0   9 * *   1 ", "UTC").expect("valid");
        assert_eq!(schedule.cron, "0 9 * * 1");
    }

    #[test]
    fn bad_cron_expressions_say_what_is_wrong() {
        let cases = [
            ("0 9 * *", "4 fields"),
            ("0 9 * * * *", "6 fields"),
            ("60 * * * *", "minute field"),
            ("* 24 * * *", "hour field"),
            ("* * 0 * *", "day of month"),
            ("* * * 13 *", "month field"),
            ("* * * * funday", "day of week field `funday`"),
            ("*/0 * * * *", "minute field `*/0`"),
            ("30-10 * * * *", "minute field `30-10`"),
            ("0 0 30 2 *", "matches no date"),
        ];
        for (cron, expected) in cases {
            let message = Schedule::parse(cron, "UTC").expect_err(cron).to_string();
            assert!(message.contains(expected), "{cron}: {message}");
        }
    }

    #[test]
    fn timezones_must_be_in_the_zone_database() {
        for (given, stored) in [
            ("UTC", "UTC"),
            ("utc", "UTC"),
            (" Europe/Berlin ", "Europe/Berlin"),
            (
                "America/Argentina/Buenos_Aires",
                "America/Argentina/Buenos_Aires",
            ),
            ("Etc/GMT+2", "Etc/GMT+2"),
        ] {
            let schedule = Schedule::parse("0 9 * * *", given).expect(given);
            assert_eq!(schedule.timezone, stored);
        }
        for bad in [
            "",
            "Berlin",
            "Europe/",
            "../etc",
            "Europe/Ber lin",
            "Mars/Olympus_Mons",
        ] {
            assert!(
                matches!(
                    Schedule::parse("0 9 * * *", bad),
                    Err(TaskError::InvalidTimezone { .. })
                ),
                "{bad}"
            );
        }
    }

    /// Milliseconds since the epoch of a UTC wall-clock time (UTC needs no zone rules, so this
    /// does not test the code with itself).
    fn utc(year: i32, month: u32, day: u32, hour: u32, minute: u32) -> u64 {
        let at = Utc
            .with_ymd_and_hms(year, month, day, hour, minute, 0)
            .single()
            .expect("valid UTC time");
        u64::try_from(at.timestamp_millis()).expect("after 1970")
    }

    #[test]
    fn next_run_is_the_first_matching_minute_strictly_after() {
        let quarter = Schedule::parse("*/15 * * * *", "UTC").expect("valid");
        let mid_minute = utc(2026, 5, 4, 10, 7) + 30_500;
        assert_eq!(
            quarter.next_after(mid_minute),
            Some(utc(2026, 5, 4, 10, 15))
        );
        assert_eq!(
            quarter.next_after(utc(2026, 5, 4, 10, 15)),
            Some(utc(2026, 5, 4, 10, 30)),
            "a run time itself is not after itself"
        );
        assert_eq!(
            quarter.next_after(utc(2026, 5, 4, 10, 15) - 1),
            Some(utc(2026, 5, 4, 10, 15))
        );
        // Year end.
        let new_year = Schedule::parse("0 0 1 1 *", "UTC").expect("valid");
        assert_eq!(
            new_year.next_after(utc(2026, 6, 1, 0, 0)),
            Some(utc(2027, 1, 1, 0, 0))
        );
    }

    #[test]
    fn weekday_mornings_are_read_on_the_berlin_clock() {
        let workdays = Schedule::parse("0 9 * * mon-fri", "Europe/Berlin").expect("valid");
        // Winter (CET, UTC+1): Friday 2026-01-09 09:00 is 08:00 UTC.
        assert_eq!(
            workdays.next_after(utc(2026, 1, 9, 7, 0)),
            Some(utc(2026, 1, 9, 8, 0))
        );
        // After Friday's run comes Monday's, not the weekend.
        assert_eq!(
            workdays.next_after(utc(2026, 1, 9, 8, 0)),
            Some(utc(2026, 1, 12, 8, 0))
        );
        // Summer (CEST, UTC+2): 09:00 is 07:00 UTC.
        assert_eq!(
            workdays.next_after(utc(2026, 7, 1, 0, 0)),
            Some(utc(2026, 7, 1, 7, 0))
        );
        // Over the spring-forward weekend (Sunday 2026-03-29): Friday's run is in CET, Monday's
        // in CEST, so the UTC time moves an hour earlier.
        assert_eq!(
            workdays.next_after(utc(2026, 3, 27, 8, 0)),
            Some(utc(2026, 3, 30, 7, 0))
        );
        // And back over the fall-back weekend (Sunday 2026-10-25).
        assert_eq!(
            workdays.next_after(utc(2026, 10, 23, 7, 0)),
            Some(utc(2026, 10, 26, 8, 0))
        );
        // The same expression in UTC is an hour or two later in absolute time.
        let in_utc = Schedule::parse("0 9 * * mon-fri", "UTC").expect("valid");
        assert_eq!(
            in_utc.next_after(utc(2026, 7, 1, 0, 0)),
            Some(utc(2026, 7, 1, 9, 0))
        );
    }

    #[test]
    fn wall_clock_times_skipped_or_repeated_by_dst_run_once() {
        let half_past_two = Schedule::parse("30 2 * * *", "Europe/Berlin").expect("valid");
        // Saturday 2026-03-28 02:30 CET = 01:30 UTC.
        let saturday = utc(2026, 3, 28, 1, 30);
        assert_eq!(half_past_two.next_after(saturday - 1), Some(saturday));
        // On Sunday the clock jumps from 02:00 CET (01:00 UTC) to 03:00 CEST: 02:30 does not
        // exist, and the run happens at the first instant after the gap.
        let sunday = half_past_two.next_after(saturday).expect("a run on Sunday");
        assert_eq!(sunday, utc(2026, 3, 29, 1, 0));
        // Monday 02:30 CEST = 00:30 UTC.
        assert_eq!(
            half_past_two.next_after(sunday),
            Some(utc(2026, 3, 30, 0, 30))
        );
        // On 2026-10-25 02:00–03:00 happens twice (CEST, then CET): one run, at the first.
        let first = half_past_two
            .next_after(utc(2026, 10, 24, 12, 0))
            .expect("a run on the fall-back day");
        assert_eq!(first, utc(2026, 10, 25, 0, 30), "{}", format_utc(first));
        assert_eq!(
            half_past_two.next_after(first),
            Some(utc(2026, 10, 26, 1, 30)),
            "the next run is Monday's 02:30 CET"
        );
    }

    #[test]
    fn day_of_month_or_day_of_week_like_vixie_cron() {
        // The 1st of the month or any Monday.
        let either = Schedule::parse("0 9 1 * mon", "UTC").expect("valid");
        // From Saturday 2026-05-02, Monday the 4th comes before June 1st.
        assert_eq!(
            either.next_after(utc(2026, 5, 2, 0, 0)),
            Some(utc(2026, 5, 4, 9, 0))
        );
        // From Tuesday 2026-05-26 the next is Monday June 1st, which is both.
        assert_eq!(
            either.next_after(utc(2026, 5, 26, 0, 0)),
            Some(utc(2026, 6, 1, 9, 0))
        );
        // Friday 2026-05-01 is the 1st: it runs though it is not a Monday.
        assert_eq!(
            either.next_after(utc(2026, 4, 28, 0, 0)),
            Some(utc(2026, 5, 1, 9, 0))
        );
    }

    #[test]
    fn a_late_beat_catches_up_on_the_newest_missed_run_only() {
        let daily = Schedule::parse("0 9 * * *", "Europe/Berlin").expect("valid");
        let created = utc(2026, 1, 5, 12, 0);
        // Not due before the first run.
        assert_eq!(daily.due_run(created, utc(2026, 1, 6, 7, 59)), None);
        assert_eq!(
            daily.due_run(created, utc(2026, 1, 6, 8, 0)),
            Some(utc(2026, 1, 6, 8, 0)),
            "due at the minute itself"
        );
        // Down for three days: the run due is the newest one, and after it nothing is due until
        // the next morning.
        let late = utc(2026, 1, 9, 10, 0);
        let due = daily.due_run(created, late).expect("runs were missed");
        assert_eq!(due, utc(2026, 1, 9, 8, 0));
        assert_eq!(daily.due_run(due, late), None);
        assert_eq!(
            daily.latest_at_or_before(utc(2026, 1, 9, 8, 0)),
            Some(utc(2026, 1, 9, 8, 0)),
            "inclusive"
        );
    }

    #[test]
    fn a_stored_schedule_that_no_longer_reads_never_runs() {
        let broken = Schedule {
            cron: "0 9 * * *".to_owned(),
            timezone: "Atlantis/Capital".to_owned(),
        };
        assert_eq!(broken.next_after(0), None);
        assert_eq!(broken.due_run(0, u64::MAX / 2), None);
    }

    #[test]
    fn utc_formatting_matches_known_instants() {
        assert_eq!(format_utc(0), "1970-01-01 00:00 UTC");
        // 2024-02-29T13:45:00Z, a leap day.
        assert_eq!(format_utc(1_709_214_300_000), "2024-02-29 13:45 UTC");
    }
}

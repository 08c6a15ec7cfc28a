//! Recurring-task schedules (a five-field cron expression and a time zone) and the UTC time
//! format used in progress notes.
//!
//! Only the syntax is checked here, so a typo is refused when the task is created rather than
//! silently never firing. Computing the next run time is not done yet (see the module docs of
//! [`crate::tasks`]).

use std::fmt;

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

/// The allowed numeric range and names of each cron field, in order.
const FIELDS: [(&str, u32, u32, &[&str]); 5] = [
    ("minute", 0, 59, &[]),
    ("hour", 0, 23, &[]),
    ("day of month", 1, 31, &[]),
    (
        "month",
        1,
        12,
        &[
            "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
        ],
    ),
    // 0 and 7 are both Sunday in the common crons.
    (
        "day of week",
        0,
        7,
        &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
    ),
];

impl Schedule {
    /// Checks the syntax of `cron` (five fields of `*`, numbers, names, ranges, steps and lists)
    /// and the shape of `timezone`.
    pub fn parse(cron: &str, timezone: &str) -> Result<Self, TaskError> {
        let fields: Vec<&str> = cron.split_whitespace().collect();
        if fields.len() != FIELDS.len() {
            return Err(invalid_cron(
                cron,
                format!(
                    "it has {} fields; write five: minute hour day-of-month month day-of-week, e.g. `0 9 * * mon-fri`",
                    fields.len()
                ),
            ));
        }
        for (field, (name, min, max, names)) in fields.iter().zip(FIELDS) {
            check_field(field, min, max, names)
                .map_err(|why| invalid_cron(cron, format!("the {name} field `{field}` {why}")))?;
        }
        let timezone = timezone.trim();
        if !valid_timezone(timezone) {
            return Err(TaskError::InvalidTimezone {
                timezone: timezone.to_owned(),
            });
        }
        Ok(Self {
            cron: fields.join(" "),
            timezone: timezone.to_owned(),
        })
    }
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

fn check_field(field: &str, min: u32, max: u32, names: &[&str]) -> Result<(), String> {
    for part in field.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((range, step)) => (range, Some(step)),
            None => (part, None),
        };
        if let Some(step) = step {
            match step.parse::<u32>() {
                Ok(step) if step >= 1 && step <= max => {}
                _ => return Err(format!("has a step `{step}` that is not 1..={max}")),
            }
        }
        if range == "*" {
            continue;
        }
        let (low, high) = match range.split_once('-') {
            Some((low, high)) => (value(low, min, max, names)?, value(high, min, max, names)?),
            None => {
                let single = value(range, min, max, names)?;
                (single, single)
            }
        };
        if low > high {
            return Err(format!("has a backwards range `{range}`"));
        }
    }
    Ok(())
}

fn value(raw: &str, min: u32, max: u32, names: &[&str]) -> Result<u32, String> {
    if let Ok(number) = raw.parse::<u32>() {
        if (min..=max).contains(&number) {
            return Ok(number);
        }
        return Err(format!("has `{raw}` outside {min}..={max}"));
    }
    let lower = raw.to_ascii_lowercase();
    names
        .iter()
        .position(|name| *name == lower)
        .map(|index| index as u32 + if min == 1 { 1 } else { 0 })
        .ok_or_else(|| format!("has `{raw}`, which is not a number or a known name"))
}

/// `UTC`, or an `Area/Location` IANA-style name. Without a zone database in the binary this
/// checks the shape only.
fn valid_timezone(timezone: &str) -> bool {
    if timezone.eq_ignore_ascii_case("utc") {
        return true;
    }
    let mut parts = timezone.split('/');
    let area_ok = parts
        .next()
        .is_some_and(|area| !area.is_empty() && area.chars().all(|c| c.is_ascii_alphabetic()));
    let mut rest = 0;
    let rest_ok = parts.all(|part| {
        rest += 1;
        !part.is_empty()
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '+'))
    });
    area_ok && rest_ok && rest >= 1
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
            ("* * * * funday", "not a number or a known name"),
            ("*/0 * * * *", "step"),
            ("30-10 * * * *", "backwards"),
        ];
        for (cron, expected) in cases {
            let message = Schedule::parse(cron, "UTC").expect_err(cron).to_string();
            assert!(message.contains(expected), "{cron}: {message}");
        }
    }

    #[test]
    fn timezones_are_shape_checked() {
        for good in [
            "UTC",
            "utc",
            "Europe/Berlin",
            "America/Argentina/Buenos_Aires",
            "Etc/GMT+2",
        ] {
            Schedule::parse("0 9 * * *", good).expect(good);
        }
        for bad in ["", "Berlin", "Europe/", "../etc", "Europe/Ber lin"] {
            assert!(
                matches!(
                    Schedule::parse("0 9 * * *", bad),
                    Err(TaskError::InvalidTimezone { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn utc_formatting_matches_known_instants() {
        assert_eq!(format_utc(0), "1970-01-01 00:00 UTC");
        // 2024-02-29T13:45:00Z, a leap day.
        assert_eq!(format_utc(1_709_214_300_000), "2024-02-29 13:45 UTC");
    }
}

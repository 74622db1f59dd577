//! Cron schedules: five fields `minute hour day month weekday` (as the predecessor wrote
//! them: `0 9 * * 1-5` is 9:00 Monday to Friday), or six with seconds first, in a time zone.
//! Pure: parsing and tick computation, no I/O.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

/// A parsed schedule with its time zone.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    expr: String,
    schedule: cron::Schedule,
    tz: Tz,
}

const DAYS: [&str; 8] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN"];

/// Standard cron numbers weekdays 0–7 with 0 and 7 for Sunday; the `cron` crate numbers them
/// 1–7 from Sunday. Numbers become names, which both read alike.
fn weekday_names(field: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut num = String::new();
    let flush = |num: &mut String, out: &mut String| -> Result<(), String> {
        if !num.is_empty() {
            let n: usize = num.parse().map_err(|_| format!("bad weekday {num:?}"))?;
            let name = DAYS
                .get(n)
                .ok_or_else(|| format!("weekday {n} is out of range (0-7, 0 and 7 are Sunday)"))?;
            out.push_str(name);
            num.clear();
        }
        Ok(())
    };
    let mut after_slash = false;
    for c in field.chars() {
        if c.is_ascii_digit() && !after_slash {
            num.push(c);
        } else {
            flush(&mut num, &mut out)?;
            if c == '/' {
                after_slash = true;
            } else if c == ',' {
                after_slash = false;
            }
            out.push(c);
        }
    }
    flush(&mut num, &mut out)?;
    Ok(out)
}

impl CronSchedule {
    /// Parses `expr` (5 or 6 fields) in time zone `tz` (an IANA name; default UTC). The
    /// error says which part is wrong and what is allowed.
    pub fn parse(expr: &str, tz: Option<&str>) -> Result<CronSchedule, String> {
        let fields: Vec<&str> = expr.split_whitespace().collect();
        let (seconds, rest) = match fields.len() {
            5 => ("0", &fields[..]),
            6 => (fields[0], &fields[1..]),
            n => {
                return Err(format!(
                    "{expr:?} has {n} fields; expected 5 (minute hour day month weekday) \
                     or 6 (second minute hour day month weekday)"
                ));
            }
        };
        let weekday = weekday_names(rest[4])?;
        let full = format!(
            "{seconds} {} {} {} {} {weekday}",
            rest[0], rest[1], rest[2], rest[3]
        );
        let schedule = cron::Schedule::from_str(&full)
            .map_err(|e| format!("{expr:?} is not a valid cron expression: {e}"))?;
        let tz = match tz {
            None | Some("") => Tz::UTC,
            Some(name) => Tz::from_str(name).map_err(|_| {
                format!("{name:?} is not a time zone; use an IANA name such as Europe/Paris")
            })?,
        };
        if schedule.upcoming(tz).next().is_none() {
            return Err(format!("{expr:?} never fires"));
        }
        Ok(CronSchedule {
            expr: expr.to_string(),
            schedule,
            tz,
        })
    }

    pub fn expr(&self) -> &str {
        &self.expr
    }

    pub fn timezone(&self) -> Tz {
        self.tz
    }

    /// The first fire time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.schedule
            .after(&t.with_timezone(&self.tz))
            .next()
            .map(|d| d.with_timezone(&Utc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, TimeZone, Timelike, Weekday};

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn five_fields_use_standard_weekdays() {
        let s = CronSchedule::parse("0 9 * * 1-5", None).unwrap();
        // 2026-11-21 is a Saturday: the next fire is Monday 09:00.
        let next = s.next_after(at("2026-11-21T10:00:00Z")).unwrap();
        assert_eq!(next.weekday(), Weekday::Mon);
        assert_eq!((next.hour(), next.minute()), (9, 0));
        let sunday = CronSchedule::parse("30 8 * * 0", None).unwrap();
        assert_eq!(
            sunday
                .next_after(at("2026-11-21T10:00:00Z"))
                .unwrap()
                .weekday(),
            Weekday::Sun
        );
        let seven = CronSchedule::parse("30 8 * * 7", None).unwrap();
        assert_eq!(
            seven
                .next_after(at("2026-11-21T10:00:00Z"))
                .unwrap()
                .weekday(),
            Weekday::Sun
        );
    }

    #[test]
    fn the_predecessors_examples() {
        let hourly = CronSchedule::parse("0 * * * *", None).unwrap();
        assert_eq!(
            hourly.next_after(at("2026-01-01T10:20:00Z")),
            Some(at("2026-01-01T11:00:00Z"))
        );
        let quarter = CronSchedule::parse("*/15 * * * *", None).unwrap();
        assert_eq!(
            quarter.next_after(at("2026-01-01T10:20:00Z")),
            Some(at("2026-01-01T10:30:00Z"))
        );
        let six = CronSchedule::parse("0 */6 * * *", None).unwrap();
        assert_eq!(
            six.next_after(at("2026-01-01T10:20:00Z")),
            Some(at("2026-01-01T12:00:00Z"))
        );
    }

    #[test]
    fn six_fields_have_seconds() {
        let s = CronSchedule::parse("*/1 * * * * *", None).unwrap();
        assert_eq!(
            s.next_after(at("2026-01-01T10:20:00Z")),
            Some(at("2026-01-01T10:20:01Z"))
        );
    }

    #[test]
    fn time_zones_shift_the_fire_time() {
        let s = CronSchedule::parse("0 9 * * *", Some("America/New_York")).unwrap();
        let next = s.next_after(at("2026-01-01T00:00:00Z")).unwrap();
        assert_eq!(next, Utc.with_ymd_and_hms(2026, 1, 1, 14, 0, 0).unwrap());
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert!(
            CronSchedule::parse("* * *", None)
                .unwrap_err()
                .contains("expected 5")
        );
        assert!(
            CronSchedule::parse("61 * * * *", None)
                .unwrap_err()
                .contains("not a valid cron")
        );
        assert!(
            CronSchedule::parse("0 0 * * 9", None)
                .unwrap_err()
                .contains("out of range")
        );
        assert!(
            CronSchedule::parse("0 0 * * *", Some("Mars/Base"))
                .unwrap_err()
                .contains("time zone")
        );
    }
}

//! Cron schedules: five fields `minute hour day month weekday` (standard cron, so that
//! `0 9 * * 1-5` is 9:00 Monday to Friday), or six with seconds first, in a time zone.
//! Pure: parsing and tick computation, no I/O.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

/// A parsed schedule with its time zone.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    /// One schedule, or two when both day fields are restricted (standard cron fires when
    /// either matches; the `cron` crate would require both).
    schedules: Vec<cron::Schedule>,
    tz: Tz,
}

/// Why a schedule was refused: the expression or the time zone, with what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    #[error("{0}")]
    Expression(String),
    #[error("{0:?} is not a time zone; use an IANA name such as Europe/Paris")]
    TimeZone(String),
}

impl CronError {
    /// The agent config field the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            CronError::Expression(_) => "schedule",
            CronError::TimeZone(_) => "timezone",
        }
    }
}

/// An IANA time zone name (empty or absent is UTC).
pub fn time_zone(name: Option<&str>) -> Result<Tz, CronError> {
    match name {
        None | Some("") => Ok(Tz::UTC),
        Some(name) => Tz::from_str(name).map_err(|_| CronError::TimeZone(name.to_string())),
    }
}

const NAMES: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

fn weekday(token: &str) -> Result<u8, String> {
    let t = token.trim();
    if let Some(i) = NAMES.iter().position(|n| n.eq_ignore_ascii_case(t)) {
        return Ok(i as u8);
    }
    match t.parse::<u8>() {
        Ok(n @ 0..=6) => Ok(n),
        Ok(7) => Ok(0),
        _ => Err(format!(
            "weekday {t:?} is out of range (0-7, 0 and 7 are Sunday, or SUN-SAT)"
        )),
    }
}

/// Standard cron weekdays (0-7, 0 and 7 for Sunday, names, ranges, steps) as the set of days
/// they name, written as names the `cron` crate reads the same way (it numbers days 1-7).
fn weekday_names(field: &str) -> Result<String, String> {
    let mut days = [false; 7];
    for part in field.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (
                r,
                s.parse::<usize>()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("bad weekday step {s:?}"))?,
            ),
            None => (part, 1),
        };
        let (lo, hi) = if range == "*" {
            (0usize, 6usize)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (weekday(a)? as usize, b.trim());
            // "5-7" runs Friday to Sunday: 7 closes a range as the last day.
            let b = if b == "7" { 7 } else { weekday(b)? as usize };
            if b < a {
                return Err(format!("weekday range {range:?} runs backwards"));
            }
            (a, b)
        } else if step > 1 {
            (weekday(range)? as usize, 6)
        } else {
            let d = weekday(range)? as usize;
            (d, d)
        };
        for d in (lo..=hi).step_by(step) {
            days[d % 7] = true;
        }
    }
    if days.iter().all(|d| *d) {
        return Ok("*".to_string());
    }
    Ok(days
        .iter()
        .enumerate()
        .filter(|(_, on)| **on)
        .map(|(i, _)| NAMES[i])
        .collect::<Vec<_>>()
        .join(","))
}

/// The cron macros and what they stand for.
const MACROS: [(&str, &str); 7] = [
    ("@yearly", "0 0 1 1 *"),
    ("@annually", "0 0 1 1 *"),
    ("@monthly", "0 0 1 * *"),
    ("@weekly", "0 0 * * 0"),
    ("@daily", "0 0 * * *"),
    ("@midnight", "0 0 * * *"),
    ("@hourly", "0 * * * *"),
];

/// `expr`, or the five fields a macro (`@hourly`, …) stands for.
fn expand_macro(expr: &str) -> Result<String, String> {
    let trimmed = expr.trim();
    if !trimmed.starts_with('@') {
        return Ok(expr.to_string());
    }
    MACROS
        .iter()
        .find(|(m, _)| trimmed.eq_ignore_ascii_case(m))
        .map(|(_, fields)| fields.to_string())
        .ok_or_else(|| {
            let names: Vec<&str> = MACROS.iter().map(|(m, _)| *m).collect();
            format!("{expr:?} is not a cron macro; allowed {}", names.join(", "))
        })
}

/// Checks the numbers of one field (`*/15`, `1-5`, `0,30`) against its range, so that the
/// error names the field as the user wrote it. Names (`mon`, `jan`) are left to the parser.
fn check_field(name: &str, field: &str, lo: u32, hi: u32) -> Result<(), String> {
    for part in field.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (part, None),
        };
        if let Some(step) = step {
            match step.parse::<u32>() {
                Ok(n) if n >= 1 && n <= hi.max(1) => {}
                _ => {
                    return Err(format!(
                        "{name} field {field:?}: step {step:?} is out of range; allowed 1 to {}",
                        hi.max(1)
                    ));
                }
            }
        }
        if range == "*" || range == "?" {
            continue;
        }
        for bound in range.split('-') {
            if bound.chars().all(|c| c.is_ascii_alphabetic()) {
                continue;
            }
            match bound.parse::<u32>() {
                Ok(n) if (lo..=hi).contains(&n) => {}
                _ => {
                    return Err(format!(
                        "{name} field {field:?}: {bound:?} is out of range; allowed {lo} to {hi}"
                    ));
                }
            }
        }
    }
    Ok(())
}

impl CronSchedule {
    /// Parses `expr` (5 or 6 fields, or a macro such as `@hourly`) in time zone `tz` (an IANA name; default UTC). The
    /// error says which part is wrong and what is allowed.
    pub fn parse(expr: &str, tz: Option<&str>) -> Result<CronSchedule, CronError> {
        let tz = time_zone(tz)?;
        Self::parse_expression(expr, tz).map_err(CronError::Expression)
    }

    fn parse_expression(expr: &str, tz: Tz) -> Result<CronSchedule, String> {
        let expanded = expand_macro(expr)?;
        let fields: Vec<&str> = expanded.split_whitespace().collect();
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
        check_field("second", seconds, 0, 59)?;
        for (name, field, lo, hi) in [
            ("minute", rest[0], 0, 59),
            ("hour", rest[1], 0, 23),
            ("day", rest[2], 1, 31),
            ("month", rest[3], 1, 12),
            ("weekday", rest[4], 0, 7),
        ] {
            check_field(name, field, lo, hi)?;
        }
        let weekday = weekday_names(rest[4])?;
        let build = |dom: &str, dow: &str| {
            let full = format!("{seconds} {} {} {dom} {} {dow}", rest[0], rest[1], rest[3]);
            cron::Schedule::from_str(&full)
                .map_err(|e| format!("{expr:?} is not a valid cron expression: {e}"))
        };
        // Vixie cron: when both day fields are restricted (neither starts with '*'), a day
        // matching either one fires.
        let schedules = if !rest[2].starts_with('*') && !rest[4].starts_with('*') {
            vec![build(rest[2], "*")?, build("*", &weekday)?]
        } else {
            vec![build(rest[2], &weekday)?]
        };
        if schedules.iter().all(|s| s.upcoming(tz).next().is_none()) {
            return Err(format!("{expr:?} never fires"));
        }
        Ok(CronSchedule { schedules, tz })
    }

    /// The first fire time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = t.with_timezone(&self.tz);
        self.schedules
            .iter()
            .filter_map(|s| s.after(&local).next())
            .map(|d| d.with_timezone(&Utc))
            .min()
    }
}

/// A schedule in words, for people: `*/15 * * * *` is "every 15 minutes", `0 9 * * 1-5` is
/// "at 09:00, Monday to Friday". None for what it cannot say simply (the expression is shown
/// then) or an invalid expression.
pub fn describe(expr: &str) -> Option<String> {
    let expanded = expand_macro(expr).ok()?;
    let fields: Vec<&str> = expanded.split_whitespace().collect();
    let (second, f) = match fields.len() {
        5 => ("0", &fields[..]),
        6 => (fields[0], &fields[1..]),
        _ => return None,
    };
    let (minute, hour, dom, month, dow) = (f[0], f[1], f[2], f[3], f[4]);
    let num = |s: &str| s.parse::<u32>().ok();
    let step = |s: &str| s.strip_prefix("*/").and_then(|n| n.parse::<u32>().ok());
    let plural = |n: u32, one: &str| {
        if n == 1 {
            format!("every {one}")
        } else {
            format!("every {n} {one}s")
        }
    };
    let hours: Option<Vec<u32>> = hour.split(',').map(num).collect();
    let mut time = match (second, num(minute), hours) {
        ("0", Some(m), Some(hs)) if hs.iter().all(|h| *h < 24) && m < 60 => {
            let at: Vec<String> = hs.iter().map(|h| format!("{h:02}:{m:02}")).collect();
            format!("at {}", at.join(", "))
        }
        ("0", Some(m), None) if hour == "*" => {
            if m == 0 {
                "every hour".to_string()
            } else {
                format!("every hour at minute {m}")
            }
        }
        ("0", Some(m), None) if step(hour).is_some() => {
            format!("{} at minute {m}", plural(step(hour)?, "hour"))
        }
        ("0", None, _) if minute == "*" && hour == "*" => "every minute".to_string(),
        ("0", None, _) if step(minute).is_some() && hour == "*" => plural(step(minute)?, "minute"),
        (s, _, _) if s != "0" && minute == "*" && hour == "*" => {
            if s == "*" {
                "every second".to_string()
            } else {
                plural(step(s)?, "second")
            }
        }
        _ => return None,
    };
    let days = weekday_names(dow).ok()?;
    let mut on = Vec::new();
    if dom != "*" {
        let days_of_month: Option<Vec<u32>> = dom.split(',').map(num).collect();
        let d = days_of_month?;
        let list: Vec<String> = d.iter().map(u32::to_string).collect();
        on.push(format!(
            "on day{} {} of the month",
            if d.len() > 1 { "s" } else { "" },
            list.join(", ")
        ));
    }
    if days != "*" {
        on.push(weekdays_in_words(&days));
    }
    if month != "*" {
        const MONTHS: [&str; 12] = [
            "January",
            "February",
            "March",
            "April",
            "May",
            "June",
            "July",
            "August",
            "September",
            "October",
            "November",
            "December",
        ];
        let ms: Option<Vec<&str>> = month
            .split(',')
            .map(|m| {
                num(m)
                    .filter(|m| (1..=12).contains(m))
                    .map(|m| MONTHS[m as usize - 1])
            })
            .collect();
        on.push(format!("in {}", ms?.join(", ")));
    }
    if on.is_empty() && time.starts_with("at ") {
        time.push_str(", every day");
    }
    for part in on {
        time.push_str(", ");
        time.push_str(&part);
    }
    Some(time)
}

/// `MON,TUE,WED,THU,FRI` as "Monday to Friday", `SUN,SAT` as "Sunday, Saturday".
fn weekdays_in_words(days: &str) -> String {
    const FULL: [&str; 7] = [
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
    ];
    let idx: Vec<usize> = days
        .split(',')
        .filter_map(|d| NAMES.iter().position(|n| n.eq_ignore_ascii_case(d)))
        .collect();
    let consecutive = idx.windows(2).all(|w| w[1] == w[0] + 1);
    if idx.len() >= 3 && consecutive {
        format!("{} to {}", FULL[idx[0]], FULL[idx[idx.len() - 1]])
    } else {
        idx.iter().map(|i| FULL[*i]).collect::<Vec<_>>().join(", ")
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
    fn standard_cron_examples() {
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
    fn macros_stand_for_their_fields_and_errors_name_the_field() {
        let t = at("2026-01-01T10:20:00Z");
        let next = |e: &str| CronSchedule::parse(e, None).unwrap().next_after(t).unwrap();
        assert_eq!(next("@hourly"), at("2026-01-01T11:00:00Z"));
        assert_eq!(next("@daily"), at("2026-01-02T00:00:00Z"));
        assert_eq!(next("@weekly"), at("2026-01-04T00:00:00Z")); // a Sunday
        assert_eq!(next("@monthly"), at("2026-02-01T00:00:00Z"));
        assert_eq!(next("@yearly"), at("2027-01-01T00:00:00Z"));
        let err = |e: &str| CronSchedule::parse(e, None).unwrap_err().to_string();
        assert!(
            err("@fortnightly").contains("allowed @yearly"),
            "{}",
            err("@fortnightly")
        );
        let e = err("*/70 * * * *");
        assert!(
            e.contains("minute field \"*/70\"") && e.contains("allowed 1 to 59"),
            "{e}"
        );
        assert!(!e.contains("0 */70"), "no internal six-field form: {e}");
        let e = err("0 25 * * *");
        assert!(
            e.contains("hour field \"25\"") && e.contains("0 to 23"),
            "{e}"
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
    fn weekday_ranges_lists_steps_and_sunday_as_seven() {
        assert_eq!(weekday_names("0-7").unwrap(), "*");
        assert_eq!(weekday_names("5-7").unwrap(), "SUN,FRI,SAT");
        assert_eq!(weekday_names("1-5").unwrap(), "MON,TUE,WED,THU,FRI");
        assert_eq!(weekday_names("1/2").unwrap(), "MON,WED,FRI");
        assert_eq!(weekday_names("*/2").unwrap(), "SUN,TUE,THU,SAT");
        assert_eq!(weekday_names("sat,7").unwrap(), "SUN,SAT");
        assert!(weekday_names("5-2").is_err());
        let every_day = CronSchedule::parse("0 12 * * 0-7", None).unwrap();
        let t = every_day.next_after(at("2026-11-21T13:00:00Z")).unwrap();
        assert_eq!(t, at("2026-11-22T12:00:00Z"));
    }

    #[test]
    fn both_day_fields_restricted_means_either() {
        // The 1st of the month or any Monday, as standard cron reads it.
        let s = CronSchedule::parse("0 9 1 * 1", None).unwrap();
        // From Saturday 2026-11-21: Monday the 23rd comes first, then December 1st (a Tuesday).
        let a = s.next_after(at("2026-11-21T10:00:00Z")).unwrap();
        assert_eq!(a, at("2026-11-23T09:00:00Z"));
        let b = s.next_after(at("2026-11-30T10:00:00Z")).unwrap();
        assert_eq!(b, at("2026-12-01T09:00:00Z"));
    }

    #[test]
    fn errors_say_what_is_wrong_and_which_field() {
        let err = |expr, tz| CronSchedule::parse(expr, tz).unwrap_err();
        for (expr, needle) in [
            ("* * *", "expected 5"),
            (
                "61 * * * *",
                "minute field \"61\": \"61\" is out of range; allowed 0 to 59",
            ),
            ("0 0 * * 9", "out of range"),
            ("0 0 30 2 *", "never fires"),
        ] {
            let e = err(expr, None);
            assert_eq!(e.field(), "schedule", "{expr}");
            assert!(e.to_string().contains(needle), "{expr}: {e}");
        }
        // A bad zone is the zone's fault even when the expression is bad too.
        let e = err("* * *", Some("Mars/Base"));
        assert_eq!(e.field(), "timezone");
        assert!(e.to_string().contains("is not a time zone"), "{e}");
    }

    #[test]
    fn a_schedule_reads_in_words() {
        for (expr, words) in [
            ("* * * * *", "every minute"),
            ("*/15 * * * *", "every 15 minutes"),
            ("*/1 * * * *", "every minute"),
            ("0 * * * *", "every hour"),
            ("@hourly", "every hour"),
            ("7 * * * *", "every hour at minute 7"),
            ("30 */2 * * *", "every 2 hours at minute 30"),
            ("0 9 * * *", "at 09:00, every day"),
            ("@daily", "at 00:00, every day"),
            ("0 9,17 * * *", "at 09:00, 17:00, every day"),
            ("0 9 * * 1-5", "at 09:00, Monday to Friday"),
            ("0 9 * * mon-fri", "at 09:00, Monday to Friday"),
            ("0 10 * * 0,6", "at 10:00, Sunday, Saturday"),
            ("@weekly", "at 00:00, Sunday"),
            ("0 0 1 * *", "at 00:00, on day 1 of the month"),
            ("0 6 1,15 * *", "at 06:00, on days 1, 15 of the month"),
            ("@yearly", "at 00:00, on day 1 of the month, in January"),
            ("*/10 * * * * *", "every 10 seconds"),
        ] {
            assert_eq!(describe(expr).as_deref(), Some(words), "{expr}");
        }
        for odd in [
            "5-10 * * * *",
            "0 9-17 * * *",
            "not cron",
            "@never",
            "0 9 L * *",
        ] {
            assert_eq!(describe(odd), None, "{odd}");
        }
    }
}

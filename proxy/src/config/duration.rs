//! Durations written as strings (`"250ms"`, `"1h30m"`): parsing,
//! formatting and the serde adapter the sections use.

use std::time::Duration;

/// Longest accepted duration anywhere in the configuration (one year).
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses a duration such as `"250ms"`, `"2s"`, `"1h30m"`, `"1.5s"` or
/// `"0"`. Units: `ns`, `us` (or `µs`), `ms`, `s`, `m`, `h`, `d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    let err = || {
        format!(
            "invalid duration {text:?}: expected a number with a unit, e.g. \"250ms\", \"2s\", \"10m\", \"1h30m\""
        )
    };
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(err());
    }
    let mut total: u128 = 0; // nanoseconds
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        if num_end == 0 {
            return Err(err());
        }
        let num = &rest[..num_end];
        rest = rest[num_end..].trim_start();
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c.is_whitespace())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_end];
        rest = rest[unit_end..].trim_start();
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" | "sec" | "secs" => 1_000_000_000,
            "m" | "min" | "mins" => 60_000_000_000,
            "h" | "hr" | "hrs" => 3_600_000_000_000,
            "d" | "day" | "days" => 86_400_000_000_000,
            _ => return Err(err()),
        };
        let nanos = match num.split_once('.') {
            None => num.parse::<u128>().map_err(|_| err())?.checked_mul(scale),
            Some((int, frac)) => {
                if frac.is_empty() || frac.len() > 9 || frac.contains('.') {
                    return Err(err());
                }
                let int: u128 = if int.is_empty() {
                    0
                } else {
                    int.parse().map_err(|_| err())?
                };
                let frac_val: u128 = frac.parse().map_err(|_| err())?;
                let frac_nanos = frac_val * scale / 10u128.pow(frac.len() as u32);
                int.checked_mul(scale)
                    .and_then(|v| v.checked_add(frac_nanos))
            }
        };
        total = nanos
            .and_then(|n| total.checked_add(n))
            .ok_or_else(|| format!("duration {text:?} is too large"))?;
    }
    let secs = u64::try_from(total / 1_000_000_000)
        .map_err(|_| format!("duration {text:?} is too large"))?;
    Ok(Duration::new(secs, (total % 1_000_000_000) as u32))
}

/// Formats a duration the way [`parse_duration`] reads it, choosing the
/// largest unit that represents it exactly (`"250ms"`, `"2s"`, `"10m"`).
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    for (unit, scale) in [
        ("d", 86_400_000_000_000u128),
        ("h", 3_600_000_000_000),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
    ] {
        if nanos % scale == 0 {
            return format!("{}{unit}", nanos / scale);
        }
    }
    format!("{nanos}ns")
}

/// Serde adapter for durations written as strings (`"250ms"`).
pub(super) mod duration_str {
    use super::{format_duration, parse_duration};
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"250ms\", \"2s\" or \"10m\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                parse_duration(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        let ok = |s: &str, d: Duration| assert_eq!(parse_duration(s), Ok(d), "{s}");
        ok("0", Duration::ZERO);
        ok("0s", Duration::ZERO);
        ok("250ms", Duration::from_millis(250));
        ok("2s", Duration::from_secs(2));
        ok(" 10m ", Duration::from_secs(600));
        ok("1h30m", Duration::from_secs(5400));
        ok("1h 30m 5s", Duration::from_secs(5405));
        ok("1.5s", Duration::from_millis(1500));
        ok(".5s", Duration::from_millis(500));
        ok("100us", Duration::from_micros(100));
        ok("100µs", Duration::from_micros(100));
        ok("7ns", Duration::from_nanos(7));
        ok("2d", Duration::from_secs(172_800));
        for bad in [
            "",
            "s",
            "5",
            "5x",
            "ms5",
            "-1s",
            "1..5s",
            "1.s",
            "1e3ms",
            "five",
            "5 s s",
            "1.1234567891s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should fail");
        }
        assert!(
            parse_duration("99999999999999999999999999999999999999d")
                .unwrap_err()
                .contains("too large")
        );
        assert!(parse_duration("999999999999999999999d").is_err());
    }

    #[test]
    fn durations_format_round_trip() {
        for d in [
            Duration::ZERO,
            Duration::from_millis(250),
            Duration::from_secs(2),
            Duration::from_secs(600),
            Duration::from_secs(86_400),
            Duration::from_micros(3),
            Duration::from_nanos(1_000_000_007),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        assert_eq!(format_duration(Duration::from_millis(100)), "100ms");
        assert_eq!(format_duration(Duration::from_secs(600)), "10m");
    }
}

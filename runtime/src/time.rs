//! Time: a clock that tests can set, and conversions to protobuf timestamps.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use twokey_proto::Timestamp;

/// A source of the current time.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Now.
    fn now(&self) -> SystemTime;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that only moves when told to (tests).
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<SystemTime>>);

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: SystemTime) -> Self {
        Self(Arc::new(Mutex::new(start)))
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Seconds since the Unix epoch (0 before it).
pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A protobuf timestamp for `t`.
pub fn to_timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A protobuf timestamp for a number of Unix seconds.
pub fn timestamp_from_secs(secs: u64) -> Timestamp {
    Timestamp {
        seconds: i64::try_from(secs).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

/// The instant of a protobuf timestamp, or `None` when it is out of range.
pub fn from_timestamp(ts: &Timestamp) -> Option<SystemTime> {
    let secs = u64::try_from(ts.seconds).ok()?;
    let nanos = u32::try_from(ts.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// RFC 3339 UTC text of an instant, to the second (`2026-11-28T09:46:30Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = i64::try_from(unix_seconds(t)).unwrap_or(i64::MAX);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

/// Parses a duration such as `90s`, `15m`, `1h`, `1h30m` or `2d`: one or
/// more `<number><unit>` with units d, h, m, s, largest first, each at most
/// once. The error says how to write one.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    const UNITS: [(char, u64); 4] = [('d', 86_400), ('h', 3_600), ('m', 60), ('s', 1)];
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration; write e.g. \"15m\" or \"1h\"".into());
    }
    let too_long = || format!("{text:?} is too long a duration; write e.g. \"7d\"");
    if text.len() > 32 {
        return Err(too_long());
    }
    let mut total = 0u64;
    let mut number = String::new();
    let mut next_unit = 0;
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let Some(at) = UNITS.iter().position(|(u, _)| *u == c) else {
            return Err(format!("unknown unit {c:?} in {text:?}; use s, m, h or d"));
        };
        if at < next_unit {
            return Err(format!(
                "{text:?}: units go largest first, each once; write e.g. \"1h30m\""
            ));
        }
        if number.len() > 9 {
            return Err(too_long());
        }
        let n: u64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a duration; write e.g. \"15m\" or \"1h\""))?;
        total = n
            .checked_mul(UNITS[at].1)
            .and_then(|secs| total.checked_add(secs))
            .ok_or_else(too_long)?;
        number.clear();
        next_unit = at + 1;
    }
    if !number.is_empty() {
        return Err(format!(
            "{text:?} lacks a unit; write e.g. \"{number}s\" or \"{number}m\""
        ));
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_is_utc_with_z_and_whole_seconds() {
        let t = UNIX_EPOCH + Duration::from_millis(1_764_323_190_999);
        assert_eq!(rfc3339(t), "2025-11-28T09:46:30Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        // A leap day, and the end of a century-rule year.
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn durations_take_units_and_compounds_and_explain_mistakes() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration(" 2d "), Ok(Duration::from_secs(172_800)));
        assert!(parse_duration("").unwrap_err().contains("empty"));
        assert!(parse_duration("15").unwrap_err().contains("lacks a unit"));
        assert!(parse_duration("3w").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("h").unwrap_err().contains("not a duration"));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        for bad in ["1", "1x", "30m1h", "1h1h", "-1s", "1.5h", "s1"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert!(
            parse_duration("30m1h")
                .unwrap_err()
                .contains("largest first")
        );
        assert!(
            parse_duration("99999999999999999999d")
                .unwrap_err()
                .contains("too long")
        );
    }
}

//! Time as whole Unix seconds, the conversions to and from protobuf
//! timestamps, and the policy's duration strings ("90s", "15m", "1h30m",
//! "7d").

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use twokey_proto::Timestamp;

/// How far in the future a statement's time may lie (clock skew between the
/// signer's machine and the vault).
pub const MAX_CLOCK_SKEW_SECS: i64 = 30;

/// Whole seconds since the Unix epoch (negative before it).
pub(crate) fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

/// A protobuf timestamp of `t`, in whole seconds.
pub fn to_timestamp(t: SystemTime) -> Timestamp {
    Timestamp {
        seconds: unix_secs(t),
        nanos: 0,
    }
}

/// The seconds of a timestamp, or why it is not usable: missing, before the
/// epoch, or with nanoseconds out of range.
pub(crate) fn timestamp_secs(ts: Option<&Timestamp>, what: &str) -> Result<i64, String> {
    let ts = ts.ok_or_else(|| format!("{what} is missing"))?;
    if ts.seconds < 0 || !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(format!("{what} is out of range"));
    }
    Ok(ts.seconds)
}

/// Parses a duration such as "90s", "15m", "1h30m", "2d": one or more
/// `<number><unit>` with units d, h, m, s, each at most once, largest first.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    const UNITS: [(char, u64); 4] = [('d', 86_400), ('h', 3_600), ('m', 60), ('s', 1)];
    let bad = || format!("{text:?} is not a duration like \"90s\", \"15m\", \"1h30m\" or \"7d\"");
    if text.is_empty() || text.len() > 32 {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut next_unit = 0;
    let mut digits = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let pos = UNITS[next_unit..]
            .iter()
            .position(|(u, _)| *u == c)
            .ok_or_else(bad)?
            + next_unit;
        if digits.is_empty() || digits.len() > 9 {
            return Err(bad());
        }
        let n: u64 = digits.parse().map_err(|_| bad())?;
        total = total
            .checked_add(n.checked_mul(UNITS[pos].1).ok_or_else(bad)?)
            .ok_or_else(bad)?;
        digits.clear();
        next_unit = pos + 1;
    }
    if !digits.is_empty() || next_unit == 0 {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        for bad in ["", "1", "h", "1x", "30m1h", "1h1h", "-1s", "1.5h", "s1"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn secs() {
        assert_eq!(unix_secs(UNIX_EPOCH + Duration::from_secs(5)), 5);
        assert_eq!(unix_secs(UNIX_EPOCH - Duration::from_secs(5)), -5);
    }
}

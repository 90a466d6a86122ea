//! Time as whole Unix seconds, the conversions to and from protobuf
//! timestamps, and the policy's duration strings ("90s", "15m", "1h30m",
//! "7d").

use std::time::{SystemTime, UNIX_EPOCH};

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

pub use twokey_runtime::time::parse_duration;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn secs() {
        assert_eq!(unix_secs(UNIX_EPOCH + Duration::from_secs(5)), 5);
        assert_eq!(unix_secs(UNIX_EPOCH - Duration::from_secs(5)), -5);
    }
}

//! `google.protobuf.Timestamp` with the proto3 JSON mapping to the letter:
//! written Z-normalized with 0, 3, 6 or 9 fractional digits
//! (`2026-12-03T08:00:00Z`, `2026-12-03T08:00:00.250Z`), read from RFC 3339
//! with any offset, and only within 0001-01-01T00:00:00Z to
//! 9999-12-31T23:59:59.999999999Z.
//!
//! Every `.google.protobuf.Timestamp` field of the twokey protos is this type
//! (`build.rs` maps it with `extern_path`). It replaces `pbjson_types`'s,
//! whose serde writes chrono's `to_rfc3339` (`…+00:00`), which the mapping
//! does not allow. The wire encoding is the same two fields, so the signed
//! protobuf bytes of events and grants do not change.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// A point in time: seconds since the Unix epoch and the nanoseconds of that
/// second, as `google.protobuf.Timestamp`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, ::prost::Message)]
pub struct Timestamp {
    /// Seconds of UTC time since the Unix epoch, from 0001-01-01T00:00:00Z
    /// to 9999-12-31T23:59:59Z.
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    /// Non-negative fractions of a second at nanosecond resolution, 0 to
    /// 999,999,999.
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl ::prost::Name for Timestamp {
    const NAME: &'static str = "Timestamp";
    const PACKAGE: &'static str = "google.protobuf";

    fn full_name() -> String {
        "google.protobuf.Timestamp".into()
    }

    fn type_url() -> String {
        "type.googleapis.com/google.protobuf.Timestamp".into()
    }
}

/// 0001-01-01T00:00:00Z, the earliest timestamp the mapping allows.
const MIN_SECONDS: i64 = -62_135_596_800;
/// 9999-12-31T23:59:59Z, the latest whole second the mapping allows.
const MAX_SECONDS: i64 = 253_402_300_799;

/// Why a timestamp has no proto3 JSON form, or a string is not one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimestampError(String);

impl fmt::Display for TimestampError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TimestampError {}

impl Timestamp {
    /// The proto3 JSON text: RFC 3339 in UTC with a `Z`, and 3, 6 or 9
    /// fractional digits only when the nanoseconds are not zero.
    pub fn to_rfc3339(&self) -> Result<String, TimestampError> {
        if !(MIN_SECONDS..=MAX_SECONDS).contains(&self.seconds) {
            return Err(TimestampError(format!(
                "timestamp of {} seconds is outside 0001-01-01T00:00:00Z..9999-12-31T23:59:59Z",
                self.seconds
            )));
        }
        if !(0..1_000_000_000).contains(&self.nanos) {
            return Err(TimestampError(format!(
                "timestamp nanos {} is outside 0..999999999",
                self.nanos
            )));
        }
        let t = OffsetDateTime::from_unix_timestamp(self.seconds)
            .map_err(|e| TimestampError(format!("timestamp out of range: {e}")))?;
        let nanos = self.nanos;
        let fraction = if nanos == 0 {
            String::new()
        } else if nanos % 1_000_000 == 0 {
            format!(".{:03}", nanos / 1_000_000)
        } else if nanos % 1_000 == 0 {
            format!(".{:06}", nanos / 1_000)
        } else {
            format!(".{nanos:09}")
        };
        Ok(format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{fraction}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
        ))
    }

    /// Reads RFC 3339 text with any offset (`Z`, `+00:00`, `-07:00`, …),
    /// as the proto3 JSON mapping asks of parsers.
    pub fn parse_rfc3339(text: &str) -> Result<Self, TimestampError> {
        let t = OffsetDateTime::parse(text, &Rfc3339).map_err(|e| {
            TimestampError(format!(
                "{text:?} is not an RFC 3339 timestamp such as 2026-12-03T08:00:00Z: {e}"
            ))
        })?;
        let seconds = t.unix_timestamp();
        if !(MIN_SECONDS..=MAX_SECONDS).contains(&seconds) {
            return Err(TimestampError(format!(
                "{text:?} is outside 0001-01-01T00:00:00Z..9999-12-31T23:59:59Z"
            )));
        }
        Ok(Self {
            seconds,
            nanos: i32::try_from(t.nanosecond()).unwrap_or(0),
        })
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text = self.to_rfc3339().map_err(serde::ser::Error::custom)?;
        serializer.serialize_str(&text)
    }
}

struct TimestampVisitor;

impl de::Visitor<'_> for TimestampVisitor {
    type Value = Timestamp;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an RFC 3339 timestamp string")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Timestamp, E> {
        Timestamp::parse_rfc3339(text).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(TimestampVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64, nanos: i32) -> Timestamp {
        Timestamp { seconds, nanos }
    }

    fn json(t: Timestamp) -> String {
        serde_json::to_string(&t).expect("serializes")
    }

    fn parse(text: &str) -> Result<Timestamp, String> {
        serde_json::from_value(serde_json::Value::String(text.into())).map_err(|e| e.to_string())
    }

    /// Known answers, checked against `date -u -d @SECONDS` and the
    /// mapping's examples.
    #[test]
    fn timestamps_are_written_z_normalized_with_0_3_6_or_9_fractional_digits() {
        let cases = [
            (ts(1_796_284_800, 0), "\"2026-12-03T08:00:00Z\""),
            (ts(0, 0), "\"1970-01-01T00:00:00Z\""),
            (ts(210, 0), "\"1970-01-01T00:03:30Z\""),
            (
                ts(1_796_284_800, 250_000_000),
                "\"2026-12-03T08:00:00.250Z\"",
            ),
            (ts(1_796_284_800, 1_000), "\"2026-12-03T08:00:00.000001Z\""),
            (
                ts(1_796_284_800, 120_000),
                "\"2026-12-03T08:00:00.000120Z\"",
            ),
            (ts(1_796_284_800, 1), "\"2026-12-03T08:00:00.000000001Z\""),
            (
                ts(1_796_284_800, 999_999_999),
                "\"2026-12-03T08:00:00.999999999Z\"",
            ),
            (ts(-1, 0), "\"1969-12-31T23:59:59Z\""),
            (ts(MIN_SECONDS, 0), "\"0001-01-01T00:00:00Z\""),
            (
                ts(MAX_SECONDS, 999_999_999),
                "\"9999-12-31T23:59:59.999999999Z\"",
            ),
        ];
        for (t, expected) in cases {
            assert_eq!(json(t), expected, "{t:?}");
            let text: String = serde_json::from_str(expected).unwrap();
            assert_eq!(parse(&text), Ok(t), "{expected} round trip");
        }
    }

    #[test]
    fn any_rfc3339_offset_is_read_and_normalized_to_z() {
        let noon = ts(1_796_284_800, 0);
        for text in [
            "2026-12-03T08:00:00Z",
            "2026-12-03T08:00:00+00:00",
            "2026-12-03T08:00:00-00:00",
            "2026-12-03T09:00:00+01:00",
            "2026-12-03T13:30:00+05:30",
            "2026-12-03T01:00:00-07:00",
            "2026-12-03T08:00:00.000Z",
        ] {
            assert_eq!(parse(text), Ok(noon), "{text}");
        }
        assert_eq!(
            parse("2026-12-03T08:00:00.5+02:00").map(json),
            Ok("\"2026-12-03T06:00:00.500Z\"".into())
        );
    }

    #[test]
    fn what_is_not_a_timestamp_is_refused() {
        for text in [
            "",
            "2026-12-03",
            "2026-12-03T08:00:00",
            "2026-13-03T08:00:00Z",
            "1796284800",
            "0000-12-31T23:59:59Z",
            "0001-01-01T00:00:00+01:00",
        ] {
            assert!(parse(text).is_err(), "{text:?} was accepted");
        }
        assert!(serde_json::from_str::<Timestamp>("1796284800").is_err());
    }

    #[test]
    fn timestamps_outside_the_mapping_range_are_not_written() {
        for t in [
            ts(MIN_SECONDS - 1, 0),
            ts(MAX_SECONDS + 1, 0),
            ts(0, -1),
            ts(0, 1_000_000_000),
        ] {
            assert!(serde_json::to_string(&t).is_err(), "{t:?} was written");
        }
    }

    #[test]
    fn the_wire_encoding_is_google_protobuf_timestamp() {
        use prost::Message;
        // seconds = 1796284800 (field 1, varint), nanos = 5 (field 2, varint).
        let bytes = ts(1_796_284_800, 5).encode_to_vec();
        assert_eq!(bytes, [0x08, 0x80, 0xc3, 0xc4, 0xd8, 0x06, 0x10, 0x05]);
        assert_eq!(Timestamp::decode(&bytes[..]).unwrap(), ts(1_796_284_800, 5));
        assert_eq!(
            bytes,
            pbjson_types::Timestamp {
                seconds: 1_796_284_800,
                nanos: 5
            }
            .encode_to_vec()
        );
    }
}

//! The few CloudTrail record fields reconciliation reads, deserialized
//! leniently: a field of the wrong JSON type reads as absent, so one odd record
//! is reported on its own instead of ending the stream of its file.

use std::fmt;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// A JSON value kept only when it is a string.
#[derive(Debug, Default)]
pub(crate) struct Text(pub(crate) Option<String>);

impl Text {
    pub(crate) fn get(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(Some(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text, E> {
                Ok(Text(Some(v)))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Text, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Text, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// A JSON object read as `T`, or `None` when the value is not an object.
#[derive(Debug)]
pub(crate) struct Obj<T>(pub(crate) Option<T>);

impl<T> Default for Obj<T> {
    fn default() -> Self {
        Self(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Obj<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Obj<T>, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(|t| Obj(Some(t)))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Obj<T>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Obj(None))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// One CloudTrail record: only the fields reconciliation needs; every other
/// field is skipped without being kept.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub(crate) struct RawRecord {
    #[serde(rename = "eventName")]
    pub(crate) event_name: Text,
    #[serde(rename = "eventTime")]
    pub(crate) event_time: Text,
    #[serde(rename = "eventID")]
    pub(crate) event_id: Text,
    #[serde(rename = "recipientAccountId")]
    pub(crate) recipient_account_id: Text,
    #[serde(rename = "errorMessage")]
    pub(crate) error_message: Text,
    #[serde(rename = "sourceIPAddress")]
    pub(crate) source_ip: Text,
    #[serde(rename = "userIdentity")]
    pub(crate) user_identity: Obj<RawIdentity>,
    #[serde(rename = "additionalEventData")]
    pub(crate) additional_event_data: Obj<RawAdditional>,
    #[serde(rename = "responseElements")]
    pub(crate) response_elements: Obj<RawResponse>,
}

/// `userIdentity`: only its `type`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub(crate) struct RawIdentity {
    #[serde(rename = "type")]
    pub(crate) kind: Text,
}

/// `additionalEventData`: only `MFAUsed`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub(crate) struct RawAdditional {
    #[serde(rename = "MFAUsed")]
    pub(crate) mfa_used: Text,
}

/// `responseElements`: only `ConsoleLogin`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub(crate) struct RawResponse {
    #[serde(rename = "ConsoleLogin")]
    pub(crate) console_login: Text,
}

/// An EventBridge event: its `detail-type`, `account` and the CloudTrail
/// record under `detail`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub(crate) struct RawEnvelope {
    #[serde(rename = "detail-type")]
    pub(crate) detail_type: Text,
    pub(crate) account: Text,
    pub(crate) detail: Obj<RawRecord>,
}

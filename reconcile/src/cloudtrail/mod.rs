//! CloudTrail records as AWS delivers them, read into the typed events
//! reconciliation needs: root console sign-ins and MFA device changes.
//!
//! A log file is gzip-compressed JSON `{"Records": [...]}` (S3 delivery); its
//! records are streamed one at a time ([`read_records`]), so memory is bounded
//! by one record plus the events kept, never by the file. A single
//! EventBridge event carries one record under `detail` ([`parse_eventbridge`]).
//! [`scan`] walks the `AWSLogs` directory layout with a caller-kept [`Seen`].
//!
//! Only `ConsoleLogin` and the four MFA device calls are kept; every other
//! record is counted and dropped without its fields being checked. A kept
//! record that lacks a field, carries an unknown value or a time too far in
//! the future is skipped with a [`Skip`] reason; a file that is not gzip,
//! truncated or not JSON is skipped whole.

mod raw;
mod scan;

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use raw::{Obj, RawEnvelope, RawRecord};
pub(crate) use scan::is_account_id;
pub use scan::{FileRead, Scan, ScanError, Seen, read_file, scan};

/// How far ahead of the reader's clock an event time may be before it is
/// taken for clock skew and skipped, unless the caller says otherwise.
pub const DEFAULT_MAX_SKEW: Duration = Duration::from_secs(5 * 60);

/// The EventBridge `detail-type` of console sign-ins.
pub const SIGN_IN_DETAIL_TYPE: &str = "AWS Console Sign In via CloudTrail";
/// The EventBridge `detail-type` of API calls (the MFA device changes).
pub const API_CALL_DETAIL_TYPE: &str = "AWS API Call via CloudTrail";

/// The checks a reader applies that depend on the caller's clock.
#[derive(Debug, Clone, Copy)]
pub struct ReadOptions {
    /// The reader's current time.
    pub now: OffsetDateTime,
    /// A record whose `eventTime` is more than this after `now` is skipped
    /// ([`Skip::ClockSkew`]); exactly this much ahead is still read.
    pub max_skew: Duration,
}

impl ReadOptions {
    /// Options at `now` with [`DEFAULT_MAX_SKEW`].
    pub fn at(now: OffsetDateTime) -> Self {
        Self {
            now,
            max_skew: DEFAULT_MAX_SKEW,
        }
    }
}

/// A `ConsoleLogin` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignIn {
    /// `eventID`: CloudTrail's unique id of the record.
    pub event_id: String,
    /// `eventTime` (CloudTrail records whole seconds, UTC).
    pub time: OffsetDateTime,
    /// `recipientAccountId`: the AWS account signed in to.
    pub aws_account_id: String,
    /// `userIdentity.type`: `Root`, `IAMUser`, `AssumedRole`, ...
    pub identity_type: String,
    /// `sourceIPAddress`, when the record has one (an address, or an AWS
    /// service name).
    pub source_ip: Option<String>,
    /// `responseElements.ConsoleLogin` and what goes with it.
    pub outcome: SignInOutcome,
}

impl SignIn {
    /// Whether the root user signed in (`userIdentity.type == "Root"`).
    pub fn is_root(&self) -> bool {
        self.identity_type == "Root"
    }
}

/// How a sign-in ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignInOutcome {
    /// `ConsoleLogin: Success`, with `additionalEventData.MFAUsed` (`Yes`/`No`).
    Success {
        /// Whether an MFA device was used.
        mfa_used: bool,
    },
    /// `ConsoleLogin: Failure`, with `errorMessage` when AWS gave one.
    Failure {
        /// For example `Failed authentication`.
        error_message: Option<String>,
    },
}

/// The four IAM calls that change an MFA device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MfaAction {
    /// `EnableMFADevice`.
    Enable,
    /// `DeactivateMFADevice`.
    Deactivate,
    /// `CreateVirtualMFADevice`.
    CreateVirtual,
    /// `DeleteVirtualMFADevice`.
    DeleteVirtual,
}

impl MfaAction {
    /// Every action, in the order above.
    pub const ALL: [MfaAction; 4] = [
        Self::Enable,
        Self::Deactivate,
        Self::CreateVirtual,
        Self::DeleteVirtual,
    ];

    /// The CloudTrail `eventName`.
    pub fn event_name(self) -> &'static str {
        match self {
            Self::Enable => "EnableMFADevice",
            Self::Deactivate => "DeactivateMFADevice",
            Self::CreateVirtual => "CreateVirtualMFADevice",
            Self::DeleteVirtual => "DeleteVirtualMFADevice",
        }
    }

    /// The action of a CloudTrail `eventName`, if it is one of the four.
    pub fn from_event_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.event_name() == name)
    }
}

/// An MFA device change record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MfaDeviceChange {
    /// `eventID`.
    pub event_id: String,
    /// `eventTime`.
    pub time: OffsetDateTime,
    /// `recipientAccountId`.
    pub aws_account_id: String,
    /// `userIdentity.type` of who made the change.
    pub identity_type: String,
    /// `sourceIPAddress`, when the record has one.
    pub source_ip: Option<String>,
    /// Which call.
    pub action: MfaAction,
    /// `errorMessage`, when the call failed (a failed attempt is still out of
    /// band: someone tried).
    pub error_message: Option<String>,
}

/// A record reconciliation keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A `ConsoleLogin`.
    SignIn(SignIn),
    /// One of the four MFA device calls.
    MfaDeviceChange(MfaDeviceChange),
}

impl Event {
    /// CloudTrail's `eventID`.
    pub fn event_id(&self) -> &str {
        match self {
            Self::SignIn(s) => &s.event_id,
            Self::MfaDeviceChange(c) => &c.event_id,
        }
    }

    /// `eventTime`.
    pub fn time(&self) -> OffsetDateTime {
        match self {
            Self::SignIn(s) => s.time,
            Self::MfaDeviceChange(c) => c.time,
        }
    }

    /// `recipientAccountId`.
    pub fn aws_account_id(&self) -> &str {
        match self {
            Self::SignIn(s) => &s.aws_account_id,
            Self::MfaDeviceChange(c) => &c.aws_account_id,
        }
    }
}

/// Why a file or a record was skipped. Each variant is one reason to count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    /// The bytes could not be read or decompressed: not gzip, truncated, or
    /// an I/O error.
    #[error("cannot read or decompress: {0}")]
    Unreadable(String),
    /// The decompressed bytes are not the JSON of a log file.
    #[error("not valid JSON: {0}")]
    InvalidJson(String),
    /// Valid JSON, but no `Records` array: not a CloudTrail log file.
    #[error("no \"Records\" array: not a CloudTrail log file")]
    NoRecords,
    /// A record that is not a JSON object.
    #[error("the record is not a JSON object")]
    NotAnObject,
    /// A field the record needs is absent, or not a string.
    #[error("field {0} is missing or not a string")]
    MissingField(&'static str),
    /// A field holds a value CloudTrail does not write there.
    #[error("field {field} has the unexpected value {value:?}")]
    UnexpectedValue {
        /// The field.
        field: &'static str,
        /// What it held.
        value: String,
    },
    /// `eventTime` is not an RFC 3339 time.
    #[error("eventTime {0:?} is not an RFC 3339 time")]
    BadTime(String),
    /// `eventTime` is further ahead of the reader's clock than allowed.
    #[error(
        "eventTime {time} is more than {max_skew_secs} s ahead of this clock ({now}): clock skew; check the time of this host"
    )]
    ClockSkew {
        /// The record's time, as written.
        time: String,
        /// The reader's time.
        now: String,
        /// The allowed lead.
        max_skew_secs: u64,
    },
    /// An EventBridge event that is not a CloudTrail sign-in or API call.
    #[error("detail-type {0:?} is not a CloudTrail sign-in or API call")]
    NotCloudTrail(String),
}

impl Skip {
    /// A short stable name of the reason, for metric labels and counters.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Unreadable(_) => "unreadable",
            Self::InvalidJson(_) => "invalid_json",
            Self::NoRecords => "no_records",
            Self::NotAnObject => "not_an_object",
            Self::MissingField(_) => "missing_field",
            Self::UnexpectedValue { .. } => "unexpected_value",
            Self::BadTime(_) => "bad_time",
            Self::ClockSkew { .. } => "clock_skew",
            Self::NotCloudTrail(_) => "not_cloudtrail",
        }
    }

    fn from_json(e: serde_json::Error) -> Self {
        if e.is_io() {
            Self::Unreadable(e.to_string())
        } else {
            Self::InvalidJson(e.to_string())
        }
    }
}

/// A skipped file or record: where, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {reason}", path.display(), record.map(|n| format!(": record {n}")).unwrap_or_default())]
pub struct Problem {
    /// The file (for an EventBridge event, whatever names its source).
    pub path: PathBuf,
    /// The record's index in the file's `Records` (from 0), when one record
    /// was skipped rather than the whole file.
    pub record: Option<u64>,
    /// Why.
    pub reason: Skip,
}

/// Streams the records of one decompressed log file (`{"Records": [...]}`)
/// from `reader`, calling `each` with every record's index and what it read
/// as: `Ok(Some(event))` for a kept record, `Ok(None)` for one reconciliation
/// does not need, `Err` for a kept record that is malformed. Returns the
/// number of records, or why the file as a whole is unreadable (in which case
/// some records may already have been handed to `each`: a caller that must
/// not count part of a file buffers until this returns, as [`read_file`]
/// does).
pub fn read_records<R: Read>(
    reader: R,
    options: &ReadOptions,
    mut each: impl FnMut(u64, Result<Option<Event>, Skip>),
) -> Result<u64, Skip> {
    let mut de = serde_json::Deserializer::from_reader(reader);
    let mut count = 0u64;
    let mut on_record = |raw: Obj<RawRecord>| {
        let read = match raw.0 {
            Some(raw) => event_from(raw, options),
            None => Err(Skip::NotAnObject),
        };
        each(count, read);
        count += 1;
    };
    let found = FileSeed(&mut on_record)
        .deserialize(&mut de)
        .map_err(Skip::from_json)?;
    de.end().map_err(Skip::from_json)?;
    if !found {
        return Err(Skip::NoRecords);
    }
    Ok(count)
}

/// Reads one EventBridge event as posted to an API destination: its
/// `detail-type` must be [`SIGN_IN_DETAIL_TYPE`] or [`API_CALL_DETAIL_TYPE`],
/// the CloudTrail record is its `detail`; a record without
/// `recipientAccountId` takes the event's `account`. `Ok(None)` is a
/// well-formed event reconciliation does not need.
pub fn parse_eventbridge(body: &[u8], options: &ReadOptions) -> Result<Option<Event>, Skip> {
    let envelope: Obj<RawEnvelope> = serde_json::from_slice(body).map_err(Skip::from_json)?;
    let envelope = envelope.0.ok_or(Skip::NotAnObject)?;
    let detail_type = envelope
        .detail_type
        .get()
        .ok_or(Skip::MissingField("detail-type"))?;
    if detail_type != SIGN_IN_DETAIL_TYPE && detail_type != API_CALL_DETAIL_TYPE {
        return Err(Skip::NotCloudTrail(detail_type.to_owned()));
    }
    let mut record = envelope.detail.0.ok_or(Skip::MissingField("detail"))?;
    if record.recipient_account_id.get().is_none() {
        record.recipient_account_id = envelope.account;
    }
    event_from(record, options)
}

/// The typed event of a raw record, `None` for records not kept.
fn event_from(raw: RawRecord, options: &ReadOptions) -> Result<Option<Event>, Skip> {
    let name = raw
        .event_name
        .get()
        .ok_or(Skip::MissingField("eventName"))?;
    let action = MfaAction::from_event_name(name);
    if name != "ConsoleLogin" && action.is_none() {
        return Ok(None);
    }
    let time = event_time(&raw, options)?;
    let event_id = required(&raw.event_id, "eventID")?;
    let aws_account_id = required(&raw.recipient_account_id, "recipientAccountId")?;
    let identity_type = raw
        .user_identity
        .0
        .as_ref()
        .and_then(|i| i.kind.get())
        .ok_or(Skip::MissingField("userIdentity.type"))?
        .to_owned();
    let error_message = raw.error_message.0;
    let source_ip = raw.source_ip.0.filter(|ip| !ip.is_empty());
    if let Some(action) = action {
        return Ok(Some(Event::MfaDeviceChange(MfaDeviceChange {
            event_id,
            time,
            aws_account_id,
            identity_type,
            source_ip,
            action,
            error_message,
        })));
    }
    let login = raw
        .response_elements
        .0
        .as_ref()
        .and_then(|r| r.console_login.get())
        .ok_or(Skip::MissingField("responseElements.ConsoleLogin"))?;
    let outcome = match login {
        "Success" => {
            let mfa = raw
                .additional_event_data
                .0
                .as_ref()
                .and_then(|a| a.mfa_used.get())
                .ok_or(Skip::MissingField("additionalEventData.MFAUsed"))?;
            let mfa_used = match mfa {
                "Yes" => true,
                "No" => false,
                other => {
                    return Err(Skip::UnexpectedValue {
                        field: "additionalEventData.MFAUsed",
                        value: other.to_owned(),
                    });
                }
            };
            SignInOutcome::Success { mfa_used }
        }
        "Failure" => SignInOutcome::Failure { error_message },
        other => {
            return Err(Skip::UnexpectedValue {
                field: "responseElements.ConsoleLogin",
                value: other.to_owned(),
            });
        }
    };
    Ok(Some(Event::SignIn(SignIn {
        event_id,
        time,
        aws_account_id,
        identity_type,
        source_ip,
        outcome,
    })))
}

fn required(text: &raw::Text, field: &'static str) -> Result<String, Skip> {
    match text.get() {
        Some(s) if !s.is_empty() => Ok(s.to_owned()),
        _ => Err(Skip::MissingField(field)),
    }
}

/// `eventTime`, parsed and checked against the reader's clock.
fn event_time(raw: &RawRecord, options: &ReadOptions) -> Result<OffsetDateTime, Skip> {
    let text = raw
        .event_time
        .get()
        .ok_or(Skip::MissingField("eventTime"))?;
    let time = OffsetDateTime::parse(text, &Rfc3339).map_err(|_| Skip::BadTime(text.to_owned()))?;
    if time - options.now > options.max_skew {
        return Err(Skip::ClockSkew {
            time: text.to_owned(),
            now: options
                .now
                .format(&Rfc3339)
                .unwrap_or_else(|_| options.now.to_string()),
            max_skew_secs: options.max_skew.as_secs(),
        });
    }
    Ok(time)
}

/// The top level of a log file: finds `Records` among the object's keys and
/// streams it; answers whether it was there.
struct FileSeed<'f, F>(&'f mut F);

impl<'de, F: FnMut(Obj<RawRecord>)> DeserializeSeed<'de> for FileSeed<'_, F> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, F: FnMut(Obj<RawRecord>)> Visitor<'de> for FileSeed<'_, F> {
    type Value = bool;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a CloudTrail log file: an object with a \"Records\" array")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let mut found = false;
        while let Some(key) = map.next_key::<String>()? {
            if key == "Records" && !found {
                map.next_value_seed(RecordsSeed(&mut *self.0))?;
                found = true;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// The `Records` array: each element handed on as soon as it is read.
struct RecordsSeed<'f, F>(&'f mut F);

impl<'de, F: FnMut(Obj<RawRecord>)> DeserializeSeed<'de> for RecordsSeed<'_, F> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, F: FnMut(Obj<RawRecord>)> Visitor<'de> for RecordsSeed<'_, F> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("the \"Records\" array")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(record) = seq.next_element::<Obj<RawRecord>>()? {
            (self.0)(record);
        }
        Ok(())
    }
}

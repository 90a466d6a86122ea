//! CloudTrail records built by code in the format AWS documents (the
//! `ConsoleLogin` sign-in event of the root user, IAM API-call records), and
//! log files and EventBridge events around them, for tests and the demo.
//! Nothing here is pasted from a real trail.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::cloudtrail::{API_CALL_DETAIL_TYPE, MfaAction, SIGN_IN_DETAIL_TYPE};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh `eventID` in CloudTrail's UUID shape.
fn next_event_id() -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    format!("6c9e7f1a-0000-4000-8000-{n:012x}")
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).expect("a time formats as RFC 3339")
}

/// One CloudTrail record as JSON, with builder methods for the variations
/// tests need.
#[derive(Debug, Clone, PartialEq)]
pub struct Record(Value);

impl Record {
    /// A successful root `ConsoleLogin` with MFA, as in AWS's documented
    /// example of a root sign-in event.
    pub fn console_login(account: &str, time: OffsetDateTime) -> Self {
        Self(json!({
            "eventVersion": "1.08",
            "userIdentity": {
                "type": "Root",
                "principalId": account,
                "arn": format!("arn:aws:iam::{account}:root"),
                "accountId": account,
                "accessKeyId": ""
            },
            "eventTime": rfc3339(time),
            "eventSource": "signin.amazonaws.com",
            "eventName": "ConsoleLogin",
            "awsRegion": "us-east-1",
            "sourceIPAddress": "192.0.2.10",
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
            "requestParameters": null,
            "responseElements": { "ConsoleLogin": "Success" },
            "additionalEventData": {
                "LoginTo": "https://console.aws.amazon.com/console/home?state=hashArgs%23&isauthcode=true",
                "MobileVersion": "No",
                "MFAIdentifier": format!("arn:aws:iam::{account}:mfa/root-account-mfa-device"),
                "MFAUsed": "Yes"
            },
            "eventID": next_event_id(),
            "readOnly": false,
            "eventType": "AwsConsoleSignIn",
            "managementEvent": true,
            "recipientAccountId": account,
            "eventCategory": "Management",
            "tlsDetails": {
                "tlsVersion": "TLSv1.3",
                "cipherSuite": "TLS_AES_128_GCM_SHA256",
                "clientProvidedHostHeader": "signin.aws.amazon.com"
            }
        }))
    }

    /// A root IAM call changing the root user's MFA device.
    pub fn mfa_device(action: MfaAction, account: &str, time: OffsetDateTime) -> Self {
        let serial = format!("arn:aws:iam::{account}:mfa/root-account-mfa-device");
        let (request, response) = match action {
            MfaAction::Enable => (json!({ "serialNumber": serial }), Value::Null),
            MfaAction::Deactivate => (json!({ "serialNumber": serial }), Value::Null),
            MfaAction::CreateVirtual => (
                json!({ "virtualMFADeviceName": "root-account-mfa-device", "path": "/" }),
                json!({ "virtualMFADevice": { "serialNumber": serial } }),
            ),
            MfaAction::DeleteVirtual => (json!({ "serialNumber": serial }), Value::Null),
        };
        let mut record = Self::api_call(action.event_name(), account, time);
        record.0["eventSource"] = json!("iam.amazonaws.com");
        record.0["requestParameters"] = request;
        record.0["responseElements"] = response;
        record.identity_type("Root")
    }

    /// Any other API call (by an IAM user), as filler that reconciliation
    /// must pass over.
    pub fn api_call(event_name: &str, account: &str, time: OffsetDateTime) -> Self {
        Self(json!({
            "eventVersion": "1.09",
            "userIdentity": {
                "type": "IAMUser",
                "principalId": "AIDAEXAMPLEPRINCIPAL",
                "arn": format!("arn:aws:iam::{account}:user/ops"),
                "accountId": account,
                "accessKeyId": "AKIAIOSFODNN7EXAMPLE",
                "userName": "ops"
            },
            "eventTime": rfc3339(time),
            "eventSource": "ec2.amazonaws.com",
            "eventName": event_name,
            "awsRegion": "eu-west-1",
            "sourceIPAddress": "198.51.100.7",
            "userAgent": "aws-cli/2.17.0",
            "requestParameters": { "maxResults": 100 },
            "responseElements": null,
            "requestID": "0c1d2e3f-0000-4000-8000-000000000000",
            "eventID": next_event_id(),
            "readOnly": true,
            "eventType": "AwsApiCall",
            "managementEvent": true,
            "recipientAccountId": account,
            "eventCategory": "Management"
        }))
    }

    /// Who acted: `Root`, `IAMUser`, `AssumedRole`, ...
    pub fn identity_type(mut self, kind: &str) -> Self {
        self.0["userIdentity"]["type"] = json!(kind);
        self
    }

    /// A sign-in without MFA (`MFAUsed: No`).
    pub fn without_mfa(mut self) -> Self {
        self.0["additionalEventData"]["MFAUsed"] = json!("No");
        self
    }

    /// A failed sign-in, as CloudTrail records a wrong password.
    pub fn failed(mut self) -> Self {
        self.0["responseElements"] = json!({ "ConsoleLogin": "Failure" });
        self.0["additionalEventData"]["MFAUsed"] = json!("No");
        self.0["errorMessage"] = json!("Failed authentication");
        self
    }

    /// Sets the `eventID`.
    pub fn event_id(mut self, id: &str) -> Self {
        self.0["eventID"] = json!(id);
        self
    }

    /// Sets the field at a JSON pointer (`/eventTime`) to `value`.
    pub fn set(mut self, pointer: &str, value: Value) -> Self {
        if let Some(slot) = self.0.pointer_mut(pointer) {
            *slot = value;
        }
        self
    }

    /// Removes the field at a JSON pointer (`/additionalEventData/MFAUsed`).
    pub fn remove(mut self, pointer: &str) -> Self {
        if let Some((parent, key)) = pointer.rsplit_once('/')
            && let Some(Value::Object(map)) = self.0.pointer_mut(parent)
        {
            map.remove(key);
        }
        self
    }

    /// The `eventID`.
    pub fn id(&self) -> &str {
        self.0["eventID"].as_str().unwrap_or_default()
    }

    /// The record as JSON.
    pub fn json(&self) -> &Value {
        &self.0
    }

    /// This record as EventBridge delivers it to an API destination.
    pub fn eventbridge(&self) -> Vec<u8> {
        let sign_in = self.0["eventName"] == "ConsoleLogin";
        let envelope = json!({
            "version": "0",
            "id": format!("eb-{}", self.id()),
            "detail-type": if sign_in { SIGN_IN_DETAIL_TYPE } else { API_CALL_DETAIL_TYPE },
            "source": if sign_in { "aws.signin" } else { "aws.iam" },
            "account": self.0["userIdentity"]["accountId"],
            "time": self.0["eventTime"],
            "region": "us-east-1",
            "resources": [],
            "detail": self.0,
        });
        serde_json::to_vec(&envelope).expect("JSON serialises")
    }
}

/// Writes `{"Records": [...]}` to `out` one record at a time, so a file of
/// any size is written without holding it.
pub fn write_records<W: Write>(
    mut out: W,
    records: impl IntoIterator<Item = Record>,
) -> io::Result<W> {
    out.write_all(b"{\"Records\":[")?;
    for (i, record) in records.into_iter().enumerate() {
        if i > 0 {
            out.write_all(b",")?;
        }
        serde_json::to_writer(&mut out, &record.0)?;
    }
    out.write_all(b"]}")?;
    Ok(out)
}

/// A whole log file, gzip-compressed, as CloudTrail delivers it to S3.
pub fn log_file(records: impl IntoIterator<Item = Record>) -> Vec<u8> {
    let gz = write_records(GzEncoder::new(Vec::new(), Compression::fast()), records)
        .expect("writing to memory");
    gz.finish().expect("writing to memory")
}

/// Where CloudTrail puts a log file under the synced bucket `root`:
/// `AWSLogs/<account>/CloudTrail/<region>/YYYY/MM/DD/<account>_CloudTrail_<region>_<YYYYMMDDTHHmmZ>_<unique>.json.gz`.
pub fn log_file_path(
    root: &Path,
    account: &str,
    region: &str,
    time: OffsetDateTime,
    unique: &str,
) -> PathBuf {
    let (y, m, d) = (time.year(), u8::from(time.month()), time.day());
    root.join("AWSLogs")
        .join(account)
        .join("CloudTrail")
        .join(region)
        .join(format!("{y:04}"))
        .join(format!("{m:02}"))
        .join(format!("{d:02}"))
        .join(format!(
            "{account}_CloudTrail_{region}_{y:04}{m:02}{d:02}T{:02}{:02}Z_{unique}.json.gz",
            time.hour(),
            time.minute()
        ))
}

/// Writes a gzip log file of `records` at [`log_file_path`], streaming, and
/// answers its path.
pub fn write_log_file(
    root: &Path,
    account: &str,
    region: &str,
    time: OffsetDateTime,
    unique: &str,
    records: impl IntoIterator<Item = Record>,
) -> io::Result<PathBuf> {
    let path = log_file_path(root, account, region, time, unique);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = io::BufWriter::new(std::fs::File::create(&path)?);
    let gz = write_records(GzEncoder::new(file, Compression::fast()), records)?;
    gz.finish()?.flush()?;
    Ok(path)
}

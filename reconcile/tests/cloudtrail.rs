//! Reading CloudTrail as AWS delivers it: gzip log files in the `AWSLogs`
//! layout and single EventBridge events, each file read once, malformed files
//! and records skipped with their reason, large files streamed.

use std::cell::Cell;
use std::io::{self, Read, Write};
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::json;
use time::OffsetDateTime;
use time::macros::datetime;
use twokey_reconcile::cloudtrail::{
    Event, MfaAction, ReadOptions, ScanError, Seen, SignInOutcome, Skip, parse_eventbridge,
    read_file, read_records, scan,
};
use twokey_reconcile::fixture::{self, Record};

const AWS: &str = "111122223333";
const T0: OffsetDateTime = datetime!(2025-03-04 10:00:00 UTC);

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Read an hour after T0.
fn options() -> ReadOptions {
    ReadOptions::at(T0 + secs(3600))
}

fn write(root: &Path, unique: &str, records: Vec<Record>) -> std::path::PathBuf {
    fixture::write_log_file(root, AWS, "us-east-1", T0, unique, records).unwrap()
}

#[test]
fn a_log_file_yields_its_sign_ins_and_mfa_changes_and_drops_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let login = Record::console_login(AWS, T0);
    let change = Record::mfa_device(MfaAction::CreateVirtual, AWS, T0 + secs(5));
    let path = write(
        dir.path(),
        "a",
        vec![
            Record::api_call("DescribeInstances", AWS, T0),
            login.clone(),
            Record::console_login(AWS, T0 + secs(1)).failed(),
            change.clone(),
            Record::api_call("GetObject", AWS, T0).remove("/eventID"),
        ],
    );
    let read = read_file(&path, &options()).unwrap();
    assert_eq!(read.records, 5);
    assert!(read.problems.is_empty(), "{:?}", read.problems);
    assert_eq!(read.events.len(), 3);
    let Event::SignIn(s) = &read.events[0] else {
        panic!("{:?}", read.events[0])
    };
    assert_eq!(s.event_id, login.id());
    assert_eq!(s.time, T0);
    assert_eq!(s.aws_account_id, AWS);
    assert!(s.is_root());
    assert_eq!(s.outcome, SignInOutcome::Success { mfa_used: true });
    let Event::SignIn(f) = &read.events[1] else {
        panic!("{:?}", read.events[1])
    };
    assert_eq!(
        f.outcome,
        SignInOutcome::Failure {
            error_message: Some("Failed authentication".into())
        }
    );
    let Event::MfaDeviceChange(c) = &read.events[2] else {
        panic!("{:?}", read.events[2])
    };
    assert_eq!(c.action, MfaAction::CreateVirtual);
    assert_eq!(c.event_id, change.id());
}

#[test]
fn every_mfa_device_call_is_read() {
    for action in MfaAction::ALL {
        let record = Record::mfa_device(action, AWS, T0);
        let event = parse_eventbridge(&record.eventbridge(), &options())
            .unwrap()
            .unwrap();
        let Event::MfaDeviceChange(c) = event else {
            panic!("{event:?}")
        };
        assert_eq!(c.action, action);
        assert_eq!(c.identity_type, "Root");
    }
}

#[test]
fn an_eventbridge_sign_in_is_read_like_the_same_record_in_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let record = Record::console_login(AWS, T0).without_mfa();
    let path = write(dir.path(), "a", vec![record.clone()]);
    let from_file = read_file(&path, &options()).unwrap().events;
    let posted = parse_eventbridge(&record.eventbridge(), &options())
        .unwrap()
        .unwrap();
    assert_eq!(from_file, std::slice::from_ref(&posted));
    let Event::SignIn(s) = posted else { panic!() };
    assert_eq!(s.outcome, SignInOutcome::Success { mfa_used: false });
}

#[test]
fn an_eventbridge_record_without_recipient_takes_the_event_account() {
    let record = Record::console_login(AWS, T0).remove("/recipientAccountId");
    let event = parse_eventbridge(&record.eventbridge(), &options())
        .unwrap()
        .unwrap();
    assert_eq!(event.aws_account_id(), AWS);
}

#[test]
fn eventbridge_events_that_are_not_cloudtrail_or_not_json_are_refused_with_a_reason() {
    let other = json!({"detail-type": "EC2 Instance State-change Notification", "detail": {}});
    assert_eq!(
        parse_eventbridge(other.to_string().as_bytes(), &options()),
        Err(Skip::NotCloudTrail(
            "EC2 Instance State-change Notification".into()
        ))
    );
    assert!(matches!(
        parse_eventbridge(b"{\"detail-type\":", &options()),
        Err(Skip::InvalidJson(_))
    ));
    assert_eq!(
        parse_eventbridge(b"[1]", &options()),
        Err(Skip::NotAnObject)
    );
    let no_detail = json!({"detail-type": "AWS Console Sign In via CloudTrail"});
    assert_eq!(
        parse_eventbridge(no_detail.to_string().as_bytes(), &options()),
        Err(Skip::MissingField("detail"))
    );
}

#[test]
fn a_record_missing_a_field_it_needs_is_skipped_with_the_field_named() {
    for (pointer, field) in [
        ("/eventName", "eventName"),
        ("/eventTime", "eventTime"),
        ("/eventID", "eventID"),
        ("/recipientAccountId", "recipientAccountId"),
        ("/userIdentity/type", "userIdentity.type"),
        (
            "/responseElements/ConsoleLogin",
            "responseElements.ConsoleLogin",
        ),
        (
            "/additionalEventData/MFAUsed",
            "additionalEventData.MFAUsed",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "a",
            vec![
                Record::console_login(AWS, T0).remove(pointer),
                Record::console_login(AWS, T0),
            ],
        );
        let read = read_file(&path, &options()).unwrap();
        assert_eq!(read.events.len(), 1, "{pointer}");
        assert_eq!(read.problems.len(), 1, "{pointer}");
        assert_eq!(read.problems[0].record, Some(0));
        assert_eq!(read.problems[0].reason, Skip::MissingField(field));
        let text = read.problems[0].to_string();
        assert!(
            text.contains(&path.display().to_string()) && text.contains("record 0"),
            "{text}"
        );
    }
}

#[test]
fn a_field_of_the_wrong_type_or_value_skips_only_its_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "a",
        vec![
            Record::console_login(AWS, T0).set("/eventID", json!(42)),
            Record::console_login(AWS, T0).set("/userIdentity", json!("Root")),
            Record::console_login(AWS, T0).set("/additionalEventData/MFAUsed", json!("Maybe")),
            Record::console_login(AWS, T0).set("/eventTime", json!("yesterday")),
            Record::console_login(AWS, T0),
        ],
    );
    let read = read_file(&path, &options()).unwrap();
    assert_eq!(read.events.len(), 1);
    let reasons: Vec<&str> = read.problems.iter().map(|p| p.reason.label()).collect();
    assert_eq!(
        reasons,
        [
            "missing_field",
            "missing_field",
            "unexpected_value",
            "bad_time"
        ]
    );
}

#[test]
fn an_event_time_beyond_the_allowed_skew_is_skipped_and_one_at_the_limit_is_read() {
    let now = T0;
    let opts = ReadOptions {
        now,
        max_skew: secs(300),
    };
    let at_limit = Record::console_login(AWS, now + secs(300));
    let beyond = Record::console_login(AWS, now + secs(301));
    assert!(
        parse_eventbridge(&at_limit.eventbridge(), &opts)
            .unwrap()
            .is_some()
    );
    let err = parse_eventbridge(&beyond.eventbridge(), &opts).unwrap_err();
    assert!(matches!(err, Skip::ClockSkew { .. }), "{err:?}");
    assert!(err.to_string().contains("clock skew"), "{err}");
}

/// Builds a synced bucket: two good files (one with a record delivered twice
/// by an organization trail too), and one of each kind of malformed file.
fn bucket(root: &Path) -> Vec<String> {
    let login = Record::console_login(AWS, T0);
    let ids = vec![login.id().to_owned()];
    write(
        root,
        "good1",
        vec![
            login.clone(),
            Record::api_call("DescribeInstances", AWS, T0),
        ],
    );
    write(
        root,
        "good2",
        vec![Record::mfa_device(MfaAction::Enable, AWS, T0 + secs(60))],
    );
    // The same sign-in again in an organization trail's copy.
    let org = root.join("AWSLogs/o-exampleorg1");
    fixture::write_log_file(&org, AWS, "us-east-1", T0, "org", [login]).unwrap();
    let moved = org.join("AWSLogs").join(AWS);
    std::fs::rename(&moved, root.join("AWSLogs/o-exampleorg1").join(AWS)).unwrap();
    std::fs::remove_dir_all(org.join("AWSLogs")).unwrap();

    // Truncated gzip: a good file cut in half.
    let bytes = fixture::log_file([Record::console_login(AWS, T0 + secs(5))]);
    let truncated = fixture::log_file_path(root, AWS, "us-east-1", T0, "truncated");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    // Not JSON inside valid gzip.
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(b"{\"Records\": [ {\"eventName\": \"ConsoleLogin\",, ]")
        .unwrap();
    let invalid = fixture::log_file_path(root, AWS, "us-east-1", T0, "invalid");
    std::fs::write(&invalid, gz.finish().unwrap()).unwrap();
    // A record missing fields beside a good one.
    write(
        root,
        "missing",
        vec![
            Record::console_login(AWS, T0 + secs(7)).remove("/eventID"),
            Record::console_login(AWS, T0 + secs(8)),
        ],
    );
    // A record from the future.
    write(
        root,
        "skewed",
        vec![Record::console_login(AWS, T0 + secs(86_400))],
    );
    // Files outside the layout are not read.
    std::fs::write(root.join("AWSLogs").join("README.json.gz"), b"junk").unwrap();
    let digest = root.join(format!(
        "AWSLogs/{AWS}/CloudTrail-Digest/us-east-1/2025/03/04"
    ));
    std::fs::create_dir_all(&digest).unwrap();
    std::fs::write(digest.join("x.json.gz"), b"junk").unwrap();
    ids
}

#[test]
fn a_scan_reads_every_good_file_and_skips_each_malformed_one_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    bucket(dir.path());
    let mut seen = Seen::new();
    let scan = scan(dir.path(), &mut seen, &options()).unwrap();
    // good1 (2 records), good2, org copy, missing (2), skewed; truncated and
    // invalid are skipped whole.
    assert_eq!(scan.files_read, 5);
    assert_eq!(scan.records, 7);
    // login, enable, login again (org copy), the good record of `missing`.
    assert_eq!(scan.events.len(), 4);
    let mut reasons: Vec<(String, Option<u64>, &str)> = scan
        .problems
        .iter()
        .map(|p| {
            let name = p.path.file_name().unwrap().to_string_lossy().into_owned();
            let unique = name
                .rsplit('_')
                .next()
                .unwrap()
                .trim_end_matches(".json.gz")
                .to_owned();
            (unique, p.record, p.reason.label())
        })
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            ("invalid".to_owned(), None, "invalid_json"),
            ("missing".to_owned(), Some(0), "missing_field"),
            ("skewed".to_owned(), Some(0), "clock_skew"),
            ("truncated".to_owned(), None, "unreadable"),
        ]
    );
    assert_eq!(seen.len(), 7);
}

#[test]
fn a_directory_scanned_twice_counts_each_file_once() {
    let dir = tempfile::tempdir().unwrap();
    bucket(dir.path());
    let mut seen = Seen::new();
    let first = scan(dir.path(), &mut seen, &options()).unwrap();
    let second = scan(dir.path(), &mut seen, &options()).unwrap();
    assert!(second.events.is_empty());
    assert!(second.problems.is_empty(), "a broken file is reported once");
    assert_eq!(second.files_read, 0);
    assert_eq!(second.files_already_seen, 7);
    // A new file is read on the next scan, alone.
    write(
        dir.path(),
        "late",
        vec![Record::console_login(AWS, T0 + secs(30))],
    );
    let third = scan(dir.path(), &mut seen, &options()).unwrap();
    assert_eq!((third.files_read, third.events.len()), (1, 1));
    assert_eq!(first.events.len(), 4);
    // The caller can persist what was seen and start from it again.
    let kept: Seen = seen.iter().map(|(p, s)| (p.to_owned(), s)).collect();
    assert_eq!(kept, seen);
}

#[test]
fn a_truncated_file_that_completes_later_is_read_then() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = fixture::log_file([Record::console_login(AWS, T0)]);
    let path = fixture::log_file_path(dir.path(), AWS, "us-east-1", T0, "syncing");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let mut seen = Seen::new();
    let first = scan(dir.path(), &mut seen, &options()).unwrap();
    assert_eq!((first.events.len(), first.problems.len()), (0, 1));
    std::fs::write(&path, &bytes).unwrap();
    let second = scan(dir.path(), &mut seen, &options()).unwrap();
    assert_eq!((second.events.len(), second.problems.len()), (1, 0));
}

#[test]
fn a_file_without_records_is_not_a_log_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.json.gz");
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(br#"{"CloudTrailEvent": []}"#).unwrap();
    std::fs::write(&path, gz.finish().unwrap()).unwrap();
    assert_eq!(read_file(&path, &options()), Err(Skip::NoRecords));
    let path = dir.path().join("plain.json.gz");
    std::fs::write(&path, br#"{"Records": []}"#).unwrap();
    assert!(matches!(
        read_file(&path, &options()),
        Err(Skip::Unreadable(_))
    ));
}

#[test]
fn a_scan_of_a_directory_without_awslogs_says_where_to_point() {
    let dir = tempfile::tempdir().unwrap();
    let err = scan(dir.path(), &mut Seen::new(), &options()).unwrap_err();
    assert!(matches!(err, ScanError::NoAwsLogs(_)));
    assert!(err.to_string().contains("synced"), "{err}");
    // AWSLogs itself is accepted as the root too.
    write(dir.path(), "a", vec![Record::console_login(AWS, T0)]);
    let scan = scan(&dir.path().join("AWSLogs"), &mut Seen::new(), &options()).unwrap();
    assert_eq!(scan.events.len(), 1);
}

/// A reader that counts the bytes handed out.
struct Counting<R> {
    inner: R,
    read: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.set(self.read.get() + n as u64);
        Ok(n)
    }
}

const LARGE: u64 = 200_000;

/// Writes 200,000 records, one in 10,000 a root sign-in, the rest the same
/// API call, streaming into the gzip file (the filler is serialised once).
fn write_large(root: &Path) -> std::path::PathBuf {
    let path = fixture::log_file_path(root, AWS, "us-east-1", T0, "large");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut gz = GzEncoder::new(file, Compression::fast());
    let filler = serde_json::to_vec(Record::api_call("GetObject", AWS, T0).json()).unwrap();
    gz.write_all(b"{\"Records\":[").unwrap();
    for i in 0..LARGE {
        if i > 0 {
            gz.write_all(b",").unwrap();
        }
        if i % 10_000 == 0 {
            let login = Record::console_login(AWS, T0 + secs(i / 10_000));
            serde_json::to_writer(&mut gz, login.json()).unwrap();
        } else {
            gz.write_all(&filler).unwrap();
        }
    }
    gz.write_all(b"]}").unwrap();
    gz.finish().unwrap().flush().unwrap();
    path
}

#[test]
fn a_large_file_is_streamed_record_by_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_large(dir.path());
    let size = std::fs::metadata(&path).unwrap().len();
    // Count the compressed bytes taken from the file while the records are
    // handed over: when the second sign-in (record 10,000 of 200,000) arrives,
    // well under a tenth of the file has been read, so nothing holds it whole.
    let read = Rc::new(Cell::new(0u64));
    let reader = flate2::read::MultiGzDecoder::new(io::BufReader::new(Counting {
        inner: std::fs::File::open(&path).unwrap(),
        read: read.clone(),
    }));
    let mut at_second = None;
    let mut kept = Vec::new();
    let mut problems = 0;
    let records = read_records(
        io::BufReader::new(reader),
        &options(),
        |index, record| match record {
            Ok(Some(event)) => {
                if index == 10_000 {
                    at_second = Some(read.get());
                }
                kept.push(event);
            }
            Ok(None) => {}
            Err(_) => problems += 1,
        },
    )
    .unwrap();
    assert_eq!(records, LARGE);
    assert_eq!(problems, 0);
    assert_eq!(kept.len(), 20);
    assert!(
        kept.iter()
            .enumerate()
            .all(|(i, e)| e.time() == T0 + secs(i as u64))
    );
    assert_eq!(read.get(), size, "the whole file was read by the end");
    let at_second = at_second.expect("record 10,000 is a sign-in");
    assert!(
        at_second < size / 10,
        "{at_second} of {size} bytes read before record 10,000 was handed over"
    );
}

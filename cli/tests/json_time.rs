//! proto3 JSON timestamps from the real `twokey` binary against the real
//! services are Z-normalized, as the mapping requires: `--json` answers and
//! every line of `twokey audit export`. An export written before, with
//! `+00:00` (chrono's `to_rfc3339`, which pbjson_types used), still verifies:
//! the signatures and Merkle leaves cover the protobuf bytes, not the JSON.

mod common;

use common::{file_request, json, json_lines, local_system, twokey_as};
use serde_json::Value;
use twokey_proto::Timestamp;

/// Whether `s` has the shape of an RFC 3339 date-time (`2026-12-03T08:…`).
fn looks_like_time(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 20
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
}

/// Every timestamp-shaped string in `v`, with its JSON path.
fn timestamps(v: &Value, path: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::String(s) if looks_like_time(s) => out.push((path.to_owned(), s.clone())),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                timestamps(item, &format!("{path}[{i}]"), out);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                timestamps(item, &format!("{path}.{k}"), out);
            }
        }
        _ => {}
    }
}

/// Asserts every timestamp in `v` is written exactly as the mapping writes
/// it (UTC, `Z`, 0/3/6/9 fractional digits) and that the fields `expected`
/// (JSON paths) are among them; returns how many there were.
fn assert_z_normalized(v: &Value, expected: &[&str]) -> usize {
    let mut found = Vec::new();
    timestamps(v, "", &mut found);
    for (path, text) in &found {
        assert!(text.ends_with('Z'), "{path}: {text}");
        let canonical = Timestamp::parse_rfc3339(text)
            .and_then(|t| t.to_rfc3339())
            .unwrap_or_else(|e| panic!("{path}: {text}: {e}"));
        assert_eq!(&canonical, text, "{path}");
    }
    for want in expected {
        assert!(
            found.iter().any(|(path, _)| path == want),
            "no timestamp at {want} in {v}"
        );
    }
    found.len()
}

/// `v` with every timestamp's `Z` written `+00:00`, as exports were before.
fn with_old_offsets(v: &mut Value) {
    match v {
        Value::String(s) if looks_like_time(s) => {
            let old = format!("{}+00:00", s.strip_suffix('Z').expect("a Z timestamp"));
            *s = old;
        }
        Value::Array(items) => items.iter_mut().for_each(with_old_offsets),
        Value::Object(map) => map.values_mut().for_each(with_old_offsets),
        _ => {}
    }
}

#[test]
fn json_answers_and_audit_exports_write_z_timestamps_and_old_exports_still_verify() {
    let (tmp, sys) = local_system();
    let cfg = &sys.config;

    // --json answers: the request as filed, shown and listed.
    let created = file_request(cfg, "rotate keys");
    let id = created["request"]["requestId"].as_str().unwrap().to_owned();
    assert_z_normalized(
        &created,
        &[
            ".request.createdAt",
            ".request.updatedAt",
            ".request.expiresAt",
            ".request.history[0].at",
        ],
    );
    let shown = json(twokey_as(cfg, "bob").args(["request", "show", &id]));
    assert_z_normalized(&shown, &[".request.createdAt", ".request.expiresAt"]);
    let listed = json(twokey_as(cfg, "alice").args(["request", "list", "--mine"]));
    assert_z_normalized(&listed, &[".requests[0].createdAt"]);
    let queried = json_lines(twokey_as(cfg, "carol").args(["audit", "query"]));
    assert!(!queried.is_empty());
    for batch in &queried {
        assert_z_normalized(batch, &[".entries[0].event.time", ".entries[0].receivedAt"]);
    }

    // audit export: every line, each with the event's time and receivedAt.
    let export = tmp.path().join("log.jsonl");
    let checkpoint = tmp.path().join("checkpoint.txt");
    let exported = json(
        twokey_as(cfg, "carol")
            .args(["audit", "export", "--out"])
            .arg(&export),
    );
    json(
        twokey_as(cfg, "carol")
            .args(["audit", "checkpoint", "--out"])
            .arg(&checkpoint),
    );
    let text = std::fs::read_to_string(&export).unwrap();
    let mut lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(Some(lines.len() as u64), exported["entries"].as_u64());
    assert!(lines.len() >= 2, "{text}");
    for line in &lines {
        assert_z_normalized(line, &[".event.time", ".receivedAt"]);
    }
    assert!(!text.contains("+00:00"), "{text}");

    // The same export as it was written before: +00:00 everywhere.
    for line in &mut lines {
        with_old_offsets(line);
    }
    let old_text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    assert!(old_text.contains("+00:00"), "{old_text}");
    let old = tmp.path().join("old.jsonl");
    std::fs::write(&old, &old_text).unwrap();
    let verify = |file: &std::path::Path| {
        json(
            twokey_as(cfg, "carol")
                .args(["audit", "verify", "--export"])
                .arg(file)
                .arg("--checkpoint")
                .arg(&checkpoint)
                .arg("--sources")
                .arg(&sys.audit_config)
                .args(["--checkpoint-key", &sys.verifier_key]),
        )
    };
    let now = verify(&export);
    let before = verify(&old);
    assert_eq!(before["entries"], exported["entries"], "{before}");
    assert_eq!(before, now);
}

//! `twokey audit verify` offline: an intact export verifies against its
//! signed checkpoint with `--json` output; a tampered entry is named.

mod common;

use std::path::Path;

use common::{json, one_line_error, twokey};
use ed25519_dalek::SigningKey;
use prost::Message;
use twokey_audit::{
    checkpoint::{Checkpoint, CheckpointSigner},
    merkle,
};
use twokey_proto::audit::v1::LogEntry;
use twokey_runtime::{
    SpiffeId,
    events::{EventDraft, EventSigner},
    keys::encode_public_key,
    time::to_timestamp,
};

struct Fixture {
    _tmp: tempfile::TempDir,
    export: std::path::PathBuf,
    checkpoint: std::path::PathBuf,
    sources: std::path::PathBuf,
    verifier: String,
    entries: Vec<LogEntry>,
}

fn write_export(path: &Path, entries: &[LogEntry]) {
    let text: String = entries
        .iter()
        .map(|e| format!("{}\n", serde_json::to_string(e).unwrap()))
        .collect();
    std::fs::write(path, text).unwrap();
}

fn fixture(n: u64) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let signers = [
        EventSigner::new(
            SpiffeId::parse("spiffe://t/svc/broker").unwrap(),
            SigningKey::from_bytes(&[1; 32]),
        ),
        EventSigner::new(
            SpiffeId::parse("spiffe://t/svc/vault").unwrap(),
            SigningKey::from_bytes(&[2; 32]),
        ),
    ];
    let start = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
    let mut seqs = [0u64; 2];
    let entries: Vec<LogEntry> = (0..n)
        .map(|index| {
            let which = usize::from(index % 2 == 1);
            seqs[which] += 1;
            let event = EventDraft::new("spiffe://t/user/alice", "request.created")
                .account("aws-prod-root")
                .request("r-1")
                .into_event(signers[which].source(), seqs[which], start);
            LogEntry {
                index,
                signed_event: Some(signers[which].sign(&event)),
                event: Some(event),
                received_at: Some(to_timestamp(start)),
            }
        })
        .collect();
    let leaves: Vec<_> = entries
        .iter()
        .map(|e| merkle::leaf_hash(&e.signed_event.as_ref().unwrap().encode_to_vec()))
        .collect();
    let signer = CheckpointSigner::new("t/audit", SigningKey::from_bytes(&[3; 32])).unwrap();
    let note = signer
        .sign(&Checkpoint {
            origin: "t/audit".into(),
            size: n,
            root: merkle::root(&leaves),
        })
        .unwrap();
    let export = tmp.path().join("log.jsonl");
    write_export(&export, &entries);
    let checkpoint = tmp.path().join("checkpoint.txt");
    std::fs::write(&checkpoint, note).unwrap();
    let sources = tmp.path().join("sources.toml");
    let mut text = String::new();
    for s in &signers {
        text.push_str(&format!(
            "[[sources]]\nid = \"{}\"\npublic_key = \"{}\"\n",
            s.source(),
            encode_public_key(&s.verifying_key())
        ));
    }
    std::fs::write(&sources, text).unwrap();
    Fixture {
        _tmp: tmp,
        export,
        checkpoint,
        sources,
        verifier: signer.verifier().to_string(),
        entries,
    }
}

fn verify_cmd(f: &Fixture) -> assert_cmd::Command {
    let mut cmd = twokey();
    cmd.args(["audit", "verify", "--export"])
        .arg(&f.export)
        .arg("--checkpoint")
        .arg(&f.checkpoint)
        .arg("--sources")
        .arg(&f.sources)
        .args(["--checkpoint-key", &f.verifier]);
    cmd
}

#[test]
fn an_intact_export_verifies_against_its_checkpoint() {
    let f = fixture(5);
    let v = json(&mut verify_cmd(&f));
    assert_eq!(v["entries"], 5);
    assert_eq!(v["checkpointTreeSize"], 5);
    assert_eq!(v["sources"]["spiffe://t/svc/broker"], 3);
    assert_eq!(v["sources"]["spiffe://t/svc/vault"], 2);
    verify_cmd(&f)
        .assert()
        .success()
        .stdout(predicates::str::starts_with("ok: 5 entries"));
}

#[test]
fn a_tampered_entry_is_named_in_one_line() {
    let f = fixture(5);
    let mut entries = f.entries.clone();
    // Re-sequence the broker's second event: its signature no longer matches.
    let signed = entries[2].signed_event.as_mut().unwrap();
    let last = signed.event.len() - 1;
    signed.event[last] ^= 1;
    write_export(&f.export, &entries);
    let err = one_line_error(&mut verify_cmd(&f), 1);
    assert!(
        err.starts_with("twokey: verification failed: entry 2"),
        "{err}"
    );
}

#[test]
fn a_dropped_entry_is_detected_by_the_checkpoint() {
    let f = fixture(5);
    write_export(&f.export, &f.entries[..4]);
    let err = one_line_error(&mut verify_cmd(&f), 1);
    assert!(err.contains("verification failed"), "{err}");
}

#[test]
fn a_checkpoint_without_its_verifier_key_is_a_usage_error() {
    let f = fixture(2);
    let err = one_line_error(
        twokey()
            .args(["audit", "verify", "--export"])
            .arg(&f.export)
            .arg("--checkpoint")
            .arg(&f.checkpoint)
            .arg("--sources")
            .arg(&f.sources),
        2,
    );
    assert!(err.contains("--checkpoint-key"), "{err}");
}

#[test]
fn an_export_alone_checks_signatures_and_sequences() {
    let f = fixture(3);
    let v = json(
        twokey()
            .args(["audit", "verify", "--export"])
            .arg(&f.export)
            .arg("--sources")
            .arg(&f.sources),
    );
    assert_eq!(v["entries"], 3);
    assert!(v.get("checkpointTreeSize").is_none());
}

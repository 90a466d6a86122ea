//! `twokey audit prove` against the real audit, vault and broker binaries on
//! loopback: an entry's inclusion and the consistency of an earlier size are
//! proved against a freshly signed checkpoint (and cross-checked here with
//! the Merkle code, independently of the CLI's own check); an entry or a
//! size beyond the log, a missing or wrong verifier key, each fail with one
//! line and the documented exit code.

mod common;

use common::{file_request, json, local_system, one_line_error, twokey_as};
use serde_json::Value;
use twokey_audit::{checkpoint::NoteVerifier, merkle};
use twokey_testkit::local::ACCOUNT;

/// A proto3-JSON or plain JSON unsigned integer.
fn number(v: &Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("not a number: {v}"))
}

fn hash(v: &Value) -> merkle::Hash {
    let text = v.as_str().unwrap_or_else(|| panic!("not a hash: {v}"));
    assert_eq!(text.len(), 64, "{text}");
    let bytes: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

fn hashes(v: &Value) -> Vec<merkle::Hash> {
    v.as_array().expect("hashes").iter().map(hash).collect()
}

#[test]
fn inclusion_and_consistency_are_proved_and_bad_sizes_are_refused() {
    let (tmp, sys) = local_system();
    let cfg = &sys.config;
    let key = sys.verifier_key.as_str();
    let verifier = NoteVerifier::parse(key).unwrap();
    json(
        twokey_as(cfg, "adam")
            .args(["account", "enroll", ACCOUNT, "--issuer", "AWS"])
            .write_stdin("JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP\n"),
    );
    file_request(cfg, "first");

    // An earlier checkpoint, saved as an auditor would.
    let old_file = tmp.path().join("old-checkpoint.txt");
    let old = json(
        twokey_as(cfg, "carol")
            .args(["audit", "checkpoint", "--out"])
            .arg(&old_file),
    );
    let old_size = number(&old["treeSize"]);
    assert!(old_size >= 2, "{old}");
    for reason in ["second", "third", "fourth"] {
        file_request(cfg, reason);
    }

    // Inclusion of the first, a middle and the newest entry.
    let prove = |args: &[&str]| {
        json(
            twokey_as(cfg, "carol")
                .args(["audit", "prove"])
                .args(args)
                .args(["--checkpoint-key", key]),
        )
    };
    let first = prove(&["--inclusion", "0"]);
    let size = number(&first["treeSize"]);
    assert!(size > old_size, "{first}");
    for index in [0, old_size - 1, size - 1] {
        let p = prove(&["--inclusion", &index.to_string()]);
        assert_eq!(p["proof"], "inclusion", "{p}");
        assert_eq!(number(&p["leafIndex"]), index, "{p}");
        let signed = verifier
            .open_checkpoint(p["checkpoint"].as_str().unwrap())
            .unwrap();
        let tree_size = number(&p["treeSize"]);
        assert_eq!(signed.size, tree_size);
        assert_eq!(signed.root, hash(&p["rootHash"]));
        merkle::verify_inclusion(
            index,
            tree_size,
            &hash(&p["leafHash"]),
            &hashes(&p["hashes"]),
            &signed.root,
        )
        .unwrap_or_else(|e| panic!("entry {index}: {e}: {p}"));
    }

    // Consistency from the earlier size: the old root computed from the
    // entries, and taken from the saved checkpoint; both the same root.
    let computed = prove(&["--consistency", &old_size.to_string()]);
    let from_file = json(
        twokey_as(cfg, "carol")
            .args(["audit", "prove", "--consistency", &old_size.to_string()])
            .arg("--old-checkpoint")
            .arg(&old_file)
            .args(["--checkpoint-key", key]),
    );
    assert_eq!(computed["oldRootFrom"], "entries", "{computed}");
    assert_eq!(from_file["oldRootFrom"], "checkpoint file", "{from_file}");
    assert_eq!(computed["oldRootHash"], from_file["oldRootHash"]);
    let old_signed = verifier
        .open_checkpoint(old["checkpoint"].as_str().unwrap())
        .unwrap();
    for p in [&computed, &from_file] {
        assert_eq!(p["proof"], "consistency", "{p}");
        assert_eq!(number(&p["oldSize"]), old_size);
        assert_eq!(hash(&p["oldRootHash"]), old_signed.root);
        let signed = verifier
            .open_checkpoint(p["checkpoint"].as_str().unwrap())
            .unwrap();
        merkle::verify_consistency(
            old_size,
            signed.size,
            &hashes(&p["hashes"]),
            &old_signed.root,
            &signed.root,
        )
        .unwrap_or_else(|e| panic!("{e}: {p}"));
    }
    // Every size up to the signed one proves.
    let whole = prove(&["--consistency", &size.to_string()]);
    assert_eq!(number(&whole["oldSize"]), number(&whole["treeSize"]));

    // The human answer: what was proved, then the hashes.
    let out = twokey_as(cfg, "carol")
        .args([
            "audit",
            "prove",
            "--inclusion",
            "1",
            "--checkpoint-key",
            key,
        ])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.starts_with("ok: entry 1 is in the signed log of "),
        "{text}"
    );
    assert!(text.contains("checkpoint signature valid"), "{text}");
    assert!(text.contains("inclusion proof, "), "{text}");

    // An entry or a size beyond the log: one line, exit 1, saying why.
    let beyond = size + 100;
    let err = one_line_error(
        twokey_as(cfg, "carol").args([
            "audit",
            "prove",
            "--inclusion",
            &beyond.to_string(),
            "--checkpoint-key",
            key,
        ]),
        1,
    );
    assert!(
        err.contains(&format!(
            "entry {beyond} is not in the log: the signed checkpoint covers"
        )),
        "{err}"
    );
    assert!(err.contains("give an ENTRY below"), "{err}");
    let err = one_line_error(
        twokey_as(cfg, "carol").args([
            "audit",
            "prove",
            "--consistency",
            &beyond.to_string(),
            "--checkpoint-key",
            key,
        ]),
        1,
    );
    assert!(
        err.contains(&format!(
            "size {beyond} is beyond the log: the signed checkpoint covers"
        )),
        "{err}"
    );
    assert!(err.contains("give an OLD_SIZE of at most"), "{err}");

    // The old checkpoint of another size: a usage error naming the size.
    let err = one_line_error(
        twokey_as(cfg, "carol")
            .args([
                "audit",
                "prove",
                "--consistency",
                &(old_size + 1).to_string(),
            ])
            .arg("--old-checkpoint")
            .arg(&old_file)
            .args(["--checkpoint-key", key]),
        2,
    );
    assert!(
        err.contains(&format!("give --consistency {old_size}")),
        "{err}"
    );

    // No verifier key: usage, exit 2. Another log's key: nothing verifies.
    let err = one_line_error(
        twokey_as(cfg, "carol").args(["audit", "prove", "--inclusion", "0"]),
        2,
    );
    assert!(err.contains("pass --checkpoint-key"), "{err}");
    let other = NoteVerifier::new(
        verifier.name(),
        ed25519_dalek::SigningKey::from_bytes(&[9; 32]).verifying_key(),
    )
    .unwrap()
    .to_string();
    let err = one_line_error(
        twokey_as(cfg, "carol").args([
            "audit",
            "prove",
            "--inclusion",
            "0",
            "--checkpoint-key",
            &other,
        ]),
        1,
    );
    assert!(
        err.contains("the checkpoint the audit service served does not verify with key"),
        "{err}"
    );
    // Neither proof, or size 0: clap's usage error.
    twokey_as(cfg, "carol")
        .args(["audit", "prove", "--checkpoint-key", key])
        .assert()
        .code(2);
    twokey_as(cfg, "carol")
        .args([
            "audit",
            "prove",
            "--consistency",
            "0",
            "--checkpoint-key",
            key,
        ])
        .assert()
        .code(2);
}

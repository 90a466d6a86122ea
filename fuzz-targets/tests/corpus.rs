//! Replays every committed fuzz corpus file and every regression input
//! (`fuzz/corpus/<target>/`, `fuzz/regressions/<target>/`) through the same
//! function the fuzz target calls, on the stable toolchain.

use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(target: &str) {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let corpus = files(&fuzz.join("corpus").join(target));
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target}/ is empty: commit the minimised corpus"
    );
    for file in corpus
        .iter()
        .chain(&files(&fuzz.join("regressions").join(target)))
    {
        let data = std::fs::read(file).expect("readable corpus file");
        let outcome = std::panic::catch_unwind(|| twokey_fuzz_targets::run(target, &data));
        assert!(outcome.is_ok(), "{target}: {} fails", file.display());
    }
}

#[test]
fn every_target_has_a_fuzz_target_file() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/fuzz_targets");
    for target in twokey_fuzz_targets::TARGETS {
        assert!(dir.join(format!("{target}.rs")).is_file(), "{target}");
    }
}

#[test]
fn otpauth_corpus_replays() {
    replay("otpauth");
}

#[test]
fn grant_corpus_replays() {
    replay("grant");
}

#[test]
fn event_corpus_replays() {
    replay("event");
}

#[test]
fn policy_corpus_replays() {
    replay("policy");
}

#[test]
fn checkpoint_corpus_replays() {
    replay("checkpoint");
}

//! Go's `golang.org/x/mod/sumdb/tlog` (vendored unchanged in
//! `tests/go/tilecheck`) verifies twokey's C2SP `tlog-tiles` as any standard
//! tile client would: the checkpoint with `sumdb/note`, every hash tile
//! authenticated against it by `tlog.TileHashReader`, the tree hash, every
//! entry's record hash, inclusion proofs and a consistency proof. Skipped,
//! with a message, where Go is not installed.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use common::*;
use ed25519_dalek::SigningKey;
use twokey_audit::checkpoint::{Checkpoint, CheckpointSigner};
use twokey_tlog::{
    merkle::{Hash, leaf_hash},
    tile::{Kind, Tile, WIDTH, push_entry, subtree_of},
};

/// Writes the tiles, entry bundles and signed checkpoint of a log of
/// `entries` under `log` with twokey-tlog's tile code, the layout the audit
/// store keeps in `DATA_DIR/log`.
fn write_log(log: &Path, entries: &[Vec<u8>], signer: &CheckpointSigner) -> Hash {
    let write = |tile: Tile, bytes: &[u8]| {
        let file = log.join(tile.path());
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, bytes).unwrap();
    };
    let tiles_of = |n: usize| (0..n.div_ceil(WIDTH as usize)).map(|i| (i, i * WIDTH as usize));
    for (index, start) in tiles_of(entries.len()) {
        let chunk = &entries[start..entries.len().min(start + WIDTH as usize)];
        let mut bundle = Vec::new();
        for e in chunk {
            push_entry(&mut bundle, e).unwrap();
        }
        let tile = Tile {
            kind: Kind::Entries,
            index: index as u64,
            width: chunk.len() as u16,
        };
        write(tile, &bundle);
    }
    let mut hashes: Vec<Hash> = entries.iter().map(|e| leaf_hash(e)).collect();
    let mut level = 0u8;
    while !hashes.is_empty() {
        for (index, start) in tiles_of(hashes.len()) {
            let chunk = &hashes[start..hashes.len().min(start + WIDTH as usize)];
            let tile = Tile {
                kind: Kind::Hashes(level),
                index: index as u64,
                width: chunk.len() as u16,
            };
            write(tile, &chunk.concat());
        }
        hashes = hashes
            .chunks_exact(WIDTH as usize)
            .map(|c| subtree_of(c).unwrap())
            .collect();
        level += 1;
    }
    let leaves: Vec<Hash> = entries.iter().map(|e| leaf_hash(e)).collect();
    let root = twokey_tlog::merkle::root(&leaves);
    let note = signer
        .sign(&Checkpoint {
            origin: signer.name().to_owned(),
            size: entries.len() as u64,
            root,
        })
        .unwrap();
    std::fs::write(log.join("checkpoint"), note).unwrap();
    root
}

fn signer() -> CheckpointSigner {
    CheckpointSigner::new("twokey.test/audit", SigningKey::from_bytes(&[5; 32])).unwrap()
}

fn tilecheck_dir(bin: &Path, key: &str, log: &Path) -> Output {
    Command::new(bin)
        .args(["-key", key, "-proofs", "300", "-dir"])
        .arg(log)
        .output()
        .unwrap()
}

/// The record hashes Go printed, in order.
fn record_hashes(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("entry "))
        .map(|l| l.split(' ').nth(1).unwrap().to_owned())
        .collect()
}

fn assert_verified(out: &Output, entries: &[Vec<u8>]) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "Go's sumdb/tlog refused the tiles: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        stdout.lines().take(3).collect::<Vec<_>>().join("\n")
    );
    assert!(
        stdout.starts_with(&format!("checkpoint twokey.test/audit {}\n", entries.len())),
        "{}",
        stdout.lines().next().unwrap_or_default()
    );
    let want: Vec<String> = entries.iter().map(|e| hex::encode(leaf_hash(e))).collect();
    assert_eq!(record_hashes(out), want);
    assert!(stdout.contains("\nconsistent "), "no consistency check");
    assert!(stdout.ends_with("ok\n"));
}

fn tilecheck() -> Option<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::tempdir().unwrap();
    let bin = go_build("tilecheck", dir.path())?;
    Some((dir, bin))
}

#[test]
fn go_tlog_verifies_tiles_written_by_our_tile_code_at_every_edge() {
    let Some((dir, bin)) = tilecheck() else {
        return;
    };
    let key = signer().verifier().to_string();
    // Sizes at the edges of tiles of levels 0, 1 and 2.
    for size in [1usize, 2, 255, 256, 257, 511, 512, 65_535, 65_536, 65_537] {
        let log = dir.path().join(format!("log-{size}"));
        let entries: Vec<Vec<u8>> = (0..size as u32)
            .map(|i| format!("entry {i}").into_bytes())
            .collect();
        write_log(&log, &entries, &signer());
        let out = tilecheck_dir(&bin, &key, &log);
        assert_verified(&out, &entries);
    }
}

#[test]
fn go_tlog_refuses_a_changed_entry_hash_tile_or_checkpoint() {
    let Some((dir, bin)) = tilecheck() else {
        return;
    };
    let key = signer().verifier().to_string();
    let entries: Vec<Vec<u8>> = (0..300u32).map(|i| i.to_be_bytes().to_vec()).collect();
    let fresh = |name: &str| {
        let log = dir.path().join(name);
        write_log(&log, &entries, &signer());
        assert!(tilecheck_dir(&bin, &key, &log).status.success());
        log
    };
    let flip = |file: PathBuf, at: usize| {
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[at] ^= 1;
        std::fs::write(file, bytes).unwrap();
    };
    let refused = |log: &Path, why: &str| {
        let out = tilecheck_dir(&bin, &key, log);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{why}: {stderr}");
        assert!(stderr.contains("log does not verify"), "{why}: {stderr}");
    };

    let log = fresh("entry");
    flip(log.join("tile/entries/001.p/44"), 2 + 3); // a byte of entry 256
    refused(&log, "a changed entry");

    let log = fresh("hash");
    flip(log.join("tile/0/000"), 32 * 7); // leaf hash 7
    refused(&log, "a changed hash tile");

    let log = fresh("checkpoint");
    let other =
        CheckpointSigner::new("twokey.test/audit", SigningKey::from_bytes(&[6; 32])).unwrap();
    write_log(&log, &entries[..299], &other);
    refused(&log, "a checkpoint by another key");

    let log = fresh("missing");
    std::fs::remove_file(log.join("tile/1/000.p/1")).unwrap();
    refused(&log, "a missing tile");
}

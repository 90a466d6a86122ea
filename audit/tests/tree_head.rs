//! The log never signs less than it signed before, against an attacker
//! with write access to the audit host's disk but no keys, while the real
//! `twokey-audit` binary is stopped: a byte flipped in the newest stored
//! entry, the tail deleted from the tiles and the index, and an older copy
//! of the data directory put back. Each is refused at start with a message naming the
//! signed size, its root, what the store holds and what to do; the
//! tree-head file keeps the larger head; a normal restart still serves.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use twokey_audit::{checkpoint::Checkpoint, head::FILE_NAME, store::tiles::LOG_DIR};
use twokey_proto::audit::v1::LogEntry;

/// Starts the binary, appends vault events `seqs` and returns the
/// checkpoint it then serves and every entry; the binary is stopped at the end.
async fn append_and_read(
    env: &Env,
    seqs: std::ops::RangeInclusive<u64>,
) -> (Checkpoint, Vec<LogEntry>) {
    let (child, addr) = start(&serve_flags(env)).await;
    let vault = env.vault();
    let events = seqs.map(|s| event(&vault, s, "request.created")).collect();
    let mut client = env.client(addr, "vault");
    for answer in append_all(&mut client, events).await.unwrap() {
        answer.unwrap();
    }
    let mut carol = env.client(addr, "carol");
    let cp = checkpoint(&mut carol).await;
    let checkpoint = env.verifier().open_checkpoint(&cp.checkpoint).unwrap();
    let entries = query_all(&mut carol).await;
    env.verify(&entries, &cp.checkpoint);
    // The head was in the journal before the checkpoint was answered; a
    // clean stop applies the journal, so the file holds it.
    child.stop().await;
    assert_eq!(head_on_disk(env).size, checkpoint.size);
    (checkpoint, entries)
}

async fn append_and_checkpoint(env: &Env, seqs: std::ops::RangeInclusive<u64>) -> Checkpoint {
    append_and_read(env, seqs).await.0
}

fn data_dir(env: &Env) -> PathBuf {
    env.config.data_dir.clone()
}

fn head_path(env: &Env) -> PathBuf {
    data_dir(env).join(FILE_NAME)
}

fn head_on_disk(env: &Env) -> Checkpoint {
    let note = std::fs::read_to_string(head_path(env)).expect("a tree-head file");
    env.verifier().open_checkpoint(&note).unwrap()
}

/// Runs `serve`, which must exit non-zero within 60 s; returns its stderr.
/// While this process's sled (a test that edited the store) still holds the
/// database lock, it tries again.
fn refused_start(env: &Env) -> String {
    for _ in 0..100 {
        let stderr = refused_start_once(env);
        if !stderr.contains("could not acquire lock") {
            return stderr;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the sled database lock was not released within 10 s");
}

fn refused_start_once(env: &Env) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_twokey-audit"))
        .arg("serve")
        .args(serve_flags(env))
        .env_remove("TWOKEY_AUDIT_CONFIG")
        .env("TWOKEY_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "twokey-audit started on a log that does not extend its signed tree head:\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "exit 0: {stderr}");
    assert!(!stdout.contains("listening on"), "it served: {stdout}");
    stderr
}

/// The parts every refusal names: the signed size and root, where the
/// head is kept, and both ways out.
fn assert_refusal(env: &Env, stderr: &str, signed: &Checkpoint, found: &[&str]) {
    println!("the refusal as the operator sees it:\n{stderr}");
    let head = head_path(env);
    let parts = [
        "cannot start: the audit log does not extend its signed tree head".to_owned(),
        format!(
            "but this log signed a tree head of {} entries with root {} (kept in {})",
            signed.size,
            hex::encode(signed.root),
            head.display()
        ),
        format!(
            "Restore the data directory {} from a backup holding at least {} entries, keeping {} as it is",
            data_dir(env).display(),
            signed.size,
            head.display()
        ),
        format!(
            "only if you knowingly accept losing signed entries for good, move {} away and start again",
            head.display()
        ),
    ];
    for part in parts
        .iter()
        .map(String::as_str)
        .chain(found.iter().copied())
    {
        assert!(stderr.contains(part), "{part:?} is not in:\n{stderr}");
    }
    // Nothing smaller was signed: the persisted head is unchanged.
    assert_eq!(&head_on_disk(env), signed);
}

/// The last position of `needle` in `haystack`.
fn rfind(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Audit refuses to start on a store of `held` entries below the signed
/// head `signed`, saying so.
fn assert_shorter_store_refused(env: &Env, signed: &Checkpoint, held: usize) {
    let stderr = refused_start(env);
    assert_refusal(
        env,
        &stderr,
        signed,
        &[&format!(
            "the store in {} holds {held} entries: entries were lost or the data directory was rolled back",
            data_dir(env).display()
        )],
    );
}

/// The attack of issue 15, on tiles: audit stopped right after the newest
/// entry was written, one byte of that entry flipped on disk (its entry
/// bundle). Opening rehashes the newest entries against their leaf hashes
/// and refuses.
#[tokio::test]
async fn a_flipped_byte_in_the_newest_entry_is_refused_at_start() {
    let env = Env::new();
    append_and_checkpoint(&env, 1..=11).await;
    // A normal restart serves the same log.
    let (child, addr) = start(&serve_flags(&env)).await;
    assert_eq!(
        checkpoint(&mut env.client(addr, "carol")).await.tree_size,
        11
    );
    drop(child);
    let (signed, entries) = append_and_read(&env, 12..=12).await;
    assert_eq!(signed.size, 12);

    // Flip one byte of the newest entry's event signature where the entry
    // bundle of the 12 entries keeps it.
    let bundle = data_dir(&env).join(LOG_DIR).join("tile/entries/000.p/12");
    let mut bytes = std::fs::read(&bundle).unwrap();
    let newest = entries.last().unwrap();
    let signature = &newest.signed_event.as_ref().unwrap().signature;
    let at = rfind(&bytes, signature).expect("the newest entry's signature is in its bundle");
    bytes[at + 10] ^= 0x01;
    std::fs::write(&bundle, bytes).unwrap();

    let stderr = refused_start(&env);
    assert_refusal(
        &env,
        &stderr,
        &signed,
        &[
            "entry 11 stored in",
            "does not hash to its leaf hash in its level-0 tile: it was altered",
        ],
    );
}

/// The partial tiles of width `width` (entries and level 0) made from the
/// wider ones, as an attacker who cuts the tail would leave them.
fn cut_tail(log: &Path, width: usize) {
    for (kind, item) in [("entries", None), ("0", Some(32))] {
        let partials = log.join(format!("tile/{kind}/000.p"));
        let widest = std::fs::read_dir(&partials)
            .unwrap()
            .map(|e| {
                e.unwrap()
                    .file_name()
                    .into_string()
                    .unwrap()
                    .parse::<usize>()
                    .unwrap()
            })
            .max()
            .unwrap();
        let bytes = std::fs::read(partials.join(widest.to_string())).unwrap();
        let keep = match item {
            Some(len) => width * len,
            None => {
                let mut at = 0;
                for _ in 0..width {
                    at += 2 + usize::from(u16::from_be_bytes([bytes[at], bytes[at + 1]]));
                }
                at
            }
        };
        for e in std::fs::read_dir(&partials).unwrap() {
            let e = e.unwrap();
            let w: usize = e.file_name().into_string().unwrap().parse().unwrap();
            if w > width {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
        std::fs::write(partials.join(width.to_string()), &bytes[..keep]).unwrap();
    }
}

#[tokio::test]
async fn a_deleted_tail_is_refused_at_start() {
    let env = Env::new();
    let signed = append_and_checkpoint(&env, 1..=10).await;

    // Remove the three newest entries from the tiles, and the size from
    // the index with them, as a careful attacker would: the store looks
    // whole at 7.
    cut_tail(&data_dir(&env).join(LOG_DIR), 7);
    {
        let db = sled::open(data_dir(&env)).unwrap();
        let meta = db.open_tree("log_meta").unwrap();
        assert_eq!(
            meta.get("m/size").unwrap().unwrap().as_ref(),
            10u64.to_be_bytes()
        );
        meta.insert("m/size", &7u64.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }

    assert_shorter_store_refused(&env, &signed, 7);
}

#[tokio::test]
async fn deleted_tail_tiles_are_refused_at_start() {
    let env = Env::new();
    let signed = append_and_checkpoint(&env, 1..=10).await;
    // Only the tiles cut back to 7; the index still says 10.
    cut_tail(&data_dir(&env).join(LOG_DIR), 7);
    assert_shorter_store_refused(&env, &signed, 7);
}

#[tokio::test]
async fn an_older_backup_put_back_under_the_new_tree_head_is_refused_at_start() {
    let env = Env::new();
    append_and_checkpoint(&env, 1..=5).await;
    let backup = env.path().join("backup");
    copy_dir(&data_dir(&env), &backup);

    // The log goes on, and a normal restart serves all of it.
    let signed = append_and_checkpoint(&env, 6..=9).await;
    assert_eq!(signed.size, 9);
    let (child, addr) = start(&serve_flags(&env)).await;
    assert_eq!(
        checkpoint(&mut env.client(addr, "carol")).await.tree_size,
        9
    );
    drop(child);

    // The old copy goes back; the tree-head file stays the new one.
    let head = std::fs::read(head_path(&env)).unwrap();
    std::fs::remove_dir_all(data_dir(&env)).unwrap();
    copy_dir(&backup, &data_dir(&env));
    std::fs::write(head_path(&env), head).unwrap();

    assert_shorter_store_refused(&env, &signed, 5);

    // The operator knowingly accepts the loss and moves the tree-head file
    // away: the old copy starts and the head is written from what it holds.
    std::fs::rename(head_path(&env), env.path().join("tree-head.moved")).unwrap();
    let (child, addr) = start(&serve_flags(&env)).await;
    assert_eq!(head_on_disk(&env).size, 5);
    assert_eq!(
        checkpoint(&mut env.client(addr, "carol")).await.tree_size,
        5
    );
    drop(child);
}

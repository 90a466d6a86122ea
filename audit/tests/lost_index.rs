//! sled lost under intact tiles: the real `twokey-audit` binary rebuilds
//! its indexes from the tiles at start when they give the signed root, and
//! refuses to start when they do not.

mod common;

use std::{
    path::Path,
    process::{Command, Stdio},
};

use common::*;
use twokey_audit::store::tiles::LOG_DIR;
use twokey_proto::audit::v1::AppendStatus;

/// Removes everything of the data directory but the tiles and checkpoint
/// (sled, and the journal with it).
fn lose_sled(data: &Path) {
    for e in std::fs::read_dir(data).unwrap() {
        let e = e.unwrap();
        if e.file_name() == LOG_DIR {
            continue;
        }
        let p = e.path();
        if p.is_dir() {
            std::fs::remove_dir_all(p).unwrap();
        } else {
            std::fs::remove_file(p).unwrap();
        }
    }
}

#[tokio::test]
async fn a_lost_sled_is_rebuilt_from_intact_tiles_and_the_log_goes_on() {
    let env = Env::new();
    let (child, addr) = start(&serve_flags(&env)).await;
    let vault = env.vault();
    let events = (1..=20)
        .map(|s| event(&vault, s, "request.created"))
        .collect();
    for a in append_all(&mut env.client(addr, "vault"), events)
        .await
        .unwrap()
    {
        a.unwrap();
    }
    let mut carol = env.client(addr, "carol");
    let before = checkpoint(&mut carol).await;
    assert_eq!(before.tree_size, 20);
    let entries = query_all(&mut carol).await;
    // Stopped cleanly: the tiles and checkpoint file hold every entry (a
    // crash leaves the newest in the journal, lost here with sled).
    child.stop().await;

    lose_sled(&env.config.data_dir);
    let (child, addr) = start(&serve_flags(&env)).await;
    let mut carol = env.client(addr, "carol");
    let after = checkpoint(&mut carol).await;
    assert_eq!(after.tree_size, 20);
    assert_eq!(
        env.verifier()
            .open_checkpoint(&after.checkpoint)
            .unwrap()
            .root,
        env.verifier()
            .open_checkpoint(&before.checkpoint)
            .unwrap()
            .root
    );
    let rebuilt = query_all(&mut carol).await;
    assert_eq!(rebuilt.len(), 20);
    for (a, b) in rebuilt.iter().zip(&entries) {
        assert_eq!(
            (a.index, &a.signed_event, &a.event),
            (b.index, &b.signed_event, &b.event)
        );
        // The received time was in sled alone.
        assert_eq!(a.received_at, None);
    }
    // The vault's next seq is known again: 21 is taken, a retry of 20 is
    // answered with its old index, not appended twice.
    let more = vec![
        entries[19].signed_event.clone().unwrap(),
        event(&vault, 21, "request.created"),
    ];
    let answers: Vec<_> = append_all(&mut env.client(addr, "vault"), more)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .filter(|a| a.seq != 0)
        .map(|a| (a.seq, a.status(), a.leaf_index))
        .collect();
    assert_eq!(
        answers,
        [
            (20, AppendStatus::Duplicate, 19),
            (21, AppendStatus::Stored, 20)
        ]
    );
    assert_eq!(checkpoint(&mut carol).await.tree_size, 21);
    drop(child);
}

#[tokio::test]
async fn a_lost_sled_over_altered_tiles_is_refused_at_start() {
    let env = Env::new();
    let (child, addr) = start(&serve_flags(&env)).await;
    let vault = env.vault();
    let events = (1..=12)
        .map(|s| event(&vault, s, "request.created"))
        .collect();
    for a in append_all(&mut env.client(addr, "vault"), events)
        .await
        .unwrap()
    {
        a.unwrap();
    }
    let signed = checkpoint(&mut env.client(addr, "carol")).await;
    assert_eq!(signed.tree_size, 12);
    child.stop().await;

    lose_sled(&env.config.data_dir);
    // A leaf hash changed in the level-0 tile: another root.
    let tile = env.config.data_dir.join(LOG_DIR).join("tile/0/000.p/12");
    let mut bytes = std::fs::read(&tile).unwrap();
    bytes[5] ^= 0x01;
    std::fs::write(&tile, bytes).unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_twokey-audit"))
        .arg("serve")
        .args(serve_flags(&env))
        .env_remove("TWOKEY_AUDIT_CONFIG")
        .env("TWOKEY_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it started: {stderr}");
    assert!(
        stderr.contains("the index in sled is empty and cannot be rebuilt from the tiles")
            && stderr.contains("this log signed 12 entries")
            && stderr.contains("Restore the data directory from a backup"),
        "{stderr}"
    );
}

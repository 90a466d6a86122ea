//! `twokey-audit verify-store`: the whole stored log rehashed offline
//! against its checkpoint, which finds what start does not look for (start
//! checks the right edge only, so that it costs the same at any size).

mod common;

use std::process::{Command, Output};

use common::*;
use twokey_audit::{
    head::FILE_NAME,
    store::tiles::{LOG_DIR, QUERY_BATCH},
};

fn verify_store(env: &Env, verifier: bool) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_twokey-audit"));
    command
        .arg("verify-store")
        .arg("--data-dir")
        .arg(&env.config.data_dir)
        .env_remove("TWOKEY_AUDIT_VERIFIER")
        .env_remove("TWOKEY_AUDIT_DATA_DIR");
    if verifier {
        command.arg("--verifier").arg(env.verifier().to_string());
    }
    command.output().unwrap()
}

fn rfind(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

#[tokio::test]
async fn a_flipped_byte_in_an_old_full_tile_is_found_by_verify_store_although_start_serves() {
    let env = Env::new();
    let (child, addr) = start(&serve_flags(&env)).await;
    let vault = env.vault();
    // More than QUERY_BATCH entries: bundle 000 is neither at the right
    // edge that start checks nor among the entries whose query keys start
    // derives again from the tiles.
    let n = QUERY_BATCH + 300;
    let events = (1..=n)
        .map(|s| event(&vault, s, "request.created"))
        .collect();
    for answer in append_all(&mut env.client(addr, "vault"), events)
        .await
        .unwrap()
    {
        answer.unwrap();
    }
    let mut carol = env.client(addr, "carol");
    let note = checkpoint(&mut carol).await.checkpoint;
    let signed = env.verifier().open_checkpoint(&note).unwrap();
    assert_eq!(signed.size, n);
    let entries = query_all(&mut carol).await;
    drop(child);

    // The intact store verifies, the checkpoint's signature included.
    let ok = verify_store(&env, true);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        stdout.contains(&format!("verified {n} entries")),
        "{stdout}"
    );
    assert!(stdout.contains(&hex::encode(signed.root)), "{stdout}");
    assert!(stdout.contains("its signature by"), "{stdout}");

    // One byte of entry 3's signature flipped in the old full bundle.
    let bundle = env.config.data_dir.join(LOG_DIR).join("tile/entries/000");
    let mut bytes = std::fs::read(&bundle).unwrap();
    let signature = &entries[3].signed_event.as_ref().unwrap().signature;
    let at = rfind(&bytes, signature).expect("entry 3's signature is in bundle 000");
    bytes[at + 10] ^= 0x01;
    std::fs::write(&bundle, bytes).unwrap();

    // Start does not read that far back: it serves the signed size.
    let (child, addr) = start(&serve_flags(&env)).await;
    assert_eq!(
        checkpoint(&mut env.client(addr, "carol")).await.tree_size,
        n
    );
    drop(child);

    let bad = verify_store(&env, false);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success(),
        "verify-store passed an altered store"
    );
    assert!(
        stderr.contains("stored entry 3 is corrupt")
            && stderr.contains("does not hash to its leaf hash in its level-0 tile")
            && stderr.contains("restore the data directory from a backup"),
        "{stderr}"
    );
}

#[test]
fn verify_store_refuses_a_directory_without_a_log_and_creates_nothing() {
    let env = Env::new();
    let run = verify_store(&env, false);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("holds no audit log")
            && stderr.contains("pass the audit service's data_dir"),
        "{stderr}"
    );
    assert!(!env.config.data_dir.join("db").exists());
    assert!(!env.config.data_dir.join(FILE_NAME).exists());
}

//! kill -9 of the real `twokey-audit` binary in the middle of a burst of
//! appends: after a restart on the same data directory every acknowledged
//! event is there (replayed from the journal where the tiles did not hold
//! it yet), the log verifies, `verify-store` passes, and the source resumes
//! without a gap.

mod common;

use common::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use twokey_proto::audit::v1::{AppendRequest, AppendStatus};

const BURST: u64 = 5000;
const KILL_AFTER: usize = 300;

#[tokio::test]
async fn acknowledged_appends_survive_kill_9_and_the_log_verifies() {
    let env = Env::new();
    let flags = serve_flags(&env);
    let vault = env.vault();
    let events: Vec<_> = (1..=BURST)
        .map(|s| event(&vault, s, "request.created"))
        .collect();

    let (mut child, addr) = start(&flags).await;
    let mut client = env.client(addr, "vault");
    let (tx, rx) = mpsc::channel(BURST as usize);
    for e in &events {
        tx.send(AppendRequest {
            event: Some(e.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    drop(tx);
    let mut answers = client
        .append(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut acked = Vec::new();
    let mut killed = false;
    while let Ok(Some(ack)) = answers.message().await {
        assert_eq!(ack.status, AppendStatus::Stored as i32, "{ack:?}");
        acked.push(ack.seq);
        if acked.len() == KILL_AFTER {
            child.0.kill().unwrap(); // SIGKILL
            killed = true;
        }
    }
    assert!(
        killed,
        "the stream ended before {KILL_AFTER} acknowledgements"
    );
    let status = child.0.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    assert!(
        (acked.len() as u64) < BURST,
        "the whole burst was acknowledged before the kill; the test did not crash mid-burst"
    );
    assert_eq!(acked, (1..=acked.len() as u64).collect::<Vec<_>>());

    // Restart on the same data directory.
    let (child, addr) = start(&flags).await;
    let mut carol = env.client(addr, "carol");
    let entries = query_all(&mut carol).await;
    assert!(
        entries.len() >= acked.len(),
        "{} acknowledged but only {} stored after the crash",
        acked.len(),
        entries.len()
    );
    for (i, seq) in acked.iter().enumerate() {
        assert_eq!(
            entries[i].signed_event.as_ref(),
            Some(&events[*seq as usize - 1])
        );
    }
    let cp = checkpoint(&mut carol).await;
    assert_eq!(cp.tree_size, entries.len() as u64);
    env.verify(&entries, &cp.checkpoint);

    // The source resends the whole burst: what survived is a duplicate, the
    // rest is stored, and the log stays contiguous and verifiable.
    let stored_before = entries.len() as u64;
    let mut client = env.client(addr, "vault");
    let answers = append_all(&mut client, events.clone()).await.unwrap();
    assert_eq!(answers.len() as u64, BURST);
    for a in &answers {
        let a = a.as_ref().unwrap();
        let want = if a.seq <= stored_before {
            AppendStatus::Duplicate
        } else {
            AppendStatus::Stored
        };
        assert_eq!(a.status, want as i32, "{a:?}");
    }
    let entries = query_all(&mut carol).await;
    assert_eq!(entries.len() as u64, BURST);
    let cp2 = checkpoint(&mut carol).await;
    env.verify(&entries, &cp2.checkpoint);
    env.verify(&entries, &cp.checkpoint);
    drop(child); // killed on drop
}

/// Streams `events` on one Append stream of `client` and records each
/// acknowledged seq in `acked` as it comes, until the stream breaks.
async fn stream_until_broken(
    mut client: twokey_proto::audit::v1::audit_service_client::AuditServiceClient<
        tonic::transport::Channel,
    >,
    events: Vec<twokey_proto::audit::v1::SignedEvent>,
    acked: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
) {
    let requests: Vec<_> = events
        .into_iter()
        .map(|e| AppendRequest {
            event: Some(e),
            ..Default::default()
        })
        .collect();
    let Ok(answers) = client.append(tokio_stream::iter(requests)).await else {
        return;
    };
    let mut answers = answers.into_inner();
    while let Ok(Some(ack)) = answers.message().await {
        if ack.seq != 0 {
            assert_eq!(ack.status, AppendStatus::Stored as i32, "{ack:?}");
            acked.lock().unwrap().push(ack.seq);
        }
    }
}

/// Two sources streaming at once, so group commits hold both; kill -9 while
/// the journal holds groups the tiles and the checkpoint file do not: after
/// the restart every acknowledged event of each source is in the log at
/// its place in that source's order, the log verifies, and after a clean
/// stop `verify-store` rehashes the whole store against its checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_groups_of_two_sources_survive_kill_9_and_verify_store_passes() {
    use std::sync::{Arc, Mutex};
    let env = Env::new();
    let flags = serve_flags(&env);
    let (vault, broker) = (env.vault(), env.broker());
    let of = |signer: &twokey_runtime::events::EventSigner| -> Vec<_> {
        (1..=BURST)
            .map(|s| event(signer, s, "request.created"))
            .collect()
    };
    let (vault_events, broker_events) = (of(&vault), of(&broker));

    let (mut child, addr) = start(&flags).await;
    let (va, ba) = (
        Arc::new(Mutex::new(Vec::new())),
        Arc::new(Mutex::new(Vec::new())),
    );
    let v = tokio::spawn(stream_until_broken(
        env.client(addr, "vault"),
        vault_events.clone(),
        va.clone(),
    ));
    let b = tokio::spawn(stream_until_broken(
        env.client(addr, "broker"),
        broker_events.clone(),
        ba.clone(),
    ));
    // Kill once both sources have had acknowledgements.
    loop {
        let (nv, nb) = (va.lock().unwrap().len(), ba.lock().unwrap().len());
        if nv >= KILL_AFTER / 2 && nb >= KILL_AFTER / 2 {
            break;
        }
        assert!(
            !v.is_finished() || !b.is_finished(),
            "the streams ended first"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    child.0.kill().unwrap(); // SIGKILL
    let status = tokio::task::spawn_blocking(move || child.0.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    v.await.unwrap();
    b.await.unwrap();
    let (va, ba) = (va.lock().unwrap().clone(), ba.lock().unwrap().clone());
    assert!(
        (va.len() as u64) < BURST && (ba.len() as u64) < BURST,
        "a whole burst was acknowledged before the kill"
    );

    let (child, addr) = start(&flags).await;
    let mut carol = env.client(addr, "carol");
    let entries = query_all(&mut carol).await;
    for (acked, source, events) in [
        (&va, vault.source(), &vault_events),
        (&ba, broker.source(), &broker_events),
    ] {
        let stored: Vec<_> = entries
            .iter()
            .filter(|e| e.event.as_ref().unwrap().source == source.as_str())
            .collect();
        assert!(
            stored.len() >= acked.len(),
            "{source}: {} acknowledged, {} stored after the crash",
            acked.len(),
            stored.len()
        );
        for (i, seq) in acked.iter().enumerate() {
            assert_eq!(*seq, i as u64 + 1, "{source} acknowledged out of order");
            assert_eq!(
                stored[i].signed_event.as_ref(),
                Some(&events[i]),
                "{source} seq {seq}"
            );
        }
    }
    let cp = checkpoint(&mut carol).await;
    assert_eq!(cp.tree_size, entries.len() as u64);
    env.verify(&entries, &cp.checkpoint);
    child.stop().await;

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_twokey-audit"))
        .arg("verify-store")
        .arg("--data-dir")
        .arg(&env.config.data_dir)
        .arg("--verifier")
        .arg(env.verifier().to_string())
        .env_remove("TWOKEY_AUDIT_VERIFIER")
        .env_remove("TWOKEY_AUDIT_DATA_DIR")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("verified {} entries", entries.len())),
        "{stdout}"
    );
}

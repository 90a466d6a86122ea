//! kill -9 of the real `twokey-audit` binary in the middle of a burst of
//! appends: after a restart on the same data directory every acknowledged
//! event is there, the log verifies, and the source resumes without a gap.

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

//! kill -9 of the real `twokey-audit` binary in the middle of a burst of
//! appends: after a restart on the same data directory every acknowledged
//! event is there, the log verifies, and the source resumes without a gap.

mod common;

use std::{net::SocketAddr, path::Path, process::Stdio, time::Duration};

use common::*;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use twokey_audit::{checkpoint::NoteVerifier, verify::verify_log};
use twokey_proto::audit::v1::{AppendRequest, AppendStatus, GetCheckpointRequest};
use twokey_runtime::keys::{encode_public_key, load_signing_key};

const BURST: u64 = 5000;
const KILL_AFTER: usize = 300;

fn write_config(env: &Env) -> std::path::PathBuf {
    let c = &env.config;
    let text = format!(
        r#"
listen = "127.0.0.1:0"
trust_domain = "{td}"
data_dir = "{data}"
checkpoint_key_file = "{key}"
origin = "{origin}"
auditors = ["{carol}"]
log_format = "json"
[tls]
cert = "{cert}"
key = "{tlskey}"
ca = "{ca}"
[[sources]]
id = "{vault}"
public_key = "{vault_pub}"
[[sources]]
id = "{broker}"
public_key = "{broker_pub}"
"#,
        td = c.trust_domain,
        data = c.data_dir.display(),
        key = c.checkpoint_key_file.display(),
        origin = c.origin,
        carol = CAROL,
        cert = c.tls.cert.display(),
        tlskey = c.tls.key.display(),
        ca = c.tls.ca.display(),
        vault = VAULT,
        vault_pub = encode_public_key(&env.vault_key.verifying_key()),
        broker = BROKER,
        broker_pub = encode_public_key(&env.broker_key.verifying_key()),
    );
    let path = env.path().join("audit.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts the binary and waits for its "listening on" line.
async fn start(config: &Path) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_twokey-audit"))
        .arg("serve")
        .arg("--config")
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .env("TWOKEY_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("twokey-audit starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(addr) = line.strip_prefix("twokey-audit listening on ") {
                return addr.trim().parse::<SocketAddr>().unwrap();
            }
        }
        panic!("twokey-audit exited before listening");
    })
    .await
    .expect("twokey-audit announces itself within 60 s");
    // Keep reading stdout so the process never writes into a closed pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

#[tokio::test]
async fn acknowledged_appends_survive_kill_9_and_the_log_verifies() {
    let env = Env::new();
    let config = write_config(&env);
    let vault = env.vault();
    let events: Vec<_> = (1..=BURST)
        .map(|s| event(&vault, s, "request.created"))
        .collect();

    let (mut child, addr) = start(&config).await;
    let mut client = env.client(addr, "vault");
    let (tx, rx) = mpsc::channel(BURST as usize);
    for e in &events {
        tx.send(AppendRequest {
            event: Some(e.clone()),
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
            child.start_kill().unwrap(); // SIGKILL
            killed = true;
        }
    }
    assert!(
        killed,
        "the stream ended before {KILL_AFTER} acknowledgements"
    );
    let status = child.wait().await.unwrap();
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
    let (child, addr) = start(&config).await;
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
    let verifier = NoteVerifier::new(
        &env.config.origin,
        load_signing_key(&env.config.checkpoint_key_file)
            .unwrap()
            .verifying_key(),
    )
    .unwrap();
    let cp = carol
        .get_checkpoint(GetCheckpointRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cp.tree_size, entries.len() as u64);
    verify_log(
        &entries,
        &env.source_keys(),
        Some((&cp.checkpoint, &verifier)),
    )
    .unwrap();

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
    let cp2 = carol
        .get_checkpoint(GetCheckpointRequest {})
        .await
        .unwrap()
        .into_inner();
    verify_log(
        &entries,
        &env.source_keys(),
        Some((&cp2.checkpoint, &verifier)),
    )
    .unwrap();
    verify_log(
        &entries,
        &env.source_keys(),
        Some((&cp.checkpoint, &verifier)),
    )
    .unwrap();
    drop(child); // kill_on_drop
}

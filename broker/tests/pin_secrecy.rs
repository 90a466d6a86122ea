//! The PIN appears only in the requester's notification, and there only
//! while it is live, and in the requester's own ShowPin answer: not in the
//! Debug of any RPC response (ShowPin's included), not in the sled files,
//! not in other mailboxes, not in logs or spans even at TRACE level.

mod common;

use std::{
    io::Write,
    path::Path,
    sync::{Arc, Mutex},
};

use common::*;
use twokey_proto::broker::v1 as pb;

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if std::fs::read(&path)
                .unwrap()
                .windows(needle.len())
                .any(|w| w == needle)
            {
                hits.push(path.display().to_string());
            }
        }
    }
    hits
}

#[tokio::test]
async fn the_pin_appears_only_in_the_requesters_mailbox() {
    let logs = Buffer::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let mut h = Harness::start().await;
    // Ten-digit PINs, so a chance match in binary data is out of the question.
    let id = file(&h, "alice", AUDIT).await;
    let mut responses = Vec::new();
    responses.push(format!("{:?}", approve(&h, "bob", &id).await.unwrap()));
    responses.push(format!("{:?}", approve(&h, "dave", &id).await.unwrap()));
    let pin = h.wait_for_pin("alice", &id, 1).await;
    assert_eq!(pin.len(), 10);
    let mailbox = h.mailbox_dir();
    assert_eq!(
        files_containing(&mailbox, pin.as_bytes()),
        vec![mailbox.join("alice.jsonl").display().to_string()],
        "the PIN went somewhere other than alice's mailbox"
    );
    let shown = show_pin(&h, "alice", &id).await.unwrap();
    assert_eq!(shown.get_ref().pin, pin, "the requester is shown the PIN");
    responses.push(format!("{shown:?}"));
    responses.push(format!(
        "{:?}",
        show_pin(&h, "olivia", &id).await.unwrap_err()
    ));
    let wrong = if pin == "0000000000" {
        "1111111111"
    } else {
        "0000000000"
    };
    responses.push(format!(
        "{:?}",
        verify(&h, "olivia", &id, wrong).await.unwrap_err()
    ));
    responses.push(format!(
        "{:?}",
        verify(&h, "olivia", &id, &pin).await.unwrap()
    ));
    responses.push(format!("{:?}", release(&h, "olivia", &id).await.unwrap()));
    responses.push(format!("{:?}", get(&h, "alice", &id).await));
    responses.push(format!(
        "{:?}",
        h.client("olivia")
            .list_requests(pb::ListRequestsRequest::default())
            .await
            .unwrap()
    ));
    h.restart_broker().await;
    responses.push(format!("{:?}", get(&h, "olivia", &id).await));
    responses.push(format!(
        "{:?}",
        show_pin(&h, "alice", &id).await.unwrap_err()
    ));
    // Verified: the PIN leaves the mailbox too.
    h.wait_for_pins_gone("alice", &id).await;
    h.stop_broker().await;

    for r in &responses {
        assert!(!r.contains(&pin), "the PIN is in an RPC response: {r}");
    }
    let data = h.config.data_dir.clone();
    assert_eq!(
        files_containing(&data, pin.as_bytes()),
        Vec::<String>::new(),
        "the PIN is on disk in sled"
    );
    assert_eq!(
        files_containing(&mailbox, pin.as_bytes()),
        Vec::<String>::new(),
        "the PIN is still in a mailbox once verified"
    );
    assert_eq!(h.messages("alice", &id, "pin").len(), 1, "it was delivered");
    let captured = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(
        captured.contains("request changed"),
        "the log capture works"
    );
    assert!(!captured.contains(&pin), "the PIN is in the logs");
    h.shutdown().await;
}

//! The broker's client of two vault replicas (`vault_address` with two
//! addresses): a call that a live replica answers UNAVAILABLE (sealed, its
//! database not ready) fails as it is, and the next call runs on a new
//! connection that starts at the other replica. One kept connection would
//! go on asking the replica that cannot serve.

mod common;

use common::Harness;
use std::sync::atomic::Ordering;
use twokey_broker::{grpc::GrpcVault, vault::Vault};
use twokey_runtime::{error::ErrorKind, tls::TlsFiles};

#[tokio::test]
async fn after_an_unavailable_replica_the_next_call_goes_to_the_other() {
    let h = Harness::start().await;
    // The first replica cannot serve: its GetPolicy answers UNAVAILABLE.
    h.vault.policy_down.store(true, Ordering::SeqCst);
    let (second, second_state, _stop) = h.another_vault().await;
    let peer = TlsFiles::in_dir(&common::pki_dir(h.dir.path()), "broker")
        .peer(
            &format!("{},https://{second}", h.config.vault_address),
            "vault",
        )
        .unwrap();

    let vault = GrpcVault::with_replicas(peer.clone());
    let refused = vault.get_policy().await.unwrap_err();
    assert_eq!(refused.kind, ErrorKind::Unavailable, "{}", refused.message);
    assert_eq!(second_state.policy_reads.load(Ordering::SeqCst), 0);
    vault
        .get_policy()
        .await
        .expect("the second call reaches the replica that serves");
    assert_eq!(second_state.policy_reads.load(Ordering::SeqCst), 1);

    // The same replica list on one kept channel stays on the first replica.
    let kept = GrpcVault::new(peer.channel());
    for _ in 0..3 {
        let refused = kept.get_policy().await.unwrap_err();
        assert_eq!(refused.kind, ErrorKind::Unavailable);
    }
    assert_eq!(second_state.policy_reads.load(Ordering::SeqCst), 1);
}

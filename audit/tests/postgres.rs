//! Two audit replicas — real processes, real mTLS — on one real PostgreSQL
//! database: the lease holder appends, the other refuses appends with
//! UNAVAILABLE naming the situation, reports NOT_SERVING and serves the
//! same log; `kill -9` of the holder and the other takes over with every
//! acknowledged event there and the source's sequence going on.

mod common;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use common::*;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use twokey_audit::{grpc::LOG_NOT_OPEN, store::postgres::NOT_SEQUENCER};
use twokey_proto::audit::v1::{AppendStatus, GetCheckpointRequest, GetInclusionProofRequest};
use twokey_testkit::postgres::TestPostgres;

const PATIENCE: Duration = Duration::from_secs(60);

/// The database, and a config file naming it (the other settings are flags).
fn database(env: &Env) -> (TestPostgres, PathBuf) {
    let pg = TestPostgres::start().expect("scripts/test installs PostgreSQL");
    let url = pg
        .create_database("audit", "audit_role", "audit-pw")
        .unwrap();
    let dir = env.path();
    std::fs::write(dir.join("audit-db.pw"), "audit-pw\n").unwrap();
    let file = dir.join("audit-pg.toml");
    std::fs::write(
        &file,
        format!(
            "[store]\nbackend = \"postgres\"\n[store.postgres]\nurl = \"{url}\"\n\
             password_file = \"audit-db.pw\"\n"
        ),
    )
    .unwrap();
    (pg, file)
}

async fn replica(env: &Env, config: &std::path::Path) -> (Running, SocketAddr) {
    let mut flags = serve_flags(env);
    flags.extend(["--config".to_owned(), config.display().to_string()]);
    start(&flags).await
}

async fn audit_health(env: &Env, addr: SocketAddr) -> ServingStatus {
    let mut health = HealthClient::new(env.channel(addr, "carol"));
    health
        .check(HealthCheckRequest {
            service: "twokey.audit.v1.AuditService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}

async fn wait_for_health(env: &Env, addr: SocketAddr, want: ServingStatus) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while audit_health(env, addr).await != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{addr} never reported {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Appends the vault's events `seqs` on one stream; every one must be
/// stored at the index that follows `first_index`.
async fn append_stored(env: &Env, addr: SocketAddr, seqs: std::ops::RangeInclusive<u64>) {
    let mut client = env.client(addr, "vault");
    let events = seqs.clone().map(|s| event(&env.vault(), s, "x")).collect();
    let answers: Vec<_> = append_all(&mut client, events)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .filter(|r| r.seq != 0)
        .collect();
    let got: Vec<(u64, i32, u64)> = answers
        .iter()
        .map(|r| (r.seq, r.status, r.leaf_index))
        .collect();
    let want: Vec<(u64, i32, u64)> = seqs
        .map(|s| (s, AppendStatus::Stored as i32, s - 1))
        .collect();
    assert_eq!(got, want);
}

/// Sends the vault's event `seq` alone; it must be refused with UNAVAILABLE,
/// whose status this returns.
async fn append_unavailable(env: &Env, addr: SocketAddr, seq: u64) -> tonic::Status {
    let mut client = env.client(addr, "vault");
    let refused = append_all(&mut client, vec![event(&env.vault(), seq, "x")])
        .await
        .and_then(|mut answers| answers.pop().expect("an answer"))
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    refused
}

/// The whole log read through `carol`: `n` entries, the checkpoint of `n`,
/// and they verify against it.
async fn assert_log_of(
    env: &Env,
    carol: &mut twokey_proto::audit::v1::audit_service_client::AuditServiceClient<
        tonic::transport::Channel,
    >,
    n: usize,
) {
    let entries = query_all(carol).await;
    let head = checkpoint(carol).await;
    assert_eq!((entries.len(), head.tree_size), (n, n as u64));
    env.verify(&entries, &head.checkpoint);
}

#[tokio::test]
async fn the_lease_holder_appends_the_other_serves_reads_and_takes_over_when_killed() {
    let env = Env::new();
    let (pg, config) = database(&env);
    let (a, a_addr) = replica(&env, &config).await;
    wait_for_health(&env, a_addr, ServingStatus::Serving).await;
    let (b, b_addr) = replica(&env, &config).await;
    append_stored(&env, a_addr, 1..=10).await;

    // B does not hold the lease: it says so and refuses appends.
    assert_eq!(audit_health(&env, b_addr).await, ServingStatus::NotServing);
    let refused = append_unavailable(&env, b_addr, 11).await;
    assert_eq!(refused.message(), NOT_SEQUENCER);

    // B serves the same log: checkpoint, entries, proofs.
    let mut carol_a = env.client(a_addr, "carol");
    let mut carol_b = env.client(b_addr, "carol");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while checkpoint(&mut carol_b).await.tree_size < 10 {
        assert!(tokio::time::Instant::now() < deadline, "B never followed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let on_a = checkpoint(&mut carol_a).await;
    let on_b = checkpoint(&mut carol_b).await;
    assert_eq!(on_a.checkpoint, on_b.checkpoint);
    let entries = query_all(&mut carol_b).await;
    assert_eq!(entries.len(), 10);
    env.verify(&entries, &on_b.checkpoint);
    let proof = |c: &mut twokey_proto::audit::v1::audit_service_client::AuditServiceClient<_>| {
        let mut c = c.clone();
        async move {
            c.get_inclusion_proof(GetInclusionProofRequest {
                leaf_index: 3,
                tree_size: 10,
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    assert_eq!(proof(&mut carol_a).await, proof(&mut carol_b).await);

    // kill -9 of the holder: its session ends, B takes the lease, checks
    // the stored head and appends; the vault's seq goes on at 11.
    drop(a);
    wait_for_health(&env, b_addr, ServingStatus::Serving).await;
    append_stored(&env, b_addr, 11..=15).await;
    assert_log_of(&env, &mut carol_b, 15).await;
    b.stop().await;
    drop(pg);
}

#[tokio::test]
async fn postgres_restarted_during_appends_answers_unavailable_then_recovers_with_nothing_lost() {
    let env = Env::new();
    let (pg, config) = database(&env);
    let (a, addr) = replica(&env, &config).await;
    wait_for_health(&env, addr, ServingStatus::Serving).await;
    append_stored(&env, addr, 1..=5).await;

    pg.stop().unwrap();
    let refused = append_unavailable(&env, addr, 6).await;
    let m = refused.message();
    assert!(
        m.contains("PostgreSQL is unavailable") || m.contains("cannot reach its database"),
        "{m}"
    );
    wait_for_health(&env, addr, ServingStatus::NotServing).await;

    pg.start_server().unwrap();
    wait_for_health(&env, addr, ServingStatus::Serving).await;
    // Event 6 was never acknowledged: sent again, it is stored after 5.
    append_stored(&env, addr, 6..=10).await;
    assert_log_of(&env, &mut env.client(addr, "carol"), 10).await;
    a.stop().await;
    drop(pg);
}

/// A replica started while its database is down listens at once, reports
/// NOT_SERVING and answers every call UNAVAILABLE naming why (it used to
/// exit); once PostgreSQL answers it migrates, opens the log, takes the
/// lease and appends, its first event stored at index 0.
#[tokio::test]
async fn a_replica_started_while_its_database_is_down_is_unavailable_until_it_answers() {
    let env = Env::new();
    let (pg, config) = database(&env);
    pg.stop().unwrap();
    let (a, addr) = replica(&env, &config).await;
    assert_eq!(audit_health(&env, addr).await, ServingStatus::NotServing);
    let refused = append_unavailable(&env, addr, 1).await;
    assert_eq!(refused.message(), LOG_NOT_OPEN);
    let mut carol = env.client(addr, "carol");
    let refused = carol
        .get_checkpoint(GetCheckpointRequest {})
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), refused.message()),
        (tonic::Code::Unavailable, LOG_NOT_OPEN)
    );
    // Still waiting a few tries later, not exited.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(audit_health(&env, addr).await, ServingStatus::NotServing);

    pg.start_server().unwrap();
    wait_for_health(&env, addr, ServingStatus::Serving).await;
    append_stored(&env, addr, 1..=5).await;
    assert_log_of(&env, &mut carol, 5).await;
    a.stop().await;
    drop(pg);
}

/// A source's shipper that lists both replicas, the one that is not the
/// sequencer first: its first stream is refused (UNAVAILABLE, not the
/// sequencer) on a live connection; the next stream runs on a new
/// connection that starts at the other replica, and every event is stored.
/// With one channel kept for every stream it would be refused forever.
#[tokio::test]
async fn a_shipper_that_reached_the_follower_first_moves_on_to_the_sequencer() {
    use std::sync::Arc;
    use twokey_runtime::{
        durable::DurableDb,
        events::EventDraft,
        outbox::Outbox,
        shipper::{ShipperOptions, spawn_shipper_with},
        time::SystemClock,
        tls::TlsFiles,
    };

    let env = Env::new();
    let (_pg, config) = database(&env);
    let (_a, a_addr) = replica(&env, &config).await;
    wait_for_health(&env, a_addr, ServingStatus::Serving).await;
    let (_b, b_addr) = replica(&env, &config).await;
    assert_eq!(audit_health(&env, b_addr).await, ServingStatus::NotServing);

    let dir = tempfile::tempdir().unwrap();
    let db = DurableDb::open(dir.path()).unwrap();
    let outbox = Outbox::open(&db, env.vault(), Arc::new(SystemClock)).unwrap();
    let mut last = 0;
    for _ in 0..5 {
        last = outbox
            .emit(EventDraft::new("spiffe://twokey.test/user/alice", "x"))
            .await
            .unwrap();
    }
    let peer = TlsFiles::in_dir(&env.path(), "vault")
        .peer(&format!("https://{b_addr},https://{a_addr}"), "audit")
        .unwrap();
    let options = ShipperOptions {
        reconnect: Some(peer.clone()),
        ..ShipperOptions::default()
    };
    let (handle, task) = spawn_shipper_with(outbox.clone(), peer.channel(), options);
    handle
        .wait_acked(last, PATIENCE)
        .await
        .expect("the shipper reached the sequencer through the second address");
    task.abort();
    let entries = query_all(&mut env.client(a_addr, "carol")).await;
    assert_eq!(entries.len(), 5);
}

//! Two real `twokey-broker` processes on one PostgreSQL (a throwaway
//! server), each with its own data directory, over mTLS on loopback, with
//! the tests' fake vault: both report NOT_SERVING until migrated, then
//! SERVING; a request filed and approved through one replica has its PIN
//! verified and its code released through the other, and either replica
//! sees the same request; a watcher on either replica sees every change,
//! each once, whichever replica made it. The notification queue is in
//! PostgreSQL: every message of flows made on both replicas reaches the
//! mailbox once; a replica killed (SIGKILL) right after its changes
//! committed, before it could deliver them, has them delivered by the
//! other, the PIN sealed in the table meanwhile.

mod common;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use common::{FAKE_CODE, Harness, POLICY, PROD, pki_dir, request_of, state_of};
use tonic::transport::Channel;
use twokey_proto::broker::v1::{self as pb, broker_service_client::BrokerServiceClient};
use twokey_runtime::tls::TlsFiles;
use twokey_testkit::postgres::TestPostgres;

const BIN: &str = env!("CARGO_BIN_EXE_twokey-broker");
/// How long a test waits for something that should happen much sooner.
const PATIENCE: Duration = Duration::from_secs(60);

/// A broker process, killed on drop.
struct Replica {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn replica(h: &Harness, name: &str, url: &str, password_file: &Path) -> Replica {
    replica_with_mailbox(h, name, url, password_file, &h.mailbox_dir()).await
}

async fn replica_with_mailbox(
    h: &Harness,
    name: &str,
    url: &str,
    password_file: &Path,
    mailbox: &Path,
) -> Replica {
    let c = &h.config;
    let data = h.dir.path().join(format!("data-{name}"));
    let mut child = Command::new(BIN)
        .arg("serve")
        .env_remove("TWOKEY_BROKER_CONFIG")
        .env("TWOKEY_BROKER_LISTEN", "127.0.0.1:0")
        .env("TWOKEY_BROKER_TRUST_DOMAIN", &c.trust_domain)
        .env("TWOKEY_BROKER_DATA_DIR", &data)
        .env("TWOKEY_BROKER_POLICY_FILE", &c.policy_file)
        .env("TWOKEY_BROKER_GRANT_KEY_FILE", &c.grant_key_file)
        .env("TWOKEY_BROKER_EVENT_KEY_FILE", &c.event_key_file)
        .env("TWOKEY_BROKER_PIN_KEY_FILE", &c.pin_key_file)
        .env("TWOKEY_BROKER_VAULT_ADDRESS", &c.vault_address)
        .env("TWOKEY_BROKER_TLS_CERT", &c.tls.cert)
        .env("TWOKEY_BROKER_TLS_KEY", &c.tls.key)
        .env("TWOKEY_BROKER_TLS_CA", &c.tls.ca)
        .env("TWOKEY_BROKER_NOTIFY_MAILBOX_DIR", mailbox)
        .env("TWOKEY_BROKER_STORE_BACKEND", "postgres")
        .env("TWOKEY_BROKER_STORE_POSTGRES_URL", url)
        .env("TWOKEY_BROKER_STORE_POSTGRES_PASSWORD_FILE", password_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    });
    let line = tokio::time::timeout(PATIENCE, line).await.unwrap().unwrap();
    let addr = twokey_testkit::ready::announced_addr(&line, "twokey-broker")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    Replica { child, addr }
}

fn channel(h: &Harness, user: &str, addr: SocketAddr) -> Channel {
    TlsFiles::in_dir(&pki_dir(h.dir.path()), user)
        .channel(&format!("https://{addr}"), "broker")
        .unwrap()
}

fn client(h: &Harness, user: &str, r: &Replica) -> BrokerServiceClient<Channel> {
    BrokerServiceClient::new(channel(h, user, r.addr))
}

/// The broker service's health on `r`.
async fn health(h: &Harness, r: &Replica) -> i32 {
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(channel(h, "alice", r.addr));
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "twokey.broker.v1.BrokerService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

async fn watch(h: &Harness, r: &Replica) -> tonic::Streaming<pb::WatchRequestsResponse> {
    client(h, "olivia", r)
        .watch_requests(pb::WatchRequestsRequest::default())
        .await
        .unwrap()
        .into_inner()
}

/// The next change on a watch: its action, request id and PIN attempts.
async fn next(s: &mut tonic::Streaming<pb::WatchRequestsResponse>) -> (String, String, u32) {
    let change = tokio::time::timeout(PATIENCE, s.message())
        .await
        .unwrap_or_else(|_| panic!("no change arrived on {s:?}"))
        .unwrap()
        .expect("the watch ended");
    let request = change.request.unwrap();
    (change.action, request.request_id, request.pin_attempts)
}

async fn wait_serving(h: &Harness, r: &Replica) {
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let start = Instant::now();
    while health(h, r).await != serving {
        assert!(start.elapsed() < PATIENCE, "replica never SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_flow_approved_on_one_replica_is_verified_and_released_on_the_other() {
    let pg = TestPostgres::start().expect("scripts/test installs PostgreSQL");
    let url = pg
        .create_database("broker", "broker_role", "broker-pw")
        .unwrap();
    let h = Harness::prepare(POLICY, None, SystemTime::now()).await;
    let password_file = h.dir.path().join("broker_role.pw");
    std::fs::write(&password_file, "broker-pw\n").unwrap();

    // PostgreSQL down at start: the replica serves, NOT_SERVING, and its
    // calls answer UNAVAILABLE saying why.
    pg.stop().unwrap();
    let a = replica(&h, "a", &url, &password_file).await;
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    assert_eq!(health(&h, &a).await, not_serving);
    let status = client(&h, "alice", &a)
        .create_request(pb::CreateRequestRequest {
            account_id: PROD.into(),
            reason: "rotate the root password".into(),
            ticket: "OPS-1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status
            .message()
            .contains("the broker is migrating its database or waiting for it to answer"),
        "{status:?}"
    );
    pg.start_server().unwrap();
    let b = replica(&h, "b", &url, &password_file).await;
    wait_serving(&h, &a).await;
    wait_serving(&h, &b).await;
    let mut on_a = watch(&h, &a).await;
    let mut on_b = watch(&h, &b).await;

    // Filed and approved on A.
    let r = request_of(
        client(&h, "alice", &a)
            .create_request(pb::CreateRequestRequest {
                account_id: PROD.into(),
                reason: "rotate the root password".into(),
                ticket: "OPS-1".into(),
                ..Default::default()
            })
            .await,
    );
    let id = r.request_id;
    let r = request_of(
        client(&h, "bob", &a)
            .approve_request(pb::ApproveRequestRequest {
                request_id: id.clone(),
                comment: "ok".into(),
                statement: None,
            })
            .await,
    );
    assert_eq!(state_of(&r), pb::RequestState::Approved);
    // B sees it APPROVED; the second approval of bob on B is refused.
    let seen = request_of(
        client(&h, "alice", &b)
            .get_request(pb::GetRequestRequest {
                request_id: id.clone(),
            })
            .await,
    );
    assert_eq!(state_of(&seen), pb::RequestState::Approved);
    let pin = h.wait_for_pin("alice", &id, 1).await;
    // Made on A: A's watcher sees them once, B's through PostgreSQL.
    for watch in [&mut on_a, &mut on_b] {
        assert_eq!(next(watch).await, ("request.created".into(), id.clone(), 0));
        assert_eq!(
            next(watch).await,
            ("request.approved".into(), id.clone(), 0)
        );
    }

    // A wrong PIN on B counts, and A sees the count.
    let wrong = if pin.starts_with('0') { "1" } else { "0" }.repeat(pin.len());
    let status = client(&h, "olivia", &b)
        .verify_pin(pb::VerifyPinRequest {
            request_id: id.clone(),
            pin: wrong,
            releases: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let seen = request_of(
        client(&h, "alice", &a)
            .get_request(pb::GetRequestRequest {
                request_id: id.clone(),
            })
            .await,
    );
    assert_eq!(seen.pin_attempts, 1);
    // Made on B: both watchers see it, each once.
    for watch in [&mut on_a, &mut on_b] {
        assert_eq!(next(watch).await, ("pin.failed".into(), id.clone(), 1));
    }

    // The right PIN and the release on B.
    let r = request_of(
        client(&h, "olivia", &b)
            .verify_pin(pb::VerifyPinRequest {
                request_id: id.clone(),
                pin,
                releases: vec![],
            })
            .await,
    );
    assert_eq!(state_of(&r), pb::RequestState::Verified);
    let code = client(&h, "olivia", &b)
        .release_code(pb::ReleaseCodeRequest {
            request_id: id.clone(),
            statement: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code.code.unwrap().code, FAKE_CODE);
    let seen = request_of(
        client(&h, "alice", &a)
            .get_request(pb::GetRequestRequest {
                request_id: id.clone(),
            })
            .await,
    );
    assert_eq!(seen.codes_released, 1);
    assert_eq!(h.vault.grants.lock().unwrap().len(), 1);
    for watch in [&mut on_a, &mut on_b] {
        assert_eq!(next(watch).await.0, "pin.verified");
        let (action, rid, _) = next(watch).await;
        assert_eq!(rid, id);
        assert_ne!(action, "pin.verified", "a change told twice");
    }
    // The events of both replicas are in the one outbox in PostgreSQL.
    let events: usize = pg
        .psql("broker", "SELECT count(*) FROM twokey_outbox_pending")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(events >= 5, "{events} events");
    drop((a, b));
}

/// Every line of every file of the mailbox: (message id, kind, request id,
/// PIN if any).
fn mailbox_lines(h: &Harness) -> Vec<(String, String, String, Option<String>)> {
    let Ok(dir) = std::fs::read_dir(h.mailbox_dir()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for file in dir {
        let text = std::fs::read_to_string(file.unwrap().path()).unwrap();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            out.push((
                s("id"),
                s("kind"),
                s("request_id"),
                v["pin"].as_str().map(str::to_owned),
            ));
        }
    }
    out
}

/// Entries in the queue table.
fn queued(pg: &TestPostgres) -> usize {
    pg.psql("broker", "SELECT count(*) FROM broker_notify_queue")
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Waits until the queue table is empty.
async fn wait_drained(pg: &TestPostgres) {
    let start = Instant::now();
    while queued(pg) != 0 {
        assert!(start.elapsed() < PATIENCE, "the queue never drained");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the mailbox holds `alice`'s PIN of `id`; returns it.
async fn wait_pin(h: &Harness, id: &str) -> String {
    let start = Instant::now();
    loop {
        let pins: Vec<String> = mailbox_lines(h)
            .into_iter()
            .filter(|(_, kind, rid, _)| kind == "pin" && rid == id)
            .filter_map(|(.., pin)| pin)
            .collect();
        if let Some(pin) = pins.first() {
            return pin.clone();
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the PIN never reached the mailbox"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn file_and_approve(h: &Harness, on: &Replica, approve_on: &Replica) -> String {
    let r = request_of(
        client(h, "alice", on)
            .create_request(pb::CreateRequestRequest {
                account_id: PROD.into(),
                reason: "rotate the root password".into(),
                ticket: "OPS-1".into(),
                ..Default::default()
            })
            .await,
    );
    let r = request_of(
        client(h, "bob", approve_on)
            .approve_request(pb::ApproveRequestRequest {
                request_id: r.request_id,
                comment: "ok".into(),
                statement: None,
            })
            .await,
    );
    assert_eq!(state_of(&r), pb::RequestState::Approved);
    r.request_id
}

async fn start_pg(h: &Harness) -> (TestPostgres, String, std::path::PathBuf) {
    let pg = TestPostgres::start().expect("scripts/test installs PostgreSQL");
    let url = pg
        .create_database("broker", "broker_role", "broker-pw")
        .unwrap();
    let password_file = h.dir.path().join("broker_role.pw");
    std::fs::write(&password_file, "broker-pw\n").unwrap();
    (pg, url, password_file)
}

#[tokio::test]
async fn every_message_of_flows_made_on_both_replicas_is_delivered_once() {
    let h = Harness::prepare(POLICY, None, SystemTime::now()).await;
    let (pg, url, password_file) = start_pg(&h).await;
    let a = replica(&h, "a", &url, &password_file).await;
    let b = replica(&h, "b", &url, &password_file).await;
    wait_serving(&h, &a).await;
    wait_serving(&h, &b).await;
    // Filed on one replica and approved on the other, both ways round.
    let mut ids = Vec::new();
    for i in 0..8 {
        let (on, other) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        ids.push(file_and_approve(&h, on, other).await);
    }
    for id in &ids {
        wait_pin(&h, id).await;
    }
    wait_drained(&pg).await;
    // Both workers had their chance at every entry; give a duplicate time
    // to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lines = mailbox_lines(&h);
    let mut seen: Vec<&str> = lines.iter().map(|(id, ..)| id.as_str()).collect();
    seen.sort_unstable();
    let all = seen.len();
    seen.dedup();
    assert_eq!(all, seen.len(), "a message delivered twice: {lines:?}");
    for id in &ids {
        let of = |kind: &str| {
            lines
                .iter()
                .filter(|(_, k, rid, _)| k == kind && rid == id)
                .count()
        };
        assert_eq!(of("pin"), 1, "{id}: {lines:?}");
        assert!(of("request.created") >= 1, "{id}: {lines:?}");
        assert!(of("request.approved") >= 1, "{id}: {lines:?}");
    }
    drop((a, b));
}

#[tokio::test]
async fn a_replica_killed_right_after_its_changes_committed_has_them_delivered_by_the_other() {
    let h = Harness::prepare(POLICY, None, SystemTime::now()).await;
    let (pg, url, password_file) = start_pg(&h).await;
    // A cannot deliver: its mailbox directory is a file.
    let broken = h.dir.path().join("broken-mailbox");
    std::fs::write(&broken, "not a directory").unwrap();
    let mut a = replica_with_mailbox(&h, "a", &url, &password_file, &broken).await;
    wait_serving(&h, &a).await;
    let id = file_and_approve(&h, &a, &a).await;
    // Killed at once: its messages are only in PostgreSQL now.
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    assert!(queued(&pg) >= 3, "{} entries queued", queued(&pg));
    let table = pg
        .psql("broker", "SELECT id, pin, entry FROM broker_notify_queue")
        .unwrap();
    assert!(table.contains("sealed_pin"), "{table}");
    assert!(mailbox_lines(&h).is_empty());

    let b = replica(&h, "b", &url, &password_file).await;
    wait_serving(&h, &b).await;
    let pin = wait_pin(&h, &id).await;
    wait_drained(&pg).await;
    assert!(!table.contains(&pin), "the PIN in the clear in PostgreSQL");
    let lines = mailbox_lines(&h);
    let mut seen: Vec<&str> = lines.iter().map(|(id, ..)| id.as_str()).collect();
    seen.sort_unstable();
    let all = seen.len();
    seen.dedup();
    assert_eq!(all, seen.len(), "a message delivered twice: {lines:?}");
    for kind in ["request.created", "request.approved", "pin"] {
        assert!(
            lines.iter().any(|(_, k, rid, _)| k == kind && rid == &id),
            "no {kind}: {lines:?}"
        );
    }
    // The PIN verifies on B.
    let r = request_of(
        client(&h, "olivia", &b)
            .verify_pin(pb::VerifyPinRequest {
                request_id: id.clone(),
                pin,
                releases: vec![],
            })
            .await,
    );
    assert_eq!(state_of(&r), pb::RequestState::Verified);
    drop(b);
}

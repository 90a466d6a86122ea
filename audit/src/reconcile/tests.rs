//! The reconciler over a real sled log: findings appended as the
//! reconciler's signed events, once each, across passes and restarts;
//! pending releases; EventBridge posts; bad files skipped.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use ed25519_dalek::SigningKey;
use twokey_proto::audit::v1::Event;
use twokey_reconcile::{
    cloudtrail::MfaAction,
    fixture::{Record, write_log_file},
};
use twokey_runtime::{
    SpiffeId,
    events::{EventDraft, EventSigner, verify_event},
    time::ManualClock,
};

use super::*;
use crate::{checkpoint::CheckpointSigner, store::SledStore};

const VAULT: &str = "spiffe://t/svc/vault";
const RECONCILE: &str = "spiffe://t/svc/reconcile";
const AWS: &str = "111122223333";

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

struct Env {
    dir: tempfile::TempDir,
    log: Arc<AuditLog<SledStore>>,
    vault: EventSigner,
    vault_seq: u64,
    clock: ManualClock,
    start: SystemTime,
}

fn reconcile_key() -> SigningKey {
    SigningKey::from_bytes(&[9; 32])
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let vault = EventSigner::new(id(VAULT), SigningKey::from_bytes(&[1; 32]));
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let clock = ManualClock::new(start);
        let log = Arc::new(AuditLog::new(
            SledStore::open(&dir.path().join("log")).unwrap(),
            [
                (id(VAULT), vault.verifying_key()),
                (id(RECONCILE), reconcile_key().verifying_key()),
            ]
            .into(),
            [id("spiffe://t/user/carol")].into(),
            CheckpointSigner::new("t/audit", SigningKey::from_bytes(&[3; 32])).unwrap(),
            Arc::new(clock.clone()),
        ));
        Self {
            dir,
            log,
            vault,
            vault_seq: 0,
            clock,
            start,
        }
    }

    fn trail(&self) -> std::path::PathBuf {
        self.dir.path().join("trail")
    }

    fn reconciler(&self) -> Reconciler<SledStore> {
        std::fs::create_dir_all(self.trail().join("AWSLogs")).unwrap();
        let state = ReconcileState::open(&self.dir.path().join("reconcile")).unwrap();
        Reconciler::new(
            self.log.clone(),
            state,
            Settings {
                source: id(RECONCILE),
                key: reconcile_key(),
                vault: id(VAULT),
                cloudtrail_dir: Some(self.trail()),
                delivery_delay: Duration::from_secs(15 * 60),
            },
            Arc::new(self.clock.clone()),
        )
        .unwrap()
    }

    async fn vault_event(&mut self, draft: EventDraft, at: SystemTime) {
        self.vault_seq += 1;
        let signed = self
            .vault
            .sign(&draft.into_event(self.vault.source(), self.vault_seq, at));
        self.log.append(&id(VAULT), signed).await.unwrap();
    }

    async fn policy(&mut self, aws_accounts: &str) {
        let draft = EventDraft::new("spiffe://t/user/alice", "policy.applied")
            .attr("policy_version", "1")
            .attr("aws_accounts", aws_accounts);
        self.vault_event(draft, self.start).await;
    }

    async fn release(&mut self, account: &str, request: &str, at: SystemTime) {
        let draft = EventDraft::new("spiffe://t/user/olivia", "code.released")
            .account(account)
            .request(request);
        self.vault_event(draft, at).await;
    }

    fn at(&self, secs: u64) -> SystemTime {
        self.start + Duration::from_secs(secs)
    }

    fn drop_file(&self, name: &str, records: Vec<Record>) {
        write_log_file(
            &self.trail(),
            AWS,
            "us-east-1",
            datetime(self.start),
            name,
            records,
        )
        .unwrap();
    }

    /// The reconciler's events in the log, each verified with its key.
    fn findings(&self) -> Vec<Event> {
        let filter = QueryFilter {
            source: RECONCILE.into(),
            ..QueryFilter::default()
        };
        self.log
            .query_batch(&filter, None, 1000)
            .unwrap()
            .entries
            .into_iter()
            .map(|e| {
                verify_event(&e.signed_event.unwrap(), &reconcile_key().verifying_key()).unwrap()
            })
            .collect()
    }
}

fn actions(events: &[Event]) -> Vec<&str> {
    events.iter().map(|e| e.action.as_str()).collect()
}

fn login(env: &Env, secs: u64, event_id: &str) -> Record {
    Record::console_login(AWS, datetime(env.at(secs))).event_id(event_id)
}

#[tokio::test]
async fn a_sign_in_after_a_release_is_matched_and_one_without_is_unexplained_once() {
    let mut env = Env::new();
    env.policy("prod=111122223333/600").await;
    env.release("prod", "req-1", env.at(100)).await;
    env.clock.advance(Duration::from_secs(3600));
    let r = env.reconciler();
    env.drop_file(
        "a",
        vec![login(&env, 160, "ev-1"), login(&env, 1800, "ev-2")],
    );
    let report = r.pass().await.unwrap();
    assert_eq!(report.events, 2);
    let found = env.findings();
    assert_eq!(
        actions(&found),
        ["reconcile.matched", "reconcile.unexplained"]
    );
    let matched = &found[0];
    assert_eq!(matched.account_id, "prod");
    assert_eq!(matched.request_id, "req-1");
    assert_eq!(matched.attributes["aws_account_id"], AWS);
    assert_eq!(matched.attributes["cloudtrail_event_id"], "ev-1");
    assert_eq!(matched.attributes["source_ip"], "192.0.2.10");
    assert_eq!(matched.attributes["release_leaf_index"], "1");
    assert_eq!(found[1].attributes["cloudtrail_event_id"], "ev-2");
    assert_eq!(found[1].outcome, Outcome::Failure as i32);

    // Again, and after a restart over the same state: nothing new, and
    // the same record delivered again in another file counts once.
    env.drop_file("b", vec![login(&env, 1800, "ev-2")]);
    assert!(r.pass().await.unwrap().written.is_empty());
    drop(r);
    let r = env.reconciler();
    assert!(r.pass().await.unwrap().written.is_empty());
    assert_eq!(env.findings().len(), 2);
}

#[tokio::test]
async fn a_release_stays_pending_while_its_window_is_open_then_is_unused_once() {
    let mut env = Env::new();
    env.policy("prod=111122223333/600").await;
    env.release("prod", "req-1", env.at(0)).await;
    let r = env.reconciler();
    // Window 10 min + delivery delay 15 min: still open at 24 min.
    env.clock.advance(Duration::from_secs(24 * 60));
    r.pass().await.unwrap();
    assert!(env.findings().is_empty());
    // Across a restart it is still pending, and a sign-in in its window,
    // delivered late, takes it.
    drop(r);
    let r = env.reconciler();
    env.drop_file("late", vec![login(&env, 300, "ev-late")]);
    r.pass().await.unwrap();
    assert_eq!(actions(&env.findings()), ["reconcile.matched"]);

    // Another release nobody uses: unused once its window closed, once.
    env.release("prod", "req-2", env.at(24 * 60)).await;
    env.clock.advance(Duration::from_secs(25 * 60));
    r.pass().await.unwrap();
    r.pass().await.unwrap();
    let found = env.findings();
    assert_eq!(actions(&found), ["reconcile.matched", "reconcile.unused"]);
    assert_eq!(found[1].request_id, "req-2");
    assert_eq!(found[1].attributes["release_leaf_index"], "3");
}

#[tokio::test]
async fn unprotected_failed_and_out_of_band_are_findings_and_unmapped_accounts_are_not() {
    let mut env = Env::new();
    env.policy("prod=111122223333/600").await;
    env.clock.advance(Duration::from_secs(3600));
    let r = env.reconciler();
    env.drop_file(
        "a",
        vec![
            login(&env, 10, "no-mfa").without_mfa(),
            login(&env, 20, "failed").failed(),
            Record::mfa_device(MfaAction::Deactivate, AWS, datetime(env.at(30))).event_id("mfa"),
            Record::console_login("999988887777", datetime(env.at(40))).event_id("other"),
        ],
    );
    r.pass().await.unwrap();
    let found = env.findings();
    assert_eq!(
        actions(&found),
        [
            "reconcile.unprotected",
            "reconcile.failed",
            "reconcile.out_of_band"
        ]
    );
    assert_eq!(found[2].attributes["mfa_action"], "DeactivateMFADevice");
}

#[tokio::test]
async fn malformed_files_are_skipped_and_the_rest_is_read() {
    let mut env = Env::new();
    env.policy("prod=111122223333/600").await;
    env.clock.advance(Duration::from_secs(3600));
    let r = env.reconciler();
    let bad = twokey_reconcile::fixture::log_file_path(
        &env.trail(),
        AWS,
        "us-east-1",
        datetime(env.start),
        "bad",
    );
    std::fs::create_dir_all(bad.parent().unwrap()).unwrap();
    std::fs::write(&bad, b"not gzip at all").unwrap();
    env.drop_file("good", vec![login(&env, 10, "ev-1")]);
    let report = r.pass().await.unwrap();
    assert_eq!(report.skipped, 1);
    assert_eq!(actions(&env.findings()), ["reconcile.unexplained"]);
    // The bad file is reported once, not on every pass.
    assert_eq!(r.pass().await.unwrap().skipped, 0);
}

#[tokio::test]
async fn an_eventbridge_post_is_kept_then_reconciled_once_with_the_files() {
    let mut env = Env::new();
    env.policy("prod=111122223333/600").await;
    env.release("prod", "req-1", env.at(100)).await;
    env.clock.advance(Duration::from_secs(3600));
    let r = env.reconciler();
    let posted = login(&env, 130, "ev-posted");
    assert_eq!(
        r.accept_eventbridge(&posted.eventbridge()).await.unwrap(),
        Accepted::Kept("ev-posted".into())
    );
    // Kept durably: a reconciler started on the same state reconciles it.
    drop(r);
    let r = env.reconciler();
    r.pass().await.unwrap();
    assert_eq!(actions(&env.findings()), ["reconcile.matched"]);
    // The same record again, posted and in a file: no second finding.
    r.accept_eventbridge(&posted.eventbridge()).await.unwrap();
    env.drop_file("a", vec![posted]);
    r.pass().await.unwrap();
    assert_eq!(env.findings().len(), 1);
    // Not CloudTrail: refused with the reason.
    let err = r
        .accept_eventbridge(
            br#"{"detail-type":"EC2 Instance State-change Notification","detail":{}}"#,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, AcceptError::Invalid(Skip::NotCloudTrail(_))),
        "{err}"
    );
    let err = r.accept_eventbridge(b"{").await.unwrap_err();
    assert!(
        matches!(err, AcceptError::Invalid(Skip::InvalidJson(_))),
        "{err}"
    );
}

#[tokio::test]
async fn the_mapping_is_the_vaults_latest_policy_and_no_other_sources() {
    let mut env = Env::new();
    env.policy("prod=111122223333/600").await;
    // A newer version that maps nothing: sign-ins are not reconciled.
    env.policy("").await;
    env.clock.advance(Duration::from_secs(3600));
    let r = env.reconciler();
    env.drop_file("a", vec![login(&env, 10, "ev-1")]);
    r.pass().await.unwrap();
    assert!(env.findings().is_empty());
}

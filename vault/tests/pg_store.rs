//! The vault's store on a real PostgreSQL (issue 18): the same store body
//! run on sled and on PostgreSQL, and races between two stores on their
//! own sessions, as two vault replicas on one database: the same grant at
//! the same moment yields one use, uses of one account never share a
//! step, and a stopped server answers a clear error and is recovered from.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use twokey_consent::RateLimit;
use twokey_pgstore::PgSettings;
use twokey_runtime::{
    durable::DurableDb,
    events::{EventDraft, EventSigner},
    identity::SpiffeId,
    outbox::Outbox,
    time::SystemClock,
};
use twokey_testkit::postgres::TestPostgres;
use twokey_vault::{
    seed::TotpParams,
    store::{
        AccountRecord, AdminUse, GrantUse, NewAccount, NewGeneration, ReleaseUse, Removal, Restore,
        SledVaultStore, SpentGrant, StoredPolicy, VaultStore, VaultStoreError, Withheld,
        postgres::{self, PgVaultStore},
    },
};

fn signer() -> Arc<EventSigner> {
    Arc::new(EventSigner::new(
        SpiffeId::parse("spiffe://t/svc/vault").unwrap(),
        ed25519_dalek::SigningKey::from_bytes(&[7; 32]),
    ))
}

fn sled_store(dir: &std::path::Path) -> SledVaultStore {
    let db = DurableDb::open(dir).unwrap();
    let signer = EventSigner::new(
        SpiffeId::parse("spiffe://t/svc/vault").unwrap(),
        ed25519_dalek::SigningKey::from_bytes(&[7; 32]),
    );
    let outbox = Outbox::open(&db, signer, Arc::new(SystemClock)).unwrap();
    SledVaultStore::open(&db, outbox).unwrap()
}

/// A throwaway server with the vault's database, migrated.
struct Pg {
    pg: TestPostgres,
    settings: PgSettings,
}

async fn pg() -> Pg {
    let pg = TestPostgres::start().expect("scripts/test installs PostgreSQL");
    let db = pg.database_for("vault", "vault_role").unwrap();
    let settings = PgSettings {
        url: db.url,
        password_file: Some(db.password_file),
        ca_file: None,
    };
    postgres::migrate(&settings).await.unwrap();
    Pg { pg, settings }
}

async fn replica(pg: &Pg) -> PgVaultStore {
    PgVaultStore::open(pg.settings.clone(), signer(), Arc::new(SystemClock))
        .await
        .unwrap()
}

const SEALED: &str = "c2VhbGVkLXNlZWQtY2lwaGVydGV4dA==";

fn record(account_id: &str) -> AccountRecord {
    AccountRecord {
        account_id: account_id.into(),
        issuer: "Example".into(),
        label: String::new(),
        params: TotpParams::default(),
        seed_bits: 160,
        created_at: 0,
        last_used_at: None,
        sealed_seed: SEALED.into(),
        min_seconds_left: 0,
        last_step: None,
        disabled: false,
        key_generation: 1,
    }
}

fn enroll<S: VaultStore>(store: &S, account_id: &str) {
    let grant = SpentGrant {
        grant_id: format!("g-enroll-{account_id}"),
        expires_at: u64::MAX / 2,
    };
    store
        .put(
            NewAccount {
                record: &record(account_id),
                replace: false,
                grant: &grant,
                admin: None,
            },
            EventDraft::new("admin", "account.enrolled"),
        )
        .unwrap();
}

/// A use at Unix time `now`, its release id the grant id, for a request of
/// its own, under no policy, `codes` codes per request, 1000 an hour.
fn grant_use(grant_id: &str, account_id: &str, now: u64) -> GrantUse {
    let mut digest = [0u8; 32];
    for (d, b) in digest.iter_mut().zip(grant_id.bytes()) {
        *d = b;
    }
    GrantUse {
        grant_id: grant_id.into(),
        expires_at: u64::MAX / 2,
        account_id: account_id.into(),
        now,
        consent: ReleaseUse {
            policy_version: 0,
            release_id: grant_id.into(),
            release_id_until: u64::MAX / 2,
            request_digest: digest,
            request_id: format!("req-{grant_id}"),
            request_until: u64::MAX / 2,
            codes_per_request: 1,
            rate: RateLimit {
                max: 1000,
                per: Duration::from_secs(3600),
            },
            operator: "spiffe://t/user/olivia".into(),
        },
        event: EventDraft::new("op", "code.released"),
    }
}

fn admin(action_id: &str) -> AdminUse {
    AdminUse {
        action_id: action_id.into(),
        action_until: u64::MAX / 2,
        now: 100,
        keep_until: 1_000_000,
    }
}

/// The store's behaviour, the same on both backends.
async fn body<S: VaultStore>(store: S) {
    assert!(store.is_empty().unwrap());
    assert_eq!(store.key_check().unwrap(), None);
    store.set_key_check(b"check").unwrap();
    assert_eq!(store.key_check().unwrap().as_deref(), Some(&b"check"[..]));
    store
        .add_generation(NewGeneration {
            generation: 1,
            sealed_key: b"sealed data key".to_vec(),
            with_generation_zero: false,
            rotation: None,
            admin: None,
            pending_master: None,
            event: EventDraft::new("vault", "key.generation.added"),
        })
        .unwrap();
    assert_eq!(
        store.keyring().unwrap().into_iter().collect::<Vec<_>>(),
        vec![(1, b"sealed data key".to_vec())]
    );
    enroll(&store, "b-account");
    enroll(&store, "a-account");
    assert_eq!(store.count(), 2);
    let ids: Vec<String> = store
        .list()
        .unwrap()
        .into_iter()
        .map(|r| r.account_id)
        .collect();
    assert_eq!(ids, ["a-account", "b-account"]);
    // An enrolled id again, without replace: refused, nothing changed.
    let again = store.put(
        NewAccount {
            record: &record("a-account"),
            replace: false,
            grant: &SpentGrant {
                grant_id: "g-again".into(),
                expires_at: u64::MAX / 2,
            },
            admin: None,
        },
        EventDraft::new("admin", "account.enrolled"),
    );
    assert!(matches!(again, Err(VaultStoreError::AlreadyExists(id)) if id == "a-account"));

    // Uses: each a step above the one before; a used grant refused.
    let first = store
        .use_grant(grant_use("g1", "a-account", 1))
        .await
        .unwrap();
    assert_eq!(first.step, 0);
    assert_eq!(first.sync_error, None);
    let reused = store.use_grant(grant_use("g1", "a-account", 1)).await;
    assert!(
        matches!(&reused, Err(VaultStoreError::GrantUsed(id)) if id == "g1"),
        "{reused:?}"
    );
    let second = store
        .use_grant(grant_use("g2", "a-account", 1))
        .await
        .unwrap();
    assert_eq!(second.step, 1);
    assert!(second.seq > first.seq);
    assert!(store.release_id_used("g1"));
    assert!(!store.release_id_used("never"));
    let digest = grant_use("g2", "a-account", 1).consent.request_digest;
    assert_eq!(store.codes_released(&digest), 1);
    // A second code of a one-code request is refused.
    let mut more = grant_use("g3", "a-account", 1);
    more.consent.request_digest = digest;
    more.consent.release_id = "r3".into();
    assert!(matches!(
        store.use_grant(more).await,
        Err(VaultStoreError::Consent(_))
    ));
    // Withheld: the step, the count and the rate slot come back.
    store
        .withhold(
            Withheld {
                account_id: "a-account",
                step: 1,
                request_digest: &digest,
                released_at: 1,
            },
            EventDraft::new("vault", "code.withheld"),
        )
        .unwrap();
    assert_eq!(store.codes_released(&digest), 0);
    assert_eq!(store.get("a-account").unwrap().unwrap().last_step, Some(0));

    // Removed, kept, restored; the action id used once.
    let removal = Removal {
        grant_id: "g-remove".into(),
        expires_at: u64::MAX / 2,
        account_id: "b-account".into(),
        admin: admin("act-1"),
        event: EventDraft::new("admin", "account.removed"),
    };
    store.remove(removal.clone()).unwrap();
    assert_eq!(store.get("b-account").unwrap(), None);
    let replay = store.remove(Removal {
        grant_id: "g-remove-2".into(),
        ..removal
    });
    assert!(
        matches!(replay, Err(VaultStoreError::Consent(_))),
        "{replay:?}"
    );
    let (_, restored, kept) = store
        .restore(Restore {
            grant: SpentGrant {
                grant_id: "g-restore".into(),
                expires_at: u64::MAX / 2,
            },
            account_id: "b-account".into(),
            admin: admin("act-2"),
            event: EventDraft::new("admin", "account.restored"),
        })
        .unwrap();
    assert_eq!(restored.account_id, "b-account");
    assert_eq!(kept.reason, "removed");

    // Policies: only a newer version.
    let policy = StoredPolicy {
        version: 2,
        document: "doc".into(),
        signatures: vec![],
        signed_by: vec![],
        digest: String::new(),
        applied_at: 5,
    };
    store
        .put_policy(&policy, b"head", EventDraft::new("admin", "policy.applied"))
        .unwrap();
    let older = store.put_policy(
        &StoredPolicy {
            version: 1,
            ..policy.clone()
        },
        b"head",
        EventDraft::new("admin", "policy.applied"),
    );
    assert!(matches!(
        older,
        Err(VaultStoreError::PolicyNotNewer {
            proposed: 1,
            stored: 2
        })
    ));
    assert_eq!(store.policies().unwrap(), vec![policy]);
    assert_eq!(store.policy_head().unwrap().as_deref(), Some(&b"head"[..]));
    // A use under the old policy version is refused now.
    assert!(matches!(
        store.use_grant(grant_use("g4", "a-account", 1)).await,
        Err(VaultStoreError::Consent(_))
    ));
    // The sweep forgets used grants long expired, and purges kept seeds.
    let seq = store.record(EventDraft::new("vault", "x")).unwrap();
    assert!(seq > second.seq);
    store.commit().await.unwrap();
    assert!(store.sweep(u64::MAX / 2 + 1_000).unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_store_body_holds_on_sled_and_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    body(sled_store(dir.path())).await;
    let pg = pg().await;
    body(replica(&pg).await).await;
    // Migrating again applies nothing and keeps the data.
    postgres::migrate(&pg.settings).await.unwrap();
    assert_eq!(replica(&pg).await.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_grant_on_two_replicas_at_once_is_used_exactly_once() {
    let pg = pg().await;
    let (a, b) = (replica(&pg).await, replica(&pg).await);
    enroll(&a, "aws-root");
    for round in 0..20u64 {
        let grant = format!("g-{round}");
        let (ra, rb) = tokio::join!(
            {
                let (a, g) = (a.clone(), grant_use(&grant, "aws-root", 1 + round * 30));
                tokio::spawn(async move { a.use_grant(g).await })
            },
            {
                let (b, g) = (b.clone(), grant_use(&grant, "aws-root", 1 + round * 30));
                tokio::spawn(async move { b.use_grant(g).await })
            }
        );
        let answers = [ra.unwrap(), rb.unwrap()];
        let ok = answers.iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 1, "round {round}: {answers:?}");
        assert!(
            answers
                .iter()
                .any(|r| matches!(r, Err(VaultStoreError::GrantUsed(id)) if *id == grant)),
            "round {round}: {answers:?}"
        );
    }
    // One event per code: 1 enrollment and 20 releases.
    let pending = pg
        .pg
        .psql("vault", "SELECT count(*) FROM twokey_outbox_pending")
        .unwrap();
    assert_eq!(pending.trim(), "21");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn different_grants_for_one_account_on_two_replicas_never_share_a_step() {
    let pg = pg().await;
    let (a, b) = (replica(&pg).await, replica(&pg).await);
    enroll(&a, "aws-root");
    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        let g = grant_use(&format!("g-{i}"), "aws-root", 1);
        tasks.push(tokio::spawn(async move { store.use_grant(g).await }));
    }
    let mut steps = BTreeSet::new();
    let mut waits = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => assert!(steps.insert(r.step), "step {} twice", r.step),
            Err(VaultStoreError::StepsUsed { .. }) => waits += 1,
            Err(e) => panic!("{e}"),
        }
    }
    // Steps 0..=MAX ahead handed out once each, the rest told to wait.
    assert_eq!(steps.len() + waits, 16);
    assert_eq!(steps, (0..steps.len() as u64).collect::<BTreeSet<_>>());
    assert_eq!(
        a.get("aws-root").unwrap().unwrap().last_step,
        steps.last().copied()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_server_is_a_clear_error_and_the_store_recovers() {
    let pg = pg().await;
    let store = replica(&pg).await;
    enroll(&store, "aws-root");
    pg.pg.stop().unwrap();
    let err = store
        .use_grant(grant_use("g-down", "aws-root", 1))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, VaultStoreError::Database(_)), "{err:?}");
    assert!(
        text.contains("unavailable") && text.contains("retry"),
        "{text}"
    );
    assert!(matches!(
        store.get("aws-root"),
        Err(VaultStoreError::Database(_))
    ));
    pg.pg.start_server().unwrap();
    let mut answer = None;
    for _ in 0..50 {
        match store.use_grant(grant_use("g-down", "aws-root", 1)).await {
            Ok(r) => {
                answer = Some(r);
                break;
            }
            Err(VaultStoreError::Database(_)) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    // The grant refused while the server was down was not used up.
    assert_eq!(answer.expect("recovers").step, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_stored_as_given_and_rotation_is_refused_clearly() {
    let pg = pg().await;
    let store = replica(&pg).await;
    enroll(&store, "aws-root");
    let dump = pg
        .pg
        .psql("vault", "SELECT encode(value, 'escape') FROM vault_kv")
        .unwrap();
    assert!(dump.contains(SEALED), "{dump}");
    let refused = store.finish_rotation(&[0], 1, EventDraft::new("vault", "x"));
    assert!(
        matches!(&refused, Err(VaultStoreError::Unsupported(m)) if m.contains("not supported on the postgres store yet")),
        "{refused:?}"
    );
}

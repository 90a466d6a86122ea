//! The request store against both backends: one test body run on sled and
//! on PostgreSQL (a throwaway server, `TestPostgres`), then PostgreSQL-only
//! races between two stores on their own sessions, as two broker replicas
//! sharing one database: approvals racing count once each, PIN guesses
//! spread over both replicas stop at the attempt limit, and an id claimed
//! on one replica is refused on the other.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::future::BoxFuture;
use twokey_broker::{
    error::BrokerError,
    notify::NotifyQueue,
    pin::{Pin, PinKey},
    policy::{AccountPolicy, Delivery},
    state::{RequestRecord, State},
    store::{
        Claim, DocChange, Docs, PgStore, RequestStore, SledStore, Writes,
        postgres::{self, COMPONENT, MIGRATIONS},
    },
};
use twokey_pgstore::{PgSettings, outbox::PgOutbox};
use twokey_runtime::{
    SpiffeId,
    durable::DurableDb,
    error::{ErrorKind, ServiceError},
    events::{EventDraft, EventSigner},
    keys::SecretKey,
    outbox::{Outbox, OutboxStore},
    time::{Clock, ManualClock},
};
use twokey_testkit::postgres::TestPostgres;

fn id(name: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://t.local/user/{name}")).unwrap()
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn account(required: u32) -> AccountPolicy {
    let set = |names: &[&str]| names.iter().map(|n| id(n)).collect();
    AccountPolicy {
        id: "acct".into(),
        requesters: set(&["alice"]),
        approvers: set(&["bob", "dave"]),
        operators: set(&["olivia", "oscar"]),
        admins: set(&[]),
        intake: set(&[]),
        approvals_required: required,
        request_ttl: Duration::from_secs(3600),
        release_window: Duration::from_secs(900),
        codes_per_request: 1,
        pin_length: 6,
        pin_max_attempts: 3,
        delivery: Delivery::Operator,
    }
}

fn pin_key() -> PinKey {
    PinKey::new(SecretKey::from_bytes([3; 32]))
}

fn clock() -> Arc<dyn Clock> {
    Arc::new(ManualClock::new(now()))
}

fn event_signer() -> EventSigner {
    EventSigner::new(
        SpiffeId::parse("spiffe://t.local/svc/broker").unwrap(),
        ed25519_dalek::SigningKey::from_bytes(&[4; 32]),
    )
}

fn signer() -> Arc<EventSigner> {
    Arc::new(event_signer())
}

/// A replica's local parts: its sled database and notification queue.
fn local(dir: &std::path::Path) -> (DurableDb, Outbox, Arc<NotifyQueue>) {
    let db = DurableDb::open(dir).unwrap();
    let outbox = Outbox::open(&db, event_signer(), clock()).unwrap();
    let queue = NotifyQueue::open(&db, outbox.clone(), Vec::new(), &pin_key(), clock()).unwrap();
    (db, outbox, Arc::new(queue))
}

/// A store under test and how many audit events it holds.
struct Backend {
    name: &'static str,
    store: Arc<dyn RequestStore>,
    events: Box<dyn Fn() -> BoxFuture<'static, usize> + Send + Sync>,
    _dir: tempfile::TempDir,
}

fn sled_backend() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let (db, outbox, queue) = local(dir.path());
    let store = SledStore::open(&db, outbox.clone(), queue).unwrap();
    Backend {
        name: "sled",
        store: Arc::new(store),
        events: Box::new(move || {
            let n = outbox.depth();
            Box::pin(async move { n })
        }),
        _dir: dir,
    }
}

/// A throwaway server with the broker's database, migrated.
struct Pg {
    pg: TestPostgres,
    settings: PgSettings,
    /// The broker role's password.
    password: String,
}

/// The broker's database on `pg`: its settings and its role's password.
fn database(pg: &TestPostgres) -> (PgSettings, String) {
    let db = pg.database_for("broker", "broker_role").unwrap();
    let settings = PgSettings {
        url: db.url,
        password_file: Some(db.password_file),
        ca_file: None,
    };
    (settings, db.password)
}

async fn pg() -> Pg {
    let pg = TestPostgres::start().expect("scripts/test installs PostgreSQL");
    let (settings, password) = database(&pg);
    postgres::migrate(&settings).await.unwrap();
    Pg {
        pg,
        settings,
        password,
    }
}

/// One replica's store on `pg`.
async fn pg_backend(pg: &Pg) -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, queue) = local(dir.path());
    let outbox = PgOutbox::connect(&pg.settings, signer(), clock())
        .await
        .unwrap();
    let store = PgStore::new(pg.settings.clone(), outbox.clone(), &queue);
    Backend {
        name: "postgres",
        store: Arc::new(store),
        events: Box::new(move || {
            let outbox = outbox.clone();
            Box::pin(async move { outbox.depth().await.unwrap() })
        }),
        _dir: dir,
    }
}

fn event(action: &str) -> EventDraft {
    EventDraft::new("spiffe://t.local/user/bob", action)
}

async fn create(store: &dyn RequestStore, rid: &str, required: u32) -> RequestRecord {
    let (record, effects) = RequestRecord::create(
        rid.into(),
        &account(required),
        &id("alice"),
        None,
        "incident 7",
        "",
        now(),
    )
    .unwrap();
    store
        .create(
            &record,
            &Writes {
                events: effects.events,
                ..Writes::default()
            },
        )
        .await
        .unwrap();
    record
}

fn claim(key: &str) -> Claim {
    Claim {
        key: key.into(),
        taken: format!("{key} was used before; ask for a new one"),
    }
}

/// The store's behaviour, the same on every backend.
async fn behaves(b: Backend) {
    let store = &*b.store;
    let name = b.name;
    let first = create(store, "r1", 1).await;
    assert_eq!(
        store.get("r1").await.unwrap(),
        Some(first.clone()),
        "{name}"
    );
    assert_eq!((b.events)().await, 1, "{name}");

    // A taken id is refused and changes nothing.
    let err = store
        .create(
            &first,
            &Writes {
                events: vec![event("request.created")],
                ..Writes::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{name}");
    assert_eq!(
        err.to_string(),
        "storage failure: request id r1 is taken",
        "{name}"
    );
    assert_eq!((b.events)().await, 1, "{name}");

    // An update stores the change and its events together.
    let changed = store
        .update("r1", &mut |r| {
            r.reason = "incident 8".into();
            Ok(Writes {
                events: vec![event("a"), event("b")],
                claims: vec![claim("grant:g1")],
                ..Writes::default()
            })
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(changed.reason, "incident 8", "{name}");
    assert_eq!(
        store.get("r1").await.unwrap().unwrap().reason,
        "incident 8",
        "{name}"
    );
    assert_eq!((b.events)().await, 3, "{name}");

    // A reused id: PERMISSION_DENIED with the claim's message, nothing
    // stored, no event.
    let err = store
        .update("r1", &mut |r| {
            r.reason = "incident 9".into();
            Ok(Writes {
                events: vec![event("c")],
                claims: vec![claim("grant:g2"), claim("grant:g1")],
                ..Writes::default()
            })
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{name}");
    assert_eq!(
        err.to_string(),
        "grant:g1 was used before; ask for a new one",
        "{name}"
    );
    assert_eq!(
        store.get("r1").await.unwrap().unwrap().reason,
        "incident 8",
        "{name}"
    );
    assert_eq!((b.events)().await, 3, "{name}");
    // The claim of the refused change (g2) was not kept either.
    store
        .update("r1", &mut |_| {
            Ok(Writes {
                claims: vec![claim("grant:g2")],
                ..Writes::default()
            })
        })
        .await
        .unwrap()
        .unwrap();

    // A rule's error stores nothing.
    let err = store
        .update("r1", &mut |r| {
            r.reason = "never".into();
            Err(BrokerError::invalid("no"))
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{name}");
    assert_eq!(
        store.get("r1").await.unwrap().unwrap().reason,
        "incident 8",
        "{name}"
    );

    // No such request.
    assert!(
        store
            .update("nope", &mut |_| Ok(Writes::default()))
            .await
            .unwrap()
            .is_none(),
        "{name}"
    );
    assert!(store.get("nope").await.unwrap().is_none(), "{name}");
    create(store, "r0", 1).await;
    let mut ids: Vec<String> = store
        .all()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    ids.sort();
    assert_eq!(ids, ["r0", "r1"], "{name}");

    // Documents: written with their events, listed in key order, deleted.
    for key in ["0002", "0001"] {
        store
            .update_doc(Docs::Proposals, key, &mut |current| {
                assert!(current.is_none());
                Ok(DocChange {
                    value: Some(key.as_bytes().to_vec()),
                    events: vec![event("policy.proposed")],
                })
            })
            .await
            .unwrap();
    }
    assert_eq!(
        store.docs(Docs::Proposals).await.unwrap(),
        [b"0001".to_vec(), b"0002".to_vec()],
        "{name}"
    );
    assert!(
        store.docs(Docs::AdminActions).await.unwrap().is_empty(),
        "{name}"
    );
    store
        .update_doc(Docs::Proposals, "0001", &mut |current| {
            assert_eq!(current.as_deref(), Some(&b"0001"[..]));
            Ok(DocChange::default())
        })
        .await
        .unwrap();
    assert!(
        store.doc(Docs::Proposals, "0001").await.unwrap().is_none(),
        "{name}"
    );
    assert_eq!(
        store.doc(Docs::Proposals, "0002").await.unwrap().as_deref(),
        Some(&b"0002"[..]),
        "{name}"
    );
    let before = (b.events)().await;
    store
        .emit(vec![event("access.denied"), event("access.denied")])
        .await
        .unwrap();
    store.commit().await.unwrap();
    assert_eq!((b.events)().await, before + 2, "{name}");
}

#[tokio::test]
async fn the_sled_store_behaves() {
    behaves(sled_backend()).await;
}

#[tokio::test]
async fn the_postgres_store_behaves() {
    let pg = pg().await;
    behaves(pg_backend(&pg).await).await;
}

#[tokio::test]
async fn migrating_again_applies_nothing_and_the_versions_are_recorded() {
    let pg = pg().await;
    // pg() migrated once; a second replica starting migrates again.
    postgres::migrate(&pg.settings).await.unwrap();
    let mut client = twokey_pgstore::connect(&pg.settings).await.unwrap();
    let m = twokey_pgstore::migrate(&mut client, COMPONENT, MIGRATIONS)
        .await
        .unwrap();
    assert_eq!((m.from, m.to), (2, 2));
}

#[tokio::test]
async fn a_database_at_version_1_gains_the_notification_queue() {
    let pg = TestPostgres::start().expect("scripts/test installs PostgreSQL");
    let (settings, _) = database(&pg);
    let mut client = twokey_pgstore::connect(&settings).await.unwrap();
    // As a broker of the release before the queue left it.
    twokey_pgstore::migrate(&mut client, COMPONENT, &MIGRATIONS[..1])
        .await
        .unwrap();
    let m = twokey_pgstore::migrate(&mut client, COMPONENT, MIGRATIONS)
        .await
        .unwrap();
    assert_eq!((m.from, m.to), (1, 2));
    let n: i64 = client
        .query_one("SELECT count(*) FROM broker_notify_queue", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

/// Runs `f` on both replicas at once.
async fn both<T: Send + 'static>(
    a: &Arc<dyn RequestStore>,
    b: &Arc<dyn RequestStore>,
    f: impl Fn(Arc<dyn RequestStore>) -> BoxFuture<'static, T>,
) -> (T, T) {
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let run = |s: Arc<dyn RequestStore>| {
        let barrier = barrier.clone();
        let fut = f(s);
        tokio::spawn(async move {
            barrier.wait().await;
            fut.await
        })
    };
    let (x, y) = tokio::join!(run(a.clone()), run(b.clone()));
    (x.unwrap(), y.unwrap())
}

fn approve(
    who: &'static str,
    rid: &'static str,
) -> impl Fn(Arc<dyn RequestStore>) -> BoxFuture<'static, Result<RequestRecord, BrokerError>> {
    move |s| {
        Box::pin(async move {
            s.update(rid, &mut |r| {
                let e = r.approve(&account(2), &id(who), "", &pin_key(), now())?;
                Ok(Writes {
                    events: e.events,
                    claims: e.claims,
                    ..Writes::default()
                })
            })
            .await
            .map(Option::unwrap)
        })
    }
}

#[tokio::test]
async fn approvals_racing_on_two_replicas_count_once_each() {
    let pg = pg().await;
    let (a, b) = (pg_backend(&pg).await, pg_backend(&pg).await);
    for round in 0..10 {
        // Two approvers at once: both count, the request is APPROVED.
        let rid: &'static str = Box::leak(format!("two-{round}").into_boxed_str());
        create(&*a.store, rid, 2).await;
        let (x, y) = tokio::join!(
            tokio::spawn(approve("bob", rid)(a.store.clone())),
            tokio::spawn(approve("dave", rid)(b.store.clone())),
        );
        let (x, y) = (x.unwrap().unwrap(), y.unwrap().unwrap());
        let last = if x.approvals.len() == 2 { x } else { y };
        assert_eq!(last.state, State::Approved, "round {round}");
        let stored = a.store.get(rid).await.unwrap().unwrap();
        let mut approvers: Vec<String> = stored
            .approvals
            .iter()
            .map(|p| p.approver.to_string())
            .collect();
        approvers.sort();
        assert_eq!(
            approvers,
            [id("bob").to_string(), id("dave").to_string()],
            "round {round}"
        );
        assert_eq!(stored.state, State::Approved);

        // One approver on both replicas at once: counted once, the other
        // refused, the request still PENDING.
        let rid: &'static str = Box::leak(format!("same-{round}").into_boxed_str());
        create(&*a.store, rid, 2).await;
        let (x, y) = both(&a.store, &b.store, approve("bob", rid)).await;
        let refused = [&x, &y].iter().filter(|r| r.is_err()).count();
        assert_eq!(refused, 1, "round {round}: {x:?} {y:?}");
        let err = [x, y].into_iter().find_map(Result::err).unwrap();
        assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
        assert_eq!(
            err.to_string(),
            format!(
                "permission denied: {} already approved request {rid}; it needs 2 approvals \
                 from different people",
                id("bob")
            )
        );
        let stored = b.store.get(rid).await.unwrap().unwrap();
        assert_eq!(stored.approvals.len(), 1, "round {round}");
        assert_eq!(stored.state, State::Pending, "round {round}");
    }
}

#[tokio::test]
async fn pin_guesses_spread_over_two_replicas_stop_at_the_attempt_limit() {
    let pg = pg().await;
    let (a, b) = (pg_backend(&pg).await, pg_backend(&pg).await);
    create(&*a.store, "p1", 1).await;
    let mut pin = None;
    a.store
        .update("p1", &mut |r| {
            let e = r.approve(&account(1), &id("bob"), "", &pin_key(), now())?;
            pin = e.pin.clone();
            Ok(Writes {
                events: e.events,
                ..Writes::default()
            })
        })
        .await
        .unwrap();
    let right = pin.unwrap();
    let wrong = Pin::from_text(if right.expose() == "000000" {
        "111111"
    } else {
        "000000"
    });
    // Twelve wrong guesses at once, alternating replicas and operators.
    let mut tasks = Vec::new();
    for i in 0..12 {
        let store = if i % 2 == 0 {
            a.store.clone()
        } else {
            b.store.clone()
        };
        let who = if i % 3 == 0 { "olivia" } else { "oscar" };
        let wrong = Pin::from_text(wrong.expose());
        tasks.push(tokio::spawn(async move {
            let mut counted = false;
            let out = store
                .update("p1", &mut |r| {
                    let e = r.verify_pin(&account(1), &id(who), &wrong, &pin_key(), now())?;
                    counted = e.fail.is_some();
                    Ok(Writes {
                        events: e.events,
                        ..Writes::default()
                    })
                })
                .await;
            (out.map(|_| ()), counted)
        }));
    }
    let mut counted = 0;
    for t in tasks {
        let (out, c) = t.await.unwrap();
        match out {
            Ok(()) => counted += usize::from(c),
            Err(e) => assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}"),
        }
    }
    assert_eq!(counted, 3, "exactly the limit of guesses was counted");
    let stored = b.store.get("p1").await.unwrap().unwrap();
    assert_eq!(stored.pin_attempts, 3);
    assert_eq!(stored.state, State::Locked);
    // The right PIN now is refused too: the request is locked.
    let err = a
        .store
        .update("p1", &mut |r| {
            let e = r.verify_pin(&account(1), &id("olivia"), &right, &pin_key(), now())?;
            Ok(Writes {
                events: e.events,
                ..Writes::default()
            })
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
}

#[tokio::test]
async fn an_id_claimed_on_one_replica_is_refused_on_the_other() {
    let pg = pg().await;
    let (a, b) = (pg_backend(&pg).await, pg_backend(&pg).await);
    create(&*a.store, "c1", 1).await;
    create(&*a.store, "c2", 1).await;
    let use_id = |rid: &'static str, key: &'static str| {
        move |s: Arc<dyn RequestStore>| -> BoxFuture<'static, Result<(), BrokerError>> {
            Box::pin(async move {
                s.update(rid, &mut |_| {
                    Ok(Writes {
                        events: vec![event("grant.used")],
                        claims: vec![claim(key)],
                        ..Writes::default()
                    })
                })
                .await
                .map(|_| ())
            })
        }
    };
    // One after the other, on another request.
    use_id("c1", "release:r1")(a.store.clone()).await.unwrap();
    let err = use_id("c2", "release:r1")(b.store.clone())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
    assert_eq!(
        err.to_string(),
        "release:r1 was used before; ask for a new one"
    );
    // At the same moment, on two requests: one wins.
    for round in 0..10 {
        let key: &'static str = Box::leak(format!("grant:race-{round}").into_boxed_str());
        let events = (a.events)().await;
        let (x, y) = tokio::join!(
            use_id("c1", key)(a.store.clone()),
            use_id("c2", key)(b.store.clone())
        );
        let errors: Vec<BrokerError> = [x, y].into_iter().filter_map(Result::err).collect();
        assert_eq!(errors.len(), 1, "round {round}");
        assert_eq!(errors[0].kind(), ErrorKind::PermissionDenied);
        assert_eq!((a.events)().await, events + 1, "round {round}");
    }
}

#[tokio::test]
async fn a_lost_database_is_unavailable_with_what_to_do_and_the_store_recovers() {
    let pg = pg().await;
    let a = pg_backend(&pg).await;
    create(&*a.store, "u1", 1).await;
    pg.pg.stop().unwrap();
    let expected = "the broker's database is unavailable (PostgreSQL is unavailable: ";
    let err = a.store.get("u1").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains(expected), "{err}");
    assert!(
        err.to_string()
            .ends_with("retry, through another replica if this one stays down"),
        "{err}"
    );
    let err = a
        .store
        .update("u1", &mut |r| {
            r.reason = "changed".into();
            Ok(Writes::default())
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains(expected), "{err}");
    assert!(!err.to_string().contains(&pg.password), "{err}");
    // Back: the store opens new sessions; nothing was changed meanwhile.
    pg.pg.start_server().unwrap();
    let r = a.store.get("u1").await.unwrap().unwrap();
    assert_eq!(r.reason, "incident 7");
    a.store
        .update("u1", &mut |r| {
            r.reason = "changed".into();
            Ok(Writes::default())
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.store.get("u1").await.unwrap().unwrap().reason, "changed");
}

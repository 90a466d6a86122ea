//! kill -9 of each service (vault, broker, audit) at a random point while
//! full flows run, round after round. After each restart: every log entry an
//! auditor read before the kill is still there byte for byte, the log
//! verifies against every earlier checkpoint, every code a client received
//! has the vault's `code.released` in the log, no request is in a state the
//! machine does not allow, no grant released twice and a used grant replayed
//! after the restart is refused; and a fresh flow succeeds.
//!
//! Rounds per service: 3 (CI) or 20 with `TWOKEY_SOAK=1`; kill points come
//! from a printed seed (`TWOKEY_SEED=N` replays a run).

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tonic::Code;
use twokey_e2e::{
    Released, Rng, System, assert_prefix, bounded, check_request, check_single_use, signal,
    soak_or, totp,
};
use twokey_proto::vault::v1::{GenerateCodeRequest, SignedGrant};

const SERVICES: [&str; 3] = ["vault", "broker", "audit"];
/// Flows running at once while a service is killed.
const WORKERS: usize = 2;
/// Longest wait for a PIN in a flow that may be cut by a kill.
const PIN_LIMIT: Duration = Duration::from_secs(3);

/// What the workers saw during one round.
#[derive(Debug, Default)]
struct Seen {
    released: Vec<Released>,
    failed: BTreeMap<String, usize>,
}

/// Runs flows on `WORKERS` tasks until `stop`.
fn start_workers(
    sys: &Arc<System>,
    stop: &Arc<AtomicBool>,
    seen: &Arc<Mutex<Seen>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..WORKERS)
        .map(|_| {
            let (sys, stop, seen) = (sys.clone(), stop.clone(), seen.clone());
            tokio::spawn(async move {
                let crew = sys.crew("alice", "bob", "olivia");
                while !stop.load(Ordering::Relaxed) {
                    match sys.flow(&crew, PIN_LIMIT).await {
                        Ok(r) => seen.lock().unwrap().released.push(r),
                        Err(e) => {
                            *seen
                                .lock()
                                .unwrap()
                                .failed
                                .entry(format!("{} {:?}", e.step, e.status.code()))
                                .or_default() += 1;
                            // A dead service answers at once: do not spin.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            })
        })
        .collect()
}

/// Uses a fresh grant once, directly at the vault (as the broker would).
async fn use_grant(sys: &System, n: usize) -> SignedGrant {
    let grant = sys.sign_grant(&format!("crash-round-{n}-{}", std::process::id()));
    let code = bounded(sys.vault_as_broker().generate_code(GenerateCodeRequest {
        grant: Some(grant.clone()),
    }))
    .await
    .expect("a fresh grant releases a code")
    .code
    .expect("a code");
    assert_eq!(code.code, totp(code.step));
    grant
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_any_service_at_random_points_loses_no_event_and_breaks_no_rule() {
    let per_service = soak_or(3, 20);
    let mut rng = Rng::from_env("crash");
    let started = Instant::now();
    let mut sys = System::start();
    // Releases cut by an audit kill wait this long before UNAVAILABLE.
    sys.set_vault_ack_timeout(2000);
    sys.enroll().await;

    let first_checkpoint = sys.checkpoint().await;
    let mut received: BTreeMap<String, usize> = BTreeMap::new();
    let mut used_grants: Vec<(Instant, SignedGrant)> = Vec::new();
    let mut totals = Seen::default();
    let mut order: Vec<&str> = SERVICES
        .iter()
        .copied()
        .cycle()
        .take(per_service * SERVICES.len())
        .collect();
    // Shuffle the order of kills (Fisher–Yates with the seeded generator).
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }

    for (round, svc) in order.iter().copied().enumerate() {
        // What an auditor can read now, and a checkpoint over it.
        let checkpoint = sys.checkpoint().await;
        let before = sys
            .verified_log(std::slice::from_ref(&first_checkpoint))
            .await;
        used_grants.push((Instant::now(), use_grant(&sys, round).await));

        let sys_arc = Arc::new(sys);
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let workers = start_workers(&sys_arc, &stop, &seen);
        let delay = Duration::from_millis(20 + rng.below(400));
        tokio::time::sleep(delay).await;
        signal(sys_arc.pid(svc), "KILL");
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            tokio::time::timeout(Duration::from_secs(60), w)
                .await
                .expect("a flow hung after a kill")
                .expect("worker");
        }
        sys = Arc::into_inner(sys_arc).expect("workers are done");
        sys.crash_and_restart(svc);

        let seen = std::mem::take(&mut *seen.lock().unwrap());
        let when = format!("round {round}: kill -9 {svc} after {delay:?}");
        println!(
            "{when}: {} released, failures {:?}",
            seen.released.len(),
            seen.failed
        );
        for r in &seen.released {
            assert_eq!(r.code.code, totp(r.code.step), "{when}: a wrong code");
            *received.entry(r.request_id.clone()).or_default() += 1;
        }

        // No acknowledged event lost; the log verifies and extends every
        // earlier checkpoint.
        let after = sys
            .verified_log(&[first_checkpoint.clone(), checkpoint])
            .await;
        assert_prefix(&before, &after, &when);
        check_single_use(&after).unwrap_or_else(|e| panic!("{when}: {e}"));
        // Every code that left the vault was acknowledged first.
        for id in received.keys() {
            assert!(
                after.iter().filter_map(|e| e.event.as_ref()).any(|e| {
                    e.action == "code.released"
                        && e.source.ends_with("/svc/vault")
                        && &e.request_id == id
                }),
                "{when}: a code for {id} left the vault without its event in the log"
            );
        }

        // Every request is in a state the machine allows.
        for r in sys.all_requests().await {
            check_request(&r).unwrap_or_else(|e| panic!("{when}: {e}"));
            let got = received.get(&r.request_id).copied().unwrap_or(0);
            assert!(
                got as u32 <= r.codes_released && got <= 1,
                "{when}: {} codes received for {} ({} released)",
                got,
                r.request_id,
                r.codes_released
            );
        }

        // No grant usable twice, across restarts (grants live 60 s).
        used_grants.retain(|(at, _)| at.elapsed() < Duration::from_secs(50));
        for (_, grant) in &used_grants {
            let err = bounded(sys.vault_as_broker().generate_code(GenerateCodeRequest {
                grant: Some(grant.clone()),
            }))
            .await
            .expect_err("a used grant released a second code");
            assert_eq!(err.code(), Code::PermissionDenied, "{when}: {err:?}");
        }

        // And the system works again.
        let crew = sys.crew("alice", "bob", "olivia");
        let r = sys
            .flow(&crew, Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("{when}: no flow after the restart: {e:?}"));
        assert_eq!(r.code.code, totp(r.code.step));
        *received.entry(r.request_id.clone()).or_default() += 1;

        totals.released.extend(seen.released);
        for (k, v) in seen.failed {
            *totals.failed.entry(k).or_default() += v;
        }
    }
    println!(
        "crash: {} rounds in {:?}; {} flows released during kills, failures {:?}",
        order.len(),
        started.elapsed(),
        totals.released.len(),
        totals.failed
    );
}

//! kill -9 of each service (vault, broker, audit) at a random point while
//! full flows run, round after round. After each restart: every log entry an
//! auditor read before the kill is still there byte for byte, the log
//! verifies against every earlier checkpoint, every code a client received
//! has the vault's `code.released` in the log, no request is in a state the
//! machine does not allow, no grant released twice and a used grant replayed
//! after the restart is refused; and a fresh flow succeeds.
//!
//! The vault hands out each TOTP step of an account once, at most 2 steps
//! ahead, so the flows spread over accounts: the workers' over a pool (the
//! test tracks which account still has a step), each round's grant and
//! fresh flow over accounts of their own.
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
    Released, Rng, System, assert_prefix, bounded, check_request, check_single_use, current_step,
    signal, soak_or, totp, unix_now,
};
use twokey_proto::vault::v1::GenerateCodeRequest;

const SERVICES: [&str; 3] = ["vault", "broker", "audit"];
/// Flows running at once while a service is killed.
const WORKERS: usize = 2;
/// Longest wait for a PIN in a flow that may be cut by a kill.
const PIN_LIMIT: Duration = Duration::from_secs(3);

/// Steps the workers' accounts have free when a round starts (more than
/// the workers release in the at most 420 ms before a kill, about 30 flows);
/// accounts are enrolled to make up the difference.
const ROUND_STEPS: usize = 48;
/// Fewest seconds a released code has left in its step (the vault's
/// default), plus a second of slack.
const MIN_SECONDS_LEFT: u64 = 11;

/// The workers' accounts, each with the highest TOTP step the vault may
/// have handed out for it (an estimate never below the vault's).
#[derive(Debug, Default)]
struct Pool(Mutex<Vec<(String, u64)>>);

/// The current step, and the lowest one the vault would hand out now (the
/// next one when the current has too little time left).
fn steps_now() -> (u64, u64) {
    let now = unix_now();
    let current = now / 30;
    if 30 - now % 30 < MIN_SECONDS_LEFT {
        (current, current + 1)
    } else {
        (current, current)
    }
}

impl Pool {
    /// Adds accounts just enrolled: their registration codes took the step
    /// of the enrollment and the next.
    fn enrolled(&self, accounts: &[String]) {
        let last = current_step() + 1;
        self.0
            .lock()
            .unwrap()
            .extend(accounts.iter().map(|a| (a.clone(), last)));
    }

    /// How many codes the vault would hand out now for the accounts (the
    /// vault's rule: a step after the account's last, not before the
    /// current one, or the next one with too little time left, at most 2
    /// ahead).
    fn free_steps(&self) -> usize {
        let (current, first) = steps_now();
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, last)| (current + 3).saturating_sub((last + 1).max(first)) as usize)
            .sum()
    }

    /// An account the vault still has a step for now, that step counted
    /// spent; `None` while every account is used up.
    fn take(&self) -> Option<String> {
        let (current, first) = steps_now();
        let mut accounts = self.0.lock().unwrap();
        let (account, last) = accounts
            .iter_mut()
            .filter(|(_, last)| (*last + 1).max(first) <= current + 2)
            .min_by_key(|(_, last)| *last)?;
        *last = (*last + 1).max(first);
        Some(account.clone())
    }

    /// After a release for `account`: the step of the code it got, or
    /// `None` if it is unknown whether the vault spent one (then every step
    /// up to 2 ahead counts as spent).
    fn released(&self, account: &str, step: Option<u64>) {
        let spent = step.unwrap_or(current_step() + 2);
        let mut accounts = self.0.lock().unwrap();
        for (a, last) in accounts.iter_mut() {
            if a == account {
                *last = (*last).max(spent);
            }
        }
    }
}

/// What the workers saw during one round.
#[derive(Debug, Default)]
struct Seen {
    released: Vec<Released>,
    failed: BTreeMap<String, usize>,
}

/// Runs flows on `WORKERS` tasks until `stop`, each for an account of
/// `pool` that still has a step.
fn start_workers(
    sys: &Arc<System>,
    pool: &Arc<Pool>,
    stop: &Arc<AtomicBool>,
    seen: &Arc<Mutex<Seen>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..WORKERS)
        .map(|_| {
            let (sys, pool, stop, seen) = (sys.clone(), pool.clone(), stop.clone(), seen.clone());
            tokio::spawn(async move {
                let mut crew = sys.crew("alice", "bob", "olivia");
                while !stop.load(Ordering::Relaxed) {
                    let Some(account) = pool.take() else {
                        *seen
                            .lock()
                            .unwrap()
                            .failed
                            .entry("no account with a step left".into())
                            .or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    crew.account = account;
                    let outcome = sys.flow(&crew, PIN_LIMIT).await;
                    match &outcome {
                        Ok(r) => pool.released(&crew.account, Some(r.code.step)),
                        Err(e) if e.step == "release" => pool.released(&crew.account, None),
                        Err(_) => {}
                    }
                    match outcome {
                        Ok(r) => seen.lock().unwrap().released.push(r),
                        Err(e) => {
                            *seen
                                .lock()
                                .unwrap()
                                .failed
                                .entry(if e.status.message().contains("handed out already") {
                                    // The pool's estimate was off: shown apart.
                                    format!("{} {:?} (no step left)", e.step, e.status.code())
                                } else {
                                    format!("{} {:?}", e.step, e.status.code())
                                })
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

/// Uses a fresh grant for `account` once, directly at the vault, with the
/// consent alice, bob and olivia signed for it (as the broker would send it).
async fn use_grant(sys: &System, account: &str) -> GenerateCodeRequest {
    let (grant, evidence) = sys.signed_release(sys.policy_version().await, account);
    let call = GenerateCodeRequest {
        grant: Some(grant),
        evidence: Some(evidence),
    };
    let code = bounded(sys.vault_as_broker().generate_code(call.clone()))
        .await
        .expect("a fresh grant with its consent releases a code")
        .code
        .expect("a code");
    assert_eq!(code.code, totp(code.step));
    call
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_any_service_at_random_points_loses_no_event_and_breaks_no_rule() {
    let per_service = soak_or(3, 20);
    let mut rng = Rng::from_env("crash");
    let started = Instant::now();
    let mut sys = System::start();
    // Releases cut by an audit kill wait this long before UNAVAILABLE.
    sys.set_vault_ack_timeout(2000);
    let rounds = per_service * SERVICES.len();
    // Each round's grant and fresh flow have an account of their own, so
    // a step for them is always free.
    let grant_account = |round: usize| format!("crash-grant-{round}");
    let fresh_account = |round: usize| format!("crash-fresh-{round}");
    let checks: Vec<String> = (0..rounds)
        .flat_map(|r| [grant_account(r), fresh_account(r)])
        .collect();
    // The policy names enough workers' accounts for every round to enroll
    // ROUND_STEPS new ones; they are enrolled as needed.
    let worker_accounts: Vec<String> = (0..rounds * ROUND_STEPS)
        .map(|i| format!("crash-worker-{i}"))
        .collect();
    sys.add_accounts(&[checks.clone(), worker_accounts.clone()].concat())
        .await;
    sys.enroll_accounts(&checks).await;
    let pool = Arc::new(Pool::default());
    let mut spare = worker_accounts.into_iter();

    let first_checkpoint = sys.checkpoint().await;
    let mut received: BTreeMap<String, usize> = BTreeMap::new();
    let mut used_grants: Vec<(Instant, GenerateCodeRequest)> = Vec::new();
    let mut totals = Seen::default();
    let mut order: Vec<&str> = SERVICES.iter().copied().cycle().take(rounds).collect();
    // Shuffle the order of kills (Fisher–Yates with the seeded generator).
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }

    for (round, svc) in order.iter().copied().enumerate() {
        // Enough steps free for the workers' flows of this round.
        let more: Vec<String> = spare
            .by_ref()
            .take(ROUND_STEPS.saturating_sub(pool.free_steps()))
            .collect();
        sys.enroll_accounts(&more).await;
        pool.enrolled(&more);
        // What an auditor can read now, and a checkpoint over it.
        let checkpoint = sys.checkpoint().await;
        let before = sys
            .verified_log(std::slice::from_ref(&first_checkpoint))
            .await;
        used_grants.push((Instant::now(), use_grant(&sys, &grant_account(round)).await));

        let sys_arc = Arc::new(sys);
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let workers = start_workers(&sys_arc, &pool, &stop, &seen);
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

        // No grant usable twice, across restarts (grants live 60 s), even
        // with the very consent it carried the first time.
        used_grants.retain(|(at, _)| at.elapsed() < Duration::from_secs(50));
        for (_, call) in &used_grants {
            let err = bounded(sys.vault_as_broker().generate_code(call.clone()))
                .await
                .expect_err("a used grant released a second code");
            assert_eq!(err.code(), Code::PermissionDenied, "{when}: {err:?}");
            assert!(
                err.message().contains("used"),
                "{when}: refused for another reason than reuse: {err:?}"
            );
        }

        // And the system works again.
        let crew = sys.crew_for(&fresh_account(round), "alice", "bob", "olivia");
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
    // No account came near the signed policy's release rate: no flow
    // failed for it (the vault's codes per account, at most 3 per step
    // window, stay far below it).
    let mut per_account: BTreeMap<String, u32> = BTreeMap::new();
    for e in sys.log().await.iter().filter_map(|e| e.event.as_ref()) {
        if e.action == "code.released" && e.source.ends_with("/svc/vault") {
            *per_account.entry(e.account_id.clone()).or_default() += 1;
        }
    }
    let busiest = per_account.values().max().copied().unwrap_or(0);
    assert!(
        busiest < twokey_testkit::local::RELEASES_PER_HOUR,
        "an account released {busiest} codes, the rate is {} an hour",
        twokey_testkit::local::RELEASES_PER_HOUR
    );
    println!(
        "crash: {} rounds in {:?}; {} flows released during kills, failures {:?}",
        order.len(),
        started.elapsed(),
        totals.released.len(),
        totals.failed
    );
}

//! End to end with two replicas of every service on one real PostgreSQL
//! (issue 18): the real audit, vault and broker binaries, two processes
//! each (`LocalSystem::start_replicated`), every peer address the comma
//! list of both replicas. Full flows pass through either broker replica and
//! the log verifies on either audit replica; `kill -9` of one replica of
//! each service in the middle of concurrent flows and a PostgreSQL restart
//! during flows leave every flow released or ended with a clear status,
//! no code released twice, every event read before the fault still in the
//! log and the log verifying; the same release sent to both broker
//! replicas, and the same grant to both vault replicas, yield one code.
//!
//! The tests take turns (one system of six processes and a database at a
//! time, for 2 cores). With `TWOKEY_E2E_LOGS=DIR`, a failing test keeps
//! the services' logs in DIR. The vault hands out each TOTP step of an account
//! once, so concurrent flows each have an account of their own.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tonic::Code;
use twokey_e2e::{
    Released, System, assert_prefix, bounded, check_request, check_single_use, consent_of,
    request_id_of, totp,
};
use twokey_proto::{
    audit::v1::LogEntry,
    broker::v1::{
        ApproveRequestRequest, CreateRequestRequest, GetRequestRequest, ReleaseCodeRequest,
        RequestState, VerifyPinRequest,
    },
    vault::v1::GenerateCodeRequest,
};
use twokey_testkit::{ha::ServingStatus, local::ACCOUNT};

/// One replicated system at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long one user's flow may take, retries included.
const FLOW_LIMIT: Duration = Duration::from_secs(60);
/// How long a flow started after a fault has healed may take.
const FRESH_FLOW_LIMIT: Duration = Duration::from_secs(30);
/// Between the starts of two of the concurrent flows a fault cuts into.
const STAGGER: Duration = Duration::from_millis(150);
/// How long the log may take to hold what the services acknowledged.
const SETTLE: Duration = Duration::from_secs(30);

fn accounts(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:02}")).collect()
}

/// The statuses a user may see while a replica or the database is down,
/// and retries: each says the service is not there (now), not that the
/// request is wrong. UNKNOWN "transport error" is what the gRPC client
/// reports for a call in flight on a connection whose replica died.
fn transient(code: Code, message: &str) -> bool {
    matches!(code, Code::Unavailable | Code::DeadlineExceeded)
        || (code == Code::Unknown && message == "transport error")
}

/// What one user's flow ended with, and every status it met on the way.
#[derive(Debug)]
struct Outcome {
    request_id: String,
    account: String,
    result: Result<Released, (&'static str, tonic::Status)>,
    /// (step, code, message) of every failed call, retried or not.
    seen: Vec<(&'static str, Code, String)>,
}

/// One whole flow as its users would drive it through replicas that may
/// fail: alice files a request under an id she picked, bob approves, olivia
/// verifies alice's PIN and releases, all through the comma list of both
/// broker replicas. After a failed call (UNAVAILABLE or DEADLINE_EXCEEDED)
/// they look at the request (GetRequest) and go on from the state it is
/// in, as a user reading `twokey status` would, until `limit`.
async fn user_flow(sys: &System, account: &str, version: u64, limit: Duration) -> Outcome {
    let alice = sys.signer("alice");
    let bob = sys.signer("bob");
    let olivia = sys.signer("olivia");
    let statement = alice.request(version, account, "replica test", "OPS-18");
    let id = request_id_of(&statement);
    let mut seen = Vec::new();
    let deadline = Instant::now() + limit;
    let mut last: Option<(&'static str, tonic::Status)> = None;
    let end = |result, seen| Outcome {
        request_id: id.clone(),
        account: account.to_owned(),
        result,
        seen,
    };
    loop {
        if Instant::now() >= deadline {
            let last = last.unwrap_or((
                "flow",
                tonic::Status::deadline_exceeded("the flow did not finish in time"),
            ));
            return end(Err(last), seen);
        }
        if last.is_some() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let request = bounded(sys.broker("olivia").get_request(GetRequestRequest {
            request_id: id.clone(),
        }))
        .await;
        let request = match request {
            Ok(r) => r.request,
            Err(s) if s.code() == Code::NotFound => None,
            Err(s) => {
                seen.push(("get", s.code(), s.message().to_owned()));
                if !transient(s.code(), s.message()) {
                    return end(Err(("get", s)), seen);
                }
                last = Some(("get", s));
                continue;
            }
        };
        let (step, call) = match request.as_ref().map(|r| r.state()) {
            None => (
                "create",
                bounded(sys.broker("alice").create_request(CreateRequestRequest {
                    account_id: account.to_owned(),
                    reason: "replica test".into(),
                    ticket: "OPS-18".into(),
                    on_behalf_of: String::new(),
                    statement: Some(statement.clone()),
                }))
                .await
                .map(drop),
            ),
            Some(RequestState::Pending) => (
                "approve",
                bounded(sys.broker("bob").approve_request(ApproveRequestRequest {
                    request_id: id.clone(),
                    comment: "ok".into(),
                    statement: Some(bob.approve(version, &statement)),
                }))
                .await
                .map(drop),
            ),
            Some(RequestState::Approved) => {
                let Some(pin) = sys.pin("alice", &id, Duration::from_secs(2)).await else {
                    last = Some((
                        "pin",
                        tonic::Status::deadline_exceeded("no PIN delivered yet"),
                    ));
                    continue;
                };
                (
                    "verify",
                    bounded(sys.broker("olivia").verify_pin(VerifyPinRequest {
                        request_id: id.clone(),
                        pin,
                        releases: Vec::new(),
                    }))
                    .await
                    .map(drop),
                )
            }
            Some(RequestState::Verified) => {
                let r = request.as_ref().expect("a request");
                let (req, approvals) = consent_of(r).expect("the request's statements");
                let released = bounded(sys.broker("olivia").release_code(ReleaseCodeRequest {
                    request_id: id.clone(),
                    statement: Some(olivia.release(version, &req, &approvals)),
                }))
                .await;
                match released {
                    Ok(answer) => {
                        let code = answer.code.expect("a released code");
                        return end(
                            Ok(Released {
                                request_id: id.clone(),
                                code,
                            }),
                            seen,
                        );
                    }
                    Err(s) => ("release", Err(s)),
                }
            }
            Some(state) => {
                // RELEASED with no code in hand (its answer was lost), or a
                // state no retry leaves: the flow ends with what it last met.
                let status = last.map(|(_, s)| s).unwrap_or_else(|| {
                    tonic::Status::failed_precondition(format!("the request is {state:?}"))
                });
                return end(Err(("state", status)), seen);
            }
        };
        if let Err(s) = call {
            seen.push((step, s.code(), s.message().to_owned()));
            if !transient(s.code(), s.message()) {
                return end(Err((step, s)), seen);
            }
            last = Some((step, s));
        } else {
            last = None;
        }
    }
}

/// The vault's `code.released` events of a log.
fn vault_releases(log: &[LogEntry]) -> Vec<&twokey_proto::audit::v1::Event> {
    log.iter()
        .filter_map(|e| e.event.as_ref())
        .filter(|e| e.action == "code.released" && e.source.ends_with("/svc/vault"))
        .collect()
}

/// Asserts each released code is the right TOTP and is in the log as the
/// vault's `code.released` for its request, account and step.
fn assert_codes_logged(outcomes: &[Outcome], log: &[LogEntry]) {
    let releases = vault_releases(log);
    for o in outcomes {
        if let Ok(r) = &o.result {
            assert_eq!(
                r.code.code,
                totp(r.code.step),
                "{}: not the TOTP",
                o.account
            );
            assert!(
                releases.iter().any(|e| e.request_id == o.request_id
                    && e.account_id == o.account
                    && e.attributes.get("step") == Some(&r.code.step.to_string())),
                "the code of {} (step {}) is not in the log",
                o.request_id,
                r.code.step
            );
        }
    }
}

/// Reads the log from `audit` (one replica) until every released code of
/// `outcomes` has its `code.released` there and it stopped growing.
async fn settled_log_at(sys: &System, audit: &str, outcomes: &[Outcome]) -> Vec<LogEntry> {
    let want: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.result.is_ok())
        .map(|o| o.request_id.as_str())
        .collect();
    let deadline = Instant::now() + SETTLE;
    let mut last_len = usize::MAX;
    loop {
        let log = sys.log_at(audit).await.unwrap_or_default();
        let releases = vault_releases(&log);
        let done = want
            .iter()
            .all(|id| releases.iter().any(|e| e.request_id == *id));
        if (done && log.len() == last_len) || Instant::now() >= deadline {
            return log;
        }
        last_len = log.len();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The address of the audit replica that reports SERVING (the sequencer).
async fn sequencer(sys: &System) -> usize {
    let pki = sys.local.dir.join("pki");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for (i, address) in sys.local.replica_addresses("audit").iter().enumerate() {
            if matches!(
                twokey_testkit::ha::health(&pki, "audit", address).await,
                Ok(ServingStatus::Serving)
            ) {
                return i;
            }
        }
        assert!(Instant::now() < deadline, "no audit replica SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether a flow may end with `status` at `step`: a status saying a
/// replica or the database is not there (after [`FLOW_LIMIT`] of retries),
/// or, at the release, FAILED_PRECONDITION saying the request already
/// released the code it allows: its release went through on a broker
/// replica that died before it answered, so the user files a new request.
fn clear_end(step: &str, status: &tonic::Status) -> bool {
    transient(status.code(), status.message())
        || (step == "release"
            && status.code() == Code::FailedPrecondition
            && status
                .message()
                .contains("already released the 1 code it allows"))
}

/// Prints what each flow met (for the test's output) and asserts every flow
/// ended released or with a clear status, having met nothing but transient
/// statuses on the way.
fn assert_clear(outcomes: &[Outcome]) {
    for o in outcomes {
        match &o.result {
            Ok(r) => println!(
                "{} {}: released step {}",
                o.account, o.request_id, r.code.step
            ),
            Err((step, s)) => println!(
                "{} {}: ended at {step} with {:?} {}",
                o.account,
                o.request_id,
                s.code(),
                s.message()
            ),
        }
        let mut met: Vec<String> = o
            .seen
            .iter()
            .map(|(step, code, message)| format!("{step}: {code:?} {message}"))
            .collect();
        met.dedup();
        for line in met {
            println!("    {line}");
        }
    }
    for o in outcomes {
        let mut seen = o.seen.as_slice();
        if let Err((step, s)) = &o.result {
            assert!(
                clear_end(step, s),
                "{}: the flow ended at {step} with {:?} {:?}, not a clear status",
                o.request_id,
                s.code(),
                s.message()
            );
            seen = &seen[..seen.len().saturating_sub(1)];
        }
        for (step, code, message) in seen {
            assert!(
                transient(*code, message),
                "{}: {step} answered {code:?} {message:?}",
                o.request_id
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn full_flows_pass_through_either_broker_replica_and_either_audit_replica_verifies() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let accounts = accounts("full", 4);
    let sys = System::start_replicated(&accounts);
    sys.enroll_accounts(&accounts).await;
    let brokers = sys.local.replica_addresses("broker");
    let (b0, b1) = (brokers[0].as_str(), brokers[1].as_str());

    // Each person on one replica, and each replica in each role.
    let routes = [[b0, b0, b0], [b1, b1, b1], [b0, b1, b0], [b1, b0, b1]];
    let mut outcomes = Vec::new();
    for (account, route) in accounts.iter().zip(routes) {
        let crew = sys.crew_at(account, route);
        let released = sys
            .flow(&crew, Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("a flow through {route:?} failed: {e:?}"));
        assert_eq!(released.code.code, totp(released.code.step));
        outcomes.push(Outcome {
            request_id: released.request_id.clone(),
            account: account.clone(),
            result: Ok(released),
            seen: Vec::new(),
        });
    }

    // Either audit replica serves the whole log, which verifies against its
    // checkpoint, and holds each code once.
    let audits = sys.local.replica_addresses("audit");
    let mut lengths = Vec::new();
    for audit in &audits {
        settled_log_at(&sys, audit, &outcomes).await;
        let log = sys.verified_log_at(audit, &[]).await;
        check_single_use(&log).unwrap();
        assert_codes_logged(&outcomes, &log);
        assert_eq!(
            vault_releases(&log).len(),
            outcomes.len(),
            "codes in {audit}"
        );
        // Each code's entry is in the tree this replica signs: its
        // inclusion proof leads to the checkpoint's root.
        let checkpoint = sys.checkpoint_at(audit).await.unwrap();
        let verifier = twokey_audit::checkpoint::NoteVerifier::parse(&sys.local.verifier_key)
            .expect("verifier key");
        let size = log.len() as u64;
        for entry in log.iter().filter(|e| {
            e.event
                .as_ref()
                .is_some_and(|e| e.action == "code.released" && e.source.ends_with("/svc/vault"))
        }) {
            let proof = bounded(sys.audit_at("carol", audit).get_inclusion_proof(
                twokey_proto::audit::v1::GetInclusionProofRequest {
                    leaf_index: entry.index,
                    tree_size: size,
                },
            ))
            .await
            .unwrap();
            twokey::audit::check_inclusion(&verifier, &checkpoint, entry, &proof)
                .unwrap_or_else(|e| panic!("entry {} on {audit}: {e}", entry.index));
        }
        lengths.push(log.len());
    }
    // Each released request is RELEASED on either broker replica, by the
    // state machine's rules.
    for broker in &brokers {
        for o in &outcomes {
            let r = bounded(
                sys.broker_at("olivia", broker)
                    .get_request(GetRequestRequest {
                        request_id: o.request_id.clone(),
                    }),
            )
            .await
            .unwrap()
            .request
            .unwrap();
            assert_eq!(r.state(), RequestState::Released, "on {broker}");
            check_request(&r).unwrap();
        }
    }
    println!("log lengths on the audit replicas: {lengths:?}");
}

/// Runs [`user_flow`] for each of `accounts` on tasks of their own, the
/// i-th starting after `i * stagger` (so that a fault finds flows at every
/// step).
fn start_flows(
    sys: &Arc<System>,
    accounts: &[String],
    version: u64,
    stagger: Duration,
    limit: Duration,
) -> Vec<tokio::task::JoinHandle<Outcome>> {
    accounts
        .iter()
        .zip(0u32..)
        .map(|(account, i)| {
            let (sys, account) = (sys.clone(), account.clone());
            tokio::spawn(async move {
                tokio::time::sleep(stagger * i).await;
                user_flow(&sys, &account, version, limit).await
            })
        })
        .collect()
}

async fn finish(flows: Vec<tokio::task::JoinHandle<Outcome>>) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    for flow in flows {
        outcomes.push(flow.await.expect("a flow task"));
    }
    outcomes
}

/// Flows after a fault: each must release its code.
async fn fresh_flows(sys: &Arc<System>, accounts: &[String], version: u64) -> Vec<Outcome> {
    let outcomes = finish(start_flows(
        sys,
        accounts,
        version,
        Duration::ZERO,
        FRESH_FLOW_LIMIT,
    ))
    .await;
    for o in &outcomes {
        if let Err((step, s)) = &o.result {
            let mut met: Vec<String> = o
                .seen
                .iter()
                .map(|(step, code, message)| format!("{step} {code:?} {message}"))
                .collect();
            met.dedup();
            panic!(
                "a fresh flow after the fault failed at {step}: {:?} {} (met {met:?})\n{}",
                s.code(),
                s.message(),
                sys.log_tails(15)
            );
        }
    }
    outcomes
}

/// Checks the requests as either broker replica reports them against the
/// state machine.
async fn check_requests(sys: &System) {
    for r in sys.all_requests().await {
        check_request(&r).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_one_replica_of_each_service_mid_flows_loses_no_event_and_releases_no_code_twice()
{
    let _turn = ONE_AT_A_TIME.lock().await;
    const FLOWS: usize = 12;
    let all = accounts("kill", FLOWS + 2);
    let (during, after) = all.split_at(FLOWS);
    let sys = System::start_replicated(&all);
    sys.enroll_accounts(&all).await;
    let version = sys.policy_version().await;
    let sys = Arc::new(sys);
    let started = Instant::now();

    let flows = start_flows(&sys, during, version, STAGGER, FLOW_LIMIT);
    tokio::time::sleep(STAGGER * FLOWS as u32 / 2).await;
    // What an auditor read before the kill, from the sequencer.
    let audits = sys.local.replica_addresses("audit");
    let seq = sequencer(&sys).await;
    let checkpoint_before = sys.checkpoint_at(&audits[seq]).await.unwrap();
    let before = sys.log_at(&audits[seq]).await.unwrap();
    let killed = [
        "vault-0".to_owned(),
        "broker-0".to_owned(),
        format!("audit-{seq}"),
    ];
    for name in &killed {
        twokey_e2e::signal(sys.local.pid(name).expect("running"), "KILL");
    }
    println!(
        "killed {killed:?} at {:?}, {} log entries read before",
        started.elapsed(),
        before.len()
    );
    let mut outcomes = finish(flows).await;
    let released = outcomes.iter().filter(|o| o.result.is_ok()).count();
    println!(
        "{released} of {FLOWS} flows released, all ended by {:?}",
        started.elapsed()
    );
    assert_clear(&outcomes);
    assert!(
        outcomes.iter().any(|o| !o.seen.is_empty()),
        "the kill found no call in flight: it tested nothing"
    );
    outcomes.extend(fresh_flows(&sys, after, version).await);

    // The surviving audit replica took over: the log holds everything read
    // before the kill, verifies against the checkpoint read then and its
    // own, and has each code once.
    let survivor = &audits[1 - seq];
    let log = settled_log_at(&sys, survivor, &outcomes).await;
    assert_prefix(&before, &log, "after the kill");
    let log = sys
        .verified_log_at(survivor, std::slice::from_ref(&checkpoint_before))
        .await;
    check_single_use(&log).unwrap();
    assert_codes_logged(&outcomes, &log);
    check_requests(&sys).await;
    for o in outcomes.iter().filter(|o| o.result.is_err()) {
        let actions: Vec<&str> = log
            .iter()
            .filter_map(|e| e.event.as_ref())
            .filter(|e| e.request_id == o.request_id && e.source.ends_with("/svc/vault"))
            .map(|e| e.action.as_str())
            .collect();
        println!("{}: the vault logged {actions:?}", o.request_id);
    }

    // The killed replicas come back on their addresses; the restarted audit
    // replica serves the same log.
    let mut sys = Arc::try_unwrap(sys).expect("the flows are done");
    for name in &killed {
        sys.local.kill(name);
        sys.local
            .restart(&twokey_e2e::bin_dir(), name)
            .unwrap_or_else(|e| panic!("{name} does not restart: {e}"));
    }
    let pki = sys.local.dir.join("pki");
    for kind in ["vault", "broker"] {
        twokey_testkit::ha::wait_serving(
            &pki,
            kind,
            &sys.local.replica_addresses(kind),
            2,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    }
    let deadline = Instant::now() + SETTLE;
    loop {
        let again = sys.log_at(&audits[seq]).await.unwrap_or_default();
        if again.len() >= log.len() {
            assert_prefix(&log, &again, "on the restarted audit replica");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted audit replica serves {} of {} entries",
            again.len(),
            log.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sys.verified_log_at(&audits[seq], &[checkpoint_before])
        .await;
    println!("done in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_restarted_during_flows_answers_unavailable_then_flows_succeed_with_nothing_lost()
{
    let _turn = ONE_AT_A_TIME.lock().await;
    const FLOWS: usize = 8;
    let all = accounts("pg", FLOWS + 2);
    let (during, after) = all.split_at(FLOWS);
    let sys = System::start_replicated(&all);
    sys.enroll_accounts(&all).await;
    let version = sys.policy_version().await;
    let sys = Arc::new(sys);
    let started = Instant::now();

    let flows = start_flows(&sys, during, version, STAGGER, FLOW_LIMIT);
    tokio::time::sleep(STAGGER * FLOWS as u32 / 2).await;
    let audits = sys.local.replica_addresses("audit");
    let seq = sequencer(&sys).await;
    let checkpoint_before = sys.checkpoint_at(&audits[seq]).await.unwrap();
    let before = sys.log_at(&audits[seq]).await.unwrap();
    sys.postgres().stop().unwrap();
    let down = Instant::now();

    // Meanwhile each replica answers UNAVAILABLE: the brokers to a new
    // request, the vaults to a release, the audit replicas to a read.
    for broker in sys.local.replica_addresses("broker") {
        let asked = Instant::now();
        let statement = sys
            .signer("alice")
            .request(version, ACCOUNT, "while down", "OPS-18");
        let refused = bounded(sys.broker_at("alice", &broker).create_request(
            CreateRequestRequest {
                account_id: ACCOUNT.into(),
                reason: "while down".into(),
                ticket: "OPS-18".into(),
                on_behalf_of: String::new(),
                statement: Some(statement),
            },
        ))
        .await
        .expect_err("no request is filed while the database is down");
        assert_eq!(refused.code(), Code::Unavailable, "{broker}: {refused:?}");
        println!("broker {broker}: UNAVAILABLE after {:?}", asked.elapsed());
    }
    for vault in sys.local.replica_addresses("vault") {
        let asked = Instant::now();
        let (grant, evidence) = sys.signed_release(version, ACCOUNT);
        let refused = bounded(sys.vault_at(&vault).generate_code(GenerateCodeRequest {
            grant: Some(grant),
            evidence: Some(evidence),
        }))
        .await
        .expect_err("no code while the database is down");
        assert_eq!(refused.code(), Code::Unavailable, "{vault}: {refused:?}");
        println!("vault {vault}: UNAVAILABLE after {:?}", asked.elapsed());
    }
    for audit in &audits {
        let asked = Instant::now();
        let refused = sys
            .log_at(audit)
            .await
            .expect_err("no log read while the database is down");
        assert_eq!(refused.code(), Code::Unavailable, "{audit}: {refused:?}");
        println!("audit {audit}: UNAVAILABLE after {:?}", asked.elapsed());
    }
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(down.elapsed())).await;
    sys.postgres().start_server().unwrap();
    println!("PostgreSQL was down for {:?}", down.elapsed());

    let mut outcomes = finish(flows).await;
    let released = outcomes.iter().filter(|o| o.result.is_ok()).count();
    println!(
        "{released} of {FLOWS} flows released, all ended by {:?}",
        started.elapsed()
    );
    assert_clear(&outcomes);
    outcomes.extend(fresh_flows(&sys, after, version).await);

    // Nothing lost, no code twice, and both audit replicas serve the log,
    // which verifies.
    for audit in &audits {
        let log = settled_log_at(&sys, audit, &outcomes).await;
        assert_prefix(&before, &log, "after the restart");
        let log = sys
            .verified_log_at(audit, std::slice::from_ref(&checkpoint_before))
            .await;
        check_single_use(&log).unwrap();
        assert_codes_logged(&outcomes, &log);
    }
    check_requests(&sys).await;
    println!("done in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_release_on_both_broker_replicas_and_the_same_grant_on_both_vault_replicas_give_one_code()
 {
    let _turn = ONE_AT_A_TIME.lock().await;
    let all = accounts("twice", 2);
    let sys = System::start_replicated(&all);
    sys.enroll_accounts(&all).await;
    let version = sys.policy_version().await;

    // One VERIFIED request; olivia's one release statement sent to both
    // broker replicas at once.
    let request = sys.verified_request_for(&all[0], "twice").await;
    let (req, approvals) = consent_of(&request).unwrap();
    let statement = sys.signer("olivia").release(version, &req, &approvals);
    let brokers = sys.local.replica_addresses("broker");
    let release = |address: &str| {
        let mut client = sys.broker_at("olivia", address);
        let call = ReleaseCodeRequest {
            request_id: request.request_id.clone(),
            statement: Some(statement.clone()),
        };
        async move { bounded(client.release_code(call)).await }
    };
    let (a, b) = tokio::join!(release(&brokers[0]), release(&brokers[1]));
    println!(
        "brokers: {:?} / {:?}",
        a.as_ref().map(|_| "code"),
        b.as_ref().map(|_| "code")
    );
    let (code, refused) = match (a, b) {
        (Ok(c), Err(e)) | (Err(e), Ok(c)) => (c.code.expect("a code"), e),
        (a, b) => panic!("not exactly one code: {a:?} / {b:?}"),
    };
    assert_eq!(code.code, totp(code.step));
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    // One grant and its consent sent to both vault replicas at once.
    let (grant, evidence) = sys.signed_release(version, &all[1]);
    let grant_id = twokey_e2e::grant_id_of(evidence.release.as_ref().unwrap());
    let vaults = sys.local.replica_addresses("vault");
    let generate = |address: &str| {
        let mut client = sys.vault_at(address);
        let call = GenerateCodeRequest {
            grant: Some(grant.clone()),
            evidence: Some(evidence.clone()),
        };
        async move { bounded(client.generate_code(call)).await }
    };
    let (a, b) = tokio::join!(generate(&vaults[0]), generate(&vaults[1]));
    println!(
        "vaults: {:?} / {:?}",
        a.as_ref().map(|_| "code"),
        b.as_ref().map(|_| "code")
    );
    let (vault_code, refused) = match (a, b) {
        (Ok(c), Err(e)) | (Err(e), Ok(c)) => (c.code.expect("a code"), e),
        (a, b) => panic!("not exactly one code: {a:?} / {b:?}"),
    };
    assert_eq!(vault_code.code, totp(vault_code.step));
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // The log has one code.released for each, and verifies.
    let outcomes = [Outcome {
        request_id: request.request_id.clone(),
        account: all[0].clone(),
        result: Ok(Released {
            request_id: request.request_id.clone(),
            code,
        }),
        seen: Vec::new(),
    }];
    let audit = sys.local.replica_addresses("audit")[sequencer(&sys).await].clone();
    settled_log_at(&sys, &audit, &outcomes).await;
    let log = sys.verified_log_at(&audit, &[]).await;
    check_single_use(&log).unwrap();
    assert_codes_logged(&outcomes, &log);
    let releases = vault_releases(&log);
    assert_eq!(
        releases
            .iter()
            .filter(|e| e.request_id == request.request_id)
            .count(),
        1
    );
    assert_eq!(
        releases
            .iter()
            .filter(|e| e.attributes.get("grant_id") == Some(&grant_id))
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_update_applied_through_the_broker_is_in_force_on_every_replica() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let all = accounts("policy", 4);
    let sys = System::start_replicated(&all);
    sys.enroll_accounts(&all).await;
    // Version 2 (the same rules, the version bumped), proposed, signed by
    // adam and anna and applied through the broker, which hands it to one
    // vault replica.
    let version = sys.update_policy(|_| {}).await;
    assert_eq!(version, 2);

    // Each broker replica names version 2 and runs a flow under it; each
    // vault replica releases a code for consent signed under version 2.
    // Every replica is checked before the test fails, so that it says which.
    let mut wrong = Vec::new();
    let brokers = sys.local.replica_addresses("broker");
    let applied = Instant::now();
    for (broker, account) in brokers.iter().zip(&all) {
        // A replica loads a version another applied when PostgreSQL tells
        // it (NOTIFY): within moments, not at once.
        let named = loop {
            let named = bounded(
                sys.broker_at("alice", broker)
                    .who_am_i(twokey_proto::broker::v1::WhoAmIRequest {}),
            )
            .await
            .unwrap()
            .policy_version;
            if named == version || applied.elapsed() > Duration::from_secs(10) {
                break named;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        println!(
            "broker {broker} names version {named} {:?} after the update",
            applied.elapsed()
        );
        if named != version {
            wrong.push(format!(
                "broker {broker} still names version {named} 10 s after the update"
            ));
        }
        // Signed under the version the replica names, as the CLI signs.
        let crew = sys.crew_at(account, [broker, broker, broker]);
        match sys.flow(&crew, Duration::from_secs(10)).await {
            Ok(released) => assert_eq!(released.code.code, totp(released.code.step)),
            Err(e) => wrong.push(format!(
                "a flow on broker {broker} stops at {}: {:?} {}",
                e.step,
                e.status.code(),
                e.status.message()
            )),
        }
    }
    let vaults = sys.local.replica_addresses("vault");
    for (vault, account) in vaults.iter().zip(&all[2..]) {
        let (grant, evidence) = sys.signed_release(version, account);
        match bounded(sys.vault_at(vault).generate_code(GenerateCodeRequest {
            grant: Some(grant),
            evidence: Some(evidence),
        }))
        .await
        {
            Ok(answer) => {
                let code = answer.code.unwrap();
                assert_eq!(code.code, totp(code.step));
            }
            Err(e) => wrong.push(format!(
                "vault {vault} refuses consent under version {version}: {:?} {}",
                e.code(),
                e.message()
            )),
        }
    }
    assert!(
        wrong.is_empty(),
        "version {version} is not in force everywhere:\n{}",
        wrong.join("\n")
    );
}

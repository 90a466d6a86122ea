//! Two real `twokey-vault` processes on one PostgreSQL (a throwaway
//! server), each with its own data directory and the same keys, over mTLS
//! on loopback, with the tests' stand-in audit service and grant maker
//! (issue 18): both report NOT_SERVING and answer UNAVAILABLE until the
//! database answers, then SERVING; a policy applied through either is in
//! force on both; the same grant sent to both at the same
//! moment yields one code, the other PERMISSION_DENIED; grants for one
//! account spread over both never share a TOTP step; a replica killed
//! (SIGKILL) in the middle of calls leaves the other releasing and every
//! event it committed reaches audit; PostgreSQL restarted during calls is
//! a clear UNAVAILABLE, then releases again, no step twice.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use tonic::{Code, Status, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use twokey_proto::vault::v1::{
    EnrollRequest, enroll_request::Seed, vault_service_client::VaultServiceClient,
};
use twokey_testkit::{
    postgres::{TestDatabase, TestPostgres},
    ready,
};

/// How long a test waits for something that should happen much sooner.
const PATIENCE: Duration = Duration::from_secs(60);
/// The health service name the vault reports.
const SERVED: &str = "twokey.vault.v1.VaultService";

/// The throwaway server and the vault's database on it.
struct Pg {
    pg: TestPostgres,
    db: TestDatabase,
}

fn start_pg() -> Pg {
    let pg = TestPostgres::start().expect("scripts/test installs PostgreSQL");
    let db = pg.database_for("vault", "vault_role").unwrap();
    Pg { pg, db }
}

/// A vault process, killed on drop.
struct Replica {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Replica {
    fn client(&self, fx: &Fixture) -> VaultServiceClient<Channel> {
        fx.broker_client(self.addr)
    }

    /// SIGKILL, and wait until it is gone.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of its log.
    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// Replica `name`'s config: its own data directory, the fixture's keys,
/// the audit stand-in at `audit`, and the store on PostgreSQL.
fn write_config(fx: &Fixture, name: &str, audit: SocketAddr, pg: &Pg) -> PathBuf {
    let c = fx.vault_config(audit);
    let data = fx.path().join(format!("data-{name}"));
    std::fs::create_dir_all(&data).unwrap();
    let text = format!(
        r#"listen = "127.0.0.1:0"
trust_domain = "{td}"
data_dir = "{data}"
master_key_file = "{master}"
event_key_file = "{event}"
broker_id = "{broker}"
grant_public_key = "{grant}"
audit_address = "{audit}"
audit_ack_timeout_ms = 20000
[tls]
{tls}
[consent]
admins_file = "{admins}"
threshold = 2
[store]
backend = "postgres"
[store.postgres]
url = "{url}"
password_file = "{password_file}"
"#,
        td = c.trust_domain,
        data = data.display(),
        master = c.master_key_file.display(),
        event = c.event_key_file.display(),
        broker = c.broker_id,
        grant = c.grant_public_key,
        audit = c.audit_address,
        tls = toml::to_string(&c.tls).unwrap(),
        admins = fx.path().join("admins.allowed_signers").display(),
        url = pg.db.url,
        password_file = pg.db.password_file.display(),
    );
    let path = fx.path().join(format!("vault-{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts replica `name` (off the runtime, which keeps serving the audit
/// stand-in meanwhile) and waits for its "listening on" line.
async fn replica(fx: &Fixture, name: &str, audit: SocketAddr, pg: &Pg) -> Replica {
    let config = write_config(fx, name, audit, pg);
    let log = config.with_extension("log");
    let mut command = Command::new(env!("CARGO_BIN_EXE_twokey-vault"));
    command
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env("TWOKEY_LOG", "info");
    let stderr = std::fs::File::create(&log).unwrap();
    let (child, addr) = tokio::task::spawn_blocking(move || {
        ready::start(command, "twokey-vault", stderr, PATIENCE)
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("vault {name}: {e}"));
    Replica { child, addr, log }
}

async fn health(fx: &Fixture, r: &Replica) -> ServingStatus {
    let mut client = HealthClient::new(fx.channel(r.addr, "broker"));
    let status = client
        .check(HealthCheckRequest {
            service: SERVED.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("health: {e:?}; the replica's log:\n{}", r.log()))
        .into_inner()
        .status;
    ServingStatus::try_from(status).unwrap()
}

async fn wait_serving(fx: &Fixture, r: &Replica) {
    let start = Instant::now();
    while health(fx, r).await != ServingStatus::Serving {
        assert!(
            start.elapsed() < PATIENCE,
            "replica never SERVING; its log:\n{}",
            r.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a replica logs when it takes the shipping lease.
const LEASED: &str = "this replica holds the shipping lease";

/// Waits until `r`'s log holds `text`.
async fn wait_for_log(r: &Replica, text: &str) {
    let start = Instant::now();
    while !r.log().contains(text) {
        assert!(
            start.elapsed() < PATIENCE,
            "never logged {text:?}:\n{}",
            r.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fresh random Base32 seed (160 bits).
fn new_secret() -> String {
    use rand::RngCore;
    let mut seed = [0u8; 20];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    data_encoding::BASE32_NOPAD.encode(&seed)
}

/// Applies policy 1 listing `accounts` through `r`, then enrolls each with
/// a seed of its own and TOTP steps of `period` seconds; returns the seeds
/// by account.
async fn enroll_all(
    fx: &Fixture,
    r: &Replica,
    accounts: &[String],
    period: u32,
) -> BTreeMap<String, String> {
    let names: Vec<&str> = accounts.iter().map(String::as_str).collect();
    fx.apply(r.addr, 1, &names).await;
    let mut seeds = BTreeMap::new();
    for account in accounts {
        let secret = new_secret();
        r.client(fx)
            .enroll(EnrollRequest {
                account_id: account.clone(),
                seed: Some(Seed::Base32Secret(secret.clone())),
                grant: Some(fx.enroll_grant(account, "adam")),
                period,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("enroll {account}: {e:?}"));
        seeds.insert(account.clone(), secret);
    }
    seeds
}

/// Applies policy 1 listing `n` accounts and enrolls them, each with a
/// seed of its own and steps of `period` seconds (enrolling hands out the
/// current step and the next), through a vault process of their own that
/// is killed after, so that the replicas of a test start on a database
/// that holds them; returns the seeds by account.
async fn prepare(
    fx: &Fixture,
    audit: SocketAddr,
    pg: &Pg,
    n: usize,
    period: u32,
) -> BTreeMap<String, String> {
    let setup = replica(fx, "setup", audit, pg).await;
    wait_serving(fx, &setup).await;
    enroll_all(fx, &setup, &accounts(n), period).await
}

fn accounts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("acct-{i:02}")).collect()
}

/// A code released: its step, digits, step length, and the Unix times
/// the call was sent and answered.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Released {
    step: u64,
    code: String,
    period: u32,
    sent: u64,
    answered: u64,
}

/// Sends `release` to `client`; the code, or the refusal.
async fn release(
    mut client: VaultServiceClient<Channel>,
    release: &Release,
) -> Result<Released, Status> {
    let sent = unix_now();
    let answer = tokio::time::timeout(PATIENCE, client.generate_code(release.request()))
        .await
        .expect("GenerateCode answers within the patience")?
        .into_inner();
    let code = answer.code.expect("a released code");
    Ok(Released {
        step: code.step,
        code: code.code,
        period: code.period,
        sent,
        answered: unix_now(),
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A released code is `secret`'s code of its step (HOTP of the step number,
/// whatever its length), and that step is one current during the call or
/// at most two ahead (min_seconds_left may skip the current one).
fn assert_right_code(secret: &str, r: &Released) {
    assert_eq!(r.code, code_of(secret, r.step), "a wrong code for {r:?}");
    let period = u64::from(r.period.max(1));
    assert!(
        (r.sent / period..=r.answered / period + 3).contains(&r.step),
        "step {} far from the time of the call: {r:?}",
        r.step
    );
}

/// The refusal a replica answers while its database is out of reach: a
/// clear UNAVAILABLE that names the database and says to retry.
fn is_database_unavailable(status: &Status) -> bool {
    let text = status.message();
    status.code() == Code::Unavailable
        && text.contains("the vault's database is unavailable")
        && text.contains("retry, through another vault replica")
}

/// The steps told to wait: every code up to two steps ahead was handed out.
fn is_steps_used(status: &Status) -> bool {
    status.code() == Code::Unavailable && status.message().contains("handed out already")
}

/// Every `code.released` step in audit, by account, in log order, each
/// `code.withheld` taking back the release of its step before it (a
/// withheld step is given back and may be released again): the steps
/// whose codes left a vault.
fn released_in_audit(audit: &FakeAudit) -> Vec<(String, u64)> {
    let mut events = audit.events.lock().unwrap().clone();
    events.sort_by_key(|e| e.seq);
    let mut released: Vec<(String, u64)> = Vec::new();
    for e in &events {
        let key = || {
            let step = e.attributes["step"].parse().expect("a step attribute");
            (e.account_id.clone(), step)
        };
        match e.action.as_str() {
            "code.released" => released.push(key()),
            "code.withheld" => {
                let key = key();
                let at = released
                    .iter()
                    .rposition(|k| *k == key)
                    .unwrap_or_else(|| panic!("{key:?} withheld, never released"));
                released.remove(at);
            }
            _ => {}
        }
    }
    released
}

/// Fails if any (account, step) is in `released` twice.
fn assert_no_step_twice(released: &[(String, u64)]) {
    let mut seen = BTreeSet::new();
    for k in released {
        assert!(seen.insert(k.clone()), "step released twice: {k:?}");
    }
}

/// The sequence numbers the vault's events were committed under, read
/// from the shared outbox's counter (they start at 1).
fn committed_seqs(pg: &Pg) -> BTreeSet<u64> {
    let next: u64 = pg
        .pg
        .psql("vault", "SELECT max(next_seq) FROM twokey_outbox_seq")
        .unwrap()
        .parse()
        .unwrap();
    (1..next).collect()
}

/// Waits until the audit stand-in holds an event under each of `seqs`.
async fn wait_in_audit(audit: &FakeAudit, seqs: &BTreeSet<u64>) {
    let start = Instant::now();
    loop {
        let held: BTreeSet<u64> = audit.events.lock().unwrap().iter().map(|e| e.seq).collect();
        let missing: Vec<u64> = seqs.difference(&held).copied().collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "committed events never reached audit: seqs {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_replicas_are_not_serving_until_the_database_answers_then_serve() {
    let fx = Fixture::new();
    let audit = FakeAudit::default();
    let audit_server = start_fake_audit(&fx, audit.clone()).await;
    let pg = start_pg();
    let seeds = prepare(&fx, audit_server.addr, &pg, 2, 30).await;
    pg.pg.stop().unwrap();

    // PostgreSQL down at start: both bind and announce, NOT_SERVING, and a
    // code call is UNAVAILABLE saying why.
    let a = replica(&fx, "a", audit_server.addr, &pg).await;
    let b = replica(&fx, "b", audit_server.addr, &pg).await;
    for r in [&a, &b] {
        assert_eq!(health(&fx, r).await, ServingStatus::NotServing);
        let status = release(r.client(&fx), &fx.consented("acct-00", 1))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("database") && status.message().contains("retry"),
            "{status:?}"
        );
    }
    // Still NOT_SERVING a while later: nothing answers yet.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(health(&fx, &a).await, ServingStatus::NotServing);

    pg.pg.start_server().unwrap();
    wait_serving(&fx, &a).await;
    wait_serving(&fx, &b).await;
    // And both release (an account each: enrolling used two steps).
    for (r, account) in [(&a, "acct-00"), (&b, "acct-01")] {
        let code = release(r.client(&fx), &fx.consented(account, 1))
            .await
            .unwrap();
        assert_right_code(&seeds[account], &code);
    }
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_grant_on_both_replicas_at_once_yields_exactly_one_code() {
    const ROUNDS: usize = 20;
    let fx = Fixture::new();
    let audit = FakeAudit::default();
    let audit_server = start_fake_audit(&fx, audit.clone()).await;
    let pg = start_pg();
    // One account per round, so that no round waits for a free step.
    let seeds = prepare(&fx, audit_server.addr, &pg, ROUNDS, 30).await;
    let names = accounts(ROUNDS);
    let a = replica(&fx, "a", audit_server.addr, &pg).await;
    let b = replica(&fx, "b", audit_server.addr, &pg).await;
    wait_serving(&fx, &a).await;
    wait_serving(&fx, &b).await;
    let (on_a, on_b) = (a.client(&fx), b.client(&fx));
    let mut wins = [0; 2];
    for account in &names {
        let both = fx.consented(account, 1);
        let (x, y) = tokio::join!(release(on_a.clone(), &both), release(on_b.clone(), &both));
        let (code, refused) = match (x, y) {
            (Ok(code), Err(refused)) => {
                wins[0] += 1;
                (code, refused)
            }
            (Err(refused), Ok(code)) => {
                wins[1] += 1;
                (code, refused)
            }
            other => panic!("{account}: not exactly one code: {other:?}"),
        };
        assert_right_code(&seeds[account], &code);
        // What a single vault answers the same grant and release again:
        // the grant or the release used already.
        // (FAILED_PRECONDITION "has released 1 of its 1 codes" here is the
        // consent pre-check reading the release id before the winner
        // committed and the request's count after: two reads, two
        // snapshots.)
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        assert!(
            refused.message().contains("already used")
                || refused.message().contains("used already"),
            "{refused:?}"
        );
    }
    eprintln!("codes released by A, B: {wins:?}");
    // The log holds one release per round.
    let start = Instant::now();
    while released_in_audit(&audit).len() < ROUNDS {
        assert!(start.elapsed() < PATIENCE, "releases missing from audit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let released = released_in_audit(&audit);
    assert_eq!(released.len(), ROUNDS, "{released:?}");
    assert_no_step_twice(&released);
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_for_one_account_spread_over_both_replicas_never_share_a_step() {
    // Waves of concurrent grants a second apart, on one-second steps, so
    // that each wave finds free steps and most grants race for them.
    const WAVES: usize = 4;
    const GRANTS: usize = 12;
    let fx = Fixture::new();
    let audit = FakeAudit::default();
    let audit_server = start_fake_audit(&fx, audit.clone()).await;
    let pg = start_pg();
    let seeds = prepare(&fx, audit_server.addr, &pg, 1, 1).await;
    let a = replica(&fx, "a", audit_server.addr, &pg).await;
    let b = replica(&fx, "b", audit_server.addr, &pg).await;
    wait_serving(&fx, &a).await;
    wait_serving(&fx, &b).await;
    let secret = &seeds["acct-00"];
    let (on_a, on_b) = (a.client(&fx), b.client(&fx));
    let mut steps = BTreeSet::new();
    let mut waits = 0;
    for _ in 0..WAVES {
        let releases: Vec<Release> = (0..GRANTS).map(|_| fx.consented("acct-00", 1)).collect();
        let answers = futures::future::join_all(releases.iter().enumerate().map(|(i, r)| {
            let client = if i % 2 == 0 { &on_a } else { &on_b };
            release(client.clone(), r)
        }))
        .await;
        for answer in answers {
            match answer {
                Ok(code) => {
                    assert_right_code(secret, &code);
                    assert!(steps.insert(code.step), "step {} twice", code.step);
                }
                Err(s) if is_steps_used(&s) => waits += 1,
                Err(s) => panic!("an unexpected refusal: {s:?}"),
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Each wave: the free steps (the current one and up to two ahead, less
    // those handed out already) once each, the rest told to wait.
    eprintln!(
        "{} steps released, {waits} grants told to wait",
        steps.len()
    );
    assert!(steps.len() >= WAVES, "steps {steps:?}");
    assert!(waits >= GRANTS, "{waits} told to wait");
    assert_eq!(steps.len() + waits, WAVES * GRANTS);
    let start = Instant::now();
    while released_in_audit(&audit).len() < steps.len() {
        assert!(start.elapsed() < PATIENCE, "releases missing from audit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let released = released_in_audit(&audit);
    assert_no_step_twice(&released);
    assert_eq!(
        released.iter().map(|(_, s)| *s).collect::<BTreeSet<_>>(),
        steps
    );
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_applied_through_one_replica_is_in_force_on_the_other() {
    let fx = Fixture::new();
    let audit = FakeAudit::default();
    let audit_server = start_fake_audit(&fx, audit.clone()).await;
    let pg = start_pg();
    let a = replica(&fx, "a", audit_server.addr, &pg).await;
    let b = replica(&fx, "b", audit_server.addr, &pg).await;
    wait_serving(&fx, &a).await;
    wait_serving(&fx, &b).await;
    // Both open on an empty database; version 1 applied through A.
    let names = accounts(2);
    let seeds = enroll_all(&fx, &a, &names, 30).await;
    let code = release(b.client(&fx), &fx.consented("acct-00", 1))
        .await
        .unwrap_or_else(|s| panic!("version 1 not in force on B: {s:?}"));
    assert_right_code(&seeds["acct-00"], &code);
    // Version 2 through B: in force on A, and version 1's statements no
    // longer release there.
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    fx.apply(b.addr, 2, &all).await;
    let stale = release(a.client(&fx), &fx.consented("acct-01", 1))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    assert!(
        stale
            .message()
            .contains("made under policy version 1, the active one is 2"),
        "{stale:?}"
    );
    let code = release(a.client(&fx), &fx.consented("acct-01", 2))
        .await
        .unwrap_or_else(|s| panic!("version 2 not in force on A: {s:?}"));
    assert_right_code(&seeds["acct-01"], &code);
    drop((a, b));
}

/// What a stream of calls saw.
#[derive(Default)]
struct Seen {
    /// (account, step) of each code released, and on which replica.
    codes: Vec<(String, u64, usize)>,
    /// Refusals: (replica, status).
    refused: Vec<(usize, Status)>,
}

impl std::fmt::Debug for Seen {
    /// The codes, and each distinct refusal once with its count.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut refusals: BTreeMap<(usize, String), usize> = BTreeMap::new();
        for (i, s) in &self.refused {
            *refusals
                .entry((*i, format!("{:?}: {}", s.code(), s.message())))
                .or_default() += 1;
        }
        f.debug_struct("Seen")
            .field("codes", &self.codes)
            .field("refusals (replica, status): count", &refusals)
            .finish()
    }
}

/// Waits until `done` holds of what the calls saw.
/// Fails with what they saw and the last lines of each replica's log.
async fn wait_seen(
    seen: &Mutex<Seen>,
    replicas: &[&Replica],
    what: &str,
    done: impl Fn(&Seen) -> bool,
) {
    let start = Instant::now();
    loop {
        let text = {
            let now = seen.lock().unwrap();
            if done(&now) {
                return;
            }
            format!("{now:?}")
        };
        if start.elapsed() > PATIENCE {
            let logs: Vec<String> = replicas.iter().map(|r| r.log_tail()).collect();
            panic!(
                "{what}: {text}\nthe replicas' logs:\n{}",
                logs.join("\n---\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Calls `clients` in turn (replica i = index) with a fresh grant for the
/// next account of `names` round robin, every `gap`, until `stop`; checks
/// every code against its seed.
fn spawn_calls(
    fx: Arc<Fixture>,
    clients: Vec<VaultServiceClient<Channel>>,
    seeds: BTreeMap<String, String>,
    gap: Duration,
    skip: Arc<Mutex<BTreeSet<usize>>>,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let names: Vec<String> = seeds.keys().cloned().collect();
        let mut n = 0usize;
        while !stop.load(Ordering::SeqCst) {
            let i = n % clients.len();
            let account = &names[(n / clients.len()) % names.len()];
            n += 1;
            if skip.lock().unwrap().contains(&i) {
                continue;
            }
            let r = fx.consented(account, 1);
            match release(clients[i].clone(), &r).await {
                Ok(code) => {
                    assert_right_code(&seeds[account], &code);
                    seen.lock()
                        .unwrap()
                        .codes
                        .push((account.clone(), code.step, i));
                }
                Err(s) => seen.lock().unwrap().refused.push((i, s)),
            }
            tokio::time::sleep(gap).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_in_the_middle_of_calls_leaves_the_other_releasing_and_loses_no_event() {
    let fx = Arc::new(Fixture::new());
    let audit = FakeAudit::default();
    let audit_server = start_fake_audit(&fx, audit.clone()).await;
    let pg = start_pg();
    let seeds = prepare(&fx, audit_server.addr, &pg, 4, 1).await;
    // A alone first: it takes the shipping lease.
    let mut a = replica(&fx, "a", audit_server.addr, &pg).await;
    wait_serving(&fx, &a).await;
    wait_for_log(&a, LEASED).await;
    let b = replica(&fx, "b", audit_server.addr, &pg).await;
    wait_serving(&fx, &b).await;

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let skip = Arc::new(Mutex::new(BTreeSet::new()));
    // Two callers, so that calls are in flight on A when it dies.
    let callers: Vec<_> = (0..2)
        .map(|_| {
            spawn_calls(
                fx.clone(),
                vec![a.client(&fx), b.client(&fx)],
                seeds.clone(),
                Duration::from_millis(40),
                skip.clone(),
                stop.clone(),
                seen.clone(),
            )
        })
        .collect();
    let start = Instant::now();
    while seen
        .lock()
        .unwrap()
        .codes
        .iter()
        .filter(|c| c.2 == 0)
        .count()
        < 4
    {
        assert!(start.elapsed() < PATIENCE, "A released nothing: {seen:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !b.log().contains(LEASED),
        "B shipped while A held the lease"
    );
    a.kill();
    let killed_at = Instant::now();
    skip.lock().unwrap().insert(0);
    let before = seen.lock().unwrap().codes.len();
    // B keeps releasing: the lease moves to it and its events are settled.
    while seen.lock().unwrap().codes.len() < before + 6 {
        assert!(
            killed_at.elapsed() < PATIENCE,
            "B stopped releasing after A died: {:?}\nB's log:\n{}",
            seen.lock().unwrap(),
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // B took the lease.
    wait_for_log(&b, LEASED).await;
    stop.store(true, Ordering::SeqCst);
    for caller in callers {
        caller.await.unwrap();
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    eprintln!(
        "codes {} ({} on A), refusals {:?}",
        seen.codes.len(),
        seen.codes.iter().filter(|c| c.2 == 0).count(),
        seen.refused
    );
    // Refusals: only calls to A as it died, or steps told to wait.
    for (i, s) in &seen.refused {
        assert!(
            *i == 0 || is_steps_used(s),
            "B refused a call: {s:?}\nB's log:\n{}",
            b.log()
        );
    }
    let codes: Vec<(String, u64)> = seen.codes.iter().map(|(a, s, _)| (a.clone(), *s)).collect();
    assert_no_step_twice(&codes);
    // Every event either replica committed reaches audit (A's through B,
    // which took the lease), and audit's log releases no step twice.
    let seqs = committed_seqs(&pg);
    wait_in_audit(&audit, &seqs).await;
    let released = released_in_audit(&audit);
    assert_no_step_twice(&released);
    for code in &codes {
        assert!(released.contains(code), "{code:?} released, not in audit");
    }
    // And every one settled: none left pending in the outbox.
    let start = Instant::now();
    while pg
        .pg
        .psql("vault", "SELECT count(*) FROM twokey_outbox_pending")
        .unwrap()
        != "0"
    {
        assert!(start.elapsed() < PATIENCE, "events left pending");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_during_calls_is_unavailable_then_releases_again_no_step_twice() {
    let fx = Arc::new(Fixture::new());
    let audit = FakeAudit::default();
    let audit_server = start_fake_audit(&fx, audit.clone()).await;
    let pg = start_pg();
    let seeds = prepare(&fx, audit_server.addr, &pg, 4, 1).await;
    let a = replica(&fx, "a", audit_server.addr, &pg).await;
    let b = replica(&fx, "b", audit_server.addr, &pg).await;
    wait_serving(&fx, &a).await;
    wait_serving(&fx, &b).await;

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let caller = spawn_calls(
        fx.clone(),
        vec![a.client(&fx), b.client(&fx)],
        seeds.clone(),
        Duration::from_millis(100),
        Arc::default(),
        stop.clone(),
        seen.clone(),
    );
    wait_seen(
        &seen,
        &[&a, &b],
        "codes from both before the restart",
        |s| (0..2).all(|i| s.codes.iter().filter(|c| c.2 == i).count() >= 2),
    )
    .await;
    pg.pg.stop().unwrap();
    let stopped = seen.lock().unwrap().refused.len();
    // Meanwhile: a clear UNAVAILABLE from both replicas, and no code.
    wait_seen(
        &seen,
        &[&a, &b],
        "a clear UNAVAILABLE from both while PostgreSQL is down",
        |s| {
            (0..2).all(|i| {
                s.refused[stopped..]
                    .iter()
                    .any(|(r, status)| *r == i && is_database_unavailable(status))
            })
        },
    )
    .await;
    let codes_while_down = seen.lock().unwrap().codes.len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Counted before the server starts: once it answers, codes may flow.
    let restarted = seen.lock().unwrap().codes.len();
    assert_eq!(
        codes_while_down, restarted,
        "a code released without PostgreSQL"
    );
    pg.pg.start_server().unwrap();
    wait_seen(&seen, &[&a, &b], "codes from both after the restart", |s| {
        (0..2).all(|i| s.codes[restarted..].iter().filter(|c| c.2 == i).count() >= 2)
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    caller.await.unwrap();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    eprintln!("{seen:?}");
    // Every refusal UNAVAILABLE: the database out of reach, or (for a call
    // in flight as it went) audit's acknowledgement not seen, or a step to
    // wait for; never a password.
    for (_, s) in &seen.refused {
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
        assert!(!s.message().contains(&pg.db.password), "{s:?}");
    }
    let codes: Vec<(String, u64)> = seen.codes.iter().map(|(a, s, _)| (a.clone(), *s)).collect();
    assert_no_step_twice(&codes);
    // Nothing committed is lost and audit's log releases no step twice.
    wait_in_audit(&audit, &committed_seqs(&pg)).await;
    let released = released_in_audit(&audit);
    assert_no_step_twice(&released);
    for code in &codes {
        assert!(released.contains(code), "{code:?} released, not in audit");
    }
    drop((a, b));
}

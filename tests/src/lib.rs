//! Harness for the end-to-end tests: the real `twokey-audit`, `twokey-vault`
//! and `twokey-broker` binaries as separate processes on loopback (through
//! `twokey_testkit::local::LocalSystem`), and mTLS gRPC clients for each user.
//!
//! Every flow the harness drives is signed as the real people sign it: each
//! person's OpenSSH key is `pki/NAME.ssh`, statements bind the policy
//! version WhoAmI names; the requester picks the request id, the approver
//! signs the request statement the broker shows, the operator picks the
//! grant id and the release id and binds exactly the approvals the broker
//! holds. New accounts go into the next version of the signed consent
//! policy, which the admins adam and anna sign and apply through the broker.
#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
    time::SystemTime,
};

use ed25519_dalek::VerifyingKey;
use tonic::transport::Channel;
use twokey_consent::{
    Binding, SignedStatement, approval_binding, new_id, new_statement, release_binding,
    request_binding, sign_statement, ssh_key::PrivateKey,
};
use twokey_proto::{
    audit::v1::{LogEntry, QueryRequest, audit_service_client::AuditServiceClient},
    broker::v1::broker_service_client::BrokerServiceClient,
};
use twokey_runtime::tls::TlsFiles;
use twokey_testkit::local::LocalSystem;

/// The local system's trust domain: statements are signed under
/// `twokey-consent@twokey.local`, policies under `twokey-policy@twokey.local`.
pub const TD: &str = twokey_testkit::local::TRUST_DOMAIN;

/// The SPIFFE ID of user `name` of the local system.
pub fn user_id(name: &str) -> String {
    format!("spiffe://{TD}/user/{name}")
}

/// Someone who signs consent statements with their own OpenSSH key, as the
/// real people do: their name, their SPIFFE ID and their private key.
#[derive(Clone)]
pub struct Signer {
    /// The name (`alice`).
    pub name: String,
    /// The SPIFFE ID statements name as signer.
    pub id: String,
    key: Arc<PrivateKey>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("name", &self.name)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// `name` with the OpenSSH private key at `path`.
    pub fn from_file(name: &str, path: &Path) -> Self {
        let key = PrivateKey::read_openssh_file(path)
            .unwrap_or_else(|e| panic!("{name}'s key {}: {e}", path.display()));
        Self::new(name, &user_id(name), key)
    }

    /// `name` as `id`, signing with `key`.
    pub fn new(name: &str, id: &str, key: PrivateKey) -> Self {
        Self {
            name: name.to_owned(),
            id: id.to_owned(),
            key: Arc::new(key),
        }
    }

    /// The same key, naming another SPIFFE ID as signer.
    pub fn as_id(&self, id: &str) -> Self {
        Self {
            id: id.to_owned(),
            ..self.clone()
        }
    }

    /// The private key.
    pub fn key(&self) -> &PrivateKey {
        &self.key
    }

    /// A statement binding `binding` under policy `version`, issued now,
    /// signed with this key (`sshsig`, namespace `twokey-consent@TD`).
    pub fn sign(&self, version: u64, binding: Binding) -> SignedStatement {
        self.sign_at(version, SystemTime::now(), binding)
    }

    /// [`Signer::sign`] with the statement issued at `at`.
    pub fn sign_at(&self, version: u64, at: SystemTime, binding: Binding) -> SignedStatement {
        sign_statement(
            &self.key,
            TD,
            &new_statement(version, &self.id, at, binding),
        )
        .unwrap_or_else(|e| panic!("{} cannot sign: {e}", self.name))
    }

    /// A request statement for a new request id (a UUID v4 the requester
    /// picks) on `account` for the signer themself, created now.
    pub fn request(
        &self,
        version: u64,
        account: &str,
        reason: &str,
        ticket: &str,
    ) -> SignedStatement {
        self.sign(
            version,
            request_binding(
                &new_id(),
                account,
                &self.id,
                reason,
                ticket,
                SystemTime::now(),
            ),
        )
    }

    /// An approval statement of `request` (a signed request statement).
    pub fn approve(&self, version: u64, request: &SignedStatement) -> SignedStatement {
        self.sign(
            version,
            approval_binding(request).expect("a request statement to approve"),
        )
    }

    /// An operator's release statement for `request` and exactly
    /// `approvals`, with a grant id and a release id the operator picks
    /// (`new_id()`); the grant id is the broker's grant id.
    pub fn release(
        &self,
        version: u64,
        request: &SignedStatement,
        approvals: &[SignedStatement],
    ) -> SignedStatement {
        self.release_for_grant(version, request, approvals, &new_id())
    }

    /// [`Signer::release`] with the grant id `grant_id`.
    pub fn release_for_grant(
        &self,
        version: u64,
        request: &SignedStatement,
        approvals: &[SignedStatement],
        grant_id: &str,
    ) -> SignedStatement {
        self.sign(
            version,
            release_binding(request, approvals, grant_id, &new_id())
                .expect("a request statement to release"),
        )
    }
}

/// The request id a signed request statement binds.
pub fn request_id_of(statement: &SignedStatement) -> String {
    twokey_consent::request_of(statement)
        .expect("a request statement")
        .request_id
}

/// The grant id a signed release statement binds.
pub fn grant_id_of(statement: &SignedStatement) -> String {
    match twokey_consent::decode_statement(&statement.statement)
        .expect("a statement")
        .binding
    {
        Some(Binding::Release(r)) => r.grant_id,
        other => panic!("not a release statement: {other:?}"),
    }
}

/// The directory holding the workspace's binaries, built (or found fresh)
/// once per test process.
pub fn bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/debug/deps/<test> → target/debug
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_owned();
        // A no-op when fresh (scripts/test builds them first); otherwise the
        // tests would start stale binaries.
        let status = twokey_testkit::ready::cargo_build_binaries(
            Path::new(env!("CARGO_MANIFEST_DIR")),
            false,
        )
        .expect("run cargo build");
        assert!(status.success(), "cargo build --workspace --bins failed");
        dir
    })
    .clone()
}

/// A running system in a temporary directory, stopped when dropped.
#[derive(Debug)]
pub struct System {
    /// The processes.
    pub local: LocalSystem,
    /// The PostgreSQL server of a replicated system
    /// ([`System::start_replicated`]), stopped after the processes.
    pub pg: Option<twokey_testkit::postgres::TestPostgres>,
    _dir: tempfile::TempDir,
}

impl Drop for System {
    /// When a test fails and `TWOKEY_E2E_LOGS=DIR` is set, keeps the
    /// services' logs (which go with the temporary directory) in
    /// `DIR/logs-PID-N`, and says where.
    fn drop(&mut self) {
        let Some(dir) = std::env::var_os("TWOKEY_E2E_LOGS") else {
            return;
        };
        if !std::thread::panicking() {
            return;
        }
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let to = Path::new(&dir).join(format!("logs-{}-{nanos}", std::process::id()));
        if std::fs::create_dir_all(Path::new(&dir)).is_ok() {
            let _ = std::process::Command::new("cp")
                .arg("-a")
                .arg(self.local.dir.join("logs"))
                .arg(&to)
                .status();
            eprintln!("the services' logs are kept in {}", to.display());
        }
    }
}

impl System {
    /// Starts audit, vault and broker.
    pub fn start() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().expect("tempdir");
        let local = LocalSystem::start(&dir.path().join("sys"), &bin_dir())
            .unwrap_or_else(|e| panic!("local system did not start: {e}"));
        Self {
            local,
            pg: None,
            _dir: dir,
        }
    }

    fn tls(&self, user: &str) -> TlsFiles {
        TlsFiles::in_dir(&self.local.dir.join("pki"), user)
    }

    /// An mTLS channel to `service` (`vault`, `broker` or `audit`)
    /// presenting `user`'s certificate.
    pub fn channel(&self, user: &str, service: &str) -> Channel {
        let address = match service {
            "vault" => &self.local.vault,
            "broker" => &self.local.broker,
            _ => &self.local.audit,
        };
        self.tls(user)
            .channel(address, service)
            .unwrap_or_else(|e| panic!("{service} channel: {e}"))
    }

    /// A broker client presenting `user`'s certificate.
    pub fn broker(&self, user: &str) -> BrokerServiceClient<Channel> {
        BrokerServiceClient::new(
            self.tls(user)
                .channel(&self.local.broker, "broker")
                .expect("broker channel"),
        )
    }

    /// An audit client presenting `user`'s certificate.
    pub fn audit(&self, user: &str) -> AuditServiceClient<Channel> {
        AuditServiceClient::new(
            self.tls(user)
                .channel(&self.local.audit, "audit")
                .expect("audit channel"),
        )
    }

    /// Every log entry, oldest first, read by the auditor `carol`.
    pub async fn log(&self) -> Vec<LogEntry> {
        let mut stream = self
            .audit("carol")
            .query(QueryRequest::default())
            .await
            .expect("query")
            .into_inner();
        let mut entries = Vec::new();
        while let Some(batch) = stream.message().await.expect("query stream") {
            entries.extend(batch.entries);
        }
        entries
    }

    /// The event sources and their public keys, from the audit config.
    pub fn sources(&self) -> BTreeMap<String, VerifyingKey> {
        let text = std::fs::read_to_string(&self.local.audit_config).expect("audit config");
        let table: toml::Table = text.parse().expect("audit config is TOML");
        table["sources"]
            .as_array()
            .expect("sources")
            .iter()
            .map(|s| {
                let id = s["id"].as_str().expect("id").to_owned();
                let key = twokey_runtime::keys::parse_public_key(
                    s["public_key"].as_str().expect("public_key"),
                )
                .expect("public key");
                (id, key)
            })
            .collect()
    }
}

impl System {
    /// Starts audit, vault and broker with extra environment variables
    /// (e.g. `OTEL_EXPORTER_OTLP_ENDPOINT`) set on each service.
    pub fn start_with_env(env: &[(&str, &str)]) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().expect("tempdir");
        let env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let local = LocalSystem::start_with_env(&dir.path().join("sys"), &bin_dir(), env)
            .unwrap_or_else(|e| panic!("local system did not start: {e}"));
        Self {
            local,
            pg: None,
            _dir: dir,
        }
    }

    /// Starts audit, vault and broker with audit's reconciler on
    /// (`LocalSystem::start_reconciling`, issue 20), notifications also to
    /// `webhook_url`.
    pub fn start_reconciling(webhook_url: Option<String>) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().expect("tempdir");
        let local = LocalSystem::start_reconciling(
            &dir.path().join("sys"),
            &bin_dir(),
            twokey_testkit::local::ReconcileOptions { webhook_url },
        )
        .unwrap_or_else(|e| panic!("local system did not start: {e}"));
        Self {
            local,
            pg: None,
            _dir: dir,
        }
    }

    /// What service `svc` (`audit`, `vault` or `broker`) wrote to its log.
    pub fn service_log(&self, svc: &str) -> String {
        std::fs::read_to_string(self.local.dir.join("logs").join(format!("{svc}.log")))
            .unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------
// Helpers for the fault and load tests (crash, disk, network, load).
// ---------------------------------------------------------------------------

/// The Base32 secret the fault and load tests enroll.
pub const SECRET: &str = "KRUGS4ZANFZSA5DIMUQHG5LQMVZCA43FMNZGK5BAONSWKZBAORXSAZDPEBWW65DIMVZA";

/// Events one enrollment adds to the log: the vault's and the broker's
/// `account.enrolled`.
pub const EVENTS_PER_ENROLLMENT: usize = 2;

/// The policy section of `account`: the local system's groups and rules
/// (`requesters`, `approvers`, `operators`, admins `adam` and `anna`, one
/// approval, one code per request).
pub fn account_policy(account: &str) -> String {
    format!(
        "\n[accounts.{account}]\nrequesters = [\"requesters\"]\napprovers = [\"approvers\"]\n\
         operators = [\"operators\"]\nadmins = [\"adam\", \"anna\"]\napprovals_required = 1\n\
         request_ttl = \"1h\"\nrelease_window = \"15m\"\ncodes_per_request = 1\n"
    )
}

/// How long one RPC of a test flow may take before the test calls it a hang.
pub const RPC_LIMIT: std::time::Duration = std::time::Duration::from_secs(20);

/// An independent TOTP computation of [`SECRET`] for `step` (SHA1, 6 digits, 30 s).
pub fn totp(step: u64) -> String {
    totp_of(SECRET, step)
}

/// An independent TOTP computation of Base32 `secret` for `step` (SHA1, 6
/// digits, 30 s).
pub fn totp_of(secret: &str, step: u64) -> String {
    let seed = data_encoding::BASE32_NOPAD
        .decode(secret.as_bytes())
        .expect("a Base32 secret");
    totp_rs::Builder::new()
        .with_secret(seed)
        .build_noncompliant()
        .generate(step * 30)
        .to_string()
}

/// The TOTP step (30 s) of the clock now, as the vault counts it.
pub fn current_step() -> u64 {
    unix_now() / 30
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Where a flow stopped, and the status it got there.
#[derive(Debug)]
pub struct FlowError {
    /// The step: `create`, `approve`, `pin`, `verify` or `release`.
    pub step: &'static str,
    /// The request, if it was filed.
    pub request_id: Option<String>,
    /// The status (a PIN that never arrived is `DEADLINE_EXCEEDED`).
    pub status: tonic::Status,
}

/// A finished flow: the request and the code it released.
#[derive(Debug)]
pub struct Released {
    /// The request.
    pub request_id: String,
    /// The code.
    pub code: twokey_proto::types::v1::Code,
}

/// The three people of one flow with their broker clients (one mTLS
/// channel each, reused across flows).
#[derive(Debug, Clone)]
pub struct Crew {
    /// The requester's policy name (its mailbox file is `<name>.jsonl`).
    pub requester: String,
    /// The account the crew's flows file requests for.
    pub account: String,
    requester_client: BrokerServiceClient<Channel>,
    approver: BrokerServiceClient<Channel>,
    operator: BrokerServiceClient<Channel>,
    /// The requester's key and identity.
    pub requester_signer: Signer,
    /// The approver's key and identity.
    pub approver_signer: Signer,
    /// The operator's key and identity.
    pub operator_signer: Signer,
    /// The policy version the crew signs under; `None` to ask WhoAmI at the
    /// start of each flow (as the CLI does).
    pub policy_version: Option<u64>,
}

/// Runs `call` with [`RPC_LIMIT`]; a call over the limit is
/// `DEADLINE_EXCEEDED` with a message saying it hung.
pub async fn bounded<T, F>(call: F) -> Result<T, tonic::Status>
where
    F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    match tokio::time::timeout(RPC_LIMIT, call).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "the test gave up after {RPC_LIMIT:?}: the call hung"
        ))),
    }
}

/// One step of the allowed request lifecycle (the diagram in DESIGN.md),
/// restated here as the tests' reference: the broker's states may stay or
/// move only along these arrows.
pub fn transition_allowed(
    from: twokey_proto::broker::v1::RequestState,
    to: twokey_proto::broker::v1::RequestState,
) -> bool {
    use twokey_proto::broker::v1::RequestState::*;
    from == to
        || matches!(
            (from, to),
            (Pending, Approved | Denied | Cancelled | Expired)
                | (Approved, Verified | Denied | Cancelled | Expired | Locked)
                | (Verified, Released | Expired)
        )
}

/// Checks one request as the broker reports it against the state machine:
/// its history moves only along allowed arrows from PENDING, it released
/// at most the codes it allows, a code (or RELEASED) only after
/// `pin.verified` and with an operator, RELEASED only with every code
/// released. Returns what is wrong.
pub fn check_request(r: &twokey_proto::broker::v1::Request) -> Result<(), String> {
    use twokey_proto::broker::v1::RequestState;
    let id = &r.request_id;
    let mut state = RequestState::Pending;
    let mut verified = false;
    let mut released_events = 0u32;
    for (i, h) in r.history.iter().enumerate() {
        let to = h.state();
        if i == 0 && (h.action != "request.created" || to != RequestState::Pending) {
            return Err(format!("{id}: history starts with {} {to:?}", h.action));
        }
        if !transition_allowed(state, to) {
            return Err(format!("{id}: {state:?} -> {to:?} by {}", h.action));
        }
        match h.action.as_str() {
            "pin.verified" => verified = true,
            "grant.issued" | "code.released" if !verified => {
                return Err(format!("{id}: {} before pin.verified", h.action));
            }
            "code.released" => released_events += 1,
            _ => {}
        }
        state = to;
    }
    if r.history.last().map(|h| h.state()) != Some(r.state()) {
        return Err(format!("{id}: state {:?} is not its history's", r.state()));
    }
    if r.codes_released > r.codes_allowed || released_events > r.codes_released {
        return Err(format!(
            "{id}: {} codes released ({released_events} code.released) of {} allowed",
            r.codes_released, r.codes_allowed
        ));
    }
    let state = r.state();
    if state == RequestState::Released && r.codes_released != r.codes_allowed {
        return Err(format!("{id}: RELEASED with {} codes", r.codes_released));
    }
    if matches!(state, RequestState::Verified | RequestState::Released)
        && (r.operator.is_empty() || (r.approvals.len() as u32) < r.approvals_required)
    {
        return Err(format!("{id}: {state:?} without operator or approvals"));
    }
    Ok(())
}

/// Checks that no code was released twice: the vault records
/// `code.released` once per grant id, once per release id, and once per
/// (account, TOTP step) that it did not take back: a `code.withheld` (the
/// code never left, audit did not acknowledge it) gives its step back, and
/// the step may be released again. Returns what is wrong.
pub fn check_single_use(log: &[LogEntry]) -> Result<(), String> {
    let mut grants = std::collections::BTreeSet::new();
    let mut releases = std::collections::BTreeSet::new();
    let mut steps = std::collections::BTreeSet::new();
    for e in log.iter().filter_map(|e| e.event.as_ref()) {
        if e.action == "code.withheld" && e.source.ends_with("/svc/vault") {
            let step = e.attributes.get("step").cloned().unwrap_or_default();
            steps.remove(&(e.account_id.clone(), step));
        }
        if e.action == "code.released" && e.source.ends_with("/svc/vault") {
            let attr = |name: &str| e.attributes.get(name).cloned().unwrap_or_default();
            let grant = attr("grant_id");
            if grant.is_empty() || !grants.insert(grant.clone()) {
                return Err(format!(
                    "grant {grant:?} released a code twice (or has no id)"
                ));
            }
            let release = attr("release_id");
            if !release.is_empty() && !releases.insert(release.clone()) {
                return Err(format!("release id {release:?} released a code twice"));
            }
            let step = attr("step");
            if !step.is_empty() && !steps.insert((e.account_id.clone(), step.clone())) {
                return Err(format!(
                    "step {step} of account {:?} was released twice",
                    e.account_id
                ));
            }
        }
    }
    Ok(())
}

/// Asserts that `before` (what an auditor read earlier) is still the start
/// of `after`, byte for byte.
pub fn assert_prefix(before: &[LogEntry], after: &[LogEntry], when: &str) {
    use prost::Message;
    assert!(
        after.len() >= before.len(),
        "{when}: the log shrank from {} to {} entries",
        before.len(),
        after.len()
    );
    for (a, b) in before.iter().zip(after) {
        assert_eq!(
            a.encode_to_vec(),
            b.encode_to_vec(),
            "{when}: entry {} changed",
            a.index
        );
    }
}

/// A small seeded generator (SplitMix64) so a failing run can be replayed
/// with its printed seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// From `TWOKEY_SEED` if set, otherwise from the clock; prints the seed.
    pub fn from_env(test: &str) -> Self {
        let seed = std::env::var("TWOKEY_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        println!("{test}: seed {seed} (replay with TWOKEY_SEED={seed})");
        Self(seed)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// `soak` when `TWOKEY_SOAK=1`, else `ci`.
pub fn soak_or(ci: usize, soak: usize) -> usize {
    if std::env::var("TWOKEY_SOAK").is_ok_and(|v| v == "1") {
        soak
    } else {
        ci
    }
}

/// Resident set size of process `pid` in KiB, from `/proc/<pid>/status`.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// Sends `signal` (e.g. `STOP`, `CONT`) to `pid` with kill(1).
pub fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

impl System {
    /// Starts audit, vault and broker after `prepare` has run on the
    /// system's (still empty) directory — e.g. to mount a small file system
    /// where a data directory will be.
    pub fn start_with(prepare: impl FnOnce(&Path)) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().expect("tempdir");
        let sys = dir.path().join("sys");
        std::fs::create_dir_all(&sys).expect("system dir");
        prepare(&sys);
        let local = LocalSystem::start(&sys, &bin_dir())
            .unwrap_or_else(|e| panic!("local system did not start: {e}"));
        Self {
            local,
            pg: None,
            _dir: dir,
        }
    }

    /// The temporary directory the system lives in (beside `local.dir`).
    pub fn root(&self) -> &Path {
        self._dir.path()
    }

    /// The process id of a running service.
    pub fn pid(&self, svc: &str) -> u32 {
        self.local
            .pid(svc)
            .unwrap_or_else(|| panic!("{svc} is not running"))
    }

    /// Kills `svc` with SIGKILL and starts it again on the same address.
    pub fn crash_and_restart(&mut self, svc: &str) {
        self.local.kill(svc);
        self.local
            .restart(&bin_dir(), svc)
            .unwrap_or_else(|e| panic!("{svc} does not restart: {e}"));
    }

    /// The admin enrolls [`SECRET`] as the local system's account.
    pub async fn enroll(&self) {
        self.enroll_accounts(&[twokey_testkit::local::ACCOUNT.to_owned()])
            .await;
    }

    /// The admin `adam` enrolls [`SECRET`] as each of `accounts` (which the
    /// policy must name, with `adam` an admin), one after the other. Each
    /// enrollment adds [`EVENTS_PER_ENROLLMENT`] events to the log.
    ///
    /// One at a time on purpose: 16 enrollments at once left the broker
    /// about 100 MB bigger after the load test's 200 flows (270 MB instead
    /// of 140–170 MB, over the test's 200 MB limit).
    pub async fn enroll_accounts(&self, accounts: &[String]) {
        let mut client = self.broker("adam");
        for account in accounts {
            bounded(
                client.enroll_account(twokey_proto::broker::v1::EnrollAccountRequest {
                    account_id: account.clone(),
                    seed: Some(
                        twokey_proto::broker::v1::enroll_account_request::Seed::Base32Secret(
                            SECRET.into(),
                        ),
                    ),
                    ..Default::default()
                }),
            )
            .await
            .unwrap_or_else(|e| panic!("the admin does not enroll {account}: {e:?}"));
        }
    }

    /// Adds each of `accounts` with the same people and rules as the local
    /// system's account: a section in the broker's own policy file (the
    /// broker is restarted, as it reads that file when it starts) and the
    /// account, copied from the local account's, in the next version of
    /// the signed consent policy, which adam and anna sign and apply
    /// through the broker.
    pub async fn add_accounts(&mut self, accounts: &[String]) {
        let path = self.local.dir.join("policy.toml");
        let mut policy = std::fs::read_to_string(&path).expect("policy");
        for account in accounts {
            policy.push_str(&account_policy(account));
        }
        std::fs::write(&path, policy).expect("write policy");
        self.crash_and_restart("broker");
        self.update_policy(|doc| {
            let local = account_section(doc, twokey_testkit::local::ACCOUNT);
            for account in accounts {
                accounts_table(doc).insert(account.clone(), local.clone().into());
            }
        })
        .await;
    }

    /// `pki/NAME.ssh` of the system: `name`'s OpenSSH private key.
    pub fn ssh_key_path(&self, name: &str) -> PathBuf {
        self.local.dir.join("pki").join(format!("{name}.ssh"))
    }

    /// `name`'s OpenSSH public key, `pki/NAME.ssh.pub`.
    pub fn public_key(&self, name: &str) -> twokey_consent::ssh_key::PublicKey {
        let path = self.local.dir.join("pki").join(format!("{name}.ssh.pub"));
        twokey_consent::ssh_key::PublicKey::read_openssh_file(&path)
            .unwrap_or_else(|e| panic!("{name}'s public key {}: {e}", path.display()))
    }

    /// `name` (a user of the system's PKI) with their key `pki/NAME.ssh`.
    pub fn signer(&self, name: &str) -> Signer {
        Signer::from_file(name, &self.ssh_key_path(name))
    }

    /// The active signed policy version, as the broker tells alice.
    pub async fn policy_version(&self) -> u64 {
        bounded(
            self.broker("alice")
                .who_am_i(twokey_proto::broker::v1::WhoAmIRequest {}),
        )
        .await
        .expect("whoami")
        .policy_version
    }

    /// The active signed policy document, as the broker returns it.
    pub async fn active_policy(&self) -> twokey_proto::broker::v1::PolicyDocument {
        bounded(
            self.broker("adam")
                .get_policy(twokey_proto::broker::v1::GetPolicyRequest {}),
        )
        .await
        .expect("the broker returns the policy")
        .applied
        .into_iter()
        .next()
        .expect("an applied policy version")
    }

    /// The next version of the signed policy: the active document with its
    /// version one higher and `edit` applied; not yet proposed.
    pub async fn next_policy(&self, edit: impl FnOnce(&mut toml::Table)) -> String {
        let active = self.active_policy().await;
        let mut doc: toml::Table = active.document.parse().expect("the policy is TOML");
        let version = doc["version"].as_integer().expect("a version") + 1;
        doc.insert("version".into(), version.into());
        edit(&mut doc);
        toml::to_string(&doc).expect("the policy serializes")
    }

    /// Makes the next policy version with `edit`, and has adam and anna sign
    /// and apply it through the broker; returns the new version.
    pub async fn update_policy(&self, edit: impl FnOnce(&mut toml::Table)) -> u64 {
        let document = self.next_policy(edit).await;
        let applied = self
            .apply_policy(&document, &["adam", "anna"])
            .await
            .unwrap_or_else(|(step, e)| panic!("the policy update failed at {step}: {e:?}"));
        assert_eq!(
            self.policy_version().await,
            applied.version,
            "the broker names the new version"
        );
        applied.version
    }

    /// Proposes `document` as adam, signs it as each of `signers` and
    /// applies it, all through the broker; the step that failed and its
    /// status otherwise.
    pub async fn apply_policy(
        &self,
        document: &str,
        signers: &[&str],
    ) -> Result<twokey_proto::broker::v1::PolicyDocument, (&'static str, tonic::Status)> {
        use twokey_proto::broker::v1::{
            ApplyPolicyRequest, ProposePolicyRequest, SignPolicyRequest,
        };
        let proposal = bounded(self.broker("adam").propose_policy(ProposePolicyRequest {
            document: document.to_owned(),
        }))
        .await
        .map_err(|e| ("propose", e))?
        .proposal
        .expect("the proposal");
        for name in signers {
            let signature =
                twokey_testkit::consent::sign_policy(self.signer(name).key(), TD, document);
            bounded(self.broker(name).sign_policy(SignPolicyRequest {
                version: proposal.version,
                signature,
            }))
            .await
            .map_err(|e| ("sign", e))?;
        }
        Ok(
            bounded(self.broker("adam").apply_policy(ApplyPolicyRequest {
                version: proposal.version,
            }))
            .await
            .map_err(|e| ("apply", e))?
            .policy
            .expect("the applied version"),
        )
    }

    /// A crew of `requester`, `approver` and `operator` (names with
    /// certificates in the system's PKI directory) for the local system's
    /// account.
    pub fn crew(&self, requester: &str, approver: &str, operator: &str) -> Crew {
        self.crew_for(
            twokey_testkit::local::ACCOUNT,
            requester,
            approver,
            operator,
        )
    }

    /// A crew of `requester`, `approver` and `operator` whose flows are for
    /// `account`.
    pub fn crew_for(&self, account: &str, requester: &str, approver: &str, operator: &str) -> Crew {
        Crew {
            requester: requester.to_owned(),
            account: account.to_owned(),
            requester_client: self.broker(requester),
            approver: self.broker(approver),
            operator: self.broker(operator),
            requester_signer: self.signer(requester),
            approver_signer: self.signer(approver),
            operator_signer: self.signer(operator),
            policy_version: None,
        }
    }

    /// Waits (at most `limit`, polling the mailbox file) for the newest PIN
    /// the broker delivered to `user` for `request_id`.
    pub async fn pin(
        &self,
        user: &str,
        request_id: &str,
        limit: std::time::Duration,
    ) -> Option<String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(pin) = self.local.pin_for(user, request_id) {
                return Some(pin);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// One whole flow for the crew's account, each person signing their
    /// own statement: the requester files with a request statement (under
    /// the policy version WhoAmI names), the approver signs an approval of
    /// the request statement the broker shows, the operator waits for the
    /// PIN (at most `pin_limit`), verifies it and releases with a release
    /// statement binding exactly the approvals the broker holds.
    pub async fn flow(
        &self,
        crew: &Crew,
        pin_limit: std::time::Duration,
    ) -> Result<Released, FlowError> {
        use twokey_proto::broker::v1::{
            ApproveRequestRequest, CreateRequestRequest, ReleaseCodeRequest, VerifyPinRequest,
            WhoAmIRequest,
        };
        fn fail(
            step: &'static str,
            id: Option<&String>,
        ) -> impl FnOnce(tonic::Status) -> FlowError {
            let request_id = id.cloned();
            move |status| FlowError {
                step,
                request_id,
                status,
            }
        }
        let mut c = crew.clone();
        let version = match crew.policy_version {
            Some(v) => v,
            None => {
                bounded(c.requester_client.who_am_i(WhoAmIRequest {}))
                    .await
                    .map_err(fail("create", None))?
                    .policy_version
            }
        };
        let (reason, ticket) = ("fault test", "OPS-7");
        let statement = crew
            .requester_signer
            .request(version, &crew.account, reason, ticket);
        let request = bounded(c.requester_client.create_request(CreateRequestRequest {
            account_id: crew.account.clone(),
            reason: reason.into(),
            ticket: ticket.into(),
            on_behalf_of: String::new(),
            statement: Some(statement),
        }))
        .await
        .map_err(fail("create", None))?
        .request
        .unwrap_or_default();
        let id = request.request_id.clone();
        let consent = consent_of(&request).map_err(fail("create", Some(&id)))?;
        bounded(c.approver.approve_request(ApproveRequestRequest {
            request_id: id.clone(),
            comment: "ok".into(),
            statement: Some(crew.approver_signer.approve(version, &consent.0)),
        }))
        .await
        .map_err(fail("approve", Some(&id)))?;
        let pin = self
            .pin(&crew.requester, &id, pin_limit)
            .await
            .ok_or_else(|| {
                fail("pin", Some(&id))(tonic::Status::deadline_exceeded("no PIN delivered in time"))
            })?;
        let verified = bounded(c.operator.verify_pin(VerifyPinRequest {
            request_id: id.clone(),
            pin,
            releases: Vec::new(),
        }))
        .await
        .map_err(fail("verify", Some(&id)))?
        .request
        .unwrap_or_default();
        let (req, approvals) = consent_of(&verified).map_err(fail("verify", Some(&id)))?;
        let released = bounded(c.operator.release_code(ReleaseCodeRequest {
            request_id: id.clone(),
            statement: Some(crew.operator_signer.release(version, &req, &approvals)),
        }))
        .await
        .map_err(fail("release", Some(&id)))?;
        let code = released.code.ok_or_else(|| {
            fail("release", Some(&id))(tonic::Status::internal("an answer without a code"))
        })?;
        Ok(Released {
            request_id: id,
            code,
        })
    }

    /// Every request, as the admin `adam` sees them (all pages).
    pub async fn all_requests(&self) -> Vec<twokey_proto::broker::v1::Request> {
        let mut client = self.broker("adam");
        let mut out = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = bounded(client.list_requests(
                twokey_proto::broker::v1::ListRequestsRequest {
                    page_size: 1000,
                    page_token: page_token.clone(),
                    ..Default::default()
                },
            ))
            .await
            .expect("the admin lists requests");
            out.extend(page.requests);
            if page.next_page_token.is_empty() {
                return out;
            }
            page_token = page.next_page_token;
        }
    }

    /// The current signed checkpoint.
    pub async fn checkpoint(&self) -> String {
        bounded(
            self.audit("carol")
                .get_checkpoint(twokey_proto::audit::v1::GetCheckpointRequest {}),
        )
        .await
        .expect("the auditor reads a checkpoint")
        .checkpoint
    }

    /// The log, checked: read after a checkpoint (so the checkpoint covers a
    /// prefix of it), every entry verified, the checkpoint's root matched;
    /// also checked against `earlier` checkpoints (a consistency check:
    /// the log still extends what they signed).
    pub async fn verified_log(&self, earlier: &[String]) -> Vec<LogEntry> {
        let checkpoint = self.checkpoint().await;
        let log = self.log().await;
        let verifier = twokey_audit::checkpoint::NoteVerifier::parse(&self.local.verifier_key)
            .expect("verifier key");
        let sources = self.sources();
        for note in earlier.iter().chain([&checkpoint]) {
            twokey_audit::verify::verify_log(&log, &sources, Some((note, &verifier)))
                .unwrap_or_else(|e| panic!("the log does not verify: {e}"));
        }
        log
    }

    /// A vault client presenting the broker's certificate.
    pub fn vault_as_broker(
        &self,
    ) -> twokey_proto::vault::v1::vault_service_client::VaultServiceClient<Channel> {
        twokey_proto::vault::v1::vault_service_client::VaultServiceClient::new(
            self.tls("broker")
                .channel(&self.local.vault, "vault")
                .expect("vault channel"),
        )
    }

    /// A release grant for the local system's account, signed with the
    /// broker's grant key (as the broker would), valid for 60 s.
    pub fn sign_grant(&self, grant_id: &str) -> twokey_proto::vault::v1::SignedGrant {
        self.sign_grant_for(twokey_testkit::local::ACCOUNT, grant_id)
    }

    /// A release grant for `account`, signed with the broker's grant key
    /// (as the broker would), valid for 60 s.
    pub fn sign_grant_for(
        &self,
        account: &str,
        grant_id: &str,
    ) -> twokey_proto::vault::v1::SignedGrant {
        self.sign_release_grant(grant_id, &format!("replay-{grant_id}"), account)
    }

    /// A release grant with id `grant_id` for request `request_id` on
    /// `account`, naming the local crew, signed with the broker's grant key
    /// (`keys/grant.key`), as the broker would.
    pub fn sign_release_grant(
        &self,
        grant_id: &str,
        request_id: &str,
        account: &str,
    ) -> twokey_proto::vault::v1::SignedGrant {
        let grant = twokey_testkit::grants::release(
            TD,
            grant_id,
            request_id,
            account,
            std::time::SystemTime::now(),
        );
        self.sign_with_grant_key(&grant)
    }

    /// `grant` signed with the broker's grant key.
    pub fn sign_with_grant_key(
        &self,
        grant: &twokey_proto::vault::v1::Grant,
    ) -> twokey_proto::vault::v1::SignedGrant {
        let key = twokey_runtime::keys::load_signing_key(&self.local.dir.join("keys/grant.key"))
            .expect("grant key");
        twokey_runtime::grant::sign_grant(&key, grant)
    }

    /// The consent for one code of `account` as alice, bob and olivia would
    /// sign it (a request id alice picks, bob's approval, olivia's release)
    /// under policy `version`, and the broker's grant carrying it: what the
    /// broker sends the vault after a real flow.
    pub fn signed_release(
        &self,
        version: u64,
        account: &str,
    ) -> (
        twokey_proto::vault::v1::SignedGrant,
        twokey_proto::vault::v1::ReleaseEvidence,
    ) {
        let request = self
            .signer("alice")
            .request(version, account, "direct release", "OPS-7");
        let approval = self.signer("bob").approve(version, &request);
        let release =
            self.signer("olivia")
                .release(version, &request, std::slice::from_ref(&approval));
        let evidence = twokey_proto::vault::v1::ReleaseEvidence {
            request: Some(request),
            approvals: vec![approval],
            release: Some(release),
        };
        (self.grant_for(&evidence), evidence)
    }

    /// The broker's release grant for `evidence`: the grant id its release
    /// statement binds, the request and account of its request statement.
    pub fn grant_for(
        &self,
        evidence: &twokey_proto::vault::v1::ReleaseEvidence,
    ) -> twokey_proto::vault::v1::SignedGrant {
        let request = evidence.request.as_ref().expect("a request statement");
        let binding = twokey_consent::request_of(request).expect("a request statement");
        let grant_id = grant_id_of(evidence.release.as_ref().expect("a release statement"));
        self.sign_release_grant(&grant_id, &binding.request_id, &binding.account_id)
    }
}

impl System {
    /// Reads the log until `done` holds for it (the sources ship their
    /// outboxes asynchronously), at most `limit`; returns the last read.
    pub async fn log_until(
        &self,
        limit: std::time::Duration,
        done: impl Fn(&[LogEntry]) -> bool,
    ) -> Vec<LogEntry> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let log = self.log().await;
            if done(&log) || tokio::time::Instant::now() >= deadline {
                return log;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

impl System {
    /// Reads the log until `done` holds for it and it has stopped growing
    /// (the same length on two reads 300 ms apart: the sources' outboxes
    /// are drained), at most `limit`; returns the last read.
    pub async fn settled_log(
        &self,
        limit: std::time::Duration,
        done: impl Fn(&[LogEntry]) -> bool,
    ) -> Vec<LogEntry> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut last = self.log().await;
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let log = self.log().await;
            let settled = log.len() == last.len() && done(&log);
            if settled || tokio::time::Instant::now() >= deadline {
                return log;
            }
            last = log;
        }
    }
}

impl System {
    /// Sets the vault's `audit_ack_timeout_ms` (how long a release waits for
    /// audit) and restarts the vault with it.
    pub fn set_vault_ack_timeout(&mut self, ms: u64) {
        let path = self.local.dir.join("vault.toml");
        let text = std::fs::read_to_string(&path).expect("vault config");
        let text: String = text
            .lines()
            .map(|l| {
                if l.starts_with("audit_ack_timeout_ms") {
                    format!("audit_ack_timeout_ms = {ms}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        std::fs::write(&path, text).expect("write vault config");
        self.crash_and_restart("vault");
    }
}

impl System {
    /// Files a request as alice, approves it as bob and verifies alice's PIN
    /// as olivia; returns it VERIFIED. Each step is [`bounded`].
    pub async fn verified_request(&self, reason: &str) -> twokey_proto::broker::v1::Request {
        self.verified_request_with_pin(reason).await.0
    }

    /// [`System::verified_request`] for `account` (which the policy names
    /// with the same people).
    pub async fn verified_request_for(
        &self,
        account: &str,
        reason: &str,
    ) -> twokey_proto::broker::v1::Request {
        self.verified_request_with_pin_for(account, reason).await.0
    }

    /// [`System::verified_request`], also returning the PIN alice received
    /// (for tests that search for it where it must not be).
    pub async fn verified_request_with_pin(
        &self,
        reason: &str,
    ) -> (twokey_proto::broker::v1::Request, String) {
        self.verified_request_with_pin_for(twokey_testkit::local::ACCOUNT, reason)
            .await
    }

    /// [`System::verified_request_with_pin`] for `account`.
    pub async fn verified_request_with_pin_for(
        &self,
        account: &str,
        reason: &str,
    ) -> (twokey_proto::broker::v1::Request, String) {
        use twokey_proto::broker::v1::{
            ApproveRequestRequest, CreateRequestRequest, RequestState, VerifyPinRequest,
        };
        let version = self.policy_version().await;
        let statement = self
            .signer("alice")
            .request(version, account, reason, "OPS-7");
        let request_id = request_id_of(&statement);
        let request = bounded(self.broker("alice").create_request(CreateRequestRequest {
            account_id: account.into(),
            reason: reason.into(),
            ticket: "OPS-7".into(),
            on_behalf_of: String::new(),
            statement: Some(statement),
        }))
        .await
        .expect("create")
        .request
        .expect("the created request");
        assert_eq!(
            request.request_id, request_id,
            "the broker files the request under the id alice signed"
        );
        let id = request.request_id.clone();
        let (req, _) = consent_of(&request).expect("the request statement");
        let approved = bounded(self.broker("bob").approve_request(ApproveRequestRequest {
            request_id: id.clone(),
            comment: "ok".into(),
            statement: Some(self.signer("bob").approve(version, &req)),
        }))
        .await
        .expect("approve")
        .request
        .expect("the approved request");
        assert_eq!(approved.state(), RequestState::Approved);
        let pin = self
            .pin("alice", &id, std::time::Duration::from_secs(10))
            .await
            .expect("a PIN delivered");
        let r = bounded(self.broker("olivia").verify_pin(VerifyPinRequest {
            request_id: id,
            pin: pin.clone(),
            releases: Vec::new(),
        }))
        .await
        .expect("verify")
        .request
        .expect("the verified request");
        assert_eq!(r.state(), RequestState::Verified);
        (r, pin)
    }

    /// Releases a code of request `id` as olivia, [`bounded`]: she reads
    /// the request's statements from the broker and signs a release
    /// statement binding them, with a grant id and a release id of her own.
    pub async fn release_as_operator(
        &self,
        id: &str,
    ) -> Result<twokey_proto::types::v1::Code, tonic::Status> {
        let statement = self.release_statement("olivia", id).await?;
        self.release_with(id, statement).await
    }

    /// A release statement for request `id` signed by `operator`, binding
    /// the request and approval statements the broker shows for it, under
    /// the active policy version.
    pub async fn release_statement(
        &self,
        operator: &str,
        id: &str,
    ) -> Result<SignedStatement, tonic::Status> {
        let request = bounded(self.broker(operator).get_request(
            twokey_proto::broker::v1::GetRequestRequest {
                request_id: id.into(),
            },
        ))
        .await?
        .request
        .unwrap_or_default();
        let (req, approvals) = consent_of(&request)?;
        let version = self.policy_version().await;
        Ok(self.signer(operator).release(version, &req, &approvals))
    }

    /// Releases a code of request `id` as olivia with `statement`, [`bounded`].
    pub async fn release_with(
        &self,
        id: &str,
        statement: SignedStatement,
    ) -> Result<twokey_proto::types::v1::Code, tonic::Status> {
        bounded(
            self.broker("olivia")
                .release_code(twokey_proto::broker::v1::ReleaseCodeRequest {
                    request_id: id.into(),
                    statement: Some(statement),
                }),
        )
        .await
        .map(|r| r.code.expect("a code"))
    }
}

/// The request statement and the approval statements (in the broker's
/// order) a request carries; INTERNAL if the broker's answer has none.
pub fn consent_of(
    request: &twokey_proto::broker::v1::Request,
) -> Result<(SignedStatement, Vec<SignedStatement>), tonic::Status> {
    let consent = request.consent.clone().unwrap_or_default();
    let req = consent.request.ok_or_else(|| {
        tonic::Status::internal(format!(
            "the broker's answer for request {:?} carries no request statement",
            request.request_id
        ))
    })?;
    Ok((req, consent.approvals))
}

/// The `[accounts]` table of a policy document.
pub fn accounts_table(doc: &mut toml::Table) -> &mut toml::Table {
    doc.entry("accounts")
        .or_insert_with(|| toml::Table::new().into())
        .as_table_mut()
        .expect("[accounts] is a table")
}

/// A copy of account `account`'s section of a policy document.
pub fn account_section(doc: &mut toml::Table, account: &str) -> toml::Table {
    accounts_table(doc)
        .get(account)
        .and_then(toml::Value::as_table)
        .unwrap_or_else(|| panic!("the policy has no account {account}"))
        .clone()
}

// ---------------------------------------------------------------------------
// A replicated system: two processes of each service on PostgreSQL (issue 18).
// ---------------------------------------------------------------------------

impl System {
    /// Starts a throwaway PostgreSQL set up with deploy/postgres/init.sql
    /// and two replicas of audit, vault and broker on it
    /// (`LocalSystem::start_replicated`), with `accounts` besides the local
    /// account in both policies (not enrolled). Panics, saying what to do,
    /// when PostgreSQL is not installed: scripts/test installs it.
    pub fn start_replicated(accounts: &[String]) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let pg = twokey_testkit::postgres::TestPostgres::start()
            .unwrap_or_else(|e| panic!("scripts/test installs PostgreSQL: {e}"));
        let replicated = twokey_testkit::ha::databases(&pg, accounts)
            .unwrap_or_else(|e| panic!("deploy/postgres/init.sql did not set up the server: {e}"));
        let dir = tempfile::tempdir().expect("tempdir");
        let local = LocalSystem::start_replicated(&dir.path().join("sys"), &bin_dir(), replicated)
            .unwrap_or_else(|e| panic!("the replicated system did not start: {e}"));
        Self {
            local,
            pg: Some(pg),
            _dir: dir,
        }
    }

    /// The last `lines` lines of every service's log (`logs/*.log`), each
    /// headed by its file name: for a failing test's message.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        let mut files: Vec<_> = std::fs::read_dir(self.local.dir.join("logs"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!("==> {} <==\n", file.display()));
            for line in &all[all.len().saturating_sub(lines)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// The PostgreSQL server of a replicated system.
    ///
    /// # Panics
    /// If the system is not replicated.
    pub fn postgres(&self) -> &twokey_testkit::postgres::TestPostgres {
        self.pg
            .as_ref()
            .expect("a replicated system has a PostgreSQL server")
    }

    /// A broker client presenting `user`'s certificate, to the broker at
    /// `address` (one replica, or a comma list).
    pub fn broker_at(&self, user: &str, address: &str) -> BrokerServiceClient<Channel> {
        BrokerServiceClient::new(
            self.tls(user)
                .channel(address, "broker")
                .expect("broker channel"),
        )
    }

    /// An audit client presenting `user`'s certificate, to the audit
    /// service at `address` (one replica, or a comma list).
    pub fn audit_at(&self, user: &str, address: &str) -> AuditServiceClient<Channel> {
        AuditServiceClient::new(
            self.tls(user)
                .channel(address, "audit")
                .expect("audit channel"),
        )
    }

    /// A vault client presenting the broker's certificate, to the vault at
    /// `address` (one replica, or a comma list).
    pub fn vault_at(
        &self,
        address: &str,
    ) -> twokey_proto::vault::v1::vault_service_client::VaultServiceClient<Channel> {
        twokey_proto::vault::v1::vault_service_client::VaultServiceClient::new(
            self.tls("broker")
                .channel(address, "vault")
                .expect("vault channel"),
        )
    }

    /// A crew of alice, bob and olivia for `account`, each person talking
    /// to the broker at their own address of `[requester, approver,
    /// operator]` (one replica, or a comma list).
    pub fn crew_at(&self, account: &str, addresses: [&str; 3]) -> Crew {
        let [requester, approver, operator] = ["alice", "bob", "olivia"];
        Crew {
            requester: requester.to_owned(),
            account: account.to_owned(),
            requester_client: self.broker_at(requester, addresses[0]),
            approver: self.broker_at(approver, addresses[1]),
            operator: self.broker_at(operator, addresses[2]),
            requester_signer: self.signer(requester),
            approver_signer: self.signer(approver),
            operator_signer: self.signer(operator),
            policy_version: None,
        }
    }

    /// Every log entry the audit replica at `address` serves, oldest first,
    /// read by the auditor `carol`; the failed call's status otherwise.
    pub async fn log_at(&self, address: &str) -> Result<Vec<LogEntry>, tonic::Status> {
        let mut stream = bounded(
            self.audit_at("carol", address)
                .query(QueryRequest::default()),
        )
        .await?;
        let mut entries = Vec::new();
        while let Some(batch) = stream.message().await? {
            entries.extend(batch.entries);
        }
        Ok(entries)
    }

    /// The signed checkpoint of the audit replica at `address`.
    pub async fn checkpoint_at(&self, address: &str) -> Result<String, tonic::Status> {
        bounded(
            self.audit_at("carol", address)
                .get_checkpoint(twokey_proto::audit::v1::GetCheckpointRequest {}),
        )
        .await
        .map(|c| c.checkpoint)
    }

    /// [`System::verified_log`] from the audit replica at `address` alone:
    /// its checkpoint read first, then its log, every entry verified and
    /// the checkpoint's root matched, also against `earlier` checkpoints.
    pub async fn verified_log_at(&self, address: &str, earlier: &[String]) -> Vec<LogEntry> {
        let checkpoint = self
            .checkpoint_at(address)
            .await
            .unwrap_or_else(|e| panic!("the auditor reads no checkpoint at {address}: {e:?}"));
        let log = self
            .log_at(address)
            .await
            .unwrap_or_else(|e| panic!("the auditor reads no log at {address}: {e:?}"));
        let verifier = twokey_audit::checkpoint::NoteVerifier::parse(&self.local.verifier_key)
            .expect("verifier key");
        let sources = self.sources();
        for note in earlier.iter().chain([&checkpoint]) {
            twokey_audit::verify::verify_log(&log, &sources, Some((note, &verifier)))
                .unwrap_or_else(|e| panic!("the log at {address} does not verify: {e}"));
        }
        log
    }
}

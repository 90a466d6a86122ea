//! Test harness: a dev PKI in a tempdir, a fake vault over mTLS, and the
//! broker in-process on 127.0.0.1:0 with a manual clock; clients per user.
#![allow(dead_code)]

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ed25519_dalek::{Signature, VerifyingKey};
use prost::Message;
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{
    Code, Request, Response, Status,
    transport::{Certificate, Channel, ClientTlsConfig},
};
use twokey_broker::{
    BrokerConfig, ServeOptions,
    config::{MailboxConfig, NotifyConfig},
};
use twokey_consent::{TrustRoot, VerifiedPolicy, verify_policy_update};
use twokey_proto::{
    broker::v1::{self as pb, broker_service_client::BrokerServiceClient},
    types::v1 as types,
    vault::v1::{self as vpb, GrantPurpose, vault_service_server::VaultService},
};
use twokey_runtime::{
    Authenticator,
    keys::{self, SecretKey},
    serve,
    start::StartError,
    time::{ManualClock, to_timestamp},
    tls::TlsFiles,
};
use twokey_testkit::pki::DevCa;

pub const TD: &str = "twokey.local";
pub const PROD: &str = "aws-prod-root";
/// Two approvals, two codes, ten-digit PINs.
pub const AUDIT: &str = "aws-audit-root";
pub const FAKE_CODE: &str = "492039";

pub const POLICY: &str = r#"
[identities]
alice = "spiffe://twokey.local/user/alice"
rita = "spiffe://twokey.local/user/rita"
bob = "spiffe://twokey.local/user/bob"
dave = "spiffe://twokey.local/user/dave"
olivia = "spiffe://twokey.local/user/olivia"
carol = "spiffe://twokey.local/user/carol"
adam = "spiffe://twokey.local/user/adam"
bpm = "spiffe://twokey.local/svc/bpm"

[groups]
requesters = ["alice", "rita"]
approvers = ["bob", "dave"]
operators = ["olivia", "bob", "rita"]
admins = ["adam"]

[accounts.aws-prod-root]
requesters = ["requesters"]
approvers = ["approvers"]
operators = ["operators"]
admins = ["admins"]
intake = ["bpm"]
approvals_required = 1
request_ttl = "1h"
release_window = "15m"
codes_per_request = 1
pin_length = 6
pin_max_attempts = 3
delivery = "operator"

[accounts.aws-audit-root]
requesters = ["requesters"]
approvers = ["approvers"]
operators = ["operators"]
admins = ["admins"]
approvals_required = 2
request_ttl = "1h"
release_window = "15m"
codes_per_request = 2
pin_length = 10
pin_max_attempts = 5
delivery = "operator"
"#;

/// What the fake vault saw and how it behaves.
#[derive(Debug, Default)]
pub struct VaultState {
    pub used_grants: Mutex<HashSet<String>>,
    pub grants: Mutex<Vec<vpb::Grant>>,
    pub audit_down: AtomicBool,
    /// The evidence of each GenerateCode call, in order.
    pub evidence: Mutex<Vec<Option<vpb::ReleaseEvidence>>>,
    /// The admin consent of each Enroll, RemoveAccount, SetAccountEnabled
    /// and RestoreAccount call, with the grant's purpose, in order.
    pub admin_consents: Mutex<Vec<(GrantPurpose, Option<vpb::AdminConsent>)>>,
    /// The `min_seconds_left` of each Enroll call, in order.
    pub min_seconds_left: Mutex<Vec<u32>>,
    /// The applied policy versions, newest first (what GetPolicy answers).
    pub policy: Mutex<Vec<vpb::PolicyVersion>>,
    /// Every ApplyPolicy call, in order.
    pub applies: Mutex<Vec<vpb::ApplyPolicyRequest>>,
    /// The pinned admins ApplyPolicy verifies from, as the real vault does.
    pub root: Mutex<Option<TrustRoot>>,
    /// GetPolicy calls answered.
    pub policy_reads: std::sync::atomic::AtomicU64,
    /// While set, GetPolicy answers UNAVAILABLE.
    pub policy_down: AtomicBool,
    /// How long GenerateCode takes before it answers (a slow vault).
    pub release_delay: Mutex<Duration>,
    /// Told when a GenerateCode call arrives.
    pub release_started: tokio::sync::Notify,
    /// The `grpc-timeout` of each GenerateCode call, in order.
    pub release_timeouts: Mutex<Vec<Option<String>>>,
}

/// The status a consent refusal kind maps to.
fn consent_status(kind: twokey_consent::ErrorKind, message: String) -> Status {
    match kind {
        twokey_consent::ErrorKind::InvalidArgument => Status::invalid_argument(message),
        twokey_consent::ErrorKind::FailedPrecondition => Status::failed_precondition(message),
        twokey_consent::ErrorKind::PermissionDenied => Status::permission_denied(message),
    }
}

/// The active version of a chain (newest first), verified from the root.
pub fn verify_chain(root: &TrustRoot, versions: &[vpb::PolicyVersion]) -> Option<VerifiedPolicy> {
    let mut current = None;
    for v in versions.iter().rev() {
        current = Some(
            verify_policy_update(current.as_ref(), root, v.document.as_bytes(), &v.signatures)
                .expect("the fake vault's chain verifies"),
        );
    }
    current
}

/// A vault that checks grants like the real one and answers with a fixed code.
#[derive(Debug, Clone)]
pub struct FakeVault {
    key: VerifyingKey,
    auth: Authenticator,
    clock: ManualClock,
    pub state: Arc<VaultState>,
}

impl FakeVault {
    fn check(
        &self,
        signed: Option<vpb::SignedGrant>,
        purpose: GrantPurpose,
    ) -> Result<vpb::Grant, Status> {
        let signed = signed.ok_or_else(|| Status::invalid_argument("no grant"))?;
        let signature = Signature::from_slice(&signed.signature)
            .map_err(|_| Status::permission_denied("grant signature malformed"))?;
        self.key
            .verify_strict(&signed.grant, &signature)
            .map_err(|_| Status::permission_denied("grant signature does not verify"))?;
        let grant = vpb::Grant::decode(signed.grant.as_slice())
            .map_err(|_| Status::invalid_argument("grant does not decode"))?;
        if grant.purpose != purpose as i32 {
            return Err(Status::permission_denied("wrong grant purpose"));
        }
        let issued = grant.issued_at.unwrap().seconds;
        let expires = grant.expires_at.unwrap().seconds;
        let now = to_timestamp(twokey_runtime::time::Clock::now(&self.clock)).seconds;
        assert!(expires - issued <= 60, "grant lives more than 60 s");
        if now > expires {
            return Err(Status::permission_denied("grant expired"));
        }
        if !self
            .state
            .used_grants
            .lock()
            .unwrap()
            .insert(grant.grant_id.clone())
        {
            return Err(Status::permission_denied("grant already used"));
        }
        self.state.grants.lock().unwrap().push(grant.clone());
        Ok(grant)
    }
}

fn code() -> types::Code {
    types::Code {
        code: FAKE_CODE.into(),
        step: 1,
        period: 30,
        valid_from: None,
        valid_until: None,
    }
}

#[tonic::async_trait]
impl VaultService for FakeVault {
    async fn enroll(
        &self,
        request: Request<vpb::EnrollRequest>,
    ) -> Result<Response<vpb::EnrollResponse>, Status> {
        self.auth.authorize(&request, "the broker", |id| {
            id.as_str() == "spiffe://twokey.local/svc/broker"
        })?;
        let r = request.into_inner();
        self.state
            .admin_consents
            .lock()
            .unwrap()
            .push((GrantPurpose::Enroll, r.consent.clone()));
        self.state
            .min_seconds_left
            .lock()
            .unwrap()
            .push(r.min_seconds_left);
        Ok(Response::new(vpb::EnrollResponse {
            account: Some(types::Account {
                account_id: r.account_id,
                issuer: r.actor,
                ..Default::default()
            }),
            current: Some(code()),
            next: Some(code()),
            warnings: vec![],
        }))
    }

    async fn generate_code(
        &self,
        request: Request<vpb::GenerateCodeRequest>,
    ) -> Result<Response<vpb::GenerateCodeResponse>, Status> {
        self.auth.authorize(&request, "the broker", |id| {
            id.as_str() == "spiffe://twokey.local/svc/broker"
        })?;
        let timeout = request.metadata().get("grpc-timeout");
        let timeout = timeout.and_then(|t| t.to_str().ok()).map(str::to_owned);
        self.state.release_timeouts.lock().unwrap().push(timeout);
        self.state.release_started.notify_one();
        let delay = *self.state.release_delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        if self.state.audit_down.load(Ordering::SeqCst) {
            return Err(Status::unavailable(
                "audit unavailable: event 7 not acknowledged in time; no code was released",
            ));
        }
        let request = request.into_inner();
        let grant = self.check(request.grant, GrantPurpose::Release)?;
        self.state.evidence.lock().unwrap().push(request.evidence);
        Ok(Response::new(vpb::GenerateCodeResponse {
            code: Some(code()),
            grant_id: grant.grant_id,
        }))
    }

    async fn list_accounts(
        &self,
        request: Request<vpb::ListAccountsRequest>,
    ) -> Result<Response<vpb::ListAccountsResponse>, Status> {
        self.auth.authorize(&request, "the broker", |id| {
            id.as_str() == "spiffe://twokey.local/svc/broker"
        })?;
        Ok(Response::new(vpb::ListAccountsResponse {
            accounts: [PROD, AUDIT, "not-in-policy"]
                .into_iter()
                .map(|id| types::Account {
                    account_id: id.into(),
                    ..Default::default()
                })
                .collect(),
        }))
    }

    async fn remove_account(
        &self,
        request: Request<vpb::RemoveAccountRequest>,
    ) -> Result<Response<vpb::RemoveAccountResponse>, Status> {
        self.auth.authorize(&request, "the broker", |id| {
            id.as_str() == "spiffe://twokey.local/svc/broker"
        })?;
        let request = request.into_inner();
        let grant = self.check(request.grant, GrantPurpose::Remove)?;
        self.state
            .admin_consents
            .lock()
            .unwrap()
            .push((GrantPurpose::Remove, request.consent));
        Ok(Response::new(vpb::RemoveAccountResponse {
            account_id: grant.account_id,
        }))
    }

    async fn set_account_enabled(
        &self,
        request: Request<vpb::SetAccountEnabledRequest>,
    ) -> Result<Response<vpb::SetAccountEnabledResponse>, Status> {
        self.auth.authorize(&request, "the broker", |id| {
            id.as_str() == "spiffe://twokey.local/svc/broker"
        })?;
        let request = request.into_inner();
        let grant = self.check(request.grant, GrantPurpose::SetEnabled)?;
        self.state
            .admin_consents
            .lock()
            .unwrap()
            .push((GrantPurpose::SetEnabled, request.consent));
        Ok(Response::new(vpb::SetAccountEnabledResponse {
            account: Some(types::Account {
                account_id: grant.account_id,
                disabled: !request.enabled,
                ..Default::default()
            }),
        }))
    }

    async fn restore_account(
        &self,
        request: Request<vpb::RestoreAccountRequest>,
    ) -> Result<Response<vpb::RestoreAccountResponse>, Status> {
        self.auth.authorize(&request, "the broker", |id| {
            id.as_str() == "spiffe://twokey.local/svc/broker"
        })?;
        let request = request.into_inner();
        let grant = self.check(request.grant, GrantPurpose::Restore)?;
        self.state
            .admin_consents
            .lock()
            .unwrap()
            .push((GrantPurpose::Restore, request.consent));
        Ok(Response::new(vpb::RestoreAccountResponse {
            account: Some(types::Account {
                account_id: grant.account_id,
                ..Default::default()
            }),
        }))
    }

    async fn apply_policy(
        &self,
        request: Request<vpb::ApplyPolicyRequest>,
    ) -> Result<Response<vpb::ApplyPolicyResponse>, Status> {
        self.auth.authorize(&request, "the broker", |id| {
            id.as_str() == "spiffe://twokey.local/svc/broker"
        })?;
        let request = request.into_inner();
        self.state.applies.lock().unwrap().push(request.clone());
        let root = self
            .state
            .root
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| Status::failed_precondition("the fake vault has no root"))?;
        let mut chain = self.state.policy.lock().unwrap();
        let current = verify_chain(&root, &chain);
        let verified = verify_policy_update(
            current.as_ref(),
            &root,
            request.document.as_bytes(),
            &request.signatures,
        )
        .map_err(|e| consent_status(e.kind(), e.to_string()))?;
        let version = vpb::PolicyVersion {
            version: verified.version(),
            document: request.document,
            signatures: request.signatures,
            signed_by: verified.signed_by().to_vec(),
            digest: verified.digest().to_vec(),
            applied_at: Some(to_timestamp(twokey_runtime::time::Clock::now(&self.clock))),
        };
        chain.insert(0, version.clone());
        Ok(Response::new(vpb::ApplyPolicyResponse {
            policy: Some(version),
        }))
    }

    async fn get_policy(
        &self,
        request: Request<vpb::GetPolicyRequest>,
    ) -> Result<Response<vpb::GetPolicyResponse>, Status> {
        self.auth.authorize(&request, "the broker", |id| {
            id.as_str() == "spiffe://twokey.local/svc/broker"
        })?;
        if self.state.policy_down.load(Ordering::SeqCst) {
            return Err(Status::unavailable("the fake vault's policy is down"));
        }
        self.state.policy_reads.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(vpb::GetPolicyResponse {
            versions: self.state.policy.lock().unwrap().clone(),
        }))
    }

    async fn status(
        &self,
        _: Request<vpb::StatusRequest>,
    ) -> Result<Response<vpb::StatusResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// The signed-policy side of a harness: the pinned admins and the versions
/// the fake vault holds (newest first).
#[derive(Debug, Clone)]
pub struct ConsentSetup {
    pub admins_allowed_signers: String,
    pub threshold: u32,
    pub versions: Vec<vpb::PolicyVersion>,
}

/// Stops a running server when dropped.
struct StopOnDrop(Option<Running>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(running) = self.0.take() {
            let _ = running.stop.send(());
            running.task.abort();
        }
    }
}

/// A running server task with its shutdown trigger.
struct Running {
    addr: SocketAddr,
    /// The HTTP/JSON listener (brokers only).
    http_addr: Option<SocketAddr>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), String>>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task
            .await
            .expect("server task panicked")
            .expect("server failed");
    }
}

/// The PKI, keys, fake vault and broker of one test.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub clock: ManualClock,
    pub vault: Arc<VaultState>,
    pub config: BrokerConfig,
    pub deliveries: tokio::sync::watch::Sender<u64>,
    /// Counts `access.denied` events written for strangers' refusals.
    pub refusal_events: tokio::sync::watch::Sender<u64>,
    broker: Option<Running>,
    vault_server: Option<Running>,
}

pub fn pki_dir(root: &Path) -> PathBuf {
    root.join("pki")
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with_policy(POLICY).await
    }

    pub async fn start_with_policy(policy: &str) -> Self {
        Self::start_with(policy, None).await
    }

    /// A harness whose broker has `[consent]` (the pinned admins of
    /// `consent`) and whose fake vault serves `consent`'s versions.
    pub async fn start_with(policy: &str, consent: Option<ConsentSetup>) -> Self {
        let mut h = Self::prepare(
            policy,
            consent,
            UNIX_EPOCH + Duration::from_secs(1_900_000_000),
        )
        .await;
        h.start_broker().await;
        h
    }

    /// The PKI, keys, policy and fake vault (its clock at `now`), with no
    /// broker started yet.
    pub async fn prepare(policy: &str, consent: Option<ConsentSetup>, now: SystemTime) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let pki = pki_dir(dir.path());
        std::fs::create_dir_all(&pki).unwrap();
        let ca = DevCa::new(TD).unwrap();
        ca.write(&pki).unwrap();
        for svc in ["broker", "vault"] {
            ca.issue_service(TD, svc).unwrap().write(&pki, svc).unwrap();
        }
        for user in [
            "alice", "rita", "bob", "dave", "olivia", "carol", "adam", "anna", "mallory",
        ] {
            ca.issue_user(TD, user).unwrap().write(&pki, user).unwrap();
        }
        // An intake service's certificate: spiffe://twokey.local/svc/bpm.
        ca.issue_service(TD, "bpm")
            .unwrap()
            .write(&pki, "bpm")
            .unwrap();
        let keys_dir = dir.path().join("keys");
        std::fs::create_dir_all(&keys_dir).unwrap();
        let grant = keys::generate_signing_key(&keys_dir.join("grant.key")).unwrap();
        keys::generate_signing_key(&keys_dir.join("event.key")).unwrap();
        SecretKey::generate()
            .write(&keys_dir.join("pin.key"))
            .unwrap();
        std::fs::write(dir.path().join("policy.toml"), policy).unwrap();

        let clock = ManualClock::new(now);
        let vault = Arc::new(VaultState::default());
        let fake = FakeVault {
            key: grant.verifying_key(),
            auth: Authenticator::new(TD),
            clock: clock.clone(),
            state: vault.clone(),
        };
        let consent_config = consent.map(|c| {
            let file = dir.path().join("admins.allowed_signers");
            std::fs::write(&file, &c.admins_allowed_signers).unwrap();
            *vault.root.lock().unwrap() = Some(
                TrustRoot::from_allowed_signers(TD, &c.admins_allowed_signers, c.threshold)
                    .unwrap(),
            );
            *vault.policy.lock().unwrap() = c.versions;
            twokey_broker::config::ConsentConfig {
                admins_file: file,
                threshold: c.threshold,
            }
        });
        let vault_server = start_vault(fake, &TlsFiles::in_dir(&pki, "vault")).await;
        let config = BrokerConfig {
            listen: "127.0.0.1:0".into(),
            http_listen: None,
            trust_domain: TD.into(),
            data_dir: dir.path().join("data"),
            policy_file: dir.path().join("policy.toml"),
            grant_key_file: keys_dir.join("grant.key"),
            event_key_file: keys_dir.join("event.key"),
            pin_key_file: keys_dir.join("pin.key"),
            vault_address: format!("https://{}", vault_server.addr),
            vault_server_name: "vault".into(),
            // Not the default, so that a test sees the setting is what is sent.
            release_deadline_ms: 3400,
            audit_address: None,
            audit_server_name: "audit".into(),
            audit_checkpoint_key: None,
            audit_keep_days: 30,
            log_format: Default::default(),
            tls: TlsFiles::in_dir(&pki, "broker"),
            notify: NotifyConfig {
                mailbox: Some(MailboxConfig {
                    dir: dir.path().join("mailbox"),
                }),
                webhook: None,
                slack: None,
            },
            sweep_interval: Duration::from_secs(3600),
            findings_interval: Duration::from_secs(3600),
            consent: consent_config,
            store: Default::default(),
        };
        Self {
            dir,
            clock,
            vault,
            config,
            deliveries: tokio::sync::watch::Sender::new(0),
            refusal_events: tokio::sync::watch::Sender::new(0),
            broker: None,
            vault_server: Some(vault_server),
        }
    }

    pub async fn start_broker(&mut self) {
        assert!(self.broker.is_none());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let http_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_addr = Some(http_listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let options = ServeOptions {
            clock: Arc::new(self.clock.clone()),
            deliveries: Some(self.deliveries.clone()),
            http_listener: Some(http_listener),
            refusal_events: Some(self.refusal_events.clone()),
            ..ServeOptions::default()
        };
        let config = self.config.clone();
        let task = tokio::spawn(async move {
            twokey_broker::serve(config, options, listener, async {
                let _ = stopped.await;
            })
            .await
            .map_err(|e: StartError| e.to_string())
        });
        self.broker = Some(Running {
            addr,
            http_addr,
            stop,
            task,
        });
    }

    /// Stops the broker (waiting for it to close its database).
    pub async fn stop_broker(&mut self) {
        if let Some(b) = self.broker.take() {
            b.stop().await;
        }
    }

    /// Stops and starts the broker on the same data directory.
    pub async fn restart_broker(&mut self) {
        self.stop_broker().await;
        self.start_broker().await;
    }

    pub async fn shutdown(mut self) {
        self.stop_broker().await;
        if let Some(v) = self.vault_server.take() {
            v.stop().await;
        }
    }

    /// Another fake vault with the same grant key and its own state (a
    /// second vault replica), served over mTLS on loopback: its address and
    /// state; stopped when the returned guard is dropped.
    pub async fn another_vault(&self) -> (SocketAddr, Arc<VaultState>, impl Drop) {
        let grant = keys::load_signing_key(&self.dir.path().join("keys/grant.key")).unwrap();
        let state = Arc::new(VaultState::default());
        let fake = FakeVault {
            key: grant.verifying_key(),
            auth: Authenticator::new(TD),
            clock: self.clock.clone(),
            state: state.clone(),
        };
        let running =
            start_vault(fake, &TlsFiles::in_dir(&pki_dir(self.dir.path()), "vault")).await;
        let addr = running.addr;
        (addr, state, StopOnDrop(Some(running)))
    }

    pub fn addr(&self) -> SocketAddr {
        self.broker.as_ref().expect("broker running").addr
    }

    /// The broker's HTTP/JSON listener.
    pub fn http_addr(&self) -> SocketAddr {
        self.broker
            .as_ref()
            .and_then(|b| b.http_addr)
            .expect("broker running")
    }

    pub fn client(&self, user: &str) -> BrokerServiceClient<Channel> {
        let channel = TlsFiles::in_dir(&pki_dir(self.dir.path()), user)
            .channel(&format!("https://{}", self.addr()), "broker")
            .unwrap();
        BrokerServiceClient::new(channel)
    }

    /// A client that trusts the CA but presents no certificate.
    pub fn anonymous_client(&self) -> BrokerServiceClient<Channel> {
        let ca = std::fs::read(pki_dir(self.dir.path()).join("ca.crt")).unwrap();
        let channel = twokey_runtime::tls::endpoint(&format!("https://{}", self.addr()))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .domain_name("broker"),
            )
            .unwrap()
            .connect_lazy();
        BrokerServiceClient::new(channel)
    }

    pub fn mailbox_dir(&self) -> PathBuf {
        self.config.notify.mailbox.as_ref().unwrap().dir.clone()
    }

    /// Every PIN delivered to `user` for `request_id` and still in the
    /// mailbox (a PIN no longer live is taken out), oldest first.
    pub fn pins_in_mailbox(&self, user: &str, request_id: &str) -> Vec<String> {
        let Ok(text) = std::fs::read_to_string(self.mailbox_dir().join(format!("{user}.jsonl")))
        else {
            return Vec::new();
        };
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["request_id"] == request_id && v["kind"] == "pin")
            .filter_map(|v| v["pin"].as_str().map(str::to_owned))
            .collect()
    }

    /// Waits (on the delivery counter, not a timer) until `user`'s mailbox
    /// holds no PIN for `request_id` any more.
    pub async fn wait_for_pins_gone(&self, user: &str, request_id: &str) {
        let mut rx = self.deliveries.subscribe();
        let wait = async {
            while !self.pins_in_mailbox(user, request_id).is_empty() {
                rx.changed().await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .expect("the PIN stayed in the mailbox")
    }

    /// Waits (on the delivery counter, not a timer) until `user` has `n`
    /// PINs for `request_id`; returns the newest.
    pub async fn wait_for_pin(&self, user: &str, request_id: &str, n: usize) -> String {
        let mut rx = self.deliveries.subscribe();
        let wait = async {
            loop {
                let pins = self.pins_in_mailbox(user, request_id);
                if pins.len() >= n {
                    return pins.last().unwrap().clone();
                }
                rx.changed().await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .expect("the PIN never reached the mailbox")
    }

    /// Messages of `kind` in `user`'s mailbox (`channel` for the channel) about `request_id`.
    pub fn messages(&self, user: &str, request_id: &str, kind: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.mailbox_dir().join(format!("{user}.jsonl")))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["request_id"] == request_id && v["kind"] == kind)
            .collect()
    }

    /// Waits (on the delivery counter) for a message of `kind` to `user`.
    pub async fn wait_for_message(
        &self,
        user: &str,
        request_id: &str,
        kind: &str,
    ) -> serde_json::Value {
        let mut rx = self.deliveries.subscribe();
        let wait = async {
            loop {
                if let Some(m) = self.messages(user, request_id, kind).pop() {
                    return m;
                }
                rx.changed().await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .unwrap_or_else(|_| panic!("no {kind} message reached {user}"))
    }

    /// Every event the broker wrote to its outbox, each signature checked,
    /// in order (sequence numbers from 1 without gaps). The broker must be
    /// stopped: its database is locked while it runs.
    pub fn stored_events(&self) -> Vec<twokey_proto::audit::v1::Event> {
        let db = twokey_runtime::durable::DurableDb::open(&self.config.data_dir).unwrap();
        let key = keys::load_signing_key(&self.config.event_key_file).unwrap();
        let signer = twokey_runtime::events::EventSigner::new(
            twokey_runtime::SpiffeId::parse("spiffe://twokey.local/svc/broker").unwrap(),
            key.clone(),
        );
        let outbox = twokey_runtime::outbox::Outbox::open(
            &db,
            signer,
            Arc::new(twokey_runtime::time::SystemClock),
        )
        .unwrap();
        let events: Vec<_> = outbox
            .pending(0, usize::MAX)
            .into_iter()
            .map(|(seq, signed)| {
                let e =
                    twokey_runtime::events::verify_event(&signed, &key.verifying_key()).unwrap();
                assert_eq!(e.seq, seq);
                e
            })
            .collect();
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>(), "gaps");
        events
    }

    /// Waits (on the counter, not a timer) until the broker has written `n`
    /// events for strangers' refusals in all.
    pub async fn wait_for_refusal_events(&self, n: u64) {
        let mut rx = self.refusal_events.subscribe();
        tokio::time::timeout(
            Duration::from_secs(20),
            rx.wait_for(|written| *written >= n),
        )
        .await
        .unwrap_or_else(|_| panic!("the broker never wrote {n} refusal events"))
        .unwrap();
    }

    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    pub fn now(&self) -> SystemTime {
        twokey_runtime::time::Clock::now(&self.clock)
    }
}

async fn start_vault(fake: FakeVault, tls: &TlsFiles) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let tls = tls
        .server_tls(twokey_runtime::tls::ClientAuth::Required)
        .unwrap();
    let mut server = serve::server().unwrap();
    let task = tokio::spawn(async move {
        server
            .add_service(vpb::vault_service_server::VaultServiceServer::new(fake))
            .serve_with_incoming_shutdown(serve::incoming(listener, tls), async {
                let _ = stopped.await;
            })
            .await
            .map_err(|e| e.to_string())
    });
    Running {
        addr,
        http_addr: None,
        stop,
        task,
    }
}

/// The gRPC code of a failed call, with its message for assertions.
/// A broker answer that carries the request it changed or read.
pub trait CarriesRequest {
    /// The request in the answer.
    fn into_request(self) -> Option<pb::Request>;
}

macro_rules! carries_request {
    ($($answer:ty),+) => {$(
        impl CarriesRequest for $answer {
            fn into_request(self) -> Option<pb::Request> {
                self.request
            }
        }
    )+};
}

carries_request!(
    pb::CreateRequestResponse,
    pb::GetRequestResponse,
    pb::ApproveRequestResponse,
    pb::DenyRequestResponse,
    pb::CancelRequestResponse,
    pb::VerifyPinResponse,
    pb::ShowPinResponse
);

/// The request of a successful answer; panics (failing the test) on an
/// error status or an answer without a request.
pub fn request_of<T: CarriesRequest>(answer: Result<Response<T>, Status>) -> pb::Request {
    answer
        .expect("the call succeeds")
        .into_inner()
        .into_request()
        .expect("the answer carries the request")
}

pub fn code_of<T: std::fmt::Debug>(result: Result<Response<T>, Status>) -> (Code, String) {
    match result {
        Ok(r) => panic!("expected an error, got {r:?}"),
        Err(s) => (s.code(), s.message().to_owned()),
    }
}

pub fn state_of(request: &pb::Request) -> pb::RequestState {
    pb::RequestState::try_from(request.state).unwrap()
}

/// Files a request as `requester` for `account`; returns its id.
pub async fn file(h: &Harness, requester: &str, account: &str) -> String {
    let r = request_of(
        h.client(requester)
            .create_request(pb::CreateRequestRequest {
                account_id: account.into(),
                reason: "rotate the root password".into(),
                ticket: "OPS-1".into(),
                on_behalf_of: String::new(),
                statement: None,
            })
            .await,
    );
    assert_eq!(state_of(&r), pb::RequestState::Pending);
    r.request_id
}

pub async fn approve(
    h: &Harness,
    approver: &str,
    id: &str,
) -> Result<Response<pb::ApproveRequestResponse>, Status> {
    h.client(approver)
        .approve_request(pb::ApproveRequestRequest {
            request_id: id.into(),
            comment: "ok".into(),
            statement: None,
        })
        .await
}

pub async fn verify(
    h: &Harness,
    operator: &str,
    id: &str,
    pin: &str,
) -> Result<Response<pb::VerifyPinResponse>, Status> {
    h.client(operator)
        .verify_pin(pb::VerifyPinRequest {
            request_id: id.into(),
            pin: pin.into(),
            releases: vec![],
        })
        .await
}

pub async fn release(
    h: &Harness,
    operator: &str,
    id: &str,
) -> Result<Response<pb::ReleaseCodeResponse>, Status> {
    h.client(operator)
        .release_code(pb::ReleaseCodeRequest {
            request_id: id.into(),
            statement: None,
        })
        .await
}

pub async fn show_pin(
    h: &Harness,
    user: &str,
    id: &str,
) -> Result<Response<pb::ShowPinResponse>, Status> {
    h.client(user)
        .show_pin(pb::ShowPinRequest {
            request_id: id.into(),
        })
        .await
}

pub async fn get(h: &Harness, user: &str, id: &str) -> pb::Request {
    request_of(
        h.client(user)
            .get_request(pb::GetRequestRequest {
                request_id: id.into(),
            })
            .await,
    )
}

impl Harness {
    /// A started harness with a VERIFIED request on PROD (see
    /// [`verified_prod`]); its id.
    pub async fn with_verified_prod() -> (Harness, String) {
        let h = Harness::start().await;
        let id = verified_prod(&h).await;
        (h, id)
    }
}

/// alice files on PROD and bob approves: APPROVED, with alice's PIN.
pub async fn approved_prod(h: &Harness) -> (String, String) {
    let id = file(h, "alice", PROD).await;
    let r = request_of(approve(h, "bob", &id).await);
    assert_eq!(state_of(&r), pb::RequestState::Approved);
    let pin = h.wait_for_pin("alice", &id, 1).await;
    (id, pin)
}

/// ... and olivia verifies the PIN: VERIFIED.
pub async fn verified_prod(h: &Harness) -> String {
    let (id, pin) = approved_prod(h).await;
    let r = request_of(verify(h, "olivia", &id, &pin).await);
    assert_eq!(state_of(&r), pb::RequestState::Verified);
    id
}

//! Test fixtures: a development PKI in a temp dir, a stand-in audit service
//! that acknowledges every event, a vault served in-process over mTLS, a
//! grant maker holding the broker's grant key, and the people's OpenSSH
//! keys: alice requests, bob and bea approve, olivia operates, adam and anna
//! are the pinned admins (M = 2); the signed policy and every statement they
//! sign.
#![allow(dead_code, missing_debug_implementations)]

use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use ed25519_dalek::SigningKey;
use prost::Message;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming, transport::Channel};
use twokey_consent::{
    AdminAction, Binding, SignedStatement, admin_binding, approval_binding, new_id, new_statement,
    release_binding, request_binding, sign_statement, ssh_key::PrivateKey,
};
use twokey_proto::{
    audit::v1::{
        AppendRequest, AppendResponse, AppendStatus, Event, GetCheckpointRequest,
        GetCheckpointResponse, GetConsistencyProofRequest, GetConsistencyProofResponse,
        GetInclusionProofRequest, GetInclusionProofResponse, QueryRequest, QueryResponse,
        RestoreRequest, RestoreResponse,
        audit_service_server::{AuditService, AuditServiceServer},
    },
    vault::v1::{
        AdminConsent, ApplyPolicyRequest, GenerateCodeRequest, Grant, GrantPurpose,
        ReleaseEvidence, SignedGrant, vault_service_client::VaultServiceClient,
    },
};
use twokey_runtime::{
    grant::sign_grant,
    keys::{SecretKey, encode_public_key, generate_signing_key},
    time::to_timestamp,
    tls::TlsFiles,
};
use twokey_testkit::{
    consent::{AccountRoles, Person, PolicySpec, admins_allowed_signers, sign_policy},
    grants,
    pki::{DevCa, LeafSpec},
};
use twokey_vault::{VaultConfig, config::ConsentConfig};

pub const TD: &str = "twokey.test";

pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Certificates, keys and directories for one test.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub ca: DevCa,
    pub grant_key: SigningKey,
    pub people: People,
}

/// The people of the policy, each with their own key.
pub struct People {
    pub alice: Person,
    pub bob: Person,
    pub bea: Person,
    pub olivia: Person,
    pub adam: Person,
    pub anna: Person,
}

impl People {
    fn new() -> Self {
        let p = |n: &str| Person::generate(n, vec![user(n)]);
        Self {
            alice: p("alice"),
            bob: p("bob"),
            bea: p("bea"),
            olivia: p("olivia"),
            adam: p("adam"),
            anna: p("anna"),
        }
    }

    pub fn all(&self) -> [&Person; 6] {
        [
            &self.alice,
            &self.bob,
            &self.bea,
            &self.olivia,
            &self.adam,
            &self.anna,
        ]
    }
}

/// The SPIFFE ID of user `name`.
pub fn user(name: &str) -> String {
    format!("spiffe://{TD}/user/{name}")
}

/// Roles on `account`: alice requests, bob and bea approve (one approval
/// needed), olivia operates; one code per request, 1000 an hour.
pub fn roles(account: &str) -> AccountRoles {
    AccountRoles {
        approvers: vec!["bob".into(), "bea".into()],
        releases_per_hour: 1000,
        ..AccountRoles::new(account, "alice", "bob", "olivia")
    }
}

/// A statement signed by `key` for signer `id` under policy `version`, now.
pub fn signed(key: &PrivateKey, id: &str, version: u64, binding: Binding) -> SignedStatement {
    sign_statement(
        key,
        TD,
        &new_statement(version, id, SystemTime::now(), binding),
    )
    .unwrap()
}

/// A person's statement under policy `version`.
pub fn by(person: &Person, version: u64, binding: Binding) -> SignedStatement {
    signed(&person.key, person.id(), version, binding)
}

/// A release: the grant and the evidence sent with it.
#[derive(Clone)]
pub struct Release {
    pub grant: SignedGrant,
    pub evidence: ReleaseEvidence,
}

impl Release {
    pub fn request(&self) -> GenerateCodeRequest {
        GenerateCodeRequest {
            grant: Some(self.grant.clone()),
            evidence: Some(self.evidence.clone()),
        }
    }
}

impl Fixture {
    pub fn new() -> Self {
        install_crypto();
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::new(TD).unwrap();
        ca.write(dir.path()).unwrap();
        for svc in ["vault", "broker", "audit"] {
            ca.issue_service(TD, svc)
                .unwrap()
                .write(dir.path(), svc)
                .unwrap();
        }
        ca.issue_user(TD, "mallory")
            .unwrap()
            .write(dir.path(), "mallory")
            .unwrap();
        SecretKey::generate()
            .write(&dir.path().join("master.key"))
            .unwrap();
        generate_signing_key(&dir.path().join("event.key")).unwrap();
        let grant_key = generate_signing_key(&dir.path().join("grant.key")).unwrap();
        let people = People::new();
        std::fs::write(
            dir.path().join("admins.allowed_signers"),
            admins_allowed_signers(&[&people.adam, &people.anna]),
        )
        .unwrap();
        Self {
            dir,
            ca,
            grant_key,
            people,
        }
    }

    /// Policy `version` listing `accounts`, everyone in it, adam and anna
    /// its admins (M = 2).
    pub fn policy(&self, version: u64, accounts: Vec<AccountRoles>) -> String {
        self.policy_spec(version, accounts).to_toml()
    }

    /// [`Fixture::policy`] before it is rendered.
    pub fn policy_spec(&self, version: u64, accounts: Vec<AccountRoles>) -> PolicySpec {
        PolicySpec::adam_and_anna(version, TD, &self.people.all(), accounts)
    }

    /// `document` signed by each of `admins`.
    pub fn policy_request(&self, document: &str, admins: &[&Person]) -> ApplyPolicyRequest {
        ApplyPolicyRequest {
            document: document.into(),
            signatures: admins
                .iter()
                .map(|a| sign_policy(&a.key, TD, document))
                .collect(),
        }
    }

    /// Applies policy `version` listing `accounts` (see [`roles`]), signed by
    /// adam and anna.
    pub async fn apply(&self, addr: SocketAddr, version: u64, accounts: &[&str]) {
        let doc = self.policy(version, accounts.iter().map(|a| roles(a)).collect());
        let request = self.policy_request(&doc, &[&self.people.adam, &self.people.anna]);
        self.broker_client(addr)
            .apply_policy(request)
            .await
            .expect("the policy applies");
    }

    /// A release grant for request `request_id` of `account` with id
    /// `grant_id`, as the broker signs one.
    pub fn release_grant(&self, account: &str, request_id: &str, grant_id: &str) -> SignedGrant {
        let grant = grants::release(TD, grant_id, request_id, account, SystemTime::now());
        sign_grant(&self.grant_key, &grant)
    }

    /// alice's request statement for `request_id` of `account`.
    pub fn request_statement(
        &self,
        version: u64,
        account: &str,
        request_id: &str,
    ) -> SignedStatement {
        let alice = &self.people.alice;
        by(
            alice,
            version,
            request_binding(
                request_id,
                account,
                alice.id(),
                "rotate keys",
                "CHG-1",
                SystemTime::now(),
            ),
        )
    }

    /// olivia's release of `request` with `approvals` for `grant_id`.
    pub fn release_statement(
        &self,
        version: u64,
        request: &SignedStatement,
        approvals: &[SignedStatement],
        grant_id: &str,
    ) -> SignedStatement {
        by(
            &self.people.olivia,
            version,
            release_binding(request, approvals, grant_id, &new_id()).unwrap(),
        )
    }

    /// The honest evidence for a release grant: alice's request, bob's
    /// approval and olivia's release, bound to the grant's ids (empty
    /// evidence for a grant that does not decode).
    pub fn evidence_for(&self, grant: &SignedGrant, version: u64) -> ReleaseEvidence {
        let Ok(g) = Grant::decode(grant.grant.as_slice()) else {
            return ReleaseEvidence::default();
        };
        let request = self.request_statement(version, &g.account_id, &g.request_id);
        let approvals = vec![by(
            &self.people.bob,
            version,
            approval_binding(&request).unwrap(),
        )];
        let release = self.release_statement(version, &request, &approvals, &g.grant_id);
        ReleaseEvidence {
            request: Some(request),
            approvals,
            release: Some(release),
        }
    }

    /// A fresh honest release of `account` under policy `version`.
    pub fn consented(&self, account: &str, version: u64) -> Release {
        let grant = self.release_grant(account, &new_id(), &new_id());
        let evidence = self.evidence_for(&grant, version);
        Release { grant, evidence }
    }

    /// `admins`' consent to `action` on `account` (one new action id).
    pub fn admin_consent(
        &self,
        version: u64,
        account: &str,
        action: AdminAction,
        admins: &[&Person],
    ) -> AdminConsent {
        let action_id = new_id();
        AdminConsent {
            statements: admins
                .iter()
                .map(|a| by(a, version, admin_binding(account, action, &action_id)))
                .collect(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn tls(&self, name: &str) -> TlsFiles {
        TlsFiles::in_dir(self.path(), name)
    }

    pub fn vault_config(&self, audit: SocketAddr) -> VaultConfig {
        VaultConfig {
            listen: "127.0.0.1:0".into(),
            trust_domain: TD.into(),
            data_dir: self.path().join("vault-data"),
            master_key_file: self.path().join("master.key"),
            event_key_file: self.path().join("event.key"),
            broker_id: format!("spiffe://{TD}/svc/broker").parse().unwrap(),
            grant_public_key: encode_public_key(&self.grant_key.verifying_key()),
            audit_address: format!("https://{audit}"),
            audit_server_name: "audit".into(),
            audit_checkpoint_key: None,
            audit_keep_days: 30,
            audit_ack_timeout_ms: 1000,
            log_format: Default::default(),
            tls: self.tls("vault"),
            consent: Some(ConsentConfig {
                admins_file: self.path().join("admins.allowed_signers"),
                threshold: 2,
            }),
            seal: None,
            store: Default::default(),
        }
    }

    /// A channel to `addr` presenting `name`'s certificate.
    pub fn channel(&self, addr: SocketAddr, name: &str) -> Channel {
        self.tls(name)
            .channel(&format!("https://{addr}"), "vault")
            .unwrap()
    }

    pub fn broker_client(&self, addr: SocketAddr) -> VaultServiceClient<Channel> {
        VaultServiceClient::new(self.channel(addr, "broker"))
    }

    /// A signed grant; `life` from now, `issued_ago` in the past.
    pub fn grant(&self, account: &str, purpose: GrantPurpose) -> SignedGrant {
        self.grant_with(
            account,
            purpose,
            Duration::ZERO,
            Duration::from_secs(60),
            &self.grant_key,
        )
    }

    /// An enrollment grant for `account`, as the broker signs one for
    /// admin `admin`: no request and no other people.
    pub fn enroll_grant(&self, account: &str, admin: &str) -> SignedGrant {
        let grant = Grant {
            operator: format!("spiffe://{TD}/user/{admin}"),
            ..grants::grant(
                &uuid_like(),
                account,
                GrantPurpose::Enroll,
                SystemTime::now(),
            )
        };
        sign_grant(&self.grant_key, &grant)
    }

    pub fn grant_with(
        &self,
        account: &str,
        purpose: GrantPurpose,
        issued_ago: Duration,
        life: Duration,
        key: &SigningKey,
    ) -> SignedGrant {
        let issued = SystemTime::now() - issued_ago;
        let grant = Grant {
            purpose: purpose as i32,
            expires_at: Some(to_timestamp(issued + life)),
            ..grants::release(TD, &uuid_like(), "req-1", account, issued)
        };
        sign_grant(key, &grant)
    }
}

/// The code of Base32 `secret` (SHA1, 6 digits) for time step `step`,
/// whatever the step length (totp-rs's default 30 s steps, at the step's
/// start).
pub fn code_of(secret: &str, step: u64) -> String {
    let seed = data_encoding::BASE32_NOPAD
        .decode(secret.as_bytes())
        .unwrap();
    totp_rs::Builder::new()
        .with_secret(seed)
        .build_noncompliant()
        .generate(step * 30)
        .to_string()
}

pub fn uuid_like() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Methods of the fake audit that answer UNIMPLEMENTED (written as
/// `async_trait` expands them, since it does not see into a macro).
macro_rules! not_served {
    ($($method:ident($request:ty) -> $response:ty;)*) => {
        $(
            fn $method<'life0, 'async_trait>(
                &'life0 self,
                _: Request<$request>,
            ) -> Pin<Box<dyn Future<Output = Result<Response<$response>, Status>> + Send + 'async_trait>>
            where
                'life0: 'async_trait,
                Self: 'async_trait,
            {
                Box::pin(async { Err(Status::unimplemented("fake")) })
            }
        )*
    };
}

/// A stand-in audit service: acknowledges every event as stored, in order,
/// and keeps them for inspection; with `receipts`, every acknowledgement
/// carries a signed checkpoint, honest or (while `fork` is set) over another
/// history.
#[derive(Clone, Default)]
pub struct FakeAudit {
    pub events: Arc<Mutex<Vec<Event>>>,
    pub receipts: Option<Arc<FakeReceipts>>,
    stopping: Option<tokio::sync::watch::Receiver<bool>>,
}

/// The fake audit's checkpoints: its key, its leaves, and whether it serves
/// a fork (leaf 0 replaced).
#[derive(Debug)]
pub struct FakeReceipts {
    pub signer: twokey_tlog::checkpoint::CheckpointSigner,
    pub leaves: Mutex<Vec<twokey_tlog::merkle::Hash>>,
    pub fork: std::sync::atomic::AtomicBool,
}

impl FakeReceipts {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            signer: twokey_tlog::checkpoint::CheckpointSigner::new(
                "twokey.test/audit",
                SigningKey::from_bytes(&[42; 32]),
            )
            .unwrap(),
            leaves: Mutex::new(Vec::new()),
            fork: Default::default(),
        })
    }

    /// The checkpoint over every leaf and the proof from `base`.
    fn receipt(&self, base: u64) -> (String, Vec<Vec<u8>>) {
        use twokey_tlog::{checkpoint::Checkpoint, merkle};
        let mut leaves = self.leaves.lock().unwrap().clone();
        if self.fork.load(std::sync::atomic::Ordering::SeqCst) && !leaves.is_empty() {
            leaves[0] = merkle::leaf_hash(b"another history");
        }
        let size = leaves.len() as u64;
        let note = self
            .signer
            .sign(&Checkpoint {
                origin: "twokey.test/audit".into(),
                size,
                root: merkle::root(&leaves),
            })
            .unwrap();
        let proof = if base == 0 || base >= size {
            Vec::new()
        } else {
            merkle::consistency_proof(&leaves, base, size).unwrap()
        };
        (note, proof.iter().map(|h| h.to_vec()).collect())
    }
}

#[tonic::async_trait]
impl AuditService for FakeAudit {
    type AppendStream = Pin<Box<dyn Stream<Item = Result<AppendResponse, Status>> + Send>>;
    type QueryStream = Pin<Box<dyn Stream<Item = Result<QueryResponse, Status>> + Send>>;

    async fn append(
        &self,
        request: Request<Streaming<AppendRequest>>,
    ) -> Result<Response<Self::AppendStream>, Status> {
        let events = self.events.clone();
        let receipts = self.receipts.clone();
        let mut base: Option<u64> = None;
        let mut stopping = self.stopping.clone().expect("started by start_fake_audit");
        let stream = request.into_inner().map(move |item| {
            let item = item?;
            let from = *base.get_or_insert(item.known_size);
            let Some(signed) = item.event else {
                // A hello or a cosignature: a receipt alone answers it.
                let mut answer = AppendResponse::default();
                if let Some(r) = &receipts {
                    (answer.checkpoint, answer.consistency_proof) = r.receipt(from);
                    base = Some(r.leaves.lock().unwrap().len() as u64);
                }
                return Ok(answer);
            };
            let leaf = twokey_tlog::merkle::leaf_hash(&signed.encode_to_vec());
            let event = Event::decode(signed.event.as_slice())
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let seq = event.seq;
            let mut events = events.lock().unwrap();
            let known = events
                .iter()
                .position(|e| e.seq == seq && e.source == event.source);
            if known.is_none() {
                events.push(event);
            }
            let mut answer = AppendResponse {
                seq,
                status: AppendStatus::Stored as i32,
                leaf_index: seq,
                expected_seq: seq + 1,
                ..Default::default()
            };
            if let Some(r) = &receipts {
                let mut leaves = r.leaves.lock().unwrap();
                answer.leaf_index = match known {
                    Some(i) => i as u64,
                    None => {
                        leaves.push(leaf);
                        leaves.len() as u64 - 1
                    }
                };
                drop(leaves);
                (answer.checkpoint, answer.consistency_proof) = r.receipt(from);
                base = Some(r.leaves.lock().unwrap().len() as u64);
            }
            Ok(answer)
        });
        // End open Append streams when the server stops, as the real audit
        // service does, so graceful shutdown does not wait on them.
        let stream = futures::StreamExt::take_until(stream, async move {
            let _ = stopping.wait_for(|s| *s).await;
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn query(&self, _: Request<QueryRequest>) -> Result<Response<Self::QueryStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    not_served! {
        get_checkpoint(GetCheckpointRequest) -> GetCheckpointResponse;
        get_inclusion_proof(GetInclusionProofRequest) -> GetInclusionProofResponse;
        get_consistency_proof(GetConsistencyProofRequest) -> GetConsistencyProofResponse;
    }

    async fn restore(
        &self,
        _: Request<Streaming<RestoreRequest>>,
    ) -> Result<Response<RestoreResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// A server task that stops when dropped (or `stop` is called) and
/// propagates its panics on `stop`.
pub struct Running {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<()>>,
}

impl Running {
    /// Runs the server `serve` makes (given the signal that stops it) as a
    /// task, for the server on `addr`.
    fn spawn<F>(addr: SocketAddr, serve: impl FnOnce(oneshot::Receiver<()>) -> F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel();
        Self {
            addr,
            stop: Some(stop),
            join: Some(tokio::spawn(serve(stopped))),
        }
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(j) = self.join.take() {
            j.await.expect("server task panicked");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(j) = self.join.take() {
            j.abort();
        }
    }
}

/// Serves the fake audit over mTLS on a fresh loopback port.
pub async fn start_fake_audit(fx: &Fixture, audit: FakeAudit) -> Running {
    start_fake_audit_on(fx, audit, "127.0.0.1:0").await
}

pub async fn start_fake_audit_on(fx: &Fixture, mut audit: FakeAudit, addr: &str) -> Running {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = fx
        .tls("audit")
        .server_tls(twokey_runtime::tls::ClientAuth::Required)
        .unwrap();
    let (stop_streams, stopping) = tokio::sync::watch::channel(false);
    audit.stopping = Some(stopping);
    Running::spawn(addr, |stop| async move {
        tonic::transport::Server::builder()
            .add_service(AuditServiceServer::new(audit))
            .serve_with_incoming_shutdown(
                twokey_runtime::serve::incoming(listener, tls),
                async move {
                    let _ = stop.await;
                    let _ = stop_streams.send(true);
                },
            )
            .await
            .unwrap();
    })
}

/// Serves a vault in-process with `config`; the error it stops with, if
/// it does not start.
pub async fn vault_start_error(config: VaultConfig) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    match tokio::time::timeout(
        Duration::from_secs(30),
        twokey_vault::serve(config, listener, std::future::pending()),
    )
    .await
    {
        Ok(Err(e)) => e.to_string(),
        Ok(Ok(())) => panic!("the vault stopped without an error"),
        Err(_) => panic!("the vault started"),
    }
}

/// Waits (bounded) until the fake audit holds an event `matches` accepts;
/// returns it.
pub async fn stored_event(audit: &FakeAudit, matches: impl Fn(&Event) -> bool) -> Event {
    for _ in 0..200 {
        if let Some(e) = audit.events.lock().unwrap().iter().find(|e| matches(e)) {
            return e.clone();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let events = audit.events.lock().unwrap().clone();
    panic!("no such event stored: {events:#?}");
}

/// Serves a vault in-process with `config`.
pub async fn start_vault(config: VaultConfig) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    Running::spawn(addr, |stop| async move {
        twokey_vault::serve(config, listener, async {
            let _ = stop.await;
        })
        .await
        .unwrap();
    })
}

/// A certificate from another CA, carrying the broker's SPIFFE ID.
pub fn foreign_broker_cert(dir: &Path) -> TlsFiles {
    let other = DevCa::new(TD).unwrap();
    let leaf = other
        .issue(&LeafSpec::new(&format!("spiffe://{TD}/svc/broker")))
        .unwrap();
    leaf.write(dir, "foreign-broker").unwrap();
    TlsFiles {
        cert: dir.join("foreign-broker.crt"),
        key: dir.join("foreign-broker.key"),
        ca: dir.join("ca.crt"),
        crl: None,
    }
}

pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

//! Test fixtures: a development PKI in a temp dir, a stand-in audit service
//! that acknowledges every event, a vault served in-process over mTLS, and a
//! grant maker holding the broker's grant key.
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
use twokey_proto::{
    audit::v1::{
        AppendRequest, AppendResponse, AppendStatus, Event, GetCheckpointRequest,
        GetCheckpointResponse, GetConsistencyProofRequest, GetConsistencyProofResponse,
        GetInclusionProofRequest, GetInclusionProofResponse, QueryRequest, QueryResponse,
        audit_service_server::{AuditService, AuditServiceServer},
    },
    vault::v1::{Grant, GrantPurpose, SignedGrant, vault_service_client::VaultServiceClient},
};
use twokey_runtime::{
    grant::sign_grant,
    keys::{SecretKey, encode_public_key, generate_signing_key},
    time::to_timestamp,
    tls::TlsFiles,
};
use twokey_testkit::{
    grants,
    pki::{DevCa, LeafSpec},
};
use twokey_vault::VaultConfig;

pub const TD: &str = "twokey.test";

pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Certificates, keys and directories for one test.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub ca: DevCa,
    pub grant_key: SigningKey,
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
        Self { dir, ca, grant_key }
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
            audit_ack_timeout_ms: 1000,
            log_format: Default::default(),
            tls: self.tls("vault"),
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
/// and keeps them for inspection.
#[derive(Clone, Default)]
pub struct FakeAudit {
    pub events: Arc<Mutex<Vec<Event>>>,
    stopping: Option<tokio::sync::watch::Receiver<bool>>,
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
        let mut stopping = self.stopping.clone().expect("started by start_fake_audit");
        let stream = request.into_inner().map(move |item| {
            let item = item?;
            let signed = item.event.unwrap_or_default();
            let event = Event::decode(signed.event.as_slice())
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let seq = event.seq;
            let mut events = events.lock().unwrap();
            if !events
                .iter()
                .any(|e| e.seq == seq && e.source == event.source)
            {
                events.push(event);
            }
            Ok(AppendResponse {
                seq,
                status: AppendStatus::Stored as i32,
                leaf_index: seq,
                expected_seq: seq + 1,
            })
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

//! Fixtures of the outbox tests: a throwaway PostgreSQL with the vault's
//! database and its outbox tables, "replicas" (an outbox session and a
//! session for transactions), and an audit service in process over mTLS.
#![allow(dead_code)]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use ed25519_dalek::SigningKey;
use prost::Message;
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;
use twokey_audit::{AuditConfig, StartError, checkpoint::NoteVerifier, verify::verify_log};
use twokey_pgstore::{
    PgSettings, connect,
    outbox::{self, PgOutbox},
};
use twokey_proto::audit::v1::{
    Event, GetCheckpointRequest, LogEntry, QueryRequest, SignedEvent,
    audit_service_client::AuditServiceClient,
};
use twokey_runtime::{
    SpiffeId,
    events::{EventDraft, EventSigner},
    keys::{generate_signing_key, load_signing_key},
    shipper::{ShipperOptions, spawn_shipper_with},
    telemetry::LogFormat,
    time::SystemClock,
    tls::TlsFiles,
};
use twokey_testkit::{pki::DevCa, postgres::TestPostgres};

pub const TD: &str = "twokey.test";
pub const VAULT: &str = "spiffe://twokey.test/svc/vault";
pub const CAROL: &str = "spiffe://twokey.test/user/carol";
/// How long a test waits for something that should happen much sooner.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// A throwaway PostgreSQL with the vault's database, its outbox migrated.
pub struct Pg {
    pub pg: TestPostgres,
    pub settings: PgSettings,
    _dir: tempfile::TempDir,
}

pub async fn pg() -> Pg {
    let pg = TestPostgres::start().expect("scripts/test installs PostgreSQL");
    pg.create_database("vault", "vault_role", "vault-pw")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file: PathBuf = dir.path().join("vault_role.pw");
    std::fs::write(&file, "vault-pw\n").unwrap();
    let settings = PgSettings {
        url: pg.url("vault", "vault_role"),
        password_file: Some(file),
        ca_file: None,
    };
    let mut client = connect(&settings).await.unwrap();
    let m = outbox::migrate(&mut client).await.unwrap();
    assert_eq!((m.from, m.to), (0, 1));
    Pg {
        pg,
        settings,
        _dir: dir,
    }
}

pub fn vault_key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

pub fn signer() -> Arc<EventSigner> {
    Arc::new(EventSigner::new(id(VAULT), vault_key()))
}

/// One "replica": its outbox session, and a session for its transactions.
pub struct Replica {
    pub outbox: PgOutbox,
    pub client: tokio_postgres::Client,
}

pub async fn replica(settings: &PgSettings) -> Replica {
    Replica {
        outbox: PgOutbox::connect(settings, signer(), Arc::new(SystemClock))
            .await
            .unwrap(),
        client: connect(settings).await.unwrap(),
    }
}

impl Replica {
    /// A state change's transaction with its event: pushed and committed.
    pub async fn push(&mut self, action: &str) -> u64 {
        let tx = self.client.transaction().await.unwrap();
        let seq = self
            .outbox
            .push(
                &tx,
                EventDraft::new("spiffe://twokey.test/user/alice", action),
            )
            .await
            .unwrap();
        tx.commit().await.unwrap();
        seq
    }
}

pub fn seq_of(event: &SignedEvent) -> u64 {
    Event::decode(event.event.as_slice()).unwrap().seq
}

// ---------------------------------------------------------------------
// The audit service, in process, over mTLS.

pub struct Audit {
    pub dir: tempfile::TempDir,
    pub config: AuditConfig,
    pub addr: SocketAddr,
    running: Option<Running>,
}

pub type Running = (oneshot::Sender<()>, JoinHandle<Result<(), StartError>>);

/// Serves `config` on `addr`.
pub async fn serve_audit(config: &AuditConfig, addr: SocketAddr) -> (SocketAddr, Running) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let join = tokio::spawn(twokey_audit::serve(config.clone(), listener, async {
        let _ = rx.await;
    }));
    (addr, (tx, join))
}

impl Audit {
    pub async fn start() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path();
        let ca = DevCa::new(TD).unwrap();
        ca.write(pki).unwrap();
        for svc in ["audit", "vault"] {
            ca.issue_service(TD, svc).unwrap().write(pki, svc).unwrap();
        }
        ca.issue_user(TD, "carol")
            .unwrap()
            .write(pki, "carol")
            .unwrap();
        generate_signing_key(&pki.join("checkpoint.key")).unwrap();
        let config = AuditConfig {
            listen: "127.0.0.1:0".into(),
            trust_domain: TD.into(),
            data_dir: pki.join("data"),
            checkpoint_key_file: pki.join("checkpoint.key"),
            origin: "twokey.test/audit".into(),
            auditors: BTreeSet::from([id(CAROL)]),
            log_format: LogFormat::Human,
            tls: TlsFiles::in_dir(pki, "audit"),
            sources: BTreeMap::from([(id(VAULT), vault_key().verifying_key())]),
            http_listen: None,
            reconcile: None,
            store: Default::default(),
        };
        let (addr, running) = serve_audit(&config, "127.0.0.1:0".parse().unwrap()).await;
        Self {
            dir,
            config,
            addr,
            running: Some(running),
        }
    }

    /// Stops the server (its data stays).
    pub async fn halt(&mut self) {
        let (shutdown, join) = self.running.take().expect("running");
        let _ = shutdown.send(());
        match tokio::time::timeout(Duration::from_secs(10), join).await {
            Ok(Ok(result)) => result.expect("the audit server failed"),
            Ok(Err(e)) => std::panic::resume_unwind(e.into_panic()),
            Err(_) => panic!("the audit server did not stop within 10 s"),
        }
    }

    /// Starts the server again on the same address and data.
    pub async fn resume(&mut self) {
        let (_, running) = serve_audit(&self.config, self.addr).await;
        self.running = Some(running);
    }

    pub fn channel(&self, name: &str) -> Channel {
        TlsFiles::in_dir(self.dir.path(), name)
            .channel(&format!("https://{}", self.addr), "audit")
            .unwrap()
    }

    pub fn verifier(&self) -> NoteVerifier {
        NoteVerifier::new(
            &self.config.origin,
            load_signing_key(&self.config.checkpoint_key_file)
                .unwrap()
                .verifying_key(),
        )
        .unwrap()
    }

    /// What the vault's shipper runs with: receipts checked.
    pub fn options(&self) -> ShipperOptions {
        ShipperOptions {
            audit_key: Some(self.verifier()),
            ..ShipperOptions::default()
        }
    }

    /// The starter of a shipper for [`spawn_leased`].
    pub fn ship(&self) -> impl Fn(PgOutbox) -> JoinHandle<()> + Send + 'static {
        let (channel, options) = (self.channel("vault"), self.options());
        move |o| spawn_shipper_with(o, channel.clone(), options.clone()).1
    }

    pub async fn entries(&self) -> Vec<LogEntry> {
        let mut carol = AuditServiceClient::new(self.channel("carol"));
        let mut stream = carol
            .query(QueryRequest::default())
            .await
            .unwrap()
            .into_inner();
        let mut entries = Vec::new();
        while let Some(batch) = stream.message().await.unwrap() {
            entries.extend(batch.entries);
        }
        entries
    }

    /// Waits until the log holds `n` entries (or more), then checks that
    /// it holds exactly the vault's events 1..=n, once each and in order,
    /// and that it verifies against the signed checkpoint.
    pub async fn expect_exactly(&self, n: u64) {
        let start = Instant::now();
        let entries = loop {
            let entries = self.entries().await;
            if entries.len() as u64 >= n || start.elapsed() > PATIENCE {
                break entries;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let seqs: Vec<u64> = entries
            .iter()
            .map(|e| e.event.as_ref().map_or(0, |e| e.seq))
            .collect();
        assert_eq!(
            seqs,
            (1..=n).collect::<Vec<_>>(),
            "each event once, in order"
        );
        let mut carol = AuditServiceClient::new(self.channel("carol"));
        let note = carol
            .get_checkpoint(GetCheckpointRequest {})
            .await
            .unwrap()
            .into_inner()
            .checkpoint;
        let keys = BTreeMap::from([(VAULT.to_owned(), vault_key().verifying_key())]);
        verify_log(&entries, &keys, Some((&note, &self.verifier()))).unwrap();
    }

    pub async fn stop(mut self) {
        self.halt().await;
    }
}

/// Waits until `f` holds.
pub async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < PATIENCE, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

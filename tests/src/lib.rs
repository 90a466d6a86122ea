//! Harness for the end-to-end tests: the real `twokey-audit`, `twokey-vault`
//! and `twokey-broker` binaries as separate processes on loopback (through
//! `twokey::local::LocalSystem`), and mTLS gRPC clients for each user.
#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use ed25519_dalek::VerifyingKey;
use tonic::transport::Channel;
use twokey::local::LocalSystem;
use twokey_proto::{
    audit::v1::{LogEntry, QueryRequest, audit_service_client::AuditServiceClient},
    broker::v1::broker_service_client::BrokerServiceClient,
};
use twokey_runtime::tls::TlsFiles;

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
        let status =
            twokey::local::cargo_build_binaries(Path::new(env!("CARGO_MANIFEST_DIR")), false)
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
    _dir: tempfile::TempDir,
}

impl System {
    /// Starts audit, vault and broker.
    pub fn start() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().expect("tempdir");
        let local = LocalSystem::start(&dir.path().join("sys"), &bin_dir())
            .unwrap_or_else(|e| panic!("local system did not start: {e}"));
        Self { local, _dir: dir }
    }

    fn tls(&self, user: &str) -> TlsFiles {
        TlsFiles::in_dir(&self.local.dir.join("pki"), user)
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
        Self { local, _dir: dir }
    }

    /// What service `svc` (`audit`, `vault` or `broker`) wrote to its log.
    pub fn service_log(&self, svc: &str) -> String {
        std::fs::read_to_string(self.local.dir.join("logs").join(format!("{svc}.log")))
            .unwrap_or_default()
    }
}

impl System {
    /// The log once `done` holds for it: events reach audit asynchronously
    /// from the broker's outbox (the broker does not wait for their
    /// acknowledgement), so a test that reads the log right after a call
    /// waits for the events it expects. Polls the log, at most 10 s.
    pub async fn log_when(&self, done: impl Fn(&[LogEntry]) -> bool) -> Vec<LogEntry> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let log = self.log().await;
            if done(&log) || std::time::Instant::now() >= deadline {
                return log;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

//! Test fixtures: a development PKI in a tempdir, source and checkpoint keys,
//! an in-process audit server on 127.0.0.1:0, and mTLS clients.
#![allow(dead_code)]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, SystemTime},
};

use ed25519_dalek::{SigningKey, VerifyingKey};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{Status, transport::Channel};
use twokey_audit::{
    AuditConfig, StartError,
    checkpoint::NoteVerifier,
    verify::{VerifyReport, verify_log},
};
use twokey_proto::audit::v1::{
    AppendRequest, AppendResponse, GetCheckpointRequest, GetCheckpointResponse, LogEntry,
    QueryRequest, SignedEvent, audit_service_client::AuditServiceClient,
};
use twokey_runtime::{
    SpiffeId,
    events::{EventDraft, EventSigner},
    keys::{encode_public_key, generate_signing_key, load_signing_key},
    telemetry::LogFormat,
    tls::TlsFiles,
};
use twokey_testkit::{pki::DevCa, ready};

pub const TD: &str = "twokey.test";
pub const VAULT: &str = "spiffe://twokey.test/svc/vault";
pub const BROKER: &str = "spiffe://twokey.test/svc/broker";
pub const CAROL: &str = "spiffe://twokey.test/user/carol";

/// A PKI, keys and a config for one audit server.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub vault_key: SigningKey,
    pub broker_key: SigningKey,
    pub config: AuditConfig,
}

pub fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

impl Env {
    pub fn new() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path();
        let ca = DevCa::new(TD).unwrap();
        ca.write(pki).unwrap();
        for svc in ["audit", "vault", "broker", "intruder"] {
            ca.issue_service(TD, svc).unwrap().write(pki, svc).unwrap();
        }
        for user in ["carol", "mallory"] {
            ca.issue_user(TD, user).unwrap().write(pki, user).unwrap();
        }
        generate_signing_key(&pki.join("checkpoint.key")).unwrap();
        let vault_key = SigningKey::generate(&mut rand::rngs::OsRng);
        let broker_key = SigningKey::generate(&mut rand::rngs::OsRng);
        let config = AuditConfig {
            listen: "127.0.0.1:0".into(),
            trust_domain: TD.into(),
            data_dir: pki.join("data"),
            checkpoint_key_file: pki.join("checkpoint.key"),
            origin: "twokey.test/audit".into(),
            auditors: BTreeSet::from([id(CAROL)]),
            log_format: LogFormat::Human,
            tls: TlsFiles::in_dir(pki, "audit"),
            sources: BTreeMap::from([
                (id(VAULT), vault_key.verifying_key()),
                (id(BROKER), broker_key.verifying_key()),
            ]),
            http_listen: None,
            reconcile: None,
            store: Default::default(),
        };
        Self {
            dir,
            vault_key,
            broker_key,
            config,
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    pub fn vault(&self) -> EventSigner {
        EventSigner::new(id(VAULT), self.vault_key.clone())
    }

    pub fn broker(&self) -> EventSigner {
        EventSigner::new(id(BROKER), self.broker_key.clone())
    }

    /// The sources' keys by name, as `verify_log` takes them.
    pub fn source_keys(&self) -> BTreeMap<String, VerifyingKey> {
        self.config
            .sources
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect()
    }

    /// A lazily connecting mTLS channel to `addr` as `name` (a cert in the PKI dir).
    pub fn channel(&self, addr: SocketAddr, name: &str) -> Channel {
        TlsFiles::in_dir(self.dir.path(), name)
            .channel(&format!("https://{addr}"), "audit")
            .unwrap()
    }

    pub fn client(&self, addr: SocketAddr, name: &str) -> AuditServiceClient<Channel> {
        AuditServiceClient::new(self.channel(addr, name))
    }

    /// The verifier of this server's checkpoints.
    pub fn verifier(&self) -> NoteVerifier {
        NoteVerifier::new(
            &self.config.origin,
            load_signing_key(&self.config.checkpoint_key_file)
                .unwrap()
                .verifying_key(),
        )
        .unwrap()
    }

    /// Verifies `entries` (signatures, sequence numbers) and that they are
    /// the log the signed checkpoint `note` covers (or extends it).
    pub fn verify(&self, entries: &[LogEntry], note: &str) -> VerifyReport {
        verify_log(entries, &self.source_keys(), Some((note, &self.verifier()))).unwrap()
    }
}

/// The latest checkpoint, as auditor `client`.
pub async fn checkpoint(client: &mut AuditServiceClient<Channel>) -> GetCheckpointResponse {
    client
        .get_checkpoint(GetCheckpointRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// The code of a failed call.
pub fn code_of<T>(result: Result<T, Status>) -> tonic::Code {
    result.map(|_| ()).unwrap_err().code()
}

/// An in-process server; `stop` shuts it down and propagates its result.
pub struct TestServer {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<Result<(), StartError>>>,
}

impl TestServer {
    pub async fn start(config: AuditConfig) -> Self {
        Self::start_at(config, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Listens on `addr` (a port a stopped server used, to come back there).
    pub async fn start_at(config: AuditConfig, addr: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let join = tokio::spawn(twokey_audit::serve(config, listener, async {
            let _ = rx.await;
        }));
        Self {
            addr,
            shutdown: Some(tx),
            join: Some(join),
        }
    }

    pub async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        let join = self.join.take().unwrap();
        match tokio::time::timeout(Duration::from_secs(10), join).await {
            Ok(Ok(result)) => result.expect("the audit server failed"),
            Ok(Err(e)) => std::panic::resume_unwind(e.into_panic()),
            Err(_) => panic!("the audit server did not stop within 10 s"),
        }
    }
}

/// An event of `signer` with sequence number `seq`.
pub fn event(signer: &EventSigner, seq: u64, action: &str) -> SignedEvent {
    signer.sign(
        &EventDraft::new("spiffe://twokey.test/user/alice", action)
            .account("aws-prod")
            .request(format!("req-{seq}"))
            .attr("state", "APPROVED")
            .into_event(signer.source(), seq, SystemTime::now()),
    )
}

/// Sends `events` on one Append stream and collects every answer up to the
/// end of the stream or the first error.
pub async fn append_all(
    client: &mut AuditServiceClient<Channel>,
    events: Vec<SignedEvent>,
) -> Result<Vec<Result<AppendResponse, Status>>, Status> {
    let requests = events
        .into_iter()
        .map(|e| AppendRequest {
            event: Some(e),
            ..Default::default()
        })
        .collect::<Vec<_>>();
    let mut responses = client
        .append(tokio_stream::iter(requests))
        .await?
        .into_inner();
    let mut out = Vec::new();
    loop {
        match responses.message().await {
            Ok(Some(r)) => out.push(Ok(r)),
            Ok(None) => break,
            Err(s) => {
                out.push(Err(s));
                break;
            }
        }
    }
    Ok(out)
}

/// Every entry of the log, oldest first, as auditor `client`.
pub async fn query_all(client: &mut AuditServiceClient<Channel>) -> Vec<LogEntry> {
    let mut stream = client
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

/// The `serve` flags for `env`: no config file, every setting a flag.
pub fn serve_flags(env: &Env) -> Vec<String> {
    let c = &env.config;
    let path = |p: &Path| p.display().to_string();
    let sources = format!(
        "{VAULT}={},{BROKER}={}",
        encode_public_key(&env.vault_key.verifying_key()),
        encode_public_key(&env.broker_key.verifying_key()),
    );
    [
        ("--listen", "127.0.0.1:0".to_owned()),
        ("--trust-domain", c.trust_domain.clone()),
        ("--data-dir", path(&c.data_dir)),
        ("--checkpoint-key-file", path(&c.checkpoint_key_file)),
        ("--origin", c.origin.clone()),
        ("--auditors", CAROL.to_owned()),
        ("--log-format", "json".to_owned()),
        ("--tls-cert", path(&c.tls.cert)),
        ("--tls-key", path(&c.tls.key)),
        ("--tls-ca", path(&c.tls.ca)),
        ("--sources", sources),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_owned(), value])
    .collect()
}

/// The running binary; killed when dropped.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    /// Stops the binary as a supervisor does (SIGTERM) and waits until it
    /// exits, which it does after applying its journal; panics if it
    /// failed.
    pub async fn stop(mut self) {
        let pid = self.0.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success(), "kill -TERM {pid} failed");
        let status = tokio::task::spawn_blocking(move || self.0.wait().unwrap())
            .await
            .unwrap();
        assert!(status.success(), "twokey-audit exited with {status}");
    }
}

/// Starts the binary and waits for its "listening on" line.
pub async fn start(flags: &[String]) -> (Running, SocketAddr) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_twokey-audit"));
    command
        .arg("serve")
        .args(flags)
        .env_remove("TWOKEY_AUDIT_CONFIG")
        .env("TWOKEY_LOG", "warn");
    let (child, addr) = tokio::task::spawn_blocking(move || {
        ready::start(
            command,
            "twokey-audit",
            Stdio::inherit(),
            Duration::from_secs(60),
        )
    })
    .await
    .unwrap()
    .expect("twokey-audit announces itself within 60 s");
    (Running(child), addr)
}

/// Builds the Go program `tests/go/<name>` (Go's `sumdb` packages, vendored)
/// into `dir`, offline, and returns the binary; `None`, after saying
/// SKIPPED, where Go is not installed.
pub fn go_build(name: &str, dir: &Path) -> Option<PathBuf> {
    if Command::new("go").arg("version").output().is_err() {
        eprintln!(
            "SKIPPED: the Go cross-check {name} (no `go` on PATH; `apt-get install golang-go` \
             runs it)"
        );
        return None;
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/go")
        .join(name);
    let bin = dir.join(name);
    let built = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(&src)
        .env("GOFLAGS", "-mod=mod")
        .env("GOPROXY", "off")
        .env("GOTOOLCHAIN", "local")
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "go build {name}: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    Some(bin)
}

/// A TLS connector trusting the test CA, presenting `name`'s certificate
/// (or none), offering the one ALPN protocol `alpn`.
pub fn https_connector(env: &Env, name: Option<&str>, alpn: &[u8]) -> tokio_rustls::TlsConnector {
    twokey_testkit::pki::https_connector(&env.path(), name, &[alpn])
}

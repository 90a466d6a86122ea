//! The `shamir` seal mode over real mTLS: a vault started sealed answers
//! UNAVAILABLE until K holders submitted their own shares; every wrong share
//! is refused by name without changing what was received; partial shares
//! time out; no share reaches a log; a real vault process is non-dumpable.

mod common;

use std::{
    io::Write,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use common::*;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use twokey_consent::ssh_key::LineEnding;
use twokey_consent::{AdminAction, admin_binding, new_id, new_statement, sign_statement};
use twokey_proto::vault::v1::{
    AdminConsent, EnrollRequest, GenerateCodeRequest, ReshareRequest, ReshareResponse, SealRequest,
    SealStatusRequest, ShareHolder, StartReshareRequest, StatusRequest, UnsealRequest,
    enroll_request::Seed, seal_service_client::SealServiceClient,
};
use twokey_runtime::keys::SecretKey;
use twokey_vault::{
    VaultConfig,
    config::SealConfig,
    unseal::{self, HolderSpec, Submitted, UnsealError, Unsealer},
};

const SECRET: &str = "JBSWY3DPEHPK3PXP";
const HOLDERS: [&str; 3] = ["alice", "bob", "bea"];

/// Every log line of this test binary, captured.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        logs
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A 2-of-3 split among alice, bob and bea (their own ssh keys), written
/// to `<fixture>/seal`; a certificate for each.
struct Sealed {
    fx: Fixture,
    dir: std::path::PathBuf,
}

impl Sealed {
    fn new() -> Self {
        let fx = Fixture::new();
        let people = [&fx.people.alice, &fx.people.bob, &fx.people.bea];
        let specs: Vec<HolderSpec> = people
            .iter()
            .map(|p| HolderSpec {
                name: p.name.clone(),
                spiffe_id: user(&p.name),
                public_key: p.key.public_key().to_openssh().unwrap(),
            })
            .collect();
        for name in HOLDERS {
            fx.ca
                .issue_user(TD, name)
                .unwrap()
                .write(fx.path(), name)
                .unwrap();
        }
        let dir = fx.path().join("seal");
        std::fs::create_dir(&dir).unwrap();
        let split = unseal::split(&SecretKey::generate(), 2, &specs).unwrap();
        unseal::write_split(&dir, &split).unwrap();
        Self { fx, dir }
    }

    fn config(&self, audit: std::net::SocketAddr) -> VaultConfig {
        VaultConfig {
            seal: Some(SealConfig {
                mode: "shamir".into(),
                descriptor: self.dir.join(unseal::DESCRIPTOR_FILE),
                unseal_timeout: "10m".into(),
                ..Default::default()
            }),
            ..self.fx.vault_config(audit)
        }
    }

    /// `name`'s share, decrypted with their ssh key as `twokey vault unseal` does.
    fn share(&self, name: &str) -> Vec<u8> {
        let encrypted = std::fs::read(self.dir.join(format!("{name}.share.age"))).unwrap();
        self.decrypt(name, &encrypted)
    }

    /// `encrypted`, decrypted with `name`'s ssh key.
    fn decrypt(&self, name: &str, encrypted: &[u8]) -> Vec<u8> {
        let person = self
            .fx
            .people
            .all()
            .into_iter()
            .find(|p| p.name == name)
            .unwrap();
        let pem = person.key.to_openssh(LineEnding::LF).unwrap();
        let identity = age::ssh::Identity::from_buffer(pem.as_bytes(), None).unwrap();
        age::decrypt(&identity, encrypted).unwrap()
    }

    fn descriptor(&self) -> unseal::Descriptor {
        unseal::Descriptor::load(&self.dir.join(unseal::DESCRIPTOR_FILE)).unwrap()
    }

    fn holder(
        &self,
        addr: std::net::SocketAddr,
        name: &str,
    ) -> SealServiceClient<tonic::transport::Channel> {
        SealServiceClient::new(self.fx.channel(addr, name))
    }
}

async fn submit(
    client: &mut SealServiceClient<tonic::transport::Channel>,
    share: Vec<u8>,
) -> Result<Vec<String>, tonic::Status> {
    let progress = client
        .unseal(UnsealRequest { share })
        .await?
        .into_inner()
        .progress
        .unwrap();
    Ok(progress.received_from)
}

async fn received(
    client: &mut SealServiceClient<tonic::transport::Channel>,
) -> (bool, Vec<String>) {
    let p = client
        .seal_status(SealStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .progress
        .unwrap();
    (p.sealed, p.received_from)
}

/// The vault service's health as a holder's certificate sees it.
async fn health(fx: &Fixture, addr: std::net::SocketAddr) -> ServingStatus {
    let answer = HealthClient::new(fx.channel(addr, "alice"))
        .check(HealthCheckRequest {
            service: "twokey.vault.v1.VaultService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(answer.status).unwrap()
}

async fn a_code(fx: &Fixture, addr: std::net::SocketAddr) -> Result<String, tonic::Status> {
    let release = fx.consented("aws-prod-root", 1);
    let request = GenerateCodeRequest {
        grant: Some(release.grant),
        evidence: Some(release.evidence),
    };
    let code = fx
        .broker_client(addr)
        .generate_code(request)
        .await?
        .into_inner()
        .code
        .unwrap();
    assert_eq!(code.code, code_of(SECRET, code.step));
    Ok(code.code)
}

#[tokio::test]
async fn exactly_k_shares_unseal_and_codes_work_k_minus_one_stays_sealed() {
    let logs = captured_logs();
    let s = Sealed::new();
    let audit_events = FakeAudit::default();
    let audit = start_fake_audit(&s.fx, audit_events.clone()).await;
    let vault = start_vault(s.config(audit.addr)).await;
    let broker = || s.fx.broker_client(vault.addr);

    let status = broker()
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(status.sealed);
    assert_eq!(health(&s.fx, vault.addr).await, ServingStatus::NotServing);
    let err = a_code(&s.fx, vault.addr).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(
        err.message(),
        "vault is sealed: 0 of 2 shares received; holders run `twokey vault unseal --share FILE`"
    );

    let alice = s.share("alice");
    let bob = s.share("bob");
    assert_eq!(
        submit(&mut s.holder(vault.addr, "alice"), alice.clone())
            .await
            .unwrap(),
        ["alice"]
    );
    // K - 1 shares: still sealed, for every call that needs the key.
    let err = a_code(&s.fx, vault.addr).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("1 of 2 shares received"),
        "{}",
        err.message()
    );
    let err = broker()
        .apply_policy(s.fx.policy_request("x", &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);

    submit(&mut s.holder(vault.addr, "bob"), bob.clone())
        .await
        .unwrap();
    assert_eq!(
        received(&mut s.holder(vault.addr, "bea")).await,
        (false, vec![])
    );
    assert_eq!(health(&s.fx, vault.addr).await, ServingStatus::Serving);
    assert!(
        !broker()
            .status(StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .sealed
    );
    s.fx.apply(vault.addr, 1, &["aws-prod-root"]).await;
    broker()
        .enroll(EnrollRequest {
            account_id: "aws-prod-root".into(),
            seed: Some(Seed::Base32Secret(SECRET.into())),
            grant: Some(s.fx.enroll_grant("aws-prod-root", "adam")),
            ..Default::default()
        })
        .await
        .unwrap();
    a_code(&s.fx, vault.addr).await.unwrap();

    // A share after the unseal changes nothing.
    let err = submit(&mut s.holder(vault.addr, "bea"), s.share("bea"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    // Every submission and the unseal are audited, without share material.
    let unsealed = stored_event(&audit_events, |e| e.action == "vault.unsealed").await;
    assert_eq!(unsealed.attributes["threshold"], "2");
    let shares: Vec<_> = audit_events
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.action == "vault.unseal_share")
        .map(|e| e.actor.clone())
        .collect();
    assert!(
        shares.contains(&user("alice")) && shares.contains(&user("bob")),
        "{shares:?}"
    );

    // No share in any log line, in any spelling.
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(text.contains("unsealed by 2 shares"), "the capture works");
    use base64::Engine;
    for share in [&alice, &bob] {
        let y = &share[share.len() - 32..];
        for spelling in [
            base64::engine::general_purpose::STANDARD.encode(y),
            y.iter().map(|b| format!("{b:02x}")).collect(),
            format!("{:?}", &y[..8]).trim_end_matches(']').to_owned(),
        ] {
            assert!(!text.contains(&spelling), "a share in the log: {spelling}");
        }
    }
}

#[tokio::test]
async fn wrong_shares_are_refused_by_name_and_change_nothing_received() {
    let s = Sealed::new();
    let audit = start_fake_audit(&s.fx, FakeAudit::default()).await;
    let vault = start_vault(s.config(audit.addr)).await;
    let mut alice = s.holder(vault.addr, "alice");
    submit(&mut alice, s.share("alice")).await.unwrap();

    // A duplicate.
    let err = submit(&mut alice, s.share("alice")).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(
        err.message(),
        "alice's share was received already (a duplicate)"
    );

    // Another holder's share submitted by the wrong identity.
    let err = submit(&mut alice, s.share("bob")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "this is bob's share; only bob may submit it");

    // A corrupted share: one byte of the key part flipped.
    let mut corrupted = s.share("bob");
    let last = corrupted.len() - 1;
    corrupted[last] ^= 1;
    let err = submit(&mut s.holder(vault.addr, "bob"), corrupted)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("bob's share is corrupted"),
        "{}",
        err.message()
    );

    // Not a share at all (the encrypted file, undecrypted).
    let raw = std::fs::read(s.dir.join("bob.share.age")).unwrap();
    let err = submit(&mut s.holder(vault.addr, "bob"), raw)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("not a twokey share"),
        "{}",
        err.message()
    );

    // A share of another seal.
    let other = Sealed::new();
    let err = submit(&mut s.holder(vault.addr, "bob"), other.share("bob"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("foreign share"), "{}", err.message());

    // Someone who holds no share.
    let err = submit(&mut s.holder(vault.addr, "mallory"), s.share("bob"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.message(),
        format!(
            "{} is not a share holder of this vault's seal",
            user("mallory")
        )
    );

    // None of it changed what was received; the honest K-th share unseals.
    assert_eq!(received(&mut alice).await, (true, vec!["alice".to_owned()]));
    submit(&mut s.holder(vault.addr, "bob"), s.share("bob"))
        .await
        .unwrap();
    assert!(!received(&mut alice).await.0);
}

#[test]
fn partial_shares_are_dropped_after_the_timeout() {
    let s = Sealed::new();
    let unsealer = Unsealer::new(s.descriptor(), Duration::from_secs(600));
    let t0 = Instant::now();
    assert!(matches!(
        unsealer.submit(&user("alice"), &s.share("alice"), t0),
        Ok(Submitted::Counted(_))
    ));
    // Still there just before the timeout.
    let (progress, dropped) = unsealer.progress(t0 + Duration::from_secs(599));
    assert_eq!((progress.received_from.len(), dropped.len()), (1, 0));
    // Gone at it, and said whose were dropped.
    let (progress, dropped) = unsealer.progress(t0 + Duration::from_secs(600));
    assert!(progress.sealed && progress.received_from.is_empty());
    assert_eq!(dropped, ["alice"]);
    // A late second share does not complete the dropped first one.
    let late = t0 + Duration::from_secs(601);
    match unsealer.submit(&user("bob"), &s.share("bob"), late) {
        Ok(Submitted::Counted(p)) => assert_eq!(p.received_from, ["bob"]),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        unsealer.submit(&user("alice"), &s.share("alice"), late),
        Ok(Submitted::Unsealed(..))
    ));
}

#[test]
fn shares_that_do_not_rebuild_the_recorded_key_drop_everything() {
    let s = Sealed::new();
    let mut d = s.descriptor();
    // A descriptor whose key check belongs to another key.
    d.key_check = {
        use base64::Engine;
        let other = twokey_vault::crypto::MasterKey::new(SecretKey::generate());
        base64::engine::general_purpose::STANDARD.encode(other.key_check())
    };
    let unsealer = Unsealer::new(d, Duration::from_secs(600));
    let now = Instant::now();
    unsealer
        .submit(&user("alice"), &s.share("alice"), now)
        .unwrap();
    let err = unsealer
        .submit(&user("bob"), &s.share("bob"), now)
        .unwrap_err();
    assert_eq!(err, UnsealError::KeyMismatch);
    assert!(unsealer.progress(now).0.received_from.is_empty());
}

#[tokio::test]
async fn the_vault_process_is_not_dumpable() {
    use std::os::unix::{fs::MetadataExt, process::CommandExt};
    let s = Sealed::new();
    let audit = start_fake_audit(&s.fx, FakeAudit::default()).await;
    let mut config = s.config(audit.addr);
    let path = s.fx.path().join("vault.toml");
    let text = format!(
        "listen = \"127.0.0.1:0\"\ntrust_domain = \"{TD}\"\ndata_dir = \"{data}\"\nevent_key_file = \"{event}\"\nbroker_id = \"{broker}\"\ngrant_public_key = \"{grant}\"\naudit_address = \"{audit}\"\n\n[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\nca = \"{ca}\"\n\n[consent]\nadmins_file = \"{admins}\"\nthreshold = 2\n\n[seal]\nmode = \"shamir\"\ndescriptor = \"{descriptor}\"\n",
        data = config.data_dir.display(),
        event = config.event_key_file.display(),
        broker = config.broker_id,
        grant = config.grant_public_key,
        audit = config.audit_address,
        cert = config.tls.cert.display(),
        key = config.tls.key.display(),
        ca = config.tls.ca.display(),
        admins = config.consent.take().unwrap().admins_file.display(),
        descriptor = config.seal.take().unwrap().descriptor.display(),
    );
    std::fs::write(&path, text).unwrap();
    // Run as another user than root when the test is root, so that the
    // owner of /proc/<pid> tells: a non-dumpable process's is root.
    let root = rustix::process::geteuid().is_root();
    let as_other = |cmd: &mut std::process::Command| {
        if root {
            cmd.uid(65534).gid(65534);
        }
    };
    if root {
        for entry in walk(s.fx.path()) {
            std::os::unix::fs::chown(&entry, Some(65534), Some(65534)).unwrap();
        }
    }
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_twokey-vault"));
    command.arg("serve").arg("--config").arg(&path);
    as_other(&mut command);
    let log = std::fs::File::create(s.fx.path().join("vault.log")).unwrap();
    let (mut vault, _addr) = tokio::task::spawn_blocking(move || {
        twokey_testkit::ready::start(command, "twokey-vault", log, Duration::from_secs(60))
    })
    .await
    .unwrap()
    .expect("the sealed vault serves");
    let mut control = std::process::Command::new("sleep");
    control.arg("30");
    as_other(&mut control);
    let mut control = control.spawn().unwrap();
    let owner = |pid: u32| {
        std::fs::metadata(format!("/proc/{pid}/status"))
            .unwrap()
            .uid()
    };
    let (vault_owner, control_owner) = (owner(vault.id()), owner(control.id()));
    for child in [&mut vault, &mut control] {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert_ne!(
        control_owner, 0,
        "the control process is dumpable and not root's"
    );
    assert_eq!(
        vault_owner, 0,
        "the vault's /proc entry is root's: it is not dumpable"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_owned()];
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn init_key_seal_shamir_writes_shares_and_a_descriptor_but_no_key_and_refuses_bad_input() {
    let s = Sealed::new();
    let mut holders = Vec::new();
    for p in [&s.fx.people.alice, &s.fx.people.bob, &s.fx.people.bea] {
        let path = s.fx.path().join(format!("{}.pub", p.name));
        std::fs::write(&path, p.key.public_key().to_openssh().unwrap()).unwrap();
        holders.push(format!(
            "--holder={}={}={}",
            p.name,
            user(&p.name),
            path.display()
        ));
    }
    let init = |out: &std::path::Path, threshold: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_twokey-vault"))
            .args([
                "init-key",
                "--seal",
                "shamir",
                "--threshold",
                threshold,
                "--out",
            ])
            .arg(out)
            .args(&holders)
            .output()
            .unwrap()
    };
    let out = s.fx.path().join("split");
    let o = init(&out, "2");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "alice.share.age",
            "bea.share.age",
            "bob.share.age",
            "seal.toml"
        ]
    );
    let d = unseal::Descriptor::load(&out.join("seal.toml")).unwrap();
    assert_eq!((d.threshold, d.holders.len()), (2, 3));
    assert_eq!(d.holders[1].spiffe_id, user("bob"));

    // K above N: a clear refusal, nothing written, no panic.
    let bad = s.fx.path().join("bad");
    let o = init(&bad, "4");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--threshold 4 with 3 holders"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!bad.exists());
}

/// A vault of `s` serving on `audit`, unsealed by alice and bob, with
/// policy 1 applied and aws-prod-root enrolled.
async fn opened(s: &Sealed, audit: std::net::SocketAddr) -> Running {
    opened_with(s, s.config(audit)).await
}

/// [`opened`] with `config`.
async fn opened_with(s: &Sealed, config: VaultConfig) -> Running {
    let vault = start_vault(config).await;
    for name in ["alice", "bob"] {
        submit(&mut s.holder(vault.addr, name), s.share(name))
            .await
            .unwrap();
    }
    s.fx.apply(vault.addr, 1, &["aws-prod-root"]).await;
    s.fx.broker_client(vault.addr)
        .enroll(EnrollRequest {
            account_id: "aws-prod-root".into(),
            seed: Some(Seed::Base32Secret(SECRET.into())),
            grant: Some(s.fx.enroll_grant("aws-prod-root", "adam")),
            ..Default::default()
        })
        .await
        .unwrap();
    vault
}

async fn sealed(fx: &Fixture, addr: std::net::SocketAddr) -> bool {
    fx.broker_client(addr)
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .sealed
}

/// `admins`' consent to seal the vault under policy 1, issued `ago`.
fn seal_consent(admins: &[&twokey_testkit::consent::Person], ago: Duration) -> AdminConsent {
    let action_id = new_id();
    AdminConsent {
        statements: admins
            .iter()
            .map(|a| {
                let statement = new_statement(
                    1,
                    a.id(),
                    std::time::SystemTime::now() - ago,
                    admin_binding("", AdminAction::SealVault, &action_id),
                );
                sign_statement(&a.key, TD, &statement).unwrap()
            })
            .collect(),
    }
}

async fn seal(
    client: &mut SealServiceClient<tonic::transport::Channel>,
    consent: AdminConsent,
) -> Result<Vec<String>, tonic::Status> {
    Ok(client
        .seal(SealRequest {
            consent: Some(consent),
        })
        .await?
        .into_inner()
        .admins)
}

#[tokio::test]
async fn admins_seal_a_running_vault_and_its_holders_unseal_it_again() {
    let s = Sealed::new();
    let events = FakeAudit::default();
    let audit = start_fake_audit(&s.fx, events.clone()).await;
    let vault = opened(&s, audit.addr).await;
    let (adam, anna) = (&s.fx.people.adam, &s.fx.people.anna);
    let consent = seal_consent(&[adam, anna], Duration::ZERO);

    // Any member of the trust domain may carry the admins' statements.
    let admins = seal(&mut s.holder(vault.addr, "mallory"), consent.clone())
        .await
        .unwrap();
    assert_eq!(admins, [user("adam"), user("anna")]);

    // Sealed exactly as at a sealed start.
    assert!(sealed(&s.fx, vault.addr).await);
    assert_eq!(health(&s.fx, vault.addr).await, ServingStatus::NotServing);
    let err = a_code(&s.fx, vault.addr).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(
        err.message(),
        "vault is sealed: 0 of 2 shares received; holders run `twokey vault unseal --share FILE`"
    );
    let event = stored_event(&events, |e| e.action == "vault.sealed").await;
    assert_eq!(event.attributes["admins"], "adam,anna");
    assert_eq!(event.actor, format!("{},{}", user("adam"), user("anna")));

    // Sealed already: refused, nothing recorded.
    let again = seal_consent(&[adam, anna], Duration::ZERO);
    let err = seal(&mut s.holder(vault.addr, "alice"), again)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(err.message(), "the vault is sealed already");

    // The holders unseal it again (other holders than at start), and the
    // same key opens the same seeds.
    for name in ["bea", "alice"] {
        submit(&mut s.holder(vault.addr, name), s.share(name))
            .await
            .unwrap();
    }
    assert_eq!(health(&s.fx, vault.addr).await, ServingStatus::Serving);
    a_code(&s.fx, vault.addr).await.unwrap();

    // The same statements again: the action id is used.
    let err = seal(&mut s.holder(vault.addr, "alice"), consent)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("already"), "{}", err.message());
    assert!(!sealed(&s.fx, vault.addr).await);
}

#[tokio::test]
async fn a_release_in_flight_when_the_vault_is_sealed_ends_whole_with_its_events() {
    let s = Sealed::new();
    let events = FakeAudit::default();
    let audit = start_fake_audit(&s.fx, events.clone()).await;
    let audit_addr = audit.addr;
    let config = VaultConfig {
        audit_ack_timeout_ms: 3000,
        ..s.config(audit_addr)
    };
    let vault = opened_with(&s, config).await;
    // Audit down: a release waits (up to 3 s) for its acknowledgement.
    audit.stop().await;
    let mut broker = s.fx.broker_client(vault.addr);
    broker.status(StatusRequest {}).await.unwrap();
    let release = s.fx.consented("aws-prod-root", 1);
    let call = tokio::spawn(async move {
        broker
            .generate_code(GenerateCodeRequest {
                grant: Some(release.grant),
                evidence: Some(release.evidence),
            })
            .await
    });
    // Give the call time to reach the vault (it then holds it until it ends).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let consent = seal_consent(&[&s.fx.people.adam, &s.fx.people.anna], Duration::ZERO);
    // The seal needs no acknowledgement from audit: it works while audit is down.
    seal(&mut s.holder(vault.addr, "alice"), consent)
        .await
        .unwrap();
    let err = call.await.unwrap().unwrap_err();
    assert!(sealed(&s.fx, vault.addr).await);
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // Audit back on its address: the events the vault kept arrive.
    let _audit = start_fake_audit_on(&s.fx, events.clone(), &audit_addr.to_string()).await;
    stored_event(&events, |e| e.action == "vault.sealed").await;
    let released = |events: &FakeAudit| {
        events
            .events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.action == "code.released")
            .count()
    };
    if err.message().starts_with("vault is sealed") {
        // The seal came first: the call never started, nothing released.
        assert_eq!(released(&events), 0);
    } else {
        // The call was in flight: it ran its whole path, not cut off by
        // the seal: released, not acknowledged, withheld, both recorded.
        assert!(
            err.message()
                .contains("audit unavailable, no code released"),
            "{}",
            err.message()
        );
        stored_event(&events, |e| e.action == "code.withheld").await;
        assert_eq!(released(&events), 1);
    }
}

#[tokio::test]
async fn a_seal_without_m_admins_fresh_consent_to_seal_is_refused_and_changes_nothing() {
    let s = Sealed::new();
    let events = FakeAudit::default();
    let audit = start_fake_audit(&s.fx, events.clone()).await;
    let vault = opened(&s, audit.addr).await;
    let p = &s.fx.people;
    let mut client = s.holder(vault.addr, "alice");
    let other_action = |action: AdminAction, account: &str| {
        let id = new_id();
        AdminConsent {
            statements: [&p.adam, &p.anna]
                .iter()
                .map(|a| by(a, 1, admin_binding(account, action, &id)))
                .collect(),
        }
    };
    let cases: Vec<(&str, AdminConsent, Code, &str)> = vec![
        (
            "too few admins",
            seal_consent(&[&p.adam], Duration::ZERO),
            Code::FailedPrecondition,
            "seal of the vault needs 2 distinct admins, 1 signed (adam); collect more admin signatures",
        ),
        (
            "a signer who is no admin",
            seal_consent(&[&p.adam, &p.olivia], Duration::ZERO),
            Code::PermissionDenied,
            "admin statement #2: person olivia (spiffe://twokey.test/user/olivia) is not admin",
        ),
        (
            "a statement for another action",
            other_action(AdminAction::RotateKey, ""),
            Code::FailedPrecondition,
            "it consents to rotate-key of the vault, the vault is asked to seal of the vault",
        ),
        (
            "an account action",
            other_action(AdminAction::Disable, "aws-prod-root"),
            Code::FailedPrecondition,
            "disable of account aws-prod-root",
        ),
        (
            "expired statements",
            seal_consent(&[&p.adam, &p.anna], Duration::from_secs(25 * 3600)),
            Code::FailedPrecondition,
            "is out of its time window: signed 900",
        ),
        (
            "no statements",
            AdminConsent { statements: vec![] },
            Code::PermissionDenied,
            "admin statement #1 is missing",
        ),
    ];
    for (what, consent, code, says) in cases {
        let err = seal(&mut client, consent).await.unwrap_err();
        assert_eq!(err.code(), code, "{what}: {}", err.message());
        assert!(err.message().contains(says), "{what}: {}", err.message());
        assert!(!sealed(&s.fx, vault.addr).await, "{what} sealed the vault");
    }
    // Each refusal is audited; none sealed.
    let refused = stored_event(&events, |e| {
        e.action == "admin_action.refused" && e.attributes["reason"].contains("sign again")
    })
    .await;
    assert_eq!(refused.attributes["admin_action"], "seal");
    assert!(
        !events
            .events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.action == "vault.sealed")
    );
    a_code(&s.fx, vault.addr).await.unwrap();
}

#[tokio::test]
async fn the_file_mode_cannot_be_sealed_and_has_no_holders() {
    let fx = Fixture::new();
    fx.ca
        .issue_user(TD, "alice")
        .unwrap()
        .write(fx.path(), "alice")
        .unwrap();
    let audit = start_fake_audit(&fx, FakeAudit::default()).await;
    let vault = start_vault(fx.vault_config(audit.addr)).await;
    let mut client = SealServiceClient::new(fx.channel(vault.addr, "alice"));
    let consent = seal_consent(&[&fx.people.adam, &fx.people.anna], Duration::ZERO);
    let err = seal(&mut client, consent).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message()
            .starts_with("this vault does not run in the shamir seal mode"),
        "{}",
        err.message()
    );
    let err = client
        .unseal(UnsealRequest { share: vec![1] })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(!sealed(&fx, vault.addr).await);
}

/// A new holder of a reshare plan, with their own ssh key.
fn new_holder(s: &Sealed, name: &str) -> ShareHolder {
    let person =
        s.fx.people
            .all()
            .into_iter()
            .find(|p| p.name == name)
            .unwrap();
    ShareHolder {
        name: name.into(),
        spiffe_id: user(name),
        public_key: person.key.public_key().to_openssh().unwrap(),
    }
}

async fn reshare(
    client: &mut SealServiceClient<tonic::transport::Channel>,
    plan_id: &str,
    share: Vec<u8>,
) -> Result<ReshareResponse, tonic::Status> {
    Ok(client
        .reshare(ReshareRequest {
            plan_id: plan_id.into(),
            share,
        })
        .await?
        .into_inner())
}

#[tokio::test]
async fn reshare_2_of_3_to_3_of_4_keeps_the_key_and_after_a_restart_only_new_shares_unseal() {
    let logs = captured_logs();
    let s = Sealed::new();
    for name in ["olivia", "adam"] {
        s.fx.ca
            .issue_user(TD, name)
            .unwrap()
            .write(s.fx.path(), name)
            .unwrap();
    }
    let events = FakeAudit::default();
    let audit = start_fake_audit(&s.fx, events.clone()).await;
    let vault = opened(&s, audit.addr).await;
    let descriptor = s.dir.join(unseal::DESCRIPTOR_FILE);
    let before = std::fs::read(&descriptor).unwrap();
    let old = s.descriptor();
    let holders: Vec<ShareHolder> = ["alice", "bob", "olivia", "adam"]
        .iter()
        .map(|n| new_holder(&s, n))
        .collect();
    let plan = |threshold| StartReshareRequest {
        threshold,
        holders: holders.clone(),
    };
    let (mut alice, mut bob) = (s.holder(vault.addr, "alice"), s.holder(vault.addr, "bob"));

    // Only a current holder starts one; a plan must be a valid split.
    let err = s
        .holder(vault.addr, "olivia")
        .start_reshare(plan(3))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = alice.start_reshare(plan(5)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("--threshold 5 with 4 holders"),
        "{}",
        err.message()
    );
    let started = alice
        .start_reshare(plan(3))
        .await
        .unwrap()
        .into_inner()
        .progress
        .unwrap()
        .reshare
        .unwrap();
    assert_eq!(
        (started.threshold, started.holders.len()),
        (3, holders.len())
    );
    assert_eq!(started.started_by, user("alice"));
    let id = started.plan_id;
    let err = bob.start_reshare(plan(3)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    // K - 1 shares: counted, nothing changed.
    let counted = reshare(&mut alice, &id, s.share("alice")).await.unwrap();
    assert!(counted.seal_id.is_empty() && counted.shares.is_empty());
    assert_eq!(
        counted.progress.unwrap().reshare.unwrap().received_from,
        ["alice"]
    );

    // Wrong, duplicate and foreign shares: refused by name, nothing changed.
    let err = reshare(&mut alice, &id, s.share("alice"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(
        err.message(),
        "alice's share was received already (a duplicate)"
    );
    let err = reshare(&mut bob, &id, s.share("alice")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "this is alice's share; only alice may submit it"
    );
    let foreign = Sealed::new();
    let err = reshare(&mut bob, &id, foreign.share("bob"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("foreign share"), "{}", err.message());
    let err = reshare(&mut s.holder(vault.addr, "mallory"), &id, s.share("bob"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = reshare(&mut bob, "0000000000000000", s.share("bob"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message()
            .starts_with(&format!("the reshare in progress is {id}")),
        "{}",
        err.message()
    );
    assert_eq!(std::fs::read(&descriptor).unwrap(), before);
    let status = received_reshare(&mut bob).await;
    assert_eq!(status, ["alice"]);

    // The K-th share: a new split of the same key, written and in force.
    let done = reshare(&mut bob, &id, s.share("bob")).await.unwrap();
    assert_ne!(done.seal_id, old.seal_id);
    assert_eq!(done.shares.len(), 4);
    let new = s.descriptor();
    assert_eq!(new.seal_id, done.seal_id);
    assert_eq!((new.threshold, new.holders.len()), (3, 4));
    for share in &done.shares {
        let file = s
            .dir
            .join(&done.seal_id)
            .join(format!("{}.share.age", share.holder));
        assert_eq!(std::fs::read(file).unwrap(), share.encrypted);
    }
    let progress = done.progress.unwrap();
    assert!(!progress.sealed && progress.reshare.is_none());
    assert_eq!(progress.seal_id, done.seal_id);
    let reshared = stored_event(&events, |e| e.action == "vault.reshared").await;
    assert_eq!(reshared.attributes["old_seal_id"], old.seal_id);
    assert_eq!(reshared.attributes["seal_id"], done.seal_id);
    stored_event(&events, |e| e.action == "vault.reshare_started").await;
    // Still unsealed and serving.
    assert!(!sealed(&s.fx, vault.addr).await);

    // After a restart: the old shares are foreign, the new ones unseal.
    vault.stop().await;
    let vault = start_vault(s.config(audit.addr)).await;
    let err = submit(&mut s.holder(vault.addr, "alice"), s.share("alice"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("foreign share"), "{}", err.message());
    let new_share = |name: &str| {
        let encrypted = &done
            .shares
            .iter()
            .find(|n| n.holder == name)
            .unwrap()
            .encrypted;
        s.decrypt(name, encrypted)
    };
    for name in ["olivia", "adam"] {
        submit(&mut s.holder(vault.addr, name), new_share(name))
            .await
            .unwrap();
    }
    assert!(
        sealed(&s.fx, vault.addr).await,
        "2 of the new 3 unseal nothing"
    );
    submit(&mut s.holder(vault.addr, "bob"), new_share("bob"))
        .await
        .unwrap();
    assert!(!sealed(&s.fx, vault.addr).await);
    // The same master key: the seed enrolled before the reshare gives codes.
    a_code(&s.fx, vault.addr).await.unwrap();

    // No old or new share in any log line, in any spelling.
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(text.contains("reshared: seal"), "the capture works");
    use base64::Engine;
    let shares = [
        s.share("alice"),
        s.share("bob"),
        new_share("olivia"),
        new_share("bob"),
    ];
    for share in &shares {
        let y = &share[share.len() - 32..];
        for spelling in [
            base64::engine::general_purpose::STANDARD.encode(y),
            y.iter().map(|b| format!("{b:02x}")).collect(),
            format!("{:?}", &y[..8]).trim_end_matches(']').to_owned(),
        ] {
            assert!(!text.contains(&spelling), "a share in the log: {spelling}");
        }
    }
}

async fn received_reshare(
    client: &mut SealServiceClient<tonic::transport::Channel>,
) -> Vec<String> {
    client
        .seal_status(SealStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .progress
        .unwrap()
        .reshare
        .map(|r| r.received_from)
        .unwrap_or_default()
}

#[test]
fn a_reshare_needs_an_unsealed_vault_and_expires_with_its_shares() {
    let s = Sealed::new();
    let path = s.dir.join(unseal::DESCRIPTOR_FILE);
    let before = std::fs::read(&path).unwrap();
    let unsealer =
        Unsealer::new(s.descriptor(), Duration::from_secs(600)).with_descriptor_file(path.clone());
    let holders: Vec<HolderSpec> = ["alice", "bob", "bea"]
        .iter()
        .map(|n| {
            let h = new_holder(&s, n);
            HolderSpec::checked(&h.name, &h.spiffe_id, &h.public_key).unwrap()
        })
        .collect();
    let t0 = Instant::now();
    assert_eq!(
        unsealer
            .start_reshare(&user("alice"), 3, holders.clone(), t0)
            .unwrap_err(),
        UnsealError::SealedForReshare
    );
    unsealer
        .submit(&user("alice"), &s.share("alice"), t0)
        .unwrap();
    assert!(matches!(
        unsealer.submit(&user("bob"), &s.share("bob"), t0),
        Ok(Submitted::Unsealed(..))
    ));
    let p = unsealer
        .start_reshare(&user("alice"), 3, holders, t0)
        .unwrap();
    let plan = p.reshare.unwrap().plan_id;
    unsealer
        .submit_reshare(&user("bea"), &plan, &s.share("bea"), t0)
        .unwrap();
    // Still there just before the timeout; gone at it, saying whose.
    assert_eq!(
        unsealer.expire_reshare_at(t0 + Duration::from_secs(599)),
        None
    );
    assert_eq!(
        unsealer.expire_reshare_at(t0 + Duration::from_secs(600)),
        Some((plan.clone(), vec!["bea".to_owned()]))
    );
    // A late share completes nothing.
    assert_eq!(
        unsealer
            .submit_reshare(
                &user("alice"),
                &plan,
                &s.share("alice"),
                t0 + Duration::from_secs(601)
            )
            .unwrap_err(),
        UnsealError::NoReshare
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // A seal drops a reshare in progress too.
    let p = unsealer
        .start_reshare(
            &user("alice"),
            2,
            vec![
                HolderSpec::checked("alice", &user("alice"), &new_holder(&s, "alice").public_key)
                    .unwrap(),
                HolderSpec::checked("bob", &user("bob"), &new_holder(&s, "bob").public_key)
                    .unwrap(),
            ],
            t0 + Duration::from_secs(601),
        )
        .unwrap();
    assert!(p.reshare.is_some());
    let sealed = unsealer.seal().unwrap();
    assert!(sealed.sealed && sealed.reshare.is_none());
    assert_eq!(unsealer.seal().unwrap_err(), UnsealError::SealedAlready);
}

#[test]
fn a_new_split_that_cannot_be_written_whole_leaves_the_old_descriptor_in_force() {
    let s = Sealed::new();
    let path = s.dir.join(unseal::DESCRIPTOR_FILE);
    let before = std::fs::read(&path).unwrap();
    let specs: Vec<HolderSpec> = ["alice", "bob"]
        .iter()
        .map(|n| {
            let h = new_holder(&s, n);
            HolderSpec::checked(&h.name, &h.spiffe_id, &h.public_key).unwrap()
        })
        .collect();
    let split = || unseal::split(&SecretKey::generate(), 2, &specs).unwrap();

    // The shares cannot be written (their directory's name is taken).
    let first = split();
    std::fs::write(s.dir.join(&first.descriptor.seal_id), b"taken").unwrap();
    assert!(unseal::install_split(&path, &first).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), before);

    // The shares are written, the descriptor is not (a temporary file of
    // an earlier crash is in the way): the old one stays in force.
    let second = split();
    let temp = s.dir.join(format!(
        ".{}.{}.tmp",
        unseal::DESCRIPTOR_FILE,
        second.descriptor.seal_id
    ));
    std::fs::write(&temp, b"half").unwrap();
    assert!(unseal::install_split(&path, &second).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let old: unseal::Descriptor = toml::from_str(std::str::from_utf8(&before).unwrap()).unwrap();
    assert_eq!(s.descriptor(), old);

    // Written whole: the new one, and no temporary file left.
    let third = split();
    let written = unseal::install_split(&path, &third).unwrap();
    assert_eq!(written.len(), 2);
    assert_eq!(s.descriptor(), third.descriptor);
    let temps: Vec<_> = std::fs::read_dir(&s.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert_eq!(temps, [temp.file_name().unwrap().to_str().unwrap()]);
}

#[tokio::test]
async fn a_rotation_splits_a_new_master_key_to_the_same_holders_and_only_the_new_shares_unseal() {
    use twokey_proto::vault::v1::{
        KeyStatusRequest, RotateKeyRequest, key_service_client::KeyServiceClient,
    };
    let s = Sealed::new();
    let events = FakeAudit::default();
    let audit = start_fake_audit(&s.fx, events.clone()).await;
    let vault = opened(&s, audit.addr).await;
    let old = s.descriptor();
    let keys = || KeyServiceClient::new(s.fx.channel(vault.addr, "mallory"));
    let answer = keys()
        .rotate_key(RotateKeyRequest {
            consent: Some(s.fx.admin_consent(
                1,
                "",
                AdminAction::RotateKey,
                &[&s.fx.people.adam, &s.fx.people.anna],
            )),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.started);
    let replaced = answer.master_replaced.unwrap();
    let new = s.descriptor();
    // A new split: new seal id and key, the same K and holders.
    assert_ne!(new.seal_id, old.seal_id);
    assert_ne!(new.key_check, old.key_check);
    assert_eq!(replaced.seal_id, new.seal_id);
    assert_eq!(replaced.generation, 2);
    assert_eq!(new.threshold, old.threshold);
    let who = |d: &unseal::Descriptor| -> Vec<(String, String, String)> {
        d.holders
            .iter()
            .map(|h| (h.name.clone(), h.spiffe_id.clone(), h.public_key.clone()))
            .collect()
    };
    assert_eq!(who(&new), who(&old));
    // Each holder is told where their new share file is.
    let files: Vec<String> = HOLDERS
        .iter()
        .map(|n| {
            s.dir
                .join(&new.seal_id)
                .join(format!("{n}.share.age"))
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(replaced.files, files);
    let master = keys()
        .key_status(KeyStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .state
        .unwrap()
        .master
        .unwrap();
    assert_eq!(
        (
            master.generation,
            master.seal_mode.as_str(),
            master.seal_id.as_str()
        ),
        (2, "shamir", new.seal_id.as_str())
    );
    let event = stored_event(&events, |e| e.action == "key.master.replaced").await;
    assert_eq!(event.attributes["seal_id"], new.seal_id);
    assert_eq!(event.attributes["mode"], "shamir");
    // Still unsealed and serving.
    assert!(!sealed(&s.fx, vault.addr).await);

    // After a restart the old shares are foreign; K new ones unseal and
    // open the same seeds.
    vault.stop().await;
    let vault = start_vault(s.config(audit.addr)).await;
    let err = submit(&mut s.holder(vault.addr, "alice"), s.share("alice"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("foreign share"), "{}", err.message());
    let new_share = |name: &str| {
        let file = s.dir.join(&new.seal_id).join(format!("{name}.share.age"));
        s.decrypt(name, &std::fs::read(file).unwrap())
    };
    submit(&mut s.holder(vault.addr, "bea"), new_share("bea"))
        .await
        .unwrap();
    assert!(sealed(&s.fx, vault.addr).await);
    submit(&mut s.holder(vault.addr, "alice"), new_share("alice"))
        .await
        .unwrap();
    assert!(!sealed(&s.fx, vault.addr).await);
    a_code(&s.fx, vault.addr).await.unwrap();
}

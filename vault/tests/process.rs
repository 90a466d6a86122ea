//! The vault as its own process (the real `twokey-vault` binary) over mTLS,
//! called as the broker: it serves, refuses unsafe key files, and never
//! writes the seed to its log even at trace level.

mod common;

use std::{
    os::unix::fs::PermissionsExt,
    process::{Child, Command},
    time::Duration,
};

use common::*;
use twokey_proto::vault::v1::{EnrollRequest, enroll_request::Seed};
use twokey_testkit::ready;

const SECRET: &str = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQGEZDGNBV";

fn write_config(fx: &Fixture, audit: std::net::SocketAddr) -> std::path::PathBuf {
    let path = write_config_without_consent(fx, audit);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!(
        "[consent]\nadmins_file = {:?}\nthreshold = 2\n",
        fx.path()
            .join("admins.allowed_signers")
            .display()
            .to_string()
    ));
    std::fs::write(&path, text).unwrap();
    path
}

fn write_config_without_consent(fx: &Fixture, audit: std::net::SocketAddr) -> std::path::PathBuf {
    let c = fx.vault_config(audit);
    let text = format!(
        r#"listen = "127.0.0.1:0"
trust_domain = "{td}"
data_dir = "{data}"
master_key_file = "{master}"
event_key_file = "{event}"
broker_id = "{broker}"
grant_public_key = "{grant}"
audit_address = "{audit}"
[tls]
{tls}"#,
        td = c.trust_domain,
        data = c.data_dir.display(),
        master = c.master_key_file.display(),
        event = c.event_key_file.display(),
        broker = c.broker_id,
        grant = c.grant_public_key,
        audit = c.audit_address,
        tls = toml::to_string(&c.tls).unwrap(),
    );
    let path = fx.path().join("vault.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The vault binary with `config`, logging at trace level.
fn vault_command(config: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_twokey-vault"));
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .env("TWOKEY_LOG", "trace");
    cmd
}

/// A fresh log file beside the config, so a full pipe can never stall the vault.
fn log_file(config: &std::path::Path) -> std::fs::File {
    std::fs::File::create(log_path(config)).unwrap()
}

fn log_path(config: &std::path::Path) -> std::path::PathBuf {
    config.with_extension("log")
}

fn read_log(config: &std::path::Path) -> String {
    std::fs::read_to_string(log_path(config)).unwrap()
}

/// Runs the vault binary with `config`, which must refuse to start;
/// returns what it logged.
fn refused_start(config: &std::path::Path) -> String {
    let output = vault_command(config)
        .stderr(log_file(config))
        .output()
        .unwrap();
    assert!(!output.status.success(), "the vault started");
    read_log(config)
}

/// Starts the vault binary (off the runtime, which keeps serving the fake
/// audit meanwhile) and waits for its "listening on" line.
async fn start_vault_process(config: &std::path::Path) -> (Child, std::net::SocketAddr) {
    let (command, log) = (vault_command(config), log_file(config));
    tokio::task::spawn_blocking(move || {
        ready::start(command, "twokey-vault", log, Duration::from_secs(60))
    })
    .await
    .unwrap()
    .expect("the vault serves")
}

#[tokio::test]
async fn the_vault_process_serves_the_broker_and_never_logs_the_seed() {
    let fx = Fixture::new();
    let audit = start_fake_audit(&fx, FakeAudit::default()).await;
    let config = write_config(&fx, audit.addr);
    let (mut child, addr) = start_vault_process(&config).await;
    fx.apply(addr, 1, &["aws-prod-root"]).await;

    let mut client = fx.broker_client(addr);
    let enrolled = client
        .enroll(EnrollRequest {
            account_id: "aws-prod-root".into(),
            seed: Some(Seed::Base32Secret(SECRET.into())),
            grant: Some(fx.enroll_grant("aws-prod-root", "adam")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let code = client
        .generate_code(fx.consented("aws-prod-root", 1).request())
        .await
        .unwrap()
        .into_inner()
        .code
        .unwrap()
        .code;

    child.kill().unwrap();
    child.wait().unwrap();
    let log = read_log(&config);
    assert!(log.contains("code released"), "trace log is empty: {log}");
    let raw = data_encoding::BASE32_NOPAD
        .decode(SECRET.as_bytes())
        .unwrap();
    let raw_text = String::from_utf8_lossy(&raw).into_owned();
    for secret in [SECRET, &SECRET[..16], raw_text.as_str()] {
        assert!(!log.contains(secret), "seed in the log");
    }
    for released in [&code, &enrolled.current.unwrap().code] {
        assert!(!log.contains(released.as_str()), "a code in the log");
    }
}

#[tokio::test]
async fn the_vault_refuses_a_group_readable_master_key() {
    let fx = Fixture::new();
    let config = write_config(&fx, "127.0.0.1:9".parse().unwrap());
    let key = fx.path().join("master.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = refused_start(&config);
    assert!(
        err.contains("master.key") && err.contains("chmod 600"),
        "{err}"
    );
}

#[tokio::test]
async fn the_vault_refuses_a_master_key_that_does_not_match_its_data() {
    let fx = Fixture::new();
    let audit = start_fake_audit(&fx, FakeAudit::default()).await;
    let config = write_config(&fx, audit.addr);
    let (mut child, _) = start_vault_process(&config).await;
    child.kill().unwrap();
    child.wait().unwrap();

    let key = fx.path().join("master.key");
    std::fs::remove_file(&key).unwrap();
    twokey_runtime::keys::SecretKey::generate()
        .write(&key)
        .unwrap();
    let err = refused_start(&config);
    assert!(
        err.contains(
            "the master key file is not the key this data directory was created with: no stored \
             seed can be read with it"
        ) && err.contains("restore that file from its backup")
            && !err.contains("the seed of"),
        "{err}"
    );
}

#[test]
fn init_key_says_why_it_cannot_create_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let run = |out: &std::path::Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_twokey-vault"))
            .arg("init-key")
            .arg("--out")
            .arg(out)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let missing = dir.path().join("no-such-dir").join("master.key");
    let (ok, err) = run(&missing);
    assert!(!ok);
    assert!(
        err.contains("does not exist; create it first") && err.contains("no-such-dir"),
        "{err}"
    );
    let key = dir.path().join("master.key");
    assert!(run(&key).0);
    let (ok, err) = run(&key);
    assert!(!ok);
    assert!(
        err.contains("the file exists and is never overwritten"),
        "{err}"
    );
}

#[tokio::test]
async fn the_vault_does_not_start_without_its_consent_section() {
    let fx = Fixture::new();
    let config = write_config_without_consent(&fx, "127.0.0.1:9".parse().unwrap());
    let err = refused_start(&config);
    assert!(
        err.contains("the [consent] section is required")
            && err.contains("admins_file")
            && err.contains("threshold"),
        "{err}"
    );
    // A [consent] section whose admins cannot reach the threshold is no
    // better.
    let config = write_config(&fx, "127.0.0.1:9".parse().unwrap());
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("threshold = 2", "threshold = 3");
    std::fs::write(&config, text).unwrap();
    let err = refused_start(&config);
    assert!(
        err.contains("[consent] admins_file") && err.contains("threshold"),
        "{err}"
    );
}

/// `VmLck` of process `pid`, in kB.
fn locked_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmLck in /proc/PID/status")
}

#[tokio::test]
async fn the_vault_locks_its_memory_where_allowed_and_says_why_not_otherwise() {
    let fx = Fixture::new();
    let audit = start_fake_audit(&fx, FakeAudit::default()).await;
    let config = write_config(&fx, audit.addr);
    let (mut child, addr) = start_vault_process(&config).await;
    // Touch the vault, so that it has faulted in the pages serving takes.
    fx.apply(addr, 1, &["aws-prod-root"]).await;
    let locked = locked_kb(child.id());
    let _ = child.kill();
    let _ = child.wait();
    let log = read_log(&config);
    // The vault inherits this test's capabilities and limit.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let ipc_lock = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 14) != 0);
    let unlimited = rustix::process::getrlimit(rustix::process::Resource::Memlock)
        .current
        .is_none();
    if ipc_lock || unlimited {
        assert!(locked > 0, "VmLck is {locked} kB");
        assert!(
            log.contains("memory locked: keys and seeds never reach swap"),
            "{log}"
        );
    } else {
        assert_eq!(locked, 0);
        assert!(
            log.contains("memory not locked: RLIMIT_MEMLOCK is"),
            "{log}"
        );
    }
}

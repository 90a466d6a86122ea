//! The `twokey-broker` binary: `init-keys` writes private key files and
//! prints the public halves; `serve --config` announces its address and
//! answers over mTLS, with flags overriding the file.

use std::{
    io::{BufRead, BufReader},
    os::unix::fs::PermissionsExt,
    process::{Command, Stdio},
    time::Duration,
};

use twokey_proto::broker::v1::{WhoAmIRequest, broker_service_client::BrokerServiceClient};
use twokey_runtime::{keys, tls::TlsFiles};
use twokey_testkit::pki::DevCa;

const BIN: &str = env!("CARGO_BIN_EXE_twokey-broker");

#[test]
fn init_keys_writes_private_keys_and_prints_the_public_halves() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["init-keys", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let grant = keys::load_signing_key(&dir.path().join("grant.key")).unwrap();
    let event = keys::load_signing_key(&dir.path().join("event.key")).unwrap();
    assert_eq!(
        lines[0],
        format!(
            "grant_public_key = \"{}\"",
            keys::encode_public_key(&grant.verifying_key())
        )
    );
    assert_eq!(
        lines[1],
        format!(
            "event_public_key = \"{}\"",
            keys::encode_public_key(&event.verifying_key())
        )
    );
    for name in ["grant.key", "event.key", "pin.key"] {
        let mode = std::fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{name}");
    }
    keys::SecretKey::load(&dir.path().join("pin.key")).unwrap();
    // Never overwrites existing keys.
    let again = Command::new(BIN)
        .args(["init-keys", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!again.status.success());
}

#[tokio::test]
async fn serve_announces_its_address_and_answers_over_mtls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ca = DevCa::new("twokey.local").unwrap();
    ca.write(root).unwrap();
    ca.issue_service("twokey.local", "broker")
        .unwrap()
        .write(root, "broker")
        .unwrap();
    ca.issue_user("twokey.local", "alice")
        .unwrap()
        .write(root, "alice")
        .unwrap();
    let keys_out = Command::new(BIN)
        .args(["init-keys", "--dir"])
        .arg(root)
        .output()
        .unwrap();
    assert!(keys_out.status.success());
    std::fs::write(
        root.join("policy.toml"),
        "[identities]\nalice = \"spiffe://twokey.local/user/alice\"\n",
    )
    .unwrap();
    // No config file: every setting from a TWOKEY_BROKER_* variable, paths
    // relative to the working directory.
    let mut child = Command::new(BIN)
        .arg("serve")
        .current_dir(root)
        .env_remove("TWOKEY_BROKER_CONFIG")
        .envs([
            ("TWOKEY_BROKER_LISTEN", "127.0.0.1:0"),
            ("TWOKEY_BROKER_DATA_DIR", "data"),
            ("TWOKEY_BROKER_POLICY_FILE", "policy.toml"),
            ("TWOKEY_BROKER_GRANT_KEY_FILE", "grant.key"),
            ("TWOKEY_BROKER_EVENT_KEY_FILE", "event.key"),
            ("TWOKEY_BROKER_PIN_KEY_FILE", "pin.key"),
            ("TWOKEY_BROKER_VAULT_ADDRESS", "https://127.0.0.1:9"),
            ("TWOKEY_BROKER_TLS_CERT", "broker.crt"),
            ("TWOKEY_BROKER_TLS_KEY", "broker.key"),
            ("TWOKEY_BROKER_TLS_CA", "ca.crt"),
            ("TWOKEY_BROKER_NOTIFY_MAILBOX_DIR", "mailbox"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    });
    let line = tokio::time::timeout(Duration::from_secs(30), line)
        .await
        .unwrap()
        .unwrap();
    let addr = twokey_testkit::ready::announced_addr(&line, "twokey-broker")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    let channel = TlsFiles::in_dir(root, "alice")
        .channel(&format!("https://{addr}"), "broker")
        .unwrap();
    let me = BrokerServiceClient::new(channel)
        .who_am_i(WhoAmIRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (me.identity.as_str(), me.name.as_str()),
        ("spiffe://twokey.local/user/alice", "alice")
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn serve_names_a_missing_field_and_how_to_set_it() {
    let out = Command::new(BIN)
        .args(["serve"])
        .env_remove("TWOKEY_BROKER_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("data_dir is required"), "{stderr}");
    assert!(stderr.contains("TWOKEY_BROKER_DATA_DIR"), "{stderr}");
}

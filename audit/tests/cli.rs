//! The `twokey-audit` binary's commands that need no server.

use std::{os::unix::fs::PermissionsExt, process::Command};

use base64::Engine;
use twokey_audit::checkpoint::NoteVerifier;
use twokey_runtime::keys::{encode_public_key, load_signing_key};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_twokey-audit"))
}

#[test]
fn init_key_writes_a_private_key_and_prints_only_its_public_parts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("checkpoint.key");
    let run = bin()
        .args(["init-key", "--origin", "example.org/audit", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let key = load_signing_key(&out).unwrap();
    let stdout = String::from_utf8(run.stdout).unwrap();
    let verifier_line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("verifier key: "))
        .expect("a verifier key line");
    let verifier = NoteVerifier::parse(verifier_line).unwrap();
    assert_eq!(verifier.name(), "example.org/audit");
    assert_eq!(verifier.key(), &key.verifying_key());
    assert!(stdout.contains(&format!(
        "public key: {}",
        encode_public_key(&key.verifying_key())
    )));
    let secret = base64::engine::general_purpose::STANDARD.encode(key.as_bytes());
    assert!(!stdout.contains(&secret), "the private key was printed");

    // An existing key is never overwritten.
    let again = bin()
        .args(["init-key", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert_eq!(
        load_signing_key(&out).unwrap().verifying_key(),
        key.verifying_key()
    );
}

#[test]
fn serve_with_a_bad_config_names_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("audit.toml");
    std::fs::write(&config, "listen = \"nowhere\"\n").unwrap();
    let run = bin()
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains(&config.display().to_string()), "{stderr}");
    assert!(stderr.contains("listen"), "{stderr}");
}

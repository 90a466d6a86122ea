//! `twokey pki init`: certificates with the right SPIFFE IDs, keys 0600, a
//! profile per user, and no clobbering of a non-empty directory.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{json, one_line_error, pki_init, twokey};
use twokey_runtime::identity::spiffe_ids_in_cert;

fn der(pem: &str) -> Vec<u8> {
    use base64::Engine;
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

fn ids(path: &std::path::Path) -> Vec<String> {
    let pem = std::fs::read_to_string(path).unwrap();
    spiffe_ids_in_cert(&der(&pem))
        .unwrap()
        .into_iter()
        .map(|id| id.to_string())
        .collect()
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn pki_init_issues_certificates_with_the_right_spiffe_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    twokey()
        .args(["pki", "init", "--dir"])
        .arg(&dir)
        .args(["--trust-domain", "corp.example"])
        .args(["--user", "alice:requester", "--user", "bob:approver"])
        .args(["--user", "bpm:intake"])
        .assert()
        .success();
    for svc in ["vault", "broker", "audit"] {
        assert_eq!(
            ids(&dir.join(format!("{svc}.crt"))),
            [format!("spiffe://corp.example/svc/{svc}")]
        );
    }
    assert_eq!(
        ids(&dir.join("alice.crt")),
        ["spiffe://corp.example/user/alice"]
    );
    assert_eq!(
        ids(&dir.join("bob.crt")),
        ["spiffe://corp.example/user/bob"]
    );
    assert_eq!(ids(&dir.join("bpm.crt")), ["spiffe://corp.example/svc/bpm"]);
    assert!(dir.join("ca.crt").exists());
}

#[test]
fn pki_init_writes_every_key_with_mode_0600() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    pki_init(
        &dir,
        &["alice:operator"],
        "127.0.0.1:7400",
        "127.0.0.1:7403",
    );
    for name in ["ca", "vault", "broker", "audit", "alice"] {
        assert_eq!(mode(&dir.join(format!("{name}.key"))), 0o600, "{name}.key");
    }
    assert_eq!(mode(&dir.join("alice.ssh")), 0o600, "alice.ssh");
    assert_eq!(mode(&dir), 0o700);
}

#[test]
fn pki_init_writes_a_profile_per_user_and_audit_only_for_auditors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let config = pki_init(
        &dir,
        &["alice:requester", "carol:auditor"],
        "127.0.0.1:7400",
        "127.0.0.1:7403",
    );
    let text = std::fs::read_to_string(&config).unwrap();
    let value: toml::Value = toml::from_str(&text).unwrap();
    let alice = &value["profiles"]["alice"];
    assert_eq!(alice["broker"].as_str(), Some("https://127.0.0.1:7400"));
    assert_eq!(alice["cert"].as_str(), Some("alice.crt"));
    assert_eq!(alice["ssh_key"].as_str(), Some("alice.ssh"));
    assert!(alice.get("audit").is_none());
    assert_eq!(
        value["profiles"]["carol"]["audit"].as_str(),
        Some("https://127.0.0.1:7403")
    );
}

#[test]
fn pki_init_refuses_a_non_empty_directory_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("something"), "x").unwrap();
    let err = one_line_error(twokey().args(["pki", "init", "--dir"]).arg(tmp.path()), 1);
    assert!(err.contains("not empty"), "{err}");
    assert!(err.contains("--force"), "{err}");
    assert!(!tmp.path().join("ca.crt").exists());

    twokey()
        .args(["pki", "init", "--force", "--dir"])
        .arg(tmp.path())
        .assert()
        .success();
    let first_ca = std::fs::read_to_string(tmp.path().join("ca.crt")).unwrap();
    // Forcing again replaces the files (the key writer never overwrites).
    twokey()
        .args(["pki", "init", "--force", "--dir"])
        .arg(tmp.path())
        .assert()
        .success();
    let second_ca = std::fs::read_to_string(tmp.path().join("ca.crt")).unwrap();
    assert_ne!(first_ca, second_ca);
    assert_eq!(mode(&tmp.path().join("ca.key")), 0o600);
}

#[test]
fn pki_init_json_lists_every_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let v = json(
        twokey()
            .args(["pki", "init", "--dir"])
            .arg(&dir)
            .args(["--user", "dave:admin"]),
    );
    let ids: Vec<&str> = v["identities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["spiffeId"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "spiffe://twokey.local/svc/vault",
            "spiffe://twokey.local/svc/broker",
            "spiffe://twokey.local/svc/audit",
            "spiffe://twokey.local/user/dave",
        ]
    );
    assert_eq!(v["trustDomain"], "twokey.local");
    let dave = &v["identities"][3];
    assert_eq!(
        dave["sshKey"].as_str(),
        Some(dir.join("dave.ssh").to_str().unwrap())
    );
    assert!(v["identities"][0].get("sshKey").is_none());
}

#[test]
fn pki_init_gives_each_user_an_openssh_key_that_ssh_keygen_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    pki_init(&dir, &["anna:admin"], "127.0.0.1:7400", "127.0.0.1:7403");
    let public = std::fs::read_to_string(dir.join("anna.ssh.pub")).unwrap();
    assert!(public.starts_with("ssh-ed25519 "), "{public}");
    // ssh-keygen derives the same public key from the private key file.
    let out = std::process::Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(dir.join("anna.ssh"))
        .output()
        .expect("ssh-keygen (OpenSSH) is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let derived = String::from_utf8(out.stdout).unwrap();
    let key_of = |line: &str| {
        line.split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(key_of(&derived), key_of(&public));
}

#[test]
fn pki_init_refuses_a_bad_trust_domain_and_duplicate_users() {
    let tmp = tempfile::tempdir().unwrap();
    twokey()
        .args(["pki", "init", "--trust-domain", "Bad Domain", "--dir"])
        .arg(tmp.path().join("a"))
        .assert()
        .code(2);
    twokey()
        .args([
            "pki",
            "init",
            "--user",
            "a:admin",
            "--user",
            "a:operator",
            "--dir",
        ])
        .arg(tmp.path().join("b"))
        .assert()
        .code(2);
}

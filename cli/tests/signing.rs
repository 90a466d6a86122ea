//! People sign with their own OpenSSH keys: statements and policy
//! signatures made by the CLI — from a key file, or through a real
//! `ssh-agent` after `ssh-add` — verify under a policy listing the key and
//! with stock `ssh-keygen -Y verify`; an agent without the key, and an
//! encrypted key file without an agent, give errors that say what to do.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::SystemTime,
};

use common::{Agent, json, one_line_error};
use twokey::sign::SshSigner;
use twokey_consent::{
    StatementKind, StatementRef, TrustRoot, new_id, new_statement, request_binding,
    ssh_key::PrivateKey, verify_policy_update, verify_statement,
};
use twokey_testkit::consent::{
    AccountRoles, Person, PolicySpec, admins_allowed_signers, sign_policy, write_key,
};

const TD: &str = "example.org";

fn person(name: &str) -> Person {
    Person::generate(name, vec![format!("spiffe://{TD}/user/{name}")])
}

/// alice, bob, olivia and the admins adam and anna, with a version-1
/// document listing them.
struct People {
    alice: Person,
    adam: Person,
    anna: Person,
    document: String,
}

impl People {
    fn new() -> Self {
        Self::with_alice(person("alice"))
    }

    fn with_alice(alice: Person) -> Self {
        let (bob, olivia, adam, anna) = (
            person("bob"),
            person("olivia"),
            person("adam"),
            person("anna"),
        );
        let spec = PolicySpec::adam_and_anna(
            1,
            TD,
            &[&alice, &bob, &olivia, &adam, &anna],
            vec![AccountRoles::new("aws-root", "alice", "bob", "olivia")],
        );
        Self {
            document: spec.to_toml(),
            alice,
            adam,
            anna,
        }
    }

    fn root(&self) -> TrustRoot {
        TrustRoot::from_allowed_signers(TD, &admins_allowed_signers(&[&self.adam, &self.anna]), 2)
            .unwrap()
    }

    fn verified(&self) -> twokey_consent::VerifiedPolicy {
        let sigs = [
            sign_policy(&self.adam.key, TD, &self.document),
            sign_policy(&self.anna.key, TD, &self.document),
        ];
        verify_policy_update(None, &self.root(), self.document.as_bytes(), &sigs).unwrap()
    }
}

/// A request statement by alice, signed by `signer`.
fn alice_request(signer: &SshSigner) -> twokey_consent::SignedStatement {
    let now = SystemTime::now();
    let alice = format!("spiffe://{TD}/user/alice");
    let statement = new_statement(
        1,
        &alice,
        now,
        request_binding(&new_id(), "aws-root", &alice, "rotate keys", "OPS-1", now),
    );
    signer.sign_statement(TD, &statement).unwrap()
}

/// A profile file naming `ssh_key` (no services needed for offline signing).
fn profile(dir: &Path, ssh_key: &Path) -> PathBuf {
    let path = dir.join("twokey.toml");
    std::fs::write(
        &path,
        format!(
            "[profiles.me]\nssh_key = {:?}\n",
            ssh_key.display().to_string()
        ),
    )
    .unwrap();
    path
}

fn twokey_with(config: &Path, agent: Option<&Path>) -> assert_cmd::Command {
    let mut cmd = common::twokey_as(config, "me");
    cmd.env_remove("SSH_AUTH_SOCK");
    if let Some(sock) = agent {
        cmd.env("SSH_AUTH_SOCK", sock);
    }
    cmd
}

/// `twokey policy sign --file DOC` with `config` (and `agent`).
fn policy_sign(config: &Path, agent: Option<&Path>, doc: &Path) -> assert_cmd::Command {
    let mut cmd = twokey_with(config, agent);
    cmd.args(["policy", "sign", "--file"]).arg(doc);
    cmd
}

/// `ssh-keygen -Y verify` of `signature` over `message` by `principal`
/// under `namespace`, with an allowed_signers file for `key`.
fn ssh_keygen_verifies(
    dir: &Path,
    principal: &str,
    key: &twokey_consent::ssh_key::PublicKey,
    namespace: &str,
    message: &[u8],
    signature: &[u8],
) -> bool {
    let signers = dir.join("allowed_signers");
    std::fs::write(
        &signers,
        format!("{principal} {}\n", key.to_openssh().unwrap()),
    )
    .unwrap();
    let sig = dir.join("message.sig");
    std::fs::write(&sig, signature).unwrap();
    let mut child = Command::new("ssh-keygen")
        .args(["-Y", "verify", "-f"])
        .arg(&signers)
        .args(["-I", principal, "-n", namespace, "-s"])
        .arg(&sig)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ssh-keygen (OpenSSH) is installed");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(message).unwrap();
    child.wait().unwrap().success()
}

#[test]
fn a_statement_signed_with_a_key_file_verifies_under_a_policy_listing_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let people = People::new();
    let path = write_key(dir.path(), "alice", &people.alice.key).unwrap();
    let signer = SshSigner::open(&path, None).unwrap();
    let signed = alice_request(&signer);
    let policy = people.verified();
    let opened = verify_statement(
        &policy,
        StatementRef::Request,
        &signed,
        StatementKind::Request,
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!(opened.signer.person, "alice");

    // The same bytes under a policy that lists another key for alice: refused.
    let other = People::new();
    let err = verify_statement(
        &other.verified(),
        StatementRef::Request,
        &signed,
        StatementKind::Request,
        SystemTime::now(),
    )
    .unwrap_err();
    assert_eq!(
        err.kind(),
        twokey_consent::ErrorKind::PermissionDenied,
        "{err}"
    );
}

#[test]
fn a_statement_signed_through_a_real_ssh_agent_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let people = People::new();
    let path = write_key(dir.path(), "alice", &people.alice.key).unwrap();
    let agent = Agent::start();
    agent.add(&path);
    let signer = SshSigner::open(&path, Some(agent.socket.clone())).unwrap();
    assert!(signer.via_agent());
    let signed = alice_request(&signer);
    verify_statement(
        &people.verified(),
        StatementRef::Request,
        &signed,
        StatementKind::Request,
        SystemTime::now(),
    )
    .unwrap();
    // And stock OpenSSH agrees.
    assert!(ssh_keygen_verifies(
        dir.path(),
        &format!("spiffe://{TD}/user/alice"),
        people.alice.public(),
        &format!("twokey-consent@{TD}"),
        &signed.statement,
        &signed.signature,
    ));
}

#[test]
fn the_cli_signs_through_a_real_ssh_agent_with_the_profiles_key() {
    let dir = tempfile::tempdir().unwrap();
    let people = People::new();
    let adam_key = write_key(dir.path(), "adam", &people.adam.key).unwrap();
    // The private key file is gone: only the agent and the .pub remain, so
    // the signature can only have come from the agent.
    let agent = Agent::start();
    agent.add(&adam_key);
    std::fs::remove_file(&adam_key).unwrap();
    let doc = dir.path().join("policy.toml");
    std::fs::write(&doc, &people.document).unwrap();
    let config = profile(dir.path(), &adam_key);
    let sig_path = dir.path().join("policy.toml.adam.sig");
    let report = json(
        policy_sign(&config, Some(&agent.socket), &doc)
            .arg("--out")
            .arg(&sig_path),
    );
    assert_eq!(report["namespace"], format!("twokey-policy@{TD}"));
    let adam_sig = std::fs::read(&sig_path).unwrap();
    assert!(adam_sig.starts_with(b"-----BEGIN SSH SIGNATURE-----"));
    // With anna's signature it is a valid version 1 under the pinned admins.
    let sigs = [
        adam_sig.clone(),
        sign_policy(&people.anna.key, TD, &people.document),
    ];
    let v = verify_policy_update(None, &people.root(), people.document.as_bytes(), &sigs).unwrap();
    // (The pinned admins are named by their first principal.)
    assert_eq!(
        v.signed_by(),
        [
            format!("spiffe://{TD}/user/adam"),
            format!("spiffe://{TD}/user/anna")
        ]
    );
    assert!(ssh_keygen_verifies(
        dir.path(),
        &format!("spiffe://{TD}/user/adam"),
        people.adam.public(),
        &format!("twokey-policy@{TD}"),
        people.document.as_bytes(),
        &adam_sig,
    ));
}

#[test]
fn an_agent_without_the_key_gives_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let people = People::new();
    let adam_key = write_key(dir.path(), "adam", &people.adam.key).unwrap();
    let agent = Agent::start(); // nothing added
    let doc = dir.path().join("policy.toml");
    std::fs::write(&doc, &people.document).unwrap();
    let config = profile(dir.path(), &adam_key);
    let err = one_line_error(&mut policy_sign(&config, Some(&agent.socket), &doc), 1);
    assert!(err.contains("does not hold your key"), "{err}");
    assert!(
        err.contains(&format!("ssh-add {}", adam_key.display())),
        "{err}"
    );
    // Never a private key in an error.
    assert!(!err.contains("PRIVATE KEY"), "{err}");
}

#[test]
fn an_encrypted_key_file_without_an_agent_says_to_ssh_add_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("adam.ssh");
    let made = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "correct horse",
            "-C",
            "adam",
            "-f",
        ])
        .arg(&key)
        .status()
        .expect("ssh-keygen (OpenSSH) is installed");
    assert!(made.success());
    // Without the .pub file too: the public half is read from the
    // encrypted file.
    std::fs::remove_file(dir.path().join("adam.ssh.pub")).unwrap();
    let people = People::new();
    let doc = dir.path().join("policy.toml");
    std::fs::write(&doc, &people.document).unwrap();
    let config = profile(dir.path(), &key);
    let err = one_line_error(&mut policy_sign(&config, None, &doc), 1);
    assert!(err.contains("encrypted"), "{err}");
    assert!(err.contains(&format!("ssh-add {}", key.display())), "{err}");
    assert!(err.contains("SSH_AUTH_SOCK"), "{err}");
}

#[test]
fn a_cli_signature_from_a_key_file_verifies_with_ssh_keygen() {
    let dir = tempfile::tempdir().unwrap();
    // A key made by ssh-keygen itself, as a person's existing key would be.
    let key = dir.path().join("anna.ssh");
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "anna", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen (OpenSSH) is installed");
    assert!(made.success());
    let anna_key = PrivateKey::read_openssh_file(&key).unwrap();
    let anna = Person {
        name: "anna".into(),
        ids: vec![format!("spiffe://{TD}/user/anna")],
        key: anna_key,
    };
    let people = People::new();
    let doc = dir.path().join("policy.toml");
    std::fs::write(&doc, &people.document).unwrap();
    let config = profile(dir.path(), &key);
    let out = policy_sign(&config, None, &doc)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    assert!(ssh_keygen_verifies(
        dir.path(),
        anna.id(),
        anna.public(),
        &format!("twokey-policy@{TD}"),
        people.document.as_bytes(),
        &out,
    ));
    // Not under another namespace.
    assert!(!ssh_keygen_verifies(
        dir.path(),
        anna.id(),
        anna.public(),
        &format!("twokey-consent@{TD}"),
        people.document.as_bytes(),
        &out,
    ));
}

#[test]
fn signing_without_an_ssh_key_in_the_profile_says_how_to_add_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("twokey.toml");
    std::fs::write(&config, "[profiles.me]\nbroker = \"https://127.0.0.1:1\"\n").unwrap();
    let doc = dir.path().join("policy.toml");
    std::fs::write(&doc, People::new().document).unwrap();
    let err = one_line_error(&mut policy_sign(&config, None, &doc), 2);
    assert!(err.contains("ssh_key"), "{err}");
    assert!(err.contains("ssh-keygen -t ed25519"), "{err}");
}

//! Shares decrypted through a real `ssh-agent`: holders whose ssh-ed25519
//! keys live in an agent started by the test derive their share recipients
//! through it (`twokey vault holder-key --ssh-agent`), the real
//! `twokey-vault init-key --seal shamir` encrypts to those `age1…`
//! recipients, and the holders decrypt through the agent and unseal a vault
//! over real mTLS. The same key file derives the same recipient; an agent
//! without the key is a clear error.

mod common;

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use twokey::{holder, sign::SshSigner};
use twokey_consent::ssh_key::{LineEnding, PrivateKey};
use twokey_proto::vault::v1::{
    SealStatusRequest, UnsealRequest, seal_service_client::SealServiceClient,
};
use twokey_vault::{VaultConfig, config::SealConfig, unseal};

/// An `ssh-agent -D` on a socket in a temp dir, killed when dropped.
struct Agent {
    child: Child,
    sock: PathBuf,
}

impl Agent {
    fn start(dir: &Path) -> Self {
        let sock = dir.join("agent.sock");
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ssh-agent runs (Debian: openssh-client)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "ssh-agent made no socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, sock }
    }

    fn ssh_add(&self, args: &[&std::ffi::OsStr]) {
        let out = Command::new("ssh-add")
            .args(args)
            .env("SSH_AUTH_SOCK", &self.sock)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ssh-add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `key` as an OpenSSH private key file (0600) with its `.pub` beside it.
fn key_file(dir: &Path, name: &str, key: &PrivateKey) -> PathBuf {
    let path = dir.join(format!("{name}.ssh"));
    std::fs::write(&path, key.to_openssh(LineEnding::LF).unwrap().as_bytes()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(
        dir.join(format!("{name}.ssh.pub")),
        key.public_key().to_openssh().unwrap(),
    )
    .unwrap();
    path
}

async fn submit(
    fx: &Fixture,
    addr: std::net::SocketAddr,
    name: &str,
    share: &[u8],
) -> (bool, Vec<String>) {
    let p = SealServiceClient::new(fx.channel(addr, name))
        .unseal(UnsealRequest {
            share: share.to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .progress
        .unwrap();
    (p.sealed, p.received_from)
}

#[tokio::test]
async fn holders_whose_keys_live_in_ssh_agent_derive_recipients_and_unseal_through_it() {
    let fx = Fixture::new();
    let dir = fx.path().to_owned();
    let agent = Agent::start(&dir);
    let (alice, bob, bea) = (&fx.people.alice, &fx.people.bob, &fx.people.bea);
    let alice_key = key_file(&dir, "alice", &alice.key);
    let bob_key = key_file(&dir, "bob", &bob.key);
    let bea_key = key_file(&dir, "bea", &bea.key);
    agent.ssh_add(&[alice_key.as_os_str()]);
    agent.ssh_add(&[bob_key.as_os_str()]);
    for name in ["alice", "bob", "bea"] {
        fx.ca
            .issue_user(TD, name)
            .unwrap()
            .write(fx.path(), name)
            .unwrap();
    }

    // holder-key through the agent; the key file derives the same.
    let via_agent = |key: &Path| SshSigner::open(key, Some(agent.sock.clone())).unwrap();
    let alice_recipient = holder::recipient(&via_agent(&alice_key), "alice").unwrap();
    let bob_recipient = holder::recipient(&via_agent(&bob_key), "bob").unwrap();
    assert!(alice_recipient.starts_with("age1"), "{alice_recipient}");
    assert_eq!(
        holder::recipient(&SshSigner::open(&alice_key, None).unwrap(), "alice").unwrap(),
        alice_recipient
    );
    assert_ne!(alice_recipient, bob_recipient);

    // init-key (the real binary) with those recipients; bea keeps her
    // ssh-ed25519 key as today.
    std::fs::write(dir.join("alice.recipient"), format!("{alice_recipient}\n")).unwrap();
    std::fs::write(dir.join("bob.recipient"), format!("{bob_recipient}\n")).unwrap();
    let seal = dir.join("seal");
    let out = Command::new(env!("CARGO_BIN_EXE_twokey-vault"))
        .args(["init-key", "--seal", "shamir", "--threshold", "2", "--out"])
        .arg(&seal)
        .arg(format!(
            "--holder=alice={}={}",
            user("alice"),
            dir.join("alice.recipient").display()
        ))
        .arg(format!(
            "--holder=bob={}={}",
            user("bob"),
            dir.join("bob.recipient").display()
        ))
        .arg(format!(
            "--holder=bea={}={}",
            user("bea"),
            dir.join("bea.ssh.pub").display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = unseal::Descriptor::load(&seal.join(unseal::DESCRIPTOR_FILE)).unwrap();
    assert_eq!(d.holders[0].public_key, alice_recipient);

    let audit = start_fake_audit(&fx, FakeAudit::default()).await;
    let config = VaultConfig {
        seal: Some(SealConfig {
            mode: "shamir".into(),
            descriptor: seal.join(unseal::DESCRIPTOR_FILE),
            unseal_timeout: "10m".into(),
            ..Default::default()
        }),
        ..fx.vault_config(audit.addr)
    };
    let vault = start_vault(config).await;

    // Each decrypts through the agent and submits with their own certificate.
    let share = |name: &str, key: &Path| {
        holder::decrypt_share(
            &seal.join(format!("{name}.share.age")),
            &via_agent(key),
            name,
        )
    };
    let alice_share = share("alice", &alice_key).unwrap();
    assert_eq!(
        submit(&fx, vault.addr, "alice", &alice_share).await,
        (true, vec!["alice".to_owned()])
    );
    // bea's share is encrypted to her ssh key itself: the agent-derived key
    // cannot open it, and the error says to use the key file.
    agent.ssh_add(&[bea_key.as_os_str()]);
    let e = share("bea", &bea_key).unwrap_err().to_string();
    assert!(e.contains("drop --ssh-agent"), "{e}");
    let bob_share = share("bob", &bob_key).unwrap();
    assert_eq!(
        submit(&fx, vault.addr, "bob", &bob_share).await,
        (false, vec![])
    );
    let status = SealServiceClient::new(fx.channel(vault.addr, "bea"))
        .seal_status(SealStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .progress
        .unwrap();
    assert!(!status.sealed);

    // An agent without the key: a clear error naming the key and what to do.
    agent.ssh_add(&["-D".as_ref()]);
    let e = share("alice", &alice_key).unwrap_err().to_string();
    assert!(
        e.contains("it does not hold your key") && e.contains("ssh-add"),
        "{e}"
    );
}

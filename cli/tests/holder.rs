//! `twokey vault holder-key`: the share recipient derived from an
//! ssh-ed25519 key is the same through a real `ssh-agent` and from the key
//! file; an agent without the key, no agent at all, a security key and a
//! bad holder name each give a one-line error that says what to do (for an
//! agent without the key: `ssh-add` it or drop `--ssh-agent`).
//! `twokey vault unseal --ssh-agent` decrypts a share made for that
//! recipient before it connects, and names the flag to drop for a share
//! encrypted to the ssh key itself.

mod common;

use base64::Engine;
use common::{Agent, json, one_line_error, twokey};
use twokey_testkit::consent::{generate_key, write_key};

fn holder_key(key: &std::path::Path, name: &str) -> assert_cmd::Command {
    let mut cmd = twokey();
    cmd.args(["vault", "holder-key", "--name", name, "--identity"])
        .arg(key);
    cmd
}

#[test]
fn the_recipient_through_the_agent_equals_the_key_files_and_errors_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "alice", &generate_key()).unwrap();
    let agent = Agent::start();
    agent.add(&key);

    let from_file = json(&mut holder_key(&key, "alice"));
    let recipient = from_file["recipient"].as_str().unwrap().to_owned();
    assert!(recipient.starts_with("age1"), "{recipient}");
    assert_eq!(from_file["name"], "alice");
    let through_agent = json(
        holder_key(&key, "alice")
            .arg("--ssh-agent")
            .env("SSH_AUTH_SOCK", &agent.socket),
    );
    assert_eq!(
        through_agent["recipient"].as_str(),
        Some(recipient.as_str())
    );
    // The plain answer is the recipient line alone, for `> NAME.recipient`.
    let out = holder_key(&key, "alice").assert().success();
    assert_eq!(
        String::from_utf8_lossy(&out.get_output().stdout),
        format!("{recipient}\n")
    );
    // Another holder name, another recipient.
    let bob = json(&mut holder_key(&key, "bob"));
    assert_ne!(bob["recipient"].as_str(), Some(recipient.as_str()));

    // An agent that does not hold the key.
    let empty = Agent::start();
    let err = one_line_error(
        holder_key(&key, "alice")
            .arg("--ssh-agent")
            .env("SSH_AUTH_SOCK", &empty.socket),
        1,
    );
    assert!(err.contains("it does not hold your key"), "{err}");
    assert!(err.contains("ssh-add"), "{err}");
    // The agent was chosen by --ssh-agent, so that is what to drop;
    // unsetting SSH_AUTH_SOCK would change nothing here.
    assert!(err.contains("or drop --ssh-agent"), "{err}");
    assert!(!err.contains("unset SSH_AUTH_SOCK"), "{err}");

    // --ssh-agent without an agent.
    let err = one_line_error(holder_key(&key, "alice").arg("--ssh-agent"), 2);
    assert!(err.contains("--ssh-agent needs SSH_AUTH_SOCK"), "{err}");

    // A bad holder name.
    let err = one_line_error(&mut holder_key(&key, "Alice"), 2);
    assert!(err.contains("1 to 64 characters of [a-z0-9._-]"), "{err}");

    // A security key: its signatures differ each time, so it is refused
    // before the agent is asked.
    let sk = dir.path().join("sk");
    let mut blob = Vec::new();
    for part in [
        &b"sk-ssh-ed25519@openssh.com"[..],
        &[7u8; 32][..],
        &b"ssh:"[..],
    ] {
        blob.extend((part.len() as u32).to_be_bytes());
        blob.extend(part);
    }
    std::fs::write(
        dir.path().join("sk.pub"),
        format!(
            "sk-ssh-ed25519@openssh.com {} alice@token\n",
            base64::engine::general_purpose::STANDARD.encode(&blob)
        ),
    )
    .unwrap();
    let err = one_line_error(
        holder_key(&sk, "alice")
            .arg("--ssh-agent")
            .env("SSH_AUTH_SOCK", &agent.socket),
        1,
    );
    assert!(
        err.contains("a share key is derived only from an ssh-ed25519 key"),
        "{err}"
    );
}

#[test]
fn unseal_through_the_agent_decrypts_a_share_made_for_the_derived_recipient() {
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "alice", &generate_key()).unwrap();
    let agent = Agent::start();
    agent.add(&key);
    let recipient: age::x25519::Recipient = json(&mut holder_key(&key, "alice"))["recipient"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let share = dir.path().join("alice.share.age");
    std::fs::write(
        &share,
        age::encrypt(&recipient, b"not a real share").unwrap(),
    )
    .unwrap();
    let unseal = |share: &std::path::Path| {
        let mut cmd = twokey();
        cmd.args(["vault", "unseal", "--vault", "https://127.0.0.1:9"])
            .arg("--share")
            .arg(share)
            .args(["--ssh-agent", "--identity"])
            .arg(&key)
            .env("SSH_AUTH_SOCK", &agent.socket);
        cmd
    };
    // Decrypted (the holder name from the file name), then stopped only by
    // the missing connection settings of this bare test profile.
    let out = unseal(&share).assert().failure();
    let err = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(!err.contains("cannot decrypt"), "{err}");
    assert!(err.contains("cert"), "{err}");

    // A share encrypted to the ssh key itself: drop --ssh-agent.
    let ssh_recipient: age::ssh::Recipient =
        std::fs::read_to_string(dir.path().join("alice.ssh.pub"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    let ssh_share = dir.path().join("sub");
    std::fs::create_dir(&ssh_share).unwrap();
    let ssh_share = ssh_share.join("alice.share.age");
    std::fs::write(&ssh_share, age::encrypt(&ssh_recipient, b"x").unwrap()).unwrap();
    let err = one_line_error(&mut unseal(&ssh_share), 1);
    assert!(
        err.contains("cannot decrypt") && err.contains("drop --ssh-agent"),
        "{err}"
    );

    // An agent that does not hold the key: ssh-add it, or drop --ssh-agent.
    let empty = Agent::start();
    let err = one_line_error(unseal(&share).env("SSH_AUTH_SOCK", &empty.socket), 1);
    assert!(
        err.contains("it does not hold your key") && err.contains("ssh-add"),
        "{err}"
    );
    assert!(err.contains("or drop --ssh-agent"), "{err}");
    assert!(!err.contains("unset SSH_AUTH_SOCK"), "{err}");

    // A file not named NAME.share.age needs --holder.
    let odd = dir.path().join("share.bin");
    std::fs::copy(&share, &odd).unwrap();
    let err = one_line_error(&mut unseal(&odd), 2);
    assert!(
        err.contains("pass your holder name with --holder NAME"),
        "{err}"
    );
}

#[test]
fn reshare_through_the_agent_decrypts_the_current_share_as_unseal_does() {
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "alice", &generate_key()).unwrap();
    let agent = Agent::start();
    agent.add(&key);
    let recipient: age::x25519::Recipient = json(&mut holder_key(&key, "alice"))["recipient"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let share = dir.path().join("alice.share.age");
    std::fs::write(
        &share,
        age::encrypt(&recipient, b"not a real share").unwrap(),
    )
    .unwrap();
    let reshare = |agent_socket: &std::path::Path| {
        let mut cmd = twokey();
        cmd.args(["vault", "reshare", "--vault", "https://127.0.0.1:9"])
            .args(["--plan", "p1", "--share"])
            .arg(&share)
            .args(["--ssh-agent", "--identity"])
            .arg(&key)
            .env("SSH_AUTH_SOCK", agent_socket);
        cmd
    };
    // Decrypted through the agent, then stopped by the bare test profile.
    let out = reshare(&agent.socket).assert().failure();
    let err = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(!err.contains("cannot decrypt"), "{err}");
    assert!(err.contains("cert"), "{err}");
    // Without the key in the agent: the same advice as unseal.
    let empty = Agent::start();
    let err = one_line_error(&mut reshare(&empty.socket), 1);
    assert!(
        err.contains("it does not hold your key") && err.contains("or drop --ssh-agent"),
        "{err}"
    );
}

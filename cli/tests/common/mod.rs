//! Helpers for running the real `twokey` binary: a clean environment, a
//! profile file, a development PKI. Tests against running services use
//! `pki_init` for the certificates and `twokey_as` to act as each user.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use assert_cmd::Command;

/// The `twokey` binary with no TWOKEY_* variables and no home config, so
/// nothing from the machine leaks into a test.
pub fn twokey() -> Command {
    let mut cmd = Command::cargo_bin("twokey").expect("twokey binary");
    for var in [
        "TWOKEY_CONFIG",
        "TWOKEY_PROFILE",
        "TWOKEY_CHECKPOINT_KEY",
        "XDG_CONFIG_HOME",
        "SSH_AUTH_SOCK",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HOME", "/nonexistent-twokey-test-home");
    cmd
}

/// `twokey` acting as `profile` from the config file `config`
/// (what `pki init` writes as DIR/twokey.toml).
pub fn twokey_as(config: &Path, profile: &str) -> Command {
    let mut cmd = twokey();
    cmd.env("TWOKEY_CONFIG", config)
        .env("TWOKEY_PROFILE", profile);
    cmd
}

/// Runs `pki init` into `dir` with `users` (`NAME:ROLE`) and the given
/// broker/audit addresses; returns the profile file.
pub fn pki_init(dir: &Path, users: &[&str], broker: &str, audit: &str) -> PathBuf {
    let mut cmd = twokey();
    cmd.args(["pki", "init", "--dir"])
        .arg(dir)
        .args(["--broker", broker, "--audit", audit]);
    for u in users {
        cmd.args(["--user", u]);
    }
    cmd.assert().success();
    dir.join("twokey.toml")
}

/// Runs a command with `--json` that must succeed; returns each stdout line
/// parsed as JSON.
pub fn json_lines(cmd: &mut Command) -> Vec<serde_json::Value> {
    let out = cmd
        .arg("--json")
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    String::from_utf8(out)
        .expect("utf-8 stdout")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Runs a command with `--json` that must succeed and print one JSON object.
pub fn json(cmd: &mut Command) -> serde_json::Value {
    let mut lines = json_lines(cmd);
    assert_eq!(lines.len(), 1, "expected one JSON line, got {lines:?}");
    lines.remove(0)
}

/// alice files a request on the local system's account with `reason`; the
/// answer's JSON.
pub fn file_request(config: &Path, reason: &str) -> serde_json::Value {
    json(twokey_as(config, "alice").args([
        "request",
        "create",
        "--account",
        twokey_testkit::local::ACCOUNT,
        "--reason",
        reason,
    ]))
}

/// The stderr of a failed run, checked to be exactly one line.
pub fn one_line_error(cmd: &mut Command, code: i32) -> String {
    let out = cmd.assert().code(code).get_output().clone();
    let err = String::from_utf8(out.stderr).expect("utf-8 stderr");
    assert_eq!(err.lines().count(), 1, "error is not one line: {err:?}");
    assert!(out.stdout.is_empty(), "stdout not empty on error");
    err
}

/// An `ssh-agent` on a socket in a temporary directory, killed on drop.
pub struct Agent {
    child: std::process::Child,
    /// Its socket, for `SSH_AUTH_SOCK`.
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Starts `ssh-agent -D -a SOCKET` and waits for the socket.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let child = std::process::Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("ssh-agent (OpenSSH) is installed");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "ssh-agent made no socket"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Self {
            child,
            socket,
            _dir: dir,
        }
    }

    /// `ssh-add KEY` into this agent.
    pub fn add(&self, key: &Path) {
        let out = std::process::Command::new("ssh-add")
            .arg(key)
            .env("SSH_AUTH_SOCK", &self.socket)
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

/// Builds the workspace's binaries (a no-op when they are fresh) once per
/// test process and returns the directory holding them and `twokey`.
pub fn service_binaries() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            // The command scripts/test runs first, so in CI this is a no-op.
            let status = twokey_testkit::ready::cargo_build_binaries(
                Path::new(env!("CARGO_MANIFEST_DIR")),
                false,
            )
            .expect("run cargo build for the binaries");
            assert!(status.success(), "cargo build of the binaries failed");
            Path::new(env!("CARGO_BIN_EXE_twokey"))
                .parent()
                .expect("target dir")
                .to_owned()
        })
        .clone()
}

/// A local system (audit, vault, broker as separate processes on loopback)
/// in a fresh temporary directory, stopped when dropped.
pub fn local_system() -> (tempfile::TempDir, twokey_testkit::local::LocalSystem) {
    let bins = service_binaries();
    let tmp = tempfile::tempdir().expect("tempdir");
    let system = twokey_testkit::local::LocalSystem::start(&tmp.path().join("sys"), &bins)
        .unwrap_or_else(|e| panic!("local system did not start: {}", e));
    (tmp, system)
}

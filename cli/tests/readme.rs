//! README.md's "Running it by hand" works as written: its shell blocks up to
//! step 6 (certificates, keys, configs, starting the three services, the
//! signed policy) run one after another in one bash, against this build's
//! binaries, on loopback (the README's fixed ports 7400, 7401, 7403, 7404 on
//! 127.0.0.1). Two substitutions only: the `cargo build --release` line is
//! left out (the test builds the debug binaries) and `$PWD/target/release`
//! becomes their directory.

mod common;

use std::{
    io::Read,
    net::TcpListener,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const SECTION: &str = "## Running it by hand";
const UNTIL: &str = "6. **Use the CLI as each role.**";
const PORTS: [u16; 4] = [7400, 7401, 7403, 7404];

/// The fenced `sh` blocks between `SECTION` and `UNTIL`, unindented.
fn steps(readme: &str) -> Vec<String> {
    let start = readme
        .find(SECTION)
        .expect("README has the by-hand section");
    let end = start + readme[start..].find(UNTIL).expect("README has step 6");
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for line in readme[start..end].lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        match (&mut current, trimmed) {
            (None, "```sh") => current = Some((indent, String::new())),
            (Some(_), "```") => blocks.push(current.take().unwrap().1),
            (Some((indent, block)), _) => {
                block.push_str(line.get(*indent..).unwrap_or("").trim_end());
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "an unclosed ``` block in the README");
    blocks
}

#[test]
fn the_readme_steps_run_as_written() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    let blocks = steps(&readme);
    assert!(blocks.len() >= 6, "{blocks:#?}");
    assert!(
        blocks[0].contains("cargo build --workspace --release")
            && blocks[0].contains("$PWD/target/release"),
        "the README's first block builds and puts target/release on PATH: {}",
        blocks[0]
    );
    if let Some(port) = PORTS
        .iter()
        .find(|p| TcpListener::bind(("127.0.0.1", **p)).is_err())
    {
        eprintln!("skipped: 127.0.0.1:{port} is in use, and the README's steps listen there");
        return;
    }
    let bins = common::service_binaries();
    let script: String = blocks
        .iter()
        .map(|b| {
            b.lines()
                .filter(|l| !l.starts_with("cargo build"))
                .map(|l| l.replace("$PWD/target/release", &bins.display().to_string()))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect::<Vec<_>>()
        .join("\n");
    let tmp = tempfile::tempdir().unwrap();
    let mut command = Command::new("bash");
    command
        .arg("-c")
        // Stop the services the steps started in the background, whatever
        // happens; fail on the first failing command.
        .arg(format!(
            "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n{script}\n"
        ))
        .current_dir(&repo)
        .env("TMPDIR", tmp.path())
        .env("HOME", tmp.path())
        .env("RUST_BACKTRACE", "0")
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TWOKEY_") {
            command.env_remove(name);
        }
    }
    let mut child = command.spawn().expect("run bash");
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    // Service logs, for the failure message.
    let mut logs = String::new();
    if let Ok(dirs) = std::fs::read_dir(tmp.path()) {
        for dir in dirs.flatten() {
            for svc in ["audit", "vault", "broker"] {
                let log = dir.path().join(svc).join("log");
                if let Ok(text) = std::fs::read_to_string(&log) {
                    let tail: Vec<&str> = text.lines().rev().take(15).collect();
                    logs.push_str(&format!("--- {svc}/log (last lines, newest first)\n"));
                    logs.push_str(&tail.join("\n"));
                    logs.push('\n');
                }
            }
        }
    }
    assert!(
        status.success(),
        "the README's steps failed ({status}):\n--- script\n{script}\n--- stdout\n{out}\n--- stderr\n{err}\n{logs}"
    );
    assert!(
        out.contains("verifier key") || out.contains("twokey.local/audit+"),
        "{out}"
    );
    assert!(
        out.contains("version"),
        "policy show printed no version:\n{out}"
    );
}

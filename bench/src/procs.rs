//! The real service binaries as child processes: found beside this
//! executable (built first when run under cargo), started with
//! `serve --config FILE`, timed from spawn to their `listening on` line, and
//! measured through `/proc/PID/status`. Dropping a [`Service`] kills only the
//! process it started.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// The three service binaries.
pub const BINARIES: [&str; 3] = ["twokey-audit", "twokey-vault", "twokey-broker"];
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The directory of the service binaries: `dir` if given, else this
/// executable's profile directory (`target/release` or `target/debug`).
/// Under cargo (`CARGO` set) the binaries are built first, in the same profile.
pub fn bin_dir(dir: Option<&Path>) -> Result<PathBuf> {
    if let Some(d) = dir {
        return Ok(d.to_owned());
    }
    let exe = std::env::current_exe()?;
    let mut d = exe.parent().context("executable has no directory")?;
    if d.ends_with("deps") {
        d = d.parent().context("deps has no parent")?;
    }
    let release = d.ends_with("release");
    if std::env::var_os("CARGO").is_some() {
        let status = twokey_testkit::ready::cargo_build_binaries(
            Path::new(env!("CARGO_MANIFEST_DIR")),
            release,
        )
        .context("run cargo build for the services")?;
        if !status.success() {
            bail!("cargo build of {BINARIES:?} failed");
        }
    }
    for b in BINARIES {
        if !d.join(b).exists() {
            bail!(
                "{} is missing: build it (cargo build --release --bins) or pass --bin-dir",
                d.join(b).display()
            );
        }
    }
    Ok(d.to_owned())
}

/// A running service process.
#[derive(Debug)]
pub struct Service {
    /// `twokey-vault` and so on.
    pub name: String,
    /// `https://127.0.0.1:PORT`.
    pub address: String,
    /// From spawn to the `listening on` line.
    pub started_in: Duration,
    child: Child,
}

impl Service {
    /// Starts `BIN serve --config CONFIG`, logging stderr to `log`, and
    /// waits (bounded) for its listening line.
    pub fn start(bin_dir: &Path, bin: &str, config: &Path, log: &Path) -> Result<Self> {
        let log_file = std::fs::File::create(log)?;
        let spawned = Instant::now();
        let mut command = Command::new(bin_dir.join(bin));
        command.args(["serve", "--config"]).arg(config);
        let (mut child, rx) = twokey_testkit::ready::spawn_service(command, bin, log_file)
            .with_context(|| format!("start {bin}"))?;
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(Some((addr, at))) => {
                eprintln!("twokey-bench: {bin} pid {} on {addr}", child.id());
                Ok(Self {
                    name: bin.to_owned(),
                    address: format!("https://{addr}"),
                    started_in: at - spawned,
                    child,
                })
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                let text = std::fs::read_to_string(log).unwrap_or_default();
                bail!(
                    "{bin} did not start: {}",
                    text.lines().last().unwrap_or("no output")
                )
            }
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size in KiB (`VmRSS` in /proc/PID/status).
    pub fn rss_kib(&self) -> Result<u64> {
        rss_kib(self.pid())
    }

    /// Kills the process and waits for it.
    pub fn stop(mut self) {
        self.kill();
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `VmRSS` of process `pid`, KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS line")
}

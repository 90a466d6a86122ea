//! Starting the real binaries: each service prints `twokey-<service>
//! listening on ADDR` on stdout once it serves (`runtime::serve::announce`);
//! this is the one place that reads that line, so tests, the demo and the
//! benchmarks wait for it instead of sleeping, on `127.0.0.1:0`.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

/// The address a service announced and when its line was read; `None` if
/// the process closed its stdout (exited) first.
pub type Announced = mpsc::Receiver<Option<(String, Instant)>>;

/// The address in `line` if it is `service`'s readiness line.
pub fn announced_addr<'a>(line: &'a str, service: &str) -> Option<&'a str> {
    line.trim()
        .strip_prefix(service)?
        .strip_prefix(" listening on ")
}

/// Spawns a service `command` (its logging variables cleared unless the
/// command sets them, stdin closed, stderr to `stderr`) and returns the
/// child and a receiver that yields the address from its `NAME listening on
/// ADDR` line, or `None` if it exited first. Its stdout is drained
/// afterwards, so it never blocks on a full pipe.
pub fn spawn_service(
    mut command: Command,
    service: &str,
    stderr: impl Into<Stdio>,
) -> std::io::Result<(Child, Announced)> {
    for var in ["RUST_LOG", "TWOKEY_LOG"] {
        if !command.get_envs().any(|(k, _)| k == var) {
            command.env_remove(var);
        }
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    let service = service.to_owned();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(None);
                    return;
                }
                Ok(_) => {
                    if let Some(addr) = announced_addr(&line, &service) {
                        let _ = tx.send(Some((addr.to_owned(), Instant::now())));
                        let _ = std::io::copy(&mut reader, &mut std::io::sink());
                        return;
                    }
                }
            }
        }
    });
    Ok((child, rx))
}

/// Why a service did not announce itself.
#[derive(Debug)]
pub enum NotReady {
    /// It could not be spawned.
    Spawn(std::io::Error),
    /// It exited (or closed stdout) before announcing.
    Exited,
    /// It said nothing within the timeout.
    Timeout(Duration),
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Spawn(e) => write!(f, "cannot start: {e}"),
            Self::Exited => write!(f, "exited before it served; see its log"),
            Self::Timeout(t) => write!(f, "did not announce itself within {t:?}"),
        }
    }
}

impl std::error::Error for NotReady {}

/// Waits up to `timeout` for the address `announced` yields.
pub fn wait_announced(announced: &Announced, timeout: Duration) -> Result<SocketAddr, NotReady> {
    match announced.recv_timeout(timeout) {
        Ok(Some((addr, _))) => addr.parse().map_err(|_| NotReady::Exited),
        Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => Err(NotReady::Exited),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(NotReady::Timeout(timeout)),
    }
}

/// Spawns `command` and waits up to `timeout` for its readiness line: the
/// running child and the address it serves on. The child is killed if it
/// does not announce itself.
pub fn start(
    command: Command,
    service: &str,
    stderr: impl Into<Stdio>,
    timeout: Duration,
) -> Result<(Child, SocketAddr), NotReady> {
    let (mut child, announced) =
        spawn_service(command, service, stderr).map_err(NotReady::Spawn)?;
    match wait_announced(&announced, timeout) {
        Ok(addr) => Ok((child, addr)),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

/// Runs `cargo build --workspace --bins` (with `--release` if asked) from
/// `dir`, for tests and tools that start the real binaries. It always builds
/// the whole workspace, as `scripts/test` does, so every caller finds the
/// same artifacts fresh. It drops the variables cargo sets for a running test
/// (`CARGO_PKG_*`, `CARGO_MANIFEST_*`, …): build scripts such as ring's watch
/// them, and inheriting them would rebuild the whole dependency graph instead
/// of finding it fresh.
pub fn cargo_build_binaries(dir: &Path, release: bool) -> std::io::Result<ExitStatus> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args(["build", "--workspace", "--bins"])
        .current_dir(dir);
    if release {
        command.arg("--release");
    }
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        let set_for_tests = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|p| name.starts_with(p))
            || matches!(
                name.as_str(),
                "CARGO" | "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR" | "OUT_DIR"
            );
        if set_for_tests {
            command.env_remove(&name);
        }
    }
    command.status()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_named_services_line_is_its_announcement() {
        let line = "twokey-vault listening on 127.0.0.1:7401\n";
        assert_eq!(announced_addr(line, "twokey-vault"), Some("127.0.0.1:7401"));
        assert_eq!(announced_addr(line, "twokey-audit"), None);
        assert_eq!(
            announced_addr("twokey-vault starting", "twokey-vault"),
            None
        );
    }

    #[test]
    fn start_reads_the_address_and_reports_an_early_exit() {
        let mut say = Command::new("sh");
        say.args([
            "-c",
            "echo noise; echo 'svc listening on 127.0.0.1:9'; sleep 5",
        ]);
        let (mut child, addr) = start(say, "svc", Stdio::null(), Duration::from_secs(10)).unwrap();
        assert_eq!(addr, "127.0.0.1:9".parse().unwrap());
        child.kill().unwrap();
        child.wait().unwrap();

        let mut quit = Command::new("sh");
        quit.args(["-c", "echo bye"]);
        let err = start(quit, "svc", Stdio::null(), Duration::from_secs(10)).unwrap_err();
        assert!(matches!(err, NotReady::Exited), "{err}");
    }
}

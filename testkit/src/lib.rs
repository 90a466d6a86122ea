//! Development and test tooling, kept out of the product: the development
//! PKI (`pki`), a whole system on loopback (`local`), starting the real
//! binaries and reading the line each prints once it serves (`ready`), and
//! grants signed as the broker signs them (`grants`), people's OpenSSH keys
//! and the admin-signed consent policy (`consent`), and a throwaway
//! PostgreSQL server per test (`postgres`), a system with two replicas of
//! each service on it (`ha`). `twokey pki init` and
//! `twokey demo` are thin commands over this crate; no service binary links
//! it (nor `rcgen`).
#![forbid(unsafe_code)]

pub mod consent;
pub mod grants;
pub mod ha;
pub mod local;
pub mod pki;
pub mod postgres;
pub mod ready;

/// Copies directory `from` to `to` as it is (modes and times kept), with
/// `cp -a`: a backup of a data directory, in tests. Panics when it fails.
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("run cp");
    assert!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}

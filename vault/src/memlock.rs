//! Keeping the vault's memory out of swap, where the OS allows: the master
//! key, data keys and opened seeds live in this process, and a page of them
//! written to swap would outlive the process on disk. `mlockall(MCL_CURRENT
//! | MCL_FUTURE | MCL_ONFAULT)` through rustix's safe wrapper locks every
//! page once it is touched (no prefaulting, so memory use is unchanged). It
//! is only asked for when nothing can make a later allocation fail: the
//! process holds `CAP_IPC_LOCK` (no limit applies) or `RLIMIT_MEMLOCK` is
//! unlimited. Otherwise the vault says so at start and how to allow it.

use rustix::{
    mm::{MlockAllFlags, mlockall},
    process::{Resource, getrlimit},
};

/// What [`lock_memory`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryLock {
    /// Every page of the process stays in RAM once touched.
    Locked,
    /// Not locked, and why, with what to do.
    NotLocked(String),
}

/// `CAP_IPC_LOCK`'s bit in the capability sets.
const CAP_IPC_LOCK: u32 = 14;

/// Whether the effective capabilities in `/proc/self/status` text include
/// `CAP_IPC_LOCK`.
fn has_ipc_lock(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Whether to lock, from the capability and the limit (`None`: unlimited).
fn decide(ipc_lock: bool, limit: Option<u64>) -> Result<(), String> {
    if ipc_lock || limit.is_none() {
        return Ok(());
    }
    Err(format!(
        "memory not locked: RLIMIT_MEMLOCK is {} bytes and the process lacks CAP_IPC_LOCK, \
         so locking could make a later allocation fail; give the vault CAP_IPC_LOCK \
         (systemd AmbientCapabilities=CAP_IPC_LOCK, Kubernetes securityContext \
         capabilities add IPC_LOCK) or LimitMEMLOCK=infinity so that keys and seeds \
         never reach swap",
        limit.unwrap_or_default()
    ))
}

/// Locks the process's memory when the limits allow; never fails the start.
pub fn lock_memory() -> MemoryLock {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let limit = getrlimit(Resource::Memlock).current;
    if let Err(why) = decide(has_ipc_lock(&status), limit) {
        return MemoryLock::NotLocked(why);
    }
    match mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT) {
        Ok(()) => MemoryLock::Locked,
        Err(e) => MemoryLock::NotLocked(format!(
            "memory not locked: mlockall failed ({e}); keys and seeds may reach swap: \
             disable swap on the vault's host or allow mlockall"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_or_no_limit_allows_locking_and_a_limit_says_what_to_do() {
        let root = "Name:\tx\nCapEff:\t000001fffeffffff\n";
        let none = "Name:\tx\nCapEff:\t0000000000000000\n";
        assert!(has_ipc_lock(root));
        assert!(!has_ipc_lock(none));
        assert!(!has_ipc_lock("no caps line"));
        assert_eq!(decide(true, Some(8 << 20)), Ok(()));
        assert_eq!(decide(false, None), Ok(()));
        let why = decide(false, Some(8 << 20)).unwrap_err();
        assert!(
            why.starts_with("memory not locked: RLIMIT_MEMLOCK is 8388608 bytes")
                && why.contains("CAP_IPC_LOCK")
                && why.contains("LimitMEMLOCK=infinity"),
            "{why}"
        );
    }
}

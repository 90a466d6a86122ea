//! A data directory that fills up or turns read-only under a running
//! service: a small tmpfs mounted where the vault's or the audit service's
//! data directory lives (these tests run as root, as CI does). Each case:
//! the release fails with a clear status and no code leaves without its
//! audit event; a service whose storage error does not clear stops
//! (fail-stop) for its supervisor to restart; once space returns (the filler
//! removed, the file system remounted read-write) releases work again and
//! the log verifies.
//!
//! Mounting needs CAP_SYS_ADMIN. `scripts/test` checks whether this machine
//! can mount a tmpfs and, if it can, sets `TWOKEY_DISK_TESTS=require`: then a
//! failed mount fails the test. Without that variable a machine that cannot
//! mount (an unprivileged container) skips these tests with a message on
//! stderr, rather than failing on something no code here could change.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
};

use tonic::Code;
use twokey_e2e::{System, bounded, check_request, check_single_use, totp};
use twokey_proto::broker::v1::{GetRequestRequest, Request, RequestState};

/// A tmpfs mounted on a directory, unmounted (and the directory removed)
/// when dropped.
struct Mount(PathBuf, Option<PathBuf>);

impl Mount {
    fn tmpfs(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).expect("mount point");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "none",
            ])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "these tests mount a small tmpfs and need root (CAP_SYS_ADMIN): mount said {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Self(dir.to_owned(), None)
    }

    fn remount(&self, options: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.0)
            .status()
            .expect("run mount");
        assert!(status.success(), "remount {options} failed");
    }

    /// Fills the file system with a file `filler`; returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).expect("filler");
        for chunk in [1 << 20, 4096, 1] {
            let buf = vec![0u8; chunk];
            while f.write_all(&buf).is_ok() {}
        }
        let _ = f.sync_all();
        path
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
        // The system's temp dir could not be removed around the mount.
        if let Some(root) = &self.1 {
            let _ = std::fs::remove_dir_all(root);
        }
    }
}

async fn get(sys: &System, id: &str) -> Request {
    bounded(sys.broker("olivia").get_request(GetRequestRequest {
        request_id: id.into(),
    }))
    .await
    .expect("the broker answers")
    .request
    .unwrap()
}

/// Whether a tmpfs can be mounted here (see the module doc); `false` only
/// when mounting is not required.
fn can_mount() -> bool {
    if std::env::var("TWOKEY_DISK_TESTS").as_deref() == Ok("require") {
        return true;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "none"])
        .arg(dir.path())
        .output()
        .is_ok_and(|o| o.status.success());
    if mounted {
        let _ = Command::new("umount").arg(dir.path()).status();
    } else {
        eprintln!(
            "SKIPPED: cannot mount a tmpfs here (needs CAP_SYS_ADMIN); \
             set TWOKEY_DISK_TESTS=require to make that a failure"
        );
    }
    mounted
}

/// Starts a system with `svc`'s data directory on a small tmpfs, or `None`
/// when this machine cannot mount one (see [`can_mount`]).
fn start_on_tmpfs(svc: &str) -> Option<(Mount, System)> {
    if !can_mount() {
        return None;
    }
    let mut mount = None;
    let sys = System::start_with(|dir| {
        mount = Some(Mount::tmpfs(&dir.join("data").join(svc), "16m"));
    });
    let mut mount = mount.expect("mounted");
    mount.1 = Some(sys.root().to_owned());
    Some((mount, sys))
}

/// Every code the test received has the vault's `code.released` (same
/// request) in the log, the log verifies (also against `earlier`), the
/// auditor's earlier read is a prefix, and requests obey the state machine.
/// A system with `svc`'s data on a small tmpfs, a 1 s audit wait in the
/// vault, an enrolled account and a verified request; the log's checkpoint
/// and entries before any fault.
struct Verified {
    mount: Mount,
    sys: System,
    request: twokey_proto::broker::v1::Request,
    checkpoint: String,
    read_before: Vec<twokey_proto::audit::v1::LogEntry>,
}

async fn verified_on_tmpfs(svc: &str) -> Option<Verified> {
    let (mount, mut sys) = start_on_tmpfs(svc)?;
    sys.set_vault_ack_timeout(1000);
    sys.enroll().await;
    let request = sys.verified_request("disk fault test").await;
    let checkpoint = sys.checkpoint().await;
    let read_before = sys.log().await;
    Some(Verified {
        mount,
        sys,
        request,
        checkpoint,
        read_before,
    })
}

/// While a service cannot store: the release fails closed with UNAVAILABLE
/// and the request keeps its code for later. Returns the refusal.
async fn no_code_meanwhile(sys: &System, request_id: &str, when: &str) -> tonic::Status {
    let err = sys
        .release_as_operator(request_id)
        .await
        .expect_err("a code while a service cannot store");
    assert_eq!(err.code(), Code::Unavailable, "{when}: {err:?}");
    let now = get(sys, request_id).await;
    assert_eq!(
        (now.state(), now.codes_released),
        (RequestState::Verified, 0),
        "{when}"
    );
    err
}

/// After recovery: the verified request releases a valid code, and the log
/// holds its evidence and everything read before the fault.
async fn released_with_evidence(
    sys: &System,
    request_id: &str,
    checkpoint: String,
    read_before: &[twokey_proto::audit::v1::LogEntry],
    when: &str,
) {
    let code = sys
        .release_as_operator(request_id)
        .await
        .unwrap_or_else(|e| panic!("{when}: no release after recovery: {e:?}"));
    assert_eq!(code.code, totp(code.step));
    no_code_without_evidence(sys, &[request_id.to_owned()], &[checkpoint], read_before).await;
}

async fn no_code_without_evidence(
    sys: &System,
    codes_for: &[String],
    earlier: &[String],
    read_before: &[twokey_proto::audit::v1::LogEntry],
) {
    let log = sys.verified_log(earlier).await;
    twokey_e2e::assert_prefix(read_before, &log, "after recovery");
    check_single_use(&log).unwrap();
    for id in codes_for {
        assert!(
            log.iter()
                .filter_map(|e| e.event.as_ref())
                .any(|e| e.action == "code.released"
                    && e.source.ends_with("/svc/vault")
                    && &e.request_id == id),
            "a code for {id} without the vault's event in the log"
        );
    }
    for r in sys.all_requests().await {
        check_request(&r).unwrap();
    }
}

fn assert_clear(err: &tonic::Status, codes: &[Code]) {
    assert!(
        codes.contains(&err.code()) && !err.message().is_empty(),
        "not a clear status: {err:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_out_of_space_stops_audit_and_loses_nothing_once_space_returns() {
    let Some(mut v) = verified_on_tmpfs("audit").await else {
        return;
    };

    let filler = v.mount.fill();
    // Audit's journal segment was filled with zeros when made, so audit may
    // still acknowledge events into it: a release now is either refused or
    // released with its evidence durable in the journal (checked below).
    // Writing the journal on to the tiles and sled meets the full disk.
    let during = v.sys.release_as_operator(&v.request.request_id).await;
    if let Err(err) = &during {
        assert_eq!(err.code(), Code::Unavailable, "audit full: {err:?}");
    }
    // sled keeps the I/O error it met (every later call fails with it), so
    // audit stops (fail-stop, status 74) for its supervisor to restart it,
    // saying why; meanwhile callers get a clear status, never a hang.
    let mut status = None;
    for _ in 0..100 {
        status = v.sys.local.exited("audit");
        if status.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let status = status.expect("audit kept running on a storage error that does not clear");
    assert_eq!(
        status.code(),
        Some(twokey_runtime::durable::FAIL_STOP_STATUS)
    );
    let said = v.sys.service_log("audit");
    assert!(
        said.contains("storage keeps failing") && said.contains("so that the supervisor restarts"),
        "{said}"
    );
    let read = bounded(
        v.sys
            .audit("carol")
            .get_checkpoint(twokey_proto::audit::v1::GetCheckpointRequest {}),
    )
    .await;
    assert_clear(&read.unwrap_err(), &[Code::Unavailable]);

    // Space returns; the supervisor (here: the test) starts audit again,
    // and nothing it acknowledged is lost: a code released while the disk
    // was full has its evidence in the log, or the release works now.
    std::fs::remove_file(filler).expect("remove filler");
    v.sys
        .local
        .restart(&twokey_e2e::bin_dir(), "audit")
        .expect("audit restarts once space returns");
    if during.is_ok() {
        no_code_without_evidence(
            &v.sys,
            &[v.request.request_id.clone()],
            &[v.checkpoint],
            &v.read_before,
        )
        .await;
    } else {
        released_with_evidence(
            &v.sys,
            &v.request.request_id,
            v.checkpoint,
            &v.read_before,
            "space returned",
        )
        .await;
    }
}

/// How a data directory becomes unusable.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Full,
    ReadOnly,
}

/// `svc` restarts onto a data directory hit by `fault`: it refuses to
/// start and says why and where; no code meanwhile; once the directory is
/// usable again it starts on its old data, releases work, nothing is lost.
async fn refused_start_then_recovery(svc: &str, fault: Fault) {
    let when = format!("{svc} {fault:?}");
    let Some(mut v) = verified_on_tmpfs(svc).await else {
        return;
    };

    // The service restarts (a crash, an upgrade) onto the bad disk.
    // A read-only remount needs no file open for writing, so this is
    // where it happens.
    v.sys.local.kill(svc);
    let filler = match fault {
        Fault::Full => Some(v.mount.fill()),
        Fault::ReadOnly => {
            v.mount.remount("ro");
            None
        }
    };
    let refused = v
        .sys
        .local
        .restart(&twokey_e2e::bin_dir(), svc)
        .expect_err("a service started on an unusable data directory");
    let log = std::fs::read_to_string(v.sys.local.dir.join("logs").join(format!("{svc}.log")))
        .expect("service log");
    let cause = match fault {
        Fault::Full => "No space left on device",
        Fault::ReadOnly => "Read-only file system",
    };
    assert!(
        log.contains(cause) && log.contains(&*v.mount.0.to_string_lossy()),
        "{when}: the refusal names neither the cause nor the directory: {refused}\n{log}"
    );

    // Meanwhile no code: the release fails closed with UNAVAILABLE and
    // the request keeps its code for later.
    no_code_meanwhile(&v.sys, &v.request.request_id, &when).await;

    // Space returns: the service starts on its old data, releases work.
    match filler {
        Some(f) => std::fs::remove_file(f).expect("remove filler"),
        None => v.mount.remount("rw"),
    }
    v.sys
        .local
        .restart(&twokey_e2e::bin_dir(), svc)
        .unwrap_or_else(|e| {
            let log =
                std::fs::read_to_string(v.sys.local.dir.join("logs").join(format!("{svc}.log")))
                    .unwrap_or_default();
            panic!("{when}: no start once space returned: {e}\n{log}")
        });
    released_with_evidence(
        &v.sys,
        &v.request.request_id,
        v.checkpoint,
        &v.read_before,
        &when,
    )
    .await;
    println!("{when}: refused to start ({cause}), recovered");
}

/// One test per service and fault: the start is refused clearly, then the
/// service recovers on its old data once the disk is usable again.
macro_rules! refused_start_tests {
    ($($name:ident: $svc:literal, $fault:expr;)+) => {$(
        #[tokio::test(flavor = "multi_thread")]
        async fn $name() {
            refused_start_then_recovery($svc, $fault).await;
        }
    )+};
}

refused_start_tests! {
    a_vault_on_a_full_disk_refuses_to_start_clearly_and_recovers: "vault", Fault::Full;
    a_vault_on_a_read_only_disk_refuses_to_start_clearly_and_recovers: "vault", Fault::ReadOnly;
    an_audit_on_a_full_disk_refuses_to_start_clearly_and_recovers: "audit", Fault::Full;
    an_audit_on_a_read_only_disk_refuses_to_start_clearly_and_recovers: "audit", Fault::ReadOnly;
}

//! Audit restored from an older backup, with real processes over mTLS: the
//! audit host is lost after more codes were released, its data directory
//! comes back from a backup taken earlier (tree-head file included), and
//! the vault and the broker send back the events they kept. Audit signs
//! nothing new until it holds every entry of the largest checkpoint it
//! signed, then serves a log that verifies against every checkpoint it
//! signed before, with each released code's evidence; releases work again.

use std::time::Duration;

use tonic::Code;
use twokey_e2e::{System, totp};
use twokey_proto::audit::v1::GetCheckpointRequest;

/// Lines of a note that are signatures: the log's and one per witness.
fn signatures(note: &str) -> usize {
    note.lines().filter(|l| l.starts_with('\u{2014}')).count()
}

/// The current checkpoint once both sources cosigned it (so both accepted
/// it: it is what they would show a restored audit).
async fn witnessed_checkpoint(sys: &System) -> String {
    for _ in 0..300 {
        let note = sys.checkpoint().await;
        if signatures(&note) == 3 {
            return note;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the sources did not cosign the latest checkpoint");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_audit_restored_from_an_older_backup_is_made_whole_by_the_sources() {
    let mut sys = System::start();
    // One account per code: each release gets a fresh time step.
    let (b, c) = ("aws-restore-b".to_owned(), "aws-restore-c".to_owned());
    sys.add_accounts(&[b.clone(), c.clone()]).await;
    sys.enroll().await;
    sys.enroll_accounts(&[b.clone(), c.clone()]).await;
    let first = sys.verified_request("before the backup").await;
    let code = sys.release_as_operator(&first.request_id).await.unwrap();
    assert_eq!(code.code, totp(code.step));
    let early = witnessed_checkpoint(&sys).await;

    // A backup of audit's data directory, taken with audit stopped.
    let data = sys.local.dir.join("data").join("audit");
    let backup = sys.root().join("audit-backup");
    sys.local.kill("audit");
    twokey_testkit::copy_dir(&data, &backup);
    sys.local
        .restart(&twokey_e2e::bin_dir(), "audit")
        .expect("audit restarts");

    // More happens: another request, another code.
    let second = sys.verified_request_for(&b, "after the backup").await;
    let code = sys.release_as_operator(&second.request_id).await.unwrap();
    assert_eq!(code.code, totp(code.step));
    let late = witnessed_checkpoint(&sys).await;
    let read_before = sys.log().await;

    // The audit host is lost; its backup comes back.
    sys.local.kill("audit");
    std::fs::remove_dir_all(&data).unwrap();
    twokey_testkit::copy_dir(&backup, &data);
    sys.local
        .restart(&twokey_e2e::bin_dir(), "audit")
        .expect("audit starts on the backup");

    // Audit is made whole by the sources; meanwhile it serves at most the
    // checkpoint it had signed before the backup, or refuses.
    let verifier = twokey_audit::checkpoint::NoteVerifier::parse(&sys.local.verifier_key).unwrap();
    let (early_size, late_size) = (
        verifier.open_checkpoint(&early).unwrap().size,
        verifier.open_checkpoint(&late).unwrap().size,
    );
    let mut whole = false;
    for _ in 0..400 {
        match sys
            .audit("carol")
            .get_checkpoint(GetCheckpointRequest {})
            .await
        {
            Ok(r) if r.get_ref().tree_size >= late_size => {
                whole = true;
                break;
            }
            Ok(r) => assert!(
                r.get_ref().tree_size <= early_size.max(late_size)
                    && r.get_ref().tree_size >= early_size,
                "audit served a checkpoint of {} entries",
                r.get_ref().tree_size
            ),
            Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        whole,
        "audit was not made whole:\n{}",
        sys.service_log("audit")
    );
    assert!(sys.service_log("audit").contains("restore complete"));

    // The log verifies against every checkpoint signed before, holds what
    // the auditor read, and both codes' evidence.
    let log = sys.verified_log(&[early, late]).await;
    // Entries as signed, at the same indices; only received_at, which no
    // signature covers, is the restore's time for the restored ones.
    assert!(log.len() >= read_before.len());
    for (before, after) in read_before.iter().zip(&log) {
        assert_eq!(
            (before.index, &before.signed_event),
            (after.index, &after.signed_event)
        );
    }
    for id in [&first.request_id, &second.request_id] {
        assert!(
            log.iter().filter_map(|e| e.event.as_ref()).any(|e| {
                e.action == "code.released"
                    && e.source.ends_with("/svc/vault")
                    && &e.request_id == id
            }),
            "no code.released for {id}"
        );
    }

    // Both sources saw the shorter log, stopped, and clear once audit
    // serves a checkpoint consistent with the one they accepted.
    for svc in ["vault", "broker"] {
        let mut cleared = false;
        for _ in 0..200 {
            let log = sys.service_log(svc);
            if log.contains("a smaller tree")
                && log.contains("consistent with the last accepted one again")
            {
                cleared = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            cleared,
            "{svc} did not flag and clear:\n{}",
            sys.service_log(svc)
        );
    }

    // And releases work again.
    let third = sys.verified_request_for(&c, "after the restore").await;
    let code = sys.release_as_operator(&third.request_id).await.unwrap();
    assert_eq!(code.code, totp(code.step));
}

//! Network faults with the real binaries over mTLS. `flow.rs` covers audit
//! down (killed) during a release; here: the vault unreachable in the middle
//! of a flow (release fails closed with UNAVAILABLE, gives its quota back,
//! works once the vault is back), and a stalled audit (SIGSTOP: connections
//! accepted, nothing answered) — the release answers UNAVAILABLE within its
//! deadline, while unrelated broker and vault calls, and whole other flows up
//! to the release, keep answering promptly.

use std::time::{Duration, Instant};

use tonic::Code;
use twokey_e2e::{System, bounded, check_request, check_single_use, signal, totp};
use twokey_proto::{
    broker::v1::{
        GetRequestRequest, ListRequestsRequest, ReleaseCodeRequest, Request, RequestState,
        WhoAmIRequest,
    },
    vault::v1::StatusRequest,
};
use twokey_testkit::local::ACCOUNT;

/// A bound no prompt call comes near (they take milliseconds) but that a
/// call stuck behind audit (2 s ack timeout, 15 s vault deadline, 30 s
/// server timeout) would pass.
const PROMPT: Duration = Duration::from_millis(1500);
/// The vault's audit acknowledgement timeout in these tests.
const ACK_TIMEOUT_MS: u64 = 2000;

async fn get(sys: &System, id: &str) -> Request {
    bounded(sys.broker("olivia").get_request(GetRequestRequest {
        request_id: id.into(),
    }))
    .await
    .expect("get request")
    .request
    .unwrap()
}

/// Runs `f` and asserts it answered within [`PROMPT`].
async fn prompt<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    let t = Instant::now();
    let out = f.await;
    let took = t.elapsed();
    assert!(
        took < PROMPT,
        "{what} took {took:?} while audit was stalled"
    );
    println!("{what}: {took:?}");
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn vault_unreachable_mid_flow_fails_closed_and_recovers_when_back() {
    let mut sys = System::start();
    sys.enroll().await;
    let r = sys.verified_request("network fault test").await;

    sys.local.kill("vault");
    let t = Instant::now();
    let err = sys
        .release_as_operator(&r.request_id)
        .await
        .expect_err("a code with the vault down");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().starts_with("vault:"), "{}", err.message());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // The broker still answers, and the failed release gave its code back.
    let after = get(&sys, &r.request_id).await;
    assert_eq!(after.state(), RequestState::Verified);
    assert_eq!(after.codes_released, 0);
    check_request(&after).unwrap();

    sys.local
        .restart(&twokey_e2e::bin_dir(), "vault")
        .expect("vault restarts");
    let code = sys
        .release_as_operator(&r.request_id)
        .await
        .expect("releases work once the vault is back");
    assert_eq!(code.code, totp(code.step));
    let done = get(&sys, &r.request_id).await;
    assert_eq!(done.state(), RequestState::Released);
    check_request(&done).unwrap();
    let actions: Vec<&str> = done.history.iter().map(|h| h.action.as_str()).collect();
    assert!(actions.contains(&"code.release_failed"), "{actions:?}");

    let log = sys
        .log_until(Duration::from_secs(10), |log| {
            log.iter().filter_map(|e| e.event.as_ref()).any(|e| {
                e.source.ends_with("/svc/broker")
                    && e.request_id == r.request_id
                    && e.action == "code.released"
            })
        })
        .await;
    let log_actions: Vec<&str> = log
        .iter()
        .filter_map(|e| e.event.as_ref())
        .filter(|e| e.request_id == r.request_id && e.source.ends_with("/svc/broker"))
        .map(|e| e.action.as_str())
        .collect();
    assert!(
        log_actions.contains(&"code.release_failed") && log_actions.contains(&"code.released"),
        "{log_actions:?}"
    );
    // The unreachable vault recorded nothing: one vault event for one code.
    let vault_released = log
        .iter()
        .filter_map(|e| e.event.as_ref())
        .filter(|e| e.source.ends_with("/svc/vault") && e.request_id == r.request_id)
        .count();
    assert_eq!(vault_released, 1);
    check_single_use(&log).unwrap();
    sys.verified_log(&[]).await;
}

/// Sends SIGCONT to a stopped process when dropped, so a failing assertion
/// never leaves audit frozen.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_audit_blocks_no_unrelated_call_and_release_fails_within_its_deadline() {
    let mut sys = System::start();
    sys.set_vault_ack_timeout(ACK_TIMEOUT_MS);
    // The second flow has an account of its own: right after enrollment an
    // account has one code left in the step window (the vault hands out no
    // step twice), and both requests release once audit is back.
    let second_account = "aws-demo-second".to_owned();
    sys.add_accounts(std::slice::from_ref(&second_account))
        .await;
    sys.enroll_accounts(&[ACCOUNT.to_owned(), second_account.clone()])
        .await;
    let first = sys.verified_request("network fault test").await;
    let logged_before = sys.log().await.len();
    let statement = sys
        .release_statement("olivia", &first.request_id)
        .await
        .expect("olivia's release statement");

    let audit = sys.pid("audit");
    signal(audit, "STOP");
    let resume = Resume(audit);

    // A release waits for audit, at most its deadline, on its own task…
    let t = Instant::now();
    let pending = {
        let mut client = sys.broker("olivia");
        let id = first.request_id.clone();
        tokio::spawn(async move {
            let out = bounded(client.release_code(ReleaseCodeRequest {
                request_id: id,
                statement: Some(statement),
            }))
            .await;
            (out, t.elapsed())
        })
    };
    // …while everything that does not need audit answers at once.
    prompt("broker WhoAmI", async {
        bounded(sys.broker("alice").who_am_i(WhoAmIRequest {}))
            .await
            .expect("whoami")
    })
    .await;
    let listed = prompt("broker ListRequests", async {
        bounded(
            sys.broker("adam")
                .list_requests(ListRequestsRequest::default()),
        )
        .await
        .expect("list")
    })
    .await;
    assert!(
        listed
            .requests
            .iter()
            .any(|r| r.request_id == first.request_id)
    );
    prompt("vault Status", async {
        bounded(sys.vault_as_broker().status(StatusRequest {}))
            .await
            .expect("status")
    })
    .await;
    // A whole second flow up to its release: the broker keeps its events in
    // its outbox and does not wait for audit.
    let second = prompt(
        "create, approve, PIN, verify",
        sys.verified_request_for(&second_account, "network fault test"),
    )
    .await;
    assert!(
        !pending.is_finished(),
        "the release ended before the unrelated calls: nothing was measured"
    );

    let (out, took) = pending.await.unwrap();
    let err = out.expect_err("a code while audit is stalled");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("audit unavailable"),
        "{}",
        err.message()
    );
    let deadline = Duration::from_millis(ACK_TIMEOUT_MS);
    assert!(
        took >= deadline && took < deadline + Duration::from_secs(5),
        "the release answered after {took:?}, its deadline is {deadline:?}"
    );
    println!(
        "release with audit stalled: {:?} after {took:?}",
        err.code()
    );
    let r = get(&sys, &first.request_id).await;
    assert_eq!((r.state(), r.codes_released), (RequestState::Verified, 0));

    // Audit back: both releases work, and every event reaches the log.
    drop(resume);
    for id in [&first.request_id, &second.request_id] {
        let code = sys
            .release_as_operator(id)
            .await
            .expect("releases work again");
        assert_eq!(code.code, totp(code.step));
        check_request(&get(&sys, id).await).unwrap();
    }
    let log = sys
        .log_until(Duration::from_secs(10), |log| {
            log.iter().filter_map(|e| e.event.as_ref()).any(|e| {
                e.source.ends_with("/svc/broker")
                    && e.request_id == second.request_id
                    && e.action == "code.released"
            })
        })
        .await;
    assert!(log.len() > logged_before);
    let of = |id: &str, source: &str| -> Vec<String> {
        log.iter()
            .filter_map(|e| e.event.as_ref())
            .filter(|e| e.request_id == id && e.source.ends_with(source))
            .map(|e| e.action.clone())
            .collect()
    };
    // The second request's steps taken while audit was stalled all arrived.
    let second_events = of(&second.request_id, "/svc/broker");
    for action in [
        "request.created",
        "request.approved",
        "pin.issued",
        "pin.verified",
        "code.released",
    ] {
        assert!(
            second_events.iter().any(|a| a == action),
            "{action} missing: {second_events:?}"
        );
    }
    // The stalled release is in the log as released, then withheld.
    let first_vault = of(&first.request_id, "/svc/vault");
    assert_eq!(
        first_vault,
        ["code.released", "code.withheld", "code.released"],
        "{first_vault:?}"
    );
    check_single_use(&log).unwrap();
    sys.verified_log(&[]).await;
}

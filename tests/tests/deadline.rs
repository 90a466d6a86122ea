//! The documented deadline of a release with audit down, end to end with
//! the real binaries: audit killed, `twokey code release` run by the real
//! CLI is refused with UNAVAILABLE naming audit within 3 s (plus a margin
//! for process start and a loaded machine), and the request keeps its code.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use tonic::Code;
use twokey_e2e::{System, bin_dir, bounded};
use twokey_proto::broker::v1::{GetRequestRequest, ReleaseCodeRequest, RequestState};

/// The documented deadline (README, SECURITY, OBSERVABILITY): audit down
/// means UNAVAILABLE after 3 s.
const DEADLINE: Duration = Duration::from_secs(3);
/// What the whole refusal may take beyond it: the CLI's start, its TLS
/// handshake and the broker's and vault's own work on a loaded machine.
const MARGIN: Duration = Duration::from_millis(1500);

#[tokio::test(flavor = "multi_thread")]
async fn with_audit_killed_the_cli_release_is_refused_unavailable_naming_audit_within_3s() {
    let mut sys = System::start();
    sys.enroll().await;
    let request = sys.verified_request("deadline test").await;
    let id = request.request_id;

    sys.local.kill("audit");
    let started = Instant::now();
    let cli = tokio::task::spawn_blocking({
        let config = sys.local.config.clone();
        let id = id.clone();
        move || {
            Command::new(bin_dir().join("twokey"))
                .env("TWOKEY_CONFIG", &config)
                .args(["--profile", "olivia", "--json", "code", "release", &id])
                .output()
                .expect("run twokey")
        }
    })
    .await
    .unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&cli.stderr);
    println!("release with audit killed, from the CLI: {took:?}: {stderr}");
    assert!(!cli.status.success(), "a code without audit: {stderr}");
    let error: serde_json::Value = serde_json::from_str(stderr.trim())
        .unwrap_or_else(|e| panic!("the --json error is not JSON ({e}): {stderr}"));
    assert_eq!(error["code"], "unavailable", "{stderr}");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.contains("audit unavailable"), "{message}");
    assert!(
        took < DEADLINE + MARGIN,
        "the refusal came after {took:?}; the documented deadline is {DEADLINE:?}"
    );

    // Over gRPC: exactly UNAVAILABLE, naming audit, as quickly.
    let started = Instant::now();
    let err = bounded(
        sys.broker("olivia").release_code(ReleaseCodeRequest {
            request_id: id.clone(),
            statement: Some(
                sys.release_statement("olivia", &id)
                    .await
                    .expect("olivia's release statement"),
            ),
        }),
    )
    .await
    .expect_err("a code without audit");
    let took = started.elapsed();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(
        err.message(),
        "vault: audit unavailable, no code released",
        "{err:?}"
    );
    assert!(took < DEADLINE + MARGIN, "refused after {took:?}");

    // The refused releases used up nothing.
    let r = bounded(sys.broker("olivia").get_request(GetRequestRequest {
        request_id: id.clone(),
    }))
    .await
    .expect("the broker still answers")
    .request
    .unwrap();
    assert_eq!((r.state(), r.codes_released), (RequestState::Verified, 0));
}

//! `twokey pin` against the real binaries on loopback: `pin show` gives the
//! requester, and no one else, their live PIN; a PIN that is not all digits
//! or not the request's length is refused by the CLI before it reaches the
//! broker, so it spends no attempt; the PIN reaches no service log and
//! leaves the mailbox once verified.

mod common;

use common::{file_request, json, local_system, one_line_error, twokey_as};

/// The service log files under `dir` that hold `pin` as a whole word (a
/// run of digits and letters equal to it, so a longer number, a timestamp
/// or a hex id that happens to contain it does not count).
fn logs_with(dir: &std::path::Path, pin: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut hits = Vec::new();
    for entry in entries {
        let path = entry.unwrap().path();
        let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).into_owned();
        if text
            .split(|c: char| !c.is_ascii_alphanumeric())
            .any(|word| word == pin)
        {
            hits.push(path.display().to_string());
        }
    }
    hits
}

#[test]
fn pin_show_answers_the_requester_alone_and_typos_spend_no_attempt() {
    let (_tmp, sys) = local_system();
    let cfg = &sys.config;
    let id = file_request(cfg, "see my own PIN")["request"]["requestId"]
        .as_str()
        .unwrap()
        .to_owned();

    // Before approval there is no PIN: the message says why.
    let err = one_line_error(twokey_as(cfg, "alice").args(["pin", "show", &id]), 1);
    assert!(err.starts_with("twokey: not possible now"), "{err}");
    assert!(err.contains("still needs approvals"), "{err}");

    json(twokey_as(cfg, "bob").args(["request", "approve", &id]));
    let pin = sys.wait_for_pin("alice", &id, 0).expect("a PIN");

    // alice sees it, as JSON and as text.
    let shown = json(twokey_as(cfg, "alice").args(["pin", "show", &id]));
    assert_eq!(shown["pin"], pin.as_str());
    assert_eq!(shown["request"]["state"], "REQUEST_STATE_APPROVED");
    let out = twokey_as(cfg, "alice")
        .args(["pin", "show", &id])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with(&format!("PIN {pin}\n")), "{text}");
    assert!(text.contains("only to the operator"), "{text}");

    // Nobody else does: not the operator, not the approver.
    for who in ["olivia", "bob"] {
        let err = one_line_error(twokey_as(cfg, who).args(["pin", "show", &id]), 1);
        assert!(err.starts_with("twokey: permission denied"), "{who}: {err}");
        assert!(!err.contains(&pin), "{err}");
    }

    // Typos are refused before they reach the broker: no attempt spent.
    let short = &pin[..pin.len() - 1];
    let long = format!("{pin}0");
    for typo in ["abc", "12a456", short, long.as_str()] {
        let err = one_line_error(
            twokey_as(cfg, "olivia")
                .args(["pin", "verify", &id, "--pin-stdin"])
                .write_stdin(format!("{typo}\n")),
            1,
        );
        assert!(
            err.contains("nothing was sent, no attempt was counted"),
            "{typo}: {err}"
        );
        assert!(!err.contains(typo), "the typo is echoed: {err}");
        let err = one_line_error(
            twokey_as(cfg, "olivia")
                .args(["--json", "pin", "verify", &id, "--pin-stdin"])
                .write_stdin(format!("{typo}\n")),
            1,
        );
        let err: serde_json::Value = serde_json::from_str(&err).unwrap();
        assert_eq!(err["code"], "input", "{err}");
    }
    let r = json(twokey_as(cfg, "olivia").args(["request", "show", &id]));
    assert_eq!(r["request"]["state"], "REQUEST_STATE_APPROVED");
    assert_eq!(r["request"]["pinAttempts"].as_u64().unwrap_or(0), 0, "{r}");
    assert_eq!(r["request"]["pinLength"], 6, "{r}");

    // The shown PIN verifies; then it is no longer shown, nor in the mailbox.
    let verified = json(
        twokey_as(cfg, "olivia")
            .args(["pin", "verify", &id, "--pin-stdin"])
            .write_stdin(format!("{pin}\n")),
    );
    assert_eq!(verified["request"]["state"], "REQUEST_STATE_VERIFIED");
    let err = one_line_error(twokey_as(cfg, "alice").args(["pin", "show", &id]), 1);
    assert!(err.contains("already verified"), "{err}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while sys.pin_for("alice", &id).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the verified PIN stayed in the mailbox"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The services never logged it.
    let logs = sys.dir.join("logs");
    assert!(logs.join("broker.log").exists(), "the broker logs there");
    assert_eq!(logs_with(&logs, &pin), Vec::<String>::new());
}

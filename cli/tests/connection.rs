//! Connecting: profiles and flag overrides, and one-line errors with exit 1
//! when a service cannot be reached (127.0.0.1:1 never answers). Secrets
//! read from stdin never show up in an error.

mod common;

use common::{one_line_error, pki_init, twokey, twokey_as};

const DEAD: &str = "127.0.0.1:1";

fn dead_profile() -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let config = pki_init(
        &tmp.path().join("pki"),
        &[
            "alice:requester",
            "olga:operator",
            "adam:admin",
            "carol:auditor",
        ],
        DEAD,
        DEAD,
    );
    (tmp, config)
}

fn assert_unreachable(err: &str, service: &str) {
    assert!(
        err.starts_with(&format!(
            "twokey: cannot reach the {service} at https://{DEAD}"
        )),
        "{err}"
    );
    assert!(err.contains("is it running"), "{err}");
    assert!(!err.contains("Status {"), "Debug dump in {err}");
}

#[test]
fn every_broker_command_fails_in_one_line_when_the_broker_is_unreachable() {
    let (_tmp, config) = dead_profile();
    let commands: &[&[&str]] = &[
        &["whoami"],
        &[
            "request",
            "create",
            "--account",
            "aws",
            "--reason",
            "deploy",
        ],
        &["request", "list", "--mine"],
        &["request", "show", "r-1"],
        &["request", "watch"],
        &["request", "approve", "r-1"],
        &["request", "deny", "r-1", "--reason", "no"],
        &["request", "cancel", "r-1"],
        &["pin", "resend", "r-1"],
        &["code", "release", "r-1"],
        &["account", "list"],
        &["account", "remove", "aws", "--reason", "gone", "--yes"],
    ];
    for args in commands {
        let err = one_line_error(twokey_as(&config, "alice").args(*args), 1);
        assert_unreachable(&err, "broker");
        // With --json the error is one JSON object on stderr, the same
        // message, and stdout stays empty.
        let err = one_line_error(twokey_as(&config, "alice").args(*args).arg("--json"), 1);
        let v: serde_json::Value = serde_json::from_str(err.trim_end()).expect("JSON error");
        assert_eq!(v["code"], "unavailable", "{v}");
        assert_eq!(v["exit"], 1, "{v}");
        assert_unreachable(
            &format!("twokey: {}", v["message"].as_str().unwrap()),
            "broker",
        );
    }
}

#[test]
fn audit_commands_fail_in_one_line_when_audit_is_unreachable() {
    let (tmp, config) = dead_profile();
    let out = tmp.path().join("out");
    let out = out.to_str().unwrap();
    for args in [
        vec!["audit", "query", "--since", "1h"],
        vec!["audit", "export", "--out", out],
        vec!["audit", "checkpoint", "--out", out],
    ] {
        let err = one_line_error(twokey_as(&config, "carol").args(&args), 1);
        assert_unreachable(&err, "audit");
    }
}

#[test]
fn a_profile_without_audit_says_which_flag_is_missing() {
    let (_tmp, config) = dead_profile();
    let err = one_line_error(twokey_as(&config, "alice").args(["audit", "query"]), 2);
    assert!(err.contains("no audit address"), "{err}");
    assert!(err.contains("profile \"alice\""), "{err}");
}

#[test]
fn flags_override_the_profile() {
    let (_tmp, config) = dead_profile();
    let err = one_line_error(
        twokey_as(&config, "alice").args(["whoami", "--broker", "127.0.0.1:2"]),
        1,
    );
    assert!(err.contains("https://127.0.0.1:2"), "{err}");
}

#[test]
fn an_unknown_profile_is_named_with_the_known_ones() {
    let (_tmp, config) = dead_profile();
    let err = one_line_error(twokey_as(&config, "mallory").arg("whoami"), 1);
    assert!(err.contains("no profile \"mallory\""), "{err}");
    assert!(err.contains("alice"), "{err}");
}

#[test]
fn the_profile_can_be_chosen_with_flags_instead_of_the_environment() {
    let (_tmp, config) = dead_profile();
    let err = one_line_error(
        twokey()
            .arg("--config")
            .arg(&config)
            .args(["--profile", "olga", "whoami"]),
        1,
    );
    assert_unreachable(&err, "broker");
}

#[test]
fn flags_alone_are_enough_without_a_config_file() {
    let (tmp, _config) = dead_profile();
    let pki = tmp.path().join("pki");
    let err = one_line_error(
        twokey()
            .args(["whoami", "--broker", DEAD])
            .arg("--cert")
            .arg(pki.join("alice.crt"))
            .arg("--key")
            .arg(pki.join("alice.key"))
            .arg("--ca")
            .arg(pki.join("ca.crt")),
        1,
    );
    assert_unreachable(&err, "broker");
}

#[test]
fn a_missing_certificate_file_is_named() {
    let (tmp, _config) = dead_profile();
    let pki = tmp.path().join("pki");
    let err = one_line_error(
        twokey()
            .args(["whoami", "--broker", DEAD, "--cert", "/nope/x.crt"])
            .arg("--key")
            .arg(pki.join("alice.key"))
            .arg("--ca")
            .arg(pki.join("ca.crt")),
        1,
    );
    assert!(err.contains("/nope/x.crt"), "{err}");
}

#[test]
fn account_enroll_reads_the_seed_from_stdin_and_never_echoes_it() {
    let (_tmp, config) = dead_profile();
    let seed = "otpauth://totp/AWS:root?secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP&issuer=AWS";
    let err = one_line_error(
        twokey_as(&config, "adam")
            .args(["account", "enroll", "aws-prod-root"])
            .write_stdin(seed),
        1,
    );
    // It got as far as calling the broker, so it read the seed from stdin.
    assert_unreachable(&err, "broker");
    assert!(!err.contains("JBSWY3DP"), "{err}");
}

#[test]
fn account_enroll_with_empty_stdin_says_what_to_pipe() {
    let (_tmp, config) = dead_profile();
    let err = one_line_error(
        twokey_as(&config, "adam")
            .args(["account", "enroll", "aws-prod-root"])
            .write_stdin(""),
        1,
    );
    assert!(err.contains("no seed on stdin"), "{err}");
}

#[test]
fn account_enroll_refuses_a_non_seed_without_echoing_it() {
    let (_tmp, config) = dead_profile();
    let err = one_line_error(
        twokey_as(&config, "adam")
            .args(["account", "enroll", "aws-prod-root"])
            .write_stdin("hunter2!secret"),
        1,
    );
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn pin_verify_reads_the_pin_from_stdin_and_never_echoes_it() {
    let (_tmp, config) = dead_profile();
    let err = one_line_error(
        twokey_as(&config, "olga")
            .args(["pin", "verify", "r-1", "--pin-stdin"])
            .write_stdin("834201\n"),
        1,
    );
    assert_unreachable(&err, "broker");
    assert!(!err.contains("834201"), "{err}");
}

#[test]
fn pin_verify_without_a_terminal_asks_for_pin_stdin() {
    let (_tmp, config) = dead_profile();
    let out = twokey_as(&config, "olga")
        .args(["pin", "verify", "r-1"])
        .write_stdin("")
        .assert()
        .failure()
        .get_output()
        .clone();
    let err = String::from_utf8(out.stderr).unwrap();
    // Without a controlling terminal the prompt cannot be shown.
    if std::fs::File::open("/dev/tty").is_err() {
        assert!(err.contains("--pin-stdin"), "{err}");
    }
}

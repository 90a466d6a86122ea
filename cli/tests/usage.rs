//! Argument parsing: usage errors exit 2, help and completions work, and no
//! flag takes a seed or a PIN on the command line.

mod common;

use common::{one_line_error, twokey};
use predicates::prelude::*;

#[test]
fn no_subcommand_is_a_usage_error() {
    twokey().assert().code(2);
}

#[test]
fn unknown_flag_is_a_usage_error() {
    twokey().args(["whoami", "--bogus"]).assert().code(2);
}

#[test]
fn request_create_without_account_is_a_usage_error() {
    twokey()
        .args(["request", "create", "--reason", "x"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--account"));
}

#[test]
fn request_deny_needs_a_reason() {
    twokey().args(["request", "deny", "r-1"]).assert().code(2);
}

#[test]
fn an_unknown_state_is_a_usage_error_listing_the_states() {
    twokey()
        .args(["request", "list", "--state", "bogus"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("pending"));
}

#[test]
fn account_enroll_has_no_flag_for_a_seed() {
    for flag in ["--secret", "--seed", "--uri", "--otpauth"] {
        twokey()
            .args([
                "account",
                "enroll",
                "aws-prod-root",
                flag,
                "JBSWY3DPEHPK3PXP",
            ])
            .assert()
            .code(2);
    }
    twokey()
        .args(["account", "enroll", "aws-prod-root", "JBSWY3DPEHPK3PXP"])
        .assert()
        .code(2);
}

#[test]
fn pin_verify_takes_no_pin_on_the_command_line() {
    twokey()
        .args(["pin", "verify", "r-1", "123456"])
        .assert()
        .code(2);
    twokey()
        .args(["pin", "verify", "r-1", "--pin", "123456"])
        .assert()
        .code(2);
}

#[test]
fn pki_init_rejects_a_malformed_user() {
    twokey()
        .args(["pki", "init", "--dir", "/tmp/x", "--user", "alice"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("NAME:ROLE"));
}

#[test]
fn help_documents_profiles_and_exit_codes() {
    twokey()
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("[profiles.alice]"))
        .stdout(predicate::str::contains("Exit codes"));
}

#[test]
fn every_command_group_has_help() {
    for group in [
        "whoami",
        "request",
        "pin",
        "code",
        "account",
        "audit",
        "pki",
        "completions",
    ] {
        twokey().args([group, "--help"]).assert().success();
    }
}

#[test]
fn completions_are_printed_for_bash_and_zsh() {
    twokey()
        .args(["completions", "bash"])
        .assert()
        .success()
        .stdout(predicate::str::contains("twokey"));
    twokey().args(["completions", "zsh"]).assert().success();
    twokey().args(["completions", "tcsh"]).assert().code(2);
}

#[test]
fn missing_connection_settings_are_a_usage_error_saying_what_to_pass() {
    let err = one_line_error(twokey().arg("whoami"), 2);
    assert!(err.contains("--broker"), "{err}");
    assert!(err.contains("--profile"), "{err}");
}

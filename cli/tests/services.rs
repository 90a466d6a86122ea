//! The real `twokey` binary against the real audit, vault and broker
//! binaries on loopback: the whole story with a `--json` round trip for every
//! command group — each step signed by its person's own OpenSSH key (one of
//! them through a real `ssh-agent`) — the code checked against an
//! independent TOTP computation, the audit log verified offline at the end;
//! policy changes and admin actions need two admins.

mod common;

use std::io::{BufRead, BufReader};

use common::{Agent, file_request, json, json_lines, local_system, one_line_error, twokey_as};
use serde_json::Value;
use twokey_testkit::local::ACCOUNT;

const SECRET_B32: &str = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP";

fn secret_bytes() -> Vec<u8> {
    // RFC 4648 Base32 without padding.
    let mut out = Vec::new();
    let (mut buf, mut bits) = (0u64, 0);
    for c in SECRET_B32.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'2'..=b'7' => c - b'2' + 26,
            _ => unreachable!(),
        };
        buf = (buf << 5) | u64::from(v);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    out
}

fn totp_at(unix: u64) -> String {
    totp_rs::Builder::new()
        .with_algorithm(totp_rs::Algorithm::SHA1)
        .with_digits(6)
        .with_step_duration(30)
        .with_secret(secret_bytes())
        .build_noncompliant()
        .generate(unix)
        .to_string()
}

fn seconds(ts: &Value) -> u64 {
    let text = ts.as_str().expect("timestamp string");
    let secs = twokey::output::parse_time(text).expect("RFC 3339").seconds;
    u64::try_from(secs).unwrap()
}

fn request_id(v: &Value) -> String {
    v["request"]["requestId"].as_str().unwrap().to_owned()
}

#[test]
fn the_whole_story_works_over_real_services_with_json_everywhere() {
    let (tmp, sys) = local_system();
    let cfg = &sys.config;

    // whoami
    let me = json(twokey_as(cfg, "alice").arg("whoami"));
    assert_eq!(me["identity"], "spiffe://twokey.local/user/alice");
    assert_eq!(me["accounts"][0]["accountId"], ACCOUNT);
    // Consent policy version 1, signed by adam and anna, is in force.
    assert_eq!(me["policyVersion"], "1");
    let policy = json(twokey_as(cfg, "carol").args(["policy", "show"]));
    assert_eq!(policy["applied"][0]["version"], "1");
    assert_eq!(
        policy["applied"][0]["document"].as_str().unwrap(),
        std::fs::read_to_string(&sys.consent_policy).unwrap()
    );

    // account enroll: seed from stdin, two registration codes.
    let enrolled = json(
        twokey_as(cfg, "adam")
            .args([
                "account",
                "enroll",
                ACCOUNT,
                "--issuer",
                "Amazon Web Services",
            ])
            .write_stdin(format!("{SECRET_B32}\n")),
    );
    for which in ["current", "next"] {
        let code = &enrolled[which];
        let from = seconds(&code["validFrom"]);
        assert_eq!(code["code"].as_str().unwrap(), totp_at(from), "{which}");
    }
    assert_eq!(
        seconds(&enrolled["next"]["validFrom"]),
        seconds(&enrolled["current"]["validUntil"])
    );
    let accounts = json(twokey_as(cfg, "adam").args(["account", "list"]));
    assert_eq!(accounts["accounts"][0]["accountId"], ACCOUNT);
    assert!(!accounts.to_string().contains(SECRET_B32));

    // request create / list / show: alice signs through a real ssh-agent
    // holding her key.
    let agent = Agent::start();
    agent.add(&sys.ssh_key("alice"));
    let created = json(
        twokey_as(cfg, "alice")
            .env("SSH_AUTH_SOCK", &agent.socket)
            .args([
                "request",
                "create",
                "--account",
                ACCOUNT,
                "--reason",
                "rotate keys",
                "--ticket",
                "OPS-7",
            ]),
    );
    let id = request_id(&created);
    assert_eq!(created["request"]["state"], "REQUEST_STATE_PENDING");
    // The broker took the request id alice chose and signed.
    let signed = &created["request"]["consent"]["request"];
    assert!(signed["signature"].is_string(), "{created}");
    // An agent without bob's key: a clear error, and no approval.
    let err = one_line_error(
        twokey_as(cfg, "bob")
            .env("SSH_AUTH_SOCK", &agent.socket)
            .args(["request", "approve", &id]),
        1,
    );
    assert!(err.contains("does not hold your key"), "{err}");
    assert!(err.contains("ssh-add"), "{err}");
    let listed =
        json(twokey_as(cfg, "alice").args(["request", "list", "--mine", "--state", "pending"]));
    assert_eq!(listed["requests"][0]["requestId"], id.as_str());
    let shown = json(twokey_as(cfg, "bob").args(["request", "show", &id]));
    assert_eq!(shown["request"]["ticket"], "OPS-7");

    // Nobody approves their own request: one line, exit 1.
    let err = one_line_error(twokey_as(cfg, "alice").args(["request", "approve", &id]), 1);
    assert!(err.starts_with("twokey: permission denied"), "{err}");

    // approve -> PIN to alice's mailbox
    let approved = json(twokey_as(cfg, "bob").args(["request", "approve", &id, "--comment", "ok"]));
    assert_eq!(approved["request"]["state"], "REQUEST_STATE_APPROVED");
    assert_eq!(
        approved["request"]["consent"]["approvals"]
            .as_array()
            .map(Vec::len),
        Some(1),
        "{approved}"
    );
    let pin = sys
        .wait_for_pin("alice", &id, 0)
        .expect("a PIN in alice's mailbox");

    // pin resend voids the PIN and sends a new one.
    let resent = json(twokey_as(cfg, "alice").args(["pin", "resend", &id]));
    assert_eq!(resent["request"]["requestId"], id.as_str());
    let new_pin = sys.wait_for_pin("alice", &id, 1).expect("a new PIN");
    let _ = pin;

    // A wrong PIN: one line, exit 1, never echoed.
    let wrong = if new_pin == "000000" {
        "111111"
    } else {
        "000000"
    };
    let err = one_line_error(
        twokey_as(cfg, "olivia")
            .args(["pin", "verify", &id, "--pin-stdin"])
            .write_stdin(format!("{wrong}\n")),
        1,
    );
    assert!(!err.contains(wrong), "{err}");

    let verified = json(
        twokey_as(cfg, "olivia")
            .args(["pin", "verify", &id, "--pin-stdin"])
            .write_stdin(format!("{new_pin}\n")),
    );
    assert_eq!(verified["request"]["state"], "REQUEST_STATE_VERIFIED");

    // code release: the code is the TOTP of its step.
    let released = json(twokey_as(cfg, "olivia").args(["code", "release", &id]));
    let code = &released["code"];
    assert_eq!(
        code["code"].as_str().unwrap(),
        totp_at(seconds(&code["validFrom"]))
    );
    // Human output without a terminal prints once and exits.
    let err = one_line_error(twokey_as(cfg, "olivia").args(["code", "release", &id]), 1);
    assert!(err.contains("not possible now"), "{err}");

    // deny and cancel on fresh requests.
    let second = request_id(&json(twokey_as(cfg, "alice").args([
        "request",
        "create",
        "--account",
        ACCOUNT,
        "--reason",
        "second",
    ])));
    let denied = json(twokey_as(cfg, "bob").args(["request", "deny", &second, "--reason", "no"]));
    assert_eq!(denied["request"]["state"], "REQUEST_STATE_DENIED");
    let third = request_id(&json(twokey_as(cfg, "alice").args([
        "request",
        "create",
        "--account",
        ACCOUNT,
        "--reason",
        "third",
    ])));
    let cancelled = json(twokey_as(cfg, "alice").args(["request", "cancel", &third]));
    assert_eq!(cancelled["request"]["state"], "REQUEST_STATE_CANCELLED");

    // audit reconcile: CloudTrail as AWS delivers it, generated here. The
    // first root sign-in after the release is explained by it; a second
    // one, with no release left, is not.
    let trail = tmp.path().join("trail");
    let aws = "123456789012";
    let now = time::OffsetDateTime::now_utc();
    use twokey_reconcile::fixture::{Record, write_log_file};
    write_log_file(
        &trail,
        aws,
        "us-east-1",
        now,
        "a1",
        [
            Record::console_login(aws, now),
            Record::console_login(aws, now + time::Duration::seconds(1)),
        ],
    )
    .unwrap();
    let reconciled = json(
        twokey_as(cfg, "carol")
            .args(["audit", "reconcile", "--since", "1h", "--account"])
            .arg(format!("{ACCOUNT}={aws}"))
            .arg("--cloudtrail")
            .arg(&trail),
    );
    let kinds: Vec<&str> = reconciled["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["matched", "unexplained"], "{reconciled}");
    assert_eq!(
        reconciled["findings"][0]["requestId"],
        id.as_str(),
        "{reconciled}"
    );
    let err = one_line_error(
        twokey_as(cfg, "carol")
            .args(["audit", "reconcile", "--account", "x=12"])
            .arg("--cloudtrail")
            .arg(&trail),
        2,
    );
    assert!(err.contains("--account \"x=12\""), "{err}");

    // request list pages: --limit, then --page-token for the rest.
    let first = json(twokey_as(cfg, "alice").args(["request", "list", "--limit", "2"]));
    let page = first["requests"].as_array().unwrap();
    assert_eq!(page.len(), 2, "{first}");
    let token = first["nextPageToken"].as_str().unwrap().to_owned();
    assert!(!token.is_empty(), "{first}");
    let rest = json(twokey_as(cfg, "alice").args(["request", "list", "--page-token", &token]));
    let rest = rest["requests"].as_array().unwrap();
    assert!(!rest.is_empty());
    assert!(
        rest.iter().all(|r| !page.contains(r)),
        "the next page repeats the first"
    );
    let out = twokey_as(cfg, "alice")
        .args(["request", "list", "--limit", "1"])
        .output()
        .unwrap();
    let hint = String::from_utf8_lossy(&out.stderr);
    assert!(
        hint.contains("more requests match: add --page-token ") && hint.contains("raise --limit"),
        "{hint}"
    );

    // audit query by a person's policy name, as well as by SPIFFE ID.
    let by_name = json_lines(twokey_as(cfg, "carol").args(["audit", "query", "--actor", "bob"]));
    let by_id = json_lines(twokey_as(cfg, "carol").args([
        "audit",
        "query",
        "--actor",
        "spiffe://twokey.local/user/bob",
    ]));
    let actors = |batches: &[Value]| -> Vec<String> {
        batches
            .iter()
            .flat_map(|b| b["entries"].as_array().cloned().unwrap_or_default())
            .map(|e| e["event"]["actor"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert!(!actors(&by_name).is_empty());
    assert!(
        actors(&by_name)
            .iter()
            .all(|a| a == "spiffe://twokey.local/user/bob")
    );
    assert_eq!(actors(&by_name), actors(&by_id));

    // audit query / export / checkpoint / verify
    let batches =
        json_lines(twokey_as(cfg, "carol").args(["audit", "query", "--action", "code.released"]));
    let entries: Vec<Value> = batches
        .iter()
        .flat_map(|b| b["entries"].as_array().cloned().unwrap_or_default())
        .collect();
    assert!(
        entries
            .iter()
            .any(|e| e["event"]["source"] == "spiffe://twokey.local/svc/vault"),
        "{batches:?}"
    );
    let export = tmp.path().join("log.jsonl");
    let checkpoint = tmp.path().join("checkpoint.txt");
    let exported = json(
        twokey_as(cfg, "carol")
            .arg("audit")
            .arg("export")
            .arg("--out")
            .arg(&export),
    );
    assert!(exported["entries"].as_u64().unwrap() >= 10, "{exported}");
    let cp = json(
        twokey_as(cfg, "carol")
            .arg("audit")
            .arg("checkpoint")
            .arg("--out")
            .arg(&checkpoint),
    );
    assert!(
        cp["checkpoint"]
            .as_str()
            .unwrap()
            .starts_with("twokey.local/audit\n")
    );
    let report = json(
        twokey_as(cfg, "carol")
            .arg("audit")
            .arg("verify")
            .arg("--export")
            .arg(&export)
            .arg("--checkpoint")
            .arg(&checkpoint)
            .arg("--sources")
            .arg(&sys.audit_config)
            .args(["--checkpoint-key", &sys.verifier_key]),
    );
    assert!(
        report["checkpointTreeSize"].as_u64().unwrap() >= 10,
        "{report}"
    );
    // And fetched live.
    let live = json(
        twokey_as(cfg, "carol")
            .args(["audit", "verify", "--sources"])
            .arg(&sys.audit_config)
            .args(["--checkpoint-key", &sys.verifier_key]),
    );
    assert!(live["entries"].as_u64().unwrap() >= report["entries"].as_u64().unwrap());
    // Fetched live, the checkpoint is trusted on its witnesses: both
    // sources cosigned it; a quorum of 3 cannot be met, and says why.
    assert_eq!(
        live["witnesses"].as_array().map(Vec::len),
        Some(2),
        "{live}"
    );
    let err = one_line_error(
        twokey_as(cfg, "carol")
            .args(["audit", "verify", "--witness-quorum", "3", "--sources"])
            .arg(&sys.audit_config)
            .args(["--checkpoint-key", &sys.verifier_key]),
        1,
    );
    assert!(
        err.contains("2 of the 3 needed witness cosignatures") && err.contains("--checkpoint FILE"),
        "{err}"
    );

    // Nothing secret ever reached the audit log.
    let log = std::fs::read_to_string(&export).unwrap();
    assert!(!log.contains(SECRET_B32));
    assert!(!log.contains(&format!("\"{new_pin}\"")));

    // account remove: two admins. adam starts the action, anna signs it,
    // adam carries it out.
    let started = json(
        twokey_as(cfg, "adam").args(["account", "remove", ACCOUNT, "--reason", "done", "--yes"]),
    );
    let action = started["actionId"].as_str().unwrap().to_owned();
    assert_eq!(started["needed"], 2, "{started}");
    // With one signature the broker and vault refuse it, and the account stays.
    let err = one_line_error(
        twokey_as(cfg, "adam").args([
            "account", "remove", ACCOUNT, "--reason", "done", "--yes", "--action", &action,
        ]),
        1,
    );
    assert!(err.starts_with("twokey: "), "{err}");
    let accounts = json(twokey_as(cfg, "adam").args(["account", "list"]));
    assert_eq!(accounts["accounts"][0]["accountId"], ACCOUNT);
    let open = json(twokey_as(cfg, "anna").args(["account", "actions"]));
    assert_eq!(open["actions"][0]["actionId"], action.as_str(), "{open}");
    let signed = json(twokey_as(cfg, "anna").args(["account", "sign-action", &action]));
    assert_eq!(
        signed["signedBy"].as_array().map(Vec::len),
        Some(2),
        "{signed}"
    );
    let removed = json(twokey_as(cfg, "adam").args([
        "account", "remove", ACCOUNT, "--reason", "done", "--yes", "--action", &action,
    ]));
    assert_eq!(removed["accountId"], ACCOUNT);
}

#[test]
fn a_policy_change_needs_both_admins_and_shows_its_diff() {
    let (tmp, sys) = local_system();
    let cfg = &sys.config;
    let mut spec = sys.policy_spec();
    spec.version = 2;
    spec.accounts[0].codes_per_request = 2;
    let file = tmp.path().join("policy-v2.toml");
    std::fs::write(&file, spec.to_toml()).unwrap();

    // adam proposes (and signs); alone it is not enough.
    let proposed = json(
        twokey_as(cfg, "adam")
            .arg("policy")
            .arg("propose")
            .arg(&file),
    );
    assert_eq!(proposed["version"], "2");
    assert_eq!(proposed["signedBy"].as_array().map(Vec::len), Some(1));
    let err = one_line_error(twokey_as(cfg, "adam").args(["policy", "apply", "2"]), 1);
    assert!(err.starts_with("twokey: "), "{err}");
    let still = json(twokey_as(cfg, "alice").arg("whoami"));
    assert_eq!(still["policyVersion"], "1");

    // anna reads and signs it; then it applies.
    let shown = twokey_as(cfg, "anna")
        .args(["policy", "show", "--proposal", "2"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let shown = String::from_utf8(shown).unwrap();
    assert!(shown.contains("+ codes_per_request = 2"), "{shown}");
    json(twokey_as(cfg, "anna").args(["policy", "sign", "2"]));
    let applied = json(twokey_as(cfg, "anna").args(["policy", "apply", "2"]));
    assert_eq!(applied["version"], "2");
    assert_eq!(applied["signedBy"], serde_json::json!(["adam", "anna"]));

    let text = twokey_as(cfg, "carol")
        .args(["policy", "show"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let text = String::from_utf8(text).unwrap();
    assert!(text.contains("policy version 2 is in force"), "{text}");
    assert!(text.contains("signed by  adam, anna"), "{text}");
    assert!(text.contains("- version = 1\n+ version = 2"), "{text}");
    assert!(
        text.contains("- codes_per_request = 1\n+ codes_per_request = 2"),
        "{text}"
    );

    // Statements now bind version 2: a request files under it.
    let created = file_request(cfg, "after the change");
    assert_eq!(
        created["request"]["consent"]["policyVersion"], "2",
        "{created}"
    );
}

#[test]
fn request_watch_streams_one_json_object_per_change() {
    let (_tmp, sys) = local_system();
    let cfg = &sys.config;
    let mut watch = std::process::Command::new(env!("CARGO_BIN_EXE_twokey"))
        .env("TWOKEY_CONFIG", cfg)
        .env("TWOKEY_PROFILE", "bob")
        .args(["request", "watch", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    // The watch may subscribe after the first create; create until one shows.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
    });
    let mut seen = None;
    for _ in 0..20 {
        file_request(cfg, "watch me");
        if let Ok(line) = rx.recv_timeout(std::time::Duration::from_millis(500)) {
            seen = Some(line);
            break;
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    let line = seen.expect("watch printed a change");
    let change: Value = serde_json::from_str(&line).expect("one JSON object per line");
    assert_eq!(change["request"]["accountId"], ACCOUNT);
    assert!(change["action"].as_str().unwrap().starts_with("request."));
}

#[test]
fn a_wrong_server_name_fails_the_handshake_in_one_line() {
    let (_tmp, sys) = local_system();
    let err = one_line_error(
        twokey_as(&sys.config, "alice").args(["whoami", "--broker-server-name", "vault"]),
        1,
    );
    assert!(err.starts_with("twokey: cannot reach the broker"), "{err}");
}

#[test]
fn an_auditor_without_a_broker_role_sees_no_accounts_and_cannot_file() {
    let (_tmp, sys) = local_system();
    let err = one_line_error(
        twokey_as(&sys.config, "carol").args([
            "request",
            "create",
            "--account",
            ACCOUNT,
            "--reason",
            "x",
        ]),
        1,
    );
    assert!(err.starts_with("twokey: permission denied"), "{err}");
}

#[test]
fn demo_runs_the_whole_story_and_checks_the_code_independently() {
    let bins = common::service_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let report = json(
        common::twokey()
            .env("PATH", &bins)
            .args(["demo", "--dir"])
            .arg(&dir),
    );
    assert_eq!(report["codeMatches"], true, "{report}");
    assert!(report["auditEntries"].as_u64().unwrap() >= 8, "{report}");
    assert!(dir.join("twokey.toml").exists());
    assert!(report["services"].as_array().unwrap().is_empty());
}

#[test]
fn demo_keep_leaves_the_services_running_for_the_profiles() {
    let _ = common::service_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let report = json(common::twokey().args(["demo", "--keep", "--dir"]).arg(&dir));
    let pids: Vec<u64> = report["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[1].as_u64().unwrap())
        .collect();
    assert_eq!(pids.len(), 3, "{report}");
    let listed = json(twokey_as(&dir.join("twokey.toml"), "bob").args(["request", "list"]));
    let stop = std::process::Command::new("kill")
        .args(pids.iter().map(u64::to_string))
        .status()
        .unwrap();
    assert!(stop.success());
    assert_eq!(listed["requests"][0]["state"], "REQUEST_STATE_RELEASED");
}

/// `twokey account enroll ACCOUNT --replace --action ACTION` as adam, the
/// Base32 `seed` on stdin.
fn enroll_replace(cfg: &std::path::Path, action: &str, seed: &str) -> assert_cmd::Command {
    let mut cmd = twokey_as(cfg, "adam");
    cmd.args([
        "account",
        "enroll",
        ACCOUNT,
        "--replace",
        "--action",
        action,
        "--yes",
    ])
    .write_stdin(format!("{seed}\n"));
    cmd
}

/// adam starts `action` on the account with `args`, anna signs it; the
/// action id.
fn two_admins_sign(cfg: &std::path::Path, args: &[&str]) -> String {
    let started = json(twokey_as(cfg, "adam").args(args));
    let action = started["actionId"].as_str().unwrap().to_owned();
    let signed = json(twokey_as(cfg, "anna").args(["account", "sign-action", &action]));
    assert_eq!(
        signed["signedBy"].as_array().map(Vec::len),
        Some(2),
        "{signed}"
    );
    action
}

#[test]
fn replacing_a_seed_and_restoring_it_need_two_admins() {
    let (_tmp, sys) = local_system();
    let cfg = &sys.config;
    json(
        twokey_as(cfg, "adam")
            .args(["account", "enroll", ACCOUNT])
            .write_stdin(format!("{SECRET_B32}\n")),
    );
    const OTHER: &str = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ";

    // --replace without --action starts the action and reads no seed.
    let action = two_admins_sign(cfg, &["account", "enroll", ACCOUNT, "--replace", "--yes"]);
    let replaced = json(&mut enroll_replace(cfg, &action, OTHER));
    assert_eq!(replaced["account"]["accountId"], ACCOUNT);
    // The registration codes are the new seed's, not the old one's.
    let from = seconds(&replaced["current"]["validFrom"]);
    assert_ne!(replaced["current"]["code"].as_str().unwrap(), totp_at(from));

    // The same action id does not replace twice.
    let err = one_line_error(&mut enroll_replace(cfg, &action, SECRET_B32), 1);
    assert!(err.starts_with("twokey: "), "{err}");

    // Restore brings the earlier seed back.
    let action = two_admins_sign(cfg, &["account", "restore", ACCOUNT]);
    let restored =
        json(twokey_as(cfg, "adam").args(["account", "restore", ACCOUNT, "--action", &action]));
    assert_eq!(restored["account"]["accountId"], ACCOUNT, "{restored}");

    // A code released now is the original seed's.
    let id = request_id(&file_request(cfg, "after the restore"));
    json(twokey_as(cfg, "bob").args(["request", "approve", &id]));
    let pin = sys.wait_for_pin("alice", &id, 0).expect("a PIN");
    json(
        twokey_as(cfg, "olivia")
            .args(["pin", "verify", &id, "--pin-stdin"])
            .write_stdin(format!("{pin}\n")),
    );
    let released = json(twokey_as(cfg, "olivia").args(["code", "release", &id]));
    let code = &released["code"];
    assert_eq!(
        code["code"].as_str().unwrap(),
        totp_at(seconds(&code["validFrom"]))
    );
}

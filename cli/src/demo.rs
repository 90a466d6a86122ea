//! `twokey demo`: the whole story on loopback, printing each step — PKI,
//! the people's own OpenSSH keys and configs, audit, vault and broker as
//! separate processes, the consent policy signed by the admins adam and
//! anna, an enrolled account, a request signed by alice, an approval signed
//! by bob, the PIN from the requester's mailbox, verification, the release
//! signed by olivia and its code checked against an independent TOTP
//! computation, two generated CloudTrail root sign-ins reconciled by audit
//! (one matched by that release, one unexplained and sent to the admins,
//! issue 20), and offline verification of the audit log.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{SystemTime, UNIX_EPOCH},
};

use clap::Args;
use serde_json::Value;

use twokey_reconcile::fixture::{Record, write_log_file};
use twokey_testkit::local::{ACCOUNT, AWS_ACCOUNT_ID, LocalSystem, ReconcileOptions};

use crate::{
    error::CliError,
    output::{self, Output},
};

/// `demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Directory for PKI, keys, configs, data and logs (must be empty or
    /// missing) [default: a new temporary directory].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Leave the three services running and print how to use them.
    #[arg(long)]
    pub keep: bool,
}

/// What the demo did, for `--json`.
#[derive(Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DemoReport {
    /// The directory used.
    pub dir: PathBuf,
    /// The CLI profile file.
    pub config: PathBuf,
    /// The request that was filed and released.
    pub request_id: String,
    /// The signed consent policy version in force.
    pub policy_version: u64,
    /// The admins whose signatures put it in force.
    pub policy_signed_by: Vec<String>,
    /// Whether the released code matched an independent TOTP computation.
    pub code_matches: bool,
    /// Entries in the verified audit log.
    pub audit_entries: u64,
    /// Root sign-ins reconciled as matched by a released code (issue 20).
    pub reconcile_matched: u64,
    /// Root sign-ins no released code explains (issue 20).
    pub reconcile_unexplained: u64,
    /// Service process ids, when `--keep` left them running.
    pub services: Vec<(String, u32)>,
}

struct Steps<'a> {
    exe: PathBuf,
    config: &'a Path,
    out: Output,
}

impl Steps<'_> {
    fn say(&self, text: &str) {
        if !self.out.json {
            eprintln!("{text}");
        }
    }

    /// Runs `twokey --profile USER ARGS --json`, feeding `stdin`; returns its JSON.
    fn run(&self, user: &str, args: &[&str], stdin: Option<&str>) -> Result<Value, CliError> {
        self.run_shown(user, args, stdin, true)
    }

    /// [`Steps::run`], printing the command line only when `show`.
    fn run_shown(
        &self,
        user: &str,
        args: &[&str],
        stdin: Option<&str>,
        show: bool,
    ) -> Result<Value, CliError> {
        let shown: Vec<String> = args
            .iter()
            .map(|a| {
                if a.contains(char::is_whitespace) {
                    format!("{a:?}")
                } else {
                    (*a).to_owned()
                }
            })
            .collect();
        if show {
            self.say(&format!(
                "    $ twokey --profile {user} {}",
                shown.join(" ")
            ));
        }
        let mut cmd = Command::new(&self.exe);
        // The people sign with the key files made for them, never with
        // whatever agent the caller's shell has.
        cmd.env("TWOKEY_CONFIG", self.config)
            .env("TWOKEY_PROFILE", user)
            .env_remove("SSH_AUTH_SOCK")
            .args(args)
            .arg("--json")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| CliError::Input(format!("cannot run {}: {e}", self.exe.display())))?;
        if let Some(mut pipe) = child.stdin.take() {
            use std::io::Write;
            let _ = pipe.write_all(stdin.unwrap_or_default().as_bytes());
        }
        let result = child
            .wait_with_output()
            .map_err(|e| CliError::Input(format!("cannot run {}: {e}", self.exe.display())))?;
        if !result.status.success() {
            let err = String::from_utf8_lossy(&result.stderr);
            return Err(CliError::Input(format!(
                "demo step `twokey {}` failed: {}",
                args.join(" "),
                crate::error::one_line(err.trim_start_matches("twokey: "))
            )));
        }
        let text = String::from_utf8_lossy(&result.stdout);
        serde_json::from_str(text.lines().next().unwrap_or("{}"))
            .map_err(|e| CliError::Input(format!("demo step printed no JSON: {e}")))
    }
}

/// A fresh random Base32 secret (160 bits, as AWS issues).
fn random_secret() -> String {
    let key = twokey_runtime::keys::SecretKey::generate();
    base32(&key.expose()[..20])
}

fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buf, mut bits) = (0u32, 0);
    for b in bytes {
        buf = (buf << 8) | u32::from(*b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buf >> bits) & 31) as usize] as char);
        }
        buf &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(ALPHABET[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// The RFC 6238 code (SHA-1, 6 digits, 30 s) of `secret` at Unix time `t`,
/// computed here, independently of the vault.
fn independent_totp(secret: &[u8], t: u64) -> String {
    totp_rs::Builder::new()
        .with_algorithm(totp_rs::Algorithm::SHA1)
        .with_digits(6)
        .with_step_duration(30)
        .with_secret(secret.to_vec())
        .build_noncompliant()
        .generate(t)
        .to_string()
}

fn seconds(v: &Value) -> u64 {
    v.as_str()
        .and_then(|s| output::parse_time(s).ok())
        .and_then(|ts| u64::try_from(ts.seconds).ok())
        .unwrap_or(0)
}

/// Runs the demo.
pub fn run(args: DemoArgs, out: Output) -> Result<(), CliError> {
    let exe = std::env::current_exe()
        .map_err(|e| CliError::Input(format!("cannot find the twokey executable: {e}")))?;
    let bin_dir = exe.parent().unwrap_or(Path::new(".")).to_owned();
    let (dir, temporary) = match args.dir {
        Some(d) => (d, false),
        None => {
            let stamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis();
            (
                std::env::temp_dir().join(format!("twokey-demo-{}-{stamp}", std::process::id())),
                true,
            )
        }
    };
    if dir.exists()
        && std::fs::read_dir(&dir)
            .map_err(CliError::io("read", &dir))?
            .next()
            .is_some()
    {
        return Err(CliError::Input(format!(
            "{} is not empty; give --dir a new or empty directory",
            dir.display()
        )));
    }
    let say = |text: &str| {
        if !out.json {
            eprintln!("{text}");
        }
    };
    say(&format!(
        "==> making a development CA, certificates, keys, configs and a policy in {}",
        dir.display()
    ));
    say(
        "    each person gets an OpenSSH key of their own (pki/NAME.ssh), named as ssh_key in their profile: \
         alice requests, bob approves, olivia operates, adam and anna are the admins (2 of 2 sign), carol audits",
    );
    say(
        "==> starting twokey-audit and twokey-vault; adam and anna sign consent policy version 1 with their SSH keys \
         and it is applied to the vault (admins.allowed_signers pins them); then twokey-broker",
    );
    say(&format!(
        "    audit's reconciler is on: {ACCOUNT} is AWS account {AWS_ACCOUNT_ID} in the signed policy, \
         and audit reads CloudTrail log files from cloudtrail/ (docs/RECONCILE.md)"
    ));
    let system = LocalSystem::start_reconciling(&dir, &bin_dir, ReconcileOptions::default())?;
    say(&format!(
        "    audit {}  vault {}  broker {}",
        system.audit, system.vault, system.broker
    ));
    let steps = Steps {
        exe: exe.clone(),
        config: &system.config,
        out,
    };
    let result = story(&steps, &system);
    let mut report = match result {
        Ok(r) => r,
        Err(e) => {
            say(&format!("    logs: {}", system.dir.join("logs").display()));
            return Err(e);
        }
    };
    report.dir = dir.clone();
    report.config = system.config.clone();
    if args.keep {
        report.services = system.detach();
        if !out.json {
            let pids: Vec<String> = report
                .services
                .iter()
                .map(|(n, p)| format!("{n} {p}"))
                .collect();
            eprintln!(
                "==> the services keep running ({}); try\n    TWOKEY_CONFIG={} twokey --profile bob request list\n    stop them with: kill {}",
                pids.join(", "),
                report.config.display(),
                report
                    .services
                    .iter()
                    .map(|(_, p)| p.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
    } else {
        drop(system);
        if temporary {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    out.answer(&report, || {
        format!(
            "demo passed: request {} — signed by alice, approved by bob, released by olivia under policy version {} signed by {} — released a code that matched the independent TOTP computation; CloudTrail's root sign-ins reconciled: {} matched, {} unexplained (sent to the admins); the audit log of {} entries verified",
            report.request_id,
            report.policy_version,
            report.policy_signed_by.join(" and "),
            report.reconcile_matched,
            report.reconcile_unexplained,
            report.audit_entries
        )
    })
}

fn story(s: &Steps<'_>, system: &LocalSystem) -> Result<DemoReport, CliError> {
    let secret = random_secret();
    let secret_bytes = decode_base32(&secret);

    s.say("==> the signed policy in force, as anna sees it");
    let policy = s.run("anna", &["policy", "show"], None)?;
    let active = &policy["applied"][0];
    let policy_version = active["version"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .or_else(|| active["version"].as_u64())
        .unwrap_or(0);
    let policy_signed_by: Vec<String> = active["signedBy"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                // The pinned admins are named by their SPIFFE ID: its last
                // segment is the person.
                .map(|id| id.rsplit('/').next().unwrap_or(id).to_owned())
                .collect()
        })
        .unwrap_or_default();
    s.say(&format!(
        "    version {policy_version}, signed by {} — the vault checks every release against it",
        policy_signed_by.join(" and ")
    ));

    s.say(&format!(
        "==> adam (admin) enrolls {ACCOUNT}: the Base32 secret goes in on stdin, never argv"
    ));
    let enrolled = s.run(
        "adam",
        &[
            "account",
            "enroll",
            ACCOUNT,
            "--issuer",
            "Amazon Web Services",
            "--label",
            "root",
        ],
        Some(&format!("{secret}\n")),
    )?;
    s.say(&format!(
        "    registration codes {} and {}",
        enrolled["current"]["code"].as_str().unwrap_or("?"),
        enrolled["next"]["code"].as_str().unwrap_or("?")
    ));

    s.say("==> alice (requester) files a request, signed with her own key (pki/alice.ssh)");
    let created = s.run(
        "alice",
        &[
            "request",
            "create",
            "--account",
            ACCOUNT,
            "--reason",
            "rotate the root access keys",
            "--ticket",
            "DEMO-1",
        ],
        None,
    )?;
    let id = created["request"]["requestId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    s.say(&format!(
        "    request {id} is pending; its id and time are alice's, in the statement she signed"
    ));

    s.say("==> bob (approver) approves it, signing an approval of exactly alice's statement (pki/bob.ssh)");
    let approved = s.run(
        "bob",
        &["request", "approve", &id, "--comment", "go ahead"],
        None,
    )?;
    s.say(&format!(
        "    state: {}",
        approved["request"]["state"].as_str().unwrap_or("?")
    ));

    s.say("==> the PIN arrives in alice's mailbox only");
    let pin = system.wait_for_pin("alice", &id, 0).ok_or_else(|| {
        CliError::Input(format!(
            "no PIN for request {id} in {}",
            system.mailbox.join("alice.jsonl").display()
        ))
    })?;
    s.say(&format!(
        "    {} (alice reads it out to the operator on the call)",
        system.mailbox.join("alice.jsonl").display()
    ));

    s.say("==> olivia (operator) verifies the PIN");
    let verified = s.run(
        "olivia",
        &["pin", "verify", &id, "--pin-stdin"],
        Some(&format!("{pin}\n")),
    )?;
    s.say(&format!(
        "    state: {}",
        verified["request"]["state"].as_str().unwrap_or("?")
    ));

    s.say("==> olivia releases the code, signing a release that binds alice's request and bob's approval (pki/olivia.ssh)");
    s.say("    the vault verifies all three signatures against the signed policy before it computes a code");
    let released = s.run("olivia", &["code", "release", &id], None)?;
    let code = released["code"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let from = seconds(&released["code"]["validFrom"]);
    let expected = independent_totp(&secret_bytes, from);
    let code_matches = !code.is_empty() && code == expected;
    s.say(&format!(
        "    code {code}, valid until {}; independent TOTP computation: {expected} ({})",
        released["code"]["validUntil"].as_str().unwrap_or("?"),
        if code_matches { "match" } else { "MISMATCH" }
    ));
    if !code_matches {
        return Err(CliError::Verify(format!(
            "the released code {code} does not match the independent TOTP computation {expected}"
        )));
    }

    let (reconcile_matched, reconcile_unexplained) = reconcile_story(s, system, &id)?;

    s.say("==> carol (auditor) exports the log and verifies it offline");
    let export = system.dir.join("audit-export.jsonl");
    let checkpoint = system.dir.join("audit-checkpoint.txt");
    let export_s = export.display().to_string();
    let checkpoint_s = checkpoint.display().to_string();
    let sources_s = system.audit_config.display().to_string();
    // Checkpoint first: events still being shipped (the broker's outbox)
    // may land in between, and an export may cover more than its checkpoint
    // (verified as a prefix) but never less.
    s.run(
        "carol",
        &["audit", "checkpoint", "--out", &checkpoint_s],
        None,
    )?;
    s.run("carol", &["audit", "export", "--out", &export_s], None)?;
    let report = s.run(
        "carol",
        &[
            "audit",
            "verify",
            "--export",
            &export_s,
            "--checkpoint",
            &checkpoint_s,
            "--sources",
            &sources_s,
            "--checkpoint-key",
            &system.verifier_key,
        ],
        None,
    )?;
    let entries = report["entries"].as_u64().unwrap_or(0);
    s.say(&format!(
        "    {entries} entries: signatures, per-source sequences and the signed root all check out"
    ));
    Ok(DemoReport {
        request_id: id,
        policy_version,
        policy_signed_by,
        code_matches,
        audit_entries: entries,
        reconcile_matched,
        reconcile_unexplained,
        ..Default::default()
    })
}

/// The findings of `action` in the log, as carol reads them (`show`: print
/// the command line).
fn findings(s: &Steps<'_>, action: &str, show: bool) -> Result<Vec<Value>, CliError> {
    let answer = s.run_shown("carol", &["audit", "query", "--action", action], None, show)?;
    Ok(answer["entries"].as_array().cloned().unwrap_or_default())
}

/// Issue 20: AWS's records of two root sign-ins, generated in CloudTrail's
/// format, are dropped into the trail directory; audit's reconciler matches
/// the first with olivia's release and finds no release for the second,
/// which reaches the account's admins. Returns the two counts.
fn reconcile_story(
    s: &Steps<'_>,
    system: &LocalSystem,
    request_id: &str,
) -> Result<(u64, u64), CliError> {
    s.say(
        "==> AWS CloudTrail records two root sign-ins to the account (generated in AWS's format): \
         one just now, with the code olivia released, and one an hour ago, with a code from somewhere else",
    );
    // CloudTrail records whole seconds.
    let now = time::OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    let earlier = now - std::time::Duration::from_secs(3600);
    let file = write_log_file(
        &system.cloudtrail_dir,
        AWS_ACCOUNT_ID,
        "us-east-1",
        now,
        "demo",
        [
            Record::console_login(AWS_ACCOUNT_ID, now).event_id("demo-sign-in-matched"),
            Record::console_login(AWS_ACCOUNT_ID, earlier).event_id("demo-sign-in-unexplained"),
        ],
    )
    .map_err(|e| CliError::Input(format!("cannot write the demo's CloudTrail file: {e}")))?;
    s.say(&format!("    {}", file.display()));
    s.say("==> audit's reconciler reads it and writes each finding to the log as a signed event");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (matched, unexplained) = loop {
        let matched = findings(s, "reconcile.matched", false)?;
        let unexplained = findings(s, "reconcile.unexplained", false)?;
        if (!matched.is_empty() && !unexplained.is_empty()) || std::time::Instant::now() > deadline
        {
            break (matched, unexplained);
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    findings(s, "reconcile.matched", true)?;
    for m in &matched {
        let attrs = &m["event"]["attributes"];
        s.say(&format!(
            "    matched: root sign-in at {} — code released for request {} at {}",
            attrs["event_time"].as_str().unwrap_or("?"),
            m["event"]["requestId"].as_str().unwrap_or(request_id),
            attrs["released_at"].as_str().unwrap_or("?"),
        ));
    }
    findings(s, "reconcile.unexplained", true)?;
    for u in &unexplained {
        let attrs = &u["event"]["attributes"];
        s.say(&format!(
            "    UNEXPLAINED: root sign-in at {} from {} with MFA, and no code released in the 10 minutes before it",
            attrs["event_time"].as_str().unwrap_or("?"),
            attrs["source_ip"].as_str().unwrap_or("?"),
        ));
    }
    if matched.len() != 1 || unexplained.len() != 1 {
        return Err(CliError::Verify(format!(
            "reconciliation found {} matched and {} unexplained sign-ins, expected one of each (audit log: {})",
            matched.len(),
            unexplained.len(),
            system.dir.join("logs/audit.log").display()
        )));
    }
    s.say("==> the broker sends the unexplained sign-in to the account's admins (adam's mailbox)");
    let mailbox = system.mailbox.join("adam.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let alert = loop {
        let text = std::fs::read_to_string(&mailbox).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("reconcile.unexplained")) {
            break Some(line.to_owned());
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    match alert.and_then(|l| serde_json::from_str::<Value>(&l).ok()) {
        Some(a) => s.say(&format!("    {}", a["text"].as_str().unwrap_or("?"))),
        None => {
            return Err(CliError::Verify(format!(
                "the unexplained sign-in did not reach adam's mailbox {} within 30 s (broker log: {})",
                mailbox.display(),
                system.dir.join("logs/broker.log").display()
            )));
        }
    }
    Ok((1, 1))
}

fn decode_base32(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut buf, mut bits) = (0u32, 0);
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'2'..=b'7' => c - b'2' + 26,
            _ => continue,
        };
        buf = (buf << 5) | u32::from(v);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
            buf &= (1 << bits) - 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_round_trips() {
        let bytes: Vec<u8> = (0u8..20).collect();
        assert_eq!(decode_base32(&base32(&bytes)), bytes);
        assert_eq!(base32(b"Hello!\xde\xad\xbe\xef"), "JBSWY3DPEHPK3PXP");
    }

    #[test]
    fn the_independent_totp_matches_rfc_6238() {
        // RFC 6238 Appendix B, SHA-1, T = 59 s: 94287082 (8 digits) → 287082.
        assert_eq!(independent_totp(b"12345678901234567890", 59), "287082");
    }
}

//! `twokey audit reconcile` (auditors): the root sign-ins AWS recorded in
//! CloudTrail (a directory kept in sync from the trail's bucket) against
//! the codes twokey released, read from the audit log: matched,
//! unexplained, unprotected, failed, out-of-band and unused, as a table or
//! `--json`. The accounts are those the signed policy maps (the
//! `aws_accounts` of the vault's latest `policy.applied`), unless
//! `--account` names them. Offline and read-only: audit's own reconciler
//! writes its findings to the log (docs/RECONCILE.md); this command
//! recomputes them from a directory, e.g. to check them.

use std::{path::PathBuf, time::Duration};

use clap::Args;
use serde_json::{Value, json};
use time::OffsetDateTime;
use twokey_proto::{
    Timestamp,
    audit::v1::{LogEntry, QueryRequest},
};
use twokey_reconcile::{
    cloudtrail::{self, ReadOptions, Seen},
    matching::{self, Accounts, Finding, Release},
};

use crate::{
    error::{CliError, Target},
    output::{self, Output, parse_time, table},
    profile::{AuditClient, Settings},
};

/// `audit reconcile`.
#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// The directory synced from the trail's S3 bucket (holding `AWSLogs/`).
    #[arg(long, value_name = "DIR")]
    pub cloudtrail: PathBuf,
    /// A twokey account and its AWS account id: `aws-prod-root=123456789012`.
    /// Repeat for each account. Default: the accounts the signed policy maps
    /// (`aws_account_id`), with their `signin_window`.
    #[arg(long = "account", value_name = "NAME=AWS_ID")]
    pub accounts: Vec<String>,
    /// Sign-ins and releases from this time: RFC 3339, or an age such as 7d.
    #[arg(long, value_name = "TIME", value_parser = parse_time, default_value = "7d")]
    pub since: Timestamp,
    /// How long before a sign-in a release explains it (with --account).
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub window_secs: u64,
}

fn datetime(t: &Timestamp) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(t.seconds)
        .map(|d| d + time::Duration::nanoseconds(i64::from(t.nanos)))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The mapping from `NAME=AWS_ID` arguments.
fn accounts(args: &[String], window: Duration) -> Result<Accounts, CliError> {
    let mut accounts = Accounts::new();
    for arg in args {
        let (name, aws) = arg.split_once('=').ok_or_else(|| {
            CliError::Usage(format!(
                "--account {arg:?}: write NAME=AWS_ID, e.g. aws-prod-root=123456789012"
            ))
        })?;
        accounts
            .map(aws.trim(), name.trim(), Some(window))
            .map_err(|e| CliError::Usage(format!("--account {arg:?}: {e}")))?;
    }
    Ok(accounts)
}

/// The mapping the signed policy names: the `aws_accounts` attribute of the
/// vault's latest `policy.applied` event.
async fn policy_accounts(client: &mut AuditClient, target: &Target) -> Result<Accounts, CliError> {
    let request = QueryRequest {
        action: "policy.applied".into(),
        newest_first: true,
        ..Default::default()
    };
    let mut stream = target.answer(client.query(request).await)?;
    while let Some(batch) = crate::audit::next_message(&mut stream, target).await? {
        let latest = batch
            .entries
            .iter()
            .filter_map(|e| e.event.as_ref())
            .find(|e| e.source.ends_with("/svc/vault"));
        if let Some(event) = latest {
            let attr = event
                .attributes
                .get("aws_accounts")
                .map_or("", String::as_str);
            let accounts = Accounts::from_policy_attr(attr)
                .map_err(|e| CliError::Input(format!("the signed policy's mapping: {e}")))?;
            if accounts.is_empty() {
                break;
            }
            return Ok(accounts);
        }
    }
    Err(CliError::Usage(
        "the signed policy in force maps no account to an AWS account: add aws_account_id to \
         the account in the policy, or give --account NAME=AWS_ID"
            .into(),
    ))
}

/// Every `code.released` of the vault since `since`, as releases.
async fn releases(
    client: &mut AuditClient,
    target: &Target,
    since: Timestamp,
) -> Result<Vec<Release>, CliError> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let request = QueryRequest {
            since: Some(since),
            action: "code.released".into(),
            page_size: 1000,
            page_token: token.clone(),
            ..Default::default()
        };
        let mut stream = target.answer(client.query(request).await)?;
        let mut next = String::new();
        while let Some(batch) = crate::audit::next_message(&mut stream, target).await? {
            out.extend(batch.entries.iter().filter_map(release));
            next = batch.next_page_token;
        }
        if next.is_empty() || next == token {
            return Ok(out);
        }
        token = next;
    }
}

fn release(entry: &LogEntry) -> Option<Release> {
    let event = entry.event.as_ref()?;
    if !event.source.ends_with("/svc/vault") {
        return None;
    }
    Some(Release {
        account: event.account_id.clone(),
        at: datetime(event.time.as_ref()?),
        id: event.request_id.clone(),
    })
}

fn finding_json(f: &Finding) -> Value {
    let mut v = json!({
        "kind": f.kind().as_str(),
        "account": f.account(),
        "time": rfc3339(f.time()),
    });
    match f {
        Finding::Matched {
            sign_in, release, ..
        } => {
            v["signInEventId"] = json!(sign_in.event_id);
            v["requestId"] = json!(release.id);
            v["releasedAt"] = json!(rfc3339(release.at));
        }
        Finding::Unexplained { sign_in, .. }
        | Finding::Unprotected { sign_in, .. }
        | Finding::Failed { sign_in, .. } => v["signInEventId"] = json!(sign_in.event_id),
        Finding::OutOfBand { change, .. } => {
            v["eventId"] = json!(change.event_id);
            v["eventName"] = json!(change.action.event_name());
        }
        Finding::Unused { release } => v["requestId"] = json!(release.id),
    }
    v
}

/// Runs `audit reconcile`.
pub async fn run(a: ReconcileArgs, settings: Settings, out: Output) -> Result<(), CliError> {
    let (mut client, target) = settings.audit()?;
    let accounts = if a.accounts.is_empty() {
        policy_accounts(&mut client, &target).await?
    } else {
        accounts(&a.accounts, Duration::from_secs(a.window_secs))?
    };
    let window = accounts
        .iter()
        .map(|(_, m)| m.window)
        .max()
        .unwrap_or(matching::DEFAULT_WINDOW);
    let now = OffsetDateTime::now_utc();
    let scan = cloudtrail::scan(&a.cloudtrail, &mut Seen::new(), &ReadOptions::at(now))
        .map_err(|e| CliError::Input(format!("--cloudtrail: {e}")))?;
    let since = datetime(&a.since);
    let events: Vec<_> = scan
        .events
        .into_iter()
        .filter(|e| e.time() >= since)
        .collect();
    // Releases from one window earlier, so the first sign-ins can match.
    let from = Timestamp {
        seconds: a.since.seconds - i64::try_from(window.as_secs()).unwrap_or(0),
        nanos: 0,
    };
    let releases = releases(&mut client, &target, from).await?;
    let result = matching::reconcile(&accounts, &events, &releases, now);
    let problems: Vec<Value> = scan
        .problems
        .iter()
        .map(|p| json!({"path": p.path.display().to_string(), "record": p.record, "reason": p.reason.to_string()}))
        .collect();
    if out.json {
        return output::json_line(&json!({
            "findings": result.findings.iter().map(finding_json).collect::<Vec<_>>(),
            "pending": result.pending.len(),
            "filesRead": scan.files_read,
            "problems": problems,
        }));
    }
    let rows: Vec<Vec<String>> = result
        .findings
        .iter()
        .map(|f| {
            let v = finding_json(f);
            let detail = ["signInEventId", "eventName", "requestId"]
                .iter()
                .filter_map(|k| v[*k].as_str().map(|s| format!("{k}={s}")))
                .collect::<Vec<_>>()
                .join(" ");
            vec![
                f.kind().as_str().to_owned(),
                f.account().to_owned(),
                rfc3339(f.time()),
                detail,
            ]
        })
        .collect();
    if rows.is_empty() {
        output::print("no sign-ins, device changes or releases in the period")?;
    } else {
        output::print(&table(&["FINDING", "ACCOUNT", "TIME", "DETAIL"], &rows))?;
    }
    for p in &scan.problems {
        eprintln!("skipped {}: {}", p.path.display(), p.reason);
    }
    if result.findings.iter().any(|f| f.kind().alerts()) {
        eprintln!(
            "unexplained, unprotected or out-of-band findings: a root sign-in or MFA change \
             that no released code explains; docs/RECONCILE.md says what each means and what to do"
        );
    }
    Ok(())
}

//! `twokey audit reconcile` (auditors): the root sign-ins AWS recorded in
//! CloudTrail (a directory kept in sync from the trail's bucket) against
//! the codes twokey released, read from the audit log: matched,
//! unexplained, unprotected, failed, out-of-band and unused, as a table or
//! `--json`. Offline and read-only: the findings are not written to the log
//! yet (issue 20 wires that in audit).

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
    /// Repeat for each account.
    #[arg(long = "account", value_name = "NAME=AWS_ID", required = true)]
    pub accounts: Vec<String>,
    /// Sign-ins and releases from this time: RFC 3339, or an age such as 7d.
    #[arg(long, value_name = "TIME", value_parser = parse_time, default_value = "7d")]
    pub since: Timestamp,
    /// How long before a sign-in a release explains it.
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
    let window = Duration::from_secs(a.window_secs);
    let accounts = accounts(&a.accounts, window)?;
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
    let (mut client, target) = settings.audit()?;
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
             that no released code explains; investigate (docs/RELIABILITY.md has no runbook \
             for this yet: see issue 20)"
        );
    }
    Ok(())
}

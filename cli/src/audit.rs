//! `twokey audit …` (auditors): query the log as a table, export it as JSON
//! lines, save the signed checkpoint, and verify an export against a
//! checkpoint offline.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufWriter, Write},
    path::{Path, PathBuf},
};

use clap::{Args, Subcommand, ValueEnum};
use futures::StreamExt;
use twokey_proto::audit::v1::{
    GetCheckpointRequest, LogEntry, Outcome, QueryRequest, QueryResponse,
};

use crate::{
    error::{CliError, Target},
    output::{self, Output, enum_name, parse_time, short_id, table, time},
    profile::{ConnectionArgs, Settings},
    with_runtime,
};

/// Audit commands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Show log entries matching a filter, as a table.
    Query(QueryArgs),
    /// Write the whole log to FILE, one proto3-JSON LogEntry per line.
    Export(ExportArgs),
    /// Write the latest signed checkpoint (a C2SP signed note) to FILE.
    Checkpoint(CheckpointArgs),
    /// Check an export offline: every signature, each source's sequence
    /// numbers, and the Merkle root against a signed checkpoint. Names the
    /// first bad entry. Without --export, fetches the log (and the
    /// checkpoint, unless --checkpoint is given) from the audit service first.
    Verify(VerifyArgs),
}

/// An event outcome, for filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutcomeArg {
    /// It happened.
    Success,
    /// A rule refused it.
    Denied,
    /// It failed for another reason.
    Failure,
}

impl From<OutcomeArg> for Outcome {
    fn from(o: OutcomeArg) -> Self {
        match o {
            OutcomeArg::Success => Outcome::Success,
            OutcomeArg::Denied => Outcome::Denied,
            OutcomeArg::Failure => Outcome::Failure,
        }
    }
}

/// `audit query`.
#[derive(Debug, Args)]
pub struct QueryArgs {
    /// Only events at or after this time: RFC 3339, or an age such as 2h, 7d.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<twokey_proto::Timestamp>,
    /// Only events before this time: RFC 3339, or an age such as 30m.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub until: Option<twokey_proto::Timestamp>,
    /// Only events by this actor (SPIFFE ID).
    #[arg(long, value_name = "ID")]
    pub actor: Option<String>,
    /// Only events with this action, e.g. code.released.
    #[arg(long)]
    pub action: Option<String>,
    /// Only events about this account.
    #[arg(long, value_name = "ACCOUNT")]
    pub account: Option<String>,
    /// Only events about this request.
    #[arg(long, value_name = "ID")]
    pub request: Option<String>,
    /// Only events from this source (SPIFFE ID of the vault or broker).
    #[arg(long, value_name = "ID")]
    pub source: Option<String>,
    /// Only events with this outcome.
    #[arg(long, value_enum)]
    pub outcome: Option<OutcomeArg>,
    /// Newest first instead of oldest first.
    #[arg(long)]
    pub newest_first: bool,
    /// At most this many entries.
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
}

/// `audit export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// File to write (replaced if it exists).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// `audit checkpoint`.
#[derive(Debug, Args)]
pub struct CheckpointArgs {
    /// File to write (replaced if it exists).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// `audit verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// An export made by `twokey audit export` [default: fetch the log now].
    #[arg(long, value_name = "FILE")]
    pub export: Option<PathBuf>,
    /// A checkpoint saved by `twokey audit checkpoint` [default: fetch it now].
    #[arg(long, value_name = "FILE")]
    pub checkpoint: Option<PathBuf>,
    /// TOML file with the sources' event keys as `[[sources]] id, public_key`
    /// (the audit service's config works) and the checkpoint verifier key as
    /// `checkpoint_key`.
    #[arg(long, value_name = "FILE")]
    pub sources: PathBuf,
    /// The checkpoint verifier key (`NAME+ID+KEY`, printed by
    /// `twokey-audit init-key`); overrides the sources file's checkpoint_key.
    #[arg(long, value_name = "KEY", env = "TWOKEY_CHECKPOINT_KEY")]
    pub checkpoint_key: Option<String>,
}

/// Runs an audit command.
pub fn run(cmd: AuditCommand, conn: &ConnectionArgs, out: Output) -> Result<(), CliError> {
    match cmd {
        AuditCommand::Query(a) => {
            let settings = Settings::resolve(conn)?;
            with_runtime(query(a, settings, out))
        }
        AuditCommand::Export(a) => {
            let settings = Settings::resolve(conn)?;
            let count = with_runtime(async {
                let (mut client, target) = settings.audit()?;
                export(&mut client, &target, &a.out).await
            })?;
            let summary = serde_json::json!({
                "out": a.out.display().to_string(),
                "entries": count,
            });
            out.answer(&summary, || {
                format!("wrote {count} entries to {}", a.out.display())
            })
        }
        AuditCommand::Checkpoint(a) => {
            let settings = Settings::resolve(conn)?;
            let answer = with_runtime(async {
                let (mut client, target) = settings.audit()?;
                client
                    .get_checkpoint(GetCheckpointRequest {})
                    .await
                    .map_err(|s| target.error(s))
                    .map(tonic::Response::into_inner)
            })?;
            write_file(&a.out, answer.checkpoint.as_bytes())?;
            out.answer(&answer, || {
                format!(
                    "wrote the checkpoint for {} entries to {}",
                    answer.tree_size,
                    a.out.display()
                )
            })
        }
        AuditCommand::Verify(a) => verify(a, conn, out),
    }
}

fn query_request(a: &QueryArgs) -> QueryRequest {
    QueryRequest {
        since: a.since,
        until: a.until,
        source: a.source.clone().unwrap_or_default(),
        actor: a.actor.clone().unwrap_or_default(),
        action: a.action.clone().unwrap_or_default(),
        account_id: a.account.clone().unwrap_or_default(),
        request_id: a.request.clone().unwrap_or_default(),
        outcome: a.outcome.map_or(0, |o| Outcome::from(o) as i32),
        newest_first: a.newest_first,
        page_size: a.limit.unwrap_or(0),
        page_token: String::new(),
    }
}

async fn query(a: QueryArgs, settings: Settings, out: Output) -> Result<(), CliError> {
    let (mut client, target) = settings.audit()?;
    let mut stream = client
        .query(query_request(&a))
        .await
        .map_err(|s| target.error(s))?
        .into_inner();
    let mut rows = Vec::new();
    let mut more = false;
    while let Some(batch) = stream.next().await {
        let batch: QueryResponse = batch.map_err(|s| target.error(s))?;
        if out.json {
            output::json_line(&batch)?;
        } else {
            rows.extend(batch.entries.iter().map(entry_row));
        }
        more |= !batch.next_page_token.is_empty();
    }
    if !out.json {
        if rows.is_empty() {
            output::print("no matching entries")?;
        } else {
            output::print(&table(
                &[
                    "INDEX", "TIME", "SOURCE", "SEQ", "ACTOR", "ACTION", "ACCOUNT", "REQUEST",
                    "OUTCOME",
                ],
                &rows,
            ))?;
        }
        if more {
            eprintln!("more entries match: raise --limit, or use `twokey audit export`");
        }
    }
    Ok(())
}

fn outcome_name(o: i32) -> String {
    Outcome::try_from(o).map_or_else(
        |_| format!("outcome {o}"),
        |o| enum_name(o.as_str_name(), "OUTCOME_"),
    )
}

fn entry_row(e: &LogEntry) -> Vec<String> {
    let ev = e.event.clone().unwrap_or_default();
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    vec![
        e.index.to_string(),
        time(ev.time.as_ref()),
        short_id(&ev.source).to_owned(),
        ev.seq.to_string(),
        dash(short_id(&ev.actor)),
        ev.action,
        dash(&ev.account_id),
        dash(&ev.request_id),
        outcome_name(ev.outcome),
    ]
}

/// Pages through the whole log, oldest first, and writes one proto3-JSON
/// `LogEntry` per line to `out`. Returns the number of entries.
pub async fn export(
    client: &mut crate::profile::AuditClient,
    target: &Target,
    out: &Path,
) -> Result<u64, CliError> {
    let tmp = out.with_extension("partial");
    let file = std::fs::File::create(&tmp).map_err(CliError::io("create", &tmp))?;
    let mut w = BufWriter::new(file);
    let mut count = 0u64;
    let mut token = String::new();
    loop {
        let mut stream = client
            .query(QueryRequest {
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .map_err(|s| target.error(s))?
            .into_inner();
        let mut next = String::new();
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(|s| target.error(s))?;
            for entry in &batch.entries {
                let line = output::to_json(entry)?;
                writeln!(w, "{line}").map_err(CliError::io("write", &tmp))?;
                count += 1;
            }
            if !batch.next_page_token.is_empty() {
                next = batch.next_page_token;
            }
        }
        if next.is_empty() || next == token {
            break;
        }
        token = next;
    }
    let file = w
        .into_inner()
        .map_err(|e| CliError::io("write", &tmp)(e.into_error()))?;
    file.sync_all().map_err(CliError::io("write", &tmp))?;
    std::fs::rename(&tmp, out).map_err(CliError::io("write", out))?;
    Ok(count)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    std::fs::write(path, bytes).map_err(CliError::io("write", path))
}

/// Reads an export: one proto3-JSON `LogEntry` per line (blank lines skipped).
pub fn read_export(path: &Path) -> Result<Vec<LogEntry>, CliError> {
    let file = std::fs::File::open(path).map_err(CliError::io("read", path))?;
    let mut entries = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(CliError::io("read", path))?;
        if line.trim().is_empty() {
            continue;
        }
        let entry: LogEntry = serde_json::from_str(&line).map_err(|e| {
            CliError::Input(format!(
                "{} line {}: not a LogEntry ({e}); give a file written by `twokey audit export`",
                path.display(),
                n + 1
            ))
        })?;
        entries.push(entry);
    }
    Ok(entries)
}

/// One source's event key, as in the audit service's config.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct SourceKey {
    /// SPIFFE ID of the source.
    pub id: String,
    /// Its ed25519 public key, base64.
    pub public_key: String,
}

/// The `--sources` file. Other keys (the rest of an audit config) are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct SourcesFile {
    /// The checkpoint verifier key (signed-note verifier key text).
    #[serde(default)]
    pub checkpoint_key: Option<String>,
    /// Event sources.
    #[serde(default)]
    pub sources: Vec<SourceKey>,
}

impl SourcesFile {
    /// Reads and checks a sources file.
    pub fn load(path: &Path) -> Result<Self, CliError> {
        let text = std::fs::read_to_string(path).map_err(CliError::io("read", path))?;
        let file: SourcesFile = toml::from_str(&text).map_err(|e| {
            CliError::Input(format!(
                "{} is not a sources file: {}",
                path.display(),
                crate::error::one_line(e.message())
            ))
        })?;
        if file.sources.is_empty() {
            return Err(CliError::Input(format!(
                "{} names no sources: add [[sources]] tables with id and public_key",
                path.display()
            )));
        }
        Ok(file)
    }
}

/// What a successful verification found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    /// Entries checked.
    pub entries: u64,
    /// Last sequence number per source.
    pub sources: BTreeMap<String, u64>,
    /// RFC 6962 root hash of all entries, hex.
    pub root_hash: String,
    /// Tree size of the signed checkpoint the root was checked against
    /// (absent when no checkpoint was given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_tree_size: Option<u64>,
}

/// Everything offline verification looks at.
#[derive(Debug, Clone)]
pub struct VerifyInput {
    /// The log, in index order from 0.
    pub entries: Vec<LogEntry>,
    /// The checkpoint note text, if any.
    pub checkpoint: Option<String>,
    /// The sources' keys and the checkpoint verifier key.
    pub keys: SourcesFile,
}

/// The one call into `twokey_audit::verify`: signatures, sequence
/// continuity, Merkle root against the signed checkpoint. Names the first
/// bad entry on failure.
pub fn verify_offline(input: &VerifyInput) -> Result<VerifyReport, CliError> {
    let mut sources = BTreeMap::new();
    for s in &input.keys.sources {
        let key = twokey_runtime::keys::parse_public_key(&s.public_key)
            .map_err(|e| CliError::Input(format!("source {}: {e}", s.id)))?;
        sources.insert(s.id.clone(), key);
    }
    let verifier = match (&input.checkpoint, &input.keys.checkpoint_key) {
        (None, _) => None,
        (Some(_), None) => {
            return Err(CliError::Usage(
                "a checkpoint needs its verifier key: pass --checkpoint-key KEY (printed by `twokey-audit init-key`) or put checkpoint_key in the sources file".into(),
            ));
        }
        (Some(_), Some(text)) => Some(
            twokey_audit::checkpoint::NoteVerifier::parse(text.trim())
                .map_err(|e| CliError::Input(format!("checkpoint key: {e}")))?,
        ),
    };
    let checkpoint = input.checkpoint.as_deref().zip(verifier.as_ref());
    let report = twokey_audit::verify::verify_log(&input.entries, &sources, checkpoint)
        .map_err(|e| CliError::Verify(e.to_string()))?;
    Ok(VerifyReport {
        entries: report.entries,
        sources: report.last_seq,
        root_hash: report.root.iter().map(|b| format!("{b:02x}")).collect(),
        checkpoint_tree_size: report.checkpoint_size,
    })
}

fn verify(a: VerifyArgs, conn: &ConnectionArgs, out: Output) -> Result<(), CliError> {
    let mut keys = SourcesFile::load(&a.sources)?;
    if let Some(k) = &a.checkpoint_key {
        keys.checkpoint_key = Some(k.clone());
    }
    let file_checkpoint = match &a.checkpoint {
        Some(path) => Some(std::fs::read_to_string(path).map_err(CliError::io("read", path))?),
        None => None,
    };
    let (entries, checkpoint) = match &a.export {
        // Files given: offline.
        Some(path) => (read_export(path)?, file_checkpoint),
        // No export: fetch the log (and the checkpoint, unless given) now.
        None => {
            let settings = Settings::resolve(conn)?;
            with_runtime(async move {
                let (mut client, target) = settings.audit()?;
                // The checkpoint first, so that the export covers its tree.
                let checkpoint = match file_checkpoint {
                    Some(text) => text,
                    None => {
                        client
                            .get_checkpoint(GetCheckpointRequest {})
                            .await
                            .map_err(|s| target.error(s))?
                            .into_inner()
                            .checkpoint
                    }
                };
                let dir =
                    std::env::temp_dir().join(format!("twokey-verify-{}", std::process::id()));
                std::fs::create_dir_all(&dir).map_err(CliError::io("create", &dir))?;
                let file = dir.join("export.jsonl");
                let entries = export(&mut client, &target, &file)
                    .await
                    .and_then(|_| read_export(&file));
                let _ = std::fs::remove_dir_all(&dir);
                Ok::<_, CliError>((entries?, Some(checkpoint)))
            })?
        }
    };
    let report = verify_offline(&VerifyInput {
        entries,
        checkpoint,
        keys,
    })?;
    out.answer(&report, || {
        let per_source: Vec<String> = report
            .sources
            .iter()
            .map(|(id, seq)| format!("{} up to seq {seq}", short_id(id)))
            .collect();
        let root = match report.checkpoint_tree_size {
            Some(size) => format!("the root matches the signed checkpoint of size {size}"),
            None => "no checkpoint given, so the root was not checked against a signature".into(),
        };
        format!(
            "ok: {} entries, every signature valid, sequences continuous ({}); {root}",
            report.entries,
            if per_source.is_empty() {
                "no events".to_owned()
            } else {
                per_source.join(", ")
            },
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_round_trips_through_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let entries = vec![
            LogEntry {
                index: 0,
                ..Default::default()
            },
            LogEntry {
                index: 1,
                ..Default::default()
            },
        ];
        let text: String = entries
            .iter()
            .map(|e| format!("{}\n", serde_json::to_string(e).unwrap()))
            .collect();
        std::fs::write(&path, text).unwrap();
        assert_eq!(read_export(&path).unwrap(), entries);
    }

    #[test]
    fn a_bad_export_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        std::fs::write(&path, "{\"index\":\"0\"}\nnot json\n").unwrap();
        let err = read_export(&path).unwrap_err().one_line();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn an_audit_config_serves_as_a_sources_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.toml");
        std::fs::write(
            &path,
            "listen = \"0.0.0.0:7403\"\n[tls]\ncert = \"x\"\n[[sources]]\nid = \"spiffe://t/svc/broker\"\npublic_key = \"AAAA\"\n",
        )
        .unwrap();
        let f = SourcesFile::load(&path).unwrap();
        assert_eq!(f.sources[0].id, "spiffe://t/svc/broker");
    }
}

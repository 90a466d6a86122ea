//! `twokey audit …` (auditors): query the log as a table, export it as JSON
//! lines, save the signed checkpoint, verify an export against a
//! checkpoint offline, and check inclusion and consistency proofs against a
//! freshly signed checkpoint.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufWriter, Write},
    path::{Path, PathBuf},
};

use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use twokey_audit::{
    checkpoint::{Checkpoint, NoteVerifier},
    cosignature::{CosignatureError, CosignatureVerifier},
    merkle::{self, Hash, RootBuilder},
    verify::entry_leaf_hash,
};
use twokey_proto::audit::v1::{
    GetCheckpointRequest, GetConsistencyProofRequest, GetConsistencyProofResponse,
    GetInclusionProofRequest, GetInclusionProofResponse, LogEntry, Outcome, QueryRequest,
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
    /// Fetch an inclusion proof (--inclusion ENTRY) or a consistency proof
    /// (--consistency OLD_SIZE) and a fresh checkpoint, check the
    /// checkpoint's signature with the verifier key and the proof against
    /// it, and print the proof. Exits 1 with one line if anything does not
    /// verify, or if ENTRY or OLD_SIZE is beyond the signed log.
    Prove(ProveArgs),
    /// Root sign-ins and MFA device changes AWS recorded in CloudTrail (a
    /// directory synced from the trail's bucket) against the codes released:
    /// matched, unexplained, unprotected, failed, out-of-band, unused.
    Reconcile(crate::reconcile::ReconcileArgs),
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
    /// Only events by this actor: a SPIFFE ID, or a name as the policy
    /// names people (`bob` matches spiffe://…/user/bob).
    #[arg(long, value_name = "ID_OR_NAME")]
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
    /// At most this many entries (0: all of them).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_LIMIT)]
    pub limit: u32,
    /// Continue after a previous page (the token it printed).
    #[arg(long, value_name = "TOKEN")]
    pub page_token: Option<String>,
}

/// Entries (or requests) one page shows unless `--limit` says otherwise.
pub const DEFAULT_LIMIT: u32 = 100;

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
    /// A witness whose cosignature counts (repeatable): NAME=KEY, KEY a
    /// cosignature verifier key (NAME+ID+base64(0x04 ‖ key)) or a base64
    /// Ed25519 public key. The sources file's sources are witnesses already
    /// (their event key, named by their SPIFFE ID without spiffe://).
    #[arg(long, value_name = "NAME=KEY")]
    pub witness: Vec<String>,
    /// Witness cosignatures a checkpoint fetched from audit needs
    /// [default: every witness]. Not needed with --checkpoint (a
    /// checkpoint pinned earlier).
    #[arg(long, value_name = "N")]
    pub witness_quorum: Option<usize>,
}

/// `audit prove`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("proof").required(true).args(["inclusion", "consistency"])))]
pub struct ProveArgs {
    /// Prove that the entry with this index (from 0) is in the signed log.
    #[arg(long, value_name = "ENTRY")]
    pub inclusion: Option<u64>,
    /// Prove that the log of its first OLD_SIZE entries is a prefix of the
    /// signed log now.
    #[arg(long, value_name = "OLD_SIZE", value_parser = clap::value_parser!(u64).range(1..))]
    pub consistency: Option<u64>,
    /// With --consistency: a checkpoint saved earlier by `twokey audit
    /// checkpoint`, whose signed root the proof must start from [default:
    /// the root of the first OLD_SIZE entries the service holds now,
    /// computed here from the entries].
    #[arg(long, value_name = "FILE", requires = "consistency")]
    pub old_checkpoint: Option<PathBuf>,
    /// The checkpoint verifier key (`NAME+ID+KEY`, printed by
    /// `twokey-audit init-key`).
    #[arg(long, value_name = "KEY", env = "TWOKEY_CHECKPOINT_KEY")]
    pub checkpoint_key: Option<String>,
}

/// A checked proof, as `audit prove` prints it (hashes in hex).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProofReport {
    /// `inclusion` or `consistency`.
    pub proof: &'static str,
    /// The signed checkpoint the proof was checked against.
    pub checkpoint: String,
    /// Entries the checkpoint covers.
    pub tree_size: u64,
    /// Its root hash.
    pub root_hash: String,
    /// Inclusion: the entry's index.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leaf_index: Option<u64>,
    /// Inclusion: the entry's leaf hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leaf_hash: Option<String>,
    /// Consistency: the older size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_size: Option<u64>,
    /// Consistency: the older root.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_root_hash: Option<String>,
    /// Consistency: where the older root came from (`checkpoint file` or
    /// `entries`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_root_from: Option<&'static str>,
    /// The proof's hashes, in order.
    pub hashes: Vec<String>,
}

/// `bytes` in lowercase hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The verified content of a signed checkpoint.
fn open_checkpoint(
    verifier: &NoteVerifier,
    note: &str,
    what: &str,
) -> Result<Checkpoint, CliError> {
    verifier.open_checkpoint(note).map_err(|e| {
        CliError::Verify(format!(
            "{what} does not verify with key {verifier}: {e}; check --checkpoint-key, and if it is right, suspect the audit host"
        ))
    })
}

fn proof_hashes(hashes: &[Vec<u8>]) -> Result<Vec<Hash>, CliError> {
    merkle::hashes_from_bytes(hashes).map_err(|e| {
        CliError::Verify(format!(
            "the audit service sent a malformed proof: {e}; suspect the audit host"
        ))
    })
}

/// Checks an inclusion proof for `entry` against the signed `note`.
pub fn check_inclusion(
    verifier: &NoteVerifier,
    note: &str,
    entry: &LogEntry,
    proof: &GetInclusionProofResponse,
) -> Result<ProofReport, CliError> {
    let signed = open_checkpoint(verifier, note, "the checkpoint the audit service served")?;
    let index = entry.index;
    if proof.leaf_index != index || proof.tree_size != signed.size {
        return Err(CliError::Verify(format!(
            "the audit service sent a proof for entry {} in a tree of {} entries, not entry {index} in the signed tree of {}; suspect the audit host",
            proof.leaf_index, proof.tree_size, signed.size
        )));
    }
    let leaf = entry_leaf_hash(entry).ok_or_else(|| {
        CliError::Verify(format!(
            "entry {index} as served carries no signed event; suspect the audit host"
        ))
    })?;
    let hashes = proof_hashes(&proof.hashes)?;
    merkle::verify_inclusion(index, signed.size, &leaf, &hashes, &signed.root).map_err(|e| {
        CliError::Verify(format!(
            "the inclusion proof of entry {index} does not lead to the signed root of {} entries ({e}): the log as signed does not hold this entry as served; suspect the audit host",
            signed.size
        ))
    })?;
    Ok(ProofReport {
        proof: "inclusion",
        checkpoint: note.to_owned(),
        tree_size: signed.size,
        root_hash: hex(&signed.root),
        leaf_index: Some(index),
        leaf_hash: Some(hex(&leaf)),
        hashes: hashes.iter().map(|h| hex(h)).collect(),
        ..ProofReport::default()
    })
}

/// Where the older root of a consistency proof comes from.
#[derive(Debug, Clone)]
pub enum OldRoot {
    /// A checkpoint saved earlier (its signature is checked here).
    Checkpoint(String),
    /// Computed from the first entries the service holds now.
    Entries(Hash),
}

/// Checks a consistency proof from `old_size` entries to the signed `note`.
pub fn check_consistency(
    verifier: &NoteVerifier,
    note: &str,
    old_size: u64,
    old: &OldRoot,
    proof: &GetConsistencyProofResponse,
) -> Result<ProofReport, CliError> {
    let signed = open_checkpoint(verifier, note, "the checkpoint the audit service served")?;
    let (old_root, from) = match old {
        OldRoot::Entries(root) => (*root, "entries"),
        OldRoot::Checkpoint(text) => {
            let old = open_checkpoint(verifier, text, "the --old-checkpoint")?;
            if old.size != old_size {
                return Err(CliError::Usage(format!(
                    "the --old-checkpoint covers {} entries, not {old_size}: give --consistency {}",
                    old.size, old.size
                )));
            }
            (old.root, "checkpoint file")
        }
    };
    if proof.first_size != old_size || proof.second_size != signed.size {
        return Err(CliError::Verify(format!(
            "the audit service sent a proof from {} to {} entries, not from {old_size} to the signed {}; suspect the audit host",
            proof.first_size, proof.second_size, signed.size
        )));
    }
    let hashes = proof_hashes(&proof.hashes)?;
    merkle::verify_consistency(old_size, signed.size, &hashes, &old_root, &signed.root).map_err(
        |e| {
            CliError::Verify(format!(
                "the log of {old_size} entries with root {} is not a prefix of the signed log of {} entries ({e}): the log was rewritten or forked; keep both checkpoints as evidence",
                hex(&old_root),
                signed.size
            ))
        },
    )?;
    Ok(ProofReport {
        proof: "consistency",
        checkpoint: note.to_owned(),
        tree_size: signed.size,
        root_hash: hex(&signed.root),
        old_size: Some(old_size),
        old_root_hash: Some(hex(&old_root)),
        old_root_from: Some(from),
        hashes: hashes.iter().map(|h| hex(h)).collect(),
        ..ProofReport::default()
    })
}

impl ProofReport {
    /// The human answer: what was proved, then every hash.
    pub fn human(&self) -> String {
        let mut text = match (self.leaf_index, self.old_size) {
            (Some(index), _) => format!(
                "ok: entry {index} is in the signed log of {} entries\nleaf hash: {}\n",
                self.tree_size,
                self.leaf_hash.as_deref().unwrap_or_default()
            ),
            (None, Some(old)) => format!(
                "ok: the log of {old} entries is a prefix of the signed log of {} entries\nold root:  {} (from the {})\n",
                self.tree_size,
                self.old_root_hash.as_deref().unwrap_or_default(),
                self.old_root_from.unwrap_or_default()
            ),
            (None, None) => String::new(),
        };
        text.push_str(&format!(
            "root hash: {} (checkpoint signature valid, tree size {})\n{} proof, {} hashes:\n",
            self.root_hash,
            self.tree_size,
            self.proof,
            self.hashes.len()
        ));
        for (i, h) in self.hashes.iter().enumerate() {
            text.push_str(&format!("  {i:>2} {h}\n"));
        }
        text
    }
}

fn prove(a: ProveArgs, conn: &ConnectionArgs, out: Output) -> Result<(), CliError> {
    let key = a.checkpoint_key.as_deref().ok_or_else(|| {
        CliError::Usage(
            "a proof is checked against a signed checkpoint: pass --checkpoint-key KEY (printed by `twokey-audit init-key`) or set TWOKEY_CHECKPOINT_KEY".into(),
        )
    })?;
    let verifier = NoteVerifier::parse(key.trim())
        .map_err(|e| CliError::Usage(format!("--checkpoint-key: {e}")))?;
    let old_checkpoint = match &a.old_checkpoint {
        Some(path) => Some(std::fs::read_to_string(path).map_err(CliError::io("read", path))?),
        None => None,
    };
    let settings = Settings::resolve(conn)?;
    let report = with_runtime(async move {
        let (mut client, target) = settings.audit()?;
        let note = client
            .get_checkpoint(GetCheckpointRequest {})
            .await
            .map_err(|s| target.error(s))?
            .into_inner()
            .checkpoint;
        // The size the proof is asked for: the signed one, checked first.
        let size =
            open_checkpoint(&verifier, &note, "the checkpoint the audit service served")?.size;
        if let Some(index) = a.inclusion {
            if index >= size {
                return Err(CliError::Input(format!(
                    "entry {index} is not in the log: the signed checkpoint covers {size} entries{}; give an ENTRY below {size}",
                    if size == 0 {
                        String::new()
                    } else {
                        format!(" (indexes 0 to {})", size - 1)
                    }
                )));
            }
            let entry = fetch_entries(&mut client, &target, index, 1)
                .await?
                .into_iter()
                .next()
                .filter(|e| e.index == index)
                .ok_or_else(|| {
                    CliError::Verify(format!(
                        "the audit service did not serve entry {index} of its signed log of {size} entries; suspect the audit host"
                    ))
                })?;
            let request = GetInclusionProofRequest {
                leaf_index: index,
                tree_size: size,
            };
            let proof = target.answer(client.get_inclusion_proof(request).await)?;
            return check_inclusion(&verifier, &note, &entry, &proof);
        }
        let old_size = a.consistency.unwrap_or_default();
        if old_size > size {
            return Err(CliError::Input(format!(
                "size {old_size} is beyond the log: the signed checkpoint covers {size} entries; give an OLD_SIZE of at most {size}"
            )));
        }
        let old = match old_checkpoint {
            Some(text) => OldRoot::Checkpoint(text),
            None => {
                let entries = fetch_entries(&mut client, &target, 0, old_size).await?;
                let mut root = RootBuilder::new();
                for (i, e) in entries.iter().enumerate() {
                    match entry_leaf_hash(e).filter(|_| e.index == i as u64) {
                        Some(leaf) => root.push(leaf),
                        None => {
                            return Err(CliError::Verify(format!(
                                "the audit service served entry {} where entry {i} belongs, or without its signed event; suspect the audit host",
                                e.index
                            )));
                        }
                    }
                }
                if root.size() != old_size {
                    return Err(CliError::Verify(format!(
                        "the audit service served {} of the first {old_size} entries of its signed log; suspect the audit host",
                        root.size()
                    )));
                }
                OldRoot::Entries(root.root())
            }
        };
        let request = GetConsistencyProofRequest {
            first_size: old_size,
            second_size: size,
        };
        let proof = target.answer(client.get_consistency_proof(request).await)?;
        check_consistency(&verifier, &note, old_size, &old, &proof)
    })?;
    out.answer(&report, || report.human())
}

/// The stream's next message, or none at its end. The channel's per-call
/// timeout bounds only a stream's start, so each later wait is bounded here
/// by the same timeout: a server that goes silent mid-stream ends the
/// command with the message of a call that did not answer in time.
pub(crate) async fn next_message<T>(
    stream: &mut tonic::Streaming<T>,
    target: &Target,
) -> Result<Option<T>, CliError> {
    match tokio::time::timeout(target.timeouts.call, stream.message()).await {
        Ok(message) => message.map_err(|s| target.error(s)),
        // What tonic reports when its own per-call timeout runs out, so the
        // message and the `--json` code are the same as for a silent start.
        Err(_) => Err(target.error(tonic::Status::cancelled("Timeout expired"))),
    }
}

/// One page of the log from `token` (an entry index, or empty for the
/// start), at most `page_size` entries: the entries and the next page's
/// token (empty at the end).
async fn query_page(
    client: &mut crate::profile::AuditClient,
    target: &Target,
    page_size: u32,
    token: &str,
) -> Result<(Vec<LogEntry>, String), CliError> {
    let request = QueryRequest {
        page_size,
        page_token: token.to_owned(),
        ..Default::default()
    };
    let mut stream = target.answer(client.query(request).await)?;
    let (mut entries, mut next) = (Vec::new(), String::new());
    while let Some(batch) = next_message(&mut stream, target).await? {
        entries.extend(batch.entries);
        if !batch.next_page_token.is_empty() {
            next = batch.next_page_token;
        }
    }
    Ok((entries, next))
}

/// Up to `count` entries from index `start`, oldest first.
async fn fetch_entries(
    client: &mut crate::profile::AuditClient,
    target: &Target,
    start: u64,
    count: u64,
) -> Result<Vec<LogEntry>, CliError> {
    let mut entries: Vec<LogEntry> = Vec::new();
    let mut token = start.to_string();
    while (entries.len() as u64) < count {
        let want = (count - entries.len() as u64).min(1000) as u32;
        let (page, next) = query_page(client, target, want, &token).await?;
        let empty = page.is_empty();
        entries.extend(page);
        if next.is_empty() || next == token || empty {
            break;
        }
        token = next;
    }
    entries.truncate(count as usize);
    Ok(entries)
}

/// Runs an audit command.
pub fn run(cmd: AuditCommand, conn: &ConnectionArgs, out: Output) -> Result<(), CliError> {
    match cmd {
        AuditCommand::Query(a) => {
            let settings = Settings::resolve(conn)?;
            with_runtime(query(a, settings, out))
        }
        AuditCommand::Reconcile(a) => {
            let settings = Settings::resolve(conn)?;
            with_runtime(crate::reconcile::run(a, settings, out))
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
        AuditCommand::Prove(a) => prove(a, conn, out),
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
        page_size: a.limit,
        page_token: a.page_token.clone().unwrap_or_default(),
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
    let mut next = String::new();
    while let Some(batch) = next_message(&mut stream, &target).await? {
        if out.json {
            output::json_line(&batch)?;
        } else {
            rows.extend(batch.entries.iter().map(entry_row));
        }
        if !batch.next_page_token.is_empty() {
            next = batch.next_page_token.clone();
        }
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
        if !next.is_empty() {
            eprintln!("{}", more_hint("entries", &next));
        }
    }
    Ok(())
}

/// What to say when a page did not hold every match: how to get the next.
pub fn more_hint(what: &str, token: &str) -> String {
    format!("more {what} match: add --page-token {token} for the next page, or raise --limit")
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
    let written = write_export(client, target, &tmp).await;
    let count = match written {
        Ok(count) => count,
        Err(e) => {
            // Nothing half-written is left behind to be taken for an export.
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, out).map_err(CliError::io("write", out))?;
    Ok(count)
}

/// Writes the whole log to `tmp`, synced; returns the number of entries.
async fn write_export(
    client: &mut crate::profile::AuditClient,
    target: &Target,
    tmp: &Path,
) -> Result<u64, CliError> {
    let file = std::fs::File::create(tmp).map_err(CliError::io("create", tmp))?;
    let mut w = BufWriter::new(file);
    let mut count = 0u64;
    let mut token = String::new();
    loop {
        let (page, next) = query_page(client, target, 1000, &token).await?;
        for entry in &page {
            let line = output::to_json(entry)?;
            writeln!(w, "{line}").map_err(CliError::io("write", tmp))?;
            count += 1;
        }
        if next.is_empty() || next == token {
            break;
        }
        token = next;
    }
    let file = w
        .into_inner()
        .map_err(|e| CliError::io("write", tmp)(e.into_error()))?;
    file.sync_all().map_err(CliError::io("write", tmp))?;
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
    /// The witnesses whose cosignature on the checkpoint verified.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub witnesses: Vec<String>,
}

/// The witnesses of `keys`' sources (their event keys) and of `extra`
/// (`NAME=KEY`), by name; a later one of a name replaces an earlier one.
pub fn witnesses(
    keys: &SourcesFile,
    extra: &[String],
) -> Result<Vec<CosignatureVerifier>, CliError> {
    let mut out: BTreeMap<String, CosignatureVerifier> = BTreeMap::new();
    let name_of = |id: &str| id.strip_prefix("spiffe://").unwrap_or(id).to_owned();
    for s in &keys.sources {
        let key = twokey_runtime::keys::parse_public_key(&s.public_key)
            .map_err(|e| CliError::Input(format!("source {}: {e}", s.id)))?;
        let name = name_of(&s.id);
        let w = CosignatureVerifier::new(&name, key)
            .map_err(|e| CliError::Input(format!("source {}: {e}", s.id)))?;
        out.insert(name, w);
    }
    for text in extra {
        let bad =
            |why: String| CliError::Usage(format!("--witness {text:?}: {why}; give NAME=KEY"));
        let (name, key) = text.split_once('=').ok_or_else(|| bad("no '='".into()))?;
        let name = name_of(name.trim());
        let key = key.trim();
        let w = match twokey_runtime::keys::parse_public_key(key) {
            Ok(raw) => CosignatureVerifier::new(&name, raw).map_err(|e| bad(e.to_string()))?,
            Err(_) => {
                let w = CosignatureVerifier::parse(key).map_err(|e| bad(e.to_string()))?;
                if w.name() != name {
                    return Err(bad(format!("the key is named {:?}", w.name())));
                }
                w
            }
        };
        out.insert(name, w);
    }
    Ok(out.into_values().collect())
}

/// Checks that at least `quorum` of `witnesses` cosigned `note`; returns
/// their names. A cosignature by a known witness that does not verify is
/// refused outright (forged); a missing one only does not count.
pub fn check_witnesses(
    note: &str,
    witnesses: &[CosignatureVerifier],
    quorum: usize,
) -> Result<Vec<String>, CliError> {
    let mut cosigned = Vec::new();
    let mut missing = Vec::new();
    for w in witnesses {
        match w.verify(note) {
            Ok(_) => cosigned.push(w.name().to_owned()),
            Err(CosignatureError::Missing(name)) => missing.push(name),
            Err(e) => return Err(CliError::Verify(e.to_string())),
        }
    }
    if quorum == 0 || cosigned.len() < quorum {
        return Err(CliError::Verify(format!(
            "the checkpoint from audit is not trusted without witnesses: {} of the {} needed \
             witness cosignatures ({}; none by {}); pass --witness NAME=KEY and \
             --witness-quorum N, or pin a checkpoint saved earlier with --checkpoint FILE",
            cosigned.len(),
            quorum.max(1),
            if cosigned.is_empty() {
                "none verified".to_owned()
            } else {
                format!("by {}", cosigned.join(", "))
            },
            if missing.is_empty() {
                "any other".to_owned()
            } else {
                missing.join(", ")
            },
        )));
    }
    Ok(cosigned)
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
    /// Witnesses and the quorum of them the checkpoint needs (none: the
    /// checkpoint was pinned by the auditor, or there is none).
    pub witnesses: Option<(Vec<CosignatureVerifier>, usize)>,
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
    let cosigned = match (&input.witnesses, &input.checkpoint) {
        (Some((witnesses, quorum)), Some(note)) => check_witnesses(note, witnesses, *quorum)?,
        (Some(_), None) => {
            return Err(CliError::Verify(
                "no checkpoint to check witness cosignatures on".into(),
            ));
        }
        (None, _) => Vec::new(),
    };
    let report = twokey_audit::verify::verify_log(&input.entries, &sources, checkpoint)
        .map_err(|e| CliError::Verify(e.to_string()))?;
    Ok(VerifyReport {
        entries: report.entries,
        sources: report.last_seq,
        root_hash: report.root.iter().map(|b| format!("{b:02x}")).collect(),
        checkpoint_tree_size: report.checkpoint_size,
        witnesses: cosigned,
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
    // A checkpoint fetched now is only as good as its witnesses; one saved
    // earlier is pinned by the auditor (witnesses checked if asked for).
    let witness_set = witnesses(&keys, &a.witness)?;
    let needed = a.witness_quorum.unwrap_or(witness_set.len());
    let fetched = a.checkpoint.is_none() && a.export.is_none();
    let quorum = (fetched || a.witness_quorum.is_some()).then_some((witness_set, needed));
    let (entries, checkpoint) = match &a.export {
        // Files given: offline.
        Some(path) => (read_export(path)?, file_checkpoint),
        // No export: fetch the log (and the checkpoint, unless given) now.
        None => {
            let settings = Settings::resolve(conn)?;
            let quorum = quorum.clone();
            with_runtime(async move {
                let (mut client, target) = settings.audit()?;
                // The checkpoint first, so that the export covers its tree.
                let checkpoint = match file_checkpoint {
                    Some(text) => text,
                    None => {
                        // The witnesses cosign a larger checkpoint moments
                        // after it is signed: ask again briefly if short.
                        let mut tries = 0;
                        loop {
                            let note = client
                                .get_checkpoint(GetCheckpointRequest {})
                                .await
                                .map_err(|s| target.error(s))?
                                .into_inner()
                                .checkpoint;
                            tries += 1;
                            let short = quorum
                                .as_ref()
                                .is_some_and(|(w, n)| check_witnesses(&note, w, *n).is_err());
                            if !short || tries >= 5 {
                                break note;
                            }
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        }
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
        witnesses: quorum,
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
        let root = if report.witnesses.is_empty() {
            root
        } else {
            format!("{root}, cosigned by {}", report.witnesses.join(", "))
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

    use twokey_audit::checkpoint::CheckpointSigner;
    use twokey_proto::audit::v1::SignedEvent;

    /// A log of `n` entries, a signer, and the leaves.
    fn log(n: u64) -> (Vec<LogEntry>, Vec<Hash>, CheckpointSigner) {
        let entries: Vec<LogEntry> = (0..n)
            .map(|i| LogEntry {
                index: i,
                signed_event: Some(SignedEvent {
                    event: format!("event {i}").into_bytes(),
                    signature: vec![i as u8; 64],
                }),
                ..Default::default()
            })
            .collect();
        let leaves = entries
            .iter()
            .map(|e| entry_leaf_hash(e).unwrap())
            .collect();
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        (
            entries,
            leaves,
            CheckpointSigner::new("t/audit", key).unwrap(),
        )
    }

    fn note(signer: &CheckpointSigner, leaves: &[Hash]) -> String {
        signer
            .sign(&Checkpoint {
                origin: "t/audit".into(),
                size: leaves.len() as u64,
                root: merkle::root(leaves),
            })
            .unwrap()
    }

    fn inclusion(leaves: &[Hash], index: u64) -> GetInclusionProofResponse {
        let size = leaves.len() as u64;
        GetInclusionProofResponse {
            leaf_index: index,
            tree_size: size,
            hashes: merkle::inclusion_proof(leaves, index, size)
                .unwrap()
                .iter()
                .map(|h| h.to_vec())
                .collect(),
        }
    }

    #[test]
    fn a_fetched_checkpoint_needs_a_quorum_of_witness_cosignatures() {
        use twokey_audit::cosignature::Cosigner;
        let (_, leaves, signer) = log(5);
        let note = note(&signer, &leaves);
        let text = signer.verifier().open(&note).unwrap().to_owned();
        let key = |b: u8| ed25519_dalek::SigningKey::from_bytes(&[b; 32]);
        let vault = Cosigner::new("t/svc/vault", key(1)).unwrap();
        let broker = Cosigner::new("t/svc/broker", key(2)).unwrap();
        let b64 = |k: ed25519_dalek::VerifyingKey| twokey_runtime::keys::encode_public_key(&k);
        // The sources file's sources are witnesses; --witness adds others
        // (a vkey, or NAME=base64 key).
        let keys = SourcesFile {
            checkpoint_key: None,
            sources: vec![SourceKey {
                id: "spiffe://t/svc/vault".into(),
                public_key: b64(key(1).verifying_key()),
            }],
        };
        let set = witnesses(
            &keys,
            &[format!("spiffe://t/svc/broker={}", broker.verifier())],
        )
        .unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(
            witnesses(
                &keys,
                &[format!("t/svc/broker={}", b64(key(2).verifying_key()))]
            )
            .unwrap(),
            set
        );
        assert!(witnesses(&keys, &[format!("t/svc/other={}", broker.verifier())]).is_err());
        assert!(witnesses(&keys, &["t/svc/broker".into()]).is_err());

        let line = |w: &Cosigner| w.cosign(&text, 1_800_000_000).unwrap();
        let both = format!("{note}{}\n{}\n", line(&vault), line(&broker));
        let one = format!("{note}{}\n", line(&vault));
        // Met.
        assert_eq!(
            check_witnesses(&both, &set, 2).unwrap(),
            ["t/svc/broker", "t/svc/vault"]
        );
        assert_eq!(check_witnesses(&one, &set, 1).unwrap(), ["t/svc/vault"]);
        // Missing.
        let err = check_witnesses(&one, &set, 2).unwrap_err().to_string();
        assert!(
            err.contains("1 of the 2 needed") && err.contains("none by t/svc/broker"),
            "{err}"
        );
        assert!(err.contains("--checkpoint FILE"), "{err}");
        assert!(check_witnesses(&note, &set, 1).is_err());
        assert!(check_witnesses(&both, &[], 0).is_err());
        // Forged: a line under the broker's name and key id over another
        // checkpoint, or with a flipped byte, is refused outright.
        let other_text = text.replacen("\n5\n", "\n4\n", 1);
        let moved = broker.cosign(&other_text, 1_800_000_000).unwrap();
        let forged = format!("{note}{}\n{moved}\n", line(&vault));
        let err = check_witnesses(&forged, &set, 1).unwrap_err().to_string();
        assert!(err.contains("does not verify"), "{err}");
        // The log's signature still opens the cosigned note.
        assert_eq!(signer.verifier().open(&both).unwrap(), text);
    }

    #[test]
    fn an_inclusion_proof_is_checked_against_the_signed_root() {
        let (entries, leaves, signer) = log(13);
        let verifier = signer.verifier();
        let note = note(&signer, &leaves);
        let proof = inclusion(&leaves, 5);
        let report = check_inclusion(&verifier, &note, &entries[5], &proof).unwrap();
        assert_eq!(report.leaf_index, Some(5));
        assert_eq!(report.tree_size, 13);
        assert_eq!(report.hashes.len(), proof.hashes.len());
        assert_eq!(report.root_hash, hex(&merkle::root(&leaves)));
        assert!(
            report
                .human()
                .starts_with("ok: entry 5 is in the signed log of 13 entries")
        );

        // A tampered proof hash, another entry, a served entry altered.
        let mut bad = proof.clone();
        bad.hashes[1][0] ^= 1;
        let err = check_inclusion(&verifier, &note, &entries[5], &bad).unwrap_err();
        assert!(matches!(err, CliError::Verify(_)), "{err}");
        assert!(
            err.to_string().contains("does not lead to the signed root"),
            "{err}"
        );
        let mut other = entries[6].clone();
        other.index = 5;
        assert!(check_inclusion(&verifier, &note, &other, &proof).is_err());
        // A proof for another tree size than the signed one.
        let mut resized = proof.clone();
        resized.tree_size = 12;
        assert!(check_inclusion(&verifier, &note, &entries[5], &resized).is_err());
        // A checkpoint signed by another key, or altered.
        let other_key = ed25519_dalek::SigningKey::from_bytes(&[8; 32]);
        let other = CheckpointSigner::new("t/audit", other_key).unwrap();
        let err = check_inclusion(&other.verifier(), &note, &entries[5], &proof).unwrap_err();
        assert!(
            err.to_string().contains("does not verify with key"),
            "{err}"
        );
        let altered = note.replacen("\n13\n", "\n14\n", 1);
        assert!(check_inclusion(&verifier, &altered, &entries[5], &proof).is_err());
    }

    #[test]
    fn a_consistency_proof_is_checked_from_the_old_root_to_the_signed_root() {
        let (_, leaves, signer) = log(21);
        let verifier = signer.verifier();
        let new = note(&signer, &leaves);
        let old = note(&signer, &leaves[..8]);
        let proof = GetConsistencyProofResponse {
            first_size: 8,
            second_size: 21,
            hashes: merkle::consistency_proof(&leaves, 8, 21)
                .unwrap()
                .iter()
                .map(|h| h.to_vec())
                .collect(),
        };
        let from_file = OldRoot::Checkpoint(old.clone());
        let report = check_consistency(&verifier, &new, 8, &from_file, &proof).unwrap();
        assert_eq!(report.old_root_from, Some("checkpoint file"));
        assert_eq!(report.old_root_hash, Some(hex(&merkle::root(&leaves[..8]))));
        let computed = OldRoot::Entries(merkle::root(&leaves[..8]));
        check_consistency(&verifier, &new, 8, &computed, &proof).unwrap();

        // A fork: the old tree had another entry.
        let mut forked = leaves[..8].to_vec();
        forked[3][0] ^= 1;
        let err = check_consistency(
            &verifier,
            &new,
            8,
            &OldRoot::Entries(merkle::root(&forked)),
            &proof,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("is not a prefix of the signed log of 21 entries"),
            "{err}"
        );
        // An old checkpoint of another size is a usage error.
        let err = check_consistency(&verifier, &new, 9, &from_file, &proof).unwrap_err();
        assert!(matches!(err, CliError::Usage(_)), "{err}");
        // A tampered proof.
        let mut bad = proof.clone();
        bad.hashes[0][31] ^= 1;
        assert!(check_consistency(&verifier, &new, 8, &from_file, &bad).is_err());
    }

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

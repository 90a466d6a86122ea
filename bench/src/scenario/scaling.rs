//! How the audit log behaves as it grows: the log is filled to each size
//! through the audit's own store (`TileStore`: C2SP tiles plus sled
//! indexes; events signed by a `fill` source, a sync every
//! [`FILL_BATCH`] entries), then the real `twokey-audit` process is started
//! on it and measured over mTLS: start to serving, idle RSS, the latency of
//! checkpoints, inclusion and consistency proofs, the first page of a query
//! by each index (request id, account, actor, action, time range) and of the
//! newest entries, grouped Append throughput, the RSS after that read and
//! append load, and the disk used per entry, indexes included.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use futures::StreamExt;
use prost::Message;
use serde::Serialize;
use twokey_audit::{
    merkle::{Hash, leaf_hash, subtree_root},
    store::{LogStore, TileStore},
};
use twokey_proto::audit::v1::{
    GetCheckpointRequest, GetConsistencyProofRequest, GetInclusionProofRequest, LogEntry,
    QueryRequest, SignedEvent, audit_service_client::AuditServiceClient,
};
use twokey_runtime::{
    events::{EventDraft, EventSigner},
    time::to_timestamp,
};

use crate::{
    scenario::audit::{Source, group},
    setup::{TD, World},
    stats::{percentile, summarise},
    system::{Footprint, start_audit},
};

/// Entries the fill appends between two syncs of the store.
pub const FILL_BATCH: u64 = 65_536;

/// Actions of the fill's events, one request's five steps.
const ACTIONS: [&str; 5] = [
    "request.created",
    "request.approved",
    "pin.issued",
    "pin.verified",
    "code.released",
];
/// Distinct accounts and people in the fill's events.
const ACCOUNTS: u64 = 1_000;
const PEOPLE: u64 = 200;

/// First-page latency of one kind of indexed query.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QueryLatency {
    /// The index: `request id`, `account`, `actor`, `action`, `time range`,
    /// or `newest` (no filter).
    pub by: String,
    /// p50 µs.
    pub p50_us: f64,
    /// p99 µs.
    pub p99_us: f64,
    /// Mean entries on the first page.
    pub mean_entries: f64,
}

/// Measurements at one log size.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ScaleRow {
    /// Entries in the log when the reads were measured (the Append run
    /// then adds its events).
    pub entries: u64,
    /// Seconds to fill the log to this size (bench-side, not a target).
    pub fill_seconds: f64,
    /// Size of the data directory after the Append run, MiB.
    pub disk_mib: f64,
    /// Data directory bytes per entry after the Append run (tiles,
    /// checkpoint, sled indexes).
    pub disk_bytes_per_entry: f64,
    /// Grouped Append throughput, events/s.
    pub append_per_s: f64,
    /// Grouped Append p99 latency, µs.
    pub append_p99_us: f64,
    /// GetCheckpoint p50 / p99, µs.
    pub checkpoint_p50_us: f64,
    /// GetCheckpoint p99, µs.
    pub checkpoint_p99_us: f64,
    /// GetInclusionProof (random leaf) p50, µs.
    pub inclusion_p50_us: f64,
    /// GetInclusionProof p99, µs.
    pub inclusion_p99_us: f64,
    /// GetConsistencyProof (random older size) p50, µs.
    pub consistency_p50_us: f64,
    /// GetConsistencyProof p99, µs.
    pub consistency_p99_us: f64,
    /// First pages (100 entries) of queries, by index.
    pub queries: Vec<QueryLatency>,
    /// Failed operations of any kind.
    pub errors: usize,
}

impl ScaleRow {
    /// The query latency `by`, if measured.
    pub fn query(&self, by: &str) -> Option<&QueryLatency> {
        self.queries.iter().find(|q| q.by == by)
    }
}

/// The fill's event `seq`: about 300 bytes signed, one of five steps of
/// request `seq / 5`, spread over [`ACCOUNTS`] accounts and [`PEOPLE`]
/// people, so every index has many values and each value many entries.
pub fn fill_event(signer: &EventSigner, seq: u64) -> SignedEvent {
    let request = seq / 5;
    let e = EventDraft::new(person(seq), ACTIONS[(seq % 5) as usize])
        .account(account(request))
        .request(request_id(request))
        .attr("grant_id", format!("{:032x}", u128::from(seq) * 7919))
        .attr("requester", format!("spiffe://{TD}/user/alice"))
        .attr("approvers", format!("spiffe://{TD}/user/bob"))
        .into_event(signer.source(), seq, SystemTime::now());
    signer.sign(&e)
}

fn person(seq: u64) -> String {
    format!("spiffe://{TD}/user/person-{:03}", seq % PEOPLE)
}

fn account(request: u64) -> String {
    format!("acct-{:04}", request % ACCOUNTS)
}

fn request_id(request: u64) -> String {
    format!("req-{request:012}")
}

/// Appends signed [`fill_event`]s through the audit's store (after what its
/// journal holds beyond it) until the log
/// holds `target` entries, syncing every [`FILL_BATCH`], and returns the
/// root computed from the store's tiles and the fill source's next
/// sequence number.
///
/// Setup, not a measurement: events are signed on both cores ahead of the
/// appends, and the store is written without the service's verification of
/// each signature. The served checkpoint's root is compared with the root
/// returned here, so a fill the service does not read fails the run.
pub fn fill(dir: &Path, signer: &Arc<EventSigner>, target: u64) -> Result<(Hash, u64)> {
    let store = TileStore::open(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let runtime = tokio::runtime::Handle::current();
    // What the audit acknowledged from its journal before it was killed
    // goes into the store first, as its own start would put it there.
    let journal = twokey_audit::journal::Journal::open(dir, store.size())?;
    twokey_audit::journal::replay_into(&store, &journal.replay)?;
    runtime.block_on(store.sync())?;
    let source = signer.source().as_str().to_owned();
    let mut seq = store.next_seq(&source)?;
    while store.size() < target {
        let n = (target - store.size()).min(FILL_BATCH);
        let signed = sign_parallel(signer, seq, n);
        for s in signed {
            let e = twokey_proto::audit::v1::Event::decode(s.event.as_slice())?;
            let leaf = leaf_hash(&s.encode_to_vec());
            let entry = LogEntry {
                index: store.size(),
                signed_event: Some(s),
                event: Some(e),
                received_at: Some(to_timestamp(SystemTime::now())),
            };
            store.append(&entry, &leaf)?;
        }
        seq += n;
        runtime.block_on(store.sync())?;
    }
    let size = store.size();
    let root = subtree_root(0, size, &mut |level, index| store.node(level, index))?;
    Ok((root, seq))
}

/// `n` fill events from `first`, signed on two threads.
fn sign_parallel(signer: &Arc<EventSigner>, first: u64, n: u64) -> Vec<SignedEvent> {
    let half = n / 2;
    std::thread::scope(|s| {
        let a = s.spawn(|| {
            (first..first + half)
                .map(|q| fill_event(signer, q))
                .collect::<Vec<_>>()
        });
        let b: Vec<SignedEvent> = (first + half..first + n)
            .map(|q| fill_event(signer, q))
            .collect();
        let mut all = a.join().expect("signing thread");
        all.extend(b);
        all
    })
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

async fn timed<F, Fut>(count: usize, limit: Duration, mut f: F) -> (Vec<Duration>, usize)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let (mut samples, mut errors) = (Vec::new(), 0);
    let deadline = Instant::now() + limit;
    for i in 0..count {
        if Instant::now() > deadline {
            break;
        }
        let t = Instant::now();
        match f(i).await {
            Ok(()) => samples.push(t.elapsed()),
            Err(e) => {
                eprintln!("twokey-bench: scaling: {e:#}");
                errors += 1;
            }
        }
    }
    samples.sort_unstable();
    (samples, errors)
}

/// Like [`timed`], also keeping what each successful call returned.
async fn timed_counts<F, Fut>(
    count: usize,
    limit: Duration,
    mut f: F,
) -> (Vec<Duration>, Vec<usize>, usize)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<usize>>,
{
    let (mut samples, mut counts, mut errors) = (Vec::new(), Vec::new(), 0);
    let deadline = Instant::now() + limit;
    for i in 0..count {
        if Instant::now() > deadline {
            break;
        }
        let t = Instant::now();
        match f(i).await {
            Ok(n) => {
                samples.push(t.elapsed());
                counts.push(n);
            }
            Err(e) => {
                eprintln!("twokey-bench: scaling: {e:#}");
                errors += 1;
            }
        }
    }
    samples.sort_unstable();
    (samples, counts, errors)
}

/// The indexed queries measured at each size, and the unfiltered newest page.
pub const QUERY_KINDS: [&str; 6] = [
    "request id",
    "account",
    "actor",
    "action",
    "time range",
    "newest",
];

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Fills, starts and measures the log at each of `sizes` (ascending).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    world: &World,
    bin_dir: &Path,
    srcs: &[Source],
    sizes: &[u64],
    appends_per_source: usize,
    probes: usize,
    query_probes: usize,
    limit: Duration,
) -> Result<(Vec<ScaleRow>, Vec<Footprint>)> {
    let data = world.dir().join("data").join("scaling");
    let config = world.dir().join("audit-scaling.toml");
    world.write_audit_config(&config, &data)?;
    let (mut rows, mut footprints) = (Vec::new(), Vec::new());
    // A new log: every source starts again at sequence number 1.
    let mut srcs: Vec<Source> = srcs
        .iter()
        .map(|s| Source {
            name: s.name.clone(),
            signer: s.signer.clone(),
            next_seq: 1,
        })
        .collect();
    let mut fill_window = (SystemTime::now(), SystemTime::now());
    for &size in sizes {
        let t = Instant::now();
        let (dir, signer) = (data.clone(), world.fill.clone());
        let (root, next_seq) =
            tokio::task::spawn_blocking(move || fill(&dir, &signer, size)).await??;
        let fill_seconds = t.elapsed().as_secs_f64();
        fill_window.1 = SystemTime::now();
        let fill_seq = next_seq;
        let (svc, fp) = start_audit(world, bin_dir, &config, &format!("{size} entries")).await?;
        footprints.push(fp);
        let mut errors = 0;
        let served = AuditServiceClient::new(world.channel("carol", &svc.address, "audit")?)
            .get_checkpoint(GetCheckpointRequest {})
            .await?
            .into_inner();
        anyhow::ensure!(
            served.tree_size == size && served.root_hash == root,
            "the served log ({} entries) does not match the filled one ({size})",
            served.tree_size
        );
        let carol = AuditServiceClient::new(world.channel("carol", &svc.address, "audit")?);
        let entries = size;
        let c = carol.clone();
        let (cp, e) = timed(probes, limit, |_| {
            let mut c = c.clone();
            async move {
                c.get_checkpoint(GetCheckpointRequest {}).await?;
                Ok(())
            }
        })
        .await;
        errors += e;
        let (inc, e) = timed(probes, limit, |_| {
            let mut c = carol.clone();
            let index = rand::random::<u64>() % entries;
            async move {
                let r = c
                    .get_inclusion_proof(GetInclusionProofRequest {
                        leaf_index: index,
                        tree_size: 0,
                    })
                    .await?
                    .into_inner();
                anyhow::ensure!(entries < 2 || !r.hashes.is_empty(), "empty proof");
                Ok(())
            }
        })
        .await;
        errors += e;
        let (cons, e) = timed(probes, limit, |_| {
            let mut c = carol.clone();
            let first = 1 + rand::random::<u64>() % (entries - 1).max(1);
            async move {
                c.get_consistency_proof(GetConsistencyProofRequest {
                    first_size: first,
                    second_size: 0,
                })
                .await?;
                Ok(())
            }
        })
        .await;
        errors += e;
        // The first page (100 entries) of a query by each index, for a
        // value of a random fill event (so there is always a match).
        let fill_seqs = fill_seq.max(2) - 1;
        let mut queries = Vec::new();
        for by in QUERY_KINDS {
            let phase = crate::stats::Phase::start(&format!("scaling {size}: Query by {by}"));
            let (samples, counts, e) = timed_counts(query_probes, limit, |_| {
                let seq = 1 + rand::random::<u64>() % fill_seqs;
                let request = seq / 5;
                let mut req = QueryRequest {
                    page_size: 100,
                    ..Default::default()
                };
                match by {
                    "request id" => req.request_id = request_id(request),
                    "account" => req.account_id = account(request),
                    "actor" => req.actor = person(seq),
                    "action" => req.action = ACTIONS[(seq % 5) as usize].into(),
                    "time range" => {
                        let (from, to) = fill_window;
                        let span = to.duration_since(from).unwrap_or_default();
                        let at = from + span.mul_f64(rand::random::<f64>());
                        req.since = Some(to_timestamp(at));
                        req.until = Some(to_timestamp(at + Duration::from_secs(1)));
                    }
                    _ => req.newest_first = true,
                }
                let mut c = carol.clone();
                async move {
                    let mut s = c.query(req).await?.into_inner();
                    let first = s.next().await.context("no first page")??;
                    Ok(first.entries.len())
                }
            })
            .await;
            drop(phase);
            errors += e;
            queries.push(QueryLatency {
                by: by.into(),
                p50_us: us(percentile(&samples, 50.0)),
                p99_us: us(percentile(&samples, 99.0)),
                mean_entries: counts.iter().sum::<usize>() as f64 / counts.len().max(1) as f64,
            });
        }
        // Append last, so the reads above saw exactly `size` entries.
        let (s, e, el) = group(
            world,
            &svc.address,
            &mut srcs,
            appends_per_source,
            64,
            limit,
        )
        .await?;
        errors += e;
        let append = summarise("scaling", "append", false, 0, s, e, el);
        let rss_after = svc.rss_kib()? as f64 / 1024.0;
        if let Some(fp) = footprints.last_mut() {
            fp.loaded_rss_mib = rss_after;
        }
        svc.stop();
        let appended = (srcs.len() * appends_per_source) as u64;
        let disk = dir_size(&data) as f64;
        rows.push(ScaleRow {
            entries,
            fill_seconds,
            disk_mib: disk / (1024.0 * 1024.0),
            disk_bytes_per_entry: disk / (entries + appended) as f64,
            append_per_s: append.per_second,
            append_p99_us: append.p99_us,
            checkpoint_p50_us: us(percentile(&cp, 50.0)),
            checkpoint_p99_us: us(percentile(&cp, 99.0)),
            inclusion_p50_us: us(percentile(&inc, 50.0)),
            inclusion_p99_us: us(percentile(&inc, 99.0)),
            consistency_p50_us: us(percentile(&cons, 50.0)),
            consistency_p99_us: us(percentile(&cons, 99.0)),
            queries,
            errors,
        });
    }
    Ok((rows, footprints))
}

//! How the audit log behaves as it grows: the log is filled to each size
//! directly through its store (events signed by a `fill` source, one sync at
//! the end), then the real `twokey-audit` process is started on it and
//! measured over mTLS: start to serving, idle RSS, grouped Append
//! throughput, and the latency of checkpoints, inclusion and consistency
//! proofs, a first query page and a query that scans the whole log.

use std::{
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use futures::StreamExt;
use prost::Message;
use serde::Serialize;
use twokey_audit::{
    merkle::{Hash, leaf_hash, node_hash, subtree_root},
    store::SledStore,
};
use twokey_proto::audit::v1::{
    GetCheckpointRequest, GetConsistencyProofRequest, GetInclusionProofRequest, LogEntry,
    QueryRequest, audit_service_client::AuditServiceClient,
};
use twokey_runtime::{durable::DurableDb, events::EventSigner, time::to_timestamp};

use crate::{
    scenario::audit::{Source, event, group},
    setup::World,
    stats::{percentile, summarise},
    system::{Footprint, start_audit},
};

/// Measurements at one log size.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ScaleRow {
    /// Entries in the log when the reads were measured (the Append run
    /// then adds its events).
    pub entries: u64,
    /// Seconds to fill the log to this size (bench-side, not a target).
    pub fill_seconds: f64,
    /// Size of the data directory, MiB.
    pub disk_mib: f64,
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
    /// Query, newest 100 entries, p50 µs.
    pub query_page_p50_us: f64,
    /// Query by request id (scans every entry), p50 µs.
    pub query_scan_p50_us: f64,
    /// Failed operations of any kind.
    pub errors: usize,
}

/// Appends signed `fill` events until the log holds `target` entries, then
/// one flush + fdatasync.
///
/// This is setup, not a measurement, so it writes the audit store's key
/// layout (see `twokey_audit::store`) with plain sled inserts: a sled
/// `apply_batch` seals and writes sled's IO buffer with a waiting
/// `sync_file_range` every time (the bound the Append rows measure), which
/// would make a million-entry fill take many minutes. The served
/// checkpoint's root is compared with the root computed here, so a drift
/// in the layout fails the run instead of measuring a wrong log.
pub fn fill(dir: &Path, signer: &EventSigner, target: u64) -> Result<Hash> {
    let db = DurableDb::open(dir)?;
    let tree = db.tree("audit_log")?;
    let u64_at = |key: &[u8]| -> Result<Option<u64>> {
        Ok(match tree.get(key)? {
            Some(v) => Some(u64::from_be_bytes(v.as_ref().try_into()?)),
            None => None,
        })
    };
    let node_key = |level: u32, index: u64| {
        let mut k = vec![b'n', level as u8];
        k.extend_from_slice(&index.to_be_bytes());
        k
    };
    let source = signer.source().as_str().to_owned();
    let mut next_seq_key = vec![b's'];
    next_seq_key.extend_from_slice(source.as_bytes());
    let mut size = u64_at(b"m/size")?.unwrap_or(0);
    let mut seq = u64_at(&next_seq_key)?.unwrap_or(1);
    while size < target {
        let signed = event(signer, seq);
        let leaf = leaf_hash(&signed.encode_to_vec());
        let e = twokey_proto::audit::v1::Event::decode(signed.event.as_slice())?;
        let entry = LogEntry {
            index: size,
            signed_event: Some(signed),
            event: Some(e),
            received_at: Some(to_timestamp(SystemTime::now())),
        };
        tree.insert(SledStore::entry_key(size), entry.encode_to_vec())?;
        let mut q = vec![b'q'];
        q.extend_from_slice(source.as_bytes());
        q.push(0);
        q.extend_from_slice(&seq.to_be_bytes());
        tree.insert(q, &size.to_be_bytes())?;
        let (mut level, mut i, mut hash) = (0u32, size, leaf);
        tree.insert(node_key(level, i), &hash)?;
        while i & 1 == 1 {
            let left = tree
                .get(node_key(level, i - 1))?
                .context("missing left node")?;
            hash = node_hash(left.as_ref().try_into()?, &hash);
            level += 1;
            i >>= 1;
            tree.insert(node_key(level, i), &hash)?;
        }
        seq += 1;
        size += 1;
        tree.insert(next_seq_key.as_slice(), &seq.to_be_bytes())?;
        tree.insert(b"m/size", &size.to_be_bytes())?;
    }
    db.sync_blocking()?;
    let root = subtree_root(0, size, &mut |level, index| -> Result<Hash> {
        let v = tree.get(node_key(level, index))?.context("missing node")?;
        Ok(v.as_ref().try_into()?)
    })?;
    Ok(root)
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
    for &size in sizes {
        let t = Instant::now();
        let (dir, signer) = (data.clone(), world.fill.clone());
        let root = tokio::task::spawn_blocking(move || fill(&dir, &signer, size)).await??;
        let fill_seconds = t.elapsed().as_secs_f64();
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
        let query = |req: QueryRequest| {
            let mut c = carol.clone();
            async move {
                let mut s = c.query(req).await?.into_inner();
                let mut n = 0;
                while let Some(r) = s.next().await {
                    n += r?.entries.len();
                }
                Ok::<usize, anyhow::Error>(n)
            }
        };
        let (page, e) = timed(probes.min(50), limit, |_| {
            let q = query(QueryRequest {
                newest_first: true,
                page_size: 100,
                ..Default::default()
            });
            async move {
                anyhow::ensure!(q.await? == 100, "page is not 100 entries");
                Ok(())
            }
        })
        .await;
        errors += e;
        // A filter that matches one fill event: the whole log is scanned.
        let (scan, e) = timed(3, limit, |_| {
            let q = query(QueryRequest {
                request_id: format!("req-{:012}", 1),
                ..Default::default()
            });
            async move {
                q.await.context("scan")?;
                Ok(())
            }
        })
        .await;
        errors += e;
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
        rows.push(ScaleRow {
            entries,
            fill_seconds,
            disk_mib: dir_size(&data) as f64 / (1024.0 * 1024.0),
            append_per_s: append.per_second,
            append_p99_us: append.p99_us,
            checkpoint_p50_us: us(percentile(&cp, 50.0)),
            checkpoint_p99_us: us(percentile(&cp, 99.0)),
            inclusion_p50_us: us(percentile(&inc, 50.0)),
            inclusion_p99_us: us(percentile(&inc, 99.0)),
            consistency_p50_us: us(percentile(&cons, 50.0)),
            consistency_p99_us: us(percentile(&cons, 99.0)),
            query_page_p50_us: us(percentile(&page, 50.0)),
            query_scan_p50_us: us(percentile(&scan, 50.0)),
            errors,
        });
    }
    Ok((rows, footprints))
}

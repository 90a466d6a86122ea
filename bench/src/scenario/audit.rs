//! Audit `Append`: several sources, each streaming pre-signed events with up
//! to `window` unacknowledged (so concurrent appends share one flush +
//! fdatasync: group commit), beside one source with one event in flight
//! (every event waits for its own sync). Every acknowledgement is durable.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail};
use tokio::sync::Semaphore;
use tonic::transport::Channel;
use twokey_proto::audit::v1::{
    AppendRequest, AppendStatus, SignedEvent, audit_service_client::AuditServiceClient,
};
use twokey_runtime::events::{EventDraft, EventSigner};

use crate::{
    setup::{TD, World},
    stats::{Row, summarise},
};

/// A benchmark source: its signer and the next sequence number it sends.
#[derive(Debug)]
pub struct Source {
    /// Its certificate name, e.g. `src-3`.
    pub name: String,
    /// Its event key.
    pub signer: Arc<EventSigner>,
    /// Next sequence number.
    pub next_seq: u64,
}

/// The benchmark sources of `world`, starting at seq 1.
pub fn sources(world: &World) -> Vec<Source> {
    world
        .sources
        .iter()
        .enumerate()
        .map(|(i, s)| Source {
            name: format!("src-{i}"),
            signer: Arc::new(EventSigner::new(
                s.source().clone(),
                // EventSigner holds the key privately: re-load it from disk.
                twokey_runtime::keys::load_signing_key(
                    &world.pki.join(format!("src-{i}-event.key")),
                )
                .expect("source key written by World::new"),
            )),
            next_seq: 1,
        })
        .collect()
}

/// A realistic event (about 300 bytes signed) from `signer` with `seq`.
pub fn event(signer: &EventSigner, seq: u64) -> SignedEvent {
    let e = EventDraft::new(format!("spiffe://{TD}/user/olivia"), "code.released")
        .account("bench-root")
        .request(format!("req-{seq:012}"))
        .attr("grant_id", format!("{:032x}", u128::from(seq) * 7919))
        .attr("requester", format!("spiffe://{TD}/user/alice"))
        .attr("approvers", format!("spiffe://{TD}/user/bob"))
        .into_event(signer.source(), seq, SystemTime::now());
    signer.sign(&e)
}

/// Streams `count` events from `source` with up to `window` in flight;
/// returns each event's send-to-acknowledgement latency and the failures.
pub async fn stream(
    channel: Channel,
    source: &mut Source,
    count: usize,
    window: usize,
    limit: Duration,
) -> Result<(Vec<Duration>, usize)> {
    let events: Vec<SignedEvent> = (0..count as u64)
        .map(|k| event(&source.signer, source.next_seq + k))
        .collect();
    let first = source.next_seq;
    source.next_seq += count as u64;
    let (tx, rx) = tokio::sync::mpsc::channel::<AppendRequest>(window.max(1));
    let permits = Arc::new(Semaphore::new(window.max(1)));
    let sent: Arc<Mutex<VecDeque<Instant>>> = Arc::default();
    let sender = {
        let (permits, sent) = (permits.clone(), sent.clone());
        tokio::spawn(async move {
            for e in events {
                let Ok(p) = permits.acquire().await else {
                    return;
                };
                p.forget();
                sent.lock().expect("not poisoned").push_back(Instant::now());
                if tx
                    .send(AppendRequest {
                        event: Some(e),
                        ..Default::default()
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            // Keep the stream open until every answer came back.
            let _ = permits.acquire_many(window.max(1) as u32).await;
        })
    };
    let mut client = AuditServiceClient::new(channel);
    let run = async {
        let mut inbound = client
            .append(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .context("open Append stream")?
            .into_inner();
        let mut samples = Vec::with_capacity(count);
        let mut errors = 0;
        let mut expect = first;
        while samples.len() + errors < count {
            let Some(ack) = inbound.message().await? else {
                bail!("stream ended after {} answers", samples.len() + errors);
            };
            let at = sent.lock().expect("not poisoned").pop_front();
            permits.add_permits(1);
            if ack.status == AppendStatus::Stored as i32 && ack.seq == expect {
                samples.push(at.map_or(Duration::ZERO, |t| t.elapsed()));
            } else {
                errors += 1;
            }
            expect += 1;
        }
        Ok((samples, errors))
    };
    let out = tokio::time::timeout(limit, run).await;
    permits.close();
    sender.abort();
    match out {
        Ok(r) => r,
        Err(_) => bail!("{}: time limit {limit:?} reached", source.name),
    }
}

/// `count` events from each of `n` sources at `window`, all at once.
pub async fn group(
    world: &World,
    address: &str,
    srcs: &mut [Source],
    count: usize,
    window: usize,
    limit: Duration,
) -> Result<(Vec<Duration>, usize, Duration)> {
    let mut tasks = Vec::new();
    let start = Instant::now();
    for s in srcs.iter_mut() {
        let channel = world.channel(&s.name, address, "audit")?;
        let mut src = Source {
            name: s.name.clone(),
            signer: s.signer.clone(),
            next_seq: s.next_seq,
        };
        s.next_seq += count as u64;
        tasks.push(tokio::spawn(async move {
            stream(channel, &mut src, count, window, limit).await
        }));
    }
    let (mut samples, mut errors) = (Vec::new(), 0);
    for t in tasks {
        match t.await? {
            Ok((s, e)) => {
                samples.extend(s);
                errors += e;
            }
            Err(e) => {
                eprintln!("twokey-bench: append stream failed: {e:#}");
                errors += count;
            }
        }
    }
    Ok((samples, errors, start.elapsed()))
}

/// Group commit from all sources beside one-sync-per-event from one.
pub async fn run(
    world: &World,
    address: &str,
    srcs: &mut [Source],
    per_source: usize,
    baseline: usize,
    limit: Duration,
) -> Result<Vec<Row>> {
    // Warm up each connection.
    let (_, e, _) = group(world, address, srcs, 4, 4, limit).await?;
    anyhow::ensure!(e == 0, "warm-up appends failed");
    let n = srcs.len();
    let window = 64;
    let (s, e, t) = group(world, address, srcs, per_source, window, limit).await?;
    let mut grouped = summarise(
        "audit",
        &format!("Append, {n} sources × {window} in flight (group commit)"),
        false,
        n * window,
        s,
        e,
        t,
    );
    grouped.target = "≥ 20,000 events/s, ≥ 25× one sync per event".into();
    let (s, e, t) = group(world, address, &mut srcs[..1], baseline, 1, limit).await?;
    let single = summarise(
        "audit",
        "Append, 1 source × 1 in flight (one sync per event)",
        true,
        1,
        s,
        e,
        t,
    );
    Ok(vec![single, grouped])
}

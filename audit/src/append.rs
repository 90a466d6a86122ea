//! One source's stream of appends, pipelined: up to [`PIPELINE`] events are
//! checked and written before the first is durable, so they share a sync;
//! answers go back in order, each only once its event is durable. A refusal
//! ends the stream after everything before it is answered. No gRPC here:
//! `grpc` turns the request stream into [`Inbound`] items and the answers
//! and [`Refusal`] into responses and statuses.
//!
//! Receipts: the acknowledgements that are ready together (one durable
//! group) go out as one group, and the last of them carries a [`Receipt`]: a checkpoint signed over every durable
//! entry, so it covers every acknowledgement of the group and all before it
//! on the stream, with the consistency proof from the checkpoint the stream
//! carried before (the first from the `known_size` of the first request).
//! So an acknowledgement without a receipt is covered by the next one with
//! a receipt, which comes before the stream ends or waits for anything.
//! Signing costs one Ed25519 signature and, when the tree grew, one write
//! and sync of the tree-head file per group, not per event.

use std::sync::Arc;

use futures::{FutureExt, Stream, StreamExt, stream::FuturesOrdered};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;
use twokey_proto::audit::v1::{Event, SignedEvent};
use twokey_runtime::{SpiffeId, trace};

use crate::{
    error::AuditError,
    service::{Ack, AuditLog, Receipt},
    store::LogStore,
};

/// Appends of one stream written but not yet acknowledged, at most.
pub const PIPELINE: usize = 64;

/// One item of an append stream, as the transport adapter reads it.
#[derive(Debug)]
pub enum Inbound<F> {
    /// The next event, and the tree size of the last checkpoint the source
    /// accepted (from its request; only the first of a stream is used).
    Event(SignedEvent, u64),
    /// A request without an event: the first of a stream says the size of
    /// the last checkpoint the source accepted and that checkpoint (its
    /// signed note, or empty) and asks for a receipt now; later ones only
    /// carry cosignatures (kept before this point).
    Hello(u64, String),
    /// The stream failed in a way the source must be told (`F` says how).
    Fail(F),
    /// The source is done sending (or the stream broke without more to say).
    End,
}

/// Why an append stream ended with an error.
#[derive(Debug)]
pub enum Refusal<F> {
    /// The log refused an event or failed to store it; `after_seq` is the
    /// last sequence number this stream sent before it, if any, to name the
    /// place in the stream when the event itself cannot.
    Log {
        /// What the log said.
        error: AuditError,
        /// The sequence number of the event before, on this stream.
        after_seq: Option<u64>,
    },
    /// The stream itself failed.
    Stream(F),
    /// The service is shutting down; the source should reconnect and resend.
    ShuttingDown,
}

/// An acknowledgement, with a receipt if it is the last of its group; or a
/// receipt alone (no `ack`), sent when the source said hello or, while it
/// has nothing pending, when the log signed a larger checkpoint, so that
/// every source sees (and as a witness cosigns) every checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acked {
    /// What became of the event, if this answers one.
    pub ack: Option<Ack>,
    /// The signed checkpoint covering it and the proof to it.
    pub receipt: Option<Receipt>,
    /// The log is restoring ([`AuditLog::hello`]): the source is to send
    /// what it kept from this index on (the stream ends after this).
    pub restore_from: Option<u64>,
}

/// What a stream answers: each acknowledgement in order, or the refusal
/// that ends it.
pub type Answer<F> = Result<Acked, Refusal<F>>;

/// Acknowledgements ready together: those before the first failure, and
/// that failure if any.
fn split_group(group: Vec<Result<Ack, AuditError>>) -> (Vec<Ack>, Option<AuditError>) {
    let mut acks = Vec::with_capacity(group.len());
    for done in group {
        match done {
            Ok(ack) => acks.push(ack),
            Err(error) => return (acks, Some(error)),
        }
    }
    (acks, None)
}

/// Sends `acks` in order, the last with a receipt proven from `base` (then
/// the receipt's size, if larger). A GAP gets one too when it is last: the
/// source learns what audit holds now, and sees a log that lost entries it
/// acknowledged before as a smaller or forked tree. `Ok(false)`
/// when the stream is gone; an error when no checkpoint could be signed
/// (nothing is sent then: the events are durable, and the source resends
/// them as duplicates).
async fn send_group<S: LogStore, F>(
    log: &Arc<AuditLog<S>>,
    acks: Vec<Ack>,
    base: &mut u64,
    tx: &mpsc::Sender<Answer<F>>,
) -> Result<bool, AuditError> {
    let last = acks.len().checked_sub(1);
    let mut receipt = None;
    if last.is_some() {
        let (l, from) = (log.clone(), *base);
        let r = tokio::task::spawn_blocking(move || l.receipt(from))
            .await
            .unwrap_or_else(|e| Err(AuditError::Store(format!("receipt task failed: {e}"))))?;
        *base = (*base).max(r.checkpoint.size);
        receipt = Some(r);
    }
    for (i, ack) in acks.into_iter().enumerate() {
        let receipt = if Some(i) == last {
            receipt.take()
        } else {
            None
        };
        let ack = Some(ack);
        let answer = Acked {
            ack,
            receipt,
            restore_from: None,
        };
        if tx.send(Ok(answer)).await.is_err() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Runs one append stream from `peer` until it ends, answering on `tx`;
/// once `stopping` turns true it ends with [`Refusal::ShuttingDown`] after
/// answering what is durable.
pub async fn run<S: LogStore, F>(
    log: Arc<AuditLog<S>>,
    peer: SpiffeId,
    inbound: impl Stream<Item = Inbound<F>>,
    tx: mpsc::Sender<Answer<F>>,
    stopping: Option<watch::Receiver<bool>>,
) {
    let stop = async move {
        match stopping {
            Some(mut rx) => {
                let _ = rx.wait_for(|s| *s).await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stop);
    let mut inbound = std::pin::pin!(inbound);
    let mut pending = FuturesOrdered::new();
    let mut inbound_open = true;
    let mut failure: Option<Refusal<F>> = None;
    let mut last_seq: Option<u64> = None;
    // Where the next receipt's consistency proof starts.
    let (mut base, mut based) = (0u64, false);
    let mut signed = log.signed_size();
    // A receipt alone is due (hello, or the log grew while idle).
    let mut push = false;
    // The source said hello: it checks receipts and witnesses, so it gets
    // receipts alone. A source that did not (no checkpoint key, or a
    // shipper from before receipts) never does.
    let mut witness = false;
    loop {
        tokio::select! {
            biased;
            Some(done) = pending.next(), if !pending.is_empty() => {
                // The rest of its durable group is ready too.
                let mut group = vec![done];
                while let Some(Some(more)) = pending.next().now_or_never() {
                    group.push(more);
                }
                let (acks, failed) = split_group(group);
                match send_group(&log, acks, &mut base, &tx).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(error) => {
                        failure = Some(Refusal::Log { error, after_seq: None });
                        break;
                    }
                }
                if let Some(error) = failed {
                    failure = Some(Refusal::Log { error, after_seq: None });
                    break;
                }
            }
            item = inbound.next(), if inbound_open && failure.is_none() && pending.len() < PIPELINE => {
                match item {
                    Some(Inbound::Event(signed, known_size)) => {
                        if !based {
                            (base, based) = (known_size, true);
                        }
                        let span = Event::decode(signed.event.as_slice())
                            .map(|e| trace::stored_event_span(&e))
                            .unwrap_or_else(|_| tracing::Span::none());
                        match span.in_scope(|| log.begin_append(&peer, signed)) {
                            Ok(p) => {
                                last_seq = Some(p.seq());
                                let log = log.clone();
                                pending.push_back(async move { log.finish(p).await }.instrument(span));
                            }
                            Err(error) => {
                                tracing::warn!(%peer, "append refused: {error}");
                                failure = Some(Refusal::Log { error, after_seq: last_seq });
                            }
                        }
                    }
                    Some(Inbound::Hello(known_size, known_checkpoint)) => {
                        // Only the first says hello; later ones carry
                        // cosignatures, which grpc has kept already.
                        if !witness {
                            if !based {
                                (base, based) = (known_size, true);
                            }
                            (witness, push) = (true, true);
                            if let Some(from) = log.hello(&peer, &known_checkpoint) {
                                // Restoring: the source sends what it kept
                                // (Restore), then reconnects.
                                let answer = Acked { ack: None, receipt: None, restore_from: Some(from) };
                                if tx.send(Ok(answer)).await.is_err() {
                                    return;
                                }
                                inbound_open = false;
                                push = false;
                            }
                        }
                    }
                    Some(Inbound::Fail(fault)) => {
                        inbound_open = false;
                        failure = Some(Refusal::Stream(fault));
                    }
                    Some(Inbound::End) | None => inbound_open = false,
                }
            }
            Ok(()) = signed.changed(), if witness && inbound_open && pending.is_empty() && failure.is_none() => {
                push = *signed.borrow_and_update() > base;
            }
            () = &mut stop, if failure.is_none() && (inbound_open || !pending.is_empty()) => {
                failure = Some(Refusal::ShuttingDown);
            }
            else => break,
        }
        if failure.is_some() && pending.is_empty() {
            break;
        }
        if std::mem::take(&mut push) && pending.is_empty() && failure.is_none() {
            let (l, from) = (log.clone(), base);
            let receipt = tokio::task::spawn_blocking(move || l.receipt(from))
                .await
                .unwrap_or_else(|e| Err(AuditError::Store(format!("receipt task failed: {e}"))));
            match receipt {
                Ok(r) => {
                    base = base.max(r.checkpoint.size);
                    let answer = Acked {
                        ack: None,
                        receipt: Some(r),
                        restore_from: None,
                    };
                    if tx.send(Ok(answer)).await.is_err() {
                        return;
                    }
                }
                Err(e) => tracing::warn!(%peer, "no receipt for an idle stream: {e}"),
            }
        }
    }
    if let Some(refusal) = failure {
        // Earlier appends are acknowledged first (the last with a receipt);
        // the refusal ends the stream.
        let group: Vec<_> = pending.collect().await;
        let (acks, failed) = split_group(group);
        let failed = match send_group(&log, acks, &mut base, &tx).await {
            Ok(true) => failed,
            Ok(false) => return,
            Err(error) => Some(error),
        };
        let refusal = match failed {
            Some(error) => Refusal::Log {
                error,
                after_seq: None,
            },
            None => refusal,
        };
        let _ = tx.send(Err(refusal)).await;
    }
}

//! One source's stream of appends, pipelined: up to [`PIPELINE`] events are
//! checked and written before the first is durable, so they share a sync;
//! answers go back in order, each only once its event is durable. A refusal
//! ends the stream after everything before it is answered. No gRPC here:
//! `grpc` turns the request stream into [`Inbound`] items and the answers
//! and [`Refusal`] into responses and statuses.

use std::sync::Arc;

use futures::{Stream, StreamExt, stream::FuturesOrdered};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;
use twokey_proto::audit::v1::{Event, SignedEvent};
use twokey_runtime::{SpiffeId, trace};

use crate::{
    error::AuditError,
    service::{Ack, AuditLog},
    store::LogStore,
};

/// Appends of one stream written but not yet acknowledged, at most.
pub const PIPELINE: usize = 64;

/// One item of an append stream, as the transport adapter reads it.
#[derive(Debug)]
pub enum Inbound<F> {
    /// The next event.
    Event(SignedEvent),
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

/// What a stream answers: each acknowledgement in order, or the refusal
/// that ends it.
pub type Answer<F> = Result<Ack, Refusal<F>>;

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
    loop {
        tokio::select! {
            biased;
            Some(done) = pending.next(), if !pending.is_empty() => {
                match done {
                    Ok(ack) => {
                        if tx.send(Ok(ack)).await.is_err() {
                            return;
                        }
                    }
                    Err(error) => {
                        failure = Some(Refusal::Log { error, after_seq: None });
                        break;
                    }
                }
            }
            item = inbound.next(), if inbound_open && failure.is_none() && pending.len() < PIPELINE => {
                match item {
                    Some(Inbound::Event(signed)) => {
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
                    Some(Inbound::Fail(fault)) => {
                        inbound_open = false;
                        failure = Some(Refusal::Stream(fault));
                    }
                    Some(Inbound::End) | None => inbound_open = false,
                }
            }
            () = &mut stop, if failure.is_none() && (inbound_open || !pending.is_empty()) => {
                failure = Some(Refusal::ShuttingDown);
            }
            else => break,
        }
        if failure.is_some() && pending.is_empty() {
            break;
        }
    }
    if let Some(refusal) = failure {
        // Earlier appends are acknowledged first; the refusal ends the stream.
        while let Some(done) = pending.next().await {
            match done {
                Ok(ack) => {
                    if tx.send(Ok(ack)).await.is_err() {
                        return;
                    }
                }
                Err(error) => {
                    let _ = tx
                        .send(Err(Refusal::Log {
                            error,
                            after_seq: None,
                        }))
                        .await;
                    return;
                }
            }
        }
        let _ = tx.send(Err(refusal)).await;
    }
}

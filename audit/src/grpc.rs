//! The thin gRPC layer of `AuditService`: authenticates the caller from its
//! certificate, maps requests to [`AuditLog`] calls, and maps
//! [`AuditError`] to a status in one place.

use std::{pin::Pin, sync::Arc};

use futures::{Stream, StreamExt, stream::FuturesOrdered};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::Instrument;
use twokey_proto::audit::v1::{
    AppendRequest, AppendResponse, Event, GetCheckpointRequest, GetCheckpointResponse,
    GetConsistencyProofRequest, GetConsistencyProofResponse, GetInclusionProofRequest,
    GetInclusionProofResponse, QueryRequest, QueryResponse,
    audit_service_server::{AuditService, AuditServiceServer},
};
use twokey_runtime::{Authenticator, SpiffeId, error::to_status, serve::MAX_MESSAGE_BYTES, trace};

use crate::{
    error::AuditError,
    service::{AuditLog, QueryFilter},
    store::LogStore,
};

/// Appends of one stream written but not yet acknowledged, at most.
const PIPELINE: usize = 64;
/// Entries per query answer message, at most.
const QUERY_BATCH: usize = 100;

impl From<AuditError> for Status {
    fn from(e: AuditError) -> Self {
        to_status(&e)
    }
}

/// The `AuditService` implementation over an [`AuditLog`].
#[derive(Debug)]
pub struct AuditGrpc<S> {
    log: Arc<AuditLog<S>>,
    auth: Authenticator,
    stopping: Option<watch::Receiver<bool>>,
}

impl<S: LogStore> AuditGrpc<S> {
    /// The service for `log`, accepting callers of `auth`'s trust domain.
    pub fn new(log: Arc<AuditLog<S>>, auth: Authenticator) -> Self {
        Self {
            log,
            auth,
            stopping: None,
        }
    }

    /// Ends open Append streams (UNAVAILABLE, after acknowledging what is
    /// durable) once `stopping` turns true, so shutdown never waits on a
    /// connected source.
    pub fn with_shutdown(mut self, stopping: watch::Receiver<bool>) -> Self {
        self.stopping = Some(stopping);
        self
    }

    /// The tonic server with twokey's message size limits.
    pub fn into_server(self) -> AuditServiceServer<Self> {
        AuditServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn auditor<T>(&self, request: &Request<T>) -> Result<SpiffeId, Status> {
        self.auth.authorize(request, "a configured auditor", |id| {
            self.log.is_auditor(id)
        })
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

async fn run_append<S: LogStore>(
    log: Arc<AuditLog<S>>,
    peer: SpiffeId,
    mut inbound: Streaming<AppendRequest>,
    tx: mpsc::Sender<Result<AppendResponse, Status>>,
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
    let mut pending = FuturesOrdered::new();
    let mut inbound_open = true;
    let mut failure: Option<Status> = None;
    let mut last_seq: Option<u64> = None;
    loop {
        tokio::select! {
            biased;
            Some(done) = pending.next(), if !pending.is_empty() => {
                match done {
                    Ok(ack) => {
                        if tx.send(Ok(AppendResponse::from(ack))).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        failure = Some(Status::from(e));
                        break;
                    }
                }
            }
            message = inbound.message(), if inbound_open && failure.is_none() && pending.len() < PIPELINE => {
                match message {
                    Ok(Some(AppendRequest { event: Some(signed) })) => {
                        let span = Event::decode(signed.event.as_slice())
                            .map(|e| trace::stored_event_span(&e))
                            .unwrap_or_else(|_| tracing::Span::none());
                        match span.in_scope(|| log.begin_append(&peer, signed)) {
                            Ok(p) => {
                                last_seq = Some(p.seq());
                                let log = log.clone();
                                pending.push_back(async move { log.finish(p).await }.instrument(span));
                            }
                            Err(e) => {
                                tracing::warn!(%peer, "append refused: {e}");
                                let mut status = Status::from(e);
                                if let (Code::InvalidArgument, Some(n)) = (status.code(), last_seq) {
                                    // Name the place in the stream when the event itself could not say.
                                    if !status.message().contains(" seq ") {
                                        status = Status::invalid_argument(format!(
                                            "{} (the event after seq {n} on this stream)",
                                            status.message()
                                        ));
                                    }
                                }
                                failure = Some(status);
                            }
                        }
                    }
                    Ok(Some(AppendRequest { event: None })) => {
                        failure = Some(Status::invalid_argument("append request without an event"));
                    }
                    Ok(None) => inbound_open = false,
                    Err(status) => {
                        tracing::debug!(%peer, "append stream ended: {status}");
                        inbound_open = false;
                        // An event over the size limit is refused, not dropped silently.
                        let status = twokey_runtime::limits::limit_status(status);
                        if status.code() == Code::ResourceExhausted {
                            failure = Some(status);
                        }
                    }
                }
            }
            () = &mut stop, if failure.is_none() && (inbound_open || !pending.is_empty()) => {
                failure = Some(Status::unavailable("the audit service is shutting down; reconnect and resend"));
            }
            else => break,
        }
        if failure.is_some() && pending.is_empty() {
            break;
        }
    }
    if let Some(status) = failure {
        // Earlier appends are acknowledged first; the refusal ends the stream.
        while let Some(done) = pending.next().await {
            match done {
                Ok(ack) => {
                    if tx.send(Ok(ack.into())).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            }
        }
        let _ = tx.send(Err(status)).await;
    }
}

#[tonic::async_trait]
impl<S: LogStore> AuditService for AuditGrpc<S> {
    type AppendStream = BoxStream<AppendResponse>;
    type QueryStream = BoxStream<QueryResponse>;

    async fn append(
        &self,
        request: Request<Streaming<AppendRequest>>,
    ) -> Result<Response<Self::AppendStream>, Status> {
        let log = self.log.clone();
        let peer = self
            .auth
            .authorize(&request, "a configured audit source", |id| {
                log.is_source(id)
            })?;
        let (tx, rx) = mpsc::channel(PIPELINE);
        tokio::spawn(run_append(
            log,
            peer,
            request.into_inner(),
            tx,
            self.stopping.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn query(
        &self,
        request: Request<QueryRequest>,
    ) -> Result<Response<Self::QueryStream>, Status> {
        let who = self.auditor(&request)?;
        let req = request.into_inner();
        let (filter, mut cursor) = QueryFilter::from_request(&req)?;
        tracing::info!(auditor = %who, "query");
        let log = self.log.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut remaining = match req.page_size {
                0 => usize::MAX,
                n => n as usize,
            };
            loop {
                let (l, f, limit) = (log.clone(), filter.clone(), remaining.min(QUERY_BATCH));
                let batch = tokio::task::spawn_blocking(move || l.query_batch(&f, cursor, limit))
                    .await
                    .unwrap_or_else(|e| Err(AuditError::Store(format!("query task failed: {e}"))));
                let batch = match batch {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                remaining -= batch.entries.len();
                let (last, token) = match batch.next {
                    None => (true, String::new()),
                    Some(next) if remaining == 0 => (true, next.to_string()),
                    Some(next) => {
                        cursor = Some(next);
                        (false, String::new())
                    }
                };
                let response = QueryResponse {
                    entries: batch.entries,
                    next_page_token: token,
                };
                if tx.send(Ok(response)).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_checkpoint(
        &self,
        request: Request<GetCheckpointRequest>,
    ) -> Result<Response<GetCheckpointResponse>, Status> {
        self.auditor(&request)?;
        let cp = self.log.checkpoint()?;
        Ok(Response::new(GetCheckpointResponse {
            checkpoint: cp.note,
            tree_size: cp.size,
            root_hash: cp.root.to_vec(),
        }))
    }

    async fn get_inclusion_proof(
        &self,
        request: Request<GetInclusionProofRequest>,
    ) -> Result<Response<GetInclusionProofResponse>, Status> {
        self.auditor(&request)?;
        let req = request.into_inner();
        let (tree_size, hashes) = self.log.inclusion_proof(req.leaf_index, req.tree_size)?;
        Ok(Response::new(GetInclusionProofResponse {
            leaf_index: req.leaf_index,
            tree_size,
            hashes: hashes.iter().map(|h| h.to_vec()).collect(),
        }))
    }

    async fn get_consistency_proof(
        &self,
        request: Request<GetConsistencyProofRequest>,
    ) -> Result<Response<GetConsistencyProofResponse>, Status> {
        self.auditor(&request)?;
        let req = request.into_inner();
        let (second_size, hashes) = self
            .log
            .consistency_proof(req.first_size, req.second_size)?;
        Ok(Response::new(GetConsistencyProofResponse {
            first_size: req.first_size,
            second_size,
            hashes: hashes.iter().map(|h| h.to_vec()).collect(),
        }))
    }
}

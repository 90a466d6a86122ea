//! The thin gRPC layer of `AuditService`: authenticates the caller from its
//! certificate, adapts request and answer streams (the append pipeline is
//! [`append`](crate::append)), converts messages with
//! [`convert`](crate::convert), and maps [`AuditError`] to a status in one
//! place.

use std::{
    pin::Pin,
    sync::{Arc, OnceLock},
};

use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use twokey_proto::audit::v1::{
    AppendRequest, AppendResponse, GetCheckpointRequest, GetCheckpointResponse,
    GetConsistencyProofRequest, GetConsistencyProofResponse, GetInclusionProofRequest,
    GetInclusionProofResponse, QueryRequest, QueryResponse, RestoreRequest, RestoreResponse,
    audit_service_server::{AuditService, AuditServiceServer},
};
use twokey_runtime::{Authenticator, SpiffeId, error::to_status, serve::MAX_MESSAGE_BYTES};

use crate::{
    append::{self, Inbound, PIPELINE},
    convert::{consistency_response, inclusion_response},
    error::AuditError,
    service::{AuditLog, Query},
    store::LogStore,
};

/// Entries per query answer message, at most.
const QUERY_BATCH: usize = 100;
/// Restore entries taken per step of a Restore call.
const RESTORE_BATCH: usize = 1024;

/// UNAVAILABLE's message while a replica has not opened its log yet (its
/// PostgreSQL database unreachable or being migrated at start).
pub const LOG_NOT_OPEN: &str = "this audit replica has not opened its log yet (its database is \
    unreachable or being migrated): retry, or use another audit address";

/// Where the service finds its log: set once, when the log is open.
pub type LogSlot<S> = Arc<OnceLock<Arc<AuditLog<S>>>>;

impl From<AuditError> for Status {
    fn from(e: AuditError) -> Self {
        to_status(&e)
    }
}

/// The `AuditService` implementation over an [`AuditLog`].
#[derive(Debug)]
pub struct AuditGrpc<S> {
    log: LogSlot<S>,
    auth: Authenticator,
    stopping: Option<watch::Receiver<bool>>,
    finding_readers: std::collections::BTreeSet<SpiffeId>,
    finding_source: Option<SpiffeId>,
}

impl<S: LogStore> AuditGrpc<S> {
    /// The service for `log`, accepting callers of `auth`'s trust domain.
    pub fn new(log: Arc<AuditLog<S>>, auth: Authenticator) -> Self {
        Self::opening(Arc::new(OnceLock::from(log)), auth)
    }

    /// The service for the log `slot` will hold: until it does, every call
    /// answers UNAVAILABLE [`LOG_NOT_OPEN`].
    pub fn opening(slot: LogSlot<S>, auth: Authenticator) -> Self {
        Self {
            log: slot,
            auth,
            stopping: None,
            finding_readers: Default::default(),
            finding_source: None,
        }
    }

    /// Lets `readers` (`[reconcile] readers`: the broker) Query the
    /// findings of the reconciler `source`, an exact `reconcile.<kind>`
    /// action per query, and nothing else: their queries see only that
    /// source's events, so no other source can raise an alert.
    pub fn with_finding_readers(
        mut self,
        readers: std::collections::BTreeSet<SpiffeId>,
        source: Option<SpiffeId>,
    ) -> Self {
        self.finding_readers = readers;
        self.finding_source = source;
        self
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

    /// The open log, or UNAVAILABLE [`LOG_NOT_OPEN`].
    fn log(&self) -> Result<&Arc<AuditLog<S>>, Status> {
        self.log
            .get()
            .ok_or_else(|| Status::unavailable(LOG_NOT_OPEN))
    }

    fn source<T>(&self, request: &Request<T>) -> Result<SpiffeId, Status> {
        let log = self.log()?;
        self.auth
            .authorize(request, "a configured audit source", |id| log.is_source(id))
    }

    fn auditor<T>(&self, request: &Request<T>) -> Result<SpiffeId, Status> {
        let log = self.log()?;
        self.auth
            .authorize(request, "a configured auditor", |id| log.is_auditor(id))
    }
}

/// Whether a query's action is one finding kind (`reconcile.<kind>`).
fn is_finding_query(action: &str) -> bool {
    action
        .strip_prefix(crate::reconcile::ACTION_PREFIX)
        .is_some_and(|kind| !kind.is_empty() && !kind.contains('.'))
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl<S: LogStore> AuditService for AuditGrpc<S> {
    type AppendStream = BoxStream<AppendResponse>;
    type QueryStream = BoxStream<QueryResponse>;

    async fn append(
        &self,
        request: Request<Streaming<AppendRequest>>,
    ) -> Result<Response<Self::AppendStream>, Status> {
        let log = self.log()?.clone();
        let peer = self.source(&request)?;
        let (tx, rx) = mpsc::channel(PIPELINE);
        let who = peer.clone();
        let witness = (log.clone(), peer.clone());
        let inbound = request.into_inner().map(move |message| match message {
            Ok(AppendRequest {
                event,
                known_size,
                cosignature,
                known_checkpoint,
            }) => {
                if !cosignature.is_empty() {
                    // A witness's word: kept if it verifies, never fatal.
                    if let Err(e) = witness.0.add_cosignature(&witness.1, &cosignature) {
                        tracing::warn!(peer = %witness.1, "cosignature not kept: {e}");
                    }
                }
                match event {
                    Some(signed) => Inbound::Event(signed, known_size),
                    None => Inbound::Hello(known_size, known_checkpoint),
                }
            }
            Err(status) => {
                tracing::debug!(peer = %who, "append stream ended: {status}");
                // An event over the size limit is refused, not dropped silently.
                let status = twokey_runtime::limits::limit_status(status);
                if status.code() == Code::ResourceExhausted {
                    Inbound::Fail(status)
                } else {
                    Inbound::End
                }
            }
        });
        tokio::spawn(append::run(log, peer, inbound, tx, self.stopping.clone()));
        let answers = ReceiverStream::new(rx).map(|answer| match answer {
            Ok(acked) => Ok(AppendResponse::from(acked)),
            Err(refusal) => Err(Status::from(refusal)),
        });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn query(
        &self,
        request: Request<QueryRequest>,
    ) -> Result<Response<Self::QueryStream>, Status> {
        let log = self.log()?.clone();
        let who = self
            .auth
            .authorize(&request, "a configured auditor", |id| {
                log.is_auditor(id) || self.finding_readers.contains(id)
            })?;
        let Query {
            mut filter,
            start: mut cursor,
            page_size,
        } = Query::try_from(request.get_ref())?;
        if !log.is_auditor(&who) {
            let source = self.finding_source.as_ref().map(SpiffeId::as_str);
            if !is_finding_query(&filter.action)
                || !(filter.source.is_empty() || Some(filter.source.as_str()) == source)
            {
                return Err(Status::permission_denied(format!(
                    "{who} may read only the reconciler's findings: query one action \
                     reconcile.<kind>, not {:?}",
                    filter.action
                )));
            }
            filter.source = source.unwrap_or_default().to_owned();
        }
        tracing::info!(auditor = %who, "query");
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut remaining = page_size.unwrap_or(usize::MAX);
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
        Ok(Response::new(self.log()?.cosigned_checkpoint()?.into()))
    }

    async fn get_inclusion_proof(
        &self,
        request: Request<GetInclusionProofRequest>,
    ) -> Result<Response<GetInclusionProofResponse>, Status> {
        self.auditor(&request)?;
        let req = request.into_inner();
        let proof = self.log()?.inclusion_proof(req.leaf_index, req.tree_size)?;
        Ok(Response::new(inclusion_response(req.leaf_index, proof)))
    }

    async fn get_consistency_proof(
        &self,
        request: Request<GetConsistencyProofRequest>,
    ) -> Result<Response<GetConsistencyProofResponse>, Status> {
        self.auditor(&request)?;
        let req = request.into_inner();
        let proof = self
            .log()?
            .consistency_proof(req.first_size, req.second_size)?;
        Ok(Response::new(consistency_response(req.first_size, proof)))
    }

    async fn restore(
        &self,
        request: Request<Streaming<RestoreRequest>>,
    ) -> Result<Response<RestoreResponse>, Status> {
        let log = self.log()?.clone();
        let peer = self.source(&request)?;
        let mut stream = request.into_inner();
        let (mut batch, mut accepted) = (Vec::new(), 0);
        loop {
            let item = stream
                .message()
                .await
                .map_err(twokey_runtime::limits::limit_status)?;
            let last = item.is_none();
            if let Some(RestoreRequest { leaf_index, event }) = item {
                let event = event.ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "restore entry at leaf index {leaf_index} has no event; send each kept \
                         event with the index audit acknowledged it at"
                    ))
                })?;
                batch.push((leaf_index, event));
            }
            if last || batch.len() >= RESTORE_BATCH {
                let progress = log
                    .restore_entries(&peer, std::mem::take(&mut batch))
                    .await?;
                accepted += progress.accepted;
                if last {
                    tracing::info!(
                        %peer,
                        accepted,
                        size = progress.size,
                        target = progress.target,
                        "restore entries received"
                    );
                    return Ok(Response::new(RestoreResponse {
                        tree_size: progress.size,
                        target_size: progress.target,
                        accepted,
                        next_missing: progress.next_missing,
                    }));
                }
            }
        }
    }
}

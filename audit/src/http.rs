//! Audit's second listener: HTTP/1.1 and HTTP/2 over mutual TLS
//! (`http_listen`, off by default), for what is not gRPC:
//! `POST /v1/cloudtrail/events`, one EventBridge event (a CloudTrail console
//! sign-in or MFA device call) from an identity in `[reconcile] posters`,
//! kept durably before its `202 Accepted` and then reconciled
//! (docs/RECONCILE.md); and `GET /checkpoint` and `/tile/...`, the log's
//! C2SP `tlog-tiles` read-only ([`crate::tiles_http`]).
//!
//! A connection without a client certificate is refused in the handshake,
//! as on the gRPC listener. Routing is one `match` on method and path that
//! calls a handler function per route, so more routes (GET of log tiles and
//! the checkpoint) are one line and one function each.
//!
//! The accept loop is a small copy of the broker's (`broker/src/http`):
//! that one is tied to the broker's API type and its Connect error format,
//! and moving it to `runtime` would change the broker's HTTP front end too.

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use futures::{Stream, future::BoxFuture};
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};
use hyper::body::{Bytes, Incoming};
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use twokey_runtime::{
    SpiffeId,
    http::HttpLimits,
    identity::identity_of_cert,
    tls::{ClientAuth, ServerTls, TlsError, TlsFiles},
};

use crate::{
    reconcile::{AcceptError, Accepted, Reconciler},
    service::AuditLog,
    store::LogStore,
    tiles_http,
};

/// Where EventBridge events are posted.
pub const EVENTS_PATH: &str = "/v1/cloudtrail/events";
/// The largest body taken: EventBridge's own event size limit.
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// How long a client may take to send the request head, and then the body.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The body of every answer.
pub type Body = BoxBody<Bytes, Infallible>;

/// The mTLS server config of the HTTP listener: audit's certificate, a client
/// certificate from the same CA required in the handshake.
pub fn tls_config(files: &TlsFiles) -> Result<ServerTls, TlsError> {
    files.server_tls_with_alpn(ClientAuth::Required, &[b"h2", b"http/1.1"])
}

/// What the HTTP routes serve.
pub struct HttpApi<S> {
    /// The log (for read routes).
    pub log: Arc<AuditLog<S>>,
    /// The reconciler, when `[reconcile]` is set.
    pub reconciler: Option<Arc<Reconciler<S>>>,
    /// Who may post EventBridge events.
    pub posters: std::collections::BTreeSet<SpiffeId>,
    /// The trust domain of every caller.
    pub trust_domain: String,
    /// The log's tiles and checkpoint (`DATA_DIR/log`), served read-only.
    pub log_dir: std::path::PathBuf,
}

impl<S> std::fmt::Debug for HttpApi<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpApi")
            .field("posters", &self.posters)
            .finish_non_exhaustive()
    }
}

/// The caller of one connection: its SPIFFE ID, or why it has none.
pub type Caller = Result<SpiffeId, String>;

/// A JSON answer `{"error": code, "message": ...}` or any JSON value.
fn json(status: StatusCode, value: &serde_json::Value) -> http::Response<Body> {
    let mut response = http::Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A refusal with a stable code and a message saying what to do.
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> http::Response<Body> {
    json(
        status,
        &serde_json::json!({ "error": code, "message": message.into() }),
    )
}

impl<S: LogStore> HttpApi<S> {
    /// The caller of a connection, from its verified certificate chain.
    fn caller(&self, certs: Option<&[CertificateDer<'_>]>) -> Caller {
        let leaf = certs.and_then(<[_]>::first).ok_or_else(|| {
            "no client certificate: connect with mutual TLS and a certificate from the twokey CA"
                .to_owned()
        })?;
        identity_of_cert(leaf, &self.trust_domain).map_err(|e| e.to_string())
    }

    /// Answers one request: the routing table.
    pub async fn handle<B>(
        &self,
        request: http::Request<B>,
        caller: &Caller,
    ) -> http::Response<Body>
    where
        B: hyper::body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let caller = match caller {
            Ok(id) => id,
            Err(why) => return error(StatusCode::UNAUTHORIZED, "unauthenticated", why.clone()),
        };
        match (request.method(), request.uri().path()) {
            (&Method::POST, EVENTS_PATH) => self.post_event(request, caller).await,
            (_, EVENTS_PATH) => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{EVENTS_PATH} takes POST with one EventBridge event"),
            ),
            (&Method::GET, path) if tiles_http::is_log_path(path) => {
                let reader = self.reader(caller);
                // The files lag the journal by up to an apply interval:
                // a reader sees what gRPC shows.
                if reader != tiles_http::Reader::Stranger
                    && let Err(e) = self.log.apply().await
                {
                    tracing::error!("cannot apply the journal before serving {path}: {e}");
                    return error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "unavailable",
                        "the log's files cannot be brought up to date; try again later",
                    );
                }
                tiles_http::get(&self.log_dir, path, reader).await
            }
            (_, path) if tiles_http::is_log_path(path) => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "the log's checkpoint and tiles are read with GET",
            ),
            (_, path) => error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no route {path}; EventBridge events go to POST {EVENTS_PATH}"),
            ),
        }
    }

    /// What `caller` may read of the log's tiles.
    fn reader(&self, caller: &SpiffeId) -> tiles_http::Reader {
        if self.log.is_auditor(caller) {
            tiles_http::Reader::Auditor
        } else if self.log.is_source(caller) {
            tiles_http::Reader::Witness
        } else {
            tiles_http::Reader::Stranger
        }
    }

    /// `POST /v1/cloudtrail/events`.
    async fn post_event<B>(
        &self,
        request: http::Request<B>,
        caller: &SpiffeId,
    ) -> http::Response<Body>
    where
        B: hyper::body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let Some(reconciler) = &self.reconciler else {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                "the reconciler is off on this audit service: set [reconcile] in its config",
            );
        };
        if !self.posters.contains(caller) {
            tracing::warn!(%caller, "EventBridge post refused: not a poster");
            return error(
                StatusCode::FORBIDDEN,
                "permission_denied",
                format!(
                    "{caller} may not post CloudTrail events: add it to [reconcile] posters of audit"
                ),
            );
        }
        let body = match read_body(request).await {
            Ok(body) => body,
            Err(response) => return response,
        };
        match reconciler.accept_eventbridge(&body).await {
            Ok(Accepted::Kept(id)) => json(
                StatusCode::ACCEPTED,
                &serde_json::json!({ "accepted": true, "eventId": id }),
            ),
            Ok(Accepted::Ignored) => json(
                StatusCode::ACCEPTED,
                &serde_json::json!({ "accepted": false, "reason": "not a record reconciliation reads" }),
            ),
            Err(AcceptError::Invalid(reason)) => error(
                StatusCode::BAD_REQUEST,
                "invalid_argument",
                format!(
                    "not a CloudTrail event reconciliation can read: {reason}; post one EventBridge \
                     event of detail-type \"AWS Console Sign In via CloudTrail\" or \"AWS API Call via CloudTrail\""
                ),
            ),
            Err(e @ AcceptError::State(_)) => {
                tracing::error!("EventBridge post not kept: {e}");
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "cannot keep the event now: post it again later",
                )
            }
        }
    }
}

async fn read_body<B>(request: http::Request<B>) -> Result<Bytes, http::Response<Body>>
where
    B: hyper::body::Body<Data = Bytes> + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "resource_exhausted",
            format!("the body is larger than {MAX_BODY_BYTES} bytes: post one event at a time"),
        )
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let body = Limited::new(request.into_body(), MAX_BODY_BYTES);
    match tokio::time::timeout(READ_TIMEOUT, body.collect()).await {
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            "deadline_exceeded",
            format!(
                "the body did not arrive within {} s",
                READ_TIMEOUT.as_secs()
            ),
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            format!("cannot read the body: {e}"),
        )),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// Serves `api` on the TLS connections of `incoming`
/// (`runtime::serve::incoming`) until `shutdown` resolves, then waits up to
/// 10 s for calls in flight.
pub async fn serve<S, I>(
    api: Arc<HttpApi<S>>,
    incoming: I,
    shutdown: impl Future<Output = ()> + Send,
) where
    S: LogStore,
    I: Stream<Item = Result<TlsStream<TcpStream>, Infallible>> + Send,
{
    let limits = HttpLimits {
        header_read_timeout: READ_TIMEOUT,
        max_concurrent_streams: 64,
        keep_alive: None,
    };
    twokey_runtime::http::serve(incoming, shutdown, limits, move |tls| {
        let caller = Arc::new(api.caller(tls.get_ref().1.peer_certificates()));
        let api = api.clone();
        move |request: http::Request<Incoming>| {
            let api = api.clone();
            let caller = caller.clone();
            let answer: BoxFuture<'static, _> =
                Box::pin(async move { api.handle(request, &caller).await });
            answer
        }
    })
    .await;
}

/// Announces the HTTP listener like the gRPC one, with its own prefix.
pub fn announce(addr: SocketAddr) {
    twokey_runtime::serve::announce("twokey-audit-http", addr);
}

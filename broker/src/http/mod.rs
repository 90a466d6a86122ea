//! The HTTP/JSON front end: the broker API in the Connect protocol's unary
//! JSON convention (`POST /twokey.broker.v1.BrokerService/<Method>`, proto3
//! JSON in and out, Connect error JSON) over HTTP/1.1 and HTTP/2, on its own
//! mTLS listener. Like [`crate::grpc`] it only authenticates the caller from
//! the verified certificate, decodes, calls the same [`Broker`] function and
//! maps [`BrokerError`] through the same `From<BrokerError> for Status`, so
//! every rule has one implementation. The server-streaming `WatchRequests`
//! answers with Server-Sent Events. `GET /openapi.json` serves [`openapi`]'s
//! document.

pub mod openapi;

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use futures::{Stream, StreamExt, future::BoxFuture, stream};
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, StreamBody, combinators::BoxBody};
use hyper::body::{Bytes, Frame, Incoming};
use rustls::pki_types::CertificateDer;
use serde::{Serialize, de::DeserializeOwned};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tonic::{Code, Status};
use tracing::Instrument;
use twokey_proto::broker::v1 as pb;
use twokey_runtime::{
    Authenticator, SpiffeId,
    error::http_status_of,
    http::HttpLimits,
    identity::identity_of_cert,
    serve::MAX_MESSAGE_BYTES,
    tls::{ClientAuth, ServerTls, TlsError, TlsFiles},
    trace,
};

use crate::{convert, error::BrokerError, service::Broker};

/// Path prefix of every method.
pub const PREFIX: &str = "/twokey.broker.v1.BrokerService/";
/// Where the OpenAPI document is served.
pub const OPENAPI_PATH: &str = "/openapi.json";
/// How long a client may take to send the request head, and then the body.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one call may run (as on the gRPC listener); `Connect-Timeout-Ms`
/// may shorten it.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a `WatchRequests` event stream carries a keep-alive comment.
pub const KEEPALIVE: Duration = Duration::from_secs(15);

/// The body of every answer: a whole JSON document, or an event stream.
pub type Body = BoxBody<Bytes, Infallible>;

/// The text a caller without a certificate gets, as on the gRPC listener.
const NO_CERT: &str =
    "no client certificate: connect with mutual TLS and a certificate from the twokey CA";

/// The Connect code and HTTP status of a gRPC code; the status is the one
/// every twokey service gives the code's kind (`runtime::error`).
pub fn connect_code(code: Code) -> (&'static str, StatusCode) {
    let name = match code {
        Code::Ok => "ok",
        other => openapi::CONNECT_CODES[other as usize - 1],
    };
    (name, http_status_of(code))
}

/// A refusal: the HTTP status, the Connect code and the message.
#[derive(Debug)]
struct Failure {
    status: StatusCode,
    code: &'static str,
    message: String,
    headers: Vec<(header::HeaderName, HeaderValue)>,
    /// Not logged: a parse error may quote the body (a PIN sent as a number).
    quiet: bool,
}

impl Failure {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
            quiet: false,
        }
    }

    fn with_header(mut self, name: header::HeaderName, value: &'static str) -> Self {
        self.headers.push((name, HeaderValue::from_static(value)));
        self
    }

    fn into_response(self) -> http::Response<Body> {
        let body = serde_json::json!({ "code": self.code, "message": self.message });
        let mut response = json_response(self.status, body.to_string().into_bytes());
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

/// The one mapping: `BrokerError` → `tonic::Status` (as gRPC answers) → Connect.
impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        let (code, http_status) = connect_code(status.code());
        Self::new(http_status, code, status.message())
    }
}

impl From<BrokerError> for Failure {
    fn from(e: BrokerError) -> Self {
        Status::from(e).into()
    }
}

fn json_response(status: StatusCode, body: Vec<u8>) -> http::Response<Body> {
    let mut response = http::Response::new(Full::new(Bytes::from(body)).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The mTLS server config of the HTTP listener: the broker's certificate, and
/// client certificates verified against the same CA as on the gRPC listener.
/// A client may connect without one (as on the gRPC listener) to read
/// `/openapi.json`; every method then answers 401 `unauthenticated`.
pub fn tls_config(files: &TlsFiles) -> Result<ServerTls, TlsError> {
    files.server_tls_with_alpn(ClientAuth::Optional, &[b"h2", b"http/1.1"])
}

/// The HTTP/JSON API over one [`Broker`].
#[derive(Debug)]
pub struct HttpApi {
    broker: Arc<Broker>,
    auth: Authenticator,
    openapi: Bytes,
}

/// The caller of one connection: its SPIFFE ID, or why it has none.
type Caller = Result<SpiffeId, String>;

impl HttpApi {
    /// Serves `broker`, authenticating callers of `auth`'s trust domain.
    pub fn new(broker: Arc<Broker>, auth: Authenticator) -> Self {
        Self {
            broker,
            auth,
            openapi: Bytes::from(openapi::json_text()),
        }
    }

    /// The caller of a connection, from its verified certificate chain, with
    /// the same trust-domain check as [`Authenticator`].
    fn caller(&self, certs: Option<&[CertificateDer<'_>]>) -> Caller {
        let leaf = certs
            .and_then(<[_]>::first)
            .ok_or_else(|| NO_CERT.to_owned())?;
        identity_of_cert(leaf, self.auth.trust_domain()).map_err(|e| e.to_string())
    }

    /// Answers one HTTP request.
    pub async fn handle<B>(
        &self,
        request: http::Request<B>,
        caller: &Caller,
    ) -> http::Response<Body>
    where
        B: hyper::body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        match self.route(request, caller).await {
            Ok(response) => response,
            Err(failure) => failure.into_response(),
        }
    }

    async fn route<B>(
        &self,
        request: http::Request<B>,
        caller: &Caller,
    ) -> Result<http::Response<Body>, Failure>
    where
        B: hyper::body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = request.uri().path().to_owned();
        if path == OPENAPI_PATH {
            if request.method() != Method::GET && request.method() != Method::HEAD {
                return Err(Failure::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "unimplemented",
                    "use GET for /openapi.json",
                )
                .with_header(header::ALLOW, "GET, HEAD"));
            }
            return Ok(json_response(StatusCode::OK, self.openapi.to_vec()));
        }
        let Some(method) = path.strip_prefix(PREFIX) else {
            if is_procedure(&path) {
                // Another service's procedure: not served here, which gRPC
                // and Connect call `unimplemented`.
                return Err(unimplemented(format!(
                    "{} is not served here: this is twokey.broker.v1.BrokerService; GET {OPENAPI_PATH} lists its methods",
                    &path[1..]
                )));
            }
            return Err(Failure::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "no such path {path:?}: methods are POST {PREFIX}<Method>; GET {OPENAPI_PATH} lists them"
                ),
            ));
        };
        let method = method.to_owned();
        if !UNARY.contains(&method.as_str()) && !STREAMING.contains(&method.as_str()) {
            return Err(unimplemented(format!(
                "no method {method:?} in twokey.broker.v1.BrokerService; GET {OPENAPI_PATH} lists them"
            )));
        }
        if request.method() != Method::POST {
            return Err(Failure::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "unimplemented",
                format!("use POST for {method}"),
            )
            .with_header(header::ALLOW, "POST"));
        }
        let caller = match caller {
            Ok(caller) => caller,
            Err(why) => {
                // Read what the client sends before answering, so it sees
                // the 401 rather than a connection closed mid-upload.
                drain(request.into_body()).await;
                return Err(Failure::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthenticated",
                    why.clone(),
                ));
            }
        };
        check_content_type(request.headers())?;
        check_protocol_version(request.headers())?;
        let deadline = deadline(request.headers())?;
        let (span, trace_id) = trace::server_span(
            &format!("twokey.broker.v1.BrokerService/{method}"),
            request.headers(),
        );
        span.record("otel.name", format!("POST {PREFIX}{method}"));
        span.in_scope(|| trace::record_caller(caller));
        let body = read_body(request).await?;
        if STREAMING.contains(&method.as_str()) {
            return self.watch(caller, &body);
        }
        trace::scope(trace_id, async {
            let result = within(deadline, &method, self.call(&method, caller, &body)).await;
            if let Err(f) = &result {
                if f.quiet {
                    tracing::info!(code = f.code, "refused: malformed JSON");
                } else {
                    tracing::info!(code = f.code, "refused: {}", f.message);
                }
            }
            result.map(|body| json_response(StatusCode::OK, body))
        })
        .instrument(span)
        .await
    }

    /// `WatchRequests` as Server-Sent Events: one `event: <action>` with
    /// `data: <proto3 JSON of WatchRequestsResponse>` per change the caller
    /// may see, a `: keep-alive` comment every [`KEEPALIVE`]; the stream ends
    /// when the broker shuts down.
    fn watch(&self, caller: &SpiffeId, body: &[u8]) -> Result<http::Response<Body>, Failure> {
        let request: pb::WatchRequestsRequest = parse(body)?;
        let changes = convert::watch_requests(&self.broker, caller, request)?;
        let events = changes
            .map(|change| {
                let json = serde_json::to_string(&change).unwrap_or_else(|_| "{}".into());
                let event: String = change.action.chars().filter(|c| !c.is_control()).collect();
                Some(Bytes::from(format!("event: {event}\ndata: {json}\n\n")))
            })
            .chain(stream::once(async { None }));
        let pings = stream::unfold((), |()| async {
            tokio::time::sleep(KEEPALIVE).await;
            Some((Some(Bytes::from_static(b": keep-alive\n\n")), ()))
        });
        let frames = stream::select(events, pings)
            .take_while(|chunk| std::future::ready(chunk.is_some()))
            .filter_map(|chunk| std::future::ready(chunk.map(|c| Ok(Frame::data(c)))));
        let mut response = http::Response::new(BodyExt::boxed(StreamBody::new(frames)));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Ok(response)
    }

    /// Decodes the body, calls the same `convert` function (and so the same
    /// [`Broker`] function) as the gRPC layer, encodes the answer.
    async fn call(&self, method: &str, caller: &SpiffeId, body: &[u8]) -> Result<Vec<u8>, Failure> {
        let b = &*self.broker;
        macro_rules! dispatch {
            (
                unary: [$(($name:ident, $f:ident, $($_u:tt)*)),* $(,)?],
                streaming: [$($_s:tt)*] $(,)?
            ) => {
                match method {
                    $(stringify!($name) => unary(body, |m| convert::$f(b, caller, m)).await,)*
                    other => Err(unimplemented(format!("no method {other:?}"))),
                }
            };
        }
        crate::rpc::broker_rpcs!(dispatch)
    }
}

pub use crate::rpc::{STREAMING, UNARY};

/// Connect's `unimplemented`: 501 in the protocol's table of codes. (A
/// client that gets a 404 *without* a Connect error body infers
/// `unimplemented` too; with a body, the status must match its code.)
fn unimplemented(message: String) -> Failure {
    Failure::from(Status::unimplemented(message))
}

/// Whether `path` has the shape of a Connect procedure,
/// `/<package>.<Service>/<Method>`.
fn is_procedure(path: &str) -> bool {
    let mut parts = path.strip_prefix('/').unwrap_or_default().split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(service), Some(method), None) => {
            let ident = |s: &str| {
                !s.is_empty()
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
            };
            service.contains('.') && ident(service) && ident(method) && !method.contains('.')
        }
        _ => false,
    }
}

/// Runs one call under its deadline: past it, the call is dropped and the
/// answer is Connect's `deadline_exceeded` (504).
async fn within<T>(
    deadline: Duration,
    method: &str,
    call: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    tokio::time::timeout(deadline, call)
        .await
        .unwrap_or_else(|_| {
            Err(Failure::from(Status::deadline_exceeded(format!(
                "{method} did not finish within {} ms",
                deadline.as_millis()
            ))))
        })
}

async fn unary<Req, Resp, F, Fut>(body: &[u8], f: F) -> Result<Vec<u8>, Failure>
where
    Req: DeserializeOwned,
    Resp: Serialize,
    F: FnOnce(Req) -> Fut,
    Fut: Future<Output = Result<Resp, BrokerError>>,
{
    let message: Req = parse(body)?;
    let response = f(message).await?;
    serde_json::to_vec(&response).map_err(|e| {
        Failure::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("cannot encode the answer: {e}"),
        )
    })
}

/// The request message from the proto3 JSON body.
fn parse<Req: DeserializeOwned>(body: &[u8]) -> Result<Req, Failure> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "empty body: send the request as a JSON object, e.g. {}",
        ));
    }
    serde_json::from_slice(body).map_err(|e| Failure {
        quiet: true,
        ..Failure::new(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            format!(
                "malformed JSON for {}: {}",
                std::any::type_name::<Req>()
                    .rsplit("::")
                    .next()
                    .unwrap_or("the request"),
                without_values(&e.to_string())
            ),
        )
    })
}

/// A JSON parse error without the values it quotes: serde names a wrongly
/// typed value between backticks ("invalid type: integer `123456`, expected a
/// string"), and that value may be a PIN or a seed. Field and variant names
/// (unknown field `x`) are kept.
fn without_values(message: &str) -> String {
    let quotes_a_value = ["invalid type: ", "invalid value: ", "invalid length "]
        .iter()
        .any(|p| message.starts_with(p));
    if !quotes_a_value {
        return message.to_owned();
    }
    let mut out = String::with_capacity(message.len());
    let mut parts = message.splitn(3, '`');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(head), Some(_value), Some(tail)) => {
            out.push_str(head);
            out.push_str("(value not shown)");
            out.push_str(tail);
        }
        _ => out.push_str(message),
    }
    out
}

/// `application/json`, optionally with `charset=utf-8`; anything else is 415.
fn check_content_type(headers: &http::HeaderMap) -> Result<(), Failure> {
    let unsupported = |what: String| {
        Failure::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_argument", what).with_header(
            header::HeaderName::from_static("accept-post"),
            "application/json",
        )
    };
    let value = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("(not text)").to_owned());
    let ok = value.as_deref().is_some_and(|v| {
        let mut parts = v.split(';').map(str::trim);
        parts
            .next()
            .is_some_and(|m| m.eq_ignore_ascii_case("application/json"))
            && parts.all(|p| {
                p.is_empty()
                    || p.eq_ignore_ascii_case("charset=utf-8")
                    || p.eq_ignore_ascii_case("charset=\"utf-8\"")
            })
    });
    if !ok {
        return Err(unsupported(format!(
            "unsupported content type {}: send Content-Type: application/json with the proto3 JSON of the request",
            value.map_or("(none)".into(), |v| format!("{v:?}"))
        )));
    }
    if let Some(encoding) = headers.get(header::CONTENT_ENCODING)
        && !encoding.as_bytes().eq_ignore_ascii_case(b"identity")
    {
        return Err(unsupported(format!(
            "unsupported content encoding {encoding:?}: send the body uncompressed"
        )));
    }
    Ok(())
}

/// `Connect-Protocol-Version`, when sent, must be `1`, the only version of
/// the protocol (clients may leave it out).
fn check_protocol_version(headers: &http::HeaderMap) -> Result<(), Failure> {
    match headers.get("connect-protocol-version") {
        None => Ok(()),
        Some(v) if v.as_bytes() == b"1" => Ok(()),
        Some(v) => Err(Failure::new(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            format!(
                "Connect-Protocol-Version {:?} is not supported: send 1, or leave it out",
                v.to_str().unwrap_or("(not text)")
            ),
        )),
    }
}

/// The call's deadline: [`CALL_TIMEOUT`], or `Connect-Timeout-Ms` if
/// shorter. The header, when present, must be what the Connect protocol
/// allows: a positive integer of at most 10 digits.
fn deadline(headers: &http::HeaderMap) -> Result<Duration, Failure> {
    let Some(value) = headers.get("connect-timeout-ms") else {
        return Ok(CALL_TIMEOUT);
    };
    let ms = value
        .to_str()
        .ok()
        .filter(|v| (1..=10).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .ok_or_else(|| {
            Failure::new(
                StatusCode::BAD_REQUEST,
                "invalid_argument",
                "Connect-Timeout-Ms must be a positive whole number of milliseconds, at most 10 digits",
            )
        })?;
    Ok(Duration::from_millis(ms).min(CALL_TIMEOUT))
}

/// How much of a body [`drain`] reads and throws away at most.
pub const DRAIN_LIMIT: usize = 16 * MAX_MESSAGE_BYTES;

/// Reads and discards a body that will not be used (a caller without a
/// certificate), up to [`DRAIN_LIMIT`] bytes and [`READ_TIMEOUT`], so that
/// the answer reaches a client still uploading instead of a connection
/// closed under it (`write EPIPE`). Nothing is kept in memory.
async fn drain<B>(body: B)
where
    B: hyper::body::Body<Data = Bytes> + Send,
{
    let mut body = std::pin::pin!(body);
    let mut seen = 0usize;
    let _ = tokio::time::timeout(READ_TIMEOUT, async {
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, Bytes::len);
            if seen > DRAIN_LIMIT {
                break;
            }
        }
    })
    .await;
}

async fn read_body<B>(request: http::Request<B>) -> Result<Bytes, Failure>
where
    B: hyper::body::Body<Data = Bytes> + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Connect's table: `resource_exhausted` is 429 (not 413), and
    // `deadline_exceeded` 504 (not 408, which invites a retry).
    let too_large = || {
        Failure::from(Status::resource_exhausted(format!(
            "the request body is larger than {MAX_MESSAGE_BYTES} bytes"
        )))
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_MESSAGE_BYTES as u64) {
        return Err(too_large());
    }
    let body = Limited::new(request.into_body(), MAX_MESSAGE_BYTES);
    match tokio::time::timeout(READ_TIMEOUT, body.collect()).await {
        Err(_) => Err(Failure::from(Status::deadline_exceeded(format!(
            "the request body did not arrive within {} s",
            READ_TIMEOUT.as_secs()
        )))),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(Failure::new(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            format!("cannot read the request body: {e}"),
        )),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// Serves `api` on the TLS connections of `incoming` (see
/// `runtime::serve::incoming`) until `shutdown` resolves, then waits up to
/// 10 s for calls in flight.
pub async fn serve<S>(api: Arc<HttpApi>, incoming: S, shutdown: impl Future<Output = ()> + Send)
where
    S: Stream<Item = Result<TlsStream<TcpStream>, Infallible>> + Send,
{
    let limits = HttpLimits {
        header_read_timeout: READ_TIMEOUT,
        max_concurrent_streams: 256,
        keep_alive: Some((Duration::from_secs(30), Duration::from_secs(10))),
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
    twokey_runtime::serve::announce("twokey-broker-http", addr);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: &'static str, value: &'static str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(name, HeaderValue::from_static(value));
        h
    }

    #[tokio::test]
    async fn a_call_past_its_connect_timeout_is_deadline_exceeded_504() {
        let deadline = deadline(&headers("connect-timeout-ms", "250")).unwrap();
        assert_eq!(deadline, Duration::from_millis(250));
        let started = std::time::Instant::now();
        let f = within(
            deadline,
            "ReleaseCode",
            std::future::pending::<Result<(), Failure>>(),
        )
        .await
        .unwrap_err();
        let waited = started.elapsed();
        assert!(
            (Duration::from_millis(250)..Duration::from_secs(5)).contains(&waited),
            "{waited:?}"
        );
        assert_eq!(f.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(f.code, "deadline_exceeded");
        assert_eq!(f.message, "ReleaseCode did not finish within 250 ms");
        // A call that finishes in time answers as it would without one.
        let done = within(deadline, "WhoAmI", async { Ok::<_, Failure>(7) }).await;
        assert_eq!(done.unwrap(), 7);
    }

    #[test]
    fn the_deadline_is_at_most_the_call_timeout() {
        assert_eq!(deadline(&http::HeaderMap::new()).unwrap(), CALL_TIMEOUT);
        let long = deadline(&headers("connect-timeout-ms", "9999999999")).unwrap();
        assert_eq!(long, CALL_TIMEOUT);
    }

    #[test]
    fn procedure_paths_are_told_from_other_paths() {
        for path in [
            "/twokey.vault.v1.VaultService/Enroll",
            "/grpc.health.v1.Health/Check",
        ] {
            assert!(is_procedure(path), "{path}");
        }
        for path in [
            "/nowhere",
            "/",
            "/Service/Method",
            "/a.B/c/d",
            "/a.B/",
            "/a.B/c.d",
            "/a b.C/D",
        ] {
            assert!(!is_procedure(path), "{path}");
        }
    }
}

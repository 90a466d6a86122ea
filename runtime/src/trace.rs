//! W3C trace context across processes. Each incoming call gets a server
//! span (named after its gRPC method) whose parent is the caller's
//! `traceparent`; its trace id is kept in a task-local while the call is
//! handled — so every audit event it emits carries it — and outgoing calls
//! carry the current span in their own `traceparent`. Spans are
//! OpenTelemetry spans through `tracing-opentelemetry` (see
//! [`crate::telemetry`]); without that layer installed, ids are still read
//! from `traceparent` or made fresh.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState},
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use rand::RngCore;
use tonic::metadata::{MetadataMap, MetadataValue};
use tracing::{Instrument, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

tokio::task_local! {
    static TRACE_ID: String;
}

/// The trace id of the call being handled, if any.
pub fn current() -> Option<String> {
    TRACE_ID.try_with(Clone::clone).ok()
}

/// Runs `f` with `trace_id` as the current trace id.
pub async fn scope<F: Future>(trace_id: String, f: F) -> F::Output {
    TRACE_ID.scope(trace_id, f).await
}

/// Spawns `f` on a task of its own that keeps the caller's span and trace
/// id (a task-local, which `tokio::spawn` alone would drop), so that the
/// events it records still carry the call's trace: for work that must run
/// to completion even if the call that started it is dropped.
pub fn spawn_in_call<F>(f: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let f = f.in_current_span();
    match current() {
        Some(trace_id) => tokio::spawn(scope(trace_id, f)),
        None => tokio::spawn(f),
    }
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    hex::encode(buf)
}

/// The trace id of a `traceparent` value (`00-<32 hex>-<16 hex>-<2 hex>`).
pub fn parse_traceparent(value: &str) -> Option<String> {
    let mut parts = value.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let ok = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace != "0".repeat(32)
        && hex(parent, 16)
        && parent != "0".repeat(16)
        && hex(flags, 2);
    ok.then(|| trace.to_owned())
}

/// A fresh `traceparent` (sampled) for a new root: what a client without
/// its own tracing (the `twokey` CLI) sends so that everything one command
/// causes is one trace.
pub fn new_traceparent() -> String {
    format!("00-{}-{}-01", random_hex(16), random_hex(8))
}

/// A client interceptor that sends one `traceparent` on every call, so that
/// all the calls of one process (one `twokey` command) are one trace whose
/// root is that process. [`SendTraceparent::process_root`] honours a
/// `TRACEPARENT` environment variable, so a script or BPM that has a trace
/// can make the command part of it.
#[derive(Debug, Clone)]
pub struct SendTraceparent(MetadataValue<tonic::metadata::Ascii>);

impl SendTraceparent {
    /// Sends `traceparent`, if it is a valid one.
    pub fn new(traceparent: &str) -> Option<Self> {
        parse_traceparent(traceparent)?;
        MetadataValue::try_from(traceparent.trim()).ok().map(Self)
    }

    /// The one root of this process: `TRACEPARENT` from the environment if
    /// valid, else fresh (and then the same for every client it makes).
    pub fn process_root() -> Self {
        static ROOT: std::sync::OnceLock<SendTraceparent> = std::sync::OnceLock::new();
        ROOT.get_or_init(|| {
            std::env::var("TRACEPARENT")
                .ok()
                .and_then(|v| Self::new(&v))
                .or_else(|| Self::new(&new_traceparent()))
                .expect("a fresh traceparent is valid")
        })
        .clone()
    }

    /// The trace id it sends.
    pub fn trace_id(&self) -> String {
        self.0
            .to_str()
            .ok()
            .and_then(parse_traceparent)
            .unwrap_or_default()
    }
}

impl tonic::service::Interceptor for SendTraceparent {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert("traceparent", self.0.clone());
        Ok(request)
    }
}

/// The trace id carried by `headers`, or a fresh one.
pub fn from_headers(headers: &http::HeaderMap) -> String {
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent)
        .unwrap_or_else(|| random_hex(16))
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// The span context of `span`, if it has a valid one (the OpenTelemetry
/// layer is installed and the span is enabled).
pub fn span_context(span: &tracing::Span) -> Option<SpanContext> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// A remote parent with `trace_id` and `span_id` (hex), e.g. from an audit
/// event, as a context to make a span its child.
pub fn remote_parent(trace_id: &str, span_id: &str) -> Option<opentelemetry::Context> {
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    let sc = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    sc.is_valid()
        .then(|| opentelemetry::Context::new().with_remote_span_context(sc))
}

/// The server span for one incoming call of gRPC `method` (the request
/// path without its leading `/`), child of the caller's `traceparent` if
/// it sent one; and the call's trace id. The thin gRPC layers fill in
/// `twokey.caller`, `twokey.request_id` and `twokey.account_id` (see
/// [`record_caller`], [`record_ids`]).
pub fn server_span(method: &str, headers: &http::HeaderMap) -> (tracing::Span, String) {
    let (service, rpc) = method.rsplit_once('/').unwrap_or(("", method));
    let span = tracing::info_span!(
        "rpc",
        otel.name = %method,
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %rpc,
        rpc.grpc.status_code = Empty,
        twokey.caller = Empty,
        twokey.request_id = Empty,
        twokey.account_id = Empty,
        trace_id = Empty,
    );
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let _ = span.set_parent(parent);
    let trace_id = match span_context(&span) {
        Some(sc) => sc.trace_id().to_string(),
        None => from_headers(headers),
    };
    span.record("trace_id", trace_id.as_str());
    (span, trace_id)
}

/// A client span for an outgoing call of gRPC `method`; run the call
/// inside it (`.instrument(span)`) so [`inject`] passes it on.
pub fn client_span(method: &str) -> tracing::Span {
    let (service, rpc) = method.rsplit_once('/').unwrap_or(("", method));
    tracing::info_span!(
        "rpc.client",
        otel.name = %method,
        otel.kind = "client",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %rpc,
    )
}

/// The span in which the audit service stores `event`: a child of the span
/// the event was emitted in (its `trace_id` and `span_id`), so that a
/// release's trace reaches audit although events travel batched on one
/// `Append` stream. A disabled span for events emitted outside any trace.
pub fn stored_event_span(event: &twokey_proto::audit::v1::Event) -> tracing::Span {
    let Some(parent) = remote_parent(&event.trace_id, &event.span_id) else {
        return tracing::Span::none();
    };
    let span = tracing::info_span!(
        "audit.store",
        otel.name = %format!("store {}", event.action),
        otel.kind = "consumer",
        twokey.source = %event.source,
        twokey.seq = event.seq,
        twokey.action = %event.action,
        twokey.request_id = %event.request_id,
        twokey.account_id = %event.account_id,
    );
    let _ = span.set_parent(parent);
    span
}

/// Records the authenticated caller on the current (server) span.
pub fn record_caller(caller: &crate::SpiffeId) {
    tracing::Span::current().record("twokey.caller", caller.to_string());
}

/// Records the request and account a call concerns on the current
/// (server) span; empty values are skipped. Never pass anything secret.
pub fn record_ids(request_id: &str, account_id: &str) {
    let span = tracing::Span::current();
    if !request_id.is_empty() {
        span.record("twokey.request_id", request_id);
    }
    if !account_id.is_empty() {
        span.record("twokey.account_id", account_id);
    }
}

/// Adds `traceparent` for the current span (or, without one, the current
/// trace id and a fresh span id) to outgoing metadata.
pub fn inject(metadata: &mut MetadataMap) {
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(metadata));
        return;
    }
    if let Some(trace_id) = current()
        && let Ok(value) = MetadataValue::try_from(format!("00-{trace_id}-{}-01", random_hex(8)))
    {
        metadata.insert("traceparent", value);
    }
}

/// The server's one tower layer: runs each call inside its server span and
/// the scope of its trace id, answers an over-limit message with
/// RESOURCE_EXHAUSTED (`limits::rewrite_over_limit`), and records the gRPC
/// status of the answer.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceLayer;

impl<S> tower_layer::Layer<S> for TraceLayer {
    type Service = TraceService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TraceService { inner }
    }
}

/// See [`TraceLayer`].
#[derive(Debug, Clone)]
pub struct TraceService<S> {
    inner: S,
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for TraceService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().trim_start_matches('/').to_owned();
        let (span, trace_id) = server_span(&method, request.headers());
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        let recorder = span.clone();
        Box::pin(
            TRACE_ID.scope(
                trace_id,
                async move {
                    let mut result = future.await;
                    if let Ok(response) = &mut result {
                        crate::limits::rewrite_over_limit(response);
                        record_status(&recorder, response.headers());
                    }
                    result
                }
                .instrument(span),
            ),
        )
    }
}

/// Records the gRPC status a response carries in its headers (a
/// trailers-only answer, which is how tonic sends errors).
fn record_status(span: &tracing::Span, headers: &http::HeaderMap) {
    let Some(code) = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return;
    };
    span.record("rpc.grpc.status_code", code);
    if code != 0 {
        span.record("otel.status_code", "ERROR");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_valid_traceparents() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(
            parse_traceparent(&format!("00-{id}-00f067aa0ba902b7-01")).as_deref(),
            Some(id)
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
    }

    /// Runs `f` with a subscriber that makes OpenTelemetry spans (nothing
    /// exported), as `telemetry::init` installs.
    fn with_otel<T>(f: impl FnOnce() -> T) -> T {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, f)
    }

    #[test]
    fn a_server_span_continues_the_callers_trace_and_passes_on_its_own_span() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        let caller_span = "00f067aa0ba902b7";
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "traceparent",
            format!("00-{id}-{caller_span}-01").parse().unwrap(),
        );
        with_otel(|| {
            let (span, trace_id) = server_span("twokey.vault.v1.VaultService/Status", &headers);
            assert_eq!(trace_id, id);
            let own = span_context(&span).expect("a span context");
            assert_eq!(own.trace_id().to_string(), id);
            assert_ne!(own.span_id().to_string(), caller_span);

            let (mut md, event) = span.in_scope(|| {
                let mut md = MetadataMap::new();
                inject(&mut md);
                let event =
                    crate::events::EventDraft::new("spiffe://t/svc/broker", "code.released")
                        .into_event(
                            &crate::SpiffeId::parse("spiffe://t/svc/vault").unwrap(),
                            1,
                            std::time::SystemTime::now(),
                        );
                (md, event)
            });
            let sent = md.remove("traceparent").expect("a traceparent");
            assert_eq!(
                sent.to_str().unwrap(),
                format!("00-{id}-{}-01", own.span_id())
            );
            // The event names the span it was written in, and audit's span
            // for it is that span's child.
            assert_eq!(event.trace_id, id);
            assert_eq!(event.span_id, own.span_id().to_string());
            let stored = span_context(&stored_event_span(&event)).expect("an audit span");
            assert_eq!(stored.trace_id().to_string(), id);
            assert_ne!(stored.span_id(), own.span_id());
        });
    }

    #[test]
    fn without_a_traceparent_a_call_starts_a_new_trace() {
        with_otel(|| {
            let (a, id_a) = server_span("m/A", &http::HeaderMap::new());
            let (_b, id_b) = server_span("m/B", &http::HeaderMap::new());
            assert_eq!(id_a.len(), 32);
            assert_ne!(id_a, id_b);
            assert_eq!(span_context(&a).unwrap().trace_id().to_string(), id_a);
        });
    }

    #[test]
    fn events_outside_any_trace_get_no_audit_span() {
        let event = twokey_proto::audit::v1::Event {
            action: "request.expired".into(),
            ..Default::default()
        };
        with_otel(|| assert!(stored_event_span(&event).is_disabled()));
        let bad = twokey_proto::audit::v1::Event {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            span_id: "not hex".into(),
            ..Default::default()
        };
        with_otel(|| assert!(stored_event_span(&bad).is_disabled()));
    }

    #[test]
    fn the_cli_interceptor_sends_one_valid_traceparent() {
        use tonic::service::Interceptor;
        assert!(SendTraceparent::new("garbage").is_none());
        assert!(
            SendTraceparent::new("00-00000000000000000000000000000000-00f067aa0ba902b7-01")
                .is_none()
        );
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut send = SendTraceparent::new(value).unwrap();
        assert_eq!(send.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let request = send.call(tonic::Request::new(())).unwrap();
        assert_eq!(request.metadata().get("traceparent").unwrap(), value);
        // A fresh root is valid, and one per process.
        assert!(parse_traceparent(&new_traceparent()).is_some());
        assert_eq!(
            SendTraceparent::process_root().trace_id(),
            SendTraceparent::process_root().trace_id()
        );
    }

    #[tokio::test]
    async fn the_trace_id_flows_from_scope_to_outgoing_metadata() {
        assert_eq!(current(), None);
        let id = "4bf92f3577b34da6a3ce929d0e0e4736".to_owned();
        scope(id.clone(), async {
            assert_eq!(current().as_deref(), Some(id.as_str()));
            let mut md = MetadataMap::new();
            inject(&mut md);
            let sent = md.get("traceparent").unwrap().to_str().unwrap().to_owned();
            assert_eq!(parse_traceparent(&sent).as_deref(), Some(id.as_str()));
        })
        .await;
    }
}

//! The trace id that ties one request together across processes: read from
//! the W3C `traceparent` header of each incoming call (or made fresh), kept
//! in a task-local while the call is handled — so every audit event it
//! emits carries it — and passed on in `traceparent` to the next service.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use rand::RngCore;
use tonic::metadata::{MetadataMap, MetadataValue};

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

/// Runs blocking `f` with `trace_id` (if any) as the current trace id: for
/// work done on another thread for a call, such as a group commit.
pub fn sync_scope<R>(trace_id: Option<String>, f: impl FnOnce() -> R) -> R {
    match trace_id {
        Some(id) => TRACE_ID.sync_scope(id, f),
        None => f(),
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
        && hex(flags, 2);
    ok.then(|| trace.to_owned())
}

/// The trace id carried by `headers`, or a fresh one.
pub fn from_headers(headers: &http::HeaderMap) -> String {
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent)
        .unwrap_or_else(|| random_hex(16))
}

/// Adds `traceparent` for the current trace (if any) to outgoing metadata.
pub fn inject(metadata: &mut MetadataMap) {
    if let Some(trace_id) = current()
        && let Ok(value) = MetadataValue::try_from(format!("00-{trace_id}-{}-01", random_hex(8)))
    {
        metadata.insert("traceparent", value);
    }
}

/// A tower layer that runs each call inside the scope of its trace id.
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

impl<S, B> tower_service::Service<http::Request<B>> for TraceService<S>
where
    S: tower_service::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let trace_id = from_headers(request.headers());
        let future = self.inner.call(request);
        Box::pin(TRACE_ID.scope(trace_id, future))
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

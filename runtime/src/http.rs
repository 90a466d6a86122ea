//! The one HTTP accept loop of the services' HTTPS listeners (the broker's
//! JSON API, audit's tiles and EventBridge posts): HTTP/1.1 and HTTP/2 on
//! connections whose TLS handshake `serve::incoming` has done, a deadline
//! on reading the request head, and at shutdown a bounded drain of the calls
//! in flight. What a connection may do is the caller's handler's business.

use std::{convert::Infallible, future::Future, time::Duration};

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_stream::{Stream, StreamExt};

/// How long shutdown waits for calls in flight.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Per-listener HTTP settings.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// How long a client may take to send the request head.
    pub header_read_timeout: Duration,
    /// HTTP/2 streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// HTTP/2 keep-alive pings: every `.0`, answered within `.1`.
    pub keep_alive: Option<(Duration, Duration)>,
}

/// Serves the TLS connections of `incoming` until `shutdown` resolves, then
/// waits up to [`DRAIN_TIMEOUT`] for calls in flight. `per_connection` is
/// called once per connection (it reads the client certificate) and gives
/// the handler of that connection's requests.
pub async fn serve<I, M, H, F, B>(
    incoming: I,
    shutdown: impl Future<Output = ()> + Send,
    limits: HttpLimits,
    mut per_connection: M,
) where
    I: Stream<Item = Result<TlsStream<TcpStream>, Infallible>> + Send,
    M: FnMut(&TlsStream<TcpStream>) -> H + Send,
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut incoming = Box::pin(incoming);
    loop {
        let tls = tokio::select! {
            () = &mut shutdown => break,
            next = incoming.next() => match next {
                Some(Ok(tls)) => tls,
                Some(Err(never)) => match never {},
                None => break,
            },
        };
        let handler = per_connection(&tls);
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let peer = tls.get_ref().0.peer_addr().ok();
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let answer = handler(request);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            let mut http2 = builder.http2();
            http2
                .timer(TokioTimer::new())
                .max_concurrent_streams(limits.max_concurrent_streams);
            if let Some((interval, timeout)) = limits.keep_alive {
                http2
                    .keep_alive_interval(interval)
                    .keep_alive_timeout(timeout);
            }
            let connection = builder.serve_connection(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(connection.into_owned()).await {
                tracing::debug!(?peer, "http connection ended: {e}");
            }
        });
    }
    // Dropping the stream stops accepting and closes the listener.
    drop(incoming);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("http calls still running after {DRAIN_TIMEOUT:?}; stopping anyway");
    }
}

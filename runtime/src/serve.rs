//! Server plumbing shared by the three services: binding, the readiness
//! line, limits, gRPC health and reflection, and shutdown on SIGINT/SIGTERM.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::server::TlsStream;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{server::NamedService, transport::Server};
use tower_layer::{Identity, Stack};

use crate::tls::ServerTls;

/// Largest gRPC message any twokey server accepts or sends.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}; is another process using the port?")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The transport failed.
    #[error("server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Binds a TCP listener, with an error that names the address.
pub async fn bind(addr: &str) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr.to_owned(),
            source,
        })
}

/// Prints the line that tells a supervisor (and the tests) the server is up.
pub fn announce(service: &str, addr: SocketAddr) {
    println!("{service} listening on {addr}");
    tracing::info!(%addr, "{service} listening");
}

/// A server with the call layer (see [`crate::trace::TraceLayer`]).
pub type TracedServer = Server<Stack<crate::trace::TraceLayer, Identity>>;

/// A server builder with twokey's limits: per-request timeout, bounded
/// concurrency per connection, keep-alives, RESOURCE_EXHAUSTED for messages
/// over [`MAX_MESSAGE_BYTES`]; each call runs in the scope of its trace id.
/// TLS comes from [`incoming`].
pub fn server() -> Result<TracedServer, ServeError> {
    Ok(Server::builder()
        .timeout(Duration::from_secs(30))
        .concurrency_limit_per_connection(256)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_nodelay(true)
        .layer(crate::trace::TraceLayer))
}

/// The TLS connections of a bound listener: each accepted socket gets
/// TCP_NODELAY (without it a response in more than one TLS record waits for
/// the peer's delayed ACK, about 40 ms: see docs/BENCHMARKS.md) and its own
/// handshake task, bounded by `tls.handshake_timeout`, so a client that
/// sends nothing or half a ClientHello holds only its own socket until the
/// timeout closes it; failed handshakes (no or a refused certificate, a
/// revoked one, random bytes) close the connection and are logged at debug.
/// Accepting stops when the server drops the stream.
pub fn incoming(
    listener: TcpListener,
    tls: ServerTls,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, Infallible>> + Send + 'static {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, tls, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    tls: ServerTls,
    tx: mpsc::Sender<Result<TlsStream<TcpStream>, Infallible>>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config);
    loop {
        let (tcp, peer) = tokio::select! {
            () = tx.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(tls.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = tx.send(Ok(stream)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

/// gRPC reflection for a server of `S`, in both protocol versions (`v1`, and
/// `v1alpha`, which older grpcurl and grpcio's own client speak): it lists
/// only `S`, health and reflection — not the other twokey services, whose
/// descriptors it still carries for the types they share.
pub fn reflection<S: NamedService>() -> (
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
) {
    const HEALTH: &str = "grpc.health.v1.Health";
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(twokey_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(S::NAME)
            .with_service_name(HEALTH)
    };
    let v1 = builder()
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .build_v1()
        .expect("the embedded descriptor sets are valid")
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let v1alpha = builder()
        .with_service_name("grpc.reflection.v1alpha.ServerReflection")
        .build_v1alpha()
        .expect("the embedded descriptor sets are valid")
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    (v1, v1alpha)
}

/// gRPC health reporting `S` as serving.
pub async fn health<S: NamedService>()
-> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter.set_serving::<S>().await;
    service
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Resolves on SIGINT or SIGTERM.
///
/// The handlers are installed when this is called, not when the future is
/// first polled: call it before the service announces that it listens, so a
/// SIGTERM that follows the listening line at once is a clean shutdown (with
/// the telemetry flushed), never the default action's immediate exit.
/// Must be called inside a tokio runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let signals = {
        use tokio::signal::unix::{SignalKind, signal};
        let int = signal(SignalKind::interrupt()).expect("can install a SIGINT handler");
        let term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
        (int, term)
    };
    async move {
        #[cfg(unix)]
        {
            let (mut int, mut term) = signals;
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
    }
}

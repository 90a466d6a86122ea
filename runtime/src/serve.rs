//! Server plumbing shared by the three services: binding, the readiness
//! line, limits, gRPC health and reflection, and shutdown on SIGINT/SIGTERM.

use std::{net::SocketAddr, time::Duration};

use tokio::net::TcpListener;
use tonic::{
    server::NamedService,
    transport::{Server, ServerTlsConfig},
};
use tower_layer::{Identity, Stack};

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

/// A server with the trace-id layer (see [`crate::trace`]).
pub type TracedServer = Server<Stack<crate::trace::TraceLayer, Identity>>;

/// A server builder with mTLS and twokey's limits: per-request timeout,
/// bounded concurrency per connection, keep-alives; each call runs in the
/// scope of its trace id.
pub fn server(tls: ServerTlsConfig) -> Result<TracedServer, ServeError> {
    Ok(Server::builder()
        .tls_config(tls)?
        .timeout(Duration::from_secs(30))
        .concurrency_limit_per_connection(256)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_nodelay(true)
        .layer(crate::trace::TraceLayer))
}

/// The incoming connection stream of a bound listener, with TCP_NODELAY on
/// every accepted socket. (tonic ignores the builder's `tcp_nodelay` for a
/// caller's own stream; without it a response in more than one TLS record
/// waits for the peer's delayed ACK, about 40 ms: see docs/BENCHMARKS.md.)
pub fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// gRPC reflection for the twokey and health protos.
pub fn reflection() -> tonic_reflection::server::v1::ServerReflectionServer<
    impl tonic_reflection::server::v1::ServerReflection,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(twokey_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor sets are valid")
}

/// gRPC health reporting `S` as serving.
pub async fn health<S: NamedService>()
-> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter.set_serving::<S>().await;
    service
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("can install a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}

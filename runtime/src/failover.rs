//! Several addresses for one peer (`https://a:7443,https://b:7443`): a
//! connector for tonic that opens the TCP connection to the first replica
//! that answers, trying each in turn with its own connect timeout, and on
//! every reconnect starts after the replica it used last, so a dead replica
//! is left behind at the next call. TLS runs on top as for one address:
//! every replica must present the peer's certificate (`server_name`). A call
//! in flight when its replica dies still fails, as tonic reports a broken
//! connection (UNKNOWN "transport error" or UNAVAILABLE, depending on when
//! the connection broke); the next one goes elsewhere.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The addresses of one peer's replicas, in the order they are tried first.
#[derive(Debug, Clone)]
pub struct Failover {
    replicas: Arc<[(String, u16)]>,
    /// The replica the next connection tries first.
    next: Arc<AtomicUsize>,
    per_replica: Duration,
}

/// Splits `https://a:1,https://b:2` into its addresses, trimmed; one address
/// gives one.
pub fn split_addresses(addresses: &str) -> Vec<&str> {
    addresses
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect()
}

impl Failover {
    /// The replicas at `addresses` (each `https://HOST:PORT`, already checked
    /// by `tls::endpoint`), each given `per_replica` to accept a connection.
    pub fn new(addresses: &[&str], per_replica: Duration) -> Result<Self, String> {
        let mut replicas = Vec::with_capacity(addresses.len());
        for address in addresses {
            let uri: http::Uri = address
                .parse()
                .map_err(|_| format!("{address:?} is not an address: write https://HOST:PORT"))?;
            let host = uri
                .host()
                .ok_or_else(|| format!("{address:?} names no host: write https://HOST:PORT"))?
                .trim_matches(['[', ']'])
                .to_owned();
            replicas.push((host, uri.port_u16().unwrap_or(443)));
        }
        if replicas.is_empty() {
            return Err("no address given: write https://HOST:PORT[,https://HOST:PORT…]".into());
        }
        Ok(Self {
            replicas: replicas.into(),
            next: Arc::new(AtomicUsize::new(0)),
            per_replica,
        })
    }

    /// How many replicas there are.
    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    /// Never true: [`Failover::new`] refuses an empty list.
    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    async fn connect(self) -> std::io::Result<TokioIo<TcpStream>> {
        let n = self.replicas.len();
        let first = self.next.load(Ordering::Relaxed) % n;
        let mut failures = Vec::with_capacity(n);
        for i in 0..n {
            let at = (first + i) % n;
            let (host, port) = &self.replicas[at];
            let attempt =
                tokio::time::timeout(self.per_replica, TcpStream::connect((host.as_str(), *port)))
                    .await;
            match attempt {
                Ok(Ok(stream)) => {
                    stream.set_nodelay(true)?;
                    self.next.store(at + 1, Ordering::Relaxed);
                    if i > 0 {
                        tracing::warn!(
                            replica = %format!("{host}:{port}"),
                            skipped = %failures.join("; "),
                            "connected to another replica"
                        );
                    }
                    return Ok(TokioIo::new(stream));
                }
                Ok(Err(e)) => failures.push(format!("{host}:{port}: {e}")),
                Err(_) => failures.push(format!(
                    "{host}:{port}: no answer in {} ms",
                    self.per_replica.as_millis()
                )),
            }
        }
        self.next.store(first + 1, Ordering::Relaxed);
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("no replica answered: {}", failures.join("; ")),
        ))
    }
}

impl tower_service::Service<http::Uri> for Failover {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        Box::pin(self.clone().connect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_split_on_commas_and_parse_host_and_port() {
        assert_eq!(
            split_addresses(" https://a:1 , https://[::1]:2,"),
            ["https://a:1", "https://[::1]:2"]
        );
        let f = Failover::new(&["https://a:1", "https://[::1]:2"], Duration::from_secs(1)).unwrap();
        assert_eq!(&*f.replicas, [("a".into(), 1), ("::1".into(), 2)]);
        assert!(Failover::new(&[], Duration::from_secs(1)).is_err());
    }

    #[tokio::test]
    async fn a_connection_goes_to_the_first_replica_that_answers_then_moves_on() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap();
        let f = Failover::new(
            &[
                &format!("https://{dead_addr}"),
                &format!("https://{live_addr}"),
            ],
            Duration::from_secs(2),
        )
        .unwrap();
        let stream = f.clone().connect().await.unwrap();
        let (_, from) = live.accept().await.unwrap();
        assert_eq!(stream.inner().local_addr().unwrap(), from);
        drop(live);
        let e = f.clone().connect().await.unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("no replica answered: ")
                && text.contains(&dead_addr.to_string())
                && text.contains(&live_addr.to_string()),
            "{text}"
        );
    }
}

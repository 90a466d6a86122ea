//! A client given several replicas of one peer (`https://a,https://b`) over
//! real mTLS: it reaches the first replica that answers, moves on when that
//! one dies, comes back when only the first is up again, and answers
//! UNAVAILABLE, naming every replica, when none answers.

use std::{net::SocketAddr, path::Path, thread::JoinHandle};

use tonic::Code;
use tonic_health::{
    ServingStatus,
    pb::{HealthCheckRequest, health_client::HealthClient},
};
use twokey_runtime::{
    serve,
    tls::{ClientAuth, TlsFiles},
};
use twokey_testkit::pki::{DevCa, LeafSpec};

const TD: &str = "twokey.local";

/// One replica: a health server on a runtime of its own, so that stopping
/// it ends every connection at once, as a dead process would.
struct Replica {
    addr: SocketAddr,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Replica {
    /// Serves health on `addr` (port 0: any), reporting `name` as SERVING.
    fn start(dir: &Path, name: &'static str, addr: SocketAddr) -> Self {
        let files = TlsFiles::in_dir(dir, "vault");
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let (ready, bound) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let tls = files.server_tls(ClientAuth::Required).unwrap();
                let listener = serve::bind(&addr.to_string()).await.unwrap();
                ready.send(listener.local_addr().unwrap()).unwrap();
                let (reporter, health) = tonic_health::server::health_reporter();
                reporter
                    .set_service_status(name, ServingStatus::Serving)
                    .await;
                let server = serve::server()
                    .unwrap()
                    .add_service(health)
                    .serve_with_incoming(serve::incoming(listener, tls));
                tokio::select! {
                    _ = server => {}
                    _ = tokio::task::spawn_blocking(move || stopped.recv()) => {}
                }
            });
            // Dropping the runtime here drops every connection task.
        });
        Self {
            addr: bound.recv().unwrap(),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn kill(mut self) -> SocketAddr {
        let _ = self.stop.take().map(|s| s.send(()));
        self.thread.take().unwrap().join().unwrap();
        self.addr
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pki() -> tempfile::TempDir {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::new(TD).unwrap();
    ca.write(dir.path()).unwrap();
    ca.issue_service(TD, "vault")
        .unwrap()
        .write(dir.path(), "vault")
        .unwrap();
    ca.issue(&LeafSpec::new(&format!("spiffe://{TD}/service/broker")))
        .unwrap()
        .write(dir.path(), "broker")
        .unwrap();
    dir
}

/// Asks health about `service`: Ok(()) when that replica answered SERVING.
async fn ask(
    client: &mut HealthClient<tonic::transport::Channel>,
    service: &str,
) -> Result<(), tonic::Status> {
    client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map(|r| assert_eq!(r.into_inner().status, ServingStatus::Serving as i32))
}

/// The one call that may fail when its replica dies under it: the
/// connection was refused or broke (tonic reports a broken pipe on a
/// connection in use as UNKNOWN "transport error").
fn assert_transport_failure(s: &tonic::Status) {
    assert!(
        s.code() == Code::Unavailable
            || (s.code() == Code::Unknown && s.message() == "transport error"),
        "{s:?}"
    );
}

#[tokio::test]
async fn calls_move_to_a_live_replica_when_one_dies_and_back_when_it_returns() {
    let dir = pki();
    let a = Replica::start(dir.path(), "replica-a", "127.0.0.1:0".parse().unwrap());
    let b = Replica::start(dir.path(), "replica-b", "127.0.0.1:0".parse().unwrap());
    let addresses = format!("https://{}, https://{}", a.addr, b.addr);
    let channel = TlsFiles::in_dir(dir.path(), "broker")
        .channel(&addresses, "vault")
        .unwrap();
    let mut client = HealthClient::new(channel);

    ask(&mut client, "replica-a")
        .await
        .expect("the first replica answers first");
    let a_addr = a.kill();

    // The call in flight on the dead connection may fail; the next reaches b.
    let mut refused = 0;
    loop {
        match ask(&mut client, "replica-b").await {
            Ok(()) => break,
            Err(s) => {
                assert_transport_failure(&s);
                refused += 1;
                assert!(
                    refused <= 1,
                    "more than one call failed after a replica died: {s:?}"
                );
            }
        }
    }
    let e = ask(&mut client, "replica-a").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "b answers, and b is not a: {e:?}");

    // a comes back on its address; b dies: calls go to a again.
    let a = Replica::start(dir.path(), "replica-a", a_addr);
    b.kill();
    let mut refused = 0;
    loop {
        match ask(&mut client, "replica-a").await {
            Ok(()) => break,
            Err(s) => {
                assert_transport_failure(&s);
                refused += 1;
                assert!(refused <= 1, "{s:?}");
            }
        }
    }
    drop(a);
}

#[tokio::test]
async fn no_live_replica_is_unavailable_naming_each() {
    let dir = pki();
    let a = Replica::start(dir.path(), "replica-a", "127.0.0.1:0".parse().unwrap()).kill();
    let b = Replica::start(dir.path(), "replica-b", "127.0.0.1:0".parse().unwrap()).kill();
    let channel = TlsFiles::in_dir(dir.path(), "broker")
        .channel(&format!("https://{a},https://{b}"), "vault")
        .unwrap();
    let e = ask(&mut HealthClient::new(channel), "replica-a")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let text = format!("{e:?}");
    assert!(
        text.contains("no replica answered")
            && text.contains(&a.to_string())
            && text.contains(&b.to_string()),
        "{text}"
    );
}

#[test]
fn every_address_in_a_list_is_checked() {
    let dir = pki();
    let files = TlsFiles::in_dir(dir.path(), "broker");
    let e = files
        .channel("https://127.0.0.1:1,http://127.0.0.1:2", "vault")
        .unwrap_err();
    assert!(e.to_string().contains("http://127.0.0.1:2"), "{e}");
}

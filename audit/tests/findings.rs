//! The reconciler's edges over mTLS (issue 20): the broker may Query one
//! `reconcile.<kind>` action of the reconciler's own source and nothing
//! else; EventBridge posts to the HTTP
//! listener are taken from a poster only (403 otherwise), kept, and
//! reconciled into a signed finding; a client without a certificate is
//! refused in the handshake.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use ed25519_dalek::SigningKey;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;
use twokey_audit::{
    checkpoint::CheckpointSigner,
    config::ReconcileConfig,
    http::{EVENTS_PATH, HttpApi},
    reconcile::{Reconciler, Settings, state::ReconcileState},
    service::{AuditLog, QueryFilter},
    store::SledStore,
};
use twokey_proto::audit::v1::QueryRequest;
use twokey_reconcile::fixture::Record;
use twokey_runtime::{keys::generate_signing_key, serve::incoming, time::SystemClock};

const RECONCILE: &str = "spiffe://twokey.test/svc/reconcile";
const AWS: &str = "111122223333";

fn query(action: &str) -> QueryRequest {
    QueryRequest {
        action: action.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_broker_may_query_findings_and_nothing_else() {
    let mut env = Env::new();
    let key_file = env.path().join("reconcile.key");
    let key = generate_signing_key(&key_file).unwrap();
    env.config
        .sources
        .insert(id(RECONCILE), key.verifying_key());
    env.config.reconcile = Some(ReconcileConfig {
        source_id: id(RECONCILE),
        key_file,
        cloudtrail_dir: None,
        scan_interval: Duration::from_secs(3600),
        delivery_delay: Duration::from_secs(900),
        vault: Some(id(VAULT)),
        posters: Default::default(),
        readers: [id(BROKER)].into(),
    });
    let server = TestServer::start(env.config.clone()).await;
    // Another source writes an event named like a finding: the broker does
    // not see it (only the reconciler's own events are findings); carol does.
    let forged = event(&env.vault(), 1, "reconcile.unexplained");
    let acked = append_all(&mut env.client(server.addr, "vault"), vec![forged])
        .await
        .unwrap();
    assert!(acked.iter().all(Result::is_ok), "{acked:?}");
    let mut broker = env.client(server.addr, "broker");
    for action in ["reconcile.unexplained", "reconcile.out_of_band"] {
        let mut stream = broker.query(query(action)).await.unwrap().into_inner();
        let mut entries = Vec::new();
        while let Some(batch) = stream.message().await.unwrap() {
            entries.extend(batch.entries);
        }
        assert!(entries.is_empty(), "{action}: {entries:?}");
    }
    let mut carol = env.client(server.addr, "carol");
    let mut stream = carol
        .query(query("reconcile.unexplained"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().entries.len(), 1);
    // Naming another source is refused.
    let err = broker
        .query(QueryRequest {
            action: "reconcile.unexplained".into(),
            source: VAULT.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    for action in [
        "code.released",
        "",
        "reconcile.",
        "reconcile.x.y",
        "policy.applied",
    ] {
        let err = broker.query(query(action)).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{action:?}: {err:?}");
        assert!(
            err.message().contains("only the reconciler's findings"),
            "{err:?}"
        );
    }
    // Another service, not a reader: nothing at all.
    let err = env
        .client(server.addr, "intruder")
        .query(query("reconcile.unexplained"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // An auditor still reads everything.
    assert!(
        env.client(server.addr, "carol")
            .query(query(""))
            .await
            .is_ok()
    );
    server.stop().await;
}

#[tokio::test]
async fn an_audit_whose_reconcile_key_is_not_its_listed_source_does_not_start() {
    let mut env = Env::new();
    let key_file = env.path().join("reconcile.key");
    generate_signing_key(&key_file).unwrap();
    env.config.sources.insert(
        id(RECONCILE),
        SigningKey::from_bytes(&[7; 32]).verifying_key(),
    );
    env.config.reconcile = Some(ReconcileConfig {
        source_id: id(RECONCILE),
        key_file,
        cloudtrail_dir: None,
        scan_interval: Duration::from_secs(60),
        delivery_delay: Duration::from_secs(900),
        vault: Some(id(VAULT)),
        posters: Default::default(),
        readers: Default::default(),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = twokey_audit::serve(env.config.clone(), listener, async {})
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("is not the one [[sources]] lists"),
        "{err}"
    );
}

/// A TLS connector for HTTP/1.1 as `name` (or without a certificate).
fn tls(env: &Env, name: Option<&str>) -> tokio_rustls::TlsConnector {
    https_connector(env, name, b"http/1.1")
}

/// Posts `body` as `name`; the status and JSON answer, or the I/O error.
async fn post(
    env: &Env,
    addr: std::net::SocketAddr,
    name: Option<&str>,
    body: Vec<u8>,
) -> std::io::Result<(u16, Value)> {
    let tcp = TcpStream::connect(addr).await?;
    let stream = tls(env, name)
        .connect(ServerName::try_from("audit").unwrap(), tcp)
        .await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let request = http::Request::post(EVENTS_PATH)
        .header("host", "audit")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .map_err(std::io::Error::other)?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    Ok((status, serde_json::from_slice(&bytes).unwrap()))
}

#[tokio::test]
async fn eventbridge_posts_over_mtls_from_a_poster_only_are_kept_and_reconciled() {
    let env = Env::new();
    let key = SigningKey::from_bytes(&[9; 32]);
    let mut sources = env.config.sources.clone();
    sources.insert(id(RECONCILE), key.verifying_key());
    let log = Arc::new(AuditLog::new(
        SledStore::open(&env.path().join("log")).unwrap(),
        sources,
        [id(CAROL)].into(),
        CheckpointSigner::new("twokey.test/audit", SigningKey::from_bytes(&[3; 32])).unwrap(),
        Arc::new(SystemClock),
    ));
    // The vault's policy maps the account.
    let policy = env.vault().sign(
        &twokey_runtime::events::EventDraft::new(
            "spiffe://twokey.test/user/alice",
            "policy.applied",
        )
        .attr("aws_accounts", format!("prod={AWS}/600"))
        .into_event(&id(VAULT), 1, std::time::SystemTime::now()),
    );
    log.append(&id(VAULT), policy).await.unwrap();
    let reconciler = Arc::new(
        Reconciler::new(
            log.clone(),
            ReconcileState::open(&env.path().join("reconcile")).unwrap(),
            Settings {
                source: id(RECONCILE),
                key,
                vault: id(VAULT),
                cloudtrail_dir: None,
                delivery_delay: Duration::from_secs(900),
            },
            Arc::new(SystemClock),
        )
        .unwrap(),
    );
    // The vault's certificate stands in for an EventBridge relay.
    let api = Arc::new(HttpApi {
        log: log.clone(),
        reconciler: Some(reconciler.clone()),
        posters: [id(VAULT)].into(),
        trust_domain: TD.into(),
        log_dir: env.config.data_dir.join("log"),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls_config = twokey_audit::http::tls_config(&env.config.tls).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(twokey_audit::http::serve(
        api,
        incoming(listener, tls_config),
        async {
            let _ = stopped.await;
        },
    ));

    let now = time::OffsetDateTime::now_utc() - Duration::from_secs(60);
    let sign_in = Record::console_login(AWS, now).event_id("ev-posted");
    // Not a poster: 403, and nothing kept.
    let (status, body) = post(&env, addr, Some("intruder"), sign_in.eventbridge())
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "permission_denied");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("[reconcile] posters"),
        "{body}"
    );
    // No certificate: refused in the handshake, no answer at all.
    let refused = post(&env, addr, None, sign_in.eventbridge()).await;
    assert!(
        refused.is_err(),
        "answered without a certificate: {refused:?}"
    );
    // Not CloudTrail: 400 with the reason.
    let (status, body) = post(
        &env,
        addr,
        Some("vault"),
        b"{\"detail-type\":\"x\"}".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("detail-type"),
        "{body}"
    );
    // Over EventBridge's 256 KiB: refused, saying so.
    let (status, body) = post(&env, addr, Some("vault"), vec![b' '; 300 * 1024])
        .await
        .unwrap();
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"], "resource_exhausted");
    // From the poster: 202, then one signed finding.
    let (status, body) = post(&env, addr, Some("vault"), sign_in.eventbridge())
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["eventId"], "ev-posted");
    reconciler.pass().await.unwrap();
    let filter = QueryFilter {
        source: RECONCILE.into(),
        ..QueryFilter::default()
    };
    let found = log.query_batch(&filter, None, 10).unwrap().entries;
    assert_eq!(found.len(), 1);
    let event = found[0].event.as_ref().unwrap();
    assert_eq!(event.action, "reconcile.unexplained");
    assert_eq!(event.attributes["cloudtrail_event_id"], "ev-posted");
    let _ = stop.send(());
    server.await.unwrap();
}

//! The audit service: an append-only Merkle log (RFC 6962 hashing) of events
//! signed by known sources, with signed checkpoints (C2SP signed notes),
//! inclusion and consistency proofs, queries for auditors, and offline
//! verification of exported logs.
//!
//! Domain: [`merkle`], [`checkpoint`], [`head`], [`store`], [`service`], [`append`],
//! [`verify`] — no tonic. Edges: [`grpc`], [`convert`], [`config`], [`cli`]
//! and [`serve`].
#![forbid(unsafe_code)]

pub mod append;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod convert;
pub use twokey_tlog::cosignature;
pub mod error;
pub mod grpc;
pub mod head;
pub mod merkle;
pub mod service;
pub mod store;
pub mod verify;

use std::{future::Future, sync::Arc};

use tokio::net::TcpListener;
use twokey_proto::audit::v1::audit_service_server::AuditServiceServer;
use twokey_runtime::{
    Authenticator,
    keys::load_signing_key,
    serve::{ServeError, announce, health, incoming, reflection, server},
    time::SystemClock,
};

pub use config::AuditConfig;
pub use error::AuditError;
pub use twokey_runtime::start::StartError;

use crate::{
    checkpoint::CheckpointSigner, grpc::AuditGrpc, head::TreeHeadFile, service::AuditLog,
    store::SledStore,
};

/// Serves the audit service on `listener` until `shutdown` resolves.
/// Prints `twokey-audit listening on <addr>` once it accepts connections.
pub async fn serve(
    config: AuditConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let key = load_signing_key(&config.checkpoint_key_file)?;
    let signer = CheckpointSigner::new(&config.origin, key)
        .map_err(|e| StartError::Setting(format!("origin: {e}")))?;
    let tls = config
        .tls
        .server_tls(twokey_runtime::tls::ClientAuth::Required)?;
    let store = SledStore::open(&config.data_dir)?;
    let head =
        TreeHeadFile::load(&config.data_dir, &signer.verifier()).map_err(StartError::refused)?;
    let log = Arc::new(
        AuditLog::new(
            store,
            config.sources.clone(),
            config.auditors.clone(),
            signer,
            Arc::new(SystemClock),
        )
        .with_tree_head(head),
    );
    log.recover().await.map_err(StartError::refused)?;
    tracing::info!(
        entries = log.size(),
        sources = config.sources.len(),
        auditors = config.auditors.len(),
        verifier = %log.signer().verifier(),
        "audit log open"
    );
    watch_restore(&log);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let grpc =
        AuditGrpc::new(log, Authenticator::new(config.trust_domain.clone())).with_shutdown(stop_rx);
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.listen.clone(),
        source,
    })?;
    let (reflection, reflection_v1alpha) = reflection::<AuditServiceServer<AuditGrpc<SledStore>>>();
    let router = server()?
        .add_service(health::<AuditServiceServer<AuditGrpc<SledStore>>>().await)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(grpc.into_server());
    announce("twokey-audit", addr);
    router
        .serve_with_incoming_shutdown(incoming(listener, tls), shutdown)
        .await
        .map_err(ServeError::from)?;
    Ok(())
}

/// A restore under way ([`AuditLog::hello`]) shows on the gauge
/// `twokey.audit.restore.missing` (entries still missing) and at ERROR
/// every minute until it completes.
fn watch_restore(log: &Arc<AuditLog<SledStore>>) {
    let gauge = Arc::downgrade(log);
    twokey_runtime::metrics::meter()
        .u64_observable_gauge("twokey.audit.restore.missing")
        .with_description(
            "entries a restored log still needs from the sources (0 when no restore is under way)",
        )
        .with_unit("{entry}")
        .with_callback(move |g| {
            if let Some(log) = gauge.upgrade() {
                g.observe(log.restore_missing(), &[]);
            }
        })
        .build();
    let alarm = Arc::downgrade(log);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
        every.tick().await;
        loop {
            every.tick().await;
            match alarm.upgrade() {
                Some(log) => {
                    log.restore_alarm();
                }
                None => return,
            }
        }
    });
}

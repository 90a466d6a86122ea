//! The vault: the only process that ever holds a TOTP seed. It stores seeds
//! encrypted, and computes a code only for a single-use grant signed by the
//! broker AND the people's own signed consent (request, approvals, the
//! operator's release) under the admin-signed policy it holds, after the
//! audit service has acknowledged the event recording it. Its root of trust
//! is the admin set its config pins (`[consent]`); its only client is the
//! broker.
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod convert;
pub mod crypto;
pub mod grpc;
pub mod metrics;
pub mod seed;
pub mod service;
pub mod store;
pub mod totp;

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use twokey_proto::vault::v1::vault_service_server::VaultServiceServer;
use twokey_runtime::{
    Authenticator,
    durable::DurableDb,
    events::EventSigner,
    keys::{SecretKey, load_signing_key, parse_public_key},
    outbox::Outbox,
    serve::{self as rt, MAX_MESSAGE_BYTES, ServeError},
    shipper::{ShipperOptions, spawn_shipper_with},
    time::SystemClock,
};

pub use config::VaultConfig;
use service::{AuditWait, Vault};
use store::SledVaultStore;
pub use twokey_runtime::start::StartError;

/// Runs the vault on `listener` until `shutdown` resolves.
pub async fn serve(
    config: VaultConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let root = config.trust_root().map_err(StartError::Setting)?;
    let master = SecretKey::load(&config.master_key_file)?;
    let grant_key = parse_public_key(&config.grant_public_key)?;
    let event_key = load_signing_key(&config.event_key_file)?;
    let source = config
        .source_id()
        .map_err(|e| StartError::Setting(format!("trust_domain: {e}")))?;
    let server_tls = config
        .tls
        .server_tls(twokey_runtime::tls::ClientAuth::Required)?;
    let audit = config
        .tls
        .channel(&config.audit_address, &config.audit_server_name)?;

    let db = DurableDb::open(&config.data_dir)?;
    let clock = Arc::new(SystemClock);
    let outbox = Outbox::open(&db, EventSigner::new(source, event_key), clock.clone())?;
    let receipts = ShipperOptions::from_setting(
        config.audit_checkpoint_key.as_deref(),
        config.audit_keep_days,
    )
    .map_err(StartError::Setting)?;
    let (shipper, shipper_task) = spawn_shipper_with(outbox.clone(), audit, receipts);
    let opened = SledVaultStore::open(&db, outbox)
        .map_err(service::VaultError::from)
        .and_then(|store| {
            Vault::open(
                store,
                crypto::MasterKey::new(master),
                twokey_runtime::grant::GrantVerifier::new(grant_key),
                AuditWait {
                    gate: Arc::new(shipper),
                    timeout: Duration::from_millis(config.audit_ack_timeout_ms),
                },
                clock,
                root,
            )
        });
    let vault = match opened {
        Ok(vault) => Arc::new(vault),
        Err(e) => {
            // Let go of the database before answering: nothing runs.
            shipper_task.abort();
            let _ = shipper_task.await;
            return Err(StartError::refused(e));
        }
    };

    let sweeper = vault.clone();
    let sweeper_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            if let Err(e) = sweeper.sweep() {
                tracing::warn!("sweeping used grants, consent history and kept seeds failed: {e}");
            }
        }
    });

    let grpc = grpc::VaultGrpc::new(
        vault,
        Authenticator::new(config.trust_domain.clone()),
        config.broker_id.clone(),
    );
    let service = VaultServiceServer::new(grpc)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let health = rt::health::<VaultServiceServer<grpc::VaultGrpc<SledVaultStore>>>().await;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.listen.clone(),
        source,
    })?;
    rt::announce("twokey-vault", addr);
    let (reflection, reflection_v1alpha) =
        rt::reflection::<VaultServiceServer<grpc::VaultGrpc<SledVaultStore>>>();
    let served = rt::server()?
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(rt::incoming(listener, server_tls), shutdown)
        .await;
    // Stop the background tasks so the database is released.
    for task in [sweeper_task, shipper_task] {
        task.abort();
        let _ = task.await;
    }
    served.map_err(ServeError::from)?;
    Ok(())
}

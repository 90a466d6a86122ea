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
pub mod hsm;
pub mod keyring;
pub mod master;
pub mod memlock;
pub mod metrics;
pub mod rotate;
pub mod seed;
pub mod service;
pub mod store;
pub mod totp;
pub mod unseal;

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use twokey_proto::vault::v1::{
    key_service_server::KeyServiceServer, seal_service_server::SealServiceServer,
    vault_service_server::VaultServiceServer,
};
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

/// What the vault is opened with once its key is known (kept, and cloned
/// for each unseal: a sealed vault opens again).
#[derive(Clone)]
struct Parts {
    store: SledVaultStore,
    grants: twokey_runtime::grant::GrantVerifier,
    audit: AuditWait,
    clock: Arc<SystemClock>,
    root: twokey_consent::TrustRoot,
    /// Writes a new master key's seal material (each rotation replaces
    /// the master key).
    seal: Arc<dyn master::MasterSeal>,
}

impl Parts {
    /// Opens the vault with `key` (the current master key, or the pending
    /// one whose seal material was written before a stop: promoted), then
    /// finishes a master key replacement a stop interrupted before its
    /// seal material was written. If that fails the vault serves under the
    /// current key and says so.
    async fn open(
        self,
        key: crypto::MasterKey,
    ) -> Result<Vault<SledVaultStore>, service::VaultError> {
        // The rotation's pace: TWOKEY_VAULT_ROTATION_BATCH and
        // TWOKEY_VAULT_ROTATION_PAUSE_MS (a throttle), else the defaults.
        let pace =
            rotate::RotationPace::from_env().map_err(service::VaultError::InvalidArgument)?;
        let vault = Vault::open(
            self.store,
            key,
            self.grants,
            self.audit,
            self.clock,
            self.root,
        )?
        .with_rotation_pace(pace)
        .with_master_seal(self.seal);
        if let Err(e) = vault.resume_master().await {
            tracing::error!("{e}");
        }
        Ok(vault)
    }
}

type Served = VaultServiceServer<grpc::VaultGrpc<SledVaultStore>>;

/// Sweeps used grants, consent history and kept seeds every minute, and
/// first resumes a key rotation a stop interrupted; the rotation worker
/// is stopped with this task (at a seal or shutdown).
fn spawn_sweeper(vault: Arc<Vault<SledVaultStore>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let _worker = rotate::StopsWorker(vault.clone());
        if let Err(e) = vault.resume_rotation().await {
            tracing::error!("cannot resume the key rotation: {e}");
        }
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            if let Err(e) = vault.sweep() {
                tracing::warn!("sweeping used grants, consent history and kept seeds failed: {e}");
            }
        }
    })
}

/// The unsealer of a `[seal]` config, or `None` in the file and `pkcs11`
/// modes.
fn unsealer(config: &VaultConfig) -> Result<Option<Arc<unseal::Unsealer>>, StartError> {
    let Some(seal) = &config.seal else {
        return Ok(None);
    };
    seal.check().map_err(StartError::Setting)?;
    if seal.mode == hsm::MODE {
        return Ok(None);
    }
    let timeout = seal.timeout().map_err(StartError::Setting)?;
    let descriptor = unseal::Descriptor::load(&seal.descriptor)
        .map_err(|e| StartError::Setting(e.to_string()))?;
    Ok(Some(Arc::new(
        unseal::Unsealer::new(descriptor, timeout).with_descriptor_file(seal.descriptor.clone()),
    )))
}

/// The master key of the file mode (`master_key_file`), or of the `pkcs11`
/// mode: unwrapped by the HSM at start, held only in memory.
async fn master_key(config: &VaultConfig) -> Result<SecretKey, StartError> {
    let Some(seal) = config.seal.clone().filter(|s| s.mode == hsm::MODE) else {
        return Ok(SecretKey::load(&config.master_key_file)?);
    };
    let settings = seal.pkcs11().map_err(StartError::Setting)?;
    let key = tokio::task::spawn_blocking(move || {
        let descriptor = hsm::Descriptor::load(&seal.descriptor)?;
        hsm::unwrap(&settings, &descriptor, &seal.descriptor)
    })
    .await
    .map_err(StartError::refused)?
    .map_err(StartError::refused)?;
    tracing::info!("pkcs11: the master key was unwrapped by the HSM");
    Ok(key)
}

/// Runs the vault on `listener` until `shutdown` resolves. In the `file`
/// seal mode it serves at once; in `shamir` mode it starts sealed (health
/// NOT_SERVING, every call but `Status` UNAVAILABLE) until K holders have
/// submitted their shares to the `SealService`.
pub async fn serve(
    config: VaultConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let root = config.trust_root().map_err(StartError::Setting)?;
    let seal = unsealer(&config)?;
    let master = match seal {
        None => Some(master_key(&config).await?),
        Some(_) => None,
    };
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

    let master_seal: Arc<dyn master::MasterSeal> = match (&seal, config.seal.as_ref()) {
        (Some(unsealer), _) => Arc::new(master::ShamirSeal(unsealer.clone())),
        (None, Some(s)) if s.mode == hsm::MODE => Arc::new(master::HsmSeal {
            settings: s.pkcs11().map_err(StartError::Setting)?,
            path: s.descriptor.clone(),
        }),
        (None, _) => Arc::new(master::FileSeal {
            path: config.master_key_file.clone(),
        }),
    };
    let db = DurableDb::open(&config.data_dir)?;
    let clock = Arc::new(SystemClock);
    let outbox = Outbox::open(&db, EventSigner::new(source, event_key), clock.clone())?;
    let receipts = ShipperOptions::from_setting(
        config.audit_checkpoint_key.as_deref(),
        config.audit_keep_days,
    )
    .map_err(StartError::Setting)?;
    let (shipper, shipper_task) = spawn_shipper_with(outbox.clone(), audit, receipts);
    let parts = SledVaultStore::open(&db, outbox.clone()).map(|store| Parts {
        store,
        grants: twokey_runtime::grant::GrantVerifier::new(grant_key),
        audit: AuditWait {
            gate: Arc::new(shipper),
            timeout: Duration::from_millis(config.audit_ack_timeout_ms),
        },
        clock,
        root,
        seal: master_seal,
    });
    let opened = match (parts, master) {
        (Err(e), _) => Err(service::VaultError::from(e)),
        (Ok(parts), Some(master)) => parts
            .open(crypto::MasterKey::new(master))
            .await
            .map(|v| (Some(Arc::new(v)), None)),
        (Ok(parts), None) => Ok((None, Some(parts))),
    };
    let (vault, parts) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            // Let go of the database before answering: nothing runs.
            shipper_task.abort();
            let _ = shipper_task.await;
            return Err(StartError::refused(e));
        }
    };

    let (health_reporter, health) = tonic_health::server::health_reporter();
    let health = health
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let sweeper_task: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>> = Arc::default();
    let auth = Authenticator::new(config.trust_domain.clone());
    let slot: grpc::VaultSlot<SledVaultStore> = Arc::default();
    // Sealing stops the sweeper (it holds the vault) and reports NOT_SERVING.
    let on_seal: grpc::OnSeal = {
        let sweeper_task = sweeper_task.clone();
        let reporter = health_reporter.clone();
        Box::new(move || {
            let sweeper = sweeper_task
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            let reporter = reporter.clone();
            Box::pin(async move {
                if let Some(task) = sweeper {
                    task.abort();
                    let _ = task.await;
                }
                reporter.set_not_serving::<Served>().await;
            })
        })
    };
    let keys = KeyServiceServer::new(grpc::KeyGrpc::new(slot.clone(), auth.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (grpc, seal) = match (vault, seal, parts) {
        (Some(vault), _, _) => {
            health_reporter.set_serving::<Served>().await;
            *sweeper_task.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(spawn_sweeper(vault.clone()));
            slot.set(vault);
            let on_unseal: grpc::OnUnseal =
                Box::new(|_| Box::pin(async { Err("no unsealer in this mode".to_owned()) }));
            (
                grpc::VaultGrpc::with_slot(slot.clone(), auth.clone(), config.broker_id.clone()),
                grpc::SealGrpc::new(None, slot, auth, outbox, on_unseal, on_seal),
            )
        }
        (None, Some(seal), Some(parts)) => {
            health_reporter.set_not_serving::<Served>().await;
            let progress = seal.progress(std::time::Instant::now()).0;
            tracing::warn!("{}", progress.sealed_message());
            let on_unseal: grpc::OnUnseal = {
                let slot = slot.clone();
                let sweeper_task = sweeper_task.clone();
                Box::new(move |key| {
                    let parts = parts.clone();
                    let slot = slot.clone();
                    let sweeper_task = sweeper_task.clone();
                    let reporter = health_reporter.clone();
                    Box::pin(async move {
                        let vault = Arc::new(parts.open(key).await.map_err(|e| e.to_string())?);
                        slot.set(vault.clone());
                        *sweeper_task.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(spawn_sweeper(vault));
                        reporter.set_serving::<Served>().await;
                        Ok(())
                    })
                })
            };
            (
                grpc::VaultGrpc::sealed(
                    slot.clone(),
                    seal.clone(),
                    auth.clone(),
                    config.broker_id.clone(),
                ),
                grpc::SealGrpc::new(Some(seal), slot, auth, outbox, on_unseal, on_seal),
            )
        }
        _ => unreachable!("a vault without a key has an unsealer"),
    };
    let seal_service = SealServiceServer::new(seal)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let service = VaultServiceServer::new(grpc)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.listen.clone(),
        source,
    })?;
    rt::announce("twokey-vault", addr);
    let (reflection, reflection_v1alpha) = rt::reflection::<Served>();
    let served = rt::server()?
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .add_service(seal_service)
        .add_service(keys)
        .serve_with_incoming_shutdown(rt::incoming(listener, server_tls), shutdown)
        .await;
    // Stop the background tasks so the database is released.
    let sweeper = sweeper_task
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    for task in sweeper.into_iter().chain([shipper_task]) {
        task.abort();
        let _ = task.await;
    }
    served.map_err(ServeError::from)?;
    Ok(())
}

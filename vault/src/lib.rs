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
use service::{AuditGate, AuditWait, Vault};
use store::{SledVaultStore, VaultStore};
pub use twokey_runtime::start::StartError;

/// What the vault is opened with once its key is known (kept, and cloned
/// for each unseal: a sealed vault opens again).
#[derive(Clone)]
struct Parts<S> {
    store: S,
    grants: twokey_runtime::grant::GrantVerifier,
    audit: AuditWait,
    clock: Arc<SystemClock>,
    root: twokey_consent::TrustRoot,
    /// Writes a new master key's seal material (each rotation replaces
    /// the master key).
    seal: Arc<dyn master::MasterSeal>,
}

impl<S: VaultStore> Parts<S> {
    /// Opens the vault with `key` (the current master key, or the pending
    /// one whose seal material was written before a stop: promoted), then
    /// finishes a master key replacement a stop interrupted before its
    /// seal material was written. If that fails the vault serves under the
    /// current key and says so.
    async fn open(self, key: crypto::MasterKey) -> Result<Vault<S>, service::VaultError> {
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

/// The health service's name for the vault (the same for every store).
type Served = VaultServiceServer<grpc::VaultGrpc<SledVaultStore>>;

/// Sweeps used grants, consent history and kept seeds every minute, and
/// first resumes a key rotation a stop interrupted; the rotation worker
/// is stopped with this task (at a seal or shutdown).
fn spawn_sweeper<S: VaultStore>(vault: Arc<Vault<S>>) -> tokio::task::JoinHandle<()> {
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

/// What a vault's parts share, whatever the store.
#[derive(Clone)]
struct Shared {
    grants: twokey_runtime::grant::GrantVerifier,
    clock: Arc<SystemClock>,
    root: twokey_consent::TrustRoot,
    seal: Arc<dyn master::MasterSeal>,
    ack_timeout: Duration,
}

impl Shared {
    /// The parts of a vault on `store`, waiting for `gate` before a release.
    fn parts<S>(self, store: S, gate: Arc<dyn AuditGate>) -> Parts<S> {
        Parts {
            store,
            grants: self.grants,
            audit: AuditWait {
                gate,
                timeout: self.ack_timeout,
            },
            clock: self.clock,
            root: self.root,
            seal: self.seal,
        }
    }
}

/// What every start needs, whatever the store.
struct Start {
    shared: Shared,
    /// The unsealer (`shamir` mode).
    seal: Option<Arc<unseal::Unsealer>>,
    /// The master key, known at start in the `file` and `pkcs11` modes.
    master: Option<SecretKey>,
    source: twokey_runtime::SpiffeId,
    event_key: ed25519_dalek::SigningKey,
    server_tls: twokey_runtime::tls::ServerTls,
    audit: tonic::transport::Channel,
    receipts: ShipperOptions,
    clock: Arc<SystemClock>,
}

impl Start {
    async fn load(config: &VaultConfig) -> Result<Self, StartError> {
        let root = config.trust_root().map_err(StartError::Setting)?;
        let seal = unsealer(config)?;
        let master = match seal {
            None => Some(master_key(config).await?),
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
        let audit_peer = config
            .tls
            .peer(&config.audit_address, &config.audit_server_name)?;
        let audit = audit_peer.channel();
        let receipts = ShipperOptions {
            reconnect: Some(audit_peer),
            ..ShipperOptions::from_setting(
                config.audit_checkpoint_key.as_deref(),
                config.audit_keep_days,
            )
            .map_err(StartError::Setting)?
        };
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
        let clock = Arc::new(SystemClock);
        Ok(Self {
            shared: Shared {
                grants: twokey_runtime::grant::GrantVerifier::new(grant_key),
                clock: clock.clone(),
                root,
                seal: master_seal,
                ack_timeout: Duration::from_millis(config.audit_ack_timeout_ms),
            },
            seal,
            master,
            source,
            event_key,
            server_tls,
            audit,
            receipts,
            clock,
        })
    }

    fn signer(&self) -> EventSigner {
        EventSigner::new(self.source.clone(), self.event_key.clone())
    }
}

/// Runs the vault on `listener` until `shutdown` resolves. In the `file`
/// seal mode it serves at once; in `shamir` mode it starts sealed (health
/// NOT_SERVING, every call but `Status` UNAVAILABLE) until K holders have
/// submitted their shares to the `SealService`. On PostgreSQL
/// (`[store] backend = "postgres"`) it also reports NOT_SERVING, and
/// answers UNAVAILABLE, until its database is migrated and open.
pub async fn serve(
    config: VaultConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let postgres = config
        .store
        .postgres()
        .map_err(StartError::Setting)?
        .cloned();
    let start = Start::load(&config).await?;
    match postgres {
        None => serve_sled(config, start, listener, shutdown).await,
        Some(settings) => serve_postgres(config, settings, start, listener, shutdown).await,
    }
}

/// The vault on sled in `data_dir`, shipping its own outbox.
async fn serve_sled(
    config: VaultConfig,
    start: Start,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let db = DurableDb::open(&config.data_dir)?;
    let outbox = Outbox::open(&db, start.signer(), start.clock.clone())?;
    let (shipper, shipper_task) =
        spawn_shipper_with(outbox.clone(), start.audit.clone(), start.receipts.clone());
    let parts = SledVaultStore::open(&db, outbox.clone())
        .map(|store| start.shared.clone().parts(store, Arc::new(shipper)))
        .map_err(StartError::refused);
    let served = match parts {
        Ok(parts) => {
            let ready = Box::pin(async move { Ok(parts) });
            serve_store(
                &config,
                start,
                Opening::Now(ready),
                Arc::new(outbox),
                listener,
                shutdown,
            )
            .await
        }
        Err(e) => Err(e),
    };
    // Stop shipping so the database is released.
    shipper_task.abort();
    let _ = shipper_task.await;
    served
}

/// How long a replica waits before it tries its database again at start.
const MIGRATE_RETRY: Duration = Duration::from_secs(1);

/// The vault on PostgreSQL: serving (NOT_SERVING) at once, the store
/// opened once the database is migrated; the replica holding the shipping
/// lease ships every replica's events.
async fn serve_postgres(
    config: VaultConfig,
    settings: twokey_pgstore::PgSettings,
    start: Start,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let signer = Arc::new(start.signer());
    let clock: Arc<dyn twokey_runtime::time::Clock> = start.clock.clone();
    // Competing for the shipping lease starts once the outbox's tables
    // exist (the first migration).
    let leased: Arc<std::sync::Mutex<Option<twokey_pgstore::outbox::Leased>>> = Arc::default();
    let events = store::postgres::PgEvents::default();
    let ready = {
        let events = events.clone();
        let shared = start.shared.clone();
        let (channel, options) = (start.audit.clone(), start.receipts.clone());
        let leased = leased.clone();
        Box::pin(async move {
            loop {
                let opened = async {
                    store::postgres::migrate(&settings)
                        .await
                        .map_err(|e| e.to_string())?;
                    {
                        let mut lease = leased.lock().unwrap_or_else(|e| e.into_inner());
                        if lease.is_none() {
                            let (channel, options) = (channel.clone(), options.clone());
                            *lease = Some(twokey_pgstore::outbox::spawn_leased(
                                settings.clone(),
                                signer.clone(),
                                clock.clone(),
                                move |outbox| {
                                    spawn_shipper_with(outbox, channel.clone(), options.clone()).1
                                },
                            ));
                        }
                    }
                    store::postgres::PgVaultStore::open(
                        settings.clone(),
                        signer.clone(),
                        clock.clone(),
                    )
                    .await
                    .map_err(|e| e.to_string())
                };
                match opened.await {
                    Ok(store) => {
                        let _ = events.0.set(store.outbox());
                        tracing::info!("the vault's PostgreSQL schema is migrated and open");
                        let gate = Arc::new(store.audit_gate());
                        return Ok(shared.parts(store, gate));
                    }
                    Err(e) => tracing::warn!(
                        "waiting for the vault's database: {e}; NOT_SERVING, trying again in {} s",
                        MIGRATE_RETRY.as_secs()
                    ),
                }
                tokio::time::sleep(MIGRATE_RETRY).await;
            }
        }) as futures::future::BoxFuture<'static, _>
    };
    let served = serve_store(
        &config,
        start,
        Opening::Later(ready),
        Arc::new(events),
        listener,
        shutdown,
    )
    .await;
    let leased = leased.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(leased) = leased {
        leased.stop().await;
    }
    served
}

/// The store's parts: ready before serving (sled), or once the database
/// answers (PostgreSQL; the vault serves NOT_SERVING meanwhile).
enum Opening<S> {
    Now(futures::future::BoxFuture<'static, Result<Parts<S>, StartError>>),
    Later(futures::future::BoxFuture<'static, Result<Parts<S>, StartError>>),
}

/// How often a vault on PostgreSQL tries to open before it stops.
const OPEN_TRIES: u32 = 3;

/// What calls hear while a PostgreSQL vault's database is not ready.
const DATABASE_NOT_READY: &str = "the vault's database is not ready (unreachable or being \
     migrated); retry, through another vault replica if this one stays NOT_SERVING";

/// Serves the vault on the store `opening` gives.
async fn serve_store<S: VaultStore + Clone>(
    config: &VaultConfig,
    start: Start,
    opening: Opening<S>,
    events: Arc<dyn grpc::EventSink>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let health = health
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    health_reporter.set_not_serving::<Served>().await;
    let sweeper_task: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>> = Arc::default();
    let auth = Authenticator::new(config.trust_domain.clone());
    let slot: grpc::VaultSlot<S> = Arc::default();
    // The parts a share-holders' unseal opens (shamir mode), once known.
    let sealed_parts: Arc<std::sync::OnceLock<Parts<S>>> = Arc::default();
    // Opens the vault when its key is known, or keeps the parts for the
    // unseal; then serves.
    let open = {
        let (slot, sweeper_task, reporter) =
            (slot.clone(), sweeper_task.clone(), health_reporter.clone());
        let sealed_parts = sealed_parts.clone();
        let master = start.master;
        let unsealer = start.seal.clone();
        move |parts: Result<Parts<S>, StartError>, mut tries: u32| async move {
            let parts = parts?;
            match master {
                Some(master) => {
                    let key = crypto::MasterKey::new(master);
                    // Replicas opening an empty database at once: one
                    // writes the keyring's first generation, the other is
                    // refused once and finds it there the next time.
                    let vault = loop {
                        match parts.clone().open(key.clone()).await {
                            Ok(vault) => break Arc::new(vault),
                            Err(e) if tries > 1 => {
                                tries -= 1;
                                tracing::warn!("cannot open the vault yet: {e}; trying again");
                                tokio::time::sleep(MIGRATE_RETRY).await;
                            }
                            Err(e) => return Err(StartError::refused(e)),
                        }
                    };
                    slot.set(vault.clone());
                    slot.set_waiting(None);
                    *sweeper_task.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(spawn_sweeper(vault));
                    reporter.set_serving::<Served>().await;
                }
                None => {
                    let _ = sealed_parts.set(parts);
                    slot.set_waiting(None);
                    if let Some(seal) = unsealer {
                        let progress = seal.progress(std::time::Instant::now()).0;
                        tracing::warn!("{}", progress.sealed_message());
                    }
                }
            }
            Ok::<(), StartError>(())
        }
    };
    // A PostgreSQL vault that cannot open (a wrong master key, say) stops
    // with the error, as a sled vault does before it serves.
    let (fail, failed) = tokio::sync::oneshot::channel::<StartError>();
    let opening_task = match opening {
        Opening::Now(parts) => {
            open(parts.await, 1).await?;
            None
        }
        Opening::Later(parts) => {
            slot.set_waiting(Some(DATABASE_NOT_READY.to_owned()));
            Some(tokio::spawn(async move {
                if let Err(e) = open(parts.await, OPEN_TRIES).await {
                    let _ = fail.send(e);
                }
            }))
        }
    };

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
    let (grpc, seal) = match start.seal {
        None => {
            let on_unseal: grpc::OnUnseal =
                Box::new(|_| Box::pin(async { Err("no unsealer in this mode".to_owned()) }));
            (
                grpc::VaultGrpc::with_slot(slot.clone(), auth.clone(), config.broker_id.clone()),
                grpc::SealGrpc::new(None, slot, auth, events, on_unseal, on_seal),
            )
        }
        Some(seal) => {
            let on_unseal: grpc::OnUnseal = {
                let slot = slot.clone();
                let sweeper_task = sweeper_task.clone();
                Box::new(move |key| {
                    let parts = sealed_parts.get().cloned();
                    let slot = slot.clone();
                    let sweeper_task = sweeper_task.clone();
                    let reporter = health_reporter.clone();
                    Box::pin(async move {
                        let parts = parts.ok_or_else(|| DATABASE_NOT_READY.to_owned())?;
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
                grpc::SealGrpc::new(Some(seal), slot, auth, events, on_unseal, on_seal),
            )
        }
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
    let (stop, stopped) = tokio::sync::oneshot::channel::<StartError>();
    let shutdown = async move {
        tokio::select! {
            () = shutdown => {}
            Ok(e) = failed => { let _ = stop.send(e); }
        }
    };
    let served = rt::server()?
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .add_service(seal_service)
        .add_service(keys)
        .serve_with_incoming_shutdown(rt::incoming(listener, start.server_tls), shutdown)
        .await;
    // Stop the background tasks so the database is released.
    let sweeper = sweeper_task
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    for task in sweeper.into_iter().chain(opening_task) {
        task.abort();
        let _ = task.await;
    }
    if let Ok(e) = stopped.await {
        return Err(e);
    }
    served.map_err(ServeError::from)?;
    Ok(())
}

//! The audit service: an append-only Merkle log (RFC 6962 hashing) of events
//! signed by known sources, with signed checkpoints (C2SP signed notes),
//! inclusion and consistency proofs, queries for auditors, and offline
//! verification of exported logs.
//!
//! Domain: [`merkle`], [`checkpoint`], [`head`], [`store`], [`journal`], [`service`], [`append`],
//! [`verify`], [`reconcile`] (CloudTrail sign-ins against released codes,
//! findings appended as a source of their own) — no tonic. Edges: [`grpc`],
//! [`http`] (the optional HTTP listener), [`convert`], [`config`], [`cli`]
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
pub mod http;
pub mod journal;
pub mod merkle;
pub mod reconcile;
pub mod service;
pub mod store;
pub mod tiles_http;
pub mod verify;

use std::{future::Future, sync::Arc, time::Duration};

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
    store::TileStore,
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
    if let Some(settings) = config.store.postgres().map_err(StartError::Setting)? {
        let settings = settings.clone();
        return serve_postgres(config, settings, signer, tls, listener, shutdown).await;
    }
    let store = TileStore::open(&config.data_dir)?;
    let head =
        TreeHeadFile::load(&config.data_dir, &signer.verifier()).map_err(StartError::refused)?;
    // An old log kept in sled moves into tiles, checked against the head.
    store::migrate::migrate(store.db(), &store, head.head().map(|h| (h.size, h.root)))
        .map_err(StartError::refused)?;
    // sled lost (its files gone) under intact tiles: its indexes are made
    // again from the tiles, if they give the signed root.
    if store::LogStore::size(&store) == 0
        && let Some(h) = head.head().filter(|h| h.size > 0)
    {
        tracing::warn!(
            size = h.size,
            "the index in sled is empty but this log signed {} entries: rebuilding it from the \
             tiles in {}",
            h.size,
            store.log_dir().display()
        );
        let rebuilt = store.rebuild(h.size, h.root).map_err(|e| {
            StartError::refused(format!(
                "the index in sled is empty and cannot be rebuilt from the tiles in {}: {e}; this \
                 log signed {} entries with root {} (kept in {}). Restore the data directory from \
                 a backup",
                store.log_dir().display(),
                h.size,
                h.root_hex(),
                config.data_dir.join(crate::head::FILE_NAME).display()
            ))
        })?;
        tracing::info!(
            entries = rebuilt,
            signed = h.size,
            "index rebuilt from the tiles"
        );
    }
    // The journal, read from what the store holds durably on.
    let journal = journal::Journal::open(&config.data_dir, store::LogStore::size(&store))
        .map_err(StartError::refused)?;
    let log = Arc::new(
        AuditLog::new(
            store,
            config.sources.clone(),
            config.auditors.clone(),
            signer,
            Arc::new(SystemClock),
        )
        .with_tree_head(head)
        .with_journal(journal),
    );
    log.recover().await.map_err(StartError::refused)?;
    log.spawn_applier();
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
    let reconciler = start_reconciler(&config, &log)?;
    if let Some(listen) = &config.http_listen {
        let listener = twokey_runtime::serve::bind(listen).await?;
        let addr = listener.local_addr().map_err(|source| ServeError::Bind {
            addr: listen.clone(),
            source,
        })?;
        let api = Arc::new(http::HttpApi {
            log: log.clone(),
            reconciler: reconciler.clone(),
            posters: config
                .reconcile
                .as_ref()
                .map(|r| r.posters.clone())
                .unwrap_or_default(),
            trust_domain: config.trust_domain.clone(),
            log_dir: config.data_dir.join(store::tiles::LOG_DIR),
        });
        let tls = http::tls_config(&config.tls)?;
        let mut stopping = stop_rx.clone();
        tokio::spawn(http::serve(api, incoming(listener, tls), async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        }));
        http::announce(addr);
    }
    let readers = config
        .reconcile
        .as_ref()
        .map(|r| r.readers.clone())
        .unwrap_or_default();
    let last_apply = log.clone();
    let grpc = AuditGrpc::new(log, Authenticator::new(config.trust_domain.clone()))
        .with_shutdown(stop_rx)
        .with_finding_readers(
            readers,
            config.reconcile.as_ref().map(|r| r.source_id.clone()),
        );
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.listen.clone(),
        source,
    })?;
    let (reflection, reflection_v1alpha) = reflection::<AuditServiceServer<AuditGrpc<TileStore>>>();
    let router = server()?
        .add_service(health::<AuditServiceServer<AuditGrpc<TileStore>>>().await)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(grpc.into_server());
    announce("twokey-audit", addr);
    router
        .serve_with_incoming_shutdown(incoming(listener, tls), shutdown)
        .await
        .map_err(ServeError::from)?;
    // A clean stop leaves the journal applied: tiles, indexes and the
    // checkpoint file hold every acknowledged entry.
    last_apply.apply().await.map_err(StartError::refused)?;
    Ok(())
}

/// [`serve`] with the log in PostgreSQL: one replica among several, the
/// sequencer while it holds the lease ([`service::sequencer`]). It listens
/// at once; until its database answers and is migrated every call is
/// UNAVAILABLE ([`grpc::LOG_NOT_OPEN`]) and it tries again each
/// [`OPEN_RETRY`]. gRPC health reports the audit service NOT_SERVING while
/// this replica does not hold the lease (appends go elsewhere; reads are
/// served all the same, once the log is open), and the server as a whole
/// ("") SERVING.
async fn serve_postgres(
    config: AuditConfig,
    settings: twokey_pgstore::PgSettings,
    signer: CheckpointSigner,
    tls: twokey_runtime::tls::ServerTls,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    type Server = AuditServiceServer<AuditGrpc<store::PgLogStore>>;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (sequencer_tx, mut sequencer_rx) = tokio::sync::watch::channel(false);
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_not_serving::<Server>().await;
    tokio::spawn(async move {
        loop {
            if *sequencer_rx.borrow_and_update() {
                reporter.set_serving::<Server>().await;
            } else {
                reporter.set_not_serving::<Server>().await;
            }
            if sequencer_rx.changed().await.is_err() {
                return;
            }
        }
    });
    let slot = grpc::LogSlot::default();
    let opened = OpenPg {
        settings,
        sources: config.sources.clone(),
        auditors: config.auditors.clone(),
        signer,
    };
    // Opens the log, then competes for the lease until shutdown.
    let lease = tokio::spawn({
        let (slot, mut stop) = (slot.clone(), stop_rx.clone());
        async move {
            let Some(log) = opened.open_until(&mut stop).await else {
                return;
            };
            let _ = slot.set(log.clone());
            service::sequencer::run_lease(log, sequencer_tx, stop).await;
        }
    });
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let grpc = AuditGrpc::opening(slot, Authenticator::new(config.trust_domain.clone()))
        .with_shutdown(stop_rx);
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.listen.clone(),
        source,
    })?;
    let (reflection, reflection_v1alpha) = reflection::<Server>();
    let router = server()?
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(grpc.into_server());
    announce("twokey-audit", addr);
    router
        .serve_with_incoming_shutdown(incoming(listener, tls), shutdown)
        .await
        .map_err(ServeError::from)?;
    // The lease goes back at once: its session closes.
    let _ = lease.await;
    Ok(())
}

/// How long a replica waits before it tries its database again at start.
const OPEN_RETRY: Duration = Duration::from_secs(1);

/// What opens the audit log in PostgreSQL.
struct OpenPg {
    settings: twokey_pgstore::PgSettings,
    sources: std::collections::BTreeMap<twokey_runtime::SpiffeId, ed25519_dalek::VerifyingKey>,
    auditors: std::collections::BTreeSet<twokey_runtime::SpiffeId>,
    signer: CheckpointSigner,
}

impl OpenPg {
    /// Opens (migrating) and follows the log, trying again each
    /// [`OPEN_RETRY`] while a step fails; `None` once `stop` turns true first.
    async fn open_until(
        self,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Option<Arc<AuditLog<store::PgLogStore>>> {
        let settings = &self.settings;
        let store = retry(stop, "open", || store::PgLogStore::open(settings.clone())).await?;
        let log = Arc::new(AuditLog::new(
            store,
            self.sources,
            self.auditors,
            self.signer,
            Arc::new(SystemClock),
        ));
        retry(stop, "read", || log.follow()).await?;
        tracing::info!(
            entries = log.size(),
            verifier = %log.signer().verifier(),
            "audit log open in PostgreSQL; competing for the sequencer lease"
        );
        Some(log)
    }
}

/// Runs `step` until it succeeds, each [`OPEN_RETRY`] after a failure;
/// `None` once `stop` turns true first.
async fn retry<T, F: Future<Output = Result<T, error::AuditError>>>(
    stop: &mut tokio::sync::watch::Receiver<bool>,
    what: &str,
    mut step: impl FnMut() -> F,
) -> Option<T> {
    loop {
        let result = tokio::select! {
            result = step() => result,
            _ = stop.wait_for(|s| *s) => return None,
        };
        match result {
            Ok(t) => return Some(t),
            // Unreachable is a wait; anything else (a rolled-back or altered
            // log, a newer schema) needs an operator.
            Err(e @ error::AuditError::Store(_)) => tracing::warn!(
                "cannot {what} the audit log in PostgreSQL: {e}; every call answers UNAVAILABLE \
                 until it opens, trying again in {} s",
                OPEN_RETRY.as_secs()
            ),
            Err(e) => tracing::error!(
                "refusing to {what} the audit log in PostgreSQL: {e}; every call answers \
                 UNAVAILABLE, trying again in {} s",
                OPEN_RETRY.as_secs()
            ),
        }
        tokio::select! {
            () = tokio::time::sleep(OPEN_RETRY) => {}
            _ = stop.wait_for(|s| *s) => return None,
        }
    }
}

/// Starts the reconciler of `[reconcile]`, if set: its key must be the one
/// `[[sources]]` lists for its `source_id`.
fn start_reconciler(
    config: &AuditConfig,
    log: &Arc<AuditLog<TileStore>>,
) -> Result<Option<Arc<reconcile::Reconciler<TileStore>>>, StartError> {
    let Some(r) = &config.reconcile else {
        return Ok(None);
    };
    let key = load_signing_key(&r.key_file)?;
    if config.sources.get(&r.source_id) != Some(&key.verifying_key()) {
        return Err(StartError::Setting(format!(
            "reconcile.key_file {}: its public key is not the one [[sources]] lists for {}; \
             list {} there",
            r.key_file.display(),
            r.source_id,
            twokey_runtime::keys::encode_public_key(&key.verifying_key())
        )));
    }
    let state = reconcile::state::ReconcileState::open(&config.data_dir.join("reconcile"))?;
    let settings = reconcile::Settings {
        source: r.source_id.clone(),
        key,
        vault: r
            .vault
            .clone()
            .ok_or_else(|| StartError::Setting("reconcile.vault is not set".into()))?,
        cloudtrail_dir: r.cloudtrail_dir.clone(),
        delivery_delay: r.delivery_delay,
    };
    let reconciler = Arc::new(
        reconcile::Reconciler::new(log.clone(), state, settings, Arc::new(SystemClock))
            .map_err(StartError::refused)?,
    );
    tracing::info!(
        source = %r.source_id,
        cloudtrail_dir = ?r.cloudtrail_dir,
        "reconciler on"
    );
    tokio::spawn(reconciler.clone().run(r.scan_interval));
    Ok(Some(reconciler))
}

/// A restore under way ([`AuditLog::hello`]) shows on the gauge
/// `twokey.audit.restore.missing` (entries still missing) and at ERROR
/// every minute until it completes.
fn watch_restore(log: &Arc<AuditLog<TileStore>>) {
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

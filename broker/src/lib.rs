//! The broker: identities, policy, the request workflow, PINs, notifications
//! and signed grants. It holds the authority and no secrets: it never stores
//! a seed and cannot compute a code.
//!
//! Domain (no tonic): [`policy`] (with [`rules`], the rules in force once a
//! signed policy is: [`consent`]), [`state`], [`store`], [`pin`], [`grant`],
//! [`notify`], [`vault`] (the trait the domain calls), [`calls`] (the API's
//! validated inputs and answers), and [`service`], the API as plain
//! functions of (caller, input) that the gRPC layer ([`grpc`]) and the
//! HTTP/JSON front end ([`http`], Connect protocol) call alike, through
//! [`convert`] (proto ↔ domain).
#![forbid(unsafe_code)]

pub mod calls;
pub mod cli;
pub mod config;
pub mod consent;
pub mod convert;
pub mod error;
pub mod findings;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod notify;
pub mod pin;
pub mod policy;
pub mod refusals;
pub mod rpc;
pub mod rules;
pub mod service;
pub mod state;
pub mod store;
pub mod vault;

use std::{future::Future, sync::Arc, time::Duration};

use rustls::pki_types::{CertificateDer, pem::PemObject};
use tokio::{net::TcpListener, task::JoinSet};
use twokey_proto::broker::v1::broker_service_server::BrokerServiceServer;
use twokey_runtime::{
    Authenticator, SpiffeId,
    durable::DurableDb,
    events::EventSigner,
    grant::GrantSigner,
    identity::identity_of_cert,
    keys::{self, SecretKey},
    outbox::Outbox,
    receipts::ReceiptHealth,
    serve::{self, MAX_MESSAGE_BYTES},
    shipper::{ShipperOptions, spawn_shipper_with},
    start::StartError,
    time::{Clock, SystemClock},
};

pub use config::BrokerConfig;
pub use error::BrokerError;

use crate::{
    config::{ConsentConfig, NotifyConfig},
    consent::SignedPolicy,
    grpc::{BrokerGrpc, GrpcVault},
    notify::{
        Notifier, NotifyQueue, http::HttpClient, mailbox::Mailbox, slack::Slack, webhook::Webhook,
    },
    pin::PinKey,
    policy::Policy,
    service::{Broker, BrokerParts},
    store::{PgStore, RequestStore, SledStore},
    vault::Vault,
};

/// The broker's own SPIFFE ID, read from its certificate.
fn own_identity(config: &BrokerConfig) -> Result<SpiffeId, StartError> {
    let pem = config.tls.cert_pem()?;
    let der = CertificateDer::pem_slice_iter(&pem)
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| {
            StartError::Setting(format!(
                "tls.cert: {} holds no certificate",
                config.tls.cert.display()
            ))
        })?;
    identity_of_cert(&der, &config.trust_domain)
        .map_err(|e| StartError::Setting(format!("tls.cert: {}: {e}", config.tls.cert.display())))
}

fn notifiers(config: &NotifyConfig) -> Result<Vec<Arc<dyn Notifier>>, StartError> {
    let mut out: Vec<Arc<dyn Notifier>> = Vec::new();
    if let Some(m) = &config.mailbox {
        out.push(Arc::new(Mailbox::new(m.dir.clone())));
    }
    if let Some(w) = &config.webhook {
        let secret = keys::read_secret_file(&w.secret_file)?;
        let trimmed = zeroize::Zeroizing::new(secret.trim_ascii().to_vec());
        let client = HttpClient::new(w.ca_file.as_deref())
            .map_err(|e| StartError::Setting(format!("notify.webhook.ca_file: {}", e.0)))?;
        out.push(Arc::new(Webhook::new(
            w.url.clone(),
            trimmed,
            w.send_pins,
            client,
        )));
    }
    if let Some(s) = &config.slack {
        let token = keys::read_secret_file(&s.token_file)?;
        let token =
            zeroize::Zeroizing::new(String::from_utf8_lossy(token.trim_ascii()).into_owned());
        let client = HttpClient::new(s.ca_file.as_deref())
            .map_err(|e| StartError::Setting(format!("notify.slack.ca_file: {}", e.0)))?;
        out.push(Arc::new(Slack::new(
            s.api_base.clone(),
            token,
            s.channel.clone(),
            client,
        )));
    }
    if out.is_empty() {
        return Err(StartError::Setting(
            "notify: no notifier is configured, so PINs could not reach requesters; configure [notify.mailbox], [notify.webhook] or [notify.slack]".into(),
        ));
    }
    Ok(out)
}

/// Warns about requesters no configured notifier can send a PIN to.
fn warn_unreachable_requesters(policy: &Policy, notify: &NotifyConfig) {
    if notify.mailbox.is_some() || notify.webhook.as_ref().is_some_and(|w| w.send_pins) {
        return;
    }
    for account in policy.accounts() {
        for requester in &account.requesters {
            if notify.slack.is_none() || policy.slack_member(requester).is_none() {
                tracing::warn!(
                    account_id = %account.id,
                    %requester,
                    "no notifier can send this requester a PIN; add a [slack] member id to the policy or configure [notify.mailbox]"
                );
            }
        }
    }
}

/// The pinned admins of `[consent]`, if configured.
fn trust_root(
    consent: Option<&ConsentConfig>,
    trust_domain: &str,
) -> Result<Option<twokey_consent::TrustRoot>, StartError> {
    let Some(c) = consent else {
        tracing::warn!(
            "no [consent] section: the broker checks no signed statement (the vault still refuses any release without them)"
        );
        return Ok(None);
    };
    let text = std::fs::read_to_string(&c.admins_file).map_err(|e| {
        StartError::Setting(format!(
            "consent.admins_file: cannot read {}: {e}",
            c.admins_file.display()
        ))
    })?;
    twokey_consent::TrustRoot::from_allowed_signers(trust_domain, &text, c.threshold)
        .map(Some)
        .map_err(|e| {
            StartError::Setting(format!(
                "[consent] admins_file {} with threshold {}: {e}",
                c.admins_file.display(),
                c.threshold
            ))
        })
}

/// How long the first fetch of the signed policy may hold up the start.
const FIRST_POLICY_FETCH: Duration = Duration::from_secs(5);

/// How often the broker asks the vault for a newer signed policy (besides
/// after its own ApplyPolicy and when a statement names a newer version).
const POLICY_REFRESH: Duration = Duration::from_secs(60);

/// Keeps the cached signed policy up to date: asks the vault every
/// [`POLICY_REFRESH`] or, after a failure, sooner (from 1 s, doubling up to
/// 30 s), saying so each time it fails. `loaded` tells whether the first
/// fetch succeeded.
/// The broker's rules follow each new version at once (its warnings are
/// logged then, not at a call).
async fn refresh_signed_policy(
    signed: Arc<SignedPolicy>,
    vault: Arc<dyn Vault>,
    broker: Arc<Broker>,
    loaded: bool,
) {
    let mut failing = !loaded;
    let mut wait = if loaded {
        POLICY_REFRESH
    } else {
        Duration::from_secs(1)
    };
    loop {
        tokio::time::sleep(wait).await;
        match signed.refresh(&*vault).await {
            Ok(p) => {
                broker.policy();
                if failing {
                    tracing::info!(
                        policy_version = p.as_ref().map_or(0, |p| p.version()),
                        "the signed policy is loaded from the vault"
                    );
                }
                failing = false;
                wait = POLICY_REFRESH;
            }
            Err(e) => {
                wait = if failing {
                    (wait * 2).min(Duration::from_secs(30))
                } else {
                    Duration::from_secs(1)
                };
                failing = true;
                tracing::warn!(
                    "cannot load the signed policy from the vault: {e}; trying again in {} s",
                    wait.as_secs()
                );
            }
        }
    }
}

/// What tests (and embedders) may set beyond the config.
#[derive(Debug)]
pub struct ServeOptions {
    /// The clock (tests move time with `ManualClock`).
    pub clock: Arc<dyn Clock>,
    /// Counts delivered notifications, so tests can wait for one.
    pub deliveries: Option<tokio::sync::watch::Sender<u64>>,
    /// The vault to call; none for the gRPC vault at `config.vault_address`.
    pub vault: Option<Arc<dyn Vault>>,
    /// The HTTP/JSON listener, bound by the caller; none to bind
    /// `config.http_listen` if it is set.
    pub http_listener: Option<TcpListener>,
    /// Counts `access.denied` events written for refusals of identities
    /// outside the policy (one per identity per minute), so tests can wait
    /// for one.
    pub refusal_events: Option<tokio::sync::watch::Sender<u64>>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            deliveries: None,
            vault: None,
            http_listener: None,
            refusal_events: None,
        }
    }
}

/// Audit's `Query`, as the findings poller reads it: one action from a leaf
/// index, on the broker's mTLS channel to audit.
struct AuditFindings(tonic::transport::Channel);

impl findings::FindingSource for AuditFindings {
    fn findings(
        &self,
        action: &'static str,
        from: u64,
        limit: u32,
    ) -> futures::future::BoxFuture<'_, Result<Vec<findings::FindingEntry>, String>> {
        Box::pin(async move {
            let mut client = twokey_proto::audit::v1::audit_service_client::AuditServiceClient::new(
                self.0.clone(),
            );
            let request = twokey_proto::audit::v1::QueryRequest {
                action: action.to_owned(),
                page_size: limit,
                page_token: if from == 0 {
                    String::new()
                } else {
                    from.to_string()
                },
                ..Default::default()
            };
            let mut stream = client
                .query(request)
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                .into_inner();
            let mut out = Vec::new();
            while let Some(batch) = stream
                .message()
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            {
                out.extend(batch.entries.into_iter().filter_map(|entry| {
                    let event = entry.event?;
                    Some(findings::FindingEntry {
                        index: entry.index,
                        action: event.action,
                        account_id: event.account_id,
                        attributes: event.attributes.into_iter().collect(),
                    })
                }));
            }
            Ok(out)
        })
    }
}

/// Serves the broker until `shutdown` resolves: gRPC on `listener` and, if
/// [`ServeOptions::http_listener`] or `config.http_listen` gives one, the
/// HTTP/JSON API, both through `runtime::serve::incoming`.
pub async fn serve(
    config: BrokerConfig,
    options: ServeOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let http_listener = match (options.http_listener, &config.http_listen) {
        (Some(listener), _) => Some(listener),
        (None, Some(addr)) => Some(serve::bind(addr).await?),
        (None, None) => None,
    };
    let clock = options.clock;
    // With [consent], roles and counts come from the signed policy once one
    // is in force, so an account section may hold only its settings.
    let policy = Policy::load_with(&config.policy_file, config.consent.is_some())
        .map_err(StartError::refused)?;
    policy
        .check_trust_domain(&config.trust_domain, &config.policy_file)
        .map_err(StartError::refused)?;
    let grants = GrantSigner::new(keys::load_signing_key(&config.grant_key_file)?);
    let event_key = keys::load_signing_key(&config.event_key_file)?;
    let pin_key = PinKey::new(SecretKey::load(&config.pin_key_file)?);
    let identity = own_identity(&config)?;
    let tls = config
        .tls
        .server_tls(twokey_runtime::tls::ClientAuth::Optional)?;
    let http_tls = match &http_listener {
        Some(_) => Some(http::tls_config(&config.tls)?),
        None => None,
    };
    let vault: Arc<dyn Vault> = match options.vault {
        Some(vault) => vault,
        None => Arc::new(
            GrpcVault::with_replicas(
                config
                    .tls
                    .peer(&config.vault_address, &config.vault_server_name)?,
            )
            .with_release_deadline(Duration::from_millis(config.release_deadline_ms)),
        ),
    };
    let audit_peer = match &config.audit_address {
        Some(address) => Some(config.tls.peer(address, &config.audit_server_name)?),
        None => None,
    };
    let audit_channel = audit_peer.as_ref().map(twokey_runtime::tls::Peer::channel);
    let signed = Arc::new(SignedPolicy::new(trust_root(
        config.consent.as_ref(),
        &config.trust_domain,
    )?));
    let notifiers = notifiers(&config.notify)?;
    warn_unreachable_requesters(&policy, &config.notify);

    let postgres = config
        .store
        .postgres()
        .map_err(StartError::Setting)?
        .cloned();
    let pg_signer = Arc::new(EventSigner::new(identity.clone(), event_key.clone()));
    let db = DurableDb::open(&config.data_dir)?;
    let outbox = Outbox::open(&db, EventSigner::new(identity, event_key), clock.clone())?
        .with_ack_observer(metrics::observe_event);
    let mut queue = NotifyQueue::open(&db, outbox.clone(), notifiers, &pin_key, clock.clone())
        .map_err(StartError::refused)?;
    if let Some(counter) = options.deliveries {
        queue = queue.with_delivery_counter(counter);
    }
    let queue = Arc::new(queue);
    // The shipper starts before the store so that the store can check its
    // receipts' health before every state change.
    let findings_channel = audit_channel.clone();
    // On PostgreSQL the replica holding the shipping lease ships the events
    // every replica committed there.
    // On PostgreSQL: started once the outbox's tables exist.
    let mut start_leased: Option<Box<dyn FnOnce() -> twokey_pgstore::outbox::Leased + Send>> = None;
    let leased: Arc<std::sync::Mutex<Option<twokey_pgstore::outbox::Leased>>> = Arc::default();
    let shipper = match audit_channel {
        Some(channel) if postgres.is_some() => {
            let options = ShipperOptions {
                reconnect: audit_peer.clone(),
                ..ShipperOptions::from_setting(
                    config.audit_checkpoint_key.as_deref(),
                    config.audit_keep_days,
                )
                .map_err(StartError::Setting)?
            };
            start_leased = postgres.clone().map(|settings| {
                let (signer, clock) = (pg_signer.clone(), clock.clone());
                Box::new(move || {
                    twokey_pgstore::outbox::spawn_leased(settings, signer, clock, move |outbox| {
                        spawn_shipper_with(
                            outbox.with_ack_observer(metrics::observe_event),
                            channel.clone(),
                            options.clone(),
                        )
                        .1
                    })
                }) as Box<dyn FnOnce() -> twokey_pgstore::outbox::Leased + Send>
            });
            None
        }
        Some(channel) => {
            let options = ShipperOptions {
                reconnect: audit_peer.clone(),
                ..ShipperOptions::from_setting(
                    config.audit_checkpoint_key.as_deref(),
                    config.audit_keep_days,
                )
                .map_err(StartError::Setting)?
            };
            Some(spawn_shipper_with(outbox.clone(), channel, options))
        }
        None => None,
    };
    let pg_shipping = start_leased.is_some();
    let receipts = shipper
        .as_ref()
        .map_or_else(ReceiptHealth::unchecked, |(h, _)| h.receipts().clone());
    let shipper = shipper.map(|(_, task)| task);
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let health = health
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut migrating = None;
    let mut pg_store = None;
    let store: Arc<dyn RequestStore> = match &postgres {
        Some(settings) => {
            // Serving starts NOT_SERVING; the store answers UNAVAILABLE
            // until the schema is migrated and the outbox session is open.
            health_reporter
                .set_not_serving::<BrokerServiceServer<BrokerGrpc>>()
                .await;
            let store = Arc::new(PgStore::starting(settings.clone(), &queue));
            migrating = Some(tokio::spawn(migrate_then_serve(
                settings.clone(),
                store.clone(),
                pg_signer.clone(),
                clock.clone(),
                health_reporter.clone(),
                start_leased.take().map(|start| (start, leased.clone())),
            )));
            pg_store = Some(store.clone());
            store
        }
        None => match SledStore::open(&db, outbox.clone(), queue.clone()) {
            Ok(store) => {
                health_reporter
                    .set_serving::<BrokerServiceServer<BrokerGrpc>>()
                    .await;
                Arc::new(store.with_receipts(receipts))
            }
            Err(e) => {
                if let Some(task) = shipper {
                    task.abort();
                    let _ = task.await;
                }
                return Err(StartError::refused(e));
            }
        },
    };
    metrics::observe_requests(&store);
    let clock_for_findings = clock.clone();
    let mut broker = Broker::new(BrokerParts {
        policy: Arc::new(policy),
        store,
        queue: queue.clone(),
        clock,
        pin_key,
        grants,
        vault: vault.clone(),
        signed: signed.clone(),
    });
    if let Some(counter) = options.refusal_events {
        broker = broker.with_refusal_counter(counter);
    }
    let broker = Arc::new(broker);
    let pg_queue = pg_store.as_ref().map(|store| store.queue().clone());
    // Other replicas' changes, to this replica's watchers.
    let following = pg_store.map(|store| {
        let broker = broker.clone();
        let (signed, vault, rules) = (signed.clone(), vault.clone(), broker.clone());
        store.follow_changes(
            move |request, action| {
                broker.publish_change(service::Change {
                    request: Arc::new(request),
                    action,
                });
            },
            // A version applied through another replica: load it now.
            move || {
                let (signed, vault, rules) = (signed.clone(), vault.clone(), rules.clone());
                tokio::spawn(async move {
                    match signed.refresh(&*vault).await {
                        Ok(_) => {
                            rules.policy();
                        }
                        Err(e) => tracing::warn!(
                            "another replica applied a policy version; loading it failed: {e} \
                             (trying again at the next refresh)"
                        ),
                    }
                });
            },
        )
    });
    // Not in `tasks`: it must finish a write it started, not be aborted.
    let refusal_flusher = tokio::spawn(broker.clone().run_refusal_flusher());
    let refusals = broker.clone();

    let mut tasks = JoinSet::new();
    if signed.root().is_some() {
        let loaded = match tokio::time::timeout(FIRST_POLICY_FETCH, signed.refresh(&*vault)).await {
            Ok(Ok(Some(p))) => {
                tracing::info!(
                    policy_version = p.version(),
                    "signed policy version {} is in force; statements are required",
                    p.version()
                );
                true
            }
            Ok(Ok(None)) => {
                tracing::info!(
                    "the vault has no signed policy yet; statements are required once one is applied"
                );
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(
                    "cannot load the signed policy from the vault at start: {e}; trying again in the background (statements are not required until it loads)"
                );
                false
            }
            Err(_) => {
                tracing::warn!(
                    "the vault did not answer for the signed policy within {} s at start; trying again in the background (statements are not required until it loads)",
                    FIRST_POLICY_FETCH.as_secs()
                );
                false
            }
        };
        broker.policy();
        tasks.spawn(refresh_signed_policy(
            signed.clone(),
            vault.clone(),
            broker.clone(),
            loaded,
        ));
    }
    // On PostgreSQL the sled queue still carries the findings' alerts.
    tasks.spawn(queue.clone().run());
    if let Some(pg_queue) = &pg_queue {
        tasks.spawn(pg_queue.clone().run());
    }
    if let Some(channel) = findings_channel {
        let rules = broker.clone();
        let poller = findings::FindingsPoller::new(
            Box::new(AuditFindings(channel)),
            queue.clone(),
            &db,
            Box::new(move || rules.policy()),
            clock_for_findings,
        )
        .map_err(StartError::refused)?;
        tasks.spawn(poller.run(config.findings_interval));
    }
    tasks.spawn(broker.clone().run_sweeper(config.sweep_interval));
    if shipper.is_none() && !pg_shipping {
        tracing::warn!("no audit_address: audit events stay in the outbox until one is configured");
    }

    let closer = broker.clone();
    let http_api = Arc::new(http::HttpApi::new(
        broker.clone(),
        Authenticator::new(config.trust_domain.clone()),
    ));
    let service = BrokerServiceServer::new(BrokerGrpc::new(
        broker,
        Authenticator::new(config.trust_domain.clone()),
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let addr = listener
        .local_addr()
        .map_err(|source| serve::ServeError::Bind {
            addr: config.listen.clone(),
            source,
        })?;
    serve::announce("twokey-broker", addr);
    // One shutdown for both listeners.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let http_server = async move {
        if let (Some(listener), Some(tls)) = (http_listener, http_tls) {
            if let Ok(addr) = listener.local_addr() {
                http::announce(addr);
            }
            let mut stopped = stopped;
            http::serve(http_api, serve::incoming(listener, tls), async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await;
        }
    };
    let (reflection, reflection_v1alpha) = serve::reflection::<BrokerServiceServer<BrokerGrpc>>();
    let grpc_server = serve::server()?
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(serve::incoming(listener, tls), async move {
            shutdown.await;
            let _ = stop.send(true);
            closer.close();
        });
    let (result, ()) = tokio::join!(grpc_server, http_server);
    // Calls have stopped: write every refusal still counted.
    refusals.close();
    let _ = refusal_flusher.await;
    refusals.flush_refusals(true).await;
    tasks.shutdown().await;
    // Stop shipping so the database is released.
    if let Some(shipper) = shipper {
        shipper.abort();
        let _ = shipper.await;
    }
    for task in [migrating, following].into_iter().flatten() {
        task.abort();
        let _ = task.await;
    }
    let leased = leased.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(leased) = leased {
        leased.stop().await;
    }
    result.map_err(|e| StartError::Serve(e.into()))
}

/// What starts competing for the shipping lease, and where it is kept
/// (to stop it at shutdown).
type ShippingStart = (
    Box<dyn FnOnce() -> twokey_pgstore::outbox::Leased + Send>,
    Arc<std::sync::Mutex<Option<twokey_pgstore::outbox::Leased>>>,
);

/// How long a replica waits before it tries its database again at start.
const MIGRATE_RETRY: Duration = Duration::from_secs(1);

/// Migrates the broker's database (retrying while it cannot be reached),
/// opens the outbox session, makes `store` ready and reports SERVING.
async fn migrate_then_serve(
    settings: twokey_pgstore::PgSettings,
    store: Arc<PgStore>,
    signer: Arc<EventSigner>,
    clock: Arc<dyn Clock>,
    health: tonic_health::server::HealthReporter,
    mut shipping: Option<ShippingStart>,
) {
    loop {
        let ready = async {
            store::postgres::migrate(&settings).await?;
            // The outbox's tables exist: compete for the shipping lease.
            if let Some((start, slot)) = shipping.take() {
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(start());
            }
            twokey_pgstore::outbox::PgOutbox::connect(&settings, signer.clone(), clock.clone())
                .await
                .map(|o| o.reopening(&settings))
        };
        match ready.await {
            Ok(outbox) => {
                store.ready(outbox);
                store.wait_listening().await;
                health
                    .set_serving::<BrokerServiceServer<BrokerGrpc>>()
                    .await;
                tracing::info!("the broker's PostgreSQL schema is migrated: serving");
                return;
            }
            Err(e) if e.is_unavailable() => {
                tracing::warn!(
                    "waiting for the broker's database: {e}; NOT_SERVING until it answers"
                );
            }
            Err(e) => {
                tracing::error!(
                    "cannot use the broker's database: {e}; NOT_SERVING, trying again in {} s",
                    MIGRATE_RETRY.as_secs()
                );
            }
        }
        tokio::time::sleep(MIGRATE_RETRY).await;
    }
}

//! The vault's thin gRPC layer: only the broker's SPIFFE ID may call; each
//! method converts its request ([`convert`](crate::convert)), makes one
//! domain call (naming the verified caller, which refusal events record),
//! and [`VaultError`] maps to a status here. While a `shamir`-sealed vault
//! waits for its holders, every call but `Status` answers UNAVAILABLE;
//! [`SealGrpc`] takes the holders' shares.

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use futures::future::BoxFuture;

use tokio::time::Instant;
use tonic::{Request, Response, Status};
use twokey_proto::{
    consent::v1::SignedStatement,
    types::v1::Account,
    vault::v1::{
        AdminConsent, ApplyPolicyRequest, ApplyPolicyResponse, EnrollRequest, EnrollResponse,
        GenerateCodeRequest, GenerateCodeResponse, GetPolicyRequest, GetPolicyResponse,
        ListAccountsRequest, ListAccountsResponse, NewShare, PolicyVersion, RemoveAccountRequest,
        RemoveAccountResponse, ReshareRequest, ReshareResponse, RestoreAccountRequest,
        RestoreAccountResponse, SealProgress, SealRequest, SealResponse, SealStatusRequest,
        SealStatusResponse, SetAccountEnabledRequest, SetAccountEnabledResponse, ShareHolder,
        StartReshareRequest, StartReshareResponse, StatusRequest, StatusResponse, UnsealRequest,
        UnsealResponse, seal_service_server::SealService, vault_service_server::VaultService,
    },
};
use twokey_runtime::{
    Authenticator, SpiffeId, error::to_status, events::EventDraft, outbox::Outbox,
    time::to_timestamp,
};

use crate::{
    crypto::MasterKey,
    service::{Enrollment, Vault, VaultError},
    store::VaultStore,
    unseal::{self, HolderSpec, Progress, Reshared, Submitted, UnsealError, Unsealer},
};

impl From<VaultError> for Status {
    fn from(error: VaultError) -> Self {
        let status = to_status(&error);
        if error.is_private() {
            Status::new(status.code(), "vault storage failure; see the vault's log")
        } else {
            status
        }
    }
}

/// Where the open vault is: filled at start in the `file` mode (on
/// PostgreSQL once its database is migrated), by the K-th share in the
/// `shamir` mode, and emptied by a seal.
pub struct Slot<S>(RwLock<Option<Arc<Vault<S>>>>, RwLock<Option<String>>);

impl<S> Default for Slot<S> {
    fn default() -> Self {
        Self(RwLock::new(None), RwLock::new(None))
    }
}

impl<S> std::fmt::Debug for Slot<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("open", &self.get().is_some())
            .finish()
    }
}

impl<S> Slot<S> {
    /// The open vault, if any.
    pub fn get(&self) -> Option<Arc<Vault<S>>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts the open vault in.
    pub fn set(&self, vault: Arc<Vault<S>>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(vault);
    }

    /// Takes the vault out: calls that start from now on find it sealed.
    pub fn take(&self) -> Option<Arc<Vault<S>>> {
        self.0.write().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// What calls are told while the slot is empty for another reason than
    /// a seal (the store is not ready yet); `None` once it is.
    pub fn set_waiting(&self, why: Option<String>) {
        *self.1.write().unwrap_or_else(|e| e.into_inner()) = why;
    }

    fn waiting(&self) -> Option<String> {
        self.1.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Where the seal service records its events: the outbox of the store the
/// vault runs on (sled's, or PostgreSQL's once the database is ready).
pub trait EventSink: Send + Sync + 'static {
    /// Records `draft` durably, or says why it could not.
    fn emit(&self, draft: EventDraft) -> BoxFuture<'_, Result<u64, String>>;
}

impl EventSink for Outbox {
    fn emit(&self, draft: EventDraft) -> BoxFuture<'_, Result<u64, String>> {
        Box::pin(async move { Outbox::emit(self, draft).await.map_err(|e| e.to_string()) })
    }
}

/// The slot the vault service and the seal service share.
pub type VaultSlot<S> = Arc<Slot<S>>;

/// The gRPC service.
#[derive(Debug)]
pub struct VaultGrpc<S> {
    vault: VaultSlot<S>,
    seal: Option<Arc<Unsealer>>,
    auth: Authenticator,
    broker: SpiffeId,
}

impl<S> VaultGrpc<S> {
    /// Serves `vault` to the one caller `broker`.
    pub fn new(vault: Arc<Vault<S>>, auth: Authenticator, broker: SpiffeId) -> Self {
        let slot = VaultSlot::default();
        slot.set(vault);
        Self::with_slot(slot, auth, broker)
    }

    /// Serves the vault in `slot` (filled at start in the `file` mode).
    pub fn with_slot(slot: VaultSlot<S>, auth: Authenticator, broker: SpiffeId) -> Self {
        Self {
            vault: slot,
            seal: None,
            auth,
            broker,
        }
    }

    /// Serves the vault `slot` will hold once `seal` has unsealed it; until
    /// then every call but `Status` answers UNAVAILABLE.
    pub fn sealed(
        slot: VaultSlot<S>,
        seal: Arc<Unsealer>,
        auth: Authenticator,
        broker: SpiffeId,
    ) -> Self {
        Self {
            vault: slot,
            seal: Some(seal),
            auth,
            broker,
        }
    }

    /// The vault, or UNAVAILABLE saying how far unsealing is. A call holds
    /// it until it ends, so a seal meanwhile does not cut it off.
    fn vault(&self) -> Result<Arc<Vault<S>>, Status> {
        self.vault.get().ok_or_else(|| {
            let message = match (self.vault.waiting(), &self.seal) {
                (Some(why), _) => why,
                (None, Some(u)) => u.progress(std::time::Instant::now()).0.sealed_message(),
                (None, None) => "vault is sealed".to_owned(),
            };
            Status::unavailable(message)
        })
    }

    fn authorize<T>(&self, request: &Request<T>) -> Result<SpiffeId, Status> {
        self.auth
            .authorize(request, "the broker, the vault's only client", |id| {
                *id == self.broker
            })
    }
}

/// When the caller's deadline (its `grpc-timeout`, at most 8 digits and a
/// unit: H, M, S, m, u, n) runs out, counted from now.
fn deadline_of<T>(request: &Request<T>) -> Option<Instant> {
    let text = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Instant::now().checked_add(timeout)
}

#[tonic::async_trait]
impl<S: VaultStore> VaultService for VaultGrpc<S> {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let caller = self.authorize(&request)?;
        let request = request.get_ref();
        twokey_runtime::trace::record_ids("", &request.account_id);
        // The grant first: without a valid one, the seed is not looked at.
        let grant = self.vault()?.verify_enroll_grant(request.grant.as_ref())?;
        let enrollment = Enrollment::try_from(request)?;
        let enrolled = self
            .vault()?
            .enroll(caller.as_str(), grant, enrollment)
            .await?;
        Ok(Response::new(EnrollResponse {
            account: Some((&enrolled.account).into()),
            current: Some((&enrolled.current).into()),
            next: Some((&enrolled.next).into()),
            warnings: enrolled.warnings,
        }))
    }

    async fn generate_code(
        &self,
        request: Request<GenerateCodeRequest>,
    ) -> Result<Response<GenerateCodeResponse>, Status> {
        let caller = self.authorize(&request)?;
        let deadline = deadline_of(&request);
        let request = request.into_inner();
        // On a task of its own: a caller that gives up does not cut the
        // release off between `code.released` and `code.withheld`.
        let vault = self.vault()?;
        let work = twokey_runtime::trace::spawn_in_call(async move {
            vault
                .generate_code(
                    caller.as_str(),
                    request.grant.as_ref(),
                    request.evidence.as_ref(),
                    deadline,
                )
                .await
        });
        let released = match work.await {
            Ok(released) => released,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => return Err(Status::unavailable("the vault is stopping; try again")),
        };
        let (code, grant_id) = match released {
            Ok(ok) => {
                crate::metrics::code_released();
                ok
            }
            Err(e) => {
                crate::metrics::grant_rejected(&e);
                return Err(e.into());
            }
        };
        Ok(Response::new(GenerateCodeResponse {
            code: Some((&code).into()),
            grant_id,
        }))
    }

    async fn list_accounts(
        &self,
        request: Request<ListAccountsRequest>,
    ) -> Result<Response<ListAccountsResponse>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(ListAccountsResponse {
            accounts: self.vault()?.list()?.iter().map(Account::from).collect(),
        }))
    }

    async fn remove_account(
        &self,
        request: Request<RemoveAccountRequest>,
    ) -> Result<Response<RemoveAccountResponse>, Status> {
        let caller = self.authorize(&request)?;
        let request = request.get_ref();
        let account_id = self
            .vault()?
            .remove(
                caller.as_str(),
                request.grant.as_ref(),
                statements(request.consent.as_ref()),
            )
            .await?;
        Ok(Response::new(RemoveAccountResponse { account_id }))
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        self.authorize(&request)?;
        let Some(vault) = self.vault.get() else {
            return Ok(Response::new(StatusResponse {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                account_count: 0,
                server_time: Some(to_timestamp(std::time::SystemTime::now())),
                sealed: true,
            }));
        };
        Ok(Response::new(StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            account_count: vault.count() as u64,
            server_time: Some(to_timestamp(vault.clock().now())),
            sealed: false,
        }))
    }

    async fn apply_policy(
        &self,
        request: Request<ApplyPolicyRequest>,
    ) -> Result<Response<ApplyPolicyResponse>, Status> {
        let caller = self.authorize(&request)?;
        let request = request.get_ref();
        let applied = self
            .vault()?
            .apply_policy(caller.as_str(), &request.document, &request.signatures)
            .await?;
        Ok(Response::new(ApplyPolicyResponse {
            policy: Some((&applied).into()),
        }))
    }

    async fn get_policy(
        &self,
        request: Request<GetPolicyRequest>,
    ) -> Result<Response<GetPolicyResponse>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(GetPolicyResponse {
            versions: self
                .vault()?
                .policies()?
                .iter()
                .map(PolicyVersion::from)
                .collect(),
        }))
    }

    async fn set_account_enabled(
        &self,
        request: Request<SetAccountEnabledRequest>,
    ) -> Result<Response<SetAccountEnabledResponse>, Status> {
        let caller = self.authorize(&request)?;
        let request = request.get_ref();
        let account = self
            .vault()?
            .set_enabled(
                caller.as_str(),
                request.grant.as_ref(),
                request.enabled,
                statements(request.consent.as_ref()),
            )
            .await?;
        Ok(Response::new(SetAccountEnabledResponse {
            account: Some((&account).into()),
        }))
    }

    async fn restore_account(
        &self,
        request: Request<RestoreAccountRequest>,
    ) -> Result<Response<RestoreAccountResponse>, Status> {
        let caller = self.authorize(&request)?;
        let request = request.get_ref();
        let (account, _) = self
            .vault()?
            .restore(
                caller.as_str(),
                request.grant.as_ref(),
                statements(request.consent.as_ref()),
            )
            .await?;
        Ok(Response::new(RestoreAccountResponse {
            account: Some((&account).into()),
        }))
    }
}

/// What runs when K shares rebuilt the key: opens the vault with it and
/// starts serving; an error message keeps the vault sealed.
pub type OnUnseal = Box<dyn Fn(MasterKey) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// What runs when the vault is sealed, after it left the slot: stops the
/// background work that holds it and reports NOT_SERVING.
pub type OnSeal = Box<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// How long a seal waits for the calls in flight to let go of the vault
/// (and so of its key) before it answers; they are never cut off.
const SEAL_DRAIN: Duration = Duration::from_secs(30);

/// The seal service: the holders' shares, where unsealing stands, sealing
/// by M admins, and re-sharing. In the `file` and `pkcs11` modes (no
/// unsealer) every call answers FAILED_PRECONDITION.
pub struct SealGrpc<S> {
    unsealer: Option<Arc<Unsealer>>,
    slot: VaultSlot<S>,
    auth: Authenticator,
    events: Arc<dyn EventSink>,
    on_unseal: OnUnseal,
    on_seal: OnSeal,
    /// One seal or unseal completion at a time.
    turning: tokio::sync::Mutex<()>,
}

impl<S> std::fmt::Debug for SealGrpc<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealGrpc")
            .field("unsealer", &self.unsealer)
            .finish_non_exhaustive()
    }
}

/// The answer of the seal service in a mode without holders.
fn no_holders() -> Status {
    Status::failed_precondition(
        "this vault does not run in the shamir seal mode: it has no share holders, and it cannot be sealed while running (its key comes from a file or an HSM at every start; stop the process to take the key out of memory)",
    )
}

impl<S: VaultStore> SealGrpc<S> {
    /// Takes shares for `unsealer` (none in the `file` and `pkcs11`
    /// modes), recording each step in `events`; `slot` holds the vault
    /// while it is open.
    pub fn new(
        unsealer: Option<Arc<Unsealer>>,
        slot: VaultSlot<S>,
        auth: Authenticator,
        events: Arc<dyn EventSink>,
        on_unseal: OnUnseal,
        on_seal: OnSeal,
    ) -> Self {
        Self {
            unsealer,
            slot,
            auth,
            events,
            on_unseal,
            on_seal,
            turning: tokio::sync::Mutex::new(()),
        }
    }

    fn unsealer(&self) -> Result<&Arc<Unsealer>, Status> {
        self.unsealer.as_ref().ok_or_else(no_holders)
    }

    async fn audit(&self, draft: twokey_runtime::events::EventDraft) {
        if let Err(e) = self.events.emit(draft).await {
            tracing::warn!("recording a seal event failed: {e}");
        }
    }

    /// The progress now, dropping (and auditing) timed-out partial shares
    /// and a timed-out reshare.
    async fn progress(&self, unsealer: &Unsealer) -> Progress {
        let now = std::time::Instant::now();
        if let Some((plan, dropped)) = unsealer.expire_reshare_at(now) {
            tracing::warn!("reshare {plan} timed out and was dropped");
            self.audit(unseal::reshare_expired_event(&plan, &dropped))
                .await;
        }
        let (progress, dropped) = unsealer.progress(now);
        if !dropped.is_empty() {
            tracing::warn!(
                "unseal timed out: the shares of {} were dropped",
                dropped.join(", ")
            );
            self.audit(unseal::expired_event(&dropped)).await;
        }
        progress
    }

    fn member<T>(&self, request: &Request<T>) -> Result<SpiffeId, Status> {
        self.auth
            .authorize(request, "a member of the trust domain", |_| true)
    }
}

impl From<Progress> for SealProgress {
    fn from(p: Progress) -> Self {
        Self {
            sealed: p.sealed,
            threshold: p.threshold,
            holders: p.holders,
            received_from: p.received_from,
            seal_id: p.seal_id,
            reshare: p.reshare.map(|r| twokey_proto::vault::v1::ReshareProgress {
                plan_id: r.plan_id,
                threshold: r.threshold,
                holders: r.holders.iter().map(ShareHolder::from).collect(),
                started_by: r.started_by,
                received_from: r.received_from,
            }),
        }
    }
}

impl From<&HolderSpec> for ShareHolder {
    fn from(h: &HolderSpec) -> Self {
        Self {
            name: h.name.clone(),
            spiffe_id: h.spiffe_id.clone(),
            public_key: h.public_key.clone(),
        }
    }
}

#[tonic::async_trait]
impl<S: VaultStore> SealService for SealGrpc<S> {
    async fn unseal(
        &self,
        request: Request<UnsealRequest>,
    ) -> Result<Response<UnsealResponse>, Status> {
        let caller = self.member(&request)?;
        // The share's bytes are wiped when this call ends.
        let share = zeroize::Zeroizing::new(request.into_inner().share);
        let unsealer = self.unsealer()?;
        self.progress(unsealer).await;
        let _turning = self.turning.lock().await;
        let result = unsealer.submit(caller.as_str(), &share, std::time::Instant::now());
        self.audit(unseal::submission_event(caller.as_str(), &result))
            .await;
        match result {
            Ok(Submitted::Counted(progress)) => {
                tracing::info!(
                    "unseal: {caller}'s share taken, {} of {}",
                    progress.received_from.len(),
                    progress.threshold
                );
                Ok(Response::new(UnsealResponse {
                    progress: Some(progress.into()),
                }))
            }
            Ok(Submitted::Unsealed(key, progress)) => {
                if let Err(e) = (self.on_unseal)(key).await {
                    unsealer.reseal();
                    tracing::error!("the rebuilt key opened no vault: {e}");
                    return Err(Status::failed_precondition(format!(
                        "the shares rebuilt the key but the vault did not open: {e}; every received share was dropped"
                    )));
                }
                tracing::info!("unsealed by {} shares", progress.threshold);
                self.audit(unseal::unsealed_event(&progress)).await;
                Ok(Response::new(UnsealResponse {
                    progress: Some(progress.into()),
                }))
            }
            Err(e) => Err(to_status(&e)),
        }
    }

    async fn seal_status(
        &self,
        request: Request<SealStatusRequest>,
    ) -> Result<Response<SealStatusResponse>, Status> {
        self.member(&request)?;
        let unsealer = self.unsealer()?;
        Ok(Response::new(SealStatusResponse {
            progress: Some(self.progress(unsealer).await.into()),
        }))
    }

    async fn seal(&self, request: Request<SealRequest>) -> Result<Response<SealResponse>, Status> {
        let caller = self.member(&request)?;
        let unsealer = self.unsealer()?;
        let _turning = self.turning.lock().await;
        let Some(vault) = self.slot.get() else {
            return Err(to_status(&UnsealError::SealedAlready));
        };
        let consent = request.into_inner().consent;
        // M admins' consent, recorded with `vault.sealed` and the used
        // action id, durably, before anything is dropped.
        let admins = vault
            .seal(caller.as_str(), statements(consent.as_ref()))
            .await?;
        let progress = match unsealer.seal() {
            Ok(progress) => progress,
            Err(e) => return Err(to_status(&e)),
        };
        // From here on no call finds the vault; the calls in flight hold
        // it until they end (a release completes, with its audit event).
        self.slot.take();
        (self.on_seal)().await;
        let deadline = Instant::now() + SEAL_DRAIN;
        while Arc::strong_count(&vault) > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if Arc::strong_count(&vault) > 1 {
            tracing::warn!(
                "sealed; calls still in flight after {SEAL_DRAIN:?} hold the key until they end"
            );
        }
        drop(vault);
        tracing::warn!("sealed by {}", admins.join(", "));
        Ok(Response::new(SealResponse {
            admins,
            progress: Some(progress.into()),
        }))
    }

    async fn start_reshare(
        &self,
        request: Request<StartReshareRequest>,
    ) -> Result<Response<StartReshareResponse>, Status> {
        let caller = self.member(&request)?;
        let unsealer = self.unsealer()?;
        // A timed-out plan is dropped (and audited) before a new one starts.
        self.progress(unsealer).await;
        let request = request.into_inner();
        let holders: Vec<HolderSpec> = request
            .holders
            .into_iter()
            .map(|h| HolderSpec {
                name: h.name,
                spiffe_id: h.spiffe_id,
                public_key: h.public_key,
            })
            .collect();
        let result = unsealer.start_reshare(
            caller.as_str(),
            request.threshold,
            holders.clone(),
            std::time::Instant::now(),
        );
        self.audit(unseal::reshare_started_event(
            caller.as_str(),
            request.threshold,
            &holders,
            &result,
        ))
        .await;
        let progress = result.map_err(|e| to_status(&e))?;
        tracing::info!(
            "reshare {} started by {caller}",
            progress
                .reshare
                .as_ref()
                .map(|r| r.plan_id.as_str())
                .unwrap_or_default()
        );
        Ok(Response::new(StartReshareResponse {
            progress: Some(progress.into()),
        }))
    }

    async fn reshare(
        &self,
        request: Request<ReshareRequest>,
    ) -> Result<Response<ReshareResponse>, Status> {
        let caller = self.member(&request)?;
        let unsealer = self.unsealer()?.clone();
        // A timed-out plan is dropped (and audited) before this share.
        self.progress(&unsealer).await;
        let request = request.into_inner();
        let plan_id = request.plan_id;
        let share = zeroize::Zeroizing::new(request.share);
        // The K-th share writes and syncs files: off the async workers.
        let result = {
            let (caller, plan_id) = (caller.to_string(), plan_id.clone());
            tokio::task::spawn_blocking(move || {
                unsealer.submit_reshare(&caller, &plan_id, &share, std::time::Instant::now())
            })
            .await
            .map_err(|_| Status::unavailable("the vault is stopping; try again"))?
        };
        self.audit(unseal::reshare_share_event(
            caller.as_str(),
            &plan_id,
            &result,
        ))
        .await;
        match result {
            Ok(Reshared::Counted(progress)) => Ok(Response::new(ReshareResponse {
                progress: Some(progress.into()),
                seal_id: String::new(),
                shares: Vec::new(),
            })),
            Ok(Reshared::Done {
                old_seal_id,
                split,
                written,
                progress,
            }) => {
                tracing::warn!(
                    "reshared: seal {old_seal_id} replaced by {} ({} of {}); new shares in {}",
                    split.descriptor.seal_id,
                    split.descriptor.threshold,
                    split.descriptor.holders.len(),
                    written
                        .first()
                        .and_then(|p| p.parent())
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                );
                self.audit(unseal::reshared_event(&old_seal_id, &split.descriptor))
                    .await;
                Ok(Response::new(ReshareResponse {
                    progress: Some(progress.into()),
                    seal_id: split.descriptor.seal_id.clone(),
                    shares: split
                        .shares
                        .into_iter()
                        .map(|(holder, encrypted)| NewShare { holder, encrypted })
                        .collect(),
                }))
            }
            Err(e) => Err(to_status(&e)),
        }
    }
}

/// The admins' statements of a request (none without `consent`).
fn statements(consent: Option<&AdminConsent>) -> &[SignedStatement] {
    consent.map_or(&[], |c| c.statements.as_slice())
}

/// The key service: `RotateKey` for M admins' signed consent (carried by
/// any certificate of the trust domain; the statements are the authority)
/// and `KeyStatus` for any identity of the trust domain. While sealed,
/// both answer UNAVAILABLE.
pub struct KeyGrpc<S> {
    slot: VaultSlot<S>,
    auth: Authenticator,
}

impl<S> std::fmt::Debug for KeyGrpc<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyGrpc").finish_non_exhaustive()
    }
}

impl<S> KeyGrpc<S> {
    /// Serves the vault `slot` holds.
    pub fn new(slot: VaultSlot<S>, auth: Authenticator) -> Self {
        Self { slot, auth }
    }

    fn vault(&self) -> Result<Arc<Vault<S>>, Status> {
        self.slot.get().ok_or_else(|| {
            Status::unavailable("vault is sealed: unseal it first (`twokey vault status`)")
        })
    }
}

fn key_rotation(
    r: &crate::store::Rotation,
    remaining: u64,
    finished: Option<&crate::store::FinishedRotation>,
) -> twokey_proto::vault::v1::KeyRotation {
    let at = |secs: u64| to_timestamp(std::time::UNIX_EPOCH + Duration::from_secs(secs));
    twokey_proto::vault::v1::KeyRotation {
        generation: r.generation,
        action_id: r.action_id.clone(),
        admins: r
            .admins
            .split(',')
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect(),
        started_at: Some(at(r.started_at)),
        resealed: r.resealed,
        remaining,
        phase: if finished.is_some() {
            "finished".into()
        } else {
            r.cursor.phase().into()
        },
        finished_at: finished.map(|f| at(f.finished_at)),
        retired: finished.map(|f| f.retired.clone()).unwrap_or_default(),
    }
}

/// The keyring's state on the wire.
pub fn keyring_state(state: &crate::rotate::KeyState) -> twokey_proto::vault::v1::KeyringState {
    twokey_proto::vault::v1::KeyringState {
        current_generation: state.current,
        generations: state
            .generations
            .iter()
            .map(
                |&(generation, seeds)| twokey_proto::vault::v1::KeyGeneration { generation, seeds },
            )
            .collect(),
        rotation: state
            .rotation
            .as_ref()
            .map(|r| key_rotation(r, state.remaining, None)),
        last_rotation: state
            .last
            .as_ref()
            .map(|f| key_rotation(&f.rotation, 0, Some(f))),
        master: Some(twokey_proto::vault::v1::MasterKeyState {
            generation: state.master.generation,
            pending_generation: state.master.pending.unwrap_or(0),
            seal_mode: state.master.mode.clone(),
            seal_id: state.master.seal_id.clone(),
            replaced_at: state
                .master
                .last
                .as_ref()
                .map(|l| to_timestamp(std::time::UNIX_EPOCH + Duration::from_secs(l.replaced_at))),
        }),
    }
}

#[tonic::async_trait]
impl<S: VaultStore> twokey_proto::vault::v1::key_service_server::KeyService for KeyGrpc<S> {
    async fn rotate_key(
        &self,
        request: Request<twokey_proto::vault::v1::RotateKeyRequest>,
    ) -> Result<Response<twokey_proto::vault::v1::RotateKeyResponse>, Status> {
        let caller = self.auth.authenticate(&request)?;
        let vault = self.vault()?;
        let statements = request
            .get_ref()
            .consent
            .as_ref()
            .map(|c| c.statements.clone())
            .unwrap_or_default();
        let answer = vault.rotate_key(caller.as_str(), &statements).await?;
        Ok(Response::new(twokey_proto::vault::v1::RotateKeyResponse {
            started: answer.started,
            state: Some(keyring_state(&answer.state)),
            master_replaced: answer
                .replaced
                .map(|r| twokey_proto::vault::v1::MasterReplaced {
                    generation: r.master.generation,
                    seal_id: r.installed.seal_id,
                    files: r
                        .installed
                        .files
                        .iter()
                        .map(|f| f.display().to_string())
                        .collect(),
                }),
        }))
    }

    async fn key_status(
        &self,
        request: Request<twokey_proto::vault::v1::KeyStatusRequest>,
    ) -> Result<Response<twokey_proto::vault::v1::KeyStatusResponse>, Status> {
        self.auth.authenticate(&request)?;
        let vault = self.vault()?;
        let state = vault.key_status()?;
        Ok(Response::new(twokey_proto::vault::v1::KeyStatusResponse {
            state: Some(keyring_state(&state)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_timeout(value: &str) -> Request<()> {
        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert("grpc-timeout", value.parse().unwrap());
        request
    }

    #[test]
    fn the_callers_deadline_is_read_from_grpc_timeout() {
        let before = Instant::now();
        let left = |value: &str| {
            deadline_of(&with_timeout(value)).map(|d| d.saturating_duration_since(before))
        };
        for (value, at_least) in [
            ("3500m", Duration::from_millis(3500)),
            ("3S", Duration::from_secs(3)),
            ("2M", Duration::from_secs(120)),
            ("1H", Duration::from_secs(3600)),
            ("3500000u", Duration::from_millis(3500)),
            ("35000000n", Duration::from_millis(35)),
        ] {
            let left = left(value).unwrap_or_else(|| panic!("{value} not read"));
            assert!(
                left >= at_least && left < at_least + Duration::from_secs(1),
                "{value}: {left:?}"
            );
        }
        for bad in ["", "m", "5", "5x", "123456789m", "-5m", "1.5S"] {
            assert_eq!(left(bad), None, "{bad:?}");
        }
        assert_eq!(deadline_of(&Request::new(())), None);
    }
}

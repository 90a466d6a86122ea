//! Key rotation, online and crash-safe: M admins of the policy consent
//! (`ADMIN_ACTION_ROTATE_KEY`, no account); the vault adds a generation with
//! the rotation's progress record (one transaction, synced before any seed
//! uses it), re-seals seeds of older generations in small batches (each one
//! transaction and one sync, so codes are served between them), then, with
//! every writer of seeds held off, checks that no seed names an older
//! generation and retires those in the transaction that ends the rotation.
//! Killed anywhere, it resumes at the next start from its stored progress;
//! a seed always opens, under its old generation until it is re-sealed.
//! Every step is an audit event; none carries key material.

use std::{sync::Arc, time::Duration};

use twokey_consent::{
    AdminAction, AdminActionRequest, ConsentError, SignedStatement, check_admin_action,
};
use twokey_proto::audit::v1::Outcome;
use twokey_runtime::events::EventDraft;

use crate::{
    master::{MasterState, Replaced},
    service::{Vault, VaultError},
    store::{
        AccountRecord, AdminUse, FinishedRotation, NewGeneration, Rotation, RotationCursor,
        VaultStore, remember_until,
    },
};

/// How fast a rotation re-seals: seeds per batch, and a pause between
/// batches (a throttle; tests use it to land a kill mid-rotation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationPace {
    /// Seeds re-sealed per transaction.
    pub batch: usize,
    /// Pause after each batch.
    pub pause: Duration,
    /// Pause after each step of a master key replacement (a throttle;
    /// tests use it to land a kill between the steps).
    pub master_pause: Duration,
}

impl Default for RotationPace {
    fn default() -> Self {
        Self {
            batch: 64,
            pause: Duration::ZERO,
            master_pause: Duration::ZERO,
        }
    }
}

impl RotationPace {
    /// The pace from `TWOKEY_VAULT_ROTATION_BATCH` (seeds per batch),
    /// `TWOKEY_VAULT_ROTATION_PAUSE_MS` and
    /// `TWOKEY_VAULT_MASTER_PAUSE_MS`, each the default when unset; a
    /// value that does not parse is refused with what to write.
    pub fn from_env() -> Result<Self, String> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The pace from the variables `var` looks up.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let mut pace = Self::default();
        let read = |name: &str| -> Result<Option<u64>, String> {
            match var(name) {
                None => Ok(None),
                Some(v) => v.trim().parse::<u64>().map(Some).map_err(|_| {
                    format!("{name}={v:?} is not a whole number; set it to one, or unset it")
                }),
            }
        };
        if let Some(batch) = read("TWOKEY_VAULT_ROTATION_BATCH")? {
            if batch == 0 || batch > 10_000 {
                return Err(format!(
                    "TWOKEY_VAULT_ROTATION_BATCH={batch}: use 1 to 10000 seeds per batch"
                ));
            }
            pace.batch = usize::try_from(batch).unwrap_or(64);
        }
        if let Some(ms) = read("TWOKEY_VAULT_ROTATION_PAUSE_MS")? {
            pace.pause = Duration::from_millis(ms.min(60_000));
        }
        if let Some(ms) = read("TWOKEY_VAULT_MASTER_PAUSE_MS")? {
            pace.master_pause = Duration::from_millis(ms.min(60_000));
        }
        Ok(pace)
    }
}

/// Stops the vault's rotation worker when dropped: held by the task the
/// worker should not outlive (the sweeper, stopped at a seal and at
/// shutdown). The rotation resumes at the next start or unseal.
#[derive(Debug)]
pub struct StopsWorker<S: VaultStore>(pub Arc<Vault<S>>);

impl<S: VaultStore> Drop for StopsWorker<S> {
    fn drop(&mut self) {
        self.0.stop_rotation_worker();
    }
}

/// The keyring as `KeyStatus` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyState {
    /// The generation new seeds are sealed under.
    pub current: u32,
    /// Each generation held or named by a seed, with its seeds (accounts
    /// and kept seeds), oldest first.
    pub generations: Vec<(u32, u64)>,
    /// The rotation in progress.
    pub rotation: Option<Rotation>,
    /// Seeds still under an older generation than the rotation's.
    pub remaining: u64,
    /// The last finished rotation.
    pub last: Option<FinishedRotation>,
    /// The master key: its generation, a pending replacement, the seal.
    pub master: MasterState,
}

impl KeyState {
    /// Generations at least one seed names.
    pub fn in_use(&self) -> Vec<u32> {
        self.generations
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(g, _)| *g)
            .collect()
    }
}

/// What `RotateKey` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotateAnswer {
    /// This call started the rotation (false: it reports one started
    /// before, in progress or, for the same action id, finished).
    pub started: bool,
    /// The keyring now.
    pub state: KeyState,
    /// The master key this call replaced, and where its new seal material
    /// is (the shamir holders' new share files).
    pub replaced: Option<Replaced>,
}

fn rotation_request() -> AdminActionRequest {
    AdminActionRequest {
        account_id: String::new(),
        action: AdminAction::RotateKey,
    }
}

impl<S: VaultStore> Vault<S> {
    /// The keyring's generations, seeds per generation and the rotation's
    /// progress.
    pub fn key_status(&self) -> Result<KeyState, VaultError> {
        // From the store, the rotation first: the transaction that ends a
        // rotation removes its record and the retired generations at once,
        // so a status without a rotation never lists a retired generation
        // (the keys in memory are dropped only after that transaction).
        let rotation = self.store.rotation()?;
        let stored = self.store.keyring()?;
        let counts = self.store.seeds_per_generation()?;
        let mut generations: std::collections::BTreeMap<u32, u64> =
            stored.keys().map(|g| (*g, 0)).collect();
        generations.extend(counts.iter().map(|(g, n)| (*g, *n)));
        let remaining = rotation.as_ref().map_or(0, |r| {
            counts.range(..r.generation).map(|(_, n)| n).sum::<u64>()
        });
        Ok(KeyState {
            current: stored.keys().next_back().copied().unwrap_or(0),
            generations: generations.into_iter().collect(),
            rotation,
            remaining,
            last: self.store.last_rotation()?,
            master: self.master_state()?,
        })
    }

    /// Starts a key rotation for M admins' signed consent to
    /// `ADMIN_ACTION_ROTATE_KEY` of the vault (the policy's `[admins]` and
    /// threshold decide). While one is in progress it is reported, and no
    /// other started; the action id of the rotation in progress or of the
    /// last one answers that one again. The new generation and the
    /// rotation record are synced before any seed uses them; the answer
    /// waits for audit to acknowledge `key.rotation.started`. A refusal of
    /// consent is audited (`admin_action.refused`).
    pub async fn rotate_key(
        self: &Arc<Self>,
        caller: &str,
        consent: &[SignedStatement],
    ) -> Result<RotateAnswer, VaultError> {
        let _one_at_a_time = self.rotating.lock().await;
        let checked = match self.policy_now()? {
            None => Err(VaultError::NoPolicy),
            Some(policy) => check_admin_action(
                &policy,
                &rotation_request(),
                consent,
                self.clock().now(),
                &self.store,
            )
            .map(|v| (v, policy.admin_action_window()))
            .map_err(VaultError::Consent),
        };
        let in_progress = self.store.rotation()?;
        let (verified, window) = match checked {
            Ok(ok) => ok,
            Err(VaultError::Consent(ConsentError::AdminActionReplayed { action_id }))
                if in_progress
                    .as_ref()
                    .is_some_and(|r| r.action_id == action_id)
                    || self
                        .store
                        .last_rotation()?
                        .is_some_and(|l| l.rotation.action_id == action_id) =>
            {
                drop(_one_at_a_time);
                let replaced = self.resume_master().await?;
                self.spawn_worker();
                return Ok(RotateAnswer {
                    started: false,
                    state: self.key_status()?,
                    replaced,
                });
            }
            Err(e) => {
                if matches!(e, VaultError::Consent(_) | VaultError::NoPolicy) {
                    tracing::info!("rotate-key refused: {e}");
                    let event = EventDraft::new(caller, "admin_action.refused")
                        .outcome(Outcome::Denied)
                        .attr("admin_action", "rotate-key")
                        .attr(
                            "status",
                            format!(
                                "{:?}",
                                twokey_runtime::error::ServiceError::kind(&e).grpc_code()
                            ),
                        )
                        .attr("reason", e.to_string());
                    self.audit_refusal(event).await;
                }
                return Err(e);
            }
        };
        if in_progress.is_some() {
            drop(_one_at_a_time);
            let replaced = self.resume_master().await?;
            self.spawn_worker();
            return Ok(RotateAnswer {
                started: false,
                state: self.key_status()?,
                replaced,
            });
        }
        // No policy head is sealed between planning the master key's
        // replacement and its promotion.
        let _policy_held = self.applying.lock().await;
        let now = self.now();
        // Above every generation the store holds (the keys in memory may
        // still hold one a rotation that just ended retired).
        let generation = self
            .store
            .keyring()?
            .keys()
            .next_back()
            .map_or(1, |g| g.saturating_add(1));
        let admins = verified
            .admins
            .iter()
            .map(|a| a.spiffe_id.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let rotation = Rotation {
            generation,
            action_id: verified.action_id.clone(),
            admins: admins.clone(),
            started_at: now,
            resealed: 0,
            cursor: RotationCursor::Accounts(None),
            passes: 1,
        };
        let (data_key, sealed_key) = self.keys.new_data_key(generation);
        let planned =
            self.plan_master(generation, &sealed_key, &verified.action_id, &admins, now)?;
        let event = crate::service::admin_attrs(
            EventDraft::new(&admins, "key.rotation.started")
                .attr("generation", generation.to_string()),
            &verified,
        )
        .attr(
            "older_generations",
            self.keys
                .generations()
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
        )
        .attr(
            "next_master_generation",
            planned
                .as_ref()
                .map_or(String::new(), |(_, p)| p.generation.to_string()),
        );
        let seq = self.store.add_generation(NewGeneration {
            generation,
            sealed_key,
            with_generation_zero: false,
            rotation: Some(rotation),
            admin: Some(AdminUse {
                action_id: verified.action_id.clone(),
                action_until: remember_until(now, window + Duration::from_secs(60)),
                now,
                keep_until: now,
            }),
            pending_master: planned.as_ref().map(|(_, p)| p.clone()),
            event,
        })?;
        // Durable before any seed is sealed under it.
        self.store.commit().await?;
        self.keys.insert(generation, data_key);
        let replaced = match planned {
            None => None,
            Some((next, pending)) => Some(self.finish_master(next, &pending).await?),
        };
        drop(_policy_held);
        tracing::info!(generation, "key rotation started by {admins}");
        self.spawn_worker();
        self.commit_and_confirm(
            seq,
            "the rotation is started and runs, but audit has not acknowledged key.rotation.started yet",
        )
        .await?;
        Ok(RotateAnswer {
            started: true,
            state: self.key_status()?,
            replaced,
        })
    }

    /// At start: a rotation found in progress is resumed (logged and
    /// audited as `key.rotation.resumed`).
    pub async fn resume_rotation(self: &Arc<Self>) -> Result<(), VaultError> {
        let Some(rotation) = self.store.rotation()? else {
            return Ok(());
        };
        tracing::warn!(
            generation = rotation.generation,
            resealed = rotation.resealed,
            "resuming the key rotation interrupted at {}",
            rotation.cursor.phase()
        );
        let event = EventDraft::new(&rotation.admins, "key.rotation.resumed")
            .attr("generation", rotation.generation.to_string())
            .attr("action_id", &rotation.action_id)
            .attr("resealed", rotation.resealed.to_string())
            .attr("phase", rotation.cursor.phase());
        self.store.record(event)?;
        self.store.commit().await?;
        self.spawn_worker();
        Ok(())
    }

    /// Starts the rotation worker unless one runs.
    ///
    /// A worker decides to end under the same lock, after looking once more
    /// for a rotation (see [`Self::run_rotation`]), and the handle is stored
    /// before the lock is let go: a rotation started just as a worker
    /// ends is either seen by that worker or gets a worker of its own.
    fn spawn_worker(self: &Arc<Self>) {
        // Not while a master key replacement waits: its record holds the
        // keyring as it was, which a retirement would change.
        if !matches!(self.store.pending_master(), Ok(None)) {
            tracing::warn!(
                "the key rotation waits for the master key replacement to finish (restart the vault or repeat `twokey vault rotate-key`)"
            );
            return;
        }
        let mut worker = self.worker.lock().unwrap_or_else(|e| e.into_inner());
        if worker.as_ref().is_some_and(|w| !w.is_finished()) {
            return;
        }
        let this = self.clone();
        *worker = Some(tokio::spawn(async move {
            if let Err(e) = this.run_rotation().await {
                this.worker.lock().unwrap_or_else(|e| e.into_inner()).take();
                tracing::error!(
                    "key rotation stopped: {e}; it resumes at the next start or `twokey vault rotate-key`"
                );
            }
        }));
    }

    /// Stops the rotation worker (at shutdown); the rotation resumes at
    /// the next start.
    pub fn stop_rotation_worker(&self) -> Option<tokio::task::JoinHandle<()>> {
        let worker = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = &worker {
            w.abort();
        }
        worker
    }

    /// Re-seals batch after batch until the rotation ends.
    async fn run_rotation(&self) -> Result<(), VaultError> {
        loop {
            let Some(rotation) = self.store.rotation()? else {
                // Ends only if, under the worker lock, there is still none
                // (a rotation started meanwhile is run by this worker).
                let mut worker = self.worker.lock().unwrap_or_else(|e| e.into_inner());
                if self.store.rotation()?.is_none() {
                    worker.take();
                    return Ok(());
                }
                continue;
            };
            if rotation.cursor == RotationCursor::Check {
                self.check_and_retire(&rotation).await?;
                continue;
            }
            let target = rotation.generation;
            let keys = &self.keys;
            let reseal = |record: &AccountRecord| -> Result<AccountRecord, String> {
                let seed = keys
                    .open_seed(record.key_generation, &record.account_id, &record.sealed())
                    .map_err(|e| e.to_string())?;
                let sealed = keys
                    .seal_seed_as(target, &record.account_id, &seed)
                    .map_err(|e| e.to_string())?;
                let mut resealed = record.clone();
                resealed.set_sealed(&sealed);
                resealed.key_generation = target;
                Ok(resealed)
            };
            let batch = self.store.reseal_batch(
                self.pace.batch,
                &reseal,
                EventDraft::new(&rotation.admins, "key.rotation.batch"),
            )?;
            self.store.commit().await?;
            if batch.resealed > 0 {
                tracing::debug!(
                    generation = target,
                    resealed = batch.resealed,
                    "key rotation batch"
                );
            }
            if self.pace.pause.is_zero() {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(self.pace.pause).await;
            }
        }
    }

    /// With every writer of seeds held off: retires the older generations
    /// and ends the rotation if no seed names one (true), else starts
    /// another walk (false).
    async fn check_and_retire(&self, rotation: &Rotation) -> Result<bool, VaultError> {
        let _no_seed_written = self.seal_lock.write().await;
        let counts = self.store.seeds_per_generation()?;
        let older: u64 = counts.range(..rotation.generation).map(|(_, n)| n).sum();
        if older > 0 {
            tracing::info!(
                generation = rotation.generation,
                older,
                "seeds sealed under older generations meanwhile; walking again"
            );
            self.store.rewalk(
                EventDraft::new(&rotation.admins, "key.rotation.rewalk")
                    .attr("older_seeds", older.to_string()),
            )?;
            self.store.commit().await?;
            return Ok(false);
        }
        let retire: Vec<u32> = self
            .keys
            .generations()
            .into_iter()
            .filter(|g| *g < rotation.generation)
            .collect();
        let event = EventDraft::new(&rotation.admins, "key.rotation.finished")
            .attr("generation", rotation.generation.to_string())
            .attr("action_id", &rotation.action_id)
            .attr("resealed", rotation.resealed.to_string())
            .attr("passes", rotation.passes.to_string())
            .attr(
                "retired",
                retire
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            );
        self.store.finish_rotation(&retire, self.now(), event)?;
        self.store.commit().await?;
        self.keys.retire(&retire);
        tracing::info!(
            generation = rotation.generation,
            resealed = rotation.resealed,
            "key rotation finished; retired generations {retire:?}"
        );
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use base64::{Engine, engine::general_purpose::STANDARD as B64};
    use futures::future::BoxFuture;
    use twokey_consent::TrustRoot;
    use twokey_runtime::{
        durable::DurableDb, events::EventSigner, grant::GrantVerifier, identity::SpiffeId,
        keys::SecretKey, outbox::Outbox, shipper::AckTimeout, time::ManualClock,
    };
    use twokey_testkit::consent::{Person, admins_allowed_signers};

    use super::*;
    use crate::{
        crypto::MasterKey,
        master::{FileSeal, MasterSeal},
        seed::TotpParams,
        service::{AuditGate, AuditWait},
        store::PendingMaster,
        store::{KeptSeed, SledVaultStore},
    };

    /// Acknowledges every event at once.
    #[derive(Debug)]
    struct Acked;

    impl AuditGate for Acked {
        fn confirm(&self, _: u64, _: Duration) -> BoxFuture<'_, Result<(), AckTimeout>> {
            Box::pin(async { Ok(()) })
        }
    }

    const MASTER: [u8; 32] = [3; 32];

    fn master() -> MasterKey {
        MasterKey::new(SecretKey::from_bytes(MASTER))
    }

    fn seed_of(account: &str) -> Vec<u8> {
        format!("seed of {account} ..").into_bytes()
    }

    /// The vault over the store in `dir` (its keyring migrated or loaded).
    fn open(dir: &std::path::Path, batch: usize) -> (Arc<Vault<SledVaultStore>>, DurableDb) {
        let admins =
            ["adam", "anna"].map(|n| Person::generate(n, vec![format!("spiffe://t/user/{n}")]));
        let pace = RotationPace {
            batch,
            ..RotationPace::default()
        };
        open_with(dir, pace, &admins)
    }

    /// The vault over the store in `dir`, `admins` pinned (M = 2).
    fn open_with(
        dir: &std::path::Path,
        pace: RotationPace,
        admins: &[Person; 2],
    ) -> (Arc<Vault<SledVaultStore>>, DurableDb) {
        let (vault, db) = open_keyed(dir, master(), admins).unwrap();
        (Arc::new(vault.with_rotation_pace(pace)), db)
    }

    /// The vault over the store in `dir` opened with `key`.
    fn open_keyed(
        dir: &std::path::Path,
        key: MasterKey,
        admins: &[Person; 2],
    ) -> Result<(Vault<SledVaultStore>, DurableDb), VaultError> {
        let db = DurableDb::open(dir).unwrap();
        let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        let signer = EventSigner::new(
            SpiffeId::parse("spiffe://t/svc/vault").unwrap(),
            ed25519_dalek::SigningKey::from_bytes(&[7; 32]),
        );
        let outbox = Outbox::open(&db, signer, Arc::new(clock.clone())).unwrap();
        let store = SledVaultStore::open(&db, outbox).unwrap();
        let root = TrustRoot::from_allowed_signers(
            "t",
            &admins_allowed_signers(&[&admins[0], &admins[1]]),
            2,
        )
        .unwrap();
        let vault = Vault::open(
            store,
            key,
            GrantVerifier::new(ed25519_dalek::SigningKey::from_bytes(&[9; 32]).verifying_key()),
            AuditWait {
                gate: Arc::new(Acked),
                timeout: Duration::from_secs(1),
            },
            Arc::new(clock),
            root,
        )?;
        Ok((vault, db))
    }

    fn record(account: &str, generation: u32, sealed: &[u8]) -> AccountRecord {
        AccountRecord {
            account_id: account.into(),
            issuer: String::new(),
            label: String::new(),
            params: TotpParams::default(),
            seed_bits: 160,
            created_at: 0,
            last_used_at: None,
            sealed_seed: B64.encode(sealed),
            min_seconds_left: 0,
            last_step: None,
            disabled: false,
            key_generation: generation,
        }
    }

    /// `accounts` sealed under the keyring's newest generation, and one
    /// kept (replaced) seed of each of the first `kept`.
    fn put_seeds(vault: &Vault<SledVaultStore>, db: &DurableDb, accounts: usize, kept: usize) {
        let tree = db.tree("accounts").unwrap();
        let recovery = db.tree(crate::store::RECOVERY_TREE).unwrap();
        for i in 0..accounts {
            let id = format!("acct-{i:03}");
            let (generation, sealed) = vault.keys.seal_seed(&id, &seed_of(&id));
            let r = record(&id, generation, &sealed);
            tree.insert(&id, serde_json::to_vec(&r).unwrap()).unwrap();
            if i < kept {
                let old_seed = [b"kept ".as_slice(), &seed_of(&id)].concat();
                let (generation, sealed) = vault.keys.seal_seed(&id, &old_seed);
                let kept = vec![KeptSeed {
                    record: record(&id, generation, &sealed),
                    kept_at: 0,
                    until: u64::MAX / 2,
                    reason: "replaced".into(),
                    action_id: "a".into(),
                }];
                recovery
                    .insert(&id, serde_json::to_vec(&kept).unwrap())
                    .unwrap();
            }
        }
        db.sync_blocking().unwrap();
    }

    /// Every account's and kept seed's plaintext, opened as the vault opens them.
    fn opened(vault: &Vault<SledVaultStore>, db: &DurableDb) -> Vec<(String, Vec<u8>)> {
        let mut all = Vec::new();
        for r in vault.list().unwrap() {
            all.push((r.account_id.clone(), vault.open_seed(&r).unwrap().to_vec()));
        }
        for item in db.tree(crate::store::RECOVERY_TREE).unwrap().iter() {
            let (_, v) = item.unwrap();
            for kept in serde_json::from_slice::<Vec<KeptSeed>>(&v).unwrap() {
                let r = kept.record;
                let seed = vault
                    .keys
                    .open_seed(r.key_generation, &r.account_id, &r.sealed())
                    .unwrap();
                all.push((format!("kept {}", r.account_id), seed.to_vec()));
            }
        }
        all
    }

    fn expected(accounts: usize, kept: usize) -> Vec<(String, Vec<u8>)> {
        let mut all: Vec<_> = (0..accounts)
            .map(|i| {
                let id = format!("acct-{i:03}");
                (id.clone(), seed_of(&id))
            })
            .collect();
        all.extend((0..kept).map(|i| {
            let id = format!("acct-{i:03}");
            (
                format!("kept {id}"),
                [b"kept ".as_slice(), &seed_of(&id)].concat(),
            )
        }));
        all
    }

    /// Starts a rotation as `rotate_key` does once consent verified.
    async fn start(vault: &Arc<Vault<SledVaultStore>>) -> u32 {
        let generation = vault.keys.current() + 1;
        let (key, sealed_key) = vault.keys.new_data_key(generation);
        vault
            .store
            .add_generation(NewGeneration {
                generation,
                sealed_key,
                with_generation_zero: false,
                rotation: Some(Rotation {
                    generation,
                    action_id: format!("rot-{generation}"),
                    admins: "spiffe://t/user/adam,spiffe://t/user/anna".into(),
                    started_at: 1,
                    resealed: 0,
                    cursor: RotationCursor::Accounts(None),
                    passes: 1,
                }),
                admin: None,
                pending_master: None,
                event: EventDraft::new("admins", "key.rotation.started"),
            })
            .unwrap();
        vault.store.commit().await.unwrap();
        vault.keys.insert(generation, key);
        generation
    }

    /// One batch, as the worker runs it.
    async fn one_batch(vault: &Vault<SledVaultStore>) -> Option<Rotation> {
        let target = vault.store.rotation().unwrap().unwrap().generation;
        let keys = &vault.keys;
        let reseal = |r: &AccountRecord| -> Result<AccountRecord, String> {
            let seed = keys
                .open_seed(r.key_generation, &r.account_id, &r.sealed())
                .map_err(|e| e.to_string())?;
            let mut out = r.clone();
            out.set_sealed(&keys.seal_seed_as(target, &r.account_id, &seed).unwrap());
            out.key_generation = target;
            Ok(out)
        };
        let batch = vault
            .store
            .reseal_batch(
                vault.pace.batch,
                &reseal,
                EventDraft::new("admins", "key.rotation.batch"),
            )
            .unwrap();
        vault.store.commit().await.unwrap();
        batch.rotation
    }

    async fn finish(vault: &Arc<Vault<SledVaultStore>>) {
        vault.resume_rotation().await.unwrap();
        let worker = vault.worker.lock().unwrap().take();
        if let Some(worker) = worker {
            worker.await.unwrap();
        }
        assert_eq!(vault.store.rotation().unwrap(), None);
    }

    #[tokio::test]
    async fn a_store_written_before_the_keyring_opens_and_rotates_to_one_generation() {
        let dir = tempfile::tempdir().unwrap();
        {
            // Written the old way: the key check, seeds sealed under the
            // master key, records without a generation.
            let db = DurableDb::open(dir.path()).unwrap();
            db.tree("meta")
                .unwrap()
                .insert("key_check", master().key_check())
                .unwrap();
            let old = r#"{"account_id":"old-root","issuer":"Amazon Web Services","label":"root","params":{"algorithm":"Sha1","digits":6,"period":30},"seed_bits":160,"created_at":1700000000,"last_used_at":null,"sealed_seed":"SEALED"}"#
                .replace("SEALED", &B64.encode(master().seal_seed("old-root", b"an old seed")));
            db.tree("accounts")
                .unwrap()
                .insert("old-root", old.as_bytes())
                .unwrap();
            db.sync_blocking().unwrap();
        }
        let (vault, db) = open(dir.path(), 2);
        // Generation 0 (the master key) stays for the old seed; new seeds
        // get generation 1.
        assert_eq!(vault.keys.generations(), [0, 1]);
        assert_eq!(vault.keys.current(), 1);
        let old = vault.store.get("old-root").unwrap().unwrap();
        assert_eq!(old.key_generation, 0);
        assert_eq!(vault.open_seed(&old).unwrap().as_slice(), b"an old seed");
        put_seeds(&vault, &db, 3, 0);
        let state = vault.key_status().unwrap();
        assert_eq!(state.generations, [(0, 1), (1, 3)]);
        assert_eq!(state.in_use(), [0, 1]);
        let generation = start(&vault).await;
        assert_eq!(generation, 2);
        assert_eq!(vault.key_status().unwrap().remaining, 4);
        finish(&vault).await;
        let state = vault.key_status().unwrap();
        assert_eq!(state.generations, [(2, 4)]);
        assert_eq!(state.in_use(), [2]);
        assert_eq!(state.last.as_ref().unwrap().retired, [0, 1]);
        assert_eq!(vault.keys.generations(), [2]);
        assert_eq!(
            vault
                .store
                .keyring()
                .unwrap()
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            [2]
        );
        let old = vault.store.get("old-root").unwrap().unwrap();
        assert_eq!(vault.open_seed(&old).unwrap().as_slice(), b"an old seed");
        // Nothing opens under the master key directly any more.
        assert!(master().open_seed("old-root", &old.sealed()).is_err());
        drop((vault, db));
        // And it all reopens from disk.
        let (vault, _db) = open(dir.path(), 2);
        assert_eq!(vault.keys.generations(), [2]);
        let old = vault.store.get("old-root").unwrap().unwrap();
        assert_eq!(vault.open_seed(&old).unwrap().as_slice(), b"an old seed");
    }

    #[tokio::test]
    async fn a_new_vault_seals_its_first_seeds_under_generation_1_not_the_master_key() {
        let dir = tempfile::tempdir().unwrap();
        let (vault, db) = open(dir.path(), 2);
        assert_eq!(vault.keys.generations(), [1]);
        put_seeds(&vault, &db, 1, 0);
        let r = vault.store.get("acct-000").unwrap().unwrap();
        assert_eq!(r.key_generation, 1);
        assert!(master().open_seed("acct-000", &r.sealed()).is_err());
        // The data key is stored sealed: the master key's bytes and no
        // 32-byte key appear in the keyring in the clear.
        let stored = vault.store.keyring().unwrap();
        assert_eq!(stored.len(), 1);
        assert!(!stored[&1].windows(32).any(|w| w == MASTER));
    }

    #[tokio::test]
    async fn a_rotation_resumes_from_each_persisted_phase_and_every_seed_opens_throughout() {
        for phase in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let (vault, db) = open(dir.path(), 3);
            put_seeds(&vault, &db, 10, 4);
            start(&vault).await;
            // Walk until the stored progress is at the phase asked for.
            let at = |r: &Rotation| {
                matches!(
                    (&r.cursor, phase),
                    (RotationCursor::Accounts(None), 0)
                        | (RotationCursor::Accounts(Some(_)), 1)
                        | (RotationCursor::Kept(None), 2)
                        | (RotationCursor::Kept(Some(_)), 3)
                        | (RotationCursor::Check, 4)
                )
            };
            let mut seen = Vec::new();
            while !at(&vault.store.rotation().unwrap().unwrap()) {
                let r = one_batch(&vault).await.unwrap();
                seen.push(r.cursor.phase());
                assert_eq!(opened(&vault, &db), expected(10, 4), "phase {phase}");
            }
            let before = vault.store.rotation().unwrap().unwrap();
            // "Killed": the process ends with the rotation part done.
            drop((vault, db));
            let (vault, db) = open(dir.path(), 3);
            assert_eq!(
                vault.store.rotation().unwrap().as_ref(),
                Some(&before),
                "phase {phase}"
            );
            assert_eq!(vault.keys.generations(), [1, 2], "phase {phase}");
            assert_eq!(opened(&vault, &db), expected(10, 4), "phase {phase}");
            finish(&vault).await;
            let state = vault.key_status().unwrap();
            assert_eq!(state.generations, [(2, 14)], "phase {phase}");
            assert_eq!(state.last.unwrap().rotation.resealed, 14, "phase {phase}");
            assert_eq!(opened(&vault, &db), expected(10, 4), "phase {phase}");
        }
    }

    #[tokio::test]
    async fn an_older_generation_is_retired_only_when_no_seed_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let (vault, db) = open(dir.path(), 50);
        put_seeds(&vault, &db, 5, 1);
        start(&vault).await;
        // New seeds are sealed under the rotation's generation from its start.
        assert_eq!(vault.keys.seal_seed("new", b"new seed").0, 2);
        while vault.store.rotation().unwrap().unwrap().cursor != RotationCursor::Check {
            one_batch(&vault).await;
        }
        // A seed written under generation 1 after the walk passed it (as a
        // restore moving a kept seed back could).
        let late = vault.keys.seal_seed_as(1, "late", b"late seed").unwrap();
        db.tree("accounts")
            .unwrap()
            .insert(
                "late",
                serde_json::to_vec(&record("late", 1, &late)).unwrap(),
            )
            .unwrap();
        let rotation = vault.store.rotation().unwrap().unwrap();
        assert!(!vault.check_and_retire(&rotation).await.unwrap());
        // Not retired: walked again from the start.
        assert_eq!(vault.keys.generations(), [1, 2]);
        assert!(vault.store.keyring().unwrap().contains_key(&1));
        let rotation = vault.store.rotation().unwrap().unwrap();
        assert_eq!(rotation.cursor, RotationCursor::Accounts(None));
        assert_eq!(rotation.passes, 2);
        let late = vault.store.get("late").unwrap().unwrap();
        assert_eq!(vault.open_seed(&late).unwrap().as_slice(), b"late seed");
        finish(&vault).await;
        assert_eq!(vault.keys.generations(), [2]);
        let late = vault.store.get("late").unwrap().unwrap();
        assert_eq!(late.key_generation, 2);
        assert_eq!(vault.open_seed(&late).unwrap().as_slice(), b"late seed");
        let finished = vault.store.last_rotation().unwrap().unwrap();
        assert_eq!(finished.retired, [1]);
        assert_eq!(finished.rotation.passes, 2);
    }

    #[tokio::test]
    async fn a_second_rotation_is_refused_while_one_is_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let (vault, _db) = open(dir.path(), 2);
        start(&vault).await;
        let (_, sealed_key) = vault.keys.new_data_key(3);
        let err = vault
            .store
            .add_generation(NewGeneration {
                generation: 3,
                sealed_key,
                with_generation_zero: false,
                rotation: Some(vault.store.rotation().unwrap().unwrap()),
                admin: None,
                pending_master: None,
                event: EventDraft::new("admins", "key.rotation.started"),
            })
            .unwrap_err();
        assert!(
            matches!(err, crate::store::VaultStoreError::Rotating(2)),
            "{err:?}"
        );
        assert_eq!(
            vault
                .store
                .keyring()
                .unwrap()
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            [1, 2]
        );
    }

    #[tokio::test]
    async fn a_rotation_in_progress_is_reported_and_its_own_action_id_answers_again() {
        use twokey_consent::{admin_binding, new_statement, sign_statement};
        use twokey_testkit::consent::{AccountRoles, PolicySpec, sign_policy};
        let dir = tempfile::tempdir().unwrap();
        let person = |n: &str| Person::generate(n, vec![format!("spiffe://t/user/{n}")]);
        let admins = [person("adam"), person("anna")];
        // One seed per batch and a long pause: the rotation stays in progress.
        let pace = RotationPace {
            batch: 1,
            pause: Duration::from_secs(600),
            ..RotationPace::default()
        };
        let (vault, db) = open_with(dir.path(), pace, &admins);
        put_seeds(&vault, &db, 5, 0);
        let others = [person("alice"), person("bob"), person("olivia")];
        let everyone: Vec<&Person> = others.iter().chain(&admins).collect();
        let doc = PolicySpec::adam_and_anna(
            1,
            "t",
            &everyone,
            vec![AccountRoles::new("acct-000", "alice", "bob", "olivia")],
        )
        .to_toml();
        let sigs: Vec<Vec<u8>> = admins
            .iter()
            .map(|a| sign_policy(&a.key, "t", &doc))
            .collect();
        vault
            .apply_policy("spiffe://t/svc/broker", &doc, &sigs)
            .await
            .unwrap();
        let now = vault.clock().now();
        let consent = |who: &[&Person], id: &str| -> Vec<SignedStatement> {
            who.iter()
                .map(|p| {
                    let s = new_statement(
                        1,
                        &p.ids[0],
                        now,
                        admin_binding("", AdminAction::RotateKey, id),
                    );
                    sign_statement(&p.key, "t", &s).unwrap()
                })
                .collect()
        };
        let both = [&admins[0], &admins[1]];
        let first = vault
            .rotate_key("caller", &consent(&both, "rot-a"))
            .await
            .unwrap();
        assert!(first.started);
        assert_eq!(first.state.rotation.as_ref().unwrap().generation, 2);
        // Another action while it runs: reported, nothing started, the new
        // action id left unused.
        let other = vault
            .rotate_key("caller", &consent(&both, "rot-b"))
            .await
            .unwrap();
        assert!(!other.started);
        assert_eq!(other.state.rotation.as_ref().unwrap().action_id, "rot-a");
        assert_eq!(vault.store.keyring().unwrap().len(), 2);
        assert!(!twokey_consent::AdminHistory::action_id_used(
            &vault.store,
            "rot-b"
        ));
        // Its own statements again (a retry): the same rotation.
        let again = vault
            .rotate_key("caller", &consent(&both, "rot-a"))
            .await
            .unwrap();
        assert!(!again.started);
        assert_eq!(again.state.rotation.unwrap().generation, 2);
        // One admin is refused even while one runs.
        let err = vault
            .rotate_key("caller", &consent(&[&admins[0]], "rot-c"))
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                VaultError::Consent(ConsentError::TooFewAdmins { need: 2, .. })
            ),
            "{err:?}"
        );
        vault.stop_rotation_worker();
    }

    fn person(n: &str) -> Person {
        Person::generate(n, vec![format!("spiffe://t/user/{n}")])
    }

    /// Both admins sign and apply policy `version` (its head is sealed
    /// under the master key).
    async fn apply_policy(
        vault: &Vault<SledVaultStore>,
        admins: &[Person; 2],
        version: u64,
    ) -> Result<crate::store::StoredPolicy, VaultError> {
        use twokey_testkit::consent::{AccountRoles, PolicySpec, sign_policy};
        let others = [person("alice"), person("bob"), person("olivia")];
        let everyone: Vec<&Person> = others.iter().chain(admins).collect();
        let doc = PolicySpec::adam_and_anna(
            version,
            "t",
            &everyone,
            vec![AccountRoles::new("acct-000", "alice", "bob", "olivia")],
        )
        .to_toml();
        let sigs: Vec<Vec<u8>> = admins
            .iter()
            .map(|a| sign_policy(&a.key, "t", &doc))
            .collect();
        vault
            .apply_policy("spiffe://t/svc/broker", &doc, &sigs)
            .await
    }

    /// Step 1 of a rotation that replaces the master key, as `rotate_key`
    /// does it: the new generation, the rotation and the pending master
    /// key in one synced transaction.
    async fn start_replacing(vault: &Vault<SledVaultStore>) -> (MasterKey, PendingMaster) {
        let _held = vault.applying.lock().await;
        let generation = vault.store.keyring().unwrap().keys().next_back().unwrap() + 1;
        let (key, sealed_key) = vault.keys.new_data_key(generation);
        let (next, pending) = vault
            .plan_master(generation, &sealed_key, "rot-m", "admins", 1)
            .unwrap()
            .unwrap();
        vault
            .store
            .add_generation(NewGeneration {
                generation,
                sealed_key,
                with_generation_zero: false,
                rotation: Some(Rotation {
                    generation,
                    action_id: "rot-m".into(),
                    admins: "admins".into(),
                    started_at: 1,
                    resealed: 0,
                    cursor: RotationCursor::Accounts(None),
                    passes: 1,
                }),
                admin: None,
                pending_master: Some(pending.clone()),
                event: EventDraft::new("admins", "key.rotation.started"),
            })
            .unwrap();
        vault.store.commit().await.unwrap();
        vault.keys.insert(generation, key);
        (next, pending)
    }

    /// A store with one seed sealed before the keyring (generation 0, the
    /// master key itself).
    fn write_generation_zero_seed(dir: &std::path::Path) {
        let db = DurableDb::open(dir).unwrap();
        db.tree("meta")
            .unwrap()
            .insert("key_check", master().key_check())
            .unwrap();
        let mut old = record(
            "old-root",
            0,
            &master().seal_seed("old-root", b"an old seed"),
        );
        old.key_generation = 0;
        db.tree("accounts")
            .unwrap()
            .insert("old-root", serde_json::to_vec(&old).unwrap())
            .unwrap();
        db.sync_blocking().unwrap();
    }

    #[tokio::test]
    async fn a_master_key_replacement_stopped_after_each_step_reopens_with_what_the_seal_gives() {
        for stop in 1..=3u8 {
            let dir = tempfile::tempdir().unwrap();
            let data = dir.path().join("data");
            let key_file = dir.path().join("master.key");
            SecretKey::from_bytes(MASTER).write(&key_file).unwrap();
            let seal: Arc<dyn MasterSeal> = Arc::new(FileSeal {
                path: key_file.clone(),
            });
            let admins = [person("adam"), person("anna")];
            write_generation_zero_seed(&data);
            let (vault, db) = open_keyed(&data, master(), &admins).unwrap();
            let vault = vault.with_master_seal(seal.clone());
            assert_eq!(vault.keys.generations(), [0, 1]);
            put_seeds(&vault, &db, 6, 2);
            apply_policy(&vault, &admins, 1).await.unwrap();
            let before = opened(&vault, &db);
            assert_eq!(before.len(), 9, "stop {stop}");
            let (next, pending) = start_replacing(&vault).await;
            assert_eq!(pending.generation, 2);
            assert_eq!(
                pending.keyring.keys().copied().collect::<Vec<_>>(),
                [0, 1, 2]
            );
            // Pending: no policy is applied (its head is sealed for the next key).
            let err = apply_policy(&vault, &admins, 2).await.unwrap_err();
            assert!(
                matches!(&err, VaultError::MasterSeal(m) if m.contains("master key replacement is pending")),
                "{err:?}"
            );
            match stop {
                1 => {}
                2 => {
                    seal.install(next.secret()).unwrap();
                }
                _ => {
                    let replaced = vault.finish_master(next, &pending).await.unwrap();
                    assert_eq!(replaced.master.generation, 2);
                    assert_eq!(replaced.installed.files, std::slice::from_ref(&key_file));
                }
            }
            // "Killed" after step `stop`; started with what the key file holds.
            drop((vault, db));
            let given = MasterKey::new(SecretKey::load(&key_file).unwrap());
            let (vault, db) = open_keyed(&data, given, &admins).unwrap();
            let vault = vault.with_master_seal(seal.clone());
            let resumed = vault.resume_master().await.unwrap();
            assert_eq!(resumed.is_some(), stop == 1, "stop {stop}");
            let state = vault.master_state().unwrap();
            assert_eq!(state.generation, 2, "stop {stop}");
            assert_eq!(state.pending, None, "stop {stop}");
            assert_eq!(state.mode, "file");
            assert!(vault.active_policy().is_some(), "stop {stop}");
            assert_eq!(opened(&vault, &db), before, "stop {stop}");
            let on_disk = SecretKey::load(&key_file).unwrap();
            assert_ne!(on_disk.expose(), &MASTER, "stop {stop}");
            // The key file is private (0600).
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "stop {stop}");
            // No data key is sealed under the old master key any more.
            for (g, sealed) in vault.store.keyring().unwrap() {
                assert!(master().open_data_key(g, &sealed).is_err(), "stop {stop}");
            }
            drop((vault, db));
            // The old key (an old copy of the key file) opens nothing.
            let err = open_keyed(&data, master(), &admins).unwrap_err();
            assert!(matches!(err, VaultError::WrongMasterKey), "{err:?}");
            // The new one opens everything, the policy head too, and the
            // rotation goes on to retire generations 0 and 1.
            let (vault, db) = open_keyed(&data, MasterKey::new(on_disk), &admins).unwrap();
            let vault = Arc::new(vault.with_master_seal(seal.clone()));
            assert_eq!(opened(&vault, &db), before, "stop {stop}");
            apply_policy(&vault, &admins, 2).await.unwrap();
            finish(&vault).await;
            assert_eq!(vault.keys.generations(), [2], "stop {stop}");
            assert_eq!(opened(&vault, &db), before, "stop {stop}");
        }
    }

    #[tokio::test]
    async fn seal_material_that_cannot_be_written_leaves_the_current_key_in_force_until_retried() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let admins = [person("adam"), person("anna")];
        // A key file in a directory that does not exist: the write fails.
        let broken: Arc<dyn MasterSeal> = Arc::new(FileSeal {
            path: dir.path().join("missing").join("master.key"),
        });
        let (vault, db) = open_keyed(&data, master(), &admins).unwrap();
        let vault = vault.with_master_seal(broken);
        put_seeds(&vault, &db, 3, 1);
        let before = opened(&vault, &db);
        let (next, pending) = start_replacing(&vault).await;
        let err = vault.finish_master(next, &pending).await.unwrap_err();
        assert!(
            matches!(&err, VaultError::MasterSeal(m) if m.contains("could not be written") && m.contains("serves under the current master key")),
            "{err:?}"
        );
        assert!(!format!("{err}").contains(&B64.encode(MASTER)));
        assert_eq!(vault.master_state().unwrap().pending, Some(2));
        assert_eq!(opened(&vault, &db), before);
        drop((vault, db));
        // The old key still opens; with a working seal the next start finishes.
        let key_file = dir.path().join("master.key");
        SecretKey::from_bytes(MASTER).write(&key_file).unwrap();
        let (vault, db) = open_keyed(&data, master(), &admins).unwrap();
        let vault = vault.with_master_seal(Arc::new(FileSeal {
            path: key_file.clone(),
        }));
        assert_eq!(opened(&vault, &db), before);
        assert!(vault.resume_master().await.unwrap().is_some());
        assert_eq!(vault.master_state().unwrap().generation, 2);
        drop((vault, db));
        assert!(matches!(
            open_keyed(&data, master(), &admins).unwrap_err(),
            VaultError::WrongMasterKey
        ));
        let given = MasterKey::new(SecretKey::load(&key_file).unwrap());
        let (vault, db) = open_keyed(&data, given, &admins).unwrap();
        assert_eq!(opened(&vault, &db), before);
    }

    #[test]
    fn the_pace_comes_from_its_variables_or_is_refused_with_what_to_write() {
        let vars = |batch: Option<&str>, pause: Option<&str>| {
            let (batch, pause) = (batch.map(str::to_owned), pause.map(str::to_owned));
            RotationPace::from_vars(move |name| match name {
                "TWOKEY_VAULT_ROTATION_BATCH" => batch.clone(),
                "TWOKEY_VAULT_ROTATION_PAUSE_MS" => pause.clone(),
                _ => None,
            })
        };
        assert_eq!(vars(None, None).unwrap(), RotationPace::default());
        assert_eq!(
            vars(Some("2"), Some("150")).unwrap(),
            RotationPace {
                batch: 2,
                pause: Duration::from_millis(150),
                master_pause: Duration::ZERO,
            }
        );
        assert_eq!(
            vars(Some("0"), None).unwrap_err(),
            "TWOKEY_VAULT_ROTATION_BATCH=0: use 1 to 10000 seeds per batch"
        );
        assert_eq!(
            vars(None, Some("soon")).unwrap_err(),
            "TWOKEY_VAULT_ROTATION_PAUSE_MS=\"soon\" is not a whole number; set it to one, or unset it"
        );
    }
}

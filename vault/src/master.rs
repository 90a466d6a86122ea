//! Replacing the master key with each rotation, crash-safe, in every seal
//! mode. Three steps: (1) the transaction that starts the rotation also
//! records the next master key sealed under the current one, with the
//! keyring, the key check and the policy head sealed under the next
//! ([`PendingMaster`]), synced; (2) the next key's seal material is written
//! durably ([`MasterSeal::install`]: temporary file, fsync, rename,
//! directory fsync); (3) one transaction promotes the pending copies and
//! drops the old ones, synced. At start, the key the seal material gives
//! decides: the current key with a pending record resumes (2) then (3);
//! only the pending key check matching means (2) was done: promote. From
//! (3) on, the old key file, the old shares with the old descriptor or the
//! old wrapped blob open nothing. Every step is an audit event
//! (`key.master.sealed`, `key.master.replaced`, `key.master.resumed`); none
//! carries key material.

use std::{
    collections::BTreeMap,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use twokey_runtime::{events::EventDraft, keys::SecretKey};
use zeroize::Zeroizing;

use crate::{
    crypto::MasterKey,
    hsm,
    keyring::KeyringError,
    service::{Vault, VaultError},
    store::{PendingMaster, ReplacedMaster, VaultStore},
    unseal::Unsealer,
};

/// What a new master key's seal material was written as.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    /// The new seal id (shamir, pkcs11), else empty.
    pub seal_id: String,
    /// The files written (the new share files, the key file, the
    /// descriptor).
    pub files: Vec<PathBuf>,
}

/// Writes a master key's seal material so that the next start gets that
/// key, in place of the current material. Implementations write durably
/// and atomically: until the material is in place the old one is whole.
pub trait MasterSeal: Send + Sync + std::fmt::Debug + 'static {
    /// The seal mode: `file`, `shamir` or `pkcs11`.
    fn mode(&self) -> &'static str;
    /// Writes `key`'s seal material in place of the current one.
    fn install(&self, key: &SecretKey) -> Result<Installed, String>;
    /// The seal id in force (shamir, pkcs11), else empty.
    fn seal_id(&self) -> String;
}

/// Replaces `path` with `bytes` (mode 0600): a temporary file beside it,
/// synced, renamed over it, the directory synced.
pub fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.next.tmp"));
    // A temporary file a crash left behind holds nothing in force.
    let _ = std::fs::remove_file(&temp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(format!("writing {}: {e}", temp.display()));
    }
    std::fs::rename(&temp, path).map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        format!("renaming {} to {}: {e}", temp.display(), path.display())
    })?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("syncing the directory {}: {e}", dir.display()))
}

/// The `file` mode: the master key file (`master_key_file`), base64.
#[derive(Debug, Clone)]
pub struct FileSeal {
    /// The master key file.
    pub path: PathBuf,
}

impl MasterSeal for FileSeal {
    fn mode(&self) -> &'static str {
        "file"
    }

    fn install(&self, key: &SecretKey) -> Result<Installed, String> {
        let text = Zeroizing::new(format!("{}\n", B64.encode(key.expose())));
        replace_file(&self.path, text.as_bytes()).map_err(|e| format!("master key file: {e}"))?;
        Ok(Installed {
            seal_id: String::new(),
            files: vec![self.path.clone()],
        })
    }

    fn seal_id(&self) -> String {
        String::new()
    }
}

/// The `pkcs11` mode: the descriptor (`seal.toml`) holding the master key
/// wrapped by the HSM's key.
#[derive(Debug, Clone)]
pub struct HsmSeal {
    /// How to reach the wrapping key.
    pub settings: hsm::Settings,
    /// The descriptor file.
    pub path: PathBuf,
}

impl MasterSeal for HsmSeal {
    fn mode(&self) -> &'static str {
        hsm::MODE
    }

    fn install(&self, key: &SecretKey) -> Result<Installed, String> {
        let wrapped = hsm::wrap(&self.settings, key).map_err(|e| e.to_string())?;
        let text = toml::to_string(&wrapped.descriptor)
            .map_err(|e| format!("pkcs11: encoding the seal descriptor: {e}"))?;
        replace_file(&self.path, text.as_bytes()).map_err(|e| format!("pkcs11: {e}"))?;
        Ok(Installed {
            seal_id: wrapped.descriptor.seal_id,
            files: vec![self.path.clone()],
        })
    }

    fn seal_id(&self) -> String {
        hsm::Descriptor::load(&self.path)
            .map(|d| d.seal_id)
            .unwrap_or_default()
    }
}

/// The `shamir` mode: the key split anew to the same holders and K.
#[derive(Debug, Clone)]
pub struct ShamirSeal(pub Arc<Unsealer>);

impl MasterSeal for ShamirSeal {
    fn mode(&self) -> &'static str {
        "shamir"
    }

    fn install(&self, key: &SecretKey) -> Result<Installed, String> {
        let (descriptor, files) = self.0.replace_key(key).map_err(|e| e.to_string())?;
        Ok(Installed {
            seal_id: descriptor.seal_id,
            files,
        })
    }

    fn seal_id(&self) -> String {
        self.0.descriptor().seal_id
    }
}

/// A master key replacement that completed: what the store promoted and
/// where the new seal material is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replaced {
    /// The promoted generation and when.
    pub master: ReplacedMaster,
    /// Where the new seal material was written.
    pub installed: Installed,
}

/// The master key as `KeyStatus` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterState {
    /// The master key's generation (1 until the first replacement).
    pub generation: u32,
    /// The generation of a replacement waiting for its seal material or
    /// promotion.
    pub pending: Option<u32>,
    /// The seal mode (empty when the vault replaces no master key).
    pub mode: String,
    /// The seal id in force (shamir, pkcs11).
    pub seal_id: String,
    /// The last replacement.
    pub last: Option<ReplacedMaster>,
}

/// At start, the key given is the pending one: its seal material was
/// written before a stop, so promote (synced before the vault serves).
pub(crate) fn promote_at_start<S: VaultStore>(
    store: &S,
    pending: &PendingMaster,
    now: u64,
) -> Result<(), VaultError> {
    let replaced = ReplacedMaster {
        generation: pending.generation,
        action_id: pending.action_id.clone(),
        replaced_at: now,
    };
    let event = EventDraft::new(&pending.admins, "key.master.replaced")
        .attr("master_generation", pending.generation.to_string())
        .attr("action_id", &pending.action_id)
        .attr("resumed", "at start, the new seal material in place");
    store.promote_master(&replaced, event)?;
    store.sync_now()?;
    tracing::warn!(
        master_generation = pending.generation,
        "the master key replacement interrupted after its seal material was written is promoted"
    );
    Ok(())
}

impl<S: VaultStore> Vault<S> {
    /// The master key's generation, pending replacement and seal.
    pub fn master_state(&self) -> Result<MasterState, VaultError> {
        Ok(MasterState {
            generation: self.store.master_generation()?,
            pending: self.store.pending_master()?.map(|p| p.generation),
            mode: self
                .master_seal
                .as_ref()
                .map_or(String::new(), |s| s.mode().to_owned()),
            seal_id: self
                .master_seal
                .as_ref()
                .map_or(String::new(), |s| s.seal_id()),
            last: self.store.last_master()?,
        })
    }

    /// Step 1's record for a rotation adding `generation` (its data key
    /// `sealed_key` under the current master key): a next master key and
    /// everything sealed under it. None when the vault replaces no master
    /// key. The caller holds `applying` (no policy head changes meanwhile).
    pub(crate) fn plan_master(
        &self,
        generation: u32,
        sealed_key: &[u8],
        action_id: &str,
        admins: &str,
        now: u64,
    ) -> Result<Option<(MasterKey, PendingMaster)>, VaultError> {
        if self.master_seal.is_none() {
            return Ok(None);
        }
        let current = self.keys.master();
        let next = MasterKey::new(SecretKey::generate());
        let master_generation = self.store.master_generation()?.saturating_add(1);
        let mut stored = self.store.keyring()?;
        stored.insert(generation, sealed_key.to_vec());
        let mut keyring = BTreeMap::new();
        for (g, sealed) in &stored {
            let moved = current
                .reseal_data_key(*g, sealed, &next)
                .map_err(|_| KeyringError::DataKey(*g))?;
            keyring.insert(*g, B64.encode(moved));
        }
        let policy_head = match self.store.policy_head()? {
            None => None,
            Some(head) => Some(B64.encode(current.reseal_policy_head(&head, &next).map_err(
                |_| {
                    VaultError::PolicyChain(
                        "the sealed policy head does not open with the master key".into(),
                    )
                },
            )?)),
        };
        let pending = PendingMaster {
            generation: master_generation,
            sealed_master: B64.encode(current.seal_next_master(master_generation, &next)),
            key_check: B64.encode(next.key_check()),
            keyring,
            policy_head,
            action_id: action_id.to_owned(),
            admins: admins.to_owned(),
            started_at: now,
        };
        Ok(Some((next, pending)))
    }

    /// Steps 2 and 3: writes `next`'s seal material, then promotes the
    /// pending record, each synced, and swaps the key in memory. The caller
    /// holds `applying`.
    pub(crate) async fn finish_master(
        &self,
        next: MasterKey,
        pending: &PendingMaster,
    ) -> Result<Replaced, VaultError> {
        let Some(seal) = self.master_seal.clone() else {
            return Err(VaultError::MasterSeal(
                "a master key replacement is pending but this vault was started without its seal"
                    .into(),
            ));
        };
        tracing::info!(
            master_generation = pending.generation,
            "master key replacement: the next key is recorded; writing its seal material"
        );
        tokio::time::sleep(self.pace.master_pause).await;
        let key = next.secret().clone();
        let installed = tokio::task::spawn_blocking(move || seal.install(&key))
            .await
            .map_err(|e| VaultError::MasterSeal(format!("writing the seal material: {e}")))?
            .map_err(|e| {
                VaultError::MasterSeal(format!(
                    "the new master key's seal material could not be written ({e}); the vault \
                     serves under the current master key, and the replacement is finished at \
                     the next start or `twokey vault rotate-key` with the same statements"
                ))
            })?;
        let mode = self.master_seal.as_ref().map_or("", |s| s.mode());
        self.store.record(
            EventDraft::new(&pending.admins, "key.master.sealed")
                .attr("master_generation", pending.generation.to_string())
                .attr("action_id", &pending.action_id)
                .attr("mode", mode)
                .attr("seal_id", &installed.seal_id),
        )?;
        self.store.commit().await?;
        tracing::info!(
            master_generation = pending.generation,
            "master key replacement: the seal material is written; promoting"
        );
        tokio::time::sleep(self.pace.master_pause).await;
        let replaced = ReplacedMaster {
            generation: pending.generation,
            action_id: pending.action_id.clone(),
            replaced_at: self.now(),
        };
        let event = EventDraft::new(&pending.admins, "key.master.replaced")
            .attr("master_generation", pending.generation.to_string())
            .attr("action_id", &pending.action_id)
            .attr("mode", mode)
            .attr("seal_id", &installed.seal_id);
        self.store.promote_master(&replaced, event)?;
        self.store.commit().await?;
        self.keys.set_master(next);
        tracing::info!(
            master_generation = pending.generation,
            mode,
            "the master key was replaced; the old seal material opens nothing from now on"
        );
        Ok(Replaced {
            master: replaced,
            installed,
        })
    }

    /// At start (and when `rotate-key` is repeated): a pending replacement
    /// found with the current master key gets its seal material written
    /// and is promoted (audited as `key.master.resumed` first).
    pub async fn resume_master(&self) -> Result<Option<Replaced>, VaultError> {
        let _no_policy_change = self.applying.lock().await;
        let Some(pending) = self.store.pending_master()? else {
            return Ok(None);
        };
        if self.master_seal.is_none() {
            return Ok(None);
        }
        let next = self
            .keys
            .master()
            .open_next_master(pending.generation, &pending.sealed_master())
            .map_err(|_| {
                VaultError::Store(crate::store::VaultStoreError::Corrupt(
                    "the pending master key record".into(),
                ))
            })?;
        tracing::warn!(
            master_generation = pending.generation,
            "resuming the master key replacement: writing the new seal material"
        );
        self.store.record(
            EventDraft::new(&pending.admins, "key.master.resumed")
                .attr("master_generation", pending.generation.to_string())
                .attr("action_id", &pending.action_id),
        )?;
        self.store.commit().await?;
        self.finish_master(next, &pending).await.map(Some)
    }
}

//! The `shamir` seal mode: the master key split K-of-N (`blahaj`), each share
//! encrypted to one holder's `ssh-ed25519` key (`age`), a seal descriptor
//! that names the holders, and the [`Unsealer`] that collects decrypted
//! shares from the holders themselves until K of them rebuild the key. No
//! tonic here; the gRPC layer maps [`UnsealError`] to a status.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use blahaj::{Share, Sharks};
use sha2::{Digest, Sha256};
use twokey_proto::audit::v1::Outcome;
use twokey_runtime::{
    error::{ErrorKind, ServiceError},
    events::EventDraft,
    keys::SecretKey,
};
use zeroize::Zeroizing;

use crate::crypto::MasterKey;

/// The first bytes of every decrypted share.
const SHARE_MAGIC: &[u8] = b"twokey-share-v1\0";
/// The default time partial submissions are kept.
pub const DEFAULT_UNSEAL_TIMEOUT: Duration = Duration::from_secs(600);
/// The descriptor's file name in the directory `init-key --seal shamir` writes.
pub const DESCRIPTOR_FILE: &str = "seal.toml";

/// Who holds a share: a name, the SPIFFE ID of their certificate (the only
/// identity that may submit it) and the OpenSSH public key it is encrypted to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Holder {
    /// Name, 1 to 64 characters of `[a-z0-9._-]`; the share file is `<name>.share.age`.
    pub name: String,
    /// SPIFFE ID of the holder's certificate.
    pub spiffe_id: String,
    /// The `ssh-ed25519` public key the share is encrypted to.
    pub public_key: String,
    /// SHA-256 of the decrypted share (base64): a corrupted share is refused
    /// on arrival, not only when K of them fail to make the key.
    pub share_digest: String,
}

/// What `init-key --seal shamir` writes beside the shares: no key material.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Descriptor {
    /// Always `shamir`.
    pub mode: String,
    /// A random id (hex) of this split, in every share: a share of another
    /// vault or of an earlier split is refused as foreign.
    pub seal_id: String,
    /// K: shares needed.
    pub threshold: u8,
    /// `MasterKey::key_check` of the split key (base64): a rebuilt key is
    /// checked against it before use.
    pub key_check: String,
    /// The N holders.
    pub holders: Vec<Holder>,
}

/// A holder as given on the command line: `NAME=SPIFFE_ID=PUBKEY_FILE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderSpec {
    /// The holder's name.
    pub name: String,
    /// SPIFFE ID of their certificate.
    pub spiffe_id: String,
    /// Their `ssh-ed25519` public key line.
    pub public_key: String,
}

impl HolderSpec {
    /// Parses `NAME=SPIFFE_ID=PATH_TO_SSH_ED25519_PUBKEY`, reading the key file.
    pub fn parse(text: &str) -> Result<Self, SealError> {
        let usage = || {
            SealError::Setup(format!(
                "--holder {text:?}: write NAME=SPIFFE_ID=PATH_TO_SSH_ED25519_PUBKEY"
            ))
        };
        let mut parts = text.splitn(3, '=');
        let (Some(name), Some(id), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(usage());
        };
        if !valid_name(name) {
            return Err(SealError::Setup(format!(
                "--holder {text:?}: the name must be 1 to 64 characters of [a-z0-9._-]"
            )));
        }
        twokey_runtime::SpiffeId::parse(id)
            .map_err(|e| SealError::Setup(format!("--holder {name}: {e}")))?;
        let key = std::fs::read_to_string(path).map_err(|e| {
            SealError::Setup(format!(
                "--holder {name}: cannot read the public key {path}: {e}"
            ))
        })?;
        let key = key.trim().to_owned();
        if !key.starts_with("ssh-ed25519 ") && !key.starts_with("age1") {
            return Err(SealError::Setup(format!(
                "--holder {name}: {path} is neither an ssh-ed25519 public key (ssh-keygen -t ed25519 makes one) nor the age1… recipient `twokey vault holder-key` prints"
            )));
        }
        encrypt_to(name, &key, b"")?;
        Ok(Self {
            name: name.to_owned(),
            spiffe_id: id.to_owned(),
            public_key: key,
        })
    }
}

impl HolderSpec {
    /// A holder given as its parts (a reshare's new holders): the name,
    /// the SPIFFE ID and the key line (`ssh-ed25519`, or an `age1…`
    /// recipient from `twokey vault holder-key`) are checked as
    /// [`HolderSpec::parse`] checks them.
    pub fn checked(name: &str, spiffe_id: &str, public_key: &str) -> Result<Self, SealError> {
        if !valid_name(name) {
            return Err(SealError::Setup(format!(
                "holder {name:?}: the name must be 1 to 64 characters of [a-z0-9._-]"
            )));
        }
        twokey_runtime::SpiffeId::parse(spiffe_id)
            .map_err(|e| SealError::Setup(format!("holder {name}: {e}")))?;
        let key = public_key.trim();
        if !key.starts_with("ssh-ed25519 ") && !key.starts_with("age1") {
            return Err(SealError::Setup(format!(
                "holder {name}: the public key is neither an ssh-ed25519 key (ssh-keygen -t ed25519 makes one) nor the age1… recipient `twokey vault holder-key` prints"
            )));
        }
        encrypt_to(name, key, b"")?;
        Ok(Self {
            name: name.to_owned(),
            spiffe_id: spiffe_id.to_owned(),
            public_key: key.to_owned(),
        })
    }
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// Encrypts `payload` to holder `name`'s key: an `ssh-ed25519` public key,
/// or the native age recipient (`age1…`) `twokey vault holder-key` derives
/// from one for a key that lives in ssh-agent.
fn encrypt_to(name: &str, key: &str, payload: &[u8]) -> Result<Vec<u8>, SealError> {
    let failed = |e: age::EncryptError| SealError::Setup(format!("encrypting {name}'s share: {e}"));
    if key.starts_with("age1") {
        let r = key.parse::<age::x25519::Recipient>().map_err(|e| {
            SealError::Setup(format!(
                "--holder {name}: not a usable age recipient ({e}); paste the line `twokey vault holder-key` printed"
            ))
        })?;
        return age::encrypt(&r, payload).map_err(failed);
    }
    age::encrypt(&recipient(name, key)?, payload).map_err(failed)
}

fn recipient(name: &str, key: &str) -> Result<age::ssh::Recipient, SealError> {
    key.parse::<age::ssh::Recipient>().map_err(|e| {
        SealError::Setup(format!(
            "--holder {name}: not a usable ssh-ed25519 public key ({e:?})"
        ))
    })
}

/// Failures of `init-key --seal shamir` and of reading a descriptor.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// A setting or file is wrong; the message says which and what to do.
    #[error("{0}")]
    Setup(String),
}

/// The encrypted share files, by holder name, and the descriptor: the
/// result of splitting a key.
#[derive(Debug)]
pub struct Split {
    /// What to write to [`DESCRIPTOR_FILE`].
    pub descriptor: Descriptor,
    /// `(holder name, age ciphertext)` for each `<name>.share.age`.
    pub shares: Vec<(String, Vec<u8>)>,
}

/// The decrypted share of `holder`: magic, seal id, the holder's name and
/// the Shamir share (x then y).
fn encode_share(seal_id: &[u8; 16], holder: &str, share: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(64));
    out.extend_from_slice(SHARE_MAGIC);
    out.extend_from_slice(seal_id);
    out.push(holder.len() as u8);
    out.extend_from_slice(holder.as_bytes());
    out.extend_from_slice(share);
    out
}

/// A decrypted share, read: whose it is, for which seal, the Shamir share.
struct Parsed<'a> {
    seal_id: [u8; 16],
    holder: &'a str,
    share: &'a [u8],
}

fn parse_share(bytes: &[u8]) -> Option<Parsed<'_>> {
    let rest = bytes.strip_prefix(SHARE_MAGIC)?;
    let (seal_id, rest) = rest.split_first_chunk::<16>()?;
    let (&len, rest) = rest.split_first()?;
    let (holder, share) = rest.split_at_checked(len as usize)?;
    let holder = std::str::from_utf8(holder).ok()?;
    // x, then one y byte per key byte.
    (share.len() == 33 && share[0] != 0).then_some(Parsed {
        seal_id: *seal_id,
        holder,
        share,
    })
}

/// Checks a split's K and holders: 2 <= K <= N <= 255, distinct names and
/// SPIFFE IDs.
fn check_plan(threshold: u8, holders: &[HolderSpec]) -> Result<(), SealError> {
    let n = holders.len();
    if threshold < 2 || usize::from(threshold) > n || n > 255 {
        return Err(SealError::Setup(format!(
            "--threshold {threshold} with {n} holders: K must be at least 2 and at most the number of --holder flags (at most 255)"
        )));
    }
    for (i, h) in holders.iter().enumerate() {
        if holders[..i]
            .iter()
            .any(|o| o.name == h.name || o.spiffe_id == h.spiffe_id)
        {
            return Err(SealError::Setup(format!(
                "--holder {}: each holder needs a name and a SPIFFE ID of their own",
                h.name
            )));
        }
    }
    Ok(())
}

/// Splits `key` K-of-N among `holders`, each share encrypted to its holder.
pub fn split(key: &SecretKey, threshold: u8, holders: &[HolderSpec]) -> Result<Split, SealError> {
    check_plan(threshold, holders)?;
    let n = holders.len();
    let mut seal_id = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seal_id);
    let mut shares = Vec::with_capacity(n);
    let mut described = Vec::with_capacity(n);
    for (h, share) in holders.iter().zip(Sharks(threshold).dealer(key.expose())) {
        let raw = Zeroizing::new(Vec::<u8>::from(&share));
        let payload = encode_share(&seal_id, &h.name, &raw);
        let encrypted = encrypt_to(&h.name, &h.public_key, &payload)?;
        described.push(Holder {
            name: h.name.clone(),
            spiffe_id: h.spiffe_id.clone(),
            public_key: h.public_key.clone(),
            share_digest: B64.encode(Sha256::digest(payload.as_slice())),
        });
        shares.push((h.name.clone(), encrypted));
    }
    Ok(Split {
        descriptor: Descriptor {
            mode: "shamir".into(),
            seal_id: hex(&seal_id),
            threshold,
            key_check: B64.encode(MasterKey::new(key.clone()).key_check()),
            holders: described,
        },
        shares,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Descriptor {
    /// Reads and checks a descriptor file.
    pub fn load(path: &Path) -> Result<Self, SealError> {
        let bad = |what: String| {
            SealError::Setup(format!(
                "seal descriptor {}: {what}; use the {DESCRIPTOR_FILE} that `twokey-vault init-key --seal shamir` wrote",
                path.display()
            ))
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let d: Self = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if d.mode != "shamir"
            || d.threshold < 2
            || usize::from(d.threshold) > d.holders.len()
            || d.seal_id.len() != 32
            || B64.decode(&d.key_check).is_err()
        {
            return Err(bad(
                "mode, threshold, seal_id or key_check is invalid".into()
            ));
        }
        Ok(d)
    }

    /// Writes the descriptor as TOML to a new file.
    pub fn write(&self, path: &Path) -> Result<(), SealError> {
        let text = toml::to_string(self)
            .map_err(|e| SealError::Setup(format!("encoding the seal descriptor: {e}")))?;
        write_new(path, text.as_bytes())
    }
}

/// Writes `bytes` to a new file (never overwriting one) and syncs it.
pub fn write_new(path: &Path, bytes: &[u8]) -> Result<(), SealError> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| {
            SealError::Setup(format!(
                "cannot create {}: {e}; choose a new, empty directory for the seal",
                path.display()
            ))
        })?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| SealError::Setup(format!("writing {}: {e}", path.display())))
}

/// Writes a split into `dir`: the descriptor and one `<name>.share.age` per
/// holder; returns the paths written.
pub fn write_split(dir: &Path, split: &Split) -> Result<Vec<PathBuf>, SealError> {
    let mut written = Vec::new();
    for (name, bytes) in &split.shares {
        let path = dir.join(format!("{name}.share.age"));
        write_new(&path, bytes)?;
        written.push(path);
    }
    let path = dir.join(DESCRIPTOR_FILE);
    split.descriptor.write(&path)?;
    written.push(path);
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(written)
}

/// Why a submitted share, a seal or a reshare was refused. Each names what
/// was wrong; none changes what was received before it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnsealError {
    /// The caller is not a holder.
    #[error("{0} is not a share holder of this vault's seal")]
    NotHolder(String),
    /// The bytes are not a decrypted twokey share.
    #[error(
        "not a twokey share: corrupted or not decrypted; submit the file with `twokey vault unseal --share FILE`"
    )]
    Malformed,
    /// A share of another seal (another vault, or an earlier split).
    #[error("a foreign share: it belongs to another seal, not to this vault's")]
    Foreign,
    /// A share that names another holder than the caller.
    #[error("this is {owner}'s share; only {owner} may submit it")]
    OtherHolder {
        /// The holder named in the share.
        owner: String,
    },
    /// The share does not match the digest the seal recorded for its holder.
    #[error("{0}'s share is corrupted: it does not match the digest the seal recorded")]
    Corrupted(String),
    /// This holder's share is in already.
    #[error("{0}'s share was received already (a duplicate)")]
    Duplicate(String),
    /// The vault is not sealed.
    #[error("the vault is unsealed already")]
    Unsealed,
    /// K shares did not make the key the seal recorded.
    #[error(
        "the shares do not rebuild the sealed key (key check failed); every received share was dropped: submit again"
    )]
    KeyMismatch,
    /// A seal of a vault that is sealed.
    #[error("the vault is sealed already")]
    SealedAlready,
    /// A reshare of a sealed vault.
    #[error(
        "the vault is sealed: a reshare splits the running key, so unseal it first (`twokey vault unseal --share FILE`)"
    )]
    SealedForReshare,
    /// A second reshare while one is in progress.
    #[error(
        "reshare {plan_id} started by {started_by} is in progress; its holders finish it with `twokey vault reshare --plan {plan_id} --share FILE`, or it expires"
    )]
    ReshareInProgress {
        /// The plan in progress.
        plan_id: String,
        /// Who started it.
        started_by: String,
    },
    /// A reshare share when no reshare is in progress.
    #[error(
        "no reshare is in progress (it may have expired); a holder starts one with `twokey vault reshare start`"
    )]
    NoReshare,
    /// A reshare share for another plan than the one in progress.
    #[error(
        "the reshare in progress is {current}, not {asked}; check it with `twokey vault status` before submitting"
    )]
    OtherPlan {
        /// The plan in progress.
        current: String,
        /// The plan the share was sent for.
        asked: String,
    },
    /// The new split asked for is not a valid one.
    #[error("{0}")]
    BadPlan(String),
    /// This vault's descriptor file is unknown, so no reshare can replace it.
    #[error(
        "this vault was started without a seal descriptor file to rewrite; a reshare needs [seal] descriptor"
    )]
    NoDescriptorFile,
    /// Writing the new split failed; the old one stays in force.
    #[error(
        "writing the new split failed ({0}); the old shares stay in force and every reshare share was dropped: fix the seal directory and start again"
    )]
    Write(String),
}

impl ServiceError for UnsealError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::NotHolder(_) => ErrorKind::PermissionDenied,
            Self::Malformed
            | Self::Foreign
            | Self::OtherHolder { .. }
            | Self::Corrupted(_)
            | Self::BadPlan(_) => ErrorKind::InvalidArgument,
            Self::Duplicate(_) | Self::Unsealed | Self::ReshareInProgress { .. } => {
                ErrorKind::AlreadyExists
            }
            Self::KeyMismatch
            | Self::SealedAlready
            | Self::SealedForReshare
            | Self::NoReshare
            | Self::OtherPlan { .. }
            | Self::NoDescriptorFile => ErrorKind::FailedPrecondition,
            Self::Write(_) => ErrorKind::Unavailable,
        }
    }
}

/// A reshare in progress, as shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReshareProgress {
    /// The plan's id.
    pub plan_id: String,
    /// The new K.
    pub threshold: u32,
    /// The new holders.
    pub holders: Vec<HolderSpec>,
    /// The SPIFFE ID of the holder who started it.
    pub started_by: String,
    /// Names of the current holders whose shares are in.
    pub received_from: Vec<String>,
}

/// Where unsealing stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// True until K valid shares made the key.
    pub sealed: bool,
    /// K.
    pub threshold: u32,
    /// N.
    pub holders: u32,
    /// Names of the holders whose shares are in, in order of arrival.
    pub received_from: Vec<String>,
    /// The split in force.
    pub seal_id: String,
    /// The reshare in progress, if any.
    pub reshare: Option<ReshareProgress>,
}

impl Progress {
    /// The answer to any call that needs the key while sealed.
    pub fn sealed_message(&self) -> String {
        format!(
            "vault is sealed: {} of {} shares received; holders run `twokey vault unseal --share FILE`",
            self.received_from.len(),
            self.threshold
        )
    }
}

/// What one accepted submission did.
#[derive(Debug)]
pub enum Submitted {
    /// Counted; more are needed.
    Counted(Progress),
    /// The K-th share: the rebuilt, checked key.
    Unsealed(MasterKey, Progress),
}

/// What one accepted reshare submission did.
#[derive(Debug)]
pub enum Reshared {
    /// Counted; more are needed.
    Counted(Progress),
    /// The K-th share: the new split is written and in force.
    Done {
        /// The seal id the new split replaced.
        old_seal_id: String,
        /// The new split (descriptor and encrypted shares).
        split: Split,
        /// Where the new share files were written.
        written: Vec<PathBuf>,
        /// Where things stand now.
        progress: Progress,
    },
}

struct Received {
    holder: String,
    share: Share,
}

struct Reshare {
    plan_id: String,
    threshold: u8,
    holders: Vec<HolderSpec>,
    started_by: String,
    started_at: Instant,
    received: Vec<Received>,
}

struct State {
    descriptor: Descriptor,
    key_check: Vec<u8>,
    received: Vec<Received>,
    first_at: Option<Instant>,
    unsealed: bool,
    reshare: Option<Reshare>,
}

/// Collects shares from the holders until K of them rebuild the key; seals
/// again on demand; re-shares the running key among new holders.
pub struct Unsealer {
    timeout: Duration,
    /// The descriptor file a reshare replaces, when known.
    path: Option<PathBuf>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Unsealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("Unsealer")
            .field("seal_id", &state.descriptor.seal_id)
            .field("threshold", &state.descriptor.threshold)
            .finish_non_exhaustive()
    }
}

/// Checks a share's bytes against `descriptor` for the holder `holder`.
fn check_share(
    descriptor: &Descriptor,
    holder: &Holder,
    bytes: &[u8],
) -> Result<Share, UnsealError> {
    let parsed = parse_share(bytes).ok_or(UnsealError::Malformed)?;
    if hex(&parsed.seal_id) != descriptor.seal_id {
        return Err(UnsealError::Foreign);
    }
    if parsed.holder != holder.name {
        return Err(UnsealError::OtherHolder {
            owner: parsed.holder.to_owned(),
        });
    }
    if B64.encode(Sha256::digest(bytes)) != holder.share_digest {
        return Err(UnsealError::Corrupted(holder.name.clone()));
    }
    Share::try_from(parsed.share).map_err(|_| UnsealError::Malformed)
}

/// The key `received` rebuild, if it passes `key_check`.
fn rebuild(threshold: u8, received: &[Received], key_check: &[u8]) -> Option<SecretKey> {
    let rebuilt = Sharks(threshold)
        .recover(received.iter().map(|r| &r.share))
        .map(Zeroizing::new)
        .ok()?;
    let key = SecretKey::from_bytes(<[u8; 32]>::try_from(rebuilt.as_slice()).ok()?);
    MasterKey::new(key.clone())
        .matches(key_check)
        .then_some(key)
}

impl Unsealer {
    /// An unsealer for `descriptor`; partial submissions older than
    /// `timeout` are dropped.
    pub fn new(descriptor: Descriptor, timeout: Duration) -> Self {
        let key_check = B64.decode(&descriptor.key_check).unwrap_or_default();
        Self {
            timeout,
            path: None,
            state: Mutex::new(State {
                descriptor,
                key_check,
                received: Vec::new(),
                first_at: None,
                unsealed: false,
                reshare: None,
            }),
        }
    }

    /// The descriptor was read from `path`: a reshare replaces that file.
    pub fn with_descriptor_file(mut self, path: PathBuf) -> Self {
        self.path = Some(path);
        self
    }

    /// The descriptor in force.
    pub fn descriptor(&self) -> Descriptor {
        self.lock().descriptor.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drops partial submissions older than the timeout; true if it did.
    fn expire(&self, state: &mut State, now: Instant) -> bool {
        match state.first_at {
            Some(at) if !state.unsealed && now.saturating_duration_since(at) >= self.timeout => {
                state.received.clear();
                state.first_at = None;
                true
            }
            _ => false,
        }
    }

    /// Drops a reshare older than the timeout; its id and whose shares it
    /// held if it did.
    fn expire_reshare(&self, state: &mut State, now: Instant) -> Option<(String, Vec<String>)> {
        let r = state.reshare.as_ref()?;
        if now.saturating_duration_since(r.started_at) < self.timeout {
            return None;
        }
        let r = state.reshare.take()?;
        Some((
            r.plan_id,
            r.received.into_iter().map(|r| r.holder).collect(),
        ))
    }

    fn progress_of(state: &State) -> Progress {
        Progress {
            sealed: !state.unsealed,
            threshold: state.descriptor.threshold.into(),
            holders: state.descriptor.holders.len() as u32,
            received_from: state.received.iter().map(|r| r.holder.clone()).collect(),
            seal_id: state.descriptor.seal_id.clone(),
            reshare: state.reshare.as_ref().map(|r| ReshareProgress {
                plan_id: r.plan_id.clone(),
                threshold: r.threshold.into(),
                holders: r.holders.clone(),
                started_by: r.started_by.clone(),
                received_from: r.received.iter().map(|r| r.holder.clone()).collect(),
            }),
        }
    }

    /// Where unsealing stands at `now`; the names of the holders whose
    /// partial submissions timed out and were dropped, if any.
    pub fn progress(&self, now: Instant) -> (Progress, Vec<String>) {
        let mut state = self.lock();
        let before: Vec<String> = state.received.iter().map(|r| r.holder.clone()).collect();
        let dropped = if self.expire(&mut state, now) {
            before
        } else {
            Vec::new()
        };
        (Self::progress_of(&state), dropped)
    }

    /// Drops a reshare that timed out at `now`: its plan id and whose
    /// shares it held.
    pub fn expire_reshare_at(&self, now: Instant) -> Option<(String, Vec<String>)> {
        let mut state = self.lock();
        self.expire_reshare(&mut state, now)
    }

    /// Back to sealed with nothing received: the rebuilt key opened no vault.
    pub fn reseal(&self) {
        let mut state = self.lock();
        state.received.clear();
        state.first_at = None;
        state.unsealed = false;
        state.reshare = None;
    }

    /// Seals an unsealed vault: collecting shares again from nothing, any
    /// reshare in progress dropped. Refuses a sealed one.
    pub fn seal(&self) -> Result<Progress, UnsealError> {
        let mut state = self.lock();
        if !state.unsealed {
            return Err(UnsealError::SealedAlready);
        }
        state.received.clear();
        state.first_at = None;
        state.unsealed = false;
        state.reshare = None;
        Ok(Self::progress_of(&state))
    }

    /// True while unsealed.
    pub fn is_unsealed(&self) -> bool {
        self.lock().unsealed
    }

    /// Takes the decrypted share `bytes` from the holder whose certificate
    /// says `caller`.
    pub fn submit(
        &self,
        caller: &str,
        bytes: &[u8],
        now: Instant,
    ) -> Result<Submitted, UnsealError> {
        let mut state = self.lock();
        let holder = state
            .descriptor
            .holders
            .iter()
            .find(|h| h.spiffe_id == caller)
            .ok_or_else(|| UnsealError::NotHolder(caller.to_owned()))?
            .clone();
        let share = check_share(&state.descriptor, &holder, bytes)?;
        if state.unsealed {
            return Err(UnsealError::Unsealed);
        }
        self.expire(&mut state, now);
        if state.received.iter().any(|r| r.holder == holder.name) {
            return Err(UnsealError::Duplicate(holder.name.clone()));
        }
        state.received.push(Received {
            holder: holder.name.clone(),
            share,
        });
        state.first_at.get_or_insert(now);
        if state.received.len() < usize::from(state.descriptor.threshold) {
            return Ok(Submitted::Counted(Self::progress_of(&state)));
        }
        let key = rebuild(
            state.descriptor.threshold,
            &state.received,
            &state.key_check,
        );
        state.received.clear();
        state.first_at = None;
        match key {
            Some(key) => {
                state.unsealed = true;
                Ok(Submitted::Unsealed(
                    MasterKey::new(key),
                    Self::progress_of(&state),
                ))
            }
            None => Err(UnsealError::KeyMismatch),
        }
    }

    /// Starts a reshare by the current holder `caller`: the running key
    /// split `threshold`-of-N among `holders` once K current holders have
    /// submitted their shares for it.
    pub fn start_reshare(
        &self,
        caller: &str,
        threshold: u32,
        holders: Vec<HolderSpec>,
        now: Instant,
    ) -> Result<Progress, UnsealError> {
        let mut state = self.lock();
        if !state
            .descriptor
            .holders
            .iter()
            .any(|h| h.spiffe_id == caller)
        {
            return Err(UnsealError::NotHolder(caller.to_owned()));
        }
        if !state.unsealed {
            return Err(UnsealError::SealedForReshare);
        }
        if self.path.is_none() {
            return Err(UnsealError::NoDescriptorFile);
        }
        self.expire_reshare(&mut state, now);
        if let Some(r) = &state.reshare {
            return Err(UnsealError::ReshareInProgress {
                plan_id: r.plan_id.clone(),
                started_by: r.started_by.clone(),
            });
        }
        let threshold = u8::try_from(threshold).unwrap_or(0);
        check_plan(threshold, &holders).map_err(|SealError::Setup(m)| UnsealError::BadPlan(m))?;
        for h in &holders {
            HolderSpec::checked(&h.name, &h.spiffe_id, &h.public_key)
                .map_err(|SealError::Setup(m)| UnsealError::BadPlan(m))?;
        }
        let mut id = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id);
        state.reshare = Some(Reshare {
            plan_id: hex(&id),
            threshold,
            holders,
            started_by: caller.to_owned(),
            started_at: now,
            received: Vec::new(),
        });
        Ok(Self::progress_of(&state))
    }

    /// Takes the current holder `caller`'s decrypted share for the reshare
    /// `plan_id`. The K-th rebuilds and checks the key, splits it anew,
    /// writes the new shares under `<descriptor dir>/<new seal id>/` and
    /// then replaces the descriptor atomically (temporary file, fsync,
    /// rename, directory fsync): until the rename the old split is in
    /// force, after it the new one.
    pub fn submit_reshare(
        &self,
        caller: &str,
        plan_id: &str,
        bytes: &[u8],
        now: Instant,
    ) -> Result<Reshared, UnsealError> {
        let mut state = self.lock();
        let holder = state
            .descriptor
            .holders
            .iter()
            .find(|h| h.spiffe_id == caller)
            .ok_or_else(|| UnsealError::NotHolder(caller.to_owned()))?
            .clone();
        self.expire_reshare(&mut state, now);
        if !state.unsealed {
            return Err(UnsealError::SealedForReshare);
        }
        let current = match &state.reshare {
            None => return Err(UnsealError::NoReshare),
            Some(r) => r.plan_id.clone(),
        };
        if current != plan_id {
            return Err(UnsealError::OtherPlan {
                current,
                asked: plan_id.to_owned(),
            });
        }
        let share = check_share(&state.descriptor, &holder, bytes)?;
        let k = state.descriptor.threshold;
        let reshare = state.reshare.as_mut().ok_or(UnsealError::NoReshare)?;
        if reshare.received.iter().any(|r| r.holder == holder.name) {
            return Err(UnsealError::Duplicate(holder.name.clone()));
        }
        reshare.received.push(Received {
            holder: holder.name.clone(),
            share,
        });
        if reshare.received.len() < usize::from(k) {
            return Ok(Reshared::Counted(Self::progress_of(&state)));
        }
        let Some(reshare) = state.reshare.take() else {
            return Err(UnsealError::NoReshare);
        };
        let key =
            rebuild(k, &reshare.received, &state.key_check).ok_or(UnsealError::KeyMismatch)?;
        let split = split(&key, reshare.threshold, &reshare.holders)
            .map_err(|SealError::Setup(m)| UnsealError::BadPlan(m))?;
        let path = self.path.as_deref().ok_or(UnsealError::NoDescriptorFile)?;
        let written =
            install_split(path, &split).map_err(|SealError::Setup(m)| UnsealError::Write(m))?;
        let old_seal_id =
            std::mem::replace(&mut state.descriptor, split.descriptor.clone()).seal_id;
        state.key_check = B64.decode(&state.descriptor.key_check).unwrap_or_default();
        Ok(Reshared::Done {
            old_seal_id,
            split,
            written,
            progress: Self::progress_of(&state),
        })
    }
}

impl Unsealer {
    /// A rotation replaced the master key: splits `key` among the same
    /// holders with the same K and installs it as a reshare does (new
    /// share files under `<descriptor dir>/<new seal id>/`, then the
    /// descriptor replaced atomically). From then on the old shares are
    /// foreign. A reshare being collected (shares of the old split) is
    /// dropped. Returns the new descriptor and the files written.
    pub fn replace_key(&self, key: &SecretKey) -> Result<(Descriptor, Vec<PathBuf>), SealError> {
        let mut state = self.lock();
        let holders: Vec<HolderSpec> = state
            .descriptor
            .holders
            .iter()
            .map(|h| HolderSpec {
                name: h.name.clone(),
                spiffe_id: h.spiffe_id.clone(),
                public_key: h.public_key.clone(),
            })
            .collect();
        let split = split(key, state.descriptor.threshold, &holders)?;
        let path = self.path.as_deref().ok_or_else(|| {
            SealError::Setup(
                "the seal descriptor's file is not known: start the vault with [seal] descriptor set".into(),
            )
        })?;
        let written = install_split(path, &split)?;
        state.descriptor = split.descriptor.clone();
        state.key_check = B64.decode(&state.descriptor.key_check).unwrap_or_default();
        state.reshare = None;
        Ok((split.descriptor, written))
    }
}

/// Writes a new split for the descriptor at `path`: the share files under
/// `<dir>/<seal_id>/` (new files, synced, the directory synced), then the
/// descriptor through a temporary file that is synced and renamed over
/// `path`, then the directory synced. A crash before the rename leaves the
/// old descriptor in force (and unused share files); after it, the new.
pub fn install_split(path: &Path, split: &Split) -> Result<Vec<PathBuf>, SealError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let shares = dir.join(&split.descriptor.seal_id);
    std::fs::create_dir(&shares)
        .map_err(|e| SealError::Setup(format!("cannot create {}: {e}", shares.display())))?;
    let mut written = Vec::new();
    for (name, bytes) in &split.shares {
        let share = shares.join(format!("{name}.share.age"));
        write_new(&share, bytes)?;
        written.push(share);
    }
    sync_dir(&shares)?;
    let text = toml::to_string(&split.descriptor)
        .map_err(|e| SealError::Setup(format!("encoding the seal descriptor: {e}")))?;
    let temp = dir.join(format!(
        ".{DESCRIPTOR_FILE}.{}.tmp",
        split.descriptor.seal_id
    ));
    write_new(&temp, text.as_bytes())?;
    std::fs::rename(&temp, path).map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        SealError::Setup(format!(
            "renaming {} to {}: {e}",
            temp.display(),
            path.display()
        ))
    })?;
    sync_dir(dir)?;
    Ok(written)
}

fn sync_dir(dir: &Path) -> Result<(), SealError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| SealError::Setup(format!("syncing the directory {}: {e}", dir.display())))
}

/// The audit event of one submission (never share material): who, and how
/// it ended.
pub fn submission_event(caller: &str, result: &Result<Submitted, UnsealError>) -> EventDraft {
    let draft = EventDraft::new(caller, "vault.unseal_share");
    match result {
        Ok(Submitted::Counted(p)) => draft
            .outcome(Outcome::Success)
            .attr("received", p.received_from.len().to_string())
            .attr("threshold", p.threshold.to_string()),
        Ok(Submitted::Unsealed(_, p)) => draft
            .outcome(Outcome::Success)
            .attr("received", p.threshold.to_string())
            .attr("threshold", p.threshold.to_string()),
        Err(e) => draft.outcome(Outcome::Denied).attr("reason", e.to_string()),
    }
}

/// The audit event of the unseal itself.
pub fn unsealed_event(progress: &Progress) -> EventDraft {
    EventDraft::new("vault", "vault.unsealed")
        .outcome(Outcome::Success)
        .attr("threshold", progress.threshold.to_string())
        .attr("holders", progress.holders.to_string())
}

/// The audit event of partial submissions dropped after the timeout.
pub fn expired_event(dropped: &[String]) -> EventDraft {
    EventDraft::new("vault", "vault.unseal_expired")
        .outcome(Outcome::Failure)
        .attr("dropped", dropped.join(","))
}

/// The audit event of a reshare start (or its refusal).
pub fn reshare_started_event(
    caller: &str,
    threshold: u32,
    holders: &[HolderSpec],
    result: &Result<Progress, UnsealError>,
) -> EventDraft {
    let draft = EventDraft::new(caller, "vault.reshare_started")
        .attr("new_threshold", threshold.to_string())
        .attr(
            "new_holders",
            holders
                .iter()
                .map(|h| format!("{}={}", h.name, h.spiffe_id))
                .collect::<Vec<_>>()
                .join(","),
        );
    match result {
        Ok(p) => draft.outcome(Outcome::Success).attr(
            "plan_id",
            p.reshare
                .as_ref()
                .map(|r| r.plan_id.clone())
                .unwrap_or_default(),
        ),
        Err(e) => draft.outcome(Outcome::Denied).attr("reason", e.to_string()),
    }
}

/// The audit event of one reshare submission (never share material).
pub fn reshare_share_event(
    caller: &str,
    plan_id: &str,
    result: &Result<Reshared, UnsealError>,
) -> EventDraft {
    let draft = EventDraft::new(caller, "vault.reshare_share").attr("plan_id", plan_id);
    match result {
        Ok(Reshared::Counted(p)) => draft.outcome(Outcome::Success).attr(
            "received",
            p.reshare
                .as_ref()
                .map_or(0, |r| r.received_from.len())
                .to_string(),
        ),
        Ok(Reshared::Done { .. }) => draft.outcome(Outcome::Success).attr("received", "all"),
        Err(e) => draft.outcome(Outcome::Denied).attr("reason", e.to_string()),
    }
}

/// The audit event of a completed reshare: the old and new split, the new
/// holders; no share material.
pub fn reshared_event(old_seal_id: &str, descriptor: &Descriptor) -> EventDraft {
    EventDraft::new("vault", "vault.reshared")
        .outcome(Outcome::Success)
        .attr("old_seal_id", old_seal_id)
        .attr("seal_id", descriptor.seal_id.clone())
        .attr("threshold", descriptor.threshold.to_string())
        .attr(
            "holders",
            descriptor
                .holders
                .iter()
                .map(|h| format!("{}={}", h.name, h.spiffe_id))
                .collect::<Vec<_>>()
                .join(","),
        )
}

/// The audit event of a reshare dropped after the timeout.
pub fn reshare_expired_event(plan_id: &str, dropped: &[String]) -> EventDraft {
    EventDraft::new("vault", "vault.reshare_expired")
        .outcome(Outcome::Failure)
        .attr("plan_id", plan_id)
        .attr("dropped", dropped.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(dir: &Path, name: &str) -> HolderSpec {
        let key = twokey_consent::ssh_key::PrivateKey::random(
            &mut rand::rngs::OsRng,
            twokey_consent::ssh_key::Algorithm::Ed25519,
        )
        .unwrap();
        let path = dir.join(format!("{name}.pub"));
        std::fs::write(&path, key.public_key().to_openssh().unwrap()).unwrap();
        HolderSpec::parse(&format!(
            "{name}=spiffe://twokey.test/user/{name}={}",
            path.display()
        ))
        .unwrap()
    }

    fn setup_error(result: Result<impl std::fmt::Debug, SealError>) -> String {
        match result {
            Err(SealError::Setup(m)) => m,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_split_needs_two_to_n_shares_and_distinct_holders() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (holder(dir.path(), "alice"), holder(dir.path(), "bob"));
        let key = SecretKey::generate();
        for k in [0, 1, 3] {
            let m = setup_error(split(&key, k, &[a.clone(), b.clone()]));
            assert!(
                m.starts_with(&format!("--threshold {k} with 2 holders")),
                "{m}"
            );
        }
        let m = setup_error(split(&key, 2, &[a.clone(), a.clone()]));
        assert!(m.contains("a name and a SPIFFE ID of their own"), "{m}");
        let s = split(&key, 2, &[a, b]).unwrap();
        assert_eq!(s.shares.len(), 2);
        assert!(MasterKey::new(key.clone()).matches(&B64.decode(&s.descriptor.key_check).unwrap()));
        // The key is in no file written.
        let out = dir.path().join("seal");
        std::fs::create_dir(&out).unwrap();
        for path in write_split(&out, &s).unwrap() {
            let bytes = std::fs::read(path).unwrap();
            assert!(!bytes.windows(32).any(|w| w == key.expose()));
            assert!(!String::from_utf8_lossy(&bytes).contains(&B64.encode(key.expose())));
        }
        assert_eq!(
            Descriptor::load(&out.join(DESCRIPTOR_FILE)).unwrap(),
            s.descriptor
        );
        // Written once: a second split into the same place is refused.
        let m = setup_error(write_split(&out, &s));
        assert!(m.starts_with("cannot create"), "{m}");
    }

    #[test]
    fn a_bad_holder_flag_says_how_to_write_one() {
        let dir = tempfile::tempdir().unwrap();
        let m = setup_error(HolderSpec::parse("alice"));
        assert!(
            m.contains("NAME=SPIFFE_ID=PATH_TO_SSH_ED25519_PUBKEY"),
            "{m}"
        );
        let m = setup_error(HolderSpec::parse("Alice!=spiffe://t/user/a=/x"));
        assert!(m.contains("[a-z0-9._-]"), "{m}");
        let m = setup_error(HolderSpec::parse("alice=not-spiffe=/x"));
        assert!(m.starts_with("--holder alice:"), "{m}");
        let m = setup_error(HolderSpec::parse(
            "alice=spiffe://t/user/a=/nonexistent.pub",
        ));
        assert!(m.contains("cannot read the public key"), "{m}");
        let rsa = dir.path().join("rsa.pub");
        std::fs::write(&rsa, "ssh-rsa AAAAB3NzaC1yc2E= x").unwrap();
        let m = setup_error(HolderSpec::parse(&format!(
            "alice=spiffe://t/user/a={}",
            rsa.display()
        )));
        assert!(
            m.contains("is neither an ssh-ed25519 public key")
                && m.contains("nor the age1… recipient `twokey vault holder-key` prints"),
            "{m}"
        );
        // An age recipient is taken; a broken one is refused saying what to paste.
        let age_file = dir.path().join("alice.recipient");
        let recipient = age::x25519::Identity::generate().to_public().to_string();
        std::fs::write(&age_file, format!("{recipient}\n")).unwrap();
        let spec =
            HolderSpec::parse(&format!("alice=spiffe://t/user/a={}", age_file.display())).unwrap();
        assert_eq!(spec.public_key, recipient);
        std::fs::write(&age_file, "age1notarecipient\n").unwrap();
        let m = setup_error(HolderSpec::parse(&format!(
            "alice=spiffe://t/user/a={}",
            age_file.display()
        )));
        assert!(m.contains("not a usable age recipient"), "{m}");
    }

    #[test]
    fn a_reshare_holder_is_checked_like_a_holder_flag() {
        let dir = tempfile::tempdir().unwrap();
        let ssh = holder(dir.path(), "alice").public_key;
        let id = "spiffe://twokey.test/user/alice";
        assert_eq!(
            HolderSpec::checked("alice", id, &format!("{ssh}\n"))
                .unwrap()
                .public_key,
            ssh
        );
        let age = age::x25519::Identity::generate().to_public().to_string();
        assert_eq!(
            HolderSpec::checked("alice", id, &age).unwrap().public_key,
            age
        );
        let m = setup_error(HolderSpec::checked("Alice", id, &ssh));
        assert!(m.contains("[a-z0-9._-]"), "{m}");
        let m = setup_error(HolderSpec::checked("alice", "not-spiffe", &ssh));
        assert!(m.starts_with("holder alice:"), "{m}");
        let m = setup_error(HolderSpec::checked(
            "alice",
            id,
            "ssh-rsa AAAAB3NzaC1yc2E= x",
        ));
        assert!(m.contains("is neither an ssh-ed25519 key"), "{m}");
        let m = setup_error(HolderSpec::checked("alice", id, "age1notarecipient"));
        assert!(m.contains("not a usable age recipient"), "{m}");
    }

    #[test]
    fn a_descriptor_that_is_not_one_is_refused_saying_what_to_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DESCRIPTOR_FILE);
        std::fs::write(&path, "mode = \"file\"\n").unwrap();
        let m = setup_error(Descriptor::load(&path));
        assert!(m.contains("init-key --seal shamir"), "{m}");
    }

    #[test]
    fn share_debug_and_errors_carry_no_share_bytes() {
        let request = twokey_proto::vault::v1::UnsealRequest {
            share: b"twokey-share-v1\0secret".to_vec(),
        };
        assert_eq!(
            format!("{request:?}"),
            "UnsealRequest { share: \"[redacted]\" }"
        );
    }
}

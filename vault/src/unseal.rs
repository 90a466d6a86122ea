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
        if !key.starts_with("ssh-ed25519 ") {
            return Err(SealError::Setup(format!(
                "--holder {name}: {path} is not an ssh-ed25519 public key (ssh-keygen -t ed25519 makes one)"
            )));
        }
        recipient(name, &key)?;
        Ok(Self {
            name: name.to_owned(),
            spiffe_id: id.to_owned(),
            public_key: key,
        })
    }
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
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

/// Splits `key` K-of-N among `holders`, each share encrypted to its holder.
pub fn split(key: &SecretKey, threshold: u8, holders: &[HolderSpec]) -> Result<Split, SealError> {
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
    let mut seal_id = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seal_id);
    let mut shares = Vec::with_capacity(n);
    let mut described = Vec::with_capacity(n);
    for (h, share) in holders.iter().zip(Sharks(threshold).dealer(key.expose())) {
        let raw = Zeroizing::new(Vec::<u8>::from(&share));
        let payload = encode_share(&seal_id, &h.name, &raw);
        let encrypted = age::encrypt(&recipient(&h.name, &h.public_key)?, &payload)
            .map_err(|e| SealError::Setup(format!("encrypting {}'s share: {e}", h.name)))?;
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

    fn seal_id(&self) -> String {
        self.seal_id.clone()
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

/// Why a submitted share was refused. Each names what was wrong; none
/// changes what was received before it.
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
}

impl ServiceError for UnsealError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::NotHolder(_) => ErrorKind::PermissionDenied,
            Self::Malformed | Self::Foreign | Self::OtherHolder { .. } | Self::Corrupted(_) => {
                ErrorKind::InvalidArgument
            }
            Self::Duplicate(_) | Self::Unsealed => ErrorKind::AlreadyExists,
            Self::KeyMismatch => ErrorKind::FailedPrecondition,
        }
    }
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

struct Received {
    holder: String,
    share: Share,
}

#[derive(Default)]
struct State {
    received: Vec<Received>,
    first_at: Option<Instant>,
    unsealed: bool,
}

/// Collects shares from the holders until K of them rebuild the key.
pub struct Unsealer {
    descriptor: Descriptor,
    key_check: Vec<u8>,
    timeout: Duration,
    state: Mutex<State>,
}

impl std::fmt::Debug for Unsealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unsealer")
            .field("seal_id", &self.descriptor.seal_id)
            .field("threshold", &self.descriptor.threshold)
            .finish_non_exhaustive()
    }
}

impl Unsealer {
    /// An unsealer for `descriptor`; partial submissions older than
    /// `timeout` are dropped.
    pub fn new(descriptor: Descriptor, timeout: Duration) -> Self {
        let key_check = B64.decode(&descriptor.key_check).unwrap_or_default();
        Self {
            descriptor,
            key_check,
            timeout,
            state: Mutex::new(State::default()),
        }
    }

    /// The descriptor it unseals.
    pub fn descriptor(&self) -> &Descriptor {
        &self.descriptor
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

    fn progress_of(&self, state: &State) -> Progress {
        Progress {
            sealed: !state.unsealed,
            threshold: self.descriptor.threshold.into(),
            holders: self.descriptor.holders.len() as u32,
            received_from: state.received.iter().map(|r| r.holder.clone()).collect(),
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
        (self.progress_of(&state), dropped)
    }

    /// Back to sealed with nothing received: the rebuilt key opened no vault.
    pub fn reseal(&self) {
        let mut state = self.lock();
        *state = State::default();
    }

    /// Takes the decrypted share `bytes` from the holder whose certificate
    /// says `caller`.
    pub fn submit(
        &self,
        caller: &str,
        bytes: &[u8],
        now: Instant,
    ) -> Result<Submitted, UnsealError> {
        let holder = self
            .descriptor
            .holders
            .iter()
            .find(|h| h.spiffe_id == caller)
            .ok_or_else(|| UnsealError::NotHolder(caller.to_owned()))?;
        let parsed = parse_share(bytes).ok_or(UnsealError::Malformed)?;
        if hex(&parsed.seal_id) != self.descriptor.seal_id() {
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
        let mut state = self.lock();
        if state.unsealed {
            return Err(UnsealError::Unsealed);
        }
        self.expire(&mut state, now);
        if state.received.iter().any(|r| r.holder == holder.name) {
            return Err(UnsealError::Duplicate(holder.name.clone()));
        }
        let share = Share::try_from(parsed.share).map_err(|_| UnsealError::Malformed)?;
        state.received.push(Received {
            holder: holder.name.clone(),
            share,
        });
        state.first_at.get_or_insert(now);
        if state.received.len() < usize::from(self.descriptor.threshold) {
            return Ok(Submitted::Counted(self.progress_of(&state)));
        }
        let sharks = Sharks(self.descriptor.threshold);
        let rebuilt = sharks
            .recover(state.received.iter().map(|r| &r.share))
            .map(Zeroizing::new);
        let key = rebuilt
            .ok()
            .and_then(|k| <[u8; 32]>::try_from(k.as_slice()).ok())
            .map(|k| MasterKey::new(SecretKey::from_bytes(k)))
            .filter(|k| k.matches(&self.key_check));
        match key {
            Some(key) => {
                state.received.clear();
                state.first_at = None;
                state.unsealed = true;
                let mut progress = self.progress_of(&state);
                progress.received_from = Vec::new();
                Ok(Submitted::Unsealed(key, progress))
            }
            None => {
                state.received.clear();
                state.first_at = None;
                Err(UnsealError::KeyMismatch)
            }
        }
    }
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
        assert!(m.contains("not an ssh-ed25519 public key"), "{m}");
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

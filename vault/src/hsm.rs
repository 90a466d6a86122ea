//! The `pkcs11` seal mode: the master key encrypted (AES-256-GCM, inside the
//! HSM) under a sensitive, non-extractable key that never leaves a PKCS#11
//! token, and unwrapped at start with the token's user PIN (auto-unseal).
//! Only the wrapped key and a descriptor are written; no tonic here.
//!
//! Why `CKM_AES_GCM` through `C_Encrypt`/`C_Decrypt` rather than
//! `CKM_AES_KEY_WRAP_PAD` through `C_WrapKey`: the master key is 32 bytes of
//! our own, not a token object; key wrap would need it imported into the
//! token as an extractable object and, on unwrap, read back out of one,
//! whereas GCM takes and returns the bytes. GCM authenticates the blob and
//! an associated-data string binding it to this seal, so a blob from
//! another key or a changed byte fails the tag inside the HSM
//! (`CKR_ENCRYPTED_DATA_INVALID`) instead of yielding a wrong key. SoftHSM2
//! (2.6) and the usual network HSMs implement it.

use std::path::{Path, PathBuf};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use cryptoki::{
    context::{CInitializeArgs, CInitializeFlags, Pkcs11},
    error::{Error as CkError, RvError},
    mechanism::{Mechanism, aead::GcmParams},
    object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle},
    session::{Session, UserType},
    slot::Slot,
    types::AuthPin,
};
use twokey_runtime::keys::SecretKey;
use zeroize::Zeroizing;

use crate::crypto::MasterKey;

/// The descriptor's `mode`.
pub const MODE: &str = "pkcs11";
/// The descriptor's file name in the directory `init-key --seal pkcs11` writes.
pub const DESCRIPTOR_FILE: &str = "seal.toml";
/// The mechanism that wraps the master key, as the descriptor names it.
const MECHANISM: &str = "CKM_AES_GCM";
/// Associated data of the wrap, followed by the seal id.
const AAD_PREFIX: &[u8] = b"twokey-pkcs11-seal-v1\0";
const IV_LEN: usize = 12;
const TAG_BITS: u64 = 128;

/// Which token: by its label, or by its slot number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRef {
    /// The token's label (`softhsm2-util --init-token --label`).
    Label(String),
    /// The slot number.
    Slot(u64),
}

impl std::fmt::Display for TokenRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Label(l) => write!(f, "token {l:?}"),
            Self::Slot(s) => write!(f, "the token in slot {s}"),
        }
    }
}

/// Where the user PIN is read from: never argv, never a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// A file (mode 0600) holding the PIN on its first line.
    File(PathBuf),
    /// An environment variable holding the PIN.
    Env(String),
}

impl std::fmt::Display for PinSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "pin_file {}", p.display()),
            Self::Env(v) => write!(f, "pin_env (the variable {v})"),
        }
    }
}

impl PinSource {
    /// Reads the PIN. A PIN file readable by group or others is refused.
    pub fn read(&self) -> Result<AuthPin, HsmError> {
        let text = match self {
            Self::File(path) => {
                let bytes = twokey_runtime::keys::read_secret_file(path)
                    .map_err(|e| HsmError::Pin(format!("pin_file: {e}")))?;
                let text = std::str::from_utf8(&bytes)
                    .map_err(|_| HsmError::Pin(format!("{self} is not UTF-8 text")))?;
                Zeroizing::new(text.lines().next().unwrap_or_default().to_owned())
            }
            Self::Env(var) => Zeroizing::new(std::env::var(var).map_err(|_| {
                HsmError::Pin(format!(
                    "pin_env names the variable {var}, which is not set (or not UTF-8); set it to the token's user PIN"
                ))
            })?),
        };
        if text.is_empty() {
            return Err(HsmError::Pin(format!(
                "{self} is empty; put the token's user PIN there"
            )));
        }
        Ok(AuthPin::from(text.as_str()))
    }
}

/// What the vault needs to reach the wrapping key: the module, the token,
/// the key's label and where the PIN is. The PIN itself is not here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The PKCS#11 module (`.so`), e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The token.
    pub token: TokenRef,
    /// `CKA_LABEL` of the AES-256 wrapping key.
    pub key_label: String,
    /// The user PIN's source.
    pub pin: PinSource,
}

/// What `init-key --seal pkcs11` writes: the wrapped key and how to find
/// the key that wraps it. No key material in the clear.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Descriptor {
    /// Always `pkcs11`.
    pub mode: String,
    /// A random id (hex) of this seal, bound into the wrap.
    pub seal_id: String,
    /// The token's label at init (for messages; the config chooses the token).
    pub token_label: String,
    /// The wrapping key's `CKA_LABEL` at init.
    pub key_label: String,
    /// The wrapping key's `CKA_CHECK_VALUE` (hex): a key of the same label
    /// that is not the one which wrapped this blob is named as such.
    pub wrapping_key_check: String,
    /// Always `CKM_AES_GCM`.
    pub mechanism: String,
    /// The GCM IV (base64, 12 bytes).
    pub iv: String,
    /// The master key encrypted by the HSM, with its tag (base64).
    pub wrapped_key: String,
    /// `MasterKey::key_check` of the master key (base64).
    pub key_check: String,
}

impl Descriptor {
    /// Reads and checks a descriptor file.
    pub fn load(path: &Path) -> Result<Self, HsmError> {
        let bad = |what: String| {
            HsmError::Descriptor(format!(
                "{}: {what}; use the {DESCRIPTOR_FILE} that `twokey-vault init-key --seal pkcs11` wrote",
                path.display()
            ))
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let d: Self = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let ok = d.mode == MODE
            && d.mechanism == MECHANISM
            && d.seal_id.len() == 32
            && B64.decode(&d.iv).is_ok_and(|iv| iv.len() == IV_LEN)
            && B64.decode(&d.wrapped_key).is_ok_and(|w| w.len() == 32 + 16)
            && B64.decode(&d.key_check).is_ok();
        if !ok {
            return Err(bad(
                "mode, mechanism, seal_id, iv, wrapped_key or key_check is invalid".into(),
            ));
        }
        Ok(d)
    }

    /// Writes the descriptor to a new file, synced.
    pub fn write(&self, path: &Path) -> Result<(), HsmError> {
        let text = toml::to_string(self)
            .map_err(|e| HsmError::Descriptor(format!("encoding the seal descriptor: {e}")))?;
        crate::unseal::write_new(path, text.as_bytes()).map_err(|e| HsmError::Write(e.to_string()))
    }

    fn aad(&self) -> Vec<u8> {
        [AAD_PREFIX, self.seal_id.as_bytes()].concat()
    }
}

/// Why the HSM could not wrap or unwrap the master key. Every message
/// starts `pkcs11:`, names what was wrong and what to do, and never holds
/// the PIN.
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    /// The module would not load or initialise.
    #[error(
        "pkcs11: cannot load the module {path}: {reason}; set [seal] module to the token's PKCS#11 library (SoftHSM2: /usr/lib/softhsm/libsofthsm2.so)"
    )]
    Module {
        /// The module's path.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// No such token.
    #[error("pkcs11: no {token} in {module} (tokens: {present}); check [seal] token_label or slot")]
    Token {
        /// The token asked for.
        token: TokenRef,
        /// The module.
        module: String,
        /// The tokens there are.
        present: String,
    },
    /// The PIN could not be read.
    #[error("pkcs11: {0}")]
    Pin(String),
    /// The token refused the PIN.
    #[error(
        "pkcs11: the token refused the PIN; check {0} (each wrong PIN counts toward the token's lockout)"
    )]
    PinIncorrect(PinSource),
    /// The user PIN is locked.
    #[error(
        "pkcs11: the token's user PIN is locked after too many wrong tries; its security officer must reset it"
    )]
    PinLocked,
    /// No key of that label.
    #[error("pkcs11: no AES key labelled {label:?} in {token}; {advice}")]
    KeyMissing {
        /// The label asked for.
        label: String,
        /// The token.
        token: String,
        /// What to do.
        advice: String,
    },
    /// A key of that label is not fit to wrap the master key.
    #[error(
        "pkcs11: the key labelled {label:?} in {token} is not a sensitive, non-extractable AES-256 key that may encrypt and decrypt ({why}); choose another --key-label"
    )]
    KeyUnfit {
        /// The label.
        label: String,
        /// The token.
        token: String,
        /// Which attribute is wrong.
        why: String,
    },
    /// The key found is not the one that wrapped this blob.
    #[error(
        "pkcs11: the key labelled {label:?} in {token} is not the key that wrapped {descriptor} (its check value differs; init-key used the key {wrapped_by:?}); point [seal] key_label and token at that key, or use the seal.toml made with this one"
    )]
    OtherKey {
        /// The label in the config.
        label: String,
        /// The token.
        token: String,
        /// The descriptor's path.
        descriptor: String,
        /// The label recorded at init.
        wrapped_by: String,
    },
    /// The HSM refused to decrypt the blob: from another key, or changed.
    #[error(
        "pkcs11: the wrapped key in {0} does not open under this key (a blob wrapped by another key, or a changed file); use the seal.toml init-key wrote with this key"
    )]
    Blob(String),
    /// The unwrapped key fails the descriptor's key check.
    #[error(
        "pkcs11: the unwrapped master key fails the key check in {0}; the descriptor was changed: restore the one init-key wrote"
    )]
    KeyCheck(String),
    /// The descriptor is unreadable or wrong.
    #[error("pkcs11: seal descriptor {0}")]
    Descriptor(String),
    /// The descriptor could not be written.
    #[error("{0}")]
    Write(String),
    /// Any other refusal of the token, with the call that failed.
    #[error("pkcs11: {what} failed: {reason}")]
    Token11 {
        /// What was being done.
        what: &'static str,
        /// The PKCS#11 error.
        reason: String,
    },
}

fn call(what: &'static str) -> impl FnOnce(CkError) -> HsmError {
    move |e| HsmError::Token11 {
        what,
        reason: e.to_string(),
    }
}

/// A logged-in session on the configured token.
struct Open {
    ctx: Pkcs11,
    session: Option<Session>,
    token: String,
}

impl Open {
    fn session(&self) -> &Session {
        self.session.as_ref().expect("open until dropped")
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.logout();
            drop(s);
        }
        let _ = self.ctx.clone().finalize();
    }
}

fn open(settings: &Settings) -> Result<Open, HsmError> {
    let pin = settings.pin.read()?;
    let module_error = |reason: String| HsmError::Module {
        path: settings.module.clone(),
        reason,
    };
    if !settings.module.is_file() {
        return Err(module_error("no such file".into()));
    }
    let ctx = Pkcs11::new(&settings.module).map_err(|e| module_error(e.to_string()))?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(|e| module_error(e.to_string()))?;
    let mut open = Open {
        ctx,
        session: None,
        token: settings.token.to_string(),
    };
    let slot = find_slot(&open.ctx, settings)?;
    let session = open
        .ctx
        .open_rw_session(slot)
        .map_err(call("opening a session"))?;
    match session.login(UserType::User, Some(&pin)) {
        Ok(()) => {}
        Err(CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLenRange, _)) => {
            return Err(HsmError::PinIncorrect(settings.pin.clone()));
        }
        Err(CkError::Pkcs11(RvError::PinLocked, _)) => return Err(HsmError::PinLocked),
        Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => return Err(call("logging in")(e)),
    }
    open.session = Some(session);
    Ok(open)
}

fn find_slot(ctx: &Pkcs11, settings: &Settings) -> Result<Slot, HsmError> {
    let slots = ctx
        .get_slots_with_token()
        .map_err(call("listing the slots"))?;
    let mut present = Vec::new();
    for slot in slots {
        let label = ctx
            .get_token_info(slot)
            .map(|i| i.label().trim_end().to_owned())
            .unwrap_or_default();
        let hit = match &settings.token {
            TokenRef::Label(l) => *l == label,
            TokenRef::Slot(s) => *s == slot.id(),
        };
        if hit {
            return Ok(slot);
        }
        present.push(format!("{label:?} in slot {}", slot.id()));
    }
    Err(HsmError::Token {
        token: settings.token.clone(),
        module: settings.module.display().to_string(),
        present: if present.is_empty() {
            "none".into()
        } else {
            present.join(", ")
        },
    })
}

fn key_template(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

/// The one AES key labelled `label`, if any.
fn find_key(open: &Open, label: &str) -> Result<Option<ObjectHandle>, HsmError> {
    let found = open
        .session()
        .find_objects(&key_template(label))
        .map_err(call("finding the key"))?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        more => Err(HsmError::KeyUnfit {
            label: label.into(),
            token: open.token.clone(),
            why: format!("{} keys carry that label", more.len()),
        }),
    }
}

/// What [`check_key`] learnt of a fit key.
struct KeyFacts {
    /// `CKA_CHECK_VALUE`.
    check: Vec<u8>,
    /// `CKA_ALWAYS_SENSITIVE` and `CKA_NEVER_EXTRACTABLE`: made inside the
    /// token, never seen outside it (false for an imported key).
    born_inside: bool,
}

/// Checks the key is fit to wrap the master key.
fn check_key(open: &Open, label: &str, key: ObjectHandle) -> Result<KeyFacts, HsmError> {
    let attrs = open
        .session()
        .get_attributes(
            key,
            &[
                AttributeType::ValueLen,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
                AttributeType::CheckValue,
                AttributeType::AlwaysSensitive,
                AttributeType::NeverExtractable,
            ],
        )
        .map_err(call("reading the key's attributes"))?;
    let mut check = Vec::new();
    let mut wrong = Vec::new();
    let (mut len, mut sensitive, mut extractable, mut encrypt, mut decrypt) =
        (0u64, false, true, false, false);
    let (mut always_sensitive, mut never_extractable) = (false, false);
    for a in attrs {
        match a {
            Attribute::AlwaysSensitive(b) => always_sensitive = b,
            Attribute::NeverExtractable(b) => never_extractable = b,
            Attribute::ValueLen(l) => len = l.into(),
            Attribute::Sensitive(b) => sensitive = b,
            Attribute::Extractable(b) => extractable = b,
            Attribute::Encrypt(b) => encrypt = b,
            Attribute::Decrypt(b) => decrypt = b,
            Attribute::CheckValue(c) => check = c,
            _ => {}
        }
    }
    if len != 32 {
        wrong.push(format!("{} bits", len * 8));
    }
    if !sensitive {
        wrong.push("not sensitive".into());
    }
    if extractable {
        wrong.push("extractable".into());
    }
    if !(encrypt && decrypt) {
        wrong.push("no encrypt or decrypt".into());
    }
    if check.is_empty() {
        wrong.push("no check value".into());
    }
    if wrong.is_empty() {
        Ok(KeyFacts {
            check,
            born_inside: always_sensitive && never_extractable,
        })
    } else {
        Err(HsmError::KeyUnfit {
            label: label.into(),
            token: open.token.clone(),
            why: wrong.join(", "),
        })
    }
}

fn generate_key(open: &Open, label: &str) -> Result<ObjectHandle, HsmError> {
    let mut template = key_template(label);
    template.extend([
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
    ]);
    open.session()
        .generate_key(&Mechanism::AesKeyGen, &template)
        .map_err(call("generating the wrapping key"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What [`wrap`] did.
#[derive(Debug)]
pub struct Wrapped {
    /// What to write to [`DESCRIPTOR_FILE`].
    pub descriptor: Descriptor,
    /// The wrapping key was made now (else an existing one was found).
    pub made: bool,
    /// The wrapping key was generated inside the token and was never
    /// extractable (false for a key imported into it).
    pub born_inside: bool,
}

/// `init-key --seal pkcs11`: finds the wrapping key labelled
/// `settings.key_label` (or makes it: AES-256, sensitive, non-extractable,
/// on the token), encrypts `key` under it inside the HSM and returns the
/// descriptor to write.
pub fn wrap(settings: &Settings, key: &SecretKey) -> Result<Wrapped, HsmError> {
    let open = open(settings)?;
    let (handle, made) = match find_key(&open, &settings.key_label)? {
        Some(h) => (h, false),
        None => (generate_key(&open, &settings.key_label)?, true),
    };
    let facts = check_key(&open, &settings.key_label, handle)?;
    let check = &facts.check;
    let mut seal_id = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seal_id);
    let mut iv = [0u8; IV_LEN];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut iv);
    let mut descriptor = Descriptor {
        mode: MODE.into(),
        seal_id: hex(&seal_id),
        token_label: token_label(&open, settings),
        key_label: settings.key_label.clone(),
        wrapping_key_check: hex(check),
        mechanism: MECHANISM.into(),
        iv: B64.encode(iv),
        wrapped_key: String::new(),
        key_check: B64.encode(MasterKey::new(key.clone()).key_check()),
    };
    let aad = descriptor.aad();
    let params = GcmParams::new(&mut iv, &aad, TAG_BITS.into()).map_err(call("AES-GCM"))?;
    let wrapped = open
        .session()
        .encrypt(&Mechanism::AesGcm(params), handle, key.expose())
        .map_err(call("wrapping the master key"))?;
    descriptor.wrapped_key = B64.encode(wrapped);
    Ok(Wrapped {
        descriptor,
        made,
        born_inside: facts.born_inside,
    })
}

fn token_label(open: &Open, settings: &Settings) -> String {
    match &settings.token {
        TokenRef::Label(l) => l.clone(),
        TokenRef::Slot(_) => open
            .session()
            .get_session_info()
            .ok()
            .and_then(|i| open.ctx.get_token_info(i.slot_id()).ok())
            .map(|t| t.label().trim_end().to_owned())
            .unwrap_or_default(),
    }
}

/// At start: logs in, finds the wrapping key, checks it is the one that
/// wrapped `descriptor`, decrypts the master key inside the HSM and checks
/// it against the descriptor's key check. `path` names the descriptor in
/// messages.
pub fn unwrap(
    settings: &Settings,
    descriptor: &Descriptor,
    path: &Path,
) -> Result<SecretKey, HsmError> {
    let shown = path.display().to_string();
    let open = open(settings)?;
    let handle = find_key(&open, &settings.key_label)?.ok_or_else(|| HsmError::KeyMissing {
        label: settings.key_label.clone(),
        token: open.token.clone(),
        advice: format!(
            "check [seal] key_label (init-key wrapped {shown} with the key {:?} in token {:?})",
            descriptor.key_label, descriptor.token_label
        ),
    })?;
    let check = check_key(&open, &settings.key_label, handle)?.check;
    if hex(&check) != descriptor.wrapping_key_check {
        return Err(HsmError::OtherKey {
            label: settings.key_label.clone(),
            token: open.token.clone(),
            descriptor: shown,
            wrapped_by: descriptor.key_label.clone(),
        });
    }
    let bad = || HsmError::Descriptor(format!("{shown}: iv or wrapped_key is not base64"));
    let mut iv = B64.decode(&descriptor.iv).map_err(|_| bad())?;
    let wrapped = B64.decode(&descriptor.wrapped_key).map_err(|_| bad())?;
    let aad = descriptor.aad();
    let params = GcmParams::new(&mut iv, &aad, TAG_BITS.into()).map_err(call("AES-GCM"))?;
    let plain = open
        .session()
        .decrypt(&Mechanism::AesGcm(params), handle, &wrapped)
        .map(Zeroizing::new);
    let plain = match plain {
        Ok(p) => p,
        Err(CkError::Pkcs11(
            RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::GeneralError
            | RvError::FunctionFailed,
            _,
        )) => return Err(HsmError::Blob(shown)),
        Err(e) => return Err(call("unwrapping the master key")(e)),
    };
    if plain.len() != 32 {
        return Err(HsmError::Blob(shown));
    }
    let mut bytes = Zeroizing::new([0u8; 32]);
    bytes.copy_from_slice(&plain);
    let key = SecretKey::from_bytes(*bytes);
    let check = B64.decode(&descriptor.key_check).unwrap_or_default();
    if !MasterKey::new(key.clone()).matches(&check) {
        return Err(HsmError::KeyCheck(shown));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use secrecy::ExposeSecret;

    use super::*;

    #[test]
    fn the_pin_comes_from_a_private_file_or_a_variable_and_debug_hides_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        std::fs::write(&path, "83917461\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let pin = PinSource::File(path.clone()).read().unwrap();
        assert_eq!(pin.expose_secret(), "83917461");
        assert!(!format!("{pin:?}").contains("83917461"), "{pin:?}");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = PinSource::File(path.clone())
            .read()
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("pkcs11: "), "{e}");
        assert!(e.contains("0644") || e.contains("644"), "{e}");
        assert!(!e.contains("83917461"), "{e}");

        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = PinSource::File(empty).read().unwrap_err().to_string();
        assert!(
            e.ends_with("is empty; put the token's user PIN there"),
            "{e}"
        );

        let e = PinSource::Env("TWOKEY_TEST_NO_SUCH_PIN_VARIABLE".into())
            .read()
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "pkcs11: pin_env names the variable TWOKEY_TEST_NO_SUCH_PIN_VARIABLE, which is not set (or not UTF-8); set it to the token's user PIN"
        );
    }

    #[test]
    fn a_missing_module_is_named_with_what_to_set() {
        let dir = tempfile::tempdir().unwrap();
        let pin = dir.path().join("pin");
        std::fs::write(&pin, "1234\n").unwrap();
        std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
        let settings = Settings {
            module: dir.path().join("nope.so"),
            token: TokenRef::Label("twokey".into()),
            key_label: "k".into(),
            pin: PinSource::File(pin),
        };
        let e = wrap(&settings, &SecretKey::generate())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("pkcs11: cannot load the module "), "{e}");
        assert!(e.contains("set [seal] module"), "{e}");
    }

    #[test]
    fn a_descriptor_that_is_not_a_pkcs11_one_is_refused_saying_what_to_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DESCRIPTOR_FILE);
        let good = Descriptor {
            mode: MODE.into(),
            seal_id: "0".repeat(32),
            token_label: "t".into(),
            key_label: "k".into(),
            wrapping_key_check: "abcdef".into(),
            mechanism: MECHANISM.into(),
            iv: B64.encode([0u8; IV_LEN]),
            wrapped_key: B64.encode([0u8; 48]),
            key_check: B64.encode([0u8; 8]),
        };
        good.write(&path).unwrap();
        assert_eq!(Descriptor::load(&path).unwrap(), good);
        // Written once: never overwritten.
        assert!(good.write(&path).is_err());
        let other = dir.path().join("shamir.toml");
        std::fs::write(&other, "mode = \"shamir\"\n").unwrap();
        let e = Descriptor::load(&other).unwrap_err().to_string();
        assert!(e.starts_with("pkcs11: seal descriptor "), "{e}");
        assert!(e.contains("init-key --seal pkcs11"), "{e}");
        let short = Descriptor {
            wrapped_key: B64.encode([0u8; 32]),
            ..good
        };
        let path = dir.path().join("short.toml");
        short.write(&path).unwrap();
        assert!(Descriptor::load(&path).is_err());
    }
}

//! Checkpoints: the C2SP `tlog-checkpoint` body (origin, tree size, base64
//! root hash) inside a C2SP `signed-note` with one Ed25519 signature, as Go's
//! `golang.org/x/mod/sumdb/note` writes and reads them; and the verifier key
//! string (`<name>+<hex key id>+<base64(0x01 ‖ public key)>`) that lets
//! anyone check a checkpoint offline.

use std::fmt;

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::merkle::Hash;

/// The signature algorithm byte of Ed25519 note keys.
const ALG_ED25519: u8 = 0x01;
/// The em dash (U+2014) and space that start a signature line.
const SIG_PREFIX: &str = "\u{2014} ";

/// Why a checkpoint, a note or a verifier key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// A key name is empty or holds whitespace or '+'.
    #[error("invalid key name {0:?}: it must be non-empty, without spaces or '+'")]
    BadKeyName(String),
    /// The verifier key string is malformed.
    #[error("invalid verifier key {0:?}: expected <name>+<8 hex digits>+<base64 key>")]
    BadVerifierKey(String),
    /// The note is not a signed note.
    #[error("malformed signed note: {0}")]
    MalformedNote(&'static str),
    /// No signature by the verifier's key is on the note.
    #[error("the note carries no signature by key {0}")]
    NoSignature(String),
    /// A signature by the verifier's key does not verify.
    #[error(
        "the signature by key {0} does not verify: the checkpoint was altered or signed by another key"
    )]
    BadSignature(String),
    /// The checkpoint body is malformed.
    #[error("malformed checkpoint: {0}")]
    MalformedCheckpoint(&'static str),
    /// The checkpoint names another log.
    #[error("checkpoint origin {found:?} is not the expected {expected:?}")]
    WrongOrigin {
        /// The origin line of the checkpoint.
        found: String,
        /// The verifier's name.
        expected: String,
    },
}

/// What a checkpoint says: which log, how many entries, and their root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's origin line, e.g. `twokey.local/audit`.
    pub origin: String,
    /// Number of entries covered.
    pub size: u64,
    /// RFC 6962 root hash of those entries.
    pub root: Hash,
}

impl Checkpoint {
    /// The C2SP tlog-checkpoint body: `<origin>\n<size>\n<base64 root>\n`.
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root)
        )
    }

    /// Parses a checkpoint body; extension lines after the root are ignored.
    pub fn parse_body(text: &str) -> Result<Self, CheckpointError> {
        let bad = CheckpointError::MalformedCheckpoint;
        let body = text
            .strip_suffix('\n')
            .ok_or(bad("the body does not end with a newline"))?;
        let mut lines = body.split('\n');
        let origin = lines
            .next()
            .filter(|l| !l.is_empty())
            .ok_or(bad("no origin line"))?;
        let size = lines.next().ok_or(bad("no tree size line"))?;
        if size.is_empty()
            || !size.bytes().all(|b| b.is_ascii_digit())
            || (size.len() > 1 && size.starts_with('0'))
        {
            return Err(bad("the tree size is not a decimal number"));
        }
        let size = size
            .parse()
            .map_err(|_| bad("the tree size is too large"))?;
        let root = lines.next().ok_or(bad("no root hash line"))?;
        let root = B64
            .decode(root)
            .ok()
            .and_then(|r| Hash::try_from(r.as_slice()).ok())
            .ok_or(bad("the root hash is not 32 bytes of base64"))?;
        Ok(Self {
            origin: origin.to_owned(),
            size,
            root,
        })
    }
}

/// A note's signature line: the key name and the decoded blob (key id ‖
/// signature).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureLine<'n> {
    /// The key name.
    pub name: &'n str,
    /// The key id.
    pub id: u32,
    /// What follows the key id.
    pub signature: Vec<u8>,
}

/// Splits a signed note into its text (ending with a newline) and its
/// signature lines, checking the note's form (no key is checked).
pub fn split_note(note: &str) -> Result<(&str, Vec<SignatureLine<'_>>), CheckpointError> {
    let bad = CheckpointError::MalformedNote;
    if note.contains('\r') || note.chars().any(|c| c.is_control() && c != '\n') {
        return Err(bad("the note holds control characters"));
    }
    let split = note
        .rfind("\n\n")
        .ok_or(bad("no blank line before the signatures"))?;
    let (text, sigs) = (&note[..=split], &note[split + 2..]);
    let sigs = sigs
        .strip_suffix('\n')
        .ok_or(bad("the signatures do not end with a newline"))?;
    let mut out = Vec::new();
    for line in sigs.split('\n') {
        let rest = line
            .strip_prefix(SIG_PREFIX)
            .ok_or(bad("a signature line does not start with an em dash"))?;
        let (name, blob) = rest
            .split_once(' ')
            .ok_or(bad("a signature line has no signature"))?;
        check_name(name).map_err(|_| bad("a signature line has an invalid key name"))?;
        let blob = B64
            .decode(blob)
            .map_err(|_| bad("a signature is not base64"))?;
        if blob.len() < 5 {
            return Err(bad("a signature is too short"));
        }
        out.push(SignatureLine {
            name,
            id: u32::from_be_bytes([blob[0], blob[1], blob[2], blob[3]]),
            signature: blob[4..].to_vec(),
        });
    }
    Ok((text, out))
}

/// A signature line: `— <name> base64(key id ‖ signature)`, without the
/// final newline.
pub fn signature_line(name: &str, id: u32, signature: &[u8]) -> String {
    let mut blob = id.to_be_bytes().to_vec();
    blob.extend_from_slice(signature);
    format!("{SIG_PREFIX}{name} {}", B64.encode(blob))
}

pub(crate) fn check_name(name: &str) -> Result<(), CheckpointError> {
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c == '+') {
        return Err(CheckpointError::BadKeyName(name.to_owned()));
    }
    Ok(())
}

/// The note key id: the first 4 bytes of SHA-256(name ‖ '\n' ‖ 0x01 ‖ public key).
pub fn key_id(name: &str, key: &VerifyingKey) -> u32 {
    key_id_of(ALG_ED25519, name, key)
}

/// The key id of a note key of signature type `alg`: the first 4 bytes of
/// SHA-256(name ‖ '\n' ‖ alg ‖ public key).
pub(crate) fn key_id_of(alg: u8, name: &str, key: &VerifyingKey) -> u32 {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([alg]);
    h.update(key.as_bytes());
    let digest = h.finalize();
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// Parses a verifier key `<name>+<hex key id>+<base64(alg ‖ public key)>` of
/// signature type `alg`, checking that the key id matches the name and key.
pub(crate) fn parse_verifier_key(
    text: &str,
    alg: u8,
) -> Result<(String, u32, VerifyingKey), CheckpointError> {
    let bad = || CheckpointError::BadVerifierKey(text.chars().take(120).collect());
    let mut parts = text.splitn(3, '+');
    let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    check_name(name).map_err(|_| bad())?;
    if id.len() != 8 || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(bad());
    }
    let id = u32::from_str_radix(id, 16).map_err(|_| bad())?;
    let raw = B64.decode(key).map_err(|_| bad())?;
    let Some((&found, public)) = raw.split_first() else {
        return Err(bad());
    };
    if found != alg {
        return Err(bad());
    }
    let public: [u8; 32] = public.try_into().map_err(|_| bad())?;
    let key = VerifyingKey::from_bytes(&public).map_err(|_| bad())?;
    if key_id_of(alg, name, &key) != id {
        return Err(bad());
    }
    Ok((name.to_owned(), id, key))
}

/// Signs checkpoints with the log's key. Debug never shows the key.
pub struct CheckpointSigner {
    name: String,
    key: SigningKey,
    id: u32,
}

impl fmt::Debug for CheckpointSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointSigner")
            .field("name", &self.name)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl CheckpointSigner {
    /// A signer whose key name is `name` (the log's origin).
    pub fn new(name: &str, key: SigningKey) -> Result<Self, CheckpointError> {
        check_name(name)?;
        let id = key_id(name, &key.verifying_key());
        Ok(Self {
            name: name.to_owned(),
            key,
            id,
        })
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The verifier for this signer's checkpoints.
    pub fn verifier(&self) -> NoteVerifier {
        NoteVerifier {
            name: self.name.clone(),
            id: self.id,
            key: self.key.verifying_key(),
        }
    }

    /// A signed note over `text`, which must end with a newline.
    pub fn sign_note(&self, text: &str) -> Result<String, CheckpointError> {
        if !text.ends_with('\n') {
            return Err(CheckpointError::MalformedNote(
                "the text does not end with a newline",
            ));
        }
        let signature = self.key.sign(text.as_bytes());
        let mut blob = self.id.to_be_bytes().to_vec();
        blob.extend_from_slice(&signature.to_bytes());
        Ok(format!(
            "{text}\n{SIG_PREFIX}{} {}\n",
            self.name,
            B64.encode(blob)
        ))
    }

    /// The signed note of a checkpoint.
    pub fn sign(&self, checkpoint: &Checkpoint) -> Result<String, CheckpointError> {
        self.sign_note(&checkpoint.body())
    }
}

/// A note verifier key: name, key id and Ed25519 public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteVerifier {
    name: String,
    id: u32,
    key: VerifyingKey,
}

impl NoteVerifier {
    /// The verifier for `key` under `name`.
    pub fn new(name: &str, key: VerifyingKey) -> Result<Self, CheckpointError> {
        check_name(name)?;
        Ok(Self {
            name: name.to_owned(),
            id: key_id(name, &key),
            key,
        })
    }

    /// Parses `<name>+<hex key id>+<base64(0x01 ‖ public key)>`, checking that
    /// the key id matches the name and key.
    pub fn parse(text: &str) -> Result<Self, CheckpointError> {
        let (name, id, key) = parse_verifier_key(text, ALG_ED25519)?;
        Ok(Self { name, id, key })
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key id.
    pub fn key_id(&self) -> u32 {
        self.id
    }

    /// The public key.
    pub fn key(&self) -> &VerifyingKey {
        &self.key
    }

    /// Checks a signed note and returns its text. Signatures by other keys
    /// are ignored; at least one by this key must be present and all of
    /// those must verify (`verify_strict`).
    pub fn open<'n>(&self, note: &'n str) -> Result<&'n str, CheckpointError> {
        let (text, sigs) = split_note(note)?;
        let mut found = false;
        for line in sigs {
            if line.name != self.name || line.id != self.id {
                continue;
            }
            let signature = Signature::from_slice(&line.signature)
                .map_err(|_| CheckpointError::BadSignature(self.name.clone()))?;
            self.key
                .verify_strict(text.as_bytes(), &signature)
                .map_err(|_| CheckpointError::BadSignature(self.name.clone()))?;
            found = true;
        }
        if found {
            Ok(text)
        } else {
            Err(CheckpointError::NoSignature(self.name.clone()))
        }
    }

    /// Checks a signed checkpoint whose origin is this key's name.
    pub fn open_checkpoint(&self, note: &str) -> Result<Checkpoint, CheckpointError> {
        let checkpoint = Checkpoint::parse_body(self.open(note)?)?;
        if checkpoint.origin != self.name {
            return Err(CheckpointError::WrongOrigin {
                found: checkpoint.origin,
                expected: self.name.clone(),
            });
        }
        Ok(checkpoint)
    }
}

impl fmt::Display for NoteVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut raw = vec![ALG_ED25519];
        raw.extend_from_slice(self.key.as_bytes());
        write!(f, "{}+{:08x}+{}", self.name, self.id, B64.encode(raw))
    }
}

impl std::str::FromStr for NoteVerifier {
    type Err = CheckpointError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The key and note of golang.org/x/mod/sumdb/note's note_test.go.
    const GO_VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
    const GO_SKEY: &str = "AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    const GO_TEXT: &str = "If you think cryptography is the answer to your problem,\n\
                           then you don't know what your problem is.\n";
    const GO_SIG: &str = "\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";

    fn go_signer() -> CheckpointSigner {
        let raw = B64.decode(GO_SKEY).unwrap();
        assert_eq!(raw[0], ALG_ED25519);
        let seed: [u8; 32] = raw[1..].try_into().unwrap();
        CheckpointSigner::new("PeterNeumann", SigningKey::from_bytes(&seed)).unwrap()
    }

    fn signer() -> CheckpointSigner {
        CheckpointSigner::new(
            "twokey.test/audit",
            SigningKey::generate(&mut rand::rngs::OsRng),
        )
        .unwrap()
    }

    fn checkpoint() -> Checkpoint {
        Checkpoint {
            origin: "twokey.test/audit".into(),
            size: 42,
            root: [7; 32],
        }
    }

    #[test]
    fn notes_match_the_go_reference_byte_for_byte() {
        let signer = go_signer();
        assert_eq!(signer.verifier().to_string(), GO_VKEY);
        let note = signer.sign_note(GO_TEXT).unwrap();
        assert_eq!(note, format!("{GO_TEXT}\n{GO_SIG}"));
        let verifier = NoteVerifier::parse(GO_VKEY).unwrap();
        assert_eq!(verifier.open(&note).unwrap(), GO_TEXT);
        let altered = note.replace("cryptography", "cryptographY");
        assert!(matches!(
            verifier.open(&altered),
            Err(CheckpointError::BadSignature(_))
        ));
    }

    #[test]
    fn verifier_keys_with_a_wrong_id_or_mangled_text_are_refused() {
        assert!(NoteVerifier::parse(GO_VKEY).is_ok());
        for bad in [
            "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
            "PeterNeumann+c74f20a3+AhpZ2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
            "PeterNeumann+c74f20a3",
            "+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
            "PeterNeumann+C74F20A3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        ] {
            assert!(NoteVerifier::parse(bad).is_err(), "{bad} accepted");
        }
        let mut b = GO_VKEY.as_bytes().to_vec();
        for i in 0..b.len() {
            b[i] = b[i].wrapping_add(1);
            if let Ok(text) = std::str::from_utf8(&b) {
                assert!(NoteVerifier::parse(text).is_err(), "{text} accepted");
            }
            b[i] = b[i].wrapping_sub(1);
        }
    }

    #[test]
    fn checkpoints_round_trip_through_a_signed_note() {
        let signer = signer();
        let note = signer.sign(&checkpoint()).unwrap();
        assert!(note.starts_with(&checkpoint().body()));
        let verifier = NoteVerifier::parse(&signer.verifier().to_string()).unwrap();
        assert_eq!(verifier.open_checkpoint(&note).unwrap(), checkpoint());
    }

    #[test]
    fn tampered_size_root_signature_or_key_name_is_rejected() {
        let signer = signer();
        let verifier = signer.verifier();
        let note = signer.sign(&checkpoint()).unwrap();
        let root_b64 = B64.encode([7u8; 32]);
        let other_root = B64.encode([8u8; 32]);

        let tampered_size = note.replacen("\n42\n", "\n41\n", 1);
        let tampered_root = note.replacen(&root_b64, &other_root, 1);
        let sig_line = note.lines().last().unwrap();
        let blob = sig_line.rsplit(' ').next().unwrap();
        let mut raw = B64.decode(blob).unwrap();
        raw[10] ^= 1;
        let tampered_sig = note.replacen(blob, &B64.encode(&raw), 1);
        let renamed = note.replacen(
            "\u{2014} twokey.test/audit ",
            "\u{2014} twokey.test/other ",
            1,
        );

        for (what, n) in [
            ("size", tampered_size),
            ("root", tampered_root),
            ("signature", tampered_sig),
            ("key name", renamed),
        ] {
            assert_ne!(n, note, "{what} was not changed");
            assert!(
                verifier.open_checkpoint(&n).is_err(),
                "tampered {what} accepted"
            );
        }

        let stranger = CheckpointSigner::new(
            "twokey.test/audit",
            SigningKey::generate(&mut rand::rngs::OsRng),
        )
        .unwrap();
        assert!(
            verifier
                .open_checkpoint(&stranger.sign(&checkpoint()).unwrap())
                .is_err()
        );
        assert!(verifier.open_checkpoint(&checkpoint().body()).is_err());
    }

    #[test]
    fn checkpoint_of_another_origin_is_rejected() {
        let other =
            CheckpointSigner::new("twokey.test/audit", SigningKey::from_bytes(&[3; 32])).unwrap();
        let mut cp = checkpoint();
        cp.origin = "elsewhere/log".into();
        let note = other.sign(&cp).unwrap();
        assert!(matches!(
            other.verifier().open_checkpoint(&note),
            Err(CheckpointError::WrongOrigin { .. })
        ));
    }

    #[test]
    fn malformed_checkpoint_bodies_are_rejected() {
        for body in [
            "origin\n42\n",
            "origin\nx\nAAAA\n",
            "origin\n042\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n",
            "origin\n42\nAAAA\n",
            "\n42\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n",
            "origin\n42\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=",
        ] {
            assert!(Checkpoint::parse_body(body).is_err(), "{body:?} accepted");
        }
        assert_eq!(
            Checkpoint::parse_body("origin\n42\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n")
                .unwrap()
                .root,
            [7; 32]
        );
    }

    #[test]
    fn signer_debug_does_not_show_the_key() {
        let key = SigningKey::from_bytes(&[9; 32]);
        let signer = CheckpointSigner::new("n", key).unwrap();
        let debug = format!("{signer:?}");
        assert!(debug.contains("[redacted]"));
        assert!(!debug.contains("9, 9"));
        assert!(!debug.contains(&B64.encode([9u8; 32])));
    }

    proptest::proptest! {
        #[test]
        fn checkpoint_bodies_round_trip(
            origin in "[a-z0-9./-]{1,40}",
            size in proptest::prelude::any::<u64>(),
            root in proptest::prelude::any::<[u8; 32]>(),
        ) {
            let cp = Checkpoint { origin, size, root };
            proptest::prop_assert_eq!(Checkpoint::parse_body(&cp.body()).unwrap(), cp);
        }

        #[test]
        fn opening_arbitrary_text_never_panics_or_verifies(text in "\\PC{0,200}(\n\n\u{2014} [a-z]{1,8} [A-Za-z0-9+/=]{0,100}\n)?") {
            let verifier = NoteVerifier::new("a", SigningKey::from_bytes(&[5; 32]).verifying_key()).unwrap();
            proptest::prop_assert!(verifier.open(&text).is_err());
        }
    }
}

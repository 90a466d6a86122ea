//! Witness cosignatures in the C2SP `tlog-cosignature` format, Ed25519
//! version (`cosignature/v1`): a note signature line
//! `— <witness name> base64(key id ‖ u64 timestamp ‖ Ed25519 signature)`
//! whose signed message is
//!
//! ```text
//! cosignature/v1
//! time <POSIX seconds, decimal>
//! <the checkpoint's note text, with its final newline>
//! ```
//!
//! and whose key id is the first 4 bytes of
//! SHA-256(name ‖ '\n' ‖ 0x04 ‖ public key). The verifier key string is
//! `<name>+<hex key id>+<base64(0x04 ‖ public key)>` (a C2SP vkey).
//!
//! A v1 cosignature says that, at that time, the largest consistent tree
//! head the witness saw for the log of that origin has that root. Go's
//! `sumdb/note` ignores lines of keys it was not given, so a cosigned
//! checkpoint still opens with the log's key alone.

use std::fmt;

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::checkpoint::{
    CheckpointError, check_name, key_id_of, parse_verifier_key, signature_line, split_note,
};

/// The signature type byte of Ed25519 `cosignature/v1` keys.
pub const ALG_COSIGNATURE_V1: u8 = 0x04;

/// Why a cosignature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CosignatureError {
    /// The note or a key is malformed.
    #[error(transparent)]
    Note(#[from] CheckpointError),
    /// No cosignature by this witness is on the note.
    #[error("the note carries no cosignature by witness {0}")]
    Missing(String),
    /// A cosignature by this witness does not verify.
    #[error("the cosignature by witness {0} does not verify: forged, or over another checkpoint")]
    Forged(String),
}

/// The message a `cosignature/v1` signs: header, time line, note text.
pub fn message(text: &str, timestamp: u64) -> String {
    format!("cosignature/v1\ntime {timestamp}\n{text}")
}

/// The key id of a `cosignature/v1` key: the first 4 bytes of
/// SHA-256(name ‖ '\n' ‖ 0x04 ‖ public key).
pub fn key_id(name: &str, key: &VerifyingKey) -> u32 {
    key_id_of(ALG_COSIGNATURE_V1, name, key)
}

/// A witness's signing side. Debug never shows the key.
pub struct Cosigner {
    name: String,
    key: SigningKey,
    id: u32,
}

impl fmt::Debug for Cosigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cosigner")
            .field("name", &self.name)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl Cosigner {
    /// A witness named `name` (a schema-less URL, no spaces or '+').
    pub fn new(name: &str, key: SigningKey) -> Result<Self, CheckpointError> {
        check_name(name)?;
        Ok(Self {
            id: key_id(name, &key.verifying_key()),
            name: name.to_owned(),
            key,
        })
    }

    /// The witness name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The verifier of this witness's cosignatures.
    pub fn verifier(&self) -> CosignatureVerifier {
        CosignatureVerifier {
            name: self.name.clone(),
            id: self.id,
            key: self.key.verifying_key(),
        }
    }

    /// The cosignature line (no final newline) over a checkpoint's note
    /// text `text` (ending with a newline), made at `timestamp`.
    pub fn cosign(&self, text: &str, timestamp: u64) -> Result<String, CheckpointError> {
        if !text.ends_with('\n') || timestamp >= 1 << 63 {
            return Err(CheckpointError::MalformedNote(
                "a cosigned text ends with a newline and a timestamp is below 2^63",
            ));
        }
        let signature = self.key.sign(message(text, timestamp).as_bytes());
        let mut blob = timestamp.to_be_bytes().to_vec();
        blob.extend_from_slice(&signature.to_bytes());
        Ok(signature_line(&self.name, self.id, &blob))
    }
}

/// A witness's verifier key: name, key id and Ed25519 public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CosignatureVerifier {
    name: String,
    id: u32,
    key: VerifyingKey,
}

impl CosignatureVerifier {
    /// The verifier for `key` under `name`.
    pub fn new(name: &str, key: VerifyingKey) -> Result<Self, CheckpointError> {
        check_name(name)?;
        Ok(Self {
            name: name.to_owned(),
            id: key_id(name, &key),
            key,
        })
    }

    /// Parses `<name>+<hex key id>+<base64(0x04 ‖ public key)>`, checking
    /// that the key id matches.
    pub fn parse(text: &str) -> Result<Self, CheckpointError> {
        let (name, id, key) = parse_verifier_key(text, ALG_COSIGNATURE_V1)?;
        Ok(Self { name, id, key })
    }

    /// The witness name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key id.
    pub fn key_id(&self) -> u32 {
        self.id
    }

    /// Checks this witness's cosignatures on `note` and returns the newest
    /// timestamp: at least one must be present, and all must verify over
    /// the note's text. Lines of other keys are ignored.
    pub fn verify(&self, note: &str) -> Result<u64, CosignatureError> {
        let (text, lines) = split_note(note)?;
        let mut newest = None;
        for line in lines {
            if line.name != self.name || line.id != self.id {
                continue;
            }
            let forged = || CosignatureError::Forged(self.name.clone());
            if line.signature.len() != 8 + 64 {
                return Err(forged());
            }
            let timestamp =
                u64::from_be_bytes(line.signature[..8].try_into().map_err(|_| forged())?);
            if timestamp >= 1 << 63 {
                return Err(forged());
            }
            let signature = Signature::from_slice(&line.signature[8..]).map_err(|_| forged())?;
            self.key
                .verify_strict(message(text, timestamp).as_bytes(), &signature)
                .map_err(|_| forged())?;
            newest = newest.max(Some(timestamp));
        }
        newest.ok_or_else(|| CosignatureError::Missing(self.name.clone()))
    }

    /// Checks one cosignature line (no final newline) over `text`, the
    /// checkpoint's note text; returns its timestamp.
    pub fn verify_line(&self, text: &str, line: &str) -> Result<u64, CosignatureError> {
        self.verify(&format!("{text}\n{line}\n"))
    }
}

impl fmt::Display for CosignatureVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut raw = vec![ALG_COSIGNATURE_V1];
        raw.extend_from_slice(self.key.as_bytes());
        write!(f, "{}+{:08x}+{}", self.name, self.id, B64.encode(raw))
    }
}

impl std::str::FromStr for CosignatureVerifier {
    type Err = CheckpointError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{Checkpoint, CheckpointSigner};
    use sha2::{Digest, Sha256};

    fn log() -> CheckpointSigner {
        CheckpointSigner::new("example.com/log", SigningKey::from_bytes(&[1; 32])).unwrap()
    }

    fn witness(name: &str, seed: u8) -> Cosigner {
        Cosigner::new(name, SigningKey::from_bytes(&[seed; 32])).unwrap()
    }

    fn cosigned() -> (String, String, Cosigner) {
        let note = log()
            .sign(&Checkpoint {
                origin: "example.com/log".into(),
                size: 20852163,
                root: [9; 32],
            })
            .unwrap();
        let text = log().verifier().open(&note).unwrap().to_owned();
        let w = witness("witness.example.com/w1", 2);
        let line = w.cosign(&text, 1679315147).unwrap();
        (format!("{note}{line}\n"), text, w)
    }

    #[test]
    fn the_format_is_the_c2sp_one_byte_for_byte() {
        let (note, text, w) = cosigned();
        let line = note.lines().last().unwrap();
        let blob = B64
            .decode(
                line.strip_prefix("\u{2014} witness.example.com/w1 ")
                    .unwrap(),
            )
            .unwrap();
        assert_eq!(blob.len(), 4 + 8 + 64);
        // Key id: SHA-256(name ‖ "\n" ‖ 0x04 ‖ key)[:4], computed here apart.
        let key = SigningKey::from_bytes(&[2; 32]).verifying_key();
        let digest = Sha256::digest(
            [
                b"witness.example.com/w1\n".as_slice(),
                &[0x04],
                key.as_bytes(),
            ]
            .concat(),
        );
        assert_eq!(blob[..4], digest[..4]);
        assert_eq!(blob[4..12], 1679315147u64.to_be_bytes());
        // The signed message, written out as the spec shows it.
        let message = format!(
            "cosignature/v1\ntime 1679315147\nexample.com/log\n20852163\n{}\n",
            B64.encode([9u8; 32])
        );
        assert_eq!(message, super::message(&text, 1679315147));
        let sig = Signature::from_slice(&blob[12..]).unwrap();
        key.verify_strict(message.as_bytes(), &sig).unwrap();
        // The vkey: name+id+base64(0x04 ‖ key), and it parses back.
        let vkey = w.verifier().to_string();
        assert_eq!(
            vkey,
            format!(
                "witness.example.com/w1+{}+{}",
                hex::encode(&digest[..4]),
                B64.encode([&[0x04], key.as_bytes().as_slice()].concat())
            )
        );
        assert_eq!(CosignatureVerifier::parse(&vkey).unwrap(), w.verifier());
    }

    #[test]
    fn a_cosigned_note_verifies_and_still_opens_with_the_log_key() {
        let (note, text, w) = cosigned();
        assert_eq!(w.verifier().verify(&note).unwrap(), 1679315147);
        assert_eq!(log().verifier().open(&note).unwrap(), text);
        let line = note.lines().last().unwrap();
        assert_eq!(w.verifier().verify_line(&text, line).unwrap(), 1679315147);
    }

    #[test]
    fn forged_missing_or_misplaced_cosignatures_are_refused() {
        let (note, text, w) = cosigned();
        let line = note.lines().last().unwrap().to_owned();
        let (prefix, b64) = line.rsplit_once(' ').unwrap();
        let mut blob = B64.decode(b64).unwrap();
        // Another timestamp than the one signed.
        blob[11] ^= 1;
        let retimed = format!("{prefix} {}", B64.encode(&blob));
        blob[11] ^= 1;
        blob[40] ^= 1;
        let flipped = format!("{prefix} {}", B64.encode(&blob));
        for bad in [retimed, flipped] {
            assert!(matches!(
                w.verifier().verify_line(&text, &bad),
                Err(CosignatureError::Forged(_))
            ));
        }
        // Over another checkpoint.
        let other = text.replace("20852163", "20852164");
        assert!(matches!(
            w.verifier().verify_line(&other, &line),
            Err(CosignatureError::Forged(_))
        ));
        // By another key under the same name: the key id differs, so it is
        // not this witness's line at all.
        let mallory = witness("witness.example.com/w1", 3)
            .cosign(&text, 1679315147)
            .unwrap();
        assert!(matches!(
            w.verifier().verify_line(&text, &mallory),
            Err(CosignatureError::Missing(_))
        ));
        // The log's own signature is no cosignature.
        assert!(matches!(
            w.verifier().verify(&log().sign_note(&text).unwrap()),
            Err(CosignatureError::Missing(_))
        ));
        // A note signature (type 0x01) by the witness key under the witness
        // name has another key id: not taken for a cosignature.
        let as_note =
            CheckpointSigner::new("witness.example.com/w1", SigningKey::from_bytes(&[2; 32]))
                .unwrap()
                .sign_note(&text)
                .unwrap();
        assert!(matches!(
            w.verifier().verify(&as_note),
            Err(CosignatureError::Missing(_))
        ));
    }

    #[test]
    fn verifier_keys_with_a_wrong_type_or_id_are_refused() {
        let vkey = witness("w.example/1", 2).verifier().to_string();
        assert!(CosignatureVerifier::parse(&vkey).is_ok());
        let note_vkey = CheckpointSigner::new("w.example/1", SigningKey::from_bytes(&[2; 32]))
            .unwrap()
            .verifier()
            .to_string();
        assert!(CosignatureVerifier::parse(&note_vkey).is_err());
        let renamed = vkey.replacen("w.example/1", "w.example/2", 1);
        assert!(CosignatureVerifier::parse(&renamed).is_err());
    }
}

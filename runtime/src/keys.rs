//! Key files: written with mode 0600, refused when group or others can read
//! them. Ed25519 keys (grant and event signing) and 32-byte symmetric keys
//! (master key, PIN HMAC key) are stored as one line of base64.

use std::{
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use ed25519_dalek::{SigningKey, VerifyingKey};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretBox};
use zeroize::{Zeroize, Zeroizing};

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read or written.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is readable by group or others.
    #[error(
        "key file {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// The file does not hold a key of the expected form.
    #[error("key file {path} does not hold {what}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What it should hold.
        what: &'static str,
    },
    /// A public key given as text is malformed.
    #[error("invalid ed25519 public key {0:?}: expected 32 bytes of base64")]
    BadPublicKey(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes a new file readable only by its owner, synced to disk. Refuses to
/// overwrite an existing file.
pub fn write_secret_file(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    file.write_all(bytes).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

/// Reads a file that must not be readable by group or others.
pub fn read_secret_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(Zeroizing::new(std::fs::read(path).map_err(io(path))?))
}

fn read_b64_32(path: &Path, what: &'static str) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let text = read_secret_file(path)?;
    let malformed = || KeyError::Malformed {
        path: path.to_owned(),
        what,
    };
    let trimmed = std::str::from_utf8(&text).map_err(|_| malformed())?.trim();
    let bytes = Zeroizing::new(B64.decode(trimmed).map_err(|_| malformed())?);
    let mut key = Zeroizing::new([0u8; 32]);
    if bytes.len() != 32 {
        return Err(malformed());
    }
    key.copy_from_slice(&bytes);
    Ok(key)
}

fn write_b64(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    let text = Zeroizing::new(format!("{}\n", B64.encode(bytes)));
    write_secret_file(path, text.as_bytes())
}

/// A 32-byte symmetric key, held in a `secrecy` box: zeroized on drop,
/// `Debug` prints it redacted.
pub struct SecretKey(SecretBox<[u8; 32]>);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey([redacted])")
    }
}

impl Clone for SecretKey {
    fn clone(&self) -> Self {
        Self::from_bytes(*self.expose())
    }
}

impl SecretKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        Self::from_bytes(key)
    }

    /// A key from raw bytes (the array given is zeroized).
    pub fn from_bytes(mut bytes: [u8; 32]) -> Self {
        let key = Self(SecretBox::new(Box::new(bytes)));
        bytes.zeroize();
        key
    }

    /// Loads a key file (mode 0600, one line of base64).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        Ok(Self::from_bytes(*read_b64_32(
            path,
            "a 32-byte key in base64",
        )?))
    }

    /// Writes the key to a new file with mode 0600.
    pub fn write(&self, path: &Path) -> Result<(), KeyError> {
        write_b64(path, self.expose())
    }

    /// The key bytes.
    pub fn expose(&self) -> &[u8; 32] {
        self.0.expose_secret()
    }
}

/// Makes a fresh ed25519 signing key and writes it to a new 0600 file.
pub fn generate_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    write_b64(path, key.as_bytes())?;
    Ok(key)
}

/// Loads an ed25519 signing key file.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let bytes = read_b64_32(path, "an ed25519 private key in base64")?;
    Ok(SigningKey::from_bytes(&bytes))
}

/// The base64 text of a public key, as configs take it.
pub fn encode_public_key(key: &VerifyingKey) -> String {
    B64.encode(key.as_bytes())
}

/// Parses a public key from base64 text.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, KeyError> {
    let bad = || KeyError::BadPublicKey(text.chars().take(80).collect());
    let bytes = B64.decode(text.trim()).map_err(|_| bad())?;
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| bad())?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_are_private_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let key = SecretKey::generate();
        key.write(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(SecretKey::load(&path).unwrap().expose(), key.expose());
        assert!(
            key.write(&path).is_err(),
            "an existing key file was overwritten"
        );
        assert_eq!(format!("{key:?}"), "SecretKey([redacted])");
    }

    #[test]
    fn group_readable_key_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        SecretKey::generate().write(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = SecretKey::load(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn signing_keys_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grant.key");
        let key = generate_signing_key(&path).unwrap();
        let loaded = load_signing_key(&path).unwrap();
        assert_eq!(key.verifying_key(), loaded.verifying_key());
        let text = encode_public_key(&key.verifying_key());
        assert_eq!(parse_public_key(&text).unwrap(), key.verifying_key());
        assert!(parse_public_key("not base64!").is_err());
    }
}

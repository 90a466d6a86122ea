//! The one AEAD sealer: XChaCha20-Poly1305 under a 32-byte key, a random
//! 192-bit nonce per seal, and associated data that binds the sealed bytes
//! to where they belong (a seed to its account, a queued PIN to its entry).
//! Sealed bytes are `nonce ‖ ciphertext ‖ tag`.

use chacha20poly1305::{
    KeyInit, XChaCha20Poly1305, XNonce,
    aead::{Aead, AeadCore, OsRng, Payload},
};
use zeroize::Zeroizing;

use crate::keys::SecretKey;

const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// The sealed bytes do not open under this key with this associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("sealed data does not open with this key")]
pub struct OpenError;

/// Seals and opens under one key. `Debug` never shows the key.
#[derive(Clone)]
pub struct Sealer(XChaCha20Poly1305);

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer([redacted])")
    }
}

impl Sealer {
    /// A sealer under `key`.
    pub fn new(key: &SecretKey) -> Self {
        Self(XChaCha20Poly1305::new(key.expose().into()))
    }

    /// Seals `plaintext`, bound to `aad`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ciphertext = self
            .0
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .expect("XChaCha20-Poly1305 encryption of a bounded message cannot fail");
        [nonce.as_slice(), &ciphertext].concat()
    }

    /// Opens what [`Sealer::seal`] made with the same key and `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(OpenError);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        self.0
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| OpenError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_bytes_open_only_with_their_key_and_associated_data() {
        let key = SecretKey::generate();
        let sealer = Sealer::new(&key);
        let sealed = sealer.seal(b"acct-a", b"secret");
        assert_eq!(
            sealer.open(b"acct-a", &sealed).unwrap().as_slice(),
            b"secret"
        );
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(sealer.open(b"acct-b", &sealed), Err(OpenError));
        assert_eq!(
            Sealer::new(&SecretKey::generate()).open(b"acct-a", &sealed),
            Err(OpenError)
        );
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(sealer.open(b"acct-a", &flipped), Err(OpenError));
        assert_eq!(sealer.open(b"acct-a", &sealed[..30]), Err(OpenError));
        // Two seals of the same bytes differ (fresh nonce each time).
        assert_ne!(sealer.seal(b"acct-a", b"secret"), sealed);
        assert_eq!(format!("{sealer:?}"), "Sealer([redacted])");
    }
}

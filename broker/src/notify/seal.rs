//! A PIN in the queue: sealed with the one AEAD sealer
//! (`twokey_runtime::seal`) under a key derived from the PIN key, bound to
//! its queue entry, and stored as base64; opened only to hand it to a
//! notifier.

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use twokey_runtime::{keys::SecretKey, seal::Sealer};

use super::NotifyError;
use crate::pin::{Pin, PinKey};

/// Seals and opens queued PINs. `Debug` never shows the key.
#[derive(Debug, Clone)]
pub(super) struct PinSeal(Sealer);

impl PinSeal {
    /// The sealer of the queue, under a key derived from `key`.
    pub(super) fn new(key: &PinKey) -> Self {
        Self(Sealer::new(&SecretKey::from_bytes(
            key.derive("notification queue seal"),
        )))
    }

    /// base64(nonce ‖ ciphertext ‖ tag) of `pin`, bound to `entry_id`.
    pub(super) fn seal(&self, entry_id: &str, pin: &Pin) -> String {
        B64.encode(self.0.seal(entry_id.as_bytes(), pin.expose().as_bytes()))
    }

    /// The PIN sealed for `entry_id`.
    pub(super) fn open(&self, entry_id: &str, sealed: &str) -> Result<Pin, NotifyError> {
        let bad =
            || NotifyError("the queued PIN cannot be opened (was the PIN key changed?)".into());
        let bytes = B64.decode(sealed).map_err(|_| bad())?;
        let plain = self
            .0
            .open(entry_id.as_bytes(), &bytes)
            .map_err(|_| bad())?;
        let text = std::str::from_utf8(&plain).map_err(|_| bad())?;
        Ok(Pin::from_text(text))
    }
}

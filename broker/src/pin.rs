//! PINs: random digits from the operating system's CSPRNG, checked only
//! against HMAC-SHA256(PIN key, request id ‖ PIN) in constant time. While a
//! PIN is live (approved, not yet verified, not expired) the request also
//! keeps it sealed with the one AEAD sealer (`twokey_runtime::seal`, under a
//! key derived from the PIN key, bound to the request id) so that its
//! requester can be shown it; the sealed copy is dropped with the hash. A
//! [`Pin`] never prints: its `Debug` says `[redacted]` and it has no `Display`.

use std::fmt;

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use hmac::{Hmac, Mac};
use rand::{Rng, rngs::OsRng};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use twokey_runtime::{keys::SecretKey, seal::Sealer};

/// A PIN in the clear, on its way to the requester's notifier, held in a
/// `secrecy` box: zeroized on drop, read only through [`Pin::expose`].
#[derive(Clone)]
pub struct Pin(SecretString);

impl PartialEq for Pin {
    fn eq(&self, other: &Self) -> bool {
        bool::from(self.expose().as_bytes().ct_eq(other.expose().as_bytes()))
    }
}

impl Eq for Pin {}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin([redacted])")
    }
}

impl Pin {
    /// `length` random decimal digits.
    pub fn generate(length: u32) -> Self {
        let mut rng = OsRng;
        let digits: String = (0..length)
            .map(|_| char::from(b'0' + rng.gen_range(0..10u8)))
            .collect();
        Self(digits.into())
    }

    /// A PIN from text (what the operator typed, or a decrypted queue entry).
    pub fn from_text(text: &str) -> Self {
        Self(text.into())
    }

    /// The digits, for the one place that must see them: the requester's
    /// notification.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

/// The key PINs are hashed with.
#[derive(Clone, Debug)]
pub struct PinKey(SecretKey);

impl PinKey {
    /// Wraps a loaded key.
    pub fn new(key: SecretKey) -> Self {
        Self(key)
    }

    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as Mac>::new_from_slice(self.0.expose()).expect("HMAC takes any key length")
    }

    /// HMAC-SHA256(key, request id ‖ PIN).
    pub fn hash(&self, request_id: &str, pin: &Pin) -> [u8; 32] {
        let mut mac = self.mac();
        mac.update(request_id.as_bytes());
        mac.update(pin.expose().as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Whether `candidate` is the PIN whose hash is `stored`, in constant time.
    pub fn verify(&self, request_id: &str, candidate: &Pin, stored: &[u8]) -> bool {
        let hash = self.hash(request_id, candidate);
        stored.len() == hash.len() && bool::from(hash.ct_eq(stored))
    }

    /// A key derived for another purpose (e.g. sealing queued notifications).
    pub fn derive(&self, purpose: &str) -> [u8; 32] {
        let mut mac = self.mac();
        mac.update(b"twokey-broker derive\0");
        mac.update(purpose.as_bytes());
        mac.finalize().into_bytes().into()
    }

    fn request_sealer(&self) -> Sealer {
        Sealer::new(&SecretKey::from_bytes(self.derive("request pin seal")))
    }

    /// base64(nonce ‖ ciphertext ‖ tag) of `pin`, bound to `request_id`:
    /// what a request keeps while its PIN is live.
    pub fn seal(&self, request_id: &str, pin: &Pin) -> String {
        B64.encode(
            self.request_sealer()
                .seal(request_id.as_bytes(), pin.expose().as_bytes()),
        )
    }

    /// The PIN [`PinKey::seal`] sealed for `request_id`; none when it does
    /// not open (another key, another request, damaged).
    pub fn open(&self, request_id: &str, sealed: &str) -> Option<Pin> {
        let bytes = B64.decode(sealed).ok()?;
        let plain = self
            .request_sealer()
            .open(request_id.as_bytes(), &bytes)
            .ok()?;
        std::str::from_utf8(&plain).ok().map(Pin::from_text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PinKey {
        PinKey::new(SecretKey::from_bytes([7; 32]))
    }

    #[test]
    fn pins_have_the_asked_length_and_only_digits() {
        for len in [4, 6, 12] {
            let pin = Pin::generate(len);
            assert_eq!(pin.expose().len(), len as usize);
            assert!(pin.expose().chars().all(|c| c.is_ascii_digit()));
        }
    }

    #[test]
    fn the_hash_binds_the_pin_to_its_request() {
        let pin = Pin::from_text("123456");
        let stored = key().hash("r1", &pin);
        assert!(key().verify("r1", &pin, &stored));
        assert!(!key().verify("r2", &pin, &stored));
        assert!(!key().verify("r1", &Pin::from_text("123457"), &stored));
        assert!(!key().verify("r1", &pin, &stored[..31]));
        let other = PinKey::new(SecretKey::from_bytes([8; 32]));
        assert!(!other.verify("r1", &pin, &stored));
    }

    #[test]
    fn a_sealed_pin_opens_only_for_its_request_under_its_key() {
        let pin = Pin::from_text("4815162342");
        let sealed = key().seal("r1", &pin);
        assert!(!sealed.contains("4815162342"));
        assert_eq!(key().open("r1", &sealed), Some(pin));
        assert_eq!(key().open("r2", &sealed), None);
        let other = PinKey::new(SecretKey::from_bytes([8; 32]));
        assert_eq!(other.open("r1", &sealed), None);
        assert_eq!(key().open("r1", "not base64!"), None);
    }

    #[test]
    fn a_pin_never_prints() {
        let pin = Pin::from_text("987654");
        assert_eq!(format!("{pin:?}"), "Pin([redacted])");
    }
}

//! The bodies of twokey's fuzz targets. `fuzz/` (cargo-fuzz, nightly) calls
//! each function from its `fuzz_target!`, and `tests/corpus.rs` replays
//! every committed corpus and regression file through the same function on
//! stable, so CI checks what the fuzzer found without a nightly toolchain.
//!
//! Each function panics only when an invariant it checks is broken; any
//! input the code refuses with an error is fine.

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use ed25519_dalek::{Signer, SigningKey};
use prost::Message;
use twokey_audit::checkpoint::{Checkpoint, CheckpointSigner, NoteVerifier};
use twokey_broker::policy::Policy;
use twokey_proto::{
    audit::v1::{Event, SignedEvent},
    vault::v1::{Grant, GrantPurpose, SignedGrant},
};
use twokey_runtime::{
    events::{EventError, verify_event},
    grant::{GrantError, GrantVerifier, MAX_GRANT_LIFETIME},
};
use twokey_vault::seed::{MAX_PERIOD, Seed, parse_otpauth};

/// The names of the targets, as `fuzz/fuzz_targets/<name>.rs` and
/// `fuzz/corpus/<name>/`.
pub const TARGETS: [&str; 5] = ["otpauth", "grant", "event", "policy", "checkpoint"];

/// Runs the target called `name` on `data`.
///
/// # Panics
/// If `name` is not one of [`TARGETS`], or the target finds a broken invariant.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "otpauth" => otpauth(data),
        "grant" => grant(data),
        "event" => event(data),
        "policy" => policy(data),
        "checkpoint" => checkpoint(data),
        _ => panic!("no fuzz target {name:?}"),
    }
}

/// The fixed instant grants are checked at.
pub fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

/// The key the targets sign with (a constant: the fuzzer must be able to
/// reach the checks behind a valid signature).
pub fn key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

fn other_key() -> SigningKey {
    SigningKey::from_bytes(&[8; 32])
}

/// otpauth URIs and Base32 secrets: parse, and for every accepted URI check
/// the limits and that printing it reads back to the same spec.
pub fn otpauth(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Seed::from_base32(text);
    let Ok(spec) = parse_otpauth(text) else {
        return;
    };
    assert!((6..=8).contains(&spec.params.digits));
    assert!((1..=MAX_PERIOD).contains(&spec.params.period));
    assert!(!spec.label.chars().any(char::is_control));
    assert!(!spec.issuer.chars().any(char::is_control));
    let back = parse_otpauth(&spec.to_uri()).expect("a printed spec parses");
    assert!(back.seed == spec.seed, "the seed changed in a round trip");
    assert_eq!(back.params, spec.params);
    assert_eq!(back.issuer, spec.issuer);
    assert_eq!(back.label, spec.label);
}

fn purpose(byte: u8) -> GrantPurpose {
    match byte % 3 {
        0 => GrantPurpose::Release,
        1 => GrantPurpose::Remove,
        _ => GrantPurpose::Unspecified,
    }
}

/// Grants. The first byte picks the purpose asked for and the mode: an even
/// byte decodes the rest as a `SignedGrant` and verifies it; an odd one
/// signs the rest as `Grant` bytes with [`key`] first, so the checks behind
/// the signature are reached, then checks that an accepted grant is what
/// was signed and within its lifetime, and that another key's signature or
/// a flipped signature bit is refused.
pub fn grant(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let want = purpose(mode >> 1);
    let verifier = GrantVerifier::new(key().verifying_key());
    if mode % 2 == 0 {
        if let Ok(signed) = SignedGrant::decode(rest) {
            let _ = verifier.verify(Some(&signed), want, now());
        }
        return;
    }
    let signed = SignedGrant {
        grant: rest.to_vec(),
        signature: key().sign(rest).to_bytes().to_vec(),
    };
    if let Ok(grant) = verifier.verify(Some(&signed), want, now()) {
        assert_eq!(Some(&grant), Grant::decode(rest).ok().as_ref());
        assert!(!grant.grant_id.is_empty() && grant.grant_id.len() <= 128);
        assert_eq!(grant.purpose, want as i32);
        let issued = twokey_runtime::time::from_timestamp(grant.issued_at.as_ref().unwrap());
        let expires = twokey_runtime::time::from_timestamp(grant.expires_at.as_ref().unwrap());
        let (issued, expires) = (issued.unwrap(), expires.unwrap());
        assert!(expires > now() && issued <= expires);
        assert!(expires.duration_since(issued).unwrap() <= MAX_GRANT_LIFETIME);
    }
    let forged = SignedGrant {
        grant: rest.to_vec(),
        signature: other_key().sign(rest).to_bytes().to_vec(),
    };
    assert_eq!(
        verifier.verify(Some(&forged), want, now()),
        Err(GrantError::BadSignature)
    );
    let mut flipped = signed;
    flipped.signature[usize::from(mode) % 64] ^= 1 << (mode % 8);
    assert_eq!(
        verifier.verify(Some(&flipped), want, now()),
        Err(GrantError::BadSignature)
    );
}

/// Audit events. An even first byte decodes the rest as a `SignedEvent` and
/// verifies it; an odd one signs the rest as `Event` bytes with [`key`] and
/// checks that verification returns exactly what decoding does, and that
/// another key's signature is refused.
pub fn event(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let key = key();
    if mode % 2 == 0 {
        if let Ok(signed) = SignedEvent::decode(rest) {
            let _ = verify_event(&signed, &key.verifying_key());
        }
        return;
    }
    let signed = SignedEvent {
        event: rest.to_vec(),
        signature: key.sign(rest).to_bytes().to_vec(),
    };
    let verified = verify_event(&signed, &key.verifying_key());
    match Event::decode(rest) {
        Ok(event) => assert_eq!(verified, Ok(event)),
        Err(_) => assert!(matches!(verified, Err(EventError::Malformed(_)))),
    }
    assert_eq!(
        verify_event(&signed, &other_key().verifying_key()),
        Err(EventError::BadSignature)
    );
    // What the audit service stores is the re-encoded SignedEvent; it must
    // decode to the same signed bytes.
    let stored = SignedEvent::decode(signed.encode_to_vec().as_slice()).unwrap();
    assert_eq!(stored, signed);
}

/// Broker policy files: parse and validate; an accepted policy answers its
/// queries without panicking.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policy) = Policy::parse(text, Path::new("fuzz.toml")) else {
        return;
    };
    let _ = policy.describe_accounts();
    let _ = policy.check_trust_domain("twokey.local", Path::new("fuzz.toml"));
    for account in policy.accounts() {
        assert!(policy.account(&account.id).is_some());
        assert!(twokey_broker::policy::valid_account_id(&account.id));
    }
}

/// Checkpoints, signed notes and verifier keys: parse each; an accepted
/// body prints back to itself; a note signed by [`key`] opens to its text.
pub fn checkpoint(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cp) = Checkpoint::parse_body(text) {
        assert_eq!(Checkpoint::parse_body(&cp.body()), Ok(cp));
    }
    if let Ok(verifier) = NoteVerifier::parse(text) {
        assert_eq!(NoteVerifier::parse(&verifier.to_string()), Ok(verifier));
    }
    let signer = CheckpointSigner::new("twokey.local/audit", key()).unwrap();
    let verifier = signer.verifier();
    let _ = verifier.open(text);
    let _ = verifier.open_checkpoint(text);
    if let Ok(note) = signer.sign_note(text) {
        match verifier.open(&note) {
            Ok(opened) => assert_eq!(opened, text),
            // Text a note may not hold (control characters, a blank line
            // the signatures would be confused with) is refused, not misread.
            Err(_) => assert!(
                text.contains("\n\n")
                    || text.chars().any(|c| c.is_control() && c != '\n')
                    || text.is_empty()
            ),
        }
    }
}

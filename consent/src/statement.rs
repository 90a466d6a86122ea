//! Consent statements: building, encoding, signing and decoding the
//! `twokey.consent.v1.Statement` protobuf, its digest, and the digest of a
//! request's reason and ticket.
//!
//! A statement has exactly one encoding: decoding refuses bytes that do not
//! encode back to themselves (unknown fields, fields out of order, default
//! values written out, a kind that disagrees with the binding).

use std::time::SystemTime;

use prost::Message;
use rand::RngCore;
use sha2::{Digest, Sha256};
use ssh_key::PrivateKey;
pub use twokey_proto::consent::v1::{
    AdminAction, AdminActionBinding, ApprovalBinding, ReleaseBinding, RequestBinding,
    SignedStatement, Statement, StatementKind, statement::Binding,
};

pub use twokey_proto::Timestamp;

use crate::sshsig::{consent_namespace, sign};
use crate::time::to_timestamp;

/// Largest encoded statement accepted.
pub const MAX_STATEMENT_BYTES: usize = 4096;
/// Length of the nonce [`new_statement`] draws.
pub const NONCE_LEN: usize = 16;
/// Nonce lengths accepted.
pub const NONCE_LENS: std::ops::RangeInclusive<usize> = 16..=32;

/// The domain-separation label of [`reason_digest`].
pub const REASON_DIGEST_LABEL: &str = "twokey-reason-v1";

/// SHA-256 over the reason and the ticket reference of a request, each
/// length-prefixed so that no two (reason, ticket) pairs share an input:
///
/// ```text
/// SHA-256( u64be(16) ‖ "twokey-reason-v1"
///        ‖ u64be(len(reason)) ‖ reason
///        ‖ u64be(len(ticket)) ‖ ticket )
/// ```
///
/// Lengths are byte lengths of the UTF-8 text; a request without a ticket
/// uses the empty string.
pub fn reason_digest(reason: &str, ticket: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [REASON_DIGEST_LABEL, reason, ticket] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().into()
}

/// The digest of a statement: SHA-256 over its exact encoded bytes (what
/// `sha256sum` prints for a file holding them).
pub fn statement_digest(statement_bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(statement_bytes).into()
}

/// The kind a binding calls for.
pub fn kind_of(binding: &Binding) -> StatementKind {
    match binding {
        Binding::Request(_) => StatementKind::Request,
        Binding::Approval(_) => StatementKind::Approval,
        Binding::Release(_) => StatementKind::Release,
        Binding::AdminAction(_) => StatementKind::AdminAction,
    }
}

/// A human name for a statement kind.
pub fn kind_name(kind: StatementKind) -> &'static str {
    match kind {
        StatementKind::Unspecified => "no kind",
        StatementKind::Request => "a request",
        StatementKind::Approval => "an approval",
        StatementKind::Release => "a release",
        StatementKind::AdminAction => "an admin action",
    }
}

/// A random nonce of [`NONCE_LEN`] bytes from the OS.
pub fn new_nonce() -> Vec<u8> {
    let mut nonce = vec![0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    nonce
}

/// A new statement with a fresh nonce; the kind follows from the binding.
pub fn new_statement(
    policy_version: u64,
    signer: &str,
    issued_at: SystemTime,
    binding: Binding,
) -> Statement {
    Statement {
        kind: kind_of(&binding) as i32,
        policy_version,
        signer: signer.to_string(),
        issued_at: Some(to_timestamp(issued_at)),
        nonce: new_nonce(),
        binding: Some(binding),
    }
}

/// The statement's canonical bytes: what is signed and digested.
pub fn encode_statement(statement: &Statement) -> Vec<u8> {
    statement.encode_to_vec()
}

/// Decodes a statement, refusing anything but its one canonical encoding, a
/// kind that disagrees with the binding, and a nonce of the wrong length.
pub fn decode_statement(bytes: &[u8]) -> Result<Statement, String> {
    if bytes.is_empty() {
        return Err("the statement is empty".into());
    }
    if bytes.len() > MAX_STATEMENT_BYTES {
        return Err(format!(
            "the statement is {} bytes, more than {MAX_STATEMENT_BYTES}",
            bytes.len()
        ));
    }
    let statement = Statement::decode(bytes).map_err(|e| format!("does not decode: {e}"))?;
    if statement.encode_to_vec() != bytes {
        return Err("not in canonical encoding (unknown fields, or fields out of order)".into());
    }
    let Some(binding) = &statement.binding else {
        return Err("binds nothing".into());
    };
    if statement.kind != kind_of(binding) as i32 {
        return Err(format!(
            "kind {} does not match its binding ({})",
            statement.kind,
            kind_name(kind_of(binding))
        ));
    }
    if !NONCE_LENS.contains(&statement.nonce.len()) {
        return Err(format!(
            "nonce is {} bytes, not 16 to 32",
            statement.nonce.len()
        ));
    }
    Ok(statement)
}

/// Signs a statement with an `ssh-ed25519` private key under
/// `twokey-consent@<trust domain>`; the signature is armored, as
/// `ssh-keygen -Y sign` writes it.
pub fn sign_statement(
    key: &PrivateKey,
    trust_domain: &str,
    statement: &Statement,
) -> Result<SignedStatement, String> {
    let bytes = encode_statement(statement);
    let signature = sign(key, &consent_namespace(trust_domain), &bytes)?;
    Ok(SignedStatement {
        statement: bytes,
        signature,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_digest_is_unambiguous() {
        assert_ne!(reason_digest("ab", "c"), reason_digest("a", "bc"));
        assert_ne!(reason_digest("", "x"), reason_digest("x", ""));
        // Pinned, so that every implementation computes the same bytes.
        let mut input = Vec::new();
        for part in ["twokey-reason-v1", "rotate keys", "CHG-1"] {
            input.extend((part.len() as u64).to_be_bytes());
            input.extend(part.as_bytes());
        }
        assert_eq!(
            reason_digest("rotate keys", "CHG-1"),
            <[u8; 32]>::from(Sha256::digest(&input))
        );
    }

    #[test]
    fn non_canonical_bytes_are_refused() {
        let s = new_statement(
            1,
            "spiffe://t/user/a",
            SystemTime::now(),
            Binding::Approval(ApprovalBinding {
                request_digest: vec![1; 32],
                request_id: "r".into(),
                account_id: "a".into(),
            }),
        );
        let bytes = encode_statement(&s);
        assert!(decode_statement(&bytes).is_ok());
        // An unknown field appended.
        let mut extra = bytes.clone();
        extra.extend([0xf8, 0x01, 0x01]); // field 31, varint 1
        assert!(decode_statement(&extra).is_err());
        // Kind disagreeing with the binding.
        let mut wrong = s.clone();
        wrong.kind = StatementKind::Release as i32;
        assert!(decode_statement(&encode_statement(&wrong)).is_err());
        // Short nonce.
        let mut short = s;
        short.nonce = vec![0; 4];
        assert!(decode_statement(&encode_statement(&short)).is_err());
    }
}

/// What a request statement binds: the request the signer files.
pub fn request_binding(
    request_id: &str,
    account_id: &str,
    requester: &str,
    reason: &str,
    ticket: &str,
    created_at: SystemTime,
) -> Binding {
    Binding::Request(RequestBinding {
        request_id: request_id.to_string(),
        account_id: account_id.to_string(),
        requester: requester.to_string(),
        reason_digest: reason_digest(reason, ticket).to_vec(),
        created_at: Some(to_timestamp(created_at)),
    })
}

/// The request binding inside a signed request statement (unverified: the
/// approver's or operator's tool reads what it is about to bind to).
pub fn request_of(request: &SignedStatement) -> Result<RequestBinding, String> {
    match decode_statement(&request.statement)?.binding {
        Some(Binding::Request(b)) => Ok(b),
        _ => Err("it is not a request statement".into()),
    }
}

/// What an approval statement binds: exactly this request statement.
pub fn approval_binding(request: &SignedStatement) -> Result<Binding, String> {
    let rb = request_of(request)?;
    Ok(Binding::Approval(ApprovalBinding {
        request_digest: statement_digest(&request.statement).to_vec(),
        request_id: rb.request_id,
        account_id: rb.account_id,
    }))
}

/// What an operator's release statement binds: this request statement,
/// exactly these approvals, the grant id and the single-use release id, and
/// that the PIN was verified.
pub fn release_binding(
    request: &SignedStatement,
    approvals: &[SignedStatement],
    grant_id: &str,
    release_id: &str,
) -> Result<Binding, String> {
    let rb = request_of(request)?;
    Ok(Binding::Release(ReleaseBinding {
        request_digest: statement_digest(&request.statement).to_vec(),
        approval_digests: approvals
            .iter()
            .map(|a| statement_digest(&a.statement).to_vec())
            .collect(),
        pin_verified: true,
        grant_id: grant_id.to_string(),
        release_id: release_id.to_string(),
        request_id: rb.request_id,
        account_id: rb.account_id,
    }))
}

/// What an admin's action statement binds.
pub fn admin_binding(account_id: &str, action: AdminAction, action_id: &str) -> Binding {
    Binding::AdminAction(AdminActionBinding {
        account_id: account_id.to_string(),
        action: action as i32,
        action_id: action_id.to_string(),
    })
}

/// A random id for a request, a release, a grant or an admin action: a
/// version-4 UUID from the OS's random numbers, as the broker's own ids are.
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

#[cfg(test)]
mod builder_tests {
    use super::*;

    #[test]
    fn new_ids_are_version_4_uuids() {
        let a = new_id();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!("89ab".contains(&a[19..20]));
        assert_ne!(a, new_id());
    }

    #[test]
    fn bindings_point_at_the_request_statement() {
        let key = PrivateKey::random(&mut rand::rngs::OsRng, ssh_key::Algorithm::Ed25519).unwrap();
        let req = new_statement(
            3,
            "spiffe://t/user/a",
            SystemTime::now(),
            request_binding(
                "r1",
                "acct",
                "spiffe://t/user/a",
                "why",
                "",
                SystemTime::now(),
            ),
        );
        let signed = sign_statement(&key, "t", &req).unwrap();
        let Binding::Approval(ab) = approval_binding(&signed).unwrap() else {
            panic!("not an approval binding")
        };
        assert_eq!(
            ab.request_digest,
            statement_digest(&signed.statement).to_vec()
        );
        assert_eq!(
            (ab.request_id.as_str(), ab.account_id.as_str()),
            ("r1", "acct")
        );
        let Binding::Release(rb) =
            release_binding(&signed, std::slice::from_ref(&signed), "g", "x").unwrap()
        else {
            panic!("not a release binding")
        };
        assert!(rb.pin_verified);
        assert_eq!(rb.approval_digests.len(), 1);
        assert!(approval_binding(&SignedStatement::default()).is_err());
    }
}

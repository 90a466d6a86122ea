//! twokey's consent core: the pure functions by which the vault (and the
//! broker) tell, from bytes they are handed, that distinct people allowed by
//! an admin-signed policy each consented to a release or an admin action.
//! No network, no storage, no clock of its own: the caller passes `now` and
//! a view of what it has already done ([`ReleaseHistory`],
//! [`AdminHistory`]). Seeds, PINs and codes never enter this crate.
//!
//! # Pieces
//! - **Statements** ([`statement`]): the `twokey.consent.v1.Statement`
//!   protobuf, one canonical encoding each, signed with the person's own
//!   OpenSSH key in `sshsig` form under `twokey-consent@<trust domain>`. Its
//!   digest is SHA-256 of its exact bytes. A request binds request id,
//!   account, requester, [`reason_digest`] and creation time; an approval
//!   binds the request statement's digest; a release binds the request
//!   digest, the approval digests, `pin_verified = true`, the grant id and a
//!   single-use release id; an admin action binds account, action and a
//!   single-use action id. All bind the policy version and the signer's
//!   SPIFFE ID.
//! - **The policy** ([`policy`]): TOML, detached `sshsig` signatures under
//!   `twokey-policy@<trust domain>` by M admins of the previous version (or
//!   of the pinned [`TrustRoot`]); [`verify_policy_update`] makes the
//!   [`VerifiedPolicy`] every check takes. A person (not a key, not a SPIFFE
//!   ID) is the unit of distinctness: a key or an ID listed for two people is
//!   refused.
//! - **The checks**: [`check_release`] and [`check_admin_action`]. Errors
//!   ([`ConsentError`], [`PolicyError`]) name the statement, the person and
//!   what to do, and say their [`ErrorKind`].
//!
//! # Signature support (through RustCrypto `ssh-key` 0.6)
//! - **Verified:** `ssh-ed25519` keys, and `sk-ssh-ed25519@openssh.com`
//!   FIDO2 security keys, whose signature must carry the user-presence flag
//!   (the key was touched); `ssh-key` checks the signature over
//!   SHA-256(application) ‖ flags ‖ counter ‖ SHA-256(message) as OpenSSH
//!   does. (Tested with a software stand-in for a token, not a real one;
//!   the signature counter is not tracked.) Signatures armored (`-----BEGIN SSH
//!   SIGNATURE-----`, as `ssh-keygen -Y sign` writes) or raw, hashed with
//!   SHA-512 or SHA-256.
//! - **Not supported:** RSA, ECDSA and `sk-ecdsa-sha2-nistp256@openssh.com`
//!   keys (refused in the policy and in signatures); OpenSSH certificates and
//!   `cert-authority` lines; the `valid-after`/`valid-before` options of
//!   `allowed_signers` (a person's keys and their validity are whatever the
//!   active signed policy lists); user *verification* (a PIN or biometric on
//!   the security key, OpenSSH's `verify-required`) is neither required nor
//!   checked, only presence.
//! - **Auditors:** [`Policy::allowed_signers`] writes the policy's people as
//!   an `allowed_signers` file (principals = SPIFFE IDs, `namespaces=`
//!   limited), so any statement in an audit export verifies with stock
//!   `ssh-keygen -Y verify -f allowed_signers -I <SPIFFE ID> -n
//!   twokey-consent@<trust domain> -s sig < statement`.
//! - **Signing here:** only with an `ssh-ed25519` private key
//!   ([`sign_statement`], [`sshsig::sign`]); security keys and `ssh-agent`
//!   sign through the CLI, which hands the agent the bytes of
//!   `ssh_key::SshSig::signed_data` and wraps the answer with
//!   `ssh_key::SshSig::new`.
//!
//! # Error kinds
//! Malformed bytes are `InvalidArgument`; a signature that does not verify,
//! an unknown key or person, a missing role, one person in two roles, a
//! grant naming something else, or a replayed release or action id are
//! `PermissionDenied`; evidence that is well formed but not (or no longer)
//! enough — too few approvals or admins, stale, another policy version or
//! request, PIN not verified, codes or rate used up — is
//! `FailedPrecondition`.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod admin;
pub mod allowed_signers;
pub mod check;
pub mod error;
pub mod history;
pub mod policy;
pub mod sshsig;
pub mod statement;
pub mod time;

pub use admin::{AdminActionRequest, VerifiedAdminAction, check_admin_action};
pub use check::{GrantFacts, OpenedStatement, Signer, Verified, check_release, verify_statement};
pub use error::{ConsentError, ErrorKind, PolicyError, Role, StatementRef};
pub use history::{AdminHistory, MemoryHistory, ReleaseHistory};
pub use policy::{
    AccountPolicy, Person, Policy, RateLimit, TrustRoot, VerifiedPolicy, verify_policy_update,
};
pub use ssh_key;
pub use sshsig::{consent_namespace, policy_namespace};
pub use statement::{
    AdminAction, Binding, SignedStatement, Statement, StatementKind, admin_binding,
    approval_binding, decode_statement, encode_statement, new_id, new_statement, reason_digest,
    release_binding, request_binding, request_of, sign_statement, statement_digest,
};

//! The broker's view of the vault: a small trait the domain calls (so tests
//! and other transports can stand in), and the vault's errors kept with their
//! kind and message so callers see what the vault said.

use futures::future::BoxFuture;
use twokey_proto::{
    types::v1::{Account, Code},
    vault::v1::{EnrollRequest, EnrollResponse, SignedGrant},
};

/// The kind of a vault failure, as the vault reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaultErrorKind {
    /// The vault (or the audit service behind it) is down.
    Unavailable,
    /// The vault did not answer in time.
    DeadlineExceeded,
    /// The vault refused the input.
    InvalidArgument,
    /// No such account.
    NotFound,
    /// The account exists already.
    AlreadyExists,
    /// The vault refused the broker or the grant.
    PermissionDenied,
    /// The vault's state does not allow it.
    FailedPrecondition,
    /// The vault refused the broker's identity.
    Unauthenticated,
    /// Too much at once.
    ResourceExhausted,
    /// Anything else.
    Internal,
}

impl VaultErrorKind {
    /// Whether the failure shows the vault did not compute a code, so a
    /// reserved quota slot can be given back.
    pub fn surely_refused(self) -> bool {
        !matches!(self, Self::DeadlineExceeded | Self::Internal)
    }
}

/// A vault call failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("vault: {message}")]
pub struct VaultError {
    /// What kind of failure.
    pub kind: VaultErrorKind,
    /// The vault's message.
    pub message: String,
}

/// What the broker asks of the vault.
pub trait Vault: Send + Sync + std::fmt::Debug + 'static {
    /// Stores a seed; answers with the current and next codes.
    fn enroll(&self, request: EnrollRequest) -> BoxFuture<'_, Result<EnrollResponse, VaultError>>;
    /// Computes one code for a release grant.
    fn generate_code(&self, grant: SignedGrant) -> BoxFuture<'_, Result<Code, VaultError>>;
    /// Lists enrolled accounts.
    fn list_accounts(&self) -> BoxFuture<'_, Result<Vec<Account>, VaultError>>;
    /// Removes an account for a removal grant.
    fn remove_account(&self, grant: SignedGrant) -> BoxFuture<'_, Result<String, VaultError>>;
}

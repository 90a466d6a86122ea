//! The broker's view of the vault: a small trait the domain calls (so tests
//! and other transports can stand in), and the vault's errors kept with their
//! kind and message so callers see what the vault said.

use futures::future::BoxFuture;
/// The vault's own messages, which the broker passes on unchanged: enrolled
/// accounts, codes, the calls and their answers, grants and the people's
/// signed consent.
pub use twokey_proto::{
    types::v1::{Account, Code},
    vault::v1::{
        AdminConsent, ApplyPolicyRequest, EnrollRequest, EnrollResponse, GrantPurpose,
        PolicyVersion, ReleaseEvidence, RemoveAccountRequest, RestoreAccountRequest,
        SetAccountEnabledRequest, SignedGrant, enroll_request::Seed,
    },
};
use twokey_runtime::error::ErrorKind;

/// A vault call failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("vault: {message}")]
pub struct VaultError {
    /// What kind of failure, as the vault reported it (deadline exceeded:
    /// the vault did not answer in time).
    pub kind: ErrorKind,
    /// The vault's message.
    pub message: String,
}

impl VaultError {
    /// A failure of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// Whether the failure shows the vault did not compute a code, so a
    /// reserved quota slot can be given back.
    pub fn surely_refused(&self) -> bool {
        !matches!(self.kind, ErrorKind::DeadlineExceeded | ErrorKind::Internal)
    }
}

/// What the broker asks of the vault.
pub trait Vault: Send + Sync + std::fmt::Debug + 'static {
    /// Stores a seed for the enrollment grant the request carries; answers
    /// with the current and next codes.
    fn enroll(&self, request: EnrollRequest) -> BoxFuture<'_, Result<EnrollResponse, VaultError>>;
    /// Computes one code for a release grant and the people's consent.
    fn generate_code(
        &self,
        grant: SignedGrant,
        evidence: Option<ReleaseEvidence>,
    ) -> BoxFuture<'_, Result<Code, VaultError>>;
    /// Lists enrolled accounts.
    fn list_accounts(&self) -> BoxFuture<'_, Result<Vec<Account>, VaultError>>;
    /// Removes an account for a removal grant (and the admins' consent).
    fn remove_account(
        &self,
        request: RemoveAccountRequest,
    ) -> BoxFuture<'_, Result<String, VaultError>>;
    /// Disables or enables an account.
    fn set_account_enabled(
        &self,
        request: SetAccountEnabledRequest,
    ) -> BoxFuture<'_, Result<Account, VaultError>>;
    /// Restores a replaced or removed seed.
    fn restore_account(
        &self,
        request: RestoreAccountRequest,
    ) -> BoxFuture<'_, Result<Account, VaultError>>;
    /// Applies a signed policy version.
    fn apply_policy(
        &self,
        request: ApplyPolicyRequest,
    ) -> BoxFuture<'_, Result<PolicyVersion, VaultError>>;
    /// Every applied policy version, newest first.
    fn get_policy(&self) -> BoxFuture<'_, Result<Vec<PolicyVersion>, VaultError>>;
}

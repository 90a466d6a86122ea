//! The broker's one domain error type. Each variant says its
//! [`ErrorKind`], which decides the gRPC code (`grpc`) and the HTTP status
//! (`http`) alike; start-up failures are `twokey_runtime::start::StartError`.

use twokey_runtime::{
    durable::StoreError,
    error::{ErrorKind, ServiceError},
};

use crate::vault::VaultError;

/// Everything that can go wrong in a broker call. Messages are lower-case,
/// name what was wrong and, where they can, what to do next. None carries a
/// PIN, a seed or a code.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The caller has no certificate or no usable identity.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller lacks the role, or separation of duties forbids the action.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The request is in a state that does not allow the action.
    #[error("{0}")]
    FailedPrecondition(String),
    /// No such request or account.
    #[error("{0}")]
    NotFound(String),
    /// A field of the call is missing or malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The vault refused or failed; its kind and message are kept.
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// The database failed.
    #[error("storage failure: {0}")]
    Store(String),
    /// Audit served a checkpoint inconsistent with one this broker accepted
    /// before: no state changes until a consistent one is served.
    #[error("{0}")]
    AuditInconsistent(String),
    /// A person's signed statement is missing or was refused (or the
    /// signed policy is not in a state that allows the call); the message
    /// names the statement, the person and what to do.
    #[error("{message}")]
    Consent {
        /// The kind of the refusal.
        kind: ErrorKind,
        /// What is wrong and what to do.
        message: String,
    },
}

impl ServiceError for BrokerError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Unauthenticated(_) => ErrorKind::Unauthenticated,
            Self::PermissionDenied(_) => ErrorKind::PermissionDenied,
            Self::FailedPrecondition(_) => ErrorKind::FailedPrecondition,
            Self::NotFound(_) => ErrorKind::NotFound,
            Self::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Self::Vault(v) => v.kind,
            Self::Store(_) | Self::AuditInconsistent(_) => ErrorKind::Unavailable,
            Self::Consent { kind, .. } => *kind,
        }
    }
}

impl From<StoreError> for BrokerError {
    fn from(e: StoreError) -> Self {
        Self::Store(e.to_string())
    }
}

impl From<sled::Error> for BrokerError {
    fn from(e: sled::Error) -> Self {
        Self::Store(e.to_string())
    }
}

impl BrokerError {
    /// A permission error.
    pub fn denied(what: impl Into<String>) -> Self {
        Self::PermissionDenied(what.into())
    }

    /// A wrong-state error.
    pub fn precondition(what: impl Into<String>) -> Self {
        Self::FailedPrecondition(what.into())
    }

    /// A bad-argument error.
    pub fn invalid(what: impl Into<String>) -> Self {
        Self::InvalidArgument(what.into())
    }
}

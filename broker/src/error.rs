//! The broker's one error type, and the short list of kinds it maps to (gRPC
//! codes in `grpc`; the HTTP/JSON front end derives its statuses from those).

use twokey_runtime::{durable::StoreError, keys::KeyError, serve::ServeError, tls::TlsError};

use crate::{config::ConfigError, policy::PolicyError, vault::VaultError};

/// Everything that can go wrong in the broker. Messages are lower-case, name
/// what was wrong and, where they can, what to do next. None carries a PIN,
/// a seed or a code.
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
    /// The vault refused or failed; its code and message are kept.
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// The policy file is invalid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A key file could not be used.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// TLS material could not be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The server could not start or failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// The database failed.
    #[error("storage failure: {0}")]
    Store(String),
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

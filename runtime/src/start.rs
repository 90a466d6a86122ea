//! Why a service could not start: one type for the three services' start-up
//! (configuration, key files, TLS material, storage, binding), kept apart
//! from the errors their domains answer calls with.

use crate::{
    config::ConfigError, durable::StoreError, keys::KeyError, serve::ServeError, tls::TlsError,
};

/// Why a service could not start, or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A key file.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// TLS material.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The data directory.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Binding or serving.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// A setting is invalid; the message names it.
    #[error("invalid setting: {0}")]
    Setting(String),
    /// The service refused to open its data or policy; the message says why.
    #[error("cannot start: {0}")]
    Refused(String),
}

impl StartError {
    /// A refusal to start, from the service's own error.
    pub fn refused(error: impl std::fmt::Display) -> Self {
        Self::Refused(error.to_string())
    }
}

//! The crate's one error type for calls; it says its [`ErrorKind`], and
//! `grpc` maps it to a status through the runtime's one table. Start-up
//! failures are `twokey_runtime::start::StartError`.

use twokey_runtime::error::{ErrorKind, ServiceError};

use crate::{checkpoint::CheckpointError, merkle::MerkleError};

/// Why an audit operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The caller is not a configured source.
    #[error("permission denied: {0} is not a configured audit source")]
    UnknownSource(String),
    /// The caller may not append events of another source.
    #[error("permission denied: {peer} may not append events of source {source_id:?}")]
    PeerMismatch {
        /// The mTLS peer.
        peer: String,
        /// The source named in the event.
        source_id: String,
    },
    /// The caller may not read the log.
    #[error("permission denied: {0} is not a configured auditor")]
    NotAuditor(String),
    /// An event's signature does not verify.
    #[error(
        "event seq {seq} from {source_id}: signature does not verify; the event was altered or signed with another key"
    )]
    BadSignature {
        /// The source.
        source_id: String,
        /// The sequence number the event claims.
        seq: u64,
    },
    /// An event is malformed.
    #[error("invalid event: {0}")]
    InvalidEvent(String),
    /// A source sent a different event under a sequence number already stored.
    #[error(
        "event seq {seq} from {source_id} differs from the event stored under that number at index {index}; a source must never reuse a sequence number"
    )]
    Conflict {
        /// The source.
        source_id: String,
        /// The sequence number.
        seq: u64,
        /// Where the stored event is.
        index: u64,
    },
    /// A request argument is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A requested index or size is beyond the log.
    #[error("out of range: {0}")]
    OutOfRange(String),
    /// Proof generation failed.
    #[error(transparent)]
    Merkle(#[from] MerkleError),
    /// Checkpoint signing failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Storage failed.
    #[error("audit storage failed: {0}")]
    Store(String),
    /// The stored log does not extend the largest tree head this log
    /// signed (shorter, or another root at that size); the message names
    /// both and what to do.
    #[error("the audit log does not extend its signed tree head: {0}")]
    TreeHead(String),
    /// The tree-head file cannot be read or is not this log's checkpoint;
    /// the message names the file and what to do.
    #[error("{0}")]
    HeadFile(String),
    /// The log holds fewer entries than a checkpoint it signed and is
    /// getting them back from the sources; the message says how far.
    #[error("{0}")]
    Restoring(String),
    /// This replica does not hold the sequencer lease: another appends.
    #[error("{0}")]
    NotSequencer(String),
    /// A stored entry cannot be read.
    #[error("stored entry {index} is corrupt: {why}")]
    Corrupt {
        /// The index.
        index: u64,
        /// What is wrong.
        why: String,
    },
}

impl ServiceError for AuditError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::UnknownSource(_) | Self::PeerMismatch { .. } | Self::NotAuditor(_) => {
                ErrorKind::PermissionDenied
            }
            Self::BadSignature { .. }
            | Self::InvalidEvent(_)
            | Self::InvalidArgument(_)
            | Self::Merkle(_) => ErrorKind::InvalidArgument,
            Self::Conflict { .. } => ErrorKind::AlreadyExists,
            Self::OutOfRange(_) => ErrorKind::OutOfRange,
            Self::Store(_) | Self::Restoring(_) | Self::NotSequencer(_) => ErrorKind::Unavailable,
            Self::Checkpoint(_) | Self::Corrupt { .. } | Self::TreeHead(_) | Self::HeadFile(_) => {
                ErrorKind::Internal
            }
        }
    }
}

impl From<twokey_runtime::durable::StoreError> for AuditError {
    fn from(e: twokey_runtime::durable::StoreError) -> Self {
        Self::Store(e.to_string())
    }
}

impl From<sled::Error> for AuditError {
    fn from(e: sled::Error) -> Self {
        Self::Store(e.to_string())
    }
}

//! RFC 6962 Merkle tree hashing and proofs: re-exported from
//! [`twokey_tlog::merkle`], where they live so that the sources can check
//! receipts without linking the audit service.

pub use twokey_tlog::merkle::*;

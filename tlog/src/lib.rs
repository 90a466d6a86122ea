//! Transparency-log primitives, pure (no I/O, no sled, no gRPC), shared by
//! the audit service that signs and the sources that check what it signed:
//!
//! - [`merkle`]: RFC 6962 / RFC 9162 hashing, inclusion and consistency
//!   proofs (generation and verification);
//! - [`checkpoint`]: C2SP `tlog-checkpoint` bodies inside C2SP signed notes,
//!   and note verifier keys, as Go's `golang.org/x/mod/sumdb/note` has them;
//! - [`cosignature`]: C2SP `tlog-cosignature` (Ed25519 `cosignature/v1`)
//!   witness cosignatures;
//! - [`tile`]: C2SP `tlog-tiles` paths, tile coordinates of Merkle nodes
//!   and entry bundles.
#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod cosignature;
pub mod merkle;
pub mod tile;

//! The audit service: an append-only Merkle log of signed events with signed checkpoints
#![forbid(unsafe_code)]

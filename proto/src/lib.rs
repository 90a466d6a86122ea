//! The twokey gRPC contract: generated messages, clients and servers for the
//! vault, broker and audit services, with their proto3 JSON mapping (pbjson;
//! `google.protobuf.Timestamp` is our own [`Timestamp`], written with a `Z`).
//!
//! Messages that carry a seed, a PIN or a code have a hand-written `Debug`
//! (see `redact`) that prints `[redacted]` in place of the secret.
#![forbid(unsafe_code)]
#![allow(missing_docs, clippy::all, missing_debug_implementations)]

mod redact;
mod timestamp;

/// Encoded `FileDescriptorSet` of every twokey proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/twokey_descriptor.bin"));

/// Shared types.
pub mod types {
    /// Version 1.
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/twokey.types.v1.rs"));
        include!(concat!(env!("OUT_DIR"), "/twokey.types.v1.serde.rs"));
    }
}

/// The vault API.
pub mod vault {
    /// Version 1.
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/twokey.vault.v1.rs"));
        include!(concat!(env!("OUT_DIR"), "/twokey.vault.v1.serde.rs"));
    }
}

/// The broker API.
pub mod broker {
    /// Version 1.
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/twokey.broker.v1.rs"));
        include!(concat!(env!("OUT_DIR"), "/twokey.broker.v1.serde.rs"));
    }
}

/// The audit API.
pub mod audit {
    /// Version 1.
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/twokey.audit.v1.rs"));
        include!(concat!(env!("OUT_DIR"), "/twokey.audit.v1.serde.rs"));
    }
}

/// Consent statements signed by people with their own OpenSSH keys.
pub mod consent {
    /// Version 1.
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/twokey.consent.v1.rs"));
        include!(concat!(env!("OUT_DIR"), "/twokey.consent.v1.serde.rs"));
    }
}

pub use timestamp::{Timestamp, TimestampError};

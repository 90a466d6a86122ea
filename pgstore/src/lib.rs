//! What every twokey PostgreSQL backend stands on: [`connect`] (a URL with
//! no password in it, the password from a file, TLS through rustls with the
//! operator's CA) and [`migrate`] (versioned, forward-only schema migrations,
//! applied once under an advisory lock however many replicas start at once).
//! The services' own stores build their tables on these; sled stays the
//! embedded default. [`outbox`] is the audit outbox in PostgreSQL: written
//! by every replica in its own transactions, shipped by the one holding the
//! shipping lease. [`sessions`]: the few sessions a store keeps, and a
//! runtime of its own for a store with synchronous methods. [`config`]: the
//! `[store]` section the broker and the vault share.
#![forbid(unsafe_code)]

pub mod config;
pub mod connect;
pub mod error;
pub mod migrate;
pub mod outbox;
pub mod sessions;

pub use connect::{PgSettings, connect};
pub use error::PgError;
pub use migrate::{Migration, migrate};

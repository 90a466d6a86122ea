//! What every twokey process runs on: mTLS configuration and SPIFFE identity,
//! a development PKI, key files, signed audit events, the durable outbox and
//! its shipper, durable sync for sled, server plumbing, telemetry and metrics.
//!
//! Nothing here knows about seeds, requests or policy.
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod durable;
pub mod error;
pub mod events;
pub mod failover;
pub mod grant;
pub mod http;
pub mod identity;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod outbox;
pub mod receipts;
pub mod seal;
pub mod serve;
pub mod shipper;
pub mod start;
pub mod telemetry;
pub mod time;
pub mod tls;
pub mod trace;

pub use identity::{Authenticator, SpiffeId};

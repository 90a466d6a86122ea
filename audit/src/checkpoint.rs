//! Checkpoints, signed notes and verifier keys: re-exported from
//! [`twokey_tlog::checkpoint`], where they live so that the sources can
//! check receipts without linking the audit service.

pub use twokey_tlog::checkpoint::*;

//! The load scenarios, each measured beside its baseline in the same run.

pub mod audit;
pub mod flow;
pub mod scaling;
pub mod vault;

//! The twokey command line: every human role's client for the broker and audit services.
#![forbid(unsafe_code)]

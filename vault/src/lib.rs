//! The vault: holds TOTP seeds encrypted and computes a code only for a single-use grant signed by the broker
#![forbid(unsafe_code)]

//! Development and test tooling, kept out of the product: the development
//! PKI (`pki`), a whole system on loopback (`local`), starting the real
//! binaries and reading the line each prints once it serves (`ready`), and
//! grants signed as the broker signs them (`grants`), people's OpenSSH keys
//! and the admin-signed consent policy (`consent`). `twokey pki init` and
//! `twokey demo` are thin commands over this crate; no service binary links
//! it (nor `rcgen`).
#![forbid(unsafe_code)]

pub mod consent;
pub mod grants;
pub mod local;
pub mod pki;
pub mod ready;

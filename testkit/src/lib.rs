//! Development and test tooling, kept out of the product: the development
//! PKI (`pki`), starting the real binaries and reading the line each prints
//! once it serves (`ready`), and grants signed as the broker would sign them
//! (`grants`). `twokey pki init` and `twokey demo` are thin commands over
//! this crate; no service binary links it (nor `rcgen`).
#![forbid(unsafe_code)]

pub mod grants;
pub mod pki;
pub mod ready;

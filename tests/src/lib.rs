//! End-to-end tests that run the real binaries over mTLS on loopback
#![forbid(unsafe_code)]

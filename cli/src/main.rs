//! The twokey command line.
#![forbid(unsafe_code)]

fn main() {}

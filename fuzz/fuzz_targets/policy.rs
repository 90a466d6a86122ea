//! Fuzzes `twokey_fuzz_targets::policy` (see fuzz-targets/src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| twokey_fuzz_targets::policy(data));

//! See `tcc_tests::fuzz::artifact_load`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tcc_tests::fuzz::artifact_load(data));

//! See `tcc_tests::fuzz::run_inputs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tcc_tests::fuzz::run_inputs(data));

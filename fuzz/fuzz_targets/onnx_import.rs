//! See `tcc_tests::fuzz::onnx_import`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tcc_tests::fuzz::onnx_import(data));

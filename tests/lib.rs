//! tcc's end-to-end test suite: real third-party models against onnxruntime.
//!
//! The tests live in `tests/tests/`; [`support`] fetches and caches the fixtures (see
//! `tests/fixtures/fetch.py`) and compares outputs.

#[path = "support.rs"]
pub mod support;

#[path = "fuzz.rs"]
pub mod fuzz;

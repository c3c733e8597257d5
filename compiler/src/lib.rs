//! tcc-compiler: the ONNX front end ([`onnx`]), the build driver ([`driver`]) and the `tcc`
//! command.
//!
//! Architecture invariants:
//! - the only crate that knows ONNX; the IR it hands on is verified;
//! - a user's bad model is an error naming the problem, never a panic.

pub mod accuracy;
pub mod driver;
pub mod onnx;

pub use driver::{build, compile, lower, BuildError, BuildOptions, BuildReport, Summary};

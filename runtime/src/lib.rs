//! tcc-runtime: loads a compiled `.tcc` artifact and runs it.
//!
//! This crate owns everything a deployed model needs and nothing else: tensors, the op
//! vocabulary with its reference semantics ([`op`]), the artifact format ([`artifact`]), the
//! execution plan and its executor ([`Model`]), and tensor file I/O ([`io`]).
//!
//! Architecture invariants:
//! - depends on no other tcc crate, and never on egg or the ONNX parser;
//! - never panics on a loaded artifact or on user inputs: every problem is an [`Error`].

#[cfg(not(target_endian = "little"))]
compile_error!("tcc stores tensors little-endian and reads them in place: big-endian targets are not supported");

pub mod artifact;
pub mod cpu;
pub mod dim;
pub mod dtype;
pub mod error;
pub mod fast;
pub mod io;
pub mod jit;
pub mod kernels;
mod model;
pub mod op;
pub mod plan;
pub mod pool;
pub mod tensor;

pub use dim::Dim;
pub use dtype::DType;
pub use error::{Error, Result};
pub use model::{LoadOptions, Model, RunStats};
pub use op::{EvalContext, Fact, Op, OpDef, SymTensor};
pub use tensor::{Bytes, Element, Tensor};

/// Checks that bytes are a `tokenizer.json` the embedded tokenizer can load.
#[cfg(feature = "tokenizer")]
pub fn tokenizer_check(bytes: &[u8]) -> std::result::Result<(), String> {
    tokenizers::Tokenizer::from_bytes(bytes).map(|_| ()).map_err(|e| e.to_string())
}

//! tcc-ir: the typed tensor graph every tcc pass works on.
//!
//! A [`Graph`] holds values (inputs, constants, node outputs), each with a [`Fact`] (dtype,
//! symbolic shape) and optional quantization parameters, and nodes applying ops from the
//! shared vocabulary ([`tcc_runtime::op`]). This crate gives the verifier ([`verify()`]),
//! shape inference ([`Graph::infer`]), the text form ([`text`]) and the reference interpreter
//! ([`interp`]), the oracle for every optimization.
//!
//! Architecture invariants:
//! - knows nothing of ONNX (the front end lives in tcc-compiler) and nothing of passes;
//! - a graph that passes [`verify()`] is topologically sorted and fully typed, and the
//!   interpreter runs it without panicking on any input.

pub mod analysis;
mod error;
pub mod graph;
pub mod interp;
pub mod text;
mod verify;

pub use error::{Error, Result};
pub use graph::{Def, Graph, Node, Output, QuantParams, Value, ValueId};
pub use tcc_runtime::op::{self, Op, OpDef};
pub use tcc_runtime::{DType, Dim, Fact, SymTensor, Tensor};
pub use verify::verify;

//! tcc-passes: the pass manager and tcc's passes over [`tcc_ir::Graph`].
//!
//! A [`Pass`] transforms a graph and says what it changed. Passes are registered by name in a
//! [`Registry`]; a pipeline is text (`"fold,dce"`, `"canon"`, options as `pass{key=value}`),
//! parsed by [`Pipeline::parse`] and run by [`PassManager`], which verifies the graph after
//! every pass, times it, collects its statistics and can print the IR after it.
//!
//! [`eqsat`] is equality saturation with egg: the `recognize` pass finds transformer
//! structures (LayerNorm, GELU, attention) in whatever form an exporter wrote them. The
//! [`tutorial`] shows how to write passes and rules in your own crate.
//!
//! Architecture invariants:
//! - a pass leaves a graph that passes [`tcc_ir::verify`] (the manager checks);
//! - passes never change what a graph computes beyond float rounding, except passes whose
//!   documentation says they approximate, which report what they changed: `quantize-int8`
//!   (the quantization error), `integer-matmul` (activations quantized by the reciprocal
//!   of the scale, which can move a value on a rounding midpoint by one quantum), `prune`
//!   (what the removed heads and neurons contributed, less the refit's correction) and
//!   `sparsify` (what the zeroed weights contributed, less the reconstruction's correction).

pub mod eqsat;
mod fold;
mod formats;
mod fuse;
mod manager;
mod prune;
mod quantize;
mod sparsify;
pub mod tutorial;

pub use fold::{DeadCode, FoldConstants};
pub use formats::Formats;
pub use fuse::{FuseAttention, FuseMatMul};
pub use manager::{
    Calibrator, Pass, PassContext, PassError, PassManager, PassOutcome, PassReport, Pipeline, RangeMethod, Registry,
    ValueStats,
};
pub use prune::{parse_heads, parse_layers, HeadChoice, LayerChoice, Prune, Spread};
pub use quantize::{Activations, IntegerMatMul, QdqMatMul, QuantizeInt8};
pub use sparsify::{Pattern, Sparsify};

/// The pipeline `tcc build` runs by default.
pub const DEFAULT_PIPELINE: &str = "canon,recognize,integer-matmul,qdq-matmul,fuse-matmul,fuse-attention,dce";

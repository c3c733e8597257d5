//! Benchmarks of tcc (see `benches/`):
//!
//! - `cargo bench -p tcc-benches --bench kernels`: the GEMM on BERT shapes (M=128, K=768,
//!   N=768 and 3072), tcc's generated loop nest with the tier's micro-kernel against a plain
//!   AVX-512 intrinsics GEMM, single thread, in FLOP/s.
//! - `cargo bench -p tcc-benches --bench models`: end-to-end latency of MiniLM-L6 and a
//!   BERT-base-shaped model at batch 1, sequence 128.
//! - `benches/compare.py MODEL.onnx...`: tcc against onnxruntime in the same run (ratio).

#[path = "../tests/support.rs"]
pub mod support;

//! The bodies of tcc's fuzz targets (`fuzz/`, run by cargo-fuzz and by CI for a bounded
//! time), shared with the test that replays every input fuzzing ever found
//! (`tests/tests/fuzz_regressions.rs`). Each takes arbitrary bytes and must return: errors are
//! answers, a panic (or a crash, a hang, unbounded memory) is a bug.

use std::sync::Arc;
use tcc_runtime::{DType, LoadOptions, Model, Tensor};

/// Bytes as an ONNX model: imported, then the IR verified.
pub fn onnx_import(data: &[u8]) {
    if let Ok(imported) = tcc_compiler::onnx::import_bytes(data, None) {
        let _ = tcc_ir::verify(&imported.graph);
    }
}

/// Bytes as an artifact, its checksum made valid first (else every mutation stops there):
/// parsed, validated, JIT-compiled, then run on zeros of its inputs' shapes (symbols 2).
pub fn artifact_load(data: &[u8]) {
    let mut bytes = data.to_vec();
    tcc_runtime::artifact::seal(&mut bytes);
    let Ok(a) = tcc_runtime::artifact::from_bytes(Arc::new(bytes)) else { return };
    let Ok(m) = Model::from_artifact_with(a, &LoadOptions { jit: true, tier: None }) else { return };
    let mut inputs = Vec::new();
    for input in m.inputs() {
        let shape: Vec<usize> =
            input.shape.iter().map(|d| d.as_const().map_or(2, |c| c.clamp(0, 64) as usize)).collect();
        let n: usize = shape.iter().product();
        let t = match input.dtype {
            DType::F32 => Tensor::new(shape, vec![0f32; n]),
            DType::I64 => Tensor::new(shape, vec![0i64; n]),
            DType::I32 => Tensor::new(shape, vec![0i32; n]),
            _ => return,
        };
        let Ok(t) = t else { return };
        inputs.push((input.name.clone(), t));
    }
    let _ = m.run(&inputs);
}

/// Bytes as `tcc run`'s inputs: `.npy`, `.npz` and JSON.
pub fn run_inputs(data: &[u8]) {
    let _ = tcc_runtime::io::parse_npy(data);
    let _ = tcc_runtime::io::read_npz_from(std::io::Cursor::new(data));
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = tcc_runtime::io::parse_json(text, &|name| (name != "f").then_some(DType::I64));
    }
}

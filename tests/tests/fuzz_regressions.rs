//! Every input fuzzing found (`fuzz/regressions/TARGET/`) replayed through its target's
//! harness (`tcc_tests::fuzz`), and the harnesses run on real inputs cut at every few bytes,
//! so that what CI's fuzzing runs (`fuzz/run.sh`) is also what `cargo test` checks.

use std::path::Path;
use tcc_compiler::driver::{self, BuildOptions};
use tcc_tests::fuzz;
use tcc_tests::support::{fixtures, scratch};

type Harness = fn(&[u8]);

const TARGETS: [(&str, Harness); 3] =
    [("onnx_import", fuzz::onnx_import), ("artifact_load", fuzz::artifact_load), ("run_inputs", fuzz::run_inputs)];

#[test]
fn fuzzing_findings_stay_fixed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions");
    for (target, harness) in TARGETS {
        let dir = root.join(target);
        assert!(dir.is_dir(), "{} is missing", dir.display());
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
                continue;
            }
            eprintln!("{target}: {}", path.display());
            harness(&std::fs::read(&path).unwrap());
        }
    }
}

/// The harnesses on a real artifact, a real export and real inputs, whole and cut short:
/// errors, never a panic; the whole artifact loads and runs through `artifact_load`'s path.
#[test]
fn harnesses_take_real_inputs_whole_and_cut() {
    let f = fixtures().model("bert_tiny_pooler");
    let dir = scratch("fuzz-harness");
    let art = dir.join("tiny.tcc");
    driver::build(&f.path, &art, &BuildOptions::default()).unwrap();
    let artifact = std::fs::read(&art).unwrap();
    let onnx = std::fs::read(&f.path).unwrap();
    let json = br#"{"input_ids": [[101, 2023, 102]], "attention_mask": [[1, 1, 1]]}"#.to_vec();
    let npy = tcc_runtime::io::npy_bytes(&tcc_runtime::Tensor::new(vec![1, 3], vec![101i64, 7, 102]).unwrap());
    for (data, harness) in [
        (artifact, fuzz::artifact_load as Harness),
        (onnx, fuzz::onnx_import),
        (json, fuzz::run_inputs),
        (npy, fuzz::run_inputs),
    ] {
        let step = (data.len() / 40).max(1);
        for cut in (0..data.len()).step_by(step).chain([data.len()]) {
            harness(&data[..cut]);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

//! End-to-end latency at batch 1, sequence 128, on all cores: MiniLM-L6 (real weights) and a
//! BERT-base-shaped model (12 layers, hidden 768, FFN 3072), each built from its ONNX export.
//! The BERT-base export (437 MB) is made on demand by `tests/fixtures/fetch.py --bench`.

use criterion::{criterion_group, criterion_main, Criterion};
use std::path::PathBuf;
use tcc_benches::support::{fixtures, fixtures_dir, scratch};
use tcc_compiler::driver::{self, BuildOptions};
use tcc_runtime::Model;

fn bench_model(c: &mut Criterion, name: &str, onnx: PathBuf) {
    let dir = scratch(&format!("bench-{name}"));
    let art = dir.join(format!("{name}.tcc"));
    driver::build(&onnx, &art, &BuildOptions::default()).expect("build");
    let m = Model::load(&art).expect("load");
    let inputs = m.random_inputs(1, 128, 7).expect("inputs");
    c.bench_function(&format!("{name}_b1_s128"), |b| b.iter(|| m.run(&inputs).unwrap()));
}

fn models(c: &mut Criterion) {
    bench_model(c, "minilm_l6", fixtures().model("minilm_l6").path.clone());
    let base = fixtures_dir().join("models/bert_base_rand.onnx");
    if !base.exists() {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fetch.py");
        let ok = std::process::Command::new("python3").arg(&script).arg("--bench").status().map(|s| s.success());
        assert!(matches!(ok, Ok(true)), "building the BERT-base export failed");
    }
    bench_model(c, "bert_base", base);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = models
}
criterion_main!(benches);

//! The custom-pass example (`compiler/examples/custom_pass.rs`) builds, runs, and compiles a
//! real model with its own passes in the pipeline: what a user's crate does without forking tcc.

#[path = "../../compiler/examples/custom_pass.rs"]
#[allow(dead_code)]
mod example;

use tcc_runtime::Model;
use tcc_tests::support::{fixtures, scratch, worst_rel_err};

#[test]
fn the_example_passes_run_on_its_demo_graph() {
    let g = example::demo().unwrap();
    let ops: Vec<String> = g.nodes.iter().map(|n| n.op.name().to_string()).collect();
    assert_eq!(ops, vec!["Erf"], "{}", tcc_ir::text::print(&g));
}

#[test]
fn a_real_model_builds_with_the_example_passes_and_matches_onnxruntime() {
    let f = fixtures().model("minilm_l6");
    let dir = scratch("custom-pass");
    let art = dir.join("minilm_l6.tcc");
    let opts = tcc_compiler::driver::BuildOptions { pipeline: example::PIPELINE.into(), ..Default::default() };
    let report = tcc_compiler::driver::build_with(&f.path, &art, &opts, &example::registry()).unwrap();
    let passes: Vec<&str> = report.passes.iter().map(|p| p.pass.as_str()).collect();
    assert!(passes.starts_with(&["drop-identity", "fold", "dce", "identities", "recognize"]), "{passes:?}");
    let got = Model::load(&art).unwrap().run(&f.inputs()).unwrap();
    let (err, out) = worst_rel_err(&got, &f.reference());
    assert!(err <= 1e-4, "relative error {err:.3e} on `{out}`");
    let _ = std::fs::remove_dir_all(&dir);
}

//! Malformed artifacts and models, generated: thousands of mutations of real ones, each of
//! which must give an error or a run, never a panic.
//!
//! The artifact's checksum stops a flipped byte before anything reads it (tested in the CLI
//! tests), so these mutations go behind it: the plan is changed where a buggy or malicious
//! writer could change it (slots, shapes, attributes, op parameters, weight names), the artifact
//! rewritten with a valid checksum, then loaded (validation, JIT compilation) and run on valid
//! inputs. The ONNX importer gets byte-level mutations of a real export.

use std::panic::{catch_unwind, AssertUnwindSafe};
use tcc_compiler::driver::{self, BuildOptions};
use tcc_runtime::artifact::{self, ArtifactContents};
use tcc_runtime::plan::Plan;
use tcc_runtime::{Model, Tensor};
use tcc_tests::support::{fixtures, scratch};

/// A small deterministic generator (no dependency, reproducible failures: the iteration is
/// in the message).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Every number in a JSON value, as a path of keys and indices.
fn numbers(v: &serde_json::Value, path: &mut Vec<serde_json::Value>, out: &mut Vec<Vec<serde_json::Value>>) {
    match v {
        serde_json::Value::Number(_) => out.push(path.clone()),
        serde_json::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                path.push(i.into());
                numbers(x, path, out);
                path.pop();
            }
        }
        serde_json::Value::Object(o) => {
            for (k, x) in o {
                path.push(k.as_str().into());
                numbers(x, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn at<'a>(v: &'a mut serde_json::Value, path: &[serde_json::Value]) -> &'a mut serde_json::Value {
    path.iter().fold(v, |v, k| match k {
        serde_json::Value::String(s) => &mut v[s.as_str()],
        k => &mut v[k.as_u64().unwrap() as usize],
    })
}

/// What a mutated number becomes: off by one, zero, negative, huge.
fn mutate(r: &mut Lcg, n: &serde_json::Value) -> serde_json::Value {
    let i = n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)).unwrap_or(0);
    match r.below(7) {
        0 => (i + 1).into(),
        1 => (i - 1).into(),
        2 => 0.into(),
        3 => (-i - 1).into(),
        4 => (1u64 << 40).into(),
        5 => u32::MAX.into(),
        _ => (i * 2 + 3).into(),
    }
}

/// Mutations of the plan of a real model's artifact, loaded and run: errors, not panics.
#[test]
fn mutated_plans_are_errors_not_panics() {
    let f = fixtures();
    let dir = scratch("malformed");
    let art = dir.join("tiny.tcc");
    driver::build(&f.model("bert_tiny_classifier").path, &art, &BuildOptions::default()).unwrap();
    let a = artifact::load(&art).unwrap();
    let weights: Vec<(String, Tensor)> = a.weights.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let good = Model::from_artifact(artifact::load(&art).unwrap()).unwrap();
    let inputs = good.random_inputs(2, 7, 1).unwrap();
    let plan = serde_json::to_value(&a.header.plan).unwrap();
    let mut paths = Vec::new();
    numbers(&plan, &mut Vec::new(), &mut paths);
    assert!(paths.len() > 100, "the plan has numbers to mutate");
    let mut r = Lcg(7);
    let (mut loaded, mut ran, mut rejected) = (0, 0, 0);
    for iteration in 0..400 {
        let mut p = plan.clone();
        for _ in 0..1 + r.below(3) {
            let path = &paths[r.below(paths.len())];
            let v = at(&mut p, path);
            *v = mutate(&mut r, v);
        }
        // A plan serde cannot read is refused at load the same way (`header: ...`).
        let Ok(plan) = serde_json::from_value::<Plan>(p) else {
            rejected += 1;
            continue;
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let contents =
                ArtifactContents { plan: &plan, weights: &weights, tokenizer: None, report: serde_json::Value::Null };
            let bytes = artifact::to_bytes(&contents).ok()?;
            let a = artifact::from_bytes(std::sync::Arc::new(bytes)).ok()?;
            let m = Model::from_artifact(a).ok()?;
            Some(m.run(&inputs).is_ok())
        }));
        match outcome {
            Err(_) => panic!("iteration {iteration}: a mutated plan panicked (see the message above)"),
            Ok(None) => rejected += 1,
            Ok(Some(ok)) => {
                loaded += 1;
                ran += usize::from(ok);
            }
        }
    }
    eprintln!("400 mutated plans: {rejected} rejected at load, {loaded} loaded, {ran} of them ran");
    assert!(rejected > 0 && loaded > 0, "mutations both break and spare plans");
}

/// Byte-level mutations of a real ONNX export: the importer answers each with a model or an
/// error, never a panic.
#[test]
fn mutated_onnx_models_are_errors_not_panics() {
    let f = fixtures();
    let bytes = std::fs::read(&f.model("bert_tiny_classifier").path).unwrap();
    let mut r = Lcg(11);
    for iteration in 0..300 {
        let mut b = bytes.clone();
        match r.below(3) {
            0 => {
                for _ in 0..1 + r.below(8) {
                    let i = r.below(b.len());
                    b[i] = r.next() as u8;
                }
            }
            1 => b.truncate(r.below(b.len())),
            _ => {
                let (i, n) = (r.below(b.len()), 1 + r.below(64));
                b.splice(i..i, (0..n).map(|_| r.next() as u8));
            }
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            if let Ok(m) = tcc_compiler::onnx::import_bytes(&b, None) {
                let _ = tcc_ir::verify(&m.graph);
            }
        }));
        assert!(outcome.is_ok(), "iteration {iteration}: a mutated ONNX model panicked the importer");
    }
}

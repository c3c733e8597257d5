//! The `tcc` command.

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;
use tcc_compiler::driver::{self, BuildOptions, Summary};
use tcc_runtime::{io, Model, Tensor};

/// `println!` that ends the program quietly when stdout is closed (`tcc inspect m.tcc | head`)
/// instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

#[derive(Parser)]
#[command(name = "tcc", version, about = "tcc, a Transformer compression compiler: ONNX in, a compiled artifact out.")]
struct Cli {
    /// More logging (-v info, -vv debug); TCC_LOG=filter overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the `build` variant's options costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Compile an ONNX model into a .tcc artifact.
    Build {
        /// The ONNX model.
        model: PathBuf,
        /// Where to write the artifact.
        #[arg(short, long)]
        output: PathBuf,
        /// A tokenizer.json to embed, so that `tcc run --text` works.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// The pass pipeline, e.g. "fold,dce" (see `tcc passes`).
        #[arg(long, default_value = tcc_passes::DEFAULT_PIPELINE)]
        passes: String,
        /// Print the IR after this pass (repeatable).
        #[arg(long, value_name = "PASS")]
        print_after: Vec<String>,
        /// Print the IR after every pass.
        #[arg(long)]
        print_ir_after_all: bool,
        /// Write the build report as JSON to this file.
        #[arg(long, value_name = "FILE")]
        report_json: Option<PathBuf>,
        /// Quantize: `int8` makes every product by constant weights an integer product
        /// (s8 per-column weights, u8 activations quantized per token at run time).
        #[arg(long, value_name = "KIND", value_parser = ["int8"])]
        quantize: Option<String>,
        /// How int8 activations are quantized at run time: per `row` (token) or per `tensor`
        /// (as onnxruntime's dynamic quantization). With --calibration they are static.
        #[arg(long, value_name = "GRANULARITY", default_value = "row", value_parser = ["row", "tensor"], requires = "quantize")]
        act_quant: String,
        /// Remove attention heads: a fraction of all heads (the least important on
        /// --calibration's samples), or named heads, `l0h3+l5h11` (layer 0 head 3, layer 5
        /// head 11). The output projections are refit on the calibration samples.
        #[arg(long, value_name = "F|HEADS")]
        prune_heads: Option<String>,
        /// Remove this fraction of all FFN intermediate neurons (the least important on
        /// --calibration's samples; the second FFN product is refit on them).
        #[arg(long, value_name = "F")]
        prune_ffn: Option<f64>,
        /// Remove whole layers: a count (those whose removal alone changes the outputs least
        /// on --calibration's samples), or named layers, `l3+l5`. Runs before --prune-heads
        /// and --prune-ffn, whose layers are then numbered among those left.
        #[arg(long, value_name = "N|LAYERS")]
        prune_layers: Option<String>,
        /// How a pruning fraction is shared among the layers: `global` (the least important
        /// heads and neurons of the whole model, the default) or `uniform` (the same share of
        /// each layer).
        #[arg(long, value_name = "HOW", value_parser = ["global", "uniform"])]
        prune_spread: Option<String>,
        /// Set this fraction of the products' weights to zero, in --sparsity-pattern, the
        /// others corrected for them on --calibration's samples (SparseGPT's reconstruction;
        /// without samples, by magnitude alone). Runs after --prune-*, before --quantize.
        #[arg(long, value_name = "F")]
        sparsity: Option<f64>,
        /// Which weights go together: `block:RxC` (R inputs by C outputs, all zero or kept;
        /// `block:64x32` is what the int8 kernels skip), `N:M` (N of every M inputs kept, per
        /// output) or `unstructured`.
        #[arg(long, value_name = "PATTERN", default_value = "block:64x32", requires = "sparsity")]
        sparsity_pattern: String,
        /// With --calibration, reach --sparsity in this many steps, each SparseGPT's
        /// reconstruction then a joint refit of the weights kept: more steps, more accuracy and
        /// a longer build.
        #[arg(long, value_name = "N", default_value_t = 4, requires = "sparsity")]
        sparsity_steps: usize,
        /// The attention blocks' products lose this times --sparsity of their weights, the
        /// others what makes the total --sparsity (1: attention loses what the others do;
        /// attention suffers most from losing weights).
        #[arg(long, value_name = "R", default_value_t = 0.8, requires = "sparsity")]
        sparsity_attention: f64,
        /// The first products keep 1 - D times the weights of their kind's share, the last
        /// 1 + D times, linearly between (the products after one make up for its errors; the
        /// last ones' reach the output): 0 to 1; by default 0.2 for unstructured weights, 0
        /// for blocks (whose speed it costs).
        #[arg(long, value_name = "D", requires = "sparsity")]
        sparsity_depth: Option<f64>,
        /// Calibration samples (sentences one a line, needs --tokenizer, or .npz/.json
        /// inputs): with --quantize, static activation ranges (none computed at run time);
        /// with --prune-*, what to remove and how to refit what stays; with --sparsity, the
        /// inputs the reconstruction fits.
        #[arg(long, value_name = "FILE")]
        calibration: Option<PathBuf>,
        /// Calibration tokens --prune-* and --sparsity fit on at most (the first ones of
        /// --calibration's samples): more fit better and take more memory.
        #[arg(long, value_name = "N", default_value_t = 8192, requires = "calibration")]
        calibration_tokens: usize,
        /// How calibration sets each range: `minmax` (all values), `percentile` (clips the
        /// 0.01% most extreme values at each end) or `entropy` (the clipping whose 256-level
        /// histogram is nearest in KL divergence, as TensorRT calibrates).
        #[arg(long, value_name = "METHOD", default_value = "minmax", value_parser = ["minmax", "percentile", "entropy"], requires = "calibration")]
        calibrate: String,
        /// Measure the compressed build against the f32 build on these samples: a text file
        /// of sentences (one a line, needs --tokenizer) or .npz/.json inputs.
        #[arg(long, value_name = "FILE")]
        eval: Option<PathBuf>,
    },
    /// Run an artifact on inputs from a file or on text.
    Run {
        /// The .tcc artifact.
        model: PathBuf,
        /// Inputs: .npz or .json with arrays named like the model's inputs.
        #[arg(long, short, conflicts_with = "text")]
        input: Option<PathBuf>,
        /// Text to tokenize with the embedded tokenizer (repeat for a batch).
        #[arg(long)]
        text: Vec<String>,
        /// Write outputs to this .npz or .json file.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Threads for intra-op parallelism (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Time an artifact on random valid inputs.
    Bench {
        /// The .tcc artifact.
        model: PathBuf,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// Threads for intra-op parallelism (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Timed runs.
        #[arg(long, default_value_t = 50)]
        runs: usize,
        /// Untimed runs first.
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Print JSON: {"median_ms", "min_ms", "p90_ms", "runs", ...}.
        #[arg(long)]
        json: bool,
        /// Print the time spent in each kind of op.
        #[arg(long)]
        profile: bool,
        /// Also time this artifact (the baseline: the unpruned or f32 build), one run of each in
        /// turn on the same inputs, and report the speed-up as the median of the paired ratios:
        /// a shared machine's slow and fast minutes then weigh on both alike.
        #[arg(long, value_name = "BASE.tcc", conflicts_with = "profile")]
        against: Option<PathBuf>,
    },
    /// Describe an ONNX model or a .tcc artifact.
    Inspect {
        /// An .onnx or .tcc file.
        model: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the passes a pipeline can name.
    Passes,
    /// List the ONNX operators tcc imports.
    Ops,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("TCC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Build {
            model,
            output,
            tokenizer,
            passes,
            mut print_after,
            print_ir_after_all,
            report_json,
            quantize,
            act_quant,
            prune_heads,
            prune_ffn,
            prune_layers,
            prune_spread,
            sparsity,
            sparsity_pattern,
            sparsity_steps,
            sparsity_attention,
            sparsity_depth,
            calibration,
            calibration_tokens,
            calibrate,
            eval,
        } => {
            if prune_spread.is_some() && prune_heads.is_none() && prune_ffn.is_none() {
                return Err("--prune-spread shares --prune-heads or --prune-ffn among the layers: give one".into());
            }
            if calibration_tokens == 0 {
                return Err("--calibration-tokens 0: give at least one".into());
            }
            if !(1..=64).contains(&sparsity_steps) {
                return Err(format!("--sparsity-steps {sparsity_steps}: expected 1 to 64").into());
            }
            if !(0.0..=2.0).contains(&sparsity_attention) {
                return Err(format!("--sparsity-attention {sparsity_attention}: expected a ratio from 0 to 2").into());
            }
            if let Some(d) = sparsity_depth.filter(|d| !(0.0..=1.0).contains(d)) {
                return Err(format!("--sparsity-depth {d}: expected 0 to 1").into());
            }
            let sparsify = match sparsity {
                None => None,
                Some(f) if (0.0..1.0).contains(&f) => Some(tcc_passes::Sparsify {
                    fraction: f,
                    pattern: tcc_passes::Pattern::parse(&sparsity_pattern)
                        .map_err(|e| format!("--sparsity-pattern: {e}"))?,
                    max_rows: calibration_tokens,
                    steps: sparsity_steps,
                    attention: sparsity_attention,
                    depth: sparsity_depth,
                    ..Default::default()
                }),
                Some(f) => return Err(format!("--sparsity {f}: expected a fraction in [0, 1)").into()),
            };
            let prune = match (&prune_heads, prune_ffn, &prune_layers) {
                (None, None, None) => None,
                (heads, ffn, layers) => Some(tcc_passes::Prune {
                    layers: layers
                        .as_deref()
                        .map(tcc_passes::parse_layers)
                        .transpose()
                        .map_err(|e| format!("--prune-layers {e}"))?,
                    heads: heads
                        .as_deref()
                        .map(tcc_passes::parse_heads)
                        .transpose()
                        .map_err(|e| format!("--prune-heads {e}"))?,
                    ffn: match ffn {
                        Some(f) if (0.0..1.0).contains(&f) => f,
                        Some(f) => return Err(format!("--prune-ffn {f}: expected a fraction in [0, 1)").into()),
                        None => 0.0,
                    },
                    spread: if prune_spread.as_deref() == Some("uniform") {
                        tcc_passes::Spread::Uniform
                    } else {
                        tcc_passes::Spread::Global
                    },
                    max_rows: calibration_tokens,
                }),
            };
            let calibrating_pass = ["prune", "quantize-int8", "sparsify"].iter().any(|p| passes.contains(p));
            let compressing = quantize.is_some() || prune.is_some() || sparsify.is_some();
            if !compressing && !calibrating_pass && (calibration.is_some() || eval.is_some()) {
                return Err("--calibration and --eval need something to calibrate or measure: --quantize, --prune-* or --sparsity".into());
            }
            if print_ir_after_all {
                print_after.push("*".into());
            }
            use tcc_passes::Activations;
            use tcc_runtime::op::fused::ActQuant;
            let act = match (&calibration, act_quant.as_str()) {
                (Some(_), _) => Activations::Static {
                    range: match calibrate.as_str() {
                        "percentile" => tcc_passes::RangeMethod::Percentile { tail: 1e-4 },
                        "entropy" => tcc_passes::RangeMethod::Entropy,
                        _ => tcc_passes::RangeMethod::MinMax,
                    },
                },
                (None, "tensor") => Activations::Dynamic(ActQuant::DynamicTensor),
                (None, _) => Activations::Dynamic(ActQuant::DynamicRow),
            };
            let opts = BuildOptions {
                pipeline: passes,
                tokenizer,
                print_after,
                progress: true,
                quantize: quantize.map(|_| act),
                prune,
                sparsify,
                calibration,
                eval,
            };
            let report = driver::build(&model, &output, &opts)?;
            print_build_report(&report, &output);
            if let Some(p) = report_json {
                std::fs::write(&p, serde_json::to_string_pretty(&report)?)
                    .map_err(|e| format!("{}: {e}", p.display()))?;
            }
            Ok(())
        }
        Command::Run { model, input, text, output, threads } => {
            if let Some(n) = threads {
                rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global().map_err(|e| e.to_string())?;
                tcc_runtime::pool::set_threads(n);
            }
            let m = Model::load(&model)?;
            let inputs: Vec<(String, Tensor)> = match (&input, text.is_empty()) {
                (Some(p), _) => read_inputs(p, &m)?,
                (None, false) => {
                    let texts: Vec<&str> = text.iter().map(String::as_str).collect();
                    m.encode(&texts)?
                }
                (None, true) => return Err("give inputs with --input FILE or --text TEXT".into()),
            };
            let t0 = Instant::now();
            let outputs = m.run(&inputs)?;
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            match &output {
                Some(p) => {
                    write_outputs(p, &outputs)?;
                    eprintln!("wrote {} output(s) to {} ({ms:.1} ms)", outputs.len(), p.display());
                }
                None => {
                    for (name, t) in &outputs {
                        out!("{name}: {}", head(t));
                    }
                    eprintln!("({ms:.1} ms)");
                }
            }
            Ok(())
        }
        Command::Inspect { model, json } => inspect(&model, json),
        Command::Bench { model, batch, seq, threads, runs, warmup, json, profile, against } => {
            if batch == 0 || seq == 0 || runs == 0 {
                return Err("--batch, --seq and --runs must be at least 1".into());
            }
            let threads =
                threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).max(1);
            rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().map_err(|e| e.to_string())?;
            tcc_runtime::pool::set_threads(threads);
            let m = Model::load(&model)?;
            let inputs = m.random_inputs(batch, seq, 42)?;
            if let Some(base) = against {
                return bench_against(&m, &model, &base, &inputs, (batch, seq, threads, runs, warmup), json);
            }
            for _ in 0..warmup {
                m.run(&inputs)?;
            }
            let mut times = Vec::with_capacity(runs);
            let mut stats = tcc_runtime::RunStats::default();
            m.run_with_stats(&inputs, Some(&mut stats))?;
            let peak_activations = stats.peak_activation_bytes;
            stats.step_ms.iter_mut().for_each(|t| *t = 0.0);
            for _ in 0..runs {
                let t0 = Instant::now();
                m.run_with_stats(&inputs, profile.then_some(&mut stats))?;
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            let steps = &stats.step_ms;
            let peak_rss = peak_rss_bytes();
            if profile {
                let mut by_op: std::collections::BTreeMap<String, (usize, f64)> = Default::default();
                for (step, ms) in m.plan().steps.iter().zip(steps) {
                    let e = by_op.entry(step.op.name().to_string()).or_default();
                    e.0 += 1;
                    e.1 += ms / runs as f64;
                }
                let mut rows: Vec<_> = by_op.into_iter().collect();
                rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
                let total: f64 = rows.iter().map(|r| r.1 .1).sum();
                if std::env::var_os("TCC_PROFILE_STEPS").is_some() {
                    for (step, ms) in m.plan().steps.iter().zip(steps) {
                        eprintln!("{:10.3} ms  {} {}", ms / runs as f64, step.op.name(), step.name);
                    }
                }
                eprintln!("{:24} {:>6} {:>10} {:>7}", "op", "steps", "ms/run", "share");
                for (op, (count, ms)) in rows {
                    eprintln!("{op:24} {count:>6} {ms:>10.3} {:>6.1}%", 100.0 * ms / total.max(1e-9));
                }
            }
            times.sort_by(f64::total_cmp);
            let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
            let (min, median, p90) = (times[0], pick(0.5), pick(0.9));
            let tier = m.tier().map(|t| t.name()).unwrap_or("reference");
            let kernels = m.kernels();
            if json {
                let v = serde_json::json!({
                    "median_ms": median, "min_ms": min, "p90_ms": p90, "runs": runs, "warmup": warmup,
                    "batch": batch, "seq": seq, "threads": threads, "tier": tier, "kernels": kernels,
                    "load_ms": m.load_ms, "jit_ms": m.jit_ms(),
                    "peak_activation_bytes": peak_activations, "peak_rss_bytes": peak_rss,
                    "weight_bytes": m.size(),
                });
                out!("{v}");
            } else {
                let kernels = if kernels.is_empty() { String::new() } else { format!(" ({})", kernels.join(", ")) };
                out!(
                    "{}: batch {batch}, sequence {seq}, {threads} threads, {tier} kernels{kernels}: median {median:.2} ms, min {min:.2} ms, p90 {p90:.2} ms ({runs} runs after {warmup} warm-up)",
                    model.display(),
                );
                out!(
                    "  load {:.1} ms (JIT {:.1} ms); peak activations {}, peak RSS {} (weights mapped: {})",
                    m.load_ms,
                    m.jit_ms(),
                    mb(peak_activations as f64),
                    mb(peak_rss as f64),
                    mb(m.size() as f64)
                );
            }
            Ok(())
        }
        Command::Ops => {
            for (domain, op) in tcc_compiler::onnx::SUPPORTED_OPS {
                out!("{}{op}", if domain.is_empty() { String::new() } else { format!("{domain}::") });
            }
            Ok(())
        }
        Command::Passes => {
            for (name, about) in tcc_passes::Registry::builtin().describe() {
                out!("{name:12} {about}");
            }
            Ok(())
        }
    }
}

/// `tcc bench MODEL --against BASE`: one run of each in turn, the speed-up as the median of the
/// paired ratios (with the quartiles of those ratios, to show how much the machine moved).
fn bench_against(
    m: &Model,
    model: &Path,
    base: &Path,
    inputs: &[(String, Tensor)],
    (batch, seq, threads, runs, warmup): (usize, usize, usize, usize, usize),
    json: bool,
) -> Result<()> {
    let b = Model::load(base)?;
    let names = |m: &Model| m.inputs().iter().map(|i| i.name.clone()).collect::<Vec<_>>();
    if names(m) != names(&b) {
        return Err(format!(
            "{} takes inputs {:?} but {} takes {:?}: --against needs the same model's builds",
            model.display(),
            names(m),
            base.display(),
            names(&b)
        )
        .into());
    }
    for _ in 0..warmup {
        b.run(inputs)?;
        m.run(inputs)?;
    }
    let (mut tm, mut tb, mut ratios) = (Vec::with_capacity(runs), Vec::with_capacity(runs), Vec::with_capacity(runs));
    let time = |x: &Model| -> Result<f64> {
        let t0 = Instant::now();
        x.run(inputs)?;
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    };
    for i in 0..runs {
        // Alternate which goes first, so that neither always follows the other's cache state.
        let (x, y) = if i % 2 == 0 {
            let x = time(&b)?;
            (x, time(m)?)
        } else {
            let y = time(m)?;
            (time(&b)?, y)
        };
        tb.push(x);
        tm.push(y);
        ratios.push(x / y.max(1e-9));
    }
    let q = |v: &mut Vec<f64>, f: f64| {
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * f).round() as usize]
    };
    let (mm, mb_) = (q(&mut tm, 0.5), q(&mut tb, 0.5));
    let (lo, speedup, hi) = (q(&mut ratios, 0.25), q(&mut ratios, 0.5), q(&mut ratios, 0.75));
    let tier = m.tier().map(|t| t.name()).unwrap_or("reference");
    if json {
        let v = serde_json::json!({
            "median_ms": mm, "against_median_ms": mb_, "speedup": speedup,
            "speedup_q1": lo, "speedup_q3": hi, "runs": runs, "warmup": warmup,
            "batch": batch, "seq": seq, "threads": threads, "tier": tier, "kernels": m.kernels(),
            "against_kernels": b.kernels(),
        });
        out!("{v}");
    } else {
        out!(
            "batch {batch}, sequence {seq}, {threads} threads, {tier} kernels, {runs} runs of each in turn after {warmup} warm-up:"
        );
        // What ran each build's integer products and attention, where they have such ops.
        let kernels = |x: &Model| x.kernels().join(", ");
        let (kb, km) = (kernels(&b), kernels(m));
        let with = |k: &str| if k.is_empty() { String::new() } else { format!("  ({k})") };
        out!("  {:>9} ms  {}{}", format!("{mb_:.2}"), base.display(), with(&kb));
        out!("  {:>9} ms  {}{}", format!("{mm:.2}"), model.display(), with(&km));
        out!("  {speedup:.3}x faster (median of the paired ratios; quartiles {lo:.3}x - {hi:.3}x)");
    }
    Ok(())
}

fn ext(p: &Path) -> String {
    p.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase()
}

fn read_inputs(p: &Path, m: &Model) -> Result<Vec<(String, Tensor)>> {
    match ext(p).as_str() {
        "npz" => Ok(io::read_npz(p)?),
        "json" => {
            let dtype_of = |n: &str| m.inputs().iter().find(|i| i.name == n).map(|i| i.dtype);
            Ok(io::read_json(p, &dtype_of)?)
        }
        e => Err(format!("{}: inputs must be .npz or .json, not .{e}", p.display()).into()),
    }
}

fn write_outputs(p: &Path, outputs: &[(String, Tensor)]) -> Result<()> {
    match ext(p).as_str() {
        "npz" => Ok(io::write_npz(p, outputs)?),
        "json" => Ok(io::write_json(p, outputs)?),
        e => Err(format!("{}: outputs must be .npz or .json, not .{e}", p.display()).into()),
    }
}

/// `f32[1, 9, 384] [0.0123, -0.4561, ...]`.
fn head(t: &Tensor) -> String {
    let vals: Vec<String> = match t.dtype() {
        tcc_runtime::DType::F32 => {
            t.as_slice::<f32>().unwrap_or_default().iter().take(6).map(|v| format!("{v:.4}")).collect()
        }
        _ => t.to_i64s().unwrap_or_default().iter().take(6).map(|v| v.to_string()).collect(),
    };
    format!("{}{:?} [{}{}]", t.dtype(), t.shape(), vals.join(", "), if t.len() > 6 { ", ..." } else { "" })
}

/// The process's peak resident memory (`VmHWM`), in bytes; 0 where /proc is not available.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmHWM:").map(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
        })
        .flatten()
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mb(bytes: f64) -> String {
    format!("{:.1} MB", bytes / 1e6)
}

fn print_summary(s: &Summary) {
    out!("inputs:");
    for (n, t) in &s.inputs {
        out!("  {n:28} {t}");
    }
    out!("outputs:");
    for (n, t) in &s.outputs {
        out!("  {n:28} {t}");
    }
    let heads: Vec<String> = s.attention_heads.iter().map(|h| h.to_string()).collect();
    out!("layers: {}   attention heads per layer: [{}]", s.layers, heads.join(", "));
    let zero = 100.0 * s.zero_parameters as f64 / s.parameters.max(1) as f64;
    out!("parameters: {} ({zero:.1}% zero)   weights: {}", thousands(s.parameters), mb(s.weight_bytes as f64));
    out!("ops ({} nodes):", s.op_counts.values().sum::<usize>());
    let mut counts: Vec<(&String, &usize)> = s.op_counts.iter().collect();
    counts.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (op, n) in counts {
        out!("  {op:24} {n:>6}");
    }
}

fn print_build_report(r: &driver::BuildReport, out: &Path) {
    out!("built {} from {} ({})", out.display(), r.source, r.producer);
    out!(
        "  import     {:>8.1} ms   {} ONNX nodes -> {} tcc nodes",
        r.import_ms,
        r.source_op_counts.values().sum::<usize>(),
        r.nodes_imported
    );
    for p in &r.passes {
        let stats: Vec<String> = p.stats.iter().filter(|(_, v)| **v != 0).map(|(k, v)| format!("{k}={v}")).collect();
        out!("  {:10} {:>8.1} ms   {} -> {} nodes  {}", p.pass, p.ms, p.nodes_before, p.nodes_after, stats.join(" "));
        // Zeros that no kernel skips: say so, and what would (the kernels skip all-zero 64x32
        // blocks, in the products the `formats` pass gives the block format).
        let stat = |k: &str| p.stats.get(k).copied().unwrap_or(0);
        let skipped = 2 * stat("blocks_zero_permille") >= stat("weights_zero_permille");
        if p.pass == "sparsify" && stat("weights_zero_permille") > 0 && !skipped {
            out!(
                "  note: {:.1}% of the products' weights are zero but {:.1}% of their 64x32 blocks, which is what the kernels skip: they skip little of this build (--sparsity-pattern block:64x32 turns sparsity into speed)",
                stat("weights_zero_permille") as f64 / 10.0,
                stat("blocks_zero_permille") as f64 / 10.0
            );
        }
    }
    out!("  lower      {:>8.1} ms", r.lower_ms);
    out!(
        "  write      {:>8.1} ms   {}{}",
        r.write_ms,
        mb(r.artifact_bytes as f64),
        if r.tokenizer { " (with tokenizer)" } else { "" }
    );
    out!("  total      {:>8.1} ms", r.total_ms);
    let s = &r.summary;
    out!(
        "  {} layers, {} parameters ({:.1}% zero), {} ops, {:.2} GFLOPs at sequence 128",
        s.layers,
        thousands(s.parameters),
        100.0 * s.zero_parameters as f64 / s.parameters.max(1) as f64,
        s.op_counts.values().sum::<usize>(),
        s.gflops_s128
    );
    if let Some(a) = &r.accuracy {
        out!("accuracy against the f32 build, {} samples from {}:", a.samples, a.data);
        out!(
            "  {:24} {:20} {:>11} {:>10} {:>10}  worst sample",
            "output",
            "compared",
            "mean cosine",
            "min cosine",
            "max error"
        );
        for o in &a.outputs {
            let mut worst = o.worst.clone();
            if worst.chars().count() > 48 {
                worst = worst.chars().take(45).collect::<String>() + "...";
            }
            out!(
                "  {:24} {:20} {:>11.4} {:>10.4} {:>10.2e}  {worst}",
                o.output,
                o.compared,
                o.mean_cosine,
                o.min_cosine,
                o.max_rel_error
            );
        }
        if !a.layers.is_empty() {
            out!("  where the error enters ({} compressed products; relative error of each output, added over the products before):", a.layers.len());
            for l in a.worst_layers(3) {
                out!("    {:>9.2e} (+{:.2e})  {}", l.rel_error, l.added, l.product);
            }
        }
    }
    if let Some(l) = &r.latency {
        out!(
            "latency against the f32 build (batch {}, sequence {}, median of {} alternating runs each):",
            l.batch,
            l.seq,
            l.runs
        );
        out!("  {:12} {:>10} {:>10}", "", "ms", "GFLOPs");
        out!("  {:12} {:>10.2} {:>10.2}", "f32", l.reference_ms, l.reference_gflops);
        out!("  {:12} {:>10.2} {:>10.2}", "this build", l.compressed_ms, l.compressed_gflops);
        out!(
            "  {:.3}x faster, {:.1}% of the FLOPs removed",
            l.speedup(),
            100.0 * (1.0 - l.compressed_gflops / l.reference_gflops.max(1e-12))
        );
    }
}

/// How many products by packed weights read them in each format (`formats` pass; `runtime`:
/// left to the runtime's threshold, artifacts built before it).
fn weight_formats(plan: &tcc_runtime::plan::Plan) -> std::collections::BTreeMap<&'static str, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for step in &plan.steps {
        if let tcc_runtime::Op::FusedMatMul(f) = &step.op {
            if f.packed.is_some() {
                *counts.entry(f.weights.map_or("runtime", |w| w.name())).or_insert(0) += 1;
            }
        }
    }
    counts
}

fn inspect(path: &Path, json: bool) -> Result<()> {
    if ext(path) == "tcc" {
        let m = Model::load(path)?;
        let summary: Option<Summary> = m.report().get("summary").and_then(|s| serde_json::from_value(s.clone()).ok());
        let mut s = summary.ok_or("the artifact has no summary in its report")?;
        // What the artifact runs is the plan: count its ops.
        s.op_counts = m.plan().op_counts();
        if json {
            let v = serde_json::json!({
                "format": "tcc",
                "producer": m.producer(),
                "bytes": m.size(),
                "op_counts": s.op_counts,
                "structures": m.plan().structure_counts(),
                "weight_formats": weight_formats(m.plan()),
                "layers": s.layers,
                "attention_heads": s.attention_heads,
                "parameters": m.parameters(),
                "inputs": s.inputs,
                "outputs": s.outputs,
                "tokenizer": m.has_tokenizer(),
                "load_ms": m.load_ms,
                "report": m.report(),
            });
            out!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            out!(
                "{}: tcc artifact, {} ({}), loaded in {:.1} ms{}",
                path.display(),
                mb(m.size() as f64),
                m.producer(),
                m.load_ms,
                if m.has_tokenizer() { ", with tokenizer" } else { "" }
            );
            print_summary(&s);
            let st: Vec<String> = m.plan().structure_counts().iter().map(|(k, v)| format!("{k} {v}")).collect();
            out!("fused structures: {}", st.join(", "));
            let formats = weight_formats(m.plan());
            if !formats.is_empty() {
                let f: Vec<String> = formats.iter().map(|(k, v)| format!("{k} {v}")).collect();
                out!("products by weight format: {}", f.join(", "));
            }
        }
        return Ok(());
    }
    let opts = BuildOptions { progress: !json, ..Default::default() };
    let pb = indicatif::ProgressBar::hidden();
    let (_, report) = driver::compile(path, &opts, &pb)?;
    let s = &report.summary;
    if json {
        let v = serde_json::json!({
            "format": "onnx",
            "producer": report.producer,
            "opsets": report.opsets,
            "bytes": std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
            "op_counts": s.op_counts,
            "source_op_counts": report.source_op_counts,
            "layers": s.layers,
            "attention_heads": s.attention_heads,
            "parameters": s.parameters,
            "inputs": s.inputs,
            "outputs": s.outputs,
        });
        out!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let opsets: Vec<String> = report
            .opsets
            .iter()
            .map(|(d, v)| format!("{}{v}", if d.is_empty() { "ai.onnx ".to_string() } else { format!("{d} ") }))
            .collect();
        out!(
            "{}: ONNX ({}; {}), {} nodes",
            path.display(),
            report.producer,
            opsets.join(", "),
            report.source_op_counts.values().sum::<usize>()
        );
        print_summary(s);
    }
    Ok(())
}

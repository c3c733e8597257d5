//! `sparsify`: weight sparsity without retraining. Every product by constant weights loses a
//! fraction of its weights, in a pattern the kernels can skip, and what the rest can make up
//! for the loss is moved into them.
//!
//! **Patterns.** `unstructured` (any weight), `n:m` (`n` of every `m` consecutive weights along
//! the input dimension kept, for each output), and `block:RxC` (blocks of `R` inputs by `C`
//! outputs, all zero or kept: the integer kernels skip a block of 64 inputs by one 32-column
//! panel that is all zero, so `block:64x32`, the default, is the pattern that turns into speed).
//!
//! **Reconstruction.** SparseGPT (Frantar and Alistarh 2023), the Optimal Brain Surgeon update made
//! cheap: with `H = X^T X` of the product's inputs on the calibration samples (plus a ridge of 1%
//! of its mean diagonal) and `U` the upper Cholesky factor of `H^-1`, the input rows go in order;
//! the mask of a group of rows is chosen when the walk reaches it (scores `w^2 / U_ii^2`: what
//! removing a weight costs once the rows after it absorb it), each removed weight's error `w /
//! U_ii` is spread over the rows after it (`-= err * U_i,j`), lazily in blocks of 128 rows. The
//! products go stage by stage in graph order (those reading one value, Q, K and V, together), each
//! on the inputs the model sparsified so far gives it (SparseGPT's sequential mode), and each fit
//! to what the *dense* model's product gave on the dense model's inputs: the target weights are
//! first `argmin E|x W' - x_d W|^2 + lambda |W' - W|^2`, so that a stage makes up for the error the
//! stages before it left (MiniLM-L6, 50% unstructured, held-out cosine 0.903 all fit on the dense
//! inputs, 0.905 sequential, 0.921 sequential with the correction). SparseGPT fixes each row once
//! it has spread the row's errors over the rows after it, so the weights it keeps are not the best
//! for its mask: they are then refit jointly ([`refit_kept`], a few steps of conjugate gradients on
//! `H` restricted to the mask; 0.928). And the fraction is reached gradually ([`Sparsify::steps`],
//! 4 by default: each step SparseGPT removes more, the zeros so far first, then the refit; 0.935).
//! The attention blocks' products (Q, K, V, output) lose less than the others
//! ([`Sparsify::attention`]: 0.8 times the fraction by default, the others what makes the total; at
//! 50%, 40% and 55%), as their reconstruction errors at the same fraction are twice the FFN's
//! (0.940, with [`TARGET_RIDGE`] 0.3). And the first products lose more than the last
//! ([`Sparsify::depth`], unstructured weights): the stages after a product make up for its errors,
//! the last ones' reach the output (0.947; on 16,384 calibration tokens: 0.954). Without
//! calibration samples `H` is the identity: plain magnitude pruning, no reconstruction (0.737
//! with the shares; 0.724 without).
//!
//! The weights stay dense in the graph, with zeros; the runtime finds the zero blocks when it
//! loads the weights (as it would in a model sparsified elsewhere) and skips them.

use crate::manager::{option_in, Pass, PassContext, PassOutcome};
use crate::prune::{
    attention_products, captured, inverse_cholesky, linear, on_threads, rebuild, solve_spd, Gemm, Linear,
};
use std::collections::BTreeMap;
use tcc_ir::{Graph, Tensor, ValueId};

/// Which weights may go together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    Unstructured,
    /// `n` of every `m` consecutive weights along the input dimension kept, per output.
    NM {
        n: usize,
        m: usize,
    },
    /// Blocks of `rows` inputs by `cols` outputs.
    Block {
        rows: usize,
        cols: usize,
    },
}

/// The block the kernels skip when all its weights are zero: 64 rows of `k` (one AMX step,
/// sixteen of VNNI's groups of four) by one 32-column panel.
pub const KERNEL_BLOCK: (usize, usize) = (64, 32);

impl Pattern {
    /// The pattern the integer kernels turn into speed: one AMX step (64 rows of `k`) of one
    /// 32-column panel ([`KERNEL_BLOCK`]).
    pub const FASTEST: Pattern = Pattern::Block { rows: KERNEL_BLOCK.0, cols: KERNEL_BLOCK.1 };

    /// `unstructured`, `n:m` (`2:4`) or `block:RxC` (`block:64x32`).
    pub fn parse(s: &str) -> Result<Pattern, String> {
        let bad = || format!("sparsity pattern `{s}`: expected unstructured, N:M (2:4) or block:RxC (block:64x32)");
        if s == "unstructured" {
            return Ok(Pattern::Unstructured);
        }
        if let Some(b) = s.strip_prefix("block:") {
            let (r, c) = b.split_once('x').ok_or_else(bad)?;
            let (rows, cols) = (r.parse::<usize>().map_err(|_| bad())?, c.parse::<usize>().map_err(|_| bad())?);
            if rows == 0 || cols == 0 || !BLOCK.is_multiple_of(rows) {
                return Err(format!(
                    "sparsity pattern `{s}`: blocks need at least one row and column, and rows dividing {BLOCK}"
                ));
            }
            return Ok(Pattern::Block { rows, cols });
        }
        let (n, m) = s.split_once(':').ok_or_else(bad)?;
        let (n, m) = (n.parse::<usize>().map_err(|_| bad())?, m.parse::<usize>().map_err(|_| bad())?);
        if n >= m || m == 0 || !BLOCK.is_multiple_of(m) {
            return Err(format!("sparsity pattern `{s}`: N:M keeps N < M of every M, M dividing {BLOCK}"));
        }
        Ok(Pattern::NM { n, m })
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Unstructured => f.write_str("unstructured"),
            Pattern::NM { n, m } => write!(f, "{n}:{m}"),
            Pattern::Block { rows, cols } => write!(f, "block:{rows}x{cols}"),
        }
    }
}

/// Input rows per lazy update of the weights after them.
const BLOCK: usize = 128;

/// Relative ridge of `H` (SparseGPT's 1%).
const RIDGE: f64 = 0.01;

/// The `sparsify` pass.
#[derive(Clone, Debug, PartialEq)]
pub struct Sparsify {
    /// The fraction of the products' weights set to zero, all together ([`Sparsify::attention`]
    /// shares it out; for `n:m`, `1 - n/m` in each product whatever this is).
    pub fraction: f64,
    pub pattern: Pattern,
    /// Calibration tokens captured at most.
    pub max_rows: usize,
    /// Steps of the joint refit of the kept weights after SparseGPT ([`refit_kept`]; 0: none).
    pub refit: usize,
    /// With calibration, the fraction is reached in this many equal steps, each SparseGPT then
    /// the refit (MiniLM-L6, 50% unstructured, 108 held-out queries' mean cosine, 3,620
    /// calibration tokens: 0.9284 / 0.9302 / 0.9351 / 0.9381 in 1 / 2 / 4 / 8 steps; 16,384
    /// tokens: 0.9416 in 1, 0.9479 in 8; all before [`Sparsify::attention`]). Time grows with
    /// it. `N:M` takes one.
    pub steps: usize,
    /// The fraction of the attention blocks' products (Q, K, V, output) relative to
    /// `fraction`; the others lose what makes the total `fraction` of the weights (1: every
    /// product the same). Attention's products suffer most from losing weights (their
    /// reconstruction errors are twice the FFN's): MiniLM-L6 at 50% unstructured, held-out
    /// mean cosine 0.9351 at 1, 0.9388 / **0.9396** / 0.9388 / 0.9344 at 0.9 / 0.8 / 0.7 / 0.6
    /// (the FFN's two products alike: 45% / 65% or 60% / 50% in place of 55% / 55%, 0.9367 /
    /// 0.9366; all with a target ridge of 1). `N:M` keeps its N of every M everywhere.
    pub attention: f64,
    /// How much more the first products lose than the last: a product at depth `t` (0 the
    /// first stage, 1 the last) keeps `1 - depth (1 - 2 t)` times as many weights as the others
    /// of its kind, the total as asked. The stages after one make up for its errors, the last ones'
    /// go straight to the output: MiniLM-L6 at 50% unstructured, held-out mean cosine 0.9403 at
    /// 0, **0.9468** / 0.9473 / 0.9450 at 0.2 / 0.3 / 0.4 (worst 0.900 / 0.882 / 0.867); the
    /// first losing 1 - D times as much rather than keeping 1 + D times as many: 0.9438 /
    /// 0.9450 / 0.9439 at 0.1 / 0.2 / 0.3, and the last losing more (-0.1): 0.9324. 50% in
    /// 64 x 32 blocks: 0.565 -> 0.615. `None`: 0.2 for unstructured weights, 0 for blocks,
    /// whose speed it costs (the kernels gain less from each block past 80% than they lose
    /// below: BERT-base int8 at 80%, 0.958x / 0.966x the speed of the build without, paired).
    pub depth: Option<f64>,
}

/// [`Sparsify::refit`]'s default (MiniLM-L6, 50% unstructured, 108 held-out queries' mean
/// cosine: 0.9210 without, 0.9278 after 10 steps, 0.9285 after 30).
const REFIT_STEPS: usize = 20;

/// [`Sparsify::attention`]'s default.
const ATTENTION_SHARE: f64 = 0.8;

/// [`Sparsify::depth`]'s default for unstructured weights.
const DEPTH: f64 = 0.2;

impl Default for Sparsify {
    fn default() -> Self {
        Sparsify {
            fraction: 0.5,
            pattern: Pattern::FASTEST,
            max_rows: 8192,
            refit: REFIT_STEPS,
            steps: 4,
            attention: ATTENTION_SHARE,
            depth: None,
        }
    }
}

impl Sparsify {
    /// The pass with its options as pipeline text.
    pub fn pipeline_text(&self) -> String {
        let mut o = vec![format!("fraction={}", self.fraction), format!("pattern={}", self.pattern)];
        if self.max_rows != Sparsify::default().max_rows {
            o.push(format!("rows={}", self.max_rows));
        }
        if self.refit != REFIT_STEPS {
            o.push(format!("refit={}", self.refit));
        }
        if self.steps != Sparsify::default().steps {
            o.push(format!("steps={}", self.steps));
        }
        if self.attention != ATTENTION_SHARE {
            o.push(format!("attention={}", self.attention));
        }
        if let Some(d) = self.depth {
            o.push(format!("depth={d}"));
        }
        format!("sparsify{{{}}}", o.join(", "))
    }

    /// From pipeline options: `fraction=F`, `pattern=P` ([`Pattern::parse`]), `rows=N`,
    /// `refit=N` (steps; 0 for SparseGPT's weights as they are), `steps=N` (gradual steps),
    /// `attention=R` (the attention products' fraction relative to `fraction`, 0 to 2),
    /// `depth=D` (how much more the first products lose than the last, 0 to 1).
    pub fn from_options(o: &BTreeMap<String, String>) -> Result<Sparsify, String> {
        let mut s = Sparsify::default();
        for (k, v) in o {
            let kv = (k.as_str(), v.as_str());
            match k.as_str() {
                "fraction" => s.fraction = option_in("sparsify", kv, 0.0..1.0, "a fraction in [0, 1)")?,
                "pattern" => s.pattern = Pattern::parse(v).map_err(|e| format!("sparsify: {e}"))?,
                "rows" => s.max_rows = option_in("sparsify", kv, 1.., "at least 1")?,
                "refit" => s.refit = option_in("sparsify", kv, 0..=1000, "0 to 1000")?,
                "steps" => s.steps = option_in("sparsify", kv, 1..=64, "1 to 64")?,
                "attention" => s.attention = option_in("sparsify", kv, 0.0..=2.0, "a ratio from 0 to 2")?,
                "depth" => s.depth = Some(option_in("sparsify", kv, 0.0..=1.0, "0 to 1")?),
                other => {
                    return Err(format!(
                        "sparsify: unknown option `{other}` (known: fraction, pattern, rows, refit, steps, attention, depth)"
                    ))
                }
            }
        }
        Ok(s)
    }
}

impl Pass for Sparsify {
    fn name(&self) -> &'static str {
        "sparsify"
    }

    fn run(&mut self, g: &mut Graph, cx: &mut PassContext) -> tcc_ir::Result<PassOutcome> {
        let mut out = PassOutcome::default();
        if self.fraction <= 0.0 && !matches!(self.pattern, Pattern::NM { .. }) {
            return Ok(out);
        }
        let linears: Vec<Linear> = (0..g.nodes.len()).filter_map(|n| linear(g, n)).collect();
        if linears.is_empty() {
            return Err(tcc_ir::Error::Pass("sparsify: no product by constant f32 weights to sparsify".into()));
        }
        let input_of = |g: &Graph, l: &Linear| g.nodes[l.node].inputs[0];
        // The products by the value they read, in graph order (Q, K and V read one).
        let mut stages: Vec<(ValueId, Vec<usize>)> = Vec::new();
        for (i, l) in linears.iter().enumerate() {
            let v = input_of(g, l).ok_or_else(|| tcc_ir::Error::Pass("sparsify: a product lacks its input".into()))?;
            match stages.iter_mut().find(|s| s.0 == v) {
                Some(s) => s.1.push(i),
                None => stages.push((v, vec![i])),
            }
        }
        let gemm = Gemm::new()?;
        let (pattern, refit) = (self.pattern, self.refit);
        // N:M keeps N of every M whatever the fraction: one step is all of it, and one share.
        let nm = matches!(pattern, Pattern::NM { .. });
        let steps = if nm { 1 } else { self.steps.max(1) };
        let att = attention_products(g);
        let last = stages.len().saturating_sub(1).max(1) as f64;
        let mut depth_of = vec![0.0; linears.len()];
        for (si, (_, group)) in stages.iter().enumerate() {
            group.iter().for_each(|&i| depth_of[i] = si as f64 / last);
        }
        let products: Vec<Share> = linears
            .iter()
            .zip(depth_of)
            .map(|(l, depth)| Share { weights: l.k * l.n, attention: att.contains(&l.node), depth })
            .collect();
        let (attention, depth) = match pattern {
            Pattern::NM { .. } => (1.0, 0.0),
            Pattern::Block { .. } => (self.attention, self.depth.unwrap_or(0.0)),
            Pattern::Unstructured => (self.attention, self.depth.unwrap_or(DEPTH)),
        };
        let fractions = shares(&products, self.fraction, attention, depth);
        // Each kind's fraction, and the first and last products' (the depth's spread).
        for (side, name) in [(true, "attention"), (false, "other")] {
            let mine: Vec<usize> = kind(&products, side).map(|(i, _)| i).collect();
            if let (Some(&first), Some(&last)) = (mine.first(), mine.last()) {
                let permille = |f: f64| (f * 1000.0).round() as i64;
                out.stat(&format!("{name}_fraction_permille"), permille(kind_fraction(&products, &fractions, side)));
                out.stat(&format!("{name}_first_permille"), permille(fractions[first]));
                out.stat(&format!("{name}_last_permille"), permille(fractions[last]));
            }
        }
        let (mut zeros, mut total, mut skipped, mut blocks) = (0usize, 0usize, 0usize, 0usize);
        // Writes a product's new weights into the graph (a new node; the old one goes dead).
        let mut apply = |g: &mut Graph, out: &mut PassOutcome, l: &Linear, w: &[f32], err: f64| {
            zeros += w.iter().filter(|&&v| v == 0.0).count();
            total += w.len();
            let (z, b) = zero_blocks(w, l.k, l.n);
            (skipped, blocks) = (skipped + z, blocks + b);
            let name = g.nodes[l.node].name.clone();
            out.stat(&format!("error_ppm.{name}"), (err * 1e6).round() as i64);
            let a = input_of(g, l).ok_or_else(|| tcc_ir::Error::Pass(format!("`{name}` lacks its input")))?;
            let old = g.nodes[l.node].outputs[0];
            let y = rebuild(g, l, a, l.n, w, None, None)?;
            g.replace_uses(old, y);
            Ok::<_, tcc_ir::Error>(())
        };
        match cx.calibrator.clone() {
            // Magnitude alone: every product at once.
            None => {
                let all: Vec<usize> = (0..linears.len()).collect();
                let done = on_threads(&all, |i| {
                    let l = &linears[i];
                    let w = sparsegpt(&l.w, l.k, l.n, &Factor::new(None, l.k), pattern, fractions[i]);
                    let err = relative_error(&gemm, None, &l.w, &w, l.k, l.n)?;
                    Ok((w, err))
                })?;
                for (i, (w, err)) in all.into_iter().zip(done) {
                    apply(g, &mut out, &linears[i], &w, err)?;
                }
            }
            // Stage by stage in graph order, each on what the model sparsified so far feeds it
            // (SparseGPT's sequential mode), fit to what the dense model's product gave on the
            // dense model's inputs: a stage makes up for the error of the stages before it.
            Some(c) => {
                let dense_inputs: Vec<ValueId> = stages.iter().map(|s| s.0).collect();
                let xd = captured(c.as_ref(), g, &dense_inputs, self.max_rows)?;
                if let Some(x) = xd.first() {
                    out.stat("calibration_tokens", x.shape()[0] as i64);
                }
                for (si, (_, group)) in stages.iter().enumerate() {
                    let xs = if si == 0 {
                        xd[0].clone()
                    } else {
                        let v = input_of(g, &linears[group[0]])
                            .ok_or_else(|| tcc_ir::Error::Pass("sparsify: a product lacks its input".into()))?;
                        let mut now = g.clone();
                        now.remove_dead_nodes();
                        now.toposort()?;
                        captured(c.as_ref(), &now, &[v], self.max_rows)?.remove(0)
                    };
                    let fit = Fit::new(&gemm, &xs, &xd[si])?;
                    let hf = if refit > 0 { ridged_f32(&fit.h, fit.k) } else { Vec::new() };
                    let factor = Factor::new(Some(&fit.h), fit.k);
                    let done = on_threads(group, |i| {
                        let l = &linears[i];
                        let target = fit.target(&gemm, &l.w, l.k, l.n)?;
                        // Gradually: each step removes more (the zeros so far are the first
                        // SparseGPT removes again), then the kept weights are refit.
                        let mut w = target.clone();
                        for step in 1..=steps {
                            let f = fractions[i] * step as f64 / steps as f64;
                            w = sparsegpt(&w, l.k, l.n, &factor, pattern, f);
                            if refit > 0 {
                                w = refit_kept(&gemm, &hf, &target, &w, l.k, l.n, refit)?;
                            }
                        }
                        let err = relative_error(&gemm, Some(&fit.hd), &l.w, &w, l.k, l.n)?;
                        Ok((w, err))
                    })?;
                    for (&i, (w, err)) in group.iter().zip(done) {
                        apply(g, &mut out, &linears[i], &w, err)?;
                    }
                }
            }
        }
        g.remove_dead_nodes();
        g.toposort()?;
        out.stat("products_sparsified", linears.len() as i64);
        out.stat("weights_zero_permille", ((1000 * zeros + total / 2) / total.max(1)) as i64);
        out.stat("blocks_zero_permille", ((1000 * skipped + blocks / 2) / blocks.max(1)) as i64);
        Ok(out)
    }
}

/// What [`shares`] knows of a product: its number of weights, whether it is one of the
/// attention blocks' ([`attention_products`]), and how deep it is (its stage's place in graph
/// order, 0 for the first, 1 for the last).
struct Share {
    weights: usize,
    attention: bool,
    depth: f64,
}

/// Each product's fraction: the attention blocks' products `attention` times `fraction`
/// together, the others what makes the total `fraction` of all the weights (at most [`MOST`]
/// each; what one side cannot take, the other does); then within each side, a product at depth
/// `t` keeps `1 - depth (1 - 2 t)` times as many weights as the others of its side, scaled so
/// that the side keeps what it did (the first products keep fewer, the last more; in what they
/// keep, so that at 80% the first do not reach 100%).
fn shares(products: &[Share], fraction: f64, attention: f64, depth: f64) -> Vec<f64> {
    let weights = |side: bool| -> f64 { kind(products, side).map(|(_, p)| p.weights as f64).sum() };
    let (wa, wo) = (weights(true), weights(false));
    let (fa, fo) = if wa == 0.0 || wo == 0.0 || attention == 1.0 {
        (fraction, fraction)
    } else {
        let total = fraction * (wa + wo);
        let fo = ((total - (fraction * attention).min(MOST) * wa) / wo).clamp(0.0, MOST);
        (((total - fo * wo) / wa).clamp(0.0, MOST), fo)
    };
    let mut out = vec![0.0; products.len()];
    for (side, f, w) in [(true, fa, wa), (false, fo, wo)] {
        let mine: Vec<(usize, &Share)> = kind(products, side).collect();
        let ramp = |p: &Share| (1.0 - depth * (1.0 - 2.0 * p.depth)).max(0.0);
        let keep = |c: f64, p: &Share| (c * ramp(p)).clamp(1.0 - MOST, 1.0);
        // The scale `c` at which the side keeps `(1 - f) w` weights.
        let kept = |c: f64| mine.iter().map(|(_, p)| p.weights as f64 * keep(c, p)).sum::<f64>();
        let c = if depth == 0.0 {
            1.0 - f
        } else {
            let (mut lo, mut hi) = (0.0, 1.0);
            while kept(hi) < (1.0 - f) * w && hi < 1e6 {
                hi *= 2.0;
            }
            for _ in 0..64 {
                let mid = 0.5 * (lo + hi);
                if kept(mid) < (1.0 - f) * w {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            0.5 * (lo + hi)
        };
        for (i, p) in mine {
            out[i] = 1.0 - keep(c, p);
        }
    }
    out
}

/// The products (with their indices) of the attention blocks (`attention`) or the others.
fn kind(products: &[Share], attention: bool) -> impl Iterator<Item = (usize, &Share)> {
    products.iter().enumerate().filter(move |(_, p)| p.attention == attention)
}

/// How many of the `k x n` weights' [`KERNEL_BLOCK`]s (64 rows of `k` by 32 columns; blocks at
/// the edges padded with zeros) are all zero, of how many: what the kernels skip, whatever the
/// pattern that made the zeros (the stat `blocks_zero_permille`: an N:M or unstructured build
/// zeroes weights but hardly any block).
fn zero_blocks(w: &[f32], k: usize, n: usize) -> (usize, usize) {
    let (rows, cols) = KERNEL_BLOCK;
    let mut zero = 0;
    for r0 in (0..k).step_by(rows) {
        for c0 in (0..n).step_by(cols) {
            let c1 = (c0 + cols).min(n);
            zero += usize::from((r0..(r0 + rows).min(k)).all(|r| w[r * n + c0..r * n + c1].iter().all(|&v| v == 0.0)));
        }
    }
    (zero, k.div_ceil(rows) * n.div_ceil(cols))
}

/// The fraction of the weights of one kind ([`kind`]) that `fractions` (one per product) remove.
fn kind_fraction(products: &[Share], fractions: &[f64], attention: bool) -> f64 {
    let (zero, all) = kind(products, attention)
        .fold((0.0, 0.0), |(z, a), (i, p)| (z + p.weights as f64 * fractions[i], a + p.weights as f64));
    zero / all
}

/// The largest fraction [`shares`] gives one product.
const MOST: f64 = 0.99;

/// What one stage's products are fit on: `H = X^T X / t` of the inputs the sparsified model so
/// far feeds them (`X`), `X^T X_d / t` with the dense model's (`X_d`, the same tokens), and the
/// dense `H_d`, which errors are reported on.
struct Fit {
    k: usize,
    h: Vec<f64>,
    cross: Option<Vec<f32>>,
    hd: Vec<f64>,
}

/// Relative ridge of the error-correcting target, toward the product's own weights (MiniLM-L6,
/// 50% unstructured, held-out cosine, SparseGPT alone in one step: 0.902 / 0.919 / 0.921 at
/// 0.01 / 0.1 / 1; 0.905 without the correction, 0.903 with every stage fit on the dense
/// model's inputs. With the refit, 4 steps and the attention share: 0.9378 / 0.9396 / 0.9402
/// at 3 / 1 / 0.3; 8 steps on 16,384 tokens: 0.9498 / 0.9520 at 1 / 0.3).
const TARGET_RIDGE: f64 = 0.3;

impl Fit {
    fn new(gemm: &Gemm, x: &Tensor, xd: &Tensor) -> tcc_ir::Result<Fit> {
        let (t, k) = (x.shape()[0], x.shape()[1]);
        let rows = x.as_slice::<f32>().map_err(tcc_ir::Error::Runtime)?;
        let rows_d = xd.as_slice::<f32>().map_err(tcc_ir::Error::Runtime)?;
        let xt = transpose(rows, t, k);
        let scale = 1.0 / t.max(1) as f64;
        let h: Vec<f64> = gemm.run(k, t, k, &xt, rows)?.iter().map(|&e| e as f64 * scale).collect();
        // The same tokens in both (the same samples, captured the same way); anything else
        // (which a user's calibrator could answer) gets no correction.
        let (cross, hd) = if xd.shape() != x.shape() || rows == rows_d {
            (None, h.clone())
        } else {
            let c = gemm.run(k, t, k, &xt, rows_d)?.iter().map(|&e| (e as f64 * scale) as f32).collect();
            (Some(c), gram(gemm, rows_d, t, k)?)
        };
        Ok(Fit { k, h, cross, hd })
    }

    /// The dense weights `w` (`k x n`) would best have on these inputs to give what they gave on
    /// the dense model's: `argmin E|x W' - x_d W|^2 + lambda |W' - W|^2`, `(H + lambda)^-1 (C W +
    /// lambda W)`; `w` itself where both inputs are the same.
    fn target(&self, gemm: &Gemm, w: &[f32], k: usize, n: usize) -> tcc_ir::Result<Vec<f32>> {
        let Some(c) = &self.cross else { return Ok(w.to_vec()) };
        debug_assert_eq!(k, self.k);
        let lambda = TARGET_RIDGE * mean_diagonal(&self.h, k);
        let cw = gemm.run(k, k, n, c, w)?;
        let mut a = self.h.clone();
        for r in 0..k {
            a[r * k + r] += lambda;
        }
        let b: Vec<f64> = cw.iter().zip(w).map(|(&x, &v)| x as f64 + lambda * v as f64).collect();
        Ok(match solve_spd(a, b, k, n) {
            Some(t) => t.iter().map(|&v| v as f32).collect(),
            None => w.to_vec(),
        })
    }
}

fn transpose(rows: &[f32], t: usize, k: usize) -> Vec<f32> {
    let mut xt = vec![0f32; k * t];
    for (r, row) in rows.chunks(k.max(1)).enumerate() {
        for (j, &e) in row.iter().enumerate() {
            xt[j * t + r] = e;
        }
    }
    xt
}

/// The mean of the diagonal of `h` (`k x k`), at least 1e-12: what the ridges scale.
fn mean_diagonal(h: &[f64], k: usize) -> f64 {
    ((0..k).map(|r| h[r * k + r]).sum::<f64>() / k.max(1) as f64).max(1e-12)
}

/// `h + lambda` in `f32`, with SparseGPT's ridge ([`RIDGE`] of the mean diagonal): the system
/// [`refit_kept`] solves.
pub(crate) fn ridged_f32(h: &[f64], k: usize) -> Vec<f32> {
    let lambda = RIDGE * mean_diagonal(h, k);
    let mut hf: Vec<f32> = h.iter().map(|&v| v as f32).collect();
    for r in 0..k {
        hf[r * k + r] += lambda as f32;
    }
    hf
}

/// `X^T X / t` of `t` rows of `k`.
fn gram(gemm: &Gemm, rows: &[f32], t: usize, k: usize) -> tcc_ir::Result<Vec<f64>> {
    let xt = transpose(rows, t, k);
    Ok(gemm.run(k, t, k, &xt, rows)?.iter().map(|&e| e as f64 / t.max(1) as f64).collect())
}

/// What SparseGPT needs of `H` (`k x k`, `X^T X / t`; `None`: the identity, no correction): the
/// upper factor `U` of `(H + lambda)^-1` and the inputs never seen. It depends on `H` alone, so
/// the products reading one value and every gradual step share one (a factorization is `k^3`).
pub(crate) struct Factor {
    k: usize,
    u: Vec<f64>,
    /// Inputs zero on every sample: their weights do nothing.
    unseen: Vec<bool>,
}

impl Factor {
    pub(crate) fn new(h: Option<&[f64]>, k: usize) -> Factor {
        let eye = || (0..k * k).map(|i| if i / k == i % k { 1.0 } else { 0.0 }).collect::<Vec<f64>>();
        // Without samples, U is the identity: no factorization (k^3), no updates.
        let Some(h) = h else { return Factor { k, u: eye(), unseen: vec![false; k] } };
        let mut h = h.to_vec();
        let unseen: Vec<bool> = (0..k).map(|r| h[r * k + r] == 0.0).collect();
        for r in (0..k).filter(|&r| unseen[r]) {
            h[r * k + r] = 1.0;
        }
        let lambda = RIDGE * mean_diagonal(&h, k);
        for r in 0..k {
            h[r * k + r] += lambda;
        }
        // U, upper, with H^-1 = U^T U: with J the reversal of the indices and J H J = L L^T,
        // U = J L^-1 J (H = V V^T for the upper V = J L J, so H^-1 = V^-T V^-1).
        let rev: Vec<f64> = (0..k * k).map(|i| h[(k - 1 - i / k) * k + (k - 1 - i % k)]).collect();
        let u =
            inverse_cholesky(rev, k).map(|y| (0..k * k).map(|i| y[(k - 1 - i / k) * k + (k - 1 - i % k)]).collect());
        // A factorization that fails (not positive definite to f64) leaves magnitude pruning.
        Factor { k, u: u.unwrap_or_else(eye), unseen }
    }
}

/// `w` (`k x n`, row-major, rows the inputs) with `fraction` of its weights zero in `pattern`,
/// the others corrected for them as SparseGPT does with `factor` ([`Factor`] of the inputs'
/// `X^T X / t`).
pub(crate) fn sparsegpt(w: &[f32], k: usize, n: usize, factor: &Factor, pattern: Pattern, fraction: f64) -> Vec<f32> {
    debug_assert_eq!(k, factor.k);
    let mut wd: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    for r in (0..k).filter(|&r| factor.unseen[r]) {
        wd[r * n..(r + 1) * n].fill(0.0);
    }
    let u = &factor.u;
    let mut removed = vec![false; k * n];
    // Each group removes its share of what the groups so far owe, rounded: the total is the
    // fraction to one weight or block, not each group's rounding added up (64 x 32 blocks of a
    // 768-column product at 88%: 21.1 of 24 each, 21 or 22, not 21 always).
    let (mut seen, mut dropped) = (0usize, 0usize);
    let mut owed = |units: usize| {
        seen += units;
        let d = ((seen as f64 * fraction).round() as usize).saturating_sub(dropped).min(units);
        dropped += d;
        d
    };
    let mut i1 = 0;
    while i1 < k {
        let i2 = (i1 + BLOCK).min(k);
        let cnt = i2 - i1;
        let mut err1 = vec![0f64; cnt * n];
        let score = |wd: &[f64], r: usize, c: usize| {
            let d = u[r * k + r];
            wd[r * n + c] * wd[r * n + c] / (d * d)
        };
        if pattern == Pattern::Unstructured {
            let mut s: Vec<(f64, usize)> =
                (0..cnt * n).map(|e| (score(&wd, i1 + e / n, e % n), (i1 + e / n) * n + e % n)).collect();
            let drop = owed(cnt * n);
            if drop > 0 {
                s.select_nth_unstable_by(drop - 1, |a, b| a.0.total_cmp(&b.0));
                s[..drop].iter().for_each(|&(_, e)| removed[e] = true);
            }
        }
        for r in i1..i2 {
            match pattern {
                Pattern::NM { n: keep, m } if (r - i1) % m == 0 => {
                    let rows = r..(r + m).min(i2);
                    for c in 0..n {
                        let mut s: Vec<(f64, usize)> = rows.clone().map(|q| (score(&wd, q, c), q)).collect();
                        s.sort_by(|a, b| a.0.total_cmp(&b.0));
                        let drop = s.len().saturating_sub(keep);
                        s[..drop].iter().for_each(|&(_, q)| removed[q * n + c] = true);
                    }
                }
                Pattern::Block { rows: br, cols: bc } if (r - i1) % br == 0 => {
                    let rows = r..(r + br).min(i2);
                    let blocks = n.div_ceil(bc);
                    let mut s: Vec<(f64, usize)> = (0..blocks)
                        .map(|b| {
                            let cols = b * bc..((b + 1) * bc).min(n);
                            (
                                rows.clone()
                                    .flat_map(|q| cols.clone().map(move |c| (q, c)))
                                    .map(|(q, c)| score(&wd, q, c))
                                    .sum(),
                                b,
                            )
                        })
                        .collect();
                    let drop = owed(blocks);
                    if drop > 0 {
                        s.select_nth_unstable_by(drop - 1, |a, b| a.0.total_cmp(&b.0));
                        for &(_, b) in &s[..drop] {
                            for q in rows.clone() {
                                (b * bc..((b + 1) * bc).min(n)).for_each(|c| removed[q * n + c] = true);
                            }
                        }
                    }
                }
                _ => {}
            }
            // Row r final: its removed weights' errors spread over the block's later rows.
            let d = u[r * k + r];
            let e = &mut err1[(r - i1) * n..(r - i1 + 1) * n];
            for c in 0..n {
                if removed[r * n + c] {
                    e[c] = wd[r * n + c] / d;
                    wd[r * n + c] = 0.0;
                }
            }
            if e.iter().all(|&v| v == 0.0) {
                continue;
            }
            let (head, tail) = wd.split_at_mut((r + 1) * n);
            let _ = head;
            for (q, row) in tail.chunks_mut(n).take(i2 - r - 1).enumerate() {
                let f = u[r * k + r + 1 + q];
                if f != 0.0 {
                    row.iter_mut().zip(e.iter()).for_each(|(x, &v)| *x -= f * v);
                }
            }
        }
        // The rows after the block: W[i2..] -= U[i1..i2, i2..]^T Err1.
        let (_, rest) = wd.split_at_mut(i2 * n);
        for (q, row) in rest.chunks_mut(n).enumerate() {
            for r in 0..cnt {
                let f = u[(i1 + r) * k + i2 + q];
                if f != 0.0 {
                    row.iter_mut().zip(&err1[r * n..(r + 1) * n]).for_each(|(x, &v)| *x -= f * v);
                }
            }
        }
        i1 = i2;
    }
    // Removed weights stay exactly zero (later rows' updates never touch earlier rows).
    wd.iter().map(|&v| v as f32).collect()
}

/// The weights SparseGPT kept, refit together: per output, `min (w' - t)^T (H + lambda) (w' - t)`
/// over the `w'` zero where `w` is (the mask it chose), by `iters` steps of conjugate gradients
/// preconditioned by `H`'s diagonal, from `w`. SparseGPT fixes a row once it has spread the
/// row's errors over the rows after it, so the rows before a removed weight never make up for
/// it; this solves for every kept row at once (to the steps' tolerance).
///
/// `hf` is `H + lambda` in `f32` ([`ridged_f32`]), made once for every product reading the
/// same inputs and every step.
pub(crate) fn refit_kept(
    gemm: &Gemm,
    hf: &[f32],
    t: &[f32],
    w: &[f32],
    k: usize,
    n: usize,
    iters: usize,
) -> tcc_ir::Result<Vec<f32>> {
    let diag: Vec<f32> = (0..k).map(|r| hf[r * k + r].max(1e-30)).collect();
    let kept: Vec<bool> = w.iter().map(|&v| v != 0.0).collect();
    let masked = |mut v: Vec<f32>| {
        v.iter_mut().zip(&kept).for_each(|(x, &m)| *x = if m { *x } else { 0.0 });
        v
    };
    let per_column = |a: &[f32], b: &[f32]| {
        let mut s = vec![0f64; n];
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            s[i % n] += *x as f64 * *y as f64;
        }
        s
    };
    let precondition = |r: &[f32]| -> Vec<f32> { r.iter().enumerate().map(|(i, &v)| v / diag[i / n]).collect() };
    let mut x = w.to_vec();
    let d: Vec<f32> = t.iter().zip(&x).map(|(a, b)| a - b).collect();
    let mut r = masked(gemm.run(k, k, n, hf, &d)?);
    let mut z = precondition(&r);
    let mut p = z.clone();
    let mut rz = per_column(&r, &z);
    for _ in 0..iters {
        let q = masked(gemm.run(k, k, n, hf, &p)?);
        let pq = per_column(&p, &q);
        let alpha: Vec<f32> = (0..n).map(|c| if pq[c] > 0.0 { (rz[c] / pq[c]) as f32 } else { 0.0 }).collect();
        for i in 0..k * n {
            x[i] += alpha[i % n] * p[i];
            r[i] -= alpha[i % n] * q[i];
        }
        z = precondition(&r);
        let rz2 = per_column(&r, &z);
        for i in 0..k * n {
            let c = i % n;
            let beta = if rz[c] > 0.0 { (rz2[c] / rz[c]) as f32 } else { 0.0 };
            p[i] = z[i] + beta * p[i];
        }
        rz = rz2;
    }
    Ok(masked(x))
}

/// `tr(D^T H D) / tr(W^T H W)` for `D = w2 - w` (`k x n`): the relative change of the product's
/// output on inputs whose `X^T X / t` is `h` (`None`: the identity).
pub(crate) fn relative_error(
    gemm: &Gemm,
    h: Option<&[f64]>,
    w: &[f32],
    w2: &[f32],
    k: usize,
    n: usize,
) -> tcc_ir::Result<f64> {
    let d: Vec<f32> = w2.iter().zip(w).map(|(a, b)| a - b).collect();
    let quad = |m: &[f32]| -> tcc_ir::Result<f64> {
        Ok(match h {
            Some(h) => {
                let hf: Vec<f32> = h.iter().map(|&v| v as f32).collect();
                let hm = gemm.run(k, k, n, &hf, m)?;
                hm.iter().zip(m).map(|(a, b)| *a as f64 * *b as f64).sum()
            }
            None => m.iter().map(|&v| v as f64 * v as f64).sum(),
        })
    };
    Ok(quad(&d)? / quad(w)?.max(1e-300))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64) -> impl FnMut() -> f64 {
        let mut s = seed;
        move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        }
    }

    /// Correlated inputs (as a layer's are): `x = z A` for random `z` and a mixing `A`.
    fn inputs(t: usize, k: usize, seed: u64) -> Vec<f64> {
        let mut r = lcg(seed);
        let a: Vec<f64> = (0..k * k).map(|_| r()).collect();
        let z: Vec<f64> = (0..t * k).map(|_| r()).collect();
        let mut x = vec![0f64; t * k];
        for i in 0..t {
            for j in 0..k {
                x[i * k + j] = (0..k).map(|p| z[i * k + p] * a[p * k + j] * if p < k / 4 { 4.0 } else { 0.3 }).sum();
            }
        }
        x
    }

    fn hessian(x: &[f64], t: usize, k: usize) -> Vec<f64> {
        let mut h = vec![0f64; k * k];
        for i in 0..k {
            for j in 0..k {
                h[i * k + j] = (0..t).map(|r| x[r * k + i] * x[r * k + j]).sum::<f64>() / t as f64;
            }
        }
        h
    }

    fn output_error(x: &[f64], t: usize, k: usize, n: usize, w: &[f32], w2: &[f32]) -> f64 {
        let (mut num, mut den) = (0.0, 0.0);
        for r in 0..t {
            for c in 0..n {
                let y: f64 = (0..k).map(|p| x[r * k + p] * w[p * n + c] as f64).sum();
                let y2: f64 = (0..k).map(|p| x[r * k + p] * w2[p * n + c] as f64).sum();
                num += (y - y2) * (y - y2);
                den += y * y;
            }
        }
        num / den
    }

    /// The kernels' blocks counted as they skip them: whole 64x32 blocks and the edges'
    /// partial ones, a single nonzero weight keeping its block.
    #[test]
    fn zero_blocks_are_counted_as_the_kernels_skip_them() {
        let (k, n) = (150, 70); // 3 x 3 blocks, the last row and column of them partial
        let mut w = vec![0f32; k * n];
        assert_eq!(zero_blocks(&w, k, n), (9, 9));
        w[0] = 1.0; // block (0, 0)
        w[149 * n + 69] = -2.0; // the corner block (2, 2)
        w[70 * n + 40] = 3.0; // block (1, 1)
        assert_eq!(zero_blocks(&w, k, n), (6, 9));
        w[63 * n + 31] = 4.0; // block (0, 0) again
        assert_eq!(zero_blocks(&w, k, n), (6, 9));
        w[64 * n + 32] = 5.0; // block (1, 1) again
        w[128 * n + 64] = 6.0; // block (2, 2) again
        w[0] = 0.0;
        w[63 * n + 31] = 0.0;
        assert_eq!(zero_blocks(&w, k, n), (7, 9));
    }

    #[test]
    fn patterns_hold_and_reconstruction_beats_magnitude() {
        let (t, k, n) = (400, 128, 64);
        let x = inputs(t, k, 1);
        let h = hessian(&x, t, k);
        let mut r = lcg(2);
        let w: Vec<f32> = (0..k * n).map(|_| r() as f32).collect();
        for pattern in [
            Pattern::Unstructured,
            Pattern::NM { n: 2, m: 4 },
            Pattern::Block { rows: 64, cols: 32 },
            Pattern::Block { rows: 16, cols: 16 },
        ] {
            let fraction = if let Pattern::NM { n: a, m } = pattern { 1.0 - a as f64 / m as f64 } else { 0.5 };
            let plain = sparsegpt(&w, k, n, &Factor::new(None, k), pattern, fraction);
            let fit = sparsegpt(&w, k, n, &Factor::new(Some(&h), k), pattern, fraction);
            let rel = relative_error(&Gemm::new().unwrap(), Some(&h), &w, &fit, k, n).unwrap();
            for s in [&plain, &fit] {
                let zeros = s.iter().filter(|&&v| v == 0.0).count() as f64 / (k * n) as f64;
                assert!((zeros - fraction).abs() < 0.02, "{pattern}: {zeros} zero");
                match pattern {
                    Pattern::NM { n: a, m } => {
                        for c in 0..n {
                            for g in (0..k).step_by(m) {
                                let kept = (g..g + m).filter(|&q| s[q * n + c] != 0.0).count();
                                assert!(kept <= a, "{pattern}: column {c} rows {g}.. keep {kept}");
                            }
                        }
                    }
                    Pattern::Block { rows, cols } => {
                        for bi in (0..k).step_by(rows) {
                            for bj in (0..n).step_by(cols) {
                                let z: Vec<bool> = (bi..bi + rows)
                                    .flat_map(|q| (bj..bj + cols).map(move |c| (q, c)))
                                    .map(|(q, c)| s[q * n + c] == 0.0)
                                    .collect();
                                assert!(z.iter().all(|&b| b) || z.iter().all(|&b| !b), "{pattern}: a block half zero");
                            }
                        }
                    }
                    Pattern::Unstructured => {}
                }
            }
            // Magnitude alone removes the smallest weights; the reconstruction makes up for them.
            let (e_plain, e_fit) = (output_error(&x, t, k, n, &w, &plain), output_error(&x, t, k, n, &w, &fit));
            assert!(e_fit < 0.7 * e_plain, "{pattern}: reconstructed {e_fit} vs magnitude {e_plain}");
            assert!((rel - e_fit).abs() < 1e-3 * e_fit, "{pattern}: reported {rel}, measured {e_fit}");
            // The joint refit keeps the mask and lowers the error further.
            let refit = refit_kept(&Gemm::new().unwrap(), &ridged_f32(&h, k), &w, &fit, k, n, 20).unwrap();
            assert!(refit.iter().zip(&fit).all(|(a, b)| (*a == 0.0) == (*b == 0.0)), "{pattern}: the mask moved");
            let e_refit = output_error(&x, t, k, n, &w, &refit);
            eprintln!("{pattern}: output error magnitude {e_plain:.4}, SparseGPT {e_fit:.4}, refit {e_refit:.4}");
            assert!(e_refit < 0.97 * e_fit, "{pattern}: refit {e_refit} vs SparseGPT {e_fit}");
        }
    }

    #[test]
    fn attention_and_the_first_layers_lose_more_and_the_total_holds() {
        // Two BERT layers' products: Q, K, V (one stage), output, FFN up, FFN down.
        let sizes = [589_824, 589_824, 589_824, 589_824, 2_359_296, 2_359_296];
        let stage = [0, 0, 0, 1, 2, 3];
        let products: Vec<Share> = (0..12)
            .map(|i| Share {
                weights: sizes[i % 6],
                attention: i % 6 < 4,
                depth: (stage[i % 6] + 4 * (i / 6)) as f64 / 7.0,
            })
            .collect();
        let zero = |f: &[f64]| products.iter().zip(f).map(|(p, f)| p.weights as f64 * f).sum::<f64>() / 14_155_776.0;
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        let f = shares(&products, 0.5, 0.8, 0.0);
        assert!(close(f[0], 0.4) && close(f[4], 0.55) && close(f[10], 0.55), "{f:?}");
        assert!(close(zero(&f), 0.5));
        assert_eq!(shares(&products, 0.5, 1.0, 0.0), vec![0.5; 12]);
        // With depth: deeper loses less on each side; each side's total and the total hold.
        let f = shares(&products, 0.5, 0.8, 0.3);
        assert!(f[0] > f[3] && f[3] > f[9] && f[4] > f[5] && f[5] > f[10] && f[10] > f[11], "{f:?}");
        assert!(close(kind_fraction(&products, &f, true), 0.4) && close(zero(&f), 0.5), "{f:?}");
        // 95%: the FFN cannot take what attention leaves (at most 0.99), attention takes the rest.
        let f = shares(&products, 0.95, 0.5, 0.3);
        assert!(f.iter().all(|&x| x <= MOST) && close(zero(&f), 0.95) && f[0] > 0.475, "{f:?}");
        // No attention block (or nothing else): every product the same.
        assert_eq!(shares(&products[4..6], 0.5, 0.8, 0.0), vec![0.5; 2]);
    }

    #[test]
    fn the_fraction_holds_over_the_groups_not_per_group() {
        // Two groups of 64 rows, two 64 x 32 blocks each: 75% is 1.5 blocks a group, three in
        // all (each group rounding its own 1.5 up would zero all four).
        let (k, n) = (128, 64);
        let mut r = lcg(3);
        let w: Vec<f32> = (0..k * n).map(|_| r() as f32 + 0.1).collect();
        let s = sparsegpt(&w, k, n, &Factor::new(None, k), Pattern::Block { rows: 64, cols: 32 }, 0.75);
        assert_eq!(s.iter().filter(|&&v| v == 0.0).count(), 3 * 64 * 32);
    }

    #[test]
    fn patterns_parse_and_bad_ones_say_why() {
        assert_eq!(Pattern::parse("block:64x32"), Ok(Pattern::Block { rows: 64, cols: 32 }));
        assert_eq!(Pattern::parse("2:4"), Ok(Pattern::NM { n: 2, m: 4 }));
        assert_eq!(Pattern::parse("unstructured"), Ok(Pattern::Unstructured));
        for bad in ["block:0x4", "block:48x32", "4:2", "2:3", "blocks", "1:0"] {
            assert!(Pattern::parse(bad).unwrap_err().contains(bad), "{bad}");
        }
        for p in [Pattern::Unstructured, Pattern::NM { n: 1, m: 4 }, Pattern::FASTEST] {
            assert_eq!(Pattern::parse(&p.to_string()), Ok(p));
        }
    }
}

//! `prune`: structured pruning without retraining. Attention heads and FFN neurons go, the
//! matrices around them shrink, and the kernels run on the smaller shapes.
//!
//! The pass finds each layer's blocks in the fused graph: an attention block is an `Attention`
//! whose Q, K and V are `Reshape`s of products by packed weights (three, or onnxruntime's one
//! QKV product `Split` in three) and whose context, reshaped back, is the input of the output
//! projection; an FFN block is a product by packed weights
//! whose element-wise epilogue (bias, GELU) feeds only the next product.
//!
//! **Importance, without labels or gradients.** One run over the calibration samples captures
//! the inputs of the output projections (`X`, rows of tokens). A head's contribution to the
//! block's output is `X_h W_h` (its `d` columns of the context by its `d` rows of the
//! projection), scored by its mean squared norm, `trace(W_h W_h^T E[x_h x_h^T])`. FFN neurons
//! are many and redundant: they go in Optimal Brain Surgeon order ([`obs_order`]), greedily, each
//! step the neurons whose loss the others can best make up for, at the cost that adds to the
//! block's output error. Both are relative to the block output's norm (residual included), so
//! they compare across layers. The lowest go, over the whole model (`spread=global`, the
//! default), or the same share of each layer (`spread=uniform`).
//!
//! **Correction.** The kept inputs then refit the projection by least squares on the same
//! tokens, `W' = argmin E|x_k W' - x W|^2 + lambda |W' - W_k|^2` on centered inputs (on the
//! runtime's GEMM, solved by Cholesky), with the
//! mean of what the removed ones contributed moved into the bias (the mask tuning of Kwon et
//! al. 2022, in closed form): the pruned layer tracks the full one on real activations.
//!
//! **Removal.** Q, K and V lose the columns of removed heads (and their biases), the output
//! projection their rows; the first FFN product loses columns, the second rows. `Reshape`s to
//! `[.., -1, d]` and `[.., -1]` follow by themselves; explicit head counts are rewritten. A layer
//! left with no head keeps only its output projection's bias on the residual.

use crate::manager::{option_in, Calibrator, Pass, PassContext, PassOutcome};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use tcc_ir::op::{BinaryKind, EpiOp, FusedMatMul};
use tcc_ir::{Dim, Graph, Op, Tensor, ValueId};
use tcc_runtime::kernels;

/// `fn NAME => BODY(args) -> R`: `NAME(args)` runs `BODY` (an `#[inline(always)]` fn) compiled
/// for AVX-512F where [`wider`], for AVX2 and FMA where [`wide`], plain elsewhere: the same
/// operations, so the same bits, only wider.
macro_rules! lane_builds {
    ($(#[$doc:meta])* $vis:vis fn $name:ident => $body:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                /// # Safety
                /// The CPU has AVX-512F, AVX2 and FMA ([`wider`]).
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                /// # Safety
                /// The CPU has AVX2 and FMA ([`wide`]).
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if wider() {
                    // SAFETY: the CPU has AVX-512F, AVX2 and FMA.
                    return unsafe { avx512($($arg),*) };
                }
                if wide() {
                    // SAFETY: the CPU has AVX2 and FMA.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

/// Which heads go.
#[derive(Clone, Debug, PartialEq)]
pub enum HeadChoice {
    /// This fraction of all heads, the least important by calibration.
    Fraction(f64),
    /// These `(layer, head)` pairs (layers numbered from 0 in graph order).
    Named(BTreeSet<(usize, usize)>),
}

/// The `prune` pass.
#[derive(Clone, Debug, PartialEq)]
pub struct Prune {
    pub heads: Option<HeadChoice>,
    /// Whole layers to remove.
    pub layers: Option<LayerChoice>,
    /// The fraction of all FFN intermediate neurons to remove.
    pub ffn: f64,
    /// Calibration tokens captured at most (rows of the captured activations).
    pub max_rows: usize,
    pub spread: Spread,
}

impl Default for Prune {
    fn default() -> Self {
        Prune { heads: None, layers: None, ffn: 0.0, max_rows: 8192, spread: Spread::Global }
    }
}

/// Which layers go.
#[derive(Clone, Debug, PartialEq)]
pub enum LayerChoice {
    /// This many, those whose removal alone changes the calibration outputs least.
    Count(usize),
    /// These layers (numbered from 0 in graph order).
    Named(BTreeSet<usize>),
}

/// A layer spec: a count (`2`) or named layers (`l3+l5`).
pub fn parse_layers(s: &str) -> Result<LayerChoice, String> {
    if let Ok(n) = s.parse::<usize>() {
        return Ok(LayerChoice::Count(n));
    }
    s.split(['+', ' '])
        .filter(|t| !t.is_empty())
        .map(|t| t.trim().strip_prefix('l').and_then(|l| l.parse().ok()).ok_or(t))
        .collect::<Result<BTreeSet<usize>, _>>()
        .map(LayerChoice::Named)
        .map_err(|bad| format!("layers={s}: `{bad}` is neither a count nor a layer like l3"))
}

/// A head spec, `l0h1+l0h3+l2h5` (layer 0 heads 1 and 3, layer 2 head 5), or a fraction.
pub fn parse_heads(s: &str) -> Result<HeadChoice, String> {
    if let Ok(f) = s.parse::<f64>() {
        return if (0.0..1.0).contains(&f) {
            Ok(HeadChoice::Fraction(f))
        } else {
            Err(format!("heads={s}: a fraction must be in [0, 1)"))
        };
    }
    let item = |t: &str| -> Option<(usize, usize)> {
        let (l, h) = t.trim().strip_prefix('l')?.split_once('h')?;
        Some((l.parse().ok()?, h.parse().ok()?))
    };
    s.split(['+', ' '])
        .filter(|t| !t.is_empty())
        .map(|t| item(t).ok_or(t))
        .collect::<Result<BTreeSet<_>, _>>()
        .map_or_else(
            |bad| Err(format!("heads={s}: `{bad}` is neither a fraction nor a head like l0h3 (layer 0, head 3)")),
            |set| Ok(HeadChoice::Named(set)),
        )
}

impl Prune {
    /// The pass with its options as pipeline text (`prune{heads=0.25, ffn=0.25}`).
    pub fn pipeline_text(&self) -> String {
        let mut o = Vec::new();
        match &self.heads {
            Some(HeadChoice::Fraction(f)) => o.push(format!("heads={f}")),
            Some(HeadChoice::Named(set)) => {
                o.push(format!("heads={}", set.iter().map(|(l, h)| format!("l{l}h{h}")).collect::<Vec<_>>().join("+")))
            }
            None => {}
        }
        match &self.layers {
            Some(LayerChoice::Count(n)) => o.push(format!("layers={n}")),
            Some(LayerChoice::Named(set)) => {
                o.push(format!("layers={}", set.iter().map(|l| format!("l{l}")).collect::<Vec<_>>().join("+")))
            }
            None => {}
        }
        if self.ffn > 0.0 {
            o.push(format!("ffn={}", self.ffn));
        }
        if self.spread == Spread::Uniform {
            o.push("spread=uniform".into());
        }
        if self.max_rows != Prune::default().max_rows {
            o.push(format!("rows={}", self.max_rows));
        }
        format!("prune{{{}}}", o.join(", "))
    }

    /// From pipeline options: `heads=F|SPEC` (see [`parse_heads`]), `ffn=F`, `rows=N`.
    pub fn from_options(o: &BTreeMap<String, String>) -> Result<Prune, String> {
        let mut p = Prune::default();
        for (k, v) in o {
            match k.as_str() {
                "heads" => p.heads = Some(parse_heads(v)?),
                "layers" => p.layers = Some(parse_layers(v).map_err(|e| format!("prune: {e}"))?),
                "ffn" => p.ffn = option_in("prune", (k, v), 0.0..1.0, "a fraction in [0, 1)")?,
                "spread" => {
                    p.spread = match v.as_str() {
                        "uniform" => Spread::Uniform,
                        "global" => Spread::Global,
                        _ => return Err(format!("prune: spread={v}: expected uniform or global")),
                    }
                }
                "rows" => p.max_rows = option_in("prune", (k, v), 1.., "at least 1")?,
                other => {
                    return Err(format!("prune: unknown option `{other}` (known: heads, layers, ffn, spread, rows)"))
                }
            }
        }
        Ok(p)
    }
}

/// A product by constant packed f32 weights: node index, `[k, n]`, the dense weights, and which
/// extra inputs are per-column constants (sliced with the columns) and which one is the bias
/// (`acc + bias` first in the epilogue).
#[derive(Clone)]
pub(crate) struct Linear {
    pub(crate) node: usize,
    pub(crate) k: usize,
    pub(crate) n: usize,
    pub(crate) w: Vec<f32>,
    per_column: Vec<bool>,
    bias: Option<usize>,
}

pub(crate) fn linear(g: &Graph, node: usize) -> Option<Linear> {
    let nd = &g.nodes[node];
    let Op::FusedMatMul(f) = &nd.op else { return None };
    let [k, n] = f.packed?;
    if f.int8.is_some() || f.a_perm.is_some() || f.c_perm.is_some() {
        return None;
    }
    let b = g.const_of(nd.inputs.get(1).copied().flatten()?)?;
    let w = kernels::unpack_b(k, n, b.as_slice::<f32>().ok()?);
    let per_column = (0..f.extra)
        .map(|i| {
            let v = nd.inputs.get(2 + i).copied().flatten();
            v.and_then(|v| g.const_of(v)).is_some_and(|t| t.len() == n && t.shape().last() == Some(&n))
        })
        .collect::<Vec<_>>();
    let (added, _) = additions(&f.epilogue.0);
    let bias = added.into_iter().find(|&i| per_column.get(i) == Some(&true));
    Some(Linear { node, k, n, w, per_column, bias })
}

/// The extra inputs an epilogue adds to the product before anything else (`acc + a + b ...`,
/// in any order of operands), and how many instructions that prefix takes: a constant among
/// them is a bias (anything added to `acc` there may as well be added to it).
fn additions(prog: &[EpiOp]) -> (Vec<usize>, usize) {
    let mut added = Vec::new();
    if !matches!(prog.first(), Some(EpiOp::Acc)) {
        return (added, 0);
    }
    let (mut chain, mut at) = (0, 1);
    while let (Some(EpiOp::Input(i)), Some(EpiOp::Binary(BinaryKind::Add, x, y))) = (prog.get(at), prog.get(at + 1)) {
        if !matches!((*x, *y), (a, b) if (a, b) == (chain, at) || (a, b) == (at, chain)) {
            break;
        }
        added.push(*i);
        chain = at + 1;
        at += 2;
    }
    (added, at)
}

/// An attention block: Q/K/V products (three, or one split in three as onnxruntime's fused
/// `Attention` has them), their reshapes, the attention, the reshape back and the output
/// projection.
struct HeadBlock {
    qkv: Qkv,
    reshapes: [usize; 3],
    attention: usize,
    merge: usize,
    out: Linear,
    heads: usize,
    d: usize,
}

enum Qkv {
    Separate([Linear; 3]),
    /// One product whose columns are Q, K and V, and the `Split` node after it.
    Fused(Linear, usize),
}

impl Qkv {
    fn input_width(&self) -> usize {
        match self {
            Qkv::Separate(l) => l[0].k,
            Qkv::Fused(l, _) => l.k,
        }
    }

    fn first(&self) -> &Linear {
        match self {
            Qkv::Separate(l) => &l[0],
            Qkv::Fused(l, _) => l,
        }
    }
}

/// An FFN block: the first product (columns = neurons) and the second (rows = neurons).
struct FfnBlock {
    up: Linear,
    down: Linear,
}

fn sole_user(users: &HashMap<ValueId, Vec<usize>>, g: &Graph, v: ValueId) -> Option<usize> {
    match users.get(&v).map(Vec::as_slice) {
        Some(&[u]) if !g.outputs.iter().any(|o| o.value == v) => Some(u),
        _ => None,
    }
}

fn const_dim(d: &Dim) -> Option<usize> {
    d.as_const().and_then(|v| usize::try_from(v).ok())
}

fn head_blocks(g: &Graph) -> Vec<HeadBlock> {
    let (producers, users) = (g.producers(), g.users());
    let mut out = Vec::new();
    for (a, nd) in g.nodes.iter().enumerate() {
        let Op::Attention(_) = nd.op else { continue };
        let found = (|| {
            let mut sources = Vec::new();
            let mut reshapes = [0; 3];
            for (i, r) in reshapes.iter_mut().enumerate() {
                let v = nd.inputs.get(i).copied().flatten()?;
                let &(rn, _) = producers.get(&v)?;
                let Op::Reshape(_) = g.nodes[rn].op else { return None };
                let src = g.nodes[rn].inputs.first().copied().flatten()?;
                sole_user(&users, g, src)?;
                sources.push(*producers.get(&src)?);
                *r = rn;
            }
            let qkv = match *sources.as_slice() {
                // One `Split` of one product, its outputs 0, 1, 2 in order, equal constant sizes.
                [(s0, 0), (s1, 1), (s2, 2)] if s0 == s1 && s1 == s2 && matches!(g.nodes[s0].op, Op::Split(_)) => {
                    let x = g.nodes[s0].inputs.first().copied().flatten()?;
                    let &(pn, _) = producers.get(&x)?;
                    sole_user(&users, g, x)?;
                    let sizes = g.const_of(g.nodes[s0].inputs.get(1).copied().flatten()?)?.to_i64s().ok()?;
                    let l = linear(g, pn)?;
                    let third = (l.n / 3) as i64;
                    (sizes.len() == 3 && sizes.iter().all(|&z| z == third) && l.n % 3 == 0)
                        .then_some(Qkv::Fused(l, s0))?
                }
                [(p0, 0), (p1, 0), (p2, 0)] => Qkv::Separate([linear(g, p0)?, linear(g, p1)?, linear(g, p2)?]),
                _ => return None,
            };
            let ctx = nd.outputs[0];
            let shape = &g.fact(ctx).shape;
            let (heads, d) = (const_dim(shape.get(shape.len().checked_sub(2)?)?)?, const_dim(shape.last()?)?);
            let merge = sole_user(&users, g, ctx)?;
            let Op::Reshape(_) = g.nodes[merge].op else { return None };
            let o = sole_user(&users, g, g.nodes[merge].outputs[0])?;
            if g.nodes[o].inputs.first().copied().flatten()? != g.nodes[merge].outputs[0] {
                return None;
            }
            let out = linear(g, o)?;
            let fits = out.k == heads * d
                && match &qkv {
                    Qkv::Separate(l) => l.iter().all(|l| l.n == heads * d && l.per_column.iter().all(|&c| c)),
                    Qkv::Fused(l, _) => l.n == 3 * heads * d && l.per_column.iter().all(|&c| c),
                };
            fits.then_some(HeadBlock { qkv, reshapes, attention: a, merge, out, heads, d })
        })();
        out.extend(found);
    }
    out
}

/// The nodes of the products of the graph's attention blocks (Q, K, V and the output
/// projection), as [`head_blocks`] finds them.
pub(crate) fn attention_products(g: &Graph) -> HashSet<usize> {
    let mut nodes = HashSet::new();
    for b in head_blocks(g) {
        match &b.qkv {
            Qkv::Separate(l) => nodes.extend(l.iter().map(|l| l.node)),
            Qkv::Fused(l, _) => {
                nodes.insert(l.node);
            }
        }
        nodes.insert(b.out.node);
    }
    nodes
}

fn ffn_blocks(g: &Graph) -> Vec<FfnBlock> {
    let users = g.users();
    // `[k, n]` of a float product by packed weights (read before unpacking any weights).
    let dims = |n: usize| match &g.nodes[n].op {
        Op::FusedMatMul(f) if f.int8.is_none() => f.packed,
        _ => None,
    };
    let mut out = Vec::new();
    for n in 0..g.nodes.len() {
        let Some([k, wide]) = dims(n) else { continue };
        let h = g.nodes[n].outputs[0];
        let Some(next) = sole_user(&users, g, h) else { continue };
        // An expansion and the projection back (not a pooler feeding a classifier), reading it
        // as its A.
        let back = dims(next) == Some([wide, k]) && wide > k;
        if !back || g.nodes[next].inputs.first().copied().flatten() != Some(h) {
            continue;
        }
        let (Some(up), Some(down)) = (linear(g, n), linear(g, next)) else { continue };
        if up.per_column.iter().all(|&c| c) {
            out.push(FfnBlock { up, down });
        }
    }
    out
}

/// Products of the refit, on the runtime's GEMM (one thread): `a` (`m x k`) times `b`
/// (`k x n`), both row-major.
pub(crate) struct Gemm(tcc_runtime::jit::Jit);

impl Gemm {
    pub(crate) fn new() -> tcc_ir::Result<Gemm> {
        tcc_runtime::jit::Jit::new(tcc_runtime::kernels::Tier::detect(), &[]).map(Gemm).map_err(tcc_ir::Error::Runtime)
    }

    pub(crate) fn run(&self, m: usize, k: usize, n: usize, a: &[f32], b: &[f32]) -> tcc_ir::Result<Vec<f32>> {
        let mut c = vec![0f32; m * n];
        if m * n > 0 && k > 0 {
            let packed = kernels::pack_b(k, n, b);
            self.0.gemm_single_thread(m, k, n, a, &packed, &mut c).map_err(tcc_ir::Error::Runtime)?;
        }
        Ok(c)
    }
}

/// `f(item)` for every item, on all cores (each thread its own stride of the items), in the
/// items' order.
pub(crate) fn on_threads<T: Send>(
    items: &[usize],
    f: impl Fn(usize) -> tcc_ir::Result<T> + Sync,
) -> tcc_ir::Result<Vec<T>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(items.len()).max(1);
    let mut slots: Vec<Option<T>> = (0..items.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    (t..items.len())
                        .step_by(threads)
                        .map(|j| f(items[j]).map(|r| (j, r)))
                        .collect::<tcc_ir::Result<Vec<_>>>()
                })
            })
            .collect();
        for h in handles {
            let done = h.join().map_err(|_| tcc_ir::Error::Pass("a worker thread panicked".into()))??;
            for (j, r) in done {
                slots[j] = Some(r);
            }
        }
        Ok::<_, tcc_ir::Error>(())
    })?;
    Ok(slots.into_iter().flatten().collect())
}

/// What `values` held on the calibration samples, checked to be what [`Calibrator::capture`]
/// promises (a calibrator of a user's could answer anything): one `[rows, features]` f32 tensor
/// per value.
pub(crate) fn captured(
    c: &dyn Calibrator,
    g: &Graph,
    values: &[ValueId],
    max_rows: usize,
) -> tcc_ir::Result<Vec<Tensor>> {
    let t = c.capture(g, values, max_rows).map_err(tcc_ir::Error::Calibration)?;
    let ok = t.len() == values.len() && t.iter().all(|x| x.rank() == 2 && x.as_slice::<f32>().is_ok());
    if !ok {
        return Err(tcc_ir::Error::Calibration(format!(
            "the calibrator gave {} tensors for {} values, or not [rows, features] f32 ones",
            t.len(),
            values.len()
        )));
    }
    Ok(t)
}

/// `[t, k]` captured rows as `[k, t]` columns, with the column means.
fn columns_of(x: &Tensor) -> tcc_ir::Result<(Vec<f32>, Vec<f64>, usize, usize)> {
    let (t, k) = (x.shape()[0], x.shape()[1]);
    let v = x.as_slice::<f32>().map_err(tcc_ir::Error::Runtime)?;
    let mut xt = vec![0f32; k * t];
    for (r, row) in v.chunks(k).enumerate() {
        for (j, &e) in row.iter().enumerate() {
            xt[j * t + r] = e;
        }
    }
    let mean = xt.chunks(t.max(1)).map(|c| c.iter().map(|&e| e as f64).sum::<f64>() / t.max(1) as f64).collect();
    Ok((xt, mean, t, k))
}

/// `sum a_i b_i` in eight independent lanes (so that it vectorizes).
#[inline(always)]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Mean squared norm of the rows of a captured `[t, n]` tensor.
fn mean_sq(y: &Tensor) -> f64 {
    let t = y.shape()[0].max(1);
    y.as_slice::<f32>().map(|v| v.iter().map(|&e| (e as f64) * (e as f64)).sum::<f64>() / t as f64).unwrap_or(0.0)
}

/// Importance of groups of input rows of `w` (`k x n`) on captured inputs `x` (`[t, k]`): the
/// mean squared norm of the group's contribution to the product, `trace(W_g^T E[x_g x_g^T] W_g)`.
/// (Measured on MiniLM-L6's heads: better choices than the centered contribution, and than the
/// error left after an optimal refit, Optimal Brain Surgeon's score, single or greedy: 25% of
/// heads, held-out cosine 0.982 against 0.966 greedy. For FFN neurons it is the other way round:
/// see [`obs_order`].)
fn group_scores(x: &Tensor, w: &[f32], n: usize, groups: &[Vec<usize>]) -> tcc_ir::Result<Vec<f64>> {
    let (xt, _, t, _) = columns_of(x)?;
    let col = |j: usize| -> Vec<f64> { xt[j * t..(j + 1) * t].iter().map(|&e| e as f64).collect() };
    Ok(groups
        .iter()
        .map(|rows| {
            let cols: Vec<Vec<f64>> = rows.iter().map(|&j| col(j)).collect();
            let mut s = 0.0;
            for (a, &i) in rows.iter().enumerate() {
                for (b, &j) in rows.iter().enumerate() {
                    let cov = dot(&cols[a], &cols[b]) / t.max(1) as f64;
                    let ww: f64 = (0..n).map(|c| w[i * n + c] as f64 * w[j * n + c] as f64).sum();
                    s += cov * ww;
                }
            }
            s
        })
        .collect())
}

/// Relative ridge of the covariance that [`obs_order`] ranks FFN neurons with (MiniLM-L6, 25% of
/// its FFN neurons, held-out cosine: 0.9675 / 0.9678 / 0.9673 / 0.9672 / 0.9608 at 0.001 /
/// 0.003 / 0.01 / 0.03 / 0.3, a plateau; 0.9593 by contribution).
const OBS_RIDGE: f64 = 0.01;

/// Neurons [`obs_order`] removes per step.
const OBS_BLOCK: usize = 16;

/// The Optimal Brain Surgeon order of removal of up to `most` input rows of `w` (`k x n`, an
/// FFN's down-projection) on captured inputs `x` (`[t, k]`), greedily in blocks: each step
/// removes the [`OBS_BLOCK`] rows whose loss adds least to `E|x W - x' W'|^2` once the other
/// rows absorb what they can of it (`|w_j|^2 / [H^-1]_jj`, `H` the centered input covariance
/// plus a ridge), then updates the weights and `H^-1` as the refit would. Returns `(row,
/// increase)` in removal order. Unlike each neuron's own contribution, this sees redundancy:
/// a neuron whose output others can rebuild goes first.
fn obs_order(gemm: &Gemm, x: &Tensor, w: &[f32], n: usize, most: usize) -> tcc_ir::Result<Vec<(usize, f64)>> {
    let (xt, mu, t, k) = columns_of(x)?;
    if t == 0 || k * n != w.len() {
        return Ok(Vec::new());
    }
    let x_rows = x.as_slice::<f32>().map_err(tcc_ir::Error::Runtime)?;
    let xx = gemm.run(k, t, k, &xt, x_rows)?;
    let tf = t as f64;
    let mut h: Vec<f64> = (0..k * k).map(|i| xx[i] as f64 / tf - mu[i / k] * mu[i % k]).collect();
    let lambda = OBS_RIDGE * ((0..k).map(|r| h[r * k + r]).sum::<f64>() / k as f64).max(1e-12);
    for r in 0..k {
        h[r * k + r] += lambda;
    }
    let Some(mut hinv) = inverse_spd(h, k) else { return Ok(Vec::new()) };
    let mut wd: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    // Rows still in, as indices of the original ones; `hinv` (a x a) and `wd` (a x n) hold
    // only theirs.
    let mut idx: Vec<usize> = (0..k).collect();
    let mut order = Vec::with_capacity(most);
    while order.len() < most.min(k) {
        let a = idx.len();
        let mut scored: Vec<(f64, usize)> = (0..a)
            .map(|p| {
                let row = &wd[p * n..(p + 1) * n];
                (dot(row, row) / hinv[p * a + p].max(1e-300), p)
            })
            .collect();
        let b = OBS_BLOCK.min(most - order.len()).min(a);
        scored.select_nth_unstable_by(b - 1, |x, y| x.0.total_cmp(&y.0));
        let mut group: Vec<(f64, usize)> = scored[..b].to_vec();
        group.sort_by(|x, y| x.0.total_cmp(&y.0));
        let g: Vec<usize> = group.iter().map(|e| e.1).collect();
        // S = [H^-1]_gg^-1 W_g (b x n), T = [H^-1]_gg^-1 [H^-1]_g: (b x a); the block's loss tr(W_g^T S).
        let hgg: Vec<f64> =
            g.iter().flat_map(|&p| g.iter().map(move |&q| (p, q))).map(|(p, q)| hinv[p * a + q]).collect();
        let wg: Vec<f64> = g.iter().flat_map(|&p| wd[p * n..(p + 1) * n].iter().copied()).collect();
        let hg: Vec<f64> = g.iter().flat_map(|&p| hinv[p * a..(p + 1) * a].iter().copied()).collect();
        let (Some(sm), Some(tm)) = (solve_spd(hgg.clone(), wg.clone(), b, n), solve_spd(hgg, hg.clone(), b, a)) else {
            break;
        };
        let loss = dot(&wg, &sm);
        order.extend(group.iter().map(|&(_, p)| (idx[p], loss / b as f64)));
        // W -= H^-1[:, g] S, H^-1 -= H^-1[:, g] T (H^-1 symmetric: column g is row g).
        downdate(&mut wd, &hg, &sm, n, a);
        downdate(&mut hinv, &hg, &tm, a, a);
        // Drop the block's rows and columns.
        // In place: each element moves to an index no greater than its own, read in order.
        let keep: Vec<usize> = (0..a).filter(|p| !g.contains(p)).collect();
        let m = keep.len();
        for (r, &p) in keep.iter().enumerate() {
            for (c, &q) in keep.iter().enumerate() {
                hinv[r * m + c] = hinv[p * a + q];
            }
            wd.copy_within(p * n..(p + 1) * n, r * n);
        }
        hinv.truncate(m * m);
        wd.truncate(m * n);
        idx = keep.iter().map(|&p| idx[p]).collect();
    }
    Ok(order)
}

lane_builds! {
    /// `x -= u^T v` for `x` (`a x w`), `u` (`b x a`) and `v` (`b x w`), all row-major; a strip
    /// of 256 columns at a time, so that `v`'s part stays in cache over the rows.
    fn downdate => downdate_in(x: &mut [f64], u: &[f64], v: &[f64], w: usize, a: usize)
}

#[inline(always)]
fn downdate_in(x: &mut [f64], u: &[f64], v: &[f64], w: usize, a: usize) {
    for s0 in (0..w).step_by(256) {
        let s1 = (s0 + 256).min(w);
        for i in 0..a {
            let row = &mut x[i * w + s0..i * w + s1];
            for (r, vr) in v.chunks_exact(w).enumerate() {
                let f = u[r * a + i];
                if f != 0.0 {
                    for (x, y) in row.iter_mut().zip(&vr[s0..s1]) {
                        *x -= f * y;
                    }
                }
            }
        }
    }
}

/// How a fraction of heads or neurons is spread over the layers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Spread {
    /// The same fraction of each layer's (the least important within it).
    Uniform,
    /// The least important over the whole model, by scores relative to each block's output.
    Global,
}

/// The `(layer, item)`s to remove: `fraction` of the items, spread as `spread` says, by lowest
/// `(score, layer, item)`; each layer keeps a multiple of `align` items (giving back its most
/// important removed ones).
fn choose(
    mut all: Vec<(f64, usize, usize)>,
    sizes: &[usize],
    fraction: f64,
    spread: Spread,
    align: usize,
) -> BTreeSet<(usize, usize)> {
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut per_layer: Vec<Vec<usize>> = vec![Vec::new(); sizes.len()];
    match spread {
        Spread::Global => {
            let n = (fraction * sizes.iter().sum::<usize>() as f64).round() as usize;
            for &(_, l, j) in all.iter().take(n) {
                per_layer[l].push(j);
            }
        }
        Spread::Uniform => {
            for (l, &size) in sizes.iter().enumerate() {
                let n = (fraction * size as f64).round() as usize;
                per_layer[l].extend(all.iter().filter(|e| e.1 == l).take(n).map(|e| e.2));
            }
        }
    }
    let mut out = BTreeSet::new();
    for (l, mut removed) in per_layer.into_iter().enumerate() {
        let kept = sizes[l] - removed.len();
        let want = (kept.div_ceil(align) * align).min(sizes[l]);
        removed.truncate(sizes[l] - want);
        out.extend(removed.into_iter().map(|j| (l, j)));
    }
    out
}

/// Whether the CPU has AVX2 and FMA: the refit's and the neuron ranking's arithmetic then runs
/// four f64 lanes wide instead of two (the same operations, so the same bits: Rust never fuses
/// a product and a sum by itself).
fn wide() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the CPU has AVX-512F: the two heaviest loops then run eight lanes wide.
fn wider() -> bool {
    #[cfg(target_arch = "x86_64")]
    return wide() && std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Side of the blocks of [`inverse_spd`].
const NB: usize = 64;

lane_builds! {
    /// The inverse of a symmetric positive definite `k x k` matrix (row-major); `None` when it is
    /// not positive definite. A blocked Cholesky `A = L L^T`, then `Y = L^-1` and `A^-1 = Y^T Y`,
    /// each step on 64 x 64 blocks that stay in cache ([`solve_spd`] with the identity streams the
    /// whole matrix once per row: minutes for BERT-base's 3072 FFN neurons, against seconds).
    fn inverse_spd => inverse_spd_in(a: Vec<f64>, k: usize) -> Option<Vec<f64>>
}

lane_builds! {
    /// `L^-1` for the Cholesky factor `L` of a symmetric positive definite `k x k` matrix
    /// (`A = L L^T`; row-major, zeros above the diagonal); `None` when it is not positive definite.
    /// The first two steps of [`inverse_spd`].
    pub(crate) fn inverse_cholesky => inverse_cholesky_in(a: Vec<f64>, k: usize) -> Option<Vec<f64>>
}

#[inline(always)]
fn inverse_spd_in(a: Vec<f64>, k: usize) -> Option<Vec<f64>> {
    let y = inverse_cholesky_in(a, k)?;
    let blocks: Vec<(usize, usize)> = (0..k).step_by(NB).map(|s| (s, NB.min(k - s))).collect();
    let mut acc = vec![0f64; NB * NB];
    // A^-1 = Y^T Y, block (I, C) = sum over P >= max(I, C) of Y_PI^T Y_PC; C <= I, mirrored.
    let mut inv = vec![0f64; k * k];
    for (bi, &(i0, ni)) in blocks.iter().enumerate() {
        for &(c0, cn) in &blocks[..=bi] {
            acc[..ni * cn].fill(0.0);
            for p in i0..k {
                let (yp_i, yp_c) = (&y[p * k + i0..p * k + i0 + ni], &y[p * k + c0..p * k + c0 + cn]);
                for (r, &f) in yp_i.iter().enumerate() {
                    if f != 0.0 {
                        for (x, v) in acc[r * cn..(r + 1) * cn].iter_mut().zip(yp_c) {
                            *x += f * v;
                        }
                    }
                }
            }
            for r in 0..ni {
                for c in 0..cn {
                    let v = acc[r * cn + c];
                    inv[(i0 + r) * k + c0 + c] = v;
                    inv[(c0 + c) * k + i0 + r] = v;
                }
            }
        }
    }
    Some(inv)
}

#[inline(always)]
fn inverse_cholesky_in(mut a: Vec<f64>, k: usize) -> Option<Vec<f64>> {
    let blocks: Vec<(usize, usize)> = (0..k).step_by(NB).map(|s| (s, NB.min(k - s))).collect();
    // L in the lower triangle of `a`, right-looking: each block column factored row by row
    // (its rows' segments and the block's in L1), then the blocks below and right updated.
    for (bj, &(j0, jn)) in blocks.iter().enumerate() {
        for i in j0..k {
            for j in j0..(j0 + jn).min(i + 1) {
                let s = a[i * k + j] - dot(&a[i * k + j0..i * k + j], &a[j * k + j0..j * k + j]);
                if j == i {
                    if s <= 0.0 || !s.is_finite() {
                        return None;
                    }
                    a[i * k + i] = s.sqrt();
                } else {
                    a[i * k + j] = s / a[j * k + j];
                }
            }
        }
        // Block by block, so that the C block's row segments stay in L1 over the I block's rows.
        let mut li = [0f64; NB];
        for &(i0, ni) in &blocks[bj + 1..] {
            for &(c0, cn) in blocks[bj + 1..].iter().take_while(|b| b.0 <= i0) {
                for i in i0..i0 + ni {
                    li[..jn].copy_from_slice(&a[i * k + j0..i * k + j0 + jn]);
                    for c in c0..(c0 + cn).min(i + 1) {
                        let s = dot(&li[..jn], &a[c * k + j0..c * k + j0 + jn]);
                        a[i * k + c] -= s;
                    }
                }
            }
        }
    }
    // Y = L^-1 (lower triangular), a column block at a time: Y_IC = L_II^-1 (E_IC - sum over
    // C <= P < I of L_IP Y_PC).
    let mut y = vec![0f64; k * k];
    let mut acc = vec![0f64; NB * NB];
    for &(c0, cn) in &blocks {
        for &(i0, ni) in blocks.iter().filter(|b| b.0 >= c0) {
            acc[..ni * cn].fill(0.0);
            if i0 == c0 {
                for r in 0..ni {
                    acc[r * cn + r] = 1.0;
                }
            }
            for &(p0, pn) in blocks.iter().filter(|b| b.0 >= c0 && b.0 < i0) {
                for r in 0..ni {
                    let row = &mut acc[r * cn..(r + 1) * cn];
                    for p in p0..p0 + pn {
                        let f = a[(i0 + r) * k + p];
                        for (x, v) in row.iter_mut().zip(&y[p * k + c0..p * k + c0 + cn]) {
                            *x -= f * v;
                        }
                    }
                }
            }
            // Forward substitution with the diagonal block.
            for r in 0..ni {
                let (done, rest) = acc.split_at_mut(r * cn);
                let row = &mut rest[..cn];
                for q in 0..r {
                    let f = a[(i0 + r) * k + i0 + q];
                    for (x, v) in row.iter_mut().zip(&done[q * cn..(q + 1) * cn]) {
                        *x -= f * v;
                    }
                }
                let d = a[(i0 + r) * k + i0 + r];
                row.iter_mut().for_each(|x| *x /= d);
                y[(i0 + r) * k + c0..(i0 + r) * k + c0 + cn].copy_from_slice(row);
            }
        }
    }
    Some(y)
}

lane_builds! {
    /// Solves `A X = B` for symmetric positive definite `A` (`m x m`) and `B` (`m x n`), by
    /// Cholesky; `None` when `A` is not positive definite.
    pub(crate) fn solve_spd => solve_spd_in(a: Vec<f64>, b: Vec<f64>, m: usize, n: usize) -> Option<Vec<f64>>
}

#[inline(always)]
fn solve_spd_in(mut a: Vec<f64>, mut b: Vec<f64>, m: usize, n: usize) -> Option<Vec<f64>> {
    // A = L L^T, L in the lower triangle (row i holds L[i, 0..=i]).
    for j in 0..m {
        let rowj = &mut a[j * m..(j + 1) * m];
        let d = rowj[j] - dot(&rowj[..j], &rowj[..j]);
        if d <= 0.0 || !d.is_finite() {
            return None;
        }
        let d = d.sqrt();
        rowj[j] = d;
        for i in j + 1..m {
            let (top, bottom) = a.split_at_mut(i * m);
            let rowj = &top[j * m..j * m + j];
            let s = bottom[j] - dot(&bottom[..j], rowj);
            bottom[j] = s / d;
        }
    }
    // L Y = B, then L^T X = Y: row operations over the n right-hand sides.
    for i in 0..m {
        let (done, rest) = b.split_at_mut(i * n);
        let bi = &mut rest[..n];
        for p in 0..i {
            let l = a[i * m + p];
            for (x, y) in bi.iter_mut().zip(&done[p * n..(p + 1) * n]) {
                *x -= l * y;
            }
        }
        let d = a[i * m + i];
        bi.iter_mut().for_each(|x| *x /= d);
    }
    for i in (0..m).rev() {
        let (head, done) = b.split_at_mut((i + 1) * n);
        let bi = &mut head[i * n..];
        for p in i + 1..m {
            let l = a[p * m + i];
            for (x, y) in bi.iter_mut().zip(&done[(p - i - 1) * n..(p - i) * n]) {
                *x -= l * y;
            }
        }
        let d = a[i * m + i];
        bi.iter_mut().for_each(|x| *x /= d);
    }
    Some(b)
}

/// Relative ridge of the refit (times the kept inputs' mean variance), pulling the refit
/// toward the original rows: a few hundred calibration sentences overfit without it (MiniLM-L6,
/// 25% of FFN neurons, 108 sentences: held-out cosine 0.952 at 1e-3, 0.959 at 0.1, 0.922 with
/// no refit).
const RIDGE: f64 = 0.1;

/// The refit of a projection `w` (`k x n`) that now sees only inputs `keep`: on the calibration
/// tokens' inputs `x` (`[t, k]`, the unpruned model's), `W' = argmin E|x_k W' - x W|^2 +
/// lambda |W' - W_k|^2` on centered inputs, and the bias shift `E[x] W - E[x_k] W'`. (Refitting
/// instead on inputs re-captured from the model pruned so far, to correct earlier layers' errors
/// too, fit 108 MiniLM sentences worse on held-out ones: 0.975 vs 0.981 for 25% of heads.)
/// Without calibration: the kept rows as they are.
fn refit(gemm: &Gemm, w: &[f32], n: usize, keep: &[usize], x: Option<&Tensor>) -> tcc_ir::Result<(Vec<f32>, Vec<f32>)> {
    let kept_rows = || keep.iter().flat_map(|&i| w[i * n..(i + 1) * n].iter().copied()).collect::<Vec<f32>>();
    let Some(x) = x else { return Ok((kept_rows(), vec![0.0; n])) };
    let (xt, mu, t, k) = columns_of(x)?;
    if t == 0 || k * n != w.len() {
        return Ok((kept_rows(), vec![0.0; n]));
    }
    let (muh, ht) = (&mu, &xt);
    let m = keep.len();
    // The kept columns of x, as rows `[m, t]` and as columns `[t, m]`.
    let hk: Vec<f32> = keep.iter().flat_map(|&i| ht[i * t..(i + 1) * t].iter().copied()).collect();
    let hk_rows: Vec<f32> = (0..t).flat_map(|r| keep.iter().map(move |&i| ht[i * t + r])).collect();
    let x_rows = x.as_slice::<f32>().map_err(tcc_ir::Error::Runtime)?;
    // Centered moments: A = E[x_k x_k^T] - mu_k mu_k^T (+ ridge), C = E[x_k x^T] - mu_k mu^T.
    let hh = gemm.run(m, t, m, &hk, &hk_rows)?;
    let hx = gemm.run(m, t, k, &hk, x_rows)?;
    let tf = t as f64;
    let mut a = vec![0f64; m * m];
    for r in 0..m {
        for c in 0..m {
            a[r * m + c] = hh[r * m + c] as f64 / tf - muh[keep[r]] * muh[keep[c]];
        }
    }
    let lambda = RIDGE * ((0..m).map(|r| a[r * m + r]).sum::<f64>() / m.max(1) as f64).max(1e-12);
    for r in 0..m {
        a[r * m + r] += lambda;
    }
    let cov: Vec<f32> = (0..m)
        .flat_map(|r| {
            let (hx, mu) = (&hx, &mu);
            (0..k).map(move |c| (hx[r * k + c] as f64 / tf - muh[keep[r]] * mu[c]) as f32)
        })
        .collect();
    // B = C W + lambda W_k.
    let cw = gemm.run(m, k, n, &cov, w)?;
    let b: Vec<f64> = (0..m * n).map(|i| cw[i] as f64 + lambda * w[keep[i / n] * n + i % n] as f64).collect();
    let Some(wk) = solve_spd(a, b, m, n) else { return Ok((kept_rows(), vec![0.0; n])) };
    let shift = (0..n)
        .map(|c| {
            let full: f64 = (0..k).map(|p| mu[p] * w[p * n + c] as f64).sum();
            let kept: f64 = (0..m).map(|r| muh[keep[r]] * wk[r * n + c]).sum();
            (full - kept) as f32
        })
        .collect();
    Ok((wk.iter().map(|&v| v as f32).collect(), shift))
}

/// A copy of `l`'s product with its weights replaced by `w` (`k x n`, row-major), its
/// per-column inputs sliced to `cols` (when given) and `shift` added to its bias.
pub(crate) fn rebuild(
    g: &mut Graph,
    l: &Linear,
    a: ValueId,
    n: usize,
    w: &[f32],
    cols: Option<&[usize]>,
    shift: Option<&[f32]>,
) -> tcc_ir::Result<ValueId> {
    let nd = g.nodes[l.node].clone();
    let Op::FusedMatMul(f) = &nd.op else { unreachable!("a Linear is a FusedMatMul") };
    let name = nd.name.clone();
    let k = w.len() / n.max(1);
    let packed = kernels::pack_b(k, n, w);
    let wv =
        g.add_const(format!("{name}.pruned"), Tensor::new(vec![packed.len()], packed).map_err(tcc_ir::Error::Runtime)?);
    let mut inputs = vec![a, wv];
    for i in 0..f.extra {
        let v =
            nd.inputs[2 + i].ok_or_else(|| tcc_ir::Error::Runtime(tcc_runtime::Error::op("prune", "missing input")))?;
        let sliced = l.per_column[i] && (cols.is_some() || (shift.is_some() && l.bias == Some(i)));
        if !sliced {
            inputs.push(v);
            continue;
        }
        let t = g
            .const_of(v)
            .cloned()
            .ok_or_else(|| tcc_ir::Error::Runtime(tcc_runtime::Error::op("prune", "per-column input")))?;
        let vals = t.as_slice::<f32>().map_err(tcc_ir::Error::Runtime)?;
        let mut new: Vec<f32> = match cols {
            Some(c) => c.iter().map(|&j| vals[j]).collect(),
            None => vals.to_vec(),
        };
        if let (Some(s), true) = (shift, l.bias == Some(i)) {
            for (x, d) in new.iter_mut().zip(s) {
                *x += d;
            }
        }
        let mut shape = t.shape().to_vec();
        *shape.last_mut().expect("per-column input has a last dim") = new.len();
        let name = format!("{}.pruned", g.value(v).name);
        inputs.push(g.add_const(name, Tensor::new(shape, new).map_err(tcc_ir::Error::Runtime)?));
    }
    let op = FusedMatMul { packed: Some([k, n]), ..f.clone() };
    g.add1(op, &inputs, name)
}

/// Input `i` of node `n`.
fn input(g: &Graph, n: usize, i: usize) -> tcc_ir::Result<ValueId> {
    g.nodes[n].inputs.get(i).copied().flatten().ok_or_else(|| {
        tcc_ir::Error::Runtime(tcc_runtime::Error::op("prune", format!("`{}` lacks input {i}", g.nodes[n].name)))
    })
}

/// `(bias, residual)` when the product's epilogue is exactly `acc + bias + residual`.
fn bias_residual(g: &Graph, l: &Linear) -> Option<(ValueId, ValueId)> {
    let Op::FusedMatMul(f) = &g.nodes[l.node].op else { return None };
    let (added, len) = additions(&f.epilogue.0);
    let b = l.bias?;
    let r = match *added.as_slice() {
        [x, y] if x == b => y,
        [x, y] if y == b => x,
        _ => return None,
    };
    (len == f.epilogue.0.len()).then(|| Some((input(g, l.node, 2 + b).ok()?, input(g, l.node, 2 + r).ok()?))).flatten()
}

/// The columns of `w` (`k x n`) listed in `cols`.
fn columns(w: &[f32], k: usize, n: usize, cols: &[usize]) -> Vec<f32> {
    (0..k).flat_map(|r| cols.iter().map(move |&c| w[r * n + c])).collect()
}

/// The shape operand of a reshape whose `at`-th entry counts heads: itself when that entry is
/// `-1`, else a copy with `heads` there (`None`: not a shape this pass can follow).
fn reshape_target(g: &mut Graph, shape: ValueId, at_end: usize, old: i64, new: i64) -> Option<ValueId> {
    let dims: Vec<Dim> = g.fact(shape).value.as_ref()?.data.clone();
    let at = dims.len().checked_sub(at_end)?;
    match dims[at].as_const() {
        Some(-1) => Some(shape),
        Some(x) if x == old => {
            let mut dims = dims;
            dims[at] = Dim::constant(new);
            g.add1(tcc_ir::op::DimValue { dims, scalar: false }, &[], format!("{}.pruned", g.value(shape).name)).ok()
        }
        _ => None,
    }
}

impl Pass for Prune {
    fn name(&self) -> &'static str {
        "prune"
    }

    fn run(&mut self, g: &mut Graph, cx: &mut PassContext) -> tcc_ir::Result<PassOutcome> {
        let mut out = PassOutcome::default();
        if self.heads.is_none() && self.ffn == 0.0 && self.layers.is_none() {
            return Ok(out);
        }
        if let Some(choice) = &self.layers {
            self.remove_layers(g, choice, cx, &mut out)?;
            if self.heads.is_none() && self.ffn == 0.0 {
                return Ok(out);
            }
        }
        // Heads, then FFN neurons chosen and refit on what the model without those heads feeds
        // them (MiniLM-L6, 25% of each: held-out cosine 0.9509, against 0.9502 with both chosen
        // on the full model).
        if self.heads.is_some() && self.ffn > 0.0 {
            let heads_only = Prune { ffn: 0.0, layers: None, ..self.clone() }.run(g, cx)?;
            let ffn_only = Prune { heads: None, layers: None, ..self.clone() }.run(g, cx)?;
            for (k, v) in heads_only.stats.into_iter().chain(ffn_only.stats) {
                match k.as_str() {
                    // The same samples, captured twice.
                    "calibration_tokens" => {
                        out.stats.insert(k, v);
                    }
                    _ => out.stat(&k, v),
                }
            }
            out.changed |= heads_only.changed || ffn_only.changed;
            return Ok(out);
        }
        let fail = |m: String| tcc_ir::Error::Pass(m);
        let heads = if self.heads.is_some() { head_blocks(g) } else { Vec::new() };
        let ffns = if self.ffn > 0.0 { ffn_blocks(g) } else { Vec::new() };
        if self.heads.is_some() && heads.is_empty() {
            return Err(fail("no attention block whose heads can be removed (Q, K and V as products by weights, then the output projection)".into()));
        }
        if self.ffn > 0.0 && ffns.is_empty() {
            return Err(fail("no FFN block (two products by weights in a row, widening then back)".into()));
        }
        let calibrator = cx.calibrator.clone();
        let fractions = matches!(self.heads, Some(HeadChoice::Fraction(_))) || self.ffn > 0.0;
        if fractions && calibrator.is_none() {
            return Err(tcc_ir::Error::Calibration(
                "choosing what to remove needs calibration samples (--calibration)".into(),
            ));
        }
        // The unpruned model on the calibration samples: each block's projection input (what
        // the refit targets) and output (what scores are relative to).
        let mut probe: Vec<ValueId> = Vec::new();
        for b in &heads {
            probe.extend([g.nodes[b.merge].outputs[0], g.nodes[b.out.node].outputs[0]]);
        }
        for b in &ffns {
            probe.extend([g.nodes[b.up.node].outputs[0], g.nodes[b.down.node].outputs[0]]);
        }
        let captured = match &calibrator {
            Some(c) => captured(c.as_ref(), g, &probe, self.max_rows)?,
            None => Vec::new(),
        };
        if let Some(t) = captured.first() {
            out.stat("calibration_tokens", t.shape()[0] as i64);
        }
        let input_of = |i: usize| captured.get(2 * i);
        let norm_of = |i: usize| captured.get(2 * i + 1).map(mean_sq).unwrap_or(1.0).max(1e-30);

        // Which heads go.
        let mut drop_heads: BTreeSet<(usize, usize)> = BTreeSet::new();
        match &self.heads {
            Some(HeadChoice::Named(set)) => {
                for &(l, h) in set {
                    let b = heads.get(l).ok_or_else(|| {
                        fail(format!("heads: layer {l} does not exist ({} attention layers)", heads.len()))
                    })?;
                    if h >= b.heads {
                        return Err(fail(format!("heads: layer {l} has {} heads, no head {h}", b.heads)));
                    }
                    drop_heads.insert((l, h));
                }
            }
            Some(HeadChoice::Fraction(f)) => {
                let mut all: Vec<(f64, usize, usize)> = Vec::new();
                for (l, b) in heads.iter().enumerate() {
                    let Some(x) = input_of(l) else { continue };
                    let groups: Vec<Vec<usize>> = (0..b.heads).map(|h| (h * b.d..(h + 1) * b.d).collect()).collect();
                    let norm = norm_of(l);
                    for (h, s) in group_scores(x, &b.out.w, b.out.n, &groups)?.into_iter().enumerate() {
                        all.push((s / norm, l, h));
                    }
                }
                let sizes: Vec<usize> = heads.iter().map(|b| b.heads).collect();
                drop_heads = choose(all, &sizes, *f, self.spread, 1);
            }
            None => {}
        }
        // Which neurons go (each layer keeps a multiple of 16: whole vectors in the kernels).
        // (Products on the runtime's GEMM: the ranking's and then the refits'.)
        let gemm = Gemm::new()?;
        let mut drop_neurons: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); ffns.len()];
        if self.ffn > 0.0 {
            // Each layer's removal order and cost ([`obs_order`], the layers on all cores); the
            // keys are cumulative costs relative to the block's output, so the lowest over the
            // model take each layer's in its order. Up to twice the fraction of one layer.
            let jobs: Vec<_> = ffns
                .iter()
                .enumerate()
                .map(|(l, b)| {
                    let x = input_of(heads.len() + l);
                    let most =
                        ((b.down.k as f64 * (2.0 * self.ffn).min(0.9)) as usize).min(b.down.k.saturating_sub(16));
                    (x, b, most)
                })
                .collect();
            let layers: Vec<usize> = (0..jobs.len()).collect();
            let orders = on_threads(&layers, |l| match jobs[l] {
                (Some(x), b, most) => obs_order(&gemm, x, &b.down.w, b.down.n, most),
                (None, _, _) => Ok(Vec::new()),
            })?;
            let mut all: Vec<(f64, usize, usize)> = Vec::new();
            for (l, order) in orders.into_iter().enumerate() {
                let norm = norm_of(heads.len() + l);
                let (mut total, mut key) = (0.0f64, 0.0f64);
                for (j, e) in order {
                    total += e;
                    key = key.max(total / norm);
                    all.push((key, l, j));
                }
            }
            let sizes: Vec<usize> = ffns.iter().map(|b| b.down.k).collect();
            for (l, j) in choose(all, &sizes, self.ffn, self.spread, 16) {
                drop_neurons[l].insert(j);
            }
        }

        // Blocks in graph order, each refit on the unpruned model's activations ([`refit`]).
        let mut order: Vec<(usize, bool, usize)> =
            heads.iter().enumerate().map(|(i, b)| (b.out.node, true, i)).collect();
        order.extend(ffns.iter().enumerate().map(|(i, b)| (b.down.node, false, i)));
        order.sort();
        for (_, is_heads, i) in order {
            if is_heads {
                let (l, b) = (i, &heads[i]);
                let keep: Vec<usize> = (0..b.heads).filter(|&h| !drop_heads.contains(&(l, h))).collect();
                out.stat(&format!("heads_kept.layer{l:02}"), keep.len() as i64);
                if keep.len() == b.heads {
                    continue;
                }
                out.stat("heads_removed", (b.heads - keep.len()) as i64);
                out.stat(
                    "parameters_removed",
                    ((b.heads - keep.len()) * b.d * (3 * b.qkv.input_width() + 3 + b.out.n)) as i64,
                );
                let cols: Vec<usize> = keep.iter().flat_map(|&h| h * b.d..(h + 1) * b.d).collect();
                let (rows, shift) = refit(&gemm, &b.out.w, b.out.n, &cols, input_of(l))?;
                self.remove_heads(g, l, b, &keep, &cols, &rows, &shift)?;
                if keep.is_empty() {
                    out.stat("attention_blocks_removed", 1);
                }
            } else {
                let (l, b) = (i, &ffns[i]);
                let keep: Vec<usize> = (0..b.up.n).filter(|j| !drop_neurons[l].contains(j)).collect();
                out.stat(&format!("ffn_kept.layer{l:02}"), keep.len() as i64);
                if keep.len() == b.up.n {
                    continue;
                }
                out.stat("ffn_neurons_removed", (b.up.n - keep.len()) as i64);
                out.stat("parameters_removed", ((b.up.n - keep.len()) * (b.up.k + 1 + b.down.n)) as i64);
                let (rows, shift) = refit(&gemm, &b.down.w, b.down.n, &keep, input_of(heads.len() + l))?;
                let a = input(g, b.up.node, 0)?;
                let w = columns(&b.up.w, b.up.k, b.up.n, &keep);
                let h = rebuild(g, &b.up, a, keep.len(), &w, Some(&keep), None)?;
                let old = g.nodes[b.down.node].outputs[0];
                let y = rebuild(g, &b.down, h, b.down.n, &rows, None, Some(&shift))?;
                g.replace_uses(old, y);
            }
        }
        if out.changed {
            g.remove_dead_nodes();
            g.toposort()?;
        }
        Ok(out)
    }
}

/// The layers of a post-LayerNorm encoder: `(input, output)` of each, where the input feeds the
/// layer's Q/K/V products and the output is the `LayerNorm` after its FFN block, whose input is
/// the next layer's.
fn layers(g: &Graph) -> Vec<(ValueId, ValueId)> {
    let (heads, ffns, users) = (head_blocks(g), ffn_blocks(g), g.users());
    let mut out = Vec::new();
    for b in &heads {
        let Some(x) = g.nodes[b.qkv.first().node].inputs.first().copied().flatten() else { return Vec::new() };
        // The first FFN block after this attention block, and the LayerNorm after it.
        let Some(f) = ffns.iter().filter(|f| f.down.node > b.out.node).min_by_key(|f| f.down.node) else {
            return Vec::new();
        };
        let Some(ln) = sole_user(&users, g, g.nodes[f.down.node].outputs[0]) else { return Vec::new() };
        if !matches!(g.nodes[ln].op, Op::LayerNorm(_)) {
            return Vec::new();
        }
        out.push((x, g.nodes[ln].outputs[0]));
    }
    // Each layer's output is the next one's input.
    let chained = out.windows(2).all(|w| w[0].1 == w[1].0);
    if chained {
        out
    } else {
        Vec::new()
    }
}

impl Prune {
    /// Removes whole layers: each one's output replaced by its input (LayerDrop at inference).
    /// A count picks the layers whose removal alone changes the model's outputs least on the
    /// calibration samples (one run per layer).
    fn remove_layers(
        &self,
        g: &mut Graph,
        choice: &LayerChoice,
        cx: &PassContext,
        out: &mut PassOutcome,
    ) -> tcc_ir::Result<()> {
        let all = layers(g);
        if all.is_empty() {
            return Err(tcc_ir::Error::Pass(
                "no encoder layers found to remove (attention then FFN blocks, each ending in a LayerNorm)".into(),
            ));
        }
        let drop: BTreeSet<usize> = match choice {
            LayerChoice::Named(set) => {
                if let Some(l) = set.iter().find(|&&l| l >= all.len()) {
                    return Err(tcc_ir::Error::Pass(format!(
                        "layers: layer {l} does not exist ({} layers)",
                        all.len()
                    )));
                }
                set.clone()
            }
            LayerChoice::Count(n) => {
                if *n >= all.len() {
                    return Err(tcc_ir::Error::Pass(format!("layers: {n} of {} layers would leave none", all.len())));
                }
                let calibrator = cx.calibrator.clone().ok_or_else(|| {
                    tcc_ir::Error::Calibration(
                        "choosing layers to remove needs calibration samples (--calibration)".into(),
                    )
                })?;
                // The float outputs (a model may also pass its integer inputs through).
                let floats = |g: &Graph| -> Vec<ValueId> {
                    g.outputs.iter().map(|o| o.value).filter(|&v| g.fact(v).dtype == tcc_ir::DType::F32).collect()
                };
                let base = captured(calibrator.as_ref(), g, &floats(g), self.max_rows)?;
                let mut cost: Vec<(f64, usize)> = Vec::new();
                for (l, &(x, y)) in all.iter().enumerate() {
                    let mut c = g.clone();
                    c.replace_uses(y, x);
                    c.remove_dead_nodes();
                    let got = captured(calibrator.as_ref(), &c, &floats(&c), self.max_rows)?;
                    // Relative squared error over every output value.
                    let (mut num, mut den) = (0f64, 0f64);
                    for (a, b) in got.iter().zip(&base) {
                        // f32 (checked by `captured`).
                        let (a, b) = (a.as_slice::<f32>().unwrap_or(&[]), b.as_slice::<f32>().unwrap_or(&[]));
                        for (p, q) in a.iter().zip(b) {
                            num += ((p - q) as f64).powi(2);
                            den += (*q as f64).powi(2);
                        }
                    }
                    let e = num / den.max(1e-30);
                    out.stat(&format!("layer_error_ppm.layer{l:02}"), (e * 1e6).round() as i64);
                    cost.push((e, l));
                }
                cost.sort_by(|a, b| a.0.total_cmp(&b.0));
                cost.iter().take(*n).map(|&(_, l)| l).collect()
            }
        };
        // Later layers first: each bypass reads the (unchanged) input of its own layer.
        for &l in drop.iter().rev() {
            let (x, y) = all[l];
            g.replace_uses(y, x);
            out.stat("layers_removed", 1);
        }
        if !drop.is_empty() {
            g.remove_dead_nodes();
            g.toposort()?;
        }
        Ok(())
    }

    /// Rebuilds attention block `b` (layer `l`) with heads `keep` (columns `cols` of the
    /// context), its projection's rows `rows` and bias shift `shift`.
    #[allow(clippy::too_many_arguments)]
    fn remove_heads(
        &self,
        g: &mut Graph,
        l: usize,
        b: &HeadBlock,
        keep: &[usize],
        cols: &[usize],
        rows: &[f32],
        shift: &[f32],
    ) -> tcc_ir::Result<()> {
        let fail = |m: String| tcc_ir::Error::Pass(format!("layer {l}: {m}"));
        let old = g.nodes[b.out.node].outputs[0];
        if keep.is_empty() {
            // No head left: the block is its projection's bias (plus the mean of what the
            // heads gave) added to the residual.
            let (bias, residual) = bias_residual(g, &b.out).ok_or_else(|| {
                fail("every head removed, but the output projection's epilogue is not bias + residual".into())
            })?;
            let t = g.const_of(bias).cloned().ok_or_else(|| fail("the bias is not constant".into()))?;
            let vals: Vec<f32> =
                t.as_slice::<f32>().map_err(tcc_ir::Error::Runtime)?.iter().zip(shift).map(|(b, d)| b + d).collect();
            let name = format!("{}.pruned", g.value(bias).name);
            let bias = g.add_const(name, Tensor::new(t.shape().to_vec(), vals).map_err(tcc_ir::Error::Runtime)?);
            let name = g.nodes[b.out.node].name.clone();
            let y = g.add1(tcc_ir::op::Binary::new(BinaryKind::Add), &[residual, bias], name)?;
            g.replace_uses(old, y);
            return Ok(());
        }
        // Q, K and V with the kept heads' columns.
        let parts: Vec<ValueId> = match &b.qkv {
            Qkv::Separate(lins) => lins
                .iter()
                .map(|lin| {
                    let a = input(g, lin.node, 0)?;
                    rebuild(g, lin, a, cols.len(), &columns(&lin.w, lin.k, lin.n, cols), Some(cols), None)
                })
                .collect::<tcc_ir::Result<_>>()?,
            Qkv::Fused(lin, split) => {
                let third = lin.n / 3;
                let all: Vec<usize> = (0..3).flat_map(|p| cols.iter().map(move |&c| p * third + c)).collect();
                let a = input(g, lin.node, 0)?;
                let y = rebuild(g, lin, a, all.len(), &columns(&lin.w, lin.k, lin.n, &all), Some(&all), None)?;
                let sizes = Tensor::new(vec![3], vec![cols.len() as i64; 3]).map_err(tcc_ir::Error::Runtime)?;
                let name = g.nodes[*split].name.clone();
                let sizes = g.add_const(format!("{name}.sizes"), sizes);
                g.add_node(g.nodes[*split].op.clone(), vec![Some(y), Some(sizes)], name)?
            }
        };
        let mut qkv = Vec::new();
        for (i, &y) in parts.iter().enumerate() {
            let (op, name) = (g.nodes[b.reshapes[i]].op.clone(), g.nodes[b.reshapes[i]].name.clone());
            let shape = input(g, b.reshapes[i], 1)?;
            let shape = reshape_target(g, shape, 2, b.heads as i64, keep.len() as i64)
                .ok_or_else(|| fail("the heads' reshape has a shape this pass cannot follow".into()))?;
            qkv.push(g.add_node(op, vec![Some(y), Some(shape)], name)?[0]);
        }
        let att = g.nodes[b.attention].clone();
        let mut ins: Vec<Option<ValueId>> = qkv.into_iter().map(Some).collect();
        ins.extend(att.inputs.iter().skip(3).copied());
        let ctx = g.add_node(att.op.clone(), ins, att.name.clone())?[0];
        let (op, name) = (g.nodes[b.merge].op.clone(), g.nodes[b.merge].name.clone());
        let shape = input(g, b.merge, 1)?;
        let shape = reshape_target(g, shape, 1, (b.heads * b.d) as i64, cols.len() as i64)
            .ok_or_else(|| fail("the context's reshape has a shape this pass cannot follow".into()))?;
        let merged = g.add_node(op, vec![Some(ctx), Some(shape)], name)?[0];
        let y = rebuild(g, &b.out, merged, b.out.n, rows, None, Some(shift))?;
        g.replace_uses(old, y);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bias is found wherever the epilogue adds it before anything else: onnxruntime's
    /// fused models add the residual first (missing it dropped the refit's bias shift there).
    #[test]
    fn additions_find_the_bias_in_either_order() {
        let add = |a, b| EpiOp::Binary(BinaryKind::Add, a, b);
        let torch = [EpiOp::Acc, EpiOp::Input(0), add(1, 0), EpiOp::Input(1), add(2, 3)];
        let ort = [EpiOp::Acc, EpiOp::Input(0), add(0, 1), EpiOp::Input(1), add(3, 2)];
        assert_eq!(additions(&torch), (vec![0, 1], 5));
        assert_eq!(additions(&ort), (vec![0, 1], 5));
        // GELU after the bias: one addition, then the rest of the program.
        let gelu = [EpiOp::Acc, EpiOp::Input(0), add(0, 1), EpiOp::Const(0.5), EpiOp::Binary(BinaryKind::Mul, 2, 3)];
        assert_eq!(additions(&gelu), (vec![0], 3));
        // An input added to something else than the running sum is not part of it.
        let other = [EpiOp::Acc, EpiOp::Input(0), EpiOp::Input(1), add(1, 2)];
        assert_eq!(additions(&other), (vec![], 1));
    }

    #[test]
    fn blocked_inverse_is_the_inverse() {
        // Sizes around the block (64): one partial block, exact blocks, several with a tail.
        for k in [1usize, 5, 64, 130, 200] {
            // A = X^T X / t + I on pseudo-random X: symmetric positive definite.
            let t = k + 7;
            let x: Vec<f64> = (0..t * k).map(|i| ((i * 2654435761usize) % 1000) as f64 / 500.0 - 1.0).collect();
            let mut a = vec![0f64; k * k];
            for r in 0..k {
                for c in 0..k {
                    a[r * k + c] = (0..t).map(|s| x[s * k + r] * x[s * k + c]).sum::<f64>() / t as f64;
                }
                a[r * k + r] += 0.1;
            }
            let inv = inverse_spd(a.clone(), k).expect("positive definite");
            let mut eye = vec![0f64; k * k];
            (0..k).for_each(|r| eye[r * k + r] = 1.0);
            let want = solve_spd(a.clone(), eye, k, k).unwrap();
            let err = inv.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
            let scale = want.iter().map(|v| v.abs()).fold(0.0, f64::max);
            assert!(err <= 1e-10 * scale, "k={k}: max difference {err:e} (scale {scale:e})");
            // Not positive definite: refused.
            let mut bad = a;
            bad[0] = -1.0;
            assert!(inverse_spd(bad, k).is_none(), "k={k}");
        }
    }

    #[test]
    fn specs_parse() {
        assert_eq!(parse_heads("0.25"), Ok(HeadChoice::Fraction(0.25)));
        assert_eq!(parse_heads("l0h1+l5h11"), Ok(HeadChoice::Named([(0, 1), (5, 11)].into_iter().collect())));
        assert!(parse_heads("1.5").is_err() && parse_heads("l0x1").is_err());
        assert_eq!(parse_layers("2"), Ok(LayerChoice::Count(2)));
        assert_eq!(parse_layers("l3+l5"), Ok(LayerChoice::Named([3, 5].into_iter().collect())));
        assert!(parse_layers("three").is_err());
        let opts = |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let p = Prune::from_options(&opts(&[("heads", "l0h1+l2h3")])).unwrap();
        assert_eq!(p.heads, Some(HeadChoice::Named([(0, 1), (2, 3)].into_iter().collect())));
        assert!(Prune::from_options(&opts(&[("spread", "sideways")])).is_err());
        assert_eq!(p.pipeline_text(), "prune{heads=l0h1+l2h3}");
    }
}

//! AVX-512 versions of the element-wise work around the products: vector math (the same
//! algorithms as the Cranelift emitters in `jit::emit`, sixteen lanes at a time), softmax and
//! layer-normalization rows, and an executor of epilogue programs on a tile of C.
//!
//! On CPUs with AVX-512 these replace the 128-bit generated code for the exp-heavy work
//! (GELU epilogues, softmax), four times wider.

#![allow(clippy::too_many_arguments)]

use super::tile_masks;
use crate::jit::EpiOperand;
use crate::op::{BinaryKind, EpiOp, UnaryKind};
use std::arch::x86_64::*;

#[inline(always)]
unsafe fn splat(v: f32) -> __m512 {
    unsafe { _mm512_set1_ps(v) }
}

// Bitwise float ops through the integer forms: the `_ps` forms need AVX512DQ, which the
// avx512 tier does not require.
#[inline(always)]
unsafe fn and(a: __m512, b: __m512) -> __m512 {
    unsafe { _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), _mm512_castps_si512(b))) }
}

#[inline(always)]
unsafe fn andnot(a: __m512, b: __m512) -> __m512 {
    unsafe { _mm512_castsi512_ps(_mm512_andnot_si512(_mm512_castps_si512(a), _mm512_castps_si512(b))) }
}

#[inline(always)]
unsafe fn or(a: __m512, b: __m512) -> __m512 {
    unsafe { _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(a), _mm512_castps_si512(b))) }
}

/// `exp(x)` as `jit::emit::Emitter::exp` computes it.
///
/// # Safety
/// The CPU must have AVX-512F (call from a `#[target_feature(enable = "avx512f")]` function).
#[inline(always)]
pub unsafe fn exp(x: __m512) -> __m512 {
    unsafe {
        // max/min return their second operand when either is NaN: x goes second, so that
        // NaN stays NaN (a softmax row of all -inf is NaN, as in the reference).
        let x = _mm512_max_ps(splat(-86.0), x);
        let x = _mm512_min_ps(splat(88.37626), x);
        let magic = splat(12_582_912.0);
        let t = _mm512_fmadd_ps(x, splat(std::f32::consts::LOG2_E), magic);
        let n = _mm512_sub_ps(t, magic);
        let r = _mm512_fmadd_ps(n, splat(-0.693_359_4), x);
        let r = _mm512_fmadd_ps(n, splat(2.121_944_4e-4), r);
        let mut p = splat(1.987_569_1e-4);
        for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            p = _mm512_fmadd_ps(p, r, splat(c));
        }
        let r2 = _mm512_mul_ps(r, r);
        let y = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), splat(1.0));
        let e = _mm512_slli_epi32::<23>(_mm512_castps_si512(t));
        _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(y), e))
    }
}

/// `erf(x)` as a rational function `x P(x^2) / Q(x^2)` on `x` clamped to [-4, 4] (the
/// approximation Eigen and XLA use): no `exp`, a third of the instructions of the
/// Abramowitz-Stegun form that `jit::emit::Emitter::erf` generates, and a smaller error in f32
/// (absolute error below 4.2e-7 over [-6, 6], checked against `libm`-quality values in tests).
/// NaN stays NaN.
///
/// # Safety
/// The CPU must have AVX-512F (call from a `#[target_feature(enable = "avx512f")]` function).
#[inline(always)]
pub unsafe fn erf(x: __m512) -> __m512 {
    const P: [f32; 7] = [
        -2.726_142_3e-10,
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.954_6e-3,
        -1.609_603_3e-2,
    ];
    const Q: [f32; 5] = [-1.456_607_2e-5, -2.133_740_6e-4, -1.682_827e-3, -7.373_329e-3, -1.426_474e-2];
    unsafe {
        // max/min return their second operand when either is NaN: x goes second.
        let x = _mm512_min_ps(splat(4.0), _mm512_max_ps(splat(-4.0), x));
        let x2 = _mm512_mul_ps(x, x);
        let mut p = splat(P[0]);
        for c in &P[1..] {
            p = _mm512_fmadd_ps(p, x2, splat(*c));
        }
        let p = _mm512_mul_ps(p, x);
        let mut q = splat(Q[0]);
        for c in &Q[1..] {
            q = _mm512_fmadd_ps(q, x2, splat(*c));
        }
        // p / q by the 14-bit reciprocal estimate and one Newton step (a division is the
        // slowest instruction here); q is in [-2.4, -0.0142], far from 0.
        let r = _mm512_rcp14_ps(q);
        let r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(q, r, splat(1.0)), r);
        _mm512_mul_ps(p, r)
    }
}

#[inline(always)]
unsafe fn tanh(x: __m512) -> __m512 {
    unsafe {
        let sign = and(x, splat(-0.0));
        let a = andnot(splat(-0.0), x);
        let e = exp(_mm512_add_ps(a, a));
        let y = _mm512_sub_ps(splat(1.0), _mm512_div_ps(splat(2.0), _mm512_add_ps(e, splat(1.0))));
        or(y, sign)
    }
}

#[inline(always)]
unsafe fn unary(k: UnaryKind, x: __m512) -> __m512 {
    unsafe {
        match k {
            UnaryKind::Identity => x,
            UnaryKind::Neg => _mm512_sub_ps(splat(0.0), x),
            UnaryKind::Abs => andnot(splat(-0.0), x),
            UnaryKind::Sqrt => _mm512_sqrt_ps(x),
            UnaryKind::Reciprocal => _mm512_div_ps(splat(1.0), x),
            UnaryKind::Exp => exp(x),
            UnaryKind::Erf => erf(x),
            UnaryKind::Tanh => tanh(x),
            UnaryKind::Sigmoid => {
                _mm512_div_ps(splat(1.0), _mm512_add_ps(splat(1.0), exp(_mm512_sub_ps(splat(0.0), x))))
            }
            UnaryKind::Relu => {
                let m = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, splat(0.0));
                _mm512_maskz_mov_ps(m, x)
            }
            // Not epilogue ops (see `Epilogue::supports_unary`).
            _ => _mm512_set1_ps(f32::NAN),
        }
    }
}

#[inline(always)]
unsafe fn binary(k: BinaryKind, a: __m512, b: __m512) -> __m512 {
    unsafe {
        match k {
            BinaryKind::Add => _mm512_add_ps(a, b),
            BinaryKind::Sub => _mm512_sub_ps(a, b),
            BinaryKind::Mul => _mm512_mul_ps(a, b),
            BinaryKind::Div => _mm512_div_ps(a, b),
            BinaryKind::Max | BinaryKind::Min => {
                // NaN propagates, as the reference does.
                let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, b);
                let v = if k == BinaryKind::Max { _mm512_max_ps(a, b) } else { _mm512_min_ps(a, b) };
                _mm512_mask_mov_ps(v, nan, splat(f32::NAN))
            }
            _ => _mm512_set1_ps(f32::NAN),
        }
    }
}

/// What the tile epilogue needs besides the tile: the program and its extra inputs.
#[repr(C)]
pub struct EpiContext {
    pub program: *const EpiOp,
    pub len: usize,
    pub operands: *const EpiOperand,
    /// Per operand: 1 when it broadcasts along the columns.
    pub col_broadcast: *const u8,
    /// The program as a [`Chain`] when it is one ([`Chain::of`]), or null: the tile then runs
    /// through the general executor.
    pub chain: *const Chain,
}

/// Most steps of a [`Chain`].
const MAX_CHAIN: usize = 8;

/// Where a chain step's other operand comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Operand {
    Const(f32),
    Input(usize),
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Step {
    kind: BinaryKind,
    operand: Operand,
    /// `acc op operand` (else `operand op acc`).
    acc_first: bool,
}

/// The shape most epilogues have, run with each vector kept in a register: the product,
/// then binary steps that each combine the running value with a constant or an extra input
/// (bias; scale and mask; bias and residual), then optionally GELU (erf form) of the result.
/// The general executor keeps every intermediate in memory, which costs several times more
/// than the arithmetic for programs this short.
#[derive(Clone, Debug, PartialEq)]
pub struct Chain {
    steps: [Option<Step>; MAX_CHAIN],
    gelu: bool,
}

impl Chain {
    /// `prog` as a chain, if it is one.
    pub fn of(prog: &[EpiOp]) -> Option<Chain> {
        if prog.first() != Some(&EpiOp::Acc) {
            return None;
        }
        let mut steps = [None; MAX_CHAIN];
        let (mut cur, mut i, mut n) = (0usize, 1usize, 0usize);
        // (running value's index, next instruction) after each step, to try GELU tails from.
        let mut at = vec![(0usize, 1usize)];
        let operand_at = |k: usize| match prog[k] {
            EpiOp::Const(c) => Some(Operand::Const(c)),
            EpiOp::Input(j) => Some(Operand::Input(j)),
            _ => None,
        };
        while i < prog.len() && n < MAX_CHAIN {
            // A step's other operand is the instruction just before it, or one read earlier
            // (as in `c * (c * acc)`, the scale dynamo exports apply to both Q and K).
            let (o, bin) = if operand_at(i).is_some() { (i, i + 1) } else { (usize::MAX, i) };
            let Some(&EpiOp::Binary(kind, a, b)) = prog.get(bin) else { break };
            if !matches!(kind, BinaryKind::Add | BinaryKind::Sub | BinaryKind::Mul | BinaryKind::Div) {
                break;
            }
            let (acc_first, o) = match (a, b) {
                (a, b) if a == cur && (b == o || (o == usize::MAX && b < cur)) => (true, b),
                (a, b) if b == cur && (a == o || (o == usize::MAX && a < cur)) => (false, a),
                _ => break,
            };
            let Some(operand) = operand_at(o) else { break };
            // Division by a constant as a product with its reciprocal (as the executor does).
            let step = match (kind, operand, acc_first) {
                (BinaryKind::Div, Operand::Const(c), true) => {
                    Step { kind: BinaryKind::Mul, operand: Operand::Const(1.0 / c), acc_first }
                }
                _ => Step { kind, operand, acc_first },
            };
            steps[n] = Some(step);
            n += 1;
            cur = bin;
            i = bin + 1;
            at.push((cur, i));
        }
        if i == prog.len() {
            return Some(Chain { steps, gelu: false });
        }
        // The longest prefix of steps whose rest is GELU (a step may have taken GELU's x / sqrt 2).
        let keep = (0..at.len()).rev().find(|&s| is_gelu_of(&prog[at[s].1..], at[s].0, at[s].1))?;
        steps[keep..].fill(None);
        Some(Chain { steps, gelu: true })
    }
}

impl Chain {
    /// The chain as `x * scale + input` (either part optional, the input varying along the
    /// columns): the scale and mask of attention scores, run without interpreting the steps.
    fn affine(&self, ctx: &EpiContext) -> Option<(f32, Option<usize>)> {
        let mut steps = self.steps.iter().map_while(|s| s.as_ref()).peekable();
        let mut scale = 1.0;
        let mut input = None;
        if let Some(Step { kind: BinaryKind::Mul, operand: Operand::Const(c), .. }) = steps.peek() {
            scale = *c;
            steps.next();
        }
        if let Some(Step { kind: BinaryKind::Add, operand: Operand::Input(j), .. }) = steps.peek() {
            // SAFETY: `ctx` describes this chain's program: operand `j` exists.
            if unsafe { *ctx.col_broadcast.add(*j) } != 0 {
                return None;
            }
            input = Some(*j);
            steps.next();
        }
        (steps.next().is_none() && !self.gelu).then_some((scale, input))
    }
}

/// Whether `tail` (instructions from index `base` on) computes `x * (1 + erf(x / sqrt 2)) / 2`
/// of the value at index `x`, and nothing else: it reads only that value, constants and its
/// own results, uses `Erf`, and agrees with the formula on sample points (to rounding).
fn is_gelu_of(tail: &[EpiOp], x: usize, base: usize) -> bool {
    let reads_ok = |k: usize, at: usize| k == x || (k >= base && k < at);
    let mut has_erf = false;
    for (t, op) in tail.iter().enumerate() {
        let at = base + t;
        let ok = match *op {
            EpiOp::Const(_) => true,
            EpiOp::Unary(k, a) => {
                has_erf |= k == crate::op::UnaryKind::Erf;
                matches!(k, crate::op::UnaryKind::Erf) && reads_ok(a, at)
            }
            EpiOp::Binary(k, a, b) => {
                matches!(k, BinaryKind::Add | BinaryKind::Sub | BinaryKind::Mul | BinaryKind::Div)
                    && reads_ok(a, at)
                    && reads_ok(b, at)
            }
            EpiOp::Acc | EpiOp::Input(_) | EpiOp::FakeQuant(..) => false,
        };
        if !ok {
            return false;
        }
    }
    if !has_erf {
        return false;
    }
    (-40..=40).all(|i| {
        let v = i as f64 * 0.15;
        let mut vals: Vec<f64> = Vec::with_capacity(tail.len());
        let get = |vals: &Vec<f64>, k: usize| if k == x { v } else { vals[k - base] };
        for op in tail {
            let r = match *op {
                EpiOp::Const(c) => c as f64,
                EpiOp::Unary(_, a) => libm::erf(get(&vals, a)),
                EpiOp::Binary(k, a, b) => {
                    let (p, q) = (get(&vals, a), get(&vals, b));
                    match k {
                        BinaryKind::Add => p + q,
                        BinaryKind::Sub => p - q,
                        BinaryKind::Mul => p * q,
                        _ => p / q,
                    }
                }
                _ => unreachable!("checked above"),
            };
            vals.push(r);
        }
        let want = 0.5 * v * (1.0 + libm::erf(v / std::f64::consts::SQRT_2));
        (vals[vals.len() - 1] - want).abs() <= 1e-6 * (1.0 + want.abs())
    })
}

/// [`crate::op::FakeQuant::apply`] on sixteen lanes: the same division, clamp, NaN to 0,
/// rounding half to even and product, so the same bits.
#[inline(always)]
unsafe fn fake_quant(x: __m512, q: &crate::op::FakeQuant) -> __m512 {
    unsafe {
        let (lo, hi) = q.bounds();
        let s = splat(q.scale);
        let v = _mm512_div_ps(x, s);
        // max/min return their second operand when either is NaN: v goes second.
        let v = _mm512_min_ps(splat(hi), _mm512_max_ps(splat(lo), v));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        let v = _mm512_mask_mov_ps(v, nan, _mm512_setzero_ps());
        let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
        // -0.0 + 0.0 = +0.0: the reference's integer round trip has no negative zero.
        _mm512_mul_ps(_mm512_add_ps(r, _mm512_setzero_ps()), s)
    }
}

/// GELU, erf form.
#[inline(always)]
unsafe fn gelu(x: __m512) -> __m512 {
    unsafe {
        let e = erf(_mm512_mul_ps(x, splat(std::f32::consts::FRAC_1_SQRT_2)));
        _mm512_mul_ps(_mm512_mul_ps(x, splat(0.5)), _mm512_add_ps(e, splat(1.0)))
    }
}

/// [`tile_epilogue`] for a [`Chain`]: row by row, each vector in a register throughout.
#[inline(always)]
unsafe fn run_chain(
    ctx: &EpiContext,
    chain: &Chain,
    c: *mut f32,
    ldc: usize,
    row: usize,
    mb: usize,
    n0: usize,
    masks: [__mmask16; 2],
) {
    // SAFETY: as `tile_epilogue`: C and every operand cover these rows and columns.
    unsafe {
        let halves = if masks[1] == 0 { 1 } else { 2 };
        // Each vector of the rows through `$epi(r, col, mask, value)`; a macro so that each
        // epilogue gets its own loop (BERT's as [`Adds`], others step by step).
        macro_rules! rows {
            ($epi:expr) => {
                for r in row..row + mb {
                    let cp = c.add(r * ldc + n0);
                    for (h, &mask) in masks.iter().enumerate().take(halves) {
                        let v = _mm512_maskz_loadu_ps(mask, cp.add(16 * h));
                        _mm512_mask_storeu_ps(cp.add(16 * h), mask, $epi(r, n0 + 16 * h, mask, v));
                    }
                }
            };
        }
        with_chain!(rows, ctx, chain, 0, 0);
    }
}

/// Runs `$rows!(epi)`, a macro that applies `epi(r, col, mask, value) -> value` to each vector
/// it stores (`r`, `col` relative to `$row`, `$col` of the chain's operands), with the epilogue
/// of `$chain`: its [`Adds`] form where it has one (one monomorphized `epi` per form), else
/// [`chain_vec`].
macro_rules! with_chain {
    ($rows:ident, $ctx:expr, $chain:expr, $row:expr, $col:expr) => {
        match $chain.adds($ctx) {
            Some(a) => match (a.len, a.gelu) {
                (0, true) => $rows!(|r, c, m, v| a.apply::<0, true>($row + r, $col + c, m, v)),
                (1, false) => $rows!(|r, c, m, v| a.apply::<1, false>($row + r, $col + c, m, v)),
                (1, true) => $rows!(|r, c, m, v| a.apply::<1, true>($row + r, $col + c, m, v)),
                (2, false) => $rows!(|r, c, m, v| a.apply::<2, false>($row + r, $col + c, m, v)),
                (2, true) => $rows!(|r, c, m, v| a.apply::<2, true>($row + r, $col + c, m, v)),
                _ => $rows!(|_, _, _, v| v),
            },
            None => $rows!(|r, c, m, v| $crate::kernels::avx512_vec::chain_vec($ctx, $chain, $row + r, $col + c, m, v)),
        }
    };
}
pub(crate) use with_chain;

/// The chain applied to `v`, the values of row `r`, columns `col..col + 16` (the lanes in
/// `mask`) of the product.
///
/// # Safety
/// AVX-512F; `ctx` describes `chain`'s program and every operand covers row `r`, columns
/// `col..` in `mask`'s lanes.
#[inline(always)]
pub(crate) unsafe fn chain_vec(
    ctx: &EpiContext,
    chain: &Chain,
    r: usize,
    col: usize,
    mask: __mmask16,
    mut v: __m512,
) -> __m512 {
    // SAFETY: the caller's: every operand covers row `r`, columns `col..` in `mask`'s lanes.
    unsafe {
        for step in chain.steps.iter().map_while(|s| s.as_ref()) {
            let x = match step.operand {
                Operand::Const(k) => _mm512_set1_ps(k),
                Operand::Input(j) => {
                    let o = *ctx.operands.add(j);
                    let p = o.ptr.add(r * o.row_stride);
                    if *ctx.col_broadcast.add(j) != 0 {
                        _mm512_set1_ps(*p)
                    } else {
                        _mm512_maskz_loadu_ps(mask, p.add(col))
                    }
                }
            };
            v = if step.acc_first { binary(step.kind, v, x) } else { binary(step.kind, x, v) };
        }
        if chain.gelu {
            v = gelu(v);
        }
        v
    }
}

/// A chain that only adds inputs varying along the columns (a bias, a residual: at most two)
/// and then maybe takes GELU: the epilogues of BERT's products. Resolved once per tile from
/// the chain and its context, it runs each vector as loads and arithmetic ([`Adds::apply`])
/// where [`chain_vec`] looks every step's kind and operand up again: on the int8 products,
/// whose sparse tiles are short, that lookup was most of the time the stores took.
#[derive(Clone, Copy)]
pub(crate) struct Adds {
    /// How many of `inputs` are added, in the chain's order.
    pub len: usize,
    inputs: [EpiOperand; 2],
    /// Per input: the chain computes `acc + input` (else `input + acc`: the same sum, but
    /// a NaN's bits come from the first operand).
    acc_first: [bool; 2],
    pub gelu: bool,
}

impl Chain {
    /// The chain as [`Adds`] for `ctx`'s operands, if it is one.
    pub(crate) fn adds(&self, ctx: &EpiContext) -> Option<Adds> {
        let none = EpiOperand { ptr: std::ptr::null(), row_stride: 0 };
        let mut a = Adds { len: 0, inputs: [none; 2], acc_first: [true; 2], gelu: self.gelu };
        for step in self.steps.iter().map_while(|s| s.as_ref()) {
            let Step { kind: BinaryKind::Add, operand: Operand::Input(j), acc_first } = *step else { return None };
            // SAFETY: `ctx` describes this chain's program: operand `j` exists.
            if a.len == 2 || unsafe { *ctx.col_broadcast.add(j) } != 0 {
                return None;
            }
            // SAFETY: as above.
            a.inputs[a.len] = unsafe { *ctx.operands.add(j) };
            a.acc_first[a.len] = acc_first;
            a.len += 1;
        }
        Some(a)
    }
}

impl Adds {
    /// [`chain_vec`] of this chain, the same bits: `v` plus the first `N` (= `self.len`)
    /// inputs at row `r`, columns `col..col + 16` (the lanes in `mask`), one after another and
    /// each in the chain's operand order, then GELU if `GELU` (= `self.gelu`).
    ///
    /// # Safety
    /// AVX-512F; as [`chain_vec`]: every input covers row `r`, columns `col..` in `mask`'s lanes.
    #[inline(always)]
    pub(crate) unsafe fn apply<const N: usize, const GELU: bool>(
        &self,
        r: usize,
        col: usize,
        mask: __mmask16,
        mut v: __m512,
    ) -> __m512 {
        debug_assert!(N == self.len && GELU == self.gelu);
        // SAFETY: the caller's.
        unsafe {
            for (o, &first) in self.inputs[..N].iter().zip(&self.acc_first) {
                let x = _mm512_maskz_loadu_ps(mask, o.ptr.add(r * o.row_stride + col));
                v = if first { _mm512_add_ps(v, x) } else { _mm512_add_ps(x, v) };
            }
            if GELU {
                v = gelu(v);
            }
            v
        }
    }
}

/// Prefetches (into L1) the lines of rows `row..row + rows`, columns `col..col + cols` of
/// each of `ctx`'s operands that varies along the columns (a bias row is in cache already).
#[inline(always)]
pub(crate) fn prefetch_operands(ctx: &EpiContext, row: usize, rows: usize, col: usize, cols: usize) {
    if cols == 0 {
        return;
    }
    // SAFETY: `ctx` was built for this product: `operands` and `col_broadcast` hold one entry
    // per extra input; only addresses are computed (wrapping) and prefetched, never read.
    unsafe {
        let chain = match ctx.chain.as_ref() {
            Some(c) => c,
            None => return,
        };
        for step in chain.steps.iter().map_while(|s| s.as_ref()) {
            let Operand::Input(j) = step.operand else { continue };
            if *ctx.col_broadcast.add(j) != 0 {
                continue;
            }
            let o = *ctx.operands.add(j);
            if o.row_stride == 0 {
                continue;
            }
            for r in row..row + rows {
                let first = o.ptr.wrapping_add(r * o.row_stride + col) as usize;
                let last = o.ptr.wrapping_add(r * o.row_stride + col + cols - 1) as usize;
                let mut line = first & !63;
                while line <= last {
                    _mm_prefetch::<_MM_HINT_T0>(line as *const i8);
                    line += 64;
                }
            }
        }
    }
}

/// Rows the executor processes per pass over the program.
const ROWS: usize = 4;
/// Most program instructions the AVX-512 executor takes; longer programs run the generated
/// 128-bit epilogue.
pub const MAX_PROGRAM: usize = 48;

/// Applies the epilogue program to rows `row..row+mb`, columns `n0..n0+nb` (`nb <= 32`) of C.
/// Op-major over blocks of four rows: each instruction runs over the block's eight vectors
/// before the next, so the dispatch costs once per instruction and block, not per element.
///
/// # Safety
/// AVX-512F; `ctx` as built by the runtime for this product; C covers those rows and columns.
#[target_feature(enable = "avx512f")]
pub unsafe extern "C" fn tile_epilogue(
    ctx: *const EpiContext,
    c: *mut f32,
    ldc: usize,
    row: usize,
    mb: usize,
    n0: usize,
    nb: usize,
) {
    // SAFETY: the caller's contract; register slots are written before they are read (each
    // instruction reads only earlier ones, which ran on the same vectors).
    unsafe {
        let ctx = &*ctx;
        if ctx.len == 0 || ctx.len > MAX_PROGRAM {
            return;
        }
        let prog = std::slice::from_raw_parts(ctx.program, ctx.len);
        let [m0, m1] = tile_masks(nb);
        if let Some(chain) = ctx.chain.as_ref() {
            run_chain(ctx, chain, c, ldc, row, mb, n0, [m0, m1]);
            return;
        }
        let mut regs = std::mem::MaybeUninit::<[[__m512; ROWS * 2]; MAX_PROGRAM]>::uninit();
        let regs = &mut *regs.as_mut_ptr();
        let mut r0 = row;
        while r0 < row + mb {
            let rows = ROWS.min(row + mb - r0);
            let nv = rows * 2;
            for (i, op) in prog.iter().enumerate() {
                let (done, rest) = regs.split_at_mut(i);
                let out = &mut rest[0];
                match *op {
                    EpiOp::Acc => {
                        for r in 0..rows {
                            let cp = c.add((r0 + r) * ldc + n0);
                            out[2 * r] = _mm512_maskz_loadu_ps(m0, cp);
                            out[2 * r + 1] = _mm512_maskz_loadu_ps(m1, cp.add(16));
                        }
                    }
                    EpiOp::Input(j) => {
                        let o = *ctx.operands.add(j);
                        let bcast = *ctx.col_broadcast.add(j) != 0;
                        for r in 0..rows {
                            let p = o.ptr.add((r0 + r) * o.row_stride);
                            if bcast {
                                let v = _mm512_set1_ps(*p);
                                out[2 * r] = v;
                                out[2 * r + 1] = v;
                            } else {
                                out[2 * r] = _mm512_maskz_loadu_ps(m0, p.add(n0));
                                out[2 * r + 1] = _mm512_maskz_loadu_ps(m1, p.add(n0 + 16));
                            }
                        }
                    }
                    EpiOp::Const(v) => out[..nv].fill(_mm512_set1_ps(v)),
                    EpiOp::Unary(k, a) => {
                        for v in 0..nv {
                            out[v] = unary(k, done[a][v]);
                        }
                    }
                    EpiOp::FakeQuant(a, q) => {
                        for v in 0..nv {
                            out[v] = fake_quant(done[a][v], &q);
                        }
                    }
                    // Division by a constant (GELU's x / sqrt 2) as a product with its
                    // reciprocal: within an ulp, and a division is the slowest vector op.
                    EpiOp::Binary(BinaryKind::Div, a, b) if let EpiOp::Const(d) = prog[b] => {
                        let r = _mm512_set1_ps(1.0 / d);
                        for v in 0..nv {
                            out[v] = _mm512_mul_ps(done[a][v], r);
                        }
                    }
                    EpiOp::Binary(k, a, b) => {
                        for v in 0..nv {
                            out[v] = binary(k, done[a][v], done[b][v]);
                        }
                    }
                }
            }
            let last = &regs[prog.len() - 1];
            for r in 0..rows {
                let cp = c.add((r0 + r) * ldc + n0);
                _mm512_mask_storeu_ps(cp, m0, last[2 * r]);
                _mm512_mask_storeu_ps(cp.add(16), m1, last[2 * r + 1]);
            }
            r0 += rows;
        }
    }
}

/// Adds the partial sums `parts` (each at row stride `lds`) to rows `row..row+mb`, columns
/// `n0..n0+nb` (`nb <= 32`) of C, in order, then runs the epilogue (`ctx`) on the tile: the
/// reduction of a product split along `k`.
///
/// # Safety
/// AVX-512F; C and every part cover those rows and columns; `ctx` as for [`tile_epilogue`].
#[target_feature(enable = "avx512f")]
pub unsafe fn reduce_tile(
    ctx: &EpiContext,
    c: *mut f32,
    ldc: usize,
    parts: &[*const f32],
    lds: usize,
    row: usize,
    mb: usize,
    n0: usize,
    nb: usize,
) {
    // SAFETY: the caller's contract; masked loads and stores stay within the tile.
    unsafe {
        let masks = tile_masks(nb);
        for r in row..row + mb {
            let cp = c.add(r * ldc + n0);
            for (h, &mask) in masks.iter().enumerate() {
                if mask == 0 {
                    continue;
                }
                let mut v = _mm512_maskz_loadu_ps(mask, cp.add(16 * h));
                for &p in parts {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, p.add(r * lds + n0 + 16 * h)));
                }
                _mm512_mask_storeu_ps(cp.add(16 * h), mask, v);
            }
        }
        if ctx.len > 0 {
            tile_epilogue(ctx, c, ldc, row, mb, n0, nb);
        }
    }
}

/// [`crate::op::FakeQuant::apply`] on `n` floats (`x` and `y` may be the same buffer): QDQ
/// models' standalone quantization of activations, the same bits as the reference.
///
/// # Safety
/// AVX-512F; `x` and `y` hold `n` floats.
#[target_feature(enable = "avx512f")]
pub unsafe fn fake_quant_slice(x: *const f32, y: *mut f32, n: usize, q: &crate::op::FakeQuant) {
    // SAFETY: the caller's contract; masked loads and stores stay within the n floats.
    unsafe {
        let mut i = 0;
        while i < n {
            let m = lane_mask(n - i);
            let v = fake_quant(_mm512_maskz_loadu_ps(m, x.add(i)), q);
            _mm512_mask_storeu_ps(y.add(i), m, v);
            i += 16;
        }
    }
}

/// GELU of `n` floats (`x` and `y` may be the same buffer), erf form or tanh approximation:
/// the standalone op of models whose products are not fused (integer products).
///
/// # Safety
/// AVX-512F; `x` and `y` hold `n` floats.
#[target_feature(enable = "avx512f")]
pub unsafe fn gelu_slice(x: *const f32, y: *mut f32, n: usize, tanh_form: bool) {
    // SAFETY: the caller's contract; masked loads and stores stay within the n floats.
    unsafe {
        let mut i = 0;
        while i < n {
            let m = lane_mask(n - i);
            let v = _mm512_maskz_loadu_ps(m, x.add(i));
            let r = if tanh_form {
                // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
                let x3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
                let inner = _mm512_mul_ps(splat(0.797_884_6), _mm512_fmadd_ps(x3, splat(0.044715), v));
                _mm512_mul_ps(_mm512_mul_ps(v, splat(0.5)), _mm512_add_ps(tanh(inner), splat(1.0)))
            } else {
                gelu(v)
            };
            _mm512_mask_storeu_ps(y.add(i), m, r);
            i += 16;
        }
    }
}

/// The minimum and maximum of `n` floats, NaN ignored (as `f32::min`/`max` fold them).
///
/// # Safety
/// AVX-512F; `x` holds `n` floats.
#[target_feature(enable = "avx512f")]
pub unsafe fn min_max(x: *const f32, n: usize) -> (f32, f32) {
    // SAFETY: the caller's contract; loads stay within the n floats (masked for the tail).
    unsafe {
        // Four running pairs: one min/max chain would wait on its own latency every vector.
        let (mut lo, mut hi) = ([splat(f32::INFINITY); 4], [splat(f32::NEG_INFINITY); 4]);
        let mut i = 0;
        // min/max return their second operand when either is NaN: NaN lanes keep the running
        // value.
        while i + 64 <= n {
            for j in 0..4 {
                let v = _mm512_loadu_ps(x.add(i + 16 * j));
                lo[j] = _mm512_min_ps(v, lo[j]);
                hi[j] = _mm512_max_ps(v, hi[j]);
            }
            i += 64;
        }
        while i < n {
            let m = lane_mask(n - i);
            lo[0] = _mm512_min_ps(_mm512_mask_loadu_ps(splat(f32::INFINITY), m, x.add(i)), lo[0]);
            hi[0] = _mm512_max_ps(_mm512_mask_loadu_ps(splat(f32::NEG_INFINITY), m, x.add(i)), hi[0]);
            i += 16;
        }
        let l = _mm512_min_ps(_mm512_min_ps(lo[0], lo[1]), _mm512_min_ps(lo[2], lo[3]));
        let h = _mm512_max_ps(_mm512_max_ps(hi[0], hi[1]), _mm512_max_ps(hi[2], hi[3]));
        (_mm512_reduce_min_ps(l), _mm512_reduce_max_ps(h))
    }
}

/// `y = saturate(round_half_even(x / scale) + zp)` to `u8` for `n` floats, exactly as
/// [`crate::op::quant::quantize_value`] with the `u8` range (NaN gives `zp`).
///
/// # Safety
/// AVX-512F; `x` holds `n` floats, `y` `n` bytes.
#[target_feature(enable = "avx512f")]
pub unsafe fn quantize_u8(x: *const f32, y: *mut u8, n: usize, scale: f32, zp: u8) {
    // SAFETY: forwarded.
    unsafe { quantize::<true>(x, y, n, scale, zp) }
}

/// `y = saturate(round_half_even(x * inv_scale) + zp)` to `u8` for `n` floats, exactly as
/// [`crate::op::fused::quantize_u8_by`] (the activations of integer products: a product by the
/// reciprocal, not a division, which costs ten times as much).
///
/// # Safety
/// AVX-512F; `x` holds `n` floats, `y` `n` bytes.
#[target_feature(enable = "avx512f")]
pub unsafe fn quantize_u8_by(x: *const f32, y: *mut u8, n: usize, inv_scale: f32, zp: u8) {
    // SAFETY: forwarded.
    unsafe { quantize::<false>(x, y, n, inv_scale, zp) }
}

/// [`quantize_u8`] (`DIVIDE`: `s` is the scale) or [`quantize_u8_by`] (`s` is its reciprocal).
///
/// # Safety
/// As theirs.
#[inline(always)]
unsafe fn quantize<const DIVIDE: bool>(x: *const f32, y: *mut u8, n: usize, s: f32, zp: u8) {
    // SAFETY: the caller's contract; full vectors load 16 floats and store 16 bytes within n.
    unsafe {
        let sv = splat(s);
        let (lo, hi, z) = (splat(-(zp as f32)), splat(255.0 - zp as f32), splat(zp as f32));
        let mut i = 0;
        while i + 16 <= n {
            let v = _mm512_loadu_ps(x.add(i));
            let v = if DIVIDE { _mm512_div_ps(v, sv) } else { _mm512_mul_ps(v, sv) };
            let v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
            let v = _mm512_mask_mov_ps(v, nan, _mm512_setzero_ps());
            let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            let q = _mm512_cvtps_epi32(_mm512_add_ps(r, z));
            _mm_storeu_si128(y.add(i) as *mut __m128i, _mm512_cvtusepi32_epi8(q));
            i += 16;
        }
        for j in i..n {
            *y.add(j) = if DIVIDE {
                crate::op::quant::quantize_value(*x.add(j), s, zp as i64, 0.0, 255.0) as u8
            } else {
                crate::op::fused::quantize_u8_by(*x.add(j), s, zp)
            };
        }
    }
}

/// Softmax of each row of `x` (`rows x len`, in place) after the epilogue `chain` (as
/// `ctx` gives it: attention's scale and mask), row by row: the chain's pass leaves the row in
/// L1 for the softmax's. The same arithmetic as [`tile_epilogue`] then [`softmax`].
///
/// # Safety
/// AVX-512F; `x` holds `rows x len` floats; `ctx`'s operands cover those rows and columns.
#[target_feature(enable = "avx512f")]
pub unsafe fn softmax_chain(ctx: &EpiContext, chain: &Chain, x: *mut f32, rows: usize, len: usize) {
    // SAFETY: the caller's contract; each call stays within row `r`'s `len` floats.
    unsafe {
        for r in 0..rows {
            let mut n0 = 0;
            while n0 < len {
                run_chain(ctx, chain, x, len, r, 1, n0, tile_masks((len - n0).min(32)));
                n0 += 32;
            }
            softmax_row(x.add(r * len), x.add(r * len), len);
        }
    }
}

/// One (batch, head) of attention: `softmax(chain(Q Kᵀ)) V` for `rows` query rows, with `K`
/// and `V` packed into [`NR`](super::NR)-column panels (`Kᵀ`: `d x sk`, `V`: `sk x dv`).
pub struct Head {
    pub q: *const f32,
    pub ldq: usize,
    pub d: usize,
    pub rows: usize,
    pub k_panels: *const f32,
    pub sk: usize,
    pub v_panels: *const f32,
    pub dv: usize,
    pub out: *mut f32,
    pub ldo: usize,
    /// A row whose softmax is NaN (all its scores `-inf`) gives zeros.
    pub nan_to_zero: bool,
    /// The index of `q`'s first row among the head's query rows (a head split by rows over
    /// threads): the row the chain's per-row operands are read at.
    pub row0: usize,
}

/// Query rows per block of [`attention_head`]: the micro-kernel's tile height.
pub const HEAD_ROWS: usize = 12;

/// Floats of scratch [`attention_head`] needs for `sk` keys.
pub fn head_scratch(sk: usize) -> usize {
    HEAD_ROWS * sk.next_multiple_of(16)
}

/// [`Head`] twelve query rows at a time, so that a block's scores stay in L1 from the product
/// through the softmax to the product with `V`: the scores of a block (the chain applied,
/// `ctx` holding its operands, rows counted from the head's first query row), their row
/// maxima, `exp(s - max)` and sums in two passes over the block, the unnormalized
/// probabilities times `V`, and each output row scaled by `1 / sum` (`dv` products instead of
/// `sk`). A row whose scores are all `-inf` is NaN, as in the reference (zeros with
/// `nan_to_zero`).
///
/// # Safety
/// AVX-512F; the pointers cover what [`Head`] describes (`q`: `rows` rows of `d` floats at
/// stride `ldq`; the panels `sk.div_ceil(NR) * d * NR` and `dv.div_ceil(NR) * sk * NR` floats;
/// `out`: `rows` rows of `dv` at stride `ldo`); `scratch` holds [`head_scratch`]`(sk)` floats.
#[target_feature(enable = "avx512f")]
pub unsafe fn attention_head(h: &Head, chain: Option<(&EpiContext, &Chain)>, scratch: *mut f32) {
    use super::avx512::sgemm_12x32;
    use super::NR;
    let ld = h.sk.next_multiple_of(16);
    let none = std::ptr::null();
    // SAFETY: the caller's contract; the products write `mb` rows of the scratch (stride
    // `ld >= sk`) and of `out`, the passes stay within each row's `sk` (masked) floats.
    unsafe {
        let mut r0 = 0;
        while r0 < h.rows {
            let mb = HEAD_ROWS.min(h.rows - r0);
            for p in 0..h.sk.div_ceil(NR) {
                let (kp, s) = (h.k_panels.add(p * h.d * NR), scratch.add(p * NR));
                sgemm_12x32(h.d, h.q.add(r0 * h.ldq), h.ldq, kp, s, ld, mb, NR.min(h.sk - p * NR), 0, none, 0);
            }
            let mut inv = [0f32; HEAD_ROWS];
            for (r, inv) in inv.iter_mut().enumerate().take(mb) {
                let row = scratch.add(r * ld);
                let m = _mm512_set1_ps(chain_max(chain, h.row0 + r0 + r, row, h.sk));
                *inv = 1.0 / exp_sum(row, row, h.sk, m);
                if h.nan_to_zero && inv.is_nan() {
                    // Every probability of the row is NaN in the reference, then 0.
                    std::ptr::write_bytes(row, 0, h.sk);
                    *inv = 0.0;
                }
            }
            for p in 0..h.dv.div_ceil(NR) {
                let (vp, o) = (h.v_panels.add(p * h.sk * NR), h.out.add(r0 * h.ldo + p * NR));
                sgemm_12x32(h.sk, scratch, ld, vp, o, h.ldo, mb, NR.min(h.dv - p * NR), 0, none, 0);
            }
            for (r, &inv) in inv.iter().enumerate().take(mb) {
                let (o, s) = (h.out.add((r0 + r) * h.ldo), _mm512_set1_ps(inv));
                let mut j = 0;
                while j < h.dv {
                    let k = lane_mask(h.dv - j);
                    _mm512_mask_storeu_ps(o.add(j), k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, o.add(j)), s));
                    j += 16;
                }
            }
            r0 += mb;
        }
    }
}

/// The chain (if any) applied in place to `len` scores of row `r` (of the product the chain's
/// operands belong to), and their maximum, NaN skipped (as `f32::max` does in the reference):
/// the first pass of a softmax. A chain that is a scale and a mask runs as that (the same
/// operations in the same order: the same bits).
///
/// # Safety
/// AVX-512F; `row` holds `len` floats; `ctx`'s operands cover row `r`.
#[inline(always)]
pub(crate) unsafe fn chain_max(chain: Option<(&EpiContext, &Chain)>, r: usize, row: *mut f32, len: usize) -> f32 {
    // SAFETY: the caller's contract; masked loads and stores stay within the row's `len`.
    unsafe {
        let affine = chain.and_then(|(ctx, c)| {
            let (scale, input) = c.affine(ctx)?;
            let bias = input.map_or(std::ptr::null(), |j| {
                let o = *ctx.operands.add(j);
                o.ptr.add(r * o.row_stride)
            });
            Some((_mm512_set1_ps(scale), scale != 1.0, bias))
        });
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut mx = ninf;
        let mut j = 0;
        while j < len {
            let k = lane_mask(len - j);
            let mut v = _mm512_maskz_loadu_ps(k, row.add(j));
            if let Some((scale, scaled, bias)) = affine {
                if scaled {
                    v = _mm512_mul_ps(v, scale);
                }
                if !bias.is_null() {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, bias.add(j)));
                }
                _mm512_mask_storeu_ps(row.add(j), k, v);
            } else if let Some((ctx, chain)) = chain {
                v = chain_vec(ctx, chain, r, j, k, v);
                _mm512_mask_storeu_ps(row.add(j), k, v);
            }
            mx = _mm512_max_ps(_mm512_mask_mov_ps(ninf, k, v), mx);
            j += 16;
        }
        _mm512_reduce_max_ps(mx)
    }
}

/// Softmax of each row of `len` floats (`x` and `y` may be the same buffer).
///
/// # Safety
/// AVX-512F; `x` and `y` hold `rows * len` floats.
#[target_feature(enable = "avx512f")]
pub unsafe extern "C" fn softmax(x: *const f32, y: *mut f32, rows: usize, len: usize) {
    // SAFETY: the caller's contract.
    unsafe {
        for r in 0..rows {
            softmax_row(x.add(r * len), y.add(r * len), len);
        }
    }
}

/// Softmax of one row. Two vectors per step with two accumulators each for the maximum and the
/// sum: a row of attention scores is only a few vectors long, and one accumulator would make
/// each pass a chain of dependent instructions.
#[inline(always)]
unsafe fn softmax_row(xr: *const f32, yr: *mut f32, len: usize) {
    // SAFETY: the caller's: `xr` and `yr` hold `len` floats; masked loads and stores stay
    // within them.
    unsafe {
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        let (mut mx0, mut mx1) = (ninf, ninf);
        let mut j = 0;
        while j < len {
            // `max(v, mx)` returns `mx` where `v` is NaN: NaN lanes are skipped, as `f32::max`
            // does in the reference.
            mx0 = _mm512_max_ps(_mm512_mask_loadu_ps(ninf, lane_mask(len - j), xr.add(j)), mx0);
            if j + 16 < len {
                mx1 = _mm512_max_ps(_mm512_mask_loadu_ps(ninf, lane_mask(len - j - 16), xr.add(j + 16)), mx1);
            }
            j += 32;
        }
        let m = _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_max_ps(mx0, mx1)));
        let inv = _mm512_set1_ps(1.0 / exp_sum(xr, yr, len, m));
        let mut j = 0;
        while j < len {
            let k = lane_mask(len - j);
            let v = _mm512_maskz_loadu_ps(k, yr.add(j));
            _mm512_mask_storeu_ps(yr.add(j), k, _mm512_mul_ps(v, inv));
            j += 16;
        }
    }
}

/// `exp(x - m)` of `len` floats of `xr` into `yr` (which may be `xr`), and their sum: the
/// second pass of a softmax row. Two vectors per step with an accumulator each, so that the
/// sum is not one chain of dependent adds.
#[inline(always)]
unsafe fn exp_sum(xr: *const f32, yr: *mut f32, len: usize, m: __m512) -> f32 {
    // SAFETY: the caller's: `xr` and `yr` hold `len` floats; masked loads and stores stay
    // within them.
    unsafe {
        let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut j = 0;
        while j < len {
            let k = lane_mask(len - j);
            let e = _mm512_maskz_mov_ps(k, exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, xr.add(j)), m)));
            _mm512_mask_storeu_ps(yr.add(j), k, e);
            s0 = _mm512_add_ps(s0, e);
            if j + 16 < len {
                let k = lane_mask(len - j - 16);
                let e = _mm512_maskz_mov_ps(k, exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, xr.add(j + 16)), m)));
                _mm512_mask_storeu_ps(yr.add(j + 16), k, e);
                s1 = _mm512_add_ps(s1, e);
            }
            j += 32;
        }
        _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))
    }
}

/// Layer normalization of each row of `len` floats (two-pass mean and variance).
///
/// # Safety
/// AVX-512F; `x` and `y` hold `rows * len` floats, `gamma` `len`, `beta` `len` or null.
#[target_feature(enable = "avx512f")]
pub unsafe extern "C" fn layernorm(
    x: *const f32,
    gamma: *const f32,
    beta: *const f32,
    y: *mut f32,
    rows: usize,
    len: usize,
    eps: f32,
) {
    // SAFETY: the caller's contract.
    unsafe {
        for r in 0..rows {
            let xr = x.add(r * len);
            let yr = y.add(r * len);
            let mut s = _mm512_setzero_ps();
            let mut j = 0;
            while j < len {
                s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(lane_mask(len - j), xr.add(j)));
                j += 16;
            }
            let mean = _mm512_reduce_add_ps(s) / len as f32;
            let mv = _mm512_set1_ps(mean);
            let mut q = _mm512_setzero_ps();
            let mut j = 0;
            while j < len {
                let k = lane_mask(len - j);
                let d = _mm512_maskz_sub_ps(k, _mm512_maskz_loadu_ps(k, xr.add(j)), mv);
                q = _mm512_fmadd_ps(d, d, q);
                j += 16;
            }
            let var = _mm512_reduce_add_ps(q) / len as f32;
            let inv = _mm512_set1_ps(1.0 / (var + eps).sqrt());
            let mut j = 0;
            while j < len {
                let k = lane_mask(len - j);
                let d = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, xr.add(j)), mv);
                let g = _mm512_maskz_loadu_ps(k, gamma.add(j));
                let b = if beta.is_null() { _mm512_setzero_ps() } else { _mm512_maskz_loadu_ps(k, beta.add(j)) };
                _mm512_mask_storeu_ps(yr.add(j), k, _mm512_fmadd_ps(_mm512_mul_ps(d, inv), g, b));
                j += 16;
            }
        }
    }
}

#[inline(always)]
pub(crate) fn lane_mask(left: usize) -> __mmask16 {
    if left >= 16 {
        0xffff
    } else {
        ((1u32 << left) - 1) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[target_feature(enable = "avx512f")]
    fn erf16(x: &[f32; 16]) -> [f32; 16] {
        let mut out = [0f32; 16];
        // SAFETY: AVX-512F is enabled for this function (and checked by the caller); both
        // arrays hold 16 floats.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), erf(_mm512_loadu_ps(x.as_ptr()))) };
        out
    }

    #[test]
    fn erf_is_accurate_and_keeps_nan() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("no AVX-512F here: not tested");
            return;
        }
        let mut worst = 0f64;
        for chunk in 0..(240_000 / 16) {
            let x: [f32; 16] = std::array::from_fn(|i| -6.0 + (chunk * 16 + i) as f32 * 12.0 / 240_000.0);
            // SAFETY: AVX-512F was detected above.
            let y = unsafe { erf16(&x) };
            for (xi, yi) in x.iter().zip(y) {
                worst = worst.max((yi as f64 - libm::erf(*xi as f64)).abs());
            }
        }
        assert!(worst < 5e-7, "erf: worst absolute error {worst:e}");
        let mut special = [0f32; 16];
        special[..5].copy_from_slice(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0]);
        // SAFETY: as above.
        let y = unsafe { erf16(&special) };
        assert!(y[0].is_nan());
        assert!((y[1] - 1.0).abs() <= 1e-7 && (y[2] + 1.0).abs() <= 1e-7, "erf(+-inf) = {} {}", y[1], y[2]);
        assert_eq!(&y[3..5], &[0.0, 0.0]);
    }
}

#[cfg(test)]
mod chain_tests {
    use super::*;
    use crate::op::{BinaryKind as B, UnaryKind as U};
    use EpiOp::*;

    fn programs() -> Vec<(&'static str, Vec<EpiOp>, Option<bool>)> {
        vec![
            ("identity", vec![Acc], Some(false)),
            ("bias", vec![Acc, Input(0), Binary(B::Add, 1, 0)], Some(false)),
            (
                "scale and mask",
                vec![Acc, Const(0.125), Binary(B::Mul, 0, 1), Input(1), Binary(B::Add, 2, 3)],
                Some(false),
            ),
            (
                "bias and residual",
                vec![Acc, Input(0), Binary(B::Add, 0, 1), Input(1), Binary(B::Add, 3, 2)],
                Some(false),
            ),
            (
                "input minus acc, over 2",
                vec![Acc, Input(1), Binary(B::Sub, 1, 0), Const(2.0), Binary(B::Div, 2, 3)],
                Some(false),
            ),
            (
                "bias, gelu x/sqrt2",
                vec![
                    Acc,
                    Input(0),
                    Binary(B::Add, 1, 0),
                    Const(std::f32::consts::SQRT_2),
                    Binary(B::Div, 2, 3),
                    Unary(U::Erf, 4),
                    Const(1.0),
                    Binary(B::Add, 5, 6),
                    Binary(B::Mul, 2, 7),
                    Const(0.5),
                    Binary(B::Mul, 8, 9),
                ],
                Some(true),
            ),
            (
                "gelu 0.5x first",
                vec![
                    Acc,
                    Const(0.5),
                    Binary(B::Mul, 1, 0),
                    Const(std::f32::consts::FRAC_1_SQRT_2),
                    Binary(B::Mul, 0, 3),
                    Unary(U::Erf, 4),
                    Const(1.0),
                    Binary(B::Add, 6, 5),
                    Binary(B::Mul, 2, 7),
                ],
                Some(true),
            ),
            (
                "gelu then residual",
                vec![
                    Acc,
                    Const(std::f32::consts::FRAC_1_SQRT_2),
                    Binary(B::Mul, 0, 1),
                    Unary(U::Erf, 2),
                    Const(1.0),
                    Binary(B::Add, 3, 4),
                    Binary(B::Mul, 0, 5),
                    Const(0.5),
                    Binary(B::Mul, 6, 7),
                    Input(1),
                    Binary(B::Add, 8, 9),
                ],
                None,
            ),
            (
                "dynamo's scale of Q and K, then mask",
                vec![Acc, Const(0.42), Binary(B::Mul, 1, 0), Binary(B::Mul, 1, 2), Input(0), Binary(B::Add, 3, 4)],
                Some(false),
            ),
            ("not a chain: a step reading a later value", vec![Acc, Binary(B::Mul, 0, 2), Const(2.0)], None),
            ("not gelu: erf alone", vec![Acc, Unary(U::Erf, 0)], None),
            ("max", vec![Acc, Const(0.0), Binary(B::Max, 0, 1)], None),
        ]
    }

    #[test]
    fn chains_are_recognized() {
        for (name, prog, want) in programs() {
            assert_eq!(Chain::of(&prog).map(|c| c.gelu), want, "{name}");
        }
    }

    #[test]
    fn chains_compute_what_the_executor_computes() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("no AVX-512F here: not tested");
            return;
        }
        let (rows, ldc) = (13usize, 40usize);
        let val = |i: usize, s: usize| (((i * 7919 + s * 104729) % 2001) as f32 / 1000.0 - 1.0) * 3.0;
        let bias: Vec<f32> = (0..ldc).map(|i| val(i, 1)).collect();
        let resid: Vec<f32> = (0..rows * ldc).map(|i| val(i, 2)).collect();
        let per_row: Vec<f32> = (0..rows).map(|i| val(i, 3)).collect();
        for (name, prog, want) in programs() {
            let Some(chain) = Chain::of(&prog) else { continue };
            assert!(want.is_some());
            // Input 0 a bias row, input 1 a residual; then input 1 as one value per row.
            let operand_sets = [
                (
                    [
                        EpiOperand { ptr: bias.as_ptr(), row_stride: 0 },
                        EpiOperand { ptr: resid.as_ptr(), row_stride: ldc },
                    ],
                    [0u8, 0],
                ),
                (
                    [
                        EpiOperand { ptr: bias.as_ptr(), row_stride: 0 },
                        EpiOperand { ptr: per_row.as_ptr(), row_stride: 1 },
                    ],
                    [0u8, 1],
                ),
            ];
            for (ops, bcast) in &operand_sets {
                for (n0, nb) in [(0usize, 32usize), (8, 20), (3, 7), (0, 16)] {
                    let ctx = |chain: *const Chain| EpiContext {
                        program: prog.as_ptr(),
                        len: prog.len(),
                        operands: ops.as_ptr(),
                        col_broadcast: bcast.as_ptr(),
                        chain,
                    };
                    let c0: Vec<f32> = (0..rows * ldc).map(|i| val(i, 4)).collect();
                    let (mut fast, mut general) = (c0.clone(), c0.clone());
                    // SAFETY: AVX-512F detected; rows 1..rows and columns n0..n0+nb lie inside
                    // C (and the residual), the bias covers ldc columns, per_row covers rows.
                    unsafe {
                        tile_epilogue(&ctx(&chain), fast.as_mut_ptr(), ldc, 1, rows - 1, n0, nb);
                        tile_epilogue(&ctx(std::ptr::null()), general.as_mut_ptr(), ldc, 1, rows - 1, n0, nb);
                    }
                    for (i, (f, g)) in fast.iter().zip(&general).enumerate() {
                        let (r, j) = (i / ldc, i % ldc);
                        if r == 0 || j < n0 || j >= n0 + nb {
                            assert_eq!(f.to_bits(), c0[i].to_bits(), "{name}: wrote outside the tile at {r},{j}");
                        } else {
                            assert!(
                                (f - g).abs() <= 2e-6 * (1.0 + g.abs()),
                                "{name} n0={n0} nb={nb} [{r},{j}]: {f} vs {g}"
                            );
                        }
                    }
                }
            }
        }
    }
}

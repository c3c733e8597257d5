//! Fast implementations of the hot ops on JIT-compiled code, with the work split over threads.
//!
//! [`Fast::eval`] answers `None` for an op (or shape) it does not handle, and the executor then
//! runs the op's reference `eval`. Every path here is checked against the reference in tests.

use crate::error::{Error, Result};
use crate::jit::{EpiOperand, GemmArgs, GemmSpec, Jit};
use crate::kernels::{Tier, NR};
use crate::op::{
    broadcast_shapes, broadcast_strides, fused, strides_of, FusedMatMul, LayerNorm, Op, Softmax, Transpose,
};
use crate::plan::Plan;
use crate::tensor::Tensor;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Rows of `A` per `k` block kept hot while a panel of `B` streams through.
const KC: usize = 256;

/// A buffer of `len` floats that will be fully written before it is read.
struct Uninit(Vec<MaybeUninit<f32>>);

impl Uninit {
    fn new(len: usize) -> Uninit {
        let mut v = Vec::with_capacity(len);
        // SAFETY: MaybeUninit<f32> needs no initialization.
        unsafe { v.set_len(len) };
        Uninit(v)
    }

    fn ptr(&mut self) -> *mut f32 {
        self.0.as_mut_ptr() as *mut f32
    }

    /// # Safety
    /// Every element must have been written.
    unsafe fn assume_init(self) -> Vec<f32> {
        let mut v = std::mem::ManuallyDrop::new(self.0);
        // SAFETY: MaybeUninit<f32> has the layout of f32; the caller guarantees every element
        // is initialized; the allocation is handed over unchanged.
        unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut f32, v.len(), v.capacity()) }
    }
}

/// A pointer that may be sent to another thread: the work split below hands each thread
/// disjoint parts of the output.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to write disjoint regions from different threads, within the lifetime of
// the buffer they point into (the parallel loop finishes before the buffer is used).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so that closures capture the whole `SendPtr`).
    fn get(self) -> *mut f32 {
        self.0
    }
}

pub struct Fast {
    pub jit: Jit,
}

/// How a dim of a logical (permuted) view maps to memory.
fn view(shape: &[usize], perm: &Option<Vec<usize>>) -> (Vec<usize>, Vec<usize>) {
    let st = strides_of(shape);
    (fused::permute(shape, perm), fused::permute(&st, perm))
}

fn col_broadcast(product: &[usize], extra: &Tensor) -> bool {
    let n = *product.last().unwrap_or(&1);
    let last = extra.shape().last().copied().unwrap_or(1);
    last == 1 && n != 1
}

impl Fast {
    /// Compiles the code `plan` needs.
    pub fn new(plan: &Plan, tier: Tier) -> Result<Fast> {
        // Drivers for each epilogue, for the column broadcasts the extra inputs can have. The
        // exact pattern is only known from shapes at run time; compile both variants for
        // single-extra programs (bias rows vs residuals), the all-false variant otherwise.
        let mut specs: Vec<GemmSpec> = vec![GemmSpec { epilogue: Default::default(), col_broadcast: vec![] }];
        for step in &plan.steps {
            if let Op::FusedMatMul(f) = &step.op {
                let mut patterns = vec![vec![false; f.extra]];
                for i in 0..f.extra {
                    let mut p = vec![false; f.extra];
                    p[i] = true;
                    patterns.push(p);
                }
                for col_broadcast in patterns {
                    let s = GemmSpec { epilogue: f.epilogue.clone(), col_broadcast };
                    if !specs.contains(&s) {
                        specs.push(s);
                    }
                }
            }
        }
        Ok(Fast { jit: Jit::new(tier, &specs)? })
    }

    /// Runs `op` on fast code when it can.
    pub fn eval(&self, op: &Op, inputs: &[Option<&Tensor>]) -> Option<Result<Vec<Tensor>>> {
        match op {
            Op::FusedMatMul(f) => self.fused_matmul(f, inputs),
            Op::Softmax(s) => self.softmax(s, inputs),
            Op::LayerNorm(l) => self.layernorm(l, inputs),
            Op::Transpose(t) => transpose(t, inputs),
            _ => None,
        }
    }

    fn softmax(&self, s: &Softmax, inputs: &[Option<&Tensor>]) -> Option<Result<Vec<Tensor>>> {
        let x = inputs.first().copied().flatten()?;
        let rank = x.rank() as i64;
        if s.log || x.dtype() != crate::DType::F32 || !(s.axis == -1 || s.axis == rank - 1) || rank == 0 {
            return None;
        }
        let len = *x.shape().last()?;
        let rows = x.len() / len.max(1);
        let xs = x.as_slice::<f32>().ok()?;
        let mut out = Uninit::new(x.len());
        let y = SendPtr(out.ptr());
        let f = self.jit.softmax;
        let chunk = rows_per_task(rows, len);
        (0..rows.div_ceil(chunk)).into_par_iter().for_each(|t| {
            let r0 = t * chunk;
            let r = chunk.min(rows - r0);
            // SAFETY: rows r0..r0+r of x and y are in bounds (rows * len elements each); tasks
            // write disjoint rows.
            unsafe { f(xs.as_ptr().add(r0 * len), y.get().add(r0 * len), r, len) };
        });
        // SAFETY: every row was written by exactly one task.
        let v = unsafe { out.assume_init() };
        Some(Tensor::new(x.shape().to_vec(), v).map(|t| vec![t]))
    }

    fn layernorm(&self, l: &LayerNorm, inputs: &[Option<&Tensor>]) -> Option<Result<Vec<Tensor>>> {
        let x = inputs.first().copied().flatten()?;
        let rank = x.rank() as i64;
        if rank == 0 || !(l.axis == -1 || l.axis == rank - 1) {
            return None;
        }
        let len = *x.shape().last()?;
        let gamma = inputs.get(1).copied().flatten()?;
        let beta = inputs.get(2).copied().flatten();
        if gamma.len() != len || beta.is_some_and(|b| b.len() != len) {
            return None;
        }
        let (xs, gs) = (x.as_slice::<f32>().ok()?, gamma.as_slice::<f32>().ok()?);
        let bs = match beta {
            Some(b) => b.as_slice::<f32>().ok()?.as_ptr(),
            None => std::ptr::null(),
        };
        let bsp = bs as usize;
        let rows = x.len() / len.max(1);
        let mut out = Uninit::new(x.len());
        let y = SendPtr(out.ptr());
        let f = self.jit.layernorm;
        let eps = l.epsilon;
        let chunk = rows_per_task(rows, len);
        (0..rows.div_ceil(chunk)).into_par_iter().for_each(|t| {
            let r0 = t * chunk;
            let r = chunk.min(rows - r0);
            // SAFETY: as in softmax; gamma and beta hold `len` floats (checked above).
            unsafe { f(xs.as_ptr().add(r0 * len), gs.as_ptr(), bsp as *const f32, y.get().add(r0 * len), r, len, eps) };
        });
        // SAFETY: every row was written.
        let v = unsafe { out.assume_init() };
        Some(Tensor::new(x.shape().to_vec(), v).map(|t| vec![t]))
    }

    fn fused_matmul(&self, f: &FusedMatMul, inputs: &[Option<&Tensor>]) -> Option<Result<Vec<Tensor>>> {
        let (a, b) = (inputs.first().copied().flatten()?, inputs.get(1).copied().flatten()?);
        if a.dtype() != crate::DType::F32 || b.dtype() != crate::DType::F32 || a.rank() < 2 {
            return None;
        }
        let (ashape, astr) = view(a.shape(), &f.a_perm);
        let r = ashape.len();
        let (m, k) = (ashape[r - 2], ashape[r - 1]);
        if astr[r - 1] != 1 || k == 0 {
            return None; // The micro-kernels read rows of A contiguously.
        }
        let lda = astr[r - 2];
        // B: packed weights, or a (permuted) tensor packed here per batch.
        let (bbatch, bbstr, n, bk) = match f.packed {
            Some([pk, pn]) => (vec![], vec![], pn, pk),
            None => {
                if b.rank() < 2 {
                    return None;
                }
                let (bshape, bstr) = view(b.shape(), &f.b_perm);
                let rb = bshape.len();
                (bshape[..rb - 2].to_vec(), bstr[..rb - 2].to_vec(), bshape[rb - 1], bshape[rb - 2])
            }
        };
        if bk != k {
            return Some(Err(Error::op("FusedMatMul", format!("inner dims differ: {k} and {bk}"))));
        }
        let abatch = &ashape[..r - 2];
        let batch = match broadcast_shapes("FusedMatMul", &[abatch, &bbatch]) {
            Ok(s) => s,
            Err(e) => return Some(Err(e)),
        };
        let mut product = batch.clone();
        product.extend([m, n]);
        let total = match crate::op::check_alloc("FusedMatMul", &product) {
            Ok(t) => t,
            Err(e) => return Some(Err(e)),
        };
        // Output: the product permuted by c_perm, contiguous; the product's logical strides.
        let out_shape = fused::permute(&product, &f.c_perm);
        let ostr = strides_of(&out_shape);
        let mut pstr = vec![0usize; product.len()];
        match &f.c_perm {
            None => pstr.clone_from(&ostr),
            Some(p) => {
                for (pos, &d) in p.iter().enumerate() {
                    pstr[d] = ostr[pos];
                }
            }
        }
        let pr = product.len();
        if pstr[pr - 1] != 1 {
            return None; // The micro-kernels write rows of C contiguously.
        }
        let ldc = pstr[pr - 2];
        // Epilogue inputs, broadcast over the product.
        let extras: Vec<&Tensor> = (0..f.extra).map(|i| inputs.get(2 + i).copied().flatten()).collect::<Option<_>>()?;
        let mut extra_slices = Vec::with_capacity(extras.len());
        let mut extra_strides = Vec::with_capacity(extras.len());
        for e in &extras {
            if broadcast_shapes("FusedMatMul", &[&product, e.shape()]).ok()? != product {
                return None;
            }
            extra_slices.push(e.as_slice::<f32>().ok()?);
            extra_strides.push(broadcast_strides(e.shape(), &product));
        }
        let spec = GemmSpec {
            epilogue: f.epilogue.clone(),
            col_broadcast: extras.iter().map(|e| col_broadcast(&product, e)).collect(),
        };
        let driver = self.jit.gemm(&spec)?;
        for (st, &cb) in extra_strides.iter().zip(&spec.col_broadcast) {
            if !cb && st[pr - 1] != 1 {
                return None;
            }
        }

        // Per batch: offsets of A, B and C, and of each extra input.
        let nb = batch.len();
        let a_bstr = broadcast_strides_of(abatch, &astr[..r - 2], &batch);
        let b_bstr = broadcast_strides_of(&bbatch, &bbstr, &batch);
        let c_bstr = &pstr[..nb];
        let batches: usize = batch.iter().product();
        let mut offsets = Vec::with_capacity(batches);
        crate::op::for_each_broadcast(&batch, [&a_bstr, &b_bstr, c_bstr], |o| offsets.push(o));
        let extra_boff: Vec<Vec<usize>> = extra_strides
            .iter()
            .map(|st| {
                let mut v = Vec::with_capacity(batches);
                crate::op::for_each_broadcast(&batch, [&st[..nb]], |[o]| v.push(o));
                v
            })
            .collect();

        let xs = a.as_slice::<f32>().ok()?;
        let bsl = b.as_slice::<f32>().ok()?;
        let panels = n.div_ceil(NR);
        // Activation B matrices are packed per batch first (in parallel).
        let packed_store: Vec<f32>;
        let panel_len = k * NR * panels;
        let bptr_of: Box<dyn Fn(usize) -> *const f32 + Sync> = match f.packed {
            Some(_) => {
                if bsl.len() != panel_len {
                    return Some(Err(Error::op("FusedMatMul", "packed weights have the wrong size")));
                }
                let p = bsl.as_ptr() as usize;
                Box::new(move |_| p as *const f32)
            }
            None => {
                let (_, bstr) = view(b.shape(), &f.b_perm);
                let rb = bstr.len();
                let (rs, cs) = (bstr[rb - 2], bstr[rb - 1]);
                let mut store = Uninit::new(panel_len * offsets.len());
                let dst = SendPtr(store.ptr());
                let pack = self.jit.pack;
                offsets.par_iter().enumerate().for_each(|(i, o)| {
                    // SAFETY: the source view (offset o[1], k rows at stride rs, n columns at
                    // stride cs) lies inside b (its strides come from b's shape); each task
                    // writes its own panel_len floats of the store.
                    unsafe { pack(bsl.as_ptr().add(o[1]), k, n, rs, cs, dst.get().add(i * panel_len)) };
                });
                // SAFETY: the pack function writes every element of every panel (zero past n).
                packed_store = unsafe { store.assume_init() };
                let p = packed_store.as_ptr() as usize;
                Box::new(move |i| (p as *const f32).wrapping_add(i * panel_len))
            }
        };
        let mut out = Uninit::new(total);
        let c = SendPtr(out.ptr());
        // Work items: (batch, panel range). Enough items to keep every thread busy.
        let threads = rayon::current_num_threads().max(1);
        let splits =
            if offsets.len() >= threads { 1 } else { (threads * 2).div_ceil(offsets.len()).min(panels).max(1) };
        let per = panels.div_ceil(splits);
        let items: Vec<(usize, usize, usize)> = (0..offsets.len())
            .flat_map(|bi| (0..splits).map(move |s| (bi, s * per, ((s + 1) * per).min(panels))))
            .filter(|&(_, p0, p1)| p0 < p1)
            .collect();
        let (mr, kernel) = (self.jit.tier.mr(), self.jit.micro_kernel as usize);
        items.par_iter().for_each(|&(bi, p0, p1)| {
            let o = offsets[bi];
            let operands: Vec<EpiOperand> = extra_slices
                .iter()
                .zip(&extra_strides)
                .zip(&extra_boff)
                .map(|((s, st), boff)| EpiOperand { ptr: s.as_ptr().wrapping_add(boff[bi]), row_stride: st[pr - 2] })
                .collect();
            let args = GemmArgs {
                m,
                n,
                k,
                a: xs.as_ptr().wrapping_add(o[0]),
                lda,
                b: bptr_of(bi),
                c: c.get().wrapping_add(o[2]),
                ldc,
                panel_begin: p0,
                panel_end: p1,
                kernel,
                mr,
                kc: KC,
                operands: operands.as_ptr(),
            };
            // SAFETY: A's batch view (m rows at stride lda, k contiguous floats) and B's panels
            // (panels * k * NR floats) lie inside their tensors; C's rows for this batch and
            // the columns of panels p0..p1 lie inside the output and no other item writes
            // them; each operand covers the product's rows (row_stride) and columns, or is
            // read at column 0 when it broadcasts; the micro-kernel pointer is this tier's.
            unsafe { driver(&args) };
        });
        // SAFETY: the items cover every batch and every panel, and each driver call writes all
        // m rows of its panels' columns.
        let v = unsafe { out.assume_init() };
        Some(Tensor::new(out_shape, v).map(|t| vec![t]))
    }
}

/// Strides of a batch view broadcast to `batch` (0 along broadcast dims).
fn broadcast_strides_of(shape: &[usize], strides: &[usize], batch: &[usize]) -> Vec<usize> {
    let pad = batch.len() - shape.len();
    let mut out = vec![0usize; batch.len()];
    for i in 0..shape.len() {
        out[pad + i] = if shape[i] == 1 && batch[pad + i] != 1 { 0 } else { strides[i] };
    }
    out
}

/// Rows per parallel task so that each task has at least ~16k elements.
fn rows_per_task(rows: usize, len: usize) -> usize {
    let min_rows = (16 * 1024 / len.max(1)).max(1);
    let threads = rayon::current_num_threads().max(1);
    rows.div_ceil(threads * 4).max(min_rows).min(rows.max(1))
}

/// `Transpose` as strided copies of contiguous runs.
fn transpose(t: &Transpose, inputs: &[Option<&Tensor>]) -> Option<Result<Vec<Tensor>>> {
    let x = inputs.first().copied().flatten()?;
    if x.dtype() != crate::DType::F32 {
        return None;
    }
    let perm = t.perm(x.rank()).ok()?;
    let (shape, st) = view(x.shape(), &Some(perm));
    let xs = x.as_slice::<f32>().ok()?;
    let mut out = vec![0f32; x.len()];
    let r = shape.len();
    if r == 0 {
        return Some(Ok(vec![x.clone()]));
    }
    let inner = shape[r - 1];
    let inner_stride = st[r - 1];
    let outer = &shape[..r - 1];
    let mut bases = Vec::with_capacity(x.len() / inner.max(1));
    crate::op::for_each_broadcast(outer, [&st[..r - 1]], |[o]| bases.push(o));
    out.par_chunks_mut(inner.max(1)).zip(bases.par_iter()).for_each(|(row, &b)| {
        if inner_stride == 1 {
            row.copy_from_slice(&xs[b..b + inner]);
        } else {
            for (j, v) in row.iter_mut().enumerate() {
                *v = xs[b + j * inner_stride];
            }
        }
    });
    Some(Tensor::new(shape, out).map(|t| vec![t]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::pack_b;
    use crate::op::{BinaryKind, EpiOp, Epilogue, EvalContext, UnaryKind};
    use crate::plan::Step;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn t(shape: &[usize], seed: u64) -> Tensor {
        Tensor::new(shape.to_vec(), rand(shape.iter().product(), seed)).unwrap()
    }

    fn fast_for(tier: Tier, ops: &[Op]) -> Option<Fast> {
        if !tier.supported() {
            eprintln!("{tier} is not supported here");
            return None;
        }
        let plan = Plan {
            steps: ops
                .iter()
                .map(|op| Step { op: op.clone(), inputs: vec![], outputs: vec![], name: String::new() })
                .collect(),
            ..Default::default()
        };
        Some(Fast::new(&plan, tier).unwrap())
    }

    fn assert_close(tag: &str, got: &Tensor, want: &Tensor, tol: f32) {
        assert_eq!(got.shape(), want.shape(), "{tag}");
        let (g, w) = (got.as_slice::<f32>().unwrap(), want.as_slice::<f32>().unwrap());
        let scale = w.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            assert!((a - b).abs() <= tol * scale, "{tag}: element {i}: {a} vs {b} (scale {scale})");
        }
    }

    fn gelu_bias_residual() -> Epilogue {
        // ((acc + bias) * 0.5 * (1 + erf((acc + bias) / sqrt2))) + residual
        Epilogue(vec![
            EpiOp::Acc,
            EpiOp::Input(0),
            EpiOp::Binary(BinaryKind::Add, 0, 1),
            EpiOp::Const(std::f32::consts::SQRT_2),
            EpiOp::Binary(BinaryKind::Div, 2, 3),
            EpiOp::Unary(UnaryKind::Erf, 4),
            EpiOp::Const(1.0),
            EpiOp::Binary(BinaryKind::Add, 5, 6),
            EpiOp::Binary(BinaryKind::Mul, 2, 7),
            EpiOp::Const(0.5),
            EpiOp::Binary(BinaryKind::Mul, 8, 9),
            EpiOp::Input(1),
            EpiOp::Binary(BinaryKind::Add, 10, 11),
        ])
    }

    #[test]
    fn linear_with_fused_epilogue_on_every_tier_and_odd_shapes() {
        let epi = gelu_bias_residual();
        let proto: Op = FusedMatMul {
            a_perm: None,
            b_perm: None,
            packed: Some([1, 1]),
            c_perm: None,
            epilogue: epi.clone(),
            extra: 2,
        }
        .into();
        for tier in Tier::ALL {
            let Some(fast) = fast_for(tier, std::slice::from_ref(&proto)) else { continue };
            for &(m, k, n) in &[(1, 1, 1), (5, 7, 3), (13, 64, 33), (128, 300, 100), (3, 1, 65), (26, 768, 32)] {
                let op: Op = FusedMatMul {
                    a_perm: None,
                    b_perm: None,
                    packed: Some([k, n]),
                    c_perm: None,
                    epilogue: epi.clone(),
                    extra: 2,
                }
                .into();
                let a = t(&[m, k], 1);
                let w = rand(k * n, 2);
                let packed = pack_b(k, n, &w);
                let b = Tensor::new(vec![packed.len()], packed).unwrap();
                let bias = t(&[n], 3);
                let res = t(&[m, n], 4);
                let ins = [Some(&a), Some(&b), Some(&bias), Some(&res)];
                let want = op.eval(&EvalContext::default(), &ins).unwrap().remove(0);
                let got = fast.eval(&op, &ins).expect("handled").unwrap().remove(0);
                assert_close(&format!("{tier} {m}x{k}x{n}"), &got, &want, 2e-5);
            }
        }
    }

    #[test]
    fn attention_products_with_folded_transposes() {
        let (b, s, h, d) = (2, 37, 3, 40);
        let epi = Epilogue(vec![
            EpiOp::Acc,
            EpiOp::Const(0.125),
            EpiOp::Binary(BinaryKind::Mul, 0, 1),
            EpiOp::Input(0),
            EpiOp::Binary(BinaryKind::Add, 2, 3),
        ]);
        let scores: Op = FusedMatMul {
            a_perm: Some(vec![0, 2, 1, 3]),
            b_perm: Some(vec![0, 2, 3, 1]),
            packed: None,
            c_perm: None,
            epilogue: epi,
            extra: 1,
        }
        .into();
        let context: Op = FusedMatMul {
            a_perm: None,
            b_perm: Some(vec![0, 2, 1, 3]),
            packed: None,
            c_perm: Some(vec![0, 2, 1, 3]),
            epilogue: Epilogue::default(),
            extra: 0,
        }
        .into();
        for tier in Tier::ALL {
            let Some(fast) = fast_for(tier, &[scores.clone(), context.clone()]) else { continue };
            let (q, kk, v) = (t(&[b, s, h, d], 5), t(&[b, s, h, d], 6), t(&[b, s, h, d], 7));
            let mask = t(&[b, 1, 1, s], 8);
            let ins = [Some(&q), Some(&kk), Some(&mask)];
            let want = scores.eval(&EvalContext::default(), &ins).unwrap().remove(0);
            let got = fast.eval(&scores, &ins).expect("handled").unwrap().remove(0);
            assert_close(&format!("{tier} scores"), &got, &want, 1e-5);
            let probs = t(&[b, h, s, s], 9);
            let ins = [Some(&probs), Some(&v)];
            let want = context.eval(&EvalContext::default(), &ins).unwrap().remove(0);
            let got = fast.eval(&context, &ins).expect("handled").unwrap().remove(0);
            assert_eq!(got.shape(), &[b, s, h, d]);
            assert_close(&format!("{tier} context"), &got, &want, 1e-5);
        }
    }

    #[test]
    fn softmax_layernorm_transpose_match_the_reference() {
        for tier in Tier::ALL {
            let Some(fast) = fast_for(tier, &[]) else { continue };
            let ctx = EvalContext::default();
            for &(rows, len) in &[(1, 1), (3, 3), (7, 4), (5, 5), (40, 128), (2, 385)] {
                let mut x = t(&[rows, len], 10);
                if len > 2 {
                    let mut v = x.as_slice::<f32>().unwrap().to_vec();
                    v[1] = f32::NEG_INFINITY;
                    v[2] = -3.4e38;
                    v.iter_mut().for_each(|e| *e *= 8.0);
                    x = Tensor::new(vec![rows, len], v).unwrap();
                }
                let sm: Op = Softmax { axis: -1, log: false }.into();
                let want = sm.eval(&ctx, &[Some(&x)]).unwrap().remove(0);
                let got = fast.eval(&sm, &[Some(&x)]).expect("handled").unwrap().remove(0);
                assert_close(&format!("{tier} softmax {rows}x{len}"), &got, &want, 1e-6);
                let x = t(&[rows, len], 11);
                let (g, bta) = (t(&[len], 12), t(&[len], 13));
                let ln: Op = LayerNorm { axis: -1, epsilon: 1e-12 }.into();
                for ins in [vec![Some(&x), Some(&g), Some(&bta)], vec![Some(&x), Some(&g)]] {
                    let want = ln.eval(&ctx, &ins).unwrap().remove(0);
                    let got = fast.eval(&ln, &ins).expect("handled").unwrap().remove(0);
                    assert_close(&format!("{tier} layernorm {rows}x{len}"), &got, &want, 2e-5);
                }
            }
            let x = t(&[2, 3, 4, 5], 14);
            for perm in [vec![0, 2, 1, 3], vec![3, 2, 1, 0], vec![0, 1, 3, 2]] {
                let op: Op = Transpose { perm: Some(perm.clone()) }.into();
                let want = op.eval(&ctx, &[Some(&x)]).unwrap().remove(0);
                let got = fast.eval(&op, &[Some(&x)]).expect("handled").unwrap().remove(0);
                assert!(got.bit_eq(&want), "{perm:?}");
            }
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use crate::op::{EvalContext, Softmax};

    #[test]
    #[ignore = "timing probe, run by hand"]
    fn softmax_speed() {
        let fast = Fast::new(&Plan::default(), Tier::detect()).unwrap();
        let x = Tensor::new(vec![12 * 128, 128], (0..12 * 128 * 128).map(|i| (i % 17) as f32 / 7.0).collect()).unwrap();
        let op: Op = Softmax { axis: -1, log: false }.into();
        for _ in 0..3 {
            fast.eval(&op, &[Some(&x)]);
        }
        let t0 = std::time::Instant::now();
        for _ in 0..100 {
            fast.eval(&op, &[Some(&x)]);
        }
        eprintln!("jit softmax: {:.3} ms", t0.elapsed().as_secs_f64() * 10.0);
        let t0 = std::time::Instant::now();
        for _ in 0..10 {
            op.eval(&EvalContext::default(), &[Some(&x)]).unwrap();
        }
        eprintln!("reference softmax: {:.3} ms", t0.elapsed().as_secs_f64() * 100.0);
        let f = fast.jit.softmax;
        let xs = x.as_slice::<f32>().unwrap();
        let mut y = vec![0f32; xs.len()];
        let t0 = std::time::Instant::now();
        for _ in 0..100 {
            unsafe { f(xs.as_ptr(), y.as_mut_ptr(), 12 * 128, 128) };
        }
        eprintln!("jit softmax, one thread, no split: {:.3} ms", t0.elapsed().as_secs_f64() * 10.0);
    }
}

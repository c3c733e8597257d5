//! Fused ops made by tcc's passes: a matrix product with transposes folded into its operands'
//! strides and an elementwise epilogue folded into its output.
//!
//! `FusedMatMul` computes `epilogue(matmul(permute(a, a_perm), B))` where `B` is either a
//! tensor (`permute(b, b_perm)`) or constant weights packed in panels ([`crate::kernels::pack_b`])
//! at build time, and the epilogue is a small elementwise program over the product and extra
//! inputs that broadcast to the output. The output may be written permuted (`c_perm`), which is
//! how `MatMul -> Transpose` in attention becomes one op. Its `eval` is the reference; the JIT
//! runs the same program in generated code.

use super::linalg::{gemm_f32, matmul_dims, matmul_shape};
use super::{
    broadcast_dims, broadcast_shapes, broadcast_strides, for_each_broadcast, req, Arity, EvalContext, Fact, OpDef,
};
use crate::dim::Dim;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels;
use crate::op::{BinaryKind, UnaryKind};
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// One instruction of an epilogue program; instructions refer to earlier results by index.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EpiOp {
    /// The matrix product's element.
    Acc,
    /// Element of extra input `i` (input `2 + i` of the op), broadcast to the output.
    Input(usize),
    Const(f32),
    Unary(UnaryKind, usize),
    Binary(BinaryKind, usize, usize),
    /// `DequantizeLinear(QuantizeLinear(r))` of an earlier result ([`super::FakeQuant`]).
    FakeQuant(usize, super::FakeQuant),
}

/// An elementwise program; the last instruction's value is the output.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Epilogue(pub Vec<EpiOp>);

impl Epilogue {
    /// This program with the product scaled by extra input `input` first: `[Acc, Input,
    /// Mul, old...]`, the old program's `Acc` reading the scaled product (how weights' scales,
    /// or activations' row scales, enter an epilogue).
    pub fn scale_first(&self, input: usize) -> Epilogue {
        let mut new = vec![EpiOp::Acc, EpiOp::Input(input), EpiOp::Binary(BinaryKind::Mul, 0, 1)];
        if self.is_identity() {
            return Epilogue(new);
        }
        let mut at = Vec::with_capacity(self.0.len());
        for (i, op) in self.0.iter().enumerate() {
            let op = match *op {
                EpiOp::Acc if i + 1 < self.0.len() => {
                    at.push(2);
                    continue;
                }
                EpiOp::Acc => EpiOp::Unary(UnaryKind::Identity, 2),
                EpiOp::Input(j) => EpiOp::Input(j),
                EpiOp::Const(c) => EpiOp::Const(c),
                EpiOp::Unary(k, a) => EpiOp::Unary(k, at[a]),
                EpiOp::Binary(k, a, b) => EpiOp::Binary(k, at[a], at[b]),
                EpiOp::FakeQuant(a, q) => EpiOp::FakeQuant(at[a], q),
            };
            at.push(new.len());
            new.push(op);
        }
        Epilogue(new)
    }

    pub fn is_identity(&self) -> bool {
        self.0.is_empty() || self.0 == [EpiOp::Acc]
    }

    /// The unary and binary ops an epilogue may use (f32 in, f32 out).
    pub fn supports_unary(k: UnaryKind) -> bool {
        use UnaryKind::*;
        matches!(k, Identity | Neg | Abs | Sqrt | Reciprocal | Exp | Erf | Tanh | Relu | Sigmoid)
    }

    pub fn supports_binary(k: BinaryKind) -> bool {
        use BinaryKind::*;
        matches!(k, Add | Sub | Mul | Div | Max | Min)
    }

    fn check(&self, extra: usize) -> Result<()> {
        for (i, op) in self.0.iter().enumerate() {
            let ok = match op {
                EpiOp::Acc | EpiOp::Const(_) => true,
                EpiOp::Input(j) => *j < extra,
                EpiOp::Unary(k, a) => Self::supports_unary(*k) && *a < i,
                EpiOp::Binary(k, a, b) => Self::supports_binary(*k) && *a < i && *b < i,
                EpiOp::FakeQuant(a, q) => *a < i && q.validate().is_ok(),
            };
            if !ok {
                return Err(Error::op("FusedMatMul", format!("bad epilogue instruction {i}: {op:?}")));
            }
        }
        Ok(())
    }

    /// Evaluates the program on one element with the reference semantics of each op.
    pub fn eval(&self, acc: f32, inputs: &[f32], regs: &mut Vec<f32>) -> f32 {
        if self.0.is_empty() {
            return acc;
        }
        regs.clear();
        for op in &self.0 {
            let v = match *op {
                EpiOp::Acc => acc,
                EpiOp::Input(i) => inputs[i],
                EpiOp::Const(c) => c,
                EpiOp::Unary(k, a) => super::elementwise::unary_f32(k, regs[a]),
                EpiOp::Binary(k, a, b) => super::elementwise::binary_f32(k, regs[a], regs[b]),
                EpiOp::FakeQuant(a, q) => q.apply(regs[a]),
            };
            regs.push(v);
        }
        *regs.last().expect("non-empty program")
    }
}

/// `epilogue(permute(a) . B)` with `B` a tensor or packed constant weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FusedMatMul {
    /// Permutation applied to `a` before the product (a folded `Transpose`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub a_perm: Option<Vec<usize>>,
    /// Permutation applied to `b` before the product; unused when `b` is packed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub b_perm: Option<Vec<usize>>,
    /// When set, `b` holds `[k, n]` weights packed in panels of [`kernels::NR`] columns:
    /// a 1-D tensor of `ceil(n / NR) * k * NR` elements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packed: Option<[usize; 2]>,
    /// Permutation applied to the (epilogue's) result (a folded `Transpose` of the output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub c_perm: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Epilogue::is_identity")]
    pub epilogue: Epilogue,
    /// Number of extra inputs the epilogue reads.
    #[serde(default)]
    pub extra: usize,
    /// The ops folded into the epilogue, in order (`Add`, `Gelu`...): for reports and
    /// `tcc inspect`, never read to compute.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fused: Vec<String>,
    /// When set, the product is integer: `A` is quantized to `u8` at run time as this says,
    /// `B` holds `s8` weights packed by [`kernels::int8::pack_b_s8`] (`packed` gives `[k, n]`),
    /// and the epilogue's `Acc` is `scale_a * sum_k (q_a - zero_a) * w`, the sum exact in
    /// `i32` (the weights' own scales are an epilogue input like a bias), on every kernel tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub int8: Option<ActQuant>,
    /// How the kernels walk the packed weights, chosen at build time by the cost model of the
    /// `formats` pass (`None`: by the runtime at load, from the share of zero blocks; artifacts
    /// built before the pass). Never changes what the product computes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<WeightFormat>,
}

/// The format the kernels read a product's packed weights in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightFormat {
    /// Every panel, zeros included.
    Dense,
    /// Block-sparse: the kernels walk the blocks of 64 rows of `k` by a 32-column panel that
    /// hold a nonzero weight, found at load, instead of the panels (int8:
    /// [`crate::kernels::int8::Sparse`], read in place, or from a compact copy where half the
    /// blocks or more are zero; f32: the runs of such rows, [`crate::kernels::PanelRuns`]).
    Blocks,
}

impl WeightFormat {
    pub const ALL: [WeightFormat; 2] = [WeightFormat::Dense, WeightFormat::Blocks];

    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::Dense => "dense",
            WeightFormat::Blocks => "blocks",
        }
    }
}

/// How an integer [`FusedMatMul`] quantizes its `f32` activations to `u8`: asymmetric, the
/// range widened to include 0, scale and zero point as `DynamicQuantizeLinear` computes them
/// ([`super::quant::dynamic_qparams`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActQuant {
    /// One scale and zero point per row of `A` (per token), from the row's range: an outlier
    /// in one token costs only that token precision.
    DynamicRow,
    /// One scale and zero point for all of `A`, from its whole range (`DynamicQuantizeLinear`).
    DynamicTensor,
    /// The model's own scale and zero point (QDQ models: calibrated at export), applied as
    /// `QuantizeLinear` does, by division: `saturate(round_half_even(x / scale) + zero_point)`.
    Static { scale: f32, zero_point: u8 },
}

/// An activation of an integer product in `u8`: `saturate(round_half_even(x * inv_scale) +
/// zp)`, NaN giving `zp` (by the reciprocal of the scale: within an ulp of the division, and
/// what the kernels compute).
pub fn quantize_u8_by(x: f32, inv_scale: f32, zp: u8) -> u8 {
    let v = (x * inv_scale).clamp(-(zp as f32), 255.0 - zp as f32);
    let v = if v.is_nan() { 0.0 } else { v };
    (super::elementwise::round_half_even(v) + zp as f32) as u8
}

/// Largest inner dimension of an integer product: `|sum| <= 2 * 255 * 128 * k` stays in `i32`.
pub const MAX_INT8_K: usize = 1 << 15;

impl ActQuant {
    /// Quantizes `rows` rows of `k` floats (`a`, contiguous) into `q` (rows of `ldq >= k`
    /// bytes; the bytes past `k` are left as they are); returns each row's scale and zero point.
    pub fn quantize(self, a: &[f32], rows: usize, k: usize, q: &mut [u8], ldq: usize) -> (Vec<f32>, Vec<i32>) {
        let params = |xs: &[f32]| {
            let (lo, hi) = xs.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
            super::quant::dynamic_qparams(lo, hi)
        };
        let whole = match self {
            ActQuant::DynamicRow => None,
            ActQuant::DynamicTensor => Some(params(&a[..rows * k])),
            ActQuant::Static { scale, zero_point } => Some((scale, zero_point)),
        };
        let (mut scales, mut zps) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
        for r in 0..rows {
            let x = &a[r * k..(r + 1) * k];
            let (s, z) = whole.unwrap_or_else(|| params(x));
            let inv = 1.0 / s;
            for (d, &v) in q[r * ldq..r * ldq + k].iter_mut().zip(x) {
                *d = match self {
                    ActQuant::Static { .. } => super::quant::quantize_value(v, s, z as i64, 0.0, 255.0) as u8,
                    _ => quantize_u8_by(v, inv, z),
                };
            }
            scales.push(s);
            zps.push(z as i32);
        }
        (scales, zps)
    }
}

pub(crate) fn permute<T: Clone>(v: &[T], perm: &Option<Vec<usize>>) -> Vec<T> {
    match perm {
        None => v.to_vec(),
        Some(p) => p.iter().map(|&i| v[i].clone()).collect(),
    }
}

fn check_perm(p: &Option<Vec<usize>>, rank: usize) -> Result<()> {
    if let Some(p) = p {
        let mut s = p.clone();
        s.sort_unstable();
        if s != (0..rank).collect::<Vec<_>>() {
            return Err(Error::op("FusedMatMul", format!("{p:?} is not a permutation of rank {rank}")));
        }
    }
    Ok(())
}

/// A tensor with its dims permuted (a copy).
pub(crate) fn transpose_tensor(t: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let op = super::Transpose { perm: Some(perm.iter().map(|&x| x as i64).collect()) };
    Ok(op.eval(&EvalContext::default(), &[Some(t)])?.remove(0))
}

impl FusedMatMul {
    /// Elements of packed weights `[k, n]`: f32 panels, or `s8` panels of groups of four rows.
    pub fn packed_len(&self, k: usize, n: usize) -> usize {
        match self.int8 {
            None => n.div_ceil(kernels::NR) * k * kernels::NR,
            Some(_) => n.div_ceil(kernels::NR) * kernels::int8::k_groups(k) * 4 * kernels::NR,
        }
    }

    /// Shape of `B` as the product sees it.
    fn b_dims(&self, b: &Fact) -> Result<Vec<Dim>> {
        match self.packed {
            Some([k, n]) => {
                let want = self.packed_len(k, n);
                if b.shape.len() != 1 || b.shape[0].as_const() != Some(want as i64) {
                    return Err(Error::op(
                        "FusedMatMul",
                        format!("packed weights [{k}, {n}] need {want} elements, got {b}"),
                    ));
                }
                Ok(vec![Dim::from(k), Dim::from(n)])
            }
            None => {
                check_perm(&self.b_perm, b.rank())?;
                Ok(permute(&b.shape, &self.b_perm))
            }
        }
    }

    /// `(k, n)` when `B` is one matrix of known size (weights, packed or not): each row of `A`
    /// costs `k * n` multiply-adds.
    pub fn matrix_b(&self, b: &Fact) -> Option<(usize, usize)> {
        match self.b_dims(b).ok()?.as_slice() {
            [k, n] => Some((k.as_const()? as usize, n.as_const()? as usize)),
            _ => None,
        }
    }

    /// The product's shape (before `c_perm`).
    pub fn product_dims(&self, a: &Fact, b: &Fact) -> Result<Vec<Dim>> {
        check_perm(&self.a_perm, a.rank())?;
        matmul_dims("FusedMatMul", &permute(&a.shape, &self.a_perm), &self.b_dims(b)?)
    }
}

impl FusedMatMul {
    /// An integer product needs packed `s8` weights read as they are.
    fn check_int8(&self) -> Result<()> {
        if let Some(ActQuant::Static { scale, .. }) = self.int8 {
            if !(scale.is_finite() && scale > 0.0) {
                return Err(Error::op("FusedMatMul", format!("activation scale {scale} must be finite and positive")));
            }
        }
        match (self.int8, self.packed) {
            (None, _) => Ok(()),
            (Some(_), Some([k, _])) if self.b_perm.is_none() && k <= MAX_INT8_K => Ok(()),
            (Some(_), _) => Err(Error::op(
                "FusedMatMul",
                format!("an integer product needs packed weights with k <= {MAX_INT8_K}, not permuted"),
            )),
        }
    }
}

/// The reference integer product: `rows x k` activations quantized by `act`, times `k x n`
/// `s8` weights, exact in `i32`, then scaled by each row's activation scale.
pub fn int8_product(act: ActQuant, a: &[f32], w: &[i8], rows: usize, k: usize, n: usize) -> Vec<f32> {
    let mut q = vec![0u8; rows * k];
    let (scales, zps) = act.quantize(a, rows, k, &mut q, k);
    let colsum: Vec<i32> = (0..n).map(|j| (0..k).map(|p| w[p * n + j] as i32).sum()).collect();
    let mut out = vec![0f32; rows * n];
    let mut acc = vec![0i32; n];
    for r in 0..rows {
        acc.iter_mut().zip(&colsum).for_each(|(c, s)| *c = -zps[r] * s);
        for p in 0..k {
            let x = q[r * k + p] as i32;
            for (c, &y) in acc.iter_mut().zip(&w[p * n..(p + 1) * n]) {
                *c += x * y as i32;
            }
        }
        for (o, &c) in out[r * n..(r + 1) * n].iter_mut().zip(&acc) {
            *o = c as f32 * scales[r];
        }
    }
    out
}

impl OpDef for FusedMatMul {
    const NAMES: &'static [&'static str] = &["FusedMatMul"];

    fn arity(&self) -> Arity {
        Arity::exact(2 + self.extra, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let (a, b) = (req("FusedMatMul", inputs, 0)?, req("FusedMatMul", inputs, 1)?);
        let b_dtype = if self.int8.is_some() { DType::I8 } else { DType::F32 };
        if a.dtype != DType::F32 || b.dtype != b_dtype {
            return Err(Error::op("FusedMatMul", format!("operands must be f32 and {b_dtype}")));
        }
        self.check_int8()?;
        self.epilogue.check(self.extra)?;
        let out = self.product_dims(a, b)?;
        for i in 0..self.extra {
            let e = req("FusedMatMul", inputs, 2 + i)?;
            if e.dtype != DType::F32 {
                return Err(Error::op("FusedMatMul", format!("epilogue input {i} must be f32")));
            }
            let bs = broadcast_dims("FusedMatMul", &[&out, &e.shape])?;
            if bs.len() != out.len() || bs.iter().zip(&out).any(|(x, y)| x != y && !x.is_unknown()) {
                return Err(Error::op(
                    "FusedMatMul",
                    format!("epilogue input {i} {e} does not broadcast to the product {out:?}"),
                ));
            }
        }
        check_perm(&self.c_perm, out.len())?;
        Ok(vec![Fact::new(DType::F32, permute(&out, &self.c_perm))])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let (a, b) = (req("FusedMatMul", inputs, 0)?, req("FusedMatMul", inputs, 1)?);
        self.epilogue.check(self.extra)?;
        let a = match &self.a_perm {
            Some(p) => transpose_tensor(a, p)?,
            None => a.clone(),
        };
        self.check_int8()?;
        if let Some([k, n]) = self.packed {
            let want = self.packed_len(k, n);
            if b.len() != want {
                return Err(Error::op(
                    "FusedMatMul",
                    format!("packed weights [{k}, {n}] need {want} elements, got {}", b.len()),
                ));
            }
        }
        let (s, mut out) = match (self.int8, self.packed, &self.b_perm) {
            (Some(act), Some([k, n]), _) => {
                let w = kernels::int8::unpack_b_s8(k, n, b.as_slice::<i8>()?);
                let s = matmul_shape("FusedMatMul", a.shape(), &[k, n])?;
                super::check_alloc("FusedMatMul", &s.out)?;
                let out = int8_product(act, a.as_slice::<f32>()?, &w, s.out.iter().product::<usize>() / n.max(1), k, n);
                (s, out)
            }
            (_, packed, perm) => {
                let b = match (packed, perm) {
                    (Some([k, n]), _) => Tensor::new(vec![k, n], kernels::unpack_b(k, n, b.as_slice::<f32>()?))?,
                    (None, Some(p)) => transpose_tensor(b, p)?,
                    (None, None) => b.clone(),
                };
                let s = matmul_shape("FusedMatMul", a.shape(), b.shape())?;
                super::check_alloc("FusedMatMul", &s.out)?;
                let (x, y) = (a.as_slice::<f32>()?, b.as_slice::<f32>()?);
                let offsets = super::linalg::batch_offsets(&s);
                let (m, k, n) = (s.m, s.k, s.n);
                let mut out = vec![0f32; offsets.len() * m * n];
                for (c, &(i, j)) in out.chunks_mut((m * n).max(1)).zip(offsets.iter()) {
                    gemm_f32(m, k, n, &x[i * m * k..(i + 1) * m * k], &y[j * k * n..(j + 1) * k * n], c);
                }
                (s, out)
            }
        };
        if !self.epilogue.is_identity() {
            let extras: Vec<&Tensor> =
                (0..self.extra).map(|i| req("FusedMatMul", inputs, 2 + i)).collect::<Result<_>>()?;
            let slices: Vec<&[f32]> = extras.iter().map(|t| t.as_slice::<f32>()).collect::<Result<_>>()?;
            for t in &extras {
                if broadcast_shapes("FusedMatMul", &[&s.out, t.shape()])? != s.out {
                    return Err(Error::op(
                        "FusedMatMul",
                        format!("epilogue input {:?} does not broadcast to {:?}", t.shape(), s.out),
                    ));
                }
            }
            let strides: Vec<Vec<usize>> = extras.iter().map(|t| broadcast_strides(t.shape(), &s.out)).collect();
            let mut vals = vec![0f32; extras.len()];
            let mut regs = Vec::new();
            let mut idx = 0usize;
            // Walk the output once per extra input to get offsets, then apply.
            let mut offs: Vec<Vec<usize>> = Vec::with_capacity(extras.len());
            for st in &strides {
                let mut o = Vec::with_capacity(out.len());
                for_each_broadcast(&s.out, [st], |[p]| o.push(p));
                offs.push(o);
            }
            for v in out.iter_mut() {
                for (e, (sl, o)) in slices.iter().zip(&offs).enumerate() {
                    vals[e] = sl[o[idx]];
                }
                *v = self.epilogue.eval(*v, &vals, &mut regs);
                idx += 1;
            }
        }
        let t = Tensor::new(s.out, out)?;
        Ok(vec![match &self.c_perm {
            Some(p) => transpose_tensor(&t, p)?,
            None => t,
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::Op;

    #[test]
    fn fused_equals_the_unfused_ops() {
        // y = gelu-ish(x . W + bias) + residual, with W packed.
        let (m, k, n) = (3, 5, 40);
        let x = Tensor::new(vec![m, k], (0..m * k).map(|i| i as f32 / 10.0 - 0.7).collect()).unwrap();
        let w: Vec<f32> = (0..k * n).map(|i| ((i * 7 % 13) as f32 - 6.0) / 13.0).collect();
        let bias = Tensor::new(vec![n], (0..n).map(|i| i as f32 / 40.0).collect()).unwrap();
        let res = Tensor::new(vec![m, n], (0..m * n).map(|i| (i % 5) as f32).collect()).unwrap();
        let packed = Tensor::new(vec![kernels::pack_b(k, n, &w).len()], kernels::pack_b(k, n, &w)).unwrap();
        let epi = Epilogue(vec![
            EpiOp::Acc,
            EpiOp::Input(0),
            EpiOp::Binary(BinaryKind::Add, 0, 1),
            EpiOp::Unary(UnaryKind::Tanh, 2),
            EpiOp::Input(1),
            EpiOp::Binary(BinaryKind::Add, 3, 4),
        ]);
        let op: Op = FusedMatMul {
            a_perm: None,
            b_perm: None,
            packed: Some([k, n]),
            c_perm: None,
            epilogue: epi,
            extra: 2,
            fused: vec![],
            int8: None,
            weights: None,
        }
        .into();
        let ctx = EvalContext::default();
        let y = op.eval(&ctx, &[Some(&x), Some(&packed), Some(&bias), Some(&res)]).unwrap().remove(0);
        let wt = Tensor::new(vec![k, n], w).unwrap();
        let mm = Op::from(super::super::MatMul {}).eval(&ctx, &[Some(&x), Some(&wt)]).unwrap().remove(0);
        let add = |a: &Tensor, b: &Tensor| {
            Op::from(super::super::Binary::new(BinaryKind::Add)).eval(&ctx, &[Some(a), Some(b)]).unwrap().remove(0)
        };
        let t = Op::from(super::super::Unary::new(UnaryKind::Tanh))
            .eval(&ctx, &[Some(&add(&mm, &bias))])
            .unwrap()
            .remove(0);
        let want = add(&t, &res);
        assert!(y.bit_eq(&want));
    }

    #[test]
    fn folded_transposes() {
        // Attention's scores: q [b, s, h, d] read as [b, h, s, d]; k as [b, h, d, s].
        let (b, s, h, d) = (2, 3, 2, 4);
        let q = Tensor::new(vec![b, s, h, d], (0..b * s * h * d).map(|i| (i % 7) as f32).collect()).unwrap();
        let kt = Tensor::new(vec![b, s, h, d], (0..b * s * h * d).map(|i| (i % 5) as f32).collect()).unwrap();
        let fused: Op = FusedMatMul {
            a_perm: Some(vec![0, 2, 1, 3]),
            b_perm: Some(vec![0, 2, 3, 1]),
            packed: None,
            c_perm: Some(vec![0, 2, 1, 3]),
            epilogue: Epilogue::default(),
            extra: 0,
            fused: vec![],
            int8: None,
            weights: None,
        }
        .into();
        let ctx = EvalContext::default();
        let y = fused.eval(&ctx, &[Some(&q), Some(&kt)]).unwrap().remove(0);
        assert_eq!(y.shape(), &[b, s, h, s]);
        let qa = transpose_tensor(&q, &[0, 2, 1, 3]).unwrap();
        let kb = transpose_tensor(&kt, &[0, 2, 3, 1]).unwrap();
        let mm = Op::from(super::super::MatMul {}).eval(&ctx, &[Some(&qa), Some(&kb)]).unwrap().remove(0);
        assert!(y.bit_eq(&transpose_tensor(&mm, &[0, 2, 1, 3]).unwrap()));
        let f = fused.infer(&[Some(&Fact::of_tensor(&q)), Some(&Fact::of_tensor(&kt))]).unwrap();
        assert_eq!(f[0].to_string(), "f32[2, 3, 2, 3]");
    }
}

/// Attention as fused products: `context(softmax(scores(q, k, extras)), v)`, the softmax over
/// the last axis. Inputs: `q`, `k`, `v`, then the scores epilogue's extra inputs (a mask).
/// Made from `FusedMatMul -> Softmax -> FusedMatMul` by the `fuse-attention` pass; the runtime
/// runs it per (batch, head) without materializing the scores.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attention {
    pub scores: FusedMatMul,
    pub context: FusedMatMul,
    /// The softmax's NaN results become 0 ([`super::Softmax::nan_to_zero`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nan_to_zero: bool,
    /// The probabilities are rounded to this quantization grid before the context product
    /// (QDQ models quantize them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probs_quant: Option<super::FakeQuant>,
    /// Both products may take their operands rounded to bf16, their sums staying f32 (int8
    /// builds allow it: `quantize-int8`): CPUs with AMX-BF16 then run the op on tiles
    /// (`kernels::bf16`), others in f32. The reference computes in f32.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bf16: bool,
}

impl Attention {
    fn check(&self) -> Result<()> {
        let ok = self.scores.packed.is_none()
            && self.context.packed.is_none()
            && self.scores.int8.is_none()
            && self.context.int8.is_none()
            && self.context.a_perm.is_none()
            && self.context.extra == 0
            && self.scores.c_perm.is_none()
            && self.probs_quant.as_ref().is_none_or(|q| q.validate().is_ok());
        if !ok {
            return Err(Error::op(
                "Attention",
                "the products must read activations, the context product plain probabilities (quantized with valid parameters)",
            ));
        }
        Ok(())
    }

    /// The number of heads: the second dim of the scores (for `[batch, heads, query, key]`).
    pub fn heads(&self, q: &Fact) -> Option<usize> {
        let dims = permute(&q.shape, &self.scores.a_perm);
        (dims.len() == 4).then(|| dims[1].as_const().map(|h| h as usize)).flatten()
    }

    /// Heads times the head size, for queries of fact `q` (when both are known statically).
    pub fn width(&self, q: &Fact) -> Option<usize> {
        let dims = permute(&q.shape, &self.scores.a_perm);
        let d = dims.get(3)?.as_const()? as usize;
        Some(self.heads(q)? * d)
    }
}

impl OpDef for Attention {
    const NAMES: &'static [&'static str] = &["Attention"];

    fn arity(&self) -> Arity {
        Arity::exact(3 + self.scores.extra, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        self.check()?;
        let mut sin: Vec<Option<&Fact>> = vec![inputs[0], inputs[1]];
        sin.extend(inputs[3..].iter().copied());
        let s = self.scores.infer(&sin)?.remove(0);
        if s.rank() < 2 {
            return Err(Error::op("Attention", "scores must have rank >= 2"));
        }
        let v = req("Attention", inputs, 2)?;
        self.context.infer(&[Some(&s), Some(v)])
    }

    fn eval(&self, ctx: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        self.check()?;
        let mut sin: Vec<Option<&Tensor>> = vec![inputs[0], inputs[1]];
        sin.extend(inputs[3..].iter().copied());
        let s = self.scores.eval(ctx, &sin)?.remove(0);
        let mut p =
            super::Softmax { axis: -1, log: false, nan_to_zero: self.nan_to_zero }.eval(ctx, &[Some(&s)])?.remove(0);
        if let Some(q) = &self.probs_quant {
            p = q.eval(ctx, &[Some(&p)])?.remove(0);
        }
        self.context.eval(ctx, &[Some(&p), inputs.get(2).copied().flatten()])
    }
}

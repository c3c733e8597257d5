//! Matrix products: `MatMul` (numpy semantics, batched with broadcasting).

use super::{broadcast_dims, broadcast_shapes, broadcast_strides, req, Arity, EvalContext, Fact, OpDef};
use crate::dim::Dim;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// `C[m×n] = A[m×k] · B[k×n]`, row-major, f32 accumulation in the order of `k`.
///
/// Rows of `C` are computed in groups of four so each row of `B` is read once per group; rows
/// are spread over threads. Each output element is `sum_p a[i,p] * b[p,j]` in increasing `p`.
pub fn gemm_f32(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    debug_assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    c[..m * n].fill(0.0);
    if m == 0 || n == 0 {
        return;
    }
    let rows_per_task = if m * k * n < 1 << 16 { m } else { 4 * (64 * 1024 / (k * n).max(1)).clamp(1, 16) };
    c[..m * n].par_chunks_mut(rows_per_task * n).enumerate().for_each(|(t, chunk)| {
        let r0 = t * rows_per_task;
        let rows = chunk.len() / n;
        let mut i = 0;
        while i + 4 <= rows {
            let (c0, rest) = chunk[i * n..].split_at_mut(n);
            let (c1, rest) = rest.split_at_mut(n);
            let (c2, rest) = rest.split_at_mut(n);
            let c3 = &mut rest[..n];
            let ar = |r: usize| &a[(r0 + i + r) * k..(r0 + i + r + 1) * k];
            let (a0, a1, a2, a3) = (ar(0), ar(1), ar(2), ar(3));
            for p in 0..k {
                let brow = &b[p * n..(p + 1) * n];
                let (x0, x1, x2, x3) = (a0[p], a1[p], a2[p], a3[p]);
                for j in 0..n {
                    let bv = brow[j];
                    c0[j] += x0 * bv;
                    c1[j] += x1 * bv;
                    c2[j] += x2 * bv;
                    c3[j] += x3 * bv;
                }
            }
            i += 4;
        }
        while i < rows {
            let crow = &mut chunk[i * n..(i + 1) * n];
            let arow = &a[(r0 + i) * k..(r0 + i + 1) * k];
            for (p, &x) in arow.iter().enumerate() {
                let brow = &b[p * n..(p + 1) * n];
                for j in 0..n {
                    crow[j] += x * brow[j];
                }
            }
            i += 1;
        }
    });
}

/// Integer matrix product with i64 accumulation.
fn gemm_i64(m: usize, k: usize, n: usize, a: &[i64], b: &[i64], c: &mut [i64]) {
    for i in 0..m {
        for j in 0..n {
            let mut s = 0i64;
            for p in 0..k {
                s = s.wrapping_add(a[i * k + p].wrapping_mul(b[p * n + j]));
            }
            c[i * n + j] = s;
        }
    }
}

/// Shapes of a numpy matmul: batch dims of the output, and m, k, n. 1-D operands are promoted
/// as numpy does; the returned flags say which promoted dims to drop from the output.
pub(crate) struct MatMulShape {
    pub batch: Vec<usize>,
    pub a_batch_strides: Vec<usize>,
    pub b_batch_strides: Vec<usize>,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub out: Vec<usize>,
}

pub(crate) fn matmul_shape(op: &str, sa: &[usize], sb: &[usize]) -> Result<MatMulShape> {
    if sa.is_empty() || sb.is_empty() {
        return Err(Error::op(op, "operands must have rank >= 1"));
    }
    let a2: Vec<usize> = if sa.len() == 1 { vec![1, sa[0]] } else { sa.to_vec() };
    let b2: Vec<usize> = if sb.len() == 1 { vec![sb[0], 1] } else { sb.to_vec() };
    let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let (k2, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
    if k != k2 {
        return Err(Error::op(op, format!("inner dims differ: {sa:?} x {sb:?}")));
    }
    let (ab, bb) = (&a2[..a2.len() - 2], &b2[..b2.len() - 2]);
    let batch = broadcast_shapes(op, &[ab, bb])?;
    // Strides over the batch grid count whole matrices.
    let batch_strides = |s: &[usize]| broadcast_strides(s, &batch);
    let mut out = batch.clone();
    if sa.len() > 1 {
        out.push(m);
    }
    if sb.len() > 1 {
        out.push(n);
    }
    Ok(MatMulShape { a_batch_strides: batch_strides(ab), b_batch_strides: batch_strides(bb), batch, m, k, n, out })
}

/// Offsets (in matrices) of operand `a` and `b` for every batch index.
pub(crate) fn batch_offsets(s: &MatMulShape) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    super::for_each_broadcast(&s.batch, [&s.a_batch_strides, &s.b_batch_strides], |[i, j]| v.push((i, j)));
    if s.batch.is_empty() {
        v = vec![(0, 0)];
    }
    v
}

/// Symbolic numpy matmul shape.
pub(crate) fn matmul_dims(op: &str, a: &[Dim], b: &[Dim]) -> Result<Vec<Dim>> {
    if a.is_empty() || b.is_empty() {
        return Err(Error::op(op, "operands must have rank >= 1"));
    }
    let one = Dim::constant(1);
    let a2: Vec<Dim> = if a.len() == 1 { vec![one.clone(), a[0].clone()] } else { a.to_vec() };
    let b2: Vec<Dim> = if b.len() == 1 { vec![b[0].clone(), one] } else { b.to_vec() };
    let (ka, kb) = (&a2[a2.len() - 1], &b2[b2.len() - 2]);
    if let (Some(x), Some(y)) = (ka.as_const(), kb.as_const()) {
        if x != y {
            return Err(Error::op(op, format!("inner dims differ: {x} and {y}")));
        }
    }
    let mut out = broadcast_dims(op, &[&a2[..a2.len() - 2], &b2[..b2.len() - 2]])?;
    if a.len() > 1 {
        out.push(a2[a2.len() - 2].clone());
    }
    if b.len() > 1 {
        out.push(b2[b2.len() - 1].clone());
    }
    Ok(out)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatMul {}

impl OpDef for MatMul {
    const NAMES: &'static [&'static str] = &["MatMul"];

    fn arity(&self) -> Arity {
        Arity::exact(2, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let (a, b) = (req("MatMul", inputs, 0)?, req("MatMul", inputs, 1)?);
        if a.dtype != b.dtype {
            return Err(Error::op("MatMul", format!("input dtypes differ: {} and {}", a.dtype, b.dtype)));
        }
        if !matches!(a.dtype, DType::F32 | DType::I64 | DType::I32) {
            return Err(Error::op("MatMul", format!("does not support {}", a.dtype)));
        }
        Ok(vec![Fact::new(a.dtype, matmul_dims("MatMul", &a.shape, &b.shape)?)])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let (a, b) = (req("MatMul", inputs, 0)?, req("MatMul", inputs, 1)?);
        if a.dtype() != b.dtype() {
            return Err(Error::op("MatMul", format!("input dtypes differ: {} and {}", a.dtype(), b.dtype())));
        }
        let s = matmul_shape("MatMul", a.shape(), b.shape())?;
        super::check_alloc("MatMul", &s.out)?;
        let (m, k, n) = (s.m, s.k, s.n);
        let offsets = batch_offsets(&s);
        if a.dtype() == DType::F32 {
            let (x, y) = (a.as_slice::<f32>()?, b.as_slice::<f32>()?);
            let mut out = vec![0f32; offsets.len() * m * n];
            out.par_chunks_mut((m * n).max(1)).zip(offsets.par_iter()).for_each(|(c, &(i, j))| {
                gemm_f32(m, k, n, &x[i * m * k..(i + 1) * m * k], &y[j * k * n..(j + 1) * k * n], c)
            });
            Ok(vec![Tensor::new(s.out, out)?])
        } else if matches!(a.dtype(), DType::I64 | DType::I32) {
            let (x, y) = (a.to_i64s()?, b.to_i64s()?);
            let mut out = vec![0i64; offsets.len() * m * n];
            for (c, &(i, j)) in out.chunks_mut((m * n).max(1)).zip(offsets.iter()) {
                gemm_i64(m, k, n, &x[i * m * k..(i + 1) * m * k], &y[j * k * n..(j + 1) * k * n], c);
            }
            if a.dtype() == DType::I64 {
                Ok(vec![Tensor::new(s.out, out)?])
            } else {
                Ok(vec![Tensor::new(s.out, out.into_iter().map(|v| v as i32).collect())?])
            }
        } else {
            Err(Error::op("MatMul", format!("does not support {}", a.dtype())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::Op;

    fn naive(m: usize, k: usize, n: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn gemm_matches_naive_on_odd_shapes() {
        for (m, k, n) in [(1, 1, 1), (5, 3, 7), (9, 17, 4), (130, 33, 65)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0).collect();
            let mut c = vec![1f32; m * n];
            gemm_f32(m, k, n, &a, &b, &mut c);
            assert_eq!(c, naive(m, k, n, &a, &b), "{m}x{k}x{n}");
        }
    }

    #[test]
    fn batched_matmul_broadcasts_and_promotes_vectors() {
        let a = Tensor::new(vec![2, 1, 2, 3], (0..12).map(|v| v as f32).collect()).unwrap();
        let b = Tensor::new(vec![3, 2], vec![1f32, 0., 0., 1., 1., 1.]).unwrap();
        let op: Op = MatMul {}.into();
        let y = op.eval(&EvalContext::default(), &[Some(&a), Some(&b)]).unwrap().remove(0);
        assert_eq!(y.shape(), &[2, 1, 2, 2]);
        assert_eq!(y.as_slice::<f32>().unwrap(), &[2., 3., 8., 9., 14., 15., 20., 21.]);
        let v = Tensor::new(vec![3], vec![1f32, 1., 1.]).unwrap();
        let y = op.eval(&EvalContext::default(), &[Some(&a), Some(&v)]).unwrap().remove(0);
        assert_eq!(y.shape(), &[2, 1, 2]);
        assert!(op.eval(&EvalContext::default(), &[Some(&v), Some(&a)]).is_err());
    }
}

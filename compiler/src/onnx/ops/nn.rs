//! `MatMul`, `Gemm`, `Softmax`, `LayerNormalization`.

use super::super::{Converted, Ctx};
use tcc_runtime::op::{Binary, BinaryKind, Flatten, LayerNorm, MatMul, Reshape, Shape, Softmax, Transpose};

pub fn matmul(ctx: &mut Ctx) -> Converted {
    let (a, b) = (ctx.input(0)?, ctx.input(1)?);
    Ok(vec![Some(ctx.op1(MatMul {}, &[a, b], "")?)])
}

/// `Gemm` as the ops it is made of: `alpha * A' . B' + beta * C`, transposes as `Transpose`
/// (folded into constants or into the product by later passes).
pub fn gemm(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&["alpha", "beta", "transA", "transB"])?;
    let (alpha, beta) = (ctx.attr_f("alpha", 1.0)?, ctx.attr_f("beta", 1.0)?);
    let (mut a, mut b) = (ctx.input(0)?, ctx.input(1)?);
    if ctx.rank(a) != 2 || ctx.rank(b) != 2 {
        return Err(ctx.err("expects 2-D A and B"));
    }
    if ctx.attr_i("transA", 0)? != 0 {
        a = ctx.op1(Transpose { perm: None }, &[a], "a_t")?;
    }
    if ctx.attr_i("transB", 0)? != 0 {
        b = ctx.op1(Transpose { perm: None }, &[b], "b_t")?;
    }
    let c = ctx.opt(2)?;
    let mut y = ctx.op1(MatMul {}, &[a, b], if alpha == 1.0 && c.is_none() { "" } else { "product" })?;
    if alpha != 1.0 {
        let s = ctx.scalar_f32(alpha, "alpha");
        y = ctx.op1(Binary::new(BinaryKind::Mul), &[y, s], if c.is_none() { "" } else { "scaled" })?;
    }
    if let Some(mut c) = c {
        if beta != 1.0 {
            let s = ctx.scalar_f32(beta, "beta");
            c = ctx.op1(Binary::new(BinaryKind::Mul), &[c, s], "c_scaled")?;
        }
        y = ctx.op1(Binary::new(BinaryKind::Add), &[y, c], "")?;
    }
    Ok(vec![Some(y)])
}

/// `Softmax`/`LogSoftmax`. Before opset 13 the input is coerced to 2-D at `axis` (default 1);
/// that equals the new semantics only when `axis` is the last dim, otherwise the op is
/// computed on the flattened input and reshaped back.
pub fn softmax(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&["axis"])?;
    let log = ctx.op_type() == "LogSoftmax";
    let x = ctx.input(0)?;
    let rank = ctx.rank(x) as i64;
    if ctx.opset >= 13 {
        let axis = ctx.attr_i("axis", -1)?;
        return Ok(vec![Some(ctx.op1(Softmax { axis, log, nan_to_zero: false }, &[x], "")?)]);
    }
    let axis = ctx.attr_i("axis", 1)?;
    let axis = if axis < 0 { axis + rank } else { axis };
    if axis == rank - 1 {
        return Ok(vec![Some(ctx.op1(Softmax { axis: -1, log, nan_to_zero: false }, &[x], "")?)]);
    }
    let flat = ctx.op1(Flatten { axis }, &[x], "flat")?;
    let y = ctx.op1(Softmax { axis: -1, log, nan_to_zero: false }, &[flat], "softmax")?;
    let shape = ctx.op1(Shape { start: None, end: None }, &[x], "shape")?;
    Ok(vec![Some(ctx.op1(Reshape { allowzero: false }, &[y, shape], "")?)])
}

pub fn layer_norm(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&["axis", "epsilon", "stash_type"])?;
    ctx.only_outputs(1, "LayerNormalization's Mean and InvStdDev outputs")?;
    if ctx.attr_i("stash_type", 1)? != 1 {
        return Err(ctx.err("stash_type other than 1 (float32) is not supported"));
    }
    let op = LayerNorm { axis: ctx.attr_i("axis", -1)?, epsilon: ctx.attr_f("epsilon", 1e-5)? };
    let ins = [Some(ctx.input(0)?), Some(ctx.input(1)?), ctx.opt(2)?];
    let ins: Vec<_> = if ins[2].is_none() { ins[..2].to_vec() } else { ins.to_vec() };
    Ok(vec![Some(ctx.op(op, &ins, "")?[0])])
}

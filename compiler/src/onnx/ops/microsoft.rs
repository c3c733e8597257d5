//! onnxruntime's `com.microsoft` fused ops, as its transformer optimizer and quantizer emit
//! them, expanded into tcc ops with onnxruntime's CPU semantics (onnxruntime 1.32):
//!
//! - `Attention`: QKV projection, per-head scaled dot product, the mask *added* to the scaled
//!   scores (`mask_filter_value`, default -10000, where a key is masked), softmax, context.
//!   `mask_index` may be 1-D `[batch]` end positions (keys at or after the end are masked), 2-D
//!   `[batch, keys]` or 3-D `[batch, queries, keys]` with positive values meaning "attend".
//! - `SkipLayerNormalization`: `LayerNorm(input + skip (+ bias))`; output 3 is the sum.
//! - `EmbedLayerNormalization`: word + position (+ segment) embeddings, then LayerNorm;
//!   `mask_index` is the number of mask entries equal to 1 in each row.
//! - `BiasGelu`, `FastGelu` (tanh form), `Gelu`, `QuickGelu`.
//! - `MatMulIntegerToFloat`, `DynamicQuantizeMatMul`.

use super::super::{Converted, Ctx, ImportError};
use super::elementwise::scalar_of;
use super::shape::dim_of;
use tcc_ir::ValueId;
use tcc_runtime::op::{
    Binary, BinaryKind, Cast, ConstantOfShape, DimValue, DynamicQuantizeLinear, Gather, Gelu, GeluApprox, LayerNorm,
    MatMul, MatMulInteger, Range, Reduce, ReduceKind, Reshape, Softmax, Split, Transpose, Unary, UnaryKind, Unsqueeze,
    Where,
};
use tcc_runtime::DType;

fn add(ctx: &mut Ctx, a: ValueId, b: ValueId, s: &str) -> Result<ValueId, ImportError> {
    ctx.op1(Binary::new(BinaryKind::Add), &[a, b], s)
}

fn mul(ctx: &mut Ctx, a: ValueId, b: ValueId, s: &str) -> Result<ValueId, ImportError> {
    ctx.op1(Binary::new(BinaryKind::Mul), &[a, b], s)
}

fn unsqueeze(ctx: &mut Ctx, x: ValueId, axes: &[i64], s: &str) -> Result<ValueId, ImportError> {
    let a = ctx.const_i64s(axes, &format!("{s}_axes"));
    ctx.op1(Unsqueeze {}, &[x, a], s)
}

fn reshape(ctx: &mut Ctx, x: ValueId, shape: &[i64], s: &str) -> Result<ValueId, ImportError> {
    let t = ctx.const_i64s(shape, &format!("{s}_shape"));
    ctx.op1(Reshape { allowzero: false }, &[x, t], s)
}

fn transpose(ctx: &mut Ctx, x: ValueId, perm: &[i64], s: &str) -> Result<ValueId, ImportError> {
    ctx.op1(Transpose { perm: Some(perm.to_vec()) }, &[x], s)
}

fn require_dtype(ctx: &Ctx, v: ValueId, want: &[DType], what: &str) -> Result<(), ImportError> {
    let d = ctx.dtype(v);
    if !want.contains(&d) {
        return Err(ctx.err(format!(
            "{what} must be {}, got {d}",
            want.iter().map(|d| d.name()).collect::<Vec<_>>().join(" or ")
        )));
    }
    Ok(())
}

pub fn attention(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&[
        "num_heads",
        "qkv_hidden_sizes",
        "unidirectional",
        "mask_filter_value",
        "scale",
        "do_rotary",
        "rotary_embedding_dim",
        "past_present_share_buffer",
    ])?;
    let heads = ctx.attr_i("num_heads", 0)?;
    if heads <= 0 {
        return Err(ctx.err("num_heads must be positive"));
    }
    for (attr, what) in [
        ("unidirectional", "unidirectional (causal) attention"),
        ("do_rotary", "rotary embeddings"),
        ("past_present_share_buffer", "past/present buffers"),
    ] {
        if ctx.attr_i(attr, 0)? != 0 {
            return Err(ctx.err(format!("{what} is not supported")));
        }
    }
    for (i, what) in [(4, "past"), (5, "attention_bias"), (6, "past_sequence_length")] {
        if ctx.opt(i)?.is_some() {
            return Err(ctx.err(format!("the {what} input is not supported")));
        }
    }
    ctx.only_outputs(1, "the present output")?;
    let x = ctx.input(0)?;
    let w = ctx.input(1)?;
    if ctx.rank(x) != 3 || ctx.rank(w) != 2 {
        return Err(ctx.err("expects a 3-D input and 2-D weights"));
    }
    let total = ctx.fact(w).shape[1].as_const().ok_or_else(|| ctx.err("the weights' shape must be known"))?;
    let sizes = match ctx.attr_ints("qkv_hidden_sizes")? {
        Some(s) if s.len() == 3 => s,
        Some(_) => return Err(ctx.err("qkv_hidden_sizes must have 3 entries")),
        None if total % 3 == 0 => vec![total / 3; 3],
        None => return Err(ctx.err(format!("weights of width {total} do not split in three"))),
    };
    let (dq, dk, dv) = (sizes[0], sizes[1], sizes[2]);
    if dq != dk || dq % heads != 0 || dv % heads != 0 || dq + dk + dv != total {
        return Err(ctx.err(format!("qkv sizes {sizes:?} do not fit {heads} heads and weights of width {total}")));
    }
    let (h, hv) = (dq / heads, dv / heads);
    let scale = ctx.attr_f("scale", 0.0)?;
    let alpha = if scale == 0.0 { 1.0 / (h as f32).sqrt() } else { scale };
    let mfv = ctx.attr_f("mask_filter_value", -10000.0)?;

    let mut qkv = ctx.op1(MatMul {}, &[x, w], "qkv")?;
    if let Some(b) = ctx.opt(2)? {
        qkv = add(ctx, qkv, b, "qkv_bias")?;
    }
    let split = ctx.const_i64s(&sizes, "qkv_sizes");
    let parts = ctx.op(Split { axis: -1, outputs: 3 }, &[Some(qkv), Some(split)], "qkv_split")?;
    let q = reshape(ctx, parts[0], &[0, 0, heads, h], "q_heads")?;
    let q = transpose(ctx, q, &[0, 2, 1, 3], "q_t")?;
    let k = reshape(ctx, parts[1], &[0, 0, heads, h], "k_heads")?;
    let k = transpose(ctx, k, &[0, 2, 3, 1], "k_t")?;
    let v = reshape(ctx, parts[2], &[0, 0, heads, hv], "v_heads")?;
    let v = transpose(ctx, v, &[0, 2, 1, 3], "v_t")?;
    let scores = ctx.op1(MatMul {}, &[q, k], "scores")?;
    let a = ctx.scalar_f32(alpha, "alpha");
    let mut scores = mul(ctx, scores, a, "scaled")?;
    if let Some(m) = ctx.opt(3)? {
        let bias = attention_mask_bias(ctx, x, m, mfv)?;
        scores = add(ctx, scores, bias, "masked")?;
    }
    let probs = ctx.op1(Softmax { axis: -1, log: false, nan_to_zero: false }, &[scores], "probs")?;
    let context = ctx.op1(MatMul {}, &[probs, v], "context")?;
    let context = transpose(ctx, context, &[0, 2, 1, 3], "context_t")?;
    Ok(vec![Some(reshape(ctx, context, &[0, 0, dv], "")?)])
}

/// The additive mask, broadcastable to `[batch, heads, queries, keys]`.
fn attention_mask_bias(ctx: &mut Ctx, x: ValueId, m: ValueId, mfv: f32) -> Result<ValueId, ImportError> {
    require_dtype(ctx, m, &[DType::I32], "mask_index")?;
    let masked = ctx.scalar_f32(mfv, "mask_value");
    let zero = ctx.scalar_f32(0.0, "mask_zero");
    match ctx.rank(m) {
        1 => {
            let batch = ctx.fact(x).shape[0].clone();
            let len = ctx.fact(m).shape[0].clone();
            if len != batch && len.as_const().is_some() && batch.as_const().is_some() {
                return Err(
                    ctx.err(format!("a 1-D mask_index of length {len} (start and end positions?) is not supported"))
                );
            }
            // Keys at positions >= end are masked.
            let keys = dim_of(ctx, x, 1, "keys")?;
            let start = ctx.scalar_i64(0, "pos_start");
            let step = ctx.scalar_i64(1, "pos_step");
            let pos = ctx.op1(Range {}, &[start, keys, step], "positions")?;
            let end = ctx.op1(Cast { to: DType::I64 }, &[m], "end")?;
            let end = unsqueeze(ctx, end, &[1], "end_col")?;
            let past_end = ctx.op1(Binary::new(BinaryKind::GreaterOrEqual), &[pos, end], "past_end")?;
            let bias = ctx.op1(Where {}, &[past_end, masked, zero], "mask_bias2d")?;
            unsqueeze(ctx, bias, &[1, 2], "mask_bias")
        }
        r @ (2 | 3) => {
            let z = scalar_of(ctx, DType::I32, 0.0, "mask_i32_zero");
            let attend = ctx.op1(Binary::new(BinaryKind::Greater), &[m, z], "attend")?;
            let bias = ctx.op1(Where {}, &[attend, zero, masked], "mask_bias_raw")?;
            unsqueeze(ctx, bias, if r == 2 { &[1, 2] } else { &[1] }, "mask_bias")
        }
        r => Err(ctx.err(format!("a {r}-D mask_index is not supported"))),
    }
}

pub fn skip_layer_norm(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&["epsilon"])?;
    if ctx.output_used(1) || ctx.output_used(2) {
        return Err(ctx.err("the mean and inv_std_var outputs are not supported"));
    }
    let eps = ctx.attr_f("epsilon", 1e-12)?;
    let (x, skip, gamma) = (ctx.input(0)?, ctx.input(1)?, ctx.input(2)?);
    if !matches!(ctx.rank(x), 2 | 3) {
        return Err(ctx.err("the input must be 2-D or 3-D"));
    }
    let mut sum = add(ctx, x, skip, "sum")?;
    if let Some(b) = ctx.opt(4)? {
        sum = add(ctx, sum, b, "sum_bias")?;
    }
    let beta = ctx.opt(3)?;
    let out = ctx.op(LayerNorm { axis: -1, epsilon: eps }, &[Some(sum), Some(gamma), beta], "")?[0];
    Ok(vec![Some(out), None, None, Some(sum)])
}

pub fn embed_layer_norm(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&["epsilon", "mask_index_type"])?;
    let eps = ctx.attr_f("epsilon", 1e-12)?;
    let ids = ctx.input(0)?;
    require_dtype(ctx, ids, &[DType::I32], "input_ids")?;
    let (word, pos_table, gamma, beta) = (ctx.input(2)?, ctx.input(3)?, ctx.input(5)?, ctx.input(6)?);
    let words = ctx.op1(Gather { axis: 0 }, &[word, ids], "words")?;
    let positions = match ctx.opt(8)? {
        Some(p) => ctx.op1(Gather { axis: 0 }, &[pos_table, p], "positions")?,
        None => {
            let len = dim_of(ctx, ids, 1, "seq_len")?;
            let start = ctx.scalar_i64(0, "pos_start");
            let step = ctx.scalar_i64(1, "pos_step");
            let r = ctx.op1(Range {}, &[start, len, step], "position_ids")?;
            ctx.op1(Gather { axis: 0 }, &[pos_table, r], "positions")?
        }
    };
    let mut sum = add(ctx, words, positions, "word_pos")?;
    match (ctx.opt(1)?, ctx.opt(4)?) {
        (Some(seg_ids), Some(seg_table)) => {
            let seg = ctx.op1(Gather { axis: 0 }, &[seg_table, seg_ids], "segments")?;
            sum = add(ctx, sum, seg, "embeddings")?;
        }
        (None, Some(seg_table)) => {
            let z = ctx.scalar_i64(0, "segment0");
            let seg = ctx.op1(Gather { axis: 0 }, &[seg_table, z], "segment0_row")?;
            sum = add(ctx, sum, seg, "embeddings")?;
        }
        (Some(_), None) => return Err(ctx.err("segment_ids without a segment embedding")),
        (None, None) => {}
    }
    let out = ctx.op1(LayerNorm { axis: -1, epsilon: eps }, &[sum, gamma, beta], "")?;
    let mask_index = if !ctx.output_used(1) {
        None
    } else if let Some(mask) = ctx.opt(7)? {
        require_dtype(ctx, mask, &[DType::I32], "mask")?;
        let one = scalar_of(ctx, DType::I32, 1.0, "one");
        let is_one = ctx.op1(Binary::new(BinaryKind::Equal), &[mask, one], "mask_is_one")?;
        let ones = ctx.op1(Cast { to: DType::I32 }, &[is_one], "mask_ones")?;
        let axes = ctx.const_i64s(&[1], "count_axes");
        let count = Reduce { kind: ReduceKind::ReduceSum, keepdims: false, noop_with_empty_axes: false };
        Some(ctx.op1(count, &[ones, axes], "mask_index")?)
    } else {
        let batch = ctx.fact(ids).shape[0].clone();
        let shape = ctx.op1(DimValue { dims: vec![batch], scalar: false }, &[], "mask_index_shape")?;
        Some(ctx.op1(ConstantOfShape { dtype: DType::I32, value: 0.0 }, &[shape], "mask_index")?)
    };
    Ok(vec![Some(out), mask_index, Some(sum)])
}

fn gelu_of(ctx: &mut Ctx, x: ValueId, bias: Option<ValueId>, approximate: GeluApprox) -> Converted {
    let x = match bias {
        Some(b) => add(ctx, x, b, "biased")?,
        None => x,
    };
    Ok(vec![Some(ctx.op1(Gelu { approximate }, &[x], "")?)])
}

pub fn bias_gelu(ctx: &mut Ctx) -> Converted {
    let (x, b) = (ctx.input(0)?, ctx.input(1)?);
    gelu_of(ctx, x, Some(b), GeluApprox::None)
}

pub fn fast_gelu(ctx: &mut Ctx) -> Converted {
    let (x, b) = (ctx.input(0)?, ctx.opt(1)?);
    gelu_of(ctx, x, b, GeluApprox::Tanh)
}

pub fn gelu(ctx: &mut Ctx) -> Converted {
    let x = ctx.input(0)?;
    gelu_of(ctx, x, None, GeluApprox::None)
}

pub fn quick_gelu(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&["alpha"])?;
    let alpha = ctx.attr_f("alpha", 1.702)?;
    let x = ctx.input(0)?;
    let a = ctx.scalar_f32(alpha, "alpha");
    let ax = mul(ctx, x, a, "ax")?;
    let s = ctx.op1(Unary::new(UnaryKind::Sigmoid), &[ax], "sigmoid")?;
    Ok(vec![Some(mul(ctx, x, s, "")?)])
}

/// `Cast(acc, f32) * (a_scale * b_scale) (+ bias)`.
fn rescale(ctx: &mut Ctx, acc: ValueId, a_scale: ValueId, b_scale: ValueId, bias: Option<ValueId>) -> Converted {
    let f = ctx.op1(Cast { to: DType::F32 }, &[acc], "acc_f32")?;
    let s = mul(ctx, a_scale, b_scale, "scale")?;
    let y = mul(ctx, f, s, if bias.is_some() { "scaled" } else { "" })?;
    Ok(vec![Some(match bias {
        Some(b) => add(ctx, y, b, "")?,
        None => y,
    })])
}

fn matmul_integer(
    ctx: &mut Ctx,
    a: ValueId,
    b: ValueId,
    azp: Option<ValueId>,
    bzp: Option<ValueId>,
) -> Result<ValueId, ImportError> {
    let mut ins = vec![Some(a), Some(b), azp, bzp];
    while ins.last() == Some(&None) {
        ins.pop();
    }
    Ok(ctx.op(MatMulInteger {}, &ins, "acc")?[0])
}

pub fn matmul_integer_to_float(ctx: &mut Ctx) -> Converted {
    let (a, b, sa, sb) = (ctx.input(0)?, ctx.input(1)?, ctx.input(2)?, ctx.input(3)?);
    let (za, zb, bias) = (ctx.opt(4)?, ctx.opt(5)?, ctx.opt(6)?);
    let acc = matmul_integer(ctx, a, b, za, zb)?;
    rescale(ctx, acc, sa, sb, bias)
}

pub fn dynamic_quantize_matmul(ctx: &mut Ctx) -> Converted {
    let (a, b, sb) = (ctx.input(0)?, ctx.input(1)?, ctx.input(2)?);
    let (zb, bias) = (ctx.opt(3)?, ctx.opt(4)?);
    let q = ctx.op(DynamicQuantizeLinear {}, &[Some(a)], "quantized")?;
    let acc = matmul_integer(ctx, q[0], b, Some(q[2]), zb)?;
    rescale(ctx, acc, q[1], sb, bias)
}

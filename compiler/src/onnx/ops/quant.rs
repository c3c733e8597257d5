//! Quantization ops, imported with their exact semantics.

use super::super::{Converted, Ctx};
use tcc_ir::{QuantParams, ValueId};
use tcc_runtime::op::{DequantizeLinear, DynamicQuantizeLinear, MatMulInteger, QuantizeLinear};

/// Records a quantized tensor's parameters in the IR when they are constants.
fn annotate(ctx: &mut Ctx, v: ValueId, scale: ValueId, zero_point: Option<ValueId>, axis: i64) {
    let Some(s) = ctx.g.const_of(scale).and_then(|t| t.as_slice::<f32>().ok().map(<[f32]>::to_vec)) else { return };
    let zp = match zero_point {
        None => vec![0; s.len()],
        Some(z) => match ctx.g.const_of(z).and_then(|t| t.to_i64s().ok()) {
            Some(z) if z.len() == s.len() => z.into_iter().map(|x| x as i32).collect(),
            _ => return,
        },
    };
    let axis = (s.len() > 1).then_some(axis);
    ctx.g.value_mut(v).quant = Some(QuantParams { scale: s, zero_point: zp, axis });
}

fn no_blocks(ctx: &Ctx) -> Result<(), crate::onnx::ImportError> {
    if ctx.attr_i("block_size", 0)? != 0 {
        return Err(ctx.err("blocked quantization (block_size) is not supported"));
    }
    Ok(())
}

pub fn quantize_linear(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&["axis", "saturate", "block_size", "output_dtype", "precision"])?;
    no_blocks(ctx)?;
    let output_dtype = match ctx.attr_i("output_dtype", 0)? {
        0 => None,
        t => Some(
            super::super::tensor::dtype_of(t as i32)
                .ok_or_else(|| ctx.err(format!("output_dtype {t} is not supported")))?,
        ),
    };
    let axis = ctx.attr_i("axis", 1)?;
    let op = QuantizeLinear { axis, output_dtype };
    let (scale, zp) = (ctx.input(1)?, ctx.opt(2)?);
    let ins = [Some(ctx.input(0)?), Some(scale), zp];
    let ins: Vec<_> = if ins[2].is_none() { ins[..2].to_vec() } else { ins.to_vec() };
    let y = ctx.op(op, &ins, "")?[0];
    annotate(ctx, y, scale, zp, axis);
    Ok(vec![Some(y)])
}

pub fn dequantize_linear(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&["axis", "block_size", "output_dtype"])?;
    no_blocks(ctx)?;
    let axis = ctx.attr_i("axis", 1)?;
    let op = DequantizeLinear { axis };
    let (x, scale, zp) = (ctx.input(0)?, ctx.input(1)?, ctx.opt(2)?);
    if ctx.g.value(x).quant.is_none() {
        annotate(ctx, x, scale, zp, axis);
    }
    let ins = [Some(x), Some(scale), zp];
    let ins: Vec<_> = if ins[2].is_none() { ins[..2].to_vec() } else { ins.to_vec() };
    Ok(vec![Some(ctx.op(op, &ins, "")?[0])])
}

pub fn dynamic_quantize_linear(ctx: &mut Ctx) -> Converted {
    let x = ctx.input(0)?;
    let outs = ctx.op(DynamicQuantizeLinear {}, &[Some(x)], "")?;
    Ok(outs.into_iter().map(Some).collect())
}

pub fn matmul_integer(ctx: &mut Ctx) -> Converted {
    let mut ins = vec![Some(ctx.input(0)?), Some(ctx.input(1)?), ctx.opt(2)?, ctx.opt(3)?];
    while ins.last() == Some(&None) {
        ins.pop();
    }
    Ok(vec![Some(ctx.op(MatMulInteger {}, &ins, "")?[0])])
}

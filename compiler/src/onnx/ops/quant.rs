//! Quantization ops, imported with their exact semantics.

use super::super::{Converted, Ctx};
use tcc_runtime::op::{DequantizeLinear, DynamicQuantizeLinear, MatMulInteger, QuantizeLinear};

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
    let op = QuantizeLinear { axis: ctx.attr_i("axis", 1)?, output_dtype };
    let ins = [Some(ctx.input(0)?), Some(ctx.input(1)?), ctx.opt(2)?];
    let ins: Vec<_> = if ins[2].is_none() { ins[..2].to_vec() } else { ins.to_vec() };
    Ok(vec![Some(ctx.op(op, &ins, "")?[0])])
}

pub fn dequantize_linear(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&["axis", "block_size", "output_dtype"])?;
    no_blocks(ctx)?;
    let op = DequantizeLinear { axis: ctx.attr_i("axis", 1)? };
    let ins = [Some(ctx.input(0)?), Some(ctx.input(1)?), ctx.opt(2)?];
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

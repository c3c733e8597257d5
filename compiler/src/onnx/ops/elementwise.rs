//! Elementwise ONNX ops.

use super::super::{Converted, Ctx};
use tcc_runtime::op::{Binary, BinaryKind, Cast, Clip, Gelu, GeluApprox, Unary, UnaryKind, Where};
use tcc_runtime::{DType, Tensor};

pub fn unary(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&[])?;
    let kind = UnaryKind::from_name(ctx.op_type()).expect("registered names are unary kinds");
    let x = ctx.input(0)?;
    Ok(vec![Some(ctx.op1(Unary::new(kind), &[x], "")?)])
}

pub fn is_inf(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&["detect_negative", "detect_positive"])?;
    if ctx.attr_i("detect_negative", 1)? != 1 || ctx.attr_i("detect_positive", 1)? != 1 {
        return Err(ctx.err("only detect_negative=1, detect_positive=1 is supported"));
    }
    let x = ctx.input(0)?;
    Ok(vec![Some(ctx.op1(Unary::new(UnaryKind::IsInf), &[x], "")?)])
}

/// `Identity`, and `Dropout` at inference (its mask output is not supported).
pub fn identity(ctx: &mut Ctx) -> Converted {
    if ctx.op_type() == "Dropout" {
        ctx.only_outputs(1, "Dropout's mask output")?;
        if let Some(t) = ctx.opt(2)? {
            if ctx.const_ints(t).is_none_or(|v| v.iter().any(|&x| x != 0)) {
                return Err(ctx.err("training_mode must be a constant false"));
            }
        }
    }
    Ok(vec![Some(ctx.input(0)?)])
}

pub fn binary(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&[])?;
    let kind = BinaryKind::from_name(ctx.op_type()).expect("registered names are binary kinds");
    let (a, b) = (ctx.input(0)?, ctx.input(1)?);
    Ok(vec![Some(ctx.op1(Binary::new(kind), &[a, b], "")?)])
}

pub fn modulo(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&["fmod"])?;
    let (a, b) = (ctx.input(0)?, ctx.input(1)?);
    let fmod = ctx.attr_i("fmod", 0)? != 0;
    // tcc's Mod is fmod for floats and Python's sign rule for integers, ONNX's defaults.
    if fmod == (ctx.dtype(a) != DType::F32) {
        return Err(ctx.err(format!("fmod={} on {} is not supported", u8::from(fmod), ctx.dtype(a))));
    }
    Ok(vec![Some(ctx.op1(Binary::new(BinaryKind::Mod), &[a, b], "")?)])
}

/// `Max`, `Min`, `Sum`, `Mean` of any number of inputs, as a chain of binary ops.
pub fn variadic(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&[])?;
    let name = ctx.op_type().to_string();
    let kind = match name.as_str() {
        "Max" => BinaryKind::Max,
        "Min" => BinaryKind::Min,
        _ => BinaryKind::Add,
    };
    let ins = ctx.all_inputs()?;
    let (&first, rest) = ins.split_first().ok_or_else(|| ctx.err("needs at least one input"))?;
    let mut acc = first;
    for (i, &v) in rest.iter().enumerate() {
        acc = ctx.op1(Binary::new(kind), &[acc, v], &format!("{i}"))?;
    }
    if name == "Mean" && ins.len() > 1 {
        let n = ctx.scalar_f32(ins.len() as f32, "n");
        acc = ctx.op1(Binary::new(BinaryKind::Div), &[acc, n], "mean")?;
    }
    Ok(vec![Some(acc)])
}

pub fn where_(ctx: &mut Ctx) -> Converted {
    let ins = [ctx.input(0)?, ctx.input(1)?, ctx.input(2)?];
    Ok(vec![Some(ctx.op1(Where {}, &ins, "")?)])
}

pub fn cast(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&["to", "saturate", "round_mode"])?;
    let to = ctx.attr_i("to", 0)?;
    let dtype = super::super::tensor::dtype_of(to as i32).ok_or_else(|| {
        ctx.err(format!("casting to {} is not supported", super::super::tensor::elem_type_name(to as i32)))
    })?;
    let x = ctx.input(0)?;
    Ok(vec![Some(ctx.op1(Cast { to: dtype }, &[x], "")?)])
}

pub fn cast_like(ctx: &mut Ctx) -> Converted {
    let (x, like) = (ctx.input(0)?, ctx.input(1)?);
    let to = ctx.dtype(like);
    Ok(vec![Some(ctx.op1(Cast { to }, &[x], "")?)])
}

/// `Clip`: bounds are attributes before opset 11, inputs after.
pub fn clip(ctx: &mut Ctx) -> Converted {
    let x = ctx.input(0)?;
    let (lo, hi) = if ctx.opset < 11 {
        ctx.check_attrs(&["min", "max"])?;
        let lo = if ctx.has_attr("min") { Some(ctx.attr_f("min", 0.0)?) } else { None };
        let hi = if ctx.has_attr("max") { Some(ctx.attr_f("max", 0.0)?) } else { None };
        (lo.map(|v| ctx.scalar_f32(v, "min")), hi.map(|v| ctx.scalar_f32(v, "max")))
    } else {
        (ctx.opt(1)?, ctx.opt(2)?)
    };
    Ok(vec![Some(ctx.op(Clip {}, &[Some(x), lo, hi], "")?[0])])
}

pub fn gelu(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&["approximate"])?;
    let approximate = match ctx.attr_s("approximate")?.as_deref() {
        None | Some("none") => GeluApprox::None,
        Some("tanh") => GeluApprox::Tanh,
        Some(a) => return Err(ctx.err(format!("approximate=`{a}` is not supported"))),
    };
    let x = ctx.input(0)?;
    Ok(vec![Some(ctx.op1(Gelu { approximate }, &[x], "")?)])
}

/// A scalar of `dtype` holding `v`.
pub fn scalar_of(ctx: &mut Ctx, dtype: DType, v: f64, suffix: &str) -> tcc_ir::ValueId {
    let t = match dtype {
        DType::F32 => Tensor::scalar(v as f32),
        DType::I64 => Tensor::scalar(v as i64),
        DType::I32 => Tensor::scalar(v as i32),
        DType::I8 => Tensor::scalar(v as i8),
        DType::U8 => Tensor::scalar(v as u8),
        DType::Bool => Tensor::from_bools(vec![], vec![v != 0.0]).expect("scalar"),
    };
    ctx.constant(t, suffix)
}

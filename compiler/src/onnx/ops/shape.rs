//! Shape and data-movement ONNX ops, `Constant`, indexing.

use super::super::{Converted, Ctx};
use tcc_runtime::op::{
    Concat, ConstantOfShape, CumSum, Expand, Flatten, Gather, GatherElements, GatherND, Range, Reshape, Shape, Size,
    Slice, Split, Squeeze, Tile, Transpose, Unsqueeze,
};
use tcc_runtime::{DType, Tensor};

pub fn constant(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&["value", "value_float", "value_floats", "value_int", "value_ints"])?;
    let t = if let Some(t) = ctx.attr_tensor("value")? {
        t
    } else if ctx.has_attr("value_float") {
        Tensor::scalar(ctx.attr_f("value_float", 0.0)?)
    } else if let Some(v) = ctx.attr_floats("value_floats")?.filter(|_| ctx.has_attr("value_floats")) {
        Tensor::new(vec![v.len()], v).map_err(|e| ctx.err(e.to_string()))?
    } else if ctx.has_attr("value_int") {
        Tensor::scalar(ctx.attr_i("value_int", 0)?)
    } else if let Some(v) = ctx.attr_ints("value_ints")? {
        Tensor::new(vec![v.len()], v).map_err(|e| ctx.err(e.to_string()))?
    } else {
        return Err(ctx.err("has no supported value attribute"));
    };
    Ok(vec![Some(ctx.constant(t, ""))])
}

pub fn shape(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&["start", "end"])?;
    let start = if ctx.has_attr("start") { Some(ctx.attr_i("start", 0)?) } else { None };
    let end = if ctx.has_attr("end") { Some(ctx.attr_i("end", 0)?) } else { None };
    let x = ctx.input(0)?;
    Ok(vec![Some(ctx.op1(Shape { start, end }, &[x], "")?)])
}

pub fn size(ctx: &mut Ctx) -> Converted {
    let x = ctx.input(0)?;
    Ok(vec![Some(ctx.op1(Size {}, &[x], "")?)])
}

pub fn reshape(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&["allowzero"])?;
    let allowzero = ctx.attr_i("allowzero", 0)? != 0;
    let (x, s) = (ctx.input(0)?, ctx.input(1)?);
    Ok(vec![Some(ctx.op1(Reshape { allowzero }, &[x, s], "")?)])
}

pub fn flatten(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&["axis"])?;
    let axis = ctx.attr_i("axis", 1)?;
    let x = ctx.input(0)?;
    Ok(vec![Some(ctx.op1(Flatten { axis }, &[x], "")?)])
}

/// Axes from the `axes` attribute (older opsets) or the second input.
fn axes(ctx: &mut Ctx, attr_until: i64) -> Result<Option<tcc_ir::ValueId>, crate::onnx::ImportError> {
    if ctx.opset < attr_until {
        ctx.check_attrs(&["axes"])?;
        Ok(ctx.attr_ints("axes")?.map(|a| ctx.const_i64s(&a, "axes")))
    } else {
        ctx.check_attrs(&[])?;
        ctx.opt(1)
    }
}

pub fn squeeze(ctx: &mut Ctx) -> Converted {
    let a = axes(ctx, 13)?;
    let x = ctx.input(0)?;
    Ok(vec![Some(ctx.op(Squeeze {}, &[Some(x), a], "")?[0])])
}

pub fn unsqueeze(ctx: &mut Ctx) -> Converted {
    let a = axes(ctx, 13)?.ok_or_else(|| ctx.err("axes are required"))?;
    let x = ctx.input(0)?;
    Ok(vec![Some(ctx.op1(Unsqueeze {}, &[x, a], "")?)])
}

pub fn transpose(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&["perm"])?;
    let perm = ctx.attr_ints("perm")?;
    let x = ctx.input(0)?;
    Ok(vec![Some(ctx.op1(Transpose { perm }, &[x], "")?)])
}

pub fn concat(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&["axis"])?;
    if !ctx.has_attr("axis") {
        return Err(ctx.err("the axis attribute is required"));
    }
    let axis = ctx.attr_i("axis", 0)?;
    let ins = ctx.all_inputs()?;
    Ok(vec![Some(ctx.op1(Concat { axis }, &ins, "")?)])
}

pub fn split(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&["axis", "split", "num_outputs"])?;
    let axis = ctx.attr_i("axis", 0)?;
    let outputs = ctx.num_outputs();
    if ctx.has_attr("num_outputs") && ctx.attr_i("num_outputs", 0)? != outputs as i64 {
        return Err(ctx.err("num_outputs differs from the number of outputs"));
    }
    let sizes = if ctx.opset < 13 { ctx.attr_ints("split")?.map(|s| ctx.const_i64s(&s, "split")) } else { ctx.opt(1)? };
    let x = ctx.input(0)?;
    let outs = ctx.op(Split { axis, outputs }, &[Some(x), sizes], "")?;
    Ok(outs.into_iter().map(Some).collect())
}

pub fn slice(ctx: &mut Ctx) -> Converted {
    let x = ctx.input(0)?;
    let ins = if ctx.opset < 10 {
        ctx.check_attrs(&["starts", "ends", "axes"])?;
        let starts = ctx.attr_ints("starts")?.ok_or_else(|| ctx.err("starts are required"))?;
        let ends = ctx.attr_ints("ends")?.ok_or_else(|| ctx.err("ends are required"))?;
        let axes = ctx.attr_ints("axes")?;
        let s = ctx.const_i64s(&starts, "starts");
        let e = ctx.const_i64s(&ends, "ends");
        let a = axes.map(|a| ctx.const_i64s(&a, "axes"));
        vec![Some(x), Some(s), Some(e), a, None]
    } else {
        ctx.check_attrs(&[])?;
        vec![Some(x), Some(ctx.input(1)?), Some(ctx.input(2)?), ctx.opt(3)?, ctx.opt(4)?]
    };
    let ins = trim_none(ins);
    Ok(vec![Some(ctx.op(Slice {}, &ins, "")?[0])])
}

/// Drops trailing omitted inputs.
fn trim_none(mut v: Vec<Option<tcc_ir::ValueId>>) -> Vec<Option<tcc_ir::ValueId>> {
    while v.last() == Some(&None) {
        v.pop();
    }
    v
}

pub fn expand(ctx: &mut Ctx) -> Converted {
    let (x, s) = (ctx.input(0)?, ctx.input(1)?);
    Ok(vec![Some(ctx.op1(Expand {}, &[x, s], "")?)])
}

pub fn tile(ctx: &mut Ctx) -> Converted {
    let (x, r) = (ctx.input(0)?, ctx.input(1)?);
    Ok(vec![Some(ctx.op1(Tile {}, &[x, r], "")?)])
}

pub fn constant_of_shape(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&["value"])?;
    let (dtype, value) = match ctx.attr_tensor("value")? {
        None => (DType::F32, 0.0),
        Some(t) if t.len() == 1 => (t.dtype(), t.to_f64s().map_err(|e| ctx.err(e.to_string()))?[0]),
        Some(t) => return Err(ctx.err(format!("value must hold one element, got shape {:?}", t.shape()))),
    };
    let s = ctx.input(0)?;
    Ok(vec![Some(ctx.op1(ConstantOfShape { dtype, value }, &[s], "")?)])
}

pub fn range(ctx: &mut Ctx) -> Converted {
    let ins = [ctx.input(0)?, ctx.input(1)?, ctx.input(2)?];
    Ok(vec![Some(ctx.op1(Range {}, &ins, "")?)])
}

pub fn gather(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&["axis"])?;
    let axis = ctx.attr_i("axis", 0)?;
    let (x, i) = (ctx.input(0)?, ctx.input(1)?);
    Ok(vec![Some(ctx.op1(Gather { axis }, &[x, i], "")?)])
}

pub fn gather_elements(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&["axis"])?;
    let axis = ctx.attr_i("axis", 0)?;
    let (x, i) = (ctx.input(0)?, ctx.input(1)?);
    Ok(vec![Some(ctx.op1(GatherElements { axis }, &[x, i], "")?)])
}

pub fn gather_nd(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&["batch_dims"])?;
    let batch_dims = ctx.attr_i("batch_dims", 0)?;
    let batch_dims = usize::try_from(batch_dims).map_err(|_| ctx.err("batch_dims must be >= 0"))?;
    let (x, i) = (ctx.input(0)?, ctx.input(1)?);
    Ok(vec![Some(ctx.op1(GatherND { batch_dims }, &[x, i], "")?)])
}

pub fn cumsum(ctx: &mut Ctx) -> Converted {
    ctx.check_attrs(&["exclusive", "reverse"])?;
    let exclusive = ctx.attr_i("exclusive", 0)? != 0;
    let reverse = ctx.attr_i("reverse", 0)? != 0;
    let (x, a) = (ctx.input(0)?, ctx.input(1)?);
    Ok(vec![Some(ctx.op1(CumSum { exclusive, reverse }, &[x, a], "")?)])
}

/// `Shape(x)[axis]` as an i64 scalar (the fold pass makes it a constant or a `DimValue` when
/// the dim is known symbolically).
pub fn dim_of(
    ctx: &mut Ctx,
    x: tcc_ir::ValueId,
    axis: usize,
    suffix: &str,
) -> Result<tcc_ir::ValueId, crate::onnx::ImportError> {
    if ctx.rank(x) <= axis {
        return Err(ctx.err(format!("input has no axis {axis}")));
    }
    let shape = ctx.op1(Shape { start: None, end: None }, &[x], &format!("{suffix}_shape"))?;
    let i = ctx.scalar_i64(axis as i64, &format!("{suffix}_axis"));
    ctx.op1(Gather { axis: 0 }, &[shape, i], suffix)
}

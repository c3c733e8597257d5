//! Reductions. Axes are an attribute before opset 18 (before 13 for `ReduceSum`), an input
//! after.

use super::super::{Converted, Ctx};
use tcc_runtime::op::{Reduce, ReduceKind};

pub fn reduce(ctx: &mut Ctx) -> Converted {
    let kind = ReduceKind::from_name(ctx.op_type()).expect("registered names are reductions");
    let inputs_since = if kind == ReduceKind::ReduceSum { 13 } else { 18 };
    let keepdims = ctx.attr_i("keepdims", 1)? != 0;
    let noop_with_empty_axes = ctx.attr_i("noop_with_empty_axes", 0)? != 0;
    let x = ctx.input(0)?;
    let axes = if ctx.opset < inputs_since {
        ctx.check_attrs(&["axes", "keepdims"])?;
        ctx.attr_ints("axes")?.map(|a| ctx.const_i64s(&a, "axes"))
    } else {
        ctx.check_attrs(&["keepdims", "noop_with_empty_axes"])?;
        ctx.opt(1)?
    };
    let op = Reduce { kind, keepdims, noop_with_empty_axes };
    Ok(vec![Some(ctx.op(op, &[Some(x), axes], "")?[0])])
}

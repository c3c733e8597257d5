//! One converter per ONNX operator, registered in [`lookup`]: the one place to add an op.
//!
//! A converter reads its node through [`Ctx`] (inputs, attributes, opset version), adds tcc ops
//! to the graph, and returns one value per ONNX output. Older opsets are normalized to the
//! newest signature here, so the IR only knows one form of each op.

mod elementwise;
mod microsoft;
mod nn;
mod quant;
mod reduce;
mod shape;

use super::{Converted, Ctx, MS_DOMAIN};

/// A converter.
pub type Convert = fn(&mut Ctx) -> Converted;

/// The converter for `domain::op_type` (`""` is the default ONNX domain).
pub fn lookup(domain: &str, op_type: &str) -> Option<Convert> {
    use elementwise as e;
    use microsoft as ms;
    use nn as n;
    use quant as q;
    use reduce as r;
    use shape as s;
    let f: Convert = match (domain, op_type) {
        (
            "",
            "Neg" | "Abs" | "Sqrt" | "Reciprocal" | "Exp" | "Log" | "Erf" | "Tanh" | "Relu" | "Sigmoid" | "Not"
            | "IsNaN" | "Floor" | "Ceil" | "Round" | "Sign" | "Sin" | "Cos",
        ) => e::unary,
        ("", "IsInf") => e::is_inf,
        ("", "Identity" | "Dropout") => e::identity,
        (
            "",
            "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Equal" | "Less" | "LessOrEqual" | "Greater" | "GreaterOrEqual"
            | "And" | "Or" | "Xor",
        ) => e::binary,
        ("", "Mod") => e::modulo,
        ("", "Max" | "Min" | "Sum" | "Mean") => e::variadic,
        ("", "Where") => e::where_,
        ("", "Cast") => e::cast,
        ("", "CastLike") => e::cast_like,
        ("", "Clip") => e::clip,
        ("", "Gelu") => e::gelu,
        ("", "Constant") => s::constant,
        ("", "Shape") => s::shape,
        ("", "Size") => s::size,
        ("", "Reshape") => s::reshape,
        ("", "Flatten") => s::flatten,
        ("", "Squeeze") => s::squeeze,
        ("", "Unsqueeze") => s::unsqueeze,
        ("", "Transpose") => s::transpose,
        ("", "Concat") => s::concat,
        ("", "Split") => s::split,
        ("", "Slice") => s::slice,
        ("", "Expand") => s::expand,
        ("", "Tile") => s::tile,
        ("", "ConstantOfShape") => s::constant_of_shape,
        ("", "Range") => s::range,
        ("", "Gather") => s::gather,
        ("", "GatherElements") => s::gather_elements,
        ("", "GatherND") => s::gather_nd,
        ("", "CumSum") => s::cumsum,
        (
            "",
            "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL1" | "ReduceL2"
            | "ReduceSumSquare",
        ) => r::reduce,
        ("", "MatMul") => n::matmul,
        ("", "Gemm") => n::gemm,
        ("", "Softmax" | "LogSoftmax") => n::softmax,
        ("", "LayerNormalization") => n::layer_norm,
        ("", "QuantizeLinear") => q::quantize_linear,
        ("", "DequantizeLinear") => q::dequantize_linear,
        ("", "DynamicQuantizeLinear") => q::dynamic_quantize_linear,
        ("", "MatMulInteger") => q::matmul_integer,
        (MS_DOMAIN, "Attention") => ms::attention,
        (MS_DOMAIN, "SkipLayerNormalization") => ms::skip_layer_norm,
        (MS_DOMAIN, "EmbedLayerNormalization") => ms::embed_layer_norm,
        (MS_DOMAIN, "BiasGelu") => ms::bias_gelu,
        (MS_DOMAIN, "FastGelu") => ms::fast_gelu,
        (MS_DOMAIN, "Gelu") => ms::gelu,
        (MS_DOMAIN, "QuickGelu") => ms::quick_gelu,
        (MS_DOMAIN, "MatMulIntegerToFloat") => ms::matmul_integer_to_float,
        (MS_DOMAIN, "DynamicQuantizeMatMul") => ms::dynamic_quantize_matmul,
        _ => return None,
    };
    Some(f)
}

/// Every supported `(domain, op_type)`, for documentation and `tcc inspect --ops`.
pub const SUPPORTED: &[(&str, &str)] = &[
    ("", "Abs"),
    ("", "Add"),
    ("", "And"),
    ("", "Cast"),
    ("", "CastLike"),
    ("", "Ceil"),
    ("", "Clip"),
    ("", "Concat"),
    ("", "Constant"),
    ("", "ConstantOfShape"),
    ("", "Cos"),
    ("", "CumSum"),
    ("", "DequantizeLinear"),
    ("", "Div"),
    ("", "Dropout"),
    ("", "DynamicQuantizeLinear"),
    ("", "Equal"),
    ("", "Erf"),
    ("", "Exp"),
    ("", "Expand"),
    ("", "Flatten"),
    ("", "Floor"),
    ("", "Gather"),
    ("", "GatherElements"),
    ("", "GatherND"),
    ("", "Gelu"),
    ("", "Gemm"),
    ("", "Greater"),
    ("", "GreaterOrEqual"),
    ("", "Identity"),
    ("", "IsInf"),
    ("", "IsNaN"),
    ("", "LayerNormalization"),
    ("", "Less"),
    ("", "LessOrEqual"),
    ("", "Log"),
    ("", "LogSoftmax"),
    ("", "MatMul"),
    ("", "MatMulInteger"),
    ("", "Max"),
    ("", "Mean"),
    ("", "Min"),
    ("", "Mod"),
    ("", "Mul"),
    ("", "Neg"),
    ("", "Not"),
    ("", "Or"),
    ("", "Pow"),
    ("", "QuantizeLinear"),
    ("", "Range"),
    ("", "Reciprocal"),
    ("", "ReduceL1"),
    ("", "ReduceL2"),
    ("", "ReduceMax"),
    ("", "ReduceMean"),
    ("", "ReduceMin"),
    ("", "ReduceProd"),
    ("", "ReduceSum"),
    ("", "ReduceSumSquare"),
    ("", "Relu"),
    ("", "Reshape"),
    ("", "Round"),
    ("", "Shape"),
    ("", "Sigmoid"),
    ("", "Sign"),
    ("", "Sin"),
    ("", "Size"),
    ("", "Slice"),
    ("", "Softmax"),
    ("", "Split"),
    ("", "Sqrt"),
    ("", "Squeeze"),
    ("", "Sub"),
    ("", "Sum"),
    ("", "Tanh"),
    ("", "Tile"),
    ("", "Transpose"),
    ("", "Unsqueeze"),
    ("", "Where"),
    ("", "Xor"),
    (MS_DOMAIN, "Attention"),
    (MS_DOMAIN, "BiasGelu"),
    (MS_DOMAIN, "DynamicQuantizeMatMul"),
    (MS_DOMAIN, "EmbedLayerNormalization"),
    (MS_DOMAIN, "FastGelu"),
    (MS_DOMAIN, "Gelu"),
    (MS_DOMAIN, "MatMulIntegerToFloat"),
    (MS_DOMAIN, "QuickGelu"),
    (MS_DOMAIN, "SkipLayerNormalization"),
];

#[cfg(test)]
mod tests {
    #[test]
    fn the_supported_list_matches_the_registry() {
        for (d, op) in super::SUPPORTED {
            assert!(super::lookup(d, op).is_some(), "{d}::{op} listed but not registered");
        }
        assert!(super::lookup("", "Loop").is_none());
    }
}

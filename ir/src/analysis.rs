//! Facts about a whole graph for reports: parameters, transformer layers and heads.

use crate::graph::{Def, Graph};
use tcc_runtime::DType;

/// Number of weight elements: float and 8-bit constants (index tensors excluded).
pub fn parameters(g: &Graph) -> usize {
    g.used_consts()
        .into_iter()
        .filter_map(|v| match &g.value(v).def {
            Def::Const(t) if matches!(t.dtype(), DType::F32 | DType::I8 | DType::U8) => Some(t.len()),
            _ => None,
        })
        .sum()
}

/// How many of the [`parameters`] are zero: a sparsified model's, or one that came sparse (its
/// packed weights' padding, past the matrix's own rows and columns, counts too).
pub fn zero_parameters(g: &Graph) -> usize {
    g.used_consts()
        .into_iter()
        .filter_map(|v| match &g.value(v).def {
            Def::Const(t) => match t.dtype() {
                DType::F32 => t.as_slice::<f32>().ok().map(|x| x.iter().filter(|&&e| e == 0.0).count()),
                DType::I8 => t.as_slice::<i8>().ok().map(|x| x.iter().filter(|&&e| e == 0).count()),
                DType::U8 => t.as_slice::<u8>().ok().map(|x| x.iter().filter(|&&e| e == 0).count()),
                _ => None,
            },
            _ => None,
        })
        .sum()
}

/// Bytes of constant data.
pub fn weight_bytes(g: &Graph) -> usize {
    g.used_consts().into_iter().filter_map(|v| g.const_of(v)).map(|t| t.len() * t.dtype().size()).sum()
}

/// Floating-point operations (two per multiply-add) of the model's products on one sequence of
/// `seq` tokens: `2 k n` per token for each product by a `[k, n]` matrix (weights, packed or
/// computed, as weight-only int8 models dequantize theirs), and `4 seq h d` per token for each
/// fused attention block of `h` heads of size `d` (scores, then context). Element-wise work is
/// not counted; nor are products before `fuse-matmul`.
pub fn flops(g: &Graph, seq: usize) -> f64 {
    let mut per_token = 0f64;
    for node in &g.nodes {
        match &node.op {
            tcc_runtime::Op::FusedMatMul(f) => {
                if let Some((k, n)) = node.inputs.get(1).copied().flatten().and_then(|b| f.matrix_b(g.fact(b))) {
                    per_token += 2.0 * k as f64 * n as f64;
                }
            }
            tcc_runtime::Op::Attention(a) => {
                if let Some(w) = node.inputs.first().copied().flatten().and_then(|q| a.width(g.fact(q))) {
                    per_token += 4.0 * seq as f64 * w as f64;
                }
            }
            _ => {}
        }
    }
    per_token * seq as f64
}

/// The attention blocks found in the graph, in order, with their number of heads.
///
/// An attention block is a fused `Attention` op or, before fusion, a `Softmax` over the last
/// axis of a rank-4 `[batch, heads, query, key]` tensor; its head count is that tensor's second
/// dim (0 when it is not known statically).
pub fn attention_heads(g: &Graph) -> Vec<usize> {
    let mut heads = Vec::new();
    for node in &g.nodes {
        match node.op.name() {
            "Softmax" => {
                let Some(Some(x)) = node.inputs.first() else {
                    continue;
                };
                let f = g.fact(*x);
                let last_axis = matches!(node.op.attrs().get("axis").and_then(|a| a.as_i64()), Some(-1) | Some(3));
                if f.rank() == 4 && last_axis {
                    heads.push(f.shape[1].as_const().map(|h| h as usize).unwrap_or(0));
                }
            }
            "Attention" => {
                let h = match (&node.op, node.inputs.first().copied().flatten()) {
                    (tcc_runtime::Op::Attention(a), Some(q)) => a.heads(g.fact(q)),
                    _ => None,
                };
                heads.push(h.unwrap_or(0));
            }
            _ => {}
        }
    }
    heads
}

//! Canonicalization: constant folding, shape-subgraph folding, dead code.

use crate::manager::{Pass, PassContext, PassOutcome};
use std::collections::HashSet;
use tcc_ir::op::DimValue;
use tcc_ir::{DType, Def, Fact, Graph, Op, Tensor};
use tcc_runtime::EvalContext;

/// Folds, in one sweep in execution order:
/// - nodes whose inputs are all constants: evaluated now, their outputs become constants
///   (unless that would grow the model: outputs taking more bytes than the inputs plus 16 KiB
///   stay computed, so an `Expand` of a scalar or the dequantization of int8 weights is not
///   baked into the artifact as f32);
/// - outputs whose value is known symbolically from the input shapes (`Shape -> Gather ->
///   Concat` chains): constants when they do not depend on a symbol, else a `DimValue` that
///   the runtime evaluates from the bound symbols.
#[derive(Default)]
pub struct FoldConstants;

const GROWTH_BYTES: usize = 16 << 10;

fn input_symbols(g: &Graph) -> HashSet<String> {
    g.inputs.iter().flat_map(|&v| g.fact(v).shape.iter().flat_map(|d| d.symbols())).map(|s| s.to_string()).collect()
}

impl Pass for FoldConstants {
    fn name(&self) -> &'static str {
        "fold"
    }

    fn run(&mut self, g: &mut Graph, _: &mut PassContext) -> tcc_ir::Result<PassOutcome> {
        let mut out = PassOutcome::default();
        let symbols = input_symbols(g);
        let ctx = EvalContext::default();
        let mut dead = vec![false; g.nodes.len()];
        #[allow(clippy::needless_range_loop)] // `g` is mutated inside.
        for n in 0..g.nodes.len() {
            let node = &g.nodes[n];
            let all_const = node.inputs.iter().flatten().all(|v| g.const_of(*v).is_some());
            let is_dim_value = matches!(node.op, Op::DimValue(_));
            // A `DimValue` of symbols is what folding produces; one of constants folds further.
            let foldable = all_const && !matches!(&node.op, Op::DimValue(d) if d.dims.iter().any(|x| !x.is_const()));
            if foldable {
                let bytes = |t: &Tensor| t.len() * t.dtype().size();
                let in_bytes: usize = node.inputs.iter().flatten().filter_map(|v| g.const_of(*v)).map(bytes).sum();
                let out_bytes: Option<usize> = node
                    .outputs
                    .iter()
                    .map(|o| g.fact(*o).concrete_shape().map(|s| s.iter().product::<usize>() * g.fact(*o).dtype.size()))
                    .sum();
                if out_bytes.is_some_and(|b| b <= in_bytes + GROWTH_BYTES) {
                    let ins: Vec<Option<&Tensor>> = node.inputs.iter().map(|i| i.and_then(|v| g.const_of(v))).collect();
                    let results = node.op.eval(&ctx, &ins).map_err(|e| tcc_ir::Error::Infer {
                        node: node.name.clone(),
                        op: node.op.name().to_string(),
                        message: format!("folding a constant computation failed: {e}"),
                    })?;
                    let outs = node.outputs.clone();
                    for (o, t) in outs.into_iter().zip(results) {
                        let v = g.value_mut(o);
                        v.fact = Fact::of_tensor(&t);
                        v.def = Def::Const(t);
                    }
                    dead[n] = true;
                    out.stat("folded", 1);
                    continue;
                }
            }
            if is_dim_value || node.outputs.len() != 1 {
                continue;
            }
            let o = node.outputs[0];
            let fact = g.fact(o).clone();
            let Some(value) = fact.value.clone() else {
                continue;
            };
            if let Some(t) = value.to_tensor(fact.dtype) {
                let v = g.value_mut(o);
                v.fact = Fact::of_tensor(&t);
                v.def = Def::Const(t);
                dead[n] = true;
                out.stat("shapes_to_constants", 1);
            } else if fact.dtype == DType::I64
                && value.shape.len() <= 1
                && value.data.iter().all(|d| d.symbols().iter().all(|s| symbols.contains(s.as_ref())))
            {
                let node = &mut g.nodes[n];
                node.op = DimValue { dims: value.data.clone(), scalar: value.shape.is_empty() }.into();
                node.inputs.clear();
                out.stat("shapes_to_dim_values", 1);
            }
        }
        let mut it = dead.into_iter();
        g.nodes.retain(|_| !it.next().unwrap_or(false));
        let removed = g.remove_dead_nodes();
        out.stat("dead_removed", removed as i64);
        Ok(out)
    }
}

/// Removes nodes whose outputs nothing reads.
pub struct DeadCode;

impl Pass for DeadCode {
    fn name(&self) -> &'static str {
        "dce"
    }

    fn run(&mut self, g: &mut Graph, _: &mut PassContext) -> tcc_ir::Result<PassOutcome> {
        let mut out = PassOutcome::default();
        out.stat("removed", g.remove_dead_nodes() as i64);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcc_ir::text;

    fn canon(src: &str) -> String {
        let mut g = text::parse(src).unwrap();
        let mut cx = PassContext::default();
        FoldConstants.run(&mut g, &mut cx).unwrap();
        tcc_ir::verify(&g).unwrap();
        text::print(&g.compact())
    }

    #[test]
    fn shape_subgraph_becomes_a_dim_value() {
        let src = r#"graph g(%x: f32[batch, seq, 384]) {
  %i1 = const i64[] [1]
  %z = const i64[1] [0]
  %tail = const i64[2] [12, 32]
  %s = Shape(%x) : i64[3]
  %d = Gather{axis=0}(%s, %i1) : i64[]
  %du = Unsqueeze(%d, %z) : i64[1]
  %b = Gather{axis=0}(%s, %z) : i64[1]
  %t = Concat{axis=0}(%b, %du, %tail) : i64[4]
  %y = Reshape(%x, %t) : f32[batch, seq, 12, 32]
  return %y
}
"#;
        let want = r#"graph g(%x: f32[batch, seq, 384]) {
  %t = DimValue{dims=["batch","seq",12,32], scalar=false}() : i64[4]
  %y = Reshape{allowzero=false}(%x, %t) : f32[batch, seq, 12, 32]
  return %y
}
"#;
        assert_eq!(canon(src), want);
    }

    #[test]
    fn constants_fold_unless_they_grow() {
        let src = r#"graph g(%x: f32[2]) {
  %a = const f32[2] [1, 2]
  %one = const f32[1] [1]
  %s = const i64[1] [100000]
  %b = Neg(%a) : f32[2]
  %y = Add(%x, %b) : f32[2]
  %big = Expand(%one, %s) : f32[100000]
  return %y, %big
}
"#;
        let out = canon(src);
        assert!(out.contains("const f32[2] [-1, -2]"), "{out}");
        assert!(out.contains("Expand"), "{out}");
        assert!(!out.contains("Neg"), "{out}");
    }
}

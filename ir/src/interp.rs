//! The reference interpreter: runs a graph node by node with the ops' reference semantics.
//!
//! It is deliberately plain (no fusion, no planning beyond freeing a value after its last
//! use): it is the oracle that optimized plans and kernels are checked against, and it runs
//! calibration through [`run_observed`].

use crate::error::{Error, Result};
use crate::graph::{Def, Graph, ValueId};
use tcc_runtime::plan::{bind_symbols, Input};
use tcc_runtime::{EvalContext, Tensor};

/// The graph's inputs as runtime input declarations.
pub fn input_specs(g: &Graph) -> Vec<Input> {
    g.inputs
        .iter()
        .map(|&v| {
            let val = g.value(v);
            Input { name: val.name.clone(), dtype: val.fact.dtype, shape: val.fact.shape.clone(), slot: v.0 }
        })
        .collect()
}

/// Runs `g` on named inputs; returns the named outputs in order.
pub fn run(g: &Graph, inputs: &[(String, Tensor)]) -> Result<Vec<(String, Tensor)>> {
    run_observed(g, inputs, &mut |_, _| {})
}

/// Runs `g`, calling `observe` with every value computed (inputs and node outputs).
pub fn run_observed(
    g: &Graph,
    inputs: &[(String, Tensor)],
    observe: &mut dyn FnMut(ValueId, &Tensor),
) -> Result<Vec<(String, Tensor)>> {
    let symbols = bind_symbols(&input_specs(g), inputs)?;
    let ctx = EvalContext { symbols };
    let mut vals: Vec<Option<Tensor>> = vec![None; g.values.len()];
    for &v in &g.inputs {
        let name = &g.value(v).name;
        let t = tcc_runtime::plan::find_input(inputs, name)?.clone();
        observe(v, &t);
        vals[v.index()] = Some(t);
    }
    // Last reader of each value, so intermediates can be dropped.
    let mut last = vec![usize::MAX; g.values.len()];
    for (n, node) in g.nodes.iter().enumerate() {
        for v in node.inputs.iter().flatten() {
            last[v.index()] = n;
        }
    }
    let outputs: std::collections::HashSet<ValueId> = g.outputs.iter().map(|o| o.value).collect();
    for (n, node) in g.nodes.iter().enumerate() {
        let ins: Vec<Option<&Tensor>> = node
            .inputs
            .iter()
            .map(|i| match i {
                None => Ok(None),
                Some(v) => match (&g.value(*v).def, &vals[v.index()]) {
                    (Def::Const(t), _) => Ok(Some(t)),
                    (_, Some(t)) => Ok(Some(t)),
                    _ => Err(Error::Verify(format!(
                        "node `{}` reads `{}` before it is computed",
                        node.name,
                        g.value(*v).name
                    ))),
                },
            })
            .collect::<Result<_>>()?;
        let outs = node.op.eval(&ctx, &ins).map_err(|e| match e {
            tcc_runtime::Error::Op { op, message } => {
                tcc_runtime::Error::Op { op: format!("{op} `{}`", node.name), message }
            }
            e => e,
        })?;
        if outs.len() != node.outputs.len() {
            return Err(Error::Verify(format!(
                "node `{}` made {} outputs, expected {}",
                node.name,
                outs.len(),
                node.outputs.len()
            )));
        }
        for (&o, t) in node.outputs.iter().zip(outs) {
            observe(o, &t);
            vals[o.index()] = Some(t);
        }
        for v in node.inputs.iter().flatten() {
            if last[v.index()] == n && !outputs.contains(v) {
                vals[v.index()] = None;
            }
        }
    }
    g.outputs
        .iter()
        .map(|o| {
            let t = match &g.value(o.value).def {
                Def::Const(t) => t.clone(),
                _ => vals[o.value.index()]
                    .clone()
                    .ok_or_else(|| Error::Verify(format!("output `{}` was not computed", o.name)))?,
            };
            Ok((o.name.clone(), t))
        })
        .collect()
}

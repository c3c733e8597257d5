//! The verifier: structural rules every graph obeys between passes.
//!
//! - inputs are `Input` values, constants hold a tensor matching their fact, every computed
//!   value is produced by exactly one node;
//! - nodes are in topological order and read only values defined before them;
//! - each node has the arity its op requires, and its outputs' facts are what the op infers
//!   from its inputs' facts (dtype and rank exactly, dims where both are known).

use crate::error::{Error, Result};
use crate::graph::{Def, Graph, ValueId};
use std::collections::HashSet;

pub fn verify(g: &Graph) -> Result<()> {
    let bad = |m: String| Err(Error::Verify(m));
    let n_values = g.values.len();
    let valid = |v: ValueId| v.index() < n_values;
    let mut defined: HashSet<ValueId> = HashSet::new();
    for &i in &g.inputs {
        if !valid(i) || !matches!(g.value(i).def, Def::Input) {
            return bad(format!("input {i} is not an input value"));
        }
        defined.insert(i);
    }
    for (i, v) in g.values.iter().enumerate() {
        if let Def::Const(t) = &v.def {
            if t.dtype() != v.fact.dtype || v.fact.concrete_shape().as_deref() != Some(t.shape()) {
                return bad(format!("constant `{}` is {:?} but its fact says {}", v.name, t, v.fact));
            }
            defined.insert(ValueId(i as u32));
        }
    }
    for node in &g.nodes {
        let a = node.op.arity();
        if node.inputs.len() < a.min_inputs || node.inputs.len() > a.max_inputs {
            return bad(format!("node `{}` ({}) has {} inputs", node.name, node.op.name(), node.inputs.len()));
        }
        if node.outputs.len() != a.outputs {
            return bad(format!(
                "node `{}` ({}) has {} outputs, the op makes {}",
                node.name,
                node.op.name(),
                node.outputs.len(),
                a.outputs
            ));
        }
        for v in node.inputs.iter().flatten() {
            if !valid(*v) || !defined.contains(v) {
                return bad(format!("node `{}` reads {v} before it is defined", node.name));
            }
        }
        let facts: Vec<_> = node.inputs.iter().map(|i| i.map(|v| g.fact(v))).collect();
        let inferred = node.op.infer(&facts).map_err(|e| Error::infer(&node.name, &node.op, e))?;
        for (&o, f) in node.outputs.iter().zip(&inferred) {
            if !valid(o) || !matches!(g.value(o).def, Def::Computed) {
                return bad(format!("node `{}` writes {o}, which is not a computed value", node.name));
            }
            if !defined.insert(o) {
                return bad(format!("{o} (`{}`) is produced twice", g.value(o).name));
            }
            let have = g.fact(o);
            let dims_agree = have.shape.len() == f.shape.len()
                && have.shape.iter().zip(&f.shape).all(|(a, b)| a == b || a.is_unknown() || b.is_unknown());
            if have.dtype != f.dtype || !dims_agree {
                return bad(format!("`{}` is typed {have} but {} infers {f}", g.value(o).name, node.op.name()));
            }
        }
    }
    for o in &g.outputs {
        if !valid(o.value) || !defined.contains(&o.value) {
            return bad(format!("output `{}` is never defined", o.name));
        }
    }
    Ok(())
}

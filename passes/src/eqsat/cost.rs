//! The extraction cost model.
//!
//! The cost of a term is the sum over its e-nodes of:
//! - leaves (inputs, weights, scalars): 0;
//! - an op the runtime runs as one fused kernel (`LayerNorm`, `Gelu`, `Attention`,
//!   `FusedMatMul`, `Softmax`): 1 per pass over its output;
//! - shape-only ops (`Reshape`, `Unsqueeze`, `Squeeze`, `Flatten`, `DimValue`, `Shape`): 1;
//! - any other op: 2 (a pass over memory, and a node the runtime dispatches);
//! - an e-node whose type cannot be inferred (a rewrite that does not type-check here): never
//!   extracted.
//!
//! So a recognized structure (one `LayerNorm` for nine elementwise ops and two reductions)
//! always wins, and among equal structures the one with fewer passes over memory does. This
//! is deliberately coarse: kernels' speed is measured by the benchmarks, and the model only has
//! to rank rewrites that remove work.

use super::lang::{Tl, TlGraph};
use egg::{CostFunction, Id, Language};

/// Cost of a term (see the module docs).
pub struct CostModel<'a> {
    egraph: &'a TlGraph,
    /// The e-nodes of the original graph (children canonical): among equal costs these win
    /// by a hair, so that an unchanged part of the graph is written back as it was.
    original: std::collections::HashSet<Tl>,
}

/// What a new e-node costs more than an original one of the same op.
const NEW_NODE: f64 = 1e-3;

impl<'a> CostModel<'a> {
    pub fn new(egraph: &'a TlGraph, original: impl IntoIterator<Item = Tl>) -> CostModel<'a> {
        let original = original.into_iter().map(|n| n.map_children(|c| egraph.find(c))).collect();
        CostModel { egraph, original }
    }

    /// The cost of one e-node without its children.
    pub fn node_cost(name: &str) -> f64 {
        match name {
            "LayerNorm" | "Gelu" | "Attention" | "FusedMatMul" | "Softmax" => 1.0,
            "Reshape" | "Unsqueeze" | "Squeeze" | "Flatten" | "DimValue" | "Shape" | "Identity" => 1.0,
            _ => 2.0,
        }
    }
}

impl CostFunction<Tl> for CostModel<'_> {
    type Cost = f64;

    fn cost<C>(&mut self, enode: &Tl, mut costs: C) -> f64
    where
        C: FnMut(Id) -> f64,
    {
        match enode {
            Tl::Scalar(_) | Tl::Leaf(_) => 0.0,
            Tl::Op(sym, children) => {
                let typed = {
                    let facts: Vec<Option<&tcc_ir::Fact>> = children
                        .iter()
                        .map(|c| {
                            let class = &self.egraph[*c];
                            class.data.fact.as_ref()
                        })
                        .collect();
                    // Absent optional inputs have no fact and are allowed.
                    sym.op().infer(&facts).is_ok_and(|o| o.len() == 1)
                };
                if !typed {
                    return f64::INFINITY;
                }
                let canonical = enode.clone().map_children(|c| self.egraph.find(c));
                let own = Self::node_cost(sym.name()) + if self.original.contains(&canonical) { 0.0 } else { NEW_NODE };
                enode.fold(own, |sum, id| sum + costs(id))
            }
        }
    }
}

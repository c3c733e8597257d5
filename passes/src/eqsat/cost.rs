//! The extraction cost model.
//!
//! The cost of a term is the sum over its e-nodes of:
//! - leaves (inputs, weights, scalars): 0;
//! - an op the runtime runs as one fused kernel (`LayerNorm`, `Gelu`, `Attention`,
//!   `FusedMatMul`, `Softmax`): 1 per pass over its output;
//! - shape-only ops (`Reshape`, `Unsqueeze`, `Squeeze`, `Flatten`, `DimValue`, `Shape`): 1;
//! - any other op: 2 (a pass over memory, and a node the runtime dispatches), except an
//!   elementwise op reading a matrix product: 0.25, since `fuse-matmul` runs it in the
//!   product's epilogue (so scalings move after products, onto the product's tiles);
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

/// Elementwise ops that `fuse-matmul` folds into a product's epilogue.
const EPILOGUE_OPS: &[&str] = &["Add", "Sub", "Mul", "Div", "Gelu", "Erf", "Tanh", "Relu", "Sigmoid", "FakeQuant"];
/// What such an op costs when it reads a product: it runs on the product's tiles in registers.
const EPILOGUE: f64 = 0.25;

/// What a new e-node costs more than an original one of the same op.
const NEW_NODE: f64 = 1e-3;

impl<'a> CostModel<'a> {
    pub fn new(egraph: &'a TlGraph, original: impl IntoIterator<Item = Tl>) -> CostModel<'a> {
        let original = original.into_iter().map(|n| n.map_children(|c| egraph.find(c))).collect();
        CostModel { egraph, original }
    }

    /// Whether e-class `c` holds a matrix product.
    fn is_product(&self, c: Id) -> bool {
        self.egraph[c].nodes.iter().any(|n| matches!(n, Tl::Op(s, _) if matches!(s.name(), "MatMul" | "FusedMatMul")))
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
                let mut own = Self::node_cost(sym.name());
                if EPILOGUE_OPS.contains(&sym.name()) && children.iter().any(|c| self.is_product(*c)) {
                    own = EPILOGUE;
                }
                own += if self.original.contains(&canonical) { 0.0 } else { NEW_NODE };
                enode.fold(own, |sum, id| sum + costs(id))
            }
        }
    }
}

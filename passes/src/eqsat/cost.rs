//! The extraction cost model: memory traffic, in elements.
//!
//! On CPUs a transformer's element-wise work is bound by memory, so a term costs what its ops
//! read and write. The cost of an e-node is a weight times the elements of its output (a
//! symbolic dim counts as [`SYMBOL`]), summed over the term:
//! - leaves (inputs, weights, scalars): 0;
//! - an op the runtime has one kernel for (`LayerNorm`, `Gelu`, `Attention`, `FusedMatMul`,
//!   `Softmax`, `MatMul`): 1, one pass over its output;
//! - shape-only ops (`Reshape`, `Unsqueeze`, `Squeeze`, `Flatten`, `DimValue`, `Shape`,
//!   `Identity`): 0.1;
//! - an element-wise op reading a matrix product: [`EPILOGUE`], since `fuse-matmul` runs it
//!   on the product's tiles in registers (so scalings move after products);
//! - any other op: 2 (reads its input and writes its output);
//! - an e-node whose type cannot be inferred, or differs from its e-class's (a rewrite that does
//!   not type-check here): infinite, so extracted only if nothing else computes the value.
//!
//! So a recognized structure (one `LayerNorm` pass for nine element-wise ops and two
//! reductions) wins, and a new node only replaces an original one when it is cheaper: on equal
//! cost the original is kept ([`NEW_NODE`]). The products' FLOPs are not in the model: no
//! rewrite here changes them. Kernels' speed itself is measured by the benchmarks.

use super::lang::{Tl, TlGraph};
use egg::{CostFunction, Id, Language};

/// Cost of a term (see the module docs).
pub struct CostModel<'a> {
    egraph: &'a TlGraph,
    /// The e-nodes of the original graph (children canonical): among equal costs these win
    /// by a hair, so that an unchanged part of the graph is written back as it was.
    original: std::collections::HashSet<Tl>,
}

/// The weight of an element-wise op that `fuse-matmul` folds into a product's epilogue when it reads a product: it runs on the product's tiles in
/// registers, almost free.
pub const EPILOGUE: f64 = 0.02;

/// How much more (relatively) a new e-node costs than an original one of the same op.
pub const NEW_NODE: f64 = 1e-3;

/// The size a symbolic dim counts as (batch or sequence: the model must rank rewrites for any).
pub const SYMBOL: i64 = 64;

impl<'a> CostModel<'a> {
    pub fn new(egraph: &'a TlGraph, original: impl IntoIterator<Item = Tl>) -> CostModel<'a> {
        let original = original.into_iter().map(|n| n.map_children(|c| egraph.find(c))).collect();
        CostModel { egraph, original }
    }

    /// Whether e-class `c` holds a matrix product.
    fn is_product(&self, c: Id) -> bool {
        self.egraph[c].nodes.iter().any(|n| matches!(n, Tl::Op(s, _) if matches!(s.name(), "MatMul" | "FusedMatMul")))
    }

    /// The weight of an op: per element of its output (see the module docs).
    pub fn node_cost(name: &str) -> f64 {
        match name {
            "LayerNorm" | "Gelu" | "Attention" | "FusedMatMul" | "Softmax" | "MatMul" => 1.0,
            "Reshape" | "Unsqueeze" | "Squeeze" | "Flatten" | "DimValue" | "Shape" | "Identity" => 0.1,
            _ => 2.0,
        }
    }

    /// Whether an e-node's inferred type is its e-class's: a rewrite that would change a
    /// value's dtype or shape (a rule whose conditions miss a broadcast) is never extracted.
    fn agrees(&self, enode: &Tl, out: &tcc_ir::Fact) -> bool {
        let Some(c) = self.egraph.lookup(enode.clone()) else { return true };
        match self.egraph[c].data.fact.as_ref() {
            None => true,
            Some(f) => {
                f.dtype == out.dtype
                    && f.shape.len() == out.shape.len()
                    && f.shape.iter().zip(&out.shape).all(|(a, b)| a == b || a.is_unknown() || b.is_unknown())
            }
        }
    }

    /// The elements of a value (symbolic dims count as [`SYMBOL`]).
    fn elements(f: &tcc_ir::Fact) -> f64 {
        f.shape.iter().map(|d| d.eval(&|_| Some(SYMBOL)).unwrap_or(SYMBOL).max(1) as f64).product::<f64>().max(1.0)
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
                // The e-node's own output, as its op infers it from its children's facts
                // (absent optional inputs have none); an e-node that does not type-check is
                // never extracted.
                let facts: Vec<Option<&tcc_ir::Fact>> =
                    children.iter().map(|c| self.egraph[*c].data.fact.as_ref()).collect();
                let op = sym.op();
                let out = match op.infer(&facts) {
                    Ok(o) if o.len() == 1 && self.agrees(enode, &o[0]) => Self::elements(&o[0]),
                    _ => return f64::INFINITY,
                };
                let canonical = enode.clone().map_children(|c| self.egraph.find(c));
                let mut weight = Self::node_cost(sym.name());
                if crate::fuse::folds_into_epilogue(&op) && children.iter().any(|c| self.is_product(*c)) {
                    weight = EPILOGUE;
                }
                if !self.original.contains(&canonical) {
                    weight *= 1.0 + NEW_NODE;
                }
                let own = weight * out;
                enode.fold(own, |sum, id| sum + costs(id))
            }
        }
    }
}

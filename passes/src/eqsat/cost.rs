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
//! cost the original is kept ([`NEW_NODE`]).
//!
//! A product by packed constant weights also costs its multiply-adds, `k` per output element,
//! at [`MACS_PER_ELEMENT`] to an element of traffic, times what its weight format
//! ([`WeightFormat`], the `formats` rules' alternatives) makes of them: dense panels 1; a walk
//! over the blocks that are not all zero [`BLOCK_STEP`] per live block plus [`BLOCK_FIXED`]
//! (the stores and epilogue each tile still pays) where the live blocks are read one after
//! another (int8 weights with half their blocks zero or more, which the runtime copies, and
//! f32's runs), or [`IN_PLACE_STEP`] and [`IN_PLACE_FIXED`] where int8 kernels read them
//! scattered in place (fewer zeros: the runtime does not copy most of the weights). Fitted to
//! one BERT-base FFN Linear on the VNNI kernel at 12.5 to 95% zero blocks, weights from L3
//! (`int8_sparse_speed`, interleaved; criterion `gemm_int8_block_sparse` and
//! `gemm_f32_block_sparse`): copied 0.88 / 0.54 / 0.24 of the dense time at 12.5 / 50 / 80%,
//! in place 1.06 / 0.64 / 0.28, so a walk pays from about 18% of the blocks zero. A product
//! whose format the build left to the runtime costs what the runtime's threshold would pick
//! ([`SKIP_MIN_ZERO`]) plus [`UNDECIDED`], so that a decided format replaces it. No other
//! rewrite changes a product, so the products' work only
//! tells formats apart. Kernels' speed itself is measured by the benchmarks.

use super::lang::{Tl, TlGraph};
use egg::{CostFunction, Id, Language};
use tcc_ir::op::WeightFormat;
use tcc_ir::Op;
use tcc_runtime::kernels::int8::COPY_MIN_ZERO;
use tcc_runtime::kernels::SKIP_MIN_ZERO;

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

/// Multiply-adds of a product that cost as much time as one element of memory traffic.
pub const MACS_PER_ELEMENT: f64 = 32.0;

/// The time of a block-sparse walk per live block, relative to the dense kernel's per block
/// (the live blocks one after another).
pub const BLOCK_STEP: f64 = 0.93;

/// The time a block-sparse walk pays whatever its live blocks, relative to the dense product's
/// (fitted: 0.066; with [`BLOCK_STEP`] a hair over 1 at no zero block, so that dense wins there).
pub const BLOCK_FIXED: f64 = 0.08;

/// [`BLOCK_STEP`] for int8 live blocks read in place (under [`COPY_MIN_ZERO`] zero).
pub const IN_PLACE_STEP: f64 = 1.12;

/// [`BLOCK_FIXED`] for int8 live blocks read in place.
pub const IN_PLACE_FIXED: f64 = 0.08;

/// How much more (relatively) a product costs when its format is left to the runtime.
pub const UNDECIDED: f64 = 1e-2;

/// The time of a product whose weights have `zero` of their blocks all zero, relative to the
/// dense kernel's, in `format` (`None`: as the runtime would choose, a hair dearer); `int8`
/// weights under [`COPY_MIN_ZERO`] zero are walked in place.
pub fn format_share(format: Option<WeightFormat>, zero: f64, int8: bool) -> f64 {
    let blocks = match int8 && zero < COPY_MIN_ZERO {
        true => IN_PLACE_STEP * (1.0 - zero) + IN_PLACE_FIXED,
        false => BLOCK_STEP * (1.0 - zero) + BLOCK_FIXED,
    };
    match format {
        Some(WeightFormat::Dense) => 1.0,
        Some(WeightFormat::Blocks) => blocks,
        None if zero >= SKIP_MIN_ZERO => blocks * (1.0 + UNDECIDED),
        None => 1.0 + UNDECIDED,
    }
}

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

    /// A product's multiply-adds per output element, in elements of traffic, as its weight
    /// format makes them (see the module docs); 0 for ops that are not products by packed
    /// constant weights.
    fn product_work(&self, op: &Op, children: &[Id]) -> f64 {
        let Op::FusedMatMul(f) = op else { return 0.0 };
        let Some([k, _]) = f.packed else { return 0.0 };
        let zero = children
            .get(1)
            .and_then(|&w| super::rules::weight_leaf(self.egraph, w))
            .and_then(|v| self.egraph.analysis.zero_blocks.get(&v.0).copied());
        k as f64 / MACS_PER_ELEMENT * zero.map_or(1.0, |zero| format_share(f.weights, zero, f.int8.is_some()))
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
                weight += self.product_work(&op, children);
                if !self.original.contains(&canonical) {
                    weight *= 1.0 + NEW_NODE;
                }
                let own = weight * out;
                enode.fold(own, |sum, id| sum + costs(id))
            }
        }
    }
}

//! `formats`: the format each product reads its packed constant weights in, dense panels or a
//! block-sparse walk over the 64x32 blocks that are not all zero, chosen per product by the
//! e-graph's cost model from the share of its weights' blocks that are zero
//! ([`crate::eqsat::rules::formats`], [`crate::eqsat::cost::format_share`]). `tcc build` runs it
//! last, after sparsification and quantization, so it sees the weights as the artifact stores
//! them; zeros a model already had (pruned exports) count like `sparsify`'s. The runtime then
//! walks exactly the products given `Blocks` (products the pass did not decide, in artifacts
//! built without it or left out of the e-graph, keep the runtime's own threshold: the stat
//! `products_runtime` counts them). Never changes what the graph computes.

use crate::eqsat::{cost, lang, rules, EqSat, Limits};
use crate::manager::{Pass, PassContext, PassOutcome};
use tcc_ir::op::WeightFormat;
use tcc_ir::{Graph, Op};

/// The pass (see the module docs).
pub struct Formats(EqSat);

impl Formats {
    pub fn new(limits: Limits) -> Formats {
        Formats(EqSat::new("formats", rules::formats(), limits))
    }
}

impl Pass for Formats {
    fn name(&self) -> &'static str {
        "formats"
    }

    /// Runs the rules and the extraction, then reports what was chosen: `products_blocks`,
    /// `products_dense` and `products_runtime` (left undecided), `blocks_zero_permille` (the zero blocks' share of the block-sparse
    /// products' blocks) and `work_permille` (the products' multiply-adds the cost model expects
    /// to pay, per thousand of the dense products': one run of the model, as it prices them).
    fn run(&mut self, g: &mut Graph, cx: &mut PassContext) -> tcc_ir::Result<PassOutcome> {
        let mut out = self.0.run(g, cx)?;
        out.stats.retain(|k, _| k == "iterations" || k == "stopped_at_limit");
        let (mut dense_work, mut work, mut blocks, mut zero_blocks) = (0.0, 0.0, 0.0, 0.0);
        for node in &g.nodes {
            let (Op::FusedMatMul(f), Some(Some(w))) = (&node.op, node.inputs.get(1)) else { continue };
            let Some([k, n]) = f.packed else { continue };
            let Some(format) = f.weights else {
                // Left out of the e-graph (an attribute it cannot intern) or undecided at its
                // limits: the runtime's threshold decides.
                out.stat("products_runtime", 1);
                continue;
            };
            let zero = g.value(*w).as_const().and_then(|t| lang::zero_block_share(f, t)).unwrap_or(0.0);
            let macs = (k * n) as f64;
            dense_work += macs;
            work += macs * cost::format_share(Some(format), zero, f.int8.is_some());
            out.stat(&format!("products_{}", format.name()), 1);
            if format == WeightFormat::Blocks {
                blocks += macs;
                zero_blocks += macs * zero;
            }
        }
        if dense_work > 0.0 {
            out.stats.insert("work_permille".into(), (1000.0 * work / dense_work).round() as i64);
        }
        if blocks > 0.0 {
            out.stats.insert("blocks_zero_permille".into(), (1000.0 * zero_blocks / blocks).round() as i64);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcc_ir::op::{EpiOp, Epilogue, FusedMatMul};
    use tcc_ir::{interp, DType, Fact, Tensor};

    /// Two products of one input: by weights with a quarter of their 64x32 blocks zero (a
    /// block-sparse walk pays) and by weights with none; the pass gives the first `Blocks` and
    /// the second `Dense`, reports it, and the graph computes what it computed, bit for bit.
    /// An int8 product whose `k` does not fill 64-row steps (no walk reads it) is `Dense`
    /// whatever its zeros. A product whose format was already chosen keeps it when no other
    /// is cheaper.
    #[test]
    fn each_product_gets_the_format_its_zero_blocks_pay_for() {
        let (k, n) = (128usize, 64usize);
        let mut g = Graph::new("g");
        let x = g.add_input("x", Fact::new(DType::F32, vec![4usize.into(), k.into()]));
        let weights = |zero_rows: usize, seed: usize| {
            let w: Vec<f32> =
                (0..k * n)
                    .map(|i| {
                        if i / n < zero_rows && i % n < 32 {
                            0.0
                        } else {
                            ((i * 7919 + seed) % 1000) as f32 / 1e3 - 0.5
                        }
                    })
                    .collect();
            Tensor::new(vec![k * n], tcc_runtime::kernels::pack_b(k, n, &w)).unwrap()
        };
        let product = FusedMatMul {
            a_perm: None,
            b_perm: None,
            packed: Some([k, n]),
            c_perm: None,
            epilogue: Epilogue(vec![EpiOp::Acc]),
            extra: 0,
            fused: vec![],
            int8: None,
            weights: None,
        };
        for (name, zero_rows) in [("sparse", 64), ("dense", 0)] {
            let w = g.add_const(format!("w_{name}"), weights(zero_rows, name.len()));
            let y = g.add1(product.clone(), &[x, w], name).unwrap();
            g.add_output(name, y);
        }
        // int8, `k` = 96: a step and a half, the first all zero.
        let x96 = g.add_input("x96", Fact::new(DType::F32, vec![4usize.into(), 96usize.into()]));
        let w8: Vec<i8> = (0..96 * n).map(|i| if i < 64 * n { 0 } else { (i % 7) as i8 - 3 }).collect();
        let packed = tcc_runtime::kernels::int8::pack_b_s8(96, n, &w8);
        let w = g.add_const("w_int8", Tensor::new(vec![packed.len()], packed).unwrap());
        let int8 = FusedMatMul {
            packed: Some([96, n]),
            int8: Some(tcc_ir::op::fused::ActQuant::DynamicRow),
            ..product.clone()
        };
        let y = g.add1(int8, &[x96, w], "int8").unwrap();
        g.add_output("int8", y);
        let before = g.clone();
        let out = Formats::new(Limits::default()).run(&mut g, &mut PassContext::default()).unwrap();
        tcc_ir::verify(&g).unwrap();
        let formats: Vec<(String, Option<WeightFormat>)> = g
            .nodes
            .iter()
            .filter_map(|nd| match &nd.op {
                Op::FusedMatMul(f) => Some((nd.name.clone(), f.weights)),
                _ => None,
            })
            .collect();
        assert!(formats.contains(&("sparse".into(), Some(WeightFormat::Blocks))), "{formats:?}");
        assert!(formats.contains(&("dense".into(), Some(WeightFormat::Dense))), "{formats:?}");
        assert!(formats.contains(&("int8".into(), Some(WeightFormat::Dense))), "{formats:?}");
        assert_eq!((out.stats["products_blocks"], out.stats["products_dense"]), (1, 2), "{:?}", out.stats);
        assert_eq!(out.stats["blocks_zero_permille"], 250, "{:?}", out.stats);
        let blocks = (k * n) as f64 * cost::format_share(Some(WeightFormat::Blocks), 0.25, false);
        let expected = 1000.0 * (blocks + (k * n + 96 * n) as f64) / (2 * k * n + 96 * n) as f64;
        assert_eq!(out.stats["work_permille"], expected.round() as i64, "{:?}", out.stats);
        let ramp = |n: usize| Tensor::new(vec![4, n], (0..4 * n).map(|i| i as f32 / 97.0).collect()).unwrap();
        let ins = vec![("x".to_string(), ramp(k)), ("x96".to_string(), ramp(96))];
        let (want, got) = (interp::run(&before, &ins).unwrap(), interp::run(&g, &ins).unwrap());
        for ((_, a), (_, b)) in want.iter().zip(&got) {
            assert_eq!(a.as_slice::<f32>().unwrap(), b.as_slice::<f32>().unwrap());
        }
        // Run again: the chosen formats stay, the graph as it was.
        let printed = tcc_ir::text::print(&g);
        let again = Formats::new(Limits::default()).run(&mut g, &mut PassContext::default()).unwrap();
        assert_eq!(again.stats["products_blocks"], 1);
        assert_eq!(tcc_ir::text::print(&g), printed);
    }

    /// The cost model's break-even: a walk costs more than the panels with no zero block and
    /// less from a few percent on where the live blocks are read one after another (f32; int8
    /// from half of them zero, copied), from about a fifth where int8 reads them in place; left
    /// to the runtime, a product costs what its threshold picks, a hair more.
    #[test]
    fn formats_are_priced_by_their_zero_blocks() {
        use cost::format_share;
        let (dense, blocks) = (Some(WeightFormat::Dense), Some(WeightFormat::Blocks));
        for int8 in [false, true] {
            assert!(format_share(blocks, 0.0, int8) > format_share(dense, 0.0, int8));
            assert!(format_share(blocks, 0.5, int8) < 0.6);
            assert!((format_share(blocks, 0.8, int8) - 0.266).abs() < 0.01);
            assert!(format_share(None, 0.5, int8) > format_share(blocks, 0.5, int8));
        }
        assert!(format_share(blocks, 0.05, false) < format_share(dense, 0.05, false));
        assert!(format_share(blocks, 0.125, true) > format_share(dense, 0.125, true));
        assert!(format_share(blocks, 0.25, true) < format_share(dense, 0.25, true));
        assert!(format_share(None, 0.05, false) > format_share(dense, 0.05, false));
    }
}

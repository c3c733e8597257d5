//! A pass and a rule pack of your own in `tcc build`, without forking tcc.
//!
//! Run it on a model: `cargo run --release -p tcc-compiler --example custom_pass -- model.onnx out.tcc`,
//! or without arguments on a small graph in the IR's text form.
//!
//! Three steps, all public API:
//! 1. a pass is a type implementing [`Pass`] (here: [`DropIdentity`], which bypasses
//!    `Identity` nodes);
//! 2. a rule pack is a list of egg rewrites over tcc's e-graph language (here:
//!    [`identities`], `x * 1 = x` and `x + 0 = x`), run by an [`EqSat`] pass;
//! 3. both are registered by name next to tcc's own passes ([`registry`]) and used in a
//!    textual pipeline given to [`driver::build_with`].

use tcc_compiler::driver;
use tcc_ir::op::UnaryKind;
use tcc_ir::{Graph, Op};
use tcc_passes::eqsat::egg::Rewrite;
use tcc_passes::eqsat::{rules, EqSat, Limits, Tl, TlAnalysis};
use tcc_passes::{Pass, PassContext, PassOutcome, Registry};

/// Bypasses `Identity` nodes: their readers read the identity's input.
pub struct DropIdentity;

impl Pass for DropIdentity {
    fn name(&self) -> &'static str {
        "drop-identity"
    }

    fn run(&mut self, g: &mut Graph, _: &mut PassContext) -> tcc_ir::Result<PassOutcome> {
        let mut out = PassOutcome::default();
        let pairs: Vec<_> = g
            .nodes
            .iter()
            .filter(|n| matches!(&n.op, Op::Unary(u) if u.kind == UnaryKind::Identity))
            .filter_map(|n| Some((n.outputs[0], n.inputs.first().copied().flatten()?)))
            .collect();
        for &(y, x) in &pairs {
            // A graph output stays a distinct value; other readers skip the identity.
            if !g.outputs.iter().any(|o| o.value == y) {
                g.replace_uses(y, x);
            }
        }
        out.stat("bypassed", g.remove_dead_nodes() as i64);
        Ok(out)
    }
}

/// `x * 1 = x` and `x + 0 = x`, when the constant is a scalar no wider than `x` (so the result
/// keeps `x`'s shape): directional, and the right side is never worse.
pub fn identities() -> Vec<Rewrite<Tl, TlAnalysis>> {
    vec![
        rules::rule_if("mul-one", "(Mul ?x ?one)", "?x", rules::is_scalar("?one", 1.0, 0.0, "?x")),
        rules::rule_if("add-zero", "(Add ?x ?zero)", "?x", rules::is_scalar("?zero", 0.0, 0.0, "?x")),
    ]
}

/// tcc's passes plus this file's two.
pub fn registry() -> Registry {
    let mut r = Registry::builtin();
    r.register("drop-identity", "bypass Identity nodes", |_| Ok(Box::new(DropIdentity)));
    r.register("identities", "x * 1 = x, x + 0 = x (options: iters, nodes, time_ms)", |o| {
        // Rules usually run with the canonical pack, which makes their patterns few.
        let mut rules = rules::canonical();
        rules.extend(identities());
        Ok(Box::new(EqSat::new("identities", rules, Limits::from_options(o)?)))
    });
    r
}

/// The pipeline `tcc build` runs, with this file's passes first.
pub const PIPELINE: &str = "drop-identity,canon,identities,recognize,fuse-matmul,fuse-attention,dce";

/// A small graph with an identity, a product by one and a sum with zero.
pub const DEMO: &str = r#"graph demo(%x: f32[batch, 4]) {
  %one = const f32[] [1]
  %zero = const f32[] [0]
  %a = Identity(%x) : f32[batch, 4]
  %b = Mul(%a, %one) : f32[batch, 4]
  %c = Add(%zero, %b) : f32[batch, 4]
  %y = Erf(%c) : f32[batch, 4]
  return %y
}"#;

/// Runs [`PIPELINE`]'s first passes on [`DEMO`]; returns the graph after them.
pub fn demo() -> Result<Graph, Box<dyn std::error::Error>> {
    let registry = registry();
    let mut g = tcc_ir::text::parse(DEMO)?;
    let pipeline = tcc_passes::Pipeline::parse("drop-identity,identities,dce", &registry)?;
    let reports = tcc_passes::PassManager::new(&pipeline, &registry)?.run(&mut g, &mut PassContext::default())?;
    for r in reports {
        println!("{:14} {} -> {} nodes {:?}", r.pass, r.nodes_before, r.nodes_after, r.stats);
    }
    Ok(g)
}

#[allow(dead_code)] // The tests include this file as a module and call the functions above.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [model, out] => {
            let opts = driver::BuildOptions { pipeline: PIPELINE.into(), ..Default::default() };
            let report = driver::build_with(model.as_ref(), out.as_ref(), &opts, &registry())?;
            for p in &report.passes {
                println!("{:14} {:8.1} ms  {} -> {} nodes {:?}", p.pass, p.ms, p.nodes_before, p.nodes_after, p.stats);
            }
            println!("wrote {out}");
        }
        [] => {
            let g = demo()?;
            println!("{}", tcc_ir::text::print(&g));
        }
        _ => return Err("usage: custom_pass [model.onnx out.tcc]".into()),
    }
    Ok(())
}

//! # Tutorial: your own passes and rewrite rules
//!
//! tcc's optimizer is a pipeline of passes over [`tcc_ir::Graph`]; one kind of pass,
//! [`EqSat`](crate::eqsat::EqSat), runs egg rewrite rules. You can add both from your own
//! crate: write them against this crate's API, register them in a [`Registry`](crate::Registry)
//! next to tcc's, and build models with `tcc_compiler::driver::build_with`. A complete program
//! is `compiler/examples/custom_pass.rs` (the tests build and run it).
//!
//! ## 1. A pass
//!
//! A pass is a type implementing [`Pass`](crate::Pass): a name, and `run`, which edits the
//! graph and says what it did ([`PassOutcome`](crate::PassOutcome): `changed` and named
//! counters that the build report prints). The manager verifies the graph after every pass,
//! so a pass that breaks an invariant fails the build with its name on the error.
//!
//! ```
//! use tcc_ir::{text, Graph, Op};
//! use tcc_passes::{Pass, PassContext, PassManager, PassOutcome, Pipeline, Registry};
//!
//! /// Counts the products of a graph (a pass may only look).
//! struct CountProducts;
//!
//! impl Pass for CountProducts {
//!     fn name(&self) -> &'static str {
//!         "count-products"
//!     }
//!     fn run(&mut self, g: &mut Graph, _: &mut PassContext) -> tcc_ir::Result<PassOutcome> {
//!         let mut out = PassOutcome::default();
//!         let n = g.nodes.iter().filter(|n| matches!(n.op, Op::MatMul(_))).count();
//!         out.stats.insert("products".into(), n as i64);
//!         Ok(out)
//!     }
//! }
//!
//! let mut registry = Registry::builtin();
//! registry.register("count-products", "count MatMul nodes", |_| Ok(Box::new(CountProducts)));
//! let pipeline = Pipeline::parse("canon,count-products", &registry).unwrap();
//! let mut g = text::parse(
//!     "graph g(%a: f32[2, 3], %b: f32[3, 4]) {\n  %c = MatMul(%a, %b) : f32[2, 4]\n  return %c\n}",
//! )
//! .unwrap();
//! let reports = PassManager::new(&pipeline, &registry).unwrap().run(&mut g, &mut PassContext::default()).unwrap();
//! assert_eq!(reports.last().unwrap().stats["products"], 1);
//! ```
//!
//! Options come from the pipeline text (`my-pass{level=2}`): the factory given to
//! `register` receives them and may refuse unknown ones with a message.
//!
//! ## 2. Rewrite rules
//!
//! [`EqSat`](crate::eqsat::EqSat) lifts the graph into an e-graph whose language
//! ([`Tl`](crate::eqsat::Tl)) is generic over tcc's ops: `(Add (Mul ?x ?g) ?b)` matches an
//! `Add` of a `Mul`; an op with non-default attributes is written as the IR's text form writes
//! it, `Transpose{perm=[0,2,1]}`. Values the e-graph does not look into (inputs, weights) are
//! leaves. Each e-class carries its fact (dtype and shape) and, for one-element constants,
//! its value, which conditions read. After saturation the cheapest equivalent graph is
//! extracted ([`cost`](crate::eqsat::cost)) and written back.
//!
//! [`rules`](crate::eqsat::rules) has three ways to write a rule: a pattern rewrite
//! ([`rule`](crate::eqsat::rules::rule)), one with a condition
//! ([`rule_if`](crate::eqsat::rules::rule_if)), and one whose right-hand side is an op built by
//! code ([`op_rule`](crate::eqsat::rules::op_rule)), for attributes taken from the match:
//!
//! ```
//! use tcc_ir::{text, Op};
//! use tcc_passes::eqsat::{rules, EqSat, Limits};
//! use tcc_passes::{Pass, PassContext};
//!
//! // sqrt(x * x) = |x|, as a plain pattern rewrite...
//! let plain = rules::rule("sqrt-of-square", "(Sqrt (Mul ?x ?x))", "(Abs ?x)");
//! // ... and with the right-hand side built by code: `op_rule` is for ops whose attributes
//! // come from the match (tcc's own `layer-norm` rule takes its epsilon from the graph).
//! let x = rules::var("?x");
//! let built = rules::op_rule("sqrt-of-square-built", "(Sqrt (Mul ?x ?x))", move |eg, s| {
//!     let f32 = eg[s[x]].data.fact.as_ref().is_some_and(|f| f.dtype == tcc_ir::DType::F32);
//!     f32.then(|| (Op::from(tcc_ir::op::Unary::new(tcc_ir::op::UnaryKind::Abs)), vec![x]))
//! });
//! for rule in [plain, built] {
//!     let mut pass = EqSat::new("abs", vec![rule], Limits::default());
//!     let mut g = text::parse(
//!         "graph g(%x: f32[4]) {\n  %s = Mul(%x, %x) : f32[4]\n  %y = Sqrt(%s) : f32[4]\n  return %y\n}",
//!     )
//!     .unwrap();
//!     pass.run(&mut g, &mut PassContext::default()).unwrap();
//!     let ops: Vec<&str> = g.nodes.iter().map(|n| n.op.name()).collect();
//!     assert_eq!(ops, ["Abs"]);
//! }
//! ```
//!
//! Extraction keeps the original graph where a rewrite is not cheaper
//! ([`cost`](crate::eqsat::cost)): a rule only changes a model when its right side costs less
//! (here one op instead of two).
//!
//! ## 3. Guide for rule authors
//!
//! - **Directional rules.** Write `lhs => rhs` from the form exporters write to the form tcc
//!   runs fast. Bidirectional algebra (associativity in both directions) grows the e-graph
//!   exponentially; the runner's limits ([`Limits`](crate::eqsat::Limits)) stop it, but
//!   recognition then depends on where it stopped. Commutativity of `Add` and `Mul` is in the
//!   `canonical` pack already: write one operand order.
//! - **Never-worse right-hand sides.** Extraction picks the cheapest term, so adding an
//!   alternative never slows a model down, as long as the alternative computes the same.
//!   A rule whose right side is not equivalent makes models wrong: state every assumption as a
//!   condition (a constant's value, a scalar no wider than the tensor it scales so the result
//!   keeps its shape, the axis a reduction runs over).
//! - **Float rounding.** Equivalent means equal to float rounding: `x / c` and `x * (1/c)`
//!   differ in the last bit and are both fine; a rule that changes results beyond rounding
//!   (dropping a term that is "small") is not a rewrite but an approximation, and belongs in a
//!   pass that reports it.
//! - **Test.** A rule test builds a small graph in the text form, runs the pass and checks the
//!   op counts and the reference interpreter's outputs before and after (see
//!   `passes/src/eqsat/tests.rs`, which also runs the built-in packs on random graphs).

//! Equality saturation over tcc's IR with [egg](https://docs.rs/egg).
//!
//! [`EqSat`] is a pass that lifts a graph into an e-graph ([`lang`]), runs a set of rewrite
//! rules ([`rules`]) to saturation or to its limits, extracts the cheapest equivalent graph by
//! [`cost::CostModel`] and writes it back:
//!
//! 1. **Lift.** Every single-output node becomes an e-node (`Op(op, children)`); model inputs,
//!    weights and outputs of multi-output nodes are leaves (`%12`), so weights never enter the
//!    e-graph. Equal e-nodes are one (common subexpressions merge on the way in).
//! 2. **Saturate.** egg's `Runner` with the backoff scheduler and limits on iterations, e-nodes
//!    and time ([`Limits`]).
//! 3. **Extract.** For every value the rest of the graph reads (graph outputs, inputs of nodes
//!    that were not lifted), the cheapest term of its e-class.
//! 4. **Write back.** Terms that are an original node reuse it (its name, its value); new
//!    terms become new nodes named after the value they replace. Dead nodes go.
//!
//! Rules are plain `egg::Rewrite<Tl, TlAnalysis>`: a user's crate builds its own with
//! [`rules::rule`], [`rules::rule_if`] or [`rules::op_rule`] and runs them with
//! [`EqSat::new`], registered as a pass like any other.

pub mod cost;
pub mod lang;
pub mod rules;

/// The egg tcc is built with, for rules written against it.
pub use egg;
pub use lang::{Tl, TlAnalysis, TlGraph};

use crate::manager::{Pass, PassContext, PassOutcome};
use egg::{Extractor, Id, Rewrite, Runner};
use lang::{Leaf, OpSym};
use std::collections::HashMap;
use std::time::Duration;
use tcc_ir::{DType, Graph, Op, Tensor, ValueId};

/// Bounds on one saturation run.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub iters: usize,
    pub nodes: usize,
    pub time: Duration,
}

impl Default for Limits {
    /// Enough for a 24-layer BERT's recognition rules to saturate, small enough that a bad
    /// rule set stops in seconds.
    fn default() -> Limits {
        Limits { iters: 12, nodes: 200_000, time: Duration::from_secs(5) }
    }
}

impl Limits {
    /// Reads `iters`, `nodes` and `time_ms` from pass options.
    pub fn from_options(o: &std::collections::BTreeMap<String, String>) -> Result<Limits, String> {
        let mut l = Limits::default();
        for (k, v) in o {
            let n: u64 = v.parse().map_err(|_| format!("option `{k}` wants a number, got `{v}`"))?;
            match k.as_str() {
                "iters" => l.iters = n as usize,
                "nodes" => l.nodes = n as usize,
                "time_ms" => l.time = Duration::from_millis(n),
                _ => return Err(format!("unknown option `{k}` (iters, nodes, time_ms)")),
            }
        }
        Ok(l)
    }
}

/// The equality-saturation pass: a name, a rule set and limits.
pub struct EqSat {
    name: &'static str,
    rules: Vec<Rewrite<Tl, TlAnalysis>>,
    limits: Limits,
}

impl EqSat {
    /// A pass running `rules` (a rule whose name repeats an earlier one's is dropped: egg
    /// requires unique names, and packs may overlap).
    pub fn new(name: &'static str, rules: Vec<Rewrite<Tl, TlAnalysis>>, limits: Limits) -> EqSat {
        let mut seen = std::collections::HashSet::new();
        let rules = rules.into_iter().filter(|r| seen.insert(r.name)).collect();
        EqSat { name, rules, limits }
    }
}

/// A graph lifted into an e-graph.
struct Lifted {
    egraph: TlGraph,
    /// The e-class of each value the e-graph knows.
    class_of: HashMap<ValueId, Id>,
    /// Per node: whether it was lifted.
    lifted: Vec<bool>,
    /// The e-nodes of the lifted nodes.
    nodes: Vec<Tl>,
}

fn lift(g: &Graph) -> Lifted {
    let leaves = g
        .values
        .iter()
        .map(|v| {
            let scalar = v
                .as_const()
                .filter(|t| t.dtype() == DType::F32 && t.len() == 1)
                .and_then(|t| t.as_slice::<f32>().ok().map(|s| s[0]));
            (v.fact.clone(), scalar)
        })
        .collect();
    // The packed weights of products, with the share of their blocks that are zero (what the
    // cost model prices weight formats by; counting is a pass over the weights).
    let mut zero_blocks = HashMap::new();
    for node in &g.nodes {
        let (Op::FusedMatMul(f), Some(Some(w))) = (&node.op, node.inputs.get(1)) else { continue };
        // (Packed constant weights no walk reads, an int8 `k` that does not fill 64-row
        // steps, count as without zero blocks: read dense.)
        if let (Some(t), Some(_)) = (g.value(*w).as_const(), f.packed) {
            zero_blocks.insert(w.0, lang::zero_block_share(f, t).unwrap_or(0.0));
        }
    }
    let mut egraph = TlGraph::new(TlAnalysis { leaves, zero_blocks });
    let mut class_of: HashMap<ValueId, Id> = HashMap::new();
    let mut lifted = vec![false; g.nodes.len()];
    let mut nodes = Vec::new();
    for (n, node) in g.nodes.iter().enumerate() {
        // Attributes are interned by their JSON, which writes NaN and infinities as `null`:
        // such ops stay out of the e-graph rather than be confused with another.
        if node.outputs.len() != 1 || node.op.attrs().to_string().contains("null") {
            continue;
        }
        let children: Vec<Id> = node
            .inputs
            .iter()
            .map(|i| match i {
                Some(v) => *class_of.entry(*v).or_insert_with(|| egraph.add(Tl::Leaf(Leaf::Value(v.0)))),
                None => egraph.add(Tl::Leaf(Leaf::Absent)),
            })
            .collect();
        let enode = Tl::Op(OpSym::of(&node.op), children);
        let id = egraph.add(enode.clone());
        nodes.push(enode);
        class_of.insert(node.outputs[0], id);
        lifted[n] = true;
    }
    Lifted { egraph, class_of, lifted, nodes }
}

impl Pass for EqSat {
    fn name(&self) -> &'static str {
        self.name
    }

    fn run(&mut self, g: &mut Graph, _: &mut PassContext) -> tcc_ir::Result<PassOutcome> {
        let mut out = PassOutcome::default();
        let before = g.op_counts();
        let Lifted { egraph, class_of, lifted, nodes } = lift(g);
        let runner = Runner::default()
            .with_egraph(egraph)
            .with_iter_limit(self.limits.iters)
            .with_node_limit(self.limits.nodes)
            .with_time_limit(self.limits.time)
            .with_scheduler(egg::BackoffScheduler::default())
            .run(&self.rules);
        let egraph = runner.egraph;
        tracing::debug!(
            pass = self.name,
            iterations = runner.iterations.len(),
            nodes = egraph.total_number_of_nodes(),
            classes = egraph.number_of_classes(),
            stop = ?runner.stop_reason,
            "saturation done"
        );
        out.stats.insert("iterations".into(), runner.iterations.len() as i64);
        out.stats.insert("egraph_nodes".into(), egraph.total_number_of_nodes() as i64);
        if !matches!(runner.stop_reason, Some(egg::StopReason::Saturated)) {
            out.stats.insert("stopped_at_limit".into(), 1);
        }

        // Values the rest of the graph reads: outputs, and inputs of nodes left out.
        let mut roots: Vec<ValueId> = g.outputs.iter().map(|o| o.value).collect();
        for (n, node) in g.nodes.iter().enumerate() {
            if !lifted[n] {
                roots.extend(node.inputs.iter().flatten().copied());
            }
        }
        let extractor = Extractor::new(&egraph, cost::CostModel::new(&egraph, nodes));
        // Original nodes by e-node (children canonical): a term that is one reuses it.
        let mut original: HashMap<Tl, usize> = HashMap::new();
        // For each e-class, the first original value in it: new nodes take its name and
        // quantization parameters.
        let mut class_value: HashMap<Id, ValueId> = HashMap::new();
        for (n, node) in g.nodes.iter().enumerate() {
            if lifted[n] {
                let c = egraph.find(class_of[&node.outputs[0]]);
                let children: Vec<Id> = node
                    .inputs
                    .iter()
                    .map(|i| match i {
                        Some(v) => egraph.find(class_of.get(v).copied().unwrap_or_else(|| leaf_class(&egraph, *v))),
                        None => leaf_class_absent(&egraph),
                    })
                    .collect();
                original.entry(Tl::Op(OpSym::of(&node.op), children)).or_insert(n);
                class_value.entry(c).or_insert(node.outputs[0]);
            }
        }
        let mut b = Builder { egraph: &egraph, extractor, original, class_value, memo: HashMap::new(), added: 0 };
        let mut replace: Vec<(ValueId, ValueId)> = Vec::new();
        for r in roots {
            let Some(&c) = class_of.get(&r) else { continue };
            let v = b.build(g, c)?.ok_or_else(|| tcc_ir::Error::Verify(format!("{r} became an absent input")))?;
            if v != r {
                if g.fact(v).dtype != g.fact(r).dtype || g.fact(v).rank() != g.fact(r).rank() {
                    return Err(tcc_ir::Error::Verify(format!(
                        "pass `{}`: `{}` ({}) was rewritten to a value typed {}",
                        self.name,
                        g.value(r).name,
                        g.fact(r),
                        g.fact(v)
                    )));
                }
                replace.push((r, v));
            }
        }
        for (r, v) in replace {
            g.replace_uses(r, v);
        }
        g.toposort()?;
        g.remove_dead_nodes();
        let after = g.op_counts();
        for (op, n) in &after {
            let d = *n as i64 - before.get(op).copied().unwrap_or(0) as i64;
            if d > 0 {
                out.stat(&format!("made_{op}"), d);
            }
        }
        let removed = before.values().sum::<usize>() as i64 - after.values().sum::<usize>() as i64;
        if removed > 0 {
            out.stat("nodes_removed", removed);
        }
        out.stats.insert("nodes_added".into(), b.added as i64);
        Ok(out)
    }
}

/// The e-class of a leaf value (lifting added every leaf a node reads).
fn leaf_class(egraph: &TlGraph, v: ValueId) -> Id {
    match egraph.lookup(Tl::Leaf(Leaf::Value(v.0))) {
        Some(c) => c,
        None => unreachable!("lifting added a leaf for every value a lifted node reads"),
    }
}

fn leaf_class_absent(egraph: &TlGraph) -> Id {
    match egraph.lookup(Tl::Leaf(Leaf::Absent)) {
        Some(c) => c,
        None => unreachable!("lifting added the absent leaf for the node that has one"),
    }
}

/// Writes extracted terms back into the graph.
struct Builder<'a> {
    egraph: &'a TlGraph,
    extractor: Extractor<'a, cost::CostModel<'a>, Tl, TlAnalysis>,
    original: HashMap<Tl, usize>,
    class_value: HashMap<Id, ValueId>,
    memo: HashMap<Id, Option<ValueId>>,
    added: usize,
}

impl Builder<'_> {
    /// The value computing e-class `c`'s cheapest term (`None` for an absent input).
    fn build(&mut self, g: &mut Graph, c: Id) -> tcc_ir::Result<Option<ValueId>> {
        let c = self.egraph.find(c);
        if let Some(v) = self.memo.get(&c) {
            return Ok(*v);
        }
        let node = self.extractor.find_best_node(c).clone();
        let v = match node {
            Tl::Leaf(Leaf::Value(v)) => Some(ValueId(v)),
            Tl::Leaf(Leaf::Absent) => None,
            Tl::Scalar(s) => {
                let t = Tensor::new(vec![], vec![s.get()]).map_err(tcc_ir::Error::Runtime)?;
                Some(g.add_const(format!("eqsat.scalar.{}", s.get()), t))
            }
            Tl::Op(sym, children) => {
                let canonical = Tl::Op(sym, children.iter().map(|ch| self.egraph.find(*ch)).collect());
                let mut inputs = Vec::with_capacity(children.len());
                for ch in children {
                    inputs.push(self.build(g, ch)?);
                }
                match self.original.get(&canonical) {
                    // The original node, reading the values built for its inputs' classes
                    // (which compute the same: this is how common subexpressions merge).
                    Some(&n) => {
                        g.nodes[n].inputs = inputs;
                        Some(g.nodes[n].outputs[0])
                    }
                    None => {
                        let like = self.class_value.get(&c).copied();
                        let name = like.map_or_else(|| format!("eqsat.{c}"), |v| g.value(v).name.clone());
                        self.added += 1;
                        let v = g.add_node(sym.op(), inputs, name)?[0];
                        g.value_mut(v).quant = like.and_then(|l| g.value(l).quant.clone());
                        Some(v)
                    }
                }
            }
        };
        self.memo.insert(c, v);
        Ok(v)
    }
}

#[cfg(test)]
mod tests;

//! The graph: values (inputs, constants, node outputs) and nodes applying ops to them.
//!
//! Values are numbered by [`ValueId`] and never renumbered while a graph is edited (removed
//! nodes leave their values unreferenced); [`Graph::compact`] renumbers. Nodes are kept in a
//! vector that [`Graph::toposort`] puts in execution order. Every value carries its [`Fact`]
//! (dtype, symbolic shape, small symbolic value) and, for quantized tensors, its
//! [`QuantParams`].

use crate::error::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::fmt;
use tcc_runtime::{Fact, Op, Tensor};

/// A value's number in its graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

impl ValueId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for ValueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// Quantization parameters of an integer tensor: `real = (q - zero_point) * scale`, per tensor
/// (one scale) or per channel along `axis`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QuantParams {
    pub scale: Vec<f32>,
    pub zero_point: Vec<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub axis: Option<i64>,
}

/// Where a value comes from.
#[derive(Clone, Debug)]
pub enum Def {
    /// A model input.
    Input,
    /// A constant (an initializer or a folded result).
    Const(Tensor),
    /// An output of a node.
    Computed,
}

#[derive(Clone, Debug)]
pub struct Value {
    pub name: String,
    pub fact: Fact,
    pub quant: Option<QuantParams>,
    pub def: Def,
}

impl Value {
    pub fn as_const(&self) -> Option<&Tensor> {
        match &self.def {
            Def::Const(t) => Some(t),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    pub op: Op,
    /// `None` for an omitted optional input.
    pub inputs: Vec<Option<ValueId>>,
    pub outputs: Vec<ValueId>,
    /// The name of the node in the source model (or given by the pass that made it).
    pub name: String,
}

/// A named model output.
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    pub name: String,
    pub value: ValueId,
}

#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    pub values: Vec<Value>,
    pub nodes: Vec<Node>,
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<Output>,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph { name: name.into(), ..Default::default() }
    }

    pub fn value(&self, v: ValueId) -> &Value {
        &self.values[v.index()]
    }

    pub fn value_mut(&mut self, v: ValueId) -> &mut Value {
        &mut self.values[v.index()]
    }

    pub fn fact(&self, v: ValueId) -> &Fact {
        &self.values[v.index()].fact
    }

    /// The constant tensor of a value, if it is a constant.
    pub fn const_of(&self, v: ValueId) -> Option<&Tensor> {
        self.value(v).as_const()
    }

    fn push_value(&mut self, name: String, fact: Fact, def: Def) -> ValueId {
        let id = ValueId(self.values.len() as u32);
        self.values.push(Value { name, fact, quant: None, def });
        id
    }

    pub fn add_input(&mut self, name: impl Into<String>, fact: Fact) -> ValueId {
        let v = self.push_value(name.into(), fact, Def::Input);
        self.inputs.push(v);
        v
    }

    pub fn add_const(&mut self, name: impl Into<String>, t: Tensor) -> ValueId {
        let fact = Fact::of_tensor(&t);
        self.push_value(name.into(), fact, Def::Const(t))
    }

    /// Adds a node, inferring its outputs' facts; returns the output values.
    pub fn add_node(
        &mut self,
        op: impl Into<Op>,
        inputs: Vec<Option<ValueId>>,
        name: impl Into<String>,
    ) -> Result<Vec<ValueId>> {
        let op = op.into();
        let name = name.into();
        let facts: Vec<Option<&Fact>> = inputs.iter().map(|i| i.map(|v| self.fact(v))).collect();
        let outs = op.infer(&facts).map_err(|e| Error::infer(&name, &op, e))?;
        let n = outs.len();
        let ids: Vec<ValueId> = outs
            .into_iter()
            .enumerate()
            .map(|(i, f)| {
                let vname = if n == 1 { name.clone() } else { format!("{name}:{i}") };
                self.push_value(vname, f, Def::Computed)
            })
            .collect();
        self.nodes.push(Node { op, inputs, outputs: ids.clone(), name });
        Ok(ids)
    }

    /// Adds a node with one output and returns it.
    pub fn add1(&mut self, op: impl Into<Op>, inputs: &[ValueId], name: impl Into<String>) -> Result<ValueId> {
        let outs = self.add_node(op, inputs.iter().map(|&v| Some(v)).collect(), name)?;
        Ok(outs[0])
    }

    pub fn add_output(&mut self, name: impl Into<String>, v: ValueId) {
        self.outputs.push(Output { name: name.into(), value: v });
    }

    /// For each computed value, the node and output index that produce it.
    pub fn producers(&self) -> HashMap<ValueId, (usize, usize)> {
        let mut m = HashMap::new();
        for (n, node) in self.nodes.iter().enumerate() {
            for (i, &o) in node.outputs.iter().enumerate() {
                m.insert(o, (n, i));
            }
        }
        m
    }

    /// For each value, the nodes that read it (with repetition if read twice).
    pub fn users(&self) -> HashMap<ValueId, Vec<usize>> {
        let mut m: HashMap<ValueId, Vec<usize>> = HashMap::new();
        for (n, node) in self.nodes.iter().enumerate() {
            for v in node.inputs.iter().flatten() {
                m.entry(*v).or_default().push(n);
            }
        }
        m
    }

    /// Points every use of `old` (node inputs and graph outputs) at `new`.
    pub fn replace_uses(&mut self, old: ValueId, new: ValueId) {
        for node in &mut self.nodes {
            for i in node.inputs.iter_mut().flatten() {
                if *i == old {
                    *i = new;
                }
            }
        }
        for o in &mut self.outputs {
            if o.value == old {
                o.value = new;
            }
        }
    }

    /// Removes nodes none of whose outputs is used (transitively); returns how many went.
    pub fn remove_dead_nodes(&mut self) -> usize {
        let mut live: HashSet<ValueId> = self.outputs.iter().map(|o| o.value).collect();
        let mut keep = vec![false; self.nodes.len()];
        // Nodes are in topological order after `toposort`; walk backwards to a fixed point in
        // one pass for sorted graphs, several otherwise.
        loop {
            let mut changed = false;
            for (n, node) in self.nodes.iter().enumerate().rev() {
                if !keep[n] && node.outputs.iter().any(|o| live.contains(o)) {
                    keep[n] = true;
                    changed = true;
                    live.extend(node.inputs.iter().flatten().copied());
                }
            }
            if !changed {
                break;
            }
        }
        let before = self.nodes.len();
        let mut it = keep.into_iter();
        self.nodes.retain(|_| it.next().unwrap_or(false));
        before - self.nodes.len()
    }

    /// Orders nodes so that every value is produced before it is read; errors on a cycle or on
    /// a read of a value nothing defines.
    pub fn toposort(&mut self) -> Result<()> {
        let producers = self.producers();
        let n = self.nodes.len();
        let mut indegree = vec![0usize; n];
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (i, node) in self.nodes.iter().enumerate() {
            for v in node.inputs.iter().flatten() {
                match producers.get(v) {
                    Some(&(p, _)) => {
                        indegree[i] += 1;
                        dependents[p].push(i);
                    }
                    None => {
                        if matches!(self.value(*v).def, Def::Computed) {
                            return Err(Error::Verify(format!(
                                "node `{}` reads `{}`, which no node produces",
                                node.name,
                                self.value(*v).name
                            )));
                        }
                    }
                }
            }
        }
        // Kahn's algorithm, taking ready nodes in their current order (stable).
        let mut ready: std::collections::BTreeSet<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(i) = ready.pop_first() {
            order.push(i);
            for &d in &dependents[i] {
                indegree[d] -= 1;
                if indegree[d] == 0 {
                    ready.insert(d);
                }
            }
        }
        if order.len() != n {
            let stuck = (0..n).find(|&i| indegree[i] > 0).map(|i| self.nodes[i].name.clone()).unwrap_or_default();
            return Err(Error::Verify(format!("the graph has a cycle through node `{stuck}`")));
        }
        let mut old: Vec<Option<Node>> = std::mem::take(&mut self.nodes).into_iter().map(Some).collect();
        self.nodes = order.into_iter().map(|i| old[i].take().expect("each node once")).collect();
        Ok(())
    }

    /// A copy holding only the values still referenced, renumbered in definition order.
    pub fn compact(&self) -> Graph {
        let mut used: HashSet<ValueId> = self.inputs.iter().copied().collect();
        used.extend(self.outputs.iter().map(|o| o.value));
        for node in &self.nodes {
            used.extend(node.inputs.iter().flatten().copied());
            used.extend(node.outputs.iter().copied());
        }
        let mut order: Vec<ValueId> = self.inputs.clone();
        let mut consts: Vec<ValueId> =
            used.iter().copied().filter(|v| matches!(self.value(*v).def, Def::Const(_))).collect();
        consts.sort();
        order.extend(consts);
        for node in &self.nodes {
            order.extend(node.outputs.iter().copied());
        }
        let map: HashMap<ValueId, ValueId> = order.iter().enumerate().map(|(i, &v)| (v, ValueId(i as u32))).collect();
        let m = |v: &ValueId| map[v];
        Graph {
            name: self.name.clone(),
            values: order.iter().map(|v| self.value(*v).clone()).collect(),
            nodes: self
                .nodes
                .iter()
                .map(|n| Node {
                    op: n.op.clone(),
                    inputs: n.inputs.iter().map(|i| i.as_ref().map(m)).collect(),
                    outputs: n.outputs.iter().map(m).collect(),
                    name: n.name.clone(),
                })
                .collect(),
            inputs: self.inputs.iter().map(m).collect(),
            outputs: self.outputs.iter().map(|o| Output { name: o.name.clone(), value: m(&o.value) }).collect(),
        }
    }

    /// Recomputes every node's output facts from its inputs, in order (the graph must be
    /// sorted). Constants get their facts from their tensors.
    pub fn infer(&mut self) -> Result<()> {
        for v in &mut self.values {
            if let Def::Const(t) = &v.def {
                v.fact = Fact::of_tensor(t);
            }
        }
        for n in 0..self.nodes.len() {
            let node = &self.nodes[n];
            let facts: Vec<Option<&Fact>> = node.inputs.iter().map(|i| i.map(|v| self.fact(v))).collect();
            let outs = node.op.infer(&facts).map_err(|e| Error::infer(&node.name, &node.op, e))?;
            if outs.len() != node.outputs.len() {
                return Err(Error::Verify(format!(
                    "node `{}` has {} outputs, {} makes {}",
                    node.name,
                    node.outputs.len(),
                    node.op.name(),
                    outs.len()
                )));
            }
            let ids = node.outputs.clone();
            for (v, f) in ids.into_iter().zip(outs) {
                self.values[v.index()].fact = f;
            }
        }
        Ok(())
    }

    /// How many times each op occurs.
    pub fn op_counts(&self) -> std::collections::BTreeMap<String, usize> {
        let mut m = std::collections::BTreeMap::new();
        for n in &self.nodes {
            *m.entry(n.op.name().to_string()).or_insert(0) += 1;
        }
        m
    }

    /// Constant values that are referenced by a node or an output, in definition order.
    pub fn used_consts(&self) -> Vec<ValueId> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let refs = self
            .nodes
            .iter()
            .flat_map(|n| n.inputs.iter().flatten().copied())
            .chain(self.outputs.iter().map(|o| o.value));
        for v in refs {
            if matches!(self.value(v).def, Def::Const(_)) && seen.insert(v) {
                out.push(v);
            }
        }
        out.sort();
        out
    }
}

//! The ONNX front end: an ONNX model to a typed, verified tcc-ir graph.
//!
//! Phases: decode the protobuf (prost, recursion-limited) -> read opset imports -> convert
//! initializers (zero-copy for raw data, mapped external data) -> declare inputs with symbolic
//! dims -> sort nodes -> convert each node with its op's converter ([`ops`]) -> name outputs ->
//! verify. Older opsets are normalized to the newest signatures as nodes are converted, and
//! onnxruntime's `com.microsoft` fused ops are expanded into tcc ops.
//!
//! Every problem with a user's model is an [`ImportError`] naming the node, the op and the
//! opset; nothing here panics on a malformed file.

mod ops;
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
#[rustfmt::skip]
pub mod proto;
pub mod tensor;

pub use ops::SUPPORTED as SUPPORTED_OPS;

use prost::Message;
use proto::{AttributeProto, ModelProto, NodeProto};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tcc_ir::{Graph, ValueId};
use tcc_runtime::{DType, Dim, Fact, Op, Tensor};
use tensor::ExternalData;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a valid ONNX model: {0}")]
    Decode(String),
    #[error("unsupported operator {op} (node `{node}`, opset {opset}){hint}")]
    Unsupported { op: String, node: String, opset: i64, hint: String },
    #[error("unsupported opset: {0}")]
    Opset(String),
    #[error("node `{node}` ({op}): {message}")]
    Node { node: String, op: String, message: String },
    #[error("tensor `{name}`: {message}")]
    Tensor { name: String, message: String },
    #[error("{0}")]
    Model(String),
    #[error(transparent)]
    Ir(#[from] tcc_ir::Error),
}

/// The supported range of the default (`ai.onnx`) opset.
pub const ONNX_OPSETS: std::ops::RangeInclusive<i64> = 7..=22;
/// The supported `com.microsoft` opset.
pub const MS_OPSETS: std::ops::RangeInclusive<i64> = 1..=1;
pub const MS_DOMAIN: &str = "com.microsoft";

/// An imported model.
pub struct Imported {
    pub graph: Graph,
    /// Opset imports by domain (`""` for ai.onnx).
    pub opsets: BTreeMap<String, i64>,
    pub producer: String,
    /// Node counts by ONNX op type (with domain prefix for non-default domains).
    pub source_op_counts: BTreeMap<String, usize>,
}

/// Largest ONNX file read into memory.
const MAX_MODEL_BYTES: u64 = 4 << 30;

pub fn import_file(path: &Path) -> Result<Imported, ImportError> {
    let meta = std::fs::metadata(path).map_err(|e| ImportError::Io { path: path.into(), source: e })?;
    if meta.len() > MAX_MODEL_BYTES {
        return Err(ImportError::Decode(format!(
            "{} is {} bytes; ONNX files over 4 GiB are not supported",
            path.display(),
            meta.len()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| ImportError::Io { path: path.into(), source: e })?;
    import_bytes(&bytes, Some(path))
}

pub fn import_bytes(bytes: &[u8], model_path: Option<&Path>) -> Result<Imported, ImportError> {
    if bytes.is_empty() {
        return Err(ImportError::Decode("the file is empty".into()));
    }
    let model = ModelProto::decode(bytes).map_err(|e| ImportError::Decode(e.to_string()))?;
    import_model(model, model_path)
}

fn import_model(mut model: ModelProto, model_path: Option<&Path>) -> Result<Imported, ImportError> {
    let mut opsets = BTreeMap::new();
    for o in &model.opset_import {
        let d = match o.domain() {
            "ai.onnx" => "",
            d => d,
        };
        opsets.insert(d.to_string(), o.version());
    }
    if model.opset_import.is_empty() {
        return Err(ImportError::Opset("the model declares no opset".into()));
    }
    let producer = format!("{} {}", model.producer_name(), model.producer_version()).trim().to_string();
    let mut graph_proto = model.graph.take().ok_or_else(|| ImportError::Decode("the model has no graph".into()))?;
    let mut ext = ExternalData::new(model_path);
    let mut g = Graph::new(graph_proto.name().to_string());
    let mut scope: HashMap<String, ValueId> = HashMap::new();

    for init in graph_proto.initializer.iter_mut() {
        let name = init.name().to_string();
        if name.is_empty() {
            return Err(ImportError::Model("an initializer has no name".into()));
        }
        let t = tensor::to_tensor(init, &mut ext)?;
        let v = g.add_const(name.clone(), t);
        scope.insert(name, v);
    }
    if !graph_proto.sparse_initializer.is_empty() {
        return Err(ImportError::Model("sparse initializers are not supported".into()));
    }
    let mut anon = 0;
    for input in &graph_proto.input {
        let name = input.name().to_string();
        if scope.contains_key(&name) {
            continue; // An initializer listed as an input (IR < 4): a constant with a default.
        }
        let Some(proto::type_proto::Value::TensorType(tt)) = input.r#type.as_ref().and_then(|t| t.value.as_ref())
        else {
            return Err(ImportError::Model(format!("input `{name}` is not a tensor")));
        };
        let dtype = tensor::dtype_of(tt.elem_type()).ok_or_else(|| {
            ImportError::Model(format!(
                "input `{name}` has element type {}, which tcc does not support",
                tensor::elem_type_name(tt.elem_type())
            ))
        })?;
        let dims =
            tt.shape.as_ref().ok_or_else(|| ImportError::Model(format!("input `{name}` has no declared rank")))?;
        let shape: Vec<Dim> = dims
            .dim
            .iter()
            .enumerate()
            .map(|(i, d)| match &d.value {
                Some(proto::tensor_shape_proto::dimension::Value::DimValue(v)) if *v >= 0 => Ok(Dim::constant(*v)),
                Some(proto::tensor_shape_proto::dimension::Value::DimValue(v)) => {
                    Err(ImportError::Model(format!("input `{name}` declares dimension {v}")))
                }
                Some(proto::tensor_shape_proto::dimension::Value::DimParam(p)) if !p.is_empty() => {
                    Ok(Dim::sym(&tcc_runtime::dim::sanitize_symbol(p)))
                }
                _ => {
                    anon += 1;
                    Ok(Dim::sym(&tcc_runtime::dim::sanitize_symbol(&format!("{name}_dim{i}"))))
                }
            })
            .collect::<Result<_, _>>()?;
        let v = g.add_input(name.clone(), Fact::new(dtype, shape));
        scope.insert(name, v);
    }
    let _ = anon;

    let order = sort_nodes(&graph_proto.node, &scope)?;
    let mut source_op_counts = BTreeMap::new();
    for &i in &order {
        let node = &graph_proto.node[i];
        let key = if node.domain().is_empty() || node.domain() == "ai.onnx" {
            node.op_type().to_string()
        } else {
            format!("{}::{}", node.domain(), node.op_type())
        };
        *source_op_counts.entry(key).or_insert(0) += 1;
        convert_node(&mut g, node, &opsets, &mut scope, &mut ext)?;
    }

    for out in &graph_proto.output {
        let name = out.name();
        let v = *scope
            .get(name)
            .ok_or_else(|| ImportError::Model(format!("output `{name}` is not computed by the graph")))?;
        g.add_output(name, v);
    }
    if g.outputs.is_empty() {
        return Err(ImportError::Model("the graph has no outputs".into()));
    }
    g.remove_dead_nodes();
    g.toposort()?;
    tcc_ir::verify(&g)?;
    Ok(Imported { graph: g, opsets, producer, source_op_counts })
}

/// Node indices in an order where every input is produced before use (ONNX requires the file
/// order to be one; some tools do not comply).
fn sort_nodes(nodes: &[NodeProto], defined: &HashMap<String, ValueId>) -> Result<Vec<usize>, ImportError> {
    let mut producer: HashMap<&str, usize> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for o in n.output.iter().filter(|o| !o.is_empty()) {
            if producer.insert(o, i).is_some() || defined.contains_key(o.as_str()) {
                return Err(ImportError::Model(format!("value `{o}` is defined more than once")));
            }
        }
    }
    let mut indegree = vec![0usize; nodes.len()];
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        for inp in n.input.iter().filter(|x| !x.is_empty()) {
            if let Some(&p) = producer.get(inp.as_str()) {
                indegree[i] += 1;
                users[p].push(i);
            } else if !defined.contains_key(inp.as_str()) {
                return Err(ImportError::Model(format!(
                    "node `{}` ({}) reads `{inp}`, which no node, input or initializer defines",
                    n.name(),
                    n.op_type()
                )));
            }
        }
    }
    let mut ready: std::collections::BTreeSet<usize> = (0..nodes.len()).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &u in &users[i] {
            indegree[u] -= 1;
            if indegree[u] == 0 {
                ready.insert(u);
            }
        }
    }
    if order.len() != nodes.len() {
        return Err(ImportError::Model("the graph has a cycle".into()));
    }
    Ok(order)
}

fn convert_node(
    g: &mut Graph,
    node: &NodeProto,
    opsets: &BTreeMap<String, i64>,
    scope: &mut HashMap<String, ValueId>,
    ext: &mut ExternalData,
) -> Result<(), ImportError> {
    let domain = match node.domain() {
        "ai.onnx" => "",
        d => d,
    };
    let node_name =
        if node.name().is_empty() { node.output.first().cloned().unwrap_or_default() } else { node.name().to_string() };
    let op_label = if domain.is_empty() { node.op_type().to_string() } else { format!("{domain}::{}", node.op_type()) };
    let opset = *opsets.get(domain).ok_or_else(|| {
        ImportError::Opset(format!("node `{node_name}` uses domain `{domain}`, which the model does not import"))
    })?;
    let range = if domain.is_empty() {
        Some(&ONNX_OPSETS)
    } else if domain == MS_DOMAIN {
        Some(&MS_OPSETS)
    } else {
        None
    };
    match range {
        Some(r) if !r.contains(&opset) => {
            return Err(ImportError::Opset(format!(
                "{} opset {opset} (node `{node_name}`, {op_label}); tcc supports opsets {} to {}",
                if domain.is_empty() { "ai.onnx" } else { domain },
                r.start(),
                r.end()
            )))
        }
        None => {
            return Err(ImportError::Unsupported {
                op: op_label,
                node: node_name,
                opset,
                hint: format!(" (domain `{domain}` is not supported)"),
            });
        }
        _ => {}
    }
    let convert = ops::lookup(domain, node.op_type()).ok_or_else(|| ImportError::Unsupported {
        op: op_label.clone(),
        node: node_name.clone(),
        opset,
        hint: String::new(),
    })?;
    let inputs: Vec<Option<ValueId>> =
        node.input.iter().map(|n| if n.is_empty() { None } else { scope.get(n.as_str()).copied() }).collect();
    let before = g.values.len();
    let mut ctx = Ctx { g, node, name: node_name.clone(), op_label, opset, inputs, ext };
    let outs = convert(&mut ctx)?;
    for (i, name) in node.output.iter().enumerate() {
        if name.is_empty() {
            continue;
        }
        match outs.get(i).copied().flatten() {
            Some(v) => {
                // Values made by this node take the ONNX output names.
                if v.index() >= before {
                    g.value_mut(v).name = name.clone();
                }
                scope.insert(name.clone(), v);
            }
            None => {
                // An optional output tcc does not compute: fine unless something reads it,
                // which `sort_nodes` already guarantees cannot be silently missed: a later
                // reader will find it absent from `scope`.
            }
        }
    }
    Ok(())
}

/// What a converter sees: the node, its inputs, the graph to add ops to.
pub struct Ctx<'a> {
    pub g: &'a mut Graph,
    node: &'a NodeProto,
    name: String,
    op_label: String,
    /// The opset version of the node's domain.
    pub opset: i64,
    inputs: Vec<Option<ValueId>>,
    ext: &'a mut ExternalData,
}

/// A converter's result: one entry per ONNX output (`None` for optional outputs not computed).
pub type Converted = Result<Vec<Option<ValueId>>, ImportError>;

impl Ctx<'_> {
    pub fn err(&self, message: impl Into<String>) -> ImportError {
        ImportError::Node { node: self.name.clone(), op: self.op_label.clone(), message: message.into() }
    }

    /// The ONNX op type.
    pub fn op_type(&self) -> &str {
        self.node.op_type()
    }

    pub fn num_inputs(&self) -> usize {
        self.inputs.len()
    }

    /// Input `i`, which must be present.
    pub fn input(&self, i: usize) -> Result<ValueId, ImportError> {
        match self.node.input.get(i) {
            None => Err(self.err(format!("input {i} is required"))),
            Some(n) if n.is_empty() => Err(self.err(format!("input {i} is required"))),
            Some(n) => self.inputs[i]
                .ok_or_else(|| self.err(format!("input `{n}` is not computed (an output tcc does not support?)"))),
        }
    }

    /// Optional input `i`.
    pub fn opt(&self, i: usize) -> Result<Option<ValueId>, ImportError> {
        match self.node.input.get(i) {
            None => Ok(None),
            Some(n) if n.is_empty() => Ok(None),
            Some(_) => self.input(i).map(Some),
        }
    }

    /// Every input, each required.
    pub fn all_inputs(&self) -> Result<Vec<ValueId>, ImportError> {
        (0..self.inputs.len()).map(|i| self.input(i)).collect()
    }

    pub fn fact(&self, v: ValueId) -> &Fact {
        self.g.fact(v)
    }

    /// Whether ONNX output `i` is used (named).
    pub fn output_used(&self, i: usize) -> bool {
        self.node.output.get(i).is_some_and(|n| !n.is_empty())
    }

    pub fn num_outputs(&self) -> usize {
        self.node.output.len()
    }

    /// Errors if any output from `from` on is used.
    pub fn only_outputs(&self, from: usize, what: &str) -> Result<(), ImportError> {
        if (from..self.num_outputs()).any(|i| self.output_used(i)) {
            return Err(self.err(format!("{what} is not supported")));
        }
        Ok(())
    }

    fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.node.attribute.iter().find(|a| a.name() == name)
    }

    pub fn has_attr(&self, name: &str) -> bool {
        self.attr(name).is_some()
    }

    pub fn attr_i(&self, name: &str, default: i64) -> Result<i64, ImportError> {
        match self.attr(name) {
            None => Ok(default),
            Some(a) => a.i.ok_or_else(|| self.err(format!("attribute `{name}` must be an int"))),
        }
    }

    pub fn attr_f(&self, name: &str, default: f32) -> Result<f32, ImportError> {
        match self.attr(name) {
            None => Ok(default),
            Some(a) => {
                a.f.or(a.i.map(|i| i as f32)).ok_or_else(|| self.err(format!("attribute `{name}` must be a float")))
            }
        }
    }

    pub fn attr_ints(&self, name: &str) -> Result<Option<Vec<i64>>, ImportError> {
        Ok(self.attr(name).map(|a| a.ints.clone()))
    }

    pub fn attr_floats(&self, name: &str) -> Result<Option<Vec<f32>>, ImportError> {
        Ok(self.attr(name).map(|a| a.floats.clone()))
    }

    pub fn attr_s(&self, name: &str) -> Result<Option<String>, ImportError> {
        match self.attr(name) {
            None => Ok(None),
            Some(a) => match &a.s {
                Some(s) => String::from_utf8(s.clone())
                    .map(Some)
                    .map_err(|_| self.err(format!("attribute `{name}` is not UTF-8"))),
                None => Err(self.err(format!("attribute `{name}` must be a string"))),
            },
        }
    }

    pub fn attr_tensor(&mut self, name: &str) -> Result<Option<Tensor>, ImportError> {
        let Some(a) = self.attr(name) else {
            return Ok(None);
        };
        let mut t = a.t.clone().ok_or_else(|| self.err(format!("attribute `{name}` must be a tensor")))?;
        if t.name.is_none() {
            t.name = Some(format!("{}.{name}", self.name));
        }
        tensor::to_tensor(&mut t, self.ext).map(Some)
    }

    /// Errors on attributes other than `allowed`, so that an unsupported mode is never silently
    /// ignored.
    pub fn check_attrs(&self, allowed: &[&str]) -> Result<(), ImportError> {
        for a in &self.node.attribute {
            if !allowed.contains(&a.name()) {
                return Err(self.err(format!("attribute `{}` is not supported", a.name())));
            }
        }
        Ok(())
    }

    fn value_name(&self, suffix: &str) -> String {
        if suffix.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{suffix}", self.name)
        }
    }

    fn wrap(&self, e: tcc_ir::Error) -> ImportError {
        match e {
            tcc_ir::Error::Infer { message, .. } => self.err(message),
            e => self.err(e.to_string()),
        }
    }

    /// Adds an op with (optional) inputs; `suffix` names intermediate values.
    pub fn op(
        &mut self,
        op: impl Into<Op>,
        inputs: &[Option<ValueId>],
        suffix: &str,
    ) -> Result<Vec<ValueId>, ImportError> {
        let name = self.value_name(suffix);
        self.g.add_node(op, inputs.to_vec(), name).map_err(|e| self.wrap(e))
    }

    /// Adds a single-output op on required inputs.
    pub fn op1(&mut self, op: impl Into<Op>, inputs: &[ValueId], suffix: &str) -> Result<ValueId, ImportError> {
        let ins: Vec<Option<ValueId>> = inputs.iter().map(|&v| Some(v)).collect();
        Ok(self.op(op, &ins, suffix)?[0])
    }

    pub fn constant(&mut self, t: Tensor, suffix: &str) -> ValueId {
        let name = self.value_name(suffix);
        self.g.add_const(name, t)
    }

    pub fn const_i64s(&mut self, v: &[i64], suffix: &str) -> ValueId {
        self.constant(Tensor::new(vec![v.len()], v.to_vec()).expect("1-D"), suffix)
    }

    pub fn scalar_f32(&mut self, v: f32, suffix: &str) -> ValueId {
        self.constant(Tensor::scalar(v), suffix)
    }

    pub fn scalar_i64(&mut self, v: i64, suffix: &str) -> ValueId {
        self.constant(Tensor::scalar(v), suffix)
    }

    /// The constant integer values of a value, when known at import.
    pub fn const_ints(&self, v: ValueId) -> Option<Vec<i64>> {
        if let Some(t) = self.g.const_of(v) {
            return t.to_i64s().ok();
        }
        self.g.fact(v).const_i64s()
    }

    pub fn dtype(&self, v: ValueId) -> DType {
        self.g.fact(v).dtype
    }

    pub fn rank(&self, v: ValueId) -> usize {
        self.g.fact(v).rank()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_a_decode_error() {
        for bytes in [&b""[..], b"\xff\xff\xff\xff", b"hello world, not a model"] {
            let e = import_bytes(bytes, None).err().expect("error").to_string();
            assert!(e.contains("ONNX") || e.contains("empty"), "{e}");
        }
    }
}

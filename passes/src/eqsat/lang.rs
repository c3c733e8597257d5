//! The e-graph language over tcc's IR, and the analysis every e-class carries.
//!
//! The language is generic over the op vocabulary: an e-node is an op (its name and
//! attributes, [`OpSym`]) applied to e-classes, so every op of [`tcc_ir::op`] is in the
//! language without a line here, and adding an op to the vocabulary needs nothing in the
//! e-graph. Values the e-graph does not look into (model inputs, weights, outputs of
//! multi-output nodes) are leaves ([`Leaf`]): weights stay outside, referenced by id. Scalar
//! `f32` constants made by rewrites are leaves too ([`Scalar`]).
//!
//! In patterns an op is written by its name when its attributes are the defaults (`Add`,
//! `ReduceMean`, `Softmax`), else as `Name{json}`: `(Add (Mul ?x ?g) ?b)`.

use egg::{define_language, Analysis, DidMerge, EGraph, Id, Symbol};
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};
use tcc_ir::{DType, Fact, Op, ValueId};

define_language! {
    /// tcc's IR as an e-graph language.
    pub enum Tl {
        Scalar(Scalar),
        Leaf(Leaf),
        Op(OpSym, Vec<Id>),
    }
}

/// An op with its attributes, interned: `Add`, `ReduceMean`, `LayerNorm{"axis":-1,"epsilon":0.5}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpSym(Symbol);

fn ops() -> &'static Mutex<HashMap<Symbol, Op>> {
    static OPS: OnceLock<Mutex<HashMap<Symbol, Op>>> = OnceLock::new();
    OPS.get_or_init(Default::default)
}

impl OpSym {
    /// The symbol of `op`: its name when its attributes are the defaults, else name and
    /// attributes.
    pub fn of(op: &Op) -> OpSym {
        let name = op.name();
        let attrs = op.attrs();
        let is_default = Op::from_name(name, serde_json::Value::Object(Default::default())).is_ok_and(|d| d == *op);
        let text = if is_default { name.to_string() } else { format!("{name}{attrs}") };
        let sym = Symbol::from(text);
        ops().lock().unwrap_or_else(|e| e.into_inner()).entry(sym).or_insert_with(|| op.clone());
        OpSym(sym)
    }

    /// The op this symbol stands for.
    pub fn op(&self) -> Op {
        let map = ops().lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&self.0) {
            Some(op) => op.clone(),
            None => unreachable!("every OpSym is made by OpSym::of or parsed, which interns its op"),
        }
    }

    pub fn name(&self) -> &'static str {
        // The interned text starts with the op's name.
        let s = self.0.as_str();
        &s[..s.find('{').unwrap_or(s.len())]
    }
}

impl fmt::Display for OpSym {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

impl FromStr for OpSym {
    type Err = String;

    /// `Name` (default attributes), `Name{json}` or, as the IR's text form writes them,
    /// `Name{key=json,key=json}` (`Transpose{perm=[0,2,1]}`); the op must exist.
    fn from_str(s: &str) -> Result<OpSym, String> {
        let (name, attrs) = match s.find('{') {
            Some(i) => (&s[..i], parse_attrs(&s[i..]).map_err(|e| format!("attributes of `{s}`: {e}"))?),
            None => (s, serde_json::Value::Object(Default::default())),
        };
        if name.is_empty() || !name.chars().next().is_some_and(|c| c.is_ascii_uppercase()) {
            return Err(format!("`{s}` is not an op"));
        }
        let op = Op::from_name(name, attrs)?;
        Ok(OpSym::of(&op))
    }
}

/// `{json}` or `{key=json,key=json}`.
fn parse_attrs(s: &str) -> Result<serde_json::Value, String> {
    if let Ok(v) = serde_json::from_str(s) {
        return Ok(v);
    }
    let inner = s.strip_prefix('{').and_then(|r| r.strip_suffix('}')).ok_or("not in braces")?;
    let mut m = serde_json::Map::new();
    let (mut depth, mut start) = (0i32, 0usize);
    let mut parts = Vec::new();
    for (i, c) in inner.char_indices() {
        match c {
            '[' | '{' => depth += 1,
            ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    for part in parts.into_iter().filter(|p| !p.trim().is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| format!("`{part}` is not key=value"))?;
        m.insert(k.trim().to_string(), serde_json::from_str(v.trim()).map_err(|e| format!("`{part}`: {e}"))?);
    }
    Ok(serde_json::Value::Object(m))
}

/// A value outside the e-graph (`%12`), or an omitted optional input (`%_`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Leaf {
    Value(u32),
    Absent,
}

impl fmt::Display for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Leaf::Value(v) => write!(f, "%{v}"),
            Leaf::Absent => f.write_str("%_"),
        }
    }
}

impl FromStr for Leaf {
    type Err = String;

    fn from_str(s: &str) -> Result<Leaf, String> {
        match s.strip_prefix('%') {
            Some("_") => Ok(Leaf::Absent),
            Some(n) => n.parse().map(Leaf::Value).map_err(|_| format!("`{s}` is not a value")),
            None => Err(format!("`{s}` is not a value")),
        }
    }
}

/// A scalar (rank 0) `f32` constant, compared by its bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scalar(u32);

impl Scalar {
    pub fn new(x: f32) -> Scalar {
        Scalar(x.to_bits())
    }

    pub fn get(self) -> f32 {
        f32::from_bits(self.0)
    }
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `{:?}` keeps a decimal point (`2.0`), which tells scalars from value ids.
        write!(f, "{:?}", self.get())
    }
}

impl FromStr for Scalar {
    type Err = String;

    /// A decimal number with a point or an exponent (`2.0`, `1e-12`, `-0.5`).
    fn from_str(s: &str) -> Result<Scalar, String> {
        let numeric = s.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '.');
        if !numeric || !s.contains(['.', 'e', 'E']) {
            return Err(format!("`{s}` is not a scalar"));
        }
        s.parse::<f32>().map(Scalar::new).map_err(|e| format!("`{s}`: {e}"))
    }
}

/// What is known about an e-class: its fact (dtype and shape; `None` when inference failed,
/// which makes the class unusable for extraction) and, for one-element `f32` constants, the
/// value.
#[derive(Clone, Debug, PartialEq)]
pub struct Info {
    pub fact: Option<Fact>,
    pub scalar: Option<f32>,
}

/// The analysis: facts of the leaves come from the graph, facts of op nodes from the op's
/// own inference on its children's facts.
#[derive(Default)]
pub struct TlAnalysis {
    /// Per graph value: its fact and, for one-element `f32` constants, its value.
    pub leaves: Vec<(Fact, Option<f32>)>,
    /// Per packed weights a product reads (by value index): the share of their blocks of 64
    /// rows of `k` by a 32-column panel that are all zero, as the runtime's kernels find them
    /// ([`zero_block_share`]): what the cost model prices weight formats by.
    pub zero_blocks: HashMap<u32, f64>,
}

/// The share of the packed weights `w` of product `f` that a block-sparse walk skips, counted
/// as the runtime counts it at load (int8: all-zero steps of 64 rows by a 32-column panel,
/// [`tcc_runtime::kernels::int8::Sparse`]; f32: all-zero rows of a panel outside the runs it walks,
/// [`tcc_runtime::kernels::PanelRuns`]); `None` for weights no kernel walks that way.
pub fn zero_block_share(f: &tcc_ir::op::FusedMatMul, w: &tcc_ir::Tensor) -> Option<f64> {
    let [k, n] = f.packed?;
    match f.int8 {
        Some(_) => tcc_runtime::kernels::int8::Sparse::zero_share(k, n, w.as_slice::<i8>().ok()?),
        None => {
            tcc_runtime::kernels::PanelRuns::detect(k, n, w.as_slice::<f32>().ok()?, 0.0).map(|r| r.zero_fraction())
        }
    }
}

impl TlAnalysis {
    pub fn leaf(&self, v: ValueId) -> Info {
        match self.leaves.get(v.index()) {
            Some((f, s)) => Info { fact: Some(f.clone()), scalar: *s },
            None => Info { fact: None, scalar: None },
        }
    }
}

pub type TlGraph = EGraph<Tl, TlAnalysis>;

impl Analysis<Tl> for TlAnalysis {
    type Data = Info;

    fn make(egraph: &mut TlGraph, enode: &Tl, _: Id) -> Info {
        match enode {
            Tl::Scalar(s) => Info { fact: Some(Fact::new(DType::F32, vec![])), scalar: Some(s.get()) },
            Tl::Leaf(Leaf::Value(v)) => egraph.analysis.leaf(ValueId(*v)),
            Tl::Leaf(Leaf::Absent) => Info { fact: None, scalar: None },
            Tl::Op(sym, children) => {
                let absent: Vec<bool> = children
                    .iter()
                    .map(|c| egraph[*c].nodes.iter().any(|n| matches!(n, Tl::Leaf(Leaf::Absent))))
                    .collect();
                let facts: Vec<Option<Fact>> = children.iter().map(|c| egraph[*c].data.fact.clone()).collect();
                if facts.iter().zip(&absent).any(|(f, &a)| f.is_none() && !a) {
                    return Info { fact: None, scalar: None };
                }
                let refs: Vec<Option<&Fact>> = facts.iter().map(Option::as_ref).collect();
                let fact = sym.op().infer(&refs).ok().filter(|o| o.len() == 1).and_then(|mut o| o.pop());
                Info { fact, scalar: None }
            }
        }
    }

    fn merge(&mut self, a: &mut Info, b: Info) -> DidMerge {
        let mut changed_a = false;
        if a.fact.is_none() && b.fact.is_some() {
            a.fact = b.fact.clone();
            changed_a = true;
        }
        if a.scalar.is_none() && b.scalar.is_some() {
            a.scalar = b.scalar;
            changed_a = true;
        }
        DidMerge(changed_a, a.fact.is_some() && b.fact.is_none() || a.scalar.is_some() && b.scalar.is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols_print_and_parse() {
        for s in ["Add", "ReduceMean", "Softmax", "Sqrt", "LayerNorm{\"axis\":-1,\"epsilon\":0.5}"] {
            let sym: OpSym = s.parse().unwrap();
            assert_eq!(sym.to_string(), s);
            assert_eq!(OpSym::of(&sym.op()), sym);
        }
        let t: OpSym = "Transpose{perm=[0,2,1]}".parse().unwrap();
        assert_eq!(t, "Transpose{\"perm\":[0,2,1]}".parse().unwrap());
        assert!("Nope".parse::<OpSym>().is_err());
        assert!("%3".parse::<OpSym>().is_err());
        assert_eq!("%3".parse::<Leaf>(), Ok(Leaf::Value(3)));
        assert_eq!("2.0".parse::<Scalar>().map(Scalar::get), Ok(2.0));
        assert!("2".parse::<Scalar>().is_err());
        let e: egg::RecExpr<Tl> = "(Add (Mul %1 0.5) %_)".parse().unwrap();
        let back: egg::RecExpr<Tl> = e.to_string().parse().unwrap();
        assert_eq!(back, e);
        assert!(matches!(e[0.into()], Tl::Leaf(Leaf::Value(1))));
    }
}

//! The op vocabulary shared by the compiler and the runtime.
//!
//! Each op is a struct holding its attributes and implementing [`OpDef`]: its name, how many
//! inputs and outputs it takes, symbolic type inference ([`OpDef::infer`]) and a plain,
//! obviously correct evaluation ([`OpDef::eval`]). The evaluation is the reference semantics:
//! the IR's interpreter runs it, and faster kernels are checked against it.
//!
//! Ops follow the newest ONNX opset's signatures (axes, shapes and scales are inputs, not
//! attributes); the ONNX front end converts older opsets. Adding an op means writing its struct
//! in one of the files below and adding one line to the `ops!` list at the bottom of this file.
//!
//! The vocabulary lives in the runtime because the runtime must execute it without depending
//! on the compiler crates; `tcc-ir` re-exports it.

pub(crate) mod elementwise;
pub mod fused;
mod gather;
mod linalg;
mod nn;
pub(crate) mod quant;
mod reduce;
mod shape;

pub use elementwise::{cast_tensor, Binary, BinaryKind, Cast, Clip, Unary, UnaryKind, Where};
pub use fused::{Attention, EpiOp, Epilogue, FusedMatMul, WeightFormat};
pub(crate) use gather::resolve as resolve_index;
pub use gather::{Gather, GatherElements, GatherND};
pub use linalg::MatMul;
pub use nn::{gelu, Gelu, GeluApprox, LayerNorm, Softmax};
pub use quant::{dynamic_qparams, DequantizeLinear, DynamicQuantizeLinear, FakeQuant, MatMulInteger, QuantizeLinear};
pub use reduce::{CumSum, Reduce, ReduceKind};
pub use shape::{
    Concat, ConstantOfShape, DimValue, Expand, Flatten, Range, Reshape, Shape, Size, Slice, Split, Squeeze, Tile,
    Transpose, Unsqueeze,
};

use crate::dim::Dim;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// What is known about a value before running: its dtype, its symbolic shape and, for small
/// integer tensors computed from shapes, its symbolic elements.
#[derive(Clone, Debug, PartialEq)]
pub struct Fact {
    pub dtype: DType,
    pub shape: Vec<Dim>,
    pub value: Option<Arc<SymTensor>>,
}

/// An integer (or bool) tensor whose elements are dims: `Shape(x)` is `[batch, sequence, 384]`.
#[derive(Clone, Debug, PartialEq)]
pub struct SymTensor {
    pub shape: Vec<usize>,
    pub data: Vec<Dim>,
}

/// Integer tensors of at most this many elements carry their symbolic value in their fact.
pub const MAX_SYM_ELEMENTS: usize = 64;

impl SymTensor {
    pub fn new(shape: Vec<usize>, data: Vec<Dim>) -> SymTensor {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        SymTensor { shape, data }
    }

    /// The concrete elements, when no element depends on a symbol.
    pub fn as_consts(&self) -> Option<Vec<i64>> {
        self.data.iter().map(Dim::as_const).collect()
    }

    /// The symbolic value of a small integer tensor.
    pub fn from_tensor(t: &Tensor) -> Option<SymTensor> {
        if t.dtype() == DType::F32 || t.len() > MAX_SYM_ELEMENTS {
            return None;
        }
        let v = t.to_i64s().ok()?;
        Some(SymTensor::new(t.shape().to_vec(), v.into_iter().map(Dim::constant).collect()))
    }

    /// A concrete tensor of `dtype`, when every element is constant.
    pub fn to_tensor(&self, dtype: DType) -> Option<Tensor> {
        let v = self.as_consts()?;
        let shape = self.shape.clone();
        Some(match dtype {
            DType::I64 => Tensor::new(shape, v).ok()?,
            DType::I32 => Tensor::new(shape, v.into_iter().map(|x| x as i32).collect()).ok()?,
            DType::I8 => Tensor::new(shape, v.into_iter().map(|x| x as i8).collect()).ok()?,
            DType::U8 => Tensor::new(shape, v.into_iter().map(|x| x as u8).collect()).ok()?,
            DType::Bool => Tensor::bool_from_u8(shape, v.into_iter().map(|x| u8::from(x != 0)).collect()).ok()?,
            DType::F32 => return None,
        })
    }
}

impl Fact {
    pub fn new(dtype: DType, shape: Vec<Dim>) -> Fact {
        Fact { dtype, shape, value: None }
    }

    pub fn with_value(mut self, value: SymTensor) -> Fact {
        if self.dtype != DType::F32 && value.data.len() <= MAX_SYM_ELEMENTS {
            self.value = Some(Arc::new(value));
        }
        self
    }

    /// The fact of a known tensor (its value kept when small and integer).
    pub fn of_tensor(t: &Tensor) -> Fact {
        let f = Fact::new(t.dtype(), t.shape().iter().map(|&d| Dim::from(d)).collect());
        match SymTensor::from_tensor(t) {
            Some(v) => f.with_value(v),
            None => f,
        }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The shape when every dim is constant.
    pub fn concrete_shape(&self) -> Option<Vec<usize>> {
        self.shape.iter().map(|d| d.as_const().and_then(|v| usize::try_from(v).ok())).collect()
    }

    /// The elements when the value is known and constant.
    pub fn const_i64s(&self) -> Option<Vec<i64>> {
        self.value.as_ref()?.as_consts()
    }
}

impl fmt::Display for Fact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// What an evaluation may need besides its inputs: the values of the model's symbols.
#[derive(Clone, Debug, Default)]
pub struct EvalContext {
    pub symbols: BTreeMap<String, i64>,
}

/// How many inputs and outputs an op takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arity {
    pub min_inputs: usize,
    pub max_inputs: usize,
    pub outputs: usize,
}

impl Arity {
    pub const fn exact(inputs: usize, outputs: usize) -> Arity {
        Arity { min_inputs: inputs, max_inputs: inputs, outputs }
    }

    pub const fn range(min_inputs: usize, max_inputs: usize, outputs: usize) -> Arity {
        Arity { min_inputs, max_inputs, outputs }
    }
}

/// One op: attributes plus semantics.
pub trait OpDef: Sized + Clone + fmt::Debug + PartialEq + Serialize + DeserializeOwned {
    /// The names this struct answers to: one for most ops, one per kind for families like
    /// [`Unary`].
    const NAMES: &'static [&'static str];

    /// This op's name, as printed and as counted by `tcc inspect`.
    fn name(&self) -> &'static str {
        Self::NAMES[0]
    }

    /// Builds the op from its name and attributes (the JSON object written by `Serialize`).
    fn from_attrs(name: &str, attrs: Json) -> Result<Self, String> {
        debug_assert!(Self::NAMES.contains(&name));
        serde_json::from_value(attrs).map_err(|e| format!("{name}: {e}"))
    }

    fn arity(&self) -> Arity;

    /// Output facts from input facts (`None` for an omitted optional input).
    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>>;

    /// Output tensors from input tensors.
    fn eval(&self, ctx: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>>;
}

/// The `i`-th input, which the op requires.
pub(crate) fn req<'a, T>(op: &str, inputs: &[Option<&'a T>], i: usize) -> Result<&'a T> {
    inputs.get(i).copied().flatten().ok_or_else(|| Error::op(op, format!("input {i} is required")))
}

/// An axis in `-rank..rank` made non-negative.
pub(crate) fn norm_axis(op: &str, axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    if axis < -r || axis >= r.max(1) {
        return Err(Error::op(op, format!("axis {axis} is out of range for rank {rank}")));
    }
    Ok(if axis < 0 { (axis + r) as usize } else { axis as usize })
}

/// Symbolic numpy broadcasting of several shapes.
pub(crate) fn broadcast_dims(op: &str, shapes: &[&[Dim]]) -> Result<Vec<Dim>> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let one = Dim::constant(1);
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let mut acc = one.clone();
        for s in shapes {
            let pad = rank - s.len();
            if i < pad {
                continue;
            }
            let d = &s[i - pad];
            acc = if acc == one || acc == *d {
                d.clone()
            } else if *d == one {
                acc
            } else if let (Some(a), Some(b)) = (acc.as_const(), d.as_const()) {
                return Err(Error::op(op, format!("cannot broadcast dims {a} and {b}")));
            } else if acc.is_const() {
                acc
            } else if d.is_const() {
                d.clone()
            } else {
                // Two different symbolic dims: equal at run time or one of them is 1.
                Dim::unknown()
            };
        }
        out.push(acc);
    }
    Ok(out)
}

/// Concrete numpy broadcasting of several shapes.
pub(crate) fn broadcast_shapes(op: &str, shapes: &[&[usize]]) -> Result<Vec<usize>> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![1usize; rank];
    for s in shapes {
        let pad = rank - s.len();
        for (i, &d) in s.iter().enumerate() {
            let o = &mut out[pad + i];
            if *o == 1 {
                *o = d;
            } else if d != 1 && d != *o {
                return Err(Error::op(op, format!("cannot broadcast shapes {shapes:?}")));
            }
        }
    }
    Ok(out)
}

/// Row-major strides of `shape`, with stride 0 on the dims `shape` broadcasts along to reach
/// `out` (which has at least as many dims).
pub(crate) fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let pad = out.len() - shape.len();
    let mut strides = vec![0usize; out.len()];
    let mut acc = 1usize;
    for i in (0..shape.len()).rev() {
        strides[pad + i] = if shape[i] == 1 && out[pad + i] != 1 { 0 } else { acc };
        acc *= shape[i];
    }
    strides
}

/// Calls `f(offsets)` for every element of `out`, in row-major order, where `offsets[k]` is the
/// element's offset in input `k` under the given broadcast strides.
pub(crate) fn for_each_broadcast<const N: usize>(out: &[usize], strides: [&[usize]; N], mut f: impl FnMut([usize; N])) {
    let total: usize = out.iter().product();
    if total == 0 {
        return;
    }
    let rank = out.len();
    if rank == 0 {
        f([0; N]);
        return;
    }
    let inner = out[rank - 1];
    let inner_strides: [usize; N] = std::array::from_fn(|k| strides[k][rank - 1]);
    let mut idx = vec![0usize; rank - 1];
    let mut base = [0usize; N];
    loop {
        let mut off = base;
        for _ in 0..inner {
            f(off);
            for k in 0..N {
                off[k] += inner_strides[k];
            }
        }
        // Advance the outer multi-index.
        let mut d = rank - 1;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            for k in 0..N {
                base[k] += strides[k][d];
            }
            if idx[d] < out[d] {
                break;
            }
            for k in 0..N {
                base[k] -= strides[k][d] * out[d];
            }
            idx[d] = 0;
        }
    }
}

/// Row-major strides.
pub fn strides_of(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The dims of a fact's value used as a shape (`Reshape`, `Expand`...): known symbolically,
/// or only its length, or nothing.
pub(crate) fn shape_operand(f: &Fact) -> Option<Vec<Dim>> {
    if f.rank() != 1 {
        return None;
    }
    f.value.as_ref().map(|v| v.data.clone())
}

/// Rank given by a 1-D shape operand whose values are unknown.
pub(crate) fn shape_operand_len(op: &str, f: &Fact) -> Result<Option<usize>> {
    if f.rank() != 1 {
        return Ok(None);
    }
    match f.shape[0].as_const() {
        None => Ok(None),
        Some(n) if (0..=MAX_RANK as i64).contains(&n) => Ok(Some(n as usize)),
        Some(n) => Err(Error::op(op, format!("a shape of {n} dims (at most {MAX_RANK})"))),
    }
}

/// Most dims a tensor may have (numpy's limit): a shape operand declaring more is an error,
/// not a rank to allocate.
pub const MAX_RANK: usize = 64;

/// The concrete values of a shape-like input tensor.
pub(crate) fn shape_values(op: &str, t: &Tensor) -> Result<Vec<i64>> {
    if t.rank() > 1 {
        return Err(Error::op(op, format!("expected a 1-D shape tensor, got rank {}", t.rank())));
    }
    t.to_i64s().map_err(|e| Error::op(op, e.to_string()))
}

/// Converts a dim list to usizes, rejecting negatives.
pub(crate) fn to_usize_shape(op: &str, dims: &[i64]) -> Result<Vec<usize>> {
    dims.iter().map(|&d| usize::try_from(d).map_err(|_| Error::op(op, format!("invalid dimension {d}")))).collect()
}

/// Largest tensor an op may create, in elements, so that a bad shape is an error and not an
/// allocation failure.
pub const MAX_ELEMENTS: usize = 1 << 34;

pub(crate) fn check_alloc(op: &str, shape: &[usize]) -> Result<usize> {
    match crate::tensor::numel(shape) {
        Some(n) if n <= MAX_ELEMENTS => Ok(n),
        _ => Err(Error::op(op, format!("output shape {shape:?} is too large"))),
    }
}

macro_rules! ops {
    ($($variant:ident),* $(,)?) => {
        /// An op with its attributes.
        // `Attention` (two products) is the largest; ops live one per plan step, built once.
        #[allow(clippy::large_enum_variant)]
        #[derive(Clone, Debug, PartialEq)]
        pub enum Op {
            $($variant($variant)),*
        }

        $(impl From<$variant> for Op {
            fn from(o: $variant) -> Op {
                Op::$variant(o)
            }
        })*

        impl Op {
            pub fn name(&self) -> &'static str {
                match self { $(Op::$variant(o) => o.name()),* }
            }

            pub fn arity(&self) -> Arity {
                match self { $(Op::$variant(o) => o.arity()),* }
            }

            fn infer_inner(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
                match self { $(Op::$variant(o) => o.infer(inputs)),* }
            }

            fn eval_inner(&self, ctx: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
                match self { $(Op::$variant(o) => o.eval(ctx, inputs)),* }
            }

            /// The attributes as a JSON object.
            pub fn attrs(&self) -> Json {
                let v = match self { $(Op::$variant(o) => serde_json::to_value(o)),* };
                match v {
                    Ok(Json::Object(m)) => Json::Object(m),
                    Ok(Json::Null) | Ok(_) => Json::Object(Default::default()),
                    Err(e) => unreachable!("op attributes serialize: {e}"),
                }
            }

            /// Builds an op from its name and attributes.
            pub fn from_name(name: &str, attrs: Json) -> Result<Op, String> {
                $(if <$variant as OpDef>::NAMES.contains(&name) {
                    return <$variant as OpDef>::from_attrs(name, attrs).map(Op::$variant);
                })*
                Err(format!("unknown op `{name}`"))
            }

            /// Every op name in the vocabulary.
            pub fn all_names() -> Vec<&'static str> {
                let mut v = Vec::new();
                $(v.extend_from_slice(<$variant as OpDef>::NAMES);)*
                v
            }
        }
    };
}

ops! {
    Unary, Binary, Where, Cast, Clip,
    MatMul, FusedMatMul, Attention,
    Softmax, LayerNorm, Gelu,
    Reduce, CumSum,
    Shape, Size, Reshape, Flatten, Squeeze, Unsqueeze, Transpose, Concat, Split, Slice,
    Expand, Tile, ConstantOfShape, Range, DimValue,
    Gather, GatherElements, GatherND,
    QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear, MatMulInteger, FakeQuant,
}

impl Op {
    fn check_arity(&self, n: usize) -> Result<()> {
        let a = self.arity();
        if n < a.min_inputs || n > a.max_inputs {
            let want = if a.min_inputs == a.max_inputs {
                format!("{}", a.min_inputs)
            } else {
                format!("{} to {}", a.min_inputs, a.max_inputs)
            };
            return Err(Error::op(self.name(), format!("takes {want} inputs, got {n}")));
        }
        Ok(())
    }

    /// Output facts; checks the number of inputs and outputs.
    pub fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        self.check_arity(inputs.len())?;
        let out = self.infer_inner(inputs)?;
        debug_assert_eq!(out.len(), self.arity().outputs, "{}", self.name());
        Ok(out)
    }

    /// Output tensors; checks the number of inputs.
    pub fn eval(&self, ctx: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        self.check_arity(inputs.len())?;
        self.eval_inner(ctx, inputs)
    }

    /// Number of outputs this op produces.
    pub fn num_outputs(&self) -> usize {
        self.arity().outputs
    }
}

impl Serialize for Op {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = match self.attrs() {
            Json::Object(m) => m,
            _ => Default::default(),
        };
        m.insert("op".into(), Json::String(self.name().into()));
        Json::Object(m).serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for Op {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Op, D::Error> {
        let v = Json::deserialize(d)?;
        let Json::Object(mut m) = v else {
            return Err(serde::de::Error::custom("an op is a JSON object"));
        };
        let Some(Json::String(name)) = m.remove("op") else {
            return Err(serde::de::Error::custom("an op needs an \"op\" name"));
        };
        Op::from_name(&name, Json::Object(m)).map_err(serde::de::Error::custom)
    }
}

/// Dispatches `$body` with `$T` bound to the Rust element type of `$dtype` (numeric types; bool
/// reads as u8).
#[macro_export]
#[doc(hidden)]
macro_rules! with_dtype {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::DType::I64 => {
                type $T = i64;
                $body
            }
            $crate::DType::I32 => {
                type $T = i32;
                $body
            }
            $crate::DType::I8 => {
                type $T = i8;
                $body
            }
            $crate::DType::U8 | $crate::DType::Bool => {
                type $T = u8;
                $body
            }
        }
    };
}

/// A tensor of `dtype` from elements of the matching Rust type (`u8` for bool).
pub(crate) fn tensor_of<T: crate::tensor::Element>(dtype: DType, shape: Vec<usize>, data: Vec<T>) -> Result<Tensor> {
    if dtype == DType::Bool {
        let bytes: Vec<u8> = data.into_iter().map(|x| u8::from(x.is_nonzero())).collect();
        return Tensor::bool_from_u8(shape, bytes);
    }
    Tensor::new(shape, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_name_round_trips_through_json() {
        let ops: Vec<Op> = vec![
            Unary::new(UnaryKind::Erf).into(),
            Binary::new(BinaryKind::Add).into(),
            Transpose { perm: Some(vec![0, 2, 1, 3]) }.into(),
            LayerNorm { axis: -1, epsilon: 1e-12 }.into(),
            Reduce { kind: ReduceKind::ReduceMean, keepdims: true, noop_with_empty_axes: false }.into(),
        ];
        for op in ops {
            let j = serde_json::to_string(&op).unwrap();
            let back: Op = serde_json::from_str(&j).unwrap();
            assert_eq!(back, op, "{j}");
        }
        let names = Op::all_names();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len(), "op names are unique");
    }

    #[test]
    fn unknown_ops_and_bad_attrs_are_errors() {
        assert!(serde_json::from_str::<Op>(r#"{"op":"Frobnicate"}"#).is_err());
        assert!(serde_json::from_str::<Op>(r#"{"op":"Transpose","perm":"x"}"#).is_err());
        assert!(serde_json::from_str::<Op>(r#"{"op":"Transpose","bogus":1}"#).is_err());
    }

    #[test]
    fn broadcasting_walks_every_element() {
        let out = broadcast_shapes("t", &[&[2, 1, 3], &[4, 1]]).unwrap();
        assert_eq!(out, vec![2, 4, 3]);
        let (sa, sb) = (broadcast_strides(&[2, 1, 3], &out), broadcast_strides(&[4, 1], &out));
        let mut seen = vec![];
        for_each_broadcast(&out, [&sa, &sb], |[a, b]| seen.push((a, b)));
        assert_eq!(seen.len(), 24);
        assert_eq!(seen[0..4], [(0, 0), (1, 0), (2, 0), (0, 1)]);
        assert_eq!(seen[23], (5, 3));
        assert!(broadcast_shapes("t", &[&[2], &[3]]).is_err());
    }

    #[test]
    fn symbolic_broadcast() {
        let s = |v: &[&str]| v.iter().map(|x| Dim::parse(x).unwrap()).collect::<Vec<_>>();
        let out = broadcast_dims("t", &[&s(&["batch", "1", "1", "seq"]), &s(&["batch", "12", "seq", "seq"])]).unwrap();
        assert_eq!(out, s(&["batch", "12", "seq", "seq"]));
        assert!(broadcast_dims("t", &[&s(&["2"]), &s(&["3"])]).is_err());
    }
}

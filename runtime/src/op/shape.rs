//! Shape computations and data movement: `Shape`, `Reshape`, `Transpose`, `Concat`, `Slice`,
//! `Expand`, `Range`, `DimValue`...
//!
//! Type inference here also tracks the symbolic values of small integer tensors, so that the
//! shape subgraphs exporters emit (`Shape -> Gather -> Unsqueeze -> Concat -> Reshape`) give
//! symbolic output shapes and can be folded.

use super::{
    broadcast_dims, broadcast_shapes, broadcast_strides, check_alloc, for_each_broadcast, norm_axis, req,
    shape_operand, shape_operand_len, shape_values, strides_of, tensor_of, to_usize_shape, Arity, EvalContext, Fact,
    OpDef, SymTensor,
};
use crate::dim::Dim;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// A new tensor whose element `i` is element `idx[i]` of `x`.
pub(crate) fn take(x: &Tensor, idx: &[usize], shape: Vec<usize>) -> Result<Tensor> {
    crate::with_dtype!(x.dtype(), T => {
        let v = x.as_slice::<T>()?;
        tensor_of(x.dtype(), shape, idx.iter().map(|&i| v[i]).collect::<Vec<T>>())
    })
}

fn i64_vec(shape: Vec<usize>, v: Vec<i64>) -> Result<Tensor> {
    Tensor::new(shape, v)
}

fn const_dims(f: &Fact) -> Option<Vec<i64>> {
    f.const_i64s()
}

fn reshape_value(f: &Fact, shape: &[Dim]) -> Option<SymTensor> {
    let v = f.value.as_ref()?;
    let s: Option<Vec<usize>> = shape.iter().map(|d| d.as_const().map(|c| c as usize)).collect();
    let s = s?;
    (s.iter().product::<usize>() == v.data.len()).then(|| SymTensor::new(s, v.data.clone()))
}

/// `Shape(x)[start:end]` as an i64 vector.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shape {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<i64>,
}

impl Shape {
    fn range(&self, rank: usize) -> (usize, usize) {
        let r = rank as i64;
        let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
        let s = clamp(self.start.unwrap_or(0));
        let e = clamp(self.end.unwrap_or(r));
        (s, e.max(s))
    }
}

impl OpDef for Shape {
    const NAMES: &'static [&'static str] = &["Shape"];

    fn arity(&self) -> Arity {
        Arity::exact(1, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let x = req("Shape", inputs, 0)?;
        let (s, e) = self.range(x.rank());
        let dims = x.shape[s..e].to_vec();
        Ok(vec![Fact::new(DType::I64, vec![Dim::from(dims.len())]).with_value(SymTensor::new(vec![dims.len()], dims))])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let x = req("Shape", inputs, 0)?;
        let (s, e) = self.range(x.rank());
        let v: Vec<i64> = x.shape()[s..e].iter().map(|&d| d as i64).collect();
        Ok(vec![i64_vec(vec![v.len()], v)?])
    }
}

/// Number of elements, as an i64 scalar.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Size {}

impl OpDef for Size {
    const NAMES: &'static [&'static str] = &["Size"];

    fn arity(&self) -> Arity {
        Arity::exact(1, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let x = req("Size", inputs, 0)?;
        let n = x.shape.iter().fold(Dim::constant(1), |a, d| a.mul(d));
        Ok(vec![Fact::new(DType::I64, vec![]).with_value(SymTensor::new(vec![], vec![n]))])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        Ok(vec![Tensor::scalar(req("Size", inputs, 0)?.len() as i64)])
    }
}

/// `Reshape(data, shape)`; `0` copies the input dim (unless `allowzero`), `-1` is inferred.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reshape {
    #[serde(default)]
    pub allowzero: bool,
}

impl Reshape {
    fn resolve_dims(&self, input: &[Dim], target: &[Dim]) -> Result<Vec<Dim>> {
        let mut out = Vec::with_capacity(target.len());
        let mut infer_at = None;
        for (i, t) in target.iter().enumerate() {
            match t.as_const() {
                Some(0) if !self.allowzero => out.push(
                    input.get(i).cloned().ok_or_else(|| Error::op("Reshape", "0 refers to a missing input dim"))?,
                ),
                Some(-1) => {
                    if infer_at.replace(i).is_some() {
                        return Err(Error::op("Reshape", "more than one -1 in the target shape"));
                    }
                    out.push(Dim::constant(1));
                }
                Some(v) if v < -1 => return Err(Error::op("Reshape", format!("invalid target dim {v}"))),
                _ => out.push(t.clone()),
            }
        }
        if let Some(i) = infer_at {
            let total = input.iter().fold(Dim::constant(1), |a, d| a.mul(d));
            let known = out.iter().fold(Dim::constant(1), |a, d| a.mul(d));
            out[i] = total.div_exact(&known).unwrap_or_else(Dim::unknown);
        }
        Ok(out)
    }

    fn resolve(&self, input: &[usize], target: &[i64]) -> Result<Vec<usize>> {
        let total: usize = input.iter().product();
        let mut out = Vec::with_capacity(target.len());
        let mut infer_at = None;
        for (i, &t) in target.iter().enumerate() {
            match t {
                0 if !self.allowzero => {
                    out.push(*input.get(i).ok_or_else(|| Error::op("Reshape", "0 refers to a missing input dim"))?)
                }
                -1 => {
                    if infer_at.replace(i).is_some() {
                        return Err(Error::op("Reshape", "more than one -1 in the target shape"));
                    }
                    out.push(1);
                }
                t if t < 0 => return Err(Error::op("Reshape", format!("invalid target dim {t}"))),
                t => out.push(t as usize),
            }
        }
        let known = crate::tensor::numel(&out).ok_or_else(|| Error::op("Reshape", "target shape overflows"))?;
        if let Some(i) = infer_at {
            if known == 0 || !total.is_multiple_of(known) {
                return Err(Error::op("Reshape", format!("cannot reshape {input:?} to {target:?}")));
            }
            out[i] = total / known;
        } else if known != total {
            return Err(Error::op("Reshape", format!("cannot reshape {input:?} to {target:?}")));
        }
        Ok(out)
    }
}

impl OpDef for Reshape {
    const NAMES: &'static [&'static str] = &["Reshape"];

    fn arity(&self) -> Arity {
        Arity::exact(2, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let (x, s) = (req("Reshape", inputs, 0)?, req("Reshape", inputs, 1)?);
        if s.dtype != DType::I64 {
            return Err(Error::op("Reshape", format!("shape must be i64, got {}", s.dtype)));
        }
        let shape = match (shape_operand(s), shape_operand_len("Reshape", s)?) {
            (Some(t), _) => self.resolve_dims(&x.shape, &t)?,
            (None, Some(n)) => (0..n).map(|_| Dim::unknown()).collect(),
            (None, None) => return Err(Error::op("Reshape", "the target shape must be a 1-D tensor of known length")),
        };
        let mut out = Fact::new(x.dtype, shape.clone());
        if let Some(v) = reshape_value(x, &shape) {
            out = out.with_value(v);
        }
        Ok(vec![out])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let (x, s) = (req("Reshape", inputs, 0)?, req("Reshape", inputs, 1)?);
        let shape = self.resolve(x.shape(), &shape_values("Reshape", s)?)?;
        Ok(vec![x.reshape(shape)?])
    }
}

/// `Flatten(x)` to 2-D: `[prod(shape[..axis]), prod(shape[axis..])]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flatten {
    #[serde(default = "one")]
    pub axis: i64,
}

fn one() -> i64 {
    1
}

impl Flatten {
    fn split(&self, rank: usize) -> Result<usize> {
        let r = rank as i64;
        if self.axis < -r || self.axis > r {
            return Err(Error::op("Flatten", format!("axis {} is out of range for rank {rank}", self.axis)));
        }
        Ok(if self.axis < 0 { (self.axis + r) as usize } else { self.axis as usize })
    }
}

impl OpDef for Flatten {
    const NAMES: &'static [&'static str] = &["Flatten"];

    fn arity(&self) -> Arity {
        Arity::exact(1, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let x = req("Flatten", inputs, 0)?;
        let a = self.split(x.rank())?;
        let prod = |d: &[Dim]| d.iter().fold(Dim::constant(1), |acc, x| acc.mul(x));
        Ok(vec![Fact::new(x.dtype, vec![prod(&x.shape[..a]), prod(&x.shape[a..])])])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let x = req("Flatten", inputs, 0)?;
        let a = self.split(x.rank())?;
        let s = x.shape();
        Ok(vec![x.reshape(vec![s[..a].iter().product(), s[a..].iter().product()])?])
    }
}

fn axes_input(op: &str, inputs: &[Option<&Tensor>], i: usize) -> Result<Option<Vec<i64>>> {
    inputs.get(i).copied().flatten().map(|t| shape_values(op, t)).transpose()
}

fn axes_fact(op: &str, inputs: &[Option<&Fact>], i: usize) -> Result<Option<Vec<i64>>> {
    match inputs.get(i).copied().flatten() {
        None => Ok(None),
        Some(f) => const_dims(f).map(Some).ok_or_else(|| Error::op(op, "axes must be constant")),
    }
}

/// Removes dims of size 1 (the given axes, or all of them).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Squeeze {}

fn squeeze_axes<T>(shape: &[T], axes: Option<Vec<i64>>, is_one: impl Fn(&T) -> bool) -> Result<Vec<usize>> {
    match axes {
        Some(a) => {
            let mut v = a.iter().map(|&x| norm_axis("Squeeze", x, shape.len())).collect::<Result<Vec<_>>>()?;
            v.sort_unstable();
            v.dedup();
            Ok(v)
        }
        None => Ok((0..shape.len()).filter(|&i| is_one(&shape[i])).collect()),
    }
}

impl OpDef for Squeeze {
    const NAMES: &'static [&'static str] = &["Squeeze"];

    fn arity(&self) -> Arity {
        Arity::range(1, 2, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let x = req("Squeeze", inputs, 0)?;
        let axes = squeeze_axes(&x.shape, axes_fact("Squeeze", inputs, 1)?, |d| d.as_const() == Some(1))?;
        for &a in &axes {
            if let Some(v) = x.shape[a].as_const() {
                if v != 1 {
                    return Err(Error::op("Squeeze", format!("dim {a} has size {v}, not 1")));
                }
            }
        }
        let shape: Vec<Dim> =
            x.shape.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, d)| d.clone()).collect();
        let mut out = Fact::new(x.dtype, shape.clone());
        if let Some(v) = reshape_value(x, &shape) {
            out = out.with_value(v);
        }
        Ok(vec![out])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let x = req("Squeeze", inputs, 0)?;
        let axes = squeeze_axes(x.shape(), axes_input("Squeeze", inputs, 1)?, |&d| d == 1)?;
        if let Some(&a) = axes.iter().find(|&&a| x.shape()[a] != 1) {
            return Err(Error::op("Squeeze", format!("dim {a} has size {}, not 1", x.shape()[a])));
        }
        let shape = x.shape().iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect();
        Ok(vec![x.reshape(shape)?])
    }
}

/// Inserts dims of size 1 at the given axes (of the output).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unsqueeze {}

fn unsqueeze_shape<T: Clone>(shape: &[T], axes: &[i64], one: T) -> Result<Vec<T>> {
    let rank = shape.len() + axes.len();
    let mut ax = axes.iter().map(|&a| norm_axis("Unsqueeze", a, rank)).collect::<Result<Vec<_>>>()?;
    ax.sort_unstable();
    if ax.windows(2).any(|w| w[0] == w[1]) {
        return Err(Error::op("Unsqueeze", "repeated axis"));
    }
    let mut it = shape.iter();
    Ok((0..rank)
        .map(|i| if ax.contains(&i) { one.clone() } else { it.next().expect("rank matches").clone() })
        .collect())
}

impl OpDef for Unsqueeze {
    const NAMES: &'static [&'static str] = &["Unsqueeze"];

    fn arity(&self) -> Arity {
        Arity::exact(2, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let x = req("Unsqueeze", inputs, 0)?;
        let axes = axes_fact("Unsqueeze", inputs, 1)?.ok_or_else(|| Error::op("Unsqueeze", "axes are required"))?;
        let shape = unsqueeze_shape(&x.shape, &axes, Dim::constant(1))?;
        let mut out = Fact::new(x.dtype, shape.clone());
        if let Some(v) = reshape_value(x, &shape) {
            out = out.with_value(v);
        }
        Ok(vec![out])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let x = req("Unsqueeze", inputs, 0)?;
        let axes = axes_input("Unsqueeze", inputs, 1)?.ok_or_else(|| Error::op("Unsqueeze", "axes are required"))?;
        Ok(vec![x.reshape(unsqueeze_shape(x.shape(), &axes, 1)?)?])
    }
}

/// Permutes dims (reverses them when `perm` is absent).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transpose {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perm: Option<Vec<i64>>,
}

impl Transpose {
    pub fn perm(&self, rank: usize) -> Result<Vec<usize>> {
        let p: Vec<usize> = match &self.perm {
            None => (0..rank).rev().collect(),
            Some(p) => p.iter().map(|&a| norm_axis("Transpose", a, rank)).collect::<Result<_>>()?,
        };
        let mut sorted = p.clone();
        sorted.sort_unstable();
        if sorted != (0..rank).collect::<Vec<_>>() {
            return Err(Error::op("Transpose", format!("{:?} is not a permutation of rank {rank}", self.perm)));
        }
        Ok(p)
    }
}

impl OpDef for Transpose {
    const NAMES: &'static [&'static str] = &["Transpose"];

    fn arity(&self) -> Arity {
        Arity::exact(1, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let x = req("Transpose", inputs, 0)?;
        let p = self.perm(x.rank())?;
        Ok(vec![Fact::new(x.dtype, p.iter().map(|&i| x.shape[i].clone()).collect())])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let x = req("Transpose", inputs, 0)?;
        let p = self.perm(x.rank())?;
        let st = strides_of(x.shape());
        let out: Vec<usize> = p.iter().map(|&i| x.shape()[i]).collect();
        let ps: Vec<usize> = p.iter().map(|&i| st[i]).collect();
        let mut idx = Vec::with_capacity(x.len());
        for_each_broadcast(&out, [&ps], |[o]| idx.push(o));
        Ok(vec![take(x, &idx, out)?])
    }
}

/// Concatenates inputs along an axis.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Concat {
    pub axis: i64,
}

impl OpDef for Concat {
    const NAMES: &'static [&'static str] = &["Concat"];

    fn arity(&self) -> Arity {
        Arity::range(1, usize::MAX, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let first = req("Concat", inputs, 0)?;
        let axis = norm_axis("Concat", self.axis, first.rank())?;
        let mut shape = first.shape.clone();
        shape[axis] = Dim::constant(0);
        let mut values = Some(Vec::new());
        for i in 0..inputs.len() {
            let f = req("Concat", inputs, i)?;
            if f.dtype != first.dtype || f.rank() != first.rank() {
                return Err(Error::op("Concat", format!("input {i} is {f}, input 0 is {first}")));
            }
            for (d, (a, b)) in f.shape.iter().zip(first.shape.iter()).enumerate() {
                if d != axis && a.is_const() && b.is_const() && a != b {
                    return Err(Error::op("Concat", format!("input {i} is {f}, input 0 is {first}")));
                }
            }
            shape[axis] = shape[axis].add(&f.shape[axis]);
            match (&mut values, &f.value) {
                (Some(vs), Some(v)) if f.rank() == 1 => vs.extend(v.data.iter().cloned()),
                _ => values = None,
            }
        }
        let mut out = Fact::new(first.dtype, shape);
        if let Some(vs) = values {
            out = out.with_value(SymTensor::new(vec![vs.len()], vs));
        }
        Ok(vec![out])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let first = req("Concat", inputs, 0)?;
        let axis = norm_axis("Concat", self.axis, first.rank())?;
        let ts: Vec<&Tensor> = (0..inputs.len()).map(|i| req("Concat", inputs, i)).collect::<Result<_>>()?;
        let mut shape = first.shape().to_vec();
        shape[axis] = 0;
        for t in &ts {
            let ok = t.dtype() == first.dtype()
                && t.rank() == first.rank()
                && t.shape().iter().zip(first.shape()).enumerate().all(|(d, (a, b))| d == axis || a == b);
            if !ok {
                return Err(Error::op(
                    "Concat",
                    format!("cannot concatenate {:?} and {:?} on axis {axis}", first.shape(), t.shape()),
                ));
            }
            shape[axis] += t.shape()[axis];
        }
        let outer: usize = shape[..axis].iter().product();
        let inner: usize = shape[axis + 1..].iter().product();
        crate::with_dtype!(first.dtype(), T => {
            let mut v: Vec<T> = Vec::with_capacity(shape.iter().product());
            let slices: Vec<&[T]> = ts.iter().map(|t| t.as_slice::<T>()).collect::<Result<_>>()?;
            for o in 0..outer {
                for (t, s) in ts.iter().zip(&slices) {
                    let chunk = t.shape()[axis] * inner;
                    v.extend_from_slice(&s[o * chunk..(o + 1) * chunk]);
                }
            }
            Ok(vec![tensor_of(first.dtype(), shape, v)?])
        })
    }
}

/// Splits along an axis into `outputs` parts (sizes from the optional second input, else equal
/// parts with a smaller last one).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Split {
    #[serde(default)]
    pub axis: i64,
    pub outputs: usize,
}

impl Split {
    fn sizes(&self, len: usize, given: Option<Vec<i64>>) -> Result<Vec<usize>> {
        match given {
            Some(s) => {
                let s = to_usize_shape("Split", &s)?;
                if s.len() != self.outputs || s.iter().sum::<usize>() != len {
                    return Err(Error::op(
                        "Split",
                        format!("split sizes {s:?} do not cover {len} in {} parts", self.outputs),
                    ));
                }
                Ok(s)
            }
            None => {
                if self.outputs == 0 {
                    return Err(Error::op("Split", "zero outputs"));
                }
                let chunk = len.div_ceil(self.outputs);
                Ok((0..self.outputs).map(|i| chunk.min(len.saturating_sub(i * chunk))).collect())
            }
        }
    }
}

impl OpDef for Split {
    const NAMES: &'static [&'static str] = &["Split"];

    fn arity(&self) -> Arity {
        Arity::range(1, 2, self.outputs)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let x = req("Split", inputs, 0)?;
        let axis = norm_axis("Split", self.axis, x.rank())?;
        let given = axes_fact("Split", inputs, 1)?;
        let dims: Vec<Dim> = match (&given, x.shape[axis].as_const()) {
            (Some(s), _) => s.iter().map(|&v| Dim::constant(v)).collect(),
            (None, Some(len)) => self.sizes(len as usize, None)?.into_iter().map(Dim::from).collect(),
            (None, None) => match x.shape[axis].div_exact(&Dim::from(self.outputs)) {
                Some(d) => vec![d; self.outputs],
                None => (0..self.outputs).map(|_| Dim::unknown()).collect(),
            },
        };
        if dims.len() != self.outputs {
            return Err(Error::op("Split", format!("{} sizes for {} outputs", dims.len(), self.outputs)));
        }
        Ok(dims
            .into_iter()
            .map(|d| {
                let mut s = x.shape.clone();
                s[axis] = d;
                Fact::new(x.dtype, s)
            })
            .collect())
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let x = req("Split", inputs, 0)?;
        let axis = norm_axis("Split", self.axis, x.rank())?;
        let sizes = self.sizes(x.shape()[axis], axes_input("Split", inputs, 1)?)?;
        let st = strides_of(x.shape());
        let mut start = 0;
        let mut outs = Vec::with_capacity(sizes.len());
        for len in sizes {
            let mut shape = x.shape().to_vec();
            shape[axis] = len;
            let mut idx = Vec::new();
            let base = start * st[axis];
            for_each_broadcast(&shape, [&st], |[o]| idx.push(base + o));
            outs.push(take(x, &idx, shape)?);
            start += len;
        }
        Ok(outs)
    }
}

/// Per-axis slice parameters resolved against a concrete dim: first index, step, count.
fn slice_axis(dim: usize, start: i64, end: i64, step: i64) -> Result<(i64, i64, usize)> {
    if step == 0 {
        return Err(Error::op("Slice", "step cannot be 0"));
    }
    let d = dim as i64;
    let fix = |v: i64| if v < 0 { v.saturating_add(d) } else { v };
    let (s, e) = (fix(start), fix(end));
    let (s, e) = if step > 0 { (s.clamp(0, d), e.clamp(0, d)) } else { (s.clamp(-1, d - 1), e.clamp(-1, d - 1)) };
    let count = if step > 0 {
        if e > s {
            (e - s + step - 1) / step
        } else {
            0
        }
    } else if s > e {
        (s - e + (-step) - 1) / (-step)
    } else {
        0
    };
    Ok((s, step, count as usize))
}

/// Symbolic length of a slice of a symbolic dim, for the common cases (step 1, bounds from the
/// start or the end); `None` when it cannot be known.
fn slice_dim(dim: &Dim, start: i64, end: i64, step: i64) -> Option<Dim> {
    if let Some(d) = dim.as_const() {
        return slice_axis(d.max(0) as usize, start, end, step).ok().map(|(_, _, c)| Dim::from(c));
    }
    if step != 1 {
        return None;
    }
    // A symbolic dim is assumed to be at least as long as the constant bounds it is sliced with.
    let big = i64::MAX / 2;
    let s = if start <= -big {
        Dim::constant(0)
    } else if start >= 0 {
        Dim::constant(start)
    } else {
        dim.add(&Dim::constant(start))
    };
    let e = if end >= big {
        dim.clone()
    } else if end < 0 {
        dim.add(&Dim::constant(end))
    } else if start >= 0 {
        return Some(Dim::constant((end - start).max(0)));
    } else {
        return None;
    };
    Some(e.sub(&s))
}

/// `Slice(data, starts, ends, axes?, steps?)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slice {}

type SliceParams = (Vec<i64>, Vec<i64>, Vec<usize>, Vec<i64>);

fn slice_params(
    rank: usize,
    starts: Vec<i64>,
    ends: Vec<i64>,
    axes: Option<Vec<i64>>,
    steps: Option<Vec<i64>>,
) -> Result<SliceParams> {
    let n = starts.len();
    if ends.len() != n {
        return Err(Error::op("Slice", "starts and ends differ in length"));
    }
    let axes: Vec<usize> = match axes {
        Some(a) => a.iter().map(|&x| norm_axis("Slice", x, rank)).collect::<Result<_>>()?,
        // The first n axes, which must exist.
        None if n > rank => return Err(Error::op("Slice", format!("{n} starts for a tensor of rank {rank}"))),
        None => (0..n).collect(),
    };
    let steps = steps.unwrap_or_else(|| vec![1; n]);
    if axes.len() != n || steps.len() != n {
        return Err(Error::op("Slice", "starts, ends, axes and steps differ in length"));
    }
    Ok((starts, ends, axes, steps))
}

impl OpDef for Slice {
    const NAMES: &'static [&'static str] = &["Slice"];

    fn arity(&self) -> Arity {
        Arity::range(3, 5, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let x = req("Slice", inputs, 0)?;
        let unknown = || Ok(vec![Fact::new(x.dtype, x.shape.iter().map(|_| Dim::unknown()).collect())]);
        let dims = |i: usize| -> Option<Vec<Dim>> { inputs.get(i).copied().flatten().and_then(shape_operand) };
        let consts = |i: usize| -> Option<Option<Vec<i64>>> {
            match inputs.get(i).copied().flatten() {
                None => Some(None),
                Some(f) => f.const_i64s().map(Some),
            }
        };
        // Starts and ends may be symbolic (`position_ids[:, :sequence]`); axes and steps not.
        let (Some(starts), Some(ends), Some(axes), Some(steps)) = (dims(1), dims(2), consts(3), consts(4)) else {
            return unknown();
        };
        let n = starts.len();
        let (const_starts, const_ends): (Vec<i64>, Vec<i64>) = (
            starts.iter().map(|d| d.as_const().unwrap_or(0)).collect(),
            ends.iter().map(|d| d.as_const().unwrap_or(0)).collect(),
        );
        let (_, _, axes, steps) = slice_params(x.rank(), const_starts, const_ends, axes, steps)?;
        if ends.len() != n {
            return Err(Error::op("Slice", "starts and ends differ in length"));
        }
        let mut shape = x.shape.clone();
        for i in 0..axes.len() {
            let a = axes[i];
            shape[a] = match (starts[i].as_const(), ends[i].as_const()) {
                (Some(s), Some(e)) => slice_dim(&x.shape[a], s, e, steps[i]),
                // A symbolic bound is assumed to lie within the dim.
                (s, _) if steps[i] == 1 => {
                    let start = match s {
                        Some(s) if s >= 0 => Some(Dim::constant(s)),
                        Some(_) => None,
                        None => Some(starts[i].clone()),
                    };
                    let end = match ends[i].as_const() {
                        Some(e) if e >= i64::MAX / 2 => Some(x.shape[a].clone()),
                        Some(e) if e >= 0 => Some(Dim::constant(e)),
                        Some(_) => None,
                        None => Some(ends[i].clone()),
                    };
                    start.zip(end).map(|(s, e)| e.sub(&s))
                }
                _ => None,
            }
            .unwrap_or_else(Dim::unknown);
        }
        let mut out = Fact::new(x.dtype, shape);
        if let (Some(v), Some(s), Some(e)) = (
            &x.value,
            starts.iter().map(Dim::as_const).collect::<Option<Vec<_>>>(),
            ends.iter().map(Dim::as_const).collect::<Option<Vec<_>>>(),
        ) {
            if v.shape.len() == 1 && axes == [0] {
                let (first, step, count) = slice_axis(v.data.len(), s[0], e[0], steps[0])?;
                let data = (0..count).map(|k| v.data[(first + k as i64 * step) as usize].clone()).collect::<Vec<_>>();
                out = out.with_value(SymTensor::new(vec![count], data));
            }
        }
        Ok(vec![out])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let x = req("Slice", inputs, 0)?;
        let starts = shape_values("Slice", req("Slice", inputs, 1)?)?;
        let ends = shape_values("Slice", req("Slice", inputs, 2)?)?;
        let (starts, ends, axes, steps) =
            slice_params(x.rank(), starts, ends, axes_input("Slice", inputs, 3)?, axes_input("Slice", inputs, 4)?)?;
        let rank = x.rank();
        let mut first = vec![0i64; rank];
        let mut step = vec![1i64; rank];
        let mut shape = x.shape().to_vec();
        for i in 0..axes.len() {
            let a = axes[i];
            let (s, st, c) = slice_axis(x.shape()[a], starts[i], ends[i], steps[i])?;
            first[a] = s;
            step[a] = st;
            shape[a] = c;
        }
        let strides = strides_of(x.shape());
        let n: usize = shape.iter().product();
        let mut idx = Vec::with_capacity(n);
        if n > 0 {
            let base: i64 = (0..rank).map(|d| first[d] * strides[d] as i64).sum();
            let mut cur = vec![0usize; rank];
            loop {
                let off: i64 = base + (0..rank).map(|d| cur[d] as i64 * step[d] * strides[d] as i64).sum::<i64>();
                idx.push(off as usize);
                let mut d = rank;
                loop {
                    if d == 0 {
                        break;
                    }
                    d -= 1;
                    cur[d] += 1;
                    if cur[d] < shape[d] {
                        break;
                    }
                    cur[d] = 0;
                    if d == 0 {
                        d = usize::MAX;
                        break;
                    }
                }
                if d == usize::MAX || rank == 0 {
                    break;
                }
            }
        }
        Ok(vec![take(x, &idx, shape)?])
    }
}

/// Broadcasts `data` to a shape (numpy rules, both ways).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expand {}

impl OpDef for Expand {
    const NAMES: &'static [&'static str] = &["Expand"];

    fn arity(&self) -> Arity {
        Arity::exact(2, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let (x, s) = (req("Expand", inputs, 0)?, req("Expand", inputs, 1)?);
        let shape = match (shape_operand(s), shape_operand_len("Expand", s)?) {
            (Some(t), _) => broadcast_dims("Expand", &[&x.shape, &t])?,
            (None, Some(n)) => (0..n.max(x.rank())).map(|_| Dim::unknown()).collect(),
            (None, None) => return Err(Error::op("Expand", "the shape must be a 1-D tensor of known length")),
        };
        Ok(vec![Fact::new(x.dtype, shape)])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let (x, s) = (req("Expand", inputs, 0)?, req("Expand", inputs, 1)?);
        let target = to_usize_shape("Expand", &shape_values("Expand", s)?)?;
        let out = broadcast_shapes("Expand", &[x.shape(), &target])?;
        check_alloc("Expand", &out)?;
        let st = broadcast_strides(x.shape(), &out);
        let mut idx = Vec::with_capacity(out.iter().product());
        for_each_broadcast(&out, [&st], |[o]| idx.push(o));
        Ok(vec![take(x, &idx, out)?])
    }
}

/// Repeats `data` along each axis.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tile {}

impl OpDef for Tile {
    const NAMES: &'static [&'static str] = &["Tile"];

    fn arity(&self) -> Arity {
        Arity::exact(2, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let (x, r) = (req("Tile", inputs, 0)?, req("Tile", inputs, 1)?);
        let shape = match shape_operand(r) {
            Some(reps) if reps.len() == x.rank() => x.shape.iter().zip(&reps).map(|(a, b)| a.mul(b)).collect(),
            Some(_) => return Err(Error::op("Tile", "repeats must have one entry per dim")),
            None => x.shape.iter().map(|_| Dim::unknown()).collect(),
        };
        Ok(vec![Fact::new(x.dtype, shape)])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let (x, r) = (req("Tile", inputs, 0)?, req("Tile", inputs, 1)?);
        let reps = to_usize_shape("Tile", &shape_values("Tile", r)?)?;
        if reps.len() != x.rank() {
            return Err(Error::op("Tile", "repeats must have one entry per dim"));
        }
        // View the output as [r0, d0, r1, d1, ...] with stride 0 on the repeat dims.
        let st = strides_of(x.shape());
        let mut grid = Vec::new();
        let mut gs = Vec::new();
        for i in 0..x.rank() {
            grid.extend([reps[i], x.shape()[i]]);
            gs.extend([0, st[i]]);
        }
        let out: Vec<usize> = (0..x.rank()).map(|i| reps[i] * x.shape()[i]).collect();
        check_alloc("Tile", &out)?;
        let mut idx = Vec::with_capacity(out.iter().product());
        for_each_broadcast(&grid, [&gs], |[o]| idx.push(o));
        Ok(vec![take(x, &idx, out)?])
    }
}

/// A tensor of the given shape filled with one value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConstantOfShape {
    #[serde(default = "f32_dtype")]
    pub dtype: DType,
    #[serde(default)]
    pub value: f64,
}

fn f32_dtype() -> DType {
    DType::F32
}

impl OpDef for ConstantOfShape {
    const NAMES: &'static [&'static str] = &["ConstantOfShape"];

    fn arity(&self) -> Arity {
        Arity::exact(1, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let s = req("ConstantOfShape", inputs, 0)?;
        let shape = match (shape_operand(s), shape_operand_len("ConstantOfShape", s)?) {
            (Some(t), _) => t,
            (None, Some(n)) => (0..n).map(|_| Dim::unknown()).collect(),
            (None, None) => return Err(Error::op("ConstantOfShape", "the shape must be a 1-D tensor of known length")),
        };
        let mut out = Fact::new(self.dtype, shape.clone());
        if let Some(s) = shape.iter().map(|d| d.as_const().map(|v| v as usize)).collect::<Option<Vec<_>>>() {
            let n: usize = s.iter().product();
            if self.dtype != DType::F32 && n <= super::MAX_SYM_ELEMENTS {
                out = out.with_value(SymTensor::new(s, vec![Dim::constant(self.value as i64); n]));
            }
        }
        Ok(vec![out])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let shape =
            to_usize_shape("ConstantOfShape", &shape_values("ConstantOfShape", req("ConstantOfShape", inputs, 0)?)?)?;
        let n = check_alloc("ConstantOfShape", &shape)?;
        crate::with_dtype!(self.dtype, T => Ok(vec![tensor_of(self.dtype, shape, vec![<T as crate::tensor::Element>::from_f64(self.value); n])?]))
    }
}

/// `Range(start, limit, delta)`: scalars of one dtype.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Range {}

impl OpDef for Range {
    const NAMES: &'static [&'static str] = &["Range"];

    fn arity(&self) -> Arity {
        Arity::exact(3, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let fs: Vec<&Fact> = (0..3).map(|i| req("Range", inputs, i)).collect::<Result<_>>()?;
        if fs.iter().any(|f| f.dtype != fs[0].dtype || f.rank() > 1) {
            return Err(Error::op("Range", "start, limit and delta must be scalars of one dtype"));
        }
        let vals: Option<Vec<Dim>> =
            fs.iter().map(|f| f.value.as_ref().and_then(|v| v.data.first().cloned())).collect();
        let len = match vals {
            Some(v) => match (v[0].as_const(), v[1].as_const(), v[2].as_const()) {
                (Some(s), Some(l), Some(d)) if d != 0 => {
                    Dim::constant(((l - s) as f64 / d as f64).ceil().max(0.0) as i64)
                }
                (Some(s), None, Some(1)) => v[1].sub(&Dim::constant(s)),
                _ => Dim::unknown(),
            },
            None => Dim::unknown(),
        };
        let mut out = Fact::new(fs[0].dtype, vec![len.clone()]);
        if let (Some(n), Some(s), Some(d)) = (len.as_const(), fs[0].const_i64s(), fs[2].const_i64s()) {
            if fs[0].dtype != DType::F32 && n as usize <= super::MAX_SYM_ELEMENTS {
                let data = (0..n).map(|i| Dim::constant(s[0] + i * d[0])).collect();
                out = out.with_value(SymTensor::new(vec![n as usize], data));
            }
        }
        Ok(vec![out])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let ts: Vec<&Tensor> = (0..3).map(|i| req("Range", inputs, i)).collect::<Result<_>>()?;
        if ts.iter().any(|t| t.len() != 1 || t.dtype() != ts[0].dtype()) {
            return Err(Error::op("Range", "start, limit and delta must be scalars of one dtype"));
        }
        let dt = ts[0].dtype();
        if dt == DType::F32 {
            let v: Vec<f32> = ts.iter().map(|t| t.as_slice::<f32>().map(|s| s[0])).collect::<Result<_>>()?;
            let (s, l, d) = (v[0], v[1], v[2]);
            if d == 0.0 || !d.is_finite() {
                return Err(Error::op("Range", "delta must be finite and non-zero"));
            }
            let n = ((l - s) / d).ceil().max(0.0) as usize;
            check_alloc("Range", &[n])?;
            return Ok(vec![Tensor::new(vec![n], (0..n).map(|i| s + i as f32 * d).collect())?]);
        }
        let v: Vec<i64> = ts.iter().map(|t| t.to_i64s().map(|s| s[0])).collect::<Result<_>>()?;
        let (s, l, d) = (v[0], v[1], v[2]);
        if d == 0 {
            return Err(Error::op("Range", "delta cannot be 0"));
        }
        let n = ((l as i128 - s as i128) as f64 / d as f64).ceil().max(0.0) as usize;
        check_alloc("Range", &[n])?;
        let vals: Vec<i64> = (0..n as i64).map(|i| s + i * d).collect();
        crate::with_dtype!(dt, T => Ok(vec![tensor_of(dt, vec![n], vals.into_iter().map(|x| <T as crate::tensor::Element>::from_f64(x as f64)).collect::<Vec<T>>())?]))
    }
}

/// An i64 vector (or scalar) of dims evaluated from the model's symbols at run time: what a
/// folded shape subgraph becomes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DimValue {
    pub dims: Vec<Dim>,
    #[serde(default)]
    pub scalar: bool,
}

impl OpDef for DimValue {
    const NAMES: &'static [&'static str] = &["DimValue"];

    fn arity(&self) -> Arity {
        Arity::exact(0, 1)
    }

    fn infer(&self, _: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        if self.scalar && self.dims.len() != 1 {
            return Err(Error::op("DimValue", "a scalar holds exactly one dim"));
        }
        let shape: Vec<usize> = if self.scalar { vec![] } else { vec![self.dims.len()] };
        let f = Fact::new(DType::I64, shape.iter().map(|&d| Dim::from(d)).collect());
        Ok(vec![f.with_value(SymTensor::new(shape, self.dims.clone()))])
    }

    fn eval(&self, ctx: &EvalContext, _: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let env = |s: &str| ctx.symbols.get(s).copied();
        let v: Vec<i64> = self
            .dims
            .iter()
            .map(|d| d.eval(&env).ok_or_else(|| Error::op("DimValue", format!("`{d}` depends on an unbound symbol"))))
            .collect::<Result<_>>()?;
        let shape = if self.scalar { vec![] } else { vec![v.len()] };
        Ok(vec![Tensor::new(shape, v)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::Op;

    fn i64s(shape: &[usize], v: &[i64]) -> Tensor {
        Tensor::new(shape.to_vec(), v.to_vec()).unwrap()
    }

    fn eval(op: impl Into<Op>, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
        let ins: Vec<Option<&Tensor>> = inputs.iter().map(|t| Some(*t)).collect();
        op.into().eval(&EvalContext::default(), &ins)
    }

    fn sym_fact(dims: &[&str]) -> Fact {
        Fact::new(DType::F32, dims.iter().map(|d| Dim::parse(d).unwrap()).collect())
    }

    #[test]
    fn reshape_resolves_zero_and_minus_one() {
        let x = Tensor::new(vec![2, 3, 4], vec![0f32; 24]).unwrap();
        let y = eval(Reshape { allowzero: false }, &[&x, &i64s(&[3], &[0, -1, 2])]).unwrap().remove(0);
        assert_eq!(y.shape(), &[2, 6, 2]);
        assert!(eval(Reshape { allowzero: false }, &[&x, &i64s(&[2], &[5, -1])]).is_err());
        assert!(eval(Reshape { allowzero: false }, &[&x, &i64s(&[2], &[-1, -1])]).is_err());
    }

    #[test]
    fn symbolic_reshape_of_a_shape_subgraph() {
        // Shape(x)[0:2] ++ [12, 32] reshapes [batch, seq, 384] to [batch, seq, 12, 32].
        let x = sym_fact(&["batch", "seq", "384"]);
        let shape = Shape { start: None, end: Some(2) }.infer(&[Some(&x)]).unwrap().remove(0);
        let tail = Fact::of_tensor(&i64s(&[2], &[12, 32]));
        let target = Concat { axis: 0 }.infer(&[Some(&shape), Some(&tail)]).unwrap().remove(0);
        let y = Reshape { allowzero: false }.infer(&[Some(&x), Some(&target)]).unwrap().remove(0);
        assert_eq!(y.to_string(), "f32[batch, seq, 12, 32]");
        let back = Reshape { allowzero: false }
            .infer(&[Some(&y), Some(&Fact::of_tensor(&i64s(&[3], &[0, 0, -1])))])
            .unwrap()
            .remove(0);
        assert_eq!(back.to_string(), "f32[batch, seq, 384]");
    }

    #[test]
    fn transpose_and_concat() {
        let x = Tensor::new(vec![2, 3], (0..6).map(|v| v as f32).collect()).unwrap();
        let y = eval(Transpose { perm: None }, &[&x]).unwrap().remove(0);
        assert_eq!(y.shape(), &[3, 2]);
        assert_eq!(y.as_slice::<f32>().unwrap(), &[0., 3., 1., 4., 2., 5.]);
        let z = eval(Concat { axis: 1 }, &[&x, &x]).unwrap().remove(0);
        assert_eq!(z.shape(), &[2, 6]);
        assert_eq!(&z.as_slice::<f32>().unwrap()[..6], &[0., 1., 2., 0., 1., 2.]);
        assert!(eval(Transpose { perm: Some(vec![0, 0]) }, &[&x]).is_err());
    }

    #[test]
    fn slice_clamps_and_steps_backwards() {
        let x = i64s(&[5], &[0, 1, 2, 3, 4]);
        let s = |a: i64, b: i64, st: i64| {
            eval(Slice {}, &[&x, &i64s(&[1], &[a]), &i64s(&[1], &[b]), &i64s(&[1], &[0]), &i64s(&[1], &[st])])
                .unwrap()
                .remove(0)
                .to_i64s()
                .unwrap()
        };
        assert_eq!(s(1, i64::MAX, 1), vec![1, 2, 3, 4]);
        assert_eq!(s(-2, 100, 1), vec![3, 4]);
        assert_eq!(s(-1, i64::MIN, -1), vec![4, 3, 2, 1, 0]);
        assert_eq!(s(0, 5, 2), vec![0, 2, 4]);
        assert_eq!(s(3, 1, 1), Vec::<i64>::new());
    }

    #[test]
    fn symbolic_slice_lengths() {
        let seq = Dim::sym("seq");
        assert_eq!(slice_dim(&seq, 0, i64::MAX, 1), Some(seq.clone()));
        assert_eq!(slice_dim(&seq, 1, i64::MAX, 1), Some(Dim::parse("seq-1").unwrap()));
        assert_eq!(slice_dim(&seq, 0, 1, 1), Some(Dim::constant(1)));
        assert_eq!(slice_dim(&seq, 0, -1, 1), Some(Dim::parse("seq-1").unwrap()));
        assert_eq!(slice_dim(&seq, 0, i64::MAX, 2), None);
    }

    #[test]
    fn slice_with_a_symbolic_end() {
        let table = Fact::new(DType::I64, vec![Dim::constant(1), Dim::constant(512)]);
        let i = |v: &[i64]| Fact::of_tensor(&i64s(&[v.len()], v));
        let end =
            Fact::new(DType::I64, vec![Dim::constant(1)]).with_value(SymTensor::new(vec![1], vec![Dim::sym("seq")]));
        let y = Slice {}
            .infer(&[Some(&table), Some(&i(&[0])), Some(&end), Some(&i(&[1])), Some(&i(&[1]))])
            .unwrap()
            .remove(0);
        assert_eq!(y.to_string(), "i64[1, seq]");
    }

    /// Without axes, the starts name the first axes: more starts than the input has axes is an
    /// error (type inference and evaluation alike), not an index past the shape (a fuzzing find).
    #[test]
    fn slice_with_more_starts_than_axes_is_an_error() {
        let x = i64s(&[4], &[1, 2, 3, 4]);
        let four = i64s(&[4], &[1, 1, 1, 1]);
        let err =
            Slice {}.infer(&[Some(&Fact::of_tensor(&x)), Some(&Fact::of_tensor(&four)), Some(&Fact::of_tensor(&four))]);
        assert!(err.unwrap_err().to_string().contains("4 starts for a tensor of rank 1"));
        assert!(eval(Slice {}, &[&x, &four, &four]).is_err());
    }

    #[test]
    fn expand_tile_split_range() {
        let x = i64s(&[2, 1], &[1, 2]);
        let y = eval(Expand {}, &[&x, &i64s(&[2], &[2, 3])]).unwrap().remove(0);
        assert_eq!(y.to_i64s().unwrap(), vec![1, 1, 1, 2, 2, 2]);
        let t = eval(Tile {}, &[&x, &i64s(&[2], &[2, 2])]).unwrap().remove(0);
        assert_eq!(t.shape(), &[4, 2]);
        assert_eq!(t.to_i64s().unwrap(), vec![1, 1, 2, 2, 1, 1, 2, 2]);
        let parts = eval(Split { axis: 0, outputs: 2 }, &[&i64s(&[5], &[0, 1, 2, 3, 4])]).unwrap();
        assert_eq!(parts[0].to_i64s().unwrap(), vec![0, 1, 2]);
        assert_eq!(parts[1].to_i64s().unwrap(), vec![3, 4]);
        let r =
            eval(Range {}, &[&Tensor::scalar(0i64), &Tensor::scalar(7i64), &Tensor::scalar(3i64)]).unwrap().remove(0);
        assert_eq!(r.to_i64s().unwrap(), vec![0, 3, 6]);
    }

    #[test]
    fn dim_value_needs_bound_symbols() {
        let op = DimValue { dims: vec![Dim::parse("batch*seq").unwrap(), Dim::constant(384)], scalar: false };
        let mut ctx = EvalContext::default();
        assert!(Op::from(op.clone()).eval(&ctx, &[]).is_err());
        ctx.symbols.insert("batch".into(), 2);
        ctx.symbols.insert("seq".into(), 5);
        assert_eq!(Op::from(op).eval(&ctx, &[]).unwrap()[0].to_i64s().unwrap(), vec![10, 384]);
    }

    #[test]
    fn absurd_shapes_are_errors() {
        assert!(eval(ConstantOfShape { dtype: DType::F32, value: 0.0 }, &[&i64s(&[2], &[1 << 40, 1 << 40])]).is_err());
        assert!(eval(ConstantOfShape { dtype: DType::F32, value: 0.0 }, &[&i64s(&[1], &[-3])]).is_err());
        // A shape operand whose declared length is absurd (found by fuzzing the importer: the
        // output's rank was allocated): an error naming the op, for each op that takes one.
        let x = Fact::new(DType::F32, vec![Dim::from(2i64)]);
        for len in [1i64 << 40, -1, 65] {
            let shape = Fact::new(DType::I64, vec![Dim::from(len)]);
            let ops: [(Op, Vec<Option<&Fact>>); 3] = [
                (Expand {}.into(), vec![Some(&x), Some(&shape)]),
                (Reshape { allowzero: false }.into(), vec![Some(&x), Some(&shape)]),
                (ConstantOfShape { dtype: DType::F32, value: 0.0 }.into(), vec![Some(&shape)]),
            ];
            for (op, ins) in ops {
                let err = op.infer(&ins).unwrap_err().to_string();
                assert!(err.contains(&format!("a shape of {len} dims")), "{op:?}: {err}");
            }
        }
    }
}

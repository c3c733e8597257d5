//! Indexing: `Gather` (embeddings, shape picking), `GatherElements`, `GatherND`.
//!
//! Indices are checked against the data before any element is read: an out-of-range token id
//! is an error naming the index and the bound.

use super::{check_alloc, norm_axis, req, shape::take, strides_of, Arity, EvalContext, Fact, OpDef, SymTensor};
use crate::dim::Dim;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};

fn index_dtype(op: &str, f: &Fact) -> Result<()> {
    if !matches!(f.dtype, DType::I64 | DType::I32) {
        return Err(Error::op(op, format!("indices must be i64 or i32, got {}", f.dtype)));
    }
    Ok(())
}

/// Resolves a possibly negative index against `len`.
pub(crate) fn resolve(op: &str, i: i64, len: usize) -> Result<usize> {
    let l = len as i64;
    let j = if i < 0 { i + l } else { i };
    if j < 0 || j >= l {
        return Err(Error::op(op, format!("index {i} is out of range for a dimension of size {len}")));
    }
    Ok(j as usize)
}

/// `Gather(data, indices)` along `axis`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gather {
    #[serde(default)]
    pub axis: i64,
}

impl OpDef for Gather {
    const NAMES: &'static [&'static str] = &["Gather"];

    fn arity(&self) -> Arity {
        Arity::exact(2, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let (x, i) = (req("Gather", inputs, 0)?, req("Gather", inputs, 1)?);
        index_dtype("Gather", i)?;
        let axis = norm_axis("Gather", self.axis, x.rank())?;
        let mut shape = x.shape[..axis].to_vec();
        shape.extend(i.shape.iter().cloned());
        shape.extend(x.shape[axis + 1..].iter().cloned());
        let mut out = Fact::new(x.dtype, shape);
        if let (Some(v), Some(idx)) = (&x.value, i.const_i64s()) {
            if v.shape.len() == 1 {
                let picked: Option<Vec<Dim>> =
                    idx.iter().map(|&k| resolve("Gather", k, v.data.len()).ok().map(|j| v.data[j].clone())).collect();
                if let (Some(p), Some(s)) = (picked, i.concrete_shape()) {
                    out = out.with_value(SymTensor::new(s, p));
                }
            }
        }
        Ok(vec![out])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let (x, i) = (req("Gather", inputs, 0)?, req("Gather", inputs, 1)?);
        if !matches!(i.dtype(), DType::I64 | DType::I32) {
            return Err(Error::op("Gather", format!("indices must be i64 or i32, got {}", i.dtype())));
        }
        let axis = norm_axis("Gather", self.axis, x.rank())?;
        let s = x.shape();
        let (outer, len, inner) =
            (s[..axis].iter().product::<usize>(), s[axis], s[axis + 1..].iter().product::<usize>());
        let idx: Vec<usize> = i.to_i64s()?.into_iter().map(|k| resolve("Gather", k, len)).collect::<Result<_>>()?;
        let mut shape = s[..axis].to_vec();
        shape.extend_from_slice(i.shape());
        shape.extend_from_slice(&s[axis + 1..]);
        check_alloc("Gather", &shape)?;
        let mut src = Vec::with_capacity(outer * idx.len() * inner);
        for o in 0..outer {
            for &k in &idx {
                let base = (o * len + k) * inner;
                src.extend(base..base + inner);
            }
        }
        Ok(vec![take(x, &src, shape)?])
    }
}

/// `GatherElements(data, indices)`: `out[.., j, ..] = data[.., indices[.., j, ..], ..]` on `axis`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatherElements {
    #[serde(default)]
    pub axis: i64,
}

impl OpDef for GatherElements {
    const NAMES: &'static [&'static str] = &["GatherElements"];

    fn arity(&self) -> Arity {
        Arity::exact(2, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let (x, i) = (req("GatherElements", inputs, 0)?, req("GatherElements", inputs, 1)?);
        index_dtype("GatherElements", i)?;
        if x.rank() != i.rank() {
            return Err(Error::op("GatherElements", "data and indices must have the same rank"));
        }
        norm_axis("GatherElements", self.axis, x.rank())?;
        Ok(vec![Fact::new(x.dtype, i.shape.clone())])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let (x, i) = (req("GatherElements", inputs, 0)?, req("GatherElements", inputs, 1)?);
        if x.rank() != i.rank() {
            return Err(Error::op("GatherElements", "data and indices must have the same rank"));
        }
        let axis = norm_axis("GatherElements", self.axis, x.rank())?;
        if i.shape().iter().zip(x.shape()).enumerate().any(|(d, (a, b))| d != axis && a > b) {
            return Err(Error::op("GatherElements", format!("indices {:?} exceed data {:?}", i.shape(), x.shape())));
        }
        let (xs, is) = (strides_of(x.shape()), strides_of(i.shape()));
        let idx = i.to_i64s()?;
        let mut src = Vec::with_capacity(idx.len());
        for (flat, &k) in idx.iter().enumerate() {
            let mut off = 0;
            for d in 0..x.rank() {
                let c = (flat / is[d]) % i.shape()[d];
                let c = if d == axis { resolve("GatherElements", k, x.shape()[axis])? } else { c };
                off += c * xs[d];
            }
            src.push(off);
        }
        Ok(vec![take(x, &src, i.shape().to_vec())?])
    }
}

/// `GatherND(data, indices)` with `batch_dims` leading dims shared by data and indices.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatherND {
    #[serde(default)]
    pub batch_dims: usize,
}

impl OpDef for GatherND {
    const NAMES: &'static [&'static str] = &["GatherND"];

    fn arity(&self) -> Arity {
        Arity::exact(2, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let (x, i) = (req("GatherND", inputs, 0)?, req("GatherND", inputs, 1)?);
        index_dtype("GatherND", i)?;
        let b = self.batch_dims;
        if i.rank() < 1 || x.rank() <= b || i.rank() <= b {
            return Err(Error::op("GatherND", "ranks too small for batch_dims"));
        }
        let m = i.shape[i.rank() - 1]
            .as_const()
            .ok_or_else(|| Error::op("GatherND", "the index depth must be known"))? as usize;
        if b + m > x.rank() {
            return Err(Error::op("GatherND", format!("index depth {m} exceeds data rank {}", x.rank())));
        }
        let mut shape = i.shape[..i.rank() - 1].to_vec();
        shape.extend(x.shape[b + m..].iter().cloned());
        Ok(vec![Fact::new(x.dtype, shape)])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let (x, i) = (req("GatherND", inputs, 0)?, req("GatherND", inputs, 1)?);
        let b = self.batch_dims;
        if i.rank() < 1 || x.rank() <= b || i.rank() <= b || x.shape()[..b] != i.shape()[..b] {
            return Err(Error::op(
                "GatherND",
                format!("data {:?} and indices {:?} disagree on batch dims", x.shape(), i.shape()),
            ));
        }
        let m = i.shape()[i.rank() - 1];
        if b + m > x.rank() {
            return Err(Error::op("GatherND", format!("index depth {m} exceeds data rank {}", x.rank())));
        }
        let batch: usize = x.shape()[..b].iter().product();
        let n: usize = i.shape()[b..i.rank() - 1].iter().product();
        let slice: usize = x.shape()[b + m..].iter().product();
        let per_batch: usize = x.shape()[b..].iter().product();
        let xs = strides_of(&x.shape()[b..]);
        let idx = i.to_i64s()?;
        let mut src = Vec::with_capacity(batch * n * slice);
        for bi in 0..batch {
            for k in 0..n {
                let tuple = &idx[(bi * n + k) * m..(bi * n + k + 1) * m];
                let mut off = bi * per_batch;
                for (d, &v) in tuple.iter().enumerate() {
                    off += resolve("GatherND", v, x.shape()[b + d])? * xs[d];
                }
                src.extend(off..off + slice);
            }
        }
        let mut shape = i.shape()[..i.rank() - 1].to_vec();
        shape.extend_from_slice(&x.shape()[b + m..]);
        Ok(vec![take(x, &src, shape)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::Op;

    fn eval(op: impl Into<Op>, inputs: &[&Tensor]) -> Result<Tensor> {
        let ins: Vec<Option<&Tensor>> = inputs.iter().map(|t| Some(*t)).collect();
        op.into().eval(&EvalContext::default(), &ins).map(|mut v| v.remove(0))
    }

    #[test]
    fn gather_rows_like_an_embedding() {
        let table = Tensor::new(vec![3, 2], vec![0f32, 1., 10., 11., 20., 21.]).unwrap();
        let ids = Tensor::new(vec![1, 3], vec![2i64, 0, -1]).unwrap();
        let y = eval(Gather { axis: 0 }, &[&table, &ids]).unwrap();
        assert_eq!(y.shape(), &[1, 3, 2]);
        assert_eq!(y.as_slice::<f32>().unwrap(), &[20., 21., 0., 1., 20., 21.]);
        let bad = Tensor::new(vec![1], vec![3i64]).unwrap();
        let e = eval(Gather { axis: 0 }, &[&table, &bad]).unwrap_err().to_string();
        assert!(e.contains("index 3 is out of range"), "{e}");
    }

    #[test]
    fn gather_elements_and_nd() {
        let x = Tensor::new(vec![2, 2], vec![1i64, 2, 3, 4]).unwrap();
        let i = Tensor::new(vec![2, 2], vec![0i64, 0, 1, 0]).unwrap();
        assert_eq!(eval(GatherElements { axis: 1 }, &[&x, &i]).unwrap().to_i64s().unwrap(), vec![1, 1, 4, 3]);
        let i = Tensor::new(vec![2, 1], vec![1i64, 0]).unwrap();
        let y = eval(GatherND { batch_dims: 0 }, &[&x, &i]).unwrap();
        assert_eq!(y.shape(), &[2, 2]);
        assert_eq!(y.to_i64s().unwrap(), vec![3, 4, 1, 2]);
        let i = Tensor::new(vec![2, 1], vec![1i64, 0]).unwrap();
        let y = eval(GatherND { batch_dims: 1 }, &[&x, &i]).unwrap();
        assert_eq!(y.to_i64s().unwrap(), vec![2, 3]);
    }
}

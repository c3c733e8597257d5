//! Reductions over axes (`ReduceSum`, `ReduceMean`, ...) and `CumSum`.

use super::elementwise::kinds;
use super::{norm_axis, req, strides_of, tensor_of, Arity, EvalContext, Fact, OpDef, SymTensor};
use crate::dim::Dim;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::{Element, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

kinds! {
    /// What a reduction computes.
    ReduceKind { ReduceSum, ReduceMean, ReduceMax, ReduceMin, ReduceProd, ReduceL1, ReduceL2, ReduceSumSquare }
}

/// A reduction; axes come from the optional second input (all axes when absent, unless
/// `noop_with_empty_axes`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reduce {
    #[serde(skip)]
    pub kind: ReduceKind,
    #[serde(default = "yes")]
    pub keepdims: bool,
    #[serde(default)]
    pub noop_with_empty_axes: bool,
}

fn yes() -> bool {
    true
}

impl Reduce {
    /// The reduced axes (sorted, unique) given the axes input's values.
    fn axes(&self, rank: usize, given: Option<&[i64]>) -> Result<Vec<usize>> {
        let name = self.kind.name();
        let mut axes: Vec<usize> = match given {
            Some(a) if !a.is_empty() => a.iter().map(|&x| norm_axis(name, x, rank)).collect::<Result<_>>()?,
            _ if self.noop_with_empty_axes => vec![],
            _ => (0..rank).collect(),
        };
        axes.sort_unstable();
        axes.dedup();
        Ok(axes)
    }

    fn out_dims<T: Clone>(&self, shape: &[T], axes: &[usize], one: T) -> Vec<T> {
        let mut out = Vec::new();
        for (i, d) in shape.iter().enumerate() {
            if axes.contains(&i) {
                if self.keepdims {
                    out.push(one.clone());
                }
            } else {
                out.push(d.clone());
            }
        }
        out
    }
}

impl OpDef for Reduce {
    const NAMES: &'static [&'static str] = ReduceKind::NAMES;

    fn name(&self) -> &'static str {
        self.kind.name()
    }

    fn from_attrs(name: &str, attrs: Json) -> Result<Self, String> {
        let mut r: Reduce = serde_json::from_value(attrs).map_err(|e| format!("{name}: {e}"))?;
        r.kind = ReduceKind::from_name(name).ok_or_else(|| format!("unknown op `{name}`"))?;
        Ok(r)
    }

    fn arity(&self) -> Arity {
        Arity::range(1, 2, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let x = req(self.name(), inputs, 0)?;
        if x.dtype == DType::Bool {
            return Err(Error::op(self.name(), "does not support bool"));
        }
        let given = match inputs.get(1).copied().flatten() {
            None => None,
            Some(a) => match a.const_i64s() {
                Some(v) => Some(v),
                None if self.keepdims => {
                    let shape = (0..x.rank()).map(|_| Dim::unknown()).collect();
                    return Ok(vec![Fact::new(x.dtype, shape)]);
                }
                None => return Err(Error::op(self.name(), "axes must be known when keepdims is 0")),
            },
        };
        let axes = self.axes(x.rank(), given.as_deref())?;
        let mut out = Fact::new(x.dtype, self.out_dims(&x.shape, &axes, Dim::constant(1)));
        if let Some(v) = &x.value {
            if v.shape.len() == 1 && axes == [0] && matches!(self.kind, ReduceKind::ReduceSum | ReduceKind::ReduceProd)
            {
                let init = Dim::constant(i64::from(self.kind == ReduceKind::ReduceProd));
                let r =
                    v.data.iter().fold(
                        init,
                        |acc, d| {
                            if self.kind == ReduceKind::ReduceSum {
                                acc.add(d)
                            } else {
                                acc.mul(d)
                            }
                        },
                    );
                let shape = if self.keepdims { vec![1] } else { vec![] };
                out = out.with_value(SymTensor::new(shape, vec![r]));
            }
        }
        Ok(vec![out])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let name = self.name();
        let x = req(name, inputs, 0)?;
        let given = inputs.get(1).copied().flatten().map(|a| a.to_i64s()).transpose()?;
        let axes = self.axes(x.rank(), given.as_deref())?;
        let shape = x.shape();
        let out_shape = self.out_dims(shape, &axes, 1usize);
        // Strides mapping an input position to its output position (0 along reduced axes).
        let kept: Vec<usize> = shape.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect();
        let ks = strides_of(&kept);
        let map: Vec<usize> = (0..shape.len()).map(|i| if axes.contains(&i) { 0 } else { ks[i] }).collect();
        let n_out: usize = kept.iter().product();
        let count = (x.len() / n_out.max(1)).max(1) as f64;
        use ReduceKind::*;
        let init = match self.kind {
            ReduceMax => f64::NEG_INFINITY,
            ReduceMin => f64::INFINITY,
            ReduceProd => 1.0,
            _ => 0.0,
        };
        if x.dtype() != DType::F32 && !matches!(self.kind, ReduceSum | ReduceMax | ReduceMin | ReduceProd) {
            return Err(Error::op(name, format!("does not support {}", x.dtype())));
        }
        let vals = x.to_f64s()?;
        let mut acc = vec![init; n_out];
        let mut i = 0;
        super::for_each_broadcast(shape, [&map], |[o]| {
            let v = vals[i];
            i += 1;
            let a = &mut acc[o];
            *a = match self.kind {
                ReduceSum | ReduceMean => *a + v,
                ReduceMax | ReduceMin if v.is_nan() || a.is_nan() => f64::NAN,
                ReduceMax => a.max(v),
                ReduceMin => a.min(v),
                ReduceProd => *a * v,
                ReduceL1 => *a + v.abs(),
                ReduceL2 | ReduceSumSquare => *a + v * v,
            };
        });
        for a in acc.iter_mut() {
            match self.kind {
                ReduceMean => *a /= count,
                ReduceL2 => *a = a.sqrt(),
                _ => {}
            }
        }
        let out = crate::with_dtype!(x.dtype(), T => tensor_of(x.dtype(), out_shape, acc.into_iter().map(T::from_f64).collect::<Vec<T>>())?);
        Ok(vec![out])
    }
}

/// Cumulative sum along an axis given as a scalar input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CumSum {
    #[serde(default)]
    pub exclusive: bool,
    #[serde(default)]
    pub reverse: bool,
}

impl OpDef for CumSum {
    const NAMES: &'static [&'static str] = &["CumSum"];

    fn arity(&self) -> Arity {
        Arity::exact(2, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let x = req("CumSum", inputs, 0)?;
        Ok(vec![Fact::new(x.dtype, x.shape.clone())])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let x = req("CumSum", inputs, 0)?;
        let a = req("CumSum", inputs, 1)?.to_i64s()?;
        let [axis] = a.as_slice() else {
            return Err(Error::op("CumSum", "axis must be a scalar"));
        };
        let axis = norm_axis("CumSum", *axis, x.rank())?;
        let s = x.shape();
        let (outer, len, inner) =
            (s[..axis].iter().product::<usize>(), s[axis], s[axis + 1..].iter().product::<usize>());
        let (excl, rev) = (self.exclusive, self.reverse);
        crate::with_dtype!(x.dtype(), T => {
            let v = x.as_slice::<T>()?;
            let mut out = vec![T::from_f64(0.0); v.len()];
            for o in 0..outer {
                for i in 0..inner {
                    let mut acc = 0f64;
                    for step in 0..len {
                        let a = if rev { len - 1 - step } else { step };
                        let idx = (o * len + a) * inner + i;
                        if excl {
                            out[idx] = T::from_f64(acc);
                            acc += v[idx].to_f64();
                        } else {
                            acc += v[idx].to_f64();
                            out[idx] = T::from_f64(acc);
                        }
                    }
                }
            }
            Ok(vec![tensor_of(x.dtype(), s.to_vec(), out)?])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::Op;

    fn eval1(op: impl Into<Op>, inputs: &[&Tensor]) -> Tensor {
        let ins: Vec<Option<&Tensor>> = inputs.iter().map(|t| Some(*t)).collect();
        op.into().eval(&EvalContext::default(), &ins).unwrap().remove(0)
    }

    #[test]
    fn reduce_mean_over_last_axis_keeps_dims() {
        let x = Tensor::new(vec![2, 3], vec![1f32, 2., 3., 4., 5., 6.]).unwrap();
        let axes = Tensor::new(vec![1], vec![-1i64]).unwrap();
        let y =
            eval1(Reduce { kind: ReduceKind::ReduceMean, keepdims: true, noop_with_empty_axes: false }, &[&x, &axes]);
        assert_eq!(y.shape(), &[2, 1]);
        assert_eq!(y.as_slice::<f32>().unwrap(), &[2., 5.]);
        let y = eval1(Reduce { kind: ReduceKind::ReduceSum, keepdims: false, noop_with_empty_axes: false }, &[&x]);
        assert_eq!(y.shape(), &[] as &[usize]);
        assert_eq!(y.as_slice::<f32>().unwrap(), &[21.]);
    }

    #[test]
    fn reduce_over_middle_axis() {
        let x = Tensor::new(vec![2, 2, 2], (0..8).map(|v| v as i64).collect()).unwrap();
        let axes = Tensor::new(vec![1], vec![1i64]).unwrap();
        let y =
            eval1(Reduce { kind: ReduceKind::ReduceMax, keepdims: false, noop_with_empty_axes: false }, &[&x, &axes]);
        assert_eq!(y.shape(), &[2, 2]);
        assert_eq!(y.as_slice::<i64>().unwrap(), &[2, 3, 6, 7]);
    }

    #[test]
    fn cumsum_forward_exclusive_reverse() {
        let x = Tensor::new(vec![4], vec![1i64, 1, 1, 1]).unwrap();
        let ax = Tensor::scalar(0i64);
        assert_eq!(
            eval1(CumSum { exclusive: false, reverse: false }, &[&x, &ax]).as_slice::<i64>().unwrap(),
            &[1, 2, 3, 4]
        );
        assert_eq!(
            eval1(CumSum { exclusive: true, reverse: true }, &[&x, &ax]).as_slice::<i64>().unwrap(),
            &[3, 2, 1, 0]
        );
    }
}

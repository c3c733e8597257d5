//! Neural-network ops: `Softmax`/`LogSoftmax`, `LayerNorm`, `Gelu`.

use super::{broadcast_strides, norm_axis, req, Arity, EvalContext, Fact, OpDef};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

/// Softmax along one axis (ONNX opset 13 semantics); `log` gives `LogSoftmax`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Softmax {
    #[serde(default = "minus_one")]
    pub axis: i64,
    #[serde(skip)]
    pub log: bool,
    /// NaN results become 0: softmax followed by `Where(IsNaN(p), 0, p)`, as PyTorch's SDPA
    /// exports it (a row whose keys are all masked out gives zeros, not NaN).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nan_to_zero: bool,
}

fn minus_one() -> i64 {
    -1
}

fn f32_input<'a>(op: &str, inputs: &[Option<&'a Fact>], i: usize) -> Result<&'a Fact> {
    let f = req(op, inputs, i)?;
    if f.dtype != DType::F32 {
        return Err(Error::op(op, format!("input {i} must be f32, got {}", f.dtype)));
    }
    Ok(f)
}

impl OpDef for Softmax {
    const NAMES: &'static [&'static str] = &["Softmax", "LogSoftmax"];

    fn name(&self) -> &'static str {
        Self::NAMES[usize::from(self.log)]
    }

    fn from_attrs(name: &str, attrs: Json) -> Result<Self, String> {
        let mut s: Softmax = serde_json::from_value(attrs).map_err(|e| format!("{name}: {e}"))?;
        s.log = name == "LogSoftmax";
        Ok(s)
    }

    fn arity(&self) -> Arity {
        Arity::exact(1, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let x = f32_input(self.name(), inputs, 0)?;
        norm_axis(self.name(), self.axis, x.rank())?;
        Ok(vec![Fact::new(DType::F32, x.shape.clone())])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let x = req(self.name(), inputs, 0)?;
        let axis = norm_axis(self.name(), self.axis, x.rank())?;
        let s = x.shape();
        let (len, inner) = (s.get(axis).copied().unwrap_or(1), s[axis + 1..].iter().product::<usize>());
        let xs = x.as_slice::<f32>()?;
        let mut out = vec![0f32; xs.len()];
        let (log, nan_to_zero) = (self.log, self.nan_to_zero);
        out.par_chunks_mut((len * inner).max(1)).enumerate().for_each(|(o, block)| {
            let xb = &xs[o * len * inner..(o + 1) * len * inner];
            for i in 0..inner {
                let max = (0..len).map(|a| xb[a * inner + i]).fold(f32::NEG_INFINITY, f32::max);
                let sum: f64 = (0..len).map(|a| ((xb[a * inner + i] - max).exp()) as f64).sum();
                for a in 0..len {
                    let d = xb[a * inner + i] - max;
                    let y = if log { d - (sum.ln() as f32) } else { (d.exp() as f64 / sum) as f32 };
                    block[a * inner + i] = if nan_to_zero && y.is_nan() { 0.0 } else { y };
                }
            }
        });
        Ok(vec![Tensor::new(s.to_vec(), out)?])
    }
}

/// Layer normalization over the dims from `axis` on: `(x - mean) / sqrt(var + epsilon) * scale
/// + bias`, statistics in f64 (ONNX `LayerNormalization`, output `Y` only).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerNorm {
    #[serde(default = "minus_one")]
    pub axis: i64,
    #[serde(default = "default_eps")]
    pub epsilon: f32,
}

fn default_eps() -> f32 {
    1e-5
}

impl OpDef for LayerNorm {
    const NAMES: &'static [&'static str] = &["LayerNorm"];

    fn arity(&self) -> Arity {
        Arity::range(2, 3, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let x = f32_input("LayerNorm", inputs, 0)?;
        let axis = norm_axis("LayerNorm", self.axis, x.rank())?;
        for (i, p) in inputs.iter().enumerate().skip(1) {
            if let Some(p) = p {
                if p.dtype != DType::F32 {
                    return Err(Error::op("LayerNorm", format!("input {i} must be f32, got {}", p.dtype)));
                }
                if p.rank() > x.rank() - axis {
                    return Err(Error::op("LayerNorm", format!("input {i} has rank {} > normalized rank", p.rank())));
                }
            }
        }
        Ok(vec![Fact::new(DType::F32, x.shape.clone())])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let x = req("LayerNorm", inputs, 0)?;
        let axis = norm_axis("LayerNorm", self.axis, x.rank())?;
        let norm_shape = &x.shape()[axis..];
        let len: usize = norm_shape.iter().product();
        // Scale and bias broadcast to the normalized shape.
        let expand = |i: usize| -> Result<Option<Vec<f32>>> {
            let Some(t) = inputs.get(i).copied().flatten() else {
                return Ok(None);
            };
            let bs = super::broadcast_shapes("LayerNorm", &[t.shape(), norm_shape])?;
            if bs != norm_shape {
                return Err(Error::op(
                    "LayerNorm",
                    format!("input {i} {:?} does not broadcast to {norm_shape:?}", t.shape()),
                ));
            }
            let v = t.as_slice::<f32>()?;
            if v.len() == len {
                return Ok(Some(v.to_vec()));
            }
            let st = broadcast_strides(t.shape(), norm_shape);
            let mut out = Vec::with_capacity(len);
            super::for_each_broadcast(norm_shape, [&st], |[o]| out.push(v[o]));
            Ok(Some(out))
        };
        let scale = expand(1)?.ok_or_else(|| Error::op("LayerNorm", "scale is required"))?;
        let bias = expand(2)?;
        let xs = x.as_slice::<f32>()?;
        let mut out = vec![0f32; xs.len()];
        let eps = self.epsilon as f64;
        out.par_chunks_mut(len.max(1)).zip(xs.par_chunks(len.max(1))).for_each(|(y, row)| {
            let n = row.len() as f64;
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            let inv = 1.0 / (var + eps).sqrt();
            for j in 0..row.len() {
                let mut v = (row[j] as f64 - mean) * inv * scale[j] as f64;
                if let Some(b) = &bias {
                    v += b[j] as f64;
                }
                y[j] = v as f32;
            }
        });
        Ok(vec![Tensor::new(x.shape().to_vec(), out)?])
    }
}

/// GELU: `0.5 x (1 + erf(x / sqrt 2))`, or its tanh approximation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gelu {
    #[serde(default)]
    pub approximate: GeluApprox,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GeluApprox {
    #[default]
    None,
    Tanh,
}

/// GELU of one value, computed in f64.
pub fn gelu(x: f32, approximate: GeluApprox) -> f32 {
    let x = x as f64;
    let y = match approximate {
        GeluApprox::None => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
        GeluApprox::Tanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        }
    };
    y as f32
}

impl OpDef for Gelu {
    const NAMES: &'static [&'static str] = &["Gelu"];

    fn arity(&self) -> Arity {
        Arity::exact(1, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let x = f32_input("Gelu", inputs, 0)?;
        Ok(vec![Fact::new(DType::F32, x.shape.clone())])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let x = req("Gelu", inputs, 0)?;
        let a = self.approximate;
        let v: Vec<f32> = x.as_slice::<f32>()?.par_iter().map(|&e| gelu(e, a)).collect();
        Ok(vec![Tensor::new(x.shape().to_vec(), v)?])
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
    fn softmax_rows_sum_to_one_and_mask_with_minus_inf() {
        let x = Tensor::new(vec![2, 3], vec![1f32, 2., 3., 0., f32::NEG_INFINITY, 0.]).unwrap();
        let y = eval1(Softmax { axis: -1, log: false, nan_to_zero: false }, &[&x]);
        let v = y.as_slice::<f32>().unwrap();
        assert!((v[0..3].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(&v[3..], &[0.5, 0.0, 0.5]);
        let y = eval1(Softmax { axis: 0, log: true, nan_to_zero: false }, &[&x]);
        assert!((y.as_slice::<f32>().unwrap()[0] - (1f32 / (1. + (-1f32).exp())).ln()).abs() < 1e-6);
    }

    #[test]
    fn layer_norm_normalizes_the_last_axis() {
        let x = Tensor::new(vec![1, 4], vec![1f32, 2., 3., 4.]).unwrap();
        let s = Tensor::new(vec![4], vec![1f32; 4]).unwrap();
        let b = Tensor::new(vec![4], vec![0.5f32; 4]).unwrap();
        let y = eval1(LayerNorm { axis: -1, epsilon: 0.0 }, &[&x, &s, &b]);
        let v = y.as_slice::<f32>().unwrap();
        let sd = 1.25f32.sqrt();
        for (i, want) in [-1.5f32, -0.5, 0.5, 1.5].iter().enumerate() {
            assert!((v[i] - (want / sd + 0.5)).abs() < 1e-6);
        }
    }

    #[test]
    fn gelu_known_values() {
        assert_eq!(gelu(0.0, GeluApprox::None), 0.0);
        assert!((gelu(1.0, GeluApprox::None) - 0.841_344_7).abs() < 1e-6);
        assert!((gelu(1.0, GeluApprox::Tanh) - 0.841_192).abs() < 1e-5);
        assert!((gelu(-3.0, GeluApprox::None) + 0.004_049_7).abs() < 1e-6);
    }
}

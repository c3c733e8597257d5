//! Quantization ops with exact ONNX semantics: `QuantizeLinear`, `DequantizeLinear`,
//! `DynamicQuantizeLinear`, `MatMulInteger`. Rounding is half to even, as onnxruntime does.

use super::linalg::{batch_offsets, matmul_dims, matmul_shape};
use super::{norm_axis, req, Arity, EvalContext, Fact, OpDef};
use crate::dim::Dim;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

fn default_axis() -> i64 {
    1
}

/// Per-tensor or per-axis quantization parameters broadcast over a tensor of `shape`: for each
/// element, the index of its scale/zero point.
fn param_index(op: &str, shape: &[usize], n_params: usize, axis: i64) -> Result<Box<dyn Fn(usize) -> usize>> {
    if n_params == 1 {
        return Ok(Box::new(|_| 0));
    }
    let a = norm_axis(op, axis, shape.len())?;
    if shape[a] != n_params {
        return Err(Error::op(op, format!("{n_params} scales for axis {a} of size {}", shape[a])));
    }
    let inner: usize = shape[a + 1..].iter().product();
    let len = shape[a];
    Ok(Box::new(move |i| (i / inner) % len))
}

fn zero_points(op: &str, zp: Option<&Tensor>) -> Result<Option<Vec<i64>>> {
    zp.map(|t| match t.dtype() {
        DType::U8 | DType::I8 | DType::I32 => t.to_i64s(),
        d => Err(Error::op(op, format!("zero point must be u8, i8 or i32, got {d}"))),
    })
    .transpose()
}

fn qrange(dtype: DType) -> Option<(f32, f32)> {
    match dtype {
        DType::U8 => Some((0.0, 255.0)),
        DType::I8 => Some((-128.0, 127.0)),
        _ => None,
    }
}

/// `saturate(round(x / scale) + zero_point)`, the rounding half to even.
pub fn quantize_value(x: f32, scale: f32, zp: i64, lo: f32, hi: f32) -> i64 {
    // onnxruntime clamps x / scale to [lo - zp, hi - zp] before rounding; the bounds are
    // integers, so this equals saturating after the rounding.
    let v = (x / scale).clamp(lo - zp as f32, hi - zp as f32);
    let v = if v.is_nan() { 0.0 } else { v };
    super::elementwise::round_half_even(v) as i64 + zp
}

/// `DequantizeLinear(QuantizeLinear(x, scale, zero_point), scale, zero_point)` with per-tensor
/// parameters, as one f32 op: `x` rounded to the quantization grid (what QDQ models compute
/// between their ops). `lo`/`hi` are the integer type's bounds (0/255 for u8, -128/127 for i8).
/// As an epilogue instruction it runs on a product's tiles.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeQuant {
    pub scale: f32,
    pub zero_point: i64,
    pub lo: i64,
    pub hi: i64,
}

impl FakeQuant {
    /// One value, exactly as `DequantizeLinear(QuantizeLinear(x))` computes it.
    #[inline]
    pub fn apply(&self, x: f32) -> f32 {
        let q = quantize_value(x, self.scale, self.zero_point, self.lo as f32, self.hi as f32);
        (q - self.zero_point) as f32 * self.scale
    }

    /// Checks the parameters: a positive finite scale, `lo < hi` within 32 bits, the zero point
    /// between them.
    pub fn validate(&self) -> Result<()> {
        let in_i32 = |v: i64| i32::try_from(v).is_ok();
        let ok = self.scale > 0.0
            && self.scale.is_finite()
            && in_i32(self.lo)
            && in_i32(self.hi)
            && self.lo < self.hi
            && (self.lo..=self.hi).contains(&self.zero_point);
        if ok {
            Ok(())
        } else {
            Err(Error::op("FakeQuant", format!("bad parameters {self:?}")))
        }
    }

    /// The bounds of `round(x / scale)`: `lo - zero_point`, `hi - zero_point`.
    pub fn bounds(&self) -> (f32, f32) {
        ((self.lo - self.zero_point) as f32, (self.hi - self.zero_point) as f32)
    }
}

impl OpDef for FakeQuant {
    const NAMES: &'static [&'static str] = &["FakeQuant"];

    fn from_attrs(name: &str, attrs: Json) -> Result<Self, String> {
        let f: FakeQuant = serde_json::from_value(attrs).map_err(|e| format!("{name}: {e}"))?;
        f.validate().map_err(|e| e.to_string())?;
        Ok(f)
    }

    fn arity(&self) -> Arity {
        Arity::exact(1, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        self.validate()?;
        let x = req("FakeQuant", inputs, 0)?;
        if x.dtype != DType::F32 {
            return Err(Error::op("FakeQuant", format!("input must be f32, got {}", x.dtype)));
        }
        Ok(vec![Fact::new(DType::F32, x.shape.clone())])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        self.validate()?;
        let x = req("FakeQuant", inputs, 0)?;
        let v: Vec<f32> = x.as_slice::<f32>()?.iter().map(|&v| self.apply(v)).collect();
        Ok(vec![Tensor::new(x.shape().to_vec(), v)?])
    }
}

/// `y = saturate(round(x / scale) + zero_point)`; the output type is the zero point's (u8 when
/// absent).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizeLinear {
    #[serde(default = "default_axis")]
    pub axis: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_dtype: Option<DType>,
}

impl QuantizeLinear {
    fn out_dtype(&self, zp: Option<DType>) -> Result<DType> {
        let d = zp.or(self.output_dtype).unwrap_or(DType::U8);
        if qrange(d).is_none() {
            return Err(Error::op("QuantizeLinear", format!("output must be u8 or i8, got {d}")));
        }
        Ok(d)
    }
}

impl OpDef for QuantizeLinear {
    const NAMES: &'static [&'static str] = &["QuantizeLinear"];

    fn arity(&self) -> Arity {
        Arity::range(2, 3, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let (x, s) = (req("QuantizeLinear", inputs, 0)?, req("QuantizeLinear", inputs, 1)?);
        if x.dtype != DType::F32 || s.dtype != DType::F32 {
            return Err(Error::op("QuantizeLinear", "input and scale must be f32"));
        }
        let dt = self.out_dtype(inputs.get(2).copied().flatten().map(|f| f.dtype))?;
        Ok(vec![Fact::new(dt, x.shape.clone())])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let (x, s) = (req("QuantizeLinear", inputs, 0)?, req("QuantizeLinear", inputs, 1)?);
        let zpt = inputs.get(2).copied().flatten();
        let dt = self.out_dtype(zpt.map(|t| t.dtype()))?;
        let (lo, hi) = qrange(dt).expect("checked by out_dtype");
        let scales = s.as_slice::<f32>()?;
        let zps = zero_points("QuantizeLinear", zpt)?.unwrap_or_else(|| vec![0; scales.len()]);
        if zps.len() != scales.len() {
            return Err(Error::op("QuantizeLinear", "scale and zero point differ in size"));
        }
        let at = param_index("QuantizeLinear", x.shape(), scales.len(), self.axis)?;
        let q: Vec<i64> = x
            .as_slice::<f32>()?
            .iter()
            .enumerate()
            .map(|(i, &v)| quantize_value(v, scales[at(i)], zps[at(i)], lo, hi))
            .collect();
        let shape = x.shape().to_vec();
        Ok(vec![match dt {
            DType::U8 => Tensor::new(shape, q.into_iter().map(|v| v as u8).collect())?,
            _ => Tensor::new(shape, q.into_iter().map(|v| v as i8).collect())?,
        }])
    }
}

/// `y = (x - zero_point) * scale`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DequantizeLinear {
    #[serde(default = "default_axis")]
    pub axis: i64,
}

impl OpDef for DequantizeLinear {
    const NAMES: &'static [&'static str] = &["DequantizeLinear"];

    fn arity(&self) -> Arity {
        Arity::range(2, 3, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let (x, s) = (req("DequantizeLinear", inputs, 0)?, req("DequantizeLinear", inputs, 1)?);
        if !matches!(x.dtype, DType::U8 | DType::I8 | DType::I32) || s.dtype != DType::F32 {
            return Err(Error::op(
                "DequantizeLinear",
                format!("expects u8/i8/i32 data and f32 scale, got {} and {}", x.dtype, s.dtype),
            ));
        }
        if let Some(z) = inputs.get(2).copied().flatten() {
            if z.dtype != x.dtype {
                return Err(Error::op("DequantizeLinear", format!("zero point is {}, data is {}", z.dtype, x.dtype)));
            }
        }
        Ok(vec![Fact::new(DType::F32, x.shape.clone())])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let (x, s) = (req("DequantizeLinear", inputs, 0)?, req("DequantizeLinear", inputs, 1)?);
        let scales = s.as_slice::<f32>()?;
        let zps =
            zero_points("DequantizeLinear", inputs.get(2).copied().flatten())?.unwrap_or_else(|| vec![0; scales.len()]);
        if zps.len() != scales.len() {
            return Err(Error::op("DequantizeLinear", "scale and zero point differ in size"));
        }
        let at = param_index("DequantizeLinear", x.shape(), scales.len(), self.axis)?;
        let v: Vec<f32> =
            x.to_i64s()?.iter().enumerate().map(|(i, &q)| (q - zps[at(i)]) as f32 * scales[at(i)]).collect();
        Ok(vec![Tensor::new(x.shape().to_vec(), v)?])
    }
}

/// Quantizes f32 to u8 with a scale and zero point computed from the tensor's range (which is
/// widened to include 0): outputs `y`, `scale`, `zero_point`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicQuantizeLinear {}

/// Scale and zero point of `DynamicQuantizeLinear` for a range, as onnxruntime computes them.
pub fn dynamic_qparams(min: f32, max: f32) -> (f32, u8) {
    let (min, max) = (min.min(0.0), max.max(0.0));
    let scale = if max == min { 1.0 } else { (max - min) / 255.0 };
    let zp = (0.0 - min / scale).clamp(0.0, 255.0);
    (scale, super::elementwise::round_half_even(zp) as u8)
}

impl OpDef for DynamicQuantizeLinear {
    const NAMES: &'static [&'static str] = &["DynamicQuantizeLinear"];

    fn arity(&self) -> Arity {
        Arity::exact(1, 3)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let x = req("DynamicQuantizeLinear", inputs, 0)?;
        if x.dtype != DType::F32 {
            return Err(Error::op("DynamicQuantizeLinear", format!("expects f32, got {}", x.dtype)));
        }
        Ok(vec![Fact::new(DType::U8, x.shape.clone()), Fact::new(DType::F32, vec![]), Fact::new(DType::U8, vec![])])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let x = req("DynamicQuantizeLinear", inputs, 0)?;
        let v = x.as_slice::<f32>()?;
        let (min, max) = v.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &e| (a.min(e), b.max(e)));
        let (scale, zp) = dynamic_qparams(min, max);
        let q: Vec<u8> = v.iter().map(|&e| quantize_value(e, scale, zp as i64, 0.0, 255.0) as u8).collect();
        Ok(vec![Tensor::new(x.shape().to_vec(), q)?, Tensor::scalar(scale), Tensor::scalar(zp)])
    }
}

/// `(A - a_zero_point) · (B - b_zero_point)` in i32, numpy matmul semantics; zero points are
/// scalars, per row of `A` or per column of `B`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatMulInteger {}

impl OpDef for MatMulInteger {
    const NAMES: &'static [&'static str] = &["MatMulInteger"];

    fn arity(&self) -> Arity {
        Arity::range(2, 4, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let (a, b) = (req("MatMulInteger", inputs, 0)?, req("MatMulInteger", inputs, 1)?);
        for f in [a, b] {
            if !matches!(f.dtype, DType::U8 | DType::I8) {
                return Err(Error::op("MatMulInteger", format!("operands must be u8 or i8, got {}", f.dtype)));
            }
        }
        let shape: Vec<Dim> = matmul_dims("MatMulInteger", &a.shape, &b.shape)?;
        Ok(vec![Fact::new(DType::I32, shape)])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let (a, b) = (req("MatMulInteger", inputs, 0)?, req("MatMulInteger", inputs, 1)?);
        for t in [a, b] {
            if !matches!(t.dtype(), DType::U8 | DType::I8) {
                return Err(Error::op("MatMulInteger", format!("operands must be u8 or i8, got {}", t.dtype())));
            }
        }
        let s = matmul_shape("MatMulInteger", a.shape(), b.shape())?;
        super::check_alloc("MatMulInteger", &s.out)?;
        let (m, k, n) = (s.m, s.k, s.n);
        let azp = zero_points("MatMulInteger", inputs.get(2).copied().flatten())?.unwrap_or_else(|| vec![0]);
        let bzp = zero_points("MatMulInteger", inputs.get(3).copied().flatten())?.unwrap_or_else(|| vec![0]);
        if !(azp.len() == 1 || azp.len() == m) || !(bzp.len() == 1 || bzp.len() == n) {
            return Err(Error::op("MatMulInteger", "zero points must be scalars, per row of A or per column of B"));
        }
        // Zero points subtracted up front; products of 9-bit values summed in i32 are exact for
        // any inner dimension below 2^31 / 2^18.
        if k >= 1 << 13 {
            return Err(Error::op("MatMulInteger", format!("inner dimension {k} is too large for exact i32 sums")));
        }
        let (x, y) = (a.to_i64s()?, b.to_i64s()?);
        let offsets = batch_offsets(&s);
        let mut out = vec![0i32; offsets.len() * m * n];
        out.par_chunks_mut((m * n).max(1)).zip(offsets.par_iter()).for_each(|(c, &(ia, ib))| {
            let xa = &x[ia * m * k..(ia + 1) * m * k];
            let yb: Vec<i32> =
                (0..k * n).map(|i| (y[ib * k * n + i] - bzp[if bzp.len() == 1 { 0 } else { i % n }]) as i32).collect();
            for i in 0..m {
                let za = azp[if azp.len() == 1 { 0 } else { i }];
                let row = &mut c[i * n..(i + 1) * n];
                for p in 0..k {
                    let av = (xa[i * k + p] - za) as i32;
                    for (acc, &bv) in row.iter_mut().zip(&yb[p * n..(p + 1) * n]) {
                        *acc += av * bv;
                    }
                }
            }
        });
        Ok(vec![Tensor::new(s.out, out)?])
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::op::Op;

    fn eval(op: impl Into<Op>, inputs: &[&Tensor]) -> Vec<Tensor> {
        let ins: Vec<Option<&Tensor>> = inputs.iter().map(|t| Some(*t)).collect();
        op.into().eval(&EvalContext::default(), &ins).unwrap()
    }

    /// Full-range data: values on and around every rounding midpoint, beyond both bounds, NaN.
    pub(crate) fn fake_quant_data(q: &FakeQuant) -> Vec<f32> {
        let mut v: Vec<f32> = (-700..700).map(|i| i as f32 * 0.5 * q.scale).collect();
        v.extend((-300..300).map(|i| (i as f32 + 0.5) * q.scale * 1.0000001));
        v.extend([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 1e30, -1e30]);
        v
    }

    #[test]
    fn fake_quant_is_dequantize_of_quantize_bit_for_bit() {
        for (zp, dt) in [(128u8 as i64, DType::U8), (0, DType::U8), (-3, DType::I8), (0, DType::I8)] {
            let (lo, hi) = qrange(dt).unwrap();
            let q = FakeQuant { scale: 0.0173, zero_point: zp, lo: lo as i64, hi: hi as i64 };
            let x = Tensor::new(vec![fake_quant_data(&q).len()], fake_quant_data(&q)).unwrap();
            let s = Tensor::new(vec![], vec![q.scale]).unwrap();
            let z = match dt {
                DType::U8 => Tensor::new(vec![], vec![zp as u8]).unwrap(),
                _ => Tensor::new(vec![], vec![zp as i8]).unwrap(),
            };
            let qx = eval(QuantizeLinear { axis: 1, output_dtype: None }, &[&x, &s, &z]).remove(0);
            let want = eval(DequantizeLinear { axis: 1 }, &[&qx, &s, &z]).remove(0);
            let got = eval(q, &[&x]).remove(0);
            assert!(got.bit_eq(&want), "{dt} zero point {zp}");
        }
    }

    #[test]
    fn dynamic_quantization_follows_the_onnx_example() {
        // The example of the ONNX operator documentation.
        let x = Tensor::new(vec![6], vec![0f32, 2., -3., -2.5, 1.34, 0.5]).unwrap();
        let out = eval(DynamicQuantizeLinear {}, &[&x]);
        assert_eq!(out[0].as_slice::<u8>().unwrap(), &[153, 255, 0, 26, 221, 179]);
        assert!((out[1].as_slice::<f32>().unwrap()[0] - 0.019_607_844).abs() < 1e-9);
        assert_eq!(out[2].as_slice::<u8>().unwrap(), &[153]);
        let z = Tensor::new(vec![2], vec![0f32, 0.]).unwrap();
        let out = eval(DynamicQuantizeLinear {}, &[&z]);
        assert_eq!(out[1].as_slice::<f32>().unwrap(), &[1.0]);
    }

    #[test]
    fn quantize_dequantize_per_axis() {
        let x = Tensor::new(vec![2, 2], vec![1f32, -1., 300., 0.25]).unwrap();
        let s = Tensor::new(vec![2], vec![0.5f32, 1.0]).unwrap();
        let zp = Tensor::new(vec![2], vec![0i8, 1]).unwrap();
        let q = eval(QuantizeLinear { axis: 1, output_dtype: None }, &[&x, &s, &zp]).remove(0);
        assert_eq!(q.as_slice::<i8>().unwrap(), &[2, 0, 127, 1]);
        let d = eval(DequantizeLinear { axis: 1 }, &[&q, &s, &zp]).remove(0);
        assert_eq!(d.as_slice::<f32>().unwrap(), &[1., -1., 63.5, 0.]);
    }

    #[test]
    fn matmul_integer_subtracts_zero_points() {
        let a = Tensor::new(vec![2, 2], vec![1u8, 2, 3, 4]).unwrap();
        let b = Tensor::new(vec![2, 1], vec![-1i8, 2]).unwrap();
        let za = Tensor::scalar(1u8);
        let y = eval(MatMulInteger {}, &[&a, &b, &za]).remove(0);
        assert_eq!(y.as_slice::<i32>().unwrap(), &[2, -2 + 3 * 2]);
    }
}

//! Elementwise ops: unary math, binary arithmetic and comparisons with numpy broadcasting,
//! `Where`, `Cast`, `Clip`.

use super::{
    broadcast_dims, broadcast_shapes, broadcast_strides, for_each_broadcast, req, tensor_of, Arity, EvalContext, Fact,
    OpDef, SymTensor,
};
use crate::dim::Dim;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::{Element, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

macro_rules! kinds {
    ($(#[$m:meta])* $kind:ident { $($v:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
        pub enum $kind {
            #[default]
            $($v),*
        }
        impl $kind {
            pub const NAMES: &'static [&'static str] = &[$(stringify!($v)),*];
            pub const ALL: &'static [$kind] = &[$($kind::$v),*];
            pub fn name(self) -> &'static str {
                match self { $($kind::$v => stringify!($v)),* }
            }
            pub fn from_name(s: &str) -> Option<$kind> {
                Self::ALL.iter().copied().find(|k| k.name() == s)
            }
        }
    };
}
pub(crate) use kinds;

/// Builds a family op (kind from the name) after checking that no attribute was given.
fn family<K>(name: &str, attrs: &Json, from_name: fn(&str) -> Option<K>) -> Result<K, String> {
    if !matches!(attrs, Json::Object(m) if m.is_empty()) && !attrs.is_null() {
        return Err(format!("{name} takes no attributes, got {attrs}"));
    }
    from_name(name).ok_or_else(|| format!("unknown op `{name}`"))
}

kinds! {
    /// One-input elementwise functions.
    UnaryKind { Identity, Neg, Abs, Sqrt, Reciprocal, Exp, Log, Erf, Tanh, Relu, Sigmoid, Not, IsNaN, IsInf, Floor, Ceil, Round, Sign, Sin, Cos }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unary {
    #[serde(skip)]
    pub kind: UnaryKind,
}

impl Unary {
    pub fn new(kind: UnaryKind) -> Unary {
        Unary { kind }
    }
}

/// `erf` with f64 accuracy, rounded to f32 (what onnxruntime computes within one ulp).
fn erf32(x: f32) -> f32 {
    libm::erf(x as f64) as f32
}

/// Round half to even, as ONNX `Round` and quantization require.
pub(crate) fn round_half_even(x: f32) -> f32 {
    x.round_ties_even()
}

impl OpDef for Unary {
    const NAMES: &'static [&'static str] = UnaryKind::NAMES;

    fn name(&self) -> &'static str {
        self.kind.name()
    }

    fn from_attrs(name: &str, attrs: Json) -> Result<Self, String> {
        family(name, &attrs, UnaryKind::from_name).map(Unary::new)
    }

    fn arity(&self) -> Arity {
        Arity::exact(1, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        use UnaryKind::*;
        let x = req(self.name(), inputs, 0)?;
        let float_only = matches!(
            self.kind,
            Sqrt | Reciprocal | Exp | Log | Erf | Tanh | Sigmoid | IsNaN | IsInf | Floor | Ceil | Round | Sin | Cos
        );
        if float_only && x.dtype != DType::F32 {
            return Err(Error::op(self.name(), format!("expects f32, got {}", x.dtype)));
        }
        if self.kind == Not && x.dtype != DType::Bool {
            return Err(Error::op("Not", format!("expects bool, got {}", x.dtype)));
        }
        let dtype = if matches!(self.kind, IsNaN | IsInf) { DType::Bool } else { x.dtype };
        let mut out = Fact::new(dtype, x.shape.clone());
        if let Some(v) = &x.value {
            let data: Option<Vec<Dim>> = match self.kind {
                Identity => Some(v.data.clone()),
                Neg => Some(v.data.iter().map(Dim::neg).collect()),
                Not => v.data.iter().map(|d| d.as_const().map(|c| Dim::constant(i64::from(c == 0)))).collect(),
                Abs => v.data.iter().map(|d| d.as_const().map(|c| Dim::constant(c.abs()))).collect(),
                _ => None,
            };
            if let Some(data) = data {
                out = out.with_value(SymTensor::new(v.shape.clone(), data));
            }
        }
        Ok(vec![out])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        use UnaryKind::*;
        let x = req(self.name(), inputs, 0)?;
        let shape = x.shape().to_vec();
        let out = match (self.kind, x.dtype()) {
            (Identity, _) => x.clone(),
            (Not, DType::Bool) => Tensor::bool_from_u8(shape, x.as_slice::<u8>()?.iter().map(|&b| b ^ 1).collect())?,
            (IsNaN, DType::F32) => {
                Tensor::from_bools(shape, x.as_slice::<f32>()?.iter().map(|v| v.is_nan()).collect())?
            }
            (IsInf, DType::F32) => {
                Tensor::from_bools(shape, x.as_slice::<f32>()?.iter().map(|v| v.is_infinite()).collect())?
            }
            (kind, DType::F32) => {
                Tensor::new(shape, x.as_slice::<f32>()?.iter().map(|&v| unary_f32(kind, v)).collect())?
            }
            (Neg | Abs | Sign | Relu, dt) if dt.is_int() => {
                let v = x.to_i64s()?;
                let r: Vec<i64> = match self.kind {
                    Neg => v.iter().map(|a| a.wrapping_neg()).collect(),
                    Abs => v.iter().map(|a| a.wrapping_abs()).collect(),
                    Sign => v.iter().map(|a| a.signum()).collect(),
                    _ => v.iter().map(|&a| a.max(0)).collect(),
                };
                cast_i64s(dt, shape, r)?
            }
            (kind, dt) => return Err(Error::op(kind.name(), format!("does not support {dt}"))),
        };
        Ok(vec![out])
    }
}

/// The f32 semantics of a unary op (those that map f32 to f32).
pub(crate) fn unary_f32(kind: UnaryKind, v: f32) -> f32 {
    use UnaryKind::*;
    match kind {
        Identity => v,
        Neg => -v,
        Abs => v.abs(),
        Sqrt => v.sqrt(),
        Reciprocal => 1.0 / v,
        Exp => v.exp(),
        Log => v.ln(),
        Erf => erf32(v),
        Tanh => v.tanh(),
        Relu => {
            if v > 0.0 {
                v
            } else {
                0.0
            }
        }
        Sigmoid => 1.0 / (1.0 + (-v).exp()),
        Floor => v.floor(),
        Ceil => v.ceil(),
        Round => round_half_even(v),
        Sign => {
            if v > 0.0 {
                1.0
            } else if v < 0.0 {
                -1.0
            } else {
                v
            }
        }
        Sin => v.sin(),
        Cos => v.cos(),
        Not | IsNaN | IsInf => f32::NAN,
    }
}

/// The f32 semantics of an arithmetic binary op.
pub(crate) fn binary_f32(kind: BinaryKind, a: f32, b: f32) -> f32 {
    f32_binary(kind)(a, b)
}

/// i64 results back to a narrower integer dtype (wrapping, as the narrow type would).
fn cast_i64s(dt: DType, shape: Vec<usize>, v: Vec<i64>) -> Result<Tensor> {
    match dt {
        DType::I64 => Tensor::new(shape, v),
        DType::I32 => Tensor::new(shape, v.into_iter().map(|x| x as i32).collect()),
        DType::I8 => Tensor::new(shape, v.into_iter().map(|x| x as i8).collect()),
        DType::U8 => Tensor::new(shape, v.into_iter().map(|x| x as u8).collect()),
        DType::Bool => Tensor::bool_from_u8(shape, v.into_iter().map(|x| u8::from(x != 0)).collect()),
        DType::F32 => Tensor::new(shape, v.into_iter().map(|x| x as f32).collect()),
    }
}

kinds! {
    /// Two-input elementwise functions with numpy broadcasting.
    BinaryKind { Add, Sub, Mul, Div, Pow, Max, Min, Mod, Equal, Less, LessOrEqual, Greater, GreaterOrEqual, And, Or, Xor }
}

impl BinaryKind {
    pub fn is_comparison(self) -> bool {
        use BinaryKind::*;
        matches!(self, Equal | Less | LessOrEqual | Greater | GreaterOrEqual)
    }

    pub fn is_logical(self) -> bool {
        matches!(self, BinaryKind::And | BinaryKind::Or | BinaryKind::Xor)
    }

    pub fn is_commutative(self) -> bool {
        use BinaryKind::*;
        matches!(self, Add | Mul | Max | Min | Equal | And | Or | Xor)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binary {
    #[serde(skip)]
    pub kind: BinaryKind,
}

impl Binary {
    pub fn new(kind: BinaryKind) -> Binary {
        Binary { kind }
    }
}

fn f32_binary(kind: BinaryKind) -> fn(f32, f32) -> f32 {
    use BinaryKind::*;
    match kind {
        Add => |a, b| a + b,
        Sub => |a, b| a - b,
        Mul => |a, b| a * b,
        Div => |a, b| a / b,
        Pow => pow32,
        // NaN propagates, as in onnxruntime.
        Max => |a, b| {
            if a.is_nan() || b.is_nan() {
                f32::NAN
            } else {
                a.max(b)
            }
        },
        Min => |a, b| {
            if a.is_nan() || b.is_nan() {
                f32::NAN
            } else {
                a.min(b)
            }
        },
        Mod => |a, b| a % b,
        _ => unreachable!("not an arithmetic op"),
    }
}

/// `a^b`, exact for the squares and square roots that LayerNorm decompositions use.
fn pow32(a: f32, b: f32) -> f32 {
    if b == 2.0 {
        a * a
    } else if b == 0.5 {
        a.sqrt()
    } else if b == 1.0 {
        a
    } else if b == 3.0 {
        a * a * a
    } else {
        a.powf(b)
    }
}

fn cmp_f64(kind: BinaryKind, a: f64, b: f64) -> bool {
    use BinaryKind::*;
    match kind {
        Equal => a == b,
        Less => a < b,
        LessOrEqual => a <= b,
        Greater => a > b,
        GreaterOrEqual => a >= b,
        _ => unreachable!("not a comparison"),
    }
}

/// Integer arithmetic in i64; `None` on division by zero.
fn int_binary(kind: BinaryKind, a: i64, b: i64) -> Option<i64> {
    use BinaryKind::*;
    Some(match kind {
        Add => a.wrapping_add(b),
        Sub => a.wrapping_sub(b),
        Mul => a.wrapping_mul(b),
        Div => a.checked_div(b)?,
        // ONNX Mod with fmod=0: the sign of the divisor (Python semantics).
        Mod => {
            let r = a.checked_rem(b)?;
            if r != 0 && ((r < 0) != (b < 0)) {
                r + b
            } else {
                r
            }
        }
        Max => a.max(b),
        Min => a.min(b),
        Pow => {
            if b < 0 {
                return None;
            }
            a.wrapping_pow(b.min(u32::MAX as i64) as u32)
        }
        _ => unreachable!("not arithmetic"),
    })
}

/// Broadcasts two slices through `f`.
pub(crate) fn zip_broadcast<A: Clone, B: Clone, O>(
    op: &str,
    a: &[A],
    sa: &[usize],
    b: &[B],
    sb: &[usize],
    mut f: impl FnMut(A, B) -> O,
) -> Result<(Vec<O>, Vec<usize>)> {
    if sa == sb {
        return Ok((a.iter().zip(b).map(|(x, y)| f(x.clone(), y.clone())).collect(), sa.to_vec()));
    }
    let out = broadcast_shapes(op, &[sa, sb])?;
    let n = super::check_alloc(op, &out)?;
    if b.len() == 1 && a.len() == n {
        return Ok((a.iter().map(|x| f(x.clone(), b[0].clone())).collect(), out));
    }
    let (ta, tb) = (broadcast_strides(sa, &out), broadcast_strides(sb, &out));
    let mut v = Vec::with_capacity(n);
    for_each_broadcast(&out, [&ta, &tb], |[i, j]| v.push(f(a[i].clone(), b[j].clone())));
    Ok((v, out))
}

impl OpDef for Binary {
    const NAMES: &'static [&'static str] = BinaryKind::NAMES;

    fn name(&self) -> &'static str {
        self.kind.name()
    }

    fn from_attrs(name: &str, attrs: Json) -> Result<Self, String> {
        family(name, &attrs, BinaryKind::from_name).map(Binary::new)
    }

    fn arity(&self) -> Arity {
        Arity::exact(2, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let (a, b) = (req(self.name(), inputs, 0)?, req(self.name(), inputs, 1)?);
        if a.dtype != b.dtype && self.kind != BinaryKind::Pow {
            return Err(Error::op(self.name(), format!("input dtypes differ: {} and {}", a.dtype, b.dtype)));
        }
        if self.kind.is_logical() && a.dtype != DType::Bool {
            return Err(Error::op(self.name(), format!("expects bool, got {}", a.dtype)));
        }
        if self.kind == BinaryKind::Pow && a.dtype != DType::F32 && b.dtype == DType::F32 {
            return Err(Error::op("Pow", "an integer base needs an integer exponent"));
        }
        let shape = broadcast_dims(self.name(), &[&a.shape, &b.shape])?;
        let dtype = if self.kind.is_comparison() || self.kind.is_logical() { DType::Bool } else { a.dtype };
        let mut out = Fact::new(dtype, shape);
        if let (Some(va), Some(vb)) = (&a.value, &b.value) {
            if let Some(v) = self.sym_value(va, vb) {
                out = out.with_value(v);
            }
        }
        Ok(vec![out])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let name = self.name();
        let (a, b) = (req(name, inputs, 0)?, req(name, inputs, 1)?);
        let kind = self.kind;
        let (sa, sb) = (a.shape(), b.shape());
        let out = if kind.is_logical() {
            let (x, y) = (a.as_slice::<u8>()?, b.as_slice::<u8>()?);
            let f: fn(u8, u8) -> u8 = match kind {
                BinaryKind::And => |p, q| p & q,
                BinaryKind::Or => |p, q| p | q,
                _ => |p, q| p ^ q,
            };
            let (v, s) = zip_broadcast(name, x, sa, y, sb, f)?;
            Tensor::bool_from_u8(s, v)?
        } else if kind.is_comparison() {
            if a.dtype() != b.dtype() {
                return Err(Error::op(name, format!("input dtypes differ: {} and {}", a.dtype(), b.dtype())));
            }
            let (v, s) = if a.dtype() == DType::F32 {
                zip_broadcast(name, a.as_slice::<f32>()?, sa, b.as_slice::<f32>()?, sb, |p, q| {
                    u8::from(cmp_f64(kind, p as f64, q as f64))
                })?
            } else {
                let (x, y) = (a.to_i64s()?, b.to_i64s()?);
                zip_broadcast(name, &x, sa, &y, sb, |p, q| u8::from(cmp_i64(kind, p, q)))?
            };
            Tensor::bool_from_u8(s, v)?
        } else if a.dtype() == DType::F32 {
            let x = a.as_slice::<f32>()?;
            let (v, s) = if b.dtype() == DType::F32 {
                zip_broadcast(name, x, sa, b.as_slice::<f32>()?, sb, f32_binary(kind))?
            } else if kind == BinaryKind::Pow {
                let y: Vec<f32> = b.to_f64s()?.into_iter().map(|e| e as f32).collect();
                zip_broadcast(name, x, sa, &y, sb, pow32)?
            } else {
                return Err(Error::op(name, format!("input dtypes differ: f32 and {}", b.dtype())));
            };
            Tensor::new(s, v)?
        } else {
            if a.dtype() != b.dtype() && kind != BinaryKind::Pow {
                return Err(Error::op(name, format!("input dtypes differ: {} and {}", a.dtype(), b.dtype())));
            }
            let (x, y) = (a.to_i64s()?, b.to_i64s()?);
            let mut bad = false;
            let (v, s) = zip_broadcast(name, &x, sa, &y, sb, |p, q| {
                int_binary(kind, p, q).unwrap_or_else(|| {
                    bad = true;
                    0
                })
            })?;
            if bad {
                return Err(Error::op(name, "integer division by zero or negative exponent"));
            }
            cast_i64s(a.dtype(), s, v)?
        };
        Ok(vec![out])
    }
}

fn cmp_i64(kind: BinaryKind, a: i64, b: i64) -> bool {
    use BinaryKind::*;
    match kind {
        Equal => a == b,
        Less => a < b,
        LessOrEqual => a <= b,
        Greater => a > b,
        GreaterOrEqual => a >= b,
        _ => false,
    }
}

impl Binary {
    /// Symbolic evaluation on shape values (`sequence * 12`, `Equal(shape, -1)`...).
    fn sym_value(&self, a: &SymTensor, b: &SymTensor) -> Option<SymTensor> {
        use BinaryKind::*;
        let mut failed = false;
        let f = |x: &Dim, y: &Dim| -> Option<Dim> {
            match self.kind {
                Add => Some(x.add(y)),
                Sub => Some(x.sub(y)),
                Mul => Some(x.mul(y)),
                Div => match y.as_const() {
                    Some(k) if k > 0 => x.div_exact(y).or_else(|| x.as_const().map(|c| Dim::constant(c / k))),
                    _ => x.div_exact(y),
                },
                Equal => {
                    let below_one = |d: &Dim| d.as_const().is_some_and(|c| c < 1);
                    if x == y {
                        Some(Dim::constant(1))
                    } else if (x.is_const() && y.is_const())
                        || (x.is_positive() && below_one(y))
                        || (y.is_positive() && below_one(x))
                    {
                        // Sizes are at least 1, so a size never equals 0 or -1.
                        Some(Dim::constant(0))
                    } else {
                        None
                    }
                }
                _ => {
                    let (p, q) = (x.as_const()?, y.as_const()?);
                    if self.kind.is_comparison() {
                        Some(Dim::constant(i64::from(cmp_i64(self.kind, p, q))))
                    } else if self.kind.is_logical() {
                        let (p, q) = (p != 0, q != 0);
                        Some(Dim::constant(i64::from(match self.kind {
                            And => p && q,
                            Or => p || q,
                            _ => p ^ q,
                        })))
                    } else {
                        int_binary(self.kind, p, q).map(Dim::constant)
                    }
                }
            }
        };
        let (data, shape) = zip_broadcast(self.name(), &a.data, &a.shape, &b.data, &b.shape, |x, y| {
            f(&x, &y).unwrap_or_else(|| {
                failed = true;
                Dim::constant(0)
            })
        })
        .ok()?;
        (!failed).then(|| SymTensor::new(shape, data))
    }
}

/// `Where(cond, x, y)`: `x` where `cond` is true, else `y`, with broadcasting.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Where {}

impl OpDef for Where {
    const NAMES: &'static [&'static str] = &["Where"];

    fn arity(&self) -> Arity {
        Arity::exact(3, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let (c, x, y) = (req("Where", inputs, 0)?, req("Where", inputs, 1)?, req("Where", inputs, 2)?);
        if c.dtype != DType::Bool {
            return Err(Error::op("Where", format!("condition must be bool, got {}", c.dtype)));
        }
        if x.dtype != y.dtype {
            return Err(Error::op("Where", format!("branch dtypes differ: {} and {}", x.dtype, y.dtype)));
        }
        let shape = broadcast_dims("Where", &[&c.shape, &x.shape, &y.shape])?;
        let mut out = Fact::new(x.dtype, shape);
        if let (Some(vc), Some(vx), Some(vy)) = (&c.value, &x.value, &y.value) {
            if let Some(conds) = vc.as_consts() {
                let s = broadcast_shapes("Where", &[&vc.shape, &vx.shape, &vy.shape]).ok();
                if let Some(s) = s {
                    let (tc, tx, ty) = (
                        broadcast_strides(&vc.shape, &s),
                        broadcast_strides(&vx.shape, &s),
                        broadcast_strides(&vy.shape, &s),
                    );
                    let mut data = Vec::new();
                    for_each_broadcast(&s, [&tc, &tx, &ty], |[i, j, k]| {
                        data.push(if conds[i] != 0 { vx.data[j].clone() } else { vy.data[k].clone() })
                    });
                    out = out.with_value(SymTensor::new(s, data));
                }
            }
        }
        Ok(vec![out])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let (c, x, y) = (req("Where", inputs, 0)?, req("Where", inputs, 1)?, req("Where", inputs, 2)?);
        if x.dtype() != y.dtype() {
            return Err(Error::op("Where", format!("branch dtypes differ: {} and {}", x.dtype(), y.dtype())));
        }
        let cond = c.as_slice::<u8>().map_err(|_| Error::op("Where", "condition must be bool"))?;
        let s = broadcast_shapes("Where", &[c.shape(), x.shape(), y.shape()])?;
        super::check_alloc("Where", &s)?;
        let (tc, tx, ty) =
            (broadcast_strides(c.shape(), &s), broadcast_strides(x.shape(), &s), broadcast_strides(y.shape(), &s));
        crate::with_dtype!(x.dtype(), T => {
            let (xs, ys) = (x.as_slice::<T>()?, y.as_slice::<T>()?);
            let mut v: Vec<T> = Vec::with_capacity(s.iter().product());
            for_each_broadcast(&s, [&tc, &tx, &ty], |[i, j, k]| v.push(if cond[i] != 0 { xs[j] } else { ys[k] }));
            Ok(vec![tensor_of(x.dtype(), s, v)?])
        })
    }
}

/// Element type conversion (`as` semantics: float to int truncates toward zero and saturates).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cast {
    pub to: DType,
}

fn convert<S: Element, D: Element>(v: &[S]) -> Vec<D> {
    v.iter().map(|&x| D::from_f64(x.to_f64())).collect()
}

/// Converts a tensor to another dtype.
pub fn cast_tensor(x: &Tensor, to: DType) -> Result<Tensor> {
    if x.dtype() == to {
        return Ok(x.clone());
    }
    let shape = x.shape().to_vec();
    if to == DType::Bool {
        let v: Vec<u8> =
            crate::with_dtype!(x.dtype(), T => x.as_slice::<T>()?.iter().map(|&e| u8::from(e.is_nonzero())).collect());
        return Tensor::bool_from_u8(shape, v);
    }
    // i64 to narrower ints wraps (C semantics); through f64 it would saturate.
    if x.dtype() == DType::I64 && to.is_int() {
        return cast_i64s(to, shape, x.as_slice::<i64>()?.to_vec());
    }
    crate::with_dtype!(x.dtype(), S => {
        let src = x.as_slice::<S>()?;
        crate::with_dtype!(to, D => Tensor::new(shape, convert::<S, D>(src)))
    })
}

impl OpDef for Cast {
    const NAMES: &'static [&'static str] = &["Cast"];

    fn arity(&self) -> Arity {
        Arity::exact(1, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let x = req("Cast", inputs, 0)?;
        let mut out = Fact::new(self.to, x.shape.clone());
        if let Some(v) = &x.value {
            if self.to == DType::Bool {
                if let Some(c) = v.as_consts() {
                    let data = c.into_iter().map(|e| Dim::constant(i64::from(e != 0))).collect();
                    out = out.with_value(SymTensor::new(v.shape.clone(), data));
                }
            } else if self.to == DType::I64 || self.to == DType::I32 {
                out = out.with_value((**v).clone());
            }
        }
        Ok(vec![out])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        Ok(vec![cast_tensor(req("Cast", inputs, 0)?, self.to)?])
    }
}

/// `Clip(x, min?, max?)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Clip {}

impl OpDef for Clip {
    const NAMES: &'static [&'static str] = &["Clip"];

    fn arity(&self) -> Arity {
        Arity::range(1, 3, 1)
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        let x = req("Clip", inputs, 0)?;
        for b in inputs[1..].iter().flatten() {
            if b.dtype != x.dtype {
                return Err(Error::op("Clip", format!("bound dtype {} differs from input {}", b.dtype, x.dtype)));
            }
        }
        Ok(vec![Fact::new(x.dtype, x.shape.clone())])
    }

    fn eval(&self, _: &EvalContext, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let x = req("Clip", inputs, 0)?;
        let bound = |i: usize| -> Result<Option<f64>> {
            match inputs.get(i).copied().flatten() {
                None => Ok(None),
                Some(t) if t.len() == 1 => Ok(Some(t.to_f64s()?[0])),
                Some(t) => Err(Error::op("Clip", format!("bounds must be scalars, got shape {:?}", t.shape()))),
            }
        };
        let (lo, hi) = (bound(1)?, bound(2)?);
        crate::with_dtype!(x.dtype(), T => {
            let lo = lo.map(T::from_f64);
            let hi = hi.map(T::from_f64);
            let v: Vec<T> = x.as_slice::<T>()?.iter().map(|&e| {
                let mut e = e;
                if let Some(l) = lo { if e < l { e = l; } }
                if let Some(h) = hi { if e > h { e = h; } }
                e
            }).collect();
            Ok(vec![tensor_of(x.dtype(), x.shape().to_vec(), v)?])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor::new(shape.to_vec(), v.to_vec()).unwrap()
    }

    fn run(op: impl Into<super::super::Op>, inputs: &[&Tensor]) -> Tensor {
        let op = op.into();
        let ins: Vec<Option<&Tensor>> = inputs.iter().map(|t| Some(*t)).collect();
        op.eval(&EvalContext::default(), &ins).unwrap().remove(0)
    }

    #[test]
    fn add_broadcasts_a_bias_row() {
        let y =
            run(Binary::new(BinaryKind::Add), &[&f(&[2, 3], &[1., 2., 3., 4., 5., 6.]), &f(&[3], &[10., 20., 30.])]);
        assert_eq!(y.shape(), &[2, 3]);
        assert_eq!(y.as_slice::<f32>().unwrap(), &[11., 22., 33., 14., 25., 36.]);
    }

    #[test]
    fn integer_division_by_zero_is_an_error() {
        let a = Tensor::new(vec![1], vec![4i64]).unwrap();
        let z = Tensor::new(vec![1], vec![0i64]).unwrap();
        let op: super::super::Op = Binary::new(BinaryKind::Div).into();
        assert!(op.eval(&EvalContext::default(), &[Some(&a), Some(&z)]).is_err());
    }

    #[test]
    fn comparisons_give_bools() {
        let a = Tensor::new(vec![3], vec![1i64, 5, 3]).unwrap();
        let b = Tensor::new(vec![], vec![3i64]).unwrap();
        let y = run(Binary::new(BinaryKind::GreaterOrEqual), &[&a, &b]);
        assert_eq!(y.dtype(), DType::Bool);
        assert_eq!(y.as_slice::<u8>().unwrap(), &[0, 1, 1]);
    }

    #[test]
    fn round_is_half_to_even() {
        let cases = [(0.5f32, 0f32), (1.5, 2.), (2.5, 2.), (-0.5, -0.), (-1.5, -2.), (2.4, 2.), (2.6, 3.)];
        for (x, want) in cases {
            assert_eq!(round_half_even(x), want, "{x}");
        }
    }

    #[test]
    fn cast_truncates_and_saturates() {
        let x = f(&[4], &[1.7, -1.7, 1e20, f32::NAN]);
        let y = cast_tensor(&x, DType::I32).unwrap();
        assert_eq!(y.as_slice::<i32>().unwrap(), &[1, -1, i32::MAX, 0]);
        let y = cast_tensor(&Tensor::new(vec![2], vec![300i64, -1]).unwrap(), DType::U8).unwrap();
        assert_eq!(y.as_slice::<u8>().unwrap(), &[44, 255]);
    }

    #[test]
    fn where_selects_with_broadcast() {
        let c = Tensor::from_bools(vec![2, 1], vec![true, false]).unwrap();
        let y = run(Where {}, &[&c, &f(&[2], &[1., 2.]), &f(&[], &[0.])]);
        assert_eq!(y.as_slice::<f32>().unwrap(), &[1., 2., 0., 0.]);
    }

    #[test]
    fn symbolic_shape_arithmetic() {
        let s = SymTensor::new(vec![2], vec![Dim::sym("batch"), Dim::sym("seq")]);
        let k = SymTensor::new(vec![], vec![Dim::constant(12)]);
        let v = Binary::new(BinaryKind::Mul).sym_value(&s, &k).unwrap();
        assert_eq!(v.data, vec![Dim::parse("12*batch").unwrap(), Dim::parse("12*seq").unwrap()]);
        assert!(Binary::new(BinaryKind::Equal).sym_value(&s, &k).is_none());
        // `Equal(Shape(x), -1)`, as exporters write to resolve -1 in a reshape target: a size is
        // never -1.
        let minus = SymTensor::new(vec![2], vec![Dim::constant(-1), Dim::constant(-1)]);
        let v = Binary::new(BinaryKind::Equal).sym_value(&s, &minus).unwrap();
        assert_eq!(v.as_consts(), Some(vec![0, 0]));
    }
}

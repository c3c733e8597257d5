//! Helpers for writing Cranelift IR: loops, loads and stores, and vectorizable math (exp, erf,
//! tanh) as polynomials, emitted for `F32` or `F32X4` values alike.

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::immediates::Ieee32;
use cranelift_codegen::ir::{types, InstBuilder, MemFlagsData, Type, Value};
use cranelift_frontend::{FunctionBuilder, Variable};

/// Flags for loads and stores of tensor data: may be unaligned, never trap (addresses are
/// computed from validated shapes).
pub fn mem() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

pub struct Emitter<'a, 'b> {
    pub b: &'a mut FunctionBuilder<'b>,
    /// Whether fused multiply-add may be used (the ISA has FMA).
    pub fma: bool,
    /// Constants materialized once at the function's entry (see [`Emitter::preload`]).
    consts: std::collections::HashMap<(Type, u32), Value>,
}

/// Every constant the math functions use.
const MATH_CONSTANTS: &[f32] = &[
    -86.0,
    4.0,
    88.37626,
    std::f32::consts::LOG2_E,
    12_582_912.0,
    -0.693_359_4,
    2.121_944_4e-4,
    0.5,
    1.666_666_5e-1,
    4.166_579_6e-2,
    8.333_452e-3,
    1.398_2e-3,
    1.987_569_1e-4,
    1.0,
    2.0,
    0.0,
    -0.0,
    0.327_591_1,
    0.254_829_6,
    -0.284_496_72,
    1.421_413_8,
    -1.453_152,
    1.061_405_4,
];

impl<'a, 'b> Emitter<'a, 'b> {
    pub fn new(b: &'a mut FunctionBuilder<'b>, fma: bool) -> Self {
        Emitter { b, fma, consts: Default::default() }
    }

    /// Materializes constants here (call it at the function's entry, before any loop) so that
    /// loops reuse them instead of re-materializing them every iteration. The JIT compiles
    /// without Cranelift's e-graph optimizations, which would sink them back into the loops.
    pub fn preload(&mut self, ty: Type, values: &[f32]) {
        for &v in values {
            if !self.consts.contains_key(&(ty, v.to_bits())) {
                let c = self.materialize(ty, v);
                self.consts.insert((ty, v.to_bits()), c);
            }
        }
    }

    /// Preloads the constants of `exp`, `erf`, `tanh` for `F32` and `F32X4`.
    pub fn preload_math(&mut self) {
        self.preload(types::F32X4, MATH_CONSTANTS);
        self.preload(types::F32, MATH_CONSTANTS);
    }

    fn materialize(&mut self, ty: Type, v: f32) -> Value {
        let s = self.b.ins().f32const(Ieee32::with_float(v));
        if ty == types::F32 {
            s
        } else {
            self.b.ins().splat(ty, s)
        }
    }

    pub fn i64(&mut self, v: i64) -> Value {
        self.b.ins().iconst(types::I64, v)
    }

    /// A constant of type `ty` (`F32` or `F32X4`): the preloaded one, or materialized here.
    pub fn fconst(&mut self, ty: Type, v: f32) -> Value {
        match self.consts.get(&(ty, v.to_bits())) {
            Some(&c) => c,
            None => self.materialize(ty, v),
        }
    }

    pub fn load_i64(&mut self, base: Value, offset: i32) -> Value {
        self.b.ins().load(types::I64, mem(), base, offset)
    }

    /// `base + index * scale`.
    pub fn addr(&mut self, base: Value, index: Value, scale: i64) -> Value {
        let off = self.b.ins().imul_imm_s(index, scale);
        self.b.ins().iadd(base, off)
    }

    pub fn min(&mut self, a: Value, b: Value) -> Value {
        let lt = self.b.ins().icmp(IntCC::SignedLessThan, a, b);
        self.b.ins().select(lt, a, b)
    }

    /// A new I64 variable holding `init`.
    pub fn var(&mut self, init: Value) -> Variable {
        let v = self.b.declare_var(types::I64);
        self.b.def_var(v, init);
        v
    }

    /// `while use(var) < end { body(var value); }` where the body advances the variable itself.
    pub fn while_lt(&mut self, var: Variable, end: Value, body: impl FnOnce(&mut Self, Value)) {
        let header = self.b.create_block();
        let body_block = self.b.create_block();
        let exit = self.b.create_block();
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(header);
        let i = self.b.use_var(var);
        let c = self.b.ins().icmp(IntCC::SignedLessThan, i, end);
        self.b.ins().brif(c, body_block, &[], exit, &[]);
        self.b.switch_to_block(body_block);
        body(self, i);
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(exit);
    }

    /// `for i in begin..end step step { body(i) }`.
    pub fn for_range(&mut self, begin: Value, end: Value, step: i64, body: impl FnOnce(&mut Self, Value)) {
        let var = self.var(begin);
        self.while_lt(var, end, |e, i| {
            body(e, i);
            let next = e.b.ins().iadd_imm_s(i, step);
            e.b.def_var(var, next);
        });
    }

    /// `if cond { then() }`.
    pub fn if_then(&mut self, cond: Value, then: impl FnOnce(&mut Self)) {
        let then_block = self.b.create_block();
        let join = self.b.create_block();
        self.b.ins().brif(cond, then_block, &[], join, &[]);
        self.b.switch_to_block(then_block);
        then(self);
        self.b.ins().jump(join, &[]);
        self.b.switch_to_block(join);
    }

    /// Passes values through a block parameter, so that computations on them stay where they
    /// are: Cranelift's elaboration otherwise re-computes a pure value at each use, which
    /// moves loop-invariant work (a row's max, its reciprocal sum) into the loops using it.
    pub fn barrier(&mut self, values: &[Value]) -> Vec<Value> {
        let block = self.b.create_block();
        let mut params = Vec::with_capacity(values.len());
        for &v in values {
            let ty = self.b.func.dfg.value_type(v);
            params.push(self.b.append_block_param(block, ty));
        }
        let args: Vec<cranelift_codegen::ir::BlockArg> = values.iter().map(|&v| v.into()).collect();
        self.b.ins().jump(block, &args);
        self.b.switch_to_block(block);
        params
    }

    /// `mask ? a : b` lane-wise, for the mask of an `fcmp` of type `ty`.
    pub fn blend(&mut self, ty: Type, mask: Value, a: Value, b: Value) -> Value {
        if ty == types::F32 {
            self.b.ins().select(mask, a, b)
        } else {
            let m = self.b.ins().bitcast(ty, mem_bitcast(), mask);
            self.b.ins().bitselect(m, a, b)
        }
    }

    /// `x < lo ? lo : x`, one compare and one blend (`fmax` lowers to a NaN-exact sequence).
    pub fn clamp_below(&mut self, ty: Type, x: Value, lo: Value) -> Value {
        let lt = self.b.ins().fcmp(FloatCC::LessThan, x, lo);
        self.blend(ty, lt, lo, x)
    }

    /// `x > hi ? hi : x`.
    pub fn clamp_above(&mut self, ty: Type, x: Value, hi: Value) -> Value {
        let gt = self.b.ins().fcmp(FloatCC::GreaterThan, x, hi);
        self.blend(ty, gt, hi, x)
    }

    /// The larger of `acc` and `x`, keeping `acc` when `x` is NaN (as `f32::max` does).
    pub fn max_ignore_nan(&mut self, ty: Type, acc: Value, x: Value) -> Value {
        let gt = self.b.ins().fcmp(FloatCC::GreaterThan, x, acc);
        self.blend(ty, gt, x, acc)
    }

    pub fn fadd(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fadd(a, b)
    }

    pub fn fsub(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fsub(a, b)
    }

    pub fn fmul(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fmul(a, b)
    }

    pub fn fdiv(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fdiv(a, b)
    }

    /// `a * b + c`, fused when the ISA can.
    pub fn fmadd(&mut self, a: Value, b: Value, c: Value) -> Value {
        if self.fma {
            self.b.ins().fma(a, b, c)
        } else {
            let p = self.b.ins().fmul(a, b);
            self.b.ins().fadd(p, c)
        }
    }

    /// `c0 + x*(c1 + x*(c2 + ...))` (coefficients from the constant term up).
    pub fn poly(&mut self, ty: Type, x: Value, coeffs: &[f32]) -> Value {
        let mut acc = self.fconst(ty, *coeffs.last().expect("coefficients"));
        for &c in coeffs.iter().rev().skip(1) {
            let cv = self.fconst(ty, c);
            acc = self.fmadd(acc, x, cv);
        }
        acc
    }

    /// `exp(x)`: Cody-Waite range reduction to `x = n ln 2 + r`, Cephes' polynomial for
    /// `exp(r)`, and `2^n` built in the exponent bits. `n` is rounded by adding and subtracting
    /// 1.5 * 2^23, which also leaves `n` in the low bits of the sum. Relative error about 2 ulp
    /// on `[-86, 88]`; clamped outside (so results are never denormal: `exp(-86)` is 4e-38,
    /// and arithmetic on denormals is two orders of magnitude slower).
    pub fn exp(&mut self, ty: Type, x: Value) -> Value {
        let int_ty = if ty == types::F32 { types::I32 } else { types::I32X4 };
        let lo = self.fconst(ty, -86.0);
        let hi = self.fconst(ty, 88.37626);
        let x = self.clamp_below(ty, x, lo);
        let x = self.clamp_above(ty, x, hi);
        let log2e = self.fconst(ty, std::f32::consts::LOG2_E);
        let magic = self.fconst(ty, 12_582_912.0);
        let t = self.fmadd(x, log2e, magic);
        let n = self.fsub(t, magic);
        let c1 = self.fconst(ty, -0.693_359_4);
        let c2 = self.fconst(ty, 2.121_944_4e-4);
        let r = self.fmadd(n, c1, x);
        let r = self.fmadd(n, c2, r);
        let p = self.poly(ty, r, &[0.5, 1.666_666_5e-1, 4.166_579_6e-2, 8.333_452e-3, 1.398_2e-3, 1.987_569_1e-4]);
        let r2 = self.fmul(r, r);
        let one = self.fconst(ty, 1.0);
        let q = self.fmadd(p, r2, r);
        let y = self.fadd(q, one);
        // 2^n: the low bits of `t` hold n + 0x400000; shifted into the exponent field they add
        // n to the exponent of y (the 0x400000 part shifts out).
        let tb = self.b.ins().bitcast(int_ty, mem_bitcast(), t);
        let e = self.b.ins().ishl_imm_s(tb, 23);
        let yb = self.b.ins().bitcast(int_ty, mem_bitcast(), y);
        let sum = self.b.ins().iadd(yb, e);
        self.b.ins().bitcast(ty, mem_bitcast(), sum)
    }

    /// `erf(x)` by Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7). `|x|` is
    /// clamped to 4 (where erf is 1 in f32), which keeps `exp(-x^2)` away from denormals.
    pub fn erf(&mut self, ty: Type, x: Value) -> Value {
        let a = self.b.ins().fabs(x);
        let four = self.fconst(ty, 4.0);
        let a = self.clamp_above(ty, a, four);
        let p = self.fconst(ty, 0.327_591_1);
        let one = self.fconst(ty, 1.0);
        let d = self.fmadd(p, a, one);
        let t = self.fdiv(one, d);
        let poly = self.poly(ty, t, &[0.254_829_6, -0.284_496_72, 1.421_413_8, -1.453_152, 1.061_405_4]);
        let pt = self.fmul(poly, t);
        let a2 = self.fmul(a, a);
        let na2 = self.b.ins().fneg(a2);
        let e = self.exp(ty, na2);
        let pe = self.fmul(pt, e);
        let y = self.fsub(one, pe);
        self.copysign(ty, y, x)
    }

    /// `|y|` with the sign of `x` (x64 lowers `fcopysign` only for scalars).
    pub fn copysign(&mut self, ty: Type, y: Value, x: Value) -> Value {
        if ty == types::F32 {
            self.b.ins().fcopysign(y, x)
        } else {
            let sign = self.fconst(ty, -0.0);
            self.b.ins().bitselect(sign, x, y)
        }
    }

    /// `tanh(x) = sign(x) (1 - 2 / (exp(2|x|) + 1))`.
    pub fn tanh(&mut self, ty: Type, x: Value) -> Value {
        let a = self.b.ins().fabs(x);
        let a2 = self.fadd(a, a);
        let e = self.exp(ty, a2);
        let one = self.fconst(ty, 1.0);
        let two = self.fconst(ty, 2.0);
        let d = self.fadd(e, one);
        let q = self.fdiv(two, d);
        let y = self.fsub(one, q);
        self.copysign(ty, y, x)
    }

    /// `1 / (1 + exp(-x))`.
    pub fn sigmoid(&mut self, ty: Type, x: Value) -> Value {
        let nx = self.b.ins().fneg(x);
        let e = self.exp(ty, nx);
        let one = self.fconst(ty, 1.0);
        let d = self.fadd(e, one);
        self.fdiv(one, d)
    }

    /// Horizontal sum of an `F32X4`.
    pub fn hsum(&mut self, v: Value) -> Value {
        let mut s = self.b.ins().extractlane(v, 0u8);
        for l in 1u8..4 {
            let x = self.b.ins().extractlane(v, l);
            s = self.b.ins().fadd(s, x);
        }
        s
    }

    /// Horizontal max of an `F32X4` (NaN lanes ignored, as `f32::max` does).
    pub fn hmax(&mut self, v: Value) -> Value {
        let mut s = self.b.ins().extractlane(v, 0u8);
        for l in 1u8..4 {
            let x = self.b.ins().extractlane(v, l);
            s = self.max_ignore_nan(types::F32, s, x);
        }
        s
    }

    /// `x > 0 ? x : 0`, with NaN mapping to 0 as the reference `Relu` does.
    pub fn relu(&mut self, ty: Type, x: Value) -> Value {
        let z = self.fconst(ty, 0.0);
        let gt = self.b.ins().fcmp(FloatCC::GreaterThan, x, z);
        self.blend(ty, gt, x, z)
    }
}

fn mem_bitcast() -> MemFlagsData {
    MemFlagsData::new()
}

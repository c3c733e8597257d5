//! Generated row-wise kernels: softmax and layer normalization over the last axis of
//! contiguous rows, four lanes at a time with a scalar tail.

use super::emit::{mem, Emitter};
use cranelift_codegen::ir::{types, InstBuilder, Value};

/// Calls `vec(j)` for `j = 0, 4, 8, ...` while `j + 4 <= len`, then `scalar(j)` for the rest.
fn for_lanes(
    e: &mut Emitter,
    len: Value,
    mut vec: impl FnMut(&mut Emitter, Value),
    mut scalar: impl FnMut(&mut Emitter, Value),
) {
    let zero = e.i64(0);
    let j = e.var(zero);
    let len3 = e.b.ins().iadd_imm_s(len, -3);
    e.while_lt(j, len3, |e, jv| {
        vec(e, jv);
        let next = e.b.ins().iadd_imm_s(jv, 4);
        e.b.def_var(j, next);
    });
    e.while_lt(j, len, |e, jv| {
        scalar(e, jv);
        let next = e.b.ins().iadd_imm_s(jv, 1);
        e.b.def_var(j, next);
    });
}

/// An F32X4 and an F32 accumulator, combined by `hsum`/`hmax` at the end.
struct Acc {
    v: cranelift_frontend::Variable,
    s: cranelift_frontend::Variable,
}

impl Acc {
    fn new(e: &mut Emitter, init: f32) -> Acc {
        let v = e.b.declare_var(types::F32X4);
        let s = e.b.declare_var(types::F32);
        let iv = e.fconst(types::F32X4, init);
        let is = e.fconst(types::F32, init);
        e.b.def_var(v, iv);
        e.b.def_var(s, is);
        Acc { v, s }
    }
}

/// `softmax(x, y, rows, len)`: each row of `len` floats of `x` to the same row of `y`.
pub fn emit_softmax(e: &mut Emitter, params: &[Value]) {
    let (x, y, rows, len) = (params[0], params[1], params[2], params[3]);
    let zero = e.i64(0);
    let row_bytes = e.b.ins().imul_imm_s(len, 4);
    e.for_range(zero, rows, 1, |e, r| {
        let off = e.b.ins().imul(r, row_bytes);
        let xr = e.b.ins().iadd(x, off);
        let yr = e.b.ins().iadd(y, off);
        let mx = Acc::new(e, f32::NEG_INFINITY);
        for_lanes(
            e,
            len,
            |e, j| {
                let p = e.addr(xr, j, 4);
                let v = e.b.ins().load(types::F32X4, mem(), p, 0);
                let a = e.b.use_var(mx.v);
                let m = e.max_ignore_nan(types::F32X4, a, v);
                e.b.def_var(mx.v, m);
            },
            |e, j| {
                let p = e.addr(xr, j, 4);
                let v = e.b.ins().load(types::F32, mem(), p, 0);
                let a = e.b.use_var(mx.s);
                let m = e.max_ignore_nan(types::F32, a, v);
                e.b.def_var(mx.s, m);
            },
        );
        let mv = e.b.use_var(mx.v);
        let ms = e.b.use_var(mx.s);
        let hm = e.hmax(mv);
        let m = e.max_ignore_nan(types::F32, hm, ms);
        let m4 = e.b.ins().splat(types::F32X4, m);
        let [m, m4] = e.barrier(&[m, m4])[..] else { unreachable!() };
        let sum = Acc::new(e, 0.0);
        for_lanes(
            e,
            len,
            |e, j| {
                let p = e.addr(xr, j, 4);
                let v = e.b.ins().load(types::F32X4, mem(), p, 0);
                let d = e.fsub(v, m4);
                let ex = e.exp(types::F32X4, d);
                let q = e.addr(yr, j, 4);
                e.b.ins().store(mem(), ex, q, 0);
                let a = e.b.use_var(sum.v);
                let s = e.fadd(a, ex);
                e.b.def_var(sum.v, s);
            },
            |e, j| {
                let p = e.addr(xr, j, 4);
                let v = e.b.ins().load(types::F32, mem(), p, 0);
                let d = e.fsub(v, m);
                let ex = e.exp(types::F32, d);
                let q = e.addr(yr, j, 4);
                e.b.ins().store(mem(), ex, q, 0);
                let a = e.b.use_var(sum.s);
                let s = e.fadd(a, ex);
                e.b.def_var(sum.s, s);
            },
        );
        let sv = e.b.use_var(sum.v);
        let ss = e.b.use_var(sum.s);
        let hs = e.hsum(sv);
        let total = e.fadd(hs, ss);
        let one = e.fconst(types::F32, 1.0);
        let inv = e.fdiv(one, total);
        let inv4 = e.b.ins().splat(types::F32X4, inv);
        let [inv, inv4] = e.barrier(&[inv, inv4])[..] else { unreachable!() };
        for_lanes(
            e,
            len,
            |e, j| {
                let q = e.addr(yr, j, 4);
                let v = e.b.ins().load(types::F32X4, mem(), q, 0);
                let w = e.fmul(v, inv4);
                e.b.ins().store(mem(), w, q, 0);
            },
            |e, j| {
                let q = e.addr(yr, j, 4);
                let v = e.b.ins().load(types::F32, mem(), q, 0);
                let w = e.fmul(v, inv);
                e.b.ins().store(mem(), w, q, 0);
            },
        );
    });
}

/// `layernorm(x, gamma, beta, y, rows, len, epsilon)`: `beta` may be null.
pub fn emit_layernorm(e: &mut Emitter, params: &[Value]) {
    let (x, gamma, beta, y, rows, len, eps) =
        (params[0], params[1], params[2], params[3], params[4], params[5], params[6]);
    let zero = e.i64(0);
    let row_bytes = e.b.ins().imul_imm_s(len, 4);
    let lenf = e.b.ins().fcvt_from_sint(types::F32, len);
    let has_beta = e.b.ins().icmp_imm_s(cranelift_codegen::ir::condcodes::IntCC::NotEqual, beta, 0);
    e.for_range(zero, rows, 1, |e, r| {
        let off = e.b.ins().imul(r, row_bytes);
        let xr = e.b.ins().iadd(x, off);
        let yr = e.b.ins().iadd(y, off);
        // Mean.
        let sum = Acc::new(e, 0.0);
        for_lanes(
            e,
            len,
            |e, j| {
                let p = e.addr(xr, j, 4);
                let v = e.b.ins().load(types::F32X4, mem(), p, 0);
                let a = e.b.use_var(sum.v);
                let s = e.fadd(a, v);
                e.b.def_var(sum.v, s);
            },
            |e, j| {
                let p = e.addr(xr, j, 4);
                let v = e.b.ins().load(types::F32, mem(), p, 0);
                let a = e.b.use_var(sum.s);
                let s = e.fadd(a, v);
                e.b.def_var(sum.s, s);
            },
        );
        let sv = e.b.use_var(sum.v);
        let ss = e.b.use_var(sum.s);
        let hs = e.hsum(sv);
        let total = e.fadd(hs, ss);
        let mean = e.fdiv(total, lenf);
        let mean4 = e.b.ins().splat(types::F32X4, mean);
        let [mean, mean4] = e.barrier(&[mean, mean4])[..] else { unreachable!() };
        // Variance, two-pass.
        let sq = Acc::new(e, 0.0);
        for_lanes(
            e,
            len,
            |e, j| {
                let p = e.addr(xr, j, 4);
                let v = e.b.ins().load(types::F32X4, mem(), p, 0);
                let d = e.fsub(v, mean4);
                let a = e.b.use_var(sq.v);
                let s = e.fmadd(d, d, a);
                e.b.def_var(sq.v, s);
            },
            |e, j| {
                let p = e.addr(xr, j, 4);
                let v = e.b.ins().load(types::F32, mem(), p, 0);
                let d = e.fsub(v, mean);
                let a = e.b.use_var(sq.s);
                let s = e.fmadd(d, d, a);
                e.b.def_var(sq.s, s);
            },
        );
        let qv = e.b.use_var(sq.v);
        let qs = e.b.use_var(sq.s);
        let hq = e.hsum(qv);
        let q = e.fadd(hq, qs);
        let var = e.fdiv(q, lenf);
        let ve = e.fadd(var, eps);
        let sd = e.b.ins().sqrt(ve);
        let one = e.fconst(types::F32, 1.0);
        let inv = e.fdiv(one, sd);
        let inv4 = e.b.ins().splat(types::F32X4, inv);
        let [inv, inv4] = e.barrier(&[inv, inv4])[..] else { unreachable!() };
        let zero4 = e.fconst(types::F32X4, 0.0);
        let zero1 = e.fconst(types::F32, 0.0);
        for_lanes(
            e,
            len,
            |e, j| {
                let p = e.addr(xr, j, 4);
                let v = e.b.ins().load(types::F32X4, mem(), p, 0);
                let d = e.fsub(v, mean4);
                let n = e.fmul(d, inv4);
                let gp = e.addr(gamma, j, 4);
                let g = e.b.ins().load(types::F32X4, mem(), gp, 0);
                let bv = e.b.declare_var(types::F32X4);
                e.b.def_var(bv, zero4);
                e.if_then(has_beta, |e| {
                    let bp = e.addr(beta, j, 4);
                    let b = e.b.ins().load(types::F32X4, mem(), bp, 0);
                    e.b.def_var(bv, b);
                });
                let b = e.b.use_var(bv);
                let out = e.fmadd(n, g, b);
                let q = e.addr(yr, j, 4);
                e.b.ins().store(mem(), out, q, 0);
            },
            |e, j| {
                let p = e.addr(xr, j, 4);
                let v = e.b.ins().load(types::F32, mem(), p, 0);
                let d = e.fsub(v, mean);
                let n = e.fmul(d, inv);
                let gp = e.addr(gamma, j, 4);
                let g = e.b.ins().load(types::F32, mem(), gp, 0);
                let bv = e.b.declare_var(types::F32);
                e.b.def_var(bv, zero1);
                e.if_then(has_beta, |e| {
                    let bp = e.addr(beta, j, 4);
                    let b = e.b.ins().load(types::F32, mem(), bp, 0);
                    e.b.def_var(bv, b);
                });
                let b = e.b.use_var(bv);
                let out = e.fmadd(n, g, b);
                let q = e.addr(yr, j, 4);
                e.b.ins().store(mem(), out, q, 0);
            },
        );
    });
}

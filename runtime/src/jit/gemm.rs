//! Generated GEMM code: the loop nest around the micro-kernels with the fused epilogue, the
//! portable (128-bit) micro-kernel, and the packing of activation matrices into panels.

use super::emit::{mem, Emitter};
use crate::kernels::NR;
use crate::op::{BinaryKind, EpiOp, Epilogue, UnaryKind};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, AbiParam, Endianness, InstBuilder, MemFlagsData, Signature, Type, Value};
use cranelift_codegen::isa::CallConv;

/// Arguments of a generated GEMM driver, read by the generated code at fixed offsets.
///
/// The driver computes panels `panel_begin..panel_end` of `C[m x n] = epilogue(A[m x k] .
/// B[k x n])`, `B` packed in panels of `NR` columns (`k * NR` floats each). It walks the blocks
/// of `kc` rows of those panels panel by panel, or, with `k_outer`, block row by block row
/// (every panel's first block, then every panel's second...), which keeps one block of A
/// in L2 when the whole of A would not fit ([`k_outer_pays`]).
#[repr(C)]
#[derive(Debug)]
pub struct GemmArgs {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: *const f32,
    pub lda: usize,
    pub b: *const f32,
    pub c: *mut f32,
    pub ldc: usize,
    pub panel_begin: usize,
    pub panel_end: usize,
    pub kernel: usize,
    pub mr: usize,
    pub kc: usize,
    pub operands: *const EpiOperand,
    /// A native epilogue (`kernels::avx512_vec::tile_epilogue`) to call on each finished tile
    /// instead of the generated one, or 0.
    pub epilogue_fn: usize,
    pub epilogue_ctx: *const u8,
    /// Non-zero: block rows outermost (see above).
    pub k_outer: usize,
    /// Floats from one packed panel to the next: `k * NR` for a whole product, more when it
    /// runs on rows `k0..k0+k` of the panels (`b` pointing at row `k0` of the first).
    pub panel_stride: usize,
}

/// Whether a product reads A better block row by block row: when `A` (`m x k` floats) is
/// larger than about half of a core's L2, sweeping all of it once per panel evicts it.
pub fn k_outer_pays(m: usize, k: usize, kc: usize) -> bool {
    k > kc && m * k * 4 > 1 << 20
}

/// An extra input of the epilogue: element `(i, j)` of the tile is at `ptr + i * row_stride + j`
/// (or `ptr + i * row_stride` for inputs that broadcast along columns).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EpiOperand {
    pub ptr: *const f32,
    pub row_stride: usize,
}

const W: i64 = 8; // bytes per GemmArgs field

/// The signature of the micro-kernels (`kernels::MicroKernel`).
pub fn micro_kernel_sig(call_conv: CallConv) -> Signature {
    let mut s = Signature::new(call_conv);
    for _ in 0..8 {
        s.params.push(AbiParam::new(types::I64));
    }
    s.params.push(AbiParam::new(types::I32));
    s.params.push(AbiParam::new(types::I64));
    s.params.push(AbiParam::new(types::I64));
    s
}

/// The signature of a native tile epilogue: `(ctx, c, ldc, row, rows, n0, cols)`.
pub fn epilogue_sig(call_conv: CallConv) -> Signature {
    let mut s = Signature::new(call_conv);
    for _ in 0..7 {
        s.params.push(AbiParam::new(types::I64));
    }
    s
}

/// Emits the epilogue program for one element or one vector of four.
pub fn emit_program(e: &mut Emitter, ty: Type, prog: &Epilogue, acc: Value, inputs: &[Value]) -> Value {
    let mut regs: Vec<Value> = Vec::with_capacity(prog.0.len());
    for op in &prog.0 {
        let v = match *op {
            EpiOp::Acc => acc,
            EpiOp::Input(i) => inputs[i],
            EpiOp::Const(c) => e.fconst(ty, c),
            EpiOp::Unary(k, a) => {
                let x = regs[a];
                match k {
                    UnaryKind::Identity => x,
                    UnaryKind::Neg => e.b.ins().fneg(x),
                    UnaryKind::Abs => e.b.ins().fabs(x),
                    UnaryKind::Sqrt => e.b.ins().sqrt(x),
                    UnaryKind::Reciprocal => {
                        let one = e.fconst(ty, 1.0);
                        e.fdiv(one, x)
                    }
                    UnaryKind::Exp => e.exp(ty, x),
                    UnaryKind::Erf => e.erf(ty, x),
                    UnaryKind::Tanh => e.tanh(ty, x),
                    UnaryKind::Sigmoid => e.sigmoid(ty, x),
                    UnaryKind::Relu => e.relu(ty, x),
                    k => unreachable!("epilogues exclude {k:?} (checked by Epilogue::supports_unary)"),
                }
            }
            // round_half_even(clamp(x / scale, lo - zp, hi - zp)) * scale, NaN to 0: the
            // division exact, as QuantizeLinear's.
            EpiOp::FakeQuant(a, q) => {
                let (lo, hi) = q.bounds();
                let s = e.fconst(ty, q.scale);
                let v = e.fdiv(regs[a], s);
                let (lo, hi) = (e.fconst(ty, lo), e.fconst(ty, hi));
                let v = e.clamp_below(ty, v, lo);
                let v = e.clamp_above(ty, v, hi);
                let nan = e.b.ins().fcmp(FloatCC::Unordered, v, v);
                let zero = e.fconst(ty, 0.0);
                let v = e.blend(ty, nan, zero, v);
                let r = e.b.ins().nearest(v);
                // -0.0 + 0.0 = +0.0: the reference's integer round trip has no negative zero.
                let r = e.fadd(r, zero);
                e.fmul(r, s)
            }
            // Division by a constant as a product with its reciprocal (within an ulp; as the
            // AVX-512 epilogue does).
            EpiOp::Binary(BinaryKind::Div, a, b) if let EpiOp::Const(d) = prog.0[b] => {
                let r = e.fconst(ty, 1.0 / d);
                e.fmul(regs[a], r)
            }
            EpiOp::Binary(k, a, b) => {
                let (x, y) = (regs[a], regs[b]);
                match k {
                    BinaryKind::Add => e.fadd(x, y),
                    BinaryKind::Sub => e.fsub(x, y),
                    BinaryKind::Mul => e.fmul(x, y),
                    BinaryKind::Div => e.fdiv(x, y),
                    BinaryKind::Max => e.b.ins().fmax(x, y),
                    BinaryKind::Min => e.b.ins().fmin(x, y),
                    k => unreachable!("epilogues exclude {k:?} (checked by Epilogue::supports_binary)"),
                }
            }
        };
        regs.push(v);
    }
    regs.last().copied().unwrap_or(acc)
}

/// The body of a GEMM driver: `fn(args: *const GemmArgs)`. `col_broadcast[i]` says whether
/// extra input `i` broadcasts along the columns.
pub fn emit_driver(
    e: &mut Emitter,
    args: Value,
    prog: &Epilogue,
    col_broadcast: &[bool],
    kernel_sig: cranelift_codegen::ir::SigRef,
    epilogue_sig: cranelift_codegen::ir::SigRef,
) {
    let f = |e: &mut Emitter, i: i64| e.load_i64(args, (i * W) as i32);
    let (m, n, k, a, lda, b, c, ldc) = (f(e, 0), f(e, 1), f(e, 2), f(e, 3), f(e, 4), f(e, 5), f(e, 6), f(e, 7));
    let (p0, p1, kernel, mr, kc, ops) = (f(e, 8), f(e, 9), f(e, 10), f(e, 11), f(e, 12), f(e, 13));
    let (epi_fn, epi_ctx) = (f(e, 14), f(e, 15));
    let has_epilogue = !prog.is_identity();
    let program_consts: Vec<f32> =
        prog.0.iter().filter_map(|op| if let EpiOp::Const(c) = op { Some(*c) } else { None }).collect();
    e.preload(types::F32X4, &program_consts);
    e.preload(types::F32, &program_consts);
    let operands: Vec<(Value, Value)> = (0..col_broadcast.len())
        .map(|i| {
            let p = e.load_i64(ops, (i * 16) as i32);
            let rs = e.load_i64(ops, (i * 16 + 8) as i32);
            (p, rs)
        })
        .collect();
    let k_outer = f(e, 16);
    let k_outer = e.b.ins().icmp_imm_s(IntCC::NotEqual, k_outer, 0);
    let nr = e.i64(NR as i64);
    let panel_stride = f(e, 17);
    let panel_bytes = e.b.ins().imul_imm_s(panel_stride, 4);
    // Blocks: (panel, block row) pairs, numbered in the walking order.
    let panels = e.b.ins().isub(p1, p0);
    let kc_m1 = e.b.ins().iadd_imm_s(kc, -1);
    let kblocks = e.b.ins().iadd(k, kc_m1);
    let kblocks = e.b.ins().udiv(kblocks, kc);
    let blocks = e.b.ins().imul(panels, kblocks);
    let mr_m1 = e.b.ins().iadd_imm_s(mr, -1);
    let tiles = e.b.ins().iadd(m, mr_m1);
    let tiles = e.b.ins().udiv(tiles, mr);
    // At least 1: m = 0 runs no tile, and the share of prefetch lines divides by it.
    let one = e.i64(1);
    let tiles = e.b.ins().smax(tiles, one);
    // Block `x` -> (panel, first row of the block), and where its packed data starts.
    let locate = |e: &mut Emitter, x: Value| -> (Value, Value, Value) {
        let (pq, pr) = (e.b.ins().udiv(x, kblocks), e.b.ins().urem(x, kblocks));
        let (kq, kr) = (e.b.ins().udiv(x, panels), e.b.ins().urem(x, panels));
        let pi = e.b.ins().select(k_outer, kr, pq);
        let ki = e.b.ins().select(k_outer, kq, pr);
        let p = e.b.ins().iadd(p0, pi);
        let k0 = e.b.ins().imul(ki, kc);
        let off = e.b.ins().imul(p, panel_bytes);
        let bpanel = e.b.ins().iadd(b, off);
        let data = e.addr(bpanel, k0, (NR * 4) as i64);
        (p, k0, data)
    };
    let zero = e.i64(0);
    e.for_range(zero, blocks, 1, |e, x| {
        let (p, k0, bk) = locate(e, x);
        let n0 = e.b.ins().imul_imm_s(p, NR as i64);
        let left = e.b.ins().isub(n, n0);
        let nb = e.min(nr, left);
        let rest = e.b.ins().isub(k, k0);
        let kb = e.min(kc, rest);
        let k_end = e.b.ins().iadd(k0, kb);
        let last = e.b.ins().icmp(IntCC::SignedGreaterThanOrEqual, k_end, k);
        let not_first = e.b.ins().icmp_imm_s(IntCC::NotEqual, k0, 0);
        let accumulate = e.b.ins().uextend(types::I32, not_first);
        // The next block's cache lines (two per row of a panel), shared out among the tiles.
        let xn = e.b.ins().iadd_imm_s(x, 1);
        let more = e.b.ins().icmp(IntCC::SignedLessThan, xn, blocks);
        let xn = e.b.ins().select(more, xn, x);
        let (_, k0n, next) = locate(e, xn);
        let rest_n = e.b.ins().isub(k, k0n);
        let kbn = e.min(kc, rest_n);
        let lines = e.b.ins().imul_imm_s(kbn, (NR * 4 / 64) as i64);
        let lines = e.b.ins().select(more, lines, zero);
        let tiles_m1 = e.b.ins().iadd_imm_s(tiles, -1);
        let share = e.b.ins().iadd(lines, tiles_m1);
        let share = e.b.ins().udiv(share, tiles);
        let ivar = e.var(zero);
        let pfvar = e.var(zero);
        e.while_lt(ivar, m, |e, i| {
            let rows_left = e.b.ins().isub(m, i);
            let mb = e.min(mr, rows_left);
            let arow = {
                let r = e.b.ins().imul(i, lda);
                let r = e.b.ins().iadd(r, k0);
                e.addr(a, r, 4)
            };
            let crow = {
                let r = e.b.ins().imul(i, ldc);
                let r = e.b.ins().iadd(r, n0);
                e.addr(c, r, 4)
            };
            let done = e.b.use_var(pfvar);
            let pf = e.addr(next, done, 64);
            let pf_left = e.b.ins().isub(lines, done);
            let pf_lines = e.min(share, pf_left);
            let done = e.b.ins().iadd(done, pf_lines);
            e.b.def_var(pfvar, done);
            e.b.ins().call_indirect(
                kernel_sig,
                kernel,
                &[kb, arow, lda, bk, crow, ldc, mb, nb, accumulate, pf, pf_lines],
            );
            if has_epilogue {
                e.if_then(last, |e| {
                    let native = e.b.ins().icmp_imm_s(IntCC::NotEqual, epi_fn, 0);
                    let native_block = e.b.create_block();
                    let generated_block = e.b.create_block();
                    let join = e.b.create_block();
                    e.b.ins().brif(native, native_block, &[], generated_block, &[]);
                    e.b.switch_to_block(native_block);
                    e.b.ins().call_indirect(epilogue_sig, epi_fn, &[epi_ctx, c, ldc, i, mb, n0, nb]);
                    e.b.ins().jump(join, &[]);
                    e.b.switch_to_block(generated_block);
                    emit_tile_epilogue(e, prog, col_broadcast, &operands, c, ldc, i, mb, n0, nb);
                    e.b.ins().jump(join, &[]);
                    e.b.switch_to_block(join);
                });
            }
            let next_i = e.b.ins().iadd(i, mb);
            e.b.def_var(ivar, next_i);
        });
    });
}

/// Applies the epilogue to rows `i..i+mb`, columns `n0..n0+nb` of C, in place.
#[allow(clippy::too_many_arguments)]
fn emit_tile_epilogue(
    e: &mut Emitter,
    prog: &Epilogue,
    col_broadcast: &[bool],
    operands: &[(Value, Value)],
    c: Value,
    ldc: Value,
    i: Value,
    mb: Value,
    n0: Value,
    nb: Value,
) {
    let end = e.b.ins().iadd(i, mb);
    e.for_range(i, end, 1, |e, row| {
        let crow = {
            let r = e.b.ins().imul(row, ldc);
            let r = e.b.ins().iadd(r, n0);
            e.addr(c, r, 4)
        };
        let orows: Vec<Value> = operands
            .iter()
            .zip(col_broadcast)
            .map(|(&(p, rs), &bcast)| {
                let r = e.b.ins().imul(row, rs);
                let r = if bcast { r } else { e.b.ins().iadd(r, n0) };
                e.addr(p, r, 4)
            })
            .collect();
        // Vectors of four, then the rest one by one.
        let zero = e.i64(0);
        let jvar = e.var(zero);
        let nb3 = e.b.ins().iadd_imm_s(nb, -3);
        e.while_lt(jvar, nb3, |e, j| {
            let off = e.b.ins().imul_imm_s(j, 4);
            let cp = e.b.ins().iadd(crow, off);
            let acc = e.b.ins().load(types::F32X4, mem(), cp, 0);
            let ins: Vec<Value> = orows
                .iter()
                .zip(col_broadcast)
                .map(|(&op, &bcast)| {
                    if bcast {
                        let s = e.b.ins().load(types::F32, mem(), op, 0);
                        e.b.ins().splat(types::F32X4, s)
                    } else {
                        let p = e.b.ins().iadd(op, off);
                        e.b.ins().load(types::F32X4, mem(), p, 0)
                    }
                })
                .collect();
            let y = emit_program(e, types::F32X4, prog, acc, &ins);
            e.b.ins().store(mem(), y, cp, 0);
            let next = e.b.ins().iadd_imm_s(j, 4);
            e.b.def_var(jvar, next);
        });
        e.while_lt(jvar, nb, |e, j| {
            let off = e.b.ins().imul_imm_s(j, 4);
            let cp = e.b.ins().iadd(crow, off);
            let acc = e.b.ins().load(types::F32, mem(), cp, 0);
            let ins: Vec<Value> = orows
                .iter()
                .zip(col_broadcast)
                .map(|(&op, &bcast)| {
                    let p = if bcast { op } else { e.b.ins().iadd(op, off) };
                    e.b.ins().load(types::F32, mem(), p, 0)
                })
                .collect();
            let y = emit_program(e, types::F32, prog, acc, &ins);
            e.b.ins().store(mem(), y, cp, 0);
            let next = e.b.ins().iadd_imm_s(j, 1);
            e.b.def_var(jvar, next);
        });
    });
}

/// The portable micro-kernel, `kernels::MicroKernel` in 128-bit vectors: tiles of up to 4 rows
/// by 8 columns, four times across the 32-column panel. Params as the Rust kernels. With
/// `pairs`, the integer kernel over `i16` pairs of `kernels::int16` (`k` in pairs): `pmaddwd`
/// (the `imul`/`swiden`/`iadd_pairwise` tree Cranelift folds into it) into `i32` lanes,
/// converted to f32 as they are stored.
pub fn emit_portable_kernel(e: &mut Emitter, params: &[Value], pairs: bool) {
    let (k, a, lda, b, c, ldc, m, n, accumulate) =
        (params[0], params[1], params[2], params[3], params[4], params[5], params[6], params[7], params[8]);
    // One specialized body per row count.
    let bodies: Vec<_> = (1..=4).map(|_| e.b.create_block()).collect();
    let done = e.b.create_block();
    for (r, &blk) in bodies.iter().enumerate() {
        let rows = r as i64 + 1;
        let next = e.b.create_block();
        let is = if rows == 4 {
            e.b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, m, rows)
        } else {
            e.b.ins().icmp_imm_s(IntCC::Equal, m, rows)
        };
        e.b.ins().brif(is, blk, &[], next, &[]);
        e.b.switch_to_block(next);
    }
    e.b.ins().jump(done, &[]);
    for (r, &blk) in bodies.iter().enumerate() {
        e.b.switch_to_block(blk);
        emit_portable_tile(e, r + 1, k, a, lda, b, c, ldc, n, accumulate, pairs);
        e.b.ins().jump(done, &[]);
    }
    e.b.switch_to_block(done);
}

#[allow(clippy::too_many_arguments)]
fn emit_portable_tile(
    e: &mut Emitter,
    rows: usize,
    k: Value,
    a: Value,
    lda: Value,
    b: Value,
    c: Value,
    ldc: Value,
    n: Value,
    accumulate: Value,
    pairs: bool,
) {
    let acc_ty = if pairs { types::I32X4 } else { types::F32X4 };
    let lda4 = e.b.ins().imul_imm_s(lda, 4);
    let ldc4 = e.b.ins().imul_imm_s(ldc, 4);
    let zero = e.i64(0);
    let four = e.i64(4);
    // Sub-panels of 8 columns while any column of them is wanted.
    e.for_range(zero, four, 1, |e, s| {
        let col0 = e.b.ins().imul_imm_s(s, 8);
        let wanted = e.b.ins().icmp(IntCC::SignedLessThan, col0, n);
        e.if_then(wanted, |e| {
            let bs = e.addr(b, col0, 4);
            let z = if pairs {
                let z = e.b.ins().iconst(types::I32, 0);
                e.b.ins().splat(types::I32X4, z)
            } else {
                e.fconst(types::F32X4, 0.0)
            };
            let accs: Vec<_> = (0..rows * 2)
                .map(|_| {
                    let v = e.b.declare_var(acc_ty);
                    e.b.def_var(v, z);
                    v
                })
                .collect();
            let zero = e.i64(0);
            e.for_range(zero, k, 1, |e, p| {
                let brow = e.addr(bs, p, (NR * 4) as i64);
                let b_ty = if pairs { types::I16X8 } else { types::F32X4 };
                let b0 = e.b.ins().load(b_ty, mem(), brow, 0);
                let b1 = e.b.ins().load(b_ty, mem(), brow, 16);
                let ap = e.addr(a, p, 4);
                for r in 0..rows {
                    let row = if r == 0 {
                        ap
                    } else {
                        let off = e.b.ins().imul_imm_s(lda4, r as i64);
                        e.b.ins().iadd(ap, off)
                    };
                    let av = if pairs {
                        let s = e.b.ins().load(types::I32, mem(), row, 0);
                        let v = e.b.ins().splat(types::I32X4, s);
                        let le = MemFlagsData::new().with_endianness(Endianness::Little);
                        e.b.ins().bitcast(types::I16X8, le, v)
                    } else {
                        let s = e.b.ins().load(types::F32, mem(), row, 0);
                        e.b.ins().splat(types::F32X4, s)
                    };
                    for h in 0..2 {
                        let acc = e.b.use_var(accs[r * 2 + h]);
                        let bv = if h == 0 { b0 } else { b1 };
                        let nv = if pairs {
                            let lo_a = e.b.ins().swiden_low(av);
                            let lo_b = e.b.ins().swiden_low(bv);
                            let lo = e.b.ins().imul(lo_a, lo_b);
                            let hi_a = e.b.ins().swiden_high(av);
                            let hi_b = e.b.ins().swiden_high(bv);
                            let hi = e.b.ins().imul(hi_a, hi_b);
                            let dot = e.b.ins().iadd_pairwise(lo, hi);
                            e.b.ins().iadd(acc, dot)
                        } else {
                            e.fmadd(av, bv, acc)
                        };
                        e.b.def_var(accs[r * 2 + h], nv);
                    }
                }
            });
            let width = e.b.ins().isub(n, col0);
            let full = e.b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, width, 8);
            let acc_flag = e.b.ins().icmp_imm_s(IntCC::NotEqual, accumulate, 0);
            for r in 0..rows {
                let crow = {
                    let off = e.b.ins().imul_imm_s(ldc4, r as i64);
                    let base = e.b.ins().iadd(c, off);
                    e.addr(base, col0, 4)
                };
                let mut v0 = e.b.use_var(accs[r * 2]);
                let mut v1 = e.b.use_var(accs[r * 2 + 1]);
                if pairs {
                    v0 = e.b.ins().fcvt_from_sint(types::F32X4, v0);
                    v1 = e.b.ins().fcvt_from_sint(types::F32X4, v1);
                }
                let full_block = e.b.create_block();
                let part_block = e.b.create_block();
                let join = e.b.create_block();
                e.b.ins().brif(full, full_block, &[], part_block, &[]);
                e.b.switch_to_block(full_block);
                for (h, v) in [(0i32, v0), (16, v1)] {
                    let old = e.b.ins().load(types::F32X4, mem(), crow, h);
                    let sum = e.fadd(v, old);
                    let out = e.b.ins().select(acc_flag, sum, v);
                    e.b.ins().store(mem(), out, crow, h);
                }
                e.b.ins().jump(join, &[]);
                e.b.switch_to_block(part_block);
                for lane in 0..8i64 {
                    let inside = e.b.ins().icmp_imm_s(IntCC::SignedGreaterThan, width, lane);
                    let v = if lane < 4 { v0 } else { v1 };
                    e.if_then(inside, |e| {
                        let x = e.b.ins().extractlane(v, (lane % 4) as u8);
                        let off = (lane * 4) as i32;
                        let old = e.b.ins().load(types::F32, mem(), crow, off);
                        let sum = e.fadd(x, old);
                        let out = e.b.ins().select(acc_flag, sum, x);
                        e.b.ins().store(mem(), out, crow, off);
                    });
                }
                e.b.ins().jump(join, &[]);
                e.b.switch_to_block(join);
            }
        });
    });
}

/// `pack(src, k, n, row_stride, col_stride, dst)`: element `(r, j)` of a strided `k x n`
/// matrix goes to panel `j / NR`, row `r`, lane `j % NR` of `dst`; lanes past `n` are zeroed.
/// Full panels copy without bounds checks (vectors when columns are contiguous).
pub fn emit_pack(e: &mut Emitter, params: &[Value]) {
    let (src, k, n, rs, cs, dst) = (params[0], params[1], params[2], params[3], params[4], params[5]);
    let zero = e.i64(0);
    let panels = {
        let t = e.b.ins().iadd_imm_s(n, NR as i64 - 1);
        e.b.ins().udiv_imm_u(t, NR as i64)
    };
    let rs4 = e.b.ins().imul_imm_s(rs, 4);
    let cs4 = e.b.ins().imul_imm_s(cs, 4);
    let contiguous = e.b.ins().icmp_imm_s(IntCC::Equal, cs, 1);
    e.for_range(zero, panels, 1, |e, p| {
        let col0 = e.b.ins().imul_imm_s(p, NR as i64);
        let panel_base = {
            let t = e.b.ins().imul(p, k);
            e.addr(dst, t, (NR * 4) as i64)
        };
        let width = e.b.ins().isub(n, col0);
        let full = e.b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, width, NR as i64);
        let full_block = e.b.create_block();
        let part_block = e.b.create_block();
        let join = e.b.create_block();
        e.b.ins().brif(full, full_block, &[], part_block, &[]);
        for (block, is_full) in [(full_block, true), (part_block, false)] {
            e.b.switch_to_block(block);
            let zero = e.i64(0);
            e.for_range(zero, k, 1, |e, r| {
                let out_row = e.addr(panel_base, r, (NR * 4) as i64);
                let src_row = {
                    let t = e.b.ins().imul(r, rs4);
                    let t = e.b.ins().iadd(src, t);
                    let u = e.b.ins().imul(col0, cs4);
                    e.b.ins().iadd(t, u)
                };
                if is_full {
                    let vec_block = e.b.create_block();
                    let scalar_block = e.b.create_block();
                    let row_join = e.b.create_block();
                    e.b.ins().brif(contiguous, vec_block, &[], scalar_block, &[]);
                    e.b.switch_to_block(vec_block);
                    for j in 0..(NR / 4) as i32 {
                        let v = e.b.ins().load(types::F32X4, mem(), src_row, j * 16);
                        e.b.ins().store(mem(), v, out_row, j * 16);
                    }
                    e.b.ins().jump(row_join, &[]);
                    e.b.switch_to_block(scalar_block);
                    let mut sp = src_row;
                    for j in 0..NR as i32 {
                        let x = e.b.ins().load(types::F32, mem(), sp, 0);
                        e.b.ins().store(mem(), x, out_row, j * 4);
                        sp = e.b.ins().iadd(sp, cs4);
                    }
                    e.b.ins().jump(row_join, &[]);
                    e.b.switch_to_block(row_join);
                } else {
                    let zf = e.fconst(types::F32, 0.0);
                    for j in 0..NR as i64 {
                        let inside = e.b.ins().icmp_imm_s(IntCC::SignedGreaterThan, width, j);
                        let sp = {
                            let t = e.b.ins().imul_imm_s(cs4, j);
                            e.b.ins().iadd(src_row, t)
                        };
                        let v = e.b.declare_var(types::F32);
                        e.b.def_var(v, zf);
                        e.if_then(inside, |e| {
                            let x = e.b.ins().load(types::F32, mem(), sp, 0);
                            e.b.def_var(v, x);
                        });
                        let x = e.b.use_var(v);
                        e.b.ins().store(mem(), x, out_row, (j * 4) as i32);
                    }
                }
            });
            e.b.ins().jump(join, &[]);
        }
        e.b.switch_to_block(join);
    });
}

//! Attention in bf16 for ops that allow it ([`crate::op::fused::Attention::bf16`]: int8 builds
//! do), on AMX tiles (`tdpbf16ps`) or, on CPUs with AVX-512 BF16 but no AMX (AMD Zen 4 and 5),
//! in zmm registers (`vdpbf16ps`, twice the products of an f32 FMA per instruction): the
//! [`Engine`]. Q, K, the probabilities and V are rounded to bf16 (to nearest, ties to even),
//! every sum is f32; the scale, mask and softmax run in f32 between the two products, as on
//! AVX-512 ([`super::avx512_vec::attention_head`]). Both engines share the packing and the
//! softmax; the vector engine reads the tiles' layout a row (one zmm of 16 pairs) at a time.
//!
//! One head at a time, in three phases over all its rows: the scores, 16 query rows (8 on
//! vectors) by 32 keys at a time (a row block's Q chunks in tmm4-7, heads of up to [`MAX_HEAD`] dims, `Kᵀ` packed
//! once per head into B tiles of pairs of head dims); the softmax in f32, writing unnormalized
//! probabilities in bf16 and their sums; the context, 16 rows by 32 columns at a time (V packed
//! into B tiles of pairs of keys, each step's operands in the other half of tmm2-7 than the
//! last's), scaled by `1 / sum` into the output. Whole phases rather than row blocks through all
//! three: a tile load of data that vector stores have just written (or a vector load of a
//! tile store's) waits for the store, and the scores' phase ran a third faster so. Shapes that
//! fill no tile evenly are padded with zeros.

use super::avx512_vec::{chain_max, lane_mask, Chain, EpiContext};
use std::arch::asm;
use std::arch::x86_64::*;

/// Most dims per head: a block's Q fills at most the four tile registers tmm4-7.
pub const MAX_HEAD: usize = 128;

/// What multiplies the bf16 products of [`attention_head`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// AMX tiles (`tdpbf16ps`): the CPU has AMX-BF16 and the process may use the tiles.
    Amx,
    /// AVX-512 BF16 (`vdpbf16ps` on zmm), blocks of [`VEC_ROWS`] rows by 32 columns.
    Vector,
}

impl Engine {
    pub const ALL: [Engine; 2] = [Engine::Amx, Engine::Vector];

    /// The engine's name in reports and in `TCC_ATTENTION`.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Amx => "amx",
            Engine::Vector => "vector",
        }
    }

    /// Whether this CPU (and OS) runs the engine.
    pub fn supported(self) -> bool {
        let vector = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16");
        match self {
            Engine::Vector => vector,
            Engine::Amx => {
                static AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
                *AMX.get_or_init(|| {
                    let leaf7 = (__get_cpuid_max(0).0 >= 7).then(|| __cpuid_count(7, 0));
                    leaf7.is_some_and(|l| (l.edx >> 22) & 1 == 1) && vector && super::int8::amx_supported()
                })
            }
        }
    }

    /// The best engine this CPU runs (AMX, then vectors), if any.
    pub fn best() -> Option<Engine> {
        Engine::ALL.into_iter().find(|e| e.supported())
    }
}

/// Rows of a block of the vector engine's products: 8 rows by two 16-column tiles are 16
/// accumulators, two B vectors and a broadcast pair of the 32 zmm registers.
pub const VEC_ROWS: usize = 8;

/// One (batch, head) of attention on the tensors themselves: `rows` query rows of `d` floats
/// at stride `ldq`; K's element (head dim `p`, key `j`) at `k[p * k_dim + j * k_key]`; V's
/// (key `j`, column `c`) at `v[j * v_key + c * v_col]` (any layout: the kernel packs both);
/// the context written as `rows` rows of `dv` floats at stride `ldo`.
pub struct Head {
    pub q: *const f32,
    pub ldq: usize,
    pub k: *const f32,
    pub k_dim: usize,
    pub k_key: usize,
    pub v: *const f32,
    pub v_key: usize,
    pub v_col: usize,
    pub rows: usize,
    pub sk: usize,
    pub d: usize,
    pub dv: usize,
    pub out: *mut f32,
    pub ldo: usize,
    /// A row whose softmax is NaN (all its scores `-inf`) gives zeros.
    pub nan_to_zero: bool,
    /// The index of `q`'s first row among the head's query rows (a head split by rows over
    /// threads): the row the chain's per-row operands are read at.
    pub row0: usize,
}

/// Largest stride [`Head`] takes between the sixteen elements the packing reads at once (its
/// gathers' offsets are 32-bit).
pub const MAX_STRIDE: usize = (i32::MAX as usize) / 64;

/// Sizes padded to whole tiles: head dims to 32 (a 64-byte A row), keys to 32 (a tile step of
/// the context product), value columns to 16.
#[derive(Clone, Copy)]
struct Padded {
    sq: usize,
    d: usize,
    sk: usize,
    dv: usize,
}

impl Padded {
    fn of(h: &Head) -> Padded {
        Padded {
            sq: h.rows.next_multiple_of(16),
            d: h.d.next_multiple_of(32),
            sk: h.sk.next_multiple_of(32),
            dv: h.dv.next_multiple_of(16),
        }
    }

    /// 32-bit words of each scratch part: `Kᵀ` tiles, V tiles, Q (bf16), scores (f32),
    /// probabilities (bf16), context (f32), `1 / sum` per row.
    fn parts(self) -> [usize; 7] {
        let sq = self.sq;
        [self.sk * self.d / 2, self.dv * self.sk / 2, sq * self.d / 2, sq * self.sk, sq * self.sk / 2, sq * self.dv, sq]
    }
}

/// 32-bit words of scratch [`attention_head`] needs for `h`.
pub fn scratch_len(h: &Head) -> usize {
    Padded::of(h).parts().iter().sum()
}

/// Runs `f` on this thread's scratch of at least `len` words (kept from call to call: the
/// kernel writes every word it reads, so it is neither cleared nor freed between heads).
pub fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u32]) -> R) -> R {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with_borrow_mut(|s| {
        if s.len() < len {
            s.resize(len, 0);
        }
        f(&mut s[..len])
    })
}

/// `x` rounded to bf16 (to nearest, ties to even), in the low 16 bits of each lane.
#[inline(always)]
unsafe fn bf16_bits(x: __m512) -> __m512i {
    // SAFETY: register-only AVX-512F arithmetic (the caller has the feature).
    unsafe {
        let b = _mm512_castps_si512(x);
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
        _mm512_srli_epi32::<16>(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), odd))
    }
}

/// `exp(x)` for `x <= 0` (NaN stays NaN) to about 4e-5 relative, well within the bf16 the
/// result is rounded to: `2^n exp(r)` with `r = x - n ln 2` in `[-0.35, 0.35]`, a degree-4
/// polynomial for `exp(r)` and `vscalefps` for `2^n` (no clamp above: scores minus their
/// maximum are never positive; below, -87 keeps `-inf` from making `r` NaN).
#[inline(always)]
unsafe fn exp_short(x: __m512) -> __m512 {
    // SAFETY: register-only AVX-512F arithmetic (the caller has the feature).
    unsafe {
        // max returns its second operand when either is NaN: x goes second.
        let x = _mm512_max_ps(_mm512_set1_ps(-87.0), x);
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(std::f32::consts::LN_2), x);
        let mut p = _mm512_set1_ps(1.0 / 24.0);
        for c in [1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }
}

/// The tile configuration: palette 1, all eight tiles 16 rows of 64 bytes.
#[repr(C, align(64))]
struct Config([u8; 64]);

/// The tiles configured for this kernel on this thread; released when dropped.
struct Tiles;

impl Tiles {
    /// # Safety
    /// [`supported`] returned true.
    unsafe fn configure() -> Tiles {
        let mut c = Config([0; 64]);
        c.0[0] = 1;
        for t in 0..8 {
            c.0[16 + 2 * t] = 64;
            c.0[48 + t] = 16;
        }
        // SAFETY: AMX is enabled (the caller's contract); the configuration is valid and aligned.
        unsafe { asm!("ldtilecfg [{0}]", in(reg) c.0.as_ptr(), options(nostack, readonly)) };
        Tiles
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: tiles were configured, so AMX is enabled; release resets them.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// Tile register operations whose registers are chosen at run time (`asm!` names them
/// literally). Each is one arm per register.
macro_rules! by_register {
    ($i:expr, $($n:literal => $body:expr),+ $(,)?) => {
        match $i { $($n => $body,)+ _ => unreachable!("tile register index") }
    };
}

/// A block's Q chunk `c` (32 head dims of 16 rows at stride `stride` bytes) into tmm4+c.
#[inline(always)]
unsafe fn load_q(c: usize, p: *const u16, stride: usize) {
    // SAFETY (all tile helpers): tiles are configured (16 rows of 64 bytes) and the caller's
    // pointers cover 16 rows of 64 bytes at the stride given.
    unsafe {
        by_register!(c,
            0 => asm!("tileloadd tmm4, [{p} + {s}*1]", p = in(reg) p, s = in(reg) stride, options(nostack, readonly)),
            1 => asm!("tileloadd tmm5, [{p} + {s}*1]", p = in(reg) p, s = in(reg) stride, options(nostack, readonly)),
            2 => asm!("tileloadd tmm6, [{p} + {s}*1]", p = in(reg) p, s = in(reg) stride, options(nostack, readonly)),
            3 => asm!("tileloadd tmm7, [{p} + {s}*1]", p = in(reg) p, s = in(reg) stride, options(nostack, readonly)),
        )
    }
}

/// Two key tiles of scores (tmm0, tmm1) += Q chunk `c` (tmm4+c) times `Kᵀ` tiles `b0`, `b1`.
#[inline(always)]
unsafe fn scores_step(c: usize, b0: *const u32, b1: *const u32) {
    macro_rules! step {
        ($q:literal) => {
            asm!(
                "tileloadd tmm2, [{b0} + {s}*1]",
                "tileloadd tmm3, [{b1} + {s}*1]",
                concat!("tdpbf16ps tmm0, ", $q, ", tmm2"),
                concat!("tdpbf16ps tmm1, ", $q, ", tmm3"),
                b0 = in(reg) b0, b1 = in(reg) b1, s = in(reg) 64usize, options(nostack, readonly),
            )
        };
    }
    // SAFETY: as `load_q`; each `Kᵀ` tile is 1 KiB.
    unsafe { by_register!(c, 0 => step!("tmm4"), 1 => step!("tmm5"), 2 => step!("tmm6"), 3 => step!("tmm7")) }
}

/// Two context tiles (tmm0, tmm1) += the probabilities' chunk at `a` (16 rows at stride
/// `lda` bytes) times the V tiles at `b0`, `b1`. Step parity `s` picks the registers, A in
/// tmm2 or tmm3 and V in tmm4-5 or tmm6-7, so that the next step's loads need not wait for
/// this step's products to have read their operands.
#[inline(always)]
unsafe fn context_pair(s: usize, a: *const u16, lda: usize, b0: *const u32, b1: *const u32) {
    macro_rules! step {
        ($a:literal, $b0:literal, $b1:literal) => {
            asm!(
                concat!("tileloadd ", $a, ", [{a} + {lda}*1]"),
                concat!("tileloadd ", $b0, ", [{b0} + {s}*1]"),
                concat!("tileloadd ", $b1, ", [{b1} + {s}*1]"),
                concat!("tdpbf16ps tmm0, ", $a, ", ", $b0),
                concat!("tdpbf16ps tmm1, ", $a, ", ", $b1),
                a = in(reg) a, lda = in(reg) lda, b0 = in(reg) b0, b1 = in(reg) b1, s = in(reg) 64usize,
                options(nostack, readonly),
            )
        };
    }
    // SAFETY: as `load_q`; V tiles are 1 KiB.
    unsafe { by_register!(s, 0 => step!("tmm2", "tmm4", "tmm5"), 1 => step!("tmm3", "tmm6", "tmm7")) }
}

/// Zeroes tmm0+t.
#[inline(always)]
unsafe fn zero(t: usize) {
    // SAFETY: tiles are configured.
    unsafe {
        by_register!(t,
            0 => asm!("tilezero tmm0", options(nostack, nomem)), 1 => asm!("tilezero tmm1", options(nostack, nomem)),
            2 => asm!("tilezero tmm2", options(nostack, nomem)), 3 => asm!("tilezero tmm3", options(nostack, nomem)),
        )
    }
}

/// Stores tmm0+t as 16 rows of 16 f32 at stride `stride` bytes.
#[inline(always)]
unsafe fn store(t: usize, p: *mut f32, stride: usize) {
    // SAFETY: the caller's `p` covers 16 rows of 64 bytes at `stride`.
    unsafe {
        by_register!(t,
            0 => asm!("tilestored [{p} + {s}*1], tmm0", p = in(reg) p, s = in(reg) stride, options(nostack)),
            1 => asm!("tilestored [{p} + {s}*1], tmm1", p = in(reg) p, s = in(reg) stride, options(nostack)),
            2 => asm!("tilestored [{p} + {s}*1], tmm2", p = in(reg) p, s = in(reg) stride, options(nostack)),
            3 => asm!("tilestored [{p} + {s}*1], tmm3", p = in(reg) p, s = in(reg) stride, options(nostack)),
        )
    }
}

/// `softmax(chain(Q Kᵀ)) V` for one head in bf16 on `engine` (see the module's doc); the
/// chain's operands are indexed by the head's query rows. A row whose scores are all `-inf`
/// is NaN, as in the reference (zeros with `nan_to_zero`).
///
/// # Safety
/// `engine` is [`Engine::supported`]; the pointers of `h` cover what [`Head`] says, `d <=`
/// [`MAX_HEAD`]; `ctx`'s operands cover `rows` rows of `sk` scores; `scratch` holds
/// [`scratch_len`]`(h)` words.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn attention_head(engine: Engine, h: &Head, chain: Option<(&EpiContext, &Chain)>, scratch: &mut [u32]) {
    debug_assert!(h.d <= MAX_HEAD && scratch.len() >= scratch_len(h));
    let p = Padded::of(h);
    let [kt_len, vt_len, qb_len, sb_len, pb_len, ob_len, _] = p.parts();
    let (q_chunks, key_tiles, col_tiles, key_steps) = (p.d / 32, p.sk / 16, p.dv / 16, p.sk / 32);
    // SAFETY: the scratch holds every part (the caller's contract); each loop below stays
    // within its part: tile loads of 16 rows of 64 bytes at the part's row stride, masked
    // vector loads of the tensors within their `d`, `dv` and `sk` rows.
    unsafe {
        let base = scratch.as_mut_ptr();
        let kt = base;
        let vt = kt.add(kt_len);
        let qb = vt.add(vt_len) as *mut u16;
        let sb = vt.add(vt_len + qb_len) as *mut f32;
        let pb = vt.add(vt_len + qb_len + sb_len) as *mut u16;
        let ob = vt.add(vt_len + qb_len + sb_len + pb_len) as *mut f32;
        let inv = vt.add(vt_len + qb_len + sb_len + pb_len + ob_len) as *mut f32;
        let (dims, keys) =
            (Axis { stride: h.k_dim, len: h.d, padded: p.d }, Axis { stride: h.k_key, len: h.sk, padded: p.sk });
        pack_pairs(h.k, dims, keys, kt);
        let (keys, cols) =
            (Axis { stride: h.v_key, len: h.sk, padded: p.sk }, Axis { stride: h.v_col, len: h.dv, padded: p.dv });
        pack_pairs(h.v, keys, cols, vt);
        let _tiles = (engine == Engine::Amx).then(|| Tiles::configure());
        // Phase 1: Q in bf16 (zero past its rows and dims), scores block by block.
        for r in 0..p.sq {
            let src = h.q.wrapping_add(r * h.ldq);
            for c in (0..p.d).step_by(16) {
                let k = if r < h.rows && c < h.d { lane_mask(h.d - c) } else { 0 };
                let v = bf16_bits(_mm512_maskz_loadu_ps(k, src.wrapping_add(c)));
                _mm256_storeu_si256(qb.add(r * p.d + c) as *mut __m256i, _mm512_cvtepi32_epi16(v));
            }
        }
        if engine == Engine::Vector {
            // Key tile `t`'s pair `i` (head dims 2i, 2i + 1 of its 16 keys) is the zmm at
            // `kt + (t q_chunks 256 + 16 i)` words: a tile's steps follow one another.
            for r0 in (0..p.sq).step_by(VEC_ROWS) {
                for jt in (0..key_tiles).step_by(2) {
                    let b = |t: usize| kt.add(t * q_chunks * 256) as *const u32;
                    let out = sb.add(r0 * p.sk + 16 * jt);
                    dot_block(p.d / 2, qb.add(r0 * p.d) as *const u32, p.d / 2, [b(jt), b(jt + 1)], out, p.sk, true);
                }
            }
        } else {
            for r0 in (0..p.sq).step_by(16) {
                for c in 0..q_chunks {
                    load_q(c, qb.add(r0 * p.d + 32 * c), 2 * p.d);
                }
                for jt in (0..key_tiles).step_by(2) {
                    zero(0);
                    zero(1);
                    for c in 0..q_chunks {
                        scores_step(c, kt.add((jt * q_chunks + c) * 256), kt.add(((jt + 1) * q_chunks + c) * 256));
                    }
                    store(0, sb.add(r0 * p.sk + 16 * jt), 4 * p.sk);
                    store(1, sb.add(r0 * p.sk + 16 * (jt + 1)), 4 * p.sk);
                }
            }
        }
        // Phase 2, softmax: the unnormalized probabilities in bf16 (zero past `sk` and past
        // the rows), their sums as the product will see them.
        softmax_rows(h, p, chain, sb, pb, inv);
        // Phase 3: the context block by block, then scaled row by row into the output.
        if engine == Engine::Vector {
            for r0 in (0..p.sq).step_by(VEC_ROWS) {
                for t0 in (0..col_tiles).step_by(2) {
                    let two = t0 + 1 < col_tiles;
                    let b = |t: usize| vt.add(t * key_steps * 256) as *const u32;
                    let (a, out) = (pb.add(r0 * p.sk) as *const u32, ob.add(r0 * p.dv + 16 * t0));
                    dot_block(p.sk / 2, a, p.sk / 2, [b(t0), b(if two { t0 + 1 } else { t0 })], out, p.dv, two);
                }
            }
        } else {
            for r0 in (0..p.sq).step_by(16) {
                for t0 in (0..col_tiles).step_by(2) {
                    let two = t0 + 1 < col_tiles;
                    zero(0);
                    zero(1);
                    for s in 0..key_steps {
                        let b0 = vt.add((t0 * key_steps + s) * 256);
                        let b1 = if two { vt.add(((t0 + 1) * key_steps + s) * 256) } else { b0 };
                        context_pair(s % 2, pb.add(r0 * p.sk + 32 * s), 2 * p.sk, b0, b1);
                    }
                    store(0, ob.add(r0 * p.dv + 16 * t0), 4 * p.dv);
                    if two {
                        store(1, ob.add(r0 * p.dv + 16 * (t0 + 1)), 4 * p.dv);
                    }
                }
            }
        }
        for r in 0..h.rows {
            let (o, src, s) = (h.out.add(r * h.ldo), ob.add(r * p.dv), _mm512_set1_ps(*inv.add(r)));
            for c in (0..h.dv).step_by(16) {
                let k = lane_mask(h.dv - c);
                _mm512_mask_storeu_ps(o.add(c), k, _mm512_mul_ps(_mm512_loadu_ps(src.add(c)), s));
            }
        }
    }
}

/// The vector engine's product of [`VEC_ROWS`] rows of bf16 pairs (`a`, rows of `pairs`
/// words at stride `lda` words: one pair of the summed axis per word) by two 16-column tiles
/// of pairs (`b[h]`: pair `i`'s zmm at `b[h] + 16 i` words), the f32 sums written to rows of
/// `c` at stride `ldc` floats (the second tile's 16 columns only with `both`). Each pair is
/// one `vdpbf16ps`: the odd elements' product added, then the even's, each rounded once.
///
/// # Safety
/// AVX-512F/BF16; `a` holds `VEC_ROWS` rows of `pairs` words, `b[h]` `16 * pairs` words, `c`
/// `VEC_ROWS` rows of 16 (`both`: 32) floats.
#[inline(always)]
unsafe fn dot_block(pairs: usize, a: *const u32, lda: usize, b: [*const u32; 2], c: *mut f32, ldc: usize, both: bool) {
    // SAFETY: the caller's contract.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; VEC_ROWS];
        for i in 0..pairs {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b[0].add(16 * i) as *const _));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b[1].add(16 * i) as *const _));
            for (r, acc) in acc.iter_mut().enumerate() {
                let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r * lda + i) as i32));
                acc[0] = _mm512_dpbf16_ps(acc[0], a, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], a, b1);
            }
        }
        // Rows indexed by constants only (the loop unrolled): the sums stay in registers.
        for (r, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * ldc), acc[0]);
            if both {
                _mm512_storeu_ps(c.add(r * ldc + 16), acc[1]);
            }
        }
    }
}

/// The softmax phase of [`attention_head`]: row `r` of the scores `sb` (the chain applied)
/// becomes `exp(s - max)` in bf16 in row `r` of `pb` (zero past `sk`, and whole rows past
/// `rows`), and `inv[r]` one over the sum of those rounded values, so that each row of
/// probabilities the context product sees sums to 1.
///
/// # Safety
/// As [`attention_head`]; `sb` holds `sq * sk` floats, `pb` `sq * sk` bf16, `inv` `sq`
/// floats (padded sizes).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline(never)]
unsafe fn softmax_rows(
    h: &Head,
    p: Padded,
    chain: Option<(&EpiContext, &Chain)>,
    sb: *mut f32,
    pb: *mut u16,
    inv: *mut f32,
) {
    // SAFETY: the caller's contract; masked loads stay within each row's `sk` scores.
    unsafe {
        for r in 0..p.sq {
            let (srow, prow) = (sb.add(r * p.sk), pb.add(r * p.sk));
            let m =
                if r < h.rows { _mm512_set1_ps(chain_max(chain, h.row0 + r, srow, h.sk)) } else { _mm512_setzero_ps() };
            let mut sum = _mm512_setzero_ps();
            for j in (0..p.sk).step_by(16) {
                let k = if r < h.rows { lane_mask(h.sk.saturating_sub(j)) } else { 0 };
                let e = _mm512_maskz_mov_ps(k, exp_short(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, srow.add(j)), m)));
                let bf: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(e));
                _mm256_storeu_si256(prow.add(j) as *mut __m256i, bf);
                let rounded = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bf));
                sum = _mm512_add_ps(sum, _mm512_castsi512_ps(rounded));
            }
            *inv.add(r) = 1.0 / _mm512_reduce_add_ps(sum);
            if h.nan_to_zero && (*inv.add(r)).is_nan() {
                // Every probability of the row is NaN in the reference, then 0.
                std::ptr::write_bytes(prow, 0, p.sk);
                *inv.add(r) = 0.0;
            }
        }
    }
}

/// Sixteen floats `stride` apart from `base`, those outside `mask` zero: a load when they are
/// contiguous, a gather otherwise.
#[inline(always)]
unsafe fn sixteen(base: *const f32, stride: usize, offsets: __m512i, mask: __mmask16) -> __m512 {
    // SAFETY: the caller's: the lanes in `mask` lie in the tensor.
    unsafe {
        if mask == 0 {
            _mm512_setzero_ps()
        } else if stride == 1 {
            _mm512_maskz_loadu_ps(mask, base)
        } else {
            _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, offsets, base)
        }
    }
}

/// Offsets `0, stride, .., 15 stride` for [`sixteen`]'s gathers.
#[inline(always)]
unsafe fn offsets(stride: usize) -> __m512i {
    debug_assert!(stride <= MAX_STRIDE);
    // SAFETY: register-only AVX-512F arithmetic.
    unsafe {
        _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(stride as i32),
        )
    }
}

/// Two vectors of f32 as one of bf16 pairs: lane `l` holds `lo[l]` in its low half.
#[inline(always)]
unsafe fn pairs_of(lo: __m512, hi: __m512) -> __m512i {
    // SAFETY: register-only AVX-512F arithmetic.
    unsafe { _mm512_or_si512(bf16_bits(lo), _mm512_slli_epi32::<16>(bf16_bits(hi))) }
}

/// A matrix along which a product sums (`pairs` of it go into one 32-bit lane) by sixteen
/// columns (`lanes`), as the B tiles `tdpbf16ps` takes: `len` elements `stride` apart, padded
/// with zeros to `padded`.
#[derive(Clone, Copy)]
struct Axis {
    stride: usize,
    len: usize,
    padded: usize,
}

/// Packs the matrix at `src` (element `(k, n)` at `k * pairs.stride + n * lanes.stride`) into
/// B tiles: tile (column tile `t`, step `s`) row `i` holds, for each of the tile's 16 columns,
/// elements `32s + 2i` and `32s + 2i + 1` of that column in bf16 (zero past both lengths).
/// `Kᵀ` is this with head dims as `pairs` and keys as `lanes`; V with keys and its columns.
///
/// # Safety
/// As [`attention_head`]: `src` covers the matrix's `pairs.len x lanes.len` elements; `dst`
/// holds `pairs.padded * lanes.padded / 2` words.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_pairs(src: *const f32, pairs: Axis, lanes: Axis, dst: *mut u32) {
    // SAFETY: the caller's contract.
    unsafe {
        if pairs.stride == 1 && lanes.stride != 1 {
            pack_rows(src, pairs, lanes, dst)
        } else {
            pack_gathered(src, pairs, lanes, dst)
        }
    }
}

/// [`pack_pairs`] by sixteen elements at a time along `lanes`: loads where they are
/// contiguous, gathers otherwise.
///
/// # Safety
/// As [`pack_pairs`].
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_gathered(src: *const f32, pairs: Axis, lanes: Axis, dst: *mut u32) {
    let steps = pairs.padded / 32;
    // SAFETY: reads of elements below both lengths (lanes masked, whole vectors skipped past
    // `pairs.len`); the stores stay within `dst`.
    unsafe {
        let offs = offsets(lanes.stride);
        for t in 0..lanes.padded / 16 {
            let cols = lane_mask(lanes.len.saturating_sub(16 * t));
            for s in 0..steps {
                let tile = dst.add((t * steps + s) * 256);
                for i in 0..16 {
                    let row = |k: usize| {
                        let base = src.wrapping_add(k * pairs.stride + 16 * t * lanes.stride);
                        sixteen(base, lanes.stride, offs, if k < pairs.len { cols } else { 0 })
                    };
                    let k0 = 32 * s + 2 * i;
                    _mm512_storeu_si512(tile.add(16 * i) as *mut _, pairs_of(row(k0), row(k0 + 1)));
                }
            }
        }
    }
}

/// [`pack_pairs`] where the summed axis is contiguous (`pairs.stride == 1`: K as exporters
/// leave it, each key's head dims one row): a tile's 16 lanes loaded as rows of 16 pairs, then
/// transposed in registers, instead of 32 gathers a tile (slow on AMD's cores: the attention
/// of BERT-base int8 on Zen 4 took 8% less time so). The same words.
///
/// # Safety
/// As [`pack_pairs`].
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_rows(src: *const f32, pairs: Axis, lanes: Axis, dst: *mut u32) {
    let steps = pairs.padded / 32;
    // SAFETY: masked loads of elements below both lengths; the stores stay within `dst`.
    unsafe {
        // 16-bit element 2q of two vectors of bf16 bits (each in its lane's low half): the 32
        // bf16 of a row of 32, in order, so that word i holds elements 2i and 2i + 1.
        let evens = _mm512_set_epi16(
            62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10,
            8, 6, 4, 2, 0,
        );
        for t in 0..lanes.padded / 16 {
            for s in 0..steps {
                let mut rows = [_mm512_setzero_si512(); 16];
                for (j, row) in rows.iter_mut().enumerate().take(lanes.len.saturating_sub(16 * t)) {
                    let x = src.wrapping_add((16 * t + j) * lanes.stride + 32 * s);
                    let (m0, m1) =
                        (lane_mask(pairs.len.saturating_sub(32 * s)), lane_mask(pairs.len.saturating_sub(32 * s + 16)));
                    let lo = bf16_bits(_mm512_maskz_loadu_ps(m0, x));
                    let hi = bf16_bits(_mm512_maskz_loadu_ps(m1, x.wrapping_add(16)));
                    *row = _mm512_permutex2var_epi16(lo, evens, hi);
                }
                let tile = dst.add((t * steps + s) * 256);
                for (i, row) in transpose16(rows).iter().enumerate() {
                    _mm512_storeu_si512(tile.add(16 * i) as *mut _, *row);
                }
            }
        }
    }
}

/// The 16 x 16 words of `r` transposed: word `j` of row `i` becomes word `i` of row `j`
/// (words interleaved, then pairs of words, then 128-bit quarters twice).
#[inline(always)]
unsafe fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
    // SAFETY: register-only AVX-512F shuffles.
    unsafe {
        let mut a = [_mm512_setzero_si512(); 16];
        for k in 0..8 {
            a[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
            a[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
        }
        // b[4k + m]'s quarter `l` is column 4l + m of rows 4k..4k + 4.
        let mut b = [_mm512_setzero_si512(); 16];
        for k in 0..4 {
            b[4 * k] = _mm512_unpacklo_epi64(a[4 * k], a[4 * k + 2]);
            b[4 * k + 1] = _mm512_unpackhi_epi64(a[4 * k], a[4 * k + 2]);
            b[4 * k + 2] = _mm512_unpacklo_epi64(a[4 * k + 1], a[4 * k + 3]);
            b[4 * k + 3] = _mm512_unpackhi_epi64(a[4 * k + 1], a[4 * k + 3]);
        }
        // Column 4l + m: quarter l of b[m], b[4 + m], b[8 + m], b[12 + m].
        let mut out = [_mm512_setzero_si512(); 16];
        for m in 0..4 {
            let c0 = _mm512_shuffle_i32x4::<0x44>(b[m], b[4 + m]);
            let c1 = _mm512_shuffle_i32x4::<0xee>(b[m], b[4 + m]);
            let c2 = _mm512_shuffle_i32x4::<0x44>(b[8 + m], b[12 + m]);
            let c3 = _mm512_shuffle_i32x4::<0xee>(b[8 + m], b[12 + m]);
            out[m] = _mm512_shuffle_i32x4::<0x88>(c0, c2);
            out[4 + m] = _mm512_shuffle_i32x4::<0xdd>(c0, c2);
            out[8 + m] = _mm512_shuffle_i32x4::<0x88>(c1, c3);
            out[12 + m] = _mm512_shuffle_i32x4::<0xdd>(c1, c3);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The transposing packing of contiguous rows gives the gathers' words, bit for bit: rows
    /// and dims that fill no tile evenly, rows wider than their dims.
    #[test]
    fn packing_rows_matches_the_gathers() {
        if !std::arch::is_x86_feature_detected!("avx512bw") {
            eprintln!("no AVX-512 BW here: skipped");
            return;
        }
        for (n, &(keys, dims, stride)) in
            [(37, 40, 43), (16, 32, 32), (1, 8, 8), (70, 128, 131), (128, 64, 768)].iter().enumerate()
        {
            let src = rand(keys * stride, 11 + n as u64);
            let (pairs, lanes) = (
                Axis { stride: 1, len: dims, padded: dims.next_multiple_of(32) },
                Axis { stride, len: keys, padded: keys.next_multiple_of(32) },
            );
            let words = pairs.padded * lanes.padded / 2;
            let (mut fast, mut gathered) = (vec![7u32; words], vec![9u32; words]);
            // SAFETY: AVX-512 BW is here; `src` holds `keys` rows of `dims` at `stride`, the
            // outputs the padded words.
            unsafe {
                pack_pairs(src.as_ptr(), pairs, lanes, fast.as_mut_ptr());
                pack_gathered(src.as_ptr(), pairs, lanes, gathered.as_mut_ptr());
            }
            assert_eq!(fast, gathered, "keys {keys} dims {dims} stride {stride}");
        }
    }

    /// `x` rounded to bf16, as f32 (what the tiles multiply).
    fn round_bf16(x: f32) -> f32 {
        let b = x.to_bits();
        f32::from_bits((b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) << 16)
    }

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    /// What the tiles compute, in f64 from the same bf16 roundings: scores from rounded Q and
    /// K, the softmax's unnormalized probabilities rounded (their sum too), then rounded V.
    fn emulate(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (sq, sk, d, dv): (usize, usize, usize, usize),
        ld: [usize; 3],
    ) -> Vec<f32> {
        let r = |x: f32| round_bf16(x) as f64;
        let mut out = vec![0f32; sq * dv];
        for i in 0..sq {
            let s: Vec<f64> = (0..sk)
                .map(|j| (0..d).map(|p| r(q[i * ld[0] + p]) * r(k[j * ld[1] + p])).sum::<f64>() as f32 as f64)
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| r(((x - m) as f32).exp())).collect();
            let sum: f64 = e.iter().sum();
            for c in 0..dv {
                out[i * dv + c] = ((0..sk).map(|j| e[j] * r(v[j * ld[2] + c])).sum::<f64>() / sum) as f32;
            }
        }
        out
    }

    /// Each engine this CPU has against [`emulate`] on shapes that fill no tile evenly (and
    /// some that do, BERT's among them): head dims 8 to 128 (one to four Q chunks), 1 to 128
    /// keys, 5 to 72 value columns (one or two groups of context tiles), rows past one block,
    /// strides wider than the rows.
    #[test]
    fn engines_compute_attention_in_bf16() {
        let engines: Vec<Engine> = Engine::ALL.into_iter().filter(|e| e.supported()).collect();
        if engines.is_empty() {
            eprintln!("neither AMX-BF16 nor AVX-512 BF16 here: skipped");
            return;
        }
        for (n, &(sq, sk, d, dv), &engine) in
            [(37, 37, 40, 40), (16, 32, 64, 64), (5, 1, 8, 5), (33, 70, 128, 72), (17, 48, 96, 16), (128, 128, 64, 64)]
                .iter()
                .enumerate()
                .flat_map(|(n, s)| engines.iter().map(move |e| (n, s, e)))
        {
            let ld = [d + 3, d + 5, dv + 7];
            let (q, k, v) = (
                rand(sq * ld[0], 3 * n as u64 + 1),
                rand(sk * ld[1], 3 * n as u64 + 2),
                rand(sk * ld[2], 3 * n as u64 + 3),
            );
            let want = emulate(&q, &k, &v, (sq, sk, d, dv), ld);
            // K and V as given (rows of a key's dims, of a key's columns), and transposed (as
            // exporters that transpose K before its product, or V, leave them).
            let (kt_ld, vt_ld) = (sk + 2, sk + 1);
            let mut k_t = vec![f32::NAN; d * kt_ld];
            let mut v_t = vec![f32::NAN; dv * vt_ld];
            for j in 0..sk {
                (0..d).for_each(|p| k_t[p * kt_ld + j] = k[j * ld[1] + p]);
                (0..dv).for_each(|c| v_t[c * vt_ld + j] = v[j * ld[2] + c]);
            }
            let layouts = [(&k, 1, ld[1], &v, ld[2], 1), (&k_t, kt_ld, 1, &v_t, 1, vt_ld)];
            for (l, &(k, k_dim, k_key, v, v_key, v_col)) in layouts.iter().enumerate() {
                let mut out = vec![f32::NAN; sq * dv];
                let h = Head {
                    q: q.as_ptr(),
                    ldq: ld[0],
                    k: k.as_ptr(),
                    k_dim,
                    k_key,
                    v: v.as_ptr(),
                    v_key,
                    v_col,
                    rows: sq,
                    sk,
                    d,
                    dv,
                    out: out.as_mut_ptr(),
                    ldo: dv,
                    nan_to_zero: false,
                    row0: 0,
                };
                let mut scratch = vec![0u32; scratch_len(&h)];
                // SAFETY: the engine is supported; the buffers have the sizes `h` describes.
                unsafe { attention_head(engine, &h, None, &mut scratch) };
                // The kernel's f32 scores and its short `exp` can put a probability on the
                // other side of a bf16 rounding boundary than the emulation: one bf16 step
                // (2^-8) of one probability moves an output by at most 2^-8 of the largest |V|.
                let vmax = v.iter().filter(|x| !x.is_nan()).fold(0f32, |m, x| m.max(x.abs()));
                for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                    let shape = (sq, sk, d, dv);
                    assert!(
                        (a - b).abs() <= vmax / 256.0,
                        "{engine:?} shape {shape:?} layout {l}: element {i}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn rounding_to_bf16_is_to_nearest_even() {
        assert_eq!(round_bf16(1.0), 1.0);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even one, 1.
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(round_bf16(-2.5e-3).to_bits() & 0xffff, 0);
        assert!((round_bf16(0.1) - 0.1).abs() <= 0.1 / 256.0);
    }
}

//! Integer products on CPUs without AVX-512 VNNI: `i16` pairs multiplied by `pmaddwd`.
//!
//! `pmaddubsw` (AVX2's `u8 x s8`) saturates its pairwise sums at `i16`, so full-range `s8`
//! weights would need 7-bit weights (onnxruntime's `reduce_range`), which changes the model's
//! numbers on every CPU since artifacts do not know where they will run. Here both operands
//! are widened instead: the activations as `q - zero` (in `[-255, 255]`), the weights as they
//! are, each 32-bit lane of `pmaddwd` (`vpdpwssd` with AVX-VNNI) summing two products into an
//! exact `i32`. Half the rate of `vpdpbusd`, twice that of f32 FMA per instruction, and the
//! same integers as the reference (`sum (q - zero) w` with no saturation anywhere).
//!
//! Layout: a *pair* is two `i16` in one 4-byte unit, the element at the lower address first,
//! and the GEMM driver treats pairs as it treats floats (it only moves addresses). A row of
//! activations is `k` values padded with a zero to [`pairs`]`(k)` pairs; weights are packed as
//! the f32 panels are, in panels of [`NR`] columns, one row of pairs per two rows of `k`: column
//! `j` of pair-row `p` holds `(w[2p][j], w[2p + 1][j])`. The micro-kernels have the
//! [`super::MicroKernel`] signature with `k` counted in pairs, and write the sums as f32 (the
//! conversion the reference makes), so the generated epilogues run unchanged after them.

use super::NR;

/// Pairs in a row of `k` values.
pub fn pairs(k: usize) -> usize {
    k.div_ceil(2)
}

/// Two `i16` as a pair unit (bits only: the unit is never used as a float).
#[inline(always)]
pub fn pair(lo: i16, hi: i16) -> f32 {
    f32::from_bits(u32::from(lo as u16) | (u32::from(hi as u16) << 16))
}

/// Packs `k x n` row-major `s8` weights into panels of [`NR`] columns of pairs (rows past `k`
/// and columns past `n` are zero): `pairs(k) * NR` units per panel.
pub fn pack_b_pairs(k: usize, n: usize, w: &[i8]) -> Vec<f32> {
    assert_eq!(w.len(), k * n, "pack_b_pairs: {k} x {n} weights, got {}", w.len());
    let (kp, panels) = (pairs(k), n.div_ceil(NR));
    let at = |r: usize, c: usize| if r < k && c < n { i16::from(w[r * n + c]) } else { 0 };
    let mut out = Vec::with_capacity(panels * kp * NR);
    for p in 0..panels {
        for q in 0..kp {
            for c in p * NR..(p + 1) * NR {
                out.push(pair(at(2 * q, c), at(2 * q + 1, c)));
            }
        }
    }
    out
}

/// Whether this CPU has the AVX2 kernel.
pub fn avx2_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The best native kernel for this CPU and its tile height: AVX-VNNI's `vpdpwssd`, else AVX2's
/// `pmaddwd` (`None`: the portable tier's generated kernel runs).
pub fn native_kernel() -> Option<(super::MicroKernel, usize)> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avxvnni") && avx2_supported() {
            return Some((x86::vnni_6x32, x86::MR));
        }
        if avx2_supported() {
            return Some((x86::avx2_6x32, x86::MR));
        }
    }
    None
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    #![allow(clippy::too_many_arguments)] // micro-kernel signatures are wide by nature

    use super::super::{Prefetch, NR};
    use std::arch::x86_64::*;

    /// Rows of the tile: 12 `i32` accumulators (6 rows x 16 columns), two weight vectors and
    /// the broadcast activation pair fit the 16 ymm registers.
    pub const MR: usize = 6;

    /// `acc + pmaddwd(a, b)`: AVX2 in two instructions, AVX-VNNI in one.
    trait Madd {
        unsafe fn madd(acc: __m256i, a: __m256i, b: __m256i) -> __m256i;
    }
    struct Avx2;
    struct Vnni;
    impl Madd for Avx2 {
        #[inline(always)]
        unsafe fn madd(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
            // SAFETY: only called from the AVX2 kernel's `#[target_feature]` body.
            unsafe { _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)) }
        }
    }
    impl Madd for Vnni {
        #[inline(always)]
        unsafe fn madd(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
            // SAFETY: only called from the AVX-VNNI kernel's `#[target_feature]` body.
            unsafe { _mm256_dpwssd_avx_epi32(acc, a, b) }
        }
    }

    #[inline(always)]
    unsafe fn half<K: Madd, const R: usize>(
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        n: usize,
        accumulate: bool,
        pf: &mut Prefetch,
    ) {
        // SAFETY (whole body): the caller guarantees the CPU features, that `a` covers R rows
        // of `k` pairs at stride `lda` (units), `b` points into a panel row with 16 readable
        // units per step of NR, and `c` covers R rows of `n <= 16` floats at stride `ldc`.
        unsafe {
            let mut acc0 = [_mm256_setzero_si256(); R];
            let mut acc1 = [_mm256_setzero_si256(); R];
            let a = a as *const i32;
            let b = b as *const __m256i;
            for p in 0..k {
                pf.step();
                let b0 = _mm256_loadu_si256(b.add(p * NR / 8));
                let b1 = _mm256_loadu_si256(b.add(p * NR / 8 + 1));
                for r in 0..R {
                    let av = _mm256_set1_epi32(a.add(r * lda + p).read_unaligned());
                    acc0[r] = K::madd(acc0[r], av, b0);
                    acc1[r] = K::madd(acc1[r], av, b1);
                }
            }
            for r in 0..R {
                let (v0, v1) = (_mm256_cvtepi32_ps(acc0[r]), _mm256_cvtepi32_ps(acc1[r]));
                super::super::avx2::store16(c.add(r * ldc), v0, v1, n, accumulate);
            }
        }
    }

    #[inline(always)]
    unsafe fn kernel<K: Madd>(
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        m: usize,
        n: usize,
        accumulate: u32,
        pf: *const u8,
        pf_lines: usize,
    ) {
        let acc = accumulate != 0;
        let mut pf = Prefetch::new(pf, pf_lines, k);
        macro_rules! rows {
            ($r:literal) => {{
                // SAFETY: forwarded contract; the second half starts 16 units into the panel
                // row and 16 columns into C, and is skipped when `n <= 16`.
                unsafe {
                    half::<K, $r>(k, a, lda, b, c, ldc, n.min(16), acc, &mut pf);
                    if n > 16 {
                        half::<K, $r>(k, a, lda, b.add(16), c.add(16), ldc, n - 16, acc, &mut pf);
                    }
                }
            }};
        }
        match m {
            6.. => rows!(6),
            5 => rows!(5),
            4 => rows!(4),
            3 => rows!(3),
            2 => rows!(2),
            1 => rows!(1),
            0 => {}
        }
    }

    /// The AVX2 pair kernel ([`super::super::MicroKernel`] over pairs), for `m <= 6`.
    ///
    /// # Safety
    /// The CPU must have AVX2 and the pointers must cover the ranges of the contract.
    #[target_feature(enable = "avx2")]
    pub unsafe extern "C" fn avx2_6x32(
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        m: usize,
        n: usize,
        accumulate: u32,
        pf: *const u8,
        pf_lines: usize,
    ) {
        // SAFETY: forwarded contract; AVX2 is enabled on this function.
        unsafe { kernel::<Avx2>(k, a, lda, b, c, ldc, m, n, accumulate, pf, pf_lines) }
    }

    /// The AVX-VNNI pair kernel (`vpdpwssd` on ymm), for `m <= 6`.
    ///
    /// # Safety
    /// The CPU must have AVX2 and AVX-VNNI and the pointers must cover the ranges of the
    /// contract.
    #[target_feature(enable = "avx2,avxvnni")]
    pub unsafe extern "C" fn vnni_6x32(
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        m: usize,
        n: usize,
        accumulate: u32,
        pf: *const u8,
        pf_lines: usize,
    ) {
        // SAFETY: forwarded contract; AVX2 and AVX-VNNI are enabled on this function.
        unsafe { kernel::<Vnni>(k, a, lda, b, c, ldc, m, n, accumulate, pf, pf_lines) }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Full-range operands: activations `q - zero` in `[-255, 255]`, weights in `[-128, 127]`.
    pub(crate) fn operands(m: usize, k: usize, n: usize, seed: u64) -> (Vec<i16>, Vec<i8>) {
        let mut s = seed;
        let mut next = move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let a = (0..m * k).map(|_| (next() % 511) as i16 - 255).collect();
        let w = (0..k * n).map(|_| (next() % 256) as i32 as u8 as i8).collect();
        (a, w)
    }

    /// `a` (`m x k`) as rows of pairs, `lda` units apart.
    pub(crate) fn pair_rows(m: usize, k: usize, a: &[i16], lda: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * lda];
        for r in 0..m {
            for q in 0..pairs(k) {
                let at = |i: usize| if i < k { a[r * k + i] } else { 0 };
                out[r * lda + q] = pair(at(2 * q), at(2 * q + 1));
            }
        }
        out
    }

    /// The sums as the reference converts them: the exact `i32`, then to f32.
    pub(crate) fn expected(m: usize, k: usize, n: usize, a: &[i16], w: &[i8]) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: i32 = (0..k).map(|p| i32::from(a[i * k + p]) * i32::from(w[p * n + j])).sum();
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    /// Runs `kernel` (tile height `mr`) over every tile and panel of an `m x k x n` product.
    pub(crate) fn check(kernel: super::super::MicroKernel, mr: usize, m: usize, k: usize, n: usize) {
        let (a, w) = operands(m, k, n, (m * 31 + k * 7 + n) as u64);
        let lda = pairs(k) + 3;
        let ar = pair_rows(m, k, &a, lda);
        let packed = pack_b_pairs(k, n, &w);
        let ldc = n + 5;
        let mut c = vec![f32::NAN; m * ldc];
        for p in 0..n.div_ceil(NR) {
            for i in (0..m).step_by(mr) {
                let nb = (n - p * NR).min(NR);
                // SAFETY: rows i..i+mb of A (pairs(k) units each) and of C (nb columns from
                // panel p's first) and panel p of B (pairs(k) * NR units) lie in the buffers.
                unsafe {
                    kernel(
                        pairs(k),
                        ar.as_ptr().add(i * lda),
                        lda,
                        packed.as_ptr().add(p * pairs(k) * NR),
                        c.as_mut_ptr().add(i * ldc + p * NR),
                        ldc,
                        (m - i).min(mr),
                        nb,
                        0,
                        std::ptr::null(),
                        0,
                    )
                };
            }
        }
        let want = expected(m, k, n, &a, &w);
        for i in 0..m {
            for j in 0..n {
                assert_eq!(
                    c[i * ldc + j].to_bits(),
                    want[i * n + j].to_bits(),
                    "({i}, {j}) of {m}x{k}x{n}: {} vs {}",
                    c[i * ldc + j],
                    want[i * n + j]
                );
            }
            assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|v| v.is_nan()), "row {i} written past n");
        }
    }

    /// Shapes with partial tiles and panels, odd `k`, and `k` long enough that sums pass 2^24
    /// (where f32 accumulation would round).
    pub(crate) const SHAPES: [(usize, usize, usize); 6] =
        [(1, 1, 1), (7, 5, 33), (13, 37, 70), (6, 384, 32), (12, 1031, 48), (5, 4096, 17)];

    #[test]
    fn pack_pairs_layout() {
        let (k, n) = (3, 35);
        let w: Vec<i8> = (0..k * n).map(|i| (i as i32 - 50) as i8).collect();
        let p = pack_b_pairs(k, n, &w);
        assert_eq!(p.len(), 2 * 2 * NR);
        let units = |u: f32| ((u.to_bits() & 0xffff) as u16 as i16, (u.to_bits() >> 16) as u16 as i16);
        assert_eq!(units(p[0]), (i16::from(w[0]), i16::from(w[n])));
        assert_eq!(units(p[NR + 4]), (i16::from(w[2 * n + 4]), 0), "odd k pads with zero");
        assert_eq!(units(p[2 * 2 * NR - 1]), (0, 0), "columns past n are zero");
        assert_eq!(units(p[2 * NR + 2]), (i16::from(w[34]), i16::from(w[n + 34])));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_and_vnni_kernels_are_exact_on_full_range_data() {
        let mut ran = 0;
        if avx2_supported() {
            for (m, k, n) in SHAPES {
                check(x86::avx2_6x32, x86::MR, m, k, n);
            }
            ran += 1;
        }
        if avx2_supported() && std::arch::is_x86_feature_detected!("avxvnni") {
            for (m, k, n) in SHAPES {
                check(x86::vnni_6x32, x86::MR, m, k, n);
            }
            ran += 1;
        }
        eprintln!("pair kernels checked: {ran}");
    }

    #[test]
    fn generated_kernel_is_exact_on_full_range_data() {
        let jit = crate::jit::Jit::new(super::super::Tier::Portable, &[]).expect("portable JIT");
        assert_eq!(jit.pair_mr, 4);
        for (m, k, n) in SHAPES {
            check(jit.pair_kernel, jit.pair_mr, m, k, n);
        }
    }
}

//! The AVX-512 micro-kernel: a 12 x 32 tile of C in 24 zmm accumulators; per step of `k`, two
//! loads of the packed panel and twelve broadcasts of A feed 24 FMAs.

#![allow(clippy::too_many_arguments)] // micro-kernel signatures are wide by nature

use super::{Prefetch, NR};
use std::arch::x86_64::*;

#[inline(always)]
unsafe fn tile<const MR: usize>(
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    n: usize,
    accumulate: bool,
    mut pf: Prefetch,
) {
    // SAFETY (whole body): the caller guarantees AVX-512F, that `a` covers MR rows of `k`
    // elements at stride `lda`, `b` covers `k * NR` elements, and `c` covers MR rows of `n`
    // elements at stride `ldc`; masked loads and stores touch only those `n` columns.
    unsafe {
        let mut acc0 = [_mm512_setzero_ps(); MR];
        let mut acc1 = [_mm512_setzero_ps(); MR];
        for p in 0..k {
            pf.step();
            let b0 = _mm512_loadu_ps(b.add(p * NR));
            let b1 = _mm512_loadu_ps(b.add(p * NR + 16));
            for r in 0..MR {
                let av = _mm512_set1_ps(*a.add(r * lda + p));
                acc0[r] = _mm512_fmadd_ps(av, b0, acc0[r]);
                acc1[r] = _mm512_fmadd_ps(av, b1, acc1[r]);
            }
        }
        let [m0, m1] = super::tile_masks(n);
        for r in 0..MR {
            let cp = c.add(r * ldc);
            let (mut v0, mut v1) = (acc0[r], acc1[r]);
            if accumulate {
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, cp));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, cp.add(16)));
            }
            _mm512_mask_storeu_ps(cp, m0, v0);
            _mm512_mask_storeu_ps(cp.add(16), m1, v1);
        }
    }
}

/// The tier's micro-kernel ([`super::MicroKernel`]), for `m <= 12`.
///
/// # Safety
/// The CPU must have AVX-512F and the pointers must cover the ranges of the contract.
#[target_feature(enable = "avx512f")]
pub unsafe extern "C" fn sgemm_12x32(
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
    let pf = Prefetch::new(pf, pf_lines, k);
    // SAFETY: forwarded contract; `m` selects a tile no taller than the rows the caller owns.
    unsafe {
        match m {
            12.. => tile::<12>(k, a, lda, b, c, ldc, n, acc, pf),
            11 => tile::<11>(k, a, lda, b, c, ldc, n, acc, pf),
            10 => tile::<10>(k, a, lda, b, c, ldc, n, acc, pf),
            9 => tile::<9>(k, a, lda, b, c, ldc, n, acc, pf),
            8 => tile::<8>(k, a, lda, b, c, ldc, n, acc, pf),
            7 => tile::<7>(k, a, lda, b, c, ldc, n, acc, pf),
            6 => tile::<6>(k, a, lda, b, c, ldc, n, acc, pf),
            5 => tile::<5>(k, a, lda, b, c, ldc, n, acc, pf),
            4 => tile::<4>(k, a, lda, b, c, ldc, n, acc, pf),
            3 => tile::<3>(k, a, lda, b, c, ldc, n, acc, pf),
            2 => tile::<2>(k, a, lda, b, c, ldc, n, acc, pf),
            1 => tile::<1>(k, a, lda, b, c, ldc, n, acc, pf),
            0 => {}
        }
    }
}

/// The benchmark baseline: one row at a time.
#[target_feature(enable = "avx512f")]
pub unsafe fn reference(
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    m: usize,
    n: usize,
    accumulate: u32,
) {
    // SAFETY: as `sgemm_12x32`.
    unsafe {
        let [m0, m1] = super::tile_masks(n);
        for r in 0..m {
            let mut v0 = _mm512_setzero_ps();
            let mut v1 = _mm512_setzero_ps();
            for p in 0..k {
                let av = _mm512_set1_ps(*a.add(r * lda + p));
                v0 = _mm512_fmadd_ps(av, _mm512_loadu_ps(b.add(p * NR)), v0);
                v1 = _mm512_fmadd_ps(av, _mm512_loadu_ps(b.add(p * NR + 16)), v1);
            }
            let cp = c.add(r * ldc);
            if accumulate != 0 {
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, cp));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, cp.add(16)));
            }
            _mm512_mask_storeu_ps(cp, m0, v0);
            _mm512_mask_storeu_ps(cp.add(16), m1, v1);
        }
    }
}

/// See `kernels::reference_gemm_avx512`.
#[target_feature(enable = "avx512f")]
pub unsafe fn reference_gemm(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    // SAFETY: the caller guarantees the sizes; every access below is within them.
    unsafe {
        for p in 0..n.div_ceil(NR) {
            let cols = NR.min(n - p * NR);
            let bp = b.as_ptr().add(p * k * NR);
            let mut i = 0;
            while i < m {
                let rows = 12.min(m - i);
                let ap = a.as_ptr().add(i * k);
                let cp = c.as_mut_ptr().add(i * n + p * NR);
                match rows {
                    12 => plain::<12>(k, ap, k, bp, cp, n, cols),
                    r => {
                        for j in 0..r {
                            plain::<1>(k, ap.add(j * k), k, bp, cp.add(j * n), n, cols)
                        }
                    }
                }
                i += rows;
            }
        }
    }
}

#[inline(always)]
unsafe fn plain<const MR: usize>(
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    n: usize,
) {
    // SAFETY: as `reference_gemm`.
    unsafe {
        let mut acc0 = [_mm512_setzero_ps(); MR];
        let mut acc1 = [_mm512_setzero_ps(); MR];
        for p in 0..k {
            let b0 = _mm512_loadu_ps(b.add(p * NR));
            let b1 = _mm512_loadu_ps(b.add(p * NR + 16));
            for r in 0..MR {
                let av = _mm512_set1_ps(*a.add(r * lda + p));
                acc0[r] = _mm512_fmadd_ps(av, b0, acc0[r]);
                acc1[r] = _mm512_fmadd_ps(av, b1, acc1[r]);
            }
        }
        let [m0, m1] = super::tile_masks(n);
        for r in 0..MR {
            _mm512_mask_storeu_ps(c.add(r * ldc), m0, acc0[r]);
            _mm512_mask_storeu_ps(c.add(r * ldc + 16), m1, acc1[r]);
        }
    }
}

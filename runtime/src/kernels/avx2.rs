//! The AVX2 micro-kernel: 6 x 16 tiles in 12 ymm accumulators, run on each 16-column half of a
//! 32-wide panel.

#![allow(clippy::too_many_arguments)] // micro-kernel signatures are wide by nature

use super::{Prefetch, NR};
use std::arch::x86_64::*;

#[inline(always)]
unsafe fn half<const MR: usize>(
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
    // SAFETY (whole body): the caller guarantees AVX2+FMA, that `a` covers MR rows of `k`
    // elements at stride `lda`, `b` points into a panel row with 16 readable floats per step of
    // NR, and `c` covers MR rows of `n <= 16` elements at stride `ldc`. Partial tiles go
    // through a stack buffer so that only `n` columns are touched.
    unsafe {
        let mut acc0 = [_mm256_setzero_ps(); MR];
        let mut acc1 = [_mm256_setzero_ps(); MR];
        for p in 0..k {
            pf.step();
            let b0 = _mm256_loadu_ps(b.add(p * NR));
            let b1 = _mm256_loadu_ps(b.add(p * NR + 8));
            for r in 0..MR {
                let av = _mm256_set1_ps(*a.add(r * lda + p));
                acc0[r] = _mm256_fmadd_ps(av, b0, acc0[r]);
                acc1[r] = _mm256_fmadd_ps(av, b1, acc1[r]);
            }
        }
        for r in 0..MR {
            store16(c.add(r * ldc), acc0[r], acc1[r], n, accumulate);
        }
    }
}

/// Stores (or with `accumulate` adds) the first `n <= 16` of a row's 16 values `v0, v1` at `cp`;
/// a partial row goes through a stack buffer so that only `n` floats are touched.
///
/// # Safety
/// AVX2 is enabled in the caller and `cp` covers `n` floats.
#[inline(always)]
pub(super) unsafe fn store16(cp: *mut f32, v0: __m256, v1: __m256, n: usize, accumulate: bool) {
    // SAFETY: forwarded contract.
    unsafe {
        if n == 16 {
            let (mut v0, mut v1) = (v0, v1);
            if accumulate {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(cp));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(cp.add(8)));
            }
            _mm256_storeu_ps(cp, v0);
            _mm256_storeu_ps(cp.add(8), v1);
        } else {
            let mut tmp = [0f32; 16];
            _mm256_storeu_ps(tmp.as_mut_ptr(), v0);
            _mm256_storeu_ps(tmp.as_mut_ptr().add(8), v1);
            for (j, t) in tmp.iter().enumerate().take(n) {
                let dst = cp.add(j);
                *dst = if accumulate { *dst + t } else { *t };
            }
        }
    }
}

#[inline(always)]
unsafe fn panel<const MR: usize>(
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    n: usize,
    acc: bool,
    mut pf: Prefetch,
) {
    // SAFETY: forwarded; the second half starts 16 floats into the panel row and 16 columns
    // into C, and is skipped when `n <= 16`.
    unsafe {
        half::<MR>(k, a, lda, b, c, ldc, n.min(16), acc, &mut pf);
        if n > 16 {
            half::<MR>(k, a, lda, b.add(16), c.add(16), ldc, n - 16, acc, &mut pf);
        }
    }
}

/// The tier's micro-kernel ([`super::MicroKernel`]), for `m <= 6`.
///
/// # Safety
/// The CPU must have AVX2 and FMA and the pointers must cover the ranges of the contract.
#[target_feature(enable = "avx2,fma")]
pub unsafe extern "C" fn sgemm_6x32(
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
    // SAFETY: forwarded contract.
    unsafe {
        match m {
            6.. => panel::<6>(k, a, lda, b, c, ldc, n, acc, pf),
            5 => panel::<5>(k, a, lda, b, c, ldc, n, acc, pf),
            4 => panel::<4>(k, a, lda, b, c, ldc, n, acc, pf),
            3 => panel::<3>(k, a, lda, b, c, ldc, n, acc, pf),
            2 => panel::<2>(k, a, lda, b, c, ldc, n, acc, pf),
            1 => panel::<1>(k, a, lda, b, c, ldc, n, acc, pf),
            0 => {}
        }
    }
}

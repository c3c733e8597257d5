//! Integer GEMM for quantized models: `u8` activations times `s8` weights, summed in `i32`.
//!
//! The first kernel is AVX-512 VNNI (`vpdpbusd`: for each 32-bit lane, the dot product of four
//! `u8` with four `s8`, added to the lane, without saturation). Weights are packed once in
//! panels of [`NR`] columns: for each group of four rows of `k`, the panel's 32 columns hold
//! their four bytes each, 128 contiguous bytes: one 64-byte vector per 16 columns. Activations
//! are rows of `k` bytes padded to a multiple of four (the runtime quantizes them itself, into
//! buffers it pads). Every kernel is checked bit for bit against [`reference`] on full-range
//! data.

use super::NR;

/// `k` rounded up to the group of four rows a `vpdpbusd` lane sums.
pub fn k_groups(k: usize) -> usize {
    k.div_ceil(4)
}

/// Packs `k x n` row-major `s8` weights into panels of [`NR`] columns: per panel, per group of
/// four rows, `NR` columns of four bytes (rows past `k` and columns past `n` are zero).
pub fn pack_b_s8(k: usize, n: usize, w: &[i8]) -> Vec<i8> {
    assert_eq!(w.len(), k * n, "pack_b_s8: {k} x {n} weights, got {}", w.len());
    let (groups, panels) = (k_groups(k), n.div_ceil(NR));
    let mut out = vec![0i8; panels * groups * NR * 4];
    for p in 0..panels {
        for g in 0..groups {
            for c in 0..NR {
                for r in 0..4 {
                    let (row, col) = (g * 4 + r, p * NR + c);
                    if row < k && col < n {
                        out[((p * groups + g) * NR + c) * 4 + r] = w[row * n + col];
                    }
                }
            }
        }
    }
    out
}

/// Symmetric per-column quantization of `k x n` row-major `f32` weights to `s8` in
/// `[-127, 127]`: `w[i, j] ~ q[i, j] * scale[j]`, `scale[j] = max_i |w[i, j]| / 127` (1 for a
/// column of zeros), rounding half to even. Returns `(q, scale)`.
pub fn quantize_per_column(k: usize, n: usize, w: &[f32]) -> (Vec<i8>, Vec<f32>) {
    let mut scale = vec![0f32; n];
    for row in w.chunks(n.max(1)).take(k) {
        for (s, &v) in scale.iter_mut().zip(row) {
            *s = s.max(v.abs());
        }
    }
    for s in &mut scale {
        *s = if *s > 0.0 && s.is_finite() { *s / 127.0 } else { 1.0 };
    }
    let q = w
        .iter()
        .enumerate()
        .map(|(i, &v)| (v / scale[i % n.max(1)]).round_ties_even().clamp(-127.0, 127.0) as i8)
        .collect();
    (q, scale)
}

/// The `k x n` row-major weights of [`pack_b_s8`]'s panels (`packed` must hold them all).
pub fn unpack_b_s8(k: usize, n: usize, packed: &[i8]) -> Vec<i8> {
    let groups = k_groups(k);
    let mut w = vec![0i8; k * n];
    for row in 0..k {
        for col in 0..n {
            let (p, c, g, r) = (col / NR, col % NR, row / 4, row % 4);
            w[row * n + col] = packed[((p * groups + g) * NR + c) * 4 + r];
        }
    }
    w
}

/// The column sums of [`pack_b_s8`]'s weights: `sum_k (q_a - z) w = sum_k q_a w - z colsum`.
/// With VNNI, one `vpdpbusd` of ones per group of four rows and 16 columns (a model's weights
/// are summed at load: BERT-base's 85 MB in milliseconds, not a tenth of a second).
pub fn colsums(k: usize, n: usize, packed: &[i8]) -> Vec<i32> {
    let groups = k_groups(k);
    #[cfg(target_arch = "x86_64")]
    if vnni512_supported() && packed.len() >= n.div_ceil(NR) * groups * NR * 4 {
        let mut sums = vec![0i32; n.div_ceil(NR) * NR];
        // SAFETY: VNNI is present; `packed` holds every panel (checked), `sums` every column.
        unsafe { vnni512::colsums(groups, n.div_ceil(NR), packed.as_ptr(), sums.as_mut_ptr()) };
        sums.truncate(n);
        return sums;
    }
    let mut sums = vec![0i32; n];
    for (col, s) in sums.iter_mut().enumerate() {
        let (p, c) = (col / NR, col % NR);
        for g in 0..groups {
            let at = ((p * groups + g) * NR + c) * 4;
            *s += packed[at..at + 4].iter().map(|&v| v as i32).sum::<i32>();
        }
    }
    sums
}

/// Per-row activation quantization parameters and the weights' column sums of an integer
/// product with `f32` output: `C[i, j] = ((A.B)[i, j] - zero[i] * colsum[j]) as f32 * scale[i]`,
/// then `* colscale[j]` when `colscale` is not null (the weights' scales, the epilogue's first
/// instruction done in the same pass: the same operations in the same order).
#[derive(Clone, Copy)]
pub struct Dequant {
    pub scale: *const f32,
    pub zero: *const i32,
    pub colsum: *const i32,
    pub colscale: *const f32,
}

/// [`gemm_u8s8_panels`] into `f32`: each tile of up to 12 rows by one panel is summed in
/// `i32` registers and stored dequantized ([`Dequant`]); each panel's rows are then handed to
/// `epilogue(row, rows, col, cols)` while they are in L1.
///
/// # Safety
/// As [`gemm_u8s8_panels`] with `c` holding `f32`; `dq.scale` and `dq.zero` hold `m`
/// values, `dq.colsum` `n`, `dq.colscale` is null or holds `n`; `epilogue` may touch only
/// the rows and columns it is given (all `m` rows of one panel's columns).
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_u8s8_f32_panels(
    m: usize,
    groups: usize,
    a: *const u8,
    lda: usize,
    packed: *const i8,
    c: *mut f32,
    ldc: usize,
    n: usize,
    (p0, p1): (usize, usize),
    dq: Dequant,
    epilogue: &dyn Fn(usize, usize, usize, usize),
) {
    #[cfg(target_arch = "x86_64")]
    walk_panels(
        m,
        groups,
        packed,
        n,
        (p0, p1),
        |p, i, rows, cols, bp, pf| {
            let tile_dq = Dequant {
                scale: dq.scale.wrapping_add(i),
                zero: dq.zero.wrapping_add(i),
                colsum: dq.colsum.wrapping_add(p * NR),
                colscale: if dq.colscale.is_null() { dq.colscale } else { dq.colscale.wrapping_add(p * NR) },
            };
            let cp = c.wrapping_add(i * ldc + p * NR);
            // SAFETY: the caller's contract, as in `gemm_u8s8_panels`; the dequantization
            // reads rows i..i+rows of the parameters and this panel's columns of the sums and
            // scales; a prefetch never faults.
            unsafe {
                vnni512::tile_any(
                    rows,
                    groups,
                    a.wrapping_add(i * lda),
                    lda,
                    bp,
                    vnni512::Store::F32(cp, tile_dq),
                    ldc,
                    cols,
                    pf,
                )
            };
        },
        // The panel's rows are in L1 (m x 32 floats): one epilogue call for all of them.
        |p, cols| epilogue(0, m, p * NR, cols),
    );
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (m, groups, a, lda, packed, c, ldc, n, p0, p1, dq, epilogue);
}

/// `C[m x n] = A[m x k] . B[k x n]` in `i32`, the plain definition: the oracle of the kernels.
#[allow(clippy::too_many_arguments)] // a GEMM's shape, operands and strides
pub fn reference(m: usize, k: usize, n: usize, a: &[u8], lda: usize, b: &[i8], c: &mut [i32], ldc: usize) {
    for i in 0..m {
        for j in 0..n {
            c[i * ldc + j] = (0..k).map(|p| a[i * lda + p] as i32 * b[p * n + j] as i32).sum();
        }
    }
}

/// Whether this CPU runs the AVX-512 VNNI kernel.
pub fn vnni512_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `C = A . B` over whole panels with the AVX-512 VNNI micro-kernel: `a` is `m` rows of
/// `lda >= 4 * k_groups(k)` bytes (the bytes past `k` zero), `packed` is [`pack_b_s8`] of the
/// `k x n` weights, `c` is `m` rows of `ldc >= n` `i32`. Returns `None` when the CPU lacks
/// VNNI or the buffers are too small.
#[allow(clippy::too_many_arguments)]
pub fn gemm_u8s8(
    m: usize,
    k: usize,
    n: usize,
    a: &[u8],
    lda: usize,
    packed: &[i8],
    c: &mut [i32],
    ldc: usize,
) -> Option<()> {
    let groups = k_groups(k);
    let panels = n.div_ceil(NR);
    let fits = lda >= groups * 4
        && ldc >= n
        && (m == 0 || a.len() >= (m - 1) * lda + groups * 4)
        && packed.len() >= panels * groups * NR * 4
        && (m == 0 || c.len() >= (m - 1) * ldc + n);
    if !fits || !vnni512_supported() {
        return None;
    }
    // SAFETY: the sizes were checked just above, the CPU features too.
    unsafe { gemm_u8s8_panels(m, groups, a.as_ptr(), lda, packed.as_ptr(), c.as_mut_ptr(), ldc, n, 0, panels) };
    Some(())
}

/// [`gemm_u8s8`] on panels `p0..p1` only (threads split a product by panels, each writing
/// its own columns of `c`).
///
/// # Safety
/// The CPU has AVX-512F/BW/VNNI ([`vnni512_supported`]) and the buffers are as
/// [`gemm_u8s8`] checks (`a`: `m` rows of `groups * 4` bytes at stride `lda`; `packed` the
/// panels of `groups` groups; `c`: `m` rows of `n` i32 at stride `ldc`); no other thread
/// writes the columns of panels `p0..p1`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_u8s8_panels(
    m: usize,
    groups: usize,
    a: *const u8,
    lda: usize,
    packed: *const i8,
    c: *mut i32,
    ldc: usize,
    n: usize,
    p0: usize,
    p1: usize,
) {
    #[cfg(target_arch = "x86_64")]
    walk_panels(
        m,
        groups,
        packed,
        n,
        (p0, p1),
        |p, i, rows, cols, bp, pf| {
            // SAFETY: the caller's contract: AVX-512F/BW/VNNI; rows i..i+rows of `a` hold
            // `groups * 4` bytes each, the panel holds `groups` vectors of 2 x 64 bytes, and
            // rows i..i+rows of `c` hold `cols` i32 from column p * NR; a prefetch never faults.
            unsafe {
                let cp = c.wrapping_add(i * ldc + p * NR);
                vnni512::tile_any(
                    rows,
                    groups,
                    a.wrapping_add(i * lda),
                    lda,
                    bp,
                    vnni512::Store::I32(cp),
                    ldc,
                    cols,
                    pf,
                )
            };
        },
        |_, _| {},
    );
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (m, groups, a, lda, packed, c, ldc, n, p0, p1);
}

/// The walk of both integer drivers over panels `p0..p1` of `n` columns: each panel in tiles
/// of equal height, at most 12 rows (64 rows: 11, 11, 11, 11, 10, 10, not five of 12 and one of
/// 4, whose few accumulators would wait on the dot products' latency), `tile(panel, row, rows,
/// cols, panel_weights, prefetch)` for each, then `done(panel, cols)`. The next panel's
/// weights, read once per inference and so not in cache, are prefetched into L2 a share per
/// tile while this panel is multiplied.
#[cfg(target_arch = "x86_64")]
fn walk_panels(
    m: usize,
    groups: usize,
    packed: *const i8,
    n: usize,
    (p0, p1): (usize, usize),
    mut tile: impl FnMut(usize, usize, usize, usize, *const i8, crate::kernels::Prefetch),
    mut done: impl FnMut(usize, usize),
) {
    let panel = groups * NR * 4;
    let tiles = m.div_ceil(12).max(1);
    for p in p0..p1 {
        let cols = NR.min(n - p * NR);
        let bp = packed.wrapping_add(p * panel);
        let lines = if p + 1 < p1 { panel / 64 } else { 0 };
        let (mut next, mut left) = (bp.wrapping_add(panel) as *const u8, lines);
        let mut i = 0;
        for t in 0..tiles {
            let rows = m / tiles + usize::from(t < m % tiles);
            if rows == 0 {
                continue;
            }
            let share = lines.div_ceil(tiles).min(left);
            tile(p, i, rows, cols, bp, crate::kernels::Prefetch::new(next, share, groups));
            (next, left) = (next.wrapping_add(share * 64), left - share);
            i += rows;
        }
        done(p, cols);
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni512 {
    use super::{Dequant, NR};
    use crate::kernels::Prefetch;
    use std::arch::x86_64::*;

    /// What a tile stores: the `i32` sums, or the sums dequantized to `f32` ([`Dequant`], its
    /// pointers at the tile's first row and column).
    #[derive(Clone, Copy)]
    pub enum Store {
        I32(*mut i32),
        F32(*mut f32, Dequant),
    }

    /// Column sums of `panels` panels of `groups` groups into `sums` (`panels * NR` values).
    ///
    /// # Safety
    /// AVX-512F/BW/VNNI; `packed` holds the panels, `sums` `panels * NR` i32.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn colsums(groups: usize, panels: usize, packed: *const i8, sums: *mut i32) {
        // SAFETY: the caller's contract; each panel is `groups` x 128 bytes.
        unsafe {
            let ones = _mm512_set1_epi8(1);
            for p in 0..panels {
                let b = packed.add(p * groups * NR * 4);
                let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for g in 0..groups {
                    s0 = _mm512_dpbusd_epi32(s0, ones, _mm512_loadu_si512(b.add(g * NR * 4) as *const _));
                    s1 = _mm512_dpbusd_epi32(s1, ones, _mm512_loadu_si512(b.add(g * NR * 4 + 64) as *const _));
                }
                _mm512_storeu_si512(sums.add(p * NR) as *mut _, s0);
                _mm512_storeu_si512(sums.add(p * NR + 16) as *mut _, s1);
            }
        }
    }

    /// [`tile`] for `rows <= 12` known at run time (the row count is a constant inside, so the
    /// accumulators stay in registers).
    ///
    /// # Safety
    /// As [`tile`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_any(
        rows: usize,
        groups: usize,
        a: *const u8,
        lda: usize,
        b: *const i8,
        c: Store,
        ldc: usize,
        cols: usize,
        pf: Prefetch,
    ) {
        // SAFETY: forwarded.
        unsafe {
            match rows {
                12.. => tile::<12>(groups, a, lda, b, c, ldc, cols, pf),
                11 => tile::<11>(groups, a, lda, b, c, ldc, cols, pf),
                10 => tile::<10>(groups, a, lda, b, c, ldc, cols, pf),
                9 => tile::<9>(groups, a, lda, b, c, ldc, cols, pf),
                8 => tile::<8>(groups, a, lda, b, c, ldc, cols, pf),
                7 => tile::<7>(groups, a, lda, b, c, ldc, cols, pf),
                6 => tile::<6>(groups, a, lda, b, c, ldc, cols, pf),
                5 => tile::<5>(groups, a, lda, b, c, ldc, cols, pf),
                4 => tile::<4>(groups, a, lda, b, c, ldc, cols, pf),
                3 => tile::<3>(groups, a, lda, b, c, ldc, cols, pf),
                2 => tile::<2>(groups, a, lda, b, c, ldc, cols, pf),
                1 => tile::<1>(groups, a, lda, b, c, ldc, cols, pf),
                0 => {}
            }
        }
    }

    /// `ROWS` rows x up to 32 columns of `C = A . B`, `groups` groups of four `k`, stored as
    /// `c` says; `pf` spreads its prefetches over the groups.
    ///
    /// # Safety
    /// AVX-512F/BW/VNNI; `a` holds `ROWS` rows of `groups * 4` bytes at stride `lda`; `b` holds
    /// `groups` x `NR` x 4 bytes; `c` holds `ROWS` rows of `cols <= 32` values at stride
    /// `ldc`, and for `F32` the dequantization parameters hold `ROWS` rows and `cols` columns.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const ROWS: usize>(
        groups: usize,
        a: *const u8,
        lda: usize,
        b: *const i8,
        c: Store,
        ldc: usize,
        cols: usize,
        mut pf: Prefetch,
    ) {
        debug_assert!(cols <= NR);
        // SAFETY: the caller's contract; loads stay within the rows, the panel and the
        // parameters, stores within `cols` columns (masked).
        unsafe {
            let mut acc = [[_mm512_setzero_si512(); 2]; ROWS];
            for g in 0..groups {
                pf.step();
                let b0 = _mm512_loadu_si512(b.add(g * NR * 4) as *const _);
                let b1 = _mm512_loadu_si512(b.add(g * NR * 4 + 64) as *const _);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_epi32((a.add(r * lda + g * 4) as *const i32).read_unaligned());
                    acc[0] = _mm512_dpbusd_epi32(acc[0], av, b0);
                    acc[1] = _mm512_dpbusd_epi32(acc[1], av, b1);
                }
            }
            let masks = crate::kernels::tile_masks(cols);
            match c {
                Store::I32(c) => {
                    for (r, acc) in acc.iter().enumerate() {
                        for (h, &mask) in masks.iter().enumerate() {
                            if mask != 0 {
                                _mm512_mask_storeu_epi32(c.add(r * ldc + 16 * h), mask, acc[h]);
                            }
                        }
                    }
                }
                // (sum - zero[r] * colsum[j]) as f32 * scale[r], as the reference.
                Store::F32(c, dq) => {
                    let sums = [
                        _mm512_maskz_loadu_epi32(masks[0], dq.colsum),
                        _mm512_maskz_loadu_epi32(masks[1], dq.colsum.add(16)),
                    ];
                    // One for the product's plain scales (no column scales): x * 1 is x.
                    let colscale = if dq.colscale.is_null() {
                        [_mm512_set1_ps(1.0); 2]
                    } else {
                        [
                            _mm512_maskz_loadu_ps(masks[0], dq.colscale),
                            _mm512_maskz_loadu_ps(masks[1], dq.colscale.add(16)),
                        ]
                    };
                    for (r, acc) in acc.iter().enumerate() {
                        let (s, z) = (_mm512_set1_ps(*dq.scale.add(r)), _mm512_set1_epi32(*dq.zero.add(r)));
                        for (h, &mask) in masks.iter().enumerate() {
                            if mask != 0 {
                                let v = _mm512_sub_epi32(acc[h], _mm512_mullo_epi32(z, sums[h]));
                                let f = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(v), s), colscale[h]);
                                _mm512_mask_storeu_ps(c.add(r * ldc + 16 * h), mask, f);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed;
        move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            s >> 33
        }
    }

    /// Full-range data (every byte value, extremes included) on odd shapes: bit for bit.
    #[test]
    fn vnni512_matches_the_reference_on_full_range_data() {
        if !vnni512_supported() {
            eprintln!("no AVX-512 VNNI here: kernel not run");
            return;
        }
        for &(m, k, n) in &[(1, 1, 1), (5, 7, 3), (13, 64, 33), (12, 768, 32), (37, 255, 65), (128, 384, 100)] {
            let mut r = lcg((m * 1000 + k * 10 + n) as u64);
            let lda = k_groups(k) * 4;
            let mut a = vec![0u8; m * lda];
            let mut dense = vec![0u8; m * k];
            for i in 0..m {
                for p in 0..k {
                    // Extremes often: 0 and 255 against -128 and 127 stress the sums.
                    let v = match r() % 4 {
                        0 => 255,
                        1 => 0,
                        _ => (r() % 256) as u8,
                    };
                    a[i * lda + p] = v;
                    dense[i * k + p] = v;
                }
            }
            let w: Vec<i8> = (0..k * n)
                .map(|_| match r() % 4 {
                    0 => -128,
                    1 => 127,
                    _ => (r() % 256) as u8 as i8,
                })
                .collect();
            let packed = pack_b_s8(k, n, &w);
            let mut want = vec![0i32; m * n];
            reference(m, k, n, &dense, k, &w, &mut want, n);
            let mut got = vec![0i32; m * n];
            gemm_u8s8(m, k, n, &a, lda, &packed, &mut got, n).expect("runs");
            assert_eq!(got, want, "{m}x{k}x{n}");
        }
    }

    #[test]
    fn packing_round_trips_and_column_sums() {
        let (k, n) = (13, 70);
        let w: Vec<f32> = (0..k * n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let (q, scale) = quantize_per_column(k, n, &w);
        for (i, (&x, &y)) in w.iter().zip(&q).enumerate() {
            assert!((x - y as f32 * scale[i % n]).abs() <= scale[i % n] / 2.0 + 1e-6, "weight {i}");
        }
        // Each column's largest magnitude maps to 127 exactly.
        assert!((0..n).all(|j| (0..k).any(|i| q[i * n + j].unsigned_abs() == 127)));
        let packed = pack_b_s8(k, n, &q);
        assert_eq!(unpack_b_s8(k, n, &packed), q);
        let sums: Vec<i32> = (0..n).map(|j| (0..k).map(|i| q[i * n + j] as i32).sum()).collect();
        assert_eq!(colsums(k, n, &packed), sums);
        // A zero column has scale 1, not a division by zero.
        assert_eq!(quantize_per_column(2, 1, &[0.0, 0.0]), (vec![0, 0], vec![1.0]));
    }

    #[test]
    fn undersized_buffers_are_refused() {
        let packed = pack_b_s8(8, 4, &[1i8; 32]);
        let mut c = vec![0i32; 4];
        // lda smaller than the padded row.
        assert!(gemm_u8s8(1, 8, 4, &[1u8; 8], 4, &packed, &mut c, 4).is_none());
        // C too small.
        assert!(gemm_u8s8(2, 8, 4, &[1u8; 16], 8, &packed, &mut c, 4).is_none());
    }

    /// Throughput on BERT shapes, one thread (a probe for performance work, run by hand:
    /// `cargo test --release -p tcc-runtime --lib int8_speed -- --ignored --nocapture`).
    #[test]
    #[ignore = "timing probe, asserts nothing"]
    fn int8_speed() {
        if !vnni512_supported() {
            return;
        }
        for &(m, k, n) in &[(128usize, 768usize, 768usize), (128, 768, 3072), (128, 3072, 768)] {
            let a = vec![3u8; m * k];
            let packed = pack_b_s8(k, n, &vec![-2i8; k * n]);
            let mut c = vec![0i32; m * n];
            let iters = 50;
            let t = std::time::Instant::now();
            for _ in 0..iters {
                gemm_u8s8(m, k, n, &a, k, &packed, &mut c, n).unwrap();
            }
            let s = t.elapsed().as_secs_f64() / iters as f64;
            eprintln!("u8s8 {m}x{k}x{n}: {:.3} ms, {:.0} GOP/s", s * 1e3, 2.0 * (m * k * n) as f64 / s / 1e9);
        }
    }
}

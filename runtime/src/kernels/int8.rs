//! Integer GEMM for quantized models: `u8` activations times `s8` weights, summed in `i32`.
//!
//! The first kernel is AVX-512 VNNI (`vpdpbusd`: for each 32-bit lane, the dot product of four
//! `u8` with four `s8`, added to the lane, without saturation). Weights are packed once in
//! panels of [`NR`] columns: for each group of four rows of `k`, the panel's 32 columns hold
//! their four bytes each, 128 contiguous bytes: one 64-byte vector per 16 columns. Activations
//! are rows of `k` bytes padded to a multiple of four (the runtime quantizes them itself, into
//! buffers it pads). Where the CPU has AMX, products whose `k` fills whole tile rows run on
//! `tdpbusd` tiles instead ([`Kernel`]), reading the same panels. Every kernel is checked bit
//! for bit against [`reference`] on full-range data.

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

/// Bytes of one AMX step of one panel: [`amx::STEP`] groups of [`NR`] columns of four bytes,
/// the block of weights `sparsify`'s `block:64x32` pattern zeroes together.
pub const STEP_BYTES: usize = 16 * NR * 4;

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// The steps of packed weights that are not all zero (AMX steps: 64 rows of `k` by one
/// 32-column panel): per panel, the indices of its live steps, in order, so that the AMX and
/// VNNI kernels multiply only those ([`Sparse::detect`] at load; a block-sparse model from
/// `tcc build --sparsity`, or any with such zeros). Where most steps are zero
/// ([`COPY_MIN_ZERO`]) the live ones are also copied, one after another, which the kernels read
/// faster than scattered steps, for a copy a fraction of the weights' size; otherwise they are
/// read in place, so that a light sparsity does not double the weights' memory. Either way the
/// kernels never read the zero steps (finding them reads them once at load: the zero chunks an
/// artifact leaves out are pages never written, which read as the one shared zero page). The
/// pair kernels of CPUs without VNNI read the dense panels, zeros and all.
pub struct Sparse {
    /// The live steps, panel after panel, [`STEP_BYTES`] each, on cache lines, or none (read
    /// in place).
    copy: Option<Vec<Line>>,
    /// Per panel, the index in `live` (and in steps of `copy`) of its first live step; one
    /// more entry at the end.
    first: Vec<usize>,
    /// Each live step's index among its panel's steps.
    live: Vec<u32>,
    steps: usize,
}

/// Cache lines of a step.
const LINES: usize = STEP_BYTES / 64;

/// A tile's prefetch of a panel ahead: its lines (dense, or the live steps copied), or its
/// live steps in place. Which also tells the VNNI kernel how it reads its own panel's steps: a
/// walk in place prefetches in place (the panels of a product are all read the same way).
pub(crate) enum Pf<'a> {
    Lines(crate::kernels::Prefetch),
    Chunks(crate::kernels::ChunkPrefetch<'a>),
}

/// The share of zero steps from which [`Sparse`] copies the live ones.
pub const COPY_MIN_ZERO: f64 = 0.5;

/// How a tile reads its panel's live steps: their indices in `k`, and whether they are read in
/// place in the panel (else one after another, [`Sparse`]'s copy).
#[derive(Clone, Copy)]
pub(crate) struct Walk<'a> {
    pub live: &'a [u32],
    pub in_place: bool,
}

impl Sparse {
    /// The live steps of [`pack_b_s8`]'s panels of `k x n` weights, when `k` fills whole AMX
    /// steps and at least `min_zero` of the steps are all zero (else `None`: the dense kernel),
    /// copied where [`COPY_MIN_ZERO`] of them are zero.
    pub fn detect(k: usize, n: usize, packed: &[i8], min_zero: f64) -> Option<Sparse> {
        Sparse::detect_with(k, n, packed, min_zero, COPY_MIN_ZERO)
    }

    /// The groups and panels of [`pack_b_s8`]'s `k x n` weights `packed`, where `k` fills whole
    /// AMX steps (else `None`: no step to skip).
    fn shape(k: usize, n: usize, packed: &[i8]) -> Option<(usize, usize)> {
        let (groups, panels) = (k_groups(k), n.div_ceil(NR));
        let whole = groups > 0 && panels > 0 && groups.is_multiple_of(16);
        (whole && packed.len() == panels * groups * NR * 4).then_some((groups, panels))
    }

    /// [`Sparse::detect`], copying the live steps from `copy_min_zero` zero on (benchmarks).
    pub fn detect_with(k: usize, n: usize, packed: &[i8], min_zero: f64, copy_min_zero: f64) -> Option<Sparse> {
        let (groups, panels) = Sparse::shape(k, n, packed)?;
        let steps = groups / 16;
        let step = |p: usize, s: usize| &packed[p * groups * NR * 4 + s * STEP_BYTES..][..STEP_BYTES];
        let (mut first, mut live) = (Vec::with_capacity(panels + 1), Vec::new());
        for p in 0..panels {
            first.push(live.len());
            live.extend((0..steps).filter(|&s| step(p, s).iter().any(|&b| b != 0)).map(|s| s as u32));
        }
        first.push(live.len());
        let zero = 1.0 - live.len() as f64 / (panels * steps) as f64;
        if zero < min_zero {
            return None;
        }
        let copy = (zero >= copy_min_zero).then(|| {
            let mut data = vec![Line([0; 64]); live.len() * LINES];
            let mut j = 0;
            for p in 0..panels {
                for &s in &live[first[p]..first[p + 1]] {
                    for (l, src) in step(p, s as usize).chunks(64).enumerate() {
                        data[j * LINES + l].0.iter_mut().zip(src).for_each(|(d, &b)| *d = b as u8);
                    }
                    j += 1;
                }
            }
            data
        });
        Some(Sparse { copy, first, live, steps })
    }

    /// The share of the steps of [`pack_b_s8`]'s panels of `k x n` weights that are all zero,
    /// as [`Sparse::detect`] counts them, without making anything (`None` where `k` does not
    /// fill whole steps).
    pub fn zero_share(k: usize, n: usize, packed: &[i8]) -> Option<f64> {
        let (groups, panels) = Sparse::shape(k, n, packed)?;
        let zero = packed.chunks(STEP_BYTES).filter(|s| s.iter().all(|&b| b == 0)).count();
        Some(zero as f64 / (panels * groups / 16) as f64)
    }

    /// Whether the live steps are copied (else read in place).
    pub fn copied(&self) -> bool {
        self.copy.is_some()
    }

    /// The fraction of the steps that are all zero.
    pub fn zero_fraction(&self) -> f64 {
        let panels = self.first.len() - 1;
        1.0 - self.live.len() as f64 / (panels * self.steps).max(1) as f64
    }

    /// How to read panel `p`'s live steps, and where they start: in the copy, or `dense`, the
    /// panel in the packed weights.
    fn panel(&self, p: usize, dense: *const i8) -> (Walk<'_>, *const i8) {
        let (a, b) = (self.first[p], self.first[p + 1]);
        let walk = Walk { live: &self.live[a..b], in_place: self.copy.is_none() };
        match &self.copy {
            Some(c) => (walk, c.as_ptr().wrapping_add(a * LINES) as *const i8),
            None => (walk, dense),
        }
    }

    /// Whether these are the panels of `groups` groups by `panels` panels.
    fn fits(&self, groups: usize, panels: usize) -> bool {
        self.steps * 16 == groups && self.first.len() == panels + 1
    }
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
    /// An epilogue run on each vector as it is stored, before it reaches memory, or `None`.
    pub fused: Option<Fused>,
}

impl Dequant {
    /// The parameters of the tile whose first element is row `row`, column `col` of these.
    #[inline(always)]
    fn at(self, row: usize, col: usize) -> Dequant {
        Dequant {
            scale: self.scale.wrapping_add(row),
            zero: self.zero.wrapping_add(row),
            colsum: self.colsum.wrapping_add(col),
            colscale: if self.colscale.is_null() { self.colscale } else { self.colscale.wrapping_add(col) },
            fused: self.fused.map(|f| Fused { row: f.row + row, col: f.col + col, ..f }),
        }
    }
}

/// An epilogue that is a [`Chain`](crate::kernels::avx512_vec::Chain) (its context's `chain`
/// not null), applied by the store itself: the dequantized product never makes the round trip
/// through C that a separate pass over the tile costs. `row` and `col` are the operands' row
/// and column of the stored tile's first element.
#[derive(Clone, Copy)]
pub struct Fused {
    pub ctx: *const crate::kernels::avx512_vec::EpiContext,
    pub row: usize,
    pub col: usize,
}

/// [`gemm_u8s8_panels`] into `f32`: each tile (up to 12 rows by one panel with VNNI, 32
/// with AMX) is summed in `i32` and stored dequantized ([`Dequant`], with its fused epilogue
/// if any); each panel's rows are then handed to `epilogue(row, rows, col, cols)`.
///
/// # Safety
/// As [`gemm_u8s8_panels`] with `c` holding `f32`; `dq.scale` and `dq.zero` hold `m`
/// values, `dq.colsum` `n`, `dq.colscale` is null or holds `n`; `epilogue` may touch only
/// the rows and columns it is given (all `m` rows of one panel's columns).
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_u8s8_f32_panels(
    kernel: Kernel,
    m: usize,
    groups: usize,
    a: *const u8,
    lda: usize,
    b: Weights,
    c: *mut f32,
    ldc: usize,
    n: usize,
    (p0, p1): (usize, usize),
    dq: Dequant,
    epilogue: &dyn Fn(usize, usize, usize, usize),
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract; each tile's store starts at its first row and column.
    unsafe {
        walk_panels(
            kernel,
            m,
            groups,
            (a, lda),
            b,
            n,
            (p0, p1),
            (|p, i| vnni512::Store::F32(c.wrapping_add(i * ldc + p * NR), dq.at(i, p * NR)), ldc),
            // The panel's rows are in L1 (m x 32 floats): one epilogue call for all of them.
            |p, cols| epilogue(0, m, p * NR, cols),
        )
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (kernel, m, groups, a, lda, b, c, ldc, n, p0, p1, dq, epilogue);
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

/// The integer kernels, best first. CPUs with neither run the `i16` pair kernels of
/// [`super::int16`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// AMX tiles (`tdpbusd`), for products whose `k` fills whole 64-byte tile rows; the others
    /// run on `Vnni512`.
    Amx,
    /// AVX-512 VNNI (`vpdpbusd` on zmm).
    Vnni512,
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "amx",
            Kernel::Vnni512 => "vnni512",
        }
    }

    /// Whether this CPU (and OS) runs the kernel.
    pub fn supported(self) -> bool {
        match self {
            Kernel::Vnni512 => vnni512_supported(),
            Kernel::Amx => amx_supported(),
        }
    }

    /// The best kernel this CPU runs, unless `TCC_INT8_KERNEL` names another it runs
    /// (`vnni512` on an AMX CPU, to compare them).
    pub fn best() -> Option<Kernel> {
        let asked = std::env::var("TCC_INT8_KERNEL").ok();
        let named = [Kernel::Amx, Kernel::Vnni512].into_iter().find(|k| asked.as_deref() == Some(k.name()));
        match named {
            Some(k) if k.supported() => Some(k),
            _ => [Kernel::Amx, Kernel::Vnni512].into_iter().find(|k| k.supported()),
        }
    }
}

/// Whether this CPU runs the AMX kernel: AMX-TILE and AMX-INT8, AVX-512 VNNI, and an OS that
/// gives this process the tile registers (Linux 5.16 on, asked once).
pub fn amx_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AMX.get_or_init(amx::enable)
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `C = A . B` over whole panels with `kernel`: `a` is `m` rows of `lda >= 4 * k_groups(k)`
/// bytes (the bytes past `k` zero), `packed` is [`pack_b_s8`] of the `k x n` weights, `c` is
/// `m` rows of `ldc >= n` `i32`. Returns `None` when the CPU lacks the kernel or the buffers
/// are too small.
#[allow(clippy::too_many_arguments)]
pub fn gemm_u8s8(
    kernel: Kernel,
    m: usize,
    k: usize,
    n: usize,
    a: &[u8],
    lda: usize,
    packed: &[i8],
    sparse: Option<&Sparse>,
    c: &mut [i32],
    ldc: usize,
) -> Option<()> {
    let groups = k_groups(k);
    let panels = n.div_ceil(NR);
    let fits = lda >= groups * 4
        && ldc >= n
        && (m == 0 || a.len() >= (m - 1) * lda + groups * 4)
        && packed.len() >= panels * groups * NR * 4
        && sparse.is_none_or(|s| s.fits(groups, panels))
        && (m == 0 || c.len() >= (m - 1) * ldc + n);
    if !fits || !kernel.supported() {
        return None;
    }
    let b = Weights { packed: packed.as_ptr(), sparse };
    // SAFETY: the sizes were checked just above, the CPU features too.
    unsafe { gemm_u8s8_panels(kernel, m, groups, a.as_ptr(), lda, b, c.as_mut_ptr(), ldc, n, 0, panels) };
    Some(())
}

/// The weights of an integer product: [`pack_b_s8`]'s panels, and where they have all-zero
/// steps, the same panels without them ([`Sparse`], which the AMX kernel reads instead).
#[derive(Clone, Copy)]
pub struct Weights<'a> {
    pub packed: *const i8,
    pub sparse: Option<&'a Sparse>,
}

/// [`gemm_u8s8`] on panels `p0..p1` only (threads split a product by panels, each writing
/// its own columns of `c`).
///
/// # Safety
/// The CPU runs `kernel` ([`Kernel::supported`]) and the buffers are as [`gemm_u8s8`]
/// checks (`a`: `m` rows of `groups * 4` bytes at stride `lda`; `packed` the panels of
/// `groups` groups; `c`: `m` rows of `n` i32 at stride `ldc`); no other thread writes the
/// columns of panels `p0..p1`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_u8s8_panels(
    kernel: Kernel,
    m: usize,
    groups: usize,
    a: *const u8,
    lda: usize,
    b: Weights,
    c: *mut i32,
    ldc: usize,
    n: usize,
    p0: usize,
    p1: usize,
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract; each tile's store starts at its first row and column.
    unsafe {
        walk_panels(
            kernel,
            m,
            groups,
            (a, lda),
            b,
            n,
            (p0, p1),
            (|p, i| vnni512::Store::I32(c.wrapping_add(i * ldc + p * NR)), ldc),
            |_, _| {},
        )
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (kernel, m, groups, a, lda, b, c, ldc, n, p0, p1);
}

/// The walk of both integer drivers over panels `p0..p1` of `n` columns: each panel in tiles
/// of equal height (at most 12 rows with VNNI: 64 rows are 11, 11, 11, 11, 10, 10, not five of
/// 12 and one of 4, whose few accumulators would wait on the dot products' latency; at most
/// 32 with AMX), each multiplied and stored where `store(panel, row)` says, then `done(panel,
/// cols)`. A later panel's weights, read once per inference and so not in cache, are
/// prefetched into L2 a share per tile while this panel is multiplied. AMX runs products whose
/// `k` fills whole tile rows (`groups % 16 == 0`), VNNI the others.
///
/// # Safety
/// The CPU runs `kernel`; `a` holds `m` rows of `groups * 4` bytes at stride `lda`, `packed`
/// the panels of `groups` groups for `n` columns; `store(p, i)` gives where rows `i..` of
/// panel `p` go (rows `ldc` apart), valid for every row and column of the tile
/// ([`vnni512::store`]).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn walk_panels(
    kernel: Kernel,
    m: usize,
    groups: usize,
    (a, lda): (*const u8, usize),
    b: Weights,
    n: usize,
    (p0, p1): (usize, usize),
    (store, ldc): (impl Fn(usize, usize) -> vnni512::Store, usize),
    mut done: impl FnMut(usize, usize),
) {
    let packed = b.packed;
    // The panels without their all-zero steps where there are such.
    let sparse = b.sparse.filter(|s| s.fits(groups, n.div_ceil(NR)));
    // (BERT-base int8 with 80% of the steps zero, against the dense build on AMX: 1.6x on
    // AMX, 1.15x on VNNI, whose skipping gains more, 2.4x over dense VNNI, from less.)
    let amx = kernel == Kernel::Amx && groups.is_multiple_of(amx::STEP);
    let (most, steps) = if amx { (32, groups / amx::STEP) } else { (12, groups) };
    // The panel prefetched into L2 while this one is multiplied: AMX is done with a panel
    // before the next one's lines arrive, it prefetches two on (faster in 6 of 6 paired runs).
    let ahead = if amx { 2 } else { 1 };
    let mut tiles = amx::Tiles::new();
    let panel = groups * NR * 4;
    let count = m.div_ceil(most).max(1);
    // With AMX a tile's sums are stored while the next tile is multiplied ([`amx::Tiles`]):
    // a panel is done once the next panel's first tile has run, or at the end.
    let mut undone = None;
    for p in p0..p1 {
        let cols = NR.min(n - p * NR);
        let dense = packed.wrapping_add(p * panel);
        let (walk, bp) = match sparse {
            Some(s) => {
                let (w, bp) = s.panel(p, dense);
                (Some(w), bp)
            }
            None => (None, dense),
        };
        // The lines to prefetch: the panel `ahead` on, or its live steps (copied: one after
        // another, as the dense panel's; in place: the lines of the steps it lists,
        // `ChunkPrefetch`), each tile's share spread over its kernel's steps.
        let (ahead_at, ahead_walk) = match sparse {
            Some(s) if p + ahead < p1 => {
                let (w, at) = s.panel(p + ahead, dense.wrapping_add(ahead * panel));
                (at, Some(w))
            }
            _ => (dense.wrapping_add(ahead * panel), None),
        };
        let lines = match ahead_walk {
            _ if p + ahead >= p1 => 0,
            Some(w) => w.live.len() * LINES,
            None => panel / 64,
        };
        let (mut line, mut left) = (0, lines);
        let steps = walk.map_or(steps, |w| if amx { w.live.len() } else { w.live.len() * amx::STEP });
        let mut i = 0;
        for t in 0..count {
            let rows = m / count + usize::from(t < m % count);
            if rows == 0 {
                continue;
            }
            let share = lines.div_ceil(count).min(left);
            let pf = match walk {
                Some(w) if w.in_place => Pf::Chunks(crate::kernels::ChunkPrefetch::new(
                    ahead_at as *const u8,
                    (ahead_walk.map_or(&[][..], |w| w.live), LINES),
                    line,
                    share,
                    steps,
                )),
                _ => Pf::Lines(crate::kernels::Prefetch::new(
                    ahead_at.wrapping_add(line * 64) as *const u8,
                    share,
                    steps,
                )),
            };
            let c = store(p, i);
            let ai = a.wrapping_add(i * lda);
            // SAFETY: the caller's contract: rows i..i+rows of `a`, this panel's weights, the
            // tile's store; AMX only where it was enabled and `k` fills its tiles; a prefetch
            // never faults.
            unsafe {
                if amx {
                    match pf {
                        Pf::Lines(pf) => amx::tile(&mut tiles, rows, (steps, walk), ai, lda, bp, c, ldc, cols, pf),
                        Pf::Chunks(pf) => amx::tile(&mut tiles, rows, (steps, walk), ai, lda, bp, c, ldc, cols, pf),
                    }
                } else {
                    vnni512::tile_any(
                        rows,
                        (walk.map_or(groups, |w| w.live.len() * amx::STEP), walk),
                        ai,
                        lda,
                        bp,
                        c,
                        ldc,
                        cols,
                        pf,
                    )
                }
            };
            (line, left) = (line + share, left - share);
            i += rows;
            if let Some((q, cols)) = undone.take() {
                done(q, cols);
            }
        }
        if amx {
            undone = Some((p, cols));
        } else {
            done(p, cols);
        }
    }
    if amx {
        // SAFETY: AMX ran, so the CPU has AVX-512 VNNI; the pending tile's store is valid (the
        // caller's contract, as for every tile).
        unsafe { tiles.flush() };
    }
    if let Some((q, cols)) = undone {
        done(q, cols);
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni512 {
    use super::{Dequant, NR};
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
        (groups, walk): (usize, Option<super::Walk>),
        a: *const u8,
        lda: usize,
        b: *const i8,
        c: Store,
        ldc: usize,
        cols: usize,
        pf: super::Pf<'_>,
    ) {
        debug_assert_eq!(matches!(pf, super::Pf::Chunks(_)), walk.is_some_and(|w| w.in_place));
        // The live steps' indices, and where their weights are (in place where the prefetch
        // is of chunks): a kernel for each (the choice out of the loop, whose registers are
        // all taken).
        let live = walk.map(|w| w.live);
        macro_rules! by_rows {
            ($in_place:literal, $pf:ident) => {
                // SAFETY: forwarded.
                unsafe {
                    match rows {
                        12.. => tile::<12, $in_place, _>((groups, live), a, lda, b, c, ldc, cols, $pf),
                        11 => tile::<11, $in_place, _>((groups, live), a, lda, b, c, ldc, cols, $pf),
                        10 => tile::<10, $in_place, _>((groups, live), a, lda, b, c, ldc, cols, $pf),
                        9 => tile::<9, $in_place, _>((groups, live), a, lda, b, c, ldc, cols, $pf),
                        8 => tile::<8, $in_place, _>((groups, live), a, lda, b, c, ldc, cols, $pf),
                        7 => tile::<7, $in_place, _>((groups, live), a, lda, b, c, ldc, cols, $pf),
                        6 => tile::<6, $in_place, _>((groups, live), a, lda, b, c, ldc, cols, $pf),
                        5 => tile::<5, $in_place, _>((groups, live), a, lda, b, c, ldc, cols, $pf),
                        4 => tile::<4, $in_place, _>((groups, live), a, lda, b, c, ldc, cols, $pf),
                        3 => tile::<3, $in_place, _>((groups, live), a, lda, b, c, ldc, cols, $pf),
                        2 => tile::<2, $in_place, _>((groups, live), a, lda, b, c, ldc, cols, $pf),
                        1 => tile::<1, $in_place, _>((groups, live), a, lda, b, c, ldc, cols, $pf),
                        0 => {}
                    }
                }
            };
        }
        match pf {
            super::Pf::Lines(pf) => by_rows!(false, pf),
            super::Pf::Chunks(pf) => by_rows!(true, pf),
        }
    }

    /// `ROWS` rows x up to 32 columns of `C = A . B`, `groups` groups of four `k`, stored as
    /// `c` says; `pf` spreads its prefetches over the groups. With `live`, the groups are
    /// those of the AMX steps (16 groups each) it lists, `b` holding theirs one after another or,
    /// `IN_PLACE`, the whole panel ([`super::Sparse`]).
    ///
    /// # Safety
    /// AVX-512F/BW/VNNI; `a` holds `ROWS` rows of `groups * 4` bytes at stride `lda` (with
    /// `live`, of `(max(live) + 1) * 64`); `b` holds `groups` x `NR` x 4 bytes (`IN_PLACE`, the
    /// panel's `(max(live) + 1) * 16` groups); `c` holds `ROWS`
    /// rows of `cols <= 32` values at stride `ldc`, and for `F32` the dequantization parameters
    /// hold `ROWS` rows and `cols` columns.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const ROWS: usize, const IN_PLACE: bool, P: crate::kernels::Spread>(
        (groups, live): (usize, Option<&[u32]>),
        a: *const u8,
        lda: usize,
        b: *const i8,
        c: Store,
        ldc: usize,
        cols: usize,
        mut pf: P,
    ) {
        debug_assert!(cols <= NR);
        // SAFETY: the caller's contract; loads stay within the rows, the panel and the
        // parameters, stores within `cols` columns (masked).
        unsafe {
            let mut acc = [[_mm512_setzero_si512(); 2]; ROWS];
            for g in 0..groups {
                pf.step();
                // The group of `k` these weights are: A's four columns (and, in place, the
                // panel's group; copied, the copy's `g`-th).
                let ka = live.map_or(g, |l| l[g / 16] as usize * 16 + g % 16);
                let kb = if IN_PLACE { ka } else { g };
                let b0 = _mm512_loadu_si512(b.add(kb * NR * 4) as *const _);
                let b1 = _mm512_loadu_si512(b.add(kb * NR * 4 + 64) as *const _);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_epi32((a.add(r * lda + ka * 4) as *const i32).read_unaligned());
                    acc[0] = _mm512_dpbusd_epi32(acc[0], av, b0);
                    acc[1] = _mm512_dpbusd_epi32(acc[1], av, b1);
                }
            }
            // A copy for the store, which indexes its rows at run time: `acc` itself is only
            // ever indexed by constants, so its vectors stay in registers through the loop
            // (indexed at run time, the array lived in memory and every `vpdpbusd` was also
            // stored there: half the speed on a CPU with one 512-bit store a cycle or less).
            let sums = acc;
            store(ROWS, |r| sums[r], c, ldc, cols);
        }
    }

    impl Store {
        /// The store of the tile's rows from `r0` on.
        #[inline(always)]
        pub(super) fn rows_from(self, r0: usize, ldc: usize) -> Store {
            match self {
                Store::I32(c) => Store::I32(c.wrapping_add(r0 * ldc)),
                Store::F32(c, dq) => Store::F32(c.wrapping_add(r0 * ldc), dq.at(r0, 0)),
            }
        }

        /// Asks for the lines of the fused epilogue's operands (a residual, say: written
        /// layers ago, out of cache) for `rows` rows and `cols` columns of this tile, so that
        /// they arrive while the tile is multiplied.
        #[inline(always)]
        pub(super) fn prefetch_operands(self, rows: usize, cols: usize) {
            if let Store::F32(_, Dequant { fused: Some(f), .. }) = self {
                // SAFETY: `f.ctx` is the live context of this product ([`Fused`]); a prefetch
                // never faults.
                unsafe { crate::kernels::avx512_vec::prefetch_operands(&*f.ctx, f.row, rows, f.col, cols) };
            }
        }
    }

    /// Stores `rows` rows of up to 32 sums (`acc(r)`: row r's two 16-lane halves) as `c`
    /// says: the one store of both integer kernels, so they give the same bits.
    ///
    /// # Safety
    /// AVX-512F; `c` holds `rows` rows of `cols <= 32` values at stride `ldc`, and for `F32`
    /// the dequantization parameters hold `rows` rows and `cols` columns, and the fused
    /// epilogue's operands (its context live, its chain not null) those rows and columns.
    #[inline(always)]
    pub(super) unsafe fn store(rows: usize, acc: impl Fn(usize) -> [__m512i; 2], c: Store, ldc: usize, cols: usize) {
        // SAFETY: the caller's contract; stores are masked to `cols` columns.
        unsafe {
            let masks = crate::kernels::tile_masks(cols);
            match c {
                Store::I32(c) => {
                    for r in 0..rows {
                        let acc = acc(r);
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
                    // Each row's vectors dequantized, then `$epi(r, col, mask, value)` (the fused
                    // epilogue, if any: `col` the first of the vector's columns) applied and
                    // stored; a macro so that each epilogue below gets its own loop.
                    macro_rules! rows {
                        ($epi:expr) => {
                            for r in 0..rows {
                                let acc = acc(r);
                                let (s, z) = (_mm512_set1_ps(*dq.scale.add(r)), _mm512_set1_epi32(*dq.zero.add(r)));
                                for (h, &mask) in masks.iter().enumerate() {
                                    if mask != 0 {
                                        let v = _mm512_sub_epi32(acc[h], _mm512_mullo_epi32(z, sums[h]));
                                        let f = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(v), s), colscale[h]);
                                        _mm512_mask_storeu_ps(c.add(r * ldc + 16 * h), mask, $epi(r, 16 * h, mask, f));
                                    }
                                }
                            }
                        };
                    }
                    let Some(f) = dq.fused else {
                        rows!(|_, _, _, f| f);
                        return;
                    };
                    let (ctx, chain) = (&*f.ctx, &*(*f.ctx).chain);
                    crate::kernels::avx512_vec::with_chain!(rows, ctx, chain, f.row, f.col);
                }
            }
        }
    }
}

/// Intel AMX: `tdpbusd` multiplies a 16-row x 64-byte tile of `u8` by a 16 x 64-byte tile of
/// `s8` (sixteen groups of four rows of `k`, sixteen columns) into 16 x 16 `i32`, without
/// saturation, as `vpdpbusd` does lane by lane. [`pack_b_s8`]'s panels are already B tiles: a
/// group's 16 columns are 64 contiguous bytes, the next group 128 bytes on. Tiles of 32 rows x
/// one panel use all eight tile registers (four sums, two of `A`, two of `B`); the sums go
/// through the VNNI kernel's store (the same dequantization, the same bits). `k` must fill
/// whole tiles (`groups % 16 == 0`): other products run on the VNNI kernel.
#[cfg(target_arch = "x86_64")]
mod amx {
    use super::{vnni512, NR};
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// Groups of four `k` per tile step (one 64-byte row of an `A` tile).
    pub const STEP: usize = 16;

    /// Whether the CPU has AMX-TILE and AMX-INT8 (and AVX-512 VNNI, whose store the kernel
    /// shares) and Linux lets this process use the tile data (asked once, for the process).
    pub fn enable() -> bool {
        // Leaf 7 is read only where the CPU has it.
        let leaf7 = (__get_cpuid_max(0).0 >= 7).then(|| __cpuid_count(7, 0));
        let Some(leaf7) = leaf7 else { return false };
        let (tile, int8) = ((leaf7.edx >> 24) & 1 == 1, (leaf7.edx >> 25) & 1 == 1);
        if !(tile && int8 && super::vnni512_supported()) {
            return false;
        }
        #[cfg(target_os = "linux")]
        {
            // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): tile data is off until a
            // process asks (its state is 8 KiB per thread); refused by kernels before 5.16.
            const ARCH_PRCTL: i64 = 158;
            const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
            const XFEATURE_XTILEDATA: i64 = 18;
            let ret: i64;
            // SAFETY: a system call that only changes which CPU state this process may use;
            // `syscall` clobbers rcx and r11, declared.
            unsafe {
                asm!(
                    "syscall",
                    inlateout("rax") ARCH_PRCTL => ret,
                    in("rdi") ARCH_REQ_XCOMP_PERM,
                    in("rsi") XFEATURE_XTILEDATA,
                    lateout("rcx") _,
                    lateout("r11") _,
                    options(nostack),
                )
            };
            if ret != 0 {
                tracing::debug!(errno = -ret, "Linux refused AMX tile data: the int8 kernel is AVX-512 VNNI");
            }
            ret == 0
        }
        #[cfg(not(target_os = "linux"))]
        false
    }

    /// The 64-byte tile configuration (palette 1) for tiles of `rows` (1..=32) rows: sums
    /// in tmm0-1 (rows 0..16) and tmm2-3 (the rest), `A` in tmm4 and tmm5, `B` in tmm6-7.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    fn config(rows: usize) -> Config {
        let (top, bottom) = (rows.min(16), rows.saturating_sub(16));
        let mut c = Config([0; 64]);
        c.0[0] = 1;
        let tiles = [top, top, bottom, bottom, top, bottom, 16, 16];
        for (t, &r) in tiles.iter().enumerate() {
            if r > 0 {
                c.0[16 + 2 * t] = 64; // bytes per row
                c.0[48 + t] = r as u8;
            }
        }
        c
    }

    /// The tile registers of one thread, configured for tiles of `rows` rows; released when
    /// dropped (`tilerelease` gives the OS back a small context switch). Also the memory the
    /// sums of a tile go through on their way to `C`, twice: a tile's sums are stored (the
    /// vector loads, dequantization and epilogue of [`vnni512::store`]) a few rows per step
    /// while the next tile is multiplied, the AMX and the vector units working at once; the
    /// last tile's by [`Tiles::flush`].
    pub struct Tiles {
        rows: usize,
        sums: [Sums; 2],
        pending: Option<Pending>,
    }

    /// A tile whose sums wait in `sums[buf]`, rows `done..rows` not yet stored; or, with
    /// `zero`, a tile of all-zero weights (none of its steps live), whose sums are zero.
    #[derive(Clone, Copy)]
    struct Pending {
        buf: usize,
        zero: bool,
        rows: usize,
        done: usize,
        c: vnni512::Store,
        ldc: usize,
        cols: usize,
    }

    impl Tiles {
        pub fn new() -> Tiles {
            Tiles { rows: 0, sums: [Sums([0; 32 * NR]), Sums([0; 32 * NR])], pending: None }
        }

        /// Stores up to `most` more rows of the pending tile.
        ///
        /// # Safety
        /// The pending tile's store is valid ([`vnni512::store`]): the caller of the [`tile`]
        /// that left it pending vouched for it, and nothing it points to was freed since.
        #[inline(always)]
        unsafe fn drain(&mut self, most: usize) {
            let Some(p) = self.pending.as_mut() else { return };
            let (r0, n) = (p.done, most.min(p.rows - p.done));
            let sums = self.sums[p.buf].0.as_ptr();
            // SAFETY: rows r0..r0+n of the pending tile's sums were stored by its tiles; the
            // store is the caller's.
            unsafe {
                vnni512::store(
                    n,
                    |r| {
                        let row = sums.add((r0 + r) * NR);
                        if p.zero {
                            [_mm512_setzero_si512(); 2]
                        } else {
                            [_mm512_load_si512(row as *const _), _mm512_load_si512(row.add(16) as *const _)]
                        }
                    },
                    p.c.rows_from(r0, p.ldc),
                    p.ldc,
                    p.cols,
                )
            };
            p.done += n;
            if p.done == p.rows {
                self.pending = None;
            }
        }

        /// Stores what is left of the pending tile.
        ///
        /// # Safety
        /// As [`Tiles::drain`]; AVX-512F/BW/VNNI (there is a pending tile only where AMX ran).
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
        pub unsafe fn flush(&mut self) {
            // SAFETY: the caller's.
            unsafe { self.drain(usize::MAX) }
        }

        /// # Safety
        /// [`enable`] returned true.
        #[inline]
        unsafe fn shape(&mut self, rows: usize) {
            if self.rows != rows {
                let c = config(rows);
                // SAFETY: AMX is enabled (the caller's contract); the configuration is valid
                // (palette 1, rows <= 16, 64 bytes per row) and aligned.
                unsafe { asm!("ldtilecfg [{0}]", in(reg) c.0.as_ptr(), options(nostack, readonly)) };
                self.rows = rows;
            }
        }
    }

    impl Drop for Tiles {
        fn drop(&mut self) {
            debug_assert!(self.pending.is_none(), "a tile's sums were never stored");
            if self.rows != 0 {
                // SAFETY: tiles were configured, so AMX is enabled; release resets them.
                unsafe { asm!("tilerelease", options(nostack, nomem)) };
            }
        }
    }

    #[repr(C, align(64))]
    struct Sums([i32; 32 * NR]);

    /// `rows <= 32` rows x up to 32 columns of `C = A . B` over `steps` tile steps of `k`,
    /// stored as `c` says. With `walk`, the steps are those of `k` it lists (the others' weights
    /// all zero, [`super::Sparse`]), `b` holding theirs one after another or, in place, the
    /// whole panel.
    ///
    /// # Safety
    /// [`enable`] returned true; `a` holds `rows` rows of `steps * 64` bytes at stride `lda`
    /// (with `walk`, of `(max(live) + 1) * 64`); `b` holds `steps * STEP` groups of one panel
    /// (in place, `(max(live) + 1) * STEP`);
    /// `c` as [`vnni512::store`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile<P: crate::kernels::Spread>(
        tiles: &mut Tiles,
        rows: usize,
        (steps, walk): (usize, Option<super::Walk>),
        a: *const u8,
        lda: usize,
        b: *const i8,
        c: vnni512::Store,
        ldc: usize,
        cols: usize,
        mut pf: P,
    ) {
        debug_assert!((1..=32).contains(&rows) && cols <= NR);
        let two = rows > 16;
        const AHEAD: usize = 1;
        // The pending tile's rows, spread over this tile's steps.
        let per_step = tiles.pending.map_or(0, |p| (p.rows - p.done).div_ceil(steps.max(1)));
        let row = NR * 4; // bytes of one group of a panel, and of one row of `sums`
                          // SAFETY: the caller's contract: each tile load reads `rows` rows of 64 bytes of `a`
                          // within `steps * 64`, or 16 groups' 64 bytes of the panel; the stores write `sums`.
        unsafe {
            c.prefetch_operands(rows, cols);
            if steps == 0 {
                // No live step (every weight of the panel zero, as most are past 90% block
                // sparsity): zero sums, stored without the tiles (zeroing and storing four
                // tiles cost more than the whole vector store of a tile's sums).
                tiles.flush();
                tiles.pending = Some(Pending { buf: 0, zero: true, rows, done: 0, c, ldc, cols });
                return;
            }
            tiles.shape(rows);
            asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
            if two {
                asm!("tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
            }
            for s in 0..steps {
                pf.step();
                // The step of `k` these weights are (A's columns), and where they are: step
                // `s` of the copy, or that step of the panel in place.
                let at = |s: usize| match walk {
                    None => (s, s),
                    Some(w) => (w.live[s] as usize, if w.in_place { w.live[s] as usize } else { s }),
                };
                let (ks, bi) = at(s);
                let bs = b.add(bi * STEP * row);
                // The next step's weights into L1 (this panel's are read here first, from
                // L2 at best): the B tile loads are the kernel's stalls.
                if s + AHEAD < steps {
                    let nb = b.add(at(s + AHEAD).1 * STEP * row);
                    for l in 0..2 * STEP {
                        _mm_prefetch::<_MM_HINT_T0>(nb.add(l * 64));
                    }
                }
                asm!(
                    "tileloadd tmm4, [{a} + {lda}*1]",
                    "tileloadd tmm6, [{b} + {row}*1]",
                    "tdpbusd tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b2} + {row}*1]",
                    "tdpbusd tmm1, tmm4, tmm7",
                    a = in(reg) a.add(ks * 64),
                    lda = in(reg) lda,
                    b = in(reg) bs,
                    b2 = in(reg) bs.add(64),
                    row = in(reg) row,
                    options(nostack, readonly),
                );
                if two {
                    asm!(
                        "tileloadd tmm5, [{a} + {lda}*1]",
                        "tdpbusd tmm2, tmm5, tmm6",
                        "tdpbusd tmm3, tmm5, tmm7",
                        a = in(reg) a.add(16 * lda + ks * 64),
                        lda = in(reg) lda,
                        options(nostack, readonly),
                    );
                }
                tiles.drain(per_step);
            }
            tiles.flush();
            let buf = tiles.pending.map_or(0, |p| 1 - p.buf);
            let out = tiles.sums[buf].0.as_mut_ptr();
            asm!(
                "tilestored [{c} + {row}*1], tmm0",
                "tilestored [{c2} + {row}*1], tmm1",
                c = in(reg) out,
                c2 = in(reg) out.add(16),
                row = in(reg) row,
                options(nostack),
            );
            if two {
                asm!(
                    "tilestored [{c} + {row}*1], tmm2",
                    "tilestored [{c2} + {row}*1], tmm3",
                    c = in(reg) out.add(16 * NR),
                    c2 = in(reg) out.add(16 * NR + 16),
                    row = in(reg) row,
                    options(nostack),
                );
            }
            // Rows 0..rows of the buffer were just stored by the tiles (16 rows each, or
            // `rows`): stored to C while the next tile is multiplied, or by `flush`.
            tiles.pending = Some(Pending { buf, zero: false, rows, done: 0, c, ldc, cols });
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

    /// Full-range data: rows of `lda` bytes (zero past `k`) and `k x n` weights, with the
    /// extremes often (0 and 255 against -128 and 127 stress the sums).
    fn full_range(m: usize, k: usize, n: usize) -> (Vec<u8>, Vec<u8>, Vec<i8>) {
        let mut r = lcg((m * 1000 + k * 10 + n) as u64);
        let lda = k_groups(k) * 4;
        let mut a = vec![0u8; m * lda];
        let mut dense = vec![0u8; m * k];
        for i in 0..m {
            for p in 0..k {
                let v = match r() % 4 {
                    0 => 255,
                    1 => 0,
                    _ => (r() % 256) as u8,
                };
                a[i * lda + p] = v;
                dense[i * k + p] = v;
            }
        }
        let w = (0..k * n)
            .map(|_| match r() % 4 {
                0 => -128,
                1 => 127,
                _ => (r() % 256) as u8 as i8,
            })
            .collect();
        (a, dense, w)
    }

    /// Each kernel this CPU runs, on odd shapes and on `k` filling AMX tiles (with tiles of
    /// 1 to 32 rows and part-filled panels): bit for bit.
    #[test]
    fn kernels_match_the_reference_on_full_range_data() {
        let kernels: Vec<Kernel> = [Kernel::Amx, Kernel::Vnni512].into_iter().filter(|k| k.supported()).collect();
        if kernels.is_empty() {
            eprintln!("no AVX-512 VNNI here: kernels not run");
            return;
        }
        let shapes = [
            (1, 1, 1),
            (5, 7, 3),
            (13, 64, 33),
            (12, 768, 32),
            (37, 255, 65),
            (128, 384, 100),
            (1, 64, 1),
            (17, 128, 31),
            (33, 192, 64),
            (64, 768, 96),
            (50, 256, 40),
        ];
        for kernel in kernels {
            for &(m, k, n) in &shapes {
                let (a, dense, w) = full_range(m, k, n);
                let packed = pack_b_s8(k, n, &w);
                let mut want = vec![0i32; m * n];
                reference(m, k, n, &dense, k, &w, &mut want, n);
                let mut got = vec![0i32; m * n];
                gemm_u8s8(kernel, m, k, n, &a, k_groups(k) * 4, &packed, None, &mut got, n).expect("runs");
                assert_eq!(got, want, "{kernel:?} {m}x{k}x{n}");
            }
        }
    }

    /// Weights whose AMX steps (64 rows of `k` by a panel) are zero at random, as `tcc build
    /// --sparsity` leaves them: the AMX kernel skipping them gives the dense kernels' sums, bit
    /// for bit, whole panels zero included.
    #[test]
    fn sparse_steps_are_skipped_exactly() {
        let kernels: Vec<(Kernel, bool)> = [(Kernel::Amx, true), (Kernel::Vnni512, true), (Kernel::Amx, false)]
            .into_iter()
            .filter(|(k, _)| k.supported())
            .collect();
        if kernels.is_empty() {
            eprintln!("neither AMX nor AVX-512 VNNI here: kernels not run");
            return;
        }
        let mut r = lcg(7);
        for &(m, k, n, zero) in
            &[(37, 768, 100, 0.8), (128, 256, 64, 0.5), (1, 64, 33, 0.5), (64, 3072, 96, 0.95), (40, 128, 320, 0.9)]
        {
            let (a, dense, mut w) = full_range(m, k, n);
            let (steps, panels) = (k / 64, n.div_ceil(NR));
            let mut zeroed = 0;
            for s in 0..steps {
                for p in 0..panels {
                    if (r() % 1000) as f64 / 1000.0 < zero {
                        zeroed += 1;
                        for i in s * 64..(s + 1) * 64 {
                            (p * NR..((p + 1) * NR).min(n)).for_each(|j| w[i * n + j] = 0);
                        }
                    }
                }
            }
            let packed = pack_b_s8(k, n, &w);
            let sparse = Sparse::detect(k, n, &packed, 0.0).expect("k fills AMX steps");
            assert_eq!(sparse.zero_fraction(), zeroed as f64 / (steps * panels) as f64);
            assert_eq!(sparse.copied(), sparse.zero_fraction() >= COPY_MIN_ZERO);
            assert_eq!(Sparse::zero_share(k, n, &packed), Some(sparse.zero_fraction()));
            // The live steps copied, and read in place.
            let walks = [true, false].map(|copy| {
                let s = Sparse::detect_with(k, n, &packed, 0.0, if copy { 0.0 } else { 2.0 }).expect("sparse");
                assert_eq!(s.copied(), copy);
                s
            });
            assert!(
                Sparse::detect(k, n, &packed, 0.999).is_none() || zeroed == steps * panels,
                "below the threshold: dense"
            );
            let mut want = vec![0i32; m * n];
            reference(m, k, n, &dense, k, &w, &mut want, n);
            for &(kernel, walk) in &kernels {
                for sp in if walk { vec![Some(&walks[0]), Some(&walks[1])] } else { vec![None] } {
                    let mut got = vec![0i32; m * n];
                    gemm_u8s8(kernel, m, k, n, &a, k, &packed, sp, &mut got, n).expect("runs");
                    let how = sp.map_or("dense", |s| if s.copied() { "copied" } else { "in place" });
                    assert_eq!(got, want, "{kernel:?} {m}x{k}x{n}, {zero} zero, {how}");
                }
            }
        }
        // `k` that does not fill AMX steps: no sparse form.
        assert!(Sparse::detect(60, 32, &pack_b_s8(60, 32, &[0i8; 60 * 32]), 0.0).is_none());
    }

    /// Dequantized to `f32` (per-row scales and zeros, per-column scales, an epilogue per
    /// panel), AMX gives VNNI's bits.
    #[test]
    fn amx_dequantizes_as_vnni() {
        if !amx_supported() {
            eprintln!("no AMX here: kernel not run");
            return;
        }
        for &(m, k, n) in &[(40, 384, 70), (128, 768, 64), (7, 64, 33)] {
            let (a, _, w) = full_range(m, k, n);
            let packed = pack_b_s8(k, n, &w);
            let colsum = colsums(k, n, &packed);
            let scale: Vec<f32> = (0..m).map(|i| 0.01 + i as f32 * 1e-3).collect();
            let zero: Vec<i32> = (0..m as i32).map(|i| (i * 37) % 256).collect();
            let colscale: Vec<f32> = (0..n).map(|j| 0.5 + j as f32 * 1e-2).collect();
            let run = |kernel: Kernel, with_colscale: bool| {
                let mut c = vec![f32::NAN; m * n];
                let panels = std::cell::RefCell::new(vec![]);
                let dq = Dequant {
                    scale: scale.as_ptr(),
                    zero: zero.as_ptr(),
                    colsum: colsum.as_ptr(),
                    colscale: if with_colscale { colscale.as_ptr() } else { std::ptr::null() },
                    fused: None,
                };
                // SAFETY: the kernel runs here; `a` is m rows of k bytes (k a multiple of 4),
                // `packed` the weights' panels, `c` m x n; the parameters hold m rows and n columns.
                unsafe {
                    gemm_u8s8_f32_panels(
                        kernel,
                        m,
                        k / 4,
                        a.as_ptr(),
                        k,
                        Weights { packed: packed.as_ptr(), sparse: None },
                        c.as_mut_ptr(),
                        n,
                        n,
                        (0, n.div_ceil(NR)),
                        dq,
                        &|row, rows, col, cols| panels.borrow_mut().push((row, rows, col, cols)),
                    )
                };
                (c, panels.into_inner())
            };
            for with_colscale in [false, true] {
                let (amx, amx_panels) = run(Kernel::Amx, with_colscale);
                let (vnni, vnni_panels) = run(Kernel::Vnni512, with_colscale);
                assert!(amx.iter().all(|x| x.is_finite()), "{m}x{k}x{n}: every output written");
                assert_eq!(
                    amx.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    vnni.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    "{m}x{k}x{n}"
                );
                assert_eq!(amx_panels, vnni_panels);
            }
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
        assert!(gemm_u8s8(Kernel::Vnni512, 1, 8, 4, &[1u8; 8], 4, &packed, None, &mut c, 4).is_none());
        // C too small.
        assert!(gemm_u8s8(Kernel::Vnni512, 2, 8, 4, &[1u8; 16], 8, &packed, None, &mut c, 4).is_none());
        // Sparse panels of other weights.
        let other = pack_b_s8(64, 64, &[0i8; 64 * 64]);
        let sparse = Sparse::detect(64, 64, &other, 0.0).expect("all zero");
        assert!(gemm_u8s8(Kernel::Vnni512, 1, 8, 4, &[1u8; 8], 8, &packed, Some(&sparse), &mut c, 4).is_none());
    }

    /// The sparse walk against the dense panels, its live steps copied or read in place,
    /// interleaved (`cargo test --release -p tcc-runtime int8_sparse_speed -- --ignored
    /// --nocapture`; `ZERO=0.125,0.5,0.8`, `ROUNDS=N`, `WEIGHT_COPIES=N` rotated as in
    /// [`int8_speed`]).
    #[test]
    #[ignore = "timing probe, asserts nothing"]
    fn int8_sparse_speed() {
        let env = |k: &str| std::env::var(k).ok();
        let copies = env("WEIGHT_COPIES").and_then(|v| v.parse().ok()).unwrap_or(1usize);
        let rounds: usize = env("ROUNDS").and_then(|v| v.parse().ok()).unwrap_or(5);
        let zeros: Vec<f64> =
            env("ZERO").map_or(vec![0.125, 0.5, 0.8], |v| v.split(',').map(|z| z.parse().unwrap()).collect());
        let (m, k, n) = (128usize, 768usize, 3072usize);
        let Some(kernel) = Kernel::best() else { return };
        let (a, _, w) = full_range(m, k, n);
        for zero in zeros {
            let mut r = lcg(11);
            let weights: Vec<(Vec<i8>, [Sparse; 2])> = (0..copies)
                .map(|_| {
                    let mut w = w.clone();
                    for s in 0..k / 64 {
                        for p in 0..n / NR {
                            if (r() % 1000) as f64 / 1000.0 < zero {
                                (s * 64..(s + 1) * 64).for_each(|i| w[i * n + p * NR..i * n + (p + 1) * NR].fill(0));
                            }
                        }
                    }
                    let packed = pack_b_s8(k, n, &w);
                    let walks = [0.0, 2.0].map(|c| Sparse::detect_with(k, n, &packed, 0.0, c).unwrap());
                    (packed, walks)
                })
                .collect();
            let mut res: [Vec<f64>; 3] = Default::default();
            let mut c = vec![0i32; m * n];
            for _ in 0..rounds {
                for (how, times) in res.iter_mut().enumerate() {
                    let iters = 40;
                    let t = std::time::Instant::now();
                    for i in 0..iters {
                        let (packed, walks) = &weights[i % copies];
                        let sp = [None, Some(&walks[0]), Some(&walks[1])][how];
                        gemm_u8s8(kernel, m, k, n, &a, k, packed, sp, &mut c, n).unwrap();
                    }
                    times.push(t.elapsed().as_secs_f64() / iters as f64 * 1e3);
                }
            }
            let med = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let [d, cp, ip] = res.map(|mut v| med(&mut v));
            eprintln!(
                "{kernel:?} {m}x{k}x{n} {:.1}% zero: dense {d:.3} ms, walk copied {cp:.3} ({:.2}), in place {ip:.3} ({:.2})",
                zero * 100.0,
                cp / d,
                ip / d
            );
        }
    }

    /// Throughput on BERT shapes, one thread (a probe for performance work, run by hand:
    /// `cargo test --release -p tcc-runtime --lib int8_speed -- --ignored --nocapture`;
    /// `SHAPES=MxKxN,..`, `ROUNDS=N` interleaved rounds, medians printed).
    #[test]
    #[ignore = "timing probe, asserts nothing"]
    fn int8_speed() {
        // Weights rotated over copies past L2, as a model's are (read from L3 or memory).
        let copies = std::env::var("WEIGHT_COPIES").ok().and_then(|v| v.parse().ok()).unwrap_or(1usize);
        // `SHAPES=MxKxN,MxKxN` for others.
        let shapes: Vec<(usize, usize, usize)> = match std::env::var("SHAPES") {
            Ok(s) => s
                .split(',')
                .map(|t| {
                    let d: Vec<usize> = t.split('x').map(|v| v.parse().unwrap()).collect();
                    (d[0], d[1], d[2])
                })
                .collect(),
            Err(_) => vec![(128, 768, 768), (128, 768, 3072), (128, 3072, 768), (64, 768, 3072), (64, 3072, 768)],
        };
        let rounds: usize = std::env::var("ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
        let mut res: std::collections::BTreeMap<(String, usize), Vec<f64>> = Default::default();
        let inputs: Vec<(Vec<u8>, Vec<Vec<i8>>)> = shapes
            .iter()
            .map(|&(m, k, n)| (vec![3u8; m * k], (0..copies).map(|_| pack_b_s8(k, n, &vec![-2i8; k * n])).collect()))
            .collect();
        for _round in 0..rounds {
            for kernel in [Kernel::Amx, Kernel::Vnni512].into_iter().filter(|k| k.supported()) {
                for (&(m, k, n), (a, packed)) in shapes.iter().zip(&inputs) {
                    let mut c = vec![0i32; m * n];
                    let iters = 50 * (1 + (1 << 20) / (m * k * n));
                    let t = std::time::Instant::now();
                    for i in 0..iters {
                        gemm_u8s8(kernel, m, k, n, a, k, &packed[i % copies], None, &mut c, n).unwrap();
                    }
                    let s = t.elapsed().as_secs_f64() / iters as f64;
                    res.entry((format!("{kernel:?} {m}x{k}x{n}"), 2 * m * k * n)).or_default().push(s * 1e3);
                }
            }
        }
        for ((name, ops), mut v) in res {
            v.sort_by(f64::total_cmp);
            let ms = v[v.len() / 2];
            eprintln!("{name}: median {ms:.3} ms, {:.0} GOP/s", ops as f64 / ms / 1e6);
        }
    }
}

//! Fast implementations of the hot ops on JIT-compiled code, with the work split over threads.
//!
//! [`Fast::eval`] answers `None` for an op (or shape) it does not handle, and the executor then
//! runs the op's reference `eval`. Every path here is checked against the reference in tests.

use crate::error::{Error, Result};
use crate::jit::{EpiOperand, GemmArgs, GemmSpec, Jit};
#[cfg(target_arch = "x86_64")]
use crate::kernels::avx512_vec::EpiContext;
use crate::kernels::{Tier, NR};
use crate::op::{
    broadcast_shapes, broadcast_strides, fused, strides_of, Attention, BinaryKind, EpiOp, Epilogue, FusedMatMul,
    Gather, LayerNorm, Op, Softmax, Transpose,
};
use crate::plan::Plan;
use crate::pool;
use crate::tensor::Tensor;
use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::ops::Range;

/// Rows of `A` per `k` block kept hot while a panel of `B` streams through.
const KC: usize = 256;
/// The most floats of partial sums a product split along `k` may allocate (16 MiB).
#[cfg(target_arch = "x86_64")]
const MAX_SPLIT_K_SCRATCH: usize = 4 << 20;

/// A buffer of `len` floats that will be fully written before it is read.
struct Uninit(Vec<MaybeUninit<f32>>);

impl Uninit {
    fn new(len: usize) -> Uninit {
        let mut v = Vec::with_capacity(len);
        // SAFETY: MaybeUninit<f32> needs no initialization.
        unsafe { v.set_len(len) };
        Uninit(v)
    }

    fn ptr(&mut self) -> *mut f32 {
        self.0.as_mut_ptr() as *mut f32
    }

    /// # Safety
    /// Every element must have been written.
    unsafe fn assume_init(self) -> Vec<f32> {
        let mut v = std::mem::ManuallyDrop::new(self.0);
        // SAFETY: MaybeUninit<f32> has the layout of f32; the caller guarantees every element
        // is initialized; the allocation is handed over unchanged.
        unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut f32, v.len(), v.capacity()) }
    }
}

/// A pointer that may be sent to another thread: the work split below hands each thread
/// disjoint parts of the output.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to write disjoint regions from different threads, within the lifetime of
// the buffer they point into (the parallel loop finishes before the buffer is used).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so that closures capture the whole `SendPtr`).
    fn get(self) -> *mut f32 {
        self.0
    }
}

pub struct Fast {
    pub jit: Jit,
    /// The kernel of integer products, chosen at load (`None`: the `i16` pair kernels).
    pub int8_kernel: Option<crate::kernels::int8::Kernel>,
    /// The engine that attention ops allowing bf16 run on ([`crate::kernels::bf16`]): AMX
    /// tiles, or AVX-512 BF16 vectors, where the CPU has one (and the AVX-512 tier), unless
    /// `TCC_ATTENTION=f32` asks for the f32 kernel (or `vector`, the vectors on an AMX CPU).
    #[cfg(target_arch = "x86_64")]
    bf16_attention: Option<crate::kernels::bf16::Engine>,
    /// The epilogues that are [`Chain`](crate::kernels::avx512_vec::Chain)s, recognized once.
    #[cfg(target_arch = "x86_64")]
    chains: Vec<(Epilogue, crate::kernels::avx512_vec::Chain)>,
    /// Constant `s8` weights of `MatMulInteger` steps, packed for the integer kernel at load,
    /// by the address of the weight tensor's data.
    int8: HashMap<usize, Int8Weights>,
    /// Column sums of the packed `s8` weights of integer `FusedMatMul`s, and the live steps of
    /// those walked sparse ([`min_zero`], [`crate::kernels::int8::Sparse`]), by the address of
    /// the weight tensor's data.
    colsums: HashMap<usize, (Tensor, Vec<i32>, Option<crate::kernels::int8::Sparse>)>,
    /// Without VNNI: the `s8` weights of integer `FusedMatMul`s as panels of `i16` pairs
    /// (`kernels::int16`), by the address of the weight tensor's data.
    pair_weights: HashMap<usize, (Tensor, Tensor)>,
    /// The packed `f32` weights of float `FusedMatMul`s with panel rows all zero, with their
    /// live runs of rows ([`crate::kernels::PanelRuns`]), by the address of their data.
    panel_runs: HashMap<usize, (Tensor, crate::kernels::PanelRuns)>,
    /// The last activations an integer product quantized (Q, K and V read the same): the
    /// tensor is held, so its data cannot be freed and its address reused while cached.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::type_complexity)]
    quantized: std::sync::Mutex<Option<((Tensor, fused::ActQuant, Option<Vec<usize>>), std::sync::Arc<QuantizedA>)>>,
}

/// `s8` weights `[k, n]` packed for [`crate::kernels::int8`], with their column sums (for the
/// activations' zero point: `sum (a - za) b = sum a b - za sum b`).
struct Int8Weights {
    k: usize,
    n: usize,
    packed: Vec<i8>,
    colsum: Vec<i32>,
}

/// What an epilogue runs with (the AVX-512 executor's context elsewhere).
#[cfg(not(target_arch = "x86_64"))]
struct EpiContext {
    program: *const crate::op::EpiOp,
    len: usize,
    operands: *const EpiOperand,
    col_broadcast: *const u8,
}

/// How a dim of a logical (permuted) view maps to memory.
fn view(shape: &[usize], perm: &Option<Vec<usize>>) -> (Vec<usize>, Vec<usize>) {
    let st = strides_of(shape);
    (fused::permute(shape, perm), fused::permute(&st, perm))
}

fn col_broadcast(product: &[usize], extra: &Tensor) -> bool {
    let n = *product.last().unwrap_or(&1);
    let last = extra.shape().last().copied().unwrap_or(1);
    last == 1 && n != 1
}

/// The share of zero blocks from which the kernels walk a product's live blocks (int8: their
/// list, and a compact copy where half or more are zero; f32: the runs) instead of the dense
/// panels, by its format: the build's choice (`Blocks`: any zero block;
/// `Dense`: never, `None` returned), or, for products the build did not decide, the runtime's
/// own threshold ([`crate::kernels::SKIP_MIN_ZERO`]).
fn min_zero(format: Option<crate::op::WeightFormat>) -> Option<f64> {
    match format {
        None => Some(crate::kernels::SKIP_MIN_ZERO),
        Some(crate::op::WeightFormat::Dense) => None,
        Some(crate::op::WeightFormat::Blocks) => Some(f64::MIN_POSITIVE),
    }
}

impl Fast {
    /// What runs `plan`'s integer products and its attention that allows bf16 on this CPU,
    /// for reports: `int8 amx`, `int8 vnni512` or `int8 i16 pairs`; `attention bf16 amx`,
    /// `attention bf16 vector` or `attention f32` (the bf16 engine where a head's shape lets
    /// it run: heads of up to [`crate::kernels::bf16::MAX_HEAD`] dims, BERT's all). Each only
    /// where the plan has such ops.
    pub fn kernels(&self, plan: &Plan) -> Vec<String> {
        let ops = || plan.steps.iter().map(|s| &s.op);
        let mut out = Vec::new();
        if ops().any(|op| matches!(op, Op::FusedMatMul(f) if f.int8.is_some())) {
            out.push(format!("int8 {}", self.int8_kernel.map_or("i16 pairs", |k| k.name())));
        }
        if ops().any(|op| matches!(op, Op::Attention(a) if a.bf16)) {
            #[cfg(target_arch = "x86_64")]
            let engine = self.bf16_attention.map(|e| e.name());
            #[cfg(not(target_arch = "x86_64"))]
            let engine: Option<&str> = None;
            out.push(engine.map_or("attention f32".into(), |e| format!("attention bf16 {e}")));
        }
        out
    }

    /// Compiles the code `plan` needs.
    pub fn new(plan: &Plan, tier: Tier) -> Result<Fast> {
        // Drivers for each epilogue, for the column broadcasts the extra inputs can have. The
        // exact pattern is only known from shapes at run time; compile both variants for
        // single-extra programs (bias rows vs residuals), the all-false variant otherwise.
        let mut specs: Vec<GemmSpec> = Vec::new();
        // Epilogues the AVX-512 executor runs on integer products' tiles (no driver needed).
        let mut tile_only: Vec<GemmSpec> = Vec::new();
        let int8_kernel = Fast::native_int8(tier);
        let native_int8 = int8_kernel.is_some();
        let products = plan.steps.iter().flat_map(|s| match &s.op {
            Op::FusedMatMul(f) => vec![f],
            Op::Attention(a) => vec![&a.scores, &a.context],
            _ => vec![],
        });
        for f in products {
            // Without the VNNI kernel, an integer product runs on the driver with the pair kernel
            // and its activations' row scales as a last, column-broadcast operand (`int8_on_pairs`).
            let (epilogue, extra, last_bcast) = match f.int8 {
                Some(_) if !native_int8 => (f.epilogue.scale_first(f.extra), f.extra + 1, true),
                _ => (f.epilogue.clone(), f.extra, false),
            };
            let mut patterns = vec![vec![false; extra]];
            for i in 0..extra {
                let mut p = vec![false; extra];
                p[i] = true;
                patterns.push(p);
            }
            if last_bcast {
                let mut two = vec![false; extra];
                two[extra - 1] = true;
                for i in 0..extra - 1 {
                    let mut p = two.clone();
                    p[i] = true;
                    patterns.push(p);
                }
            }
            let into = if f.int8.is_some() && native_int8 { &mut tile_only } else { &mut specs };
            if f.int8.is_some() && native_int8 {
                if let Some((_, rest)) = scale_prefix(&f.epilogue) {
                    into.push(GemmSpec { epilogue: rest, col_broadcast: vec![false; extra] });
                }
            }
            for col_broadcast in patterns {
                let s = GemmSpec { epilogue: epilogue.clone(), col_broadcast };
                if !into.contains(&s) {
                    into.push(s);
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        let mut chains: Vec<(Epilogue, crate::kernels::avx512_vec::Chain)> = Vec::new();
        #[cfg(target_arch = "x86_64")]
        for s in specs.iter().chain(&tile_only) {
            if chains.iter().all(|(e, _)| *e != s.epilogue) {
                if let Some(c) = crate::kernels::avx512_vec::Chain::of(&s.epilogue.0) {
                    chains.push((s.epilogue.clone(), c));
                }
            }
        }
        Ok(Fast {
            jit: Jit::new(tier, &specs)?,
            int8_kernel,
            #[cfg(target_arch = "x86_64")]
            bf16_attention: {
                use crate::kernels::bf16::Engine;
                // `TCC_ATTENTION=f32`, or an engine by name (the vectors on an AMX CPU, say).
                let asked = std::env::var("TCC_ATTENTION").ok();
                let named = Engine::ALL.into_iter().find(|e| asked.as_deref() == Some(e.name()));
                match (asked.as_deref(), named) {
                    _ if tier != Tier::Avx512 => None,
                    (Some("f32"), _) => None,
                    (_, Some(e)) if e.supported() => Some(e),
                    _ => Engine::best(),
                }
            },
            #[cfg(target_arch = "x86_64")]
            chains,
            int8: HashMap::new(),
            colsums: HashMap::new(),
            pair_weights: HashMap::new(),
            panel_runs: HashMap::new(),
            #[cfg(target_arch = "x86_64")]
            quantized: std::sync::Mutex::new(None),
        })
    }

    /// The kernel integer products run on (`None`: the pair kernels): AMX or AVX-512 VNNI,
    /// on the AVX-512 tier.
    fn native_int8(tier: Tier) -> Option<crate::kernels::int8::Kernel> {
        if tier == Tier::Avx512 {
            crate::kernels::int8::Kernel::best()
        } else {
            None
        }
    }

    /// Finds the all-zero rows of the packed `f32` weights of the plan's float products that
    /// walk them ([`min_zero`], [`crate::kernels::PanelRuns`]), which [`Fast::product`] then
    /// skips. Runs on the constants as they are once packed at load.
    pub fn prepare_sparse(&mut self, plan: &Plan, constants: &[(crate::plan::Slot, Tensor)]) {
        for step in &plan.steps {
            let (Op::FusedMatMul(f), Some(Some(b))) = (&step.op, step.inputs.get(1)) else { continue };
            let (None, Some([k, n])) = (f.int8, f.packed) else { continue };
            let Some((_, w)) = constants.iter().find(|(s, _)| s == b) else { continue };
            let Ok(data) = w.as_slice::<f32>() else { continue };
            if self.panel_runs.contains_key(&(data.as_ptr() as usize)) {
                continue;
            }
            let Some(min_zero) = min_zero(f.weights) else { continue };
            if let Some(runs) = crate::kernels::PanelRuns::detect(k, n, data, min_zero) {
                tracing::debug!(step = %step.name, zero = runs.zero_fraction(), "f32 weights: all-zero panel rows skipped");
                // The tensor is held: its address cannot be reused while it is a key.
                self.panel_runs.insert(data.as_ptr() as usize, (w.clone(), runs));
            }
        }
    }

    /// Packs the constant `s8` weights of the plan's `MatMulInteger` steps for the integer
    /// kernel (when this CPU has it): quantized models then multiply in `vpdpbusd`, not in the
    /// reference loop.
    pub fn prepare_int8(&mut self, plan: &Plan, constants: &[(crate::plan::Slot, Tensor)]) {
        if self.int8_kernel.is_none() {
            for step in &plan.steps {
                let (Op::FusedMatMul(f), Some(Some(b))) = (&step.op, step.inputs.get(1)) else { continue };
                let (Some(_), Some([k, n])) = (f.int8, f.packed) else { continue };
                let Some((_, w)) = constants.iter().find(|(s, _)| s == b) else { continue };
                let Ok(data) = w.as_slice::<i8>() else { continue };
                if data.len() != f.packed_len(k, n) || self.pair_weights.contains_key(&(data.as_ptr() as usize)) {
                    continue;
                }
                let dense = crate::kernels::int8::unpack_b_s8(k, n, data);
                let packed = crate::kernels::int16::pack_b_pairs(k, n, &dense);
                if let Ok(t) = Tensor::new(vec![packed.len()], packed) {
                    self.pair_weights.insert(data.as_ptr() as usize, (w.clone(), t));
                }
            }
            return;
        }
        for step in &plan.steps {
            let (Op::FusedMatMul(f), Some(Some(b))) = (&step.op, step.inputs.get(1)) else { continue };
            let (Some(_), Some([k, n])) = (f.int8, f.packed) else { continue };
            let Some((_, w)) = constants.iter().find(|(s, _)| s == b) else { continue };
            let Ok(data) = w.as_slice::<i8>() else { continue };
            if data.len() == f.packed_len(k, n) {
                // The weights are held with their sums: their address cannot be reused while it
                // is a key.
                self.colsums.entry(data.as_ptr() as usize).or_insert_with(|| {
                    let sparse = min_zero(f.weights)
                        .and_then(|min_zero| crate::kernels::int8::Sparse::detect(k, n, data, min_zero));
                    if let Some(sp) = &sparse {
                        tracing::debug!(step = %step.name, zero = sp.zero_fraction(), "int8 weights: all-zero AMX steps skipped");
                    }
                    (w.clone(), crate::kernels::int8::colsums(k, n, data), sparse)
                });
            }
        }
        for step in &plan.steps {
            let (Op::MatMulInteger(_), Some(Some(b))) = (&step.op, step.inputs.get(1)) else { continue };
            let Some((_, w)) = constants.iter().find(|(s, _)| s == b) else { continue };
            let (Ok(data), 2) = (w.as_slice::<i8>(), w.rank()) else { continue };
            let key = data.as_ptr() as usize;
            if self.int8.contains_key(&key) {
                continue;
            }
            let (k, n) = (w.shape()[0], w.shape()[1]);
            let colsum = (0..n).map(|j| (0..k).map(|i| data[i * n + j] as i32).sum()).collect();
            let packed = crate::kernels::int8::pack_b_s8(k, n, data);
            self.int8.insert(key, Int8Weights { k, n, packed, colsum });
        }
    }

    /// A standalone f32 `Gelu` (models whose products are integer, so not fused): AVX-512,
    /// the same approximations as the epilogues'.
    #[cfg(target_arch = "x86_64")]
    fn gelu(&self, g: &crate::op::Gelu, inputs: &[Option<&Tensor>]) -> Option<Result<Vec<Tensor>>> {
        let x = inputs.first().copied().flatten()?;
        self.jit.tile_epilogue?;
        let xs = x.as_slice::<f32>().ok()?;
        let n = xs.len();
        let mut out = Uninit::new(n);
        let y = SendPtr(out.ptr());
        let chunk = 1 << 14;
        let tanh_form = g.approximate == crate::op::GeluApprox::Tanh;
        pool::global().run(n.div_ceil(chunk), &|t| {
            let (i0, len) = (t * chunk, chunk.min(n - t * chunk));
            // SAFETY: the AVX-512 tier is in use (its tile epilogue exists); elements
            // i0..i0+len of x and y are in bounds; tasks write disjoint ranges.
            unsafe { crate::kernels::avx512_vec::gelu_slice(xs.as_ptr().add(i0), y.get().add(i0), len, tanh_form) };
        });
        // SAFETY: every element was written.
        let v = unsafe { out.assume_init() };
        Some(Tensor::new(x.shape().to_vec(), v).map(|t| vec![t]))
    }

    /// A standalone `FakeQuant` (QDQ models' activations) with AVX-512, bit-exact.
    #[cfg(target_arch = "x86_64")]
    fn fake_quant(&self, q: &crate::op::FakeQuant, inputs: &[Option<&Tensor>]) -> Option<Result<Vec<Tensor>>> {
        let x = inputs.first().copied().flatten()?;
        self.jit.tile_epilogue?;
        q.validate().ok()?;
        let xs = x.as_slice::<f32>().ok()?;
        let n = xs.len();
        let mut out = Uninit::new(n);
        let y = SendPtr(out.ptr());
        let chunk = 1 << 14;
        pool::global().run(n.div_ceil(chunk), &|t| {
            let (i0, len) = (t * chunk, chunk.min(n - t * chunk));
            // SAFETY: the AVX-512 tier is in use; elements i0..i0+len of x and y are in
            // bounds; tasks write disjoint ranges.
            unsafe { crate::kernels::avx512_vec::fake_quant_slice(xs.as_ptr().add(i0), y.get().add(i0), len, q) };
        });
        // SAFETY: every element was written.
        let v = unsafe { out.assume_init() };
        Some(Tensor::new(x.shape().to_vec(), v).map(|t| vec![t]))
    }

    /// `DynamicQuantizeLinear` with AVX-512: the reference's range, parameters and bytes (the
    /// reference rounds with a library call per element on baseline x86-64).
    #[cfg(target_arch = "x86_64")]
    fn dynamic_quantize(&self, inputs: &[Option<&Tensor>]) -> Option<Result<Vec<Tensor>>> {
        let x = inputs.first().copied().flatten()?;
        self.jit.tile_epilogue?;
        let xs = x.as_slice::<f32>().ok()?;
        // SAFETY: the AVX-512 tier is in use; `xs` holds its length.
        let (min, max) = unsafe { crate::kernels::avx512_vec::min_max(xs.as_ptr(), xs.len()) };
        let (scale, zp) = crate::op::quant::dynamic_qparams(min, max);
        let mut q = vec![0u8; xs.len()];
        // SAFETY: as above; `q` holds as many bytes as `xs` floats.
        unsafe { crate::kernels::avx512_vec::quantize_u8(xs.as_ptr(), q.as_mut_ptr(), xs.len(), scale, zp) };
        let t = match Tensor::new(x.shape().to_vec(), q) {
            Ok(t) => t,
            Err(e) => return Some(Err(e)),
        };
        Some(Ok(vec![t, Tensor::scalar(scale), Tensor::scalar(zp)]))
    }

    /// `MatMulInteger` of `u8` activations by prepared `s8` weights (per-tensor zero points,
    /// the weights' zero): exact `i32`, as the reference.
    fn matmul_integer(&self, inputs: &[Option<&Tensor>]) -> Option<Result<Vec<Tensor>>> {
        let kernel = self.int8_kernel?;
        let (a, b) = (inputs.first().copied().flatten()?, inputs.get(1).copied().flatten()?);
        let w = self.int8.get(&(b.as_slice::<i8>().ok()?.as_ptr() as usize))?;
        if b.shape() != [w.k, w.n] || a.rank() < 2 || *a.shape().last()? != w.k || w.k == 0 || w.k >= 1 << 13 {
            return None;
        }
        let xs = a.as_slice::<u8>().ok()?;
        let za = match inputs.get(2).copied().flatten() {
            None => 0,
            Some(z) if z.len() == 1 && z.dtype() == crate::DType::U8 => z.as_slice::<u8>().ok()?[0] as i32,
            Some(_) => return None,
        };
        match inputs.get(3).copied().flatten() {
            None => {}
            Some(z) if z.dtype() == crate::DType::I8 && z.as_slice::<i8>().ok()?.iter().all(|&v| v == 0) => {}
            Some(_) => return None,
        }
        let (k, n) = (w.k, w.n);
        let m = xs.len() / k;
        // Rows padded to groups of four bytes (zeros add nothing to the sums).
        let lda = crate::kernels::int8::k_groups(k) * 4;
        let padded: std::borrow::Cow<[u8]> = if lda == k {
            std::borrow::Cow::Borrowed(xs)
        } else {
            let mut v = vec![0u8; m * lda];
            for (r, row) in xs.chunks(k).enumerate() {
                v[r * lda..r * lda + k].copy_from_slice(row);
            }
            std::borrow::Cow::Owned(v)
        };
        let mut out = vec![0i32; m * n];
        let panels = n.div_ceil(NR);
        let threads = pool::global().threads().max(1);
        let per = panels.div_ceil(threads);
        let c = out.as_mut_ptr() as usize;
        let (ap, bp) = (padded.as_ptr() as usize, w.packed.as_ptr() as usize);
        pool::global().run_static(threads, &|t| {
            let (p0, p1) = ((t * per).min(panels), ((t + 1) * per).min(panels));
            // SAFETY: `prepare_int8` only prepared weights when the CPU has VNNI; `padded` is m
            // rows of `lda` bytes, `packed` the panels of k x n, `out` m x n; each thread
            // writes its own panels' columns.
            unsafe {
                crate::kernels::int8::gemm_u8s8_panels(
                    kernel,
                    m,
                    lda / 4,
                    ap as *const u8,
                    lda,
                    crate::kernels::int8::Weights { packed: bp as *const i8, sparse: None },
                    c as *mut i32,
                    n,
                    n,
                    p0,
                    p1,
                )
            };
        });
        if za != 0 {
            for row in out.chunks_mut(n) {
                for (v, s) in row.iter_mut().zip(&w.colsum) {
                    *v = v.wrapping_sub(za.wrapping_mul(*s));
                }
            }
        }
        let mut shape = a.shape().to_vec();
        *shape.last_mut()? = n;
        Some(Tensor::new(shape, out).map(|t| vec![t]))
    }

    /// `epilogue` as a chain, when it is one.
    #[cfg(target_arch = "x86_64")]
    fn chain(&self, epilogue: &Epilogue) -> Option<&crate::kernels::avx512_vec::Chain> {
        self.chains.iter().find(|(e, _)| e == epilogue).map(|(_, c)| c)
    }

    /// Runs `op` on fast code when it can.
    pub fn eval(&self, op: &Op, inputs: &[Option<&Tensor>]) -> Option<Result<Vec<Tensor>>> {
        match op {
            Op::FusedMatMul(f) => self.fused_matmul(f, inputs),
            Op::Attention(at) => self.attention(at, inputs),
            Op::Softmax(s) => self.softmax(s, inputs),
            Op::MatMulInteger(_) => self.matmul_integer(inputs),
            #[cfg(target_arch = "x86_64")]
            Op::Gelu(g) => self.gelu(g, inputs),
            #[cfg(target_arch = "x86_64")]
            Op::DynamicQuantizeLinear(_) => self.dynamic_quantize(inputs),
            #[cfg(target_arch = "x86_64")]
            Op::FakeQuant(q) => self.fake_quant(q, inputs),
            Op::LayerNorm(l) => self.layernorm(l, inputs),
            Op::Transpose(t) => transpose(t, inputs),
            Op::Binary(b) => binary_f32(b.kind, inputs),
            Op::Gather(g) => gather_rows(g, inputs),
            Op::DequantizeLinear(_) => dequantize(inputs),
            _ => None,
        }
    }

    fn softmax(&self, s: &Softmax, inputs: &[Option<&Tensor>]) -> Option<Result<Vec<Tensor>>> {
        let x = inputs.first().copied().flatten()?;
        let rank = x.rank() as i64;
        if s.log
            || s.nan_to_zero
            || x.dtype() != crate::DType::F32
            || !(s.axis == -1 || s.axis == rank - 1)
            || rank == 0
        {
            return None;
        }
        let len = *x.shape().last()?;
        let rows = x.len() / len.max(1);
        let xs = x.as_slice::<f32>().ok()?;
        let mut out = Uninit::new(x.len());
        let y = SendPtr(out.ptr());
        let f = self.jit.softmax;
        let chunk = rows_per_task(rows, len);
        pool::global().run(rows.div_ceil(chunk), &|t| {
            let r0 = t * chunk;
            let r = chunk.min(rows - r0);
            // SAFETY: rows r0..r0+r of x and y are in bounds (rows * len elements each); tasks
            // write disjoint rows.
            unsafe { f(xs.as_ptr().add(r0 * len), y.get().add(r0 * len), r, len) };
        });
        // SAFETY: every row was written by exactly one task.
        let v = unsafe { out.assume_init() };
        Some(Tensor::new(x.shape().to_vec(), v).map(|t| vec![t]))
    }

    fn layernorm(&self, l: &LayerNorm, inputs: &[Option<&Tensor>]) -> Option<Result<Vec<Tensor>>> {
        let x = inputs.first().copied().flatten()?;
        let rank = x.rank() as i64;
        if rank == 0 || !(l.axis == -1 || l.axis == rank - 1) {
            return None;
        }
        let len = *x.shape().last()?;
        let gamma = inputs.get(1).copied().flatten()?;
        let beta = inputs.get(2).copied().flatten();
        if gamma.len() != len || beta.is_some_and(|b| b.len() != len) {
            return None;
        }
        let (xs, gs) = (x.as_slice::<f32>().ok()?, gamma.as_slice::<f32>().ok()?);
        let bs = match beta {
            Some(b) => b.as_slice::<f32>().ok()?.as_ptr(),
            None => std::ptr::null(),
        };
        let bsp = bs as usize;
        let rows = x.len() / len.max(1);
        let mut out = Uninit::new(x.len());
        let y = SendPtr(out.ptr());
        let f = self.jit.layernorm;
        let eps = l.epsilon;
        let chunk = rows_per_task(rows, len);
        pool::global().run(rows.div_ceil(chunk), &|t| {
            let r0 = t * chunk;
            let r = chunk.min(rows - r0);
            // SAFETY: as in softmax; gamma and beta hold `len` floats (checked above).
            unsafe { f(xs.as_ptr().add(r0 * len), gs.as_ptr(), bsp as *const f32, y.get().add(r0 * len), r, len, eps) };
        });
        // SAFETY: every row was written.
        let v = unsafe { out.assume_init() };
        Some(Tensor::new(x.shape().to_vec(), v).map(|t| vec![t]))
    }

    fn fused_matmul(&self, f: &FusedMatMul, inputs: &[Option<&Tensor>]) -> Option<Result<Vec<Tensor>>> {
        if let Some(act) = f.int8 {
            if self.int8_kernel.is_none() {
                return self.int8_on_pairs(f, act, inputs);
            }
            #[cfg(target_arch = "x86_64")]
            return self.fused_matmul_int8(f, act, inputs);
            #[cfg(not(target_arch = "x86_64"))]
            return None;
        }
        self.product(f, inputs, false)
    }

    /// A float `FusedMatMul` on the generated driver, or with `pairs` an integer one whose
    /// operands are `i16` pairs (`int8_on_pairs`) on the pair kernel.
    fn product(&self, f: &FusedMatMul, inputs: &[Option<&Tensor>], pairs: bool) -> Option<Result<Vec<Tensor>>> {
        let (a, b) = (inputs.first().copied().flatten()?, inputs.get(1).copied().flatten()?);
        let extras: Vec<&Tensor> = (0..f.extra).map(|i| inputs.get(2 + i).copied().flatten()).collect::<Option<_>>()?;
        let p = match Product::prepare(f, a.shape(), b, &extras)? {
            Ok(p) => Product { pairs, ..p },
            Err(e) => return Some(Err(e)),
        };
        let driver = self.jit.gemm(&p.spec)?;
        let xs = a.as_slice::<f32>().ok()?;
        let bs = b.as_slice::<f32>().ok()?;
        let packed = p.pack_all(self, bs);
        let mut out = Uninit::new(p.total);
        let c = SendPtr(out.ptr());
        // Work items: (batch, panel range).
        let panels = p.n.div_ceil(NR);
        let batches = p.offsets.len();
        let threads = pool::global().threads();
        // Weights with zero rows: only their live runs multiplied.
        let sparse = self
            .panel_runs
            .get(&(bs.as_ptr() as usize))
            .map(|(_, r)| r)
            .filter(|r| !p.pairs && matches!(p.b, BSource::Packed) && r.fits(panels) && p.sparse_epilogue(self));
        // SAFETY (of each call): as `Product::run_at`'s, which the callers below give.
        let run = |a: *const f32, b: *const f32, c: *mut f32, bi: usize, cols: Range<usize>, rows: Range<usize>| unsafe {
            match sparse {
                Some(runs) => p.run_sparse(self, runs, a, p.lda, b, c, bi, cols, rows),
                None => p.run_at(self, driver, a, p.lda, b, c, bi, cols, rows),
            }
        };
        #[cfg(target_arch = "x86_64")]
        if let Some(parts) = self.split_k(&p, threads).filter(|_| sparse.is_none()) {
            // SAFETY: `c` is the output of this product, `xs` and `packed` its A and B.
            unsafe { self.run_split_k(&p, xs, &packed, c.get(), parts) };
            // SAFETY: the reduction wrote every element of the output.
            let v = unsafe { out.assume_init() };
            return Some(Tensor::new(p.out_shape, v).map(|t| vec![t]));
        }
        // One share of equal size per thread, the same thread always taking the same share
        // (`run_static`): the next op split the same way (attention by head after the Q/K/V
        // products) then reads what its own core wrote, and every item starts one stream of
        // weights, not several.
        if batches == 1 && threads > 1 {
            // Whole panels per thread, and the panels left over split by rows ([`Shares`]).
            let mr = if p.pairs { self.jit.pair_mr } else { self.jit.tier.mr() };
            let shares = Shares::new(panels, p.m, threads, mr);
            pool::global().run_static(threads, &|t| {
                let (whole, parts, rows) = shares.of(t);
                for (cols, rows) in [(whole, 0..p.m), (parts, rows)] {
                    if cols.is_empty() || rows.is_empty() {
                        continue;
                    }
                    let (a, cb) = (xs.as_ptr().wrapping_add(p.offsets[0][0]), c.get().wrapping_add(p.offsets[0][2]));
                    // As below, for batch 0; the shares' panels and rows are disjoint and
                    // cover every panel's m rows ([`Shares::of`]).
                    run(a, packed.panels(0), cb, 0, cols, rows);
                }
            });
            // SAFETY: the shares cover every panel's rows.
            let v = unsafe { out.assume_init() };
            return Some(Tensor::new(p.out_shape, v).map(|t| vec![t]));
        }
        let splits = if batches >= threads { 1 } else { threads.div_ceil(batches).min(panels).max(1) };
        let per = panels.div_ceil(splits);
        let items: Vec<(usize, usize, usize)> = (0..batches)
            .flat_map(|bi| (0..splits).map(move |s| (bi, s * per, ((s + 1) * per).min(panels))))
            .filter(|&(_, p0, p1)| p0 < p1)
            .collect();
        pool::global().run_static(items.len(), &|item| {
            let (bi, p0, p1) = items[item];
            let o = p.offsets[bi];
            // `Product::prepare` derived every offset and stride from the tensors' shapes:
            // A's batch view (m rows at stride lda, k contiguous floats) and B's panels lie
            // inside their buffers, C's rows for this batch and the columns of panels p0..p1 lie
            // inside the output and no other item writes them, each extra operand covers the
            // product's rows and columns (or column 0 when it broadcasts).
            run(xs.as_ptr().wrapping_add(o[0]), packed.panels(bi), c.get().wrapping_add(o[2]), bi, p0..p1, 0..p.m);
        });
        // SAFETY: the items cover every batch and every panel, and each driver call writes all
        // m rows of its panels' columns.
        let v = unsafe { out.assume_init() };
        Some(Tensor::new(p.out_shape, v).map(|t| vec![t]))
    }

    /// An integer `FusedMatMul` without the VNNI kernel: the activations quantized as the
    /// reference does and centered (`q - zero`, in `i16` pairs), times the weights (`i16` pairs,
    /// prepared at load) on the pair kernel, whose exact `i32` sums the driver's epilogue
    /// scales by the row scales first: the reference's values, bit for bit.
    fn int8_on_pairs(
        &self,
        f: &FusedMatMul,
        act: fused::ActQuant,
        inputs: &[Option<&Tensor>],
    ) -> Option<Result<Vec<Tensor>>> {
        use crate::kernels::int16;
        let (a, b) = (inputs.first().copied().flatten()?, inputs.get(1).copied().flatten()?);
        let (_, w) = self.pair_weights.get(&(b.as_slice::<i8>().ok()?.as_ptr() as usize))?;
        let [k, n] = f.packed?;
        let a = match &f.a_perm {
            Some(p) => match fused::transpose_tensor(a, p) {
                Ok(t) => t,
                Err(e) => return Some(Err(e)),
            },
            None => a.clone(),
        };
        if a.rank() < 2 || a.shape().last() != Some(&k) {
            return None;
        }
        let xs = a.as_slice::<f32>().ok()?;
        let rows = xs.len() / k.max(1);
        let kp = int16::pairs(k);
        let range = |x: &[f32]| x.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
        let whole = match act {
            fused::ActQuant::DynamicRow => None,
            fused::ActQuant::DynamicTensor => {
                let (l, h) = range(xs);
                Some(crate::op::dynamic_qparams(l, h))
            }
            fused::ActQuant::Static { scale, zero_point } => Some((scale, zero_point)),
        };
        let divide = matches!(act, fused::ActQuant::Static { .. });
        // Zeroed, not uninitialized: rows are written through `i16` slices of it.
        let mut centered = vec![0f32; rows * kp];
        let mut scales = vec![0f32; rows];
        let (cp, sp) = (SendPtr(centered.as_mut_ptr()), scales.as_mut_ptr() as usize);
        let chunk = (1 << 14) / k.max(1) + 1;
        pool::global().run(rows.div_ceil(chunk), &|t| {
            for r in t * chunk..((t + 1) * chunk).min(rows) {
                let x = &xs[r * k..(r + 1) * k];
                let (s, z) = whole.unwrap_or_else(|| {
                    let (l, h) = range(x);
                    crate::op::dynamic_qparams(l, h)
                });
                // SAFETY: row r of the buffer (kp initialized pair units, 2 * kp `i16`: f32's
                // alignment covers i16's) and scale r are this task's alone.
                unsafe {
                    let out = std::slice::from_raw_parts_mut(cp.get().add(r * kp) as *mut i16, 2 * kp);
                    centered_row(x, out, s, z, divide);
                    *(sp as *mut f32).add(r) = s;
                }
            }
        });
        let mut pair_shape = a.shape().to_vec();
        *pair_shape.last_mut()? = kp;
        let mut scale_shape = a.shape().to_vec();
        *scale_shape.last_mut()? = 1;
        let (centered, scales) = match (Tensor::new(pair_shape, centered), Tensor::new(scale_shape, scales)) {
            (Ok(c), Ok(s)) => (c, s),
            (Err(e), _) | (_, Err(e)) => return Some(Err(e)),
        };
        let g = FusedMatMul {
            a_perm: None,
            int8: None,
            packed: Some([kp, n]),
            epilogue: f.epilogue.scale_first(f.extra),
            extra: f.extra + 1,
            ..f.clone()
        };
        let mut ins: Vec<Option<&Tensor>> = vec![Some(&centered), Some(w)];
        ins.extend(inputs.iter().skip(2).take(f.extra).copied());
        ins.push(Some(&scales));
        self.product(&g, &ins, true)
    }

    /// An integer `FusedMatMul` on the VNNI kernel: `A` quantized (AVX-512, bit-exact with the
    /// reference), the product summed in `i32` tile by tile, dequantized and run through the
    /// epilogue while the panel's rows are in L1. Work is split by rows over the threads.
    #[cfg(target_arch = "x86_64")]
    fn fused_matmul_int8(
        &self,
        f: &FusedMatMul,
        act: fused::ActQuant,
        inputs: &[Option<&Tensor>],
    ) -> Option<Result<Vec<Tensor>>> {
        use crate::kernels::avx512_vec as v;
        use crate::kernels::int8;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let (a, b) = (inputs.first().copied().flatten()?, inputs.get(1).copied().flatten()?);
        let epilogue_fn = self.jit.tile_epilogue?;
        let kernel = self.int8_kernel?;
        let (_, colsum, sparse) = self.colsums.get(&(b.as_slice::<i8>().ok()?.as_ptr() as usize))?;
        if f.epilogue.0.len() > v::MAX_PROGRAM {
            return None;
        }
        let extras: Vec<&Tensor> = (0..f.extra).map(|i| inputs.get(2 + i).copied().flatten()).collect::<Option<_>>()?;
        let p = match Product::prepare(f, a.shape(), b, &extras)? {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        if !matches!(p.b, BSource::Packed) || colsum.len() != p.n {
            return None;
        }
        let xs = a.as_slice::<f32>().ok()?;
        let (m, k, n) = (p.m, p.k, p.n);
        let rows = p.offsets.len() * m;
        let ldq = int8::k_groups(k) * 4;
        // The activations quantized by the previous product (Q, K and V read the same), or a
        // buffer to quantize them into (the previous one's memory when nothing else holds it).
        let key = (a.clone(), act, f.a_perm.clone());
        let (cached, mut fresh) = {
            let mut slot = self.quantized.lock().unwrap_or_else(|e| e.into_inner());
            match slot.take() {
                Some((k, qa)) if k.0.same_data(&key.0) && k.1 == key.1 && k.2 == key.2 => {
                    *slot = Some((k, qa.clone()));
                    (Some(qa), None)
                }
                old => {
                    let mut qa = old.and_then(|(_, qa)| std::sync::Arc::try_unwrap(qa).ok()).unwrap_or_default();
                    qa.q.resize(rows * ldq, 0);
                    qa.scale.resize(rows, 0.0);
                    qa.zero.resize(rows, 0);
                    (None, Some(qa))
                }
            }
        };
        let quantized = cached.is_some();
        let whole = match act {
            _ if quantized => None,
            fused::ActQuant::DynamicRow => None,
            fused::ActQuant::DynamicTensor => Some(tensor_range(xs, &p)),
            fused::ActQuant::Static { scale, zero_point } => Some((scale, zero_point)),
        };
        let divide = matches!(act, fused::ActQuant::Static { .. });
        // Written through (by each thread, its own rows) only when fresh.
        let (qp, sp, zp) = match (&cached, fresh.as_mut()) {
            (Some(qa), _) => (qa.q.as_ptr() as usize, qa.scale.as_ptr() as usize, qa.zero.as_ptr() as usize),
            (None, Some(qa)) => {
                (qa.q.as_mut_ptr() as usize, qa.scale.as_mut_ptr() as usize, qa.zero.as_mut_ptr() as usize)
            }
            (None, None) => return None,
        };
        // The weights' scales (the epilogue's first instruction) applied as the tiles are
        // stored, when they are one row of `n` values: the rest of the program runs after.
        let (colscale, program) = match scale_prefix(&f.epilogue) {
            Some((j, rest))
                if p.extras.get(j).is_some_and(|e| e.2 == 0 && e.1.iter().all(|&o| o == 0) && e.0.len() == n) =>
            {
                (p.extras[j].0.as_ptr(), rest)
            }
            _ => (std::ptr::null(), f.epilogue.clone()),
        };
        let colscale = colscale as usize;
        let mut out = Uninit::new(p.total);
        let c = SendPtr(out.ptr());
        let bp = b.as_slice::<i8>().ok()?.as_ptr() as usize;
        // Rows (of all batches) split over the threads, each quantizing its own rows (no wait
        // between quantization and product) then multiplying them by all the weights, which
        // at a quarter of f32's bytes both cores can stream (split by panels after a
        // quantization pass instead: no faster, 60 interleaved BERT-base pairs on AMX). A share's
        // panels go in chunks, claimed one at a time: a thread done with its own share takes
        // chunks of the others' whose rows are quantized. The thread ahead pays the weights'
        // misses and the one behind finds them in the shared cache; with fixed shares the
        // first waited for the second.
        let threads = pool::global().threads().max(1);
        let per = rows.div_ceil(threads).div_ceil(4) * 4;
        let panels = n.div_ceil(NR);
        let chunk = panels.div_ceil(8).max(2);
        let chunks = panels.div_ceil(chunk);
        let ready: Vec<AtomicBool> = (0..threads).map(|_| AtomicBool::new(quantized)).collect();
        let next: Vec<AtomicUsize> = (0..threads).map(|_| AtomicUsize::new(0)).collect();
        // Share `t`'s rows.
        let share = |t: usize| ((t * per).min(rows), ((t + 1) * per).min(rows));
        // Claims and runs chunks of share `t` until none is left.
        let run_share = |t: usize| {
            let (r0, r1) = share(t);
            loop {
                let q = next[t].fetch_add(1, Ordering::Relaxed);
                if q >= chunks || r0 == r1 {
                    return;
                }
                let (p0, p1) = (q * chunk, ((q + 1) * chunk).min(panels));
                // Each batch's share of the rows.
                let mut r = r0;
                while r < r1 {
                    let (bi, i0) = (r / m, r % m);
                    let i1 = m.min(i0 + r1 - r);
                    let cb = c.get().wrapping_add(p.offsets[bi][2]);
                    p.with_program(self, bi, &program, |ctx| {
                        // A chain runs in the kernel's store, each vector still in a register.
                        let fused = (!ctx.chain.is_null()).then_some(int8::Fused { ctx, row: i0, col: 0 });
                        let epi = |row: usize, rows: usize, n0: usize, cols: usize| {
                            if fused.is_none() && ctx.len > 0 && !(ctx.len == 1 && program.0[0] == EpiOp::Acc) {
                                // SAFETY: the AVX-512 tier (the function exists only there); the
                                // context's operands cover this batch's rows and columns.
                                unsafe { epilogue_fn(ctx, cb, p.ldc, i0 + row, rows, n0, cols) };
                            }
                        };
                        let dq = int8::Dequant {
                            scale: (sp as *const f32).wrapping_add(r),
                            zero: (zp as *const i32).wrapping_add(r),
                            colsum: colsum.as_ptr(),
                            colscale: colscale as *const f32,
                            fused,
                        };
                        // SAFETY: colsums exist only where the CPU has VNNI (`prepare_int8`) and
                        // `kernel` runs here; the quantized rows r.. hold ldq bytes each (their
                        // share's `ready` seen set), the packed weights are `k x n` (their size
                        // checked by `prepare`), C holds this batch's rows i0..i1 at stride ldc,
                        // whose columns of panels p0..p1 only this claim writes; the parameters
                        // hold the rows; the context (and its chain) outlives the call and its
                        // operands cover this batch's rows and columns.
                        unsafe {
                            int8::gemm_u8s8_f32_panels(
                                kernel,
                                i1 - i0,
                                ldq / 4,
                                (qp as *const u8).wrapping_add(r * ldq),
                                ldq,
                                int8::Weights { packed: bp as *const i8, sparse: sparse.as_ref() },
                                cb.wrapping_add(i0 * p.ldc),
                                p.ldc,
                                n,
                                (p0, p1),
                                dq,
                                &epi,
                            )
                        };
                    });
                    r += i1 - i0;
                }
            }
        };
        pool::global().run_static(threads, &|t| {
            if !quantized {
                let (r0, r1) = share(t);
                // SAFETY: the AVX-512 tier; rows r0..r1 of A hold k floats (`prepare`), of the
                // buffers ldq bytes and one parameter each, written by this thread alone (the
                // buffer is not shared until this product is done, and other threads read
                // these rows only after `ready[t]`).
                unsafe {
                    quantize_rows(xs, &p, (whole, divide), (r0, r1), (qp as *mut u8, sp as *mut f32, zp as *mut i32))
                };
                ready[t].store(true, Ordering::Release);
            }
            run_share(t);
            // Then help with the others' shares whose rows are ready (never waiting: a pool
            // that runs the items one after another must not stall on a share not begun).
            for o in (t + 1..threads).chain(0..t) {
                if ready[o].load(Ordering::Acquire) {
                    run_share(o);
                }
            }
        });
        if let Some(qa) = fresh {
            *self.quantized.lock().unwrap_or_else(|e| e.into_inner()) = Some((key, std::sync::Arc::new(qa)));
        }
        // SAFETY: the threads' rows cover every row of every batch, each written in full.
        let v = unsafe { out.assume_init() };
        Some(Tensor::new(p.out_shape, v).map(|t| vec![t]))
    }

    /// How many parts along `k` to split a product into, when that pays: one batch whose A
    /// outgrows L2 (BERT's FFN down-projection). Split by columns, every core reads all of A,
    /// half of it from the other core's cache, where the previous product wrote it; split
    /// along `k`, each core reads the columns of A it wrote itself, and only the partial sums
    /// cross over, in the reduction that also runs the epilogue. Needs the AVX-512 tile
    /// epilogue.
    #[cfg(target_arch = "x86_64")]
    fn split_k(&self, p: &Product, threads: usize) -> Option<usize> {
        if p.pairs {
            return None;
        }
        self.split_k_for(p.m, p.k, p.n, p.offsets.len(), &p.spec.epilogue, threads)
    }

    #[cfg(target_arch = "x86_64")]
    fn split_k_for(
        &self,
        m: usize,
        k: usize,
        n: usize,
        batches: usize,
        epilogue: &Epilogue,
        threads: usize,
    ) -> Option<usize> {
        // The partial sums are `(threads - 1) * m * n` floats of scratch: bounded here (the
        // rows of one or a few sequences), so a long batch splits by columns instead.
        let scratch_ok = (threads.max(1) - 1).saturating_mul(m).saturating_mul(n) <= MAX_SPLIT_K_SCRATCH;
        let ok = threads >= 2
            && scratch_ok
            && batches == 1
            && k.div_ceil(KC) >= threads
            && crate::jit::gemm::k_outer_pays(m, k, KC)
            && self.jit.tile_epilogue.is_some()
            && epilogue.0.len() <= crate::kernels::avx512_vec::MAX_PROGRAM;
        ok.then_some(threads)
    }

    /// Runs a product split into `parts` along `k` (see [`Fast::split_k`]): part `t` sums block
    /// rows `t * blocks / parts ..` into the output (part 0) or a scratch buffer, then each
    /// thread adds the parts of its rows and runs the epilogue on them, tile by tile.
    ///
    /// # Safety
    /// `c` is the product's output (`p.total` floats); `xs` and `packed` its A and B.
    #[cfg(target_arch = "x86_64")]
    unsafe fn run_split_k(&self, p: &Product, xs: &[f32], packed: &Panels, c: *mut f32, parts: usize) {
        let Some(plain) = self.jit.gemm(&GemmSpec { epilogue: Epilogue::default(), col_broadcast: vec![] }) else {
            unreachable!("the plain driver always exists")
        };
        let (m, n) = (p.m, p.n);
        let blocks = p.k.div_ceil(KC);
        let mut scratch = Uninit::new((parts - 1) * m * n);
        let sp = SendPtr(scratch.ptr());
        let (c, o) = (SendPtr(c), p.offsets[0]);
        let a = SendPtr(xs.as_ptr().wrapping_add(o[0]) as *mut f32);
        let b = SendPtr(packed.panels(0) as *mut f32);
        pool::global().run_static(parts, &|t| {
            let k0 = (t * blocks / parts * KC).min(p.k);
            let k1 = ((t + 1) * blocks / parts * KC).min(p.k);
            let (dst, ld) =
                if t == 0 { (c.get().wrapping_add(o[2]), p.ldc) } else { (sp.get().wrapping_add((t - 1) * m * n), n) };
            // SAFETY: A, B and the output as in `fused_matmul`; scratch part t-1 holds m x n
            // floats; each part writes its own buffer.
            unsafe { p.run_part(self, plain, a.get(), b.get(), k0, k1, dst, ld) };
        });
        let tile = self.jit.tier.mr();
        let tiles = m.div_ceil(tile);
        pool::global().run_static(parts, &|t| {
            let sources: Vec<*const f32> =
                (0..parts - 1).map(|i| sp.get().wrapping_add(i * m * n) as *const f32).collect();
            p.with_epilogue(self, 0, |ctx| {
                for ti in t * tiles / parts..(t + 1) * tiles / parts {
                    let (row, mb) = (ti * tile, tile.min(m - ti * tile));
                    let mut n0 = 0;
                    while n0 < n {
                        // SAFETY: rows row..row+mb and columns n0..n0+32 (clipped to n) of the
                        // output and of each part exist; threads take disjoint rows; the
                        // epilogue's operands cover the output's rows and columns.
                        unsafe {
                            crate::kernels::avx512_vec::reduce_tile(
                                ctx,
                                c.get().wrapping_add(o[2]),
                                p.ldc,
                                &sources,
                                n,
                                row,
                                mb,
                                n0,
                                (n - n0).min(NR),
                            )
                        };
                        n0 += NR;
                    }
                }
            });
        });
    }

    /// Whether `at` runs on [`crate::kernels::avx512_vec::attention_head`]: the AVX-512 tier, both
    /// products on f32 tensors (not weights), the scores' epilogue empty or a chain, nothing
    /// after the context product, and no quantization of the probabilities (it needs the
    /// normalized probabilities themselves).
    #[cfg(target_arch = "x86_64")]
    fn fused_attention_applies(&self, at: &Attention, sp: &Product, cp: &Product) -> bool {
        let strided = |p: &Product| matches!(p.b, BSource::Strided { .. }) && !p.pairs;
        self.jit.tile_epilogue.is_some()
            && at.probs_quant.is_none()
            && strided(sp)
            && strided(cp)
            && cp.spec.epilogue.0.is_empty()
            && (sp.spec.epilogue.0.is_empty() || self.chain(&sp.spec.epilogue).is_some())
    }

    /// The bf16 engine and K's and V's strides (K's between head dims and keys, V's between
    /// keys and columns) when `at` runs in bf16: it allows bf16, this CPU has an engine, the
    /// fused kernel's conditions hold, heads have at most [`crate::kernels::bf16::MAX_HEAD`]
    /// dims and the strides fit the packing's gathers.
    #[cfg(target_arch = "x86_64")]
    fn bf16_attention_applies(
        &self,
        at: &Attention,
        sp: &Product,
        cp: &Product,
    ) -> Option<(crate::kernels::bf16::Engine, [usize; 4])> {
        use crate::kernels::bf16::{MAX_HEAD, MAX_STRIDE};
        let engine = self.bf16_attention?;
        if !(at.bf16 && self.fused_attention_applies(at, sp, cp)) || sp.k > MAX_HEAD {
            return None;
        }
        let (BSource::Strided { rs: k_dim, cs: k_key }, BSource::Strided { rs: v_key, cs: v_col }) = (&sp.b, &cp.b)
        else {
            return None;
        };
        (*k_key <= MAX_STRIDE && *v_col <= MAX_STRIDE).then_some((engine, [*k_dim, *k_key, *v_key, *v_col]))
    }

    /// Attention per (batch, head): scores into a per-item scratch, softmax in place, then the
    /// context written straight into the output: the `[batch, heads, query, key]` scores are
    /// never materialized.
    fn attention(&self, at: &Attention, inputs: &[Option<&Tensor>]) -> Option<Result<Vec<Tensor>>> {
        let (q, k, v) =
            (inputs.first().copied().flatten()?, inputs.get(1).copied().flatten()?, inputs.get(2).copied().flatten()?);
        let extras: Vec<&Tensor> =
            (0..at.scores.extra).map(|i| inputs.get(3 + i).copied().flatten()).collect::<Option<_>>()?;
        let sp = match Product::prepare(&at.scores, q.shape(), k, &extras)? {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        let (sq, sk) = (sp.m, sp.n);
        // The context product reads the probabilities of one batch, [sq, sk], contiguous.
        let probs_shape: Vec<usize> = sp.batch.iter().copied().chain([sq, sk]).collect();
        let cp = match Product::prepare(&at.context, &probs_shape, v, &[])? {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        if cp.offsets.len() != sp.offsets.len() || cp.k != sk {
            return None;
        }
        let (qs, ks, vs) = (q.as_slice::<f32>().ok()?, k.as_slice::<f32>().ok()?, v.as_slice::<f32>().ok()?);
        let mut out = Uninit::new(cp.total);
        let c = SendPtr(out.ptr());
        // One kernel per (batch, head) where it applies: bf16 (AMX tiles or AVX-512 BF16), else
        // f32 on AVX-512.
        #[cfg(target_arch = "x86_64")]
        {
            let bf16 = self.bf16_attention_applies(at, &sp, &cp);
            if bf16.is_some() || self.fused_attention_applies(at, &sp, &cp) {
                use crate::kernels::{avx512_vec, bf16};
                // The scores' chain (none for an empty epilogue, the only other kind that applies).
                let chain = self.chain(&sp.spec.epilogue);
                // Heads in fixed shares, those left over split by query rows ([`Shares`]; whole
                // tiles of rows: 16 in bf16, the f32 kernel's blocks of 12).
                let threads = pool::global().threads();
                let align = if bf16.is_some() { 16 } else { avx512_vec::HEAD_ROWS };
                let shares = Shares::new(sp.offsets.len(), sq, threads, align);
                let head = |bi: usize, rows: Range<usize>| {
                    let (so, co) = (sp.offsets[bi], cp.offsets[bi]);
                    let q = qs.as_ptr().wrapping_add(so[0] + rows.start * sp.lda);
                    let out = c.get().wrapping_add(co[2] + rows.start * cp.ldc);
                    let (row0, sq) = (rows.start, rows.len());
                    sp.with_epilogue(self, bi, |ctx| match bf16 {
                        Some((engine, [k_dim, k_key, v_key, v_col])) => {
                            let head = bf16::Head {
                                q,
                                ldq: sp.lda,
                                k: ks.as_ptr().wrapping_add(so[1]),
                                k_dim,
                                k_key,
                                v: vs.as_ptr().wrapping_add(co[1]),
                                v_key,
                                v_col,
                                rows: sq,
                                sk,
                                d: sp.k,
                                dv: cp.n,
                                out,
                                ldo: cp.ldc,
                                nan_to_zero: at.nan_to_zero,
                                row0,
                            };
                            // SAFETY: the engine is supported (`bf16_attention`) and the head
                            // fits it (checked); `prepare` checked the views of Q, K and V
                            // (`d x sk` and `sk x dv` at the strides given) and the output
                            // against the tensors; the scratch has the kernel's size; each
                            // batch writes its own rows.
                            bf16::with_scratch(bf16::scratch_len(&head), |scratch| unsafe {
                                bf16::attention_head(engine, &head, chain.map(|c| (ctx, c)), scratch)
                            });
                        }
                        None => {
                            let mut kpack = Uninit::new(sp.panel_len());
                            let mut vpack = Uninit::new(cp.panel_len());
                            let mut scratch = Uninit::new(avx512_vec::head_scratch(sk));
                            let head = avx512_vec::Head {
                                q,
                                ldq: sp.lda,
                                d: sp.k,
                                rows: sq,
                                k_panels: kpack.ptr(),
                                sk,
                                v_panels: vpack.ptr(),
                                dv: cp.n,
                                out,
                                ldo: cp.ldc,
                                nan_to_zero: at.nan_to_zero,
                                row0,
                            };
                            // SAFETY: both products' B are strided views (checked), packed here
                            // into buffers of exactly their panels' size; `prepare` checked Q's
                            // rows and the output's against the tensors; the scratch has the
                            // size the kernel asks; the AVX-512 tier (`tile_epilogue`) was
                            // detected; each batch writes its own output rows.
                            unsafe {
                                sp.pack_one(self, ks, bi, kpack.ptr());
                                cp.pack_one(self, vs, bi, vpack.ptr());
                                avx512_vec::attention_head(&head, chain.map(|c| (ctx, c)), scratch.ptr());
                            }
                        }
                    });
                };
                pool::global().run_static(threads, &|t| {
                    let (whole, parts, rows) = shares.of(t);
                    whole.for_each(|bi| head(bi, 0..sq));
                    if !rows.is_empty() {
                        parts.for_each(|bi| head(bi, rows.clone()));
                    }
                });
                // SAFETY: every batch's context rows were written.
                let v = unsafe { out.assume_init() };
                return Some(Tensor::new(cp.out_shape, v).map(|t| vec![t]));
            }
        }
        // With AVX-512, an epilogue chain on the scores (scale, mask) runs inside the softmax's
        // pass over each row instead of in the product's tiles: one pass less over the scores.
        #[cfg(target_arch = "x86_64")]
        let chain_in_softmax = self.jit.tile_epilogue.is_some() && self.chain(&sp.spec.epilogue).is_some();
        #[cfg(not(target_arch = "x86_64"))]
        let chain_in_softmax = false;
        let sdriver = if chain_in_softmax {
            self.jit.gemm(&GemmSpec { epilogue: Epilogue::default(), col_broadcast: vec![] })?
        } else {
            self.jit.gemm(&sp.spec)?
        };
        let cdriver = self.jit.gemm(&cp.spec)?;
        let softmax = self.jit.softmax;
        pool::global().run_static(sp.offsets.len(), &|bi| {
            let mut kpack = Uninit::new(sp.k * NR * sk.div_ceil(NR));
            let mut scores = Uninit::new(sq * sk);
            let mut vpack = Uninit::new(cp.k * NR * cp.n.div_ceil(NR));
            let (so, co) = (sp.offsets[bi], cp.offsets[bi]);
            // SAFETY: as in `fused_matmul`; the scratch buffers hold exactly one batch's packed
            // K (k x sk), scores (sq x sk) and packed V (sk x dv); the pack, driver and softmax
            // calls write every element of them before reading; each batch writes its own
            // rows of the output; the AVX-512 quantization of the probabilities runs only on
            // that tier (its tile epilogue exists) over the sq x sk scores.
            unsafe {
                sp.pack_one(self, ks, bi, kpack.ptr());
                sp.run(
                    self,
                    sdriver,
                    qs.as_ptr().wrapping_add(so[0]),
                    sp.lda,
                    kpack.ptr(),
                    scores.ptr(),
                    bi,
                    0,
                    sk.div_ceil(NR),
                );
                #[cfg(target_arch = "x86_64")]
                if chain_in_softmax {
                    sp.with_epilogue(self, bi, |ctx| {
                        crate::kernels::avx512_vec::softmax_chain(ctx, &*ctx.chain, scores.ptr(), sq, sk)
                    });
                } else {
                    softmax(scores.ptr(), scores.ptr(), sq, sk);
                }
                #[cfg(not(target_arch = "x86_64"))]
                softmax(scores.ptr(), scores.ptr(), sq, sk);
                // One pass for what follows the softmax: NaN to 0, then the probabilities'
                // quantization grid.
                #[cfg(target_arch = "x86_64")]
                let vector_quant = at.probs_quant.filter(|_| !at.nan_to_zero && self.jit.tile_epilogue.is_some());
                #[cfg(not(target_arch = "x86_64"))]
                let vector_quant: Option<crate::op::FakeQuant> = None;
                #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
                if let Some(q) = vector_quant {
                    // The AVX-512 tier: the same bits as `apply`, sixteen at a time.
                    #[cfg(target_arch = "x86_64")]
                    crate::kernels::avx512_vec::fake_quant_slice(scores.ptr(), scores.ptr(), sq * sk, &q);
                } else if at.nan_to_zero || at.probs_quant.is_some() {
                    for i in 0..sq * sk {
                        let p = scores.ptr().add(i);
                        if at.nan_to_zero && (*p).is_nan() {
                            *p = 0.0;
                        }
                        if let Some(q) = &at.probs_quant {
                            *p = q.apply(*p);
                        }
                    }
                }
                cp.pack_one(self, vs, bi, vpack.ptr());
                cp.run(
                    self,
                    cdriver,
                    scores.ptr(),
                    sk,
                    vpack.ptr(),
                    c.get().wrapping_add(co[2]),
                    bi,
                    0,
                    cp.n.div_ceil(NR),
                );
            }
        });
        // SAFETY: every batch's context rows were written.
        let v = unsafe { out.assume_init() };
        Some(Tensor::new(cp.out_shape, v).map(|t| vec![t]))
    }
}

/// Where a product's `B` comes from.
enum BSource {
    /// Weights packed at build time (one set for all batches).
    Packed,
    /// A (permuted) tensor: per batch, `k` rows at stride `rs`, `n` columns at stride `cs`.
    Strided { rs: usize, cs: usize },
}

/// Packed `B` panels for a product: the weights themselves, or a per-batch packed copy.
enum Panels<'a> {
    Weights(&'a [f32]),
    PerBatch(Vec<f32>, usize),
}

impl Panels<'_> {
    fn panels(&self, batch: usize) -> *const f32 {
        match self {
            Panels::Weights(w) => w.as_ptr(),
            Panels::PerBatch(v, len) => v.as_ptr().wrapping_add(batch * len),
        }
    }
}

/// A `FusedMatMul` on concrete shapes: sizes, strides and per-batch offsets, all derived from
/// the operands' shapes (and checked against them) before any kernel runs.
struct Product<'t> {
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldc: usize,
    batch: Vec<usize>,
    /// Per output batch: offsets of A, B and C.
    offsets: Vec<[usize; 3]>,
    b: BSource,
    out_shape: Vec<usize>,
    total: usize,
    /// Extra epilogue inputs: data, per-batch offsets, row stride.
    extras: Vec<(&'t [f32], Vec<usize>, usize)>,
    spec: GemmSpec,
    /// A and B hold `i16` pairs (`kernels::int16`, `k` counted in pairs): the pair kernel runs,
    /// over the whole of `k` at once (its `i32` sums are exact, f32 partial sums would not be).
    pairs: bool,
}

impl<'t> Product<'t> {
    /// `None` when the fast path does not apply (the reference runs), `Some(Err)` when the
    /// operands are invalid.
    fn prepare(f: &FusedMatMul, a_shape: &[usize], b: &Tensor, extras: &[&'t Tensor]) -> Option<Result<Product<'t>>> {
        let b_dtype = if f.int8.is_some() { crate::DType::I8 } else { crate::DType::F32 };
        if b.dtype() != b_dtype || a_shape.len() < 2 {
            return None;
        }
        let (ashape, astr) = view(a_shape, &f.a_perm);
        let r = ashape.len();
        let (m, k) = (ashape[r - 2], ashape[r - 1]);
        if astr[r - 1] != 1 || k == 0 {
            return None; // The micro-kernels read rows of A contiguously.
        }
        let lda = astr[r - 2];
        let (bbatch, bbstr, n, bk, bsrc) = match f.packed {
            Some([pk, pn]) => {
                if b.len() != f.packed_len(pk, pn) {
                    return Some(Err(Error::op("FusedMatMul", "packed weights have the wrong size")));
                }
                (vec![], vec![], pn, pk, BSource::Packed)
            }
            None => {
                if b.rank() < 2 {
                    return None;
                }
                let (bshape, bstr) = view(b.shape(), &f.b_perm);
                let rb = bshape.len();
                let src = BSource::Strided { rs: bstr[rb - 2], cs: bstr[rb - 1] };
                (bshape[..rb - 2].to_vec(), bstr[..rb - 2].to_vec(), bshape[rb - 1], bshape[rb - 2], src)
            }
        };
        if bk != k {
            return Some(Err(Error::op("FusedMatMul", format!("inner dims differ: {k} and {bk}"))));
        }
        let abatch = &ashape[..r - 2];
        let batch = match broadcast_shapes("FusedMatMul", &[abatch, &bbatch]) {
            Ok(s) => s,
            Err(e) => return Some(Err(e)),
        };
        let mut product = batch.clone();
        product.extend([m, n]);
        let total = match crate::op::check_alloc("FusedMatMul", &product) {
            Ok(t) => t,
            Err(e) => return Some(Err(e)),
        };
        // Output: the product permuted by c_perm, contiguous; the product's logical strides.
        let out_shape = fused::permute(&product, &f.c_perm);
        let ostr = strides_of(&out_shape);
        let mut pstr = vec![0usize; product.len()];
        match &f.c_perm {
            None => pstr.clone_from(&ostr),
            Some(p) => {
                for (pos, &d) in p.iter().enumerate() {
                    pstr[d] = ostr[pos];
                }
            }
        }
        let pr = product.len();
        if pstr[pr - 1] != 1 {
            return None; // The micro-kernels write rows of C contiguously.
        }
        let ldc = pstr[pr - 2];
        let nb = batch.len();
        let a_bstr = broadcast_strides_of(abatch, &astr[..r - 2], &batch);
        let b_bstr = broadcast_strides_of(&bbatch, &bbstr, &batch);
        let mut offsets = Vec::new();
        crate::op::for_each_broadcast(&batch, [&a_bstr, &b_bstr, &pstr[..nb]], |o| offsets.push(o));
        let mut ex = Vec::with_capacity(extras.len());
        let mut col_broadcast = Vec::with_capacity(extras.len());
        for e in extras {
            if e.dtype() != crate::DType::F32
                || broadcast_shapes("FusedMatMul", &[&product, e.shape()]).ok()? != product
            {
                return None;
            }
            let st = broadcast_strides(e.shape(), &product);
            let cb = self::col_broadcast(&product, e);
            if !cb && st[pr - 1] != 1 {
                return None;
            }
            let mut boff = Vec::with_capacity(offsets.len());
            crate::op::for_each_broadcast(&batch, [&st[..nb]], |[o]| boff.push(o));
            ex.push((e.as_slice::<f32>().ok()?, boff, st[pr - 2]));
            col_broadcast.push(cb);
        }
        let spec = GemmSpec { epilogue: f.epilogue.clone(), col_broadcast };
        Some(Ok(Product {
            m,
            n,
            k,
            lda,
            ldc,
            batch,
            offsets,
            b: bsrc,
            out_shape,
            total,
            extras: ex,
            spec,
            pairs: false,
        }))
    }

    fn panel_len(&self) -> usize {
        self.k * NR * self.n.div_ceil(NR)
    }

    /// Packs batch `bi`'s B into `dst` (`panel_len` floats).
    ///
    /// # Safety
    /// `bsl` must be the B tensor `prepare` saw and `dst` must hold `panel_len` floats.
    unsafe fn pack_one(&self, fast: &Fast, bsl: &[f32], bi: usize, dst: *mut f32) {
        if let BSource::Strided { rs, cs } = self.b {
            // SAFETY: the view (offset, k rows at stride rs, n columns at stride cs) lies in
            // `bsl` by construction in `prepare`.
            unsafe { (fast.jit.pack)(bsl.as_ptr().add(self.offsets[bi][1]), self.k, self.n, rs, cs, dst) };
        }
    }

    /// B's panels for every batch (packing activations in parallel).
    fn pack_all<'b>(&self, fast: &Fast, bsl: &'b [f32]) -> Panels<'b> {
        match self.b {
            BSource::Packed => Panels::Weights(bsl),
            BSource::Strided { .. } => {
                let len = self.panel_len();
                let mut store = Uninit::new(len * self.offsets.len());
                let dst = SendPtr(store.ptr());
                pool::global().run(self.offsets.len(), &|bi| {
                    // SAFETY: each batch packs into its own `len` floats of the store.
                    unsafe { self.pack_one(fast, bsl, bi, dst.get().add(bi * len)) };
                });
                // SAFETY: the pack function writes every element of every panel.
                Panels::PerBatch(unsafe { store.assume_init() }, len)
            }
        }
    }

    /// The driver's arguments for `k` rows of the inner dimension (of this product's panels,
    /// `self.k * NR` floats apart) on panels `p0..p1`, without an epilogue.
    #[allow(clippy::too_many_arguments)]
    fn args(
        &self,
        fast: &Fast,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        k: usize,
        p0: usize,
        p1: usize,
    ) -> GemmArgs {
        GemmArgs {
            m: self.m,
            n: self.n,
            k,
            a,
            lda,
            b,
            c,
            ldc,
            panel_begin: p0,
            panel_end: p1,
            kernel: if self.pairs { fast.jit.pair_kernel } else { fast.jit.micro_kernel } as usize,
            mr: if self.pairs { fast.jit.pair_mr } else { fast.jit.tier.mr() },
            kc: if self.pairs { k.max(1) } else { KC },
            operands: std::ptr::null(),
            epilogue_fn: 0,
            epilogue_ctx: std::ptr::null(),
            k_outer: usize::from(!self.pairs && crate::jit::gemm::k_outer_pays(self.m, k, KC)),
            panel_stride: self.k * NR,
        }
    }

    /// Calls `f` with batch `bi`'s epilogue context: the program, this batch's extra operands
    /// and, when the program is a chain, the chain.
    fn with_epilogue<R>(&self, fast: &Fast, bi: usize, f: impl FnOnce(&EpiContext) -> R) -> R {
        self.with_program(fast, bi, &self.spec.epilogue, f)
    }

    /// [`Product::with_epilogue`] running `program` (over the same extra operands).
    fn with_program<R>(&self, fast: &Fast, bi: usize, program: &Epilogue, f: impl FnOnce(&EpiContext) -> R) -> R {
        self.with_program_at(fast, bi, program, 0, f)
    }

    /// [`Product::with_program`] for a tile whose first row is row `r0` of the batch.
    fn with_program_at<R>(
        &self,
        fast: &Fast,
        bi: usize,
        program: &Epilogue,
        r0: usize,
        f: impl FnOnce(&EpiContext) -> R,
    ) -> R {
        let operands: Vec<EpiOperand> = self
            .extras
            .iter()
            .map(|(s, boff, rs)| EpiOperand { ptr: s.as_ptr().wrapping_add(boff[bi] + r0 * rs), row_stride: *rs })
            .collect();
        let prog = &program.0;
        let col_broadcast: Vec<u8> = self.spec.col_broadcast.iter().map(|&b| u8::from(b)).collect();
        let ctx = EpiContext {
            program: prog.as_ptr(),
            len: prog.len(),
            operands: operands.as_ptr(),
            col_broadcast: col_broadcast.as_ptr(),
            #[cfg(target_arch = "x86_64")]
            chain: fast.chain(program).map_or(std::ptr::null(), |c| c as *const _),
        };
        f(&ctx)
    }

    /// Runs the driver on panels `p0..p1` of batch `bi`.
    ///
    /// # Safety
    /// `a` (m rows at stride lda, k contiguous floats), `b` (the batch's panels) and `c` (m
    /// rows at stride ldc, the panels' columns) must be valid for this product.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run(
        &self,
        fast: &Fast,
        driver: crate::jit::GemmFn,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        bi: usize,
        p0: usize,
        p1: usize,
    ) {
        // SAFETY: the caller's contract, for all rows.
        unsafe { self.run_at(fast, driver, a, lda, b, c, bi, p0..p1, 0..self.m) }
    }

    /// [`Product::run`] on `rows` (of the `m`) of panels `cols` only.
    ///
    /// # Safety
    /// As [`Product::run`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_at(
        &self,
        fast: &Fast,
        driver: crate::jit::GemmFn,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        bi: usize,
        Range { start: p0, end: p1 }: Range<usize>,
        rows: Range<usize>,
    ) {
        let (a, c) = (a.wrapping_add(rows.start * lda), c.wrapping_add(rows.start * self.ldc));
        self.with_program_at(fast, bi, &self.spec.epilogue, rows.start, |ctx| {
            #[cfg(target_arch = "x86_64")]
            let (epilogue_fn, epilogue_ctx) = match fast.jit.tile_epilogue {
                Some(f) if ctx.len <= crate::kernels::avx512_vec::MAX_PROGRAM => {
                    (f as usize, ctx as *const _ as *const u8)
                }
                _ => (0, std::ptr::null()),
            };
            #[cfg(not(target_arch = "x86_64"))]
            let (epilogue_fn, epilogue_ctx) = (0usize, std::ptr::null());
            let args = GemmArgs {
                operands: ctx.operands,
                epilogue_fn,
                epilogue_ctx,
                m: rows.len(),
                ..self.args(fast, a, lda, b, c, self.ldc, self.k, p0, p1)
            };
            // SAFETY: forwarded from the caller; the operands, the program and the context outlive
            // the call.
            unsafe { driver(&args) };
        })
    }
}

impl Product<'_> {
    /// Whether [`Product::run_sparse`] can run this product's epilogue: none, or one the
    /// native tile epilogue takes.
    fn sparse_epilogue(&self, fast: &Fast) -> bool {
        #[cfg(target_arch = "x86_64")]
        let native =
            fast.jit.tile_epilogue.is_some() && self.spec.epilogue.0.len() <= crate::kernels::avx512_vec::MAX_PROGRAM;
        #[cfg(not(target_arch = "x86_64"))]
        let native = false;
        self.spec.epilogue.is_identity() || native
    }

    /// [`Product::run_at`] for weights whose panels have all-zero rows: per panel, the
    /// micro-kernel over its live runs of rows only (in blocks of at most `KC` rows, each
    /// added to the last), the tile zeroed where a panel has none; then the epilogue.
    ///
    /// # Safety
    /// As [`Product::run_at`]; `runs` are the runs of this product's weights (`b`), and
    /// [`Product::sparse_epilogue`] holds.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_sparse(
        &self,
        fast: &Fast,
        runs: &crate::kernels::PanelRuns,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        bi: usize,
        cols: Range<usize>,
        rows: Range<usize>,
    ) {
        let (a, c) = (a.wrapping_add(rows.start * lda), c.wrapping_add(rows.start * self.ldc));
        let (m, ldc, mr) = (rows.len(), self.ldc, fast.jit.tier.mr());
        let kernel = fast.jit.micro_kernel;
        let epilogue = if self.spec.epilogue.is_identity() { None } else { fast.jit.tile_epilogue };
        self.with_program_at(fast, bi, &self.spec.epilogue, rows.start, |ctx| {
            for p in cols {
                let (n0, bp) = (p * NR, b.wrapping_add(p * self.k * NR));
                let nb = NR.min(self.n - n0);
                let mut first = true;
                for &(k0, len) in runs.panel(p) {
                    let (k0, k1) = (k0 as usize, (k0 + len) as usize);
                    for s in (k0..k1).step_by(KC) {
                        let kb = KC.min(k1 - s);
                        for i in (0..m).step_by(mr) {
                            // SAFETY: the caller's: rows i..i+mb of A hold columns s..s+kb,
                            // the panel rows s..s+kb, C the tile's rows and columns.
                            unsafe {
                                kernel(
                                    kb,
                                    a.wrapping_add(i * lda + s),
                                    lda,
                                    bp.wrapping_add(s * NR),
                                    c.wrapping_add(i * ldc + n0),
                                    ldc,
                                    mr.min(m - i),
                                    nb,
                                    u32::from(!first),
                                    std::ptr::null(),
                                    0,
                                )
                            };
                        }
                        first = false;
                    }
                }
                if first {
                    for i in 0..m {
                        // SAFETY: row i of C holds the panel's nb columns (the caller's).
                        unsafe { std::ptr::write_bytes(c.wrapping_add(i * ldc + n0), 0, nb) };
                    }
                }
                if let Some(f) = epilogue {
                    for i in (0..m).step_by(mr) {
                        // SAFETY: the context is this product's for these rows (`r0`), its
                        // program one the native epilogue takes (`sparse_epilogue`).
                        unsafe { f(ctx as *const _, c, ldc, i, mr.min(m - i), n0, nb) };
                    }
                }
            }
        })
    }

    /// Rows `k0..k1` of the inner dimension only, for all panels of batch 0, into `c` (stride
    /// `ldc`), without the epilogue: one part of a product split along `k`.
    ///
    /// # Safety
    /// As [`Product::run`], with `c` holding `m` rows of `n` floats at stride `ldc`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_part(
        &self,
        fast: &Fast,
        plain: crate::jit::GemmFn,
        a: *const f32,
        b: *const f32,
        k0: usize,
        k1: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        let args = self.args(
            fast,
            a.wrapping_add(k0),
            self.lda,
            b.wrapping_add(k0 * NR),
            c,
            ldc,
            k1 - k0,
            0,
            self.n.div_ceil(NR),
        );
        // SAFETY: forwarded from the caller: columns k0..k1 of A's rows and rows k0..k1 of
        // every panel lie within them.
        unsafe { plain(&args) };
    }
}

/// `q - zero` of one row quantized to `u8` as [`fused::ActQuant::quantize`] does:
/// `round_half_even(clamp(x / scale or x * (1 / scale), -zero, 255 - zero))`, NaN giving 0;
/// `out` past the row's length is zeroed. With AVX2 the loop runs eight lanes at a time (the
/// same operations, so the same values).
fn centered_row(x: &[f32], out: &mut [i16], s: f32, z: u8, divide: bool) {
    #[inline(always)]
    fn body(x: &[f32], out: &mut [i16], s: f32, z: u8, divide: bool) {
        let (inv, lo, hi) = (1.0 / s, -(z as f32), 255.0 - z as f32);
        let (head, pad) = out.split_at_mut(x.len().min(out.len()));
        for (o, &v) in head.iter_mut().zip(x) {
            let t = if divide { v / s } else { v * inv };
            let t = if t.is_nan() { 0.0 } else { t.clamp(lo, hi) };
            *o = t.round_ties_even() as i16;
        }
        pad.fill(0);
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn avx2(x: &[f32], out: &mut [i16], s: f32, z: u8, divide: bool) {
        body(x, out, s, z, divide)
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { avx2(x, out, s, z, divide) };
    }
    body(x, out, s, z, divide)
}

/// An epilogue that starts by scaling the product by an extra input, `[Acc, Input(j),
/// Mul(0, 1), ...]`, split into `j` and the rest of the program reading the scaled product as
/// its `Acc` (`None` when the rest reads the unscaled product or the scales themselves).
fn scale_prefix(e: &Epilogue) -> Option<(usize, Epilogue)> {
    let prog = &e.0;
    let (EpiOp::Acc, EpiOp::Input(j), EpiOp::Binary(BinaryKind::Mul, a, b)) =
        (prog.first()?, prog.get(1)?, prog.get(2)?)
    else {
        return None;
    };
    if !matches!((*a, *b), (0, 1) | (1, 0)) {
        return None;
    }
    let at = |i: usize| match i {
        2 => Some(0),
        0 | 1 => None,
        i => Some(i - 2),
    };
    let mut rest = vec![EpiOp::Acc];
    for op in &prog[3..] {
        rest.push(match *op {
            EpiOp::Acc => return None,
            EpiOp::Unary(k, a) => EpiOp::Unary(k, at(a)?),
            EpiOp::Binary(k, a, b) => EpiOp::Binary(k, at(a)?, at(b)?),
            EpiOp::FakeQuant(a, q) => EpiOp::FakeQuant(at(a)?, q),
            ref other => other.clone(),
        });
    }
    Some((*j, Epilogue(rest)))
}

/// The `u8` activations of an integer product with their per-row parameters: rows of `ldq`
/// bytes (`k` padded to groups of four with zeros).
#[cfg(target_arch = "x86_64")]
#[derive(Default)]
struct QuantizedA {
    q: Vec<u8>,
    scale: Vec<f32>,
    zero: Vec<i32>,
}

/// Scale and zero point of all of `A` (per-tensor quantization).
#[cfg(target_arch = "x86_64")]
fn tensor_range(xs: &[f32], p: &Product) -> (f32, u8) {
    let m = p.m.max(1);
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for r in 0..p.offsets.len() * p.m {
        // SAFETY: the caller runs the AVX-512 tier; row r of A holds k floats (`prepare`).
        let (l, h) =
            unsafe { crate::kernels::avx512_vec::min_max(xs.as_ptr().add(p.offsets[r / m][0] + (r % m) * p.lda), p.k) };
        (lo, hi) = (lo.min(l), hi.max(h));
    }
    crate::op::quant::dynamic_qparams(lo, hi)
}

/// Quantizes rows `r0..r1` of `A` of product `p` (batch by batch, `m` rows at stride `lda`)
/// into rows of `ldq` bytes (the padding zeroed) and their parameters, with AVX-512, bit-exact
/// with [`fused::ActQuant::quantize`]: per row, or with `whole`'s parameters (`divide`: by
/// the scale, as static quantization does, not by its reciprocal).
///
/// # Safety
/// AVX-512F; `A` holds the product's rows (`prepare`); `q` holds rows `r0..r1` of
/// `k_groups(k) * 4` bytes, `scale` and `zero` those rows' values.
#[cfg(target_arch = "x86_64")]
unsafe fn quantize_rows(
    xs: &[f32],
    p: &Product,
    (whole, divide): (Option<(f32, u8)>, bool),
    (r0, r1): (usize, usize),
    (q, scale, zero): (*mut u8, *mut f32, *mut i32),
) {
    use crate::kernels::avx512_vec as v;
    let (m, k) = (p.m.max(1), p.k);
    let ldq = crate::kernels::int8::k_groups(k) * 4;
    for r in r0..r1 {
        // SAFETY: the caller's contract.
        unsafe {
            let x = xs.as_ptr().add(p.offsets[r / m][0] + (r % m) * p.lda);
            let (s, z) = whole.unwrap_or_else(|| {
                let (l, h) = v::min_max(x, k);
                crate::op::quant::dynamic_qparams(l, h)
            });
            let row = q.add(r * ldq);
            if divide {
                v::quantize_u8(x, row, k, s, z);
            } else {
                v::quantize_u8_by(x, row, k, 1.0 / s, z);
            }
            std::ptr::write_bytes(row.add(k), 0, ldq - k);
            *scale.add(r) = s;
            *zero.add(r) = z as i32;
        }
    }
}

/// Strides of a batch view broadcast to `batch` (0 along broadcast dims).
fn broadcast_strides_of(shape: &[usize], strides: &[usize], batch: &[usize]) -> Vec<usize> {
    let pad = batch.len() - shape.len();
    let mut out = vec![0usize; batch.len()];
    for i in 0..shape.len() {
        out[pad + i] = if shape[i] == 1 && batch[pad + i] != 1 { 0 } else { strides[i] };
    }
    out
}

/// Rows per parallel task so that each task has at least ~16k elements.
/// How `units` units of work of `rows` rows each (heads; or panels of one product) split into
/// `threads` fixed shares: each thread takes `units / threads` whole units and one part by
/// rows (whole multiples of `align` rows but the last) of each unit left over, so that no
/// thread has a unit more than another (9 heads on 2 threads: 4.5 each, not 5 and 4; a head
/// pruning leaves such counts). Too few rows to split: contiguous blocks of whole units.
#[derive(Clone, Copy, Debug)]
struct Shares {
    units: usize,
    rows: usize,
    threads: usize,
    align: usize,
}

impl Shares {
    fn new(units: usize, rows: usize, threads: usize, align: usize) -> Shares {
        Shares { units, rows, threads: threads.max(1), align: align.max(1) }
    }

    /// Thread `t`'s whole units, the units it has a part of, and that part's rows.
    fn of(&self, t: usize) -> (Range<usize>, Range<usize>, Range<usize>) {
        let (n, whole, left) = (self.threads, self.units / self.threads, self.units % self.threads);
        if left == 0 || self.rows < 2 * self.align * n {
            let r = t * self.units / n..(t + 1) * self.units / n;
            return (r, 0..0, 0..0);
        }
        let bound = |t: usize| if t >= n { self.rows } else { self.rows * t / n / self.align * self.align };
        (t * whole..(t + 1) * whole, n * whole..self.units, bound(t)..bound(t + 1))
    }
}

fn rows_per_task(rows: usize, len: usize) -> usize {
    let min_rows = (16 * 1024 / len.max(1)).max(1);
    let threads = pool::global().threads();
    rows.div_ceil(threads * 4).max(min_rows).min(rows.max(1))
}

/// f32 `Add`/`Sub`/`Mul`/`Div` where one operand has the output's shape and the other repeats
/// along the leading dims (same shape, a bias, a position table): a flat loop instead of the
/// reference's general broadcasting.
fn binary_f32(kind: BinaryKind, inputs: &[Option<&Tensor>]) -> Option<Result<Vec<Tensor>>> {
    let (a, b) = (inputs.first().copied().flatten()?, inputs.get(1).copied().flatten()?);
    if a.dtype() != crate::DType::F32 || b.dtype() != crate::DType::F32 {
        return None;
    }
    if !matches!(kind, BinaryKind::Add | BinaryKind::Sub | BinaryKind::Mul | BinaryKind::Div) {
        return None;
    }
    let out = broadcast_shapes("Binary", &[a.shape(), b.shape()]).ok()?;
    // Whether `small` repeats along the leading dims of `out`: its shape, without leading 1s,
    // is a suffix of `out`.
    let repeats = |small: &[usize]| {
        let s: Vec<usize> = small.iter().copied().skip_while(|&d| d == 1).collect();
        s.len() <= out.len() && out[out.len() - s.len()..] == s[..]
    };
    let (xs, ys) = (a.as_slice::<f32>().ok()?, b.as_slice::<f32>().ok()?);
    // `x op y` elementwise, `y` repeating along `x` (or `x` along `y` when `swap`).
    fn zip(xs: &[f32], ys: &[f32], swap: bool, f: impl Fn(f32, f32) -> f32) -> Vec<f32> {
        let mut v = Vec::with_capacity(xs.len());
        for c in xs.chunks(ys.len()) {
            if swap {
                v.extend(c.iter().zip(ys).map(|(&y, &x)| f(x, y)));
            } else {
                v.extend(c.iter().zip(ys).map(|(&x, &y)| f(x, y)));
            }
        }
        v
    }
    // Whether `small` holds one value per row of `out` (its shape with the last dim 1:
    // quantized embeddings' row scales).
    let per_row = |small: &[usize]| {
        let r = out.len();
        r >= 1 && small.len() == r && small[r - 1] == 1 && small[..r - 1] == out[..r - 1] && out.iter().all(|&d| d > 0)
    };
    // `x op y` with `y` one value per row of `x` (or `x` of `y` when `swap`).
    fn rows(xs: &[f32], ys: &[f32], swap: bool, f: impl Fn(f32, f32) -> f32) -> Vec<f32> {
        let mut v = Vec::with_capacity(xs.len());
        for (c, &y) in xs.chunks(xs.len() / ys.len()).zip(ys) {
            if swap {
                v.extend(c.iter().map(|&x| f(y, x)));
            } else {
                v.extend(c.iter().map(|&x| f(x, y)));
            }
        }
        v
    }
    let by_row = |big: &[f32], small: &[f32], swap: bool| match kind {
        BinaryKind::Add => rows(big, small, swap, |x, y| x + y),
        BinaryKind::Sub => rows(big, small, swap, |x, y| x - y),
        BinaryKind::Mul => rows(big, small, swap, |x, y| x * y),
        _ => rows(big, small, swap, |x, y| x / y),
    };
    if a.shape() == out.as_slice() && per_row(b.shape()) {
        return Some(Tensor::new(out, by_row(xs, ys, false)).map(|t| vec![t]));
    }
    if b.shape() == out.as_slice() && per_row(a.shape()) {
        return Some(Tensor::new(out, by_row(ys, xs, true)).map(|t| vec![t]));
    }
    let (big, small, swap) = if a.shape() == out.as_slice() && repeats(b.shape()) && !ys.is_empty() {
        (xs, ys, false)
    } else if b.shape() == out.as_slice() && repeats(a.shape()) && !xs.is_empty() {
        (ys, xs, true)
    } else {
        return None;
    };
    let v = match kind {
        BinaryKind::Add => zip(big, small, swap, |x, y| x + y),
        BinaryKind::Sub => zip(big, small, swap, |x, y| x - y),
        BinaryKind::Mul => zip(big, small, swap, |x, y| x * y),
        _ => zip(big, small, swap, |x, y| x / y),
    };
    Some(Tensor::new(out, v).map(|t| vec![t]))
}

/// Per-tensor `DequantizeLinear` of `u8` or `s8` data (quantized embeddings after their
/// lookup): `(q - zero_point) as f32 * scale`, as the reference computes it.
fn dequantize(inputs: &[Option<&Tensor>]) -> Option<Result<Vec<Tensor>>> {
    let (x, s) = (inputs.first().copied().flatten()?, inputs.get(1).copied().flatten()?);
    let z = inputs.get(2).copied().flatten();
    let scale = *s.as_slice::<f32>().ok().filter(|v| v.len() == 1)?.first()?;
    if z.is_some_and(|z| z.len() != 1 || z.dtype() != x.dtype()) {
        return None;
    }
    let zp = match z {
        Some(z) => z.to_i64s().ok()?[0],
        None => 0,
    };
    let v: Vec<f32> = match x.dtype() {
        crate::DType::U8 => x.as_slice::<u8>().ok()?.iter().map(|&q| (q as i64 - zp) as f32 * scale).collect(),
        crate::DType::I8 => x.as_slice::<i8>().ok()?.iter().map(|&q| (q as i64 - zp) as f32 * scale).collect(),
        _ => return None,
    };
    Some(Tensor::new(x.shape().to_vec(), v).map(|t| vec![t]))
}

/// f32 or s8 (quantized embeddings) `Gather` on axis 0 with in-range indices (an embedding
/// lookup) as row copies. Anything else, bad indices included, goes to the reference, which
/// reports them.
fn gather_rows(g: &Gather, inputs: &[Option<&Tensor>]) -> Option<Result<Vec<Tensor>>> {
    match inputs.first().copied().flatten()?.dtype() {
        crate::DType::F32 => gather_rows_of::<f32>(g, inputs),
        crate::DType::I8 => gather_rows_of::<i8>(g, inputs),
        crate::DType::U8 => gather_rows_of::<u8>(g, inputs),
        _ => None,
    }
}

fn gather_rows_of<T: crate::tensor::Element>(g: &Gather, inputs: &[Option<&Tensor>]) -> Option<Result<Vec<Tensor>>> {
    let (x, i) = (inputs.first().copied().flatten()?, inputs.get(1).copied().flatten()?);
    if !matches!(i.dtype(), crate::DType::I64 | crate::DType::I32) {
        return None;
    }
    if x.rank() == 0 || !(g.axis == 0 || g.axis == -(x.rank() as i64)) {
        return None;
    }
    let rows = x.shape()[0];
    let inner: usize = x.shape()[1..].iter().product();
    let idx = i.to_i64s().ok()?;
    let xs = x.as_slice::<T>().ok()?;
    // Oversized outputs too: the reference refuses them with an error.
    if idx.len().checked_mul(inner).is_none_or(|n| n > crate::op::MAX_ELEMENTS) {
        return None;
    }
    let mut v = Vec::with_capacity(idx.len() * inner);
    for &k in &idx {
        let k = crate::op::resolve_index("Gather", k, rows).ok()?;
        v.extend_from_slice(&xs[k * inner..(k + 1) * inner]);
    }
    let shape: Vec<usize> = i.shape().iter().chain(&x.shape()[1..]).copied().collect();
    Some(Tensor::new(shape, v).map(|t| vec![t]))
}

/// `Transpose` as strided copies of contiguous runs.
fn transpose(t: &Transpose, inputs: &[Option<&Tensor>]) -> Option<Result<Vec<Tensor>>> {
    let x = inputs.first().copied().flatten()?;
    if x.dtype() != crate::DType::F32 {
        return None;
    }
    let perm = t.perm(x.rank()).ok()?;
    let (shape, st) = view(x.shape(), &Some(perm));
    let xs = x.as_slice::<f32>().ok()?;
    let mut out = vec![0f32; x.len()];
    let r = shape.len();
    if r == 0 {
        return Some(Ok(vec![x.clone()]));
    }
    let inner = shape[r - 1];
    let inner_stride = st[r - 1];
    let outer = &shape[..r - 1];
    let mut bases = Vec::with_capacity(x.len() / inner.max(1));
    crate::op::for_each_broadcast(outer, [&st[..r - 1]], |[o]| bases.push(o));
    let chunk = rows_per_task(bases.len(), inner);
    let dst = SendPtr(out.as_mut_ptr());
    pool::global().run(bases.len().div_ceil(chunk), &|t| {
        for (r, &b) in bases.iter().enumerate().skip(t * chunk).take(chunk) {
            // SAFETY: row r of the output holds `inner` floats at r * inner; rows are disjoint
            // between tasks; `out` outlives the loop.
            let row = unsafe { std::slice::from_raw_parts_mut(dst.get().add(r * inner), inner) };
            if inner_stride == 1 {
                row.copy_from_slice(&xs[b..b + inner]);
            } else {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = xs[b + j * inner_stride];
                }
            }
        }
    });
    Some(Tensor::new(shape, out).map(|t| vec![t]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::pack_b;
    use crate::op::{BinaryKind, EpiOp, Epilogue, EvalContext, UnaryKind};
    use crate::plan::Step;

    #[test]
    fn shares_cover_every_row_of_every_unit_once() {
        for (units, rows, threads, align) in
            [(9, 128, 2, 12), (12, 128, 2, 12), (1, 64, 2, 16), (7, 128, 3, 16), (5, 20, 2, 12), (3, 128, 4, 12)]
        {
            let shares = Shares::new(units, rows, threads, align);
            let mut seen = vec![0u8; units * rows];
            let mut work = vec![0usize; threads];
            for (t, w) in work.iter_mut().enumerate() {
                let (whole, parts, part_rows) = shares.of(t);
                for u in whole {
                    (0..rows).for_each(|r| seen[u * rows + r] += 1);
                    *w += rows;
                }
                for u in parts {
                    assert!(part_rows.start % align == 0, "{part_rows:?}");
                    part_rows.clone().for_each(|r| seen[u * rows + r] += 1);
                    *w += part_rows.len();
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "{units} units, {rows} rows, {threads} threads");
            // Rows split: no thread has more than a tile of rows per unit left over above another.
            if rows >= 2 * align * threads {
                let (lo, hi) = (work.iter().min().unwrap(), work.iter().max().unwrap());
                assert!(hi - lo <= align * (units % threads), "{units}/{threads}: {work:?}");
            }
        }
    }

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn t(shape: &[usize], seed: u64) -> Tensor {
        Tensor::new(shape.to_vec(), rand(shape.iter().product(), seed)).unwrap()
    }

    fn fast_for(tier: Tier, ops: &[Op]) -> Option<Fast> {
        if !tier.supported() {
            eprintln!("{tier} is not supported here");
            return None;
        }
        let plan = Plan {
            steps: ops
                .iter()
                .map(|op| Step { op: op.clone(), inputs: vec![], outputs: vec![], name: String::new() })
                .collect(),
            ..Default::default()
        };
        Some(Fast::new(&plan, tier).unwrap())
    }

    fn assert_close(tag: &str, got: &Tensor, want: &Tensor, tol: f32) {
        assert_eq!(got.shape(), want.shape(), "{tag}");
        let (g, w) = (got.as_slice::<f32>().unwrap(), want.as_slice::<f32>().unwrap());
        let scale = w.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            assert!((a - b).abs() <= tol * scale, "{tag}: element {i}: {a} vs {b} (scale {scale})");
        }
    }

    /// A product by weights packed in panels (`k x n`), in no other layout.
    pub(super) fn packed_product(
        k: usize,
        n: usize,
        epilogue: Epilogue,
        extra: usize,
        int8: Option<fused::ActQuant>,
    ) -> FusedMatMul {
        FusedMatMul {
            a_perm: None,
            b_perm: None,
            packed: Some([k, n]),
            c_perm: None,
            epilogue,
            extra,
            fused: vec![],
            int8,
            weights: None,
        }
    }

    /// A plan of the one product `op` reading slots 0 (A) and 1 (the weights), which
    /// `Fast::prepare_int8` and `Fast::prepare_sparse` look through.
    fn product_plan(op: &Op) -> Plan {
        Plan {
            steps: vec![Step { op: op.clone(), inputs: vec![Some(0), Some(1)], outputs: vec![2], name: "p".into() }],
            ..Default::default()
        }
    }

    /// GELU (erf form) of the value at `x`, as instructions from index `at` on.
    fn gelu_tail(x: usize, at: usize) -> [EpiOp; 8] {
        [
            EpiOp::Const(std::f32::consts::SQRT_2),
            EpiOp::Binary(BinaryKind::Div, x, at),
            EpiOp::Unary(UnaryKind::Erf, at + 1),
            EpiOp::Const(1.0),
            EpiOp::Binary(BinaryKind::Add, at + 2, at + 3),
            EpiOp::Binary(BinaryKind::Mul, x, at + 4),
            EpiOp::Const(0.5),
            EpiOp::Binary(BinaryKind::Mul, at + 5, at + 6),
        ]
    }

    /// `gelu(acc + bias + residual)`: a chain the AVX-512 stores run as `avx512_vec::Adds`.
    fn residual_gelu() -> Epilogue {
        let add = |a, b| EpiOp::Binary(BinaryKind::Add, a, b);
        Epilogue(
            [EpiOp::Acc, EpiOp::Input(0), add(0, 1), EpiOp::Input(1), add(3, 2)]
                .into_iter()
                .chain(gelu_tail(4, 5))
                .collect(),
        )
    }

    fn gelu_bias_residual() -> Epilogue {
        // ((acc + bias) * 0.5 * (1 + erf((acc + bias) / sqrt2))) + residual
        let head = [EpiOp::Acc, EpiOp::Input(0), EpiOp::Binary(BinaryKind::Add, 0, 1)];
        let tail = [EpiOp::Input(1), EpiOp::Binary(BinaryKind::Add, 10, 11)];
        Epilogue(head.into_iter().chain(gelu_tail(2, 3)).chain(tail).collect())
    }

    #[test]
    fn linear_with_fused_epilogue_on_every_tier_and_odd_shapes() {
        // The general executor's epilogue, and a chain (`avx512_vec::Adds` on AVX-512).
        for epi in [gelu_bias_residual(), residual_gelu()] {
            let proto: Op = FusedMatMul {
                a_perm: None,
                b_perm: None,
                packed: Some([1, 1]),
                c_perm: None,
                epilogue: epi.clone(),
                extra: 2,
                fused: vec![],
                int8: None,
                weights: None,
            }
            .into();
            for tier in Tier::ALL {
                let Some(fast) = fast_for(tier, std::slice::from_ref(&proto)) else { continue };
                // The last one is large enough for the driver to walk block rows outermost.
                let shapes = [
                    (1, 1, 1),
                    (5, 7, 3),
                    (13, 64, 33),
                    (128, 300, 100),
                    (3, 1, 65),
                    (26, 768, 32),
                    (97, 2900, 300),
                    (128, 96, 288),
                    (64, 96, 20),
                ];
                assert!(crate::jit::gemm::k_outer_pays(97, 2900, KC) && !crate::jit::gemm::k_outer_pays(128, 300, KC));
                // With AVX-512 and two threads or more, it is also split along k.
                #[cfg(target_arch = "x86_64")]
                assert_eq!(
                    fast.split_k_for(97, 2900, 300, 1, &epi, pool::global().threads()).is_some(),
                    tier == Tier::Avx512 && pool::global().threads() >= 2
                );
                for &(m, k, n) in &shapes {
                    let op: Op = packed_product(k, n, epi.clone(), 2, None).into();
                    let a = t(&[m, k], 1);
                    let w = rand(k * n, 2);
                    let packed = pack_b(k, n, &w);
                    let b = Tensor::new(vec![packed.len()], packed).unwrap();
                    let bias = t(&[n], 3);
                    let res = t(&[m, n], 4);
                    let ins = [Some(&a), Some(&b), Some(&bias), Some(&res)];
                    let want = op.eval(&EvalContext::default(), &ins).unwrap().remove(0);
                    let got = fast.eval(&op, &ins).expect("handled").unwrap().remove(0);
                    assert_close(&format!("{tier} {m}x{k}x{n}"), &got, &want, 2e-5);
                }
            }
        }
    }

    /// The two products of attention on `[batch, seq, heads, dim]` Q/K/V as the recognizer
    /// builds them: scores `Q Kᵀ * 0.125 + mask`, context `P V` back in `[batch, seq, heads, dim]`.
    pub(super) fn attention_products() -> Attention {
        let epi = Epilogue(vec![
            EpiOp::Acc,
            EpiOp::Const(0.125),
            EpiOp::Binary(BinaryKind::Mul, 0, 1),
            EpiOp::Input(0),
            EpiOp::Binary(BinaryKind::Add, 2, 3),
        ]);
        Attention {
            scores: FusedMatMul {
                a_perm: Some(vec![0, 2, 1, 3]),
                b_perm: Some(vec![0, 2, 3, 1]),
                packed: None,
                c_perm: None,
                epilogue: epi,
                extra: 1,
                fused: vec![],
                int8: None,
                weights: None,
            },
            context: FusedMatMul {
                a_perm: None,
                b_perm: Some(vec![0, 2, 1, 3]),
                packed: None,
                c_perm: Some(vec![0, 2, 1, 3]),
                epilogue: Epilogue::default(),
                extra: 0,
                fused: vec![],
                int8: None,
                weights: None,
            },
            nan_to_zero: false,
            probs_quant: None,
            bf16: false,
        }
    }

    #[test]
    fn attention_products_with_folded_transposes() {
        let (b, s, h, d) = (2, 37, 3, 40);
        let Attention { scores, context, .. } = attention_products();
        let (scores, context): (Op, Op) = (scores.into(), context.into());
        for tier in Tier::ALL {
            let Some(fast) = fast_for(tier, &[scores.clone(), context.clone()]) else { continue };
            let (q, kk, v) = (t(&[b, s, h, d], 5), t(&[b, s, h, d], 6), t(&[b, s, h, d], 7));
            let mask = t(&[b, 1, 1, s], 8);
            let ins = [Some(&q), Some(&kk), Some(&mask)];
            let want = scores.eval(&EvalContext::default(), &ins).unwrap().remove(0);
            let got = fast.eval(&scores, &ins).expect("handled").unwrap().remove(0);
            assert_close(&format!("{tier} scores"), &got, &want, 1e-5);
            let probs = t(&[b, h, s, s], 9);
            let ins = [Some(&probs), Some(&v)];
            let want = context.eval(&EvalContext::default(), &ins).unwrap().remove(0);
            let got = fast.eval(&context, &ins).expect("handled").unwrap().remove(0);
            assert_eq!(got.shape(), &[b, s, h, d]);
            assert_close(&format!("{tier} context"), &got, &want, 1e-5);
        }
    }

    /// `MatMulInteger` by constant `s8` weights on the VNNI kernel: the reference's exact `i32`
    /// on full-range data, odd shapes (k not a multiple of four), batch dims, with and without
    /// the activations' zero point.
    #[test]
    fn matmul_integer_on_prepared_weights_is_exact() {
        if !crate::kernels::int8::vnni512_supported() {
            eprintln!("no AVX-512 VNNI here: path not run");
            return;
        }
        let op: Op = crate::op::MatMulInteger {}.into();
        for &(batch, m, k, n, za) in
            &[(1, 1, 1, 1, 0u8), (2, 5, 7, 33, 128), (1, 37, 384, 100, 3), (3, 12, 65, 64, 255)]
        {
            let wv: Vec<i8> = (0..k * n).map(|i| ((i * 7919 + 13) % 256) as u8 as i8).collect();
            let w = Tensor::new(vec![k, n], wv).unwrap();
            let av: Vec<u8> = (0..batch * m * k).map(|i| ((i * 104729 + 7) % 256) as u8).collect();
            let a = Tensor::new(vec![batch, m, k], av).unwrap();
            let zpa = Tensor::new(vec![], vec![za]).unwrap();
            let zpb = Tensor::new(vec![], vec![0i8]).unwrap();
            let plan = Plan {
                steps: vec![crate::plan::Step {
                    op: op.clone(),
                    inputs: vec![Some(0), Some(1), Some(2), Some(3)],
                    outputs: vec![4],
                    name: String::new(),
                }],
                ..Default::default()
            };
            let mut fast = Fast::new(&plan, Tier::detect()).unwrap();
            fast.prepare_int8(&plan, &[(1, w.clone())]);
            for ins in [vec![Some(&a), Some(&w), Some(&zpa), Some(&zpb)], vec![Some(&a), Some(&w)]] {
                let want = op.eval(&EvalContext::default(), &ins).unwrap().remove(0);
                let got = fast.eval(&op, &ins).expect("handled").unwrap().remove(0);
                assert!(got.bit_eq(&want), "{batch}x{m}x{k}x{n} zero point {za}");
            }
        }
    }

    /// Integer products (activations quantized per row, per tensor or statically, `s8`
    /// weights, exact `i32` sums) give the reference's values bit for bit with a bias and the
    /// weights' scales as the epilogue, on odd shapes, batched, with a transposed output, on
    /// every tier: the VNNI kernel, and without it the pair kernels (AVX-VNNI or AVX2 `pmaddwd`,
    /// the generated one on the portable tier); with GELU in the epilogue, to its polynomial's
    /// accuracy.
    #[test]
    fn int8_products_match_the_reference() {
        let scale_bias = Epilogue(vec![
            EpiOp::Acc,
            EpiOp::Input(0),
            EpiOp::Binary(BinaryKind::Mul, 0, 1),
            EpiOp::Input(1),
            EpiOp::Binary(BinaryKind::Add, 2, 3),
        ]);
        let mut gelu = gelu_bias_residual().0;
        gelu.splice(1..1, [EpiOp::Input(2), EpiOp::Binary(BinaryKind::Mul, 0, 1)]);
        // Shift the references of the instructions after the two inserted (Acc stays 0 ->
        // now the scaled product at 2).
        for op in gelu.iter_mut().skip(3) {
            let f = |i: &mut usize| *i = if *i == 0 { 2 } else { *i + 2 };
            match op {
                EpiOp::Unary(_, a) | EpiOp::FakeQuant(a, _) => f(a),
                EpiOp::Binary(_, a, b) => {
                    f(a);
                    f(b)
                }
                _ => {}
            }
        }
        let cases = [
            (vec![1usize, 1], 1usize, 1usize, scale_bias.clone(), 2usize, None),
            (vec![5, 7], 7, 3, scale_bias.clone(), 2, None),
            (vec![2, 37, 100], 100, 65, scale_bias.clone(), 2, None),
            (vec![128, 384], 384, 1536, scale_bias.clone(), 2, None),
            (vec![2, 13, 64], 64, 96, scale_bias.clone(), 2, Some(vec![1, 0, 2])),
            (vec![33, 300], 300, 100, Epilogue(gelu), 3, None),
        ];
        // The epilogues of BERT's products, which the AVX-512 store runs without interpreting
        // the chain (`avx512_vec::Adds`): a bias added either way round, two of them, a bias
        // and GELU, a bias, a residual (varying by row) and GELU.
        let add = |a, b| EpiOp::Binary(BinaryKind::Add, a, b);
        let bias_first = Epilogue(vec![EpiOp::Acc, EpiOp::Input(1), add(1, 0)]);
        let two_biases = Epilogue(vec![EpiOp::Acc, EpiOp::Input(0), add(0, 1), EpiOp::Input(1), add(2, 3)]);
        let bias_gelu = Epilogue([EpiOp::Acc, EpiOp::Input(0), add(0, 1)].into_iter().chain(gelu_tail(2, 3)).collect());
        let cases: Vec<_> = cases
            .into_iter()
            .chain([
                (vec![128, 256], 256, 96, bias_first, 2, None),
                (vec![40, 128], 128, 70, two_biases, 2, None),
                (vec![128, 256], 256, 192, bias_gelu, 3, None),
                (vec![37, 192], 192, 64, residual_gelu(), 3, None),
            ])
            .collect();
        for tier in Tier::ALL {
            for act in [
                fused::ActQuant::DynamicRow,
                fused::ActQuant::DynamicTensor,
                fused::ActQuant::Static { scale: 0.0371, zero_point: 131 },
            ] {
                for (shape, k, n, epi, extra, c_perm) in &cases {
                    let (k, n) = (*k, *n);
                    let op: Op =
                        FusedMatMul { c_perm: c_perm.clone(), ..packed_product(k, n, epi.clone(), *extra, Some(act)) }
                            .into();
                    let Some(mut fast) = fast_for(tier, std::slice::from_ref(&op)) else { continue };
                    // Activations with an outlier column, weights over the full s8 range.
                    let mut av = rand(shape.iter().product(), 1);
                    for (i, x) in av.iter_mut().enumerate() {
                        if i % k == 3 % k {
                            *x *= 40.0;
                        }
                    }
                    let a = Tensor::new(shape.clone(), av).unwrap();
                    let w: Vec<i8> = (0..k * n).map(|i| (i.wrapping_mul(2654435761) >> 7) as u8 as i8).collect();
                    let packed = crate::kernels::int8::pack_b_s8(k, n, &w);
                    let b = Tensor::new(vec![packed.len()], packed).unwrap();
                    let plan = product_plan(&op);
                    fast.prepare_int8(&plan, &[(1, b.clone())]);
                    let wscale = Tensor::new(vec![n], (0..n).map(|j| 0.001 + j as f32 * 1e-5).collect()).unwrap();
                    let bias = t(&[n], 3);
                    let rows: usize = shape[..shape.len() - 1].iter().product();
                    let res = t(&[rows, n], 4);
                    let mut ins = vec![Some(&a), Some(&b), Some(&wscale), Some(&bias)];
                    if *extra == 3 {
                        ins = vec![Some(&a), Some(&b), Some(&bias), Some(&res), Some(&wscale)];
                    }
                    let want = op.eval(&EvalContext::default(), &ins).unwrap().remove(0);
                    let got = fast.eval(&op, &ins).expect("handled").unwrap().remove(0);
                    let tag = format!("{tier} {act:?} {shape:?} x {k}x{n}");
                    if *extra == 2 {
                        let (g, w) = (got.as_slice::<f32>().unwrap(), want.as_slice::<f32>().unwrap());
                        let bad = g.iter().zip(w).position(|(x, y)| x.to_bits() != y.to_bits());
                        assert!(
                            bad.is_none(),
                            "{tag}: element {bad:?}: {:?} vs {:?}",
                            bad.map(|i| g[i]),
                            bad.map(|i| w[i])
                        );
                    } else {
                        assert_close(&tag, &got, &want, 2e-5);
                    }
                }
            }
        }
    }

    /// Float products by weights with all-zero panel rows run only the live runs: the same
    /// values as the reference (the dense sums, up to rounding), every tier, with and without
    /// an epilogue, whole zero panels, short gaps kept in a run, batches and threads.
    #[test]
    fn sparse_f32_products_match_the_reference() {
        // (A's shape, k, n): n = 100 leaves a part panel, 2 x 37 rows two batches' worth.
        let cases = [(vec![128usize, 256], 256usize, 100usize), (vec![2, 37, 192], 192, 64), (vec![5, 300], 300, 70)];
        for tier in Tier::ALL {
            for (epi, extra) in [(Epilogue(vec![EpiOp::Acc]), 0usize), (gelu_bias_residual(), 2)] {
                for (shape, k, n) in &cases {
                    let (k, n) = (*k, *n);
                    let op: Op = packed_product(k, n, epi.clone(), extra, None).into();
                    let Some(mut fast) = fast_for(tier, std::slice::from_ref(&op)) else { continue };
                    // Panel 0: rows 32..96 zero and every 5th row from 150 (gaps too short to
                    // break a run); panel 1: all zero; panel 2 on: the first half of k zero.
                    let mut w = rand(k * n, 7);
                    for r in 0..k {
                        for j in 0..n {
                            let zero = match j / NR {
                                0 => (32..96).contains(&r) || (r >= 150 && r % 5 == 0),
                                1 => true,
                                _ => r < k / 2,
                            };
                            if zero {
                                w[r * n + j] = 0.0;
                            }
                        }
                    }
                    let packed = crate::kernels::pack_b(k, n, &w);
                    let b = Tensor::new(vec![packed.len()], packed).unwrap();
                    let plan = product_plan(&op);
                    fast.prepare_sparse(&plan, &[(1, b.clone())]);
                    let tag = format!("{tier} {shape:?} x {k}x{n} extra {extra}");
                    assert_eq!(fast.panel_runs.len(), 1, "{tag}: zero rows found");
                    let a = t(shape, 1);
                    let mut out_shape = shape.clone();
                    *out_shape.last_mut().unwrap() = n;
                    let (bias, res) = (t(&[n], 3), t(&out_shape, 4));
                    let mut ins = vec![Some(&a), Some(&b)];
                    if extra == 2 {
                        ins.extend([Some(&bias), Some(&res)]);
                    }
                    let want = op.eval(&EvalContext::default(), &ins).unwrap().remove(0);
                    let got = fast.eval(&op, &ins).expect("handled").unwrap().remove(0);
                    assert_close(&tag, &got, &want, 1e-5);
                }
            }
        }
    }

    /// The build's weight format decides whether a product walks its zero blocks: `Dense`
    /// never, `Blocks` from one zero block on (under the runtime's own threshold too), none
    /// given the runtime's threshold ([`crate::kernels::SKIP_MIN_ZERO`]); the values are the
    /// reference's whatever the walk, f32 and int8, every tier.
    #[test]
    fn weight_formats_decide_the_walk() {
        use crate::op::WeightFormat;
        // One of the 16 blocks of 64 rows by a 32-column panel zero (1/16, under 1/8), or half.
        let (k, n) = (512usize, 64usize);
        let a = t(&[40, k], 1);
        for (tier, blocks) in Tier::ALL.into_iter().flat_map(|t| [(t, 1), (t, 8)]) {
            let zero = |i: usize| i / n < 64 * blocks && i % n < 32;
            let wf: Vec<f32> =
                rand(k * n, 7).into_iter().enumerate().map(|(i, x)| if zero(i) { 0.0 } else { x }).collect();
            let w8: Vec<i8> =
                (0..k * n).map(|i| if zero(i) { 0 } else { (i.wrapping_mul(2654435761) >> 7) as u8 as i8 }).collect();
            for format in [None, Some(WeightFormat::Dense), Some(WeightFormat::Blocks)] {
                for int8 in [None, Some(fused::ActQuant::DynamicRow)] {
                    let base = packed_product(k, n, Epilogue(vec![EpiOp::Acc]), 0, int8);
                    let op: Op = FusedMatMul { weights: format, ..base }.into();
                    let Some(mut fast) = fast_for(tier, std::slice::from_ref(&op)) else { continue };
                    let plan = product_plan(&op);
                    let b = match int8 {
                        None => Tensor::new(vec![k * n], crate::kernels::pack_b(k, n, &wf)).unwrap(),
                        Some(_) => {
                            let packed = crate::kernels::int8::pack_b_s8(k, n, &w8);
                            Tensor::new(vec![packed.len()], packed).unwrap()
                        }
                    };
                    fast.prepare_sparse(&plan, &[(1, b.clone())]);
                    fast.prepare_int8(&plan, &[(1, b.clone())]);
                    let walks = match int8 {
                        None => !fast.panel_runs.is_empty(),
                        Some(_) => fast.colsums.values().any(|(_, _, sparse)| sparse.is_some()),
                    };
                    let tag = format!("{tier} {format:?} int8 {int8:?}, {blocks} of 16 blocks zero");
                    let can_walk = int8.is_none() || fast.int8_kernel.is_some();
                    let chosen = match format {
                        None => blocks as f64 / 16.0 >= crate::kernels::SKIP_MIN_ZERO,
                        Some(f) => f == WeightFormat::Blocks,
                    };
                    assert_eq!(walks, chosen && can_walk, "{tag}");
                    let ins = [Some(&a), Some(&b)];
                    let want = op.eval(&EvalContext::default(), &ins).unwrap().remove(0);
                    let got = fast.eval(&op, &ins).expect("handled").unwrap().remove(0);
                    assert_close(&tag, &got, &want, 1e-5);
                }
            }
        }
    }

    #[test]
    fn panel_runs_skip_long_zero_stretches_only() {
        use crate::kernels::PanelRuns;
        let (k, n) = (128, 40); // two panels, the second part-filled
        let mut w = vec![1f32; k * n];
        let mut zero_rows = |cols: std::ops::Range<usize>, rows: &[std::ops::Range<usize>]| {
            for r in rows.iter().flat_map(|r| r.clone()) {
                for j in cols.clone() {
                    w[r * n + j] = if r % 2 == 0 { 0.0 } else { -0.0 };
                }
            }
        };
        // Panel 0: a long stretch (skipped), a short one (kept), the tail (skipped).
        zero_rows(0..32, &[0..10, 20..60, 70..70 + PanelRuns::MIN_GAP - 1, 100..128]);
        // Panel 1: all zero.
        zero_rows(32..40, &[0..64, 64..128]);
        let packed = crate::kernels::pack_b(k, n, &w);
        let runs = PanelRuns::detect(k, n, &packed, 0.125).expect("sparse enough");
        assert_eq!(runs.panel(0), &[(10, 10), (60, 40)]);
        assert!(runs.panel(1).is_empty());
        assert!(runs.fits(2) && !runs.fits(3));
        assert!((runs.zero_fraction() - (1.0 - 50.0 / 256.0)).abs() < 1e-12);
        // Too few zeros: the dense product.
        assert!(PanelRuns::detect(k, n, &packed, 0.8).is_some() && PanelRuns::detect(k, n, &packed, 0.81).is_none());
        assert!(PanelRuns::detect(k, n, &packed[1..], 0.0).is_none(), "wrong length");
    }

    /// Integer products on BERT shapes, all threads, weights hot (one copy) or cold (many
    /// copies, `WEIGHT_COPIES`): a probe, run by hand with
    /// `cargo test --release -p tcc-runtime --lib int8_linear_speed -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing probe, asserts nothing"]
    fn int8_linear_speed() {
        if !crate::kernels::int8::vnni512_supported() {
            return;
        }
        let epi = Epilogue(vec![
            EpiOp::Acc,
            EpiOp::Input(1),
            EpiOp::Binary(BinaryKind::Mul, 0, 1),
            EpiOp::Input(0),
            EpiOp::Binary(BinaryKind::Add, 2, 3),
        ]);
        use crate::op::UnaryKind;
        let gelu = Epilogue(vec![
            EpiOp::Acc,
            EpiOp::Input(1),
            EpiOp::Binary(BinaryKind::Mul, 0, 1),
            EpiOp::Input(0),
            EpiOp::Binary(BinaryKind::Add, 2, 3),
            EpiOp::Const(std::f32::consts::FRAC_1_SQRT_2),
            EpiOp::Binary(BinaryKind::Mul, 4, 5),
            EpiOp::Unary(UnaryKind::Erf, 6),
            EpiOp::Const(1.0),
            EpiOp::Binary(BinaryKind::Add, 7, 8),
            EpiOp::Binary(BinaryKind::Mul, 4, 9),
            EpiOp::Const(0.5),
            EpiOp::Binary(BinaryKind::Mul, 10, 11),
        ]);
        let shapes = [
            (128usize, 768usize, 768usize, &epi),
            (128, 768, 3072, &epi),
            (128, 3072, 768, &epi),
            (128, 384, 384, &epi),
            (128, 384, 1536, &epi),
            (128, 384, 1536, &gelu),
            (128, 1536, 384, &epi),
        ];
        for &(m, k, n, epi) in &shapes {
            let op: Op = packed_product(k, n, epi.clone(), 2, Some(fused::ActQuant::DynamicRow)).into();
            let Some(mut fast) = fast_for(Tier::Avx512, std::slice::from_ref(&op)) else { return };
            let a = t(&[m, k], 1);
            let w: Vec<i8> = (0..k * n).map(|i| (i.wrapping_mul(2654435761) >> 7) as u8 as i8).collect();
            let packed = crate::kernels::int8::pack_b_s8(k, n, &w);
            let copies = std::env::var("WEIGHT_COPIES").ok().and_then(|v| v.parse().ok()).unwrap_or(1usize);
            let bs: Vec<Tensor> =
                (0..copies).map(|_| Tensor::new(vec![packed.len()], packed.clone()).unwrap()).collect();
            for b in &bs {
                let plan = product_plan(&op);
                fast.prepare_int8(&plan, &[(1, b.clone())]);
            }
            let (bias, scale) = (t(&[n], 3), t(&[n], 4));
            let iters = 300;
            let t0 = std::time::Instant::now();
            let fresh = std::env::var_os("FRESH_A").is_some();
            let avals = a.as_slice::<f32>().unwrap().to_vec();
            for i in 0..iters {
                // A new tensor each time (as in a model: the previous op's output) or the same
                // (quantized once, then reused).
                let a = if fresh { Tensor::new(vec![m, k], avals.clone()).unwrap() } else { a.clone() };
                let ins = [Some(&a), Some(&bs[i % copies]), Some(&bias), Some(&scale)];
                fast.eval(&op, &ins).unwrap().unwrap();
            }
            let s = t0.elapsed().as_secs_f64() / iters as f64;
            eprintln!(
                "int8 {m}x{k}x{n} epilogue of {} ({copies} copies): {:.3} ms, {:.0} GOP/s",
                epi.0.len(),
                s * 1e3,
                2.0 * (m * k * n) as f64 / s / 1e9
            );
        }
    }

    /// Dynamic quantization and standalone GELU (the integer models' element-wise work) on
    /// AVX-512: the reference's bytes and parameters exactly; GELU within the epilogues'
    /// approximation error.
    #[test]
    fn dynamic_quantization_and_gelu_fast_paths() {
        let Some(fast) = fast_for(Tier::Avx512, &[]) else { return };
        let ctx = EvalContext::default();
        for n in [1usize, 15, 16, 17, 1000, 4099] {
            let mut v: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 - 400.0) / 37.0).collect();
            if n > 20 {
                v[3] = f32::NAN;
                v[5] = f32::INFINITY;
                v[7] = -0.0;
                // A value on a rounding midpoint of the grid.
                v[9] = 0.5 * (v.iter().filter(|x| x.is_finite()).fold(0f32, |a, &b| a.max(b)) - -400.0 / 37.0) / 255.0;
            }
            let x = Tensor::new(vec![n], v).unwrap();
            let op: Op = crate::op::DynamicQuantizeLinear {}.into();
            let want = op.eval(&ctx, &[Some(&x)]).unwrap();
            let got = fast.eval(&op, &[Some(&x)]).expect("handled").unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!(g.bit_eq(w), "dynamic quantization of {n} values");
            }
            for approximate in [crate::op::GeluApprox::None, crate::op::GeluApprox::Tanh] {
                let op: Op = crate::op::Gelu { approximate }.into();
                let want = op.eval(&ctx, &[Some(&x)]).unwrap().remove(0);
                let got = fast.eval(&op, &[Some(&x)]).expect("handled").unwrap().remove(0);
                let (g, w) = (got.as_slice::<f32>().unwrap(), want.as_slice::<f32>().unwrap());
                for (a, b) in g.iter().zip(w) {
                    assert!(
                        a == b || (a - b).abs() <= 1e-5 * (1.0 + b.abs()) || (a.is_nan() && b.is_nan()),
                        "gelu {a} vs {b}"
                    );
                }
            }
        }
    }

    /// A fake-quantization epilogue (QDQ models) gives the reference's values on every tier,
    /// on full-range data (midpoints, saturation, NaN).
    #[test]
    fn fake_quant_epilogue_on_every_tier() {
        let q = crate::op::FakeQuant { scale: 0.0173, zero_point: 128, lo: 0, hi: 255 };
        let data = crate::op::quant::tests::fake_quant_data(&q);
        // C = A . I (an identity weight) so that the epilogue sees exactly the data.
        let (m, k) = (data.len().div_ceil(8), 8);
        let mut a = vec![0f32; m * k];
        a[..data.len()].copy_from_slice(&data);
        let eye: Vec<f32> = (0..k * k).map(|i| if i % (k + 1) == 0 { 1.0 } else { 0.0 }).collect();
        let op: Op = packed_product(k, k, Epilogue(vec![EpiOp::Acc, EpiOp::FakeQuant(0, q)]), 0, None).into();
        let at = Tensor::new(vec![m, k], a).unwrap();
        let b = Tensor::new(vec![pack_b(k, k, &eye).len()], pack_b(k, k, &eye)).unwrap();
        let want = op.eval(&EvalContext::default(), &[Some(&at), Some(&b)]).unwrap().remove(0);
        for tier in Tier::ALL {
            let Some(fast) = fast_for(tier, std::slice::from_ref(&op)) else { continue };
            let got = fast.eval(&op, &[Some(&at), Some(&b)]).expect("handled").unwrap().remove(0);
            let (g, w) = (got.as_slice::<f32>().unwrap(), want.as_slice::<f32>().unwrap());
            for (i, (x, y)) in g.iter().zip(w).enumerate() {
                assert!(
                    x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
                    "{tier}: {} -> {x}, reference {y}",
                    a_at(&at, i)
                );
            }
            // The standalone op (QDQ models' activations) on the same data.
            let fq: Op = q.into();
            let x = Tensor::new(vec![data.len()], data.clone()).unwrap();
            let want = fq.eval(&EvalContext::default(), &[Some(&x)]).unwrap().remove(0);
            if let Some(got) = fast.eval(&fq, &[Some(&x)]) {
                let got = got.unwrap().remove(0);
                let (g, w) = (got.as_slice::<f32>().unwrap(), want.as_slice::<f32>().unwrap());
                assert!(g.iter().zip(w).all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())));
            } else {
                assert_ne!(tier, Tier::Avx512, "the AVX-512 tier runs FakeQuant");
            }
        }
        fn a_at(a: &Tensor, i: usize) -> f32 {
            a.as_slice::<f32>().unwrap()[i]
        }
    }

    /// The whole op, as SDPA exports fuse it (`nan_to_zero`): a batch whose keys are all
    /// masked out gets zeros on every tier, as the reference does.
    /// The whole Attention op against the reference on every tier, for shapes that fill no
    /// block evenly (37 queries and keys, heads of 40), with the scores' epilogue empty, a scale
    /// and a mask (the form AVX-512 runs without interpreting), and other chains; a mask per
    /// row as well as per key. Rows that mask every key but one check the softmax's maxima.
    #[test]
    fn whole_attention_matches_the_reference() {
        // 3 heads of 64 rows in one batch: the heads left over split by rows between threads.
        for (b, s, h, d) in [(2, 37, 3, 40), (1, 64, 3, 40)] {
            let chain = |ops: Vec<EpiOp>, extra: usize| {
                let base = attention_products();
                let scores = FusedMatMul { epilogue: Epilogue(ops), extra, ..base.scores };
                Attention { scores, ..base }
            };
            let cases = [
                ("no epilogue", chain(vec![], 0)),
                ("scale", chain(vec![EpiOp::Acc, EpiOp::Const(0.125), EpiOp::Binary(BinaryKind::Mul, 0, 1)], 0)),
                ("scale and mask", attention_products()),
                ("mask only", chain(vec![EpiOp::Acc, EpiOp::Input(0), EpiOp::Binary(BinaryKind::Add, 0, 1)], 1)),
                (
                    "mask, then divide",
                    chain(
                        vec![
                            EpiOp::Acc,
                            EpiOp::Input(0),
                            EpiOp::Binary(BinaryKind::Add, 0, 1),
                            EpiOp::Const(3.0),
                            EpiOp::Binary(BinaryKind::Div, 2, 3),
                        ],
                        1,
                    ),
                ),
            ];
            let (q, kk, v) = (t(&[b, s, h, d], 5), t(&[b, s, h, d], 6), t(&[b, s, h, d], 7));
            let mut per_row = vec![-1e4f32; b * s * s];
            for (i, m) in per_row.iter_mut().enumerate() {
                // Row r of batch 0 sees keys 0..=r; batch 1 sees every key.
                let (bi, r, c) = (i / (s * s), i / s % s, i % s);
                if bi == 1 || c <= r {
                    *m = 0.0;
                }
            }
            let masks = [t(&[b, 1, 1, s], 8), Tensor::new(vec![b, 1, s, s], per_row).unwrap()];
            for (name, at) in cases {
                let op: Op = at.clone().into();
                for tier in Tier::ALL {
                    let Some(fast) = fast_for(tier, std::slice::from_ref(&op)) else { continue };
                    for mask in &masks {
                        let mut ins = vec![Some(&q), Some(&kk), Some(&v)];
                        if at.scores.extra == 1 {
                            ins.push(Some(mask));
                        }
                        let want = op.eval(&EvalContext::default(), &ins).unwrap().remove(0);
                        let got = fast.eval(&op, &ins).expect("handled").unwrap().remove(0);
                        assert_close(&format!("{tier} {name} {:?}", mask.shape()), &got, &want, 1e-5);
                    }
                }
            }
        }
    }

    /// An op that allows bf16 (an int8 build's) against the f32 reference: on AMX-BF16 CPUs
    /// it runs on tiles, on AVX-512 BF16 ones on vectors, within bf16's rounding of the f32
    /// result (elsewhere in f32), through
    /// the permuted layouts of real models, the scale, both kinds of mask, and rows that mask
    /// every key (NaN, or zeros with `nan_to_zero`).
    #[test]
    fn bf16_attention_tracks_the_f32_reference() {
        // 3 heads of 64 rows in one batch: the heads left over split by rows between threads.
        for (b, s, h, d) in [(2, 37, 3, 40), (1, 64, 3, 40)] {
            let at = Attention { bf16: true, ..attention_products() };
            let op: Op = at.into();
            let (q, kk, v) = (t(&[b, s, h, d], 5), t(&[b, s, h, d], 6), t(&[b, s, h, d], 7));
            let mut per_row = vec![0f32; b * s * s];
            per_row.iter_mut().enumerate().filter(|(i, _)| i % s > i / s % s).for_each(|(_, m)| *m = -1e4);
            // Batch 0 masks every key (NaN rows, zeros with `nan_to_zero`).
            let mut none = vec![0f32; b * s];
            none[..s].fill(f32::NEG_INFINITY);
            let masks = [
                t(&[b, 1, 1, s], 8),
                Tensor::new(vec![b, 1, s, s], per_row).unwrap(),
                Tensor::new(vec![b, 1, 1, s], none).unwrap(),
            ];
            let ops = [op.clone(), Attention { bf16: true, nan_to_zero: true, ..attention_products() }.into()];
            for (op, tier) in ops.iter().flat_map(|op| Tier::ALL.map(|t| (op, t))) {
                let Some(fast) = fast_for(tier, std::slice::from_ref(op)) else { continue };
                for mask in &masks {
                    let ins = [Some(&q), Some(&kk), Some(&v), Some(mask)];
                    let want = op.eval(&EvalContext::default(), &ins).unwrap().remove(0);
                    let got = fast.eval(op, &ins).expect("handled").unwrap().remove(0);
                    let (g, w) = (got.as_slice::<f32>().unwrap(), want.as_slice::<f32>().unwrap());
                    // NaN rows where the reference has them, the rest within bf16's rounding.
                    assert!(g.iter().zip(w).all(|(a, b)| a.is_nan() == b.is_nan()), "{tier}: NaN rows differ");
                    let finite = |t: &[f32]| -> Tensor {
                        Tensor::new(vec![t.len()], t.iter().map(|x| if x.is_nan() { 0.0 } else { *x }).collect())
                            .unwrap()
                    };
                    assert_close(&format!("{tier} bf16 {:?} {op:?}", mask.shape()), &finite(g), &finite(w), 2e-2);
                }
            }
        }
    }

    #[test]
    fn attention_with_fully_masked_rows() {
        let (b, s, h, d) = (2, 19, 2, 8);
        let at = Attention { nan_to_zero: true, ..attention_products() };
        let op: Op = at.into();
        for tier in Tier::ALL {
            let Some(fast) = fast_for(tier, std::slice::from_ref(&op)) else { continue };
            let (q, kk, v) = (t(&[b, s, h, d], 5), t(&[b, s, h, d], 6), t(&[b, s, h, d], 7));
            let mut m = vec![0f32; b * s];
            m[..s].fill(f32::NEG_INFINITY);
            let mask = Tensor::new(vec![b, 1, 1, s], m).unwrap();
            let ins = [Some(&q), Some(&kk), Some(&v), Some(&mask)];
            let want = op.eval(&EvalContext::default(), &ins).unwrap().remove(0);
            let got = fast.eval(&op, &ins).expect("handled").unwrap().remove(0);
            let g = got.as_slice::<f32>().unwrap();
            assert!(g.iter().all(|x| !x.is_nan()), "{tier}: NaN in the output");
            assert!(g[..s * h * d].iter().all(|&x| x == 0.0), "{tier}: masked batch not zero");
            assert_close(&format!("{tier} attention"), &got, &want, 1e-5);
        }
    }

    /// QDQ attention: the probabilities rounded to their quantization grid before the context
    /// product, on every tier (AVX-512 quantizes them sixteen at a time): within a quantum of
    /// the reference (softmax's float rounding may move a probability across a midpoint).
    #[test]
    fn attention_with_quantized_probabilities() {
        let (b, s, h, d) = (2, 23, 3, 16);
        let q8 = crate::op::FakeQuant { scale: 1.0 / 255.0, zero_point: 0, lo: 0, hi: 255 };
        let op: Op = Attention { probs_quant: Some(q8), ..attention_products() }.into();
        for tier in Tier::ALL {
            let Some(fast) = fast_for(tier, std::slice::from_ref(&op)) else { continue };
            let (q, kk, v) = (t(&[b, s, h, d], 5), t(&[b, s, h, d], 6), t(&[b, s, h, d], 7));
            let mask = t(&[b, 1, 1, s], 8);
            let ins = [Some(&q), Some(&kk), Some(&v), Some(&mask)];
            let want = op.eval(&EvalContext::default(), &ins).unwrap().remove(0);
            let got = fast.eval(&op, &ins).expect("handled").unwrap().remove(0);
            let vmax = v.as_slice::<f32>().unwrap().iter().fold(0f32, |m, x| m.max(x.abs()));
            let (g, w) = (got.as_slice::<f32>().unwrap(), want.as_slice::<f32>().unwrap());
            // A flipped probability moves an output by at most a quantum times |v|.
            let worst = g.iter().zip(w).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst <= 2.0 * q8.scale * vmax + 1e-5, "{tier}: {worst}");
            // Flips are rare: unquantized probabilities would move nearly every output.
            let moved = g.iter().zip(w).filter(|(x, y)| (*x - *y).abs() > 1e-5).count();
            assert!(moved * 20 <= g.len(), "{tier}: {moved} of {} outputs differ", g.len());
        }
    }

    #[test]
    fn elementwise_and_embedding_fast_paths_match_the_reference_bit_for_bit() {
        use crate::op::{Binary, BinaryKind as K, Gather};
        let fast = fast_for(Tier::detect(), &[]).expect("fast");
        let ctx = EvalContext::default();
        let cases: [(&[usize], &[usize], bool); 11] = [
            (&[2, 5, 6], &[2, 5, 1], true), // one value per row (quantized embeddings' scales)
            (&[2, 5, 1], &[2, 5, 6], true),
            (&[2, 5, 0], &[2, 5, 1], false),
            (&[1, 0, 6], &[1, 0, 1], false), // an empty sequence: the reference's empty result
            (&[2, 5, 6], &[2, 5, 6], true),
            (&[2, 5, 6], &[6], true),
            (&[1, 5, 6], &[2, 5, 6], true),
            (&[2, 5, 6], &[1, 1, 6], true),
            (&[], &[3], true),
            (&[2, 5, 6], &[2, 1, 6], false), // broadcasts in the middle: reference only
            (&[2, 5, 1], &[6], false),       // both broadcast
        ];
        for kind in [K::Add, K::Sub, K::Mul, K::Div] {
            for (sa, sb, handled) in cases {
                let (a, b) = (t(sa, 5), t(sb, 6));
                let op: Op = Binary::new(kind).into();
                let want = op.eval(&ctx, &[Some(&a), Some(&b)]).unwrap().remove(0);
                match fast.eval(&op, &[Some(&a), Some(&b)]) {
                    Some(got) => {
                        let got = got.unwrap().remove(0);
                        assert_eq!(got.shape(), want.shape(), "{kind:?} {sa:?} {sb:?}");
                        let (g, w) = (got.as_slice::<f32>().unwrap(), want.as_slice::<f32>().unwrap());
                        assert!(g.iter().zip(w).all(|(x, y)| x.to_bits() == y.to_bits()), "{kind:?} {sa:?} {sb:?}");
                    }
                    None => assert!(!handled, "{kind:?} {sa:?} {sb:?} should take the fast path"),
                }
            }
        }
        let table = t(&[7, 4], 8);
        let op: Op = Gather { axis: 0 }.into();
        let ids = Tensor::new(vec![2, 3], vec![6i64, 0, -1, 3, -7, 2]).unwrap();
        let want = op.eval(&ctx, &[Some(&table), Some(&ids)]).unwrap().remove(0);
        let got = fast.eval(&op, &[Some(&table), Some(&ids)]).expect("handled").unwrap().remove(0);
        assert_eq!((got.shape(), got.as_slice::<f32>().unwrap()), (want.shape(), want.as_slice::<f32>().unwrap()));
        // Quantized embeddings: rows of s8 or u8, then their per-tensor dequantization.
        let q = Tensor::new(vec![7, 4], (0..28).map(|i| (i * 37 % 256) as u8 as i8).collect::<Vec<i8>>()).unwrap();
        let u = Tensor::new(vec![7, 4], (0..28).map(|i| (i * 37 % 256) as u8).collect::<Vec<u8>>()).unwrap();
        let dq: Op = crate::op::DequantizeLinear { axis: 1 }.into();
        for (t, z) in [(&q, Tensor::scalar(-3i8)), (&u, Tensor::scalar(131u8))] {
            let want = op.eval(&ctx, &[Some(t), Some(&ids)]).unwrap().remove(0);
            let got = fast.eval(&op, &[Some(t), Some(&ids)]).expect("handled").unwrap().remove(0);
            assert!(got.bit_eq(&want));
            let s = Tensor::scalar(0.0173f32);
            let want = dq.eval(&ctx, &[Some(&got), Some(&s), Some(&z)]).unwrap().remove(0);
            let got = fast.eval(&dq, &[Some(&got), Some(&s), Some(&z)]).expect("handled").unwrap().remove(0);
            assert!(got.bit_eq(&want));
        }
        // Out-of-range ids are left to the reference, which names them.
        let bad = Tensor::new(vec![1], vec![7i64]).unwrap();
        assert!(fast.eval(&op, &[Some(&table), Some(&bad)]).is_none());
        let err = op.eval(&ctx, &[Some(&table), Some(&bad)]).unwrap_err().to_string();
        assert!(err.contains("out of range"), "{err}");
    }

    #[test]
    fn softmax_layernorm_transpose_match_the_reference() {
        for tier in Tier::ALL {
            let Some(fast) = fast_for(tier, &[]) else { continue };
            let ctx = EvalContext::default();
            for &(rows, len) in &[(1, 1), (3, 3), (7, 4), (5, 5), (40, 128), (2, 385)] {
                let mut x = t(&[rows, len], 10);
                if len > 2 {
                    let mut v = x.as_slice::<f32>().unwrap().to_vec();
                    v[1] = f32::NEG_INFINITY;
                    v[2] = -3.4e38;
                    v.iter_mut().for_each(|e| *e *= 8.0);
                    x = Tensor::new(vec![rows, len], v).unwrap();
                }
                let sm: Op = Softmax { axis: -1, log: false, nan_to_zero: false }.into();
                let want = sm.eval(&ctx, &[Some(&x)]).unwrap().remove(0);
                let got = fast.eval(&sm, &[Some(&x)]).expect("handled").unwrap().remove(0);
                assert_close(&format!("{tier} softmax {rows}x{len}"), &got, &want, 1e-6);
                let x = t(&[rows, len], 11);
                let (g, bta) = (t(&[len], 12), t(&[len], 13));
                let ln: Op = LayerNorm { axis: -1, epsilon: 1e-12 }.into();
                for ins in [vec![Some(&x), Some(&g), Some(&bta)], vec![Some(&x), Some(&g)]] {
                    let want = ln.eval(&ctx, &ins).unwrap().remove(0);
                    let got = fast.eval(&ln, &ins).expect("handled").unwrap().remove(0);
                    assert_close(&format!("{tier} layernorm {rows}x{len}"), &got, &want, 2e-5);
                }
            }
            let x = t(&[2, 3, 4, 5], 14);
            for perm in [vec![0, 2, 1, 3], vec![3, 2, 1, 0], vec![0, 1, 3, 2]] {
                let op: Op = Transpose { perm: Some(perm.clone()) }.into();
                let want = op.eval(&ctx, &[Some(&x)]).unwrap().remove(0);
                let got = fast.eval(&op, &[Some(&x)]).expect("handled").unwrap().remove(0);
                assert!(got.bit_eq(&want), "{perm:?}");
            }
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use crate::op::{EvalContext, Softmax};

    #[test]
    #[ignore = "timing probe, run by hand"]
    fn softmax_speed() {
        let fast = Fast::new(&Plan::default(), Tier::detect()).unwrap();
        let x = Tensor::new(vec![12 * 128, 128], (0..12 * 128 * 128).map(|i| (i % 17) as f32 / 7.0).collect()).unwrap();
        let op: Op = Softmax { axis: -1, log: false, nan_to_zero: false }.into();
        for _ in 0..3 {
            fast.eval(&op, &[Some(&x)]);
        }
        let t0 = std::time::Instant::now();
        for _ in 0..100 {
            fast.eval(&op, &[Some(&x)]);
        }
        eprintln!("jit softmax: {:.3} ms", t0.elapsed().as_secs_f64() * 10.0);
        let t0 = std::time::Instant::now();
        for _ in 0..10 {
            op.eval(&EvalContext::default(), &[Some(&x)]).unwrap();
        }
        eprintln!("reference softmax: {:.3} ms", t0.elapsed().as_secs_f64() * 100.0);
        let f = fast.jit.softmax;
        let xs = x.as_slice::<f32>().unwrap();
        let mut y = vec![0f32; xs.len()];
        let t0 = std::time::Instant::now();
        for _ in 0..100 {
            unsafe { f(xs.as_ptr(), y.as_mut_ptr(), 12 * 128, 128) };
        }
        eprintln!("jit softmax, one thread, no split: {:.3} ms", t0.elapsed().as_secs_f64() * 10.0);
    }
}

#[cfg(test)]
mod gemm_timing {
    use super::tests::packed_product;
    use super::*;
    use crate::kernels::pack_b;
    use crate::op::{EpiOp, Epilogue};

    /// `cargo test --release -p tcc-runtime --lib linear_speed -- --ignored --nocapture`;
    /// `WEIGHT_COPIES=N` cycles through N copies of the weights (cold, as in a model),
    /// `KEEP_OUT=N` keeps the last N outputs alive (fresh output memory, as in a model),
    /// `GAP_US` idles between runs.
    #[test]
    #[ignore = "timing probe, run by hand"]
    fn linear_speed() {
        use crate::op::{BinaryKind as B, UnaryKind as U};
        let bias = Epilogue(vec![EpiOp::Acc, EpiOp::Input(0), EpiOp::Binary(B::Add, 0, 1)]);
        let gelu = Epilogue(vec![
            EpiOp::Acc,
            EpiOp::Input(0),
            EpiOp::Binary(B::Add, 0, 1),
            EpiOp::Const(0.70710677),
            EpiOp::Binary(B::Mul, 2, 3),
            EpiOp::Unary(U::Erf, 4),
            EpiOp::Const(1.0),
            EpiOp::Binary(B::Add, 5, 6),
            EpiOp::Binary(B::Mul, 2, 7),
            EpiOp::Const(0.5),
            EpiOp::Binary(B::Mul, 8, 9),
        ]);
        let none = Epilogue::default();
        let shapes = [
            (128usize, 768usize, 768usize, &none),
            (128usize, 384usize, 384usize, &bias),
            (128, 384, 1536, &gelu),
            (128, 768, 768, &bias),
            (128, 768, 3072, &bias),
            (128, 768, 3072, &gelu),
            (128, 3072, 768, &bias),
        ];
        for &(m, k, n, bias_epi) in &shapes {
            let op: Op = packed_product(k, n, bias_epi.clone(), usize::from(!bias_epi.0.is_empty()), None).into();
            let plan = Plan {
                steps: vec![crate::plan::Step { op: op.clone(), inputs: vec![], outputs: vec![], name: String::new() }],
                ..Default::default()
            };
            let fast = Fast::new(&plan, Tier::detect()).unwrap();
            let a = Tensor::new(vec![m, k], (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect())
                .unwrap();
            let w: Vec<f32> = (0..k * n).map(|i| (((i * 104729) % 1000) as f32 / 500.0 - 1.0) * 0.05).collect();
            let packed = pack_b(k, n, &w);
            // Several copies of the weights, used in turn, as layers of a model are: each run
            // reads weights that are not in cache.
            let copies = std::env::var("WEIGHT_COPIES").ok().and_then(|v| v.parse().ok()).unwrap_or(1usize);
            let bs: Vec<Tensor> =
                (0..copies).map(|_| Tensor::new(vec![packed.len()], packed.clone()).unwrap()).collect();
            let bias = Tensor::new(vec![n], vec![1f32; n]).unwrap();
            let mut which = 0;
            let mut ins_for = || {
                which = (which + 1) % copies;
                which
            };
            let ins = [Some(&a), Some(&bs[0]), Some(&bias)];
            for _ in 0..5 {
                fast.eval(&op, &ins);
            }
            let iters = 200;
            let gap = std::env::var("GAP_US").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            let mut s = 0.0;
            let keep: usize = std::env::var("KEEP_OUT").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
            let mut kept = std::collections::VecDeque::new();
            for _ in 0..iters {
                let t = std::time::Instant::now();
                while t.elapsed().as_micros() < gap as u128 {}
                let w = ins_for();
                let ins = [Some(&a), Some(&bs[w]), Some(&bias)];
                let t0 = std::time::Instant::now();
                let out = fast.eval(&op, &ins);
                s += t0.elapsed().as_secs_f64();
                kept.push_back(out);
                while kept.len() > keep {
                    kept.pop_front();
                }
            }
            let s = s / iters as f64;
            eprintln!(
                "{m}x{k}x{n} {}: {:.3} ms, {:.1} GFLOP/s ({} threads)",
                match bias_epi.0.len() {
                    0 => "none",
                    1..=3 => "bias",
                    _ => "gelu",
                },
                s * 1e3,
                2.0 * (m * k * n) as f64 / s / 1e9,
                pool::global().threads()
            );
        }
    }
}

#[cfg(test)]
mod attention_probe {
    use super::*;

    /// BERT-base attention (b1, s128, 12 heads of 64) timed alone: `cargo test --release -p
    /// tcc-runtime --lib attention_speed -- --ignored --nocapture`; `DIM=32` for MiniLM's heads,
    /// `SEQ`, `ITERS`, and `BF16=1` for an op that allows bf16 (AMX tiles). Ignored: a timing
    /// probe for performance work, run by hand in release builds; it asserts nothing.
    #[test]
    #[ignore = "timing probe, run by hand"]
    fn attention_speed() {
        let dim = |name: &str, default: usize| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
        let (b, s, h, d) = (1usize, dim("SEQ", 128), 12usize, dim("DIM", 64));
        let bf16 = std::env::var("BF16").is_ok();
        let op: Op = Attention { bf16, ..super::tests::attention_products() }.into();
        let plan = Plan {
            steps: vec![crate::plan::Step { op: op.clone(), inputs: vec![], outputs: vec![], name: String::new() }],
            ..Default::default()
        };
        let fast = Fast::new(&plan, Tier::detect()).unwrap();
        let mk = |n: usize, seed: usize| -> Vec<f32> {
            (0..n).map(|i| (((i * 7919 + seed * 104729) % 1000) as f32 / 500.0 - 1.0) * 0.5).collect()
        };
        let q = Tensor::new(vec![b, s, h, d], mk(b * s * h * d, 1)).unwrap();
        let k = Tensor::new(vec![b, s, h, d], mk(b * s * h * d, 2)).unwrap();
        let v = Tensor::new(vec![b, s, h, d], mk(b * s * h * d, 3)).unwrap();
        let mask = Tensor::new(vec![b, 1, 1, s], vec![0f32; b * s]).unwrap();
        let ins = [Some(&q), Some(&k), Some(&v), Some(&mask)];
        for _ in 0..20 {
            fast.eval(&op, &ins).expect("handled").unwrap();
        }
        let iters = std::env::var("ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
        let mut times: Vec<f64> = (0..iters)
            .map(|_| {
                let t0 = std::time::Instant::now();
                fast.eval(&op, &ins).expect("handled").unwrap();
                t0.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let med = times[times.len() / 2];
        let flops = 2.0 * 2.0 * (b * h * s * s * d) as f64;
        eprintln!(
            "attention b{b} s{s} h{h} d{d}: median {:.3} ms, {:.1} GFLOP/s ({} threads)",
            med * 1e3,
            flops / med / 1e9,
            pool::global().threads()
        );
    }
}

//! The Cranelift JIT: compiles, when a model is loaded, the code its plan needs on this CPU.
//!
//! Generated here (Cranelift IR, 128-bit vectors): one GEMM driver per distinct epilogue of the
//! plan's `FusedMatMul` steps (loop nest over panels, `k` blocks and row tiles, calling the
//! micro-kernel through a pointer, then the epilogue on each finished tile), the packing of
//! activation matrices into panels, softmax and layer-normalization row kernels, and the
//! portable micro-kernel. The 512- and 256-bit micro-kernels are Rust `#[target_feature]`
//! functions ([`crate::kernels`]), registered with `JITBuilder::symbol`; which one the drivers
//! call is chosen from the CPU's features at load ([`Tier::detect`]).
//!
//! All generated code is shape-generic (sizes are arguments), so a model compiles once at load
//! and never again, whatever the batch and sequence length.

mod emit;
pub mod gemm;
mod rows;

use crate::error::{Error, Result};
use crate::kernels::{MicroKernel, Tier};
use crate::op::Epilogue;
use cranelift_codegen::ir::{types, AbiParam, InstBuilder, Signature, UserFuncName};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, FuncId, Linkage, Module};
use emit::Emitter;
pub use gemm::{EpiOperand, GemmArgs};
use std::time::Instant;

/// A generated GEMM driver.
pub type GemmFn = unsafe extern "C" fn(*const GemmArgs);
/// `softmax(x, y, rows, len)`.
pub type SoftmaxFn = unsafe extern "C" fn(*const f32, *mut f32, usize, usize);
/// `layernorm(x, gamma, beta_or_null, y, rows, len, epsilon)`.
pub type LayerNormFn = unsafe extern "C" fn(*const f32, *const f32, *const f32, *mut f32, usize, usize, f32);
/// `(ctx, c, ldc, row, rows, n0, cols)`: the epilogue on a tile of C.
#[cfg(target_arch = "x86_64")]
pub type TileEpilogueFn =
    unsafe extern "C" fn(*const crate::kernels::avx512_vec::EpiContext, *mut f32, usize, usize, usize, usize, usize);
#[cfg(not(target_arch = "x86_64"))]
pub type TileEpilogueFn = unsafe extern "C" fn(*const u8, *mut f32, usize, usize, usize, usize, usize);
/// `pack(src, k, n, row_stride, col_stride, dst)`.
pub type PackFn = unsafe extern "C" fn(*const f32, usize, usize, usize, usize, *mut f32);

/// What a GEMM driver is specialized on: the epilogue program and, per extra input, whether
/// it broadcasts along the columns.
#[derive(Clone, Debug, PartialEq)]
pub struct GemmSpec {
    pub epilogue: Epilogue,
    pub col_broadcast: Vec<bool>,
}

impl GemmSpec {
    fn key(&self) -> String {
        format!("{}|{:?}", serde_json::to_string(&self.epilogue).unwrap_or_default(), self.col_broadcast)
    }
}

/// Owns the JIT's code memory. The module is only kept to keep the code alive: it is never
/// touched after `finalize_definitions`.
struct CodeMemory(Option<JITModule>);

// SAFETY: after finalization the module's code pages are immutable and executable; the module
// is never accessed again except to be dropped (freeing the pages) when the `Jit` is dropped,
// which happens when no thread can be calling into it any more (`Jit` is owned by `Model`, and
// calls borrow the model).
unsafe impl Send for CodeMemory {}
// SAFETY: as above; shared access never touches the module.
unsafe impl Sync for CodeMemory {}

impl Drop for CodeMemory {
    fn drop(&mut self) {
        if let Some(m) = self.0.take() {
            // SAFETY: no function pointer obtained from this module outlives the `Jit` that
            // owns it (see `CodeMemory`'s Send/Sync justification).
            unsafe { m.free_memory() };
        }
    }
}

/// Compiled code for one model on this CPU.
pub struct Jit {
    _code: CodeMemory,
    pub tier: Tier,
    pub micro_kernel: MicroKernel,
    /// The integer micro-kernel over `i16` pairs (`kernels::int16`) for CPUs without AVX-512
    /// VNNI, and its tile height.
    pub pair_kernel: MicroKernel,
    pub pair_mr: usize,
    pub softmax: SoftmaxFn,
    pub layernorm: LayerNormFn,
    pub pack: PackFn,
    /// A native tile epilogue for this tier, if it has one (else the generated code runs).
    pub tile_epilogue: Option<TileEpilogueFn>,
    /// Drivers by spec, with the spec's key (which, unlike `==`, matches NaN constants).
    gemms: Vec<(GemmSpec, String, GemmFn)>,
    /// Milliseconds spent generating and compiling code.
    pub compile_ms: f64,
}

impl std::fmt::Debug for Jit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Jit {{ tier: {}, gemm drivers: {}, compile_ms: {:.1} }}",
            self.tier,
            self.gemms.len(),
            self.compile_ms
        )
    }
}

fn jit_err(e: impl std::fmt::Display) -> Error {
    Error::Artifact(format!("JIT compilation failed: {e}"))
}

impl Jit {
    /// Compiles the fixed kernels and one GEMM driver per spec for `tier`.
    pub fn new(tier: Tier, specs: &[GemmSpec]) -> Result<Jit> {
        let t0 = Instant::now();
        // Cranelift's e-graph optimizer would re-compute loop-invariant values (a row's max,
        // splatted constants) inside the loops using them; the code below is written with its
        // invariants already outside the loops, so it is compiled as written.
        let mut flags = settings::builder();
        flags.set("opt_level", "none").map_err(jit_err)?;
        flags.set("use_colocated_libcalls", "false").map_err(jit_err)?;
        flags.set("is_pic", "false").map_err(jit_err)?;
        let isa_builder = cranelift_native::builder().map_err(jit_err)?;
        let isa = isa_builder.finish(settings::Flags::new(flags)).map_err(jit_err)?;
        let fma = isa.isa_flags().iter().any(|f| f.name == "has_fma" && f.as_bool() == Some(true));
        let call_conv = isa.default_call_conv();
        let mut jb = JITBuilder::with_isa(isa, default_libcall_names());
        let rust_kernel = tier.rust_kernel();
        let mut module = JITModule::new({
            if let Some(k) = rust_kernel {
                jb.symbol("tcc_micro_kernel", k as *const u8);
            }
            jb
        });
        let mut ctx = module.make_context();
        let mut fbc = FunctionBuilderContext::new();

        let sig = |params: &[cranelift_codegen::ir::Type]| {
            let mut s = Signature::new(call_conv);
            for &p in params {
                s.params.push(AbiParam::new(p));
            }
            s
        };
        let i64 = types::I64;
        let kernel_sig = gemm::micro_kernel_sig(call_conv);

        // Defines one function with `body(emitter, params)`.
        let target = module.target_config();
        type Body<'x> = &'x dyn Fn(&mut Emitter, &[cranelift_codegen::ir::Value]);
        let mut define = |module: &mut JITModule, name: &str, sig: Signature, body: Body| -> Result<FuncId> {
            let id = module.declare_function(name, Linkage::Local, &sig).map_err(jit_err)?;
            ctx.func.signature = sig;
            ctx.func.name = UserFuncName::user(0, id.as_u32());
            {
                let mut b = FunctionBuilder::new(&mut ctx.func, &mut fbc);
                let entry = b.create_block();
                b.append_block_params_for_function_params(entry);
                b.switch_to_block(entry);
                let params = b.block_params(entry).to_vec();
                {
                    let mut e = Emitter::new(&mut b, fma);
                    e.preload_math();
                    body(&mut e, &params);
                    e.b.ins().return_(&[]);
                }
                b.seal_all_blocks();
                b.finalize(target);
            }
            if std::env::var("TCC_JIT_DUMP").is_ok_and(|v| v == name) {
                ctx.set_disasm(true);
                eprintln!("{}", ctx.func.display());
            }
            if let Err(errors) = cranelift_codegen::verify_function(&ctx.func, module.isa()) {
                return Err(jit_err(format!("{name}: {errors}")));
            }
            module.define_function(id, &mut ctx).map_err(jit_err)?;
            if let Some(d) = ctx
                .compiled_code()
                .and_then(|c| c.vcode.as_ref())
                .filter(|_| std::env::var("TCC_JIT_DUMP").is_ok_and(|v| v == name))
            {
                eprintln!("{d}");
            }
            module.clear_context(&mut ctx);
            Ok(id)
        };

        let softmax_id = define(&mut module, "softmax", sig(&[i64, i64, i64, i64]), &|e, p| rows::emit_softmax(e, p))?;
        let ln_id = define(&mut module, "layernorm", sig(&[i64, i64, i64, i64, i64, i64, types::F32]), &|e, p| {
            rows::emit_layernorm(e, p)
        })?;
        let pack_id = define(&mut module, "pack", sig(&[i64, i64, i64, i64, i64, i64]), &|e, p| gemm::emit_pack(e, p))?;
        let portable_id = if rust_kernel.is_none() {
            Some(define(&mut module, "portable_kernel", kernel_sig.clone(), &|e, p| {
                gemm::emit_portable_kernel(e, p, false)
            })?)
        } else {
            None
        };
        // The integer kernel over `i16` pairs (`kernels::int16`): native with AVX2, else generated.
        let native_pairs = if tier == Tier::Portable { None } else { crate::kernels::int16::native_kernel() };
        let pair_id = if native_pairs.is_none() {
            Some(define(&mut module, "pair_kernel", kernel_sig.clone(), &|e, p| {
                gemm::emit_portable_kernel(e, p, true)
            })?)
        } else {
            None
        };
        let mut gemm_ids = Vec::new();
        // The plain driver (no epilogue) always exists.
        let plain = GemmSpec { epilogue: Epilogue::default(), col_broadcast: vec![] };
        for (n, spec) in std::iter::once(&plain).chain(specs).enumerate() {
            let key = spec.key();
            if gemm_ids.iter().any(|(k, _, _)| *k == key) {
                continue;
            }
            let ksig = kernel_sig.clone();
            let esig = gemm::epilogue_sig(call_conv);
            let id = define(&mut module, &format!("gemm{n}"), sig(&[i64]), &|e, p| {
                let sref = e.b.import_signature(ksig.clone());
                let eref = e.b.import_signature(esig.clone());
                gemm::emit_driver(e, p[0], &spec.epilogue, &spec.col_broadcast, sref, eref)
            })?;
            gemm_ids.push((key, spec.clone(), id));
        }
        module.finalize_definitions().map_err(jit_err)?;
        // SAFETY (the transmutes below): each pointer is the finalized code of a function
        // defined above with exactly the signature of the Rust function type it becomes
        // (integer/pointer params as I64, `u32` as I32, `f32` as F32, default call convention
        // of the host, which is the C ABI); the code lives as long as `module`, which the
        // returned `Jit` owns.
        let get = |id: FuncId| module.get_finalized_function(id);
        let micro_kernel: MicroKernel = match (rust_kernel, portable_id) {
            (Some(k), _) => k,
            (None, Some(id)) => unsafe { std::mem::transmute::<*const u8, MicroKernel>(get(id)) },
            (None, None) => unreachable!("a portable kernel is generated when there is no Rust one"),
        };
        let (pair_kernel, pair_mr) = match (native_pairs, pair_id) {
            (Some(k), _) => k,
            (None, Some(id)) => {
                (unsafe { std::mem::transmute::<*const u8, MicroKernel>(get(id)) }, Tier::Portable.mr())
            }
            (None, None) => unreachable!("a pair kernel is generated when there is no native one"),
        };
        let mut softmax = unsafe { std::mem::transmute::<*const u8, SoftmaxFn>(get(softmax_id)) };
        let mut layernorm = unsafe { std::mem::transmute::<*const u8, LayerNormFn>(get(ln_id)) };
        let mut tile_epilogue: Option<TileEpilogueFn> = None;
        // On AVX-512 the exp-heavy element-wise work runs sixteen lanes wide.
        #[cfg(target_arch = "x86_64")]
        if tier == Tier::Avx512 && tier.supported() {
            softmax = crate::kernels::avx512_vec::softmax;
            layernorm = crate::kernels::avx512_vec::layernorm;
            tile_epilogue = Some(crate::kernels::avx512_vec::tile_epilogue);
        }
        let pack = unsafe { std::mem::transmute::<*const u8, PackFn>(get(pack_id)) };
        let gemms = gemm_ids
            .into_iter()
            .map(|(k, spec, id)| (spec, k, unsafe { std::mem::transmute::<*const u8, GemmFn>(get(id)) }))
            .collect();
        let compile_ms = t0.elapsed().as_secs_f64() * 1e3;
        tracing::debug!(tier = tier.name(), ms = compile_ms, drivers = specs.len(), "JIT compiled");
        Ok(Jit {
            _code: CodeMemory(Some(module)),
            tier,
            micro_kernel,
            pair_kernel,
            pair_mr,
            softmax,
            layernorm,
            pack,
            tile_epilogue,
            gemms,
            compile_ms,
        })
    }

    /// The driver compiled for `spec`.
    pub fn gemm(&self, spec: &GemmSpec) -> Option<GemmFn> {
        // Comparing specs is fast (this runs once per product call); the key, which formats
        // the program, only for specs `==` cannot match.
        let found = self.gemms.iter().find(|(s, _, _)| s == spec);
        found.or_else(|| self.gemms.iter().find(|(_, k, _)| *k == spec.key())).map(|(_, _, f)| *f)
    }

    /// `C = A . B` on the calling thread through the generated driver (no epilogue): `a` is
    /// `m x k`, `packed_b` is `k x n` packed by [`crate::kernels::pack_b`], `c` is `m x n`.
    /// For benchmarks and tests of the driver and micro-kernel alone.
    pub fn gemm_single_thread(
        &self,
        m: usize,
        k: usize,
        n: usize,
        a: &[f32],
        packed_b: &[f32],
        c: &mut [f32],
    ) -> Result<()> {
        self.plain(m, k, n, a, packed_b, c, self.micro_kernel, self.tier.mr(), 256)
    }

    /// [`Jit::gemm_single_thread`] of an integer product on the pair kernel: `a` holds `m`
    /// rows of `kp` `i16` pairs, `packed_b` the weights packed by
    /// [`crate::kernels::int16::pack_b_pairs`]; `c` gets the exact sums as f32.
    pub fn gemm_pairs_single_thread(
        &self,
        m: usize,
        kp: usize,
        n: usize,
        a: &[f32],
        packed_b: &[f32],
        c: &mut [f32],
    ) -> Result<()> {
        self.plain(m, kp, n, a, packed_b, c, self.pair_kernel, self.pair_mr, kp)
    }

    #[allow(clippy::too_many_arguments)]
    fn plain(
        &self,
        m: usize,
        k: usize,
        n: usize,
        a: &[f32],
        packed_b: &[f32],
        c: &mut [f32],
        kernel: MicroKernel,
        mr: usize,
        kc: usize,
    ) -> Result<()> {
        let driver = self
            .gemm(&GemmSpec { epilogue: Epilogue::default(), col_broadcast: vec![] })
            .ok_or_else(|| jit_err("no plain driver"))?;
        let panels = n.div_ceil(crate::kernels::NR);
        if a.len() != m * k || packed_b.len() != panels * k * crate::kernels::NR || c.len() != m * n || k == 0 {
            return Err(Error::Shape(format!("gemm_single_thread: sizes do not match {m}x{k}x{n}")));
        }
        let args = GemmArgs {
            m,
            n,
            k,
            a: a.as_ptr(),
            lda: k,
            b: packed_b.as_ptr(),
            c: c.as_mut_ptr(),
            ldc: n,
            panel_begin: 0,
            panel_end: panels,
            kernel: kernel as usize,
            mr,
            kc,
            operands: std::ptr::null(),
            epilogue_fn: 0,
            epilogue_ctx: std::ptr::null(),
            k_outer: usize::from(gemm::k_outer_pays(m, k, kc)),
            panel_stride: k * crate::kernels::NR,
        };
        // SAFETY: the sizes were checked above; the identity epilogue reads no operand.
        unsafe { driver(&args) };
        Ok(())
    }
}

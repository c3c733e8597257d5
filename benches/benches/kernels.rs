//! GEMM throughput on BERT shapes: tcc's generated driver + micro-kernel against a plain
//! AVX-512 intrinsics GEMM, one thread; and the int8 `u8 x s8` VNNI kernel on the same shapes.
//! Criterion reports elements (operations: a multiply and an add each count) per second.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tcc_runtime::jit::Jit;
use tcc_runtime::kernels::{pack_b, Tier};

fn gemm(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemm_single_thread");
    for &(m, k, n) in &[(128usize, 768usize, 768usize), (128, 768, 3072)] {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let w: Vec<f32> = (0..k * n).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
        let b = pack_b(k, n, &w);
        let mut out = vec![0f32; m * n];
        g.throughput(Throughput::Elements((2 * m * k * n) as u64));
        let shape = format!("{m}x{k}x{n}");
        for tier in Tier::ALL.into_iter().filter(|t| t.supported()) {
            let jit = Jit::new(tier, &[]).expect("JIT compiles");
            g.bench_with_input(BenchmarkId::new(format!("tcc_{tier}"), &shape), &(), |bench, _| {
                bench.iter(|| jit.gemm_single_thread(m, k, n, &a, &b, &mut out).unwrap())
            });
        }
        #[cfg(target_arch = "x86_64")]
        if Tier::Avx512.supported() {
            g.bench_with_input(BenchmarkId::new("intrinsics_reference", &shape), &(), |bench, _| {
                // SAFETY: AVX-512F is supported; the buffers have the sizes the function needs.
                bench.iter(|| unsafe { tcc_runtime::kernels::reference_gemm_avx512(m, k, n, &a, &b, &mut out) })
            });
        }
    }
    g.finish();
}

/// The integer GEMM of `--quantize int8` models, one thread, against the f32 kernel above: this
/// machine's measured `vpdpbusd` peak is 773 GOP/s per core, its FMA peak 179 GFLOP/s. The
/// VNNI-512 kernel, and the pair kernels CPUs without it run.
fn gemm_int8(c: &mut Criterion) {
    use tcc_runtime::kernels::{int16, int8};
    let mut g = c.benchmark_group("gemm_int8_single_thread");
    for &(m, k, n) in &[(128usize, 768usize, 768usize), (128, 768, 3072), (128, 3072, 768)] {
        // Without AVX-512 VNNI: `i16` pairs through the driver on each tier's pair kernel
        // (AVX-VNNI `vpdpwssd` or AVX2 `pmaddwd`; the generated `pmaddwd` one on `portable`).
        let kp = int16::pairs(k);
        let a: Vec<f32> =
            (0..m * kp).map(|i| int16::pair((i * 7919 % 511) as i16 - 255, (i * 31 % 511) as i16 - 255)).collect();
        let w: Vec<i8> = (0..k * n).map(|i| (i * 104729 % 255) as i32 as i8).collect();
        let packed = int16::pack_b_pairs(k, n, &w);
        let mut out = vec![0f32; m * n];
        g.throughput(Throughput::Elements((2 * m * k * n) as u64));
        for tier in Tier::ALL.into_iter().filter(|t| t.supported() && *t != Tier::Avx512) {
            let jit = Jit::new(tier, &[]).expect("JIT compiles");
            g.bench_with_input(BenchmarkId::new(format!("pairs_{tier}"), format!("{m}x{k}x{n}")), &(), |bench, _| {
                bench.iter(|| jit.gemm_pairs_single_thread(m, kp, n, &a, &packed, &mut out).unwrap())
            });
        }
        let kernels: Vec<int8::Kernel> =
            [int8::Kernel::Amx, int8::Kernel::Vnni512].into_iter().filter(|k| k.supported()).collect();
        if kernels.is_empty() {
            continue;
        }
        let lda = int8::k_groups(k) * 4;
        let a: Vec<u8> = (0..m * lda).map(|i| (i * 7919 % 251) as u8).collect();
        let w: Vec<i8> = (0..k * n).map(|i| (i * 104729 % 255) as i32 as i8).collect();
        let packed = int8::pack_b_s8(k, n, &w);
        let mut out = vec![0i32; m * n];
        g.throughput(Throughput::Elements((2 * m * k * n) as u64));
        for kernel in kernels {
            g.bench_with_input(BenchmarkId::new(kernel.name(), format!("{m}x{k}x{n}")), &(), |bench, _| {
                bench.iter(|| int8::gemm_u8s8(kernel, m, k, n, &a, lda, &packed, None, &mut out, n).unwrap())
            });
        }
    }
    g.finish();
}

/// One BERT-base Linear (`128 x 768 x 3072`, int8, one thread) against the share of its weights'
/// AMX steps (64 rows of `k` by a 32-column panel) that are zero, as `tcc build --sparsity F`
/// leaves them (`block:64x32`): the kernels skip those steps ([`int8::Sparse`]). Throughput is
/// counted in the dense product's operations, so it reads as the speed-up over dense.
fn gemm_int8_sparse(c: &mut Criterion) {
    use tcc_runtime::kernels::int8;
    let mut g = c.benchmark_group("gemm_int8_block_sparse_single_thread");
    let (m, k, n) = (128usize, 768usize, 3072usize);
    let lda = int8::k_groups(k) * 4;
    let a: Vec<u8> = (0..m * lda).map(|i| (i * 7919 % 251) as u8).collect();
    g.throughput(Throughput::Elements((2 * m * k * n) as u64));
    for sparsity in [0.0, 0.125, 0.25, 0.5, 0.8, 0.9, 0.95] {
        // Steps zero at random (a fixed sequence), the others full-range.
        let mut state = 12345u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as f64 / (1u64 << 31) as f64
        };
        let mut w: Vec<i8> = (0..k * n).map(|i| (i * 104729 % 255) as i32 as i8).collect();
        for s in 0..k / 64 {
            for p in 0..n / 32 {
                if next() < sparsity {
                    (s * 64..(s + 1) * 64).for_each(|i| w[i * n + p * 32..i * n + (p + 1) * 32].fill(0));
                }
            }
        }
        let packed = int8::pack_b_s8(k, n, &w);
        // The walk over the live steps at every sparsity, and the dense panels without zeros:
        // where the walk starts to pay is what the build's cost model assumes
        // (`tcc_passes::eqsat::cost`).
        // (The walk reads the live steps in place, or copied one after another, which
        // `int8::COPY_MIN_ZERO` chooses between.)
        let [copied, in_place] = [0.0, 2.0].map(|copy| int8::Sparse::detect_with(k, n, &packed, 0.0, copy));
        let mut out = vec![0i32; m * n];
        for kernel in [int8::Kernel::Amx, int8::Kernel::Vnni512].into_iter().filter(|k| k.supported()) {
            let dense = if sparsity == 0.0 { vec![None] } else { vec![] };
            for sparse in [copied.as_ref(), in_place.as_ref()].into_iter().chain(dense) {
                let how = sparse.map_or("dense", |s| if s.copied() { "walk copied" } else { "walk in place" });
                let id = BenchmarkId::new(kernel.name(), format!("{m}x{k}x{n} {:.1}% zero {how}", sparsity * 100.0));
                g.bench_with_input(id, &(), |bench, _| {
                    bench.iter(|| int8::gemm_u8s8(kernel, m, k, n, &a, lda, &packed, sparse, &mut out, n).unwrap())
                });
            }
        }
    }
    g.finish();
}

/// The same Linear in `f32`, as a model runs it (the fast path's product on every thread, bias
/// fused) against the share of its weights' 64x32 blocks that are zero: the product skips the
/// panel rows that are all zero ([`tcc_runtime::kernels::PanelRuns`]). Throughput is counted in
/// the dense product's operations.
fn gemm_f32_sparse(c: &mut Criterion) {
    use tcc_runtime::fast::Fast;
    use tcc_runtime::op::{BinaryKind, EpiOp, Epilogue, FusedMatMul, WeightFormat};
    use tcc_runtime::plan::{Plan, Step};
    use tcc_runtime::{Op, Tensor};
    let mut g = c.benchmark_group("gemm_f32_block_sparse");
    let (m, k, n) = (128usize, 768usize, 3072usize);
    g.throughput(Throughput::Elements((2 * m * k * n) as u64));
    let dense: Op = FusedMatMul {
        a_perm: None,
        b_perm: None,
        packed: Some([k, n]),
        c_perm: None,
        epilogue: Epilogue(vec![EpiOp::Acc, EpiOp::Input(0), EpiOp::Binary(BinaryKind::Add, 0, 1)]),
        extra: 1,
        fused: vec![],
        int8: None,
        weights: Some(WeightFormat::Dense),
    }
    .into();
    let Op::FusedMatMul(f) = &dense else { unreachable!() };
    let walk: Op = FusedMatMul { weights: Some(WeightFormat::Blocks), ..f.clone() }.into();
    let a = Tensor::new(vec![m, k], (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect()).unwrap();
    let bias = Tensor::new(vec![n], (0..n).map(|i| i as f32 * 1e-3).collect()).unwrap();
    for sparsity in [0.0, 0.125, 0.25, 0.5, 0.8, 0.9, 0.95] {
        let mut state = 12345u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as f64 / (1u64 << 31) as f64
        };
        let mut w: Vec<f32> = (0..k * n).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
        for s in 0..k / 64 {
            for p in 0..n / 32 {
                if next() < sparsity {
                    (s * 64..(s + 1) * 64).for_each(|i| w[i * n + p * 32..i * n + (p + 1) * 32].fill(0.0));
                }
            }
        }
        let b = Tensor::new(vec![k * n], pack_b(k, n, &w)).unwrap();
        // The walk over the runs at every sparsity, and the dense panels without zeros.
        for op in [&walk, &dense].into_iter().take(if sparsity == 0.0 { 2 } else { 1 }) {
            let plan = Plan {
                steps: vec![Step {
                    op: op.clone(),
                    inputs: vec![Some(0), Some(1)],
                    outputs: vec![3],
                    name: "linear".into(),
                }],
                ..Default::default()
            };
            let tier = Tier::detect();
            let mut fast = Fast::new(&plan, tier).expect("JIT compiles");
            fast.prepare_sparse(&plan, &[(1, b.clone())]);
            let ins = [Some(&a), Some(&b), Some(&bias)];
            let how = if op == &walk { "walk" } else { "dense" };
            let id =
                BenchmarkId::new(format!("tcc_{tier}"), format!("{m}x{k}x{n} {:.1}% zero {how}", sparsity * 100.0));
            g.bench_with_input(id, &(), |bench, _| bench.iter(|| fast.eval(op, &ins).expect("handled").unwrap()));
        }
    }
    g.finish();
}

/// One BERT-base attention head (128 query rows and keys, 64 dims; Q, K and V read from the
/// `[sequence, 768]` projections, as a model's are) in bf16 on each engine this CPU has: AMX
/// tiles, AVX-512 BF16 vectors. One thread. Throughput is counted in the two products'
/// operations. (`TCC_ATTENTION=f32 tcc bench model.tcc --profile` compares with f32 in a model.)
fn attention_bf16(c: &mut Criterion) {
    use tcc_runtime::kernels::bf16::{self, Engine, Head};
    let mut g = c.benchmark_group("attention_bf16_head_single_thread");
    let (s, d, ld) = (128usize, 64usize, 768usize);
    let x = |seed: usize| -> Vec<f32> { (0..s * ld).map(|i| ((i * 7919 + seed) % 997) as f32 / 997.0 - 0.5).collect() };
    let (q, k, v) = (x(1), x(2), x(3));
    let mut out = vec![0f32; s * d];
    g.throughput(Throughput::Elements((4 * s * s * d) as u64));
    for engine in Engine::ALL.into_iter().filter(|e| e.supported()) {
        let head = Head {
            q: q.as_ptr(),
            ldq: ld,
            k: k.as_ptr(),
            k_dim: 1,
            k_key: ld,
            v: v.as_ptr(),
            v_key: ld,
            v_col: 1,
            rows: s,
            sk: s,
            d,
            dv: d,
            out: out.as_mut_ptr(),
            ldo: d,
            nan_to_zero: false,
            row0: 0,
        };
        let mut scratch = vec![0u32; bf16::scratch_len(&head)];
        g.bench_function(format!("{} {s}x{s}x{d}", engine.name()), |b| {
            // SAFETY: the engine is supported; Q, K and V hold 128 rows of 768 floats (the
            // head reads 64 of each), `out` 128 rows of 64, the scratch the kernel's size.
            b.iter(|| unsafe { bf16::attention_head(engine, &head, None, &mut scratch) })
        });
    }
    g.finish();
}

criterion_group!(benches, gemm, gemm_int8, gemm_int8_sparse, gemm_f32_sparse, attention_bf16);
criterion_main!(benches);

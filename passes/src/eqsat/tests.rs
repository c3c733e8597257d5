use super::*;
use crate::manager::{Pass, PassContext};
use proptest::prelude::*;
use tcc_ir::op::{BinaryKind, Reduce, ReduceKind, UnaryKind};
use tcc_ir::{interp, text, Dim, Fact, Op};

fn recognize() -> EqSat {
    let mut r = rules::canonical();
    r.extend(rules::recognize());
    r.extend(rules::attention());
    EqSat::new("recognize", r, Limits::default())
}

fn input(g: &Graph, batch: usize, seed: u64) -> Vec<(String, Tensor)> {
    g.inputs
        .iter()
        .map(|&v| {
            let shape: Vec<usize> =
                g.fact(v).shape.iter().map(|d| d.as_const().map_or(batch, |c| c as usize)).collect();
            let n: usize = shape.iter().product();
            let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let data: Vec<f32> = (0..n)
                .map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((s >> 33) as f32 / (1u64 << 31) as f32) * 4.0 - 2.0
                })
                .collect();
            (g.value(v).name.clone(), Tensor::new(shape, data).unwrap())
        })
        .collect()
}

/// The largest `|a - b| / (1 + |b|)` over all outputs; NaN in the same places counts 0, NaN in
/// one only counts infinite.
fn worst(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|((_, x), (_, y))| {
            assert_eq!(x.shape(), y.shape());
            let (x, y) = (x.as_slice::<f32>().unwrap().to_vec(), y.as_slice::<f32>().unwrap().to_vec());
            x.into_iter().zip(y).map(|(p, q)| match (p.is_nan(), q.is_nan()) {
                (true, true) => 0.0,
                (false, false) => (p - q).abs() / (1.0 + q.abs()),
                _ => f32::INFINITY,
            })
        })
        .fold(0.0, f32::max)
}

/// Runs the pass and checks the result against the interpreter on the graph before it.
fn run_checked(text_form: &str) -> Graph {
    let before = text::parse(text_form).unwrap();
    let mut g = before.clone();
    recognize().run(&mut g, &mut PassContext::default()).unwrap();
    tcc_ir::verify(&g).unwrap();
    for seed in 0..3 {
        let ins = input(&before, 2, seed);
        let (want, got) = (interp::run(&before, &ins).unwrap(), interp::run(&g, &ins).unwrap());
        let err = worst(&got, &want);
        assert!(err < 1e-5, "outputs moved by {err}:\n{}", text::print(&g));
    }
    g
}

const LAYER_NORM_OPSET14: &str = r#"graph ln(%x: f32[batch, 5, 8]) {
  %g = const f32[8] [1, 0.5, 2, 1, 1, 3, 1, 0.25]
  %b = const f32[8] [0, 1, 0, -1, 0, 0, 2, 0]
  %axes = const i64[1] [-1]
  %two = const f32[] [2]
  %eps = const f32[] [1e-12]
  %mean = ReduceMean(%x, %axes) : f32[batch, 5, 1]
  %d = Sub(%x, %mean) : f32[batch, 5, 8]
  %sq = Pow(%d, %two) : f32[batch, 5, 8]
  %var = ReduceMean(%sq, %axes) : f32[batch, 5, 1]
  %ve = Add(%var, %eps) : f32[batch, 5, 1]
  %std = Sqrt(%ve) : f32[batch, 5, 1]
  %n = Div(%d, %std) : f32[batch, 5, 8]
  %s = Mul(%n, %g) : f32[batch, 5, 8]
  %y = Add(%s, %b) : f32[batch, 5, 8]
  return %y
}"#;

#[test]
fn layer_norm_from_the_opset14_decomposition() {
    let g = run_checked(LAYER_NORM_OPSET14);
    assert_eq!(g.op_counts().into_iter().collect::<Vec<_>>(), vec![("LayerNorm".to_string(), 1)]);
    insta::assert_snapshot!(text::print(&g));
}

#[test]
fn layer_norm_with_commuted_operands_and_squares_as_products() {
    // beta + gamma * (d / sqrt(eps + mean(d * d))), as another exporter might write it.
    let g = run_checked(
        r#"graph ln(%x: f32[batch, 8]) {
  %g = const f32[8] [1, 0.5, 2, 1, 1, 3, 1, 0.25]
  %b = const f32[8] [0, 1, 0, -1, 0, 0, 2, 0]
  %axes = const i64[1] [1]
  %eps = const f32[1] [1e-5]
  %mean = ReduceMean(%x, %axes) : f32[batch, 1]
  %d = Sub(%x, %mean) : f32[batch, 8]
  %sq = Mul(%d, %d) : f32[batch, 8]
  %var = ReduceMean(%sq, %axes) : f32[batch, 1]
  %ve = Add(%eps, %var) : f32[batch, 1]
  %std = Sqrt(%ve) : f32[batch, 1]
  %n = Div(%d, %std) : f32[batch, 8]
  %s = Mul(%g, %n) : f32[batch, 8]
  %y = Add(%b, %s) : f32[batch, 8]
  return %y
}"#,
    );
    assert_eq!(g.op_counts().get("LayerNorm"), Some(&1));
}

#[test]
fn normalization_over_another_axis_is_not_a_layer_norm() {
    let text_form = LAYER_NORM_OPSET14.replace("[-1]", "[1]").replace("f32[batch, 5, 1]", "f32[batch, 1, 8]");
    let g = run_checked(&text_form);
    assert_eq!(g.op_counts().get("LayerNorm"), None, "{}", text::print(&g));
}

#[test]
fn gelu_in_the_forms_exporters_write() {
    let forms = [
        // TorchScript (Hugging Face's `x * 0.5 * (1 + erf(x / sqrt 2))`).
        "%a = Div(%x, %s2) : f32[batch, 6]\n  %e = Erf(%a) : f32[batch, 6]\n  %p = Add(%e, %one) : f32[batch, 6]\n  %xh = Mul(%x, %half) : f32[batch, 6]\n  %y = Mul(%xh, %p) : f32[batch, 6]",
        // The dynamo exporter: x * (0.5 * (erf(x / sqrt 2) + 1)).
        "%a = Div(%x, %s2) : f32[batch, 6]\n  %e = Erf(%a) : f32[batch, 6]\n  %p = Add(%e, %one) : f32[batch, 6]\n  %hp = Mul(%half, %p) : f32[batch, 6]\n  %y = Mul(%x, %hp) : f32[batch, 6]",
        // x * (1 + erf(x * (1 / sqrt 2))) * 0.5.
        "%a = Mul(%x, %r2) : f32[batch, 6]\n  %e = Erf(%a) : f32[batch, 6]\n  %p = Add(%one, %e) : f32[batch, 6]\n  %xp = Mul(%x, %p) : f32[batch, 6]\n  %y = Mul(%xp, %half) : f32[batch, 6]",
        // The tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
        "%c = Pow(%x, %three) : f32[batch, 6]\n  %kc = Mul(%k, %c) : f32[batch, 6]\n  %in = Add(%x, %kc) : f32[batch, 6]\n  %sin = Mul(%sp, %in) : f32[batch, 6]\n  %t = Tanh(%sin) : f32[batch, 6]\n  %p = Add(%one, %t) : f32[batch, 6]\n  %hx = Mul(%half, %x) : f32[batch, 6]\n  %y = Mul(%hx, %p) : f32[batch, 6]",
    ];
    for body in forms {
        let g = run_checked(&format!(
            "graph gelu(%x: f32[batch, 6]) {{\n  %s2 = const f32[] [1.4142135]\n  %r2 = const f32[] [0.70710677]\n  %one = const f32[] [1]\n  %half = const f32[] [0.5]\n  %three = const f32[] [3]\n  %k = const f32[] [0.044715]\n  %sp = const f32[] [0.7978846]\n  {body}\n  return %y\n}}"
        ));
        assert_eq!(g.op_counts().into_iter().collect::<Vec<_>>(), vec![("Gelu".to_string(), 1)], "{body}");
    }
}

#[test]
fn a_near_miss_constant_is_not_gelu() {
    let g = run_checked(
        "graph g(%x: f32[batch, 6]) {\n  %s2 = const f32[] [1.5]\n  %one = const f32[] [1]\n  %half = const f32[] [0.5]\n  %a = Div(%x, %s2) : f32[batch, 6]\n  %e = Erf(%a) : f32[batch, 6]\n  %p = Add(%e, %one) : f32[batch, 6]\n  %xh = Mul(%x, %half) : f32[batch, 6]\n  %y = Mul(%xh, %p) : f32[batch, 6]\n  return %y\n}",
    );
    assert_eq!(g.op_counts().get("Gelu"), None);
}

#[test]
fn common_subexpressions_merge() {
    let g = run_checked(
        "graph g(%x: f32[batch, 4]) {\n  %a = Erf(%x) : f32[batch, 4]\n  %b = Erf(%x) : f32[batch, 4]\n  %y = Add(%a, %b) : f32[batch, 4]\n  return %y\n}",
    );
    assert_eq!(g.op_counts().get("Erf"), Some(&1));
}

/// Random graphs of the ops the rules touch, with layer norms and GELUs in their decomposed
/// forms mixed in: the pass never changes what a graph computes.
fn random_graph(ops: &[(u8, u8, u8)]) -> Graph {
    let mut g = Graph::new("random");
    let x =
        g.add_input("x", Fact::new(tcc_ir::DType::F32, vec![Dim::sym("batch"), Dim::from(3usize), Dim::from(8usize)]));
    let scalar = |g: &mut Graph, v: f32| g.add_const(format!("c{v}"), Tensor::new(vec![], vec![v]).unwrap());
    let axes = g.add_const("axes", Tensor::new(vec![1], vec![-1i64]).unwrap());
    let mut vals = vec![x];
    let bin = |k| Op::from(tcc_ir::op::Binary::new(k));
    let un = |k| Op::from(tcc_ir::op::Unary::new(k));
    for (i, &(kind, a, b)) in ops.iter().enumerate() {
        let (p, q) = (vals[a as usize % vals.len()], vals[b as usize % vals.len()]);
        let name = format!("n{i}");
        let v = match kind % 10 {
            0 => g.add1(bin(BinaryKind::Add), &[p, q], name),
            1 => g.add1(bin(BinaryKind::Mul), &[p, q], name),
            2 => g.add1(bin(BinaryKind::Sub), &[p, q], name),
            3 => {
                let c = scalar(&mut g, 1.0 + b as f32 / 16.0);
                g.add1(bin(BinaryKind::Div), &[p, c], name)
            }
            4 => {
                let two = scalar(&mut g, 2.0);
                g.add1(bin(BinaryKind::Pow), &[p, two], name)
            }
            5 => g.add1(un(UnaryKind::Erf), &[p], name),
            6 => g.add1(
                Reduce { kind: ReduceKind::ReduceMean, keepdims: true, noop_with_empty_axes: false },
                &[p, axes],
                name,
            ),
            9 => {
                // A scaled operand of a product (what `matmul-scaled-*` moves).
                if g.fact(p).shape.last() != Some(&Dim::from(8usize)) {
                    vals.push(p);
                    continue;
                }
                let c = scalar(&mut g, 0.25 + b as f32 / 8.0);
                let w = g.add_const(
                    "w",
                    Tensor::new(vec![8, 8], (0..64).map(|i| ((i * 7) % 11) as f32 / 11.0 - 0.5).collect()).unwrap(),
                );
                let mm = Op::from(tcc_ir::op::MatMul {});
                if a % 2 == 0 {
                    let sp = g.add1(bin(BinaryKind::Mul), &[p, c], format!("{name}.s")).unwrap();
                    g.add1(mm, &[sp, w], name)
                } else {
                    let sw = g.add1(bin(BinaryKind::Mul), &[c, w], format!("{name}.s")).unwrap();
                    g.add1(mm, &[p, sw], name)
                }
            }
            7 => {
                // GELU, erf form.
                let (s2, one, half) =
                    (scalar(&mut g, std::f32::consts::SQRT_2), scalar(&mut g, 1.0), scalar(&mut g, 0.5));
                let a = g.add1(bin(BinaryKind::Div), &[p, s2], format!("{name}.a")).unwrap();
                let e = g.add1(un(UnaryKind::Erf), &[a], format!("{name}.e")).unwrap();
                let s = g.add1(bin(BinaryKind::Add), &[e, one], format!("{name}.s")).unwrap();
                let h = g.add1(bin(BinaryKind::Mul), &[p, half], format!("{name}.h")).unwrap();
                g.add1(bin(BinaryKind::Mul), &[h, s], name)
            }
            _ => {
                // Layer norm over the last axis (when `p` has 8 columns).
                if g.fact(p).shape.last() != Some(&Dim::from(8usize)) {
                    vals.push(p);
                    continue;
                }
                let (two, eps) = (scalar(&mut g, 2.0), scalar(&mut g, 1e-5));
                let gamma =
                    g.add_const("gamma", Tensor::new(vec![8], (0..8).map(|i| 0.5 + i as f32 / 8.0).collect()).unwrap());
                let red = || Reduce { kind: ReduceKind::ReduceMean, keepdims: true, noop_with_empty_axes: false };
                let m = g.add1(red(), &[p, axes], format!("{name}.m")).unwrap();
                let d = g.add1(bin(BinaryKind::Sub), &[p, m], format!("{name}.d")).unwrap();
                let sq = g.add1(bin(BinaryKind::Pow), &[d, two], format!("{name}.sq")).unwrap();
                let var = g.add1(red(), &[sq, axes], format!("{name}.v")).unwrap();
                let ve = g.add1(bin(BinaryKind::Add), &[var, eps], format!("{name}.ve")).unwrap();
                let sd = g.add1(un(UnaryKind::Sqrt), &[ve], format!("{name}.sd")).unwrap();
                let n = g.add1(bin(BinaryKind::Div), &[d, sd], format!("{name}.n")).unwrap();
                let s = g.add1(bin(BinaryKind::Mul), &[n, gamma], format!("{name}.s")).unwrap();
                g.add1(bin(BinaryKind::Add), &[s, gamma], name)
            }
        };
        vals.push(v.unwrap());
    }
    let last = *vals.last().unwrap();
    g.add_output("y", last);
    if vals.len() > 2 {
        g.add_output("z", vals[vals.len() / 2]);
    }
    g
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]
    #[test]
    fn rewrites_keep_what_random_graphs_compute(ops in proptest::collection::vec((0u8..10, 0u8..16, 0u8..16), 1..12)) {
        let before = random_graph(&ops);
        tcc_ir::verify(&before).unwrap();
        let mut g = before.clone();
        recognize().run(&mut g, &mut PassContext::default()).unwrap();
        tcc_ir::verify(&g).unwrap();
        for seed in 0..2 {
            let ins = input(&before, 2, seed);
            let (want, got) = (interp::run(&before, &ins).unwrap(), interp::run(&g, &ins).unwrap());
            let err = worst(&got, &want);
            prop_assert!(err < 1e-4, "outputs moved by {}:\n{}\nafter:\n{}", err, text::print(&before), text::print(&g));
        }
    }
}

/// PyTorch's SDPA as the dynamo exporter writes it: Q and K each scaled by `d^-1/4`, `Kᵀ`
/// through merged heads, NaN rows zeroed after the softmax. After `recognize`, the fusion
/// passes make it one `Attention`.
#[test]
fn sdpa_attention_becomes_one_attention_op() {
    let before = text::parse(
        r#"graph sdpa(%q: f32[batch, 2, 5, 4], %k: f32[batch, 2, 5, 4], %v: f32[batch, 2, 5, 4], %mask: f32[batch, 1, 5, 5]) {
  %c = const f32[] [0.70710677]
  %zero = const f32[] [0]
  %s1 = const i64[3] [-1, 5, 4]
  %s2 = DimValue{dims=["batch",2,4,5], scalar=false}() : i64[4]
  %qs = Mul(%q, %c) : f32[batch, 2, 5, 4]
  %r1 = Reshape(%k, %s1) : f32[2*batch, 5, 4]
  %t = Transpose{perm=[0,2,1]}(%r1) : f32[2*batch, 4, 5]
  %kt = Reshape(%t, %s2) : f32[batch, 2, 4, 5]
  %ks = Mul(%kt, %c) : f32[batch, 2, 4, 5]
  %sc = MatMul(%qs, %ks) : f32[batch, 2, 5, 5]
  %sm = Add(%sc, %mask) : f32[batch, 2, 5, 5]
  %p = Softmax(%sm) : f32[batch, 2, 5, 5]
  %n = IsNaN(%p) : bool[batch, 2, 5, 5]
  %pz = Where(%n, %zero, %p) : f32[batch, 2, 5, 5]
  %y = MatMul(%pz, %v) : f32[batch, 2, 5, 4]
  return %y
}"#,
    )
    .unwrap();
    let mut g = before.clone();
    let registry = crate::Registry::builtin();
    let pipeline = crate::Pipeline::parse("recognize,fuse-matmul,fuse-attention,dce", &registry).unwrap();
    crate::PassManager::new(&pipeline, &registry).unwrap().run(&mut g, &mut PassContext::default()).unwrap();
    assert_eq!(g.op_counts().get("Attention"), Some(&1), "{}", text::print(&g));
    assert_eq!(g.nodes.len(), 1, "{}", text::print(&g));
    for seed in 0..3 {
        let mut ins = input(&before, 2, seed);
        // A query whose keys are all masked: SDPA gives zeros there, not NaN.
        if seed == 2 {
            let m = &mut ins[3].1;
            let mut vals = m.as_slice::<f32>().unwrap().to_vec();
            vals[..5].fill(f32::NEG_INFINITY);
            *m = Tensor::new(m.shape().to_vec(), vals).unwrap();
        }
        let (want, got) = (interp::run(&before, &ins).unwrap(), interp::run(&g, &ins).unwrap());
        assert!(worst(&got, &want) < 1e-5);
    }
}

/// The cost model: a rewrite that is not cheaper leaves the graph as it was (original nodes
/// win ties); a scaling moves after a product, where the epilogue runs it for almost nothing;
/// a recognized structure beats its decomposition.
#[test]
fn the_cost_model_ranks_rewrites() {
    let g0 = "graph g(%x: f32[3, 8], %w: f32[8, 4]) {\n  %c = const f32[] [0.5]\n  %s = Mul(%x, %c) : f32[3, 8]\n  %y = MatMul(%s, %w) : f32[3, 4]\n  return %y\n}";
    let run = |rules: Vec<egg::Rewrite<Tl, TlAnalysis>>| {
        let mut g = text::parse(g0).unwrap();
        let out = EqSat::new("t", rules, Limits::default()).run(&mut g, &mut PassContext::default()).unwrap();
        (g, out)
    };
    // Commutativity alone: every order costs the same, nothing changes.
    let (g, out) = run(vec![rules::rule("mul-comm", "(Mul ?a ?b)", "(Mul ?b ?a)")]);
    assert_eq!(out.stats.get("nodes_added"), Some(&0));
    assert_eq!(text::print(&g), text::print(&text::parse(g0).unwrap()));
    // The scaling moves onto the product.
    let (g, _) = run(rules::attention());
    let ops: Vec<&str> = g.nodes.iter().map(|n| n.op.name()).collect();
    assert_eq!(ops, ["MatMul", "Mul"]);
    // Also when the scores are much larger than Q (a static 512-token export, head dim 64).
    let mut g = text::parse("graph g(%q: f32[1, 12, 512, 64], %k: f32[1, 12, 64, 512]) {\n  %c = const f32[] [0.125]\n  %s = Mul(%q, %c) : f32[1, 12, 512, 64]\n  %y = MatMul(%s, %k) : f32[1, 12, 512, 512]\n  return %y\n}").unwrap();
    EqSat::new("t", rules::attention(), Limits::default()).run(&mut g, &mut PassContext::default()).unwrap();
    let ops: Vec<&str> = g.nodes.iter().map(|n| n.op.name()).collect();
    assert_eq!(ops, ["MatMul", "Mul"]);
    // Costs as documented.
    use cost::CostModel;
    assert!(CostModel::node_cost("LayerNorm") < CostModel::node_cost("Add"));
    assert!(CostModel::node_cost("Reshape") < CostModel::node_cost("Transpose"));
}

/// A QDQ pair with one scale and zero point is one `FakeQuant` (bit-exact); a pair whose
/// parameters differ is not one.
#[test]
fn qdq_pairs_become_fake_quant() {
    let qdq = |s2: &str| {
        format!(
            "graph q(%x: f32[batch, 6]) {{\n  %s = const f32[] [0.02]\n  %s2 = const f32[] [{s2}]\n  %z = const u8[] [128]\n  %q = QuantizeLinear(%x, %s, %z) : u8[batch, 6]\n  %y = DequantizeLinear(%q, %s2, %z) : f32[batch, 6]\n  return %y\n}}"
        )
    };
    for (s2, want) in [("0.02", vec!["FakeQuant"]), ("0.03", vec!["QuantizeLinear", "DequantizeLinear"])] {
        let before = text::parse(&qdq(s2)).unwrap();
        let mut g = before.clone();
        let mut r = rules::canonical();
        r.extend(rules::fake_quant());
        EqSat::new("fq", r, Limits::default()).run(&mut g, &mut PassContext::default()).unwrap();
        let ops: Vec<&str> = g.nodes.iter().map(|n| n.op.name()).collect();
        assert_eq!(ops, want);
        let ins = input(&before, 3, 1);
        let (a, b) = (interp::run(&before, &ins).unwrap(), interp::run(&g, &ins).unwrap());
        assert!(a[0].1.bit_eq(&b[0].1));
    }
}

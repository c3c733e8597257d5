//! Rewrite rules and the helpers to write them.
//!
//! A rule is an `egg::Rewrite<Tl, TlAnalysis>`. Three helpers cover what tcc's rules need:
//! - [`rule`]`(name, lhs, rhs)`: a pattern rewrite, `"(Mul ?a ?b)" => "(Mul ?b ?a)"`;
//! - [`rule_if`]`(name, lhs, rhs, condition)`: the same when a [`Cond`] on the match holds
//!   (a variable is a given scalar, is the last axis...);
//! - [`op_rule`]`(name, lhs, build)`: the right-hand side is an op built by code from the
//!   match (a `LayerNorm` with the matched epsilon), so attributes need no pattern syntax;
//! - [`variants`]`(name, alternatives)`: every e-node of an op, whatever its arity, gets other
//!   ops on the same children (the same op with another attribute: a weight format), which
//!   only the cost model tells apart.
//!
//! Guidance for rule authors: rules here are **directional** and their right-hand side is
//! **never worse** than the left under the cost model ([`super::cost`]): extraction picks the
//! cheapest term, so a rule that only adds alternatives can never make a model slower, but a
//! rule whose right side does not type-check or is not equivalent makes it wrong. State every
//! assumption of the right-hand side as a condition (shapes broadcast the same way, constants
//! have the value the formula needs); the property test in `tests.rs` runs rules on random
//! graphs against the reference interpreter.

use super::lang::{OpSym, Scalar, Tl, TlAnalysis, TlGraph};
use egg::{Applier, Id, Pattern, PatternAst, Rewrite, SearchMatches, Searcher, Subst, Symbol, Var};
use std::sync::Arc;
use tcc_ir::op::{FusedMatMul, Gelu, GeluApprox, LayerNorm, WeightFormat};
use tcc_ir::{Dim, Op};

/// A condition on a match.
pub type Cond = Arc<dyn Fn(&TlGraph, &Subst) -> bool + Send + Sync>;

fn pattern(s: &str) -> Pattern<Tl> {
    match s.parse() {
        Ok(p) => p,
        Err(e) => panic!("bad pattern `{s}`: {e}"),
    }
}

/// `lhs => rhs`.
pub fn rule(name: &str, lhs: &str, rhs: &str) -> Rewrite<Tl, TlAnalysis> {
    match Rewrite::new(name, pattern(lhs), pattern(rhs)) {
        Ok(r) => r,
        Err(e) => panic!("bad rule `{name}`: {e}"),
    }
}

/// `lhs => rhs` when `cond` holds.
pub fn rule_if(name: &str, lhs: &str, rhs: &str, cond: Cond) -> Rewrite<Tl, TlAnalysis> {
    let applier = Checked { cond, then: pattern(rhs) };
    match Rewrite::new(name, pattern(lhs), applier) {
        Ok(r) => r,
        Err(e) => panic!("bad rule `{name}`: {e}"),
    }
}

/// `lhs => op(children)` where `build` makes the op and names its children from the match
/// (or declines with `None`).
pub fn op_rule(
    name: &str,
    lhs: &str,
    build: impl Fn(&TlGraph, &Subst) -> Option<(Op, Vec<Var>)> + Send + Sync + 'static,
) -> Rewrite<Tl, TlAnalysis> {
    match Rewrite::new(name, pattern(lhs), BuildOp(Arc::new(build))) {
        Ok(r) => r,
        Err(e) => panic!("bad rule `{name}`: {e}"),
    }
}

struct Checked {
    cond: Cond,
    then: Pattern<Tl>,
}

impl Applier<Tl, TlAnalysis> for Checked {
    fn apply_one(
        &self,
        egraph: &mut TlGraph,
        eclass: Id,
        subst: &Subst,
        ast: Option<&PatternAst<Tl>>,
        rule: Symbol,
    ) -> Vec<Id> {
        if (self.cond)(egraph, subst) {
            self.then.apply_one(egraph, eclass, subst, ast, rule)
        } else {
            vec![]
        }
    }
}

type Build = Arc<dyn Fn(&TlGraph, &Subst) -> Option<(Op, Vec<Var>)> + Send + Sync>;

struct BuildOp(Build);

impl Applier<Tl, TlAnalysis> for BuildOp {
    fn apply_one(
        &self,
        egraph: &mut TlGraph,
        eclass: Id,
        subst: &Subst,
        _: Option<&PatternAst<Tl>>,
        _: Symbol,
    ) -> Vec<Id> {
        let Some((op, vars)) = (self.0)(egraph, subst) else { return vec![] };
        let children: Vec<Id> = vars.iter().map(|v| subst[*v]).collect();
        let id = egraph.add(Tl::Op(OpSym::of(&op), children));
        if egraph.union(eclass, id) {
            vec![id]
        } else {
            vec![]
        }
    }
}

type Alternatives = Arc<dyn Fn(&TlGraph, &Op, &[Id]) -> Vec<Op> + Send + Sync>;

/// Every e-node `Op(op, children)` gets `alternatives(op, children)` on the same children, in
/// its e-class: ops that compute what `op` computes, which the cost model tells apart (a
/// product's weight format), for ops of any arity, which a pattern cannot say.
/// `alternatives` must be equivalent to `op` whatever the children are.
pub fn variants(
    name: &str,
    alternatives: impl Fn(&TlGraph, &Op, &[Id]) -> Vec<Op> + Send + Sync + 'static,
) -> Rewrite<Tl, TlAnalysis> {
    let alternatives: Alternatives = Arc::new(alternatives);
    match Rewrite::new(name, Variants(alternatives.clone()), Variants(alternatives)) {
        Ok(r) => r,
        Err(e) => panic!("bad rule `{name}`: {e}"),
    }
}

struct Variants(Alternatives);

impl Variants {
    /// The e-nodes of `eclass` with the alternatives it does not hold yet.
    fn missing(&self, egraph: &TlGraph, eclass: Id) -> Vec<Tl> {
        let class = egraph.find(eclass);
        let mut out = Vec::new();
        for node in &egraph[eclass].nodes {
            let Tl::Op(sym, children) = node else { continue };
            for op in (self.0)(egraph, &sym.op(), children) {
                let alt = Tl::Op(OpSym::of(&op), children.clone());
                if egraph.lookup(alt.clone()).map(|c| egraph.find(c)) != Some(class) && !out.contains(&alt) {
                    out.push(alt);
                }
            }
        }
        out
    }
}

impl Searcher<Tl, TlAnalysis> for Variants {
    fn search_eclass_with_limit(&self, egraph: &TlGraph, eclass: Id, limit: usize) -> Option<SearchMatches<'_, Tl>> {
        (limit > 0 && !self.missing(egraph, eclass).is_empty()).then(|| SearchMatches {
            eclass,
            substs: vec![Subst::default()],
            ast: None,
        })
    }

    fn vars(&self) -> Vec<Var> {
        vec![]
    }
}

impl Applier<Tl, TlAnalysis> for Variants {
    fn apply_one(&self, egraph: &mut TlGraph, eclass: Id, _: &Subst, _: Option<&PatternAst<Tl>>, _: Symbol) -> Vec<Id> {
        let mut changed = Vec::new();
        for alt in self.missing(egraph, eclass) {
            let id = egraph.add(alt);
            if egraph.union(eclass, id) {
                changed.push(id);
            }
        }
        changed
    }
}

/// `?name` as a pattern variable.
pub fn var(name: &str) -> Var {
    match name.parse() {
        Ok(v) => v,
        Err(e) => panic!("bad variable `{name}`: {e}"),
    }
}

/// The scalar value of a matched e-class (a one-element `f32` constant).
pub fn scalar_of(egraph: &TlGraph, subst: &Subst, v: Var) -> Option<f32> {
    egraph[subst[v]].data.scalar
}

/// The rank of a matched e-class.
pub fn rank_of(egraph: &TlGraph, subst: &Subst, v: Var) -> Option<usize> {
    egraph[subst[v]].data.fact.as_ref().map(|f| f.rank())
}

/// Whether the matched `v` has no more dims than `x` (a constant no wider than the tensor it
/// combines with leaves the result's shape that tensor's).
pub fn no_wider(egraph: &TlGraph, subst: &Subst, v: Var, x: Var) -> bool {
    rank_of(egraph, subst, v).zip(rank_of(egraph, subst, x)).is_some_and(|(a, b)| a <= b)
}

/// `?v` is a scalar within `rel` of `want`, and no wider than `?other` (so that using it in a
/// broadcast does not change the result's rank).
pub fn is_scalar(v: &str, want: f32, rel: f32, other: &str) -> Cond {
    let (v, other) = (var(v), var(other));
    Arc::new(move |eg, s| {
        let close = scalar_of(eg, s, v).is_some_and(|x| (x - want).abs() <= rel * want.abs().max(f32::MIN_POSITIVE));
        close && no_wider(eg, s, v, other)
    })
}

/// `?axes` is a constant naming only the last axis of `?x`.
fn is_last_axis(eg: &TlGraph, s: &Subst, axes: Var, x: Var) -> bool {
    let Some(rank) = rank_of(eg, s, x) else { return false };
    let Some(f) = eg[s[axes]].data.fact.as_ref() else { return false };
    let Some(vals) = f.value.as_ref().and_then(|v| v.as_consts()) else { return false };
    vals.len() == 1 && (vals[0] == -1 || vals[0] == rank as i64 - 1)
}

/// `?p` is a vector the size of `?x`'s last dim (or broadcasts to it as one).
fn is_channel_vector(eg: &TlGraph, s: &Subst, p: Var, x: Var) -> bool {
    let (Some(fp), Some(fx)) = (eg[s[p]].data.fact.as_ref(), eg[s[x]].data.fact.as_ref()) else { return false };
    let Some(last) = fx.shape.last() else { return false };
    fp.dtype == tcc_ir::DType::F32
        && !fp.shape.is_empty()
        && fp.shape.last() == Some(last)
        && fp.shape[..fp.shape.len() - 1].iter().all(|d| *d == Dim::from(1usize))
}

/// The built-in rule packs by name, for pipelines (`eqsat{packs=canonical+recognize}`).
pub const PACKS: &[&str] = &["canonical", "recognize", "attention", "fake-quant", "formats"];

/// A built-in rule pack by name.
pub fn pack(name: &str) -> Option<Vec<Rewrite<Tl, TlAnalysis>>> {
    match name {
        "canonical" => Some(canonical()),
        "recognize" => Some(recognize()),
        "attention" => Some(attention()),
        "fake-quant" => Some(fake_quant()),
        "formats" => Some(formats()),
        _ => None,
    }
}

/// Canonical forms that make the recognition patterns few: `x^2` as `x*x`, division by a
/// constant as a product with its reciprocal, commutativity of `Add` and `Mul` (both
/// broadcast symmetrically, so the result is the same tensor).
pub fn canonical() -> Vec<Rewrite<Tl, TlAnalysis>> {
    vec![
        rule("add-comm", "(Add ?a ?b)", "(Add ?b ?a)"),
        rule("mul-comm", "(Mul ?a ?b)", "(Mul ?b ?a)"),
        rule_if("pow-2", "(Pow ?a ?two)", "(Mul ?a ?a)", is_scalar("?two", 2.0, 0.0, "?a")),
        {
            let (a, c) = (var("?a"), var("?c"));
            let div = move |eg: &TlGraph, s: &Subst| -> Option<f32> {
                let k = scalar_of(eg, s, c)?;
                let ok = k.is_normal() && (1.0 / k).is_normal() && rank_of(eg, s, c)? <= rank_of(eg, s, a)?;
                ok.then_some(1.0 / k)
            };
            Rewrite::new("div-const", pattern("(Div ?a ?c)"), MulByScalar { a, f: Arc::new(div) })
                .unwrap_or_else(|e| panic!("div-const: {e}"))
        },
    ]
}

/// A scalar computed from a match (or `None`: the rule does not apply).
type ScalarOf = Arc<dyn Fn(&TlGraph, &Subst) -> Option<f32> + Send + Sync>;

/// `?a * k` for a scalar `k` computed from the match.
struct MulByScalar {
    a: Var,
    f: ScalarOf,
}

impl Applier<Tl, TlAnalysis> for MulByScalar {
    fn apply_one(
        &self,
        egraph: &mut TlGraph,
        eclass: Id,
        subst: &Subst,
        _: Option<&PatternAst<Tl>>,
        _: Symbol,
    ) -> Vec<Id> {
        let Some(k) = (self.f)(egraph, subst) else { return vec![] };
        let a = subst[self.a];
        let k = egraph.add(Tl::Scalar(Scalar::new(k)));
        let mul = match "Mul".parse::<OpSym>() {
            Ok(m) => m,
            Err(e) => unreachable!("Mul is an op: {e}"),
        };
        let id = egraph.add(Tl::Op(mul, vec![a, k]));
        if egraph.union(eclass, id) {
            vec![id]
        } else {
            vec![]
        }
    }
}

/// Transformer structures as the fused ops the runtime has kernels for: `LayerNorm` from its
/// decompositions, `Gelu` from its erf and tanh forms. Run with [`canonical`] (and
/// [`attention`], as the `recognize` pass does).
pub fn recognize() -> Vec<Rewrite<Tl, TlAnalysis>> {
    // LayerNorm: (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) * gamma + beta, over the
    // last axis (`Pow(d, 2)` reaches this form through `pow-2`).
    let d = "(Sub ?x (ReduceMean ?x ?a1))";
    let layer_norm = format!("(Add (Mul (Div {d} (Sqrt (Add (ReduceMean (Mul {d} {d}) ?a2) ?eps))) ?g) ?b)");
    let ln = {
        let (x, a1, a2, eps, g, b) = (var("?x"), var("?a1"), var("?a2"), var("?eps"), var("?g"), var("?b"));
        op_rule("layer-norm", &layer_norm, move |eg, s| {
            let epsilon = scalar_of(eg, s, eps)?;
            let ok = is_last_axis(eg, s, a1, x)
                && is_last_axis(eg, s, a2, x)
                && no_wider(eg, s, eps, x)
                && is_channel_vector(eg, s, g, x)
                && is_channel_vector(eg, s, b, x)
                && epsilon >= 0.0;
            ok.then(|| (Op::from(LayerNorm { axis: -1, epsilon }), vec![x, g, b]))
        })
    };
    // GELU, erf form: x * 0.5 * (1 + erf(x / sqrt 2)), in the associations exporters write
    // (division by sqrt 2 reaches the product form through `div-const`).
    let erf = "(Add (Erf (Mul ?x ?r)) ?one)";
    let gelu_erf = |name: &str, lhs: String| {
        let (x, r, one, h) = (var("?x"), var("?r"), var("?one"), var("?h"));
        op_rule(name, &lhs, move |eg, s| {
            let near = |v: Var, want: f32| scalar_of(eg, s, v).is_some_and(|k| (k - want).abs() <= 1e-6 * want.abs());
            let narrow = [r, one, h].iter().all(|v| no_wider(eg, s, *v, x));
            let ok = near(r, std::f32::consts::FRAC_1_SQRT_2) && near(one, 1.0) && near(h, 0.5) && narrow;
            ok.then(|| (Op::from(Gelu { approximate: GeluApprox::None }), vec![x]))
        })
    };
    // GELU, tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    let gelu_tanh = {
        let (x, h, one, s2, k, three) = (var("?x"), var("?h"), var("?one"), var("?s"), var("?k"), var("?three"));
        let lhs = "(Mul (Mul ?x ?h) (Add (Tanh (Mul (Add ?x (Mul (Pow ?x ?three) ?k)) ?s)) ?one))";
        op_rule("gelu-tanh", lhs, move |eg, s| {
            let near = |v: Var, want: f32| scalar_of(eg, s, v).is_some_and(|c| (c - want).abs() <= 1e-5 * want.abs());
            let narrow = [h, one, s2, k, three].iter().all(|v| no_wider(eg, s, *v, x));
            let ok = narrow
                && near(h, 0.5)
                && near(one, 1.0)
                && near(s2, (2.0 / std::f64::consts::PI).sqrt() as f32)
                && near(k, 0.044715)
                && near(three, 3.0);
            ok.then(|| (Op::from(Gelu { approximate: GeluApprox::Tanh }), vec![x]))
        })
    };
    vec![
        ln,
        gelu_erf("gelu-erf", format!("(Mul (Mul ?x ?h) {erf})")),
        gelu_erf("gelu-erf-2", format!("(Mul ?x (Mul ?h {erf}))")),
        gelu_erf("gelu-erf-3", format!("(Mul (Mul ?x {erf}) ?h)")),
        gelu_tanh,
    ]
}

/// What makes the attention of any exporter look like `MatMul -> (scale, mask) -> Softmax ->
/// MatMul` over transposed Q, K and V, which `fuse-matmul` and `fuse-attention` then fuse:
/// - scalings of the operands move after the product (PyTorch's SDPA scales Q and K by
///   `d^-1/4` each): `(a c) b = (a b) c` for a scalar `c`;
/// - `Kᵀ` written as merge-heads `Reshape`, 3-D `Transpose`, split-heads `Reshape` is one 4-D
///   `Transpose`;
/// - SDPA's `Where(IsNaN(p), 0, p)` after the softmax is the softmax that maps NaN to 0.
pub fn attention() -> Vec<Rewrite<Tl, TlAnalysis>> {
    // A scalar no wider than either operand, both at least matrices: the product then has
    // the rank of the wider operand, which the scalar does not exceed.
    let scalar_no_wider = |c: &str, _: &str| -> Cond {
        let (c, a, b) = (var(c), var("?a"), var("?b"));
        Arc::new(move |eg, s| {
            let (rc, ra, rb) = (rank_of(eg, s, c), rank_of(eg, s, a), rank_of(eg, s, b));
            scalar_of(eg, s, c).is_some()
                && rc.zip(ra.zip(rb)).is_some_and(|(rc, (ra, rb))| ra >= 2 && rb >= 2 && rc <= ra.min(rb))
        })
    };
    let kt = {
        let (x, s1, s2) = (var("?x"), var("?s1"), var("?s2"));
        op_rule(
            "transpose-via-merged-heads",
            "(Reshape (Transpose{perm=[0,2,1]} (Reshape ?x ?s1)) ?s2)",
            move |eg, s| {
                let dims = |v: Var| -> Option<Vec<Dim>> {
                    eg[s[v]].data.fact.as_ref().and_then(|f| f.value.as_ref()).map(|t| t.data.clone())
                };
                let xs = eg[s[x]].data.fact.as_ref()?.shape.clone();
                let (d1, d2) = (dims(s1)?, dims(s2)?);
                let merged_leading = xs.len() == 4
                    && d1.len() == 3
                    && d1[1..] == xs[2..]
                    && (d1[0] == Dim::from(-1i64) || d1[0] == xs[0].mul(&xs[1]));
                let split_back = d2 == [xs[0].clone(), xs[1].clone(), xs[3].clone(), xs[2].clone()];
                (merged_leading && split_back)
                    .then(|| (Op::from(tcc_ir::op::Transpose { perm: Some(vec![0, 1, 3, 2]) }), vec![x]))
            },
        )
    };
    let nan_to_zero = {
        let (x, z) = (var("?x"), var("?z"));
        op_rule("softmax-nan-to-zero", "(Where (IsNaN (Softmax ?x)) ?z (Softmax ?x))", move |eg, s| {
            let zero = scalar_of(eg, s, z) == Some(0.0) && no_wider(eg, s, z, x);
            zero.then(|| (Op::from(tcc_ir::op::Softmax { axis: -1, log: false, nan_to_zero: true }), vec![x]))
        })
    };
    vec![
        rule_if("matmul-scaled-a", "(MatMul (Mul ?a ?c) ?b)", "(Mul (MatMul ?a ?b) ?c)", scalar_no_wider("?c", "?a")),
        rule_if("matmul-scaled-b", "(MatMul ?a (Mul ?b ?c))", "(Mul (MatMul ?a ?b) ?c)", scalar_no_wider("?c", "?b")),
        kt,
        nan_to_zero,
    ]
}

/// The value of a one-element integer constant (a zero point) and its type.
fn int_scalar_of(eg: &TlGraph, s: &Subst, v: Var) -> Option<(i64, tcc_ir::DType)> {
    let f = eg[s[v]].data.fact.as_ref()?;
    let vals = f.value.as_ref()?.as_consts()?;
    (vals.len() == 1).then(|| (vals[0], f.dtype))
}

/// Fake quantization as one op: `DequantizeLinear(QuantizeLinear(x, s, z), s, z)` with the same
/// per-tensor scale and zero point is [`FakeQuant`](tcc_ir::op::FakeQuant), which
/// `fuse-matmul` runs in a product's epilogue and `fuse-attention` on the probabilities, so
/// QDQ models get the same fused structures as float ones (bit-exact with the two ops).
pub fn fake_quant() -> Vec<Rewrite<Tl, TlAnalysis>> {
    let (x, sc, z, sc2, z2) = (var("?x"), var("?s"), var("?z"), var("?s2"), var("?z2"));
    vec![op_rule("qdq-fake-quant", "(DequantizeLinear (QuantizeLinear ?x ?s ?z) ?s2 ?z2)", move |eg, s| {
        let (scale, scale2) = (scalar_of(eg, s, sc)?, scalar_of(eg, s, sc2)?);
        let ((zp, dt), (zp2, dt2)) = (int_scalar_of(eg, s, z)?, int_scalar_of(eg, s, z2)?);
        let (lo, hi) = match dt {
            tcc_ir::DType::U8 => (0, 255),
            tcc_ir::DType::I8 => (-128, 127),
            _ => return None,
        };
        let narrow = [sc, z, sc2, z2].iter().all(|v| no_wider(eg, s, *v, x));
        let same = scale.to_bits() == scale2.to_bits() && zp == zp2 && dt == dt2;
        let op = tcc_ir::op::FakeQuant { scale, zero_point: zp, lo, hi };
        // The op's own checks (a positive finite scale, the zero point in range).
        let valid = Op::from_name("FakeQuant", serde_json::to_value(op).ok()?).is_ok();
        (narrow && same && valid).then(|| (Op::from(op), vec![x]))
    })]
}

/// Weight formats: every product by packed constant weights may read them in each
/// [`WeightFormat`] (dense panels, or a walk over the 64x32 blocks that are not all zero),
/// which compute the same; the cost model prices each by the share of its weights' blocks that
/// are zero ([`super::cost`]), so extraction picks per product. The `formats` pass, which
/// `tcc build` runs last.
pub fn formats() -> Vec<Rewrite<Tl, TlAnalysis>> {
    vec![variants("weight-format", |eg, op, children| match op {
        Op::FusedMatMul(f) if f.packed.is_some() && children.get(1).is_some_and(|&w| weight_leaf(eg, w).is_some()) => {
            WeightFormat::ALL
                .into_iter()
                .filter(|&w| f.weights != Some(w))
                .map(|w| FusedMatMul { weights: Some(w), ..f.clone() }.into())
                .collect()
        }
        _ => vec![],
    })]
}

/// The weights (a leaf whose zero blocks the analysis counted) an e-class is, if any.
pub fn weight_leaf(egraph: &TlGraph, c: Id) -> Option<tcc_ir::ValueId> {
    egraph[c].nodes.iter().find_map(|n| match n {
        Tl::Leaf(super::lang::Leaf::Value(v)) if egraph.analysis.zero_blocks.contains_key(v) => {
            Some(tcc_ir::ValueId(*v))
        }
        _ => None,
    })
}

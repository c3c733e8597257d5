//! `fuse-matmul`: a matrix product with what surrounds it becomes one `FusedMatMul`.
//!
//! For each `MatMul`:
//! - constant 2-D weights are packed in panels at build time, the layout the micro-kernels read;
//! - a `Transpose` feeding an operand folds into the operand's permutation (for `A`, when it
//!   keeps the last dim last, so rows stay contiguous);
//! - the elementwise ops after it (bias, scaling, GELU in any decomposition, residual adds,
//!   masks) fold into an epilogue program: the pass grows a region of f32 elementwise nodes
//!   of the product's shape whose other operands are constants or values that do not depend on
//!   the product and broadcast to it, and keeps the largest prefix of that growth with a single
//!   value used outside the region;
//! - a `Transpose` consuming the result (keeping the last dim last) folds into the output
//!   permutation.
//!
//! The fused op computes exactly what the nodes it replaces computed (its reference evaluation
//! is theirs, op by op).

use crate::manager::{Pass, PassContext, PassOutcome};
use std::collections::{HashMap, HashSet};
use tcc_ir::op::{BinaryKind, EpiOp, Epilogue, FusedMatMul, GeluApprox, UnaryKind};
use tcc_ir::{DType, Dim, Graph, Op, Tensor, ValueId};
use tcc_runtime::kernels;

#[derive(Default)]
pub struct FuseMatMul;

impl Pass for FuseMatMul {
    fn name(&self) -> &'static str {
        "fuse-matmul"
    }

    fn run(&mut self, g: &mut Graph, _: &mut PassContext) -> tcc_ir::Result<PassOutcome> {
        let mut out = PassOutcome::default();
        let mut packed: HashMap<ValueId, ValueId> = HashMap::new();
        // Integer products made by `integer-matmul` start bare; each grows its epilogue once.
        let mut grown: HashSet<ValueId> = HashSet::new();
        fn start(g: &Graph, node: &tcc_ir::Node, grown: &HashSet<ValueId>) -> bool {
            match &node.op {
                Op::MatMul(_) => eligible(g, node),
                Op::FusedMatMul(f) => bare_int8(f) && !grown.contains(&node.outputs[0]),
                _ => false,
            }
        }
        while let Some(n) = g.nodes.iter().position(|node| start(g, node, &grown)) {
            let (stats, v) = fuse_one(g, n, &mut packed)?;
            grown.insert(v);
            for (k, v) in stats {
                out.stat(k, v);
            }
            g.remove_dead_nodes();
            g.toposort()?;
        }
        Ok(out)
    }
}

/// An integer product without an epilogue yet (as `integer-matmul` makes them).
fn bare_int8(f: &FusedMatMul) -> bool {
    f.int8.is_some() && f.epilogue.is_identity() && f.extra == 0 && f.c_perm.is_none()
}

fn eligible(g: &Graph, node: &tcc_ir::Node) -> bool {
    let (Some(Some(a)), Some(Some(b))) = (node.inputs.first(), node.inputs.get(1)) else { return false };
    let (fa, fb) = (g.fact(*a), g.fact(*b));
    fa.dtype == DType::F32 && fb.dtype == DType::F32 && fa.rank() >= 2 && fb.rank() >= 2
}

fn compose(inner: &Option<Vec<usize>>, outer: &[usize]) -> Vec<usize> {
    // permute(permute(x, inner), outer)[i] = x[inner[outer[i]]]
    match inner {
        None => outer.to_vec(),
        Some(p) => outer.iter().map(|&i| p[i]).collect(),
    }
}

fn transpose_perm(
    g: &Graph,
    producers: &HashMap<ValueId, (usize, usize)>,
    v: ValueId,
) -> Option<(ValueId, Vec<usize>)> {
    let &(n, _) = producers.get(&v)?;
    let node = &g.nodes[n];
    let Op::Transpose(t) = &node.op else { return None };
    let x = node.inputs.first().copied().flatten()?;
    let perm = t.perm(g.fact(x).rank()).ok()?;
    Some((x, perm))
}

/// Values computed from `v` (including `v`).
fn descendants(g: &Graph, v: ValueId) -> HashSet<ValueId> {
    let mut set = HashSet::from([v]);
    for node in &g.nodes {
        if node.inputs.iter().flatten().any(|i| set.contains(i)) {
            set.extend(node.outputs.iter().copied());
        }
    }
    set
}

/// Whether `operand` broadcasts to `shape` (numpy rules, never growing `shape`).
fn broadcasts_to(operand: &[Dim], shape: &[Dim]) -> bool {
    if operand.len() > shape.len() {
        return false;
    }
    let pad = shape.len() - operand.len();
    operand.iter().enumerate().all(|(i, d)| d.as_const() == Some(1) || *d == shape[pad + i])
}

fn scalar_const(g: &Graph, v: ValueId) -> Option<f32> {
    let t = g.const_of(v)?;
    (t.len() == 1 && t.dtype() == DType::F32).then(|| t.as_slice::<f32>().ok().map(|s| s[0])).flatten()
}

/// The elementwise op of a node that an epilogue can run, as a small template.
enum Elementwise {
    Unary(UnaryKind),
    Binary(BinaryKind),
    Gelu(GeluApprox),
    FakeQuant(tcc_ir::op::FakeQuant),
}

/// Whether `fuse-matmul` folds `op`, applied to a product's result, into the product's
/// epilogue (the extraction cost model counts such ops almost free).
pub(crate) fn folds_into_epilogue(op: &Op) -> bool {
    elementwise(op).is_some()
}

fn elementwise(op: &Op) -> Option<Elementwise> {
    match op {
        Op::Unary(u) if Epilogue::supports_unary(u.kind) => Some(Elementwise::Unary(u.kind)),
        Op::Binary(b) if Epilogue::supports_binary(b.kind) => Some(Elementwise::Binary(b.kind)),
        Op::Gelu(g) => Some(Elementwise::Gelu(g.approximate)),
        Op::FakeQuant(q) => Some(Elementwise::FakeQuant(*q)),
        _ => None,
    }
}

/// Fuses the product of node `n` (a `MatMul`, or a bare integer `FusedMatMul` whose operands
/// are already settled) with what surrounds it; returns the statistics and the fused value.
fn fuse_one(
    g: &mut Graph,
    n: usize,
    packed: &mut HashMap<ValueId, ValueId>,
) -> tcc_ir::Result<(Vec<(&'static str, i64)>, ValueId)> {
    let mut stats = vec![("fused", 1)];
    let producers = g.producers();
    let node = g.nodes[n].clone();
    let (mut a, mut b) = (node.inputs[0].expect("eligible"), node.inputs[1].expect("eligible"));
    let product = node.outputs[0];
    let (mut f, settled) = match &node.op {
        Op::FusedMatMul(f) => (f.clone(), true),
        _ => (
            FusedMatMul {
                a_perm: None,
                b_perm: None,
                packed: None,
                c_perm: None,
                epilogue: Epilogue::default(),
                extra: 0,
                fused: vec![],
                int8: None,
                weights: None,
            },
            false,
        ),
    };

    // Operand transposes.
    while let Some((x, p)) = transpose_perm(g, &producers, a).filter(|_| !settled) {
        let perm = compose(&Some(p.clone()), &f.a_perm.clone().unwrap_or_else(|| (0..p.len()).collect()));
        if perm.last() != Some(&(perm.len() - 1)) {
            break;
        }
        f.a_perm = Some(perm);
        a = x;
        stats.push(("transposes_folded", 1));
    }
    if settled {
    } else if let Some(t) = g.const_of(b).filter(|t| t.rank() == 2).cloned() {
        let (k, nn) = (t.shape()[0], t.shape()[1]);
        let pv = match packed.get(&b) {
            Some(&pv) => pv,
            None => {
                let data = kernels::pack_b(k, nn, t.as_slice::<f32>().map_err(tcc_ir::Error::Runtime)?);
                let name = format!("{}.packed", g.value(b).name);
                let pv = g.add_const(name, Tensor::new(vec![data.len()], data).map_err(tcc_ir::Error::Runtime)?);
                packed.insert(b, pv);
                stats.push(("weights_packed", 1));
                pv
            }
        };
        f.packed = Some([k, nn]);
        b = pv;
    } else {
        while let Some((x, p)) = transpose_perm(g, &producers, b) {
            let perm = compose(&Some(p.clone()), &f.b_perm.clone().unwrap_or_else(|| (0..p.len()).collect()));
            f.b_perm = Some(perm);
            b = x;
            stats.push(("transposes_folded", 1));
        }
    }

    // The epilogue region.
    let shape = g.fact(product).shape.clone();
    let desc = descendants(g, product);
    let users = g.users();
    let graph_outputs: HashSet<ValueId> = g.outputs.iter().map(|o| o.value).collect();
    let mut region: Vec<usize> = Vec::new();
    let mut region_vals: HashSet<ValueId> = HashSet::from([product]);
    let mut best: (usize, ValueId) = (0, product);
    for (idx, cand) in g.nodes.iter().enumerate().skip(n + 1) {
        if elementwise(&cand.op).is_none() || cand.outputs.len() != 1 {
            continue;
        }
        let o = cand.outputs[0];
        if g.fact(o).dtype != DType::F32 || g.fact(o).shape != shape {
            continue;
        }
        let ins: Vec<ValueId> = cand.inputs.iter().flatten().copied().collect();
        if !ins.iter().any(|v| region_vals.contains(v)) {
            continue;
        }
        let ok = ins.iter().all(|v| {
            region_vals.contains(v)
                || (!desc.contains(v) && g.fact(*v).dtype == DType::F32 && broadcasts_to(&g.fact(*v).shape, &shape))
        });
        if !ok {
            continue;
        }
        region.push(idx);
        region_vals.insert(o);
        let in_region: HashSet<usize> = region.iter().copied().collect();
        let exits: Vec<ValueId> = region_vals
            .iter()
            .copied()
            .filter(|v| {
                graph_outputs.contains(v) || users.get(v).is_some_and(|us| us.iter().any(|u| !in_region.contains(u)))
            })
            .collect();
        if exits.len() == 1 {
            best = (region.len(), exits[0]);
        }
    }
    region.truncate(best.0);
    let exit = best.1;

    // The program.
    let mut inputs = vec![Some(a), Some(b)];
    let mut reg: HashMap<ValueId, usize> = HashMap::from([(product, 0)]);
    let mut prog = vec![EpiOp::Acc];
    let mut extra_index: HashMap<ValueId, usize> = HashMap::new();
    for &idx in &region {
        let cand = &g.nodes[idx];
        let mut args = Vec::new();
        for v in cand.inputs.iter().flatten() {
            let r = match reg.get(v) {
                Some(&r) => r,
                None => {
                    let op = match scalar_const(g, *v) {
                        Some(c) => EpiOp::Const(c),
                        None => {
                            let i = *extra_index.entry(*v).or_insert_with(|| {
                                inputs.push(Some(*v));
                                inputs.len() - 3
                            });
                            EpiOp::Input(i)
                        }
                    };
                    prog.push(op);
                    reg.insert(*v, prog.len() - 1);
                    prog.len() - 1
                }
            };
            args.push(r);
        }
        f.fused.push(cand.op.name().to_string());
        match elementwise(&cand.op).expect("region nodes are elementwise") {
            Elementwise::Unary(k) => prog.push(EpiOp::Unary(k, args[0])),
            Elementwise::Binary(k) => prog.push(EpiOp::Binary(k, args[0], args[1])),
            Elementwise::Gelu(approx) => push_gelu(&mut prog, args[0], approx),
            Elementwise::FakeQuant(q) => prog.push(EpiOp::FakeQuant(args[0], q)),
        }
        reg.insert(cand.outputs[0], prog.len() - 1);
    }
    // An integer product's epilogue runs on the AVX-512 tile executor, which takes programs of
    // at most `MAX_PROGRAM` instructions: a longer region stays unfused.
    #[cfg(target_arch = "x86_64")]
    if settled && prog.len() > kernels::avx512_vec::MAX_PROGRAM {
        region.clear();
        inputs.truncate(2);
        f.fused.clear();
        stats.push(("kept_long_epilogue", 1));
    }
    if !region.is_empty() {
        f.extra = inputs.len() - 2;
        f.epilogue = Epilogue(prog);
        stats.push(("epilogue_ops", region.len() as i64));
    }
    // An output transpose that keeps the last dim last.
    let mut result = exit;
    let users = g.users();
    if let Some([u]) = users.get(&exit).map(Vec::as_slice) {
        if !graph_outputs.contains(&exit) {
            if let Op::Transpose(t) = &g.nodes[*u].op {
                if let Ok(p) = t.perm(shape.len()) {
                    if p.last() == Some(&(p.len() - 1)) {
                        f.c_perm = Some(p);
                        result = g.nodes[*u].outputs[0];
                        stats.push(("transposes_folded", 1));
                    }
                }
            }
        }
    }
    let name = g.value(result).name.clone();
    let v = g.add_node(f, inputs, name)?[0];
    g.value_mut(v).quant = g.value(result).quant.clone();
    g.replace_uses(result, v);
    Ok((stats, v))
}

/// GELU as an epilogue program on register `x`.
fn push_gelu(prog: &mut Vec<EpiOp>, x: usize, approx: GeluApprox) {
    let at = |p: &Vec<EpiOp>| p.len() - 1;
    match approx {
        GeluApprox::None => {
            prog.push(EpiOp::Const(std::f32::consts::FRAC_1_SQRT_2));
            prog.push(EpiOp::Binary(BinaryKind::Mul, x, at(prog)));
            prog.push(EpiOp::Unary(UnaryKind::Erf, at(prog)));
        }
        GeluApprox::Tanh => {
            // tanh(sqrt(2/pi) * (x + 0.044715 x^3))
            prog.push(EpiOp::Binary(BinaryKind::Mul, x, x));
            let x2 = at(prog);
            prog.push(EpiOp::Binary(BinaryKind::Mul, x2, x));
            let x3 = at(prog);
            prog.push(EpiOp::Const(0.044715));
            prog.push(EpiOp::Binary(BinaryKind::Mul, x3, at(prog)));
            prog.push(EpiOp::Binary(BinaryKind::Add, x, at(prog)));
            let inner = at(prog);
            prog.push(EpiOp::Const((2.0 / std::f64::consts::PI).sqrt() as f32));
            prog.push(EpiOp::Binary(BinaryKind::Mul, inner, at(prog)));
            prog.push(EpiOp::Unary(UnaryKind::Tanh, at(prog)));
        }
    }
    let t = at(prog);
    prog.push(EpiOp::Const(1.0));
    prog.push(EpiOp::Binary(BinaryKind::Add, t, at(prog)));
    let s = at(prog);
    prog.push(EpiOp::Binary(BinaryKind::Mul, x, s));
    let xs = at(prog);
    prog.push(EpiOp::Const(0.5));
    prog.push(EpiOp::Binary(BinaryKind::Mul, xs, at(prog)));
}

/// `fuse-attention`: `FusedMatMul -> Softmax(last axis) -> FusedMatMul` over activations becomes
/// one `Attention`, which the runtime computes per (batch, head) without materializing the
/// scores. Runs after `fuse-matmul` (which folds the scaling and the mask into the first
/// product and the transposes into both).
#[derive(Default)]
pub struct FuseAttention;

impl Pass for FuseAttention {
    fn name(&self) -> &'static str {
        "fuse-attention"
    }

    fn run(&mut self, g: &mut Graph, _: &mut PassContext) -> tcc_ir::Result<PassOutcome> {
        let mut out = PassOutcome::default();
        loop {
            let producers = g.producers();
            let users = g.users();
            let single_use =
                |v: ValueId| users.get(&v).is_some_and(|u| u.len() == 1) && !g.outputs.iter().any(|o| o.value == v);
            let found = g.nodes.iter().enumerate().find_map(|(n, node)| {
                let Op::FusedMatMul(context) = &node.op else { return None };
                if context.packed.is_some() || context.a_perm.is_some() || context.extra != 0 {
                    return None;
                }
                let mut p = node.inputs[0]?;
                // QDQ models round the probabilities to a quantization grid first.
                let mut probs_quant = None;
                if let Some(&(fq, _)) = producers.get(&p) {
                    if let Op::FakeQuant(q) = &g.nodes[fq].op {
                        if !single_use(p) {
                            return None;
                        }
                        probs_quant = Some(*q);
                        p = g.nodes[fq].inputs[0]?;
                    }
                }
                let &(sn, _) = producers.get(&p)?;
                let Op::Softmax(sm) = &g.nodes[sn].op else { return None };
                let rank = g.fact(p).rank() as i64;
                if sm.log || !(sm.axis == -1 || sm.axis == rank - 1) || !single_use(p) {
                    return None;
                }
                let s = g.nodes[sn].inputs[0]?;
                let &(qn, _) = producers.get(&s)?;
                let Op::FusedMatMul(scores) = &g.nodes[qn].op else { return None };
                if scores.packed.is_some() || scores.c_perm.is_some() || !single_use(s) {
                    return None;
                }
                let mut inputs = vec![g.nodes[qn].inputs[0], g.nodes[qn].inputs[1], node.inputs[1]];
                inputs.extend(g.nodes[qn].inputs[2..].iter().copied());
                let op = tcc_ir::op::Attention {
                    scores: scores.clone(),
                    context: context.clone(),
                    nan_to_zero: sm.nan_to_zero,
                    probs_quant,
                    bf16: false,
                };
                Some((n, op, inputs))
            });
            let Some((n, op, inputs)) = found else { break };
            let result = g.nodes[n].outputs[0];
            let name = g.value(result).name.clone();
            let v = g.add_node(op, inputs, name)?[0];
            g.replace_uses(result, v);
            g.remove_dead_nodes();
            g.toposort()?;
            out.stat("attention", 1);
        }
        Ok(out)
    }
}

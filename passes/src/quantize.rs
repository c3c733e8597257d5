//! `quantize-int8`: products by constant weights become integer products.
//!
//! Each `FusedMatMul` whose `B` is packed constant `f32` weights gets symmetric per-column `s8`
//! weights (`w ~ q * scale[column]`, [`kernels::int8::quantize_per_column`]), packed for the
//! VNNI kernel, and quantizes its activations to `u8` at run time ([`ActQuant`]: per row by
//! default, so an outlier token costs only itself). The weights' scales become the first
//! instruction of the epilogue (`acc * scale`), before the bias and whatever else was fused,
//! so the integer product's epilogue is the `f32` one's, unchanged.
//!
//! Embedding tables (a `Gather` of rows from a large constant `f32` matrix) are stored as `s8`
//! rows with one scale each and dequantized after the lookup (`Gather`, `Cast`, `Mul` by the
//! rows' gathered scales): only the looked-up rows are ever converted, and the artifact, like
//! memory, holds a quarter of the bytes (MiniLM's vocabulary is half its parameters).
//!
//! Attention ops are marked as allowing bf16 operands for their two products
//! (`Attention::bf16`, option `attention=bf16`, the default; `attention=f32` keeps them f32):
//! CPUs with AMX-BF16 then run them on tiles, with an error (bf16 keeps 8 bits of mantissa)
//! well below the int8 products' around them.
//!
//! This pass approximates: it changes what the graph computes by the quantization error. The
//! build reports it, and `tcc build --eval` measures it against the `f32` model.

use crate::manager::{option_in, Pass, PassContext, PassOutcome, RangeMethod};
use std::collections::{BTreeMap, HashMap};
use tcc_ir::op::fused::{ActQuant, MAX_INT8_K};
use tcc_ir::op::{BinaryKind, Epilogue, FusedMatMul};
use tcc_ir::{DType, Graph, Op, Tensor, ValueId};
use tcc_runtime::kernels;

/// The `quantize-int8` pass.
pub struct QuantizeInt8 {
    pub act: Activations,
    /// Also quantize embedding tables (per row).
    pub embeddings: bool,
    /// Let attention's products take bf16 operands.
    pub attention_bf16: bool,
}

/// How `quantize-int8` quantizes the products' activations.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activations {
    /// At run time, from each row's or the tensor's range.
    Dynamic(ActQuant),
    /// With fixed parameters from the ranges calibration observed, set by `range`.
    Static { range: RangeMethod },
}

/// Smallest table (elements) whose rows are stored in `s8`: vocabularies and positions, not
/// the two rows of token types.
const MIN_EMBEDDING: usize = 1 << 14;

impl QuantizeInt8 {
    /// From pipeline options: `act=row|tensor|static`; for static activations
    /// `calibrate=minmax|percentile|entropy` and `tail=F` (percentile: the share of values
    /// clipped at each end of the observed ranges, default `1e-4`; `tail` alone means
    /// percentile).
    pub fn from_options(o: &BTreeMap<String, String>) -> Result<QuantizeInt8, String> {
        let mut q =
            QuantizeInt8 { act: Activations::Dynamic(ActQuant::DynamicRow), embeddings: true, attention_bf16: true };
        let tail = match o.get("tail") {
            None => None,
            Some(t) => Some(option_in("quantize-int8", ("tail", t), 0.0..0.5, "a number in [0, 0.5)")?),
        };
        let range = match (o.get("calibrate").map(String::as_str), tail) {
            (None, Some(tail)) | (Some("percentile"), Some(tail)) => RangeMethod::Percentile { tail },
            (Some("percentile"), None) => RangeMethod::Percentile { tail: 1e-4 },
            (None | Some("minmax"), _) => RangeMethod::MinMax,
            (Some("entropy"), _) => RangeMethod::Entropy,
            (Some(other), _) => {
                return Err(format!("quantize-int8: calibrate={other}: expected minmax, percentile or entropy"))
            }
        };
        for (key, v) in o {
            match (key.as_str(), v.as_str()) {
                ("act", "row") => q.act = Activations::Dynamic(ActQuant::DynamicRow),
                ("act", "tensor") => q.act = Activations::Dynamic(ActQuant::DynamicTensor),
                ("act", "static") => q.act = Activations::Static { range },
                ("act", other) => return Err(format!("quantize-int8: act={other}: expected row, tensor or static")),
                ("tail" | "calibrate", _) => {}
                ("embeddings", "true") => q.embeddings = true,
                ("embeddings", "false") => q.embeddings = false,
                ("embeddings", other) => {
                    return Err(format!("quantize-int8: embeddings={other}: expected true or false"))
                }
                ("attention", "bf16") => q.attention_bf16 = true,
                ("attention", "f32") => q.attention_bf16 = false,
                ("attention", other) => return Err(format!("quantize-int8: attention={other}: expected bf16 or f32")),
                (other, _) => {
                    return Err(format!(
                        "quantize-int8: unknown option `{other}` (known: act, calibrate, tail, embeddings, attention)"
                    ))
                }
            }
        }
        Ok(q)
    }
}

impl Pass for QuantizeInt8 {
    fn name(&self) -> &'static str {
        "quantize-int8"
    }

    fn run(&mut self, g: &mut Graph, cx: &mut PassContext) -> tcc_ir::Result<PassOutcome> {
        let mut out = PassOutcome::default();
        // Static activations: every product's input range, from one calibration run.
        let mut ranges: HashMap<ValueId, (f32, f32)> = HashMap::new();
        // The products loop below changes ops and adds constants, never nodes: computed once.
        let producers = g.producers();
        if let Activations::Static { range } = self.act {
            let calibrator = cx.calibrator.clone().ok_or_else(|| {
                tcc_ir::Error::Calibration("quantize-int8{act=static} needs calibration samples (--calibration)".into())
            })?;
            let mut inputs: Vec<ValueId> = g
                .nodes
                .iter()
                .filter(|n| weights_of(g, &producers, n).is_some())
                .filter_map(|n| n.inputs.first().copied().flatten())
                .collect();
            inputs.sort();
            inputs.dedup();
            let stats = calibrator.observe(g, &inputs).map_err(tcc_ir::Error::Calibration)?;
            for (v, s) in inputs.iter().zip(&stats) {
                ranges.insert(*v, s.range(range));
            }
            out.stat("calibrated_values", inputs.len() as i64);
        }
        // Weights shared by several products are quantized once.
        let mut done: HashMap<ValueId, (ValueId, ValueId)> = HashMap::new();
        for n in 0..g.nodes.len() {
            let Op::FusedMatMul(f) = &g.nodes[n].op else { continue };
            let f = f.clone();
            let Some(source) = weights_of(g, &producers, &g.nodes[n]) else { continue };
            let act = match self.act {
                Activations::Dynamic(a) => a,
                Activations::Static { .. } => {
                    let Some(&(lo, hi)) = g.nodes[n].inputs.first().copied().flatten().and_then(|a| ranges.get(&a))
                    else {
                        continue;
                    };
                    if !(lo.is_finite() && hi.is_finite()) {
                        out.stat("kept_f32_no_range", 1);
                        continue;
                    }
                    let (scale, zero_point) = tcc_runtime::op::dynamic_qparams(lo, hi);
                    if !(scale.is_finite() && scale > 0.0) {
                        out.stat("kept_f32_no_range", 1);
                        continue;
                    }
                    ActQuant::Static { scale, zero_point }
                }
            };
            let Some(Some(b)) = g.nodes[n].inputs.get(1).copied() else { continue };
            let epilogue = f.epilogue.scale_first(f.extra);
            #[cfg(target_arch = "x86_64")]
            if epilogue.0.len() > kernels::avx512_vec::MAX_PROGRAM {
                out.stat("kept_f32_long_epilogue", 1);
                continue;
            }
            let (k, cols) = match &source {
                Weights::Packed { k, n, .. } => (*k, *n),
                Weights::WeightOnly { q, .. } => (q.shape()[0], q.shape()[1]),
            };
            let (qb, scale) = match done.get(&b) {
                Some(&v) => v,
                None => {
                    let name = g.value(b).name.clone();
                    let (q, scale) = match source {
                        Weights::Packed { w, .. } => {
                            let dense =
                                kernels::unpack_b(k, cols, w.as_slice::<f32>().map_err(tcc_ir::Error::Runtime)?);
                            out.stat("weight_bytes_f32", (4 * k * cols) as i64);
                            kernels::int8::quantize_per_column(k, cols, &dense)
                        }
                        // The model's own s8 weights and scales.
                        Weights::WeightOnly { q, scale } => {
                            out.stat("weight_only_products", 1);
                            let q = q.as_slice::<i8>().map_err(tcc_ir::Error::Runtime)?.to_vec();
                            let s = scale.as_slice::<f32>().map_err(tcc_ir::Error::Runtime)?;
                            (q, if s.len() == 1 { vec![s[0]; cols] } else { s.to_vec() })
                        }
                    };
                    let packed = kernels::int8::pack_b_s8(k, cols, &q);
                    let qt = Tensor::new(vec![packed.len()], packed).map_err(tcc_ir::Error::Runtime)?;
                    let st = Tensor::new(vec![cols], scale).map_err(tcc_ir::Error::Runtime)?;
                    out.stat("weight_bytes_int8", (k * cols + 4 * cols) as i64);
                    let v = (g.add_const(format!("{name}.s8"), qt), g.add_const(format!("{name}.scale"), st));
                    done.insert(b, v);
                    v
                }
            };
            let mut nf: FusedMatMul = f;
            nf.packed = Some([k, cols]);
            nf.epilogue = epilogue;
            nf.extra += 1;
            nf.int8 = Some(act);
            let node = &mut g.nodes[n];
            node.op = nf.into();
            node.inputs[1] = Some(qb);
            node.inputs.push(Some(scale));
            out.stat("quantized", 1);
        }
        if self.embeddings {
            quantize_embeddings(g, &mut out)?;
        }
        if self.attention_bf16 {
            for node in &mut g.nodes {
                if let Op::Attention(a) = &mut node.op {
                    if !a.bf16 {
                        a.bf16 = true;
                        out.stat("attention_bf16", 1);
                    }
                }
            }
        }
        if out.changed {
            g.infer()?;
            g.remove_dead_nodes();
            g.toposort()?;
        }
        Ok(out)
    }
}

/// The weights of a product `quantize-int8` makes integer.
enum Weights {
    /// Constant f32 weights packed at build time: quantized per column here.
    Packed { k: usize, n: usize, w: Tensor },
    /// Weight-only int8 models' `Mul(Cast(q), scale)`: `q` constant `s8` `[k, n]`, `scale` one
    /// value or one per column; kept as they are.
    WeightOnly { q: Tensor, scale: Tensor },
}

/// The weights of node `node` when it is an `f32` product that `quantize-int8` can make
/// integer.
fn weights_of(g: &Graph, producers: &Producers, node: &tcc_ir::Node) -> Option<Weights> {
    let Op::FusedMatMul(f) = &node.op else { return None };
    if f.int8.is_some() || f.b_perm.is_some() {
        return None;
    }
    let b = node.inputs.get(1).copied().flatten()?;
    if let Some([k, n]) = f.packed {
        let w = g.const_of(b).filter(|t| t.dtype() == DType::F32 && t.len() == f.packed_len(k, n))?;
        return (k <= MAX_INT8_K).then(|| Weights::Packed { k, n, w: w.clone() });
    }
    // B = Mul(Cast(q), scale), either order.
    let &(m, _) = producers.get(&b)?;
    let mul = &g.nodes[m];
    let Op::Binary(bin) = &mul.op else { return None };
    if bin.kind != BinaryKind::Mul {
        return None;
    }
    let (x, y) = (mul.inputs.first().copied().flatten()?, mul.inputs.get(1).copied().flatten()?);
    let cast_of = |v: ValueId| {
        let &(c, _) = producers.get(&v)?;
        match &g.nodes[c].op {
            Op::Cast(c2) if c2.to == DType::F32 => g.nodes[c].inputs.first().copied().flatten(),
            _ => None,
        }
    };
    let (q, scale) = match (cast_of(x), cast_of(y)) {
        (Some(q), None) => (q, y),
        (None, Some(q)) => (q, x),
        _ => return None,
    };
    let q = g.const_of(q).filter(|t| t.dtype() == DType::I8 && t.rank() == 2)?;
    let s = g.const_of(scale).filter(|t| t.dtype() == DType::F32)?;
    let (k, n) = (q.shape()[0], q.shape()[1]);
    let per_column = s.len() == n && s.shape().last() == Some(&n);
    if k > MAX_INT8_K || !(s.len() == 1 || per_column) {
        return None;
    }
    Some(Weights::WeightOnly { q: q.clone(), scale: s.clone() })
}

/// `Gather(table, ids)` of rows of a large constant `f32` table becomes
/// `Cast(Gather(q, ids)) * Gather(scale, ids)` with `q` the table's rows in `s8`, symmetric,
/// one scale per row (`[rows, 1]`, so the gathered scales broadcast over the row).
fn quantize_embeddings(g: &mut Graph, out: &mut PassOutcome) -> tcc_ir::Result<()> {
    let mut done: HashMap<ValueId, (ValueId, ValueId)> = HashMap::new();
    for n in 0..g.nodes.len() {
        let Op::Gather(gather) = &g.nodes[n].op else { continue };
        let gather = gather.clone();
        let (Some(Some(table)), Some(Some(ids)), Some(&old)) =
            (g.nodes[n].inputs.first().copied(), g.nodes[n].inputs.get(1).copied(), g.nodes[n].outputs.first())
        else {
            continue;
        };
        let Some(t) = g.const_of(table).filter(|t| t.dtype() == DType::F32 && t.rank() == 2).cloned() else {
            continue;
        };
        if !(gather.axis == 0 || gather.axis == -2) || t.len() < MIN_EMBEDDING {
            continue;
        }
        let (rows, cols) = (t.shape()[0], t.shape()[1]);
        let (q, scale) = match done.get(&table) {
            Some(&v) => v,
            None => {
                // Per row: the transpose of per-column quantization.
                let data = t.as_slice::<f32>().map_err(tcc_ir::Error::Runtime)?;
                let mut tr = vec![0f32; data.len()];
                for (i, row) in data.chunks(cols).enumerate() {
                    for (j, &x) in row.iter().enumerate() {
                        tr[j * rows + i] = x;
                    }
                }
                let (qt, scale) = kernels::int8::quantize_per_column(cols, rows, &tr);
                let mut qv = vec![0i8; qt.len()];
                for j in 0..cols {
                    for i in 0..rows {
                        qv[i * cols + j] = qt[j * rows + i];
                    }
                }
                let name = g.value(table).name.clone();
                let qt = Tensor::new(vec![rows, cols], qv).map_err(tcc_ir::Error::Runtime)?;
                let st = Tensor::new(vec![rows, 1], scale).map_err(tcc_ir::Error::Runtime)?;
                out.stat("embedding_bytes_f32", (4 * rows * cols) as i64);
                out.stat("embedding_bytes_int8", (rows * cols + 4 * rows) as i64);
                let v = (g.add_const(format!("{name}.s8"), qt), g.add_const(format!("{name}.scale"), st));
                done.insert(table, v);
                v
            }
        };
        let name = g.nodes[n].name.clone();
        let gathered = g.add1(gather.clone(), &[q, ids], format!("{name}.s8"))?;
        let wide = g.add1(tcc_ir::op::Cast { to: DType::F32 }, &[gathered], format!("{name}.f32"))?;
        let scales = g.add1(gather.clone(), &[scale, ids], format!("{name}.scale"))?;
        let deq = g.add1(tcc_ir::op::Binary::new(BinaryKind::Mul), &[wide, scales], format!("{name}.dequantized"))?;
        g.replace_uses(old, deq);
        out.stat("embeddings_quantized", 1);
    }
    Ok(())
}

/// `integer-matmul`: onnxruntime's dynamic quantization of a product by constant weights,
/// `Mul(Cast(MatMulInteger(DynamicQuantizeLinear(x), W, zero_x, zero_w)), scale_x * scale_w)`,
/// becomes one integer `FusedMatMul` of `x` (quantized per tensor at run time, as
/// `DynamicQuantizeLinear` does) by `W - zero_w` packed as `s8`, followed by the product with
/// `scale_w`, which `fuse-matmul` then folds into the epilogue with the bias and what follows.
/// The model's own weights, scales and zero points are kept; the activations are quantized by
/// the reciprocal of the scale, which can round a value sitting on a midpoint the other way
/// (one quantum).
pub struct IntegerMatMul;

impl Pass for IntegerMatMul {
    fn name(&self) -> &'static str {
        "integer-matmul"
    }

    fn run(&mut self, g: &mut Graph, _: &mut PassContext) -> tcc_ir::Result<PassOutcome> {
        let mut out = rewrite_matches(g, match_dynamic)?;
        let lowered = lower_dequantize(g)?;
        if lowered > 0 {
            out.changed = true;
            out.stat("dequantize_lowered", lowered as i64);
        }
        Ok(out)
    }
}

/// What is left of onnxruntime's dynamic quantization after the products: the lookups in its
/// `u8` embedding tables, `DequantizeLinear(Gather(table, ids), scale, zero)` with one scale
/// and zero point. Every `DequantizeLinear` of 8-bit values with a constant scalar scale and
/// zero point becomes `(Cast(x) - zero) * scale` in f32 (the same values: `q - zero` is an
/// exact small integer either way), so that no quantization op is left in the compiled model
/// and the table stays in `u8`. Returns how many were lowered.
fn lower_dequantize(g: &mut Graph) -> tcc_ir::Result<usize> {
    let mut lowered = 0;
    for n in 0..g.nodes.len() {
        let node = &g.nodes[n];
        let Op::DequantizeLinear(_) = node.op else { continue };
        let (Some(Some(x)), Some(Some(s)), z, Some(&old)) = (
            node.inputs.first().copied(),
            node.inputs.get(1).copied(),
            node.inputs.get(2).copied().flatten(),
            node.outputs.first(),
        ) else {
            continue;
        };
        // Constant weights are `qdq-matmul`'s (or folding's).
        if !matches!(g.fact(x).dtype, DType::U8 | DType::I8) || g.const_of(x).is_some() {
            continue;
        }
        let scale = g.const_of(s).filter(|t| t.dtype() == DType::F32 && t.len() == 1).cloned();
        let zero = match z {
            None => Some(0),
            Some(z) => g.const_of(z).filter(|t| t.len() == 1).and_then(|t| t.to_i64s().ok()).map(|v| v[0]),
        };
        let (Some(scale), Some(zero)) = (scale, zero) else { continue };
        let name = node.name.clone();
        let scalar = |v: f32| Tensor::new(vec![], vec![v]).map_err(tcc_ir::Error::Runtime);
        let wide = g.add1(tcc_ir::op::Cast { to: DType::F32 }, &[x], format!("{name}.f32"))?;
        let centered = if zero == 0 {
            wide
        } else {
            let zc = g.add_const(format!("{name}.zero"), scalar(zero as f32)?);
            g.add1(tcc_ir::op::Binary::new(BinaryKind::Sub), &[wide, zc], format!("{name}.centered"))?
        };
        let sc = g.add_const(format!("{name}.scale"), scale.reshape(vec![]).map_err(tcc_ir::Error::Runtime)?);
        let y = g.add1(tcc_ir::op::Binary::new(BinaryKind::Mul), &[centered, sc], g.value(old).name.clone())?;
        g.replace_uses(old, y);
        lowered += 1;
    }
    if lowered > 0 {
        g.remove_dead_nodes();
        g.toposort()?;
    }
    Ok(lowered)
}

type Producers = HashMap<ValueId, (usize, usize)>;
type Users = HashMap<ValueId, Vec<usize>>;

/// Every node `find` matches becomes an integer product. One scan: the new nodes go at the
/// end (the graph is sorted again after), the nodes they replace die; the links between the
/// old nodes stay as they were, so the producers and users are computed once.
fn rewrite_matches(
    g: &mut Graph,
    find: impl Fn(&Graph, usize, &Producers, &Users) -> Option<Integer>,
) -> tcc_ir::Result<PassOutcome> {
    let mut out = PassOutcome::default();
    let mut weights: HashMap<(ValueId, Option<ValueId>), ValueId> = HashMap::new();
    let (producers, users) = (g.producers(), g.users());
    for n in 0..g.nodes.len() {
        if let Some(m) = find(g, n, &producers, &users) {
            rewrite_integer(g, m, &mut weights, &mut out)?;
            out.stat("integer_products", 1);
        }
    }
    if out.changed {
        g.remove_dead_nodes();
        g.toposort()?;
    }
    Ok(out)
}

/// A matched quantized product: `x` quantized as `act`, times `w`, times `w_scale`.
struct Integer {
    /// The f32 activations.
    x: ValueId,
    act: ActQuant,
    /// Weights `[k, n]` minus their zero point, in `s8`.
    w: Tensor,
    /// Which weights and zero point they came from (shared weights are packed once).
    key: (ValueId, Option<ValueId>),
    /// The weights' scale (one value or one per column).
    w_scale: ValueId,
    /// The value the matched ops compute.
    result: ValueId,
    name: String,
}

/// Constant weights `[k, cols]` minus their zero point (none, one, or one per column), when
/// every value fits `s8`.
fn shifted_weights(g: &Graph, w: ValueId, wz: Option<ValueId>, cols: usize) -> Option<Vec<i8>> {
    let wv = g.const_of(w)?.to_i64s().ok()?;
    let zv = match wz {
        None => vec![0i64],
        Some(z) => g.const_of(z)?.to_i64s().ok()?,
    };
    if !(zv.len() == 1 || zv.len() == cols) || cols == 0 {
        return None;
    }
    wv.iter().enumerate().map(|(i, &v)| i8::try_from(v - zv[if zv.len() == 1 { 0 } else { i % cols }]).ok()).collect()
}

fn single_user(users: &Users, g: &Graph, v: ValueId) -> Option<usize> {
    match users.get(&v).map(Vec::as_slice) {
        Some(&[u]) if !g.outputs.iter().any(|o| o.value == v) => Some(u),
        _ => None,
    }
}

fn match_dynamic(g: &Graph, n: usize, producers: &Producers, users: &Users) -> Option<Integer> {
    let node = &g.nodes[n];
    let Op::MatMulInteger(_) = node.op else { return None };
    let (aq, w, az, wz) = (
        node.inputs.first()?.as_ref()?,
        node.inputs.get(1)?.as_ref()?,
        node.inputs.get(2)?,
        node.inputs.get(3).copied().flatten(),
    );
    // The activations: outputs 0 and 2 of one DynamicQuantizeLinear.
    let &(d, 0) = producers.get(aq)? else { return None };
    let dq = &g.nodes[d];
    let Op::DynamicQuantizeLinear(_) = dq.op else { return None };
    if *az != Some(dq.outputs[2]) {
        return None;
    }
    let x = dq.inputs.first().copied().flatten()?;
    // The weights: a constant matrix whose zero point (if any) is constant, scalar or per
    // column, and whose shifted values fit s8.
    let wt = g.const_of(*w).filter(|t| t.rank() == 2)?;
    let (k, cols) = (wt.shape()[0], wt.shape()[1]);
    if k > MAX_INT8_K || g.fact(x).dtype != DType::F32 || g.fact(x).shape.last()?.as_const() != Some(k as i64) {
        return None;
    }
    let shifted = shifted_weights(g, *w, wz, cols)?;
    // Cast to f32, then the product with scale_x * scale_w.
    let cast_n = single_user(users, g, node.outputs[0])?;
    let Op::Cast(c) = &g.nodes[cast_n].op else { return None };
    if c.to != DType::F32 {
        return None;
    }
    let mul_n = single_user(users, g, g.nodes[cast_n].outputs[0])?;
    let mul = &g.nodes[mul_n];
    let Op::Binary(b) = &mul.op else { return None };
    if b.kind != BinaryKind::Mul {
        return None;
    }
    let casted = g.nodes[cast_n].outputs[0];
    let (m0, m1) = (mul.inputs.first().copied().flatten()?, mul.inputs.get(1).copied().flatten()?);
    let scale = if m0 == casted { m1 } else { m0 };
    // scale = scale_x * scale_w (either order), scale_w constant: one value or one per column.
    let &(s, _) = producers.get(&scale)?;
    let sn = &g.nodes[s];
    let Op::Binary(sb) = &sn.op else { return None };
    if sb.kind != BinaryKind::Mul {
        return None;
    }
    let (s0, s1) = (sn.inputs.first().copied().flatten()?, sn.inputs.get(1).copied().flatten()?);
    let w_scale = match (s0 == dq.outputs[1], s1 == dq.outputs[1]) {
        (true, false) => s1,
        (false, true) => s0,
        _ => return None,
    };
    let ws = g.const_of(w_scale).filter(|t| t.dtype() == DType::F32)?;
    if !(ws.len() == 1 || ws.shape() == [cols]) {
        return None;
    }
    Some(Integer {
        x,
        act: ActQuant::DynamicTensor,
        w: Tensor::new(vec![k, cols], shifted).ok()?,
        key: (*w, wz),
        w_scale,
        result: mul.outputs[0],
        name: g.value(mul.outputs[0]).name.clone(),
    })
}

fn rewrite_integer(
    g: &mut Graph,
    m: Integer,
    weights: &mut HashMap<(ValueId, Option<ValueId>), ValueId>,
    out: &mut PassOutcome,
) -> tcc_ir::Result<()> {
    let (k, cols) = (m.w.shape()[0], m.w.shape()[1]);
    let packed = match weights.get(&m.key) {
        Some(&v) => v,
        None => {
            let data = kernels::int8::pack_b_s8(k, cols, m.w.as_slice::<i8>().map_err(tcc_ir::Error::Runtime)?);
            let name = format!("{}.s8", g.value(m.key.0).name);
            let v = g.add_const(name, Tensor::new(vec![data.len()], data).map_err(tcc_ir::Error::Runtime)?);
            weights.insert(m.key, v);
            out.stat("weights_packed", 1);
            v
        }
    };
    let f = FusedMatMul {
        a_perm: None,
        b_perm: None,
        packed: Some([k, cols]),
        c_perm: None,
        epilogue: Epilogue::default(),
        extra: 0,
        fused: vec![],
        int8: Some(m.act),
        weights: None,
    };
    let product = g.add1(f, &[m.x, packed], format!("{}.int8", m.name))?;
    let scaled = g.add1(tcc_ir::op::Binary::new(BinaryKind::Mul), &[product, m.w_scale], m.name.clone())?;
    g.value_mut(scaled).quant = g.value(m.result).quant.clone();
    g.replace_uses(m.result, scaled);
    Ok(())
}

/// `qdq-matmul`: a QDQ model's product of quantized activations by quantized weights,
/// `MatMul(FakeQuant(x), DequantizeLinear(W, scale_w, zero_w))` (after `recognize` made the
/// activations' Q/DQ pairs `FakeQuant`s), becomes one integer `FusedMatMul` of `x` quantized
/// with the model's own scale and zero point (`ActQuant::Static`, bit for bit as its
/// `QuantizeLinear`) by `W - zero_w` in `s8`, followed by the product with `scale_w` (one value
/// or one per column), which `fuse-matmul` folds into the epilogue. What differs from the
/// float graph is the summation order: exact in `i32` here.
pub struct QdqMatMul;

impl Pass for QdqMatMul {
    fn name(&self) -> &'static str {
        "qdq-matmul"
    }

    fn run(&mut self, g: &mut Graph, _: &mut PassContext) -> tcc_ir::Result<PassOutcome> {
        rewrite_matches(g, match_qdq)
    }
}

fn match_qdq(g: &Graph, n: usize, producers: &Producers, _: &Users) -> Option<Integer> {
    let node = &g.nodes[n];
    let Op::MatMul(_) = node.op else { return None };
    let (a, b) = (node.inputs.first().copied().flatten()?, node.inputs.get(1).copied().flatten()?);
    let &(fq_n, 0) = producers.get(&a)? else { return None };
    let Op::FakeQuant(fq) = g.nodes[fq_n].op else { return None };
    let x = g.nodes[fq_n].inputs.first().copied().flatten()?;
    // The activations' grid as u8: s8 activations shift by 128 (same rounding, same sums).
    let zero_point = match (fq.lo, fq.hi) {
        (0, 255) => fq.zero_point,
        (-128, 127) => fq.zero_point + 128,
        _ => return None,
    };
    let zero_point = u8::try_from(zero_point).ok()?;
    if fq.validate().is_err() || g.fact(x).dtype != DType::F32 || g.fact(x).rank() < 2 {
        return None;
    }
    let &(dq_n, 0) = producers.get(&b)? else { return None };
    let dq = &g.nodes[dq_n];
    let Op::DequantizeLinear(d) = &dq.op else { return None };
    let w = dq.inputs.first().copied().flatten()?;
    let wt = g.const_of(w).filter(|t| t.rank() == 2 && t.dtype() == DType::I8)?;
    let (k, cols) = (wt.shape()[0], wt.shape()[1]);
    if k > MAX_INT8_K || g.fact(x).shape.last()?.as_const() != Some(k as i64) {
        return None;
    }
    let w_scale = dq.inputs.get(1).copied().flatten()?;
    let st = g.const_of(w_scale).filter(|t| t.dtype() == DType::F32)?;
    // Per tensor, or per output column (axis 1 of [k, n]).
    let per_column = st.len() == cols && st.rank() == 1 && (d.axis == 1 || d.axis == -1);
    if !(st.len() == 1 || per_column) {
        return None;
    }
    let wz = dq.inputs.get(2).copied().flatten();
    // A zero point has the scale's shape (the reference refuses anything else).
    if let Some(z) = wz {
        if g.fact(z).shape != g.fact(w_scale).shape {
            return None;
        }
    }
    let shifted = shifted_weights(g, w, wz, cols)?;
    Some(Integer {
        x,
        act: ActQuant::Static { scale: fq.scale, zero_point },
        w: Tensor::new(vec![k, cols], shifted).ok()?,
        key: (w, wz),
        w_scale,
        result: node.outputs[0],
        name: g.value(node.outputs[0]).name.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcc_ir::op::{EpiOp, UnaryKind};

    #[test]
    fn the_old_program_reads_the_scaled_product() {
        let old = Epilogue(vec![
            EpiOp::Acc,
            EpiOp::Input(0),
            EpiOp::Binary(BinaryKind::Add, 0, 1),
            EpiOp::Unary(UnaryKind::Tanh, 2),
            EpiOp::Binary(BinaryKind::Mul, 0, 3),
        ]);
        let new = old.scale_first(1);
        let want = vec![
            EpiOp::Acc,
            EpiOp::Input(1),
            EpiOp::Binary(BinaryKind::Mul, 0, 1),
            EpiOp::Input(0),
            EpiOp::Binary(BinaryKind::Add, 2, 3),
            EpiOp::Unary(UnaryKind::Tanh, 4),
            EpiOp::Binary(BinaryKind::Mul, 2, 5),
        ];
        assert_eq!(new.0, want);
        let mut regs = Vec::new();
        for (acc, bias, s) in [(0.7f32, -0.2f32, 0.5f32), (-3.0, 1.0, 2.0)] {
            assert_eq!(new.eval(acc, &[bias, s], &mut regs), old.eval(acc * s, &[bias], &mut regs));
        }
        assert_eq!(Epilogue::default().scale_first(0).0.len(), 3);
    }

    use tcc_ir::op::{Binary, Cast, DequantizeLinear, DynamicQuantizeLinear, FakeQuant, MatMul, MatMulInteger};
    use tcc_ir::{interp, Fact};

    fn x_input(g: &mut Graph) -> ValueId {
        g.add_input("x", Fact::new(DType::F32, vec![2usize.into(), 3usize.into(), 8usize.into()]))
    }

    fn inputs() -> Vec<(String, Tensor)> {
        let v: Vec<f32> = (0..48).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
        vec![("x".into(), Tensor::new(vec![2, 3, 8], v).unwrap())]
    }

    /// onnxruntime's dynamic chain over `w` (with zero point `wz`); `extra_user` gives the
    /// `Cast` a second reader.
    fn dynamic_graph(w: Tensor, wz: Tensor, extra_user: bool) -> Graph {
        let mut g = Graph::new("dynamic");
        let x = x_input(&mut g);
        let d = g.add_node(DynamicQuantizeLinear {}, vec![Some(x)], "dq").unwrap();
        let (w, wz) = (g.add_const("w", w), g.add_const("wz", wz));
        let ws = g.add_const("ws", Tensor::scalar(0.02f32));
        let mm = g.add_node(MatMulInteger {}, vec![Some(d[0]), Some(w), Some(d[2]), Some(wz)], "mm").unwrap()[0];
        let c = g.add1(Cast { to: DType::F32 }, &[mm], "cast").unwrap();
        let s = g.add1(Binary::new(BinaryKind::Mul), &[d[1], ws], "scale").unwrap();
        let y = g.add1(Binary::new(BinaryKind::Mul), &[c, s], "y").unwrap();
        g.add_output("y", y);
        if extra_user {
            g.add_output("raw", c);
        }
        g
    }

    fn run_passes(g: &mut Graph, pass: &mut dyn Pass) -> PassOutcome {
        let out = pass.run(g, &mut PassContext::default()).unwrap();
        crate::FuseMatMul.run(g, &mut PassContext::default()).unwrap();
        tcc_ir::verify(g).unwrap();
        out
    }

    fn integer_products(g: &Graph) -> usize {
        g.nodes.iter().filter(|n| matches!(&n.op, Op::FusedMatMul(f) if f.int8.is_some())).count()
    }

    fn close(a: &[(String, Tensor)], b: &[(String, Tensor)], tol: f32) {
        let (x, y) = (a[0].1.as_slice::<f32>().unwrap(), b[0].1.as_slice::<f32>().unwrap());
        let scale = y.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        for (p, q) in x.iter().zip(y) {
            assert!((p - q).abs() <= tol * scale, "{p} vs {q}");
        }
    }

    #[test]
    fn integer_matmul_keeps_the_model_s_quantization() {
        let w: Vec<i8> = (0..40).map(|i| (i * 53 % 241 - 120) as i8).collect();
        let mut g = dynamic_graph(Tensor::new(vec![8, 5], w.clone()).unwrap(), Tensor::scalar(3i8), false);
        let want = interp::run(&g, &inputs()).unwrap();
        let out = run_passes(&mut g, &mut IntegerMatMul);
        assert_eq!(out.stats["integer_products"], 1);
        assert_eq!(integer_products(&g), 1);
        assert!(!g.nodes.iter().any(|n| matches!(n.op, Op::MatMulInteger(_) | Op::DynamicQuantizeLinear(_))));
        // The same integers, scales and zero points: float rounding apart, the same values.
        close(&interp::run(&g, &inputs()).unwrap(), &want, 1e-5);
    }

    #[test]
    fn integer_matmul_leaves_near_misses_alone() {
        // Weights whose shift by the zero point leaves s8 (u8 weights with zero point 0).
        let w = Tensor::new(vec![8, 5], (0..40).map(|i| (i * 6) as u8).collect::<Vec<u8>>()).unwrap();
        let mut g = dynamic_graph(w, Tensor::scalar(0u8), false);
        assert!(!IntegerMatMul.run(&mut g, &mut PassContext::default()).unwrap().changed);
        // The integer product read by something else than the scale.
        let w = Tensor::new(vec![8, 5], vec![1i8; 40]).unwrap();
        let mut g = dynamic_graph(w, Tensor::scalar(0i8), true);
        assert!(!IntegerMatMul.run(&mut g, &mut PassContext::default()).unwrap().changed);
    }

    /// onnxruntime's quantized embedding lookup: `DequantizeLinear(Gather(table, ids), s, z)`.
    fn lookup_graph(scale: Tensor, zero: Tensor) -> (Graph, Vec<(String, Tensor)>) {
        let mut g = Graph::new("lookup");
        let ids = g.add_input("ids", tcc_ir::Fact::new(DType::I64, vec![tcc_ir::Dim::sym("batch"), 4i64.into()]));
        let table: Vec<u8> = (0..60).map(|i| (i * 97 % 256) as u8).collect();
        let t = g.add_const("table", Tensor::new(vec![10, 6], table).unwrap());
        let rows = g.add1(tcc_ir::op::Gather { axis: 0 }, &[t, ids], "gather").unwrap();
        let (s, z) = (g.add_const("s", scale), g.add_const("z", zero));
        let y = g.add1(DequantizeLinear { axis: 1 }, &[rows, s, z], "dq").unwrap();
        g.add_output("y", y);
        (g, vec![("ids".into(), Tensor::new(vec![2, 4], vec![0i64, 9, 3, 3, 7, 1, 2, 8]).unwrap())])
    }

    #[test]
    fn integer_matmul_lowers_quantized_lookups() {
        let (mut g, ins) = lookup_graph(Tensor::scalar(0.0061048f32), Tensor::scalar(83u8));
        let want = interp::run(&g, &ins).unwrap();
        let out = IntegerMatMul.run(&mut g, &mut PassContext::default()).unwrap();
        tcc_ir::verify(&g).unwrap();
        assert_eq!(out.stats["dequantize_lowered"], 1);
        assert!(!g.nodes.iter().any(|n| matches!(n.op, Op::DequantizeLinear(_))));
        assert!(g.nodes.iter().any(|n| matches!(n.op, Op::Gather(_)) && g.fact(n.outputs[0]).dtype == DType::U8));
        let got = interp::run(&g, &ins).unwrap();
        let bits = |t: &Tensor| t.as_slice::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got[0].1), bits(&want[0].1), "the same values, bit for bit");
        // One scale per column: left alone.
        let (mut g, _) =
            lookup_graph(Tensor::new(vec![6], vec![0.01f32; 6]).unwrap(), Tensor::new(vec![6], vec![3u8; 6]).unwrap());
        assert!(!IntegerMatMul.run(&mut g, &mut PassContext::default()).unwrap().changed);
    }

    /// A QDQ product: `MatMul(FakeQuant(x), DequantizeLinear(w, scale, zero, axis))`.
    fn qdq_graph(fq: FakeQuant, scale: Tensor, axis: i64) -> Graph {
        let mut g = Graph::new("qdq");
        let x = x_input(&mut g);
        let a = g.add1(fq, &[x], "fq").unwrap();
        let w = g.add_const(
            "w",
            Tensor::new(vec![8, 5], (0..40).map(|i| (i * 29 % 200 - 100) as i8).collect::<Vec<i8>>()).unwrap(),
        );
        let s = g.add_const("s", scale);
        let b = g.add1(DequantizeLinear { axis }, &[w, s], "dqw").unwrap();
        let y = g.add1(MatMul {}, &[a, b], "y").unwrap();
        g.add_output("y", y);
        g
    }

    #[test]
    fn qdq_matmul_quantizes_statically_with_the_model_s_parameters() {
        let per_column = Tensor::new(vec![5], vec![0.01f32, 0.02, 0.015, 0.03, 0.005]).unwrap();
        for fq in [
            FakeQuant { scale: 0.013, zero_point: 120, lo: 0, hi: 255 },
            FakeQuant { scale: 0.011, zero_point: -5, lo: -128, hi: 127 },
        ] {
            let mut g = qdq_graph(fq, per_column.clone(), 1);
            let want = interp::run(&g, &inputs()).unwrap();
            let out = run_passes(&mut g, &mut QdqMatMul);
            assert_eq!(out.stats["integer_products"], 1, "{fq:?}");
            let static_act = g.nodes.iter().any(|n| {
                matches!(&n.op, Op::FusedMatMul(f) if matches!(f.int8, Some(ActQuant::Static { scale, .. }) if scale == fq.scale))
            });
            assert!(static_act, "{fq:?}");
            // Exact integer sums instead of float ones: the same values to float rounding.
            close(&interp::run(&g, &inputs()).unwrap(), &want, 1e-5);
        }
        // Per-row weight scales (axis 0) cannot move after the product: left alone.
        let per_row = Tensor::new(vec![8], vec![0.01f32; 8]).unwrap();
        let mut g = qdq_graph(FakeQuant { scale: 0.013, zero_point: 120, lo: 0, hi: 255 }, per_row, 0);
        assert!(!QdqMatMul.run(&mut g, &mut PassContext::default()).unwrap().changed);
    }
}

//! A loaded model and its executor.
//!
//! `Model::run` binds the model's symbols (`batch`, `sequence`...) from the input shapes,
//! checks every input against its declaration before any op runs, then executes the plan's
//! steps in order, releasing each intermediate after its last use. A `Model` is `Send + Sync`:
//! load it once and run it from many threads.

use crate::artifact::{self, Artifact};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::fast::Fast;
use crate::kernels::Tier;
use crate::op::{EvalContext, Fact, Op};
use crate::plan::{find_input as find, Input, Output, Plan, Slot};
use crate::tensor::Tensor;
use std::path::Path;
use std::time::Instant;

/// How a model is loaded.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Compile and use the JIT (default: yes, unless `TCC_JIT=0`).
    pub jit: bool,
    /// The kernel tier (default: the best this CPU runs, or `TCC_KERNEL_TIER`).
    pub tier: Option<Tier>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { jit: std::env::var("TCC_JIT").map(|v| v != "0").unwrap_or(true), tier: None }
    }
}

/// What [`Model::run_with_stats`] measures.
#[derive(Clone, Debug, Default)]
pub struct RunStats {
    /// Milliseconds per plan step, added over runs.
    pub step_ms: Vec<f64>,
    /// The most bytes of activations (inputs, intermediates, outputs) alive at once in the
    /// last run: what the plan's liveness keeps in memory besides the mapped weights.
    pub peak_activation_bytes: usize,
}

pub struct Model {
    plan: Plan,
    fast: Option<Fast>,
    constants: Vec<(Slot, Tensor)>,
    /// Per step: computed once at load from constants alone (its outputs are in `constants`).
    folded: Vec<bool>,
    last_use: Vec<Option<usize>>,
    keep: Vec<bool>,
    facts: Vec<Option<Fact>>,
    /// What the facts assume of the inputs' symbols, checked before a run.
    limits: Vec<crate::plan::Limit>,
    /// Inputs whose values index constant tables (token ids), checked before a run.
    index_bounds: Vec<crate::plan::IndexBound>,
    producer: String,
    report: serde_json::Value,
    size: u64,
    parameters: usize,
    #[cfg(feature = "tokenizer")]
    /// The embedded tokenizer (its own padding disabled) and its padding id.
    tokenizer: Option<(tokenizers::Tokenizer, u32)>,
    /// Milliseconds spent loading (mapping, verifying, validating).
    pub load_ms: f64,
}

/// Ops that turn stored weights into the weights a product reads (int8 weights kept small in
/// the artifact: `Cast` then a scale `Mul`): with the JIT, steps of these ops whose inputs are
/// all constants run once at load, not at every inference. The artifact keeps the small form;
/// memory holds the computed one, as onnxruntime's constant folding does.
const LOAD_TIME_OPS: &[&str] = &["Cast", "Mul", "Div", "Add", "Sub", "DequantizeLinear", "Transpose", "Reshape"];

/// The most elements a step folded at load may produce (larger ones stay per-inference).
const LOAD_TIME_MAX_ELEMENTS: usize = 1 << 26;

/// Runs the steps computable from constants alone at load (see [`LOAD_TIME_OPS`]); returns the
/// constants with their results added and, per step, whether it was folded. A step whose
/// evaluation fails is left to run (and report) at inference.
fn fold_at_load(
    plan: &Plan,
    mut constants: Vec<(Slot, Tensor)>,
    facts: &[Option<Fact>],
    jit: bool,
) -> (Vec<(Slot, Tensor)>, Vec<bool>) {
    let mut folded = vec![false; plan.steps.len()];
    if !jit {
        return (constants, folded);
    }
    let mut known: std::collections::HashMap<Slot, usize> =
        constants.iter().enumerate().map(|(i, (s, _))| (*s, i)).collect();
    let ctx = EvalContext::default();
    for (n, step) in plan.steps.iter().enumerate() {
        if !LOAD_TIME_OPS.contains(&step.op.name()) {
            continue;
        }
        let ins: Option<Vec<Option<&Tensor>>> = step
            .inputs
            .iter()
            .map(|i| match i {
                None => Some(None),
                Some(s) => known.get(s).map(|&k| Some(&constants[k].1)),
            })
            .collect();
        let Some(ins) = ins else { continue };
        // The outputs' sizes, known from the plan's facts, before anything is computed.
        let elements: Option<usize> = step
            .outputs
            .iter()
            .map(|s| facts.get(*s as usize)?.as_ref()?.concrete_shape().map(|d| d.iter().product::<usize>()))
            .sum();
        if elements.is_none_or(|e| e > LOAD_TIME_MAX_ELEMENTS) {
            continue;
        }
        let Ok(outs) = step.op.eval(&ctx, &ins) else { continue };
        for (s, t) in step.outputs.iter().zip(outs) {
            known.insert(*s, constants.len());
            constants.push((*s, t));
        }
        folded[n] = true;
    }
    (constants, folded)
}

/// Products whose `B` became a constant at load (dequantized weights) read it packed in
/// panels, as build-time packed weights are: the panels are made once here, and the step reads
/// them from a new constant slot.
fn pack_constant_products(plan: &mut Plan, constants: &mut Vec<(Slot, Tensor)>, facts: &mut Vec<Option<Fact>>) {
    for n in 0..plan.steps.len() {
        let Op::FusedMatMul(f) = &plan.steps[n].op else { continue };
        let Some(Some(bs)) = plan.steps[n].inputs.get(1).copied() else { continue };
        if f.packed.is_some() {
            continue;
        }
        let Some((_, b)) = constants.iter().find(|(s, _)| *s == bs) else { continue };
        if b.rank() != 2 || b.dtype() != DType::F32 {
            continue;
        }
        let Ok(w) = crate::op::fused::transpose_tensor(b, f.b_perm.as_deref().unwrap_or(&[0, 1])) else { continue };
        let (Ok(dense), &[k, nn]) = (w.as_slice::<f32>(), w.shape()) else { continue };
        let packed = crate::kernels::pack_b(k, nn, dense);
        let Ok(t) = Tensor::new(vec![packed.len()], packed) else { continue };
        let slot = plan.slots;
        plan.slots += 1;
        facts.push(Some(Fact::of_tensor(&t)));
        constants.push((slot, t));
        let mut g = f.clone();
        g.packed = Some([k, nn]);
        g.b_perm = None;
        plan.steps[n].op = g.into();
        plan.steps[n].inputs[1] = Some(slot);
    }
}

impl Model {
    /// Maps, verifies and validates an artifact.
    pub fn load(path: &Path) -> Result<Model> {
        Model::load_with(path, &LoadOptions::default())
    }

    pub fn load_with(path: &Path, opts: &LoadOptions) -> Result<Model> {
        let t0 = Instant::now();
        let a = artifact::load(path)?;
        let mut m = Model::from_artifact_with(a, opts)?;
        m.load_ms = t0.elapsed().as_secs_f64() * 1e3;
        tracing::debug!(path = %path.display(), ms = m.load_ms, "loaded");
        Ok(m)
    }

    pub fn from_artifact(a: Artifact) -> Result<Model> {
        Model::from_artifact_with(a, &LoadOptions::default())
    }

    pub fn from_artifact_with(a: Artifact, opts: &LoadOptions) -> Result<Model> {
        let mut plan = a.header.plan;
        let mut facts = plan.validate(&a.weights)?;
        let mut fast = if opts.jit { Some(Fast::new(&plan, opts.tier.unwrap_or_else(Tier::detect))?) } else { None };
        let constants: Vec<(Slot, Tensor)> = plan
            .constants
            .iter()
            .map(|c| (c.slot, a.weights.get(&c.weight).cloned().expect("validated: every constant's weight exists")))
            .collect();
        if let Some(f) = fast.as_mut() {
            f.prepare_int8(&plan, &constants);
        }
        let parameters = constants.iter().filter(|(_, t)| t.dtype() != DType::I64).map(|(_, t)| t.len()).sum();
        let (mut constants, folded) = fold_at_load(&plan, constants, &facts, opts.jit);
        if opts.jit {
            pack_constant_products(&mut plan, &mut constants, &mut facts);
            if let Some(f) = fast.as_mut() {
                f.prepare_sparse(&plan, &constants);
            }
            // Constants only folded or packed steps read (a dequantized weight, now packed)
            // are not kept.
            let mut read: std::collections::HashSet<Slot> = plan.outputs.iter().map(|o| o.slot).collect();
            for (step, _) in plan.steps.iter().zip(&folded).filter(|(_, f)| !**f) {
                read.extend(step.inputs.iter().flatten());
            }
            constants.retain(|(s, _)| read.contains(s));
        }
        let last_use = plan.last_uses();
        let mut keep = vec![false; plan.slots as usize];
        for o in &plan.outputs {
            keep[o.slot as usize] = true;
        }
        #[cfg(feature = "tokenizer")]
        let tokenizer = match &a.tokenizer {
            None => None,
            Some(b) => {
                let mut t = tokenizers::Tokenizer::from_bytes(b)
                    .map_err(|e| Error::Tokenizer(format!("embedded tokenizer: {e}")))?;
                // Padding is done here, to the longest text of a batch: a tokenizer.json that
                // pads every text to a fixed length would only make single texts slower.
                let pad_id = t.get_padding().map(|p| p.pad_id).unwrap_or(0);
                t.with_padding(None);
                Some((t, pad_id))
            }
        };
        let limits = crate::plan::Limit::of(&plan, &facts);
        let index_bounds = crate::plan::IndexBound::of(&plan, &facts);
        Ok(Model {
            plan,
            fast,
            constants,
            folded,
            last_use,
            keep,
            facts,
            limits,
            index_bounds,
            producer: a.header.producer,
            report: a.header.report,
            size: a.size,
            parameters,
            #[cfg(feature = "tokenizer")]
            tokenizer,
            load_ms: 0.0,
        })
    }

    pub fn inputs(&self) -> &[Input] {
        &self.plan.inputs
    }

    pub fn outputs(&self) -> &[Output] {
        &self.plan.outputs
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The kernel tier the model runs with (`None` without the JIT).
    pub fn tier(&self) -> Option<Tier> {
        self.fast.as_ref().map(|f| f.jit.tier)
    }

    /// The kernels this CPU runs the model's integer products and bf16 attention with
    /// ([`Fast::kernels`]; empty without the JIT or such ops), for reports.
    pub fn kernels(&self) -> Vec<String> {
        self.fast.as_ref().map(|f| f.kernels(&self.plan)).unwrap_or_default()
    }

    /// Milliseconds the JIT took at load.
    pub fn jit_ms(&self) -> f64 {
        self.fast.as_ref().map(|f| f.jit.compile_ms).unwrap_or(0.0)
    }

    /// The inferred fact of every slot.
    pub fn facts(&self) -> &[Option<Fact>] {
        &self.facts
    }

    /// The build report stored in the artifact.
    pub fn report(&self) -> &serde_json::Value {
        &self.report
    }

    pub fn producer(&self) -> &str {
        &self.producer
    }

    /// Artifact size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of weight elements (integer index tensors excluded).
    pub fn parameters(&self) -> usize {
        self.parameters
    }

    /// Runs the model. Inputs are given by name; outputs come back in declaration order.
    pub fn run(&self, inputs: &[(String, Tensor)]) -> Result<Vec<(String, Tensor)>> {
        self.run_with_stats(inputs, None)
    }

    /// Runs the model, recording each step's time and the peak of live activation memory in
    /// `stats` when given.
    pub fn run_with_stats(
        &self,
        inputs: &[(String, Tensor)],
        mut stats: Option<&mut RunStats>,
    ) -> Result<Vec<(String, Tensor)>> {
        if let Some(st) = stats.as_deref_mut() {
            st.step_ms.resize(self.plan.steps.len(), 0.0);
        }
        // Live activation buffers (inputs and step outputs; weights are mapped, not counted),
        // by data buffer, so that views sharing data count once.
        let mut live: std::collections::HashMap<usize, (usize, usize)> = Default::default();
        let mut live_bytes = 0usize;
        let mut peak = 0usize;
        let mut track = |t: &Tensor, add: bool, live_bytes: &mut usize, peak: &mut usize| {
            let e = live.entry(t.data_id()).or_insert((t.byte_len(), 0));
            if add {
                if e.1 == 0 {
                    *live_bytes += e.0;
                    *peak = (*peak).max(*live_bytes);
                }
                e.1 += 1;
            } else {
                e.1 -= 1;
                if e.1 == 0 {
                    *live_bytes -= e.0;
                }
            }
        };
        let symbols = crate::plan::bind_symbols(&self.plan.inputs, inputs)?;
        for l in &self.limits {
            l.check(&symbols)?;
        }
        for b in &self.index_bounds {
            b.check(inputs)?;
        }
        let ctx = EvalContext { symbols };
        let mut slots: Vec<Option<Tensor>> = vec![None; self.plan.slots as usize];
        for (s, t) in &self.constants {
            slots[*s as usize] = Some(t.clone());
        }
        for spec in &self.plan.inputs {
            let t = find(inputs, &spec.name)?.clone();
            track(&t, true, &mut live_bytes, &mut peak);
            slots[spec.slot as usize] = Some(t);
        }
        let is_const: Vec<bool> = {
            let mut v = vec![false; self.plan.slots as usize];
            for (s, _) in &self.constants {
                v[*s as usize] = true;
            }
            v
        };
        for (n, step) in self.plan.steps.iter().enumerate() {
            if self.folded[n] {
                continue;
            }
            let t0 = stats.is_some().then(Instant::now);
            let outs = {
                let ins: Vec<Option<&Tensor>> = step
                    .inputs
                    .iter()
                    .map(|s| match s {
                        None => Ok(None),
                        Some(s) => slots[*s as usize]
                            .as_ref()
                            .map(Some)
                            .ok_or_else(|| Error::Artifact(format!("slot {s} read after release"))),
                    })
                    .collect::<Result<_>>()?;
                let fast = self.fast.as_ref().and_then(|f| f.eval(&step.op, &ins));
                fast.unwrap_or_else(|| step.op.eval(&ctx, &ins)).map_err(|e| match e {
                    Error::Op { op, message } => Error::Op { op: format!("{op} `{}`", step.name), message },
                    e => e,
                })?
            };
            if let (Some(st), Some(t0)) = (stats.as_deref_mut(), t0) {
                st.step_ms[n] += t0.elapsed().as_secs_f64() * 1e3;
            }
            if outs.len() != step.outputs.len() {
                return Err(Error::op(
                    step.op.name(),
                    format!("made {} outputs, expected {}", outs.len(), step.outputs.len()),
                ));
            }
            for (s, t) in step.outputs.iter().zip(outs) {
                track(&t, true, &mut live_bytes, &mut peak);
                slots[*s as usize] = Some(t);
            }
            for s in step.inputs.iter().flatten() {
                if self.last_use[*s as usize] == Some(n) && !self.keep[*s as usize] {
                    if let Some(t) = slots[*s as usize].take() {
                        if !is_const[*s as usize] {
                            track(&t, false, &mut live_bytes, &mut peak);
                        }
                    }
                }
            }
        }
        if let Some(st) = stats {
            st.peak_activation_bytes = peak;
        }
        self.plan
            .outputs
            .iter()
            .map(|o| {
                let t = slots[o.slot as usize]
                    .clone()
                    .ok_or_else(|| Error::Artifact(format!("output `{}` was not computed", o.name)))?;
                Ok((o.name.clone(), t))
            })
            .collect()
    }

    /// Valid inputs of shape `[batch, sequence]` for benchmarks: random token ids below the
    /// vocabulary size (read from the embedding table the ids index), a full attention mask,
    /// zero token types, positions `0..sequence`.
    pub fn random_inputs(&self, batch: usize, sequence: usize, seed: u64) -> Result<Vec<(String, Tensor)>> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            state >> 33
        };
        let mut out = Vec::new();
        for spec in &self.plan.inputs {
            let n = spec.name.to_ascii_lowercase();
            let shape = vec![batch, sequence];
            let count = batch * sequence;
            let v: Vec<i64> = if n.contains("mask") {
                vec![1; count]
            } else if n.contains("token_type") || n.contains("segment") {
                vec![0; count]
            } else if n.contains("position") {
                (0..batch).flat_map(|_| 0..sequence as i64).collect()
            } else {
                let vocab = self.vocabulary(spec.slot).unwrap_or(1000).max(1);
                (0..count).map(|_| (next() % vocab as u64) as i64).collect()
            };
            if spec.shape.len() != 2 || !spec.dtype.is_int() {
                return Err(Error::Input(format!(
                    "cannot make random values for input `{}` ({}{:?})",
                    spec.name, spec.dtype, spec.shape
                )));
            }
            let t = Tensor::new(shape, v)?;
            out.push((spec.name.clone(), crate::op::cast_tensor(&t, spec.dtype)?));
        }
        Ok(out)
    }

    /// Rows of the constant table that a `Gather` indexes with slot `ids` (the vocabulary).
    fn vocabulary(&self, ids: Slot) -> Option<usize> {
        let step = self
            .plan
            .steps
            .iter()
            .find(|s| matches!(s.op, crate::op::Op::Gather(_)) && s.inputs.get(1) == Some(&Some(ids)))?;
        let table = step.inputs.first().copied().flatten()?;
        self.constants.iter().find(|(s, _)| *s == table).map(|(_, t)| t.shape().first().copied().unwrap_or(0))
    }

    /// Whether the artifact carries a tokenizer.
    pub fn has_tokenizer(&self) -> bool {
        #[cfg(feature = "tokenizer")]
        return self.tokenizer.is_some();
        #[cfg(not(feature = "tokenizer"))]
        false
    }

    /// Tokenizes texts with the embedded tokenizer into the model's inputs: token ids, an
    /// attention mask (1 for tokens, 0 for padding on the right), zero token types and
    /// positions `0..sequence` for the inputs that have those roles.
    #[cfg(feature = "tokenizer")]
    pub fn encode(&self, texts: &[&str]) -> Result<Vec<(String, Tensor)>> {
        let (tk, pad_id) = self
            .tokenizer
            .as_ref()
            .ok_or_else(|| Error::Tokenizer("this artifact has no tokenizer (build with --tokenizer)".into()))?;
        if texts.is_empty() {
            return Err(Error::Input("no text to encode".into()));
        }
        let encs: Vec<tokenizers::Encoding> = texts
            .iter()
            .map(|t| tk.encode(*t, true).map_err(|e| Error::Tokenizer(e.to_string())))
            .collect::<Result<_>>()?;
        let seq = encs.iter().map(|e| e.get_ids().len()).max().unwrap_or(0).max(1);
        let b = texts.len();
        let pad = *pad_id as i64;
        let mut ids = vec![pad; b * seq];
        let mut mask = vec![0i64; b * seq];
        for (i, e) in encs.iter().enumerate() {
            for (j, &id) in e.get_ids().iter().enumerate() {
                ids[i * seq + j] = id as i64;
                mask[i * seq + j] = 1;
            }
        }
        let mut out = Vec::new();
        for spec in &self.plan.inputs {
            let n = spec.name.to_ascii_lowercase();
            let v = if n.contains("input_ids") || n == "ids" || n.ends_with("_ids") && n.contains("input") {
                ids.clone()
            } else if n.contains("mask") {
                mask.clone()
            } else if n.contains("token_type") || n.contains("segment") {
                vec![0; b * seq]
            } else if n.contains("position") {
                (0..b).flat_map(|_| 0..seq as i64).collect()
            } else {
                return Err(Error::Input(format!("cannot fill input `{}` from text", spec.name)));
            };
            let t = Tensor::new(vec![b, seq], v)?;
            out.push((spec.name.clone(), crate::op::cast_tensor(&t, spec.dtype)?));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::ArtifactContents;
    use crate::dim::Dim;
    use crate::op::{Binary, BinaryKind};
    use crate::plan::{Constant, Step};

    fn model() -> Model {
        let n = Dim::sym("n");
        let plan = Plan {
            inputs: vec![
                Input { name: "x".into(), dtype: DType::F32, shape: vec![n.clone()], slot: 0 },
                Input { name: "y".into(), dtype: DType::F32, shape: vec![n.clone()], slot: 3 },
            ],
            outputs: vec![Output { name: "z".into(), slot: 4, dtype: DType::F32, shape: vec![n.clone()] }],
            constants: vec![Constant { slot: 1, weight: "b".into() }],
            steps: vec![
                Step {
                    op: Binary::new(BinaryKind::Add).into(),
                    inputs: vec![Some(0), Some(1)],
                    outputs: vec![2],
                    name: "a".into(),
                },
                Step {
                    op: Binary::new(BinaryKind::Mul).into(),
                    inputs: vec![Some(2), Some(3)],
                    outputs: vec![4],
                    name: "m".into(),
                },
            ],
            slots: 5,
        };
        let weights = vec![("b".to_string(), Tensor::new(vec![1], vec![1f32]).unwrap())];
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("tcc-model-{}-{n}.tcc", std::process::id()));
        artifact::write(
            &p,
            &ArtifactContents { plan: &plan, weights: &weights, tokenizer: None, report: serde_json::Value::Null },
        )
        .unwrap();
        let m = Model::load(&p).unwrap();
        // The mapping outlives the directory entry, so the file need not stay behind.
        std::fs::remove_file(&p).unwrap();
        m
    }

    fn f(v: &[f32]) -> Tensor {
        Tensor::new(vec![v.len()], v.to_vec()).unwrap()
    }

    #[test]
    fn runs_and_checks_inputs() {
        let m = model();
        let out = m.run(&[("x".into(), f(&[1., 2.])), ("y".into(), f(&[3., 4.]))]).unwrap();
        assert_eq!(out[0].1.as_slice::<f32>().unwrap(), &[6., 12.]);
        let err = |ins: &[(String, Tensor)]| m.run(ins).unwrap_err().to_string();
        assert!(err(&[("x".into(), f(&[1.]))]).contains("`y` is missing"));
        assert!(err(&[("x".into(), f(&[1.])), ("y".into(), f(&[1., 2.]))]).contains("another input"));
        assert!(err(&[("x".into(), f(&[1.])), ("y".into(), Tensor::new(vec![1], vec![1i64]).unwrap())])
            .contains("must be f32"));
        assert!(err(&[("x".into(), f(&[])), ("y".into(), f(&[]))]).contains("size 0"));
        let matrix = Tensor::new(vec![1, 1], vec![1f32]).unwrap();
        assert!(err(&[("x".into(), matrix), ("y".into(), f(&[1.]))]).contains("`x` must have rank 1"));
        assert!(err(&[("x".into(), f(&[1.])), ("y".into(), f(&[1.])), ("w".into(), f(&[1.]))]).contains("not an input"));
    }

    #[test]
    fn model_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Model>();
    }
}

//! The execution plan: what the compiler lowers a graph to and the runtime executes.
//!
//! A plan is a list of steps in execution order over numbered value slots. Slots are filled by
//! the model's inputs, by constants (weights in the artifact) and by step outputs; each slot is
//! written exactly once, before it is read. [`Plan::validate`] checks all of this, and runs
//! symbolic type inference over the steps, so that a loaded plan cannot index outside its
//! slots or feed an op inputs of the wrong type.

use crate::dim::Dim;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::op::{Fact, Op};
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// A slot number.
pub type Slot = u32;

/// A model input: name, dtype and symbolic shape, and the slot it fills.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Input {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<Dim>,
    pub slot: Slot,
}

/// A model output: name and the slot it is read from, with its inferred dtype and shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Output {
    pub name: String,
    pub slot: Slot,
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

/// A constant slot filled from a weight of the artifact.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Constant {
    pub slot: Slot,
    pub weight: String,
}

/// One op application.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub op: Op,
    /// `None` for an omitted optional input.
    pub inputs: Vec<Option<Slot>>,
    pub outputs: Vec<Slot>,
    /// The node name in the source model, for error messages.
    #[serde(default)]
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub inputs: Vec<Input>,
    pub outputs: Vec<Output>,
    pub constants: Vec<Constant>,
    pub steps: Vec<Step>,
    /// Number of slots.
    pub slots: u32,
}

/// Largest number of slots or steps a plan may declare.
const MAX_SLOTS: u32 = 1 << 24;

impl Plan {
    /// The step that writes each slot.
    pub fn producers(&self) -> HashMap<Slot, &Step> {
        self.steps.iter().flat_map(|st| st.outputs.iter().map(move |&o| (o, st))).collect()
    }

    /// The `Gather`s along axis 0 of a constant table (embedding lookups): `(step, table slot,
    /// indices slot)`.
    pub fn table_lookups(&self) -> impl Iterator<Item = (&Step, Slot, Slot)> {
        self.steps.iter().filter_map(|step| {
            let Op::Gather(g) = &step.op else { return None };
            let (Some(Some(data)), Some(Some(idx))) = (step.inputs.first(), step.inputs.get(1)) else { return None };
            (g.axis == 0 && self.constants.iter().any(|c| c.slot == *data)).then_some((step, *data, *idx))
        })
    }

    /// Checks the plan's structure against the weights it will run with, and infers every
    /// slot's fact. Returns the facts, indexed by slot.
    pub fn validate(&self, weights: &HashMap<String, Tensor>) -> Result<Vec<Option<Fact>>> {
        let bad = |m: String| Error::Artifact(format!("plan: {m}"));
        if self.slots > MAX_SLOTS || self.steps.len() > MAX_SLOTS as usize {
            return Err(bad(format!("{} slots and {} steps is too many", self.slots, self.steps.len())));
        }
        let mut facts: Vec<Option<Fact>> = vec![None; self.slots as usize];
        let define = |facts: &mut Vec<Option<Fact>>, slot: Slot, fact: Fact, what: &str| -> Result<()> {
            let cell =
                facts.get_mut(slot as usize).ok_or_else(|| bad(format!("{what} writes slot {slot} out of range")))?;
            if cell.is_some() {
                return Err(bad(format!("{what} writes slot {slot}, which is already written")));
            }
            *cell = Some(fact);
            Ok(())
        };
        let mut names = std::collections::HashSet::new();
        for i in &self.inputs {
            if !names.insert(&i.name) {
                return Err(bad(format!("input `{}` is declared twice", i.name)));
            }
            define(&mut facts, i.slot, Fact::new(i.dtype, i.shape.clone()), &format!("input `{}`", i.name))?;
        }
        for c in &self.constants {
            let w = weights.get(&c.weight).ok_or_else(|| bad(format!("weight `{}` is missing", c.weight)))?;
            define(&mut facts, c.slot, Fact::of_tensor(w), &format!("weight `{}`", c.weight))?;
        }
        for (n, step) in self.steps.iter().enumerate() {
            let what = || format!("step {n} ({} `{}`)", step.op.name(), step.name);
            let ins: Vec<Option<&Fact>> = step
                .inputs
                .iter()
                .map(|s| match s {
                    None => Ok(None),
                    Some(s) => match facts.get(*s as usize) {
                        Some(Some(f)) => Ok(Some(f)),
                        _ => Err(bad(format!("{} reads slot {s} before it is written", what()))),
                    },
                })
                .collect::<Result<_>>()?;
            if step.outputs.len() != step.op.num_outputs() {
                return Err(bad(format!(
                    "{} has {} outputs, the op makes {}",
                    what(),
                    step.outputs.len(),
                    step.op.num_outputs()
                )));
            }
            let outs = step.op.infer(&ins).map_err(|e| bad(format!("{}: {e}", what())))?;
            for (slot, fact) in step.outputs.iter().zip(outs) {
                define(&mut facts, *slot, fact, &what())?;
            }
        }
        for o in &self.outputs {
            match facts.get(o.slot as usize) {
                Some(Some(_)) => {}
                _ => return Err(bad(format!("output `{}` reads slot {}, which is never written", o.name, o.slot))),
            }
        }
        Ok(facts)
    }

    /// For each slot, the index of the last step that reads it (`None` if no step does).
    pub fn last_uses(&self) -> Vec<Option<usize>> {
        let mut last = vec![None; self.slots as usize];
        for (n, step) in self.steps.iter().enumerate() {
            for s in step.inputs.iter().flatten() {
                if let Some(cell) = last.get_mut(*s as usize) {
                    *cell = Some(n);
                }
            }
        }
        last
    }

    /// The transformer structures the plan runs as fused kernels: `Attention`, `LayerNorm`,
    /// `Gelu` (standalone or folded into a product's epilogue) and `Linear` (a product with
    /// packed weights).
    pub fn structure_counts(&self) -> BTreeMap<String, usize> {
        let mut m: BTreeMap<String, usize> =
            ["Attention", "LayerNorm", "Gelu", "Linear"].iter().map(|s| (s.to_string(), 0)).collect();
        let mut count = |k: &str| *m.entry(k.to_string()).or_insert(0) += 1;
        for s in &self.steps {
            match &s.op {
                Op::Attention(_) => count("Attention"),
                Op::LayerNorm(_) => count("LayerNorm"),
                Op::Gelu(_) => count("Gelu"),
                Op::FusedMatMul(f) => {
                    if f.packed.is_some() {
                        count("Linear");
                    }
                    for name in f.fused.iter().filter(|n| *n == "Gelu") {
                        count(name);
                    }
                }
                _ => {}
            }
        }
        m
    }

    /// How many times each op name occurs.
    pub fn op_counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for s in &self.steps {
            *m.entry(s.op.name().to_string()).or_insert(0) += 1;
        }
        m
    }
}

/// Checks inputs against their declarations (names, dtypes, ranks, dims, no empty dims) and
/// binds the symbols of the declared shapes to the given sizes.
pub fn bind_symbols(specs: &[Input], inputs: &[(String, Tensor)]) -> Result<BTreeMap<String, i64>> {
    let mut symbols: BTreeMap<String, i64> = BTreeMap::new();
    for (name, _) in inputs {
        if !specs.iter().any(|i| &i.name == name) {
            let known: Vec<&str> = specs.iter().map(|i| i.name.as_str()).collect();
            return Err(Error::Input(format!("`{name}` is not an input of this model (inputs: {})", known.join(", "))));
        }
    }
    // Single-symbol dims bind first; expressions are checked after.
    let mut later = Vec::new();
    for spec in specs {
        let t = find_input(inputs, &spec.name)?;
        if t.dtype() != spec.dtype {
            return Err(Error::Input(format!("`{}` must be {}, got {}", spec.name, spec.dtype, t.dtype())));
        }
        if t.rank() != spec.shape.len() {
            return Err(Error::Input(format!(
                "`{}` must have rank {} ({}), got shape {:?}",
                spec.name,
                spec.shape.len(),
                fmt_dims(&spec.shape),
                t.shape()
            )));
        }
        for (axis, (d, &n)) in spec.shape.iter().zip(t.shape()).enumerate() {
            if n == 0 {
                return Err(Error::Input(format!("`{}` has size 0 on axis {axis} ({d})", spec.name)));
            }
            let syms = d.symbols();
            if let Some(c) = d.as_const() {
                if c != n as i64 {
                    return Err(Error::Input(format!("`{}` axis {axis} must be {c}, got {n}", spec.name)));
                }
            } else if syms.len() == 1 && *d == Dim::sym(&syms[0]) {
                let prev = *symbols.entry(syms[0].to_string()).or_insert(n as i64);
                if prev != n as i64 {
                    return Err(Error::Input(format!(
                        "`{}` axis {axis} is `{d}` = {n}, but another input has `{d}` = {prev}",
                        spec.name
                    )));
                }
            } else {
                later.push((spec, axis, d, n));
            }
        }
    }
    for (spec, axis, d, n) in later {
        let env = |s: &str| symbols.get(s).copied();
        match d.eval(&env) {
            Some(v) if v == n as i64 => {}
            Some(v) => return Err(Error::Input(format!("`{}` axis {axis} must be {d} = {v}, got {n}", spec.name))),
            None => {
                return Err(Error::Input(format!("`{}` axis {axis} is `{d}`, which no input determines", spec.name)))
            }
        }
    }
    Ok(symbols)
}

/// A bound the plan's facts assume of the inputs' symbols: a `Slice` (step 1) whose end is
/// symbolic (`position_ids[:, :sequence]`, a table of positions cut to the sequence) is inferred
/// as if the end lay within the sliced dim, which holds only up to the dim's size (past it,
/// `Slice` clamps, and a later op fails on shapes that disagree, far from the cause); a lookup of
/// positions `Range(0, n)` in a table of `max` rows holds only for `n <= max`.
#[derive(Clone, Debug, PartialEq)]
pub struct Limit {
    /// The symbolic end (`sequence`).
    pub end: Dim,
    /// The size of the sliced dim: the largest value the end may take.
    pub max: i64,
    /// What sets the bound, for the error.
    pub why: String,
}

impl Limit {
    /// The plan's limits, from its `Slice` and position-lookup steps and their facts.
    pub fn of(plan: &Plan, facts: &[Option<Fact>]) -> Vec<Limit> {
        let fact = |s: Option<&Option<Slot>>| s.copied().flatten().and_then(|s| facts.get(s as usize)?.as_ref());
        let mut out = Vec::new();
        for step in &plan.steps {
            if !matches!(step.op, Op::Slice(_)) {
                continue;
            }
            let (Some(x), Some(ends)) =
                (fact(step.inputs.first()), fact(step.inputs.get(2)).and_then(crate::op::shape_operand))
            else {
                continue;
            };
            // Symbolic bounds are inferred for unit steps only.
            let unit = match step.inputs.get(4).copied().flatten() {
                None => true,
                Some(_) => {
                    fact(step.inputs.get(4)).and_then(|f| f.const_i64s()).is_some_and(|v| v.iter().all(|&x| x == 1))
                }
            };
            if !unit {
                continue;
            }
            let axes: Vec<i64> = match step.inputs.get(3).copied().flatten() {
                None => (0..ends.len() as i64).collect(),
                Some(_) => match fact(step.inputs.get(3)).and_then(|f| f.const_i64s()) {
                    Some(a) => a,
                    None => continue,
                },
            };
            for (end, &axis) in ends.iter().zip(&axes) {
                let axis = if axis < 0 { axis + x.rank() as i64 } else { axis };
                let dim = usize::try_from(axis).ok().and_then(|a| x.shape.get(a)).and_then(|d| d.as_const());
                if let (None, Some(max)) = (end.as_const(), dim) {
                    let why = format!("`{}` cuts a table of {max} entries to it", step.name);
                    out.push(Limit { end: end.clone(), max, why });
                }
            }
        }
        // A lookup of positions `Range(0, n)` in a constant table of `max` rows (onnxruntime's
        // fused embeddings): n <= max.
        let producer = plan.producers();
        for (step, _, idx) in plan.table_lookups() {
            let Some(range) = producer.get(&idx).filter(|r| matches!(r.op, Op::Range(_))) else { continue };
            let scalar =
                |i: usize| fact(range.inputs.get(i)).and_then(|f| f.const_i64s()).and_then(|v| v.first().copied());
            let limit = fact(range.inputs.get(1)).and_then(|f| f.value.as_ref()?.data.first().cloned());
            let rows = fact(step.inputs.first()).and_then(|f| f.shape.first()?.as_const());
            if let (Some(0), Some(1), Some(end), Some(max)) = (scalar(0), scalar(2), limit, rows) {
                if end.as_const().is_none() {
                    let why = format!("`{}` looks up positions 0..{end} in a table of {max}", step.name);
                    out.push(Limit { end, max, why });
                }
            }
        }
        out
    }

    /// An input error when the bound symbols put the end past the dim.
    pub fn check(&self, symbols: &BTreeMap<String, i64>) -> Result<()> {
        match self.end.eval(&|s: &str| symbols.get(s).copied()) {
            Some(v) if v > self.max => Err(Error::Input(format!(
                "`{}` = {v} is more than this model takes: at most {} ({})",
                self.end, self.max, self.why
            ))),
            _ => Ok(()),
        }
    }
}

/// An input whose values index the rows of a constant table (token ids in the word
/// embeddings, token types in theirs), directly or through a `Cast`: checked before any op
/// runs, so that an id past the vocabulary is an input error naming the input, not a lookup
/// failure. Negative ids count from the end, as ONNX `Gather` defines.
#[derive(Clone, Debug, PartialEq)]
pub struct IndexBound {
    pub input: String,
    pub rows: i64,
    /// The lookup's step name.
    pub step: String,
}

impl IndexBound {
    /// The plan's inputs that index constant tables.
    pub fn of(plan: &Plan, facts: &[Option<Fact>]) -> Vec<IndexBound> {
        let producer = plan.producers();
        let input_at = |s: Slot| plan.inputs.iter().find(|i| i.slot == s);
        let mut out: Vec<IndexBound> = Vec::new();
        for (step, data, idx) in plan.table_lookups() {
            // The indices: an input, or an input cast (onnxruntime's int32 ids).
            let source = input_at(idx).or_else(|| {
                let p = producer.get(&idx).filter(|p| matches!(p.op, Op::Cast(_)))?;
                input_at(p.inputs.first().copied().flatten()?)
            });
            let rows = facts.get(data as usize).and_then(|f| f.as_ref()?.shape.first()?.as_const());
            if let (Some(input), Some(rows)) = (source, rows) {
                if !out.iter().any(|b| b.input == input.name && b.rows <= rows) {
                    out.retain(|b| b.input != input.name);
                    out.push(IndexBound { input: input.name.clone(), rows, step: step.name.clone() });
                }
            }
        }
        out
    }

    /// An input error for the first value outside `-rows..rows`.
    pub fn check(&self, inputs: &[(String, Tensor)]) -> Result<()> {
        let Ok(t) = find_input(inputs, &self.input) else { return Ok(()) };
        let Ok(values) = t.to_i64s() else { return Ok(()) };
        if let Some(at) = values.iter().position(|&v| v < -self.rows || v >= self.rows) {
            let mut index = Vec::new();
            let mut rest = at;
            for &d in t.shape().iter().rev() {
                index.push(rest % d.max(1));
                rest /= d.max(1);
            }
            index.reverse();
            return Err(Error::Input(format!(
                "`{}` holds {} at {index:?}, outside the {} rows of the table it indexes (`{}`)",
                self.input, values[at], self.rows, self.step
            )));
        }
        Ok(())
    }
}

/// The tensor given for input `name`.
pub fn find_input<'a>(inputs: &'a [(String, Tensor)], name: &str) -> Result<&'a Tensor> {
    inputs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t)
        .ok_or_else(|| Error::Input(format!("input `{name}` is missing")))
}

fn fmt_dims(d: &[Dim]) -> String {
    format!("[{}]", d.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", "))
}

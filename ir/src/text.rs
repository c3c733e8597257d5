//! The IR's text form, for tests, `--print-after` and reading by people.
//!
//! ```text
//! graph tiny(%x: f32[batch, 4]) {
//!   %w = const f32[4] [0.5, 1, 2, 4]
//!   %y = Mul(%x, %w) : f32[batch, 4]
//!   %a, %b = Split{axis=1, outputs=2}(%y) : f32[batch, 2], f32[batch, 2]
//!   %s = Slice(%x, %st, %en, _, _) : f32[batch, 1]
//!   return %a as "first", %b
//! }
//! ```
//!
//! Attributes are `name=JSON`; `_` is an omitted optional input; constants are inlined as a
//! flat JSON array, or printed as `@"name"` references to a weight table when large. Names that
//! are not plain identifiers are quoted. [`parse`] reads what [`print`] writes.

use crate::error::{Error, Result};
use crate::graph::{Def, Graph, QuantParams, ValueId};
use std::collections::HashMap;
use std::fmt::Write;
use tcc_runtime::{DType, Dim, Fact, Op, Tensor};

/// Printing options.
#[derive(Clone, Copy, Debug)]
pub struct PrintOptions {
    /// Constants with at most this many elements are printed inline.
    pub inline_limit: usize,
}

impl Default for PrintOptions {
    fn default() -> Self {
        PrintOptions { inline_limit: 16 }
    }
}

fn is_plain(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.')
}

fn quote(name: &str) -> String {
    if is_plain(name) {
        name.to_string()
    } else {
        serde_json::to_string(name).expect("strings serialize")
    }
}

fn fmt_fact(f: &Fact) -> String {
    f.to_string()
}

fn fmt_data(t: &Tensor) -> String {
    match t.dtype() {
        DType::F32 => {
            let v: Vec<String> = t.as_slice::<f32>().unwrap_or_default().iter().map(|x| fmt_f32(*x)).collect();
            format!("[{}]", v.join(", "))
        }
        _ => format!("{:?}", t.to_i64s().unwrap_or_default()),
    }
}

fn fmt_f32(x: f32) -> String {
    if x.is_nan() {
        "\"nan\"".into()
    } else if x.is_infinite() {
        if x > 0.0 { "\"inf\"" } else { "\"-inf\"" }.into()
    } else {
        // Shortest representation that reads back to the same f32.
        let s = format!("{x:?}");
        s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
    }
}

fn fmt_quant(q: &QuantParams) -> String {
    if q.scale.len() > 16 {
        // Per-channel parameters of a large tensor: a summary for reading (not parseable, like the
        // `@` weight references next to it).
        let (lo, hi) = q.scale.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
        return format!(
            " quant{{channels={}, axis={}, scale_range=[{}, {}]}}",
            q.scale.len(),
            q.axis.unwrap_or(0),
            fmt_f32(lo),
            fmt_f32(hi)
        );
    }
    let mut s =
        format!(" quant{{scale={}, zero_point={:?}", serde_json::to_string(&q.scale).unwrap_or_default(), q.zero_point);
    if let Some(a) = q.axis {
        let _ = write!(s, ", axis={a}");
    }
    s.push('}');
    s
}

/// The text form of a graph.
pub fn print(g: &Graph) -> String {
    print_with(g, PrintOptions::default())
}

pub fn print_with(g: &Graph, opts: PrintOptions) -> String {
    // Unique printed names.
    let mut names: HashMap<ValueId, String> = HashMap::new();
    let mut taken: HashMap<String, usize> = HashMap::new();
    let mut name_of = |v: ValueId, base: &str| -> String {
        if let Some(n) = names.get(&v) {
            return n.clone();
        }
        let base = if base.is_empty() { format!("v{}", v.0) } else { base.to_string() };
        let k = taken.entry(base.clone()).or_insert(0);
        let n = if *k == 0 { base.clone() } else { format!("{base}~{k}") };
        *k += 1;
        names.insert(v, n.clone());
        n
    };
    let mut out = String::new();
    let params: Vec<String> = g
        .inputs
        .iter()
        .map(|&v| {
            let val = g.value(v);
            format!(
                "%{}: {}{}",
                quote(&name_of(v, &val.name)),
                fmt_fact(&val.fact),
                val.quant.as_ref().map(fmt_quant).unwrap_or_default()
            )
        })
        .collect();
    let _ =
        writeln!(out, "graph {}({}) {{", quote(if g.name.is_empty() { "main" } else { &g.name }), params.join(", "));
    for v in g.used_consts() {
        let val = g.value(v);
        let Def::Const(t) = &val.def else { continue };
        let n = quote(&name_of(v, &val.name));
        let data = if t.len() <= opts.inline_limit {
            fmt_data(t)
        } else {
            format!("@{}", serde_json::to_string(&val.name).unwrap_or_default())
        };
        let _ = writeln!(
            out,
            "  %{n} = const {}{} {data}",
            fmt_fact(&val.fact),
            val.quant.as_ref().map(fmt_quant).unwrap_or_default()
        );
    }
    for node in &g.nodes {
        let outs: Vec<String> =
            node.outputs.iter().map(|&o| format!("%{}", quote(&name_of(o, &g.value(o).name)))).collect();
        let attrs = match node.op.attrs() {
            serde_json::Value::Object(m) if !m.is_empty() => {
                let kv: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("{{{}}}", kv.join(", "))
            }
            _ => String::new(),
        };
        let ins: Vec<String> = node
            .inputs
            .iter()
            .map(|i| match i {
                None => "_".to_string(),
                Some(v) => format!("%{}", quote(&name_of(*v, &g.value(*v).name))),
            })
            .collect();
        let types: Vec<String> = node
            .outputs
            .iter()
            .map(|&o| {
                format!("{}{}", fmt_fact(g.fact(o)), g.value(o).quant.as_ref().map(fmt_quant).unwrap_or_default())
            })
            .collect();
        let _ = writeln!(
            out,
            "  {} = {}{attrs}({}) : {}",
            outs.join(", "),
            node.op.name(),
            ins.join(", "),
            types.join(", ")
        );
    }
    let rets: Vec<String> = g
        .outputs
        .iter()
        .map(|o| {
            let n = name_of(o.value, &g.value(o.value).name);
            if n == o.name {
                format!("%{}", quote(&n))
            } else {
                format!("%{} as {}", quote(&n), quote(&o.name))
            }
        })
        .collect();
    let _ = writeln!(out, "  return {}", rets.join(", "));
    out.push_str("}\n");
    out
}

/// Reads the text form. `weights` resolves `@"name"` constants.
pub fn parse(text: &str) -> Result<Graph> {
    parse_with_weights(text, &HashMap::new())
}

pub fn parse_with_weights(text: &str, weights: &HashMap<String, Tensor>) -> Result<Graph> {
    let mut g = Graph::default();
    let mut scope: HashMap<String, ValueId> = HashMap::new();
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l)).filter(|(_, l)| {
        let t = l.trim();
        !t.is_empty() && !t.starts_with('#')
    });
    let (ln, header) = lines.next().ok_or(Error::Parse { line: 1, message: "empty text".into() })?;
    let mut c = Cursor::new(header, ln);
    c.keyword("graph")?;
    g.name = c.name()?;
    c.expect('(')?;
    if !c.eat(')') {
        loop {
            let n = c.value_name()?;
            c.expect(':')?;
            let fact = c.fact()?;
            let v = g.add_input(n.clone(), fact);
            g.value_mut(v).quant = c.quant()?;
            scope.insert(n, v);
            if c.eat(')') {
                break;
            }
            c.expect(',')?;
        }
    }
    c.expect('{')?;
    c.end()?;
    let mut closed = false;
    for (ln, line) in lines {
        let mut c = Cursor::new(line, ln);
        if c.eat('}') {
            c.end()?;
            closed = true;
            break;
        }
        if c.try_keyword("return") {
            loop {
                let v = c.value_name()?;
                let id = *scope.get(&v).ok_or_else(|| c.err(format!("unknown value %{v}")))?;
                let name = if c.try_keyword("as") { c.name()? } else { v };
                g.add_output(name, id);
                if !c.eat(',') {
                    break;
                }
            }
            c.end()?;
            continue;
        }
        let mut outs = vec![c.value_name()?];
        while c.eat(',') {
            outs.push(c.value_name()?);
        }
        c.expect('=')?;
        if c.try_keyword("const") {
            let fact = c.fact()?;
            let quant = c.quant()?;
            let shape = fact.concrete_shape().ok_or_else(|| c.err("a constant needs a concrete shape".into()))?;
            let t = if c.eat('@') {
                let wname = c.name()?;
                let t = weights.get(&wname).ok_or_else(|| c.err(format!("no weight named {wname:?}")))?.clone();
                if t.dtype() != fact.dtype || t.shape() != shape.as_slice() {
                    return Err(c.err(format!("weight {wname:?} is {t:?}, declared {fact}")));
                }
                t
            } else {
                c.tensor(fact.dtype, shape)?
            };
            c.end()?;
            let [n] = outs.as_slice() else {
                return Err(c.err("a constant defines one value".into()));
            };
            let v = g.add_const(n.clone(), t);
            g.value_mut(v).quant = quant;
            scope.insert(n.clone(), v);
            continue;
        }
        let op_name = c.ident()?;
        let attrs = if c.peek() == Some('{') { c.attrs()? } else { serde_json::Value::Object(Default::default()) };
        let op = Op::from_name(&op_name, attrs).map_err(|e| c.err(e))?;
        c.expect('(')?;
        let mut ins = Vec::new();
        if !c.eat(')') {
            loop {
                if c.eat('_') {
                    ins.push(None);
                } else {
                    let v = c.value_name()?;
                    ins.push(Some(*scope.get(&v).ok_or_else(|| c.err(format!("unknown value %{v}")))?));
                }
                if c.eat(')') {
                    break;
                }
                c.expect(',')?;
            }
        }
        let mut declared = Vec::new();
        if c.eat(':') {
            loop {
                declared.push((c.fact()?, c.quant()?));
                if !c.eat(',') {
                    break;
                }
            }
        }
        c.end()?;
        let node_name = outs[0].clone();
        let ids = g.add_node(op, ins, node_name).map_err(|e| c.err(e.to_string()))?;
        if ids.len() != outs.len() {
            return Err(c.err(format!("the op makes {} outputs, {} are named", ids.len(), outs.len())));
        }
        if !declared.is_empty() && declared.len() != ids.len() {
            return Err(c.err(format!("{} types for {} outputs", declared.len(), ids.len())));
        }
        for (k, (id, n)) in ids.iter().zip(&outs).enumerate() {
            g.value_mut(*id).name = n.clone();
            if let Some((fact, quant)) = declared.get(k) {
                let have = g.fact(*id);
                let agree = have.dtype == fact.dtype
                    && have.rank() == fact.rank()
                    && have.shape.iter().zip(&fact.shape).all(|(a, b)| a == b || a.is_unknown());
                if !agree {
                    return Err(c.err(format!("%{n} is declared {fact}, inferred {have}")));
                }
                g.value_mut(*id).quant = quant.clone();
            }
            scope.insert(n.clone(), *id);
        }
    }
    if !closed {
        return Err(Error::Parse { line: text.lines().count(), message: "missing closing `}`".into() });
    }
    Ok(g)
}

/// A cursor over one line.
struct Cursor<'a> {
    s: &'a str,
    i: usize,
    line: usize,
}

impl<'a> Cursor<'a> {
    fn new(s: &'a str, line: usize) -> Cursor<'a> {
        Cursor { s, i: 0, line }
    }

    fn err(&self, message: String) -> Error {
        Error::Parse { line: self.line, message }
    }

    fn ws(&mut self) {
        while self.i < self.s.len() && self.s.as_bytes()[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<char> {
        self.ws();
        self.s[self.i..].chars().next()
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.i += c.len_utf8();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: char) -> Result<()> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(self.err(format!("expected `{c}` at `{}`", &self.s[self.i..])))
        }
    }

    fn end(&mut self) -> Result<()> {
        self.ws();
        let rest = &self.s[self.i..];
        if rest.is_empty() || rest.starts_with('#') {
            Ok(())
        } else {
            Err(self.err(format!("unexpected `{rest}`")))
        }
    }

    fn ident(&mut self) -> Result<String> {
        self.ws();
        let start = self.i;
        while self.i < self.s.len() && {
            let c = self.s.as_bytes()[self.i];
            c.is_ascii_alphanumeric() || c == b'_' || c == b'.'
        } {
            self.i += 1;
        }
        if start == self.i {
            return Err(self.err(format!("expected a name at `{}`", &self.s[start..])));
        }
        Ok(self.s[start..self.i].to_string())
    }

    fn try_keyword(&mut self, k: &str) -> bool {
        self.ws();
        let rest = &self.s[self.i..];
        let after = rest.as_bytes().get(k.len()).copied();
        if rest.starts_with(k) && !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_') {
            self.i += k.len();
            true
        } else {
            false
        }
    }

    fn keyword(&mut self, k: &str) -> Result<()> {
        if self.try_keyword(k) {
            Ok(())
        } else {
            Err(self.err(format!("expected `{k}`")))
        }
    }

    fn json(&mut self) -> Result<serde_json::Value> {
        self.ws();
        let mut it = serde_json::Deserializer::from_str(&self.s[self.i..]).into_iter::<serde_json::Value>();
        let v = it
            .next()
            .ok_or_else(|| self.err("expected a value".into()))?
            .map_err(|e| self.err(format!("bad value: {e}")))?;
        self.i += it.byte_offset();
        Ok(v)
    }

    /// A plain or quoted name.
    fn name(&mut self) -> Result<String> {
        if self.peek() == Some('"') {
            match self.json()? {
                serde_json::Value::String(s) => Ok(s),
                _ => Err(self.err("expected a quoted name".into())),
            }
        } else {
            self.ident()
        }
    }

    fn value_name(&mut self) -> Result<String> {
        self.expect('%')?;
        self.name()
    }

    fn fact(&mut self) -> Result<Fact> {
        let dt = self.ident()?;
        let dtype = DType::from_name(&dt).ok_or_else(|| self.err(format!("unknown dtype `{dt}`")))?;
        self.expect('[')?;
        let mut shape = Vec::new();
        if !self.eat(']') {
            loop {
                self.ws();
                let start = self.i;
                let mut depth = 0;
                while self.i < self.s.len() {
                    let c = self.s.as_bytes()[self.i];
                    if depth == 0 && (c == b',' || c == b']') {
                        break;
                    }
                    if c == b'(' {
                        depth += 1;
                    }
                    if c == b')' {
                        depth -= 1;
                    }
                    self.i += 1;
                }
                let text = self.s[start..self.i].trim();
                shape.push(Dim::parse(text).map_err(|e| self.err(e))?);
                if self.eat(']') {
                    break;
                }
                self.expect(',')?;
            }
        }
        Ok(Fact::new(dtype, shape))
    }

    fn quant(&mut self) -> Result<Option<QuantParams>> {
        if !self.try_keyword("quant") {
            return Ok(None);
        }
        let attrs = self.attrs()?;
        serde_json::from_value(attrs).map(Some).map_err(|e| self.err(format!("bad quant parameters: {e}")))
    }

    /// `{k=JSON, ...}` as a JSON object.
    fn attrs(&mut self) -> Result<serde_json::Value> {
        self.expect('{')?;
        let mut m = serde_json::Map::new();
        if !self.eat('}') {
            loop {
                let k = self.ident()?;
                self.expect('=')?;
                let v = self.json()?;
                m.insert(k, v);
                if self.eat('}') {
                    break;
                }
                self.expect(',')?;
            }
        }
        Ok(serde_json::Value::Object(m))
    }

    fn tensor(&mut self, dtype: DType, shape: Vec<usize>) -> Result<Tensor> {
        let v = self.json()?;
        let items = v.as_array().ok_or_else(|| self.err("constant data must be a flat JSON array".into()))?;
        let num = |x: &serde_json::Value| -> Result<f64> {
            match x {
                serde_json::Value::Number(n) => n.as_f64().ok_or_else(|| self.err(format!("bad number {n}"))),
                serde_json::Value::String(s) if s == "nan" => Ok(f64::NAN),
                serde_json::Value::String(s) if s == "inf" => Ok(f64::INFINITY),
                serde_json::Value::String(s) if s == "-inf" => Ok(f64::NEG_INFINITY),
                serde_json::Value::Bool(b) => Ok(f64::from(u8::from(*b))),
                _ => Err(self.err(format!("bad element {x}"))),
            }
        };
        let t = match dtype {
            DType::F32 => {
                Tensor::new(shape, items.iter().map(|x| num(x).map(|v| v as f32)).collect::<Result<Vec<_>>>()?)
            }
            DType::I64 => Tensor::new(
                shape,
                items
                    .iter()
                    .map(|x| x.as_i64().ok_or_else(|| self.err(format!("bad i64 {x}"))))
                    .collect::<Result<Vec<_>>>()?,
            ),
            d => {
                let v: Vec<i64> = items.iter().map(|x| num(x).map(|v| v as i64)).collect::<Result<_>>()?;
                Tensor::new(shape, v).and_then(|t| tcc_runtime::op::cast_tensor(&t, d))
            }
        };
        t.map_err(|e| self.err(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"graph tiny(%x: f32[batch, 4], %"odd name": i64[2]) {
  %w = const f32[4] [0.5, 1, 2, "-inf"]
  %s = const i64[1] [1]
  %z = const i64[1] [0]
  %y = Mul(%x, %w) : f32[batch, 4]
  %a, %b = Split{axis=1, outputs=2}(%y) : f32[batch, 2], f32[batch, 2]
  %c = Slice(%a, %z, %s, %s, _) : f32[batch, 1]
  %q = QuantizeLinear{axis=1}(%x, %w) : u8[batch, 4] quant{scale=[0.5], zero_point=[0]}
  return %b as "out:0", %c, %q
}
"#;

    #[test]
    fn print_parse_round_trip() {
        let g = parse(TEXT).unwrap();
        crate::verify(&g).unwrap();
        assert_eq!(print(&g), TEXT);
        assert_eq!(g.outputs[0].name, "out:0");
    }

    #[test]
    fn parse_errors_name_the_line() {
        let cases = [
            ("graph g() {\n  %y = Nope(%x) : f32[1]\n}", "line 2"),
            ("graph g(%x: f32[2]) {\n  %y = Neg(%z) : f32[2]\n}", "unknown value"),
            ("graph g(%x: f32[2]) {\n  %y = Neg(%x) : i64[2]\n}", "declared"),
            ("graph g(%x: f32[2]) {\n  return %x\n", "missing closing"),
            ("graph g(%x: f9[2]) {\n}", "unknown dtype"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}

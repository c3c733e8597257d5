//! Symbolic dimensions: `batch`, `sequence*12`, `(sequence+1)/2`.
//!
//! A [`Dim`] is an integer polynomial over named symbols, kept in a canonical form (terms sorted,
//! no zero coefficients), so two dims that are equal as expressions compare equal with `==`.
//! Floor division by a constant that does not divide every coefficient becomes an atom of its own.
//! Symbols are bound at run time from the shapes of a model's inputs; [`Dim::eval`] then gives
//! the concrete size.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;

/// A factor of a monomial.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub enum Atom {
    Sym(Arc<str>),
    /// `floor(dim / d)` with `d > 1`, where `d` does not divide `dim` exactly.
    FloorDiv(Box<Dim>, i64),
}

type Monomial = Vec<Atom>;

/// A symbolic dimension in canonical polynomial form.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Dim {
    /// Sorted by monomial; the constant term has the empty monomial; no zero coefficients.
    terms: Vec<(Monomial, i64)>,
}

impl PartialOrd for Dim {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Dim {
    fn cmp(&self, other: &Self) -> Ordering {
        self.terms.cmp(&other.terms)
    }
}

static FRESH: AtomicU64 = AtomicU64::new(0);

impl Dim {
    pub fn constant(v: i64) -> Dim {
        if v == 0 {
            Dim { terms: vec![] }
        } else {
            Dim { terms: vec![(vec![], v)] }
        }
    }

    pub fn sym(name: &str) -> Dim {
        Dim { terms: vec![(vec![Atom::Sym(name.into())], 1)] }
    }

    /// A dimension nothing is known about, distinct from every other (`?N`).
    pub fn unknown() -> Dim {
        let n = FRESH.fetch_add(1, AtomicOrdering::Relaxed);
        Dim::sym(&format!("?{n}"))
    }

    fn from_map(map: BTreeMap<Monomial, i64>) -> Dim {
        Dim { terms: map.into_iter().filter(|(_, c)| *c != 0).collect() }
    }

    /// The value, when the dim does not depend on any symbol.
    pub fn as_const(&self) -> Option<i64> {
        match self.terms.as_slice() {
            [] => Some(0),
            [(m, c)] if m.is_empty() => Some(*c),
            _ => None,
        }
    }

    pub fn is_const(&self) -> bool {
        self.as_const().is_some()
    }

    /// True when the dim is at least 1 for every value of its symbols (symbols are sizes, and
    /// sizes are at least 1): every term has a positive coefficient and no floor division.
    pub fn is_positive(&self) -> bool {
        !self.terms.is_empty() && self.terms.iter().all(|(m, c)| *c > 0 && m.iter().all(|a| matches!(a, Atom::Sym(_))))
    }

    /// True when the dim contains a symbol made by [`Dim::unknown`].
    pub fn is_unknown(&self) -> bool {
        self.symbols().iter().any(|s| s.starts_with('?'))
    }

    /// The symbols this dim depends on.
    pub fn symbols(&self) -> Vec<Arc<str>> {
        let mut out = Vec::new();
        self.collect_symbols(&mut out);
        out.sort();
        out.dedup();
        out
    }

    fn collect_symbols(&self, out: &mut Vec<Arc<str>>) {
        for (m, _) in &self.terms {
            for a in m {
                match a {
                    Atom::Sym(s) => out.push(s.clone()),
                    Atom::FloorDiv(d, _) => d.collect_symbols(out),
                }
            }
        }
    }

    // Arithmetic that overflows `i64` (only absurd declared dims can) gives a fresh unknown
    // dim: nothing can be proven about it, so the shape checks after it refuse the model.

    pub fn add(&self, other: &Dim) -> Dim {
        let mut map: BTreeMap<Monomial, i64> = BTreeMap::new();
        for (m, c) in self.terms.iter().chain(other.terms.iter()) {
            let e = map.entry(m.clone()).or_insert(0);
            let Some(sum) = e.checked_add(*c) else { return Dim::unknown() };
            *e = sum;
        }
        Dim::from_map(map)
    }

    pub fn neg(&self) -> Dim {
        let terms: Option<Vec<(Monomial, i64)>> =
            self.terms.iter().map(|(m, c)| Some((m.clone(), c.checked_neg()?))).collect();
        terms.map_or_else(Dim::unknown, |terms| Dim { terms })
    }

    pub fn sub(&self, other: &Dim) -> Dim {
        self.add(&other.neg())
    }

    pub fn mul(&self, other: &Dim) -> Dim {
        let mut map: BTreeMap<Monomial, i64> = BTreeMap::new();
        for (ma, ca) in &self.terms {
            for (mb, cb) in &other.terms {
                let mut m: Monomial = ma.iter().chain(mb.iter()).cloned().collect();
                m.sort();
                let e = map.entry(m).or_insert(0);
                let Some(sum) = ca.checked_mul(*cb).and_then(|p| e.checked_add(p)) else { return Dim::unknown() };
                *e = sum;
            }
        }
        Dim::from_map(map)
    }

    pub fn mul_const(&self, k: i64) -> Dim {
        self.mul(&Dim::constant(k))
    }

    /// `floor(self / d)`; `None` when `d == 0`.
    pub fn floor_div(&self, d: i64) -> Option<Dim> {
        if d == 0 {
            return None;
        }
        if let Some(v) = self.as_const() {
            // i64::MIN / -1 is the one quotient that overflows.
            let Some(q) = v.checked_div(d) else { return Some(Dim::unknown()) };
            let floor = if v % d != 0 && ((v < 0) != (d < 0)) { q - 1 } else { q };
            return Some(Dim::constant(floor));
        }
        if d == 1 {
            return Some(self.clone());
        }
        if d == -1 {
            return Some(self.neg());
        }
        if self.terms.iter().all(|(_, c)| c % d == 0) {
            return Some(Dim { terms: self.terms.iter().map(|(m, c)| (m.clone(), c / d)).collect() });
        }
        if d < 0 {
            return None;
        }
        Some(Dim { terms: vec![(vec![Atom::FloorDiv(Box::new(self.clone()), d)], 1)] })
    }

    /// `self / other` when the division is exact as polynomials (`other` a single term).
    pub fn div_exact(&self, other: &Dim) -> Option<Dim> {
        if let Some(k) = other.as_const() {
            if k == -1 {
                return Some(self.neg());
            }
            if k != 0 && self.terms.iter().all(|(_, c)| c % k == 0) {
                return Some(Dim { terms: self.terms.iter().map(|(m, c)| (m.clone(), c / k)).collect() });
            }
            return None;
        }
        let [(dm, dc)] = other.terms.as_slice() else {
            return None;
        };
        let mut map = BTreeMap::new();
        for (m, c) in &self.terms {
            if c.checked_rem(*dc) != Some(0) {
                return None;
            }
            let mut rest = m.clone();
            for a in dm {
                let pos = rest.iter().position(|x| x == a)?;
                rest.remove(pos);
            }
            let e: &mut i64 = map.entry(rest).or_insert(0);
            *e = e.checked_add(c.checked_div(*dc)?)?;
        }
        Some(Dim::from_map(map))
    }

    /// The concrete value given the values of the symbols.
    pub fn eval(&self, env: &dyn Fn(&str) -> Option<i64>) -> Option<i64> {
        let mut total: i64 = 0;
        for (m, c) in &self.terms {
            let mut v = *c;
            for a in m {
                let x = match a {
                    Atom::Sym(s) => env(s)?,
                    Atom::FloorDiv(d, k) => d.eval(env)?.div_euclid(*k),
                };
                v = v.checked_mul(x)?;
            }
            total = total.checked_add(v)?;
        }
        Some(total)
    }

    /// Substitutes symbols by dims (those `f` maps), leaving the others.
    pub fn substitute(&self, f: &dyn Fn(&str) -> Option<Dim>) -> Dim {
        let mut total = Dim::constant(0);
        for (m, c) in &self.terms {
            let mut t = Dim::constant(*c);
            for a in m {
                let x = match a {
                    Atom::Sym(s) => f(s).unwrap_or_else(|| Dim::sym(s)),
                    Atom::FloorDiv(d, k) => d.substitute(f).floor_div(*k).expect("k > 1"),
                };
                t = t.mul(&x);
            }
            total = total.add(&t);
        }
        total
    }

    /// Parses the text form written by `Display` (`batch*sequence`, `(s+1)/2`, `-1`, `384`).
    pub fn parse(s: &str) -> Result<Dim, String> {
        let mut p = Parser { s: s.as_bytes(), i: 0 };
        let d = p.expr()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(format!("unexpected `{}` in dimension `{s}`", &s[p.i..]));
        }
        Ok(d)
    }
}

impl From<i64> for Dim {
    fn from(v: i64) -> Dim {
        Dim::constant(v)
    }
}

impl From<usize> for Dim {
    fn from(v: usize) -> Dim {
        Dim::constant(v as i64)
    }
}

fn fmt_atom(a: &Atom, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match a {
        Atom::Sym(s) => f.write_str(s),
        Atom::FloorDiv(d, k) => write!(f, "({d})/{k}"),
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.terms.is_empty() {
            return f.write_str("0");
        }
        // Symbolic terms first, the constant last: `sequence+1`.
        let mut terms: Vec<&(Monomial, i64)> = self.terms.iter().filter(|(m, _)| !m.is_empty()).collect();
        terms.extend(self.terms.iter().filter(|(m, _)| m.is_empty()));
        for (i, (m, c)) in terms.into_iter().enumerate() {
            let c = *c;
            if i > 0 {
                f.write_str(if c < 0 { "-" } else { "+" })?;
            } else if c < 0 {
                f.write_str("-")?;
            }
            let a = c.unsigned_abs();
            if m.is_empty() {
                write!(f, "{a}")?;
                continue;
            }
            if a != 1 {
                write!(f, "{a}*")?;
            }
            for (j, atom) in m.iter().enumerate() {
                if j > 0 {
                    f.write_str("*")?;
                }
                fmt_atom(atom, f)?;
            }
        }
        Ok(())
    }
}

impl Serialize for Dim {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.as_const() {
            Some(v) => s.serialize_i64(v),
            None => s.serialize_str(&self.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for Dim {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Dim, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Int(i64),
            Text(String),
        }
        match Repr::deserialize(d)? {
            Repr::Int(v) => Ok(Dim::constant(v)),
            Repr::Text(t) => Dim::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// Recursive-descent parser for dims. Nesting is bounded so that untrusted text cannot overflow
/// the stack.
struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

const MAX_DEPTH: usize = 32;

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.s.get(self.i).copied()
    }

    fn expr(&mut self) -> Result<Dim, String> {
        self.expr_at(0)
    }

    fn expr_at(&mut self, depth: usize) -> Result<Dim, String> {
        if depth > MAX_DEPTH {
            return Err("dimension expression nested too deeply".into());
        }
        let mut acc = self.term(depth)?;
        loop {
            match self.peek() {
                Some(b'+') => {
                    self.i += 1;
                    acc = acc.add(&self.term(depth)?);
                }
                Some(b'-') => {
                    self.i += 1;
                    acc = acc.sub(&self.term(depth)?);
                }
                _ => return Ok(acc),
            }
        }
    }

    fn term(&mut self, depth: usize) -> Result<Dim, String> {
        let mut acc = self.factor(depth)?;
        loop {
            match self.peek() {
                Some(b'*') => {
                    self.i += 1;
                    acc = acc.mul(&self.factor(depth)?);
                }
                Some(b'/') => {
                    self.i += 1;
                    let d = self.factor(depth)?;
                    let k = d.as_const().ok_or("a dimension can only be divided by a constant")?;
                    acc = acc.floor_div(k).ok_or("division by zero in a dimension")?;
                }
                _ => return Ok(acc),
            }
        }
    }

    fn factor(&mut self, depth: usize) -> Result<Dim, String> {
        match self.peek() {
            Some(b'(') => {
                self.i += 1;
                let d = self.expr_at(depth + 1)?;
                if self.peek() != Some(b')') {
                    return Err("missing `)` in a dimension".into());
                }
                self.i += 1;
                Ok(d)
            }
            Some(b'-') => {
                self.i += 1;
                Ok(self.factor(depth + 1)?.neg())
            }
            Some(c) if c.is_ascii_digit() => {
                let start = self.i;
                while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                    self.i += 1;
                }
                let t = std::str::from_utf8(&self.s[start..self.i]).map_err(|e| e.to_string())?;
                t.parse::<i64>().map(Dim::constant).map_err(|_| format!("dimension `{t}` is too large"))
            }
            Some(c) if is_sym_start(c) => {
                let start = self.i;
                while self.i < self.s.len() && is_sym_char(self.s[self.i]) {
                    self.i += 1;
                }
                let t = std::str::from_utf8(&self.s[start..self.i]).map_err(|e| e.to_string())?;
                Ok(Dim::sym(t))
            }
            Some(c) => Err(format!("unexpected `{}` in a dimension", c as char)),
            None => Err("empty dimension".into()),
        }
    }
}

fn is_sym_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b'?'
}

/// Characters allowed in a symbol name after the first.
pub fn is_sym_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'?'
}

/// Turns an arbitrary name (an ONNX `dim_param`) into a valid symbol name.
pub fn sanitize_symbol(name: &str) -> String {
    let mut s: String = name.bytes().map(|c| if is_sym_char(c) && c != b'?' { c as char } else { '_' }).collect();
    if s.is_empty() || !is_sym_start(s.as_bytes()[0]) {
        s.insert(0, '_');
    }
    s
}

#[cfg(test)]
mod tests {
    /// Absurd declared dims (found by fuzzing the importer: a Reshape's product of dims
    /// overflowed) give unknown dims, never an overflow.
    #[test]
    fn arithmetic_that_overflows_gives_unknown_dims() {
        let (big, min) = (Dim::constant(i64::MAX), Dim::constant(i64::MIN));
        for d in [big.mul(&big), big.add(&big), min.neg(), min.sub(&big), big.mul_const(3)] {
            assert!(d.as_const().is_none() && d.symbols().iter().all(|s| s.starts_with('?')), "{d:?}");
        }
        assert!(min.floor_div(-1).unwrap().as_const().is_none());
        assert_eq!(Dim::constant(7).floor_div(-1).unwrap().as_const(), Some(-7));
        assert_eq!(Dim::sym("n").mul_const(6).div_exact(&Dim::constant(-1)), Some(Dim::sym("n").mul_const(-6)));
        assert_eq!(Dim::constant(i64::MIN).div_exact(&Dim::constant(-1)).map(|d| d.as_const().is_none()), Some(true));
    }

    use super::*;

    fn d(s: &str) -> Dim {
        Dim::parse(s).unwrap()
    }

    #[test]
    fn canonical_forms_compare_equal() {
        assert_eq!(d("batch*sequence"), d("sequence*batch"));
        assert_eq!(d("sequence*12*32"), d("384*sequence"));
        assert_eq!(d("s+s-s"), d("s"));
        assert_eq!(d("2*s/2"), d("s"));
        assert_ne!(d("s/2*2"), d("s"));
        assert_eq!(d("3-3"), Dim::constant(0));
    }

    #[test]
    fn display_round_trips() {
        for s in ["batch*sequence*384", "sequence+1", "(sequence+1)/2", "-1", "0", "12*batch-3", "?4"] {
            let x = d(s);
            assert_eq!(d(&x.to_string()), x, "{s} -> {x}");
        }
        assert_eq!(d("sequence + 1").to_string(), "sequence+1");
    }

    #[test]
    fn exact_division() {
        assert_eq!(d("batch*sequence*384").div_exact(&d("batch*sequence")), Some(d("384")));
        assert_eq!(d("batch*sequence*384").div_exact(&d("12")), Some(d("batch*sequence*32")));
        assert_eq!(d("batch*sequence").div_exact(&d("7")), None);
        assert_eq!(d("batch+1").div_exact(&d("batch")), None);
    }

    #[test]
    fn eval_binds_symbols() {
        let env = |s: &str| match s {
            "batch" => Some(2),
            "sequence" => Some(7),
            _ => None,
        };
        assert_eq!(d("batch*sequence*384").eval(&env), Some(2 * 7 * 384));
        assert_eq!(d("(sequence+1)/2").eval(&env), Some(4));
        assert_eq!(d("other").eval(&env), None);
    }

    #[test]
    fn parser_rejects_garbage_without_panicking() {
        for s in [
            "",
            "(",
            "a+",
            "1/0",
            "a/b",
            "((((((((((((((((((((((((((((((((((((1))))))))))))))))))))))))))))))))))",
            "$",
        ] {
            assert!(Dim::parse(s).is_err(), "{s}");
        }
    }

    #[test]
    fn sanitize_makes_symbols() {
        assert_eq!(sanitize_symbol("onnx::Shape_422_dim_0"), "onnx__Shape_422_dim_0");
        assert_eq!(sanitize_symbol("2x"), "_2x");
        assert_eq!(Dim::parse(&sanitize_symbol("a b")).unwrap(), Dim::sym("a_b"));
    }
}

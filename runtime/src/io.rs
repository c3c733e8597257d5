//! Tensor files: numpy `.npy`/`.npz` (stored or deflated) and JSON (nested arrays by name).
//!
//! Everything read here is untrusted: headers are parsed without panicking, declared shapes are
//! checked against the bytes present, and sizes are bounded before anything is allocated.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::{numel, Tensor};
use std::io::{Read, Seek, Write};
use std::path::Path;

/// Largest array a tensor file may hold, in bytes.
pub const MAX_ARRAY_BYTES: u64 = 16 << 30;

fn bad(m: impl Into<String>) -> Error {
    Error::TensorFile(m.into())
}

/// Parses one `.npy` file.
pub fn parse_npy(b: &[u8]) -> Result<Tensor> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy array (bad magic)"));
    }
    let (hlen, start): (usize, usize) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => return Err(bad(format!(".npy version {v} is not supported"))),
    };
    let end = start.checked_add(hlen).filter(|&e| e <= b.len()).ok_or_else(|| bad(".npy header runs past the end"))?;
    let header = std::str::from_utf8(&b[start..end]).map_err(|_| bad(".npy header is not text"))?;
    let descr = dict_value(header, "descr").ok_or_else(|| bad(".npy header has no descr"))?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let dtype = DType::from_npy_descr(descr).ok_or_else(|| {
        bad(format!(
            "arrays of numpy dtype `{descr}` are not supported (use float32, int64, int32, int8, uint8 or bool)"
        ))
    })?;
    if dict_value(header, "fortran_order").is_some_and(|v| v.starts_with("True")) {
        return Err(bad("Fortran-ordered arrays are not supported (save with np.ascontiguousarray)"));
    }
    let shape_text = dict_value(header, "shape").ok_or_else(|| bad(".npy header has no shape"))?;
    let inner =
        shape_text.trim().strip_prefix('(').and_then(|s| s.split(')').next()).ok_or_else(|| bad("bad .npy shape"))?;
    let shape: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>().map_err(|_| bad(format!("bad .npy dimension `{s}`"))))
        .collect::<Result<_>>()?;
    let n = numel(&shape).ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    let need = n
        .checked_mul(dtype.size())
        .filter(|&x| x as u64 <= MAX_ARRAY_BYTES)
        .ok_or_else(|| bad(format!("shape {shape:?} is too large")))?;
    let data = &b[end..];
    if data.len() < need {
        return Err(bad(format!("array of shape {shape:?} needs {need} bytes, the file has {}", data.len())));
    }
    Tensor::from_le_bytes(dtype, shape, &data[..need])
}

/// The text of `key`'s value in a Python dict literal (up to the next top-level comma).
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'")).or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = &header[at + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0i32;
    for (i, c) in rest.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(&rest[..i]),
            _ => {}
        }
    }
    Some(rest)
}

/// Serializes a tensor as `.npy` (version 1).
pub fn npy_bytes(t: &Tensor) -> Vec<u8> {
    let shape = match t.shape() {
        [d] => format!("({d},)"),
        s => format!("({})", s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}", t.dtype().npy_descr());
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&t.to_le_bytes());
    out
}

/// Reads every array of an `.npz` file, in file order.
pub fn read_npz(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    read_npz_from(f).map_err(|e| match e {
        Error::TensorFile(m) => Error::TensorFile(format!("{}: {m}", path.display())),
        e => e,
    })
}

pub fn read_npz_from(r: impl Read + Seek) -> Result<Vec<(String, Tensor)>> {
    let mut z = zip::ZipArchive::new(r).map_err(|e| bad(format!("not an .npz archive: {e}")))?;
    let mut out = Vec::new();
    for i in 0..z.len() {
        let mut entry = z.by_index(i).map_err(|e| bad(format!("bad .npz entry: {e}")))?;
        let name =
            entry.name().map_err(|e| bad(format!("bad .npz entry name: {e}")))?.trim_end_matches(".npy").to_string();
        if entry.size() > MAX_ARRAY_BYTES {
            return Err(bad(format!("array `{name}` is too large")));
        }
        let mut b = Vec::with_capacity(entry.size() as usize);
        entry
            .by_ref()
            .take(MAX_ARRAY_BYTES + 4096)
            .read_to_end(&mut b)
            .map_err(|e| bad(format!("array `{name}`: {e}")))?;
        let t = parse_npy(&b).map_err(|e| bad(format!("array `{name}`: {e}")))?;
        out.push((name, t));
    }
    Ok(out)
}

/// Writes arrays to an `.npz` file (uncompressed, as `np.savez`).
pub fn write_npz(path: &Path, arrays: &[(String, Tensor)]) -> Result<()> {
    let f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut z = zip::ZipWriter::new(std::io::BufWriter::new(f));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored).large_file(true);
    for (name, t) in arrays {
        z.start_file(format!("{name}.npy"), opts).map_err(|e| bad(e.to_string()))?;
        z.write_all(&npy_bytes(t)).map_err(|e| Error::io(path, e))?;
    }
    z.finish().map_err(|e| bad(e.to_string()))?;
    Ok(())
}

/// Reads a JSON object of nested arrays, each converted to the dtype `dtype_of(name)` gives.
pub fn read_json(path: &Path, dtype_of: &dyn Fn(&str) -> Option<DType>) -> Result<Vec<(String, Tensor)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_json(&text, dtype_of).map_err(|e| match e {
        Error::TensorFile(m) => Error::TensorFile(format!("{}: {m}", path.display())),
        e => e,
    })
}

pub fn parse_json(text: &str, dtype_of: &dyn Fn(&str) -> Option<DType>) -> Result<Vec<(String, Tensor)>> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| bad("expected a JSON object mapping input names to arrays"))?;
    let mut out = Vec::new();
    for (name, value) in obj {
        let dtype = dtype_of(name).ok_or_else(|| bad(format!("`{name}` is not an input of the model")))?;
        let mut shape = Vec::new();
        let mut cur = value;
        while let Some(a) = cur.as_array() {
            if shape.len() > 32 {
                return Err(bad(format!("`{name}` is nested too deeply")));
            }
            shape.push(a.len());
            match a.first() {
                Some(x) => cur = x,
                None => break,
            }
        }
        let mut flat = Vec::new();
        flatten(name, value, &shape, 0, &mut flat)?;
        let t = match dtype {
            DType::F32 => Tensor::new(shape, flat.iter().map(|&x| x as f32).collect())?,
            DType::Bool => Tensor::from_bools(shape, flat.iter().map(|&x| x != 0.0).collect())?,
            d => {
                if let Some(x) = flat.iter().find(|x| x.fract() != 0.0) {
                    return Err(bad(format!("`{name}` is {d} but holds {x}")));
                }
                let ints: Vec<i64> = flat.iter().map(|&x| x as i64).collect();
                crate::op::elementwise::cast_tensor(&Tensor::new(shape, ints)?, d)?
            }
        };
        out.push((name.clone(), t));
    }
    Ok(out)
}

fn flatten(name: &str, v: &serde_json::Value, shape: &[usize], depth: usize, out: &mut Vec<f64>) -> Result<()> {
    if depth == shape.len() {
        let x = match v {
            serde_json::Value::Number(n) => n.as_f64().ok_or_else(|| bad(format!("`{name}`: bad number {n}")))?,
            serde_json::Value::Bool(b) => f64::from(u8::from(*b)),
            _ => return Err(bad(format!("`{name}` is not a rectangular array of numbers"))),
        };
        out.push(x);
        return Ok(());
    }
    match v.as_array() {
        Some(a) if a.len() == shape[depth] => a.iter().try_for_each(|x| flatten(name, x, shape, depth + 1, out)),
        _ => Err(bad(format!("`{name}` is not a rectangular array (shape {shape:?})"))),
    }
}

/// Nested-array JSON of a tensor (non-finite floats become `null`).
pub fn tensor_json(t: &Tensor) -> serde_json::Value {
    fn nest(shape: &[usize], flat: &mut dyn Iterator<Item = serde_json::Value>) -> serde_json::Value {
        match shape {
            [] => flat.next().unwrap_or(serde_json::Value::Null),
            [d, rest @ ..] => serde_json::Value::Array((0..*d).map(|_| nest(rest, flat)).collect()),
        }
    }
    let mut it: Box<dyn Iterator<Item = serde_json::Value>> = match t.dtype() {
        DType::F32 => Box::new(t.as_slice::<f32>().unwrap_or_default().to_vec().into_iter().map(|x| {
            serde_json::Number::from_f64(x as f64).map(serde_json::Value::Number).unwrap_or(serde_json::Value::Null)
        })),
        DType::Bool => Box::new(t.to_i64s().unwrap_or_default().into_iter().map(|x| serde_json::Value::Bool(x != 0))),
        _ => Box::new(t.to_i64s().unwrap_or_default().into_iter().map(serde_json::Value::from)),
    };
    nest(t.shape(), &mut it)
}

/// Writes tensors as one JSON object of nested arrays.
pub fn write_json(path: &Path, arrays: &[(String, Tensor)]) -> Result<()> {
    let obj: serde_json::Map<String, serde_json::Value> =
        arrays.iter().map(|(n, t)| (n.clone(), tensor_json(t))).collect();
    let text = serde_json::to_string(&serde_json::Value::Object(obj)).map_err(|e| bad(e.to_string()))?;
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trip_every_dtype() {
        let ts = vec![
            Tensor::new(vec![2, 3], vec![1f32, -2., 3.5, 0., 1e-7, 7.]).unwrap(),
            Tensor::new(vec![3], vec![1i64, -2, 1 << 40]).unwrap(),
            Tensor::new(vec![], vec![5i32]).unwrap(),
            Tensor::new(vec![2], vec![-1i8, 1]).unwrap(),
            Tensor::new(vec![1, 1], vec![200u8]).unwrap(),
            Tensor::from_bools(vec![2], vec![true, false]).unwrap(),
        ];
        for t in ts {
            let back = parse_npy(&npy_bytes(&t)).unwrap();
            assert!(back.bit_eq(&t), "{t:?} -> {back:?}");
        }
    }

    #[test]
    fn npz_round_trip() {
        let p = std::env::temp_dir().join(format!("tcc-io-{}.npz", std::process::id()));
        let arrays = vec![
            ("input_ids".to_string(), Tensor::new(vec![1, 3], vec![101i64, 7, 102]).unwrap()),
            ("x".to_string(), Tensor::new(vec![2], vec![0.5f32, 1.5]).unwrap()),
        ];
        write_npz(&p, &arrays).unwrap();
        let back = read_npz(&p).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].0, "input_ids");
        assert!(back[0].1.bit_eq(&arrays[0].1) && back[1].1.bit_eq(&arrays[1].1));
    }

    #[test]
    fn malformed_npy_is_an_error() {
        let good = npy_bytes(&Tensor::new(vec![4], vec![1f32; 4]).unwrap());
        for n in [0, 5, 9, 20, good.len() - 1] {
            assert!(parse_npy(&good[..n]).is_err(), "truncated to {n}");
        }
        let replace = |from: &str, to: &str| {
            let at = good.windows(from.len()).position(|w| w == from.as_bytes()).unwrap();
            let mut b = good[..at].to_vec();
            b.extend_from_slice(to.as_bytes());
            b.extend_from_slice(&good[at + from.len()..]);
            b
        };
        assert!(parse_npy(&replace("<f4", "<f8")).unwrap_err().to_string().contains("<f8"));
        let mut huge = b"\x93NUMPY\x01\x00".to_vec();
        let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999,), }\n";
        huge.extend_from_slice(&(h.len() as u16).to_le_bytes());
        huge.extend_from_slice(h.as_bytes());
        assert!(parse_npy(&huge).unwrap_err().to_string().contains("too large"));
        assert!(parse_npy(&replace("False", "True ")).unwrap_err().to_string().contains("Fortran"));
    }

    #[test]
    fn json_inputs_take_the_model_dtype() {
        let dt = |n: &str| (n == "ids").then_some(DType::I64);
        let v = parse_json(r#"{"ids": [[1, 2, 3], [4, 5, 6]]}"#, &dt).unwrap();
        assert_eq!(v[0].1.shape(), &[2, 3]);
        assert_eq!(v[0].1.to_i64s().unwrap(), vec![1, 2, 3, 4, 5, 6]);
        assert!(parse_json(r#"{"ids": [[1, 2], [3]]}"#, &dt).is_err());
        assert!(parse_json(r#"{"ids": [[1.5]]}"#, &dt).is_err());
        assert!(parse_json(r#"{"other": [1]}"#, &dt).is_err());
        assert!(parse_json(r#"[1]"#, &dt).is_err());
    }
}

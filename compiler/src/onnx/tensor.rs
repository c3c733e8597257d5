//! ONNX tensors (initializers, `Constant` values) to tcc tensors.
//!
//! Data comes from `raw_data` (little-endian, adopted without copying), the typed repeated
//! fields, or external data files.
//!
//! Security: external data is untrusted input naming files. A location must be a relative path
//! inside the model's folder: absolute paths, `..` components and symlinks that resolve outside
//! the folder are rejected, offsets and lengths are checked against the file before it is
//! mapped, and each file is mapped once, read-only.

use super::proto::{tensor_proto, TensorProto};
use super::ImportError;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use tcc_runtime::{Bytes, DType, Tensor};

/// Maps ONNX element types to tcc dtypes (`None` for unsupported ones).
pub fn dtype_of(elem_type: i32) -> Option<DType> {
    use tensor_proto::DataType as D;
    Some(match D::try_from(elem_type).ok()? {
        D::Float => DType::F32,
        D::Int64 => DType::I64,
        D::Int32 => DType::I32,
        D::Int8 => DType::I8,
        D::Uint8 => DType::U8,
        D::Bool => DType::Bool,
        _ => return None,
    })
}

/// The ONNX name of an element type, for messages.
pub fn elem_type_name(elem_type: i32) -> String {
    tensor_proto::DataType::try_from(elem_type)
        .map(|d| format!("{d:?}").to_lowercase())
        .unwrap_or_else(|_| format!("type {elem_type}"))
}

/// Opens and maps external data files relative to a model's folder.
pub struct ExternalData {
    base: Option<PathBuf>,
    maps: HashMap<PathBuf, Bytes>,
}

impl ExternalData {
    pub fn new(model_path: Option<&Path>) -> ExternalData {
        let base = model_path.map(|p| p.parent().map(Path::to_path_buf).unwrap_or_default());
        ExternalData { base, maps: HashMap::new() }
    }

    fn open(&mut self, tensor: &str, location: &str) -> Result<Bytes, ImportError> {
        let bad = |m: String| ImportError::Tensor { name: tensor.to_string(), message: m };
        let base = self.base.clone().ok_or_else(|| bad("external data needs the model's file path".into()))?;
        let rel = Path::new(location);
        if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
            return Err(bad(format!(
                "external data location `{location}` must be a relative path inside the model's folder"
            )));
        }
        let path = base.join(rel);
        if let Some(m) = self.maps.get(&path) {
            return Ok(m.clone());
        }
        let canon_base = std::fs::canonicalize(if base.as_os_str().is_empty() { Path::new(".") } else { &base })
            .map_err(|e| bad(format!("model folder: {e}")))?;
        let canon =
            std::fs::canonicalize(&path).map_err(|e| bad(format!("external data file `{}`: {e}", path.display())))?;
        if !canon.starts_with(&canon_base) {
            return Err(bad(format!("external data file `{location}` resolves outside the model's folder")));
        }
        let file =
            std::fs::File::open(&canon).map_err(|e| bad(format!("external data file `{}`: {e}", path.display())))?;
        // SAFETY: read-only private mapping of a file the user gave us; the file must not be
        // modified while the model is being imported (documented; the importer copies nothing
        // it does not need and keeps the mapping only until the artifact is written).
        let map =
            unsafe { memmap2::Mmap::map(&file) }.map_err(|e| bad(format!("mapping `{}`: {e}", path.display())))?;
        let bytes: Bytes = Arc::new(map);
        self.maps.insert(path, bytes.clone());
        Ok(bytes)
    }
}

fn conv_err(name: &str, message: impl Into<String>) -> ImportError {
    ImportError::Tensor { name: name.to_string(), message: message.into() }
}

/// Converts a `TensorProto`, taking its raw data out of the proto without copying.
pub fn to_tensor(t: &mut TensorProto, ext: &mut ExternalData) -> Result<Tensor, ImportError> {
    let name = t.name().to_string();
    let dtype = dtype_of(t.data_type()).ok_or_else(|| {
        conv_err(
            &name,
            format!(
                "element type {} is not supported (tcc reads float32, int64, int32, int8, uint8, bool)",
                elem_type_name(t.data_type())
            ),
        )
    })?;
    let shape: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| conv_err(&name, format!("negative dimension {d}"))))
        .collect::<Result<_, _>>()?;
    let n = tcc_runtime::tensor::numel(&shape)
        .filter(|&n| n <= tcc_runtime::op::MAX_ELEMENTS)
        .ok_or_else(|| conv_err(&name, format!("shape {shape:?} is too large")))?;
    let nbytes = n * dtype.size();
    let external = t.data_location == Some(tensor_proto::DataLocation::External as i32);
    if external {
        let kv: HashMap<&str, &str> = t.external_data.iter().map(|e| (e.key(), e.value())).collect();
        let location = kv.get("location").ok_or_else(|| conv_err(&name, "external data without a location"))?;
        let num = |k: &str| -> Result<usize, ImportError> {
            kv.get(k)
                .map(|v| v.parse::<usize>().map_err(|_| conv_err(&name, format!("bad external data {k} `{v}`"))))
                .transpose()
                .map(|v| v.unwrap_or(0))
        };
        let offset = num("offset")?;
        let length = match kv.get("length") {
            Some(_) => num("length")?,
            None => nbytes,
        };
        if length != nbytes {
            return Err(conv_err(
                &name,
                format!("external data holds {length} bytes, {dtype}{shape:?} needs {nbytes}"),
            ));
        }
        let bytes = ext.open(&name, location)?;
        let total = (*bytes).as_ref().len();
        if offset.checked_add(length).is_none_or(|e| e > total) {
            return Err(conv_err(
                &name,
                format!(
                    "external data {offset}..{} lies outside `{location}` ({total} bytes)",
                    offset.saturating_add(length)
                ),
            ));
        }
        return Tensor::from_shared_bytes(dtype, shape, bytes, offset, length)
            .map_err(|e| conv_err(&name, e.to_string()));
    }
    if let Some(raw) = t.raw_data.take() {
        if raw.len() != nbytes {
            return Err(conv_err(
                &name,
                format!("raw data holds {} bytes, {dtype}{shape:?} needs {nbytes}", raw.len()),
            ));
        }
        if dtype == DType::Bool && raw.iter().any(|&b| b > 1) {
            return Err(conv_err(&name, "bool data must be 0 or 1"));
        }
        let bytes: Bytes = Arc::new(raw);
        return Tensor::from_shared_bytes(dtype, shape, bytes, 0, nbytes).map_err(|e| conv_err(&name, e.to_string()));
    }
    let count = |len: usize| -> Result<(), ImportError> {
        if len != n {
            return Err(conv_err(&name, format!("holds {len} values, shape {shape:?} needs {n}")));
        }
        Ok(())
    };
    let r = match dtype {
        DType::F32 => {
            count(t.float_data.len())?;
            Tensor::new(shape, std::mem::take(&mut t.float_data))
        }
        DType::I64 => {
            count(t.int64_data.len())?;
            Tensor::new(shape, std::mem::take(&mut t.int64_data))
        }
        DType::I32 => {
            count(t.int32_data.len())?;
            Tensor::new(shape, std::mem::take(&mut t.int32_data))
        }
        DType::I8 => {
            count(t.int32_data.len())?;
            Tensor::new(shape, t.int32_data.iter().map(|&v| v as i8).collect())
        }
        DType::U8 => {
            count(t.int32_data.len())?;
            Tensor::new(shape, t.int32_data.iter().map(|&v| v as u8).collect())
        }
        DType::Bool => {
            count(t.int32_data.len())?;
            Tensor::from_bools(shape, t.int32_data.iter().map(|&v| v != 0).collect())
        }
    };
    r.map_err(|e| conv_err(&name, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::proto::StringStringEntryProto;

    fn ext_tensor(location: &str, offset: usize, length: usize) -> TensorProto {
        let kv = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
        TensorProto {
            name: Some("w".into()),
            dims: vec![2],
            data_type: Some(tensor_proto::DataType::Float as i32),
            data_location: Some(tensor_proto::DataLocation::External as i32),
            external_data: vec![
                kv("location", location.into()),
                kv("offset", offset.to_string()),
                kv("length", length.to_string()),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn external_data_is_confined_to_the_model_folder() {
        let dir = std::env::temp_dir().join(format!("tcc-ext-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("m")).unwrap();
        let data: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(dir.join("m/w.bin"), &data).unwrap();
        std::fs::write(dir.join("secret.bin"), &data).unwrap();
        let model = dir.join("m/model.onnx");
        let mut ext = ExternalData::new(Some(&model));
        let t = to_tensor(&mut ext_tensor("w.bin", 0, 8), &mut ext).unwrap();
        assert_eq!(t.as_slice::<f32>().unwrap(), &[1.5, -2.0]);
        for (loc, want) in
            [("../secret.bin", "relative path"), ("/etc/passwd", "relative path"), ("missing.bin", "missing.bin")]
        {
            let e = to_tensor(&mut ext_tensor(loc, 0, 8), &mut ext).unwrap_err().to_string();
            assert!(e.contains(want), "{loc}: {e}");
        }
        let e = to_tensor(&mut ext_tensor("w.bin", 4, 8), &mut ext).unwrap_err().to_string();
        assert!(e.contains("outside"), "{e}");
        #[cfg(unix)]
        {
            let _ = std::os::unix::fs::symlink(dir.join("secret.bin"), dir.join("m/link.bin"));
            let e = to_tensor(&mut ext_tensor("link.bin", 0, 8), &mut ext).unwrap_err().to_string();
            assert!(e.contains("outside the model's folder"), "{e}");
        }
    }

    #[test]
    fn typed_fields_and_bad_sizes() {
        let mut t = TensorProto { dims: vec![3], data_type: Some(7), int64_data: vec![1, 2, 3], ..Default::default() };
        assert_eq!(to_tensor(&mut t, &mut ExternalData::new(None)).unwrap().to_i64s().unwrap(), vec![1, 2, 3]);
        let mut t = TensorProto { dims: vec![4], data_type: Some(7), int64_data: vec![1, 2, 3], ..Default::default() };
        assert!(to_tensor(&mut t, &mut ExternalData::new(None)).is_err());
        let mut t = TensorProto { dims: vec![1], data_type: Some(11), double_data: vec![1.0], ..Default::default() };
        assert!(to_tensor(&mut t, &mut ExternalData::new(None)).unwrap_err().to_string().contains("double"));
        let mut t = TensorProto { dims: vec![-1], data_type: Some(1), ..Default::default() };
        assert!(to_tensor(&mut t, &mut ExternalData::new(None)).is_err());
    }
}

//! Element types of tensors.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The element types tcc computes with. `Bool` is stored as one byte, 0 or 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    I64,
    I32,
    I8,
    U8,
    Bool,
}

impl DType {
    pub const ALL: [DType; 6] = [DType::F32, DType::I64, DType::I32, DType::I8, DType::U8, DType::Bool];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::I64 => 8,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// The short name used in the IR text form and in reports (`f32`, `i64`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::Bool => "bool",
        }
    }

    pub fn from_name(s: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == s)
    }

    pub fn is_float(self) -> bool {
        self == DType::F32
    }

    pub fn is_int(self) -> bool {
        matches!(self, DType::I64 | DType::I32 | DType::I8 | DType::U8)
    }

    /// The numpy `descr` of this type (`<f4`, `<i8`, `|b1`, ...).
    pub fn npy_descr(self) -> &'static str {
        match self {
            DType::F32 => "<f4",
            DType::I64 => "<i8",
            DType::I32 => "<i4",
            DType::I8 => "|i1",
            DType::U8 => "|u1",
            DType::Bool => "|b1",
        }
    }

    pub fn from_npy_descr(s: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.npy_descr() == s || d.npy_descr().replace('<', "=") == s)
    }

    pub fn to_safetensors(self) -> safetensors::Dtype {
        match self {
            DType::F32 => safetensors::Dtype::F32,
            DType::I64 => safetensors::Dtype::I64,
            DType::I32 => safetensors::Dtype::I32,
            DType::I8 => safetensors::Dtype::I8,
            DType::U8 => safetensors::Dtype::U8,
            DType::Bool => safetensors::Dtype::BOOL,
        }
    }

    pub fn from_safetensors(d: safetensors::Dtype) -> Option<DType> {
        Some(match d {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::I64 => DType::I64,
            safetensors::Dtype::I32 => DType::I32,
            safetensors::Dtype::I8 => DType::I8,
            safetensors::Dtype::U8 => DType::U8,
            safetensors::Dtype::BOOL => DType::Bool,
            _ => return None,
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

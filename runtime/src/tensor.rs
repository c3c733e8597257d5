//! Tensors: a dtype, a shape and immutable, shared element data.
//!
//! Data is either owned (a typed `Vec`) or borrowed from a byte buffer that outlives it (a
//! memory-mapped artifact or ONNX file). Cloning a tensor is cheap; ops make new tensors.

use crate::dtype::DType;
use crate::error::{Error, Result};
use std::fmt;
use std::sync::Arc;

/// Bytes that some other object owns (an mmap, a file read into memory).
pub type Bytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// Element storage; public only so that [`Element`] can name it.
#[doc(hidden)]
pub enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    I8(Vec<i8>),
    /// `u8` and `bool` (0 or 1).
    U8(Vec<u8>),
    /// Little-endian elements at `offset..offset + len` bytes of `bytes`, suitably aligned.
    Borrowed {
        bytes: Bytes,
        offset: usize,
        len: usize,
    },
}

#[derive(Clone)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    data: Arc<Data>,
}

/// Rust types that are tensor elements.
pub trait Element: Copy + Send + Sync + 'static + fmt::Debug + PartialEq {
    const DTYPE: DType;
    /// Lossy conversion (exact for every f32 and every integer below 2^53).
    fn to_f64(self) -> f64;
    /// `as`-cast from f64: truncation toward zero, saturating, NaN to 0.
    fn from_f64(v: f64) -> Self;
    fn is_nonzero(self) -> bool;
    #[doc(hidden)]
    fn owned(v: Vec<Self>) -> Data;
    #[doc(hidden)]
    fn view(d: &Data) -> Option<&[Self]>;
}

macro_rules! element {
    ($t:ty, $dt:ident, $variant:ident) => {
        impl Element for $t {
            const DTYPE: DType = DType::$dt;
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[allow(clippy::float_cmp)]
            fn is_nonzero(self) -> bool {
                self != (0 as $t)
            }
            fn owned(v: Vec<Self>) -> Data {
                Data::$variant(v)
            }
            fn view(d: &Data) -> Option<&[Self]> {
                match d {
                    Data::$variant(v) => Some(v),
                    Data::Borrowed { bytes, offset, len } => cast_bytes(&(**bytes).as_ref()[*offset..*offset + *len]),
                    _ => None,
                }
            }
        }
    };
}

element!(f32, F32, F32);
element!(i64, I64, I64);
element!(i32, I32, I32);
element!(i8, I8, I8);
element!(u8, U8, U8);

/// Reinterprets little-endian bytes as elements, when their alignment allows it.
fn cast_bytes<T: Element>(b: &[u8]) -> Option<&[T]> {
    let size = std::mem::size_of::<T>();
    if !b.len().is_multiple_of(size) || !(b.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return None;
    }
    // SAFETY: the pointer is aligned for T (checked above), the length is a whole number of
    // elements, every bit pattern is a valid value of the element types (f32, ints, u8), and the
    // returned slice borrows `b`, so it cannot outlive the bytes. Targets are little-endian
    // (checked at compile time in lib.rs), matching the stored layout.
    Some(unsafe { std::slice::from_raw_parts(b.as_ptr() as *const T, b.len() / size) })
}

/// Number of elements of a shape; `None` on overflow.
pub fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

impl Tensor {
    /// Whether `self` and `other` are the same tensor: one buffer (shared, so equal values as
    /// long as either lives: tensors are immutable) and one shape.
    pub fn same_data(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.data, &other.data) && self.dtype == other.dtype && self.shape == other.shape
    }

    /// A tensor from typed elements; the length must match the shape.
    pub fn new<T: Element>(shape: Vec<usize>, data: Vec<T>) -> Result<Tensor> {
        Tensor::with_dtype(T::DTYPE, shape, data)
    }

    fn with_dtype<T: Element>(dtype: DType, shape: Vec<usize>, data: Vec<T>) -> Result<Tensor> {
        let n = numel(&shape).ok_or_else(|| Error::Shape(format!("shape {shape:?} overflows")))?;
        if n != data.len() {
            return Err(Error::Shape(format!("shape {shape:?} needs {n} elements, got {}", data.len())));
        }
        Ok(Tensor { dtype, shape, data: Arc::new(T::owned(data)) })
    }

    /// A bool tensor; stored as bytes 0/1.
    pub fn from_bools(shape: Vec<usize>, data: Vec<bool>) -> Result<Tensor> {
        Tensor::with_dtype(DType::Bool, shape, data.into_iter().map(u8::from).collect::<Vec<u8>>())
    }

    /// A u8 vector reinterpreted as `dtype` bool (values must be 0 or 1).
    pub fn bool_from_u8(shape: Vec<usize>, data: Vec<u8>) -> Result<Tensor> {
        Tensor::with_dtype(DType::Bool, shape, data)
    }

    pub fn scalar<T: Element>(v: T) -> Tensor {
        Tensor::new(vec![], vec![v]).expect("a scalar has one element")
    }

    pub fn zeros(dtype: DType, shape: Vec<usize>) -> Result<Tensor> {
        let n = numel(&shape).ok_or_else(|| Error::Shape(format!("shape {shape:?} overflows")))?;
        Ok(match dtype {
            DType::F32 => Tensor::new(shape, vec![0f32; n])?,
            DType::I64 => Tensor::new(shape, vec![0i64; n])?,
            DType::I32 => Tensor::new(shape, vec![0i32; n])?,
            DType::I8 => Tensor::new(shape, vec![0i8; n])?,
            DType::U8 => Tensor::new(shape, vec![0u8; n])?,
            DType::Bool => Tensor::bool_from_u8(shape, vec![0u8; n])?,
        })
    }

    /// A tensor over bytes owned elsewhere (no copy when aligned; copied otherwise).
    pub fn from_shared_bytes(
        dtype: DType,
        shape: Vec<usize>,
        bytes: Bytes,
        offset: usize,
        len: usize,
    ) -> Result<Tensor> {
        let n = numel(&shape).ok_or_else(|| Error::Shape(format!("shape {shape:?} overflows")))?;
        let need = n.checked_mul(dtype.size()).ok_or_else(|| Error::Shape(format!("shape {shape:?} overflows")))?;
        if need != len {
            return Err(Error::Shape(format!("{dtype}{shape:?} needs {need} bytes, got {len}")));
        }
        let end = offset.checked_add(len).ok_or_else(|| Error::Shape("byte range overflows".into()))?;
        let slice = (*bytes).as_ref();
        if end > slice.len() {
            return Err(Error::Shape(format!("bytes {offset}..{end} are outside a buffer of {} bytes", slice.len())));
        }
        let aligned = (slice[offset..].as_ptr() as usize).is_multiple_of(dtype.size());
        if !aligned {
            return Tensor::from_le_bytes(dtype, shape, &slice[offset..end]);
        }
        Ok(Tensor { dtype, shape, data: Arc::new(Data::Borrowed { bytes, offset, len }) })
    }

    /// A tensor copied from little-endian bytes.
    pub fn from_le_bytes(dtype: DType, shape: Vec<usize>, b: &[u8]) -> Result<Tensor> {
        let n = numel(&shape).ok_or_else(|| Error::Shape(format!("shape {shape:?} overflows")))?;
        if n.checked_mul(dtype.size()) != Some(b.len()) {
            return Err(Error::Shape(format!("{dtype}{shape:?} needs {} bytes, got {}", n * dtype.size(), b.len())));
        }
        fn conv<T, const N: usize>(b: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
            b.chunks_exact(N).map(|c| f(c.try_into().expect("chunk of N"))).collect()
        }
        match dtype {
            DType::F32 => Tensor::new(shape, conv(b, f32::from_le_bytes)),
            DType::I64 => Tensor::new(shape, conv(b, i64::from_le_bytes)),
            DType::I32 => Tensor::new(shape, conv(b, i32::from_le_bytes)),
            DType::I8 => Tensor::new(shape, conv(b, i8::from_le_bytes)),
            DType::U8 => Tensor::new(shape, b.to_vec()),
            DType::Bool => Tensor::bool_from_u8(shape, b.iter().map(|&x| u8::from(x != 0)).collect()),
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements, when `T` is this tensor's element type (`u8` also reads `bool` tensors).
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        let ok = T::DTYPE == self.dtype || (T::DTYPE == DType::U8 && self.dtype == DType::Bool);
        match (ok, T::view(&self.data)) {
            (true, Some(s)) => Ok(s),
            _ => Err(Error::DType(format!("expected a {} tensor, got {}", T::DTYPE, self.dtype))),
        }
    }

    /// The raw little-endian bytes of the elements.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match &*self.data {
            Data::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::I8(v) => v.iter().map(|&x| x as u8).collect(),
            Data::U8(v) => v.clone(),
            Data::Borrowed { bytes, offset, len } => (**bytes).as_ref()[*offset..*offset + *len].to_vec(),
        }
    }

    /// The same data under another shape with the same number of elements.
    pub fn reshape(&self, shape: Vec<usize>) -> Result<Tensor> {
        if numel(&shape) != Some(self.len()) {
            return Err(Error::Shape(format!("cannot reshape {:?} to {shape:?}", self.shape)));
        }
        Ok(Tensor { dtype: self.dtype, shape, data: self.data.clone() })
    }

    /// Integer elements widened to i64 (any integer or bool dtype).
    pub fn to_i64s(&self) -> Result<Vec<i64>> {
        Ok(match self.dtype {
            DType::I64 => self.as_slice::<i64>()?.to_vec(),
            DType::I32 => self.as_slice::<i32>()?.iter().map(|&x| x as i64).collect(),
            DType::I8 => self.as_slice::<i8>()?.iter().map(|&x| x as i64).collect(),
            DType::U8 | DType::Bool => self.as_slice::<u8>()?.iter().map(|&x| x as i64).collect(),
            DType::F32 => return Err(Error::DType("expected an integer tensor, got f32".into())),
        })
    }

    /// Elements converted to f64 (exact for every dtype but large i64).
    pub fn to_f64s(&self) -> Result<Vec<f64>> {
        Ok(match self.dtype {
            DType::F32 => self.as_slice::<f32>()?.iter().map(|&x| x as f64).collect(),
            _ => self.to_i64s()?.into_iter().map(|x| x as f64).collect(),
        })
    }

    /// Identifies the data buffer: tensors sharing data (a reshape of another) have the same id.
    pub fn data_id(&self) -> usize {
        Arc::as_ptr(&self.data) as *const u8 as usize
    }

    /// Bytes of element data.
    pub fn byte_len(&self) -> usize {
        self.len() * self.dtype.size()
    }

    /// True when both tensors have the same dtype, shape and bit-identical elements.
    pub fn bit_eq(&self, other: &Tensor) -> bool {
        self.dtype == other.dtype && self.shape == other.shape && self.to_le_bytes() == other.to_le_bytes()
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{:?}", self.dtype, self.shape)?;
        let head: Vec<String> = match self.dtype {
            DType::F32 => self.as_slice::<f32>().map(|s| s.iter().take(8).map(|x| format!("{x}")).collect()),
            _ => self.to_i64s().map(|s| s.iter().take(8).map(|x| format!("{x}")).collect()),
        }
        .unwrap_or_default();
        write!(f, " [{}{}]", head.join(", "), if self.len() > 8 { ", ..." } else { "" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_access_checks_dtype() {
        let t = Tensor::new(vec![2, 2], vec![1f32, 2., 3., 4.]).unwrap();
        assert_eq!(t.as_slice::<f32>().unwrap(), &[1., 2., 3., 4.]);
        assert!(t.as_slice::<i64>().is_err());
        assert!(Tensor::new(vec![3], vec![1f32]).is_err());
    }

    #[test]
    fn borrowed_bytes_are_read_in_place_or_copied() {
        let raw: Vec<u8> = [1f32, -2.5].iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut padded = vec![0u8];
        padded.extend(&raw);
        let bytes: Bytes = Arc::new(padded);
        // Offset 1 is misaligned for f32: the tensor copies.
        let t = Tensor::from_shared_bytes(DType::F32, vec![2], bytes.clone(), 1, 8).unwrap();
        assert_eq!(t.as_slice::<f32>().unwrap(), &[1., -2.5]);
        assert!(Tensor::from_shared_bytes(DType::F32, vec![3], bytes, 1, 8).is_err());
        let t = Tensor::from_le_bytes(DType::I64, vec![1], &7i64.to_le_bytes()).unwrap();
        assert_eq!(t.to_i64s().unwrap(), vec![7]);
    }
}

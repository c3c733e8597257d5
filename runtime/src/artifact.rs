//! The `.tcc` artifact format: one file, memory-mapped at load.
//!
//! ```text
//! 0   magic        8 bytes  "TCC\0ART\x01"
//! 8   version      u32 LE   FORMAT_VERSION
//! 12  flags        u32 LE   0
//! 16  checksum     u64 LE   xxh3-64 of every byte from offset 24 to the end
//! 24  header_len   u64 LE
//! 32  header       JSON: the plan, the section table, the build report
//! ..  sections     each at a 64-byte aligned offset: "weights" (a safetensors blob, its
//!                  tensors at 64-byte aligned offsets, the gaps filled by `u8` tensors named
//!                  `PAD_PREFIX`N, which loading skips), "tokenizer" (tokenizer.json bytes)
//! ```
//!
//! Weights with many all-zero [`CHUNK`]s (a sparse model's) are stored without them: the entry
//! holds the other chunks one after another, a `u8` entry `LIVE_PREFIX`name their bitmap, and
//! the header's `chunked` table the weight's dtype and shape (version 2; files without such a
//! weight are version 1, as before). At load the weight is laid out again in anonymous memory
//! whose zero chunks are never written: whole pages of them take no memory.
//!
//! The version is checked before the checksum, so a file from a newer tcc says so. The checksum
//! covers everything after itself, so any flipped byte or truncation is caught before the plan
//! or a weight is read; section bounds and the plan are then validated as untrusted data.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::tensor::{Bytes, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

pub const MAGIC: &[u8; 8] = b"TCC\0ART\x01";
/// Bumped whenever the layout or the plan's meaning changes: version 2 adds chunked weights,
/// written only when a weight is chunked (version 1 otherwise, which tcc still reads).
pub const FORMAT_VERSION: u32 = 2;
const FIRST_VERSION: u32 = 1;
const FIXED: usize = 32;
const ALIGN: usize = 64;

/// Where a section lies in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    pub offset: u64,
    pub len: u64,
}

/// The JSON header.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Header {
    /// The tcc version that wrote the file.
    pub producer: String,
    pub plan: Plan,
    pub sections: BTreeMap<String, Section>,
    /// The build report (passes, statistics), free-form JSON for `tcc inspect`.
    #[serde(default)]
    pub report: serde_json::Value,
    /// Weights stored without their all-zero chunks, by name: what they are once laid out.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub chunked: BTreeMap<String, Chunked>,
}

/// A weight stored without its all-zero [`CHUNK`]s.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunked {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// Bytes of a chunk of a weight, the unit zeros are left out of the file in: one AMX step of an
/// `int8` weight panel, a quarter of a 64 x 32 `f32` block of one (half a 4 KiB page).
pub const CHUNK: usize = 2048;

/// Names of the bitmaps of chunked weights' live chunks (never a weight).
pub const LIVE_PREFIX: &str = "__tcc_live.";

/// The least share of a weight's chunks that must be zero for it to be stored chunked (and
/// weights under 16 chunks never are).
const CHUNKED_MIN_ZERO: f64 = 0.125;

/// What the compiler hands to [`write`].
pub struct ArtifactContents<'a> {
    pub plan: &'a Plan,
    pub weights: &'a [(String, Tensor)],
    pub tokenizer: Option<&'a [u8]>,
    pub report: serde_json::Value,
}

fn pad_to(v: &mut Vec<u8>, align: usize, fill: u8) {
    while !v.len().is_multiple_of(align) {
        v.push(fill);
    }
}

/// Names of the padding entries of the weights blob (never a weight).
pub const PAD_PREFIX: &str = "__tcc_pad.";

/// Where weights start in the file: a cache line, so that the kernels' 64-byte loads of weight
/// panels (zmm, AMX tile rows) never straddle two lines. Sections start at such an offset.
const WEIGHT_ALIGN: usize = 64;

/// Serializes tensors in safetensors layout, each at a [`WEIGHT_ALIGN`]-byte offset of the
/// blob's data, which itself starts at one (the header padded with spaces, as safetensors
/// allows); safetensors admits no holes, so the gaps are `u8` tensors named [`PAD_PREFIX`]`N`.
/// Weights with an eighth or more of their chunks all zero are stored chunked (see the module
/// documentation): returned with their dtype and shape.
fn safetensors_blob(weights: &[(String, Tensor)]) -> Result<(Vec<u8>, BTreeMap<String, Chunked>)> {
    if let Some((name, _)) = weights.iter().find(|(n, _)| n.starts_with(PAD_PREFIX) || n.starts_with(LIVE_PREFIX)) {
        return Err(Error::Artifact(format!(
            "weight `{name}`: names starting `{PAD_PREFIX}` or `{LIVE_PREFIX}` are reserved"
        )));
    }
    // (name, dtype, shape, bytes) of each entry.
    let mut chunked = BTreeMap::new();
    let mut bitmaps = Vec::new();
    let mut entries: Vec<(String, DType, Vec<usize>, Vec<u8>)> = Vec::with_capacity(weights.len());
    for (name, t) in weights {
        let bytes = t.to_le_bytes();
        match live_chunks(&bytes) {
            Some((live, bits)) => {
                chunked.insert(name.clone(), Chunked { dtype: t.dtype(), shape: t.shape().to_vec() });
                entries.push((name.clone(), DType::U8, vec![live.len()], live));
                bitmaps.push((format!("{LIVE_PREFIX}{name}"), DType::U8, vec![bits.len()], bits));
            }
            None => entries.push((name.clone(), t.dtype(), t.shape().to_vec(), bytes)),
        }
    }
    entries.sort_by(|a, b| b.1.size().cmp(&a.1.size()).then(a.0.cmp(&b.0)));
    bitmaps.sort_by(|a, b| a.0.cmp(&b.0));
    entries.extend(bitmaps);
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    let mut datas = Vec::with_capacity(entries.len());
    for (name, dtype, shape, bytes) in entries {
        let gap = offset.next_multiple_of(WEIGHT_ALIGN) - offset;
        if gap > 0 {
            header.insert(
                format!("{PAD_PREFIX}{}", datas.len()),
                serde_json::json!({"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}),
            );
            offset += gap;
            datas.push(vec![0u8; gap]);
        }
        let dtype = match dtype {
            DType::F32 => "F32",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        };
        header.insert(
            name,
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
        datas.push(bytes);
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).map_err(|e| Error::Artifact(e.to_string()))?;
    // Pad the header so that the data starts on a cache line (safetensors pads it to 8).
    while !(8 + h.len()).is_multiple_of(WEIGHT_ALIGN) {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + offset);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    for d in datas {
        out.extend_from_slice(&d);
    }
    Ok((out, chunked))
}

/// The chunks of `bytes` not all zero, one after another, and their bitmap (chunk `i` is bit
/// `i % 8` of byte `i / 8`); `None` when too few are zero to store them so.
fn live_chunks(bytes: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let chunks = bytes.len().div_ceil(CHUNK);
    if chunks < 16 {
        return None;
    }
    let zero: Vec<bool> = bytes.chunks(CHUNK).map(|c| c.iter().all(|&b| b == 0)).collect();
    if (zero.iter().filter(|&&z| z).count() as f64) < CHUNKED_MIN_ZERO * chunks as f64 {
        return None;
    }
    let mut bits = vec![0u8; chunks.div_ceil(8)];
    let mut live = Vec::new();
    for (i, c) in bytes.chunks(CHUNK).enumerate() {
        if !zero[i] {
            bits[i / 8] |= 1 << (i % 8);
            live.extend_from_slice(c);
        }
    }
    Some((live, bits))
}

/// A chunked weight laid out again: the live chunks (`live`) where `bits` says, in anonymous
/// memory whose other chunks are never written (whole pages of them take no memory).
fn unchunk(name: &str, c: &Chunked, live: &[u8], bits: &[u8]) -> Result<Tensor> {
    let bad = |m: String| Error::Artifact(format!("chunked weight `{name}`: {m}"));
    let len = c
        .shape
        .iter()
        .try_fold(c.dtype.size(), |n, &d| n.checked_mul(d))
        .filter(|&n| n <= 1 << 40)
        .ok_or_else(|| bad(format!("shape {:?} is too large", c.shape)))?;
    let chunks = len.div_ceil(CHUNK);
    if bits.len() != chunks.div_ceil(8) {
        return Err(bad(format!("{} bitmap bytes for {chunks} chunks", bits.len())));
    }
    let is_live = |i: usize| bits[i / 8] & (1 << (i % 8)) != 0;
    if (chunks..bits.len() * 8).any(is_live) {
        return Err(bad("bitmap marks chunks past the weight's end".into()));
    }
    let stored: usize = (0..chunks).filter(|&i| is_live(i)).map(|i| CHUNK.min(len - i * CHUNK)).sum();
    if stored != live.len() {
        return Err(bad(format!("{} bytes stored, the bitmap says {stored}", live.len())));
    }
    if len == 0 {
        return Tensor::from_le_bytes(c.dtype, c.shape.clone(), &[]);
    }
    let mut map = memmap2::MmapMut::map_anon(len).map_err(|e| bad(format!("cannot map {len} bytes: {e}")))?;
    let mut from = 0;
    for i in (0..chunks).filter(|&i| is_live(i)) {
        let n = CHUNK.min(len - i * CHUNK);
        map[i * CHUNK..i * CHUNK + n].copy_from_slice(&live[from..from + n]);
        from += n;
    }
    let map = map.make_read_only().map_err(|e| bad(format!("cannot protect its memory: {e}")))?;
    Tensor::from_shared_bytes(c.dtype, c.shape.clone(), Arc::new(map) as Bytes, 0, len).map_err(|e| bad(e.to_string()))
}

/// Writes an artifact to `path` (through a temporary file renamed into place).
pub fn write(path: &Path, contents: &ArtifactContents) -> Result<u64> {
    let bytes = to_bytes(contents)?;
    let tmp = path.with_extension("tcc.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(&bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    Ok(bytes.len() as u64)
}

/// Stores the checksum of an artifact's bytes after they were edited (by tools that rewrite
/// artifacts, and by fuzzing, whose mutations would otherwise all stop at the checksum).
/// Shorter byte strings than the fixed header are left as they are.
pub fn seal(bytes: &mut [u8]) {
    if bytes.len() >= FIXED {
        let sum = xxhash_rust::xxh3::xxh3_64(&bytes[24..]);
        bytes[16..24].copy_from_slice(&sum.to_le_bytes());
    }
}

/// An artifact's bytes, as [`write`] writes them and [`from_bytes`] reads them.
pub fn to_bytes(contents: &ArtifactContents) -> Result<Vec<u8>> {
    let (weights, chunked) = safetensors_blob(contents.weights)?;
    let version = if chunked.is_empty() { FIRST_VERSION } else { FORMAT_VERSION };
    let mut sections: Vec<(&str, &[u8])> = vec![("weights", &weights)];
    if let Some(t) = contents.tokenizer {
        sections.push(("tokenizer", t));
    }
    // The header's length depends on the section offsets, which depend on the header's length:
    // reserve room generously, then lay out.
    let mut header = Header {
        producer: format!("tcc {}", env!("CARGO_PKG_VERSION")),
        plan: contents.plan.clone(),
        sections: BTreeMap::new(),
        report: contents.report.clone(),
        chunked,
    };
    let mut header_len = serde_json::to_vec(&header).map_err(|e| Error::Artifact(e.to_string()))?.len() + 256;
    let bytes = loop {
        let mut offset = (FIXED + header_len).div_ceil(ALIGN) * ALIGN;
        header.sections.clear();
        for (name, data) in &sections {
            header.sections.insert(name.to_string(), Section { offset: offset as u64, len: data.len() as u64 });
            offset = (offset + data.len()).div_ceil(ALIGN) * ALIGN;
        }
        let h = serde_json::to_vec(&header).map_err(|e| Error::Artifact(e.to_string()))?;
        if h.len() > header_len {
            header_len = h.len() + 256;
            continue;
        }
        let mut out = Vec::with_capacity(offset);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        out.extend_from_slice(&(header_len as u64).to_le_bytes());
        out.extend_from_slice(&h);
        out.resize(FIXED + header_len, b' ');
        for (name, data) in &sections {
            pad_to(&mut out, ALIGN, 0);
            debug_assert_eq!(out.len() as u64, header.sections[*name].offset);
            out.extend_from_slice(data);
        }
        break out;
    };
    let mut bytes = bytes;
    let sum = xxhash_rust::xxh3::xxh3_64(&bytes[24..]);
    bytes[16..24].copy_from_slice(&sum.to_le_bytes());
    Ok(bytes)
}

/// A loaded, verified artifact: its header, weights (borrowed from the mapping) and sections.
pub struct Artifact {
    pub header: Header,
    pub weights: HashMap<String, Tensor>,
    pub tokenizer: Option<Vec<u8>>,
    /// File size in bytes.
    pub size: u64,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Maps and verifies an artifact file.
pub fn load(path: &Path) -> Result<Artifact> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the mapping is read-only and private to this process. If another process
    // truncates or rewrites the file while it is mapped, reads may fault or see new bytes;
    // like every memory-mapped model loader, tcc documents that artifacts must not be modified
    // while loaded. All bytes are verified (checksum, bounds) before use.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let map: Arc<memmap2::Mmap> = Arc::new(map);
    // The checksum reads every page of the file; the entries of chunked weights, laid out again
    // in anonymous memory, are never read again: their pages leave the process (whole pages
    // inside them only) as each is laid out, so that a sparse artifact is not resident twice
    // (the OS's page cache keeps them until it needs the memory). x86-64 pages: 4 KiB (larger
    // pages elsewhere would reach into the neighbouring entries: not done there).
    const PAGE: usize = 4096;
    let give_back = |r: std::ops::Range<usize>| {
        let (start, end) = (r.start.next_multiple_of(PAGE), r.end / PAGE * PAGE);
        if cfg!(target_arch = "x86_64") && end > start {
            // SAFETY: the mapping is of a file, read-only: a page given back is read again from
            // the file if touched, with the same bytes (artifacts are not modified while
            // loaded, above); and no tensor borrows these bytes (chunked weights are copies).
            // Failing to give them back only costs memory.
            let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
        }
    };
    parse(map.clone() as Bytes, &give_back)
}

/// Verifies and parses artifact bytes.
pub fn from_bytes(bytes: Bytes) -> Result<Artifact> {
    parse(bytes, &|_| {})
}

/// [`from_bytes`], calling `done` on the byte ranges no tensor reads once they are read
/// (chunked weights' entries, once laid out again).
fn parse(bytes: Bytes, done: &dyn Fn(std::ops::Range<usize>)) -> Result<Artifact> {
    let b: &[u8] = (*bytes).as_ref();
    let bad = |m: String| Error::Artifact(m);
    if b.len() < FIXED || &b[..8] != MAGIC {
        return Err(bad("not a tcc artifact (bad magic number)".into()));
    }
    let version = u32_at(b, 8);
    if !(FIRST_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(bad(format!(
            "format version {version}, this tcc reads version {FORMAT_VERSION}{}",
            if version > FORMAT_VERSION { ": rebuild it or upgrade tcc" } else { ": rebuild it" }
        )));
    }
    let flags = u32_at(b, 12);
    if flags != 0 {
        return Err(bad(format!("unknown flags {flags:#x}: written by a newer tcc?")));
    }
    let want = u64_at(b, 16);
    let got = xxhash_rust::xxh3::xxh3_64(&b[24..]);
    if want != got {
        return Err(bad(format!(
            "checksum mismatch (file is corrupt or truncated: stored {want:016x}, computed {got:016x})"
        )));
    }
    let hlen = u64_at(b, 24);
    let hend = (FIXED as u64)
        .checked_add(hlen)
        .filter(|&e| e <= b.len() as u64)
        .ok_or_else(|| bad("header runs past the end".into()))?;
    let header: Header =
        serde_json::from_slice(trim_end(&b[FIXED..hend as usize])).map_err(|e| bad(format!("header: {e}")))?;
    let section = |name: &str| -> Result<Option<(usize, usize)>> {
        let Some(s) = header.sections.get(name) else {
            return Ok(None);
        };
        let end = s.offset.checked_add(s.len).filter(|&e| e <= b.len() as u64 && s.offset >= hend);
        match end {
            Some(e) => Ok(Some((s.offset as usize, e as usize))),
            None => Err(bad(format!("section `{name}` lies outside the file"))),
        }
    };
    let (ws, we) = section("weights")?.ok_or_else(|| bad("no weights section".into()))?;
    let weights = read_safetensors(&bytes, ws, we, &header.chunked, done)?;
    let tokenizer = section("tokenizer")?.map(|(s, e)| b[s..e].to_vec());
    Ok(Artifact { header, weights, tokenizer, size: b.len() as u64 })
}

fn trim_end(b: &[u8]) -> &[u8] {
    let mut e = b.len();
    while e > 0 && b[e - 1] == b' ' {
        e -= 1;
    }
    &b[..e]
}

/// Reads the safetensors blob at `start..end` of `bytes` without copying aligned tensors.
/// Chunked weights (`chunked`) are laid out again ([`unchunk`]), then `done` called on their
/// entries' byte ranges.
fn read_safetensors(
    bytes: &Bytes,
    start: usize,
    end: usize,
    chunked: &BTreeMap<String, Chunked>,
    done: &dyn Fn(std::ops::Range<usize>),
) -> Result<HashMap<String, Tensor>> {
    let b: &[u8] = (**bytes).as_ref();
    let st =
        safetensors::SafeTensors::deserialize(&b[start..end]).map_err(|e| Error::Artifact(format!("weights: {e}")))?;
    let mut out = HashMap::new();
    let range = |d: &[u8]| {
        let at = d.as_ptr() as usize - b.as_ptr() as usize;
        at..at + d.len()
    };
    for (name, c) in chunked {
        let entry = |n: &str| {
            st.tensor(n)
                .ok()
                .filter(|v| v.dtype() == safetensors::Dtype::U8)
                .ok_or_else(|| Error::Artifact(format!("chunked weight `{name}`: no `u8` entry `{n}`")))
        };
        let (live, bits) = (entry(name)?, entry(&format!("{LIVE_PREFIX}{name}"))?);
        out.insert(name.clone(), unchunk(name, c, live.data(), bits.data())?);
        done(range(live.data()));
        done(range(bits.data()));
    }
    for (name, view) in st.tensors() {
        if name.starts_with(PAD_PREFIX) || name.starts_with(LIVE_PREFIX) || chunked.contains_key(&name) {
            continue;
        }
        let dtype = DType::from_safetensors(view.dtype())
            .ok_or_else(|| Error::Artifact(format!("weight `{name}` has unsupported dtype {:?}", view.dtype())))?;
        let data = view.data();
        let offset = data.as_ptr() as usize - b.as_ptr() as usize;
        let t = Tensor::from_shared_bytes(dtype, view.shape().to_vec(), bytes.clone(), offset, data.len())
            .map_err(|e| Error::Artifact(format!("weight `{name}`: {e}")))?;
        out.insert(name, t);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dim::Dim;
    use crate::op::{Binary, BinaryKind};
    use crate::plan::{Constant, Input, Output, Step};

    fn tiny() -> (Plan, Vec<(String, Tensor)>) {
        let plan = Plan {
            inputs: vec![Input { name: "x".into(), dtype: DType::F32, shape: vec![Dim::sym("n")], slot: 0 }],
            outputs: vec![Output { name: "y".into(), slot: 2, dtype: DType::F32, shape: vec![Dim::sym("n")] }],
            constants: vec![Constant { slot: 1, weight: "b".into() }],
            steps: vec![Step {
                op: Binary::new(BinaryKind::Add).into(),
                inputs: vec![Some(0), Some(1)],
                outputs: vec![2],
                name: "add".into(),
            }],
            slots: 3,
        };
        (plan, vec![("b".into(), Tensor::new(vec![1], vec![1.5f32]).unwrap())])
    }

    fn write_tiny(dir: &Path) -> std::path::PathBuf {
        let (plan, weights) = tiny();
        let path = dir.join("t.tcc");
        write(
            &path,
            &ArtifactContents { plan: &plan, weights: &weights, tokenizer: Some(b"{}"), report: serde_json::json!({}) },
        )
        .unwrap();
        path
    }

    fn tmpdir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("tcc-artifact-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn weights_start_on_cache_lines() {
        let d = tmpdir("align");
        let (plan, _) = tiny();
        // Sizes that would leave the next tensor off a cache line, of every element size.
        let weights: Vec<(String, Tensor)> = vec![
            ("b".into(), Tensor::new(vec![3], vec![1.5f32, 2.0, 3.0]).unwrap()),
            ("c".into(), Tensor::new(vec![5], vec![7i8; 5]).unwrap()),
            ("d".into(), Tensor::new(vec![3], vec![1i64, 2, 3]).unwrap()),
            ("e".into(), Tensor::new(vec![17], vec![0.25f32; 17]).unwrap()),
        ];
        let path = d.join("a.tcc");
        let contents =
            ArtifactContents { plan: &plan, weights: &weights, tokenizer: None, report: serde_json::json!({}) };
        write(&path, &contents).unwrap();
        let a = load(&path).unwrap();
        assert_eq!(a.weights.len(), weights.len(), "padding entries are not weights");
        for (name, t) in &weights {
            let got = &a.weights[name];
            assert_eq!((got.shape(), got.to_le_bytes()), (t.shape(), t.to_le_bytes()), "{name}");
            let addr = match t.dtype() {
                DType::F32 => got.as_slice::<f32>().unwrap().as_ptr() as usize,
                DType::I8 => got.as_slice::<i8>().unwrap().as_ptr() as usize,
                _ => got.as_slice::<i64>().unwrap().as_ptr() as usize,
            };
            assert_eq!(addr % 64, 0, "`{name}` is not on a cache line");
        }
        let reserved = vec![(format!("{PAD_PREFIX}0"), Tensor::new(vec![1], vec![1f32]).unwrap())];
        let err = write(&path, &ArtifactContents { weights: &reserved, ..contents }).unwrap_err();
        assert!(err.to_string().contains("reserved"), "{err}");
    }

    /// Weights with many zero chunks go to the file without them and come back bit for bit
    /// (dense ones as before, version 1 when none is chunked); a user's weight cannot take a
    /// bitmap's name; damaged bitmaps or lengths are errors naming the weight.
    #[test]
    fn sparse_weights_are_stored_without_their_zero_chunks() {
        let d = tmpdir("chunked");
        let (plan, _) = tiny();
        // f32: 64 x 32 blocks zero (8 KiB: four chunks) in every other block row, and -0.0
        // (not zero bytes) in one of them; i8: every third chunk zero; an odd tail.
        let (k, n) = (512, 96);
        let mut w: Vec<f32> = (0..k * n).map(|i| (i % 97) as f32 * 0.01 + 0.5).collect();
        for (r, row) in w.chunks_mut(n).enumerate() {
            if (r / 64) % 2 == 1 {
                row.fill(if r / 64 == 7 { -0.0 } else { 0.0 });
            }
        }
        let w8: Vec<i8> =
            (0..CHUNK * 40 + 77).map(|i| if (i / CHUNK).is_multiple_of(3) { 0 } else { (i % 13) as i8 - 6 }).collect();
        let weights: Vec<(String, Tensor)> = vec![
            ("w".into(), Tensor::new(vec![k, n], w).unwrap()),
            ("w8".into(), Tensor::new(vec![w8.len()], w8).unwrap()),
            ("b".into(), Tensor::new(vec![3], vec![0f32; 3]).unwrap()),
            ("dense".into(), Tensor::new(vec![CHUNK * 20], vec![1u8; CHUNK * 20]).unwrap()),
        ];
        let contents =
            ArtifactContents { plan: &plan, weights: &weights, tokenizer: None, report: serde_json::json!({}) };
        let path = d.join("s.tcc");
        let size = write(&path, &contents).unwrap();
        let raw: u64 = weights.iter().map(|(_, t)| t.to_le_bytes().len() as u64).sum();
        let a = load(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap()[8..12], FORMAT_VERSION.to_le_bytes());
        assert_eq!(a.header.chunked.keys().collect::<Vec<_>>(), ["w", "w8"]);
        // f32: 3 of 8 block rows dropped (the -0.0 one stays); i8: 14 of 41 chunks.
        let saved = (3 * 64 * n * 4 + 14 * CHUNK) as u64;
        assert!(size < raw + 4096 - saved, "{size} bytes for {raw} of weights");
        assert_eq!(a.weights.len(), weights.len());
        for (name, t) in &weights {
            let got = &a.weights[name];
            assert_eq!((got.dtype(), got.shape()), (t.dtype(), t.shape()), "{name}");
            assert!(got.to_le_bytes() == t.to_le_bytes(), "`{name}` changed");
        }
        // (`load` gave the file's pages of the chunked entries back once laid out: the weights
        // read above, the borrowed `dense` among them, are whole.)
        let addr = a.weights["w"].as_slice::<f32>().unwrap().as_ptr() as usize;
        assert_eq!(addr % 4096, 0, "laid out on pages");
        // Nothing chunked: version 1, as before.
        let dense = d.join("d.tcc");
        let rest = ArtifactContents { weights: &weights[2..], report: serde_json::json!({}), ..contents };
        write(&dense, &rest).unwrap();
        assert_eq!(std::fs::read(&dense).unwrap()[8..12], 1u32.to_le_bytes());
        assert!(load(&dense).unwrap().header.chunked.is_empty());
        let reserved = vec![(format!("{LIVE_PREFIX}w"), Tensor::new(vec![1], vec![1f32]).unwrap())];
        let err = write(&path, &ArtifactContents { weights: &reserved, ..contents }).unwrap_err();
        assert!(err.to_string().contains("reserved"), "{err}");
        // Damaged: a bitmap of the wrong length, a chunk past the end, bytes missing.
        let c = Chunked { dtype: DType::F32, shape: vec![1024, 2] }; // 8 KiB: 4 chunks
        let live = vec![1u8; 2 * CHUNK];
        assert!(unchunk("x", &c, &live, &[0b0101]).is_ok());
        for (bits, live, says) in [
            (vec![0b0101u8, 0], &live[..], "bitmap bytes"),
            (vec![0b1_0101], &live[..], "past the weight's end"),
            (vec![0b0111], &live[..], "bytes stored"),
            (vec![0b0101], &live[1..], "bytes stored"),
        ] {
            let e = unchunk("x", &c, live, &bits).unwrap_err().to_string();
            assert!(e.contains("`x`") && e.contains(says), "{e}");
        }
        let huge = Chunked { dtype: DType::F32, shape: vec![usize::MAX / 2, 3] };
        assert!(unchunk("x", &huge, &[], &[]).unwrap_err().to_string().contains("too large"));
    }

    #[test]
    fn round_trip() {
        let d = tmpdir("rt");
        let a = load(&write_tiny(&d)).unwrap();
        assert_eq!(a.header.plan, tiny().0);
        assert_eq!(a.weights["b"].as_slice::<f32>().unwrap(), &[1.5]);
        assert_eq!(a.tokenizer.as_deref(), Some(&b"{}"[..]));
    }

    #[test]
    fn every_flipped_byte_and_truncation_is_caught() {
        let d = tmpdir("flip");
        let good = std::fs::read(write_tiny(&d)).unwrap();
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x20;
            assert!(from_bytes(Arc::new(b)).is_err(), "flipped byte {i} went unnoticed");
        }
        for n in [0, 7, 31, good.len() / 2, good.len() - 1] {
            assert!(from_bytes(Arc::new(good[..n].to_vec())).is_err(), "truncation to {n}");
        }
    }

    #[test]
    fn a_future_version_says_so() {
        let d = tmpdir("ver");
        let mut b = std::fs::read(write_tiny(&d)).unwrap();
        b[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let e = from_bytes(Arc::new(b)).err().unwrap().to_string();
        assert!(e.contains("upgrade tcc"), "{e}");
    }
}

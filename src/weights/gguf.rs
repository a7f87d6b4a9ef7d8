//! GGUF files (llama.cpp's container, as city96's SD3.5 GGUFs use it): the
//! header parsed with every length and offset checked against the file, the
//! tensors exposed as [`TensorEntry`]s of a [`super::Checkpoint`] — float
//! ones as their safetensors type, block-quantized ones with
//! [`TensorEntry::quant`] set — so the loaders see one more file format.
//!
//! Layout (little endian): "GGUF", version u32 (2 or 3), tensor count u64,
//! metadata count u64; metadata key/value pairs (strings are u64 length +
//! UTF-8); tensor infos (name, n_dims u32, dims u64 × n_dims innermost first,
//! ggml type u32, offset u64 from the data section); the data section starts
//! at the next multiple of `general.alignment` (default 32).

use std::path::Path;

use safetensors::Dtype;

use super::{TensorEntry, WeightsError};
use crate::DType;

/// The file's first bytes.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// Largest header read (metadata and tensor infos).
pub const MAX_HEADER_BYTES: u64 = 64 << 20;
const MAX_TENSORS: u64 = 1 << 20;
const MAX_DIMS: u32 = 4;
const MAX_STRING: u64 = 1 << 20;

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: u64) -> Option<&[u8]> {
        let n = usize::try_from(n).ok()?;
        let end = self.at.checked_add(n)?;
        let s = self.buf.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn string(&mut self) -> Option<String> {
        let n = self.u64()?;
        if n > MAX_STRING {
            return None;
        }
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
    /// Skips (or, for a u32 `general.alignment`, returns) a metadata value.
    fn value(&mut self, ty: u32, depth: u32) -> Option<Option<u64>> {
        let size = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => {
                self.string()?;
                return Some(None);
            }
            9 if depth == 0 => {
                let inner = self.u32()?;
                let count = self.u64()?;
                if count > MAX_STRING * 16 {
                    return None;
                }
                for _ in 0..count {
                    self.value(inner, depth + 1)?;
                }
                return Some(None);
            }
            _ => return None,
        };
        let bytes = self.take(size)?;
        Some(match (ty, bytes) {
            (4, b) => Some(u32::from_le_bytes(b.try_into().ok()?) as u64),
            (10, b) => Some(u64::from_le_bytes(b.try_into().ok()?)),
            _ => None,
        })
    }
}

/// The storage of a ggml type: a safetensors type or a block format.
fn ggml_type(t: u32) -> Option<(Dtype, Option<DType>)> {
    Some(match t {
        0 => (Dtype::F32, None),
        1 => (Dtype::F16, None),
        30 => (Dtype::BF16, None),
        2 => (Dtype::U8, Some(DType::Q4_0)),
        3 => (Dtype::U8, Some(DType::Q4_1)),
        6 => (Dtype::U8, Some(DType::Q5_0)),
        7 => (Dtype::U8, Some(DType::Q5_1)),
        8 => (Dtype::U8, Some(DType::Q8_0)),
        12 => (Dtype::U8, Some(DType::Q4K)),
        13 => (Dtype::U8, Some(DType::Q5K)),
        14 => (Dtype::U8, Some(DType::Q6K)),
        _ => return None,
    })
}

/// A name for ggml type numbers this reader does not decode.
fn ggml_name(t: u32) -> String {
    match t {
        10 => "Q2_K".into(),
        11 => "Q3_K".into(),
        12 => "Q4_K".into(),
        13 => "Q5_K".into(),
        14 => "Q6_K".into(),
        15 => "Q8_K".into(),
        16..=23 => "an IQ type".into(),
        _ => format!("ggml type {t}"),
    }
}

/// Parses a GGUF header — `start` holds the file's first bytes (at least
/// the whole header), `len` is the file's length — into every tensor's
/// storage, shape and byte range, each checked against the file's length.
/// Never panics, whatever the bytes.
pub fn parse(
    path: &Path,
    start: &[u8],
    len: u64,
    index: usize,
) -> Result<Vec<(String, TensorEntry)>, WeightsError> {
    let bad = |msg: String| WeightsError::Format {
        path: path.to_path_buf(),
        msg,
    };
    let cut = || {
        bad(format!(
            "the GGUF header is cut short, malformed or larger than {} MiB",
            MAX_HEADER_BYTES >> 20
        ))
    };
    let mut r = Reader { buf: start, at: 0 };
    if r.take(4) != Some(MAGIC.as_slice()) {
        return Err(bad("not a GGUF file (no 'GGUF' magic)".into()));
    }
    let version = r.u32().ok_or_else(cut)?;
    if !(2..=3).contains(&version) {
        return Err(bad(format!(
            "GGUF version {version}; versions 2 and 3 are read"
        )));
    }
    let tensors = r.u64().ok_or_else(cut)?;
    let kvs = r.u64().ok_or_else(cut)?;
    if tensors > MAX_TENSORS || kvs > MAX_TENSORS {
        return Err(bad(format!(
            "{tensors} tensors and {kvs} metadata entries: too many"
        )));
    }
    let mut alignment = 32u64;
    for _ in 0..kvs {
        let key = r.string().ok_or_else(cut)?;
        let ty = r.u32().ok_or_else(cut)?;
        let v = r.value(ty, 0).ok_or_else(cut)?;
        if key == "general.alignment" {
            alignment = v
                .filter(|a| a.is_power_of_two() && *a <= 4096)
                .ok_or_else(|| bad("general.alignment must be a power of two up to 4096".into()))?;
        }
    }
    let mut infos = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..tensors {
        let name = r.string().ok_or_else(cut)?;
        if !seen.insert(name.clone()) {
            return Err(bad(format!("tensor '{name}' is listed twice")));
        }
        let n_dims = r.u32().ok_or_else(cut)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(bad(format!("tensor '{name}': {n_dims} dimensions")));
        }
        let mut dims = Vec::new();
        for _ in 0..n_dims {
            let d = r.u64().ok_or_else(cut)?;
            dims.push(
                usize::try_from(d).map_err(|_| bad(format!("tensor '{name}': dimension {d}")))?,
            );
        }
        let ty = r.u32().ok_or_else(cut)?;
        let offset = r.u64().ok_or_else(cut)?;
        infos.push((name, dims, ty, offset));
    }
    let data = (r.at as u64).div_ceil(alignment) * alignment;
    let mut out = Vec::with_capacity(infos.len());
    for (name, dims, ty, offset) in infos {
        let tbad = |what: String| bad(format!("tensor '{name}': {what}"));
        let (dtype, quant) = ggml_type(ty).ok_or_else(|| {
            tbad(format!(
                "{} is not read yet (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K are)",
                ggml_name(ty)
            ))
        })?;
        // GGUF lists the innermost dimension first.
        let shape: Vec<usize> = dims.iter().rev().copied().collect();
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| tbad(format!("shape {shape:?} overflows")))?;
        let bytes = match quant {
            Some(q) => {
                let (be, _) = crate::quant::block(q).unwrap_or((1, 0));
                if dims[0] % be != 0 {
                    return Err(tbad(format!(
                        "rows of {} do not split into blocks of {be}",
                        dims[0]
                    )));
                }
                crate::quant::packed_bytes(q, numel).map(|b| b as u64)
            }
            None => (numel as u64).checked_mul(dtype.bitsize() as u64 / 8),
        }
        .ok_or_else(|| tbad(format!("shape {shape:?} overflows")))?;
        let begin = data
            .checked_add(offset)
            .filter(|_| offset % alignment == 0)
            .ok_or_else(|| tbad(format!("offset {offset} is not a multiple of {alignment}")))?;
        let end = begin
            .checked_add(bytes)
            .filter(|&e| e <= len)
            .ok_or_else(|| tbad(format!("ends past the file's {len} bytes (truncated?)")))?;
        out.push((
            name,
            TensorEntry {
                file: index,
                dtype,
                shape,
                range: (begin, end),
                quant,
            },
        ));
    }
    Ok(out)
}

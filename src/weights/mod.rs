//! Checkpoints as users download them: safetensors files (one file, or a
//! diffusers folder of shards with an index json) read with positioned reads,
//! tensors converted from f32/f16/bf16/fp8 at load.

pub mod controlnet;
pub mod gguf;
pub mod inspect;
pub mod mmdit;
pub mod recipe;
pub mod text;
pub mod vae;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::Dtype;

pub use crate::error::WeightsError;

fn io_err(path: &Path, e: impl fmt::Display) -> WeightsError {
    WeightsError::Io {
        path: path.to_path_buf(),
        err: e.to_string(),
    }
}

/// A model component from `path`: a single file, or the folder `path/<sub>`
/// (or `path` itself) holding `<stem>*.safetensors` and maybe a config.json.
pub fn open_component(
    path: &Path,
    sub: &str,
    stem: &str,
) -> Result<(Checkpoint, Option<serde_json::Value>), WeightsError> {
    let meta = std::fs::metadata(path).map_err(|e| io_err(path, e))?;
    if !meta.is_dir() {
        return Ok((Checkpoint::open(&[path.to_path_buf()])?, None));
    }
    let dir = if path.join(sub).is_dir() {
        path.join(sub)
    } else {
        path.to_path_buf()
    };
    let has_weights = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(stem))
        })
        .unwrap_or(false);
    if !has_weights {
        return Err(WeightsError::Unsupported(format!(
            "{}: not an SD3 model folder (no {sub}/ with {stem}*.safetensors)",
            path.display()
        )));
    }
    Ok((
        Checkpoint::open_diffusers_component(&dir, stem)?,
        read_config(&dir)?,
    ))
}

/// The `config.json` of a diffusers component folder, if it has one.
pub fn read_config(dir: &Path) -> Result<Option<serde_json::Value>, WeightsError> {
    let path = dir.join("config.json");
    if !path.exists() {
        return Ok(None);
    }
    let text = crate::files::read_text(&path).map_err(|e| WeightsError::Format {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| WeightsError::Format {
            path: path.clone(),
            msg: e.to_string(),
        })?;
    if !json.is_object() {
        return Err(WeightsError::Format {
            path,
            msg: "config.json is not a JSON object".into(),
        });
    }
    Ok(Some(json))
}

/// Where one tensor lives.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    /// Index of the file in [`Checkpoint::files`].
    pub file: usize,
    /// Stored dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Byte range in the file.
    pub range: (u64, u64),
    /// A GGML block format (GGUF files; `dtype` is then U8, the raw bytes).
    pub quant: Option<crate::DType>,
}

/// The largest safetensors header we parse (the format's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One or more safetensors files seen as one name → tensor map. Tensors are
/// read with positioned reads (never memory-mapped), so a file truncated or
/// changed while open gives an error, not a SIGBUS.
pub struct Checkpoint {
    /// The files, in the order they were opened.
    pub files: Vec<PathBuf>,
    handles: Vec<std::fs::File>,
    /// Every tensor, by name.
    pub tensors: BTreeMap<String, TensorEntry>,
    /// The headers' `__metadata__` string entries (the first file's value
    /// where shards disagree).
    pub metadata: BTreeMap<String, String>,
}

/// Reads exactly `buf.len()` bytes at `offset`.
fn read_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileExt;
        file.read_exact_at(buf, offset)
    }
    #[cfg(windows)]
    {
        use std::os::windows::fs::FileExt;
        let mut done = 0;
        while done < buf.len() {
            let n = file.seek_read(&mut buf[done..], offset + done as u64)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
        }
        Ok(())
    }
}

/// Reads a safetensors file's header and parses it with [`parse_header`].
fn read_header(path: &Path, file: &std::fs::File, index: usize) -> Result<Header, WeightsError> {
    let len = file.metadata().map_err(|e| io_err(path, e))?.len();
    let mut magic = [0u8; 4];
    if len >= 4 {
        read_at(file, &mut magic, 0).map_err(|e| io_err(path, e))?;
    }
    if &magic == gguf::MAGIC {
        let mut start = vec![0u8; len.min(gguf::MAX_HEADER_BYTES) as usize];
        read_at(file, &mut start, 0).map_err(|e| io_err(path, e))?;
        return Ok(Header {
            tensors: gguf::parse(path, &start, len, index)?,
            metadata: BTreeMap::new(),
        });
    }
    let mut n8 = [0u8; 8];
    if len >= 8 {
        read_at(file, &mut n8, 0).map_err(|e| io_err(path, e))?;
    }
    let n = u64::from_le_bytes(n8).min(MAX_HEADER_BYTES + 1);
    let mut header = vec![0u8; (n.min(len.saturating_sub(8))) as usize];
    read_at(file, &mut header, 8).map_err(|e| io_err(path, e))?;
    let mut start = n8.to_vec();
    start.extend(header);
    parse_header_and_metadata(path, &start, len, index)
}

/// A parsed safetensors header.
struct Header {
    tensors: Vec<(String, TensorEntry)>,
    metadata: BTreeMap<String, String>,
}

/// Parses a safetensors header — `start` holds the file's first bytes (the
/// 8-byte length and at least the header), `len` is the file's length — into
/// every tensor's dtype, shape and byte range, each checked against the
/// file's length with checked arithmetic. `index` is the file's place in its
/// checkpoint. Never panics, whatever the bytes.
pub fn parse_header(
    path: &Path,
    start: &[u8],
    len: u64,
    index: usize,
) -> Result<Vec<(String, TensorEntry)>, WeightsError> {
    parse_header_and_metadata(path, start, len, index).map(|h| h.tensors)
}

/// [`parse_header`], keeping the `__metadata__` strings too.
fn parse_header_and_metadata(
    path: &Path,
    start: &[u8],
    len: u64,
    index: usize,
) -> Result<Header, WeightsError> {
    let fmt_err = |msg: String| WeightsError::Format {
        path: path.to_path_buf(),
        msg,
    };
    let Some(n8) = start.get(..8).filter(|_| len >= 8) else {
        return Err(fmt_err(format!("{len} bytes, too short for a header")));
    };
    let n = u64::from_le_bytes(n8.try_into().unwrap_or([0xff; 8]));
    if n > MAX_HEADER_BYTES || n > len - 8 {
        return Err(fmt_err(format!(
            "header length {n} does not fit the file's {len} bytes (truncated?)"
        )));
    }
    let header = start
        .get(8..8 + n as usize)
        .ok_or_else(|| fmt_err("the header is incomplete".into()))?;
    let json: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| fmt_err(format!("header: {e}")))?;
    let map = json
        .as_object()
        .ok_or_else(|| fmt_err("the header is not a JSON object".into()))?;
    let base = 8 + n;
    let data_len = len - base;
    let mut out = Vec::with_capacity(map.len());
    let mut metadata = BTreeMap::new();
    for (name, info) in map {
        if name == "__metadata__" {
            // String entries only (the format's); others are ignored.
            for (k, v) in info.as_object().into_iter().flatten() {
                if let Some(v) = v.as_str() {
                    metadata.insert(k.clone(), v.to_string());
                }
            }
            continue;
        }
        let bad = |what: &str| fmt_err(format!("tensor '{name}': {what}"));
        let dtype: Dtype = info
            .get("dtype")
            .and_then(|d| serde_json::from_value(d.clone()).ok())
            .ok_or_else(|| bad("no known \"dtype\""))?;
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("no \"shape\" array"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("a shape entry is not a non-negative integer"))?;
        let offsets = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .ok_or_else(|| bad("no \"data_offsets\" pair of integers"))?;
        let bits = shape
            .iter()
            .try_fold(dtype.bitsize() as u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| bad(&format!("shape {shape:?} overflows")))?;
        let (a, b) = offsets;
        if a > b || b - a != bits.div_ceil(8) {
            return Err(bad(&format!(
                "data offsets {a}..{b} do not hold {shape:?} of {dtype:?}"
            )));
        }
        if b > data_len {
            return Err(bad(&format!(
                "ends at byte {} but the file has {len} (truncated?)",
                base + b
            )));
        }
        out.push((
            name.clone(),
            TensorEntry {
                file: index,
                dtype,
                shape,
                range: (base + a, base + b),
                quant: None,
            },
        ));
    }
    Ok(Header {
        tensors: out,
        metadata,
    })
}

impl Checkpoint {
    /// Opens safetensors files (shards of one checkpoint, or a single file).
    /// A tensor name found in two files is an error.
    pub fn open(paths: &[PathBuf]) -> Result<Checkpoint, WeightsError> {
        let mut ck = Checkpoint {
            files: Vec::new(),
            handles: Vec::new(),
            tensors: BTreeMap::new(),
            metadata: BTreeMap::new(),
        };
        for path in paths {
            let file = crate::files::open_regular(path).map_err(|e| io_err(path, e))?;
            let header = read_header(path, &file, ck.files.len())?;
            for (k, v) in header.metadata {
                ck.metadata.entry(k).or_insert(v);
            }
            for (name, entry) in header.tensors {
                if let Some(prev) = ck.tensors.insert(name.clone(), entry) {
                    return Err(WeightsError::Format {
                        path: path.clone(),
                        msg: format!(
                            "tensor '{name}' is also in {}; a checkpoint holds each tensor once",
                            ck.files.get(prev.file).unwrap_or(path).display()
                        ),
                    });
                }
            }
            ck.files.push(path.clone());
            ck.handles.push(file);
        }
        Ok(ck)
    }

    /// Opens `<dir>/<stem>.safetensors`, or the shards its
    /// `.safetensors.index.json` lists. Every shard must be a bare file name
    /// in `dir` naming a regular file (a symlink to one, as in the Hugging Face
    /// cache, is fine); all are checked before any is opened, and each tensor
    /// must be in the shard the index names.
    pub fn open_diffusers_component(dir: &Path, stem: &str) -> Result<Checkpoint, WeightsError> {
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        if index.exists() {
            let bad = |msg: String| WeightsError::Format {
                path: index.clone(),
                msg,
            };
            let text = crate::files::read_text(&index).map_err(|e| bad(e.to_string()))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| bad("no \"weight_map\" object".into()))?;
            let mut shard_of = BTreeMap::new();
            for (name, v) in map {
                let f = v
                    .as_str()
                    .ok_or_else(|| bad(format!("weight_map entry '{name}' is not a file name")))?;
                let mut parts = Path::new(f).components();
                let bare = matches!(
                    (parts.next(), parts.next()),
                    (Some(std::path::Component::Normal(_)), None)
                ) && !f.contains(['/', '\\']);
                if !bare {
                    return Err(bad(format!(
                        "weight_map entry '{name}' names '{f}', which is not a file name inside {}",
                        dir.display()
                    )));
                }
                let p = dir.join(f);
                if !crate::files::is_regular_file(&p) {
                    return Err(bad(format!(
                        "weight_map entry '{name}' names '{f}', which is not a regular file in {}",
                        dir.display()
                    )));
                }
                shard_of.insert(name.clone(), p);
            }
            let mut files: Vec<PathBuf> = shard_of.values().cloned().collect();
            files.sort();
            files.dedup();
            if files.is_empty() {
                return Err(bad("the weight_map is empty".into()));
            }
            let ck = Self::open(&files)?;
            for (name, shard) in &shard_of {
                match ck.tensors.get(name) {
                    None => {
                        return Err(WeightsError::Missing {
                            name: name.clone(),
                            source: format!("{} (listed by {})", shard.display(), index.display()),
                        })
                    }
                    Some(e) if ck.files[e.file] != *shard => {
                        return Err(bad(format!(
                            "tensor '{name}' is listed in {} but stored in {}",
                            shard.display(),
                            ck.files[e.file].display()
                        )))
                    }
                    Some(_) => {}
                }
            }
            return Ok(ck);
        }
        let single = dir.join(format!("{stem}.safetensors"));
        if single.exists() {
            return Self::open(&[single]);
        }
        Err(WeightsError::Io {
            path: single,
            err: format!("not found (nor a sharded {stem}.safetensors.index.json)"),
        })
    }

    /// Names and shapes of the tensors starting with `prefix`.
    pub fn with_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a String, &'a TensorEntry)> + 'a {
        self.tensors
            .range(prefix.to_string()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
    }

    /// The distinct numbers that follow `prefix` in tensor names
    /// (`joint_blocks.` → block indices), sorted.
    pub fn indices_under(&self, prefix: &str) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .with_prefix(prefix)
            .filter_map(|(k, _)| k[prefix.len()..].split('.').next()?.parse().ok())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The raw bytes of a tensor, read from its file now; an error (not a
    /// crash) when the file has changed or shrunk since it was opened.
    pub fn bytes(&self, e: &TensorEntry) -> Result<Vec<u8>, WeightsError> {
        let path = &self.files[e.file];
        let mut buf = vec![0u8; (e.range.1 - e.range.0) as usize];
        read_at(&self.handles[e.file], &mut buf, e.range.0).map_err(|err| WeightsError::Io {
            path: path.clone(),
            err: if err.kind() == std::io::ErrorKind::UnexpectedEof {
                "the file is shorter than when it was opened (truncated while in use?)".into()
            } else {
                err.to_string()
            },
        })?;
        Ok(buf)
    }

    /// A tensor as f32 values.
    pub fn read_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), WeightsError> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| WeightsError::Missing {
                name: name.to_string(),
                source: self.describe(),
            })?;
        let bytes = self.bytes(e)?;
        if let Some(q) = e.quant {
            let n = e.shape.iter().product();
            let v = crate::quant::dequantize(q, &bytes, n).ok_or_else(|| WeightsError::Format {
                path: self.files[e.file].clone(),
                msg: format!("tensor '{name}': its {} blocks are cut short", q.name()),
            })?;
            return Ok((e.shape.clone(), v));
        }
        Ok((
            e.shape.clone(),
            to_f32(name, e.dtype, &bytes).map_err(|err| match err {
                WeightsError::Dtype { name, found, .. } => WeightsError::Dtype {
                    file: self.files[e.file].display().to_string(),
                    name,
                    found,
                },
                other => other,
            })?,
        ))
    }

    /// "file.safetensors" or "N shards in dir".
    pub fn describe(&self) -> String {
        match self.files.as_slice() {
            [one] => one.display().to_string(),
            many => format!(
                "{} shards in {}",
                many.len(),
                many.first()
                    .and_then(|p| p.parent())
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
        }
    }
}

/// Converts stored bytes of `dtype` to f32.
pub fn to_f32(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, WeightsError> {
    let words = |n: usize| bytes.chunks_exact(n);
    Ok(match dtype {
        Dtype::F32 => words(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => words(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => words(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F8_E4M3 => bytes.iter().map(|&b| fp8_e4m3(b)).collect(),
        Dtype::F8_E5M2 => bytes
            .iter()
            .map(|&b| f16::from_bits((b as u16) << 8).to_f32())
            .collect(),
        other => {
            return Err(WeightsError::Dtype {
                file: String::new(),
                name: name.to_string(),
                found: format!("{other:?}"),
            })
        }
    })
}

/// float8 e4m3fn (no infinities; 0x7f/0xff are NaN), as torch stores it.
pub fn fp8_e4m3(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = (b >> 3) & 0xf;
    let man = (b & 7) as f32;
    if exp == 0xf && b & 7 == 7 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp as i32 - 7)
    }
}

impl Checkpoint {
    /// A checkpoint with no files (used while probing names).
    fn empty() -> Checkpoint {
        Checkpoint {
            files: Vec::new(),
            handles: Vec::new(),
            tensors: BTreeMap::new(),
            metadata: BTreeMap::new(),
        }
    }
}

/// Where a model's tensors come from: a checkpoint, or seeded random values
/// made on the GPU (benchmarks of full-size architectures without a download).
pub trait TensorProvider {
    /// The tensor `name` (the model's canonical name), shape-checked, on the GPU as `dtype`.
    fn tensor(
        &self,
        gpu: &crate::gpu::Gpu,
        name: &str,
        shape: &[usize],
        dtype: crate::DType,
    ) -> crate::Result<crate::Tensor>;
    /// Equal-sized tensors concatenated along dim 0 (q, k, v → qkv).
    fn tensor_concat(
        &self,
        gpu: &crate::gpu::Gpu,
        names: &[String],
        shape: &[usize],
        dtype: crate::DType,
    ) -> crate::Result<crate::Tensor> {
        let mut part = shape.to_vec();
        part[0] /= names.len().max(1);
        let mut data = Vec::with_capacity(shape.iter().product());
        for n in names {
            data.extend(self.host(n, &part)?);
        }
        crate::Tensor::from_f32(gpu, shape, dtype, &data)
    }
    /// A (small) tensor on the CPU.
    fn host(&self, name: &str, shape: &[usize]) -> crate::Result<Vec<f32>>;
    /// A matrix: with `matrix` f16 (the default storage), kept in the file's
    /// own packed encoding (f16, bf16, fp8) where it has one — never a
    /// widened copy; otherwise stored as `matrix`.
    fn matrix(
        &self,
        gpu: &crate::gpu::Gpu,
        name: &str,
        shape: &[usize],
        matrix: crate::DType,
    ) -> crate::Result<crate::Tensor> {
        self.tensor(gpu, name, shape, matrix)
    }
    /// [`TensorProvider::matrix`] of equal-sized parts concatenated along
    /// dim 0 (q, k, v → qkv).
    fn matrix_concat(
        &self,
        gpu: &crate::gpu::Gpu,
        names: &[String],
        shape: &[usize],
        matrix: crate::DType,
    ) -> crate::Result<crate::Tensor> {
        self.tensor_concat(gpu, names, shape, matrix)
    }
}

/// A source whose tensors are reached through [`recipe::Recipe`]s of
/// canonical names (every checkpoint-backed source).
pub trait RecipeSource {
    /// The tensors.
    fn checkpoint(&self) -> &Checkpoint;
    /// How canonical `name` is stored.
    fn recipe_of(&self, name: &str) -> recipe::Recipe;
    /// `name` in the file's packed encoding (see
    /// [`Checkpoint::read_recipe_packed`]).
    fn read_packed(
        &self,
        name: &str,
        expected: &[usize],
    ) -> Result<Option<(crate::DType, Vec<u8>)>, WeightsError> {
        self.checkpoint()
            .read_recipe_packed(&self.recipe_of(name), expected)
    }
}

macro_rules! provider_from_read {
    ($t:ty) => {
        impl TensorProvider for $t {
            fn tensor(
                &self,
                gpu: &crate::gpu::Gpu,
                name: &str,
                shape: &[usize],
                dtype: crate::DType,
            ) -> crate::Result<crate::Tensor> {
                crate::Tensor::from_f32(gpu, shape, dtype, &self.read(name, shape)?)
            }
            fn host(&self, name: &str, shape: &[usize]) -> crate::Result<Vec<f32>> {
                Ok(self.read(name, shape)?)
            }
            fn matrix(
                &self,
                gpu: &crate::gpu::Gpu,
                name: &str,
                shape: &[usize],
                matrix: crate::DType,
            ) -> crate::Result<crate::Tensor> {
                if matrix == crate::DType::F16 {
                    if let Some((dtype, bytes)) = RecipeSource::read_packed(self, name, shape)? {
                        return crate::Tensor::from_raw(gpu, shape, dtype, bytes);
                    }
                }
                self.tensor(gpu, name, shape, matrix)
            }
            fn matrix_concat(
                &self,
                gpu: &crate::gpu::Gpu,
                names: &[String],
                shape: &[usize],
                matrix: crate::DType,
            ) -> crate::Result<crate::Tensor> {
                if matrix == crate::DType::F16 && !names.is_empty() {
                    let mut part = shape.to_vec();
                    part[0] /= names.len();
                    let mut parts = Vec::with_capacity(names.len());
                    for n in names {
                        parts.push(RecipeSource::read_packed(self, n, &part)?);
                    }
                    let first = parts.first().and_then(|p| p.as_ref().map(|p| p.0));
                    if first.is_some() && parts.iter().all(|p| p.as_ref().map(|p| p.0) == first) {
                        let bytes: Vec<u8> =
                            parts.into_iter().flatten().flat_map(|p| p.1).collect();
                        if let Some(dtype) = first {
                            return crate::Tensor::from_raw(gpu, shape, dtype, bytes);
                        }
                    }
                }
                self.tensor_concat(gpu, names, shape, matrix)
            }
        }
    };
}
provider_from_read!(mmdit::MmditSource);
provider_from_read!(controlnet::ControlNetSource);
provider_from_read!(vae::VaeSource);
provider_from_read!(text::TextSource);

/// Seeded random weights generated on the GPU: matrices uniform with standard
/// deviation 1/√fan-in, biases near 0, norm weights near 1 — activations stay
/// finite through any depth, which is all a benchmark needs.
pub struct RandomWeights {
    /// Seed; each tensor's stream is derived from it and the tensor's name.
    pub seed: u64,
}

impl RandomWeights {
    fn params(&self, name: &str, shape: &[usize]) -> (u32, f32, f32) {
        let mut h = self.seed ^ 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        let seed = (h ^ (h >> 32)) as u32;
        if shape.len() >= 2 {
            let fan_in: usize = shape[1..].iter().product();
            (seed, (3.0 / fan_in.max(1) as f32).sqrt(), 0.0)
        } else if name.ends_with("bias") {
            (seed, 0.02, 0.0)
        } else {
            (seed, 0.02, 1.0)
        }
    }
}

/// `n` random weights of magnitude up to about `scale` in packed `dtype`
/// (bf16, fp8, GGML blocks): random signs and mantissas or quants, with
/// exponents or block scales chosen so no value is NaN or infinite.
fn random_packed(dtype: crate::DType, n: usize, seed: u64, scale: f32) -> Vec<u8> {
    use crate::DType as D;
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let e2 = scale.log2().floor() as i32;
    let h = |v: f32| half::f16::from_f32(v).to_le_bytes();
    match dtype {
        D::BF16 => {
            // Exponent of scale/2, random sign and 7-bit mantissa.
            let e = ((e2 - 1 + 127).clamp(1, 254) as u16) << 7;
            (0..n)
                .flat_map(|_| {
                    let r = next() as u16;
                    ((r & 0x807f) | e).to_le_bytes()
                })
                .collect()
        }
        D::F8E4M3 => {
            let e = ((e2 - 1 + 7).clamp(1, 14) as u8) << 3;
            (0..n).map(|_| (next() as u8 & 0x87) | e).collect()
        }
        D::F8E5M2 => {
            let e = ((e2 - 1 + 15).clamp(1, 30) as u8) << 2;
            (0..n).map(|_| (next() as u8 & 0x83) | e).collect()
        }
        q => {
            let Some((be, bb)) = crate::quant::block(q) else {
                return Vec::new();
            };
            let blocks = n.div_ceil(be);
            let mut out: Vec<u8> = (0..blocks * bb).map(|_| next() as u8).collect();
            // (offset, value) of each block's f16 scale fields.
            let fields: Vec<(usize, f32)> = match q {
                D::Q8_0 => vec![(0, scale / 127.0)],
                D::Q4_0 => vec![(0, scale / 8.0)],
                D::Q5_0 => vec![(0, scale / 16.0)],
                D::Q4_1 => vec![(0, scale / 8.0), (2, -scale)],
                D::Q5_1 => vec![(0, scale / 16.0), (2, -scale)],
                D::Q4K => vec![(0, scale / (63.0 * 15.0)), (2, scale / 63.0)],
                D::Q5K => vec![(0, scale / (63.0 * 31.0)), (2, scale / 63.0)],
                _ => vec![(208, scale / (127.0 * 32.0))],
            };
            for blk in out.chunks_exact_mut(bb) {
                for &(at, v) in &fields {
                    blk[at..at + 2].copy_from_slice(&h(v));
                }
            }
            out
        }
    }
}

impl TensorProvider for RandomWeights {
    fn tensor(
        &self,
        gpu: &crate::gpu::Gpu,
        name: &str,
        shape: &[usize],
        dtype: crate::DType,
    ) -> crate::Result<crate::Tensor> {
        let (seed, scale, shift) = self.params(name, shape);
        if dtype.packed_format().is_some_and(|f| f != 0) {
            // bf16, fp8 and GGML blocks: random bits of the right magnitude,
            // made on the CPU (a benchmark times the kernels, not the values).
            let n: usize = shape.iter().product();
            let bytes = random_packed(dtype, n, seed as u64, scale.max(1e-6));
            return crate::Tensor::from_raw(gpu, shape, dtype, bytes);
        }
        let mut g = crate::Graph::new(gpu.target());
        let v = crate::ops::random::random_uniform(&mut g, shape, dtype, seed, scale, shift)?;
        g.keep(v);
        let plan = g.plan(gpu)?;
        plan.run(gpu)?;
        plan.tensor(v)
    }
    fn tensor_concat(
        &self,
        gpu: &crate::gpu::Gpu,
        names: &[String],
        shape: &[usize],
        dtype: crate::DType,
    ) -> crate::Result<crate::Tensor> {
        self.tensor(gpu, &names.join("+"), shape, dtype)
    }
    fn host(&self, name: &str, shape: &[usize]) -> crate::Result<Vec<f32>> {
        let (seed, scale, shift) = self.params(name, shape);
        let n: usize = shape.iter().product();
        Ok(crate::bench::random_values(seed as u64, n)
            .iter()
            .map(|v| shift + scale * v)
            .collect())
    }
}

/// Weights that only carry shapes (one shared 16-byte buffer): for recording
/// and validating graphs of architectures too large to run here.
pub struct ShapeOnlyWeights {
    buffer: std::sync::Arc<crate::gpu::TrackedBuffer>,
}

impl ShapeOnlyWeights {
    /// A provider on `gpu`.
    pub fn new(gpu: &crate::gpu::Gpu) -> crate::Result<ShapeOnlyWeights> {
        Ok(ShapeOnlyWeights {
            buffer: std::sync::Arc::new(crate::tensor::create_storage(gpu, "shape-only", 16)?),
        })
    }
}

impl TensorProvider for ShapeOnlyWeights {
    fn tensor(
        &self,
        _: &crate::gpu::Gpu,
        _: &str,
        shape: &[usize],
        dtype: crate::DType,
    ) -> crate::Result<crate::Tensor> {
        Ok(crate::Tensor {
            buffer: self.buffer.clone(),
            shape: shape.to_vec(),
            dtype,
            low_rank: None,
            stream: None,
        })
    }
    fn tensor_concat(
        &self,
        gpu: &crate::gpu::Gpu,
        names: &[String],
        shape: &[usize],
        dtype: crate::DType,
    ) -> crate::Result<crate::Tensor> {
        self.tensor(gpu, &names.join("+"), shape, dtype)
    }
    fn host(&self, _: &str, shape: &[usize]) -> crate::Result<Vec<f32>> {
        Ok(vec![0.0; shape.iter().product()])
    }
}

/// Checks that a model dimension read from a file or config lies in
/// `lo..=hi`: every size the models compute from such values is then far
/// from overflowing, and an absurd value is refused with its name.
pub fn check_dim(
    origin: &Path,
    what: &str,
    value: usize,
    lo: usize,
    hi: usize,
) -> Result<usize, WeightsError> {
    if (lo..=hi).contains(&value) {
        Ok(value)
    } else {
        Err(WeightsError::Unsupported(format!(
            "{}: {what} is {value}; this engine accepts {lo}..={hi}",
            origin.display()
        )))
    }
}

/// A whole number from a config.json, when the key is present: it must be a
/// non-negative integer in `lo..=hi`.
pub fn config_usize(
    config: Option<&serde_json::Value>,
    origin: &Path,
    key: &str,
    lo: usize,
    hi: usize,
) -> Result<Option<usize>, WeightsError> {
    let Some(v) = config.and_then(|c| c.get(key)).filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
        Some(n) => check_dim(origin, &format!("config.json's {key}"), n, lo, hi).map(Some),
        None => Err(WeightsError::Unsupported(format!(
            "{}: config.json's {key} is {v}; expected a whole number in {lo}..={hi}",
            origin.display()
        ))),
    }
}

/// A real number from a config.json, when the key is present: it must be
/// finite and in `lo..=hi`.
pub fn config_f64(
    config: Option<&serde_json::Value>,
    origin: &Path,
    key: &str,
    lo: f64,
    hi: f64,
) -> Result<Option<f64>, WeightsError> {
    let Some(v) = config.and_then(|c| c.get(key)).filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    match v.as_f64() {
        Some(x) if x.is_finite() && (lo..=hi).contains(&x) => Ok(Some(x)),
        _ => Err(WeightsError::Unsupported(format!(
            "{}: config.json's {key} is {v}; expected a number in [{lo:e}, {hi:e}]",
            origin.display()
        ))),
    }
}

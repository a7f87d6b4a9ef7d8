//! Checkpoints as users download them: memory-mapped safetensors files (one
//! file, or a diffusers folder of shards with an index json), tensors
//! converted from f32/f16/bf16/fp8 at load.

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

/// Errors reading weights, each naming the file or tensor and what was expected.
#[derive(Debug)]
pub enum WeightsError {
    /// The path does not exist or cannot be read.
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        err: String,
    },
    /// Not a safetensors file, or a truncated one.
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A tensor the model needs is absent.
    Missing {
        /// The tensor's name in the file's own naming scheme.
        name: String,
        /// Where it was looked for.
        source: String,
    },
    /// A tensor has the wrong shape.
    Shape {
        /// Tensor name.
        name: String,
        /// Expected shape.
        expected: Vec<usize>,
        /// Shape found.
        found: Vec<usize>,
    },
    /// A tensor is stored in a dtype we cannot convert.
    Dtype {
        /// Tensor name.
        name: String,
        /// The stored dtype.
        found: String,
    },
    /// The layout or model is not one we know.
    Unsupported(String),
}

impl fmt::Display for WeightsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightsError::Io { path, err } => write!(f, "{}: {err}", path.display()),
            WeightsError::Format { path, msg } => {
                write!(
                    f,
                    "{}: not a readable safetensors file: {msg}",
                    path.display()
                )
            }
            WeightsError::Missing { name, source } => {
                write!(f, "tensor '{name}' is missing from {source}")
            }
            WeightsError::Shape {
                name,
                expected,
                found,
            } => write!(
                f,
                "tensor '{name}' has shape {found:?}, expected {expected:?}"
            ),
            WeightsError::Dtype { name, found } => write!(
                f,
                "tensor '{name}' is stored as {found}; supported: F32, F16, BF16, F8_E4M3, F8_E5M2"
            ),
            WeightsError::Unsupported(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for WeightsError {}

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
    match std::fs::read_to_string(&path) {
        Ok(t) => serde_json::from_str(&t)
            .map(Some)
            .map_err(|e| WeightsError::Format {
                path,
                msg: e.to_string(),
            }),
        Err(_) => Ok(None),
    }
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
    pub range: (usize, usize),
}

/// One or more memory-mapped safetensors files seen as one name → tensor map.
pub struct Checkpoint {
    /// The files, in the order they were opened.
    pub files: Vec<PathBuf>,
    maps: Vec<memmap2::Mmap>,
    /// Every tensor, by name.
    pub tensors: BTreeMap<String, TensorEntry>,
}

impl Checkpoint {
    /// Opens safetensors files (shards of one checkpoint, or a single file).
    pub fn open(paths: &[PathBuf]) -> Result<Checkpoint, WeightsError> {
        let mut ck = Checkpoint {
            files: Vec::new(),
            maps: Vec::new(),
            tensors: BTreeMap::new(),
        };
        for path in paths {
            let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
            // SAFETY: the file is only read; a checkpoint changed on disk while
            // we read it gives wrong values, not memory unsafety in our code.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_err(path, e))?;
            let fmt_err = |msg: String| WeightsError::Format {
                path: path.clone(),
                msg,
            };
            let (n, meta) = safetensors::SafeTensors::read_metadata(&map)
                .map_err(|e| fmt_err(e.to_string()))?;
            let base = 8 + n;
            for (name, info) in meta.tensors() {
                let (a, b) = info.data_offsets;
                if base + b > map.len() {
                    return Err(fmt_err(format!(
                        "tensor '{name}' ends at byte {} but the file has {} (truncated?)",
                        base + b,
                        map.len()
                    )));
                }
                ck.tensors.insert(
                    name,
                    TensorEntry {
                        file: ck.files.len(),
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        range: (base + a, base + b),
                    },
                );
            }
            ck.files.push(path.clone());
            ck.maps.push(map);
        }
        Ok(ck)
    }

    /// Opens `<dir>/<stem>.safetensors`, or the shards its `.safetensors.index.json` lists.
    pub fn open_diffusers_component(dir: &Path, stem: &str) -> Result<Checkpoint, WeightsError> {
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| io_err(&index, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| WeightsError::Format {
                    path: index.clone(),
                    msg: e.to_string(),
                })?;
            let map = json["weight_map"]
                .as_object()
                .ok_or_else(|| WeightsError::Format {
                    path: index.clone(),
                    msg: "no \"weight_map\" object".into(),
                })?;
            let mut files: Vec<PathBuf> = map
                .values()
                .filter_map(|v| v.as_str())
                .map(|f| dir.join(f))
                .collect();
            files.sort();
            files.dedup();
            let ck = Self::open(&files)?;
            for name in map.keys() {
                if !ck.tensors.contains_key(name) {
                    return Err(WeightsError::Missing {
                        name: name.clone(),
                        source: format!("the shards listed by {}", index.display()),
                    });
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

    /// The raw bytes of a tensor.
    pub fn bytes(&self, e: &TensorEntry) -> &[u8] {
        &self.maps[e.file][e.range.0..e.range.1]
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
        Ok((e.shape.clone(), to_f32(name, e.dtype, self.bytes(e))?))
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
            maps: Vec::new(),
            tensors: BTreeMap::new(),
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
        }
    };
}
provider_from_read!(mmdit::MmditSource);
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

impl TensorProvider for RandomWeights {
    fn tensor(
        &self,
        gpu: &crate::gpu::Gpu,
        name: &str,
        shape: &[usize],
        dtype: crate::DType,
    ) -> crate::Result<crate::Tensor> {
        let (seed, scale, shift) = self.params(name, shape);
        let mut g = crate::Graph::new();
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

//! GPU tensors: a storage buffer with a shape and an element type.

use std::sync::Arc;

use half::f16;

use crate::error::{Error, Result};
use crate::gpu::{Gpu, TrackedBuffer};

/// Element type of a tensor in GPU memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float: activations, and weights kept in full precision.
    F32,
    /// 16-bit float, two packed per u32: weights (unpacked in the kernels).
    F16,
    /// 32-bit unsigned integer: token ids.
    U32,
    /// bfloat16, two packed per u32: weights as files store them.
    BF16,
    /// float8 e4m3fn (no infinities), four packed per u32: weights.
    F8E4M3,
    /// float8 e5m2, four packed per u32: weights.
    F8E5M2,
    /// GGML block formats (see [`crate::quant`]): blocks of 32 weights with
    /// an f16 scale, 8-bit.
    Q8_0,
    /// 4-bit, symmetric.
    Q4_0,
    /// 4-bit with a minimum.
    Q4_1,
    /// 5-bit, symmetric.
    Q5_0,
    /// 5-bit with a minimum.
    Q5_1,
    /// GGML K-quant: super-blocks of 256, 4-bit with sub-block scales and mins.
    Q4K,
    /// K-quant, 5-bit.
    Q5K,
    /// K-quant, 6-bit.
    Q6K,
}

impl DType {
    /// Bytes that `numel` elements occupy, padded to whole 4-byte words.
    pub fn bytes(self, numel: usize) -> u64 {
        let raw = match self {
            DType::F32 | DType::U32 => numel * 4,
            DType::F16 | DType::BF16 => numel * 2,
            DType::F8E4M3 | DType::F8E5M2 => numel,
            q => crate::quant::packed_bytes(q, numel).unwrap_or(0),
        } as u64;
        raw.div_ceil(4) * 4
    }

    /// Short name: `f32`, `f16`, `u32`, `bf16`, `f8e4m3`, `f8e5m2`.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::U32 => "u32",
            DType::BF16 => "bf16",
            DType::F8E4M3 => "f8e4m3",
            DType::F8E5M2 => "f8e5m2",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q5_0 => "q5_0",
            DType::Q5_1 => "q5_1",
            DType::Q4K => "q4_k",
            DType::Q5K => "q5_k",
            DType::Q6K => "q6_k",
        }
    }

    /// Weight storage packed into u32 words and decoded in the kernels'
    /// load stage (f16, bf16, fp8): the `W_F16` flag with [`Self::packed_format`].
    pub fn is_packed_weight(self) -> bool {
        self.packed_format().is_some()
    }

    /// The kernels' `W_FMT` value of a packed weight type: 0 f16, 1 bf16,
    /// 2 fp8 e4m3fn, 3 fp8 e5m2, 4 Q8_0, 5 Q4_0, 6 Q4_1, 7 Q5_0, 8 Q5_1,
    /// 9 Q4_K, 10 Q5_K, 11 Q6_K.
    pub fn packed_format(self) -> Option<u32> {
        match self {
            DType::F16 => Some(0),
            DType::BF16 => Some(1),
            DType::F8E4M3 => Some(2),
            DType::F8E5M2 => Some(3),
            DType::Q8_0 => Some(4),
            DType::Q4_0 => Some(5),
            DType::Q4_1 => Some(6),
            DType::Q5_0 => Some(7),
            DType::Q5_1 => Some(8),
            DType::Q4K => Some(9),
            DType::Q5K => Some(10),
            DType::Q6K => Some(11),
            _ => None,
        }
    }

    /// The safetensors type of the same encoding (none for block formats).
    pub fn safetensors(self) -> Option<safetensors::Dtype> {
        use safetensors::Dtype as S;
        Some(match self {
            DType::F32 => S::F32,
            DType::F16 => S::F16,
            DType::U32 => S::U32,
            DType::BF16 => S::BF16,
            DType::F8E4M3 => S::F8_E4M3,
            DType::F8E5M2 => S::F8_E5M2,
            _ => return None,
        })
    }

    /// The weight storage of a safetensors type kept as it is on the GPU.
    pub fn packed_from(d: safetensors::Dtype) -> Option<DType> {
        use safetensors::Dtype as S;
        match d {
            S::F16 => Some(DType::F16),
            S::BF16 => Some(DType::BF16),
            S::F8_E4M3 => Some(DType::F8E4M3),
            S::F8_E5M2 => Some(DType::F8E5M2),
            _ => None,
        }
    }
}

/// f32 → float8 e4m3fn bits, rounded to nearest even, saturating at ±448
/// (NaN stays NaN).
pub fn f8e4m3_from_f32(v: f32) -> u8 {
    if v.is_nan() {
        return 0x7f;
    }
    let sign = if v.is_sign_negative() { 0x80 } else { 0 };
    let a = v.abs().min(448.0);
    // The spacing of representable values around a: 2^-9 below 2^-6
    // (subnormals), else 2^(e - 3) in binade e.
    let e = if a < 2f32.powi(-6) {
        -6
    } else {
        ((a.to_bits() >> 23) as i32) - 127
    };
    let q = 2f32.powi(e - 3);
    let r = ((a / q).round_ties_even() * q).min(448.0);
    if r == 0.0 {
        return sign;
    }
    if r < 2f32.powi(-6) {
        return sign | (r / 2f32.powi(-9)) as u8;
    }
    let re = ((r.to_bits() >> 23) as i32) - 127;
    let m = (r / 2f32.powi(re) * 8.0 - 8.0) as u8;
    sign | (((re + 7) as u8) << 3) | m
}

/// f32 → float8 e5m2 bits (through f16, rounded to nearest even).
pub fn f8e5m2_from_f32(v: f32) -> u8 {
    let bits = f16::from_f32(v).to_bits();
    if f16::from_bits(bits).is_nan() {
        return 0x7f | ((bits >> 8) as u8 & 0x80);
    }
    let lsb = (bits >> 8) & 1;
    (bits.wrapping_add(0x7f + lsb) >> 8) as u8
}

/// Formats a shape as `[2, 77, 768]`.
pub fn shape_str(shape: &[usize]) -> String {
    format!("{shape:?}")
}

/// Number of elements of a shape.
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// A tensor living in a GPU storage buffer (weights, inputs, outputs).
#[derive(Clone, Debug)]
pub struct Tensor {
    /// The buffer (at least 4 bytes; f16 data padded to whole words).
    pub buffer: Arc<TrackedBuffer>,
    /// Logical shape.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: DType,
    /// A low-rank update applied beside this (block-quantized) weight by
    /// the layer that uses it (LoRAs on GGUF weights).
    pub low_rank: Option<Arc<crate::models::layers::LowRank>>,
    /// Set on a streamed block's weights: the buffer is a slot that the
    /// block shares with others (see [`crate::stream`]).
    pub stream: Option<crate::stream::StreamRef>,
}

/// Usage every engine buffer gets: bound as storage, copied in and out.
pub(crate) const STORAGE_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// A counted storage buffer of at least `bytes` bytes (checked against the limits).
pub fn create_storage(gpu: &Gpu, label: &str, bytes: u64) -> Result<TrackedBuffer> {
    let bytes = bytes.max(4);
    gpu.check_buffer_size(label, bytes)?;
    let buffer = gpu.guarded(&format!("a buffer for {label}"), bytes, || {
        gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes,
            usage: STORAGE_USAGE,
            mapped_at_creation: false,
        })
    })?;
    Ok(TrackedBuffer::new(buffer, gpu.memory.clone()))
}

fn check_len(shape: &[usize], len: usize) -> Result<()> {
    if numel(shape) != len {
        return Err(Error::Graph(format!(
            "tensor of shape {} needs {} values, got {len}",
            shape_str(shape),
            numel(shape)
        )));
    }
    Ok(())
}

impl Tensor {
    /// Uploads f32 data, stored as `dtype` (f32, or converted to f16).
    pub fn from_f32(gpu: &Gpu, shape: &[usize], dtype: DType, data: &[f32]) -> Result<Tensor> {
        check_len(shape, data.len())?;
        let bytes = match dtype {
            DType::F32 => bytemuck::cast_slice(data).to_vec(),
            DType::F16 => {
                let h: Vec<f16> = data.iter().map(|&v| f16::from_f32(v)).collect();
                bytemuck::cast_slice(&h).to_vec()
            }
            DType::BF16 => {
                let h: Vec<half::bf16> = data.iter().map(|&v| half::bf16::from_f32(v)).collect();
                bytemuck::cast_slice(&h).to_vec()
            }
            DType::F8E4M3 => data.iter().map(|&v| f8e4m3_from_f32(v)).collect(),
            DType::F8E5M2 => data.iter().map(|&v| f8e5m2_from_f32(v)).collect(),
            q @ (DType::Q8_0
            | DType::Q4_0
            | DType::Q4_1
            | DType::Q5_0
            | DType::Q5_1
            | DType::Q4K
            | DType::Q5K
            | DType::Q6K) => crate::quant::quantize(q, data)
                .ok_or_else(|| Error::Graph(format!("cannot quantize to {}", q.name())))?,
            DType::U32 => {
                return Err(Error::Graph(
                    "f32 data cannot be stored as u32; use from_u32".into(),
                ))
            }
        };
        Self::from_bytes(gpu, shape, dtype, bytes)
    }

    /// Uploads bytes already in `dtype`'s encoding (a file's f16, bf16 or
    /// fp8 weights, kept as they are).
    pub fn from_raw(gpu: &Gpu, shape: &[usize], dtype: DType, bytes: Vec<u8>) -> Result<Tensor> {
        let n = numel(shape);
        let raw = match dtype {
            DType::F32 | DType::U32 => 4 * n,
            DType::F16 | DType::BF16 => 2 * n,
            DType::F8E4M3 | DType::F8E5M2 => n,
            q => crate::quant::packed_bytes(q, n).unwrap_or(0),
        };
        if bytes.len() != raw {
            return Err(Error::Graph(format!(
                "{} bytes for a {} tensor of shape {}",
                bytes.len(),
                dtype.name(),
                shape_str(shape)
            )));
        }
        Self::from_bytes(gpu, shape, dtype, bytes)
    }

    /// Uploads f16 data as an f16 tensor.
    pub fn from_f16(gpu: &Gpu, shape: &[usize], data: &[f16]) -> Result<Tensor> {
        check_len(shape, data.len())?;
        Self::from_bytes(gpu, shape, DType::F16, bytemuck::cast_slice(data).to_vec())
    }

    /// Uploads u32 data (token ids).
    pub fn from_u32(gpu: &Gpu, shape: &[usize], data: &[u32]) -> Result<Tensor> {
        check_len(shape, data.len())?;
        Self::from_bytes(gpu, shape, DType::U32, bytemuck::cast_slice(data).to_vec())
    }

    fn from_bytes(gpu: &Gpu, shape: &[usize], dtype: DType, mut bytes: Vec<u8>) -> Result<Tensor> {
        bytes.resize(dtype.bytes(numel(shape)).max(4) as usize, 0);
        let buffer = create_storage(gpu, "tensor", bytes.len() as u64)?;
        gpu.write_buffer("a tensor upload", &buffer, &bytes)?;
        Ok(Tensor {
            buffer: Arc::new(buffer),
            shape: shape.to_vec(),
            dtype,
            low_rank: None,
            stream: None,
        })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    /// Reads the tensor back as f32 (f16 converted, u32 cast).
    pub fn read(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        read_buffer(gpu, &self.buffer, self.dtype, self.numel())
    }
}

/// Reads `numel` elements of `dtype` from the start of `buffer` as f32.
pub(crate) fn read_buffer(
    gpu: &Gpu,
    buffer: &wgpu::Buffer,
    dtype: DType,
    numel: usize,
) -> Result<Vec<f32>> {
    let bytes = gpu.read_bytes(buffer, dtype.bytes(numel).max(4))?;
    Ok(match dtype {
        DType::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(&bytes)[..numel].to_vec(),
        DType::U32 => bytemuck::pod_collect_to_vec::<u8, u32>(&bytes)[..numel]
            .iter()
            .map(|&v| v as f32)
            .collect(),
        DType::F16 => bytemuck::pod_collect_to_vec::<u8, f16>(&bytes)[..numel]
            .iter()
            .map(|v| v.to_f32())
            .collect(),
        other => match other.safetensors() {
            Some(st) => crate::weights::to_f32("tensor", st, &bytes)
                .map_err(|e| Error::Graph(e.to_string()))?[..numel]
                .to_vec(),
            None => crate::quant::dequantize(other, &bytes, numel)
                .ok_or_else(|| Error::Graph(format!("cannot read {} back", other.name())))?,
        },
    })
}

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
}

impl DType {
    /// Bytes that `numel` elements occupy, padded to whole 4-byte words.
    pub fn bytes(self, numel: usize) -> u64 {
        let raw = match self {
            DType::F32 | DType::U32 => numel * 4,
            DType::F16 => numel * 2,
        } as u64;
        raw.div_ceil(4) * 4
    }

    /// Short name: `f32`, `f16`, `u32`.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::U32 => "u32",
        }
    }
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
            DType::U32 => {
                return Err(Error::Graph(
                    "f32 data cannot be stored as u32; use from_u32".into(),
                ))
            }
        };
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
    })
}

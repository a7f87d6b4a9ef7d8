//! sd3-wgpu: Stable Diffusion 3 / 3.5 on any GPU that wgpu reaches, through
//! hand-written WGSL compute kernels.
//!
//! The engine core: [`gpu`] (adapter, device, pipelines, profiler),
//! [`tensor`] (GPU tensors), [`ops`] (one module per kernel family) and
//! [`graph`] (record once, plan once, replay with per-op timings).

pub mod bench;
pub mod bench_arch;
pub mod blur;
pub mod cli;
pub mod decode;
pub mod denoise;
pub mod error;
pub mod files;
pub mod gpu;
pub mod graph;
pub mod image_io;
pub mod lora;
pub mod models;
pub mod ops;
pub mod pipeline;
pub mod quant;
pub mod sampler;
pub mod serve;
pub mod stream;
pub mod target;
pub mod tensor;
pub mod text;
pub mod tokenize;
pub mod torch_rng;
pub mod tune;
pub mod weights;

pub use error::{Error, Result};
pub use gpu::{Gpu, GpuOptions};
pub use graph::{Graph, Plan, Value};
pub use target::Target;
pub use tensor::{DType, Tensor};

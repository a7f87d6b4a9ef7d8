//! Seeded random tensors made on the GPU (`shaders/random.wgsl`), for
//! benchmarking full-size architectures without a checkpoint.
//!
//! Shape: any; f32 or f16 output.

use super::{bytes_of, check_index_space, grid_for, WG};
use crate::error::Result;
use crate::gpu::{Binding, Kernel, PipelineKey};
use crate::graph::{Cost, Graph, OpCall, Value};
use crate::tensor::{numel, DType};

/// The fill kernel.
pub static FILL_RANDOM: Kernel = Kernel {
    file: "random.wgsl",
    entry: "fill_random",
    params: &RandomParams::LAYOUT,
    bindings: &[Binding::write("out")],
    flags: &["W_F16"],
    constants: &[],
    overrides: &[("WG", WG as u32)],
    consts: &[],
};

/// Kernels of this family.
pub static KERNELS: &[&Kernel] = &[&FILL_RANDOM];

crate::params_struct! {
    /// Params of `random.wgsl`.
    pub struct RandomParams {
        /// Elements.
        pub n: u32,
        /// Seed.
        pub seed: u32,
        /// Half-width of the uniform range.
        pub scale: f32,
        /// Centre of the range.
        pub shift: f32,
    }
}

/// A new tensor of uniform values in [shift − scale, shift + scale).
pub fn random_uniform(
    g: &mut Graph,
    shape: &[usize],
    dtype: DType,
    seed: u32,
    scale: f32,
    shift: f32,
) -> Result<Value> {
    let kind = "fill_random";
    if dtype == DType::U32 {
        return Err(g.shape_error(kind, "random tensors are f32 or f16"));
    }
    let n = numel(shape);
    check_index_space(g, kind, n)?;
    let y = g.alloc(shape, dtype);
    let flags = if dtype == DType::F16 {
        vec!["W_F16"]
    } else {
        Vec::new()
    };
    let invocations = if dtype == DType::F16 {
        n.div_ceil(2)
    } else {
        n
    };
    let call = OpCall {
        key: PipelineKey {
            kernel: &FILL_RANDOM,
            flags,
            constants: Vec::new(),
        },
        params: bytes_of(&RandomParams {
            n: n as u32,
            seed,
            scale,
            shift,
        }),
        args: vec![Some(y)],
        workgroups: grid_for(invocations),
        cost: Cost {
            flops: 0,
            bytes: dtype.bytes(n),
        },
    };
    g.record(kind, call)?;
    Ok(y)
}

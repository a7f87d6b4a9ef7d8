//! LoRA merging on the GPU (`shaders/lora.wgsl`): a weight plus a low-rank
//! product, once at load.
//!
//! Shapes: w [rows, cols] (f32 or f16), a [rank, cols] f32, b [rows, rank]
//! f32 → [rows, cols] as `dtype` (f32 or f16).

use super::{bytes_of, check_index_space, expect_dtype, expect_shape, grid_for, WG};
use crate::error::Result;
use crate::gpu::{Binding, Kernel, PipelineKey};
use crate::graph::{Cost, Graph, OpCall, Value};
use crate::tensor::{shape_str, DType};

/// The merge kernel.
pub static LORA_MERGE: Kernel = Kernel {
    file: "lora.wgsl",
    entry: "lora_merge",
    params: &LoraParams::LAYOUT,
    bindings: &[
        Binding::read("w"),
        Binding::read("a"),
        Binding::read("b"),
        Binding::write("out"),
    ],
    flags: &["W_F16", "OUT_F16"],
    constants: &[],
    overrides: &[("WG", WG as u32)],
    consts: &[],
};

/// Kernels of this family.
pub static KERNELS: &[&Kernel] = &[&LORA_MERGE];

crate::params_struct! {
    /// Params of `lora.wgsl`.
    pub struct LoraParams {
        /// Elements of the weight.
        pub n: u32,
        /// Its columns (inputs).
        pub cols: u32,
        /// Rank of the product (all merged LoRAs together).
        pub rank: u32,
        /// Padding.
        pub _pad: u32,
    }
}

/// w + b · a, stored as `dtype`: the weight of a layer with LoRAs merged
/// (their scales already in b). The weight may be given in any 2-D view
/// (a convolution's [out, in · kh · kw]).
pub fn lora_merge(g: &mut Graph, w: Value, a: Value, b: Value, dtype: DType) -> Result<Value> {
    let kind = "lora_merge";
    expect_dtype(g, kind, "w", w, &[DType::F32, DType::F16])?;
    expect_dtype(g, kind, "a", a, &[DType::F32])?;
    expect_dtype(g, kind, "b", b, &[DType::F32])?;
    let ws = g.shape(w).to_vec();
    let (az, bz) = (g.shape(a).to_vec(), g.shape(b).to_vec());
    if ws.len() != 2 || az.len() != 2 || az[1] != ws[1] || az[0] == 0 {
        return Err(g.shape_error(
            kind,
            format!(
                "a must be [rank, cols] for w [rows, cols]: w {}, a {}",
                shape_str(&ws),
                shape_str(&az)
            ),
        ));
    }
    expect_shape(g, kind, "b", b, &[ws[0], az[0]])?;
    if dtype == DType::U32 {
        return Err(g.shape_error(kind, "weights are f32 or f16"));
    }
    let n = ws[0] * ws[1];
    check_index_space(g, kind, n.max(bz.iter().product()).max(az.iter().product()))?;
    let out = g.alloc(&ws, dtype);
    let mut flags = Vec::new();
    if g.dtype(w) == DType::F16 {
        flags.push("W_F16");
    }
    if dtype == DType::F16 {
        flags.push("OUT_F16");
    }
    let invocations = if dtype == DType::F16 {
        n.div_ceil(2)
    } else {
        n
    };
    let (n64, r64) = (n as u64, az[0] as u64);
    let call = OpCall {
        key: PipelineKey {
            kernel: &LORA_MERGE,
            flags,
            constants: Vec::new(),
        },
        params: bytes_of(&LoraParams {
            n: n as u32,
            cols: ws[1] as u32,
            rank: az[0] as u32,
            _pad: 0,
        }),
        args: vec![Some(w), Some(a), Some(b), Some(out)],
        workgroups: grid_for(invocations),
        cost: Cost {
            flops: 2 * n64 * r64,
            bytes: g.dtype(w).bytes(n) + dtype.bytes(n) + 4 * r64 * (ws[0] + ws[1]) as u64,
        },
    };
    g.record(kind, call)?;
    Ok(out)
}

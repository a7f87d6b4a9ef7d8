//! The Rust side of each kernel family: shapes, bindings, params, dispatch, cost.
//!
//! Each op function checks its inputs' shapes and dtypes (returning
//! [`Error::Shape`] that names the op, what was expected and what was found),
//! allocates its output in the [`Graph`], and records one or more dispatches.
//! Nothing here touches the GPU: planning does.

pub mod attention;
pub mod choice;
pub mod conv;
pub mod elementwise;
pub mod layout;
pub mod linear;
pub mod lora;
pub mod norm;
pub mod random;
pub mod sampler;
pub mod softmax;

use crate::error::{Error, Result};
use crate::gpu::Kernel;
use crate::graph::{Graph, OpCall, Value};
use crate::target::Feature;
use crate::tensor::{shape_str, DType};
use choice::{record_first, Implementation};

/// Every kernel the engine can dispatch (for the portability and binding tests).
pub fn all_kernels() -> Vec<&'static Kernel> {
    let mut k = Vec::new();
    k.extend_from_slice(linear::KERNELS);
    k.extend_from_slice(norm::KERNELS);
    k.extend_from_slice(softmax::KERNELS);
    k.extend_from_slice(elementwise::KERNELS);
    k.extend_from_slice(attention::KERNELS);
    k.extend_from_slice(conv::KERNELS);
    k.extend_from_slice(layout::KERNELS);
    k.extend_from_slice(random::KERNELS);
    k.extend_from_slice(sampler::KERNELS);
    k.extend_from_slice(lora::KERNELS);
    k
}

/// Workgroup size of the elementwise and row kernels (`override WG` in the
/// WGSL); a power of two, as the row reductions halve it.
pub(crate) const WG: u64 = 256;
const _: () = assert!(WG.is_power_of_two());
/// Workgroups per grid row: stays under every adapter's 65535 per dimension.
const GRID_X: u64 = 32768;

/// A 2-D grid of at least `workgroups` workgroups (kernels flatten it back).
pub(crate) fn grid(workgroups: u64) -> [u32; 3] {
    let x = workgroups.clamp(1, GRID_X);
    [x as u32, workgroups.div_ceil(x).max(1) as u32, 1]
}

/// Grid for one invocation per element of `n`.
pub(crate) fn grid_for(n: usize) -> [u32; 3] {
    grid((n as u64).div_ceil(WG))
}

/// Bytes of a `#[repr(C)]` params struct.
pub(crate) fn bytes_of<P: bytemuck::Pod>(p: &P) -> Vec<u8> {
    bytemuck::bytes_of(p).to_vec()
}

/// u32 conversion that fails with the op's label instead of truncating.
pub(crate) fn u32_of(g: &Graph, kind: &str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| {
        g.shape_error(
            kind,
            format!("{what} = {v} does not fit the kernel's 32-bit indices"),
        )
    })
}

/// Checks a value's element type.
pub(crate) fn expect_dtype(
    g: &Graph,
    kind: &str,
    name: &str,
    v: Value,
    allowed: &[DType],
) -> Result<()> {
    let d = g.dtype(v);
    if allowed.contains(&d) {
        return Ok(());
    }
    let names: Vec<&str> = allowed.iter().map(|d| d.name()).collect();
    Err(g.shape_error(
        kind,
        format!("{name} must be {}, found {}", names.join(" or "), d.name()),
    ))
}

/// Checks a value's exact shape.
pub(crate) fn expect_shape(
    g: &Graph,
    kind: &str,
    name: &str,
    v: Value,
    want: &[usize],
) -> Result<()> {
    if g.shape(v) == want {
        return Ok(());
    }
    Err(g.shape_error(
        kind,
        format!(
            "{name} must have shape {}, found {}",
            shape_str(want),
            shape_str(g.shape(v))
        ),
    ))
}

/// Checks a value's rank and returns its shape.
pub(crate) fn expect_rank(
    g: &Graph,
    kind: &str,
    name: &str,
    v: Value,
    rank: usize,
    layout: &str,
) -> Result<Vec<usize>> {
    let s = g.shape(v).to_vec();
    if s.len() != rank {
        return Err(g.shape_error(
            kind,
            format!("{name} must be {layout}, found shape {}", shape_str(&s)),
        ));
    }
    Ok(s)
}

/// A row kernel's dispatch (norms, softmax) before its reduction is chosen.
#[derive(Clone, Debug)]
pub struct RowCall {
    /// Label kind.
    pub kind: &'static str,
    /// The dispatch, without the SUBGROUP flag.
    pub call: OpCall,
    /// The value it writes (returned).
    pub out: Value,
}

/// How a row kernel reduces, in order of preference: subgroup operations
/// (`subgroupAdd`/`subgroupMax`, one partial per subgroup through workgroup
/// memory), then a tree over workgroup memory.
pub static ROW_REDUCTION: &[Implementation<RowCall>] = &[
    Implementation {
        name: "subgroup",
        needs: &[Feature::Subgroup],
        supports: |t, _| {
            if t.subgroup_max == 0 || t.subgroup_max as u64 > WG {
                return Err(format!(
                    "subgroups of up to {} in workgroups of {WG}",
                    t.subgroup_max
                ));
            }
            Ok(())
        },
        record: |g, c| {
            let mut call = c.call.clone();
            call.key.flags.push("SUBGROUP");
            g.record(c.kind, call)?;
            Ok(c.out)
        },
    },
    Implementation {
        name: "workgroup",
        needs: &[],
        supports: |_, _| Ok(()),
        record: |g, c| {
            g.record(c.kind, c.call.clone())?;
            Ok(c.out)
        },
    },
];

/// Records a row kernel with the first reduction the target takes.
pub(crate) fn record_row(
    g: &mut Graph,
    kind: &'static str,
    call: OpCall,
    out: Value,
) -> Result<Value> {
    record_first(g, kind, ROW_REDUCTION, &RowCall { kind, call, out })
}

/// Element types an activation binding accepts.
pub(crate) const ACT: &[DType] = &[DType::F32, DType::F16];

/// The `<BINDING>_F16` flag of each bound value stored as f16 (the shader
/// then declares that binding `array<f16>`; reads and writes convert, all
/// arithmetic stays f32).
pub(crate) fn f16_flags(g: &Graph, pairs: &[(&'static str, Option<Value>)]) -> Vec<&'static str> {
    pairs
        .iter()
        .filter(|(_, v)| v.is_some_and(|v| g.dtype(v) == DType::F16))
        .map(|(f, _)| *f)
        .collect()
}

/// The `W_F16` flag when a weight-like value is stored packed (f16, bf16,
/// fp8; see `shaders/weights.wgsl`).
pub(crate) fn weight_flags(g: &Graph, v: Value) -> Vec<&'static str> {
    if g.dtype(v).is_packed_weight() {
        vec!["W_F16"]
    } else {
        Vec::new()
    }
}

/// The `W_FMT` constant of a packed weight other than f16 (the shader's
/// default is f16).
pub(crate) fn weight_constants(g: &Graph, v: Value) -> Vec<(&'static str, f64)> {
    match g.dtype(v).packed_format() {
        Some(f) if f != 0 => vec![("W_FMT", f as f64)],
        _ => Vec::new(),
    }
}

/// Storage types a weight operand may have.
pub const WEIGHTS: &[DType] = &[
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::F8E4M3,
    DType::F8E5M2,
    DType::Q8_0,
    DType::Q4_0,
    DType::Q4_1,
    DType::Q5_0,
    DType::Q5_1,
    DType::Q4K,
    DType::Q5K,
    DType::Q6K,
];

/// Every `W_FMT` value (the per-call constant of kernels reading weights).
pub(crate) const W_FMT_VALUES: &[f64] =
    &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0];

/// Errors for a mis-sized value of `n` elements in 32-bit index space.
pub(crate) fn check_index_space(g: &Graph, kind: &str, n: usize) -> Result<()> {
    if n > u32::MAX as usize / 2 {
        return Err(Error::Shape {
            op: g.label(kind),
            msg: format!("{n} elements exceed the kernels' 32-bit index space"),
        });
    }
    Ok(())
}

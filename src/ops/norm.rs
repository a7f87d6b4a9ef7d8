//! Normalisations (`shaders/norm.wgsl`): LayerNorm, RMSNorm, GroupNorm (+SiLU)
//! and the adaLN modulation fused with LayerNorm.
//!
//! Shapes: `layer_norm`, `rms_norm`: x [.., c] with weight/bias [c];
//! `adaln_modulate`: x [batch, tokens, c], modulation [batch, chunks·c];
//! `group_norm`: x [batch, channels, h, w] with weight/bias [channels].
//! All f32, statistics in f32.

use super::{
    bytes_of, check_index_space, expect_dtype, expect_shape, f16_flags, grid, record_row, u32_of,
    ACT, WG,
};
use crate::error::Result;
use crate::gpu::{Binding, Kernel, PipelineKey};
use crate::graph::{Cost, Graph, OpCall, Value};
use crate::tensor::{numel, shape_str, DType};

const BINDINGS: &[Binding] = &[
    Binding::read("x"),
    Binding::read("weight"),
    Binding::read("bias"),
    Binding::write("y"),
];

macro_rules! norm_kernel {
    ($name:ident, $entry:literal) => {
        #[doc = concat!("`", $entry, "` in norm.wgsl.")]
        pub static $name: Kernel = Kernel {
            file: "norm.wgsl",
            entry: $entry,
            params: &NormParams::LAYOUT,
            bindings: BINDINGS,
            flags: &["X_F16", "WEIGHT_F16", "Y_F16", "SUBGROUP"],
            constants: &[],
            overrides: &[
                ("WG", WG as u32),
                ("HAS_WEIGHT", HAS_WEIGHT),
                ("HAS_BIAS", HAS_BIAS),
                ("SILU", SILU),
            ],
            consts: &[],
        };
    };
}
norm_kernel!(LAYER_NORM, "layer_norm");
norm_kernel!(RMS_NORM, "rms_norm");
norm_kernel!(ADALN_MODULATE, "adaln_modulate");
norm_kernel!(GROUP_NORM, "group_norm");
norm_kernel!(GROUP_STATS, "group_stats");

/// Kernels of this family.
pub static KERNELS: &[&Kernel] = &[
    &LAYER_NORM,
    &RMS_NORM,
    &ADALN_MODULATE,
    &GROUP_NORM,
    &GROUP_STATS,
    &RESIDUAL_ADALN,
];

crate::params_struct! {
    /// Params of `norm.wgsl`.
    pub struct NormParams {
        /// Rows (workgroups).
        pub rows: u32,
        /// Values per row.
        pub cols: u32,
        /// Bit 0 weight, bit 1 bias, bit 2 SiLU.
        pub flags: u32,
        /// adaLN: tokens per batch entry.
        pub inner: u32,
        /// Epsilon inside the square root.
        pub eps: f32,
        /// adaLN: elements between batch rows of the modulation vector.
        pub mod_stride: u32,
        /// adaLN: offset of the shift chunk.
        pub shift_off: u32,
        /// adaLN: offset of the scale chunk.
        pub scale_off: u32,
        /// GroupNorm: h·w.
        pub spatial: u32,
        /// GroupNorm: channels per group.
        pub ch_per_group: u32,
        /// GroupNorm: groups.
        pub groups: u32,
        /// Padding.
        pub _pad: u32,
    }
}

/// Flag bit: a weight is bound.
pub const HAS_WEIGHT: u32 = 1;
/// Flag bit: a bias is bound.
pub const HAS_BIAS: u32 = 2;
/// Flag bit: SiLU after the GroupNorm.
pub const SILU: u32 = 4;

fn check_vec(g: &Graph, kind: &str, name: &str, v: Option<Value>, len: usize) -> Result<u32> {
    let Some(v) = v else { return Ok(0) };
    expect_dtype(g, kind, name, v, &[DType::F32])?;
    expect_shape(g, kind, name, v, &[len])?;
    Ok(1)
}

fn rows_cols(g: &Graph, kind: &str, x: Value) -> Result<(usize, usize)> {
    expect_dtype(g, kind, "x", x, ACT)?;
    let s = g.shape(x);
    let Some(&cols) = s.last() else {
        return Err(g.shape_error(kind, "x must have at least one dimension"));
    };
    check_index_space(g, kind, numel(s))?;
    Ok((numel(s) / cols.max(1), cols))
}

fn record(
    g: &mut Graph,
    kind: &'static str,
    kernel: &'static Kernel,
    x: Value,
    w: Option<Value>,
    b: Option<Value>,
    p: NormParams,
) -> Result<Value> {
    let shape = g.shape(x).to_vec();
    let y = g.alloc(&shape, g.act());
    let n = numel(&shape) as u64;
    let flags = f16_flags(
        g,
        &[("X_F16", Some(x)), ("WEIGHT_F16", w), ("Y_F16", Some(y))],
    );
    let call = OpCall {
        key: PipelineKey {
            kernel,
            flags,
            constants: Vec::new(),
        },
        params: bytes_of(&p),
        args: vec![Some(x), w, b, Some(y)],
        workgroups: grid(p.rows as u64),
        // Two statistics passes and one normalising pass over x, one write.
        cost: Cost {
            flops: 7 * n,
            bytes: 16 * n,
        },
    };
    record_row(g, kind, call, y)
}

/// LayerNorm over the last axis, weight and bias optional (SD3 uses neither).
pub fn layer_norm(
    g: &mut Graph,
    x: Value,
    weight: Option<Value>,
    bias: Option<Value>,
    eps: f32,
) -> Result<Value> {
    let kind = "layer_norm";
    let (rows, cols) = rows_cols(g, kind, x)?;
    let flags = check_vec(g, kind, "weight", weight, cols)? * HAS_WEIGHT
        + check_vec(g, kind, "bias", bias, cols)? * HAS_BIAS;
    let p = NormParams {
        rows: u32_of(g, kind, "rows", rows)?,
        cols: cols as u32,
        flags,
        eps,
        ..Default::default()
    };
    record(g, kind, &LAYER_NORM, x, weight, bias, p)
}

/// RMSNorm over the last axis: x / sqrt(mean(x²) + eps) · weight.
pub fn rms_norm(g: &mut Graph, x: Value, weight: Option<Value>, eps: f32) -> Result<Value> {
    let kind = "rms_norm";
    let (rows, cols) = rows_cols(g, kind, x)?;
    let flags = check_vec(g, kind, "weight", weight, cols)? * HAS_WEIGHT;
    let p = NormParams {
        rows: u32_of(g, kind, "rows", rows)?,
        cols: cols as u32,
        flags,
        eps,
        ..Default::default()
    };
    record(g, kind, &RMS_NORM, x, weight, None, p)
}

/// One chunk of an adaLN modulation vector m [batch, chunks·c]: the row
/// `m[b, index·c .. (index+1)·c]` for each batch entry b.
#[derive(Clone, Copy, Debug)]
pub struct ModChunk {
    /// The modulation vector.
    pub m: Value,
    /// Which chunk (SD3 order: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp).
    pub index: usize,
}

/// Checks that `chunk` fits a stream x [batch, tokens, c]; returns (mod_stride, chunk offset).
pub(crate) fn chunk_offset(
    g: &Graph,
    kind: &str,
    name: &str,
    chunk: ModChunk,
    batch: usize,
    c: usize,
) -> Result<(u32, u32)> {
    expect_dtype(g, kind, name, chunk.m, ACT)?;
    let ms = g.shape(chunk.m);
    if ms.len() != 2
        || ms[0] != batch
        || !ms[1].is_multiple_of(c.max(1))
        || (chunk.index + 1) * c > ms[1]
    {
        return Err(g.shape_error(
            kind,
            format!(
                "{name}: modulation must be [{batch}, chunks·{c}] with chunk {} present, found {}",
                chunk.index,
                shape_str(ms)
            ),
        ));
    }
    Ok((ms[1] as u32, (chunk.index * c) as u32))
}

/// adaLN: LN(x)·(1 + scale) + shift with x [batch, tokens, c] and shift, scale
/// chunks of one modulation vector [batch, chunks·c]; LayerNorm without affine.
pub fn adaln_modulate(
    g: &mut Graph,
    x: Value,
    shift: ModChunk,
    scale: ModChunk,
    eps: f32,
) -> Result<Value> {
    let kind = "adaln_modulate";
    expect_dtype(g, kind, "x", x, ACT)?;
    let xs = super::expect_rank(g, kind, "x", x, 3, "[batch, tokens, c]")?;
    if shift.m != scale.m {
        return Err(g.shape_error(
            kind,
            "shift and scale must be chunks of the same modulation vector",
        ));
    }
    check_index_space(g, kind, numel(&xs))?;
    let (stride, shift_off) = chunk_offset(g, kind, "shift", shift, xs[0], xs[2])?;
    let (_, scale_off) = chunk_offset(g, kind, "scale", scale, xs[0], xs[2])?;
    let p = NormParams {
        rows: (xs[0] * xs[1]) as u32,
        cols: xs[2] as u32,
        inner: xs[1].max(1) as u32,
        eps,
        mod_stride: stride,
        shift_off,
        scale_off,
        ..Default::default()
    };
    record(g, kind, &ADALN_MODULATE, x, Some(shift.m), None, p)
}

/// GroupNorm over x [batch, channels, h, w] in `groups` groups with
/// per-channel weight/bias, optionally followed by SiLU (the VAE's pairing).
pub fn group_norm(
    g: &mut Graph,
    x: Value,
    groups: usize,
    weight: Option<Value>,
    bias: Option<Value>,
    eps: f32,
    silu: bool,
) -> Result<Value> {
    let kind = if silu {
        "group_norm_silu"
    } else {
        "group_norm"
    };
    let (xs, mut p) = group_params(g, kind, x, groups, eps)?;
    p.flags = check_vec(g, kind, "weight", weight, xs[1])? * HAS_WEIGHT
        + check_vec(g, kind, "bias", bias, xs[1])? * HAS_BIAS
        + if silu { SILU } else { 0 };
    record(g, kind, &GROUP_NORM, x, weight, bias, p)
}

/// The checks and params GroupNorm and its statistics share: one row per
/// (batch, group) of x [batch, channels, h, w].
fn group_params(
    g: &Graph,
    kind: &str,
    x: Value,
    groups: usize,
    eps: f32,
) -> Result<(Vec<usize>, NormParams)> {
    expect_dtype(g, kind, "x", x, ACT)?;
    let xs = super::expect_rank(g, kind, "x", x, 4, "[batch, channels, h, w]")?;
    let c = xs[1];
    if groups == 0 || c % groups != 0 {
        return Err(g.shape_error(
            kind,
            format!("{c} channels do not split into {groups} groups"),
        ));
    }
    check_index_space(g, kind, numel(&xs))?;
    let spatial = xs[2] * xs[3];
    let p = NormParams {
        rows: u32_of(g, kind, "rows", xs[0] * groups)?,
        cols: u32_of(g, kind, "cols", c / groups * spatial)?,
        eps,
        spatial: spatial.max(1) as u32,
        ch_per_group: (c / groups) as u32,
        groups: groups as u32,
        ..Default::default()
    };
    Ok((xs, p))
}

/// The statistics of `group_norm` alone: x [batch, channels, h, w] →
/// [batch, groups, 2] f32 (mean, 1/√(var + eps)), for kernels that fold the
/// normalisation into their input load.
pub fn group_stats(g: &mut Graph, x: Value, groups: usize, eps: f32) -> Result<Value> {
    let kind = "group_stats";
    let (xs, p) = group_params(g, kind, x, groups, eps)?;
    let y = g.alloc(&[xs[0], groups, 2], DType::F32);
    let n = numel(&xs) as u64;
    let call = OpCall {
        key: PipelineKey {
            kernel: &GROUP_STATS,
            flags: f16_flags(g, &[("X_F16", Some(x))]),
            constants: Vec::new(),
        },
        params: bytes_of(&p),
        args: vec![Some(x), None, None, Some(y)],
        workgroups: grid(p.rows as u64),
        // Two passes over x.
        cost: Cost {
            flops: 4 * n,
            bytes: if g.dtype(x) == DType::F16 { 4 } else { 8 } * n,
        },
    };
    record_row(g, kind, call, y)
}

/// The fused adaLN-Zero residual (`shaders/residual_norm.wgsl`).
pub static RESIDUAL_ADALN: Kernel = Kernel {
    file: "residual_norm.wgsl",
    entry: "residual_adaln",
    params: &ResidualNormParams::LAYOUT,
    bindings: &[
        Binding::read("x"),
        Binding::read("branch"),
        Binding::read("modv"),
        Binding::write("x_out"),
        Binding::write("h_out"),
    ],
    flags: &[
        "X_F16",
        "BRANCH_F16",
        "MODV_F16",
        "X_OUT_F16",
        "H_OUT_F16",
        "SUBGROUP",
    ],
    constants: &[],
    overrides: &[("WG", WG as u32)],
    consts: &[],
};

crate::params_struct! {
    /// Params of `residual_norm.wgsl`.
    pub struct ResidualNormParams {
        /// Rows (batch · tokens).
        pub rows: u32,
        /// Channels.
        pub cols: u32,
        /// Tokens per batch entry.
        pub inner: u32,
        /// Elements between batch rows of the modulation vector.
        pub mod_stride: u32,
        /// Offset of the gate chunk.
        pub gate_off: u32,
        /// Offset of the shift chunk.
        pub shift_off: u32,
        /// Offset of the scale chunk.
        pub scale_off: u32,
        /// LayerNorm epsilon.
        pub eps: f32,
    }
}

/// x' = x + gate · branch and h = LN(x')·(1 + scale) + shift in one pass over
/// x, branch [batch, tokens, c]; gate, shift, scale chunks of one modulation
/// vector. Returns (x', h). Same result as `gated_residual` then `adaln_modulate`.
pub fn residual_adaln(
    g: &mut Graph,
    x: Value,
    gate: ModChunk,
    branch: Value,
    shift: ModChunk,
    scale: ModChunk,
    eps: f32,
) -> Result<(Value, Value)> {
    let kind = "residual_adaln";
    expect_dtype(g, kind, "x", x, ACT)?;
    expect_dtype(g, kind, "branch", branch, ACT)?;
    let xs = super::expect_rank(g, kind, "x", x, 3, "[batch, tokens, c]")?;
    expect_shape(g, kind, "branch", branch, &xs)?;
    if gate.m != shift.m || gate.m != scale.m {
        return Err(g.shape_error(
            kind,
            "gate, shift and scale must be chunks of one modulation vector",
        ));
    }
    check_index_space(g, kind, numel(&xs))?;
    let (stride, gate_off) = chunk_offset(g, kind, "gate", gate, xs[0], xs[2])?;
    let (_, shift_off) = chunk_offset(g, kind, "shift", shift, xs[0], xs[2])?;
    let (_, scale_off) = chunk_offset(g, kind, "scale", scale, xs[0], xs[2])?;
    let p = ResidualNormParams {
        rows: (xs[0] * xs[1]) as u32,
        cols: xs[2] as u32,
        inner: xs[1].max(1) as u32,
        mod_stride: stride,
        gate_off,
        shift_off,
        scale_off,
        eps,
    };
    let x_out = g.alloc(&xs, g.act());
    let h_out = g.alloc(&xs, g.act());
    let n = numel(&xs) as u64;
    let flags = f16_flags(
        g,
        &[
            ("X_F16", Some(x)),
            ("BRANCH_F16", Some(branch)),
            ("MODV_F16", Some(gate.m)),
            ("X_OUT_F16", Some(x_out)),
            ("H_OUT_F16", Some(h_out)),
        ],
    );
    let call = OpCall {
        key: PipelineKey {
            kernel: &RESIDUAL_ADALN,
            flags,
            constants: Vec::new(),
        },
        params: bytes_of(&p),
        args: vec![
            Some(x),
            Some(branch),
            Some(gate.m),
            Some(x_out),
            Some(h_out),
        ],
        workgroups: grid(p.rows as u64),
        // Three passes over x and branch, two writes.
        cost: Cost {
            flops: 12 * n,
            bytes: 32 * n,
        },
    };
    record_row(g, kind, call, x_out)?;
    Ok((x_out, h_out))
}

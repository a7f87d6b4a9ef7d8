//! Convolution and upsampling on NCHW tensors (`shaders/conv.wgsl`).
//!
//! Shapes: `conv2d`: x [batch, cin, h, w], w [cout, cin, kh, kw] (f32/f16),
//! b [cout] → [batch, cout, (h + 2·pad − kh)/stride + 1, …];
//! `upsample_nearest2x`: [batch, c, h, w] → [batch, c, 2h, 2w].

use super::choice::{record_first, Implementation};
use super::{
    bytes_of, check_index_space, expect_dtype, expect_shape, f16_flags, grid_for, linear, norm,
    u32_of, weight_constants, weight_flags, ACT, WEIGHTS, WG, W_FMT_VALUES,
};
use crate::error::Result;
use crate::gpu::{Binding, Kernel, PipelineKey};
use crate::graph::{Cost, Graph, OpCall, Value};
use crate::target::Feature;
use crate::tensor::{numel, shape_str, DType};

const BINDINGS: &[Binding] = &[
    Binding::read("x"),
    Binding::read("w"),
    Binding::read("bias"),
    Binding::write("y"),
];

/// Direct convolution.
pub static CONV2D: Kernel = Kernel {
    file: "conv.wgsl",
    entry: "conv2d",
    params: &ConvParams::LAYOUT,
    bindings: BINDINGS,
    flags: &["W_F16", "X_F16", "Y_F16"],
    constants: &[("W_FMT", W_FMT_VALUES)],
    overrides: &[("WG", WG as u32)],
    consts: &[("OC_PER", OC_PER as u32)],
};
/// Nearest-neighbour 2× upsampling.
pub static UPSAMPLE2X: Kernel = Kernel {
    file: "conv.wgsl",
    entry: "upsample2x",
    params: &ConvParams::LAYOUT,
    bindings: BINDINGS,
    flags: &["W_F16", "X_F16", "Y_F16"],
    constants: &[("W_FMT", W_FMT_VALUES)],
    overrides: &[("WG", WG as u32)],
    consts: &[],
};

/// Convolution as an implicit GEMM on tensor cores, GroupNorm folded in.
pub static CONV_COOP: Kernel = Kernel {
    file: "conv_coop.wgsl",
    entry: "gemm_coop",
    params: &ConvGemmParams::LAYOUT,
    bindings: &[
        Binding::read("x"),
        Binding::read("w"),
        Binding::read("bias"),
        Binding::read("stats"),
        Binding::read("gamma"),
        Binding::read("beta"),
        Binding::write("y"),
    ],
    flags: &["W_F16", "X_F16", "Y_F16", "COOP16"],
    constants: &[
        ("S", crate::target::COOP_SUBGROUP_SIZES),
        ("W_FMT", W_FMT_VALUES),
    ],
    overrides: &[
        ("GM", linear::COOP_GM),
        ("GN", linear::COOP_GN),
        ("NORM", NORM),
        ("SILU", SILU),
    ],
    consts: &[],
};

/// Flag bit of conv_coop.wgsl: a GroupNorm is folded into the input load.
pub const NORM: u32 = 1;
/// Flag bit of conv_coop.wgsl: SiLU after the folded GroupNorm.
pub const SILU: u32 = 2;

/// Kernels of this family.
pub static KERNELS: &[&Kernel] = &[&CONV2D, &UPSAMPLE2X, &CONV_COOP];

/// Output channels per invocation (`OC_PER` in conv.wgsl).
const OC_PER: usize = 4;

crate::params_struct! {
    /// Params of `conv.wgsl`.
    pub struct ConvParams {
        /// Batch.
        pub batch: u32,
        /// Input channels.
        pub cin: u32,
        /// Input height.
        pub h: u32,
        /// Input width.
        pub wd: u32,
        /// Output channels.
        pub cout: u32,
        /// Output height.
        pub oh: u32,
        /// Output width.
        pub ow: u32,
        /// Kernel height.
        pub kh: u32,
        /// Kernel width.
        pub kw: u32,
        /// Stride (both axes).
        pub stride: u32,
        /// Zero padding (all sides).
        pub pad: u32,
        /// 1 when a bias is bound.
        pub has_bias: u32,
        /// Invocations.
        pub n: u32,
        /// Padding.
        pub _pad0: u32,
        /// Padding.
        pub _pad1: u32,
        /// Padding.
        pub _pad2: u32,
    }
}

crate::params_struct! {
    /// Params of `conv_coop.wgsl`.
    pub struct ConvGemmParams {
        /// GEMM rows: output pixels per batch entry.
        pub m: u32,
        /// GEMM columns: output channels.
        pub n: u32,
        /// GEMM depth: cin · kh · kw.
        pub k: u32,
        /// Input channels.
        pub cin: u32,
        /// Input height.
        pub h: u32,
        /// Input width.
        pub wd: u32,
        /// Output width.
        pub ow: u32,
        /// Kernel height.
        pub kh: u32,
        /// Kernel width.
        pub kw: u32,
        /// Stride (both axes).
        pub stride: u32,
        /// Zero padding before each spatial axis.
        pub pad: u32,
        /// 1 when a bias is bound.
        pub has_bias: u32,
        /// Bit 0 folded GroupNorm, bit 1 SiLU.
        pub flags: u32,
        /// GroupNorm groups (1 without).
        pub groups: u32,
        /// Input channels per group.
        pub ch_per_group: u32,
        /// Padding.
        pub _pad: u32,
    }
}

/// A GroupNorm (+SiLU) applied to a convolution's input (the VAE's pairing),
/// which the tensor-core implementation folds into its input load.
#[derive(Clone, Copy, Debug)]
pub struct GroupNormFold {
    /// Groups the input channels split into.
    pub groups: usize,
    /// Per-channel scale [cin] (f32).
    pub weight: Value,
    /// Per-channel shift [cin] (f32).
    pub bias: Value,
    /// Epsilon inside the square root.
    pub eps: f32,
    /// SiLU after the normalisation.
    pub silu: bool,
}

/// The arguments of one convolution, checked, with its geometry.
#[derive(Clone, Copy, Debug)]
pub struct ConvCall {
    /// Input [batch, cin, h, w].
    pub x: Value,
    /// Weights [cout, cin, kh, kw].
    pub w: Value,
    /// Bias [cout].
    pub b: Option<Value>,
    /// Stride (both axes).
    pub stride: usize,
    /// Zeros before and after each spatial axis.
    pub pad: [usize; 2],
    /// A GroupNorm (+SiLU) of the input, if any.
    pub norm: Option<GroupNormFold>,
    /// Input shape.
    pub xs: [usize; 4],
    /// Weight shape.
    pub ws: [usize; 4],
    /// Output height and width.
    pub out_hw: [usize; 2],
}

impl ConvCall {
    fn out_shape(&self) -> [usize; 4] {
        [self.xs[0], self.ws[0], self.out_hw[0], self.out_hw[1]]
    }

    fn macs(&self) -> u64 {
        (numel(&self.out_shape()) * self.xs[1] * self.ws[2] * self.ws[3]) as u64
    }
}

/// Convolution's implementations, in order of preference: the implicit GEMM
/// on tensor cores (f16 activations; a GroupNorm folded into its input
/// load), then the direct kernel (after a separate GroupNorm when there is
/// one): the reference.
pub static IMPLEMENTATIONS: &[Implementation<ConvCall>] = &[
    Implementation {
        name: "coop",
        needs: &[Feature::Coop],
        supports: |t, c| {
            let (f, _) = linear::coop_shape(t)?;
            let (bm, bn) = linear::coop_block(f);
            let pixels = c.out_hw[0] * c.out_hw[1];
            let max = t.limits.max_compute_workgroups_per_dimension as usize;
            if pixels.div_ceil(bm) > max || c.ws[0].div_ceil(bn) > max || c.xs[0] > max {
                return Err(format!(
                    "{pixels} output pixels need more than {max} workgroups of {bm}"
                ));
            }
            Ok(())
        },
        record: record_coop,
    },
    Implementation {
        name: "direct",
        needs: &[],
        supports: |_, _| Ok(()),
        record: record_direct,
    },
];

/// 2-D convolution with square stride and `pad` zeros on every side.
pub fn conv2d(
    g: &mut Graph,
    x: Value,
    w: Value,
    b: Option<Value>,
    stride: usize,
    pad: usize,
) -> Result<Value> {
    conv2d_padded(g, x, w, b, stride, [pad, pad])
}

/// 2-D convolution with `pad[0]` zeros before and `pad[1]` after each spatial
/// axis (the VAE encoder's downsampler pads (0, 1)).
pub fn conv2d_padded(
    g: &mut Graph,
    x: Value,
    w: Value,
    b: Option<Value>,
    stride: usize,
    pad: [usize; 2],
) -> Result<Value> {
    let call = conv_call(g, x, w, b, stride, pad, None)?;
    record_first(g, "conv2d", IMPLEMENTATIONS, &call)
}

/// GroupNorm (+SiLU) of x, then a 2-D convolution: fused where the adapter
/// has tensor cores, two ops elsewhere.
pub fn norm_conv2d(
    g: &mut Graph,
    x: Value,
    norm: GroupNormFold,
    w: Value,
    b: Option<Value>,
    stride: usize,
    pad: [usize; 2],
) -> Result<Value> {
    let call = conv_call(g, x, w, b, stride, pad, Some(norm))?;
    record_first(g, "conv2d", IMPLEMENTATIONS, &call)
}

/// Checks a convolution's arguments and works out its geometry.
pub fn conv_call(
    g: &Graph,
    x: Value,
    w: Value,
    b: Option<Value>,
    stride: usize,
    pad: [usize; 2],
    norm: Option<GroupNormFold>,
) -> Result<ConvCall> {
    let [pad0, pad_end] = pad;
    let kind = "conv2d";
    expect_dtype(g, kind, "x", x, ACT)?;
    expect_dtype(g, kind, "w", w, WEIGHTS)?;
    let xs = super::expect_rank(g, kind, "x", x, 4, "[batch, cin, h, w]")?;
    let ws = super::expect_rank(g, kind, "w", w, 4, "[cout, cin, kh, kw]")?;
    if ws[1] != xs[1] {
        return Err(g.shape_error(
            kind,
            format!(
                "w {} expects {} input channels, x {} has {}",
                shape_str(&ws),
                ws[1],
                shape_str(&xs),
                xs[1]
            ),
        ));
    }
    let span = pad0 + pad_end;
    if stride == 0 || xs[2] + span < ws[2] || xs[3] + span < ws[3] {
        return Err(g.shape_error(
            kind,
            format!(
                "a {}×{} kernel with stride {stride}, padding {pad0}/{pad_end} does not fit input {}",
                ws[2],
                ws[3],
                shape_str(&xs)
            ),
        ));
    }
    if let Some(b) = b {
        expect_dtype(g, kind, "bias", b, &[DType::F32])?;
        expect_shape(g, kind, "bias", b, &[ws[0]])?;
    }
    if let Some(n) = norm {
        if n.groups == 0 || xs[1] % n.groups != 0 {
            return Err(g.shape_error(
                kind,
                format!("{} channels do not split into {} groups", xs[1], n.groups),
            ));
        }
        for (name, v) in [("norm weight", n.weight), ("norm bias", n.bias)] {
            expect_dtype(g, kind, name, v, &[DType::F32])?;
            expect_shape(g, kind, name, v, &[xs[1]])?;
        }
    }
    u32_of(g, kind, "stride", stride)?;
    u32_of(g, kind, "pad", pad0)?;
    // Padding after the data needs no kernel support: reads past h or w are zero.
    let oh = (xs[2] + span - ws[2]) / stride + 1;
    let ow = (xs[3] + span - ws[3]) / stride + 1;
    let call = ConvCall {
        x,
        w,
        b,
        stride,
        pad,
        norm,
        xs: [xs[0], xs[1], xs[2], xs[3]],
        ws: [ws[0], ws[1], ws[2], ws[3]],
        out_hw: [oh, ow],
    };
    let out = call.out_shape();
    check_index_space(g, kind, numel(&xs).max(numel(&out)).max(numel(&ws)))?;
    Ok(call)
}

/// The direct kernel (conv.wgsl), after a GroupNorm op when there is one.
fn record_direct(g: &mut Graph, c: &ConvCall) -> Result<Value> {
    let kind = "conv2d";
    let x = match c.norm {
        Some(n) => norm::group_norm(
            g,
            c.x,
            n.groups,
            Some(n.weight),
            Some(n.bias),
            n.eps,
            n.silu,
        )?,
        None => c.x,
    };
    let (xs, ws, out_shape) = (c.xs, c.ws, c.out_shape());
    let n = xs[0] * ws[0].div_ceil(OC_PER) * out_shape[2] * out_shape[3];
    let p = ConvParams {
        batch: xs[0] as u32,
        cin: xs[1] as u32,
        h: xs[2] as u32,
        wd: xs[3] as u32,
        cout: ws[0] as u32,
        oh: out_shape[2] as u32,
        ow: out_shape[3] as u32,
        kh: ws[2] as u32,
        kw: ws[3] as u32,
        stride: c.stride as u32,
        pad: c.pad[0] as u32,
        has_bias: c.b.is_some() as u32,
        n: n as u32,
        _pad0: 0,
        _pad1: 0,
        _pad2: 0,
    };
    let y = g.alloc(&out_shape, g.act());
    let mut flags = weight_flags(g, c.w);
    flags.extend(f16_flags(g, &[("X_F16", Some(x)), ("Y_F16", Some(y))]));
    let call = OpCall {
        key: PipelineKey {
            kernel: &CONV2D,
            flags,
            constants: weight_constants(g, c.w),
        },
        params: bytes_of(&p),
        args: vec![Some(x), Some(c.w), c.b, Some(y)],
        workgroups: grid_for(n),
        cost: cost(g, c, y),
    };
    g.record(kind, call)?;
    Ok(y)
}

/// FLOPs and ideal bytes (x and y once, the weights once).
fn cost(g: &Graph, c: &ConvCall, y: Value) -> Cost {
    let size = |v: Value| if g.dtype(v) == DType::F16 { 2 } else { 4 };
    Cost {
        flops: 2 * c.macs(),
        bytes: size(c.x) * numel(&c.xs) as u64
            + size(y) * numel(&c.out_shape()) as u64
            + size(c.w) * numel(&c.ws) as u64,
    }
}

/// The implicit GEMM on tensor cores (conv_coop.wgsl), statistics first when
/// a GroupNorm is folded in.
fn record_coop(g: &mut Graph, c: &ConvCall) -> Result<Value> {
    let kind = "conv2d";
    let (f, s) = linear::coop_shape(g.target()).map_err(|e| g.shape_error(kind, e))?;
    let stats = match c.norm {
        Some(n) => Some(norm::group_stats(g, c.x, n.groups, n.eps)?),
        None => None,
    };
    let (xs, ws, out_shape) = (c.xs, c.ws, c.out_shape());
    let pixels = out_shape[2] * out_shape[3];
    let groups = c.norm.map_or(1, |n| n.groups);
    let p = ConvGemmParams {
        m: pixels as u32,
        n: ws[0] as u32,
        k: (ws[1] * ws[2] * ws[3]) as u32,
        cin: xs[1] as u32,
        h: xs[2] as u32,
        wd: xs[3] as u32,
        ow: out_shape[3] as u32,
        kh: ws[2] as u32,
        kw: ws[3] as u32,
        stride: c.stride as u32,
        pad: c.pad[0] as u32,
        has_bias: c.b.is_some() as u32,
        flags: c.norm.map_or(0, |n| NORM | if n.silu { SILU } else { 0 }),
        groups: groups as u32,
        ch_per_group: (xs[1] / groups) as u32,
        _pad: 0,
    };
    let y = g.alloc(&out_shape, g.act());
    let mut flags = weight_flags(g, c.w);
    flags.extend(f16_flags(g, &[("X_F16", Some(c.x)), ("Y_F16", Some(y))]));
    if f == 16 {
        flags.push("COOP16");
    }
    let (bm, bn) = linear::coop_block(f);
    let call = OpCall {
        key: PipelineKey {
            kernel: &CONV_COOP,
            flags,
            constants: std::iter::once(("S", s as f64))
                .chain(weight_constants(g, c.w))
                .collect(),
        },
        params: bytes_of(&p),
        args: vec![
            Some(c.x),
            Some(c.w),
            c.b,
            stats,
            c.norm.map(|n| n.weight),
            c.norm.map(|n| n.bias),
            Some(y),
        ],
        workgroups: [
            ws[0].div_ceil(bn) as u32,
            pixels.div_ceil(bm) as u32,
            xs[0] as u32,
        ],
        cost: cost(g, c, y),
    };
    g.record(kind, call)?;
    Ok(y)
}

/// Nearest-neighbour 2× upsampling of [batch, c, h, w].
pub fn upsample_nearest2x(g: &mut Graph, x: Value) -> Result<Value> {
    let kind = "upsample2x";
    expect_dtype(g, kind, "x", x, ACT)?;
    let xs = super::expect_rank(g, kind, "x", x, 4, "[batch, c, h, w]")?;
    let out_shape = [xs[0], xs[1], 2 * xs[2], 2 * xs[3]];
    check_index_space(g, kind, numel(&out_shape))?;
    let n = numel(&out_shape);
    let p = ConvParams {
        h: xs[2] as u32,
        wd: xs[3] as u32,
        n: n as u32,
        ..Default::default()
    };
    let y = g.alloc(&out_shape, g.act());
    let call = OpCall {
        key: PipelineKey {
            kernel: &UPSAMPLE2X,
            flags: f16_flags(g, &[("X_F16", Some(x)), ("Y_F16", Some(y))]),
            constants: Vec::new(),
        },
        params: bytes_of(&p),
        args: vec![Some(x), None, None, Some(y)],
        workgroups: grid_for(n),
        cost: Cost {
            flops: 0,
            bytes: 4 * (numel(&xs) + n) as u64,
        },
    };
    g.record(kind, call)?;
    Ok(y)
}

//! Convolution and upsampling on NCHW tensors (`shaders/conv.wgsl`).
//!
//! Shapes: `conv2d`: x [batch, cin, h, w], w [cout, cin, kh, kw] (f32/f16),
//! b [cout] → [batch, cout, (h + 2·pad − kh)/stride + 1, …];
//! `upsample_nearest2x`: [batch, c, h, w] → [batch, c, 2h, 2w].

use super::{
    bytes_of, check_index_space, expect_dtype, expect_shape, f16_flags, grid_for, u32_of,
    weight_flags, ACT, WG,
};
use crate::error::Result;
use crate::gpu::{Binding, Kernel, PipelineKey};
use crate::graph::{Cost, Graph, OpCall, Value};
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
    constants: &[],
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
    constants: &[],
    overrides: &[("WG", WG as u32)],
    consts: &[],
};

/// Kernels of this family.
pub static KERNELS: &[&Kernel] = &[&CONV2D, &UPSAMPLE2X];

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
    let [pad, pad_end] = pad;
    let kind = "conv2d";
    expect_dtype(g, kind, "x", x, ACT)?;
    expect_dtype(g, kind, "w", w, &[DType::F32, DType::F16])?;
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
    let span = pad + pad_end;
    if stride == 0 || xs[2] + span < ws[2] || xs[3] + span < ws[3] {
        return Err(g.shape_error(
            kind,
            format!(
                "a {}×{} kernel with stride {stride}, padding {pad}/{pad_end} does not fit input {}",
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
    // Padding after the data needs no kernel support: reads past h or w are zero.
    let oh = (xs[2] + span - ws[2]) / stride + 1;
    let ow = (xs[3] + span - ws[3]) / stride + 1;
    let out_shape = [xs[0], ws[0], oh, ow];
    check_index_space(g, kind, numel(&xs).max(numel(&out_shape)).max(numel(&ws)))?;
    let n = xs[0] * ws[0].div_ceil(OC_PER) * oh * ow;
    let p = ConvParams {
        batch: xs[0] as u32,
        cin: xs[1] as u32,
        h: xs[2] as u32,
        wd: xs[3] as u32,
        cout: ws[0] as u32,
        oh: oh as u32,
        ow: ow as u32,
        kh: ws[2] as u32,
        kw: ws[3] as u32,
        stride: u32_of(g, kind, "stride", stride)?,
        pad: u32_of(g, kind, "pad", pad)?,
        has_bias: b.is_some() as u32,
        n: n as u32,
        _pad0: 0,
        _pad1: 0,
        _pad2: 0,
    };
    let y = g.alloc(&out_shape, g.act());
    let mut flags = weight_flags(g, w);
    flags.extend(f16_flags(g, &[("X_F16", Some(x)), ("Y_F16", Some(y))]));
    let macs = (numel(&out_shape) * xs[1] * ws[2] * ws[3]) as u64;
    let wbytes = if g.dtype(w) == DType::F16 { 2 } else { 4 };
    let call = OpCall {
        key: PipelineKey {
            kernel: &CONV2D,
            flags,
            constants: Vec::new(),
        },
        params: bytes_of(&p),
        args: vec![Some(x), Some(w), b, Some(y)],
        workgroups: grid_for(n),
        cost: Cost {
            flops: 2 * macs,
            bytes: 4 * (numel(&xs) + numel(&out_shape)) as u64 + wbytes * numel(&ws) as u64,
        },
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

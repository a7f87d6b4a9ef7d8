//! Row softmax (`shaders/softmax.wgsl`), with the scale, causal mask and
//! additive bias that composed attention needs.
//!
//! Shapes: `softmax`: x [.., n]; `attention_softmax`: scores [batch, heads, tq, tk]
//! with bias [heads, tq, tk].

use super::{
    bytes_of, check_index_space, expect_dtype, expect_shape, f16_flags, grid, record_row, ACT, WG,
};
use crate::error::Result;
use crate::gpu::{Binding, Kernel, PipelineKey};
use crate::graph::{Cost, Graph, OpCall, Value};
use crate::tensor::{numel, DType};

/// The softmax kernel.
pub static SOFTMAX: Kernel = Kernel {
    file: "softmax.wgsl",
    entry: "softmax",
    params: &SoftmaxParams::LAYOUT,
    bindings: &[
        Binding::read("x"),
        Binding::read("bias"),
        Binding::write("y"),
    ],
    flags: &["X_F16", "Y_F16", "SUBGROUP"],
    constants: &[],
    overrides: &[("WG", WG as u32), ("CAUSAL", CAUSAL), ("BIAS", BIAS)],
    consts: &[],
};

/// Flag bit: key j > query i is masked.
pub const CAUSAL: u32 = 1;
/// Flag bit: an additive bias [heads, tq, n] is bound.
pub const BIAS: u32 = 2;

/// Kernels of this family.
pub static KERNELS: &[&Kernel] = &[&SOFTMAX];

crate::params_struct! {
    /// Params of `softmax.wgsl`.
    pub struct SoftmaxParams {
        /// Rows.
        pub rows: u32,
        /// Row length.
        pub n: u32,
        /// Queries per (batch, head): the query index is row % tq.
        pub tq: u32,
        /// Heads (for the bias index).
        pub heads: u32,
        /// Multiplier applied before the bias.
        pub scale: f32,
        /// Bit 0 causal, bit 1 bias.
        pub flags: u32,
        /// Padding.
        pub _pad0: u32,
        /// Padding.
        pub _pad1: u32,
    }
}

fn record(
    g: &mut Graph,
    kind: &'static str,
    x: Value,
    bias: Option<Value>,
    p: SoftmaxParams,
) -> Result<Value> {
    let shape = g.shape(x).to_vec();
    let y = g.alloc(&shape, g.act());
    let n = numel(&shape) as u64;
    let call = OpCall {
        key: PipelineKey {
            kernel: &SOFTMAX,
            flags: f16_flags(g, &[("X_F16", Some(x)), ("Y_F16", Some(y))]),
            constants: Vec::new(),
        },
        params: bytes_of(&p),
        args: vec![Some(x), bias, Some(y)],
        workgroups: grid(p.rows as u64),
        cost: Cost {
            flops: 5 * n,
            bytes: 16 * n,
        },
    };
    record_row(g, kind, call, y)
}

/// Softmax over the last axis.
pub fn softmax(g: &mut Graph, x: Value) -> Result<Value> {
    let kind = "softmax";
    expect_dtype(g, kind, "x", x, ACT)?;
    let s = g.shape(x).to_vec();
    let Some(&n) = s.last() else {
        return Err(g.shape_error(kind, "x must have at least one dimension"));
    };
    check_index_space(g, kind, numel(&s))?;
    let rows = numel(&s) / n.max(1);
    let p = SoftmaxParams {
        rows: rows as u32,
        n: n as u32,
        tq: 1,
        heads: 1,
        scale: 1.0,
        flags: 0,
        _pad0: 0,
        _pad1: 0,
    };
    record(g, kind, x, None, p)
}

/// softmax(scores · scale + bias) with an optional causal mask (key j > query i):
/// scores [batch, heads, tq, tk], bias [heads, tq, tk].
pub fn attention_softmax(
    g: &mut Graph,
    scores: Value,
    scale: f32,
    causal: bool,
    bias: Option<Value>,
) -> Result<Value> {
    let kind = "softmax";
    expect_dtype(g, kind, "scores", scores, ACT)?;
    let s = super::expect_rank(g, kind, "scores", scores, 4, "[batch, heads, tq, tk]")?;
    if let Some(b) = bias {
        expect_dtype(g, kind, "bias", b, &[DType::F32])?;
        expect_shape(g, kind, "bias", b, &s[1..])?;
    }
    check_index_space(g, kind, numel(&s))?;
    let p = SoftmaxParams {
        rows: (s[0] * s[1] * s[2]) as u32,
        n: s[3] as u32,
        tq: s[2].max(1) as u32,
        heads: s[1].max(1) as u32,
        scale,
        flags: if causal { CAUSAL } else { 0 } | if bias.is_some() { BIAS } else { 0 },
        _pad0: 0,
        _pad1: 0,
    };
    record(g, kind, scores, bias, p)
}

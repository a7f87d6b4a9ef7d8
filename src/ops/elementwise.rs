//! Elementwise kernels (`shaders/elementwise.wgsl`): activations, affine
//! scaling, broadcast add/multiply and the gated residual of adaLN blocks.
//!
//! Shapes: `activation`, `affine`: any; `add`, `mul`: a [..] with b of a's
//! trailing shape (b repeats over the leading axes); `gated_residual`:
//! x, y [batch, tokens, c] with a gate chunk of a modulation [batch, chunks·c].

use super::norm::{chunk_offset, ModChunk};
use super::{bytes_of, check_index_space, expect_dtype, f16_flags, grid_for, ACT, WG};
use crate::error::Result;
use crate::gpu::{Binding, Kernel, PipelineKey};
use crate::graph::{Cost, Graph, OpCall, Value};
use crate::tensor::{numel, shape_str};

const BINDINGS: &[Binding] = &[
    Binding::read("a"),
    Binding::read("b"),
    Binding::read("c"),
    Binding::write("out"),
];

/// `unary`: out = act(a · scale + shift).
pub static UNARY: Kernel = Kernel {
    file: "elementwise.wgsl",
    entry: "unary",
    params: &ElementwiseParams::LAYOUT,
    bindings: BINDINGS,
    flags: &["A_F16", "B_F16", "C_F16", "OUT_F16"],
    constants: &[("ACT", &[0.0, 1.0, 2.0, 3.0, 4.0])],
    overrides: &[("WG", WG as u32)],
    consts: &[],
};
/// `binary`: out = a ∘ b (broadcast).
pub static BINARY: Kernel = Kernel {
    file: "elementwise.wgsl",
    entry: "binary",
    params: &ElementwiseParams::LAYOUT,
    bindings: BINDINGS,
    flags: &["A_F16", "B_F16", "C_F16", "OUT_F16"],
    constants: &[("BINOP", &[0.0, 1.0])],
    overrides: &[("WG", WG as u32)],
    consts: &[],
};
/// `gated_residual`: out = x + gate · y.
pub static GATED_RESIDUAL: Kernel = Kernel {
    file: "elementwise.wgsl",
    entry: "gated_residual",
    params: &ElementwiseParams::LAYOUT,
    bindings: BINDINGS,
    flags: &["A_F16", "B_F16", "C_F16", "OUT_F16"],
    constants: &[],
    overrides: &[("WG", WG as u32)],
    consts: &[],
};

/// Kernels of this family.
pub static KERNELS: &[&Kernel] = &[&UNARY, &BINARY, &GATED_RESIDUAL];

crate::params_struct! {
    /// Params of `elementwise.wgsl`.
    pub struct ElementwiseParams {
        /// Elements.
        pub n: u32,
        /// Length of the repeating operand b.
        pub b_len: u32,
        /// Gated residual: channels.
        pub cols: u32,
        /// Gated residual: tokens per batch entry.
        pub inner: u32,
        /// Gated residual: elements between batch rows of the modulation.
        pub mod_stride: u32,
        /// Gated residual: offset of the gate chunk.
        pub gate_off: u32,
        /// Unary: input multiplier.
        pub scale: f32,
        /// Unary: input offset.
        pub shift: f32,
    }
}

/// An activation function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// x (for `affine`).
    Identity = 0,
    /// x · sigmoid(x).
    Silu = 1,
    /// GELU, tanh approximation (MMDiT MLP, T5 gated FFN).
    GeluTanh = 2,
    /// GELU, exact erf form (OpenCLIP bigG).
    GeluErf = 3,
    /// x · sigmoid(1.702 x) (CLIP-L).
    QuickGelu = 4,
}

impl Act {
    fn name(self) -> &'static str {
        match self {
            Act::Identity => "affine",
            Act::Silu => "silu",
            Act::GeluTanh => "gelu_tanh",
            Act::GeluErf => "gelu_erf",
            Act::QuickGelu => "quick_gelu",
        }
    }
}

/// Records one elementwise dispatch over `shape`; `per_element` is (FLOPs,
/// f32 values read) for the cost.
fn record(
    g: &mut Graph,
    kind: &str,
    mut key: PipelineKey,
    p: ElementwiseParams,
    args: [Option<Value>; 3],
    shape: &[usize],
    per_element: (u64, u64),
) -> Result<Value> {
    check_index_space(g, kind, numel(shape))?;
    let y = g.alloc(shape, g.act());
    let n = numel(shape) as u64;
    let (flops, reads) = per_element;
    key.flags.extend(f16_flags(
        g,
        &[
            ("A_F16", args[0]),
            ("B_F16", args[1]),
            ("C_F16", args[2]),
            ("OUT_F16", Some(y)),
        ],
    ));
    let call = OpCall {
        key,
        params: bytes_of(&p),
        args: vec![args[0], args[1], args[2], Some(y)],
        workgroups: grid_for(n as usize),
        cost: Cost {
            flops: flops * n,
            bytes: 4 * (reads + 1) * n,
        },
    };
    g.record(kind, call)?;
    Ok(y)
}

/// act(x · scale + shift) elementwise.
pub fn activation_affine(
    g: &mut Graph,
    x: Value,
    act: Act,
    scale: f32,
    shift: f32,
) -> Result<Value> {
    let kind = act.name();
    expect_dtype(g, kind, "x", x, ACT)?;
    let shape = g.shape(x).to_vec();
    let p = ElementwiseParams {
        n: numel(&shape) as u32,
        b_len: 1,
        scale,
        shift,
        ..Default::default()
    };
    let key = PipelineKey {
        kernel: &UNARY,
        flags: Vec::new(),
        constants: vec![("ACT", act as u32 as f64)],
    };
    let flops = if act == Act::Identity { 2 } else { 10 };
    record(g, kind, key, p, [Some(x), None, None], &shape, (flops, 1))
}

/// An activation applied elementwise.
pub fn activation(g: &mut Graph, x: Value, act: Act) -> Result<Value> {
    activation_affine(g, x, act, 1.0, 0.0)
}

/// x · scale + shift elementwise.
pub fn affine(g: &mut Graph, x: Value, scale: f32, shift: f32) -> Result<Value> {
    activation_affine(g, x, Act::Identity, scale, shift)
}

fn binary(g: &mut Graph, kind: &str, op: u32, a: Value, b: Value) -> Result<Value> {
    expect_dtype(g, kind, "a", a, ACT)?;
    expect_dtype(g, kind, "b", b, ACT)?;
    let sa = g.shape(a).to_vec();
    let sb = g.shape(b).to_vec();
    if sb.len() > sa.len() || sa[sa.len() - sb.len()..] != sb[..] {
        return Err(g.shape_error(
            kind,
            format!(
                "b's shape {} must equal the trailing dimensions of a's {}",
                shape_str(&sb),
                shape_str(&sa)
            ),
        ));
    }
    let p = ElementwiseParams {
        n: numel(&sa) as u32,
        b_len: numel(&sb).max(1) as u32,
        ..Default::default()
    };
    let key = PipelineKey {
        kernel: &BINARY,
        flags: Vec::new(),
        constants: vec![("BINOP", op as f64)],
    };
    record(g, kind, key, p, [Some(a), Some(b), None], &sa, (1, 2))
}

/// a + b, with b broadcast over a's leading axes.
pub fn add(g: &mut Graph, a: Value, b: Value) -> Result<Value> {
    binary(g, "add", 0, a, b)
}

/// a · b, with b broadcast over a's leading axes.
pub fn mul(g: &mut Graph, a: Value, b: Value) -> Result<Value> {
    binary(g, "mul", 1, a, b)
}

/// x + gate · y for streams x, y [batch, tokens, c] and a gate chunk of a
/// modulation vector [batch, chunks·c] (adaLN-Zero residuals).
pub fn gated_residual(g: &mut Graph, x: Value, gate: ModChunk, y: Value) -> Result<Value> {
    let kind = "gated_residual";
    expect_dtype(g, kind, "x", x, ACT)?;
    expect_dtype(g, kind, "y", y, ACT)?;
    let xs = super::expect_rank(g, kind, "x", x, 3, "[batch, tokens, c]")?;
    super::expect_shape(g, kind, "y", y, &xs)?;
    let (mod_stride, gate_off) = chunk_offset(g, kind, "gate", gate, xs[0], xs[2])?;
    let p = ElementwiseParams {
        n: numel(&xs) as u32,
        b_len: 1,
        cols: xs[2].max(1) as u32,
        inner: xs[1].max(1) as u32,
        mod_stride,
        gate_off,
        ..Default::default()
    };
    record(
        g,
        kind,
        PipelineKey::new(&GATED_RESIDUAL),
        p,
        [Some(x), Some(gate.m), Some(y)],
        &xs,
        (2, 2),
    )
}

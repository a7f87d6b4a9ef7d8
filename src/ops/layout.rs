//! Data movement (`shaders/layout.wgsl`): strided copies (permute, slice,
//! patchify/unpatchify layouts, f16 → f32), concatenation, embedding lookup.
//!
//! Shapes: `permute`: up to 6 axes; `slice`/`concat` along any axis;
//! `gather`: table [rows, c] (f32/f16), ids [t] u32 → [t, c].

use super::{
    bytes_of, check_index_space, expect_dtype, f16_flags, grid_for, weight_constants, weight_flags,
    ACT, WEIGHTS, WG, W_FMT_VALUES,
};
use crate::error::Result;
use crate::gpu::{Binding, Kernel, PipelineKey};
use crate::graph::{Cost, Graph, OpCall, Value};
use crate::tensor::{numel, shape_str, DType};

const BINDINGS: &[Binding] = &[
    Binding::read("w"),
    Binding::read("src2"),
    Binding::read("ids"),
    Binding::write("dst"),
];

macro_rules! layout_kernel {
    ($name:ident, $entry:literal) => {
        #[doc = concat!("`", $entry, "` in layout.wgsl.")]
        pub static $name: Kernel = Kernel {
            file: "layout.wgsl",
            entry: $entry,
            params: &LayoutParams::LAYOUT,
            bindings: BINDINGS,
            flags: &["W_F16", "SRC2_F16", "DST_F16"],
            constants: &[("W_FMT", W_FMT_VALUES)],
            overrides: &[("WG", WG as u32)],
            consts: &[],
        };
    };
}
layout_kernel!(COPY_STRIDED, "copy_strided");
layout_kernel!(CONCAT, "concat");
layout_kernel!(GATHER, "gather");

/// Kernels of this family.
pub static KERNELS: &[&Kernel] = &[&COPY_STRIDED, &CONCAT, &GATHER];

/// Most axes a strided copy handles.
pub const MAX_DIMS: usize = 6;

crate::params_struct! {
    /// Params of `layout.wgsl`.
    pub struct LayoutParams {
        /// Output elements.
        pub n: u32,
        /// Copy: source offset.
        pub off: u32,
        /// Concat: length of the first input along the axis.
        pub len_a: u32,
        /// Concat: length of the second input along the axis.
        pub len_b: u32,
        /// Concat: elements after the axis.
        pub inner: u32,
        /// Gather: table rows.
        pub rows: u32,
        /// Gather: table columns.
        pub cols: u32,
        /// Padding.
        pub _pad: u32,
        /// Copy: output shape, padded in front with 1s to 8 entries (6 used).
        pub shape: [u32; 8],
        /// Copy: source stride of each output axis.
        pub stride: [u32; 8],
    }
}

/// Records a layout op; the source bound at `w` may be f32 or f16 (weights and
/// activations share the packed-f16 read path), `src2` and the output
/// follow their own types.
fn record(
    g: &mut Graph,
    kind: &str,
    kernel: &'static Kernel,
    p: LayoutParams,
    args: [Option<Value>; 3],
    shape: &[usize],
) -> Result<Value> {
    check_index_space(g, kind, numel(shape))?;
    let y = g.alloc(shape, g.act());
    let n = numel(shape) as u64;
    let mut flags = args[0].map(|w| weight_flags(g, w)).unwrap_or_default();
    flags.extend(f16_flags(g, &[("SRC2_F16", args[1]), ("DST_F16", Some(y))]));
    let constants = args[0].map(|w| weight_constants(g, w)).unwrap_or_default();
    let call = OpCall {
        key: PipelineKey {
            kernel,
            flags,
            constants,
        },
        params: bytes_of(&p),
        args: vec![args[0], args[1], args[2], Some(y)],
        workgroups: grid_for(n as usize),
        cost: Cost {
            flops: 0,
            bytes: 8 * n,
        },
    };
    g.record(kind, call)?;
    Ok(y)
}

/// Copies the view `x[offset + Σ idx_k · strides_k]` of shape `shape` into a
/// new contiguous value of the graph's activation type. The view must stay
/// inside x.
pub fn strided_copy(
    g: &mut Graph,
    kind: &str,
    x: Value,
    offset: usize,
    shape: &[usize],
    strides: &[usize],
) -> Result<Value> {
    expect_dtype(g, kind, "x", x, &[DType::F32, DType::F16])?;
    if shape.len() != strides.len() || shape.len() > MAX_DIMS {
        return Err(g.shape_error(
            kind,
            format!(
                "views have at most {MAX_DIMS} axes, got shape {}",
                shape_str(shape)
            ),
        ));
    }
    let have = numel(g.shape(x));
    if numel(shape) > 0 {
        let last = offset
            + shape
                .iter()
                .zip(strides)
                .map(|(d, s)| (d - 1) * s)
                .sum::<usize>();
        if last >= have {
            return Err(g.shape_error(
                kind,
                format!("view {} (strides {strides:?}, offset {offset}) reaches past the {have} elements of {}", shape_str(shape), shape_str(g.shape(x))),
            ));
        }
    }
    check_index_space(g, kind, have)?;
    let mut p = LayoutParams {
        n: numel(shape) as u32,
        off: offset as u32,
        shape: [1; 8],
        stride: [0; 8],
        ..Default::default()
    };
    let pad = MAX_DIMS - shape.len();
    for (i, (&d, &s)) in shape.iter().zip(strides).enumerate() {
        p.shape[pad + i] = d as u32;
        p.stride[pad + i] = s as u32;
    }
    record(g, kind, &COPY_STRIDED, p, [Some(x), None, None], shape)
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Reorders axes: output axis i is input axis `perm[i]`.
pub fn permute(g: &mut Graph, x: Value, perm: &[usize]) -> Result<Value> {
    let kind = "permute";
    let xs = g.shape(x).to_vec();
    let mut seen = vec![false; xs.len()];
    if perm.len() != xs.len()
        || perm
            .iter()
            .any(|&p| p >= xs.len() || std::mem::replace(&mut seen[p], true))
    {
        return Err(g.shape_error(
            kind,
            format!(
                "{perm:?} is not a permutation of the axes of {}",
                shape_str(&xs)
            ),
        ));
    }
    let st = contiguous_strides(&xs);
    let shape: Vec<usize> = perm.iter().map(|&p| xs[p]).collect();
    let strides: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
    strided_copy(g, kind, x, 0, &shape, &strides)
}

/// `len` entries of `axis` starting at `start`, copied out.
pub fn slice(g: &mut Graph, x: Value, axis: usize, start: usize, len: usize) -> Result<Value> {
    let kind = "slice";
    let xs = g.shape(x).to_vec();
    if axis >= xs.len() || start + len > xs[axis] {
        return Err(g.shape_error(
            kind,
            format!(
                "cannot take {start}..{} of axis {axis} of {}",
                start + len,
                shape_str(&xs)
            ),
        ));
    }
    let st = contiguous_strides(&xs);
    let mut shape = xs.clone();
    shape[axis] = len;
    strided_copy(g, kind, x, start * st[axis], &shape, &st)
}

/// A copy of x as f32 (converts f16 weights once, e.g. for norm weights).
pub fn to_f32(g: &mut Graph, x: Value) -> Result<Value> {
    cast(g, x, DType::F32)
}

/// A copy of x stored as `dtype` (f32 or f16).
pub fn cast(g: &mut Graph, x: Value, dtype: DType) -> Result<Value> {
    let xs = g.shape(x).to_vec();
    let flat = g.reshape(x, &[numel(&xs)])?;
    let y = g.with_activation(dtype, |g| {
        strided_copy(g, "cast", flat, 0, &[numel(&xs)], &[1])
    })?;
    g.reshape(y, &xs)
}

/// Joins a and b along `axis`; all other axes must match.
pub fn concat(g: &mut Graph, a: Value, b: Value, axis: usize) -> Result<Value> {
    let kind = "concat";
    expect_dtype(g, kind, "a", a, ACT)?;
    expect_dtype(g, kind, "b", b, ACT)?;
    let sa = g.shape(a).to_vec();
    let sb = g.shape(b).to_vec();
    let same_rest = sa.len() == sb.len()
        && axis < sa.len()
        && sa
            .iter()
            .zip(&sb)
            .enumerate()
            .all(|(i, (x, y))| i == axis || x == y);
    if !same_rest {
        return Err(g.shape_error(
            kind,
            format!(
                "cannot join {} and {} along axis {axis}: other axes must match",
                shape_str(&sa),
                shape_str(&sb)
            ),
        ));
    }
    let mut shape = sa.clone();
    shape[axis] = sa[axis] + sb[axis];
    let p = LayoutParams {
        n: numel(&shape) as u32,
        len_a: sa[axis] as u32,
        len_b: sb[axis] as u32,
        inner: numel(&sa[axis + 1..]).max(1) as u32,
        ..Default::default()
    };
    record(g, kind, &CONCAT, p, [Some(a), Some(b), None], &shape)
}

/// Embedding lookup: table [rows, c] (f32 or f16), ids [t] (u32) → [t, c].
/// Ids past the table yield NaN rows.
pub fn gather(g: &mut Graph, table: Value, ids: Value) -> Result<Value> {
    let kind = "gather";
    expect_dtype(g, kind, "table", table, WEIGHTS)?;
    expect_dtype(g, kind, "ids", ids, &[DType::U32])?;
    let ts = super::expect_rank(g, kind, "table", table, 2, "[rows, c]")?;
    let is = super::expect_rank(g, kind, "ids", ids, 1, "[tokens]")?;
    check_index_space(g, kind, numel(&ts))?;
    let shape = [is[0], ts[1]];
    let p = LayoutParams {
        n: numel(&shape) as u32,
        rows: ts[0] as u32,
        cols: ts[1].max(1) as u32,
        ..Default::default()
    };
    record(g, kind, &GATHER, p, [Some(table), None, Some(ids)], &shape)
}

/// Conv output [batch, c, h, w] → tokens [batch, h·w, c] (row-major patches).
pub fn nchw_to_tokens(g: &mut Graph, x: Value) -> Result<Value> {
    let s = super::expect_rank(g, "nchw_to_tokens", "x", x, 4, "[batch, c, h, w]")?;
    let t = permute(g, x, &[0, 2, 3, 1])?;
    g.reshape(t, &[s[0], s[2] * s[3], s[1]])
}

/// MMDiT unpatchify: tokens [batch, h·w, p·p·c] ordered (h, w, p, q, c) →
/// image [batch, c, h·p, w·p].
pub fn unpatchify(g: &mut Graph, x: Value, h: usize, w: usize, p: usize) -> Result<Value> {
    let kind = "unpatchify";
    let s = super::expect_rank(g, kind, "x", x, 3, "[batch, h·w, p·p·c]")?;
    if s[1] != h * w || p == 0 || s[2] % (p * p) != 0 {
        return Err(g.shape_error(
            kind,
            format!(
                "tokens {} do not form a {h}×{w} grid of {p}×{p} patches",
                shape_str(&s)
            ),
        ));
    }
    let c = s[2] / (p * p);
    let six = g.reshape(x, &[s[0], h, w, p, p, c])?;
    let img = permute(g, six, &[0, 5, 1, 3, 2, 4])?;
    g.reshape(img, &[s[0], c, h * p, w * p])
}

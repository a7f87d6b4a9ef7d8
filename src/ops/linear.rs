//! Linear layers and strided batched matrix products (`shaders/linear.wgsl`).
//!
//! Shapes: `linear`: x [.., k] · w [n, k]ᵀ + b [n] → y [.., n];
//! `batched_matmul`: x [batch, m, k] · w [batch or 1, n, k]ᵀ → y [batch, m, n].
//! Activations f32 or f16 (each binding on its own); w f32 or f16; f32
//! accumulation.

use super::choice::{record_first, Implementation};
use super::{
    bytes_of, expect_dtype, f16_flags, u32_of, weight_constants, weight_flags, ACT, WEIGHTS,
    W_FMT_VALUES,
};
use crate::error::Result;
use crate::gpu::{Binding, Kernel, PipelineKey};
use crate::graph::{Cost, Graph, OpCall, Value};
use crate::target::{Feature, GemmTile, Target};
use crate::tensor::{shape_str, DType};

const BINDINGS: &[Binding] = &[
    Binding::read("x"),
    Binding::read("w"),
    Binding::read("bias"),
    Binding::write("y"),
];

/// The tiled GEMM kernel.
pub static LINEAR: Kernel = Kernel {
    file: "linear.wgsl",
    entry: "linear",
    params: &LinearParams::LAYOUT,
    bindings: BINDINGS,
    flags: &["W_F16", "VEC4", "X_F16", "Y_F16"],
    // Every side of GemmTile::CANDIDATES (checked by a unit test).
    constants: &[
        ("BM", &[64.0, 32.0, 128.0]),
        ("BN", &[64.0, 32.0, 128.0]),
        ("BK", &[16.0, 8.0, 32.0]),
        ("W_FMT", W_FMT_VALUES),
    ],
    overrides: &[],
    consts: &[],
};

/// The cooperative-matrix GEMM (tensor cores).
pub static LINEAR_COOP: Kernel = Kernel {
    file: "linear_coop.wgsl",
    entry: "gemm_coop",
    params: &LinearParams::LAYOUT,
    bindings: BINDINGS,
    flags: &["W_F16", "X_F16", "Y_F16", "COOP16"],
    constants: &[
        ("S", crate::target::COOP_SUBGROUP_SIZES),
        ("W_FMT", W_FMT_VALUES),
    ],
    overrides: &[("GM", COOP_GM), ("GN", COOP_GN)],
    consts: &[],
};

/// Groups of the cooperative-matrix kernel's workgroup along m and n (each
/// group owns 2×2 fragments).
pub(crate) const COOP_GM: u32 = 2;
pub(crate) const COOP_GN: u32 = 2;

/// Kernels of this family.
pub static KERNELS: &[&Kernel] = &[&LINEAR, &LINEAR_COOP];

crate::params_struct! {
    /// Params of `linear.wgsl` (layout checked against the shader in tests).
    pub struct LinearParams {
        /// Rows of x and y.
        pub m: u32,
        /// Rows of w, columns of y.
        pub n: u32,
        /// Reduction length.
        pub k: u32,
        /// Inner batch count (heads); the batch index z is (z / inner, z % inner).
        pub batch_inner: u32,
        /// Row strides of x, w, y (elements).
        pub lda: u32,
        /// Row stride of w.
        pub ldw: u32,
        /// Row stride of y.
        pub ldy: u32,
        /// 1 when a bias is bound.
        pub has_bias: u32,
        /// Element offsets of x, w, y.
        pub x_off: u32,
        /// Offset of w.
        pub w_off: u32,
        /// Offset of y.
        pub y_off: u32,
        /// Padding.
        pub _pad0: u32,
        /// Outer and inner batch strides of x.
        pub x_sb: u32,
        /// Inner batch stride of x.
        pub x_sh: u32,
        /// Outer batch stride of w.
        pub w_sb: u32,
        /// Inner batch stride of w.
        pub w_sh: u32,
        /// Outer batch stride of y.
        pub y_sb: u32,
        /// Inner batch stride of y.
        pub y_sh: u32,
        /// Padding.
        pub _pad1: u32,
        /// Padding.
        pub _pad2: u32,
    }
}

/// A strided batched product y = x · wᵀ (+ bias) over `batch_outer × batch_inner`
/// matrices, each operand a view (offset, row stride, two batch strides) of a value.
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    /// The params (sizes, strides, offsets).
    pub p: LinearParams,
    /// Outer batch count.
    pub batch_outer: usize,
}

impl Gemm {
    /// A plain contiguous product: x [batch, m, k], w [n, k] shared (w_batched
    /// false) or [batch, n, k], y [batch, m, n].
    pub fn contiguous(batch: usize, m: usize, n: usize, k: usize, w_batched: bool) -> Gemm {
        let (m32, n32, k32) = (m as u32, n as u32, k as u32);
        Gemm {
            p: LinearParams {
                m: m32,
                n: n32,
                k: k32,
                batch_inner: 1,
                lda: k32,
                ldw: k32,
                ldy: n32,
                x_sb: m32 * k32,
                w_sb: if w_batched { n32 * k32 } else { 0 },
                y_sb: m32 * n32,
                ..Default::default()
            },
            batch_outer: batch,
        }
    }

    fn batches(&self) -> usize {
        self.batch_outer * self.p.batch_inner as usize
    }

    fn vec4_ok(&self) -> bool {
        let p = &self.p;
        [
            p.k, p.lda, p.ldw, p.x_off, p.w_off, p.x_sb, p.x_sh, p.w_sb, p.w_sh,
        ]
        .iter()
        .all(|v| v.is_multiple_of(4))
    }
}

/// One past the largest element index a strided view touches (0 when empty).
fn view_extent(
    off: u32,
    strides: [u32; 2],
    counts: [usize; 2],
    rows: u32,
    ld: u32,
    cols: u32,
) -> u64 {
    if rows == 0 || cols == 0 || counts.contains(&0) {
        return 0;
    }
    off as u64
        + (counts[0] as u64 - 1) * strides[0] as u64
        + (counts[1] as u64 - 1) * strides[1] as u64
        + (rows as u64 - 1) * ld as u64
        + cols as u64
}

/// One GEMM call: y = x · wᵀ (+ bias) over the views `gemm` describes.
#[derive(Clone, Copy, Debug)]
pub struct GemmCall {
    /// Label kind (`linear`, `matmul`, `scores`, …).
    pub kind: &'static str,
    /// Left operand.
    pub x: Value,
    /// Right operand, transposed ([n, k] rows).
    pub w: Value,
    /// Optional bias [n].
    pub bias: Option<Value>,
    /// Output (a fresh intermediate).
    pub y: Value,
    /// Sizes, strides, offsets.
    pub gemm: Gemm,
}

/// The GEMM's implementations, in order of preference: tensor-core fragments
/// (f16 inputs, f32 accumulation; only where activations are f16 anyway, so
/// `--dtype f32` stays exact), then the register-tiled kernel.
pub static IMPLEMENTATIONS: &[Implementation<GemmCall>] = &[
    Implementation {
        name: "coop",
        needs: &[Feature::Coop],
        supports: |t, _| coop_shape(t).map(|_| ()),
        record: record_coop,
    },
    Implementation {
        name: "tiled",
        needs: &[],
        supports: |_, _| Ok(()),
        record: record_tiled,
    },
];

/// Records a GEMM described by `gemm` with the first implementation that
/// takes it. Checks that every view stays inside its value.
pub fn gemm(
    g: &mut Graph,
    kind: &'static str,
    x: Value,
    w: Value,
    bias: Option<Value>,
    y: Value,
    gemm: Gemm,
) -> Result<()> {
    let call = GemmCall {
        kind,
        x,
        w,
        bias,
        y,
        gemm,
    };
    record_first(g, kind, IMPLEMENTATIONS, &call).map(|_| ())
}

/// The shape checks every implementation shares; returns the params (with
/// `has_bias` set), the batch count and the cost.
fn check(g: &Graph, c: &GemmCall) -> Result<(LinearParams, u32, Cost)> {
    let (kind, x, w, y, bias) = (c.kind, c.x, c.w, c.y, c.bias);
    let mut gemm = c.gemm;
    expect_dtype(g, kind, "x", x, ACT)?;
    expect_dtype(g, kind, "w", w, WEIGHTS)?;
    expect_dtype(g, kind, "y", y, ACT)?;
    let p = &mut gemm.p;
    p.has_bias = bias.is_some() as u32;
    let views = [
        (
            "x",
            x,
            view_extent(
                p.x_off,
                [p.x_sb, p.x_sh],
                [gemm.batch_outer, p.batch_inner as usize],
                p.m,
                p.lda,
                p.k,
            ),
        ),
        (
            "w",
            w,
            view_extent(
                p.w_off,
                [p.w_sb, p.w_sh],
                [gemm.batch_outer, p.batch_inner as usize],
                p.n,
                p.ldw,
                p.k,
            ),
        ),
        (
            "y",
            y,
            view_extent(
                p.y_off,
                [p.y_sb, p.y_sh],
                [gemm.batch_outer, p.batch_inner as usize],
                p.m,
                p.ldy,
                p.n,
            ),
        ),
    ];
    for (name, v, need) in views {
        let have = crate::tensor::numel(g.shape(v)) as u64;
        if need > have {
            return Err(g.shape_error(
                kind,
                format!(
                    "{name} view needs {need} elements but {} holds {have}",
                    shape_str(g.shape(v))
                ),
            ));
        }
    }
    if let Some(b) = bias {
        expect_dtype(g, kind, "bias", b, &[DType::F32])?;
        if g.shape(b) != [gemm.p.n as usize] {
            return Err(g.shape_error(
                kind,
                format!(
                    "bias must have shape [{}], found {}",
                    gemm.p.n,
                    shape_str(g.shape(b))
                ),
            ));
        }
    }
    let batches = u32_of(g, kind, "batch", gemm.batches())?;
    let (m, n, k) = (gemm.p.m as u64, gemm.p.n as u64, gemm.p.k as u64);
    let b = batches as u64;
    let size = |v: Value| if g.dtype(v) == DType::F16 { 2 } else { 4 };
    let (xbytes, ybytes, wbytes) = (size(x), size(y), size(w));
    let cost = Cost {
        flops: 2 * b * m * n * k,
        bytes: b * (xbytes * m * k + ybytes * m * n)
            + n * k
                * wbytes
                * if gemm.p.w_sb == 0 && gemm.p.w_sh == 0 {
                    1
                } else {
                    b
                },
    };
    Ok((gemm.p, batches, cost))
}

/// The register-tiled kernel (linear.wgsl).
fn record_tiled(g: &mut Graph, c: &GemmCall) -> Result<Value> {
    let (p, batches, cost) = check(g, c)?;
    let mut flags = weight_flags(g, c.w);
    flags.extend(f16_flags(g, &[("X_F16", Some(c.x)), ("Y_F16", Some(c.y))]));
    // 4-wide weight loads read f32 or f16 only.
    if c.gemm.vec4_ok() && matches!(g.dtype(c.w), DType::F32 | DType::F16) {
        flags.push("VEC4");
    }
    let t = g.target();
    let tile = if t.gemm_tile.fits(&t.limits) {
        t.gemm_tile
    } else {
        GemmTile::DEFAULT
    };
    let call = OpCall {
        key: PipelineKey {
            kernel: &LINEAR,
            flags,
            constants: [
                ("BM", tile.bm as f64),
                ("BN", tile.bn as f64),
                ("BK", tile.bk as f64),
            ]
            .into_iter()
            .chain(weight_constants(g, c.w))
            .collect(),
        },
        params: bytes_of(&p),
        args: vec![Some(c.x), Some(c.w), c.bias, Some(c.y)],
        workgroups: [p.n.div_ceil(tile.bn), p.m.div_ceil(tile.bm), batches],
        cost,
    };
    g.record(c.kind, call)?;
    Ok(c.y)
}

/// The cooperative-matrix kernel's tile for this target: (fragment side F,
/// invocations per group S). Needs f16 activations (tensor-core inputs are
/// f16), an f16 → f32 fragment configuration of 16 or 8, and room for the
/// workgroup.
pub(crate) fn coop_shape(t: &Target) -> std::result::Result<(u32, u32), String> {
    let (f, s) = t.coop_fragment()?;
    let threads = s * COOP_GM * COOP_GN;
    let (bm, bn, bk) = (COOP_GM * 2 * f, COOP_GN * 2 * f, 2 * f);
    let shared = 2 * (bm + bn) * bk + 4 * bm * bn;
    let l = &t.limits;
    if threads > l.max_compute_invocations_per_workgroup
        || threads > l.max_compute_workgroup_size_x
        || shared > l.max_compute_workgroup_storage_size
    {
        return Err(format!(
            "a workgroup of {threads} invocations and {shared} bytes of workgroup memory (subgroups of {s})"
        ));
    }
    Ok((f, s))
}

/// Rows and columns of C one workgroup of the tensor-core core computes with
/// fragments of side `f`.
pub(crate) fn coop_block(f: u32) -> (usize, usize) {
    ((COOP_GM * 2 * f) as usize, (COOP_GN * 2 * f) as usize)
}

/// The cooperative-matrix kernel (linear_coop.wgsl).
fn record_coop(g: &mut Graph, c: &GemmCall) -> Result<Value> {
    let (f, s) = coop_shape(g.target()).map_err(|e| g.shape_error(c.kind, e))?;
    let (p, batches, cost) = check(g, c)?;
    let mut flags = weight_flags(g, c.w);
    flags.extend(f16_flags(g, &[("X_F16", Some(c.x)), ("Y_F16", Some(c.y))]));
    if f == 16 {
        flags.push("COOP16");
    }
    let (bm, bn) = coop_block(f);
    let call = OpCall {
        key: PipelineKey {
            kernel: &LINEAR_COOP,
            flags,
            constants: std::iter::once(("S", s as f64))
                .chain(weight_constants(g, c.w))
                .collect(),
        },
        params: bytes_of(&p),
        args: vec![Some(c.x), Some(c.w), c.bias, Some(c.y)],
        workgroups: [
            (p.n as usize).div_ceil(bn) as u32,
            (p.m as usize).div_ceil(bm) as u32,
            batches,
        ],
        cost,
    };
    g.record(c.kind, call)?;
    Ok(c.y)
}

/// y = x · wᵀ + b: x [.., k] f32, w [n, k] f32/f16, b [n] f32 → y [.., n].
pub fn linear(g: &mut Graph, x: Value, w: Value, b: Option<Value>) -> Result<Value> {
    let call = linear_call(g, x, w, b)?;
    record_first(g, call.kind, IMPLEMENTATIONS, &call)
}

/// The GEMM call `linear` records (its output allocated), for recording a
/// particular implementation.
pub fn linear_call(g: &mut Graph, x: Value, w: Value, b: Option<Value>) -> Result<GemmCall> {
    let kind = "linear";
    let xs = g.shape(x).to_vec();
    let ws = g.shape(w).to_vec();
    if xs.is_empty() || ws.len() != 2 || ws[1] != xs[xs.len() - 1] {
        return Err(g.shape_error(
            kind,
            format!(
                "expected x [.., k] and w [n, k] with equal k, found x {} and w {}",
                shape_str(&xs),
                shape_str(&ws)
            ),
        ));
    }
    let (n, k) = (ws[0], ws[1]);
    let m: usize = xs[..xs.len() - 1].iter().product();
    u32_of(g, kind, "rows", m * k.max(n))?;
    let mut ys = xs.clone();
    *ys.last_mut().expect("x has rank ≥ 1") = n;
    let y = g.alloc(&ys, g.act());
    Ok(GemmCall {
        kind,
        x,
        w,
        bias: b,
        y,
        gemm: Gemm::contiguous(1, m, n, k, false),
    })
}

/// y[i] = x[i] · w[i]ᵀ: x [batch, m, k], w [batch, n, k] or [n, k] → y [batch, m, n].
pub fn batched_matmul(g: &mut Graph, x: Value, w: Value) -> Result<Value> {
    let call = batched_matmul_call(g, x, w)?;
    record_first(g, call.kind, IMPLEMENTATIONS, &call)
}

/// The GEMM call `batched_matmul` records (its output allocated).
pub fn batched_matmul_call(g: &mut Graph, x: Value, w: Value) -> Result<GemmCall> {
    let kind = "matmul";
    let xs = g.shape(x).to_vec();
    let ws = g.shape(w).to_vec();
    let ok = xs.len() == 3
        && ((ws.len() == 3 && ws[0] == xs[0] && ws[2] == xs[2])
            || (ws.len() == 2 && ws[1] == xs[2]));
    if !ok {
        return Err(g.shape_error(
            kind,
            format!(
                "expected x [batch, m, k] and w [batch, n, k] or [n, k], found x {} and w {}",
                shape_str(&xs),
                shape_str(&ws)
            ),
        ));
    }
    let (batch, m, k) = (xs[0], xs[1], xs[2]);
    let n = ws[ws.len() - 2];
    u32_of(g, kind, "elements", batch * m * k.max(n))?;
    let y = g.alloc(&[batch, m, n], g.act());
    Ok(GemmCall {
        kind,
        x,
        w,
        bias: None,
        y,
        gemm: Gemm::contiguous(batch, m, n, k, ws.len() == 3),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_candidate_tile_is_a_constant_the_kernel_allows() {
        let allowed = |name: &str, v: u32| {
            LINEAR
                .constants
                .iter()
                .any(|(n, vals)| *n == name && vals.contains(&(v as f64)))
        };
        for t in GemmTile::CANDIDATES {
            assert!(
                t.bm % 4 == 0 && t.bn % 4 == 0 && t.bk % 4 == 0,
                "{}",
                t.name()
            );
            assert!(
                allowed("BM", t.bm) && allowed("BN", t.bn) && allowed("BK", t.bk),
                "{}",
                t.name()
            );
        }
    }
}

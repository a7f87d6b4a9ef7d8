//! Multi-head attention, head dim 64 (`shaders/attention.wgsl`), and its
//! composed fallback (matmul + softmax + matmul) that serves as its oracle.
//!
//! Shapes: q [batch, tq, width_q], k and v [batch, tk, width]; each holds its
//! heads at columns `col_offset .. col_offset + heads·64`, so q, k and v may be
//! views of one fused qkv tensor. Output: [batch, tq, heads·64].

use super::choice::{record_first, Implementation};
use super::linear::{gemm, Gemm, LinearParams};
use super::{bytes_of, expect_dtype, expect_shape, f16_flags, layout, norm, softmax, u32_of, ACT};
use crate::error::Result;
use crate::gpu::{Binding, Kernel, PipelineKey};
use crate::graph::{Cost, Graph, OpCall, Value};
use crate::target::{Feature, Target};
use crate::tensor::{numel, shape_str, DType};

/// Head dimension of every SD3 attention (MMDiT, CLIP-L/G, T5).
pub const HEAD_DIM: usize = 64;
const BLOCK_Q: usize = 64;

/// The flash-style attention kernel.
pub static ATTENTION: Kernel = Kernel {
    file: "attention.wgsl",
    entry: "attention",
    params: &AttentionParams::LAYOUT,
    bindings: &[
        Binding::read("q"),
        Binding::read("k"),
        Binding::read("v"),
        Binding::read("q_norm"),
        Binding::read("k_norm"),
        Binding::read("bias"),
        Binding::write("out"),
    ],
    flags: &["Q_F16", "K_F16", "V_F16", "OUT_F16"],
    constants: &[],
    overrides: &[("CAUSAL", CAUSAL), ("BIAS", BIAS), ("QK_NORM", QK_NORM)],
    consts: &[("D", HEAD_DIM as u32), ("BR", BLOCK_Q as u32)],
};

/// The flash kernel on cooperative-matrix fragments (tensor cores): same
/// params, bindings and flag bits.
pub static ATTENTION_COOP: Kernel = Kernel {
    file: "attention_coop.wgsl",
    entry: "attention_coop",
    params: &AttentionParams::LAYOUT,
    bindings: ATTENTION.bindings,
    flags: &["Q_F16", "K_F16", "V_F16", "OUT_F16", "COOP16"],
    constants: &[("S", crate::target::COOP_SUBGROUP_SIZES)],
    overrides: ATTENTION.overrides,
    consts: &[
        ("D", HEAD_DIM as u32),
        ("BR", COOP_BLOCK_Q as u32),
        ("BC", 64),
        ("T", COOP_THREADS),
    ],
};

/// Query rows per workgroup of the tensor-core kernel.
const COOP_BLOCK_Q: usize = 32;
/// Invocations per workgroup of the tensor-core kernel.
const COOP_THREADS: u32 = 128;
/// Its workgroup memory: q tile, key/probability tile, value tile (f16),
/// score/p·v tile (f32), two reduction arrays.
const COOP_WORKGROUP_BYTES: u32 =
    (2 * (32 * 64 + 64 * 64 + 64 * 64) + 4 * 32 * 64 + 2 * 4 * 128) as u32;

/// Flag bit: key j > query i is masked.
pub const CAUSAL: u32 = 1;
/// Flag bit: an additive bias [heads, tq, tk] is bound.
pub const BIAS: u32 = 2;
/// Flag bit: RMSNorm of each q and k head row.
pub const QK_NORM: u32 = 4;

/// Kernels of this family.
pub static KERNELS: &[&Kernel] = &[&ATTENTION, &ATTENTION_COOP];

crate::params_struct! {
    /// Params of `attention.wgsl`.
    pub struct AttentionParams {
        /// Batch.
        pub batch: u32,
        /// Heads.
        pub heads: u32,
        /// Query tokens.
        pub tq: u32,
        /// Key tokens.
        pub tk: u32,
        /// Row widths of q, k, v and out.
        pub q_stride: u32,
        /// Row width of k.
        pub k_stride: u32,
        /// Row width of v.
        pub v_stride: u32,
        /// Row width of out.
        pub out_stride: u32,
        /// Column offsets of q, k, v and out.
        pub q_off: u32,
        /// Column offset of k.
        pub k_off: u32,
        /// Column offset of v.
        pub v_off: u32,
        /// Column offset of out.
        pub out_off: u32,
        /// Score scale (1/√64 for CLIP and MMDiT, 1 for T5).
        pub scale: f32,
        /// Bit 0 causal, bit 1 bias, bit 2 qk RMSNorm.
        pub flags: u32,
        /// RMSNorm epsilon.
        pub eps: f32,
        /// Padding.
        pub _pad: u32,
    }
}

/// The heads of a [batch, tokens, width] value, starting at column `col_offset`.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    /// The value.
    pub value: Value,
    /// First column of head 0.
    pub col_offset: usize,
}

impl From<Value> for Heads {
    fn from(value: Value) -> Heads {
        Heads {
            value,
            col_offset: 0,
        }
    }
}

/// What distinguishes the attentions of SD3's models.
#[derive(Clone, Copy, Debug)]
pub struct AttentionOptions {
    /// Number of heads (each 64 wide).
    pub heads: usize,
    /// Score scale.
    pub scale: f32,
    /// Mask key j > query i (CLIP).
    pub causal: bool,
    /// Additive position bias [heads, tq, tk] (T5).
    pub bias: Option<Value>,
    /// RMSNorm weights [64] for q and k rows of each head (SD3.5).
    pub qk_norm: Option<(Value, Value)>,
    /// RMSNorm epsilon.
    pub eps: f32,
}

impl AttentionOptions {
    /// Plain attention over `heads` heads with scale 1/√64.
    pub fn new(heads: usize) -> AttentionOptions {
        AttentionOptions {
            heads,
            scale: 1.0 / (HEAD_DIM as f32).sqrt(),
            causal: false,
            bias: None,
            qk_norm: None,
            eps: 1e-6,
        }
    }
}

struct Dims {
    batch: usize,
    tq: usize,
    tk: usize,
    qw: usize,
    kw: usize,
    vw: usize,
}

fn check(
    g: &Graph,
    kind: &str,
    q: Heads,
    k: Heads,
    v: Heads,
    o: &AttentionOptions,
) -> Result<Dims> {
    let width = o.heads * HEAD_DIM;
    let mut dims = Vec::new();
    for (name, h) in [("q", q), ("k", k), ("v", v)] {
        expect_dtype(g, kind, name, h.value, ACT)?;
        let s = super::expect_rank(g, kind, name, h.value, 3, "[batch, tokens, width]")?;
        if h.col_offset + width > s[2] {
            return Err(g.shape_error(
                kind,
                format!(
                    "{name}: {} heads of 64 from column {} do not fit {}",
                    o.heads,
                    h.col_offset,
                    shape_str(&s)
                ),
            ));
        }
        dims.push(s);
    }
    let (sq, sk, sv) = (&dims[0], &dims[1], &dims[2]);
    if sq[0] != sk[0] || sk[0] != sv[0] || sk[1] != sv[1] {
        return Err(g.shape_error(
            kind,
            format!(
                "q {}, k {}, v {}: batch must match and k, v must have equal token counts",
                shape_str(sq),
                shape_str(sk),
                shape_str(sv)
            ),
        ));
    }
    if o.causal && sq[1] != sk[1] {
        return Err(g.shape_error(kind, "a causal mask needs as many queries as keys"));
    }
    if let Some(b) = o.bias {
        expect_dtype(g, kind, "bias", b, &[DType::F32])?;
        expect_shape(g, kind, "bias", b, &[o.heads, sq[1], sk[1]])?;
    }
    if let Some((wq, wk)) = o.qk_norm {
        for (name, w) in [("q_norm", wq), ("k_norm", wk)] {
            expect_dtype(g, kind, name, w, &[DType::F32])?;
            expect_shape(g, kind, name, w, &[HEAD_DIM])?;
        }
    }
    for s in [sq, sk, sv] {
        u32_of(g, kind, "elements", numel(s))?;
    }
    Ok(Dims {
        batch: sq[0],
        tq: sq[1],
        tk: sk[1],
        qw: sq[2],
        kw: sk[2],
        vw: sv[2],
    })
}

/// FLOPs and ideal bytes (q, k, v read once, out written once) with
/// elements of `elem` bytes.
fn cost(d: &Dims, heads: usize, elem: u64) -> Cost {
    let (b, h, tq, tk) = (d.batch as u64, heads as u64, d.tq as u64, d.tk as u64);
    let e = HEAD_DIM as u64;
    Cost {
        flops: 4 * b * h * tq * tk * e,
        bytes: elem * b * h * e * (2 * tq + 2 * tk),
    }
}

/// The arguments of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionCall {
    /// Queries.
    pub q: Heads,
    /// Keys.
    pub k: Heads,
    /// Values.
    pub v: Heads,
    /// Heads, scale, mask, bias, qk-norm.
    pub o: AttentionOptions,
}

/// Workgroup memory the flash kernel's key and value tiles take.
const FLASH_WORKGROUP_BYTES: u32 = 2 * 32 * HEAD_DIM as u32 * 4;

/// Attention's implementations, in order of preference: the flash kernel on
/// tensor cores (f16 activations only), the flash kernel, then the composed
/// matmul + softmax + matmul (its oracle, and the path for adapters with too
/// little workgroup memory).
pub static IMPLEMENTATIONS: &[Implementation<AttentionCall>] = &[
    Implementation {
        name: "coop",
        needs: &[Feature::Coop],
        supports: |t, _| coop_fragment(t).map(|_| ()),
        record: |g, a| attention_coop(g, a.q, a.k, a.v, &a.o),
    },
    Implementation {
        name: "flash",
        needs: &[],
        supports: |t, _| {
            let l = &t.limits;
            if l.max_compute_workgroup_storage_size < FLASH_WORKGROUP_BYTES
                || l.max_compute_invocations_per_workgroup < BLOCK_Q as u32
                || l.max_compute_workgroup_size_x < BLOCK_Q as u32
            {
                return Err(format!(
                    "needs {FLASH_WORKGROUP_BYTES} bytes of workgroup memory and {BLOCK_Q} invocations per workgroup"
                ));
            }
            Ok(())
        },
        record: |g, a| attention_flash(g, a.q, a.k, a.v, &a.o),
    },
    Implementation {
        name: "composed",
        needs: &[],
        supports: |_, _| Ok(()),
        record: |g, a| attention_composed(g, a.q, a.k, a.v, &a.o),
    },
];

/// The tensor-core kernel's (fragment side, subgroup size) on this target.
fn coop_fragment(t: &Target) -> std::result::Result<(u32, u32), String> {
    let (f, s) = t.coop_fragment()?;
    let l = &t.limits;
    if COOP_WORKGROUP_BYTES > l.max_compute_workgroup_storage_size
        || COOP_THREADS > l.max_compute_invocations_per_workgroup
        || COOP_THREADS > l.max_compute_workgroup_size_x
        || s > COOP_THREADS
    {
        return Err(format!(
            "needs {COOP_WORKGROUP_BYTES} bytes of workgroup memory and {COOP_THREADS} invocations per workgroup (subgroups of {s})"
        ));
    }
    Ok((f, s))
}

/// Attention: out = softmax(scale · q·kᵀ (+ bias, masked)) · v per head, by
/// the first of [`IMPLEMENTATIONS`] the graph's target supports.
pub fn attention(
    g: &mut Graph,
    q: Heads,
    k: Heads,
    v: Heads,
    o: &AttentionOptions,
) -> Result<Value> {
    let call = AttentionCall { q, k, v, o: *o };
    record_first(g, "attention", IMPLEMENTATIONS, &call)
}

/// Fused attention: one kernel, scores never materialised.
pub fn attention_flash(
    g: &mut Graph,
    q: Heads,
    k: Heads,
    v: Heads,
    o: &AttentionOptions,
) -> Result<Value> {
    record_fused(g, q, k, v, o, None)
}

/// Fused attention on tensor cores (`attention_coop.wgsl`): the flash
/// kernel's semantics with q·kᵀ and p·v on f16 fragments, f32 accumulation.
pub fn attention_coop(
    g: &mut Graph,
    q: Heads,
    k: Heads,
    v: Heads,
    o: &AttentionOptions,
) -> Result<Value> {
    let coop = coop_fragment(g.target()).map_err(|e| g.shape_error("attention", e))?;
    record_fused(g, q, k, v, o, Some(coop))
}

/// Records the flash kernel, or its tensor-core form when `coop` gives the
/// (fragment side, subgroup size).
fn record_fused(
    g: &mut Graph,
    q: Heads,
    k: Heads,
    v: Heads,
    o: &AttentionOptions,
    coop: Option<(u32, u32)>,
) -> Result<Value> {
    let kind = "attention";
    let d = check(g, kind, q, k, v, o)?;
    let width = o.heads * HEAD_DIM;
    let out = g.alloc(&[d.batch, d.tq, width], g.act());
    let p = AttentionParams {
        batch: d.batch as u32,
        heads: o.heads as u32,
        tq: d.tq as u32,
        tk: d.tk as u32,
        q_stride: d.qw as u32,
        k_stride: d.kw as u32,
        v_stride: d.vw as u32,
        out_stride: width as u32,
        q_off: q.col_offset as u32,
        k_off: k.col_offset as u32,
        v_off: v.col_offset as u32,
        out_off: 0,
        scale: o.scale,
        flags: if o.causal { CAUSAL } else { 0 }
            | if o.bias.is_some() { BIAS } else { 0 }
            | if o.qk_norm.is_some() { QK_NORM } else { 0 },
        eps: o.eps,
        _pad: 0,
    };
    let mut flags = f16_flags(
        g,
        &[
            ("Q_F16", Some(q.value)),
            ("K_F16", Some(k.value)),
            ("V_F16", Some(v.value)),
            ("OUT_F16", Some(out)),
        ],
    );
    let (kernel, constants, block) = match coop {
        None => (&ATTENTION, Vec::new(), BLOCK_Q),
        Some((f, s)) => {
            if f == 16 {
                flags.push("COOP16");
            }
            (&ATTENTION_COOP, vec![("S", s as f64)], COOP_BLOCK_Q)
        }
    };
    let call = OpCall {
        key: PipelineKey {
            kernel,
            flags,
            constants,
        },
        params: bytes_of(&p),
        args: vec![
            Some(q.value),
            Some(k.value),
            Some(v.value),
            o.qk_norm.map(|n| n.0),
            o.qk_norm.map(|n| n.1),
            o.bias,
            Some(out),
        ],
        workgroups: [d.tq.div_ceil(block) as u32, o.heads as u32, d.batch as u32],
        cost: cost(
            &d,
            o.heads,
            if g.dtype(q.value) == DType::F16 { 2 } else { 4 },
        ),
    };
    g.record(kind, call)?;
    Ok(out)
}

/// Copies the heads of a view into a contiguous [batch, tokens, heads·64] value,
/// RMS-normalising each 64-wide head row when `norm` is given.
fn heads_contiguous(
    g: &mut Graph,
    h: Heads,
    heads: usize,
    norm: Option<Value>,
    eps: f32,
) -> Result<(Value, usize, usize)> {
    let s = g.shape(h.value).to_vec();
    let Some(w) = norm else {
        return Ok((h.value, s[2], h.col_offset));
    };
    let flat = layout::strided_copy(
        g,
        "heads",
        h.value,
        h.col_offset,
        &[s[0] * s[1], heads, HEAD_DIM],
        &[s[2], HEAD_DIM, 1],
    )?;
    let normed = norm::rms_norm(g, flat, Some(w), eps)?;
    Ok((
        g.reshape(normed, &[s[0], s[1], heads * HEAD_DIM])?,
        heads * HEAD_DIM,
        0,
    ))
}

/// The same attention built from primitive ops: scores = q·kᵀ per head, a
/// masked, biased, scaled softmax, then scores·v. Materialises the
/// [batch, heads, tq, tk] scores: the fallback and the fused kernel's oracle.
pub fn attention_composed(
    g: &mut Graph,
    q: Heads,
    k: Heads,
    v: Heads,
    o: &AttentionOptions,
) -> Result<Value> {
    let kind = "attention_composed";
    let d = check(g, kind, q, k, v, o)?;
    let (b, h, tq, tk, e) = (d.batch, o.heads, d.tq, d.tk, HEAD_DIM);
    let (qv, qw, qoff) = heads_contiguous(g, q, h, o.qk_norm.map(|n| n.0), o.eps)?;
    let (kv, kw, koff) = heads_contiguous(g, k, h, o.qk_norm.map(|n| n.1), o.eps)?;
    // Scores and probabilities stay f32 whatever the activations: the softmax
    // of f16 scores would lose the small probabilities.
    let scores = g.alloc(&[b, h, tq, tk], DType::F32);
    let u = |x: usize| x as u32;
    let qk = Gemm {
        p: LinearParams {
            m: u(tq),
            n: u(tk),
            k: u(e),
            batch_inner: u(h),
            lda: u(qw),
            ldw: u(kw),
            ldy: u(tk),
            x_off: u(qoff),
            w_off: u(koff),
            x_sb: u(tq * qw),
            x_sh: u(e),
            w_sb: u(tk * kw),
            w_sh: u(e),
            y_sb: u(h * tq * tk),
            y_sh: u(tq * tk),
            ..Default::default()
        },
        batch_outer: b,
    };
    gemm(g, "scores", qv, kv, None, scores, qk)?;
    let probs = g.with_activation(DType::F32, |g| {
        softmax::attention_softmax(g, scores, o.scale, o.causal, o.bias)
    })?;
    // vᵀ per head: [b, h, 64, tk], so that probs · (vᵀ)ᵀ is another x · wᵀ.
    let vw = d.vw;
    let vt = layout::strided_copy(
        g,
        "v_transpose",
        v.value,
        v.col_offset,
        &[b, h, e, tk],
        &[tk * vw, e, 1, vw],
    )?;
    let out = g.alloc(&[b, tq, h * e], g.act());
    let pv = Gemm {
        p: LinearParams {
            m: u(tq),
            n: u(e),
            k: u(tk),
            batch_inner: u(h),
            lda: u(tk),
            ldw: u(tk),
            ldy: u(h * e),
            x_sb: u(h * tq * tk),
            x_sh: u(tq * tk),
            w_sb: u(h * e * tk),
            w_sh: u(e * tk),
            y_sb: u(tq * h * e),
            y_sh: u(e),
            ..Default::default()
        },
        batch_outer: b,
    };
    gemm(g, "weighted_sum", probs, vt, None, out, pv)?;
    Ok(out)
}

//! The sampler's update as an op (`shaders/sampler.wgsl`): classifier-free
//! guidance, skip-layer guidance and the flow-match Euler step in one pass
//! over the latents.
//!
//! Shapes: x [batch, c, h, w]; v [batch, …] or, with guidance, [2·batch, …]
//! (uncond first); step [3] = (dt, skip-layer weight, next sigma); skip like
//! x; for inpainting, known [2, batch, c, h, w] (the image's latents, then the
//! noise) and mask [h, w] → x_out like x. Everything but v is f32; v may be
//! f16.

use super::{
    bytes_of, check_index_space, expect_dtype, expect_shape, f16_flags, grid_for, ACT, WG,
};
use crate::error::Result;
use crate::gpu::{Binding, Kernel, PipelineKey};
use crate::graph::{Cost, Graph, OpCall, Value};
use crate::tensor::{numel, shape_str, DType};

/// `guided_euler` in sampler.wgsl.
pub static GUIDED_EULER: Kernel = Kernel {
    file: "sampler.wgsl",
    entry: "guided_euler",
    params: &SamplerParams::LAYOUT,
    bindings: &[
        Binding::read("x"),
        Binding::read("v"),
        Binding::read("step"),
        Binding::read("skip"),
        Binding::read("known"),
        Binding::read("mask"),
        Binding::write("x_out"),
    ],
    flags: &["V_F16"],
    constants: &[],
    overrides: &[
        ("WG", WG as u32),
        ("CFG", CFG),
        ("SLG", SLG),
        ("BLEND", BLEND),
    ],
    consts: &[],
};

/// Kernels of this family.
pub static KERNELS: &[&Kernel] = &[&GUIDED_EULER];

/// Flag bit: v holds uncond and cond halves, combined with the guidance scale.
pub const CFG: u32 = 1;
/// Flag bit: add skip-layer guidance from the `skip` binding.
pub const SLG: u32 = 2;
/// Flag bit: inpainting, keep the known region (mask 0) on the image's path.
pub const BLEND: u32 = 4;

/// What inpainting adds to the update: the known region's latents and noise,
/// and the mask.
#[derive(Clone, Copy, Debug)]
pub struct Inpaint {
    /// [2, batch, c, h, w]: the init image's latents, then the run's noise.
    pub known: Value,
    /// [h, w]: 1 where the model paints, 0 where the image is kept.
    pub mask: Value,
}

crate::params_struct! {
    /// Params of `sampler.wgsl`.
    pub struct SamplerParams {
        /// Latent values (one batch).
        pub n: u32,
        /// CFG, SLG bits.
        pub flags: u32,
        /// Classifier-free guidance scale.
        pub guidance: f32,
        /// Latent pixels per channel (h · w), the mask's length.
        pub hw: u32,
    }
}

/// x_out = x + dt · pred, pred = v, or v_u + guidance · (v_c − v_u) with
/// `guidance`, plus w · (v_c − skip) with `skip`; (dt, w, σ) = `step`. With
/// `inpaint`, x_out = m · x_out + (1 − m) · (σ · noise + (1 − σ) · image)
/// (StableDiffusion3InpaintPipeline's blend after each step).
pub fn guided_euler(
    g: &mut Graph,
    x: Value,
    v: Value,
    step: Value,
    skip: Option<Value>,
    guidance: Option<f32>,
    inpaint: Option<Inpaint>,
) -> Result<Value> {
    let kind = "guided_euler";
    let xs = g.shape(x).to_vec();
    let n = numel(&xs);
    let halves = if guidance.is_some() { 2 } else { 1 };
    expect_dtype(g, kind, "x", x, &[DType::F32])?;
    expect_dtype(g, kind, "v", v, ACT)?;
    expect_dtype(g, kind, "step", step, &[DType::F32])?;
    expect_shape(g, kind, "step", step, &[3])?;
    if xs.is_empty() || numel(g.shape(v)) != halves * n || g.shape(v)[1..] != xs[1..] {
        return Err(g.shape_error(
            kind,
            format!(
                "v must be {halves} × x's batch with x's other axes: x {}, v {}",
                shape_str(&xs),
                shape_str(g.shape(v))
            ),
        ));
    }
    if let Some(s) = skip {
        if guidance.is_none() {
            return Err(g.shape_error(kind, "skip-layer guidance needs classifier-free guidance"));
        }
        expect_dtype(g, kind, "skip", s, &[DType::F32])?;
        expect_shape(g, kind, "skip", s, &xs)?;
    }
    let hw = if xs.len() == 4 { xs[2] * xs[3] } else { 0 };
    if let Some(ip) = inpaint {
        if xs.len() != 4 {
            return Err(g.shape_error(kind, "inpainting needs x as [batch, c, h, w]"));
        }
        expect_dtype(g, kind, "known", ip.known, &[DType::F32])?;
        expect_dtype(g, kind, "mask", ip.mask, &[DType::F32])?;
        let mut ks = vec![2];
        ks.extend_from_slice(&xs);
        expect_shape(g, kind, "known", ip.known, &ks)?;
        expect_shape(g, kind, "mask", ip.mask, &[xs[2], xs[3]])?;
    }
    check_index_space(g, kind, 2 * n)?;
    let out = g.alloc(&xs, DType::F32);
    let p = SamplerParams {
        n: n as u32,
        flags: if guidance.is_some() { CFG } else { 0 }
            | if skip.is_some() { SLG } else { 0 }
            | if inpaint.is_some() { BLEND } else { 0 },
        guidance: guidance.unwrap_or(1.0),
        hw: hw as u32,
    };
    let blend = inpaint.is_some() as u64;
    let n64 = n as u64;
    let call = OpCall {
        key: PipelineKey {
            kernel: &GUIDED_EULER,
            flags: f16_flags(g, &[("V_F16", Some(v))]),
            constants: Vec::new(),
        },
        params: bytes_of(&p),
        args: vec![
            Some(x),
            Some(v),
            Some(step),
            skip,
            inpaint.map(|i| i.known),
            inpaint.map(|i| i.mask),
            Some(out),
        ],
        workgroups: grid_for(n),
        cost: Cost {
            flops: n64 * (2 + 3 * (halves as u64 - 1) + 3 * skip.is_some() as u64 + 6 * blend),
            bytes: 4 * n64 * (2 + halves as u64 + skip.is_some() as u64 + 2 * blend)
                + 4 * blend * hw as u64,
        },
    };
    g.record(kind, call)?;
    Ok(out)
}

#if F16
enable f16;
#endif

// One denoising update on the GPU, so the latents never leave it:
//
//   pred  = v_u + G · (v_c − v_u)     classifier-free guidance (CFG set): v holds
//                                     the uncond half, then the cond half
//   pred += w · (v_c − s)             skip-layer guidance (SLG set): s from the
//                                     pass with blocks skipped
//   x_out = x + dt · pred             flow-match Euler
//   x_out = (1 − m) · (σ · noise + (1 − σ) · image) + m · x_out
//                                     inpainting (BLEND set): the known region
//                                     (mask m = 0) follows the init image's
//                                     latents noised to the next step's σ
//
// G is fixed for a run (params); dt, w and σ change per step and come from
// the three-value `step` buffer (w is 0 on steps without skip-layer
// guidance). The order of operations is diffusers', term for term.

#include "common.wgsl"

struct Params {
    n: u32, flags: u32, guidance: f32, hw: u32,
}

#if V_F16
alias V_T = f16;
#else
alias V_T = f32;
#endif
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<V_T>;
@group(0) @binding(3) var<storage, read> step: array<f32>;
@group(0) @binding(4) var<storage, read> skip: array<f32>;
// [2 · n]: the init image's latents (per batch entry), then the noise.
@group(0) @binding(5) var<storage, read> known: array<f32>;
// [hw]: 1 where the model paints, 0 where the image is kept.
@group(0) @binding(6) var<storage, read> mask: array<f32>;
@group(0) @binding(7) var<storage, read_write> x_out: array<f32>;

// Flag bits, set from Rust (ops::sampler).
override CFG: u32;
override SLG: u32;
override BLEND: u32;

@compute @workgroup_size(WG)
fn guided_euler(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, WG);
    if (i >= p.n) {
        return;
    }
    var pred = f32(v[i]);
    if ((p.flags & CFG) != 0u) {
        let c = f32(v[p.n + i]);
        pred = pred + p.guidance * (c - pred);
        if ((p.flags & SLG) != 0u) {
            pred += (c - skip[i]) * step[1];
        }
    }
    var out = x[i] + step[0] * pred;
    if ((p.flags & BLEND) != 0u) {
        let sigma = step[2];
        let proper = sigma * known[p.n + i] + (1.0 - sigma) * known[i];
        let m = mask[i % p.hw];
        out = (1.0 - m) * proper + m * out;
    }
    x_out[i] = out;
}

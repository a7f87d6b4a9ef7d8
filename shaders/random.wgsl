// Seeded pseudo-random fill for benchmark weights: out[i] = shift + scale · u
// with u uniform in [-1, 1) from a hash of (seed, i), so the same seed gives
// the same tensor on every device. With W_F16 two values pack into each u32.

#include "common.wgsl"

struct Params {
    n: u32, seed: u32, scale: f32, shift: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
#if W_F16
@group(0) @binding(1) var<storage, read_write> out: array<u32>;
#else
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
#endif

// PCG-style integer hash (O'Neill, "PCG", as used by Jarzynski & Olano 2020).
fn pcg(v: u32) -> u32 {
    let state = v * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

fn value(i: u32) -> f32 {
    let h = pcg(i ^ pcg(p.seed));
    let u = f32(h >> 8u) * (1.0 / 16777216.0) * 2.0 - 1.0;
    return p.shift + p.scale * u;
}

@compute @workgroup_size(WG)
fn fill_random(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, WG);
#if W_F16
    if (2u * i < p.n) {
        out[i] = pack2x16float(vec2<f32>(value(2u * i), value(2u * i + 1u)));
    }
#else
    if (i < p.n) {
        out[i] = value(i);
    }
#endif
}

// A LoRA merged into a weight on the GPU:
//
//   out[o, j] = w[o, j] + Σ_k b[o, k] · a[k, j]
//
// w and out are [rows, cols]; a is [rank, cols] (the LoRA's down matrices,
// stacked when several are merged at once), b is [rows, rank] (their up
// matrices, each scaled by strength · α / r and placed at the rows it
// changes, zero elsewhere). Accumulation is f32. With W_F16 the weight is
// read as packed f16 pairs, with OUT_F16 the result is written so; each
// invocation then handles two neighbouring elements (one u32). Merging
// happens once, at load.

#include "common.wgsl"

struct Params {
    n: u32, cols: u32, rank: u32, _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
#if W_F16
@group(0) @binding(1) var<storage, read> w: array<u32>;
#else
@group(0) @binding(1) var<storage, read> w: array<f32>;
#endif
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
#if OUT_F16
@group(0) @binding(4) var<storage, read_write> out: array<u32>;
#else
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
#endif

fn weight(e: u32) -> f32 {
#if W_F16
    return unpack2x16float(w[e / 2u])[e % 2u];
#else
    return w[e];
#endif
}

// Element e of the merged weight (e < p.n).
fn merged(e: u32) -> f32 {
    let o = e / p.cols;
    let j = e % p.cols;
    var acc = 0.0;
    for (var k = 0u; k < p.rank; k++) {
        acc += b[o * p.rank + k] * a[k * p.cols + j];
    }
    return weight(e) + acc;
}

@compute @workgroup_size(WG)
fn lora_merge(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, WG);
#if OUT_F16
    let e = 2u * i;
    if (e < p.n) {
        var hi = 0.0;
        if (e + 1u < p.n) {
            hi = merged(e + 1u);
        }
        out[i] = pack2x16float(vec2<f32>(merged(e), hi));
    }
#else
    if (i < p.n) {
        out[i] = merged(i);
    }
#endif
}

#if F16
enable f16;
#endif

// 2-D convolution and nearest upsampling on NCHW tensors.
//
// conv2d:      x [batch, cin, h, w], w [cout, cin, kh, kw] (f32 or f16),
//              bias [cout] -> y [batch, cout, oh, ow]; square stride, zero
//              padding. Covers 3×3/1×1 convs and the 2×2 stride-2 patchify.
//              Each invocation computes OC_PER outputs of one pixel, so every
//              input value loaded serves OC_PER output channels.
// upsample2x:  x [planes, h, w] -> y [planes, 2h, 2w], nearest neighbour.

#include "common.wgsl"

struct Params {
    batch: u32, cin: u32, h: u32, wd: u32,
    cout: u32, oh: u32, ow: u32, kh: u32,
    kw: u32, stride: u32, pad: u32, has_bias: u32,
    n: u32, _pad0: u32, _pad1: u32, _pad2: u32,
}

#if X_F16
alias X_T = f16;
#else
alias X_T = f32;
#endif
#if Y_F16
alias Y_T = f16;
#else
alias Y_T = f32;
#endif
@group(0) @binding(0) var<uniform> p: Params;
#include "weights.wgsl"
@group(0) @binding(1) var<storage, read> x: array<X_T>;
@group(0) @binding(2) var<storage, read> w: array<WElem>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<Y_T>;

const OC_PER: u32 = 4u;

// One invocation per (batch, output-channel quad, pixel): n = batch · ⌈cout/4⌉ · oh · ow.
@compute @workgroup_size(WG)
fn conv2d(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, WG);
    if (i >= p.n) {
        return;
    }
    let pixels = p.oh * p.ow;
    let quads = (p.cout + OC_PER - 1u) / OC_PER;
    let pix = i % pixels;
    let oc0 = ((i / pixels) % quads) * OC_PER;
    let b = i / (pixels * quads);
    let oy = pix / p.ow;
    let ox = pix % p.ow;
    var acc = vec4<f32>(0.0);
    let wk = p.kh * p.kw;
    for (var ci = 0u; ci < p.cin; ci++) {
        let xplane = (b * p.cin + ci) * p.h * p.wd;
        for (var ky = 0u; ky < p.kh; ky++) {
            // Unsigned arithmetic: iy below zero wraps past h and is skipped.
            let iy = oy * p.stride + ky - p.pad;
            if (iy >= p.h) {
                continue;
            }
            for (var kx = 0u; kx < p.kw; kx++) {
                let ix = ox * p.stride + kx - p.pad;
                if (ix >= p.wd) {
                    continue;
                }
                let xv = f32(x[xplane + iy * p.wd + ix]);
                let tap = ci * wk + ky * p.kw + kx;
                for (var j = 0u; j < OC_PER; j++) {
                    let oc = oc0 + j;
                    if (oc < p.cout) {
                        acc[j] += xv * load_w(oc * p.cin * wk + tap);
                    }
                }
            }
        }
    }
    for (var j = 0u; j < OC_PER; j++) {
        let oc = oc0 + j;
        if (oc < p.cout) {
            var v = acc[j];
            if (p.has_bias != 0u) {
                v += bias[oc];
            }
            y[((b * p.cout + oc) * p.oh + oy) * p.ow + ox] = Y_T(v);
        }
    }
}

// n = planes · 2h · 2w.
@compute @workgroup_size(WG)
fn upsample2x(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, WG);
    if (i >= p.n) {
        return;
    }
    let ow = 2u * p.wd;
    let oh = 2u * p.h;
    let ox = i % ow;
    let oy = (i / ow) % oh;
    let plane = i / (ow * oh);
    y[i] = Y_T(f32(x[(plane * p.h + oy / 2u) * p.wd + ox / 2u]));
}

enable f16;
enable wgpu_cooperative_matrix;

// 2-D convolution as an implicit GEMM on cooperative-matrix fragments (tensor
// cores), with an optional GroupNorm (+SiLU) folded into its input load, for
// the VAE: per batch entry z, y[z] [cout, pixels] = (im2col(x')[pixels, K] ·
// w[cout, K]ᵀ)ᵀ + bias, K = cin·kh·kw, on the shared core coop_gemm.wgsl
// (A = the im2col view, rows = output pixels; B = the weights).
//
// x [batch, cin, h, wd] NCHW; w [cout, cin, kh, kw] (f32 or f16); square
// stride, `pad` zeros before each spatial axis (reads past the end are zeros
// too, which gives any padding after). With NORM, x' = (x − mean) · rstd ·
// gamma[ci] + beta[ci] with (mean, rstd) = stats[z, ci / ch_per_group] (from
// group_stats), then SiLU with SILU; zero padding applies after, as in the
// composed GroupNorm → conv.

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

struct Params {
    m: u32, n: u32, k: u32, cin: u32,
    h: u32, wd: u32, ow: u32, kh: u32,
    kw: u32, stride: u32, pad: u32, has_bias: u32,
    flags: u32, groups: u32, ch_per_group: u32, _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
#include "weights.wgsl"
@group(0) @binding(1) var<storage, read> x: array<X_T>;
@group(0) @binding(2) var<storage, read> w: array<WElem>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read> stats: array<f32>;
@group(0) @binding(5) var<storage, read> gamma: array<f32>;
@group(0) @binding(6) var<storage, read> beta: array<f32>;
@group(0) @binding(7) var<storage, read_write> y: array<Y_T>;

// Flag bits, set from Rust (ops::conv).
override NORM: u32;
override SILU: u32;

// Pixel `pix` of the output, tap kk = (ci, ky, kx) of the kernel.
fn a_value(z: u32, pix: u32, kk: u32) -> f32 {
    let taps = p.kh * p.kw;
    let ci = kk / taps;
    let t = kk % taps;
    // Unsigned arithmetic: a row or column before the padding wraps past h
    // or wd and reads as zero.
    let iy = (pix / p.ow) * p.stride + t / p.kw - p.pad;
    let ix = (pix % p.ow) * p.stride + t % p.kw - p.pad;
    if (iy >= p.h || ix >= p.wd) {
        return 0.0;
    }
    var v = f32(x[((z * p.cin + ci) * p.h + iy) * p.wd + ix]);
    if ((p.flags & NORM) != 0u) {
        let s = 2u * (z * p.groups + ci / p.ch_per_group);
        v = (v - stats[s]) * stats[s + 1u] * gamma[ci] + beta[ci];
        if ((p.flags & SILU) != 0u) {
            v = v / (1.0 + exp(-v));
        }
    }
    return v;
}

fn b_value(z: u32, oc: u32, kk: u32) -> f32 {
    return load_w(oc * p.k + kk);
}

fn store_value(z: u32, pix: u32, oc: u32, v: f32) {
    var o = v;
    if (p.has_bias != 0u) {
        o += bias[oc];
    }
    y[(z * p.n + oc) * p.m + pix] = Y_T(o);
}

// NCHW output: consecutive invocations store consecutive pixels.
const ROWS_FAST: bool = true;

#include "coop_gemm.wgsl"

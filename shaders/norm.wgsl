#if F16
enable f16;
#endif

// Row normalisations, each one workgroup per row (or per group), statistics in
// f32 with a two-pass mean/variance for accuracy.
//
// layer_norm:     x [rows, cols] -> (x - mean) / sqrt(var + eps) · weight + bias
//                 (weight and bias each optional: flags bit 0, bit 1)
// rms_norm:       x [rows, cols] -> x / sqrt(mean(x²) + eps) · weight (optional)
// adaln_modulate: x [batch, inner, cols] -> LN(x) · (1 + scale) + shift, where
//                 shift and scale are the rows `weight[b·mod_stride + shift_off ..]`
//                 and `weight[b·mod_stride + scale_off ..]` of a modulation vector
// group_norm:     x [batch, C, spatial] in `groups` groups; one row is one
//                 (batch, group) of cols = C/groups·spatial contiguous values;
//                 per-channel weight/bias; SiLU after when flags bit 2 is set.
// group_stats:    the same rows' statistics only: y [rows, 2] = (mean, rstd),
//                 for kernels that fold the GroupNorm into their input load.

#include "common.wgsl"

struct Params {
    rows: u32, cols: u32, flags: u32, inner: u32,
    eps: f32, mod_stride: u32, shift_off: u32, scale_off: u32,
    spatial: u32, ch_per_group: u32, groups: u32, _pad: u32,
}

#if X_F16
alias X_T = f16;
#else
alias X_T = f32;
#endif
#if WEIGHT_F16
alias WEIGHT_T = f16;
#else
alias WEIGHT_T = f32;
#endif
#if Y_F16
alias Y_T = f16;
#else
alias Y_T = f32;
#endif
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<X_T>;
@group(0) @binding(2) var<storage, read> weight: array<WEIGHT_T>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<Y_T>;

#include "reduce.wgsl"

// Flag bits, set from Rust (ops::norm).
override HAS_WEIGHT: u32;
override HAS_BIAS: u32;
override SILU: u32;

fn row_mean(base: u32, ids: RowIds) -> f32 {
    let lid = ids.lid;
    var s = 0.0;
    for (var i = lid; i < p.cols; i += WG) {
        s += f32(x[base + i]);
    }
    return workgroup_sum(s, ids) / f32(p.cols);
}

fn row_rstd(base: u32, mean: f32, ids: RowIds) -> f32 {
    let lid = ids.lid;
    var s = 0.0;
    for (var i = lid; i < p.cols; i += WG) {
        let d = f32(x[base + i]) - mean;
        s += d * d;
    }
    return inverseSqrt(workgroup_sum(s, ids) / f32(p.cols) + p.eps);
}

fn row_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}

@compute @workgroup_size(WG)
fn layer_norm(ids: RowIds) {
    let wid = ids.wid;
    let nwg = ids.nwg;
    let lid = ids.lid;
    let row = row_index(wid, nwg);
    if (row >= p.rows) {
        return;
    }
    let base = row * p.cols;
    let mean = row_mean(base, ids);
    let rstd = row_rstd(base, mean, ids);
    for (var i = lid; i < p.cols; i += WG) {
        var v = (f32(x[base + i]) - mean) * rstd;
        if ((p.flags & HAS_WEIGHT) != 0u) {
            v *= f32(weight[i]);
        }
        if ((p.flags & HAS_BIAS) != 0u) {
            v += bias[i];
        }
        y[base + i] = Y_T(v);
    }
}

@compute @workgroup_size(WG)
fn rms_norm(ids: RowIds) {
    let wid = ids.wid;
    let nwg = ids.nwg;
    let lid = ids.lid;
    let row = row_index(wid, nwg);
    if (row >= p.rows) {
        return;
    }
    let base = row * p.cols;
    var s = 0.0;
    for (var i = lid; i < p.cols; i += WG) {
        let v = f32(x[base + i]);
        s += v * v;
    }
    let rms = inverseSqrt(workgroup_sum(s, ids) / f32(p.cols) + p.eps);
    for (var i = lid; i < p.cols; i += WG) {
        var v = f32(x[base + i]) * rms;
        if ((p.flags & HAS_WEIGHT) != 0u) {
            v *= f32(weight[i]);
        }
        y[base + i] = Y_T(v);
    }
}

@compute @workgroup_size(WG)
fn adaln_modulate(ids: RowIds) {
    let wid = ids.wid;
    let nwg = ids.nwg;
    let lid = ids.lid;
    let row = row_index(wid, nwg);
    if (row >= p.rows) {
        return;
    }
    let base = row * p.cols;
    let mean = row_mean(base, ids);
    let rstd = row_rstd(base, mean, ids);
    let m = (row / p.inner) * p.mod_stride;
    for (var i = lid; i < p.cols; i += WG) {
        let v = (f32(x[base + i]) - mean) * rstd;
        y[base + i] = Y_T(v * (1.0 + f32(weight[m + p.scale_off + i])) + f32(weight[m + p.shift_off + i]));
    }
}

@compute @workgroup_size(WG)
fn group_norm(ids: RowIds) {
    let wid = ids.wid;
    let nwg = ids.nwg;
    let lid = ids.lid;
    let row = row_index(wid, nwg);
    if (row >= p.rows) {
        return;
    }
    let base = row * p.cols;
    let mean = row_mean(base, ids);
    let rstd = row_rstd(base, mean, ids);
    let c0 = (row % p.groups) * p.ch_per_group;
    for (var i = lid; i < p.cols; i += WG) {
        let c = c0 + i / p.spatial;
        var v = (f32(x[base + i]) - mean) * rstd;
        if ((p.flags & HAS_WEIGHT) != 0u) {
            v *= f32(weight[c]);
        }
        if ((p.flags & HAS_BIAS) != 0u) {
            v += bias[c];
        }
        if ((p.flags & SILU) != 0u) {
            v = v / (1.0 + exp(-v));
        }
        y[base + i] = Y_T(v);
    }
}

@compute @workgroup_size(WG)
fn group_stats(ids: RowIds) {
    let row = row_index(ids.wid, ids.nwg);
    if (row >= p.rows) {
        return;
    }
    let base = row * p.cols;
    let mean = row_mean(base, ids);
    let rstd = row_rstd(base, mean, ids);
    if (ids.lid == 0u) {
        y[2u * row] = Y_T(mean);
        y[2u * row + 1u] = Y_T(rstd);
    }
}

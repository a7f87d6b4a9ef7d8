#if F16
enable f16;
#endif

// The adaLN-Zero step between two sublayers, fused:
//   x_out = x + gate · branch
//   h_out = LN(x_out) · (1 + scale) + shift
// for x, branch: [batch, inner, cols] and gate, shift, scale chunks of a
// modulation vector [batch, mod_stride]. One workgroup per row; the row sum is
// recomputed per pass instead of re-read, so no invocation reads another's
// writes. Composed equivalent: gated_residual then adaln_modulate.

#include "common.wgsl"

struct Params {
    rows: u32, cols: u32, inner: u32, mod_stride: u32,
    gate_off: u32, shift_off: u32, scale_off: u32, eps: f32,
}

#if X_F16
alias X_T = f16;
#else
alias X_T = f32;
#endif
#if BRANCH_F16
alias BRANCH_T = f16;
#else
alias BRANCH_T = f32;
#endif
#if MODV_F16
alias MODV_T = f16;
#else
alias MODV_T = f32;
#endif
#if X_OUT_F16
alias X_OUT_T = f16;
#else
alias X_OUT_T = f32;
#endif
#if H_OUT_F16
alias H_OUT_T = f16;
#else
alias H_OUT_T = f32;
#endif
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<X_T>;
@group(0) @binding(2) var<storage, read> branch: array<BRANCH_T>;
@group(0) @binding(3) var<storage, read> modv: array<MODV_T>;
@group(0) @binding(4) var<storage, read_write> x_out: array<X_OUT_T>;
@group(0) @binding(5) var<storage, read_write> h_out: array<H_OUT_T>;

#include "reduce.wgsl"

@compute @workgroup_size(WG)
fn residual_adaln(ids: RowIds) {
    let wid = ids.wid;
    let nwg = ids.nwg;
    let lid = ids.lid;
    let row = wid.y * nwg.x + wid.x;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.cols;
    let m = (row / p.inner) * p.mod_stride;
    var s = 0.0;
    for (var i = lid; i < p.cols; i += WG) {
        s += f32(x[base + i]) + f32(modv[m + p.gate_off + i]) * f32(branch[base + i]);
    }
    let mean = workgroup_sum(s, ids) / f32(p.cols);
    var ss = 0.0;
    for (var i = lid; i < p.cols; i += WG) {
        let d = f32(x[base + i]) + f32(modv[m + p.gate_off + i]) * f32(branch[base + i]) - mean;
        ss += d * d;
    }
    let rstd = inverseSqrt(workgroup_sum(ss, ids) / f32(p.cols) + p.eps);
    for (var i = lid; i < p.cols; i += WG) {
        let r = f32(x[base + i]) + f32(modv[m + p.gate_off + i]) * f32(branch[base + i]);
        x_out[base + i] = X_OUT_T(r);
        h_out[base + i] = H_OUT_T((r - mean) * rstd * (1.0 + f32(modv[m + p.scale_off + i])) + f32(modv[m + p.shift_off + i]));
    }
}

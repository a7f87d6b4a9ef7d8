#if F16
enable f16;
#endif

// Row softmax over the last axis with the extras attention needs:
// y = softmax(x · scale + bias) with an optional causal mask.
//
// x, y: [rows, n] where rows = batch · heads · tq (query index = row % tq);
// bias: [heads, tq, n], shared by the batch (flags bit 1); causal (bit 0)
// masks key j > query i. Masked entries become exactly 0.

#include "common.wgsl"

struct Params {
    rows: u32, n: u32, tq: u32, heads: u32,
    scale: f32, flags: u32, _pad0: u32, _pad1: u32,
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
@group(0) @binding(1) var<storage, read> x: array<X_T>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<Y_T>;

#include "reduce.wgsl"

// Flag bits, set from Rust (ops::softmax).
override CAUSAL: u32;
override BIAS: u32;

// A large finite sentinel rather than -inf keeps exp() and max() NaN-free.
const NEG: f32 = -3.0e38;

fn logit(row: u32, j: u32) -> f32 {
    let qi = row % p.tq;
    if ((p.flags & CAUSAL) != 0u && j > qi) {
        return NEG;
    }
    var v = f32(x[row * p.n + j]) * p.scale;
    if ((p.flags & BIAS) != 0u) {
        let h = (row / p.tq) % p.heads;
        v += bias[(h * p.tq + qi) * p.n + j];
    }
    return v;
}

@compute @workgroup_size(WG)
fn softmax(ids: RowIds) {
    let wid = ids.wid;
    let nwg = ids.nwg;
    let lid = ids.lid;
    let row = wid.y * nwg.x + wid.x;
    if (row >= p.rows) {
        return;
    }
    var mx = NEG;
    for (var j = lid; j < p.n; j += WG) {
        mx = max(mx, logit(row, j));
    }
    mx = workgroup_max(mx, ids);
    var sum = 0.0;
    for (var j = lid; j < p.n; j += WG) {
        let l = logit(row, j);
        if (l > NEG) {
            sum += exp(l - mx);
        }
    }
    let inv = 1.0 / workgroup_sum(sum, ids);
    for (var j = lid; j < p.n; j += WG) {
        let l = logit(row, j);
        y[row * p.n + j] = Y_T(select(0.0, exp(l - mx) * inv, l > NEG));
    }
}

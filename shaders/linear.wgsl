#if F16
enable f16;
#endif

// Strided batched GEMM with bias: y = x · wᵀ + b.
//
// x: [batch, m, k] (row stride lda), w: [batch | 1, n, k] (row stride ldw),
// y: [batch, m, n] (row stride ldy), bias: [n]. The batch index z splits into
// (z / batch_inner, z % batch_inner) with an outer and an inner stride per
// tensor, so per-head views of [tokens, heads·64] tensors need no copies.
// Accumulation is f32; w may be f16 (W_F16).
//
// Tiling: a BM×BN output tile per workgroup of (BM/4)·(BN/4) invocations, each
// owning a 4×4 block; k advances BK at a time through workgroup memory. The
// sizes are set from Rust (ops::linear) at pipeline creation: BM, BN and BK
// multiples of 4. With VEC4 set (k, strides and offsets multiples of 4) x and
// w are read as 4-vectors.

struct Params {
    m: u32, n: u32, k: u32, batch_inner: u32,
    lda: u32, ldw: u32, ldy: u32, has_bias: u32,
    x_off: u32, w_off: u32, y_off: u32, _pad0: u32,
    x_sb: u32, x_sh: u32, w_sb: u32, w_sh: u32,
    y_sb: u32, y_sh: u32, _pad1: u32, _pad2: u32,
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
#if VEC4
// 4-wide loads take f32 or f16 weights only (Rust clears VEC4 otherwise).
override W_FMT: u32 = 0u;
#if W_F16
alias WElem = vec2<u32>;
#else
alias WElem = vec4<f32>;
#endif
@group(0) @binding(1) var<storage, read> x: array<vec4<X_T>>;
#else
#include "weights.wgsl"
@group(0) @binding(1) var<storage, read> x: array<X_T>;
#endif
@group(0) @binding(2) var<storage, read> w: array<WElem>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<Y_T>;

override BM: u32;
override BN: u32;
override BK: u32;

var<workgroup> xs: array<f32, BK * BM>; // [BK][BM]
var<workgroup> ws: array<f32, BK * BN>; // [BK][BN]

// Four consecutive k of one row; zero outside [0, k).
fn load_x4(base: u32, kk: u32) -> vec4<f32> {
#if VEC4
    if (kk < p.k) {
        return vec4<f32>(x[(base + kk) >> 2u]);
    }
    return vec4<f32>(0.0);
#else
    var v = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        if (kk + j < p.k) {
            v[j] = f32(x[base + kk + j]);
        }
    }
    return v;
#endif
}

fn load_w4(base: u32, kk: u32) -> vec4<f32> {
#if VEC4
    if (kk < p.k) {
#if W_F16
        let h = w[(base + kk) >> 2u];
        return vec4<f32>(unpack2x16float(h.x), unpack2x16float(h.y));
#else
        return w[(base + kk) >> 2u];
#endif
    }
    return vec4<f32>(0.0);
#else
    var v = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        if (kk + j < p.k) {
            v[j] = load_w(base + kk + j);
        }
    }
    return v;
#endif
}

@compute @workgroup_size(BM / 4u * (BN / 4u))
fn linear(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let zb = wid.z / p.batch_inner;
    let zh = wid.z % p.batch_inner;
    let x_base = p.x_off + zb * p.x_sb + zh * p.x_sh;
    let w_base = p.w_off + zb * p.w_sb + zh * p.w_sh;
    let y_base = p.y_off + zb * p.y_sb + zh * p.y_sh;
    let row0 = wid.y * BM;
    let col0 = wid.x * BN;
    let threads = BM / 4u * (BN / 4u);
    let quads = BK / 4u;

    // Compute role: 4×4 block at (ty·4, tx·4).
    let tx = lid % (BN / 4u);
    let ty = lid / (BN / 4u);

    var acc: array<vec4<f32>, 4>;
    for (var i = 0u; i < 4u; i++) {
        acc[i] = vec4<f32>(0.0);
    }

    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        // Loader role: k quads of tile rows, spread over the workgroup.
        for (var e = lid; e < BM * quads; e += threads) {
            let lr = e / quads;
            let lq = (e % quads) * 4u;
            var xv = vec4<f32>(0.0);
            if (row0 + lr < p.m) {
                xv = load_x4(x_base + (row0 + lr) * p.lda, k0 + lq);
            }
            for (var j = 0u; j < 4u; j++) {
                xs[(lq + j) * BM + lr] = xv[j];
            }
        }
        for (var e = lid; e < BN * quads; e += threads) {
            let lr = e / quads;
            let lq = (e % quads) * 4u;
            var wv = vec4<f32>(0.0);
            if (col0 + lr < p.n) {
                wv = load_w4(w_base + (col0 + lr) * p.ldw, k0 + lq);
            }
            for (var j = 0u; j < 4u; j++) {
                ws[(lq + j) * BN + lr] = wv[j];
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let a = vec4<f32>(xs[kk * BM + ty * 4u], xs[kk * BM + ty * 4u + 1u],
                              xs[kk * BM + ty * 4u + 2u], xs[kk * BM + ty * 4u + 3u]);
            let b = vec4<f32>(ws[kk * BN + tx * 4u], ws[kk * BN + tx * 4u + 1u],
                              ws[kk * BN + tx * 4u + 2u], ws[kk * BN + tx * 4u + 3u]);
            acc[0] += a.x * b;
            acc[1] += a.y * b;
            acc[2] += a.z * b;
            acc[3] += a.w * b;
        }
        workgroupBarrier();
    }

    for (var i = 0u; i < 4u; i++) {
        let row = row0 + ty * 4u + i;
        if (row < p.m) {
            for (var j = 0u; j < 4u; j++) {
                let col = col0 + tx * 4u + j;
                if (col < p.n) {
                    var v = acc[i][j];
                    if (p.has_bias != 0u) {
                        v += bias[col];
                    }
                    y[y_base + row * p.ldy + col] = Y_T(v);
                }
            }
        }
    }
}

#if F16
enable f16;
#endif

// Multi-head attention, head dim 64, flash-style: keys and values stream
// through workgroup memory in tiles of 32 and each query row keeps an online
// softmax (running max, running sum, rescaled accumulator), so the score matrix
// is never materialised.
//
// q: [batch, tq, heads·64] at column q_off of rows q_stride wide (so q, k, v
// can be views of one fused qkv tensor); k, v: [batch, tk, …] likewise;
// out: [batch, tq, heads·64] (rows out_stride wide).
// flags: bit 0 causal (key j > query i masked), bit 1 additive bias
// [heads, tq, tk] shared by the batch, bit 2 RMSNorm of each q and k head row
// with the learned weights q_norm[64] and k_norm[64], eps `eps`.
//
// One workgroup = 64 query rows of one (batch, head), one row per invocation.

#include "attention_io.wgsl"

// Head dim, fixed by the models. BC sizes a private array and BR = 2·BC
// (half the invocations load keys, half values), so the tile stays const.
const D: u32 = 64u;
const D4: u32 = 16u;
const BR: u32 = 64u;
const BC: u32 = 32u;

// Flag bits, set from Rust (ops::attention).
override CAUSAL: u32;
override BIAS: u32;
override QK_NORM: u32;
// Finite sentinel for "no score yet": keeps exp(m_old - m_new) NaN-free.
const NEG: f32 = -3.0e38;

var<workgroup> ks: array<vec4<f32>, 512>; // [BC][D4]
var<workgroup> vs: array<vec4<f32>, 512>; // [BC][D4]

@compute @workgroup_size(BR)
fn attention(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.y;
    let b = wid.z;
    let qi = wid.x * BR + lid;
    let q_valid = qi < p.tq;
    let use_norm = (p.flags & QK_NORM) != 0u;
    let causal = (p.flags & CAUSAL) != 0u;
    let use_bias = (p.flags & BIAS) != 0u;

    var qr: array<vec4<f32>, 16>;
    var acc: array<vec4<f32>, 16>;
    var m = NEG;
    var l = 0.0;
    if (q_valid) {
        let base = p.q_off + (b * p.tq + qi) * p.q_stride + h * D;
        var ss = 0.0;
        for (var d = 0u; d < D4; d++) {
            let e = base + d * 4u;
            qr[d] = vec4<f32>(f32(q[e]), f32(q[e + 1u]), f32(q[e + 2u]), f32(q[e + 3u]));
            ss += dot(qr[d], qr[d]);
        }
        let r = select(1.0, inverseSqrt(ss / f32(D) + p.eps), use_norm);
        for (var d = 0u; d < D4; d++) {
            var nw = vec4<f32>(1.0);
            if (use_norm) {
                nw = vec4<f32>(q_norm[d * 4u], q_norm[d * 4u + 1u], q_norm[d * 4u + 2u], q_norm[d * 4u + 3u]);
            }
            // Fold the softmax scale into q once instead of into every score.
            qr[d] = qr[d] * r * nw * p.scale;
        }
    }
    for (var d = 0u; d < D4; d++) {
        acc[d] = vec4<f32>(0.0);
    }

    // Causal: this block needs no key past its last query.
    var kend = p.tk;
    if (causal) {
        kend = min(p.tk, wid.x * BR + BR);
    }
    for (var k0 = 0u; k0 < kend; k0 += BC) {
        // Invocations 0..31 load (and normalise) key rows, 32..63 value rows.
        let r = lid % BC;
        let kj = k0 + r;
        if (lid < BC) {
            var ss = 0.0;
            var row: array<vec4<f32>, 16>;
            if (kj < p.tk) {
                let base = p.k_off + (b * p.tk + kj) * p.k_stride + h * D;
                for (var d = 0u; d < D4; d++) {
                    let e = base + d * 4u;
                    row[d] = vec4<f32>(f32(k[e]), f32(k[e + 1u]), f32(k[e + 2u]), f32(k[e + 3u]));
                    ss += dot(row[d], row[d]);
                }
            } else {
                for (var d = 0u; d < D4; d++) {
                    row[d] = vec4<f32>(0.0);
                }
            }
            let rn = select(1.0, inverseSqrt(ss / f32(D) + p.eps), use_norm);
            for (var d = 0u; d < D4; d++) {
                var nw = vec4<f32>(1.0);
                if (use_norm) {
                    let o = d * 4u;
                    nw = vec4<f32>(k_norm[o], k_norm[o + 1u], k_norm[o + 2u], k_norm[o + 3u]);
                }
                ks[r * D4 + d] = row[d] * rn * nw;
            }
        } else {
            if (kj < p.tk) {
                let base = p.v_off + (b * p.tk + kj) * p.v_stride + h * D;
                for (var d = 0u; d < D4; d++) {
                    let e = base + d * 4u;
                    vs[r * D4 + d] = vec4<f32>(f32(v[e]), f32(v[e + 1u]), f32(v[e + 2u]), f32(v[e + 3u]));
                }
            } else {
                for (var d = 0u; d < D4; d++) {
                    vs[r * D4 + d] = vec4<f32>(0.0);
                }
            }
        }
        workgroupBarrier();

        if (q_valid) {
            var s: array<f32, 32>;
            var tile_max = NEG;
            for (var j = 0u; j < BC; j++) {
                let kj2 = k0 + j;
                var sc = NEG;
                if (kj2 < p.tk && !(causal && kj2 > qi)) {
                    var dot4 = vec4<f32>(0.0);
                    for (var d = 0u; d < D4; d++) {
                        dot4 += qr[d] * ks[j * D4 + d];
                    }
                    sc = dot4.x + dot4.y + dot4.z + dot4.w;
                    if (use_bias) {
                        sc += bias[(h * p.tq + qi) * p.tk + kj2];
                    }
                }
                s[j] = sc;
                tile_max = max(tile_max, sc);
            }
            if (tile_max > NEG) {
                let m_new = max(m, tile_max);
                let corr = exp(m - m_new);
                l *= corr;
                for (var d = 0u; d < D4; d++) {
                    acc[d] *= corr;
                }
                for (var j = 0u; j < BC; j++) {
                    if (s[j] > NEG) {
                        let pj = exp(s[j] - m_new);
                        l += pj;
                        for (var d = 0u; d < D4; d++) {
                            acc[d] += pj * vs[j * D4 + d];
                        }
                    }
                }
                m = m_new;
            }
        }
        workgroupBarrier();
    }

    if (q_valid) {
        let inv = select(0.0, 1.0 / l, l > 0.0);
        let base = p.out_off + (b * p.tq + qi) * p.out_stride + h * D;
        for (var d = 0u; d < D4; d++) {
            let o = acc[d] * inv;
            out[base + d * 4u] = OUT_T(o.x);
            out[base + d * 4u + 1u] = OUT_T(o.y);
            out[base + d * 4u + 2u] = OUT_T(o.z);
            out[base + d * 4u + 3u] = OUT_T(o.w);
        }
    }
}

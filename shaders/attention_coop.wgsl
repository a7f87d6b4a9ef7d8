enable f16;
enable wgpu_cooperative_matrix;

// Multi-head attention, head dim 64, on cooperative-matrix fragments (tensor
// cores) for q·kᵀ and p·v: the same params, bindings and flag bits as
// attention.wgsl, whose online softmax it follows.
//
// One workgroup = BR = 32 query rows of one (batch, head), 128 invocations:
// four per query row, each owning 16 columns of that row's scores and of its
// output accumulator (kept in registers, f32). Keys and values stream through
// workgroup memory in tiles of BC = 64, stored as f16; per tile:
//   1. every invocation loads half a key row (RMS-normalised when QK_NORM)
//      and half a value row; rows past tk are zeros;
//   2. the groups of S invocations (S = the adapter's largest subgroup size,
//      so a group is made of whole subgroups) share out the F×F fragments of
//      scores = q·kᵀ [BR][BC], accumulated in f32 and stored to workgroup
//      memory (fragments are opaque);
//   3. the scalar invocations mask, bias and take the running max of their
//      row (exchanged through workgroup memory: no subgroup operation may
//      share a shader with cooperative matrices on NVIDIA), write the
//      probabilities as f16 over the key tile, and rescale their accumulator;
//   4. the groups compute this tile's p·v [BR][D] from fresh accumulators and
//      store it; the scalar invocations add it to their registers.
// No fragment ever reads back what a fragment wrote, so where the hardware
// runs smaller subgroups than S, redundant subgroups store identical values
// and the result stays exact.
//
// Workgroup memory: 29 KiB (q 4, keys then probabilities 8, values 8, scores
// then p·v 8, reductions 1), within the 32 KiB many adapters offer.

#include "attention_io.wgsl"

#include "coop_frag.wgsl"

// Head dim, query rows and key rows per tile, invocations, columns per
// invocation (D / 4 = BC / 4: one register array serves scores and output).
const D: u32 = 64u;
const BR: u32 = 32u;
const BC: u32 = 64u;
const T: u32 = 128u;
const CPI: u32 = 16u;

// Invocations per group (set from Rust: the adapter's largest subgroup size)
// and the flag bits.
override S: u32;
override CAUSAL: u32;
override BIAS: u32;
override QK_NORM: u32;
// Finite sentinel for "no score yet": keeps exp(m_old - m_new) NaN-free.
const NEG: f32 = -3.0e38;

var<workgroup> qs: array<f16, 2048>;   // [BR][D], normalised and scaled
var<workgroup> kp: array<f16, 4096>;   // [BC][D] keys, then [BR][BC] probabilities
var<workgroup> vs: array<f16, 4096>;   // [BC][D]
var<workgroup> sc: array<f32, 2048>;   // [BR][BC] scores, then [BR][D] p·v
var<workgroup> red_a: array<f32, 128>;
var<workgroup> red_b: array<f32, 128>;

// Stores through a helper: naga 30's SPIR-V writer fails ("expression is not
// cached") on coopStoreT of a loop-carried accumulator written inline.
fn store_frag(acc: FragC, i: u32) {
    coopStoreT(acc, &sc[i], 64u);
}

@compute @workgroup_size(128)
fn attention_coop(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.y;
    let b = wid.z;
    let q0 = wid.x * BR;
    let use_norm = (p.flags & QK_NORM) != 0u;
    let causal = (p.flags & CAUSAL) != 0u;
    let use_bias = (p.flags & BIAS) != 0u;
    let group = lid / S;
    let groups = T / S;
    // This invocation's query row and columns.
    let row = lid / 4u;
    let c0 = (lid % 4u) * CPI;
    let qi = q0 + row;
    let q_valid = qi < p.tq;

    var vals: array<f32, 16>;
    var ss = 0.0;
    if (q_valid) {
        let base = p.q_off + (b * p.tq + qi) * p.q_stride + h * D + c0;
        for (var i = 0u; i < CPI; i++) {
            vals[i] = f32(q[base + i]);
            ss += vals[i] * vals[i];
        }
    } else {
        for (var i = 0u; i < CPI; i++) {
            vals[i] = 0.0;
        }
    }
    red_a[lid] = ss;
    workgroupBarrier();
    var rq = 1.0;
    if (use_norm) {
        let s4 = red_a[4u * row] + red_a[4u * row + 1u] + red_a[4u * row + 2u] + red_a[4u * row + 3u];
        rq = inverseSqrt(s4 / f32(D) + p.eps);
    }
    for (var i = 0u; i < CPI; i++) {
        var wq = 1.0;
        if (use_norm) {
            wq = q_norm[c0 + i];
        }
        // The softmax scale is folded into q once (1/8 and 1 are exact).
        qs[row * D + c0 + i] = f16(vals[i] * rq * wq * p.scale);
    }

    var acc: array<f32, 16>;
    for (var i = 0u; i < CPI; i++) {
        acc[i] = 0.0;
    }
    var m = NEG;
    var l = 0.0;
    // Key and value rows this invocation loads: half a row each.
    let krow = lid / 2u;
    let kc0 = (lid % 2u) * 32u;

    // Causal: this block needs no key past its last query.
    var kend = p.tk;
    if (causal) {
        kend = min(p.tk, q0 + BR);
    }
    for (var k0 = 0u; k0 < kend; k0 += BC) {
        // 1. Keys and values.
        let kj = k0 + krow;
        var kv: array<f32, 32>;
        var ssk = 0.0;
        if (kj < p.tk) {
            let kb = p.k_off + (b * p.tk + kj) * p.k_stride + h * D + kc0;
            let vb = p.v_off + (b * p.tk + kj) * p.v_stride + h * D + kc0;
            for (var i = 0u; i < 32u; i++) {
                kv[i] = f32(k[kb + i]);
                ssk += kv[i] * kv[i];
                vs[krow * D + kc0 + i] = f16(v[vb + i]);
            }
        } else {
            for (var i = 0u; i < 32u; i++) {
                kv[i] = 0.0;
                vs[krow * D + kc0 + i] = f16(0.0);
            }
        }
        red_a[lid] = ssk;
        workgroupBarrier();
        var rk = 1.0;
        if (use_norm) {
            rk = inverseSqrt((red_a[2u * krow] + red_a[2u * krow + 1u]) / f32(D) + p.eps);
        }
        for (var i = 0u; i < 32u; i++) {
            var wk = 1.0;
            if (use_norm) {
                wk = k_norm[kc0 + i];
            }
            kp[krow * D + kc0 + i] = f16(kv[i] * rk * wk);
        }
        workgroupBarrier();

        // 2. scores = q·kᵀ (kᵀ column-major: key j's row of D is column j).
        let s_frags = (BR / F) * (BC / F);
        for (var t = group; t < s_frags; t += groups) {
            let fm = (t / (BC / F)) * F;
            let fn_ = (t % (BC / F)) * F;
            var c = FragC();
            for (var kk = 0u; kk < D; kk += F) {
                let a = coopLoadT<FragA>(&qs[fm * D + kk], D);
                let bt = coopLoad<FragB>(&kp[fn_ * D + kk], D);
                c = coopMultiplyAdd(a, bt, c);
            }
            store_frag(c, fm * BC + fn_);
        }
        workgroupBarrier();

        // 3. Online softmax over this row's 16 scores.
        var tile_max = NEG;
        for (var i = 0u; i < CPI; i++) {
            let j = k0 + c0 + i;
            var s = NEG;
            if (q_valid && j < p.tk && !(causal && j > qi)) {
                s = sc[row * BC + c0 + i];
                if (use_bias) {
                    s += bias[(h * p.tq + qi) * p.tk + j];
                }
            }
            vals[i] = s;
            tile_max = max(tile_max, s);
        }
        red_a[lid] = tile_max;
        workgroupBarrier();
        let m4 = max(max(red_a[4u * row], red_a[4u * row + 1u]), max(red_a[4u * row + 2u], red_a[4u * row + 3u]));
        let m_new = max(m, m4);
        let corr = exp(m - m_new);
        var part = 0.0;
        for (var i = 0u; i < CPI; i++) {
            var pj = 0.0;
            if (vals[i] > NEG) {
                pj = exp(vals[i] - m_new);
            }
            part += pj;
            kp[row * BC + c0 + i] = f16(pj);
            acc[i] *= corr;
        }
        red_b[lid] = part;
        workgroupBarrier();
        l = l * corr + red_b[4u * row] + red_b[4u * row + 1u] + red_b[4u * row + 2u] + red_b[4u * row + 3u];
        m = m_new;

        // 4. This tile's p·v, added to the registers.
        let o_frags = (BR / F) * (D / F);
        for (var t = group; t < o_frags; t += groups) {
            let fm = (t / (D / F)) * F;
            let fn_ = (t % (D / F)) * F;
            var c = FragC();
            for (var jj = 0u; jj < BC; jj += F) {
                let a = coopLoadT<FragA>(&kp[fm * BC + jj], BC);
                let bv = coopLoadT<FragB>(&vs[jj * D + fn_], D);
                c = coopMultiplyAdd(a, bv, c);
            }
            store_frag(c, fm * D + fn_);
        }
        workgroupBarrier();
        // The next tile writes sc only after its load barrier.
        for (var i = 0u; i < CPI; i++) {
            acc[i] += sc[row * D + c0 + i];
        }
    }

    if (q_valid) {
        let inv = select(0.0, 1.0 / l, l > 0.0);
        let base = p.out_off + (b * p.tq + qi) * p.out_stride + h * D + c0;
        for (var i = 0u; i < CPI; i++) {
            out[base + i] = OUT_T(acc[i] * inv);
        }
    }
}

enable f16;
enable wgpu_cooperative_matrix;

// Strided batched GEMM y = x · wᵀ + b on cooperative-matrix fragments (tensor
// cores): the same views, params and bindings as linear.wgsl.
//
// A workgroup computes a BM×BN tile of y, BM = GM·2·F and BN = GN·2·F, with
// GM·GN groups of S invocations; each group owns 2×2 fragments of F×F (F = 16
// with COOP16, else 8). S is the adapter's largest subgroup size, so a group
// is made of whole subgroups; where the hardware runs smaller subgroups, they
// compute the same fragments redundantly, which stays correct (identical
// stores, no read of another's result).
//
// Per step of BK = 2·F along k, the workgroup stages the x and w tiles as f16
// in workgroup memory (zeros outside the matrices, so any m, n, k works); A
// fragments load row-major from the x tile, B fragments column-major from the
// w tile (w is [n, k] row-major, i.e. wᵀ column-major with stride BK).
// Accumulation is f32. Fragments are opaque, so the epilogue goes through
// workgroup memory: the 2×2 accumulators are stored, then every invocation
// adds the bias and writes the values inside the matrix.

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
    m: u32, n: u32, k: u32, batch_inner: u32,
    lda: u32, ldw: u32, ldy: u32, has_bias: u32,
    x_off: u32, w_off: u32, y_off: u32, _pad0: u32,
    x_sb: u32, x_sh: u32, w_sb: u32, w_sh: u32,
    y_sb: u32, y_sh: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
#include "weights.wgsl"
@group(0) @binding(1) var<storage, read> x: array<X_T>;
@group(0) @binding(2) var<storage, read> w: array<WElem>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<Y_T>;

#if COOP16
alias FragA = coop_mat16x16<f16, A>;
alias FragB = coop_mat16x16<f16, B>;
alias FragC = coop_mat16x16<f32, C>;
const F: u32 = 16u;
#else
alias FragA = coop_mat8x8<f16, A>;
alias FragB = coop_mat8x8<f16, B>;
alias FragC = coop_mat8x8<f32, C>;
const F: u32 = 8u;
#endif
const BK: u32 = 2u * F;

// Invocations per group (the adapter's largest subgroup size) and groups
// along m and n: set from Rust (ops::linear) at pipeline creation.
override S: u32;
override GM: u32;
override GN: u32;

var<workgroup> xs: array<f16, GM * 2u * F * BK>;              // [BM][BK]
var<workgroup> ws: array<f16, GN * 2u * F * BK>;              // [BN][BK]
var<workgroup> cs: array<f32, GM * 2u * F * GN * 2u * F>;     // [BM][BN]

// A store through a helper: naga 30's SPIR-V writer fails ("expression is
// not cached") on coopStoreT of a local accumulator written inline.
fn store_frag(acc: FragC, i: u32, stride: u32) {
    coopStoreT(acc, &cs[i], stride);
}

@compute @workgroup_size(S * GM * GN)
fn linear_coop(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let bm = GM * 2u * F;
    let bn = GN * 2u * F;
    let threads = S * GM * GN;
    let zb = wid.z / p.batch_inner;
    let zh = wid.z % p.batch_inner;
    let x_base = p.x_off + zb * p.x_sb + zh * p.x_sh;
    let w_base = p.w_off + zb * p.w_sb + zh * p.w_sh;
    let y_base = p.y_off + zb * p.y_sb + zh * p.y_sh;
    let row0 = wid.y * bm;
    let col0 = wid.x * bn;
    let group = lid / S;
    let fm = (group % GM) * 2u * F;
    let fn_ = (group / GM) * 2u * F;

    var acc00 = FragC();
    var acc01 = FragC();
    var acc10 = FragC();
    var acc11 = FragC();

    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        for (var e = lid; e < bm * BK; e += threads) {
            let r = e / BK;
            let c = e % BK;
            var v = 0.0;
            if (row0 + r < p.m && k0 + c < p.k) {
                v = f32(x[x_base + (row0 + r) * p.lda + k0 + c]);
            }
            xs[e] = f16(v);
        }
        for (var e = lid; e < bn * BK; e += threads) {
            let r = e / BK;
            let c = e % BK;
            var v = 0.0;
            if (col0 + r < p.n && k0 + c < p.k) {
                v = load_w(w_base + (col0 + r) * p.ldw + k0 + c);
            }
            ws[e] = f16(v);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk += F) {
            let a0 = coopLoadT<FragA>(&xs[fm * BK + kk], BK);
            let a1 = coopLoadT<FragA>(&xs[(fm + F) * BK + kk], BK);
            let b0 = coopLoad<FragB>(&ws[fn_ * BK + kk], BK);
            let b1 = coopLoad<FragB>(&ws[(fn_ + F) * BK + kk], BK);
            acc00 = coopMultiplyAdd(a0, b0, acc00);
            acc01 = coopMultiplyAdd(a0, b1, acc01);
            acc10 = coopMultiplyAdd(a1, b0, acc10);
            acc11 = coopMultiplyAdd(a1, b1, acc11);
        }
        workgroupBarrier();
    }

    store_frag(acc00, fm * bn + fn_, bn);
    store_frag(acc01, fm * bn + fn_ + F, bn);
    store_frag(acc10, (fm + F) * bn + fn_, bn);
    store_frag(acc11, (fm + F) * bn + fn_ + F, bn);
    workgroupBarrier();
    for (var e = lid; e < bm * bn; e += threads) {
        let row = row0 + e / bn;
        let col = col0 + e % bn;
        if (row < p.m && col < p.n) {
            var v = cs[e];
            if (p.has_bias != 0u) {
                v += bias[col];
            }
            y[y_base + row * p.ldy + col] = Y_T(v);
        }
    }
}

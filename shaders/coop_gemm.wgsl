// The cooperative-matrix (tensor-core) GEMM core that linear_coop.wgsl and
// conv_coop.wgsl share: C[z] = A[z] · B[z]ᵀ for z = workgroup_id.z, A [m, k]
// and B [n, k] read element by element through the includer's functions, so
// one core serves strided matrices, im2col views and normalised inputs.
//
// The includer declares `p` with fields m, n, k and, before this include:
//   fn a_value(z: u32, row: u32, kk: u32) -> f32      row < p.m, kk < p.k
//   fn b_value(z: u32, col: u32, kk: u32) -> f32      col < p.n, kk < p.k
//   fn store_value(z: u32, row: u32, col: u32, v: f32) row < p.m, col < p.n
//   const ROWS_FAST: bool  (epilogue: consecutive invocations walk rows
//                           instead of columns, for column-major outputs)
//
// A workgroup computes a BM×BN tile of C, BM = GM·2·F and BN = GN·2·F, with
// GM·GN groups of S invocations; each group owns 2×2 fragments of F×F (F = 16
// with COOP16, else 8). S is the adapter's largest subgroup size, so a group
// is made of whole subgroups; where the hardware runs smaller subgroups, they
// compute the same fragments redundantly, which stays correct (identical
// stores, no read of another's result).
//
// Per step of BK = 2·F along k, the workgroup stages the A and B tiles as f16
// in workgroup memory (zeros outside the matrices, so any m, n, k works); A
// fragments load row-major, B fragments column-major (B [n, k] row-major is
// Bᵀ column-major with stride BK). Accumulation is f32. Fragments are opaque,
// so the epilogue goes through workgroup memory: the 2×2 accumulators are
// stored, then every invocation hands the values inside C to store_value.

#include "coop_frag.wgsl"
const BK: u32 = 2u * F;

// Invocations per group (the adapter's largest subgroup size) and groups
// along m and n: set from Rust at pipeline creation.
override S: u32;
override GM: u32;
override GN: u32;

var<workgroup> as_: array<f16, GM * 2u * F * BK>;            // [BM][BK]
var<workgroup> bs: array<f16, GN * 2u * F * BK>;             // [BN][BK]
var<workgroup> cs: array<f32, GM * 2u * F * GN * 2u * F>;    // [BM][BN]

// A store through a helper: naga 30's SPIR-V writer fails ("expression is
// not cached") on coopStoreT of a local accumulator written inline.
fn store_frag(acc: FragC, i: u32, stride: u32) {
    coopStoreT(acc, &cs[i], stride);
}

@compute @workgroup_size(S * GM * GN)
fn gemm_coop(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let bm = GM * 2u * F;
    let bn = GN * 2u * F;
    let threads = S * GM * GN;
    let z = wid.z;
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
                v = a_value(z, row0 + r, k0 + c);
            }
            as_[e] = f16(v);
        }
        for (var e = lid; e < bn * BK; e += threads) {
            let r = e / BK;
            let c = e % BK;
            var v = 0.0;
            if (col0 + r < p.n && k0 + c < p.k) {
                v = b_value(z, col0 + r, k0 + c);
            }
            bs[e] = f16(v);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk += F) {
            let a0 = coopLoadT<FragA>(&as_[fm * BK + kk], BK);
            let a1 = coopLoadT<FragA>(&as_[(fm + F) * BK + kk], BK);
            let b0 = coopLoad<FragB>(&bs[fn_ * BK + kk], BK);
            let b1 = coopLoad<FragB>(&bs[(fn_ + F) * BK + kk], BK);
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
        var r = e / bn;
        var c = e % bn;
        if (ROWS_FAST) {
            r = e % bm;
            c = e / bm;
        }
        if (row0 + r < p.m && col0 + c < p.n) {
            store_value(z, row0 + r, col0 + c, cs[r * bn + c]);
        }
    }
}

#if F16
enable f16;
#endif

// Data movement: strided copies (permute, slice, patchify/unpatchify, f16→f32
// conversion), concatenation and embedding lookup.
//
// copy_strided: dst [d0..d5] contiguous (n values) from
//               src[off + Σ idx_k · stride_k] (any view of src)
// concat:       dst [outer, len_a + len_b, inner] from src [outer, len_a, inner]
//               and src2 [outer, len_b, inner]
// gather:       dst [t, cols] = src[ids[t], :] (ids past `rows` give NaN, so a
//               bad token id can never pass unnoticed)
// src may hold f16 (W_F16); dst is always f32.

#include "common.wgsl"

struct Params {
    n: u32, off: u32, len_a: u32, len_b: u32,
    inner: u32, rows: u32, cols: u32, _pad: u32,
    shape: array<vec4<u32>, 2>,
    stride: array<vec4<u32>, 2>,
}

#if SRC2_F16
alias SRC2_T = f16;
#else
alias SRC2_T = f32;
#endif
#if DST_F16
alias DST_T = f16;
#else
alias DST_T = f32;
#endif
@group(0) @binding(0) var<uniform> p: Params;
#include "weights.wgsl"
@group(0) @binding(1) var<storage, read> w: array<WElem>;
@group(0) @binding(2) var<storage, read> src2: array<SRC2_T>;
@group(0) @binding(3) var<storage, read> ids: array<u32>;
@group(0) @binding(4) var<storage, read_write> dst: array<DST_T>;

@compute @workgroup_size(WG)
fn copy_strided(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, WG);
    if (i >= p.n) {
        return;
    }
    var rem = i;
    var src_i = p.off;
    for (var d = 5; d >= 0; d--) {
        let dim = p.shape[d / 4][d % 4];
        let idx = rem % dim;
        rem /= dim;
        src_i += idx * p.stride[d / 4][d % 4];
    }
    dst[i] = DST_T(load_w(src_i));
}

@compute @workgroup_size(WG)
fn concat(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, WG);
    if (i >= p.n) {
        return;
    }
    let len = p.len_a + p.len_b;
    let t = i % p.inner;
    let j = (i / p.inner) % len;
    let o = i / (p.inner * len);
    if (j < p.len_a) {
        dst[i] = DST_T(load_w((o * p.len_a + j) * p.inner + t));
    } else {
        dst[i] = DST_T(f32(src2[(o * p.len_b + (j - p.len_a)) * p.inner + t]));
    }
}

@compute @workgroup_size(WG)
fn gather(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, WG);
    if (i >= p.n) {
        return;
    }
    let id = ids[i / p.cols];
    if (id < p.rows) {
        dst[i] = DST_T(load_w(id * p.cols + i % p.cols));
    } else {
        dst[i] = DST_T(bitcast<f32>(0x7fc00000u));
    }
}

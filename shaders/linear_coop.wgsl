enable f16;
enable wgpu_cooperative_matrix;

// Strided batched GEMM y = x · wᵀ + b on cooperative-matrix fragments (tensor
// cores): the same views, params and bindings as linear.wgsl, on the shared
// core coop_gemm.wgsl (A = the x view, B = the w view).

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

// Batch z = outer · batch_inner + inner; each view has a stride per level.
fn view_base(z: u32, off: u32, sb: u32, sh: u32) -> u32 {
    return off + (z / p.batch_inner) * sb + (z % p.batch_inner) * sh;
}

fn a_value(z: u32, row: u32, kk: u32) -> f32 {
    return f32(x[view_base(z, p.x_off, p.x_sb, p.x_sh) + row * p.lda + kk]);
}

fn b_value(z: u32, col: u32, kk: u32) -> f32 {
    return load_w(view_base(z, p.w_off, p.w_sb, p.w_sh) + col * p.ldw + kk);
}

fn store_value(z: u32, row: u32, col: u32, v: f32) {
    var o = v;
    if (p.has_bias != 0u) {
        o += bias[col];
    }
    y[view_base(z, p.y_off, p.y_sb, p.y_sh) + row * p.ldy + col] = Y_T(o);
}

const ROWS_FAST: bool = false;

#include "coop_gemm.wgsl"

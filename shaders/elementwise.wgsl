#if F16
enable f16;
#endif

// Memory-bound elementwise kernels over flat arrays of n values.
//
// unary:          out = act(a · scale + shift); ACT selects the activation
// binary:         out = a ∘ b[i % b_len]; BINOP 0 adds, 1 multiplies (b repeats,
//                 so a [batch, t, c] + b [t, c] broadcasts over the batch)
// gated_residual: out = a + gate · c with a, c: [batch, inner, cols] and gate
//                 the row b[batch · mod_stride + gate_off ..] of a modulation vector

#include "common.wgsl"

struct Params {
    n: u32, b_len: u32, cols: u32, inner: u32,
    mod_stride: u32, gate_off: u32, scale: f32, shift: f32,
}

#if A_F16
alias A_T = f16;
#else
alias A_T = f32;
#endif
#if B_F16
alias B_T = f16;
#else
alias B_T = f32;
#endif
#if C_F16
alias C_T = f16;
#else
alias C_T = f32;
#endif
#if OUT_F16
alias OUT_T = f16;
#else
alias OUT_T = f32;
#endif
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<A_T>;
@group(0) @binding(2) var<storage, read> b: array<B_T>;
@group(0) @binding(3) var<storage, read> c: array<C_T>;
@group(0) @binding(4) var<storage, read_write> out: array<OUT_T>;

// 0 identity, 1 SiLU, 2 GELU (tanh approximation), 3 GELU (erf), 4 quick-GELU.
override ACT: u32 = 0u;
// 0 add, 1 multiply.
override BINOP: u32 = 0u;

fn sigmoid(v: f32) -> f32 {
    return 1.0 / (1.0 + exp(-v));
}

// Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7); WGSL has no erf builtin.
fn erf_approx(v: f32) -> f32 {
    let s = sign(v);
    let z = abs(v);
    let t = 1.0 / (1.0 + 0.3275911 * z);
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    return s * (1.0 - poly * exp(-z * z));
}

fn activate(v: f32) -> f32 {
    switch ACT {
        case 1u: {
            return v * sigmoid(v);
        }
        case 2u: {
            // tanh saturates long before ±15; clamping keeps drivers whose tanh
            // is exp-based from overflowing into NaN.
            let u = clamp(0.7978845608028654 * (v + 0.044715 * v * v * v), -15.0, 15.0);
            return 0.5 * v * (1.0 + tanh(u));
        }
        case 3u: {
            return 0.5 * v * (1.0 + erf_approx(v * 0.7071067811865476));
        }
        case 4u: {
            return v * sigmoid(1.702 * v);
        }
        default: {
            return v;
        }
    }
}

@compute @workgroup_size(WG)
fn unary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, WG);
    if (i < p.n) {
        out[i] = OUT_T(activate(f32(a[i]) * p.scale + p.shift));
    }
}

@compute @workgroup_size(WG)
fn binary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, WG);
    if (i < p.n) {
        let rhs = f32(b[i % p.b_len]);
        out[i] = OUT_T(select(f32(a[i]) + rhs, f32(a[i]) * rhs, BINOP == 1u));
    }
}

@compute @workgroup_size(WG)
fn gated_residual(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, WG);
    if (i < p.n) {
        let col = i % p.cols;
        let batch = i / (p.cols * p.inner);
        out[i] = OUT_T(f32(a[i]) + f32(b[batch * p.mod_stride + p.gate_off + col]) * f32(c[i]));
    }
}

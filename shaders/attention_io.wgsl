// The params, element types and bindings of the attention kernels
// (attention.wgsl, attention_coop.wgsl); layouts in their headers.

struct Params {
    batch: u32, heads: u32, tq: u32, tk: u32,
    q_stride: u32, k_stride: u32, v_stride: u32, out_stride: u32,
    q_off: u32, k_off: u32, v_off: u32, out_off: u32,
    scale: f32, flags: u32, eps: f32, _pad: u32,
}

#if Q_F16
alias Q_T = f16;
#else
alias Q_T = f32;
#endif
#if K_F16
alias K_T = f16;
#else
alias K_T = f32;
#endif
#if V_F16
alias V_T = f16;
#else
alias V_T = f32;
#endif
#if OUT_F16
alias OUT_T = f16;
#else
alias OUT_T = f32;
#endif
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<Q_T>;
@group(0) @binding(2) var<storage, read> k: array<K_T>;
@group(0) @binding(3) var<storage, read> v: array<V_T>;
@group(0) @binding(4) var<storage, read> q_norm: array<f32>;
@group(0) @binding(5) var<storage, read> k_norm: array<f32>;
@group(0) @binding(6) var<storage, read> bias: array<f32>;
@group(0) @binding(7) var<storage, read_write> out: array<OUT_T>;

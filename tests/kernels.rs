//! Every kernel against a CPU f64 reference: seeded random inputs, sizes that
//! are not multiples of the tiles, intermediates poisoned with NaN before the
//! run. Each case runs once on the production device (runtime checks off) and
//! once more, in `every_case_with_runtime_checks`, with naga's checks on.

mod common;

use common::*;
use sd3_wgpu::graph::Graph;
use sd3_wgpu::ops::attention::{self, AttentionOptions, Heads};
use sd3_wgpu::ops::elementwise::{self, Act};
use sd3_wgpu::ops::norm::{self, ModChunk};
use sd3_wgpu::ops::{conv, layout, linear, lora, random, sampler, softmax};
use sd3_wgpu::target::{GemmTile, KernelChoice};
use sd3_wgpu::{DType, Gpu};

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                cases::$name(gpu());
            }
        )*
        const ALL: &[(&str, fn(&Gpu))] = &[$((stringify!($name), cases::$name)),*];
    };
}

cases!(
    linear_f32_and_f16_weights,
    batched_matmul_shared_and_batched,
    gemm_strided_views,
    linear_every_tile,
    layer_norm_with_and_without_affine,
    rms_norm_rows,
    adaln_modulate_from_chunks,
    group_norm_and_silu,
    activations,
    affine_add_mul_broadcast,
    gated_residual_from_chunk,
    softmax_rows_and_attention_softmax,
    attention_every_implementation,
    conv2d_every_implementation,
    upsample_nearest,
    permute_slice_concat,
    gather_f32_f16_and_bad_ids,
    patchify_layouts,
    random_fill_f32_and_f16,
    residual_adaln_fused_and_composed,
    guided_euler_with_and_without_guidance,
    lora_merge_f32_and_f16,
);

#[test]
fn every_case_with_runtime_checks() {
    let gpu = checked_gpu();
    assert!(gpu.runtime_checks);
    for (name, case) in ALL {
        eprintln!("runtime checks on: {name}");
        case(gpu);
    }
}

/// Every case again with only the portable implementations (`--kernels
/// portable`): the subgroup reductions' workgroup-memory fallback, and the
/// reference path of every op.
#[test]
fn every_case_with_portable_kernels() {
    let gpu = portable_gpu();
    for (name, case) in ALL {
        eprintln!("portable kernels: {name}");
        case(gpu);
    }
}

/// Every case again with activations stored as f16 (inputs rounded to f16,
/// outputs written as f16, arithmetic in f32), on adapters with SHADER_F16.
#[test]
fn every_case_with_f16_activations() {
    let Some(gpu) = f16_gpu() else {
        eprintln!("skipped: the adapter has no SHADER_F16");
        return;
    };
    for (name, case) in ALL {
        eprintln!("f16 activations: {name}");
        case(gpu);
    }
}

/// CPU references in f64.
mod reference {
    pub fn linear(
        x: &[f64],
        w: &[f64],
        b: Option<&[f64]>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Vec<f64> {
        let mut y = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = b.map_or(0.0, |b| b[j]);
                for l in 0..k {
                    s += x[i * k + l] * w[j * k + l];
                }
                y[i * n + j] = s;
            }
        }
        y
    }

    /// GroupNorm (eps 1e-6) of NCHW x with `c` channels of `hw` values in
    /// `groups` groups, per-channel scale and shift, then SiLU if asked.
    pub fn group_norm(
        x: &[f64],
        c: usize,
        hw: usize,
        groups: usize,
        gamma: &[f32],
        beta: &[f32],
        silu: bool,
    ) -> Vec<f64> {
        let mut r = Vec::with_capacity(x.len());
        for (gi, grp) in x.chunks(c / groups * hw).enumerate() {
            let (mean, rstd) = stats(grp, 1e-6);
            for (j, v) in grp.iter().enumerate() {
                let ch = (gi % groups) * (c / groups) + j / hw;
                let y = (v - mean) * rstd * gamma[ch] as f64 + beta[ch] as f64;
                r.push(if silu { y * sigmoid(y) } else { y });
            }
        }
        r
    }

    /// (mean, 1/sqrt(var + eps)) of a row.
    pub fn stats(row: &[f64], eps: f64) -> (f64, f64) {
        let n = row.len() as f64;
        let mean = row.iter().sum::<f64>() / n;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        (mean, 1.0 / (var + eps).sqrt())
    }

    pub fn erf(x: f64) -> f64 {
        let a = x.abs();
        let r = if a < 2.5 {
            // Maclaurin series: converges fast with little cancellation here.
            let mut term = a;
            let mut sum = a;
            let mut n = 0.0;
            while term.abs() > 1e-17 * sum.abs() {
                n += 1.0;
                term *= -a * a / n;
                sum += term / (2.0 * n + 1.0);
            }
            2.0 / std::f64::consts::PI.sqrt() * sum
        } else {
            // Continued fraction for erfc, evaluated bottom-up.
            let mut t = a;
            for n in (1..=120).rev() {
                t = a + (n as f64 / 2.0) / t;
            }
            1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / t
        };
        r.copysign(x)
    }

    pub fn sigmoid(v: f64) -> f64 {
        1.0 / (1.0 + (-v).exp())
    }

    pub fn act(a: u32, v: f64) -> f64 {
        match a {
            1 => v * sigmoid(v),
            2 => {
                0.5 * v
                    * (1.0
                        + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh())
            }
            3 => 0.5 * v * (1.0 + erf(v / 2f64.sqrt())),
            4 => v * sigmoid(1.702 * v),
            _ => v,
        }
    }

    pub fn rms(row: &[f64], eps: f64) -> f64 {
        1.0 / (row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64 + eps).sqrt()
    }

    /// A [batch, tokens, width] view with heads at `off`.
    pub struct View<'a> {
        pub data: &'a [f64],
        pub tokens: usize,
        pub width: usize,
        pub off: usize,
    }

    impl View<'_> {
        pub fn row(&self, b: usize, t: usize, h: usize) -> Vec<f64> {
            let s = (b * self.tokens + t) * self.width + self.off + h * 64;
            self.data[s..s + 64].to_vec()
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        q: &View,
        k: &View,
        v: &View,
        batch: usize,
        heads: usize,
        scale: f64,
        causal: bool,
        bias: Option<&[f64]>,
        norm: Option<(&[f64], &[f64])>,
    ) -> Vec<f64> {
        let (tq, tk) = (q.tokens, k.tokens);
        let mut out = vec![0.0; batch * tq * heads * 64];
        let normed = |r: Vec<f64>, w: Option<&[f64]>| match w {
            Some(w) => {
                let s = rms(&r, 1e-6);
                r.iter().zip(w).map(|(a, b)| a * s * b).collect()
            }
            None => r,
        };
        for b in 0..batch {
            for h in 0..heads {
                let keys: Vec<Vec<f64>> = (0..tk)
                    .map(|j| normed(k.row(b, j, h), norm.map(|n| n.1)))
                    .collect();
                for i in 0..tq {
                    let qr = normed(q.row(b, i, h), norm.map(|n| n.0));
                    let mut s: Vec<f64> = (0..tk)
                        .map(|j| {
                            let d: f64 = qr.iter().zip(&keys[j]).map(|(a, c)| a * c).sum();
                            d * scale + bias.map_or(0.0, |bb| bb[(h * tq + i) * tk + j])
                        })
                        .collect();
                    if causal {
                        for (j, sj) in s.iter_mut().enumerate() {
                            if j > i {
                                *sj = f64::NEG_INFINITY;
                            }
                        }
                    }
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for (j, ej) in e.iter().enumerate() {
                        let vr = v.row(b, j, h);
                        for d in 0..64 {
                            out[((b * tq + i) * heads + h) * 64 + d] += ej / z * vr[d];
                        }
                    }
                }
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    pub fn conv2d(
        x: &[f64],
        w: &[f64],
        b: Option<&[f64]>,
        n: usize,
        cin: usize,
        h: usize,
        wd: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pads: [usize; 2],
    ) -> (Vec<f64>, usize, usize) {
        let pad = pads[0];
        let oh = (h + pads[0] + pads[1] - k) / stride + 1;
        let ow = (wd + pads[0] + pads[1] - k) / stride + 1;
        let mut y = vec![0.0; n * cout * oh * ow];
        for bi in 0..n {
            for co in 0..cout {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut s = b.map_or(0.0, |b| b[co]);
                        for ci in 0..cin {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy = (oy * stride + ky) as isize - pad as isize;
                                    let ix = (ox * stride + kx) as isize - pad as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                        continue;
                                    }
                                    s += x[((bi * cin + ci) * h + iy as usize) * wd + ix as usize]
                                        * w[((co * cin + ci) * k + ky) * k + kx];
                                }
                            }
                        }
                        y[((bi * cout + co) * oh + oy) * ow + ox] = s;
                    }
                }
            }
        }
        (y, oh, ow)
    }
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

mod cases {
    use super::*;

    pub fn linear_f32_and_f16_weights(gpu: &Gpu) {
        let sizes = [
            (1, 1, 1),
            (7, 13, 5),
            (77, 64, 33),
            (65, 130, 67),
            (130, 36, 64),
            (3, 4, 129),
        ];
        let mut g = Graph::new(gpu.target());
        let at = g.act();
        let mut expect = Vec::new();
        let mut outs = Vec::new();
        let imps = gemm_implementations(gpu, &g);
        for imp in &imps {
            for (i, &(m, k, n)) in sizes.iter().enumerate() {
                for (j, dtype) in WEIGHT_TYPES.iter().copied().enumerate() {
                    let seed = (i * 10 + j) as u64;
                    let xd = rand(seed, m * k);
                    let wd = rand(seed + 100, n * k);
                    let bd = rand(seed + 200, n);
                    let with_bias = (i + j) % 2 == 0;
                    let x = act(gpu, &mut g, "x", &[m, k], &xd);
                    let w = weight(gpu, &mut g, "w", &[n, k], dtype, &wd);
                    let b = with_bias.then(|| weight(gpu, &mut g, "b", &[n], DType::F32, &bd));
                    let call = linear::linear_call(&mut g, x, w, b).unwrap();
                    let y = imp.record(&mut g, &call).unwrap();
                    g.keep(y);
                    outs.push(y);
                    let bref = f64s(&bd);
                    expect.push((
                        format!("linear {} {m}x{k}x{n} {dtype:?} bias={with_bias}", imp.name),
                        reference::linear(
                            &stored(&xd, at),
                            &stored(&wd, dtype),
                            with_bias.then_some(&bref[..]),
                            m,
                            k,
                            n,
                        ),
                    ));
                }
            }
        }
        let got = run(gpu, g, &outs);
        for ((name, r), o) in expect.iter().zip(&got) {
            assert_close(name, o, r, tol(at));
        }
    }

    /// Every tile `sd3 tune` may choose for the portable GEMM, within the
    /// adapter's limits, on sizes that are not tile multiples (with and
    /// without the vec4 path).
    pub fn linear_every_tile(gpu: &Gpu) {
        let sizes = [(77, 64, 33), (65, 130, 67), (130, 36, 129)];
        let mut ran = Vec::new();
        for tile in GemmTile::CANDIDATES {
            if !tile.fits(&gpu.limits) {
                continue;
            }
            let mut t = gpu.target();
            t.gemm_tile = *tile;
            t.kernels = KernelChoice::Portable;
            let mut g = Graph::new(t);
            let at = g.act();
            let mut expect = Vec::new();
            let mut outs = Vec::new();
            for (i, &(m, k, n)) in sizes.iter().enumerate() {
                let dtype = if i % 2 == 0 { DType::F16 } else { DType::F32 };
                let seed = 500 + i as u64;
                let (xd, wd, bd) = (rand(seed, m * k), rand(seed + 1, n * k), rand(seed + 2, n));
                let x = act(gpu, &mut g, "x", &[m, k], &xd);
                let w = weight(gpu, &mut g, "w", &[n, k], dtype, &wd);
                let b = weight(gpu, &mut g, "b", &[n], DType::F32, &bd);
                let y = linear::linear(&mut g, x, w, Some(b)).unwrap();
                g.keep(y);
                outs.push(y);
                let bref = f64s(&bd);
                expect.push((
                    format!("tile {} linear {m}x{k}x{n} {dtype:?}", tile.name()),
                    reference::linear(&stored(&xd, at), &stored(&wd, dtype), Some(&bref), m, k, n),
                ));
            }
            assert!(g.implementations().iter().all(|i| *i == "tiled"));
            let got = run(gpu, g, &outs);
            for ((name, r), o) in expect.iter().zip(&got) {
                assert_close(name, o, r, tol(at));
            }
            ran.push(tile.name());
        }
        assert!(
            ran.contains(&GemmTile::DEFAULT.name()),
            "the default tile must fit"
        );
        eprintln!("tiles checked: {}", ran.join(", "));
    }

    /// The GEMM implementations this device runs (reported; a demanded but
    /// missing one fails).
    fn gemm_implementations(
        gpu: &Gpu,
        g: &Graph,
    ) -> Vec<&'static sd3_wgpu::ops::choice::Implementation<linear::GemmCall>> {
        let mut probe = Graph::new(gpu.target());
        let x = probe.input("x", &[2, 3], DType::F32);
        let w = probe.input("w", &[4, 3], DType::F32);
        let call = linear::linear_call(&mut probe, x, w, None).unwrap();
        implementations("gemm", linear::IMPLEMENTATIONS, g.target(), &call)
    }

    pub fn batched_matmul_shared_and_batched(gpu: &Gpu) {
        let (b, m, k, n) = (3, 17, 21, 9);
        let xd = rand(1, b * m * k);
        let wb = rand(2, b * n * k);
        let ws = rand(3, n * k);
        let mut g = Graph::new(gpu.target());
        let at = g.act();
        let x = act(gpu, &mut g, "x", &[b, m, k], &xd);
        let w1 = weight(gpu, &mut g, "wb", &[b, n, k], DType::F32, &wb);
        let w2 = weight(gpu, &mut g, "ws", &[n, k], DType::F16, &ws);
        let imps = gemm_implementations(gpu, &g);
        let mut outs = Vec::new();
        for imp in &imps {
            for w in [w1, w2] {
                let call = linear::batched_matmul_call(&mut g, x, w).unwrap();
                let y = imp.record(&mut g, &call).unwrap();
                g.keep(y);
                outs.push(y);
            }
        }
        let got = run(gpu, g, &outs);
        let (x64, wb64, ws64) = (stored(&xd, at), f64s(&wb), stored(&ws, DType::F16));
        let mut r1 = Vec::new();
        let mut r2 = Vec::new();
        for i in 0..b {
            r1.extend(reference::linear(
                &x64[i * m * k..][..m * k],
                &wb64[i * n * k..][..n * k],
                None,
                m,
                k,
                n,
            ));
            r2.extend(reference::linear(
                &x64[i * m * k..][..m * k],
                &ws64,
                None,
                m,
                k,
                n,
            ));
        }
        for (i, imp) in imps.iter().enumerate() {
            assert_close(
                &format!("{} batched w", imp.name),
                &got[2 * i],
                &r1,
                tol(at),
            );
            assert_close(
                &format!("{} shared f16 w", imp.name),
                &got[2 * i + 1],
                &r2,
                tol(at),
            );
        }
    }

    /// Views with every stride different (lda ≠ ldw ≠ ldy), offsets and two
    /// batch levels — as attention's per-head views use them — with and
    /// without 4-wide loads, f32 and f16 weights.
    pub fn gemm_strided_views(gpu: &Gpu) {
        use linear::{Gemm, LinearParams};
        // (m, n, k, lda, ldw, ldy, x_off, w_off, y_off): odd ones, then all ×4 (VEC4).
        let cases = [
            (7, 5, 9, 13, 11, 8, 3, 2, 1),
            (9, 6, 12, 16, 20, 7, 4, 8, 5),
        ];
        let (outer, inner) = (2usize, 3usize);
        let imps = gemm_implementations(gpu, &Graph::new(gpu.target()));
        for imp in &imps {
            for (ci, &(m, n, k, lda, ldw, ldy, xo, wo, yo)) in cases.iter().enumerate() {
                for &dtype in WEIGHT_TYPES {
                    let (x_sh, w_sh, y_sh) = (m * lda + 1, n * ldw + 4, m * ldy + 2);
                    let (x_sb, w_sb, y_sb) = (inner * x_sh + 8, inner * w_sh, inner * y_sh + 3);
                    let (xn, wn, yn) = (xo + outer * x_sb, wo + outer * w_sb, yo + outer * y_sb);
                    let xd = rand(70 + ci as u64, xn);
                    let wd = rand(80 + ci as u64, wn);
                    let mut g = Graph::new(gpu.target());
                    let at = g.act();
                    let x = act(gpu, &mut g, "x", &[xn], &xd);
                    let xd = round_to(&xd, at);
                    let w = weight(gpu, &mut g, "w", &[wn], dtype, &wd);
                    let y = g.alloc(&[yn], DType::F32);
                    let u = |v: usize| v as u32;
                    let p = LinearParams {
                        m: u(m),
                        n: u(n),
                        k: u(k),
                        batch_inner: u(inner),
                        lda: u(lda),
                        ldw: u(ldw),
                        ldy: u(ldy),
                        x_off: u(xo),
                        w_off: u(wo),
                        y_off: u(yo),
                        x_sb: u(x_sb),
                        x_sh: u(x_sh),
                        w_sb: u(w_sb),
                        w_sh: u(w_sh),
                        y_sb: u(y_sb),
                        y_sh: u(y_sh),
                        ..Default::default()
                    };
                    let call = linear::GemmCall {
                        kind: "gemm",
                        x,
                        w,
                        bias: None,
                        y,
                        gemm: Gemm {
                            p,
                            batch_outer: outer,
                        },
                    };
                    imp.record(&mut g, &call).unwrap();
                    g.keep(y);
                    let got = &run(gpu, g, &[y])[0];
                    let w64 = stored(&wd, dtype);
                    let (mut out, mut want) = (Vec::new(), Vec::new());
                    for zb in 0..outer {
                        for zh in 0..inner {
                            for r in 0..m {
                                for c in 0..n {
                                    let mut acc = 0f64;
                                    for kk in 0..k {
                                        acc += xd[xo + zb * x_sb + zh * x_sh + r * lda + kk] as f64
                                            * w64[wo + zb * w_sb + zh * w_sh + c * ldw + kk];
                                    }
                                    want.push(acc);
                                    out.push(got[yo + zb * y_sb + zh * y_sh + r * ldy + c]);
                                }
                            }
                        }
                    }
                    assert_close(
                        &format!("strided gemm {} case {ci} {dtype:?}", imp.name),
                        &out,
                        &want,
                        tol(at),
                    );
                }
            }
        }
    }

    pub fn layer_norm_with_and_without_affine(gpu: &Gpu) {
        let eps = 1e-6;
        let mut g = Graph::new(gpu.target());
        let at = g.act();
        let mut outs = Vec::new();
        let mut expect = Vec::new();
        for (i, &(rows, cols)) in [(5, 77), (3, 1536), (2, 1), (300, 7)].iter().enumerate() {
            // An offset and a spread show that the mean is really removed.
            let xd: Vec<f32> = rand(i as u64, rows * cols)
                .iter()
                .map(|v| 3.0 * v + 2.0)
                .collect();
            let wd: Vec<f32> = rand(50 + i as u64, cols)
                .iter()
                .map(|v| 1.0 + 0.1 * v)
                .collect();
            let bd = rand(90 + i as u64, cols);
            let x = act(gpu, &mut g, "x", &[rows, cols], &xd);
            let w = weight(gpu, &mut g, "w", &[cols], DType::F32, &wd);
            let b = weight(gpu, &mut g, "b", &[cols], DType::F32, &bd);
            for affine in [false, true] {
                let y = if affine {
                    norm::layer_norm(&mut g, x, Some(w), Some(b), eps).unwrap()
                } else {
                    norm::layer_norm(&mut g, x, None, None, eps).unwrap()
                };
                g.keep(y);
                outs.push(y);
                let x64 = stored(&xd, at);
                let mut r = Vec::new();
                for row in x64.chunks(cols) {
                    let (mean, rstd) = reference::stats(row, eps as f64);
                    for (c, v) in row.iter().enumerate() {
                        let n = (v - mean) * rstd;
                        r.push(if affine {
                            n * wd[c] as f64 + bd[c] as f64
                        } else {
                            n
                        });
                    }
                }
                expect.push((format!("layer_norm {rows}x{cols} affine={affine}"), r));
            }
        }
        let got = run(gpu, g, &outs);
        for ((name, r), o) in expect.iter().zip(&got) {
            // A row of one value normalises to exactly 0 (‖ref‖ = 0): compare absolutely.
            assert_close(name, o, r, tol(at));
        }
    }

    pub fn rms_norm_rows(gpu: &Gpu) {
        let eps = 1e-6;
        let (rows, cols) = (33, 64);
        let xd = rand(7, rows * cols);
        let wd: Vec<f32> = rand(8, cols).iter().map(|v| 1.0 + 0.1 * v).collect();
        let xd2 = rand(9, 3 * 300);
        let mut g = Graph::new(gpu.target());
        let at = g.act();
        let x = act(gpu, &mut g, "x", &[rows, cols], &xd);
        let w = weight(gpu, &mut g, "w", &[cols], DType::F32, &wd);
        let x2 = act(gpu, &mut g, "x2", &[3, 300], &xd2);
        let y = norm::rms_norm(&mut g, x, Some(w), eps).unwrap();
        let y2 = norm::rms_norm(&mut g, x2, None, eps).unwrap();
        g.keep(y);
        g.keep(y2);
        let got = run(gpu, g, &[y, y2]);
        let r: Vec<f64> = stored(&xd, at)
            .chunks(cols)
            .flat_map(|row| {
                let s = reference::rms(row, eps as f64);
                row.iter()
                    .zip(&wd)
                    .map(move |(v, w)| v * s * *w as f64)
                    .collect::<Vec<_>>()
            })
            .collect();
        let r2: Vec<f64> = stored(&xd2, at)
            .chunks(300)
            .flat_map(|row| {
                let s = reference::rms(row, eps as f64);
                row.iter().map(move |v| v * s).collect::<Vec<_>>()
            })
            .collect();
        assert_close("rms_norm weighted", &got[0], &r, tol(at));
        assert_close("rms_norm plain", &got[1], &r2, tol(at));
    }

    pub fn adaln_modulate_from_chunks(gpu: &Gpu) {
        let (b, t, c, chunks) = (2, 9, 40, 6);
        let xd: Vec<f32> = rand(11, b * t * c).iter().map(|v| 2.0 * v - 0.5).collect();
        let md = rand(12, b * chunks * c);
        let mut g = Graph::new(gpu.target());
        let at = g.act();
        let x = act(gpu, &mut g, "x", &[b, t, c], &xd);
        let m = act(gpu, &mut g, "mod", &[b, chunks * c], &md);
        let (shift, scale) = (ModChunk { m, index: 3 }, ModChunk { m, index: 4 });
        let y = norm::adaln_modulate(&mut g, x, shift, scale, 1e-6).unwrap();
        g.keep(y);
        let got = run(gpu, g, &[y]);
        let mut r = Vec::new();
        for (row_i, row) in stored(&xd, at).chunks(c).enumerate() {
            let bi = row_i / t;
            let (mean, rstd) = reference::stats(row, 1e-6);
            for (ci, v) in row.iter().enumerate() {
                let sh = md[bi * chunks * c + 3 * c + ci] as f64;
                let sc = md[bi * chunks * c + 4 * c + ci] as f64;
                r.push((v - mean) * rstd * (1.0 + sc) + sh);
            }
        }
        assert_close("adaln_modulate", &got[0], &r, tol(at));
    }

    pub fn group_norm_and_silu(gpu: &Gpu) {
        // Small shapes plus the VAE's real channel counts (512 and 128 in 32 groups).
        let shapes = [
            (2, 64, 5, 3, 32),
            (1, 512, 4, 5, 32),
            (1, 128, 9, 7, 32),
            (3, 6, 1, 1, 3),
        ];
        let mut g = Graph::new(gpu.target());
        let at = g.act();
        let mut outs = Vec::new();
        let mut expect = Vec::new();
        for (i, &(n, c, h, w, groups)) in shapes.iter().enumerate() {
            let xd: Vec<f32> = rand(20 + i as u64, n * c * h * w)
                .iter()
                .map(|v| 2.0 * v + 0.3)
                .collect();
            let wd: Vec<f32> = rand(30 + i as u64, c)
                .iter()
                .map(|v| 1.0 + 0.2 * v)
                .collect();
            let bd = rand(40 + i as u64, c);
            let x = act(gpu, &mut g, "x", &[n, c, h, w], &xd);
            let wv = weight(gpu, &mut g, "w", &[c], DType::F32, &wd);
            let bv = weight(gpu, &mut g, "b", &[c], DType::F32, &bd);
            let silu = i % 2 == 0;
            let y = norm::group_norm(&mut g, x, groups, Some(wv), Some(bv), 1e-6, silu).unwrap();
            g.keep(y);
            outs.push(y);
            let r = reference::group_norm(&stored(&xd, at), c, h * w, groups, &wd, &bd, silu);
            expect.push((
                format!("group_norm {n}x{c}x{h}x{w}/{groups} silu={silu}"),
                r,
            ));
        }
        let got = run(gpu, g, &outs);
        for ((name, r), o) in expect.iter().zip(&got) {
            assert_close(name, o, r, tol(at));
        }
    }

    pub fn activations(gpu: &Gpu) {
        let mut xd: Vec<f32> = rand(5, 1001).iter().map(|v| 6.0 * v).collect();
        // Far tails: tanh and exp must saturate, never overflow into NaN.
        xd.extend_from_slice(&[-100.0, -30.0, -12.0, 12.0, 30.0, 100.0, 0.0]);
        let mut g = Graph::new(gpu.target());
        let at = g.act();
        let x = act(gpu, &mut g, "x", &[xd.len()], &xd);
        let acts = [Act::Silu, Act::GeluTanh, Act::GeluErf, Act::QuickGelu];
        let outs: Vec<_> = acts
            .iter()
            .map(|&a| {
                let y = elementwise::activation(&mut g, x, a).unwrap();
                g.keep(y);
                y
            })
            .collect();
        let got = run(gpu, g, &outs);
        for ((a, o), id) in acts.iter().zip(&got).zip([1, 2, 3, 4]) {
            let r: Vec<f64> = xd.iter().map(|&v| reference::act(id, v as f64)).collect();
            assert_close(&format!("{a:?}"), o, &r, tol(at));
        }
    }

    pub fn affine_add_mul_broadcast(gpu: &Gpu) {
        let (b, t, c) = (2, 5, 7);
        let ad = rand(60, b * t * c);
        let bd = rand(61, t * c);
        let mut g = Graph::new(gpu.target());
        let at = g.act();
        let a = act(gpu, &mut g, "a", &[b, t, c], &ad);
        let bb = act(gpu, &mut g, "b", &[t, c], &bd);
        let s = elementwise::add(&mut g, a, bb).unwrap();
        let p = elementwise::mul(&mut g, a, bb).unwrap();
        let f = elementwise::affine(&mut g, a, 1.5305, -0.0609).unwrap();
        for v in [s, p, f] {
            g.keep(v);
        }
        let got = run(gpu, g, &[s, p, f]);
        let n = t * c;
        let rs: Vec<f64> = (0..b * n)
            .map(|i| ad[i] as f64 + bd[i % n] as f64)
            .collect();
        let rp: Vec<f64> = (0..b * n)
            .map(|i| ad[i] as f64 * bd[i % n] as f64)
            .collect();
        let rf: Vec<f64> = ad
            .iter()
            .map(|&v| v as f64 * 1.5305f32 as f64 + (-0.0609f32) as f64)
            .collect();
        assert_close("add", &got[0], &rs, tol(at));
        assert_close("mul", &got[1], &rp, tol(at));
        assert_close("affine", &got[2], &rf, tol(at));
    }

    pub fn gated_residual_from_chunk(gpu: &Gpu) {
        let (b, t, c) = (2, 11, 24);
        let xd = rand(70, b * t * c);
        let yd = rand(71, b * t * c);
        let md = rand(72, b * 6 * c);
        let mut g = Graph::new(gpu.target());
        let at = g.act();
        let x = act(gpu, &mut g, "x", &[b, t, c], &xd);
        let y = act(gpu, &mut g, "y", &[b, t, c], &yd);
        let m = act(gpu, &mut g, "m", &[b, 6 * c], &md);
        let out = elementwise::gated_residual(&mut g, x, ModChunk { m, index: 5 }, y).unwrap();
        g.keep(out);
        let got = run(gpu, g, &[out]);
        let r: Vec<f64> = (0..b * t * c)
            .map(|i| {
                let (bi, ci) = (i / (t * c), i % c);
                xd[i] as f64 + md[bi * 6 * c + 5 * c + ci] as f64 * yd[i] as f64
            })
            .collect();
        assert_close("gated_residual", &got[0], &r, tol(at));
    }

    pub fn softmax_rows_and_attention_softmax(gpu: &Gpu) {
        let (rows, n) = (7, 333);
        let xd: Vec<f32> = rand(80, rows * n).iter().map(|v| 8.0 * v).collect();
        let (b, h, t) = (2, 3, 6);
        let sd = rand(81, b * h * t * t);
        let bias = rand(82, h * t * t);
        let mut g = Graph::new(gpu.target());
        let at = g.act();
        let x = act(gpu, &mut g, "x", &[rows, n], &xd);
        let s = act(gpu, &mut g, "s", &[b, h, t, t], &sd);
        let bv = weight(gpu, &mut g, "bias", &[h, t, t], DType::F32, &bias);
        let y = softmax::softmax(&mut g, x).unwrap();
        let y2 = softmax::attention_softmax(&mut g, s, 0.3, true, Some(bv)).unwrap();
        g.keep(y);
        g.keep(y2);
        let got = run(gpu, g, &[y, y2]);
        let sm = |row: &[f64]| {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = row.iter().map(|v| (v - m).exp()).sum();
            row.iter().map(|v| (v - m).exp() / z).collect::<Vec<_>>()
        };
        let r: Vec<f64> = stored(&xd, at).chunks(n).flat_map(sm).collect();
        let mut r2 = Vec::new();
        for (row_i, row) in sd.chunks(t).enumerate() {
            let (qi, hi) = (row_i % t, (row_i / t) % h);
            let logits: Vec<f64> = row
                .iter()
                .enumerate()
                .map(|(j, &v)| {
                    if j > qi {
                        f64::NEG_INFINITY
                    } else {
                        v as f64 * 0.3f32 as f64 + bias[(hi * t + qi) * t + j] as f64
                    }
                })
                .collect();
            r2.extend(sm(&logits));
        }
        assert_close("softmax", &got[0], &r, tol(at));
        assert_close("attention_softmax causal+bias", &got[1], &r2, tol(at));
    }

    struct AttnCase {
        name: &'static str,
        batch: usize,
        heads: usize,
        tq: usize,
        tk: usize,
        fused_qkv: bool,
        scale: f32,
        causal: bool,
        bias: bool,
        qk_norm: bool,
    }

    pub fn attention_every_implementation(gpu: &Gpu) {
        let cases = [
            AttnCase {
                name: "joint qkv view + qk norm",
                batch: 2,
                heads: 2,
                tq: 103,
                tk: 103,
                fused_qkv: true,
                scale: 0.125,
                causal: false,
                bias: false,
                qk_norm: true,
            },
            AttnCase {
                name: "causal (CLIP)",
                batch: 1,
                heads: 3,
                tq: 77,
                tk: 77,
                fused_qkv: false,
                scale: 0.125,
                causal: true,
                bias: false,
                qk_norm: false,
            },
            AttnCase {
                name: "bias, scale 1 (T5)",
                batch: 2,
                heads: 2,
                tq: 40,
                tk: 40,
                fused_qkv: false,
                scale: 1.0,
                causal: false,
                bias: true,
                qk_norm: false,
            },
            AttnCase {
                name: "cross lengths",
                batch: 1,
                heads: 1,
                tq: 5,
                tk: 70,
                fused_qkv: false,
                scale: 0.125,
                causal: false,
                bias: false,
                qk_norm: false,
            },
            AttnCase {
                name: "many key tiles + qk norm",
                batch: 1,
                heads: 2,
                tq: 45,
                tk: 300,
                fused_qkv: false,
                scale: 0.125,
                causal: false,
                bias: false,
                qk_norm: true,
            },
            AttnCase {
                name: "one token",
                batch: 1,
                heads: 1,
                tq: 1,
                tk: 1,
                fused_qkv: false,
                scale: 0.125,
                causal: true,
                bias: false,
                qk_norm: false,
            },
        ];
        for (ci, c) in cases.iter().enumerate() {
            let w = c.heads * 64;
            let seed = 100 + 10 * ci as u64;
            let mut g = Graph::new(gpu.target());
            let at = g.act();
            let (qd, kd, vd, q, k, v);
            if c.fused_qkv {
                let d = rand(seed, c.batch * c.tq * 3 * w);
                let qkv = act(gpu, &mut g, "qkv", &[c.batch, c.tq, 3 * w], &d);
                q = Heads {
                    value: qkv,
                    col_offset: 0,
                };
                k = Heads {
                    value: qkv,
                    col_offset: w,
                };
                v = Heads {
                    value: qkv,
                    col_offset: 2 * w,
                };
                (qd, kd, vd) = (d.clone(), d.clone(), d);
            } else {
                qd = rand(seed, c.batch * c.tq * w);
                kd = rand(seed + 1, c.batch * c.tk * w);
                vd = rand(seed + 2, c.batch * c.tk * w);
                q = act(gpu, &mut g, "q", &[c.batch, c.tq, w], &qd).into();
                k = act(gpu, &mut g, "k", &[c.batch, c.tk, w], &kd).into();
                v = act(gpu, &mut g, "v", &[c.batch, c.tk, w], &vd).into();
            }
            let bias_d: Vec<f32> = rand(seed + 3, c.heads * c.tq * c.tk)
                .iter()
                .map(|x| 2.0 * x)
                .collect();
            let nq: Vec<f32> = rand(seed + 4, 64).iter().map(|x| 1.0 + 0.2 * x).collect();
            let nk: Vec<f32> = rand(seed + 5, 64).iter().map(|x| 1.0 + 0.2 * x).collect();
            let mut o = AttentionOptions::new(c.heads);
            o.scale = c.scale;
            o.causal = c.causal;
            if c.bias {
                o.bias = Some(weight(
                    gpu,
                    &mut g,
                    "bias",
                    &[c.heads, c.tq, c.tk],
                    DType::F32,
                    &bias_d,
                ));
            }
            if c.qk_norm {
                let a = weight(gpu, &mut g, "nq", &[64], DType::F32, &nq);
                let b = weight(gpu, &mut g, "nk", &[64], DType::F32, &nk);
                o.qk_norm = Some((a, b));
            }
            let call = attention::AttentionCall { q, k, v, o };
            let imps = implementations("attention", attention::IMPLEMENTATIONS, g.target(), &call);
            let outs: Vec<_> = imps
                .iter()
                .map(|imp| {
                    let y = imp.record(&mut g, &call).unwrap();
                    g.keep(y);
                    y
                })
                .collect();
            let got = run(gpu, g, &outs);
            let (q64, k64, v64) = (stored(&qd, at), stored(&kd, at), stored(&vd, at));
            let width = |fused| if fused { 3 * w } else { w };
            let view = |data, tokens, off| reference::View {
                data,
                tokens,
                width: width(c.fused_qkv),
                off,
            };
            let (bias64, nq64, nk64) = (f64s(&bias_d), f64s(&nq), f64s(&nk));
            let r = reference::attention(
                &view(&q64, c.tq, q.col_offset),
                &view(&k64, c.tk, k.col_offset),
                &view(&v64, c.tk, v.col_offset),
                c.batch,
                c.heads,
                c.scale as f64,
                c.causal,
                c.bias.then_some(&bias64[..]),
                c.qk_norm.then_some((&nq64[..], &nk64[..])),
            );
            for (imp, out) in imps.iter().zip(&got) {
                assert_close(
                    &format!("attention {}, {}", imp.name, c.name),
                    out,
                    &r,
                    tol(at),
                );
            }
        }
    }

    pub fn conv2d_every_implementation(gpu: &Gpu) {
        // (batch, cin, h, w, cout, k, stride, pad, f16 weights, bias, GroupNorm
        // (groups, SiLU) folded into the input)
        let cases = [
            (1, 3, 7, 6, 5, 3, 1, 1, false, true, None),
            (2, 4, 9, 8, 6, 3, 2, 1, true, true, Some((2, false))),
            (1, 5, 6, 5, 7, 1, 1, 0, false, false, None),
            (2, 16, 8, 6, 12, 2, 2, 0, true, true, None),
            (1, 512, 5, 4, 512, 3, 1, 1, true, true, Some((32, true))),
            (1, 128, 6, 5, 3, 3, 1, 1, false, true, None),
            (2, 64, 7, 9, 40, 3, 1, 1, true, true, Some((32, true))),
            (1, 6, 3, 3, 70, 1, 1, 0, false, false, Some((3, true))),
        ];
        for (i, &(n, cin, h, w, cout, k, stride, pad, f16w, with_bias, fold)) in
            cases.iter().enumerate()
        {
            let mut g = Graph::new(gpu.target());
            let at = g.act();
            let xd: Vec<f32> = rand(300 + i as u64, n * cin * h * w)
                .iter()
                .map(|v| 2.0 * v + 0.3)
                .collect();
            // Weights scaled by 1/sqrt(fan-in), as trained convs are.
            let scale = 1.0 / ((cin * k * k) as f32).sqrt();
            let wd: Vec<f32> = rand(310 + i as u64, cout * cin * k * k)
                .iter()
                .map(|v| v * scale)
                .collect();
            let bd = rand(320 + i as u64, cout);
            let gd: Vec<f32> = rand(330 + i as u64, cin)
                .iter()
                .map(|v| 1.0 + 0.2 * v)
                .collect();
            let betad = rand(340 + i as u64, cin);
            // f32 or f16 as the case says, and the file encodings kept
            // packed on the GPU (bf16, fp8) in turn on the f16 cases.
            let dt = match (f16w, i % 3) {
                (false, _) => DType::F32,
                (true, 0) => DType::BF16,
                (true, 1) => DType::F8E4M3,
                (true, _) => {
                    if i % 2 == 0 {
                        DType::F16
                    } else {
                        DType::F8E5M2
                    }
                }
            };
            let x = act(gpu, &mut g, "x", &[n, cin, h, w], &xd);
            let wv = weight(gpu, &mut g, "w", &[cout, cin, k, k], dt, &wd);
            let bv = with_bias.then(|| weight(gpu, &mut g, "b", &[cout], DType::F32, &bd));
            let norm = fold.map(|(groups, silu)| conv::GroupNormFold {
                groups,
                weight: weight(gpu, &mut g, "gamma", &[cin], DType::F32, &gd),
                bias: weight(gpu, &mut g, "beta", &[cin], DType::F32, &betad),
                eps: 1e-6,
                silu,
            });
            // Odd cases pad (pad, pad); even ones (0, 1) after, like the VAE downsampler.
            let pads = if i % 2 == 0 || pad == 0 {
                [pad, pad]
            } else {
                [0, 1]
            };
            let call = conv::conv_call(&g, x, wv, bv, stride, pads, norm).unwrap();
            let imps = implementations("conv2d", conv::IMPLEMENTATIONS, g.target(), &call);
            let outs: Vec<_> = imps
                .iter()
                .map(|imp| {
                    let y = imp.record(&mut g, &call).unwrap();
                    g.keep(y);
                    y
                })
                .collect();
            // The reference: GroupNorm (+SiLU) in f64, then the convolution.
            let mut input = stored(&xd, at);
            if let Some((groups, silu)) = fold {
                input = reference::group_norm(&input, cin, h * w, groups, &gd, &betad, silu);
            }
            let b64 = f64s(&bd);
            let (r, oh, ow) = reference::conv2d(
                &input,
                &stored(&wd, dt),
                with_bias.then_some(&b64[..]),
                n,
                cin,
                h,
                w,
                cout,
                k,
                stride,
                pads,
            );
            let got = run(gpu, g, &outs);
            for (imp, o) in imps.iter().zip(&got) {
                assert_eq!(o.len(), n * cout * oh * ow);
                assert_close(
                    &format!(
                        "conv {} {cin}->{cout} {k}x{k} s{stride} p{pads:?} on {h}x{w} norm {fold:?}",
                        imp.name
                    ),
                    o,
                    &r,
                    tol(at),
                );
            }
        }
    }

    pub fn upsample_nearest(gpu: &Gpu) {
        let (n, c, h, w) = (2, 3, 4, 5);
        let xd = rand(400, n * c * h * w);
        let mut g = Graph::new(gpu.target());
        let at = g.act();
        let x = act(gpu, &mut g, "x", &[n, c, h, w], &xd);
        let xd = round_to(&xd, at);
        let y = conv::upsample_nearest2x(&mut g, x).unwrap();
        g.keep(y);
        let got = run(gpu, g, &[y]);
        let mut r = Vec::new();
        for p in 0..n * c {
            for oy in 0..2 * h {
                for ox in 0..2 * w {
                    r.push(xd[(p * h + oy / 2) * w + ox / 2] as f64);
                }
            }
        }
        assert_close("upsample", &got[0], &r, 0.0);
    }

    pub fn permute_slice_concat(gpu: &Gpu) {
        let s = [2, 3, 4, 5];
        let xd = rand(500, 120);
        let yd = rand(501, 2 * 3 * 2 * 5);
        let mut g = Graph::new(gpu.target());
        let at = g.act();
        let x = act(gpu, &mut g, "x", &s, &xd);
        let y = act(gpu, &mut g, "y", &[2, 3, 2, 5], &yd);
        let (xh, yd) = (round_to(&xd, at), round_to(&yd, at));
        let p = layout::permute(&mut g, x, &[0, 2, 3, 1]).unwrap();
        let sl = layout::slice(&mut g, x, 2, 1, 2).unwrap();
        let cat = layout::concat(&mut g, x, y, 2).unwrap();
        let cat0 = layout::concat(&mut g, x, x, 0).unwrap();
        let h = weight(gpu, &mut g, "h", &[2, 3, 4, 5], DType::F16, &xd);
        let conv = layout::to_f32(&mut g, h).unwrap();
        let outs = [p, sl, cat, cat0, conv];
        for v in outs {
            g.keep(v);
        }
        let got = run(gpu, g, &outs);
        let el = |a: usize, b: usize, c: usize, d: usize| xh[((a * 3 + b) * 4 + c) * 5 + d] as f64;
        let mut rp = Vec::new();
        let mut rs = Vec::new();
        let mut rc = Vec::new();
        for a in 0..2 {
            for c in 0..4 {
                for d in 0..5 {
                    for b in 0..3 {
                        rp.push(el(a, b, c, d));
                    }
                }
            }
            for b in 0..3 {
                for c in 1..3 {
                    for d in 0..5 {
                        rs.push(el(a, b, c, d));
                    }
                }
                for c in 0..6 {
                    for d in 0..5 {
                        rc.push(if c < 4 {
                            el(a, b, c, d)
                        } else {
                            yd[((a * 3 + b) * 2 + c - 4) * 5 + d] as f64
                        });
                    }
                }
            }
        }
        let r0: Vec<f64> = f64s(&xh).iter().chain(f64s(&xh).iter()).cloned().collect();
        assert_close("permute", &got[0], &rp, 0.0);
        assert_close("slice", &got[1], &rs, 0.0);
        assert_close("concat axis 2", &got[2], &rc, 0.0);
        assert_close("concat axis 0", &got[3], &r0, 0.0);
        assert_close("f16 to f32", &got[4], &stored(&xd, DType::F16), 0.0);
    }

    pub fn gather_f32_f16_and_bad_ids(gpu: &Gpu) {
        let (rows, cols) = (50, 13);
        let td = rand(600, rows * cols);
        let ids_d = [3u32, 0, 49, 3, 17];
        let mut g = Graph::new(gpu.target());
        let at = g.act();
        let t32 = weight(gpu, &mut g, "t32", &[rows, cols], DType::F32, &td);
        let t16 = weight(gpu, &mut g, "t16", &[rows, cols], DType::F16, &td);
        let ids_t = sd3_wgpu::Tensor::from_u32(gpu, &[ids_d.len()], &ids_d).unwrap();
        let ids = g.weight("ids", &ids_t);
        let bad_t = sd3_wgpu::Tensor::from_u32(gpu, &[2], &[1, 50]).unwrap();
        let bad = g.weight("bad", &bad_t);
        let a = layout::gather(&mut g, t32, ids).unwrap();
        let b = layout::gather(&mut g, t16, ids).unwrap();
        let c = layout::gather(&mut g, t32, bad).unwrap();
        for v in [a, b, c] {
            g.keep(v);
        }
        let got = run(gpu, g, &[a, b, c]);
        let pick = |t: &[f64]| {
            ids_d
                .iter()
                .flat_map(|&i| t[i as usize * cols..][..cols].to_vec())
                .collect::<Vec<_>>()
        };
        // Outputs are stored in the activation type.
        let out = |v: Vec<f64>| stored(&v.iter().map(|&x| x as f32).collect::<Vec<_>>(), at);
        assert_close("gather f32", &got[0], &out(pick(&f64s(&td))), 0.0);
        assert_close(
            "gather f16",
            &got[1],
            &out(pick(&stored(&td, DType::F16))),
            0.0,
        );
        assert_close(
            "gather good id",
            &got[2][..cols],
            &out(f64s(&td[cols..2 * cols])),
            0.0,
        );
        assert!(
            got[2][cols..].iter().all(|v| v.is_nan()),
            "an id past the table must give NaN"
        );
        // Tables kept in a file's bf16 or fp8 encoding, decoded as gathered.
        for dtype in WEIGHT_TYPES.iter().copied().skip(2) {
            let mut g = Graph::new(gpu.target());
            let t = weight(gpu, &mut g, "t", &[rows, cols], dtype, &td);
            let ids = g.weight("ids", &ids_t);
            let y = layout::gather(&mut g, t, ids).unwrap();
            g.keep(y);
            let got = run(gpu, g, &[y]);
            assert_close(
                &format!("gather {dtype:?}"),
                &got[0],
                &out(pick(&stored(&td, dtype))),
                0.0,
            );
        }
    }

    pub fn patchify_layouts(gpu: &Gpu) {
        // tokens [b, h·w, p·p·c] → image [b, c, h·p, w·p], and NCHW → tokens.
        let (b, h, w, p, c) = (2, 3, 4, 2, 5);
        let td = rand(700, b * h * w * p * p * c);
        let mut g = Graph::new(gpu.target());
        let at = g.act();
        let t = act(gpu, &mut g, "t", &[b, h * w, p * p * c], &td);
        let td = round_to(&td, at);
        let img = layout::unpatchify(&mut g, t, h, w, p).unwrap();
        let back = layout::nchw_to_tokens(&mut g, img).unwrap();
        g.keep(img);
        g.keep(back);
        assert_eq!(g.shape(img), &[b, c, h * p, w * p]);
        assert_eq!(g.shape(back), &[b, h * p * w * p, c]);
        let got = run(gpu, g, &[img, back]);
        let mut r = vec![0.0; td.len()];
        for bi in 0..b {
            for hi in 0..h {
                for wi in 0..w {
                    for pi in 0..p {
                        for qi in 0..p {
                            for ci in 0..c {
                                let src = (((bi * h + hi) * w + wi) * p * p + pi * p + qi) * c + ci;
                                let dst =
                                    ((bi * c + ci) * h * p + hi * p + pi) * w * p + wi * p + qi;
                                r[dst] = td[src] as f64;
                            }
                        }
                    }
                }
            }
        }
        assert_close("unpatchify", &got[0], &r, 0.0);
        let (hh, ww) = (h * p, w * p);
        let mut r2 = Vec::new();
        for bi in 0..b {
            for y in 0..hh {
                for x in 0..ww {
                    for ci in 0..c {
                        r2.push(r[((bi * c + ci) * hh + y) * ww + x]);
                    }
                }
            }
        }
        assert_close("nchw_to_tokens", &got[1], &r2, 0.0);
    }

    pub fn random_fill_f32_and_f16(gpu: &Gpu) {
        fn pcg(v: u32) -> u32 {
            let state = v.wrapping_mul(747796405).wrapping_add(2891336453);
            let word = ((state >> ((state >> 28) + 4)) ^ state).wrapping_mul(277803737);
            (word >> 22) ^ word
        }
        let (n, seed, scale, shift) = (1001, 77u32, 0.5f32, 1.0f32);
        let reference: Vec<f64> = (0..n as u32)
            .map(|i| {
                let u = ((pcg(i ^ pcg(seed)) >> 8) as f32) * (1.0 / 16777216.0) * 2.0 - 1.0;
                (shift + scale * u) as f64
            })
            .collect();
        let mut g = Graph::new(gpu.target());
        let a = random::random_uniform(&mut g, &[7, 143], DType::F32, seed, scale, shift).unwrap();
        let b = random::random_uniform(&mut g, &[n], DType::F16, seed, scale, shift).unwrap();
        g.keep(a);
        g.keep(b);
        let got = run(gpu, g, &[a, b]);
        assert_close("random f32", &got[0], &reference, 1e-7);
        let r16: Vec<f64> = reference
            .iter()
            .map(|&v| half::f16::from_f64(v).to_f64())
            .collect();
        assert_close("random f16", &got[1], &r16, 0.0);
        let mean = got[0].iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        assert!((mean - 1.0).abs() < 0.05, "mean {mean}");
    }

    pub fn residual_adaln_fused_and_composed(gpu: &Gpu) {
        for (b, t, c) in [(2, 9, 40), (1, 3, 300), (2, 1, 7)] {
            let xd: Vec<f32> = rand(90, b * t * c).iter().map(|v| 2.0 * v + 0.3).collect();
            let yd = rand(91, b * t * c);
            let md = rand(92, b * 6 * c);
            let mut g = Graph::new(gpu.target());
            let at = g.act();
            let x = act(gpu, &mut g, "x", &[b, t, c], &xd);
            let y = act(gpu, &mut g, "y", &[b, t, c], &yd);
            let m = act(gpu, &mut g, "m", &[b, 6 * c], &md);
            let ch = |index| ModChunk { m, index };
            let (xo, ho) = norm::residual_adaln(&mut g, x, ch(2), y, ch(3), ch(4), 1e-6).unwrap();
            let xc = elementwise::gated_residual(&mut g, x, ch(2), y).unwrap();
            let hc = norm::adaln_modulate(&mut g, xc, ch(3), ch(4), 1e-6).unwrap();
            for v in [xo, ho, hc] {
                g.keep(v);
            }
            let got = run(gpu, g, &[xo, ho, hc]);
            let mut rx = Vec::new();
            let mut rh = Vec::new();
            for row in 0..b * t {
                let bi = row / t;
                let r: Vec<f64> = (0..c)
                    .map(|i| {
                        xd[row * c + i] as f64
                            + md[bi * 6 * c + 2 * c + i] as f64 * yd[row * c + i] as f64
                    })
                    .collect();
                let (mean, rstd) = reference::stats(&r, 1e-6);
                for (i, v) in r.iter().enumerate() {
                    let sh = md[bi * 6 * c + 3 * c + i] as f64;
                    let sc = md[bi * 6 * c + 4 * c + i] as f64;
                    rh.push((v - mean) * rstd * (1.0 + sc) + sh);
                }
                rx.extend(r);
            }
            assert_close(
                &format!("residual_adaln x {b}x{t}x{c}"),
                &got[0],
                &rx,
                tol(at),
            );
            assert_close(
                &format!("residual_adaln h {b}x{t}x{c}"),
                &got[1],
                &rh,
                tol(at),
            );
            assert_close(&format!("composed h {b}x{t}x{c}"), &got[2], &rh, tol(at));
        }
    }

    /// The sampler's update against the CPU sampler (guide, skip-layer term,
    /// Euler step, inpainting blend) in f64: plain, guided, guided with skip
    /// layers, and each with the inpainting blend (a mask of 0, 1 and a
    /// fraction, so that neither side of the blend can be dropped unseen).
    pub fn guided_euler_with_and_without_guidance(gpu: &Gpu) {
        let shape = [2, 3, 5, 7];
        let hw = shape[2] * shape[3];
        let n: usize = shape.iter().product();
        let (dt, w, scale, sigma) = (-0.137f32, 2.8f32, 4.5f32, 0.61f32);
        let cases = [(false, false), (true, false), (true, true)];
        for (case, ((guided, skip), blend)) in cases
            .into_iter()
            .flat_map(|c| [(c, false), (c, true)])
            .enumerate()
        {
            let seed = 900 + 10 * case as u64;
            let halves = if guided { 2 } else { 1 };
            let xd = rand(seed, n);
            let vd = rand(seed + 1, halves * n);
            let sd = rand(seed + 2, n);
            let kd = rand(seed + 3, 2 * n);
            let md: Vec<f32> = (0..hw).map(|i| [0.0, 1.0, 0.25][i % 3]).collect();
            let mut g = Graph::new(gpu.target());
            let at = g.act();
            let x = weight(gpu, &mut g, "x", &shape, DType::F32, &xd);
            let mut vshape = shape;
            vshape[0] *= halves;
            let v = act(gpu, &mut g, "v", &vshape, &vd);
            let vd = round_to(&vd, at);
            let step = weight(gpu, &mut g, "step", &[3], DType::F32, &[dt, w, sigma]);
            let s = skip.then(|| weight(gpu, &mut g, "skip", &shape, DType::F32, &sd));
            let ip = blend.then(|| sampler::Inpaint {
                known: weight(gpu, &mut g, "known", &[2, 2, 3, 5, 7], DType::F32, &kd),
                mask: weight(gpu, &mut g, "mask", &[5, 7], DType::F32, &md),
            });
            let y =
                sampler::guided_euler(&mut g, x, v, step, s, guided.then_some(scale), ip).unwrap();
            g.keep(y);
            let got = &run(gpu, g, &[y])[0];
            let want: Vec<f64> = (0..n)
                .map(|i| {
                    let u = vd[i] as f64;
                    let mut pred = u;
                    if guided {
                        let c = vd[n + i] as f64;
                        pred = u + scale as f64 * (c - u);
                        if skip {
                            pred += (c - sd[i] as f64) * w as f64;
                        }
                    }
                    let out = xd[i] as f64 + dt as f64 * pred;
                    if !blend {
                        return out;
                    }
                    let s = sigma as f64;
                    let proper = s * kd[n + i] as f64 + (1.0 - s) * kd[i] as f64;
                    let m = md[i % hw] as f64;
                    (1.0 - m) * proper + m * out
                })
                .collect();
            assert_close(
                &format!("guided_euler guided={guided} skip={skip} inpaint={blend}"),
                got,
                &want,
                tol(at),
            );
        }
    }

    /// w + b · a for every storage pair (f32 / f16 in, f32 / f16 out), with
    /// an odd column count so that packed f16 pairs straddle rows.
    pub fn lora_merge_f32_and_f16(gpu: &Gpu) {
        let (rows, cols, rank) = (37, 23, 5);
        for (case, (win, wout)) in [DType::F32, DType::F16]
            .into_iter()
            .flat_map(|a| [(a, DType::F32), (a, DType::F16)])
            .enumerate()
        {
            let seed = 950 + 10 * case as u64;
            let wd = rand(seed, rows * cols);
            let ad = rand(seed + 1, rank * cols);
            let bd = rand(seed + 2, rows * rank);
            let mut g = Graph::new(gpu.target());
            let w = weight(gpu, &mut g, "w", &[rows, cols], win, &wd);
            let a = weight(gpu, &mut g, "a", &[rank, cols], DType::F32, &ad);
            let b = weight(gpu, &mut g, "b", &[rows, rank], DType::F32, &bd);
            let y = lora::lora_merge(&mut g, w, a, b, wout).unwrap();
            g.keep(y);
            let got = &run(gpu, g, &[y])[0];
            let wd = round_to(&wd, win);
            let want: Vec<f64> = (0..rows * cols)
                .map(|e| {
                    let (o, j) = (e / cols, e % cols);
                    let d: f64 = (0..rank)
                        .map(|k| bd[o * rank + k] as f64 * ad[k * cols + j] as f64)
                        .sum();
                    wd[e] as f64 + d
                })
                .collect();
            let want = if wout == DType::F16 {
                want.iter()
                    .map(|&v| half::f16::from_f64(v).to_f64())
                    .collect()
            } else {
                want
            };
            let bound = if wout == DType::F16 { 1e-3 } else { 1e-6 };
            assert_close(&format!("lora_merge {win:?} → {wout:?}"), got, &want, bound);
        }
    }
}

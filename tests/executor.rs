//! The graph executor: buffer reuse by liveness keeps results intact, plans
//! replay with new inputs, profiles carry every label, and misuse is an error.

mod common;

use common::*;
use sd3_wgpu::graph::Graph;
use sd3_wgpu::ops::attention::{self, AttentionOptions, Heads};
use sd3_wgpu::ops::choice::{record_first, Implementation};
use sd3_wgpu::ops::elementwise::{self, Act};
use sd3_wgpu::ops::{linear, norm};
use sd3_wgpu::target::{CoopConfig, Feature, KernelChoice};
use sd3_wgpu::{DType, Error, Target};

/// x → 12 alternating ops, each result dead after the next op; the chain's
/// end must match the CPU while intermediates share few buffers.
#[test]
fn buffer_reuse_keeps_results_and_saves_memory() {
    let gpu = gpu();
    let (m, k) = (9, 20);
    let xd = rand(1, m * k);
    let wd: Vec<f32> = rand(2, k * k).iter().map(|v| v * 0.3).collect();
    let mut g = Graph::new(gpu.target());
    let x = g.input("x", &[m, k], DType::F32);
    let w = weight(gpu, &mut g, "w", &[k, k], DType::F32, &wd);
    let mut h = x;
    for i in 0..6 {
        h = g
            .scoped(&format!("layer{i}"), |g| {
                let a = linear::linear(g, h, w, None)?;
                let b = elementwise::activation(g, a, Act::Silu)?;
                elementwise::add(g, b, h)
            })
            .unwrap();
    }
    g.keep(h);
    let plan = g.plan(gpu).unwrap();
    assert!(
        plan.pooled_bytes() * 3 <= plan.unpooled_bytes(),
        "reuse: {} pooled bytes for {} bytes of intermediates",
        plan.pooled_bytes(),
        plan.unpooled_bytes()
    );
    let reference = |xd: &[f32]| {
        let mut hv: Vec<f64> = xd.iter().map(|&v| v as f64).collect();
        for _ in 0..6 {
            let mut next = vec![0.0; m * k];
            for r in 0..m {
                for c in 0..k {
                    let a: f64 = (0..k).map(|j| hv[r * k + j] * wd[c * k + j] as f64).sum();
                    next[r * k + c] = a / (1.0 + (-a).exp()) + hv[r * k + c];
                }
            }
            hv = next;
        }
        hv
    };
    // Replays: the same plan with new input data each time.
    for seed in [1, 7] {
        let xd = rand(seed, m * k);
        plan.fill_intermediates(gpu, f32::NAN);
        plan.write(gpu, x, &xd).unwrap();
        plan.run(gpu).unwrap();
        let out = plan.read(gpu, h).unwrap();
        assert_close(
            &format!("chain, input seed {seed}"),
            &out,
            &reference(&xd),
            TOL_F32,
        );
    }
    let _ = xd;
}

#[test]
fn profile_has_every_label_and_valid_chrome_trace() {
    let gpu = gpu();
    let mut g = Graph::new(gpu.target());
    let x = g.input("x", &[4, 64], DType::F32);
    let w = weight(gpu, &mut g, "w", &[32, 64], DType::F16, &rand(3, 32 * 64));
    let y = g
        .scoped("mmdit", |g| {
            g.scoped("block0", |g| {
                let n = g.scoped("norm1", |g| norm::layer_norm(g, x, None, None, 1e-6))?;
                g.scoped("qkv", |g| linear::linear(g, n, w, None))
            })
        })
        .unwrap();
    g.keep(y);
    let labels: Vec<String> = g.labels().iter().map(|s| s.to_string()).collect();
    assert_eq!(
        labels,
        ["mmdit.block0.norm1.layer_norm", "mmdit.block0.qkv.linear"]
    );
    let cost = g.cost();
    assert_eq!(cost.flops, 7 * 4 * 64 + 2 * 4 * 32 * 64, "counted FLOPs");
    let plan = g.plan(gpu).unwrap();
    plan.write(gpu, x, &rand(4, 256)).unwrap();
    let prof = plan.run_profiled(gpu).unwrap();
    let got: Vec<&str> = prof.entries.iter().map(|e| e.label.as_str()).collect();
    assert_eq!(got, labels);
    if gpu.caps.timestamps {
        assert!(
            prof.entries.iter().all(|e| e.gpu_ns.is_some()),
            "timestamps present but an op has no time"
        );
    }
    let table = prof.table(10);
    for l in &labels {
        assert!(
            table.contains(l.as_str()) || !gpu.caps.timestamps,
            "table lacks {l}:\n{table}"
        );
    }
    let trace: serde_json::Value =
        serde_json::from_str(&prof.chrome_trace()).expect("trace is JSON");
    let events = trace["traceEvents"].as_array().expect("traceEvents");
    assert_eq!(events.len(), 2);
    assert_eq!(events[1]["name"], "mmdit.block0.qkv.linear");
    assert_eq!(events[1]["ph"], "X");
    assert_eq!(events[1]["args"]["flops"], 2 * 4 * 32 * 64);
    // Profiling must not change results.
    let profiled = plan.read(gpu, y).unwrap();
    plan.run(gpu).unwrap();
    assert_eq!(profiled, plan.read(gpu, y).unwrap());
}

#[test]
fn reading_a_reused_intermediate_is_an_error() {
    let gpu = gpu();
    let mut g = Graph::new(gpu.target());
    let x = g.input("x", &[8], DType::F32);
    let a = elementwise::affine(&mut g, x, 2.0, 0.0).unwrap();
    let b = elementwise::affine(&mut g, a, 2.0, 0.0).unwrap();
    g.keep(b);
    let plan = g.plan(gpu).unwrap();
    let e = plan.read(gpu, a).unwrap_err().to_string();
    assert!(e.contains("not kept"), "{e}");
    let e = plan.write(gpu, x, &[1.0; 3]).unwrap_err().to_string();
    assert!(e.contains("needs 8 values, got 3"), "{e}");
}

#[test]
fn shape_errors_name_the_op_and_shapes() {
    let gpu = gpu();
    let mut g = Graph::new(gpu.target());
    let x = g.input("x", &[2, 7, 10], DType::F32);
    let w = weight(gpu, &mut g, "w", &[4, 12], DType::F32, &rand(1, 48));
    let e = g
        .scoped("mmdit", |g| {
            g.scoped("block2", |g| linear::linear(g, x, w, None))
        })
        .unwrap_err();
    let Error::Shape { op, msg } = &e else {
        panic!("expected a shape error, got {e}")
    };
    assert_eq!(op, "mmdit.block2.linear");
    assert!(
        msg.contains("[2, 7, 10]") && msg.contains("[4, 12]"),
        "{msg}"
    );
    let ids = g.input("ids", &[3], DType::U32);
    let e = elementwise::activation(&mut g, ids, Act::Silu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("must be f32 or f16, found u32"), "{e}");
    let e = g.reshape(x, &[5, 5]).unwrap_err().to_string();
    assert!(e.contains("cannot reshape"), "{e}");
}

#[test]
fn too_big_a_dispatch_is_refused_before_running() {
    let gpu = gpu();
    let mut g = Graph::new(gpu.target());
    // 65536 batches of a 1×1 product: one workgroup per batch in z, past the
    // 65535 every adapter allows.
    let x = g.input("x", &[65_536, 1, 4], DType::F32);
    let w = g.input("w", &[65_536, 1, 4], DType::F32);
    linear::batched_matmul(&mut g, x, w).unwrap();
    let e = g.validate(gpu).unwrap_err().to_string();
    assert!(e.contains("workgroups"), "{e}");
}

/// An op with three implementations: one needing cooperative matrix, one
/// refusing odd widths, one taking everything.
static TEST_IMPLEMENTATIONS: &[Implementation<sd3_wgpu::Value>] = &[
    Implementation {
        name: "needs-coop",
        needs: &[Feature::Coop],
        supports: |_, _| Ok(()),
        record: |g, x| elementwise::activation(g, *x, Act::Silu),
    },
    Implementation {
        name: "even-only",
        needs: &[],
        supports: |_, _| Err("only even widths".into()),
        record: |g, x| elementwise::activation(g, *x, Act::Silu),
    },
    Implementation {
        name: "plain",
        needs: &[],
        supports: |_, _| Ok(()),
        record: |g, x| elementwise::activation(g, *x, Act::Silu),
    },
];

#[test]
fn the_first_supported_implementation_is_recorded_and_named() {
    let gpu = gpu();
    let chosen = |t: Target| {
        let mut g = Graph::new(t);
        let x = g.input("x", &[3, 5], DType::F32);
        record_first(&mut g, "silu", TEST_IMPLEMENTATIONS, &x).unwrap();
        g.implementations()[0].to_string()
    };
    let mut t = gpu.target();
    t.kernels = KernelChoice::Auto;
    t.coop = Vec::new();
    assert_eq!(chosen(t.clone()), "plain", "no coop on this target");
    t.coop = vec![CoopConfig {
        m: 16,
        n: 16,
        k: 16,
        ab: "f16",
        c: "f32",
    }];
    assert_eq!(chosen(t.clone()), "needs-coop");
    t.kernels = KernelChoice::Portable;
    assert_eq!(
        chosen(t),
        "plain",
        "--kernels portable skips feature kernels"
    );
    // Attention: flash where the workgroup memory allows it, composed otherwise,
    // and the profile and trace say which ran.
    let attention_graph = |t: Target| {
        let mut g = Graph::new(t);
        let qkv = weight(
            gpu,
            &mut g,
            "qkv",
            &[1, 7, 3 * 64],
            DType::F32,
            &rand(9, 7 * 192),
        );
        let h = |col_offset| Heads {
            value: qkv,
            col_offset,
        };
        let y =
            attention::attention(&mut g, h(0), h(64), h(128), &AttentionOptions::new(1)).unwrap();
        g.keep(y);
        g
    };
    let g = attention_graph(gpu.target());
    assert!(g.implementations().iter().all(|i| *i == "flash"));
    let prof = g.plan(gpu).unwrap().run_profiled(gpu).unwrap();
    assert!(
        prof.table(5).contains("attention (flash)"),
        "{}",
        prof.table(5)
    );
    let trace: serde_json::Value = serde_json::from_str(&prof.chrome_trace()).unwrap();
    assert_eq!(trace["traceEvents"][0]["args"]["implementation"], "flash");
    let mut small = gpu.target();
    small.limits.max_compute_workgroup_storage_size = 8192;
    let g = attention_graph(small);
    assert!(
        !g.is_empty()
            && g.implementations()
                .iter()
                .all(|i| i.starts_with("composed"))
    );
}

/// Where the adapter has an f16 → f32 fragment configuration, GEMMs and
/// attention on f16 activations take the tensor-core implementations by
/// default, and f32 activations (the exact path) never do.
#[test]
fn tensor_cores_are_the_default_where_the_adapter_has_them() {
    let gpu = gpu();
    let mut t = gpu.target();
    t.activation = DType::F16;
    if let Err(why) = t.coop_fragment() {
        assert!(
            !required().contains(&Feature::Coop),
            "SD3_REQUIRE demands coop but: {why}"
        );
        eprintln!("skipped: {why}");
        return;
    }
    let chosen = |t: Target| {
        let mut g = Graph::new(t);
        let a = g.act();
        let qkv = g.input("qkv", &[1, 7, 3 * 64], a);
        let h = |col_offset| Heads {
            value: qkv,
            col_offset,
        };
        let y =
            attention::attention(&mut g, h(0), h(64), h(128), &AttentionOptions::new(1)).unwrap();
        let w = g.input("w", &[32, 64], DType::F16);
        linear::linear(&mut g, y, w, None).unwrap();
        g.implementations()
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(chosen(t.clone()), ["coop", "coop"]);
    // An f32 scope in an f16 graph (T5's residual stream, the VAE's f32
    // retry) is the exact path too.
    let mut g = Graph::new(t.clone());
    let x = g.input("x", &[5, 64], DType::F32);
    let w = g.input("w", &[32, 64], DType::F16);
    g.with_activation(DType::F32, |g| linear::linear(g, x, w, None))
        .unwrap();
    assert_eq!(g.implementations(), ["tiled"]);
    assert_eq!(g.act(), DType::F16, "the scope ends");
    t.activation = DType::F32;
    assert_eq!(chosen(t), ["flash", "tiled"]);
}

#[test]
fn features_demanded_by_sd3_require_are_present() {
    let t = gpu().target();
    for f in required() {
        assert!(
            t.has(f),
            "SD3_REQUIRE demands {} but the test adapter lacks it",
            f.name()
        );
    }
}

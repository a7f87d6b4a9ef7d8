//! The benchmark's architectures: graphs of the real models record and fit
//! a GPU's limits, and the FLOP counter agrees with a hand count.

mod common;

use sd3_wgpu::DType;

use sd3_wgpu::bench_arch::{record_graphs, Arch};

/// Limits of a typical discrete GPU under wgpu (NVIDIA, Vulkan).
fn gpu_limits() -> wgpu::Limits {
    wgpu::Limits {
        max_buffer_size: 1 << 40,
        max_storage_buffer_binding_size: (1u64 << 32) - 4,
        max_compute_workgroups_per_dimension: 65535,
        ..wgpu::Limits::default()
    }
}

#[test]
fn real_architectures_record_and_fit_gpu_limits_at_1024() {
    let gpu = common::gpu();
    for arch in [Arch::Sd3Medium, Arch::Sd35Medium, Arch::Sd35Large] {
        let g = record_graphs(gpu, arch, 1024, 1024, 2, DType::F16).unwrap();
        for (name, graph) in &g.graphs {
            graph
                .validate_limits(&gpu_limits())
                .unwrap_or_else(|e| panic!("{arch:?} {name}: {e}"));
        }
    }
}

#[test]
fn flop_counter_matches_a_hand_count_for_one_block() {
    let gpu = common::gpu();
    let g = record_graphs(gpu, Arch::Sd3Medium, 1024, 1024, 2, DType::F16).unwrap();
    let mmdit = &g.graphs.iter().find(|(n, _)| *n == "mmdit").unwrap().1;
    let mut linear = 0;
    let mut attention = 0;
    for (label, family, cost) in mmdit.op_costs() {
        if !label.starts_with("mmdit.block3.") {
            continue;
        }
        match family {
            "linear" => linear += cost.flops,
            "attention" => attention += cost.flops,
            _ => {}
        }
    }
    // Counted by hand, one line per matrix product of block 3 at 1024² with CFG:
    // (rows, inner, columns), each 2·rows·inner·columns FLOP. 4096 image tokens,
    // 333 context tokens (77 CLIP + 256 T5), hidden 1536, batch 2.
    let products: [(u64, u64, u64); 10] = [
        (2, 1536, 9216),        // x adaLN: SiLU(c) → 6 chunks of 1536
        (2, 1536, 9216),        // context adaLN
        (2 * 4096, 1536, 4608), // x qkv
        (2 * 333, 1536, 4608),  // context qkv
        (2 * 4096, 1536, 1536), // x proj
        (2 * 333, 1536, 1536),  // context proj
        (2 * 4096, 1536, 6144), // x fc1
        (2 * 4096, 6144, 1536), // x fc2
        (2 * 333, 1536, 6144),  // context fc1
        (2 * 333, 6144, 1536),  // context fc2
    ];
    let want_linear: u64 = products.iter().map(|(m, k, n)| 2 * m * k * n).sum();
    // Joint attention over 4429 tokens, 24 heads of 64, batch 2: per (sample,
    // head) q·kᵀ is (4429, 64, 4429) and p·v (4429, 4429, 64).
    let per_head: u64 = 2 * 4429 * 64 * 4429 + 2 * 4429 * 4429 * 64;
    let want_attention: u64 = 2 * 24 * per_head;
    assert_eq!(want_linear, 501_680_701_440, "the hand count itself");
    assert_eq!(linear, want_linear);
    assert_eq!(attention, want_attention);
    // Whole forward ≈ 8.9 TFLOP per sample (sd3-facts), batch 2 with CFG.
    let total = mmdit.cost().flops as f64 / 2.0;
    assert!(
        (total / 8.9e12 - 1.0).abs() < 0.05,
        "{total:.3e} FLOP per sample"
    );
}

/// The planner's peak per stage (each component loaded, run and freed in
/// turn) at 1024² with CFG: SD3 medium with T5, its matrices stored as fp8
/// (ComfyUI's `*_fp8_e4m3fn` files, kept packed on the GPU), fits 6 GiB;
/// fp8 halves the MMDiT's and T5's weights against f16.
#[test]
fn fp8_weights_plan_sd3_medium_with_t5_under_6_gib() {
    use sd3_wgpu::bench_arch::record_graphs_with;
    let gpu = common::gpu();
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let plan = |weights| {
        record_graphs_with(gpu, Arch::Sd3Medium, 1024, 1024, 2, DType::F16, weights).unwrap()
    };
    let (f16, fp8) = (plan(DType::F16), plan(DType::F8E4M3));
    let mut peak = 0f64;
    for ((name, a), (_, b)) in f16.graphs.iter().zip(&fp8.graphs) {
        let total = gib(b.weight_bytes() + b.pooled_bytes() + b.input_bytes());
        peak = peak.max(total);
        if *name == "t5" || *name == "mmdit" {
            let r = b.weight_bytes() as f64 / a.weight_bytes() as f64;
            eprintln!(
                "{name}: fp8 weights {:.2} GiB, {r:.2} of f16",
                gib(b.weight_bytes())
            );
            assert!((0.45..0.6).contains(&r), "{name}: fp8/f16 weights {r:.2}");
        }
    }
    eprintln!("SD3 medium + T5, fp8 matrices: peak {peak:.2} GiB");
    assert!(peak <= 6.0, "peak {peak:.2} GiB");
}

/// SD3.5 large with a Q4_0 MMDiT (GGUF) and an fp8 T5 plans under 6 GiB
/// per stage at 1024² with CFG; Q8_0 takes about half of f16.
#[test]
fn q4_0_mmdit_and_fp8_t5_plan_sd35_large_under_6_gib() {
    use sd3_wgpu::bench_arch::record_graphs_with;
    let gpu = common::gpu();
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let stage = |weights, name: &str| {
        let g =
            record_graphs_with(gpu, Arch::Sd35Large, 1024, 1024, 2, DType::F16, weights).unwrap();
        let s = &g.graphs.iter().find(|(n, _)| *n == name).unwrap().1;
        (s.weight_bytes(), s.pooled_bytes() + s.input_bytes())
    };
    let (w4, a4) = stage(DType::Q4_0, "mmdit");
    let (w8, _) = stage(DType::Q8_0, "mmdit");
    let (w16, _) = stage(DType::F16, "mmdit");
    let (t5w, t5a) = stage(DType::F8E4M3, "t5");
    let peak = gib(w4 + a4).max(gib(t5w + t5a));
    eprintln!(
        "SD3.5 large MMDiT weights: f16 {:.2}, q8_0 {:.2}, q4_0 {:.2} GiB; peak with an fp8 T5 {peak:.2} GiB",
        gib(w16),
        gib(w8),
        gib(w4)
    );
    assert!(peak <= 6.0, "peak {peak:.2} GiB");
    let r = w8 as f64 / w16 as f64;
    assert!((0.5..0.6).contains(&r), "q8_0/f16 {r:.2}");
}

/// SD3.5 large with Q8_0 matrices (8.2 GiB of MMDiT weights) plans within
/// `--vram-budget 6144` and `3072` by streaming blocks (the MMDiT's, and
/// T5's at 3 GiB) at 1024² with CFG; every stage's peak stays in budget.
#[test]
fn q8_0_sd35_large_streams_within_6_and_3_gib() {
    use sd3_wgpu::bench_arch::{plan_budget, record_graphs_with};
    let gpu = common::gpu();
    let g =
        record_graphs_with(gpu, Arch::Sd35Large, 1024, 1024, 2, DType::F16, DType::Q8_0).unwrap();
    for mib in [6144u64, 3072] {
        let budget = mib << 20;
        let plans = plan_budget(&g, budget).unwrap();
        for p in &plans {
            eprintln!(
                "{mib} MiB: {} peak {:.2} GiB, {}/{} blocks resident",
                p.name,
                p.peak as f64 / (1u64 << 30) as f64,
                p.resident,
                p.blocks
            );
            assert!(p.peak <= budget, "{mib} MiB: {p:?}");
        }
        let mmdit = plans.iter().find(|p| p.name == "mmdit").unwrap();
        assert!(
            mmdit.resident > 0 && mmdit.resident < mmdit.blocks,
            "{mmdit:?}: nothing streamed, or nothing kept"
        );
        // The budget is used, not left idle.
        assert!(mmdit.peak as f64 >= 0.9 * budget as f64, "{mmdit:?}");
        let t5 = plans.iter().find(|p| p.name == "t5").unwrap();
        assert_eq!(t5.resident < t5.blocks, mib == 3072, "{t5:?}");
    }
    // A budget below one step's activations and two block slots is an error.
    let e = plan_budget(&g, 512 << 20).unwrap_err().to_string();
    assert!(e.contains("too small"), "{e}");
}

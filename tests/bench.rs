//! The benchmark's architectures: graphs of the real models record and fit
//! a GPU's limits, and the FLOP counter agrees with a hand count.

mod common;

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
        let g = record_graphs(gpu, arch, 1024, 1024, 2).unwrap();
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
    let g = record_graphs(gpu, Arch::Sd3Medium, 1024, 1024, 2).unwrap();
    let mmdit = &g.graphs.iter().find(|(n, _)| *n == "mmdit").unwrap().1;
    let (b, h, x, c) = (2u64, 1536u64, 4096u64, 333u64);
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
    // Per stream: qkv 3h², proj h², MLP 8h² per token; adaLN: 6h² per sample and stream.
    let want_linear = 2 * b * (12 * h * h * (x + c)) + 2 * b * (6 * h * h) * 2;
    let t = x + c;
    let want_attention = 4 * b * 24 * t * t * 64;
    assert_eq!(linear, want_linear);
    assert_eq!(attention, want_attention);
    // Whole forward ≈ 8.9 TFLOP per sample (sd3-facts), batch 2 with CFG.
    let total = mmdit.cost().flops as f64 / 2.0;
    assert!(
        (total / 8.9e12 - 1.0).abs() < 0.05,
        "{total:.3e} FLOP per sample"
    );
}

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

//! Models against diffusers fixtures (tools/make_fixtures.py).

mod common;

use std::path::PathBuf;

use common::*;
use sd3_wgpu::models::mmdit::{Mmdit, MmditRun};
use sd3_wgpu::weights::mmdit::{Layout, MmditSource};
use sd3_wgpu::weights::Checkpoint;
use sd3_wgpu::DType;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// Runs the fixture's two forward passes through the model at `path` and
/// returns the worst relative error.
fn mmdit_error(variant: &str, path: &std::path::Path, matrix: DType) -> f64 {
    let gpu = gpu();
    let src = MmditSource::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let model = Mmdit::load(gpu, &src, matrix).unwrap();
    let io = Checkpoint::open(&[fixture(&format!("mmdit/{variant}_io.safetensors"))]).unwrap();
    let mut worst: f64 = 0.0;
    for case in 0..2 {
        let get = |k: &str| io.read_f32(&format!("case{case}.{k}")).unwrap();
        let (xs, x) = get("x");
        let (cs, ctx) = get("context");
        let (_, pooled) = get("pooled");
        let (_, t) = get("t");
        let (_, want) = get("out");
        let run = MmditRun::new(gpu, &model, xs[0], xs[2], xs[3], cs[1]).unwrap();
        let got = run.run(gpu, &x, &ctx, &pooled, &t).unwrap();
        let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
        let e = rel_err(&got, &want);
        eprintln!(
            "{variant} {} case {case} ({}x{}): rel err {e:.2e}",
            path.display(),
            xs[2],
            xs[3]
        );
        worst = worst.max(e);
    }
    worst
}

#[test]
fn mmdit_matches_diffusers_in_both_layouts_for_every_variant() {
    for variant in ["sd3", "sd35m", "sd35l"] {
        for path in [
            fixture(&format!("mmdit/{variant}.safetensors")),
            fixture(&format!("mmdit/{variant}")),
        ] {
            let e = mmdit_error(variant, &path, DType::F32);
            assert!(
                e <= 1e-4,
                "{variant} from {}: relative error {e:.3e} > 1e-4",
                path.display()
            );
        }
    }
}

#[test]
fn mmdit_with_f16_matrices_stays_within_bound() {
    // sd3's fixture matrices are f32, so f16 storage really rounds them.
    let e = mmdit_error("sd3", &fixture("mmdit/sd3"), DType::F16);
    assert!(
        e > 1e-6,
        "f16 matrices should differ measurably from f32 ({e:.3e})"
    );
    assert!(e <= 3e-3, "f16 matrices: relative error {e:.3e} > 3e-3");
}

#[test]
fn mmdit_variants_are_detected_from_tensors() {
    let single = MmditSource::open(&fixture("mmdit/sd35m.safetensors")).unwrap();
    assert_eq!(
        single.layout,
        Layout::SingleFile {
            prefix: "model.diffusion_model.".into()
        }
    );
    let c = &single.config;
    assert_eq!(
        (
            c.depth,
            c.hidden,
            c.heads,
            c.patch,
            c.in_channels,
            c.out_channels
        ),
        (2, 128, 2, 2, 16, 16)
    );
    assert_eq!((c.context_dim, c.pooled_dim, c.pos_embed_max), (96, 64, 16));
    assert!(c.qk_norm);
    assert_eq!(c.dual_attention_layers, vec![0]);
    let folder = MmditSource::open(&fixture("mmdit/sd35m")).unwrap();
    assert_eq!(folder.layout, Layout::Diffusers);
    assert_eq!(&folder.config, c);
    assert_eq!(
        folder.ck.files.len(),
        3,
        "sharded folder: every shard opened"
    );
    let sd3 = MmditSource::open(&fixture("mmdit/sd3.safetensors")).unwrap();
    assert!(!sd3.config.qk_norm && sd3.config.dual_attention_layers.is_empty());
    assert_eq!(sd3.config.variant_name(), "custom MMDiT");
}

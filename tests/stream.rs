//! Layer streaming under `--vram-budget`: the MMDiT's blocks that do not fit
//! take turns in GPU slots, and the result is the same, bit for bit.

mod common;

use common::pipeline_folder;
use sd3_wgpu::bench_arch::Arch;
use sd3_wgpu::denoise::{DenoiseOptions, Denoiser, SkipLayers};
use sd3_wgpu::gpu::profile::Profile;
use sd3_wgpu::models::mmdit::Mmdit;
use sd3_wgpu::pipeline::{GenerateRequest, Pipeline, PipelineOptions};
use sd3_wgpu::sampler::FlowMatchEuler;
use sd3_wgpu::stream::choose_resident;
use sd3_wgpu::weights::mmdit::MmditConfig;
use sd3_wgpu::weights::RandomWeights;
use sd3_wgpu::{DType, Gpu, GpuOptions};

fn options(budget: Option<u64>, dtype: DType) -> PipelineOptions {
    PipelineOptions {
        dtype,
        keep_loaded: true,
        vram_budget: budget,
        ..PipelineOptions::default()
    }
}

fn request() -> GenerateRequest {
    let mut r = GenerateRequest::new("a photo of a cat");
    r.negative_prompt = "blurry".into();
    (r.width, r.height, r.steps, r.cfg, r.seed) = (Some(20), Some(12), Some(3), Some(5.0), 4);
    r.max_t5_tokens = 32;
    r.profile = true;
    r
}

/// The tiny architecture, 9 blocks deep, the first four with dual
/// attention: three block layouts (dual, plain, the last's pre-only
/// context stream), four blocks in each of the first two so that both
/// slots of a layout take turns.
fn deep_config() -> MmditConfig {
    let mut c = Arch::Tiny.spec().mmdit;
    c.depth = 9;
    c.dual_attention_layers = vec![0, 1, 2, 3];
    c
}

/// A fresh device (the memory counter sees only this test's buffers).
fn device(dtype: DType) -> Gpu {
    Gpu::new(&GpuOptions {
        f16_activations: dtype == DType::F16,
        ..GpuOptions::from_env()
    })
    .unwrap()
}

/// Each block's (bytes, layout group) and the bytes outside the blocks.
fn sizes(m: &mut Mmdit, total: u64) -> (u64, Vec<(u64, usize)>) {
    block_sizes(
        m.joint_blocks.iter_mut().map(|b| b.tensors_mut()).collect(),
        total,
    )
}

/// [`sizes`] of any model's blocks, from their buffers.
fn block_sizes(tensors: Vec<Vec<&mut sd3_wgpu::Tensor>>, total: u64) -> (u64, Vec<(u64, usize)>) {
    let mut layouts: Vec<Vec<(DType, u64)>> = Vec::new();
    let blocks: Vec<(u64, usize)> = tensors
        .into_iter()
        .map(|b| {
            let layout: Vec<(DType, u64)> = b.iter().map(|t| (t.dtype, t.buffer.size())).collect();
            let bytes = layout.iter().map(|l| l.1).sum();
            let g = layouts
                .iter()
                .position(|l| *l == layout)
                .unwrap_or_else(|| {
                    layouts.push(layout);
                    layouts.len() - 1
                });
            (bytes, g)
        })
        .collect();
    (total - blocks.iter().map(|b| b.0).sum::<u64>(), blocks)
}

/// Three denoising steps with CFG (and skip-layer guidance): the latents,
/// and the first step's profile.
fn denoise(gpu: &Gpu, m: &Mmdit, slg: bool) -> (Vec<f32>, Profile) {
    let c = &m.config;
    let (b2, tokens, side) = (2, 6, 4);
    let d = Denoiser::new(
        gpu,
        m,
        &DenoiseOptions {
            batch: 1,
            height: side,
            width: side,
            tokens,
            guidance: 4.0,
            skip_layers: slg.then(|| SkipLayers {
                layers: vec![4],
                scale: 2.8,
                start: 0.0,
                stop: 1.0,
            }),
            inpaint: false,
            control: Vec::new(),
        },
    )
    .unwrap();
    let context = common::rand(1, b2 * tokens * c.context_dim);
    let pooled = common::rand(2, b2 * c.pooled_dim);
    d.set_conditioning(gpu, &context, &pooled).unwrap();
    d.set_latents(gpu, &common::rand(3, c.in_channels * side * side))
        .unwrap();
    let mut profile = None;
    d.run(
        gpu,
        &FlowMatchEuler::new(3, 3.0),
        0,
        &|i| i == 0,
        &mut |_, p| {
            if p.is_some() {
                profile = p;
            }
            Ok(())
        },
    )
    .unwrap();
    (d.latents(gpu).unwrap(), profile.unwrap())
}

fn streamed_equals_resident(dtype: DType, slg: bool) {
    let c = deep_config();
    let w = RandomWeights { seed: 7 };
    let gpu = device(dtype);
    let mut m = Mmdit::load_from(&gpu, &c, &w, dtype).unwrap();
    let weights = gpu.memory.current();
    gpu.memory.reset_peak();
    let (want, plain) = denoise(&gpu, &m, slg);
    assert!(plain.uploads.is_none());
    // What a run needs beside the weights (the denoiser's plans).
    let act = gpu.memory.peak() - weights;
    let (other, blocks) = sizes(&mut m, weights);
    let largest = blocks.iter().map(|b| b.0).max().unwrap();
    drop(m);
    let mut seen = Vec::new();
    for wanted in [0, 1, 2, 5] {
        let budget = budget_for(other + act, &blocks, wanted);
        let (r, peak) = choose_resident(other + act, &blocks, budget).unwrap();
        if seen.contains(&r) {
            continue;
        }
        seen.push(r);
        let gpu = device(dtype);
        gpu.memory.reset_peak();
        let m = Mmdit::load_budgeted(&gpu, &c, &w, dtype, Some((budget, act))).unwrap();
        let load_peak = gpu.memory.peak();
        let held = gpu.memory.current();
        assert!(
            held + act <= budget && held + act <= peak + 64,
            "{held} held + {act}, budget {budget}, plan {peak}"
        );
        let stream = m.stream().expect("blocks streamed");
        assert_eq!(stream.blocks(), (r..c.depth).collect::<Vec<_>>());
        gpu.memory.reset_peak();
        let (got, profile) = denoise(&gpu, &m, slg);
        assert!(
            got == want,
            "{r} resident blocks ({dtype:?}, slg {slg}): the latents differ from the resident run"
        );
        // The run stays within the budget; loading holds at most two blocks
        // more for a moment (the block being read back, and its copy).
        assert!(
            gpu.memory.peak() <= budget,
            "{r} resident: run peak {} over the budget {budget}",
            gpu.memory.peak()
        );
        assert!(
            load_peak <= budget + 2 * largest,
            "{r} resident: load peak {load_peak} over the budget {budget} + two blocks"
        );
        let up = profile.uploads.expect("upload counters");
        assert!(up.blocks > 0 && up.bytes > 0, "{up:?}");
        assert!(profile.table(0).contains("streamed weights"));
    }
    assert!(seen.len() >= 3, "budgets gave resident counts {seen:?}");
}

/// The smallest budget (in steps of 64 bytes) that keeps `resident` blocks
/// resident.
fn budget_for(fixed: u64, blocks: &[(u64, usize)], resident: usize) -> u64 {
    let mut b = fixed;
    loop {
        if let Ok((r, _)) = choose_resident(fixed, blocks, b) {
            if r >= resident {
                return b;
            }
        }
        b += 64;
    }
}

#[test]
fn streamed_blocks_give_the_same_bits() {
    streamed_equals_resident(DType::F32, false);
}

#[test]
fn streamed_blocks_with_f16_and_skip_layer_guidance() {
    // The skip-layer pass runs the streamed blocks a second time per step.
    streamed_equals_resident(DType::F16, true);
}

#[test]
fn streamed_text_encoder_layers_give_the_same_bits() {
    use sd3_wgpu::models::{clip, t5};
    let spec = Arch::Tiny.spec();
    let mut t5c = spec.t5.clone();
    t5c.layers = 6;
    let mut clipc = spec.clip_g.clone();
    clipc.layers = 6;
    let w = RandomWeights { seed: 11 };
    let dtype = DType::F16;
    let t5_ids: Vec<Vec<u32>> = (0..2)
        .map(|b| (0..9).map(|i| (i * 7 + b) % 100).collect())
        .collect();
    let clip_ids: Vec<Vec<u32>> = (0..2)
        .map(|b| (0..77).map(|i| ((i * 5 + b) % 900) as u32).collect())
        .collect();

    let gpu = device(dtype);
    let mut m = t5::T5::load_from(&gpu, &t5c, "shared.weight", &w, dtype).unwrap();
    let want = t5::encode(&gpu, &m, &t5_ids).unwrap();
    let (other, blocks) = block_sizes(
        m.blocks.iter_mut().map(|b| b.tensors_mut()).collect(),
        gpu.memory.current(),
    );
    drop(m);
    let budget = budget_for(other, &blocks, 0);
    let gpu = device(dtype);
    let m =
        t5::T5::load_budgeted(&gpu, &t5c, "shared.weight", &w, dtype, Some((budget, 0))).unwrap();
    assert!(gpu.memory.current() <= budget);
    assert_eq!(
        m.blocks[5].wo.weight.stream.as_ref().map(|r| r.block),
        Some(5)
    );
    assert!(
        t5::encode(&gpu, &m, &t5_ids).unwrap() == want,
        "T5 streamed differs"
    );

    let gpu = device(dtype);
    let mut m = clip::Clip::load_from(&gpu, &clipc, &w, dtype).unwrap();
    let want = clip::encode(&gpu, &m, &clip_ids).unwrap();
    let (other, blocks) = block_sizes(
        m.layers.iter_mut().map(|b| b.tensors_mut()).collect(),
        gpu.memory.current(),
    );
    drop(m);
    let budget = budget_for(other, &blocks, 0);
    let gpu = device(dtype);
    let m = clip::Clip::load_budgeted(&gpu, &clipc, &w, dtype, Some((budget, 0))).unwrap();
    assert!(gpu.memory.current() <= budget);
    assert!(m.layers[5].fc2.weight.stream.is_some());
    assert!(
        clip::encode(&gpu, &m, &clip_ids).unwrap() == want,
        "CLIP streamed differs"
    );
}

#[test]
fn a_generous_budget_streams_nothing_and_changes_nothing() {
    let dir = pipeline_folder("sd3");
    let plain = Pipeline::load(&dir, options(None, DType::F32)).unwrap();
    let want = plain.generate(&request(), &mut |_, _| {}).unwrap();
    let pipe = Pipeline::load(&dir, options(Some(1 << 40), DType::F32)).unwrap();
    let out = pipe.generate(&request(), &mut |_, _| {}).unwrap();
    assert!(out.streamed_blocks.is_empty());
    // Under a budget nothing is kept between generations: a second one
    // loads everything again and gives the same latents.
    let again = pipe.generate(&request(), &mut |_, _| {}).unwrap();
    assert!(again.latents == want.latents);
    assert!(out.latents == want.latents);
    assert!(out.profile.unwrap().uploads.is_none());
}

#[test]
fn a_budget_too_small_is_an_error_naming_the_numbers() {
    let dir = pipeline_folder("sd3");
    let pipe = Pipeline::load(&dir, options(Some(1 << 10), DType::F32)).unwrap();
    let e = pipe
        .generate(&request(), &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("too small") && e.contains("MiB"), "{e}");
}

#[test]
fn choose_resident_keeps_the_longest_prefix_that_fits() {
    let blocks = [(100, 0), (100, 0), (100, 0), (100, 0), (40, 1)];
    // Everything resident: 10 + 440.
    assert_eq!(choose_resident(10, &blocks, 450).unwrap(), (5, 450));
    // Streaming blocks 2..5 costs as much as keeping them (two slots of 100
    // and one of 40); from block 1 on it saves one block.
    assert_eq!(
        choose_resident(10, &blocks, 449).unwrap(),
        (1, 10 + 100 + 200 + 40)
    );
    assert_eq!(
        choose_resident(10, &blocks, 349).unwrap(),
        (0, 10 + 200 + 40)
    );
    let e = choose_resident(10, &blocks, 249).unwrap_err().to_string();
    assert!(e.contains("too small"), "{e}");
}

/// The sd3 fixture pipeline with the 9-block transformer of
/// `tools/make_fixtures.py stream` in place of its own.
fn deep_pipeline() -> std::path::PathBuf {
    let dir = pipeline_folder("sd3");
    std::fs::remove_dir_all(dir.join("transformer")).unwrap();
    common::copy_dir(
        &common::fixtures_dir().join("stream/transformer"),
        &dir.join("transformer"),
    );
    dir
}

#[test]
fn the_pipeline_streams_under_a_budget_and_makes_the_same_image() {
    let dir = deep_pipeline();
    let dtype = DType::F16;
    let mut req = request();
    req.slg_layers = vec![5];
    req.slg_stop = 0.9;
    let plain = Pipeline::load(&dir, options(None, dtype)).unwrap();
    let want = plain.generate(&req, &mut |_, _| {}).unwrap();
    let act = plain.step_activation_bytes(&req).unwrap();
    drop(plain);
    let gpu = device(dtype);
    let src = sd3_wgpu::weights::mmdit::MmditSource::open(&dir).unwrap();
    let mut m = Mmdit::load(&gpu, &src, dtype).unwrap();
    let (other, blocks) = sizes(&mut m, gpu.memory.current());
    drop(m);
    let budget = budget_for(other + act, &blocks, 2);
    let (r, _) = choose_resident(other + act, &blocks, budget).unwrap();
    eprintln!("budget {budget}: {r} of {} blocks resident", blocks.len());
    let pipe = Pipeline::load(&dir, options(Some(budget), dtype)).unwrap();
    let out = pipe.generate(&req, &mut |_, _| {}).unwrap();
    assert_eq!(out.streamed_blocks, (r..blocks.len()).collect::<Vec<_>>());
    assert!(out.latents == want.latents, "streamed latents differ");
    assert_eq!(out.images, want.images);
    assert!(out.profile.unwrap().uploads.unwrap().blocks > 0);
    // Every stage (text encoders, MMDiT, VAE) within the budget, but for
    // loading's moment of up to two blocks more.
    let largest = blocks.iter().map(|b| b.0).max().unwrap();
    assert!(
        out.peak_memory <= budget + 2 * largest,
        "peak {} over the budget {budget}",
        out.peak_memory
    );
}

//! End to end against diffusers' StableDiffusion3Pipeline (tiny random models).

mod common;

use std::path::PathBuf;

use common::pipeline_folder;
use sd3_wgpu::pipeline::{GenerateRequest, Latents, Pipeline, PipelineOptions};
use sd3_wgpu::weights::Checkpoint;
use sd3_wgpu::DType;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn request() -> GenerateRequest {
    let j: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("pipeline/request.json")).unwrap(),
    )
    .unwrap();
    let mut r = GenerateRequest::new(j["prompt"].as_str().unwrap());
    r.negative_prompt = j["negative_prompt"].as_str().unwrap().into();
    r.steps = Some(j["steps"].as_u64().unwrap() as usize);
    r.cfg = Some(j["cfg"].as_f64().unwrap() as f32);
    r.width = Some(j["width"].as_u64().unwrap() as usize);
    r.height = Some(j["height"].as_u64().unwrap() as usize);
    r.max_t5_tokens = j["max_t5_tokens"].as_u64().unwrap() as usize;
    r
}

/// A fixture's latents as f64, the reference of a comparison.
fn latents(io: &Checkpoint, key: &str) -> Vec<f64> {
    io.read_f32(key)
        .unwrap()
        .1
        .iter()
        .map(|&v| v as f64)
        .collect()
}

fn f32_options() -> PipelineOptions {
    PipelineOptions {
        dtype: DType::F32,
        ..PipelineOptions::default()
    }
}

fn check(variant: &str, with_t5: bool) {
    check_with(variant, with_t5, f32_options(), 1e-3, 1);
}

/// Runs the fixture's request with `options`; the final latents must be within
/// `bound` of diffusers' and 99.9 % of the pixels within `pixel` / 255.
/// Returns the latents' relative error.
fn check_with(
    variant: &str,
    with_t5: bool,
    options: PipelineOptions,
    bound: f64,
    pixel: u8,
) -> f64 {
    let dir = pipeline_folder(variant);
    let io =
        Checkpoint::open(&[fixtures().join(format!("pipeline/{variant}/pipeline_io.safetensors"))])
            .unwrap();
    let key = if with_t5 { "t5" } else { "no_t5" };
    let pipe = Pipeline::load(
        &dir,
        PipelineOptions {
            no_t5: !with_t5,
            ..options
        },
    )
    .unwrap();
    let mut req = request();
    let (shape, data) = io.read_f32("init_latents").unwrap();
    req.init_latents = Some(Latents { shape, data });
    let mut steps = Vec::new();
    let out = pipe.generate(&req, &mut |s, n| steps.push((s, n))).unwrap();
    assert_eq!(steps.last(), Some(&(4, 4)));
    let want = latents(&io, &format!("{key}.latents"));
    let e = common::rel_err(&out.latents, &want);
    eprintln!(
        "{variant} {key} {:?}: final latents rel err {e:.2e}",
        pipe.gpu.activation
    );
    assert!(
        e <= bound,
        "{variant} {key}: final latents relative error {e:.3e}"
    );
    let rgb = io
        .tensors
        .get(&format!("{key}.rgb8"))
        .map(|t| io.bytes(t).unwrap())
        .unwrap();
    let ours = &out.images[0];
    assert_eq!(ours.len(), rgb.len());
    let close = ours
        .iter()
        .zip(&rgb)
        .filter(|(a, b)| a.abs_diff(**b) <= pixel)
        .count();
    let worst = ours
        .iter()
        .zip(&rgb)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    eprintln!("{variant} {key}: worst pixel off by {worst}/255");
    assert!(
        close as f64 >= 0.999 * rgb.len() as f64,
        "{variant} {key}: {close} of {} pixels within {pixel}/255",
        rgb.len()
    );
    let _ = std::fs::remove_dir_all(dir);
    e
}

#[test]
fn sd3_matches_diffusers_with_and_without_t5() {
    check("sd3", true);
    check("sd3", false);
}

/// `--dtype f16` as users run it (f16 matrices, f16 activations where the
/// adapter has SHADER_F16) against diffusers' f32 run. The bound per variant
/// is twice what PyTorch's own float16 does on the same fixture
/// (tools/half_precision_reference.py: sd3 1.65e-2 with T5 and 1.47e-2
/// without, SD3.5 medium 2.1e-3, SD3.5 large 2.6e-3; bfloat16 is 10× worse).
#[test]
fn f16_pipelines_stay_within_twice_pytorch_fp16() {
    if common::f16_gpu().is_none() {
        eprintln!("skipped: the adapter has no SHADER_F16");
        return;
    }
    let f16 = || PipelineOptions {
        dtype: DType::F16,
        ..PipelineOptions::default()
    };
    let cases = [
        ("sd3", true, 1.65e-2),
        ("sd3", false, 1.47e-2),
        ("sd35m", true, 2.1e-3),
        ("sd35l", true, 2.6e-3),
    ];
    for (variant, t5, pytorch_fp16) in cases {
        check_with(variant, t5, f16(), 2.0 * pytorch_fp16, F16_PIXEL);
    }
}

/// Pixels within this many 1/255 steps of diffusers' f32 image (measured
/// worst: 7 for sd3 with T5, whose latents differ most; 10 with the
/// tensor-core GEMM of the Mesa 26 lane).
const F16_PIXEL: u8 = 12;

#[test]
fn sd35_medium_matches_diffusers() {
    check("sd35m", true);
}

#[test]
fn skip_layer_guidance_matches_diffusers() {
    let dir = pipeline_folder("sd35m");
    let io =
        Checkpoint::open(&[fixtures().join("pipeline/sd35m/pipeline_io.safetensors")]).unwrap();
    let pipe = Pipeline::load(&dir, f32_options()).unwrap();
    let mut req = request();
    let (shape, data) = io.read_f32("init_latents").unwrap();
    req.init_latents = Some(Latents { shape, data });
    req.slg_layers = vec![1];
    req.slg_stop = 0.6;
    let out = pipe.generate(&req, &mut |_, _| {}).unwrap();
    let want = latents(&io, "slg.latents");
    let plain = latents(&io, "t5.latents");
    let e = common::rel_err(&out.latents, &want);
    assert!(e <= 1e-3, "skip-layer guidance: relative error {e:.3e}");
    assert!(
        common::rel_err(&out.latents, &plain) > 1e-2,
        "skip-layer guidance changed nothing"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sd35_large_matches_diffusers() {
    check("sd35l", true);
    check("sd35l", false);
}

#[test]
fn repeated_generation_does_not_grow_gpu_memory() {
    let dir = pipeline_folder("sd3");
    let pipe = Pipeline::load(
        &dir,
        PipelineOptions {
            keep_loaded: true,
            ..f32_options()
        },
    )
    .unwrap();
    let mut req = request();
    req.steps = Some(1);
    let mut after = Vec::new();
    for seed in 0..20 {
        req.seed = seed;
        pipe.generate(&req, &mut |_, _| {}).unwrap();
        after.push(pipe.gpu.memory.current());
    }
    assert!(
        after.iter().all(|&m| m == after[0]),
        "GPU memory after each run: {after:?}"
    );
    // Without keep_loaded, nothing stays behind at all.
    let pipe2 = Pipeline::load(&dir, f32_options()).unwrap();
    pipe2.generate(&req, &mut |_, _| {}).unwrap();
    assert_eq!(pipe2.gpu.memory.current(), 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_denoising_loop_reads_the_latents_back_once() {
    let dir = pipeline_folder("sd35m");
    let pipe = Pipeline::load(&dir, f32_options()).unwrap();
    let mut req = request();
    // Skip-layer guidance too: its pass also stays on the GPU.
    req.slg_layers = vec![0];
    req.slg_start = 0.0;
    req.slg_stop = 1.0;
    let readbacks = |steps: usize| {
        let mut r = req.clone();
        r.steps = Some(steps);
        let before = pipe.gpu.readbacks();
        let mut during = Vec::new();
        pipe.generate(&r, &mut |_, _| during.push(pipe.gpu.readbacks()))
            .unwrap();
        let total = pipe.gpu.readbacks() - before;
        // No readback between the first and the last step.
        assert!(during.windows(2).all(|w| w[0] == w[1]), "{during:?}");
        total
    };
    let (one, four) = (readbacks(1), readbacks(4));
    assert_eq!(one, four, "readbacks must not grow with the step count");
    let _ = std::fs::remove_dir_all(dir);
}

/// img2img as StableDiffusion3Img2ImgPipeline does it, with `--rng torch`:
/// the init image's latents sampled from the seed's generator, then the
/// noise, the start step from `strength` in f64 (tools/make_fixtures.py
/// IMG2IMG_CASES: seed, strength, images per prompt).
#[test]
fn img2img_reproduces_diffusers_from_the_seed() {
    use sd3_wgpu::pipeline::InitMode;
    use sd3_wgpu::sampler::Rng;
    let variant = "sd35m";
    let dir = pipeline_folder(variant);
    let io =
        Checkpoint::open(&[fixtures().join(format!("pipeline/{variant}/img2img_io.safetensors"))])
            .unwrap();
    let pipe = Pipeline::load(&dir, f32_options()).unwrap();
    for (name, seed, strength, batch, steps_run) in
        [("s0.6", 7, 0.6, 1, 3), ("s0.3_batch2", 11, 0.3, 2, 2)]
    {
        let mut req = request();
        req.init_image = Some(fixtures().join("pipeline/init.png").into());
        req.strength = strength;
        req.seed = seed;
        req.rng = Rng::Torch;
        req.batch = batch;
        let mut steps = Vec::new();
        let out = pipe.generate(&req, &mut |s, n| steps.push((s, n))).unwrap();
        assert_eq!(steps.last(), Some(&(steps_run, steps_run)), "{name}");
        let want = latents(&io, &format!("{name}.latents"));
        let e = common::rel_err(&out.latents, &want);
        eprintln!("img2img {name}: final latents rel err {e:.2e}");
        assert!(e <= 1e-4, "img2img {name}: relative error {e:.3e}");
        // The encoder's mean instead of a sample: a different start, the same
        // image content (a sample of this tiny VAE's wide distribution differs
        // clearly from its mean).
        req.init_mode = InitMode::Mean;
        let mean = pipe.generate(&req, &mut |_, _| {}).unwrap();
        let d = common::rel_err(&mean.latents, &want);
        assert!(
            d > 1e-3,
            "img2img {name}: mean mode should differ ({d:.2e})"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Inpainting as StableDiffusion3InpaintPipeline does it (tools/make_fixtures.py
/// INPAINT_CASES): the mask made grey, blurred (Pillow's Gaussian), binarised
/// and sampled onto the latent grid; the known region reset to the init
/// image's latents, noised to the next sigma, after every step.
#[test]
fn inpainting_reproduces_diffusers_from_the_seed() {
    use sd3_wgpu::image_io::load_mask;
    use sd3_wgpu::sampler::Rng;
    let variant = "sd35m";
    let dir = pipeline_folder(variant);
    let io =
        Checkpoint::open(&[fixtures().join(format!("pipeline/{variant}/inpaint_io.safetensors"))])
            .unwrap();
    let (init, mask) = (
        fixtures().join("pipeline/init.png"),
        fixtures().join("pipeline/mask.png"),
    );
    for blur in [0.0f32, 2.0] {
        let (got, lh, lw) = load_mask(&mask, 4, 2, (20, 12), blur).unwrap();
        assert_eq!((lh, lw), (6, 10));
        let want = io.read_f32(&format!("mask.blur{blur}")).unwrap().1;
        assert_eq!(got, want, "latent mask, blur {blur}");
    }
    let pipe = Pipeline::load(&dir, f32_options()).unwrap();
    for (name, seed, strength, batch, cfg, blur, steps_run) in [
        ("s1.0", 5, 1.0, 1, 5.0, 0.0, 4),
        ("s0.7_batch2", 9, 0.7, 2, 5.0, 0.0, 3),
        ("s0.8_blur2_nocfg", 3, 0.8, 1, 1.0, 2.0, 4),
    ] {
        let mut req = request();
        req.init_image = Some(init.clone().into());
        req.mask = Some(mask.clone().into());
        req.mask_blur = blur;
        req.strength = strength;
        req.seed = seed;
        req.cfg = Some(cfg);
        req.rng = Rng::Torch;
        req.batch = batch;
        let mut steps = Vec::new();
        let out = pipe.generate(&req, &mut |s, n| steps.push((s, n))).unwrap();
        assert_eq!(steps.last(), Some(&(steps_run, steps_run)), "{name}");
        let want = latents(&io, &format!("{name}.latents"));
        let e = common::rel_err(&out.latents, &want);
        eprintln!("inpaint {name}: final latents rel err {e:.2e}");
        assert!(e <= 1e-4, "inpaint {name}: relative error {e:.3e}");
        // Without the mask the same request is img2img: a different result.
        (req.mask, req.mask_blur) = (None, 0.0);
        let plain = pipe.generate(&req, &mut |_, _| {}).unwrap();
        let d = common::rel_err(&plain.latents, &want);
        assert!(d > 1e-2, "inpaint {name}: img2img should differ ({d:.2e})");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Bad inpainting requests fail before any GPU work with messages that name
/// the flag or the file and what was expected.
#[test]
fn inpainting_rejects_bad_masks() {
    let variant = "sd35m";
    let dir = pipeline_folder(variant);
    let pipe = Pipeline::load(&dir, f32_options()).unwrap();
    let tmp = common::temp_dir("inpaint_bad");
    let other = tmp.join("other-size.png");
    image::RgbImage::new(24, 12).save(&other).unwrap();
    let not_image = tmp.join("mask.png");
    std::fs::write(&not_image, b"not a png").unwrap();
    let init = fixtures().join("pipeline/init.png");
    let mask = fixtures().join("pipeline/mask.png");
    let cases: Vec<(Option<PathBuf>, Option<PathBuf>, f32, &str)> = vec![
        (None, Some(mask.clone()), 0.0, "--mask needs --init-image"),
        (
            Some(init.clone()),
            Some(other.clone()),
            0.0,
            "the mask is 24×12, but the init image is 20×12",
        ),
        (Some(init.clone()), Some(not_image.clone()), 0.0, "mask.png"),
        (
            Some(init.clone()),
            Some(tmp.join("missing.png")),
            0.0,
            "missing.png",
        ),
        (Some(init.clone()), Some(mask.clone()), -1.0, "--mask-blur"),
        (
            Some(init.clone()),
            Some(mask.clone()),
            f32::NAN,
            "--mask-blur",
        ),
        (Some(init.clone()), None, 2.0, "--mask-blur needs --mask"),
    ];
    for (init, mask, blur, want) in cases {
        let mut req = request();
        req.init_image = init.map(Into::into);
        req.mask = mask.map(Into::into);
        req.mask_blur = blur;
        let e = pipe.check(&req).unwrap_err().to_string();
        assert!(e.contains(want), "{want:?} not in {e:?}");
    }
    let _ = std::fs::remove_dir_all(tmp);
    let _ = std::fs::remove_dir_all(dir);
}

/// SD3.5 large turbo has large's architecture and configs, so it is known by
/// its name (or `turbo: Some(true)`): 4 steps without CFG unless asked.
#[test]
fn turbo_defaults_from_the_name_or_the_option() {
    use sd3_wgpu::pipeline::turbo_name_hint;
    use std::path::Path;
    for (path, want) in [
        ("/m/sd3.5_large_turbo.safetensors", true),
        ("/m/stable-diffusion-3.5-large-TURBO", true),
        (
            "/c/hub/models--stabilityai--stable-diffusion-3.5-large-turbo/snapshots/ec07796",
            true,
        ),
        (
            "/c/hub/models--stabilityai--stable-diffusion-3.5-large/snapshots/ec07796",
            false,
        ),
        ("/home/turbo/sd3.5_large.safetensors", false),
        ("/m/stable-diffusion-3.5-large", false),
    ] {
        assert_eq!(turbo_name_hint(Path::new(path)), want, "{path}");
    }
    let large = pipeline_folder("sd35l");
    let turbo = large.with_file_name(format!(
        "{}-turbo",
        large.file_name().unwrap().to_string_lossy()
    ));
    std::fs::rename(&large, &turbo).unwrap();
    let pipe = Pipeline::load(&turbo, f32_options()).unwrap();
    assert!(pipe.is_turbo());
    let mut req = request();
    (req.steps, req.cfg) = (None, None);
    let mut steps = Vec::new();
    let out = pipe.generate(&req, &mut |s, n| steps.push((s, n))).unwrap();
    assert_eq!((out.settings.steps, out.settings.cfg), (4, 1.0));
    assert_eq!(steps.last(), Some(&(4, 4)));
    // Explicit settings win.
    req.steps = Some(2);
    req.cfg = Some(3.0);
    let out = pipe.generate(&req, &mut |_, _| {}).unwrap();
    assert_eq!((out.settings.steps, out.settings.cfg), (2, 3.0));
    // Off by the option; a medium model named turbo is not taken for large turbo.
    let off = PipelineOptions {
        turbo: Some(false),
        ..f32_options()
    };
    assert!(!Pipeline::load(&turbo, off).unwrap().is_turbo());
    let medium = pipeline_folder("sd35m");
    let medium_turbo = medium.with_file_name(format!(
        "{}-turbo",
        medium.file_name().unwrap().to_string_lossy()
    ));
    std::fs::rename(&medium, &medium_turbo).unwrap();
    assert!(!Pipeline::load(&medium_turbo, f32_options())
        .unwrap()
        .is_turbo());
    let on = PipelineOptions {
        turbo: Some(true),
        ..f32_options()
    };
    assert!(Pipeline::load(&medium_turbo, on).unwrap().is_turbo());
    let _ = std::fs::remove_dir_all(turbo);
    let _ = std::fs::remove_dir_all(medium_turbo);
}

/// LoRAs in the diffusers/PEFT, kohya and Stability/ComfyUI layouts, merged
/// on the GPU at load, against StableDiffusion3Pipeline with the same LoRAs
/// fused (tools/make_fixtures.py LORA_CASES; kohya and ComfyUI files are
/// converted to PEFT names there as ComfyUI applies them).
#[test]
fn loras_reproduce_diffusers_fuse_lora() {
    use sd3_wgpu::lora::{Component, LoraSpec};
    use sd3_wgpu::sampler::Rng;
    let variant = "sd35m";
    let dir = pipeline_folder(variant);
    let io =
        Checkpoint::open(&[fixtures().join(format!("pipeline/{variant}/lora_io.safetensors"))])
            .unwrap();
    let lora = |name: &str, strength: f32| LoraSpec {
        path: fixtures().join(format!("lora/{name}.safetensors")),
        strength,
    };
    let plain = Pipeline::load(&dir, f32_options()).unwrap();
    for (case, seed, loras) in [
        ("peft", 21, vec![lora("peft", 1.0)]),
        (
            "kohya_and_comfy",
            22,
            vec![lora("kohya", 0.7), lora("comfy", 1.3)],
        ),
    ] {
        let pipe = Pipeline::load(
            &dir,
            PipelineOptions {
                loras: loras.clone(),
                ..f32_options()
            },
        )
        .unwrap();
        for (l, spec) in pipe.loras().iter().zip(&loras) {
            assert_eq!((&l.path, l.strength), (&spec.path, spec.strength));
            assert_eq!(l.sha256.len(), 64);
            assert!(l.modules[&Component::Mmdit] > 0, "{case}: {l:?}");
        }
        let mut req = request();
        req.seed = seed;
        req.rng = Rng::Torch;
        let out = pipe.generate(&req, &mut |_, _| {}).unwrap();
        let want = latents(&io, &format!("{case}.latents"));
        let e = common::rel_err(&out.latents, &want);
        eprintln!("lora {case}: final latents rel err {e:.2e}");
        assert!(e <= 1e-4, "lora {case}: relative error {e:.3e}");
        let without = plain.generate(&req, &mut |_, _| {}).unwrap();
        let d = common::rel_err(&without.latents, &want);
        assert!(d > 0.1, "lora {case}: the LoRA changes little ({d:.2e})");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Bad LoRAs are refused at load, before any weight is uploaded, with the
/// file, the keys and what was expected; T5 updates are left out (and
/// counted) when the run has no T5.
#[test]
fn bad_loras_are_clear_errors_at_load() {
    use common::{reshape_entry, rewrite_safetensors, Entry};
    use safetensors::Dtype;
    use sd3_wgpu::lora::LoraSpec;
    let dir = pipeline_folder("sd35m");
    let tmp = common::temp_dir("lora_bad");
    let comfy = fixtures().join("lora/comfy.safetensors");
    let qkv_up = "diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_up.weight";
    let edited = |name: &str, f: &dyn Fn(&mut Vec<Entry>)| -> PathBuf {
        let p = tmp.join(name);
        rewrite_safetensors(&comfy, &p, f);
        p
    };
    let add = |l: &mut Vec<Entry>, name: &str| {
        l.push((name.into(), Dtype::F32, vec![4, 4], vec![0; 64]));
    };
    let sdxl = edited("sdxl.safetensors", &|l| {
        add(
            l,
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
        );
        add(
            l,
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
        );
    });
    let large = edited("large.safetensors", &|l| {
        reshape_entry(l, qkv_up, &[3 * 2432, 4])
    });
    let loha = edited("loha.safetensors", &|l| {
        add(
            l,
            "diffusion_model.joint_blocks.0.x_block.attn.proj.hada_w1_a",
        )
    });
    let half = edited("half.safetensors", &|l| {
        l.retain(|t| t.0 != qkv_up.replace("lora_up", "lora_down"))
    });
    let nan = edited("nan.safetensors", &|l| {
        let t = l.iter_mut().find(|t| t.0 == qkv_up).unwrap();
        t.3[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let empty = edited("empty.safetensors", &|l| l.clear());
    let text = tmp.join("text.safetensors");
    std::fs::write(&text, b"hello").unwrap();
    let cases: Vec<(PathBuf, &str)> = vec![
        (sdxl, "match no module of this model"),
        (
            large,
            "up has 7296 rows but joint_blocks.0.x_block.attn.qkv.weight of the MMDiT has 192",
        ),
        (loha, "is LoHa; only plain LoRA"),
        (half, "has only one of its two matrices"),
        (nan, "NaN"),
        (empty, "holds no tensors"),
        (text.clone(), "text.safetensors"),
        (tmp.join("missing.safetensors"), "no such file"),
    ];
    for (path, want) in cases {
        let opts = PipelineOptions {
            loras: vec![LoraSpec {
                path: path.clone(),
                strength: 1.0,
            }],
            ..f32_options()
        };
        let e = Pipeline::load(&dir, opts)
            .err()
            .expect("refused")
            .to_string();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(e.contains(want) && e.contains(&file), "{want:?}: {e}");
    }
    // The keys that match nothing are named.
    let opts = PipelineOptions {
        loras: vec![LoraSpec::parse(tmp.join("sdxl.safetensors").to_str().unwrap()).unwrap()],
        ..f32_options()
    };
    let e = Pipeline::load(&dir, opts).err().unwrap().to_string();
    assert!(
        e.contains("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"),
        "{e}"
    );
    // FILE[:STRENGTH].
    let p = LoraSpec::parse("a/b.safetensors:0.5").unwrap();
    assert_eq!(
        (p.path, p.strength),
        (PathBuf::from("a/b.safetensors"), 0.5)
    );
    let p = LoraSpec::parse("C:\\loras\\b.safetensors").unwrap();
    assert_eq!(p.path, PathBuf::from("C:\\loras\\b.safetensors"));
    assert_eq!(p.strength, 1.0);
    for bad in [
        "b.safetensors:nan",
        "b.safetensors:1e9",
        "b.safetensors:inf",
    ] {
        assert!(LoraSpec::parse(bad).is_err(), "{bad}");
    }
    // Without T5 the kohya file's two T5 modules are left out, and said so.
    let opts = PipelineOptions {
        no_t5: true,
        loras: vec![LoraSpec {
            path: fixtures().join("lora/kohya.safetensors"),
            strength: 1.0,
        }],
        ..f32_options()
    };
    let pipe = Pipeline::load(&dir, opts).unwrap();
    assert_eq!(pipe.loras()[0].skipped_t5, 2);
    let _ = std::fs::remove_dir_all(tmp);
    let _ = std::fs::remove_dir_all(dir);
}

/// SD3 ControlNets against StableDiffusion3ControlNetPipeline
/// (tools/make_fixtures.py CONTROLNET_CASES): an InstantX-style one on SD3,
/// two at once with their own scales and step windows, and a Stability
/// SD3.5-large-style one (image-only blocks on the transformer's patch
/// embedding) with two images per prompt. The control latents are the VAE
/// distribution's mean on both sides.
#[test]
fn controlnets_reproduce_diffusers() {
    use sd3_wgpu::pipeline::Control;
    use sd3_wgpu::sampler::Rng;
    let io = Checkpoint::open(&[fixtures().join("pipeline/controlnet_io.safetensors")]).unwrap();
    let net = |n: &str| fixtures().join(format!("controlnet/{n}"));
    let control = |img: &str, scale: f32, start: f32, stop: f32| Control {
        image: fixtures().join(format!("pipeline/{img}")),
        scale,
        start,
        stop,
    };
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, Control)>, u64, usize);
    let cases: Vec<Case> = vec![
        (
            "sd3_one",
            "sd3",
            vec![("joint_a", control("control_a.png", 0.8, 0.0, 1.0))],
            31,
            1,
        ),
        (
            "sd3_two",
            "sd3",
            vec![
                ("joint_a", control("control_a.png", 0.6, 0.0, 0.5)),
                ("joint_b", control("control_b.png", 1.2, 0.25, 1.0)),
            ],
            32,
            1,
        ),
        (
            "sd35l_single_batch2",
            "sd35l",
            vec![("single", control("control_a.png", 1.0, 0.0, 1.0))],
            33,
            2,
        ),
    ];
    for (case, variant, nets, seed, batch) in cases {
        let dir = pipeline_folder(variant);
        let pipe = Pipeline::load(
            &dir,
            PipelineOptions {
                controlnets: nets.iter().map(|(n, _)| net(n)).collect(),
                ..f32_options()
            },
        )
        .unwrap();
        let mut req = request();
        (req.width, req.height) = (Some(24), Some(16));
        req.seed = seed;
        req.rng = Rng::Torch;
        req.batch = batch;
        req.controls = nets.iter().map(|(_, c)| c.clone()).collect();
        let out = pipe.generate(&req, &mut |_, _| {}).unwrap();
        let want = latents(&io, &format!("{case}.latents"));
        let e = common::rel_err(&out.latents, &want);
        eprintln!("controlnet {case}: final latents rel err {e:.2e}");
        assert!(e <= 1e-4, "controlnet {case}: relative error {e:.3e}");
        // Without the ControlNets: clearly different.
        let plain = Pipeline::load(&dir, f32_options()).unwrap();
        req.controls.clear();
        let without = plain.generate(&req, &mut |_, _| {}).unwrap();
        let d = common::rel_err(&without.latents, &want);
        assert!(d > 1e-2, "controlnet {case}: changes little ({d:.2e})");
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Stability's single-file ControlNet names (fused qkv, `mlp.fc1`,
/// `adaLN_modulation.1` inside `transformer_blocks.N`, a `control_type`)
/// load to the same model as diffusers' folder; a canny `control_type`
/// changes how the control image goes into the VAE.
#[test]
fn stability_single_file_controlnets_load_as_diffusers_folders() {
    use common::{rewrite_safetensors, Entry};
    use safetensors::Dtype;
    use sd3_wgpu::pipeline::Control;
    use sd3_wgpu::sampler::Rng;
    let io = Checkpoint::open(&[fixtures().join("pipeline/controlnet_io.safetensors")]).unwrap();
    let tmp = common::temp_dir("controlnet_single");
    let stability = |name: &str, control_type: i64| -> PathBuf {
        let p = tmp.join(name);
        let src = fixtures().join("controlnet/single/diffusion_pytorch_model.safetensors");
        rewrite_safetensors(&src, &p, |l: &mut Vec<Entry>| {
            let b = "transformer_blocks.0";
            for p in ["weight", "bias"] {
                let mut qkv: Option<Entry> = None;
                for x in ["q", "k", "v"] {
                    let i = l
                        .iter()
                        .position(|t| t.0 == format!("{b}.attn.to_{x}.{p}"))
                        .unwrap();
                    let t = l.remove(i);
                    qkv = Some(match qkv {
                        None => (format!("{b}.attn.qkv.{p}"), t.1, t.2, t.3),
                        Some(mut a) => {
                            a.2[0] += t.2[0];
                            a.3.extend(t.3);
                            a
                        }
                    });
                }
                l.push(qkv.unwrap());
            }
            for t in l.iter_mut() {
                for (from, to) in [
                    (".attn.to_out.0.", ".attn.proj."),
                    (".ff.net.0.proj.", ".mlp.fc1."),
                    (".ff.net.2.", ".mlp.fc2."),
                    (".norm1.linear.", ".adaLN_modulation.1."),
                ] {
                    t.0 = t.0.replace(from, to);
                }
            }
            l.push((
                "control_type".into(),
                Dtype::I64,
                vec![1],
                control_type.to_le_bytes().to_vec(),
            ));
        });
        p
    };
    let blur = stability("sd3.5_large_controlnet_blur.safetensors", 0);
    let canny = stability("sd3.5_large_controlnet_canny.safetensors", 1);
    let dir = pipeline_folder("sd35l");
    let mut req = request();
    (req.width, req.height) = (Some(24), Some(16));
    req.seed = 33;
    req.rng = Rng::Torch;
    req.batch = 2;
    req.controls = vec![Control::new(&fixtures().join("pipeline/control_a.png"))];
    let run = |net: &PathBuf| {
        let pipe = Pipeline::load(
            &dir,
            PipelineOptions {
                controlnets: vec![net.clone()],
                ..f32_options()
            },
        )
        .unwrap();
        assert!(!pipe.controlnets()[0].zero_pooled);
        pipe.generate(&req, &mut |_, _| {}).unwrap().latents
    };
    let want = latents(&io, "sd35l_single_batch2.latents");
    let e = common::rel_err(&run(&blur), &want);
    assert!(e <= 1e-4, "Stability names: relative error {e:.3e}");
    let d = common::rel_err(&run(&canny), &want);
    assert!(
        d > 1e-3,
        "the canny input transform changed nothing ({d:.2e})"
    );
    let _ = std::fs::remove_dir_all(tmp);
    let _ = std::fs::remove_dir_all(dir);
}

/// ControlNets that do not fit, and control requests that make no sense,
/// are refused with the file or flag and what was expected.
#[test]
fn bad_controlnets_are_clear_errors() {
    use common::{rewrite_safetensors, Entry};
    use sd3_wgpu::pipeline::Control;
    let tmp = common::temp_dir("controlnet_bad");
    let joint = fixtures().join("controlnet/joint_a/diffusion_pytorch_model.safetensors");
    let edited = |name: &str, f: &dyn Fn(&mut Vec<Entry>)| -> PathBuf {
        let p = tmp.join(name);
        rewrite_safetensors(&joint, &p, f);
        p
    };
    // Copies of block 0 as blocks 1..n.
    let blocks = |name: &str, n: usize| {
        edited(name, &|l| {
            let extra: Vec<Entry> = l
                .iter()
                .filter(|t| {
                    t.0.starts_with("transformer_blocks.0.")
                        || t.0.starts_with("controlnet_blocks.0.")
                })
                .flat_map(|t| {
                    (1..n).map(|i| {
                        let name = t.0.replace("blocks.0.", &format!("blocks.{i}."));
                        (name, t.1, t.2.clone(), t.3.clone())
                    })
                })
                .collect();
            l.extend(extra);
        })
    };
    let deep = blocks("deep.safetensors", 3);
    let two = blocks("two.safetensors", 2);
    let wide = edited("wide.safetensors", &|l| {
        common::reshape_entry(l, "controlnet_blocks.0.weight", &[128, 128])
    });
    let dir = pipeline_folder("sd3");
    let load = |nets: Vec<PathBuf>| {
        Pipeline::load(
            &dir,
            PipelineOptions {
                controlnets: nets,
                ..f32_options()
            },
        )
    };
    for (nets, want) in [
        (vec![deep.clone()], "3 blocks for a transformer of 2"),
        (
            vec![wide.clone()],
            "pos_embed_input.proj.weight is [64, 16, 2, 2]; [128, channels, p, p] was expected",
        ),
        (vec![joint.clone(), two.clone()], "has 1 blocks and"),
        (vec![dir.join("transformer")], "not an SD3 ControlNet"),
        (vec![tmp.join("missing")], "missing"),
    ] {
        let e = load(nets).err().expect("refused").to_string();
        assert!(e.contains(want), "{want:?}: {e}");
    }
    let pipe = load(vec![joint.clone()]).unwrap();
    // Without a config.json: InstantX's (joint) zero the pooled text, the
    // SD3.5-large kind (image-only) take it.
    assert!(pipe.controlnets()[0].zero_pooled);
    let single = sd3_wgpu::weights::controlnet::ControlNetSource::open(
        &fixtures().join("controlnet/single/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    assert!(!single.config.zero_pooled);
    // A ControlNet of another width, and of a text width this model lacks.
    let mut other = pipe.controlnets()[0].clone();
    other.blocks.hidden = 128;
    other.blocks.context_dim = 4096;
    let e = sd3_wgpu::models::controlnet::ControlNet::check_fits(&other, pipe.config())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("width 128 (the transformer's is 64)")
            && e.contains("context width 4096 (the transformer's is 208)"),
        "{e}"
    );
    let good = Control::new(&fixtures().join("pipeline/control_a.png"));
    let mut req = request();
    (req.width, req.height) = (Some(24), Some(16));
    let cases: Vec<(Vec<Control>, &str)> = vec![
        (vec![], "0 control image(s) for 1 ControlNet(s)"),
        (vec![good.clone(), good.clone()], "2 control image(s) for 1"),
        (
            vec![Control::new(&fixtures().join("pipeline/init.png"))],
            "is 20×12 after cropping to multiples of 4, but the image is 24×16",
        ),
        (
            vec![Control {
                start: 0.6,
                stop: 0.5,
                ..good.clone()
            }],
            "--control-start 0.6 must be before --control-stop 0.5",
        ),
        (
            vec![Control {
                scale: f32::NAN,
                ..good.clone()
            }],
            "--control-scale",
        ),
        (vec![Control::new(&tmp.join("nope.png"))], "nope.png"),
    ];
    let mut slg = request();
    (slg.width, slg.height) = (Some(24), Some(16));
    slg.controls = vec![good.clone()];
    slg.slg_layers = vec![1];
    let e = pipe.check(&slg).unwrap_err().to_string();
    assert!(
        e.contains("skip-layer guidance together with ControlNets"),
        "{e}"
    );
    for (controls, want) in cases {
        req.controls = controls;
        let e = pipe.check(&req).unwrap_err().to_string();
        assert!(e.contains(want), "{want:?}: {e}");
    }
    let _ = std::fs::remove_dir_all(tmp);
    let _ = std::fs::remove_dir_all(dir);
}

/// Matrices stored as bf16, fp8 e4m3fn, fp8 e5m2 (and scaled fp8, which is
/// widened with its scale) stay packed on the GPU and give the latents of the
/// same values stored as f16, in less memory; the transformer and T5 both.
#[test]
fn packed_weights_match_their_f16_copies() {
    use common::{rewrite_safetensors, Entry};
    use safetensors::Dtype;
    use sd3_wgpu::sampler::Rng;
    use sd3_wgpu::tensor::{f8e4m3_from_f32, f8e5m2_from_f32};
    use sd3_wgpu::weights::fp8_e4m3;
    // (stored dtype, per-tensor scale) → (packed bytes, the values they hold).
    let encode = |d: Dtype, v: &[f32]| -> (Vec<u8>, Vec<f32>) {
        match d {
            Dtype::BF16 => {
                let h: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f32(x)).collect();
                (
                    bytemuck_bytes(&h.iter().map(|x| x.to_bits()).collect::<Vec<_>>()),
                    h.iter().map(|x| x.to_f32()).collect(),
                )
            }
            Dtype::F8_E4M3 => {
                let b: Vec<u8> = v.iter().map(|&x| f8e4m3_from_f32(x)).collect();
                let vals = b.iter().map(|&x| fp8_e4m3(x)).collect();
                (b, vals)
            }
            _ => {
                let b: Vec<u8> = v.iter().map(|&x| f8e5m2_from_f32(x)).collect();
                let vals = b
                    .iter()
                    .map(|&x| half::f16::from_bits((x as u16) << 8).to_f32())
                    .collect();
                (b, vals)
            }
        }
    };
    let mut req = request();
    req.seed = 5;
    req.rng = Rng::Torch;
    for (d, scale) in [
        (Dtype::BF16, None),
        (Dtype::F8_E4M3, None),
        (Dtype::F8_E5M2, None),
        (Dtype::F8_E4M3, Some(0.25f32)),
    ] {
        let (packed, copy) = (pipeline_folder("sd35m"), pipeline_folder("sd35m"));
        for file in [
            "transformer/diffusion_pytorch_model.safetensors",
            "text_encoder_3/model.safetensors",
        ] {
            let src = packed.join(file);
            let tmp = src.with_extension("orig");
            std::fs::rename(&src, &tmp).unwrap();
            let matrices = |l: &mut Vec<Entry>, f16_copy: bool| {
                let mut scales = Vec::new();
                for t in l.iter_mut() {
                    if t.2.len() != 2 || !t.0.ends_with(".weight") {
                        continue;
                    }
                    let s = scale.unwrap_or(1.0);
                    let v: Vec<f32> = sd3_wgpu::weights::to_f32(&t.0, t.1, &t.3)
                        .unwrap()
                        .iter()
                        .map(|x| x / s)
                        .collect();
                    let (bytes, vals) = encode(d, &v);
                    if f16_copy {
                        let h: Vec<u16> = vals
                            .iter()
                            .map(|x| half::f16::from_f32(x * s).to_bits())
                            .collect();
                        (t.1, t.3) = (Dtype::F16, bytemuck_bytes(&h));
                    } else {
                        (t.1, t.3) = (d, bytes);
                        if scale.is_some() {
                            let stem = t.0.trim_end_matches(".weight");
                            scales.push((
                                format!("{stem}.scale_weight"),
                                Dtype::F32,
                                vec![],
                                s.to_le_bytes().to_vec(),
                            ));
                        }
                    }
                }
                l.extend(scales);
            };
            rewrite_safetensors(&tmp, &src, |l| matrices(l, false));
            rewrite_safetensors(&tmp, &copy.join(file), |l| matrices(l, true));
            std::fs::remove_file(&tmp).unwrap();
        }
        let run = |dir: &PathBuf| {
            let pipe = Pipeline::load(dir, PipelineOptions::default()).unwrap();
            let out = pipe.generate(&req, &mut |_, _| {}).unwrap();
            // The transformer's weights on the GPU.
            let gpu = &pipe.gpu;
            let src = sd3_wgpu::weights::mmdit::MmditSource::open(dir).unwrap();
            let before = gpu.memory.current();
            let m = sd3_wgpu::models::mmdit::Mmdit::load(gpu, &src, DType::F16).unwrap();
            let bytes = gpu.memory.current() - before;
            drop(m);
            (out.latents, bytes)
        };
        let (a, mem_a) = run(&packed);
        let (b, mem_b) = run(&copy);
        let want: Vec<f64> = b.iter().map(|&v| v as f64).collect();
        let e = common::rel_err(&a, &want);
        eprintln!("{d:?} scale {scale:?}: rel err {e:.2e}, MMDiT weights {mem_a} vs {mem_b} bytes");
        assert!(e <= 1e-6, "{d:?} scale {scale:?}: relative error {e:.3e}");
        if scale.is_none() && d != Dtype::BF16 {
            assert!(mem_a < mem_b, "fp8 kept packed: {mem_a} vs {mem_b} bytes");
        }
        let _ = std::fs::remove_dir_all(packed);
        let _ = std::fs::remove_dir_all(copy);
    }
}

fn bytemuck_bytes<T: Copy + Into<u64>>(v: &[T]) -> Vec<u8> {
    let size = std::mem::size_of::<T>();
    v.iter()
        .flat_map(|&x| x.into().to_le_bytes()[..size].to_vec())
        .collect()
}

/// The whole pipeline from a GGUF transformer with the VAE and the text
/// encoders from separate files, against StableDiffusion3Pipeline with the
/// same transformer dequantized by the gguf package.
#[test]
fn gguf_pipeline_matches_diffusers_on_the_dequantized_transformer() {
    use sd3_wgpu::sampler::Rng;
    let text = fixtures().join("text");
    let pipe = Pipeline::load(
        &fixtures().join("pipeline/sd35l.gguf"),
        PipelineOptions {
            vae: Some(fixtures().join("vae/vae")),
            clip_l: Some(text.join("text_encoder")),
            clip_g: Some(text.join("text_encoder_2")),
            t5: Some(text.join("text_encoder_3")),
            tokenizers: Some(text.clone()),
            ..f32_options()
        },
    )
    .unwrap();
    let mut req = request();
    req.seed = 5;
    req.rng = Rng::Torch;
    let out = pipe.generate(&req, &mut |_, _| {}).unwrap();
    let io = Checkpoint::open(&[fixtures().join("pipeline/sd35l_gguf_io.safetensors")]).unwrap();
    let want = latents(&io, "latents");
    let e = common::rel_err(&out.latents, &want);
    eprintln!("GGUF pipeline: final latents rel err {e:.2e}");
    assert!(e <= 1e-4, "relative error {e:.3e}");
}

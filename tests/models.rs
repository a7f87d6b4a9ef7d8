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
    mmdit_error_on(gpu(), variant, path, matrix)
}

fn mmdit_error_on(
    gpu: &sd3_wgpu::Gpu,
    variant: &str,
    path: &std::path::Path,
    matrix: DType,
) -> f64 {
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

/// A GGUF MMDiT as city96's are written (Stability names, matrices in
/// Q8_0/Q4_0/Q4_1/Q5_0/Q5_1, the rest f16/f32; tools/make_fixtures.py gguf)
/// against diffusers on the same weights dequantized by the gguf package:
/// widened to f32, and with the blocks kept packed on the GPU.
#[test]
fn gguf_mmdit_matches_diffusers_on_its_dequantized_weights() {
    let gpu = gpu();
    let path = fixture("mmdit/sd35l.gguf");
    let src = MmditSource::open(&path).unwrap();
    assert!(src.is_single_file());
    let io = Checkpoint::open(&[fixture("mmdit/sd35l_io.safetensors")]).unwrap();
    let want: Vec<f64> = Checkpoint::open(&[fixture("mmdit/sd35l_gguf_io.safetensors")])
        .unwrap()
        .read_f32("out")
        .unwrap()
        .1
        .iter()
        .map(|&v| v as f64)
        .collect();
    let get = |k: &str| io.read_f32(&format!("case0.{k}")).unwrap();
    let (xs, x) = get("x");
    let (cs, ctx) = get("context");
    let (_, pooled) = get("pooled");
    let (_, t) = get("t");
    for matrix in [DType::F32, DType::F16] {
        let model = Mmdit::load(gpu, &src, matrix).unwrap();
        let qkv = &model.joint_blocks[0].x_block.attn.qkv.weight;
        if matrix == DType::F16 {
            assert!(
                qkv.dtype.packed_format().is_some_and(|f| f >= 4),
                "kept as {:?}",
                qkv.dtype
            );
        }
        let run = MmditRun::new(gpu, &model, xs[0], xs[2], xs[3], cs[1]).unwrap();
        let got = run.run(gpu, &x, &ctx, &pooled, &t).unwrap();
        let e = rel_err(&got, &want);
        eprintln!("gguf MMDiT, matrices {matrix:?}: rel err {e:.2e}");
        assert!(e <= 1e-4, "{matrix:?}: relative error {e:.3e}");
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

/// `--dtype f16` as users run it: f16 matrices and f16 activations (norm
/// statistics, softmax and accumulation in f32). Bound set from the errors
/// measured on every variant (see docs/PERFORMANCE.md).
#[test]
fn mmdit_with_f16_activations_stays_within_bound() {
    let Some(gpu) = f16_gpu() else {
        eprintln!("skipped: the adapter has no SHADER_F16");
        return;
    };
    for variant in ["sd3", "sd35m", "sd35l"] {
        let e = mmdit_error_on(
            gpu,
            variant,
            &fixture(&format!("mmdit/{variant}")),
            DType::F16,
        );
        eprintln!("{variant}: f16 activations + f16 matrices: rel err {e:.2e}");
        assert!(
            e > 1e-5,
            "{variant}: f16 should differ measurably from f32 ({e:.3e})"
        );
        assert!(
            e <= F16_MMDIT_BOUND,
            "{variant}: relative error {e:.3e} > {F16_MMDIT_BOUND:e}"
        );
    }
}

/// Measured on lavapipe: sd3 1.5e-3 (its fixture matrices are f32, so f16
/// rounds them too), SD3.5 medium 8.2e-4, SD3.5 large 6.7e-4.
const F16_MMDIT_BOUND: f64 = 4e-3;

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

mod vae {
    use super::*;
    use sd3_wgpu::models::vae::{decode_tiled, from_u8, stitch_tiles, to_u8, Vae, VaeRun};
    use sd3_wgpu::weights::vae::VaeSource;

    fn io(name: &str) -> (Vec<usize>, Vec<f32>) {
        let ck = Checkpoint::open(&[fixture("vae/vae_io.safetensors")]).unwrap();
        ck.read_f32(name).unwrap_or_else(|_| {
            // u8 tensors: read the raw bytes.
            let e = &ck.tensors[name];
            (
                e.shape.clone(),
                ck.bytes(e).unwrap().iter().map(|&b| b as f32).collect(),
            )
        })
    }

    fn f64s(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }

    fn load(path: &std::path::Path) -> Vae {
        let src = VaeSource::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Vae::load(gpu(), &src, DType::F32).unwrap()
    }

    /// f16 activations (and matrices): within the measured bound of
    /// diffusers' f32 decode; and latents so large that f16 overflows come
    /// back finite, decoded again in f32, equal to the f32 decode.
    #[test]
    fn f16_decode_stays_close_and_overflow_falls_back_to_f32() {
        use sd3_wgpu::decode::{decode_auto, decode_sized};
        let Some(g16) = f16_gpu() else {
            eprintln!("skipped: the adapter has no SHADER_F16");
            return;
        };
        let (ls, latents) = io("latents");
        let (_, decoded) = io("decoded");
        let src = VaeSource::open(&fixture("vae")).unwrap();
        let vae = Vae::load(g16, &src, DType::F16).unwrap();
        assert_eq!(vae.activation, DType::F16);
        let shape = [ls[0], ls[1], ls[2], ls[3]];
        let got = decode_auto(g16, &vae, shape, &latents, None, 8, None).unwrap();
        let e = rel_err(&got, &f64s(&decoded));
        eprintln!("vae decode, f16 activations and matrices: rel err {e:.2e}");
        assert!(e > 1e-5 && e <= 3e-3, "f16 decode: relative error {e:.3e}");
        let huge: Vec<f32> = latents.iter().map(|v| v * 3e4).collect();
        let plain = decode_sized(g16, &vae, shape, &huge, None, 8, None).unwrap();
        assert!(
            plain.iter().any(|v| !v.is_finite()),
            "these latents should overflow f16 somewhere"
        );
        let rescued = decode_auto(g16, &vae, shape, &huge, None, 8, None).unwrap();
        let f32_vae = Vae {
            activation: DType::F32,
            ..vae.clone()
        };
        let reference = decode_sized(g16, &f32_vae, shape, &huge, None, 8, None).unwrap();
        assert!(rescued.iter().all(|v| v.is_finite()));
        assert_eq!(rescued, reference, "the retry is the f32 decode");
    }

    #[test]
    fn detects_the_architecture_in_both_layouts() {
        let a = VaeSource::open(&fixture("vae/vae.safetensors")).unwrap();
        let b = VaeSource::open(&fixture("vae")).unwrap();
        assert_eq!(a.ldm_prefix.as_deref(), Some("first_stage_model."));
        assert_eq!(b.ldm_prefix, None);
        assert_eq!(a.config, b.config);
        assert_eq!(a.config.block_out_channels, vec![32, 64]);
        assert_eq!(
            (
                a.config.latent_channels,
                a.config.layers_per_block,
                a.config.has_encoder
            ),
            (16, 1, true)
        );
    }

    #[test]
    fn decoder_and_encoder_match_diffusers_in_both_layouts() {
        let (ls, latents) = io("latents");
        let (_, decoded) = io("decoded");
        let (is, image) = io("image");
        let (_, encoded) = io("encoded");
        let (_, rgb8) = io("rgb8");
        for (n, path) in [fixture("vae/vae.safetensors"), fixture("vae")]
            .into_iter()
            .enumerate()
        {
            let mut vae = load(&path);
            if n == 1 {
                // Mid-block attention in query chunks of 3 rows (the last one
                // shorter), as large images need; the result must not change.
                let hw = ls[2] * ls[3];
                vae.decoder.mid_block.attention.score_chunk_bytes = 4 * ls[0] * hw * 3;
            }
            let dec = VaeRun::decoder(gpu(), &vae, ls[0], ls[2], ls[3]).unwrap();
            if n == 1 {
                let chunks = dec
                    .plan()
                    .labels()
                    .iter()
                    .filter(|l| l.contains(".chunk") && l.ends_with(".scores"))
                    .count();
                assert!(chunks >= 3, "{chunks} attention chunks");
            }
            let got = dec.run(gpu(), &latents).unwrap();
            let e = rel_err(&got, &f64s(&decoded));
            assert!(
                e <= 1e-4,
                "decode from {}: relative error {e:.3e}",
                path.display()
            );
            // u8 conversion as diffusers + PIL do it (NHWC there, NCHW here).
            let (b, c, h, w) = (
                dec.out_shape[0],
                dec.out_shape[1],
                dec.out_shape[2],
                dec.out_shape[3],
            );
            for bi in 0..b {
                for y in 0..h {
                    for x in 0..w {
                        for ci in 0..c {
                            let ours = to_u8(got[((bi * c + ci) * h + y) * w + x]) as f32;
                            let theirs = rgb8[((bi * h + y) * w + x) * c + ci];
                            assert!(
                                (ours - theirs).abs() <= 1.0,
                                "pixel ({bi},{y},{x},{ci}): {ours} vs {theirs}"
                            );
                        }
                    }
                }
            }
            let enc = VaeRun::encoder(gpu(), &vae, is[0], is[2], is[3]).unwrap();
            let got = enc.run(gpu(), &image).unwrap();
            let e = rel_err(&got, &f64s(&encoded));
            assert!(
                e <= 1e-4,
                "encode from {}: relative error {e:.3e}",
                path.display()
            );
        }
    }

    #[test]
    fn u8_conversion_rounds_like_numpy() {
        assert_eq!(to_u8(-1.5), 0);
        assert_eq!(to_u8(2.0), 255);
        assert_eq!(to_u8(0.0), 128); // 127.5 rounds half to even
        assert_eq!(to_u8(f32::NAN), 0);
        assert_eq!(from_u8(255), 1.0);
        assert_eq!(from_u8(0), -1.0);
    }

    #[test]
    fn tiles_blend_without_seams() {
        // A local "decoder" (2× nearest upsampling of each channel): tiling it
        // must reproduce the whole result exactly, blend weights included.
        let (b, c, h, w, f) = (2, 3, 23, 17, 2);
        let latents = rand(5, b * c * h * w);
        let up = |x: &[f32], hh: usize, ww: usize| -> Vec<f32> {
            let mut o = vec![0.0; b * c * hh * ww * f * f];
            for p in 0..b * c {
                for y in 0..hh * f {
                    for xx in 0..ww * f {
                        o[(p * hh * f + y) * ww * f + xx] = x[(p * hh + y / f) * ww + xx / f];
                    }
                }
            }
            o
        };
        let full = up(&latents, h, w);
        for (tile, overlap) in [(8, 3), (5, 1), (16, 7), (30, 2)] {
            let (th, tw) = (tile.min(h), tile.min(w));
            let got = stitch_tiles(&latents, [b, c, h, w], tile, overlap, f, c, |p| {
                Ok(up(p, th, tw))
            })
            .unwrap();
            let e = rel_err(&got, &f64s(&full));
            assert!(e < 1e-6, "tile {tile} overlap {overlap}: {e:.3e}");
        }
    }

    #[test]
    fn tiled_decode_approximates_untiled() {
        let vae = load(&fixture("vae"));
        let (b, c, h, w) = (1, 16, 24, 20);
        let latents = rand(77, b * c * h * w);
        let full = VaeRun::decoder(gpu(), &vae, b, h, w)
            .unwrap()
            .run(gpu(), &latents)
            .unwrap();
        let same = decode_tiled(gpu(), &vae, &latents, [b, c, h, w], 24, 3).unwrap();
        assert!(
            rel_err(&same, &f64s(&full)) < 1e-6,
            "one tile covering everything must equal the full decode"
        );
        // Each tile normalises over its own pixels; on this tiny random-weight
        // VAE that alone moves the result by a few percent (measured: 20×20
        // tiles of a 24×20 latent, overlap 4: 3.9e-2 relative).
        let tiled = decode_tiled(gpu(), &vae, &latents, [b, c, h, w], 20, 4).unwrap();
        let e = rel_err(&tiled, &f64s(&full));
        eprintln!("tiled vs untiled: relative error {e:.3e}");
        assert!(e < 0.15, "tiled decode differs by {e:.3e}");
    }
}

mod images {
    use sd3_wgpu::image_io::{load_image, png_text, save_png};

    /// `--mask-blur` against Pillow's GaussianBlur (tools/make_fixtures.py
    /// BLUR_CASES): every byte equal, for radii from a quarter pixel to
    /// wider than the image, on noise and on binary blocks.
    #[test]
    fn mask_blur_equals_pillow_byte_for_byte() {
        use sd3_wgpu::blur::gaussian_blur_l8;
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let io = sd3_wgpu::weights::Checkpoint::open(&[root.join("blur.safetensors")]).unwrap();
        let mut cases = 0;
        for name in io.tensors.keys() {
            let Some((image, radius)) = name.split_once(".r") else {
                continue;
            };
            let (shape, src) = io.read_f32(&format!("{image}.in")).unwrap();
            let want = io.read_f32(name).unwrap().1;
            let src: Vec<u8> = src.iter().map(|&v| v as u8).collect();
            let r: f32 = radius.parse().unwrap();
            let got = gaussian_blur_l8(&src, shape[1], shape[0], r);
            let diff = got
                .iter()
                .zip(&want)
                .filter(|(g, w)| **g as f32 != **w)
                .count();
            assert_eq!(diff, 0, "{name}: {diff} bytes differ from Pillow");
            assert_ne!(got, src, "{name}: the blur changed nothing");
            cases += 1;
        }
        assert_eq!(cases, 14);
        // No panic on degenerate input: radius 0, NaN, huge; a wrong length.
        for r in [0.0, f32::NAN, -1.0, 1e6] {
            assert_eq!(gaussian_blur_l8(&[7, 9], 2, 1, r).len(), 2);
        }
        assert_eq!(gaussian_blur_l8(&[1, 2, 3], 2, 2, 1.0), vec![1, 2, 3]);
    }

    #[test]
    fn png_round_trip_with_metadata_and_crop() {
        let dir = std::env::temp_dir().join(format!("sd3-img-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (w, h) = (35, 18);
        let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 256) as u8).collect();
        let p = dir.join("a.png");
        save_png(&p, &rgb, w, h, &[("prompt", "a red fox".to_string())]).unwrap();
        assert_eq!(
            png_text(&p).unwrap(),
            vec![("prompt".to_string(), "a red fox".to_string())]
        );
        // Centre crop to multiples of 16: 35×18 → 32×16 from (1, 1).
        let (img, hh, ww) = load_image(&p, 16).unwrap();
        assert_eq!((hh, ww), (16, 32));
        let px = |x: usize, y: usize, c: usize| {
            rgb[((y + 1) * w + x + 1) * 3 + c] as f32 / 255.0 * 2.0 - 1.0
        };
        assert_eq!(img[0], px(0, 0, 0));
        assert_eq!(img[(2 * hh + 5) * ww + 7], px(7, 5, 2));
        let text = dir.join("t.png");
        std::fs::write(&text, "not an image").unwrap();
        let e = load_image(&text, 16).unwrap_err().to_string();
        assert!(
            e.contains("t.png") && e.contains("cannot read the image"),
            "{e}"
        );
        let small = dir.join("s.png");
        save_png(&small, &[0; 3 * 8 * 8], 8, 8, &[]).unwrap();
        assert!(load_image(&small, 16)
            .unwrap_err()
            .to_string()
            .contains("smaller than 16×16"));
    }
}

/// A LoRA on a GGUF MMDiT: the block-quantized weights keep their blocks and
/// the update runs beside them as a low-rank product (never a dequantized
/// copy); the result equals the LoRA merged into the same weights
/// dequantized to f32.
#[test]
fn lora_on_gguf_weights_runs_beside_the_blocks() {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    use sd3_wgpu::lora::{Architectures, Component, LoraSpec, Loras};
    use sd3_wgpu::ops::elementwise::Act;
    use sd3_wgpu::weights::text::TextSource;
    let gpu = gpu();
    let dir = std::env::temp_dir().join(format!("sd3-gguf-lora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |path: &std::path::Path, tensors: &[(String, Vec<usize>, Vec<f32>)]| {
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .zip(&bytes)
            .map(|((n, s, _), b)| {
                (
                    n.clone(),
                    TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    };
    // The GGUF's tensors dequantized, as a safetensors file.
    let gguf = fixture("mmdit/sd35l.gguf");
    let ck = Checkpoint::open(std::slice::from_ref(&gguf)).unwrap();
    let all: Vec<(String, Vec<usize>, Vec<f32>)> = ck
        .tensors
        .keys()
        .map(|n| {
            let (s, v) = ck.read_f32(n).unwrap();
            (n.clone(), s, v)
        })
        .collect();
    let dequant = dir.join("dequant.safetensors");
    write(&dequant, &all);
    // A kohya LoRA on three quantized matrices (fused qkv, the last block's
    // context modulation, an MLP projection), rank 4, alpha 2.
    let lora_path = dir.join("lora.safetensors");
    let mut lora = Vec::new();
    for (i, (module, out, inp)) in [
        ("joint_blocks_0_x_block_attn_qkv", 192, 64),
        ("joint_blocks_1_context_block_adaLN_modulation_1", 128, 64),
        ("joint_blocks_0_x_block_mlp_fc2", 64, 256),
    ]
    .into_iter()
    .enumerate()
    {
        let k = format!("lora_unet_{module}");
        let up: Vec<f32> = rand(700 + i as u64, out * 4)
            .iter()
            .map(|v| v * 0.2)
            .collect();
        let down: Vec<f32> = rand(710 + i as u64, 4 * inp)
            .iter()
            .map(|v| v / 8.0)
            .collect();
        lora.push((format!("{k}.lora_up.weight"), vec![out, 4], up));
        lora.push((format!("{k}.lora_down.weight"), vec![4, inp], down));
        lora.push((format!("{k}.alpha"), vec![], vec![2.0]));
    }
    write(&lora_path, &lora);
    let gguf_src = MmditSource::open(&gguf).unwrap();
    let float_src = MmditSource::open(&dequant).unwrap();
    let text = |n: &str| TextSource::open_folder(&fixture(&format!("text/{n}"))).unwrap();
    let clip_l = sd3_wgpu::models::clip::detect(&text("text_encoder"), Act::QuickGelu).unwrap();
    let clip_g = sd3_wgpu::models::clip::detect(&text("text_encoder_2"), Act::GeluErf).unwrap();
    let arch = Architectures {
        mmdit: &gguf_src.config,
        clip_l: &clip_l,
        clip_g: &clip_g,
        t5: None,
    };
    let spec = LoraSpec {
        path: lora_path,
        strength: 0.8,
    };
    let loras = Loras::load(gpu, &[spec], &arch, DType::F16).unwrap();
    let io = Checkpoint::open(&[fixture("mmdit/sd35l_io.safetensors")]).unwrap();
    let get = |k: &str| io.read_f32(&format!("case0.{k}")).unwrap();
    let (xs, x) = get("x");
    let (cs, ctx) = get("context");
    let (_, pooled) = get("pooled");
    let (_, t) = get("t");
    let run = |model: &Mmdit| {
        MmditRun::new(gpu, model, xs[0], xs[2], xs[3], cs[1])
            .unwrap()
            .run(gpu, &x, &ctx, &pooled, &t)
            .unwrap()
    };
    let cfg = &gguf_src.config;
    let beside = Mmdit::load_from(
        gpu,
        cfg,
        &loras.provider(Component::Mmdit, &gguf_src),
        DType::F16,
    )
    .unwrap();
    let qkv = &beside.joint_blocks[0].x_block.attn.qkv.weight;
    assert!(sd3_wgpu::quant::block(qkv.dtype).is_some() && qkv.low_rank.is_some());
    let merged = Mmdit::load_from(
        gpu,
        cfg,
        &loras.provider(Component::Mmdit, &float_src),
        DType::F32,
    )
    .unwrap();
    let plain = Mmdit::load(gpu, &gguf_src, DType::F16).unwrap();
    let (a, b, c) = (run(&beside), run(&merged), run(&plain));
    let want: Vec<f64> = b.iter().map(|&v| v as f64).collect();
    let e = rel_err(&a, &want);
    let d = rel_err(&c, &want);
    eprintln!("LoRA beside GGUF blocks vs merged into f32: {e:.2e} (without the LoRA: {d:.2e})");
    assert!(e <= 1e-5, "relative error {e:.3e}");
    assert!(d > 1e-3, "the LoRA changes little ({d:.2e})");
    let _ = std::fs::remove_dir_all(dir);
}

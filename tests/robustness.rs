//! Bad input of every kind ends in a clear error — never a panic, a hang, a
//! lost image or a half-written file (issue: "No panic, no hang, no lost image").

mod common;

use std::path::{Path, PathBuf};

use common::{fixtures_dir, reshape_entry, rewrite_safetensors, temp_dir};
use sd3_wgpu::files::{write_atomically, write_bytes};
use sd3_wgpu::image_io::{png_text, save_png};
use sd3_wgpu::models::mmdit::Mmdit;
use sd3_wgpu::models::{clip, t5::T5};
use sd3_wgpu::pipeline::{GenerateRequest, Latents, Pipeline, PipelineOptions};
use sd3_wgpu::weights::mmdit::MmditSource;
use sd3_wgpu::weights::text::TextSource;
use sd3_wgpu::weights::vae::VaeSource;
use sd3_wgpu::weights::Checkpoint;
use sd3_wgpu::DType;

fn fixture(rel: &str) -> PathBuf {
    fixtures_dir().join(rel)
}

/// The error of opening (and, if that works, loading) an MMDiT.
fn mmdit_err(path: &Path) -> String {
    match MmditSource::open(path) {
        Err(e) => e.to_string(),
        Ok(src) => match Mmdit::load(common::gpu(), &src, DType::F32) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{} loaded without error", path.display()),
        },
    }
}

const SD3: &str = "model.diffusion_model.";

// ---- 1. PNG metadata in any script ----------------------------------------

#[test]
fn png_metadata_in_any_script_reads_back_equal() {
    let dir = temp_dir("png-text");
    let long: String = "猫🐈 a cat, ".repeat(1000);
    let values = [
        "一只猫 🐈".to_string(),
        "מה שלום؟ مرحبا بالعالم".to_string(),
        "Grüße, café — ½".to_string(),
        "tab\there\r\nbell\u{7} nul\u{0} esc\u{1b}[31m c1\u{85}".to_string(),
        "👩‍👩‍👧 🇯🇵 ZWJ and flags".to_string(),
        long.clone(),
        String::new(),
        dir.join("ñ/路径/🐈.png").display().to_string(),
    ];
    let rgb = vec![7u8; 3 * 4 * 2];
    for (i, v) in values.iter().enumerate() {
        let p = dir.join(format!("{i}.png"));
        let warnings = save_png(
            &p,
            &rgb,
            4,
            2,
            &[
                ("prompt", v.clone()),
                ("parameters", format!("{v}\nSteps: 2")),
            ],
        )
        .unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let text = png_text(&p).unwrap();
        let get = |k: &str| text.iter().find(|(a, _)| a == k).map(|(_, b)| b.clone());
        assert_eq!(get("prompt").as_deref(), Some(v.as_str()), "value {i}");
        assert_eq!(get("parameters"), Some(format!("{v}\nSteps: 2")));
        assert_eq!(image::open(&p).unwrap().to_rgb8().as_raw(), &rgb);
    }
    assert!(long.len() > 10_000);
}

#[test]
fn a_field_png_cannot_hold_is_dropped_and_the_image_kept() {
    let dir = temp_dir("png-bad-key");
    let p = dir.join("x.png");
    let warnings = save_png(
        &p,
        &[1, 2, 3],
        1,
        1,
        &[
            ("", "empty key".into()),
            ("鍵", "not a Latin-1 key".into()),
            (&"k".repeat(80), "key too long".into()),
            ("prompt", "kept".into()),
        ],
    )
    .unwrap();
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    assert!(warnings[1].contains("鍵"), "{warnings:?}");
    assert_eq!(
        png_text(&p).unwrap(),
        vec![("prompt".into(), "kept".into())]
    );
}

#[test]
fn a1111_parameters_follow_the_web_ui_format() {
    let mut req = GenerateRequest::new("一只猫, on a mat");
    req.negative_prompt = "blurry".into();
    req.seed = 42;
    let s = sd3_wgpu::pipeline::Settings {
        steps: 28,
        cfg: 4.5,
        shift: 3.0,
        width: 1024,
        height: 768,
    };
    let meta = sd3_wgpu::pipeline::image_metadata(
        &req,
        &s,
        Path::new("/m/sd3.5_large.safetensors"),
        &[],
        &[],
    );
    let p = &meta.iter().find(|(k, _)| *k == "parameters").unwrap().1;
    let lines: Vec<&str> = p.lines().collect();
    assert_eq!(lines[0], "一只猫, on a mat");
    assert_eq!(lines[1], "Negative prompt: blurry");
    for part in [
        "Steps: 28",
        "Sampler: Euler",
        "CFG scale: 4.5",
        "Seed: 42",
        "Size: 1024x768",
        "Model: sd3.5_large",
    ] {
        assert!(lines[2].contains(part), "{part} missing from {p}");
    }
}

// ---- 2. Tensors of the wrong rank or size, absurd configs -----------------

#[test]
fn tensors_of_the_wrong_rank_or_size_are_named_not_panics() {
    let dir = temp_dir("ranks");
    let cases: Vec<(&str, Vec<usize>, &str)> = vec![
        ("context_embedder.weight", vec![], "2 positive dimensions"),
        (
            "context_embedder.weight",
            vec![64 * 208],
            "2 positive dimensions",
        ),
        (
            "context_embedder.weight",
            vec![64, 0],
            "2 positive dimensions",
        ),
        ("x_embedder.proj.weight", vec![64], "4 positive dimensions"),
        ("x_embedder.proj.weight", vec![64, 16, 2, 3], "square patch"),
        ("pos_embed", vec![1, 250, 64], "square grid"),
        ("pos_embed", vec![], "3 positive dimensions"),
        ("final_layer.linear.weight", vec![63, 64], "latent channels"),
        ("y_embedder.mlp.0.weight", vec![7], "2 positive dimensions"),
        (
            "joint_blocks.0.x_block.attn.qkv.weight",
            vec![],
            "[192, 64]",
        ),
        ("joint_blocks.1.x_block.mlp.fc2.bias", vec![0], "[64]"),
    ];
    for (i, (name, shape, want)) in cases.into_iter().enumerate() {
        let p = dir.join(format!("{i}.safetensors"));
        let full = format!("{SD3}{name}");
        rewrite_safetensors(&fixture("mmdit/sd3.safetensors"), &p, |l| {
            reshape_entry(l, &full, &shape)
        });
        let e = mmdit_err(&p);
        assert!(
            e.contains(&full) && e.contains(want) && e.contains(&format!("{i}.safetensors")),
            "{name} as {shape:?}: {e}"
        );
    }
}

#[test]
fn a_scalar_among_fused_parts_is_an_error() {
    // diffusers stores q, k, v apart: the first part a scalar used to index an empty shape.
    let dir = temp_dir("qkv");
    common::copy_dir(&fixture("mmdit/sd3/transformer"), &dir);
    let f = dir.join("diffusion_pytorch_model.safetensors");
    for part in ["to_q", "to_k"] {
        let name = format!("transformer_blocks.0.attn.{part}.weight");
        rewrite_safetensors(
            &fixture("mmdit/sd3/transformer/diffusion_pytorch_model.safetensors"),
            &f,
            |l| reshape_entry(l, &name, &[]),
        );
        let e = mmdit_err(&dir);
        assert!(e.contains(&name) || e.contains("to_q"), "{part}: {e}");
    }
}

/// A copy of a fixture folder with its config.json's `key` set to `value`.
fn with_config(src: &str, name: &str, key: &str, value: serde_json::Value) -> PathBuf {
    let dir = temp_dir(name);
    common::copy_dir(&fixture(src), &dir);
    let p = dir.join("config.json");
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    j[key] = value;
    std::fs::write(&p, j.to_string()).unwrap();
    dir
}

#[test]
fn absurd_config_values_are_refused_with_their_key() {
    use serde_json::json;
    let huge = json!(u64::MAX);
    let mmdit = [
        ("num_attention_heads", huge.clone(), "num_attention_heads"),
        ("num_attention_heads", json!(1e300), "num_attention_heads"),
        ("attention_head_dim", json!(-3), "attention_head_dim"),
        ("patch_size", json!(1_000_000_000u64), "patch_size"),
        ("num_layers", json!(3), "transformer_blocks.N.*"),
        ("in_channels", json!(4), "pos_embed.proj.weight"),
        ("qk_norm", json!("layer_norm"), "qk_norm"),
        ("pos_embed_max_size", json!("big"), "pos_embed_max_size"),
    ];
    for (i, (k, v, want)) in mmdit.into_iter().enumerate() {
        let d = with_config("mmdit/sd3/transformer", &format!("mcfg{i}"), k, v.clone());
        let e = mmdit_err(&d);
        assert!(e.contains(want), "{k} = {v}: {e}");
    }
    let vae = [
        ("norm_num_groups", json!(0), "norm_num_groups"),
        ("norm_num_groups", json!(7), "GroupNorm groups"),
        ("norm_num_groups", huge.clone(), "norm_num_groups"),
        ("scaling_factor", json!(0.0), "scaling_factor"),
        ("scaling_factor", json!(-1e308), "scaling_factor"),
        ("shift_factor", json!("x"), "shift_factor"),
        (
            "block_out_channels",
            json!([32, 64, 128]),
            "block_out_channels",
        ),
    ];
    for (i, (k, v, want)) in vae.into_iter().enumerate() {
        let d = with_config("vae/vae", &format!("vcfg{i}"), k, v.clone());
        let e = VaeSource::open(&d).err().map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains(want)),
            "{k} = {v}: {e:?}"
        );
    }
    let clip_cases = [
        ("num_attention_heads", huge.clone(), "num_attention_heads"),
        ("num_attention_heads", json!(3), "head dim"),
        ("layer_norm_eps", json!(-1.0), "layer_norm_eps"),
        ("layer_norm_eps", json!(0.0), "layer_norm_eps"),
        ("eos_token_id", json!(-1), "eos_token_id"),
        ("hidden_act", json!("relu"), "hidden_act"),
    ];
    for (i, (k, v, want)) in clip_cases.into_iter().enumerate() {
        let d = with_config("text/text_encoder", &format!("ccfg{i}"), k, v.clone());
        let src = TextSource::open_folder(&d).unwrap();
        let e = clip::detect(&src, sd3_wgpu::ops::elementwise::Act::QuickGelu)
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains(want)),
            "{k} = {v}: {e:?}"
        );
    }
    let t5_cases = [
        (
            "relative_attention_max_distance",
            json!(0),
            "relative_attention_max_distance",
        ),
        (
            "relative_attention_max_distance",
            huge.clone(),
            "relative_attention_max_distance",
        ),
        (
            "relative_attention_num_buckets",
            json!(64),
            "relative_attention_bias",
        ),
        ("layer_norm_epsilon", json!(f64::MAX), "layer_norm_epsilon"),
    ];
    for (i, (k, v, want)) in t5_cases.into_iter().enumerate() {
        let d = with_config("text/text_encoder_3", &format!("tcfg{i}"), k, v.clone());
        let src = TextSource::open_folder(&d).unwrap();
        let e = T5::detect(&src).err().map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains(want)),
            "{k} = {v}: {e:?}"
        );
    }
}

#[test]
fn t5_bias_with_fewer_rows_than_buckets_names_the_tensor() {
    let dir = temp_dir("t5-bias");
    common::copy_dir(&fixture("text/text_encoder_3"), &dir);
    let name = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight";
    let f = dir.join("model.safetensors");
    rewrite_safetensors(&fixture("text/text_encoder_3/model.safetensors"), &f, |l| {
        let t = l.iter_mut().find(|t| t.0 == name).unwrap();
        let row = t.3.len() / t.2[0];
        t.2[0] = 16;
        t.3.truncate(16 * row);
    });
    let e = T5::detect(&TextSource::open_folder(&dir).unwrap())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains(name) && e.contains("[16, 2]") && e.contains("32 rows"),
        "{e}"
    );
    // Without a config the table's rows are the bucket count, but too few to bucket at all is refused.
    std::fs::remove_file(dir.join("config.json")).unwrap();
    rewrite_safetensors(&fixture("text/text_encoder_3/model.safetensors"), &f, |l| {
        let t = l.iter_mut().find(|t| t.0 == name).unwrap();
        let row = t.3.len() / t.2[0];
        t.2[0] = 2;
        t.3.truncate(2 * row);
    });
    let e = T5::detect(&TextSource::open_folder(&dir).unwrap())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("relative-position buckets is 2"), "{e}");
}

// ---- 3. Sharded folders stay inside their folder ---------------------------

fn sharded_copy(name: &str) -> PathBuf {
    let dir = temp_dir(name);
    common::copy_dir(&fixture("mmdit/sd35m/transformer"), &dir);
    dir
}

fn set_shard(dir: &Path, tensor: &str, file: &str) {
    let p = dir.join("diffusion_pytorch_model.safetensors.index.json");
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    j["weight_map"][tensor] = serde_json::Value::String(file.into());
    std::fs::write(&p, j.to_string()).unwrap();
}

#[test]
fn shard_names_leaving_the_folder_or_not_files_are_refused() {
    let outside = temp_dir("outside");
    std::fs::copy(
        fixture("mmdit/sd35m/transformer/diffusion_pytorch_model-00001-of-00003.safetensors"),
        outside.join("x.safetensors"),
    )
    .unwrap();
    let fifo_dir = sharded_copy("fifo");
    let fifo = fifo_dir.join("pipe.safetensors");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let cases = [
        "../outside/x.safetensors",
        "/etc/passwd",
        "sub/x.safetensors",
        "..",
        ".",
        "",
        "pipe.safetensors",
        "folder",
        "dev",
    ];
    for (i, f) in cases.iter().enumerate() {
        let dir = if *f == "pipe.safetensors" {
            fifo_dir.clone()
        } else {
            sharded_copy(&format!("shard{i}"))
        };
        std::fs::create_dir_all(dir.join("folder")).unwrap();
        let _ = std::os::unix::fs::symlink("/dev/zero", dir.join("dev"));
        set_shard(&dir, "context_embedder.bias", f);
        let e = mmdit_err(&dir);
        assert!(
            e.contains("weight_map entry 'context_embedder.bias'") && e.contains("index.json"),
            "{f:?}: {e}"
        );
    }
    // A FIFO or device given directly is refused at once, not read (or waited on).
    let e = Checkpoint::open(&[fifo]).err().unwrap().to_string();
    assert!(e.contains("not a regular file"), "{e}");
    let e = Checkpoint::open(&[PathBuf::from("/dev/zero")])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not a regular file"), "{e}");
}

#[test]
fn symlinked_shards_as_in_the_hub_cache_load() {
    let blobs = temp_dir("blobs");
    let dir = temp_dir("snapshot");
    let src = fixture("mmdit/sd35m/transformer");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        let blob = blobs.join(format!("blob-{}", e.file_name().to_string_lossy()));
        std::fs::copy(e.path(), &blob).unwrap();
        std::os::unix::fs::symlink(&blob, dir.join(e.file_name())).unwrap();
    }
    let src = MmditSource::open(&dir).unwrap();
    assert!(Mmdit::load(common::gpu(), &src, DType::F32).is_ok());
}

#[test]
fn a_tensor_in_two_shards_or_in_the_wrong_shard_is_an_error() {
    let dir = sharded_copy("dup");
    let s1 = "diffusion_pytorch_model-00001-of-00003.safetensors";
    let s2 = "diffusion_pytorch_model-00002-of-00003.safetensors";
    let extra = Checkpoint::open(&[dir.join(s1)]).unwrap();
    let (name, e1) = extra.tensors.iter().next().unwrap();
    let (name, dtype, shape, bytes) = (
        name.clone(),
        e1.dtype,
        e1.shape.clone(),
        extra.bytes(e1).unwrap(),
    );
    drop(extra);
    let p2 = dir.join(s2);
    let orig = std::fs::read(&p2).unwrap();
    let tmp = dir.join("orig2.bin");
    std::fs::write(&tmp, &orig).unwrap();
    rewrite_safetensors(&tmp, &p2, |l| l.push((name.clone(), dtype, shape, bytes)));
    std::fs::remove_file(&tmp).unwrap();
    let e = mmdit_err(&dir);
    assert!(e.contains(&name) && e.contains("also in"), "{e}");
    // The index naming another shard than the one holding the tensor.
    let dir = sharded_copy("wrong-shard");
    set_shard(&dir, "context_embedder.bias", s2);
    let e = mmdit_err(&dir);
    assert!(
        e.contains("context_embedder.bias") && e.contains("listed in"),
        "{e}"
    );
}

// ---- 4. Arguments checked before any loading -------------------------------

fn pipeline() -> &'static Pipeline {
    static P: std::sync::OnceLock<Pipeline> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        let options = PipelineOptions {
            dtype: DType::F32,
            ..PipelineOptions::default()
        };
        Pipeline::load(&common::pipeline_folder("sd3"), options).unwrap()
    })
}

#[test]
fn bad_requests_fail_in_check_before_any_weights_load() {
    let pipe = pipeline();
    let base = || {
        let mut r = GenerateRequest::new("a cat");
        r.steps = Some(1);
        r.width = Some(32);
        r.height = Some(32);
        r
    };
    let grid = pipe.config().pos_embed_max;
    type Edit = Box<dyn Fn(&mut GenerateRequest)>;
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|r| r.steps = Some(usize::MAX)), "--steps"),
        (Box::new(|r| r.steps = Some(0)), "--steps"),
        (Box::new(|r| r.batch = usize::MAX), "--batch"),
        (Box::new(|r| r.batch = 0), "--batch"),
        (
            Box::new(|r| r.max_t5_tokens = usize::MAX),
            "--max-t5-tokens",
        ),
        (Box::new(|r| r.cfg = Some(f32::NAN)), "--cfg"),
        (Box::new(|r| r.cfg = Some(f32::INFINITY)), "--cfg"),
        (Box::new(|r| r.cfg = Some(-1.0)), "--cfg"),
        (Box::new(|r| r.shift = Some(0.0)), "--shift"),
        (Box::new(|r| r.shift = Some(f64::NAN)), "--shift"),
        (Box::new(|r| r.shift = Some(-3.0)), "--shift"),
        (Box::new(|r| r.strength = f64::NAN), "--strength"),
        (Box::new(|r| r.slg_scale = f32::NAN), "--slg-scale"),
        (Box::new(|r| r.slg_start = 2.0), "--slg-start"),
        (
            Box::new(|r| {
                r.slg_start = 0.5;
                r.slg_stop = 0.1
            }),
            "after --slg-stop",
        ),
        (Box::new(|r| r.slg_layers = vec![99]), "--slg-layers 99"),
        (
            Box::new(move |r| r.width = Some(4 * (grid + 1))),
            "position grid",
        ),
        (Box::new(|r| r.height = Some(usize::MAX - 15)), "--height"),
        (Box::new(|r| r.width = Some(30)), "multiples of 4"),
        (Box::new(|r| r.prompt = "x".repeat(2 << 20)), "--prompt"),
        (
            Box::new(|r| {
                r.init_latents = Some(Latents {
                    shape: vec![1, 16, 8, 32],
                    data: vec![0.0; 4096],
                })
            }),
            "[1, 16, 16, 16]",
        ),
        (
            Box::new(|r| {
                r.init_latents = Some(Latents {
                    shape: vec![1, 16, 16, 16],
                    data: vec![f32::NAN; 4096],
                })
            }),
            "NaN",
        ),
        (
            Box::new(|r| r.init_image = Some("/no/such/image.png".into())),
            "/no/such/image.png",
        ),
    ];
    let before = pipe.gpu.memory.current();
    for (i, (edit, want)) in cases.iter().enumerate() {
        let mut r = base();
        edit(&mut r);
        let e = pipe.check(&r).err().map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains(want)),
            "case {i}: {e:?}"
        );
        let e = pipe
            .generate(&r, &mut |_, _| {})
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains(want)),
            "case {i}: {e:?}"
        );
        assert!(
            pipe.gpu.memory.peak() <= before + 64,
            "case {i}: weights were uploaded before the request was refused"
        );
    }
    assert!(pipe.check(&base()).is_ok());
}

// ---- 5. Outputs whole or not at all -----------------------------------------

#[test]
fn concurrent_writers_never_collide_or_leave_parts() {
    let dir = temp_dir("atomic");
    let target = dir.join("out.bin");
    let contents: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 1 << 18]).collect();
    std::thread::scope(|s| {
        for c in &contents {
            let t = target.clone();
            s.spawn(move || write_bytes(&t, c).unwrap());
        }
    });
    let got = std::fs::read(&target).unwrap();
    assert!(
        contents.contains(&got),
        "the file is one writer's whole content"
    );
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("out.bin")],
        "no temporary files left"
    );
    // A failing writer leaves nothing behind, and the old content stays.
    let r = write_atomically(&target, |w| {
        w.write_all(b"half").unwrap();
        Err(sd3_wgpu::Error::Io("disk full".into()))
    });
    assert!(r.is_err());
    assert_eq!(std::fs::read(&target).unwrap(), got);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
}

#[test]
fn an_existing_symlink_is_replaced_not_followed_and_folders_are_refused() {
    let dir = temp_dir("symlink-out");
    let victim = dir.join("victim.txt");
    std::fs::write(&victim, "keep me").unwrap();
    let link = dir.join("out.png");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    write_bytes(&link, b"new").unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
    assert!(!std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(&link).unwrap(), b"new");
    let e = write_bytes(&dir, b"x").unwrap_err().to_string();
    assert!(e.contains("is a folder"), "{e}");
}

// ---- 6. GPU faults are errors ----------------------------------------------

#[test]
fn a_lost_device_during_generate_says_device_lost() {
    let options = PipelineOptions {
        dtype: DType::F32,
        ..PipelineOptions::default()
    };
    let pipe = Pipeline::load(&common::pipeline_folder("sd3"), options).unwrap();
    let mut r = GenerateRequest::new("a cat");
    r.steps = Some(3);
    r.width = Some(32);
    r.height = Some(32);
    r.max_t5_tokens = 8;
    let gpu = &pipe.gpu;
    let e = pipe
        .generate(&r, &mut |step, _| {
            if step == 1 {
                gpu.device.destroy();
            }
        })
        .err()
        .map(|e| e.to_string());
    assert!(
        e.as_deref().is_some_and(|e| e.contains("device was lost")),
        "{e:?}"
    );
}

#[test]
fn validation_errors_outside_our_checks_are_errors_not_panics() {
    let gpu = common::gpu();
    let b = sd3_wgpu::tensor::create_storage(gpu, "t", 64).unwrap();
    let e = gpu
        .write_buffer("a misaligned write", &b, &[1, 2, 3])
        .unwrap_err();
    assert!(e.to_string().contains("a misaligned write"), "{e}");
    // The device stays usable.
    gpu.write_buffer("an aligned write", &b, &[0; 8]).unwrap();
    gpu.check_health().unwrap();
}

// ---- 7. Files that change underneath ----------------------------------------

#[test]
fn a_checkpoint_truncated_after_open_is_an_error_not_sigbus() {
    let dir = temp_dir("truncate");
    let p = dir.join("sd3.safetensors");
    std::fs::copy(fixture("mmdit/sd3.safetensors"), &p).unwrap();
    let src = MmditSource::open(&p).unwrap();
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    let e = Mmdit::load(common::gpu(), &src, DType::F32)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("sd3.safetensors") && e.contains("truncated"),
        "{e}"
    );
}

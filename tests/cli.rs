//! The `sd3` binary as a user runs it.

use std::process::Command;

fn sd3(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sd3"))
        .args(args)
        .output()
        .expect("run sd3");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn devices_lists_adapters_with_limits_and_features() {
    let (ok, out, err) = sd3(&["devices"]);
    assert!(ok, "{err}");
    assert!(out.contains("[0] "), "{out}");
    assert!(out.contains("max_storage_buffer_binding_size"), "{out}");
    assert!(out.contains("timestamp-query"), "{out}");
}

#[test]
fn bench_kernels_small_prints_throughput() {
    let (ok, out, err) = sd3(&["bench", "kernels", "--small", "--reps", "1"]);
    assert!(ok, "{err}");
    assert!(out.contains("GFLOP/s"), "{out}");
    assert!(out.contains("linear 333x192"), "{out}");
    assert!(out.contains("attention 1x3x333x64"), "{out}");
    assert!(out.contains("flash") && out.contains("composed"), "{out}");
    let (ok, _, err) = sd3(&["--kernels", "fastest", "bench", "kernels", "--small"]);
    assert!(!ok && err.contains("fastest"), "{err}");
}

#[test]
fn bad_backend_and_adapter_are_clear_errors() {
    let (ok, _, err) = sd3(&["--backend", "glide", "devices"]);
    assert!(!ok);
    assert!(err.contains("unknown backend 'glide'"), "{err}");
    let (ok, _, err) = sd3(&["--adapter", "no-such-gpu", "bench", "kernels", "--small"]);
    assert!(!ok);
    assert!(err.contains("no GPU adapter matches"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn inspect_prints_the_detected_variant() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let (ok, out, err) = sd3(&[
        "inspect",
        &format!("{dir}/tests/fixtures/mmdit/sd35l.safetensors"),
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("variant: custom MMDiT (depth 2, hidden 64, heads 1"),
        "{out}"
    );
    assert!(out.contains("qk RMSNorm"), "{out}");
    // GGUF files: the blocks and their GPU size; a T5 encoder in llama.cpp's names.
    let (ok, out, err) = sd3(&[
        "inspect",
        &format!("{dir}/tests/fixtures/pipeline/sd35l.gguf"),
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("Q4_0 ×") && out.contains("MiB on the GPU"),
        "{out}"
    );
    let (ok, out, err) = sd3(&["inspect", &format!("{dir}/tests/fixtures/text/t5.gguf")]);
    assert!(ok, "{err}");
    assert!(
        out.contains("t5xxl        present") && out.contains("Q8_0 ×"),
        "{out}"
    );
    let (ok, _, err) = sd3(&["inspect", &format!("{dir}/README.md")]);
    assert!(!ok);
    assert!(
        err.contains("README.md: not a readable safetensors file"),
        "{err}"
    );
}

fn fixture(rel: &str) -> String {
    format!("{}/tests/fixtures/{rel}", env!("CARGO_MANIFEST_DIR"))
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sd3-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn decode_writes_pngs_that_match_diffusers() {
    let dir = temp_dir("decode");
    let out = dir.join("img.png");
    let (ok, stdout, err) = sd3(&[
        "decode",
        "--model",
        &fixture("vae/vae.safetensors"),
        "--latents",
        &fixture("vae/vae_io.safetensors"),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(
        stdout.contains("img-0.png") && stdout.contains("img-1.png"),
        "{stdout}"
    );
    // Pixels as diffusers' postprocess gives them (fixture rgb8 is NHWC).
    let ck =
        sd3_wgpu::weights::Checkpoint::open(&[fixture("vae/vae_io.safetensors").into()]).unwrap();
    let e = &ck.tensors["rgb8"];
    let want = ck.bytes(e).unwrap();
    let per = want.len() / 2;
    for i in 0..2 {
        let img = image::open(dir.join(format!("img-{i}.png")))
            .unwrap()
            .to_rgb8();
        assert_eq!((img.width(), img.height()), (14, 10));
        let got = img.as_raw();
        let close = got
            .iter()
            .zip(&want[i * per..][..per])
            .filter(|(a, b)| a.abs_diff(**b) <= 1)
            .count();
        assert_eq!(
            close, per,
            "image {i}: every pixel within 1/255 of diffusers"
        );
    }
    let text = sd3_wgpu::image_io::png_text(&dir.join("img-0.png")).unwrap();
    assert!(
        text.iter()
            .any(|(k, v)| k == "sd3:latents" && v.ends_with("vae_io.safetensors")),
        "{text:?}"
    );
    // Tiled on request, same size.
    let (ok, _, err) = sd3(&[
        "decode",
        "--model",
        &fixture("vae"),
        "--latents",
        &fixture("vae/vae_io.safetensors"),
        "--out",
        dir.join("tiled.png").to_str().unwrap(),
        "--vae-tile",
        "4",
        "--tile-overlap",
        "2",
    ]);
    assert!(ok, "{err}");
    assert_eq!(image::open(dir.join("tiled-1.png")).unwrap().width(), 14);
}

#[test]
fn decode_bad_inputs_are_clear_and_write_nothing() {
    let dir = temp_dir("decode-bad");
    // Latents with 4 channels (an SD1 latent, say).
    let bad = dir.join("bad.safetensors");
    let data = vec![0u8; 4 * 4 * 5 * 5];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 4, 5, 5], &data)
            .unwrap();
    safetensors::serialize_to_file(vec![("latents", view)], None, &bad).unwrap();
    let out = dir.join("x.png");
    let run = |model: &str, latents: &str, out: &str| {
        sd3(&[
            "decode",
            "--model",
            model,
            "--latents",
            latents,
            "--out",
            out,
        ])
    };
    let (ok, _, err) = run(
        &fixture("vae"),
        bad.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    assert!(
        !ok && err.contains("'latents' must be [batch") && err.contains("found [1, 4, 5, 5]"),
        "{err}"
    );
    let (ok, _, err) = run(
        &fixture("mmdit/sd3.safetensors"),
        &fixture("vae/vae_io.safetensors"),
        out.to_str().unwrap(),
    );
    assert!(!ok && err.contains("no VAE decoder found"), "{err}");
    let (ok, _, err) = run(
        &fixture("vae"),
        &fixture("vae/vae_io.safetensors"),
        dir.join("no/such/dir/x.png").to_str().unwrap(),
    );
    assert!(!ok && err.contains("does not exist"), "{err}");
    let (ok, _, err) = run(
        &fixture("vae"),
        &fixture("mmdit/sd3_io.safetensors"),
        out.to_str().unwrap(),
    );
    assert!(!ok && err.contains("'latents' is missing"), "{err}");
    assert!(!err.contains("panicked"));
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("bad.safetensors")],
        "nothing written"
    );
}

mod common;

/// A prompt as users write them: CJK, emoji (with a ZWJ sequence), RTL.
const PROMPT: &str = "一只红狐狸 🦊 in fresh snow, 👩‍🎨 style, «mañana»";
const NEGATIVE: &str = "ضبابي, размытый";

#[test]
fn generate_writes_image_metadata_and_latents() {
    let model = common::pipeline_folder("sd35l");
    let dir = temp_dir("generate");
    let out = dir.join("fox.png");
    let lat = dir.join("fox.safetensors");
    let (ok, stdout, err) = sd3(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--negative-prompt",
        NEGATIVE,
        "--steps",
        "2",
        "--cfg",
        "4",
        "--seed",
        "7",
        "--rng",
        "torch",
        "--width",
        "20",
        "--height",
        "12",
        "--max-t5-tokens",
        "16",
        "--dtype",
        "f32",
        "--out",
        out.to_str().unwrap(),
        "--save-latents",
        lat.to_str().unwrap(),
        "--profile",
    ]);
    assert!(ok, "{err}");
    assert!(
        stdout.contains("wrote") && stdout.contains("peak GPU memory"),
        "{stdout}"
    );
    assert!(
        stdout.contains("mmdit.block0.joint_attn.attention"),
        "{stdout}"
    );
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (20, 12));
    let text = sd3_wgpu::image_io::png_text(&out).unwrap();
    for (k, v) in [
        ("prompt", PROMPT),
        ("negative_prompt", NEGATIVE),
        ("seed", "7"),
        ("steps", "2"),
        ("cfg", "4"),
        ("rng", "torch"),
    ] {
        assert!(
            text.iter().any(|(a, b)| a == k && b == v),
            "{k}={v} missing from {text:?}"
        );
    }
    let params = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(
        params.starts_with(&format!(
            "{PROMPT}\nNegative prompt: {NEGATIVE}\nSteps: 2, "
        )),
        "{params}"
    );
    // The saved latents decode to the same image.
    let again = dir.join("again.png");
    let (ok, _, err) = sd3(&[
        "decode",
        "--model",
        model.to_str().unwrap(),
        "--latents",
        lat.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        image::open(&again).unwrap().to_rgb8().as_raw(),
        img.to_rgb8().as_raw()
    );
}

/// Inpainting from the command line: the mask and its blur reach the
/// pipeline and the PNG's metadata, so the run can be repeated from it.
#[test]
fn generate_inpaints_and_records_the_mask() {
    let model = common::pipeline_folder("sd35m");
    let dir = temp_dir("inpaint");
    let out = dir.join("inpainted.png");
    let (init, mask) = (fixture("pipeline/init.png"), fixture("pipeline/mask.png"));
    let (ok, _, err) = sd3(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--steps",
        "2",
        "--cfg",
        "1",
        "--max-t5-tokens",
        "16",
        "--dtype",
        "f32",
        "--init-image",
        &init,
        "--mask",
        &mask,
        "--mask-blur",
        "1.5",
        "--strength",
        "0.9",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let text = sd3_wgpu::image_io::png_text(&out).unwrap();
    for (k, v) in [
        ("init_image", init.as_str()),
        ("mask", mask.as_str()),
        ("mask_blur", "1.5"),
        ("strength", "0.9"),
    ] {
        assert!(
            text.iter().any(|(a, b)| a == k && b == v),
            "{k}={v} missing from {text:?}"
        );
    }
    let params = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(params.contains("Denoising strength: 0.9"), "{params}");
    assert!(params.contains("Mask blur: 1.5"), "{params}");
    // A mask without an init image is refused by the command line itself.
    let (ok, _, err) = sd3(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--mask",
        &mask,
        "--out",
        dir.join("no.png").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("--init-image"), "{err}");
    assert!(!dir.join("no.png").exists());
}

/// LoRAs from the command line (f16 weights: merged into packed f16 on the
/// GPU), named with their strengths and hashes in the PNG.
#[test]
fn generate_with_loras_records_them() {
    let model = common::pipeline_folder("sd35m");
    let dir = temp_dir("lora");
    let out = dir.join("lora.png");
    let (kohya, comfy) = (
        fixture("lora/kohya.safetensors"),
        fixture("lora/comfy.safetensors"),
    );
    let (ok, _, err) = sd3(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--steps",
        "2",
        "--max-t5-tokens",
        "16",
        "--width",
        "20",
        "--height",
        "12",
        "--lora",
        &format!("{kohya}:0.7"),
        "--lora",
        &comfy,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("LoRA") && err.contains("modules of the MMDiT"),
        "{err}"
    );
    let text = sd3_wgpu::image_io::png_text(&out).unwrap();
    let loras = &text.iter().find(|(k, _)| k == "loras").unwrap().1;
    let lines: Vec<&str> = loras.lines().collect();
    assert_eq!(lines.len(), 2, "{loras}");
    assert!(
        lines[0].starts_with(&format!("{kohya}:0.7 sha256=")),
        "{loras}"
    );
    assert!(
        lines[1].starts_with(&format!("{comfy}:1 sha256=")),
        "{loras}"
    );
    let params = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(params.contains("Lora hashes: \"kohya: "), "{params}");
}

/// A ControlNet from the command line, recorded in the PNG; a control image
/// missing for a ControlNet is refused before anything runs.
#[test]
fn generate_with_a_controlnet_records_it() {
    let model = common::pipeline_folder("sd3");
    let dir = temp_dir("controlnet");
    let out = dir.join("controlled.png");
    let (net, image) = (
        fixture("controlnet/joint_a"),
        fixture("pipeline/control_a.png"),
    );
    let args = |extra: &[&str]| {
        let mut v = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            PROMPT,
            "--steps",
            "2",
            "--max-t5-tokens",
            "16",
            "--out",
            out.to_str().unwrap(),
            "--controlnet",
            &net,
        ];
        v.extend_from_slice(extra);
        sd3(&v)
    };
    let (ok, _, err) = args(&["--control-scale", "0.8", "--control-stop", "0.5"]);
    assert!(
        !ok && err.contains("0 --control-image for 1 --controlnet"),
        "{err}"
    );
    assert!(!out.exists());
    let (ok, _, err) = args(&[
        "--control-image",
        &image,
        "--control-scale",
        "0.8",
        "--control-stop",
        "0.5",
    ]);
    assert!(ok, "{err}");
    let text = sd3_wgpu::image_io::png_text(&out).unwrap();
    let nets = &text.iter().find(|(k, _)| k == "controlnets").unwrap().1;
    assert_eq!(
        nets,
        &format!("{net} image={image} scale=0.8 start=0 stop=0.5")
    );
    let params = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(
        params.contains("ControlNet 0: \"Model: joint_a, Image: "),
        "{params}"
    );
}

/// A GGUF transformer (city96's layout) with the VAE, CLIP and a GGUF T5
/// encoder from separate files, as ComfyUI users have them; without --vae
/// the error says what is missing.
#[test]
fn generate_from_a_gguf_transformer_with_separate_parts() {
    let dir = temp_dir("gguf");
    let out = dir.join("gguf.png");
    let text = fixture("text");
    let args = |vae: bool| {
        let mut v: Vec<String> = [
            "generate",
            "--model",
            &fixture("pipeline/sd35l.gguf"),
            "--clip-l",
            &format!("{text}/text_encoder"),
            "--clip-g",
            &format!("{text}/text_encoder_2"),
            "--t5",
            &format!("{text}/t5.gguf"),
            "--tokenizers",
            &text,
            "--prompt",
            PROMPT,
            "--steps",
            "2",
            "--width",
            "20",
            "--height",
            "12",
            "--max-t5-tokens",
            "16",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if vae {
            v.extend(["--vae".to_string(), fixture("vae/vae")]);
        }
        v
    };
    let run = |v: Vec<String>| {
        let v: Vec<&str> = v.iter().map(|s| s.as_str()).collect();
        sd3(&v)
    };
    let (ok, _, err) = run(args(false));
    assert!(
        !ok && err.contains("sd35l.gguf") && err.contains("no VAE decoder"),
        "{err}"
    );
    assert!(!out.exists());
    let (ok, _, err) = run(args(true));
    assert!(ok, "{err}");
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (20, 12));
    // Without --tokenizers a single file takes the built-in tokenizers, which
    // do not fit these tiny fixture encoders: the error says so.
    let mut v = args(true);
    let i = v.iter().position(|a| a == "--tokenizers").unwrap();
    v.drain(i..i + 2);
    std::fs::remove_file(&out).unwrap();
    let (ok, _, err) = run(v);
    assert!(
        !ok && err.contains("(built-in CLIP-L tokenizer)") && err.contains("--tokenizers"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn generate_bad_inputs_are_clear_and_write_nothing() {
    let model = common::pipeline_folder("sd3");
    let dir = temp_dir("generate-bad");
    let out = dir.join("x.png");
    let m = model.to_str().unwrap();
    let o = out.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate", "--prompt", "a cat", "--steps", "1", "--dtype", "f32",
        ];
        args.extend_from_slice(extra);
        sd3(&args)
    };
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--model", "/no/such/model", "--out", o],
            "no such model",
        ),
        (
            vec!["--model", env!("CARGO_MANIFEST_DIR"), "--out", o],
            "not an SD3 model folder",
        ),
        (
            vec![
                "--model",
                concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"),
                "--out",
                o,
            ],
            "not a readable safetensors file",
        ),
        (
            vec!["--model", m, "--out", o, "--width", "13", "--height", "12"],
            "multiples of 4",
        ),
        (
            vec!["--model", m, "--out", o, "--init-image", "/no/such.png"],
            "/no/such.png",
        ),
        (
            vec!["--model", m, "--out", "/no/such/dir/x.png"],
            "does not exist",
        ),
        (
            vec![
                "--model",
                m,
                "--out",
                o,
                "--init-latents",
                "/no/latents.safetensors",
            ],
            "/no/latents.safetensors",
        ),
    ];
    let model_file = model.join("transformer/diffusion_pytorch_model.safetensors");
    let model_bytes = std::fs::read(&model_file).unwrap();
    let mf = model_file.to_str().unwrap();
    let elsewhere = temp_dir("generate-bad-inputs");
    // Latents with the element count of [1, 16, 8, 8] but another shape.
    let lat = elsewhere.join("lat.safetensors");
    sd3_wgpu::decode::write_latents(&lat, [1, 16, 4, 16], &[0.0; 1024]).unwrap();
    let fifo = elsewhere.join("fifo.png");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let d = dir.to_str().unwrap();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    let more: Vec<(Vec<String>, &str)> = vec![
        (s(&["--model", m, "--out", o, "--cfg", "nan"]), "--cfg"),
        (s(&["--model", m, "--out", o, "--shift", "0"]), "--shift"),
        (
            s(&["--model", m, "--out", o, "--steps", "18446744073709551615"]),
            "--steps",
        ),
        (
            s(&["--model", m, "--out", o, "--batch", "18446744073709551615"]),
            "--batch",
        ),
        (
            s(&[
                "--model",
                m,
                "--out",
                o,
                "--max-t5-tokens",
                "18446744073709551615",
            ]),
            "--max-t5-tokens",
        ),
        (
            s(&[
                "--model", m, "--out", o, "--width", "4096", "--height", "32",
            ]),
            "position grid",
        ),
        (
            s(&["--model", m, "--out", o, "--slg-layers", "7"]),
            "--slg-layers",
        ),
        (
            s(&["--model", m, "--out", o, "--vae-tile", "0"]),
            "--vae-tile",
        ),
        (s(&["--model", m, "--out", d]), "is a folder"),
        (
            s(&["--model", m, "--out", mf, "--width", "32", "--height", "32"]),
            "would overwrite the input",
        ),
        (
            s(&[
                "--model",
                m,
                "--out",
                o,
                "--width",
                "32",
                "--height",
                "32",
                "--trace",
                &format!("{m}/transformer/config.json"),
            ]),
            "would overwrite the input",
        ),
        (
            s(&["--model", m, "--out", o, "--save-latents", o]),
            "name the same file",
        ),
        (
            s(&[
                "--model",
                m,
                "--out",
                o,
                "--width",
                "16",
                "--height",
                "16",
                "--init-latents",
                lat.to_str().unwrap(),
            ]),
            "[1, 16, 8, 8]",
        ),
        (
            s(&[
                "--model",
                m,
                "--out",
                o,
                "--save-latents",
                lat.to_str().unwrap(),
                "--init-latents",
                lat.to_str().unwrap(),
                "--width",
                "16",
                "--height",
                "64",
            ]),
            "would overwrite the input",
        ),
        (
            s(&[
                "--model",
                m,
                "--out",
                o,
                "--init-image",
                fifo.to_str().unwrap(),
            ]),
            "not a regular file",
        ),
    ];
    let cases: Vec<(Vec<String>, &str)> = cases
        .into_iter()
        .map(|(v, w)| (s(&v), w))
        .chain(more)
        .collect();
    for (extra, want) in cases {
        let extra: Vec<&str> = extra.iter().map(|x| x.as_str()).collect();
        let (ok, _, err) = run(&extra);
        assert!(!ok, "{extra:?} succeeded");
        assert!(
            err.contains(want) && !err.contains("panicked"),
            "{extra:?}: {err}"
        );
    }
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "nothing written"
    );
    assert_eq!(
        std::fs::read(&model_file).unwrap(),
        model_bytes,
        "the model is untouched"
    );
}

#[test]
fn bench_tiny_runs_every_stage_and_writes_json_trace_and_png() {
    let dir = temp_dir("bench");
    let (json, trace, png) = (dir.join("b.json"), dir.join("t.json"), dir.join("b.png"));
    let (ok, out, err) = sd3(&[
        "bench",
        "--arch",
        "tiny",
        "--steps",
        "2",
        "--json",
        json.to_str().unwrap(),
        "--trace",
        trace.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    for want in [
        "text encoders",
        "mmdit step 2",
        "vae decode",
        "linear",
        "attention",
        "peak GPU memory",
    ] {
        assert!(out.contains(want), "{want} missing:\n{out}");
    }
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(j["stages"].as_array().unwrap().len(), 4);
    assert!(j["op_classes"]["linear"]["flops"].as_u64().unwrap() > 0);
    assert!(j["top_ops"][0]["label"].as_str().is_some());
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    assert!(t["traceEvents"].as_array().unwrap().len() > 50);
    assert_eq!(image::open(&png).unwrap().width(), 64);
}

/// `bench --arch tiny` with the text encoders' and MMDiT's matrices as
/// random bf16, fp8 and GGML blocks (the packed storage a real GPU run would
/// time): every stage runs, the image is written.
#[test]
fn bench_tiny_runs_packed_weights() {
    let dir = temp_dir("bench-packed");
    for w in ["bf16", "fp8", "q8_0", "q4_k"] {
        let png = dir.join(format!("{w}.png"));
        let (ok, out, err) = sd3(&[
            "bench",
            "--arch",
            "tiny",
            "--steps",
            "1",
            "--weights",
            w,
            "--out",
            png.to_str().unwrap(),
        ]);
        assert!(ok, "{w}: {err}");
        assert!(out.contains("vae decode") && png.exists(), "{w}: {out}");
        let name = if w == "fp8" { "f8e4m3" } else { w };
        assert!(out.contains(&format!("matrices {name}")), "{w}: {out}");
    }
}

#[test]
fn bench_dry_run_records_the_real_architectures() {
    for arch in ["sd3-medium", "sd3.5-medium", "sd3.5-large"] {
        let (ok, out, err) = sd3(&["bench", "--arch", arch, "--dry-run"]);
        assert!(ok, "{arch}: {err}");
        assert!(
            out.contains("mmdit") && out.contains("t5") && out.contains("vae"),
            "{out}"
        );
    }
    let (ok, _, err) = sd3(&["bench", "--arch", "sd4"]);
    assert!(!ok && err.contains("unknown architecture 'sd4'"), "{err}");
}

#[test]
fn vram_budget_takes_hostile_values() {
    let base = [
        "bench",
        "--arch",
        "sd3.5-large",
        "--dry-run",
        "--weights",
        "q8_0",
    ];
    let run = |extra: &[&str]| {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        sd3(&args)
    };
    // Streams blocks; the plan says so.
    let (ok, out, err) = run(&["--vram-budget", "3072"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("streamed") && out.contains("peak with --vram-budget 3072"),
        "{out}"
    );
    // u64::MAX MiB saturates: everything resident.
    let (ok, out, err) = run(&["--vram-budget", "18446744073709551615"]);
    assert!(ok, "{err}");
    assert!(!out.contains("streamed"), "{out}");
    // 0 MiB: an error that says why, not a panic.
    let (ok, _, err) = run(&["--vram-budget", "0"]);
    assert!(!ok && err.contains("too small"), "{err}");
    for bad in ["-1", "1e3", "NaN", "３０７２"] {
        let (ok, _, err) = run(&["--vram-budget", bad]);
        assert!(
            !ok && (err.contains("--vram-budget") || err.contains(bad)),
            "{bad}: {err}"
        );
    }
    // Only with --dry-run on bench.
    let (ok, _, err) = sd3(&["bench", "--arch", "tiny", "--vram-budget", "100"]);
    assert!(!ok && err.contains("--dry-run"), "{err}");
}

/// tools/gpu-report end to end on the test adapter, in its dry-run form:
/// devices, the tile sweep, the small kernel cases (with JSON), the architectures' dry runs,
/// and the assembled report.
#[test]
fn gpu_report_dry_run_assembles_the_report() {
    let python = ["python3", "python"].into_iter().find(|p| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let Some(python) = python else {
        panic!("tools/gpu-report needs python3 (present on the CI machines)");
    };
    let dir = temp_dir("gpu-report");
    let out = Command::new(python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tools/gpu-report"))
        .args([
            "--dry-run",
            "--archs",
            "sd3-medium",
            "--sd3",
            env!("CARGO_BIN_EXE_sd3"),
            "--out",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = std::fs::read_to_string(dir.join("report.md")).unwrap();
    for want in [
        "### GPU report",
        "dry run",
        "sd3 bench kernels --small",
        "sd3 tune --small",
        "fastest: ",
        "sd3 bench --arch sd3-medium --dry-run",
        "| linear 333x192->192 | tiled |",
        "| attention 1x3x333x64 | flash |",
        "| attention 1x3x333x64 | composed |",
    ] {
        assert!(report.contains(want), "{want} missing:\n{report}");
    }
    assert!(
        dir.join("cache").join("gemm-tiles.json").is_file(),
        "the sweep's cache stays inside the report folder"
    );
    let kernels: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("kernels.json")).unwrap()).unwrap();
    assert!(kernels.as_array().unwrap().len() >= 4);
}

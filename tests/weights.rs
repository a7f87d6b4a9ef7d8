//! Checkpoint loading: bad inputs give errors that name the file or tensor
//! and what was expected; `sd3 inspect` reports what a checkpoint holds.

mod common;

use std::path::{Path, PathBuf};

use common::gpu;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use sd3_wgpu::models::mmdit::Mmdit;
use sd3_wgpu::weights::mmdit::MmditSource;
use sd3_wgpu::weights::{fp8_e4m3, inspect, Checkpoint};
use sd3_wgpu::DType;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd3-wgpu-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Rewrites the sd3 fixture with `edit` applied to its (name, dtype, shape, bytes) list.
fn edited_fixture(
    name: &str,
    edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>),
) -> PathBuf {
    let ck = Checkpoint::open(&[fixture("mmdit/sd3.safetensors")]).unwrap();
    let mut list: Vec<_> = ck
        .tensors
        .iter()
        .map(|(n, e)| (n.clone(), e.dtype, e.shape.clone(), ck.bytes(e).unwrap()))
        .collect();
    edit(&mut list);
    let views: Vec<(String, TensorView)> = list
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let path = temp(name);
    safetensors::serialize_to_file(views, None, &path).unwrap();
    path
}

fn load_err(path: &Path) -> String {
    match MmditSource::open(path) {
        Err(e) => e.to_string(),
        Ok(src) => match Mmdit::load(gpu(), &src, DType::F32) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{} loaded without error", path.display()),
        },
    }
}

#[test]
fn missing_tensor_is_named() {
    let gone = "model.diffusion_model.joint_blocks.1.x_block.mlp.fc2.weight";
    let p = edited_fixture("missing.safetensors", |l| l.retain(|t| t.0 != gone));
    let e = load_err(&p);
    assert!(e.contains(gone) && e.contains("missing"), "{e}");
}

#[test]
fn wrong_shape_names_expected_and_found() {
    let name = "model.diffusion_model.context_embedder.bias";
    let p = edited_fixture("shape.safetensors", |l| {
        let t = l.iter_mut().find(|t| t.0 == name).unwrap();
        let elem = t.3.len() / t.2.iter().product::<usize>();
        t.2 = vec![32];
        t.3.truncate(32 * elem);
    });
    let e = load_err(&p);
    assert!(
        e.contains(name) && e.contains("[32]") && e.contains("[64]"),
        "{e}"
    );
}

#[test]
fn unsupported_dtype_is_named() {
    let name = "model.diffusion_model.pos_embed";
    let p = edited_fixture("dtype.safetensors", |l| {
        let t = l.iter_mut().find(|t| t.0 == name).unwrap();
        t.1 = Dtype::I32;
        t.3.resize(t.2.iter().product::<usize>() * 4, 0);
    });
    let e = load_err(&p);
    assert!(e.contains(name) && e.contains("I32"), "{e}");
}

#[test]
fn truncated_and_foreign_files_are_refused() {
    let bytes = std::fs::read(fixture("mmdit/sd3.safetensors")).unwrap();
    let cut = temp("truncated.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&cut);
    assert!(
        e.contains("truncated.safetensors") && e.contains("truncated"),
        "{e}"
    );
    let text = temp("notes.safetensors");
    std::fs::write(&text, "these are not weights").unwrap();
    let e = load_err(&text);
    assert!(e.contains("not a readable safetensors file"), "{e}");
    let e = load_err(Path::new("/no/such/model.safetensors"));
    assert!(e.contains("/no/such/model.safetensors"), "{e}");
}

#[test]
fn unknown_layout_is_refused() {
    let p = edited_fixture("unknown.safetensors", |l| {
        for t in l.iter_mut() {
            t.0 = t.0.replace("model.diffusion_model.", "unet.");
        }
    });
    let e = load_err(&p);
    assert!(e.contains("no MMDiT tensors"), "{e}");
    let e = inspect::inspect(&p).unwrap_err().to_string();
    assert!(e.contains("no SD3 component"), "{e}");
}

#[test]
fn missing_shard_is_named() {
    let dir = temp("sharded");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixture("mmdit/sd35m/transformer");
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap();
        if !f.file_name().to_string_lossy().contains("00002") {
            std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
        }
    }
    let e = load_err(&dir);
    assert!(
        e.contains("diffusion_pytorch_model-00002-of-00003.safetensors"),
        "{e}"
    );
}

#[test]
fn fp8_e4m3_decodes_like_torch() {
    // Bit patterns and the values torch.float8_e4m3fn gives them.
    let cases = [
        (0x00, 0.0),
        (0x38, 1.0),
        (0xb8, -1.0),
        (0x7e, 448.0),
        (0x01, 2f32.powi(-9)),
        (0x3c, 1.5),
    ];
    for (b, v) in cases {
        assert_eq!(fp8_e4m3(b), v, "0x{b:02x}");
    }
    assert!(fp8_e4m3(0x7f).is_nan());
}

#[test]
fn inspect_reports_variant_and_components() {
    let r = inspect::inspect(&fixture("mmdit/sd35m.safetensors"))
        .unwrap()
        .to_string();
    assert!(r.contains("Stability single file"), "{r}");
    assert!(r.contains("depth 2, hidden 128, heads 2"), "{r}");
    assert!(r.contains("dual attention in blocks 0-0"), "{r}");
    assert!(r.contains("F8_E4M3"), "{r}");
    assert!(r.contains("vae          absent"), "{r}");
    // An all-in-one file: the transformer plus VAE and text-encoder tensors.
    let p = edited_fixture("all_in_one.safetensors", |l| {
        let small = |n: &str| (n.to_string(), Dtype::F16, vec![2], vec![0u8; 4]);
        l.push(small("first_stage_model.decoder.conv_in.bias"));
        l.push(small(
            "text_encoders.clip_l.transformer.text_model.final_layer_norm.bias",
        ));
        l.push(small("text_encoders.t5xxl.transformer.shared.weight"));
    });
    let r = inspect::inspect(&p).unwrap().to_string();
    for line in [
        "vae          present",
        "clip_l       present",
        "t5xxl        present",
        "clip_g       absent",
    ] {
        assert!(r.contains(line), "{line}:\n{r}");
    }
    let r = inspect::inspect(&fixture("mmdit/sd35m"))
        .unwrap()
        .to_string();
    assert!(r.contains("diffusers folder") && r.contains("BF16"), "{r}");
}

/// The fp8 encoders the engine uses for its own fp8 tensors (random
/// weights, tests) round to nearest, ties to even, and decode back exactly:
/// every finite code round-trips, and midpoints go to the even neighbour.
#[test]
fn fp8_encoders_round_to_nearest_even() {
    use sd3_wgpu::tensor::{f8e4m3_from_f32, f8e5m2_from_f32};
    use sd3_wgpu::weights::fp8_e4m3;
    let e5m2 = |b: u8| half::f16::from_bits((b as u16) << 8).to_f32();
    for b in 0..=255u8 {
        let v = fp8_e4m3(b);
        if v.is_finite() {
            let back = f8e4m3_from_f32(v);
            assert!(
                back == b || (v == 0.0 && fp8_e4m3(back) == 0.0),
                "e4m3 {b:#04x} → {v} → {back:#04x}"
            );
        }
        let w = e5m2(b);
        if w.is_finite() {
            let back = f8e5m2_from_f32(w);
            assert!(
                back == b || (w == 0.0 && e5m2(back) == 0.0),
                "e5m2 {b:#04x} → {w} → {back:#04x}"
            );
        }
    }
    // 1 + 1/16 lies halfway between 1 (mantissa 0, even) and 1.125 (odd).
    assert_eq!(fp8_e4m3(f8e4m3_from_f32(1.0625)), 1.0);
    assert_eq!(fp8_e4m3(f8e4m3_from_f32(1.1875)), 1.25);
    assert_eq!(fp8_e4m3(f8e4m3_from_f32(1000.0)), 448.0);
    assert_eq!(fp8_e4m3(f8e4m3_from_f32(-3e-3)), -0.00390625);
    assert_eq!(fp8_e4m3(f8e4m3_from_f32(2.5e-3)), 0.001953125);
    assert!(fp8_e4m3(f8e4m3_from_f32(f32::NAN)).is_nan());
    assert_eq!(e5m2(f8e5m2_from_f32(1.125)), 1.0);
    assert_eq!(e5m2(f8e5m2_from_f32(1.375)), 1.5);
}

/// GGML's block formats as llama.cpp's Python reference (the gguf package)
/// writes them: our dequantizer reads its blocks to the same values, and our
/// quantizer writes the same bytes (tools/make_fixtures.py gguf).
#[test]
fn ggml_blocks_match_the_gguf_package() {
    use sd3_wgpu::quant::{dequantize, quantize};
    use sd3_wgpu::DType;
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let io = sd3_wgpu::weights::Checkpoint::open(&[root.join("gguf_blocks.safetensors")]).unwrap();
    for (name, d) in [
        ("q8_0", DType::Q8_0),
        ("q4_0", DType::Q4_0),
        ("q4_1", DType::Q4_1),
        ("q5_0", DType::Q5_0),
        ("q5_1", DType::Q5_1),
    ] {
        let src = io.read_f32(&format!("{name}.src")).unwrap().1;
        let bytes: Vec<u8> = io
            .read_f32(&format!("{name}.bytes"))
            .unwrap()
            .1
            .iter()
            .map(|&v| v as u8)
            .collect();
        let want = io.read_f32(&format!("{name}.values")).unwrap().1;
        assert_eq!(
            dequantize(d, &bytes, src.len()).unwrap(),
            want,
            "{name}: dequantize"
        );
        let ours = quantize(d, &src).unwrap();
        let same = ours.iter().zip(&bytes).filter(|(a, b)| a == b).count();
        assert_eq!(ours.len(), bytes.len(), "{name}: block bytes");
        assert_eq!(
            same,
            bytes.len(),
            "{name}: {} of {} bytes differ",
            bytes.len() - same,
            bytes.len()
        );
    }
    assert!(
        dequantize(DType::Q4_0, &[0; 17], 32).is_none(),
        "too few bytes"
    );
    assert!(
        dequantize(DType::F16, &[0; 64], 32).is_none(),
        "not a block format"
    );
}

/// The K-quants' super-blocks decode as the gguf package decodes them (random
/// blocks: every scale, min and quant bit in use), on the CPU and on the GPU;
/// our own quantizer's blocks stay close to their input.
#[test]
fn k_quants_match_the_gguf_package() {
    use sd3_wgpu::quant::{dequantize, quantize};
    use sd3_wgpu::DType;
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let io = sd3_wgpu::weights::Checkpoint::open(&[root.join("gguf_blocks.safetensors")]).unwrap();
    let gpu = common::gpu();
    for (name, d, bound) in [
        ("q4_k", DType::Q4K, 0.12),
        ("q5_k", DType::Q5K, 0.06),
        ("q6_k", DType::Q6K, 0.03),
    ] {
        let bytes: Vec<u8> = io
            .read_f32(&format!("{name}.bytes"))
            .unwrap()
            .1
            .iter()
            .map(|&v| v as u8)
            .collect();
        let want = io.read_f32(&format!("{name}.values")).unwrap().1;
        assert_eq!(
            dequantize(d, &bytes, want.len()).unwrap(),
            want,
            "{name}: CPU"
        );
        // The shaders' decoder, through a gather of every row.
        let t = sd3_wgpu::Tensor::from_raw(gpu, &[want.len() / 256, 256], d, bytes).unwrap();
        let mut g = sd3_wgpu::graph::Graph::new(gpu.target());
        let table = g.weight("t", &t);
        let ids: Vec<u32> = (0..(want.len() / 256) as u32).collect();
        let ids_t = sd3_wgpu::Tensor::from_u32(gpu, &[ids.len()], &ids).unwrap();
        let idv = g.weight("ids", &ids_t);
        let y = sd3_wgpu::ops::layout::gather(&mut g, table, idv).unwrap();
        let y = sd3_wgpu::ops::layout::cast(&mut g, y, DType::F32).unwrap();
        g.keep(y);
        let plan = g.plan(gpu).unwrap();
        plan.run(gpu).unwrap();
        // Exact on lavapipe; a GPU may fuse d·sc·q − dmin·m into one FMA.
        let got = plan.read(gpu, y).unwrap();
        let want64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
        let e = common::rel_err(&got, &want64);
        assert!(e <= 1e-6, "{name}: GPU relative error {e:.2e}");
        // Our quantizer: valid blocks near the input.
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.3)
            .collect();
        let back = dequantize(d, &quantize(d, &x).unwrap(), x.len()).unwrap();
        let num: f64 = x
            .iter()
            .zip(&back)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let den: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum();
        let e = (num / den).sqrt();
        eprintln!("{name}: our quantizer's relative error {e:.3}");
        assert!(e < bound, "{name}: relative error {e:.3}");
    }
}

/// A GGUF listing one tensor name twice is refused (it used to reach an
/// out-of-range index while the error was being written).
#[test]
fn gguf_with_a_repeated_tensor_name_is_an_error() {
    let mut f = Vec::new();
    f.extend(b"GGUF");
    f.extend(3u32.to_le_bytes());
    f.extend(2u64.to_le_bytes()); // tensors
    f.extend(0u64.to_le_bytes()); // metadata
    for offset in [0u64, 32] {
        f.extend(8u64.to_le_bytes());
        f.extend(b"a.weight");
        f.extend(1u32.to_le_bytes());
        f.extend(4u64.to_le_bytes());
        f.extend(0u32.to_le_bytes()); // F32
        f.extend(offset.to_le_bytes());
    }
    f.resize(f.len().div_ceil(32) * 32 + 64, 0);
    let p = std::env::temp_dir().join(format!("sd3-dup-{}.gguf", std::process::id()));
    std::fs::write(&p, &f).unwrap();
    let e = sd3_wgpu::weights::Checkpoint::open(std::slice::from_ref(&p))
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("'a.weight' is listed twice") && e.contains("dup"),
        "{e}"
    );
    let _ = std::fs::remove_file(p);
}

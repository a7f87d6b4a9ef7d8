//! Shared test helpers: the test GPU, seeded inputs, running a graph with
//! poisoned intermediates, and relative-error checks against f64 references.
#![allow(dead_code)]

use std::sync::OnceLock;

use sd3_wgpu::graph::{Graph, Value};
use sd3_wgpu::{DType, Gpu, GpuOptions, Tensor};

/// Tolerance for f32 results against an f64 reference (‖out − ref‖ / ‖ref‖).
pub const TOL_F32: f64 = 1e-5;

/// The GPU the tests run on (lavapipe in CI), runtime checks off as in production.
pub fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| make_gpu(false))
}

/// A second device with naga's runtime checks and workgroup zero-init back on.
pub fn checked_gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| make_gpu(true))
}

/// A device limited to implementations that need no optional feature
/// (`--kernels portable`): the reference path, run through every case too.
pub fn portable_gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        let opts = GpuOptions {
            kernels: Some("portable".into()),
            ..GpuOptions::from_env()
        };
        match Gpu::new(&opts) {
            Ok(g) => g,
            Err(e) => panic!("tests need a GPU adapter: {e}"),
        }
    })
}

fn make_gpu(runtime_checks: bool) -> Gpu {
    let opts = GpuOptions {
        runtime_checks,
        ..GpuOptions::from_env()
    };
    match Gpu::new(&opts) {
        Ok(g) => g,
        Err(e) => panic!("tests need a GPU adapter (CI installs Mesa's lavapipe): {e}"),
    }
}

/// Seeded values in [-1, 1).
pub fn rand(seed: u64, n: usize) -> Vec<f32> {
    sd3_wgpu::bench::random_values(seed, n)
}

/// Values as the GPU sees them after storage in `dtype` (f16 rounding).
pub fn stored(data: &[f32], dtype: DType) -> Vec<f64> {
    use sd3_wgpu::tensor::{f8e4m3_from_f32, f8e5m2_from_f32};
    match dtype {
        DType::F16 => data
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f64())
            .collect(),
        DType::BF16 => data
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f64())
            .collect(),
        // Decoded on the CPU by the weights reader (independent of the shaders).
        DType::F8E4M3 => data
            .iter()
            .map(|&v| sd3_wgpu::weights::fp8_e4m3(f8e4m3_from_f32(v)) as f64)
            .collect(),
        DType::F8E5M2 => data
            .iter()
            .map(|&v| half::f16::from_bits((f8e5m2_from_f32(v) as u16) << 8).to_f64())
            .collect(),
        // Quantized and dequantized on the CPU (src/quant.rs, checked against
        // the gguf package's dequantizer in tests/weights.rs).
        q @ (DType::Q8_0
        | DType::Q4_0
        | DType::Q4_1
        | DType::Q5_0
        | DType::Q5_1
        | DType::Q4K
        | DType::Q5K
        | DType::Q6K) => {
            let bytes = sd3_wgpu::quant::quantize(q, data).unwrap();
            sd3_wgpu::quant::dequantize(q, &bytes, data.len())
                .unwrap()
                .iter()
                .map(|&v| v as f64)
                .collect()
        }
        _ => data.iter().map(|&v| v as f64).collect(),
    }
}

/// Every storage type a weight may have on the GPU.
#[allow(unused_imports)]
pub use sd3_wgpu::ops::WEIGHTS as WEIGHT_TYPES;

/// Uploads `data` as a weight value of the graph.
pub fn weight(
    gpu: &Gpu,
    g: &mut Graph,
    name: &str,
    shape: &[usize],
    dtype: DType,
    data: &[f32],
) -> Value {
    let t = Tensor::from_f32(gpu, shape, dtype, data).expect("upload");
    g.weight(name, &t)
}

/// Plans `g` (outputs must be kept), fills every intermediate with NaN, runs,
/// and reads the outputs back.
pub fn run(gpu: &Gpu, g: Graph, outputs: &[Value]) -> Vec<Vec<f32>> {
    let plan = g.plan(gpu).expect("plan");
    plan.fill_intermediates(gpu, f32::NAN);
    plan.run(gpu).expect("run");
    outputs
        .iter()
        .map(|&v| plan.read(gpu, v).expect("read"))
        .collect()
}

/// ‖out − ref‖ / ‖ref‖; infinite when lengths differ or anything is not finite.
pub fn rel_err(out: &[f32], reference: &[f64]) -> f64 {
    if out.len() != reference.len() || out.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let mut num = 0.0;
    let mut den = 0.0;
    for (&o, &r) in out.iter().zip(reference) {
        num += (o as f64 - r).powi(2);
        den += r * r;
    }
    if den == 0.0 {
        return num.sqrt();
    }
    (num / den).sqrt()
}

/// Fails with the case name, error and tolerance unless out ≈ reference.
pub fn assert_close(what: &str, out: &[f32], reference: &[f64], tol: f64) {
    let e = rel_err(out, reference);
    eprintln!("{what}: relative error {e:.2e} (tolerance {tol:.0e})");
    assert!(
        e <= tol,
        "{what}: relative error {e:.3e} > {tol:.1e} (len {} vs {}, first values {:?} vs {:?})",
        out.len(),
        reference.len(),
        &out[..out.len().min(4)],
        &reference[..reference.len().min(4)]
    );
}

/// `tests/fixtures`.
pub fn fixtures_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Copies a folder tree.
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// A complete diffusers SD3 folder for `variant`, assembled from the shared
/// text-encoder and VAE fixtures and the variant's transformer.
pub fn pipeline_folder(variant: &str) -> std::path::PathBuf {
    static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("sd3-pipe-{}-{variant}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&fixtures_dir().join("pipeline").join(variant), &dir);
    for sub in [
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
    ] {
        copy_dir(&fixtures_dir().join("text").join(sub), &dir.join(sub));
    }
    copy_dir(&fixtures_dir().join("vae/vae"), &dir.join("vae"));
    std::fs::remove_file(dir.join("pipeline_io.safetensors")).unwrap();
    dir
}

/// A tensor of a safetensors file as the edits below see it.
pub type Entry = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

/// Writes `dst` as `src` with `edit` applied to its tensors.
pub fn rewrite_safetensors(
    src: &std::path::Path,
    dst: &std::path::Path,
    edit: impl FnOnce(&mut Vec<Entry>),
) {
    let ck = sd3_wgpu::weights::Checkpoint::open(&[src.to_path_buf()]).unwrap();
    let mut list: Vec<Entry> = ck
        .tensors
        .iter()
        .map(|(n, e)| (n.clone(), e.dtype, e.shape.clone(), ck.bytes(e).unwrap()))
        .collect();
    edit(&mut list);
    let views: Vec<(String, safetensors::tensor::TensorView)> = list
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, dst).unwrap();
}

/// Replaces tensor `name`'s shape, with zero bytes of the right length (f32).
pub fn reshape_entry(list: &mut [Entry], name: &str, shape: &[usize]) {
    let t = list
        .iter_mut()
        .find(|t| t.0 == name)
        .unwrap_or_else(|| panic!("{name} not in the fixture"));
    t.1 = safetensors::Dtype::F32;
    t.2 = shape.to_vec();
    t.3 = vec![0u8; 4 * shape.iter().product::<usize>()];
}

/// A fresh, empty folder for one test.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sd3-t-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Features this run demands (`SD3_REQUIRE=coop,subgroup,f16`, any subset):
/// an implementation needing one of them that the adapter refuses fails the
/// test instead of being skipped.
pub fn required() -> Vec<sd3_wgpu::target::Feature> {
    std::env::var("SD3_REQUIRE")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            sd3_wgpu::target::Feature::parse(s).unwrap_or_else(|| {
                panic!("SD3_REQUIRE: unknown feature {s:?} (f16, subgroup, coop)")
            })
        })
        .collect()
}

/// The implementations of `op` in `list` that take `args` on `target`, in
/// order; prints how many run and why the others are skipped, and fails when
/// a skipped one needs a feature `SD3_REQUIRE` demands.
pub fn implementations<A>(
    op: &str,
    list: &'static [sd3_wgpu::ops::choice::Implementation<A>],
    target: &sd3_wgpu::Target,
    args: &A,
) -> Vec<&'static sd3_wgpu::ops::choice::Implementation<A>> {
    let req = required();
    let mut run = Vec::new();
    let mut skipped = Vec::new();
    for imp in list {
        match imp.refusal(target, args) {
            None => run.push(imp),
            Some(why) => {
                // A demanded feature the adapter lacks fails; a call the
                // implementation declines (e.g. tensor cores on the f32 path)
                // is a plain skip.
                if let Some(f) = imp
                    .needs
                    .iter()
                    .find(|f| req.contains(f) && !target.has(**f))
                {
                    panic!(
                        "{op}: implementation '{}' was skipped ({why}) but SD3_REQUIRE demands {}",
                        imp.name,
                        f.name()
                    );
                }
                skipped.push(format!("{} ({why})", imp.name));
            }
        }
    }
    eprintln!(
        "{op}: {} of {} implementations ran ({}){}",
        run.len(),
        list.len(),
        run.iter().map(|i| i.name).collect::<Vec<_>>().join(", "),
        if skipped.is_empty() {
            String::new()
        } else {
            format!("; skipped: {}", skipped.join(", "))
        }
    );
    assert!(
        !run.is_empty(),
        "{op}: no implementation runs on this adapter"
    );
    run
}

/// Tolerance for results stored as f16 activations against an f64 reference
/// computed from the same (f16-rounded) inputs: f16 keeps 11 significant
/// bits, so storing the result alone costs about 3e-4 relative; the largest
/// error measured over every kernel case on lavapipe was 3.9e-4.
pub const TOL_F16: f64 = 1e-3;

/// The tolerance for outputs of element type `dtype`.
pub fn tol(dtype: DType) -> f64 {
    if dtype == DType::F16 {
        TOL_F16
    } else {
        TOL_F32
    }
}

/// An activation input of the graph's activation type (f32, or f16 on the
/// f16 test device); compare against `stored(data, g.act())`.
pub fn act(gpu: &Gpu, g: &mut Graph, name: &str, shape: &[usize], data: &[f32]) -> Value {
    let d = g.act();
    weight(gpu, g, name, shape, d, data)
}

/// A third device whose graphs store activations as f16 (`None` when the
/// adapter has no SHADER_F16; `SD3_REQUIRE=f16` makes that a failure).
pub fn f16_gpu() -> Option<&'static Gpu> {
    static GPU: OnceLock<Option<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| {
        let opts = GpuOptions {
            f16_activations: true,
            ..GpuOptions::from_env()
        };
        let g = match Gpu::new(&opts) {
            Ok(g) => g,
            Err(e) => panic!("tests need a GPU adapter: {e}"),
        };
        if g.activation == DType::F16 {
            Some(g)
        } else {
            assert!(
                !required().contains(&sd3_wgpu::target::Feature::F16),
                "SD3_REQUIRE demands f16 but the adapter has no SHADER_F16"
            );
            None
        }
    })
    .as_ref()
}

/// `data` as the GPU holds it after storage in `dtype` (rounded through f16).
pub fn round_to(data: &[f32], dtype: DType) -> Vec<f32> {
    stored(data, dtype).iter().map(|&v| v as f32).collect()
}

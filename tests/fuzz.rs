//! A deterministic fuzz run inside `cargo test`: thousands of mutated
//! safetensors headers, config.json files, tokenizer files, shard indexes and
//! command lines, all derived from the fixtures with a fixed seed. Every case
//! must end in `Ok` or `Err`: a panic fails the test with the case that
//! caused it, and so does a case that does not finish in time (a hang).
//! Longer, coverage-guided runs: the `cargo fuzz` targets in `fuzz/`.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{copy_dir, fixtures_dir, temp_dir};
use sd3_wgpu::gpu::Gpu;
use sd3_wgpu::models::clip::{self, Clip};
use sd3_wgpu::models::mmdit::Mmdit;
use sd3_wgpu::models::t5::T5;
use sd3_wgpu::models::vae::Vae;
use sd3_wgpu::ops::elementwise::Act;
use sd3_wgpu::tokenize::PromptTokenizer;
use sd3_wgpu::weights::mmdit::MmditSource;
use sd3_wgpu::weights::text::TextSource;
use sd3_wgpu::weights::vae::VaeSource;
use sd3_wgpu::weights::{Checkpoint, ShapeOnlyWeights, TensorProvider};
use sd3_wgpu::{DType, Tensor};
use serde_json::{json, Value};

// Cases per target: together about 10 s on a 2-core CI machine.
const N_HEADERS: usize = 6000;
const N_CONFIGS: usize = 4000;
const N_TOKENIZERS: usize = 2000;
const N_INDEXES: usize = 3000;
const N_COMMAND_LINES: usize = 6000;

/// xorshift64*: small, seeded, the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

/// Values that break careless code: zero, negatives, the extremes of every
/// integer width, non-finite stand-ins, wrong types.
fn hostile(r: &mut Rng) -> Value {
    let choices = [
        json!(0),
        json!(1),
        json!(-1),
        json!(2),
        json!(3),
        json!(7),
        json!(64),
        json!(65_536),
        json!(u32::MAX),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(1e300),
        json!(-1e300),
        json!(0.5),
        json!(1e-300),
        json!("x"),
        json!(""),
        json!(null),
        json!(true),
        json!([]),
        json!([1, 2]),
        json!({}),
        json!("../../etc/passwd"),
        json!("/dev/zero"),
        json!("一只猫🐈"),
    ];
    r.pick(&choices).clone()
}

/// Replaces a random value somewhere inside `v` (depth-first, biased to leaves).
fn mutate_json(r: &mut Rng, v: &mut Value) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = r.pick(&keys).clone();
            match r.below(8) {
                0 => {
                    m.remove(&k);
                }
                1 => {
                    m.insert(k, hostile(r));
                }
                2 => {
                    let x = m.remove(&k).unwrap_or(Value::Null);
                    m.insert(format!("{k}{}", r.below(3)), x);
                }
                _ => {
                    if let Some(x) = m.get_mut(&k) {
                        mutate_json(r, x);
                    }
                }
            }
        }
        Value::Array(a) if !a.is_empty() => match r.below(6) {
            0 => {
                a.pop();
            }
            1 => a.push(hostile(r)),
            _ => {
                let i = r.below(a.len());
                mutate_json(r, &mut a[i]);
            }
        },
        _ => *v = hostile(r),
    }
}

/// Flips, inserts or deletes a few bytes.
fn mutate_bytes(r: &mut Rng, b: &mut Vec<u8>) {
    for _ in 0..1 + r.below(4) {
        if b.is_empty() {
            b.push(r.next() as u8);
            continue;
        }
        let i = r.below(b.len());
        match r.below(4) {
            0 => b[i] ^= 1 << r.below(8),
            1 => b[i] = r.next() as u8,
            2 => b.insert(i, *r.pick(b"{}[]\",:0-9e\\\x00\xff")),
            _ => {
                b.remove(i);
            }
        }
    }
}

/// Runs `cases` cases of `f` on a worker thread (`f` writes a description of
/// its case into the string first): a panic is caught and reported with it; a case that runs past `limit`
/// fails the test as a hang. Returns how many cases ended in `Ok`.
fn run_cases(
    name: &str,
    cases: usize,
    limit: Duration,
    f: impl Fn(usize, &mut Rng, &mut String) -> Result<(), String> + Send + 'static,
) -> usize {
    let (tx, rx) = mpsc::channel::<(usize, String, Option<Result<(), String>>)>();
    let worker = std::thread::spawn(move || {
        let mut rng = Rng(0x5d3_f022 ^ (cases as u64).wrapping_mul(0x9e37_79b9));
        for i in 0..cases {
            let mut case_rng = Rng(rng.next() | 1);
            // The case describes itself before the risky part, so a panic can name it.
            let mut desc = String::new();
            let out = catch_unwind(AssertUnwindSafe(|| f(i, &mut case_rng, &mut desc)));
            let res = out.ok();
            if tx.send((i, desc, res)).is_err() {
                return;
            }
        }
    });
    let mut ok = 0;
    for _ in 0..cases {
        match rx.recv_timeout(limit) {
            Ok((_, _, Some(Ok(())))) => ok += 1,
            Ok((_, _, Some(Err(_)))) => {}
            Ok((i, desc, None)) => panic!("{name}: case {i} panicked: {desc}"),
            Err(_) => panic!("{name}: a case ran longer than {limit:?} (a hang?)"),
        }
    }
    let _ = worker.join();
    ok
}

fn fixture(rel: &str) -> PathBuf {
    fixtures_dir().join(rel)
}

/// Reads every tensor a model asks for (shape checks, dtype conversion) but
/// uploads nothing: the whole load path of a checkpoint without GPU work.
struct ReadOnly<'a, P: TensorProvider> {
    src: &'a P,
    shapes: ShapeOnlyWeights,
}

impl<P: TensorProvider> TensorProvider for ReadOnly<'_, P> {
    fn tensor(
        &self,
        gpu: &Gpu,
        name: &str,
        shape: &[usize],
        dtype: DType,
    ) -> sd3_wgpu::Result<Tensor> {
        self.src.host(name, shape)?;
        self.shapes.tensor(gpu, name, shape, dtype)
    }
    fn host(&self, name: &str, shape: &[usize]) -> sd3_wgpu::Result<Vec<f32>> {
        self.src.host(name, shape)
    }
}

/// A safetensors file with a mutated header (structure-aware most of the
/// time, raw bytes otherwise), the tensor data kept.
fn mutate_safetensors(r: &mut Rng, bytes: &[u8]) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let names: Vec<String> = header.as_object().unwrap().keys().cloned().collect();
    let mut head_bytes = None;
    for _ in 0..1 + r.below(3) {
        let name = r.pick(&names).clone();
        // Earlier edits may have removed or replaced this entry (or the whole header).
        if !header.get(&name).is_some_and(|t| t.is_object()) {
            continue;
        }
        let t = &mut header[&name];
        match r.below(10) {
            0 => {
                let shape = t["shape"].as_array_mut();
                if let Some(s) = shape {
                    s.pop();
                }
            }
            1 => {
                if let Some(s) = t["shape"].as_array_mut() {
                    s.push(json!(1 + r.below(3)));
                }
            }
            2 => {
                if let Some(s) = t["shape"].as_array_mut() {
                    if !s.is_empty() {
                        let i = r.below(s.len());
                        s[i] = hostile(r);
                    }
                }
            }
            3 => t["shape"] = json!([]),
            4 => {
                t["dtype"] = json!(
                    *r.pick(&["F32", "F16", "BF16", "F8_E4M3", "I64", "BOOL", "F4", "Q4", ""])
                )
            }
            5 => {
                if let Some(o) = t["data_offsets"].as_array_mut() {
                    let i = r.below(2);
                    o[i] = hostile(r);
                }
            }
            6 => {
                let other = r.pick(&names).clone();
                let x = header.as_object_mut().unwrap().remove(&name).unwrap();
                header[other] = x;
            }
            7 => {
                header.as_object_mut().unwrap().remove(&name);
            }
            8 => mutate_json(r, &mut header),
            _ => {
                let mut b = serde_json::to_vec(&header).unwrap();
                mutate_bytes(r, &mut b);
                head_bytes = Some(b);
            }
        }
    }
    let head = head_bytes.unwrap_or_else(|| serde_json::to_vec(&header).unwrap());
    let mut len = head.len() as u64;
    if r.below(12) == 0 {
        len = *r.pick(&[
            0,
            1,
            7,
            u64::MAX,
            len + 1,
            len.saturating_sub(1),
            100_000_001,
        ]);
    }
    let mut out = len.to_le_bytes().to_vec();
    out.extend(head);
    out.extend_from_slice(data);
    if r.below(10) == 0 {
        out.truncate(r.below(out.len()));
    }
    out
}

#[test]
fn fuzz_safetensors_headers() {
    let gpu = common::gpu();
    let dir = temp_dir("fuzz-st");
    let sources = [
        ("mmdit", fixture("mmdit/sd3.safetensors")),
        ("mmdit", fixture("mmdit/sd35m.safetensors")),
        ("vae", fixture("vae/vae.safetensors")),
        ("clip", fixture("text/text_encoder/model.safetensors")),
        ("t5", fixture("text/text_encoder_3/model.safetensors")),
    ];
    let originals: Vec<(&str, Vec<u8>)> = sources
        .iter()
        .map(|(k, p)| (*k, std::fs::read(p).unwrap()))
        .collect();
    let t0 = Instant::now();
    let ok = run_cases(
        "safetensors",
        N_HEADERS,
        Duration::from_secs(20),
        move |i, r, desc| {
            let (kind, bytes) = &originals[i % originals.len()];
            let p = dir.join(format!("{i}.safetensors"));
            let file = mutate_safetensors(r, bytes);
            let head = file.len().min(
                8 + u64::from_le_bytes(
                    file.get(..8)
                        .and_then(|b| b.try_into().ok())
                        .unwrap_or([0; 8]),
                )
                .min(4096) as usize,
            );
            *desc = format!("{kind}: {}", String::from_utf8_lossy(&file[..head]));
            std::fs::write(&p, &file).unwrap();
            let res = load_any(gpu, kind, &p);
            let _ = std::fs::remove_file(&p);
            res
        },
    );
    println!(
        "safetensors: {ok} of {N_HEADERS} mutated files still loaded, {:?}",
        t0.elapsed()
    );
}

/// GGUF files with bytes flipped, inserted or removed in the header (and
/// cut anywhere): an error naming the file or a model that loads, never a
/// panic, a hang or an allocation the file cannot back.
#[test]
fn fuzz_gguf_headers() {
    let gpu = common::gpu();
    let dir = temp_dir("fuzz-gguf");
    let original = std::fs::read(fixture("mmdit/sd35l.gguf")).unwrap();
    let t0 = Instant::now();
    let ok = run_cases(
        "gguf",
        N_HEADERS / 4,
        Duration::from_secs(20),
        move |i, r, desc| {
            let mut file = original.clone();
            if i % 8 == 7 {
                file.truncate(r.below(original.len()));
                *desc = format!("cut at {}", file.len());
            } else {
                // Mutate within the header (metadata and tensor infos).
                let header = file.len().min(4096);
                let mut head = file[..header].to_vec();
                mutate_bytes(r, &mut head);
                file.splice(..header, head);
                *desc = format!("header {:?}", &file[..file.len().min(96)]);
            }
            let p = dir.join(format!("{i}.gguf"));
            std::fs::write(&p, &file).unwrap();
            let res = load_any(gpu, "mmdit", &p);
            let _ = std::fs::remove_file(&p);
            res
        },
    );
    println!(
        "gguf: {ok} of {} mutated files still loaded, {:?}",
        N_HEADERS / 4,
        t0.elapsed()
    );
}

/// LoRA files (the three fixture layouts) and ControlNets (both families)
/// with mutated headers: loaded against the sd35m / sd3 pipeline fixtures,
/// an error naming the file or a model that loads, never a panic or a hang.
#[test]
fn fuzz_lora_and_controlnet_files() {
    use sd3_wgpu::lora::LoraSpec;
    use sd3_wgpu::pipeline::{Pipeline, PipelineOptions};
    let dir = temp_dir("fuzz-adapters");
    let (m35, m3) = (
        common::pipeline_folder("sd35m"),
        common::pipeline_folder("sd3"),
    );
    let sources = [
        ("lora", fixture("lora/peft.safetensors")),
        ("lora", fixture("lora/kohya.safetensors")),
        ("lora", fixture("lora/comfy.safetensors")),
        (
            "controlnet",
            fixture("controlnet/joint_a/diffusion_pytorch_model.safetensors"),
        ),
        (
            "controlnet",
            fixture("controlnet/single/diffusion_pytorch_model.safetensors"),
        ),
    ];
    let originals: Vec<(&str, Vec<u8>)> = sources
        .iter()
        .map(|(k, p)| (*k, std::fs::read(p).unwrap()))
        .collect();
    let cases = 300;
    let t0 = Instant::now();
    let ok = run_cases(
        "adapters",
        cases,
        Duration::from_secs(30),
        move |i, r, desc| {
            let (kind, bytes) = &originals[i % originals.len()];
            let p = dir.join(format!("{i}.safetensors"));
            let file = mutate_safetensors(r, bytes);
            *desc = format!("{kind} case {i}");
            std::fs::write(&p, &file).unwrap();
            let opts = if *kind == "lora" {
                PipelineOptions {
                    loras: vec![LoraSpec {
                        path: p.clone(),
                        strength: 1.0,
                    }],
                    dtype: sd3_wgpu::DType::F32,
                    ..PipelineOptions::default()
                }
            } else {
                PipelineOptions {
                    controlnets: vec![p.clone()],
                    dtype: sd3_wgpu::DType::F32,
                    ..PipelineOptions::default()
                }
            };
            let model = if *kind == "lora" || i % 2 == 1 {
                &m35
            } else {
                &m3
            };
            let res = Pipeline::load(model, opts)
                .map(|_| ())
                .map_err(|e| e.to_string());
            let _ = std::fs::remove_file(&p);
            if let Err(e) = &res {
                assert!(
                    e.contains(&format!("{i}.safetensors")),
                    "the error names no file: {e}"
                );
            }
            res
        },
    );
    println!(
        "adapters: {ok} of {cases} mutated files still loaded, {:?}",
        t0.elapsed()
    );
}

/// Opens and reads `path` as a component of `kind` (checkpoint, detection,
/// every tensor read and shape-checked); the error as a string.
fn load_any(gpu: &'static Gpu, kind: &str, path: &Path) -> Result<(), String> {
    let e = |e: sd3_wgpu::Error| e.to_string();
    let shapes = || ShapeOnlyWeights::new(gpu).map_err(e);
    match kind {
        "mmdit" => {
            let src = MmditSource::open(path).map_err(|x| x.to_string())?;
            let ro = ReadOnly {
                src: &src,
                shapes: shapes()?,
            };
            Mmdit::load_from(gpu, &src.config, &ro, DType::F16).map_err(e)?;
        }
        "vae" => {
            let src = VaeSource::open(path).map_err(|x| x.to_string())?;
            let ro = ReadOnly {
                src: &src,
                shapes: shapes()?,
            };
            Vae::load_from(gpu, &src.config, &ro, DType::F16).map_err(e)?;
        }
        "clip" => {
            let src = text_source(path, "clip_l")?;
            let c = clip::detect(&src, Act::QuickGelu).map_err(e)?;
            let ro = ReadOnly {
                src: &src,
                shapes: shapes()?,
            };
            Clip::load_from(gpu, &c, &ro, DType::F16).map_err(e)?;
        }
        _ => {
            let src = text_source(path, "t5xxl")?;
            let (c, shared) = T5::detect(&src).map_err(e)?;
            let ro = ReadOnly {
                src: &src,
                shapes: shapes()?,
            };
            let m = T5::load_from(gpu, &c, shared, &ro, DType::F16).map_err(e)?;
            m.position_bias(40);
        }
    }
    Ok(())
}

fn text_source(path: &Path, name: &str) -> Result<TextSource, String> {
    if path.is_dir() {
        TextSource::open_folder(path)
    } else {
        TextSource::open_file(path, name)
    }
    .map_err(|e| e.to_string())
}

#[test]
fn fuzz_config_files() {
    let gpu = common::gpu();
    let root = temp_dir("fuzz-cfg");
    let kinds = [
        ("mmdit", "mmdit/sd3/transformer"),
        ("mmdit", "mmdit/sd35m/transformer"),
        ("vae", "vae/vae"),
        ("clip", "text/text_encoder"),
        ("clip", "text/text_encoder_2"),
        ("t5", "text/text_encoder_3"),
    ];
    // One copy per component; each case rewrites only its config.json.
    let dirs: Vec<(&str, PathBuf, Value)> = kinds
        .iter()
        .enumerate()
        .map(|(i, (k, rel))| {
            let d = root.join(format!("{i}"));
            copy_dir(&fixture(rel), &d);
            let j = serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap())
                .unwrap();
            (*k, d, j)
        })
        .collect();
    let t0 = Instant::now();
    let ok = run_cases(
        "config.json",
        N_CONFIGS,
        Duration::from_secs(20),
        move |i, r, desc| {
            let (kind, dir, original) = &dirs[i % dirs.len()];
            let mut j = original.clone();
            let text = if r.below(5) == 0 {
                let mut b = serde_json::to_vec(&j).unwrap();
                mutate_bytes(r, &mut b);
                b
            } else {
                for _ in 0..1 + r.below(3) {
                    mutate_json(r, &mut j);
                }
                serde_json::to_vec(&j).unwrap()
            };
            *desc = format!("{kind} config {}", String::from_utf8_lossy(&text));
            std::fs::write(dir.join("config.json"), &text).unwrap();
            match *kind {
                "mmdit" => MmditSource::open(dir)
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                "vae" => VaeSource::open(dir).map(|_| ()).map_err(|e| e.to_string()),
                _ => load_any(gpu, kind, dir),
            }
        },
    );
    println!(
        "config.json: {ok} of {N_CONFIGS} mutated configs accepted, {:?}",
        t0.elapsed()
    );
}

#[test]
fn fuzz_tokenizer_files() {
    let root = temp_dir("fuzz-tok");
    let kinds = ["tokenizer", "tokenizer_2", "tokenizer_3"];
    // (kind, folder, its files with their original bytes)
    type Folder = (usize, PathBuf, Vec<(PathBuf, Vec<u8>)>);
    let dirs: Vec<Folder> = kinds
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let d = root.join(k);
            copy_dir(&fixture(&format!("text/{k}")), &d);
            let files = std::fs::read_dir(&d)
                .unwrap()
                .map(|e| {
                    let p = e.unwrap().path();
                    let b = std::fs::read(&p).unwrap();
                    (p, b)
                })
                .collect();
            (i, d, files)
        })
        .collect();
    let prompts = ["a cat", "一只猫 🐈!!", "", "x ".repeat(300).leak() as &str];
    let t0 = Instant::now();
    let ok = run_cases(
        "tokenizers",
        N_TOKENIZERS,
        Duration::from_secs(20),
        move |i, r, desc| {
            let (kind, dir, files) = &dirs[i % dirs.len()];
            let (path, original) = r.pick(files);
            let bytes = if path.extension().is_some_and(|e| e == "json") && r.below(4) != 0 {
                let mut j: Value = serde_json::from_slice(original).unwrap();
                for _ in 0..1 + r.below(3) {
                    mutate_json(r, &mut j);
                }
                serde_json::to_vec(&j).unwrap()
            } else {
                let mut b = original.clone();
                mutate_bytes(r, &mut b);
                b
            };
            *desc = format!(
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&bytes[..bytes.len().min(2000)])
            );
            std::fs::write(path, &bytes).unwrap();
            let res = (|| -> Result<(), String> {
                let tok = if *kind == 2 {
                    PromptTokenizer::t5(dir, 16)
                } else {
                    PromptTokenizer::clip(dir)
                }
                .map_err(|e| e.to_string())?;
                for p in prompts {
                    tok.encode(p).map_err(|e| e.to_string())?;
                }
                Ok(())
            })();
            std::fs::write(path, original).unwrap();
            res
        },
    );
    println!(
        "tokenizers: {ok} of {N_TOKENIZERS} mutated tokenizer folders loaded, {:?}",
        t0.elapsed()
    );
}

#[test]
fn fuzz_shard_indexes() {
    let dir = temp_dir("fuzz-index");
    copy_dir(&fixture("mmdit/sd35m/transformer"), &dir);
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let index = dir.join("diffusion_pytorch_model.safetensors.index.json");
    let original: Value = serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    let names = [
        "diffusion_pytorch_model-00001-of-00003.safetensors",
        "diffusion_pytorch_model-00003-of-00003.safetensors",
        "../transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
        "./diffusion_pytorch_model-00001-of-00003.safetensors",
        "sub",
        "sub/x",
        "/dev/zero",
        "/etc/hostname",
        "config.json",
        "no-such.safetensors",
        "..",
        "",
    ];
    let t0 = Instant::now();
    let ok = run_cases(
        "index.json",
        N_INDEXES,
        Duration::from_secs(20),
        move |_, r, desc| {
            let mut j = original.clone();
            for _ in 0..1 + r.below(3) {
                if r.below(3) == 0 {
                    mutate_json(r, &mut j);
                } else if let Some(m) = j["weight_map"].as_object_mut().filter(|m| !m.is_empty()) {
                    let keys: Vec<String> = m.keys().cloned().collect();
                    let k = r.pick(&keys).clone();
                    m.insert(k, json!(*r.pick(&names)));
                }
            }
            *desc = format!("index {j}");
            std::fs::write(&index, j.to_string()).unwrap();
            Checkpoint::open_diffusers_component(&dir, "diffusion_pytorch_model")
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
    );
    println!(
        "index.json: {ok} of {N_INDEXES} mutated indexes opened, {:?}",
        t0.elapsed()
    );
}

#[test]
fn fuzz_command_lines() {
    use clap::Parser;
    use sd3_wgpu::cli::{check_generate, pipeline_options, Cli, Command};
    use sd3_wgpu::pipeline::{Pipeline, PipelineOptions};
    let model = common::pipeline_folder("sd3");
    let pipe: &'static Pipeline = Box::leak(Box::new(
        Pipeline::load(
            &model,
            PipelineOptions {
                dtype: DType::F32,
                ..PipelineOptions::default()
            },
        )
        .unwrap(),
    ));
    let out_dir = temp_dir("fuzz-cli");
    let m = model.to_str().unwrap().to_string();
    let o = out_dir.join("x.png").to_str().unwrap().to_string();
    let lat = out_dir.join("lat.safetensors");
    sd3_wgpu::decode::write_latents(&lat, [1, 16, 16, 16], &vec![0.0; 4096]).unwrap();
    let lat = lat.to_str().unwrap().to_string();
    let bases: Vec<Vec<String>> = [
        vec![
            "generate", "--model", &m, "--prompt", "a cat", "--steps", "2", "--width", "32",
            "--height", "32", "--out", &o,
        ],
        vec![
            "generate",
            "--model",
            &m,
            "--prompt",
            "一只猫",
            "--negative-prompt",
            "dog",
            "--cfg",
            "4",
            "--shift",
            "3",
            "--seed",
            "7",
            "--rng",
            "torch",
            "--batch",
            "2",
            "--max-t5-tokens",
            "16",
            "--width",
            "16",
            "--height",
            "32",
            "--out",
            &o,
            "--save-latents",
            &lat,
        ],
        vec![
            "generate",
            "--model",
            &m,
            "--prompt",
            "x",
            "--slg-layers",
            "0,1",
            "--slg-scale",
            "2.8",
            "--slg-start",
            "0.01",
            "--slg-stop",
            "0.2",
            "--width",
            "32",
            "--height",
            "32",
            "--init-latents",
            &lat,
            "--out",
            &o,
        ],
        vec![
            "generate",
            "--model",
            &m,
            "--prompt",
            "x",
            "--vae-tile",
            "8",
            "--vae-budget-mib",
            "1",
            "--dtype",
            "f16",
            "--out",
            &o,
            "--width",
            "32",
            "--height",
            "32",
        ],
        vec![
            "decode",
            "--model",
            &m,
            "--latents",
            &lat,
            "--out",
            &o,
            "--vae-tile",
            "8",
            "--tile-overlap",
            "2",
        ],
        vec![
            "bench",
            "--arch",
            "tiny",
            "--steps",
            "2",
            "--width",
            "64",
            "--height",
            "64",
            "--cfg",
            "7",
            "--dry-run",
        ],
    ]
    .iter()
    .map(|v| v.iter().map(|s| s.to_string()).collect())
    .collect();
    let values = [
        "0",
        "-1",
        "1",
        "18446744073709551615",
        "18446744073709551616",
        "4294967296",
        "nan",
        "NaN",
        "inf",
        "-inf",
        "1e400",
        "1e-45",
        "",
        " ",
        "0x10",
        "3.5",
        "一只猫🐈",
        "..",
        "/",
        "/dev/null",
        "7,8,99",
        "f64",
        "torch",
        "99999999",
    ];
    let flags = [
        "--steps",
        "--cfg",
        "--shift",
        "--width",
        "--height",
        "--batch",
        "--max-t5-tokens",
        "--strength",
        "--slg-layers",
        "--slg-scale",
        "--seed",
        "--vae-tile",
        "--out",
        "--dtype",
        "--init-latents",
        "--save-latents",
        "--trace",
        "--rng",
        "--no-t5",
    ];
    let t0 = Instant::now();
    let ok = run_cases(
        "command lines",
        N_COMMAND_LINES,
        Duration::from_secs(30),
        move |i, r, desc| {
            let mut args = bases[i % bases.len()].clone();
            for _ in 0..1 + r.below(3) {
                match r.below(5) {
                    0 if args.len() > 2 => {
                        let k = 1 + r.below(args.len() - 1);
                        args.remove(k);
                    }
                    1 => {
                        let k = 1 + r.below(args.len());
                        args.insert(k, r.pick(&flags).to_string());
                    }
                    2 => {
                        args.push(r.pick(&flags).to_string());
                        args.push(r.pick(&values).to_string());
                    }
                    _ => {
                        // Mostly a flag's value, sometimes the flag itself.
                        let mut k = 1 + r.below(args.len() - 1);
                        if args[k].starts_with("--") && k + 1 < args.len() && r.below(4) != 0 {
                            k += 1;
                        }
                        args[k] = r.pick(&values).to_string();
                    }
                }
            }
            *desc = format!("{args:?}");
            let mut argv = vec!["sd3".to_string()];
            argv.extend(args);
            match Cli::try_parse_from(&argv) {
                Err(e) => Err(e.to_string()),
                Ok(cli) => match &cli.command {
                    Command::Generate(a) => {
                        let _ = pipeline_options(&cli, a);
                        check_generate(pipe, a)
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    }
                    _ => Ok(()),
                },
            }
        },
    );
    println!(
        "command lines: {ok} of {N_COMMAND_LINES} mutated command lines passed every check, {:?}",
        t0.elapsed()
    );
}

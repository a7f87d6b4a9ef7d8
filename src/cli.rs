//! The `sd3` command line (clap), kept in the library so that its argument
//! handling can be tested in-process; `src/main.rs` only calls [`run`].

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};

use crate::decode::{numbered, read_latents, write_latents};
use crate::files::{check_output, check_outputs_apart, write_bytes};
use crate::gpu::{list_adapters, Gpu, GpuOptions};
use crate::pipeline::{defaults, GenerateRequest, Latents, Pipeline, PipelineOptions};
use crate::{bench, DType};

#[derive(Parser)]
#[command(
    name = "sd3",
    version,
    about = "Stable Diffusion 3 on any GPU wgpu reaches"
)]
pub struct Cli {
    /// Backend: vulkan, metal, dx12 or gl (default: all).
    #[arg(long, global = true, env = "SD3_BACKEND")]
    pub backend: Option<String>,
    /// Adapter index (from `sd3 devices`) or a name substring.
    #[arg(long, global = true, env = "SD3_ADAPTER")]
    pub adapter: Option<String>,
    /// Op implementations: auto (the fastest the adapter supports) or
    /// portable (only those needing no optional feature: the reference path).
    #[arg(long, global = true, env = "SD3_KERNELS", value_enum)]
    pub kernels: Option<KernelsArg>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// List every GPU adapter with backend, driver, type, limits and features.
    Devices,
    /// Show what a checkpoint holds: detected variant, parameters, dtypes, components.
    Inspect {
        /// A single .safetensors file or a diffusers folder.
        path: std::path::PathBuf,
    },
    /// Decode latents (a safetensors file with one tensor `latents` [b, 16, h, w]) to PNG.
    Decode {
        /// Checkpoint with the VAE: single file or diffusers folder.
        #[arg(long)]
        model: std::path::PathBuf,
        /// Latents file, as `generate --save-latents` writes it.
        #[arg(long)]
        latents: std::path::PathBuf,
        /// Output PNG (numbered -0, -1, … for a batch).
        #[arg(long, default_value = "image.png")]
        out: std::path::PathBuf,
        /// Decode in tiles of this many latent pixels (default: only when needed).
        #[arg(long)]
        vae_tile: Option<usize>,
        /// Overlap between tiles, in latent pixels.
        #[arg(long, default_value_t = defaults::TILE_OVERLAP)]
        tile_overlap: usize,
        /// Tile when a full-frame decode needs more than this many MiB of intermediates.
        #[arg(long)]
        vae_budget_mib: Option<u64>,
        /// Storage of the VAE's conv and linear weights.
        #[arg(long, value_enum, default_value_t = WeightType::F32)]
        dtype: WeightType,
    },
    /// Text to image.
    Generate(Box<GenerateArgs>),
    /// Serve the model over HTTP: a web page, A1111's and OpenAI's image
    /// APIs, a job queue with progress as server-sent events.
    Serve(Box<ServeArgs>),
    /// Time the portable GEMM's tile candidates on this adapter and keep the
    /// fastest, cached per adapter, driver, activation type and version
    /// (in $SD3_CACHE_DIR, else the user cache folder).
    Tune {
        /// Scaled-down shapes, for software adapters (the default on CPU adapters).
        #[arg(long)]
        small: bool,
        /// Timed runs per shape (the median counts).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Activation type to tune for: f16 (as `generate --dtype f16`) or f32.
        #[arg(long, value_enum, default_value_t = WeightType::F16)]
        dtype: WeightType,
        /// Print the timings and the choice without writing the cache.
        #[arg(long)]
        dry_run: bool,
    },
    /// Benchmarks: a full architecture with random weights (`--arch`), or `bench kernels`.
    #[command(args_conflicts_with_subcommands = true)]
    Bench {
        #[command(subcommand)]
        what: Option<BenchWhat>,
        #[command(flatten)]
        arch: Box<BenchArgs>,
    },
}

/// What `sd3 bench` measures besides a whole architecture.
#[derive(Subcommand)]
pub enum BenchWhat {
    /// Time linear and attention kernels at SD3 shapes.
    Kernels {
        /// Scaled-down shapes, for software adapters such as lavapipe.
        #[arg(long, conflicts_with = "report")]
        small: bool,
        /// The shapes tools/gpu-report compares with PyTorch's.
        #[arg(long)]
        report: bool,
        /// Also write every result as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Storage type of the linear weights.
        #[arg(long, value_enum, default_value_t = WeightType::F16)]
        weights: WeightType,
        /// Timed runs per case (the median is reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
}

/// What to load and how: `generate` and `serve` take the same flags.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// GPU memory budget in MiB: MMDiT blocks that do not fit beside the
    /// rest are streamed from host memory every step (same image, slower).
    #[arg(long, value_name = "MIB")]
    pub vram_budget: Option<u64>,
    /// Checkpoint: a Stability single file or a diffusers folder.
    #[arg(long)]
    pub model: PathBuf,
    /// CLIP-L weights (clip_l.safetensors), overriding the model's.
    #[arg(long)]
    pub clip_l: Option<PathBuf>,
    /// CLIP-G weights (clip_g.safetensors), overriding the model's.
    #[arg(long)]
    pub clip_g: Option<PathBuf>,
    /// T5-XXL weights (t5xxl_fp16.safetensors), overriding the model's.
    #[arg(long)]
    pub t5: Option<PathBuf>,
    /// VAE weights (a safetensors file in Stability's or diffusers' names, or
    /// a diffusers vae/ folder), overriding the model's; a .gguf transformer
    /// needs it.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// Run without T5 (its part of the context becomes zeros, as in diffusers).
    #[arg(long)]
    pub no_t5: bool,
    /// Folder with tokenizer/, tokenizer_2/, tokenizer_3/ (needed for single files).
    #[arg(long)]
    pub tokenizers: Option<PathBuf>,
    /// A LoRA to merge, FILE or FILE:STRENGTH (default 1); repeat for several.
    /// diffusers/PEFT, kohya and Stability/ComfyUI layouts, for the MMDiT and
    /// the text encoders.
    #[arg(long = "lora", value_name = "FILE[:STRENGTH]", value_parser = parse_lora)]
    pub loras: Vec<crate::lora::LoraSpec>,
    /// A distilled turbo model: 4 steps and no CFG unless --steps/--cfg say
    /// otherwise (SD3.5 large turbo is recognised from its name without it).
    #[arg(long)]
    pub turbo: bool,
    /// f16: f16 matrices and, where the adapter has SHADER_F16, f16 activations
    /// (f32 accumulation); f32: the exact path.
    #[arg(long, value_enum, default_value_t = WeightType::F16)]
    pub dtype: WeightType,
    /// Decode in tiles of this many latent pixels.
    #[arg(long)]
    pub vae_tile: Option<usize>,
    /// Tile the VAE when a full decode needs more than this many MiB.
    #[arg(long)]
    pub vae_budget_mib: Option<u64>,
}

/// `sd3 generate` arguments.
#[derive(clap::Args)]
pub struct GenerateArgs {
    /// The model and how it is loaded.
    #[command(flatten)]
    pub load: ModelArgs,
    /// An SD3 ControlNet (diffusers folder or safetensors file); repeat for
    /// several, each with its own --control-image.
    #[arg(long = "controlnet", value_name = "PATH")]
    pub controlnets: Vec<PathBuf>,
    /// The control image of each --controlnet, in order (the output's size).
    #[arg(long = "control-image", value_name = "IMAGE")]
    pub control_images: Vec<PathBuf>,
    /// Scale of each ControlNet (one value for all, or one per ControlNet; default 1).
    #[arg(long = "control-scale", value_name = "S")]
    pub control_scales: Vec<f32>,
    /// Fraction of the steps before each ControlNet starts acting (default 0).
    #[arg(long = "control-start", value_name = "A")]
    pub control_starts: Vec<f32>,
    /// Fraction of the steps after which each ControlNet stops (default 1).
    #[arg(long = "control-stop", value_name = "B")]
    pub control_stops: Vec<f32>,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// The negative prompt.
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Denoising steps (default per model: 28, 40 for SD3.5 medium).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Guidance scale (default per model); 1 or less skips the unconditional pass.
    #[arg(long)]
    pub cfg: Option<f32>,
    /// Time shift (default: the scheduler config's, else 3.0).
    #[arg(long)]
    pub shift: Option<f64>,
    /// Noise seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Noise generator: native, or torch (reproduces torch.randn on CPU).
    #[arg(long, value_enum, default_value_t = RngArg::Native)]
    pub rng: RngArg,
    /// Image width (multiple of 16).
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height (multiple of 16).
    #[arg(long)]
    pub height: Option<usize>,
    /// T5 tokens.
    #[arg(long, default_value_t = defaults::MAX_T5_TOKENS)]
    pub max_t5_tokens: usize,
    /// Images to generate.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// img2img: start from this image.
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// img2img strength (1 = ignore the image).
    #[arg(long, default_value_t = defaults::STRENGTH)]
    pub strength: f64,
    /// img2img: `sample` the encoder's latent distribution from the seed, as
    /// diffusers does (`--rng torch` reproduces its latents), or take its `mean`.
    #[arg(long, value_enum, default_value_t = InitModeArg::Sample)]
    pub init_mode: InitModeArg,
    /// Inpainting: repaint the white part of this mask (the init image's
    /// size; grey is split at one half) and keep the rest of the init image.
    #[arg(long, requires = "init_image")]
    pub mask: Option<PathBuf>,
    /// Inpainting: blur the mask with this Gaussian radius (pixels, as
    /// diffusers' `mask_processor.blur`) before it is split at one half.
    #[arg(long, default_value_t = 0.0)]
    pub mask_blur: f32,
    /// Initial noise: safetensors with an f32 tensor `latents` [batch, 16, h/8, w/8].
    #[arg(long)]
    pub init_latents: Option<PathBuf>,
    /// Also save the final latents (before the VAE's scale/shift) as safetensors.
    #[arg(long)]
    pub save_latents: Option<PathBuf>,
    /// Output PNG (numbered -0, -1, … for a batch).
    #[arg(long, default_value = "image.png")]
    pub out: PathBuf,
    /// Print per-op GPU timings of one MMDiT step and the peak GPU memory.
    #[arg(long)]
    pub profile: bool,
    /// Write that step's timings as Chrome trace JSON.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Skip-layer guidance: blocks to skip in the extra pass (e.g. 7,8,9 for SD3.5 medium).
    #[arg(long, value_delimiter = ',')]
    pub slg_layers: Vec<usize>,
    /// Skip-layer guidance scale.
    #[arg(long, default_value_t = defaults::SLG_SCALE)]
    pub slg_scale: f32,
    /// Skip-layer guidance starts after this fraction of the steps.
    #[arg(long, default_value_t = defaults::SLG_START)]
    pub slg_start: f32,
    /// Skip-layer guidance stops at this fraction of the steps.
    #[arg(long, default_value_t = defaults::SLG_STOP)]
    pub slg_stop: f32,
}

/// `sd3 serve` arguments.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// The model and how it is loaded.
    #[command(flatten)]
    pub load: ModelArgs,
    /// Address and port to listen on. The server has no authentication:
    /// keep it on loopback unless the network is yours.
    #[arg(long, default_value = "127.0.0.1:7860")]
    pub listen: std::net::SocketAddr,
    /// Jobs that may wait at once (more are refused with 503).
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Free the text encoders after each job instead of keeping them on the
    /// GPU (less memory held, slower jobs).
    #[arg(long)]
    pub unload_text: bool,
}

/// `sd3 bench --arch` arguments.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// tiny, sd3-medium, sd3.5-medium or sd3.5-large.
    #[arg(long, default_value = "tiny")]
    pub arch: String,
    /// Image width.
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height.
    #[arg(long)]
    pub height: Option<usize>,
    /// Denoising steps.
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
    /// Guidance scale (> 1 runs cond and uncond as a batch of 2).
    #[arg(long, default_value_t = 7.0)]
    pub cfg: f32,
    /// f16: f16 matrices and (with SHADER_F16) activations; f32: the exact path.
    #[arg(long, value_enum, default_value_t = WeightType::F16)]
    pub dtype: WeightType,
    /// Stages to run: text, mmdit, vae (comma separated).
    #[arg(long, default_value = "text,mmdit,vae", value_delimiter = ',')]
    pub components: Vec<String>,
    /// Write the report as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write every op as Chrome trace JSON.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Where the decoded image goes (tiny writes bench.png by default).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Only record and validate the graphs (no GPU work), printing FLOP counts.
    #[arg(long)]
    pub dry_run: bool,
    /// The text encoders' and MMDiT's matrices stored as a checkpoint in this
    /// encoding keeps them on the GPU (random bits of it; default: --dtype).
    #[arg(long, value_enum)]
    pub weights: Option<StorageArg>,
    /// With --dry-run: plan the MMDiT stage within this many MiB, streaming
    /// the blocks that do not fit (see `generate --vram-budget`).
    #[arg(long, value_name = "MIB", requires = "dry_run")]
    pub vram_budget: Option<u64>,
}

/// `--rng`.
#[derive(Clone, Copy, ValueEnum)]
pub enum RngArg {
    /// Our own generator.
    Native,
    /// torch.randn on CPU.
    Torch,
}

/// `--dtype`.
#[derive(Clone, Copy, ValueEnum)]
pub enum WeightType {
    /// 16-bit floats.
    F16,
    /// 32-bit floats.
    F32,
}

impl WeightType {
    /// The tensor type.
    pub fn dtype(self) -> DType {
        match self {
            WeightType::F16 => DType::F16,
            WeightType::F32 => DType::F32,
        }
    }
}

/// `--weights`: how a checkpoint's matrices are stored on the GPU.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum StorageArg {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// bfloat16.
    Bf16,
    /// float8 e4m3fn (ComfyUI's `*_fp8_e4m3fn` files).
    Fp8,
    /// float8 e5m2.
    Fp8E5m2,
    /// GGML Q8_0 (8.5 bits per weight).
    #[value(name = "q8_0")]
    Q8_0,
    /// GGML Q4_0 (4.5 bits per weight).
    #[value(name = "q4_0")]
    Q4_0,
    /// GGML Q4_1 (5 bits per weight).
    #[value(name = "q4_1")]
    Q4_1,
    /// GGML Q5_0 (5.5 bits per weight).
    #[value(name = "q5_0")]
    Q5_0,
    /// GGML Q5_1 (6 bits per weight).
    #[value(name = "q5_1")]
    Q5_1,
    /// GGML Q4_K (4.5 bits per weight).
    #[value(name = "q4_k")]
    Q4K,
    /// GGML Q5_K (5.5 bits per weight).
    #[value(name = "q5_k")]
    Q5K,
    /// GGML Q6_K (6.6 bits per weight).
    #[value(name = "q6_k")]
    Q6K,
}

impl StorageArg {
    /// The tensor type.
    pub fn dtype(self) -> DType {
        match self {
            StorageArg::F32 => DType::F32,
            StorageArg::F16 => DType::F16,
            StorageArg::Bf16 => DType::BF16,
            StorageArg::Fp8 => DType::F8E4M3,
            StorageArg::Fp8E5m2 => DType::F8E5M2,
            StorageArg::Q8_0 => DType::Q8_0,
            StorageArg::Q4_0 => DType::Q4_0,
            StorageArg::Q4_1 => DType::Q4_1,
            StorageArg::Q5_0 => DType::Q5_0,
            StorageArg::Q5_1 => DType::Q5_1,
            StorageArg::Q4K => DType::Q4K,
            StorageArg::Q5K => DType::Q5K,
            StorageArg::Q6K => DType::Q6K,
        }
    }
}

/// `--init-mode`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum InitModeArg {
    /// A sample of the encoder's latent distribution (diffusers).
    Sample,
    /// The distribution's mean.
    Mean,
}

/// `--kernels`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum KernelsArg {
    /// The first implementation the adapter supports.
    Auto,
    /// Only implementations that need no optional feature.
    Portable,
}

fn gpu_options(cli: &Cli) -> GpuOptions {
    GpuOptions {
        backend: cli.backend.clone(),
        adapter: cli.adapter.clone(),
        kernels: cli.kernels.map(|k| {
            match k {
                KernelsArg::Auto => "auto",
                KernelsArg::Portable => "portable",
            }
            .to_string()
        }),
        tuned_tiles: true,
        ..GpuOptions::from_env()
    }
}

fn devices(cli: &Cli) -> Result<(), Box<dyn std::error::Error>> {
    let adapters = list_adapters(cli.backend.as_deref())?;
    if adapters.is_empty() {
        println!("no GPU adapters found (install a Vulkan, Metal, DX12 or GL driver; on Linux without a GPU: mesa-vulkan-drivers)");
    }
    for a in adapters {
        let l = &a.limits;
        println!("{}", a.summary());
        println!("    driver: {} {}", a.info.driver, a.info.driver_info);
        println!(
            "    limits: max_buffer_size {} MiB, max_storage_buffer_binding_size {} MiB, workgroup storage {} KiB, invocations/workgroup {}, workgroups/dim {}, storage buffers/stage {}",
            l.max_buffer_size >> 20,
            l.max_storage_buffer_binding_size >> 20,
            l.max_compute_workgroup_storage_size >> 10,
            l.max_compute_invocations_per_workgroup,
            l.max_compute_workgroups_per_dimension,
            l.max_storage_buffers_per_shader_stage
        );
        let f = a.features;
        let has = |x: wgpu::Features| if f.contains(x) { "yes" } else { "no" };
        println!(
            "    features: shader-f16 {}, subgroup {}, timestamp-query {}, timestamps-inside-passes {}, cooperative-matrix {}",
            has(wgpu::Features::SHADER_F16),
            has(wgpu::Features::SUBGROUP),
            has(wgpu::Features::TIMESTAMP_QUERY),
            has(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES),
            has(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX),
        );
        println!(
            "    subgroup size: {}..{}",
            a.info.subgroup_min_size, a.info.subgroup_max_size
        );
        if !a.coop.is_empty() {
            let configs: Vec<String> = a
                .coop
                .iter()
                .map(|c| format!("{}×{}×{} {}→{}", c.m, c.n, c.k, c.ab, c.c))
                .collect();
            println!(
                "    cooperative-matrix configurations (M×N×K A/B→C): {}",
                configs.join(", ")
            );
        }
    }
    Ok(())
}

fn bench_kernels(
    cli: &Cli,
    set: bench::CaseSet,
    weights: WeightType,
    reps: usize,
    json: Option<&PathBuf>,
) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(p) = json {
        check_output(p)?;
    }
    // f16 weights run with f16 activations where the adapter has them, as
    // `generate --dtype f16` does (the tensor-core GEMM needs them).
    let gpu = Gpu::new(&GpuOptions {
        f16_activations: weights.dtype() == DType::F16,
        ..gpu_options(cli)
    })?;
    println!(
        "adapter: {:?} {} ({})",
        gpu.info.backend, gpu.info.name, gpu.info.driver_info
    );
    if gpu.info.device_type == wgpu::DeviceType::Cpu {
        println!("note: a CPU adapter; these numbers say nothing about GPU performance");
    }
    let wd = weights.dtype();
    println!(
        "activations: {}; portable {}",
        gpu.activation.name(),
        gpu.tuning.clone().unwrap_or_else(|| format!(
            "GEMM tile {} (default; `sd3 tune` sweeps)",
            gpu.gemm_tile.name()
        ))
    );
    println!("{}", bench::header());
    let mut all = Vec::new();
    for case in bench::cases(set) {
        let r = bench::run_case(&gpu, case, wd, reps)?;
        bench::print_case(&r);
        all.extend(r);
    }
    if let Some(p) = json {
        write_bytes(p, bench::json(&all).as_bytes())?;
        println!("wrote {}", p.display());
    }
    Ok(())
}

/// The library request a `generate` command line asks for (init latents
/// are read from their file).
pub fn generate_request(a: &GenerateArgs) -> Result<GenerateRequest, Box<dyn std::error::Error>> {
    let mut req = GenerateRequest::new(&a.prompt);
    req.negative_prompt = a.negative_prompt.clone();
    req.steps = a.steps;
    req.cfg = a.cfg;
    req.shift = a.shift;
    req.seed = a.seed;
    req.rng = match a.rng {
        RngArg::Native => crate::sampler::Rng::Native,
        RngArg::Torch => crate::sampler::Rng::Torch,
    };
    req.width = a.width;
    req.height = a.height;
    req.max_t5_tokens = a.max_t5_tokens;
    req.batch = a.batch;
    req.init_image = a.init_image.clone().map(Into::into);
    req.controls = controls(a)?;
    req.mask = a.mask.clone().map(Into::into);
    req.mask_blur = a.mask_blur;
    req.strength = a.strength;
    req.init_mode = match a.init_mode {
        InitModeArg::Sample => crate::pipeline::InitMode::Sample,
        InitModeArg::Mean => crate::pipeline::InitMode::Mean,
    };
    req.init_latents = match &a.init_latents {
        Some(p) => {
            let (shape, data) = read_latents(p, crate::weights::vae::LATENT_CHANNELS)?;
            Some(Latents {
                shape: shape.to_vec(),
                data,
            })
        }
        None => None,
    };
    req.profile = a.profile || a.trace.is_some();
    req.slg_layers = a.slg_layers.clone();
    req.slg_scale = a.slg_scale;
    req.slg_start = a.slg_start;
    req.slg_stop = a.slg_stop;
    Ok(req)
}

/// Pairs each --controlnet with its --control-image and settings.
fn controls(a: &GenerateArgs) -> Result<Vec<crate::pipeline::Control>, Box<dyn std::error::Error>> {
    let n = a.controlnets.len();
    if n == 0
        && !(a.control_scales.is_empty()
            && a.control_starts.is_empty()
            && a.control_stops.is_empty())
    {
        return Err("--control-scale/--control-start/--control-stop need --controlnet".into());
    }
    if a.control_images.len() != n {
        return Err(format!(
            "{} --control-image for {n} --controlnet: give one image per ControlNet, in the same order",
            a.control_images.len()
        )
        .into());
    }
    let each = |flag: &str, v: &[f32], default: f32| -> Result<Vec<f32>, String> {
        match v.len() {
            0 => Ok(vec![default; n]),
            1 => Ok(vec![v[0]; n]),
            m if m == n => Ok(v.to_vec()),
            m => Err(format!(
                "{m} values of {flag} for {n} --controlnet: give one for all or one per ControlNet"
            )),
        }
    };
    let scales = each("--control-scale", &a.control_scales, 1.0)?;
    let starts = each("--control-start", &a.control_starts, 0.0)?;
    let stops = each("--control-stop", &a.control_stops, 1.0)?;
    Ok(a.control_images
        .iter()
        .enumerate()
        .map(|(k, image)| crate::pipeline::Control {
            image: image.clone(),
            scale: scales[k],
            start: starts[k],
            stop: stops[k],
        })
        .collect())
}

fn parse_lora(s: &str) -> Result<crate::lora::LoraSpec, String> {
    crate::lora::LoraSpec::parse(s).map_err(|e| e.to_string())
}

/// MiB from a flag as bytes (saturating: a huge value means "no limit").
fn mib(m: u64) -> u64 {
    m.saturating_mul(1 << 20)
}

/// The pipeline options a `generate` command line asks for.
pub fn pipeline_options(cli: &Cli, a: &GenerateArgs) -> PipelineOptions {
    model_options(cli, &a.load, a.controlnets.clone())
}

/// The pipeline options of a model's flags, with `controlnets`.
pub fn model_options(cli: &Cli, a: &ModelArgs, controlnets: Vec<PathBuf>) -> PipelineOptions {
    PipelineOptions {
        gpu: gpu_options(cli),
        clip_l: a.clip_l.clone(),
        clip_g: a.clip_g.clone(),
        t5: a.t5.clone(),
        no_t5: a.no_t5,
        tokenizers: a.tokenizers.clone(),
        dtype: a.dtype.dtype(),
        vae_tile: a.vae_tile,
        vae_budget: a.vae_budget_mib.map(mib),
        turbo: a.turbo.then_some(true),
        loras: a.loras.clone(),
        controlnets,
        vae: a.vae.clone(),
        vram_budget: a.vram_budget.map(mib),
        ..PipelineOptions::default()
    }
}

/// The files `generate` will write, with the flag that names each.
pub fn generate_outputs(a: &GenerateArgs) -> Vec<(&'static str, PathBuf)> {
    let n = a.batch.clamp(1, crate::pipeline::MAX_BATCH);
    let mut out: Vec<(&'static str, PathBuf)> =
        (0..n).map(|i| ("--out", numbered(&a.out, i, n))).collect();
    out.extend(a.save_latents.clone().map(|p| ("--save-latents", p)));
    out.extend(a.trace.clone().map(|p| ("--trace", p)));
    out
}

/// Checks a `generate` command line against a loaded pipeline: the request
/// (values, sizes, limits, init files) and the outputs (writable, none of
/// them an input or another output). Nothing is run.
pub fn check_generate(
    pipe: &Pipeline,
    a: &GenerateArgs,
) -> Result<GenerateRequest, Box<dyn std::error::Error>> {
    let mut inputs = pipe.input_files();
    inputs.extend(a.init_image.clone());
    inputs.extend(a.mask.clone());
    inputs.extend(a.control_images.iter().cloned());
    inputs.extend(a.init_latents.clone());
    check_outputs_apart(&generate_outputs(a), &inputs)?;
    let req = generate_request(a)?;
    pipe.check(&req)?;
    Ok(req)
}

fn generate(cli: &Cli, a: &GenerateArgs) -> Result<(), Box<dyn std::error::Error>> {
    // Everything that can be checked up front is, before minutes of work:
    // outputs first (no device needed), then the request against the model.
    for (_, p) in generate_outputs(a) {
        check_output(&p)?;
    }
    let pipe = Pipeline::load(&a.load.model, pipeline_options(cli, a))?;
    let req = check_generate(&pipe, a)?;
    for l in pipe.loras() {
        let parts: Vec<String> = l
            .modules
            .iter()
            .map(|(c, n)| format!("{n} modules of {}", c.name()))
            .collect();
        eprintln!(
            "LoRA {} × {}: {}",
            l.path.display(),
            l.strength,
            parts.join(", ")
        );
        if l.skipped_t5 > 0 {
            eprintln!(
                "note: {} T5 modules of {} left out: this run has no T5",
                l.skipped_t5,
                l.path.display()
            );
        }
    }
    if pipe.is_turbo() && (a.steps.is_none() || a.cfg.is_none()) {
        eprintln!("note: a turbo model: 4 steps and no CFG unless --steps/--cfg say otherwise");
    }
    let tty = std::io::stderr().is_terminal();
    let t0 = Instant::now();
    let out = pipe.generate(&req, &mut |step, total| {
        if tty {
            let rate = step as f64 / t0.elapsed().as_secs_f64().max(1e-9);
            let eta = (total - step) as f64 / rate.max(1e-9);
            eprint!("\rstep {step}/{total}  {rate:.2} step/s  ETA {eta:.0} s   ");
            if step == total {
                eprintln!();
            }
        }
    })?;
    // With CFG the negative prompts come first; each prompt is repeated per image.
    let negatives = if out.settings.cfg > 1.0 { req.batch } else { 0 };
    let mut said = std::collections::BTreeSet::new();
    for t in &out.truncated {
        let which = if t.prompt < negatives {
            "negative prompt"
        } else {
            "prompt"
        };
        if said.insert((t.encoder, which)) {
            eprintln!(
                "warning: the {which} was too long for {}: {} tokens were dropped",
                t.encoder, t.dropped
            );
        }
    }
    let s = &out.settings;
    let text = pipe.image_metadata(&req, s);
    for (i, img) in out.images.iter().enumerate() {
        let p = numbered(&a.out, i, out.images.len());
        for w in crate::image_io::save_png(&p, img, s.width, s.height, &text)? {
            eprintln!("warning: {w}");
        }
        println!("wrote {}", p.display());
    }
    if let Some(p) = &a.save_latents {
        write_latents(p, out.latent_shape, &out.latents)?;
        println!("wrote {}", p.display());
    }
    if let Some(prof) = &out.profile {
        if a.profile {
            println!("{}", prof.table(20));
        }
        if let Some(t) = &a.trace {
            write_bytes(t, prof.chrome_trace().as_bytes())?;
            println!("wrote {}", t.display());
        }
    }
    if a.profile {
        println!(
            "peak GPU memory (storage buffers): {:.1} MiB",
            out.peak_memory as f64 / (1u64 << 20) as f64
        );
    }
    Ok(())
}

fn serve(cli: &Cli, a: &ServeArgs) -> Result<(), Box<dyn std::error::Error>> {
    if a.max_queue == 0 {
        return Err("--max-queue must be at least 1".into());
    }
    let options = PipelineOptions {
        keep_loaded: true,
        keep_text: !a.unload_text,
        ..model_options(cli, &a.load, Vec::new())
    };
    if options.vram_budget.is_some() {
        eprintln!(
            "note: under --vram-budget each job loads its models in turn (each stage gets the whole budget)"
        );
    }
    let pipe = Pipeline::load(&a.load.model, options)?;
    let adapter = pipe.gpu.info.name.clone();
    let config = crate::serve::ServeConfig {
        listen: a.listen,
        max_queued: a.max_queue,
        ..Default::default()
    };
    let server = crate::serve::Server::start(pipe, &config)?;
    if !server.addr.ip().is_loopback() {
        eprintln!(
            "warning: listening on {} — anyone who can reach it can use this GPU (there is no authentication)",
            server.addr
        );
    }
    println!(
        "serving {} on {adapter} at http://{} (Ctrl-C stops)",
        a.load.model.display(),
        server.addr
    );
    server.run_until_interrupted()?;
    Ok(())
}

fn bench_arch(cli: &Cli, a: &BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    use crate::bench_arch::{record_graphs_with, run, Arch, BenchOptions};
    let arch = Arch::parse(&a.arch)?;
    let default = if arch == Arch::Tiny { 64 } else { 1024 };
    let (width, height) = (a.width.unwrap_or(default), a.height.unwrap_or(default));
    let outputs: Vec<(&str, PathBuf)> = [
        ("--json", &a.json),
        ("--trace", &a.trace),
        ("--out", &a.out),
    ]
    .into_iter()
    .filter_map(|(f, p)| Some((f, p.clone()?)))
    .collect();
    for (_, p) in &outputs {
        check_output(p)?;
    }
    check_outputs_apart(&outputs, &[])?;
    let gpu = Gpu::new(&GpuOptions {
        f16_activations: a.dtype.dtype() == DType::F16,
        ..gpu_options(cli)
    })?;
    if a.dry_run {
        let batch = if a.cfg > 1.0 { 2 } else { 1 };
        // Plans as a GPU with f16 would run them, whatever this adapter has.
        let weights = a.weights.map(|w| w.dtype()).unwrap_or(a.dtype.dtype());
        let g = record_graphs_with(&gpu, arch, width, height, batch, a.dtype.dtype(), weights)?;
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        println!(
            "{:<8} {:>6} {:>10} {:>12} {:>16} {:>10}",
            "graph", "ops", "GFLOP", "weights GiB", "activations GiB", "total GiB"
        );
        for (name, graph) in &g.graphs {
            let acts = graph.pooled_bytes() + graph.input_bytes();
            println!(
                "{name:<8} {:>6} {:>10.1} {:>12.2} {:>16.3} {:>10.2}",
                graph.len(),
                graph.cost().flops as f64 / 1e9,
                gib(graph.weight_bytes()),
                gib(acts),
                gib(graph.weight_bytes() + acts)
            );
        }
        println!(
            "(activations as --dtype {} stores them, text-encoder and MMDiT matrices as {}; each component is loaded, run and freed in turn)",
            a.dtype.dtype().name(),
            weights.name()
        );
        if let Some(budget) = a.vram_budget.map(mib) {
            println!("\nwithin --vram-budget {} MiB:", budget >> 20);
            let plans = crate::bench_arch::plan_budget(&g, budget)?;
            for p in &plans {
                let per = if p.name == "mmdit" { "step" } else { "run" };
                let detail = if p.blocks == 0 {
                    if p.peak > budget {
                        " — over the budget (its weights are not streamed)".to_string()
                    } else {
                        String::new()
                    }
                } else if p.resident < p.blocks {
                    format!(
                        ": {} of {} blocks resident, {} streamed ({:.2} GiB from host memory per {per})",
                        p.resident,
                        p.blocks,
                        p.blocks - p.resident,
                        gib(p.streamed_bytes)
                    )
                } else {
                    String::new()
                };
                println!("{:<8} peak {:.2} GiB{detail}", p.name, gib(p.peak));
            }
            println!(
                "peak with --vram-budget {}: {:.2} GiB",
                budget >> 20,
                gib(plans.iter().map(|p| p.peak).max().unwrap_or(0))
            );
        }
        return Ok(());
    }
    let opts = BenchOptions {
        arch,
        width,
        height,
        steps: a.steps,
        cfg: a.cfg,
        dtype: a.dtype.dtype(),
        weights: a.weights.map(|w| w.dtype()).unwrap_or(a.dtype.dtype()),
        components: a.components.clone(),
        seed: 0,
    };
    let report = run(&gpu, &opts)?;
    if gpu.info.device_type == wgpu::DeviceType::Cpu {
        println!("note: a CPU adapter; these numbers say nothing about GPU performance");
    }
    print!("{}", report.text());
    if let Some(p) = &a.json {
        write_bytes(p, report.json().as_bytes())?;
        println!("wrote {}", p.display());
    }
    if let Some(p) = &a.trace {
        write_bytes(p, report.ops.chrome_trace().as_bytes())?;
        println!("wrote {}", p.display());
    }
    let out = a
        .out
        .clone()
        .or_else(|| (arch == Arch::Tiny).then(|| PathBuf::from("bench.png")));
    if let (Some(p), Some((img, w, h))) = (out, &report.image) {
        crate::image_io::save_png(
            &p,
            img,
            *w,
            *h,
            &[("Software", "sd3-wgpu bench (random weights)".into())],
        )?;
        println!("wrote {}", p.display());
    }
    Ok(())
}

/// Runs a parsed command line.
pub fn run(cli: &Cli) -> Result<(), Box<dyn std::error::Error>> {
    match &cli.command {
        Command::Devices => devices(cli),
        Command::Generate(a) => generate(cli, a),
        Command::Serve(a) => serve(cli, a),
        Command::Decode {
            model,
            latents,
            out,
            vae_tile,
            tile_overlap,
            vae_budget_mib,
            dtype,
        } => {
            let opts = crate::decode::DecodeOptions {
                model: model.clone(),
                latents: latents.clone(),
                out: out.clone(),
                tile: *vae_tile,
                overlap: *tile_overlap,
                budget: vae_budget_mib.map(mib),
                matrix: dtype.dtype(),
            };
            Gpu::new(&gpu_options(cli))
                .map_err(Into::into)
                .and_then(|gpu| {
                    let (written, warnings) = crate::decode::decode(&gpu, &opts)?;
                    for w in warnings {
                        eprintln!("warning: {w}");
                    }
                    for p in written {
                        println!("wrote {}", p.display());
                    }
                    Ok(())
                })
        }
        Command::Inspect { path } => crate::weights::inspect::inspect(path)
            .map(|r| print!("{r}"))
            .map_err(Into::into),
        Command::Bench {
            what:
                Some(BenchWhat::Kernels {
                    small,
                    report,
                    json,
                    weights,
                    reps,
                }),
            ..
        } => {
            let set = match (small, report) {
                (true, _) => bench::CaseSet::Small,
                (_, true) => bench::CaseSet::Report,
                _ => bench::CaseSet::Sd3,
            };
            bench_kernels(cli, set, *weights, *reps, json.as_ref())
        }
        Command::Bench { what: None, arch } => bench_arch(cli, arch),
        Command::Tune {
            small,
            reps,
            dtype,
            dry_run,
        } => tune(cli, *small, *reps, *dtype, *dry_run),
    }
}

fn tune(
    cli: &Cli,
    small: bool,
    reps: usize,
    dtype: WeightType,
    dry_run: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    use crate::tune;
    let dir = tune::cache_dir();
    if dir.is_none() && !dry_run {
        return Err("no cache folder: set SD3_CACHE_DIR (or HOME), or pass --dry-run".into());
    }
    let gpu = Gpu::new(&GpuOptions {
        f16_activations: dtype.dtype() == DType::F16,
        tuned_tiles: false,
        ..gpu_options(cli)
    })?;
    let small = small || gpu.info.device_type == wgpu::DeviceType::Cpu;
    println!(
        "adapter: {:?} {} ({}), activations {}",
        gpu.info.backend,
        gpu.info.name,
        gpu.info.driver_info,
        gpu.activation.name()
    );
    let shapes = tune::shapes(small);
    println!(
        "GEMM shapes (m×k→n, f16 weights): {}",
        shapes
            .iter()
            .map(|(m, k, n)| format!("{m}×{k}→{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let timings = tune::sweep(&gpu, &shapes, reps)?;
    let best = tune::best(&timings).ok_or("no candidate tile fits this adapter's limits")?;
    let best_ms = timings
        .iter()
        .find(|t| t.tile == best)
        .map_or(0.0, |t| t.ms);
    println!(
        "{:<12} {:>10} {:>10} {:>8}",
        "tile", "ms", "GFLOP/s", "× best"
    );
    for t in &timings {
        println!(
            "{:<12} {:>10.3} {:>10.1} {:>8.2}",
            t.tile.name(),
            t.ms,
            t.gflops,
            best_ms / t.ms.max(f64::MIN_POSITIVE)
        );
    }
    println!("fastest: {}", best.name());
    if gpu.info.device_type == wgpu::DeviceType::Cpu {
        println!("note: a CPU adapter; this choice says nothing about GPUs");
    }
    match dir {
        Some(dir) if !dry_run => {
            let path = tune::store(&dir, &tune::cache_key(&gpu), best)?;
            println!("wrote {} (for {})", path.display(), tune::cache_key(&gpu));
        }
        _ => println!("not written (--dry-run)"),
    }
    Ok(())
}

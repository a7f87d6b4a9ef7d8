//! The `sd3` command line: a thin layer over the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use sd3_wgpu::gpu::{list_adapters, Gpu, GpuOptions};
use sd3_wgpu::{bench, DType};

#[derive(Parser)]
#[command(
    name = "sd3",
    version,
    about = "Stable Diffusion 3 on any GPU wgpu reaches"
)]
struct Cli {
    /// Backend: vulkan, metal, dx12 or gl (default: all).
    #[arg(long, global = true, env = "SD3_BACKEND")]
    backend: Option<String>,
    /// Adapter index (from `sd3 devices`) or a name substring.
    #[arg(long, global = true, env = "SD3_ADAPTER")]
    adapter: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
        #[arg(long, default_value_t = 8)]
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
    /// Benchmarks: a full architecture with random weights (`--arch`), or `bench kernels`.
    #[command(args_conflicts_with_subcommands = true)]
    Bench {
        #[command(subcommand)]
        what: Option<BenchWhat>,
        #[command(flatten)]
        arch: Box<BenchArgs>,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Time linear and attention kernels at SD3 shapes.
    Kernels {
        /// Scaled-down shapes, for software adapters such as lavapipe.
        #[arg(long)]
        small: bool,
        /// Storage type of the linear weights.
        #[arg(long, value_enum, default_value_t = WeightType::F16)]
        weights: WeightType,
        /// Timed runs per case (the median is reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
}

/// `sd3 generate` arguments.
#[derive(clap::Args)]
struct GenerateArgs {
    /// Checkpoint: a Stability single file or a diffusers folder.
    #[arg(long)]
    model: PathBuf,
    /// CLIP-L weights (clip_l.safetensors), overriding the model's.
    #[arg(long)]
    clip_l: Option<PathBuf>,
    /// CLIP-G weights (clip_g.safetensors), overriding the model's.
    #[arg(long)]
    clip_g: Option<PathBuf>,
    /// T5-XXL weights (t5xxl_fp16.safetensors), overriding the model's.
    #[arg(long)]
    t5: Option<PathBuf>,
    /// Run without T5 (its part of the context becomes zeros, as in diffusers).
    #[arg(long)]
    no_t5: bool,
    /// Folder with tokenizer/, tokenizer_2/, tokenizer_3/ (needed for single files).
    #[arg(long)]
    tokenizers: Option<PathBuf>,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// The negative prompt.
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Denoising steps (default per model: 28, 40 for SD3.5 medium).
    #[arg(long)]
    steps: Option<usize>,
    /// Guidance scale (default per model); 1 or less skips the unconditional pass.
    #[arg(long)]
    cfg: Option<f32>,
    /// Time shift (default: the scheduler config's, else 3.0).
    #[arg(long)]
    shift: Option<f64>,
    /// Noise seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Noise generator: native, or torch (reproduces torch.randn on CPU).
    #[arg(long, value_enum, default_value_t = RngArg::Native)]
    rng: RngArg,
    /// Image width (multiple of 16).
    #[arg(long)]
    width: Option<usize>,
    /// Image height (multiple of 16).
    #[arg(long)]
    height: Option<usize>,
    /// T5 tokens.
    #[arg(long, default_value_t = 256)]
    max_t5_tokens: usize,
    /// Images to generate.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// img2img: start from this image.
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// img2img strength (1 = ignore the image).
    #[arg(long, default_value_t = 0.6)]
    strength: f32,
    /// Initial noise: safetensors with an f32 tensor `latents` [batch, 16, h/8, w/8].
    #[arg(long)]
    init_latents: Option<PathBuf>,
    /// Also save the final latents (before the VAE's scale/shift) as safetensors.
    #[arg(long)]
    save_latents: Option<PathBuf>,
    /// Storage of the models' matrices.
    #[arg(long, value_enum, default_value_t = WeightType::F16)]
    dtype: WeightType,
    /// Output PNG (numbered -0, -1, … for a batch).
    #[arg(long, default_value = "image.png")]
    out: PathBuf,
    /// Print per-op GPU timings of one MMDiT step and the peak GPU memory.
    #[arg(long)]
    profile: bool,
    /// Write that step's timings as Chrome trace JSON.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Decode in tiles of this many latent pixels.
    #[arg(long)]
    vae_tile: Option<usize>,
    /// Tile the VAE when a full decode needs more than this many MiB.
    #[arg(long)]
    vae_budget_mib: Option<u64>,
    /// Skip-layer guidance: blocks to skip in the extra pass (e.g. 7,8,9 for SD3.5 medium).
    #[arg(long, value_delimiter = ',')]
    slg_layers: Vec<usize>,
    /// Skip-layer guidance scale.
    #[arg(long, default_value_t = 2.8)]
    slg_scale: f32,
    /// Skip-layer guidance starts after this fraction of the steps.
    #[arg(long, default_value_t = 0.01)]
    slg_start: f32,
    /// Skip-layer guidance stops at this fraction of the steps.
    #[arg(long, default_value_t = 0.2)]
    slg_stop: f32,
}

/// `sd3 bench --arch` arguments.
#[derive(clap::Args)]
struct BenchArgs {
    /// tiny, sd3-medium, sd3.5-medium or sd3.5-large.
    #[arg(long, default_value = "tiny")]
    arch: String,
    /// Image width.
    #[arg(long)]
    width: Option<usize>,
    /// Image height.
    #[arg(long)]
    height: Option<usize>,
    /// Denoising steps.
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// Guidance scale (> 1 runs cond and uncond as a batch of 2).
    #[arg(long, default_value_t = 7.0)]
    cfg: f32,
    /// Storage of the matrices.
    #[arg(long, value_enum, default_value_t = WeightType::F16)]
    dtype: WeightType,
    /// Stages to run: text, mmdit, vae (comma separated).
    #[arg(long, default_value = "text,mmdit,vae", value_delimiter = ',')]
    components: Vec<String>,
    /// Write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write every op as Chrome trace JSON.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Where the decoded image goes (tiny writes bench.png by default).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only record and validate the graphs (no GPU work), printing FLOP counts.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum RngArg {
    Native,
    Torch,
}

#[derive(Clone, Copy, ValueEnum)]
enum WeightType {
    F16,
    F32,
}

impl WeightType {
    fn dtype(self) -> DType {
        match self {
            WeightType::F16 => DType::F16,
            WeightType::F32 => DType::F32,
        }
    }
}

fn gpu_options(cli: &Cli) -> GpuOptions {
    GpuOptions {
        backend: cli.backend.clone(),
        adapter: cli.adapter.clone(),
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
    }
    Ok(())
}

fn bench_kernels(
    cli: &Cli,
    small: bool,
    weights: WeightType,
    reps: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let gpu = Gpu::new(&gpu_options(cli))?;
    println!(
        "adapter: {:?} {} ({})",
        gpu.info.backend, gpu.info.name, gpu.info.driver_info
    );
    if gpu.info.device_type == wgpu::DeviceType::Cpu {
        println!("note: a CPU adapter; these numbers say nothing about GPU performance");
    }
    let wd = weights.dtype();
    println!(
        "{:<48} {:>10} {:>10} {:>9}",
        "case", "ms", "GFLOP/s", "GB/s"
    );
    for case in bench::cases(!small) {
        let r = bench::run_case(&gpu, case, wd, reps)?;
        println!(
            "{:<48} {:>10.3} {:>10.1} {:>9.1}",
            r.name, r.ms, r.gflops, r.gbps
        );
    }
    Ok(())
}

fn generate(cli: &Cli, a: &GenerateArgs) -> Result<(), Box<dyn std::error::Error>> {
    use sd3_wgpu::decode::{check_writable, numbered, read_latents, write_latents};
    use sd3_wgpu::pipeline::{GenerateRequest, Pipeline, PipelineOptions};
    // Everything that can be checked up front is, before minutes of work.
    for p in (0..a.batch.max(1))
        .map(|i| numbered(&a.out, i, a.batch.max(1)))
        .chain(a.save_latents.clone())
        .chain(a.trace.clone())
    {
        check_writable(&p)?;
    }
    if let Some(img) = &a.init_image {
        sd3_wgpu::image_io::load_image(img, 16)?;
    }
    let init_latents = match &a.init_latents {
        Some(p) => Some(read_latents(p, 16)?.1),
        None => None,
    };
    let options = PipelineOptions {
        gpu: gpu_options(cli),
        clip_l: a.clip_l.clone(),
        clip_g: a.clip_g.clone(),
        t5: a.t5.clone(),
        no_t5: a.no_t5,
        tokenizers: a.tokenizers.clone(),
        dtype: a.dtype.dtype(),
        vae_tile: a.vae_tile,
        vae_budget: a.vae_budget_mib.map(|m| m << 20),
        ..PipelineOptions::default()
    };
    let pipe = Pipeline::load(&a.model, options)?;
    let mut req = GenerateRequest::new(&a.prompt);
    req.negative_prompt = a.negative_prompt.clone();
    req.steps = a.steps;
    req.cfg = a.cfg;
    req.shift = a.shift;
    req.seed = a.seed;
    req.rng = match a.rng {
        RngArg::Native => sd3_wgpu::sampler::Rng::Native,
        RngArg::Torch => sd3_wgpu::sampler::Rng::Torch,
    };
    req.width = a.width;
    req.height = a.height;
    req.max_t5_tokens = a.max_t5_tokens;
    req.batch = a.batch;
    req.init_image = a.init_image.clone();
    req.strength = a.strength;
    req.init_latents = init_latents;
    req.profile = a.profile || a.trace.is_some();
    req.slg_layers = a.slg_layers.clone();
    req.slg_scale = a.slg_scale;
    req.slg_start = a.slg_start;
    req.slg_stop = a.slg_stop;
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
    for t in &out.truncated {
        eprintln!(
            "warning: the prompt was too long for {}: {} tokens were dropped",
            t.encoder, t.dropped
        );
    }
    let s = &out.settings;
    let text = [
        (
            "Software",
            format!("sd3-wgpu {}", env!("CARGO_PKG_VERSION")),
        ),
        ("prompt", a.prompt.clone()),
        ("negative_prompt", a.negative_prompt.clone()),
        ("seed", a.seed.to_string()),
        ("rng", format!("{:?}", req.rng).to_lowercase()),
        ("steps", s.steps.to_string()),
        ("cfg", s.cfg.to_string()),
        ("shift", s.shift.to_string()),
        ("model", a.model.display().to_string()),
        ("size", format!("{}x{}", s.width, s.height)),
    ];
    for (i, img) in out.images.iter().enumerate() {
        let p = numbered(&a.out, i, out.images.len());
        sd3_wgpu::image_io::save_png(&p, img, s.width, s.height, &text)?;
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
            std::fs::write(t, prof.chrome_trace())?;
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

fn bench_arch(cli: &Cli, a: &BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    use sd3_wgpu::bench_arch::{record_graphs, run, Arch, BenchOptions};
    let arch = Arch::parse(&a.arch)?;
    let default = if arch == Arch::Tiny { 64 } else { 1024 };
    let (width, height) = (a.width.unwrap_or(default), a.height.unwrap_or(default));
    for p in [&a.json, &a.trace, &a.out].into_iter().flatten() {
        sd3_wgpu::decode::check_writable(p)?;
    }
    let gpu = Gpu::new(&gpu_options(cli))?;
    if a.dry_run {
        let batch = if a.cfg > 1.0 { 2 } else { 1 };
        let g = record_graphs(&gpu, arch, width, height, batch)?;
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        println!(
            "{:<8} {:>6} {:>10} {:>12} {:>16} {:>10}",
            "graph", "ops", "GFLOP", "weights GiB", "activations GiB", "total GiB"
        );
        for (name, graph) in &g.graphs {
            let acts = graph.pooled_bytes() + graph.input_bytes();
            println!(
                "{name:<8} {:>6} {:>10.1} {:>12.2} {:>16.2} {:>10.2}",
                graph.len(),
                graph.cost().flops as f64 / 1e9,
                gib(graph.weight_bytes()),
                gib(acts),
                gib(graph.weight_bytes() + acts)
            );
        }
        println!(
            "(weights as --dtype f16 stores them; each component is loaded, run and freed in turn)"
        );
        return Ok(());
    }
    let opts = BenchOptions {
        arch,
        width,
        height,
        steps: a.steps,
        cfg: a.cfg,
        dtype: a.dtype.dtype(),
        components: a.components.clone(),
        seed: 0,
    };
    let report = run(&gpu, &opts)?;
    if gpu.info.device_type == wgpu::DeviceType::Cpu {
        println!("note: a CPU adapter; these numbers say nothing about GPU performance");
    }
    print!("{}", report.text());
    if let Some(p) = &a.json {
        std::fs::write(p, report.json())?;
        println!("wrote {}", p.display());
    }
    if let Some(p) = &a.trace {
        std::fs::write(p, report.ops.chrome_trace())?;
        println!("wrote {}", p.display());
    }
    let out = a
        .out
        .clone()
        .or_else(|| (arch == Arch::Tiny).then(|| PathBuf::from("bench.png")));
    if let (Some(p), Some((img, w, h))) = (out, &report.image) {
        sd3_wgpu::image_io::save_png(
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match &cli.command {
        Command::Devices => devices(&cli),
        Command::Generate(a) => generate(&cli, a),
        Command::Decode {
            model,
            latents,
            out,
            vae_tile,
            tile_overlap,
            vae_budget_mib,
            dtype,
        } => {
            let opts = sd3_wgpu::decode::DecodeOptions {
                model: model.clone(),
                latents: latents.clone(),
                out: out.clone(),
                tile: *vae_tile,
                overlap: *tile_overlap,
                budget: vae_budget_mib.map(|m| m << 20),
                matrix: dtype.dtype(),
            };
            Gpu::new(&gpu_options(&cli))
                .map_err(Into::into)
                .and_then(|gpu| {
                    let written = sd3_wgpu::decode::decode(&gpu, &opts)?;
                    for p in written {
                        println!("wrote {}", p.display());
                    }
                    Ok(())
                })
        }
        Command::Inspect { path } => sd3_wgpu::weights::inspect::inspect(path)
            .map(|r| print!("{r}"))
            .map_err(Into::into),
        Command::Bench {
            what:
                Some(BenchWhat::Kernels {
                    small,
                    weights,
                    reps,
                }),
            ..
        } => bench_kernels(&cli, *small, *weights, *reps),
        Command::Bench { what: None, arch } => bench_arch(&cli, arch),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
